#!/usr/bin/env python
"""ReFL fine-tuning of a Stable Diffusion UNet with a reward (RealignDiff Sec. 3.2.1, Eq. 5).

The coarse stage of RealignDiff: each optimizer step runs the ReFL pass (no-grad denoising to a random late
step, one UNet call with gradient at the scheduler's timestep, x0 predicted directly, VAE decode with
gradient, hinge on the reward objective) and adds ``L_pre``, the ordinary denoising loss on real
image-caption pairs::

    loss = reward_weight * relu(reward_margin - objective).mean() + pretrain_loss_weight * L_pre   (Eq. 5)

Beside ReFL (the default), ``--backprop_steps K`` takes the reward's gradient the DRaFT way (Clark et al.,
ICLR 2024): sample without gradient to step T-K, run the last K steps with gradient, decode the chain's final
latents and back-propagate the reward through all K steps; K = T is the full chain (DRaFT / AlignProp),
``--checkpoint_denoising_steps`` recomputes each step's UNet call in the backward pass, and
``--backprop_steps 1 --draft_lv_samples N`` is DRaFT-LV. The math is in ``realign_pipeline.training.draft``.

Stable Diffusion XL: when the checkpoint's ``model_index.json`` names ``StableDiffusionXLPipeline`` (or
``RealignDiffXLPipeline``), the same steps run on SDXL's UNet with its added conditioning (both text encoders'
context, the pooled embedding and the time ids, ``realign_pipeline.training.sdxl``), the VAE in float32 unless
``--pretrained_vae_model_name_or_path`` gives one that is safe in half precision (as diffusers'
``train_text_to_image_lora_sdxl.py``), images at 1024 px unless ``--resolution`` says otherwise, and LoRA weights
saved with ``StableDiffusionXLPipeline.save_lora_weights``.

Flags and habits follow diffusers' ``examples/text_to_image/train_text_to_image_lora.py``. The step math
lives in ``realign_pipeline.training.refl``; the data readers in ``realign_pipeline.training.data``. See
``docs/training.md``.

    accelerate launch training/train_refl.py \
      --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \
      --train_data_dir coco_train --prompts_file coco_captions.txt --reward caption \
      --use_lora --rank 64 --learning_rate 1e-5 --train_batch_size 4 --gradient_accumulation_steps 4 \
      --mixed_precision fp16 --max_train_steps 2000 --output_dir refl-lora
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from accelerate.logging import get_logger

from realign_pipeline.training.data import DataError, RowStream, load_pairs, load_prompts, open_image
from realign_pipeline.training.draft import draft_latents
from realign_pipeline.training.lora import unet_lora_config
from realign_pipeline.training.refl import (
    decode,
    draw_grad_step,
    hinge_reward_loss,
    pretrain_loss,
    refl_latents,
    refl_step_loss,
)
from realign_pipeline.training.sdxl import encode_prompt_xl, is_sdxl, read_model_index, time_ids

logger = get_logger("train_refl")

REWARDS = ("caption", "clip", "blip", "imagereward")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="ReFL fine-tuning (RealignDiff coarse stage, Eq. 5).")
    # model
    p.add_argument("--pretrained_model_name_or_path", type=str, required=True)
    p.add_argument("--revision", type=str, default=None)
    p.add_argument("--variant", type=str, default=None)
    p.add_argument("--cache_dir", type=str, default=None)
    p.add_argument(
        "--pretrained_vae_model_name_or_path",
        type=str,
        default=None,
        help="A VAE to use instead of the checkpoint's (a VAE folder or hub id, or a pipeline folder with vae/), "
        "e.g. madebyollin/sdxl-vae-fp16-fix for SDXL in half precision. Without it an SDXL VAE runs in float32.",
    )
    # reward
    p.add_argument("--reward", choices=REWARDS, default="caption")
    p.add_argument(
        "--reward_model_path",
        type=str,
        default=None,
        help="Hub id or local folder of the reward's main model (BLIP-2 captioner, CLIP, BLIP-2 ITM, ImageReward).",
    )
    p.add_argument(
        "--reward_text_model_path",
        type=str,
        default=None,
        help="Caption reward: hub id or local folder of the BLIP-2 text encoder (Eq. 4 embeddings).",
    )
    p.add_argument(
        "--reward_objective",
        type=str,
        default=None,
        help="Caption reward: which differentiable objective stands in for Eq. 4 (see docs/rewards.md).",
    )
    p.add_argument(
        "--reward_kwargs",
        type=str,
        default=None,
        help="JSON object of extra keyword arguments for realign_pipeline.rewards.load_reward.",
    )
    p.add_argument(
        "--reward_class",
        type=str,
        default=None,
        help="module:callable returning a custom Reward (same protocol); overrides --reward.",
    )
    p.add_argument("--reward_weight", type=float, default=1e-3, help="lambda of Eq. 5 (paper: 1e-3).")
    p.add_argument(
        "--reward_margin",
        type=float,
        default=1.0,
        help="Hinge: loss_refl = reward_weight * relu(reward_margin - objective).",
    )
    p.add_argument("--num_inference_steps", type=int, default=50, help="T of the ReFL rollout (paper: 50).")
    p.add_argument(
        "--grad_step_range",
        type=int,
        nargs=2,
        default=None,
        metavar=("LO", "HI"),
        help="ReFL: step index (out of T) at which the gradient is taken, uniform on [LO, HI) (default 30 50). "
        "Not with --backprop_steps, whose gradient steps are the last K.",
    )
    p.add_argument(
        "--backprop_steps",
        type=int,
        default=None,
        metavar="K",
        help="DRaFT-K: sample without gradient to step T-K, then back-propagate the reward of the final image "
        "through the last K denoising steps; K = --num_inference_steps is the full chain (DRaFT / AlignProp). "
        "Default (or 0): ReFL.",
    )
    p.add_argument(
        "--checkpoint_denoising_steps",
        action="store_true",
        help="With --backprop_steps: recompute each gradient step's UNet call in the backward pass "
        "(torch.utils.checkpoint per denoising step), so memory grows by a few latents per step instead of the "
        "UNet's activations per step. Independent of --gradient_checkpointing (inside the UNet).",
    )
    p.add_argument(
        "--draft_lv_samples",
        type=int,
        default=0,
        metavar="N",
        help="DRaFT-LV (with --backprop_steps 1): the whole chain without gradient, then N re-noisings of the "
        "final sample to the last timestep, each denoised by one step with gradient; the N rewards are averaged "
        "(the paper uses 2). Default 0: off.",
    )
    p.add_argument(
        "--rollout_guidance_scale",
        type=float,
        default=None,
        help="Classifier-free guidance (default: off, as ImageReward). ReFL: in the no-grad rollout only; "
        "--backprop_steps: at every step of the chain, those with gradient included.",
    )
    p.add_argument(
        "--pretrain_loss_weight", type=float, default=1.0, help="Weight of L_pre (0 allowed, warned)."
    )
    # data
    p.add_argument(
        "--prompts_file", type=str, default=None, help="Reward prompts: text file, one per line (or .jsonl)."
    )
    p.add_argument(
        "--prompts_dataset", type=str, default=None, help="Reward prompts: a `datasets` name or folder."
    )
    p.add_argument("--prompts_column", type=str, default="text")
    p.add_argument(
        "--dataset_name", type=str, default=None, help="Image-caption pairs for L_pre (`datasets`)."
    )
    p.add_argument("--dataset_config_name", type=str, default=None)
    p.add_argument(
        "--train_data_dir",
        type=str,
        default=None,
        help="Image-caption pairs for L_pre: an imagefolder with metadata.jsonl/metadata.csv.",
    )
    p.add_argument("--image_column", type=str, default="image")
    p.add_argument("--caption_column", type=str, default="text")
    p.add_argument(
        "--resolution", type=int, default=None, help="Image size of L_pre and the ReFL images (default 512; SDXL: 1024)."
    )
    p.add_argument("--center_crop", action="store_true")
    p.add_argument("--random_flip", action="store_true")
    # training
    p.add_argument("--output_dir", type=str, default="refl-model")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--train_batch_size", type=int, default=1)
    p.add_argument("--max_train_steps", type=int, default=1000)
    p.add_argument("--gradient_accumulation_steps", type=int, default=1)
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument(
        "--vae_gradient_checkpointing",
        action="store_true",
        help="Also checkpoint the VAE (its decoder runs with gradient in the ReFL pass).",
    )
    p.add_argument("--learning_rate", type=float, default=1e-5)
    p.add_argument("--scale_lr", action="store_true")
    p.add_argument("--lr_scheduler", type=str, default="constant")
    p.add_argument("--lr_warmup_steps", type=int, default=0)
    p.add_argument("--use_8bit_adam", action="store_true")
    p.add_argument("--allow_tf32", action="store_true")
    p.add_argument("--adam_beta1", type=float, default=0.9)
    p.add_argument("--adam_beta2", type=float, default=0.999)
    p.add_argument("--adam_weight_decay", type=float, default=1e-2)
    p.add_argument("--adam_epsilon", type=float, default=1e-08)
    p.add_argument("--max_grad_norm", type=float, default=1.0)
    p.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None)
    p.add_argument(
        "--use_lora", action="store_true", help="Train a LoRA adapter on the UNet (else full fine-tuning)."
    )
    p.add_argument("--rank", type=int, default=4, help="LoRA rank.")
    p.add_argument(
        "--use_ema", action="store_true", help="Full fine-tuning only: keep an EMA of the UNet and save it."
    )
    p.add_argument("--ema_decay", type=float, default=0.9999)
    # checkpoints, logging, validation, hub
    p.add_argument("--checkpointing_steps", type=int, default=500)
    p.add_argument("--checkpoints_total_limit", type=int, default=None)
    p.add_argument(
        "--resume_from_checkpoint", type=str, default=None, help='A checkpoint folder or "latest".'
    )
    p.add_argument("--logging_dir", type=str, default="logs")
    p.add_argument("--report_to", type=str, default="tensorboard")
    p.add_argument("--validation_prompts", type=str, nargs="*", default=None)
    p.add_argument(
        "--validation_steps", type=int, default=None, help="Also validate every N steps (default: end only)."
    )
    p.add_argument("--num_validation_images", type=int, default=1)
    p.add_argument("--push_to_hub", action="store_true")
    p.add_argument("--hub_token", type=str, default=None)
    p.add_argument("--hub_model_id", type=str, default=None)
    p.add_argument("--dataloader_num_workers", type=int, default=0)
    args = p.parse_args(argv)

    env_local_rank = int(os.environ.get("LOCAL_RANK", "-1"))
    if args.num_inference_steps < 1:
        p.error("--num_inference_steps must be >= 1")
    if args.backprop_steps is not None and args.backprop_steps < 0:
        p.error("--backprop_steps must be >= 1 (or 0 for ReFL)")
    args.backprop_steps = args.backprop_steps or None  # 0 means ReFL, like the default
    if args.backprop_steps is None:
        if args.checkpoint_denoising_steps:
            p.error(
                "--checkpoint_denoising_steps needs --backprop_steps (ReFL has one UNet call with gradient; "
                "--gradient_checkpointing checkpoints inside it)"
            )
        if args.draft_lv_samples:
            p.error("--draft_lv_samples needs --backprop_steps 1")
        if args.grad_step_range is None:
            args.grad_step_range = [30, 50]
        lo, hi = args.grad_step_range
        if not 0 <= lo < hi <= args.num_inference_steps:
            p.error(
                f"--grad_step_range {lo} {hi} must satisfy 0 <= LO < HI <= --num_inference_steps ({args.num_inference_steps})"
            )
    else:
        if args.grad_step_range is not None:
            p.error(
                "--grad_step_range is ReFL's random gradient step; with --backprop_steps K the gradient goes "
                "through the last K steps: give one or the other"
            )
        if args.backprop_steps > args.num_inference_steps:
            p.error(
                f"--backprop_steps {args.backprop_steps} is more than --num_inference_steps "
                f"({args.num_inference_steps}); K = T is the full chain"
            )
        if args.draft_lv_samples < 0 or (args.draft_lv_samples and args.backprop_steps != 1):
            p.error(
                "--draft_lv_samples N needs N >= 1 and --backprop_steps 1 (DRaFT-LV is a K = 1 estimator)"
            )
    if args.prompts_file and args.prompts_dataset:
        p.error("give --prompts_file or --prompts_dataset, not both")
    if args.train_data_dir and args.dataset_name:
        p.error("give --dataset_name or --train_data_dir, not both")
    if args.pretrain_loss_weight < 0:
        p.error("--pretrain_loss_weight must be >= 0")
    if args.pretrain_loss_weight > 0 and not (args.train_data_dir or args.dataset_name):
        p.error(
            "L_pre needs image-caption pairs: give --train_data_dir or --dataset_name (or --pretrain_loss_weight 0)"
        )
    if args.use_ema and args.use_lora:
        p.error("--use_ema is for full fine-tuning; drop it with --use_lora")
    if args.push_to_hub and args.hub_token is not None:
        p.error("do not pass --hub_token (it would be logged); run `hf auth login` instead")
    if args.report_to == "none":
        args.report_to = None
    if args.report_to == "tensorboard":
        import importlib.util

        if (
            importlib.util.find_spec("tensorboard") is None
            and importlib.util.find_spec("tensorboardX") is None
        ):
            # the logger needs accelerate's state, which main() creates later
            warnings.warn(
                "tensorboard is not installed: logging to tensorboard is off (pip install tensorboard)",
                stacklevel=2,
            )
            args.report_to = None
    args.local_rank = env_local_rank
    # SDXL or SD 1.x/2.x, from the checkpoint's model_index.json (SD when it cannot be read)
    args.sdxl = is_sdxl(read_model_index(args.pretrained_model_name_or_path, args.revision, args.cache_dir))
    if args.resolution is None:
        args.resolution = 1024 if args.sdxl else 512
    return args


# --------------------------------------------------------------------------------------------------- helpers
def check_8bit_adam() -> Any:
    """``bitsandbytes.optim.AdamW8bit``, or a clear error (it needs the package and a CUDA GPU)."""
    if not torch.cuda.is_available():
        raise SystemExit("--use_8bit_adam needs a CUDA GPU and bitsandbytes; drop the flag on this machine.")
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise SystemExit(
            "--use_8bit_adam needs bitsandbytes: pip install bitsandbytes (or drop the flag)."
        ) from None
    return bnb.optim.AdamW8bit


def make_reward(args: argparse.Namespace):
    """``realign_pipeline.rewards.load_reward(args.reward, ...)`` with the path flags mapped to its kwargs."""
    kwargs: dict[str, Any] = json.loads(args.reward_kwargs) if args.reward_kwargs else {}
    if args.reward_class:
        import importlib

        module, _, attr = args.reward_class.partition(":")
        return getattr(importlib.import_module(module), attr)(**kwargs)
    from realign_pipeline.rewards import load_reward

    if args.reward == "caption":
        if args.reward_model_path:
            kwargs.setdefault("captioner", args.reward_model_path)
        if args.reward_text_model_path:
            kwargs.setdefault("text_encoder", args.reward_text_model_path)
        if args.reward_objective:
            kwargs.setdefault("objective", args.reward_objective)
    else:
        if args.reward_text_model_path or args.reward_objective:
            raise SystemExit("--reward_text_model_path and --reward_objective are for --reward caption")
        if args.reward_model_path:
            kwargs.setdefault("model", args.reward_model_path)
    return load_reward(args.reward, **kwargs)


def image_transform(resolution: int, center_crop: bool, random_flip: bool):
    """PIL -> (3, R, R) tensor in [-1, 1]: resize shortest side, crop, optional flip (no torchvision)."""
    tf = image_transform_with_crop(resolution, center_crop, random_flip)

    def tensor_only(img: Any, generator: torch.Generator | None = None) -> torch.Tensor:
        return tf(img, generator)[0]

    return tensor_only


def image_transform_with_crop(resolution: int, center_crop: bool, random_flip: bool):
    """:func:`image_transform` that also says what SDXL's time ids need: ``(tensor, original (height, width),
    crop (top, left))``, the crop's corner in the resized image (mirrored for a flipped image). The same random
    draws as :func:`image_transform`, so both give the same tensor for the same generator."""
    import numpy as np
    from PIL import Image

    def tf(img: Image.Image, generator: torch.Generator | None = None):
        w, h = img.size
        original = (h, w)
        s = resolution / min(w, h)
        img = img.resize((max(resolution, round(w * s)), max(resolution, round(h * s))), Image.BILINEAR)
        w, h = img.size
        if center_crop:
            left, top = (w - resolution) // 2, (h - resolution) // 2
        else:
            left = int(torch.randint(0, w - resolution + 1, (1,), generator=generator))
            top = int(torch.randint(0, h - resolution + 1, (1,), generator=generator))
        img = img.crop((left, top, left + resolution, top + resolution))
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
        if random_flip and bool(torch.rand((), generator=generator) < 0.5):
            x = x.flip(-1)
            left = w - resolution - left
        return x, original, (top, left)

    return tf


def _pair_loader(row: Any):
    image_value, caption = row
    if not isinstance(caption, str):
        caption = caption[0] if isinstance(caption, (list, tuple)) and caption else None
    if not caption or not caption.strip():
        return None
    image = open_image(image_value)
    if image is None:
        return None
    return image, caption.strip()


def training_mode(args: argparse.Namespace) -> str:
    """The reward-gradient mode in words, for the log, ``train_stats.json`` and the model card."""
    t = args.num_inference_steps
    if not args.backprop_steps:
        lo, hi = args.grad_step_range
        return f"ReFL (one gradient step drawn from [{lo}, {hi}) of T={t}, x0 predicted at that step)"
    ckpt = ", each step checkpointed" if args.checkpoint_denoising_steps else ""
    if args.draft_lv_samples:
        return f"DRaFT-LV (n={args.draft_lv_samples} re-noisings of the final sample, T={t}{ckpt})"
    if args.backprop_steps == t:
        return f"DRaFT full chain (gradient through all T={t} steps{ckpt})"
    return f"DRaFT-K (gradient through the last K={args.backprop_steps} of T={t} steps{ckpt})"


def step_generator(seed: int, micro_step: int, rank: int) -> torch.Generator:
    """All randomness of one micro-step (noise, drawn step, DRaFT-LV's re-noising, L_pre timesteps) from (seed,
    step, rank): a resumed run draws exactly what the uninterrupted run drew."""
    return torch.Generator().manual_seed((seed * 1_000_003 + micro_step) * 1009 + rank)


def list_checkpoints(output_dir: str) -> list[str]:
    """The ``checkpoint-N`` folder names in ``output_dir``, oldest first (none if there is no such folder)."""
    if not os.path.isdir(output_dir):
        return []
    return sorted(
        (d for d in os.listdir(output_dir) if d.startswith("checkpoint-")), key=lambda d: int(d.split("-")[1])
    )


def save_lora(unet: Any, output_dir: str, sdxl: bool = False) -> None:
    """The UNet's LoRA layers to ``pytorch_lora_weights.safetensors``, for ``load_lora_weights``
    (``StableDiffusionXLPipeline``'s with ``sdxl``, ``StableDiffusionPipeline``'s otherwise)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    (StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline).save_lora_weights(
        output_dir,
        unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)),
        safe_serialization=True,
    )


