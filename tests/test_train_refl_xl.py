"""training/train_refl.py on tiny SDXL components, offline (32x32, T = 4): the added conditioning, LoRA and full
fine-tuning, ReFL and DRaFT, resume."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from PIL import Image

from realign_pipeline.training.draft import draft_latents
from realign_pipeline.training.refl import guided_model_output
from realign_pipeline.training.sdxl import encode_prompt_xl, is_sdxl, read_model_index, time_ids

ROOT = Path(__file__).resolve().parents[1]


def _load_script(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"{path.stem}_xl_tests", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


train_refl = _load_script(ROOT / "training" / "train_refl.py")
pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

@pytest.fixture(scope="module")
def xl(tmp_path_factory, tiny_sdxl_dir):
    from realign_pipeline.testing import image_text_pairs, tiny_sdxl_components

    root = tmp_path_factory.mktemp("refl-xl")
    (root / "tiny-sdxl").symlink_to(tiny_sdxl_dir, target_is_directory=True)  # the session's folder, only read
    tiny_sdxl_components(seed=1)["vae"].save_pretrained(root / "other-vae")
    image_text_pairs(root / "pairs", 3)
    (root / "prompts.txt").write_text("a red cube\na blue ball on a table\ntwo cats\n")
    return root


def _args(xl, out, *extra):
    return train_refl.parse_args([
        "--pretrained_model_name_or_path", str(xl / "tiny-sdxl"), "--output_dir", str(out),
        "--train_data_dir", str(xl / "pairs"), "--prompts_file", str(xl / "prompts.txt"),
        "--reward_class", "realign_pipeline.testing.training:BrightnessReward", "--resolution", "32", "--center_crop",
        "--random_flip", "--train_batch_size", "2", "--num_inference_steps", "4", "--learning_rate", "1e-3",
        "--seed", "0", "--report_to", "none", "--checkpointing_steps", "1000", "--reward_weight", "1.0", *extra,
    ])  # fmt: skip


@pytest.fixture(scope="module")
def base(tiny_sdxl_dir):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _images(pipe) -> np.ndarray:
    return pipe("a red cube", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images


def test_conditioning_is_what_the_sdxl_pipeline_computes(base, xl, tmp_path):
    texts = ["a red cube", "two cats on a blue sofa"]
    context, pooled = encode_prompt_xl(texts, (base.tokenizer, base.tokenizer_2), (base.text_encoder, base.text_encoder_2))
    expected = base.encode_prompt(texts, device="cpu", do_classifier_free_guidance=False)
    assert torch.equal(context, expected[0]) and torch.equal(pooled, expected[2])
    assert context.shape == (2, 77, 96)  # the two encoders' widths, 32 + 64
    projection = base.text_encoder_2.config.projection_dim
    ids = base._get_add_time_ids((40, 36), (3, 0), (32, 32), torch.float32, text_encoder_projection_dim=projection)
    assert torch.equal(time_ids([(40, 36)], [(3, 0)], (32, 32)), ids)

    # the crop the time ids describe: the same tensor as the SD transform, the corner mirrored when flipped
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (40, 36, 3), dtype=np.uint8))
    for seed in range(4):
        tf = train_refl.image_transform_with_crop(32, center_crop=False, random_flip=True)
        x, original, (top, left) = tf(image, torch.Generator().manual_seed(seed))
        plain = train_refl.image_transform(32, center_crop=False, random_flip=True)(image, torch.Generator().manual_seed(seed))
        assert torch.equal(x, plain) and original == (40, 36) and 0 <= top <= 8 and left == 0  # 36 -> 32 wide

    # which pipeline a folder holds, and the resolution that follows
    assert is_sdxl(read_model_index(xl / "tiny-sdxl"))
    assert _args(xl, tmp_path, "--grad_step_range", "2", "4").sdxl and train_refl.parse_args([
        "--pretrained_model_name_or_path", str(xl / "tiny-sdxl"), "--pretrain_loss_weight", "0"]).resolution == 1024
    sd = tmp_path / "sd"
    sd.mkdir()
    (sd / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    args = train_refl.parse_args(["--pretrained_model_name_or_path", str(sd), "--pretrain_loss_weight", "0"])
    assert not args.sdxl and args.resolution == 512
    assert read_model_index(tmp_path / "missing") is None and read_model_index("not a hub id!") is None


def test_added_conditioning_reaches_every_unet_call_with_guidance(base):
    """The pooled embedding and time ids go to the UNet as the pipeline sends them: with guidance the doubled
    batch carries [negative, conditional]; DRaFT-LV's rows repeat them."""
    unet, calls = base.unet, []

    def recording(*args, **kwargs):
        calls.append(kwargs.get("added_cond_kwargs"))
        return unet(*args, **kwargs)

    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 96, generator=g)
    added = {"text_embeds": torch.randn(2, 32, generator=g), "time_ids": time_ids([(64, 64)] * 2, [(0, 0)] * 2, (64, 64))}
    negative = {"text_embeds": torch.zeros(2, 32)}
    with torch.no_grad():
        guided = guided_model_output(recording, x, 500, context, 3.0, torch.zeros_like(context), added, negative)
        uncond = unet(x, 500, encoder_hidden_states=torch.zeros_like(context),
                      added_cond_kwargs={**added, **negative}).sample
        cond = unet(x, 500, encoder_hidden_states=context, added_cond_kwargs=added).sample
    torch.testing.assert_close(guided, uncond + 3.0 * (cond - uncond), rtol=1e-4, atol=1e-5)
    assert torch.equal(calls[0]["text_embeds"], torch.cat([negative["text_embeds"], added["text_embeds"]]))

    from diffusers import DDIMScheduler

    calls.clear()
    scheduler = DDIMScheduler.from_config(base.scheduler.config, clip_sample=False)
    with torch.no_grad():
        out = draft_latents(recording, scheduler, x, context, 3, 1, guidance_scale=3.0,
                            negative_hidden_states=torch.zeros_like(context), lv_samples=2, generator=g,
                            added_cond_kwargs=added, negative_added_cond_kwargs=negative)
    assert out.x0.shape == (4, 4, 8, 8) and len(calls) == 4  # 3 steps, then the re-noised rows
    assert torch.equal(calls[-1]["text_embeds"], torch.cat([torch.zeros(4, 32), added["text_embeds"].repeat(2, 1)]))
    assert calls[-1]["time_ids"].shape == (8, 6)


