"""`lazy_model`: the one way a wrapper loads its model (or processor, tokenizer) on first use.

The CLIP scorer, the BLIP-2 rewards, the caption reward, the tagger and the grounders hold their models in a
private attribute (``_model``) that is ``None`` until the model is first used; a model handed to the
constructor is stored there and used as is.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

__all__ = ["lazy_model"]


class lazy_model:  # lower case: used as a decorator, like property
    """A read-only attribute built by the decorated method on first access and kept in ``_<name>``.

    The value lives in ``_<name>`` (``attr=`` names another attribute): while that is ``None`` (or unset),
    reading the attribute calls the method and stores what it returns; once set, it is returned as is. The
    method does any device/dtype placement itself.

        class Scorer:
            def __init__(self, model_id, model=None):
                self.model_id = model_id
                self._model = model  # None: loaded on first use

            @lazy_model
            def model(self):
                return CLIPModel.from_pretrained(self.model_id)

    ``@lazy_model(attr="_other")`` stores the value in ``_other``.
    """

    def __init__(self, load: Callable[[Any], Any] | None = None, *, attr: str | None = None) -> None:
        self.attr = attr
        self.name: str | None = None
        self.load: Callable[[Any], Any] | None = None
        if load is not None:
            self(load)

    def __call__(self, load: Callable[[Any], Any]) -> lazy_model:
        """``@lazy_model(attr=...)``: takes the loading method."""
        self.load = load
        functools.update_wrapper(self, load)
        return self

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name
        if self.attr is None:
            self.attr = f"_{name}"

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        value = getattr(obj, self.attr, None)
        if value is None:
            value = self.load(obj)
            setattr(obj, self.attr, value)
        return value

    def __set__(self, obj: Any, value: Any) -> None:
        raise AttributeError(f"{self.name!r} of {type(obj).__name__!r} is read-only (it loads on first use)")
