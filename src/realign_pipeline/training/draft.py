"""DRaFT: the reward's gradient through the last K denoising steps, free of accelerate and argparse.

Clark, Vicol, Swersky and Fleet, "Directly Fine-Tuning Diffusion Models on Differentiable Rewards"
(ICLR 2024). ReFL (:mod:`realign_pipeline.training.refl`) takes the gradient at ONE random late step and scores
the x0 *predicted* from that single UNet output. DRaFT runs the sampler to its end and scores the image the
chain actually produces, back-propagating through the sampler itself:

- **DRaFT-K** (:func:`draft_latents` with ``backprop_steps=K``): steps ``0 .. T-K-1`` without gradient, the
  last K with gradient. The reward's gradient reaches every one of the K UNet calls, both directly and through
  the latents that carry one step into the next; the latents entering step ``T-K`` are detached (truncated
  backpropagation through the sampler).
- **full chain** (``backprop_steps=T``): DRaFT / AlignProp, backpropagation through the whole sampler.
- **DRaFT-LV** (``lv_samples=n`` with ``backprop_steps=1``): the whole chain without gradient to x0, then
  ``n`` re-noisings of x0 to the last timestep, each denoised by one step with gradient; the caller averages
  the ``n`` rewards (the paper's lower-variance K=1 estimator; it uses n = 2).

``checkpoint=True`` wraps each UNet call of the gradient steps in
``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``: the backward pass recomputes that call's
activations, so what is held for the backward grows by the call's inputs and output (a few latents) per step,
not by the UNet's activations per step. ``scheduler.scale_model_input`` and ``scheduler.step`` stay outside
the checkpoint, because schedulers with a step counter (Euler, DPM-Solver) must see each step once.

Any diffusers scheduler with a deterministic ``step`` should work (tested: DDIM with eta 0, which the script
loads, and Euler); stochastic ones (DDPM, ancestral samplers, DDIM with eta > 0) are not supported.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint as _checkpoint

from realign_pipeline.training.refl import guided_model_output, repeat_added_conditioning

__all__ = ["DraftOutputs", "denoise_steps", "draft_latents"]


@dataclass
class DraftOutputs:
    x0: torch.Tensor  # the chain's final latents, with gradient; lv_samples * batch rows with DRaFT-LV
    backprop_steps: int  # K
    first_grad_step: int  # the index of the first step with gradient, T - K
    timestep: int  # timesteps[first_grad_step], what the UNet received at that step
    lv_samples: int  # n of DRaFT-LV, 0 when off


def denoise_steps(
    unet: Callable,
    scheduler: Any,
    latents: torch.Tensor,
    timesteps: Sequence[Any],
    encoder_hidden_states: torch.Tensor,
    guidance_scale: float | None = None,
    negative_hidden_states: torch.Tensor | None = None,
    checkpoint: bool = False,
    added_cond_kwargs: dict[str, torch.Tensor] | None = None,
    negative_added_cond_kwargs: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``scheduler.step`` over ``timesteps`` in order from ``latents``, in the caller's grad mode.

    Each step: ``scale_model_input``, one UNet call (:func:`~realign_pipeline.training.refl.guided_model_output`,
    with classifier-free guidance when ``guidance_scale > 1`` and ``negative_hidden_states`` are given), then
    ``scheduler.step(...).prev_sample``. With ``checkpoint`` and gradient enabled, the UNet call (and the
    guidance mix) runs under ``torch.utils.checkpoint.checkpoint(use_reentrant=False)``. The scheduler must
    already be set to the chain's number of steps. SDXL's added conditioning (``added_cond_kwargs``, with
    ``negative_added_cond_kwargs`` for guidance) goes to every UNet call.
    """
    for t in timesteps:
        inp = scheduler.scale_model_input(latents, t)
        args = (unet, inp, t, encoder_hidden_states, guidance_scale, negative_hidden_states)
        if added_cond_kwargs is not None:
            args += (added_cond_kwargs, negative_added_cond_kwargs)
        if checkpoint and torch.is_grad_enabled():
            out = _checkpoint(guided_model_output, *args, use_reentrant=False)
        else:
            out = guided_model_output(*args)
        latents = scheduler.step(out, t, latents).prev_sample
    return latents


