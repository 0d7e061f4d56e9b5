"""Why the fine stage breaks three-object images: what the captions say, and how fragile the images are.

    python training/shapes/fine_stage_diagnosis.py --out docs/shapes_triples_fine_stage_diagnosis.json

On the three-object world the fine stage broke 37 of 97 right bindings and its placebo 45
(docs/shapes_triples_fine_stage_rates.json). This measures why, on **training-triple** prompts (a seeded subset,
seeds 0-1; never the held-out ones), from each image's own coarse pass:

1. What the dense caption tells the fine pass. For each captioned region, the object the checker finds under
   the region's mask (the detection nearest to the mask's centre of mass): whether it has the region's shape
   (the region is on its target), and whether its colour is already the region's (the region asks for no
   change) or not (it asks for a recolouring); per image, whether every prompted object got a region on its
   target. Counted apart on coarse-right and coarse-wrong images.
2. Controls and doses, each a second pass from the same noise with the captioned layouts, read by the checker
   against the coarse image (fixed / broken, with pairing-clustered CIs): modulation strength 0 (must give the
   coarse image back: the second pass itself disturbs nothing), the paper's setting (the fine stage), half and
   a quarter of its strength, the paper's setting on the 12x12 attention level only (the 6x6 and 3x3 levels
   are where three objects of 3-4 latent pixels share cells), and the placebo (phrases rotated between
   regions).
3. A reference for fragility, without any layout: the plain pass again with the guidance scale raised by 5%
   (4.0 -> 4.2). If a perturbation that carries no information breaks right bindings about as often as the
   fine stage does, a second pass cannot keep the break rate under 3% in this world by being well aimed.

Breaks are split into a lost object (presence 1 -> 0) and a recoloured one (presence kept, binding 1 -> 0).
Beside them, whether the coarse grids put two objects in one cell (:func:`shared_cells`, on rendered scenes).
"""

from __future__ import annotations

import argparse
import contextlib
import random
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from ablation import GENERATION, load_pipeline, paired_rates, pairing_key, write_json
from fine_stage_rates import generators, placebo_layout, read
from layout_diagnosis import modulated_levels

from realign_pipeline import Region
from realign_pipeline.shapes import triples
from realign_pipeline.shapes.checker import detect
from realign_pipeline.shapes.world import COLORS, SHAPES, render_scene

PAPER: dict[str, float] = {"cross_attention_strength": 1.0, "self_attention_strength": 0.0,
                           "modulation_fraction": 0.3, "timestep_power": 5.0}
#: name -> (pipeline arguments of the second pass, attention grid sides it modulates (None: all), layout kind)
VARIANTS: dict[str, tuple[dict[str, float], tuple[int, ...] | None, str]] = {
    "strength 0 (control)": ({**PAPER, "cross_attention_strength": 0.0}, None, "captioned"),
    "paper (the fine stage)": (PAPER, None, "captioned"),
    "half strength": ({**PAPER, "cross_attention_strength": 0.5}, None, "captioned"),
    "quarter strength": ({**PAPER, "cross_attention_strength": 0.25}, None, "captioned"),
    "paper, 12x12 level only": (PAPER, (12,), "captioned"),
    "placebo (phrases rotated)": (PAPER, None, "placebo"),
    "no layout, guidance +5%": ({"guidance_scale": GENERATION["guidance_scale"] * 1.05}, None, "none"),
}
METRICS = ("binding", "presence")


def phrase_object(phrase: str | None) -> dict[str, str | None]:
    """The colour and shape a local phrase names ("purple circle" -> purple, circle); None where it names none."""
    words = (phrase or "").lower().split()
    return {"color": next((w for w in words if w in COLORS), None), "shape": next((w for w in words if w in SHAPES), None)}


