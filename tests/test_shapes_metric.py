"""The shapes-world evaluation (issue 8's harness): the caption parser, ShapesAlignmentScore on rendered scenes,
the shapes presets and their missing-weights error, and a tiny random pipeline (with the shapes dense captioner
saved in its folder) run through generate_images on held-out prompts and scored with the ``shapes`` metric."""

from __future__ import annotations

import json
from importlib import resources

import numpy as np
import pytest
import torch

from realign_pipeline import RealignDiffPipeline
from realign_pipeline.evaluation import load_prompts
from realign_pipeline.evaluation.configs import (
    PRESETS,
    SHAPES_MODEL,
    build_pipeline,
    check_checkpoint,
    load_config,
)
from realign_pipeline.evaluation.generate import generate_images, read_manifest
from realign_pipeline.evaluation.score import PER_IMAGE_FILE, score_folder
from realign_pipeline.shapes.metric import ShapesAlignmentScore, parse_shapes_prompt
from realign_pipeline.shapes.world import CAPTION_FORMS, ShapeObject, held_out_prompts, render_scene
from realign_pipeline.testing import tiny_pipeline

LEFT = ShapeObject("red", "circle", 0.25, 0.5, 0.42)
RIGHT = ShapeObject("blue", "square", 0.75, 0.5, 0.42)


def _key(objects):
    return sorted((o["color"], o["shape"], str(o["side"])) for o in objects)


# --- the parser -----------------------------------------------------------------------------------------------


def test_parser_reads_every_held_out_prompt_and_form():
    records = held_out_prompts()
    assert {r["form"] for r in records} == set(CAPTION_FORMS)
    for r in records:
        assert _key(parse_shapes_prompt(r["prompt"])) == _key(r["objects"]), r["prompt"]
    # order of mention, sides from the positional forms
    assert parse_shapes_prompt("a yellow cross to the right of a green triangle") == [
        {"color": "yellow", "shape": "cross", "side": "right"},
        {"color": "green", "shape": "triangle", "side": "left"},
    ]
    assert parse_shapes_prompt("a purple triangle with a red circle")[1] == {"color": "red", "shape": "circle",
                                                                              "side": None}
    assert parse_shapes_prompt("A Blue  Square.") == [{"color": "blue", "shape": "square", "side": None}]


@pytest.mark.parametrize("prompt", ["a dog", "a red dog and a blue square", "a red circle beside a blue square",
                                    "a red circle and a blue square and a green cross", "", "red circle",
                                    "a orange circle"])
def test_parser_rejects_other_captions(prompt):
    with pytest.raises(ValueError, match="not a shapes-world caption"):
        parse_shapes_prompt(prompt)


# --- the metric on rendered scenes ------------------------------------------------------------------------------


def test_metric_on_rendered_scenes():
    image = render_scene((LEFT, RIGHT))
    prompts = [
        "a red circle to the left of a blue square",  # all right
        "a blue square to the right of a red circle",  # all right, other form
        "a blue circle and a red square",  # shapes present, colours swapped
        "a red circle to the right of a blue square",  # bound, wrong side
        "a green cross",  # absent
        "a red circle with a green triangle",  # half bound
    ]
    metric = ShapesAlignmentScore(seed=1)
    metric.update([image] * 3, prompts[:3])
    metric.update([image] * 3, prompts[3:])
    s = metric.scores
    assert s["presence"] == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    assert s["binding"] == [1.0, 1.0, 0.0, 1.0, 0.0, 0.0]
    assert s["binding_fraction"] == [1.0, 1.0, 0.0, 1.0, 0.0, 0.5]
    assert s["position"] == [1.0, 1.0, None, 0.0, None, None]
    result = metric.compute()
    assert result["metric"] == "shapes" and result["count"] == 6 and result["model"] is None
    assert result["position"]["n"] == 3 and result["position"]["mean"] == pytest.approx(2 / 3)
    assert result["binding_fraction"]["mean"] == pytest.approx(3.5 / 6)
    assert result["mean"] == result["binding"]["mean"] == pytest.approx(0.5)
    for f in ("presence", "binding", "binding_fraction", "position"):
        assert result[f]["ci_low"] <= result[f]["mean"] <= result[f]["ci_high"]
        assert 0.0 <= result[f]["ci_low"] and result[f]["ci_high"] <= 1.0
    assert metric.compute() == result  # seeded
    # a (B, C, H, W) tensor in [-1, 1] scores like the PIL image
    tensor = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 127.5 - 1
    other = ShapesAlignmentScore()
    other.update(tensor, prompts[0])
    assert other.scores["binding"] == [1.0] and other.scores["position"] == [1.0]
    # a bad prompt fails before anything is recorded; reset forgets
    with pytest.raises(ValueError, match="not a shapes-world caption"):
        other.update([image, image], [prompts[0], "a cat"])
    assert other.count == 1
    other.reset()
    assert other.count == 0 and other.scores["position"] == []
    with pytest.raises(ValueError, match="uses no model"):
        ShapesAlignmentScore.from_pretrained("openai/clip-vit-large-patch14")


