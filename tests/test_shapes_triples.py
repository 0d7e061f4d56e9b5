"""The three-object scenes (``realign_pipeline.shapes.triples``): split, geometry, captions, readability."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import pytest

from realign_pipeline.shapes import triples
from realign_pipeline.shapes.checker import check_prompt
from realign_pipeline.shapes.metric import parse_shapes_prompt
from realign_pipeline.shapes.world import COLORS, HELD_OUT_PAIRINGS, SHAPES, held_out_halves, render_scene

TOKENIZER = Path(__file__).parents[1] / "src/realign_pipeline/assets/shapes/pipeline-bow/tokenizer"


def _pairs(objects):
    return {tuple(sorted(p)) for p in itertools.combinations([(o.color, o.shape) for o in objects], 2)}


def test_triples_have_three_colours_and_three_shapes():
    all_triples = triples.all_triples()
    # 10 colour triples x 4 shape triples x 3! assignments
    assert len(all_triples) == len(set(all_triples)) == 10 * 4 * 6
    for t in all_triples:
        assert len({c for c, _ in t}) == 3 and len({s for _, s in t}) == 3
        assert all(c in COLORS and s in SHAPES for c, s in t)


def test_training_scenes_never_show_a_held_out_pairing_and_test_scenes_always_do():
    rng = random.Random(0)
    counts = {1: 0, 2: 0, 3: 0}
    for _ in range(600):
        scene = triples.sample_scene(rng)
        counts[len(scene.objects)] += 1
        assert not (_pairs(scene.objects) & HELD_OUT_PAIRINGS), scene
    assert all(counts.values()) and counts[3] > counts[2] > counts[1]
    for _ in range(100):
        scene = triples.sample_scene(rng, split="test")
        assert len(scene.objects) == 3 and _pairs(scene.objects) & HELD_OUT_PAIRINGS


def test_three_objects_sit_one_per_third_at_the_worlds_sizes():
    rng = random.Random(1)
    for _ in range(200):
        scene = triples.sample_scene(rng, num_objects=3)
        for third, obj in enumerate(scene.objects):
            x0, _, x1, _ = obj.box
            assert third / 3 - 1e-3 <= x0 and x1 <= (third + 1) / 3 + 1e-3
            assert 12 / 48 - 1e-3 <= obj.size <= 16 / 48 + 1e-3


def test_halves_follow_the_pairings_halves():
    a, b = triples.triple_halves()
    pair_a, pair_b = (set(h) for h in held_out_halves())
    assert a and b and not set(a) & set(b)
    assert set(a) | set(b) <= set(triples.held_out_triples())
    for triple in a:
        held = {tuple(sorted(p)) for p in itertools.combinations(triple, 2)} & HELD_OUT_PAIRINGS
        assert held and held <= pair_a
    for triple in b:
        held = {tuple(sorted(p)) for p in itertools.combinations(triple, 2)} & HELD_OUT_PAIRINGS
        assert held and held <= pair_b


def test_prompts_fit_the_text_encoder_and_parse_back():
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(TOKENIZER)
    records = triples.held_out_triple_prompts() + triples.training_triple_prompts()
    assert len(records) == 4 * len(triples.all_triples())
    assert triples.triple_prompts(triples.held_out_triples()[:3]) == triples.held_out_triple_prompts()[:12]
    for record in records:
        assert len(tokenizer(record["prompt"]).input_ids) <= tokenizer.model_max_length
        key = sorted((o["color"], o["shape"], str(o["side"])) for o in record["objects"])
        parsed = sorted((o["color"], o["shape"], str(o["side"])) for o in parse_shapes_prompt(record["prompt"]))
        assert parsed == key, record


def test_relation_captions_are_true_of_their_scene():
    rng = random.Random(2)
    for _ in range(300):
        scene = triples.sample_scene(rng, num_objects=3)
        if scene.form not in ("left", "right"):
            continue
        objects = {f"{o.color} {o.shape}": o for o in scene.objects}
        named = parse_shapes_prompt(scene.caption)
        left = next(o for o in named if o["side"] == "left")
        right = next(o for o in named if o["side"] == "right")
        assert objects[f"{left['color']} {left['shape']}"].cx < objects[f"{right['color']} {right['shape']}"].cx


@pytest.mark.parametrize("seed", [0, 1])
def test_the_checker_reads_rendered_three_object_scenes(seed):
    rng = random.Random(seed)
    for _ in range(40):
        scene = triples.sample_scene(rng, num_objects=3)
        objects = parse_shapes_prompt(scene.caption)
        result = check_prompt(render_scene(scene, triples.RESOLUTION), objects)
        assert result["binding"] == 1.0 and len(result["detected"]) == 3
        if result["position"] is not None:
            assert result["position"] == 1.0


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="split"):
        triples.sample_scene(random.Random(0), split="val")
    with pytest.raises(ValueError, match="three"):
        triples.sample_scene(random.Random(0), num_objects=2, split="test")
    with pytest.raises(ValueError, match="form"):
        triples.triple_prompts(triples.all_triples()[:1], forms=("under",))


def test_the_captioners_segmenter_reads_three_object_scenes():
    from functools import partial

    from realign_pipeline.shapes.perception import segmenter_accuracy

    result = segmenter_accuracy(30, triples.RESOLUTION, seed=3, sample=partial(triples.sample_scene, num_objects=3))
    assert result["num_objects"] == 90 and result["scene_accuracy"] == 1.0
