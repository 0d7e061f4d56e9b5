"""`RealignDiffPipeline`: Stable Diffusion with RealignDiff's layout-guided attention modulation (Eq. 8)."""

from collections.abc import Callable, Sequence
from typing import Any

import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import PipelineImageInput
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import deprecate, is_torch_xla_available, replace_example_docstring
from transformers import CLIPImageProcessor, CLIPTextModel, CLIPTokenizer, CLIPVisionModelWithProjection

from .captioner.dense import DenseCaptioner
from .layout import Layout, Region, ResolvedLayout
from .realign_mixin import RealignDiffPipelineOutput, RealignMixin

if is_torch_xla_available():
    import torch_xla.core.xla_model as xm

    XLA_AVAILABLE = True
else:
    XLA_AVAILABLE = False

__all__ = ["RealignDiffPipeline", "RealignDiffPipelineOutput"]

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from realign_pipeline import Layout, RealignDiffPipeline, Region
        >>> from realign_pipeline.captioner import ClipTagger, DenseCaptioner, GroundingDinoSamGrounder, RuleBasedLLM

        >>> pipe = RealignDiffPipeline.from_pretrained(
        ...     "stable-diffusion-v1-5/stable-diffusion-v1-5", dtype=torch.float16
        ... ).to("cuda")
        >>> prompt = "a red book and a yellow vase"

        >>> # a layout by hand: each phrase of the prompt with a box [x0, y0, x1, y1] in fractions of the image
        >>> layout = Layout([
        ...     Region("red book", box=[0.05, 0.35, 0.45, 0.95]),
        ...     Region("yellow vase", box=[0.55, 0.15, 0.95, 0.95]),
        ... ])
        >>> image = pipe(prompt, layout=layout, generator=torch.Generator("cuda").manual_seed(42)).images[0]

        >>> # the fine stage: generate, caption densely, generate again from the same noise with that layout
        >>> pipe.dense_captioner = DenseCaptioner(
        ...     ClipTagger("openai/clip-vit-large-patch14"),
        ...     RuleBasedLLM(),
        ...     GroundingDinoSamGrounder("IDEA-Research/grounding-dino-tiny", "facebook/sam-vit-base"),
        ... )
        >>> output = pipe(prompt, realign=True, generator=torch.Generator("cuda").manual_seed(42))
        >>> coarse_image, image, layout = output.coarse_images[0], output.images[0], output.layouts[0]
        ```
"""



class RealignDiffPipeline(RealignMixin, StableDiffusionPipeline):
    r"""Stable Diffusion with RealignDiff's re-weighting attention modulation (Eq. 8 of Fang et al., 2023).

    Load it like any Stable Diffusion pipeline (``RealignDiffPipeline.from_pretrained(...)`` or
    ``RealignDiffPipeline.from_pipe(sd_pipeline)``). Called without a `layout` and without
    `return_attention_maps` it is exactly :class:`~diffusers.StableDiffusionPipeline`. With a
    :class:`~realign_pipeline.Layout` it installs :class:`~realign_pipeline.attention.RealignAttnProcessor` on the
    UNet's cross-attention layers for the call, pulls each phrase's attention into its region during the first
    steps, and restores the original processors afterwards.

    With a `dense_captioner` (:class:`~realign_pipeline.captioner.DenseCaptioner`), ``pipe(prompt, realign=True)``
    runs the paper's fine stage: generate, caption densely, generate again from the same noise with the layout.
    diffusers cannot save a component from outside diffusers/transformers, so this pipeline saves the
    captioner's settings (never weights, never API keys) in a ``dense_captioner/`` folder itself and
    restores them in :meth:`from_pretrained`.

    What RealignDiff adds lives in :class:`~realign_pipeline.realign_mixin.RealignMixin`, shared with
    :class:`~realign_pipeline.RealignDiffXLPipeline`; this class keeps the parent's ``__call__`` steps.
    """

    # the same annotations as the parent: diffusers reads them (from_pipe checks component types)
    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
        safety_checker: StableDiffusionSafetyChecker,
        feature_extractor: CLIPImageProcessor,
        image_encoder: CLIPVisionModelWithProjection = None,
        requires_safety_checker: bool = True,
        dense_captioner: DenseCaptioner | None = None,
    ):
        super().__init__(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=safety_checker,
            feature_extractor=feature_extractor,
            image_encoder=image_encoder,
            requires_safety_checker=requires_safety_checker,
        )
        self.dense_captioner = dense_captioner
        self._realign_stage: str | None = None

    def check_inputs(
        self,
        prompt: str | list[str] | None,
        height: int,
        width: int,
        callback_steps: int | None,
        negative_prompt: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
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
        """``StableDiffusionPipeline.check_inputs``, then the layout, modulation and ``realign`` arguments."""
        super().check_inputs(
            prompt,
            height,
            width,
            callback_steps,
            negative_prompt,
            prompt_embeds,
            negative_prompt_embeds,
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

    def _encode_phrase_alone(self, phrase: str, device: torch.device, clip_skip: int | None) -> torch.Tensor:
        return self.encode_prompt(phrase, device, 1, False, clip_skip=clip_skip)[0]

    def _default_size(self, height: int | None, width: int | None) -> tuple[int, int]:
        if height and width:
            return height, width
        sample_size = self.unet.config.sample_size
        h = sample_size if self._is_unet_config_sample_size_int else sample_size[0]
        w = sample_size if self._is_unet_config_sample_size_int else sample_size[1]
        return h * self.vae_scale_factor, w * self.vae_scale_factor

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float = 7.5,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int | None = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        ip_adapter_image: PipelineImageInput | None = None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        output_type: str | None = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        guidance_rescale: float = 0.0,
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

        Takes every argument of :meth:`diffusers.StableDiffusionPipeline.__call__`, plus:

        Args:
            layout (`Layout`, `ResolvedLayout`, `dict`, `list[Region]`, or a list of these, *optional*):
                One layout for every image, a list with one per prompt, or a list with one per image (with
                ``num_images_per_prompt > 1``). ``None`` entries generate without modulation. A layout may also
                be its JSON object (``Layout.to_dict()``), a list of `Region`s, or an output's ``layouts[i]``.
            cross_attention_strength (`float`, defaults to 1.0):
                Weight of the cross-attention modulation (DenseDiffusion's published ``w_c``).
            self_attention_strength (`float`, defaults to 0.0):
                Weight of DenseDiffusion's self-attention modulation (its default is 0.3); off by default because
                Eq. 8 only speaks of text keys.
            modulation_fraction (`float`, defaults to 0.3):
                Modulate during this first fraction of the denoising steps (DenseDiffusion: 30%).
            timestep_power (`float`, defaults to 5.0):
                ``l_t = (t / T) ** timestep_power`` (DenseDiffusion: ``(t / 1000) ** 5``).
            size_weight (`float`, defaults to 1.0):
                Weight of the area in the size term ``1 - size_weight * area`` (the paper's ``(1 - B)``).
            suppress_unclaimed_tokens (`bool`, defaults to False):
                Inside each region, also push down the tokens no region claims (start, end, padding, "a",
                "and"), as DenseDiffusion does; Eq. 8 as written leaves them alone. Regions of score 0 still
                change nothing.
            modulated_downsampling (`list[int]`, *optional*):
                Modulate only the attention grids downsampled this many times from the latents: 1 is the
                latents' own grid (64x64 for SD at 512 px), 2 half of it, 4 a quarter... Default: every grid, as
                DenseDiffusion does. With small objects the coarse grids put several regions in one cell, and
                pulling there recolours or erases objects the layout should keep (docs/shapes.md).
            replace_phrase_embeddings (`bool`, defaults to False):
                DenseDiffusion's trick: each phrase's tokens take the embeddings of the phrase encoded alone.
            strict_layout (`bool`, defaults to False):
                Raise when a phrase is not in the prompt, instead of appending it to the prompt.
            return_attention_maps (`bool`, defaults to False):
                Return, per image, each prompt word's cross-attention map (see `RealignDiffPipelineOutput`).
            realign (`bool`, defaults to False):
                The paper's fine stage: generate (coarse), caption each image with `dense_captioner`, generate
                again from the same noise with the captioned layouts: the same initial latents and, with a
                stochastic sampler, the same noise at every step, so a layout that modulates nothing gives back
                the coarse image. An image given its own layout keeps it and is not captioned. Needs a text
                prompt and a `dense_captioner`. `callback_on_step_end` fires in both passes, with step indices
                from 0 in each; inside it, ``pipe.realign_stage`` reads ``"coarse"`` or ``"fine"``.

        Examples:

        Returns:
            [`RealignDiffPipelineOutput`] or `tuple`:
                If `return_dict` is `True`, a [`RealignDiffPipelineOutput`]: the images, the safety checker's
                flags (None without one), the attention maps with ``return_attention_maps=True``, and `layouts`,
                each image's layout as bound to its prompt (None without one). With ``realign=True``,
                `images` are the fine pass's images, except that an image whose layout is empty (`realigned`
                False) is its coarse image, and the flags are those of the image returned; `attention_maps` are
                the fine pass's (the coarse pass's when no image was realigned, so no fine pass ran); `layouts`
                holds one layout per image, the dense captioner's or the one passed (an empty one where nothing
                was kept, its ``.source`` saying why); and `coarse_images` (PIL), `coarse_attention_maps` (with
                ``return_attention_maps=True``) and `realigned` are set (None without ``realign``). Otherwise a
                `tuple` ``(images, nsfw_content_detected)``, followed by the attention maps when
                ``return_attention_maps=True``, with or without ``realign``.
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
                "Passing `callback` as an input argument to `__call__` is deprecated, consider using "
                "`callback_on_step_end`",
            )
        if callback_steps is not None and self._realign_stage is None:
            deprecate(
                "callback_steps",
                "1.0.0",
                "Passing `callback_steps` as an input argument to `__call__` is deprecated, consider using "
                "`callback_on_step_end`",
            )
        if callback_on_step_end_tensor_inputs is None:
            callback_on_step_end_tensor_inputs = ["latents"]
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs

        # 0. Default height and width to unet
        height, width = self._default_size(height, width)

        # 1. Check inputs. Raise error if not correct
        self.check_inputs(
            prompt,
            height,
            width,
            callback_steps,
            negative_prompt,
            prompt_embeds,
            negative_prompt_embeds,
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

        # 2.1 Bind the layouts to the prompts: token indices (R of Eq. 8), appended phrases
        resolved, image_prompts, original_prompts = self._bind_layouts(
            layout, prompt, batch_size, num_images_per_prompt, strict_layout
        )

        # 3. Encode input prompt
        lora_scale = self.cross_attention_kwargs.get("scale", None) if self.cross_attention_kwargs is not None else None
        if image_prompts != original_prompts:
            # a phrase was appended to some prompt: encode one text per image
            if isinstance(negative_prompt, list):
                negative_prompt = [negative_prompt[i // num_images_per_prompt] for i in range(num_images)]
            if negative_prompt_embeds is not None:
                negative_prompt_embeds = negative_prompt_embeds.repeat_interleave(num_images_per_prompt, dim=0)
            encode_args = (image_prompts, device, 1)
        else:
            encode_args = (prompt, device, num_images_per_prompt)
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            *encode_args,
            self.do_classifier_free_guidance,
            negative_prompt,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            lora_scale=lora_scale,
            clip_skip=self.clip_skip,
        )
        if replace_phrase_embeddings and resolved is not None:
            prompt_embeds = self._replace_phrase_embeddings(prompt_embeds, resolved, device, self.clip_skip)
        if self.do_classifier_free_guidance:
            prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds])

        if ip_adapter_image is not None or ip_adapter_image_embeds is not None:
            image_embeds = self.prepare_ip_adapter_image_embeds(
                ip_adapter_image, ip_adapter_image_embeds, device, num_images, self.do_classifier_free_guidance
            )

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
        added_cond_kwargs = (
            {"image_embeds": image_embeds}
            if (ip_adapter_image is not None or ip_adapter_image_embeds is not None)
            else None
        )
        timestep_cond = None
        if self.unet.config.time_cond_proj_dim is not None:
            guidance_scale_tensor = torch.tensor(self.guidance_scale - 1).repeat(num_images)
            timestep_cond = self.get_guidance_scale_embedding(
                guidance_scale_tensor, embedding_dim=self.unet.config.time_cond_proj_dim
            ).to(device=device, dtype=latents.dtype)

        # 6.5 The processors' state, only when something needs them
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

        # 7. Denoising loop
        latents, _ = self._denoise(
            latents=latents,
            timesteps=timesteps,
            num_inference_steps=num_inference_steps,
            num_warmup_steps=len(timesteps) - num_inference_steps * self.scheduler.order,
            prompt_embeds=prompt_embeds,
            callback_tensors={"negative_prompt_embeds": negative_prompt_embeds},
            added_cond_kwargs=lambda tensors: added_cond_kwargs,
            timestep_cond=timestep_cond,
            extra_step_kwargs=extra_step_kwargs,
            attention_state=attention_state,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            callback=callback,
            callback_steps=callback_steps,
        )

        if output_type != "latent":
            image = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False, generator=generator)[0]
            image, has_nsfw_concept = self.run_safety_checker(image, device, prompt_embeds.dtype)
        else:
            image = latents
            has_nsfw_concept = None
        do_denormalize = [True] * image.shape[0] if has_nsfw_concept is None else [not n for n in has_nsfw_concept]
        if XLA_AVAILABLE:
            xm.mark_step()
        image = self.image_processor.postprocess(image, output_type=output_type, do_denormalize=do_denormalize)

        attention_maps = None
        if return_attention_maps:
            attention_maps = self._word_attention_maps(attention_state.token_attention_maps(), image_prompts)

        self.maybe_free_model_hooks()

        return self._pass_output(
            image, has_nsfw_concept, attention_maps, resolved, return_dict, return_attention_maps
        )

