#!/usr/bin/env python
"""ReFL training data for the shapes world (the coarse stage of the paper's Tables 2 and 3).

Writes, into ``--out``:

* ``pairs/``: an imagefolder for ``L_pre`` (Eq. 5's pre-training loss, ``train_refl.py --train_data_dir``):
  ``pairs/images/000000.png ...`` (seeded TRAINING-split scenes rendered at ``--resolution``) and
  ``pairs/metadata.jsonl`` with ``{"file_name": "images/000000.png", "text": <caption>}`` per line.
* ``prompts.txt``: the reward prompts (``train_refl.py --prompts_file``), one per line, chosen by
  ``--reward_prompts``:

  - ``training`` (default): distinct captions of training-split scenes, two-object captions mostly
    (``--single_fraction`` of single objects). No prompt names a held-out pairing
    (``shapes.world.HELD_OUT_PAIRINGS``): this is asserted on the parsed prompt, so the held-out evaluation
    (``shapes-heldout``) measures composition that ReFL never saw either.
  - ``half-a``: every prompt of the held-out pairings' half A (``shapes.world.held_out_halves()[0]``, 12
    pairings x 4 caption forms x 2 orders = 96 prompts; ``--num_prompts`` does not apply): compositions the
    UNet never saw an image of and gets wrong most often, seen by the reward term as text only, as the paper's
    training prompts are. Half B must reach no ReFL run: :func:`check_not_half_b` is asserted on every prompt
    written (and again by ``coarse_stage.py`` on the prompts file right before each ``train_refl.py`` launch).

  ``L_pre``'s image-text pairs are training-split scenes either way.

Half A is split again, seeded (:data:`TUNING_SEED`), into a **tuning subset** of :data:`TUNING_PAIRINGS`
pairings, where a setting is chosen, and the rest, "half A minus tuning", the seen-as-text evaluation
(:func:`half_a_split`; the pairings are listed in docs/shapes_coarse_stage.md).

    python training/shapes/make_refl_data.py --out outputs/shapes-refl-data --num_images 512 --num_prompts 256
    python training/shapes/make_refl_data.py --out outputs/shapes-refl-data-half-a --reward_prompts half-a
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any

from realign_pipeline.shapes.metric import parse_shapes_prompt
from realign_pipeline.shapes.world import (
    HELD_OUT_PAIRINGS,
    held_out_halves,
    pairing_prompts,
    render_scene,
    sample_scene,
)

__all__ = [
    "REWARD_PROMPTS",
    "TUNING_PAIRINGS",
    "TUNING_SEED",
    "check_not_half_b",
    "check_not_held_out",
    "check_prompts_file",
    "half_a_split",
    "make_refl_data",
]

#: The choices of ``--reward_prompts``.
REWARD_PROMPTS = ("training", "half-a")
#: Half A's tuning subset: this many of its 12 pairings, drawn with ``random.Random(TUNING_SEED)`` (never redrawn).
TUNING_PAIRINGS = 6
TUNING_SEED = 0

Pairing = tuple[tuple[str, str], tuple[str, str]]


def check_not_held_out(prompt: str) -> None:
    """Raise ``AssertionError`` when `prompt` names a held-out pairing (in any caption form or order)."""
    objects = parse_shapes_prompt(prompt)
    if len(objects) == 2:
        a, b = ((o["color"], o["shape"]) for o in objects)
        pair = (a, b) if a <= b else (b, a)
        assert pair not in HELD_OUT_PAIRINGS, f"prompt {prompt!r} names a held-out pairing {pair}"


def _canonical(a: tuple[str, str], b: tuple[str, str]) -> Pairing:
    return (a, b) if a <= b else (b, a)


def check_not_half_b(prompt: str) -> None:
    """Raise ``AssertionError`` when `prompt` names a pairing of the held-out half B (any caption form or order).

    Strict: every two of the objects the prompt names are checked (so a three-object caption containing a
    half-B pairing fails too), and a prompt that is not a shapes-world caption fails, since it cannot be told
    apart from one that names half B in other words; as a second net, a prompt whose text contains both
    phrases of a half-B pairing ("blue circle" ... "purple triangle") fails whatever its form."""
    half_b = set(held_out_halves()[1])
    text = " ".join(str(prompt).lower().replace(",", " ").replace(".", " ").split())
    for a, b in half_b:
        assert not (f"{a[0]} {a[1]}" in text and f"{b[0]} {b[1]}" in text), (
            f"prompt {prompt!r} names the half-B pairing {(a, b)}")
    try:
        objects = parse_shapes_prompt(prompt)
    except ValueError:
        raise AssertionError(f"prompt {prompt!r} is not a shapes-world caption: cannot check it is not half B") from None
    named = [(o["color"], o["shape"]) for o in objects]
    for i, a in enumerate(named):
        for b in named[i + 1 :]:
            pair = _canonical(a, b)
            assert pair not in half_b, f"prompt {prompt!r} names the half-B pairing {pair}"


def check_prompts_file(path: str | Path) -> int:
    """:func:`check_not_half_b` on every prompt of a ``train_refl.py --prompts_file`` (a text file, one per line,
    or ``.jsonl`` with a ``"text"`` field, as the script reads them); returns how many were checked."""
    path = Path(path)
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    prompts = [json.loads(line)["text"] for line in lines] if path.suffix == ".jsonl" else lines
    for prompt in prompts:
        check_not_half_b(prompt)
    return len(prompts)


def half_a_split() -> tuple[list[Pairing], list[Pairing]]:
    """Half A of the held-out pairings as ``(tuning, rest)``: :data:`TUNING_PAIRINGS` of its pairings drawn with
    ``random.Random(TUNING_SEED)`` (where a setting is chosen) and the others ("half A minus tuning", the
    seen-as-text evaluation), each sorted."""
    half_a = held_out_halves()[0]
    tuning = sorted(random.Random(TUNING_SEED).sample(half_a, TUNING_PAIRINGS))
    return tuning, [p for p in half_a if p not in tuning]


def make_refl_data(
    out: str | Path,
    num_images: int = 512,
    num_prompts: int = 256,
    resolution: int = 32,
    seed: int = 0,
    single_fraction: float = 0.1,
    reward_prompts: str = "training",
) -> dict[str, Any]:
    """Write the L_pre imagefolder and the reward prompts into `out` (layout: the module docstring).

    Deterministic in `seed`; an existing complete output with the same settings is kept as is. With
    `reward_prompts` ``"half-a"`` the prompts are every half-A prompt and `num_prompts` is their count (96).

    Returns:
        ``{"pairs": <imagefolder>, "prompts_file": <path>, "num_images", "num_prompts", "reward_prompts",
        "skipped"}``.
    """
    if num_images < 1 or num_prompts < 1:
        raise ValueError("num_images and num_prompts must be at least 1")
    if not 0.0 <= single_fraction < 1.0:
        raise ValueError("single_fraction must be in [0, 1)")
    if reward_prompts not in REWARD_PROMPTS:
        raise ValueError(f"reward_prompts must be one of {REWARD_PROMPTS}, not {reward_prompts!r}")
    half_a = [r["prompt"] for r in pairing_prompts(held_out_halves()[0])] if reward_prompts == "half-a" else None
    if half_a is not None:
        num_prompts = len(half_a)
    out = Path(out)
    pairs, prompts_file, stamp = out / "pairs", out / "prompts.txt", out / "settings.json"
    settings = {"num_images": num_images, "num_prompts": num_prompts, "resolution": resolution, "seed": seed,
                "single_fraction": single_fraction}
    if half_a is not None:  # the training default keeps its settings (and earlier outputs) as they were
        settings["reward_prompts"] = reward_prompts
    result = {"pairs": str(pairs), "prompts_file": str(prompts_file), "num_images": num_images,
              "num_prompts": num_prompts, "reward_prompts": reward_prompts}
    if stamp.is_file() and json.loads(stamp.read_text(encoding="utf-8")) == settings and prompts_file.is_file():
        return {**result, "skipped": True}

    (pairs / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    lines = []
    for i in range(num_images):
        scene = sample_scene(rng, split="train")
        check_not_held_out(scene.caption)
        name = f"images/{i:06d}.png"
        render_scene(scene, resolution).save(pairs / name)
        lines.append(json.dumps({"file_name": name, "text": scene.caption}))
    (pairs / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")

    prompts: list[str] = []
    if half_a is not None:
        for prompt in half_a:
            check_not_half_b(prompt)
            prompts.append(prompt)
    prompt_rng = random.Random(seed + 1)
    seen: set[str] = set()
    tries = 0
    while len(prompts) < num_prompts:
        tries += 1
        if tries > 100 * num_prompts:
            raise ValueError(f"could not draw {num_prompts} distinct training prompts; ask for fewer")
        single = prompt_rng.random() < single_fraction
        caption = sample_scene(prompt_rng, split="train", num_objects=1 if single else 2).caption
        if caption in seen:
            continue
        check_not_held_out(caption)
        check_not_half_b(caption)
        seen.add(caption)
        prompts.append(caption)
    prompts_file.write_text("\n".join(prompts) + "\n", encoding="utf-8")
    stamp.write_text(json.dumps(settings) + "\n", encoding="utf-8")
    return {**result, "skipped": False}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="ReFL data for the shapes world (L_pre pairs + reward prompts).")
    parser.add_argument("--out", required=True)
    parser.add_argument("--num_images", type=int, default=512)
    parser.add_argument("--num_prompts", type=int, default=256)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--single_fraction", type=float, default=0.1)
    parser.add_argument("--reward_prompts", choices=REWARD_PROMPTS, default="training",
                        help="training: training-split captions; half-a: every prompt of the held-out "
                        "pairings' half A (half B is asserted absent)")
    args = parser.parse_args(argv)
    result = make_refl_data(args.out, args.num_images, args.num_prompts, args.resolution, args.seed,
                            args.single_fraction, args.reward_prompts)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
