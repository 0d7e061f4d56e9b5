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

from .. import __version__

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
DEMO_PANEL_TITLES = ("plain", "layout (phrase, score)", "realigned")


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
  {PROG} demo                            the trained shapes world, before/after re-alignment: outputs/demo/
  {PROG} demo --tiny --steps 5 --out /tmp/demo   tiny random model (noise images): the code path only
  {PROG} demo --help                     the demo's options
  {PROG} generate "a red book and a yellow vase"            Stable Diffusion v1.5 + re-alignment (GPU)
  {PROG} generate --help                 the generate options
  {PROG} evaluate generate --config sd15 --prompts cc500 --out outputs/eval/sd15   images for Table 1
  {PROG} evaluate run --configs sd15,realign --prompts cc500 --metrics clip --out outputs/eval/cc500   a table
  {PROG} evaluate --help                 generation, scoring, report, human study
"""

DEMO_DESCRIPTION = """\
Run RealignDiff end to end, offline.

Default: the trained shapes world (small models trained on procedural scenes of coloured shapes, see
docs/shapes.md): real pictures of a prompt before and after re-alignment (coarse image -> dense caption ->
re-aligned image), for a few seeds, with the Figure 6 panels and Figure 7 attention maps. Without --seed it
picks seeds whose plain image the world's checker reads wrong (searching seeds 0..--search_seeds-1), prints
the fix and break rates measured for this configuration (with a placebo's) beside them, and draws
layout_control.png: the plain image against the image generated with a layout read from the prompt.

--tiny: a tiny RANDOM Stable Diffusion model instead. Its images are noise (random weights); what it shows is
the code path only: a layout (phrase -> region) drives Eq. 8 cross-attention modulation, and the
cross-attention maps of the phrase words move into their regions. The same seed is generated twice, plain and
layout-guided, and --tiny writes:

  plain.png, realigned.png  the two images
  layout.json               the layout used (realign-layout JSON, reusable with --layout)
  layout.png                the layout's regions drawn over the realigned image
  attention_maps.png        per phrase word: its attention map plain | realigned | difference
  panel.png                 Figure 6 style: plain | layout masks with phrase and score | realigned
  summary.json              per phrase: share of its attention inside its region, plain vs realigned
"""

DEMO_EPILOG = f"""\
examples:
  {PROG} demo
  {PROG} demo --prompt "a red square to the left of a green circle" --search_seeds 64
  {PROG} demo --seed 1 --num_images 2              seeds 1 and 2, no search
  {PROG} demo --tiny --steps 5 --out /tmp/demo --seed 1
  {PROG} demo --tiny --prompt "a cat on a sofa" --layout my_layout.json

layout JSON (--layout), boxes are [x0, y0, x1, y1] in fractions of the image:
  {{"format": "realign-layout", "version": 1, "regions": [
     {{"phrase": "cat", "box": [0.1, 0.2, 0.5, 0.9], "score": 2.0}},
     {{"phrase": "sofa", "box": [0.0, 0.5, 1.0, 1.0], "score": 2.0}}]}}
"""


def _add_demo_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="before/after re-alignment in the trained shapes world (offline); --tiny: a random model, the code path",
        description=DEMO_DESCRIPTION,
        epilog=DEMO_EPILOG,
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--tiny", action="store_true",
                        help="the tiny random model instead of the trained shapes world (noise images: the code path only)")
    parser.add_argument("--prompt", default=None,
                        help=f"the text prompt (default: the shapes world's; with --tiny: {DEMO_PROMPT!r})")
    parser.add_argument("--out", default="outputs/demo", help="folder for the pictures and JSON files")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed of the first image (the next images take the next seeds; the same noise for "
                        "both runs); without it the shapes world searches for seeds it gets wrong (--tiny: 42)")
    parser.add_argument("--search_seeds", type=_int_in(1, 10000), default=32, metavar="N",
                        help="shapes world without --seed: seeds 0..N-1 searched for plain images the checker reads wrong")
    parser.add_argument("--num_images", type=_int_in(1, 64), default=4, metavar="N",
                        help="shapes world: how many seeds to show")
    parser.add_argument("--steps", type=_int_in(1, 1000), default=20, help="denoising steps")
    parser.add_argument("--height", type=_image_side, default=None,
                        help=f"image height, multiple of 8, <= {MAX_DEMO_SIDE} (default: the shapes world's; --tiny: 64)")
    parser.add_argument("--width", type=_image_side, default=None,
                        help=f"image width, multiple of 8, <= {MAX_DEMO_SIDE} (default: the shapes world's; --tiny: 64)")
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
    _add_generate_parser(subparsers)
    _add_evaluate_parser(subparsers)
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
    from ..layout import Layout, Region

    return Layout([Region(phrase, box=box, score=2.0) for phrase, box in DEMO_REGIONS])


def _load_layout(path: str):
    from ..layout import Layout, LayoutError

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
    from ..tokens import unique_word_keys, word_token_spans

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
    """``realigndiff demo``: the trained shapes world before/after re-alignment, or (``--tiny``) plain vs
    layout-guided generation on the tiny random model, with pictures."""
    if not getattr(args, "tiny", False):
        try:
            from ..shapes.demo import shapes_demo
        except ModuleNotFoundError as error:
            if error.name not in ("realign_pipeline.shapes", "realign_pipeline.shapes.demo"):
                raise
            raise CLIError("the shapes-world demo is not in this installation; run `realigndiff demo --tiny`.") from None
        return shapes_demo(args)
    args.prompt = args.prompt or DEMO_PROMPT
    args.seed = 42 if args.seed is None else args.seed
    args.height = args.height or 64
    args.width = args.width or 64
    with _torch_threads(args.threads):
        return _demo(args)


def _demo(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from ..layout import LayoutError, resolve_layout
    from ..pipeline import RealignDiffPipeline
    from ..testing import tiny_pipeline
    from ..visualize import PALETTE, attention_grid, display_size, figure6_panel, overlay_layout, region_box

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
        _save(figure6_panel(outputs["plain"].images[0], resolved.regions, image, titles=DEMO_PANEL_TITLES).save,
              out / "panel.png"),
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


# ----------------------------------------------------------------------------------------------------------
# generate
# ----------------------------------------------------------------------------------------------------------
DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
DEFAULT_TAGGER = "openai/clip-vit-large-patch14"
DEFAULT_DETECTOR = "IDEA-Research/grounding-dino-tiny"
DEFAULT_SEGMENTER = "facebook/sam-vit-base"
_DTYPES = ("float32", "float16", "bfloat16")
#: Words left out of the default Figure 7 words (articles, prepositions, conjunctions).
_STOP_WORDS = frozenset(
    ("a", "an", "the", "and", "or", "of", "on", "in", "at", "to", "with", "by", "for", "from", "its", "their",
     "his", "her", "this", "that", "these", "those", "is", "are")
)

GENERATE_DESCRIPTION = """\
Generate images with RealignDiff: a coarse image, its dense caption (tagger -> LLM -> Grounding DINO + SAM)
as a layout, and the fine image re-generated from the same noise with Eq. 8 attention modulation.

With --layout a hand-written layout is used instead of captioning: the same seed is generated without and
with the layout, so the pictures compare the two. Per prompt, in OUT/NNN-<prompt>/:

  image.png           the final image
  coarse.png          the coarse image (the image before re-alignment), when there is one
  layout.json         the layout used (realign-layout JSON, reusable with --layout)
  panel.png           Figure 6: coarse | layout masks with phrase and score | final
  attention_maps.png  Figure 7: per word, its cross-attention before | after | difference

and OUT/summary.json (prompts, settings, files, timings). Real models need a GPU (or minutes per image on
the CPU) and the weights in the Hugging Face cache or reachable online; `realigndiff demo` runs offline.
"""

GENERATE_EPILOG = f"""\
examples:
  {PROG} generate "a red book and a yellow vase"
  {PROG} generate "a cat on a sofa" --layout my_layout.json --seed 1
  {PROG} generate --prompts-file prompts.txt --out outputs/batch --llm openai --llm-model gpt-4o
  {PROG} generate "two dogs" --llm local --llm-model Qwen/Qwen2.5-7B-Instruct
  {PROG} generate "a teapot" --model /models/sd15 --lora my-refl-lora/ --no-realign
  {PROG} generate "a red book" --device cpu --dtype float32 --steps 20   (no GPU: expect minutes)

errors exit with code 2 and one line saying what to do (no cached weights and no network, no GPU,
float16 on the CPU, a bad layout file).
"""


def _add_generate_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="generate images with RealignDiff (coarse -> dense caption -> re-aligned), with pictures",
        description=GENERATE_DESCRIPTION,
        epilog=GENERATE_EPILOG,
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("prompts", nargs="*", metavar="PROMPT", help="text prompts (one image each)")
    parser.add_argument("--prompts-file", metavar="FILE", help="a text file with one prompt per line (blank lines skipped)")
    parser.add_argument("--out", default="outputs/generate", help="folder for the images, layouts and pictures")
    model = parser.add_argument_group("model")
    model.add_argument("--model", default=DEFAULT_MODEL, help="diffusers Stable Diffusion 1.x/2.x hub id or local "
                       "folder; `shapes` = the trained shapes world shipped with the package (offline, CPU), `shapes-bow` its "
                       "second world (a text encoder trained without colour-swapped negatives)")
    model.add_argument("--lora", metavar="ID_OR_PATH", help="LoRA weights (e.g. a ReFL LoRA) loaded with load_lora_weights")
    model.add_argument("--device", help="cuda, cuda:1, cpu, ... (default: cuda when available, else cpu)")
    model.add_argument("--dtype", choices=_DTYPES, help="(default: float16 on a GPU, float32 on the CPU)")
    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--seed", type=int, default=42, help="seed of the initial noise (one per prompt: seed + index)")
    sampling.add_argument("--steps", type=_int_in(1, 1000), default=50, help="denoising steps (per stage)")
    sampling.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    sampling.add_argument("--height", type=_int_in(8, 4096), help="image height, multiple of 8 (default: the model's)")
    sampling.add_argument("--width", type=_int_in(8, 4096), help="image width, multiple of 8 (default: the model's)")
    realign = parser.add_argument_group("re-alignment")
    realign.add_argument(
        "--realign", action=argparse.BooleanOptionalAction, default=None,
        help="caption the coarse image and re-generate (default: yes when the captioner's models can be loaded)",
    )
    realign.add_argument("--layout", metavar="PATH", help="a hand-written layout JSON: no captioning")
    realign.add_argument("--llm", choices=("rule", "openai", "local"), default="rule",
                         help="the LLM that scores objects and finds their phrases (Eq. 6)")
    realign.add_argument("--llm-model", help="model name for --llm openai (default gpt-4o) or hub id/path for --llm local")
    realign.add_argument("--llm-base-url", help="an OpenAI-compatible server, e.g. http://localhost:8000/v1 (vLLM)")
    realign.add_argument("--tagger-model", default=DEFAULT_TAGGER, help="CLIP model id or folder of the tagger")
    realign.add_argument("--tag-threshold", type=float, help="one tagger threshold for every tag (default: RAM's)")
    realign.add_argument("--detector", default=DEFAULT_DETECTOR, help="Grounding DINO id or folder")
    realign.add_argument("--segmenter", default=DEFAULT_SEGMENTER, help="SAM id or folder")
    realign.add_argument("--box-threshold", type=float, default=0.35, help="Grounding DINO box threshold")
    realign.add_argument("--text-threshold", type=float, default=0.25, help="Grounding DINO text threshold")
    pictures = parser.add_argument_group("pictures")
    pictures.add_argument("--words", nargs="+", help="words of the Figure 7 maps (default: the layout phrases' words)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(func=cmd_generate)


def _read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = [prompt.strip() for prompt in args.prompts if prompt.strip()]
    if args.prompts_file:
        try:
            text = Path(args.prompts_file).read_text(encoding="utf-8")
        except OSError as error:
            raise CLIError(f"--prompts-file {args.prompts_file}: {error.strerror or error}", EXIT_USAGE) from None
        prompts += [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise CLIError("no prompt: give one or more PROMPT arguments or --prompts-file FILE.", EXIT_USAGE)
    return prompts


def _device_and_dtype(args: argparse.Namespace):
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


def _load_error(what: str, name: str, error: BaseException, flag: str) -> CLIError:
    """A one-line, actionable message for weights that cannot be loaded."""
    if Path(name).exists():
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return CLIError(f"cannot load the {what} from {name}: {detail[:300]}", EXIT_USAGE)
    return CLIError(
        f"cannot load the {what} {name!r}: not in the Hugging Face cache and the Hub cannot be reached (offline?); "
        f"run with {flag} PATH (a downloaded folder) or log in (`hf auth login`) with network access.",
        EXIT_USAGE,
    )


_LOAD_ERRORS: tuple[type[BaseException], ...] = (OSError, ConnectionError, ValueError, ImportError)


def _make_llm(args: argparse.Namespace, notes: list[str]):
    import os

    from ..captioner import RuleBasedLLM, make_llm

    if args.llm == "rule":
        return RuleBasedLLM()
    if args.llm == "openai":
        if not (os.environ.get("OPENAI_API_KEY") or args.llm_base_url or os.environ.get("OPENAI_BASE_URL")):
            print(
                f"{PROG} generate: warning: no OpenAI key (OPENAI_API_KEY) and no --llm-base-url: "
                "falling back to rule-based.",
                file=sys.stderr,
            )
            return RuleBasedLLM()
        kwargs = {"base_url": args.llm_base_url}
        if args.llm_model:
            kwargs["model"] = args.llm_model
        return make_llm("openai", **kwargs)
    if not args.llm_model:
        raise CLIError("--llm local needs --llm-model (a chat model's hub id or folder).", EXIT_USAGE)
    try:
        return make_llm("local", model_id_or_path=args.llm_model, device=None)
    except _LOAD_ERRORS as error:
        raise _load_error("local LLM", args.llm_model, error, "--llm-model") from None


def _default_captioner_options(args: argparse.Namespace) -> bool:
    """True when no captioner model was chosen on the command line."""
    return (args.tagger_model, args.detector, args.segmenter, args.tag_threshold) == (
        DEFAULT_TAGGER, DEFAULT_DETECTOR, DEFAULT_SEGMENTER, None)


def _make_captioner(args: argparse.Namespace, device: str, dtype, notes: list[str]):
    """The dense captioner with every model loaded now (so a missing model fails before any generation)."""
    from ..captioner import ClipTagger, DenseCaptioner, GroundingDinoSamGrounder

    llm = _make_llm(args, notes)
    kwargs = {} if args.tag_threshold is None else {"thresholds": args.tag_threshold}
    try:
        tagger = ClipTagger(args.tagger_model, device=device, **kwargs)
    except _LOAD_ERRORS as error:
        raise _load_error("tagger (CLIP)", args.tagger_model, error, "--tagger-model") from None
    grounder = GroundingDinoSamGrounder(
        args.detector, args.segmenter, box_threshold=args.box_threshold, text_threshold=args.text_threshold,
        device=device,
    )
    try:
        grounder.load()
    except _LOAD_ERRORS as error:
        raise _load_error("detector (Grounding DINO)", args.detector, error, "--detector") from None
    if hasattr(grounder.segmenter, "load"):
        try:
            grounder.segmenter.load()
        except _LOAD_ERRORS as error:
            raise _load_error("segmenter (SAM)", args.segmenter, error, "--segmenter") from None
    return DenseCaptioner(tagger, llm, grounder)


def _slug(prompt: str, index: int) -> str:
    import re

    words = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:48].rstrip("-")
    return f"{index:03d}-{words or 'prompt'}"


def layout_words(tokenizer, resolved) -> list[str]:
    """Attention-map keys of every word of the layout's phrases (attributes and nouns; articles left out)."""
    words: list[str] = []
    for indices in resolved.token_indices:
        for word in phrase_words(tokenizer, resolved.prompt, indices):
            if word.split("#")[0].lower() not in _STOP_WORDS and word not in words:
                words.append(word)
    return words


def cmd_generate(args: argparse.Namespace) -> int:
    """``realigndiff generate``: RealignDiff on a real (or local) Stable Diffusion model, with pictures."""
    import torch

    from ..layout import Layout
    from ..pipeline import RealignDiffPipeline
    from ..visualize import display_size, figure6_panel, figure7_maps

    prompts = _read_prompts(args)
    hand_layout = _load_layout(args.layout) if args.layout else None
    if hand_layout is not None and args.realign:
        raise CLIError("--layout and --realign exclude each other: a hand layout replaces the captioner.", EXIT_USAGE)
    for name in ("height", "width"):
        value = getattr(args, name)
        if value is not None and value % 8:
            raise CLIError(f"--{name} {value}: must be a multiple of 8 (Stable Diffusion's rule).", EXIT_USAGE)
    device, dtype = _device_and_dtype(args)
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CLIError(f"cannot create the output folder {out}: {error}") from None

    timings: dict[str, float] = {}
    notes: list[str] = []
    if torch.device(device).type == "cpu":
        print(f"{PROG} generate: running on the CPU in float32; a real model takes minutes per image.", flush=True)

    start = time.perf_counter()
    model = args.model
    if model in ("shapes", "shapes:pipeline", "shapes-bow", "shapes:pipeline-bow"):
        from ..shapes.pretrained import SHAPES_WORLDS, shapes_model_path

        try:
            model = str(shapes_model_path(SHAPES_WORLDS.get(model) or model.removeprefix("shapes:")))
        except FileNotFoundError as error:
            raise CLIError(str(error)) from None
    try:
        with _collect_warnings(notes):
            pipe = RealignDiffPipeline.from_pretrained(model, dtype=dtype, safety_checker=None,
                                                       requires_safety_checker=False)
    except _LOAD_ERRORS as error:
        raise _load_error("model", args.model, error, "--model") from None
    if args.lora:
        try:
            pipe.load_lora_weights(args.lora)
        except _LOAD_ERRORS as error:
            raise _load_error("LoRA", args.lora, error, "--lora") from None
    pipe.to(device)
    pipe.set_progress_bar_config(disable=args.quiet, leave=False)
    timings["load"] = time.perf_counter() - start

    realign = False
    if hand_layout is None and args.realign is not False:
        start = time.perf_counter()
        try:
            if pipe.dense_captioner is not None and _default_captioner_options(args):
                # the captioner saved with the model (e.g. the shapes world's) fits it better than the defaults
                if args.llm != "rule":
                    pipe.dense_captioner.llm = _make_llm(args, notes)
                notes.append("using the dense captioner saved with the model (pass --tagger-model/--detector/"
                             "--segmenter to replace it)")
            else:
                pipe.dense_captioner = _make_captioner(args, device, dtype, notes)
            realign = True
        except CLIError as error:
            if args.realign:  # asked for explicitly: a missing captioner model is an error
                raise
            print(f"{PROG} generate: warning: no re-alignment ({error}); generating plain images.", file=sys.stderr)
        timings["captioner load"] = time.perf_counter() - start

    common = {"height": args.height, "width": args.width, "num_inference_steps": args.steps,
              "guidance_scale": args.guidance, "return_attention_maps": True}
    files: list[Path] = []
    stage_times = {"generate": 0.0, "pictures": 0.0}
    summary_rows = []
    for index, prompt in enumerate(prompts):
        folder = out / _slug(prompt, index)
        folder.mkdir(parents=True, exist_ok=True)
        seed = args.seed + index
        print(f"[{index + 1}/{len(prompts)}] {prompt}", flush=True)
        start = time.perf_counter()
        with _collect_warnings(notes):
            if hand_layout is not None:
                coarse = pipe(prompt, generator=torch.Generator("cpu").manual_seed(seed), **common)
                final = pipe(prompt, layout=hand_layout, generator=torch.Generator("cpu").manual_seed(seed), **common)
                coarse_image, before = coarse.images[0], coarse.attention_maps[0]
                realigned = True
            else:
                final = pipe(prompt, realign=realign, generator=torch.Generator("cpu").manual_seed(seed), **common)
                realigned = bool(final.realigned and final.realigned[0])
                coarse_image = final.coarse_images[0] if final.coarse_images else None
                before = final.coarse_attention_maps[0] if final.coarse_attention_maps else None
        stage_times["generate"] += time.perf_counter() - start

        start = time.perf_counter()
        image = final.images[0]
        resolved = final.layouts[0] if final.layouts else None
        written = [_save(image.save, folder / "image.png")]
        if coarse_image is not None:
            written.append(_save(coarse_image.save, folder / "coarse.png"))
        if resolved is not None:
            # written when empty too: its source says why the captioner kept nothing
            layout = Layout(resolved.regions, source=resolved.source)
            written.append(_save(layout.to_json, folder / "layout.json"))
        if resolved is not None and len(resolved):
            if coarse_image is not None:
                written.append(_save(figure6_panel(coarse_image, resolved.regions, image).save, folder / "panel.png"))
            if before is not None:
                words = args.words or layout_words(pipe.tokenizer, resolved)
                after = final.attention_maps[0]
                words = [word for word in words if word in before and word in after]
                if words:
                    maps = figure7_maps(before, after, words, display_size(image.size, 128))
                    written.append(_save(maps.save, folder / "attention_maps.png"))
        elif realign:
            notes.append(f"{prompt!r}: the captioner kept no object, so the image was not re-aligned")
        stage_times["pictures"] += time.perf_counter() - start
        files += written
        summary_rows.append({
            "prompt": prompt, "seed": seed, "folder": str(folder), "realigned": realigned,
            "phrases": [{"phrase": r.phrase, "score": r.score} for r in (resolved.regions if resolved else [])],
            "files": [path.name for path in written],
        })
    timings.update(stage_times)
    for note in dict.fromkeys(notes):
        print(f"note: {note}")
    summary = {
        "model": args.model, "lora": args.lora, "device": device, "dtype": str(dtype).replace("torch.", ""),
        "steps": args.steps, "guidance": args.guidance, "mode": "layout" if hand_layout else
        ("realign" if realign else "plain"), "prompts": summary_rows,
        "timings_s": {key: round(value, 3) for key, value in timings.items()},
    }
    files.append(_save(lambda path: path.write_text(json.dumps(summary, indent=2) + "\n"), out / "summary.json"))
    total = sum(timings.values())
    stages = ", ".join(f"{key} {value:.1f} s" for key, value in timings.items())
    print(f"wrote {len(files)} files for {len(prompts)} prompt(s) to {out}/ in {total:.1f} s: {stages}")
    return EXIT_OK

# ----------------------------------------------------------------------------------------------------------
# evaluate
# ----------------------------------------------------------------------------------------------------------
EVALUATE_DESCRIPTION = """\
The paper's evaluation (Tables 1-3): `run` does it all in one command (generate every configuration,
resumable, score, report); `generate`, `score` and `report` are its steps; plus the human-study page and its
results. See docs/evaluation.md and docs/evaluation_generation.md.
"""

EVALUATE_EPILOG = f"""\
examples:
  {PROG} evaluate run --configs sd15,realign --prompts cc500 --metrics clip,blip_itm --out outputs/eval/cc500
  {PROG} evaluate generate --config sd15 --prompts cc500 --out outputs/eval/sd15
  {PROG} evaluate generate --config refl+realign --lora outputs/refl-lora --prompts abc6k --out outputs/eval/ours
  accelerate launch -m realign_pipeline.evaluation --config sdxl --prompts geneval --out outputs/eval/sdxl
  {PROG} evaluate score outputs/eval/sd15 --metrics clip blip_itm
  {PROG} evaluate report outputs/eval/sd15 outputs/eval/ours --out outputs/report
  {PROG} evaluate study-page outputs/eval/sd15 outputs/eval/ours --out study.html
  {PROG} evaluate study-results rankings1.json rankings2.json
"""

EVALUATE_GENERATE_DESCRIPTION = """\
Generate the images of a prompt set with one configuration (a preset or a JSON file), into one folder:

  OUT/config.json               the configuration (reusable with --config OUT/config.json)
  OUT/images/00000.png          prompt 0 (00000_1.png ... with --images-per-prompt > 1)
  OUT/manifest.rank0.jsonl      one line per image: prompt, seed, settings, timings, realigned
  OUT/geneval/, OUT/t2icompbench/   GenEval and T2I-CompBench prompts also in those benchmarks' layouts

Prompt i is generated from seed + i. Resumable: images already written (file + manifest line) are skipped.
Sharded: process k of n takes the prompts i with i % n == k (from accelerate when launched with
`accelerate launch -m realign_pipeline.evaluation ...`, or --process-index/--num-processes).
"""

EVALUATE_GENERATE_EPILOG = f"""\
presets: sd15, refl, realign, refl+realign, imagereward-refl, densediffusion, promptist, sdxl

examples:
  {PROG} evaluate generate --config sd15 --prompts cc500 --out outputs/eval/sd15
  {PROG} evaluate generate --config sd15 --prompts coco5k --limit 1000 --sample-seed 0 --out outputs/eval/coco
  {PROG} evaluate generate --config refl --lora outputs/refl-lora --prompts abc6k --out outputs/eval/refl
  {PROG} evaluate generate --config densediffusion --prompts t2icompbench-color --out outputs/eval/dd-color
  {PROG} evaluate generate --config my_config.json --prompts my_prompts.txt --out outputs/eval/mine --seed 42
  {PROG} evaluate generate --config sd15 --prompts cc500 --out outputs/eval/sd15 --process-index 1 --num-processes 4
  accelerate launch -m realign_pipeline.evaluation --config sd15 --prompts cc500 --out outputs/eval/sd15
"""


def _key_value(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = value
    return key.strip(), parsed


def _add_evaluate_generate_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="images of a prompt set with one configuration (seeded, resumable, sharded), with a manifest",
        description=EVALUATE_GENERATE_DESCRIPTION,
        epilog=EVALUATE_GENERATE_EPILOG,
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--config", required=True, help="a preset name (see below) or a configuration JSON file")
    parser.add_argument("--prompts", required=True,
                        help="a prompt set (cc500, abc6k, coco5k, geneval, t2icompbench-color, ...) or a prompt file")
    parser.add_argument("--limit", type=_int_in(1, 10**9), help="only this many prompts (the first ones)")
    parser.add_argument("--sample-seed", type=int, help="with --limit: a random subset drawn with this seed")
    parser.add_argument("--out", required=True, help="the configuration's output folder")
    parser.add_argument("--seed", type=int, default=42, help="prompt i is generated from seed + i (the paper: 42)")
    parser.add_argument("--batch-size", type=_int_in(1, 1024), default=1, help="prompts per pipeline call")
    parser.add_argument("--max-images", type=_int_in(1, 10**9), help="stop after generating this many images")
    overrides = parser.add_argument_group("configuration overrides")
    overrides.add_argument("--name", help="the configuration's name (default: the preset's or the file's)")
    overrides.add_argument("--model", help="diffusers hub id or folder")
    overrides.add_argument("--lora", metavar="ID_OR_PATH", help="a LoRA (e.g. ReFL's), loaded with load_lora_weights")
    overrides.add_argument("--unet", metavar="PATH", help="a fine-tuned UNet folder (e.g. ReFL's full fine-tuning)")
    overrides.add_argument("--steps", type=_int_in(1, 1000), help="denoising steps (per stage)")
    overrides.add_argument("--guidance", type=float, help="classifier-free guidance scale")
    overrides.add_argument("--height", type=_int_in(8, 4096), help="image height, multiple of 8")
    overrides.add_argument("--width", type=_int_in(8, 4096), help="image width, multiple of 8")
    overrides.add_argument("--images-per-prompt", type=_int_in(1, 64), help="images per prompt")
    overrides.add_argument("--set", dest="overrides", metavar="KEY=VALUE", type=_key_value, action="append",
                           default=[], help="any configuration field, VALUE as JSON, e.g. "
                           "--set pipeline_kwargs='{\"self_attention_strength\": 0.3}'")
    run = parser.add_argument_group("devices and processes")
    run.add_argument("--device", help="cuda, cuda:1, cpu (default: accelerate's device, else cuda when available)")
    run.add_argument("--dtype", choices=_DTYPES, help="(default: the configuration's, else float16 on a GPU)")
    run.add_argument("--process-index", type=_int_in(0, 4096), help="this process's rank (default: accelerate's)")
    run.add_argument("--num-processes", type=_int_in(1, 4097), help="the number of processes (default: accelerate's)")
    run.add_argument("--no-benchmark-layouts", action="store_true",
                     help="do not also write GenEval / T2I-CompBench prompts in those benchmarks' folder layouts")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=cmd_evaluate_generate)


def _add_evaluate_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="the paper's evaluation: generate, score, report, human study",
        description=EVALUATE_DESCRIPTION,
        epilog=EVALUATE_EPILOG,
        formatter_class=_HelpFormatter,
    )
    commands = parser.add_subparsers(dest="evaluate_command", metavar="STEP", title="steps")
    parser.set_defaults(func=lambda args: _evaluate_usage(parser))
    _add_evaluate_generate_parser(commands)

    score = commands.add_parser("score", help="score result folders (writes metrics.json in each)",
                                formatter_class=_HelpFormatter,
                                epilog=f"example:\n  {PROG} evaluate score outputs/eval/sd15 --metrics clip blip_itm")
    score.add_argument("folders", nargs="+", metavar="FOLDER", help="result folders of `evaluate generate`")
    score.add_argument("--metrics", nargs="+", default=["clip"],
                       help="clip, negclip, blip_itm, caption_reward, blip_vqa, fid, timings")
    score.add_argument("--batch-size", type=_int_in(1, 4096), default=8, help="images per batch")
    score.add_argument("--model", dest="model_paths", metavar="METRIC=ID_OR_PATH", type=_key_value, action="append",
                       default=[], help="the model of a metric, e.g. clip=openai/clip-vit-base-patch32")
    score.add_argument("--real-images", metavar="FOLDER", help="real images for fid")
    score.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    score.set_defaults(func=cmd_evaluate_score)

    report = commands.add_parser("report", help="tables and charts of scored result folders",
                                 formatter_class=_HelpFormatter,
                                 epilog=f"example:\n  {PROG} evaluate report outputs/eval/* --out outputs/report")
    report.add_argument("folders", nargs="+", metavar="FOLDER", help="scored result folders")
    report.add_argument("--out", required=True, help="the report's folder")
    report.set_defaults(func=cmd_evaluate_report)

    _add_evaluate_run_parser(commands)

    page = commands.add_parser("study-page", help="a self-contained HTML page for the human study",
                               formatter_class=_HelpFormatter,
                               epilog=f"example:\n  {PROG} evaluate study-page outputs/eval/sd15 outputs/eval/ours "
                               "--out study.html")
    page.add_argument("folders", nargs="+", metavar="FOLDER", help="result folders (one per configuration)")
    page.add_argument("--out", required=True, help="the HTML file to write")
    page.add_argument("--num-prompts", type=_int_in(1, 10**6), help="a random subset of the prompts")
    page.add_argument("--seed", type=int, default=0, help="seed of the subset and of the shuffled order")
    page.set_defaults(func=cmd_evaluate_study_page)

    results = commands.add_parser("study-results", help="alignment scores from the study's ranking files",
                                  formatter_class=_HelpFormatter,
                                  epilog=f"example:\n  {PROG} evaluate study-results rankings*.json")
    results.add_argument("files", nargs="+", metavar="FILE", help="the rankings the study page saved")
    results.add_argument("--out", help="also write the result as JSON here")
    results.set_defaults(func=cmd_evaluate_study_results)


