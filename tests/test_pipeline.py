"""RealignDiffPipeline on tiny random components (CPU, offline), through from_pretrained."""

import warnings

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler, StableDiffusionPipeline

from realign_pipeline import Layout, LayoutError, RealignDiffPipeline, Region
from realign_pipeline.attention import RealignAttnProcessor

PROMPT = "a red book and a yellow vase"
LAYOUT = Layout([Region("red book", box=[0.0, 0.0, 0.5, 1.0]), Region("yellow vase", box=[0.5, 0.0, 1.0, 1.0])])


@pytest.fixture(scope="module")
def saved_dirs(tiny_folders):
    return {style: tiny_folders.stable_diffusion(style) for style in ("sd1", "sd2")}


def load(saved_dirs, style="sd1", **kwargs) -> RealignDiffPipeline:
    pipe = RealignDiffPipeline.from_pretrained(saved_dirs[style], safety_checker=None, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe(saved_dirs):
    return load(saved_dirs)


def run(pipeline, prompt=PROMPT, seed=0, steps=3, **kwargs):
    kwargs.setdefault("output_type", "np")
    return pipeline(prompt, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed), **kwargs)


def parent_of(pipeline) -> StableDiffusionPipeline:
    parent = StableDiffusionPipeline(**pipeline.components)
    parent.set_progress_bar_config(disable=True)
    return parent


def phrase_share(maps: dict, words: list[str], mask: torch.Tensor) -> float:
    mass = sum(maps[w] for w in words)
    return float((mass * mask).sum() / mass.sum())


# ---------------------------------------------------------------- without a layout: exactly StableDiffusionPipeline
@pytest.mark.parametrize(
    "style, call",
    [
        ("sd1", {}),
        ("sd2", {}),
        ("sd1", {"num_images_per_prompt": 2, "negative_prompt": "blurry"}),
        ("sd1", {"guidance_scale": 1.0}),
        ("sd1", {"guidance_rescale": 0.5, "height": 48, "width": 32}),
    ],
)
def test_without_layout_it_is_the_parent_pipeline(saved_dirs, style, call):
    pipe = load(saved_dirs, style)
    ours = run(pipe, **call).images
    theirs = run(parent_of(pipe), **call).images
    assert np.array_equal(ours, theirs)


@pytest.mark.parametrize("scheduler_cls", [DPMSolverMultistepScheduler, EulerDiscreteScheduler])
def test_other_schedulers_plain_and_with_layout(pipe, scheduler_cls):
    original = pipe.scheduler
    pipe.scheduler = scheduler_cls.from_config(original.config)
    try:
        plain = run(pipe, steps=4).images
        assert np.array_equal(plain, run(parent_of(pipe), steps=4).images)
        guided = run(pipe, steps=4, layout=LAYOUT).images
        assert np.isfinite(guided).all() and not np.allclose(guided, plain, atol=1e-4)
    finally:
        pipe.scheduler = original


def test_batch_of_prompts_and_prompt_embeds_match_the_parent(pipe):
    prompts = [PROMPT, "a cat"]
    assert np.array_equal(run(pipe, prompts).images, run(parent_of(pipe), prompts).images)
    embeds, negative = pipe.encode_prompt(PROMPT, "cpu", 1, True)
    kwargs = {"prompt_embeds": embeds, "negative_prompt_embeds": negative}
    assert np.array_equal(run(pipe, None, **kwargs).images, run(parent_of(pipe), None, **kwargs).images)


def test_callbacks_run_and_can_edit_latents(pipe):
    steps = []

    def callback(pipeline, step, timestep, tensors):
        steps.append(step)
        return {"latents": tensors["latents"] * 0 if step == 2 else tensors["latents"]}

    out = run(pipe, layout=LAYOUT, callback_on_step_end=callback, output_type="latent").images
    assert steps == [0, 1, 2]
    assert torch.count_nonzero(out) == 0


def future_warnings(call) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call()
    return [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]


def test_legacy_callback_is_deprecated_and_runs_as_in_the_parent(pipe):
    ours, theirs = [], []
    ours_warnings = future_warnings(lambda: run(pipe, callback=lambda *a: ours.append(a[0]), callback_steps=2))
    theirs_warnings = future_warnings(
        lambda: run(parent_of(pipe), callback=lambda *a: theirs.append(a[0]), callback_steps=2)
    )
    assert len(ours_warnings) == 2 and "`callback` as an input argument" in ours_warnings[0]
    assert ours_warnings == theirs_warnings
    assert ours == theirs == [0, 2]


def test_round_trips_and_from_pipe(pipe, saved_dirs, tmp_path):
    pipe.save_pretrained(tmp_path / "again")
    again = load({"sd1": tmp_path / "again"})
    assert type(again) is RealignDiffPipeline
    assert np.array_equal(run(pipe, layout=LAYOUT).images, run(again, layout=LAYOUT).images)
    sd = StableDiffusionPipeline.from_pretrained(saved_dirs["sd1"], safety_checker=None)
    piped = RealignDiffPipeline.from_pipe(sd)
    piped.set_progress_bar_config(disable=True)
    assert type(piped) is RealignDiffPipeline
    assert np.array_equal(run(piped, layout=LAYOUT).images, run(pipe, layout=LAYOUT).images)


