"""The grounder of the dense captioner: Grounding DINO boxes for nouns, SAM masks from the boxes.

``GroundingDinoSamGrounder`` uses transformers' native ``GroundingDinoForObjectDetection`` and ``SamModel``
(neither needs torchvision for box prompts). ``SegmentAnythingAdapter`` swaps the mask step for the original
``segment_anything`` package when the user has it. ``box_nms`` is the small torch NMS that merges duplicate
boxes of one noun. See ``docs/captioner_grounding.md``.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import PIL.Image
import torch

from ..lazy import lazy_model
from .base import Detection, assign_one_to_one, phrase_attributes

__all__ = [
    "GroundingDinoSamGrounder",
    "GroundingReport",
    "SegmentAnythingAdapter",
    "Segmenter",
    "TransformersSam",
    "box_iou",
    "box_nms",
    "grounding_targets",
    "normalize_phrase",
]


# ----------------------------------------------------------------------------------------------- boxes


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU of boxes ``(N, 4)`` and ``(M, 4)`` in ``x0, y0, x1, y1`` -> ``(N, M)``."""
    area_a = (a[:, 2] - a[:, 0]).clamp(min=0) * (a[:, 3] - a[:, 1]).clamp(min=0)
    area_b = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    top_left = torch.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(-1)
    union = area_a[:, None] + area_b[None, :] - inter
    return torch.where(
        union > 0, inter / union.clamp(min=torch.finfo(inter.dtype).tiny), torch.zeros_like(inter)
    )


def box_nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy non-maximum suppression (what ``torchvision.ops.nms`` does, without torchvision).

    Visits boxes from the highest score down and drops every box whose IoU with an already kept box is
    above ``iou_threshold``. Returns the kept indices into ``boxes``, by decreasing score (int64).
    """
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    order = torch.argsort(scores, descending=True, stable=True)
    iou = box_iou(boxes[order].float(), boxes[order].float())
    suppressed = torch.zeros(len(order), dtype=torch.bool, device=boxes.device)
    kept = []
    for i in range(len(order)):
        if suppressed[i]:
            continue
        kept.append(i)
        suppressed |= iou[i] > iou_threshold
    return order[torch.tensor(kept, dtype=torch.long, device=boxes.device)]


# ----------------------------------------------------------------------------------------------- phrases


def normalize_phrase(phrase: str) -> str:
    """Lowercase, dots (Grounding DINO's phrase separator) to spaces, whitespace collapsed."""
    return re.sub(r"\s+", " ", phrase.lower().replace(".", " ")).strip()


@dataclass
class GroundingReport:
    """What happened to each object of one ``ground`` call (for the captioner's ``source``).

    ``nouns`` and ``phrases`` are the call's (a phrase defaults to its noun). ``missing`` maps each phrase that
    got ``None`` to the reason. ``instances`` counts the distinct boxes per noun (after NMS).
    ``attribute_scores`` gives, per grounded phrase with attribute words, how well its box scored them (the
    tie-break between boxes of one noun). ``boxes_above_threshold`` counts boxes kept for a noun;
    ``boxes_without_noun`` counts boxes above ``box_threshold`` on other words only (an attribute, a
    separator), dropped: an attribute never stands in for a missing noun. ``box_masks`` lists phrases whose
    SAM mask came back empty, so the box was used as the mask.
    """

    phrases: list[str]
    nouns: list[str] = field(default_factory=list)
    queries: list[str] = field(default_factory=list)
    boxes_above_threshold: int = 0
    boxes_without_noun: int = 0
    missing: dict[str, str] = field(default_factory=dict)
    instances: dict[str, int] = field(default_factory=dict)
    attribute_scores: dict[str, float] = field(default_factory=dict)
    box_masks: list[str] = field(default_factory=list)
    thresholds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def grounding_targets(nouns: list[str], phrases: list[str | None] | None) -> list[tuple[str, str]]:
    """``(noun, phrase)`` per object; a missing phrase is the noun itself."""
    nouns = list(nouns)
    if phrases is None:
        return [(noun, noun) for noun in nouns]
    phrases = list(phrases)
    if len(phrases) != len(nouns):
        raise ValueError(f"{len(nouns)} nouns but {len(phrases)} phrases; give one phrase per noun (or none).")
    return [(noun, noun if phrase is None else phrase) for noun, phrase in zip(nouns, phrases)]


# ----------------------------------------------------------------------------------------------- segmenters


@runtime_checkable
class Segmenter(Protocol):
    def segment(self, image: PIL.Image.Image, boxes: np.ndarray) -> list[np.ndarray]:
        """One boolean (H, W) mask per box; ``boxes`` is ``(N, 4)`` in pixels (x0, y0, x1, y1)."""

    def to_config(self) -> dict[str, Any]: ...


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, str):
        return getattr(torch, dtype.replace("torch.", ""))
    return dtype


