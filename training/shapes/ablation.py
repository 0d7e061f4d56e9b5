"""What the shapes-world ablation scripts share (checker_agreement.py, fine_stage_sweep.py, refl_sweep.py):
the held-out prompt x seed jobs, the sampling settings of the shapes presets, and the paired read-outs of a
change (checker summary, images fixed / broken, pixel change)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import numpy as np

from realign_pipeline.evaluation.prompts import load_prompts

#: How the shapes presets sample: 32 px, 20 DDIM steps, guidance 4 (docs/shapes_evaluation.md).
GENERATION: dict[str, Any] = {"height": 32, "width": 32, "num_inference_steps": 20, "guidance_scale": 4.0}


def add_job_arguments(parser: argparse.ArgumentParser) -> None:
    """``--limit`` (held-out prompts, a seeded subset) and ``--seeds``."""
    parser.add_argument("--limit", type=int, default=48)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])


def heldout_jobs(limit: int, seeds: Sequence[int]) -> list[tuple[str, int]]:
    """``(prompt, seed)`` for a seeded subset of ``limit`` ``shapes-heldout`` prompts, every seed of each."""
    return [(r.text, s) for r in load_prompts("shapes-heldout", limit=limit, seed=0) for s in seeds]


def summary(rows: Sequence[dict[str, Any]]) -> dict[str, float | None]:
    """Mean presence, binding and position of :func:`~realign_pipeline.shapes.checker.check_prompt` results
    (position over the rows that have one; None when none has)."""
    result = {}
    for key in ("presence", "binding", "position"):
        values = [r[key] for r in rows if r[key] is not None]
        result[key] = round(float(np.mean(values)), 4) if values else None
    return result


def fixed_and_broken(before: Sequence[float], after: Sequence[float]) -> tuple[int, int]:
    """How many paired 0/1 values went 0 -> 1 (fixed) and 1 -> 0 (broken)."""
    fixed = sum(b == 0 and a == 1 for b, a in zip(before, after, strict=True))
    broken = sum(b == 1 and a == 0 for b, a in zip(before, after, strict=True))
    return fixed, broken


def pixel_changes(before: Sequence[Any], after: Sequence[Any]) -> list[float]:
    """Mean absolute pixel difference (0-255) of each image pair."""
    return [float(np.abs(np.asarray(a, float) - np.asarray(b, float)).mean())
            for b, a in zip(before, after, strict=True)]