EVALUATE_RUN_DESCRIPTION = """\
A table of the paper in one command: for each configuration and seed, generate the images of the prompt set
(images already written are skipped, so an interrupted run resumes), score them, combine the seeds, and write
the report of all configurations. Layout of OUT:

  OUT/<config>/seed<S>/         a generation folder per seed (as `evaluate generate --seed S` writes it)
  OUT/<config>/metrics.json     the seeds combined: mean/std over every image, per-seed means, seed_std
  OUT/report/                   table.md, table.json, chart_<metric>.png, grid.png, grid.html
  OUT/run.json                  settings, folders, timings

Prompt i of seed S is generated from S + i. A ReFL configuration needs its checkpoint: --lora refl=PATH,
--unet refl=PATH, or a --config-file with {"preset": "refl", "name": "...", "lora": "PATH"}.
"""

EVALUATE_RUN_EPILOG = f"""\
examples:
  {PROG} evaluate run --configs sd15,realign --prompts cc500 --metrics clip,blip_itm,timings --out outputs/eval/cc500
  {PROG} evaluate run --configs sd15,refl,realign,refl+realign --lora refl=outputs/refl-lora --lora refl+realign=outputs/refl-lora --prompts abc6k --metrics clip,blip_itm --out outputs/eval/abc6k
  {PROG} evaluate run --configs sd15 --config-file my_config.json --prompts my_prompts.txt --seeds 42 43 44 --metrics clip --model-path clip=openai/clip-vit-base-patch32 --out outputs/eval/mine
  {PROG} evaluate run --configs sd15,realign --prompts coco5k --limit 1000 --sample-seed 0 --metrics fid,clip --real-images val2014/ --out outputs/eval/coco
"""


