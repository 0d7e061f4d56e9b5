"""RealignDiffXLPipeline on tiny random SDXL components (CPU, offline), through from_pretrained.

The tiny SDXL has SDXL's structure (two text encoders concatenated per token, the pooled embedding and time ids as
added conditioning, no attention at the top level) and the real CLIP tokenizer for both encoders, OpenCLIP's
padding token for the second. The stand-in dense captioner is test_realign's (tags, LLM and boxes by lookup).
"""

import warnings

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    StableDiffusionXLPipeline,
)
from test_realign import BOXES, BoxGrounder, LookupLLM, WordTagger

from realign_pipeline import Layout, LayoutError, RealignDiffPipeline, RealignDiffXLPipeline, Region
from realign_pipeline.captioner.dense import DenseCaptioner
from realign_pipeline.realign_mixin import RealignMixin, predicted_original_sample
from realign_pipeline.testing import OPENCLIP_PAD_TOKEN, openclip_tokenizer
from realign_pipeline.tokens import prompt_token_ids

PROMPT = "a red book and a yellow vase"
LAYOUT = Layout([Region("red book", box=[0.0, 0.0, 0.5, 1.0]), Region("yellow vase", box=[0.5, 0.0, 1.0, 1.0])])


def load(folder, cls=RealignDiffXLPipeline, **kwargs):
    pipe = cls.from_pretrained(folder, add_watermarker=False, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe(tiny_sdxl_dir):
    # a plain StableDiffusionXLPipeline folder: RealignDiffXLPipeline loads an SDXL checkpoint as it is
    return load(tiny_sdxl_dir)


def fresh(pipeline, **replace) -> RealignDiffXLPipeline:
    """A new pipeline on the loaded one's modules (weights shared, not reloaded), some of them replaced."""
    new = RealignDiffXLPipeline(**{**pipeline.components, **replace}, add_watermarker=False)
    new.set_progress_bar_config(disable=True)
    return new


def stand_in_captioner(tagger=None) -> DenseCaptioner:
    return DenseCaptioner(tagger or WordTagger(), LookupLLM(), BoxGrounder())


@pytest.fixture()
def realign_pipe(pipe):
    return fresh(pipe, dense_captioner=stand_in_captioner())


def run(pipeline, prompt=PROMPT, seed=0, steps=3, **kwargs):
    kwargs.setdefault("output_type", "np")
    return pipeline(prompt, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed), **kwargs)


def parent_of(pipeline) -> StableDiffusionXLPipeline:
    parent = StableDiffusionXLPipeline(**pipeline.components, add_watermarker=False)
    parent.set_progress_bar_config(disable=True)
    return parent


# ------------------------------------------------------------------------------------------------ the components
def test_tiny_sdxl_components_have_sdxls_structure(pipe):
    assert isinstance(pipe, RealignMixin) and isinstance(pipe, StableDiffusionXLPipeline)
    assert pipe.tokenizer.pad_token == "<|endoftext|>" and pipe.tokenizer_2.pad_token == OPENCLIP_PAD_TOKEN == "!"
    # the same tokens at the same positions in both tokenizers; only the padding after the end token differs
    assert prompt_token_ids(pipe.tokenizer, PROMPT) == prompt_token_ids(pipe.tokenizer_2, PROMPT)
    padded = [t(PROMPT, padding="max_length", max_length=77).input_ids for t in (pipe.tokenizer, pipe.tokenizer_2)]
    assert padded[0][:9] == padded[1][:9] and padded[0][9:] == [49407] * 68 and padded[1][9:] == [0] * 68
    widths = pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    assert pipe.unet.config.cross_attention_dim == widths == 96
    assert pipe.unet.config.addition_embed_type == "text_time" and pipe.unet.config.down_block_types[0] == "DownBlock2D"
    assert pipe._modulation_grids() == [2]  # no attention at the top level, as SDXL


