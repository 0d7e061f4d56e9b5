"""``realigndiff evaluate``: the paper's evaluation steps (``run``, ``generate``, ``score``, ``report``,
``study-page``, ``study-results``), each a thin layer over :mod:`realign_pipeline.evaluation`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .common import (
    DTYPES,
    EXIT_OK,
    EXIT_USAGE,
    LOAD_ERRORS,
    PROG,
    CLIError,
    HelpFormatter,
    device_and_dtype,
    int_in,
    load_error,
    quiet_loading,
    save_file,
)

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
presets: sd15, refl, realign, refl+realign, imagereward-refl, densediffusion, promptist, sdxl, sdxl+realign

examples:
  {PROG} evaluate generate --config sd15 --prompts cc500 --out outputs/eval/sd15
  {PROG} evaluate generate --config sd15 --prompts coco5k --limit 1000 --sample-seed 0 --out outputs/eval/coco
  {PROG} evaluate generate --config refl --lora outputs/refl-lora --prompts abc6k --out outputs/eval/refl
  {PROG} evaluate generate --config densediffusion --prompts t2icompbench-color --out outputs/eval/dd-color
  {PROG} evaluate generate --config sdxl+realign --prompts cc500 --out outputs/eval/sdxl-realign
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
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--config", required=True, help="a preset name (see below) or a configuration JSON file")
    parser.add_argument("--prompts", required=True,
                        help="a prompt set (cc500, abc6k, coco5k, geneval, t2icompbench-color, ...) or a prompt file")
    parser.add_argument("--limit", type=int_in(1, 10**9), help="only this many prompts (the first ones)")
    parser.add_argument("--sample-seed", type=int, help="with --limit: a random subset drawn with this seed")
    parser.add_argument("--out", required=True, help="the configuration's output folder")
    parser.add_argument("--seed", type=int, default=42, help="prompt i is generated from seed + i (the paper: 42)")
    parser.add_argument("--batch-size", type=int_in(1, 1024), default=1, help="prompts per pipeline call")
    parser.add_argument("--max-images", type=int_in(1, 10**9), help="stop after generating this many images")
    overrides = parser.add_argument_group("configuration overrides")
    overrides.add_argument("--name", help="the configuration's name (default: the preset's or the file's)")
    overrides.add_argument("--model", help="diffusers hub id or folder")
    overrides.add_argument("--lora", metavar="ID_OR_PATH", help="a LoRA (e.g. ReFL's), loaded with load_lora_weights")
    overrides.add_argument("--unet", metavar="PATH", help="a fine-tuned UNet folder (e.g. ReFL's full fine-tuning)")
    overrides.add_argument("--steps", type=int_in(1, 1000), help="denoising steps (per stage)")
    overrides.add_argument("--guidance", type=float, help="classifier-free guidance scale")
    overrides.add_argument("--height", type=int_in(8, 4096), help="image height, multiple of 8")
    overrides.add_argument("--width", type=int_in(8, 4096), help="image width, multiple of 8")
    overrides.add_argument("--images-per-prompt", type=int_in(1, 64), help="images per prompt")
    overrides.add_argument("--set", dest="overrides", metavar="KEY=VALUE", type=_key_value, action="append",
                           default=[], help="any configuration field, VALUE as JSON, e.g. "
                           "--set pipeline_kwargs='{\"self_attention_strength\": 0.3}'")
    run = parser.add_argument_group("devices and processes")
    run.add_argument("--device", help="cuda, cuda:1, cpu (default: accelerate's device, else cuda when available)")
    run.add_argument("--dtype", choices=DTYPES, help="(default: the configuration's, else float16 on a GPU)")
    run.add_argument("--process-index", type=int_in(0, 4096), help="this process's rank (default: accelerate's)")
    run.add_argument("--num-processes", type=int_in(1, 4097), help="the number of processes (default: accelerate's)")
    run.add_argument("--no-benchmark-layouts", action="store_true",
                     help="do not also write GenEval / T2I-CompBench prompts in those benchmarks' folder layouts")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=cmd_evaluate_generate)


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="the paper's evaluation: generate, score, report, human study",
        description=EVALUATE_DESCRIPTION,
        epilog=EVALUATE_EPILOG,
        formatter_class=HelpFormatter,
    )
    commands = parser.add_subparsers(dest="evaluate_command", metavar="STEP", title="steps")
    parser.set_defaults(func=lambda args: _evaluate_usage(parser))
    _add_evaluate_generate_parser(commands)

    score = commands.add_parser("score", help="score result folders (writes metrics.json in each)",
                                formatter_class=HelpFormatter,
                                epilog=f"example:\n  {PROG} evaluate score outputs/eval/sd15 --metrics clip blip_itm")
    score.add_argument("folders", nargs="+", metavar="FOLDER", help="result folders of `evaluate generate`")
    score.add_argument("--metrics", nargs="+", default=["clip"],
                       help="clip, negclip, blip_itm, caption_reward, blip_vqa, fid, timings")
    score.add_argument("--batch-size", type=int_in(1, 4096), default=8, help="images per batch")
    score.add_argument("--model", dest="model_paths", metavar="METRIC=ID_OR_PATH", type=_key_value, action="append",
                       default=[], help="the model of a metric, e.g. clip=openai/clip-vit-base-patch32")
    score.add_argument("--real-images", metavar="FOLDER", help="real images for fid")
    score.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    score.set_defaults(func=cmd_evaluate_score)

    report = commands.add_parser("report", help="tables and charts of scored result folders",
                                 formatter_class=HelpFormatter,
                                 epilog=f"example:\n  {PROG} evaluate report outputs/eval/* --out outputs/report")
    report.add_argument("folders", nargs="+", metavar="FOLDER", help="scored result folders")
    report.add_argument("--out", required=True, help="the report's folder")
    report.set_defaults(func=cmd_evaluate_report)

    _add_evaluate_run_parser(commands)

    page = commands.add_parser("study-page", help="a self-contained HTML page for the human study",
                               formatter_class=HelpFormatter,
                               epilog=f"example:\n  {PROG} evaluate study-page outputs/eval/sd15 outputs/eval/ours "
                               "--out study.html")
    page.add_argument("folders", nargs="+", metavar="FOLDER", help="result folders (one per configuration)")
    page.add_argument("--out", required=True, help="the HTML file to write")
    page.add_argument("--num-prompts", type=int_in(1, 10**6), help="a random subset of the prompts")
    page.add_argument("--seed", type=int, default=0, help="seed of the subset and of the shuffled order")
    page.set_defaults(func=cmd_evaluate_study_page)

    results = commands.add_parser("study-results", help="alignment scores from the study's ranking files",
                                  formatter_class=HelpFormatter,
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
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--configs", type=_comma_list, nargs="+", action="extend", default=[], metavar="NAMES",
                        help="presets or configuration JSON files, comma- or space-separated (sd15,realign,refl+realign)")
    parser.add_argument("--config-file", dest="config_files", nargs="+", action="extend", default=[],
                        metavar="JSON", help="configuration JSON files (more rows of the table)")
    parser.add_argument("--prompts", required=True,
                        help="a prompt set (cc500, abc6k, coco5k, geneval, t2icompbench-color, ...) or a prompt file")
    parser.add_argument("--limit", type=int_in(1, 10**9), help="only this many prompts (the first ones)")
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
    run.add_argument("--batch-size", type=int_in(1, 1024), default=1, help="prompts per pipeline call")
    run.add_argument("--score-batch-size", type=int_in(1, 4096), default=8, help="images per scoring batch")
    run.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda when available)")
    run.add_argument("--dtype", choices=DTYPES, help="(default: the configuration's, else float16 on a GPU)")
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
        device_and_dtype(argparse.Namespace(device=args.device, dtype=args.dtype or "float32"))
    print(f"{PROG} evaluate run: {len(configs)} configuration(s) ({', '.join(c.name for c in configs)}) on "
          f"{args.prompts}, seeds {' '.join(map(str, args.seeds))}, metrics {', '.join(metrics)} -> {args.out}",
          flush=True)
    try:
        with quiet_loading():
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
        device, dtype = device_and_dtype(ns)
    else:
        device, dtype = accelerate_device, None
    if index == 0:
        print(f"{PROG} evaluate generate: {config.name} on {len(records)} prompt(s) of {args.prompts} -> {args.out}"
              + (f" ({count} processes)" if count > 1 else ""), flush=True)
    try:
        with quiet_loading():
            result = generate_images(
                config, records, args.out, seed=args.seed, batch_size=args.batch_size, process_index=index,
                num_processes=count, progress=not args.quiet, device=device, dtype=dtype,
                benchmark_layouts=() if args.no_benchmark_layouts else ("geneval", "t2icompbench"),
                max_images=args.max_images,
            )
    except ValueError as error:
        raise CLIError(str(error), EXIT_USAGE) from None
    except LOAD_ERRORS as error:
        name = config.lora if config.lora and "lora" in str(error).lower() else config.model
        raise load_error("model", name, error, "--model / --lora / --unet") from None
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
        save_file(lambda path: path.write_text(text + "\n"), Path(args.out))
    return EXIT_OK