def _comma_list(text: str) -> list[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return items


def _add_evaluate_run_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "run",
        help="generate (resumable), score and report several configurations: one table of the paper",
        description=EVALUATE_RUN_DESCRIPTION,
        epilog=EVALUATE_RUN_EPILOG,
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--configs", type=_comma_list, nargs="+", action="extend", default=[], metavar="NAMES",
                        help="presets or configuration JSON files, comma- or space-separated (sd15,realign,refl+realign)")
    parser.add_argument("--config-file", dest="config_files", nargs="+", action="extend", default=[],
                        metavar="JSON", help="configuration JSON files (more rows of the table)")
    parser.add_argument("--prompts", required=True,
                        help="a prompt set (cc500, abc6k, coco5k, geneval, t2icompbench-color, ...) or a prompt file")
    parser.add_argument("--limit", type=_int_in(1, 10**9), help="only this many prompts (the first ones)")
    parser.add_argument("--sample-seed", type=int, help="with --limit: a random subset drawn with this seed")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42],
                        help="one generation folder per seed; prompt i of seed S is generated from S + i")
    parser.add_argument("--metrics", type=_comma_list, nargs="+", action="extend", metavar="NAMES",
                        help="metric names, comma- or space-separated: clip, negclip, blip_itm, caption_reward, "
                        "blip_vqa, fid, timings, ... (none given: clip,timings)")
    parser.add_argument("--model-path", dest="model_paths", metavar="METRIC=ID_OR_PATH", type=_key_value,
                        nargs="+", action="extend", default=[],
                        help="the model of a metric, e.g. clip=openai/clip-vit-base-patch32")
    parser.add_argument("--real-images", metavar="FOLDER", help="real images for fid (COCO val2014 for coco5k)")
    parser.add_argument("--out", required=True, help="the run's folder (one sub-folder per configuration, report/)")
    checkpoints = parser.add_argument_group("ReFL checkpoints")
    checkpoints.add_argument("--lora", metavar="CONFIG=PATH", type=_key_value, action="append", default=[],
                             help="a LoRA for one configuration, e.g. refl+realign=outputs/refl-lora")
    checkpoints.add_argument("--unet", metavar="CONFIG=PATH", type=_key_value, action="append", default=[],
                             help="a fine-tuned UNet (or pipeline) folder for one configuration")
    run = parser.add_argument_group("devices and batches")
    run.add_argument("--batch-size", type=_int_in(1, 1024), default=1, help="prompts per pipeline call")
    run.add_argument("--score-batch-size", type=_int_in(1, 4096), default=8, help="images per scoring batch")
    run.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda when available)")
    run.add_argument("--dtype", choices=_DTYPES, help="(default: the configuration's, else float16 on a GPU)")
    parser.add_argument("--rescore", action="store_true", help="score again even when nothing changed")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(func=cmd_evaluate_run)


