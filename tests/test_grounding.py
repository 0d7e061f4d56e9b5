"""Grounder tests on tiny random Grounding DINO and SAM checkpoints loaded through from_pretrained (offline).

Random weights give random boxes: thresholds of 0 force boxes, a box threshold of 1 forces "no box".
"""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import numpy as np
import PIL.Image
import pytest
import torch

from realign_pipeline._tiny_grounding import bert_tokenizer, tiny_grounding_dino, tiny_sam
from realign_pipeline.captioner.base import Detection, Grounder
from realign_pipeline.captioner.grounding import (
    SEGMENT_ANYTHING_MISSING,
    GroundingDinoSamGrounder,
    SegmentAnythingAdapter,
    TransformersSam,
    box_nms,
    normalize_phrase,
)

H, W = 48, 80  # a non-square image


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_grounding")
    return tiny_grounding_dino(root / "dino"), tiny_sam(root / "sam")


@pytest.fixture(scope="module")
def image():
    return PIL.Image.fromarray(np.random.RandomState(0).randint(0, 255, (H, W, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def forced(paths):
    """Thresholds of 0: every query of the tiny model becomes a box."""
    return GroundingDinoSamGrounder(*paths, box_threshold=0.0, text_threshold=0.0, device="cpu")


def _check_detection(det: Detection, height: int, width: int):
    x0, y0, x1, y1 = det.box
    assert 0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0
    assert isinstance(det.mask, np.ndarray) and det.mask.dtype == bool and det.mask.shape == (height, width)
    assert det.mask.any()
    assert isinstance(det.score, float)


# ------------------------------------------------------------------------------------------------ NMS


def _iou(a, b):
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _nms_reference(boxes, scores, threshold):
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    kept = []
    for i in order:
        if all(_iou(boxes[i], boxes[j]) <= threshold for j in kept):
            kept.append(i)
    return kept


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.5, 0.9])
def test_box_nms_matches_brute_force(seed, threshold):
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 40, (1,), generator=g))
    corner = torch.rand(n, 2, generator=g) * 50
    size = torch.rand(n, 2, generator=g) * 30 + 0.5
    boxes = torch.cat([corner, corner + size], dim=1)
    scores = torch.rand(n, generator=g)
    kept = box_nms(boxes, scores, threshold)
    assert kept.dtype == torch.long
    assert kept.tolist() == _nms_reference(boxes.tolist(), scores.tolist(), threshold)


def test_box_nms_edge_cases():
    assert box_nms(torch.zeros(0, 4), torch.zeros(0), 0.5).tolist() == []
    boxes = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 10], [20, 20, 30, 30]])
    assert box_nms(boxes, torch.tensor([0.5, 0.9, 0.1]), 0.5).tolist() == [1, 2]


def test_normalize_phrase():
    assert normalize_phrase("  A Red. CAT ") == "a red cat"
    assert normalize_phrase(" . ") == ""


# ------------------------------------------------------------------------------------------------ tiny models


def test_bert_tokenizer_is_the_real_vocabulary():
    tokenizer = bert_tokenizer()
    assert tokenizer.vocab_size == 30522
    assert tokenizer("a red cat.")["input_ids"] == [101, 1037, 2417, 4937, 1012, 102]


def test_grounder_is_a_grounder(forced):
    assert isinstance(forced, Grounder)


def test_forced_boxes_give_a_detection_per_phrase(forced, image):
    phrases = ["A red cat", "dog", "", "a blue. car"]
    detections = forced.ground(image, phrases)
    assert len(detections) == len(phrases)
    for i in (0, 1, 3):
        _check_detection(detections[i], H, W)
    assert detections[2] is None
    report = forced.last_report
    assert report.phrases == phrases
    assert report.missing == {"": "empty phrase"}
    assert report.queries == ["a red cat. dog. a blue car."]
    assert report.boxes_above_threshold == 12  # the tiny model's 12 queries
    assert set(report.instances) == {"a red cat", "dog", "a blue car"}
    json.dumps(report.to_dict())


def test_high_threshold_gives_none_and_reasons(paths, image):
    grounder = GroundingDinoSamGrounder(*paths, box_threshold=1.0, device="cpu")
    detections, report = grounder.ground_with_report(image, ["cat", "dog"])
    assert detections == [None, None]
    assert set(report.missing) == {"cat", "dog"}
    assert all("box_threshold=1.0" in reason for reason in report.missing.values())
    assert grounder.last_report is report


def test_no_phrases(forced, image):
    assert forced.ground(image, []) == []
    assert forced.last_report.queries == []


def test_long_phrase_lists_are_split_into_queries(forced, image):
    phrases = [f"object number {i}" for i in range(30)]  # ~150 tokens > the tiny max_text_len of 64
    detections = forced.ground(image, phrases)
    assert len(detections) == 30
    assert len(forced.last_report.queries) > 1
    for query in forced.last_report.queries:
        assert len(bert_tokenizer()(query)["input_ids"]) <= 64


def test_ground_batch(forced, image):
    other = image.resize((30, 70))
    results = forced.ground_batch([image, other], [["cat", "dog"], ["tree"]])
    assert [len(r) for r in results] == [2, 1]
    for det in results[0]:
        _check_detection(det, H, W)
    _check_detection(results[1][0], 70, 30)
    assert [r.phrases for r in forced.last_reports] == [["cat", "dog"], ["tree"]]
    with pytest.raises(ValueError, match="phrase lists"):
        forced.ground_batch([image], [])


