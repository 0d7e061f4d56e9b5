"""Taggers: what is in an image (the first step of the dense captioner, Sec. 3.2.2 of the paper).

``ClipTagger``: zero-shot tagging with a transformers CLIP model over the Recognize Anything (RAM) tag
vocabulary (4,585 English tags, shipped in ``realign_pipeline/assets/tags`` with RAM's per-tag thresholds,
Apache-2.0). ``RamTagger``: an adapter for the original RAM / RAM++ when the user has installed it (it is
not on PyPI; untested here). Both add the prompt's own object words to the tags, so an object the tagger
missed can still be grounded.

How RAM's thresholds are applied to CLIP (see ``docs/captioner_tagger.md``): RAM's thresholds (0.45-1.0,
mostly 0.65) are calibrated for RAM's own per-tag sigmoid outputs; CLIP has no per-tag calibrated
probability. The default ``score_mode="relative"`` turns CLIP's cosines into a score in ``(0, 1]``
*relative to the best tag of the image*::

    p_i = softmax(s * cos)_i / max_j softmax(s * cos)_j = exp(s * (cos_i - max_j cos_j))

with ``s`` CLIP's ``logit_scale`` (100 for OpenAI checkpoints; override with ``logit_scale=``). A tag is
kept when ``p_i >= threshold_i * threshold_scale`` (and ``cos_i >= min_score`` when set). So the best tag
always has ``p = 1`` (kept unless its threshold is above 1), and RAM's per-tag thresholds keep their order
(a tag RAM found hard to call needs to be closer to the best one). With ``s = 100`` a threshold of 0.65
admits tags within ``ln(1/0.65)/100 ~= 0.0043`` cosine of the best tag: few, high-precision tags --
raise recall with ``threshold_scale < 1``, a smaller ``logit_scale``, or ``top_k`` with ``thresholds=0``.
``score_mode="softmax"`` (plain softmax over the vocabulary) and ``"cosine"`` (raw cosine; give
thresholds in cosine units) are the alternatives.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import PIL.Image
import torch

from ..lazy import lazy_model
from ..scoring.clip import DEFAULT_CLIP_MODEL, ClipScorer

__all__ = [
    "DEFAULT_TEMPLATE",
    "RAM_INSTALL_HINT",
    "SCORE_MODES",
    "ClipTagger",
    "MissingDependencyError",
    "RamTagger",
    "load_ram_tag_list",
    "load_ram_thresholds",
    "merge_tags",
    "no_prompt_objects",
]

#: The prompt template each tag is embedded with (CLIP's standard zero-shot template).
DEFAULT_TEMPLATE = "a photo of a {}."

#: How CLIP cosines become the score compared with a tag's threshold.
SCORE_MODES = ("relative", "softmax", "cosine")

RAM_INSTALL_HINT = (
    "pip install git+https://github.com/xinyu1205/recognize-anything.git  (it is not on PyPI; it needs "
    "torchvision, timm and fairscale), then download a checkpoint, e.g. ram_plus_swin_large_14m.pth from "
    "the Hugging Face repo xinyu1205/recognize-anything-plus-model, and pass its local path"
)

_TAG_FILE = "ram_tag_list.txt"
_THRESHOLD_FILE = "ram_tag_list_threshold.txt"


class MissingDependencyError(ImportError):
    """An optional dependency a backend needs is not installed; the message says how to install it."""


def _read_lines(path: str | Path | None, name: str) -> list[str]:
    if path is None:
        text = resources.files("realign_pipeline").joinpath("assets", "tags", name).read_text("utf-8")
    else:
        text = Path(path).read_text("utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def load_ram_tag_list(path: str | Path | None = None) -> list[str]:
    """The RAM tag vocabulary (4,585 tags, shipped), or a tag file of one tag a line."""
    return _read_lines(path, _TAG_FILE)


def load_ram_thresholds(path: str | Path | None = None) -> list[float]:
    """RAM's per-tag thresholds (same order as :func:`load_ram_tag_list`), or a file of one float a line."""
    return [float(x) for x in _read_lines(path, _THRESHOLD_FILE)]


