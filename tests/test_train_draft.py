"""DRaFT modes of training/train_refl.py (``--backprop_steps``): the math on a tiny UNet, and the script.

The math (``realign_pipeline.training.draft``) is checked against things written here, not taken from it: a
central finite difference per denoising step in float64, DDIM's last step written out by hand, ReFL's x0 at
the last step. The script runs on the tiny Stable Diffusion of ``realign_pipeline.testing`` (16x16, batch 1, T = 4).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from realign_pipeline.training.draft import draft_latents
from realign_pipeline.training.refl import refl_latents

ROOT = Path(__file__).resolve().parents[1]


def _load_script(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


train_refl = _load_script(ROOT / "training" / "train_refl.py")
pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture(scope="module")
def tiny():
    """The tiny SD's UNet (float64, parameters trainable) and DDIM scheduler, a prompt embedding, a negative."""
    from realign_pipeline.testing import tiny_components

    comps = tiny_components()
    unet = comps["unet"].double().requires_grad_(True)
    g = torch.Generator().manual_seed(0)
    cond = torch.randn(1, 77, 32, generator=g, dtype=torch.float64)
    negative = torch.randn(1, 77, 32, generator=g, dtype=torch.float64)
    return unet, comps["scheduler"], cond, negative


def _noise(seed: int = 1) -> torch.Tensor:
    return torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


class PerStepShift(torch.nn.Module):
    """The UNet with one parameter shifted by ``shift[t]`` at the call with timestep ``t`` (0 if absent).

    Autograd's gradient w.r.t. ``shift[t]`` is what the step at ``t`` contributes to the parameter's gradient;
    setting ``shift[t]`` to ``+-eps * v`` perturbs that step alone, for a finite difference.
    """

    def __init__(self, unet, name: str, timesteps):
        super().__init__()
        self.unet, self.name = unet, name
        param = dict(unet.named_parameters())[name]
        self.shift = {int(t): torch.zeros_like(param, requires_grad=True) for t in timesteps}

    def forward(self, x, t, encoder_hidden_states):
        param = dict(self.unet.named_parameters())[self.name]
        shift = self.shift.get(int(t), 0)
        return torch.func.functional_call(
            self.unet, {self.name: param + shift}, (x, t), {"encoder_hidden_states": encoder_hidden_states}
        )


# ------------------------------------------------------------------------------------------------- math
def test_gradient_reaches_each_of_the_k_steps_as_a_finite_difference_says(tiny):
    """K = 3 of T = 4, with guidance: each step's share of the directional derivative along a random direction
    of one UNet weight equals a central finite difference that perturbs that step alone; the shares are all
    non-zero, sum to the plain gradient, and the no-gradient step 0 gets none."""
    unet, scheduler, cond, negative = tiny
    scheduler.set_timesteps(4)
    ts = [int(t) for t in scheduler.timesteps]
    name = "down_blocks.0.attentions.0.proj_in.weight"
    model = PerStepShift(unet, name, ts)
    g = torch.Generator().manual_seed(2)
    direction = torch.randn(model.shift[ts[0]].shape, generator=g, dtype=torch.float64)
    weights = torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float64)

    def loss(m):
        out = draft_latents(
            m, scheduler, _noise(), cond, 4, 3, guidance_scale=2.0, negative_hidden_states=negative
        )
        return (out.x0 * weights).sum()

    loss(model).backward()
    assert model.shift[ts[0]].grad is None  # step 0 ran without gradient (truncation)
    shares = [float((model.shift[t].grad * direction).sum()) for t in ts[1:]]
    eps = 1e-5
    with torch.no_grad():
        for t, share in zip(ts[1:], shares):
            model.shift[t].copy_(eps * direction)
            up = float(loss(model))
            model.shift[t].copy_(-eps * direction)
            down = float(loss(model))
            model.shift[t].zero_()
            assert share == pytest.approx((up - down) / (2 * eps), rel=1e-6, abs=1e-9)
            assert abs(share) > 1e-6
    unet.zero_grad(set_to_none=True)
    loss(unet).backward()  # the plain UNet: its gradient is the sum of the three shares
    whole = float((dict(unet.named_parameters())[name].grad * direction).sum())
    assert whole == pytest.approx(sum(shares), rel=1e-9)
    unet.zero_grad(set_to_none=True)


