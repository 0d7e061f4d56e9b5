"""The parts of the dense captioner (Sec. 3.2.2 of the paper) as small protocols with plain data between them.

Tagger: what is in the image -> tags.  LLM: for each tag, a likelihood score (Eq. 6: 2 certain, 0.5 may,
0 unlikely) and the local phrase of the prompt that describes it (the paper's Table 4).  Grounder: a box and
a mask for each phrase.  ``DenseCaptioner`` chains them into one ``Layout`` per image.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import PIL.Image


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
class Grounder(Protocol):
    def ground(self, image: PIL.Image.Image, phrases: list[str]) -> list[Detection | None]:
        """One detection (or None when nothing was found) per phrase."""
