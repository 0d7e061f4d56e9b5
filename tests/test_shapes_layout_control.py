"""``training/shapes/layout_control.py``: the layouts it builds from the prompts, the paired read-out of a change
(fix and break rates), and the reduced sweep and evaluation end to end on the shipped shapes world."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

SHAPES = Path(__file__).resolve().parents[1] / "training" / "shapes"


@pytest.fixture(scope="module")
def layout_control():
    if str(SHAPES) not in sys.path:
        sys.path.insert(0, str(SHAPES))
    import layout_control

    return layout_control


def test_paired_rates_counts_fixes_and_breaks_among_the_right_images(layout_control):
    from ablation import paired_rates

    before = [0, 0, 0, 1, 1, 1, 1, 1]
    after = [1, 0, 1, 1, 0, 1, 1, 1]
    groups = ["a", "a", "b", "b", "c", "c", "d", "d"]
    rates = paired_rates(before, after, groups)
    assert (rates["fixed"], rates["broken"], rates["base_wrong"], rates["base_right"]) == (2, 1, 3, 5)
    # rounded to 4 decimals in the JSON the scripts write
    assert rates["fix_rate"] == pytest.approx(2 / 3, abs=1e-4) and rates["break_rate"] == pytest.approx(1 / 5)
    assert rates["difference"] == pytest.approx(1 / 8) and rates["after"] - rates["before"] == pytest.approx(1 / 8)
    low, high = rates["fix_rate_ci"]
    assert 0 <= low <= 2 / 3 <= high <= 1
    nothing_wrong = paired_rates([1, 1], [1, 0], ["a", "b"])
    assert nothing_wrong["fix_rate"] is None and nothing_wrong["break_rate"] == 0.5


def test_sides_come_from_the_prompt_or_a_seeded_draw_and_boxes_from_the_worlds_halves(layout_control):
    from ablation import pairing_key

    from realign_pipeline.shapes.world import held_out_prompts

    records = layout_control.with_sides(held_out_prompts())
    assert records == layout_control.with_sides(held_out_prompts())  # seeded
    for record in records:
        sides = [o["side"] for o in record["objects"]]
        assert sorted(sides) == ["left", "right"]
        assert record["sides_drawn"] == (record["form"] in ("and", "with"))
        if record["form"] == "left":  # "a X to the left of a Y": X is the left object
            assert sides == ["left", "right"]
    drawn = [r["objects"][0]["side"] for r in records if r["sides_drawn"]]
    assert 0.3 < drawn.count("left") / len(drawn) < 0.7
    layout = layout_control.prompt_layout(records[0]["objects"])
    boxes = {region.phrase: region.box for region in layout}
    for o in records[0]["objects"]:
        assert boxes[f"{o['color']} {o['shape']}"] == layout_control.SIDE_BOXES[o["side"]]
    assert pairing_key(records[0]["objects"]) == pairing_key(records[1]["objects"])


def test_tuning_and_evaluation_prompts_do_not_share_a_pairing(layout_control):
    from ablation import pairing_key

    tuning = {pairing_key(r["objects"]) for r in layout_control.tuning_records(None)}
    evaluation = {pairing_key(r["objects"]) for r in layout_control.evaluation_records(None)}
    assert len(evaluation) == 24 and len(tuning) == 96 and not tuning & evaluation


def _check_rates(rates: dict, n: int) -> None:
    assert rates["n"] == n
    assert rates["fixed"] + rates["broken"] <= n
    assert rates["base_wrong"] + rates["base_right"] == n
    assert rates["fixed"] <= rates["base_wrong"] and rates["broken"] <= rates["base_right"]
    unchanged = n - rates["fixed"] - rates["broken"]
    assert rates["fixed"] + unchanged + rates["broken"] == n
    assert rates["after"] - rates["before"] == pytest.approx(rates["difference"], abs=1e-3)
    for key in ("fix_rate", "break_rate"):
        if rates[key] is not None:
            low, high = rates[f"{key}_ci"]
            assert 0 <= low <= rates[key] + 1e-9 and rates[key] <= high + 1e-9 and high <= 1


def test_quick_sweep_then_evaluate_on_the_shapes_world(layout_control, tmp_path):
    sweep = layout_control.main(["sweep", "--quick", "--out", str(tmp_path / "sweep.json")])
    assert json.loads((tmp_path / "sweep.json").read_text()) == json.loads(json.dumps(sweep))
    assert sweep["images"] == 4 and len(sweep["results"]) == 2
    assert sweep["chosen"] in [r["setting"] for r in sweep["results"]]
    for result in sweep["results"]:
        for metric in layout_control.METRICS:
            _check_rates(result["paired"][metric], 4)
            assert result["paired"][metric]["before"] == sweep["base"][metric]
    evaluation = layout_control.main(["evaluate", "--quick", "--setting", str(tmp_path / "sweep.json"),
                                      "--out", str(tmp_path / "evaluate.json")])
    assert evaluation["setting"] == sweep["chosen"] and evaluation["prompts"] == "held-out pairings"
    for metric in layout_control.METRICS:
        _check_rates(evaluation["with_layout"][metric], 4)
    assert sum(form["position"]["n"] for form in evaluation["by_form"].values()) == 4
    with pytest.raises(SystemExit):
        layout_control.main(["evaluate", "--quick", "--out", str(tmp_path / "x.json")])  # no --setting


@pytest.fixture(scope="module")
def layout_diagnosis(layout_control):
    import layout_diagnosis

    return layout_diagnosis


def test_token_categories_split_every_key(layout_diagnosis):
    from transformers import CLIPTokenizer

    from realign_pipeline.shapes.pretrained import shapes_model_path

    tokenizer = CLIPTokenizer.from_pretrained(shapes_model_path("pipeline") / "tokenizer")
    prompt = "a red circle and a blue square"  # start a red circle and a blue square end pad...
    categories = layout_diagnosis.token_categories(tokenizer, prompt, [[2, 3], [6, 7]], 16)
    names = layout_diagnosis.CATEGORIES
    assert [names[c] for c in categories[0][:10]] == [
        "start", "other words", "own phrase", "own phrase", "other words", "other words", "other phrase",
        "other phrase", "end and padding", "end and padding",
    ]
    assert [names[c] for c in categories[1][2:4]] == ["other phrase", "other phrase"]
    assert all(names[c] == "end and padding" for c in categories[1][8:])


def test_modulating_no_level_is_the_plain_image_and_the_quick_run_adds_up(layout_diagnosis, layout_control, tmp_path):
    import numpy as np
    import torch

    from realign_pipeline.shapes.pretrained import load_shapes_pipeline

    pipe = load_shapes_pipeline()
    pipe.set_progress_bar_config(disable=True)
    record = layout_control.tuning_records(1)[0]
    kwargs = {"height": 32, "width": 32, "num_inference_steps": 3, "guidance_scale": 4.0, "output_type": "np"}
    plain = pipe(record["prompt"], generator=torch.Generator().manual_seed(0), **kwargs).images
    layout = layout_control.prompt_layout(record["objects"])
    setting = {"cross_attention_strength": 2.0, "modulation_fraction": 1.0, "self_attention_strength": 0.3}
    modulated = pipe(record["prompt"], generator=torch.Generator().manual_seed(0), layout=layout, **setting, **kwargs).images
    with layout_diagnosis.modulated_levels(()):
        none = pipe(record["prompt"], generator=torch.Generator().manual_seed(0), layout=layout, **setting, **kwargs).images
    assert np.abs(modulated - plain).max() > 1e-3
    np.testing.assert_allclose(none, plain, atol=1e-5)

    result = layout_diagnosis.main(["--quick", "--out", str(tmp_path / "diagnosis.json")])
    for entry in result["settings"].values():
        for steps in entry["shares"].values():
            for shares in steps.values():
                assert sum(shares.values()) == pytest.approx(1.0, abs=1e-3)
    assert {row["levels"] for row in result["levels"]} == set(layout_diagnosis.LEVELS)
    for row in result["levels"]:
        for metric in ("position", "binding", "presence"):
            assert 0 <= row[metric]["after"] <= 1 and row[metric]["fixed"] + row[metric]["broken"] <= 2


def test_three_object_layouts_put_each_object_in_a_third_and_keep_the_relation(layout_control, tmp_path):
    records = layout_control.tuning_records(48, "triples")
    for record in records:
        sides = [o["side"] for o in record["objects"]]
        assert sorted(sides) == ["left", "middle", "right"]
        named = [o for o in record["objects"] if " to the " in record["prompt"]][:2]
        if named:  # the prompt's left object (listed first) sits in a third left of its right object's
            order = list(layout_control.THIRD_BOXES)
            assert order.index(named[0]["side"]) < order.index(named[1]["side"])
        layout = layout_control.prompt_layout(record["objects"])
        assert [tuple(r.box) for r in layout] == [layout_control.THIRD_BOXES[s] for s in sides]
    result = layout_control.main(["sweep", "--quick", "--model", "shapes-triples", "--out", str(tmp_path / "s.json")])
    assert result["generation"]["height"] == 48 and result["prompts"] == "training triples"
    assert all(0 <= r["paired"]["in_box"]["after"] <= 1 for r in result["results"])
