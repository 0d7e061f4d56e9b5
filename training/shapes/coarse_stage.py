#!/usr/bin/env python
"""The coarse stage with something to learn and gradients where binding is decided, measured in one command.

    python training/shapes/coarse_stage.py --out outputs/shapes-coarse-stage                  # second world
    python training/shapes/coarse_stage.py --out outputs/shapes-coarse-stage-first --model shapes \\
        --runs <the setting chosen in the second world>                                      # first world
    python training/shapes/coarse_stage.py --out /tmp/coarse-stage-quick --quick             # reduced, ~30 s

Steps (each resumable: rerunning skips finished work; an interrupted ReFL run resumes from its checkpoint):

1. Data (``make_refl_data.py --reward_prompts half-a``): ``L_pre`` on seeded training-split image-text pairs;
   the reward prompts are every prompt of the held-out pairings' half A (96: the UNet never saw an image of
   them). :func:`make_refl_data.check_prompts_file` asserts that no half-B prompt is in the prompts file right
   before each ``train_refl.py`` launch.
2. Candidate runs (:data:`CANDIDATES`): a LoRA of the world's UNet per reward x gradient mode, each
   ``training/train_refl.py`` (in this process, one thread, its output in ``train.log``): the caption
   likelihood and the world's CLIP, each with ReFL's one late gradient step (steps 15-19 of 20), DRaFT-K with
   K = 15 of 20 (gradient steps 5-19: into the first third, where binding is decided) and the full chain
   (K = 20). Settings: :data:`TRAIN_COMMON`; reward weights as ``experiment.py``'s (:data:`REWARDS`).
3. Evaluation on the **tuning subset** of half A (``make_refl_data.half_a_split``) of the base model and
   each candidate, every (prompt, seed) with ``realign=True``: the coarse image (the run alone) and the fine
   image (the fine stage on top), read by the world's checker.
4. **The choice**, by the rule below, written to ``chosen.json`` and ``events.jsonl`` (frozen) before any
   half-B image is generated. A rerun keeps the frozen choice and stops if the tuning images now say otherwise.
5. The runs blind to colour swaps here (docs/shapes.md: the score-function objective of Eq. 4 and the BLIP-2
   ITM probability), once each, in the chosen mode (``--blind_mode``; exploratory).
6. Evaluation of every run and the base model on half A minus tuning, the training pairings, and last half B.
7. ``coarse_stage.json`` and ``coarse_stage.md`` in ``--out``: per split and run, binding / presence /
   position as paired differences against the base model's plain images (the run alone, the run + the fine
   stage, and the fine stage alone on the base model), with fix / break rates; reward curves from each run's
   ``train_log.jsonl``; what each half of the held-out pairings was seen as by the models (a replay of their
   seeded training streams); the events in order with times; timings.

The protocol, fixed before any result was seen:

- Splits (:func:`split_records`; pairings of ``shapes.world.held_out_halves``, every caption form and order,
  seeds 0-2): ``tuning`` (6 of half A's 12 pairings, seed 0: 48 prompts), ``half-a-rest`` (the other 6 of
  half A, seen by the reward term as text: 48 prompts), ``training`` (a seeded sample of 96 prompts of the
  training pairings, the fine-stage tuning split's) and ``half-b`` (the 12 pairings no run saw, 96 prompts).
- Read-outs: the checker's binding, presence and position (position on the prompts that name a side), each as
  the paired difference to the base model's plain image of the same prompt and seed, with a 95% bootstrap CI
  clustered by pairing, and the images fixed (0 -> 1), unchanged and broken (1 -> 0), fix rate (fixed among the
  base-wrong images) and break rate (broken among the base-right), each rate with its CI.
- The choice: among the candidate runs, the one with the highest binding difference (the run alone against the
  base model) on the tuning subset; ties go to the cheaper gradient mode (ReFL < DRaFT-K < full chain), then
  to the caption likelihood before CLIP. One setting, chosen before half B is generated and not revisited.
- The goal, per world: the chosen run's half-B binding difference has a CI above 0, and its binding CI lower
  bound on the training pairings is above -0.02. Every other half-B number is exploratory.
- The first world runs only the setting chosen in the second (``--runs``); its choice is that one run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import sys
import time
from collections import Counter
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:
    sys.path.insert(0, str(_HERE))

import numpy as np
import torch
from ablation import GENERATION, load_pipeline, paired_rates, pairing_key
from experiment import cached_train_run, shapes_models, train_refl_arguments
from make_refl_data import check_prompts_file, half_a_split, make_refl_data
from refl_sweep import reward_curve

from realign_pipeline.shapes.checker import check_prompt
from realign_pipeline.shapes.world import held_out_halves, pairing_prompts, training_pairing_prompts

#: The rewards, as ``experiment.py``'s runs (lambda times each reward's matched-vs-mismatched gap ~2).
REWARDS: dict[str, dict[str, Any]] = {
    "likelihood": {"reward": "caption", "reward_objective": "likelihood", "reward_weight": 1.0},
    "clip": {"reward": "clip", "reward_weight": 2.0},
    "scorefn": {"reward": "caption", "reward_objective": "score_function", "reward_weight": 5.0},
    "blip": {"reward": "blip", "reward_weight": 2.0},
}
#: The gradient modes, cheapest first (the tie-break of the choice).
MODES = ("refl", "draft", "full")
#: The rewards every mode runs with, and those run once, in the chosen mode (blind to colour swaps here).
CANDIDATE_REWARDS = ("likelihood", "clip")
BLIND_REWARDS = ("scorefn", "blip")
CANDIDATES = tuple(f"{reward}-{mode}" for reward in CANDIDATE_REWARDS for mode in MODES)

#: Every run: the experiment's LoRA settings (rank 8, lr 5e-4, batch 4, L_pre weight 1, margin 1, seed 0), 20
#: DDIM steps, and rollouts guided as the evaluation samples (guidance 4: in ReFL's no-grad rollout, at every
#: step of a DRaFT chain).
TRAIN_COMMON: dict[str, Any] = {
    "resolution": 32, "num_inference_steps": 20, "rank": 8, "learning_rate": 5e-4, "train_batch_size": 4,
    "pretrain_loss_weight": 1.0, "reward_margin": 1.0, "seed": 0, "rollout_guidance_scale": 4.0,
}
SPLITS = ("tuning", "half-a-rest", "training", "half-b")
#: The training split: a seeded sample of this many training-pairing prompts (``fine_stage_rates``'s tuning).
TRAINING_PROMPTS = 96
METRICS = ("binding", "presence", "position")
#: The goal's bound on the training pairings' binding CI.
TRAINING_BOUND = -0.02

FULL: dict[str, Any] = {"steps": 300, "seeds": [0, 1, 2], "limit": None, "num_images": 512,
                        "num_inference_steps": 20, "eval_steps": GENERATION["num_inference_steps"],
                        "replay": {"clip": (1500, 64), "itm": (3000, 48)}}
#: The reduced run of the test: 2 runs, 2 steps of a 4-step chain, 2 prompts per split, 1 seed, 2 denoising
#: steps in the evaluation, a short replay.
QUICK: dict[str, Any] = {"steps": 2, "seeds": [0], "limit": 2, "num_images": 8, "num_inference_steps": 4,
                         "eval_steps": 2, "replay": {"clip": (3, 8), "itm": (3, 8)},
                         "runs": ["likelihood-refl", "clip-full"], "blind": []}


# --- runs ----------------------------------------------------------------------------------------------------
def split_name(name: str) -> tuple[str, str]:
    """``"likelihood-draft"`` -> ``("likelihood", "draft")``."""
    reward, _, mode = name.rpartition("-")
    if reward not in REWARDS or mode not in MODES:
        raise ValueError(f"unknown run {name!r}: <reward>-<mode> with reward in {tuple(REWARDS)}, mode in {MODES}")
    return reward, mode


def mode_flags(mode: str, steps: int) -> list[str]:
    """``train_refl.py`` flags of a gradient mode on a chain of `steps` DDIM steps: ReFL's step drawn from the last
    quarter (15-19 of 20), DRaFT-K with K = three quarters of the steps (15 of 20), the full chain (K = T)."""
    if mode == "refl":
        return ["--grad_step_range", str(steps - max(1, steps // 4)), str(steps)]
    if mode == "draft":
        return ["--backprop_steps", str(max(1, math.ceil(3 * steps / 4)))]
    if mode == "full":
        return ["--backprop_steps", str(steps)]
    raise ValueError(f"unknown gradient mode {mode!r}; one of {MODES}")


def run_command(name: str, models: dict[str, Path], data: dict[str, Any], output_dir: Path, steps: int,
                num_inference_steps: int) -> list[str]:
    """The ``train_refl.py`` arguments of run `name` (``<reward>-<mode>``)."""
    reward, mode = split_name(name)
    spec = {**TRAIN_COMMON, **REWARDS[reward], "num_inference_steps": num_inference_steps}
    gradient_flags = [*mode_flags(mode, num_inference_steps),
                      "--rollout_guidance_scale", str(spec["rollout_guidance_scale"])]
    return train_refl_arguments(spec, models, data, output_dir, steps, gradient_flags)


def _sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def train_run(name: str, models: dict[str, Path], data: dict[str, Any], out: Path, steps: int,
              num_inference_steps: int, events: Events) -> dict[str, Any]:
    """Train (or skip, or resume) run `name` into ``out/<name>``: skipped when its LoRA and ``train_stats.json``
    exist with the same settings (the command and the prompts file's hash), started over when the settings
    changed, resumed from its latest checkpoint otherwise. The prompts file is checked for half B right before
    the launch."""
    folder = out / name
    cmd = run_command(name, models, data, folder, steps, num_inference_steps)
    settings = {"command": cmd, "steps": steps, "prompts_sha256": _sha256(data["prompts_file"])}
    reward, mode = split_name(name)
    record: dict[str, Any] = {"name": name, "reward": reward, "mode": mode, "folder": str(folder),
                              "flags": mode_flags(mode, num_inference_steps), "steps": steps}

    def check_and_log() -> None:
        checked = check_prompts_file(data["prompts_file"])  # half B reaches no run: asserted right before launch
        events.add("train", run=name, prompts_checked=checked)

    return {**record, **cached_train_run(folder, cmd, settings, steps, "coarse_stage", before_launch=check_and_log,
                                         extra_timing=lambda stats: {"mode_in_words": stats.get("mode")},
                                         label=f"run {name}")}

def curve(log_file: Path, points: int = 10) -> dict[str, Any]:
    """The reward curve of a run: ``refl_sweep.reward_curve`` (objective and ``L_pre``, first and last fifth)
    and the mean objective over `points` equal stretches of the steps."""
    rows = [json.loads(line) for line in log_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    chunks = [c for c in np.array_split(np.arange(len(rows)), min(points, len(rows))) if len(c)]
    return {**reward_curve(log_file),
            "objective_by_stretch": [round(float(np.mean([rows[i]["objective"] for i in c])), 4) for c in chunks],
            "stretch_last_steps": [int(rows[c[-1]]["step"]) for c in chunks]}


# --- events (the order of what happened, for the record and the test) ----------------------------------------
class Events:
    """Appends ``{"event", "time", ...}`` lines to ``events.jsonl`` (kept across reruns) and keeps them."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.items = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()
                      if line.strip()] if path.is_file() else []

    def add(self, event: str, **fields: Any) -> dict[str, Any]:
        item = {"event": event, "time": datetime.now(timezone.utc).isoformat(timespec="microseconds"),
                "time_s": time.time(), **fields}
        self.items.append(item)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(item) + "\n")
        return item


