"""The shapes world (issue 7): procedural scenes, classical perception, a checker, and trained tiny models."""

from .world import (
    COLORS,
    HELD_OUT_PAIRINGS,
    SHAPES,
    Scene,
    ShapeObject,
    held_out_prompts,
    render_scene,
    sample_scene,
    train_batch,
)

__all__ = [
    "COLORS",
    "HELD_OUT_PAIRINGS",
    "SHAPES",
    "Scene",
    "ShapeObject",
    "held_out_prompts",
    "render_scene",
    "sample_scene",
    "train_batch",
]
