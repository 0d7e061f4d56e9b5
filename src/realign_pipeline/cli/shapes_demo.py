"""`realigndiff demo` on the trained shapes world: real pictures of a prompt before and after re-alignment.

Unless the user gives ``--seed``, it first searches seeds 0..N-1 for images the plain pipeline gets wrong (as
the world's independent checker reads them), since most coarse images already bind right and would show
nothing changing. For the chosen seeds it runs the coarse pass, the world's dense captioner (classical
segmenter -> rule-based LLM -> masks) and the fine pass, and writes per seed the Figure 6 panel, the Figure 7
attention maps of the first seed and what the checker sees in each image. Beside the examples it prints the
fix and break rates measured for this configuration (``assets/shapes/demo_rates.json``), and for the first
seed a layout-control panel: the plain image against the image generated with a layout read from the prompt.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from contextlib import ExitStack
from importlib import resources
from pathlib import Path
from typing import Any

import PIL.Image

from ..shapes.world import SIDE_BOXES  # each side's half of the image, as in the layout-control runs
from .common import (
    CLIError,
    collect_warnings,
    job_bar,
    layout_words,
    load_layout,
    quiet_loading,
    save_file,
    torch_threads,
)

__all__ = [
    "DEFAULT_PROMPT",
    "DEFAULT_PROMPT_CHOICE",
    "DEFAULT_SEARCH_SEEDS",
    "DEFAULT_SEEDS",
    "LAYOUT_CONTROL_SETTING",
    "SIDE_BOXES",
    "load_measured_rates",
    "measured_rates_path",
    "prompt_layout",
    "shapes_demo",
]

#: A held-out relation prompt (a pairing never seen together in training), chosen by :data:`DEFAULT_PROMPT_CHOICE`.
DEFAULT_PROMPT = "a purple triangle to the left of a blue square"
#: How the default prompt was chosen: an example of the method at work, shown beside its odds over all prompts.
DEFAULT_PROMPT_CHOICE = (
    "the held-out relation prompt whose wrongly placed coarse images the fine stage with relation correction "
    "fixed most often in the measurement below (2 of 2, seeds 0-2; ties: the higher share; "
    "docs/shapes_relation_correction.json)"
)
DEFAULT_SEEDS = 4
#: Seeds 0..N-1 searched for coarse images the checker reads wrong when the user gives no ``--seed``.
DEFAULT_SEARCH_SEEDS = 32
DEFAULT_SIDE = 32
#: The classifier-free guidance the shapes UNet was validated with (and the shapes presets use).
DEFAULT_GUIDANCE = 4.0
#: Images per pipeline call of the seed search (plain pass only): bounds memory for large ``--search_seeds``.
SEARCH_BATCH = 16
#: The layout-control setting measured in docs/shapes_layout_control.json (chosen by
#: ``training/shapes/layout_control.py sweep`` on training pairings, scored there on the held-out prompts).
LAYOUT_CONTROL_SETTING: dict[str, float] = {
    "cross_attention_strength": 1.0,
    "modulation_fraction": 0.3,
    "timestep_power": 1.0,
    "self_attention_strength": 0.3,
}
#: Shorter side of each cell of panel.png.
PANEL_SIDE = 160
#: layout_control.png is drawn larger: at 160 px a half-image box is narrower than its "phrase (s=2)" label.
LAYOUT_PANEL_SIDE = 256
PADDING = 6
#: The measured fix and break rates of the demo's configuration, inside the package.
RATES_FILE = ("assets", "shapes", "demo_rates.json")
#: What the rates file holds per read-out, for the fine stage and for the placebo.
RATE_KEYS = ("fixed", "base_wrong", "fix_rate", "fix_rate_ci", "broken", "base_right", "break_rate", "break_rate_ci")
#: Prompt sets a rates file may name, and the `shapes.world` function that lists their prompts.
_PROMPT_SETS = {"realign_pipeline.shapes.world.held_out_prompts()": "held_out_prompts"}


def _stack(images: list[PIL.Image.Image], padding: int = PADDING) -> PIL.Image.Image:
    width = max(image.width for image in images)
    height = sum(image.height for image in images) + padding * (len(images) - 1)
    canvas = PIL.Image.new("RGB", (width, height), (255, 255, 255))
    y = 0
    for image in images:
        canvas.paste(image, (0, y))
        y += image.height + padding
    return canvas


def _row(images: list[PIL.Image.Image], padding: int = PADDING) -> PIL.Image.Image:
    """Images side by side with a white margin, as `figure6_panel` lays out its cells."""
    width = sum(image.width for image in images) + padding * (len(images) + 1)
    height = max(image.height for image in images) + 2 * padding
    canvas = PIL.Image.new("RGB", (width, height), (255, 255, 255))
    x = padding
    for image in images:
        canvas.paste(image, (x, padding))
        x += image.width + padding
    return canvas


def _objects(prompt: str) -> list[dict[str, Any]] | None:
    """The objects a shapes-world caption names, or None for any other prompt (the checker cannot judge it)."""
    from ..shapes.metric import parse_shapes_prompt

    try:
        return parse_shapes_prompt(prompt)
    except ValueError:
        return None


def _is_wrong(reading: dict[str, Any]) -> bool:
    """A coarse image to fix: a prompted (colour, shape) pair missing, or the sides the prompt names swapped."""
    return reading["binding"] == 0 or reading["position"] == 0


def _verdict(image: PIL.Image.Image, objects: list[dict[str, Any]] | None) -> dict[str, Any]:
    """What the checker sees, and (for a shapes-world caption) whether it matches the prompt."""
    from ..shapes import checker

    if objects is None:  # not one of the world's caption forms: report what is seen, judge nothing
        seen = [f"{d['color']} {d['shape']}" for d in checker.detect(image)]
        return {"presence": None, "binding": None, "binding_fraction": None, "position": None, "seen": seen}
    result = checker.check_prompt(image, objects)
    return {key: result[key] for key in ("presence", "binding", "binding_fraction", "position")} | {
        "seen": [f"{d['color']} {d['shape']}" for d in result["detected"]]
    }


def _describe(verdict: dict[str, Any]) -> str:
    """``"blue circle, yellow square [position wrong]"``: what is seen, and what of the prompt is wrong."""
    seen = ", ".join(verdict["seen"]) or "nothing"
    if verdict["binding"] is None:
        return seen
    wrong = [key for key in ("binding", "position") if verdict[key] == 0]
    return f"{seen} [{', '.join(wrong) + ' wrong' if wrong else 'right'}]"


def _seed_range(seeds: list[int]) -> str:
    return ", ".join(map(str, seeds))


# --- seed selection --------------------------------------------------------------------------------------------
def _search_seeds(
    pipe, prompt: str, objects: list[dict[str, Any]], search: int, wanted: int, call: dict[str, Any],
    bar: Any = None,
) -> tuple[list[int], dict[str, Any]]:
    """Seeds 0..search-1 through the plain pipeline (coarse pass only); the first `wanted` whose image the
    checker reads wrong, filled with the next seeds when there are fewer. `bar` (tqdm) counts the images."""
    import torch

    from ..shapes import checker

    wrong: list[int] = []
    for start in range(0, search, SEARCH_BATCH):
        batch = list(range(start, min(start + SEARCH_BATCH, search)))
        # one generator per image: the same noise as a single call with that seed, so the same coarse image
        images = pipe([prompt] * len(batch), generator=[torch.Generator().manual_seed(s) for s in batch], **call).images
        wrong += [s for s, image in zip(batch, images) if _is_wrong(checker.check_prompt(image, objects))]
        if bar is not None:
            bar.update(len(batch))
    chosen = wrong[:wanted]
    filled = [s for s in range(search) if s not in wrong][: wanted - len(chosen)]
    filled += list(range(search, search + wanted - len(chosen) - len(filled)))
    sides = any(o["side"] for o in objects)
    rule = (f"the first {wanted} of seeds 0..{search - 1} whose plain (coarse) image the checker reads wrong "
            f"(binding == 0{', or position == 0' if sides else ''})")
    selection = {
        "rule": rule, "searched": [0, search - 1], "searched_count": search, "wrong_count": len(wrong),
        "wrong_seeds": wrong, "chosen": chosen + filled, "filled": filled,
    }
    return chosen + filled, selection


def _unsearched_seeds(seed: int | None, count: int) -> tuple[list[int], dict[str, Any]]:
    """Seeds given by the user (`seed` onwards), or, for a prompt the checker cannot judge, the first ones."""
    if seed is not None:
        seeds, rule = [seed + k for k in range(count)], "seeds given by the user (--seed), no search"
    else:
        seeds, rule = list(range(count)), "the first seeds, no search: the checker judges only the world's caption forms"
    return seeds, {"rule": rule, "searched": None, "searched_count": 0, "wrong_count": None, "wrong_seeds": None,
                   "chosen": seeds, "filled": []}


def _selection_message(selection: dict[str, Any]) -> str:
    seeds = _seed_range(selection["chosen"])
    if selection["searched"] is None:
        return f"seeds {seeds}: {selection['rule']}"
    message = (f"seeds {seeds}: {selection['rule']}; {selection['wrong_count']} of the "
               f"{selection['searched_count']} were wrong")
    right = [s for s in selection["filled"] if s < selection["searched_count"]]
    unsearched = [s for s in selection["filled"] if s >= selection["searched_count"]]
    fill = [f"{_seed_range(right)} (coarse image right)" if right else "",
            f"{_seed_range(unsearched)} (not searched)" if unsearched else ""]
    if selection["filled"]:
        message += f"; too few, so seeds {' and '.join(f for f in fill if f)} fill the rest"
    return message


# --- measured rates --------------------------------------------------------------------------------------------
def measured_rates_path() -> Path:
    """Where the package keeps the measured fix and break rates of the demo's configuration."""
    return Path(str(resources.files("realign_pipeline").joinpath(*RATES_FILE)))


