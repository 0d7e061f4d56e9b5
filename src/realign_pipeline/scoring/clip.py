"""CLIP image-text scoring, written once: the captioner's ``ClipTagger``, the CLIP reward and the CLIP metric
all use :class:`ClipScorer`.

Two ways in for images:

- PIL images go through the checkpoint's own ``CLIPProcessor`` (exactly what the model was trained with);
  no gradient (``torch.no_grad``).
- Tensors (``B, C, H, W``, values in ``[-1, 1]`` as a VAE decodes them, or ``[0, 1]``) go through
  :func:`clip_preprocess_tensor`: the processor's steps re-written in torch -- resize the shortest side
  (bicubic, antialiased, width then height as PIL does), center crop, normalise with the processor's
  mean/std -- so gradients reach the pixels. Values outside the range (a VAE overshoots ``[-1, 1]``) are
  clipped *before* resizing, because the processor receives an 8-bit image, which holds nothing outside
  ``[0, 255]``. Tested to match the processor within two 8-bit levels, out-of-range input and noise
  included (the processor rounds to ``uint8`` after each resize pass; torch does not round).

Scores are **raw cosine similarities** of the L2-normalised projected embeddings, in ``[-1, 1]``: no
``logit_scale``, no ``max(100 * cos, 0)`` clipping as in the CLIPScore paper. Multiply by
:attr:`ClipScorer.logit_scale` for CLIP's logits.

``similarity(images, texts)`` is *paired*: image ``i`` with text ``i`` -> shape ``(N,)`` (one image or one
text is broadcast); ``similarity_matrix(images, texts)`` gives every pair -> ``(N_images, N_texts)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import PIL.Image
import torch
import torch.nn.functional as F

from ..lazy import lazy_model

__all__ = ["DEFAULT_CLIP_MODEL", "ClipScorer", "clip_preprocess_tensor", "cosine_similarity"]

#: The default CLIP checkpoint, ViT-L/14 (ViT-B/32 is ``openai/clip-vit-base-patch32``).
DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"


def _features(out: Any) -> torch.Tensor:
    """``get_image_features`` / ``get_text_features`` return a tensor in some transformers versions and a
    ``BaseModelOutputWithPooling`` (projected features in ``pooler_output``) in others."""
    if isinstance(out, torch.Tensor):
        return out
    pooled = getattr(out, "pooler_output", None)
    if pooled is None:
        pooled = out[1] if isinstance(out, (tuple, list)) else None
    if pooled is None:
        raise TypeError(f"cannot read projected features from {type(out).__name__}")
    return pooled


def cosine_similarity(a: torch.Tensor, b: torch.Tensor, *, matrix: bool = False) -> torch.Tensor:
    """Cosine of embeddings (normalised here, so raw embeddings are fine).

    ``matrix=False``: rows paired, ``a`` and ``b`` of shape ``(N, D)`` (or one of them ``(1, D)``) -> ``(N,)``.
    ``matrix=True``: every row of ``a`` against every row of ``b`` -> ``(N_a, N_b)``.
    """
    a = F.normalize(a.float(), dim=-1)
    b = F.normalize(b.float(), dim=-1)
    if matrix:
        return a @ b.T
    return (a * b).sum(-1)


def _resize_output_size(height: int, width: int, shortest_edge: int) -> tuple[int, int]:
    """The processor's output size for ``{"shortest_edge": s}`` (transformers' ``get_resize_output_image_size``
    with ``default_to_square=False``: the long side is truncated, not rounded)."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = shortest_edge, int(shortest_edge * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


def _processor_settings(image_processor: Any) -> dict[str, Any]:
    size = dict(image_processor.size) if getattr(image_processor, "size", None) is not None else {}
    crop = getattr(image_processor, "crop_size", None)
    crop = dict(crop) if crop is not None else None
    return {
        "size": size,
        "do_resize": bool(getattr(image_processor, "do_resize", True)),
        "do_center_crop": bool(getattr(image_processor, "do_center_crop", True)) and crop is not None,
        "crop_size": crop,
        "do_normalize": bool(getattr(image_processor, "do_normalize", True)),
        "mean": list(getattr(image_processor, "image_mean", None) or [0.0, 0.0, 0.0]),
        "std": list(getattr(image_processor, "image_std", None) or [1.0, 1.0, 1.0]),
    }


