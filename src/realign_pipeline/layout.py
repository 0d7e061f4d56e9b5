"""The layout: which words of the prompt belong where in the image, and how sure we are.

A :class:`Layout` is a list of :class:`Region` s. Each region names a phrase of the prompt, where it should be
(a mask of any size, or a box), and its likelihood score ``s`` (Eq. 6 of the paper: 2 certain, 0.5 may, 0
unlikely). Layouts are written by hand, by the dense captioner, or by any other tool, and stored as versioned
JSON (:meth:`Layout.to_json` / :meth:`Layout.from_json`).

:func:`resolve_layout` binds a layout to a prompt: it finds each phrase's token indices (the token map ``R`` of
Eq. 8), appends phrases the prompt lacks (or raises in strict mode), and drops empty regions with a warning.
The resulting :class:`ResolvedLayout` gives the masks at any attention resolution and the per-region scores.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from .tokens import phrase_occurrences, prompt_token_ids

LAYOUT_FORMAT = "realign-layout"
LAYOUT_VERSION = 1

#: Eq. 6 of the paper: the LLM's likelihood that an object is in the image.
SCORE_CERTAIN = 2.0
SCORE_MAY = 0.5
SCORE_UNLIKELY = 0.0


class LayoutError(ValueError):
    """A layout that cannot be used, with a message naming the region and what to do."""


def _as_mask_tensor(mask: Any, phrase: str) -> tuple[torch.Tensor, bool]:
    """Mask as a float32 CPU tensor of rank 2 with values in [0, 1]; also whether it was binary."""
    if isinstance(mask, torch.Tensor):
        tensor = mask.detach().cpu()
    else:
        try:
            tensor = torch.as_tensor(np.asarray(mask))
        except (TypeError, ValueError) as error:
            raise LayoutError(f"region {phrase!r}: the mask is not an array of numbers ({error}).") from None
    if tensor.ndim != 2:
        raise LayoutError(
            f"region {phrase!r}: a mask must be 2-D (height, width), got shape {tuple(tensor.shape)}. "
            "Pass one mask per region, e.g. mask[0] for a (1, H, W) array."
        )
    if tensor.shape[0] == 0 or tensor.shape[1] == 0:
        raise LayoutError(f"region {phrase!r}: the mask has an empty shape {tuple(tensor.shape)}.")
    is_binary = tensor.dtype == torch.bool
    if tensor.dtype.is_complex:
        raise LayoutError(f"region {phrase!r}: a mask must be real-valued, got {tensor.dtype}.")
    tensor = tensor.to(torch.float32)
    if not torch.isfinite(tensor).all():
        raise LayoutError(f"region {phrase!r}: the mask contains NaN or infinite values.")
    if tensor.min() < 0 or tensor.max() > 1:
        raise LayoutError(
            f"region {phrase!r}: mask values must lie in [0, 1], got [{tensor.min():.3g}, {tensor.max():.3g}]. "
            "Pass a boolean mask or probabilities, not logits or 0-255 values."
        )
    if not is_binary:
        is_binary = bool(((tensor == 0) | (tensor == 1)).all())
    return tensor.contiguous(), is_binary


def _validate_box(box: Any, phrase: str) -> tuple[float, float, float, float]:
    try:
        values = tuple(float(v) for v in box)
    except (TypeError, ValueError):
        raise LayoutError(f"region {phrase!r}: a box is four numbers [x0, y0, x1, y1], got {box!r}.") from None
    if len(values) != 4 or not all(math.isfinite(v) for v in values):
        raise LayoutError(f"region {phrase!r}: a box is four finite numbers [x0, y0, x1, y1], got {box!r}.")
    x0, y0, x1, y1 = values
    if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
        raise LayoutError(
            f"region {phrase!r}: a box is [x0, y0, x1, y1] in fractions of the image, with 0 <= x0 < x1 <= 1 and "
            f"0 <= y0 < y1 <= 1; got {box!r}. Divide pixel coordinates by the image width and height."
        )
    return values


def _box_coverage(box: tuple[float, float, float, float], height: int, width: int) -> torch.Tensor:
    """Fraction of each cell of a (height, width) grid covered by a box given in image fractions."""

    def axis(lo: float, hi: float, n: int) -> torch.Tensor:
        edges = torch.arange(n + 1, dtype=torch.float64) / n
        return ((torch.clamp(edges[1:], max=hi) - torch.clamp(edges[:-1], min=lo)).clamp(min=0) * n).float()

    x0, y0, x1, y1 = box
    return axis(y0, y1, height)[:, None] * axis(x0, x1, width)[None, :]


def _coverage_weights(size_in: int, size_out: int) -> torch.Tensor:
    """(size_out, size_in) weights: the fraction of each output cell that each input cell covers.

    Both axes span [0, 1]; in units of ``1 / (size_in * size_out)`` every cell edge is an integer, so the
    overlaps are exact. Rows sum to 1: an output cell is the area average of the input cells under it.
    """
    out_lo = torch.arange(size_out, dtype=torch.int64)[:, None] * size_in
    in_lo = torch.arange(size_in, dtype=torch.int64)[None, :] * size_out
    overlap = (torch.minimum(out_lo + size_in, in_lo + size_out) - torch.maximum(out_lo, in_lo)).clamp(min=0)
    return overlap.to(torch.float64) / size_in


def resize_mask(mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Resize a (H, W) mask in [0, 1] to (height, width) by exact area coverage.

    Each output cell is the area-weighted mean of the input cells it overlaps, at any ratio, square or not.
    Downsampling is an area average, so the mask's mean (its area) is kept exactly and an object smaller than
    one attention cell keeps a small positive weight instead of vanishing, as it would under nearest at 8x8.
    Upsampling by an integer factor repeats each value (nearest); at other ratios only the cells straddling an
    input edge mix the two values they straddle. No value is invented beyond what the input covers.
    """
    if tuple(mask.shape) == (height, width):
        return mask
    rows = _coverage_weights(mask.shape[0], height)
    cols = _coverage_weights(mask.shape[1], width)
    resized = rows @ mask.to(torch.float64) @ cols.T
    return resized.to(torch.float32).clamp_(0, 1)


