"""Relation correction: the geometry of "A to the left of B" on a captioned layout (beyond the paper).

The fine stage regenerates from the coarse image's layout, so an object drawn on the wrong side stays there.
After SLD (Wu et al., "Self-correcting LLM-controlled diffusion", CVPR 2024), which asks an LLM to correct the
detected layout before regenerating, the captioner can correct the layout when the prompt states a spatial
relation that the captioned regions violate. Finding the relations in the prompt is the LLM's work
(``RuleBasedLLM.relations``, ``OpenAIChat.relations``); this module is the pure geometry:

* :func:`relation_holds`: does a relation hold between two boxes? (box centres, strictly ordered on the
  relation's axis; image y grows downwards, so "above" is the smaller y);
* :func:`correct_pair`: the two regions moved so that it holds: first their centres are swapped on that axis
  (each region keeps its size and its other coordinate); when that cannot order them (equal centres, or a
  region would leave the image), they are pushed to opposite sides of the image instead;
* :func:`correct_layout`: every relation in turn, with a record of what was done and why.

Regions move by translation only: a mask is shifted by whole mask pixels, its box by the same amount, and
both stay inside the image (no part of a mask is shifted out). Regions no relation names, and the two regions
of a relation that already holds, are left as they are (the same objects).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..layout import Layout, Region

#: The relations the correction knows, with the axis they order (0: x, 1: y) and whether the subject comes
#: first (has the smaller coordinate) on it. Image y grows downwards: "above" means a smaller y.
RELATION_AXES: dict[str, tuple[int, bool]] = {
    "left of": (0, True),
    "right of": (0, False),
    "above": (1, True),
    "below": (1, False),
}
RELATIONS: tuple[str, ...] = tuple(RELATION_AXES)

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class Relation:
    """``subject`` is ``relation`` ``object``: "red book" "left of" "yellow vase".

    ``subject`` and ``object`` are phrases of the layout; ``relation`` is one of :data:`RELATIONS`;
    ``words`` are the prompt's own words for it ("to the left of", "on top of"), when known.
    """

    subject: str
    relation: str
    object: str
    words: str | None = None

    def __post_init__(self) -> None:
        if self.relation not in RELATION_AXES:
            raise ValueError(f"unknown relation {self.relation!r}; use one of {list(RELATIONS)}.")

    def to_dict(self) -> dict[str, Any]:
        return {"subject": self.subject, "relation": self.relation, "object": self.object, "words": self.words}


# ------------------------------------------------------------------------------------------------ boxes
def mask_extent(mask: torch.Tensor) -> Box | None:
    """The box of a mask's non-zero cells in fractions of the image, or None for an empty mask."""
    rows = torch.nonzero(mask.amax(dim=1) > 0).flatten()
    cols = torch.nonzero(mask.amax(dim=0) > 0).flatten()
    if rows.numel() == 0:
        return None
    height, width = mask.shape
    return (cols[0].item() / width, rows[0].item() / height, (cols[-1].item() + 1) / width,
            (rows[-1].item() + 1) / height)


def region_box(region: Region) -> Box | None:
    """Where a region is: its box, else the extent of its mask (None for an empty mask)."""
    if region.box is not None:
        return tuple(region.box)
    return mask_extent(region.mask)


def box_centre(box: Box) -> tuple[float, float]:
    """(x, y) centre of a box."""
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


def relation_holds(subject_box: Box, relation: str, object_box: Box) -> bool:
    """Whether ``subject relation object`` holds: the centres are in that order on the relation's axis.

    Strict: equal centres satisfy no relation. Boxes are [x0, y0, x1, y1] in fractions, y downwards.
    """
    axis, subject_first = RELATION_AXES[relation]
    s, o = box_centre(subject_box)[axis], box_centre(object_box)[axis]
    return s < o if subject_first else s > o


