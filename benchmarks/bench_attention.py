#!/usr/bin/env python
"""What does layout-guided generation cost? Three configurations, timed in one run on one machine, as ratios.

On one ``RealignDiffPipeline`` object, with the same prompt and seed:

  plain   called without a layout: exactly ``StableDiffusionPipeline`` (diffusers' SDPA processors);
  layout  a two-region ``Layout`` of boxes with the default settings (Eq. 8 on the conditional half of the
          batch, cross-attention only, during the first ``modulation_fraction=0.3`` of the steps);
  naive   the same layout with ``modulation_fraction=1.0``: every cross-attention call of every step is
          modulated (the reference point for a naive, always-on modulation).

After warm-up, the configurations run interleaved (plain, layout, naive, plain, layout, naive, ...) so that drift
(clocks, thermals, other load) hits all three alike. It reports the median seconds per image and the ratios
layout/plain and naive/plain, plus peak GPU memory on CUDA. The first warm-up round also counts how many
attention calls took the explicit (modulated) path in each configuration, as a check that the benchmark measures
what it claims.

  python benchmarks/bench_attention.py                       # tiny random components, CPU, float32
  python benchmarks/bench_attention.py --shape sd15 --device cuda --dtype float16 --json out.json

``--shape sd15`` is SD v1.5's architecture with random weights (``benchmarks/sd15_random.py``): nothing is
downloaded, and the images are noise.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
# Benchmark this checkout (src layout), whatever may be installed; sd15_random sits beside this file.
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(HERE))

import numpy as np
import torch

PROMPT = "a red book and a yellow vase"
CONFIGS = ("plain", "layout", "naive")
CONFIG_LABELS = {
    "plain": "plain (no layout, SDPA)",
    "layout": "layout, defaults (30%)",
    "naive": "layout, every step (100%)",
}
SHAPE_DEFAULTS = {
    # shape: (height, width, steps, warmup, repeats)
    "tiny": (32, 32, 20, 2, 7),
    "sd15": (512, 512, 50, 2, 5),
}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(
            "Time RealignDiffPipeline without a layout (plain SD), with a layout (default settings) and with "
            "modulation at every step, interleaved in one run; report median seconds per image and ratios."
        ),
    )
    parser.add_argument(
        "--shape",
        choices=sorted(SHAPE_DEFAULTS),
        default="tiny",
        help="tiny (default): realign_pipeline.testing's tiny random components; sd15: SD v1.5's architecture, "
        "random weights",
    )
    parser.add_argument(
        "--device", default=None, help="torch device (default: cpu for tiny, cuda if available for sd15)"
    )
    parser.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default=None,
        help="model dtype (default: float16 on cuda, else float32)",
    )
    parser.add_argument("--height", type=int, default=None, help="image height (default: 32 tiny, 512 sd15)")
    parser.add_argument("--width", type=int, default=None, help="image width (default: 32 tiny, 512 sd15)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: 20 tiny, 50 sd15)")
    parser.add_argument(
        "--batch-sizes", type=int, nargs="+", default=[1, 4], help="images per call (default: 1 4)"
    )
    parser.add_argument(
        "--batch-mode",
        choices=("images-per-prompt", "prompts"),
        default="images-per-prompt",
        help="a batch of B as num_images_per_prompt=B (default), or as a list of B copies of the prompt",
    )
    parser.add_argument("--warmup", type=int, default=None, help="untimed rounds per batch size (default: 2)")
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed rounds per batch size (default: 7 tiny, 5 sd15)"
    )
    parser.add_argument(
        "--configs",
        nargs="+",
        choices=CONFIGS,
        default=list(CONFIGS),
        help="configurations to time (default: all; plain always runs)",
    )
    parser.add_argument("--prompt", default=PROMPT, help=f"default: {PROMPT!r}")
    parser.add_argument("--guidance-scale", type=float, default=7.5, help="default: 7.5")
    parser.add_argument(
        "--seed", type=int, default=0, help="generator seed of every call, and weight seed (default: 0)"
    )
    parser.add_argument(
        "--output-type",
        choices=("np", "pil", "latent"),
        default="np",
        help="default np; 'latent' leaves the VAE decode out",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)"
    )
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="write every number here")
    args = parser.parse_args(argv)

    height, width, steps, warmup, repeats = SHAPE_DEFAULTS[args.shape]
    if args.device is None:
        args.device = "cuda" if args.shape == "sd15" and torch.cuda.is_available() else "cpu"
    if args.dtype is None:
        args.dtype = "float16" if torch.device(args.device).type == "cuda" else "float32"
    args.height = args.height or height
    args.width = args.width or width
    args.steps = args.steps or steps
    args.warmup = warmup if args.warmup is None else args.warmup
    args.repeats = repeats if args.repeats is None else args.repeats
    if "plain" not in args.configs:
        args.configs = ["plain", *args.configs]
    args.configs = [c for c in CONFIGS if c in args.configs]
    if args.repeats < 1 or args.warmup < 0 or min(args.batch_sizes) < 1 or args.steps < 1:
        parser.error("--repeats and --steps must be >= 1, --warmup >= 0, batch sizes >= 1")
    return args


# ---------------------------------------------------------------------------------------------------------------
# Setup
# ---------------------------------------------------------------------------------------------------------------
def build_pipeline(args: argparse.Namespace):
    from realign_pipeline import RealignDiffPipeline

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if args.shape == "tiny":
        from realign_pipeline.testing import tiny_components

        components = tiny_components("sd1", seed=args.seed)
    else:
        from sd15_random import sd15_components

        components = sd15_components(device=device, dtype=dtype, seed=args.seed)
    pipe = RealignDiffPipeline(**components, requires_safety_checker=False)
    if args.shape == "tiny":  # sd15 components are built in place; tiny ones are float32 on the CPU
        pipe = pipe.to(device=device) if dtype == torch.float32 else pipe.to(device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_layout():
    from realign_pipeline import Layout, Region

    return Layout(
        [
            Region("red book", box=[0.05, 0.35, 0.45, 0.95]),
            Region("yellow vase", box=[0.55, 0.15, 0.95, 0.95]),
        ]
    )


def call_kwargs(args: argparse.Namespace, config: str, batch_size: int, layout) -> dict:
    kwargs = {
        "height": args.height,
        "width": args.width,
        "num_inference_steps": args.steps,
        "guidance_scale": args.guidance_scale,
        "output_type": args.output_type,
    }
    if args.batch_mode == "prompts":
        kwargs.update(prompt=[args.prompt] * batch_size, num_images_per_prompt=1)
    else:
        kwargs.update(prompt=args.prompt, num_images_per_prompt=batch_size)
    if config == "layout":
        kwargs.update(layout=layout)
    elif config == "naive":
        kwargs.update(layout=layout, modulation_fraction=1.0)
    return kwargs


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} CPUs visible, torch threads {torch.get_num_threads()}"


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages: other work on a shared CPU machine skews CPU timings."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def git_commit() -> str | None:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


# ---------------------------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------------------------
class CallCounter:
    """Counts RealignAttnProcessor calls and their explicit (modulated) ones while active; untimed runs only."""

    def __init__(self):
        from realign_pipeline.attention import RealignAttnProcessor

        self.cls = RealignAttnProcessor
        self.calls = 0
        self.explicit = 0

    def __enter__(self):
        self.original_call = self.cls.__call__
        self.original_explicit = self.cls._explicit_attention
        counter = self

        @functools.wraps(self.original_call)
        def call(processor, *a, **k):
            counter.calls += 1
            return counter.original_call(processor, *a, **k)

        @functools.wraps(self.original_explicit)
        def explicit(processor, *a, **k):
            counter.explicit += 1
            return counter.original_explicit(processor, *a, **k)

        self.cls.__call__ = call
        self.cls._explicit_attention = explicit
        return self

    def __exit__(self, *exc):
        self.cls.__call__ = self.original_call
        self.cls._explicit_attention = self.original_explicit
        return False


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_once(pipe, kwargs: dict, args: argparse.Namespace, device: torch.device):
    generator = torch.Generator(device=device).manual_seed(args.seed)
    return pipe(**kwargs, generator=generator).images


def as_array(images) -> np.ndarray:
    if isinstance(images, torch.Tensor):
        return images.detach().float().cpu().numpy()
    if isinstance(images, list):
        return np.stack([np.asarray(image, dtype=np.float32) for image in images])
    return np.asarray(images, dtype=np.float32)


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float | None:
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return None  # random float16 weights can overflow; the timing is still valid
    return float(np.abs(a - b).max())


def bench_batch(pipe, args: argparse.Namespace, batch_size: int, layout, device: torch.device) -> list[dict]:
    kwargs = {config: call_kwargs(args, config, batch_size, layout) for config in args.configs}
    checks: dict[str, dict] = {}
    outputs: dict[str, np.ndarray] = {}

    for round_index in range(args.warmup):
        for config in args.configs:
            if round_index == 0:
                with CallCounter() as counter:
                    images = run_once(pipe, kwargs[config], args, device)
                outputs[config] = as_array(images)
                checks[config] = {
                    "processor_calls": counter.calls,
                    "explicit_attention_calls": counter.explicit,
                }
            else:
                run_once(pipe, kwargs[config], args, device)
        synchronize(device)

    times: dict[str, list[float]] = {config: [] for config in args.configs}
    peaks: dict[str, list[int]] = {config: [] for config in args.configs}
    for _ in range(args.repeats):
        for config in args.configs:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            synchronize(device)
            start = time.perf_counter()
            run_once(pipe, kwargs[config], args, device)
            synchronize(device)
            times[config].append(time.perf_counter() - start)
            if device.type == "cuda":
                peaks[config].append(torch.cuda.max_memory_allocated(device))

    plain = times["plain"]
    plain_median = statistics.median(plain)
    results = []
    for config in args.configs:
        median = statistics.median(times[config])
        result = {
            "batch_size": batch_size,
            "config": config,
            "label": CONFIG_LABELS[config],
            "modulation_fraction": {"plain": None, "layout": 0.3, "naive": 1.0}[config],
            "times_s": times[config],
            "median_s_per_call": median,
            "median_s_per_image": median / batch_size,
            "min_s_per_image": min(times[config]) / batch_size,
            "ratio_vs_plain": median / plain_median,
            "paired_ratio_vs_plain": statistics.median(t / p for t, p in zip(times[config], plain)),
            "min_ratio_vs_plain": min(times[config]) / min(plain),
            "peak_memory_bytes": max(peaks[config]) if peaks[config] else None,
        }
        if config in checks:
            result.update(checks[config])
            result["max_abs_diff_vs_plain"] = max_abs_diff(outputs[config], outputs["plain"])
            result["outputs_finite"] = bool(np.isfinite(outputs[config]).all())
        results.append(result)
    return results


# ---------------------------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------------------------
def format_table(meta: dict, results: list[dict]) -> str:
    cuda = meta["device_type"] == "cuda"
    lines = [
        (
            f"RealignDiffPipeline attention cost: shape={meta['shape']} {meta['height']}x{meta['width']}, "
            f"{meta['steps']} steps, {meta['dtype']} on {meta['device']} ({meta['device_name']})"
        ),
        (
            f"torch {meta['torch']}, diffusers {meta['diffusers']}, transformers {meta['transformers']}; "
            f"guidance {meta['guidance_scale']}, output {meta['output_type']}, batch as {meta['batch_mode']}; "
            f"{meta['warmup']} warm-up + {meta['repeats']} timed rounds, interleaved"
        ),
    ]
    if not cuda and meta.get("load_average_at_start") is not None:
        lines.append(
            f"load average (1/5/15 min) at start {meta['load_average_at_start']}, at end {meta['load_average_at_end']} "
            f"on {meta['cpu_count']} CPUs"
        )
    lines += [
        "",
    ]
    header = f"{'batch':>5}  {'configuration':<26} {'s/image':>9} {'min':>9} {'vs plain':>9} {'paired':>8} {'min/min':>8} {'explicit':>9}"
    if cuda:
        header += f" {'peak MiB':>9}"
    lines += [header, "-" * len(header)]
    for r in results:
        explicit = r.get("explicit_attention_calls")
        line = (
            f"{r['batch_size']:>5}  {r['label']:<26} {r['median_s_per_image']:>9.4f} {r['min_s_per_image']:>9.4f} "
            f"{r['ratio_vs_plain']:>8.3f}x {r['paired_ratio_vs_plain']:>7.3f}x {r['min_ratio_vs_plain']:>7.3f}x "
            f"{'-' if explicit is None else explicit:>9}"
        )
        if cuda:
            line += f" {r['peak_memory_bytes'] / 2**20:>9.0f}"
        lines.append(line)
    lines += [
        "",
        "s/image: median seconds per image; min: fastest round; vs plain: median / median of plain at the same batch",
        "size; paired: median of the per-round ratios; min/min: fastest / fastest plain; explicit: attention calls",
        "that took the explicit float32 (modulated) path in one call (counted in the first warm-up round).",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*invalid value encountered.*")

    import diffusers
    import transformers

    import realign_pipeline

    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())

    start = time.perf_counter()
    pipe = build_pipeline(args)
    build_s = time.perf_counter() - start
    synchronize(device)
    layout = make_layout()

    meta = {
        "shape": args.shape,
        "device": str(device),
        "device_type": device.type,
        "device_name": device_description(device),
        "dtype": args.dtype,
        "height": args.height,
        "width": args.width,
        "steps": args.steps,
        "batch_sizes": args.batch_sizes,
        "batch_mode": args.batch_mode,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "configs": args.configs,
        "prompt": args.prompt,
        "layout": layout.to_dict(),
        "guidance_scale": args.guidance_scale,
        "seed": args.seed,
        "output_type": args.output_type,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "realign_pipeline": realign_pipeline.__version__,
        "realign_pipeline_path": str(Path(realign_pipeline.__file__).parent),
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "build_seconds": build_s,
        "load_average_at_start": load_average(),
        "weights_memory_bytes": torch.cuda.memory_allocated(device) if device.type == "cuda" else None,
    }

    results = []
    for batch_size in args.batch_sizes:
        print(
            f"batch {batch_size}: {args.warmup} warm-up + {args.repeats} timed rounds of {args.configs}",
            file=sys.stderr,
        )
        results += bench_batch(pipe, args, batch_size, layout, device)

    meta["load_average_at_end"] = load_average()
    print(format_table(meta, results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
