"""ImageReward (Xu et al., 2023) behind the reward interface, when its ``image-reward`` package is installed.

UNTESTED HERE: the package needs torchvision (which must not be installed in this project's environment)
and downloads its weights on first use. The adapter follows the package's public ``ReFL.py``: ``score``
calls ``model.score(prompt, image)`` per image; ``objective`` resizes and normalises the pixels in torch
(224 px bicubic, CLIP mean/std) and calls ``model.score_gard(input_ids, attention_mask, image)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import PIL.Image
import torch
import torch.nn.functional as F

from .base import check_batch

__all__ = ["IMAGEREWARD_MISSING", "ImageRewardAdapter"]

IMAGEREWARD_MISSING = (
    "ImageRewardAdapter needs the `image-reward` package (import name `ImageReward`), which is not installed. "
    "Install it with `pip install image-reward`; note that it requires torchvision and downloads the "
    "ImageReward-v1.0 weights on first use. The caption, clip and blip rewards need neither."
)

_MEAN = (0.48145466, 0.4578275, 0.40821073)
_STD = (0.26862954, 0.26130258, 0.27577711)


def _import_image_reward():
    try:
        import ImageReward
    except ImportError as e:
        raise ImportError(IMAGEREWARD_MISSING) from e
    return ImageReward


class ImageRewardAdapter:
    name = "imagereward"

    def __init__(self, model: str = "ImageReward-v1.0", *, device: Any = None, dtype: torch.dtype | None = None, **load_kwargs: Any):
        rm = _import_image_reward()
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.model = rm.load(model, device=str(self.device), **load_kwargs)
        self.model.eval()
        self.model.requires_grad_(False)
        if dtype is not None:
            self.model.to(dtype=dtype)

    def to(self, device: Any = None, dtype: torch.dtype | None = None) -> ImageRewardAdapter:
        if device is not None:
            self.device = torch.device(device)
        self.model.to(device=self.device, dtype=dtype)
        return self

    def score(self, images: Any, prompts: Sequence[str]) -> torch.Tensor:
        prompts = check_batch(images, prompts)
        if isinstance(images, torch.Tensor):
            with torch.no_grad():
                return self.objective(images, prompts)
        if isinstance(images, PIL.Image.Image):
            images = [images]
        with torch.no_grad():
            return torch.tensor([float(self.model.score(p, im)) for p, im in zip(prompts, images)])

    def objective(self, pixels: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        prompts = check_batch(pixels, prompts)
        x = ((pixels.float() + 1) / 2).clamp(0, 1)
        x = F.interpolate(x, size=(224, 224), mode="bicubic", antialias=True, align_corners=False)
        mean = torch.tensor(_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(_STD, device=x.device).view(1, 3, 1, 1)
        x = ((x - mean) / std).to(self.device)
        tok = self.model.blip.tokenizer(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
        out = self.model.score_gard(tok.input_ids.to(self.device), tok.attention_mask.to(self.device), x)
        return out.reshape(-1).float()
