"""Classical perception for the shapes world: the dense captioner's tagger and grounder without any model.

:func:`segment_objects` classifies pixels by the palette, finds connected components (in numpy) and names
each component's shape from region measures. A pixel of an antialiased edge (or of a blurry generated
image) is a mix of the background and one palette colour, so each pixel is projected onto the
background -> colour line of every palette colour: the colour is the line with the smallest residual and the
projection gives its coverage in [0, 1]. A pixel belongs to an object when its coverage is at least one half,
so the masks follow the drawn edges at any image size.

:class:`ShapesTagger` and :class:`ShapesGrounder` wrap it in the Tagger / Grounder protocols of
:mod:`realign_pipeline.captioner.base`; :func:`shapes_dense_captioner` chains them with ``RuleBasedLLM``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image

from ..captioner.base import Detection, assign_one_to_one, phrase_attributes
from ..captioner.dense import DenseCaptioner
from ..captioner.grounding import GroundingReport, grounding_targets
from .world import (
    BACKGROUND,
    COLORS,
    SHAPES,
    ShapeObject,
    reading_accuracy,
    shape_mask,
)

__all__ = [
    "Found",
    "ShapesGrounder",
    "ShapesTagger",
    "connected_components",
    "segment_objects",
    "segmenter_accuracy",
    "shapes_dense_captioner",
]

_COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
_PALETTE = np.array([COLORS[name] for name in _COLOR_NAMES], dtype=np.float32)
_BG = np.array(BACKGROUND, dtype=np.float32)
_DIRECTIONS = _PALETTE - _BG  # background -> colour, one row per colour
_DIR_NORM2 = (_DIRECTIONS**2).sum(axis=1)

DEFAULT_COVERAGE = 0.5
# The palette lines are at least ~97 RGB units apart (purple/blue), so 80 accepts blurry generated colours
# while still refusing pixels that belong to none of them (with RELATIVE_RESIDUAL below).
DEFAULT_MAX_RESIDUAL = 80.0
# The smallest object (a 12/32 triangle) covers ~7% of the image; 2% drops specks and edge debris.
DEFAULT_MIN_AREA = 0.02
RELATIVE_RESIDUAL = 0.35


@dataclass
class Found:
    """One segmented object: colour and shape names, box (fractions x0, y0, x1, y1), mask (bool H x W), score."""

    color: str
    shape: str
    box: tuple[float, float, float, float]
    mask: np.ndarray
    score: float

    @property
    def center(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        return ((x0 + x1) / 2, (y0 + y1) / 2)


def _as_rgb(image: PIL.Image.Image | np.ndarray) -> np.ndarray:
    """float32 (H, W, 3) in 0..255 from a PIL image or an array (uint8, or float in [0, 1])."""
    if isinstance(image, PIL.Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32)
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[-1] not in (3, 4):
        raise ValueError(f"expected an (H, W, 3) image, got shape {array.shape}")
    array = array[..., :3].astype(np.float32)
    if array.size and array.max() <= 1.0 and not np.issubdtype(np.asarray(image).dtype, np.integer):
        array = array * 255.0  # float images in [0, 1]
    return array


def _unmix(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per pixel: best colour index, its coverage and its residual (distance to the bg -> colour line)."""
    diff = rgb - _BG
    alpha = np.clip(diff @ _DIRECTIONS.T / _DIR_NORM2, 0.0, 1.0)  # (H, W, C)
    residual = np.linalg.norm(diff[..., None, :] - alpha[..., None] * _DIRECTIONS, axis=-1)
    best = residual.argmin(axis=-1)
    take = best[..., None]
    return best, np.take_along_axis(alpha, take, -1)[..., 0], np.take_along_axis(residual, take, -1)[..., 0]


def _shift(array: np.ndarray, dy: int, dx: int, fill: Any) -> np.ndarray:
    """`array` moved by (dy, dx): out[y, x] = array[y - dy, x - dx], `fill` where that falls outside."""
    out = np.full_like(array, fill)
    h, w = array.shape
    ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
    xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    out[yd, xd] = array[ys, xs]
    return out