def load_measured_rates(path: str | Path | None = None) -> tuple[dict[str, Any] | None, str | None]:
    """The measured rates (``demo_rates.json``) and None, or None and why they cannot be shown."""
    path = Path(path) if path is not None else measured_rates_path()
    try:
        rates = json.loads(path.read_text())
    except FileNotFoundError:
        return None, f"the measured rates are not in this installation ({path} is missing)"
    except (OSError, ValueError) as error:
        return None, f"cannot read the measured rates {path}: {error}"
    required = ("configuration", "binding", "placebo")
    if not isinstance(rates, dict) or not all(isinstance(rates.get(key), dict) for key in required):
        return None, f"{path} is not a rates file (it needs {', '.join(required)})"
    missing = [f"{block}.{key}" for block in ("binding", "placebo") for key in RATE_KEYS if key not in rates[block]]
    if missing:
        return None, f"{path} is not a rates file (no {', '.join(missing)})"
    return rates, None


def _rate(block: dict[str, Any], kind: str) -> str:
    low, high = block[f"{kind}_rate_ci"]
    return f"{block[f'{kind}_rate']:.3f} [{low:.3f}, {high:.3f}]"


def _rates_line(method: dict[str, Any], placebo: dict[str, Any]) -> str:
    return (
        f"the fine stage fixed {method['fixed']} of {method['base_wrong']} coarse-wrong images (rate "
        f"{_rate(method, 'fix')}) and broke {method['broken']} of {method['base_right']} coarse-right ones "
        f"({_rate(method, 'break')}); a placebo (phrases exchanged) fixed {placebo['fixed']} of "
        f"{placebo['base_wrong']} ({placebo['fix_rate']:.3f}) and broke {placebo['broken']} of "
        f"{placebo['base_right']} ({placebo['break_rate']:.3f})"
    )


