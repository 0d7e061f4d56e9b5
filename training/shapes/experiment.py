#!/usr/bin/env python
"""The shapes-world experiment: the paper's Tables 2 and 3 (and the two caption objectives) in one command.

    python training/shapes/experiment.py --out outputs/shapes-experiment [--models DIR] [--quick]
        [--refl-steps N] [--seeds 0 1 2] [--limit N]

Steps (each resumable: rerunning skips finished work):

1. ReFL data (``make_refl_data.py``): training-split scenes for ``L_pre`` and training-split reward prompts.
2. Four ReFL LoRAs of the shapes UNet, each ``training/train_refl.py`` (run in this process, one thread, its
   output in ``train.log``) at 32 px with a shapes-world model as the reward (:data:`REFL_RUNS`): ``refl-caption-likelihood``
   and ``refl-caption-scorefn`` (Eq. 4's caption reward with either differentiable objective), ``refl-clip``
   (the world's small CLIP) and ``refl-blip`` (the BLIP-2 ITM match probability). A run whose LoRA and
   ``train_stats.json`` exist with the same settings is skipped; an interrupted one resumes from its latest
   checkpoint.
3. ``run_evaluation`` on ``shapes-heldout`` (held-out pairings only) with the metrics ``shapes`` (the world's
   checker: presence, binding, position) and ``caption_reward`` (Eq. 4 with the shapes BLIP-2 models) for
   ``shapes`` (base), ``shapes-realign`` (+ fine stage) and, per LoRA, ``<run>`` (+ ReFL) and
   ``<run>+realign`` (both).
4. ``table2.md`` / ``table2.json`` (Table 2: base, + fine stage, + ReFL with the caption reward, both),
   ``table3.md`` / ``table3.json`` (Table 3: ReFL with the caption vs the CLIP vs the BLIP-2 reward),
   ``objectives.md`` / ``objectives.json`` (likelihood vs score-function caption objective), every cell
   ``mean [95% CI]`` (prompt-clustered bootstrap, seeds pooled); ``differences.md`` / ``.json`` (paired
   differences of binding and presence between configurations on the same prompts and seeds, with CIs and the
   images fixed / broken); the sample grid ``eval/report/grid.png``; and
   ``experiment.json`` (settings and timings).

``--models DIR`` is a folder with ``pipeline/``, ``clip/``, ``blip2-captioner/`` and ``blip2-itm/`` (default:
the shipped ``realign_pipeline/assets/shapes``). ``--quick`` (the test): 4 prompts, 1 seed, 2 ReFL steps, 4-step chains (:data:`QUICK`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:
    sys.path.insert(0, str(_HERE))

import numpy as np
import torch
from ablation import fixed_and_broken
from make_refl_data import make_refl_data

TRAIN_REFL = _HERE.parent / "train_refl.py"
MODEL_NAMES = ("pipeline", "clip", "blip2-captioner", "blip2-itm")
#: Caption length limit for sampling / greedy captions. The shapes captions have at most 10 words, and the
#: BLIP-2 ITM Q-Former has 32 positions while its tokenizer says 64: 30 sampled words overflow it.
MAX_CAPTION_TOKENS = 16

#: ReFL settings shared by every run (the shapes UNet samples with 20 DDIM steps, as the evaluation does).
#: The gradient is taken at one of the last 5 of 20 steps (the paper: one of the last 20 of 50 is ReFL's,
#: scaled to where a 32 px image is already legible). LoRA rank 8 on the attention projections, lr 5e-4,
#: batch 4, constant schedule, seed 0. At lr 2e-4 with the reward ~ L_pre (the first full run) the LoRA left
#: the images nearly unchanged; at lr 1e-3 it drifts and breaks binding (refl_sweep.py, docs/shapes.md).
REFL_COMMON: dict[str, Any] = {
    "resolution": 32,
    "num_inference_steps": 20,
    "grad_step_range": (15, 20),
    "rank": 8,
    "learning_rate": 5e-4,
    "train_batch_size": 4,
    "pretrain_loss_weight": 1.0,
    "reward_margin": 1.0,
    "seed": 0,
}

#: The four ReFL runs. ``reward_weight`` (lambda of Eq. 5) is set so that lambda times the reward's
#: matched-vs-mismatched gap is about 2, twenty times ``L_pre`` (v-prediction MSE ~0.1-0.16), so that the
#: reward, not L_pre, sets the direction of the update while L_pre still holds the model near the data:
#: likelihood gap ~2 nats (-> 1.0), Eq. 4 cosine gap ~0.4 (-> 5.0), CLIP cosine gap ~1 (-> 2.0), ITM
#: probability gap ~1 (-> 2.0). The margin 1.0 keeps the hinge active for all four (none of the objectives
#: exceeds 1), so the reward term is linear in the reward.
REFL_RUNS: dict[str, dict[str, Any]] = {
    "refl-caption-likelihood": {"reward": "caption", "reward_objective": "likelihood", "reward_weight": 1.0},
    "refl-caption-scorefn": {"reward": "caption", "reward_objective": "score_function", "reward_weight": 5.0},
    "refl-clip": {"reward": "clip", "reward_weight": 2.0},
    "refl-blip": {"reward": "blip", "reward_weight": 2.0},
}

FULL = {"refl_steps": 300, "seeds": [0, 1, 2], "limit": None, "num_images": 512, "num_prompts": 256,
        "refl_overrides": {}, "eval_steps": None}
#: The smoke test: 4 prompts, 1 seed, 2 ReFL steps, and a 4-step chain everywhere (the ReFL rollouts take the
#: gradient at their last step; the evaluation samples 4 DDIM steps instead of the presets' 20): the same runs,
#: files and tables, at a fraction of the sampling.
QUICK = {"refl_steps": 2, "seeds": [0], "limit": 4, "num_images": 16, "num_prompts": 16,
         "refl_overrides": {"num_inference_steps": 4, "grad_step_range": (3, 4)}, "eval_steps": 4}

#: Table columns: (metrics.json entry, header).
COLUMNS = (
    ("shapes_presence", "object presence"),
    ("shapes_binding", "attribute binding"),
    ("shapes_position", "position"),
    ("caption_reward", "caption reward (Eq. 4)"),
)


def shapes_models(models: str | os.PathLike | None) -> dict[str, Path]:
    """``{name: folder}`` of the four shapes models in `models` (default: the shipped assets folder)."""
    if models is None:
        from realign_pipeline.shapes.pretrained import shapes_model_path

        return {name: shapes_model_path(name) for name in MODEL_NAMES}  # FileNotFoundError says what is missing
    root = Path(models)
    found = {name: root / name for name in MODEL_NAMES}
    missing = [n for n, p in found.items() if not (p / "config.json").is_file() and not (p / "model_index.json").is_file()]
    if missing:
        raise FileNotFoundError(
            f"--models {root}: missing {missing} (each a from_pretrained folder: pipeline/ with model_index.json, "
            "clip/, blip2-captioner/, blip2-itm/ with config.json); see training/shapes/ for how to train them."
        )
    return {name: p.resolve() for name, p in found.items()}


# --- ReFL ----------------------------------------------------------------------------------------------------
def train_refl_arguments(spec: dict[str, Any], models: dict[str, Path], data: dict[str, Any], output_dir: Path,
                         steps: int, gradient_flags: Sequence[str]) -> list[str]:
    """``train_refl.py``'s arguments for a LoRA run on a shapes world: the settings in `spec` (those of
    :data:`REFL_COMMON` and the reward's), the gradient mode's flags (`gradient_flags`) after the step count."""
    cmd = ["--pretrained_model_name_or_path", str(models["pipeline"]),
           "--reward", spec["reward"],
           "--reward_weight", str(spec["reward_weight"]), "--reward_margin", str(spec["reward_margin"]),
           "--prompts_file", data["prompts_file"], "--train_data_dir", data["pairs"],
           "--pretrain_loss_weight", str(spec["pretrain_loss_weight"]),
           "--resolution", str(spec["resolution"]), "--num_inference_steps", str(spec["num_inference_steps"]),
           *gradient_flags,
           "--use_lora", "--rank", str(spec["rank"]), "--learning_rate", str(spec["learning_rate"]),
           "--train_batch_size", str(spec["train_batch_size"]), "--max_train_steps", str(steps),
           "--seed", str(spec["seed"]), "--checkpointing_steps", str(max(25, steps // 4)),
           "--checkpoints_total_limit", "1", "--resume_from_checkpoint", "latest",
           "--report_to", "none", "--output_dir", str(output_dir)]
    if spec["reward"] == "caption":
        cmd += ["--reward_model_path", str(models["blip2-captioner"]),
                "--reward_text_model_path", str(models["blip2-itm"]),
                "--reward_objective", spec["reward_objective"],
                "--reward_kwargs", json.dumps({"max_new_tokens": MAX_CAPTION_TOKENS})]
    else:
        cmd += ["--reward_model_path", str(models["clip" if spec["reward"] == "clip" else "blip2-itm"])]
    return cmd


def refl_command(name: str, models: dict[str, Path], data: dict[str, Any], output_dir: Path, steps: int,
                 overrides: dict[str, Any] | None = None) -> list[str]:
    """The ``train_refl.py`` command line of run `name` (:data:`REFL_RUNS`), with `overrides` of its settings."""
    spec = {**REFL_COMMON, **REFL_RUNS[name], **(overrides or {})}
    gradient_flags = ["--grad_step_range", *map(str, spec["grad_step_range"])]
    return [sys.executable, str(TRAIN_REFL),
            *train_refl_arguments(spec, models, data, output_dir, steps, gradient_flags)]


def train_in_process(argv: list[str], log_path: Path) -> None:
    """``train_refl.main`` on `argv` in this process, its output appended to `log_path`.

    In-process rather than a subprocess: four interpreter start-ups (torch, diffusers, transformers, peft
    imports) were most of the reduced experiment's time; the step math and the files written are the same.
    """
    if str(TRAIN_REFL.parent) not in sys.path:
        sys.path.insert(0, str(TRAIN_REFL.parent))
    import train_refl

    root = logging.getLogger()
    handlers = list(root.handlers)
    with log_path.open("a", encoding="utf-8") as log, contextlib.redirect_stdout(log), \
            contextlib.redirect_stderr(log):
        for handler in handlers:  # the script's own logging goes to its log, not to the terminal
            root.removeHandler(handler)
        try:
            train_refl.main(train_refl.parse_args(argv))
        finally:
            for handler in list(root.handlers):  # basicConfig bound a handler to this (soon closed) file
                root.removeHandler(handler)
            for handler in handlers:
                root.addHandler(handler)


def cached_train_run(folder: Path, argv: list[str], settings: dict[str, Any], steps: int, files: str,
                     before_launch: Callable[[], None] | None = None,
                     extra_timing: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
                     label: str = "run") -> dict[str, Any]:
    """``train_refl.py`` on `argv` into `folder`, in this process, unless done already.

    Skipped when the LoRA, ``train_stats.json`` and ``<files>_timing.json`` exist and ``<files>_settings.json``
    holds `settings`; started over (the folder removed) when it holds other settings; otherwise launched, which
    resumes from the latest checkpoint. `before_launch` runs right before the launch. Returns ``{"skipped": ...,
    "seconds": ..., "seconds_per_step": ...}`` plus ``extra_timing(train_stats)``, as kept in the timing file.
    """
    lora, stats_file = folder / "pytorch_lora_weights.safetensors", folder / "train_stats.json"
    settings_file, timing_file = folder / f"{files}_settings.json", folder / f"{files}_timing.json"
    saved = json.loads(settings_file.read_text(encoding="utf-8")) if settings_file.is_file() else None
    if lora.is_file() and stats_file.is_file() and saved == settings and timing_file.is_file():
        return {"skipped": True, **json.loads(timing_file.read_text(encoding="utf-8"))}
    if saved is not None and saved != settings:  # other settings: start over
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    settings_file.write_text(json.dumps(settings, indent=1) + "\n", encoding="utf-8")
    lora.unlink(missing_ok=True)
    stats_file.unlink(missing_ok=True)
    if before_launch is not None:
        before_launch()
    start = time.perf_counter()
    error: BaseException | None = None
    try:
        train_in_process(argv, folder / "train.log")
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - reported below with the log's tail
        error = exc
    seconds = time.perf_counter() - start
    if error is not None or not lora.is_file():
        tail = (folder / "train.log").read_text(encoding="utf-8", errors="replace")[-3000:]
        raise RuntimeError(f"{label} failed ({error!r}); log {folder / 'train.log'}:\n{tail}") from error
    timing = {"seconds": round(seconds, 2), "seconds_per_step": round(seconds / max(steps, 1), 3)}
    if extra_timing is not None:
        timing.update(extra_timing(json.loads(stats_file.read_text(encoding="utf-8"))))
    timing_file.write_text(json.dumps(timing) + "\n", encoding="utf-8")
    return {"skipped": False, **timing}


def train_refl_run(name: str, models: dict[str, Path], data: dict[str, Any], out: Path, steps: int,
                   overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train (or skip / resume) one ReFL LoRA into ``out/<name>``; returns its record for experiment.json."""
    folder = out / name
    cmd = refl_command(name, models, data, folder, steps, overrides)
    settings = {"command": [str(c) for c in cmd[1:]], "steps": steps}
    record: dict[str, Any] = {"folder": str(folder), "lora": str(folder / "pytorch_lora_weights.safetensors"),
                              "steps": steps, **REFL_RUNS[name], **(overrides or {})}
    return {**record, **cached_train_run(folder, cmd[2:], settings, steps, "experiment", label=f"ReFL run {name}")}


