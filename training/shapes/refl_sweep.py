"""How ReFL's settings change alignment on the shapes world (an ablation for docs/shapes.md).

    python training/shapes/refl_sweep.py --out outputs/shapes-refl-sweep [--limit 48] [--seeds 0 1]

Trains one ReFL LoRA per setting (:data:`SETTINGS`, each a change of the experiment's run settings in
``experiment.py``) and generates the held-out prompts with and without it from the same noise. Reports per
setting: the checker's presence / binding / position, how many images the LoRA fixed (binding 0 -> 1) and
broke (1 -> 0) against the base model, the mean absolute pixel change, and the reward curve from
``train_log.jsonl`` (the training objective and ``L_pre`` over the first and the last fifth of the steps).
Writes ``<out>/refl_sweep.json``; trained LoRAs are kept and reused by a rerun with the same settings.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:
    sys.path.insert(0, str(_HERE))

from ablation import GENERATION, add_job_arguments, fixed_and_broken, heldout_jobs, pixel_changes, summary
from experiment import REFL_COMMON, REFL_RUNS, shapes_models, train_refl_run
from make_refl_data import make_refl_data

from realign_pipeline.shapes.checker import check_prompt
from realign_pipeline.shapes.metric import parse_shapes_prompt

#: folder -> (label, experiment run, overrides of its settings, steps). The first is the experiment's own.
SETTINGS: dict[str, tuple[str, str, dict[str, Any], int]] = {
    "likelihood-experiment": ("likelihood, the experiment's setting", "refl-caption-likelihood", {}, 300),
    "likelihood-first-run": ("likelihood, lambda 0.05, lr 2e-4 (the first full run)", "refl-caption-likelihood",
                             {"reward_weight": 0.05, "learning_rate": 2e-4}, 300),
    "likelihood-lr1e-3": ("likelihood, lr 1e-3, 400 steps", "refl-caption-likelihood",
                          {"learning_rate": 1e-3}, 400),
    "likelihood-lambda5-lr1e-3": ("likelihood, lambda 5, lr 1e-3", "refl-caption-likelihood",
                                  {"reward_weight": 5.0, "learning_rate": 1e-3}, 300),
    "likelihood-early-steps": ("likelihood, lambda 2, lr 1e-3, gradient at steps 5-19 of 20",
                               "refl-caption-likelihood",
                               {"reward_weight": 2.0, "learning_rate": 1e-3, "grad_step_range": (5, 20)}, 300),
    "clip-lr1e-3": ("CLIP, lr 1e-3, 400 steps", "refl-clip", {"learning_rate": 1e-3}, 400),
}

def reward_curve(log_file: Path) -> dict[str, Any]:
    """Mean training objective and ``L_pre`` over the first and the last fifth of the logged steps."""
    rows = [json.loads(line) for line in log_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    fifth = max(1, len(rows) // 5)

    def mean(part: list[dict], key: str) -> float:
        return round(float(np.mean([r[key] for r in part])), 4)

    return {"steps": len(rows),
            "objective_first": mean(rows[:fifth], "objective"), "objective_last": mean(rows[-fifth:], "objective"),
            "loss_pre_first": mean(rows[:fifth], "loss_pre"), "loss_pre_last": mean(rows[-fifth:], "loss_pre")}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder (LoRAs, refl_sweep.json)")
    parser.add_argument("--models", default=None, help="as experiment.py --models (default: the shipped assets)")
    add_job_arguments(parser)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start = time.time()
    out = Path(args.out)
    models = shapes_models(args.models)
    data = make_refl_data(out / "refl-data", num_images=512, num_prompts=256)
    trained = {}
    for folder in args.settings:
        label, run, overrides, steps = SETTINGS[folder]
        print(f"[refl sweep] {label}", flush=True)
        trained[folder] = train_refl_run(run, models, data, out / folder, steps, overrides)

    from realign_pipeline import RealignDiffPipeline

    pipe = RealignDiffPipeline.from_pretrained(models["pipeline"])
    pipe.set_progress_bar_config(disable=True)
    jobs = heldout_jobs(args.limit, args.seeds)

    def generate() -> list:
        return [pipe(p, generator=torch.Generator().manual_seed(s), **GENERATION).images[0] for p, s in jobs]

    base_images = generate()
    base_rows = [check_prompt(im, parse_shapes_prompt(p)) for im, (p, _) in zip(base_images, jobs)]
    result: dict[str, Any] = {"prompts": args.limit, "seeds": args.seeds, "images": len(jobs),
                              "experiment_settings": {k: list(v) if isinstance(v, tuple) else v
                                                      for k, v in REFL_COMMON.items()},
                              "base": summary(base_rows), "settings": {}}
    for folder, record in trained.items():
        label, run, overrides, steps = SETTINGS[folder]
        pipe.load_lora_weights(record["folder"])
        images = generate()
        pipe.unload_lora_weights()
        rows = [check_prompt(im, parse_shapes_prompt(p)) for im, (p, _) in zip(images, jobs)]
        change = pixel_changes(base_images, images)
        fixed, broken = fixed_and_broken([b["binding"] for b in base_rows], [r["binding"] for r in rows])
        result["settings"][folder] = {
            "label": label, "run": run, "steps": steps,
            "reward_weight": overrides.get("reward_weight", REFL_RUNS[run]["reward_weight"]),
            "learning_rate": overrides.get("learning_rate", REFL_COMMON["learning_rate"]),
            "overrides": {k: list(v) if isinstance(v, tuple) else v for k, v in overrides.items()},
            **summary(rows),
            "fixed": fixed, "broken": broken,
            "mean_abs_pixel_change": round(float(np.mean(change)), 2),
            "images_changed_over_10": sum(c > 10 for c in change),
            "reward_curve": reward_curve(Path(record["folder"]) / "train_log.jsonl"),
        }
        print(folder, result["settings"][folder], flush=True)
    result["wall_s"] = round(time.time() - start, 1)
    (out / "refl_sweep.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({k: v for k, v in result.items() if k != "settings"}, indent=2))


if __name__ == "__main__":
    main()
