"""A tiny random CLIP (model + processor) saved to a folder, for tests. Nothing is downloaded.

``tiny_clip(save_dir)`` writes a :class:`transformers.CLIPModel` with random weights and a
:class:`transformers.CLIPProcessor` (the Pillow ``CLIPImageProcessorPil`` with OpenAI's mean/std and bicubic
resampling, and the *real* CLIP tokenizer from :func:`realign_pipeline.testing.clip_tokenizer`) with
``save_pretrained``, so the folder loads through the same ``from_pretrained`` calls a user makes with
``openai/clip-vit-large-patch14``. The embeddings are meaningless; the shapes and code paths are real.
"""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["TINY_CLIP_IMAGE_SIZE", "tiny_clip", "tiny_clip_model_and_processor"]

#: The tiny model's input resolution (shortest edge and crop size).
TINY_CLIP_IMAGE_SIZE = 32


def tiny_clip_model_and_processor(seed: int = 0, image_size: int = TINY_CLIP_IMAGE_SIZE):
    """A random tiny ``(CLIPModel, CLIPProcessor)`` pair in memory (float32, CPU, eval mode).

    The caller's global torch RNG state is left untouched.
    """
    # the Pillow class by name: the default one needs torchvision, which the base install leaves out
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor

    from .stable_diffusion import clip_tokenizer

    text_config = {
        "vocab_size": 49408,
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 77,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 49407,
    }
    vision_config = {
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "image_size": image_size,
        "patch_size": 8,
    }
    config = CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config).eval()
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=clip_tokenizer())
    return model, processor


def tiny_clip(save_dir: str | Path, seed: int = 0, image_size: int = TINY_CLIP_IMAGE_SIZE) -> Path:
    """Build a tiny random CLIP, ``save_pretrained`` it (model and processor) into ``save_dir``.

    Returns the folder, which ``CLIPModel.from_pretrained`` / ``CLIPProcessor.from_pretrained`` and
    :meth:`realign_pipeline.scoring.ClipScorer.from_pretrained` load offline.
    """
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    model, processor = tiny_clip_model_and_processor(seed=seed, image_size=image_size)
    model.save_pretrained(save_dir)
    processor.save_pretrained(save_dir)
    return save_dir
