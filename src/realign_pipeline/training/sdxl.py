"""Stable Diffusion XL's conditioning for ReFL training, free of accelerate and argparse.

``training/train_refl.py`` fine-tunes an SDXL UNet when the checkpoint's ``model_index.json`` names an SDXL
pipeline (:func:`is_sdxl`). Beside the per-token context, SDXL's UNet reads *added conditioning*
(``added_cond_kwargs``): the second text encoder's pooled, projected embedding of the prompt and six time ids
(original size, crop top-left, target size). What the script needs for that, written as diffusers'
``StableDiffusionXLPipeline`` computes it:

- :func:`encode_prompt_xl` -- both encoders' penultimate hidden states concatenated per token (the UNet's
  context) and the second encoder's pooled embedding, as ``StableDiffusionXLPipeline.encode_prompt`` returns
  them without ``clip_skip``;
- :func:`time_ids` -- the six numbers of ``StableDiffusionXLPipeline._get_add_time_ids``, one row per image;
- :func:`read_model_index` / :func:`is_sdxl` -- which pipeline a checkpoint is, from its ``model_index.json``
  (a local folder, or a hub id through the Hugging Face cache).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["SDXL_PIPELINE_CLASSES", "encode_prompt_xl", "is_sdxl", "read_model_index", "time_ids"]

#: ``_class_name`` values of ``model_index.json`` that mean a Stable Diffusion XL (base) checkpoint.
SDXL_PIPELINE_CLASSES = ("StableDiffusionXLPipeline", "RealignDiffXLPipeline")

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def read_model_index(
    model: str | os.PathLike, revision: str | None = None, cache_dir: str | None = None
) -> dict[str, Any] | None:
    """The ``model_index.json`` of a diffusers pipeline folder or hub id, or ``None`` when there is none.

    A local folder is read directly. A string that looks like a hub id (``owner/name``) and is not a local
    path is looked up with ``huggingface_hub.hf_hub_download`` (the cache first; offline without it in the
    cache, or for any error, ``None``). Nothing else is downloaded.
    """
    local = Path(model).expanduser()
    if local.is_dir():
        index = local / "model_index.json"
        if not index.is_file():
            return None
        try:
            return json.loads(index.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None
    text = os.fspath(model)
    if local.exists() or not _HUB_ID.match(text):
        return None
    try:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(text, "model_index.json", revision=revision, cache_dir=cache_dir)
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except Exception:  # noqa: BLE001 - not cached and offline, no such repo, no such file: not known
        return None


def is_sdxl(model_index: dict[str, Any] | None) -> bool:
    """Whether ``model_index.json`` (as :func:`read_model_index` returns it) is an SDXL base pipeline's."""
    return bool(model_index) and model_index.get("_class_name") in SDXL_PIPELINE_CLASSES


def encode_prompt_xl(
    texts: Sequence[str], tokenizers: Sequence[Any], text_encoders: Sequence[Any], device: Any = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL's prompt encoding: ``(context (B, 77, width_1 + width_2), pooled (B, projection))``, no gradient.

    Each tokenizer pads to its ``model_max_length`` and truncates; each encoder's penultimate hidden states
    (``hidden_states[-2]``) are concatenated along the features, and the pooled embedding is the last
    encoder's projected output (``CLIPTextModelWithProjection.text_embeds``). This is what
    ``StableDiffusionXLPipeline.encode_prompt(texts, do_classifier_free_guidance=False)`` returns.
    """
    hidden, pooled = [], None
    for tokenizer, encoder in zip(tokenizers, text_encoders):
        ids = tokenizer(
            list(texts),
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        with torch.no_grad():
            out = encoder(ids.to(device if device is not None else encoder.device), output_hidden_states=True)
        if out[0].ndim == 2:  # the projected pooled output (the second encoder's)
            pooled = out[0]
        hidden.append(out.hidden_states[-2])
    if pooled is None:
        raise ValueError("no text encoder returned a pooled embedding: the last one must be CLIPTextModelWithProjection")
    return torch.cat(hidden, dim=-1), pooled


def time_ids(
    original_sizes: Sequence[tuple[int, int]],
    crops_top_left: Sequence[tuple[int, int]],
    target_size: tuple[int, int],
    device: Any = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """SDXL's time ids, one row per image: ``original (height, width) + crop (top, left) + target (height,
    width)``, as ``StableDiffusionXLPipeline._get_add_time_ids`` builds them; shape ``(len(original_sizes), 6)``.

    A generated image uses ``original = target = (resolution, resolution)`` and crop ``(0, 0)`` (the pipeline's
    defaults); a training image its size before resizing and where the crop started.
    """
    if len(original_sizes) != len(crops_top_left):
        raise ValueError(f"{len(original_sizes)} original sizes for {len(crops_top_left)} crops")
    rows = [[*map(int, size), *map(int, crop), *map(int, target_size)] for size, crop in zip(original_sizes, crops_top_left)]
    return torch.tensor(rows, dtype=dtype, device=device)
