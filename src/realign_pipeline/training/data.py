"""Reward prompts and the image-caption pairs of ``L_pre`` for ``training/train_refl.py``, read resumably.

Rows are read in a seeded permutation per epoch; process ``r`` of ``W`` takes positions ``r, r + W, ...``.
A :class:`RowStream` knows its position (epoch, offset) and how many bad rows it skipped, so a checkpoint
can store it and a resumed run continues with the very next row. Bad rows (missing or unreadable image,
empty caption) are skipped and counted, never fatal.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["DataError", "RowStream", "load_pairs", "load_prompts", "open_image"]

logger = logging.getLogger(__name__)


class DataError(ValueError):
    """A dataset, file or column the arguments name does not exist (raised before any model is loaded)."""


def _read_metadata(folder: Path) -> list[dict[str, Any]]:
    jsonl, csvf = folder / "metadata.jsonl", folder / "metadata.csv"
    if jsonl.is_file():
        rows = []
        for n, line in enumerate(jsonl.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(f"{jsonl}:{n}: not JSON ({exc})") from exc
        return rows
    if csvf.is_file():
        with csvf.open(newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    raise DataError(
        f"--train_data_dir {folder}: no metadata.jsonl or metadata.csv (imagefolder layout) found"
    )


class _FolderPairs:
    """An imagefolder (``metadata.jsonl``/``metadata.csv`` with ``file_name``) read without ``datasets``."""

    def __init__(self, folder: Path, image_column: str, caption_column: str):
        self.folder = folder
        self.rows = _read_metadata(folder)
        if not self.rows:
            raise DataError(f"--train_data_dir {folder}: metadata has no rows")
        columns = set().union(*(r.keys() for r in self.rows))
        # HF imagefolder exposes the "file_name" column as "image".
        self.image_key = (
            image_column if image_column in columns else ("file_name" if image_column == "image" else None)
        )
        if self.image_key is None or self.image_key not in columns:
            raise DataError(
                f"--image_column {image_column!r} not in {folder}/metadata (columns: {sorted(columns)})"
            )
        if caption_column not in columns:
            raise DataError(
                f"--caption_column {caption_column!r} not in {folder}/metadata (columns: {sorted(columns)})"
            )
        self.caption_column = caption_column

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[Any, Any]:
        row = self.rows[i]
        name = row.get(self.image_key)
        image = None if not name else self.folder / str(name)
        return image, row.get(self.caption_column)


class _HubPairs:
    """A ``datasets`` dataset; the image column is read undecoded so a bad image is one skipped row."""

    def __init__(self, dataset: Any, image_column: str, caption_column: str):
        self.ds, self.image_column, self.caption_column = dataset, image_column, caption_column

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> tuple[Any, Any]:
        row = self.ds[int(i)]
        return row.get(self.image_column), row.get(self.caption_column)


def _load_hf_dataset(name: str, config: str | None, cache_dir: str | None, split: str):
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise DataError(
            "--dataset_name/--prompts_dataset need the `datasets` package: pip install 'realign-pipeline[train]'"
        ) from exc
    try:
        return datasets.load_dataset(name, config, cache_dir=cache_dir, split=split)
    except Exception as exc:
        raise DataError(f"dataset {name!r} (split {split!r}) could not be loaded: {exc}") from exc


def load_pairs(args: Any):
    """The image-caption pairs for ``L_pre`` from ``--train_data_dir`` or ``--dataset_name``; None if neither."""
    if args.train_data_dir:
        folder = Path(args.train_data_dir)
        if not folder.is_dir():
            raise DataError(f"--train_data_dir {folder} does not exist")
        return _FolderPairs(folder, args.image_column, args.caption_column)
    if args.dataset_name:
        ds = _load_hf_dataset(args.dataset_name, args.dataset_config_name, args.cache_dir, "train")
        for flag, col in (("--image_column", args.image_column), ("--caption_column", args.caption_column)):
            if col not in ds.column_names:
                raise DataError(
                    f"{flag} {col!r} not in dataset {args.dataset_name!r} (columns: {ds.column_names})"
                )
        try:
            import datasets

            if isinstance(ds.features.get(args.image_column), datasets.Image):
                ds = ds.cast_column(args.image_column, datasets.Image(decode=False))
        except Exception as exc:  # noqa: BLE001 - decoding stays on; a bad image then fails in __getitem__
            logger.warning(f"could not turn off image decoding ({exc}); bad images may raise")
        return _HubPairs(ds, args.image_column, args.caption_column)
    return None


def load_prompts(args: Any, pairs: Any) -> list[str]:
    """Reward prompts: ``--prompts_file`` (one per line, or JSONL with the caption column), ``--prompts_dataset``,
    or, with neither, the captions of the ``L_pre`` pairs. Empty prompts are dropped."""
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise DataError(f"--prompts_file {path} does not exist")
        lines = path.read_text(encoding="utf-8").splitlines()
        if path.suffix == ".jsonl":
            prompts = [json.loads(x).get(args.prompts_column, "") for x in lines if x.strip()]
        else:
            prompts = lines
    elif args.prompts_dataset:
        ds = _load_hf_dataset(args.prompts_dataset, None, args.cache_dir, "train")
        if args.prompts_column not in ds.column_names:
            raise DataError(
                f"--prompts_column {args.prompts_column!r} not in {args.prompts_dataset!r} (columns: {ds.column_names})"
            )
        prompts = ds[args.prompts_column]
    elif pairs is not None:
        prompts = (
            [pairs[i][1] for i in range(len(pairs))]
            if isinstance(pairs, _FolderPairs)
            else pairs.ds[args.caption_column]
        )
    else:
        raise DataError(
            "no reward prompts: give --prompts_file, --prompts_dataset, --train_data_dir or --dataset_name"
        )
    prompts = [p[0] if isinstance(p, (list, tuple)) and p else p for p in prompts]
    prompts = [p.strip() for p in prompts if isinstance(p, str) and p.strip()]
    if not prompts:
        raise DataError("the reward prompt source has no non-empty prompt")
    return prompts


class RowStream:
    """Endless, seeded, sharded, resumable batches of rows; ``load(row) -> item or None`` (None = bad row)."""

    def __init__(
        self,
        rows: Sequence,
        seed: int,
        rank: int = 0,
        world: int = 1,
        load: Callable[[Any], Any] | None = None,
    ):
        self.rows, self.seed, self.rank, self.world = rows, seed, rank, world
        self.load = load or (lambda r: r)
        self.epoch, self.offset, self.skipped = 0, 0, 0
        self._perm = None

    def _order(self) -> list[int]:
        if self._perm is None or self._perm[0] != self.epoch:
            g = torch.Generator().manual_seed(self.seed * 1000003 + self.epoch)
            perm = torch.randperm(len(self.rows), generator=g).tolist()
            self._perm = (self.epoch, perm[self.rank :: self.world] or perm)
        return self._perm[1]

    def next_batch(self, size: int) -> list:
        out, tried = [], 0
        while len(out) < size:
            order = self._order()
            if self.offset >= len(order):
                self.epoch, self.offset = self.epoch + 1, 0
                continue
            item = self.load(self.rows[order[self.offset]])
            self.offset += 1
            tried += 1
            if item is None:
                self.skipped += 1
                if tried > 10 * max(len(self.rows), 1) + size:
                    raise DataError("every row of the dataset is bad (missing image or empty caption)")
                continue
            out.append(item)
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset, "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.offset, self.skipped = (
            int(state["epoch"]),
            int(state["offset"]),
            int(state["skipped"]),
        )


def open_image(value: Any):
    """A PIL RGB image from a path, an undecoded ``datasets`` dict or a PIL image; None if missing/unreadable."""
    from PIL import Image

    try:
        if value is None:
            return None
        if isinstance(value, Image.Image):
            return value.convert("RGB")
        if isinstance(value, dict):
            if value.get("bytes"):
                import io

                return Image.open(io.BytesIO(value["bytes"])).convert("RGB")
            value = value.get("path")
            if not value:
                return None
        if not os.path.isfile(value):
            return None
        with Image.open(value) as im:
            return im.convert("RGB")
    except Exception:  # noqa: BLE001 - any unreadable image is a bad row
        return None
