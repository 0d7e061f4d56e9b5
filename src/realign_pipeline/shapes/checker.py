"""An alignment checker for the shapes world, measured apart from the captioner's perception.

Its code path shares nothing with :mod:`realign_pipeline.shapes.perception` but the world itself: colour is an
HSV hue bin (the background is a neutral grey, and mixing a colour with grey keeps its hue, so antialiased
edges keep their bin), objects are found by a stack flood fill per hue class, and a shape is the template,
rendered with :func:`~realign_pipeline.shapes.world.shape_mask` and stretched to the object's box, with the
highest soft IoU.
So a fault of the segmenter used by the fine stage does not also hide in the score that judges it.
"""

from __future__ import annotations

import colorsys
import functools
from collections.abc import Callable
from typing import Any

import numpy as np
import PIL.Image

from .world import COLORS, SHAPES, ShapeObject, reading_accuracy, shape_mask

__all__ = ["check_prompt", "checker_accuracy", "detect", "hue_bins"]


def hue_bins() -> list[tuple[str, float, float]]:
    """(colour, lowest hue, highest hue) in degrees: each palette hue owns the arc up to the midpoints."""
    hues = sorted((colorsys.rgb_to_hsv(*(v / 255 for v in rgb))[0] * 360, name) for name, rgb in COLORS.items())
    bins = []
    for i, (hue, name) in enumerate(hues):
        prev_hue = hues[i - 1][0] - (360 if i == 0 else 0)
        next_hue = hues[(i + 1) % len(hues)][0] + (360 if i == len(hues) - 1 else 0)
        bins.append((name, (prev_hue + hue) / 2, (hue + next_hue) / 2))
    return bins


_BINS = hue_bins()
_NAMES = [name for name, _, _ in _BINS]
# Chroma (max - min) of each palette colour: a pixel's chroma over its bin's chroma is its coverage.
_CHROMA = np.array([max(COLORS[n]) - min(COLORS[n]) for n in _NAMES], dtype=np.float64)
MIN_COVERAGE = 0.5
MIN_AREA = 0.02  # fraction of the image; objects cover at least ~7%
RIM = 2  # pixels around a region whose partial coverage still belongs to it (antialiasing, blur)


