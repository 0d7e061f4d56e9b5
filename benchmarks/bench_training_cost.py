#!/usr/bin/env python
"""Cost of the reward term of one training micro-step, per gradient mode of ``training/train_refl.py``.

The modes: ReFL (``--grad_step_range LO HI``: no-grad steps to a step drawn from [LO, HI), one UNet call with
gradient, x0), DRaFT-K (``--backprop_steps K``: T - K no-grad steps, the last K with gradient) and the full
chain (K = T), each DRaFT with and without per-step checkpointing (``--checkpoint_denoising_steps``). Every pass
is the chain of ``realign_pipeline.training`` (``refl_latents`` / ``draft_latents``), a VAE decode with gradient,
a brightness reward (mean pixel: no reward model) and the backward. ``L_pre``, the reward model and the
optimizer step are left out (the same for every mode); the trained parameters are a LoRA adapter (``--config
lora``, as ``--use_lora``) or the whole UNet (``--config full``).

Two methods:

- ``--method measure`` runs every mode's pass as it is (what a GPU does in seconds): peak memory above the
  start and the median time of ``--repeats`` passes, the modes interleaved in each round.
- ``--method one-step`` measures one step of each kind and composes every mode from them (what a CPU can do
  at SD v1.5's size, where one full chain takes an hour). Time: one rollout step without gradient (``t_n``),
  one denoising step with gradient, forward and backward (``t_g``; checkpointed ``t_c``, which recomputes the
  forward), ReFL's gradient call (``t_r``) and the VAE decode with its backward (``t_d``), each the median of
  ``--repeats`` (at least 1) interleaved rounds; DRaFT with K of T steps then takes
  ``(T - K) t_n + K t_g + t_d`` (``t_c`` checkpointed) and ReFL ``g t_n + t_r + t_d``, g the rollout steps to
  the middle of its range. Peak memory: one profiled whole pass (decode included) of ReFL at its gradient step
  and of DRaFT with K = T = 1, 2 and 3 in each checkpointing mode; K >= 2 then peaks at
  ``p(2) + (K - 2) (p(3) - p(2))`` (the no-grad steps free what they allocate; the stored activations grow by
  one step's worth per gradient step, a constant from the second step on -- from the first to the second,
  checkpointing adds the recomputed step's working memory). These are ESTIMATES and are labelled so in every
  output.
- ``--validate`` runs both on the same model and prints the estimate's relative error per mode (meant for the
  tiny model, where measuring is cheap).

Memory: on CUDA ``torch.cuda.max_memory_allocated`` above the start; on the CPU the torch profiler's tensor
allocation events (``bench_draft.peak_bytes``). Model state (weights, gradients, AdamW moments) is reported
beside it from the parameter counts.

    # tiny, CPU, both methods (seconds)
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_training_cost.py --validate --threads 1
    # SD v1.5's architecture at 512 px on the CPU, one step scaled (about 20 minutes on one core)
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_training_cost.py --shape sd15 --size 512 --steps 50 \\
        --method one-step --threads 1 --json benchmarks/results/training_cost_sd15_cpu_estimate.json
    # on a GPU (benchmarks/run_gpu_training.sh)
    python benchmarks/bench_training_cost.py --shape sd15 --device cuda --dtype float16 --size 512 --steps 50 \\
        --method measure --json training_cost_sd15_fp16.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_draft import add_model_arguments, build, git_commit, peak_bytes, timed

from realign_pipeline.training.draft import draft_latents
from realign_pipeline.training.refl import decode, refl_latents

#: bytes per trained parameter under AdamW with float32 master weights: weight, gradient, two moments
ADAMW_BYTES_PER_PARAM = 16


@dataclass(frozen=True)
class Mode:
    """One gradient mode: ReFL (``k == 0``) or DRaFT with ``k`` gradient steps of ``steps``."""

    name: str
    steps: int
    k: int = 0
    checkpointed: bool = False
    refl_step: int = 0

    @property
    def words(self) -> str:
        if not self.k:
            return f"ReFL (gradient at step {self.refl_step} of {self.steps})"
        chain = "full chain" if self.k == self.steps else f"DRaFT-K, K={self.k}"
        return f"{chain} of T={self.steps}" + (", per-step checkpointing" if self.checkpointed else "")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--steps", type=int, default=20, help="T, --num_inference_steps")
    p.add_argument(
        "--ks", type=int, nargs="+", default=None,
        help="DRaFT's K values (K = T is the full chain); default 1, 3T/4 rounded, T",
    )  # fmt: skip
    p.add_argument(
        "--grad-step-range", type=int, nargs=2, default=None, metavar=("LO", "HI"),
        help="ReFL's range; its pass is timed at the mean step (default the last 2/5 of the steps: 30 50 at T=50)",
    )  # fmt: skip
    p.add_argument("--guidance-scale", type=float, default=None, help="CFG in the chain (default off)")
    p.add_argument("--method", choices=["measure", "one-step"], default="measure")
    p.add_argument("--validate", action="store_true", help="run both methods and compare")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (measure: 0 times the profiled pass; one-step: at least 1)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.ks is None:
        args.ks = sorted({1, round(0.75 * args.steps), args.steps})
    if args.grad_step_range is None:
        args.grad_step_range = (round(0.6 * args.steps), args.steps)
    lo, hi = args.grad_step_range
    if not 0 <= lo < hi <= args.steps:
        p.error(f"--grad-step-range {lo} {hi}: needs 0 <= LO < HI <= --steps ({args.steps})")
    bad = [k for k in args.ks if not 1 <= k <= args.steps]
    if bad:
        p.error(f"--ks {bad}: each K must be in 1..--steps ({args.steps})")
    return args


def modes_of(args) -> list[Mode]:
    """ReFL at the mean of its range, then every K plain and checkpointed."""
    lo, hi = args.grad_step_range
    out = [Mode("refl", args.steps, refl_step=(lo + hi - 1) // 2)]
    for k in args.ks:
        for ckpt in (False, True):
            out.append(Mode(f"draft-{k}" + ("-ckpt" if ckpt else ""), args.steps, k=k, checkpointed=ckpt))
    return out


class Passes:
    """The model and inputs, and one reward pass (chain, decode, reward, backward) for any mode."""

    def __init__(self, args):
        self.args = args
        self.dtype = getattr(torch, args.dtype)
        self.unet, self.vae, self.scheduler, self.cond, self.negative = build(args, self.dtype)
        lat = args.size // (2 ** (len(self.vae.config.block_out_channels) - 1))
        noise = torch.randn((args.batch_size, 4, lat, lat), generator=torch.Generator().manual_seed(1))
        self.noise = noise.to(args.device, self.dtype)

    def autocast(self):
        return torch.autocast(
            device_type=torch.device(self.args.device).type,
            dtype=self.dtype,
            enabled=self.dtype != torch.float32,
        )

    def run(self, mode: Mode, with_decode: bool = True) -> None:
        """The reward pass of ``mode``; ``with_decode=False``: the chain alone, its latents' mean as the loss."""
        guide = {"guidance_scale": self.args.guidance_scale, "negative_hidden_states": self.negative}
        with self.autocast():
            if mode.k:
                x0 = draft_latents(
                    self.unet, self.scheduler, self.noise, self.cond, mode.steps, mode.k,
                    checkpoint=mode.checkpointed, **guide,
                ).x0  # fmt: skip
            else:
                x0 = refl_latents(
                    self.unet, self.scheduler, self.noise, self.cond, mode.steps, mode.refl_step, **guide
                ).x0
            loss = -(decode(self.vae, x0.to(self.dtype)) if with_decode else x0).float().mean()
        loss.backward()
        self.unet.zero_grad(set_to_none=True)

    def no_grad_step(self) -> None:
        """One denoising step of the rollout (UNet call and scheduler step, no gradient)."""
        with self.autocast(), torch.no_grad():
            draft_latents(
                self.unet, self.scheduler, self.noise, self.cond, 1, 1,
                guidance_scale=self.args.guidance_scale, negative_hidden_states=self.negative,
            )  # fmt: skip

    def decode_backward(self) -> None:
        """The VAE decode of the final latents with gradient, and its backward to the latents."""
        latents = self.noise.clone().requires_grad_(True)
        with self.autocast():
            loss = -decode(self.vae, latents).float().mean()
        loss.backward()


