"""What RealignDiff adds to a diffusers text-to-image pipeline, written once for every pipeline that has it.

:class:`RealignMixin` is the one home of the logic :class:`~realign_pipeline.RealignDiffPipeline` (Stable
Diffusion 1.x/2.x) and :class:`~realign_pipeline.RealignDiffXLPipeline` (SDXL) share: saving and restoring the
dense captioner, checking the layout and modulation arguments, binding layouts to the prompts' tokens,
DenseDiffusion's phrase embeddings, the attention processors' state, the denoising loop with the step told to the
processors, per-word attention maps, and the two-stage ``realign=True`` flow (coarse pass, dense captions, fine
pass from the same noise) with its output. Each pipeline keeps its own ``__call__`` (its parent's steps, in its
parent's order) and answers a few hooks: which tokenizer binds phrases, how a phrase is encoded alone, the dtype
of the initial noise, and the shape of its ``return_dict=False`` tuple.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
from diffusers.utils import BaseOutput, is_torch_xla_available, logging
from diffusers.utils.torch_utils import randn_tensor

from .attention import RealignAttentionState, layouts_modulate, realign_attention_processors
from .captioner.dense import CONFIG_NAME as CAPTIONER_CONFIG_NAME
from .captioner.dense import DenseCaptioner
from .layout import Layout, LayoutError, Region, ResolvedLayout, resolve_layout
from .replay import RandomStateReplay
from .tokens import unique_word_keys, word_token_spans

if is_torch_xla_available():
    import torch_xla.core.xla_model as xm

    XLA_AVAILABLE = True
else:
    XLA_AVAILABLE = False

logger = logging.get_logger(__name__)

#: The folder of a saved pipeline that holds its dense captioner's settings.
CAPTIONER_FOLDER = "dense_captioner"


@dataclass
class RealignDiffPipelineOutput(BaseOutput):
    """Output of :class:`RealignDiffPipeline` and :class:`RealignDiffXLPipeline`.

    Args:
        images: generated images, as in ``StableDiffusionPipelineOutput``.
        nsfw_content_detected: safety checker flags, or None without a safety checker (always None for SDXL,
            which has none).
        attention_maps: with ``return_attention_maps=True``, one dict per image from each prompt word (repeats
            as ``word#2``, ...) to its cross-attention map of shape (latent_height, latent_width), averaged over
            heads, layers and steps (the paper's Figure 7). With ``prompt_embeds`` and no prompt text the keys
            are ``token_<i>``.
        layouts: the layouts as bound to each image's prompt (token indices, appended phrases), or None. With
            ``realign=True`` these are the dense captioner's layouts (masks, scores, phrases, provenance in
            ``.source``): the paper's Figure 6 material. An image whose captioner kept no object has its empty
            layout here too, so its ``.source`` says why (tags, the LLM's answer, what grounding missed).
        coarse_images: with ``realign=True``, the first (coarse) images as PIL images: the images the dense
            captioner read (with SDXL's ``denoising_end`` below 1, the decoded x0 prediction of the coarse pass's
            last step).
        coarse_attention_maps: with ``realign=True`` and ``return_attention_maps=True``, the coarse pass's maps
            (Figure 7's "before"; `attention_maps` are the "after").
        realigned: with ``realign=True``, per image whether it was regenerated with a layout; False when the
            captioner kept no object, and then the image is the coarse image.
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    nsfw_content_detected: list[bool] | None
    attention_maps: list[dict[str, torch.Tensor]] | None = None
    layouts: list[ResolvedLayout | None] | None = None
    coarse_images: list[PIL.Image.Image] | None = None
    coarse_attention_maps: list[dict[str, torch.Tensor]] | None = None
    realigned: list[bool] | None = None


def _as_layout(value: Any, where: str) -> Layout | None:
    if value is None or isinstance(value, Layout):
        return value
    if isinstance(value, dict):
        return Layout.from_dict(value)
    if isinstance(value, ResolvedLayout):  # an output's ``layouts[i]``, fed back in
        return Layout(list(value.regions), source=value.source)
    if isinstance(value, (list, tuple)) and all(isinstance(v, Region) for v in value):
        return Layout(value)
    raise LayoutError(
        f"{where}: expected a Layout (or its dict, a list of Regions, or an output's layouts[i]), got "
        f"{type(value).__name__}."
    )


def expand_layouts(layout: Any, batch_size: int, num_images_per_prompt: int) -> list[Layout | None] | None:
    """One layout for all images, one per prompt, or one per image -> one entry per image."""
    if layout is None:
        return None
    num_images = batch_size * num_images_per_prompt
    is_region_list = isinstance(layout, (list, tuple)) and len(layout) > 0 and all(isinstance(v, Region) for v in layout)
    if not isinstance(layout, (list, tuple)) or is_region_list:
        return [_as_layout(layout, "layout")] * num_images
    layouts = [_as_layout(value, f"layout[{i}]") for i, value in enumerate(layout)]
    if len(layouts) == num_images:
        return layouts
    if len(layouts) == batch_size:
        return [layouts[i // num_images_per_prompt] for i in range(num_images)]
    raise ValueError(
        f"got {len(layouts)} layouts for {batch_size} prompt(s) x {num_images_per_prompt} image(s) per prompt; "
        f"pass one Layout for all images, a list of {batch_size} (one per prompt) or of {num_images} (one per image)."
    )


def captioner_folder(name_or_path: str | os.PathLike, kwargs: dict) -> str | None:
    """The saved captioner folder of a local pipeline folder or a Hub repo, or None when there is none."""
    local = os.path.join(str(name_or_path), CAPTIONER_FOLDER)
    if os.path.isdir(str(name_or_path)):
        return local if os.path.isfile(os.path.join(local, CAPTIONER_CONFIG_NAME)) else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, HFValidationError

    try:
        path = hf_hub_download(
            str(name_or_path),
            f"{CAPTIONER_FOLDER}/{CAPTIONER_CONFIG_NAME}",
            revision=kwargs.get("revision"),
            cache_dir=kwargs.get("cache_dir"),
            token=kwargs.get("token"),
        )
    except (EntryNotFoundError, HfHubHTTPError, HFValidationError, OSError):
        # no such file, offline, no access: the pipeline loads without a captioner
        return None
    return os.path.dirname(path)


def predicted_original_sample(
    scheduler, step_output: Any, model_output: torch.Tensor, timestep: torch.Tensor | float, sample: torch.Tensor
) -> torch.Tensor:
    """The x0 prediction of one scheduler step: the step's own ``pred_original_sample`` where it gives one (DDIM,
    DDPM, Euler, Heun, LMS, KDPM2, ...), else computed from `model_output` (after guidance), the `sample` the step
    started from and ``alphas_cumprod`` at `timestep`, as the scheduler's prediction type says (the solvers that
    give none, DPM-Solver, UniPC, DEIS and PNDM, keep the sample unscaled)."""
    x0 = getattr(step_output, "pred_original_sample", None)
    if x0 is not None:
        return x0
    alphas_cumprod = getattr(scheduler, "alphas_cumprod", None)
    prediction_type = getattr(scheduler.config, "prediction_type", "epsilon")
    if alphas_cumprod is None or prediction_type not in ("epsilon", "v_prediction", "sample"):
        raise ValueError(
            f"{type(scheduler).__name__} gives no x0 prediction and none can be computed for it "
            f"(prediction_type={prediction_type!r}); the coarse pass of realign=True with denoising_end < 1 needs one."
        )
    alpha = alphas_cumprod[int(timestep)].to(device=sample.device, dtype=torch.float32)
    sample32, output32 = sample.float(), model_output.float()
    if prediction_type == "epsilon":
        x0 = (sample32 - (1 - alpha).sqrt() * output32) / alpha.sqrt()
    elif prediction_type == "v_prediction":
        x0 = alpha.sqrt() * sample32 - (1 - alpha).sqrt() * output32
    else:
        x0 = output32
    return x0.to(sample.dtype)


class RealignMixin:
    """RealignDiff's layout modulation and two-stage ``realign=True`` flow for a diffusers pipeline.

    Mixed in before the diffusers pipeline class (``class P(RealignMixin, StableDiffusionPipeline)``). The
    pipeline's ``__init__`` sets :attr:`dense_captioner`; its ``__call__`` calls :meth:`_check_realign_inputs`
    from ``check_inputs``, hands a ``realign=True`` call to :meth:`_realign_call`, and uses
    :meth:`_bind_layouts`, :meth:`_replace_phrase_embeddings`, :meth:`_attention_state`, :meth:`_denoise` and
    :meth:`_word_attention_maps` for one pass. Hooks a pipeline answers: :meth:`_phrase_tokenizer`,
    :meth:`_resolve_image_layout`, :meth:`_encode_phrase_alone`, :meth:`_initial_noise_dtype` and
    :meth:`_output_tuple`.
    """

    dense_captioner: DenseCaptioner | None = None
    _realign_stage: str | None = None
    #: the decoded x0 prediction a coarse pass that stops early (SDXL's ``denoising_end``) leaves for the captioner
    _realign_preview: torch.Tensor | None = None

    # ------------------------------------------------------------------------------------------------ hooks
    def _phrase_tokenizer(self):
        """The tokenizer whose token positions a layout's phrases are bound to."""
        return self.tokenizer

    def _resolve_image_layout(self, layout: Layout, text: str | None, strict: bool, image: int) -> ResolvedLayout:
        """Bind one image's layout to its prompt `text` (``R`` of Eq. 8)."""
        return resolve_layout(layout, text, self._phrase_tokenizer(), strict=strict)

    def _encode_phrase_alone(self, phrase: str, device: torch.device, clip_skip: int | None) -> torch.Tensor:
        """The conditional text encoder states (1, sequence, width) of `phrase` encoded alone."""
        raise NotImplementedError

    def _initial_noise_dtype(self) -> torch.dtype:
        """The dtype the parent's ``prepare_latents`` draws the initial noise in."""
        return self.text_encoder.dtype if self.text_encoder is not None else self.unet.dtype

    def _output_tuple(self, images, nsfw_content_detected, attention_maps, return_attention_maps: bool) -> tuple:
        """The ``return_dict=False`` output: the parent's tuple, then the attention maps when asked for."""
        return (images, nsfw_content_detected) + ((attention_maps,) if return_attention_maps else ())

    # ------------------------------------------------------------------------------------ saving and loading
    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs) -> None:
        """The parent's ``save_pretrained``, plus the dense captioner's settings in ``dense_captioner/``."""
        super().save_pretrained(save_directory, *args, **kwargs)
        if self.dense_captioner is not None:
            self.dense_captioner.save_pretrained(os.path.join(save_directory, CAPTIONER_FOLDER))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs):
        """``DiffusionPipeline.from_pretrained``; also restores a saved dense captioner unless one is passed."""
        if "dense_captioner" not in kwargs:
            captioner_dir = captioner_folder(pretrained_model_name_or_path, kwargs)
            if captioner_dir is not None:
                kwargs["dense_captioner"] = DenseCaptioner.from_pretrained(captioner_dir)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @classmethod
    def from_pipe(cls, pipeline, **kwargs):
        """``DiffusionPipeline.from_pipe``; keeps the source pipeline's dense captioner unless one is passed."""
        kwargs.setdefault("dense_captioner", getattr(pipeline, "dense_captioner", None))
        return super().from_pipe(pipeline, **kwargs)

    # ------------------------------------------------------------------------------------------------ inputs
    def _modulation_grids(self) -> list[int]:
        """The UNet's attention grids by their downsampling from the latents (1, 2, 4, ...): the levels whose down
        or up block has cross-attention, and the lowest when the mid block has it."""
        config = self.unet.config
        levels = len(config.block_out_channels)
        grids = set()
        for level, down in enumerate(config.down_block_types):
            up = config.up_block_types[levels - 1 - level]
            if "CrossAttn" in down or "CrossAttn" in up:
                grids.add(2**level)
        if config.mid_block_type is not None and "CrossAttn" in config.mid_block_type:
            grids.add(2 ** (levels - 1))
        return sorted(grids)

    def _check_realign_inputs(
        self,
        prompt: str | list[str] | None,
        prompt_embeds: torch.Tensor | None,
        layout: Any,
        num_images_per_prompt: int | None,
        cross_attention_strength: float,
        self_attention_strength: float,
        modulation_fraction: float,
        timestep_power: float,
        size_weight: float,
        realign: bool,
        modulated_downsampling: Sequence[int] | None,
    ) -> None:
        """The layout, modulation and ``realign`` arguments (the parent's ``check_inputs`` checks the rest)."""
        modulation = {
            "cross_attention_strength": cross_attention_strength,
            "self_attention_strength": self_attention_strength,
            "modulation_fraction": modulation_fraction,
            "timestep_power": timestep_power,
            "size_weight": size_weight,
        }
        for name, value in modulation.items():
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"`{name}` must be a finite non-negative number, got {value!r}.")
        if modulation_fraction > 1:
            raise ValueError(f"`modulation_fraction` is a fraction of the steps in [0, 1], got {modulation_fraction}.")
        if modulated_downsampling is not None:
            grids = self._modulation_grids()
            factors = list(modulated_downsampling) if isinstance(modulated_downsampling, (list, tuple)) else None
            if not factors or any(isinstance(f, bool) or f not in grids for f in factors):
                raise ValueError(
                    f"`modulated_downsampling` lists attention grids by their downsampling from the latents, some of "
                    f"{grids} for this UNet, got {modulated_downsampling!r}; None modulates every grid (to switch the "
                    "modulation off, set cross_attention_strength=0)."
                )

        if realign:
            if self.dense_captioner is None:
                raise ValueError(
                    "realign=True needs a dense captioner: pass dense_captioner=DenseCaptioner(tagger, llm, grounder) "
                    f"to {type(self).__name__}.from_pretrained(...) or set pipe.dense_captioner."
                )
            if prompt is None:
                raise ValueError(
                    "realign=True needs the prompt text (the captioner reads it); prompt_embeds alone won't do."
                )

        # the layouts' types and their count against the batch; binding them to the prompts happens in __call__
        if isinstance(prompt, str):
            batch_size = 1
        elif isinstance(prompt, list):
            batch_size = len(prompt)
        else:
            batch_size = prompt_embeds.shape[0]
        expand_layouts(layout, batch_size, num_images_per_prompt)

    # ------------------------------------------------------------------------------------- one generation pass
    @property
    def realign_stage(self) -> str | None:
        """Which pass of a ``realign=True`` call is running: ``"coarse"``, ``"fine"``, or None outside one.

        Callbacks (``callback_on_step_end``) fire in both passes with step indices from 0 in each; they read
        this to tell the passes apart.
        """
        return self._realign_stage

    def _layout_prompts(
        self, prompt: str | list[str] | None, batch_size: int, num_images_per_prompt: int
    ) -> list[str | None]:
        if prompt is None:
            return [None] * (batch_size * num_images_per_prompt)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        return [prompts[i // num_images_per_prompt] for i in range(batch_size * num_images_per_prompt)]

    def _bind_layouts(
        self,
        layout: Any,
        prompt: str | list[str] | None,
        batch_size: int,
        num_images_per_prompt: int,
        strict_layout: bool,
    ) -> tuple[list[ResolvedLayout | None] | None, list[str | None], list[str | None]]:
        """Bind the layouts to the prompts: token indices (``R`` of Eq. 8), appended phrases.

        Returns ``(resolved, image_prompts, original_prompts)``: one bound layout (or None) per image, or None
        without a layout; each image's prompt after appending; each image's prompt as given.
        """
        original_prompts = self._layout_prompts(prompt, batch_size, num_images_per_prompt)
        image_prompts = list(original_prompts)
        layouts = expand_layouts(layout, batch_size, num_images_per_prompt)
        if layouts is None:
            return None, image_prompts, original_prompts
        resolved: list[ResolvedLayout | None] = []
        for index, (image_layout, text) in enumerate(zip(layouts, image_prompts)):
            if image_layout is None:
                resolved.append(None)
                continue
            try:
                resolved.append(self._resolve_image_layout(image_layout, text, strict_layout, index))
            except LayoutError as error:
                raise LayoutError(f"layout of image {index}: {error}") from None
        image_prompts = [r.prompt if r is not None else p for r, p in zip(resolved, image_prompts)]
        return resolved, image_prompts, original_prompts

    def _replace_phrase_embeddings(
        self, prompt_embeds: torch.Tensor, layouts: list[ResolvedLayout | None], device, clip_skip
    ) -> torch.Tensor:
        """DenseDiffusion's option: each phrase's tokens take the embeddings of the phrase encoded alone."""
        prompt_embeds = prompt_embeds.clone()
        tokenizer = self._phrase_tokenizer()
        for image, layout in enumerate(layouts):
            for region, indices in zip(layout.regions if layout else [], layout.token_indices if layout else []):
                alone = tokenizer(region.phrase, add_special_tokens=False)["input_ids"]
                if len(alone) != len(indices):
                    logger.warning(
                        f"phrase {region.phrase!r} has {len(alone)} tokens alone but {len(indices)} token indices; "
                        "its embeddings are not replaced."
                    )
                    continue
                phrase_embeds = self._encode_phrase_alone(region.phrase, device, clip_skip)
                prompt_embeds[image, indices] = phrase_embeds[0, 1 : 1 + len(indices)].to(prompt_embeds.dtype)
        return prompt_embeds

    def _attention_state(
        self,
        latents: torch.Tensor,
        num_images: int,
        sequence_length: int,
        resolved: list[ResolvedLayout | None] | None,
        return_attention_maps: bool,
        cross_attention_strength: float,
        self_attention_strength: float,
        modulation_fraction: float,
        timestep_power: float,
        size_weight: float,
        suppress_unclaimed_tokens: bool,
        modulated_downsampling: Sequence[int] | None,
    ) -> RealignAttentionState | None:
        """The processors' state for one pass, or None when nothing needs them (no modulation, no maps): then the
        UNet keeps its own processors and the pass is the parent's, bit for bit."""
        if not (return_attention_maps or layouts_modulate(resolved)):
            return None
        return RealignAttentionState(
            latent_height=latents.shape[-2],
            latent_width=latents.shape[-1],
            num_images=num_images,
            do_classifier_free_guidance=self.do_classifier_free_guidance,
            sequence_length=sequence_length,
            layouts=resolved,
            cross_attention_strength=cross_attention_strength,
            self_attention_strength=self_attention_strength,
            size_weight=size_weight,
            timestep_power=timestep_power,
            modulation_fraction=modulation_fraction,
            suppress_unclaimed_tokens=suppress_unclaimed_tokens,
            modulated_downsampling=None if modulated_downsampling is None else tuple(modulated_downsampling),
            record_attention_maps=return_attention_maps,
        )

    def _word_attention_maps(
        self, token_maps: torch.Tensor, prompts: list[str | None]
    ) -> list[dict[str, torch.Tensor]]:
        maps = []
        tokenizer = self._phrase_tokenizer()
        max_length = tokenizer.model_max_length
        for image, text in enumerate(prompts):
            per_token = token_maps[image].cpu()
            if text is None:
                maps.append({f"token_{i}": per_token[i] for i in range(1, per_token.shape[0] - 1)})
                continue
            spans = word_token_spans(tokenizer, text, max_length)
            keys = unique_word_keys(spans)
            maps.append({key: per_token[list(span.token_indices)].mean(0) for key, span in zip(keys, spans)})
        return maps

    def _denoise(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        num_inference_steps: int,
        num_warmup_steps: int,
        prompt_embeds: torch.Tensor,
        callback_tensors: dict[str, torch.Tensor | None],
        added_cond_kwargs: Callable[[dict[str, torch.Tensor]], dict | None],
        timestep_cond: torch.Tensor | None,
        extra_step_kwargs: dict,
        attention_state: RealignAttentionState | None,
        callback_on_step_end: Callable[[int, int], None] | PipelineCallback | MultiPipelineCallbacks | None,
        callback_on_step_end_tensor_inputs: list[str],
        callback: Callable[[int, int, torch.Tensor], None] | None = None,
        callback_steps: int | None = None,
        predict_original_sample: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The denoising loop, telling the attention processors the step explicitly.

        Adapted from the denoising loops of diffusers' ``StableDiffusionPipeline.__call__`` and
        ``StableDiffusionXLPipeline.__call__``: `callback_tensors` are the tensors besides ``latents`` and
        ``prompt_embeds`` that ``callback_on_step_end`` may read and replace (``negative_prompt_embeds`` for SD,
        ``add_text_embeds`` and ``add_time_ids`` for SDXL), and `added_cond_kwargs` builds the UNet's
        ``added_cond_kwargs`` from them at each step.

        Returns ``(latents, x0)``: x0 is the last step's prediction of the clean latents with
        `predict_original_sample` (see :func:`predicted_original_sample`), else None.
        """
        num_train_timesteps = self.scheduler.config.num_train_timesteps
        self._num_timesteps = len(timesteps)
        tensors = {"latents": latents, "prompt_embeds": prompt_embeds, **callback_tensors}
        x0 = None
        processors = (
            realign_attention_processors(self.unet, attention_state) if attention_state is not None else nullcontext()
        )
        # read once: float(t) on a GPU tensor inside the loop would synchronise at every step
        timestep_values = timesteps.tolist() if attention_state is not None else None
        with processors, self.progress_bar(total=num_inference_steps) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                if attention_state is not None:
                    attention_state.set_step(i, timestep_values[i], len(timesteps), num_train_timesteps)

                latents = tensors["latents"]
                latent_model_input = torch.cat([latents] * 2) if self.do_classifier_free_guidance else latents
                if hasattr(self.scheduler, "scale_model_input"):
                    latent_model_input = self.scheduler.scale_model_input(latent_model_input, t)

                noise_pred = self.unet(
                    latent_model_input,
                    t,
                    encoder_hidden_states=tensors["prompt_embeds"],
                    timestep_cond=timestep_cond,
                    cross_attention_kwargs=self.cross_attention_kwargs,
                    added_cond_kwargs=added_cond_kwargs(tensors),
                    return_dict=False,
                )[0]

                if self.do_classifier_free_guidance:
                    noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
                    noise_pred = noise_pred_uncond + self.guidance_scale * (noise_pred_text - noise_pred_uncond)
                if self.do_classifier_free_guidance and self.guidance_rescale > 0.0:
                    noise_pred = rescale_noise_cfg(noise_pred, noise_pred_text, guidance_rescale=self.guidance_rescale)

                latents_dtype = latents.dtype
                if predict_original_sample and i == len(timesteps) - 1:
                    step = self.scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=True)
                    x0 = predicted_original_sample(self.scheduler, step, noise_pred, t, latents)
                    latents = step.prev_sample
                else:
                    latents = self.scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[0]
                if latents.dtype != latents_dtype and torch.backends.mps.is_available():
                    # some platforms (eg. apple mps) misbehave due to a pytorch bug: https://github.com/pytorch/pytorch/pull/99272
                    latents = latents.to(latents_dtype)
                tensors["latents"] = latents

                if callback_on_step_end is not None:
                    callback_kwargs = {k: tensors[k] for k in callback_on_step_end_tensor_inputs}
                    callback_outputs = callback_on_step_end(self, i, t, callback_kwargs)
                    for name, value in tensors.items():
                        tensors[name] = callback_outputs.pop(name, value)

                if i == len(timesteps) - 1 or ((i + 1) > num_warmup_steps and (i + 1) % self.scheduler.order == 0):
                    progress_bar.update()
                    if callback is not None and i % callback_steps == 0:
                        callback(i // getattr(self.scheduler, "order", 1), t, tensors["latents"])

                if XLA_AVAILABLE:
                    xm.mark_step()
        return tensors["latents"], x0

    # ------------------------------------------------------------------------------------ realign=True: two passes
    def _initial_noise(
        self, num_images: int, height: int, width: int, generator: torch.Generator | list[torch.Generator] | None
    ) -> torch.Tensor:
        """The unscaled initial noise ``prepare_latents`` would draw: both passes scale it by
        ``scheduler.init_noise_sigma`` themselves, so it must not be scaled here."""
        shape = (
            num_images,
            self.unet.config.in_channels,
            int(height) // self.vae_scale_factor,
            int(width) // self.vae_scale_factor,
        )
        if isinstance(generator, list) and len(generator) != num_images:
            raise ValueError(
                f"You have passed a list of generators of length {len(generator)}, but requested an effective batch"
                f" size of {num_images}. Make sure the batch size matches the length of the generators."
            )
        return randn_tensor(shape, generator=generator, device=self._execution_device, dtype=self._initial_noise_dtype())

    def _realign_call(self, pass_args: dict[str, Any]) -> RealignDiffPipelineOutput | tuple:
        """Coarse pass, dense captions, fine pass from the same noise (Sec. 3.2.2).

        `pass_args` are the keyword arguments of one pass: every argument of `__call__` but `realign`, checked,
        with `height` and `width` filled in. "The same noise" is the same initial latents and, for stochastic
        samplers, the same noise at every step: the fine pass replays the random state the coarse pass started
        from. A coarse pass that stops early (SDXL's ``denoising_end``) leaves the decoded x0 prediction of its
        last step in ``_realign_preview``; the captioner reads that instead of the unfinished image.
        """
        prompt = pass_args["prompt"]
        batch_size = 1 if isinstance(prompt, str) else len(prompt)
        per_prompt = pass_args["num_images_per_prompt"] or 1
        num_images = batch_size * per_prompt
        height, width = pass_args["height"], pass_args["width"]
        generator = pass_args["generator"]
        latents = pass_args["latents"]
        if latents is None:
            latents = self._initial_noise(num_images, height, width, generator)
        user_layouts = expand_layouts(pass_args["layout"], batch_size, per_prompt) or [None] * num_images
        output_type, return_dict = pass_args["output_type"], pass_args["return_dict"]

        stage = {**pass_args, "latents": latents, "return_dict": True}
        replay = RandomStateReplay(generator, self._execution_device)  # after the initial noise is drawn
        try:
            self._realign_stage = "coarse"
            self._realign_preview = None
            coarse = self(**{**stage, "layout": None, "output_type": "pt"})
            preview = self._realign_preview if self._realign_preview is not None else coarse.images
            self._realign_stage = None
            self._realign_preview = None
            coarse_pil = self.image_processor.numpy_to_pil(self.image_processor.pt_to_numpy(preview))

            prompts = self._layout_prompts(prompt, batch_size, per_prompt)
            to_caption = [i for i, layout in enumerate(user_layouts) if layout is None]
            layouts = list(user_layouts)
            if to_caption:
                # One image at a time, so the progress bar moves: tagging, LLM calls and grounding all take
                # seconds per image with the real models.
                with self.progress_bar(total=len(to_caption)) as bar:
                    bar.set_description("dense captioning")
                    for index in to_caption:
                        layouts[index] = self.dense_captioner([coarse_pil[index]], [prompts[index]])[0]
                        bar.update()
            realigned = [layout is not None and len(layout) > 0 for layout in layouts]
            for index, done in enumerate(realigned):
                if not done:
                    logger.warning(f"image {index}: the dense captioner kept no object; returning the coarse image.")

            if any(realigned) or output_type == "latent":  # latents of the coarse pass are not kept: regenerate
                self._realign_stage = "fine"
                fine_layouts = [layouts[i] if realigned[i] else None for i in range(num_images)]
                final = self(**{**stage, "generator": replay.generator(), "layout": fine_layouts,
                                "output_type": output_type})
            else:
                final = coarse
        finally:
            self._realign_stage = None
            self._realign_preview = None

        if final is coarse:
            images = self._from_pt(coarse.images, output_type)
        elif output_type == "latent":
            images = final.images
        else:
            images = self._substitute_coarse(final.images, coarse.images, realigned, output_type)
        nsfw = final.nsfw_content_detected
        if nsfw is not None and final is not coarse and coarse.nsfw_content_detected is not None:
            nsfw = [nsfw[i] if realigned[i] else coarse.nsfw_content_detected[i] for i in range(num_images)]
        resolved = [
            final.layouts[i] if final.layouts is not None and realigned[i] else self._bound_empty(layouts[i], prompts[i])
            for i in range(num_images)
        ]
        attention_maps = final.attention_maps
        if not return_dict:
            return self._output_tuple(images, nsfw, attention_maps, pass_args["return_attention_maps"])
        return RealignDiffPipelineOutput(
            images=images,
            nsfw_content_detected=nsfw,
            attention_maps=attention_maps,
            layouts=resolved,
            coarse_images=coarse_pil,
            coarse_attention_maps=coarse.attention_maps,
            realigned=realigned,
        )

    def _bound_empty(self, layout: Layout | None, prompt: str) -> ResolvedLayout | None:
        """A captioner's layout that kept no object, bound to its prompt, so its `source` (tags, the LLM's
        answer, why grounding found nothing) reaches the output."""
        if layout is None:
            return None
        return resolve_layout(layout, prompt, self._phrase_tokenizer())

    def _from_pt(self, images: torch.Tensor, output_type: str):
        """Images in [0, 1] (NCHW) as `output_type` ("pt", "np" or "pil")."""
        if output_type == "pt":
            return images
        as_numpy = self.image_processor.pt_to_numpy(images)
        return as_numpy if output_type == "np" else self.image_processor.numpy_to_pil(as_numpy)

    def _substitute_coarse(self, images, coarse: torch.Tensor, realigned: list[bool], output_type: str):
        """`images` (in `output_type`) with the coarse image wherever nothing was realigned."""
        coarse_images = self._from_pt(coarse, output_type)
        images = images.clone() if output_type == "pt" else np.array(images) if output_type == "np" else list(images)
        for i, done in enumerate(realigned):
            if not done:
                images[i] = coarse_images[i]
        return images

    def _pass_output(
        self,
        images,
        nsfw_content_detected: list[bool] | None,
        attention_maps: list[dict[str, torch.Tensor]] | None,
        layouts: list[ResolvedLayout | None] | None,
        return_dict: bool,
        return_attention_maps: bool,
    ) -> RealignDiffPipelineOutput | tuple:
        """The output of one generation pass (a call without ``realign``)."""
        if not return_dict:
            return self._output_tuple(images, nsfw_content_detected, attention_maps, return_attention_maps)
        return RealignDiffPipelineOutput(
            images=images, nsfw_content_detected=nsfw_content_detected, attention_maps=attention_maps, layouts=layouts
        )