def region_audit(layout, image, objects: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """What each captioned region asks of the fine pass, judged against the checker's reading of `image`."""
    detected = detect(image)
    size = np.asarray(image).shape[0]
    regions = []
    for region in layout.regions:
        mask = np.asarray(region.mask_at(size, size), dtype=np.float64)
        wanted = phrase_object(region.phrase)
        entry = {"phrase": region.phrase, "score": float(region.score), "on_target": False, "recolour": None}
        if mask.sum() > 0 and detected:
            ys, xs = np.nonzero(mask)
            weights = mask[ys, xs]
            cy, cx = (np.average(ys, weights=weights) + 0.5) / size, (np.average(xs, weights=weights) + 0.5) / size
            under = min(detected, key=lambda d: (d["cx"] - cx) ** 2 + (d["cy"] - cy) ** 2)
            entry["on_target"] = under["shape"] == wanted["shape"]
            entry["recolour"] = under["color"] != wanted["color"]
        regions.append(entry)
    covered = {phrase_object(r["phrase"])["shape"] for r in regions if r["on_target"]}
    return {"regions": regions, "complete": all(o["shape"] in covered for o in objects)}


def audit_summary(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Region and image counts of :func:`region_audit`, on coarse-right and coarse-wrong images apart."""
    out = {}
    for name, wanted in (("coarse right", 1.0), ("coarse wrong", 0.0)):
        chosen = [r for r in rows if r["coarse"]["binding"] == wanted]
        regions = [g for r in chosen for g in r["audit"]["regions"]]
        on_target = [g for g in regions if g["on_target"]]
        out[name] = {
            "images": len(chosen),
            "regions per image": round(len(regions) / max(len(chosen), 1), 3),
            "images with a region on every prompted object": sum(r["audit"]["complete"] for r in chosen),
            "regions": len(regions),
            "regions on their target": len(on_target),
            "regions on target asking a recolouring": sum(bool(g["recolour"]) for g in on_target),
            "regions on target asking no change": sum(g["recolour"] is False for g in on_target),
            "scores": {str(s): sum(g["score"] == s for g in regions) for s in sorted({g["score"] for g in regions})},
        }
    return out


def shared_cells(num_scenes: int = 200, seed: int = 0, size: int = triples.RESOLUTION) -> dict[str, float]:
    """Per attention grid of a 12x12 latent (12, 6, 3 cells a side), the mean share of a region's cells that
    another region also covers, with each object's exact mask, on held-out-triple scenes as the world renders
    them: whether the coarse grids put two regions in one cell."""
    rng = random.Random(seed)
    latent = size // 4
    shares: dict[str, list[float]] = {f"{latent // f}x{latent // f}": [] for f in (1, 2, 4)}
    for _ in range(num_scenes):
        scene = triples.sample_scene(rng, num_objects=3, split="test")
        masks = []
        for obj in scene.objects:
            alone = np.asarray(render_scene((obj,), size=size).convert("RGB"), dtype=np.float64)
            masks.append((np.abs(alone - alone[0, 0]).sum(-1) > 30).astype(np.float32))
        for name, values in shares.items():
            side = int(name.split("x")[0])
            covered = np.stack([np.asarray(Region(obj.phrase, mask=m).mask_at(side, side)) > 0
                                for obj, m in zip(scene.objects, masks)])
            shared = covered.sum(0) >= 2
            values.append(float(np.mean([shared[c].mean() for c in covered])))
    return {name: round(float(np.mean(v)), 4) for name, v in shares.items()}


def coarse_and_captions(pipe, jobs, batch_size: int, generation: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        out = pipe([r["prompt"] for r, _ in chunk], realign=True, generator=generators([s for _, s in chunk]),
                   **generation)
        for i, (record, seed) in enumerate(chunk):
            coarse = out.coarse_images[i]
            rows.append({
                "prompt": record["prompt"], "seed": seed, "objects": record["objects"],
                "pairing": pairing_key(record["objects"]), "realigned": bool(out.realigned[i]),
                "layout": out.layouts[i] if out.realigned[i] else None,
                "coarse_pixels": np.asarray(coarse, dtype=np.int16),
                "coarse": read(coarse, record["objects"]), "realign": read(out.images[i], record["objects"]),
                "audit": region_audit(out.layouts[i], coarse, record["objects"]) if out.realigned[i] else None,
            })
    return rows


def second_pass(pipe, rows, variant: tuple[dict[str, float], tuple[int, ...] | None, str], batch_size: int,
                generation: dict[str, Any]) -> tuple[list[dict[str, Any]], int]:
    """Read-outs of one variant on every row, and how many images came out pixel-identical to the coarse one."""
    setting, sides, kind = variant
    reads, identical = [], 0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        kwargs = {**generation, **setting}
        if kind != "none":
            side = generation["height"]
            kwargs["layout"] = [placebo_layout(r["layout"], side) if kind == "placebo" else r["layout"] for r in chunk]
        with modulated_levels(sides) if sides is not None else contextlib.nullcontext():
            images = pipe([r["prompt"] for r in chunk], generator=generators([r["seed"] for r in chunk]),
                          **kwargs).images
        for row, image in zip(chunk, images):
            reads.append(read(image, row["objects"]))
            identical += int(np.array_equal(np.asarray(image, dtype=np.int16), row["coarse_pixels"]))
    return reads, identical


def compare(rows, reads) -> dict[str, Any]:
    groups = [r["pairing"] for r in rows]
    result = {m: {k: v for k, v in paired_rates([r["coarse"][m] for r in rows], [x[m] for x in reads], groups).items()
                  if k != "per_group"}
              for m in METRICS}
    right = [i for i, r in enumerate(rows) if r["coarse"]["binding"] == 1]
    result["broken binding: object lost"] = sum(reads[i]["presence"] == 0 for i in right if reads[i]["binding"] == 0)
    result["broken binding: object kept, recoloured"] = sum(
        reads[i]["presence"] == 1 for i in right if reads[i]["binding"] == 0)
    return result


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="the JSON file to write")
    parser.add_argument("--model", default="shapes-triples", help="a three-object pipeline (default: shapes-triples)")
    parser.add_argument("--limit", type=int, default=96, help="a seeded subset of this many training-triple prompts")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--correct_relations", action="store_true",
                        help="the captioner corrects violated relations (off, as in the measured fine-stage rates)")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--quick", action="store_true", help="4 prompts, 1 seed, 2 steps")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    generation = {**GENERATION, "height": triples.RESOLUTION, "width": triples.RESOLUTION}
    if args.quick:
        args.limit, args.seeds, generation["num_inference_steps"] = 4, [0], 2
    records = triples.training_triple_prompts()
    records = random.Random(0).sample(records, min(args.limit, len(records)))
    pipe = load_pipeline(args.model, need_captioner=True)
    pipe.dense_captioner.correct_relations = args.correct_relations
    start = time.time()
    rows = coarse_and_captions(pipe, [(r, s) for r in records for s in args.seeds], args.batch_size, generation)
    realigned = [r for r in rows if r["realigned"]]
    result: dict[str, Any] = {
        "protocol": __doc__.split("\n\n", 2)[2].strip(), "model": args.model, "prompts": "training triples",
        "num_prompts": len(records), "seeds": args.seeds, "generation": generation,
        "correct_relations": args.correct_relations, "images": len(rows),
        "realigned": len(realigned), "captions": audit_summary(realigned),
        "realign=True against its coarse pass": compare(realigned, [r["realign"] for r in realigned]),
        "shared cells": shared_cells(20 if args.quick else 200),
        "variants": {},
    }
    print(result["captions"], flush=True)
    for name, variant in VARIANTS.items():
        reads, identical = second_pass(pipe, realigned, variant, args.batch_size, generation)
        entry = {"setting": variant[0], "levels": "every level" if variant[1] is None else variant[1],
                 "layout": variant[2], "pixel-identical to the coarse image": identical, **compare(realigned, reads)}
        result["variants"][name] = entry
        print(name, {m: (entry[m]["fixed"], entry[m]["broken"]) for m in METRICS}, f"identical {identical}", flush=True)
    result["wall_s"] = round(time.time() - start, 1)
    print(f"wrote {write_json(args.out, result)} in {result['wall_s']} s", flush=True)
    return result


if __name__ == "__main__":
    main()