# --- evaluation ----------------------------------------------------------------------------------------------
def caption_reward_metric(models: dict[str, Path]):
    """Eq. 4 as a metric with the given shapes BLIP-2 models (float32, CPU), with a stable ``str`` so that
    ``run_evaluation`` recognises a folder scored by the same models and skips it."""
    from realign_pipeline.evaluation.metrics import CaptionRewardScore

    class ShapesCaptionReward(CaptionRewardScore):
        def __str__(self) -> str:
            return f"caption_reward({models['blip2-captioner']}, {models['blip2-itm']}, {MAX_CAPTION_TOKENS})"

    metric = ShapesCaptionReward.from_pretrained(str(models["blip2-captioner"]), device="cpu", dtype=torch.float32,
                                                 text_encoder=str(models["blip2-itm"]),
                                                 max_new_tokens=MAX_CAPTION_TOKENS)
    return metric


def eval_configs(models: dict[str, Path], loras: dict[str, str], steps: int | None = None) -> list:
    """base, + fine stage, and per LoRA + ReFL and both: :class:`EvalConfig` on the given pipeline folder
    (`steps`: denoising steps instead of the presets' 20)."""
    from realign_pipeline.evaluation.configs import load_config

    pipeline = str(models["pipeline"])
    common = {"model": pipeline, **({} if steps is None else {"steps": int(steps)})}
    configs = [load_config("shapes").replace(**common), load_config("shapes-realign").replace(**common)]
    for name, lora in loras.items():
        configs.append(load_config("shapes-refl").replace(name=name, lora=lora, **common,
                                                          description=f"shapes + ReFL LoRA {name}"))
        configs.append(load_config("shapes-refl+realign").replace(
            name=f"{name}+realign", lora=lora, **common, description=f"shapes + ReFL LoRA {name} + fine stage"))
    return configs