@dataclass
class Region:
    """One object of a layout.

    Args:
        phrase: words of the prompt that describe the object (the paper's local phrase, e.g. "red book").
        mask: where the object is: a 2-D bool or float array in [0, 1] of any size (resized per attention
            resolution, so non-square images work). Optional if `box` is given.
        score: likelihood score ``s`` of Eq. 6 (2 certain, 0.5 may, 0 unlikely); any non-negative float.
            ``s = 0`` means this region does not modulate attention at all.
        box: ``[x0, y0, x1, y1]`` in fractions of the image; used as the mask when `mask` is None.
        tag: the tagger's name for the object, if a tagger produced the region.
        source: free-form provenance (which tool produced the region, whether a fallback was used, the raw
            answer of an LLM); stored in the JSON as is.
        token_indices: explicit indices into the encoded prompt (position 0 is the start token). Use them when a
            phrase repeats ("a red cube and a red ball") or when calling the pipeline with `prompt_embeds`.
    """

    phrase: str
    mask: Any = None
    score: float = SCORE_CERTAIN
    box: Sequence[float] | None = None
    tag: str | None = None
    source: dict[str, Any] | None = None
    token_indices: Sequence[int] | None = None
    _binary: bool = field(default=False, init=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.phrase, str) or (not self.phrase.strip() and self.token_indices is None):
            raise LayoutError(f"a region needs a non-empty phrase (or explicit token_indices), got {self.phrase!r}.")
        try:
            score = float(self.score)
        except (TypeError, ValueError):
            raise LayoutError(f"region {self.phrase!r}: the score must be a number, got {self.score!r}.") from None
        if not math.isfinite(score) or score < 0:
            raise LayoutError(
                f"region {self.phrase!r}: the score must be a finite non-negative number (Eq. 6 uses 2, 0.5, 0), "
                f"got {self.score!r}."
            )
        self.score = score
        if self.box is not None:
            self.box = _validate_box(self.box, self.phrase)
        if self.mask is None and self.box is None:
            raise LayoutError(f"region {self.phrase!r}: give a mask or a box.")
        if self.mask is not None:
            self.mask, self._binary = _as_mask_tensor(self.mask, self.phrase)
        if self.token_indices is not None:
            try:
                indices = [int(i) for i in self.token_indices]
            except (TypeError, ValueError):
                raise LayoutError(
                    f"region {self.phrase!r}: token_indices must be integers, got {self.token_indices!r}."
                ) from None
            if not indices:
                raise LayoutError(f"region {self.phrase!r}: token_indices is empty; omit it to match the phrase.")
            self.token_indices = indices

    @property
    def is_empty(self) -> bool:
        """True when the mask (or box) covers nothing."""
        if self.mask is not None:
            return bool(self.mask.max() <= 0)
        return False

    @property
    def area(self) -> float:
        """Fraction of the image the region covers (the ``B`` of Eq. 8's ``(1 - B)`` size term)."""
        if self.mask is not None:
            return float(self.mask.mean())
        x0, y0, x1, y1 = self.box
        return (x1 - x0) * (y1 - y0)

    def mask_at(self, height: int, width: int) -> torch.Tensor:
        """The region's mask on a (height, width) grid, as coverage fractions in [0, 1] (float32, CPU)."""
        if self.mask is not None:
            return resize_mask(self.mask, height, width)
        return _box_coverage(self.box, height, width)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"phrase": self.phrase, "score": self.score}
        if self.mask is not None:
            data["mask"] = _encode_mask(self.mask, self._binary)
        for key in ("box", "tag", "source", "token_indices"):
            value = getattr(self, key)
            if value is not None:
                data[key] = list(value) if key in ("box", "token_indices") else value
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Region:
        if not isinstance(data, dict):
            raise LayoutError(f"a region must be a JSON object, got {type(data).__name__}.")
        unknown = set(data) - {"phrase", "mask", "score", "box", "tag", "source", "token_indices"}
        if unknown:
            raise LayoutError(f"region {data.get('phrase')!r}: unknown field(s) {sorted(unknown)}.")
        if "phrase" not in data:
            raise LayoutError(f"a region needs a 'phrase' field, got fields {sorted(data)}.")
        fields = dict(data)
        if "mask" in fields and fields["mask"] is not None:
            fields["mask"] = _decode_mask(fields["mask"], str(data["phrase"]))
        return cls(**fields)