# --- evaluation ----------------------------------------------------------------------------------------------
def split_records(split: str, limit: int | None = None) -> list[dict[str, Any]]:
    """The prompt records of a split (the protocol); with `limit`, a seeded subset of that many."""
    tuning, rest = half_a_split()
    if split == "tuning":
        records = pairing_prompts(tuning)
    elif split == "half-a-rest":
        records = pairing_prompts(rest)
    elif split == "half-b":
        records = pairing_prompts(held_out_halves()[1])
    elif split == "training":
        pool = training_pairing_prompts()
        records = random.Random(0).sample(pool, min(TRAINING_PROMPTS, len(pool)))
    else:
        raise ValueError(f"unknown split {split!r}; one of {SPLITS}")
    if limit is not None and limit < len(records):
        records = random.Random(1).sample(records, limit)
    return records


def _read(image, objects: Sequence[dict[str, Any]]) -> dict[str, float | None]:
    checked = check_prompt(image, list(objects))
    return {m: checked[m] for m in METRICS}


def evaluate(pipe, config: str, lora: str | None, split: str, records: Sequence[dict[str, Any]],
             seeds: Sequence[int], generation: dict[str, Any], batch_size: int, cache: Path,
             events: Events) -> list[dict[str, Any]]:
    """Coarse (the configuration alone) and fine (+ the fine stage) read-outs of every (record, seed), from
    ``cache/<config>/<split>.json`` when it holds the same settings, else generated (an event says when)."""
    key = {"config": config, "lora_sha256": _sha256(Path(lora) / "pytorch_lora_weights.safetensors") if lora else None,
           "generation": generation, "seeds": list(seeds), "prompts": [r["prompt"] for r in records]}
    path = cache / config / f"{split}.json"
    if path.is_file():
        saved = json.loads(path.read_text(encoding="utf-8"))
        if saved["key"] == key:
            return saved["rows"]
    events.add("generate", config=config, split=split, images=len(records) * len(seeds))
    start = time.perf_counter()
    if lora:
        pipe.load_lora_weights(lora)
    try:
        jobs = [(r, s) for r in records for s in seeds]
        rows = []
        for first in range(0, len(jobs), batch_size):
            chunk = jobs[first : first + batch_size]
            out = pipe([r["prompt"] for r, _ in chunk], realign=True,
                       generator=[torch.Generator().manual_seed(s) for _, s in chunk], **generation)
            for i, (record, seed) in enumerate(chunk):
                rows.append({"prompt": record["prompt"], "seed": seed, "form": record["form"],
                             "pairing": pairing_key(record["objects"]), "realigned": bool(out.realigned[i]),
                             "coarse": _read(out.coarse_images[i], record["objects"]),
                             "fine": _read(out.images[i], record["objects"])})
    finally:
        if lora:
            pipe.unload_lora_weights()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"key": key, "seconds": round(time.perf_counter() - start, 2), "rows": rows})
                    + "\n", encoding="utf-8")
    return rows


