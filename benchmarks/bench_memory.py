#!/usr/bin/env python
"""Peak memory and time of one UNet step with classifier-free guidance: plain, cross-attention modulation, and
cross- plus self-attention modulation (``self_attention_strength=0.3``).

SD v1.5's UNet at 512x512 (64x64 latents) and SD 2.x's at 768x768 (96x96 latents), random weights (nothing is
downloaded). Each configuration runs in a fresh subprocess so that no allocation of one is counted in another:

  plain   diffusers' own processors (what a call without a layout runs)
  cross   ``RealignAttnProcessor`` on cross-attention, Eq. 8 on a modulating step (``self_attention_strength=0``)
  self    the same plus self-attention modulation, ``self_attention_strength=0.3``

Memory is the step's peak above what the process held before the step (the model and inputs): on the CPU the
kernel's resident-set high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs`` before the step), on
CUDA ``torch.cuda.max_memory_allocated``. The figure that matters is the difference between configurations.
Time is measured apart, in one process per shape that runs the three configurations interleaved (plain, cross,
self, plain, ...) after warm-up, so that other load on the machine hits all of them alike.

  python benchmarks/bench_memory.py --threads 1                       # CPU, float32, both shapes (~30 min on 2 cores)
  python benchmarks/bench_memory.py --device cuda --dtype float16 --json out/bench_memory.json
  python benchmarks/bench_memory.py --shapes tiny                     # the tiny test UNet: checks the script in seconds

The package is imported from ``PYTHONPATH`` first, then from this checkout's ``src``: run it with
``PYTHONPATH=/path/to/other/src`` to measure another version of ``realign_pipeline`` on the same machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
# after PYTHONPATH and any installed copy, so that another version can be measured by pointing PYTHONPATH at it
sys.path.append(str(REPO / "src"))

import torch
from sd15_random import UNET_CONFIG as SD15_UNET_CONFIG

#: SD 2.x's UNet (``stabilityai/stable-diffusion-2-1``): 5/10/20/20 heads of 64 channels, OpenCLIP's 1024-wide
#: text states, linear projections, 96x96 latents for 768x768 images.
SD2_UNET_CONFIG: dict[str, Any] = {
    **SD15_UNET_CONFIG,
    "sample_size": 96,
    "attention_head_dim": (5, 10, 20, 20),  # diffusers' legacy name: heads per level
    "cross_attention_dim": 1024,
    "use_linear_projection": True,
    "upcast_attention": True,
}
SHAPES = {
    # name: (UNet config or None for realign_pipeline.testing's tiny UNet, image size, label)
    "sd15": (SD15_UNET_CONFIG, 512, "SD v1.5, 512x512"),
    "sd2": (SD2_UNET_CONFIG, 768, "SD 2.x, 768x768"),
    "tiny": (None, 32, "tiny, 32x32"),
}
CONFIGS = ("plain", "cross", "self")
SELF_ATTENTION_STRENGTH = 0.3
PROMPT = "a red book and a yellow vase"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _kib_from_status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_cpu_peak() -> bool:
    """Reset the kernel's peak-RSS counter of this process (Linux); False where it cannot be reset."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def build(shape: str, device: torch.device, dtype: torch.dtype) -> tuple[Any, tuple, dict]:
    """The UNet with random weights, the inputs of one CFG step, and the Realign state of each configuration."""
    from diffusers import UNet2DConditionModel

    from realign_pipeline import Layout, Region, resolve_layout
    from realign_pipeline.attention import RealignAttentionState
    from realign_pipeline.testing import clip_tokenizer, tiny_components

    unet_config, size, _ = SHAPES[shape]
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**unet_config) if unet_config else tiny_components("sd1")["unet"]
    unet = unet.to(device=device, dtype=dtype).eval()

    generator = torch.Generator().manual_seed(0)
    side = size // 8
    latents = torch.randn(2, 4, side, side, generator=generator).to(device, dtype)
    text = torch.randn(2, 77, unet.config.cross_attention_dim, generator=generator).to(device, dtype)
    inputs = (latents, torch.tensor(981, device=device), text)

    layout = Layout(
        [Region("red book", box=[0.05, 0.35, 0.45, 0.95]), Region("yellow vase", box=[0.55, 0.15, 0.95, 0.95])]
    )
    resolved = resolve_layout(layout, PROMPT, clip_tokenizer())
    states: dict[str, Any] = {"plain": None}
    for config, self_strength in (("cross", 0.0), ("self", SELF_ATTENTION_STRENGTH)):
        states[config] = RealignAttentionState(
            latent_height=side,
            latent_width=side,
            num_images=1,
            do_classifier_free_guidance=True,
            sequence_length=77,
            layouts=[resolved],
            self_attention_strength=self_strength,
        )
        states[config].set_step(0, 981.0, 50)  # the first step of 50: modulating, l_t = 0.981 ** 5
    return unet, inputs, states


