"""Image-text alignment metrics for the evaluation: CLIP score, NegCLIP score, BLIP-2 ITM
(with the ITC cosine as a second number) and the caption reward of Eq. 4.

Every metric is a small accumulator built on the scoring code the rest of the package already uses (one CLIP
scorer, :class:`~realign_pipeline.scoring.clip.ClipScorer`; one BLIP-2 scorer,
:class:`~realign_pipeline.rewards.BlipItmReward`; Eq. 4, :class:`~realign_pipeline.rewards.CaptionReward`)::

    metric = ClipScore.from_pretrained("openai/clip-vit-large-patch14", device="cuda")
    for images, prompts in batches:          # PIL images (or a (B, C, H, W) tensor in [-1, 1]) and strings
        metric.update(images, prompts)       # one prompt per image, always
    metric.compute()                         # {"metric", "model", "count", "mean", "std", ...}
    metric.reset()

``compute()`` returns plain Python numbers: ``mean`` and ``std`` (population standard deviation, ``ddof=0``,
so two ``update`` calls give exactly what one combined call gives) of the metric's main per-image score,
``count``, the model id(s), and, for metrics with a second number, ``<field>_mean`` / ``<field>_std``.
The per-image scores are kept in :attr:`scores` (field -> list of floats, in update order) for reports.

Models load lazily (on the first ``update``); ``from_pretrained`` takes a hub id or a local folder.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import PIL.Image
import torch

from ..lazy import lazy_model
from ..rewards.blip import DEFAULT_BLIP_ITM_MODEL, BlipItmReward
from ..rewards.caption import DEFAULT_CAPTIONER, DEFAULT_TEXT_ENCODER, CaptionReward
from ..scoring.clip import DEFAULT_CLIP_MODEL, ClipScorer

__all__ = [
    "CLIP_VIT_B_32",
    "CLIP_VIT_L_14",
    "METRICS",
    "BlipItmScore",
    "CaptionRewardScore",
    "ClipScore",
    "Metric",
    "NegClipScore",
    "check_pairs",
]

#: The CLIP score's default model (ViT-L/14, the scorer's default) and the ViT-B/32 option.
CLIP_VIT_L_14 = DEFAULT_CLIP_MODEL
CLIP_VIT_B_32 = "openai/clip-vit-base-patch32"


def _num_images(images: Any) -> int:
    if isinstance(images, torch.Tensor):
        if images.ndim != 4:
            raise ValueError(f"an image tensor must be (B, C, H, W), got shape {tuple(images.shape)}")
        return int(images.shape[0])
    if isinstance(images, PIL.Image.Image):
        return 1
    return len(images)


def check_pairs(images: Any, prompts: str | Sequence[str]) -> tuple[Any, list[str]]:
    """``(images, prompts)`` as a list of images (or the tensor) and a list of prompts, one per image.

    Unlike the rewards, a metric never broadcasts one prompt over several images: a count mismatch is a
    ``ValueError`` (it almost always means the images and the prompts came out of order).
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = [str(p) for p in prompts]
    if isinstance(images, PIL.Image.Image):
        images = [images]
    elif not isinstance(images, torch.Tensor):
        images = list(images)
    n = _num_images(images)
    if n != len(prompts):
        raise ValueError(f"{n} images but {len(prompts)} prompts: pass exactly one prompt per image")
    return images, prompts


def _mean_std(values: list[float | None]) -> tuple[float, float]:
    kept = [v for v in values if v is not None]
    if not kept:
        return math.nan, math.nan
    t = torch.tensor(kept, dtype=torch.float64)
    return float(t.mean()), float(t.std(unbiased=False))


def _per_image(values: torch.Tensor | Sequence[float | None]) -> list[float | None]:
    if isinstance(values, torch.Tensor):
        return values.detach().double().cpu().reshape(-1).tolist()
    return [None if v is None else float(v) for v in values]