def compare(base_rows: Sequence[dict[str, Any]], rows: Sequence[dict[str, Any]], kind: str) -> dict[str, Any]:
    """Per metric: the `kind` (``"coarse"`` or ``"fine"``) read-out of `rows` against the base model's coarse
    read-out of the same prompt and seed (``ablation.paired_rates``), plus how many images stayed unchanged."""
    base = {(r["prompt"], r["seed"]): r for r in base_rows}
    result = {}
    for metric in METRICS:
        pairs = [(base[(r["prompt"], r["seed"])], r) for r in rows if (r["prompt"], r["seed"]) in base]
        pairs = [(b, r) for b, r in pairs if b["coarse"][metric] is not None and r[kind][metric] is not None]
        if not pairs:
            continue
        before = [b["coarse"][metric] for b, _ in pairs]
        after = [r[kind][metric] for _, r in pairs]
        entry = paired_rates(before, after, [r["pairing"] for _, r in pairs])
        entry["unchanged"] = sum(x == y for x, y in zip(before, after, strict=True))
        result[metric] = entry
    return result


def split_table(base_rows: Sequence[dict[str, Any]], runs: dict[str, Sequence[dict[str, Any]]]) -> dict[str, Any]:
    """``{"fine stage": base fine vs base, <run>: run alone vs base, <run> + fine stage: ...}``."""
    table = {"fine stage": compare(base_rows, base_rows, "fine")}
    for name, rows in runs.items():
        table[name] = compare(base_rows, rows, "coarse")
        table[f"{name} + fine stage"] = compare(base_rows, rows, "fine")
    return table