def peaks_and_times(
    fns: dict[str, Callable[[], None]], args
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Peak MiB of one pass of each, then the timed rounds. ``--repeats 0``: the time of that one pass (on a CPU
    the profiler's overhead is small next to an SD-sized UNet call; a slow machine then runs each pass once, after
    ``--warmup`` passes of the first)."""
    peaks, profiled = {}, {}
    for _ in range(0 if args.repeats else args.warmup):
        next(iter(fns.values()))()  # warm the allocator and kernels with the first (cheapest) pass
    for name, fn in fns.items():
        t0 = time.perf_counter()
        try:
            peaks[name] = peak_bytes(fn, args.device) / 2**20
        except torch.OutOfMemoryError:  # the full chain without checkpointing on a smaller card
            peaks[name], profiled[name] = None, []
            torch.cuda.empty_cache()
            continue
        profiled[name] = [time.perf_counter() - t0]
    if not args.repeats:
        return peaks, profiled
    fitting = {name: fn for name, fn in fns.items() if peaks[name] is not None}
    return peaks, {**profiled, **timed(fitting, args.warmup, args.repeats, args.device)}


def measure(passes: Passes, modes: list[Mode]) -> dict[str, dict]:
    """Every mode's pass as it is: peak memory above the start, median time."""
    peaks, times = peaks_and_times({m.name: (lambda m=m: passes.run(m)) for m in modes}, passes.args)
    return {
        m.name: {"mode": m.words, "peak_mib": peaks[m.name], "times_s": times[m.name], "method": "measured",
                 "seconds": statistics.median(times[m.name]) if times[m.name] else None}
        for m in modes
    }  # fmt: skip


def one_step(passes: Passes, modes: list[Mode]) -> tuple[dict[str, dict], dict[str, float]]:
    """Every mode composed from one-step measurements (the docstring's formulas): ESTIMATES."""
    args = passes.args
    probes = {"refl": Mode("refl", 1, refl_step=0)}
    for k in (1, 2, 3):
        for suffix, ckpt in (("", False), ("-ckpt", True)):
            probes[f"draft-{k}{suffix}"] = Mode(f"draft-{k}{suffix}", k, k=k, checkpointed=ckpt)
    peaks = {name: peak_bytes(lambda m=m: passes.run(m), args.device) / 2**20 for name, m in probes.items()}
    components = {
        "no_grad_step": passes.no_grad_step,
        "grad_step": lambda: passes.run(Mode("grad", 1, k=1), with_decode=False),
        "grad_step_ckpt": lambda: passes.run(Mode("grad-ckpt", 1, k=1, checkpointed=True), with_decode=False),
        "refl_grad_step": lambda: passes.run(Mode("refl", 1, refl_step=0), with_decode=False),
        "decode_backward": passes.decode_backward,
    }
    rounds = timed(components, args.warmup, max(args.repeats, 1), args.device)
    t = {name: statistics.median(ts) for name, ts in rounds.items()}
    parts = {**{f"{n}_s": v for n, v in t.items()}, **{f"{n}_peak_mib": p for n, p in peaks.items()}}
    out = {}
    for m in modes:
        if not m.k:
            seconds, peak = m.refl_step * t["no_grad_step"] + t["refl_grad_step"], peaks["refl"]
        else:
            suffix = "-ckpt" if m.checkpointed else ""
            grad = t["grad_step_ckpt" if m.checkpointed else "grad_step"]
            seconds = (m.steps - m.k) * t["no_grad_step"] + m.k * grad
            if m.k == 1:
                peak = peaks["draft-1" + suffix]
            else:
                p2, p3 = peaks["draft-2" + suffix], peaks["draft-3" + suffix]
                peak = p2 + (m.k - 2) * (p3 - p2)
        out[m.name] = {
            "mode": m.words,
            "peak_mib": peak,
            "seconds": seconds + t["decode_backward"],
            "method": "ESTIMATE from one step",
        }
    return out, parts


def model_state(passes: Passes) -> dict[str, float]:
    """Weights in memory and, for the trained parameters, AdamW's state: from parameter counts."""
    unet = passes.unet
    frozen = sum(p.numel() * p.element_size() for p in unet.parameters() if not p.requires_grad)
    trained = sum(p.numel() for p in unet.parameters() if p.requires_grad)
    vae = sum(p.numel() * p.element_size() for p in passes.vae.parameters())
    return {
        "unet_params": sum(p.numel() for p in unet.parameters()),
        "trainable_params": trained,
        "frozen_weights_mib": frozen / 2**20,
        "vae_weights_mib": vae / 2**20,
        "trained_with_adamw_mib": trained * ADAMW_BYTES_PER_PARAM / 2**20,
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    passes = Passes(args)
    modes = modes_of(args)
    result = {
        "shape": args.shape, "device": args.device, "dtype": args.dtype, "size": args.size,
        "batch_size": args.batch_size, "steps": args.steps, "ks": args.ks,
        "grad_step_range": list(args.grad_step_range), "config": args.config, "rank": args.rank,
        "guidance_scale": args.guidance_scale, "method": "both" if args.validate else args.method,
        "memory_kind": "cuda max_memory_allocated above the start" if str(args.device).startswith("cuda")
        else "torch profiler CPU allocation events, peak above the start",
        "model_state": model_state(passes),
    }  # fmt: skip
    if args.validate or args.method == "measure":
        result["measured"] = measure(passes, modes)
    if args.validate or args.method == "one-step":
        result["estimated"], result["one_step_parts"] = one_step(passes, modes)
    if args.validate:
        result["estimate_error"] = {
            name: {
                key: result["estimated"][name][key] / row[key] - 1
                for key in ("peak_mib", "seconds")
                if row[key]
            }
            for name, row in result["measured"].items()
        }
    result.update(
        torch=torch.__version__, python=platform.python_version(), threads=torch.get_num_threads(),
        gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        loadavg=[round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        git_commit=git_commit(), run_s=time.perf_counter() - started,
    )  # fmt: skip
    print_table(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    return result


def print_table(result: dict) -> None:
    state = result["model_state"]
    print(
        f"{result['shape']} {result['device']} {result['dtype']} {result['size']}px batch {result['batch_size']} "
        f"T={result['steps']} {result['config']} ({state['trainable_params']:,} of {state['unet_params']:,} UNet "
        f"parameters trained) guidance={result['guidance_scale']}; memory: {result['memory_kind']}"
    )
    print(
        f"model state: frozen UNet weights {state['frozen_weights_mib']:.0f} MiB, VAE {state['vae_weights_mib']:.0f} "
        f"MiB, trained parameters with AdamW {state['trained_with_adamw_mib']:.1f} MiB (16 bytes each)"
    )
    for kind in ("measured", "estimated"):
        if kind not in result:
            continue
        label = "measured" if kind == "measured" else "ESTIMATED from one step (see the docstring)"
        print(f"reward term per micro-step, {label}:")
        print(f"  {'mode':<52} {'peak MiB':>10} {'seconds':>9}")
        for row in result[kind].values():
            if row["peak_mib"] is None:
                print(f"  {row['mode']:<52} {'out of memory':>20}")
            else:
                print(f"  {row['mode']:<52} {row['peak_mib']:>10.1f} {row['seconds']:>9.2f}")
    if "estimate_error" in result:
        print("estimate / measured - 1:")
        for name, err in result["estimate_error"].items():
            print(f"  {name:<16} " + "  ".join(f"{k} {v:+.1%}" for k, v in err.items()))
    print(f"run {result['run_s']:.0f} s, load average {result['loadavg']}")


if __name__ == "__main__":
    main()