# ---------------------------------------------------------------------------------------------- moving
def translate_mask(mask: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """The mask shifted by whole cells (``dx`` right, ``dy`` down); cells shifted in are 0, values are kept.

    The caller makes sure no non-zero cell leaves the grid (:func:`shift_range`).
    """
    height, width = mask.shape
    out = torch.zeros_like(mask)
    if abs(dx) >= width or abs(dy) >= height:
        return out
    src_y = slice(max(0, -dy), height - max(0, dy))
    src_x = slice(max(0, -dx), width - max(0, dx))
    dst_y = slice(max(0, dy), height - max(0, -dy))
    dst_x = slice(max(0, dx), width - max(0, -dx))
    out[dst_y, dst_x] = mask[src_y, src_x]
    return out


def _extent(region: Region) -> Box | None:
    """What must stay inside the image when a region moves: the union of its box and its mask's extent."""
    boxes = [b for b in (tuple(region.box) if region.box is not None else None,
                         mask_extent(region.mask) if region.mask is not None else None) if b is not None]
    if not boxes:
        return None
    return (min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes))


def _cells(region: Region, axis: int) -> int | None:
    """Mask cells along an axis (the unit a region moves in), None for a box-only region (moves freely)."""
    if region.mask is None:
        return None
    return int(region.mask.shape[1 - axis])


def shift_range(region: Region, axis: int) -> tuple[float, float]:
    """The smallest and largest shift (fractions of the image) along ``axis`` that keep the region inside.

    For a region with a mask both ends are whole mask cells, so any shift it is moved by can be one too.
    """
    extent = _extent(region)
    if extent is None:
        return 0.0, 0.0
    lo, hi = extent[axis], extent[axis + 2]
    cells = _cells(region, axis)
    if cells is None:
        return -lo, 1.0 - hi
    eps = 1e-9  # a box edge computed as k / n may sit a rounding error off its cell boundary
    return math.ceil(-lo * cells - eps) / cells, math.floor((1.0 - hi) * cells + eps) / cells


def snap_shift(region: Region, axis: int, shift: float) -> float:
    """``shift`` clamped into :func:`shift_range` and, for a region with a mask, rounded to whole mask cells."""
    low, high = shift_range(region, axis)
    cells = _cells(region, axis)
    if cells is not None:
        shift = round(shift * cells) / cells
    return min(max(shift, low), high)


def move_region(region: Region, axis: int, shift: float, note: dict[str, Any] | None = None) -> Region:
    """A copy of the region translated by ``shift`` (fractions of the image) along ``axis``.

    The shift must come from :func:`snap_shift`: the mask moves by ``shift * cells`` whole cells and the box by
    the same fraction. ``note``, when given, is added to the copy's ``source`` under ``"relation_correction"``.
    A zero shift returns the region itself.
    """
    if shift == 0:
        return region
    mask = region.mask
    if mask is not None:
        step = round(shift * _cells(region, axis))
        mask = translate_mask(mask, step if axis == 0 else 0, step if axis == 1 else 0)
    box = None
    if region.box is not None:
        values = list(region.box)
        values[axis] = min(max(values[axis] + shift, 0.0), 1.0)
        values[axis + 2] = min(max(values[axis + 2] + shift, 0.0), 1.0)
        box = tuple(values)
    source = dict(region.source) if region.source is not None else None
    if note is not None:
        source = (source or {}) | {"relation_correction": note}
    return Region(region.phrase, mask=mask, score=region.score, box=box, tag=region.tag, source=source,
                  token_indices=region.token_indices)