def by_pairing(
    base_rows: Sequence[dict[str, Any]], rows: Sequence[dict[str, Any]], metric: str = "binding"
) -> list[dict[str, Any]]:
    """Per pairing where the base model errs or `rows` change something: images, base-wrong, fixed, broken
    (the coarse read-out of `rows` against the base model's, as :func:`compare`), pairings in order."""
    base = {(r["prompt"], r["seed"]): r["coarse"][metric] for r in base_rows}
    counts: dict[str, Counter] = {}
    for r in rows:
        before, after = base.get((r["prompt"], r["seed"])), r["coarse"][metric]
        if before is None or after is None:
            continue
        c = counts.setdefault(r["pairing"], Counter())
        c["images"] += 1
        c["base_wrong"] += before == 0
        c["fixed"] += before == 0 and after == 1
        c["broken"] += before == 1 and after == 0
    return [
        {"pairing": p, **{k: c[k] for k in ("images", "base_wrong", "fixed", "broken")}}
        for p, c in sorted(counts.items())
        if c["base_wrong"] or c["fixed"] or c["broken"]
    ]


def choose(tuning: dict[str, Any], candidates: Sequence[str]) -> dict[str, Any]:
    """The protocol's choice among `candidates` from their tuning-split comparisons (``split_table``)."""
    def binding(name: str) -> float:
        value = tuning[name].get("binding", {}).get("difference")
        return -math.inf if value is None else value

    ranked = sorted(candidates, key=lambda n: (-binding(n), MODES.index(split_name(n)[1]),
                                               CANDIDATE_REWARDS.index(split_name(n)[0])
                                               if split_name(n)[0] in CANDIDATE_REWARDS else len(CANDIDATE_REWARDS),
                                               list(candidates).index(n)))
    name = ranked[0]
    entry = tuning[name].get("binding", {})
    return {"run": name, "reward": split_name(name)[0], "mode": split_name(name)[1],
            "tuning_binding_difference": entry.get("difference"), "tuning_binding_ci": entry.get("difference_ci"),
            "ranking": [{"run": n, "tuning_binding_difference": None if binding(n) == -math.inf else binding(n)}
                        for n in ranked],
            "rule": "highest binding difference (run alone vs base) on the tuning subset; ties: the cheaper "
                    "gradient mode (ReFL < DRaFT-K < full chain), then the caption likelihood before CLIP"}