def _resize_like_pil(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Antialiased bicubic resize of ``[0, 1]`` images as PIL resizes an 8-bit image: width first, then height,
    each pass clipped to ``[0, 1]``. PIL stores the horizontal pass in an 8-bit image before the vertical one,
    so the bicubic filter's overshoot at sharp edges is cut in between; one joint 2-D resize would carry it
    into the second pass (up to ~0.3 normalised units apart on noise). A pass of unchanged size is skipped
    (the bicubic kernel is 1 at 0 and 0 at the other integers, so it would be the identity)."""
    if width != x.shape[-1]:
        x = F.interpolate(x, size=(x.shape[-2], width), mode="bicubic", antialias=True, align_corners=False)
        x = x.clamp(0.0, 1.0)
    if height != x.shape[-2]:
        x = F.interpolate(x, size=(height, width), mode="bicubic", antialias=True, align_corners=False)
        x = x.clamp(0.0, 1.0)
    return x


def clip_preprocess_tensor(
    pixels: torch.Tensor,
    image_processor: Any,
    value_range: tuple[float, float] = (-1.0, 1.0),
) -> torch.Tensor:
    """The CLIP image processor's steps in torch, differentiable: ``(B, C, H, W)`` pixels -> ``pixel_values``.

    1. map ``value_range`` to ``[0, 1]`` (``(-1, 1)`` for VAE output, ``(0, 1)`` for images) and clip to
       ``[0, 1]``: the processor is handed the 8-bit image (``image_processor.postprocess`` /
       ``numpy_to_pil`` clip a VAE's overshoot), so out-of-range values never reach its resize (no gradient
       through clipped values);
    2. resize so the shortest side is ``size["shortest_edge"]`` (or to ``size["height"], size["width"]``),
       bicubic with antialiasing -- torch's antialiased bicubic follows PIL's filter -- in PIL's two passes
       (width, then height), each clipped to ``[0, 1]`` as PIL's 8-bit intermediate and result are (bicubic
       overshoots at sharp edges);
    3. center crop to ``crop_size`` (same offsets as the processor: ``(H - h) // 2``; zero padding if the
       image is smaller, as the processor does);
    4. normalise with the processor's ``image_mean`` / ``image_std``.

    The result is float32 (cast it to the model's dtype yourself). Gradients flow to ``pixels``.
    """
    if pixels.ndim != 4:
        raise ValueError(f"expected pixels of shape (B, C, H, W), got {tuple(pixels.shape)}")
    if pixels.shape[1] == 1:
        pixels = pixels.expand(-1, 3, -1, -1)
    if pixels.shape[1] != 3:
        raise ValueError(f"expected 1 or 3 channels, got {pixels.shape[1]}")
    lo, hi = value_range
    # Clip first: the processor resizes the 8-bit image, in which a VAE's overshoot is already cut to [0, 255];
    # resizing unclipped values would spread the overshoot into neighbouring pixels.
    x = ((pixels.float() - lo) / (hi - lo)).clamp(0.0, 1.0)
    s = _processor_settings(image_processor)
    h, w = x.shape[-2:]
    if s["do_resize"]:
        size = s["size"]
        if size.get("shortest_edge"):
            new_h, new_w = _resize_output_size(h, w, int(size["shortest_edge"]))
        elif size.get("height") and size.get("width"):
            new_h, new_w = int(size["height"]), int(size["width"])
        else:
            raise ValueError(f"unsupported image processor size {size}")
        x = _resize_like_pil(x, new_h, new_w)
        h, w = new_h, new_w
    if s["do_center_crop"]:
        ch, cw = int(s["crop_size"]["height"]), int(s["crop_size"]["width"])
        if ch > h or cw > w:  # the processor pads with zeros (after rescaling to [0, 1]), centred
            pad_h, pad_w = max(ch - h, 0), max(cw - w, 0)
            top, left = math.ceil(pad_h / 2), math.ceil(pad_w / 2)
            x = F.pad(x, (left, pad_w - left, top, pad_h - top))
            h, w = x.shape[-2:]
        top, left = (h - ch) // 2, (w - cw) // 2
        x = x[..., top : top + ch, left : left + cw]
    if s["do_normalize"]:
        mean = torch.tensor(s["mean"], dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(s["std"], dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        x = (x - mean) / std
    return x


class ClipScorer:
    """CLIP image and text embeddings and their cosine similarity, from any CLIP checkpoint.

    The model and the processor are loaded on first use (``from_pretrained`` is cheap), put in eval mode,
    and their parameters are frozen (``requires_grad_(False)``): gradients reach input *pixels* through
    :meth:`image_embeds_from_tensor`, never the CLIP weights.

    Args:
        model_id_or_path: a hub id (default ``openai/clip-vit-large-patch14``) or a local folder with a
            ``CLIPModel`` and a ``CLIPProcessor`` (as ``save_pretrained`` writes them).
        device, dtype: where and in what precision the model runs (default: CPU, the checkpoint's dtype).
        model, processor: already-built objects to use instead of loading (``model_id_or_path`` is then only
            recorded for :meth:`to_config`).
        text_batch_size, image_batch_size: batch sizes of the no-grad embedding helpers.
    """

    def __init__(
        self,
        model_id_or_path: str = DEFAULT_CLIP_MODEL,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        model: Any = None,
        processor: Any = None,
        text_batch_size: int = 256,
        image_batch_size: int = 32,
        **from_pretrained_kwargs: Any,
    ) -> None:
        self.model_id_or_path = str(model_id_or_path)
        self._device = torch.device(device) if device is not None else None
        self._dtype = dtype
        self._model = model
        self._processor = processor
        self.text_batch_size = int(text_batch_size)
        self.image_batch_size = int(image_batch_size)
        self._from_pretrained_kwargs = from_pretrained_kwargs
        if model is not None:
            self._prepare(model)

    @classmethod
    def from_pretrained(
        cls,
        model_id_or_path: str = DEFAULT_CLIP_MODEL,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        **kwargs: Any,
    ) -> ClipScorer:
        """A scorer for ``model_id_or_path``; nothing is loaded until the first embedding is asked for."""
        return cls(model_id_or_path, device=device, dtype=dtype, **kwargs)

    # --- loading -------------------------------------------------------------------------------------
    def _prepare(self, model: Any) -> Any:
        model.eval()
        model.requires_grad_(False)
        if self._device is not None or self._dtype is not None:
            model.to(device=self._device, dtype=self._dtype)
        return model

    @lazy_model
    def model(self):
        """The ``CLIPModel`` (loaded on first access)."""
        from transformers import CLIPModel

        return self._prepare(CLIPModel.from_pretrained(self.model_id_or_path, **self._from_pretrained_kwargs))

    @lazy_model
    def processor(self):
        """The ``CLIPProcessor`` (loaded on first access)."""
        from transformers import CLIPProcessor

        return CLIPProcessor.from_pretrained(self.model_id_or_path)

    @property
    def is_loaded(self) -> bool:
        return self._model is not None

    def load(self) -> ClipScorer:
        """Load model and processor now (they load lazily otherwise). Returns ``self``."""
        _ = self.model, self.processor
        return self

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> ClipScorer:
        """Move the model (now, or when it loads). Returns ``self``."""
        if device is not None:
            self._device = torch.device(device)
        if dtype is not None:
            self._dtype = dtype
        if self._model is not None:
            self._model.to(device=self._device, dtype=self._dtype)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def logit_scale(self) -> float:
        """CLIP's learned temperature ``exp(logit_scale)`` (100 for OpenAI's checkpoints)."""
        return float(self.model.logit_scale.detach().exp())

    @property
    def embed_dim(self) -> int:
        return int(self.model.config.projection_dim)

    def to_config(self) -> dict[str, Any]:
        """What it takes to rebuild this scorer (model id or path, dtype); never weights."""
        return {
            "model": self.model_id_or_path,
            "dtype": str(self._dtype).replace("torch.", "") if self._dtype is not None else None,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any], device: str | torch.device | None = None) -> ClipScorer:
        dtype = config.get("dtype")
        return cls(
            config.get("model", DEFAULT_CLIP_MODEL),
            device=device,
            dtype=getattr(torch, dtype) if dtype else None,
        )

    # --- preprocessing -------------------------------------------------------------------------------
    def preprocess(self, images: PIL.Image.Image | Sequence[PIL.Image.Image]) -> torch.Tensor:
        """PIL images -> ``pixel_values`` through the checkpoint's processor (no gradient)."""
        if isinstance(images, PIL.Image.Image):
            images = [images]
        images = [im.convert("RGB") for im in images]
        return self.processor(images=images, return_tensors="pt")["pixel_values"]

    def preprocess_tensor(
        self, pixels: torch.Tensor, value_range: tuple[float, float] = (-1.0, 1.0)
    ) -> torch.Tensor:
        """Differentiable :func:`clip_preprocess_tensor` with this checkpoint's processor settings."""
        return clip_preprocess_tensor(pixels, self.processor.image_processor, value_range)

    # --- embeddings ----------------------------------------------------------------------------------
    def image_embeds_from_pixel_values(
        self, pixel_values: torch.Tensor, normalize: bool = True
    ) -> torch.Tensor:
        """Projected image embeddings of preprocessed ``pixel_values`` (differentiable), float32."""
        model = self.model
        pv = pixel_values.to(device=self.device, dtype=self.dtype)
        emb = _features(model.get_image_features(pixel_values=pv)).float()
        return F.normalize(emb, dim=-1) if normalize else emb

    def image_embeds_from_tensor(
        self,
        pixels: torch.Tensor,
        value_range: tuple[float, float] = (-1.0, 1.0),
        normalize: bool = True,
    ) -> torch.Tensor:
        """``(B, C, H, W)`` pixels in ``value_range`` -> ``(B, D)`` embeddings, with gradients to ``pixels``."""
        return self.image_embeds_from_pixel_values(self.preprocess_tensor(pixels, value_range), normalize)

    def image_embeds(
        self,
        images: PIL.Image.Image | Sequence[PIL.Image.Image] | torch.Tensor,
        normalize: bool = True,
        value_range: tuple[float, float] = (-1.0, 1.0),
    ) -> torch.Tensor:
        """``(N, D)`` float32 image embeddings, L2-normalised by default, without gradient.

        PIL images use the processor; a ``(B, C, H, W)`` tensor uses the torch path (``value_range``).
        """
        with torch.no_grad():
            if isinstance(images, torch.Tensor):
                return self.image_embeds_from_tensor(images, value_range, normalize)
            if isinstance(images, PIL.Image.Image):
                images = [images]
            out = [
                self.image_embeds_from_pixel_values(
                    self.preprocess(images[i : i + self.image_batch_size]), normalize
                )
                for i in range(0, len(images), self.image_batch_size)
            ]
            return torch.cat(out) if out else torch.empty(0, self.embed_dim)

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Tokenise (padded to the longest, truncated to the model's context length, 77 for CLIP)."""
        max_len = int(self.model.config.text_config.max_position_embeddings)
        enc = self.processor.tokenizer(
            list(texts), padding=True, truncation=True, max_length=max_len, return_tensors="pt"
        )
        return {k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}

    def text_embeds(
        self,
        texts: str | Sequence[str],
        normalize: bool = True,
        batch_size: int | None = None,
        grad: bool = False,
    ) -> torch.Tensor:
        """``(N, D)`` float32 text embeddings, L2-normalised by default, computed in batches.

        ``grad=True`` keeps the graph (for fine-tuning a text side; CLIP's own weights stay frozen here).
        """
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        bs = batch_size or self.text_batch_size
        out = []
        with torch.set_grad_enabled(grad):
            for i in range(0, len(texts), bs):
                enc = self.tokenize(texts[i : i + bs])
                emb = _features(self.model.get_text_features(**enc)).float()
                out.append(F.normalize(emb, dim=-1) if normalize else emb)
        return torch.cat(out) if out else torch.empty(0, self.embed_dim)

    # --- scores --------------------------------------------------------------------------------------
    def _image_embeds_any(self, images: Any, value_range: tuple[float, float]) -> torch.Tensor:
        if isinstance(images, torch.Tensor):
            if images.ndim == 2:  # already embeddings
                return F.normalize(images.float(), dim=-1)
            return self.image_embeds_from_tensor(images, value_range)  # differentiable
        return self.image_embeds(images)

    def _text_embeds_any(self, texts: Any) -> torch.Tensor:
        if isinstance(texts, torch.Tensor):  # already embeddings
            return F.normalize(texts.float(), dim=-1)
        return self.text_embeds(texts)

    def similarity(
        self,
        images: PIL.Image.Image | Sequence[PIL.Image.Image] | torch.Tensor,
        texts: str | Sequence[str] | torch.Tensor,
        value_range: tuple[float, float] = (-1.0, 1.0),
    ) -> torch.Tensor:
        """Paired raw cosine: image ``i`` with text ``i`` -> ``(N,)``; a single image or text is broadcast.

        ``images``: PIL image(s) (no gradient), a ``(B, C, H, W)`` pixel tensor (differentiable), or
        ``(N, D)`` embeddings. ``texts``: string(s) or ``(N, D)`` embeddings.
        """
        img = self._image_embeds_any(images, value_range)
        txt = self._text_embeds_any(texts).to(img.device)
        if img.shape[0] != txt.shape[0] and 1 not in (img.shape[0], txt.shape[0]):
            raise ValueError(f"{img.shape[0]} images but {txt.shape[0]} texts; pass equal numbers or one")
        return cosine_similarity(img, txt)

    def similarity_matrix(
        self,
        images: PIL.Image.Image | Sequence[PIL.Image.Image] | torch.Tensor,
        texts: str | Sequence[str] | torch.Tensor,
        value_range: tuple[float, float] = (-1.0, 1.0),
    ) -> torch.Tensor:
        """Raw cosine of every image with every text -> ``(N_images, N_texts)``."""
        img = self._image_embeds_any(images, value_range)
        txt = self._text_embeds_any(texts).to(img.device)
        return cosine_similarity(img, txt, matrix=True)

    def __repr__(self) -> str:
        state = "loaded" if self.is_loaded else "not loaded"
        return f"ClipScorer({self.model_id_or_path!r}, {state})"
