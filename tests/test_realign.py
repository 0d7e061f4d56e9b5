"""DenseCaptioner assembly and the two-stage `realign=True` path, with small deterministic backends.

The real backends (CLIP tagger, LLMs, Grounding DINO + SAM) have their own tests; here the backends are
simple classes that follow the protocols, so the pipeline's control flow can be checked exactly.
"""

import json
import warnings

import numpy as np
import PIL.Image
import pytest
import torch

from realign_pipeline import Layout, RealignDiffPipeline, Region
from realign_pipeline.captioner.base import Detection, LLMResult, ObjectJudgement
from realign_pipeline.captioner.dense import DenseCaptioner

PROMPT = "a red book and a yellow vase"
BOXES = {"red book": (0.0, 0.0, 0.5, 1.0), "yellow vase": (0.5, 0.0, 1.0, 1.0)}


class WordTagger:
    """Tags = the words of the prompt that name known objects, plus a distractor."""

    def __init__(self, extra: str = "table"):
        self.extra = extra
        self.calls: list[list[str]] = []

    def tag(self, images, prompts):
        self.calls.append(list(prompts))
        return [[w for w in p.split() if w in ("book", "vase", "cat")] + [self.extra] for p in prompts]

    def to_config(self):
        return {"extra": self.extra}

    @classmethod
    def from_config(cls, config):
        return cls(**config)


class LookupLLM:
    """Score 2 and the '<color> <noun>' phrase for tags in the prompt, 0 otherwise."""

    def __init__(self, model: str = "lookup"):
        self.model = model

    def judge(self, prompt, tags):
        words = prompt.split()
        objects = []
        for tag in tags:
            if tag in words:
                i = words.index(tag)
                objects.append(ObjectJudgement(tag, 2.0, " ".join(words[max(i - 1, 0) : i + 1])))
            else:
                objects.append(ObjectJudgement(tag, 0.0, None))
        return LLMResult(objects, {"backend": "lookup", "fallback": False, "raw": None})

    def to_config(self):
        return {"model": self.model}

    @classmethod
    def from_config(cls, config):
        return cls(**config)


class BoxGrounder:
    """A fixed box per known phrase; None for unknown phrases."""

    def __init__(self, boxes=None):
        self.boxes = {k: tuple(v) for k, v in (BOXES if boxes is None else boxes).items()}

    def ground(self, image, nouns, phrases=None):
        width, height = image.size
        out = []
        for phrase in nouns if phrases is None else phrases:
            if phrase not in self.boxes:
                out.append(None)
                continue
            x0, y0, x1, y1 = self.boxes[phrase]
            mask = np.zeros((height, width), dtype=bool)
            mask[int(y0 * height) : int(y1 * height), int(x0 * width) : int(x1 * width)] = True
            out.append(Detection(box=(x0, y0, x1, y1), mask=mask, score=0.9))
        return out

    def to_config(self):
        return {"boxes": {k: list(v) for k, v in self.boxes.items()}}

    @classmethod
    def from_config(cls, config):
        return cls(**config)


def captioner(**kwargs) -> DenseCaptioner:
    return DenseCaptioner(WordTagger(**kwargs), LookupLLM(), BoxGrounder())


@pytest.fixture(scope="module")
def loaded(tiny_sd_dir):
    """The tiny SD loaded once for the module (from_pretrained, no captioner). Tests get their own pipeline object
    around its modules (:func:`with_captioner`): they replace the pipeline's parts (scheduler, captioner, safety
    checker, prepare_latents) on that object only; the UNet's attention processors are restored after every call,
    also when it raises."""
    return RealignDiffPipeline.from_pretrained(tiny_sd_dir, safety_checker=None)


def with_captioner(loaded, dense_captioner) -> RealignDiffPipeline:
    pipe = RealignDiffPipeline.from_pipe(loaded, dense_captioner=dense_captioner)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture()
def pipe(loaded):
    return with_captioner(loaded, captioner())


def run(pipeline, prompt=PROMPT, seed=0, **kwargs):
    kwargs.setdefault("output_type", "np")
    kwargs.setdefault("num_inference_steps", 3)
    return pipeline(prompt, generator=torch.Generator().manual_seed(seed), **kwargs)


