"""The trained shapes-world models shipped with the package (see docs/shapes.md for how they were made).

``shapes_model_path("pipeline")`` is a `RealignDiffPipeline` folder; ``"clip"`` the world's small CLIP;
``"blip2-captioner"`` / ``"blip2-itm"`` its BLIP-2 captioner and matcher. ``"pipeline-bow"`` is the second
world (``shapes-bow``): the same scenes, but a text encoder trained without colour-swapped negatives, as
OpenAI's CLIP was, and a UNet trained on it; it is judged by the first world's CLIP and BLIP-2.
``"pipeline-triples"`` is the third world (``shapes-triples``): three-object scenes at 48 px
(:mod:`realign_pipeline.shapes.triples`) drawn by a UNet trained on the second world's text encoder. The weights
are stored in fp16 to keep the package small; load them in float32 on a CPU (``load_shapes_pipeline`` does).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import torch

__all__ = ["SHAPES_MODELS", "SHAPES_WORLDS", "load_shapes_pipeline", "shapes_model_path"]

SHAPES_MODELS = ("pipeline", "clip", "blip2-captioner", "blip2-itm", "pipeline-bow", "pipeline-triples")
#: The worlds by the name the CLI and the presets use, and their pipeline folders.
SHAPES_WORLDS = {"shapes": "pipeline", "shapes-bow": "pipeline-bow", "shapes-triples": "pipeline-triples"}


def shapes_model_path(name: str = "pipeline") -> Path:
    """Folder of one shipped shapes-world model, loadable with ``from_pretrained``."""
    if name not in SHAPES_MODELS:
        raise ValueError(f"unknown shapes-world model {name!r}; choose one of {SHAPES_MODELS}")
    path = Path(str(resources.files("realign_pipeline").joinpath("assets", "shapes", name)))
    if not (path / "config.json").exists() and not (path / "model_index.json").exists():
        raise FileNotFoundError(
            f"the shapes-world model {name!r} is not in this installation ({path}); reinstall realign-pipeline "
            "or retrain it with the scripts in training/shapes/ (docs/shapes.md)"
        )
    return path


def load_shapes_pipeline(
    device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, world: str = "shapes", **kwargs: Any
):
    """`RealignDiffPipeline.from_pretrained` on a shipped shapes-world folder, with its dense captioner.

    `world` is ``"shapes"`` (the first world), ``"shapes-bow"`` (the second) or ``"shapes-triples"`` (the third,
    48 px; see the module docstring)."""
    from ..pipeline import RealignDiffPipeline

    if world not in SHAPES_WORLDS:
        raise ValueError(f"unknown shapes world {world!r}; choose one of {tuple(SHAPES_WORLDS)}")
    pipe = RealignDiffPipeline.from_pretrained(shapes_model_path(SHAPES_WORLDS[world]), dtype=dtype, **kwargs)
    return pipe.to(device)