def _print_rates(
    rates: dict[str, Any] | None, problem: str | None, differences: list[str], with_position: bool
) -> None:
    if rates is None:
        print(f"no measured rates to show: {problem}")
        return
    print(f"measured on {rates.get('prompt_set', 'an unnamed prompt set')}:")
    print(f"  binding: {_rates_line(rates['binding'], rates['placebo'])}")
    blocks = ("position", "position_placebo")
    if with_position and all(set(RATE_KEYS) <= set(rates.get(block) or ()) for block in blocks):
        print(f"  position: {_rates_line(rates['position'], rates['position_placebo'])}")
    if differences:
        print(f"  these are the rates of that configuration, not of this prompt ({'; '.join(differences)})")


def _rates_differences(
    rates: dict[str, Any], prompt: str, call: dict[str, Any], hand_layout: bool, correct_relations: bool
) -> list[str]:
    """How this run differs from the configuration the rates were measured on (empty: it does not)."""
    from ..shapes import world

    config = rates["configuration"]
    differences = []
    if rates.get("world") != "shapes":
        differences.append(f"world {rates.get('world')!r} there, 'shapes' here")
    listing = _PROMPT_SETS.get(config.get("prompts"))
    forms = tuple(config["forms"]) if config.get("forms") else None
    if listing is None or prompt not in {record["prompt"] for record in getattr(world, listing)(forms)}:
        differences.append("this prompt is not one of them")
    if "correct_relations" in config and config["correct_relations"] != correct_relations:
        differences.append(f"relation correction {'on' if config['correct_relations'] else 'off'} there, "
                           f"{'on' if correct_relations else 'off'} here")
    for key in ("height", "width", "num_inference_steps", "guidance_scale"):
        if config.get(key) != call[key]:
            differences.append(f"{key} {config.get(key)} there, {call[key]} here")
    if hand_layout:
        differences.append("--layout replaces the dense caption here")
    return differences