def test_dense_captioner_builds_a_layout_with_provenance():
    image = PIL.Image.new("RGB", (48, 32))
    layout = captioner()([image], ["a red book and a cat"])[0]
    assert [r.phrase for r in layout] == ["red book"]
    region = layout[0]
    assert region.score == 2.0 and region.tag == "book" and region.box == BOXES["red book"]
    assert region.mask.shape == (32, 48) and region.area == pytest.approx(0.5)
    assert layout.source["ungrounded_phrases"] == ["a cat"]  # the grounder knows no box for it
    assert layout.source["dropped_tags"] == ["table"]
    assert layout.source["llm"]["backend"] == "lookup"
    assert Layout.from_json(layout.to_json()).source == layout.source
    with pytest.raises(ValueError, match="one prompt per image"):
        captioner()([image], [])


def test_realign_is_coarse_then_layout_guided_from_the_same_noise(pipe):
    out = run(pipe, realign=True, return_attention_maps=True)
    plain = run(pipe)
    coarse = np.stack([np.asarray(image, dtype=np.float32) / 255 for image in out.coarse_images])
    assert np.abs(coarse - plain.images).max() <= 1 / 255 + 1e-6  # coarse = plain generation, as uint8
    assert out.realigned == [True]
    assert [r.phrase for r in out.layouts[0].regions] == ["red book", "yellow vase"]
    assert [r.box for r in out.layouts[0].regions] == list(BOXES.values())
    guided = run(pipe, layout=Layout(out.layouts[0].regions))
    torch.testing.assert_close(out.images, guided.images, atol=2e-5, rtol=0)
    assert np.abs(out.images - plain.images).max() > 2e-4
    assert set(out.coarse_attention_maps[0]) == set(out.attention_maps[0]) >= {"red", "book"}


def test_without_a_kept_object_the_coarse_image_is_returned(loaded):
    pipe = with_captioner(loaded, DenseCaptioner(WordTagger(), LookupLLM(), BoxGrounder({})))
    out = run(pipe, realign=True)
    assert out.realigned == [False]
    assert np.array_equal(out.images, run(pipe).images)
    # the captioner's record is kept: what it tagged and why nothing was grounded
    (layout,) = out.layouts
    assert len(layout) == 0 and layout.prompt == PROMPT
    assert layout.source["ungrounded_phrases"] == ["red book", "yellow vase"]
    assert layout.source["llm"]["backend"] == "lookup"
    images, flags = run(pipe, realign=True, return_dict=False)
    assert flags is None and np.array_equal(images, out.images)


def test_batches_get_one_layout_per_image_and_user_layouts_win(pipe):
    prompts = [PROMPT, "a cat on a mat"]
    user = Layout([Region("cat", box=[0.25, 0.25, 0.75, 0.75])])
    out = run(pipe, prompts, num_images_per_prompt=2, realign=True, layout=[None, user])
    # one call per image (the progress bar moves per image); the user's layout is not re-captioned
    assert pipe.dense_captioner.tagger.calls == [[PROMPT], [PROMPT]]
    assert out.realigned == [True, True, True, True]
    assert [r.phrase for r in out.layouts[3].regions] == ["cat"]
    assert len(out.images) == len(out.coarse_images) == 4


def test_realign_needs_a_captioner_and_a_prompt(tiny_sd_dir, pipe):
    bare = RealignDiffPipeline.from_pretrained(tiny_sd_dir, safety_checker=None)
    assert bare.dense_captioner is None
    with pytest.raises(ValueError, match="dense_captioner=DenseCaptioner"):
        run(bare, realign=True)
    with pytest.raises(ValueError, match="dense_captioner=DenseCaptioner"):
        bare.check_inputs(PROMPT, 64, 64, None, realign=True)
    embeds, negative = pipe.encode_prompt(PROMPT, "cpu", 1, True)
    with pytest.raises(ValueError, match="prompt text"):
        pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, realign=True)
    with pytest.raises(ValueError, match="prompt text"):
        pipe.check_inputs(None, 64, 64, None, prompt_embeds=embeds, realign=True)


