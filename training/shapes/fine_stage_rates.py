"""The fine stage against each image's own coarse pass, beside a placebo: fix and break rates.

    python training/shapes/fine_stage_rates.py --out docs/shapes_fine_stage_rates.json [--model shapes-bow] \
        [--splits half-b held-out hard]
    python training/shapes/fine_stage_rates.py --out docs/shapes_triples_fine_stage_rates.json \
        --model shapes-triples --splits held-out half-b
    python training/shapes/fine_stage_rates.py --out docs/shapes_relation_correction.json --correct_relations \
        --forms left right --splits held-out
    python training/shapes/fine_stage_rates.py --out docs/shapes_relation_correction_tuned.json --correct_relations \
        --forms left right --splits held-out --setting '{"cross_attention_strength": 1.0, \
        "modulation_fraction": 0.3, "timestep_power": 1.0, "self_attention_strength": 0.3}'

For every (prompt, seed): the coarse image, the dense caption and the fine image of ``realign=True``, and a
**placebo**: the same fine pass from the same noise with the phrases of the captioned layout exchanged between
its regions (a one-region layout: its mask mirrored into the other half). A wrong coarse image sits on an edge,
so any perturbation flips it more easily than a right one; the placebo's fix and break rates are that floor,
and the method's effect is its rates against the placebo's, paired on the same images.

The protocol, fixed before any result was seen:

- Read-outs: the independent checker's binding, presence and position (position on the prompts that name a
  side), on the coarse, fine and placebo images.
- For the fine stage and the placebo against the coarse image: fix rate (wrong -> right among coarse-wrong
  images), break rate (right -> wrong among coarse-right ones), net change, each with a 95% bootstrap CI
  clustered by pairing; and the fine stage minus the placebo, paired, for the fix and the break rate.
- Splits: ``half-b`` (the held-out pairings' half B, all forms, seeds 0-2), ``held-out`` (all 24 held-out
  pairings, seeds 0-2), ``hard`` (held-out prompts whose plain image binds wrong on at least 3 of seeds 0-9,
  scored on seeds 100-109, so that selection does not regress to the mean).
- The three-object world (``--model shapes-triples``, 48 px): its held-out triples (those containing a held-out
  pairing) in all four forms, **seed 0 only** (480 prompts already; the CPU budget), half B the triples whose
  held-out pairings all lie in half B; ``hard``: the held-out "and" prompts selected on seeds 0-9 as above,
  scored on seeds 100-109. Bootstraps cluster by triple.
- ``tuning``: where fine-stage settings are chosen, never the held-out prompts: a seeded subset of 96 training
  prompts (pairings or triples), seeds 0-1 (``fine_stage_diagnosis.py``'s images).
- The three-object world's fine-stage setting (after the diagnosis found the breaks on the 6x6 and 3x3 grids):
  ``modulated_downsampling [1]`` with cross-attention strength 1, 2 or 4, each on ``tuning`` with its placebo;
  chosen: the highest fix rate minus the placebo's among settings whose binding and presence break rates are
  under 3% (ties: the lower strength); then ``held-out`` and ``half-b`` once with it.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from ablation import GENERATION, load_pipeline, paired_rates, pairing_key, write_json

from realign_pipeline import Layout, Region
from realign_pipeline.shapes import triples
from realign_pipeline.shapes.checker import check_prompt
from realign_pipeline.shapes.world import (
    held_out_halves,
    held_out_prompts,
    pairing_prompts,
    training_pairing_prompts,
)

SPLITS = ("half-b", "held-out", "hard", "tuning")
#: The tuning split: a seeded subset of this many training prompts (the diagnosis's), seeds 0-1.
TUNING_PROMPTS = 96
TUNING_SEEDS = [0, 1]
EVALUATION_SEEDS = [0, 1, 2]
TRIPLE_EVALUATION_SEEDS = [0]
SELECTION_SEEDS = list(range(10))
HARD_SEEDS = list(range(100, 110))
#: A prompt is hard when its plain image binds wrong on at least this many of the selection seeds.
HARD_MIN_WRONG = 3
METRICS = ("binding", "presence", "position")


def placebo_layout(layout: Layout | Any, size: int = 32) -> Layout:
    """The captioned layout with its phrases exchanged between its regions (rotated by one), or, with a single
    region, that region's mask mirrored left to right: the same amount of modulation, aimed wrong. A region
    given by a box alone is rasterised at `size` (the world's image side)."""
    regions = list(layout.regions)
    masks = [_mask(r, size) for r in regions]
    if len(regions) == 1:
        masks = [masks[0][:, ::-1].copy()]
        phrases = [regions[0].phrase]
    else:
        phrases = [r.phrase for r in regions[1:] + regions[:1]]
    return Layout([Region(p, mask=m, score=r.score, tag=r.tag) for p, m, r in zip(phrases, masks, regions)])


def _mask(region: Region, size: int) -> np.ndarray:
    """The region's mask at its own size (a box-only region: its coverage of a `size` x `size` grid)."""
    height, width = np.asarray(region.mask).shape[-2:] if region.mask is not None else (size, size)
    return np.asarray(region.mask_at(height, width), dtype=np.float32)


def read(image, objects: Sequence[dict[str, Any]]) -> dict[str, float | None]:
    checked = check_prompt(image, list(objects))
    return {"binding": checked["binding"], "presence": checked["presence"], "position": checked["position"]}


def generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per image, seeded with its seed (the images of a batch as they would be alone)."""
    return [torch.Generator().manual_seed(s) for s in seeds]


def run_jobs(pipe, jobs: Sequence[tuple[dict[str, Any], int]], batch_size: int,
             generation: dict[str, Any]) -> list[dict[str, Any]]:
    """Coarse, fine and placebo read-outs of each (record, seed)."""
    rows = []
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        prompts = [r["prompt"] for r, _ in chunk]
        seeds = [s for _, s in chunk]
        out = pipe(prompts, realign=True, generator=generators(seeds), **generation)
        placebo_images = list(out.coarse_images)
        side = generation.get("height", 32)
        layouts = [placebo_layout(out.layouts[i], side) if out.realigned[i] else None for i in range(len(chunk))]
        if any(layout is not None for layout in layouts):
            placebo = pipe(prompts, layout=layouts, generator=generators(seeds), **generation)
            placebo_images = [placebo.images[i] if layouts[i] is not None else out.coarse_images[i]
                              for i in range(len(chunk))]
        for i, (record, seed) in enumerate(chunk):
            rows.append({
                "prompt": record["prompt"], "seed": seed, "pairing": pairing_key(record["objects"]),
                "realigned": bool(out.realigned[i]),
                "coarse": read(out.coarse_images[i], record["objects"]),
                "fine": read(out.images[i], record["objects"]),
                "placebo": read(placebo_images[i], record["objects"]),
            })
    return rows


def rates(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per metric: fine and placebo against the coarse image, and fine minus placebo on the same images (their
    ``difference``: fix rate minus the placebo's among coarse-wrong images, break rate minus the placebo's among
    coarse-right ones)."""
    result = {}
    for metric in METRICS:
        kept = [r for r in rows if r["coarse"][metric] is not None]
        if not kept:
            continue
        groups = [r["pairing"] for r in kept]
        coarse = [r["coarse"][metric] for r in kept]
        fine = [r["fine"][metric] for r in kept]
        placebo = [r["placebo"][metric] for r in kept]
        wrong = [i for i, c in enumerate(coarse) if c == 0]
        right = [i for i, c in enumerate(coarse) if c == 1]
        result[metric] = {
            "fine": paired_rates(coarse, fine, groups),
            "placebo": paired_rates(coarse, placebo, groups),
            # fix rate of the fine stage minus the placebo's, on the coarse-wrong images (the same images)
            "fix_rate_minus_placebo": paired_rates([placebo[i] for i in wrong], [fine[i] for i in wrong],
                                                   [groups[i] for i in wrong]) if wrong else None,
            # break rate of the fine stage minus the placebo's, on the coarse-right images
            "break_rate_minus_placebo": paired_rates([1 - placebo[i] for i in right], [1 - fine[i] for i in right],
                                                     [groups[i] for i in right]) if right else None,
        }
    return result


def split_records(split: str, scene_kind: str = "pairs") -> list[dict[str, Any]]:
    if split == "tuning":
        pool = triples.training_triple_prompts() if scene_kind == "triples" else training_pairing_prompts()
        return random.Random(0).sample(pool, min(TUNING_PROMPTS, len(pool)))
    if scene_kind == "triples":
        if split == "half-b":
            return triples.triple_prompts(triples.triple_halves()[1])
        return triples.held_out_triple_prompts(("and",) if split == "hard" else None)
    if split == "half-b":
        return pairing_prompts(held_out_halves()[1])
    return held_out_prompts()


def hard_records(pipe, records: list[dict[str, Any]], seeds: Sequence[int], batch_size: int,
                 generation: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Held-out records whose plain image binds wrong on at least :data:`HARD_MIN_WRONG` of `seeds`."""
    jobs = [(r, s) for r in records for s in seeds]
    wrong: dict[str, int] = {r["prompt"]: 0 for r in records}
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        images = pipe([r["prompt"] for r, _ in chunk], generator=[torch.Generator().manual_seed(s) for _, s in chunk],
                      **generation).images
        for (record, _), image in zip(chunk, images):
            wrong[record["prompt"]] += int(check_prompt(image, record["objects"])["binding"] == 0)
    minimum = min(HARD_MIN_WRONG, len(seeds))
    return [r for r in records if wrong[r["prompt"]] >= minimum], wrong


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="the JSON file to write")
    parser.add_argument("--model", default=None,
                        help="shapes (default), shapes-bow, or a RealignDiffPipeline folder")
    parser.add_argument("--splits", nargs="+", choices=SPLITS, default=["held-out", "half-b", "hard"],
                        help="in this order, half B is read from the held-out images when both are asked for")
    parser.add_argument("--scene_kind", choices=("pairs", "triples"), default=None,
                        help="the world's scenes (default: triples for shapes-triples, else pairs)")
    parser.add_argument("--correct_relations", action="store_true",
                        help="the dense captioner corrects layouts that violate the prompt's relation (beyond the paper)")
    parser.add_argument("--setting", default=None,
                        help="a JSON object of modulation arguments for the fine pass (default: the pipeline's, the "
                        "paper's), e.g. the layout-control setting of docs/shapes_layout_sweep.json")
    parser.add_argument("--forms", nargs="+", default=None, choices=("and", "with", "left", "right"),
                        help="only prompts of these caption forms (e.g. left right for relation correction)")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--quick", action="store_true",
                        help="a reduced run: 4 prompts per split, 1 seed (hard: 2 selection seeds), 2 steps")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    generation = dict(GENERATION)
    seeds, selection, hard_seeds, limit = EVALUATION_SEEDS, SELECTION_SEEDS, HARD_SEEDS, None
    scene_kind = args.scene_kind or ("triples" if args.model == "shapes-triples" else "pairs")
    if scene_kind == "triples":
        generation.update(height=triples.RESOLUTION, width=triples.RESOLUTION)
        seeds = TRIPLE_EVALUATION_SEEDS
    if args.quick:
        generation["num_inference_steps"] = 2
        seeds, selection, hard_seeds, limit = [0], [0, 1], [100], 4
    pipe = load_pipeline(args.model, need_captioner=True)
    pipe.dense_captioner.correct_relations = args.correct_relations
    setting = json.loads(args.setting) if args.setting else {}
    generation.update(setting)
    result: dict[str, Any] = {
        "protocol": __doc__.split("The protocol, fixed before any result was seen:")[1].strip(),
        "model": args.model or "shapes", "scene_kind": scene_kind, "generation": generation,
        "correct_relations": args.correct_relations, "forms": args.forms, "setting": setting, "splits": {},
    }
    for split in args.splits:
        start = time.time()
        records = [r for r in split_records(split, scene_kind) if args.forms is None or r["form"] in args.forms]
        entry: dict[str, Any] = {}
        if split == "hard":
            selected, wrong = hard_records(pipe, records[:limit] if limit else records, selection, args.batch_size,
                                           generation)
            entry.update(selection_seeds=selection, wrong_counts=wrong, min_wrong=min(HARD_MIN_WRONG, len(selection)))
            records, split_seeds = selected, hard_seeds
        else:
            records, split_seeds = (records[:limit] if limit else records), seeds
            if split == "tuning" and not args.quick:
                split_seeds = TUNING_SEEDS
        held_out = result["splits"].get("held-out")
        prompts = {r["prompt"] for r in records}
        if (split == "half-b" and held_out is not None and held_out["seeds"] == split_seeds
                and prompts <= {row["prompt"] for row in held_out["rows"]}):
            # half B's images are among the held-out ones (same prompts, same seeds): read them from there
            rows = [row for row in held_out["rows"] if row["prompt"] in prompts]
        else:
            rows = run_jobs(pipe, [(r, s) for r in records for s in split_seeds], args.batch_size, generation)
        entry.update(num_prompts=len(records), seeds=split_seeds, images=len(rows),
                     realigned=sum(r["realigned"] for r in rows), rates=rates(rows), rows=rows,
                     wall_s=round(time.time() - start, 1))
        result["splits"][split] = entry
        print(f"{split}: {len(rows)} images in {entry['wall_s']} s", flush=True)
    print(f"wrote {write_json(args.out, result)}", flush=True)
    return result


if __name__ == "__main__":
    main()