def connected_components(classes: np.ndarray) -> np.ndarray:
    """8-connected components of equal non-negative class values; labels 0..n-1, -1 for background (< 0).

    Min-label propagation with pointer jumping, all in numpy: every pixel starts with its own flat index and
    repeatedly takes the smallest label of its same-class neighbours, then the label of that label.
    """
    h, w = classes.shape
    fg = classes >= 0
    big = h * w
    labels = np.where(fg, np.arange(big).reshape(h, w), big)
    offsets = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]
    same = [(_shift(classes, dy, dx, -1) == classes) & fg for dy, dx in offsets]
    while True:
        new = labels.copy()
        for (dy, dx), ok in zip(offsets, same):
            np.minimum(new, np.where(ok, _shift(labels, dy, dx, big), big), out=new)
        flat = new.ravel()
        inside = flat < big
        flat[inside] = flat[flat[inside]]  # pointer jumping: a label is a pixel of the same component
        if np.array_equal(new, labels):
            break
        labels = new
    out = np.full((h, w), -1, dtype=np.int64)
    if fg.any():
        _, consecutive = np.unique(labels[fg], return_inverse=True)
        out[fg] = consecutive
    return out


def _extent(profile: np.ndarray) -> tuple[float, float]:
    """Sub-pixel [start, end) of a coverage profile (max coverage per row or column): its half-height crossings.

    For an antialiased edge this is within ~0.1 px of the drawn edge, and unlike "first pixel above zero" it
    stays at the edge when the image is blurred, which spreads coverage but keeps the half-height line.
    """
    return half_height_edges(profile)


def half_height_edges(profile: np.ndarray) -> tuple[float, float]:
    """Where `profile` (one value per pixel, centres at i + 0.5) first rises to / last falls from 0.5."""
    above = np.flatnonzero(profile >= 0.5)
    if above.size == 0:
        return 0.0, 0.0
    i, j = int(above[0]), int(above[-1])
    start = float(i)  # the pixel's own left edge when the profile jumps from 0 at the border
    if i > 0:
        lo, hi = float(profile[i - 1]), float(profile[i])
        start = i - 0.5 + (0.5 - lo) / max(hi - lo, 1e-6)
    end = float(j + 1)
    if j + 1 < profile.size:
        hi, lo = float(profile[j]), float(profile[j + 1])
        end = j + 0.5 + (hi - 0.5) / max(hi - lo, 1e-6)
    return start, end


def shape_features(coverage: np.ndarray) -> np.ndarray:
    """(fill ratio of the box, centroid height in the box, corner fill, side-middle fill) of a soft mask."""
    x0, x1 = _extent(coverage.max(axis=0))
    y0, y1 = _extent(coverage.max(axis=1))
    w, h = max(x1 - x0, 1e-6), max(y1 - y0, 1e-6)
    total = float(coverage.sum())
    fill = total / (w * h)
    ys, xs = np.mgrid[0 : coverage.shape[0], 0 : coverage.shape[1]] + 0.5  # pixel centres
    cy = float((coverage * ys).sum() / max(total, 1e-6))
    u, v = (xs - x0) / w, (ys - y0) / h  # box coordinates in [0, 1]
    inside = (u > 0) & (u < 1) & (v > 0) & (v < 1)
    third = 1 / 3
    corner = inside & ((u < third) | (u > 1 - third)) & ((v < third) | (v > 1 - third))
    side = inside & ((u < third) | (u > 1 - third)) & (v > third) & (v < 1 - third)
    corner_fill = float(coverage[corner].mean()) if corner.any() else 0.0
    side_fill = float(coverage[side].mean()) if side.any() else 0.0
    return np.array([fill, (cy - y0) / h, corner_fill, side_fill], dtype=np.float64)


@functools.lru_cache(maxsize=1)
def _prototypes() -> np.ndarray:
    """Features of each shape drawn large and centred (rows follow ``SHAPES``), measured like any component."""
    rows = []
    for shape in SHAPES:
        coverage = shape_mask(ShapeObject("red", shape, 0.5, 0.5, 0.5), size=96)
        rows.append(shape_features(coverage))
    return np.stack(rows)


# Feature scales (distance units): the fill ratio survives blur (blur keeps mass and the half-height box) and
# the centroid height only has to split triangles (0.67) from the rest (0.5), so both count most; corner
# and side fill melt under blur (a blurred square's corners look round), so they only break near-ties.
_FEATURE_SCALE = np.array([0.08, 0.04, 0.25, 0.25])


def classify_shape(coverage: np.ndarray) -> tuple[str, float]:
    """The shape whose prototype features are nearest, and a softmax confidence over the four shapes."""
    features = shape_features(coverage)
    distance = np.linalg.norm((_prototypes() - features) / _FEATURE_SCALE, axis=1)
    logits = -0.5 * distance**2
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    best = int(distance.argmin())
    return SHAPES[best], float(probs[best])


