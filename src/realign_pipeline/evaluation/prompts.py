"""Prompt sets for evaluation: the bundled benchmark sets and a user's own files, behind one loader.

``load_prompts(name, limit=None, seed=None)`` returns a list of :class:`PromptRecord`. ``name`` is one of
:func:`available_prompt_sets` (``coco5k``, ``abc6k``, ``cc500``, ``t2icompbench-<category>``, ``geneval``,
``drawbench``, ``partiprompts``, ``shapes-heldout``) or a path to a ``.txt`` (one prompt per line), ``.csv`` / ``.tsv`` (a
``prompt`` / ``prompts`` / ``caption`` / ``text`` column, any case) or ``.jsonl`` file (one object per line
with such a key). The bundled files live in ``realign_pipeline/assets/prompts`` with their licenses (see the
README there and ``docs/evaluation.md``).

``shapes-heldout`` is generated, not read from a file: the shapes world's held-out pairings in every caption form
(:func:`realign_pipeline.shapes.world.held_out_prompts`), with ``metadata = {"form", "objects"}`` where each object
is ``{"color", "shape", "side"}`` (side ``"left"`` / ``"right"`` or ``None`` when the prompt names no position).

DrawBench is not bundled (its source states no license): ``load_prompts("drawbench", path=...)`` or the
environment variable ``REALIGNDIFF_DRAWBENCH`` points at a copy of ``DrawBench.csv`` (columns ``Prompts``,
``Category``).
"""

from __future__ import annotations

import csv
import json
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

__all__ = ["DRAWBENCH_ENV", "PromptRecord", "available_prompt_sets", "load_prompts"]

DRAWBENCH_ENV = "REALIGNDIFF_DRAWBENCH"
PROMPT_COLUMNS = ("prompt", "prompts", "caption", "captions", "text")
USER_FILE_SUFFIXES = (".txt", ".csv", ".tsv", ".jsonl")
CC500_LINES = 446  # lines 1-446 of CC-500.txt are CC-500 proper; the rest are other prompts


@dataclass
class PromptRecord:
    """One prompt: its ``text``, an ``id`` unique within its ``set``, and set-specific ``metadata``."""

    text: str
    id: str
    set: str
    metadata: dict[str, Any] = field(default_factory=dict)


def _asset(relative: str) -> str:
    return (
        resources.files("realign_pipeline")
        .joinpath("assets/prompts")
        .joinpath(relative)
        .read_text(encoding="utf-8")
    )


def _lines(text: str) -> list[str]:
    # Many of the upstream files have no final newline; blank lines are not prompts.
    return [line.strip() for line in text.splitlines() if line.strip()]


def _tsv_rows(text: str) -> list[dict[str, str]]:
    # TSV has no quoting: PartiPrompts has prompts that begin with '"', which csv's default quoting would eat.
    return list(csv.DictReader(text.splitlines(), delimiter="\t", quoting=csv.QUOTE_NONE))


# --- the bundled sets --------------------------------------------------------------------------------------


def _coco5k() -> list[PromptRecord]:
    rows = _tsv_rows(_asset("coco/mlperf_coco2014_val_5k_captions_source.tsv"))
    return [
        PromptRecord(
            text=r["caption"].strip(),
            id=r["id"],
            set="coco5k",
            metadata={
                "caption_id": int(r["id"]),
                "image_id": int(r["image_id"]),
                "file_name": r["file_name"],
                "coco_url": r["coco_url"],
                "height": int(r["height"]),
                "width": int(r["width"]),
            },
        )
        for r in rows
    ]


