"""The ``realigndiff`` parser and entry point.

One module per command (:mod:`.demo`, :mod:`.generate`, :mod:`.evaluate`), each with ``add_parser`` and its
``cmd_<name>`` functions; :func:`main` parses, dispatches, and turns :class:`~.common.CLIError` into a one-line
message and an exit code (never a traceback).

Exit codes: 0 success, 1 a failure while running (e.g. a file cannot be written), 2 bad usage or input (argparse
errors, a layout file that cannot be used), 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .. import __version__
from . import demo, evaluate, generate
from .common import EXIT_INTERRUPTED, EXIT_USAGE, PROG, CLIError, HelpFormatter

TOP_EPILOG = f"""\
examples:
  {PROG} demo                            the trained shapes world, before/after re-alignment: outputs/demo/
  {PROG} demo --tiny --steps 5 --out /tmp/demo   tiny random model (noise images): the code path only
  {PROG} demo --help                     the demo's options
  {PROG} generate "a red book and a yellow vase"            Stable Diffusion v1.5 + re-alignment (GPU)
  {PROG} generate --help                 the generate options
  {PROG} evaluate generate --config sd15 --prompts cc500 --out outputs/eval/sd15   images for Table 1
  {PROG} evaluate run --configs sd15,realign --prompts cc500 --metrics clip --out outputs/eval/cc500   a table
  {PROG} evaluate --help                 generation, scoring, report, human study
"""


def build_parser() -> argparse.ArgumentParser:
    """The ``realigndiff`` parser: one subparser per subcommand."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="RealignDiff for diffusers: layout-guided attention modulation for Stable Diffusion.",
        epilog=TOP_EPILOG,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    demo.add_parser(subparsers)
    generate.add_parser(subparsers)
    evaluate.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``realigndiff`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return args.func(args)
    except CLIError as error:
        print(f"{PROG} {args.command}: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
