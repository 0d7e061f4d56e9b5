"""Why layout control stops short: where cross-attention goes inside each box, step by step.

    python training/shapes/layout_diagnosis.py --out docs/shapes_layout_diagnosis.json

On the layout-control tuning prompts (training pairings, seeds 0-1; never the held-out ones), each image is
generated with its prompt's layout (``layout_control.prompt_layout``) under a few settings, and every
cross-attention layer's conditional probabilities are read (through the pipeline's attention recording). For
the queries inside each region's box, per denoising step and per attention resolution, the mean share of
attention on: the region's own phrase tokens, the other region's phrase tokens, the start token, the end and
padding tokens, and the other words ("a", "and", "to the left of"). The last three are the tokens no region
claims, which DenseDiffusion pushes down at every query and Eq. 8 as we read it leaves alone; in a causal text
encoder the end and padding tokens carry the whole prompt, both objects included.

Then which attention level places the objects: the same prompts under a few settings with the modulation
kept to some levels of the UNet (8x8 only; 8x8 and 4x4; every level, 2x2 included), read by the checker and
paired against the plain model (position, binding, presence: after, fixed, broken).
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from collections.abc import Sequence
from typing import Any
from unittest import mock

import numpy as np
import torch
from ablation import GENERATION, load_pipeline, paired_rates, pairing_key, write_json
from layout_control import generate, read, tuning_records

from realign_pipeline.attention import RealignAttentionState

#: The settings compared: the layout without modulation (where attention goes by itself), the setting the
#: sweep chose, and a stronger one under which objects vanish (docs/shapes_layout_sweep.json).
SETTINGS: dict[str, dict[str, float]] = {
    "no modulation": {"cross_attention_strength": 0.0, "self_attention_strength": 0.0},
    "chosen (1, 30%, t^1, self 0.3)": {
        "cross_attention_strength": 1.0, "modulation_fraction": 0.3, "timestep_power": 1.0,
        "self_attention_strength": 0.3,
    },
    "strong (2, 60%, t^1, self 0)": {
        "cross_attention_strength": 2.0, "modulation_fraction": 0.6, "timestep_power": 1.0,
        "self_attention_strength": 0.0,
    },
}
CATEGORIES = ("own phrase", "other phrase", "start", "end and padding", "other words")
#: Which attention levels (grid sides) are modulated in the level experiment.
LEVELS: dict[str, tuple[int, ...]] = {"8x8 only": (8,), "8x8 and 4x4": (8, 4), "every level": (8, 4, 2)}
LEVEL_SETTINGS: list[dict[str, float]] = [
    {"cross_attention_strength": s, "modulation_fraction": f, "timestep_power": 1.0, "self_attention_strength": 0.3}
    for s, f in ((1.0, 0.3), (2.0, 0.3), (2.0, 0.6), (4.0, 0.3))
]


def token_categories(tokenizer, prompt: str, token_indices: Sequence[Sequence[int]], num_keys: int) -> np.ndarray:
    """(num_regions, num_keys) category index of every key for each region's queries (see :data:`CATEGORIES`)."""
    length = len(tokenizer(prompt).input_ids)  # start ... end
    categories = np.full((len(token_indices), num_keys), CATEGORIES.index("other words"))
    categories[:, 0] = CATEGORIES.index("start")
    categories[:, length - 1 :] = CATEGORIES.index("end and padding")
    for region, indices in enumerate(token_indices):
        for other, other_indices in enumerate(token_indices):
            categories[region, list(other_indices)] = CATEGORIES.index("own phrase" if other == region else "other phrase")
    return categories


