"""``training/shapes/experiment.py --quick`` end to end on tiny stand-in models (not the shipped weights):
ReFL data, the four ReFL LoRAs (train_refl.py), the evaluation and the paper's Tables 2 / 3, then the script
rerun as a command (its ``__main__`` block, in this process) that skips the finished work."""

from __future__ import annotations

import json
import math
import runpy
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHAPES = ROOT / "training" / "shapes"
EXPERIMENT = SHAPES / "experiment.py"


def _import_training(name: str):
    if str(SHAPES) not in sys.path:
        sys.path.insert(0, str(SHAPES))
    import importlib

    return importlib.import_module(name)


@pytest.fixture(scope="module")
def stand_in_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """pipeline/ (tiny random SD-2-style UNet, v-prediction, 32 px, with the shapes dense captioner), clip/,
    blip2-captioner/ and blip2-itm/ (the shapes training scripts' own architectures, untrained)."""
    from realign_pipeline import RealignDiffPipeline
    from realign_pipeline.shapes.perception import shapes_dense_captioner
    from realign_pipeline.testing import tiny_components

    root = tmp_path_factory.mktemp("shapes-models")
    torch.manual_seed(0)
    components = tiny_components("sd2")
    assert components["scheduler"].config.prediction_type == "v_prediction"
    pipe = RealignDiffPipeline(**components, requires_safety_checker=False, dense_captioner=shapes_dense_captioner())
    pipe.save_pretrained(root / "pipeline")

    train_clip = _import_training("train_clip")
    train_clip.make_clip().save_pretrained(root / "clip")
    train_clip.make_tokenizer().save_pretrained(root / "clip")
    train_clip.make_image_processor().save_pretrained(root / "clip")

    train_blip2 = _import_training("train_blip2")
    for name, make in (("blip2-captioner", train_blip2.make_captioner), ("blip2-itm", train_blip2.make_itm)):
        model, processor = make()
        model.save_pretrained(root / name)
        processor.save_pretrained(root / name)
    return root


def _run_in_process(out: Path, models: Path) -> dict:
    experiment = _import_training("experiment")
    threads = torch.get_num_threads()
    try:
        experiment.main(["--out", str(out), "--models", str(models), "--quick"])
    finally:
        torch.set_num_threads(threads)  # the experiment pins one thread
    return json.loads((out / "experiment.json").read_text(encoding="utf-8"))