@pytest.mark.parametrize("output_type", ["pil", "pt", "latent"])
def test_output_types(pipe, output_type):
    out = run(pipe, realign=True, output_type=output_type)
    assert out.realigned == [True] and len(out.coarse_images) == 1
    if output_type == "pil":
        assert isinstance(out.images[0], PIL.Image.Image)
    else:
        assert out.images.shape[0] == 1


def test_save_and_load_keep_the_captioner_settings(pipe, tmp_path):
    pipe.dense_captioner = DenseCaptioner(WordTagger(extra="lamp"), LookupLLM("v2"), BoxGrounder())
    pipe.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "dense_captioner" / "dense_captioner.json").read_text())
    assert saved["llm"]["config"] == {"model": "v2"}
    loaded = RealignDiffPipeline.from_pretrained(tmp_path, safety_checker=None)
    assert isinstance(loaded.dense_captioner, DenseCaptioner)
    assert loaded.dense_captioner.tagger.extra == "lamp" and loaded.dense_captioner.llm.model == "v2"
    assert loaded.dense_captioner.grounder.boxes == pipe.dense_captioner.grounder.boxes
    without = RealignDiffPipeline.from_pretrained(tmp_path, safety_checker=None, dense_captioner=None)
    assert without.dense_captioner is None


def test_from_pipe_keeps_the_captioner(pipe):
    assert RealignDiffPipeline.from_pipe(pipe).dense_captioner is pipe.dense_captioner
    other = captioner(extra="lamp")
    assert RealignDiffPipeline.from_pipe(pipe, dense_captioner=other).dense_captioner is other


def test_regions_carry_their_provenance_and_defaults_are_the_papers_parts():
    layout = captioner()([PIL.Image.new("RGB", (32, 32))], [PROMPT])[0]
    for region in layout:
        assert region.source["llm"] == {"backend": "lookup", "fallback": False, "raw": None}
        assert region.source["tagger"] == "WordTagger" and region.source["grounder"] == "BoxGrounder"
    from realign_pipeline.captioner import ClipTagger, GroundingDinoSamGrounder, RuleBasedLLM

    default = DenseCaptioner()  # nothing is loaded until the first image
    assert isinstance(default.tagger, ClipTagger) and isinstance(default.llm, RuleBasedLLM)
    assert isinstance(default.grounder, GroundingDinoSamGrounder)
    assert default.to_config()["grounder"]["config"]["detector"] == "IDEA-Research/grounding-dino-tiny"


def test_captioning_has_its_own_progress_bar(pipe, capsys):
    pipe.set_progress_bar_config(disable=False)
    try:
        run(pipe, [PROMPT, PROMPT], realign=True)
    finally:
        pipe.set_progress_bar_config(disable=True)
    err = capsys.readouterr().err
    assert "dense captioning" in err and "2/2" in err