def load_vae(name_or_path: str) -> Any:
    """``--pretrained_vae_model_name_or_path``: a VAE folder or hub id (``config.json`` at its top), or a pipeline
    folder with ``vae/``."""
    from diffusers import AutoencoderKL

    local = Path(name_or_path)
    subfolder = "vae" if (local / "vae" / "config.json").is_file() and not (local / "config.json").is_file() else None
    return AutoencoderKL.from_pretrained(name_or_path, subfolder=subfolder)


def save_checkpoint(
    accelerator: Any,
    args: argparse.Namespace,
    step: int,
    micro_step: int,
    skipped_nonfinite: int,
    streams: dict[str, RowStream | None],
) -> None:
    """Write ``checkpoint-{step}``: accelerate's state (trained weights via the hooks), ``train_state.json``.

    Every process hands in its own data position (``streams``: ``prompts`` and ``pairs``); the main process
    prunes old checkpoints down to ``--checkpoints_total_limit`` and writes the positions of all ranks.
    """
    ckpt = os.path.join(args.output_dir, f"checkpoint-{step}")
    if accelerator.is_main_process and args.checkpoints_total_limit is not None:
        dirs = list_checkpoints(args.output_dir)
        for d in dirs[: max(0, len(dirs) - args.checkpoints_total_limit + 1)]:
            shutil.rmtree(os.path.join(args.output_dir, d))
    accelerator.wait_for_everyone()
    accelerator.save_state(ckpt)
    positions = {name: None if stream is None else stream.state_dict() for name, stream in streams.items()}
    gathered = [positions]
    if accelerator.num_processes > 1:
        import torch.distributed as dist

        gathered = [None] * accelerator.num_processes
        dist.all_gather_object(gathered, positions)
    if accelerator.is_main_process:
        with open(os.path.join(ckpt, "train_state.json"), "w") as f:
            json.dump(
                {
                    "global_step": step,
                    "micro_step": micro_step,
                    "skipped_nonfinite": skipped_nonfinite,
                    "data": {str(r): g for r, g in enumerate(gathered)},
                },
                f,
                indent=1,
            )
    accelerator.wait_for_everyone()
    logger.info(f"saved {ckpt}")