def unet_step(unet, inputs: tuple, state) -> float:
    """One UNet call (with the Realign processors when `state` is given); seconds, synchronised on CUDA."""
    from realign_pipeline.attention import realign_attention_processors

    latents, timestep, text = inputs
    cuda = latents.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(latents.device)
    start = time.perf_counter()
    if state is None:
        unet(latents, timestep, encoder_hidden_states=text, return_dict=False)
    else:
        with realign_attention_processors(unet, state):
            unet(latents, timestep, encoder_hidden_states=text, return_dict=False)
    if cuda:
        torch.cuda.synchronize(latents.device)
    return time.perf_counter() - start


def memory_worker(shape: str, config: str, device: str, dtype: str, threads: int | None) -> dict:
    """In a fresh process: build the UNet, run one UNet call of one configuration, return its peak memory."""
    import realign_pipeline.attention

    if threads:
        torch.set_num_threads(threads)
    torch_device = torch.device(device)
    unet, inputs, states = build(shape, torch_device, DTYPES[dtype])
    cuda = torch_device.type == "cuda"
    with torch.inference_mode():
        if cuda:
            torch.cuda.synchronize(torch_device)
            base = torch.cuda.memory_allocated(torch_device)
            torch.cuda.reset_peak_memory_stats(torch_device)
        else:
            reset = _reset_cpu_peak()
            base = _kib_from_status("VmRSS") * 1024
        seconds = unet_step(unet, inputs, states[config])
        if cuda:
            peak = torch.cuda.max_memory_allocated(torch_device)
        else:
            # without a reset the high-water mark may still be the model build's
            peak = _kib_from_status("VmHWM") * 1024 if reset else None
    return {
        "shape": shape,
        "config": config,
        "image_size": SHAPES[shape][1],
        "peak_extra_bytes": None if peak is None else peak - base,
        "base_bytes": base,
        "first_call_s": seconds,
        "attention_module": realign_pipeline.attention.__file__,
        "torch_threads": torch.get_num_threads(),
    }


def time_worker(shape: str, configs: list[str], device: str, dtype: str, threads: int | None, warmup: int, rounds: int) -> dict:
    """In one process: `warmup` untimed rounds, then `rounds` timed rounds of the configurations, interleaved."""
    if threads:
        torch.set_num_threads(threads)
    unet, inputs, states = build(shape, torch.device(device), DTYPES[dtype])
    times: dict[str, list[float]] = {config: [] for config in configs}
    with torch.inference_mode():
        for round_index in range(warmup + rounds):
            for config in configs:
                seconds = unet_step(unet, inputs, states[config])
                if round_index >= warmup:
                    times[config].append(seconds)
    return {"shape": shape, "times_s": times}