# ---------------------------------------------------------------- with a layout
def test_layout_changes_the_image_and_strength_zero_does_not(pipe):
    plain = run(pipe).images
    guided = run(pipe, layout=LAYOUT).images
    assert np.abs(guided - plain).max() > 2e-4  # float noise of the explicit path is ~1e-6
    assert np.array_equal(run(pipe, layout=LAYOUT, cross_attention_strength=0.0).images, plain)
    assert np.array_equal(run(pipe, layout=LAYOUT, modulation_fraction=0.0).images, plain)
    zero_scores = Layout([Region(r.phrase, box=r.box, score=0.0) for r in LAYOUT])
    torch.testing.assert_close(run(pipe, layout=zero_scores).images, plain, atol=2e-5, rtol=0)
    torch.testing.assert_close(
        run(pipe, layout=zero_scores, suppress_unclaimed_tokens=True).images, plain, atol=2e-5, rtol=0
    )


def first_step_maps(pipeline, **kwargs) -> list[dict]:
    """Attention maps of the first step only (t = 981 of 50 DDIM steps, l_t = 0.91)."""

    def stop_after_first_step(pipeline, step, timestep, tensors):
        pipeline._interrupt = True
        return tensors

    return run(
        pipeline, steps=50, return_attention_maps=True, callback_on_step_end=stop_after_first_step, **kwargs
    ).attention_maps


@pytest.mark.parametrize("guidance_scale", [7.5, 1.0])
def test_phrase_attention_moves_into_its_region(pipe, guidance_scale):
    # identical starting latents with and without the layout; guidance 1 modulates the whole batch
    plain = first_step_maps(pipe, guidance_scale=guidance_scale, num_images_per_prompt=2)
    guided = first_step_maps(pipe, guidance_scale=guidance_scale, num_images_per_prompt=2, layout=LAYOUT)
    for image in range(2):
        for region, words in zip(LAYOUT, (["red", "book"], ["yellow", "vase"])):
            mask = region.mask_at(16, 16)
            assert phrase_share(guided[image], words, mask) > phrase_share(plain[image], words, mask) + 0.01


def test_attention_maps_without_layout(pipe):
    plain = run(pipe).images
    out = run(pipe, return_attention_maps=True, height=48, width=32)
    maps = out.attention_maps[0]
    assert list(maps) == ["a", "red", "book", "and", "a#2", "yellow", "vase"]
    for value in maps.values():
        assert value.shape == (24, 16) and torch.isfinite(value).all() and (value >= 0).all()
    torch.testing.assert_close(run(pipe, return_attention_maps=True).images, plain, atol=2e-5, rtol=0)
    _, _, maps_tuple = run(pipe, return_attention_maps=True, return_dict=False)
    assert len(maps_tuple) == 1 and list(maps_tuple[0]) == list(maps)


def test_processors_are_restored_after_the_call_and_after_an_exception(pipe):
    original = pipe.unet.attn_processors
    run(pipe, layout=LAYOUT)
    assert all(pipe.unet.attn_processors[n] is p for n, p in original.items())

    def explode(pipeline, step, timestep, tensors):
        assert any(isinstance(p, RealignAttnProcessor) for p in pipeline.unet.attn_processors.values())
        raise RuntimeError("stop here")

    with pytest.raises(RuntimeError, match="stop here"):
        run(pipe, layout=LAYOUT, callback_on_step_end=explode)
    assert all(pipe.unet.attn_processors[n] is p for n, p in original.items())


def test_layouts_per_prompt_and_per_image(pipe):
    plain = run(pipe, num_images_per_prompt=2).images
    per_image = run(pipe, num_images_per_prompt=2, layout=[LAYOUT, None]).images
    assert np.abs(per_image[0] - plain[0]).max() > 2e-4
    torch.testing.assert_close(per_image[1], plain[1], atol=2e-5, rtol=0)

    prompts = [PROMPT, "a cat on a mat"]
    cat = Layout([Region("cat", box=[0.25, 0.25, 0.75, 0.75])])
    plain_batch = run(pipe, prompts).images
    both = run(pipe, prompts, layout=[LAYOUT, cat]).images
    only_first = run(pipe, prompts, layout=[LAYOUT, None]).images
    assert np.abs(both[1] - plain_batch[1]).max() > 2e-4
    torch.testing.assert_close(only_first[1], plain_batch[1], atol=2e-5, rtol=0)
    torch.testing.assert_close(both[0], only_first[0], atol=1e-5, rtol=0)

    with pytest.raises(ValueError, match="3 layouts for 2 prompt"):
        run(pipe, prompts, layout=[LAYOUT, cat, cat])


