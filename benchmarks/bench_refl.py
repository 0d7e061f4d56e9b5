"""Seconds per ReFL training step and peak memory, LoRA vs full UNet fine-tuning.

One step = what ``training/train_refl.py`` does per micro-step (``realign_pipeline.training.refl``): a no-grad
DDIM rollout to a drawn step, one UNet call with gradient, x0, VAE decode with gradient, reward objective +
hinge, ``L_pre`` on a batch of (random) images, backward, AdamW step. The two configurations run interleaved
after warm-up, with the same seeds, so the drawn gradient steps (hence the rollout lengths) are the same for both.

    # tiny random components on the CPU (what this machine can do)
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_refl.py --json benchmarks/results/refl_tiny_cpu.json
    # SD v1.5 shapes (random weights, benchmarks/sd15_random.py), 512x512, fp16, on a GPU
    python benchmarks/bench_refl.py --shape sd15 --device cuda --dtype float16 --size 512 --steps 50 \
        --grad-step-range 30 50 --gradient-checkpointing --json refl_sd15_fp16.json

Rewards: ``brightness`` (mean pixel; no model, so the figure is the diffusion side alone), ``tiny-clip`` (the
tiny random CLIP through ``realign_pipeline.rewards.ClipReward``), or ``load:<name>:<path>`` for a reward from
``load_reward`` with a local model. The issue's goal figure (LoRA ReFL with the BLIP-2 caption reward under
16 GiB at batch 1, the reward's share under 25%) needs a GPU and BLIP-2 at its real size: open.
Peak memory: ``torch.cuda.max_memory_allocated`` on CUDA; on the CPU the process's peak RSS (monotone over the
run, so only the first configuration's figure is its own -- the JSON says so). All configurations are resident
at once (to interleave them), so for a memory figure per configuration run one ``--configs`` at a time.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from realign_pipeline.training.lora import unet_lora_config
from realign_pipeline.training.refl import (
    decode,
    draw_grad_step,
    hinge_reward_loss,
    pretrain_loss,
    refl_latents,
    refl_step_loss,
)


class BrightnessReward:
    name = "brightness"

    def objective(self, pixels, prompts):
        return pixels.float().mean(dim=(1, 2, 3))

    def to(self, device=None, dtype=None):
        return self


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=["tiny", "sd15"], default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--steps", type=int, default=4, help="T of the rollout")
    p.add_argument("--grad-step-range", type=int, nargs=2, default=[2, 4])
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--reward", default="brightness")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--configs", nargs="+", default=["lora", "full"])
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args(argv)


def build_reward(spec: str, folder: Path):
    if spec == "brightness":
        return BrightnessReward()
    from realign_pipeline.rewards import load_reward

    if spec == "tiny-clip":
        from realign_pipeline.testing import tiny_clip

        return load_reward("clip", model=str(tiny_clip(folder / "clip")))
    _, name, path = spec.split(":", 2)
    return load_reward(name, **({"captioner": path} if name == "caption" else {"model": path}))


def build_components(shape: str, device: str, dtype: torch.dtype):
    if shape == "tiny":
        from realign_pipeline.testing import tiny_components

        comps = tiny_components()
        for k in ("unet", "vae", "text_encoder"):
            comps[k].to(device=device, dtype=dtype)
        return comps
    from sd15_random import sd15_components

    return sd15_components(device=device, dtype=dtype)


def make_config(name: str, base_unet_state, comps, args, dtype):
    """A fresh UNet (same initial weights) set up as the script does for ``name`` in {lora, full}."""
    import copy

    from diffusers.training_utils import cast_training_params

    unet = copy.deepcopy(comps["unet"])
    unet.load_state_dict(base_unet_state)
    if name == "lora":
        unet.requires_grad_(False)
        unet.add_adapter(unet_lora_config(args.rank))
        cast_training_params(unet, dtype=torch.float32)
    else:
        unet.to(dtype=torch.float32)  # full fine-tuning keeps fp32 master weights; autocast does the rest
        unet.requires_grad_(True)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    return unet, opt, params


def one_step(unet, opt, params, comps, reward, args, step: int, dtype):
    from diffusers import DDIMScheduler, DDPMScheduler

    device = args.device
    gen = torch.Generator().manual_seed(1000 + step)
    vae, te, tok = comps["vae"], comps["text_encoder"], comps["tokenizer"]
    rollout = DDIMScheduler.from_config(comps["scheduler"].config)
    noise_sched = DDPMScheduler.from_config(comps["scheduler"].config)
    prompts = ["a red book and a yellow vase"] * args.batch_size
    ids = tok(
        prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids.to(device)
    with torch.no_grad():
        cond = te(ids)[0]
    lat_hw = args.size // (2 ** (len(vae.config.block_out_channels) - 1))
    noise = torch.randn((args.batch_size, 4, lat_hw, lat_hw), generator=gen).to(device, dtype)
    i = draw_grad_step(args.grad_step_range, args.steps, gen)
    autocast = torch.autocast(
        device_type=torch.device(device).type, dtype=dtype, enabled=dtype != torch.float32
    )
    with autocast:
        out = refl_latents(unet, rollout, noise, cond, args.steps, i)
        pixels = decode(vae, out.x0.to(dtype))
        loss_refl = hinge_reward_loss(reward.objective(pixels, prompts), 1.0, 1e-3)
        images = (
            torch.rand((args.batch_size, 3, args.size, args.size), generator=gen).to(device, dtype) * 2 - 1
        )
        with torch.no_grad():
            lat = vae.encode(images).latent_dist.sample(generator=gen) * vae.config.scaling_factor
        loss = refl_step_loss(loss_refl, pretrain_loss(unet, noise_sched, lat, cond, gen), 1.0)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return i


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def peak_memory(device) -> dict:
    if str(device).startswith("cuda"):
        return {"peak_gib": torch.cuda.max_memory_allocated() / 2**30, "kind": "cuda max_memory_allocated"}
    return {
        "peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "kind": "process peak RSS",
    }


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    comps = build_components(args.shape, args.device, dtype)
    comps["vae"].requires_grad_(False)
    comps["text_encoder"].requires_grad_(False)
    base_state = {k: v.clone() for k, v in comps["unet"].state_dict().items()}
    with tempfile.TemporaryDirectory() as tmp:
        reward = build_reward(args.reward, Path(tmp))
        reward.to(args.device, dtype)
        setups = {name: make_config(name, base_state, comps, args, dtype) for name in args.configs}
        comps["unet"] = None  # the configurations hold their own copies
        times: dict[str, list[float]] = {n: [] for n in args.configs}
        peaks: dict[str, dict] = {}
        drawn: dict[str, list[int]] = {n: [] for n in args.configs}
        for r in range(args.warmup + args.repeats):
            for name in args.configs:
                unet, opt, params = setups[name]
                if str(args.device).startswith("cuda"):
                    torch.cuda.reset_peak_memory_stats()
                sync(args.device)
                t0 = time.perf_counter()
                i = one_step(unet, opt, params, comps, reward, args, r, dtype)
                sync(args.device)
                if r >= args.warmup:
                    times[name].append(time.perf_counter() - t0)
                    drawn[name].append(i)
                peaks[name] = peak_memory(args.device)
    result = {
        "shape": args.shape,
        "device": args.device,
        "dtype": args.dtype,
        "size": args.size,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "grad_step_range": args.grad_step_range,
        "reward": args.reward,
        "gradient_checkpointing": args.gradient_checkpointing,
        "lora_rank": args.rank,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "configs": {
            n: {
                "median_s_per_step": statistics.median(times[n]),
                "min_s": min(times[n]),
                "times_s": times[n],
                "drawn_grad_steps": drawn[n],
                "trainable_params": sum(p.numel() for p in setups[n][2]),
                **peaks[n],
            }
            for n in args.configs
        },
    }
    print(
        f"{args.shape} {args.device} {args.dtype} {args.size}px batch {args.batch_size} T={args.steps} "
        f"grad step in [{args.grad_step_range[0]}, {args.grad_step_range[1]}) reward={args.reward}"
    )
    print(f"{'config':<6} {'s/step (median)':>16} {'min':>8} {'trainable':>12} {'peak GiB':>9}  memory kind")
    for n, c in result["configs"].items():
        print(
            f"{n:<6} {c['median_s_per_step']:>16.3f} {c['min_s']:>8.3f} {c['trainable_params']:>12,} "
            f"{c['peak_gib']:>9.2f}  {c['kind']}"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
