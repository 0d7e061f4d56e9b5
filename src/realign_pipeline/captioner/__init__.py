"""The dense captioner (Sec. 3.2.2): tagger -> LLM (Eq. 6 scores, local phrases) -> grounder -> Layout.

Backends import their heavy dependencies lazily, so importing this package is cheap.
"""

from .base import LLM, Detection, Grounder, LLMResult, ObjectJudgement, Tagger
from .dense import DenseCaptioner
from .grounding import GroundingDinoSamGrounder, SegmentAnythingAdapter, box_nms
from .llm import LLMAnswerError, OpenAIChat, TransformersChat, make_llm, validate_answer
from .llm_rules import RuleBasedLLM, prompt_objects
from .tagger import ClipTagger, RamTagger

__all__ = [
    "LLM",
    "ClipTagger",
    "DenseCaptioner",
    "Detection",
    "Grounder",
    "GroundingDinoSamGrounder",
    "LLMAnswerError",
    "LLMResult",
    "ObjectJudgement",
    "OpenAIChat",
    "RamTagger",
    "RuleBasedLLM",
    "SegmentAnythingAdapter",
    "Tagger",
    "TransformersChat",
    "box_nms",
    "make_llm",
    "prompt_objects",
    "validate_answer",
]