# --- layout control --------------------------------------------------------------------------------------------
def prompt_layout(objects: list[dict[str, Any]]) -> tuple[Any, list[dict[str, Any]]]:
    """A layout read from a two-object shapes caption: each "colour shape" phrase in its side's half of the
    image, and the objects with their sides (for the checker's position).

    Prompts that name no side ("and", "with") put the first-mentioned object on the left.
    """
    from ..layout import Layout, Region

    if len(objects) != 2:
        raise ValueError(f"a side layout needs two objects, the prompt names {len(objects)}")
    if any(o["side"] is None for o in objects):
        objects = [{**o, "side": side} for o, side in zip(objects, ("left", "right"))]
    layout = Layout([Region(f"{o['color']} {o['shape']}", box=list(SIDE_BOXES[o["side"]])) for o in objects])
    return layout, objects


def _layout_panel(layout, plain: PIL.Image.Image, guided: PIL.Image.Image) -> PIL.Image.Image:
    """``layout boxes with their phrases | plain image | image with the layout``, enlarged alike."""
    from ..shapes.world import BACKGROUND
    from ..visualize import display_size, overlay_layout, titled

    size = display_size(plain.size, LAYOUT_PANEL_SIDE)
    blank = PIL.Image.new("RGB", plain.size, BACKGROUND)
    cells = [
        overlay_layout(blank, layout, min_side=LAYOUT_PANEL_SIDE).resize(size, PIL.Image.Resampling.NEAREST),
        plain.convert("RGB").resize(size, PIL.Image.Resampling.NEAREST),
        guided.convert("RGB").resize(size, PIL.Image.Resampling.NEAREST),
    ]
    titles = ("layout (phrase, score)", "plain", "with the layout")
    return _row([titled(cell, title, PADDING) for cell, title in zip(cells, titles)])


def _layout_control(
    pipe, prompt: str, objects: list[dict[str, Any]], seed: int, plain: PIL.Image.Image, call: dict[str, Any],
    out: Path, files: list[Path],
) -> dict[str, Any]:
    """The image of `seed` generated with the prompt's side layout, saved with its panel (appended to `files`),
    and what the checker reads in it and in `plain`, the plain image of the same seed."""
    import torch

    layout, sided = prompt_layout(objects)
    guided = pipe(prompt, layout=layout, generator=torch.Generator().manual_seed(seed), **call,
                  **LAYOUT_CONTROL_SETTING).images[0]
    files.append(save_file(guided.save, out / f"layout_{seed}.png"))
    files.append(save_file(_layout_panel(layout, plain, guided).save, out / "layout_control.png"))
    return {
        "seed": seed, "setting": dict(LAYOUT_CONTROL_SETTING), "setting_from": "docs/shapes_layout_control.json",
        "sides": ("sides from the prompt" if all(o["side"] for o in objects)
                  else "the first-mentioned object on the left: the prompt names no side"),
        "regions": [{"phrase": r.phrase, "box": list(r.box)} for r in layout],
        "plain": _reading(plain, sided), "with_layout": _reading(guided, sided),
        "images": {"plain": f"coarse_{seed}.png", "with_layout": f"layout_{seed}.png"},
    }


