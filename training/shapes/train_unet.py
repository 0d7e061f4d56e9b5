"""Train the shapes world's `UNet2DConditionModel` on the frozen VAE latents and frozen CLIP text states.

    python training/shapes/train_unet.py --output_dir runs/shapes/unet \
        --vae runs/shapes/vae/final --clip runs/shapes/clip/final

The three-object scenes (48 px) on the second world's bag-of-words text encoder, as the fallback was trained:

    python training/shapes/train_unet.py --output_dir runs/shapes-triples/unet --scenes triples \
        --vae src/realign_pipeline/assets/shapes/pipeline-bow/vae --clip runs/shapes-bow/clip/final \
        --learning_rate 5e-4 --max_train_steps 4000 --checkpointing_steps 250

(``--clip src/realign_pipeline/assets/shapes/pipeline-bow`` takes the shipped text encoder, stored in fp16.)

As Stable Diffusion: latent diffusion, a frozen CLIP text encoder (last hidden states), 10% of captions
dropped to "" for classifier-free guidance. Unlike SD v1.5: v-prediction with min-SNR-5 loss weighting
(Hang et al., 2023), because it converges much faster at this scale, and an EMA of the weights, which is
what is saved. Every ``--validation_steps`` it samples a grid with DDIM through `StableDiffusionPipeline`
and, with the world's checker, logs how often the prompts' shapes / colored shapes are found.
"""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from common import Checkpointer, Logger, base_parser, batch, setup
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextModel, CLIPTokenizer

SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "prediction_type": "v_prediction", "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1,
}
VALIDATION_PROMPTS = [
    "a red circle", "a blue square", "a green triangle", "a yellow cross",
    "a red circle and a blue square", "a green triangle to the left of a purple cross",
    "a yellow square with a red triangle", "a blue cross to the right of a green circle",
]
TRIPLE_VALIDATION_PROMPTS = [
    "a red circle", "a blue square", "a green triangle to the left of a purple cross",
    "a yellow square with a red triangle", "a red circle, a blue square and a green cross",
    "a yellow triangle with a purple circle and a red square",
    "a blue cross to the left of a yellow circle and a green square",
    "a purple square to the right of a red triangle and a blue circle",
]


def make_unet(cross_attention_dim: int, resolution: int = 32) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=resolution // 4,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(64, 128, 128),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=4,
        norm_num_groups=32,
    )


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1.0 - decay)


