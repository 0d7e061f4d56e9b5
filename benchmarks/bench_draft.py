#!/usr/bin/env python
"""Peak memory and time of one DRaFT-K forward and backward, per K, with and without per-step checkpointing.

What ``training/train_refl.py --backprop_steps K [--checkpoint_denoising_steps]`` does per micro-step for the
reward term (``realign_pipeline.training.draft.draft_latents``): T - K DDIM steps without gradient, the last K
with gradient, VAE decode with gradient, a brightness reward (mean pixel, no model), backward. ``L_pre`` and the
optimizer step are left out: they cost the same for every K. The trained parameters are a LoRA adapter (as the
script's ``--use_lora``) or the whole UNet (``--config full``).

Memory is the peak of the pass above what was allocated before it (model, optimizer-free): on CUDA
``torch.cuda.max_memory_allocated``; on the CPU the torch profiler's allocation events (``profile_memory``),
summed in time order -- tensors only, exact, not the process's resident set. Time is the median of
``--repeats`` unprofiled passes, each K and mode interleaved in one round so that other load hits all alike.

    # tiny random components on the CPU (what this machine can do; ~1-2 min)
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_draft.py --threads 1 --json benchmarks/results/draft_tiny_cpu.json
    # SD v1.5 shapes (random weights, benchmarks/sd15_random.py), 512x512, fp16, on a GPU
    python benchmarks/bench_draft.py --shape sd15 --device cuda --dtype float16 --size 512 --steps 50 \
        --ks 1 5 15 50 --json draft_sd15_fp16.json

Reported per K: peak and median seconds without and with checkpointing, the ratio checkpointed / plain, and each
mode's peak relative to its K = 1 peak; the per-step growth (slope of peak over K, by least squares).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Hashable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from realign_pipeline.training.draft import draft_latents
from realign_pipeline.training.lora import unet_lora_config
from realign_pipeline.training.refl import decode


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """What :func:`build` reads: the components, where they run, the image size and what is trained."""
    p.add_argument("--shape", choices=["tiny", "sd15"], default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    p.add_argument("--size", type=int, default=32, help="image side in pixels")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--config", choices=["lora", "full"], default="lora")
    p.add_argument("--rank", type=int, default=4, help="LoRA rank")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--steps", type=int, default=20, help="T of the chain")
    p.add_argument("--ks", type=int, nargs="+", default=[1, 2, 5, 10, 15, 20], help="the K to measure")
    p.add_argument("--guidance-scale", type=float, default=None, help="CFG at every step (default off)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args(argv)


def build(args, dtype):
    """(unet set up for training, vae, scheduler, cond, negative): the tiny components or SD v1.5's shapes."""
    if args.shape == "tiny":
        from realign_pipeline.testing import tiny_components

        comps = tiny_components()
        cross = comps["unet"].config.cross_attention_dim
    else:
        from sd15_random import sd15_components

        comps = sd15_components(device=args.device, dtype=torch.float32)
        cross = 768
    unet, vae = comps["unet"], comps["vae"]
    vae.requires_grad_(False).to(args.device, dtype)
    if args.config == "lora":
        from diffusers.training_utils import cast_training_params

        unet.requires_grad_(False).to(args.device, dtype)
        unet.add_adapter(unet_lora_config(args.rank))
        cast_training_params(unet, dtype=torch.float32)
    else:
        unet.to(args.device, torch.float32).requires_grad_(True)
    unet.train()
    g = torch.Generator().manual_seed(0)
    cond = torch.randn(args.batch_size, 77, cross, generator=g).to(args.device, dtype)
    negative = torch.randn(args.batch_size, 77, cross, generator=g).to(args.device, dtype)
    return unet, vae, copy.deepcopy(comps["scheduler"]), cond, negative


def one_pass(unet, vae, scheduler, cond, negative, args, k: int, ckpt: bool, dtype) -> None:
    """The reward term of one micro-step for this K: chain, decode, reward, backward; gradients dropped."""
    lat_hw = args.size // (2 ** (len(vae.config.block_out_channels) - 1))
    noise = torch.randn((args.batch_size, 4, lat_hw, lat_hw), generator=torch.Generator().manual_seed(1))
    autocast = torch.autocast(
        device_type=torch.device(args.device).type, dtype=dtype, enabled=dtype != torch.float32
    )
    with autocast:
        out = draft_latents(
            unet,
            scheduler,
            noise.to(args.device, dtype),
            cond,
            args.steps,
            k,
            guidance_scale=args.guidance_scale,
            negative_hidden_states=negative,
            checkpoint=ckpt,
        )
        pixels = decode(vae, out.x0.to(dtype))
        loss = -pixels.float().mean()
    loss.backward()
    unet.zero_grad(set_to_none=True)


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def peak_bytes(fn, device) -> int:
    """Peak tensor memory of ``fn()`` above what was allocated when it started."""
    if str(device).startswith("cuda"):
        sync(device)
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated() - base
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [
        e
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == DeviceType.CPU
    ]
    current = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        current += e.nbytes()
        peak = max(peak, current)
    return peak