def heldout_records(limit: int | None, seed: int = 0) -> list:
    """The ``shapes-heldout`` prompts; with `limit`, a seeded subset balanced over the caption forms (and, with,
    left, right) so that even 4 prompts have a position value."""
    from realign_pipeline.evaluation.prompts import load_prompts

    records = load_prompts("shapes-heldout")
    if limit is None or limit >= len(records):
        return records
    rng = random.Random(seed)
    groups: dict[str, list] = {}
    for record in records:
        groups.setdefault(str((record.metadata or {}).get("form")), []).append(record)
    for group in groups.values():
        rng.shuffle(group)
    picked, order = [], sorted(groups)
    while len(picked) < limit:
        for form in order:
            if groups[form] and len(picked) < limit:
                picked.append(groups[form].pop())
    return picked


# --- tables --------------------------------------------------------------------------------------------------
def _cell(entry: dict[str, Any] | None) -> tuple[str, dict[str, Any]]:
    if not entry or entry.get("mean") is None or math.isnan(entry["mean"]):
        return "—", {"mean": None, "ci": None, "n": None}
    mean, lo, hi = entry["mean"], entry.get("ci_low"), entry.get("ci_high")
    ci = None if lo is None or hi is None else [lo, hi]
    text = f"{mean:.3f}" + ("" if ci is None else f" [{lo:.3f}, {hi:.3f}]")
    return text, {"mean": mean, "ci": ci, "n": entry.get("n")}


