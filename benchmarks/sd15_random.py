"""Stable Diffusion v1.5's architecture with RANDOM weights, built from configs: no download, no checkpoint.

For benchmarks only. The modules have exactly SD 1.5's shapes (UNet 860M parameters, the SD VAE, CLIP ViT-L/14's
text encoder, the real CLIP tokenizer), so their cost is SD 1.5's cost; their weights are drawn at random, so
their images are noise (possibly NaN in float16) and must never be looked at for quality.

    from sd15_random import sd15_components
    from realign_pipeline import RealignDiffPipeline
    pipe = RealignDiffPipeline(**sd15_components(device="cuda", dtype=torch.float16), requires_safety_checker=False)
"""

from __future__ import annotations

from typing import Any

import torch

#: ``unet/config.json`` of stable-diffusion-v1-5 (the arguments that differ from diffusers' defaults included).
UNET_CONFIG: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,  # diffusers' legacy name: 8 heads per attention layer
}

#: ``vae/config.json`` of stable-diffusion-v1-5.
VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}

#: CLIP ViT-L/14's text tower (``text_encoder/config.json`` of stable-diffusion-v1-5), with the CLIP BPE
#: tokenizer's real special-token ids.
TEXT_CONFIG: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 768,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 49407,
}

#: DDIM with SD 1.5's noise schedule.
SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}


def sd15_components(
    device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0
) -> dict[str, Any]:
    """The keyword arguments of ``StableDiffusionPipeline`` for SD 1.5's architecture with random weights.

    The modules are created directly on `device` (much faster than a CPU init on a GPU machine), drawn after
    ``torch.manual_seed(seed)``, then cast to `dtype` and put in eval mode. The global RNG state is restored.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from realign_pipeline.testing import clip_tokenizer

    device = torch.device(device)
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.device(device):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**UNET_CONFIG)
        torch.manual_seed(seed)
        vae = AutoencoderKL(**VAE_CONFIG)
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG))

    from diffusers.utils import logging as diffusers_logging

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # silence "modules that should be kept in float32: []" on .to(dtype)
    try:
        for model in (unet, vae, text_encoder):
            model.to(device=device, dtype=dtype)
            model.eval()
    finally:
        diffusers_logging.set_verbosity(verbosity)

    return {
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": clip_tokenizer(),
        "unet": unet,
        "scheduler": DDIMScheduler(**SCHEDULER_CONFIG),
        "safety_checker": None,
        "feature_extractor": None,
        "image_encoder": None,
    }


def parameter_counts(components: dict[str, Any]) -> dict[str, int]:
    """Number of parameters of each module (SD 1.5: UNet ~859.5M, VAE ~83.7M, text encoder ~123.1M)."""
    return {
        name: sum(p.numel() for p in module.parameters())
        for name, module in components.items()
        if isinstance(module, torch.nn.Module)
    }