def _reading(image: PIL.Image.Image, objects: list[dict[str, Any]]) -> dict[str, float | None]:
    from ..shapes import checker

    result = checker.check_prompt(image, objects)
    return {key: result[key] for key in ("position", "binding", "presence")}


def _judged(reading: dict[str, Any]) -> str:
    return ", ".join(f"{key} {'right' if reading[key] else 'wrong'}" for key in ("position", "binding"))


# --- the demo --------------------------------------------------------------------------------------------------
def shapes_demo(args: argparse.Namespace) -> int:
    """Run the demo with the parsed ``realigndiff demo`` arguments; returns the process exit code."""
    import torch

    from ..shapes.pretrained import load_shapes_pipeline
    from ..visualize import display_size, figure6_panel, figure7_maps

    prompt = args.prompt or DEFAULT_PROMPT
    height, width = args.height or DEFAULT_SIDE, args.width or DEFAULT_SIDE
    num_images = getattr(args, "num_images", None) or DEFAULT_SEEDS
    search = getattr(args, "search_seeds", None) or DEFAULT_SEARCH_SEEDS
    objects = _objects(prompt)
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CLIError(f"cannot create the output folder {out}: {error}") from None
    print(
        f"realigndiff demo: the shapes world (small models trained on procedural scenes, docs/shapes.md).\n"
        f"prompt: {prompt!r}: coarse image -> dense caption -> re-aligned image",
        flush=True,
    )
    if not args.prompt:
        print(f"(the default prompt: {DEFAULT_PROMPT_CHOICE}; `--prompt` takes any caption of the world)", flush=True)
    timings: dict[str, float] = {}
    notes: list[str] = []
    with torch_threads(args.threads), ExitStack() as jobs:
        start = time.perf_counter()
        try:
            with quiet_loading():
                pipe = load_shapes_pipeline()
        except FileNotFoundError as error:
            raise CLIError(f"{error}; `realigndiff demo --tiny` runs without them.") from None
        timings["load"] = time.perf_counter() - start
        hand_layout = load_layout(args.layout) if args.layout else None
        call = {"height": height, "width": width, "num_inference_steps": args.steps, "guidance_scale": DEFAULT_GUIDANCE}
        common = {**call, "return_attention_maps": True}
        searching = args.seed is None and objects is not None
        with_control = hand_layout is None and objects is not None and len(objects) == 2
        # the job's images: the searched seeds, the shown seeds (coarse and fine pass), the layout control's
        total = (search if searching else 0) + num_images + int(with_control)
        bar = jobs.enter_context(job_bar(pipe, total, args.quiet))

        if not searching:
            seeds, selection = _unsearched_seeds(args.seed, num_images)
        else:
            bar.set_description_str("searching seeds")
            start = time.perf_counter()
            with collect_warnings(notes):
                seeds, selection = _search_seeds(pipe, prompt, objects, search, num_images, call, bar)
            timings["search"] = time.perf_counter() - start
        with bar.external_write_mode():  # the message above the bar, not through it
            print(_selection_message(selection), flush=True)

        rows, panels, maps_image = [], [], None
        files: list[Path] = []
        first_coarse = None
        start = time.perf_counter()
        bar.set_description_str("re-aligning" if hand_layout is None else "with the layout")
        for index, seed in enumerate(seeds):
            with collect_warnings(notes):
                if hand_layout is not None:
                    coarse = pipe(prompt, generator=torch.Generator().manual_seed(seed), **common)
                    final = pipe(prompt, layout=hand_layout, generator=torch.Generator().manual_seed(seed), **common)
                    coarse_image, before = coarse.images[0], coarse.attention_maps[0]
                else:
                    final = pipe(prompt, realign=True, generator=torch.Generator().manual_seed(seed), **common)
                    coarse_image = final.coarse_images[0]
                    before = final.coarse_attention_maps[0] if final.coarse_attention_maps else None
            image, resolved = final.images[0], final.layouts[0] if final.layouts else None
            regions = list(resolved.regions) if resolved is not None else []
            if index == 0:  # the plain image of the first seed: a realign call's coarse pass is the plain call
                first_coarse = coarse_image
            files.append(save_file(coarse_image.save, out / f"coarse_{seed}.png"))
            files.append(save_file(image.save, out / f"realigned_{seed}.png"))
            panels.append(figure6_panel(coarse_image, regions, image, min_side=PANEL_SIDE))
            if index == 0 and before is not None and resolved is not None and len(resolved):
                words = [w for w in layout_words(pipe.tokenizer, resolved) if w in before and w in final.attention_maps[0]]
                if words:
                    maps_image = figure7_maps(before, final.attention_maps[0], words, display_size(image.size, 96))
            rows.append({
                "seed": seed,
                "realigned": bool(final.realigned[0]) if final.realigned else hand_layout is not None,
                "phrases": [{"phrase": r.phrase, "score": r.score} for r in regions],
                "coarse": _verdict(coarse_image, objects),
                "realigned_image": _verdict(image, objects),
            })
            bar.update()
        timings["generate"] = time.perf_counter() - start

        if hand_layout is not None:
            control: dict[str, Any] = {"skipped": "--layout is given: the panel would repeat it"}
        elif not with_control:
            control = {"skipped": "the layout is read from a two-object caption of the world (docs/shapes.md)"}
        else:
            bar.set_description_str("layout control")
            start = time.perf_counter()
            with collect_warnings(notes):
                control = _layout_control(pipe, prompt, objects, seeds[0], first_coarse, call, out, files)
            bar.update()
            timings["layout_control"] = time.perf_counter() - start

    rates, rates_problem = load_measured_rates(measured_rates_path())
    correct_relations = bool(getattr(pipe.dense_captioner, "correct_relations", False))
    differences = (
        _rates_differences(rates, prompt, call, hand_layout is not None, correct_relations) if rates is not None else []
    )

    files.append(save_file(_stack(panels).save, out / "panel.png"))
    if maps_image is not None:
        files.append(save_file(maps_image.save, out / "attention_maps.png"))
    keys = ("presence", "binding") + (("position",) if objects and any(o["side"] for o in objects) else ())
    counts = {stage: {key: int(sum(r[stage][key] or 0 for r in rows)) for key in keys}
              for stage in ("coarse", "realigned_image")}
    summary = {
        "world": "shapes", "prompt": prompt,
        "prompt_selection": DEFAULT_PROMPT_CHOICE if not args.prompt else "given by the user (--prompt)",
        "seeds": seeds, "steps": args.steps, "height": height, "width": width,
        "checker": "realign_pipeline.shapes.checker (independent of the captioner's segmenter)",
        "seed_selection": selection,
        "measured_rates": rates,
        "measured_rates_note": rates_problem or (
            f"of that configuration, not of this prompt: {'; '.join(differences)}" if differences else
            "this prompt and configuration are among those measured"),
        "layout_control": control,
        "images": rows, "counts": counts, "notes": list(dict.fromkeys(notes)),
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
    }
    files.append(save_file(lambda path: path.write_text(json.dumps(summary, indent=2) + "\n"), out / "summary.json"))

    print("what the checker sees (coarse -> re-aligned):")
    for row in rows:
        print(f"  seed {row['seed']}: {_describe(row['coarse'])}  ->  {_describe(row['realigned_image'])}")
    n = len(rows)
    if objects is None:
        print("the checker judges only the world's caption forms (docs/shapes.md); this prompt is not one, so "
              "only what it sees is shown")
    else:
        print("right (coarse -> re-aligned): " + ", ".join(
            f"{key} {counts['coarse'][key]}/{n} -> {counts['realigned_image'][key]}/{n}" for key in keys))
    _print_rates(rates, rates_problem, differences, with_position="position" in keys)
    if "skipped" in control:
        print(f"layout control: skipped, {control['skipped']}")
    else:
        print(f"layout control, seed {control['seed']} (each phrase in its side's half, {control['sides']}; "
              f"setting of {control['setting_from']}):\n  plain {_judged(control['plain'])} -> with the layout "
              f"{_judged(control['with_layout'])}")
    for note in summary["notes"]:
        print(f"note: {note}")
    total = sum(timings.values())
    names = dict.fromkeys(re.sub(r"_\d+\.png$", "_*.png", f.name) for f in files)
    print(f"wrote {len(files)} files to {out}/ ({', '.join(names)}) in {total:.1f} s: "
          + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))
    return 0