def no_prompt_objects(prompt: str) -> list[str]:
    """Default ``prompt_objects``: finds nothing (plug in the rule-based LLM's object extractor)."""
    return []


def merge_tags(tags: Sequence[str], extra: Sequence[str]) -> list[str]:
    """``tags`` then the ``extra`` words not already there (case- and whitespace-insensitive), in order."""
    out: list[str] = []
    seen: set[str] = set()
    for t in list(tags) + list(extra):
        key = " ".join(str(t).lower().split())
        if key and key not in seen:
            seen.add(key)
            out.append(str(t).strip())
    return out


def _callable_ref(fn: Callable | None) -> str | None:
    """``module:qualname`` of a module-level function (so a config can name it), else ``None``."""
    if fn is None or fn is no_prompt_objects:
        return None
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    if not module or "<" in qualname:
        return None
    return f"{module}:{qualname}"


def _resolve_ref(ref: str | None) -> Callable | None:
    if not ref:
        return None
    module, _, qualname = ref.partition(":")
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _prompts_for(images: Sequence[Any], prompts: Sequence[str] | None) -> list[str]:
    if prompts is None:
        return [""] * len(images)
    if isinstance(prompts, str):
        prompts = [prompts]
    if len(prompts) == 1 and len(images) > 1:
        prompts = list(prompts) * len(images)
    if len(prompts) != len(images):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    return list(prompts)


