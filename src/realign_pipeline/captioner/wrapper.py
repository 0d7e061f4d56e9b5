"""`CaptionerWrapper`: one wrapper around a dense captioner, for what the evaluation adds to it (unit scores,
timing); everything else is the wrapped captioner's."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from ..layout import Layout

__all__ = ["CaptionerWrapper"]


class CaptionerWrapper:
    """Wraps a dense captioner (``captioner(images, prompts) -> layouts``).

    - ``score``: when set, every region of its layouts gets this score and the layout's ``source`` records it
      as ``"unit_scores"`` (DenseDiffusion's unit scores: ``score=1``); ``None`` keeps the layouts as they are.
    - ``started`` / ``ended``: ``time.perf_counter()`` at the start and end of the last call, so a realign call
      splits into coarse / caption / fine (``None`` before the first call).

    Any other attribute is read from the wrapped captioner.
    """

    def __init__(self, captioner: Any, score: float | None = None):
        self.captioner = captioner
        self.score = None if score is None else float(score)
        self.started: float | None = None
        self.ended: float | None = None

    def __call__(self, images: list, prompts: list[str]) -> list:
        self.started = time.perf_counter()
        try:
            layouts = self.captioner(images, prompts)
            if self.score is None:
                return layouts
            return [
                Layout(
                    [dataclasses.replace(region, score=self.score) for region in layout],
                    source={**(layout.source or {}), "unit_scores": self.score},
                )
                for layout in layouts
            ]
        finally:
            self.ended = time.perf_counter()

    def __getattr__(self, name: str) -> Any:
        if name == "captioner":  # not set yet (copy / unpickling)
            raise AttributeError(name)
        return getattr(self.captioner, name)
