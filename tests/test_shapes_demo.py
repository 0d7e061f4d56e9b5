"""`realigndiff demo` on the shipped shapes world: seed selection, measured rates and the layout-control panel.

Each test runs the real demo in-process with few steps; the pipeline is loaded once and handed to the demo.
"""

from __future__ import annotations

import json
from pathlib import Path

import PIL.Image
import pytest
import torch

import realign_pipeline.cli.shapes_demo as demo_module
import realign_pipeline.shapes.checker as checker_module
import realign_pipeline.shapes.pretrained as pretrained_module
from realign_pipeline.cli import main
from realign_pipeline.cli.shapes_demo import (
    DEFAULT_GUIDANCE,
    DEFAULT_PROMPT,
    DEFAULT_PROMPT_CHOICE,
    LAYOUT_PANEL_SIDE,
    PADDING,
    load_measured_rates,
    measured_rates_path,
    prompt_layout,
)
from realign_pipeline.shapes.checker import check_prompt
from realign_pipeline.shapes.metric import parse_shapes_prompt
from realign_pipeline.shapes.pretrained import load_shapes_pipeline

#: 6 steps: the default prompt's plain images are wrong on some of seeds 0-5 and right on others.
STEPS = 6
SEARCH = 6


@pytest.fixture(scope="module")
def pipe():
    pipe = load_shapes_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def run_demo(pipe, monkeypatch, capsys, tmp_path):
    """Run ``realigndiff demo`` with extra arguments on the shared pipeline; returns (output folder, stdout, summary)."""
    monkeypatch.setattr(pretrained_module, "load_shapes_pipeline", lambda *args, **kwargs: pipe)

    def run(*argv: str) -> tuple[Path, str, dict]:
        out = tmp_path / "demo"
        assert main(["demo", "--out", str(out), "-q", *argv]) == 0
        return out, capsys.readouterr().out, json.loads((out / "summary.json").read_text())

    return run


def _wrong(image, objects) -> bool:
    reading = check_prompt(image, objects)
    return reading["binding"] == 0 or reading["position"] == 0


def test_the_demo_shows_seeds_the_plain_pipeline_gets_wrong(run_demo, pipe):
    out, text, summary = run_demo("--steps", str(STEPS), "--search_seeds", str(SEARCH), "--num_images", "2")
    objects = parse_shapes_prompt(DEFAULT_PROMPT)
    # which of the searched seeds the plain pipeline gets wrong, read here independently of the demo
    plain = pipe([DEFAULT_PROMPT] * SEARCH, height=32, width=32, num_inference_steps=STEPS,
                 guidance_scale=DEFAULT_GUIDANCE, generator=[torch.Generator().manual_seed(s) for s in range(SEARCH)])
    wrong = [seed for seed, image in enumerate(plain.images) if _wrong(image, objects)]
    assert len(wrong) >= 2 and len(wrong) < SEARCH  # the check below also skips right seeds
    selection = summary["seed_selection"]
    assert summary["seeds"] == selection["chosen"] == wrong[:2] and selection["filled"] == []
    assert selection["searched"] == [0, SEARCH - 1] and selection["wrong_count"] == len(wrong)
    assert "binding == 0, or position == 0" in selection["rule"]
    for seed in summary["seeds"]:  # the saved coarse images are those wrong images
        assert _wrong(PIL.Image.open(out / f"coarse_{seed}.png").convert("RGB"), objects)
        assert summary["images"][summary["seeds"].index(seed)]["coarse"]["binding"] is not None
    assert f"{len(wrong)} of the {SEARCH} were wrong" in text

    # the measured rates, copied from the package's file, with the note that 6 steps is not what was measured
    assert summary["measured_rates"] == json.loads(measured_rates_path().read_text())
    assert "num_inference_steps 20 there, 6 here" in summary["measured_rates_note"]
    placebo = summary["measured_rates"]["placebo"]
    assert "measured on the held-out relation prompts" in text
    assert f"a placebo (phrases exchanged) fixed {placebo['fixed']} of {placebo['base_wrong']}" in text

    control = summary["layout_control"]
    assert control["seed"] == summary["seeds"][0] and control["setting"] == demo_module.LAYOUT_CONTROL_SETTING
    assert [(r["phrase"], r["box"]) for r in control["regions"]] == [
        ("purple triangle", [0.0, 0.0, 0.5, 1.0]), ("blue square", [0.5, 0.0, 1.0, 1.0])]
    for key, name in (("plain", f"coarse_{control['seed']}.png"), ("with_layout", f"layout_{control['seed']}.png")):
        assert all(control[key][field] in (0.0, 1.0) for field in ("position", "binding", "presence"))
        reading = check_prompt(PIL.Image.open(out / name).convert("RGB"), objects)
        assert control[key] == {field: reading[field] for field in ("position", "binding", "presence")}
    panel = PIL.Image.open(out / "layout_control.png")
    assert panel.width == 3 * LAYOUT_PANEL_SIDE + 4 * PADDING and panel.height > LAYOUT_PANEL_SIDE
    assert "layout control, seed" in text


