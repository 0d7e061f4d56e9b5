#!/usr/bin/env python
"""ReFL training data for the shapes world (the coarse stage of the paper's Tables 2 and 3).

Writes, into ``--out``:

* ``pairs/``: an imagefolder for ``L_pre`` (Eq. 5's pre-training loss, ``train_refl.py --train_data_dir``):
  ``pairs/images/000000.png ...`` (seeded TRAINING-split scenes rendered at ``--resolution``) and
  ``pairs/metadata.jsonl`` with ``{"file_name": "images/000000.png", "text": <caption>}`` per line.
* ``prompts.txt``: the reward prompts (``train_refl.py --prompts_file``), one per line: distinct captions of
  training-split scenes, two-object captions mostly (``--single_fraction`` of single objects). No prompt
  names a held-out pairing (``shapes.world.HELD_OUT_PAIRINGS``): this is asserted on the parsed prompt, so
  the held-out evaluation (``shapes-heldout``) measures composition that ReFL never saw either.

    python training/shapes/make_refl_data.py --out outputs/shapes-refl-data --num_images 512 --num_prompts 256
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any

from realign_pipeline.shapes.metric import parse_shapes_prompt
from realign_pipeline.shapes.world import HELD_OUT_PAIRINGS, render_scene, sample_scene

__all__ = ["check_not_held_out", "make_refl_data"]


def check_not_held_out(prompt: str) -> None:
    """Raise ``AssertionError`` when `prompt` names a held-out pairing (in any caption form or order)."""
    objects = parse_shapes_prompt(prompt)
    if len(objects) == 2:
        a, b = ((o["color"], o["shape"]) for o in objects)
        pair = (a, b) if a <= b else (b, a)
        assert pair not in HELD_OUT_PAIRINGS, f"prompt {prompt!r} names a held-out pairing {pair}"


def make_refl_data(
    out: str | Path,
    num_images: int = 512,
    num_prompts: int = 256,
    resolution: int = 32,
    seed: int = 0,
    single_fraction: float = 0.1,
) -> dict[str, Any]:
    """Write the L_pre imagefolder and the reward prompts into `out` (layout: the module docstring).

    Deterministic in `seed`; an existing complete output with the same settings is kept as is.

    Returns:
        ``{"pairs": <imagefolder>, "prompts_file": <path>, "num_images", "num_prompts", "skipped"}``.
    """
    if num_images < 1 or num_prompts < 1:
        raise ValueError("num_images and num_prompts must be at least 1")
    if not 0.0 <= single_fraction < 1.0:
        raise ValueError("single_fraction must be in [0, 1)")
    out = Path(out)
    pairs, prompts_file, stamp = out / "pairs", out / "prompts.txt", out / "settings.json"
    settings = {"num_images": num_images, "num_prompts": num_prompts, "resolution": resolution, "seed": seed,
                "single_fraction": single_fraction}
    result = {"pairs": str(pairs), "prompts_file": str(prompts_file), "num_images": num_images,
              "num_prompts": num_prompts}
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

    prompt_rng = random.Random(seed + 1)
    prompts: list[str] = []
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
    args = parser.parse_args(argv)
    result = make_refl_data(args.out, args.num_images, args.num_prompts, args.resolution, args.seed,
                            args.single_fraction)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