def goal(tables: dict[str, dict[str, Any]], chosen: str) -> dict[str, Any]:
    """The protocol's goal for the chosen run: half-B binding CI above 0, training binding CI low > -0.02."""
    half_b = tables.get("half-b", {}).get(chosen, {}).get("binding", {})
    training = tables.get("training", {}).get(chosen, {}).get("binding", {})
    b_ci, t_ci = half_b.get("difference_ci"), training.get("difference_ci")
    return {"run": chosen,
            "half_b_binding_difference": half_b.get("difference"), "half_b_binding_ci": b_ci,
            "training_binding_difference": training.get("difference"), "training_binding_ci": t_ci,
            "half_b_ci_above_0": bool(b_ci and b_ci[0] > 0),
            "training_ci_low_above_bound": bool(t_ci and t_ci[0] > TRAINING_BOUND),
            "met": bool(b_ci and t_ci and b_ci[0] > 0 and t_ci[0] > TRAINING_BOUND)}


# --- what each half saw --------------------------------------------------------------------------------------
def replay_negatives(steps: int, batch_size: int, kind: str = "clip", seed: int = 0,
                     swap_share: float = 0.7) -> Counter:
    """Colour-swapped captions a seeded training stream used as negatives: ``Counter`` of (pairing, caption).

    Replays the data draws of ``train_clip.py`` (``kind="clip"``: every two-object scene's swap is a negative)
    or of ``train_blip2.py --model itm`` (``kind="itm"``: a two-object scene's ITM negative is its swap with
    probability `swap_share`, else another scene's caption; ITC without swaps) without the models: the same
    ``random.Random(seed)``, the same calls in the same order."""
    from train_clip import swapped

    from realign_pipeline.shapes.world import sample_scene

    rng = random.Random(seed)
    seen: Counter = Counter()
    for _ in range(steps):
        scenes = [sample_scene(rng, split="train") for _ in range(batch_size)]
        for scene in scenes:
            if len(scene.objects) != 2:
                continue
            if kind == "itm" and not rng.random() < swap_share:
                continue
            negative = swapped(scene, rng)
            a, b = ((o.color, o.shape) for o in negative.objects)
            seen[((a, b) if a <= b else (b, a), negative.caption)] += 1
    return seen


def what_each_half_saw(replay: dict[str, tuple[int, int]]) -> dict[str, Any]:
    """Per half (tuning, half A minus tuning, half B): how often the first world's CLIP (``clip/``, whose text
    tower is the first world's text encoder) and the BLIP-2 matcher (``blip2-itm/``) saw its pairings' captions
    as colour-swapped negatives in their seeded training streams (replayed: ``replay`` gives (steps, batch)
    of each; the shipped models: CLIP 1,500 x 64, matcher 3,000 x 48, both seed 0)."""
    tuning, rest = half_a_split()
    halves = {"tuning": tuning, "half-a-rest": rest, "half-b": held_out_halves()[1]}
    result: dict[str, Any] = {"replay": {k: list(v) for k, v in replay.items()}, "halves": {}}
    streams = {kind: replay_negatives(*replay[kind], kind=kind) for kind in ("clip", "itm")}
    for half, pairings in halves.items():
        prompts = {r["prompt"] for r in pairing_prompts(pairings)}
        entry: dict[str, Any] = {"pairings": len(pairings), "prompts": len(prompts)}
        for kind, seen in streams.items():
            hits = {(p, c): n for (p, c), n in seen.items() if p in set(pairings)}
            entry[kind] = {"negative_captions": sum(hits.values()),
                           "pairings_seen": len({p for p, _ in hits}),
                           "prompts_seen": len(prompts & {c for _, c in hits})}
        result["halves"][half] = entry
    return result


# --- tables --------------------------------------------------------------------------------------------------
def _ci(values: Sequence[float] | None) -> str:
    return "" if not values else f" [{values[0]:+.3f}, {values[1]:+.3f}]"


