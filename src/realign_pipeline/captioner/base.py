"""The parts of the dense captioner (Sec. 3.2.2 of the paper) as small protocols with plain data between them.

Tagger: what is in the image -> tags.  LLM: for each tag, a likelihood score (Eq. 6: 2 certain, 0.5 may,
0 unlikely) and the local phrase of the prompt that describes it (the paper's Table 4).  Grounder: a box and
a mask for each object, found by its noun (the tag) with the phrase attached.  ``DenseCaptioner`` chains them
into one ``Layout`` per image.

Beyond the paper, an LLM may also find the spatial relations a prompt states (``relations``, see
:class:`RelationFinder`), with which the captioner corrects a layout that violates them (after SLD,
:mod:`realign_pipeline.captioner.relations`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import PIL.Image

from .relations import Relation


@dataclass
class ObjectJudgement:
    """The LLM's verdict on one tag: its Eq. 6 score and its local phrase (words of the prompt), if any."""

    tag: str
    score: float
    phrase: str | None = None


@dataclass
class LLMResult:
    """What an LLM backend returns for one (prompt, tags) pair.

    `source` records provenance: ``{"backend": name, "model": ..., "fallback": bool, "reason": str | None,
    "raw": raw answer text or None, "attempts": int}``. It never contains an API key.
    """

    objects: list[ObjectJudgement]
    source: dict[str, Any] = field(default_factory=dict)


@dataclass
class RelationResult:
    """What ``relations(prompt, phrases)`` returns: the relations the prompt states between two of the phrases.

    `unresolved` lists relations the prompt states whose sides are not both phrases of the layout (e.g. the
    second object was not grounded), each ``{"words", "subject", "object", "reason"}``, so a caller can say why
    nothing was corrected. `source` is provenance as in :class:`LLMResult`.
    """

    relations: list[Relation]
    source: dict[str, Any] = field(default_factory=dict)
    unresolved: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Detection:
    """One grounded object: a box in fractions of the image [x0, y0, x1, y1], a boolean mask (H, W), a score."""

    box: tuple[float, float, float, float]
    mask: np.ndarray
    score: float


@runtime_checkable
class Tagger(Protocol):
    def tag(self, images: list[PIL.Image.Image], prompts: list[str]) -> list[list[str]]:
        """Tags per image (the prompt's own object words are added by the caller or the tagger)."""


@runtime_checkable
class LLM(Protocol):
    def judge(self, prompt: str, tags: list[str]) -> LLMResult:
        """Score each tag (Eq. 6) and find its local phrase in `prompt`."""


@runtime_checkable
class RelationFinder(Protocol):
    """An optional second method of an LLM (beyond the paper): the spatial relations a prompt states.

    ``RuleBasedLLM``, ``OpenAIChat`` and ``TransformersChat`` have it. The captioner's relation correction uses
    it when the LLM has it and the rule-based parser (``RuleBasedLLM().relations``) when it does not, so an LLM
    with ``judge`` only still works.
    """

    def relations(self, prompt: str, phrases: list[str]) -> RelationResult:
        """The relations ("left of", "right of", "above", "below") that `prompt` states between two `phrases`.

        `phrases` are the layout's phrases (words of the prompt, "red book"); each relation names its sides by
        them. "on top of" is read as "above", "under" as "below".
        """


@runtime_checkable
class Grounder(Protocol):
    def ground(
        self, image: PIL.Image.Image, nouns: list[str], phrases: list[str] | None = None
    ) -> list[Detection | None]:
        """One detection (or None when the object is not there) per noun.

        ``nouns[i]`` names the object to find (the tag: "square"); ``phrases[i]``, when given, is the prompt's
        local phrase for it ("blue square"). The object is found by the noun only: querying a detector with
        "blue square" finds the blue object, which is the binding error the fine stage exists to undo. The
        phrase's other words (:func:`phrase_attributes`) may only choose between objects of the same noun, and
        one object goes to at most one phrase; a noun with no object of its own stays None.
        """


# Words of a phrase that describe neither the object nor its attributes.
_FUNCTION_WORDS = frozenset({"a", "an", "the", "and", "of", "with", "some"})


def phrase_attributes(noun: str, phrase: str | None) -> list[str]:
    """The words of ``phrase`` that qualify ``noun``: lower-cased, without articles or the noun's own words.

    ``phrase_attributes("square", "a blue square") == ["blue"]``; a plural form of the noun ("cats" for
    "cat") counts as the noun. Grounders use these words only to choose between objects of the same noun.
    """
    if not phrase:
        return []
    noun_words = set(_words(noun))
    forms = noun_words | {w + "s" for w in noun_words} | {w + "es" for w in noun_words}
    out: list[str] = []
    for word in _words(phrase):
        if word not in forms and word not in _FUNCTION_WORDS and word not in out:
            out.append(word)
    return out


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+(?:[-'][a-z0-9]+)*", text.lower())


def assign_one_to_one(keys: Sequence[Sequence[tuple[float, float]]]) -> list[int | None]:
    """Give each phrase of one noun at most one object, and each object to at most one phrase.

    ``keys[p][o]`` is ``(attribute score, detection score)`` of object ``o`` for phrase ``p``: the object whose
    attribute words score higher wins, the detection score breaks what is left of the tie. Pairs are taken
    greedily from the best key down (earlier phrases and objects first on equal keys). Returns the object
    index per phrase, None for a phrase left without one.
    """
    pairs = sorted(
        ((p, o) for p, row in enumerate(keys) for o in range(len(row))),
        key=lambda pair: (-keys[pair[0]][pair[1]][0], -keys[pair[0]][pair[1]][1], pair[0], pair[1]),
    )
    chosen: list[int | None] = [None] * len(keys)
    taken: set[int] = set()
    for p, o in pairs:
        if chosen[p] is None and o not in taken:
            chosen[p] = o
            taken.add(o)
    return chosen
