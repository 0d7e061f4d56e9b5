"""``realigndiff demo``: the trained shapes world before and after re-alignment (:mod:`.shapes_demo`), or, with
``--tiny``, plain vs layout-guided generation on the tiny random model, with the attention maps and how much of
each phrase's attention lands in its region.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .common import (
    EXIT_OK,
    EXIT_USAGE,
    PROG,
    CLIError,
    HelpFormatter,
    collect_warnings,
    int_in,
    job_bar,
    load_layout,
    phrase_words,
    quiet_loading,
    save_file,
    torch_threads,
)

DEMO_PROMPT = "a red book and a yellow vase"
#: The built-in demo layout: the book in the left half, the vase in the right half (image fractions).
DEMO_REGIONS: tuple[tuple[str, list[float]], ...] = (
    ("red book", [0.05, 0.35, 0.45, 0.95]),
    ("yellow vase", [0.55, 0.15, 0.95, 0.95]),
)
MAX_DEMO_SIDE = 256
DEMO_PANEL_TITLES = ("plain", "layout (phrase, score)", "realigned")


def _image_side(text: str) -> int:
    value = int_in(8, MAX_DEMO_SIDE)(text)
    if value % 8:
        raise argparse.ArgumentTypeError(f"must be a multiple of 8 (Stable Diffusion's rule), got {value}")
    return value


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


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="before/after re-alignment in the trained shapes world (offline); --tiny: a random model, the code path",
        description=DEMO_DESCRIPTION,
        epilog=DEMO_EPILOG,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--tiny", action="store_true",
                        help="the tiny random model instead of the trained shapes world (noise images: the code path only)")
    parser.add_argument("--prompt", default=None,
                        help=f"the text prompt (default: the shapes world's; with --tiny: {DEMO_PROMPT!r})")
    parser.add_argument("--out", default="outputs/demo", help="folder for the pictures and JSON files")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed of the first image (the next images take the next seeds; the same noise for "
                        "both runs); without it the shapes world searches for seeds it gets wrong (--tiny: 42)")
    parser.add_argument("--search_seeds", type=int_in(1, 10000), default=32, metavar="N",
                        help="shapes world without --seed: seeds 0..N-1 searched for plain images the checker reads wrong")
    parser.add_argument("--num_images", type=int_in(1, 64), default=4, metavar="N",
                        help="shapes world: how many seeds to show")
    parser.add_argument("--steps", type=int_in(1, 1000), default=20, help="denoising steps")
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
        type=int_in(0, 1024),
        default=1,
        help="CPU threads for torch; 0 = torch's default (all cores). The tiny model gains little from threads, "
        "and on a busy machine several threads wait on each other (10x slower seen on 2 shared cores)",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(func=cmd_demo)


def demo_layout():
    """The built-in layout of the demo prompt: "red book" in the left half, "yellow vase" in the right half."""
    from ..layout import Layout, Region

    return Layout([Region(phrase, box=box, score=2.0) for phrase, box in DEMO_REGIONS])


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


def attention_share(maps: dict, words: Sequence[str], mask) -> float:
    """Share of the words' summed attention that falls inside `mask` (coverage in [0, 1], at the maps' size)."""
    total = sum(maps[word].float().clamp(min=0) for word in words)
    mass = float(total.sum())
    return float((total * mask).sum()) / mass if mass > 0 else 0.0


def cmd_demo(args: argparse.Namespace) -> int:
    """``realigndiff demo``: the trained shapes world before/after re-alignment, or (``--tiny``) plain vs
    layout-guided generation on the tiny random model, with pictures."""
    if not getattr(args, "tiny", False):
        try:
            from .shapes_demo import shapes_demo
        except ModuleNotFoundError as error:
            if error.name not in ("realign_pipeline.shapes", "realign_pipeline.cli.shapes_demo"):
                raise
            raise CLIError("the shapes-world demo is not in this installation; run `realigndiff demo --tiny`.") from None
        return shapes_demo(args)
    args.prompt = args.prompt or DEMO_PROMPT
    args.seed = 42 if args.seed is None else args.seed
    args.height = args.height or 64
    args.width = args.width or 64
    with torch_threads(args.threads):
        return _demo(args)


def _demo(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from ..layout import LayoutError, resolve_layout
    from ..pipeline import RealignDiffPipeline
    from ..testing import tiny_pipeline
    from ..visualize import PALETTE, attention_grid, display_size, figure6_panel, overlay_layout, region_box

    layout = load_layout(args.layout) if args.layout else demo_layout()
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CLIError(f"cannot create the output folder {out}: {error}") from None
    print(_intro(args.prompt, layout, args.layout), flush=True)

    timings: dict[str, float] = {}
    notes: list[str] = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="realigndiff-demo-") as save_dir, quiet_loading():
        pipe = tiny_pipeline(RealignDiffPipeline, save_dir=save_dir)
    timings["load"] = time.perf_counter() - start

    try:
        with collect_warnings(notes):
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
    runs = (("plain", None), ("realigned", layout))
    with job_bar(pipe, len(runs), args.quiet) as bar:
        for name, run_layout in runs:
            bar.set_description_str(name)
            start = time.perf_counter()
            with collect_warnings(notes):
                outputs[name] = pipe(
                    prompt, layout=run_layout, generator=torch.Generator("cpu").manual_seed(args.seed), **call
                )
            timings[name] = time.perf_counter() - start
            bar.update()
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
        save_file(outputs["plain"].images[0].save, out / "plain.png"),
        save_file(image.save, out / "realigned.png"),
        save_file(layout.to_json, out / "layout.json"),
        save_file(overlay_layout(image, layout).save, out / "layout.png"),
        save_file(attention_grid(before, after, list(boxes), cell, boxes=boxes).save, out / "attention_maps.png"),
        save_file(figure6_panel(outputs["plain"].images[0], resolved.regions, image, titles=DEMO_PANEL_TITLES).save,
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
    files.append(save_file(lambda path: path.write_text(json.dumps(summary, indent=2) + "\n"), out / "summary.json"))

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
