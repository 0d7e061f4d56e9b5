"""Relation correction (beyond the paper, after SLD): the geometry, the rule-based parser, and the captioner.

The chat backends' relations instruction is tested against the loopback chat server in tests/test_llm.py.
"""

from __future__ import annotations

import json

import numpy as np
import PIL.Image
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from realign_pipeline.captioner.base import (
    Detection,
    LLMResult,
    ObjectJudgement,
    RelationFinder,
    RelationResult,
)
from realign_pipeline.captioner.dense import DenseCaptioner
from realign_pipeline.captioner.llm_rules import RuleBasedLLM, prompt_relations, relation_name
from realign_pipeline.captioner.relations import (
    RELATIONS,
    Relation,
    box_centre,
    correct_layout,
    correct_pair,
    mask_extent,
    region_box,
    relation_holds,
    translate_mask,
)
from realign_pipeline.layout import Layout, Region


def region(phrase: str, box, size=(32, 48), soft: bool = False) -> Region:
    """A region whose mask fills its box on a (height, width) grid (a ramp of values when `soft`)."""
    height, width = size
    x0, y0, x1, y1 = box
    mask = np.zeros((height, width), dtype=np.float32 if soft else bool)
    rows, cols = slice(round(y0 * height), round(y1 * height)), slice(round(x0 * width), round(x1 * width))
    if soft:
        block = mask[rows, cols]
        mask[rows, cols] = np.linspace(0.2, 1.0, block.size, dtype=np.float32).reshape(block.shape)
    else:
        mask[rows, cols] = True
    return Region(phrase, mask=mask, box=box, tag=phrase.split()[-1], source={"detection_score": 0.9})


def assert_moved_rigidly(before: Region, after: Region, axis: int) -> None:
    """Same values, same size; mask and box moved by the same whole number of cells, only along `axis`."""
    height, width = before.mask.shape
    cells = (width, height)[axis]
    assert after.mask.shape == before.mask.shape
    assert sorted(after.mask.flatten().tolist()) == sorted(before.mask.flatten().tolist())  # nothing lost or made
    shift = (after.box[axis] - before.box[axis]) * cells
    assert shift == pytest.approx(round(shift), abs=1e-6)
    assert after.box[axis + 2] - after.box[axis] == pytest.approx(before.box[axis + 2] - before.box[axis])
    assert after.box[1 - axis] == before.box[1 - axis] and after.box[3 - axis] == before.box[3 - axis]
    moved = translate_mask(before.mask, round(shift) if axis == 0 else 0, round(shift) if axis == 1 else 0)
    assert torch.equal(after.mask, moved)
    assert all(0.0 <= v <= 1.0 for v in after.box)


# ------------------------------------------------------------------------------------------------ geometry
@pytest.mark.parametrize(
    "relation, subject_box, object_box, holds",
    [
        ("left of", (0.1, 0.2, 0.3, 0.4), (0.6, 0.2, 0.9, 0.4), True),
        ("left of", (0.6, 0.2, 0.9, 0.4), (0.1, 0.2, 0.3, 0.4), False),
        ("right of", (0.6, 0.2, 0.9, 0.4), (0.1, 0.2, 0.3, 0.4), True),
        ("above", (0.4, 0.0, 0.6, 0.3), (0.0, 0.5, 1.0, 1.0), True),  # y grows downwards
        ("above", (0.4, 0.6, 0.6, 0.9), (0.0, 0.0, 1.0, 0.5), False),
        ("below", (0.4, 0.6, 0.6, 0.9), (0.0, 0.0, 1.0, 0.5), True),
        ("left of", (0.2, 0.2, 0.6, 0.6), (0.3, 0.3, 0.5, 0.5), False),  # equal centres satisfy nothing
    ],
)
def test_relation_holds_compares_box_centres_on_the_relations_axis(relation, subject_box, object_box, holds):
    assert relation_holds(subject_box, relation, object_box) is holds