# ---------------------------------------------------------------- without a layout: exactly StableDiffusionXLPipeline
SCHEDULERS = {
    "euler": None,  # the tiny SDXL's own, as SDXL's
    "ddim": DDIMScheduler,
    "dpm": DPMSolverMultistepScheduler,
    "ancestral": EulerAncestralDiscreteScheduler,
}


@pytest.mark.parametrize(
    "scheduler, call",
    [
        ("euler", {}),
        ("euler", {"num_images_per_prompt": 2, "negative_prompt": "blurry"}),
        ("euler", {"guidance_scale": 1.0, "height": 48, "width": 64}),
        ("euler", {"guidance_rescale": 0.5, "original_size": (64, 64), "target_size": (32, 32),
                   "negative_original_size": (16, 16), "negative_target_size": (32, 32)}),
        ("euler", {"denoising_end": 0.6, "output_type": "latent"}),
        ("ddim", {"num_images_per_prompt": 2}),
        ("dpm", {"denoising_end": 0.6, "output_type": "latent"}),
        ("ancestral", {"num_images_per_prompt": 2, "height": 32, "width": 48}),
    ],
)
def test_without_layout_it_is_the_parent_pipeline(pipe, scheduler, call):
    original = pipe.scheduler
    if SCHEDULERS[scheduler] is not None:
        pipe.scheduler = SCHEDULERS[scheduler].from_config(original.config)
    try:
        ours = run(pipe, **call).images
        theirs = run(parent_of(pipe), **call).images
    finally:
        pipe.scheduler = original
    assert np.array_equal(ours, theirs)


def test_batches_prompt_embeds_and_callbacks_match_the_parent(pipe):
    prompts = [PROMPT, "a cat"]
    assert np.array_equal(run(pipe, prompts).images, run(parent_of(pipe), prompts).images)
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(PROMPT, device="cpu", num_images_per_prompt=1)
    kwargs = {"prompt_embeds": embeds, "negative_prompt_embeds": negative, "pooled_prompt_embeds": pooled,
              "negative_pooled_prompt_embeds": negative_pooled, "num_images_per_prompt": 2}
    assert np.array_equal(run(pipe, None, **kwargs).images, run(parent_of(pipe), None, **kwargs).images)

    def on_step_end(pipeline, step, timestep, tensors):  # SDXL's added conditioning, edited by a callback
        return {"add_time_ids": tensors["add_time_ids"] * 2, "add_text_embeds": tensors["add_text_embeds"] + 1}

    inputs = ["latents", "add_text_embeds", "add_time_ids"]
    call = {"callback_on_step_end": on_step_end, "callback_on_step_end_tensor_inputs": inputs}
    assert np.array_equal(run(pipe, **call).images, run(parent_of(pipe), **call).images)
    assert isinstance(run(pipe, return_dict=False), tuple) and len(run(pipe, return_dict=False)) == 1


# ---------------------------------------------------------------------------------------------------- with a layout
def phrase_share(maps: dict, words: list[str], mask: torch.Tensor) -> float:
    mass = sum(maps[w] for w in words)
    return float((mass * mask).sum() / mass.sum())


def first_step_maps(pipeline, **kwargs) -> list[dict]:
    """Attention maps of the first of 50 steps (l_t about 0.9), stopped there."""

    def stop_after_first_step(pipeline, step, timestep, tensors):
        pipeline._interrupt = True
        return tensors

    return run(pipeline, steps=50, return_attention_maps=True, callback_on_step_end=stop_after_first_step,
               output_type="latent", **kwargs).attention_maps


@pytest.fixture(scope="module")
def both_pipelines(pipe, tiny_sd_dir):
    sd = RealignDiffPipeline.from_pretrained(tiny_sd_dir, safety_checker=None)
    sd.set_progress_bar_config(disable=True)
    return {"sd": sd, "sdxl": pipe}