def write_table(path: Path, title: str, note: str, rows: list[tuple[str, str]], eval_dir: Path) -> dict[str, Any]:
    """``path``.md and .json: one row per (label, configuration), the :data:`COLUMNS` as mean [95% CI]."""
    from realign_pipeline.evaluation.run import config_folder_name

    lines = [f"# {title}", "", note, "",
             "| | " + " | ".join(h for _, h in COLUMNS) + " |", "|---|" + "---:|" * len(COLUMNS)]
    table: dict[str, Any] = {"title": title, "columns": [m for m, _ in COLUMNS], "rows": []}
    for label, config in rows:
        metrics = json.loads((eval_dir / config_folder_name(config) / "metrics.json").read_text(encoding="utf-8"))
        cells = [_cell(metrics["metrics"].get(m)) for m, _ in COLUMNS]
        lines.append(f"| {label} | " + " | ".join(c[0] for c in cells) + " |")
        table["rows"].append({"label": label, "config": config,
                              "values": {m: c[1] for (m, _), c in zip(COLUMNS, cells, strict=True)}})
    lines += ["", ("Mean over every image of every seed; [95% CI]: prompt-clustered percentile bootstrap (2000 "
                   "resamples, seeds of a prompt kept together). Position: the left/right prompts only."), ""]
    path.with_suffix(".md").write_text("\n".join(lines), encoding="utf-8")
    path.with_suffix(".json").write_text(json.dumps(table, indent=2) + "\n", encoding="utf-8")
    return table


