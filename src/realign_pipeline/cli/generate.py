"""``realigndiff generate``: RealignDiff on a Stable Diffusion model (coarse image -> dense caption -> re-aligned
image), or a hand-written layout, with the Figure 6 panel and the Figure 7 attention maps per prompt.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from ..captioner.build import DEFAULT_CAPTIONER_SETTINGS, build_captioner, build_llm
from .common import (
    DTYPES,
    EXIT_OK,
    EXIT_USAGE,
    LOAD_ERRORS,
    PROG,
    CLIError,
    HelpFormatter,
    collect_warnings,
    device_and_dtype,
    int_in,
    layout_words,
    load_error,
    load_layout,
    save_file,
)

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
#: ``--pipeline``: from the model's model_index.json, or Stable Diffusion 1.x/2.x, or XL, whatever it says.
PIPELINE_CHOICES = ("auto", "sd", "xl")
#: Classifier-free guidance without ``--guidance``: each pipeline's own default.
DEFAULT_GUIDANCE = {"sd": 7.5, "xl": 5.0}
DEFAULT_TAGGER = DEFAULT_CAPTIONER_SETTINGS["tagger_model"]
DEFAULT_DETECTOR = DEFAULT_CAPTIONER_SETTINGS["detector"]
DEFAULT_SEGMENTER = DEFAULT_CAPTIONER_SETTINGS["segmenter"]

GENERATE_DESCRIPTION = """\
Generate images with RealignDiff: a coarse image, its dense caption (tagger -> LLM -> Grounding DINO + SAM)
as a layout, and the fine image re-generated from the same noise with Eq. 8 attention modulation.

With --layout a hand-written layout is used instead of captioning: the same seed is generated without and
with the layout, so the pictures compare the two. Stable Diffusion 1.x/2.x runs RealignDiffPipeline; an SDXL
checkpoint (model_index.json naming StableDiffusionXLPipeline or RealignDiffXLPipeline, or --pipeline xl) runs
RealignDiffXLPipeline, at 1024x1024 and guidance 5 unless told otherwise. Per prompt, in OUT/NNN-<prompt>/:

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
  {PROG} generate "a red book and a yellow vase" --model stabilityai/stable-diffusion-xl-base-1.0 --variant fp16
  {PROG} generate "a red book" --device cpu --dtype float32 --steps 20   (no GPU: expect minutes)

errors exit with code 2 and one line saying what to do (no cached weights and no network, no GPU,
float16 on the CPU, a bad layout file).
"""


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="generate images with RealignDiff (coarse -> dense caption -> re-aligned), with pictures",
        description=GENERATE_DESCRIPTION,
        epilog=GENERATE_EPILOG,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("prompts", nargs="*", metavar="PROMPT", help="text prompts (one image each)")
    parser.add_argument("--prompts-file", metavar="FILE", help="a text file with one prompt per line (blank lines skipped)")
    parser.add_argument("--out", default="outputs/generate", help="folder for the images, layouts and pictures")
    model = parser.add_argument_group("model")
    model.add_argument("--model", default=DEFAULT_MODEL, help="diffusers Stable Diffusion 1.x/2.x or XL hub id or local "
                       "folder; `shapes` = the trained shapes world shipped with the package (offline, CPU), `shapes-bow` its "
                       "second world (a text encoder trained without colour-swapped negatives), `shapes-triples` the "
                       "third (three objects at 48 px on that text encoder)")
    model.add_argument("--pipeline", choices=PIPELINE_CHOICES, default="auto",
                       help="auto: RealignDiffXLPipeline when the model's model_index.json names an SDXL pipeline, "
                       "else RealignDiffPipeline; sd / xl: that one (when model_index.json cannot be read)")
    model.add_argument("--variant", help="the weights' variant to load, e.g. fp16 (SDXL's half-size files)")
    model.add_argument("--lora", metavar="ID_OR_PATH", help="LoRA weights (e.g. a ReFL LoRA) loaded with load_lora_weights")
    model.add_argument("--device", help="cuda, cuda:1, cpu, ... (default: cuda when available, else cpu)")
    model.add_argument("--dtype", choices=DTYPES, help="(default: float16 on a GPU, float32 on the CPU)")
    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--seed", type=int, default=42, help="seed of the initial noise (one per prompt: seed + index)")
    sampling.add_argument("--steps", type=int_in(1, 1000), default=50, help="denoising steps (per stage)")
    sampling.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: 7.5; 5 for SDXL)")
    sampling.add_argument("--height", type=int_in(8, 4096), help="image height, multiple of 8 (default: the model's, "
                          "the UNet's sample size x the VAE's scale: 512 for SD 1.5, 1024 for SDXL)")
    sampling.add_argument("--width", type=int_in(8, 4096), help="image width, multiple of 8 (default: the model's)")
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
    realign.add_argument("--box-threshold", type=float, default=DEFAULT_CAPTIONER_SETTINGS["box_threshold"],
                         help="Grounding DINO box threshold")
    realign.add_argument("--text-threshold", type=float, default=DEFAULT_CAPTIONER_SETTINGS["text_threshold"],
                         help="Grounding DINO text threshold")
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


def _captioner_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The captioner's settings (:func:`~realign_pipeline.captioner.build_captioner`) from the flags, after the
    CLI's own rules: ``--llm openai`` without a key or server falls back to the rule-based LLM (with a warning),
    ``--llm local`` needs ``--llm-model``."""
    import os

    settings = {key: getattr(args, key) for key in DEFAULT_CAPTIONER_SETTINGS}
    if args.llm == "openai" and not (os.environ.get("OPENAI_API_KEY") or args.llm_base_url
                                     or os.environ.get("OPENAI_BASE_URL")):
        print(
            f"{PROG} generate: warning: no OpenAI key (OPENAI_API_KEY) and no --llm-base-url: "
            "falling back to rule-based.",
            file=sys.stderr,
        )
        settings["llm"] = "rule"
    if args.llm == "local" and not args.llm_model:
        raise CLIError("--llm local needs --llm-model (a chat model's hub id or folder).", EXIT_USAGE)
    return settings


