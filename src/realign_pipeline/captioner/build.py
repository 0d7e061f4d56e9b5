"""The one way to build a dense captioner from settings (CLIP tagger -> LLM -> Grounding DINO + SAM).

``realigndiff generate`` (its ``--tagger-model``, ``--llm``, ... flags) and the evaluation's configurations (their
``captioner`` settings) both build through :func:`build_captioner`; :data:`DEFAULT_CAPTIONER_SETTINGS` names every
setting and its default.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from .dense import DenseCaptioner
from .grounding import GroundingDinoSamGrounder
from .llm import make_llm
from .llm_rules import RuleBasedLLM
from .tagger import ClipTagger

__all__ = ["DEFAULT_CAPTIONER_SETTINGS", "LoadErrorHook", "build_captioner", "build_llm"]

#: Every setting of :func:`build_captioner` with its default (the fine stage's captioner of the paper's setup).
DEFAULT_CAPTIONER_SETTINGS: dict[str, Any] = {
    "tagger_model": "openai/clip-vit-large-patch14",
    "tag_threshold": None,
    "llm": "rule",
    "llm_model": None,
    "llm_base_url": None,
    "detector": "IDEA-Research/grounding-dino-tiny",
    "segmenter": "facebook/sam-vit-base",
    "box_threshold": 0.35,
    "text_threshold": 0.25,
}

#: ``hook(part, setting, error)``: called when the model of ``part`` (e.g. ``"tagger (CLIP)"``), named by the
#: setting ``setting`` (e.g. ``"tagger_model"``), fails to load; an exception it returns is raised instead
#: (``from None``), ``None`` re-raises ``error``.
LoadErrorHook = Callable[[str, str, BaseException], "BaseException | None"]


@contextmanager
def _loading(part: str, setting: str, on_load_error: LoadErrorHook | None) -> Iterator[None]:
    try:
        yield
    except Exception as error:
        replacement = on_load_error(part, setting, error) if on_load_error is not None else None
        if replacement is None:
            raise
        raise replacement from None


def _settings(settings: dict[str, Any] | None) -> dict[str, Any]:
    return {**DEFAULT_CAPTIONER_SETTINGS, **(settings or {})}


def build_llm(settings: dict[str, Any] | None = None, *, on_load_error: LoadErrorHook | None = None):
    """The LLM of ``settings["llm"]``: ``"rule"`` (:class:`RuleBasedLLM`), ``"openai"`` (with ``llm_model``,
    ``llm_base_url``) or ``"local"`` (``llm_model``: a chat model's hub id or folder)."""
    spec = _settings(settings)
    if spec["llm"] == "rule":
        return RuleBasedLLM()
    if spec["llm"] == "openai":
        kwargs = {"base_url": spec["llm_base_url"]}
        if spec["llm_model"]:
            kwargs["model"] = spec["llm_model"]
        return make_llm("openai", **kwargs)
    if spec["llm"] == "local":
        if not spec["llm_model"]:
            raise ValueError("captioner llm 'local' needs llm_model (a chat model's hub id or folder).")
        with _loading("local LLM", "llm_model", on_load_error):
            return make_llm("local", model_id_or_path=spec["llm_model"], device=None)
    raise ValueError(f"captioner llm must be 'rule', 'openai' or 'local', got {spec['llm']!r}.")


def build_captioner(
    settings: dict[str, Any] | None = None,
    device: str | None = None,
    *,
    on_load_error: LoadErrorHook | None = None,
) -> DenseCaptioner:
    """A :class:`DenseCaptioner` from :data:`DEFAULT_CAPTIONER_SETTINGS`-style settings (missing keys take the
    defaults). Grounding DINO and SAM are loaded now, so a missing detector or segmenter fails before any image
    is generated; the tagger's CLIP model loads on the first image (:class:`ClipTagger` is lazy).

    ``on_load_error`` (see :data:`LoadErrorHook`) lets a caller replace a part's loading error, as the CLI does
    with its one-line messages.
    """
    spec = _settings(settings)
    llm = build_llm(spec, on_load_error=on_load_error)
    tagger_kwargs = {} if spec["tag_threshold"] is None else {"thresholds": spec["tag_threshold"]}
    with _loading("tagger (CLIP)", "tagger_model", on_load_error):
        tagger = ClipTagger(spec["tagger_model"], device=device, **tagger_kwargs)
    grounder = GroundingDinoSamGrounder(
        spec["detector"], spec["segmenter"], box_threshold=spec["box_threshold"],
        text_threshold=spec["text_threshold"], device=device,
    )
    with _loading("detector (Grounding DINO)", "detector", on_load_error):
        grounder.load()
    if hasattr(grounder.segmenter, "load"):
        with _loading("segmenter (SAM)", "segmenter", on_load_error):
            grounder.segmenter.load()
    return DenseCaptioner(tagger, llm, grounder)
