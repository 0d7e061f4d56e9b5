"""``realigndiff``: the command line of realign-pipeline.

One function per subcommand (``cmd_<name>``), each registered by ``_add_<name>_parser``; :func:`main` parses,
dispatches, and turns :class:`CLIError` into a one-line message and an exit code (never a traceback).

Exit codes: 0 success, 1 a failure while running (e.g. a file cannot be written), 2 bad usage or input (argparse
errors, a layout file that cannot be used), 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from . import __version__

PROG = "realigndiff"
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

DEMO_PROMPT = "a red book and a yellow vase"
#: The built-in demo layout: the book in the left half, the vase in the right half (image fractions).
DEMO_REGIONS: tuple[tuple[str, list[float]], ...] = (
    ("red book", [0.05, 0.35, 0.45, 0.95]),
    ("yellow vase", [0.55, 0.15, 0.95, 0.95]),
)
MAX_DEMO_SIDE = 256


class CLIError(Exception):
    """An error the user can act on: printed as ``realigndiff <command>: error: <message>``, no traceback."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILURE):
        super().__init__(message)
        self.exit_code = exit_code


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the epilog's examples as written and shows each option's default."""


# ----------------------------------------------------------------------------------------------------------
# Argument types
# ----------------------------------------------------------------------------------------------------------
def _int_in(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be between {low} and {high}, got {value}")
        return value

    return parse


def _image_side(text: str) -> int:
    value = _int_in(8, MAX_DEMO_SIDE)(text)
    if value % 8:
        raise argparse.ArgumentTypeError(f"must be a multiple of 8 (Stable Diffusion's rule), got {value}")
    return value


# ----------------------------------------------------------------------------------------------------------
# Parser
# ----------------------------------------------------------------------------------------------------------
TOP_EPILOG = f"""\
examples:
  {PROG} demo                            tiny random model, offline: writes outputs/demo/
  {PROG} demo --steps 5 --out /tmp/demo  quicker
  {PROG} demo --help                     the demo's options
"""

DEMO_DESCRIPTION = """\
Run RealignDiff's layout-guided generation end to end on a tiny RANDOM Stable Diffusion model, offline.

The images are noise (random weights); what the demo shows is the code path: a layout (phrase -> region)
drives Eq. 8 cross-attention modulation, and the cross-attention maps of the phrase words move into their
regions. The same seed is generated twice, plain and layout-guided, and the demo writes:

  plain.png, realigned.png  the two images
  layout.json               the layout used (realign-layout JSON, reusable with --layout)
  layout.png                the layout's regions drawn over the realigned image
  attention_maps.png        per phrase word: its attention map plain | realigned | difference
  summary.json              per phrase: share of its attention inside its region, plain vs realigned
"""

DEMO_EPILOG = f"""\
examples:
  {PROG} demo
  {PROG} demo --steps 5 --out /tmp/demo --seed 1
  {PROG} demo --prompt "a cat on a sofa" --layout my_layout.json

layout JSON (--layout), boxes are [x0, y0, x1, y1] in fractions of the image:
  {{"format": "realign-layout", "version": 1, "regions": [
     {{"phrase": "cat", "box": [0.1, 0.2, 0.5, 0.9], "score": 2.0}},
     {{"phrase": "sofa", "box": [0.0, 0.5, 1.0, 1.0], "score": 2.0}}]}}
"""


def _add_demo_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="plain vs layout-guided generation with a tiny random model (offline), with attention maps",
        description=DEMO_DESCRIPTION,
        epilog=DEMO_EPILOG,
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--prompt", default=DEMO_PROMPT, help="the text prompt")
    parser.add_argument("--out", default="outputs/demo", help="folder for the pictures and JSON files")
    parser.add_argument("--seed", type=int, default=42, help="seed of the initial noise (the same for both runs)")
    parser.add_argument("--steps", type=_int_in(1, 1000), default=20, help="denoising steps")
    parser.add_argument("--height", type=_image_side, default=64, help=f"image height, multiple of 8, <= {MAX_DEMO_SIDE}")
    parser.add_argument("--width", type=_image_side, default=64, help=f"image width, multiple of 8, <= {MAX_DEMO_SIDE}")
    parser.add_argument(
        "--layout",
        metavar="PATH",
        default=None,
        help="a layout JSON file to use instead of the built-in two-box layout (which fits the default prompt)",
    )
    parser.add_argument(
        "--threads",
        type=_int_in(0, 1024),
        default=1,
        help="CPU threads for torch; 0 = torch's default (all cores). The tiny model gains little from threads, "
        "and on a busy machine several threads wait on each other (10x slower seen on 2 shared cores)",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(func=cmd_demo)


def build_parser() -> argparse.ArgumentParser:
    """The ``realigndiff`` parser: one subparser per subcommand."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="RealignDiff for diffusers: layout-guided attention modulation for Stable Diffusion.",
        epilog=TOP_EPILOG,
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    _add_demo_parser(subparsers)
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