def test_a_violated_left_of_is_swapped_and_the_masks_move_with_their_boxes():
    book, vase, cat = region("red book", (0.6, 0.1, 0.9, 0.5)), region("yellow vase", (0.05, 0.3, 0.4, 0.9)), \
        Region("cat", box=(0.4, 0.0, 0.5, 0.1))
    layout = Layout([book, vase, cat], source={"tags": ["book"]})
    out, records = correct_layout(layout, [Relation("red book", "left of", "yellow vase", "to the left of")])
    new_book, new_vase, new_cat = out.regions
    assert relation_holds(new_book.box, "left of", new_vase.box)
    # Swapped: each centre goes (to a mask cell) where the other's was; sizes, rows and values unchanged.
    assert box_centre(new_book.box)[0] == pytest.approx(box_centre(vase.box)[0], abs=0.5 / 48)
    assert box_centre(new_vase.box)[0] == pytest.approx(box_centre(book.box)[0], abs=0.5 / 48)
    assert_moved_rigidly(book, new_book, axis=0)
    assert_moved_rigidly(vase, new_vase, axis=0)
    assert new_cat is cat and out.source is layout.source  # regions no relation names are left as they are
    assert (new_book.phrase, new_book.score, new_book.tag) == (book.phrase, book.score, book.tag)
    assert new_book.source["detection_score"] == 0.9
    assert new_book.source["relation_correction"]["action"] == "swapped"
    [record] = records
    assert record["status"] == "corrected" and record["action"] == "swapped" and record["holds_after"] is True
    assert record["old_boxes"] == {"red book": [0.6, 0.1, 0.9, 0.5], "yellow vase": [0.05, 0.3, 0.4, 0.9]}
    assert record["new_boxes"]["red book"] == [round(v, 6) for v in new_book.box]
    assert Layout.from_json(out.to_json()).regions[0].box == pytest.approx(new_book.box)
    json.dumps(records)


def test_a_satisfied_relation_changes_nothing():
    book, vase = region("red book", (0.05, 0.3, 0.4, 0.9)), region("yellow vase", (0.6, 0.1, 0.9, 0.5))
    layout = Layout([book, vase])
    out, records = correct_layout(layout, [Relation("red book", "left of", "yellow vase"),
                                           Relation("yellow vase", "right of", "red book")])
    assert out.regions[0] is book and out.regions[1] is vase
    assert [r["status"] for r in records] == ["satisfied", "satisfied"]
    assert all(r["holds_after"] for r in records) and "old_boxes" not in records[0]


@pytest.mark.parametrize("relation, subject_y, object_y", [("above", 0.6, 0.1), ("below", 0.1, 0.6)])
def test_above_and_below_move_on_the_y_axis(relation, subject_y, object_y):
    subject = region("bird", (0.1, subject_y, 0.4, subject_y + 0.3), size=(40, 24))
    obj = region("car", (0.5, object_y, 0.9, object_y + 0.25), size=(40, 24))
    out, [record] = correct_layout(Layout([subject, obj]), [Relation("bird", relation, "car")])
    assert record["status"] == "corrected" and relation_holds(out[0].box, relation, out[1].box)
    assert_moved_rigidly(subject, out[0], axis=1)
    assert_moved_rigidly(obj, out[1], axis=1)


def test_soft_masks_of_other_sizes_and_box_only_regions_move_too():
    soft = region("red book", (0.5, 0.25, 1.0, 0.75), size=(16, 20), soft=True)
    box_only = Region("yellow vase", box=(0.0, 0.4, 0.3, 0.6))
    out, [record] = correct_layout(Layout([soft, box_only]), [Relation("red book", "left of", "yellow vase")])
    assert record["action"] == "swapped" and relation_holds(out[0].box, "left of", out[1].box)
    assert_moved_rigidly(soft, out[0], axis=0)
    assert out[1].mask is None and out[1].box == pytest.approx((0.6, 0.4, 0.9, 0.6))


