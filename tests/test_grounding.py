"""Grounder tests on tiny random Grounding DINO and SAM checkpoints loaded through from_pretrained (offline).

Random weights give random boxes: thresholds of 0 force boxes, a box threshold of 1 forces "no box". To test
which box goes to which object, a stub replaces the detection model's outputs with chosen token scores.
"""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import numpy as np
import PIL.Image
import pytest
import torch

from realign_pipeline.captioner.base import (
    Detection,
    Grounder,
    LLMResult,
    ObjectJudgement,
    assign_one_to_one,
    phrase_attributes,
)
from realign_pipeline.captioner.dense import DenseCaptioner
from realign_pipeline.captioner.grounding import (
    SEGMENT_ANYTHING_MISSING,
    GroundingDinoSamGrounder,
    SegmentAnythingAdapter,
    TransformersSam,
    box_nms,
    normalize_phrase,
)
from realign_pipeline.captioner.llm_rules import RuleBasedLLM
from realign_pipeline.shapes.world import ShapeObject, render_scene
from realign_pipeline.testing import bert_tokenizer

H, W = 48, 80  # a non-square image


@pytest.fixture(scope="module")
def paths(tiny_grounding_dino_dir, tiny_sam_dir):
    return str(tiny_grounding_dino_dir), str(tiny_sam_dir)


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


def test_forced_boxes_give_a_detection_per_noun(forced, image):
    for noun in ("cat", "dog", "race car"):  # alone, a noun gets every box
        (det,) = forced.ground(image, [noun])
        _check_detection(det, H, W)
    nouns = ["Cat", "dog", "", "race. car"]
    detections = forced.ground(image, nouns, phrases=["a red cat", "dog", "", None])
    assert len(detections) == len(nouns) and detections[2] is None
    report = forced.last_report
    assert report.nouns == nouns and report.phrases == ["a red cat", "dog", "", "race. car"]
    assert report.queries == ["cat. dog. race car. red."]  # the nouns, then the attribute words on their own
    assert report.boxes_above_threshold == 12  # the tiny model's 12 queries, each to the noun it scores highest
    assert report.missing[""] == "empty noun"
    # random weights: a noun that no box scores highest stays None, with the reason
    for phrase, det in zip(report.phrases, detections):
        if det is None:
            assert phrase in report.missing
        else:
            _check_detection(det, H, W)
    assert sum(det is not None for det in detections) >= 2
    assert set(report.instances) <= {"cat", "dog", "race car"}
    json.dumps(report.to_dict())
    with pytest.raises(ValueError, match="one phrase per noun"):
        forced.ground(image, ["cat"], phrases=[])


def test_high_threshold_gives_none_and_reasons(paths, image):
    grounder = GroundingDinoSamGrounder(*paths, box_threshold=1.0, device="cpu")
    detections, report = grounder.ground_with_report(image, ["cat", "dog"], ["black cat", "dog"])
    assert detections == [None, None]
    assert set(report.missing) == {"black cat", "dog"}
    assert all("box_threshold=1.0" in reason for reason in report.missing.values())
    assert grounder.last_report is report


def test_no_phrases(forced, image):
    assert forced.ground(image, []) == []
    assert forced.last_report.queries == []


def test_long_noun_lists_are_split_into_queries(forced, image):
    phrases = [f"object number {i}" for i in range(30)]  # ~150 tokens > the tiny max_text_len of 64
    detections = forced.ground(image, phrases)
    assert len(detections) == 30
    assert len(forced.last_report.queries) > 1
    for query in forced.last_report.queries:
        assert len(bert_tokenizer()(query)["input_ids"]) <= 64


def test_ground_batch(forced, image):
    other = image.resize((30, 70))
    results = forced.ground_batch([image, other], [["cat", "dog"], ["tree"]], [["cat", "dog"], ["green tree"]])
    assert [len(r) for r in results] == [2, 1]
    for det in results[0]:
        _check_detection(det, H, W)
    _check_detection(results[1][0], 70, 30)
    assert [r.phrases for r in forced.last_reports] == [["cat", "dog"], ["green tree"]]
    assert [r.queries for r in forced.last_reports] == [["cat. dog."], ["tree. green."]]
    with pytest.raises(ValueError, match="noun lists"):
        forced.ground_batch([image], [])
    with pytest.raises(ValueError, match="phrase lists"):
        forced.ground_batch([image], [["cat"]], [])