@torch.no_grad()
def validate(
    pipe: StableDiffusionPipeline, out: Path, step: int, seeds: int = 4, validation_prompts: list[str] = VALIDATION_PROMPTS,
    size: int = 32,
) -> dict:
    prompts = [p for p in validation_prompts for _ in range(seeds)]
    generator = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
    images = pipe(prompts, num_inference_steps=20, guidance_scale=4.0, generator=generator, output_type="np",
                  height=size, width=size).images
    images = (images * 255).round().astype(np.uint8)
    grid = PIL.Image.new("RGB", (size * seeds, size * len(validation_prompts)))
    for i, image in enumerate(images):
        grid.paste(PIL.Image.fromarray(image), ((i % seeds) * size, (i // seeds) * size))
    (out / "samples").mkdir(exist_ok=True)
    grid.resize((grid.width * 4, grid.height * 4), PIL.Image.Resampling.NEAREST).save(out / "samples" / f"{step:06d}.png")
    try:
        from realign_pipeline.shapes.checker import detect
    except ImportError:
        return {}
    from realign_pipeline.shapes.world import COLORS, SHAPES

    shape_hits = pair_hits = total = 0
    for prompt, image in zip(prompts, images):
        words = prompt.split()
        wanted = [(words[i - 1], w) for i, w in enumerate(words) if w in SHAPES and words[i - 1] in COLORS]
        found = detect(PIL.Image.fromarray(image))
        shapes = [d["shape"] for d in found]
        pairs = [(d["color"], d["shape"]) for d in found]
        for color, shape in wanted:
            total += 1
            shape_hits += shape in shapes
            pair_hits += (color, shape) in pairs
    return {"val_shape": shape_hits / total, "val_pair": pair_hits / total}


def main() -> None:
    parser = base_parser(__doc__)
    parser.add_argument("--vae", required=True)
    parser.add_argument("--clip", required=True)
    parser.add_argument("--caption_dropout", type=float, default=0.1)
    parser.add_argument("--snr_gamma", type=float, default=5.0)
    parser.add_argument("--ema_decay", type=float, default=0.999)
    parser.add_argument("--validation_steps", type=int, default=1000, help="0: no validation samples")
    parser.add_argument("--lr_warmup_steps", type=int, default=200)
    args = parser.parse_args()
    out = setup(args)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)

    vae = AutoencoderKL.from_pretrained(args.vae).eval().requires_grad_(False)
    # --clip is a CLIP run folder, or a shipped pipeline folder (its text_encoder/ and tokenizer/)
    shipped = (Path(args.clip) / "text_encoder").is_dir()
    text_encoder = CLIPTextModel.from_pretrained(args.clip, **({"subfolder": "text_encoder"} if shipped else {}))
    text_encoder = text_encoder.eval().requires_grad_(False)
    tokenizer = CLIPTokenizer.from_pretrained(args.clip, **({"subfolder": "tokenizer"} if shipped else {}))
    unet = make_unet(text_encoder.config.hidden_size, args.resolution)
    ema = copy.deepcopy(unet).requires_grad_(False)
    noise_scheduler = DDPMScheduler(**{k: v for k, v in SCHEDULER_CONFIG.items() if k != "set_alpha_to_one"})
    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.learning_rate, weight_decay=0.0)
    ckpt = Checkpointer(out, {"unet": unet, "ema": ema}, optimizer)
    step, _ = ckpt.load(rng)
    logger = Logger(out)
    print(f"unet parameters: {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M", flush=True)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=ema,
        scheduler=DDIMScheduler(**SCHEDULER_CONFIG), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    alphas_cumprod = noise_scheduler.alphas_cumprod

    running = 0.0
    while step < args.max_train_steps:
        pixels, captions, _ = batch(rng, args)
        captions = ["" if rng.random() < args.caption_dropout else c for c in captions]
        with torch.no_grad():
            latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
            ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                            truncation=True, return_tensors="pt").input_ids
            states = text_encoder(ids)[0]
        noise = torch.randn_like(latents)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],))
        noisy = noise_scheduler.add_noise(latents, noise, t)
        target = noise_scheduler.get_velocity(latents, noise, t)
        pred = unet(noisy, t, states).sample
        snr = alphas_cumprod[t] / (1 - alphas_cumprod[t])
        weight = torch.clamp(snr, max=args.snr_gamma) / (snr + 1)  # min-SNR for v-prediction
        loss = (weight * F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))).mean()
        for group in optimizer.param_groups:
            group["lr"] = args.learning_rate * min(1.0, (step + 1) / args.lr_warmup_steps)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        ema_update(ema, unet, min(args.ema_decay, (1 + step) / (10 + step)))
        step += 1
        running += loss.item()
        if step % args.log_steps == 0:
            logger.log(step, loss=running / args.log_steps)
            running = 0.0
        if step % args.checkpointing_steps == 0 or step == args.max_train_steps:
            ckpt.save(step, rng)
        if args.validation_steps and (step % args.validation_steps == 0 or step == args.max_train_steps):
            prompts = TRIPLE_VALIDATION_PROMPTS if args.scenes == "triples" else VALIDATION_PROMPTS
            logger.log(step, **validate(pipe, out, step, validation_prompts=prompts, size=args.resolution))
    ema.save_pretrained(out / "final")
    with open(out / "final" / "training_args.json", "w") as f:
        json.dump(vars(args), f, indent=2)
    print(f"saved {out / 'final'}", flush=True)


if __name__ == "__main__":
    main()