class _FixedDino(torch.nn.Module):
    """The tiny model with chosen logits and boxes, to test the label -> phrase assignment."""

    def __init__(self, model, token_probs, boxes):
        super().__init__()
        self.inner, self.config = model, model.config
        self.token_probs, self.boxes = token_probs, boxes

    def forward(self, **inputs):
        out = self.inner(**inputs)
        probs = torch.full_like(out.logits, 1e-4)
        for q, row in enumerate(self.token_probs):
            for token, p in row.items():
                probs[0, q, token] = p
        logits = torch.logit(probs)
        return SimpleNamespace(logits=logits, pred_boxes=self.boxes[None].clone())


def test_labels_assign_boxes_to_phrases(paths, image):
    # query "cat. red dog." -> tokens [CLS]=0 cat=1 .=2 red=3 dog=4 .=5 [SEP]=6
    grounder = GroundingDinoSamGrounder(*paths, box_threshold=0.3, text_threshold=0.25, nms_iou=0.5)
    model, _ = grounder.load()
    n = model.config.num_queries
    token_probs = [{} for _ in range(n)]
    token_probs[0] = {1: 0.9}  # label "cat": exact
    token_probs[1] = {1: 0.8}  # a duplicate of box 0: suppressed by NMS
    token_probs[2] = {1: 0.7}  # a second cat far away: another instance
    token_probs[3] = {4: 0.6}  # label "dog": not a phrase, assigned by its tokens to "red dog"
    token_probs[4] = {2: 0.95}  # label ".": matches no phrase
    boxes = torch.full((n, 4), 0.5)  # cx, cy, w, h in fractions
    boxes[:5] = torch.tensor(
        [
            [0.25, 0.25, 0.2, 0.2],
            [0.26, 0.25, 0.2, 0.2],
            [0.8, 0.8, 0.2, 0.2],
            [0.5, 0.5, 0.4, 0.4],
            [0.1, 0.1, 0.1, 0.1],
        ]
    )
    grounder._model = _FixedDino(model, token_probs, boxes)
    cat, dog, bird = grounder.ground(image, ["cat", "red dog", "bird"])
    report = grounder.last_report
    assert report.boxes_above_threshold == 5
    assert report.instances == {"cat": 2, "red dog": 1}
    assert report.unmatched_labels == ["."]
    assert report.assigned_by_tokens == 1
    assert cat.score == pytest.approx(0.9, abs=1e-4)
    assert cat.box == pytest.approx((0.15, 0.15, 0.35, 0.35), abs=1e-5)
    assert dog.box == pytest.approx((0.3, 0.3, 0.7, 0.7), abs=1e-5)
    assert bird is None and "none labelled with this phrase" in report.missing["bird"]

    grounder.merge_instances = True
    cat, _, _ = grounder.ground(image, ["cat", "red dog", "bird"])
    assert cat.box == pytest.approx((0.15, 0.15, 0.9, 0.9), abs=1e-5)  # union of the two instances
    assert cat.score == pytest.approx(0.9, abs=1e-4)


class _EmptySegmenter:
    def segment(self, image, boxes):
        return [np.zeros((image.height, image.width), dtype=bool) for _ in boxes]

    def to_config(self):
        return {"class": "Empty"}


def test_empty_mask_falls_back_to_the_box(paths, image):
    grounder = GroundingDinoSamGrounder(
        paths[0], segmenter=_EmptySegmenter(), box_threshold=0.0, text_threshold=0.0
    )
    (det,) = grounder.ground(image, ["cat"])
    _check_detection(det, H, W)
    x0, y0 = det.box[:2]
    ys, xs = np.nonzero(det.mask)
    assert xs.min() == int(np.floor(x0 * W)) and ys.min() == int(np.floor(y0 * H))
    assert grounder.last_report.box_masks == ["cat"]


def test_sam_picks_one_mask_per_box(paths, image):
    masks = TransformersSam(paths[1], device="cpu").segment(
        image, np.array([[1, 2, 30, 40], [10, 10, 70, 45]])
    )
    assert len(masks) == 2 and all(m.shape == (H, W) and m.dtype == bool for m in masks)


# ------------------------------------------------------------------------------------------------ config


def test_config_round_trip(paths):
    grounder = GroundingDinoSamGrounder(
        *paths, box_threshold=0.4, text_threshold=0.3, nms_iou=0.6, merge_instances=True, dtype="float32"
    )
    config = grounder.to_config()
    assert json.loads(json.dumps(config)) == config
    assert config["detector"] == str(paths[0]) and config["segmenter"]["model"] == str(paths[1])
    restored = GroundingDinoSamGrounder.from_config(config)
    assert restored.to_config() == config
    assert restored._model is None and restored.segmenter._model is None  # lazy: nothing loaded
    defaults = GroundingDinoSamGrounder().to_config()
    assert defaults["detector"] == "IDEA-Research/grounding-dino-tiny"
    assert defaults["segmenter"]["model"] == "facebook/sam-vit-base"
    assert (defaults["box_threshold"], defaults["text_threshold"], defaults["nms_iou"]) == (0.35, 0.25, 0.5)
    assert GroundingDinoSamGrounder.from_config(defaults).to_config() == defaults


def test_segment_anything_missing_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "segment_anything", None)  # import fails as if not installed
    with pytest.raises(ImportError) as caught:
        SegmentAnythingAdapter("sam_vit_b_01ec64.pth")
    assert str(caught.value) == SEGMENT_ANYTHING_MISSING
    for needed in ("pip install", "segment-anything", "torchvision", "facebook/sam-vit-base"):
        assert needed in str(caught.value)
    config = {"detector": "x", "segmenter": {"class": "SegmentAnythingAdapter", "checkpoint": "sam.pth"}}
    with pytest.raises(ImportError, match="segment_anything"):
        GroundingDinoSamGrounder.from_config(config)
