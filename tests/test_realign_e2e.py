"""`realign=True` end to end with the real backends on tiny random models (offline, through from_pretrained):
CLIP tagger, rule-based LLM or the real `openai` client against a local chat-completions server, Grounding
DINO + SAM."""

import json

import numpy as np
import pytest
import torch

from realign_pipeline import RealignDiffPipeline
from realign_pipeline.captioner.dense import DenseCaptioner
from realign_pipeline.captioner.grounding import GroundingDinoSamGrounder
from realign_pipeline.captioner.llm import OpenAIChat
from realign_pipeline.captioner.llm_rules import RuleBasedLLM
from realign_pipeline.captioner.tagger import ClipTagger

PROMPT = "a red book and a yellow vase"
SECRET = "sk-test-secret-never-written"


@pytest.fixture(scope="module")
def model_dirs(tiny_sd_dir, tiny_clip_dir, tiny_grounding_dino_dir, tiny_sam_dir):
    """The pipeline (through from_pretrained), the CLIP tagger and Grounding DINO + SAM, loaded once for the module:
    no test changes them; each test gets its own pipeline object around them with its own LLM (:func:`make_pipe`)."""
    pipe = RealignDiffPipeline.from_pretrained(tiny_sd_dir, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return {"pipe": pipe, "tagger": ClipTagger(str(tiny_clip_dir), tag_list=["book", "vase"], thresholds=0.0),
            "grounder": GroundingDinoSamGrounder(str(tiny_grounding_dino_dir), str(tiny_sam_dir), box_threshold=0.0,
                                                 text_threshold=0.0)}


def make_pipe(model_dirs, llm) -> RealignDiffPipeline:
    captioner = DenseCaptioner(model_dirs["tagger"], llm, model_dirs["grounder"])
    pipe = RealignDiffPipeline.from_pipe(model_dirs["pipe"], dense_captioner=captioner)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, **kwargs):
    return pipe(PROMPT, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np", **kwargs)


def test_realign_with_the_rule_based_llm(model_dirs):
    pipe = make_pipe(model_dirs, RuleBasedLLM())
    out = run(pipe, realign=True, return_attention_maps=True)
    assert out.realigned == [True]
    layout = out.layouts[0]
    assert {r.phrase for r in layout.regions} == {"red book", "yellow vase"}
    for region in layout.regions:
        assert region.score == 2.0 and region.mask.shape == (32, 32) and region.mask.max() == 1
        x0, y0, x1, y1 = region.box
        assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
    assert layout.source["llm"]["backend"] == "rule"
    assert np.abs(out.images - run(pipe).images).max() > 1e-4
    assert out.coarse_attention_maps is not None and out.attention_maps is not None


@pytest.mark.parametrize(
    "replies, fallback",
    [
        ([("ok", json.dumps({"objects": [
            {"tag": "book", "score": 2, "phrase": "red book"},
            {"tag": "vase", "score": 2, "phrase": "yellow vase"}]}))], False),
        ([("ok", "Sure! ```json\n" + json.dumps({"objects": [
            {"tag": "book", "score": 2, "phrase": "red book"}, {"tag": "vase", "score": 0.5, "phrase": None}]})
               + "\n```")], False),
        ([("ok", "not json at all")] * 3, True),
        ([("ok", json.dumps({"objects": [{"tag": "book", "score": 2, "phrase": "green apple"}]}))] * 3, True),
        ([("ok", json.dumps({"objects": [{"tag": "book", "score": 7, "phrase": "red book"},
                                         {"tag": "vase", "score": 2, "phrase": "yellow vase"}]}))] * 3, True),
        ([("ok", "")] * 3, True),
        ([("status", 500)] * 4, True),
        ([("status", 429)] * 4, True),
        ([("stall", 1.0)] * 2, True),
    ],
    ids=["valid", "code-fence", "invalid-json", "phrase-not-in-prompt", "score-out-of-range", "empty",
         "http-500", "http-429", "stalled"],
)
def test_realign_with_an_openai_compatible_server(model_dirs, chat_server, replies, fallback):
    chat_server.reply(*replies, then="{}")  # once the script has run out, an empty JSON object
    stalled = replies[0][0] == "stall"
    llm = OpenAIChat(model="test-model", base_url=chat_server.url, api_key=SECRET, timeout=0.3 if stalled else 2,
                     max_retries=1 if stalled else 3, backoff=0.0)
    out = run(make_pipe(model_dirs, llm), realign=True)
    layout = out.layouts[0]
    source = layout.source["llm"]
    assert source["backend"] == "openai" and source["fallback"] is fallback
    assert (source["reason"] is not None) is fallback
    assert out.realigned == [True] and "red book" in {r.phrase for r in layout.regions}
    assert SECRET not in json.dumps(layout.source)


def test_saved_pipeline_keeps_the_captioner_settings_but_no_secret(model_dirs, chat_server, tmp_path):
    llm = OpenAIChat(model="test-model", base_url=chat_server.url, api_key=SECRET)
    pipe = make_pipe(model_dirs, llm)
    pipe.save_pretrained(tmp_path)
    text = (tmp_path / "dense_captioner" / "dense_captioner.json").read_text()
    assert SECRET not in text
    assert not any(SECRET in p.read_text(errors="ignore") for p in tmp_path.rglob("*.json"))
    loaded = RealignDiffPipeline.from_pretrained(tmp_path, safety_checker=None)
    assert loaded.dense_captioner.to_config() == pipe.dense_captioner.to_config()
    assert loaded.dense_captioner.llm.base_url == chat_server.url