def _dtype_name(dtype: torch.dtype | None) -> str | None:
    return None if dtype is None else str(dtype).replace("torch.", "")


def _to(inputs: dict[str, Any], device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Floating tensors to (device, dtype), the others to device."""
    return {
        k: (v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device))
        if torch.is_tensor(v)
        else v
        for k, v in inputs.items()
    }


class TransformersSam:
    """SAM masks from box prompts with transformers' ``SamModel`` + ``SamProcessor`` (loaded lazily).

    One image embedding per image, one mask per box: of SAM's three multimask outputs, the one with the
    highest predicted IoU.
    """

    def __init__(self, model: str = "facebook/sam-vit-base", device=None, dtype=None):
        self.model_name = str(model)
        self.device = _resolve_device(device)
        self._dtype_arg = dtype
        self.dtype = _resolve_dtype(dtype)
        self._model = None
        self._processor = None

    @lazy_model
    def model(self):
        """The ``SamModel`` (loaded on first use)."""
        from transformers import SamModel

        return SamModel.from_pretrained(self.model_name).to(self.device, self.dtype).eval()

    @lazy_model
    def processor(self):
        """The ``SamProcessor`` (loaded on first use)."""
        from transformers import SamProcessor

        return SamProcessor.from_pretrained(self.model_name)

    def load(self):
        """``(model, processor)``, loaded now if they are not yet (done lazily by ``segment``)."""
        processor = self.processor
        return self.model, processor

    def to(self, device=None, dtype=None):
        self.device = self.device if device is None else torch.device(device)
        if dtype is not None:
            self._dtype_arg, self.dtype = dtype, _resolve_dtype(dtype)
        if self._model is not None:
            self._model.to(self.device, self.dtype)
        return self

    @torch.no_grad()
    def segment(self, image: PIL.Image.Image, boxes: np.ndarray) -> list[np.ndarray]:
        if len(boxes) == 0:
            return []
        model, processor = self.load()
        inputs = processor(
            images=image.convert("RGB"), input_boxes=[np.asarray(boxes, float).tolist()], return_tensors="pt"
        )
        sizes = (inputs.pop("original_sizes"), inputs.pop("reshaped_input_sizes"))
        outputs = model(**_to(dict(inputs), self.device, self.dtype), multimask_output=True)
        masks = processor.post_process_masks(outputs.pred_masks.float().cpu(), *sizes)[0]  # (N, K, H, W) bool
        best = outputs.iou_scores[0].float().argmax(-1).cpu()  # (N,)
        chosen = masks[torch.arange(len(best)), best]
        return [m.numpy().astype(bool) for m in chosen]

    def to_config(self) -> dict[str, Any]:
        return {
            "class": "TransformersSam",
            "model": self.model_name,
            "dtype": None if self._dtype_arg is None else _dtype_name(self.dtype),
        }


SEGMENT_ANYTHING_MISSING = (
    "SegmentAnythingAdapter needs the original `segment_anything` package, which is not installed. Install it "
    "with `pip install git+https://github.com/facebookresearch/segment-anything.git` (it imports torchvision: "
    "install the torchvision build that matches your torch first, e.g. from the same index URL), and download "
    "a checkpoint such as sam_vit_b_01ec64.pth from that repository. You do not need it for the default path: "
    "GroundingDinoSamGrounder(segmenter='facebook/sam-vit-base') uses transformers' SamModel, without torchvision."
)


class SegmentAnythingAdapter:
    """SAM masks through the original ``segment_anything`` package (``SamPredictor``). Untested here.

    Args:
        checkpoint: path to an original SAM checkpoint (``sam_vit_b_01ec64.pth``, ...).
        model_type: key of ``segment_anything.sam_model_registry`` (``"vit_b"``, ``"vit_l"``, ``"vit_h"``).

    Raises ``ImportError`` with install instructions when the package is missing.
    """

    def __init__(self, checkpoint: str, model_type: str = "vit_b", device=None):
        try:
            import segment_anything  # noqa: F401
        except ImportError as error:
            raise ImportError(SEGMENT_ANYTHING_MISSING) from error
        self.checkpoint = str(checkpoint)
        self.model_type = model_type
        self.device = _resolve_device(device)
        self._predictor = None

    def to(self, device=None, dtype=None):
        if device is not None:
            self.device = torch.device(device)
            if self._predictor is not None:
                self._predictor.model.to(self.device)
        return self

    @lazy_model
    def predictor(self):
        """segment_anything's ``SamPredictor`` on the checkpoint (loaded on first use)."""
        from segment_anything import SamPredictor, sam_model_registry

        sam = sam_model_registry[self.model_type](checkpoint=self.checkpoint).to(self.device).eval()
        return SamPredictor(sam)

    @torch.no_grad()
    def segment(self, image: PIL.Image.Image, boxes: np.ndarray) -> list[np.ndarray]:
        if len(boxes) == 0:
            return []
        predictor = self.predictor
        array = np.asarray(image.convert("RGB"))
        predictor.set_image(array)
        box_tensor = torch.as_tensor(np.asarray(boxes, float), dtype=torch.float, device=self.device)
        box_tensor = predictor.transform.apply_boxes_torch(box_tensor, array.shape[:2])
        masks, iou, _ = predictor.predict_torch(
            point_coords=None, point_labels=None, boxes=box_tensor, multimask_output=True
        )
        chosen = masks[torch.arange(len(masks)), iou.argmax(-1)]
        return [m.cpu().numpy().astype(bool) for m in chosen]

    def to_config(self) -> dict[str, Any]:
        return {
            "class": "SegmentAnythingAdapter",
            "checkpoint": self.checkpoint,
            "model_type": self.model_type,
        }


def _segmenter_from_config(config: dict[str, Any] | str, device, dtype) -> Segmenter:
    if isinstance(config, str):
        return TransformersSam(config, device=device, dtype=dtype)
    config = dict(config)
    kind = config.pop("class", "TransformersSam")
    if kind == "TransformersSam":
        saved_dtype = config.pop("dtype", None)
        return TransformersSam(
            config["model"], device=device, dtype=dtype if dtype is not None else saved_dtype
        )
    if kind == "SegmentAnythingAdapter":
        return SegmentAnythingAdapter(config["checkpoint"], config.get("model_type", "vit_b"), device=device)
    raise ValueError(f"unknown segmenter class {kind!r} (known: TransformersSam, SegmentAnythingAdapter)")


# ----------------------------------------------------------------------------------------------- grounder


class GroundingDinoSamGrounder:
    """A box and a mask per object, found by its noun: Grounding DINO boxes, SAM masks (the paper's grounding).

    The detector is queried with the nouns ("square. circle.") and never with the phrases: "blue square" would
    find the blue object, the very binding error the fine stage undoes. The phrases' attribute words ("blue")
    ride along as queries of their own, read only to choose between boxes of the same noun.

    Args:
        detector: hub id or local folder of a ``GroundingDinoForObjectDetection`` with its processor.
        segmenter: hub id or folder of a ``SamModel`` with its ``SamProcessor``, or a segmenter object
            (``TransformersSam``, ``SegmentAnythingAdapter``).
        box_threshold: a box is a noun's when that noun's best token probability is above this (Grounding
            DINO's default), and higher than the box scores any other noun.
        text_threshold: the noun's best token must also be above this (Grounding DINO's label rule; it only
            matters when set above ``box_threshold``).
        nms_iou: boxes of the same noun overlapping more than this are duplicates (merged by NMS).
        object_iou: boxes of different nouns overlapping more than this are one object, kept for the noun
            that scores it highest (1.0 turns this off).
        merge_instances: when False (default) an object's detection is one box; when True and a noun has one
            phrase, it is the union of the noun's boxes after NMS (their masks or-ed), for plural phrases such
            as "two cats".
        device, dtype: where and how the models run (default: CUDA when available, float32). Models load
            lazily on the first call.

    ``ground`` returns one ``Detection`` (or ``None``) per noun and leaves a :class:`GroundingReport` in
    ``last_report``; ``ground_with_report`` returns both.
    """

    def __init__(
        self,
        detector: str = "IDEA-Research/grounding-dino-tiny",
        segmenter: str | Segmenter = "facebook/sam-vit-base",
        box_threshold: float = 0.35,
        text_threshold: float = 0.25,
        nms_iou: float = 0.5,
        object_iou: float = 0.7,
        merge_instances: bool = False,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
    ):
        self.detector_name = str(detector)
        self.box_threshold = float(box_threshold)
        self.text_threshold = float(text_threshold)
        self.nms_iou = float(nms_iou)
        self.object_iou = float(object_iou)
        self.merge_instances = bool(merge_instances)
        self.device = _resolve_device(device)
        self._dtype_arg = dtype
        self.dtype = _resolve_dtype(dtype)
        if isinstance(segmenter, (str, bytes)) or hasattr(segmenter, "__fspath__"):
            segmenter = TransformersSam(str(segmenter), device=self.device, dtype=dtype)
        self.segmenter = segmenter
        self._model = None
        self._processor = None
        self.last_report: GroundingReport | None = None
        self.last_reports: list[GroundingReport] = []

    # -- models

    @lazy_model
    def model(self):
        """Grounding DINO (``GroundingDinoForObjectDetection``, loaded on first use)."""
        from transformers import GroundingDinoForObjectDetection

        model = GroundingDinoForObjectDetection.from_pretrained(self.detector_name)
        return model.to(self.device, self.dtype).eval()

    @lazy_model
    def processor(self):
        """Grounding DINO's processor (loaded on first use)."""
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(self.detector_name)

    def load(self):
        """Load Grounding DINO and its processor (done lazily by ``ground``); returns ``(model, processor)``."""
        processor = self.processor
        return self.model, processor

    def to(self, device=None, dtype=None):
        """Move the (loaded or future) models; returns self."""
        self.device = self.device if device is None else torch.device(device)
        if dtype is not None:
            self._dtype_arg, self.dtype = dtype, _resolve_dtype(dtype)
        if self._model is not None:
            self._model.to(self.device, self.dtype)
        if hasattr(self.segmenter, "to"):
            self.segmenter.to(device, dtype)
        return self

    # -- config

    def to_config(self) -> dict[str, Any]:
        """Model ids or paths and thresholds (never weights)."""
        segmenter = self.segmenter.to_config()
        return {
            "detector": self.detector_name,
            "segmenter": segmenter,
            "box_threshold": self.box_threshold,
            "text_threshold": self.text_threshold,
            "nms_iou": self.nms_iou,
            "object_iou": self.object_iou,
            "merge_instances": self.merge_instances,
            "dtype": None if self._dtype_arg is None else _dtype_name(self.dtype),
        }

    @classmethod
    def from_config(cls, config: dict[str, Any], **overrides) -> GroundingDinoSamGrounder:
        config = {**config, **overrides}
        device, dtype = config.pop("device", None), config.get("dtype")
        segmenter = config.pop("segmenter", "facebook/sam-vit-base")
        if not isinstance(segmenter, (str, dict)):
            return cls(segmenter=segmenter, device=device, **config)
        return cls(segmenter=_segmenter_from_config(segmenter, device, dtype), device=device, **config)

    # -- grounding

    def ground(
        self, image: PIL.Image.Image, nouns: list[str], phrases: list[str] | None = None
    ) -> list[Detection | None]:
        """One ``Detection`` (box in fractions, bool mask at the image size) or ``None`` per noun.

        ``phrases[i]`` is the prompt's phrase for ``nouns[i]``; its other words only choose between boxes of
        that noun (see :class:`~realign_pipeline.captioner.base.Grounder`).
        """
        return self.ground_with_report(image, nouns, phrases)[0]

    def ground_with_report(
        self, image: PIL.Image.Image, nouns: list[str], phrases: list[str] | None = None
    ) -> tuple[list[Detection | None], GroundingReport]:
        detections, reports = self._ground_many([image], [grounding_targets(nouns, phrases)])
        self.last_report = reports[0]
        return detections[0], reports[0]

    def ground_batch(
        self,
        images: list[PIL.Image.Image],
        nouns_per_image: list[list[str]],
        phrases_per_image: list[list[str]] | None = None,
    ) -> list[list[Detection | None]]:
        """``ground`` for several images: one batched Grounding DINO pass, SAM per image.

        Reports are left in ``last_reports`` (one per image).
        """
        if len(images) != len(nouns_per_image):
            raise ValueError(f"{len(images)} images but {len(nouns_per_image)} noun lists")
        if phrases_per_image is None:
            phrases_per_image = [None] * len(images)
        elif len(phrases_per_image) != len(images):
            raise ValueError(f"{len(images)} images but {len(phrases_per_image)} phrase lists")
        targets = [grounding_targets(n, p) for n, p in zip(nouns_per_image, phrases_per_image)]
        detections, reports = self._ground_many(list(images), targets)
        self.last_reports = reports
        self.last_report = reports[-1] if reports else None
        return detections

    def _queries(
        self, groups: dict[str, list[str]], tokenizer, max_tokens: int
    ) -> list[tuple[list[str], list[str]]]:
        """Pack nouns, each with its attribute words, into queries that fit the text encoder.

        A noun's attributes share its query, so the same boxes carry both scores. Returns (nouns, words) per
        query, ``words`` being the nouns then the attribute words that are not nouns, each once.
        """

        def cost(text: str) -> int:
            return len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 1  # + "."

        chunks: list[list[str]] = [[]]
        used = 2  # [CLS] and [SEP]
        for noun, attributes in groups.items():
            n = cost(noun) + sum(cost(word) for word in attributes)
            if chunks[-1] and used + n > max_tokens:
                chunks.append([])
                used = 2
            chunks[-1].append(noun)
            used += n
        out = []
        for chunk in chunks:
            if chunk:
                words = list(chunk)
                words += [w for noun in chunk for w in groups[noun] if w not in words]
                out.append((chunk, list(dict.fromkeys(words))))
        return out

    @torch.no_grad()
    def _ground_many(self, images, targets_per_image):
        model, processor = self.load()
        tokenizer = processor.tokenizer
        max_tokens = int(getattr(model.config, "max_text_len", 256))
        thresholds = {
            "box_threshold": self.box_threshold,
            "text_threshold": self.text_threshold,
            "nms_iou": self.nms_iou,
            "object_iou": self.object_iou,
        }
        images = [image.convert("RGB") for image in images]

        # one (image, query) row per chunk of nouns
        reports, rows = [], []
        for index, (image, targets) in enumerate(zip(images, targets_per_image)):
            report = GroundingReport(
                phrases=[p for _, p in targets], nouns=[n for n, _ in targets], thresholds=dict(thresholds)
            )
            groups: dict[str, list[str]] = {}  # normalized noun -> the attribute words of its phrases
            for noun, phrase in targets:
                key = normalize_phrase(noun)
                if key:
                    words = groups.setdefault(key, [])
                    words += [w for w in phrase_attributes(key, phrase) if w not in words]
            for chunk, words in self._queries(groups, tokenizer, max_tokens):
                query = ". ".join(words) + "."
                report.queries.append(query)
                rows.append((index, chunk, words, query))
            reports.append(report)

        # candidate boxes per image and noun: [(noun score, box in pixels, {attribute word: probability})]
        found: list[dict[str, list[tuple[float, list[float], dict[str, float]]]]] = [{} for _ in images]
        if rows:
            inputs = processor(
                images=[images[i] for i, _, _, _ in rows],
                text=[q for _, _, _, q in rows],
                padding=True,
                truncation=True,
                max_length=max_tokens,
                return_tensors="pt",
            )
            outputs = model(**_to(dict(inputs), self.device, self.dtype))
            probs = outputs.logits.float().cpu().sigmoid()  # (rows, queries, max_text_len)
            centres = outputs.pred_boxes.float().cpu()  # (rows, queries, 4): cx, cy, w, h in fractions
            for row, (index, chunk, words, query) in enumerate(rows):
                spans = self._token_spans(tokenizer, query, words, probs.shape[-1])
                # a word's probability for a box: its best token's (how Grounding DINO scores a box)
                word_probs = {
                    w: probs[row][:, t].max(-1).values if t else torch.zeros(probs.shape[1])
                    for w, t in spans.items()
                }
                noun_probs = torch.stack([word_probs[n] for n in chunk], dim=-1)  # (queries, nouns)
                best, which = noun_probs.max(-1)
                kept = (best > self.box_threshold) & (best > self.text_threshold)
                above = probs[row].max(-1).values > self.box_threshold
                reports[index].boxes_above_threshold += int(kept.sum())
                reports[index].boxes_without_noun += int((above & ~kept).sum())
                width, height = images[index].size
                cx, cy, w, h = centres[row].unbind(-1)
                corners = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)
                corners = corners * torch.tensor([width, height, width, height], dtype=corners.dtype)
                for q in torch.nonzero(kept).flatten().tolist():
                    attributes = {word: float(p[q]) for word, p in word_probs.items()}
                    noun = chunk[int(which[q])]
                    found[index].setdefault(noun, []).append((float(best[q]), corners[q].tolist(), attributes))

        out = [
            self._finish(image, targets, candidates, report)
            for image, targets, candidates, report in zip(images, targets_per_image, found, reports)
        ]
        return out, reports

    @staticmethod
    def _token_spans(tokenizer, query: str, words: list[str], width: int) -> dict[str, list[int]]:
        """Token positions of each word (or multi-word noun) of the query, from the tokenizer's offsets."""
        offsets = tokenizer(query, return_offsets_mapping=True, truncation=True, max_length=width)[
            "offset_mapping"
        ]
        spans, start = {}, 0
        for word in words:
            begin = query.index(word, start)
            end = start = begin + len(word)
            spans[word] = [t for t, (a, b) in enumerate(offsets) if begin <= a < b <= end]
        return spans

    def _boxes_per_noun(self, candidates, width: int, height: int, report: GroundingReport) -> dict[str, list]:
        """NMS within each noun, then one noun per object: ``{noun: [(score, box, attributes)]}`` by score."""
        pool = []  # (noun, score, box, attributes) of every box left by the per-noun NMS
        for noun, items in candidates.items():
            scores = torch.tensor([s for s, _, _ in items])
            boxes = torch.tensor([b for _, b, _ in items], dtype=torch.float)
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
            for k in box_nms(boxes, scores, self.nms_iou).tolist():
                pool.append((noun, items[k][0], boxes[k], items[k][2]))
        per_noun: dict[str, list] = {noun: [] for noun in candidates}
        if pool:
            boxes = torch.stack([b for _, _, b, _ in pool])
            kept = box_nms(boxes, torch.tensor([s for _, s, _, _ in pool]), self.object_iou)
            for k in kept.tolist():
                noun, score, box, attributes = pool[k]
                per_noun[noun].append((score, self._proper(box[None].numpy(), width, height)[0], attributes))
        for noun, items in per_noun.items():
            report.instances[noun] = len(items)
        return per_noun

    def _finish(self, image, targets, candidates, report) -> list[Detection | None]:
        width, height = image.size
        per_noun = self._boxes_per_noun(candidates, width, height, report)

        # which boxes each object gets: one-to-one between the phrases of a noun and its boxes
        chosen: dict[int, list[int]] = {}  # target index -> indices into per_noun[noun]
        by_noun: dict[str, list[int]] = {}
        for t, (noun, _) in enumerate(targets):
            by_noun.setdefault(normalize_phrase(noun), []).append(t)
        for noun, members in by_noun.items():
            items = per_noun.get(noun, [])
            if not noun or not items:
                continue
            if self.merge_instances and len(members) == 1:
                chosen[members[0]] = list(range(len(items)))
                continue
            keys = [
                [(self._attribute_score(noun, targets[t][1], attributes), score) for score, _, attributes in items]
                for t in members
            ]
            for t, k in zip(members, assign_one_to_one(keys)):
                if k is not None:
                    chosen[t] = [k]

        # SAM once per image for every chosen box
        flat = [(t, per_noun[normalize_phrase(targets[t][0])][k][1]) for t, ks in chosen.items() for k in ks]
        masks = self.segmenter.segment(image, np.array([b for _, b in flat])) if flat else []
        per_target: dict[int, list[np.ndarray]] = {}
        for (t, box), mask in zip(flat, masks):
            mask = np.asarray(mask, dtype=bool)
            if not mask.any():  # an empty SAM mask would give the object no region: fall back to its box
                mask = self._box_mask(box, width, height)
                if targets[t][1] not in report.box_masks:
                    report.box_masks.append(targets[t][1])
            per_target.setdefault(t, []).append(mask)

        detections: list[Detection | None] = []
        for t, (noun, phrase) in enumerate(targets):
            key = normalize_phrase(noun)
            if t not in chosen:
                detections.append(None)
                report.missing[phrase] = self._why_missing(key, candidates, per_noun, report)
                continue
            items = [per_noun[key][k] for k in chosen[t]]
            boxes = np.stack([box for _, box, _ in items])
            box = (
                boxes[:, 0].min() / width,
                boxes[:, 1].min() / height,
                boxes[:, 2].max() / width,
                boxes[:, 3].max() / height,
            )
            if phrase_attributes(key, phrase):
                report.attribute_scores[phrase] = max(self._attribute_score(key, phrase, a) for _, _, a in items)
            mask = np.logical_or.reduce(per_target[t])
            score = max(s for s, _, _ in items)
            detections.append(Detection(box=tuple(float(v) for v in box), mask=mask, score=float(score)))
        return detections

    @staticmethod
    def _attribute_score(noun: str, phrase: str, attributes: dict[str, float]) -> float:
        """Mean probability the box gives the phrase's attribute words (0 for a phrase without any)."""
        words = phrase_attributes(noun, phrase)
        return float(np.mean([attributes.get(w, 0.0) for w in words])) if words else 0.0

    def _why_missing(self, noun: str, candidates, per_noun, report: GroundingReport) -> str:
        if not noun:
            return "empty noun"
        if noun in candidates and not per_noun.get(noun):
            return (
                f"its box(es) overlap a box that scores higher as another noun (IoU above "
                f"object_iou={self.object_iou}): one object, one noun"
            )
        if per_noun.get(noun):
            return (
                f"the {len(per_noun[noun])} box(es) of {noun!r} went to other phrases of that noun, whose "
                "attribute words scored higher"
            )
        if report.boxes_above_threshold == 0 and report.boxes_without_noun == 0:
            return f"no box scored above box_threshold={self.box_threshold}"
        return (
            f"no box of {noun!r} above box_threshold={self.box_threshold} (boxes of other nouns: "
            f"{report.boxes_above_threshold}; boxes above it on other words only, such as an attribute: "
            f"{report.boxes_without_noun})"
        )

    @staticmethod
    def _proper(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
        """Boxes with at least one pixel of width and height, inside the image."""
        boxes = boxes.copy()
        for lo, hi, size in ((0, 2, width), (1, 3, height)):
            thin = boxes[:, hi] - boxes[:, lo] < 1.0
            boxes[thin, lo] = np.clip(boxes[thin, lo], 0, size - 1)
            boxes[thin, hi] = boxes[thin, lo] + 1.0
        return boxes

    @staticmethod
    def _box_mask(box: np.ndarray, width: int, height: int) -> np.ndarray:
        mask = np.zeros((height, width), dtype=bool)
        x0, y0 = int(np.floor(box[0])), int(np.floor(box[1]))
        x1, y1 = max(int(np.ceil(box[2])), x0 + 1), max(int(np.ceil(box[3])), y0 + 1)
        mask[y0:y1, x0:x1] = True
        return mask

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.to_config()})"
