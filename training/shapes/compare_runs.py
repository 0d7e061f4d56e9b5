"""Two fine-stage runs on the same images, paired: what one configuration changes against the other.

    python training/shapes/compare_runs.py docs/shapes_fine_stage_rates.json \
        docs/shapes_relation_correction.json --out docs/shapes_relation_correction_paired.json

Both files are ``fine_stage_rates.py`` outputs. The rows of the second are matched to the first's by prompt and
seed (the first may hold more); their coarse read-outs must agree (the same coarse images), and the second's
fine read-outs are paired against the first's: fixed and broken counts, fix and break rates and the difference,
with bootstrap CIs clustered by pairing (:func:`ablation.paired_rates`).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ablation import paired_rates, write_json

METRICS = ("binding", "presence", "position")


def compare(first: dict[str, Any], second: dict[str, Any], split: str = "held-out") -> dict[str, Any]:
    """Per metric, the second run's fine images paired against the first run's on the second run's images."""
    base = {(r["prompt"], r["seed"]): r for r in first["splits"][split]["rows"]}
    rows = second["splits"][split]["rows"]
    missing = [(r["prompt"], r["seed"]) for r in rows if (r["prompt"], r["seed"]) not in base]
    if missing:
        raise SystemExit(f"{len(missing)} images of the second run are not in the first, e.g. {missing[0]}")
    pairs = [(base[(r["prompt"], r["seed"])], r) for r in rows]
    differing = [b["prompt"] for b, r in pairs if b["coarse"] != r["coarse"]]
    if differing:
        raise SystemExit(f"the coarse images differ ({len(differing)}, e.g. {differing[0]!r}): not the same images")
    result = {}
    for metric in METRICS:
        kept = [(b, r) for b, r in pairs if r["fine"][metric] is not None]
        if kept:
            result[metric] = paired_rates([b["fine"][metric] for b, _ in kept], [r["fine"][metric] for _, r in kept],
                                          [r["pairing"] for _, r in kept])
    return result


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("first", help="the reference run (fine_stage_rates.py output)")
    parser.add_argument("second", help="the run compared with it, on some or all of the same images")
    parser.add_argument("--split", default="held-out")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    first, second = (json.loads(Path(p).read_text()) for p in (args.first, args.second))
    result = {"first": args.first, "second": args.second, "split": args.split,
              "images": len(second["splits"][args.split]["rows"]), "second_against_first": compare(first, second, args.split)}
    for metric, entry in result["second_against_first"].items():
        print(f"{metric}: {entry['before']} -> {entry['after']}, difference {entry['difference']} "
              f"{entry['difference_ci']}, fixed {entry['fixed']}, broken {entry['broken']}")
    print(f"wrote {write_json(args.out, result)}")
    return result


if __name__ == "__main__":
    main()