def _load_error_hook(args: argparse.Namespace):
    """Turns a captioner part's loading error into the CLI's one-line message naming its flag."""

    def hook(part: str, setting: str, error: BaseException) -> CLIError | None:
        if not isinstance(error, LOAD_ERRORS):
            return None
        return load_error(part, getattr(args, setting), error, "--" + setting.replace("_", "-"))

    return hook


def _make_llm(args: argparse.Namespace):
    return build_llm(_captioner_settings(args), on_load_error=_load_error_hook(args))


def _default_captioner_options(args: argparse.Namespace) -> bool:
    """True when no captioner model was chosen on the command line."""
    return (args.tagger_model, args.detector, args.segmenter, args.tag_threshold) == (
        DEFAULT_TAGGER, DEFAULT_DETECTOR, DEFAULT_SEGMENTER, None)


def _make_captioner(args: argparse.Namespace, device: str):
    """The dense captioner with its detector and segmenter loaded now (a missing model fails before any
    generation), built by :func:`~realign_pipeline.captioner.build_captioner`."""
    return build_captioner(_captioner_settings(args), device, on_load_error=_load_error_hook(args))


def _slug(prompt: str, index: int) -> str:
    import re

    words = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:48].rstrip("-")
    return f"{index:03d}-{words or 'prompt'}"


def _pipeline_family(args: argparse.Namespace, model: str) -> str:
    """``"sd"`` or ``"xl"``: ``--pipeline``, checked against the model's model_index.json when there is one."""
    from ..evaluation.configs import model_family

    detected, class_name = model_family(model)
    if args.pipeline == "auto":
        return detected or "sd"
    if detected is not None and detected != args.pipeline:
        raise CLIError(
            f"--pipeline {args.pipeline}: {args.model}'s model_index.json names {class_name}, a "
            f"{'Stable Diffusion XL' if detected == 'xl' else 'Stable Diffusion 1.x/2.x'} pipeline; use --pipeline "
            f"{detected} (or auto).",
            EXIT_USAGE,
        )
    return args.pipeline


def _load_pipeline(family: str, model: str, dtype: Any, variant: str | None):
    """RealignDiffPipeline (no safety checker) or RealignDiffXLPipeline from `model`."""
    extra = {"variant": variant} if variant else {}
    if family == "xl":
        from ..pipeline_xl import RealignDiffXLPipeline

        return RealignDiffXLPipeline.from_pretrained(model, dtype=dtype, **extra)
    from ..pipeline import RealignDiffPipeline

    return RealignDiffPipeline.from_pretrained(model, dtype=dtype, safety_checker=None, requires_safety_checker=False,
                                               **extra)