def test_lora_refl_resume_and_load_lora_weights(xl, base, tmp_path):
    """LoRA ReFL with L_pre (flipped crops), another VAE: killed after step 3 of 3, resumed from checkpoint-2, it
    repeats step 3 and ends with checkpoint-3's weights; StableDiffusionXLPipeline.load_lora_weights reads them."""
    from safetensors.torch import load_file

    extra = ["--use_lora", "--max_train_steps", "3", "--checkpointing_steps", "1", "--lr_scheduler", "linear",
             "--grad_step_range", "2", "4", "--pretrained_vae_model_name_or_path", str(xl / "other-vae")]  # fmt: skip

    class Killed(Exception):
        pass

    def kill(step):
        if step == 3:
            raise Killed

    out = tmp_path / "run"
    with pytest.raises(Killed):
        train_refl.main(_args(xl, out, *extra), step_callback=kill)
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 3 and all(np.isfinite(r["loss"]) and r["loss_pre"] > 0 for r in log)
    uninterrupted = load_file(out / "checkpoint-3" / "pytorch_lora_weights.safetensors")
    resumed = train_refl.main(
        _args(xl, out, *extra, "--resume_from_checkpoint", str(out / "checkpoint-2"), "--validation_prompts", "a cube")
    )
    assert resumed["global_step"] == 3 and len(resumed["losses"]) == 1
    assert resumed["losses"][0]["loss"] == pytest.approx(log[2]["loss"], rel=1e-5)
    final = load_file(out / "pytorch_lora_weights.safetensors")
    assert final.keys() == uninterrupted.keys() and any("attn2.to_k" in k for k in final)
    for k in final:
        torch.testing.assert_close(final[k], uninterrupted[k], rtol=1e-5, atol=1e-7)
    assert (out / "validation" / "step3_0_0.png").is_file()
    card = (out / "README.md").read_text()
    assert "RealignDiffXLPipeline.from_pretrained" in card and f"pretrained_vae_model_name_or_path | {xl / 'other-vae'}" in card

    before = _images(base)
    base.load_lora_weights(out)
    try:
        assert np.abs(_images(base) - before).max() > 1e-4
    finally:
        base.unload_lora_weights()


def test_full_finetune_draft_lv_guided_bf16_saves_an_xl_pipeline(xl, tmp_path):
    """Full fine-tuning, DRaFT-LV (n = 2) with a guided chain, per-step checkpointing, bf16 autocast on the CPU:
    the SDXL VAE stays float32; the output folder is a RealignDiffXLPipeline whose UNet moved."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    out = tmp_path / "full"
    stats = train_refl.main(_args(
        xl, out, "--max_train_steps", "1", "--backprop_steps", "1", "--draft_lv_samples", "2",
        "--rollout_guidance_scale", "3.0", "--checkpoint_denoising_steps", "--mixed_precision", "bf16",
    ))  # fmt: skip
    assert stats["global_step"] == 1 and np.isfinite(stats["losses"][0]["loss"])
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "RealignDiffXLPipeline"
    vae, original_vae = (AutoencoderKL.from_pretrained(folder, subfolder="vae") for folder in (out, xl / "tiny-sdxl"))
    assert vae.dtype == torch.float32
    assert all(torch.equal(a, b) for a, b in zip(vae.state_dict().values(), original_vae.state_dict().values()))
    unet, original_unet = (UNet2DConditionModel.from_pretrained(f, subfolder="unet") for f in (out, xl / "tiny-sdxl"))
    assert max(float((a - b).abs().max()) for a, b in zip(unet.state_dict().values(), original_unet.state_dict().values())) > 0
