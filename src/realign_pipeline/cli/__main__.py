"""``python -m realign_pipeline.cli``: the ``realigndiff`` command."""

from . import main

if __name__ == "__main__":
    raise SystemExit(main())