def _encode_mask(mask: torch.Tensor, binary: bool) -> Any:
    """Binary masks as run lengths (row-major, starting with a run of zeros); soft masks as nested lists."""
    if binary:
        flat = (mask.flatten() > 0.5).to(torch.int8)
        change = torch.nonzero(flat[1:] != flat[:-1]).flatten() + 1
        bounds = [0, *change.tolist(), flat.numel()]
        counts = [b - a for a, b in itertools.pairwise(bounds)]
        if flat[0] == 1:
            counts = [0, *counts]
        return {"size": list(mask.shape), "counts": counts}
    return [[round(float(v), 4) for v in row] for row in mask.tolist()]


def _decode_mask(data: Any, phrase: str) -> Any:
    if isinstance(data, dict):
        try:
            height, width = (int(v) for v in data["size"])
            counts = [int(c) for c in data["counts"]]
        except (KeyError, TypeError, ValueError):
            raise LayoutError(
                f"region {phrase!r}: a run-length mask is {{'size': [h, w], 'counts': [...]}}, got keys {sorted(data)}."
            ) from None
        if sum(counts) != height * width or any(c < 0 for c in counts):
            raise LayoutError(
                f"region {phrase!r}: run-length counts add up to {sum(counts)}, not {height} x {width} = "
                f"{height * width}."
            )
        values = np.repeat(np.arange(len(counts)) % 2, counts).astype(bool)
        return values.reshape(height, width)
    return data


