"""``training/shapes/coarse_stage.py --quick`` on the shipped second world (2 runs of 2 steps, 2 prompts per split,
2 denoising steps): every table cell in range and consistent with its counts, no half-B prompt reaching a run
(the assertion fires on a doctored prompts file), and the choice written down before half B is generated."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch

SHAPES = Path(__file__).resolve().parents[1] / "training" / "shapes"


def _module(name: str):
    if str(SHAPES) not in sys.path:
        sys.path.insert(0, str(SHAPES))
    import importlib

    return importlib.import_module(name)


@pytest.fixture(scope="module")
def coarse_stage():
    return _module("coarse_stage")


@pytest.fixture(scope="module")
def quick(coarse_stage, tmp_path_factory):
    out = tmp_path_factory.mktemp("coarse-stage")
    threads = torch.get_num_threads()
    try:
        result = coarse_stage.main(["--quick", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)  # the runner pins one thread
    return out, result


def _half(index: int) -> set[str]:
    from realign_pipeline.shapes.world import held_out_halves, pairing_prompts

    return {r["prompt"] for r in pairing_prompts(held_out_halves()[index])}


def _consistent(entry: dict, before: list[float], after: list[float]) -> None:
    n = entry["n"]
    assert n == len(before) == len(after) > 0
    assert entry["fixed"] == sum(b == 0 and a == 1 for b, a in zip(before, after))
    assert entry["broken"] == sum(b == 1 and a == 0 for b, a in zip(before, after))
    assert entry["fixed"] + entry["unchanged"] + entry["broken"] == n
    assert entry["base_wrong"] + entry["base_right"] == n
    assert entry["fixed"] <= entry["base_wrong"] and entry["broken"] <= entry["base_right"]
    assert 0 <= entry["before"] <= 1 and 0 <= entry["after"] <= 1
    assert entry["difference"] == pytest.approx((entry["fixed"] - entry["broken"]) / n, abs=1e-4)
    assert entry["difference"] == pytest.approx(entry["after"] - entry["before"], abs=1e-3)
    low, high = entry["difference_ci"]
    assert -1 <= low <= entry["difference"] + 1e-9 and entry["difference"] - 1e-9 <= high <= 1
    for rate, count, total in (("fix_rate", "fixed", "base_wrong"), ("break_rate", "broken", "base_right")):
        if entry[total]:
            assert entry[rate] == pytest.approx(entry[count] / entry[total], abs=1e-4)
            low, high = entry[f"{rate}_ci"]
            assert 0 <= low <= entry[rate] + 1e-9 and entry[rate] - 1e-9 <= high <= 1
        else:
            assert entry[rate] is None and entry[f"{rate}_ci"] is None


def test_every_table_cell_is_in_range_and_consistent(quick):
    out, result = quick
    assert set(result["tables"]) == {"tuning", "half-a-rest", "training", "half-b"}
    assert list(result["runs"]) == ["likelihood-refl", "clip-full"]
    for split, table in result["tables"].items():
        rows = result["rows"][split]
        base = {(r["prompt"], r["seed"]): r for r in rows["base"]}
        assert len(base) == result["images"][split] == 2
        assert set(table) == {"fine stage", *result["runs"], *(f"{n} + fine stage" for n in result["runs"])}
        for label, entry in table.items():
            run = label.removesuffix(" + fine stage")
            kind = "fine" if label.endswith(" + fine stage") or label == "fine stage" else "coarse"
            mine = rows["base" if run == "fine stage" else run]
            assert {(r["prompt"], r["seed"]) for r in mine} == set(base)
            for metric in ("binding", "presence", "position"):
                pairs = [(base[(r["prompt"], r["seed"])]["coarse"][metric], r[kind][metric]) for r in mine]
                pairs = [(b, a) for b, a in pairs if b is not None and a is not None]
                if not pairs:
                    assert metric not in entry
                    continue
                _consistent(entry[metric], [b for b, _ in pairs], [a for _, a in pairs])
    # the per-pairing counts add up to the table's
    for split, per_run in result["by_pairing"].items():
        assert set(per_run) == set(result["runs"])
        for run, entries in per_run.items():
            entry = result["tables"][split][run]["binding"]
            for key in ("base_wrong", "fixed", "broken"):
                assert sum(e[key] for e in entries) == entry[key]
    # the markdown table says the same counts
    text = (out / "coarse_stage.md").read_text(encoding="utf-8")
    cells = re.findall(r"(\d+) / (\d+) / (\d+) of (\d+)", text)
    assert cells and all(int(f) + int(u) + int(b) == int(n) for f, u, b, n in cells)
    for run in result["runs"].values():
        curve = run["reward_curve"]
        assert curve["steps"] == 2 and len(curve["objective_by_stretch"]) == 2
        assert run["flags"] == (["--grad_step_range", "3", "4"] if run["mode"] == "refl" else ["--backprop_steps", "4"])
    saw = result["what_each_half_saw"]["halves"]
    assert saw["tuning"]["prompts"] == saw["half-a-rest"]["prompts"] == 48 and saw["half-b"]["prompts"] == 96


def test_no_half_b_prompt_reaches_a_run(quick, coarse_stage, tmp_path, monkeypatch):
    _, result = quick
    prompts = Path(result["data"]["prompts_file"]).read_text(encoding="utf-8").splitlines()
    assert set(prompts) == _half(0) and not set(prompts) & _half(1)
    trains = [e for e in result["events"] if e["event"] == "train"]
    assert [e["run"] for e in trains] == list(result["runs"]) and all(e["prompts_checked"] == 96 for e in trains)
    for split in ("tuning", "half-a-rest"):
        assert set(result["splits"][split]["prompts"]) <= _half(0)
    assert set(result["splits"]["half-b"]["prompts"]) <= _half(1)

    make_refl_data = _module("make_refl_data")
    for prompt in sorted(_half(1)):
        with pytest.raises(AssertionError, match="half-B"):
            make_refl_data.check_not_half_b(prompt)
    # a doctored prompts file: the assertion fires right before the launch, which never happens
    data = tmp_path / "data"
    shutil.copytree(Path(result["data"]["prompts_file"]).parent, data)
    doctored = data / "prompts.txt"
    doctored.write_text(doctored.read_text(encoding="utf-8") + min(_half(1)) + "\n", encoding="utf-8")
    launched = []
    monkeypatch.setattr(_module("experiment"), "train_in_process", lambda *args: launched.append(args))
    models = coarse_stage.shapes_models(None)
    with pytest.raises(AssertionError, match="half-B"):
        coarse_stage.train_run("likelihood-refl", models, {"prompts_file": str(doctored), "pairs": str(data / "pairs")},
                               tmp_path / "runs", 2, 4, coarse_stage.Events(tmp_path / "events.jsonl"))
    assert launched == []


def test_the_choice_is_written_before_half_b_is_generated(quick, coarse_stage):
    out, result = quick
    events = result["events"]
    names = [e["event"] for e in events]
    chosen = names.index("chosen")
    half_b = [i for i, e in enumerate(events) if e["event"] == "generate" and e["split"] == "half-b"]
    tuning = [i for i, e in enumerate(events) if e["event"] == "generate" and e["split"] == "tuning"]
    assert half_b and max(tuning) < chosen < min(half_b)
    assert events[chosen]["time_s"] <= events[min(half_b)]["time_s"]
    frozen = json.loads((out / "chosen.json").read_text(encoding="utf-8"))
    assert frozen["run"] == result["chosen"]["run"] == result["goal"]["run"] == events[chosen]["run"]
    assert frozen["time_s"] == events[chosen]["time_s"] and frozen["candidates"] == list(result["runs"])
    assert [line["event"] for line in map(json.loads, (out / "events.jsonl").read_text().splitlines())] == names
    # the quick run's tuning images tie or not: the rule picks the highest binding gain, then the cheaper mode
    table = {n: {"binding": {"difference": d}} for n, d in
             (("likelihood-full", 0.1), ("clip-refl", 0.1), ("likelihood-draft", 0.1), ("clip-draft", 0.0))}
    assert coarse_stage.choose(table, list(table))["run"] == "clip-refl"
    table["clip-draft"]["binding"]["difference"] = 0.2
    assert coarse_stage.choose(table, list(table))["run"] == "clip-draft"
    # a rerun keeps the frozen choice, and stops when the tuning images would now choose otherwise
    chosen_file = out / "chosen.json"
    saved = chosen_file.read_text(encoding="utf-8")
    other = next(n for n in result["runs"] if n != frozen["run"])
    threads = torch.get_num_threads()
    try:
        chosen_file.write_text(json.dumps({**frozen, "run": other}), encoding="utf-8")
        with pytest.raises(RuntimeError, match="froze"):
            coarse_stage.main(["--quick", "--out", str(out)])
    finally:
        chosen_file.write_text(saved, encoding="utf-8")
        torch.set_num_threads(threads)


def test_by_pairing_counts_the_coarse_images_against_the_base(coarse_stage):
    def row(prompt, seed, pairing, binding):
        return {"prompt": prompt, "seed": seed, "pairing": pairing, "coarse": {"binding": binding}}

    base = [row("a", 0, "p", 0), row("a", 1, "p", 0), row("b", 0, "q", 1), row("c", 0, "r", 1), row("d", 0, "s", None)]
    run = [row("a", 0, "p", 1), row("a", 1, "p", 0), row("b", 0, "q", 0), row("c", 0, "r", 1), row("d", 0, "s", 1)]
    assert coarse_stage.by_pairing(base, run) == [
        {"pairing": "p", "images": 2, "base_wrong": 2, "fixed": 1, "broken": 0},
        {"pairing": "q", "images": 1, "base_wrong": 0, "fixed": 0, "broken": 1},
    ]  # r: right and unchanged; s: no read-out on the base image


def test_publish_splits_the_result_and_keeps_every_read_out(quick, coarse_stage, tmp_path):
    _, result = quick
    main_file, rows_file = coarse_stage.publish(result, tmp_path / "docs" / "coarse")
    summary, table = json.loads(main_file.read_text()), json.loads(rows_file.read_text())
    assert "rows" not in summary and summary["tables"] == json.loads(json.dumps(result["tables"]))
    for split, configs in result["rows"].items():
        for config, rows in configs.items():
            rebuilt = [dict(zip(table["record_columns"], record)) | dict(zip(table["score_columns"], score))
                       for record, score in zip(table["records"][split], table["scores"][split][config], strict=True)]
            assert len(rebuilt) == len(rows) > 0
            for r, b in zip(rows, rebuilt):
                assert (b["prompt"], b["seed"], b["pairing"], b["realigned"]) == (
                    r["prompt"], r["seed"], r["pairing"], r["realigned"])
                assert all(b[f"{k}_{m}"] == r[k][m] for k in ("coarse", "fine") for m in ("binding", "presence", "position"))
