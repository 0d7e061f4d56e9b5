"""Stable Diffusion XL base 1.0's architecture with RANDOM weights, built from configs: no download, no checkpoint.

For benchmarks only. The modules have exactly SDXL base's shapes (UNet 2.57B parameters with 70 transformer
layers, the SDXL VAE, CLIP ViT-L/14's and OpenCLIP ViT-bigG/14's text towers, the real CLIP tokenizer for both,
OpenCLIP's padding token for the second, Euler), so their cost is SDXL's cost; their weights are drawn at random,
so their images are noise (possibly NaN in float16) and must never be looked at for quality.

    from sdxl_random import sdxl_components
    from realign_pipeline import RealignDiffXLPipeline
    pipe = RealignDiffXLPipeline(**sdxl_components(device="cuda", dtype=torch.float16), add_watermarker=False)

The configs are those of ``stabilityai/stable-diffusion-xl-base-1.0`` (``unet/``, ``vae/``, ``text_encoder/``,
``text_encoder_2/`` and ``scheduler/`` ``config.json``), written out here; :func:`parameter_counts` says what
they build (UNet 2,567,463,684, VAE 83,653,863, text encoders 123,060,480 and 694,659,840).
"""

from __future__ import annotations

from typing import Any

import torch

#: ``unet/config.json`` of stable-diffusion-xl-base-1.0 (the arguments that differ from diffusers' defaults).
UNET_CONFIG: dict[str, Any] = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (320, 640, 1280),
    "layers_per_block": 2,
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),  # diffusers' legacy name: the number of heads per level
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,  # 6 time ids x 256 + the pooled embedding's 1280
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
}

#: ``vae/config.json`` of stable-diffusion-xl-base-1.0: SD's VAE with SDXL's scaling factor, upcast in float16.
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
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "force_upcast": True,
}

#: ``text_encoder/config.json``: CLIP ViT-L/14's text tower (SDXL's config says bos 0, eos 2, pad 1).
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
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}

#: ``text_encoder_2/config.json``: OpenCLIP ViT-bigG/14's text tower with its projection.
TEXT_2_CONFIG: dict[str, Any] = {
    **TEXT_CONFIG,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "hidden_act": "gelu",
    "projection_dim": 1280,
}

#: ``scheduler/scheduler_config.json``: Euler with SDXL's noise schedule.
SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "interpolation_type": "linear",
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "use_karras_sigmas": False,
}


def sdxl_components(
    device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0
) -> dict[str, Any]:
    """The keyword arguments of ``StableDiffusionXLPipeline`` for SDXL base's architecture with random weights.

    The modules are created directly on `device` (``"meta"`` builds them without memory, e.g. to count
    parameters), drawn after ``torch.manual_seed(seed)``, then cast to `dtype` and put in eval mode. The global RNG
    state is restored. Build the pipeline with ``add_watermarker=False``.
    """
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from realign_pipeline.testing import clip_tokenizer, openclip_tokenizer

    device = torch.device(device)
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.device(device):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**UNET_CONFIG)
        torch.manual_seed(seed)
        vae = AutoencoderKL(**VAE_CONFIG)
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG))
        torch.manual_seed(seed)
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**TEXT_2_CONFIG))

    from diffusers.utils import logging as diffusers_logging

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # silence "modules that should be kept in float32: []" on .to(dtype)
    try:
        for model in (unet, vae, text_encoder, text_encoder_2):
            if device.type != "meta":
                model.to(device=device, dtype=dtype)
            model.eval()
    finally:
        diffusers_logging.set_verbosity(verbosity)

    return {
        "vae": vae,
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
        "tokenizer": clip_tokenizer(),
        "tokenizer_2": openclip_tokenizer(),
        "unet": unet,
        "scheduler": EulerDiscreteScheduler(**SCHEDULER_CONFIG),
        "image_encoder": None,
        "feature_extractor": None,
    }


def parameter_counts(components: dict[str, Any]) -> dict[str, int]:
    """Number of parameters of each module (SDXL base: UNet 2,567,463,684, VAE 83,653,863, text encoders
    123,060,480 and 694,659,840)."""
    return {
        name: sum(p.numel() for p in module.parameters())
        for name, module in components.items()
        if isinstance(module, torch.nn.Module)
    }
