"""Three-object scenes: the shapes world at 48 x 48 with up to three objects, one in each third of the width.

The second shapes world (``shapes-bow``) binds colours right 93% of the time on held-out pairings: with two
objects, a bag-of-words text encoder still leaves the UNet enough to go on. Three objects in one caption
are where Stable Diffusion's CLIP loses track of which colour goes with which shape, so this world asks the
same frozen bag-of-words text encoder for three. Same palette, same shapes, same rendering; objects are 12-16
pixels at 48 pixels (a quarter to a third of the side), so each third holds one.

Training scenes hold one, two or three objects (two-object scenes use the halves, as the first world does).
Held out: every triple that contains one of the first world's held-out pairings
(:data:`~realign_pipeline.shapes.world.HELD_OUT_PAIRINGS`), so a held-out pairing is never seen in training
here either, in any scene or caption. Halves A and B follow the pairings' halves: a held-out triple is in
half A when its held-out pairings all come from half A, in half B when they all come from half B.

Captions (the text encoder reads at most 16 tokens, so a relation names two of the three objects):
"a X, a Y and a Z", "a X with a Y and a Z", "a L to the left of a R and a Z", "a R to the right of a L and a Z".
"""

from __future__ import annotations

import functools
import itertools
import random
from collections.abc import Sequence
from typing import Any

import numpy as np

from .world import (
    CAPTION_FORMS,
    COLORS,
    HELD_OUT_PAIRINGS,
    SHAPES,
    SIDE_BOXES,
    Scene,
    ShapeObject,
    caption_scene,
    held_out_halves,
    render_scene,
    training_pairings,
)

__all__ = [
    "RESOLUTION",
    "THIRD_BOXES",
    "TRIPLE_FORMS",
    "all_triples",
    "caption_triple",
    "held_out_triple_prompts",
    "held_out_triples",
    "is_held_out_triple",
    "sample_scene",
    "train_batch",
    "training_triple_prompts",
    "training_triples",
    "triple_halves",
    "triple_prompts",
]

RESOLUTION = 48
MIN_SIZE_FRACTION = 12 / 48
MAX_SIZE_FRACTION = 16 / 48
THIRDS = ((0.0, 1 / 3), (1 / 3, 2 / 3), (2 / 3, 1.0))
#: Where a three-object scene draws the object of each third, ``(x0, y0, x1, y1)`` in image fractions.
THIRD_BOXES: dict[str, tuple[float, float, float, float]] = {
    name: (x0, 0.0, x1, 1.0) for name, (x0, x1) in zip(("left", "middle", "right"), THIRDS)
}
HALVES = tuple((box[0], box[2]) for box in SIDE_BOXES.values())

TRIPLE_FORMS: dict[str, str] = {
    "and": "a {a}, a {b} and a {c}",
    "with": "a {a} with a {b} and a {c}",
    "left": "a {left} to the left of a {right} and a {c}",
    "right": "a {right} to the right of a {left} and a {c}",
}

Object = tuple[str, str]
Triple = tuple[Object, Object, Object]


@functools.cache
def all_triples() -> tuple[Triple, ...]:
    """Every set of three coloured objects with three different colours and three different shapes, each
    sorted, in sorted order (240 of them)."""
    objects = [(c, s) for c in COLORS for s in SHAPES]
    return tuple(sorted(
        tuple(sorted(t))  # type: ignore[misc]
        for t in itertools.combinations(objects, 3)
        if len({o[0] for o in t}) == 3 and len({o[1] for o in t}) == 3
    ))


def _pairs(triple: Triple) -> list[tuple[Object, Object]]:
    return [tuple(sorted(p)) for p in itertools.combinations(triple, 2)]  # type: ignore[misc]


def is_held_out_triple(triple: tuple[Object, ...]) -> bool:
    """True when any two of the triple's objects form a held-out pairing."""
    return any(p in HELD_OUT_PAIRINGS for p in _pairs(tuple(sorted(triple))))  # type: ignore[arg-type]


@functools.cache
def held_out_triples() -> tuple[Triple, ...]:
    return tuple(t for t in all_triples() if is_held_out_triple(t))


@functools.cache
def training_triples() -> tuple[Triple, ...]:
    """The triples training scenes draw from: those without a held-out pairing."""
    return tuple(t for t in all_triples() if not is_held_out_triple(t))


def triple_halves() -> tuple[list[Triple], list[Triple]]:
    """Held-out triples whose held-out pairings all lie in half A, and those whose all lie in half B (triples
    mixing the halves are in neither; they stay in the held-out set)."""
    half_a, half_b = (set(h) for h in held_out_halves())
    a, b = [], []
    for t in held_out_triples():
        held = {p for p in _pairs(t) if p in HELD_OUT_PAIRINGS}
        if held <= half_a:
            a.append(t)
        elif held <= half_b:
            b.append(t)
    return a, b