# ---------------------------------------------------------------------------------------------- nouns, not colours

LEFT, RIGHT = (0.05, 0.3, 0.45, 0.7), (0.55, 0.3, 0.95, 0.7)  # boxes in fractions (x0, y0, x1, y1)
RED_SQUARE_BLUE_CIRCLE = (
    ShapeObject("red", "square", 0.25, 0.5, 0.4),
    ShapeObject("blue", "circle", 0.75, 0.5, 0.4),
)


class _WordDino(torch.nn.Module):
    """A stand-in detection model: box ``q`` gives each query word the probability ``scores[q]`` names.

    Scores follow the words, not token positions, so the stub serves any way of writing the query; like the
    real model on a mis-bound image, the ones below favour the colour words.
    """

    def __init__(self, config, tokenizer, scores: list[dict[str, float]], boxes: list[tuple[float, ...]]):
        super().__init__()
        self.config, self.tokenizer, self.scores = config, tokenizer, scores
        centres = torch.full((config.num_queries, 4), 0.05)  # boxes nobody scores: tiny, in a corner
        for q, (x0, y0, x1, y1) in enumerate(boxes):
            centres[q] = torch.tensor([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0])
        self.centres = centres

    def forward(self, input_ids, **inputs):
        probs = torch.full((len(input_ids), self.config.num_queries, self.config.max_text_len), 1e-4)
        for r, ids in enumerate(input_ids.tolist()):
            for t, word in enumerate(self.tokenizer.convert_ids_to_tokens(ids)):
                for q, row in enumerate(self.scores):
                    probs[r, q, t] = row.get(word, 1e-4)
        boxes = self.centres.expand(len(input_ids), -1, -1)
        return SimpleNamespace(logits=torch.logit(probs), pred_boxes=boxes)


class _BoxSegmenter:
    """Masks that are the boxes themselves: which box an object gets is under test, not SAM."""

    def segment(self, image, boxes):
        masks = []
        for x0, y0, x1, y1 in np.asarray(boxes):
            mask = np.zeros((image.height, image.width), dtype=bool)
            mask[int(y0) : int(np.ceil(y1)), int(x0) : int(np.ceil(x1))] = True
            masks.append(mask)
        return masks

    def to_config(self):
        return {"class": "BoxSegmenter"}


class _FixedTagger:
    def __init__(self, tags):
        self.tags = tags

    def tag(self, images, prompts):
        return [list(self.tags) for _ in images]


@pytest.fixture(scope="module")
def dino_parts(paths):
    model, processor = GroundingDinoSamGrounder(paths[0], device="cpu").load()
    return model.config, processor


def _stubbed(dino_parts, scores, boxes, **kwargs) -> GroundingDinoSamGrounder:
    config, processor = dino_parts
    grounder = GroundingDinoSamGrounder("stub", segmenter=_BoxSegmenter(), device="cpu", **kwargs)
    grounder._model, grounder._processor = _WordDino(config, processor.tokenizer, scores, boxes), processor
    return grounder


def test_objects_are_found_by_their_noun_not_their_colour(dino_parts):
    """The fine stage's own case: "a blue square and a red circle" drawn as a red square and a blue circle."""
    image = render_scene(RED_SQUARE_BLUE_CIRCLE, 64)
    scores = [{"square": 0.5, "red": 0.9}, {"circle": 0.5, "blue": 0.9}]
    grounder = _stubbed(dino_parts, scores, [LEFT, RIGHT])
    captioner = DenseCaptioner(_FixedTagger(["square", "circle"]), RuleBasedLLM(), grounder)
    layout = captioner([image], ["a blue square and a red circle"])[0]
    regions = {region.phrase: region for region in layout.regions}
    assert set(regions) == {"blue square", "red circle"}
    assert regions["blue square"].tag == "square" and regions["blue square"].box == pytest.approx(LEFT)
    assert regions["red circle"].tag == "circle" and regions["red circle"].box == pytest.approx(RIGHT)
    assert np.nonzero(regions["blue square"].mask)[1].max() < 32  # the left half: the square
    report = layout.source["grounding"]
    assert report["queries"] == ["square. circle. blue. red."]  # never "blue square"
    assert report["attribute_scores"] == pytest.approx({"blue square": 1e-4, "red circle": 1e-4})
    assert layout.source["ungrounded_phrases"] == [] and report["missing"] == {}


