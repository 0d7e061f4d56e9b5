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


def test_grounder_prefers_exact_then_shape_then_colour() -> None:
    image = render_scene(SWAPPED, 32)  # blue circle (left), red square (right)
    circle, square = SWAPPED
    exact, wrong_colour, colour_only, absent, blue = ShapesGrounder().ground(
        image, ["blue circle", "red circle", "red triangle", "yellow triangle", "blue"]
    )
    assert _iou(exact.mask, circle, 32) > 0.85
    # "red circle": no red circle, but the circle is where the noun is, so the colour can be re-bound there
    assert _iou(wrong_colour.mask, circle, 32) > 0.85
    assert wrong_colour.score < exact.score
    # "red triangle": no triangle at all, so the red object
    assert _iou(colour_only.mask, square, 32) > 0.85
    assert colour_only.score < wrong_colour.score
    assert absent is None
    assert _iou(blue.mask, circle, 32) > 0.85
    assert exact.mask.shape == (32, 32) and exact.mask.dtype == bool
    x0, y0, x1, y1 = exact.box
    assert 0.0 <= x0 < x1 <= 0.5 and 0.0 <= y0 < y1 <= 1.0


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