def write_tables(out: Path, eval_dir: Path, num_prompts: int, seeds: list[int]) -> dict[str, Any]:
    """Table 2, Table 3 and the caption-objective comparison from the evaluation's metrics.json files."""
    scope = f"shapes-heldout ({num_prompts} prompts, held-out pairings), seeds {', '.join(map(str, seeds))}."
    return {
        "table2": write_table(
            out / "table2", "Table 2 (shapes world): the two stages",
            "Paper Table 2's layout: base model, + fine stage (RealignDiff's re-aligned sampling), + coarse stage "
            "(ReFL with the caption reward, likelihood objective), both. " + scope,
            [("base", "shapes"), ("+ fine stage", "shapes-realign"),
             ("+ ReFL (caption reward)", "refl-caption-likelihood"),
             ("+ ReFL + fine stage", "refl-caption-likelihood+realign")], eval_dir),
        "table3": write_table(
            out / "table3", "Table 3 (shapes world): the ReFL reward",
            "Paper Table 3's layout: ReFL with the caption reward (Eq. 4, likelihood objective) vs the world's "
            "CLIP vs the BLIP-2 ITM match probability, without and with the fine stage. " + scope,
            [("caption reward", "refl-caption-likelihood"), ("CLIP", "refl-clip"), ("BLIP-2 ITM", "refl-blip"),
             ("caption reward + fine stage", "refl-caption-likelihood+realign"),
             ("CLIP + fine stage", "refl-clip+realign"), ("BLIP-2 ITM + fine stage", "refl-blip+realign")],
            eval_dir),
        "objectives": write_table(
            out / "objectives", "The caption reward's differentiable objectives",
            "ReFL with Eq. 4's caption reward through the teacher-forced likelihood of the prompt vs the "
            "score-function (REINFORCE) estimate of the expected Eq. 4 reward (docs/rewards.md). " + scope,
            [("likelihood", "refl-caption-likelihood"), ("score function", "refl-caption-scorefn"),
             ("likelihood + fine stage", "refl-caption-likelihood+realign"),
             ("score function + fine stage", "refl-caption-scorefn+realign")], eval_dir),
    }


#: Paired comparisons: (label, configuration A, configuration B); B - A per image of the same prompt and seed.
DIFFERENCES = (
    ("+ fine stage vs base", "shapes", "shapes-realign"),
    ("+ ReFL (caption reward) vs base", "shapes", "refl-caption-likelihood"),
    ("+ ReFL + fine stage vs base", "shapes", "refl-caption-likelihood+realign"),
    ("+ ReFL (CLIP) vs base", "shapes", "refl-clip"),
    ("+ ReFL (BLIP-2 ITM) vs base", "shapes", "refl-blip"),
    ("+ ReFL (caption reward, score function) vs base", "shapes", "refl-caption-scorefn"),
    ("score function vs likelihood (ReFL)", "refl-caption-likelihood", "refl-caption-scorefn"),
    ("+ fine stage, after ReFL (caption reward)", "refl-caption-likelihood", "refl-caption-likelihood+realign"),
)