def test_a_region_at_the_edge_stays_inside_and_keeps_every_mask_cell():
    # A swap would put the wide book's centre at 0.9, pushing it past the right edge: it stops at the edge.
    wide = region("red book", (0.3, 0.0, 0.9, 0.5))
    narrow = region("yellow vase", (0.8, 0.5, 1.0, 1.0))
    mask = wide.mask.clone()
    mask[20, 47] = 1  # the mask reaches past its box: it limits the move as well
    wide = Region("red book", mask=mask, box=wide.box)
    out, [record] = correct_layout(Layout([narrow, wide]), [Relation("yellow vase", "left of", "red book")])
    assert record["status"] == "corrected" and record["holds_after"]
    assert out[1].mask.sum() == mask.sum() and out[0].mask.sum() == narrow.mask.sum()
    for moved in out:
        assert all(0 <= v <= 1 for v in moved.box)
        assert mask_extent(moved.mask)[2] <= 1.0


def test_equal_centres_are_moved_apart_and_full_width_regions_are_not_corrected():
    inner, outer = Region("cup", box=(0.3, 0.3, 0.5, 0.5)), Region("plate", box=(0.2, 0.2, 0.6, 0.6))
    s, o, action, reason = correct_pair(inner, "left of", outer)
    assert action == "moved apart" and reason is None
    assert s.box == pytest.approx((0.0, 0.3, 0.2, 0.5)) and o.box == pytest.approx((0.6, 0.2, 1.0, 0.6))
    wide_a, wide_b = Region("sky", box=(0, 0, 1, 0.5)), Region("sea", box=(0, 0.5, 1, 1))
    s, o, action, reason = correct_pair(wide_a, "right of", wide_b)
    assert action == "not corrected" and "span the width" in reason and s is wide_a and o is wide_b


def test_relations_naming_no_region_or_two_regions_are_reported_not_guessed():
    twins = Layout([Region("cube", box=(0.6, 0, 0.9, 0.3)), Region("cube", box=(0.1, 0, 0.3, 0.3)),
                    Region("ball", box=(0.0, 0.5, 0.2, 0.7))])
    out, records = correct_layout(twins, [Relation("cube", "left of", "ball"), Relation("ball", "above", "dog")])
    assert [r["status"] for r in records] == ["not corrected"] * 2
    assert records[0]["reason"] == "'cube' names 2 regions of the layout"
    assert records[1]["reason"] == "'dog' names no region of the layout" and records[1]["holds_after"] is None
    assert all(a is b for a, b in zip(out, twins))


def test_translate_mask_shifts_by_whole_cells_and_fills_zeros():
    mask = torch.arange(12, dtype=torch.float32).reshape(3, 4) / 11
    moved = translate_mask(mask, 1, -1)
    assert torch.equal(moved[:2, 1:], mask[1:, :3]) and moved[2].sum() == 0 and moved[:, 0].sum() == 0
    assert translate_mask(mask, 4, 0).sum() == 0


def test_relation_names_are_checked():
    assert RELATIONS == ("left of", "right of", "above", "below")
    with pytest.raises(ValueError, match="unknown relation"):
        Relation("a", "next to", "b")


boxes = st.tuples(st.floats(0, 0.9), st.floats(0, 0.9), st.floats(0.05, 1.0), st.floats(0.05, 1.0)).map(
    lambda t: (t[0], t[1], min(1.0, t[0] + t[2]), min(1.0, t[1] + t[3])))


@settings(max_examples=60, deadline=None)
@given(boxes, boxes, st.sampled_from(RELATIONS))
def test_any_correction_holds_or_says_why_and_only_translates(box_a, box_b, relation):
    a, b = region("a", box_a, size=(10, 12)), region("b", box_b, size=(10, 12))
    if not (a.mask.any() and b.mask.any()):
        return
    s, o, action, reason = correct_pair(a, relation, b)
    if action == "not corrected":
        assert reason and s is a and o is b
        return
    assert relation_holds(region_box(s), relation, region_box(o))
    axis = 0 if relation in ("left of", "right of") else 1
    for before, after in ((a, s), (b, o)):
        if after is not before:
            assert_moved_rigidly(before, after, axis)