def timed(
    fns: dict[Hashable, Callable[[], None]], warmup: int, repeats: int, device
) -> dict[Hashable, list[float]]:
    """Every function once per round, interleaved; the rounds after ``warmup`` kept."""
    times: dict[Hashable, list[float]] = {name: [] for name in fns}
    for r in range(warmup + repeats):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
    return times


def slope(xs, ys) -> float:
    """Least-squares slope of ys over xs."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else 0.0


def git_commit() -> str | None:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv=None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    bad = [k for k in args.ks if not 1 <= k <= args.steps]
    if bad:
        raise SystemExit(f"--ks {bad}: each K must be in 1..--steps ({args.steps})")
    dtype = getattr(torch, args.dtype)
    unet, vae, scheduler, cond, negative = build(args, dtype)
    modes = {"plain": False, "checkpointed": True}

    def run(k, ckpt):
        return one_pass(unet, vae, scheduler, cond, negative, args, k, ckpt, dtype)

    peaks = {
        m: {k: peak_bytes(lambda k=k, c=c: run(k, c), args.device) for k in args.ks} for m, c in modes.items()
    }
    fns = {(k, m): (lambda k=k, c=c: run(k, c)) for k in args.ks for m, c in modes.items()}
    rounds = timed(fns, args.warmup, args.repeats, args.device)
    times = {m: {k: rounds[(k, m)] for k in args.ks} for m in modes}
    k1 = min(args.ks)
    rows = []
    for k in args.ks:
        p, c = peaks["plain"][k], peaks["checkpointed"][k]
        tp, tc = statistics.median(times["plain"][k]), statistics.median(times["checkpointed"][k])
        rows.append(
            {
                "k": k,
                "plain_peak_mib": p / 2**20,
                "checkpointed_peak_mib": c / 2**20,
                "checkpointed_over_plain": c / p,
                "plain_vs_k_min": p / peaks["plain"][k1],
                "checkpointed_vs_k_min": c / peaks["checkpointed"][k1],
                "plain_s": tp,
                "checkpointed_s": tc,
                "time_checkpointed_over_plain": tc / tp,
                "plain_times_s": times["plain"][k],
                "checkpointed_times_s": times["checkpointed"][k],
            }
        )
    growth = {m: slope(args.ks, [peaks[m][k] / 2**20 for k in args.ks]) for m in modes}
    result = {
        "shape": args.shape,
        "device": args.device,
        "dtype": args.dtype,
        "size": args.size,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "config": args.config,
        "trainable_params": sum(p.numel() for p in unet.parameters() if p.requires_grad),
        "guidance_scale": args.guidance_scale,
        "memory_kind": "cuda max_memory_allocated above the start"
        if str(args.device).startswith("cuda")
        else "torch profiler CPU allocation events, peak above the start",
        "growth_mib_per_step": growth,
        "rows": rows,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "loadavg": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "git_commit": git_commit(),
        "run_s": time.perf_counter() - started,
    }
    print(
        f"{args.shape} {args.device} {args.dtype} {args.size}px batch {args.batch_size} T={args.steps} "
        f"{args.config} ({result['trainable_params']:,} trained) guidance={args.guidance_scale} "
        f"memory: {result['memory_kind']}"
    )
    print(
        f"{'K':>3} {'plain MiB':>10} {'ckpt MiB':>9} {'ckpt/plain':>10} {'plain/K1':>9} {'ckpt/K1':>8} "
        f"{'plain s':>8} {'ckpt s':>7} {'time ckpt/plain':>15}"
    )
    for row in rows:
        print(
            f"{row['k']:>3} {row['plain_peak_mib']:>10.2f} {row['checkpointed_peak_mib']:>9.2f} "
            f"{row['checkpointed_over_plain']:>10.2f} {row['plain_vs_k_min']:>9.2f} "
            f"{row['checkpointed_vs_k_min']:>8.2f} {row['plain_s']:>8.3f} {row['checkpointed_s']:>7.3f} "
            f"{row['time_checkpointed_over_plain']:>15.2f}"
        )
    print(
        f"growth per gradient step: plain {growth['plain']:.3f} MiB, checkpointed {growth['checkpointed']:.4f} MiB; "
        f"run {result['run_s']:.0f} s, load average {result['loadavg']}"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