class Layout:
    """A list of :class:`Region` s for one image; versioned JSON in and out.

    Example:
        >>> layout = Layout([Region("red book", box=[0.05, 0.3, 0.45, 0.9]),
        ...                  Region("yellow vase", box=[0.55, 0.2, 0.95, 0.9])])
        >>> Layout.from_json(layout.to_json()).regions[0].phrase
        'red book'
    """

    def __init__(self, regions: Iterable[Region | dict[str, Any]] = (), source: dict[str, Any] | None = None):
        self.source = source  # provenance of the whole layout (e.g. the captioner's tags and dropped objects)
        self.regions: list[Region] = []
        for index, region in enumerate(regions):
            try:
                self.regions.append(region if isinstance(region, Region) else Region.from_dict(region))
            except LayoutError as error:
                message = str(error)
                if message.startswith("region "):  # "region 'cat': ..." -> "region 1 ('cat'): ..."
                    phrase, _, rest = message[len("region ") :].partition(": ")
                    raise LayoutError(f"region {index} ({phrase}): {rest}") from None
                raise LayoutError(f"region {index}: {message}") from None

    def __len__(self) -> int:
        return len(self.regions)

    def __iter__(self) -> Iterator[Region]:
        return iter(self.regions)

    def __getitem__(self, index: int) -> Region:
        return self.regions[index]

    def __repr__(self) -> str:
        inner = ", ".join(f"{r.phrase!r} (s={r.score:g})" for r in self.regions)
        return f"Layout([{inner}])"

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "format": LAYOUT_FORMAT,
            "version": LAYOUT_VERSION,
            "regions": [region.to_dict() for region in self.regions],
        }
        if self.source is not None:
            data["source"] = self.source
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Layout:
        if not isinstance(data, dict) or "regions" not in data:
            raise LayoutError(
                "a layout is a JSON object {'format': 'realign-layout', 'version': 1, 'regions': [...]}; "
                f"got {type(data).__name__} without 'regions'."
            )
        version = data.get("version", LAYOUT_VERSION)
        if data.get("format", LAYOUT_FORMAT) != LAYOUT_FORMAT or version != LAYOUT_VERSION:
            raise LayoutError(
                f"unsupported layout format {data.get('format')!r} version {version!r}; this version of "
                f"realign-pipeline reads {LAYOUT_FORMAT!r} version {LAYOUT_VERSION}."
            )
        if not isinstance(data["regions"], list):
            raise LayoutError(f"'regions' must be a list, got {type(data['regions']).__name__}.")
        return cls(data["regions"], source=data.get("source"))

    def to_json(self, path: str | os.PathLike | None = None, indent: int | None = 2) -> str:
        """The layout as JSON text; also written to `path` if given."""
        text = json.dumps(self.to_dict(), indent=indent)
        if path is not None:
            with open(path, "w", encoding="utf-8") as handle:
                handle.write(text + "\n")
        return text

    @classmethod
    def from_json(cls, text_or_path: str | os.PathLike) -> Layout:
        """Read a layout from JSON text or from a file path."""
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            try:
                with open(text_or_path, encoding="utf-8") as handle:
                    text = handle.read()
            except OSError as error:
                raise LayoutError(f"cannot read layout file {str(text_or_path)!r}: {error}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise LayoutError(f"the layout is not valid JSON: {error}") from None
        return cls.from_dict(data)


@dataclass
class ResolvedLayout:
    """A layout bound to one prompt: the active regions and the token indices of each (``R`` of Eq. 8).

    `prompt` is the text actually encoded (phrases missing from the prompt are appended to it), or None when
    the caller passed `prompt_embeds`.
    """

    prompt: str | None
    regions: list[Region]
    token_indices: list[list[int]]
    appended_phrases: list[str] = field(default_factory=list)
    source: dict[str, Any] | None = None

    def __len__(self) -> int:
        return len(self.regions)

    def token_map(self, sequence_length: int) -> torch.Tensor:
        """``R``: (num_regions, sequence_length) indicator of each region's phrase tokens."""
        token_map = torch.zeros(len(self.regions), sequence_length)
        for row, indices in enumerate(self.token_indices):
            token_map[row, indices] = 1.0
        return token_map

    def scores(self) -> torch.Tensor:
        """``s`` of Eq. 6, one per region."""
        return torch.tensor([region.score for region in self.regions], dtype=torch.float32)

    def areas(self) -> torch.Tensor:
        """Fraction of the image each region covers (``B`` of Eq. 8's size term)."""
        return torch.tensor([region.area for region in self.regions], dtype=torch.float32)

    def masks_at(self, height: int, width: int) -> torch.Tensor:
        """(num_regions, height * width) coverage of each region on an attention grid."""
        if not self.regions:
            return torch.zeros(0, height * width)
        return torch.stack([region.mask_at(height, width).flatten() for region in self.regions])


def resolve_layout(
    layout: Layout,
    prompt: str | None,
    tokenizer: PreTrainedTokenizerBase,
    strict: bool = False,
    max_length: int | None = None,
) -> ResolvedLayout:
    """Find each region's token indices in `prompt` (``R`` of Eq. 8).

    A phrase that is not in the prompt is appended to it (", phrase"), as diffusers' LLM-grounded pipeline does,
    unless `strict` is set, which raises. A phrase that occurs several times takes the first occurrence that no
    earlier region took. Regions with empty masks are dropped with a warning. Token indices the text encoder
    would truncate away raise a :class:`LayoutError` naming the region.
    """
    max_length = max_length or tokenizer.model_max_length
    regions: list[Region] = []
    token_indices: list[list[int]] = []
    appended: list[str] = []
    taken: set[tuple[int, ...]] = set()
    for index, region in enumerate(layout):
        name = f"region {index} ({region.phrase!r})"
        if region.is_empty:
            warnings.warn(f"{name} has an empty mask and is skipped.", stacklevel=3)
            continue
        if region.token_indices is not None:
            indices = list(region.token_indices)
            bad = [i for i in indices if not 0 <= i < max_length]
            if bad:
                raise LayoutError(
                    f"{name}: token indices {bad} are out of range; the text encoder reads positions 0..{max_length - 1}."
                )
        else:
            if prompt is None:
                raise LayoutError(
                    f"{name}: without a prompt (prompt_embeds were given) phrases cannot be found; "
                    "give the region explicit token_indices."
                )
            occurrences = phrase_occurrences(tokenizer, prompt, region.phrase)
            free = [occ for occ in occurrences if tuple(occ) not in taken]
            if not occurrences:
                if strict:
                    raise LayoutError(
                        f"{name}: the phrase is not in the prompt {prompt!r}. Use words of the prompt, give "
                        "token_indices, or call with strict_layout=False to append the phrase to the prompt."
                    )
                prompt = f"{prompt}, {region.phrase}"
                appended.append(region.phrase)
                occurrences = phrase_occurrences(tokenizer, prompt, region.phrase)
                free = [occ for occ in occurrences if tuple(occ) not in taken] or occurrences[-1:]
            elif len(free) > 1 and len(occurrences) > 1:
                warnings.warn(
                    f"{name}: the phrase occurs {len(occurrences)} times in the prompt; using the first free one "
                    f"(tokens {free[0]}). Give token_indices to choose another.",
                    stacklevel=3,
                )
            indices = (free or occurrences)[0]
            taken.add(tuple(indices))
            last_read = max_length - 2  # the end token takes the last slot
            if max(indices) > last_read:
                length = len(prompt_token_ids(tokenizer, prompt))
                raise LayoutError(
                    f"{name}: the phrase lies at tokens {indices[0]}..{indices[-1]} but the prompt has {length} "
                    f"tokens and the text encoder reads only {max_length}; shorten the prompt or the phrase."
                )
        regions.append(region)
        token_indices.append(indices)
    if appended:
        warnings.warn(
            f"phrases {appended} are not in the prompt and were appended to it (strict_layout=True raises instead).",
            stacklevel=3,
        )
    return ResolvedLayout(
        prompt=prompt, regions=regions, token_indices=token_indices, appended_phrases=appended, source=layout.source
    )
