#!/usr/bin/env python
"""What does layout-guided generation cost on Stable Diffusion XL, and does the layout move attention there?

On one ``RealignDiffXLPipeline`` object, with the same prompt, layout and seed as ``bench_attention.py``:

  plain   called without a layout: exactly ``StableDiffusionXLPipeline`` (diffusers' SDPA processors);
  layout  the two-region layout of boxes with the default settings (Eq. 8 on the conditional half, cross-attention
          only, the first ``modulation_fraction=0.3`` of the steps);
  naive   the same layout with ``modulation_fraction=1.0`` (every cross-attention call of every step).

Time: after warm-up the three run interleaved (plain, layout, naive, plain, ...); median seconds per image, the
ratios to plain, and on CUDA the peak ``torch.cuda.max_memory_allocated`` of each (``bench_attention.bench_batch``).
Attention: one untimed call per configuration with ``return_attention_maps=True``; per region, the share of its
phrase words' cross-attention (mean over heads, layers and steps) inside its box, next to the box's area (what
uniform attention gives), over all steps and over the first step alone (where the modulation is strongest).

  python benchmarks/bench_sdxl.py --threads 1                                   # tiny SDXL, CPU, float32
  python benchmarks/bench_sdxl.py --shape sdxl --device cuda --dtype float16 --json out.json   # 1024x1024

``--shape tiny`` is ``realign_pipeline.testing``'s tiny random SDXL (two text encoders, added time ids and pooled
embedding, no attention at the top level); ``--shape sdxl`` is SDXL base's architecture with random weights
(``benchmarks/sdxl_random.py``): nothing is downloaded, and the images are noise. With random weights the
attention shares say whether Eq. 8 moves attention at SDXL's grids (64x64 and 32x32 at 1024 px), not how well a
trained SDXL follows a layout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
# Benchmark this checkout (src layout), whatever may be installed; the helpers sit beside this file.
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(HERE))

import numpy as np
import torch
from bench_attention import (
    CONFIG_LABELS,
    CONFIGS,
    DTYPES,
    PROMPT,
    bench_batch,
    device_description,
    git_commit,
    load_average,
    make_layout,
    synchronize,
)

SHAPE_DEFAULTS = {
    # shape: (height, width, steps, warmup, repeats, batch sizes)
    "tiny": (64, 64, 20, 2, 7, [1]),
    "sdxl": (1024, 1024, 30, 1, 3, [1]),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPE_DEFAULTS), default="tiny",
                        help="tiny (default): tiny random SDXL components; sdxl: SDXL base's architecture, random weights")
    parser.add_argument("--device", default=None, help="torch device (default: cpu for tiny, cuda if available for sdxl)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: float16 on cuda, else float32")
    parser.add_argument("--height", type=int, default=None, help="default: 64 tiny, 1024 sdxl")
    parser.add_argument("--width", type=int, default=None, help="default: 64 tiny, 1024 sdxl")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: 20 tiny, 30 sdxl)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="images per call (default: 1)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed rounds (default: 2 tiny, 1 sdxl)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default: 7 tiny, 3 sdxl)")
    parser.add_argument("--guidance-scale", type=float, default=5.0, help="default: 5.0 (SDXL's)")
    parser.add_argument("--seed", type=int, default=0, help="generator seed of every call, and weight seed")
    parser.add_argument("--output-type", choices=("np", "latent"), default="np",
                        help="default np (VAE decode included); 'latent' leaves the decode out")
    parser.add_argument("--no-shares", action="store_true", help="skip the attention-share calls")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="write every number here")
    args = parser.parse_args(argv)

    height, width, steps, warmup, repeats, batch_sizes = SHAPE_DEFAULTS[args.shape]
    if args.device is None:
        args.device = "cuda" if args.shape == "sdxl" and torch.cuda.is_available() else "cpu"
    if args.dtype is None:
        args.dtype = "float16" if torch.device(args.device).type == "cuda" else "float32"
    args.height, args.width = args.height or height, args.width or width
    args.steps = args.steps or steps
    args.warmup = warmup if args.warmup is None else args.warmup
    args.repeats = repeats if args.repeats is None else args.repeats
    args.batch_sizes = args.batch_sizes or batch_sizes
    if args.repeats < 1 or args.warmup < 0 or min(args.batch_sizes) < 1 or args.steps < 1:
        parser.error("--repeats and --steps must be >= 1, --warmup >= 0, batch sizes >= 1")
    # what bench_attention.bench_batch reads
    args.configs, args.prompt, args.batch_mode = list(CONFIGS), PROMPT, "images-per-prompt"
    return args


def build_pipeline(args: argparse.Namespace):
    from realign_pipeline import RealignDiffXLPipeline

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if args.shape == "tiny":
        from realign_pipeline.testing import tiny_sdxl_components

        components = tiny_sdxl_components(seed=args.seed)
    else:
        from sdxl_random import sdxl_components

        components = sdxl_components(device=device, dtype=dtype, seed=args.seed)
    pipe = RealignDiffXLPipeline(**components, add_watermarker=False)
    if args.shape == "tiny":  # sdxl components are built in place; tiny ones are float32 on the CPU
        pipe = pipe.to(device=device) if dtype == torch.float32 else pipe.to(device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------------------------------------------------------
# Attention inside the boxes
# ---------------------------------------------------------------------------------------------------------------
def phrase_share(maps: dict[str, torch.Tensor], words: list[str], mask: torch.Tensor) -> float:
    """Share of the words' summed attention inside `mask` (NaN when the maps are not finite or all zero)."""
    total = sum(maps[word].float().clamp(min=0) for word in words)
    mass = float(total.sum())
    return float((total * mask).sum()) / mass if mass > 0 and np.isfinite(mass) else float("nan")