class ClipTagger:
    """Zero-shot tagging with CLIP over the RAM vocabulary (or any tag list), with per-tag thresholds.

    Args:
        scorer: a :class:`~realign_pipeline.scoring.ClipScorer`, or a model id / local path to build one
            (default ``openai/clip-vit-large-patch14``).
        tag_list: tags (a list, or a path to a file of one tag a line); ``None``: the shipped RAM vocabulary.
        thresholds: a float for every tag, a list (same length as the tags), or a path to a file; ``None``:
            RAM's thresholds for the RAM vocabulary (tags of a custom list that are in RAM's vocabulary get
            RAM's threshold, the others ``default_threshold``).
        template: text each tag is embedded with; ``{}`` is the tag.
        top_k: keep at most this many tags per image (the highest scores), after thresholding.
        score_mode: ``"relative"`` (default; see the module docstring), ``"softmax"`` or ``"cosine"``.
        threshold_scale: every threshold is multiplied by this (``< 1``: more tags).
        min_score: also require the raw cosine to be at least this.
        logit_scale: the ``s`` in ``exp(s * cos)``; ``None``: the model's learned ``logit_scale``.
        prompt_objects: ``prompt -> list of object words``; they are always added to the tags (after the
            image's tags, without duplicates). Default: finds nothing.
        default_threshold: threshold of custom tags that RAM's list does not have.
        text_batch_size: tags embedded per text-encoder call (once; the embeddings are cached).
    """

    def __init__(
        self,
        scorer: ClipScorer | str = DEFAULT_CLIP_MODEL,
        tag_list: Sequence[str] | str | Path | None = None,
        thresholds: float | Sequence[float] | str | Path | None = None,
        template: str = DEFAULT_TEMPLATE,
        top_k: int | None = None,
        *,
        score_mode: str = "relative",
        threshold_scale: float = 1.0,
        min_score: float | None = None,
        logit_scale: float | None = None,
        prompt_objects: Callable[[str], list[str]] | None = None,
        default_threshold: float = 0.65,
        text_batch_size: int = 256,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if score_mode not in SCORE_MODES:
            raise ValueError(f"score_mode must be one of {SCORE_MODES}, got {score_mode!r}")
        if "{}" not in template:
            raise ValueError(f"template must contain '{{}}' where the tag goes, got {template!r}")
        if top_k is not None and top_k < 0:
            raise ValueError(f"top_k must be >= 0 or None, got {top_k}")
        if isinstance(scorer, (str, Path)):
            scorer = ClipScorer.from_pretrained(str(scorer), device=device, dtype=dtype)
        elif device is not None or dtype is not None:
            scorer.to(device, dtype)
        self.scorer = scorer

        self._custom_tags = tag_list is not None
        if tag_list is None:
            tags = load_ram_tag_list()
        elif isinstance(tag_list, (str, Path)):
            tags = load_ram_tag_list(tag_list)
        else:
            tags = [str(t).strip() for t in tag_list]
        if not tags:
            raise ValueError("empty tag list")
        self.tags: list[str] = tags

        self._thresholds_setting: Any = thresholds
        if thresholds is None:
            if not self._custom_tags:
                values = load_ram_thresholds()
            else:
                ram = dict(zip(load_ram_tag_list(), load_ram_thresholds()))
                values = [ram.get(t, default_threshold) for t in tags]
        elif isinstance(thresholds, (int, float)):
            values = [float(thresholds)] * len(tags)
        elif isinstance(thresholds, (str, Path)):
            values = load_ram_thresholds(thresholds)
        else:
            values = [float(x) for x in thresholds]
        if len(values) != len(tags):
            raise ValueError(f"{len(values)} thresholds for {len(tags)} tags")
        self.thresholds = torch.tensor(values, dtype=torch.float32)

        self.template = template
        self.top_k = top_k
        self.score_mode = score_mode
        self.threshold_scale = float(threshold_scale)
        self.min_score = min_score
        self.logit_scale = logit_scale
        self.default_threshold = float(default_threshold)
        self.prompt_objects = prompt_objects or no_prompt_objects
        self.text_batch_size = int(text_batch_size)
        self._tag_embeds: torch.Tensor | None = None

    # --- text side, computed once -------------------------------------------------------------------
    @property
    def tag_embeds(self) -> torch.Tensor:
        """``(T, D)`` normalised text embeddings of every templated tag (computed on first use, cached)."""
        if self._tag_embeds is None:
            texts = [self.template.format(t) for t in self.tags]
            self._tag_embeds = self.scorer.text_embeds(texts, batch_size=self.text_batch_size)
        return self._tag_embeds

    def clear_cache(self) -> None:
        """Forget the cached tag embeddings (after changing ``tags``, ``template`` or the model)."""
        self._tag_embeds = None

    # --- scores -------------------------------------------------------------------------------------
    def _scale(self) -> float:
        return float(self.logit_scale) if self.logit_scale is not None else self.scorer.logit_scale

    def cosines(self, images: Sequence[PIL.Image.Image] | torch.Tensor) -> torch.Tensor:
        """Raw cosine of each image with each templated tag: ``(N, T)``."""
        img = self.scorer.image_embeds(images)
        return img @ self.tag_embeds.to(img.device).T

    def scores_from_cosines(self, cos: torch.Tensor) -> torch.Tensor:
        """The scores thresholds are compared with (``score_mode``), ``(N, T)``."""
        if self.score_mode == "cosine":
            return cos
        logits = self._scale() * cos
        if self.score_mode == "softmax":
            return logits.softmax(dim=-1)
        return torch.exp(logits - logits.max(dim=-1, keepdim=True).values)  # relative, in (0, 1]

    def scores(self, images: Sequence[PIL.Image.Image] | torch.Tensor) -> torch.Tensor:
        return self.scores_from_cosines(self.cosines(images))

    def select(self, cos: torch.Tensor) -> list[list[tuple[str, float]]]:
        """Apply thresholds, ``min_score`` and ``top_k`` to ``(N, T)`` cosines -> ``(tag, score)`` per image,
        best first."""
        scores = self.scores_from_cosines(cos).cpu()
        cos = cos.cpu()
        keep = scores >= self.thresholds * self.threshold_scale
        if self.min_score is not None:
            keep &= cos >= self.min_score
        out = []
        for row_scores, row_keep in zip(scores, keep):
            idx = row_keep.nonzero().flatten()
            idx = idx[row_scores[idx].argsort(descending=True, stable=True)]
            if self.top_k is not None:
                idx = idx[: self.top_k]
            out.append([(self.tags[i], float(row_scores[i])) for i in idx.tolist()])
        return out

    def tag_with_scores(
        self, images: Sequence[PIL.Image.Image] | torch.Tensor, prompts: Sequence[str] | None = None
    ) -> list[list[tuple[str, float | None]]]:
        """Like :meth:`tag` but each tag with its score; prompt words the image did not yield get ``None``."""
        if isinstance(images, PIL.Image.Image):
            images = [images]
        prompts = _prompts_for(images, prompts)
        if len(images) == 0:
            return []
        selected = self.select(self.cosines(images))
        out = []
        for found, prompt in zip(selected, prompts):
            names = merge_tags([t for t, _ in found], self.prompt_objects(prompt) if prompt else [])
            score = {t.lower(): s for t, s in found}
            out.append([(n, score.get(n.lower())) for n in names])
        return out

    def tag(self, images: Sequence[PIL.Image.Image], prompts: Sequence[str] | None = None) -> list[list[str]]:
        """Tags per image, best first, then the prompt's object words (the ``Tagger`` protocol)."""
        return [[t for t, _ in row] for row in self.tag_with_scores(images, prompts)]

    __call__ = tag

    # --- save / restore -----------------------------------------------------------------------------
    def to_config(self) -> dict[str, Any]:
        """Settings to rebuild this tagger (model id or path, tags if custom, threshold settings); no weights."""
        thresholds = self._thresholds_setting
        if isinstance(thresholds, Path):
            thresholds = str(thresholds)
        elif thresholds is not None and not isinstance(thresholds, (int, float, str)):
            thresholds = [float(x) for x in thresholds]
        return {
            "class": "ClipTagger",
            "scorer": self.scorer.to_config(),
            "tag_list": list(self.tags) if self._custom_tags else None,
            "thresholds": thresholds,
            "template": self.template,
            "top_k": self.top_k,
            "score_mode": self.score_mode,
            "threshold_scale": self.threshold_scale,
            "min_score": self.min_score,
            "logit_scale": self.logit_scale,
            "default_threshold": self.default_threshold,
            "prompt_objects": _callable_ref(self.prompt_objects),
        }

    @classmethod
    def from_config(
        cls,
        config: dict[str, Any],
        *,
        scorer: ClipScorer | None = None,
        prompt_objects: Callable[[str], list[str]] | None = None,
        device: str | torch.device | None = None,
    ) -> ClipTagger:
        """Rebuild from :meth:`to_config`. ``scorer`` / ``prompt_objects`` given here win over the config."""
        if config.get("class", "ClipTagger") != "ClipTagger":
            raise ValueError(f"not a ClipTagger config: class={config.get('class')!r}")
        if scorer is None:
            scorer = ClipScorer.from_config(config.get("scorer") or {}, device=device)
        return cls(
            scorer,
            tag_list=config.get("tag_list"),
            thresholds=config.get("thresholds"),
            template=config.get("template", DEFAULT_TEMPLATE),
            top_k=config.get("top_k"),
            score_mode=config.get("score_mode", "relative"),
            threshold_scale=config.get("threshold_scale", 1.0),
            min_score=config.get("min_score"),
            logit_scale=config.get("logit_scale"),
            default_threshold=config.get("default_threshold", 0.65),
            prompt_objects=prompt_objects or _resolve_ref(config.get("prompt_objects")),
        )

    def __repr__(self) -> str:
        return (
            f"ClipTagger({self.scorer!r}, tags={len(self.tags)}, score_mode={self.score_mode!r}, "
            f"threshold_scale={self.threshold_scale}, top_k={self.top_k})"
        )


def _import_ram():
    try:
        from ram import inference_ram  # noqa: F401
        from ram.models import ram, ram_plus  # noqa: F401
    except ImportError as err:  # the package, or one of its own dependencies (torchvision, timm, ...)
        raise MissingDependencyError(
            f"RamTagger needs the Recognize Anything package `ram`, which could not be imported ({err}). "
            f"Install it with: {RAM_INSTALL_HINT}. Or use ClipTagger, which needs nothing extra."
        ) from err
    import ram as ram_pkg
    import ram.models as ram_models

    return ram_pkg, ram_models


class RamTagger:
    """The original Recognize Anything Model (RAM or RAM++) as a ``Tagger``. **Untested here**: the ``ram``
    package is not on PyPI and its weights cannot be downloaded in this project's environment.

    Args:
        checkpoint: local path of a RAM / RAM++ ``.pth`` checkpoint.
        variant: ``"ram_plus"`` (default) or ``"ram"``.
        image_size: RAM's input size (384).
        vit: RAM's backbone name (``"swin_l"``).
        prompt_objects: as for :class:`ClipTagger`.

    Raises:
        MissingDependencyError: (an ``ImportError``) when ``ram`` is not installed, saying how to install it.
    """

    def __init__(
        self,
        checkpoint: str | Path,
        variant: str = "ram_plus",
        image_size: int = 384,
        vit: str = "swin_l",
        device: str | torch.device | None = None,
        prompt_objects: Callable[[str], list[str]] | None = None,
    ) -> None:
        if variant not in ("ram", "ram_plus"):
            raise ValueError(f"variant must be 'ram' or 'ram_plus', got {variant!r}")
        self._ram, self._ram_models = _import_ram()
        self.checkpoint = str(checkpoint)
        self.variant = variant
        self.image_size = int(image_size)
        self.vit = vit
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.prompt_objects = prompt_objects or no_prompt_objects
        self._model = None

    @lazy_model
    def model(self):
        """The RAM / RAM++ model on the checkpoint (loaded on first use)."""
        build = getattr(self._ram_models, self.variant)
        model = build(pretrained=self.checkpoint, image_size=self.image_size, vit=self.vit)
        model.eval().to(self.device)
        return model

    def _transform(self, image: PIL.Image.Image) -> torch.Tensor:
        # RAM's own transform: resize to a square, [0, 1], ImageNet mean/std.
        im = image.convert("RGB").resize((self.image_size, self.image_size), PIL.Image.BILINEAR)
        x = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(im.height, im.width, 3)
        x = x.permute(2, 0, 1).float() / 255.0
        mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
        return (x - mean) / std

    def tag(self, images: Sequence[PIL.Image.Image], prompts: Sequence[str] | None = None) -> list[list[str]]:
        prompts = _prompts_for(images, prompts)
        out = []
        for image, prompt in zip(images, prompts):
            x = self._transform(image).unsqueeze(0).to(self.device)
            with torch.no_grad():
                result = self._ram.inference_ram(x, self.model)
            english = result[0] if isinstance(result, (tuple, list)) else result
            if isinstance(english, (tuple, list)):
                english = english[0]
            tags = [t.strip() for t in str(english).split("|") if t.strip()]
            out.append(merge_tags(tags, self.prompt_objects(prompt) if prompt else []))
        return out

    __call__ = tag

    def to_config(self) -> dict[str, Any]:
        return {
            "class": "RamTagger",
            "checkpoint": self.checkpoint,
            "variant": self.variant,
            "image_size": self.image_size,
            "vit": self.vit,
            "prompt_objects": _callable_ref(self.prompt_objects),
        }

    @classmethod
    def from_config(cls, config: dict[str, Any], *, prompt_objects=None, device=None) -> RamTagger:
        return cls(
            config["checkpoint"],
            variant=config.get("variant", "ram_plus"),
            image_size=config.get("image_size", 384),
            vit=config.get("vit", "swin_l"),
            device=device,
            prompt_objects=prompt_objects or _resolve_ref(config.get("prompt_objects")),
        )