# ----------------------------------------------------------------------------------------------------------
# demo
# ----------------------------------------------------------------------------------------------------------
def demo_layout():
    """The built-in layout of the demo prompt: "red book" in the left half, "yellow vase" in the right half."""
    from .layout import Layout, Region

    return Layout([Region(phrase, box=box, score=2.0) for phrase, box in DEMO_REGIONS])


def _load_layout(path: str):
    from .layout import Layout, LayoutError

    try:
        layout = Layout.from_json(Path(path))
    except LayoutError as error:
        raise CLIError(f"--layout {path}: {error}", EXIT_USAGE) from None
    if not len(layout):
        raise CLIError(f"--layout {path}: the layout has no regions; add at least one.", EXIT_USAGE)
    return layout


def _region_code(region) -> str:
    score = "" if region.score == 2.0 else f", score={region.score:g}"
    return f"Region({json.dumps(region.phrase)}, box={[round(v, 3) for v in region.box]}{score})"


def real_model_snippet(prompt: str, layout, layout_path: str | None) -> str:
    """Five lines of Python that run the same prompt and layout on Stable Diffusion v1.5 on a GPU."""
    if layout_path is None and all(region.box is not None and region.mask is None for region in layout):
        layout_line = f"layout = Layout([{', '.join(_region_code(region) for region in layout)}])"
    else:
        layout_line = f"layout = Layout.from_json({json.dumps(str(layout_path))})"
    return "\n".join(
        [
            "import torch",
            "from realign_pipeline import Layout, Region, RealignDiffPipeline",
            (
                'pipe = RealignDiffPipeline.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5", '
                'dtype=torch.float16).to("cuda")'
            ),
            layout_line,
            (
                f"pipe({json.dumps(prompt)}, layout=layout, "
                'generator=torch.Generator("cuda").manual_seed(42)).images[0].save("realigned.png")'
            ),
        ]
    )


def _intro(prompt: str, layout, layout_path: str | None) -> str:
    snippet = "\n".join("    " + line for line in real_model_snippet(prompt, layout, layout_path).splitlines())
    return (
        f"{PROG} demo: these are tiny RANDOM weights (realign_pipeline.testing), so the images are NOISE --\n"
        "do not judge them. The demo shows the code path: layout -> Eq. 8 attention modulation -> attention maps,\n"
        "and how much of each phrase's attention lands inside its region, without and with the layout.\n"
        "\n"
        "On real Stable Diffusion v1.5 (a GPU; the first run downloads several GB of weights):\n"
        "\n"
        f"{snippet}\n"
    )


@contextmanager
def _quiet_loading() -> Iterator[None]:
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