def attention_shares(pipe, args: argparse.Namespace, layout, device: torch.device) -> list[dict]:
    """Per configuration and region: the phrase's attention share inside its box (all steps, first step)."""

    def stop_after_first_step(pipeline, step, timestep, tensors):
        pipeline._interrupt = True
        return tensors

    calls = {"plain": {}, "layout": {"layout": layout}, "naive": {"layout": layout, "modulation_fraction": 1.0}}
    rows = []
    for config, extra in calls.items():
        for span, stop in (("all steps", None), ("first step", stop_after_first_step)):
            out = pipe(
                args.prompt, height=args.height, width=args.width, num_inference_steps=args.steps,
                guidance_scale=args.guidance_scale, output_type="latent", return_attention_maps=True,
                callback_on_step_end=stop, generator=torch.Generator(device=device).manual_seed(args.seed), **extra,
            )  # fmt: skip
            maps = out.attention_maps[0]
            for region in layout:
                words = [word for word in region.phrase.split() if word in maps]
                grid = next(iter(maps.values())).shape
                mask = region.mask_at(*grid).to(maps[words[0]].device)
                rows.append({
                    "config": config, "steps": span, "phrase": region.phrase, "words": words,
                    "map_size": list(grid), "share": phrase_share(maps, words, mask), "area": float(mask.mean()),
                    "finite": bool(all(torch.isfinite(maps[word]).all() for word in words)),
                })  # fmt: skip
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------------------------
def format_report(meta: dict, results: list[dict], shares: list[dict]) -> str:
    cuda = meta["device_type"] == "cuda"
    lines = [
        (f"RealignDiffXLPipeline attention cost: shape={meta['shape']} {meta['height']}x{meta['width']}, "
         f"{meta['steps']} steps, {meta['dtype']} on {meta['device']} ({meta['device_name']})"),
        (f"torch {meta['torch']}, diffusers {meta['diffusers']}; guidance {meta['guidance_scale']}, output "
         f"{meta['output_type']}; {meta['warmup']} warm-up + {meta['repeats']} timed rounds, interleaved"),
    ]
    if not cuda and meta.get("load_average_at_start") is not None:
        lines.append(f"load average (1/5/15 min) at start {meta['load_average_at_start']}, at end "
                     f"{meta['load_average_at_end']} on {meta['cpu_count']} CPUs")
    header = f"{'batch':>5}  {'configuration':<26} {'s/image':>9} {'min':>9} {'vs plain':>9} {'paired':>8} {'explicit':>9}"
    if cuda:
        header += f" {'peak MiB':>9}"
    lines += ["", header, "-" * len(header)]
    for r in results:
        line = (f"{r['batch_size']:>5}  {r['label']:<26} {r['median_s_per_image']:>9.4f} {r['min_s_per_image']:>9.4f} "
                f"{r['ratio_vs_plain']:>8.3f}x {r['paired_ratio_vs_plain']:>7.3f}x {r.get('explicit_attention_calls', '-'):>9}")
        if cuda:
            line += f" {r['peak_memory_bytes'] / 2**20:>9.0f}"
        lines.append(line)
    if shares:
        lines += ["", "share of each phrase's cross-attention inside its box (area: what uniform attention gives)",
                  f"{'configuration':<26} {'steps':<11} {'phrase':<12} {'map':>7} {'share':>7} {'area':>6}"]
        for s in shares:
            grid = "x".join(map(str, s["map_size"]))
            lines.append(f"{CONFIG_LABELS[s['config']]:<26} {s['steps']:<11} {s['phrase']:<12} {grid:>7} "
                         f"{s['share']:>7.3f} {s['area']:>6.3f}" + ("" if s["finite"] else "  (maps not finite)"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*invalid value encountered.*")

    import diffusers

    import realign_pipeline

    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    start = time.perf_counter()
    pipe = build_pipeline(args)
    synchronize(device)
    build_s = time.perf_counter() - start
    layout = make_layout()
    meta = {
        "shape": args.shape, "device": str(device), "device_type": device.type,
        "device_name": device_description(device), "dtype": args.dtype, "height": args.height, "width": args.width,
        "steps": args.steps, "batch_sizes": args.batch_sizes, "warmup": args.warmup, "repeats": args.repeats,
        "prompt": args.prompt, "layout": layout.to_dict(), "guidance_scale": args.guidance_scale, "seed": args.seed,
        "output_type": args.output_type, "torch": torch.__version__, "cuda": torch.version.cuda,
        "diffusers": diffusers.__version__, "realign_pipeline": realign_pipeline.__version__,
        "git_commit": git_commit(), "python": platform.python_version(), "platform": platform.platform(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "build_seconds": build_s,
        "load_average_at_start": load_average(),
        "weights_memory_bytes": torch.cuda.memory_allocated(device) if device.type == "cuda" else None,
    }  # fmt: skip

    results = []
    for batch_size in args.batch_sizes:
        print(f"batch {batch_size}: {args.warmup} warm-up + {args.repeats} timed rounds of {args.configs}",
              file=sys.stderr)
        results += bench_batch(pipe, args, batch_size, layout, device)
    shares = []
    if not args.no_shares:
        print("attention shares: plain / layout / naive, all steps and first step", file=sys.stderr)
        shares = attention_shares(pipe, args, layout, device)
    meta["load_average_at_end"] = load_average()
    print(format_report(meta, results, shares))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "results": results, "shares": shares}, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