def test_an_outputs_layout_can_be_fed_back(pipe):
    out = run(pipe, realign=True)
    again = run(pipe, layout=out.layouts[0])
    torch.testing.assert_close(out.images, again.images, atol=2e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------- the same noise
def _runnable_schedulers(scheduler) -> list[type]:
    """Every compatible scheduler whose optional dependency is installed (LMS needs scipy, DPM-SDE torchsde)."""
    from diffusers.utils import is_scipy_available, is_torchsde_available

    missing = {"LMSDiscreteScheduler": not is_scipy_available(), "DPMSolverSDEScheduler": not is_torchsde_available()}
    return sorted((c for c in scheduler.compatibles if not missing.get(c.__name__)), key=lambda c: c.__name__)


def _recording_latents(pipeline):
    """Record what `prepare_latents` is given and returns, per pass."""
    calls = []
    original = pipeline.prepare_latents

    def prepare_latents(*args, **kwargs):
        given = args[-1] if len(args) == 8 else kwargs.get("latents")
        out = original(*args, **kwargs)
        calls.append((None if given is None else given.clone(), out.clone()))
        return out

    pipeline.prepare_latents = prepare_latents
    return calls


def test_every_scheduler_gets_the_noise_once_scaled_and_the_fine_pass_the_coarse_passs_latents(pipe):
    default = pipe.scheduler
    names = []
    for scheduler_cls in _runnable_schedulers(default):
        pipe.scheduler = scheduler_cls.from_config(default.config)
        names.append(scheduler_cls.__name__)
        calls = _recording_latents(pipe)
        prompts = [PROMPT, "a cat on a mat"]  # the captioner keeps the first image's objects, nothing of the second
        # guidance off and few steps keep the sweep cheap; PNDM's Runge-Kutta warm-up needs 4 steps
        settings = {"num_inference_steps": 4 if names[-1] == "PNDMScheduler" else 2, "guidance_scale": 1.0}
        plain = run(pipe, prompts, **settings)
        out = run(pipe, prompts, realign=True, **settings)
        del pipe.prepare_latents
        assert out.realigned == [True, False], names[-1]
        # the image the captioner kept nothing of is exactly the plain image
        assert np.array_equal(out.images[1], plain.images[1]), names[-1]
        coarse = np.asarray(out.coarse_images[0], dtype=np.float32) / 255
        assert np.abs(coarse - plain.images[0]).max() <= 1 / 255 + 1e-6, names[-1]
        (_, plain_start), (coarse_given, coarse_start), (fine_given, fine_start) = calls
        # both passes start from the plain call's initial latents: unscaled noise in, scaled once by the scheduler
        assert torch.equal(coarse_given, fine_given), names[-1]
        assert torch.equal(coarse_start, plain_start) and torch.equal(fine_start, plain_start), names[-1]
        sigma = float(pipe.scheduler.init_noise_sigma)
        assert torch.allclose(coarse_start, coarse_given * sigma), names[-1]
    # both kinds of scheduler were exercised: unit noise and sigma > 1, deterministic and ancestral
    assert {"DDIMScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler"} <= set(names)


@pytest.fixture()
def ancestral_pipe(pipe):
    from diffusers import EulerAncestralDiscreteScheduler

    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    return pipe


def test_a_fine_pass_that_modulates_nothing_replays_the_coarse_image_with_a_stochastic_sampler(
    ancestral_pipe, monkeypatch
):
    from realign_pipeline.attention import RealignAttnProcessor

    explicit_calls = []
    original = RealignAttnProcessor._explicit_attention
    monkeypatch.setattr(
        RealignAttnProcessor,
        "_explicit_attention",
        lambda self, *a, **k: explicit_calls.append(1) or original(self, *a, **k),
    )
    off = Layout([Region(phrase, box=box, score=0.0) for phrase, box in BOXES.items()])
    generator = torch.Generator().manual_seed(3)
    out = ancestral_pipe(PROMPT, num_inference_steps=4, generator=generator, output_type="pt", realign=True, layout=off)
    plain = ancestral_pipe(PROMPT, num_inference_steps=4, generator=torch.Generator().manual_seed(3), output_type="pt")
    assert out.realigned == [True]
    assert torch.equal(out.images, plain.images)  # bit for bit: same initial latents, same per-step noise
    assert explicit_calls == []  # score-0 regions never leave the SDPA path
    # the caller's generator advanced as by one plain call
    reference = torch.Generator().manual_seed(3)
    ancestral_pipe(PROMPT, num_inference_steps=4, generator=reference, output_type="pt")
    assert torch.equal(generator.get_state(), reference.get_state())


def test_the_fine_pass_replays_a_list_of_generators_and_the_global_generator(ancestral_pipe):
    off = Layout([Region("red book", box=BOXES["red book"], score=0.0)])
    prompts = [PROMPT, PROMPT]
    generators = [torch.Generator().manual_seed(s) for s in (1, 2)]
    out = ancestral_pipe(prompts, num_inference_steps=4, generator=generators, output_type="pt", realign=True, layout=off)
    plain = ancestral_pipe(
        prompts, num_inference_steps=4, generator=[torch.Generator().manual_seed(s) for s in (1, 2)], output_type="pt"
    )
    assert torch.equal(out.images, plain.images)
    torch.manual_seed(5)
    out = ancestral_pipe(PROMPT, num_inference_steps=4, output_type="pt", realign=True, layout=off)
    torch.manual_seed(5)
    plain = ancestral_pipe(PROMPT, num_inference_steps=4, output_type="pt")
    assert torch.equal(out.images, plain.images)


def test_a_modulated_fine_pass_differs_from_the_coarse_image_only_by_the_modulation(ancestral_pipe):
    # with an ancestral sampler, regions of score 2 change the image; the same call twice gives the same image
    first = run(ancestral_pipe, realign=True, seed=4, output_type="pt")
    second = run(ancestral_pipe, realign=True, seed=4, output_type="pt")
    assert torch.equal(first.images, second.images)
    guided = run(ancestral_pipe, seed=4, output_type="pt", layout=Layout(first.layouts[0].regions))
    torch.testing.assert_close(first.images, guided.images, atol=2e-5, rtol=0)


# ---------------------------------------------------------------------------------------------- outputs and callbacks
class FlaggingSafetyChecker(torch.nn.Module):
    """Flags every second image and leaves pixels alone: enough to tell the flags' position in a tuple."""

    device = torch.device("cpu")  # read by DiffusionPipeline.device
    dtype = torch.float32

    def forward(self, images, clip_input):
        return images, [i % 2 == 1 for i in range(len(images))]


def test_return_dict_false_is_images_then_flags_on_every_path(pipe):
    from transformers import CLIPImageProcessor

    for realign in (False, True):
        images, flags = run(pipe, realign=realign, return_dict=False)
        assert isinstance(images, np.ndarray) and flags is None
        images, flags, maps = run(pipe, realign=realign, return_dict=False, return_attention_maps=True)
        assert flags is None and isinstance(maps, list) and "book" in maps[0]
    pipe.safety_checker = FlaggingSafetyChecker()
    pipe.feature_extractor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    for realign in (False, True):
        images, flags = run(pipe, [PROMPT, PROMPT], realign=realign, return_dict=False)
        assert len(images) == 2 and flags == [False, True]
        out = run(pipe, [PROMPT, PROMPT], realign=realign)
        assert out.nsfw_content_detected == [False, True]


def test_callbacks_fire_in_both_passes_and_know_which(pipe):
    seen = []

    def on_step_end(pipeline, step, timestep, tensors):
        seen.append((pipeline.realign_stage, step))
        return tensors

    run(pipe, realign=True, callback_on_step_end=on_step_end)
    assert seen == [("coarse", 0), ("coarse", 1), ("coarse", 2), ("fine", 0), ("fine", 1), ("fine", 2)]
    assert pipe.realign_stage is None
    seen.clear()
    run(pipe, callback_on_step_end=on_step_end)
    assert seen == [(None, 0), (None, 1), (None, 2)]


def test_the_legacy_callback_fires_in_both_passes_and_warns_once(pipe):
    seen = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(pipe, realign=True, callback=lambda step, t, latents: seen.append((pipe.realign_stage, step)),
            callback_steps=1)
    deprecations = [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]
    assert len(deprecations) == 2  # `callback` and `callback_steps`, once each, not once per pass
    assert seen == [("coarse", 0), ("coarse", 1), ("coarse", 2), ("fine", 0), ("fine", 1), ("fine", 2)]


def test_the_stage_is_reset_when_a_pass_raises(pipe):
    def fail(pipeline, step, timestep, tensors):
        raise RuntimeError("stop here")

    with pytest.raises(RuntimeError, match="stop here"):
        run(pipe, realign=True, callback_on_step_end=fail)
    assert pipe.realign_stage is None


def test_each_pass_gets_every_argument_of_call_but_realign(pipe, monkeypatch):
    import inspect

    seen = {}
    monkeypatch.setattr(pipe, "_realign_call", lambda pass_args: seen.update(pass_args) or "passes")
    assert run(pipe, realign=True, guidance_scale=3.0) == "passes"
    expected = set(inspect.signature(RealignDiffPipeline.__call__).parameters) - {"self", "kwargs", "realign"}
    assert set(seen) == expected | {"callback", "callback_steps"}  # the legacy callbacks come in **kwargs
    # checked and filled in: the size from the UNet, the default tensor inputs
    assert (seen["height"], seen["width"]) == (pipe.unet.config.sample_size * pipe.vae_scale_factor,) * 2
    assert seen["callback_on_step_end_tensor_inputs"] == ["latents"] and seen["guidance_scale"] == 3.0