def validate(
    accelerator: Any,
    args: argparse.Namespace,
    step: int,
    seed: int,
    *,
    vae: Any,
    text_encoder: Any,
    tokenizer: Any,
    unet: Any,
    scheduler: Any,
    text_encoder_2: Any = None,
    tokenizer_2: Any = None,
) -> list[str]:
    """Images of ``--validation_prompts`` under ``output_dir/validation/`` (and to tensorboard); their paths.

    ``unet`` is the unwrapped model; it is put back in training mode afterwards. Main process only. With
    ``text_encoder_2`` and ``tokenizer_2`` (SDXL) the images come from ``StableDiffusionXLPipeline``.
    """
    if not args.validation_prompts or not accelerator.is_main_process:
        return []
    if text_encoder_2 is not None:
        from diffusers import StableDiffusionXLPipeline

        pipe = StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            unet=unet,
            scheduler=scheduler,
            add_watermarker=False,
        )
    else:
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    pipe.set_progress_bar_config(disable=True)
    out_dir = Path(args.output_dir) / "validation"
    out_dir.mkdir(parents=True, exist_ok=True)
    paths, images = [], []
    g = torch.Generator(device=accelerator.device).manual_seed(seed)
    with torch.no_grad(), accelerator.autocast():
        for j, prompt in enumerate(args.validation_prompts):
            for k in range(args.num_validation_images):
                img = pipe(
                    prompt,
                    num_inference_steps=args.num_inference_steps,
                    generator=g,
                    height=args.resolution,
                    width=args.resolution,
                ).images[0]
                name = f"validation/step{step}_{j}_{k}.png"
                img.save(Path(args.output_dir) / name)
                paths.append(name)
                images.append(img)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            import numpy as np

            tracker.writer.add_images(
                "validation", np.stack([np.asarray(i) for i in images]), step, dataformats="NHWC"
            )
    unet.train()
    return paths


