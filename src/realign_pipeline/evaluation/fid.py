"""The Fréchet distance between two sets of image features (the distance behind FID), with a pluggable
feature extractor.

    d^2 = ||mu_1 - mu_2||^2 + tr(S_1) + tr(S_2) - 2 tr((S_1 S_2)^{1/2})

``mu`` and ``S`` are the mean and the covariance (``ddof=1``, as ``numpy.cov`` in pytorch-fid) of each set's
features. The trace of the matrix square root is computed without ``scipy.linalg.sqrtm``: in float64,
``tr((S_1 S_2)^{1/2}) = sum_i sqrt(lambda_i)`` with ``lambda_i`` the eigenvalues of the symmetric PSD matrix
``S_1^{1/2} S_2 S_1^{1/2}`` (``torch.linalg.eigh``; eigenvalues below ``D * eps * max`` -- round-off -- are
set to 0). It is exact for
singular covariances too (fewer images than feature dimensions), where ``sqrtm`` needs pytorch-fid's
``eps`` offset.

**This is FID only with the Inception-v3 features of the FID reference implementation**, and those are not
bundled: the standard weights (``pt_inception-2015-12-05``) are a separate download and pytorch-fid needs
torchvision. Pass any ``feature_extractor`` (``images -> (N, D)`` tensor); :meth:`FrechetDistance.from_pretrained`
uses CLIP image embeddings (a Fréchet CLIP distance, "FD_CLIP"). A distance is comparable only with another
computed with the same extractor and similar set sizes (it is biased upward for small sets).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import PIL.Image
import torch

__all__ = ["IMAGE_EXTENSIONS", "FrechetDistance", "feature_statistics", "frechet_distance", "image_files"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def feature_statistics(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(N, D)`` features -> mean ``(D,)`` and covariance ``(D, D)`` (``ddof=1``), float64. Needs N >= 2."""
    x = torch.as_tensor(features).detach().to(dtype=torch.float64, device="cpu")
    if x.ndim != 2:
        raise ValueError(f"features must be (N, D), got shape {tuple(x.shape)}")
    if x.shape[0] < 2:
        raise ValueError(f"a covariance needs at least 2 feature rows, got {x.shape[0]}")
    mu = x.mean(0)
    xc = x - mu
    return mu, xc.T @ xc / (x.shape[0] - 1)


