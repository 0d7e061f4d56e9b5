"""The shapes world: a seeded, procedural data set of colored shapes with CC-500 / ABC-6K style captions.

A scene holds one or two objects; an object is a (color, shape) pair drawn at a position and size on a plain
background. Two-object scenes put one object in each half of the image, so "to the left of" is always
true of the scene it captions. Images are rendered at 4x and box-filtered down, so edges are antialiased
the same way at any size.

Held-out split (``HELD_OUT_PAIRINGS``): a fixed, seeded 20% of the two-object pairings (unordered pairs of
colored objects with different colors and different shapes) never appear in training scenes, in any caption
form; every single colored object still does. Test prompts (:func:`held_out_prompts`) are those pairings in every
caption form, so a test measures composition the model has not seen, which is where binding fails.
"""

from __future__ import annotations

import functools
import itertools
import math
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageDraw

__all__ = [
    "BACKGROUND",
    "CAPTION_FORMS",
    "COLORS",
    "HELD_OUT_PAIRINGS",
    "SHAPES",
    "SIDE_BOXES",
    "Scene",
    "ShapeObject",
    "all_pairings",
    "caption_scene",
    "held_out_halves",
    "held_out_prompts",
    "is_held_out",
    "pairing_prompts",
    "reading_accuracy",
    "render_scene",
    "sample_scene",
    "shape_mask",
    "train_batch",
    "training_pairing_prompts",
    "training_pairings",
]

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 210, 20),
    "purple": (140, 40, 180),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
BACKGROUND: tuple[int, int, int] = (235, 235, 235)

# Caption forms: "{a}" and "{b}" are "color shape" phrases; "{left}"/"{right}" bind to positions.
CAPTION_FORMS: dict[str, str] = {
    "and": "a {a} and a {b}",  # CC-500 style, order of mention independent of position
    "with": "a {a} with a {b}",  # ABC-6K style
    "left": "a {left} to the left of a {right}",
    "right": "a {right} to the right of a {left}",
}
SINGLE_FORM = "a {a}"

#: Where a two-object scene draws the object of each side, ``(x0, y0, x1, y1)`` in image fractions: one per half.
SIDE_BOXES: dict[str, tuple[float, float, float, float]] = {"left": (0.0, 0.0, 0.5, 1.0), "right": (0.5, 0.0, 1.0, 1.0)}

MIN_SIZE_FRACTION = 12 / 32
MAX_SIZE_FRACTION = 16 / 32
HELD_OUT_FRACTION = 0.2
SPLIT_SEED = 1234


@dataclass(frozen=True)
class ShapeObject:
    """One object: color and shape names, center (cx, cy) and size, all as fractions of the image side."""

    color: str
    shape: str
    cx: float
    cy: float
    size: float

    @property
    def phrase(self) -> str:
        return f"{self.color} {self.shape}"

    @property
    def box(self) -> tuple[float, float, float, float]:
        h = self.size / 2
        return (self.cx - h, self.cy - h, self.cx + h, self.cy + h)


@dataclass(frozen=True)
class Scene:
    objects: tuple[ShapeObject, ...]
    caption: str
    form: str

    def to_dict(self) -> dict[str, Any]:
        return {"caption": self.caption, "form": self.form, "objects": [asdict(o) for o in self.objects]}


def _canonical(a: tuple[str, str], b: tuple[str, str]) -> tuple[tuple[str, str], tuple[str, str]]:
    return (a, b) if a <= b else (b, a)


def _pairings_in_palette_order() -> list[tuple[tuple[str, str], tuple[str, str]]]:
    objects = [(c, s) for c in COLORS for s in SHAPES]
    return sorted((a, b) for a, b in itertools.combinations(objects, 2) if a[0] != b[0] and a[1] != b[1])


def all_pairings() -> list[tuple[tuple[str, str], tuple[str, str]]]:
    """Every unordered pair of colored objects with different colors and different shapes, each pair in
    canonical (alphabetical) order, sorted."""
    return sorted(_canonical(a, b) for a, b in _pairings_in_palette_order())


