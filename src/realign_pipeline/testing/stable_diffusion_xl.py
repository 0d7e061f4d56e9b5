"""Tiny, random, offline Stable Diffusion XL components for tests and the docs.

Nothing here downloads anything. :func:`tiny_sdxl_components` builds every module a
:class:`~diffusers.StableDiffusionXLPipeline` needs, with SDXL's structure at a tiny size:

- two text encoders whose hidden states are concatenated per token (a ``CLIPTextModel`` of width 32, as SDXL's
  CLIP ViT-L of width 768, and a ``CLIPTextModelWithProjection`` of width 64, as its OpenCLIP ViT-bigG of width
  1280), so the UNet's context is 96 wide (SDXL: 2048), and the pooled, projected embedding of the second;
- a UNet with SDXL's added conditioning (``addition_embed_type="text_time"``: the pooled embedding and six time
  ids), no attention at the top level (a ``DownBlock2D`` first, as SDXL), and more transformer layers at the
  lowest level than above it (1 and 2 here; SDXL has 2 and 10), linear projections, several heads;
- the VAE with SDXL's scaling factor (0.13025) and ``force_upcast``, and SDXL's default scheduler, Euler;
- the *real* CLIP tokenizer for both encoders (:func:`openclip_tokenizer` for the second: OpenCLIP's padding
  token ``"!"``, as SDXL's ``tokenizer_2``), so token ids and positions are those of a real checkpoint.

The weights are random: images are noise, shapes and code paths are real. The VAE downsamples by 2, so the
default size is 32x32 pixels (16x16 latents, the UNet's ``sample_size``); any multiple of 8 works, non-square too.

Usage::

    from diffusers import StableDiffusionXLPipeline
    from realign_pipeline.testing import tiny_sdxl_pipeline

    pipe = tiny_sdxl_pipeline(StableDiffusionXLPipeline, save_dir=tmp_path / "tiny-sdxl")
    image = pipe("a red cube", num_inference_steps=2, output_type="np").images
"""

from __future__ import annotations

from typing import Any

import torch

from .stable_diffusion import clip_tokenizer

__all__ = ["OPENCLIP_PAD_TOKEN", "openclip_tokenizer", "tiny_sdxl_components", "tiny_sdxl_pipeline"]

#: The padding token of SDXL's second tokenizer (OpenCLIP's); id 0 of CLIP's vocabulary.
OPENCLIP_PAD_TOKEN = "!"

_VOCAB_SIZE = 49408
_MAX_LENGTH = 77
_HIDDEN = 32  # the first text encoder's width (SDXL: 768)
_HIDDEN_2 = 64  # the second's (SDXL: 1280)
_PROJECTION = 32  # the pooled embedding's width (SDXL: 1280)
_TIME_EMBED = 8  # addition_time_embed_dim (SDXL: 256)
_BLOCK_OUT = (32, 64)


def openclip_tokenizer():
    """The CLIP tokenizer with OpenCLIP's padding token ``"!"`` (id 0): what SDXL ships as ``tokenizer_2``.

    The same vocabulary, merges and special tokens as :func:`~realign_pipeline.testing.clip_tokenizer`, so a
    prompt's tokens and their positions are the same in both; only the padding after the end token differs.
    """
    tokenizer = clip_tokenizer()
    tokenizer.pad_token = OPENCLIP_PAD_TOKEN
    return tokenizer


def tiny_sdxl_components(seed: int = 0) -> dict[str, Any]:
    """Tiny random SDXL components: the keyword arguments of ``StableDiffusionXLPipeline``.

    Args:
        seed: every weight is drawn after ``torch.manual_seed(seed)`` (re-seeded before each model), so the same
            seed gives identical weights. The caller's global torch RNG state is restored afterwards.

    Returns:
        ``{"vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet", "scheduler",
        "image_encoder", "feature_extractor"}`` -- the last two ``None``. Models are float32, on the CPU, in eval
        mode. Build the pipeline with ``add_watermarker=False`` (:func:`tiny_sdxl_pipeline` does).
    """
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def text_config(hidden: int, act: str) -> CLIPTextConfig:
        # SDXL's text encoder configs say bos 0, eos 2, pad 1: with eos 2 transformers pools at the highest id,
        # the end token, as for SDXL
        return CLIPTextConfig(
            vocab_size=_VOCAB_SIZE,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=_MAX_LENGTH,
            hidden_act=act,
            layer_norm_eps=1e-5,
            projection_dim=_PROJECTION,
            bos_token_id=0,
            eos_token_id=2,
            pad_token_id=1,
        )

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            block_out_channels=_BLOCK_OUT,
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2),
            # diffusers' legacy naming, as in SDXL's config ([5, 10, 20]): the number of heads per level
            attention_head_dim=(2, 4),
            cross_attention_dim=_HIDDEN + _HIDDEN_2,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=_TIME_EMBED,
            # six time ids (original size, crop top-left, target size) and the pooled embedding
            projection_class_embeddings_input_dim=6 * _TIME_EMBED + _PROJECTION,
            norm_num_groups=32,
        )

        torch.manual_seed(seed)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            block_out_channels=_BLOCK_OUT,
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=32,
            sample_size=32,
            scaling_factor=0.13025,
            force_upcast=True,
        )

        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(text_config(_HIDDEN, "quick_gelu"))
        torch.manual_seed(seed)
        text_encoder_2 = CLIPTextModelWithProjection(text_config(_HIDDEN_2, "gelu"))

    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
        interpolation_type="linear",
        prediction_type="epsilon",
    )

    for model in (unet, vae, text_encoder, text_encoder_2):
        model.eval()

    return {
        "vae": vae,
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
        "tokenizer": clip_tokenizer(),
        "tokenizer_2": openclip_tokenizer(),
        "unet": unet,
        "scheduler": scheduler,
        "image_encoder": None,
        "feature_extractor": None,
    }


def tiny_sdxl_pipeline(pipeline_cls: type | None = None, seed: int = 0, save_dir: Any = None, **kwargs: Any):
    """Build ``pipeline_cls`` from :func:`tiny_sdxl_components`.

    Args:
        pipeline_cls: ``StableDiffusionXLPipeline`` (the default, also for ``None``) or a subclass of it (e.g.
            ``realign_pipeline.RealignDiffXLPipeline``).
        seed: passed to :func:`tiny_sdxl_components`.
        save_dir: if given, the pipeline is written there with ``save_pretrained`` and the one returned is loaded
            back with ``pipeline_cls.from_pretrained(save_dir)``, so the path users take is exercised.
        **kwargs: passed to the constructor after the components (so they can replace one, e.g. ``scheduler=``,
            or set a subclass's own arguments); with ``save_dir`` they are also passed to ``from_pretrained``.

    Returns:
        The pipeline, on the CPU, in float32, without the invisible watermark.
    """
    if pipeline_cls is None:
        from diffusers import StableDiffusionXLPipeline

        pipeline_cls = StableDiffusionXLPipeline
    components = tiny_sdxl_components(seed)
    components.update(kwargs)
    components.setdefault("add_watermarker", False)
    pipe = pipeline_cls(**components)
    if save_dir is None:
        return pipe
    pipe.save_pretrained(save_dir)
    load_kwargs: dict[str, Any] = {"add_watermarker": False}
    load_kwargs.update(kwargs)
    return pipeline_cls.from_pretrained(save_dir, **load_kwargs)
