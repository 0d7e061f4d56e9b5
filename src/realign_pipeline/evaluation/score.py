"""Score a result folder: the named metrics over its images and their prompts, saved as ``metrics.json``.

A result folder (one configuration, written by the generation step)::

    <folder>/config.json             {"name": ..., ...settings}
    <folder>/images/00000.png        (00000_1.png ... when several images per prompt)
    <folder>/manifest.rank0.jsonl    one JSON line per image; several rank files when generation was sharded

Each manifest line has at least ``index``, ``prompt``, ``file`` (relative to the folder) and usually
``prompt_set``, ``record`` (the :class:`~realign_pipeline.evaluation.prompts.PromptRecord` fields), ``seed``,
``config``, ``settings``, ``timings`` and ``realigned``. :func:`read_results` reads them (every
``manifest*.jsonl``, merged and sorted by index) with :func:`~.manifest.read_manifest`, the reader the
generation step resumes with: a line cut short by a killed run is ignored with a warning, as its image is made
again when the generation resumes.

Confidence intervals: every per-image metric gets ``ci_low`` / ``ci_high``, a 95% percentile bootstrap of the
mean (seeded, :func:`~.statistics.bootstrap_ci`). The resampled unit is the *prompt* (:func:`prompt_key`: the
manifest record's set and id, else its index), so several images of one prompt (several seeds, or images per
prompt) stay together. The per-image numbers are written to ``per_image.jsonl`` so that folders of the same
configuration with other seeds can be pooled (:func:`combine_scores`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import PIL.Image
import torch

from .manifest import read_manifest
from .statistics import as_number, bootstrap_ci, summarize  # the last two also importable from here

__all__ = [
    "METRIC_NAMES",
    "PER_IMAGE_FILE",
    "SHAPES_FIELDS",
    "bootstrap_ci",
    "combine_scores",
    "load_metric",
    "prompt_key",
    "read_results",
    "real_image_names",
    "score_folder",
    "summarize",
]

#: The names :func:`score_folder` accepts.
METRIC_NAMES = ("clip", "negclip", "blip_itm", "caption_reward", "blip_vqa", "fid", "timings", "shapes")
#: The metrics.json entries the ``shapes`` metric writes (``shapes_<field>``).
SHAPES_FIELDS = ("presence", "binding", "binding_fraction", "position")
#: Per-image scores of a result folder, one JSON line per image (written by :func:`score_folder`).
PER_IMAGE_FILE = "per_image.jsonl"
#: Metrics whose spec ``"shapes"`` means the shipped shapes-world model(s).
_SHAPES_SPECS = {"clip": ("clip",), "blip_itm": ("blip2-itm",), "caption_reward": ("blip2-captioner", "blip2-itm")}


def prompt_key(entry: dict[str, Any]) -> str:
    """The prompt a manifest entry belongs to (the bootstrap's unit): ``"<set>/<id>"`` of its record, else
    ``"index/<index>"``. The same prompt in folders generated with other seeds has the same key."""
    record = entry.get("record") or {}
    if isinstance(record, dict) and record.get("id") is not None:
        return f"{record.get('set') or entry.get('prompt_set') or ''}/{record['id']}"
    return f"index/{int(entry['index'])}"


def read_results(folder: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``(config, entries)`` of a result folder: ``config.json`` (``{}`` if absent; ``name`` defaults to the
    manifest's ``config`` or the folder's name) and the manifest lines of every ``manifest*.jsonl``, sorted
    by ``(index, image, file)`` (:func:`~.manifest.read_manifest`: a line cut short by a killed run is ignored
    with a warning, an image listed twice keeps its last line). A folder without a manifest, with no whole
    line, or with a line missing ``index``, ``prompt`` or ``file`` is an error."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no such result folder: {folder}")
    entries = read_manifest(folder)
    if not entries:
        raise ValueError(f"the manifests of {folder} are empty")
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.exists() else {}
    if not config.get("name"):
        names = {e.get("config") for e in entries if e.get("config")}
        config["name"] = names.pop() if len(names) == 1 else folder.name
    return config, entries


def _prompt_set(entries: list[dict[str, Any]]) -> str | None:
    sets = sorted({str(e.get("prompt_set") or (e.get("record") or {}).get("set") or "") for e in entries} - {""})
    return "+".join(sets) if sets else None


def real_image_names(entries: list[dict[str, Any]], real_folder: str | Path) -> list[str] | None:
    """The real images matching the prompts (COCO: the records' ``metadata.file_name``
    ``COCO_val2014_<image_id:012d>.jpg``, with any image extension, or a file named by the bare / 12-digit
    image id), one per distinct
    image id; ``None`` when the records carry no image ids (then every image of the folder is used)."""
    from .fid import IMAGE_EXTENSIONS

    real = Path(real_folder)
    present = {p.name for p in real.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS}
    stems = {Path(n).stem: n for n in present}
    names: list[str] = []
    seen: set[str] = set()
    for e in entries:
        meta = (e.get("record") or {}).get("metadata") or {}
        if "image_id" not in meta and "file_name" not in meta:
            return None
        key = str(meta.get("image_id", meta.get("file_name")))
        if key in seen:
            continue
        seen.add(key)
        candidates = [str(meta["file_name"]), Path(str(meta["file_name"])).stem] if meta.get("file_name") else []
        if "image_id" in meta:
            candidates += [f"{int(meta['image_id']):012d}", str(meta["image_id"])]
        found = next((c if c in present else stems[c] for c in candidates if c in present or c in stems), None)
        if found is None:
            raise FileNotFoundError(f"no real image for image id {key} in {real} (looked for {candidates})")
        names.append(found)
    return names


def _fid_metric(spec: Any, device: Any, dtype: Any):
    from .fid import FrechetDistance

    if isinstance(spec, FrechetDistance):
        return spec
    if callable(spec) and not isinstance(spec, str):
        return FrechetDistance(spec, extractor_name=getattr(spec, "name", type(spec).__name__))
    spec = "inception" if spec in (None, "", "inception") else str(spec)
    if spec == "inception":
        from .inception import inception_fid

        return inception_fid(device=device)
    return FrechetDistance.from_pretrained(spec.removeprefix("clip:"), device=device, dtype=dtype)


def load_metric(name: str, spec: Any = None, device: Any = None, dtype: Any = None):
    """The metric ``name`` (one of :data:`METRIC_NAMES` but ``timings``): ``spec`` is a hub id / folder
    (``None``: the metric's default), or an already built metric object (used as is). For ``fid``: ``None`` /
    ``"inception"`` (pytorch-fid, the ``eval`` extra), ``"clip:<id>"`` (Fréchet CLIP distance), a
    ``FrechetDistance`` or a feature extractor callable. For ``clip`` / ``blip_itm`` / ``caption_reward`` the spec
    ``"shapes"`` is the shipped shapes-world model (caption reward: its BLIP-2 captioner and BLIP-2 ITM text
    encoder, in float32 unless ``dtype`` says otherwise); ``shapes`` has no model (it runs
    :mod:`realign_pipeline.shapes.checker`)."""
    if name not in METRIC_NAMES or name == "timings":
        raise ValueError(f"unknown metric {name!r}; the names are: {', '.join(METRIC_NAMES)}")
    if name == "fid":
        return _fid_metric(spec, device, dtype)
    if spec is not None and not isinstance(spec, (str, Path)):
        return spec
    if name == "shapes":
        from ..shapes.metric import ShapesAlignmentScore

        return ShapesAlignmentScore.from_pretrained(None if spec is None else str(spec))
    if spec == "shapes":
        if name not in _SHAPES_SPECS:
            raise ValueError(f"metric {name!r} has no shapes-world model; 'shapes' works for {sorted(_SHAPES_SPECS)}")
        from ..shapes.pretrained import shapes_model_path

        paths = [str(shapes_model_path(m)) for m in _SHAPES_SPECS[name]]
        dtype = torch.float32 if dtype is None else dtype  # the shipped weights are fp16: compute in float32
        if name == "caption_reward":
            from .metrics import CaptionRewardScore

            return CaptionRewardScore.from_pretrained(paths[0], device=device, dtype=dtype, text_encoder=paths[1])
        spec = paths[0]
    if name == "blip_vqa":
        from .vqa import BlipVqaScore

        cls: Any = BlipVqaScore
    else:
        from .metrics import METRICS

        cls = METRICS[name]
    kwargs = {"device": device, "dtype": dtype}
    return cls.from_pretrained(str(spec), **kwargs) if spec is not None else cls.from_pretrained(**kwargs)


def _summary(values: list[float]) -> dict[str, float | int]:
    if not values:
        return {"mean": math.nan, "std": math.nan, "n": 0}
    t = torch.tensor(values, dtype=torch.float64)
    return {"mean": float(t.mean()), "std": float(t.std(unbiased=False)), "n": len(values)}


def _timings(entries: list[dict[str, Any]]) -> dict[str, Any]:
    keys: list[str] = []
    for e in entries:
        keys += [k for k, v in (e.get("timings") or {}).items() if isinstance(v, (int, float)) and k not in keys]
    if not keys:
        return {"mean": math.nan, "std": math.nan, "n": 0, "model": None, "unit": "s"}
    per = {k: _summary([float(e["timings"][k]) for e in entries if isinstance((e.get("timings") or {}).get(k), (int, float))]) for k in keys}
    main = "total_s" if "total_s" in per else keys[0]
    out: dict[str, Any] = {**per[main], "model": None, "unit": "s", "field": main, "sum": per[main]["mean"] * per[main]["n"]}
    for k, s in per.items():
        if k != main:
            out[f"{k}_mean"], out[f"{k}_std"] = s["mean"], s["std"]
    return out


def _entry(name: str, result: dict[str, Any]) -> dict[str, Any]:
    """A metric's ``compute()`` -> the metrics.json entry: ``mean``, ``std``, ``n``, ``model`` first."""
    out: dict[str, Any] = {
        "mean": result.get("mean", result.get("value")),
        "std": result.get("std"),
        "n": result.get("count"),
        "model": result.get("model"),
    }
    out.update({k: v for k, v in result.items() if k not in ("mean", "std", "count", "model", "metric")})
    return out


def _ci_fields(summary: dict[str, Any]) -> dict[str, Any]:
    return {k: summary[k] for k in ("ci_low", "ci_high", "confidence", "n_prompts")}


def _with_ci(entry: dict[str, Any], summary: dict[str, Any]) -> dict[str, Any]:
    """``entry`` with the CI fields after ``mean``, ``std``, ``n``, ``model``."""
    head = {k: entry.get(k) for k in ("mean", "std", "n", "model")}
    return {**head, **_ci_fields(summary), **{k: v for k, v in entry.items() if k not in head}}


def _write_per_image(folder: Path, entries: list[dict[str, Any]], groups: list[str],
                     per_image: dict[str, list[float | None]], keep_previous: bool) -> None:
    """``per_image.jsonl``: one line per image with its prompt key and every per-image metric scored so far."""
    path = folder / PER_IMAGE_FILE
    previous: dict[str, dict[str, Any]] = {}
    if keep_previous and path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                previous[str(row.get("file"))] = row.get("scores", {})
    lines = []
    for i, (e, g) in enumerate(zip(entries, groups)):
        scores = {**previous.get(str(e["file"]), {}), **{m: v[i] for m, v in per_image.items()}}
        row = {"file": e["file"], "index": e["index"], "image": e.get("image", 0), "seed": e.get("seed"),
               "prompt": e["prompt"], "prompt_key": g, "scores": scores}
        lines.append(json.dumps(row, allow_nan=True) + "\n")
    path.write_text("".join(lines), encoding="utf-8")


def _load_images(folder: Path, entries: list[dict[str, Any]]) -> list[PIL.Image.Image]:
    images = []
    for e in entries:
        with PIL.Image.open(folder / e["file"]) as im:
            images.append(im.convert("RGB"))
    return images


def check_metric_names(metrics: str | Sequence[str], model_paths: Any = ()) -> list[str]:
    """The metric names as a list; ``ValueError`` naming the valid ones for an unknown metric or model path."""
    names = [str(m) for m in ([metrics] if isinstance(metrics, str) else metrics)]
    unknown = [m for m in names if m not in METRIC_NAMES]
    if unknown or not names:
        raise ValueError(f"unknown metric(s) {unknown or '(none given)'}; the names are: {', '.join(METRIC_NAMES)}")
    extra = sorted(set(model_paths) - set(METRIC_NAMES))
    if extra:
        raise ValueError(f"model paths for unknown metrics {extra}; the names are: {', '.join(METRIC_NAMES)}")
    return names


def score_folder(
    folder: str | Path,
    metrics: Iterable[str],
    batch_size: int = 8,
    progress: bool = True,
    real_images: str | Path | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    bootstrap: int = 2000,
    confidence: float = 0.95,
    ci_seed: int = 0,
    **model_paths: Any,
) -> dict[str, Any]:
    """Compute ``metrics`` over a result folder's images and prompts; write and return ``metrics.json``.

    ``metrics``: names from :data:`METRIC_NAMES` (``blip_itm`` also writes ``blip_itc``, its ITC cosine;
    ``fid`` needs ``real_images``, a folder: for COCO the images named by the records' image ids, else all
    its images; ``timings`` summarises the manifest's generation timings). ``model_paths``: per metric name,
    a hub id / folder or a built metric (see :func:`load_metric`), e.g. ``clip="openai/clip-vit-base-patch32"``.
    An existing ``metrics.json`` is updated: metrics not computed now are kept.

    ``shapes`` (the shapes-world checker, :class:`~realign_pipeline.shapes.metric.ShapesAlignmentScore`) writes
    four entries: ``shapes_presence``, ``shapes_binding``, ``shapes_binding_fraction`` and ``shapes_position``
    (over the prompts that name a side).

    The result: ``{"config", "prompt_set", "num_images", "metrics": {name: {"mean", "std", "n", "model",
    "ci_low", "ci_high", "confidence", "n_prompts", ...}}}``; FID's ``mean`` is its value (``std`` is ``None``, no
    CI). The CI is a ``confidence`` percentile bootstrap with ``bootstrap`` resamples of the prompts (seed
    ``ci_seed``), see :func:`~.statistics.bootstrap_ci`; a metric's second numbers get ``<field>_ci_low`` / ``_ci_high``. The
    per-image numbers go to ``per_image.jsonl`` (see :func:`combine_scores`).
    """
    folder = Path(folder)
    names = check_metric_names(metrics, model_paths)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if bootstrap < 1 or not 0.0 < confidence < 1.0:
        raise ValueError(f"bootstrap must be >= 1 and confidence in (0, 1), got {bootstrap} and {confidence}")
    config, entries = read_results(folder)
    missing = [e["file"] for e in entries if not (folder / e["file"]).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} images of the manifest are missing in {folder}: {missing[:5]}")
    if "fid" in names:
        if real_images is None:
            raise ValueError("the 'fid' metric needs real_images=<folder of real images>")
        if not Path(real_images).is_dir():
            raise FileNotFoundError(f"real_images is not a folder: {real_images}")

    meters = {m: load_metric(m, model_paths.get(m), device, dtype) for m in names if m != "timings"}
    if "fid" in meters:
        fid = meters["fid"]
        fid.reset(real=True)
        fid.update_real_folder(real_images, names=real_image_names(entries, real_images), batch_size=batch_size)
    for meter in meters.values():
        meter.reset()

    batches = range(0, len(entries), batch_size)
    if meters and progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc=f"scoring {config['name']}", unit="batch")
    for start in batches if meters else ():
        chunk = entries[start : start + batch_size]
        images = _load_images(folder, chunk)
        prompts = [str(e["prompt"]) for e in chunk]
        for meter in meters.values():
            meter.update(images, prompts)

    groups = [prompt_key(e) for e in entries]
    ci = {"groups": groups, "n_resamples": bootstrap, "confidence": confidence, "seed": ci_seed}
    computed: dict[str, Any] = {}
    per_image: dict[str, list[float | None]] = {}
    for name, meter in meters.items():
        if name == "shapes":
            result = meter.compute(groups=groups)
            for f in SHAPES_FIELDS:
                s = result[f]
                computed[f"shapes_{f}"] = {"mean": s["mean"], "std": s["std"], "n": s["n"], "model": None,
                                           **_ci_fields(s), "checker": result["checker"]}
                per_image[f"shapes_{f}"] = list(meter.scores[f])
            continue
        result = meter.compute()
        if name == "blip_itm":
            itc = {"mean": result.pop("itc_mean"), "std": result.pop("itc_std")}
            computed["blip_itm"] = _entry(name, result)
            computed["blip_itc"] = {**_entry(name, {**result, **itc}), "head": "itc"}
            computed["blip_itm"]["head"] = "itm"
        else:
            computed[name] = _entry(name, result)
        scores = getattr(meter, "scores", None)
        fields = list(getattr(meter, "fields", ()))
        if not isinstance(scores, dict) or not fields or any(len(scores.get(f, ())) != len(entries) for f in fields):
            continue  # no per-image numbers (FID)
        if name == "blip_itm":
            main_of = {"blip_itm": "itm", "blip_itc": "itc"}
        else:
            main_of = {name: fields[0]}
            for f in fields[1:]:
                low_high = _ci_fields(summarize(scores[f], **ci))
                computed[name][f"{f}_ci_low"], computed[name][f"{f}_ci_high"] = low_high["ci_low"], low_high["ci_high"]
        for entry_name, field_name in main_of.items():
            computed[entry_name] = _with_ci(computed[entry_name], summarize(scores[field_name], **ci))
            per_image[entry_name] = [float(v) for v in scores[field_name]]
    if "timings" in names:
        computed["timings"] = _timings(entries)
        field_name = computed["timings"].get("field")
        if field_name:
            values = [as_number((e.get("timings") or {}).get(field_name)) for e in entries]
            computed["timings"] = _with_ci(computed["timings"], summarize(values, **ci))
            per_image["timings"] = values

    out_path = folder / "metrics.json"
    previous = json.loads(out_path.read_text(encoding="utf-8")) if out_path.exists() else {}
    if previous.get("num_images") != len(entries) or previous.get("config") != config["name"]:
        previous = {}  # scores of another set of images: stale
    result = {
        "config": config["name"],
        "prompt_set": _prompt_set(entries),
        "num_images": len(entries),
        "metrics": {**previous.get("metrics", {}), **computed},
    }
    _write_per_image(folder, entries, groups, per_image, keep_previous=bool(previous))
    out_path.write_text(json.dumps(result, indent=2, allow_nan=True) + "\n", encoding="utf-8")
    return result


def combine_scores(
    folders: Sequence[str | Path],
    out: str | Path | None = None,
    metrics: Sequence[str] | None = None,
    name: str | None = None,
    bootstrap: int = 2000,
    confidence: float = 0.95,
    ci_seed: int = 0,
) -> dict[str, Any]:
    """Pool scored result folders of one configuration (e.g. one per seed) into one ``metrics.json``-style
    result: each metric's mean over every image of every folder, and a bootstrap CI that resamples prompts
    (:func:`prompt_key`) with all their images from all folders kept together.

    ``metrics``: entry names of the folders' ``per_image.jsonl`` (default: those every folder has); a metric
    missing from one folder is an error. ``name``: the result's ``config`` (default: the folders' common config
    name; folders of different configurations need it). ``out``: a folder to write ``metrics.json`` (and a
    ``config.json`` with the name) into, readable by :func:`~realign_pipeline.evaluation.report.write_report`.
    """
    paths = [Path(f) for f in folders]
    if not paths:
        raise ValueError("combine_scores needs at least one scored result folder")
    rows: list[dict[str, Any]] = []
    per_folder_metrics: list[set[str]] = []
    names, sets, models = [], [], {}
    for folder in paths:
        per_image, scored = folder / PER_IMAGE_FILE, folder / "metrics.json"
        if not per_image.is_file() or not scored.is_file():
            raise FileNotFoundError(f"{folder} has no {PER_IMAGE_FILE} / metrics.json: score it first (score_folder)")
        info = json.loads(scored.read_text(encoding="utf-8"))
        names.append(str(info.get("config")))
        sets.append(info.get("prompt_set"))
        for m, entry in (info.get("metrics") or {}).items():
            models.setdefault(m, {k: entry.get(k) for k in ("model", "checker", "head", "field", "unit") if k in entry})
        lines = [json.loads(x) for x in per_image.read_text(encoding="utf-8").splitlines() if x.strip()]
        per_folder_metrics.append(set.intersection(*(set(r["scores"]) for r in lines)) if lines else set())
        rows += [{**r, "folder": str(folder)} for r in lines]
    if name is None:
        if len(set(names)) > 1:
            raise ValueError(f"the folders hold different configurations {sorted(set(names))}: pass name=")
        name = names[0]
    common = set.intersection(*per_folder_metrics)
    wanted = list(metrics) if metrics is not None else sorted(common)
    for m in wanted:
        missing = [str(f) for f, have in zip(paths, per_folder_metrics) if m not in have]
        if missing:
            raise ValueError(f"metric {m!r} is not scored in {missing}: score every folder with it first")
    groups = [str(r["prompt_key"]) for r in rows]
    result_metrics = {}
    for m in wanted:
        s = summarize([r["scores"][m] for r in rows], groups, n_resamples=bootstrap, confidence=confidence,
                      seed=ci_seed)
        result_metrics[m] = {"mean": s["mean"], "std": s["std"], "n": s["n"], "model": models.get(m, {}).get("model"),
                             **_ci_fields(s), **{k: v for k, v in models.get(m, {}).items() if k != "model"}}
    prompt_sets = sorted({str(p) for p in sets if p})
    result = {
        "config": name,
        "prompt_set": "+".join(prompt_sets) if prompt_sets else None,
        "num_images": len(rows),
        "folders": [str(f) for f in paths],
        "seeds_per_prompt": len(rows) / max(len(set(groups)), 1),
        "metrics": result_metrics,
    }
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(result, indent=2, allow_nan=True) + "\n", encoding="utf-8")
        (out / "config.json").write_text(json.dumps({"name": name, "combined_from": result["folders"]}, indent=2)
                                         + "\n", encoding="utf-8")
    return result
