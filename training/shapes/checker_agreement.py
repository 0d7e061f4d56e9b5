"""Do the checker and the segmenter agree on generated images? (docs/shapes.md, "How far to trust the checker")

    python training/shapes/checker_agreement.py --out docs/shapes_checker_agreement.json [--limit 48] [--seeds 0 1]

Both read the plain pipeline's images of held-out prompts; per image, each says whether every coloured object
of the prompt is there (binding). Where they disagree one of them is wrong; the cases are listed with what each
saw, so they can be looked at.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from ablation import GENERATION, add_job_arguments, heldout_jobs

from realign_pipeline.shapes.checker import check_prompt
from realign_pipeline.shapes.metric import parse_shapes_prompt
from realign_pipeline.shapes.perception import segment_objects
from realign_pipeline.shapes.pretrained import load_shapes_pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    add_job_arguments(parser)
    args = parser.parse_args()
    torch.set_num_threads(1)
    pipe = load_shapes_pipeline()
    pipe.set_progress_bar_config(disable=True)
    jobs = heldout_jobs(args.limit, args.seeds)
    images = pipe([p for p, _ in jobs], **GENERATION,
                  generator=[torch.Generator().manual_seed(s) for _, s in jobs]).images
    counts = {"images": len(jobs), "checker_binding": 0, "segmenter_binding": 0, "agree": 0,
              "only_checker_fails": 0, "only_segmenter_fails": 0}
    cases = []
    for (prompt, seed), image in zip(jobs, images):
        objects = parse_shapes_prompt(prompt)
        checked = check_prompt(image, objects)
        found = {(f.color, f.shape) for f in segment_objects(image)}
        segmenter = float(all((o["color"], o["shape"]) in found for o in objects))
        counts["checker_binding"] += checked["binding"]
        counts["segmenter_binding"] += segmenter
        counts["agree"] += checked["binding"] == segmenter
        counts["only_checker_fails"] += checked["binding"] == 0 and segmenter == 1
        counts["only_segmenter_fails"] += checked["binding"] == 1 and segmenter == 0
        if checked["binding"] != segmenter:
            cases.append({"prompt": prompt, "seed": seed,
                          "checker": [f"{d['color']} {d['shape']}" for d in checked["detected"]],
                          "segmenter": sorted(f"{c} {s}" for c, s in found)})
    result = {**counts, "disagreements": cases}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(counts, indent=2))


if __name__ == "__main__":
    main()
