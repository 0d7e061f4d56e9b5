"""``python -m realign_pipeline.evaluation ...`` = ``realigndiff evaluate generate ...``.

So that accelerate can launch it on every GPU::

    accelerate launch -m realign_pipeline.evaluation --config sd15 --prompts cc500 --out outputs/eval/sd15

Without ``--process-index`` / ``--num-processes`` each process takes its rank and the world size from
``accelerate.PartialState``.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from ..cli import main as cli_main

    return cli_main(["evaluate", "generate", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
