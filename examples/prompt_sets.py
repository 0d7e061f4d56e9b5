"""List the bundled prompt sets, or show a few prompts of one, with ``realign_pipeline.evaluation.load_prompts``.

    python examples/prompt_sets.py                       # every set: name and size
    python examples/prompt_sets.py cc500 --limit 5       # the first 5 prompts of CC-500
    python examples/prompt_sets.py abc6k --limit 5 --seed 0
    python examples/prompt_sets.py my_prompts.txt        # a .txt / .csv / .tsv / .jsonl file of your own

This script only loads and inspects the prompts; ``examples/evaluate_prompt_set.py`` (or ``realigndiff
evaluate run``) generates a set, scores it and prints the table. Everything here is offline (the sets ship
with the package); ``--tiny`` is accepted for symmetry with the other examples and changes nothing.
"""

import argparse
from collections import Counter

from realign_pipeline.evaluation import available_prompt_sets, load_prompts


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", nargs="?", help="a prompt set name or a file; default: list every set")
    parser.add_argument("--limit", type=int, default=10)
    parser.add_argument("--seed", type=int, default=None, help="with --limit: a seeded random subset")
    parser.add_argument("--tiny", action="store_true", help="no effect (everything here is offline)")
    args = parser.parse_args(argv)

    if args.name is None:
        print(f"{'set':<32} {'prompts':>7}  metadata keys")
        for name in available_prompt_sets():
            if name == "drawbench":  # not bundled: needs a path (REALIGNDIFF_DRAWBENCH)
                print(f"{name:<32} {'-':>7}  (not bundled: load_prompts('drawbench', path=...))")
                continue
            records = load_prompts(name)
            keys = sorted({key for record in records for key in record.metadata})
            print(f"{name:<32} {len(records):>7}  {', '.join(keys) or '-'}")
        return

    records = load_prompts(args.name, limit=args.limit, seed=args.seed)
    print(f"{'id':<14} {'set':<12} prompt")
    for record in records:
        text = record.text if len(record.text) <= 70 else record.text[:67] + "..."
        print(f"{record.id:<14} {record.set:<12} {text}")
    counts = Counter(key for record in records for key in record.metadata)
    print(f"{len(records)} prompts; metadata keys: {dict(counts) or '-'}")


if __name__ == "__main__":
    main()