def _run_command(out: Path, models: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> dict:
    """The script as ``python training/shapes/experiment.py ...`` runs it (its ``__main__`` block, its argv), in this
    process: without training/shapes on sys.path and without its sibling modules imported, so that the
    script's own path set-up is what imports them (an interpreter start-up would cost more than the rerun)."""
    monkeypatch.setattr(sys, "path", [p for p in sys.path if Path(p or ".").resolve() != SHAPES])
    for name in [n for n, m in sys.modules.items() if Path(getattr(m, "__file__", None) or "/").parent == SHAPES]:
        monkeypatch.delitem(sys.modules, name)
    argv = [str(EXPERIMENT), "--out", str(out), "--models", str(models), "--quick"]
    monkeypatch.setattr(sys, "argv", argv)
    threads = torch.get_num_threads()
    try:
        runpy.run_path(str(EXPERIMENT), run_name="__main__")
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    assert "Table 2 (shapes world)" in printed and '"total"' in printed  # the tables and the timings
    return json.loads((out / "experiment.json").read_text(encoding="utf-8"))


def test_quick_experiment_end_to_end_and_resume(stand_in_models: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    out = tmp_path / "exp"
    record = _run_in_process(out, stand_in_models)

    # ReFL data: training split only
    prompts = Path(record["refl_data"]["prompts_file"]).read_text(encoding="utf-8").splitlines()
    make_refl_data = _import_training("make_refl_data")
    for prompt in prompts:
        make_refl_data.check_not_held_out(prompt)
    assert (Path(record["refl_data"]["pairs"]) / "metadata.jsonl").is_file()

    # four LoRAs, 2 steps each, of the quick 4-step chain; the evaluation samples 4 steps too
    assert record["refl_common"]["num_inference_steps"] == 4 and record["refl_common"]["grad_step_range"] == [3, 4]
    assert record["eval_steps"] == 4
    assert set(record["refl_runs"]) == {"refl-caption-likelihood", "refl-caption-scorefn", "refl-clip", "refl-blip"}
    for run in record["refl_runs"].values():
        assert Path(run["lora"]).is_file() and run["steps"] == 2 and not run["skipped"]
        assert json.loads((Path(run["folder"]) / "train_stats.json").read_text())["global_step"] == 2
        assert "ReFL (one gradient step" in (Path(run["folder"]) / "train.log").read_text()  # the script's log, in its file

    # every table cell produced and in range (caption reward is a cosine)
    assert record["num_prompts"] == 4 and record["seeds"] == [0]
    for name, rows in (("table2", 4), ("table3", 6), ("objectives", 4)):
        table = json.loads((out / f"{name}.json").read_text(encoding="utf-8"))
        assert len(table["rows"]) == rows and (out / f"{name}.md").is_file()
        for row in table["rows"]:
            for metric, cell in row["values"].items():
                low, high = (-1.0, 1.0) if metric == "caption_reward" else (0.0, 1.0)
                mean, ci = cell["mean"], cell["ci"]
                assert mean is not None and not math.isnan(mean), (name, row["label"], metric)
                assert low <= mean <= high, (name, row["label"], metric, mean)
                assert ci is not None and low <= ci[0] <= mean + 1e-9 <= ci[1] + 2e-9 and ci[1] <= high
    differences = json.loads((out / "differences.json").read_text(encoding="utf-8"))
    assert len(differences["rows"]) == len(_import_training("experiment").DIFFERENCES)
    for row in differences["rows"]:
        for metric in ("shapes_binding", "shapes_presence"):
            d = row[metric]
            assert d["n"] == 4 and -1.0 <= d["ci"][0] <= d["mean"] + 1e-9 <= d["ci"][1] + 2e-9 <= 1.0 + 2e-9
            assert 0 <= d["fixed"] + d["broken"] <= d["n"]
    assert Path(record["grid"]).is_file()
    assert set(record["timings"]) >= {"refl_data", "refl", "evaluation", "total"}
    assert record["evaluation"]["configs"]["shapes"]["generated"] == 4

    # the command line, rerun: it skips finished work (no training, no generation) and gives the same numbers
    table2 = json.loads((out / "table2.json").read_text(encoding="utf-8"))
    again = _run_command(out, stand_in_models, monkeypatch, capsys)
    assert all(r["skipped"] for r in again["refl_runs"].values())
    assert all(c["generated"] == 0 for c in again["evaluation"]["configs"].values())
    assert again["timings"] == record["timings"] and "total" in again["timings_rerun"]  # the working run's times
    assert json.loads((out / "table2.json").read_text(encoding="utf-8")) == table2


def test_refl_sweep_reward_curve_reads_the_first_and_last_fifth(tmp_path: Path) -> None:
    refl_sweep = _import_training("refl_sweep")
    log = tmp_path / "train_log.jsonl"
    rows = [{"step": i + 1, "objective": float(i), "loss_pre": 1.0 if i < 5 else 0.5} for i in range(25)]
    log.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    curve = refl_sweep.reward_curve(log)
    assert curve["steps"] == 25
    assert curve["objective_first"] == 2.0 and curve["objective_last"] == 22.0  # means of 0..4 and 20..24
    assert curve["loss_pre_first"] == 1.0 and curve["loss_pre_last"] == 0.5
    # every setting starts from one of the experiment's runs and changes only its known settings
    experiment = _import_training("experiment")
    for label, run, overrides, steps in refl_sweep.SETTINGS.values():
        assert run in experiment.REFL_RUNS and steps >= 1 and label
        assert set(overrides) <= set(experiment.REFL_COMMON) | set(experiment.REFL_RUNS[run])


def test_paired_difference_counts_fixed_and_broken_images(tmp_path: Path) -> None:
    experiment = _import_training("experiment")
    eval_dir = tmp_path / "eval"
    binding = {"a": [1, 1, 0, 0, 1, 1], "b": [1, 0, 1, 1, 1, None]}  # B fixes 2, breaks 1; one B image unscored
    for config, values in binding.items():
        for seed in (0, 1):
            folder = eval_dir / config / f"seed{seed}"
            folder.mkdir(parents=True)
            rows = [{"prompt_key": f"set/{i}", "scores": {"shapes_binding": v}}
                    for i, v in enumerate(values[seed * 3:seed * 3 + 3])]
            (folder / "per_image.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    d = experiment.paired_difference(eval_dir, "a", "b")
    assert d["n"] == 5 and d["fixed"] == 2 and d["broken"] == 1
    assert d["mean"] == pytest.approx((0 - 1 + 1 + 1 + 0) / 5)
    assert d["ci"][0] <= d["mean"] <= d["ci"][1]
