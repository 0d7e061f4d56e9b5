"""``realigndiff``: the command line of realign-pipeline (the ``realigndiff`` console script is :func:`main`).

:mod:`.parser` builds the parser and dispatches to one module per command (:mod:`.demo` with
:mod:`.shapes_demo`, :mod:`.generate`, :mod:`.evaluate`); :mod:`.common` holds what they share.
"""

from .common import CLIError
from .parser import build_parser, main

__all__ = ["CLIError", "build_parser", "main"]
