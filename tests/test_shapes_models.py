"""The shipped shapes-world models: they load through from_pretrained and do what they were trained for.

Thresholds are set well above chance (the numbers the shipped models reach are in docs/shapes.md), so a
broken model, a wrong scheduler or a mis-wired loader fails them.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from realign_pipeline import RealignDiffPipeline
from realign_pipeline.shapes.checker import detect
from realign_pipeline.shapes.pretrained import SHAPES_MODELS, load_shapes_pipeline, shapes_model_path
from realign_pipeline.shapes.world import COLORS, SHAPES, held_out_prompts, render_scene, sample_scene


@pytest.fixture(scope="module")
def pipe():
    pipe = load_shapes_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_every_model_is_shipped_and_small():
    sizes = {}
    for name in SHAPES_MODELS:
        path = shapes_model_path(name)
        sizes[name] = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        for weights in path.rglob("*.safetensors"):
            from safetensors import safe_open

            with safe_open(str(weights), "pt") as f:
                dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118 (not a dict)
            assert dtypes <= {"F16", "I64"}, (weights, dtypes)
    assert sum(size for name, size in sizes.items() if name not in ("pipeline-bow", "pipeline-triples")) < 60e6
    assert sizes["pipeline-bow"] < 25e6  # the second world ships only its pipeline
    assert sizes["pipeline-triples"] < 25e6  # and so does the third


def test_plain_from_pretrained_gives_float32_and_the_shapes_captioner():
    pipe = RealignDiffPipeline.from_pretrained(shapes_model_path("pipeline"))
    assert {pipe.unet.dtype, pipe.vae.dtype, pipe.text_encoder.dtype} == {torch.float32}
    assert type(pipe.dense_captioner.tagger).__name__ == "ShapesTagger"
    assert type(pipe.dense_captioner.grounder).__name__ == "ShapesGrounder"
    assert pipe.tokenizer.model_max_length == pipe.text_encoder.config.max_position_embeddings == 16


def test_single_objects_are_drawn_far_more_often_than_chance(pipe):
    prompts = [f"a {color} {shape}" for color in COLORS for shape in SHAPES]
    images = pipe(prompts, height=32, width=32, num_inference_steps=20,
                  generator=torch.Generator().manual_seed(0)).images
    shape_hits = pair_hits = 0
    for prompt, image in zip(prompts, images):
        color, shape = prompt.split()[1:]
        found = detect(image)
        shape_hits += any(d["shape"] == shape for d in found)
        pair_hits += any(d["shape"] == shape and d["color"] == color for d in found)
    # chance: 1/4 for the shape, 1/20 for the colored shape
    assert shape_hits / len(prompts) >= 0.5
    assert pair_hits / len(prompts) >= 0.4


def test_realign_runs_end_to_end_on_a_held_out_prompt(pipe):
    prompt = held_out_prompts(("left",))[0]["prompt"]
    out = pipe(prompt, realign=True, height=32, width=32, num_inference_steps=10,
               generator=torch.Generator().manual_seed(0))
    assert out.coarse_images and out.images[0].size == (32, 32)
    assert out.realigned == [True]  # the segmenter found the prompt's objects in the coarse image
    phrases = {r.phrase for r in out.layouts[0].regions}
    assert phrases and all(p in prompt for p in phrases)


def test_clip_prefers_the_true_caption_over_a_color_swap():
    from transformers import CLIPModel, CLIPProcessor

    path = shapes_model_path("clip")
    model, processor = CLIPModel.from_pretrained(path).eval(), CLIPProcessor.from_pretrained(path)
    rng = random.Random(3)
    scenes = [sample_scene(rng, num_objects=2) for _ in range(40)]
    swapped = []
    for scene in scenes:
        a, b = scene.objects
        swapped.append(scene.caption.replace(a.color, "@").replace(b.color, a.color).replace("@", b.color))
    inputs = processor(text=[s.caption for s in scenes] + swapped, images=[render_scene(s) for s in scenes],
                       return_tensors="pt", padding="max_length", max_length=16)
    with torch.no_grad():
        logits = model(**inputs).logits_per_image
    n = len(scenes)
    wins = (logits[torch.arange(n), torch.arange(n)] > logits[torch.arange(n), n + torch.arange(n)]).float().mean()
    assert wins >= 0.8


def test_blip2_captioner_names_the_objects_it_sees():
    from realign_pipeline.rewards import CaptionReward

    reward = CaptionReward(captioner=str(shapes_model_path("blip2-captioner")),
                           text_encoder=str(shapes_model_path("blip2-itm")))
    rng = random.Random(4)
    scenes = [sample_scene(rng, num_objects=1) for _ in range(20)]
    captions = reward.captions([render_scene(s) for s in scenes])
    right = [s.objects[0].phrase in c for s, c in zip(scenes, captions)]
    assert np.mean(right) >= 0.7, list(zip([s.caption for s in scenes], captions))
    scores = reward.score([render_scene(s) for s in scenes], [s.caption for s in scenes])
    wrong = reward.score([render_scene(s) for s in scenes], [s.caption for s in scenes[1:] + scenes[:1]])
    assert scores.mean() > wrong.mean()


def _cli(argv: list[str], capsys) -> str:
    """``realigndiff *argv`` through the console script's ``main`` in this process (the entry point in a fresh
    process is tests/test_cli.py::test_demo_as_a_user_runs_it); returns what it printed to stdout."""
    from realign_pipeline.cli import main

    capsys.readouterr()
    code = main(argv)
    printed = capsys.readouterr()
    assert code == 0, printed.err[-3000:]
    return printed.out


def test_generate_with_the_shapes_model_uses_its_own_captioner(tmp_path, capsys):
    stdout = _cli(["generate", "a blue circle and a yellow square", "--model", "shapes", "--steps", "10", "--height",
                   "32", "--width", "32", "--out", str(tmp_path), "-q"], capsys)
    assert "using the dense captioner saved with the model" in stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["mode"] == "realign"
    folder = Path(summary["prompts"][0]["folder"])
    assert (folder / "image.png").exists() and (folder / "coarse.png").exists()


def test_the_demo_draws_real_pictures_of_the_shapes_world(tmp_path, capsys):
    import PIL.Image

    stdout = _cli(["demo", "--out", str(tmp_path), "-q"], capsys)
    assert "what the checker sees" in stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["world"] == "shapes" and len(summary["images"]) == 4
    assert all(row["phrases"] for row in summary["images"])  # the captioner found the objects
    panel = np.asarray(PIL.Image.open(tmp_path / "panel.png").convert("RGB"), dtype=float)
    assert panel.shape[0] > 4 * 160 and panel.std() > 10  # four rows of 160-px cells, not blank
    maps = np.asarray(PIL.Image.open(tmp_path / "attention_maps.png").convert("RGB"), dtype=float)
    assert maps.std() > 10
    for seed in summary["seeds"]:
        image = PIL.Image.open(tmp_path / f"realigned_{seed}.png")
        assert image.size == (32, 32)
    # without --seed it shows seeds whose plain image is wrong (tests/test_shapes_demo.py checks the rule closely)
    from realign_pipeline.shapes.checker import check_prompt
    from realign_pipeline.shapes.metric import parse_shapes_prompt

    selection = summary["seed_selection"]
    assert selection["searched"] == [0, 31] and selection["wrong_count"] >= 4 and selection["filled"] == []
    objects = parse_shapes_prompt(summary["prompt"])
    for seed in summary["seeds"]:
        reading = check_prompt(PIL.Image.open(tmp_path / f"coarse_{seed}.png").convert("RGB"), objects)
        assert reading["binding"] == 0 or reading["position"] == 0, seed
    assert summary["measured_rates"]["binding"]["base_wrong"] > 0 and "measured on" in stdout
    assert (tmp_path / "layout_control.png").exists() and "plain" in summary["layout_control"]


def test_the_demo_takes_a_prompt_outside_the_caption_forms(tmp_path, capsys):
    stdout = _cli(["demo", "--prompt", "a red square above a green circle", "--out", str(tmp_path), "--steps", "5",
                   "-q"], capsys)
    assert "judges only the world's caption forms" in stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert all(row["coarse"]["binding"] is None and isinstance(row["coarse"]["seen"], list) for row in summary["images"])


def test_the_second_world_loads_like_the_first_with_its_own_text_encoder():
    """shapes-bow: the same VAE and captioner, a text encoder trained without colour-swapped negatives and a
    UNet trained on it, through the same from_pretrained path; it draws what it is asked far above chance."""
    bow = load_shapes_pipeline(world="shapes-bow")
    bow.set_progress_bar_config(disable=True)
    first = RealignDiffPipeline.from_pretrained(shapes_model_path("pipeline"))
    assert {bow.unet.dtype, bow.vae.dtype, bow.text_encoder.dtype} == {torch.float32}
    assert type(bow.dense_captioner.grounder).__name__ == "ShapesGrounder"
    vae, first_vae = bow.vae.state_dict(), first.vae.state_dict()
    assert all(torch.equal(vae[k], first_vae[k]) for k in vae)
    first_text = first.text_encoder.state_dict()
    assert any(not torch.equal(v, first_text[k]) for k, v in bow.text_encoder.state_dict().items())
    with pytest.raises(ValueError, match="shapes-bow"):
        load_shapes_pipeline(world="shapes-3")
    prompts = [f"a {color} {shape}" for color in COLORS for shape in SHAPES]
    images = bow(prompts, height=32, width=32, num_inference_steps=10, guidance_scale=4.0,
                 generator=torch.Generator().manual_seed(0)).images
    hits = sum(any(d["shape"] == p.split()[2] and d["color"] == p.split()[1] for d in detect(image))
               for p, image in zip(prompts, images))
    assert hits / len(prompts) >= 0.4  # chance: 1/20


def test_the_third_world_draws_three_object_scenes_at_48_px():
    """shapes-triples: the second world's VAE and frozen text encoder, a UNet trained on three-object scenes at
    48 px, through the same from_pretrained path; its default size is 48 and it draws what it is asked."""
    triples = load_shapes_pipeline(world="shapes-triples")
    triples.set_progress_bar_config(disable=True)
    bow = RealignDiffPipeline.from_pretrained(shapes_model_path("pipeline-bow"))
    assert {triples.unet.dtype, triples.vae.dtype, triples.text_encoder.dtype} == {torch.float32}
    assert triples.unet.config.sample_size == 12 and type(triples.dense_captioner.grounder).__name__ == "ShapesGrounder"
    for mine, theirs in ((triples.vae, bow.vae), (triples.text_encoder, bow.text_encoder)):
        ours, other = mine.state_dict(), theirs.state_dict()
        assert all(torch.equal(ours[k], other[k]) for k in ours)
    prompts = [f"a {color} {shape}" for color in COLORS for shape in SHAPES]
    images = triples(prompts, num_inference_steps=10, guidance_scale=4.0, generator=torch.Generator().manual_seed(0)).images
    assert {image.size for image in images} == {(48, 48)}
    hits = sum(any(d["shape"] == p.split()[2] and d["color"] == p.split()[1] for d in detect(image))
               for p, image in zip(prompts, images))
    assert hits / len(prompts) >= 0.4  # chance: 1/20