def _held_out_pairings() -> frozenset[tuple[tuple[str, str], tuple[str, str]]]:
    # Sampled from the palette-ordered list (the order the shipped models were trained with), then made
    # canonical so membership tests do not depend on the order of the two objects.
    pairs = _pairings_in_palette_order()
    rng = random.Random(SPLIT_SEED)
    count = round(HELD_OUT_FRACTION * len(pairs))
    return frozenset(_canonical(a, b) for a, b in rng.sample(pairs, count))


HELD_OUT_PAIRINGS = _held_out_pairings()


@functools.cache
def training_pairings() -> tuple[tuple[tuple[str, str], tuple[str, str]], ...]:
    """The pairings training scenes draw from (every pairing but the held-out ones), in sorted order."""
    return tuple(p for p in all_pairings() if p not in HELD_OUT_PAIRINGS)


def is_held_out(scene_or_objects: Scene | tuple[ShapeObject, ...] | list[ShapeObject]) -> bool:
    """True when a two-object scene's pairing is in the held-out split."""
    objects = scene_or_objects.objects if isinstance(scene_or_objects, Scene) else tuple(scene_or_objects)
    if len(objects) != 2:
        return False
    a, b = ((o.color, o.shape) for o in objects)
    return _canonical(a, b) in HELD_OUT_PAIRINGS


def caption_scene(objects: tuple[ShapeObject, ...], form: str, swap: bool = False) -> str:
    """The caption of `objects` in `form` (see ``CAPTION_FORMS``); `swap` changes the order of mention."""
    if len(objects) == 1:
        return SINGLE_FORM.format(a=objects[0].phrase)
    left, right = sorted(objects, key=lambda o: o.cx)
    a, b = (objects[1], objects[0]) if swap else (objects[0], objects[1])
    return CAPTION_FORMS[form].format(a=a.phrase, b=b.phrase, left=left.phrase, right=right.phrase)


def _place(rng: random.Random, size: float, x_range: tuple[float, float]) -> tuple[float, float]:
    h = size / 2
    lo, hi = x_range
    cx = rng.uniform(lo + h, hi - h)
    cy = rng.uniform(h, 1 - h)
    return cx, cy


