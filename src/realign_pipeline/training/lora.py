"""The LoRA adapter ``training/train_refl.py --use_lora`` puts on the UNet (the benchmarks measure the same one)."""

from __future__ import annotations

from typing import Any

#: The attention projections the adapter wraps, as diffusers' ``train_text_to_image_lora.py``.
UNET_LORA_TARGET_MODULES = ("to_k", "to_q", "to_v", "to_out.0")


def unet_lora_config(rank: int) -> Any:
    """A ``peft.LoraConfig`` of rank `rank` (alpha = rank, Gaussian init, so ``lora_B`` starts at zero) on
    :data:`UNET_LORA_TARGET_MODULES`, for ``unet.add_adapter``."""
    from peft import LoraConfig

    return LoraConfig(
        r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=list(UNET_LORA_TARGET_MODULES)
    )