# --- presets ------------------------------------------------------------------------------------------------------


def test_shapes_presets():
    for name in ("shapes", "shapes-realign", "shapes-refl", "shapes-refl+realign"):
        config = load_config(name)
        assert config.model == SHAPES_MODEL and config.dtype == "float32"
        assert (config.height, config.width, config.steps, config.guidance) == (32, 32, 20, 4.0)
        assert config.realign == name.endswith("realign")
        assert config.requires_checkpoint == ("refl" in name)
        assert config.call_kwargs()["num_inference_steps"] == 20
    assert PRESETS["shapes-realign"].call_kwargs()["realign"] is True
    with pytest.raises(ValueError, match="needs a ReFL checkpoint"):
        check_checkpoint(load_config("shapes-refl+realign"))
    check_checkpoint(load_config("shapes-refl").replace(lora="some-owner/shapes-refl-lora"))


def test_missing_shapes_weights_are_a_clear_error(tmp_path, monkeypatch):
    from realign_pipeline.shapes import pretrained

    empty = tmp_path / "empty"
    empty.mkdir()
    # the shipped folder absent: the package's assets resolve to an empty folder
    monkeypatch.setattr(pretrained.resources, "files", lambda package: empty)
    with pytest.raises(FileNotFoundError, match="shapes-world model 'pipeline' is not in this installation"):
        build_pipeline("shapes", device="cpu")
    # a model folder without a pipeline in it
    with pytest.raises(FileNotFoundError, match="no model_index.json"):
        build_pipeline(load_config("shapes-realign").replace(model=str(empty)), device="cpu")
    assert resources.files("realign_pipeline") is empty  # the patch was in force


# --- end to end -----------------------------------------------------------------------------------------------


def test_tiny_shapes_pipeline_generates_and_scores(tmp_path):
    from realign_pipeline.shapes.perception import ShapesGrounder, shapes_dense_captioner

    model = tmp_path / "shapes-pipeline"
    tiny_pipeline(RealignDiffPipeline, dense_captioner=shapes_dense_captioner()).save_pretrained(model)
    config = load_config("shapes-realign").replace(name="tiny-shapes-realign", model=str(model), steps=2)
    pipe = build_pipeline(config, device="cpu")
    assert isinstance(pipe.dense_captioner.grounder, ShapesGrounder)  # the captioner saved with the model

    prompts = load_prompts("shapes-heldout")
    records = [prompts[0], next(r for r in prompts if r.metadata["form"] == "left")]
    out = tmp_path / "run"
    result = generate_images(config, records, out, seed=0, pipeline=pipe, progress=False)
    assert result["generated"] == 2
    rows = read_manifest(out)
    assert [r["record"]["set"] for r in rows] == ["shapes-heldout"] * 2
    assert rows[0]["settings"]["height"] == 32 and rows[0]["settings"]["realign"] is True

    scored = score_folder(out, ["shapes", "timings"], progress=False)
    metrics = scored["metrics"]
    assert scored["prompt_set"] == "shapes-heldout" and "shapes" not in metrics
    for f in ("presence", "binding", "binding_fraction"):
        entry = metrics[f"shapes_{f}"]
        assert entry["n"] == 2 and 0.0 <= entry["ci_low"] <= entry["mean"] <= entry["ci_high"] <= 1.0
    assert metrics["shapes_position"]["n"] == 1 and metrics["shapes_position"]["mean"] in (0.0, 1.0)
    lines = [json.loads(x) for x in (out / PER_IMAGE_FILE).read_text().splitlines()]
    assert [x["prompt_key"] for x in lines] == ["shapes-heldout/000", f"shapes-heldout/{records[1].id}"]
    assert lines[0]["scores"]["shapes_position"] is None and lines[1]["scores"]["shapes_position"] in (0.0, 1.0)
