"""Reading a result folder's manifests: one reader, one rule for a line cut short by a kill.

The generation step appends one JSON line per image to ``manifest.rank<k>.jsonl`` after the image is in place;
``run`` writes ``manifest.seeds.jsonl`` into a configuration's folder. :func:`read_manifest` reads every
``manifest*.jsonl`` of a folder, for the generation step (what is done when resuming), the scoring and the
report alike.

The rule for a line cut short (a run killed while appending it): a line that is not a JSON object -- truncated
JSON, undecodable bytes -- is *cut*. Its image counts as not generated: resuming the generation makes it again
(and drops the cut line from its own manifest, :func:`drop_cut_lines`), and scoring ignores it with a warning.
A line is written in one call ending in its newline, so a truncated line is never valid JSON: a last line that
parses but lacks its newline is whole and is kept. A line that is a JSON object without ``index``, ``prompt``
and ``file`` was not cut but written wrong, and is an error. An image listed twice keeps its last line (it was
generated again, e.g. after its file was deleted).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

__all__ = ["MANIFEST_GLOB", "REQUIRED_FIELDS", "drop_cut_lines", "read_manifest", "read_manifest_file"]

#: The manifests of a folder: ``manifest.rank<k>.jsonl`` of a generation folder, ``manifest.seeds.jsonl`` of a
#: run's configuration folder.
MANIFEST_GLOB = "manifest*.jsonl"
#: The fields every manifest line has.
REQUIRED_FIELDS = ("index", "prompt", "file")


def _parse(line: bytes) -> Any:
    """The JSON value of one line, or None for a cut line."""
    try:
        value = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None


def read_manifest_file(path: str | os.PathLike) -> tuple[list[dict[str, Any]], list[int]]:
    """``(rows, cut)``: the whole lines of one manifest in file order, and the 1-based numbers of its cut lines.

    Raises ``ValueError`` for a whole line without ``index``, ``prompt`` and ``file``.
    """
    path = Path(path)
    rows: list[dict[str, Any]] = []
    cut: list[int] = []
    for number, line in enumerate(path.read_bytes().split(b"\n"), 1):
        if not line.strip():
            continue
        row = _parse(line)
        if row is None:
            cut.append(number)
            continue
        missing = [key for key in REQUIRED_FIELDS if key not in row]
        if missing:
            raise ValueError(f"{path}:{number}: a manifest line needs 'index', 'prompt' and 'file' (missing {missing})")
        rows.append(row)
    return rows, cut


def _sort_key(row: dict[str, Any]) -> tuple[int, int, str]:
    return int(row["index"]), int(row.get("image") or 0), str(row["file"])


def read_manifest(folder: str | os.PathLike, warn: bool = True) -> list[dict[str, Any]]:
    """Every image's manifest line of a folder, from all ``manifest*.jsonl``, sorted by ``(index, image, file)``.

    Cut lines are left out, with one warning per manifest that has any (`warn=False`: silently, for a caller
    that regenerates them). An image (``file``) listed twice keeps its last line. ``FileNotFoundError`` when the
    folder has no manifest.
    """
    folder = Path(folder)
    files = sorted(folder.glob(MANIFEST_GLOB))
    if not files:
        raise FileNotFoundError(
            f"{folder} has no {MANIFEST_GLOB}: not a result folder written by the generation step "
            "(or nothing generated yet)."
        )
    rows: dict[str, dict[str, Any]] = {}
    for path in files:
        whole, cut = read_manifest_file(path)
        if cut and warn:
            warnings.warn(
                f"{path}: ignoring {len(cut)} manifest line(s) cut short by a killed run (line(s) "
                f"{', '.join(map(str, cut[:5]))}{', ...' if len(cut) > 5 else ''}); resuming the generation "
                "in this folder makes their images again.",
                stacklevel=2,
            )
        for row in whole:
            rows[str(row["file"])] = row
    return sorted(rows.values(), key=_sort_key)


def drop_cut_lines(path: str | os.PathLike) -> int:
    """Rewrite one manifest without its cut lines, every line ending in a newline; the number of lines dropped.

    For the process that owns the manifest, before it appends again: the next line then starts on a line of
    its own, and later readers see no cut line for an image that has been made again. The file is replaced
    atomically; a manifest that is already clean is not touched.
    """
    path = Path(path)
    if not path.is_file():
        return 0
    data = path.read_bytes()
    lines = data.split(b"\n")
    kept = [line for line in lines if line.strip() and _parse(line) is not None]
    dropped = sum(1 for line in lines if line.strip()) - len(kept)
    clean = b"".join(line + b"\n" for line in kept)
    if clean != data:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with tmp.open("wb") as handle:
                handle.write(clean)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
    return dropped
