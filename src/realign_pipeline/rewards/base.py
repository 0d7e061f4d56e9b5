"""The interface every reward follows, and the image plumbing they share.

A reward has two entry points:

- ``score(images, prompts) -> (N,)``: the reward *as defined* (for the caption reward, Eq. 4 exactly),
  without gradient. ``images`` are PIL images (they go through the checkpoint's own processor) or a
  ``(B, C, H, W)`` tensor in ``[-1, 1]`` (the differentiable torch path, run under ``no_grad``).
- ``objective(pixels, prompts) -> (N,)``: a differentiable quantity, higher is better, whose gradient
  with respect to ``pixels`` (``B, C, H, W`` in ``[-1, 1]``, as a VAE decodes them) is what ReFL
  follows. For the CLIP and BLIP rewards it *is* the reward; for the caption reward it is one of the two
  documented objectives (Eq. 4 goes through discrete caption generation and has no gradient).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import PIL.Image
import torch

from ..scoring.clip import clip_preprocess_tensor

__all__ = ["ImagesLike", "Reward", "blip2_preprocess_tensor", "check_batch", "pixel_values_for"]

ImagesLike = "Sequence[PIL.Image.Image] | PIL.Image.Image | torch.Tensor"

_BICUBIC = 3  # PILImageResampling.BICUBIC


@runtime_checkable
class Reward(Protocol):
    name: str

    def score(self, images: Any, prompts: Sequence[str]) -> torch.Tensor: ...

    def objective(self, pixels: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor: ...

    def to(self, device: Any = None, dtype: torch.dtype | None = None) -> Reward: ...


def blip2_preprocess_tensor(
    pixels: torch.Tensor, image_processor: Any, value_range: tuple[float, float] = (-1.0, 1.0)
) -> torch.Tensor:
    """The BLIP-2 image processor's steps in torch, differentiable: ``(B, C, H, W)`` -> ``pixel_values``.

    ``BlipImageProcessor`` resizes the 8-bit image to ``size["height"] x size["width"]`` (bicubic, no crop),
    rescales to ``[0, 1]`` and normalises with its mean/std -- the same steps :func:`clip_preprocess_tensor`
    writes in torch (it reads the processor's ``size`` and finds no ``crop_size``), so it is reused as is:
    out-of-range pixels (a VAE's overshoot) are clipped before resizing, as in the 8-bit image. Only
    bicubic resizing is reproduced (the real BLIP-2 checkpoints use it); another ``resample`` is an error.
    """
    resample = getattr(image_processor, "resample", _BICUBIC)
    if resample is not None and int(resample) != _BICUBIC:
        raise ValueError(f"only bicubic resizing is reproduced in torch; this processor uses resample={resample}")
    return clip_preprocess_tensor(pixels, image_processor, value_range)


def pixel_values_for(
    images: Any, image_processor: Any, value_range: tuple[float, float] = (-1.0, 1.0)
) -> torch.Tensor:
    """PIL image(s) -> the processor's ``pixel_values`` (exact, no gradient); a tensor -> the torch path."""
    if isinstance(images, torch.Tensor):
        return blip2_preprocess_tensor(images, image_processor, value_range)
    if isinstance(images, PIL.Image.Image):
        images = [images]
    images = [im.convert("RGB") for im in images]
    return torch.as_tensor(image_processor(images, return_tensors="pt")["pixel_values"])


def check_batch(images: Any, prompts: Sequence[str]) -> list[str]:
    """Prompts as a list, one per image (a single prompt is broadcast)."""
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    n = images.shape[0] if isinstance(images, torch.Tensor) else (1 if isinstance(images, PIL.Image.Image) else len(images))
    if len(prompts) == 1 and n > 1:
        prompts = prompts * n
    if len(prompts) != n:
        raise ValueError(f"{n} images but {len(prompts)} prompts; pass one prompt per image (or one for all)")
    return prompts
