"""Train the shapes world's `AutoencoderKL` (4x downsampling, 4 latent channels) from scratch.

    python training/shapes/train_vae.py --output_dir runs/shapes/vae

Loss: L1 + MSE reconstruction with a small KL term (the SD VAE's GAN and LPIPS terms are left out: the
world's flat colors and sharp edges reconstruct well without them). The final model's ``scaling_factor``
is set to 1 / std of its latents, as Stable Diffusion's is.
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F
from common import Checkpointer, Logger, base_parser, batch, setup
from diffusers import AutoencoderKL


def make_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    )


def main() -> None:
    parser = base_parser(__doc__)
    parser.add_argument("--kl_weight", type=float, default=1e-6)
    args = parser.parse_args()
    out = setup(args)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    vae = make_vae()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.learning_rate, weight_decay=0.0)
    ckpt = Checkpointer(out, {"vae": vae}, optimizer)
    step, _ = ckpt.load(rng)
    logger = Logger(out)
    print(f"vae parameters: {sum(p.numel() for p in vae.parameters()) / 1e6:.2f}M", flush=True)
    while step < args.max_train_steps:
        pixels, _, _ = batch(rng, args)
        posterior = vae.encode(pixels).latent_dist
        recon = vae.decode(posterior.sample()).sample
        rec = F.l1_loss(recon, pixels) + F.mse_loss(recon, pixels)
        kl = posterior.kl().mean()
        loss = rec + args.kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        if step % args.log_steps == 0:
            logger.log(step, loss=loss.item(), rec=rec.item(), kl=kl.item())
        if step % args.checkpointing_steps == 0 or step == args.max_train_steps:
            ckpt.save(step, rng)
    with torch.no_grad():
        latents = torch.cat([vae.encode(batch(rng, args)[0]).latent_dist.mean for _ in range(8)])
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    vae.save_pretrained(out / "final")
    print(f"saved {out / 'final'} (scaling_factor {vae.config.scaling_factor:.4f})", flush=True)


if __name__ == "__main__":
    main()