@contextmanager
def _collect_warnings(notes: list[str]) -> Iterator[None]:
    """Turn Python warnings (e.g. "phrase appended to the prompt") into plain notes printed by the demo."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for warning in caught:
        if issubclass(warning.category, (UserWarning, RuntimeWarning)) and str(warning.message) not in notes:
            notes.append(str(warning.message))


def phrase_words(tokenizer, prompt: str, token_indices: Sequence[int]) -> list[str]:
    """Keys of ``attention_maps`` (words of `prompt`, repeats as ``word#2``) whose tokens overlap `token_indices`."""
    from .tokens import unique_word_keys, word_token_spans

    spans = word_token_spans(tokenizer, prompt)
    wanted = set(token_indices)
    return [key for key, span in zip(unique_word_keys(spans), spans) if wanted & set(span.token_indices)]


def attention_share(maps: dict, words: Sequence[str], mask) -> float:
    """Share of the words' summed attention that falls inside `mask` (coverage in [0, 1], at the maps' size)."""
    total = sum(maps[word].float().clamp(min=0) for word in words)
    mass = float(total.sum())
    return float((total * mask).sum()) / mass if mass > 0 else 0.0


def _save(save: Callable[[Path], Any], path: Path) -> Path:
    try:
        save(path)
    except OSError as error:
        raise CLIError(f"cannot write {path}: {error}") from None
    return path


@contextmanager
def _torch_threads(threads: int) -> Iterator[None]:
    """Run with `threads` torch CPU threads (0: leave torch's setting), restoring the setting afterwards."""
    import torch

    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def cmd_demo(args: argparse.Namespace) -> int:
    """``realigndiff demo``: plain vs layout-guided generation on the tiny random model, with pictures."""
    with _torch_threads(args.threads):
        return _demo(args)


def _demo(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from .layout import LayoutError, resolve_layout
    from .pipeline import RealignDiffPipeline
    from .testing import tiny_pipeline
    from .visualize import PALETTE, attention_grid, display_size, overlay_layout, region_box

    layout = _load_layout(args.layout) if args.layout else demo_layout()
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CLIError(f"cannot create the output folder {out}: {error}") from None
    print(_intro(args.prompt, layout, args.layout), flush=True)

    timings: dict[str, float] = {}
    notes: list[str] = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="realigndiff-demo-") as save_dir, _quiet_loading():
        pipe = tiny_pipeline(RealignDiffPipeline, save_dir=save_dir)
    timings["load"] = time.perf_counter() - start

    try:
        with _collect_warnings(notes):
            resolved = resolve_layout(layout, args.prompt, pipe.tokenizer)
    except LayoutError as error:
        source = f"--layout {args.layout}" if args.layout else "the built-in layout"
        raise CLIError(f"{source} does not fit the prompt: {error}", EXIT_USAGE) from None
    if not len(resolved):
        raise CLIError("no region of the layout is usable (all masks are empty).", EXIT_USAGE)
    prompt = resolved.prompt  # with any phrase the prompt lacked appended, so both runs encode the same text

    call = {
        "height": args.height,
        "width": args.width,
        "num_inference_steps": args.steps,
        "return_attention_maps": True,
    }
    outputs = {}
    for name, run_layout in (("plain", None), ("realigned", layout)):
        pipe.set_progress_bar_config(desc=name, disable=args.quiet, leave=False)
        start = time.perf_counter()
        with _collect_warnings(notes):
            outputs[name] = pipe(
                prompt, layout=run_layout, generator=torch.Generator("cpu").manual_seed(args.seed), **call
            )
        timings[name] = time.perf_counter() - start
    for note in notes:
        print(f"note: {note}")

    start = time.perf_counter()
    before, after = outputs["plain"].attention_maps[0], outputs["realigned"].attention_maps[0]
    latent_h, latent_w = next(iter(after.values())).shape
    rows, boxes = [], {}
    for index, (region, indices) in enumerate(zip(resolved.regions, resolved.token_indices)):
        words = phrase_words(pipe.tokenizer, prompt, indices)
        mask = region.mask_at(latent_h, latent_w)
        rows.append(
            {
                "phrase": region.phrase,
                "words": words,
                "score": region.score,
                "area": float(mask.mean()),
                "plain": attention_share(before, words, mask),
                "realigned": attention_share(after, words, mask),
            }
        )
        for word in words:
            boxes.setdefault(word, (region_box(region), PALETTE[index % len(PALETTE)]))

    image = outputs["realigned"].images[0]
    pixels = [np.asarray(outputs[name].images[0], dtype=np.float64) for name in ("plain", "realigned")]
    change = np.abs(pixels[1] - pixels[0])
    image_change = {"mean": float(change.mean()), "max": float(change.max())}
    cell = display_size(image.size, 128)
    files = [
        _save(outputs["plain"].images[0].save, out / "plain.png"),
        _save(image.save, out / "realigned.png"),
        _save(layout.to_json, out / "layout.json"),
        _save(overlay_layout(image, layout).save, out / "layout.png"),
        _save(attention_grid(before, after, list(boxes), cell, boxes=boxes).save, out / "attention_maps.png"),
    ]
    timings["pictures"] = time.perf_counter() - start
    summary = {
        "note": "tiny RANDOM weights: the images are noise; the numbers show the attention modulation only",
        "prompt": args.prompt,
        "encoded_prompt": prompt,
        "appended_phrases": resolved.appended_phrases,
        "seed": args.seed,
        "steps": args.steps,
        "height": args.height,
        "width": args.width,
        "attention_map_size": [latent_h, latent_w],
        "share_definition": "fraction of the phrase words' cross-attention (mean over heads, layers, steps) inside "
        "the phrase's region; 'area' is the share uniform attention would give",
        "phrases": rows,
        "image_change_0_255": image_change,
        "timings_s": {key: round(value, 3) for key, value in timings.items()},
    }
    files.append(_save(lambda path: path.write_text(json.dumps(summary, indent=2) + "\n"), out / "summary.json"))

    print(_share_table(rows))
    print(
        f"plain.png and realigned.png differ by {image_change['mean']:.2f} on average (at most "
        f"{image_change['max']:.0f}) of 255 per pixel value: the random model barely uses attention, so look at "
        "attention_maps.png, not the images."
    )
    total = sum(timings.values())
    stages = ", ".join(f"{key} {value:.1f} s" for key, value in timings.items())
    print(f"wrote {len(files)} files to {out}/ ({', '.join(path.name for path in files)}) in {total:.1f} s: {stages}")
    return EXIT_OK


def _share_table(rows: list[dict]) -> str:
    """The per-phrase attention shares as a small aligned text table."""
    width = max([len("phrase")] + [len(row["phrase"]) for row in rows])
    lines = [
        "share of each phrase's attention inside its region (area = what uniform attention gives):",
        f"  {'phrase':<{width}}  {'area':>6}  {'plain':>6}  {'realigned':>9}  {'change':>7}",
    ]
    for row in rows:
        change = row["realigned"] - row["plain"]
        lines.append(
            f"  {row['phrase']:<{width}}  {row['area']:>6.3f}  {row['plain']:>6.3f}  {row['realigned']:>9.3f}  "
            f"{change:>+7.3f}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
