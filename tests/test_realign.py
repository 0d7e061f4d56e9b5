"""DenseCaptioner assembly and the two-stage `realign=True` path, with small deterministic backends.

The real backends (CLIP tagger, LLMs, Grounding DINO + SAM) have their own tests; here the backends are
simple classes that follow the protocols, so the pipeline's control flow can be checked exactly.
"""

import json

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import StableDiffusionPipeline

from realign_pipeline import Layout, RealignDiffPipeline, Region
from realign_pipeline.captioner.base import Detection, LLMResult, ObjectJudgement
from realign_pipeline.captioner.dense import DenseCaptioner
from realign_pipeline.testing import tiny_pipeline

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

    def ground(self, image, phrases):
        width, height = image.size
        out = []
        for phrase in phrases:
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
def saved_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("sd1")
    tiny_pipeline(StableDiffusionPipeline, save_dir=path)
    return path


@pytest.fixture()
def pipe(saved_dir):
    pipe = RealignDiffPipeline.from_pretrained(saved_dir, safety_checker=None, dense_captioner=captioner())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipeline, prompt=PROMPT, seed=0, **kwargs):
    kwargs.setdefault("output_type", "np")
    return pipeline(prompt, num_inference_steps=3, generator=torch.Generator().manual_seed(seed), **kwargs)


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


def test_without_a_kept_object_the_coarse_image_is_returned(saved_dir):
    pipe = RealignDiffPipeline.from_pretrained(
        saved_dir, safety_checker=None, dense_captioner=DenseCaptioner(WordTagger(), LookupLLM(), BoxGrounder({}))
    )
    pipe.set_progress_bar_config(disable=True)
    out = run(pipe, realign=True)
    assert out.realigned == [False] and out.layouts == [None]
    assert np.array_equal(out.images, run(pipe).images)


def test_batches_get_one_layout_per_image_and_user_layouts_win(pipe):
    prompts = [PROMPT, "a cat on a mat"]
    user = Layout([Region("cat", box=[0.25, 0.25, 0.75, 0.75])])
    out = run(pipe, prompts, num_images_per_prompt=2, realign=True, layout=[None, user])
    # one call per image (the progress bar moves per image); the user's layout is not re-captioned
    assert pipe.dense_captioner.tagger.calls == [[PROMPT], [PROMPT]]
    assert out.realigned == [True, True, True, True]
    assert [r.phrase for r in out.layouts[3].regions] == ["cat"]
    assert len(out.images) == len(out.coarse_images) == 4


def test_realign_needs_a_captioner_and_a_prompt(saved_dir, pipe):
    bare = RealignDiffPipeline.from_pretrained(saved_dir, safety_checker=None)
    assert bare.dense_captioner is None
    with pytest.raises(ValueError, match="dense_captioner=DenseCaptioner"):
        run(bare, realign=True)
    embeds, negative = pipe.encode_prompt(PROMPT, "cpu", 1, True)
    with pytest.raises(ValueError, match="prompt text"):
        pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, realign=True)


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
