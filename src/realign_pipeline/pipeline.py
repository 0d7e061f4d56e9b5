"""`RealignDiffPipeline`: Stable Diffusion with RealignDiff's layout-guided attention modulation (Eq. 8)."""

import math
import os
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import PipelineImageInput
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import (
    rescale_noise_cfg,
    retrieve_timesteps,
)
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import BaseOutput, deprecate, is_torch_xla_available, logging, replace_example_docstring
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPImageProcessor, CLIPTextModel, CLIPTokenizer, CLIPVisionModelWithProjection

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

CAPTIONER_FOLDER = "dense_captioner"

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


@dataclass
class RealignDiffPipelineOutput(BaseOutput):
    """Output of :class:`RealignDiffPipeline`.

    Args:
        images: generated images, as in ``StableDiffusionPipelineOutput``.
        nsfw_content_detected: safety checker flags, or None without a safety checker.
        attention_maps: with ``return_attention_maps=True``, one dict per image from each prompt word (repeats
            as ``word#2``, ...) to its cross-attention map of shape (latent_height, latent_width), averaged over
            heads, layers and steps (the paper's Figure 7). With ``prompt_embeds`` and no prompt text the keys
            are ``token_<i>``.
        layouts: the layouts as bound to each image's prompt (token indices, appended phrases), or None. With
            ``realign=True`` these are the dense captioner's layouts (masks, scores, phrases, provenance in
            ``.source``): the paper's Figure 6 material. An image whose captioner kept no object has its empty
            layout here too, so its ``.source`` says why (tags, the LLM's answer, what grounding missed).
        coarse_images: with ``realign=True``, the first (coarse) images as PIL images.
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


def _captioner_folder(name_or_path: str | os.PathLike, kwargs: dict) -> str | None:
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


class RealignDiffPipeline(StableDiffusionPipeline):
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

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs) -> None:
        """``StableDiffusionPipeline.save_pretrained``, plus the dense captioner's settings in ``dense_captioner/``."""
        super().save_pretrained(save_directory, *args, **kwargs)
        if self.dense_captioner is not None:
            self.dense_captioner.save_pretrained(os.path.join(save_directory, CAPTIONER_FOLDER))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs):
        """``DiffusionPipeline.from_pretrained``; also restores a saved dense captioner unless one is passed."""
        if "dense_captioner" not in kwargs:
            captioner_dir = _captioner_folder(pretrained_model_name_or_path, kwargs)
            if captioner_dir is not None:
                kwargs["dense_captioner"] = DenseCaptioner.from_pretrained(captioner_dir)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @classmethod
    def from_pipe(cls, pipeline, **kwargs):
        """``DiffusionPipeline.from_pipe``; keeps the source pipeline's dense captioner unless one is passed."""
        kwargs.setdefault("dense_captioner", getattr(pipeline, "dense_captioner", None))
        return super().from_pipe(pipeline, **kwargs)

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
            # the UNet's attention grids: the latents' own, then halved once per down block after the first
            grids = [2**level for level in range(len(self.unet.config.block_out_channels))]
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
                    "to RealignDiffPipeline.from_pretrained(...) or set pipe.dense_captioner."
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

    def _layout_prompts(
        self, prompt: str | list[str] | None, batch_size: int, num_images_per_prompt: int
    ) -> list[str | None]:
        if prompt is None:
            return [None] * (batch_size * num_images_per_prompt)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        return [prompts[i // num_images_per_prompt] for i in range(batch_size * num_images_per_prompt)]

    def _replace_phrase_embeddings(
        self, prompt_embeds: torch.Tensor, layouts: list[ResolvedLayout | None], device, clip_skip
    ) -> torch.Tensor:
        """DenseDiffusion's option: each phrase's tokens take the embeddings of the phrase encoded alone."""
        prompt_embeds = prompt_embeds.clone()
        for image, layout in enumerate(layouts):
            for region, indices in zip(layout.regions if layout else [], layout.token_indices if layout else []):
                alone = self.tokenizer(region.phrase, add_special_tokens=False)["input_ids"]
                if len(alone) != len(indices):
                    logger.warning(
                        f"phrase {region.phrase!r} has {len(alone)} tokens alone but {len(indices)} token indices; "
                        "its embeddings are not replaced."
                    )
                    continue
                phrase_embeds, _ = self.encode_prompt(region.phrase, device, 1, False, clip_skip=clip_skip)
                prompt_embeds[image, indices] = phrase_embeds[0, 1 : 1 + len(indices)].to(prompt_embeds.dtype)
        return prompt_embeds

    def _word_attention_maps(
        self, token_maps: torch.Tensor, prompts: list[str | None]
    ) -> list[dict[str, torch.Tensor]]:
        maps = []
        max_length = self.tokenizer.model_max_length
        for image, text in enumerate(prompts):
            per_token = token_maps[image].cpu()
            if text is None:
                maps.append({f"token_{i}": per_token[i] for i in range(1, per_token.shape[0] - 1)})
                continue
            spans = word_token_spans(self.tokenizer, text, max_length)
            keys = unique_word_keys(spans)
            maps.append({key: per_token[list(span.token_indices)].mean(0) for key, span in zip(keys, spans)})
        return maps

    def _denoise(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        num_inference_steps: int,
        prompt_embeds: torch.Tensor,
        negative_prompt_embeds: torch.Tensor | None,
        timestep_cond: torch.Tensor | None,
        added_cond_kwargs: dict | None,
        extra_step_kwargs: dict,
        attention_state: RealignAttentionState | None,
        callback_on_step_end: Callable[[int, int], None] | PipelineCallback | MultiPipelineCallbacks | None,
        callback_on_step_end_tensor_inputs: list[str],
        callback: Callable[[int, int, torch.Tensor], None] | None = None,
        callback_steps: int | None = None,
    ) -> torch.Tensor:
        """The denoising loop (step 7), telling the attention processors the step explicitly.

        Adapted from diffusers.StableDiffusionPipeline.__call__
        """
        num_warmup_steps = len(timesteps) - num_inference_steps * self.scheduler.order
        num_train_timesteps = self.scheduler.config.num_train_timesteps
        self._num_timesteps = len(timesteps)
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

                latent_model_input = torch.cat([latents] * 2) if self.do_classifier_free_guidance else latents
                if hasattr(self.scheduler, "scale_model_input"):
                    latent_model_input = self.scheduler.scale_model_input(latent_model_input, t)

                noise_pred = self.unet(
                    latent_model_input,
                    t,
                    encoder_hidden_states=prompt_embeds,
                    timestep_cond=timestep_cond,
                    cross_attention_kwargs=self.cross_attention_kwargs,
                    added_cond_kwargs=added_cond_kwargs,
                    return_dict=False,
                )[0]

                if self.do_classifier_free_guidance:
                    noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
                    noise_pred = noise_pred_uncond + self.guidance_scale * (noise_pred_text - noise_pred_uncond)
                if self.do_classifier_free_guidance and self.guidance_rescale > 0.0:
                    noise_pred = rescale_noise_cfg(noise_pred, noise_pred_text, guidance_rescale=self.guidance_rescale)

                latents = self.scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[0]

                if callback_on_step_end is not None:
                    callback_kwargs = {}
                    local_tensors = {
                        "latents": latents,
                        "prompt_embeds": prompt_embeds,
                        "negative_prompt_embeds": negative_prompt_embeds,
                    }
                    for k in callback_on_step_end_tensor_inputs:
                        callback_kwargs[k] = local_tensors[k]
                    callback_outputs = callback_on_step_end(self, i, t, callback_kwargs)
                    latents = callback_outputs.pop("latents", latents)
                    prompt_embeds = callback_outputs.pop("prompt_embeds", prompt_embeds)
                    negative_prompt_embeds = callback_outputs.pop("negative_prompt_embeds", negative_prompt_embeds)

                if i == len(timesteps) - 1 or ((i + 1) > num_warmup_steps and (i + 1) % self.scheduler.order == 0):
                    progress_bar.update()
                    if callback is not None and i % callback_steps == 0:
                        callback(i // getattr(self.scheduler, "order", 1), t, latents)

                if XLA_AVAILABLE:
                    xm.mark_step()
        return latents

    def _default_size(self, height: int | None, width: int | None) -> tuple[int, int]:
        if height and width:
            return height, width
        sample_size = self.unet.config.sample_size
        h = sample_size if self._is_unet_config_sample_size_int else sample_size[0]
        w = sample_size if self._is_unet_config_sample_size_int else sample_size[1]
        return h * self.vae_scale_factor, w * self.vae_scale_factor

    @property
    def realign_stage(self) -> str | None:
        """Which pass of a ``realign=True`` call is running: ``"coarse"``, ``"fine"``, or None outside one.

        Callbacks (``callback_on_step_end``) fire in both passes with step indices from 0 in each; they read
        this to tell the passes apart.
        """
        return self._realign_stage

    def _initial_noise(
        self, num_images: int, height: int, width: int, generator: torch.Generator | list[torch.Generator] | None
    ) -> torch.Tensor:
        """The unscaled initial noise ``prepare_latents`` would draw: both passes scale it by
        ``scheduler.init_noise_sigma`` themselves, so it must not be scaled here."""
        dtype = self.text_encoder.dtype if self.text_encoder is not None else self.unet.dtype
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
        return randn_tensor(shape, generator=generator, device=self._execution_device, dtype=dtype)

    def _realign_call(self, pass_args: dict[str, Any]) -> RealignDiffPipelineOutput | tuple:
        """Coarse pass, dense captions, fine pass from the same noise (Sec. 3.2.2).

        `pass_args` are the keyword arguments of one pass: every argument of `__call__` but `realign`, checked,
        with `height` and `width` filled in. "The same noise" is the same initial latents and, for stochastic
        samplers, the same noise at every step: the fine pass replays the random state the coarse pass started
        from.
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
            coarse = self(**{**stage, "layout": None, "output_type": "pt"})
            self._realign_stage = None
            coarse_pil = self.image_processor.numpy_to_pil(self.image_processor.pt_to_numpy(coarse.images))

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
            return (images, nsfw) + ((attention_maps,) if pass_args["return_attention_maps"] else ())
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
        return resolve_layout(layout, prompt, self.tokenizer)

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
            # every argument of one generation pass; the passes call __call__ again with realign=False
            pass_args = {
                "prompt": prompt,
                "height": height,
                "width": width,
                "num_inference_steps": num_inference_steps,
                "timesteps": timesteps,
                "sigmas": sigmas,
                "guidance_scale": guidance_scale,
                "negative_prompt": negative_prompt,
                "num_images_per_prompt": num_images_per_prompt,
                "eta": eta,
                "generator": generator,
                "latents": latents,
                "prompt_embeds": prompt_embeds,
                "negative_prompt_embeds": negative_prompt_embeds,
                "ip_adapter_image": ip_adapter_image,
                "ip_adapter_image_embeds": ip_adapter_image_embeds,
                "output_type": output_type,
                "return_dict": return_dict,
                "cross_attention_kwargs": cross_attention_kwargs,
                "guidance_rescale": guidance_rescale,
                "clip_skip": clip_skip,
                "callback_on_step_end": callback_on_step_end,
                "callback_on_step_end_tensor_inputs": callback_on_step_end_tensor_inputs,
                "layout": layout,
                "cross_attention_strength": cross_attention_strength,
                "self_attention_strength": self_attention_strength,
                "modulation_fraction": modulation_fraction,
                "timestep_power": timestep_power,
                "size_weight": size_weight,
                "suppress_unclaimed_tokens": suppress_unclaimed_tokens,
                "modulated_downsampling": modulated_downsampling,
                "replace_phrase_embeddings": replace_phrase_embeddings,
                "strict_layout": strict_layout,
                "return_attention_maps": return_attention_maps,
                "callback": callback,
                "callback_steps": callback_steps,
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
        original_prompts = self._layout_prompts(prompt, batch_size, num_images_per_prompt)
        image_prompts = list(original_prompts)
        layouts = expand_layouts(layout, batch_size, num_images_per_prompt)
        resolved: list[ResolvedLayout | None] | None = None
        if layouts is not None:
            resolved = []
            for index, (image_layout, text) in enumerate(zip(layouts, image_prompts)):
                if image_layout is None:
                    resolved.append(None)
                    continue
                try:
                    resolved.append(resolve_layout(image_layout, text, self.tokenizer, strict=strict_layout))
                except LayoutError as error:
                    raise LayoutError(f"layout of image {index}: {error}") from None
            image_prompts = [r.prompt if r is not None else p for r, p in zip(resolved, image_prompts)]

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
        attention_state = None
        if return_attention_maps or layouts_modulate(resolved):
            attention_state = RealignAttentionState(
                latent_height=latents.shape[-2],
                latent_width=latents.shape[-1],
                num_images=num_images,
                do_classifier_free_guidance=self.do_classifier_free_guidance,
                sequence_length=prompt_embeds.shape[1],
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

        # 7. Denoising loop
        latents = self._denoise(
            latents=latents,
            timesteps=timesteps,
            num_inference_steps=num_inference_steps,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            timestep_cond=timestep_cond,
            added_cond_kwargs=added_cond_kwargs,
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

        if not return_dict:
            return (image, has_nsfw_concept) + ((attention_maps,) if return_attention_maps else ())
        return RealignDiffPipelineOutput(
            images=image, nsfw_content_detected=has_nsfw_concept, attention_maps=attention_maps, layouts=resolved
        )