def correct_pair(subject: Region, relation: str, obj: Region) -> tuple[Region, Region, str | None, str | None]:
    """``(subject, object, action, reason)``: the two regions moved so that ``subject relation object`` holds.

    ``action`` is ``None`` when the relation already holds (the regions are returned as they are),
    ``"swapped"`` when exchanging their centres on the relation's axis orders them, ``"moved apart"`` when
    they had to be pushed to opposite sides of the image (equal centres, or a swapped region would leave the
    image), and ``"not corrected"`` with a ``reason`` when no translation inside the image orders them (both
    span the whole axis); the regions are then returned unmoved.
    """
    before_s, before_o = region_box(subject), region_box(obj)
    if before_s is None or before_o is None:
        return subject, obj, "not corrected", "a region is empty"
    if relation_holds(before_s, relation, before_o):
        return subject, obj, None, None
    axis, subject_first = RELATION_AXES[relation]
    first, second = (subject, obj) if subject_first else (obj, subject)
    c_first = box_centre(region_box(first))[axis]
    c_second = box_centre(region_box(second))[axis]

    def attempt(shift_first: float, shift_second: float, action: str) -> tuple[Region, Region] | None:
        note = {"relation": relation, "subject": subject.phrase, "object": obj.phrase, "action": action}
        moved_first = move_region(first, axis, snap_shift(first, axis, shift_first), note)
        moved_second = move_region(second, axis, snap_shift(second, axis, shift_second), note)
        new_s, new_o = (moved_first, moved_second) if subject_first else (moved_second, moved_first)
        return (new_s, new_o) if relation_holds(region_box(new_s), relation, region_box(new_o)) else None

    swapped = attempt(c_second - c_first, c_first - c_second, "swapped")
    if swapped is not None:
        return (*swapped, "swapped", None)
    # Push the region that should come first to the low edge and the other to the high edge.
    apart = attempt(shift_range(first, axis)[0], shift_range(second, axis)[1], "moved apart")
    if apart is not None:
        return (*apart, "moved apart", None)
    name = "width" if axis == 0 else "height"
    return subject, obj, "not corrected", f"no move inside the image puts them in order (they span the {name})"


def _box_list(box: Box | None) -> list[float] | None:
    return None if box is None else [round(float(v), 6) for v in box]


def find_region(regions: list[Region], phrase: str) -> int | str:
    """The index of the one region whose phrase is ``phrase`` (case-insensitive), or why there is none."""
    key = " ".join(phrase.lower().split())
    found = [i for i, r in enumerate(regions) if " ".join(r.phrase.lower().split()) == key]
    if len(found) == 1:
        return found[0]
    return f"{phrase!r} names {'no region' if not found else f'{len(found)} regions'} of the layout"


def correct_layout(layout: Layout, relations: list[Relation]) -> tuple[Layout, list[dict[str, Any]]]:
    """The layout with every relation made to hold, in order, and one record per relation.

    A record is the relation (``subject``, ``relation``, ``object``, ``words``) with ``status``:
    ``"satisfied"`` (held already, nothing moved), ``"corrected"`` (with ``action``, and ``old_boxes`` and
    ``new_boxes`` by phrase) or ``"not corrected"`` (with ``reason``: a phrase names no region or several, or no
    move orders them); and ``holds_after``, checked on the final layout (a later correction may undo an earlier
    one when relations conflict; None when the relation names no pair of regions). The returned layout keeps
    ``layout.source`` and every region that was not moved, as the same object.
    """
    regions = list(layout.regions)
    records: list[dict[str, Any]] = []
    pairs: list[tuple[int, int] | None] = []
    for relation in relations:
        record: dict[str, Any] = relation.to_dict()
        records.append(record)
        i, j = find_region(regions, relation.subject), find_region(regions, relation.object)
        problem = next((found for found in (i, j) if isinstance(found, str)), None)
        if problem is None and i == j:
            problem = "subject and object are the same region"
        pairs.append(None if problem else (i, j))
        if problem:
            record |= {"status": "not corrected", "reason": problem}
            continue
        old = {regions[i].phrase: _box_list(region_box(regions[i])), regions[j].phrase: _box_list(region_box(regions[j]))}
        new_s, new_o, action, reason = correct_pair(regions[i], relation.relation, regions[j])
        if action is None:
            record["status"] = "satisfied"
        elif action == "not corrected":
            record |= {"status": "not corrected", "reason": reason}
        else:
            regions[i], regions[j] = new_s, new_o
            new = {new_s.phrase: _box_list(region_box(new_s)), new_o.phrase: _box_list(region_box(new_o))}
            record |= {"status": "corrected", "action": action, "old_boxes": old, "new_boxes": new}
    for relation, record, pair in zip(relations, records, pairs):
        boxes = (region_box(regions[pair[0]]), region_box(regions[pair[1]])) if pair else (None, None)
        record["holds_after"] = None if None in boxes else relation_holds(boxes[0], relation.relation, boxes[1])
    return Layout(regions, source=layout.source), records
