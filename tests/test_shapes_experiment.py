"""``training/shapes/experiment.py --quick`` end to end on tiny stand-in models (not the shipped weights):
ReFL data, the four ReFL LoRAs (train_refl.py subprocesses), the evaluation and the paper's Tables 2 / 3."""

from __future__ import annotations

import json
import math
import os
import subprocess
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


def _run(out: Path, models: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(EXPERIMENT), "--out", str(out), "--models", str(models), "--quick"],
                          check=False, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads((out / "experiment.json").read_text(encoding="utf-8"))


def test_quick_experiment_end_to_end_and_resume(stand_in_models: Path, tmp_path: Path) -> None:
    out = tmp_path / "exp"
    record = _run(out, stand_in_models)

    # ReFL data: training split only
    prompts = Path(record["refl_data"]["prompts_file"]).read_text(encoding="utf-8").splitlines()
    make_refl_data = _import_training("make_refl_data")
    for prompt in prompts:
        make_refl_data.check_not_held_out(prompt)
    assert (Path(record["refl_data"]["pairs"]) / "metadata.jsonl").is_file()

    # four LoRAs, 2 steps each
    assert set(record["refl_runs"]) == {"refl-caption-likelihood", "refl-caption-scorefn", "refl-clip", "refl-blip"}
    for run in record["refl_runs"].values():
        assert Path(run["lora"]).is_file() and run["steps"] == 2 and not run["skipped"]
        assert json.loads((Path(run["folder"]) / "train_stats.json").read_text())["global_step"] == 2

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
    assert Path(record["grid"]).is_file()
    assert set(record["timings"]) >= {"refl_data", "refl", "evaluation", "total"}
    assert record["evaluation"]["configs"]["shapes"]["generated"] == 4

    # a rerun skips finished work: no training, no generation; the same numbers
    table2 = json.loads((out / "table2.json").read_text(encoding="utf-8"))
    again = _run(out, stand_in_models)
    assert all(r["skipped"] for r in again["refl_runs"].values())
    assert all(c["generated"] == 0 for c in again["evaluation"]["configs"].values())
    assert json.loads((out / "table2.json").read_text(encoding="utf-8")) == table2