def run_worker(args: argparse.Namespace, *worker_args: str) -> dict:
    """Run this script as a worker in a fresh process; return the JSON it prints last."""
    command = [sys.executable, str(Path(__file__).resolve()), *worker_args, "--device", args.device, "--dtype", args.dtype]
    command += ["--warmup", str(args.warmup), "--rounds", str(args.rounds)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        sys.stderr.write(result.stderr)
        raise SystemExit(f"{' '.join(worker_args)} failed with exit status {result.returncode}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=["sd15", "sd2"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: float16 on cuda, else float32")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in each worker")
    parser.add_argument("--warmup", type=int, default=None, help="untimed interleaved rounds (default: 3 cuda, 1 cpu)")
    parser.add_argument("--rounds", type=int, default=None, help="timed interleaved rounds (default: 10 cuda, 3 cpu)")
    parser.add_argument("--no-timing", action="store_true", help="measure memory only")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH")
    parser.add_argument("--memory-worker", nargs=2, metavar=("SHAPE", "CONFIG"), help=argparse.SUPPRESS)
    parser.add_argument("--time-worker", metavar="SHAPE", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.dtype = args.dtype or ("float16" if cuda else "float32")
    args.warmup = (3 if cuda else 1) if args.warmup is None else args.warmup
    args.rounds = (10 if cuda else 3) if args.rounds is None else args.rounds

    if args.memory_worker:
        print(json.dumps(memory_worker(*args.memory_worker, args.device, args.dtype, args.threads)))
        return 0
    if args.time_worker:
        result = time_worker(args.time_worker, list(CONFIGS), args.device, args.dtype, args.threads, args.warmup, args.rounds)
        print(json.dumps(result))
        return 0

    started = time.perf_counter()
    rows = []
    for shape in args.shapes:
        by_config = {}
        for config in CONFIGS:
            by_config[config] = run_worker(args, "--memory-worker", shape, config)
            print(f"  {shape} {config}: memory measured", file=sys.stderr, flush=True)
        times = None if args.no_timing else run_worker(args, "--time-worker", shape)["times_s"]
        if times:
            print(f"  {shape}: timed", file=sys.stderr, flush=True)
        cross = by_config["cross"]["peak_extra_bytes"]
        for config, row in by_config.items():
            extra = row["peak_extra_bytes"]
            row["extra_vs_cross_bytes"] = None if extra is None or cross is None else extra - cross
            if times:
                row["times_s"] = times[config]
                row["median_s"] = statistics.median(times[config])
                row["time_vs_plain"] = row["median_s"] / statistics.median(times["plain"])
                row["time_vs_cross"] = row["median_s"] / statistics.median(times["cross"])
                row["paired_vs_cross"] = statistics.median(a / b for a, b in zip(times[config], times["cross"]))
            rows.append(row)
    total_s = time.perf_counter() - started

    def gib(value: int | None) -> str:
        return "n/a" if value is None else f"{value / 2**30:.2f}"

    device_name = (
        torch.cuda.get_device_name(0) if cuda else f"CPU x{os.cpu_count()} ({platform.processor() or platform.machine()})"
    )
    print(
        f"one UNet call, CFG batch 2 (1 image), {args.dtype} on {args.device} ({device_name}), torch {torch.__version__}, "
        f"threads {rows[0]['torch_threads']}; time: median of {args.rounds} interleaved rounds after {args.warmup}; "
        f"{total_s:.0f} s in all"
    )
    print(f"attention module: {rows[0]['attention_module']}")
    print(
        f"{'shape':<18} {'config':<7} {'peak GiB':>9} {'vs cross GiB':>13} {'median s':>9} {'vs plain':>9} "
        f"{'vs cross':>9} {'paired':>8}"
    )
    for row in rows:
        timing = (
            f"{row['median_s']:>9.2f} {row['time_vs_plain']:>8.2f}x {row['time_vs_cross']:>8.2f}x "
            f"{row['paired_vs_cross']:>7.2f}x"
            if "median_s" in row
            else ""
        )
        print(
            f"{SHAPES[row['shape']][2]:<18} {row['config']:<7} {gib(row['peak_extra_bytes']):>9} "
            f"{gib(row['extra_vs_cross_bytes']):>13} {timing}"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        try:
            commit = subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=False
            ).stdout.strip()
        except OSError:
            commit = None
        meta = {
            "device": args.device,
            "device_name": device_name,
            "dtype": args.dtype,
            "torch": torch.__version__,
            "warmup": args.warmup,
            "rounds": args.rounds,
            "self_attention_strength": SELF_ATTENTION_STRENGTH,
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "git_commit": commit,
            "total_s": total_s,
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        }
        args.json.write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
