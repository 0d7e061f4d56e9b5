"""Tiny, random, offline Stable Diffusion components for tests and the demo.

Nothing here downloads anything. :func:`tiny_components` builds every module a
:class:`~diffusers.StableDiffusionPipeline` needs -- VAE, CLIP text encoder, UNet, DDIM scheduler and
the *real* CLIP tokenizer -- at a size that builds in well under a second and runs a denoising step in
milliseconds on a CPU.

What these models are, and are not
    The weights are random (drawn from ``torch.manual_seed(seed)``), so a pipeline built from them
    draws noise: its images carry no meaning and must never be judged for quality. They exist so that
    every code path -- prompt encoding, cross-attention processors, the denoising loop, classifier-free
    guidance, VAE decoding, ``save_pretrained``/``from_pretrained`` -- runs offline, fast and
    deterministically. The shapes mirror Stable Diffusion's (4 latent channels, a VAE that downsamples,
    a UNet with cross-attention at two resolutions and several heads per attention layer, 77-token
    prompts, vocabulary of 49,408), so code written against these runs unchanged on a real checkpoint.

The tokenizer is not a toy: :func:`clip_tokenizer` builds the real CLIP BPE tokenizer (the one Stable
Diffusion 1.x uses) from the vocabulary file shipped in ``realign_pipeline/assets``, so token ids and
the token positions that attention code indexes are exactly those of a real checkpoint.

Two styles are offered:

``"sd1"``
    Stable Diffusion 1.x layout: epsilon prediction, conv projections in the transformer blocks,
    ``quick_gelu`` text encoder.
``"sd2"``
    Stable Diffusion 2.x layout: ``v_prediction``, ``upcast_attention=True``,
    ``use_linear_projection=True``, ``gelu`` text encoder (OpenCLIP style). The tokenizer is the same
    CLIP BPE tokenizer (SD 2.x's differs only in its padding token).

Usage::

    from realign_pipeline.testing import tiny_components, tiny_pipeline
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(**tiny_components(), requires_safety_checker=False)
    # or, exercising save_pretrained/from_pretrained as a user would:
    pipe = tiny_pipeline(StableDiffusionPipeline, style="sd2", save_dir=tmp_path / "tiny-sd2")
    image = pipe("a red cube", num_inference_steps=2, height=32, width=32, output_type="np").images

The VAE downsamples by 2, so the default (and natural) image size is 32x32 -> 16x16 latents, the UNet's
``sample_size``; any multiple of 8 that diffusers accepts works.
"""

from __future__ import annotations

import functools
import gzip
from importlib import resources
from typing import Any

import torch
from diffusers import StableDiffusionPipeline

__all__ = [
    "CLIP_BPE_FILENAME",
    "STYLES",
    "bytes_to_unicode",
    "clip_tokenizer",
    "tiny_components",
    "tiny_pipeline",
]

#: Name of the CLIP BPE vocabulary file inside ``realign_pipeline/assets``.
CLIP_BPE_FILENAME = "clip_bpe_simple_vocab_16e6.txt.gz"

#: The styles :func:`tiny_components` accepts.
STYLES = ("sd1", "sd2")

_BOS_TOKEN = "<|startoftext|>"
_EOS_TOKEN = "<|endoftext|>"
_BOS_ID = 49406
_EOS_ID = 49407
_VOCAB_SIZE = 49408
_MAX_LENGTH = 77

# Tiny model sizes. The UNet and the text encoder must agree on the cross-attention width.
_HIDDEN = 32
_BLOCK_OUT = (32, 64)


