"""Score a result folder: the named metrics over its images and their prompts, saved as ``metrics.json``.

A result folder (one configuration, written by the generation step)::

    <folder>/config.json             {"name": ..., ...settings}
    <folder>/images/00000.png        (00000_1.png ... when several images per prompt)
    <folder>/manifest.rank0.jsonl    one JSON line per image; several rank files when generation was sharded

Each manifest line has at least ``index``, ``prompt``, ``file`` (relative to the folder) and usually
``prompt_set``, ``record`` (the :class:`~realign_pipeline.evaluation.prompts.PromptRecord` fields), ``seed``,
``config``, ``settings``, ``timings`` and ``realigned``. :func:`read_results` reads them (every
``manifest*.jsonl``, merged and sorted by index, then file) without depending on the generation code.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import PIL.Image
import torch

__all__ = ["METRIC_NAMES", "load_metric", "read_results", "real_image_names", "score_folder"]

#: The names :func:`score_folder` accepts.
METRIC_NAMES = ("clip", "negclip", "blip_itm", "caption_reward", "blip_vqa", "fid", "timings")


def read_results(folder: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``(config, entries)`` of a result folder: ``config.json`` (``{}`` if absent; ``name`` defaults to the
    manifest's ``config`` or the folder's name) and the manifest lines of every ``manifest*.jsonl``, sorted
    by ``(index, file)``. A folder without a manifest, a malformed line or an image listed twice is an error."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no such result folder: {folder}")
    files = sorted(folder.glob("manifest*.jsonl"))
    if not files:
        raise FileNotFoundError(
            f"{folder} has no manifest*.jsonl: is it a result folder written by the generation step?"
        )
    entries: dict[str, dict[str, Any]] = {}
    for path in files:
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{n}: not a JSON line ({error})") from error
            missing = [k for k in ("index", "prompt", "file") if k not in entry]
            if not isinstance(entry, dict) or missing:
                raise ValueError(f"{path}:{n}: a manifest line needs 'index', 'prompt' and 'file' (missing {missing})")
            key = str(entry["file"])
            if key in entries and entries[key] != entry:
                raise ValueError(f"{path}:{n}: {key} is listed twice with different entries")
            entries[key] = entry
    if not entries:
        raise ValueError(f"the manifests of {folder} are empty")
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.exists() else {}
    if not config.get("name"):
        names = {e.get("config") for e in entries.values() if e.get("config")}
        config["name"] = names.pop() if len(names) == 1 else folder.name
    ordered = sorted(entries.values(), key=lambda e: (int(e["index"]), str(e["file"])))
    return config, ordered


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
    ``FrechetDistance`` or a feature extractor callable."""
    if name not in METRIC_NAMES or name == "timings":
        raise ValueError(f"unknown metric {name!r}; the names are: {', '.join(METRIC_NAMES)}")
    if name == "fid":
        return _fid_metric(spec, device, dtype)
    if spec is not None and not isinstance(spec, (str, Path)):
        return spec
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


def _load_images(folder: Path, entries: list[dict[str, Any]]) -> list[PIL.Image.Image]:
    images = []
    for e in entries:
        with PIL.Image.open(folder / e["file"]) as im:
            images.append(im.convert("RGB"))
    return images


def score_folder(
    folder: str | Path,
    metrics: Iterable[str],
    batch_size: int = 8,
    progress: bool = True,
    real_images: str | Path | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    **model_paths: Any,
) -> dict[str, Any]:
    """Compute ``metrics`` over a result folder's images and prompts; write and return ``metrics.json``.

    ``metrics``: names from :data:`METRIC_NAMES` (``blip_itm`` also writes ``blip_itc``, its ITC cosine;
    ``fid`` needs ``real_images``, a folder: for COCO the images named by the records' image ids, else all
    its images; ``timings`` summarises the manifest's generation timings). ``model_paths``: per metric name,
    a hub id / folder or a built metric (see :func:`load_metric`), e.g. ``clip="openai/clip-vit-base-patch32"``.
    An existing ``metrics.json`` is updated: metrics not computed now are kept.

    The result: ``{"config", "prompt_set", "num_images", "metrics": {name: {"mean", "std", "n", "model",
    ...}}}``; FID's ``mean`` is its value (``std`` is ``None``).
    """
    folder = Path(folder)
    names = [str(m) for m in ([metrics] if isinstance(metrics, str) else metrics)]
    unknown = [m for m in names if m not in METRIC_NAMES]
    if unknown or not names:
        raise ValueError(f"unknown metric(s) {unknown or '(none given)'}; the names are: {', '.join(METRIC_NAMES)}")
    extra = sorted(set(model_paths) - set(METRIC_NAMES))
    if extra:
        raise ValueError(f"model paths for unknown metrics {extra}; the names are: {', '.join(METRIC_NAMES)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
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

    computed: dict[str, Any] = {}
    for name, meter in meters.items():
        result = meter.compute()
        if name == "blip_itm":
            itc = {"mean": result.pop("itc_mean"), "std": result.pop("itc_std")}
            computed["blip_itm"] = _entry(name, result)
            computed["blip_itc"] = {**_entry(name, {**result, **itc}), "head": "itc"}
            computed["blip_itm"]["head"] = "itm"
        else:
            computed[name] = _entry(name, result)
    if "timings" in names:
        computed["timings"] = _timings(entries)

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
    out_path.write_text(json.dumps(result, indent=2, allow_nan=True) + "\n", encoding="utf-8")
    return result
