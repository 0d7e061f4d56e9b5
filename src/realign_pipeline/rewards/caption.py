"""The caption reward of RealignDiff (Eq. 4) and its two differentiable training objectives.

Eq. 4: BLIP-2 captions the generated image, the BLIP-2 Q-Former text encoder embeds the caption and the
prompt, and the reward is the cosine similarity of the two embeddings:

    R(x, p) = cos(E_text(C(x)), E_text(p))

:meth:`CaptionReward.score` computes exactly this (greedy ``generate`` by default). Caption generation is
discrete, so R has no gradient with respect to the image. :meth:`CaptionReward.objective` offers two
differentiable stand-ins (see ``docs/rewards.md``):

- ``"likelihood"`` (default): the teacher-forced log-likelihood of the *prompt* as the image's whole caption
  under the BLIP-2 captioner (CoMat's choice), mean over its tokens. The prompt is written as the captioner
  writes captions (:func:`normalize_caption`: lower case, no ``.`` etc., single spaces) and followed by the
  token ``generate`` ends a caption with, so the likelihood includes ending there: an image whose caption
  merely *starts* with the prompt does not score as one captioned by exactly the prompt. Value: a mean
  log-probability (<= 0).
- ``"score_function"``: the REINFORCE estimate of the gradient of the *expected* Eq. 4 reward over sampled
  captions. K captions per image are sampled without gradient (plain ancestral sampling: temperature 1, no
  top-k/top-p, so the samples come from the distribution whose log-likelihood is differentiated), each is
  rewarded with Eq. 4, and the surrogate is ``mean_k (R_k - mean_j R_j) * log p(c_k | x)`` with the summed
  (not averaged) sequence log-likelihood. The returned value is the Monte Carlo estimate of the expected
  reward, ``mean_k R_k``, with the surrogate's gradient attached (``value + s - s.detach()``), so a hinge on
  it reads in Eq. 4 units.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ..lazy import lazy_model
from .base import check_batch, pixel_values_for

__all__ = ["DEFAULT_CAPTIONER", "DEFAULT_TEXT_ENCODER", "OBJECTIVES", "CaptionReward", "normalize_caption"]

DEFAULT_CAPTIONER = "Salesforce/blip2-opt-2.7b"
DEFAULT_TEXT_ENCODER = "Salesforce/blip2-itm-vit-g"
OBJECTIVES = ("likelihood", "score_function")

# BLIP-2's captioners were trained on captions passed through LAVIS's ``BlipCaptionProcessor.pre_caption``,
# which replaces these characters by spaces after lower-casing.
_CAPTION_PUNCTUATION = re.compile(r'[.!"()*#:;~]')


def normalize_caption(text: str) -> str:
    """``text`` written the way BLIP-2 captions are: lower case, ``. ! " ( ) * # : ; ~`` removed, whitespace
    collapsed to single spaces, stripped ("A Red Cube." -> "a red cube").

    The captioner's training captions looked like this (LAVIS's ``pre_caption``; the shapes world's captions
    are generated in this form), so the prompt is scored as a caption it could have written."""
    return " ".join(_CAPTION_PUNCTUATION.sub(" ", str(text).lower()).split())


class CaptionReward:
    """Eq. 4 (``score``) and a differentiable objective (``objective``) from two BLIP-2 checkpoints.

    Args:
        captioner: hub id or folder of a ``Blip2ForConditionalGeneration`` with a decoder-only language
            model (OPT) and its ``Blip2Processor``.
        text_encoder: hub id or folder loadable as ``Blip2TextModelWithProjection`` (loaded with
            ``use_qformer_text_input=True``) with its tokenizer.
        objective: ``"likelihood"`` or ``"score_function"``.
        num_samples: K, captions sampled per image by the score-function objective (>= 2).
        max_new_tokens: caption length limit for ``score`` and for sampling.
        generate_kwargs: extra ``generate`` arguments for ``score`` (default: the checkpoint's greedy decoding).
        seed: if set, the score-function sampling uses ``seed`` (plus a per-call counter), reproducibly.
        device, dtype: where the models run (``to`` moves them later).
        captioner_model, captioner_processor, text_model, text_tokenizer: already-built objects instead.
    """

    name = "caption"

    def __init__(
        self,
        captioner: str = DEFAULT_CAPTIONER,
        text_encoder: str = DEFAULT_TEXT_ENCODER,
        objective: str = "likelihood",
        num_samples: int = 4,
        *,
        max_new_tokens: int = 30,
        generate_kwargs: dict[str, Any] | None = None,
        seed: int | None = None,
        device: Any = None,
        dtype: torch.dtype | None = None,
        captioner_model: Any = None,
        captioner_processor: Any = None,
        text_model: Any = None,
        text_tokenizer: Any = None,
    ) -> None:
        if objective not in OBJECTIVES:
            raise ValueError(f"unknown caption objective {objective!r}; choose one of {OBJECTIVES}")
        if int(num_samples) < 2 and objective == "score_function":
            raise ValueError("the score-function objective needs num_samples >= 2 (the baseline is their mean)")
        self.captioner_id = str(captioner)
        self.text_encoder_id = str(text_encoder)
        self.objective_name = objective
        self.num_samples = int(num_samples)
        self.max_new_tokens = int(max_new_tokens)
        self.generate_kwargs = dict(generate_kwargs or {})
        self.seed = seed
        self._calls = 0
        self._device = torch.device(device) if device is not None else None
        self._dtype = dtype
        self._cap_model = captioner_model
        self._cap_processor = captioner_processor
        self._text_model = text_model
        self._text_tokenizer = text_tokenizer
        for m in (captioner_model, text_model):
            if m is not None:
                self._prepare(m)

    # --- loading -------------------------------------------------------------------------------------
    def _prepare(self, model: Any) -> Any:
        model.eval()
        model.requires_grad_(False)
        if self._device is not None or self._dtype is not None:
            model.to(device=self._device, dtype=self._dtype)
        return model

    @lazy_model(attr="_cap_model")
    def _blip2_captioner(self):
        from transformers import Blip2ForConditionalGeneration

        return self._prepare(Blip2ForConditionalGeneration.from_pretrained(self.captioner_id))

    @property
    def captioner_model(self):
        """The BLIP-2 captioner (loaded on first access); its language model must be decoder-only (OPT)."""
        model = self._blip2_captioner
        if not model.config.use_decoder_only_language_model:
            raise NotImplementedError("CaptionReward supports BLIP-2 captioners with a decoder-only LM (OPT)")
        return model

    @lazy_model(attr="_cap_processor")
    def captioner_processor(self):
        """The captioner's ``Blip2Processor`` (loaded on first access)."""
        from transformers import Blip2Processor

        return Blip2Processor.from_pretrained(self.captioner_id)

    @lazy_model
    def text_model(self):
        """The ``Blip2TextModelWithProjection`` text encoder (loaded on first access)."""
        from transformers import Blip2Config, Blip2TextModelWithProjection

        config = Blip2Config.from_pretrained(self.text_encoder_id)
        config.qformer_config.use_qformer_text_input = True
        return self._prepare(Blip2TextModelWithProjection.from_pretrained(self.text_encoder_id, config=config))

    @lazy_model
    def text_tokenizer(self):
        """The text encoder's tokenizer (loaded on first access)."""
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.text_encoder_id)

    def load(self) -> CaptionReward:
        _ = self.captioner_model, self.captioner_processor, self.text_model, self.text_tokenizer
        return self

    def to(self, device: Any = None, dtype: torch.dtype | None = None) -> CaptionReward:
        if device is not None:
            self._device = torch.device(device)
        if dtype is not None:
            self._dtype = dtype
        for m in (self._cap_model, self._text_model):
            if m is not None:
                m.to(device=self._device, dtype=self._dtype)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.captioner_model.parameters()).device

    # --- pieces --------------------------------------------------------------------------------------
    def pixel_values(self, images: Any, value_range: tuple[float, float] = (-1.0, 1.0)) -> torch.Tensor:
        """Captioner ``pixel_values`` (differentiable for tensors), on the captioner's device and dtype."""
        pv = pixel_values_for(images, self.captioner_processor.image_processor, value_range)
        p = next(self.captioner_model.vision_model.parameters())
        return pv.to(device=p.device, dtype=p.dtype)

    def _start_ids(self, batch: int) -> torch.Tensor:
        cfg = self.captioner_model.config
        bos = self.captioner_processor.tokenizer.bos_token_id
        if bos is None:
            bos = cfg.text_config.bos_token_id
        ids = [cfg.image_token_index] * cfg.num_query_tokens + [bos]
        return torch.tensor([ids] * batch, dtype=torch.long, device=self.device)

    @torch.no_grad()
    def generate_ids(self, pixel_values: torch.Tensor, **generate_kwargs: Any) -> torch.Tensor:
        """Caption token ids (the generated part only, after BOS), ``(B * num_return_sequences, T)``."""
        start = self._start_ids(pixel_values.shape[0])
        kwargs = {"max_new_tokens": self.max_new_tokens, **generate_kwargs}
        out = self.captioner_model.generate(
            pixel_values=pixel_values, input_ids=start, attention_mask=torch.ones_like(start), **kwargs
        )
        # Decoder-only LMs return the prompt (image tokens + BOS) followed by the new tokens.
        if out.shape[1] >= start.shape[1] and torch.equal(out[:, : start.shape[1]], start.repeat_interleave(out.shape[0] // start.shape[0], 0)):
            out = out[:, start.shape[1] :]
        return out

    def decode(self, ids: torch.Tensor) -> list[str]:
        return [t.strip() for t in self.captioner_processor.tokenizer.batch_decode(ids, skip_special_tokens=True)]

    @torch.no_grad()
    def captions(self, images: Any, **generate_kwargs: Any) -> list[str]:
        """BLIP-2 captions of ``images`` (greedy unless ``generate_kwargs`` say otherwise)."""
        pv = self.pixel_values(images)
        return self.decode(self.generate_ids(pv, **{**self.generate_kwargs, **generate_kwargs}))

    def text_embeds(self, texts: Sequence[str]) -> torch.Tensor:
        """``(N, D)`` L2-normalised Q-Former text embeddings (``text_embeds[:, 0]``), float32, no gradient."""
        model = self.text_model
        enc = self.text_tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt")
        dev = next(model.parameters()).device
        with torch.no_grad():
            out = model(input_ids=enc["input_ids"].to(dev), attention_mask=enc["attention_mask"].to(dev))
        return F.normalize(out.text_embeds[:, 0].float(), dim=-1)

    def caption_similarity(self, captions: Sequence[str], prompts: Sequence[str]) -> torch.Tensor:
        """Eq. 4 given the captions: cosine of the caption's and the prompt's text embeddings, ``(N,)``."""
        captions, prompts = list(captions), list(prompts)
        emb = self.text_embeds(captions + prompts)
        return (emb[: len(captions)] * emb[len(captions) :]).sum(-1)

    def sequence_log_likelihood(
        self, pixel_values: torch.Tensor, token_ids: torch.Tensor, token_mask: torch.Tensor
    ) -> torch.Tensor:
        """Teacher-forced log-likelihood of ``token_ids`` (``B, T``; the caption after BOS) given the image.

        Returns ``(B, T)`` per-token log-probabilities (zero where ``token_mask`` is 0), differentiable in
        ``pixel_values``. ``pixel_values`` may have fewer rows than ``token_ids`` when each image has
        several captions (rows are repeated ``B_tokens // B_images`` times, image-major).
        """
        model = self.captioner_model
        feats = model.get_image_features(pixel_values, return_dict=True).pooler_output  # (B_img, Q, H)
        reps = token_ids.shape[0] // feats.shape[0]
        if reps * feats.shape[0] != token_ids.shape[0]:
            raise ValueError("token rows must be a multiple of the images")
        feats = feats.repeat_interleave(reps, 0)
        bos = self._start_ids(1)[0, -1].item()
        ids = torch.cat([torch.full_like(token_ids[:, :1], bos), token_ids], 1).to(feats.device)
        emb_layer = model.get_input_embeddings()
        text_emb = emb_layer(ids)
        inputs_embeds = torch.cat([feats.to(text_emb.dtype), text_emb], 1)
        mask = torch.cat(
            [torch.ones(feats.shape[:2], dtype=torch.long, device=feats.device), torch.ones_like(ids[:, :1]), token_mask.long().to(feats.device)],
            1,
        )
        logits = model.language_model(inputs_embeds=inputs_embeds, attention_mask=mask).logits
        q = feats.shape[1]
        # logits at position q + j predict ids[:, j + 1] (the caption token j)
        pred = logits[:, q : q + token_ids.shape[1]].float().log_softmax(-1)
        lp = pred.gather(-1, token_ids.to(pred.device).unsqueeze(-1)).squeeze(-1)
        return lp * token_mask.to(lp.dtype).to(lp.device)

    @property
    def caption_end_ids(self) -> list[int]:
        """The token ids at which ``generate`` ends a caption.

        BLIP-2's ``generate`` hands over to its language model's ``generate``, so that model's generation
        config decides, not the tokenizer's ``eos_token``: for ``Salesforce/blip2-opt-2.7b`` it is
        ``text_config.eos_token_id`` 50118, ``"\\n"`` (LAVIS trained the OPT captioners with ``"\\n"`` ending
        each caption), while the tokenizer's EOS is ``</s>``."""
        model = self.captioner_model
        config = getattr(getattr(model, "language_model", None), "generation_config", None)
        eos = getattr(config, "eos_token_id", None)
        if eos is None:
            eos = model.config.text_config.eos_token_id
        if eos is None:
            eos = self.captioner_processor.tokenizer.eos_token_id
        ids = [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None]
        if not ids:
            raise ValueError("the captioner defines no end-of-caption token (eos_token_id)")
        return ids

    @property
    def eos_token_id(self) -> int:
        """The end-of-caption token appended to a scored prompt: the language model's ``eos_token_id`` when
        ``generate`` stops at it (as for blip2-opt-2.7b and the shapes world's captioner), else the first
        stop token."""
        ids = self.caption_end_ids
        text_eos = self.captioner_model.config.text_config.eos_token_id
        return int(text_eos) if text_eos in ids else ids[0]

    def caption_tokens(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Texts as whole captions for teacher forcing: right-padded ids and their mask, ``(N, T)``.

        Each text is normalised as the captioner writes captions (:func:`normalize_caption`), tokenised
        without BOS (:meth:`sequence_log_likelihood` puts it first, as ``generate`` starts from it) and
        followed by :attr:`eos_token_id`, so a likelihood over these tokens is that of the caption *ending*
        there -- the captioner's training loss, which also counts the EOS -- not of a caption prefix."""
        tok = self.captioner_processor.tokenizer
        captions = [normalize_caption(t) for t in texts]
        if any(not c for c in captions):
            raise ValueError("empty prompt: nothing to score")
        eos = self.eos_token_id
        rows = [tok(c, add_special_tokens=False)["input_ids"] + [eos] for c in captions]
        T = max(len(r) for r in rows)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        ids = torch.tensor([r + [pad] * (T - len(r)) for r in rows], dtype=torch.long)
        mask = torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in rows], dtype=torch.long)
        return ids.to(self.device), mask.to(self.device)

    def prompt_log_likelihood(self, pixels: Any, prompts: Sequence[str], value_range=(-1.0, 1.0)) -> torch.Tensor:
        """Mean per-token teacher-forced log-likelihood of each prompt as its image's whole caption, ``(N,)``:
        ``log p(normalised prompt, EOS | image) / (tokens + 1)`` (see :meth:`caption_tokens`)."""
        prompts = check_batch(pixels, prompts)
        pv = self.pixel_values(pixels, value_range)
        ids, mask = self.caption_tokens(prompts)
        lp = self.sequence_log_likelihood(pv, ids, mask)
        return lp.sum(1) / mask.sum(1).to(lp.dtype)

    def _sample(self, pixel_values: torch.Tensor, num_samples: int, seed: int | None) -> torch.Tensor:
        kwargs = {
            "do_sample": True, "num_return_sequences": num_samples, "top_k": 0, "top_p": 1.0, "temperature": 1.0,
        }
        if seed is None:
            return self.generate_ids(pixel_values.detach(), **kwargs)
        devices = [pixel_values.device] if pixel_values.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            return self.generate_ids(pixel_values.detach(), **kwargs)

    def _sample_mask(self, ids: torch.Tensor) -> torch.Tensor:
        """1 up to and including the first end-of-caption token of each sampled row, 0 after (generate pads
        there). The stop tokens are the ones ``generate`` used (:attr:`caption_end_ids`)."""
        is_eos = torch.zeros_like(ids, dtype=torch.bool)
        for e in self.caption_end_ids:
            is_eos |= ids == e
        after = (is_eos.long().cumsum(1) - is_eos.long()) > 0
        return (~after).long()

    def score_function_objective(
        self, pixels: torch.Tensor, prompts: Sequence[str], seed: int | None = None, value_range=(-1.0, 1.0)
    ) -> torch.Tensor:
        """Mean sampled Eq. 4 reward (value) with the REINFORCE-with-baseline gradient, ``(N,)``."""
        prompts = check_batch(pixels, prompts)
        pv = self.pixel_values(pixels, value_range)
        k = self.num_samples
        ids = self._sample(pv, k, seed)  # (N * k, T), image-major
        mask = self._sample_mask(ids)
        captions = self.decode(ids * mask + (1 - mask) * self.captioner_processor.tokenizer.pad_token_id)
        rewards = self.caption_similarity(captions, [p for p in prompts for _ in range(k)]).view(-1, k)
        rewards = rewards.to(pv.device)
        advantage = rewards - rewards.mean(1, keepdim=True)
        logp = self.sequence_log_likelihood(pv, ids, mask).sum(1).view(-1, k)
        surrogate = (advantage * logp).mean(1)
        return rewards.mean(1) + surrogate - surrogate.detach()

    # --- the Reward interface ------------------------------------------------------------------------
    def score_with_captions(self, images: Any, prompts: Sequence[str]) -> tuple[torch.Tensor, list[str]]:
        """Eq. 4 and the captions it used."""
        prompts = check_batch(images, prompts)
        with torch.no_grad():
            captions = self.captions(images)
            return self.caption_similarity(captions, prompts), captions

    def score(self, images: Any, prompts: Sequence[str]) -> torch.Tensor:
        """Eq. 4 exactly: cos(E_text(BLIP-2 caption of the image), E_text(prompt)), ``(N,)``, no gradient."""
        return self.score_with_captions(images, prompts)[0]

    def objective(self, pixels: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """The differentiable training objective chosen by ``objective=`` (higher is better), ``(N,)``."""
        if self.objective_name == "likelihood":
            return self.prompt_log_likelihood(pixels, prompts)
        seed = None
        if self.seed is not None:
            seed = self.seed + self._calls
            self._calls += 1
        return self.score_function_objective(pixels, prompts, seed=seed)

    def __repr__(self) -> str:
        return f"CaptionReward({self.captioner_id!r}, {self.text_encoder_id!r}, objective={self.objective_name!r})"
