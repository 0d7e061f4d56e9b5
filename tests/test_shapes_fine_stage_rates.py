"""``training/shapes/fine_stage_rates.py``: the placebo layout, and the reduced run end to end on the shipped
shapes world (every rate in range and consistent with its counts)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

SHAPES = Path(__file__).resolve().parents[1] / "training" / "shapes"


@pytest.fixture(scope="module")
def fine_stage_rates():
    if str(SHAPES) not in sys.path:
        sys.path.insert(0, str(SHAPES))
    import fine_stage_rates

    return fine_stage_rates


def test_the_placebo_exchanges_the_phrases_or_mirrors_a_lone_region(fine_stage_rates):
    from realign_pipeline import Layout, Region

    left = np.zeros((32, 32), dtype=np.float32)
    left[8:20, 2:14] = 1
    right = np.zeros((32, 32), dtype=np.float32)
    right[10:22, 18:30] = 1
    layout = Layout([Region("red circle", mask=left, score=2.0, tag="circle"),
                     Region("blue square", mask=right, score=0.5, tag="square")])
    placebo = fine_stage_rates.placebo_layout(layout)
    assert [r.phrase for r in placebo] == ["blue square", "red circle"]
    assert [r.score for r in placebo] == [2.0, 0.5]  # the same modulation, aimed at the other object
    assert np.array_equal(np.asarray(placebo[0].mask), left) and np.array_equal(np.asarray(placebo[1].mask), right)
    (alone,) = fine_stage_rates.placebo_layout(Layout([Region("red circle", mask=left)]))
    assert alone.phrase == "red circle"
    assert np.array_equal(np.asarray(alone.mask), left[:, ::-1])
    assert float(np.asarray(alone.mask)[:, 16:].sum()) == float(left.sum())  # now in the other half


def _check(rates: dict, n: int) -> None:
    assert rates["n"] == n and rates["base_wrong"] + rates["base_right"] == n
    assert rates["fixed"] <= rates["base_wrong"] and rates["broken"] <= rates["base_right"]
    unchanged = n - rates["fixed"] - rates["broken"]
    assert rates["fixed"] + unchanged + rates["broken"] == n
    assert rates["after"] - rates["before"] == pytest.approx(rates["difference"], abs=1e-3)
    if rates["base_wrong"]:
        assert rates["fix_rate"] == pytest.approx(rates["fixed"] / rates["base_wrong"], abs=1e-4)
    if rates["base_right"]:
        assert rates["break_rate"] == pytest.approx(rates["broken"] / rates["base_right"], abs=1e-4)


def test_quick_run_on_the_shapes_world(fine_stage_rates, tmp_path):
    result = fine_stage_rates.main(["--quick", "--out", str(tmp_path / "rates.json")])
    assert set(result["splits"]) == {"half-b", "held-out", "hard"}
    from realign_pipeline.shapes.world import held_out_halves

    half_b = {" + ".join(sorted(f"{c} {s}" for c, s in pairing)) for pairing in held_out_halves()[1]}
    assert {row["pairing"] for row in result["splits"]["half-b"]["rows"]} <= half_b
    for name, split in result["splits"].items():
        n = split["images"]
        assert n == len(split["rows"]) and split["realigned"] <= n
        if name == "hard":
            assert all(split["wrong_counts"][row["prompt"]] >= split["min_wrong"] for row in split["rows"])
            assert {row["seed"] for row in split["rows"]} <= {100}
        for metric, entry in split["rates"].items():
            with_value = sum(row["coarse"][metric] is not None for row in split["rows"])
            _check(entry["fine"], with_value)
            _check(entry["placebo"], with_value)


def test_the_method_minus_placebo_rates_point_the_right_way(fine_stage_rates):
    def row(coarse, fine, placebo, pairing):
        return {"pairing": pairing, "coarse": {"binding": coarse, "presence": 1.0, "position": None},
                "fine": {"binding": fine, "presence": 1.0, "position": None},
                "placebo": {"binding": placebo, "presence": 1.0, "position": None}}

    # coarse-wrong: the fine stage fixes 2 of 2, the placebo 0; coarse-right: the fine stage breaks 1 of 2, the placebo 0
    rows = [row(0, 1, 0, "a"), row(0, 1, 0, "b"), row(1, 0, 1, "a"), row(1, 1, 1, "b")]
    rates = fine_stage_rates.rates(rows)["binding"]
    assert rates["fine"]["fix_rate"] == 1.0 and rates["placebo"]["fix_rate"] == 0.0
    assert rates["fix_rate_minus_placebo"]["difference"] == 1.0
    assert rates["fine"]["break_rate"] == 0.5 and rates["placebo"]["break_rate"] == 0.0
    assert rates["break_rate_minus_placebo"]["difference"] == 0.5
    assert "position" not in fine_stage_rates.rates(rows)  # no prompt named a side


def test_relation_prompts_with_relation_correction(fine_stage_rates, tmp_path):
    result = fine_stage_rates.main(["--quick", "--correct_relations", "--forms", "left", "right", "--splits",
                                    "held-out", "--out", str(tmp_path / "relations.json")])
    assert result["correct_relations"] is True and result["forms"] == ["left", "right"]
    rows = result["splits"]["held-out"]["rows"]
    assert rows and all(" to the " in row["prompt"] for row in rows)
    assert all(row["coarse"]["position"] is not None for row in rows)
    _check(result["splits"]["held-out"]["rates"]["position"]["fine"], len(rows))


def test_the_placebo_of_a_box_only_region_uses_the_worlds_size(fine_stage_rates):
    from realign_pipeline import Layout, Region

    (alone,) = fine_stage_rates.placebo_layout(Layout([Region("red circle", box=[0.0, 0.0, 0.5, 1.0])]), size=48)
    mask = np.asarray(alone.mask)
    assert mask.shape == (48, 48) and mask[:, 24:].min() == 1.0 and mask[:, :24].max() == 0.0


def test_compare_runs_pairs_the_fine_images_of_two_runs(fine_stage_rates, tmp_path):
    import json

    import compare_runs

    def row(prompt, seed, coarse, fine):
        return {"prompt": prompt, "seed": seed, "pairing": prompt.split()[1],
                "coarse": {"binding": 1.0, "presence": 1.0, "position": coarse},
                "fine": {"binding": 1.0, "presence": 1.0, "position": fine}}

    first = {"splits": {"held-out": {"rows": [row("a red x", 0, 0.0, 0.0), row("a blue y", 0, 1.0, 1.0),
                                              row("a green z", 1, 0.0, 1.0)]}}}
    second = {"splits": {"held-out": {"rows": [row("a red x", 0, 0.0, 1.0), row("a blue y", 0, 1.0, 0.0)]}}}
    result = compare_runs.compare(first, second)
    assert (result["position"]["fixed"], result["position"]["broken"], result["position"]["n"]) == (1, 1, 2)
    paths = [tmp_path / "first.json", tmp_path / "second.json"]
    for path, data in zip(paths, (first, second)):
        path.write_text(json.dumps(data))
    written = compare_runs.main([str(paths[0]), str(paths[1]), "--out", str(tmp_path / "paired.json")])
    assert json.loads((tmp_path / "paired.json").read_text()) == written
    second["splits"]["held-out"]["rows"][0]["coarse"]["position"] = 1.0  # another coarse image: not comparable
    with pytest.raises(SystemExit, match="coarse images differ"):
        compare_runs.compare(first, second)
    with pytest.raises(SystemExit, match="not in the first"):
        compare_runs.compare({"splits": {"held-out": {"rows": []}}}, second)


def test_quick_run_on_the_three_object_world(fine_stage_rates, tmp_path):
    result = fine_stage_rates.main(["--quick", "--model", "shapes-triples", "--splits", "held-out", "--out",
                                    str(tmp_path / "triples.json")])
    assert result["scene_kind"] == "triples" and result["generation"]["height"] == 48
    rows = result["splits"]["held-out"]["rows"]
    assert rows and all(len(row["pairing"].split(" + ")) == 3 for row in rows)
    for metric, entry in result["splits"]["held-out"]["rates"].items():
        _check(entry["fine"], sum(row["coarse"][metric] is not None for row in rows))


def test_the_diagnosis_controls_hold_and_its_counts_add_up(fine_stage_rates, tmp_path):
    import fine_stage_diagnosis

    result = fine_stage_diagnosis.main(["--quick", "--out", str(tmp_path / "diagnosis.json")])
    realigned = result["realigned"]
    assert 0 < realigned <= result["images"]
    variants = result["variants"]
    # strength 0 is the coarse pass again, pixel for pixel; any other modulation changes the image
    assert variants["strength 0 (control)"]["pixel-identical to the coarse image"] == realigned
    assert variants["paper (the fine stage)"]["pixel-identical to the coarse image"] < realigned
    # the paper's variant is realign=True's own fine pass, from the same noise
    for metric in ("binding", "presence"):
        assert variants["paper (the fine stage)"][metric] == result["realign=True against its coarse pass"][metric]
        for entry in variants.values():
            _check(entry[metric], realigned)
    for entry in variants.values():
        broken = entry["binding"]["broken"]
        assert entry["broken binding: object lost"] + entry["broken binding: object kept, recoloured"] == broken
    assert set(result["shared cells"]) == {"12x12", "6x6", "3x3"}
    assert all(0 <= share <= 1 for share in result["shared cells"].values())
    captions = result["captions"]
    assert captions["coarse right"]["images"] + captions["coarse wrong"]["images"] == realigned
    for side in captions.values():
        on_target = side["regions on their target"]
        assert on_target <= side["regions"] == sum(side["scores"].values())
        assert side["regions on target asking a recolouring"] + side["regions on target asking no change"] == on_target
        assert side["images with a region on every prompted object"] <= side["images"]


def test_a_region_is_judged_by_the_object_under_its_mask(fine_stage_rates):
    import fine_stage_diagnosis

    from realign_pipeline import Layout, Region
    from realign_pipeline.shapes.world import ShapeObject, render_scene

    image = render_scene((ShapeObject("red", "circle", 0.25, 0.5, 0.35), ShapeObject("blue", "square", 0.75, 0.5, 0.35)))
    left = np.zeros((32, 32), dtype=np.float32)
    left[8:24, 2:14] = 1
    right = left[:, ::-1].copy()
    objects = [{"color": "blue", "shape": "circle"}, {"color": "blue", "shape": "square"}]
    audit = fine_stage_diagnosis.region_audit(
        Layout([Region("blue circle", mask=left), Region("blue square", mask=right)]), image, objects)
    # the circle region asks to recolour the red circle; the square region asks nothing new
    assert [(r["on_target"], r["recolour"]) for r in audit["regions"]] == [(True, True), (True, False)]
    assert audit["complete"]
    # a region over the wrong object is off target, and the circle then has no region
    audit = fine_stage_diagnosis.region_audit(Layout([Region("blue circle", mask=right)]), image, objects)
    assert [r["on_target"] for r in audit["regions"]] == [False] and not audit["complete"]
    assert fine_stage_diagnosis.phrase_object("the purple cross") == {"color": "purple", "shape": "cross"}


def test_the_tuning_split_is_training_prompts_only(fine_stage_rates):
    from realign_pipeline.shapes import triples
    from realign_pipeline.shapes.world import held_out_prompts

    held_out = {r["prompt"] for r in held_out_prompts()} | {r["prompt"] for r in triples.held_out_triple_prompts()}
    for kind in ("pairs", "triples"):
        records = fine_stage_rates.split_records("tuning", kind)
        assert len(records) == fine_stage_rates.TUNING_PROMPTS == len({r["prompt"] for r in records})
        assert not {r["prompt"] for r in records} & held_out
        assert records == fine_stage_rates.split_records("tuning", kind)  # seeded: the same draw every time
