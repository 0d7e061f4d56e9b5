"""Shapes-world perception (segmenter, tagger, grounder, dense captioner) and the independent checker."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

from realign_pipeline.captioner.base import Grounder, Tagger
from realign_pipeline.captioner.dense import DenseCaptioner
from realign_pipeline.captioner.llm_rules import RuleBasedLLM, noun_lexicon
from realign_pipeline.shapes.checker import check_prompt, checker_accuracy, detect, hue_bins
from realign_pipeline.shapes.perception import (
    ShapesGrounder,
    ShapesTagger,
    connected_components,
    segment_objects,
    segmenter_accuracy,
    shapes_dense_captioner,
)
from realign_pipeline.shapes.world import COLORS, SHAPES, ShapeObject, render_scene, shape_mask

torch.set_num_threads(1)


def _scene(*objects: tuple[str, str, float, float, float]) -> tuple[ShapeObject, ...]:
    return tuple(ShapeObject(*o) for o in objects)


RED_CIRCLE_BLUE_SQUARE = _scene(("red", "circle", 0.25, 0.4, 0.45), ("blue", "square", 0.72, 0.6, 0.4))
SWAPPED = _scene(("blue", "circle", 0.25, 0.4, 0.45), ("red", "square", 0.72, 0.6, 0.4))


def _iou(mask: np.ndarray, obj: ShapeObject, size: int) -> float:
    truth = shape_mask(obj, size) >= 0.5
    return float((mask & truth).sum() / (mask | truth).sum())


# ------------------------------------------------------------------------------------------ segmenter
@pytest.mark.parametrize("size", [32, 64])
def test_segmenter_accuracy_on_rendered_scenes(size: int) -> None:
    result = segmenter_accuracy(num_scenes=200, size=size, seed=1)
    assert result["num_objects"] > 250
    assert result["object_accuracy"] >= 0.95, result
    assert result["scene_accuracy"] >= 0.95, result


def test_segmenter_accuracy_sees_a_transform() -> None:
    # a grey image has no colours: the measure must drop, so the numbers above are not vacuous
    result = segmenter_accuracy(num_scenes=20, size=32, transform=lambda im: im.convert("L").convert("RGB"))
    assert result["object_accuracy"] == 0.0 and result["scene_accuracy"] == 0.0


def test_every_colour_and_shape_is_read_with_a_tight_mask() -> None:
    for size in (32, 64):
        for color in COLORS:
            for shape in SHAPES:
                obj = ShapeObject(color, shape, 0.5, 0.5, 12 / 32)  # the smallest size the world draws
                found = segment_objects(render_scene((obj,), size))
                assert [(f.color, f.shape) for f in found] == [(color, shape)], (size, color, shape)
                assert _iou(found[0].mask, obj, size) > 0.85
                assert 0.0 < found[0].score <= 1.0


def test_segment_objects_accepts_arrays_and_blank_images() -> None:
    image = render_scene(RED_CIRCLE_BLUE_SQUARE, 32)
    as_uint8 = np.asarray(image)
    as_float = as_uint8.astype(np.float32) / 255.0
    names = [(f.color, f.shape) for f in segment_objects(image)]
    assert sorted(names) == [("blue", "square"), ("red", "circle")]
    assert [(f.color, f.shape) for f in segment_objects(as_uint8)] == names
    assert [(f.color, f.shape) for f in segment_objects(as_float)] == names
    assert segment_objects(PIL.Image.new("RGB", (48, 40), (235, 235, 235))) == []
    # a non-square image keeps its own mask size
    wide = PIL.Image.new("RGB", (64, 32), (235, 235, 235))
    wide.paste(image, (32, 0))
    found = segment_objects(wide)
    assert len(found) == 2 and found[0].mask.shape == (32, 64)
    assert all(f.box[0] >= 0.5 for f in found)


def test_connected_components_in_numpy() -> None:
    classes = np.full((6, 7), -1)
    classes[0:2, 0:2] = 0  # blob A
    classes[2, 2] = 0  # touches A diagonally: same component (8-connected)
    classes[4:6, 0:2] = 0  # same class, apart: its own component
    classes[0:3, 3] = 1  # touches A's diagonal pixel but another class
    classes[5, 3:7] = 2
    labels = connected_components(classes)
    assert labels[0, 0] == labels[2, 2] != labels[4, 0]
    assert labels[0, 3] != labels[2, 2]
    assert len(np.unique(labels[labels >= 0])) == 4
    assert (labels[classes < 0] == -1).all()


# ------------------------------------------------------------------------------------------ tagger and grounder
def test_tagger_and_grounder_follow_the_protocols() -> None:
    assert isinstance(ShapesTagger(), Tagger) and isinstance(ShapesGrounder(), Grounder)
    images = [render_scene(RED_CIRCLE_BLUE_SQUARE, 32), render_scene(_scene(("green", "cross", 0.5, 0.5, 0.4)), 64)]
    assert ShapesTagger().tag(images, ["", ""]) == [["circle", "square"], ["cross"]]


def test_grounder_finds_the_noun_and_lets_the_colour_only_choose_among_its_shape() -> None:
    image = render_scene(SWAPPED, 32)  # blue circle (left), red square (right)
    circle, square = SWAPPED
    grounder = ShapesGrounder()
    blue_square, red_circle = grounder.ground(image, ["square", "circle"], ["blue square", "red circle"])
    # each phrase goes where its noun is, in whatever colour: that is where the colour must be re-bound
    assert _iou(blue_square.mask, square, 32) > 0.85 and _iou(red_circle.mask, circle, 32) > 0.85
    (blue_circle,) = grounder.ground(image, ["circle"], ["blue circle"])
    assert red_circle.score < blue_circle.score  # a wrong colour is less sure
    assert blue_circle.mask.shape == (32, 32) and blue_circle.mask.dtype == bool
    x0, y0, x1, y1 = blue_circle.box
    assert 0.0 <= x0 < x1 <= 0.5 and 0.0 <= y0 < y1 <= 1.0
    # no triangle: the red square does not stand in for "red triangle"; a colour alone finds nothing
    red_triangle, blue = grounder.ground(image, ["triangle", "blue"], ["red triangle", "blue"])
    assert red_triangle is None and blue is None
    assert grounder.last_report.missing == {
        "red triangle": "no triangle in the image",
        "blue": "'blue' names no shape of this world (circle, square, triangle, cross)",
    }
    (old_style,) = grounder.ground(image, ["red square"])  # a noun with its colour still finds the square
    assert _iou(old_style.mask, square, 32) > 0.85


def test_grounder_gives_one_object_to_one_phrase() -> None:
    two_squares = _scene(("red", "square", 0.25, 0.4, 0.45), ("blue", "square", 0.72, 0.6, 0.4))
    red, blue = two_squares
    grounder = ShapesGrounder()
    (found,) = grounder.ground(render_scene(two_squares, 32), ["square"], ["blue square"])
    assert _iou(found.mask, blue, 32) > 0.85  # the colour breaks the tie between the two squares
    phrases = ["blue square", "red square"]
    blue_square, red_square = grounder.ground(render_scene(two_squares, 32), ["square"] * 2, phrases)
    assert _iou(blue_square.mask, blue, 32) > 0.85 and _iou(red_square.mask, red, 32) > 0.85
    # one red square: it goes to "red square"; "blue square" stays ungrounded rather than share it
    blue_square, red_square = grounder.ground(render_scene(two_squares[:1], 32), ["square"] * 2, phrases)
    assert blue_square is None and _iou(red_square.mask, red, 32) > 0.85
    assert "went to other phrases" in grounder.last_report.missing["blue square"]


def test_dense_captioner_leaves_an_absent_object_ungrounded() -> None:
    """One blue circle: "blue square" must not land on it by its colour, so "red circle" is its only region."""
    only_circle = _scene(("blue", "circle", 0.25, 0.4, 0.45))
    layout = shapes_dense_captioner()([render_scene(only_circle, 32)], ["a blue square and a red circle"])[0]
    assert [(r.phrase, r.tag) for r in layout.regions] == [("red circle", "circle")]
    assert _iou(np.asarray(layout.regions[0].mask, dtype=bool), only_circle[0], 32) > 0.85
    assert layout.source["ungrounded_phrases"] == ["blue square"]
    assert layout.source["grounding"]["missing"] == {"blue square": "no square in the image"}
    # drawn with the colours swapped, each phrase gets the object of its noun
    swapped = shapes_dense_captioner()([render_scene(SWAPPED, 32)], ["a blue square and a red circle"])[0]
    regions = {r.phrase: np.asarray(r.mask, dtype=bool) for r in swapped.regions}
    assert _iou(regions["blue square"], SWAPPED[1], 32) > 0.85
    assert _iou(regions["red circle"], SWAPPED[0], 32) > 0.85


def test_cross_is_a_noun_for_the_rule_based_llm() -> None:
    assert set(SHAPES) <= noun_lexicon()
    judged = RuleBasedLLM().judge("a purple cross to the left of a yellow triangle", ["cross", "triangle", "circle"])
    assert [(o.tag, o.score, o.phrase) for o in judged.objects] == [
        ("cross", 2.0, "purple cross"),
        ("triangle", 2.0, "yellow triangle"),
        ("circle", 0.0, None),
    ]


def test_dense_captioner_layout_covers_the_right_objects() -> None:
    image = render_scene(RED_CIRCLE_BLUE_SQUARE, 32)
    layout = shapes_dense_captioner()([image], ["a red circle and a blue square"])[0]
    regions = {r.phrase: r for r in layout.regions}
    assert set(regions) == {"red circle", "blue square"}
    circle, square = RED_CIRCLE_BLUE_SQUARE
    for phrase, obj, other in (("red circle", circle, square), ("blue square", square, circle)):
        mask = np.asarray(regions[phrase].mask, dtype=bool)
        assert mask.shape == (32, 32)
        assert _iou(mask, obj, 32) > 0.85
        assert not (mask & (shape_mask(other, 32) > 0)).any()
        assert regions[phrase].score == 2.0


def test_dense_captioner_save_and_restore(tmp_path) -> None:
    captioner = shapes_dense_captioner(
        tagger=ShapesTagger(min_area=0.03), grounder=ShapesGrounder(coverage_threshold=0.6, max_residual=70.0)
    )
    captioner.save_pretrained(tmp_path)
    restored = DenseCaptioner.from_pretrained(tmp_path)
    assert isinstance(restored.tagger, ShapesTagger) and isinstance(restored.grounder, ShapesGrounder)
    assert restored.tagger.to_config() == captioner.tagger.to_config()
    assert restored.grounder.to_config() == {"coverage_threshold": 0.6, "max_residual": 70.0, "min_area": 0.02}
    image = render_scene(SWAPPED, 64)
    before = captioner([image], ["a red circle to the left of a blue square"])[0]
    after = restored([image], ["a red circle to the left of a blue square"])[0]
    assert [r.phrase for r in before.regions] == [r.phrase for r in after.regions] == ["red circle", "blue square"]
    for a, b in zip(before.regions, after.regions):
        assert np.array_equal(np.asarray(a.mask), np.asarray(b.mask))


def test_min_area_setting_is_used() -> None:
    small = render_scene(_scene(("red", "circle", 0.5, 0.5, 0.4)), 32)
    assert ShapesTagger().tag([small], [""]) == [["circle"]]
    assert ShapesTagger(min_area=0.5).tag([small], [""]) == [[]]


# ------------------------------------------------------------------------------------------ checker
def test_hue_bins_partition_the_circle_around_the_palette() -> None:
    bins = hue_bins()
    assert sorted(name for name, _, _ in bins) == sorted(COLORS)
    assert sum(hi - lo for _, lo, hi in bins) == pytest.approx(360.0)


@pytest.mark.parametrize("size", [32, 64])
def test_checker_accuracy_on_rendered_scenes(size: int) -> None:
    result = checker_accuracy(num_scenes=200 if size == 32 else 120, size=size, seed=2)
    assert result["object_accuracy"] >= 0.95, result
    assert result["color_accuracy"] >= 0.95 and result["shape_accuracy"] >= 0.95
    assert result["scene_accuracy"] >= 0.95, result


def test_checker_accuracy_applies_the_transform() -> None:
    flipped = checker_accuracy(num_scenes=30, size=32, transform=lambda im: im.transpose(PIL.Image.Transpose.FLIP_TOP_BOTTOM))
    # upside down, triangles read wrong and centres move: the measure must notice
    assert flipped["object_accuracy"] < 0.9


def test_detect_reports_colour_shape_and_position() -> None:
    detected = sorted(detect(render_scene(RED_CIRCLE_BLUE_SQUARE, 64)), key=lambda d: d["cx"])
    assert [(d["color"], d["shape"]) for d in detected] == [("red", "circle"), ("blue", "square")]
    assert detected[0]["cx"] == pytest.approx(0.25, abs=0.03) and detected[1]["cy"] == pytest.approx(0.6, abs=0.03)
    assert detected[1]["area"] == pytest.approx(0.4**2, rel=0.1)
    as_float = np.asarray(render_scene(RED_CIRCLE_BLUE_SQUARE, 64), dtype=np.float32) / 255.0
    assert sorted((d["color"], d["shape"]) for d in detect(as_float)) == [("blue", "square"), ("red", "circle")]


def test_check_prompt_binding_presence_and_position() -> None:
    objects = [
        {"color": "red", "shape": "circle", "side": "left"},
        {"color": "blue", "shape": "square", "side": "right"},
    ]
    right = check_prompt(render_scene(RED_CIRCLE_BLUE_SQUARE, 32), objects)
    assert (right["presence"], right["binding"], right["binding_fraction"], right["position"]) == (1.0, 1.0, 1.0, 1.0)

    swapped = check_prompt(render_scene(SWAPPED, 32), objects)
    assert (swapped["presence"], swapped["binding"], swapped["binding_fraction"]) == (1.0, 0.0, 0.0)
    assert swapped["position"] == 1.0  # the shapes are where the prompt puts them, in the wrong colours

    mirrored = _scene(("blue", "square", 0.28, 0.5, 0.4), ("red", "circle", 0.75, 0.5, 0.4))
    wrong_place = check_prompt(render_scene(mirrored, 32), objects)
    assert (wrong_place["binding"], wrong_place["position"]) == (1.0, 0.0)

    one_missing = check_prompt(render_scene(RED_CIRCLE_BLUE_SQUARE[:1], 32), objects)
    assert (one_missing["presence"], one_missing["binding"], one_missing["binding_fraction"]) == (0.0, 0.0, 0.5)
    assert one_missing["position"] == 0.0

    unordered = [dict(o, side=None) for o in objects]
    assert check_prompt(render_scene(mirrored, 32), unordered)["position"] is None
    half = check_prompt(render_scene(_scene(("red", "circle", 0.25, 0.5, 0.4), ("green", "square", 0.75, 0.5, 0.4)), 32), objects)
    assert (half["presence"], half["binding"], half["binding_fraction"]) == (1.0, 0.0, 0.5)
    assert [(d["color"], d["shape"]) for d in sorted(half["detected"], key=lambda d: d["cx"])] == [
        ("red", "circle"),
        ("green", "square"),
    ]


@pytest.mark.parametrize("shape", SHAPES)
def test_checker_reads_shapes_stretched_as_the_unet_draws_them(shape: str) -> None:
    """The UNet draws some shapes taller than wide (e.g. a 16 x 19 px square); a square template scored such a
    square below a circle. Each shape, drawn 13 px wide and 18 px tall (and the transpose), keeps its name."""
    from realign_pipeline.shapes.world import BACKGROUND

    unit = shape_mask(ShapeObject("red", shape, 0.5, 0.5, 1.0), size=128, supersample=1)
    for width, height in ((13, 18), (18, 13)):
        stretched = PIL.Image.fromarray((unit * 255).astype(np.uint8)).resize((width * 4, height * 4),
                                                                               PIL.Image.Resampling.BOX)
        coverage = np.zeros((128, 128), dtype=np.float32)
        coverage[20:20 + height * 4, 24:24 + width * 4] = np.asarray(stretched, dtype=np.float32) / 255.0
        big = np.asarray(BACKGROUND, float) * (1 - coverage[..., None]) + np.asarray(COLORS["blue"], float) * coverage[..., None]
        image = PIL.Image.fromarray(big.round().astype(np.uint8)).resize((32, 32), PIL.Image.Resampling.BOX)
        found = detect(image)
        assert [(d["color"], d["shape"]) for d in found] == [("blue", shape)], (width, height, found)


def test_checker_keeps_a_nearby_fragment_of_the_same_colour_out_of_the_shape_fit() -> None:
    """A separate same-coloured speck within the rim of a square used to widen its box so it read as a circle."""
    image = np.array(render_scene((ShapeObject("green", "square", 0.5, 0.5, 0.45),)), dtype=np.uint8)
    image[14:17, 6:7] = COLORS["green"]  # a 1 x 3 px fragment 2 px left of the square, not 4-connected to it
    found = detect(image)
    assert ("green", "square") in [(d["color"], d["shape"]) for d in found], found