def _per_image_scores(eval_dir: Path, config: str) -> dict[tuple[str, str], dict[str, Any]]:
    """``{(seed folder, prompt key): scores}`` over every seed of a configuration (its per_image.jsonl files)."""
    from realign_pipeline.evaluation.run import config_folder_name

    scores = {}
    for seed_dir in sorted((eval_dir / config_folder_name(config)).glob("seed*")):
        for line in (seed_dir / "per_image.jsonl").read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            scores[(seed_dir.name, row["prompt_key"])] = row["scores"]
    return scores


def _paired(a: dict[tuple[str, str], dict[str, Any]], b: dict[tuple[str, str], dict[str, Any]],
            metric: str) -> dict[str, Any]:
    keys = sorted(k for k in a.keys() & b.keys() if a[k].get(metric) is not None and b[k].get(metric) is not None)
    if not keys:
        return {"mean": None, "ci": None, "n": 0, "fixed": 0, "broken": 0}
    from realign_pipeline.evaluation.score import bootstrap_ci

    before, after = [float(a[k][metric]) for k in keys], [float(b[k][metric]) for k in keys]
    diffs = [y - x for x, y in zip(before, after, strict=True)]
    low, high = bootstrap_ci(diffs, groups=[k[1] for k in keys])
    fixed, broken = fixed_and_broken(before, after)
    return {"mean": float(np.mean(diffs)), "ci": [low, high], "n": len(keys), "fixed": fixed, "broken": broken}


def paired_difference(eval_dir: Path, config_a: str, config_b: str, metric: str = "shapes_binding") -> dict[str, Any]:
    """Mean of B - A over the images both have (same prompt, same seed), its 95% prompt-clustered bootstrap CI,
    and for 0/1 metrics how many images B fixed (A 0, B 1) and broke (A 1, B 0). Pairing removes the variation
    between prompts, which dominates the CIs of the means, so a small effect shows here first."""
    return _paired(_per_image_scores(eval_dir, config_a), _per_image_scores(eval_dir, config_b), metric)


