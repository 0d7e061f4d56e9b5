"""The paper's tables as one call: generate (resumable), score and report several configurations.

:func:`run_evaluation` runs, for each configuration and each seed, :func:`~.generate.generate_images` (images
already written are skipped), then :func:`~.score.score_folder`, combines the seeds of a configuration into one
scored folder, and writes the report of all configurations with :func:`~.report.write_report`::

    out_dir/
        run.json                         the run's settings, per configuration its folders, and the timings
        <config>/seed42/                 a generation folder (config.json, images/, manifest.rank0.jsonl,
                                         metrics.json): one per seed
        <config>/seed43/ ...
        <config>/config.json             the configuration
        <config>/manifest.seeds.jsonl    every seed's manifest lines, ``file`` relative to <config>/
        <config>/metrics.json            the seeds combined (below); what the report reads
        report/                          table.md, table.json, chart_<metric>.png, grid.png, grid.html

Seeds: prompt ``i`` of seed folder ``seedS`` is generated from ``S + i`` (as ``evaluate generate --seed S``).
The combined ``metrics.json`` pools every image of every seed: ``mean`` / ``std`` / ``n`` over all images
(for FID, whose value is not a per-image mean: the mean of the per-seed values), and per metric ``seeds``
(``{seed: mean}``) and ``seed_std`` (population std of the per-seed means). ``report/table.md`` then gets a
"Spread over seeds" section when there are several seeds.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .configs import EvalConfig, build_pipeline, check_checkpoint, load_config
from .prompts import PromptRecord, load_prompts
from .statistics import as_number

__all__ = ["config_folder_name", "run_evaluation", "summary_line"]

SEEDS_MANIFEST = "manifest.seeds.jsonl"
_SCORED_STATE = ".run_scored.json"
_NOT_POOLED = frozenset({"fid"})  # metrics whose value is not a mean over images


def config_folder_name(name: str) -> str:
    """A configuration name as a folder name (``refl+realign`` stays; ``/`` and spaces become ``_``)."""
    return re.sub(r"[^\w.+=-]", "_", name).strip(".") or "config"


def _load_configs(configs: Sequence[EvalConfig | str | os.PathLike]) -> list[EvalConfig]:
    loaded = [load_config(c) for c in configs]  # ValueError for an unknown preset / a bad file
    if not loaded:
        raise ValueError("no configuration given: name presets (sd15, realign, ...) or configuration JSON files.")
    folders: dict[str, str] = {}
    for config in loaded:
        folder = config_folder_name(config.name)
        if folder in folders:
            raise ValueError(
                f"two configurations are named {config.name!r}"
                + (f" and {folders[folder]!r}" if folders[folder] != config.name else "")
                + "; give each its own name (the \"name\" key of a configuration file)."
            )
        folders[folder] = config.name
        check_checkpoint(config)  # a ReFL preset without a checkpoint fails before anything is generated
    return loaded


def _check_metrics(metrics: Sequence[str], model_paths: dict[str, Any], real_images: Any) -> list[str]:
    from .score import check_metric_names

    names = check_metric_names(metrics, model_paths)
    if "fid" in names and real_images is None:
        raise ValueError("the 'fid' metric needs real images (real_images= / --real-images FOLDER).")
    if real_images is not None and not Path(real_images).is_dir():
        raise FileNotFoundError(f"real_images is not a folder: {real_images}")
    return list(dict.fromkeys(names))


def _all_written(folder: Path, records: Sequence[PromptRecord], seed: int, per_prompt: int) -> bool:
    """Whether every image of `records` already has its file and manifest line in `folder` (nothing to load)."""
    from .manifest import read_manifest

    try:
        rows = read_manifest(folder)
    except FileNotFoundError:
        return False
    done = {(int(r["index"]), int(r.get("image", 0))) for r in rows
            if (folder / r["file"]).is_file() and r.get("seed") == seed + int(r["index"])
            and int(r["index"]) < len(records) and r.get("prompt") == records[int(r["index"])].text}
    return all((i, k) in done for i in range(len(records)) for k in range(per_prompt))


# --- combining the seeds ------------------------------------------------------------------------------------
def _pooled(entries: list[dict[str, Any]], key: str, std_key: str | None) -> tuple[float | None, float | None]:
    """Mean and population std of the union of the seeds' images, from each seed's mean, std and n."""
    parts = [(as_number(e.get(key)), as_number(e.get(std_key)) if std_key else None, as_number(e.get("n")) or 0.0)
             for e in entries]
    if any(m is None or math.isnan(m) for m, _, _ in parts):
        return None, None
    total = sum(n for _, _, n in parts)
    if total <= 0:
        mean = sum(m for m, _, _ in parts) / len(parts)
        return mean, None
    mean = sum(m * n for m, _, n in parts) / total
    if std_key is None or any(s is None or math.isnan(s) for _, s, _ in parts):
        return mean, None
    variance = sum(n * (s * s + (m - mean) ** 2) for m, s, n in parts) / total
    return mean, math.sqrt(max(variance, 0.0))


def _combine_metric(name: str, per_seed: dict[int, dict[str, Any]]) -> dict[str, Any]:
    entries = list(per_seed.values())
    first = entries[0]
    out: dict[str, Any] = {k: v for k, v in first.items() if "ci_" not in k}  # one seed's CI is not the pool's
    means = {seed: as_number(e.get("mean")) for seed, e in per_seed.items()}
    if name in _NOT_POOLED:
        values = [v for v in means.values() if v is not None]
        out["mean"] = sum(values) / len(values) if values else None
        out["std"] = None
    else:
        out["mean"], out["std"] = _pooled(entries, "mean", "std")
        for key in first:
            if key.endswith("_mean"):
                std_key = key[: -len("_mean")] + "_std"
                out[key], pooled_std = _pooled(entries, key, std_key if std_key in first else None)
                if std_key in first:
                    out[std_key] = pooled_std
    counts = [as_number(e.get("n")) for e in entries]
    out["n"] = int(sum(c for c in counts if c is not None)) if any(c is not None for c in counts) else None
    if as_number(first.get("sum")) is not None:
        out["sum"] = sum(as_number(e.get("sum")) or 0.0 for e in entries)
    if as_number(first.get("count_real")) is not None:
        out["count_real"] = first["count_real"]
    models = {str(e.get("model")) for e in entries}
    if len(models) > 1:
        out["model"] = sorted(models)
    finite = [v for v in means.values() if v is not None and not math.isnan(v)]
    out["seeds"] = {str(seed): v for seed, v in means.items()}
    if len(finite) == len(means) and finite:
        center = sum(finite) / len(finite)
        out["seed_std"] = math.sqrt(sum((v - center) ** 2 for v in finite) / len(finite))
    else:
        out["seed_std"] = None
    return out


def _combine_seeds(
    config: EvalConfig, folder: Path, seed_folders: dict[int, Path], wanted: Sequence[str]
) -> dict[str, Any]:
    """Write ``folder/config.json``, ``folder/manifest.seeds.jsonl`` and the combined ``folder/metrics.json``."""
    config.to_json(folder / "config.json")
    from .score import read_results

    lines = []
    for seed, seed_folder in seed_folders.items():
        _, entries = read_results(seed_folder)
        relative = seed_folder.relative_to(folder).as_posix()
        for entry in entries:
            lines.append(json.dumps({**entry, "file": f"{relative}/{entry['file']}", "run_seed": seed}))
    (folder / SEEDS_MANIFEST).write_text("\n".join(lines) + "\n", encoding="utf-8")

    scored = {seed: json.loads((f / "metrics.json").read_text(encoding="utf-8")) for seed, f in seed_folders.items()}
    from .score import SHAPES_FIELDS

    keep = set(wanted) | ({"blip_itc"} if "blip_itm" in wanted else set())
    if "shapes" in wanted:  # the shapes metric writes shapes_presence, shapes_binding, ...
        keep |= {f"shapes_{f}" for f in SHAPES_FIELDS}
    names = [m for m in dict.fromkeys(m for s in scored.values() for m in s.get("metrics", {})) if m in keep]
    metrics = {}
    for name in names:
        per_seed = {seed: s["metrics"][name] for seed, s in scored.items() if name in s.get("metrics", {})}
        if len(per_seed) == len(scored):
            metrics[name] = _combine_metric(name, per_seed)
    pooled = _pooled_with_ci(config, list(seed_folders.values()))
    for name, entry in pooled.items():
        if name in metrics and isinstance(entry, dict):
            metrics[name].update({k: v for k, v in entry.items() if k in ("mean", "std", "n") or "ci_" in k})
    first = next(iter(scored.values()))
    result = {
        "config": config.name,
        "prompt_set": first.get("prompt_set"),
        "num_images": sum(int(s.get("num_images") or 0) for s in scored.values()),
        "seeds": list(seed_folders),
        "metrics": metrics,
    }
    (folder / "metrics.json").write_text(json.dumps(result, indent=2, allow_nan=True) + "\n", encoding="utf-8")
    return result


def _pooled_with_ci(config: EvalConfig, folders: list[Path]) -> dict[str, Any]:
    """Per metric, the pooled mean and the bootstrap CI over prompts (all seeds of a prompt kept together),
    from ``score.combine_scores``."""
    from .score import combine_scores

    return combine_scores(folders, name=config.name).get("metrics", {})


def _seed_section(combined: dict[str, dict[str, Any]], seeds: Sequence[int]) -> str:
    from .report import METRIC_LABELS

    names = list(dict.fromkeys(m for r in combined.values() for m in r["metrics"]))
    lines = ["", f"## Spread over seeds ({', '.join(map(str, seeds))})", "",
             "Mean of the per-seed values ± their population standard deviation.", "",
             "| configuration | " + " | ".join(METRIC_LABELS.get(m, m) for m in names) + " |",
             "|---|" + "---:|" * len(names)]
    for config, result in combined.items():
        cells = []
        for m in names:
            entry = result["metrics"].get(m) or {}
            values = [v for v in (entry.get("seeds") or {}).values() if v is not None]
            std = entry.get("seed_std")
            cells.append("—" if not values or std is None else f"{sum(values) / len(values):.4f} ± {std:.4f}")
        lines.append(f"| {config} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# --- scoring with resume ------------------------------------------------------------------------------------
def _score_state(metrics: Sequence[str], model_paths: dict[str, Any], real_images: Any) -> dict[str, Any]:
    return {"metrics": sorted(metrics), "models": {k: str(v) for k, v in sorted(model_paths.items())},
            "real_images": None if real_images is None else str(real_images)}


def _already_scored(folder: Path, state: dict[str, Any], num_images: int) -> bool:
    try:
        saved = json.loads((folder / _SCORED_STATE).read_text(encoding="utf-8"))
        metrics = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    return saved == {**state, "num_images": num_images} and metrics.get("num_images") == num_images


# --- the run --------------------------------------------------------------------------------------------------
def run_evaluation(
    configs: Sequence[EvalConfig | str | os.PathLike],
    prompts: str | os.PathLike | Sequence[PromptRecord],
    out_dir: str | os.PathLike,
    metrics: Sequence[str],
    seeds: Sequence[int] = (42,),
    limit: int | None = None,
    batch_size: int = 1,
    device: str | None = None,
    dtype: Any = None,
    model_paths: dict[str, Any] | None = None,
    progress: bool = True,
    sample_seed: int | None = None,
    real_images: str | os.PathLike | None = None,
    score_batch_size: int = 8,
    rescore: bool = False,
) -> dict[str, Any]:
    """Generate, score and report `configs` on `prompts` into `out_dir` (layout: the module docstring).

    Args:
        configs: presets (``"sd15"``, ``"refl+realign"``, ...), configuration JSON files or :class:`EvalConfig`.
        prompts: a prompt set name or file (:func:`~.prompts.load_prompts`), or the records themselves.
        metrics: names of :data:`~.score.METRIC_NAMES` (e.g. ``["clip", "blip_itm", "timings"]``).
        seeds: one generation folder per seed; prompt ``i`` of seed ``S`` uses ``S + i``.
        limit, sample_seed: only the first `limit` prompts (a random `limit` drawn with `sample_seed`).
        batch_size: prompts per pipeline call; `score_batch_size`: images per scoring batch.
        device, dtype: of the pipelines (default: cuda when available, float16 there) and of the metrics.
        model_paths: per metric, a hub id, folder or built metric (``{"clip": "openai/clip-vit-base-patch32"}``).
        progress: a bar over configurations (and the generation / scoring bars).
        real_images: a folder of real images, for ``fid``.
        rescore: score again even when a folder's images and the metric settings did not change.

    Returns:
        ``{"out_dir", "report" ({kind: path}), "configs" ({name: {"folder", "generated", "skipped",
        "metrics"}}), "seconds" ({"generate", "score", "report", "total"}), "num_prompts", "seeds",
        "summary"}`` (``summary``: the one-line account the CLI prints).

    Raises:
        ValueError: an unknown configuration or metric, a ReFL preset without a checkpoint, a folder that
            holds another configuration's images; FileNotFoundError: a missing prompt file or real-images folder.
    """
    from tqdm.auto import tqdm

    from .generate import generate_images
    from .report import write_report
    from .score import score_folder

    start_all = time.perf_counter()
    model_paths = dict(model_paths or {})
    names = _check_metrics(metrics, model_paths, real_images)
    loaded = _load_configs(configs)
    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be one or more distinct integers, got {seeds}.")
    if isinstance(prompts, (str, os.PathLike)):
        prompt_name = os.fspath(prompts)
        records = load_prompts(prompt_name, limit=limit, seed=sample_seed)
    else:
        prompt_name = "(records)"
        records = list(prompts)[:limit] if limit is not None else list(prompts)
    if not records:
        raise ValueError("no prompts to evaluate.")
    if batch_size < 1 or score_batch_size < 1:
        raise ValueError("batch_size and score_batch_size must be at least 1.")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seconds = {"generate": 0.0, "score": 0.0, "report": 0.0}
    state = _score_state(names, model_paths, real_images)
    built: dict[str, Any] = {}  # metric objects, loaded once and reused for every folder
    per_config: dict[str, dict[str, Any]] = {}
    combined: dict[str, dict[str, Any]] = {}
    bar = tqdm(loaded, desc="configurations", unit="config", disable=not progress, dynamic_ncols=True)
    for config in bar:
        bar.set_postfix_str(config.name)
        folder = out / config_folder_name(config.name)
        seed_folders = {seed: folder / f"seed{seed}" for seed in seeds}
        info = {"folder": str(folder), "generated": 0, "skipped": 0, "seed_folders": {}}
        pipe = None
        try:
            for seed, seed_folder in seed_folders.items():
                start = time.perf_counter()
                if pipe is None and not _all_written(seed_folder, records, seed, int(config.images_per_prompt)):
                    pipe = build_pipeline(config, device=device, dtype=dtype)
                result = generate_images(config, records, seed_folder, seed=seed, batch_size=batch_size,
                                         progress=progress, device=device, dtype=dtype, pipeline=pipe)
                seconds["generate"] += time.perf_counter() - start
                info["generated"] += result["generated"]
                info["skipped"] += result["skipped"]
                info["seed_folders"][str(seed)] = str(seed_folder)
        finally:
            del pipe
            _empty_cache()

        start = time.perf_counter()
        for seed_folder in seed_folders.values():
            num_images = len(records) * int(config.images_per_prompt)
            if not rescore and _already_scored(seed_folder, state, num_images):
                continue
            for name in names:
                if name != "timings" and name not in built:
                    from .score import load_metric

                    built[name] = load_metric(name, model_paths.get(name), device)
            score_folder(seed_folder, names, batch_size=score_batch_size, progress=progress,
                         real_images=real_images, device=device, **{k: v for k, v in built.items()})
            (seed_folder / _SCORED_STATE).write_text(json.dumps({**state, "num_images": num_images}) + "\n",
                                                     encoding="utf-8")
        combined[config.name] = _combine_seeds(config, folder, seed_folders, names)
        seconds["score"] += time.perf_counter() - start
        info["metrics"] = {m: v.get("mean") for m, v in combined[config.name]["metrics"].items()}
        per_config[config.name] = info
    bar.close()

    start = time.perf_counter()
    report_dir = out / "report"
    files = write_report([per_config[c.name]["folder"] for c in loaded], report_dir)
    if len(seeds) > 1:
        with files["table_md"].open("a", encoding="utf-8") as handle:
            handle.write(_seed_section(combined, seeds))
    seconds["report"] = time.perf_counter() - start
    seconds["total"] = time.perf_counter() - start_all
    seconds = {k: round(v, 3) for k, v in seconds.items()}

    generated = sum(c["generated"] for c in per_config.values())
    result = {
        "out_dir": str(out),
        "report": {k: str(v) for k, v in files.items()},
        "configs": per_config,
        "seconds": seconds,
        "num_prompts": len(records),
        "prompts": prompt_name,
        "seeds": seeds,
        "metrics": names,
        "generated": generated,
        "skipped": sum(c["skipped"] for c in per_config.values()),
    }
    result["summary"] = summary_line(result)
    (out / "run.json").write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
    return result


def summary_line(result: dict[str, Any]) -> str:
    """``3 configuration(s) x 1 seed(s) x 446 prompt(s): generated 1338, skipped 0; table -> ...; generate 1.2 s,
    ...`` from a :func:`run_evaluation` result."""
    s = result["seconds"]
    per_thousand = ""
    if result["generated"]:
        per_thousand = f" ({1000 * s['generate'] / result['generated']:.0f} s per 1,000 images generated)"
    return (
        f"{len(result['configs'])} configuration(s) x {len(result['seeds'])} seed(s) x {result['num_prompts']} "
        f"prompt(s): generated {result['generated']} image(s), skipped {result['skipped']} already written; "
        f"table -> {result['report']['table_md']}; generate {s['generate']:.1f} s{per_thousand}, "
        f"score {s['score']:.1f} s, report {s['report']:.1f} s, total {s['total']:.1f} s"
    )


def _empty_cache() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
