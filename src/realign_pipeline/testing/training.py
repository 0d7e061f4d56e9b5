"""What a test of ``training/train_refl.py`` needs beside a tiny model: a reward without a model and a folder of
image-text pairs.

:class:`BrightnessReward` follows the reward protocol of :mod:`realign_pipeline.rewards` (``objective``,
``score``, ``to``), so the script loads it with ``--reward_class realign_pipeline.testing.training:BrightnessReward``
or takes an instance through ``main(args, reward=...)``. :func:`image_text_pairs` writes what ``--train_data_dir``
reads (an image folder with ``metadata.jsonl``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

__all__ = ["BrightnessReward", "image_text_pairs"]


class BrightnessReward:
    """A differentiable reward with no model: each image's mean pixel in [-1, 1] (higher is better).

    Args:
        nan_on_call: if set, the objective of that call (counted from 1) is NaN, to test how a run skips a
            non-finite loss.
    """

    name = "brightness"

    def __init__(self, nan_on_call: int | None = None) -> None:
        self.calls, self.nan_on_call = 0, nan_on_call

    def objective(self, pixels: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        if len(prompts) != pixels.shape[0]:
            raise ValueError(f"{pixels.shape[0]} images scored against {len(prompts)} prompts")
        self.calls += 1
        out = pixels.float().mean(dim=(1, 2, 3))
        if self.nan_on_call is not None and self.calls == self.nan_on_call:
            out = out * float("nan")
        return out

    @torch.no_grad()
    def score(self, images: Any, prompts: Sequence[str]) -> torch.Tensor:
        return self.objective(torch.as_tensor(images), prompts)

    def to(self, device: Any = None, dtype: Any = None) -> BrightnessReward:
        return self


def image_text_pairs(folder: str | Path, count: int, size: tuple[int, int] = (40, 36), seed: int = 0,
                     extra_rows: Sequence[dict[str, str]] = ()) -> Path:
    """`count` random RGB images (``size`` = height, width) captioned ``"a photo number <k>"`` in `folder`, with
    their ``metadata.jsonl`` (``file_name``, ``text``) and any `extra_rows` after them; returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for k in range(count):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(folder / f"{k}.png")
        rows.append({"file_name": f"{k}.png", "text": f"a photo number {k}"})
    rows += list(extra_rows)
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return folder