def sample_scene(
    rng: random.Random,
    *,
    num_objects: int | None = None,
    split: str = "train",
    pairing: tuple[tuple[str, str], tuple[str, str]] | None = None,
    form: str | None = None,
) -> Scene:
    """A random scene. `split` "train" never yields a held-out pairing; "test" always does (two objects)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    if num_objects is None:
        num_objects = 2 if split == "test" or pairing is not None else rng.choice((1, 2, 2))
    if num_objects not in (1, 2):
        raise ValueError(f"the shapes world draws one or two objects, not {num_objects}")
    if pairing is not None and num_objects != 2:
        raise ValueError("a pairing needs num_objects=2")
    if split == "test" and num_objects != 2:
        raise ValueError("test scenes are two-object scenes with a held-out pairing")
    size = [rng.uniform(MIN_SIZE_FRACTION, MAX_SIZE_FRACTION) for _ in range(num_objects)]
    if num_objects == 1:
        color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
        cx, cy = _place(rng, size[0], (0.0, 1.0))
        obj = ShapeObject(color, shape, round(cx, 4), round(cy, 4), round(size[0], 4))
        return Scene((obj,), caption_scene((obj,), "and"), "single")
    if pairing is None:
        pool = sorted(HELD_OUT_PAIRINGS) if split == "test" else training_pairings()
        pairing = rng.choice(pool)
    elif (_canonical(*pairing) in HELD_OUT_PAIRINGS) != (split == "test"):
        raise ValueError(f"pairing {pairing} is not in the {split} split")
    first, second = pairing
    if rng.random() < 0.5:
        first, second = second, first
    # first object in the left half, second in the right half
    l_cx, l_cy = _place(rng, size[0], SIDE_BOXES["left"][0::2])
    r_cx, r_cy = _place(rng, size[1], SIDE_BOXES["right"][0::2])
    objects = (
        ShapeObject(first[0], first[1], round(l_cx, 4), round(l_cy, 4), round(size[0], 4)),
        ShapeObject(second[0], second[1], round(r_cx, 4), round(r_cy, 4), round(size[1], 4)),
    )
    form = form or rng.choice(list(CAPTION_FORMS))
    caption = caption_scene(objects, form, swap=rng.random() < 0.5)
    return Scene(objects, caption, form)


def _polygon(shape: str, cx: float, cy: float, half: float) -> list[tuple[float, float]] | None:
    if shape == "square":
        return [(cx - half, cy - half), (cx + half, cy - half), (cx + half, cy + half), (cx - half, cy + half)]
    if shape == "triangle":
        return [(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)]
    if shape == "cross":
        t = half / 3
        return [
            (cx - t, cy - half), (cx + t, cy - half), (cx + t, cy - t), (cx + half, cy - t),
            (cx + half, cy + t), (cx + t, cy + t), (cx + t, cy + half), (cx - t, cy + half),
            (cx - t, cy + t), (cx - half, cy + t), (cx - half, cy - t), (cx - t, cy - t),
        ]
    return None


def _draw(draw: PIL.ImageDraw.ImageDraw, obj: ShapeObject, side: int, fill: Any) -> None:
    cx, cy, half = obj.cx * side, obj.cy * side, obj.size * side / 2
    if obj.shape == "circle":
        draw.ellipse([cx - half, cy - half, cx + half, cy + half], fill=fill)
        return
    points = _polygon(obj.shape, cx, cy, half)
    if points is None:
        raise ValueError(f"unknown shape {obj.shape!r}; the world has {SHAPES}")
    draw.polygon(points, fill=fill)


def render_scene(scene: Scene | tuple[ShapeObject, ...], size: int = 32, supersample: int = 4) -> PIL.Image.Image:
    """RGB image of the scene, `size` pixels square."""
    objects = scene.objects if isinstance(scene, Scene) else scene
    big = size * supersample
    image = PIL.Image.new("RGB", (big, big), BACKGROUND)
    draw = PIL.ImageDraw.Draw(image)
    for obj in objects:
        _draw(draw, obj, big, COLORS[obj.color])
    return image.resize((size, size), PIL.Image.Resampling.BOX)


def shape_mask(obj: ShapeObject, size: int = 32, supersample: int = 4) -> np.ndarray:
    """Coverage of one object per pixel in [0, 1], shape (size, size)."""
    big = size * supersample
    image = PIL.Image.new("L", (big, big), 0)
    _draw(PIL.ImageDraw.Draw(image), obj, big, 255)
    return np.asarray(image.resize((size, size), PIL.Image.Resampling.BOX), dtype=np.float32) / 255.0


def train_batch(rng: random.Random, batch_size: int, size: int = 32) -> tuple[np.ndarray, list[str], list[Scene]]:
    """(images uint8 (B, size, size, 3), captions, scenes) of training scenes."""
    scenes = [sample_scene(rng, split="train") for _ in range(batch_size)]
    images = np.stack([np.asarray(render_scene(s, size)) for s in scenes])
    return images, [s.caption for s in scenes], scenes


def held_out_prompts(forms: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
    """Every held-out pairing in every caption form (both orders of mention for the symmetric forms).

    Each record: ``{"prompt", "form", "objects": [{"color", "shape", "side"}]}`` where side is "left",
    "right" or None (position not named by the prompt).
    """
    return pairing_prompts(sorted(HELD_OUT_PAIRINGS), forms)


#: Seed of the split of the held-out pairings into halves A and B (drawn once, never redrawn).
HALVES_SEED = 0


def held_out_halves() -> tuple[list[tuple[tuple[str, str], tuple[str, str]]], list[tuple[tuple[str, str], tuple[str, str]]]]:
    """The 24 held-out pairings split, seeded, into halves A and B of 12. Settings may be tuned on half A (as
    text: reward prompts, layout settings); half B is the test no run may look at before its result is final."""
    pairings = sorted(HELD_OUT_PAIRINGS)
    random.Random(HALVES_SEED).shuffle(pairings)
    half = len(pairings) // 2
    return sorted(pairings[:half]), sorted(pairings[half:])


def training_pairing_prompts(forms: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
    """:func:`held_out_prompts` for the pairings the models were trained on (the other 80%): where settings
    are tuned, so the held-out prompts stay a test."""
    return pairing_prompts(list(training_pairings()), forms)


def pairing_prompts(
    pairings: list[tuple[tuple[str, str], tuple[str, str]]], forms: tuple[str, ...] | None = None
) -> list[dict[str, Any]]:
    """The records of :func:`held_out_prompts` for any list of pairings."""
    forms = forms or tuple(CAPTION_FORMS)
    records = []
    for a, b in pairings:
        pa, pb = f"{a[0]} {a[1]}", f"{b[0]} {b[1]}"
        for form in forms:
            if form in ("and", "with"):
                for x, y in ((pa, pb), (pb, pa)):
                    records.append(
                        {
                            "prompt": CAPTION_FORMS[form].format(a=x, b=y),
                            "form": form,
                            "objects": [
                                {"color": x.split()[0], "shape": x.split()[1], "side": None},
                                {"color": y.split()[0], "shape": y.split()[1], "side": None},
                            ],
                        }
                    )
            else:
                for left, right in ((pa, pb), (pb, pa)):
                    records.append(
                        {
                            "prompt": CAPTION_FORMS[form].format(left=left, right=right),
                            "form": form,
                            "objects": [
                                {"color": left.split()[0], "shape": left.split()[1], "side": "left"},
                                {"color": right.split()[0], "shape": right.split()[1], "side": "right"},
                            ],
                        }
                    )
    return records


def reading_accuracy(
    read: Callable[[PIL.Image.Image], list[tuple[str, str, float, float]]],
    num_scenes: int = 200,
    size: int = 32,
    seed: int = 0,
    transform: Callable[[PIL.Image.Image], PIL.Image.Image] | None = None,
    sample: Callable[[random.Random], Scene] | None = None,
) -> dict[str, float]:
    """How often `read` (image -> ``[(color, shape, cx, cy), ...]``) reads seeded rendered scenes right.

    Each true object is matched to the nearest reading within a quarter of the image; a scene is exact when it
    has as many readings as objects and every object's colour and shape are right. `transform` (e.g. a VAE
    round trip) is applied to each render first. `sample` draws the scenes (default :func:`sample_scene`; e.g.
    :func:`realign_pipeline.shapes.triples.sample_scene` for three-object scenes).
    """
    rng = random.Random(seed)
    exact = objects = color_ok = shape_ok = both_ok = 0
    for _ in range(num_scenes):
        scene = (sample or sample_scene)(rng)
        image = render_scene(scene, size)
        if transform is not None:
            image = transform(image)
        readings = read(image)
        scene_ok = len(readings) == len(scene.objects)
        for obj in scene.objects:
            objects += 1
            near = [r for r in readings if math.hypot(r[2] - obj.cx, r[3] - obj.cy) < 0.25]
            if not near:
                scene_ok = False
                continue
            color, shape, _, _ = min(near, key=lambda r: math.hypot(r[2] - obj.cx, r[3] - obj.cy))
            color_ok += color == obj.color
            shape_ok += shape == obj.shape
            right = color == obj.color and shape == obj.shape
            both_ok += right
            scene_ok &= right
        exact += scene_ok
    return {
        "scene_accuracy": exact / num_scenes,
        "object_accuracy": both_ok / objects,
        "color_accuracy": color_ok / objects,
        "shape_accuracy": shape_ok / objects,
        "num_scenes": num_scenes,
        "num_objects": objects,
    }
