"""The one lazy loader (realign_pipeline.lazy.lazy_model) and the wrappers built on it: nothing loads at
construction, and the first use loads (here: fails to load from an empty folder, offline, in no time)."""

from __future__ import annotations

import inspect

import pytest

from realign_pipeline.captioner import ClipTagger, GroundingDinoSamGrounder
from realign_pipeline.captioner.grounding import TransformersSam
from realign_pipeline.evaluation.metrics import BlipItmScore
from realign_pipeline.lazy import lazy_model
from realign_pipeline.rewards import BlipItmReward, CaptionReward
from realign_pipeline.scoring import ClipScorer


class _Holder:
    def __init__(self, model=None):
        self.calls = 0
        self._model = model

    @lazy_model
    def model(self):
        """The model."""
        self.calls += 1
        return f"loaded {self.calls}"

    @lazy_model(attr="_kept_here")
    def other(self):
        return "other"


def test_lazy_model_loads_once_on_first_access():
    holder = _Holder()
    assert holder.calls == 0 and holder._model is None
    assert holder.model == "loaded 1" and holder.model == "loaded 1" and holder.calls == 1
    assert holder._model == "loaded 1"
    assert _Holder(model="given").model == "given"  # a value handed over is used as is
    assert holder.other == "other" and holder._kept_here == "other"
    assert _Holder.model.__doc__ == "The model."
    with pytest.raises(AttributeError, match="read-only"):
        holder.model = "replaced"


def _lazy_names(obj) -> list[str]:
    return [name for name, value in inspect.getmembers(type(obj)) if isinstance(value, lazy_model)]


WRAPPERS = {
    "ClipScorer": (lambda d: ClipScorer(d), ["model", "processor"]),
    "ClipTagger": (lambda d: ClipTagger(d).scorer, ["model", "processor"]),
    "BlipItmReward": (lambda d: BlipItmReward(d), ["model", "processor"]),
    "BlipItmScore": (lambda d: BlipItmScore(BlipItmReward(d)), ["itc"]),
    "CaptionReward": (lambda d: CaptionReward(d, d),
                      ["captioner_model", "captioner_processor", "text_model", "text_tokenizer"]),
    "GroundingDinoSamGrounder": (lambda d: GroundingDinoSamGrounder(d, d), ["model", "processor"]),
    "its TransformersSam": (lambda d: GroundingDinoSamGrounder(d, d).segmenter, ["model", "processor"]),
    "TransformersSam": (lambda d: TransformersSam(d), ["model", "processor"]),
}


@pytest.mark.parametrize("name", list(WRAPPERS))
def test_wrappers_load_their_models_on_first_use_not_at_construction(name, tmp_path):
    factory, used = WRAPPERS[name]
    wrapper = factory(str(tmp_path))  # an empty folder: loading anything from it fails
    lazy = _lazy_names(wrapper)
    assert lazy, f"{name} has no lazy_model attribute"
    for attr in lazy:
        descriptor = inspect.getattr_static(wrapper, attr)
        assert getattr(wrapper, descriptor.attr, None) is None, f"{name}.{attr} was loaded at construction"
    for attr in used:
        with pytest.raises((OSError, ValueError)):
            getattr(wrapper, attr)