def bytes_to_unicode() -> list[str]:
    """The 256 printable characters CLIP (and GPT-2) map bytes to, in CLIP's vocabulary order.

    A byte-level BPE vocabulary (CLIP's, GPT-2's) starts with these 256 tokens, in this order.
    """
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\u00a1"), ord("\u00ac") + 1))
        + list(range(ord("\u00ae"), ord("\u00ff") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


@functools.lru_cache(maxsize=1)
def _clip_vocab_and_merges() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """Vocabulary and merges of CLIP's tokenizer, built as openai/CLIP's ``SimpleTokenizer`` does.

    Cached; callers must copy before handing them to anything that could mutate them.
    """
    data = resources.files("realign_pipeline").joinpath("assets", CLIP_BPE_FILENAME).read_bytes()
    lines = gzip.decompress(data).decode("utf-8").split("\n")
    # Line 0 is a version header; CLIP uses the first 49152 - 256 - 2 merges.
    merges = tuple(tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1])
    byte_chars = bytes_to_unicode()
    tokens = byte_chars + [c + "</w>" for c in byte_chars]
    tokens += ["".join(m) for m in merges]
    tokens += [_BOS_TOKEN, _EOS_TOKEN]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != _VOCAB_SIZE or vocab[_BOS_TOKEN] != _BOS_ID or vocab[_EOS_TOKEN] != _EOS_ID:
        raise RuntimeError(f"corrupt CLIP vocabulary asset {CLIP_BPE_FILENAME}: {len(vocab)} tokens")
    return vocab, merges  # type: ignore[return-value]


def clip_tokenizer():
    """The real CLIP tokenizer of Stable Diffusion 1.x, built offline from the shipped BPE file.

    49,408 tokens, ``<|startoftext|>`` = 49406, ``<|endoftext|>`` = 49407 (also the padding token, as in
    SD 1.5), ``model_max_length`` 77. ``"a photo of a cat"`` encodes to
    ``[49406, 320, 1125, 539, 320, 2368, 49407]``.

    Reading and parsing the vocabulary file is cached; each call returns a new, independent
    :class:`transformers.CLIPTokenizer` (building one from the cached data takes ~0.1 s).
    """
    from transformers import CLIPTokenizer

    vocab, merges = _clip_vocab_and_merges()
    return CLIPTokenizer(
        vocab=dict(vocab),
        merges=list(merges),
        unk_token=_EOS_TOKEN,
        bos_token=_BOS_TOKEN,
        eos_token=_EOS_TOKEN,
        pad_token=_EOS_TOKEN,
        model_max_length=_MAX_LENGTH,
    )


def _check_style(style: str) -> None:
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; valid styles are {', '.join(map(repr, STYLES))}")


def tiny_components(style: str = "sd1", seed: int = 0) -> dict[str, Any]:
    """Tiny random Stable Diffusion components: the keyword arguments of ``StableDiffusionPipeline``.

    Args:
        style: ``"sd1"`` (Stable Diffusion 1.x layout) or ``"sd2"`` (2.x layout: ``v_prediction``,
            ``upcast_attention``, ``use_linear_projection``, ``gelu`` text encoder).
        seed: every weight is drawn after ``torch.manual_seed(seed)`` (re-seeded before each model), so
            the same seed gives identical weights. The caller's global torch RNG state is restored
            afterwards.

    Returns:
        ``{"vae", "text_encoder", "tokenizer", "unet", "scheduler", "safety_checker",
        "feature_extractor", "image_encoder"}`` -- the last three ``None``. Models are float32, on the
        CPU, in eval mode. Build the pipeline with ``requires_safety_checker=False``.

    Raises:
        ValueError: for an unknown ``style``.
    """
    _check_style(style)
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    sd2 = style == "sd2"

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            block_out_channels=_BLOCK_OUT,
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=_HIDDEN,
            # diffusers' legacy naming: for UNet2DConditionModel this is the number of heads (as in
            # SD 1.5's config), so every attention layer has 8 heads.
            attention_head_dim=8,
            norm_num_groups=32,
            upcast_attention=sd2,
            use_linear_projection=sd2,
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
        )

        torch.manual_seed(seed)
        text_config = CLIPTextConfig(
            vocab_size=_VOCAB_SIZE,
            hidden_size=_HIDDEN,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=_MAX_LENGTH,
            hidden_act="gelu" if sd2 else "quick_gelu",
            layer_norm_eps=1e-5,
            projection_dim=_HIDDEN,
            bos_token_id=_BOS_ID,
            eos_token_id=_EOS_ID,
            pad_token_id=_EOS_ID,
        )
        text_encoder = CLIPTextModel(text_config)

    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="v_prediction" if sd2 else "epsilon",
    )

    for model in (unet, vae, text_encoder):
        model.eval()

    return {
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": clip_tokenizer(),
        "unet": unet,
        "scheduler": scheduler,
        "safety_checker": None,
        "feature_extractor": None,
        "image_encoder": None,
    }


def tiny_pipeline(
    pipeline_cls: type = StableDiffusionPipeline,
    style: str = "sd1",
    seed: int = 0,
    save_dir: Any = None,
    **kwargs: Any,
):
    """Build ``pipeline_cls`` from :func:`tiny_components`.

    Args:
        pipeline_cls: ``StableDiffusionPipeline`` or a subclass of it (e.g.
            ``realign_pipeline.pipeline.RealignDiffPipeline``); ``None`` also means
            ``StableDiffusionPipeline``.
        style, seed: passed to :func:`tiny_components`.
        save_dir: if given, the pipeline is written there with ``save_pretrained`` and the one returned
            is loaded back with ``pipeline_cls.from_pretrained(save_dir, safety_checker=None,
            requires_safety_checker=False)``, so the path users take is exercised.
        **kwargs: passed to the constructor, after the components (so they can replace one, e.g.
            ``scheduler=...``, or set a subclass's own arguments); with ``save_dir`` they are also passed
            to ``from_pretrained``.

    Returns:
        The pipeline, on the CPU, in float32. Progress bars are left as diffusers sets them.
    """
    if pipeline_cls is None:
        pipeline_cls = StableDiffusionPipeline
    components = tiny_components(style, seed)
    components.update(kwargs)
    components.setdefault("requires_safety_checker", False)
    pipe = pipeline_cls(**components)
    if save_dir is None:
        return pipe
    pipe.save_pretrained(save_dir)
    load_kwargs: dict[str, Any] = {"safety_checker": None, "requires_safety_checker": False}
    load_kwargs.update(kwargs)
    return pipeline_cls.from_pretrained(save_dir, **load_kwargs)
