"""The CLIP reward of the paper's Table 3 ablation: raw CLIP image-text cosine via :class:`ClipScorer`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..scoring.clip import DEFAULT_CLIP_MODEL, ClipScorer
from .base import check_batch

__all__ = ["ClipReward"]


class ClipReward:
    """Raw cosine of CLIP's projected image and text embeddings, in ``[-1, 1]`` (no logit scale, no clipping).

    ``score`` and ``objective`` are the same quantity; ``objective`` keeps the gradient to the pixels.
    """

    name = "clip"

    def __init__(
        self, model: str = DEFAULT_CLIP_MODEL, *, device: Any = None, dtype: torch.dtype | None = None, scorer: ClipScorer | None = None
    ) -> None:
        self.scorer = scorer if scorer is not None else ClipScorer.from_pretrained(model, device=device, dtype=dtype)

    def score(self, images: Any, prompts: Sequence[str]) -> torch.Tensor:
        prompts = check_batch(images, prompts)
        with torch.no_grad():
            return self.scorer.similarity(images, prompts)

    def objective(self, pixels: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        prompts = check_batch(pixels, prompts)
        img = self.scorer.image_embeds_from_tensor(pixels, value_range=(-1.0, 1.0))
        txt = self.scorer.text_embeds(prompts).to(img.device)
        return (img * txt).sum(-1)

    def to(self, device: Any = None, dtype: torch.dtype | None = None) -> ClipReward:
        self.scorer.to(device=device, dtype=dtype)
        return self

    def __repr__(self) -> str:
        return f"ClipReward({self.scorer.model_id_or_path!r})"