def _cell(entry: dict[str, Any] | None) -> list[str]:
    if not entry:
        return ["—", "—", "—", "—"]
    fix = "—" if entry["fix_rate"] is None else f"{entry['fix_rate']:.2f} ({entry['fixed']}/{entry['base_wrong']})"
    brk = "—" if entry["break_rate"] is None else f"{entry['break_rate']:.3f} ({entry['broken']}/{entry['base_right']})"
    return [f"{entry['difference']:+.3f}{_ci(entry['difference_ci'])}",
            f"{entry['fixed']} / {entry['unchanged']} / {entry['broken']} of {entry['n']}", fix, brk]


def markdown(result: dict[str, Any]) -> str:
    chosen, target = result.get("chosen") or {}, result.get("goal") or {}
    lines = [f"# The coarse stage, measured ({result['model']})", "",
             (f"Reward prompts: every half-A prompt; runs of {result['steps']} steps; evaluation seeds "
              f"{', '.join(map(str, result['seeds']))}, {result['generation']['num_inference_steps']} DDIM steps, "
              f"guidance {result['generation']['guidance_scale']}."), ""]
    if chosen:
        lines += [(f"**Chosen on the tuning subset (frozen {chosen.get('time', '?')}):** `{chosen['run']}` "
                   f"(tuning binding difference {chosen['tuning_binding_difference']})."), ""]
    if target:
        lines += [(f"**Goal** (half-B binding CI above 0, training binding CI low above {TRAINING_BOUND}): "
                   f"{'met' if target['met'] else 'not met'}; half B {target['half_b_binding_difference']}"
                   f"{_ci(target['half_b_binding_ci'])}, training {target['training_binding_difference']}"
                   f"{_ci(target['training_binding_ci'])}."), ""]
    headers = []
    for metric in METRICS:
        headers += [f"{metric} difference [CI]", f"{metric} fixed / unchanged / broken", f"{metric} fix rate",
                    f"{metric} break rate"]
    for split in SPLITS:
        table = result["tables"].get(split)
        if not table:
            continue
        label = " (exploratory but for the chosen run)" if split == "half-b" else ""
        lines += [f"## {split}{label}", "",
                  (f"Against the base model's plain images ({result['images'][split]} images); difference: after "
                   "- before, 95% CI clustered by pairing."), "",
                  "| | " + " | ".join(headers) + " |", "|---|" + "---:|" * len(headers)]
        for row, entry in table.items():
            cells = [c for metric in METRICS for c in _cell(entry.get(metric))]
            lines.append(f"| {row} | " + " | ".join(cells) + " |")
        lines.append("")
    if chosen and result.get("by_pairing"):
        lines += [f"## Binding by pairing: `{chosen['run']}` alone against the base model", "",
                  "The pairings where the base model errs or the run changes something (coarse images).", "",
                  "| split | pairing | images | base wrong | fixed | broken |", "|---|---|---:|---:|---:|---:|"]
        for split in SPLITS:
            for entry in result["by_pairing"].get(split, {}).get(chosen["run"], []):
                lines.append(f"| {split} | {entry['pairing']} | {entry['images']} | {entry['base_wrong']} | "
                             f"{entry['fixed']} | {entry['broken']} |")
        lines.append("")
    lines += ["## Reward curves", "",
              "| run | mode | objective, first -> last fifth | L_pre, first -> last fifth | s / step |",
              "|---|---|---:|---:|---:|"]
    for name, run in result["runs"].items():
        c = run["reward_curve"]
        lines.append(f"| {name} | {run.get('mode_in_words') or run['mode']} | {c['objective_first']} -> "
                     f"{c['objective_last']} | {c['loss_pre_first']} -> {c['loss_pre_last']} | "
                     f"{run.get('seconds_per_step')} |")
    return "\n".join(lines) + "\n"


