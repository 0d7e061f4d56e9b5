"""The dense captioner (Sec. 3.2.2): tagger -> LLM (Eq. 6 scores, local phrases) -> grounder -> Layout.

Beyond the paper, ``DenseCaptioner(correct_relations=True)`` corrects a layout that violates a spatial
relation the prompt states (after SLD; :mod:`.relations`).

Backends import their heavy dependencies lazily, so importing this package is cheap.
"""

from .base import LLM, Detection, Grounder, LLMResult, ObjectJudgement, RelationFinder, RelationResult, Tagger
from .build import DEFAULT_CAPTIONER_SETTINGS, build_captioner, build_llm
from .dense import DenseCaptioner
from .grounding import GroundingDinoSamGrounder, SegmentAnythingAdapter, box_nms
from .llm import LLMAnswerError, OpenAIChat, TransformersChat, make_llm, validate_answer
from .llm_rules import RuleBasedLLM, prompt_objects, prompt_relations
from .relations import Relation, correct_layout, relation_holds
from .tagger import ClipTagger, RamTagger
from .wrapper import CaptionerWrapper

__all__ = [
    "DEFAULT_CAPTIONER_SETTINGS",
    "LLM",
    "CaptionerWrapper",
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
    "Relation",
    "RelationFinder",
    "RelationResult",
    "RuleBasedLLM",
    "SegmentAnythingAdapter",
    "Tagger",
    "TransformersChat",
    "box_nms",
    "build_captioner",
    "build_llm",
    "correct_layout",
    "make_llm",
    "prompt_objects",
    "prompt_relations",
    "relation_holds",
    "validate_answer",
]