def _obj(color_shape: Object, x_range: tuple[float, float], size: float, rng: random.Random) -> ShapeObject:
    h = size / 2
    cx = rng.uniform(x_range[0] + h, x_range[1] - h)
    cy = rng.uniform(h, 1 - h)
    return ShapeObject(color_shape[0], color_shape[1], round(cx, 4), round(cy, 4), round(size, 4))


def caption_triple(objects: tuple[ShapeObject, ...], form: str, rng: random.Random) -> str:
    """A caption of three objects in `form`, the order of mention (and, for relations, which two objects are
    related) drawn from `rng`."""
    if form not in TRIPLE_FORMS:
        raise ValueError(f"unknown form {form!r}; choose one of {tuple(TRIPLE_FORMS)}")
    order = list(objects)
    rng.shuffle(order)
    a, b, c = order
    left, right = sorted((a, b), key=lambda o: o.cx)
    return TRIPLE_FORMS[form].format(a=a.phrase, b=b.phrase, c=c.phrase, left=left.phrase, right=right.phrase)


def sample_scene(rng: random.Random, *, num_objects: int | None = None, split: str = "train") -> Scene:
    """A random scene of this world. "train" never shows a held-out pairing; "test" is a held-out triple."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    if num_objects is None:
        num_objects = 3 if split == "test" else rng.choice((1, 2, 3, 3))
    if num_objects not in (1, 2, 3) or (split == "test" and num_objects != 3):
        raise ValueError(f"this world draws one to three objects (test scenes: three), not {num_objects}")
    sizes = [rng.uniform(MIN_SIZE_FRACTION, MAX_SIZE_FRACTION) for _ in range(num_objects)]
    if num_objects == 1:
        obj = _obj((rng.choice(list(COLORS)), rng.choice(SHAPES)), (0.0, 1.0), sizes[0], rng)
        return Scene((obj,), caption_scene((obj,), "and"), "single")
    if num_objects == 2:
        pairing = list(rng.choice(training_pairings()))
        rng.shuffle(pairing)
        objects = tuple(_obj(o, x, s, rng) for o, x, s in zip(pairing, HALVES, sizes))
        form = rng.choice(list(CAPTION_FORMS))
        return Scene(objects, caption_scene(objects, form, swap=rng.random() < 0.5), form)
    pool = held_out_triples() if split == "test" else training_triples()
    triple = list(rng.choice(pool))
    rng.shuffle(triple)
    objects = tuple(_obj(o, x, s, rng) for o, x, s in zip(triple, THIRDS, sizes))
    form = rng.choice(list(TRIPLE_FORMS))
    return Scene(objects, caption_triple(objects, form, rng), form)


def train_batch(rng: random.Random, batch_size: int, size: int = RESOLUTION) -> tuple[np.ndarray, list[str], list[Scene]]:
    """(images uint8 (B, size, size, 3), captions, scenes) of training scenes."""
    scenes = [sample_scene(rng, split="train") for _ in range(batch_size)]
    images = np.stack([np.asarray(render_scene(s, size)) for s in scenes])
    return images, [s.caption for s in scenes], scenes


def triple_prompts(triples: Sequence[Triple], forms: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
    """One prompt per triple and form: ``{"prompt", "form", "objects": [{"color", "shape", "side"}]}``.

    The order of mention and the related pair are drawn from a generator seeded by the triple itself, so a
    triple's prompts never change. Side is "left"/"right" for the two objects a relation names, else None.
    """
    forms = forms or tuple(TRIPLE_FORMS)
    records = []
    for triple in triples:
        rng = random.Random(" ".join(f"{c} {s}" for c, s in triple))
        order = list(triple)
        rng.shuffle(order)
        a, b, c = (f"{col} {shape}" for col, shape in order)
        for form in forms:
            if form not in TRIPLE_FORMS:
                raise ValueError(f"unknown form {form!r}; choose one of {tuple(TRIPLE_FORMS)}")
            sides = ("left", "right", None) if form in ("left", "right") else (None, None, None)
            prompt = TRIPLE_FORMS[form].format(a=a, b=b, c=c, left=a, right=b)
            records.append(
                {
                    "prompt": prompt,
                    "form": form,
                    "objects": [
                        {"color": col, "shape": shape, "side": side} for (col, shape), side in zip(order, sides)
                    ],
                }
            )
    return records


def held_out_triple_prompts(forms: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
    return triple_prompts(held_out_triples(), forms)


def training_triple_prompts(forms: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
    """Prompts of triples the models were trained on: where settings are tuned."""
    return triple_prompts(training_triples(), forms)