# --- the command ---------------------------------------------------------------------------------------------
def run(out: str | Path, model: str = "shapes-bow", runs: Sequence[str] | None = None,
        blind: Sequence[str] | None = None, blind_mode: str = "chosen", quick: bool = False,
        steps: int | None = None, seeds: Sequence[int] | None = None, limit: int | None = None,
        batch_size: int = 16, models: str | None = None) -> dict[str, Any]:
    """Every step of the module docstring into `out`; returns what ``coarse_stage.json`` holds."""
    torch.set_num_threads(1)
    start_all = time.perf_counter()
    preset = QUICK if quick else FULL
    runs = list(runs if runs is not None else preset.get("runs", CANDIDATES))
    blind_rewards = list(blind if blind is not None else preset.get("blind", BLIND_REWARDS))
    steps = int(steps if steps is not None else preset["steps"])
    seeds = [int(s) for s in (seeds if seeds is not None else preset["seeds"])]
    limit = limit if limit is not None else preset["limit"]
    for name in runs:
        split_name(name)
    if not runs:
        raise ValueError("at least one candidate run")
    if blind_mode != "chosen" and blind_mode not in MODES:
        raise ValueError(f"blind_mode: 'chosen' or one of {MODES}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    events = Events(out / "events.jsonl")
    events.add("start", quick=quick, model=model, runs=runs)
    paths = shapes_models(models)
    if model != "shapes":
        from realign_pipeline.shapes.pretrained import SHAPES_WORLDS, shapes_model_path

        paths["pipeline"] = shapes_model_path(SHAPES_WORLDS[model]) if model in SHAPES_WORLDS else Path(model)
    generation = {**GENERATION, "num_inference_steps": preset["eval_steps"]}
    timings: dict[str, Any] = {}

    t = time.perf_counter()
    data = make_refl_data(out / "refl-data", num_images=preset["num_images"], reward_prompts="half-a")
    timings["data"] = round(time.perf_counter() - t, 2)

    trained: dict[str, dict[str, Any]] = {}
    for name in runs:
        print(f"[coarse stage] train {name}", flush=True)
        trained[name] = train_run(name, paths, data, out / "runs", steps, preset["num_inference_steps"], events)

    pipe = load_pipeline(model, need_captioner=True)
    records = {split: split_records(split, limit) for split in SPLITS}
    rows: dict[str, dict[str, list]] = {split: {} for split in SPLITS}
    cache = out / "eval"

    def evaluate_config(config: str, split: str) -> None:
        lora = None if config == "base" else trained[config]["folder"]
        rows[split][config] = evaluate(pipe, config, lora, split, records[split], seeds, generation, batch_size,
                                       cache, events)

    t = time.perf_counter()
    for config in ["base", *runs]:
        evaluate_config(config, "tuning")
    tuning_table = split_table(rows["tuning"]["base"], {n: rows["tuning"][n] for n in runs})
    choice = choose(tuning_table, runs)
    chosen_file = out / "chosen.json"
    if chosen_file.is_file():
        frozen = json.loads(chosen_file.read_text(encoding="utf-8"))
        if frozen["run"] != choice["run"] or frozen["candidates"] != runs:
            raise RuntimeError(f"{chosen_file} froze {frozen['run']} among {frozen['candidates']}; the tuning images "
                               f"now choose {choice['run']} among {runs}. Delete {chosen_file} (and the half-B "
                               "evaluation) deliberately to choose again.")
        choice = frozen
    else:
        stamp = events.add("chosen", run=choice["run"])
        choice = {**choice, "candidates": runs, "time": stamp["time"], "time_s": stamp["time_s"]}
        chosen_file.write_text(json.dumps(choice, indent=1) + "\n", encoding="utf-8")
    print(f"[coarse stage] chosen on the tuning subset: {choice['run']}", flush=True)
    timings["tuning_evaluation"] = round(time.perf_counter() - t, 2)

    mode = choice["mode"] if blind_mode == "chosen" else blind_mode
    blind_runs = [f"{reward}-{mode}" for reward in blind_rewards]
    for name in blind_runs:
        if name not in trained:
            print(f"[coarse stage] train {name} (blind to colour swaps; exploratory)", flush=True)
            trained[name] = train_run(name, paths, data, out / "runs", steps, preset["num_inference_steps"], events)
    every = list(dict.fromkeys([*runs, *blind_runs]))

    t = time.perf_counter()
    for config in ["base", *every]:
        for split in ("tuning", "half-a-rest", "training"):
            evaluate_config(config, split)
    timings["seen_evaluation"] = round(time.perf_counter() - t, 2)
    t = time.perf_counter()
    events.add("half-b", chosen=choice["run"])
    for config in ["base", *every]:
        evaluate_config(config, "half-b")
    timings["half_b_evaluation"] = round(time.perf_counter() - t, 2)

    tables = {split: split_table(rows[split]["base"], {n: rows[split][n] for n in every}) for split in SPLITS}
    for name, record in trained.items():
        record["reward_curve"] = curve(Path(record["folder"]) / "train_log.jsonl")
    t = time.perf_counter()
    saw = what_each_half_saw(preset["replay"])
    timings["replay"] = round(time.perf_counter() - t, 2)
    timings["total"] = round(time.perf_counter() - start_all, 2)
    events.add("done")
    result: dict[str, Any] = {
        "protocol": __doc__.split("The protocol, fixed before any result was seen:")[1].strip(),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else None,
        "quick": quick, "model": model, "models": {k: str(v) for k, v in paths.items()},
        "train_common": TRAIN_COMMON, "num_inference_steps_training": preset["num_inference_steps"],
        "steps": steps, "seeds": seeds, "limit": limit, "generation": generation, "data": data,
        "candidates": runs, "blind_runs": blind_runs, "chosen": choice, "goal": goal(tables, choice["run"]),
        "runs": {n: trained[n] for n in every},
        "splits": {s: {"prompts": [r["prompt"] for r in records[s]],
                       "pairings": sorted({pairing_key(r["objects"]) for r in records[s]})} for s in SPLITS},
        "images": {s: len(rows[s]["base"]) for s in SPLITS},
        "tables": tables,
        "by_pairing": {split: {n: by_pairing(rows[split]["base"], rows[split][n]) for n in every} for split in SPLITS},
        "what_each_half_saw": saw, "events": events.items, "timings": timings,
        "rows": rows,
    }
    (out / "coarse_stage.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    (out / "coarse_stage.md").write_text(markdown(result), encoding="utf-8")
    return result


def publish(result: dict[str, Any], stem: str | Path) -> tuple[Path, Path]:
    """``<stem>.json``: `result` without the per-image read-outs; ``<stem>_rows.json``: the read-outs by columns
    (each split's records once, then one score row per record and configuration, in the records' order)."""
    record_columns = ("prompt", "seed", "form", "pairing")
    score_columns = ["realigned"] + [f"{kind}_{m}" for kind in ("coarse", "fine") for m in METRICS]
    records: dict[str, list[list[Any]]] = {}
    scores: dict[str, dict[str, list[list[Any]]]] = {}
    for split, configs in result["rows"].items():
        for config, rows in configs.items():
            keys = [[r[c] for c in record_columns] for r in rows]
            if records.setdefault(split, keys) != keys:
                raise ValueError(f"{split}/{config}: the read-outs are not in the base model's record order")
            scores.setdefault(split, {})[config] = [
                [int(r["realigned"])] + [r[kind][m] for kind in ("coarse", "fine") for m in METRICS]
                for r in rows
            ]
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    main_file, rows_file = stem.with_name(stem.name + ".json"), stem.with_name(stem.name + "_rows.json")
    summary = {k: v for k, v in result.items() if k != "rows"}
    main_file.write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    table = {"record_columns": list(record_columns), "score_columns": score_columns, "records": records}
    rows_file.write_text(
        json.dumps({**table, "scores": scores}, separators=(",", ":")) + "\n", encoding="utf-8"
    )
    return main_file, rows_file


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder (rerunning skips finished work)")
    parser.add_argument("--model", default="shapes-bow", help="shapes-bow (default), shapes, or a pipeline folder")
    parser.add_argument("--runs", nargs="+", default=None,
                        help=f"candidate runs, <reward>-<mode> (default: {' '.join(CANDIDATES)})")
    parser.add_argument("--blind", nargs="*", default=None, choices=list(REWARDS),
                        help=f"rewards run once in --blind_mode (default: {' '.join(BLIND_REWARDS)}; none: --blind)")
    parser.add_argument("--blind_mode", default="chosen", choices=("chosen", *MODES),
                        help="the gradient mode of the --blind runs (default: the chosen run's)")
    parser.add_argument("--steps", type=int, default=None, help=f"steps per run (default {FULL['steps']})")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="evaluation seeds (default 0 1 2)")
    parser.add_argument("--limit", type=int, default=None, help="a seeded subset of this many prompts per split")
    parser.add_argument("--batch_size", type=int, default=16, help="prompts per pipeline call")
    parser.add_argument("--models", default=None, help="as experiment.py --models (default: the shipped assets)")
    parser.add_argument("--quick", action="store_true", help="the reduced run (2 runs, 2 steps, 2 prompts per split)")
    parser.add_argument("--publish", default=None,
                        help="also write STEM.json (the result without per-image read-outs) and STEM_rows.json "
                             "(them, by columns)")
    args = parser.parse_args(argv)
    result = run(args.out, args.model, args.runs, args.blind, args.blind_mode, args.quick, args.steps, args.seeds,
                 args.limit, args.batch_size, args.models)
    if args.publish:
        publish(result, args.publish)
    print((Path(args.out) / "coarse_stage.md").read_text(encoding="utf-8"))
    print(json.dumps(result["timings"], indent=1))
    return result


if __name__ == "__main__":
    main()