def draft_latents(
    unet: Callable,
    scheduler: Any,
    latents: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    num_inference_steps: int,
    backprop_steps: int,
    guidance_scale: float | None = None,
    negative_hidden_states: torch.Tensor | None = None,
    checkpoint: bool = False,
    lv_samples: int = 0,
    generator: torch.Generator | None = None,
    added_cond_kwargs: dict[str, torch.Tensor] | None = None,
    negative_added_cond_kwargs: dict[str, torch.Tensor] | None = None,
) -> DraftOutputs:
    """The DRaFT pass in latent space: ``T - K`` steps without gradient, the last ``K`` with gradient.

    ``latents`` is the initial noise (scaled here by ``scheduler.init_noise_sigma``); ``scheduler`` is set to
    ``num_inference_steps`` (T) here. Classifier-free guidance, when on, is used at every step of the chain,
    those with gradient included (the reward judges the image guided sampling produces, as in DRaFT).
    Returns the final latents ``x0`` of the chain with gradient (decode them and score the image).

    ``lv_samples = n > 0`` (DRaFT-LV, needs ``backprop_steps == 1``): all T steps without gradient, then x0 is
    noised ``n`` times to ``timesteps[-1]`` with ``scheduler.add_noise`` (noise from ``generator``) and each is
    denoised by one step with gradient; ``x0`` then has ``n * batch`` rows, sample-major
    (``[sample 1 of every prompt, sample 2 of every prompt, ...]``), to be scored against the prompts repeated
    ``n`` times -- the mean over rows is the mean over the n samples.

    SDXL: ``added_cond_kwargs`` (``{"text_embeds": pooled, "time_ids": ...}``, one row per prompt) and, for
    guidance, ``negative_added_cond_kwargs`` go to every UNet call (repeated ``n`` times with DRaFT-LV's rows).
    ``None`` (SD 1.x/2.x): the UNet gets no ``added_cond_kwargs``.
    """
    scheduler.set_timesteps(num_inference_steps, device=latents.device)
    timesteps = scheduler.timesteps
    steps = len(timesteps)
    if not 1 <= backprop_steps <= steps:
        raise ValueError(
            f"backprop_steps {backprop_steps} outside 1..{steps} (the number of denoising steps)"
        )
    if lv_samples < 0 or (lv_samples and backprop_steps != 1):
        raise ValueError(f"lv_samples {lv_samples}: DRaFT-LV needs lv_samples >= 1 and backprop_steps 1")
    first = steps - backprop_steps
    guide = {"guidance_scale": guidance_scale, "negative_hidden_states": negative_hidden_states}
    if added_cond_kwargs is not None:
        guide.update(added_cond_kwargs=added_cond_kwargs, negative_added_cond_kwargs=negative_added_cond_kwargs)
    latents = latents * scheduler.init_noise_sigma
    with torch.no_grad():
        prefix = timesteps if lv_samples else timesteps[:first]
        latents = denoise_steps(unet, scheduler, latents, prefix, encoder_hidden_states, **guide)
    latents = latents.detach()
    if lv_samples:
        t = timesteps[-1]
        noise = torch.randn(
            (lv_samples * latents.shape[0], *latents.shape[1:]), generator=generator, dtype=torch.float32
        ).to(latents)
        scheduler.set_timesteps(num_inference_steps, device=latents.device)  # restart step counters
        noisy = scheduler.add_noise(latents.repeat(lv_samples, 1, 1, 1), noise, t.reshape(1))
        cond = encoder_hidden_states.repeat(lv_samples, 1, 1)
        neg = None if negative_hidden_states is None else negative_hidden_states.repeat(lv_samples, 1, 1)
        added = {}
        if added_cond_kwargs is not None:
            added = {
                "added_cond_kwargs": repeat_added_conditioning(added_cond_kwargs, lv_samples),
                "negative_added_cond_kwargs": repeat_added_conditioning(negative_added_cond_kwargs, lv_samples),
            }
        x0 = denoise_steps(unet, scheduler, noisy, [t], cond, guidance_scale, neg, checkpoint=checkpoint, **added)
    else:
        x0 = denoise_steps(
            unet, scheduler, latents, timesteps[first:], encoder_hidden_states, **guide, checkpoint=checkpoint
        )
    return DraftOutputs(
        x0=x0,
        backprop_steps=backprop_steps,
        first_grad_step=first,
        timestep=int(timesteps[first]),
        lv_samples=lv_samples,
    )
