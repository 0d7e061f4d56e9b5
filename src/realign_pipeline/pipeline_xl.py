"""`RealignDiffXLPipeline`: Stable Diffusion XL with RealignDiff's layout-guided attention modulation (Eq. 8)."""

from collections.abc import Callable, Sequence
from typing import Any

import torch
from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import PipelineImageInput
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import retrieve_timesteps
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import deprecate, is_torch_xla_available, replace_example_docstring
from transformers import (
    CLIPImageProcessor,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionModelWithProjection,
)

from .captioner.dense import DenseCaptioner
from .layout import Layout, LayoutError, Region, ResolvedLayout, resolve_layout
from .realign_mixin import RealignDiffPipelineOutput, RealignMixin
from .tokens import prompt_token_ids

try:  # diffusers >= 0.41; the device a module's offload hooks run it on
    from diffusers.utils.torch_utils import get_module_execution_device
except ImportError:  # pragma: no cover - older diffusers

    def get_module_execution_device(module: torch.nn.Module) -> torch.device:
        return module.device


XLA_AVAILABLE = is_torch_xla_available()

__all__ = ["RealignDiffXLPipeline"]

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from realign_pipeline import Layout, RealignDiffXLPipeline, Region
        >>> from realign_pipeline.captioner import DenseCaptioner

        >>> pipe = RealignDiffXLPipeline.from_pretrained(
        ...     "stabilityai/stable-diffusion-xl-base-1.0", dtype=torch.float16, variant="fp16"
        ... ).to("cuda")
        >>> prompt = "a red book and a yellow vase"
        >>> layout = Layout([
        ...     Region("red book", box=[0.05, 0.35, 0.45, 0.95]),
        ...     Region("yellow vase", box=[0.55, 0.15, 0.95, 0.95]),
        ... ])
        >>> image = pipe(prompt, layout=layout, generator=torch.Generator("cuda").manual_seed(42)).images[0]

        >>> # the fine stage: generate, caption densely, generate again from the same noise with that layout
        >>> pipe.dense_captioner = DenseCaptioner()
        >>> output = pipe(prompt, realign=True, generator=torch.Generator("cuda").manual_seed(42))
        >>> coarse_image, image, layout = output.coarse_images[0], output.images[0], output.layouts[0]
        ```
"""


class RealignDiffXLPipeline(RealignMixin, StableDiffusionXLPipeline):
    r"""Stable Diffusion XL with RealignDiff's re-weighting attention modulation (Eq. 8 of Fang et al., 2023).

    What :class:`~realign_pipeline.RealignDiffPipeline` is to Stable Diffusion 1.x/2.x, for SDXL: load it like any
    SDXL pipeline (``RealignDiffXLPipeline.from_pretrained(...)`` or ``.from_pipe(sdxl_pipeline)``). Called
    without a `layout` and without `return_attention_maps` it is exactly
    :class:`~diffusers.StableDiffusionXLPipeline`. With a :class:`~realign_pipeline.Layout` it installs
    :class:`~realign_pipeline.attention.RealignAttnProcessor` on the UNet's cross-attention layers for the call.
    With a `dense_captioner`, ``pipe(prompt, realign=True)`` runs the coarse pass, the dense captioner and the fine
    pass from the same noise; the captioner's settings are saved with the pipeline in ``dense_captioner/``.

    SDXL concatenates its two text encoders' hidden states per token, so a phrase's token positions (``R`` of
    Eq. 8) are the same in the 2048-wide context as in each tokenizer: the layout is bound with `tokenizer`, and
    a call whose prompt `tokenizer_2` splits differently raises. Eq. 8 acts on cross-attention only; the pooled
    text embedding and the time ids (SDXL's added conditioning) are left as they are. The logic shared with the
    SD pipeline lives in :class:`~realign_pipeline.realign_mixin.RealignMixin`.
    """

    # the same annotations as the parent: diffusers reads them (from_pipe checks component types)
    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        text_encoder_2: CLIPTextModelWithProjection,
        tokenizer: CLIPTokenizer,
        tokenizer_2: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
        image_encoder: CLIPVisionModelWithProjection = None,
        feature_extractor: CLIPImageProcessor = None,
        force_zeros_for_empty_prompt: bool = True,
        add_watermarker: bool | None = None,
        dense_captioner: DenseCaptioner | None = None,
    ):
        super().__init__(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            unet=unet,
            scheduler=scheduler,
            image_encoder=image_encoder,
            feature_extractor=feature_extractor,
            force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
            add_watermarker=add_watermarker,
        )
        self.dense_captioner = dense_captioner
        self._realign_stage: str | None = None

    # ------------------------------------------------------------------------------------------------ hooks
    def _phrase_tokenizer(self):
        return self.tokenizer if self.tokenizer is not None else self.tokenizer_2

    def _initial_noise_dtype(self) -> torch.dtype:
        # the dtype of the prompt embeddings, which StableDiffusionXLPipeline draws the noise in
        return self.text_encoder_2.dtype if self.text_encoder_2 is not None else self.unet.dtype

    def _output_tuple(self, images, nsfw_content_detected, attention_maps, return_attention_maps: bool) -> tuple:
        return (images,) + ((attention_maps,) if return_attention_maps else ())

    def _encode_phrase_alone(self, phrase: str, device: torch.device, clip_skip: int | None) -> torch.Tensor:
        return self.encode_prompt(
            phrase, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False, clip_skip=clip_skip
        )[0]

    def _resolve_image_layout(self, layout: Layout, text: str | None, strict: bool, image: int) -> ResolvedLayout:
        resolved = resolve_layout(layout, text, self._phrase_tokenizer(), strict=strict)
        if resolved.prompt is not None:
            self._check_tokenizers_agree(resolved.prompt)
        return resolved

    def _check_tokenizers_agree(self, text: str) -> None:
        """Raise when `tokenizer` and `tokenizer_2` put the tokens of `text` at different positions.

        The UNet reads one context vector per token position, the first encoder's states beside the second's, so
        a phrase bound to positions of `tokenizer` must sit at the same positions for `tokenizer_2`. SDXL ships the
        same vocabulary in both (only the padding token differs, which comes after the text).
        """
        first, second = self.tokenizer, self.tokenizer_2
        if first is None or second is None or first is second:
            return
        ids, ids_2 = prompt_token_ids(first, text), prompt_token_ids(second, text)
        if ids == ids_2:
            return
        tokens, tokens_2 = first.convert_ids_to_tokens(ids), second.convert_ids_to_tokens(ids_2)
        if tokens == tokens_2:
            return
        position = next((i for i, (a, b) in enumerate(zip(tokens, tokens_2)) if a != b), min(len(tokens), len(tokens_2)))
        raise LayoutError(
            f"tokenizer and tokenizer_2 split the prompt {text!r} differently ({len(tokens)} and {len(tokens_2)} "
            f"tokens; at position {position}: {tokens[position:position + 3]} and {tokens_2[position:position + 3]}). "
            "SDXL concatenates the two text encoders' states per token, so a layout's phrases need the same token "
            "positions in both; give both the same vocabulary (and the same added tokens)."
        )

    def check_inputs(
        self,
        prompt: str | list[str] | None,
        prompt_2: str | list[str] | None,
        height: int,
        width: int,
        callback_steps: int | None,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        ip_adapter_image: PipelineImageInput | None = None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        layout: Any = None,
        num_images_per_prompt: int | None = 1,
        cross_attention_strength: float = 1.0,
        self_attention_strength: float = 0.0,
        modulation_fraction: float = 0.3,
        timestep_power: float = 5.0,
        size_weight: float = 1.0,
        realign: bool = False,
        modulated_downsampling: Sequence[int] | None = None,
    ) -> None:
        """``StableDiffusionXLPipeline.check_inputs``, then the layout, modulation and ``realign`` arguments."""
        super().check_inputs(
            prompt,
            prompt_2,
            height,
            width,
            callback_steps,
            negative_prompt,
            negative_prompt_2,
            prompt_embeds,
            negative_prompt_embeds,
            pooled_prompt_embeds,
            negative_pooled_prompt_embeds,
            ip_adapter_image,
            ip_adapter_image_embeds,
            callback_on_step_end_tensor_inputs,
        )
        self._check_realign_inputs(
            prompt,
            prompt_embeds,
            layout,
            num_images_per_prompt,
            cross_attention_strength,
            self_attention_strength,
            modulation_fraction,
            timestep_power,
            size_weight,
            realign,
            modulated_downsampling,
        )
        if (layout is not None or realign) and prompt_2 is not None and prompt_2 != prompt:
            raise ValueError(
                "a layout (or realign=True) with a prompt_2 that differs from the prompt: a layout binds each phrase to "
                "token positions that SDXL's two text encoders share (their states are concatenated per token), so "
                "both must read the same text; pass prompt_2=None."
            )

    def _decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """The VAE decode of StableDiffusionXLPipeline.__call__: a float16 VAE with ``force_upcast`` decodes in
        float32 (and goes back to float16), SDXL's latents mean and std where the VAE has them."""
        needs_upcasting = self.vae.dtype == torch.float16 and self.vae.config.force_upcast
        if needs_upcasting:
            self.vae.to(dtype=torch.float32)  # what the parent's (deprecated) upcast_vae does
            latents = latents.to(next(iter(self.vae.post_quant_conv.parameters())).dtype)
        elif latents.dtype != self.vae.dtype and torch.backends.mps.is_available():
            # some platforms (eg. apple mps) misbehave due to a pytorch bug: https://github.com/pytorch/pytorch/pull/99272
            self.vae = self.vae.to(latents.dtype)

        has_latents_mean = hasattr(self.vae.config, "latents_mean") and self.vae.config.latents_mean is not None
        has_latents_std = hasattr(self.vae.config, "latents_std") and self.vae.config.latents_std is not None
        if has_latents_mean and has_latents_std:
            latents_mean = torch.tensor(self.vae.config.latents_mean).view(1, 4, 1, 1).to(latents.device, latents.dtype)
            latents_std = torch.tensor(self.vae.config.latents_std).view(1, 4, 1, 1).to(latents.device, latents.dtype)
            latents = latents * latents_std / self.vae.config.scaling_factor + latents_mean
        else:
            latents = latents / self.vae.config.scaling_factor

        latents = latents.to(get_module_execution_device(self.vae))
        image = self.vae.decode(latents, return_dict=False)[0]
        if needs_upcasting:
            self.vae.to(dtype=torch.float16)
        return image

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        denoising_end: float | None = None,
        guidance_scale: float = 5.0,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        num_images_per_prompt: int | None = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        ip_adapter_image: PipelineImageInput | None = None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        output_type: str | None = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        guidance_rescale: float = 0.0,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
        negative_original_size: tuple[int, int] | None = None,
        negative_crops_coords_top_left: tuple[int, int] = (0, 0),
        negative_target_size: tuple[int, int] | None = None,
        clip_skip: int | None = None,
        callback_on_step_end: Callable[[int, int], None] | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        layout: Layout
        | ResolvedLayout
        | dict[str, Any]
        | Sequence[Region]
        | Sequence[Layout | ResolvedLayout | dict[str, Any] | Sequence[Region] | None]
        | None = None,
        cross_attention_strength: float = 1.0,
        self_attention_strength: float = 0.0,
        modulation_fraction: float = 0.3,
        timestep_power: float = 5.0,
        size_weight: float = 1.0,
        suppress_unclaimed_tokens: bool = False,
        modulated_downsampling: Sequence[int] | None = None,
        replace_phrase_embeddings: bool = False,
        strict_layout: bool = False,
        return_attention_maps: bool = False,
        realign: bool = False,
        **kwargs,
    ) -> RealignDiffPipelineOutput | tuple:
        r"""Generate images, modulating attention with `layout` (Eq. 8) when one is given.

        Takes every argument of :meth:`diffusers.StableDiffusionXLPipeline.__call__`, plus the layout, modulation
        and ``realign`` arguments of :meth:`realign_pipeline.RealignDiffPipeline.__call__`, which mean the same
        here (`layout`, `cross_attention_strength`, `self_attention_strength`, `modulation_fraction`,
        `timestep_power`, `size_weight`, `suppress_unclaimed_tokens`, `modulated_downsampling`,
        `replace_phrase_embeddings`, `strict_layout`, `return_attention_maps`, `realign`). For SDXL:

        - a layout binds phrases to the tokens of `prompt`, which both text encoders read: with a layout or
          ``realign=True``, `prompt_2` must be None or the prompt itself;
        - `modulated_downsampling` names SDXL's attention grids, 2 (half the latents: 64x64 at 1024 px) and 4
          (32x32); the latents' own grid has no attention in SDXL;
        - with ``realign=True`` and `denoising_end` below 1 (base + refiner) both passes stop there, and the
          captioner reads the decoded x0 prediction of the coarse pass's last step, since the coarse pass has
          no finished image; `coarse_images` are those decodes.

        Examples:

        Returns:
            [`RealignDiffPipelineOutput`] or `tuple`:
                If `return_dict` is `True`, a [`RealignDiffPipelineOutput`] as for ``RealignDiffPipeline``
                (`nsfw_content_detected` is None: SDXL has no safety checker). Otherwise a `tuple` ``(images,)``,
                as ``StableDiffusionXLPipeline`` returns, followed by the attention maps when
                ``return_attention_maps=True``.
        """
        callback = kwargs.pop("callback", None)
        callback_steps = kwargs.pop("callback_steps", None)
        if kwargs:
            raise TypeError(f"unexpected keyword argument(s): {sorted(kwargs)}")
        # a realign=True pass gets the caller's callback; the caller's own call has warned already
        if callback is not None and self._realign_stage is None:
            deprecate(
                "callback",
                "1.0.0",
                "Passing `callback` as an input argument to `__call__` is deprecated, consider use `callback_on_step_end`",
            )
        if callback_steps is not None and self._realign_stage is None:
            deprecate(
                "callback_steps",
                "1.0.0",
                "Passing `callback_steps` as an input argument to `__call__` is deprecated, consider use `callback_on_step_end`",
            )
        if callback_on_step_end_tensor_inputs is None:
            callback_on_step_end_tensor_inputs = ["latents"]
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs

        # 0. Default height and width to unet
        height = height or self.default_sample_size * self.vae_scale_factor
        width = width or self.default_sample_size * self.vae_scale_factor

        original_size = original_size or (height, width)
        target_size = target_size or (height, width)

        # 1. Check inputs. Raise error if not correct
        self.check_inputs(
            prompt,
            prompt_2,
            height,
            width,
            callback_steps,
            negative_prompt,
            negative_prompt_2,
            prompt_embeds,
            negative_prompt_embeds,
            pooled_prompt_embeds,
            negative_pooled_prompt_embeds,
            ip_adapter_image,
            ip_adapter_image_embeds,
            callback_on_step_end_tensor_inputs,
            layout=layout,
            num_images_per_prompt=num_images_per_prompt,
            cross_attention_strength=cross_attention_strength,
            self_attention_strength=self_attention_strength,
            modulation_fraction=modulation_fraction,
            timestep_power=timestep_power,
            size_weight=size_weight,
            realign=realign,
            modulated_downsampling=modulated_downsampling,
        )
        if realign:
            # every argument of one generation pass, checked and with the size filled in (the caller's names
            # are the pass's keywords); the passes call __call__ again with realign=False
            pass_args = {
                name: value for name, value in locals().items() if name not in ("self", "kwargs", "realign")
            }
            return self._realign_call(pass_args)

        self._guidance_scale = guidance_scale
        self._guidance_rescale = guidance_rescale
        self._clip_skip = clip_skip
        self._cross_attention_kwargs = cross_attention_kwargs
        self._denoising_end = denoising_end
        self._interrupt = False

        # 2. Define call parameters
        if prompt is not None and isinstance(prompt, str):
            batch_size = 1
        elif prompt is not None and isinstance(prompt, list):
            batch_size = len(prompt)
        else:
            batch_size = prompt_embeds.shape[0]
        num_images = batch_size * num_images_per_prompt
        device = self._execution_device

        # 2.1 Bind the layouts to the prompts: token indices (R of Eq. 8, the same for both encoders), appended
        # phrases
        resolved, image_prompts, original_prompts = self._bind_layouts(
            layout, prompt, batch_size, num_images_per_prompt, strict_layout
        )

        # 3. Encode input prompt
        lora_scale = self.cross_attention_kwargs.get("scale", None) if self.cross_attention_kwargs is not None else None
        encode_args = {"prompt": prompt, "prompt_2": prompt_2, "num_images_per_prompt": num_images_per_prompt}
        if image_prompts != original_prompts:
            # a phrase was appended to some prompt: encode one text per image, the same in both encoders
            if isinstance(negative_prompt, list):
                negative_prompt = [negative_prompt[i // num_images_per_prompt] for i in range(num_images)]
            if isinstance(negative_prompt_2, list):
                negative_prompt_2 = [negative_prompt_2[i // num_images_per_prompt] for i in range(num_images)]
            if negative_prompt_embeds is not None:
                negative_prompt_embeds = negative_prompt_embeds.repeat_interleave(num_images_per_prompt, dim=0)
                negative_pooled_prompt_embeds = negative_pooled_prompt_embeds.repeat_interleave(
                    num_images_per_prompt, dim=0
                )
            encode_args = {"prompt": image_prompts, "prompt_2": None, "num_images_per_prompt": 1}
        (
            prompt_embeds,
            negative_prompt_embeds,
            pooled_prompt_embeds,
            negative_pooled_prompt_embeds,
        ) = self.encode_prompt(
            **encode_args,
            device=device,
            do_classifier_free_guidance=self.do_classifier_free_guidance,
            negative_prompt=negative_prompt,
            negative_prompt_2=negative_prompt_2,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            lora_scale=lora_scale,
            clip_skip=self.clip_skip,
        )
        if replace_phrase_embeddings and resolved is not None:
            prompt_embeds = self._replace_phrase_embeddings(prompt_embeds, resolved, device, self.clip_skip)

        # 4. Prepare timesteps
        timestep_device = "cpu" if XLA_AVAILABLE else device
        timesteps, num_inference_steps = retrieve_timesteps(
            self.scheduler, num_inference_steps, timestep_device, timesteps, sigmas
        )

        # 5. Prepare latent variables
        num_channels_latents = self.unet.config.in_channels
        latents = self.prepare_latents(
            num_images, num_channels_latents, height, width, prompt_embeds.dtype, device, generator, latents
        )

        # 6. Prepare extra step kwargs
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)

        # 7. Prepare added time ids & embeddings (SDXL's added conditioning: Eq. 8 leaves it alone)
        add_text_embeds = pooled_prompt_embeds
        if self.text_encoder_2 is None:
            text_encoder_projection_dim = int(pooled_prompt_embeds.shape[-1])
        else:
            text_encoder_projection_dim = self.text_encoder_2.config.projection_dim

        add_time_ids = self._get_add_time_ids(
            original_size,
            crops_coords_top_left,
            target_size,
            dtype=prompt_embeds.dtype,
            text_encoder_projection_dim=text_encoder_projection_dim,
        )
        if negative_original_size is not None and negative_target_size is not None:
            negative_add_time_ids = self._get_add_time_ids(
                negative_original_size,
                negative_crops_coords_top_left,
                negative_target_size,
                dtype=prompt_embeds.dtype,
                text_encoder_projection_dim=text_encoder_projection_dim,
            )
        else:
            negative_add_time_ids = add_time_ids

        if self.do_classifier_free_guidance:
            prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds], dim=0)
            add_text_embeds = torch.cat([negative_pooled_prompt_embeds, add_text_embeds], dim=0)
            add_time_ids = torch.cat([negative_add_time_ids, add_time_ids], dim=0)

        prompt_embeds = prompt_embeds.to(device)
        add_text_embeds = add_text_embeds.to(device)
        add_time_ids = add_time_ids.to(device).repeat(num_images, 1)

        image_embeds = None
        if ip_adapter_image is not None or ip_adapter_image_embeds is not None:
            image_embeds = self.prepare_ip_adapter_image_embeds(
                ip_adapter_image, ip_adapter_image_embeds, device, num_images, self.do_classifier_free_guidance
            )

        # 8. Denoising loop
        num_warmup_steps = max(len(timesteps) - num_inference_steps * self.scheduler.order, 0)

        # 8.1 Apply denoising_end
        stops_early = False
        if (
            self.denoising_end is not None
            and isinstance(self.denoising_end, float)
            and self.denoising_end > 0
            and self.denoising_end < 1
        ):
            discrete_timestep_cutoff = round(
                self.scheduler.config.num_train_timesteps
                - (self.denoising_end * self.scheduler.config.num_train_timesteps)
            )
            num_inference_steps = len(list(filter(lambda ts: ts >= discrete_timestep_cutoff, timesteps)))
            timesteps = timesteps[:num_inference_steps]
            stops_early = True

        # 9. Optionally get Guidance Scale Embedding
        timestep_cond = None
        if self.unet.config.time_cond_proj_dim is not None:
            guidance_scale_tensor = torch.tensor(self.guidance_scale - 1).repeat(num_images)
            timestep_cond = self.get_guidance_scale_embedding(
                guidance_scale_tensor, embedding_dim=self.unet.config.time_cond_proj_dim
            ).to(device=device, dtype=latents.dtype)

        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(0)

        # 9.5 The processors' state, only when something needs them
        attention_state = self._attention_state(
            latents,
            num_images,
            prompt_embeds.shape[1],
            resolved,
            return_attention_maps,
            cross_attention_strength=cross_attention_strength,
            self_attention_strength=self_attention_strength,
            modulation_fraction=modulation_fraction,
            timestep_power=timestep_power,
            size_weight=size_weight,
            suppress_unclaimed_tokens=suppress_unclaimed_tokens,
            modulated_downsampling=modulated_downsampling,
        )

        def added_cond_kwargs(tensors: dict[str, torch.Tensor]) -> dict:
            kwargs = {"text_embeds": tensors["add_text_embeds"], "time_ids": tensors["add_time_ids"]}
            if image_embeds is not None:
                kwargs["image_embeds"] = image_embeds
            return kwargs

        latents, x0 = self._denoise(
            latents=latents,
            timesteps=timesteps,
            num_inference_steps=num_inference_steps,
            num_warmup_steps=num_warmup_steps,
            prompt_embeds=prompt_embeds,
            callback_tensors={"add_text_embeds": add_text_embeds, "add_time_ids": add_time_ids},
            added_cond_kwargs=added_cond_kwargs,
            timestep_cond=timestep_cond,
            extra_step_kwargs=extra_step_kwargs,
            attention_state=attention_state,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            callback=callback,
            callback_steps=callback_steps,
            # a coarse pass that stops early has no finished image: the captioner reads the x0 prediction
            predict_original_sample=stops_early and self._realign_stage == "coarse",
        )

        if output_type != "latent":
            image = self._decode_latents(latents)
            if self.watermark is not None:
                image = self.watermark.apply_watermark(image)
            image = self.image_processor.postprocess(image, output_type=output_type)
        else:
            image = latents

        if x0 is not None:
            self._realign_preview = self.image_processor.postprocess(self._decode_latents(x0), output_type="pt")

        attention_maps = None
        if return_attention_maps:
            attention_maps = self._word_attention_maps(attention_state.token_attention_maps(), image_prompts)

        # Offload all models
        self.maybe_free_model_hooks()

        return self._pass_output(image, None, attention_maps, resolved, return_dict, return_attention_maps)