def cmd_evaluate_run(args: argparse.Namespace) -> int:
    """``realigndiff evaluate run``: generate, score and report (``evaluation.run.run_evaluation``)."""
    from ..evaluation.configs import load_config
    from ..evaluation.run import run_evaluation

    names = [name for group in args.configs for name in group] + list(args.config_files)
    if not names:
        raise CLIError("no configuration: give --configs sd15,realign,... and/or --config-file FILE.json.", EXIT_USAGE)
    configs = []
    for name in names:
        try:
            configs.append(load_config(name))
        except ValueError as error:
            raise CLIError(str(error), EXIT_USAGE) from None
    for flag, pairs in (("lora", args.lora), ("unet", args.unet)):
        for key, value in pairs:
            matches = [i for i, config in enumerate(configs) if config.name == key]
            if not matches:
                raise CLIError(f"--{flag} {key}={value}: no configuration named {key!r} "
                               f"(the configurations: {', '.join(c.name for c in configs)}).", EXIT_USAGE)
            for i in matches:
                configs[i] = configs[i].replace(**{flag: str(value)})
    metrics = [name for group in args.metrics for name in group] if args.metrics else ["clip", "timings"]
    if args.device:
        _device_and_dtype(argparse.Namespace(device=args.device, dtype=args.dtype or "float32"))
    print(f"{PROG} evaluate run: {len(configs)} configuration(s) ({', '.join(c.name for c in configs)}) on "
          f"{args.prompts}, seeds {' '.join(map(str, args.seeds))}, metrics {', '.join(metrics)} -> {args.out}",
          flush=True)
    try:
        with _quiet_loading():
            result = run_evaluation(
                configs, args.prompts, args.out, metrics, seeds=args.seeds, limit=args.limit,
                batch_size=args.batch_size, device=args.device, dtype=args.dtype,
                model_paths={str(k): str(v) for k, v in args.model_paths}, progress=not args.quiet,
                sample_seed=args.sample_seed, real_images=args.real_images, score_batch_size=args.score_batch_size,
                rescore=args.rescore,
            )
    except (ValueError, FileNotFoundError) as error:
        raise CLIError(str(error), EXIT_USAGE) from None
    except (OSError, ConnectionError, ImportError) as error:
        detail = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
        raise CLIError(f"a model could not be loaded ({detail}); offline? point the configuration's model / lora / "
                       "unet, or --model-path METRIC=PATH, at a downloaded folder.", EXIT_USAGE) from None
    for name, info in result["configs"].items():
        values = ", ".join(f"{m} {v:.4f}" for m, v in info["metrics"].items() if isinstance(v, (int, float)))
        print(f"{name}: generated {info['generated']}, skipped {info['skipped']}; {values} ({info['folder']})")
    print(f"{PROG} evaluate run: {result['summary']}", flush=True)
    return EXIT_OK