def test_the_attribute_only_breaks_a_tie_between_boxes_of_one_noun(dino_parts, image):
    # two squares: the left one is the surer square, the right one is bluer; a third box is blue and no square
    scores = [{"square": 0.8, "red": 0.9}, {"square": 0.5, "blue": 0.9}, {"blue": 0.95}]
    grounder = _stubbed(dino_parts, scores, [LEFT, RIGHT, (0.3, 0.0, 0.7, 0.2)])
    (blue,) = grounder.ground(image, ["square"], ["blue square"])
    assert blue.box == pytest.approx(RIGHT) and blue.score == pytest.approx(0.5, abs=1e-4)
    assert grounder.last_report.boxes_without_noun == 1 and grounder.last_report.instances == {"square": 2}
    blue, red = grounder.ground(image, ["square", "square"], ["blue square", "red square"])
    assert blue.box == pytest.approx(RIGHT) and red.box == pytest.approx(LEFT)
    red, blue = grounder.ground(image, ["square", "square"], ["red square", "blue square"])
    assert blue.box == pytest.approx(RIGHT) and red.box == pytest.approx(LEFT)
    (plain,) = grounder.ground(image, ["square"])  # no attribute: the surer square
    assert plain.box == pytest.approx(LEFT)


def test_one_object_goes_to_one_phrase(dino_parts, image):
    # one square: the phrase whose colour it scores higher gets it, the other stays ungrounded
    grounder = _stubbed(dino_parts, [{"square": 0.6, "red": 0.7, "blue": 0.2}], [LEFT])
    blue, red = grounder.ground(image, ["square", "square"], ["blue square", "red square"])
    assert blue is None and red.box == pytest.approx(LEFT)
    assert "went to other phrases" in grounder.last_report.missing["blue square"]
    # two queries on one object, one reading it as a circle and one as a square: the surer noun keeps it
    nudged = (0.56, 0.3, 0.95, 0.71)
    scores = [{"circle": 0.6, "blue": 0.9}, {"square": 0.4, "blue": 0.9}]
    grounder = _stubbed(dino_parts, scores, [RIGHT, nudged])
    square, circle = grounder.ground(image, ["square", "circle"], ["blue square", "red circle"])
    assert square is None and circle.box == pytest.approx(RIGHT)
    assert "object_iou" in grounder.last_report.missing["blue square"]


def test_a_missing_object_stays_ungrounded_however_well_its_colour_scores(dino_parts):
    image = render_scene(RED_SQUARE_BLUE_CIRCLE[1:], 64)  # one blue circle, no square
    scores = [{"circle": 0.5, "blue": 0.9}, {"blue": 0.95, "square": 0.1}]  # box 2: blue, barely square
    grounder = _stubbed(dino_parts, scores, [RIGHT, LEFT])
    captioner = DenseCaptioner(_FixedTagger(["square", "circle"]), RuleBasedLLM(), grounder)
    layout = captioner([image], ["a blue square and a red circle"])[0]
    assert [(r.phrase, r.tag) for r in layout.regions] == [("red circle", "circle")]
    assert layout.regions[0].box == pytest.approx(RIGHT)
    assert layout.source["ungrounded_phrases"] == ["blue square"]
    report = layout.source["grounding"]
    assert "no box of 'square' above box_threshold=0.35" in report["missing"]["blue square"]
    assert report["boxes_without_noun"] == 1


