"""Statistics of per-image scores: the mean with a seeded percentile-bootstrap confidence interval.

Both the evaluation's scores (:mod:`realign_pipeline.evaluation.score`) and the shapes-world metric
(:class:`~realign_pipeline.shapes.metric.ShapesAlignmentScore`) summarise with :func:`summarize`. The bootstrap
can resample groups (e.g. prompts) instead of single values, since several images of one prompt are not
independent draws.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["as_number", "bootstrap_ci", "summarize"]


def as_number(value: Any) -> float | None:
    """``value`` as a float when it is a JSON number (an int or a float, not a bool), else ``None``."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def bootstrap_ci(
    values: Sequence[float | None],
    groups: Sequence[Any] | None = None,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile-bootstrap CI ``(low, high)`` of the mean of ``values`` (``None`` / NaN left out).

    Without ``groups`` images are resampled; with ``groups`` (one label per value, e.g. the prompt) the groups
    are resampled with replacement, each bringing all its values, and a resample's mean is over its values (a
    cluster bootstrap: several seeds of one prompt are not independent draws). Seeded: the same inputs and
    seed give the same interval. Constant values give ``(x, x)``; no values give ``(nan, nan)``.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    labels = list(range(len(values))) if groups is None else list(groups)
    if len(labels) != len(values):
        raise ValueError(f"{len(values)} values but {len(labels)} group labels")
    keep = [(g, float(v)) for g, v in zip(labels, values) if v is not None and not math.isnan(float(v))]
    if not keep:
        return math.nan, math.nan
    x = np.array([v for _, v in keep], dtype=np.float64)
    if np.all(x == x[0]):
        return float(x[0]), float(x[0])
    index: dict[Any, int] = {}
    ids = np.array([index.setdefault(g, len(index)) for g, _ in keep])
    sums = np.bincount(ids, weights=x)
    counts = np.bincount(ids).astype(np.float64)
    rng = np.random.default_rng(seed)
    g = len(sums)
    means = np.empty(n_resamples, dtype=np.float64)
    chunk = max(1, 2_000_000 // g)  # bounded memory for large sets
    for start in range(0, n_resamples, chunk):
        stop = min(start + chunk, n_resamples)
        draw = rng.integers(0, g, size=(stop - start, g))
        means[start:stop] = sums[draw].sum(axis=1) / counts[draw].sum(axis=1)
    alpha = (1.0 - confidence) / 2
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return float(low), float(high)


def summarize(
    values: Sequence[float | None],
    groups: Sequence[Any] | None = None,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """``{"mean", "std", "n", "n_prompts", "ci_low", "ci_high", "confidence"}`` of ``values`` (``None`` / NaN
    left out; ``std`` is the population std; ``n_prompts``: distinct ``groups`` among the kept values)."""
    labels = list(range(len(values))) if groups is None else list(groups)
    kept = [(g, float(v)) for g, v in zip(labels, values) if v is not None and not math.isnan(float(v))]
    low, high = bootstrap_ci(values, groups, n_resamples=n_resamples, confidence=confidence, seed=seed)
    x = np.array([v for _, v in kept], dtype=np.float64)
    return {
        "mean": float(x.mean()) if len(x) else math.nan,
        "std": float(x.std()) if len(x) else math.nan,
        "n": len(x),
        "n_prompts": len({g for g, _ in kept}),
        "ci_low": low,
        "ci_high": high,
        "confidence": confidence,
    }