def segment_objects(
    image: PIL.Image.Image | np.ndarray,
    *,
    coverage_threshold: float = DEFAULT_COVERAGE,
    max_residual: float = DEFAULT_MAX_RESIDUAL,
    min_area: float = DEFAULT_MIN_AREA,
) -> list[Found]:
    """The coloured objects of `image`, largest first: colour by palette, shape by region measures.

    Args:
        coverage_threshold: a pixel is an object pixel when it is at least this much of a palette colour.
        max_residual: RGB distance from the nearest background -> colour line beyond which a pixel is no colour.
        min_area: components smaller than this fraction of the image are dropped.
    """
    rgb = _as_rgb(image)
    h, w = rgb.shape[:2]
    best, alpha, residual = _unmix(rgb)
    # The residual must also be small next to the colour's own part of the pixel: a grey pixel is ~80 RGB
    # units from the half-green line but has no green in it at all.
    relative_ok = residual <= RELATIVE_RESIDUAL * alpha * np.sqrt(_DIR_NORM2)[best]
    fg = (alpha >= coverage_threshold) & (residual <= max_residual) & relative_ok
    labels = connected_components(np.where(fg, best, -1))
    found: list[Found] = []
    for index in range(int(labels.max()) + 1):
        mask = labels == index
        area = int(mask.sum())
        if area < min_area * h * w:
            continue
        color_index = int(best[mask][0])
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        # Soft coverage around the component (edge pixels below the threshold count by their coverage),
        # restricted to this colour so a neighbouring object does not leak in.
        # The margin reaches the rim a blurry image spreads beyond the half-coverage pixels.
        margin = max(2, min(h, w) // 16)
        y0, y1 = max(rows[0] - margin, 0), min(rows[-1] + 1 + margin, h)
        x0, x1 = max(cols[0] - margin, 0), min(cols[-1] + 1 + margin, w)
        local = np.zeros((y1 - y0, x1 - x0), dtype=np.float64)
        window = (slice(y0, y1), slice(x0, x1))
        same = (best[window] == color_index) & (residual[window] <= max_residual)
        near = mask[window] | (same & ~(labels[window] >= 0))
        local[near] = alpha[window][near]
        shape, shape_conf = classify_shape(local)
        color_conf = float(np.clip(1.0 - residual[mask].mean() / max_residual, 0.0, 1.0))
        found.append(
            Found(
                color=_COLOR_NAMES[color_index],
                shape=shape,
                box=(float(cols[0] / w), float(rows[0] / h), float((cols[-1] + 1) / w), float((rows[-1] + 1) / h)),
                mask=mask,
                score=float(shape_conf * color_conf),
            )
        )
    found.sort(key=lambda f: -int(f.mask.sum()))
    return found


def _parse_phrase(phrase: str) -> tuple[str | None, str | None]:
    """(colour, shape) named by a phrase like "a red circle" (plural shape words too); None where absent."""
    color = shape = None
    for word in phrase.lower().replace(",", " ").split():
        if word in COLORS and color is None:
            color = word
        for candidate in (word, word[:-1], word[:-2]):  # circles, crosses
            if candidate in SHAPES and shape is None:
                shape = candidate
    return color, shape


class _SegmenterSettings:
    """Segmentation thresholds shared by the tagger and the grounder, saved by ``to_config``."""

    def __init__(
        self,
        coverage_threshold: float = DEFAULT_COVERAGE,
        max_residual: float = DEFAULT_MAX_RESIDUAL,
        min_area: float = DEFAULT_MIN_AREA,
    ):
        self.coverage_threshold = float(coverage_threshold)
        self.max_residual = float(max_residual)
        self.min_area = float(min_area)

    def segment(self, image: PIL.Image.Image | np.ndarray) -> list[Found]:
        return segment_objects(
            image, coverage_threshold=self.coverage_threshold, max_residual=self.max_residual,
            min_area=self.min_area,
        )

    def to_config(self) -> dict[str, Any]:
        return {
            "coverage_threshold": self.coverage_threshold,
            "max_residual": self.max_residual,
            "min_area": self.min_area,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Any:
        return cls(**config)


class ShapesTagger(_SegmenterSettings):
    """Tagger protocol: the shape nouns segmented in each image, left to right, each once."""

    def tag(self, images: list[PIL.Image.Image], prompts: list[str]) -> list[list[str]]:
        tags = []
        for image in images:
            names: list[str] = []
            for item in sorted(self.segment(image), key=lambda f: f.center[0]):
                if item.shape not in names:
                    names.append(item.shape)
            tags.append(names)
        return tags


# Detection score factor: an object of the noun's shape in another colour is where the noun is, but less sure.
_WRONG_COLOUR_WEIGHT = 0.5


class ShapesGrounder(_SegmenterSettings):
    """Grounder protocol: each noun's object is a segmented object of that shape, never one of another shape.

    The phrase's colour only chooses between objects of the noun's shape, and one object goes to one phrase:
    with a red and a blue square, "blue square" gets the blue one. With one red square, "blue square" gets it
    (the square is where the noun is, so that is where the colour must be re-bound), unless "red square" is
    asked for too, which matches it better and leaves "blue square" with nothing. A noun with no object of its
    shape stays None, whatever colours are in the image. ``last_report`` says why each missing one is missing.
    """

    last_report: GroundingReport | None = None

    def ground(
        self, image: PIL.Image.Image, nouns: list[str], phrases: list[str] | None = None
    ) -> list[Detection | None]:
        return self.ground_with_report(image, nouns, phrases)[0]

    def ground_with_report(
        self, image: PIL.Image.Image, nouns: list[str], phrases: list[str] | None = None
    ) -> tuple[list[Detection | None], GroundingReport]:
        targets = grounding_targets(nouns, phrases)
        report = GroundingReport(
            phrases=[p for _, p in targets], nouns=[n for n, _ in targets], thresholds=self.to_config()
        )
        found = self.segment(image)
        by_shape: dict[str, list[int]] = {}  # shape -> indices of the targets that name it
        for t, (noun, _) in enumerate(targets):
            shape = _parse_phrase(noun)[1]
            if shape is not None:
                by_shape.setdefault(shape, []).append(t)
        chosen: dict[int, Found] = {}
        for shape, members in by_shape.items():
            objects = [f for f in found if f.shape == shape]
            report.instances[shape] = len(objects)
            colours = [_phrase_colour(*targets[t]) for t in members]
            keys = [[(float(f.color == colour), f.score) for f in objects] for colour in colours]
            for t, k in zip(members, assign_one_to_one(keys)):
                if k is not None:
                    chosen[t] = objects[k]
        detections: list[Detection | None] = []
        for t, (noun, phrase) in enumerate(targets):
            item = chosen.get(t)
            if item is None:
                detections.append(None)
                report.missing[phrase] = self._why_missing(noun, report)
                continue
            colour = _phrase_colour(noun, phrase)
            weight = 1.0 if colour is None or item.color == colour else _WRONG_COLOUR_WEIGHT
            detections.append(Detection(item.box, item.mask.copy(), item.score * weight))
        self.last_report = report
        return detections, report

    @staticmethod
    def _why_missing(noun: str, report: GroundingReport) -> str:
        shape = _parse_phrase(noun)[1]
        if shape is None:
            return f"{noun!r} names no shape of this world ({', '.join(SHAPES)})"
        if report.instances.get(shape, 0) == 0:
            return f"no {shape} in the image"
        return (
            f"the {report.instances[shape]} {shape}(s) of the image went to other phrases of that noun, whose "
            "colour matched better"
        )


def _phrase_colour(noun: str, phrase: str) -> str | None:
    """The colour the phrase gives the noun ("blue" in "a blue square"), None when it names none."""
    for word in phrase_attributes(noun, phrase) or _words_of(noun):
        if word in COLORS:
            return word
    return None


def _words_of(text: str) -> list[str]:
    return text.lower().replace(",", " ").split()


def shapes_dense_captioner(**kwargs: Any) -> DenseCaptioner:
    """A ``DenseCaptioner`` for the shapes world: ShapesTagger -> RuleBasedLLM -> ShapesGrounder."""
    from ..captioner.llm_rules import RuleBasedLLM

    kwargs.setdefault("tagger", ShapesTagger())
    kwargs.setdefault("llm", RuleBasedLLM())
    kwargs.setdefault("grounder", ShapesGrounder())
    return DenseCaptioner(**kwargs)


def segmenter_accuracy(
    num_scenes: int = 200, size: int = 32, seed: int = 0, transform: Any = None, sample: Any = None
) -> dict[str, float]:
    """Accuracy of :func:`segment_objects` on rendered scenes (optionally passed through `transform`; scenes
    drawn by `sample`, as in :func:`~realign_pipeline.shapes.world.reading_accuracy`).

    Each true object is matched to the found object whose box centre is nearest (within a quarter of the
    image); a scene is exact when it has as many found objects as true ones and all are right.
    """
    return reading_accuracy(
        lambda image: [(f.color, f.shape, f.center[0], f.center[1]) for f in segment_objects(image)],
        num_scenes, size, seed, transform, sample,
    )
