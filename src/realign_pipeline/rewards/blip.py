"""The BLIP reward of the paper's Table 3 ablation: BLIP-2 image-text matching (``Blip2ForImageTextRetrieval``).

``head="itm"`` (default): the ITM head's probability that image and text match, ``softmax(logits)[:, 1]``,
in ``[0, 1]`` -- the Q-Former attends jointly to the image and the text, the finer of BLIP-2's two scores.
``head="itc"``: the contrastive score, the largest cosine between the 32 projected query embeddings and the
projected text ``[CLS]`` embedding, in ``[-1, 1]``.

``Blip2ForImageTextRetrieval`` fails without an ``attention_mask``; one is always passed. When the checkpoint
sets ``image_token_index``, ``num_query_tokens`` image tokens are put before the text, as its processor does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..lazy import lazy_model
from .base import check_batch, pixel_values_for

__all__ = ["DEFAULT_BLIP_ITM_MODEL", "BlipItmReward"]

DEFAULT_BLIP_ITM_MODEL = "Salesforce/blip2-itm-vit-g"


class BlipItmReward:
    name = "blip"

    def __init__(
        self,
        model: str = DEFAULT_BLIP_ITM_MODEL,
        head: str = "itm",
        *,
        device: Any = None,
        dtype: torch.dtype | None = None,
        retrieval_model: Any = None,
        processor: Any = None,
    ) -> None:
        if head not in ("itm", "itc"):
            raise ValueError(f"head must be 'itm' or 'itc', got {head!r}")
        self.model_id = str(model)
        self.head = head
        self._device = torch.device(device) if device is not None else None
        self._dtype = dtype
        self._model = retrieval_model
        self._processor = processor
        if retrieval_model is not None:
            self._prepare(retrieval_model)

    def _prepare(self, model: Any) -> Any:
        model.eval()
        model.requires_grad_(False)
        if self._device is not None or self._dtype is not None:
            model.to(device=self._device, dtype=self._dtype)
        return model

    @lazy_model
    def model(self):
        """The ``Blip2ForImageTextRetrieval`` (loaded on first access)."""
        from transformers import Blip2ForImageTextRetrieval

        return self._prepare(Blip2ForImageTextRetrieval.from_pretrained(self.model_id))

    @lazy_model
    def processor(self):
        """The ``Blip2Processor`` (loaded on first access)."""
        from transformers import Blip2Processor

        return Blip2Processor.from_pretrained(self.model_id)

    def to(self, device: Any = None, dtype: torch.dtype | None = None) -> BlipItmReward:
        if device is not None:
            self._device = torch.device(device)
        if dtype is not None:
            self._dtype = dtype
        if self._model is not None:
            self._model.to(device=self._device, dtype=self._dtype)
        return self

    def _tokens(self, prompts: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        enc = self.processor.tokenizer(prompts, padding=True, truncation=True, return_tensors="pt")
        ids, mask = enc["input_ids"], enc["attention_mask"]
        cfg = self.model.config
        if cfg.image_token_index is not None:  # the processor prepends the image tokens in this case
            n = cfg.num_query_tokens
            ids = torch.cat([torch.full((ids.shape[0], n), cfg.image_token_index, dtype=ids.dtype), ids], 1)
            mask = torch.cat([torch.ones((mask.shape[0], n), dtype=mask.dtype), mask], 1)
        return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}

    def _forward(self, images: Any, prompts: Sequence[str]) -> torch.Tensor:
        prompts = check_batch(images, prompts)
        model = self.model
        p = next(model.vision_model.parameters())
        pv = pixel_values_for(images, self.processor.image_processor).to(device=p.device, dtype=p.dtype)
        out = model(pixel_values=pv, **self._tokens(prompts, p.device), use_image_text_matching_head=self.head == "itm")
        logits = out.logits_per_image.float()
        if self.head == "itm":
            return logits.softmax(-1)[:, 1]
        return logits.diagonal()  # (N_images, N_texts) of max-over-queries cosines -> the pairs

    def score(self, images: Any, prompts: Sequence[str]) -> torch.Tensor:
        with torch.no_grad():
            return self._forward(images, prompts)

    def objective(self, pixels: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return self._forward(pixels, prompts)

    def __repr__(self) -> str:
        return f"BlipItmReward({self.model_id!r}, head={self.head!r})"
