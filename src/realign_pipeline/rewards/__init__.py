"""Rewards for ReFL fine-tuning: the caption reward (Eq. 4 + differentiable objectives) and the ablation
rewards of the paper's Table 3 (CLIP, BLIP-2 ITM, ImageReward), all behind one interface
(:class:`Reward`: ``score``, ``objective``, ``to``). See ``docs/rewards.md``."""

from __future__ import annotations

from typing import Any

from .base import Reward, blip2_preprocess_tensor, pixel_values_for
from .blip import DEFAULT_BLIP_ITM_MODEL, BlipItmReward
from .caption import DEFAULT_CAPTIONER, DEFAULT_TEXT_ENCODER, OBJECTIVES, CaptionReward, normalize_caption
from .clip import ClipReward
from .imagereward import IMAGEREWARD_MISSING, ImageRewardAdapter

__all__ = [
    "DEFAULT_BLIP_ITM_MODEL",
    "DEFAULT_CAPTIONER",
    "DEFAULT_TEXT_ENCODER",
    "IMAGEREWARD_MISSING",
    "OBJECTIVES",
    "REWARDS",
    "BlipItmReward",
    "CaptionReward",
    "ClipReward",
    "ImageRewardAdapter",
    "Reward",
    "blip2_preprocess_tensor",
    "load_reward",
    "normalize_caption",
    "pixel_values_for",
]

#: ``load_reward`` names -> classes.
REWARDS = {
    "caption": CaptionReward,
    "clip": ClipReward,
    "blip": BlipItmReward,
    "imagereward": ImageRewardAdapter,
}


def load_reward(name: str, **kwargs: Any) -> Reward:
    """Build a reward by name: ``"caption"``, ``"clip"``, ``"blip"`` or ``"imagereward"``.

    ``kwargs`` go to the class: model ids or local folders (``captioner=``, ``text_encoder=`` for the
    caption reward; ``model=`` for the others), ``device=``, ``dtype=``, objective options
    (``objective=``, ``num_samples=``, ``seed=``, ``head=``). Models load lazily, on first use.
    """
    key = str(name).strip().lower().replace("-", "_")
    key = {"image_reward": "imagereward", "blip_itm": "blip", "blip2": "blip"}.get(key, key)
    if key not in REWARDS:
        raise ValueError(f"unknown reward {name!r}; choose one of {sorted(REWARDS)}")
    return REWARDS[key](**kwargs)
