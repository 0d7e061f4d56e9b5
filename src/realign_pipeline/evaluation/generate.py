"""Images for a prompt set from one configuration: seeded per prompt, resumable, sharded, with a manifest.

One folder per configuration::

    out_dir/
        config.json                    the EvalConfig (reloadable: --config out_dir/config.json)
        images/00000.png               prompt 0 (00000_0.png, 00000_1.png, ... with several images per prompt)
        coarse/00000.png               with realign: the coarse image
        layouts/00000.json             with realign: the captioned layout (realign-layout JSON)
        manifest.rank0.jsonl           one JSON line per image, written by process 0 (rank1, ... when sharded)
        geneval/00000/metadata.jsonl   GenEval prompts only: GenEval's own layout (samples/0000.png)
        t2icompbench/samples/<prompt>_000000.png   T2I-CompBench prompts only: its evaluators' layout

Seeding: the initial noise of prompt ``index`` (its position in ``records``) is
``torch.randn((images_per_prompt, C, H / f, W / f), generator=torch.Generator("cpu").manual_seed(seed + index))``
-- what ``pipe(prompt, generator=torch.Generator("cpu").manual_seed(seed + index))`` draws -- whatever the batch
size, the device or the number of processes.

Resume: an image whose file exists *and* has a manifest line is skipped. Images are written to a temporary
file and renamed, and the manifest line is appended after the rename, so a killed run loses at most the images
in flight. A manifest line cut short by the kill counts as missing: its image is made again, and the process
removes the cut line from its own manifest before appending (the rule of :mod:`.manifest`, which the scoring
follows too).

Sharding: process ``k`` of ``n`` takes the indices ``i`` with ``i % n == k`` and writes its own manifest
(``manifest.rank{k}.jsonl``); :func:`read_manifest` merges them.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..captioner.wrapper import CaptionerWrapper
from .configs import EvalConfig, build_pipeline, check_checkpoint, load_config
from .manifest import drop_cut_lines, read_manifest
from .prompts import PromptRecord

__all__ = [
    "BENCHMARK_LAYOUTS",
    "generate_images",
    "geneval_path",
    "image_name",
    "read_manifest",
    "t2icompbench_path",
]

BENCHMARK_LAYOUTS = ("geneval", "t2icompbench")
_PARTIAL = ".partial"


def image_name(index: int, k: int, images_per_prompt: int) -> str:
    """``00012.png``, or ``00012_3.png`` with several images per prompt."""
    return f"{index:05d}.png" if images_per_prompt == 1 else f"{index:05d}_{k}.png"


def geneval_path(record: PromptRecord, k: int) -> Path:
    """GenEval's layout, relative to ``out_dir/geneval``: ``<index:05d>/samples/<k:04d>.png`` (index = the
    prompt's line in GenEval's ``evaluation_metadata.jsonl``, the record id)."""
    return Path(f"{int(record.id):05d}") / "samples" / f"{k:04d}.png"


def t2icompbench_path(record: PromptRecord, index: int, k: int, images_per_prompt: int) -> Path:
    """T2I-CompBench's layout, relative to ``out_dir/t2icompbench``: ``samples/<prompt>_<n:06d>.png``.

    Its evaluators read the prompt as the file name before the first ``_`` and sort by the number after the
    last one, so ``_`` and ``/`` in the prompt become spaces; ``n = index * images_per_prompt + k``."""
    prompt = re.sub(r"\s+", " ", record.text.replace("_", " ").replace("/", " ").replace("\0", "")).strip()
    return Path("samples") / f"{prompt}_{index * images_per_prompt + k:06d}.png"


def _benchmark_of(record: PromptRecord) -> str | None:
    if record.set == "geneval" and {"tag", "include"} <= set(record.metadata):
        return "geneval"
    if record.set.startswith("t2icompbench-"):
        return "t2icompbench"
    return None


# ---------------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------------
def _atomic_write(path: Path, write, partial_dir: Path) -> None:
    """Write with `write(tmp_path)` to a temporary file in `partial_dir`, then rename onto `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial_dir.mkdir(parents=True, exist_ok=True)
    tmp = partial_dir / f"{os.getpid()}-{path.name}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _save_image(image, path: Path, partial_dir: Path) -> None:
    _atomic_write(path, lambda tmp: image.save(tmp, format="PNG"), partial_dir)


def _copy_file(source: Path, path: Path, partial_dir: Path) -> None:
    _atomic_write(path, lambda tmp: tmp.write_bytes(source.read_bytes()), partial_dir)


def _write_config(out_dir: Path, config: EvalConfig) -> None:
    path = out_dir / "config.json"
    data = config.to_dict()
    if path.is_file():
        try:
            existing = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            existing = None
        if existing is not None and existing != data:
            changed = sorted(k for k in set(existing) | set(data) if existing.get(k) != data.get(k))
            raise ValueError(
                f"{out_dir} holds images of another configuration (different {', '.join(changed)}); use another "
                "output folder, or delete it to start over."
            )
        if existing == data:
            return
    _atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8"),
                  out_dir / _PARTIAL)


def _initial_latents(pipe, indices: Sequence[int], seed: int, per_prompt: int, height: int, width: int):
    """One CPU-seeded noise block per prompt (``seed + index``), concatenated; None for pipelines without a UNet."""
    import torch

    unet = getattr(pipe, "unet", None)
    scale = getattr(pipe, "vae_scale_factor", None)
    if unet is None or scale is None:
        return None
    shape = (per_prompt, unet.config.in_channels, height // scale, width // scale)
    blocks = [torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed + i)) for i in indices]
    return torch.cat(blocks).to(device=pipe._execution_device, dtype=unet.dtype)


def _default_size(pipe, config: EvalConfig) -> tuple[int | None, int | None]:
    unet = getattr(pipe, "unet", None)
    scale = getattr(pipe, "vae_scale_factor", None)
    if unet is None or scale is None:
        return config.height, config.width
    size = unet.config.sample_size
    h, w = (size, size) if isinstance(size, int) else size
    return config.height or h * scale, config.width or w * scale


# ---------------------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------------------
def _shard(num_records: int, process_index: int, num_processes: int) -> list[int]:
    if num_processes < 1 or not 0 <= process_index < num_processes:
        raise ValueError(f"process_index must be in [0, num_processes), got {process_index} of {num_processes}.")
    return [i for i in range(num_records) if i % num_processes == process_index]


def _chunks(items: list[int], size: int) -> Iterable[list[int]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def generate_images(
    config: EvalConfig | str,
    records: Sequence[PromptRecord],
    out_dir: str | os.PathLike,
    seed: int = 42,
    batch_size: int = 1,
    process_index: int = 0,
    num_processes: int = 1,
    progress: bool = True,
    benchmark_layouts: Sequence[str] = BENCHMARK_LAYOUTS,
    device: str | None = None,
    dtype: Any = None,
    pipeline: Any = None,
    max_images: int | None = None,
) -> dict[str, Any]:
    """Generate this process's share of `records` with `config` into `out_dir` (see the module docstring).

    Args:
        config: an :class:`EvalConfig`, a preset name or a JSON file.
        records: the prompts (:func:`~realign_pipeline.evaluation.load_prompts`); an image's ``index`` is its
            prompt's position here.
        seed: prompt ``index`` is generated from ``seed + index`` (the paper uses 42).
        batch_size: prompts per pipeline call (the images do not depend on it).
        process_index, num_processes: this process's share: the indices ``i % num_processes == process_index``.
        benchmark_layouts: also write GenEval prompts in GenEval's layout and T2I-CompBench prompts in its
            layout (``()``: neither).
        device, dtype: where to build the pipeline (default: cuda when available; float16 on a GPU).
        pipeline: a ready pipeline to use instead of building one from `config` (`config` is still recorded).
        max_images: stop after generating this many images (the skipped ones do not count).

    Returns:
        ``{"generated", "skipped", "images" (this process's image count), "seconds", "out_dir"}``.
    """
    import torch
    from tqdm.auto import tqdm

    config = load_config(config)
    unknown = set(benchmark_layouts) - set(BENCHMARK_LAYOUTS)
    if unknown:
        raise ValueError(f"unknown benchmark layouts {sorted(unknown)}; known: {list(BENCHMARK_LAYOUTS)}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    records = list(records)
    if not records:
        raise ValueError("no prompts to generate.")
    mine = _shard(len(records), process_index, num_processes)
    if pipeline is None:
        check_checkpoint(config)  # before writing anything
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    partial = out / _PARTIAL
    _write_config(out, config)
    per_prompt = int(config.images_per_prompt)

    manifest_path = out / f"manifest.rank{process_index}.jsonl"
    drop_cut_lines(manifest_path)  # ours: their images are made again below; other ranks' stay theirs
    try:
        rows = read_manifest(out, warn=False)  # a cut line of another rank may be one it is writing right now
    except FileNotFoundError:
        rows = []
    listed = {(int(row["index"]), int(row.get("image") or 0)): row for row in rows}

    def done(index: int, k: int) -> bool:
        row = listed.get((index, k))
        if row is None or not (out / row["file"]).is_file():
            return False
        if row.get("seed") != seed + index or row.get("prompt") != records[index].text:
            raise ValueError(
                f"{out}: image {row['file']} was generated for prompt {row.get('prompt')!r} with seed {row.get('seed')}, "
                f"not {records[index].text!r} with seed {seed + index}: another prompt set, limit or --seed wrote this "
                "folder; use another output folder."
            )
        return True

    def benchmark_files(index: int, k: int) -> list[tuple[str, Path]]:
        record = records[index]
        kind = _benchmark_of(record)
        if kind is None or kind not in benchmark_layouts:
            return []
        if kind == "geneval":
            return [(kind, out / "geneval" / geneval_path(record, k))]
        return [(kind, out / "t2icompbench" / t2icompbench_path(record, index, k, per_prompt))]

    def write_benchmark_copies(index: int, k: int, image_path: Path) -> None:
        for kind, path in benchmark_files(index, k):
            if kind == "geneval":
                metadata = path.parent.parent / "metadata.jsonl"
                if not metadata.is_file():
                    line = json.dumps(records[index].metadata) + "\n"
                    _atomic_write(metadata, lambda tmp, line=line: tmp.write_text(line, encoding="utf-8"), partial)
            if not path.is_file():
                _copy_file(image_path, path, partial)

    pending: list[int] = []
    skipped = 0
    for index in mine:
        finished = [done(index, k) for k in range(per_prompt)]
        skipped += sum(finished)
        if all(finished):
            for k in range(per_prompt):
                write_benchmark_copies(index, k, out / listed[(index, k)]["file"])
        else:
            pending.append(index)

    generated = 0
    start_all = time.perf_counter()
    # one bar over this process's prompts: the pipeline's per-call bars are turned off below
    bar = tqdm(total=len(mine), initial=len(mine) - len(pending), disable=not progress, desc=f"{config.name}",
               unit="prompt", position=process_index, dynamic_ncols=True)
    if not pending:
        bar.close()
        return {"generated": 0, "skipped": skipped, "images": len(mine) * per_prompt,
                "seconds": 0.0, "out_dir": str(out)}

    pipe = pipeline if pipeline is not None else build_pipeline(config, device=device, dtype=dtype)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    rewriter = getattr(pipe, "prompt_rewriter", None)
    timed = None
    if config.realign:
        if getattr(pipe, "dense_captioner", None) is None:
            raise ValueError(f"config {config.name!r} has realign=true but the pipeline has no dense captioner.")
        timed = CaptionerWrapper(pipe.dense_captioner)  # times the captioner: coarse / caption / fine
        pipe.dense_captioner = timed
    height, width = _default_size(pipe, config)
    settings = config.call_kwargs()
    if height is not None:
        settings.update(height=height, width=width)

    try:
        for batch in _chunks(pending, batch_size):
            if max_images is not None and generated >= max_images:
                break
            texts = [records[i].text for i in batch]
            timings: dict[str, float] = {}
            start = time.perf_counter()
            prompts = texts
            if rewriter is not None:
                prompts = rewriter(texts)
                timings["rewrite_s"] = time.perf_counter() - start
            call_start = time.perf_counter()
            kwargs = dict(settings)
            latents = _initial_latents(pipe, batch, seed, per_prompt, height, width) if height else None
            if latents is not None:
                kwargs["latents"] = latents
            kwargs["generator"] = [torch.Generator("cpu").manual_seed(seed + i) for i in batch for _ in range(per_prompt)]
            if timed is not None:
                timed.started = timed.ended = None
            output = pipe(prompts, num_images_per_prompt=per_prompt, **kwargs)
            end = time.perf_counter()
            timings["total_s"] = end - start
            if timed is not None and timed.started is not None:
                timings["coarse_s"] = timed.started - call_start
                timings["caption_s"] = timed.ended - timed.started
                timings["fine_s"] = end - timed.ended
            share = {key: round(value / len(batch), 4) for key, value in timings.items()}
            realigned = getattr(output, "realigned", None)
            layouts = getattr(output, "layouts", None) if config.realign else None
            coarse = getattr(output, "coarse_images", None)
            for position, index in enumerate(batch):
                record = records[index]
                for k in range(per_prompt):
                    flat = position * per_prompt + k
                    name = image_name(index, k, per_prompt)
                    image_path = out / "images" / name
                    _save_image(output.images[flat], image_path, partial)
                    extra: dict[str, Any] = {}
                    if coarse is not None:
                        _save_image(coarse[flat], out / "coarse" / name, partial)
                        extra["coarse_file"] = f"coarse/{name}"
                    layout = layouts[flat] if layouts is not None else None
                    if layout is not None and len(layout):
                        from ..layout import Layout

                        layout_path = out / "layouts" / name.replace(".png", ".json")
                        saved = Layout(layout.regions, source=layout.source)
                        _atomic_write(layout_path, saved.to_json, partial)
                        extra["layout_file"] = f"layouts/{layout_path.name}"
                        extra["phrases"] = [{"phrase": r.phrase, "score": r.score} for r in layout.regions]
                    write_benchmark_copies(index, k, image_path)
                    row = {
                        "index": index,
                        "image": k,
                        "prompt": record.text,
                        "prompt_set": record.set,
                        "record": asdict(record),
                        "seed": seed + index,
                        "file": f"images/{name}",
                        "config": config.name,
                        "settings": settings,
                        "timings": share,
                        "realigned": bool(realigned[flat]) if realigned is not None else None,
                        "process_index": process_index,
                        **extra,
                    }
                    if rewriter is not None:
                        row["generation_prompt"] = prompts[position]
                    for kind, path in benchmark_files(index, k):
                        row.setdefault("benchmark_files", {})[kind] = path.relative_to(out).as_posix()
                    with manifest_path.open("a", encoding="utf-8") as handle:
                        handle.write(json.dumps(row) + "\n")
                        handle.flush()
                        os.fsync(handle.fileno())
                    generated += 1
            bar.update(len(batch))
    finally:
        bar.close()
        if timed is not None:
            pipe.dense_captioner = timed.captioner
    return {"generated": generated, "skipped": skipped, "images": len(mine) * per_prompt,
            "seconds": round(time.perf_counter() - start_all, 3), "out_dir": str(out)}
