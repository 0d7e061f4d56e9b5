"""What the ``realigndiff`` commands share: the error and exit codes, argument types, layout loading, quiet
model loading, the job's progress bar, warnings turned into notes, file saving, torch threads, device choice
and the words of a layout.

The command modules import these from here rather than from each other, so that no command depends on another
(the shapes-world demo is the ``demo`` command's own second half).
"""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = [
    "DTYPES",
    "EXIT_FAILURE",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "LOAD_ERRORS",
    "PROG",
    "STOP_WORDS",
    "CLIError",
    "HelpFormatter",
    "collect_warnings",
    "device_and_dtype",
    "int_in",
    "job_bar",
    "layout_words",
    "load_error",
    "load_layout",
    "phrase_words",
    "quiet_loading",
    "save_file",
    "torch_threads",
]

PROG = "realigndiff"
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
#: The ``--dtype`` choices.
DTYPES = ("float32", "float16", "bfloat16")
#: Words left out of the default Figure 7 words (articles, prepositions, conjunctions).
STOP_WORDS = frozenset(
    ("a", "an", "the", "and", "or", "of", "on", "in", "at", "to", "with", "by", "for", "from", "its", "their",
     "his", "her", "this", "that", "these", "those", "is", "are")
)
#: What loading weights raises when they are missing, unreachable or unusable (see :func:`load_error`).
LOAD_ERRORS: tuple[type[BaseException], ...] = (OSError, ConnectionError, ValueError, ImportError)


class CLIError(Exception):
    """An error the user can act on: printed as ``realigndiff <command>: error: <message>``, no traceback."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILURE):
        super().__init__(message)
        self.exit_code = exit_code


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the epilog's examples as written and shows each option's default."""


def int_in(low: int, high: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer in ``[low, high]``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be between {low} and {high}, got {value}")
        return value

    return parse


def load_layout(path: str):
    """The layout of a ``--layout`` JSON file; a file that cannot be used is a usage error."""
    from ..layout import Layout, LayoutError

    try:
        layout = Layout.from_json(Path(path))
    except LayoutError as error:
        raise CLIError(f"--layout {path}: {error}", EXIT_USAGE) from None
    if not len(layout):
        raise CLIError(f"--layout {path}: the layout has no regions; add at least one.", EXIT_USAGE)
    return layout


@contextmanager
def quiet_loading() -> Iterator[None]:
    """Hide diffusers' and transformers' loading/saving progress bars (the denoising bars stay)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    states = []
    for module in (diffusers_logging, transformers_logging):
        states.append((module, module.is_progress_bar_enabled()))
        module.disable_progress_bar()
    try:
        yield
    finally:
        for module, enabled in states:
            if enabled:
                module.enable_progress_bar()


def job_bar(pipe: Any, total: int, quiet: bool, desc: str | None = None, unit: str = "image") -> Any:
    """One tqdm bar over a command's whole job (``total`` units), with `pipe`'s own per-call bars turned off.

    A job makes many pipeline calls (passes, seeds, a seed search); one bar per call scrolls the terminal. The
    bar is removed when closed (``leave=False``): the command prints its own summary line. ``quiet``: no bars.
    """
    from tqdm.auto import tqdm

    pipe.set_progress_bar_config(disable=True)
    return tqdm(total=total, desc=desc, unit=unit, disable=quiet, leave=False, dynamic_ncols=True)


@contextmanager
def collect_warnings(notes: list[str]) -> Iterator[None]:
    """Turn Python warnings (e.g. "phrase appended to the prompt") into plain notes printed by the demo."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for warning in caught:
        if issubclass(warning.category, (UserWarning, RuntimeWarning)) and str(warning.message) not in notes:
            notes.append(str(warning.message))


def phrase_words(tokenizer, prompt: str, token_indices: Sequence[int]) -> list[str]:
    """Keys of ``attention_maps`` (words of `prompt`, repeats as ``word#2``) whose tokens overlap `token_indices`."""
    from ..tokens import unique_word_keys, word_token_spans

    spans = word_token_spans(tokenizer, prompt)
    wanted = set(token_indices)
    return [key for key, span in zip(unique_word_keys(spans), spans) if wanted & set(span.token_indices)]


def save_file(save: Callable[[Path], Any], path: Path) -> Path:
    """``save(path)`` (e.g. ``image.save``), a failure to write being a :class:`CLIError`; returns `path`."""
    try:
        save(path)
    except OSError as error:
        raise CLIError(f"cannot write {path}: {error}") from None
    return path


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run with `threads` torch CPU threads (0: leave torch's setting), restoring the setting afterwards."""
    import torch

    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def device_and_dtype(args: argparse.Namespace):
    """``(device, torch dtype)`` from ``args.device`` / ``args.dtype``, with a clear error for what cannot run."""
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device_type = torch.device(device).type
    except (RuntimeError, ValueError):
        raise CLIError(f"--device {device}: not a torch device (try cuda, cuda:0 or cpu).", EXIT_USAGE) from None
    if device_type == "cuda" and not torch.cuda.is_available():
        raise CLIError(
            f"--device {device}: no CUDA GPU is visible; use --device cpu --dtype float32, expect minutes per image.",
            EXIT_USAGE,
        )
    dtype = args.dtype or ("float16" if device_type == "cuda" else "float32")
    if device_type == "cpu" and dtype == "float16":
        raise CLIError("--dtype float16 does not run on the CPU; use --dtype float32 (or a GPU).", EXIT_USAGE)
    return device, getattr(torch, dtype)


def load_error(what: str, name: str, error: BaseException, flag: str) -> CLIError:
    """A one-line, actionable message for weights that cannot be loaded."""
    if Path(name).exists():
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return CLIError(f"cannot load the {what} from {name}: {detail[:300]}", EXIT_USAGE)
    return CLIError(
        f"cannot load the {what} {name!r}: not in the Hugging Face cache and the Hub cannot be reached (offline?); "
        f"run with {flag} PATH (a downloaded folder) or log in (`hf auth login`) with network access.",
        EXIT_USAGE,
    )



def layout_words(tokenizer, resolved) -> list[str]:
    """Attention-map keys of every word of the layout's phrases (attributes and nouns; articles left out)."""
    words: list[str] = []
    for indices in resolved.token_indices:
        for word in phrase_words(tokenizer, resolved.prompt, indices):
            if word.split("#")[0].lower() not in STOP_WORDS and word not in words:
                words.append(word)
    return words
