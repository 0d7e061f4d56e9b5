"""What the shapes-world ablation scripts share (checker_agreement.py, fine_stage_sweep.py, refl_sweep.py):
the held-out prompt x seed jobs, the sampling settings of the shapes presets, and the paired read-outs of a
change (checker summary, images fixed / broken, pixel change)."""

from __future__ import annotations

import argparse
import functools
import json
from collections.abc import Sequence
from pathlib import Path
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


def load_pipeline(model: str | None = None, need_captioner: bool = False):
    """A shapes-world pipeline without progress bars: a shipped world by name (None or ``"shapes"``,
    ``"shapes-bow"``, ``"shapes-triples"``) or any `RealignDiffPipeline` folder. Loaded once per process and
    model: the scripts set what they change (e.g. the captioner's relation correction) on every run."""
    pipe = _load_pipeline(model or "shapes")
    if need_captioner and pipe.dense_captioner is None:
        raise SystemExit(f"{model}: no dense captioner saved with this pipeline; the fine stage needs one")
    return pipe


@functools.lru_cache(maxsize=4)
def _load_pipeline(model: str):
    from realign_pipeline import RealignDiffPipeline
    from realign_pipeline.shapes.pretrained import SHAPES_WORLDS, load_shapes_pipeline

    pipe = load_shapes_pipeline(world=model) if model in SHAPES_WORLDS else RealignDiffPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def write_json(path: str | Path, result: dict[str, Any]) -> Path:
    """Write `result` as indented JSON, making the folder; say where."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return out


def pairing_key(objects: Sequence[dict[str, Any]]) -> str:
    """The pairing a prompt composes (its objects, unordered): the cluster of the bootstraps, since prompts of
    one composition share its difficulty."""
    return " + ".join(sorted(f"{o['color']} {o['shape']}" for o in objects))


def paired_rates(before: Sequence[float], after: Sequence[float], groups: Sequence[Any]) -> dict[str, Any]:
    """What a change did to paired 0/1 values (the same prompt and seed before and after).

    Means before and after; the difference ``after - before`` with its 95% CI; how many went 0 -> 1 (fixed)
    and 1 -> 0 (broken); the **fix rate** (fixed among the images wrong before) and the **break rate** (broken
    among those right before), each with its CI. Every CI is a bootstrap clustered by `groups` (e.g. the
    pairing: prompts of one composition share its difficulty). Rates over no images are None.
    """
    from realign_pipeline.evaluation.score import bootstrap_ci

    before = [float(b) for b in before]
    after = [float(a) for a in after]
    groups = list(groups)

    def rate(values: list[float], labels: list[Any]) -> tuple[float | None, list[float] | None]:
        if not values:
            return None, None
        low, high = bootstrap_ci(values, labels)
        return round(float(np.mean(values)), 4), [round(low, 4), round(high, 4)]

    diffs = [a - b for b, a in zip(before, after, strict=True)]
    difference, difference_ci = rate(diffs, groups)
    wrong = [i for i, b in enumerate(before) if b == 0]
    right = [i for i, b in enumerate(before) if b == 1]
    fix_rate, fix_ci = rate([after[i] for i in wrong], [groups[i] for i in wrong])
    break_rate, break_ci = rate([1.0 - after[i] for i in right], [groups[i] for i in right])
    fixed, broken = fixed_and_broken(before, after)
    return {
        "n": len(before),
        "before": round(float(np.mean(before)), 4) if before else None,
        "after": round(float(np.mean(after)), 4) if after else None,
        "difference": difference, "difference_ci": difference_ci,
        "fixed": fixed, "broken": broken, "base_wrong": len(wrong), "base_right": len(right),
        "fix_rate": fix_rate, "fix_rate_ci": fix_ci, "break_rate": break_rate, "break_rate_ci": break_ci,
    }