# ---------------------------------------------------------------------------------------- rule-based parser
@pytest.mark.parametrize(
    "prompt, phrases, expected",
    [
        ("a red book to the left of a yellow vase", ["red book", "yellow vase"],
         [("red book", "left of", "yellow vase", "to the left of")]),
        ("A blue square to the right of a red circle", ["blue square", "red circle"],
         [("blue square", "right of", "red circle", "to the right of")]),
        ("a cat under a table", ["cat", "table"], [("cat", "below", "table", "under")]),
        ("a lamp on top of a desk", ["lamp", "desk"], [("lamp", "above", "desk", "on top of")]),
        ("a dog sitting on the left side of a horse", ["dog", "horse"],
         [("dog", "left of", "horse", "on the left side of")]),
        ("a red book to the left of a yellow vase", ["book", "vase"], [("book", "left of", "vase", "to the left of")]),
        ("a kite above a boat, and a fish beneath the boat", ["kite", "boat", "fish"],
         [("kite", "above", "boat", "above"), ("fish", "below", "boat", "beneath")]),
        ("a cup LEFT  OF a plate", ["cup", "plate"], [("cup", "left of", "plate", "LEFT OF")]),
        ("a red book and a yellow vase", ["red book", "yellow vase"], []),
        ("a cat next to a dog", ["cat", "dog"], []),  # no image axis
    ],
)
def test_rule_parser_finds_relations_between_layout_phrases(prompt, phrases, expected):
    found, unresolved = prompt_relations(prompt, phrases)
    assert [(r.subject, r.relation, r.object, r.words) for r in found] == expected and unresolved == []


@pytest.mark.parametrize(
    "prompt, phrases, reason",
    [
        ("a cat under a table", ["cat"], "'table' is not a phrase of the layout"),
        ("a red book to the left of a yellow vase", ["yellow vase"], "'red book' is not a phrase of the layout"),
        ("a red book to the left of a yellow vase", ["red book", "chair"], "'yellow vase' is not a phrase"),
        ("to the left of a vase", ["vase"], "no object is named before 'to the left of'"),
        ("a cat sleeping under", ["cat"], "no object is named after 'under'"),
    ],
)
def test_rule_parser_reports_relations_about_objects_that_are_not_regions(prompt, phrases, reason):
    found, unresolved = prompt_relations(prompt, phrases)
    assert found == [] and len(unresolved) == 1 and reason in unresolved[0]["reason"]


def test_rule_based_llm_relations_and_names():
    result = RuleBasedLLM().relations("a cat under a table", ["cat", "table"])
    assert isinstance(result, RelationResult) and isinstance(RuleBasedLLM(), RelationFinder)
    assert result.relations == [Relation("cat", "below", "table", "under")]
    assert result.source == {"backend": "rule", "model": None, "fallback": False, "reason": None, "raw": None,
                             "attempts": 0}
    assert relation_name("To the  LEFT of") == "left of" and relation_name("right_of") == "right of"
    assert relation_name("beneath") == "below" and relation_name("near") is None


# --------------------------------------------------------------------------------------- the captioner
PROMPT = "a red book to the left of a yellow vase"
WRONG = {"red book": (0.55, 0.2, 0.95, 0.8), "yellow vase": (0.05, 0.1, 0.45, 0.9)}  # the book drawn right


class NounTagger:
    def tag(self, images, prompts):
        return [["book", "vase", "table"] for _ in prompts]

    def to_config(self):
        return {}

    @classmethod
    def from_config(cls, config):
        return cls()


class LookupLLM:
    """Score 2 and the '<colour> <noun>' phrase for tags in the prompt; no relations() method."""

    def judge(self, prompt, tags):
        words = prompt.split()
        return LLMResult([ObjectJudgement(t, 2.0, " ".join(words[words.index(t) - 1: words.index(t) + 1]))
                          if t in words else ObjectJudgement(t, 0.0, None) for t in tags], {"backend": "lookup"})

    def to_config(self):
        return {}

    @classmethod
    def from_config(cls, config):
        return cls()


class BoxGrounder:
    """A fixed box (and the mask filling it) per phrase."""

    def __init__(self, boxes=None):
        self.boxes = {k: tuple(v) for k, v in (boxes or WRONG).items()}

    def ground(self, image, nouns, phrases=None):
        width, height = image.size
        out = []
        for phrase in phrases:
            if phrase not in self.boxes:
                out.append(None)
                continue
            x0, y0, x1, y1 = self.boxes[phrase]
            mask = np.zeros((height, width), dtype=bool)
            mask[round(y0 * height): round(y1 * height), round(x0 * width): round(x1 * width)] = True
            out.append(Detection(box=(x0, y0, x1, y1), mask=mask, score=0.9))
        return out

    def to_config(self):
        return {"boxes": {k: list(v) for k, v in self.boxes.items()}}

    @classmethod
    def from_config(cls, config):
        return cls(**config)


