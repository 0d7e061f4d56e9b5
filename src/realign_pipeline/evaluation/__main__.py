"""``python -m realign_pipeline.evaluation ...``: the ``realigndiff evaluate`` steps.

``python -m realign_pipeline.evaluation run|generate|score|report|study-page|study-results ...`` is
``realigndiff evaluate <step> ...``; without a step name the arguments are those of ``evaluate generate``, so
that accelerate can launch generation on every GPU::

    accelerate launch -m realign_pipeline.evaluation --config sd15 --prompts cc500 --out outputs/eval/sd15

Without ``--process-index`` / ``--num-processes`` each process takes its rank and the world size from
``accelerate.PartialState``.
"""

from __future__ import annotations

import sys

STEPS = ("run", "generate", "score", "report", "study-page", "study-results")


def main(argv: list[str] | None = None) -> int:
    from ..cli import main as cli_main

    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in STEPS:
        return cli_main(["evaluate", *args])
    return cli_main(["evaluate", "generate", *args])


if __name__ == "__main__":
    raise SystemExit(main())