def test_boxes_of_a_noun_are_deduplicated_and_can_be_merged(dino_parts, image):
    scores = [
        {"cat": 0.9},
        {"cat": 0.8},  # a duplicate of box 0: suppressed by NMS
        {"cat": 0.7},  # a second cat far away: another instance
        {"dog": 0.6, "red": 0.9},
        {".": 0.95},  # a separator: no noun, dropped
    ]
    boxes = [(0.15, 0.15, 0.35, 0.35), (0.16, 0.15, 0.36, 0.35), (0.7, 0.7, 0.9, 0.9), (0.3, 0.3, 0.7, 0.7)]
    boxes.append(LEFT)
    grounder = _stubbed(dino_parts, scores, boxes, box_threshold=0.3, text_threshold=0.25, nms_iou=0.5)
    cat, dog, bird = grounder.ground(image, ["cat", "dog", "bird"], ["cat", "red dog", "bird"])
    report = grounder.last_report
    assert (report.boxes_above_threshold, report.boxes_without_noun) == (4, 1)
    assert report.instances == {"cat": 2, "dog": 1}
    assert cat.score == pytest.approx(0.9, abs=1e-4) and cat.box == pytest.approx(boxes[0], abs=1e-5)
    assert dog.box == pytest.approx(boxes[3], abs=1e-5)
    assert report.attribute_scores == pytest.approx({"red dog": 0.9})
    assert bird is None and "no box of 'bird'" in report.missing["bird"]

    grounder.merge_instances = True
    cat, _, _ = grounder.ground(image, ["cat", "dog", "bird"], ["two cats", "red dog", "bird"])
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
    (det,) = grounder.ground(image, ["cat"], ["black cat"])
    _check_detection(det, H, W)
    x0, y0 = det.box[:2]
    ys, xs = np.nonzero(det.mask)
    assert xs.min() == int(np.floor(x0 * W)) and ys.min() == int(np.floor(y0 * H))
    assert grounder.last_report.box_masks == ["black cat"]


def test_sam_picks_one_mask_per_box(paths, image):
    masks = TransformersSam(paths[1], device="cpu").segment(
        image, np.array([[1, 2, 30, 40], [10, 10, 70, 45]])
    )
    assert len(masks) == 2 and all(m.shape == (H, W) and m.dtype == bool for m in masks)


# ------------------------------------------------------------------------------------------------ config


def test_config_round_trip(paths):
    grounder = GroundingDinoSamGrounder(
        *paths, box_threshold=0.4, text_threshold=0.3, nms_iou=0.6, object_iou=0.9, merge_instances=True,
        dtype="float32",
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
    assert defaults["object_iou"] == 0.7
    assert GroundingDinoSamGrounder.from_config(defaults).to_config() == defaults
    saved_before_object_iou = {k: v for k, v in config.items() if k != "object_iou"}
    assert GroundingDinoSamGrounder.from_config(saved_before_object_iou).object_iou == 0.7


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


# ------------------------------------------------------------------------------------------------ protocol


def test_phrase_attributes_and_one_to_one_assignment():
    assert phrase_attributes("square", "a blue square") == ["blue"]
    assert phrase_attributes("cat", "two black cats") == ["two", "black"]
    assert phrase_attributes("dining table", "the wooden dining table") == ["wooden"]
    assert phrase_attributes("cat", None) == phrase_attributes("cat", "cat") == []
    # two phrases, two objects: the attribute decides even against a surer object; one object: one phrase
    assert assign_one_to_one([[(0.1, 0.9), (0.8, 0.5)], [(0.7, 0.9), (0.0, 0.5)]]) == [1, 0]
    assert assign_one_to_one([[(0.2, 0.6)], [(0.7, 0.6)]]) == [None, 0]
    assert assign_one_to_one([[], []]) == [None, None]


def test_the_captioner_grounds_the_tag_and_refuses_a_phrase_grounder():
    class PhraseGrounder:  # the older protocol: ground(image, phrases)
        def ground(self, image, phrases):
            return [None for _ in phrases]

    with pytest.raises(TypeError, match=r"ground\(image, nouns, phrases=None\)"):
        DenseCaptioner(_FixedTagger([]), RuleBasedLLM(), PhraseGrounder())

    calls = []

    class Recorder:
        def ground(self, image, nouns, phrases=None):
            calls.append((list(nouns), list(phrases)))
            return [None for _ in nouns]

    class ColourTagLLM:  # names the phrase for the colour tag too, with the same score
        def judge(self, prompt, tags):
            objects = [ObjectJudgement("blue", 2.0, "blue square"), ObjectJudgement("square", 2.0, "blue square")]
            return LLMResult(objects, {"backend": "test"})

    captioner = DenseCaptioner(_FixedTagger(["blue", "square"]), ColourTagLLM(), Recorder(), add_prompt_objects=False)
    layout = captioner.caption_one(PIL.Image.new("RGB", (8, 8)), "a blue square", ["blue", "square"])
    assert calls == [(["square"], ["blue square"])]  # the noun, not the colour, is what is looked for
    assert layout.source["ungrounded_phrases"] == ["blue square"]