@pytest.mark.parametrize("size", [(32, 32), (48, 64)])
@pytest.mark.parametrize("name", ["sd", "sdxl"])
def test_phrase_attention_moves_into_its_region(both_pipelines, name, size):
    pipeline = both_pipelines[name]
    height, width = size
    call = {"num_images_per_prompt": 2, "height": height, "width": width}
    plain = first_step_maps(pipeline, **call)
    guided = first_step_maps(pipeline, layout=LAYOUT, **call)
    for image in range(2):
        for region, words in zip(LAYOUT, (["red", "book"], ["yellow", "vase"])):
            mask = region.mask_at(height // 2, width // 2)  # the tiny VAEs downsample by 2
            assert plain[image]["red"].shape == (height // 2, width // 2)
            assert phrase_share(guided[image], words, mask) > phrase_share(plain[image], words, mask) + 0.03


def test_layouts_per_image_non_square_and_options(pipe):
    call = {"num_images_per_prompt": 2, "height": 32, "width": 48, "output_type": "pt"}
    plain = run(pipe, **call).images
    out = run(pipe, layout=[LAYOUT, None], return_attention_maps=True, **call)
    assert out.images.shape == (2, 3, 32, 48) and out.layouts[1] is None
    assert out.layouts[0].token_indices == [[2, 3], [6, 7]]
    assert (out.images[0] - plain[0]).abs().max() > 1e-4
    torch.testing.assert_close(out.images[1], plain[1], atol=2e-5, rtol=0)
    assert out.attention_maps[0]["vase"].shape == (16, 24)
    assert torch.equal(run(pipe, layout=LAYOUT, cross_attention_strength=0.0, **call).images, plain)

    base = run(pipe, layout=LAYOUT, **call).images
    for option in ({"self_attention_strength": 0.3}, {"replace_phrase_embeddings": True},
                   {"suppress_unclaimed_tokens": True}):
        assert (run(pipe, layout=LAYOUT, **option, **call).images - base).abs().max() > 1e-5, option
    assert torch.equal(run(pipe, layout=LAYOUT, modulated_downsampling=[2], **call).images, base)
    with pytest.raises(ValueError, match=r"some of \[2\] for this UNet"):
        run(pipe, layout=LAYOUT, modulated_downsampling=[1])


def test_an_appended_phrase_is_encoded_by_both_encoders(pipe):
    with pytest.warns(UserWarning, match="appended"):
        out = run(pipe, "a cat", layout=Layout([Region("blue bird", box=[0, 0, 1, 1])]), output_type="pt")
    assert out.layouts[0].prompt == "a cat, blue bird"
    # the same as writing the phrase into the prompt: both encoders and the pooled embedding read it
    written = run(pipe, "a cat, blue bird", layout=Layout([Region("blue bird", box=[0, 0, 1, 1])]), output_type="pt")
    assert torch.equal(out.images, written.images)


def test_tokenizers_that_disagree_on_a_prompt_are_a_clear_error(pipe):
    pipeline = fresh(pipe, tokenizer_2=openclip_tokenizer())
    pipeline.tokenizer_2.add_tokens(["yellow vase"])  # one token for tokenizer_2, two for tokenizer
    with pytest.raises(LayoutError, match=r"image 0: tokenizer and tokenizer_2 split the prompt .* differently"):
        run(pipeline, layout=LAYOUT)
    run(pipeline, "a red book", layout=Layout([LAYOUT[0]]))  # a prompt both split alike is fine
    with pytest.raises(ValueError, match="prompt_2=None"):
        run(pipeline, prompt_2="a photo", layout=LAYOUT)


# ---------------------------------------------------------------------------------------------------- realign=True
def test_realign_is_coarse_then_layout_guided_from_the_same_noise(realign_pipe):
    out = run(realign_pipe, realign=True, return_attention_maps=True, height=32, width=48)
    plain = run(realign_pipe, height=32, width=48)
    coarse = np.stack([np.asarray(image, dtype=np.float32) / 255 for image in out.coarse_images])
    assert np.abs(coarse - plain.images).max() <= 1 / 255 + 1e-6
    assert out.realigned == [True] and out.nsfw_content_detected is None
    assert [r.phrase for r in out.layouts[0].regions] == ["red book", "yellow vase"]
    guided = run(realign_pipe, layout=Layout(out.layouts[0].regions), height=32, width=48)
    torch.testing.assert_close(out.images, guided.images, atol=2e-5, rtol=0)
    assert np.abs(out.images - plain.images).max() > 1e-5
    assert set(out.coarse_attention_maps[0]) == set(out.attention_maps[0]) >= {"red", "book"}
    images, maps = run(realign_pipe, realign=True, return_dict=False, return_attention_maps=True)
    assert len(images) == 1 and "vase" in maps[0]


def test_save_load_and_from_pipe_keep_the_captioner(realign_pipe, tmp_path):
    realign_pipe.dense_captioner = DenseCaptioner(WordTagger(extra="lamp"), LookupLLM("v2"), BoxGrounder())
    realign_pipe.save_pretrained(tmp_path)
    assert (tmp_path / "dense_captioner" / "dense_captioner.json").is_file()
    loaded = load(tmp_path)
    assert type(loaded) is RealignDiffXLPipeline
    assert loaded.dense_captioner.tagger.extra == "lamp" and loaded.dense_captioner.llm.model == "v2"
    assert np.array_equal(run(loaded, layout=LAYOUT).images, run(realign_pipe, layout=LAYOUT).images)

    piped = RealignDiffXLPipeline.from_pipe(parent_of(realign_pipe))
    piped.set_progress_bar_config(disable=True)
    assert type(piped) is RealignDiffXLPipeline and piped.dense_captioner is None
    assert np.array_equal(run(piped, layout=LAYOUT).images, run(realign_pipe, layout=LAYOUT).images)
    assert RealignDiffXLPipeline.from_pipe(realign_pipe).dense_captioner is realign_pipe.dense_captioner


class RecordingTagger(WordTagger):
    """WordTagger that keeps the images it was shown."""

    def __init__(self):
        super().__init__()
        self.images = []

    def tag(self, images, prompts):
        self.images.extend(images)
        return super().tag(images, prompts)


def _last_x0(pipeline, **call) -> torch.Tensor:
    """The x0 prediction of the last scheduler step of a plain call."""
    predictions = []
    original = pipeline.scheduler.step

    def step(*args, return_dict=True, **kwargs):
        out = original(*args, return_dict=True, **kwargs)
        predictions.append(out.pred_original_sample)
        return out if return_dict else (out.prev_sample, out.pred_original_sample)

    pipeline.scheduler.step = step
    try:
        run(pipeline, output_type="latent", **call)
    finally:
        del pipeline.scheduler.step
    return predictions[-1]


def test_with_denoising_end_the_captioner_reads_the_decoded_x0_prediction(pipe):
    tagger = RecordingTagger()
    pipeline = fresh(pipe, dense_captioner=stand_in_captioner(tagger))
    call = {"steps": 6, "denoising_end": 0.5}
    out = run(pipeline, realign=True, output_type="latent", **call)
    assert out.realigned == [True] and len(tagger.images) == 1
    assert tagger.images[0] is out.coarse_images[0]

    x0 = _last_x0(pipeline, **call)
    with torch.no_grad():
        decoded = pipeline.vae.decode(x0 / pipeline.vae.config.scaling_factor)[0]
    image = pipeline.image_processor.postprocess(decoded, "np")
    seen = np.asarray(tagger.images[0], dtype=np.float32) / 255
    assert np.abs(seen - image[0]).max() <= 1 / 255 + 1e-5
    unfinished = run(pipeline, **call).images[0]  # what the parent decodes at denoising_end: not what was read
    assert np.abs(seen - unfinished).max() > 0.05

    # the fine pass stops at denoising_end too, with the captioned layout: latents for a refiner
    guided = run(pipeline, layout=Layout(out.layouts[0].regions), output_type="latent", **call)
    assert out.images.shape == guided.images.shape == (1, 4, 16, 16)
    torch.testing.assert_close(out.images, guided.images, atol=1e-5, rtol=0)


def test_the_x0_prediction_without_the_schedulers_own(pipe):
    # DPM-Solver gives none: x0 comes from alphas_cumprod and the prediction type, as DDIM computes it
    ddim = DDIMScheduler.from_config(EulerDiscreteScheduler().config, clip_sample=False)
    ddim.set_timesteps(4)
    sample, output = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    for prediction_type in ("epsilon", "v_prediction"):
        ddim.register_to_config(prediction_type=prediction_type)
        t = ddim.timesteps[1]
        expected = ddim.step(output, t, sample).pred_original_sample
        got = predicted_original_sample(ddim, object(), output, t, sample)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)

    tagger = RecordingTagger()
    scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipeline = fresh(pipe, dense_captioner=stand_in_captioner(tagger), scheduler=scheduler)
    out = run(pipeline, realign=True, steps=6, denoising_end=0.5)
    assert out.realigned == [True] and np.isfinite(out.images).all() and len(tagger.images) == 1


def test_a_float16_vae_decodes_upcast_and_stays_float16(tiny_sdxl_dir):
    pipeline = load(tiny_sdxl_dir, dense_captioner=stand_in_captioner())  # its own VAE: this test changes its dtype
    pipeline.vae.to(torch.float16)
    assert pipeline.vae.config.force_upcast
    decoded_in = []
    original = pipeline.vae.decode

    def decode(latents, *args, **kwargs):
        decoded_in.append((latents.dtype, pipeline.vae.dtype))
        return original(latents, *args, **kwargs)

    pipeline.vae.decode = decode
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # no deprecated upcast_vae
        out = run(pipeline, realign=True, steps=4, denoising_end=0.5)
    # the x0 preview and the coarse and fine images: every decode in float32, the VAE back in float16
    assert decoded_in == [(torch.float32, torch.float32)] * 3
    assert pipeline.vae.dtype == torch.float16 and np.isfinite(out.images).all()
    assert BOXES.keys() == {r.phrase for r in out.layouts[0].regions}


def test_base_with_a_layout_then_the_refiner(pipe):
    from diffusers import StableDiffusionXLImg2ImgPipeline

    # the tiny base's modules stand in for the refiner's; the modulation acts in the base only
    refiner = StableDiffusionXLImg2ImgPipeline(**pipe.components, add_watermarker=False)
    refiner.set_progress_bar_config(disable=True)
    call = {"steps": 6, "denoising_end": 0.5, "output_type": "latent"}
    plain = run(pipe, **call).images
    assert torch.equal(plain, run(parent_of(pipe), **call).images)
    guided = run(pipe, layout=LAYOUT, **call).images
    assert (guided - plain).abs().max() > 1e-5

    def refine(latents):
        return refiner(PROMPT, image=latents, num_inference_steps=6, denoising_start=0.5,
                       generator=torch.Generator().manual_seed(1), output_type="np").images

    refined, refined_plain = refine(guided), refine(plain)
    assert refined.shape == (1, 32, 32, 3) and np.isfinite(refined).all()
    assert np.abs(refined - refined_plain).max() > 1e-5


def test_each_pass_gets_every_argument_of_call_but_realign(realign_pipe, monkeypatch):
    import inspect

    seen = {}
    monkeypatch.setattr(realign_pipe, "_realign_call", lambda pass_args: seen.update(pass_args) or "passes")
    assert run(realign_pipe, realign=True, height=32, width=48, denoising_end=0.9) == "passes"
    expected = set(inspect.signature(RealignDiffXLPipeline.__call__).parameters) - {"self", "kwargs", "realign"}
    assert set(seen) == expected | {"callback", "callback_steps"}  # the legacy callbacks come in **kwargs
    assert (seen["height"], seen["width"], seen["denoising_end"]) == (32, 48, 0.9)
    assert seen["callback_on_step_end_tensor_inputs"] == ["latents"]
