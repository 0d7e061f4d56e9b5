"""Inception-v3 pool3 features of pytorch-fid (the FID reference implementation the paper uses), as a
feature extractor for :class:`~realign_pipeline.evaluation.fid.FrechetDistance`.

pytorch-fid is optional (it needs torchvision, which the base install never pulls)::

    pip install "realign-pipeline[eval]"

Preprocessing follows pytorch-fid's ``get_activations``: an RGB image becomes a ``[0, 1]`` tensor
(``ToTensor``), and pytorch-fid's ``InceptionV3`` resizes it to 299 x 299 (bilinear) and maps it to
``[-1, 1]``; the 2048-d pool3 output is the feature. Its weights (``pt_inception-2015-12-05``, the TF FID
Inception ported) are downloaded by pytorch-fid on first use.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import PIL.Image
import torch

__all__ = ["EVAL_EXTRA_HINT", "InceptionFeatures", "inception_fid"]

EVAL_EXTRA_HINT = 'pip install "realign-pipeline[eval]"'


def _inception_class() -> Any:
    try:
        from pytorch_fid.inception import InceptionV3
    except ImportError as error:
        raise ImportError(
            "Inception FID needs pytorch-fid (and torchvision), which the base install does not include: "
            f"{EVAL_EXTRA_HINT}. Without it, FrechetDistance.from_pretrained(<clip id>) gives a Fréchet CLIP "
            "distance (not FID)."
        ) from error
    return InceptionV3


class InceptionFeatures:
    """``images -> (N, dims)`` pytorch-fid Inception-v3 features (default the 2048-d pool3 of FID).

    ``images``: PIL images (any sizes; same-sized ones are batched together) or a ``(B, C, H, W)`` tensor in
    ``[-1, 1]`` (as a VAE decodes). Raises ``ImportError`` naming the ``eval`` extra when pytorch-fid is
    missing."""

    def __init__(self, dims: int = 2048, device: str | torch.device | None = None, batch_size: int = 32) -> None:
        inception = _inception_class()
        if dims not in inception.BLOCK_INDEX_BY_DIM:
            raise ValueError(f"dims must be one of {sorted(inception.BLOCK_INDEX_BY_DIM)}, got {dims}")
        self.dims = dims
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.batch_size = batch_size
        self.model = inception([inception.BLOCK_INDEX_BY_DIM[dims]]).to(self.device).eval()
        self.name = f"inception-v3-pool3-{dims} (pytorch-fid)" if dims == 2048 else f"inception-v3-{dims} (pytorch-fid)"

    def _run(self, batch: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            pred = self.model(batch.to(self.device, torch.float32))[0]
        if pred.shape[2:] != (1, 1):
            pred = torch.nn.functional.adaptive_avg_pool2d(pred, (1, 1))
        return pred.reshape(pred.shape[0], -1).cpu()

    def __call__(self, images: Any) -> torch.Tensor:
        if isinstance(images, torch.Tensor):
            x = ((images.float() + 1) / 2).clamp(0, 1)
            return torch.cat([self._run(x[i : i + self.batch_size]) for i in range(0, len(x), self.batch_size)])
        if isinstance(images, PIL.Image.Image):
            images = [images]
        tensors = [torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
                   for im in images]
        out: list[torch.Tensor | None] = [None] * len(tensors)
        by_size: dict[tuple[int, ...], list[int]] = {}
        for i, t in enumerate(tensors):
            by_size.setdefault(tuple(t.shape), []).append(i)
        for idx in by_size.values():
            for k in range(0, len(idx), self.batch_size):
                part = idx[k : k + self.batch_size]
                feats = self._run(torch.stack([tensors[i] for i in part]))
                for i, f in zip(part, feats):
                    out[i] = f
        if not out:
            return torch.empty(0, self.dims)
        return torch.stack(out)  # type: ignore[arg-type]


def inception_fid(device: str | torch.device | None = None, dims: int = 2048):
    """A :class:`~realign_pipeline.evaluation.fid.FrechetDistance` on :class:`InceptionFeatures` (FID proper)."""
    from .fid import FrechetDistance

    features = InceptionFeatures(dims=dims, device=device)
    return FrechetDistance(features, extractor_name=features.name)