def _abc6k() -> list[PromptRecord]:
    lines = _lines(_asset("ABC-6K.txt"))
    return [
        PromptRecord(
            text=t,
            id=f"{i:04d}",
            set="abc6k",
            metadata={"line": i + 1, "pair": i // 2, "member": "original" if i % 2 == 0 else "swapped"},
        )
        for i, t in enumerate(lines)
    ]


def _cc500() -> list[PromptRecord]:
    lines = _lines(_asset("CC-500.txt"))[:CC500_LINES]
    return [
        PromptRecord(text=t, id=f"{i:03d}", set="cc500", metadata={"line": i + 1})
        for i, t in enumerate(lines)
    ]


def _t2i_files() -> dict[str, str]:
    """``category -> file name`` for the bundled T2I-CompBench val files (``color_val_seen.txt`` -> ``color-seen``)."""
    folder = resources.files("realign_pipeline").joinpath("assets/prompts/t2icompbench")
    out = {}
    for entry in folder.iterdir():
        stem, _, suffix = entry.name.rpartition(".")
        if suffix != "txt" or "_val" not in stem:
            continue  # new_objects.txt is a word list, not prompts
        base, _, split = stem.partition("_val")
        category = base.replace("_", "-") + split.replace("_", "-")
        out[category] = entry.name
    return out


def _t2icompbench(category: str) -> Callable[[], list[PromptRecord]]:
    def load() -> list[PromptRecord]:
        file_name = _t2i_files()[category]
        lines = _lines(_asset(f"t2icompbench/{file_name}"))
        return [
            PromptRecord(
                text=t,
                id=f"{i:03d}",
                set=f"t2icompbench-{category}",
                metadata={"category": category, "file": file_name, "line": i + 1},
            )
            for i, t in enumerate(lines)
        ]

    return load


def _geneval() -> list[PromptRecord]:
    records = []
    for i, line in enumerate(_lines(_asset("geneval/evaluation_metadata.jsonl"))):
        meta = json.loads(line)
        # The official layout is <outdir>/<index:05d>/metadata.jsonl holding exactly this object.
        records.append(PromptRecord(text=meta["prompt"], id=f"{i:05d}", set="geneval", metadata=meta))
    return records


def _partiprompts() -> list[PromptRecord]:
    rows = _tsv_rows(_asset("PartiPrompts.tsv"))
    return [
        PromptRecord(
            text=r["Prompt"].strip(),
            id=f"{i:04d}",
            set="partiprompts",
            metadata={"category": r["Category"], "challenge": r["Challenge"], "note": r["Note"]},
        )
        for i, r in enumerate(rows)
    ]


def _drawbench(path: str | os.PathLike[str] | None) -> list[PromptRecord]:
    path = path or os.environ.get(DRAWBENCH_ENV)
    if not path:
        raise ValueError(
            "DrawBench is not bundled (its published copies state no license): pass "
            f"load_prompts('drawbench', path='.../DrawBench.csv') or set {DRAWBENCH_ENV} to a copy of the DrawBench "
            "sheet saved as CSV (columns 'Prompts', 'Category'); see docs/evaluation.md"
        )
    records = _user_file(Path(path))
    return [
        PromptRecord(
            text=r.text,
            id=f"{int(r.id):03d}",
            set="drawbench",
            metadata={"category": (r.metadata.get("Category") or r.metadata.get("category") or "").strip()},
        )
        for r in records
    ]


def _shapes_heldout() -> list[PromptRecord]:
    from ..shapes.world import held_out_prompts

    return [
        PromptRecord(
            text=r["prompt"],
            id=f"{i:03d}",
            set="shapes-heldout",
            metadata={"form": r["form"], "objects": [dict(o) for o in r["objects"]]},
        )
        for i, r in enumerate(held_out_prompts())
    ]


_BUILTIN: dict[str, Callable[[], list[PromptRecord]]] = {
    "coco5k": _coco5k,
    "abc6k": _abc6k,
    "cc500": _cc500,
    "geneval": _geneval,
    "partiprompts": _partiprompts,
    "shapes-heldout": _shapes_heldout,
}


def _registry() -> dict[str, Callable[[], list[PromptRecord]]]:
    reg = dict(_BUILTIN)
    for category in _t2i_files():
        reg[f"t2icompbench-{category}"] = _t2icompbench(category)
    return reg


def available_prompt_sets() -> list[str]:
    """Names ``load_prompts`` accepts besides file paths (``drawbench`` needs a user-supplied file)."""
    return sorted([*_registry(), "drawbench"])


# --- user files --------------------------------------------------------------------------------------------


def _pick_column(columns: list[str], where: str) -> str:
    by_lower = {c.strip().lower(): c for c in columns if c is not None}
    for wanted in PROMPT_COLUMNS:
        if wanted in by_lower:
            return by_lower[wanted]
    raise ValueError(
        f"{where} has no prompt column: found {sorted(c for c in columns if c is not None)}, "
        f"expected one of {list(PROMPT_COLUMNS)} (any case)"
    )


def _user_file(path: Path) -> list[PromptRecord]:
    if not path.is_file():
        raise ValueError(f"prompt file {str(path)!r} does not exist; bundled sets: {available_prompt_sets()}")
    suffix = path.suffix.lower()
    if suffix not in USER_FILE_SUFFIXES:
        raise ValueError(
            f"unsupported prompt file type {suffix!r} ({path}); use one of {list(USER_FILE_SUFFIXES)}"
        )
    text = path.read_text(encoding="utf-8-sig")
    set_name = str(path)
    records: list[PromptRecord] = []
    if suffix == ".txt":
        for i, t in enumerate(_lines(text)):
            records.append(PromptRecord(text=t, id=str(i), set=set_name, metadata={"line": i + 1}))
    elif suffix in (".csv", ".tsv"):
        rows = list(
            csv.DictReader(text.splitlines(), delimiter="\t", quoting=csv.QUOTE_NONE)
            if suffix == ".tsv"
            else csv.DictReader(text.splitlines())
        )
        column = _pick_column(list(rows[0].keys()) if rows else [], str(path))
        for row in rows:
            value = (row.get(column) or "").strip()
            if not value:
                continue
            meta = {k: v for k, v in row.items() if k != column and k is not None}
            records.append(PromptRecord(text=value, id=str(len(records)), set=set_name, metadata=meta))
    else:  # .jsonl
        for n, line in enumerate(_lines(text), start=1):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {n}: not JSON ({e})") from e
            if not isinstance(obj, dict):
                raise ValueError(  # noqa: TRY004 - bad file content, a ValueError like the rest
                    f"{path}, line {n}: expected a JSON object with one of {list(PROMPT_COLUMNS)}"
                )
            key = _pick_column(list(obj.keys()), f"{path}, line {n}")
            value = str(obj[key]).strip()
            if value:
                meta = {k: v for k, v in obj.items() if k != key}
                records.append(PromptRecord(text=value, id=str(len(records)), set=set_name, metadata=meta))
    if not records:
        raise ValueError(f"prompt file {path} holds no prompts")
    return records


def _looks_like_path(name: str) -> bool:
    return (
        os.sep in name
        or "/" in name
        or Path(name).suffix.lower() in USER_FILE_SUFFIXES
        or Path(name).exists()
    )


# --- the loader --------------------------------------------------------------------------------------------


def load_prompts(
    name: str | os.PathLike[str],
    limit: int | None = None,
    seed: int | None = None,
    *,
    path: str | os.PathLike[str] | None = None,
) -> list[PromptRecord]:
    """Prompts of a bundled set or a user file.

    ``limit`` keeps ``limit`` prompts: the first ones, or with ``seed`` a seeded random subset (the same for
    the same seed, returned in file order). ``path`` is only for ``drawbench``. Unknown names, missing files
    and files without a usable column raise ``ValueError`` naming what is available.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be a non-negative int or None, got {limit!r}")
    key = os.fspath(name)
    normalized = key.strip().lower().replace("_", "-")
    registry = _registry()
    if path is not None and normalized != "drawbench":
        raise ValueError("path= is only used with 'drawbench'; pass a user file as the name instead")
    if normalized == "drawbench":
        records = _drawbench(path)
    elif normalized in registry:
        records = registry[normalized]()
    elif isinstance(name, os.PathLike) or _looks_like_path(key):
        records = _user_file(Path(key).expanduser())
    else:
        raise ValueError(
            f"unknown prompt set {key!r}; available: {available_prompt_sets()}, "
            f"or a path to a {'/'.join(USER_FILE_SUFFIXES)} file"
        )
    if limit is None or limit >= len(records):
        return records
    if seed is None:
        return records[:limit]
    keep = sorted(random.Random(seed).sample(range(len(records)), limit))
    return [records[i] for i in keep]