def test_too_few_wrong_seeds_are_filled_and_said(run_demo, monkeypatch):
    def always_right(image, objects):
        sides = [o.get("side") for o in objects]
        return {"presence": 1.0, "binding": 1.0, "binding_fraction": 1.0,
                "position": 1.0 if "left" in sides else None, "detected": []}

    monkeypatch.setattr(checker_module, "check_prompt", always_right)
    _, text, summary = run_demo("--steps", "2", "--search_seeds", "3", "--num_images", "2")
    selection = summary["seed_selection"]
    assert selection["wrong_count"] == 0 and selection["filled"] == summary["seeds"] == [0, 1]
    assert "0 of the 3 were wrong; too few, so seeds 0, 1 (coarse image right) fill the rest" in text


def test_a_given_seed_skips_the_search(run_demo):
    _, text, summary = run_demo("--steps", "2", "--seed", "7", "--num_images", "2")
    assert summary["seeds"] == [7, 8]
    assert summary["seed_selection"]["searched"] is None and "search" not in summary["timings_s"]
    assert "seeds 7, 8: seeds given by the user" in text


def test_the_demo_runs_without_the_rates_file(run_demo, monkeypatch, tmp_path):
    monkeypatch.setattr(demo_module, "measured_rates_path", lambda: tmp_path / "missing" / "demo_rates.json")
    out, text, summary = run_demo("--steps", "2", "--seed", "0", "--num_images", "1")
    assert summary["measured_rates"] is None and "missing" in summary["measured_rates_note"]
    assert "no measured rates to show: the measured rates are not in this installation" in text
    assert (out / "panel.png").exists()
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    assert load_measured_rates(broken)[0] is None and "cannot read" in load_measured_rates(broken)[1]


def test_the_rates_file_holds_the_measured_held_out_run():
    """The package's rates are docs/shapes_relation_correction.json's held-out split, not other numbers."""
    docs = Path(__file__).resolve().parents[1] / "docs" / "shapes_relation_correction.json"
    measured = json.loads(docs.read_text())
    held_out = measured["splits"]["held-out"]["rates"]
    rates, problem = load_measured_rates()
    assert problem is None and rates["world"] == measured["model"] == "shapes"
    for key, (metric, arm) in {"binding": ("binding", "fine"), "placebo": ("binding", "placebo"),
                               "position": ("position", "fine"), "position_placebo": ("position", "placebo")}.items():
        assert rates[key] == {k: held_out[metric][arm][k] for k in rates[key]}
        assert set(rates[key]) == {"fixed", "base_wrong", "fix_rate", "fix_rate_ci", "broken", "base_right",
                                   "break_rate", "break_rate_ci"}
    assert {k: rates["configuration"][k] for k in measured["generation"]} == measured["generation"]
    assert rates["configuration"]["correct_relations"] is measured["correct_relations"] is True
    assert rates["configuration"]["forms"] == measured["forms"]
    assert "fine_stage_rates.py" in rates["command"] and "--correct_relations" in rates["command"]
    assert rates["machine"] and rates["run_time"]


@pytest.mark.parametrize("prompt, expected", [
    ("a red circle to the right of a blue square", [("red circle", "right"), ("blue square", "left")]),
    ("a red circle and a blue square", [("red circle", "left"), ("blue square", "right")]),
    ("a green cross with a purple triangle", [("green cross", "left"), ("purple triangle", "right")]),
])
def test_prompt_layout_gives_each_phrase_its_half(prompt, expected):
    layout, objects = prompt_layout(parse_shapes_prompt(prompt))
    halves = {"left": [0.0, 0.0, 0.5, 1.0], "right": [0.5, 0.0, 1.0, 1.0]}
    assert [(r.phrase, list(r.box)) for r in layout] == [(phrase, halves[side]) for phrase, side in expected]
    assert [o["side"] for o in objects] == [side for _, side in expected]
    with pytest.raises(ValueError, match="two objects"):
        prompt_layout(parse_shapes_prompt("a red circle"))


def test_the_default_prompt_is_the_one_its_rule_names():
    """DEFAULT_PROMPT_CHOICE: the held-out relation prompt whose wrongly placed coarse images the fine stage with
    relation correction fixed most often (ties: the higher share), in the measured run."""
    docs = Path(__file__).resolve().parents[1] / "docs" / "shapes_relation_correction.json"
    fixed: dict[str, int] = {}
    wrong: dict[str, int] = {}
    for row in json.loads(docs.read_text())["splits"]["held-out"]["rows"]:
        if row["coarse"]["position"] == 0:
            wrong[row["prompt"]] = wrong.get(row["prompt"], 0) + 1
            fixed[row["prompt"]] = fixed.get(row["prompt"], 0) + (row["fine"]["position"] == 1 and row["fine"]["binding"] == 1)
    best = max(fixed, key=lambda p: (fixed[p], fixed[p] / wrong[p]))
    assert best == DEFAULT_PROMPT and f"{fixed[best]} of {wrong[best]}" in DEFAULT_PROMPT_CHOICE
