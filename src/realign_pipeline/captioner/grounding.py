"""The grounder of the dense captioner: Grounding DINO boxes for phrases, SAM masks from the boxes.

``GroundingDinoSamGrounder`` uses transformers' native ``GroundingDinoForObjectDetection`` and ``SamModel``
(neither needs torchvision for box prompts). ``SegmentAnythingAdapter`` swaps the mask step for the original
``segment_anything`` package when the user has it. ``box_nms`` is the small torch NMS that merges duplicate
boxes of one phrase. See ``docs/captioner_grounding.md``.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import PIL.Image
import torch

from .base import Detection

__all__ = [
    "GroundingDinoSamGrounder",
    "GroundingReport",
    "SegmentAnythingAdapter",
    "Segmenter",
    "TransformersSam",
    "box_iou",
    "box_nms",
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
    """What happened to each phrase of one ``ground`` call (for the captioner's ``source``).

    ``missing`` maps each phrase that got ``None`` to the reason. ``instances`` counts the distinct boxes
    per found phrase after NMS (the detection keeps the best, or their union with ``merge_instances``).
    ``unmatched_labels`` lists the text labels of boxes that matched no phrase (dropped).
    ``assigned_by_tokens`` counts boxes whose label was not exactly a phrase and that were assigned by token
    probability. ``box_masks`` lists phrases whose SAM mask came back empty, so the box was used as the mask.
    """

    phrases: list[str]
    queries: list[str] = field(default_factory=list)
    boxes_above_threshold: int = 0
    missing: dict[str, str] = field(default_factory=dict)
    instances: dict[str, int] = field(default_factory=dict)
    unmatched_labels: list[str] = field(default_factory=list)
    assigned_by_tokens: int = 0
    box_masks: list[str] = field(default_factory=list)
    thresholds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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

    def load(self):
        if self._model is None:
            from transformers import SamModel, SamProcessor

            self._processor = SamProcessor.from_pretrained(self.model_name)
            self._model = SamModel.from_pretrained(self.model_name).to(self.device, self.dtype).eval()
        return self._model, self._processor

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

    @torch.no_grad()
    def segment(self, image: PIL.Image.Image, boxes: np.ndarray) -> list[np.ndarray]:
        if len(boxes) == 0:
            return []
        if self._predictor is None:
            from segment_anything import SamPredictor, sam_model_registry

            sam = sam_model_registry[self.model_type](checkpoint=self.checkpoint).to(self.device).eval()
            self._predictor = SamPredictor(sam)
        array = np.asarray(image.convert("RGB"))
        self._predictor.set_image(array)
        box_tensor = torch.as_tensor(np.asarray(boxes, float), dtype=torch.float, device=self.device)
        box_tensor = self._predictor.transform.apply_boxes_torch(box_tensor, array.shape[:2])
        masks, iou, _ = self._predictor.predict_torch(
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
    """A box and a mask per phrase: Grounding DINO boxes, SAM masks (the paper's grounding step).

    Args:
        detector: hub id or local folder of a ``GroundingDinoForObjectDetection`` with its processor.
        segmenter: hub id or folder of a ``SamModel`` with its ``SamProcessor``, or a segmenter object
            (``TransformersSam``, ``SegmentAnythingAdapter``).
        box_threshold: keep a box when its best token probability is above this (Grounding DINO's default).
        text_threshold: a token belongs to a box's text label when its probability is above this.
        nms_iou: boxes of the same phrase overlapping more than this are duplicates (merged by NMS).
        merge_instances: when False (default) a phrase's detection is its best box; when True it is the union
            of the phrase's boxes after NMS (their masks or-ed), for plural phrases such as "two cats".
        device, dtype: where and how the models run (default: CUDA when available, float32). Models load
            lazily on the first call.

    ``ground`` returns one ``Detection`` (or ``None``) per phrase and leaves a :class:`GroundingReport` in
    ``last_report``; ``ground_with_report`` returns both.
    """

    def __init__(
        self,
        detector: str = "IDEA-Research/grounding-dino-tiny",
        segmenter: str | Segmenter = "facebook/sam-vit-base",
        box_threshold: float = 0.35,
        text_threshold: float = 0.25,
        nms_iou: float = 0.5,
        merge_instances: bool = False,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
    ):
        self.detector_name = str(detector)
        self.box_threshold = float(box_threshold)
        self.text_threshold = float(text_threshold)
        self.nms_iou = float(nms_iou)
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

    def load(self):
        """Load Grounding DINO and its processor (done lazily by ``ground``)."""
        if self._model is None:
            from transformers import AutoProcessor, GroundingDinoForObjectDetection

            self._processor = AutoProcessor.from_pretrained(self.detector_name)
            model = GroundingDinoForObjectDetection.from_pretrained(self.detector_name)
            self._model = model.to(self.device, self.dtype).eval()
        return self._model, self._processor

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

    def ground(self, image: PIL.Image.Image, phrases: list[str]) -> list[Detection | None]:
        """One ``Detection`` (box in fractions, bool mask at the image size) or ``None`` per phrase."""
        return self.ground_with_report(image, phrases)[0]

    def ground_with_report(
        self, image: PIL.Image.Image, phrases: list[str]
    ) -> tuple[list[Detection | None], GroundingReport]:
        detections, reports = self._ground_many([image], [list(phrases)])
        self.last_report = reports[0]
        return detections[0], reports[0]

    def ground_batch(
        self, images: list[PIL.Image.Image], phrases_per_image: list[list[str]]
    ) -> list[list[Detection | None]]:
        """``ground`` for several images: one batched Grounding DINO pass, SAM per image.

        Reports are left in ``last_reports`` (one per image).
        """
        if len(images) != len(phrases_per_image):
            raise ValueError(f"{len(images)} images but {len(phrases_per_image)} phrase lists")
        detections, reports = self._ground_many(list(images), [list(p) for p in phrases_per_image])
        self.last_reports = reports
        self.last_report = reports[-1] if reports else None
        return detections

    def _queries(self, unique: list[str], tokenizer, max_tokens: int) -> list[list[str]]:
        """Pack phrases into "a. b. c." queries that fit the text encoder (``max_text_len`` tokens)."""
        chunks: list[list[str]] = [[]]
        used = 2  # [CLS] and [SEP]
        for phrase in unique:
            n = len(tokenizer(phrase, add_special_tokens=False)["input_ids"]) + 1  # + "."
            if chunks[-1] and used + n > max_tokens:
                chunks.append([])
                used = 2
            chunks[-1].append(phrase)
            used += n
        return [c for c in chunks if c]

    @torch.no_grad()
    def _ground_many(self, images, phrases_per_image):
        model, processor = self.load()
        tokenizer = processor.tokenizer
        max_tokens = int(getattr(model.config, "max_text_len", 256))
        thresholds = {
            "box_threshold": self.box_threshold,
            "text_threshold": self.text_threshold,
            "nms_iou": self.nms_iou,
        }
        images = [image.convert("RGB") for image in images]

        # one (image, query) pair per chunk of phrases
        reports, uniques, pairs = [], [], []
        for index, (image, phrases) in enumerate(zip(images, phrases_per_image)):
            report = GroundingReport(phrases=list(phrases), thresholds=dict(thresholds))
            unique = list(dict.fromkeys(n for n in map(normalize_phrase, phrases) if n))
            for chunk in self._queries(unique, tokenizer, max_tokens):
                query = ". ".join(chunk) + "."
                report.queries.append(query)
                pairs.append((index, chunk, query))
            reports.append(report)
            uniques.append(unique)

        # candidate boxes per image and normalized phrase: [(score, box in pixels)]
        found: list[dict[str, list[tuple[float, list[float]]]]] = [{} for _ in images]
        if pairs:
            inputs = processor(
                images=[images[i] for i, _, _ in pairs],
                text=[q for _, _, q in pairs],
                padding=True,
                truncation=True,
                max_length=max_tokens,
                return_tensors="pt",
            )
            outputs = model(**_to(dict(inputs), self.device, self.dtype))
            outputs.logits = outputs.logits.float().cpu()
            outputs.pred_boxes = outputs.pred_boxes.float().cpu()
            input_ids = inputs["input_ids"]
            sizes = [(images[i].height, images[i].width) for i, _, _ in pairs]
            results = processor.post_process_grounded_object_detection(
                outputs,
                input_ids,
                threshold=self.box_threshold,
                text_threshold=self.text_threshold,
                target_sizes=sizes,
            )
            probs = outputs.logits.sigmoid()  # (pairs, queries, max_text_len)
            for row, ((index, chunk, query), result) in enumerate(zip(pairs, results)):
                keep = torch.nonzero(probs[row].max(-1).values > self.box_threshold).flatten()
                if len(keep) != len(result["scores"]):  # guard against a change in the processor's rule
                    raise RuntimeError(
                        "Grounding DINO post-processing kept a different set of boxes than expected"
                    )
                spans = self._token_spans(tokenizer, query, chunk, probs.shape[-1])
                names = {self._label_form(tokenizer, p): p for p in chunk}
                reports[index].boxes_above_threshold += len(keep)
                for q, score, box, label in zip(
                    keep, result["scores"], result["boxes"], result["text_labels"]
                ):
                    phrase = names.get(self._clean_label(label))
                    if phrase is None:
                        phrase = self._assign_by_tokens(probs[row, q], spans)
                        if phrase is None:
                            reports[index].unmatched_labels.append(label)
                            continue
                        reports[index].assigned_by_tokens += 1
                    found[index].setdefault(phrase, []).append((float(score), box.tolist()))

        out = []
        for image, phrases, unique, report, candidates in zip(
            images, phrases_per_image, uniques, reports, found
        ):
            out.append(self._finish(image, phrases, candidates, report))
        return out, reports

    @staticmethod
    def _clean_label(label: str) -> str:
        return normalize_phrase(re.sub(r"\[(CLS|SEP|PAD)\]", " ", label))

    @staticmethod
    def _label_form(tokenizer, phrase: str) -> str:
        """The phrase as the processor's labels spell it (decoded from its own tokens)."""
        ids = tokenizer(phrase, add_special_tokens=False)["input_ids"]
        return normalize_phrase(tokenizer.decode(ids))

    @staticmethod
    def _token_spans(tokenizer, query: str, chunk: list[str], width: int) -> dict[str, list[int]]:
        """Token positions of each phrase of the query (from the tokenizer's character offsets)."""
        offsets = tokenizer(query, return_offsets_mapping=True, truncation=True, max_length=width)[
            "offset_mapping"
        ]
        spans, start = {}, 0
        for phrase in chunk:
            begin = query.index(phrase, start)
            end = start = begin + len(phrase)
            spans[phrase] = [t for t, (a, b) in enumerate(offsets) if begin <= a < b <= end]
        return spans

    def _assign_by_tokens(self, token_probs: torch.Tensor, spans: dict[str, list[int]]) -> str | None:
        """For a label that is not exactly one phrase: the phrase whose tokens the box scores highest (mean),
        among phrases with at least one token above ``text_threshold``; None when there is none."""
        best, best_score = None, -1.0
        for phrase, tokens in spans.items():
            if not tokens:
                continue
            values = token_probs[tokens]
            if (values > self.text_threshold).any() and float(values.mean()) > best_score:
                best, best_score = phrase, float(values.mean())
        return best

    def _finish(self, image, phrases, candidates, report) -> list[Detection | None]:
        width, height = image.size
        chosen: dict[str, tuple[float, np.ndarray]] = {}  # phrase -> (score, boxes kept (K, 4) in pixels)
        for phrase, items in candidates.items():
            scores = torch.tensor([s for s, _ in items])
            boxes = torch.tensor([b for _, b in items], dtype=torch.float)
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
            kept = box_nms(boxes, scores, self.nms_iou)
            report.instances[phrase] = len(kept)
            kept = kept if self.merge_instances else kept[:1]
            chosen[phrase] = (float(scores[kept[0]]), self._proper(boxes[kept].numpy(), width, height))

        # SAM once per image for every kept box
        flat = [(phrase, box) for phrase, (_, boxes) in chosen.items() for box in boxes]
        masks = self.segmenter.segment(image, np.array([b for _, b in flat])) if flat else []
        per_phrase: dict[str, list[np.ndarray]] = {}
        for (phrase, box), mask in zip(flat, masks):
            mask = np.asarray(mask, dtype=bool)
            if not mask.any():  # an empty SAM mask would give the object no region: fall back to its box
                mask = self._box_mask(box, width, height)
                if phrase not in report.box_masks:
                    report.box_masks.append(phrase)
            per_phrase.setdefault(phrase, []).append(mask)

        detections: list[Detection | None] = []
        for original in phrases:
            phrase = normalize_phrase(original)
            if not phrase:
                detections.append(None)
                report.missing[original] = "empty phrase"
                continue
            if phrase not in chosen:
                detections.append(None)
                report.missing[original] = self._why_missing(report)
                continue
            score, boxes = chosen[phrase]
            box = (
                boxes[:, 0].min() / width,
                boxes[:, 1].min() / height,
                boxes[:, 2].max() / width,
                boxes[:, 3].max() / height,
            )
            mask = np.logical_or.reduce(per_phrase[phrase])
            detections.append(Detection(box=tuple(float(v) for v in box), mask=mask, score=score))
        return detections

    def _why_missing(self, report: GroundingReport) -> str:
        if report.boxes_above_threshold == 0:
            return f"no box scored above box_threshold={self.box_threshold}"
        return (
            f"{report.boxes_above_threshold} box(es) above box_threshold={self.box_threshold}, none labelled "
            f"with this phrase (text_threshold={self.text_threshold})"
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
