"""The shapes world generator: seeded, honours the held-out split, captions tell the truth, renders objects."""

from __future__ import annotations

import random
import re

import numpy as np
import pytest

from realign_pipeline.shapes.world import (
    BACKGROUND,
    CAPTION_FORMS,
    COLORS,
    HELD_OUT_PAIRINGS,
    SHAPES,
    ShapeObject,
    all_pairings,
    caption_scene,
    is_held_out,
    render_scene,
    sample_scene,
    shape_mask,
    train_batch,
)
from realign_pipeline.shapes.world import held_out_prompts as world_test_prompts

# The held-out split checked independently of world.is_held_out: a pairing is an unordered pair.
HELD = {frozenset(pair) for pair in HELD_OUT_PAIRINGS}


def _pairing(scene) -> frozenset[tuple[str, str]]:
    return frozenset((o.color, o.shape) for o in scene.objects)


def test_same_seed_same_scenes_and_pixels() -> None:
    rng_a, rng_b = random.Random(7), random.Random(7)
    first = [sample_scene(rng_a) for _ in range(30)]
    second = [sample_scene(rng_b) for _ in range(30)]
    assert [s.to_dict() for s in first] == [s.to_dict() for s in second]
    assert len({s.caption for s in first}) > 20  # and the draws do vary
    images_a, captions_a, _ = train_batch(random.Random(3), 8)
    images_b, captions_b, _ = train_batch(random.Random(3), 8)
    assert captions_a == captions_b
    assert np.array_equal(images_a, images_b)
    images_c, _, _ = train_batch(random.Random(4), 8)
    assert not np.array_equal(images_a, images_c)  # the seed matters


def test_held_out_split_is_honoured() -> None:
    rng = random.Random(0)
    train = [sample_scene(rng, split="train") for _ in range(3000)]
    two = [s for s in train if len(s.objects) == 2]
    assert len(two) > 1500
    assert not any(_pairing(s) in HELD for s in two)
    # training draws cover every allowed pairing, so held-out pairings are absent, not merely rare
    allowed = {frozenset(p) for p in all_pairings()} - HELD
    assert {_pairing(s) for s in two} == allowed

    test = [sample_scene(rng, split="test") for _ in range(200)]
    assert all(_pairing(s) in HELD for s in test)

    assert len(HELD) == len(HELD_OUT_PAIRINGS) == round(0.2 * len(all_pairings()))
    for record in world_test_prompts():
        assert frozenset((o["color"], o["shape"]) for o in record["objects"]) in HELD, record["prompt"]

    # every single coloured object still appears in some training pairing, and in sampled training scenes
    everything = {(c, s) for c in COLORS for s in SHAPES}
    assert {obj for pair in allowed for obj in pair} == everything
    assert {obj for s in two for obj in _pairing(s)} == everything


def test_is_held_out_agrees_with_the_split() -> None:
    for pair in all_pairings():
        objects = tuple(ShapeObject(c, s, 0.25 + 0.5 * i, 0.5, 0.4) for i, (c, s) in enumerate(pair))
        assert is_held_out(objects) == (frozenset(pair) in HELD), pair
    for pair in HELD_OUT_PAIRINGS:
        with pytest.raises(ValueError):
            sample_scene(random.Random(0), split="train", pairing=pair)
        with pytest.raises(ValueError):  # the same pairing named in the other order
            sample_scene(random.Random(0), split="train", pairing=(pair[1], pair[0]))
        flipped = sample_scene(random.Random(0), split="test", pairing=(pair[1], pair[0]))
        assert is_held_out(flipped)


def test_test_prompts_cover_every_form_and_order() -> None:
    records = world_test_prompts()
    assert len(records) == len(HELD_OUT_PAIRINGS) * 2 * len(CAPTION_FORMS)
    assert len({r["prompt"] for r in records}) == len(records)
    for record in records:
        sides = [o["side"] for o in record["objects"]]
        assert sides == ([None, None] if record["form"] in ("and", "with") else ["left", "right"])
        for obj in record["objects"]:
            assert f"{obj['color']} {obj['shape']}" in record["prompt"]


@pytest.mark.parametrize("form", ["left", "right"])
def test_position_captions_name_positions_correctly(form: str) -> None:
    rng = random.Random(11)
    relation = "to the left of" if form == "left" else "to the right of"
    for _ in range(100):
        scene = sample_scene(rng, num_objects=2, form=form)
        left, right = sorted(scene.objects, key=lambda o: o.cx)
        assert left.cx < 0.5 <= right.cx or left.cx <= 0.5 < right.cx  # one object in each half
        match = re.fullmatch(rf"a (\w+ \w+) {relation} a (\w+ \w+)", scene.caption)
        assert match, scene.caption
        first, second = match.groups()
        if form == "left":
            assert (first, second) == (left.phrase, right.phrase)
        else:
            assert (first, second) == (right.phrase, left.phrase)


def test_caption_swap_changes_mention_order_only_for_symmetric_forms() -> None:
    a = ShapeObject("red", "circle", 0.7, 0.5, 0.4)  # mentioned first but on the right
    b = ShapeObject("blue", "square", 0.25, 0.5, 0.4)
    assert caption_scene((a, b), "and") == "a red circle and a blue square"
    assert caption_scene((a, b), "and", swap=True) == "a blue square and a red circle"
    assert caption_scene((a, b), "left") == caption_scene((a, b), "left", swap=True)
    assert caption_scene((a, b), "left") == "a blue square to the left of a red circle"


@pytest.mark.parametrize("size", [32, 64])
def test_render_size_and_objects_visible(size: int) -> None:
    rng = random.Random(5)
    for _ in range(20):
        scene = sample_scene(rng)
        image = np.asarray(render_scene(scene, size))
        assert image.shape == (size, size, 3)
        not_bg = np.abs(image.astype(int) - np.array(BACKGROUND)).sum(-1) > 0
        coverage = sum(shape_mask(o, size) for o in scene.objects)
        # the non-background pixels are exactly where the objects are drawn
        assert np.array_equal(not_bg, coverage > 0)
        for obj in scene.objects:
            full = shape_mask(obj, size) > 0.99
            assert full.sum() > 0.04 * size * size
            assert np.abs(image[full].astype(int) - np.array(COLORS[obj.color])).max() <= 1