def write_differences(out: Path, eval_dir: Path) -> dict[str, Any]:
    """``differences.md`` / ``.json``: :data:`DIFFERENCES` for binding and presence."""
    lines = ["# Paired differences", "",
             ("B - A on the same prompts and seeds, mean [95% CI] (prompt-clustered bootstrap); fixed / broken: images "
             "whose binding (presence) went 0 -> 1 / 1 -> 0."), "",
             "| | binding B - A | binding fixed / broken | presence B - A | presence fixed / broken |",
             "|---|---:|---:|---:|---:|"]
    table: dict[str, Any] = {"rows": []}
    scores = {c: _per_image_scores(eval_dir, c) for c in {c for _, a, b in DIFFERENCES for c in (a, b)}}
    for label, config_a, config_b in DIFFERENCES:
        cells, row = [], {"label": label, "a": config_a, "b": config_b}
        for metric in ("shapes_binding", "shapes_presence"):
            d = _paired(scores[config_a], scores[config_b], metric)
            row[metric] = d
            if d["mean"] is None:
                cells += ["—", "—"]
            else:
                cells += [f"{d['mean']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}]", f"{d['fixed']} / {d['broken']}"]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
        table["rows"].append(row)
    (out / "differences.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (out / "differences.json").write_text(json.dumps(table, indent=2) + "\n", encoding="utf-8")
    return table


# --- the command ---------------------------------------------------------------------------------------------
def run_experiment(
    out: str | os.PathLike,
    models: str | os.PathLike | None = None,
    quick: bool = False,
    refl_steps: int | None = None,
    seeds: list[int] | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    progress: bool = False,
) -> dict[str, Any]:
    """Every number and figure of the shapes experiment into `out` (steps: the module docstring)."""
    from realign_pipeline.evaluation.configs import load_config
    from realign_pipeline.evaluation.run import run_evaluation

    torch.set_num_threads(1)
    start_all = time.perf_counter()
    preset = QUICK if quick else FULL
    steps = int(refl_steps if refl_steps is not None else preset["refl_steps"])
    seeds = [int(s) for s in (seeds if seeds is not None else preset["seeds"])]
    limit = limit if limit is not None else preset["limit"]
    if steps < 1:
        raise ValueError("--refl-steps must be at least 1")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = shapes_models(models)
    timings: dict[str, Any] = {}

    start = time.perf_counter()
    data = make_refl_data(out / "refl-data", num_images=preset["num_images"], num_prompts=preset["num_prompts"])
    timings["refl_data"] = round(time.perf_counter() - start, 2)

    runs = {}
    for name in REFL_RUNS:
        print(f"[experiment] ReFL {name}: {steps} step(s)", flush=True)
        runs[name] = train_refl_run(name, paths, data, out / "refl", steps, preset["refl_overrides"] or None)
    timings["refl"] = {n: {k: r.get(k) for k in ("seconds", "seconds_per_step", "skipped")} for n, r in runs.items()}

    print("[experiment] evaluation", flush=True)
    eval_dir = out / "eval"
    result = run_evaluation(
        eval_configs(paths, {n: r["folder"] for n, r in runs.items()}, preset["eval_steps"]), heldout_records(limit),
        eval_dir,
        metrics=["shapes", "caption_reward"], seeds=seeds,
        batch_size=batch_size, device="cpu", dtype=torch.float32,
        model_paths={"caption_reward": caption_reward_metric(paths)}, progress=progress,
    )
    timings["evaluation"] = result["seconds"]
    if result["generated"]:
        timings["evaluation"]["images_generated"] = result["generated"]
        timings["evaluation"]["seconds_per_image"] = round(result["seconds"]["generate"] / result["generated"], 4)

    start = time.perf_counter()
    tables = write_tables(out, eval_dir, result["num_prompts"], seeds)
    tables["differences"] = write_differences(out, eval_dir)
    timings["tables"] = round(time.perf_counter() - start, 2)
    timings["total"] = round(time.perf_counter() - start_all, 2)
    record = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else None,
        "quick": quick,
        "models": {k: str(v) for k, v in paths.items()},
        "refl_steps": steps,
        "refl_common": {k: list(v) if isinstance(v, tuple) else v
                        for k, v in {**REFL_COMMON, **preset["refl_overrides"]}.items()},
        "eval_steps": preset["eval_steps"] or load_config("shapes").steps,
        "refl_runs": runs,
        "refl_data": data,
        "max_caption_tokens": MAX_CAPTION_TOKENS,
        "prompts": "shapes-heldout",
        "num_prompts": result["num_prompts"],
        "seeds": seeds,
        "limit": limit,
        "evaluation": {"summary": result["summary"], "report": result["report"], "configs": result["configs"]},
        "tables": {k: str(out / f"{k}.md") for k in tables},
        "grid": result["report"].get("grid_png"),
        "timings": timings,
    }
    previous_file = out / "experiment.json"
    did_work = result["generated"] or any(not r["skipped"] for r in runs.values())
    if not did_work and previous_file.is_file():
        # A rerun that trained and generated nothing keeps the timings of the run that did the work.
        previous = json.loads(previous_file.read_text(encoding="utf-8")).get("timings")
        if previous:
            record["timings"], record["timings_rerun"] = previous, timings
    previous_file.write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="The shapes-world Tables 2 and 3 (+ caption objectives), one command.")
    parser.add_argument("--out", required=True, help="output folder (rerunning skips finished work)")
    parser.add_argument("--models", default=None,
                        help="folder with pipeline/, clip/, blip2-captioner/, blip2-itm/ (default: shipped assets)")
    parser.add_argument("--quick", action="store_true", help="4 prompts, 1 seed, 2 ReFL steps, 4-step chains (a smoke test)")
    parser.add_argument("--refl-steps", type=int, default=None, help=f"ReFL steps per run (default {FULL['refl_steps']})")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="evaluation seeds (default 0 1 2)")
    parser.add_argument("--limit", type=int, default=None, help="a seeded subset of this many held-out prompts")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per pipeline call in the evaluation")
    parser.add_argument("--progress", action="store_true", help="progress bars")
    args = parser.parse_args(argv)
    record = run_experiment(args.out, args.models, args.quick, args.refl_steps, args.seeds, args.limit,
                            args.batch_size, args.progress)
    print(record["evaluation"]["summary"])
    for name in record["tables"].values():
        print(Path(name).read_text(encoding="utf-8"))
    print(json.dumps(record["timings"], indent=1))


if __name__ == "__main__":
    main()