def _evaluate_usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return EXIT_USAGE


def _evaluation_module(name: str):
    import importlib

    try:
        return importlib.import_module(f"realign_pipeline.evaluation.{name}")
    except ModuleNotFoundError as error:
        if error.name == f"realign_pipeline.evaluation.{name}":
            raise CLIError(f"realign_pipeline.evaluation.{name} is not available in this installation.") from None
        raise


def _process_share(args: argparse.Namespace) -> tuple[int, int, str | None]:
    """(process index, number of processes, device): from the flags, else from accelerate."""
    if args.process_index is not None or args.num_processes is not None:
        index, count = args.process_index or 0, args.num_processes or 1
        if index >= count:
            raise CLIError(f"--process-index {index} must be below --num-processes {count}.", EXIT_USAGE)
        return index, count, None
    from accelerate import PartialState

    state = PartialState()
    device = str(state.device) if state.num_processes > 1 or state.device.type != "cpu" else None
    return state.process_index, state.num_processes, device


def cmd_evaluate_generate(args: argparse.Namespace) -> int:
    """``realigndiff evaluate generate``: one configuration's images of one prompt set."""
    from ..evaluation.configs import load_config
    from ..evaluation.generate import generate_images
    from ..evaluation.prompts import load_prompts

    try:
        config = load_config(args.config)
    except ValueError as error:
        raise CLIError(f"--config {args.config}: {error}", EXIT_USAGE) from None
    changes: dict[str, Any] = dict(args.overrides)
    for flag in ("name", "model", "lora", "unet", "steps", "guidance", "height", "width", "images_per_prompt"):
        value = getattr(args, flag)
        if value is not None:
            changes[flag] = value
    if args.dtype:
        changes["dtype"] = args.dtype
    try:
        config = config.replace(**changes) if changes else config
    except (ValueError, TypeError) as error:
        raise CLIError(str(error), EXIT_USAGE) from None
    try:
        records = load_prompts(args.prompts, limit=args.limit, seed=args.sample_seed)
    except ValueError as error:
        raise CLIError(f"--prompts {args.prompts}: {error}", EXIT_USAGE) from None
    index, count, accelerate_device = _process_share(args)
    if args.device:
        ns = argparse.Namespace(device=args.device, dtype=args.dtype or config.dtype)
        device, dtype = _device_and_dtype(ns)
    else:
        device, dtype = accelerate_device, None
    if index == 0:
        print(f"{PROG} evaluate generate: {config.name} on {len(records)} prompt(s) of {args.prompts} -> {args.out}"
              + (f" ({count} processes)" if count > 1 else ""), flush=True)
    try:
        with _quiet_loading():
            result = generate_images(
                config, records, args.out, seed=args.seed, batch_size=args.batch_size, process_index=index,
                num_processes=count, progress=not args.quiet, device=device, dtype=dtype,
                benchmark_layouts=() if args.no_benchmark_layouts else ("geneval", "t2icompbench"),
                max_images=args.max_images,
            )
    except ValueError as error:
        raise CLIError(str(error), EXIT_USAGE) from None
    except _LOAD_ERRORS as error:
        name = config.lora if config.lora and "lora" in str(error).lower() else config.model
        raise _load_error("model", name, error, "--model / --lora / --unet") from None
    print(f"process {index}/{count}: generated {result['generated']} image(s), skipped {result['skipped']} already "
          f"written, in {result['seconds']:.1f} s -> {result['out_dir']}", flush=True)
    return EXIT_OK