def cmd_generate(args: argparse.Namespace) -> int:
    """``realigndiff generate``: RealignDiff on a real (or local) Stable Diffusion (1.x/2.x or XL) model, with
    pictures."""
    import torch

    from ..layout import Layout
    from ..visualize import display_size, figure6_panel, figure7_maps

    prompts = _read_prompts(args)
    hand_layout = load_layout(args.layout) if args.layout else None
    if hand_layout is not None and args.realign:
        raise CLIError("--layout and --realign exclude each other: a hand layout replaces the captioner.", EXIT_USAGE)
    for name in ("height", "width"):
        value = getattr(args, name)
        if value is not None and value % 8:
            raise CLIError(f"--{name} {value}: must be a multiple of 8 (Stable Diffusion's rule).", EXIT_USAGE)
    device, dtype = device_and_dtype(args)
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
    from ..shapes.pretrained import SHAPES_WORLDS, shapes_model_path

    if model in SHAPES_WORLDS or model in {f"shapes:{folder}" for folder in SHAPES_WORLDS.values()}:
        try:
            model = str(shapes_model_path(SHAPES_WORLDS.get(model) or model.removeprefix("shapes:")))
        except FileNotFoundError as error:
            raise CLIError(str(error)) from None
    family = _pipeline_family(args, model)
    try:
        with collect_warnings(notes):
            pipe = _load_pipeline(family, model, dtype, args.variant)
    except LOAD_ERRORS as error:
        raise load_error("model", args.model, error, "--model") from None
    if args.lora:
        try:
            pipe.load_lora_weights(args.lora)
        except LOAD_ERRORS as error:
            raise load_error("LoRA", args.lora, error, "--lora") from None
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
                    pipe.dense_captioner.llm = _make_llm(args)
                notes.append("using the dense captioner saved with the model (pass --tagger-model/--detector/"
                             "--segmenter to replace it)")
            else:
                pipe.dense_captioner = _make_captioner(args, device)
            realign = True
        except CLIError as error:
            if args.realign:  # asked for explicitly: a missing captioner model is an error
                raise
            print(f"{PROG} generate: warning: no re-alignment ({error}); generating plain images.", file=sys.stderr)
        timings["captioner load"] = time.perf_counter() - start

    guidance = DEFAULT_GUIDANCE[family] if args.guidance is None else args.guidance
    # the model's size: the UNet's sample size x the VAE's scale (what the pipelines default to)
    sample = pipe.unet.config.sample_size
    sample_h, sample_w = (sample, sample) if isinstance(sample, int) else sample
    height = args.height or sample_h * pipe.vae_scale_factor
    width = args.width or sample_w * pipe.vae_scale_factor
    common = {"height": height, "width": width, "num_inference_steps": args.steps,
              "guidance_scale": guidance, "return_attention_maps": True}
    files: list[Path] = []
    stage_times = {"generate": 0.0, "pictures": 0.0}
    summary_rows = []
    for index, prompt in enumerate(prompts):
        folder = out / _slug(prompt, index)
        folder.mkdir(parents=True, exist_ok=True)
        seed = args.seed + index
        print(f"[{index + 1}/{len(prompts)}] {prompt}", flush=True)
        start = time.perf_counter()
        with collect_warnings(notes):
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
        written = [save_file(image.save, folder / "image.png")]
        if coarse_image is not None:
            written.append(save_file(coarse_image.save, folder / "coarse.png"))
        if resolved is not None:
            # written when empty too: its source says why the captioner kept nothing
            layout = Layout(resolved.regions, source=resolved.source)
            written.append(save_file(layout.to_json, folder / "layout.json"))
        if resolved is not None and len(resolved):
            if coarse_image is not None:
                written.append(save_file(figure6_panel(coarse_image, resolved.regions, image).save, folder / "panel.png"))
            if before is not None:
                words = args.words or layout_words(pipe.tokenizer, resolved)
                after = final.attention_maps[0]
                words = [word for word in words if word in before and word in after]
                if words:
                    maps = figure7_maps(before, after, words, display_size(image.size, 128))
                    written.append(save_file(maps.save, folder / "attention_maps.png"))
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
        "model": args.model, "pipeline": type(pipe).__name__, "lora": args.lora, "device": device,
        "dtype": str(dtype).replace("torch.", ""), "height": height, "width": width,
        "steps": args.steps, "guidance": guidance, "mode": "layout" if hand_layout else
        ("realign" if realign else "plain"), "prompts": summary_rows,
        "timings_s": {key: round(value, 3) for key, value in timings.items()},
    }
    files.append(save_file(lambda path: path.write_text(json.dumps(summary, indent=2) + "\n"), out / "summary.json"))
    total = sum(timings.values())
    stages = ", ".join(f"{key} {value:.1f} s" for key, value in timings.items())
    print(f"wrote {len(files)} files for {len(prompts)} prompt(s) to {out}/ in {total:.1f} s: {stages}")
    return EXIT_OK
