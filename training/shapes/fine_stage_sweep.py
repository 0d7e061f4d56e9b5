"""How the fine stage's settings change alignment on the shapes world (an ablation for docs/shapes_evaluation.md).

    python training/shapes/fine_stage_sweep.py --out outputs/shapes-fine-sweep.json [--limit 48] [--seeds 0 1]

For each held-out prompt and seed: one coarse pass and one dense caption (the same layout for every setting),
then the fine pass with each setting from the same noise. Reports, per setting, the checker's presence /
binding / position on the fine images, and paired against the coarse image: how many images were fixed
(binding 0 -> 1) and broken (1 -> 0), and the mean absolute pixel change.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from ablation import GENERATION, add_job_arguments, fixed_and_broken, heldout_jobs, pixel_changes, summary

from realign_pipeline.shapes.checker import check_prompt
from realign_pipeline.shapes.metric import parse_shapes_prompt
from realign_pipeline.shapes.pretrained import load_shapes_pipeline

SETTINGS = {
    "paper defaults (cross 1.0, first 30% of steps, l_t=(t/T)^5)": {},
    "cross 0.5": {"cross_attention_strength": 0.5},
    "cross 2.0": {"cross_attention_strength": 2.0},
    "cross 1.0 + self 1.0": {"self_attention_strength": 1.0},
    "cross 1.0, all steps": {"modulation_fraction": 1.0},
    "cross 1.0, l_t=(t/T)^1": {"timestep_power": 1.0},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    add_job_arguments(parser)
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.time()
    pipe = load_shapes_pipeline()
    pipe.set_progress_bar_config(disable=True)
    jobs = heldout_jobs(args.limit, args.seeds)
    coarse_rows, layouts, coarse_images = [], [], []
    for prompt, seed in jobs:
        out = pipe(prompt, realign=True, generator=torch.Generator().manual_seed(seed), **GENERATION)
        coarse_images.append(out.coarse_images[0])
        layouts.append(out.layouts[0] if out.realigned[0] else None)
        coarse_rows.append(check_prompt(out.coarse_images[0], parse_shapes_prompt(prompt)))

    result = {"prompts": len({prompt for prompt, _ in jobs}), "seeds": args.seeds, "images": len(jobs),
              "captioned": sum(layout is not None for layout in layouts), "coarse": summary(coarse_rows),
              "settings": {}}
    for name, kwargs in SETTINGS.items():
        rows, images = [], []
        for (prompt, seed), layout, coarse in zip(jobs, layouts, coarse_images):
            if layout is None:
                image = coarse
            else:
                image = pipe(prompt, layout=layout, generator=torch.Generator().manual_seed(seed), **GENERATION,
                             **kwargs).images[0]
            images.append(image)
            rows.append(check_prompt(image, parse_shapes_prompt(prompt)))
        fixed, broken = fixed_and_broken([c["binding"] for c in coarse_rows], [r["binding"] for r in rows])
        result["settings"][name] = {**summary(rows), "kwargs": kwargs, "fixed": fixed, "broken": broken,
                                    "mean_abs_pixel_change": round(float(np.mean(pixel_changes(coarse_images, images))), 2)}
        print(name, result["settings"][name], flush=True)
    result["wall_s"] = round(time.time() - start, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "settings"}, indent=2))


if __name__ == "__main__":
    main()