def test_appended_phrase_and_strict_mode(pipe):
    with pytest.warns(UserWarning, match="appended"):
        out = run(pipe, "a cat", layout=Layout([Region("blue bird", box=[0, 0, 1, 1])]), return_attention_maps=True)
    assert out.layouts[0].prompt == "a cat, blue bird"
    assert {"blue", "bird"} <= set(out.attention_maps[0])
    with pytest.raises(LayoutError, match="image 0.*not in the prompt"):
        run(pipe, "a cat", layout=Layout([Region("blue bird", box=[0, 0, 1, 1])]), strict_layout=True)


def test_prompt_embeds_need_token_indices(pipe):
    embeds, negative = pipe.encode_prompt(PROMPT, "cpu", 1, True)
    kwargs = {"prompt_embeds": embeds, "negative_prompt_embeds": negative}
    with pytest.raises(LayoutError, match="token_indices"):
        run(pipe, None, layout=LAYOUT, **kwargs)
    by_index = Layout([Region("red book", box=LAYOUT[0].box, token_indices=[2, 3]),
                       Region("yellow vase", box=LAYOUT[1].box, token_indices=[6, 7])])
    out = run(pipe, None, layout=by_index, return_attention_maps=True, **kwargs)
    torch.testing.assert_close(out.images, run(pipe, layout=LAYOUT).images, atol=1e-5, rtol=0)
    assert "token_2" in out.attention_maps[0]


BAD_ARGUMENTS = [
    ({"cross_attention_strength": -1.0}, "cross_attention_strength"),
    ({"modulation_fraction": 1.5}, "modulation_fraction"),
    ({"size_weight": float("nan")}, "size_weight"),
    ({"layout": "not a layout"}, "expected a Layout"),
]


@pytest.mark.parametrize("kwargs, message", BAD_ARGUMENTS)
def test_bad_arguments_are_clear_errors(pipe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        run(pipe, **kwargs)


@pytest.mark.parametrize("kwargs, message", BAD_ARGUMENTS)
def test_check_inputs_raises_the_same_errors_when_called_directly(pipe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        pipe.check_inputs(PROMPT, 64, 64, None, **kwargs)


def test_check_inputs_checks_the_parents_arguments_and_the_layout_count(pipe):
    pipe.check_inputs(PROMPT, 64, 64, None, layout=LAYOUT, num_images_per_prompt=2)
    with pytest.raises(ValueError, match="divisible by 8"):
        pipe.check_inputs(PROMPT, 60, 64, None, layout=LAYOUT)
    with pytest.raises(ValueError, match="3 layouts for 2 prompt"):
        pipe.check_inputs([PROMPT, "a cat"], 64, 64, None, layout=[LAYOUT] * 3)
    embeds = torch.zeros(2, 77, pipe.text_encoder.config.hidden_size)
    with pytest.raises(ValueError, match="3 layouts for 2 prompt"):
        pipe.check_inputs(None, 64, 64, None, prompt_embeds=embeds, layout=[LAYOUT] * 3)


def test_options_change_the_result(pipe):
    base = run(pipe, layout=LAYOUT).images
    options = ({"self_attention_strength": 0.3}, {"replace_phrase_embeddings": True}, {"size_weight": 0.0},
               {"suppress_unclaimed_tokens": True})
    for option in options:
        assert np.abs(run(pipe, layout=LAYOUT, **option).images - base).max() > 1e-4, option


def test_sd2_style_half_precision_where_the_cpu_allows(saved_dirs):
    try:
        torch.nn.functional.conv2d(torch.ones(1, 1, 3, 3, dtype=torch.float16), torch.ones(1, 1, 1, 1, dtype=torch.float16))
        dtype = torch.float16
    except RuntimeError:
        dtype = torch.float32
    pipe = load(saved_dirs, "sd2", dtype=dtype)
    assert pipe.unet.config.upcast_attention and pipe.scheduler.config.prediction_type == "v_prediction"
    out = run(pipe, layout=LAYOUT, return_attention_maps=True)
    assert np.isfinite(out.images).all()
    assert all(torch.isfinite(m).all() for m in out.attention_maps[0].values())


def test_lora_weights_load_into_the_pipeline(saved_dirs, tmp_path, save_random_lora):
    pipe = load(saved_dirs)
    save_random_lora(pipe, tmp_path)
    before = run(pipe, layout=LAYOUT).images
    pipe.load_lora_weights(tmp_path)
    after = run(pipe, layout=LAYOUT).images
    assert np.abs(after - before).max() > 1e-4
    assert np.array_equal(run(pipe).images, run(parent_of(pipe)).images)


def test_model_cpu_offload_hooks_keep_the_result(saved_dirs):
    # on this CPU-only machine "offload" moves between cpu and cpu, but accelerate's hooks and
    # maybe_free_model_hooks run as they do on a GPU
    pipe = load(saved_dirs)
    expected = run(pipe, layout=LAYOUT, return_attention_maps=True)
    pipe.enable_model_cpu_offload(device="cpu")
    got = run(pipe, layout=LAYOUT, return_attention_maps=True)
    assert np.array_equal(got.images, expected.images)
    assert all(torch.equal(got.attention_maps[0][w], expected.attention_maps[0][w]) for w in expected.attention_maps[0])
