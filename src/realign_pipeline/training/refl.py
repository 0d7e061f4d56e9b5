"""The step math of ReFL fine-tuning (RealignDiff Sec. 3.2.1, Eq. 5), free of accelerate and argparse.

``training/train_refl.py`` is the glue; everything a reviewer needs to check the method is here, in small
functions a test can call on tiny models:

- :func:`guided_model_output` -- one UNet call, with classifier-free guidance when it is on (and SDXL's added
  conditioning, the pooled embedding and time ids, when given: :func:`added_conditioning`);
- :func:`predict_x0` -- x0 straight from one UNet output (epsilon, v-prediction or sample);
- :func:`refl_latents` -- the no-grad rollout to the drawn step index, then ONE UNet call with gradient at
  the scheduler's timestep ``timesteps[i]``, as ImageReward's public ReFL.py does since its July 2023 "fix typo
  of ReFL" commit (its first release passed the index ``i``);
- :func:`hinge_reward_loss` -- ``lambda * relu(margin - objective).mean()`` (the ``lambda * phi(R)`` of Eq. 5);
- :func:`pretrain_loss` -- ``L_pre``, the ordinary denoising loss on real image-caption pairs;
- :func:`refl_step_loss` -- Eq. 5: ``loss_refl + pretrain_loss_weight * L_pre``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "ReflOutputs",
    "added_conditioning",
    "draw_grad_step",
    "guided_model_output",
    "hinge_reward_loss",
    "predict_x0",
    "pretrain_loss",
    "refl_latents",
    "refl_step_loss",
    "repeat_added_conditioning",
]


def predict_x0(
    scheduler: Any, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor
) -> torch.Tensor:
    """x0 predicted directly from one model output at ``timestep`` (a scheduler timestep value, not an index).

    ``epsilon``: ``(x_t - sqrt(1 - a_t) eps) / sqrt(a_t)``; ``v_prediction``: ``sqrt(a_t) x_t - sqrt(1 - a_t) v``;
    ``sample``: the output itself. ``a_t`` is ``scheduler.alphas_cumprod[timestep]``. Differentiable.
    """
    kind = scheduler.config.prediction_type
    if kind == "sample":
        return model_output
    t = int(timestep.item() if torch.is_tensor(timestep) else timestep)
    alpha = scheduler.alphas_cumprod.to(device=sample.device, dtype=torch.float32)[t]
    a, s = alpha.sqrt(), (1 - alpha).sqrt()
    x, out = sample.float(), model_output.float()
    if kind == "epsilon":
        x0 = (x - s * out) / a
    elif kind == "v_prediction":
        x0 = a * x - s * out
    else:
        raise ValueError(f"unsupported prediction_type {kind!r}")
    return x0.to(model_output.dtype)


def draw_grad_step(
    grad_step_range: tuple[int, int], num_inference_steps: int, generator: torch.Generator
) -> int:
    """The step index at which the gradient is taken, uniform on the half-open ``[lo, hi)``."""
    lo, hi = int(grad_step_range[0]), int(grad_step_range[1])
    if not 0 <= lo < hi <= num_inference_steps:
        raise ValueError(
            f"grad_step_range {lo} {hi} must satisfy 0 <= lo < hi <= num_inference_steps ({num_inference_steps})"
        )
    return int(torch.randint(lo, hi, (1,), generator=generator).item())


def added_conditioning(added_cond_kwargs: dict[str, torch.Tensor] | None) -> dict[str, Any]:
    """The UNet's keyword arguments for SDXL's added conditioning: ``{"added_cond_kwargs": ...}``, or ``{}``
    for ``None`` (Stable Diffusion 1.x/2.x, whose UNet is then called exactly as before)."""
    return {} if added_cond_kwargs is None else {"added_cond_kwargs": added_cond_kwargs}


def repeat_added_conditioning(
    added_cond_kwargs: dict[str, torch.Tensor] | None, times: int
) -> dict[str, torch.Tensor] | None:
    """Each tensor of SDXL's added conditioning repeated ``times`` along the batch, as ``tensor.repeat`` does
    (``[rows, rows, ...]``); ``None`` stays ``None``."""
    if added_cond_kwargs is None:
        return None
    return {key: value.repeat(times, *([1] * (value.dim() - 1))) for key, value in added_cond_kwargs.items()}


def guided_model_output(
    unet: Callable,
    model_input: torch.Tensor,
    timestep: Any,
    encoder_hidden_states: torch.Tensor,
    guidance_scale: float | None = None,
    negative_hidden_states: torch.Tensor | None = None,
    added_cond_kwargs: dict[str, torch.Tensor] | None = None,
    negative_added_cond_kwargs: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """One UNet call on an already scaled input, with classifier-free guidance when it is on.

    Guidance is on when ``guidance_scale > 1`` and ``negative_hidden_states`` is given: one call on the
    doubled batch ``[negative, cond]``, then ``uncond + guidance_scale * (cond - uncond)``. Otherwise the
    conditional call alone. Differentiable when called with gradient.

    SDXL: ``added_cond_kwargs`` (``{"text_embeds": pooled, "time_ids": ...}``, one row per image) goes to the
    UNet with the conditional rows; with guidance the doubled batch gets ``[negative_added_cond_kwargs,
    added_cond_kwargs]`` (the negative defaulting to the conditional one, e.g. for the time ids). Without them
    (``None``, SD 1.x/2.x) the UNet is called with no ``added_cond_kwargs`` at all.
    """
    if guidance_scale is not None and guidance_scale > 1 and negative_hidden_states is not None:
        added = None
        if added_cond_kwargs is not None:
            negative = {**added_cond_kwargs, **(negative_added_cond_kwargs or {})}
            added = {key: torch.cat([negative[key], value]) for key, value in added_cond_kwargs.items()}
        out = unet(
            torch.cat([model_input, model_input]),
            timestep,
            encoder_hidden_states=torch.cat([negative_hidden_states, encoder_hidden_states]),
            **added_conditioning(added),
        ).sample
        uncond, cond = out.chunk(2)
        return uncond + guidance_scale * (cond - uncond)
    return unet(
        model_input, timestep, encoder_hidden_states=encoder_hidden_states, **added_conditioning(added_cond_kwargs)
    ).sample


@dataclass
class ReflOutputs:
    x0: torch.Tensor  # predicted clean latents, with gradient
    grad_step: int  # the index i
    timestep: int  # timesteps[i], what the UNet received


def refl_latents(
    unet: Callable,
    scheduler: Any,
    latents: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    num_inference_steps: int,
    grad_step: int,
    guidance_scale: float | None = None,
    negative_hidden_states: torch.Tensor | None = None,
    added_cond_kwargs: dict[str, torch.Tensor] | None = None,
    negative_added_cond_kwargs: dict[str, torch.Tensor] | None = None,
) -> ReflOutputs:
    """The ReFL pass in latent space: ``grad_step`` no-grad denoising steps, then one UNet call with gradient.

    ``scheduler`` is set to ``num_inference_steps`` here (a deterministic one, e.g. DDIM, is expected).
    Classifier-free guidance (``guidance_scale > 1`` with ``negative_hidden_states``) is used in the no-grad
    rollout only; the gradient call is conditional only, as in ImageReward's ReFL. The UNet is called with
    ``scheduler.timesteps[grad_step]`` -- the timestep value -- and x0 comes from :func:`predict_x0`.
    SDXL's added conditioning (pooled embedding, time ids) goes to every UNet call, as in
    :func:`guided_model_output`.
    """
    scheduler.set_timesteps(num_inference_steps, device=latents.device)
    timesteps = scheduler.timesteps
    if not 0 <= grad_step < len(timesteps):
        raise ValueError(f"grad_step {grad_step} outside 0..{len(timesteps) - 1}")
    latents = latents * scheduler.init_noise_sigma
    with torch.no_grad():
        for i in range(grad_step):
            t = timesteps[i]
            inp = scheduler.scale_model_input(latents, t)
            out = guided_model_output(
                unet,
                inp,
                t,
                encoder_hidden_states,
                guidance_scale,
                negative_hidden_states,
                added_cond_kwargs,
                negative_added_cond_kwargs,
            )
            latents = scheduler.step(out, t, latents).prev_sample
    latents = latents.detach()
    t = timesteps[grad_step]
    inp = scheduler.scale_model_input(latents, t)
    out = unet(
        inp, t, encoder_hidden_states=encoder_hidden_states, **added_conditioning(added_cond_kwargs)
    ).sample
    x0 = predict_x0(scheduler, out, t, latents)
    return ReflOutputs(x0=x0, grad_step=grad_step, timestep=int(t))


def hinge_reward_loss(objective: torch.Tensor, margin: float, weight: float) -> torch.Tensor:
    """``weight * relu(margin - objective).mean()``: the ``lambda * phi(R)`` term of Eq. 5 (higher reward is better)."""
    return weight * F.relu(margin - objective.float()).mean()


def decode(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """VAE decode with gradient: latents -> pixels in about ``[-1, 1]`` (not clamped, so the gradient survives)."""
    return vae.decode(latents / vae.config.scaling_factor).sample


def pretrain_loss(
    unet: Callable,
    noise_scheduler: Any,
    latents: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    generator: torch.Generator | None = None,
    added_cond_kwargs: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``L_pre``: the standard denoising loss (MSE to the epsilon / v target) on clean latents of real images.

    ``added_cond_kwargs``: SDXL's pooled embeddings and time ids of the pairs (``None`` for SD 1.x/2.x)."""
    noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(latents)
    bsz = latents.shape[0]
    steps = noise_scheduler.config.num_train_timesteps
    timesteps = torch.randint(0, steps, (bsz,), generator=generator).to(latents.device).long()
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        target = noise
    elif kind == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"unsupported prediction_type {kind!r}")
    pred = unet(
        noisy, timesteps, encoder_hidden_states=encoder_hidden_states, **added_conditioning(added_cond_kwargs)
    ).sample
    return F.mse_loss(pred.float(), target.float(), reduction="mean")


def refl_step_loss(
    loss_refl: torch.Tensor, loss_pre: torch.Tensor | None, pretrain_loss_weight: float
) -> torch.Tensor:
    """Eq. 5: ``lambda * phi(R) + w * L_pre`` (``loss_refl`` already carries lambda; ``w`` is 1 in the paper)."""
    if loss_pre is None or pretrain_loss_weight == 0:
        return loss_refl
    return loss_refl + pretrain_loss_weight * loss_pre