#: The run's settings listed in the model card, in this order.
MODEL_CARD_SETTINGS = (
    "reward",
    "reward_model_path",
    "reward_text_model_path",
    "reward_weight",
    "reward_margin",
    "num_inference_steps",
    "grad_step_range",
    "backprop_steps",
    "checkpoint_denoising_steps",
    "draft_lv_samples",
    "rollout_guidance_scale",
    "pretrain_loss_weight",
    "prompts_file",
    "prompts_dataset",
    "dataset_name",
    "train_data_dir",
    "resolution",
    "learning_rate",
    "lr_scheduler",
    "train_batch_size",
    "gradient_accumulation_steps",
    "max_train_steps",
    "mixed_precision",
    "seed",
    "use_lora",
    "rank",
    "use_ema",
)


def save_model_card(args: argparse.Namespace, stats: dict, images: list[str]) -> None:
    """``output_dir/README.md``: diffusers' training model card with the run's settings, counts and images."""
    from diffusers.utils.hub_utils import MODEL_CARD_TEMPLATE_PATH, populate_model_card
    from huggingface_hub import ModelCard, ModelCardData

    base = args.pretrained_model_name_or_path
    kind = (
        f"LoRA (rank {args.rank})"
        if args.use_lora
        else "full UNet fine-tuning" + (" + EMA" if args.use_ema else "")
    )
    method = "ReFL" if not args.backprop_steps else "DRaFT"
    sdxl = getattr(args, "sdxl", False)
    settings = MODEL_CARD_SETTINGS + (("sdxl", "pretrained_vae_model_name_or_path") if sdxl else ())
    lines = [
        f"# {method} fine-tune of {base} ({kind})",
        "",
        "Trained with `training/train_refl.py` of realign-pipeline (RealignDiff coarse stage, Eq. 5):",
        "`loss = reward_weight * relu(reward_margin - objective) + pretrain_loss_weight * L_pre`.",
        "",
        f"Reward gradient: {training_mode(args)}.",
        "",
        "| setting | value |",
        "|---|---|",
        *(f"| {k} | {getattr(args, k)} |" for k in settings),
        f"| effective batch | {stats.get('effective_batch')} |",
        f"| steps done | {stats.get('global_step')} |",
        f"| skipped non-finite steps | {stats.get('skipped_nonfinite')} |",
        f"| skipped bad data rows | {stats.get('skipped_rows')} |",
        "",
    ]
    if images:
        lines += ["## Validation images", ""] + [f"![{Path(i).stem}]({i})" for i in images] + [""]
    pipeline = "RealignDiffXLPipeline" if sdxl else "RealignDiffPipeline"
    load = (
        [
            f'pipe = {pipeline}.from_pretrained("{base}")',
            'pipe.load_lora_weights("<this folder or repo>")',
        ]
        if args.use_lora
        else [f'pipe = {pipeline}.from_pretrained("<this folder or repo>")']
    )
    lines += ["## Use", "", "```python", f"from realign_pipeline import {pipeline}", *load, "```", ""]
    # diffusers' training template, as load_or_create_model_card builds it when the repo has no card yet. That
    # function would first fetch the repo's card from the Hub: an earlier push's card instead of this run's, or,
    # offline, a wait through the request's retries.
    card = ModelCard.from_template(
        card_data=ModelCardData(library_name="diffusers", base_model=base),
        template_path=MODEL_CARD_TEMPLATE_PATH,
        model_description="\n".join(lines),
    )
    tags = ["stable-diffusion", "text-to-image", "diffusers", "realigndiff", method.lower()]
    if sdxl:
        tags.insert(1, "stable-diffusion-xl")
    card = populate_model_card(card, tags=tags + (["lora"] if args.use_lora else []))
    card.save(os.path.join(args.output_dir, "README.md"))


