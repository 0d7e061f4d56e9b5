"""The one captioner builder (captioner.build) and the one captioner wrapper (captioner.wrapper)."""

from __future__ import annotations

import pytest

from realign_pipeline import Layout, Region
from realign_pipeline.captioner import (
    DEFAULT_CAPTIONER_SETTINGS,
    CaptionerWrapper,
    RuleBasedLLM,
    build_captioner,
    build_llm,
)
from realign_pipeline.cli import generate as cli_generate
from realign_pipeline.evaluation import configs


def test_one_builder_for_the_cli_and_the_evaluation():
    assert configs.build_captioner is build_captioner
    assert configs.DEFAULT_CAPTIONER is DEFAULT_CAPTIONER_SETTINGS
    assert cli_generate.build_captioner is build_captioner
    assert (cli_generate.DEFAULT_TAGGER, cli_generate.DEFAULT_DETECTOR, cli_generate.DEFAULT_SEGMENTER) == (
        DEFAULT_CAPTIONER_SETTINGS["tagger_model"], DEFAULT_CAPTIONER_SETTINGS["detector"],
        DEFAULT_CAPTIONER_SETTINGS["segmenter"])


def test_build_llm_by_name():
    assert isinstance(build_llm(), RuleBasedLLM)
    with pytest.raises(ValueError, match="needs llm_model"):
        build_llm({"llm": "local"})
    with pytest.raises(ValueError, match="'rule', 'openai' or 'local'"):
        build_llm({"llm": "gpt"})


def test_a_missing_detector_goes_through_the_hook(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    seen = []

    def hook(part, setting, error):
        seen.append((part, setting, type(error)))
        return RuntimeError(f"{part}: set {setting}")

    with pytest.raises(RuntimeError, match=r"detector \(Grounding DINO\): set detector"):
        build_captioner({"detector": "nobody/not-a-cached-detector"}, device="cpu", on_load_error=hook)
    assert len(seen) == 1
    with pytest.raises(OSError):  # without a hook, the error itself
        build_captioner({"detector": "nobody/not-a-cached-detector"}, device="cpu")


class _Fixed:
    """A stand-in dense captioner with an attribute of its own."""

    correct_relations = True

    def __call__(self, images, prompts):
        return [Layout([Region("red book", box=[0.0, 0.2, 0.5, 1.0], score=2.0)], source={"n": 1}) for _ in images]


def test_wrapper_times_and_forwards_and_overrides_scores_only_when_asked():
    plain = CaptionerWrapper(_Fixed())
    assert plain.started is None and plain.ended is None and plain.correct_relations is True
    layout = plain([None], ["a red book"])[0]
    assert [r.score for r in layout] == [2.0] and layout.source == {"n": 1}
    assert plain.started is not None and plain.ended >= plain.started

    unit = CaptionerWrapper(_Fixed(), score=1)
    layout = unit([None], ["a red book"])[0]
    assert [r.score for r in layout] == [1.0] and layout.source == {"n": 1, "unit_scores": 1.0}
    assert unit.started is not None and unit.ended >= unit.started
