"""Tiny random offline models and a loopback chat server, for tests (yours too), the docs and ``--tiny``.

Nothing here downloads anything. One module per family:

- :mod:`.stable_diffusion`: :func:`tiny_components` / :func:`tiny_pipeline` (a tiny random Stable Diffusion 1.x
  or 2.x) and :func:`clip_tokenizer` (the real CLIP tokenizer, from the shipped vocabulary);
- :mod:`.stable_diffusion_xl`: :func:`tiny_sdxl_components` / :func:`tiny_sdxl_pipeline` (a tiny random SDXL: two
  text encoders, added time ids, the pooled embedding) and :func:`openclip_tokenizer` (the CLIP tokenizer with
  OpenCLIP's padding token, SDXL's ``tokenizer_2``);
- :mod:`.clip`: :func:`tiny_clip` (a tiny random CLIP model and processor saved to a folder);
- :mod:`.blip2`: :func:`tiny_blip2_captioner` (BLIP-2 with an OPT language model) and :func:`tiny_blip2_itm`
  (BLIP-2 image-text matching), saved to folders;
- :mod:`.grounding`: :func:`tiny_grounding_dino` and :func:`tiny_sam` saved to folders, :func:`bert_tokenizer`;
- :mod:`.chat`: :class:`ChatServer`, an OpenAI-compatible chat completions server on 127.0.0.1 that answers
  from a script;
- :mod:`.training`: :class:`BrightnessReward` (a reward without a model, for ``train_refl.py --reward_class``)
  and :func:`image_text_pairs` (a ``--train_data_dir`` folder of random images).

The folder builders write with ``save_pretrained``, so a test loads them back with the same
``from_pretrained`` call a user makes with a hub id. The weights are random: outputs are noise, shapes and
code paths are real. Every builder takes a ``seed`` and leaves the caller's global torch RNG state alone.
"""

from .blip2 import (
    TINY_BLIP2_IMAGE_SIZE,
    TINY_BLIP2_NUM_QUERY_TOKENS,
    blip2_itm_tokenizer,
    blip_image_processor,
    tiny_blip2_captioner,
    tiny_blip2_itm,
    tiny_opt_tokenizer,
)
from .chat import ChatServer
from .clip import TINY_CLIP_IMAGE_SIZE, tiny_clip, tiny_clip_model_and_processor
from .grounding import bert_tokenizer, tiny_grounding_dino, tiny_sam
from .stable_diffusion import (
    CLIP_BPE_FILENAME,
    STYLES,
    bytes_to_unicode,
    clip_tokenizer,
    tiny_components,
    tiny_pipeline,
)
from .stable_diffusion_xl import (
    OPENCLIP_PAD_TOKEN,
    openclip_tokenizer,
    tiny_sdxl_components,
    tiny_sdxl_pipeline,
)
from .training import BrightnessReward, image_text_pairs

__all__ = [
    "CLIP_BPE_FILENAME",
    "OPENCLIP_PAD_TOKEN",
    "STYLES",
    "TINY_BLIP2_IMAGE_SIZE",
    "TINY_BLIP2_NUM_QUERY_TOKENS",
    "TINY_CLIP_IMAGE_SIZE",
    "BrightnessReward",
    "ChatServer",
    "bert_tokenizer",
    "blip2_itm_tokenizer",
    "blip_image_processor",
    "bytes_to_unicode",
    "clip_tokenizer",
    "image_text_pairs",
    "openclip_tokenizer",
    "tiny_blip2_captioner",
    "tiny_blip2_itm",
    "tiny_clip",
    "tiny_clip_model_and_processor",
    "tiny_components",
    "tiny_grounding_dino",
    "tiny_opt_tokenizer",
    "tiny_pipeline",
    "tiny_sam",
    "tiny_sdxl_components",
    "tiny_sdxl_pipeline",
]