def push_to_hub(args: argparse.Namespace) -> str:
    """Create the repo and upload the output folder (checkpoints left out)."""
    from huggingface_hub import create_repo, upload_folder

    repo_id = create_repo(repo_id=args.hub_model_id or Path(args.output_dir).name, exist_ok=True).repo_id
    upload_folder(
        repo_id=repo_id,
        folder_path=args.output_dir,
        commit_message="End of ReFL training",
        ignore_patterns=["step_*", "epoch_*", "checkpoint-*", "logs/*"],
    )
    return repo_id


def to_device(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """``model.to(device, dtype)``, the dtype left out when the model has it already: diffusers' ``to`` warns
    about modules "that should be kept in float32: []" on every dtype argument, even a no-op one."""
    if model.dtype == dtype:
        model.to(device)
    else:
        model.to(device, dtype=dtype)


# ------------------------------------------------------------------------------------------------------ main

def main(
    args: argparse.Namespace, reward: Any = None, step_callback: Callable[[int], None] | None = None
) -> dict:
    """Train. ``reward`` overrides ``--reward`` (tests); ``step_callback(global_step)`` runs after each step.

    Returns a dict of statistics (``global_step``, ``skipped_nonfinite``, ``skipped_rows``, ``losses``...).
    """
    # ---- everything that can fail cheaply fails here, before any model is loaded
    pairs = (
        load_pairs(args)
        if args.pretrain_loss_weight > 0 or args.train_data_dir or args.dataset_name
        else None
    )
    prompts = load_prompts(args, pairs)
    optimizer_cls = check_8bit_adam() if args.use_8bit_adam else torch.optim.AdamW
    if reward is None:
        reward = make_reward(args)  # the reward classes load their models lazily

    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel, cast_training_params
    from transformers import CLIPTextModel, CLIPTokenizer

    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    # `accelerate launch --multi_gpu` on a machine without CUDA: run the processes on the CPU (gloo) rather
    # than as independent single-process runs.
    launched = int(os.environ.get("LOCAL_RANK", "-1")) != -1 or int(os.environ.get("WORLD_SIZE", "1")) > 1
    accelerator = Accelerator(
        cpu=launched and not torch.cuda.is_available(),
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=args.report_to,
        project_config=ProjectConfiguration(
            project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, args.logging_dir)
        ),
    )
    if args.pretrain_loss_weight == 0:
        logger.warning(
            "--pretrain_loss_weight 0: L_pre is off. ReFL without the pre-training loss is known to "
            "degrade image quality (reward hacking); Eq. 5 keeps it.",
            main_process_only=True,
        )
    seed = args.seed if args.seed is not None else 0
    set_seed(seed)
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)

    # ---- models
    path, rev, var = args.pretrained_model_name_or_path, args.revision, args.variant
    sdxl = getattr(args, "sdxl", False)
    tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", revision=rev)
    text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", revision=rev, variant=var)
    custom_vae = getattr(args, "pretrained_vae_model_name_or_path", None)
    if custom_vae:
        vae = load_vae(custom_vae)
    else:
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", revision=rev, variant=var)
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", revision=rev, variant=var)
    noise_scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
    if sdxl:
        # SDXL ships Euler; the rollout is DDIM on its noise schedule (x0 from alphas_cumprod, as for SD), without
        # DDIM's x0 clipping, which SDXL's own sampler does not do
        rollout_scheduler = DDIMScheduler.from_pretrained(path, subfolder="scheduler", clip_sample=False)
    else:
        rollout_scheduler = DDIMScheduler.from_pretrained(path, subfolder="scheduler")
    text_encoder.requires_grad_(False)
    vae.requires_grad_(False)
    tokenizer_2 = text_encoder_2 = None
    if sdxl:
        from transformers import CLIPTextModelWithProjection

        tokenizer_2 = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2", revision=rev)
        text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(
            path, subfolder="text_encoder_2", revision=rev, variant=var
        )
        text_encoder_2.requires_grad_(False)

    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
        accelerator.mixed_precision, torch.float32
    )
    # SDXL's VAE overflows in float16: float32 unless --pretrained_vae_model_name_or_path gives a safe one
    vae_dtype = torch.float32 if sdxl and not custom_vae else weight_dtype
    if args.use_lora:
        unet.requires_grad_(False)
        to_device(unet, accelerator.device, weight_dtype)
        unet.add_adapter(unet_lora_config(args.rank))
        if args.mixed_precision == "fp16":
            cast_training_params(unet, dtype=torch.float32)
    else:
        unet.requires_grad_(True)
        unet.train()
    ema_unet = (
        EMAModel(
            unet.parameters(), decay=args.ema_decay, model_cls=UNet2DConditionModel, model_config=unet.config
        )
        if args.use_ema
        else None
    )
    to_device(vae, accelerator.device, vae_dtype)
    text_encoder.to(accelerator.device, dtype=weight_dtype)
    if text_encoder_2 is not None:
        text_encoder_2.to(accelerator.device, dtype=weight_dtype)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if args.vae_gradient_checkpointing:
        vae.enable_gradient_checkpointing()  # the decode in the ReFL pass carries a gradient

    reward.to(accelerator.device, weight_dtype)

    # ---- save/load hooks: checkpoint-N holds only what is trained (LoRA layers or the UNet, + EMA)
    def save_model_hook(models, weights, output_dir):
        if not accelerator.is_main_process:
            return
        for model in models:
            m = accelerator.unwrap_model(model)
            if args.use_lora:
                save_lora(m, output_dir, sdxl=sdxl)
            else:
                m.save_pretrained(os.path.join(output_dir, "unet"))
            if weights:
                weights.pop()
        if ema_unet is not None:
            ema_unet.save_pretrained(os.path.join(output_dir, "unet_ema"))

    def load_model_hook(models, input_dir):
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
        from diffusers.utils import convert_unet_state_dict_to_peft
        from peft.utils import set_peft_model_state_dict

        while models:
            model = accelerator.unwrap_model(models.pop())
            if args.use_lora:
                sd, _ = (StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline).lora_state_dict(input_dir)
                sd = {k.replace("unet.", "", 1): v for k, v in sd.items() if k.startswith("unet.")}
                incompatible = set_peft_model_state_dict(
                    model, convert_unet_state_dict_to_peft(sd), adapter_name="default"
                )
                if incompatible is not None and getattr(incompatible, "unexpected_keys", None):
                    raise RuntimeError(
                        f"unexpected LoRA keys in {input_dir}: {incompatible.unexpected_keys[:5]}"
                    )
                if args.mixed_precision == "fp16":
                    cast_training_params([model], dtype=torch.float32)
            else:
                loaded = UNet2DConditionModel.from_pretrained(input_dir, subfolder="unet")
                model.register_to_config(**loaded.config)
                model.load_state_dict(loaded.state_dict())
                del loaded
        if ema_unet is not None:
            loaded = EMAModel.from_pretrained(os.path.join(input_dir, "unet_ema"), UNet2DConditionModel)
            ema_unet.load_state_dict(loaded.state_dict())
            del loaded

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)

    # ---- optimizer, scheduler
    lr = args.learning_rate
    if args.scale_lr:
        lr *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = optimizer_cls(
        params,
        lr=lr,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_train_steps * accelerator.num_processes,
    )
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    if ema_unet is not None:
        ema_unet.to(accelerator.device)

    rank, world = accelerator.process_index, accelerator.num_processes
    prompt_stream = RowStream(prompts, seed, rank, world)
    pair_stream = RowStream(pairs, seed + 1, rank, world, load=_pair_loader) if pairs is not None else None
    transform = image_transform(args.resolution, args.center_crop, args.random_flip)
    transform_with_crop = image_transform_with_crop(args.resolution, args.center_crop, args.random_flip)

    if accelerator.is_main_process and args.report_to:
        cfg = {k: (str(v) if isinstance(v, (list, tuple)) or v is None else v) for k, v in vars(args).items()}
        accelerator.init_trackers("refl", config=cfg)

    # ---- resume: weights (hooks), optimizer, LR scheduler, RNG (accelerate) + data position (ours)
    global_step, micro_step, skipped_nonfinite = 0, 0, 0
    if args.resume_from_checkpoint:
        if args.resume_from_checkpoint != "latest":
            ckpt = args.resume_from_checkpoint
        else:
            dirs = list_checkpoints(args.output_dir)
            ckpt = os.path.join(args.output_dir, dirs[-1]) if dirs else None
        if ckpt is None or not os.path.isdir(ckpt):
            logger.warning(f"checkpoint {args.resume_from_checkpoint!r} not found; starting a new run")
        else:
            logger.info(f"resuming from {ckpt}")
            accelerator.load_state(ckpt)
            state_file = os.path.join(ckpt, "train_state.json")
            if os.path.isfile(state_file):
                with open(state_file) as f:
                    state = json.load(f)
            else:  # killed between save_state and writing the data position
                step = int(os.path.basename(os.path.normpath(ckpt)).split("-")[-1])
                logger.warning(
                    f"{state_file} missing: data position unknown, restarting the data order at step {step}"
                )
                state = {
                    "global_step": step,
                    "micro_step": step * args.gradient_accumulation_steps,
                    "skipped_nonfinite": 0,
                    "data": {},
                }
            global_step, micro_step = state["global_step"], state["micro_step"]
            skipped_nonfinite = state["skipped_nonfinite"]
            ranks = state["data"]
            if str(rank) in ranks:
                prompt_stream.load_state_dict(ranks[str(rank)]["prompts"])
                if pair_stream is not None and ranks[str(rank)]["pairs"] is not None:
                    pair_stream.load_state_dict(ranks[str(rank)]["pairs"])

    def encode(texts: list[str]) -> torch.Tensor:
        ids = tokenizer(
            texts,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(accelerator.device)
        with torch.no_grad():
            return text_encoder(ids)[0]

    negative = encode([""]) if args.rollout_guidance_scale and args.rollout_guidance_scale > 1 and not sdxl else None
    latent_hw = args.resolution // (2 ** (len(vae.config.block_out_channels) - 1))

    # ---- SDXL: both encoders' context, the pooled embedding and the time ids (added conditioning)
    def encode_xl(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return encode_prompt_xl(texts, (tokenizer, tokenizer_2), (text_encoder, text_encoder_2), accelerator.device)

    size = (args.resolution, args.resolution)
    rollout_time_ids = time_ids([size], [(0, 0)], size, accelerator.device, weight_dtype) if sdxl else None
    negative_xl = None  # (context, pooled) of the empty prompt, for a guided rollout
    if sdxl and args.rollout_guidance_scale and args.rollout_guidance_scale > 1:
        model_index = read_model_index(path, rev, args.cache_dir) or {}
        if model_index.get("force_zeros_for_empty_prompt", True):  # SDXL's default: zeros, not encode("")
            context, pooled = encode_xl([""])
            negative_xl = (torch.zeros_like(context), torch.zeros_like(pooled))
        else:
            negative_xl = encode_xl([""])

    def vae_precision():
        """Autocast off around an SDXL VAE kept in float32 under mixed precision, so it really runs in float32."""
        if vae_dtype == torch.float32 and weight_dtype != torch.float32:
            return torch.autocast(accelerator.device.type, enabled=False)
        return nullcontext()

    def unwrapped_unet():
        return accelerator.unwrap_model(unet)

    # validate() builds its pipeline from these at each call, so the images show the current weights
    validation_models = {
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "unet": unwrapped_unet(),
        "scheduler": rollout_scheduler,
    }
    if sdxl:
        validation_models.update(text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2)

    # ---- training loop
    total_batch = args.train_batch_size * world * args.gradient_accumulation_steps
    logger.info(
        f"{training_mode(args)}: {len(prompts)} prompts, {len(pairs) if pairs is not None else 0} pairs, "
        f"effective batch {total_batch}, steps {global_step}->{args.max_train_steps}"
    )
    losses: list[dict] = []
    unet.train()
    validation_paths: list[str] = []
    bad_micro = False
    while global_step < args.max_train_steps:
        with accelerator.accumulate(unet):
            gen = step_generator(seed, micro_step, rank)
            micro_step += 1
            batch_prompts = prompt_stream.next_batch(args.train_batch_size)
            added: dict[str, Any] = {}  # SDXL's added conditioning for the rollout; none for SD
            if sdxl:
                cond, pooled = encode_xl(batch_prompts)
                added["added_cond_kwargs"] = {
                    "text_embeds": pooled,
                    "time_ids": rollout_time_ids.expand(len(batch_prompts), -1),
                }
                if negative_xl is not None:
                    added["negative_added_cond_kwargs"] = {"text_embeds": negative_xl[1].expand_as(pooled)}
            else:
                cond = encode(batch_prompts)
            # ReFL pass, or DRaFT's chain (Eq. 5 first term)
            i = (
                None
                if args.backprop_steps
                else draw_grad_step(args.grad_step_range, args.num_inference_steps, gen)
            )
            noise = torch.randn(
                (len(batch_prompts), unwrapped_unet().config.in_channels, latent_hw, latent_hw), generator=gen
            ).to(accelerator.device, weight_dtype)
            negative_batch = None if negative is None else negative.expand_as(cond)
            if negative_xl is not None:
                negative_batch = negative_xl[0].expand_as(cond)
            reward_prompts = batch_prompts
            with accelerator.autocast():
                if args.backprop_steps:
                    out = draft_latents(
                        unet,
                        rollout_scheduler,
                        noise,
                        cond,
                        args.num_inference_steps,
                        args.backprop_steps,
                        guidance_scale=args.rollout_guidance_scale,
                        negative_hidden_states=negative_batch,
                        checkpoint=args.checkpoint_denoising_steps,
                        lv_samples=args.draft_lv_samples,
                        generator=gen,
                        **added,
                    )
                    grad_step, grad_timestep = out.first_grad_step, out.timestep
                    reward_prompts = batch_prompts * max(1, args.draft_lv_samples)  # x0's rows, sample-major
                else:
                    out = refl_latents(
                        unet,
                        rollout_scheduler,
                        noise,
                        cond,
                        args.num_inference_steps,
                        i,
                        guidance_scale=args.rollout_guidance_scale,
                        negative_hidden_states=negative_batch,
                        **added,
                    )
                    grad_step, grad_timestep = out.grad_step, out.timestep
                if sdxl:
                    with vae_precision():
                        pixels = decode(vae, out.x0.to(vae_dtype)).to(weight_dtype)
                else:
                    pixels = decode(vae, out.x0.to(weight_dtype))
                objective = reward.objective(pixels, reward_prompts)
                loss_refl = hinge_reward_loss(objective, args.reward_margin, args.reward_weight)
                loss_pre = None
                if pair_stream is not None and args.pretrain_loss_weight > 0 and sdxl:
                    rows = pair_stream.next_batch(args.train_batch_size)
                    prepared = [transform_with_crop(im, gen) for im, _ in rows]
                    px = torch.stack([x for x, _, _ in prepared]).to(accelerator.device, vae_dtype)
                    with torch.no_grad(), vae_precision():
                        lat = vae.encode(px).latent_dist.sample(generator=gen) * vae.config.scaling_factor
                    context, pooled_pairs = encode_xl([c for _, c in rows])
                    pair_ids = time_ids(
                        [o for _, o, _ in prepared], [c for _, _, c in prepared], size, accelerator.device, weight_dtype
                    )
                    loss_pre = pretrain_loss(
                        unet,
                        noise_scheduler,
                        lat.to(weight_dtype),
                        context,
                        gen,
                        added_cond_kwargs={"text_embeds": pooled_pairs, "time_ids": pair_ids},
                    )
                elif pair_stream is not None and args.pretrain_loss_weight > 0:
                    rows = pair_stream.next_batch(args.train_batch_size)
                    px = torch.stack([transform(im, gen) for im, _ in rows]).to(
                        accelerator.device, weight_dtype
                    )
                    with torch.no_grad():
                        lat = vae.encode(px).latent_dist.sample(generator=gen) * vae.config.scaling_factor
                    loss_pre = pretrain_loss(unet, noise_scheduler, lat, encode([c for _, c in rows]), gen)
                loss = refl_step_loss(loss_refl, loss_pre, args.pretrain_loss_weight)
            finite = torch.isfinite(loss.detach()).float()
            if world > 1:
                finite = accelerator.reduce(finite.to(accelerator.device), reduction="sum") / world
            if finite.item() < 1:
                bad_micro = True
                # a zero loss through every trained parameter keeps DDP's gradient sync in step on all ranks
                loss = sum((p * 0).sum() for p in params)
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                grads_ok = all(p.grad is None or torch.isfinite(p.grad).all() for p in params)
                if bad_micro or not grads_ok:
                    skipped_nonfinite += 1
                    logger.warning(
                        f"step {global_step + 1}: non-finite loss or gradient, step skipped "
                        f"({skipped_nonfinite} so far)"
                    )
                    optimizer.zero_grad(set_to_none=True)
                else:
                    accelerator.clip_grad_norm_(params, args.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                lr_scheduler.step()
                bad_micro = False
        if accelerator.sync_gradients:
            global_step += 1
            if ema_unet is not None:
                ema_unet.step(unwrapped_unet().parameters())
            logs = {
                "loss": float(loss.detach()),
                "loss_refl": float(loss_refl.detach()),
                "loss_pre": float(loss_pre.detach()) if loss_pre is not None else 0.0,
                "objective": float(objective.detach().float().mean()),
                "grad_step_index": grad_step,
                "grad_timestep": grad_timestep,
                "lr": lr_scheduler.get_last_lr()[0],
                "skipped_nonfinite": skipped_nonfinite,
                "skipped_rows": prompt_stream.skipped + (pair_stream.skipped if pair_stream else 0),
            }
            losses.append(logs)
            accelerator.log(logs, step=global_step)
            if accelerator.is_main_process:
                # Appended step by step, so a killed or resumed run keeps its reward curve without a tracker.
                with open(Path(args.output_dir, "train_log.jsonl"), "a", encoding="utf-8") as f:
                    f.write(json.dumps({"step": global_step, **logs}) + "\n")
            if global_step % args.checkpointing_steps == 0:
                save_checkpoint(
                    accelerator,
                    args,
                    global_step,
                    micro_step,
                    skipped_nonfinite,
                    {"prompts": prompt_stream, "pairs": pair_stream},
                )
            if args.validation_steps and global_step % args.validation_steps == 0:
                validation_paths = validate(accelerator, args, global_step, seed, **validation_models)
            if step_callback is not None:
                step_callback(global_step)

    # ---- save
    accelerator.wait_for_everyone()
    stats = {
        "global_step": global_step,
        "micro_step": micro_step,
        "skipped_nonfinite": skipped_nonfinite,
        "skipped_rows": prompt_stream.skipped + (pair_stream.skipped if pair_stream else 0),
        "effective_batch": total_batch,
        "mode": training_mode(args),
        "losses": losses,
    }
    if accelerator.is_main_process:
        final = unwrapped_unet()
        if args.use_lora:
            save_lora(final, args.output_dir, sdxl=sdxl)
        elif sdxl:
            from realign_pipeline import RealignDiffXLPipeline

            if ema_unet is not None:
                ema_unet.copy_to(final.parameters())
            # the VAE trained with (a fresh copy: the one in memory may be in half precision)
            components = {"vae": load_vae(custom_vae)} if custom_vae else {}
            pipe = RealignDiffXLPipeline.from_pretrained(
                path, unet=final, revision=rev, variant=var, add_watermarker=False, **components
            )
            pipe.save_pretrained(args.output_dir)
        else:
            from realign_pipeline import RealignDiffPipeline

            if ema_unet is not None:
                ema_unet.copy_to(final.parameters())
            pipe = RealignDiffPipeline.from_pretrained(
                path,
                unet=final,
                revision=rev,
                variant=var,
                safety_checker=None,
                requires_safety_checker=False,
            )
            pipe.save_pretrained(args.output_dir)
        validation_paths = (
            validate(accelerator, args, global_step, seed, **validation_models) or validation_paths
        )
        save_model_card(args, stats, validation_paths)
        Path(args.output_dir, "train_stats.json").write_text(
            json.dumps({k: v for k, v in stats.items() if k != "losses"}, indent=1), encoding="utf-8"
        )
        if args.push_to_hub:
            stats["hub_repo_id"] = push_to_hub(args)
    accelerator.end_training()
    return stats


if __name__ == "__main__":
    try:
        main(parse_args())
    except DataError as exc:
        raise SystemExit(f"error: {exc}") from None
