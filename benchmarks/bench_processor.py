#!/usr/bin/env python
"""One cross-attention layer at SD v1.5's shapes: diffusers' AttnProcessor2_0 (SDPA) vs RealignAttnProcessor.

A microbenchmark under bench_attention.py: it isolates what a single modulated call costs, per UNet level
(64x64 / 320 channels, 32x32 / 640, 16x16 / 1280, 8x8 / 1280 latents for a 512x512 image), with classifier-free
guidance (the batch is 2 x images). Configurations, interleaved per round:

  sdpa       AttnProcessor2_0, what a plain call runs
  idle       RealignAttnProcessor on a step that does not modulate (its SDPA path)
  modulate   RealignAttnProcessor on a modulating step (explicit float32 scores for the conditional half)

  python benchmarks/bench_processor.py                       # CPU, float32
  python benchmarks/bench_processor.py --device cuda --dtype float16 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# (latent side, channels) of SD 1.5's cross-attention layers at 512x512
LEVELS = ((64, 320), (32, 640), (16, 1280), (8, 1280))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default=None, help="default: float16 on cuda, else float32"
    )
    parser.add_argument(
        "--images", type=int, nargs="+", default=[1, 4], help="images per call (default: 1 4)"
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default: 50 cuda, 5 cpu)")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)"
    )
    parser.add_argument("--json", type=Path, default=None, metavar="PATH")
    args = parser.parse_args(argv)

    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    from realign_pipeline import Layout, Region, resolve_layout
    from realign_pipeline.attention import RealignAttentionState, RealignAttnProcessor
    from realign_pipeline.testing import clip_tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = DTYPES[args.dtype or ("float16" if cuda else "float32")]
    repeats = args.repeats or (50 if cuda else 5)

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    prompt = "a red book and a yellow vase"
    layout = Layout(
        [
            Region("red book", box=[0.05, 0.35, 0.45, 0.95]),
            Region("yellow vase", box=[0.55, 0.15, 0.95, 0.95]),
        ]
    )
    resolved = resolve_layout(layout, prompt, clip_tokenizer())
    generator = torch.Generator().manual_seed(0)

    rows = []
    for images in args.images:
        for side, channels in LEVELS:
            with torch.device(device):
                attn = Attention(channels, cross_attention_dim=768, heads=8, dim_head=channels // 8)
            attn = attn.to(dtype).eval()
            hidden = torch.randn(2 * images, side * side, channels, generator=generator).to(device, dtype)
            text = torch.randn(2 * images, 77, 768, generator=generator).to(device, dtype)

            def state(modulating: bool, images: int = images) -> RealignAttentionState:
                s = RealignAttentionState(
                    latent_height=64,
                    latent_width=64,
                    num_images=images,
                    do_classifier_free_guidance=True,
                    sequence_length=77,
                    layouts=[resolved] * images,
                )
                s.set_step(0 if modulating else 49, 981.0 if modulating else 1.0, 50)
                return s

            processors = {
                "sdpa": AttnProcessor2_0(),
                "idle": RealignAttnProcessor(state(False)),
                "modulate": RealignAttnProcessor(state(True)),
            }
            times = {name: [] for name in processors}
            with torch.no_grad():
                for proc in processors.values():  # warm-up, and the weights cache of the modulating state
                    attn.set_processor(proc)
                    for _ in range(3):
                        attn(hidden, text)
                sync()
                for _ in range(repeats):
                    for name, proc in processors.items():
                        attn.set_processor(proc)
                        sync()
                        start = time.perf_counter()
                        attn(hidden, text)
                        sync()
                        times[name].append(time.perf_counter() - start)
            base = statistics.median(times["sdpa"])
            for name, values in times.items():
                rows.append(
                    {
                        "images": images,
                        "latent": side,
                        "channels": channels,
                        "processor": name,
                        "median_ms": 1e3 * statistics.median(values),
                        "ratio_vs_sdpa": statistics.median(values) / base,
                        "times_s": values,
                    }
                )

    name = (
        torch.cuda.get_device_name(device)
        if cuda
        else f"CPU x{os.cpu_count()}, {torch.get_num_threads()} threads"
    )
    print(
        f"one cross-attention layer, SD 1.5 shapes, CFG batch = 2 x images; {dtype} on {device} ({name}), "
        f"torch {torch.__version__}, median of {repeats}"
    )
    print(
        f"{'images':>6} {'latent':>7} {'ch':>5}  {'sdpa ms':>9} {'idle ms':>9} {'modulate ms':>12} {'idle/sdpa':>10} {'mod/sdpa':>9}"
    )
    for i in range(0, len(rows), 3):
        sdpa, idle, mod = rows[i : i + 3]
        print(
            f"{sdpa['images']:>6} {sdpa['latent']:>4}^2 {sdpa['channels']:>5}  {sdpa['median_ms']:>9.3f} "
            f"{idle['median_ms']:>9.3f} {mod['median_ms']:>12.3f} {idle['ratio_vs_sdpa']:>9.2f}x {mod['ratio_vs_sdpa']:>8.2f}x"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "device": str(device),
            "device_name": name,
            "dtype": str(dtype),
            "torch": torch.__version__,
            "repeats": repeats,
            "torch_threads": torch.get_num_threads(),
        }
        args.json.write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