def cmd_evaluate_score(args: argparse.Namespace) -> int:
    """``realigndiff evaluate score``: metrics of result folders (``evaluation.score.score_folder``)."""
    score = _evaluation_module("score")
    model_paths = dict(args.model_paths)
    for folder in args.folders:
        try:
            result = score.score_folder(folder, args.metrics, batch_size=args.batch_size, progress=not args.quiet,
                                        real_images=args.real_images, **model_paths)
        except (ValueError, FileNotFoundError) as error:
            raise CLIError(f"{folder}: {error}", EXIT_USAGE) from None
        metrics = result.get("metrics", {}) if isinstance(result, dict) else {}
        parts = [f"{name} {value.get('mean'):.4f}" for name, value in metrics.items()
                 if isinstance(value, dict) and isinstance(value.get("mean"), (int, float))]
        print(f"{folder}: {', '.join(parts) or 'scored'}", flush=True)
    return EXIT_OK


def cmd_evaluate_report(args: argparse.Namespace) -> int:
    """``realigndiff evaluate report``: tables and charts (``evaluation.report.write_report``)."""
    report = _evaluation_module("report")
    try:
        files = report.write_report(args.folders, args.out)
    except (ValueError, FileNotFoundError) as error:
        raise CLIError(str(error), EXIT_USAGE) from None
    for name, path in files.items():
        print(f"{name}: {path}")
    return EXIT_OK


def cmd_evaluate_study_page(args: argparse.Namespace) -> int:
    """``realigndiff evaluate study-page``: the human-study page (``evaluation.human.write_study_page``)."""
    human = _evaluation_module("human")
    try:
        path = human.write_study_page(args.folders, args.out, num_prompts=args.num_prompts, seed=args.seed)
    except (ValueError, FileNotFoundError) as error:
        raise CLIError(str(error), EXIT_USAGE) from None
    print(f"wrote {path}")
    return EXIT_OK


def cmd_evaluate_study_results(args: argparse.Namespace) -> int:
    """``realigndiff evaluate study-results``: alignment from rankings (``evaluation.human``)."""
    human = _evaluation_module("human")
    try:
        result = human.alignment_from_rankings(args.files)
    except (ValueError, FileNotFoundError) as error:
        raise CLIError(str(error), EXIT_USAGE) from None
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if args.out:
        _save(lambda path: path.write_text(text + "\n"), Path(args.out))
    return EXIT_OK