class Metric:
    """The accumulator every metric builds on: subclasses define ``name``, ``fields`` (the first is the main
    score) and ``_score(images, prompts) -> {field: per-image scores}``, each a ``(N,)`` tensor or a sequence
    of floats in which ``None`` marks an image the field does not apply to (left out of its mean)."""

    name = "metric"
    fields: tuple[str, ...] = ("score",)

    def __init__(self) -> None:
        self.scores: dict[str, list[float | None]] = {}
        self.reset()

    def reset(self) -> None:
        """Forget every score (the models stay loaded)."""
        self.scores = {f: [] for f in self.fields}

    @property
    def count(self) -> int:
        return len(self.scores[self.fields[0]])

    def _score(self, images: Any, prompts: list[str]) -> dict[str, torch.Tensor | Sequence[float | None]]:
        raise NotImplementedError

    def update(self, images: Any, prompts: str | Sequence[str]) -> None:
        """Score ``images`` (PIL image(s) or a ``(B, C, H, W)`` tensor in ``[-1, 1]``) against their prompts."""
        images, prompts = check_pairs(images, prompts)
        if not prompts:
            return
        with torch.no_grad():
            out = self._score(images, prompts)
        values = {f: _per_image(out[f]) for f in self.fields}
        for f, v in values.items():
            if len(v) != len(prompts):
                raise RuntimeError(f"{self.name}: {len(v)} {f} scores for {len(prompts)} images")
        for f, v in values.items():
            self.scores[f].extend(v)

    def model_info(self) -> dict[str, Any]:
        return {}

    def compute(self) -> dict[str, Any]:
        """``{"metric", **model ids, "count", "mean", "std", "<second field>_mean", ...}`` (NaN when empty)."""
        result: dict[str, Any] = {"metric": self.name, **self.model_info(), "count": self.count}
        for i, f in enumerate(self.fields):
            mean, std = _mean_std(self.scores[f])
            if i == 0:
                result["mean"], result["std"] = mean, std
            else:
                result[f"{f}_mean"], result[f"{f}_std"] = mean, std
        return result

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.model_info()}, count={self.count})"


class ClipScore(Metric):
    """CLIP score: the **raw cosine** of CLIP's projected image and text embeddings, in ``[-1, 1]``.

    ``mean`` / ``std`` are the raw cosine; ``clipscore_100_mean`` / ``_std`` are the conventional
    ``100 * max(cos, 0)`` (torchmetrics' ``CLIPScore``; Hessel et al.'s CLIP-S uses ``2.5 * max(cos, 0)``).
    Numbers are comparable only within one model and one convention: ``compute()`` names the model.
    """

    name = "clip_score"
    fields = ("cosine", "clipscore_100")

    def __init__(self, scorer: ClipScorer) -> None:
        self.scorer = scorer
        super().__init__()

    @classmethod
    def from_pretrained(
        cls,
        id_or_path: str = CLIP_VIT_L_14,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        **kwargs: Any,
    ):
        """A CLIP score with any ``CLIPModel`` checkpoint (default ViT-L/14; :data:`CLIP_VIT_B_32` for B/32)."""
        return cls(ClipScorer.from_pretrained(str(id_or_path), device=device, dtype=dtype, **kwargs))

    def model_info(self) -> dict[str, Any]:
        return {"model": self.scorer.model_id_or_path}

    def _score(self, images: Any, prompts: list[str]) -> dict[str, torch.Tensor]:
        cos = self.scorer.similarity(images, prompts).float()
        return {"cosine": cos, "clipscore_100": 100.0 * cos.clamp(min=0.0)}