def _psd_eigvals(w: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of a PSD matrix with round-off removed: below ``D * eps * max|w|`` they are 0 (their
    square roots would otherwise add ~1e-7 noise per zero eigenvalue of a singular covariance)."""
    tol = w.abs().max() * w.numel() * torch.finfo(w.dtype).eps if w.numel() else 0.0
    return torch.where(w > tol, w, torch.zeros_like(w))


def _sqrt_psd(m: torch.Tensor) -> torch.Tensor:
    w, v = torch.linalg.eigh((m + m.T) / 2)
    return (v * _psd_eigvals(w).sqrt()) @ v.T


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any) -> float:
    """The Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (float64, CPU)."""
    mu1, mu2 = (torch.as_tensor(t, dtype=torch.float64).reshape(-1) for t in (mu1, mu2))
    s1, s2 = (torch.as_tensor(t, dtype=torch.float64) for t in (sigma1, sigma2))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.numel(), mu1.numel()):
        raise ValueError(f"shape mismatch: mu {tuple(mu1.shape)}/{tuple(mu2.shape)}, sigma {tuple(s1.shape)}/{tuple(s2.shape)}")
    r1 = _sqrt_psd(s1)
    inner = r1 @ s2 @ r1
    tr_covmean = _psd_eigvals(torch.linalg.eigvalsh((inner + inner.T) / 2)).sqrt().sum()
    diff = mu1 - mu2
    return float(diff @ diff + torch.trace(s1) + torch.trace(s2) - 2 * tr_covmean)


def image_files(folder: str | Path, names: Iterable[str] | None = None) -> list[Path]:
    """Image files of ``folder`` (sorted), or only those whose stem or name is in ``names`` (e.g. the COCO
    val2014 files of a prompt set's image ids); a listed name that is missing is an error."""
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if names is None:
        return files
    by = {p.stem: p for p in files} | {p.name: p for p in files}
    wanted = list(names)
    missing = [n for n in wanted if str(n) not in by]
    if missing:
        raise FileNotFoundError(f"{len(missing)} images not found in {folder}: {missing[:5]}")
    return [by[str(n)] for n in wanted]


class FrechetDistance:
    """Accumulates features of real and generated images; ``compute()`` gives their Fréchet distance.

    ``feature_extractor``: ``images -> (N, D)`` tensor (PIL images or a ``(B, C, H, W)`` tensor, whatever the
    extractor accepts); ``extractor_name`` is reported with the value. A 2-D tensor passed to ``update`` /
    ``update_real`` is taken as features already.

    ``update(images, prompts=None)`` adds *generated* images (prompts are ignored: FID does not use them; the
    argument keeps the metrics' interface); ``update_real(images)`` / ``update_real_folder(folder)`` add
    real ones. ``reset(real=False)`` forgets the generated features and keeps the real ones (a reference set
    is computed once); ``reset(real=True)`` forgets both.
    """

    name = "frechet_distance"

    def __init__(
        self,
        feature_extractor: Callable[[Any], torch.Tensor] | None = None,
        extractor_name: str = "features",
    ) -> None:
        self.feature_extractor = feature_extractor
        self.extractor_name = str(extractor_name)
        self._real: list[torch.Tensor] = []
        self._fake: list[torch.Tensor] = []

    @classmethod
    def from_pretrained(
        cls,
        id_or_path: str = "openai/clip-vit-large-patch14",
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> FrechetDistance:
        """A Fréchet distance on L2-normalised CLIP image embeddings of ``id_or_path`` (FD_CLIP; *not*
        Inception FID: see the module docstring)."""
        from ..scoring.clip import ClipScorer

        scorer = ClipScorer.from_pretrained(str(id_or_path), device=device, dtype=dtype)
        return cls(lambda images: scorer.image_embeds(images), extractor_name=f"clip:{id_or_path}")

    def features(self, images: Any) -> torch.Tensor:
        if isinstance(images, torch.Tensor) and images.ndim == 2:
            feats = images
        else:
            if self.feature_extractor is None:
                raise ValueError("no feature_extractor: pass (N, D) features, or build with a feature extractor")
            if isinstance(images, PIL.Image.Image):
                images = [images]
            with torch.no_grad():
                feats = torch.as_tensor(self.feature_extractor(images))
        if feats.ndim != 2:
            raise ValueError(f"features must be (N, D), got shape {tuple(feats.shape)}")
        return feats.detach().to(dtype=torch.float64, device="cpu")

    def update(self, images: Any, prompts: Sequence[str] | None = None) -> None:
        self._fake.append(self.features(images))

    def update_real(self, images: Any) -> None:
        self._real.append(self.features(images))

    def update_real_folder(
        self, folder: str | Path, names: Iterable[str] | None = None, batch_size: int = 32
    ) -> int:
        """Add the images of ``folder`` (optionally only ``names``) as real images; returns how many."""
        files = image_files(folder, names)
        for i in range(0, len(files), batch_size):
            batch = []
            for p in files[i : i + batch_size]:
                with PIL.Image.open(p) as im:
                    batch.append(im.convert("RGB"))
            self.update_real(batch)
        return len(files)

    def reset(self, real: bool = False) -> None:
        self._fake = []
        if real:
            self._real = []

    @staticmethod
    def _cat(chunks: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(chunks) if chunks else torch.empty(0, 0, dtype=torch.float64)

    @property
    def count(self) -> int:
        return sum(c.shape[0] for c in self._fake)

    @property
    def count_real(self) -> int:
        return sum(c.shape[0] for c in self._real)

    def compute(self) -> dict[str, Any]:
        """``{"metric", "model" (the extractor), "count", "count_real", "value"}``; NaN with < 2 of either."""
        out: dict[str, Any] = {
            "metric": self.name, "model": self.extractor_name, "count": self.count, "count_real": self.count_real,
        }
        if self.count < 2 or self.count_real < 2:
            out["value"] = float("nan")
            return out
        mu1, s1 = feature_statistics(self._cat(self._fake))
        mu2, s2 = feature_statistics(self._cat(self._real))
        out["value"] = frechet_distance(mu1, s1, mu2, s2)
        return out
