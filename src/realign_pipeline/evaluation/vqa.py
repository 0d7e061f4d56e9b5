"""BLIP-VQA score, T2I-CompBench style (**an approximation** of the official evaluator).

T2I-CompBench (Huang et al., 2023) scores attribute binding (colour, shape, texture) by asking BLIP-VQA, for
each noun phrase of the prompt, the question ``"<phrase>?"`` and taking the probability of the answer
``"yes"``; the image's score is the product over the phrases. This module does the same with transformers'
:class:`~transformers.BlipForQuestionAnswering` (default ``Salesforce/blip-vqa-base``):

- the probability of "yes" is the softmax of the answer decoder's **first** token logits (after the decoder
  start token), at the id of ``"yes"``;
- phrases come from the package's rule-based phrase finder
  (:func:`realign_pipeline.captioner.llm_rules.prompt_objects_detailed`; the whole prompt when it finds none),
  not from spaCy noun chunks;
- the official evaluator runs LAVIS' BLIP VQA (a LAVIS checkpoint, LAVIS preprocessing, ``[ENC]`` token in
  the question encoder). Numbers from here are therefore **not** the official T2I-CompBench numbers: compare
  configurations scored with this class with each other, not with published tables.
"""

from __future__ import annotations

from typing import Any

import torch

from ..rewards.base import pixel_values_for
from .metrics import Metric

__all__ = ["DEFAULT_BLIP_VQA_MODEL", "BlipVqaScore", "vqa_questions"]

DEFAULT_BLIP_VQA_MODEL = "Salesforce/blip-vqa-base"


def vqa_questions(prompt: str) -> list[str]:
    """The questions asked for ``prompt``: ``"<phrase>?"`` per noun phrase (the prompt itself if none)."""
    from ..captioner.llm_rules import prompt_objects_detailed

    phrases = [obj.phrase for obj in prompt_objects_detailed(prompt)]
    if not phrases:
        phrases = [prompt.strip().rstrip(".?!")]
    return [f"{p}?" for p in phrases]


class BlipVqaScore(Metric):
    """BLIP-VQA score (T2I-CompBench style, an approximation; see the module docstring): per image, the
    product over the prompt's noun phrases of P("yes" | image, "<phrase>?"), in ``[0, 1]``.

    The questions asked and their probabilities are kept in :attr:`questions` / :attr:`answers` (update
    order, one list per image)."""

    name = "blip_vqa"
    fields = ("blip_vqa",)

    def __init__(self, model: Any, processor: Any, model_id: str = DEFAULT_BLIP_VQA_MODEL, answer: str = "yes"):
        self.model = model.eval().requires_grad_(False)
        self.processor = processor
        self.model_id = str(model_id)
        ids = processor.tokenizer(answer, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError(f"the tokenizer gives no token for the answer {answer!r}")
        self.answer = answer
        self.answer_token_id = int(ids[0])
        self.questions: list[list[str]] = []
        self.answers: list[list[float]] = []
        super().__init__()

    @classmethod
    def from_pretrained(
        cls,
        id_or_path: str = DEFAULT_BLIP_VQA_MODEL,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> BlipVqaScore:
        """A ``BlipForQuestionAnswering`` + ``BlipProcessor`` checkpoint (hub id or local folder)."""
        from transformers import BlipForQuestionAnswering, BlipProcessor

        model = BlipForQuestionAnswering.from_pretrained(str(id_or_path))
        if device is not None or dtype is not None:
            model = model.to(device=device, dtype=dtype)
        return cls(model, BlipProcessor.from_pretrained(str(id_or_path)), model_id=str(id_or_path))

    def reset(self) -> None:
        super().reset()
        self.questions, self.answers = [], []

    def model_info(self) -> dict[str, Any]:
        return {"model": self.model_id}

    def yes_probability(self, pixel_values: torch.Tensor, questions: list[str]) -> torch.Tensor:
        """P(answer's first token) for each (image, question) row: ``pixel_values`` (N, C, H, W), N questions."""
        p = next(self.model.parameters())
        tok = self.processor.tokenizer(questions, padding=True, return_tensors="pt")
        input_ids, mask = tok["input_ids"].to(p.device), tok["attention_mask"].to(p.device)
        image_embeds = self.model.vision_model(pixel_values=pixel_values.to(p.device, p.dtype))[0]
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=p.device)
        question = self.model.text_encoder(
            input_ids=input_ids, attention_mask=mask, encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_mask, return_dict=False,
        )[0]
        start = torch.full((len(questions), 1), self.model.decoder_start_token_id, device=p.device)
        logits = self.model.text_decoder(
            input_ids=start, encoder_hidden_states=question, encoder_attention_mask=mask, return_dict=True,
        ).logits[:, 0, :]
        return logits.float().softmax(-1)[:, self.answer_token_id]

    def _score(self, images: Any, prompts: list[str]) -> dict[str, torch.Tensor]:
        pv = pixel_values_for(images, self.processor.image_processor)
        per_image = [vqa_questions(p) for p in prompts]
        rows = torch.tensor([i for i, qs in enumerate(per_image) for _ in qs])
        flat = [q for qs in per_image for q in qs]
        probs = self.yes_probability(pv[rows], flat).double().cpu()
        scores, k = [], 0
        for qs in per_image:
            these = probs[k : k + len(qs)]
            k += len(qs)
            self.questions.append(qs)
            self.answers.append(these.tolist())
            scores.append(these.prod())
        return {"blip_vqa": torch.stack(scores)}