class NegClipScore(ClipScore):
    """The CLIP score computed with a NegCLIP checkpoint (CLIP fine-tuned with hard negatives, Yuksekgonul
    et al., 2023) in transformers' ``CLIPModel`` format. No default: NegCLIP is distributed as an OpenCLIP
    checkpoint, so ``from_pretrained`` needs the path (or hub id) of a converted copy (see docs/evaluation.md).
    """

    name = "negclip_score"

    @classmethod
    def from_pretrained(
        cls,
        id_or_path: str | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        **kwargs: Any,
    ):
        if not id_or_path:
            raise ValueError(
                "NegClipScore needs a NegCLIP checkpoint in transformers CLIPModel format (a local folder or a "
                "hub id): no default is assumed. NegCLIP is released as an OpenCLIP ViT-B/32 checkpoint; "
                "convert it first (see docs/evaluation.md, 'NegCLIP')."
            )
        return cls(ClipScorer.from_pretrained(str(id_or_path), device=device, dtype=dtype, **kwargs))


class BlipItmScore(Metric):
    """BLIP-2 image-text matching: the ITM head's match probability (``mean``, in ``[0, 1]``) and, as a second
    number, the ITC cosine (``itc_mean``: the largest cosine between the 32 query embeddings and the text
    ``[CLS]`` embedding, in ``[-1, 1]``). Both through :class:`~realign_pipeline.rewards.BlipItmReward`
    (``Blip2ForImageTextRetrieval``; default ``Salesforce/blip2-itm-vit-g``), sharing one model."""

    name = "blip_itm"
    fields = ("itm", "itc")

    def __init__(self, itm: BlipItmReward) -> None:
        self.itm = itm
        self._itc: BlipItmReward | None = None
        super().__init__()

    @classmethod
    def from_pretrained(
        cls,
        id_or_path: str = DEFAULT_BLIP_ITM_MODEL,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ):
        return cls(BlipItmReward(str(id_or_path), head="itm", device=device, dtype=dtype))

    @lazy_model
    def itc(self) -> BlipItmReward:
        """The ITC head on the ITM reward's model and processor (built on first access)."""
        return BlipItmReward(self.itm.model_id, head="itc", retrieval_model=self.itm.model, processor=self.itm.processor)

    def model_info(self) -> dict[str, Any]:
        return {"model": self.itm.model_id}

    def _score(self, images: Any, prompts: list[str]) -> dict[str, torch.Tensor]:
        return {"itm": self.itm.score(images, prompts), "itc": self.itc.score(images, prompts)}


class CaptionRewardScore(Metric):
    """The caption reward of Eq. 4 as a metric: ``cos(E_text(BLIP-2 caption of the image), E_text(prompt))``
    with greedy captions, through :class:`~realign_pipeline.rewards.CaptionReward`. The captions used are
    kept in :attr:`captions` (update order)."""

    name = "caption_reward"
    fields = ("caption_reward",)

    def __init__(self, reward: CaptionReward) -> None:
        self.reward = reward
        self.captions: list[str] = []
        super().__init__()

    @classmethod
    def from_pretrained(
        cls,
        id_or_path: str = DEFAULT_CAPTIONER,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        text_encoder: str = DEFAULT_TEXT_ENCODER,
        **kwargs: Any,
    ):
        """``id_or_path``: the BLIP-2 captioner (OPT); ``text_encoder``: the Q-Former text encoder checkpoint.
        ``kwargs`` go to :class:`CaptionReward` (``max_new_tokens``, ``generate_kwargs``)."""
        return cls(CaptionReward(str(id_or_path), str(text_encoder), device=device, dtype=dtype, **kwargs))

    def reset(self) -> None:
        super().reset()
        self.captions = []

    def model_info(self) -> dict[str, Any]:
        return {"model": self.reward.captioner_id, "text_encoder": self.reward.text_encoder_id}

    def _score(self, images: Any, prompts: list[str]) -> dict[str, torch.Tensor]:
        scores, captions = self.reward.score_with_captions(images, prompts)
        self.captions.extend(captions)
        return {"caption_reward": scores}


#: Names -> metric classes (for a CLI).
METRICS = {
    "clip": ClipScore,
    "negclip": NegClipScore,
    "blip_itm": BlipItmScore,
    "caption_reward": CaptionRewardScore,
}