IMAGE = PIL.Image.new("RGB", (40, 24))


def test_captioner_corrects_by_default_and_leaves_the_layout_alone_when_told():
    assert DenseCaptioner(NounTagger(), RuleBasedLLM(), BoxGrounder()).correct_relations is True
    captioner = DenseCaptioner(NounTagger(), RuleBasedLLM(), BoxGrounder(), correct_relations=False)
    layout = captioner([IMAGE], [PROMPT])[0]
    assert {r.phrase: r.box for r in layout} == WRONG and "relations" not in layout.source


@pytest.mark.parametrize("llm", [RuleBasedLLM(), LookupLLM()], ids=["rule-llm", "llm-without-relations"])
def test_captioner_corrects_a_violated_relation_when_asked(llm):
    layout = DenseCaptioner(NounTagger(), llm, BoxGrounder(), correct_relations=True)([IMAGE], [PROMPT])[0]
    book, vase = (next(r for r in layout if r.phrase == p) for p in ("red book", "yellow vase"))
    assert relation_holds(book.box, "left of", vase.box)
    assert box_centre(book.box)[0] < 0.5 < box_centre(vase.box)[0] and book.box[1::2] == WRONG["red book"][1::2]
    assert book.mask.sum() == round(0.4 * 40) * round(0.6 * 24)  # moved, not resized
    assert mask_extent(book.mask)[0] == pytest.approx(book.box[0], abs=1 / 40)
    record = layout.source["relations"]
    assert record["corrected"] == 1 and record["reason"] is None and record["unresolved"] == []
    [entry] = record["relations"]
    assert (entry["subject"], entry["relation"], entry["object"], entry["status"], entry["action"]) == (
        "red book", "left of", "yellow vase", "corrected", "swapped")
    assert entry["old_boxes"]["red book"] == list(WRONG["red book"])
    assert ("note" in record["parser"]) is isinstance(llm, LookupLLM)  # the rules stood in for it
    assert Layout.from_json(layout.to_json()).source == json.loads(json.dumps(layout.source))


@pytest.mark.parametrize(
    "prompt, boxes, reason",
    [
        (PROMPT, {"red book": (0.05, 0.1, 0.45, 0.9), "yellow vase": (0.55, 0.2, 0.95, 0.8)},
         "every relation the prompt states already holds"),
        ("a red book and a yellow vase", WRONG, "the prompt states no spatial relation between two regions"),
        (PROMPT, {"red book": WRONG["red book"]}, "do not name two regions"),
    ],
    ids=["satisfied", "no-relation", "vase-not-grounded"],
)
def test_captioner_says_why_nothing_was_corrected(prompt, boxes, reason):
    plain = DenseCaptioner(NounTagger(), RuleBasedLLM(), BoxGrounder(boxes))([IMAGE], [prompt])[0]
    layout = DenseCaptioner(NounTagger(), RuleBasedLLM(), BoxGrounder(boxes), correct_relations=True)(
        [IMAGE], [prompt])[0]
    assert layout.source["relations"]["corrected"] == 0 and reason in layout.source["relations"]["reason"]
    assert [(r.phrase, r.box) for r in layout] == [(r.phrase, r.box) for r in plain]
    assert all(torch.equal(a.mask, b.mask) for a, b in zip(layout, plain))


def test_the_setting_is_saved_and_old_configs_load_with_it_off(tmp_path):
    captioner = DenseCaptioner(NounTagger(), RuleBasedLLM(), BoxGrounder(), correct_relations=True)
    config = captioner.to_config()
    assert config["correct_relations"] is True
    captioner.save_pretrained(tmp_path)
    assert DenseCaptioner.from_pretrained(tmp_path).correct_relations is True
    old = {k: v for k, v in config.items() if k != "correct_relations"}
    assert DenseCaptioner.from_config(old).correct_relations is False
