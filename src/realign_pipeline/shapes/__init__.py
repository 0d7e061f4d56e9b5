"""The shapes world: procedural scenes, classical perception, a checker, and trained tiny models."""

from .pretrained import SHAPES_MODELS, load_shapes_pipeline, shapes_model_path
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
    "SHAPES_MODELS",
    "Scene",
    "ShapeObject",
    "held_out_prompts",
    "load_shapes_pipeline",
    "render_scene",
    "sample_scene",
    "shapes_model_path",
    "train_batch",
]