class ShareRecorder:
    """Collects, per (step, resolution, category), the attention share of in-box queries."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.sums: dict[tuple[int, int], np.ndarray] = defaultdict(lambda: np.zeros(len(CATEGORIES)))
        self.counts: dict[tuple[int, int], int] = defaultdict(int)

    def __call__(self, state: RealignAttentionState, probs: torch.Tensor) -> None:
        height, width = state.grid_size(probs.shape[-2])
        mean = probs.float().mean(dim=1)  # (images, Q, K) over heads
        for image, layout in enumerate(state.layouts):
            categories = token_categories(self.tokenizer, layout.prompt, layout.token_indices, mean.shape[-1])
            masks = layout.masks_at(height, width) >= 0.5
            for region in range(len(layout.regions)):
                inside = mean[image][masks[region]]  # (q, K)
                if not len(inside):
                    continue
                shares = np.array([inside[:, categories[region] == c].sum(-1).mean().item() for c in range(len(CATEGORIES))])
                key = (state.step_index, height)
                self.sums[key] += shares
                self.counts[key] += 1

    def table(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for (step, side), total in sorted(self.sums.items()):
            row = dict(zip(CATEGORIES, np.round(total / self.counts[(step, side)], 4).tolist()))
            out.setdefault(f"{side}x{side}", {})[str(step)] = row
        return out


def diagnose(pipe, jobs: Sequence[tuple[dict[str, Any], int]], setting: dict[str, float], batch_size: int,
             generation: dict[str, Any]) -> dict[str, Any]:
    recorder = ShareRecorder(pipe.tokenizer)
    original = RealignAttentionState.record

    def record(state: RealignAttentionState, probs: torch.Tensor) -> None:
        recorder(state, probs)
        original(state, probs)

    with mock.patch.object(RealignAttentionState, "record", record):
        generate(pipe, jobs, {**setting, "return_attention_maps": True}, batch_size, generation)
    return recorder.table()


def modulated_levels(sides: tuple[int, ...]):
    """Keep the modulation to the attention grids whose height is in `sides` (zero weights elsewhere: the
    scores pass unchanged, as at a step that does not modulate)."""
    cross, self_ = RealignAttentionState.cross_weights, RealignAttentionState.self_weights

    def cross_weights(state, num_queries, device):
        positive, negative, columns = cross(state, num_queries, device)
        if state.grid_size(num_queries)[0] in sides:
            return positive, negative, columns
        return torch.zeros_like(positive), torch.zeros_like(negative), columns

    def self_weights(state, num_queries, device, queries=None):
        positive, row_sums = self_(state, num_queries, device, queries)
        if state.grid_size(num_queries)[0] in sides:
            return positive, row_sums
        return torch.zeros_like(positive), torch.zeros_like(row_sums)

    return mock.patch.multiple(RealignAttentionState, cross_weights=cross_weights, self_weights=self_weights)


def level_experiment(pipe, jobs, batch_size: int, generation: dict[str, Any],
                     settings: Sequence[dict[str, float]] = LEVEL_SETTINGS) -> list[dict[str, Any]]:
    groups = [pairing_key(r["objects"]) for r, _ in jobs]
    base = [read(image, r["objects"]) for image, (r, _) in zip(generate(pipe, jobs, None, batch_size, generation), jobs)]
    results = []
    for name, sides in LEVELS.items():
        for setting in settings:
            with modulated_levels(sides):
                images = generate(pipe, jobs, setting, batch_size, generation)
            rows = [read(image, r["objects"]) for image, (r, _) in zip(images, jobs)]
            paired = {m: paired_rates([b[m] for b in base], [x[m] for x in rows], groups)
                      for m in ("position", "binding", "presence")}
            results.append({"levels": name, "setting": setting,
                            **{m: {k: paired[m][k] for k in ("before", "after", "fixed", "broken")} for m in paired}})
            print(name, setting, {m: paired[m]["after"] for m in paired}, flush=True)
    return results


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", default=None, help="shapes (default), shapes-bow, or a pipeline folder")
    parser.add_argument("--limit", type=int, default=48)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--quick", action="store_true", help="2 prompts, 1 seed, 3 steps")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    generation = dict(GENERATION)
    if args.quick:
        args.limit, args.seeds, generation["num_inference_steps"] = 2, [0], 3
    pipe = load_pipeline(args.model)
    records = tuning_records(args.limit)
    jobs = [(r, s) for r in records for s in args.seeds]
    start = time.time()
    result = {
        "protocol": __doc__.split("\n\n", 2)[2].strip(), "prompts": "training pairings", "num_prompts": len(records),
        "seeds": args.seeds, "generation": generation, "categories": list(CATEGORIES),
        "settings": {name: {"setting": s, "shares": diagnose(pipe, jobs, s, args.batch_size, generation)}
                     for name, s in SETTINGS.items()},
        "levels": level_experiment(pipe, jobs, args.batch_size, generation,
                                   LEVEL_SETTINGS[:1] if args.quick else LEVEL_SETTINGS),
    }
    result["wall_s"] = round(time.time() - start, 1)
    print(f"wrote {write_json(args.out, result)} in {result['wall_s']} s", flush=True)
    return result


if __name__ == "__main__":
    main()