def _hue_and_chroma(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """HSV hue in degrees [0, 360) and chroma (max - min, 0..255) per pixel."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    mx, mn = rgb.max(axis=-1), rgb.min(axis=-1)
    chroma = mx - mn
    safe = np.where(chroma > 0, chroma, 1.0)
    hue = np.where(
        mx == r, ((g - b) / safe) % 6, np.where(mx == g, (b - r) / safe + 2, (r - g) / safe + 4)
    ) * 60.0
    return hue % 360.0, chroma


def _classes(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hue-bin index per pixel (-1 where the pixel is too grey to be an object) and its soft coverage."""
    hue, chroma = _hue_and_chroma(rgb)
    index = np.full(hue.shape, -1, dtype=np.int64)
    for i, (_, lo, hi) in enumerate(_BINS):
        inside = ((hue >= lo) & (hue < hi)) | ((hue + 360 >= lo) & (hue + 360 < hi)) | ((hue - 360 >= lo) & (hue - 360 < hi))
        index[inside] = i
    coverage = np.clip(chroma / _CHROMA[np.maximum(index, 0)], 0.0, 1.0)
    coverage[chroma < 8] = 0.0  # JPEG-like grey noise has no reliable hue
    return index, coverage


def _flood_fill(solid: np.ndarray, index: np.ndarray) -> list[list[tuple[int, int]]]:
    """4-connected regions of `solid` pixels with equal `index`, by an explicit stack."""
    h, w = solid.shape
    seen = np.zeros_like(solid)
    regions = []
    for y0, x0 in zip(*np.nonzero(solid)):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        stack, region, cls = [(int(y0), int(x0))], [], index[y0, x0]
        while stack:
            y, x = stack.pop()
            region.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and solid[ny, nx] and not seen[ny, nx] and index[ny, nx] == cls:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        regions.append(region)
    return regions


def _edges(profile: np.ndarray) -> tuple[float, float]:
    """Sub-pixel start and end of a profile: where it crosses one half (linear between pixel centres).

    Half height marks a drawn edge whether it is antialiased or blurred (blur spreads coverage both ways).
    """
    idx = np.flatnonzero(profile >= 0.5)
    if idx.size == 0:
        return 0.0, float(profile.size)
    first, last = int(idx[0]), int(idx[-1])
    start = first - 0.5 + (0.5 - profile[first - 1]) / max(profile[first] - profile[first - 1], 1e-6) if first else 0.0
    end = (
        last + 0.5 + (profile[last] - 0.5) / max(profile[last] - profile[last + 1], 1e-6)
        if last + 1 < profile.size
        else float(profile.size)
    )
    return float(start), float(end)


_TEMPLATE_RES = 128
_SUBPIXELS = 4


@functools.cache
def _unit_templates() -> dict[str, np.ndarray]:
    """Each shape filling the unit box, rasterised at :data:`_TEMPLATE_RES` (sampled by :func:`_fit_template`)."""
    return {
        shape: shape_mask(ShapeObject("red", shape, 0.5, 0.5, 1.0), size=_TEMPLATE_RES, supersample=1) >= 0.5
        for shape in SHAPES
    }




def _fit_template(unit: np.ndarray, box: tuple[float, float, float, float], side: int) -> np.ndarray:
    """Coverage of `unit` stretched to ``box = (x0, x1, y0, y1)`` (pixels) on a `side` x `side` grid.

    Width and height are fitted apart: the trained UNet draws shapes a little taller or wider than they are
    in the world, and a square template scored a 16 x 19 px square below a circle.
    """
    x0, x1, y0, y1 = box
    offsets = (np.arange(side * _SUBPIXELS) + 0.5) / _SUBPIXELS
    u = np.floor((offsets - x0) / max(x1 - x0, 1e-6) * _TEMPLATE_RES).astype(np.int64)
    v = np.floor((offsets - y0) / max(y1 - y0, 1e-6) * _TEMPLATE_RES).astype(np.int64)
    inside_u, inside_v = (u >= 0) & (u < _TEMPLATE_RES), (v >= 0) & (v < _TEMPLATE_RES)
    sampled = unit[np.clip(v, 0, _TEMPLATE_RES - 1)][:, np.clip(u, 0, _TEMPLATE_RES - 1)]
    sampled = sampled & inside_v[:, None] & inside_u[None, :]
    return sampled.reshape(side, _SUBPIXELS, side, _SUBPIXELS).mean(axis=(1, 3))


def _best_template(soft: np.ndarray) -> tuple[str, float]:
    """The shape whose template, stretched to the soft mask's box, has the highest soft IoU with it."""
    x0, x1 = _edges(soft.max(axis=0))
    y0, y1 = _edges(soft.max(axis=1))
    scores = {}
    for shape, unit in _unit_templates().items():
        template = _fit_template(unit, (x0, x1, y0, y1), soft.shape[0])
        scores[shape] = float(np.minimum(template, soft).sum() / max(np.maximum(template, soft).sum(), 1e-6))
    best = max(scores, key=scores.get)
    return best, scores[best]


def detect(image: PIL.Image.Image | np.ndarray) -> list[dict[str, Any]]:
    """The objects of `image`: ``{"color", "shape", "cx", "cy", "area", "iou"}`` (centre and area as fractions)."""
    raw = np.asarray(image.convert("RGB") if isinstance(image, PIL.Image.Image) else image)
    rgb = raw[..., :3].astype(np.float64)
    if np.issubdtype(raw.dtype, np.floating) and rgb.size and rgb.max() <= 1.0:
        rgb *= 255.0  # float images in [0, 1]
    h, w = rgb.shape[:2]
    index, coverage = _classes(rgb)
    solid = (index >= 0) & (coverage >= MIN_COVERAGE)
    # Padded once, wide enough for any region's crop, so a crop may run past the image border; padding has
    # class -1 (no object).
    pad = max(h, w) + 2 * RIM
    cls_pad, cov_pad, solid_pad = np.pad(index, pad, constant_values=-1), np.pad(coverage, pad), np.pad(solid, pad)
    detections = []
    for region in _flood_fill(solid, index):
        if len(region) < MIN_AREA * h * w:
            continue
        ys, xs = np.array(region).T
        cls = int(index[ys[0], xs[0]])
        # A square crop around the region, with its grey-mixed rim, keeps the template renders small.
        side = max(ys.max() - ys.min(), xs.max() - xs.min()) + 1 + 2 * RIM
        top = (ys.min() + ys.max()) // 2 - side // 2
        left = (xs.min() + xs.max()) // 2 - side // 2
        crop = (slice(top + pad, top + pad + side), slice(left + pad, left + pad + side))
        soft = np.where(cls_pad[crop] == cls, cov_pad[crop], 0.0)
        # Only this region and its rim: a second object of the same hue must not enter the template fit.
        own = np.zeros((side, side), dtype=bool)
        own[ys - top, xs - left] = True
        rim = own.copy()
        for dy in range(-RIM, RIM + 1):
            for dx in range(-RIM, RIM + 1):
                rim |= np.roll(np.roll(own, dy, axis=0), dx, axis=1)  # the crop has a RIM-pixel free border
        # The rim is for partly covered pixels; a solid pixel outside the region is a separate fragment.
        soft[~rim | (~own & solid_pad[crop])] = 0.0
        shape, iou = _best_template(soft)
        detections.append(
            {
                "color": _NAMES[cls],
                "shape": shape,
                "cx": float((xs.mean() + 0.5) / w),
                "cy": float((ys.mean() + 0.5) / h),
                "area": len(region) / (h * w),
                "iou": iou,
            }
        )
    detections.sort(key=lambda d: -d["area"])
    return detections


def match_objects(objects: list[dict[str, Any]], detected: list[dict[str, Any]]) -> list[dict[str, Any] | None]:
    """One detection per prompted object, none used twice: exact (colour, shape) first, then same shape."""
    used: set[int] = set()
    matched: list[dict[str, Any] | None] = [None] * len(objects)
    for exact in (True, False):
        for i, obj in enumerate(objects):
            if matched[i] is not None:
                continue
            for j, d in enumerate(detected):
                if j in used or d["shape"] != obj["shape"] or (exact and d["color"] != obj["color"]):
                    continue
                matched[i] = d
                used.add(j)
                break
    return matched


def check_prompt(image: PIL.Image.Image | np.ndarray, objects: list[dict[str, Any]]) -> dict[str, Any]:
    """Does `image` show the prompted `objects` (``[{"color", "shape", "side"}]``)?

    presence: every prompted shape found (any colour); binding: every (colour, shape) pair found, and
    binding_fraction the share of pairs found; position (None when no side is named): the object named
    "left" has its matched detection left of the one named "right" (matches prefer the right colour, then
    any colour of the shape; an unmatched object fails).
    """
    detected = detect(image)
    shapes = {d["shape"] for d in detected}
    pairs = {(d["color"], d["shape"]) for d in detected}
    found_pairs = [(o["color"], o["shape"]) in pairs for o in objects]
    presence = all(o["shape"] in shapes for o in objects)
    position = None
    sides = [o.get("side") for o in objects]
    if "left" in sides and "right" in sides:
        matched = match_objects(objects, detected)
        left, right = matched[sides.index("left")], matched[sides.index("right")]
        position = float(left is not None and right is not None and left["cx"] < right["cx"])
    return {
        "presence": float(presence),
        "binding": float(all(found_pairs)),
        "binding_fraction": sum(found_pairs) / len(objects) if objects else 1.0,
        "position": position,
        "detected": detected,
    }


def checker_accuracy(
    num_scenes: int = 200,
    size: int = 32,
    seed: int = 0,
    transform: Callable[[PIL.Image.Image], PIL.Image.Image] | None = None,
    sample: Callable[[Any], Any] | None = None,
) -> dict[str, float]:
    """How often :func:`detect` reads rendered scenes right (through `transform`, e.g. a VAE round trip), scenes
    drawn by `sample` (default: the two-object world's, see :func:`~realign_pipeline.shapes.world.reading_accuracy`).

    Each true object is matched to the nearest detection within a quarter of the image; a scene is exact
    when the number of detections equals the number of objects and every object's colour and shape are right.
    """
    return reading_accuracy(
        lambda image: [(d["color"], d["shape"], d["cx"], d["cy"]) for d in detect(image)],
        num_scenes, size, seed, transform, sample,
    )
