#!/usr/bin/env python
"""Check the package as a user installs it: built as a wheel, installed non-editable, the demo run from it.

The test suite runs against the editable install, which reads ``src/`` directly, so a file the packaging
configuration leaves out of the wheel (package data above all) never fails a test. This script:

1. builds the wheel from a fresh copy of the files git knows (tracked and untracked-but-not-ignored), so no
   stale ``build/`` output can stand in for a missing file, and fails on a build-backend deprecation warning;
2. checks that every file of that copy under ``src/realign_pipeline`` is in the wheel;
3. installs the wheel with ``pip install --no-deps --target`` (the dependencies are this interpreter's, so
   nothing is downloaded) and, in one interpreter whose ``PYTHONPATH`` puts that folder first, checks that
   ``realign_pipeline`` imports from there and not from the checkout, then runs the installed ``realigndiff``
   entry point: ``realigndiff demo --steps 2 --num_images 1 --search_seeds 2`` (the shapes world, whose
   models are package data), and checks it wrote ``panel.png`` and ``summary.json``.

    .venv/bin/python .ci/wheel_check.py            # what `make wheel-check` runs
    .venv/bin/python .ci/wheel_check.py --keep /tmp/wheel-check   # keep the wheel, install and demo output
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "realign_pipeline"
DEMO_ARGS = ["demo", "--steps", "2", "--num_images", "1", "--search_seeds", "2", "--quiet"]
DEMO_FILES = ("panel.png", "summary.json")
# setuptools' warnings about the project's own configuration (e.g. a deprecated license form), as pip -v shows
BACKEND_WARNING = re.compile(r"BuildBackendWarning|DeprecationWarning")

# Run in the interpreter that has the wheel first on its path: the import location is checked before the
# entry point script runs, in the same process (one torch/diffusers import instead of two).
RUN_INSTALLED = """
import runpy, sys
from pathlib import Path
import realign_pipeline
site = Path(sys.argv[1]).resolve()
where = Path(realign_pipeline.__file__).resolve()
if site not in where.parents:
    sys.exit(f"realign_pipeline imported from {where}, not from the installed wheel in {site}")
print(f"realign_pipeline imported from {where}", flush=True)
sys.argv = [str(site / "bin" / "realigndiff"), *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


class CheckError(RuntimeError):
    """The wheel, its install or the demo run from it is not what a user needs."""


def run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess:
    """``cmd`` with its output captured; a failure raises with the command and the end of its output."""
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, **kwargs)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-4000:]
        raise CheckError(f"exit code {proc.returncode}: {' '.join(cmd)}\n{tail}")
    return proc


def copy_source(dest: Path) -> list[str]:
    """Copy the files git knows (not the ignored ones) into ``dest``; their repository-relative paths."""
    listed = run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO
    ).stdout.split("\0")
    # a file deleted in the working tree but not yet in a commit is still listed: it is not part of the tree
    files = sorted(f for f in listed if f and (REPO / f).is_file())
    for f in files:
        (dest / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / f, dest / f)
    return files


def build_wheel(tree: Path, out: Path) -> Path:
    """``pip wheel`` of ``tree`` with this interpreter's setuptools; fails on a build-backend deprecation."""
    proc = run(
        [
            sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation",
            "--check-build-dependencies", "-w", str(out), str(tree),
        ]
    )
    warnings = sorted({line.strip() for line in (proc.stdout + proc.stderr).splitlines()
                       if BACKEND_WARNING.search(line)})
    if warnings:
        raise CheckError("the build warned about the project's configuration:\n" + "\n".join(warnings))
    wheels = list(out.glob("*.whl"))
    if len(wheels) != 1:
        raise CheckError(f"expected one wheel in {out}, found {[w.name for w in wheels]}")
    return wheels[0]


def check_contents(wheel: Path, files: list[str]) -> None:
    """Every copied file under ``src/realign_pipeline`` must be in the wheel."""
    prefix = f"src/{PACKAGE}/"
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
    missing = [f for f in files if f.startswith(prefix) and f[len("src/"):] not in names]
    if missing:
        raise CheckError(
            f"{len(missing)} file(s) of src/{PACKAGE} are not in {wheel.name} (see "
            "[tool.setuptools.package-data] in pyproject.toml):\n" + "\n".join(missing[:50])
        )


def run_demo(wheel: Path, site: Path, out: Path) -> None:
    """Install ``wheel`` into ``site`` and run its ``realigndiff demo`` with ``site`` first on the path."""
    run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)])
    if not (site / "bin" / "realigndiff").is_file():
        raise CheckError("the wheel installed no `realigndiff` entry point (see [project.scripts])")
    path = [str(site), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    # cwd outside the checkout, so nothing there is importable by accident
    proc = run([sys.executable, "-c", RUN_INSTALLED, str(site), *DEMO_ARGS, "--out", str(out)],
               cwd=site.parent, env=env)
    print(proc.stdout.splitlines()[0])
    for name in DEMO_FILES:
        path = out / name
        if not path.is_file() or path.stat().st_size == 0:
            raise CheckError(f"the demo run from the wheel did not write {path}:\n{proc.stdout[-3000:]}")
    try:
        json.loads((out / "summary.json").read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckError(f"{out / 'summary.json'} is not JSON: {exc}") from exc
    if (out / "panel.png").read_bytes()[:8] != b"\x89PNG\r\n\x1a\n":
        raise CheckError(f"{out / 'panel.png'} is not a PNG file")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--keep", type=Path, default=None,
                   help="work in this new or empty folder and keep it (default: a temporary folder, removed)")
    args = p.parse_args(argv)
    if args.keep is not None:
        if args.keep.exists() and any(args.keep.iterdir()):
            p.error(f"--keep {args.keep} is not empty")
        args.keep.mkdir(parents=True, exist_ok=True)
    work = args.keep.resolve() if args.keep is not None else Path(tempfile.mkdtemp(prefix="wheel-check-"))
    start = time.perf_counter()
    try:
        files = copy_source(work / "tree")
        wheel = build_wheel(work / "tree", work / "dist")
        size_mib = wheel.stat().st_size / 2**20
        built = time.perf_counter()
        check_contents(wheel, files)
        run_demo(wheel, work / "site", work / "demo")
    except CheckError as exc:
        print(f"wheel check FAILED: {exc}", file=sys.stderr)
        return 1
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    end = time.perf_counter()
    print(
        f"wheel check passed: {wheel.name} ({size_mib:.1f} MiB) built in {built - start:.1f} s, "
        f"installed and its demo run in {end - built:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