def test_k1_is_ddims_last_step_written_out_and_refl_when_the_final_alpha_is_one(tiny):
    """DRaFT-1: T-1 steps without gradient, then the last DDIM step with gradient:
    x = sqrt(a_prev) * (x_t - sqrt(1 - a_t) eps) / sqrt(a_t) + sqrt(1 - a_prev) * eps, a_prev = the final alpha.
    With set_alpha_to_one (a_prev = 1) that is ReFL's x0 predicted at the last step index."""
    from diffusers import DDIMScheduler

    unet, scheduler, cond, _ = tiny
    assert scheduler.config.set_alpha_to_one is False  # SD's setting: a_prev = alphas_cumprod[0]
    params = [p for n, p in unet.named_parameters() if n.startswith("up_blocks.1")]

    out = draft_latents(unet, scheduler, _noise(), cond, 4, 1)
    got = torch.autograd.grad(out.x0.square().sum(), params)

    scheduler.set_timesteps(4)
    ts = scheduler.timesteps
    x = _noise()
    with torch.no_grad():
        for t in ts[:-1]:
            x = scheduler.step(unet(x, t, encoder_hidden_states=cond).sample, t, x).prev_sample
    t = ts[-1]
    a_t, a_prev = scheduler.alphas_cumprod[int(t)].double(), scheduler.alphas_cumprod[0].double()
    eps = unet(x, t, encoder_hidden_states=cond).sample
    expected = a_prev.sqrt() * (x - (1 - a_t).sqrt() * eps) / a_t.sqrt() + (1 - a_prev).sqrt() * eps
    # DDIM computes its coefficients from float32 alphas: agreement to float32 rounding
    torch.testing.assert_close(out.x0, expected, rtol=1e-6, atol=1e-7)
    assert (out.first_grad_step, out.timestep) == (3, int(t))
    for a, b in zip(got, torch.autograd.grad(expected.square().sum(), params)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)

    to_one = DDIMScheduler.from_config(scheduler.config, set_alpha_to_one=True)
    draft = draft_latents(unet, to_one, _noise(), cond, 4, 1).x0
    refl = refl_latents(unet, to_one, _noise(), cond, 4, grad_step=3).x0  # predict_x0 computes in float32
    torch.testing.assert_close(draft, refl, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scheduler_cls", ["DDIMScheduler", "EulerDiscreteScheduler"])
def test_checkpointing_each_step_gives_the_same_gradients(tiny, scheduler_cls):
    """The full chain (K = T = 3) with guidance, with and without per-step checkpointing; Euler keeps a step
    counter, so a recomputation that re-ran its scale_model_input would differ."""
    import diffusers

    unet, ddim, cond, negative = tiny
    scheduler = getattr(diffusers, scheduler_cls).from_config(ddim.config)
    params = [p for p in unet.parameters()]
    grads = []
    for ckpt in (False, True):
        out = draft_latents(
            unet,
            scheduler,
            _noise(3),
            cond,
            3,
            3,
            guidance_scale=3.0,
            negative_hidden_states=negative,
            checkpoint=ckpt,
        )
        grads.append(torch.autograd.grad(out.x0.square().mean(), params))
    assert any(float(g.abs().max()) > 0 for g in grads[0])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_draft_lv_renoises_the_final_sample(tiny):
    """DRaFT-LV with n = 2: rows are [sample 1, sample 2] of each prompt, both differ from the chain's own x0,
    the noise comes from the generator, and K != 1 is refused."""
    unet, scheduler, cond, _ = tiny
    with torch.no_grad():
        final = draft_latents(unet, scheduler, _noise(), cond, 4, 1).x0
    cond2 = cond.repeat(2, 1, 1)

    def lv(seed):
        noise = torch.cat([_noise(), _noise()])
        return draft_latents(
            unet, scheduler, noise, cond2, 4, 1, lv_samples=2, generator=torch.Generator().manual_seed(seed)
        )

    out = lv(7)
    assert out.x0.shape == (4, 4, 8, 8) and out.x0.requires_grad and out.lv_samples == 2
    assert not torch.allclose(out.x0[0], out.x0[2])  # two re-noisings of the same sample
    assert float((out.x0[0] - final[0]).abs().max()) > 0
    torch.testing.assert_close(out.x0, lv(7).x0)
    with pytest.raises(ValueError, match="DRaFT-LV"):
        draft_latents(unet, scheduler, _noise(), cond, 4, 2, lv_samples=2)
    with pytest.raises(ValueError, match="outside 1..4"):
        draft_latents(unet, scheduler, _noise(), cond, 4, 5)


# ----------------------------------------------------------------------------------------------- script
@pytest.fixture(scope="module")
def assets(tmp_path_factory, tiny_sd_dir):
    from realign_pipeline.testing import image_text_pairs

    root = tmp_path_factory.mktemp("draft")
    (root / "tiny-sd").symlink_to(tiny_sd_dir, target_is_directory=True)  # the session's folder, only read
    image_text_pairs(root / "pairs", 3, size=(32, 32))
    (root / "prompts.txt").write_text("a red cube\na blue ball on a table\ntwo cats\n")
    return root


def _args(assets, out, *extra):
    return train_refl.parse_args(
        [
            "--pretrained_model_name_or_path", str(assets / "tiny-sd"),
            "--output_dir", str(out),
            "--train_data_dir", str(assets / "pairs"),
            "--prompts_file", str(assets / "prompts.txt"),
            "--reward_class", "realign_pipeline.testing.training:BrightnessReward",
            "--resolution", "16", "--center_crop", "--train_batch_size", "1",
            "--num_inference_steps", "4",
            "--learning_rate", "1e-3", "--seed", "0", "--report_to", "none", "--checkpointing_steps", "1000",
            "--reward_margin", "1.0", "--reward_weight", "1.0",
            *extra,
        ]
    )  # fmt: skip


def test_flag_errors(assets, tmp_path, capsys):
    ok = _args(assets, tmp_path, "--backprop_steps", "4")
    assert ok.backprop_steps == 4 and ok.grad_step_range is None
    assert (
        _args(assets, tmp_path, "--backprop_steps", "0", "--grad_step_range", "2", "4").backprop_steps is None
    )
    assert _args(assets, tmp_path, "--grad_step_range", "2", "4").backprop_steps is None  # ReFL as before
    bad = {
        ("--backprop_steps", "5"): "more than --num_inference_steps",
        ("--backprop_steps", "2", "--grad_step_range", "2", "4"): "give one or the other",
        ("--backprop_steps", "-1"): "must be >= 1",
        ("--checkpoint_denoising_steps", "--grad_step_range", "2", "4"): "needs --backprop_steps",
        ("--backprop_steps", "2", "--draft_lv_samples", "2"): "--backprop_steps 1",
        ("--draft_lv_samples", "2", "--grad_step_range", "2", "4"): "needs --backprop_steps 1",
    }
    for flags, message in bad.items():
        with pytest.raises(SystemExit):
            _args(assets, tmp_path, *flags)
        assert message in capsys.readouterr().err, flags


def test_draft_k_resume_after_kill_matches_uninterrupted_run(assets, tmp_path):
    """LoRA, K = 2 of 4 with per-step checkpointing, a checkpoint every step. A run killed after step 3 leaves
    checkpoint-3, the uninterrupted state; resuming from its checkpoint-2 repeats step 3 with the same loss and
    ends with the same LoRA weights. The log, stats and card name the mode."""
    from safetensors.torch import load_file

    extra = ["--use_lora", "--max_train_steps", "3", "--checkpointing_steps", "1", "--lr_scheduler", "linear",
             "--backprop_steps", "2", "--checkpoint_denoising_steps"]  # fmt: skip

    class Killed(Exception):
        pass

    def kill(step):
        if step == 3:
            raise Killed

    out = tmp_path / "run"
    with pytest.raises(Killed):
        train_refl.main(_args(assets, out, *extra), step_callback=kill)
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    uninterrupted = load_file(out / "checkpoint-3" / "pytorch_lora_weights.safetensors")
    args = _args(assets, out, *extra, "--resume_from_checkpoint", str(out / "checkpoint-2"))
    resumed = train_refl.main(args)
    assert resumed["global_step"] == 3 and len(resumed["losses"]) == 1
    assert resumed["losses"][0]["loss"] == pytest.approx(log[2]["loss"], rel=1e-5)
    final = load_file(out / "pytorch_lora_weights.safetensors")
    assert final.keys() == uninterrupted.keys()
    for k in final:
        torch.testing.assert_close(final[k], uninterrupted[k], rtol=1e-5, atol=1e-7)
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_pretrained(assets / "tiny-sd", subfolder="scheduler")
    sched.set_timesteps(4)
    assert {(r["grad_step_index"], r["grad_timestep"]) for r in log} == {(2, int(sched.timesteps[2]))}
    mode = "DRaFT-K (gradient through the last K=2 of T=4 steps, each step checkpointed)"
    assert json.loads((out / "train_stats.json").read_text())["mode"] == mode
    card = (out / "README.md").read_text()
    assert "# DRaFT fine-tune" in card and mode in card and "backprop_steps | 2" in card


def test_full_finetune_draft_lv_with_guidance(assets, tmp_path):
    """Full fine-tuning, DRaFT-LV (n = 2) with a guided chain: the reward sees 2 x batch rows, the UNet moves."""
    out = tmp_path / "lv"
    lv = ["--backprop_steps", "1", "--draft_lv_samples", "2", "--rollout_guidance_scale", "3.0"]
    stats = train_refl.main(_args(assets, out, "--max_train_steps", "1", "--checkpoint_denoising_steps", *lv))
    assert stats["global_step"] == 1 and np.isfinite(stats["losses"][0]["loss"])
    assert stats["mode"].startswith("DRaFT-LV (n=2")
    from diffusers import UNet2DConditionModel

    base = UNet2DConditionModel.from_pretrained(assets / "tiny-sd", subfolder="unet").state_dict()
    tuned = UNet2DConditionModel.from_pretrained(out, subfolder="unet").state_dict()
    assert max(float((base[k] - tuned[k]).abs().max()) for k in base) > 0
