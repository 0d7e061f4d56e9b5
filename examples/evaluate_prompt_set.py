"""Evaluate configurations on a prompt set and print the table, with ``realign_pipeline.evaluation``.

    python examples/evaluate_prompt_set.py                          # SD v1.5 vs + fine stage on 50 CC-500 prompts (GPU)
    python examples/evaluate_prompt_set.py --shapes --limit 24      # the shapes world, offline on a CPU
    python examples/evaluate_prompt_set.py --tiny                   # tiny random models: the code path only

The same as ``realigndiff evaluate run`` (docs/evaluation.md), from Python: every configuration generates the
prompts (resumable: images already written are skipped), is scored, and one report compares them
(OUT/report/table.md, charts, the image grid). With ``--shapes`` the configurations are the shipped
shapes-world pipeline without and with the fine stage, scored by the world's checker (object presence,
attribute binding, position), with 95% bootstrap intervals.
"""

import argparse
import os
import tempfile
from pathlib import Path

from realign_pipeline.evaluation.run import run_evaluation


def tiny_setup(root: Path):
    """Two configurations on the tiny random pipeline (plain, and the fine stage with the shapes captioner),
    a tiny CLIP for the CLIP score, and three prompts."""
    from realign_pipeline.evaluation.configs import EvalConfig
    from realign_pipeline.pipeline import RealignDiffPipeline
    from realign_pipeline.shapes.perception import shapes_dense_captioner
    from realign_pipeline.testing import tiny_clip, tiny_pipeline

    pipe = tiny_pipeline(RealignDiffPipeline, save_dir=root / "pipe")
    pipe.dense_captioner = shapes_dense_captioner()
    pipe.save_pretrained(root / "pipe")
    common = {"model": str(root / "pipe"), "steps": 4, "guidance": 4.0, "height": 32, "width": 32,
              "dtype": "float32"}
    configs = [EvalConfig(name="tiny", **common), EvalConfig(name="tiny+realign", realign=True, **common)]
    prompts = root / "prompts.txt"
    prompts.write_text("a red circle and a blue square\na green triangle\na yellow cross with a purple circle\n")
    return configs, str(prompts), ["clip", "timings"], {"clip": tiny_clip(root / "clip")}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/examples/evaluate")
    parser.add_argument("--limit", type=int, default=None, help="prompts (default: 50; 24 with --shapes)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42])
    world = parser.add_mutually_exclusive_group()
    world.add_argument("--shapes", action="store_true", help="the shipped shapes world, offline")
    world.add_argument("--tiny", action="store_true", help="tiny random models, offline (the code path only)")
    args = parser.parse_args(argv)
    if os.environ.get("REALIGNDIFF_EXAMPLES_TINY"):
        args.tiny = True

    with tempfile.TemporaryDirectory(prefix="realigndiff-example-") as tmp:
        if args.tiny:
            configs, prompts, metrics, model_paths = tiny_setup(Path(tmp))
            limit = args.limit
        elif args.shapes:
            configs, prompts, metrics, model_paths = ["shapes", "shapes-realign"], "shapes-heldout", ["shapes"], {}
            limit = args.limit or 24
        else:
            configs, prompts, metrics = ["sd15", "realign"], "cc500", ["clip", "blip_itm", "timings"]
            model_paths, limit = {}, args.limit or 50
        result = run_evaluation(configs, prompts, args.out, metrics, seeds=args.seeds, limit=limit,
                                sample_seed=0 if limit else None, model_paths=model_paths, progress=False)
    table = Path(result["report"]["table_md"])
    print(table.read_text())
    print(f"report: {table.parent}")


if __name__ == "__main__":
    main()
