"""The shapes-world alignment metric: object presence, attribute binding and position, judged by the independent
checker (:func:`realign_pipeline.shapes.checker.check_prompt`) on prompts parsed back into objects.

    metric = ShapesAlignmentScore()
    metric.update(images, ["a red circle to the left of a blue square", ...])   # one prompt per image
    metric.compute()   # {"metric": "shapes", "count", "mean", "std", "presence": {...}, "binding": {...}, ...}

Per image (``metric.scores[field]``, in update order): ``presence`` (every prompted shape found, any colour),
``binding`` (every prompted (colour, shape) pair found), ``binding_fraction`` (the share found) and ``position``
(the object named "left" is left of the one named "right"; ``None`` for prompts that name no side). Each field's
summary is its mean over the images that have it, ``n``, and a seeded 95% percentile-bootstrap CI.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import numpy as np
import PIL.Image
import torch

from ..evaluation.metrics import Metric
from ..evaluation.statistics import summarize
from .checker import check_prompt
from .triples import TRIPLE_FORMS
from .world import CAPTION_FORMS, COLORS, SHAPES

__all__ = ["FIELDS", "ShapesAlignmentScore", "parse_shapes_prompt"]

#: The per-image numbers, the main one (``mean``) first.
FIELDS = ("binding", "presence", "binding_fraction", "position")


@lru_cache(maxsize=1)
def _patterns() -> list[tuple[str, re.Pattern[str]]]:
    """(template, regex) for every caption form of both scene kinds (two objects, three objects) and the
    single-object form; phrases are named groups."""
    colors = "|".join(sorted(COLORS, key=len, reverse=True))
    shapes = "|".join(sorted(SHAPES, key=len, reverse=True))

    def phrase(name: str) -> str:
        return rf"an?\s+(?P<{name}_color>{colors})\s+(?P<{name}_shape>{shapes})"

    out = []
    for template in [*CAPTION_FORMS.values(), *TRIPLE_FORMS.values()]:
        regex = re.escape(template).replace(r"\ ", r"\s+").replace(",", r"\s*,")
        # the templates write the article before each slot ("a {a}"): the phrase pattern brings its own
        for slot in ("a", "b", "c", "left", "right"):
            regex = regex.replace(rf"a\s+\{{{slot}\}}", phrase(slot))
        out.append((template, re.compile(rf"^\s*{regex}\s*\.?\s*$", re.IGNORECASE)))
    out.append(("a {a}", re.compile(rf"^\s*{phrase('a')}\s*\.?\s*$", re.IGNORECASE)))
    return out


def parse_shapes_prompt(prompt: str) -> list[dict[str, Any]]:
    """The objects a shapes-world caption names: ``[{"color", "shape", "side"}]`` in order of mention.

    Understands every form of :data:`~realign_pipeline.shapes.world.CAPTION_FORMS` ("a X and a Y", "a X with
    a Y", "a X to the left of a Y", "a X to the right of a Y"), of the three-object scenes'
    :data:`~realign_pipeline.shapes.triples.TRIPLE_FORMS` ("a X, a Y and a Z", ...) and single objects ("a X");
    case, extra spaces and a final period do not matter. ``side`` is ``"left"`` / ``"right"`` for the positional forms, else
    ``None``. Anything else raises ``ValueError``.
    """
    text = str(prompt)
    for template, pattern in _patterns():
        match = pattern.match(text)
        if match is None:
            continue
        groups = {k: v.lower() for k, v in match.groupdict().items()}
        slots = re.findall(r"\{(\w+)\}", template)  # order of mention
        side = {"left": "left", "right": "right"}
        return [
            {"color": groups[f"{s}_color"], "shape": groups[f"{s}_shape"], "side": side.get(s)} for s in slots
        ]
    examples = [t.format(a="red circle", b="blue square", left="red circle", right="blue square")
                for t in CAPTION_FORMS.values()]
    raise ValueError(
        f"not a shapes-world caption: {text!r}; expected 'a <color> <shape>' or one of {examples} "
        f"(colors {list(COLORS)}, shapes {list(SHAPES)})"
    )


def _as_pil(image: Any) -> PIL.Image.Image | np.ndarray:
    if isinstance(image, torch.Tensor):  # (C, H, W) in [-1, 1], as the other metrics take
        array = ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return PIL.Image.fromarray(array.permute(1, 2, 0).numpy())
    return image


class ShapesAlignmentScore(Metric):
    """Presence, binding, binding fraction and position of shapes-world images, with bootstrap CIs.

    A :class:`~realign_pipeline.evaluation.metrics.Metric` whose model is the world's checker; ``compute`` adds
    a bootstrap CI to every field, as the shapes tables report them.

    Args:
        n_resamples: bootstrap resamples of the CIs; confidence: the CI's level (0.95); seed: the bootstrap's
            seed (the same seed gives the same CI).
    """

    name = "shapes"
    fields = FIELDS

    def __init__(self, n_resamples: int = 2000, confidence: float = 0.95, seed: int = 0) -> None:
        self.n_resamples = int(n_resamples)
        self.confidence = float(confidence)
        self.seed = int(seed)
        self.objects: list[list[dict[str, Any]]] = []
        self.detected: list[list[dict[str, Any]]] = []
        super().__init__()

    @classmethod
    def from_pretrained(cls, id_or_path: str | None = None, device: Any = None, dtype: Any = None, **kwargs: Any):
        """The metric (it has no model: ``id_or_path`` must be ``None``; device / dtype are ignored)."""
        if id_or_path not in (None, "", "checker"):
            raise ValueError(f"the shapes metric uses no model (got {id_or_path!r}): it runs the shapes checker")
        return cls(**kwargs)

    def reset(self) -> None:
        """Forget every score."""
        super().reset()
        self.objects = []
        self.detected = []

    def model_info(self) -> dict[str, Any]:
        return {"model": None, "checker": "realign_pipeline.shapes.checker"}

    def _score(self, images: Any, prompts: list[str]) -> dict[str, list[float | None]]:
        """The checker's reading of each image (PIL image, array, or ``(C, H, W)`` tensor in ``[-1, 1]``);
        every prompt is parsed before any image is checked."""
        objects = [parse_shapes_prompt(p) for p in prompts]
        scores: dict[str, list[float | None]] = {f: [] for f in self.fields}
        for image, objs in zip(images, objects):
            result = check_prompt(_as_pil(image), objs)
            for f in self.fields:
                scores[f].append(result[f])
            self.objects.append(objs)
            self.detected.append(result["detected"])
        return scores

    def summary(self, field: str, groups: Sequence[Any] | None = None) -> dict[str, Any]:
        """``{"mean", "std", "n", "ci_low", "ci_high", "confidence"}`` of one field over the images that have
        it; ``groups`` (one label per image) resamples groups, e.g. prompts, instead of images."""
        return summarize(self.scores[field], groups=groups, n_resamples=self.n_resamples,
                         confidence=self.confidence, seed=self.seed)

    def compute(self, groups: Sequence[Any] | None = None) -> dict[str, Any]:
        """``{"metric", "model", "checker", "count", <field>: summary, "mean", "std"}``; ``mean`` / ``std`` are
        binding's. ``groups``: see :meth:`summary`."""
        result: dict[str, Any] = {"metric": self.name, **self.model_info(), "count": self.count}
        for f in self.fields:
            result[f] = self.summary(f, groups)
        result["mean"], result["std"] = result[self.fields[0]]["mean"], result[self.fields[0]]["std"]
        return result

    def __repr__(self) -> str:
        return f"{type(self).__name__}(count={self.count})"
