"""What the commands print besides their results: no transformers warning about torchvision (the base install
leaves it out on purpose) and one progress bar over a job instead of one per pipeline call."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

from realign_pipeline.cli import main

TORCHVISION_WARNING = "requires torchvision"

#: Imports the package, then builds what a shapes-world evaluation builds: the pipeline (with its dense
#: captioner) and the three model metrics on the shipped models, each scoring one image.
SHAPES_SCORERS = """
import PIL.Image
import realign_pipeline
from realign_pipeline.evaluation.score import load_metric
from realign_pipeline.shapes.pretrained import load_shapes_pipeline

pipe = load_shapes_pipeline()
image = PIL.Image.new("RGB", (32, 32), (200, 30, 30))
for name in ("clip", "blip_itm", "caption_reward"):
    metric = load_metric(name, "shapes")
    metric.update([image], ["a red square"])
    metric.compute()
print("built", type(pipe.dense_captioner).__name__)
"""


def _run(args: list[str], tmp_path) -> subprocess.CompletedProcess:
    # a fresh process: transformers warns once per process, and the warnings come from first imports
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "warning"}
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=300,
                            check=False, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


needs_no_torchvision = pytest.mark.skipif(
    importlib.util.find_spec("torchvision") is not None, reason="the warning appears only without torchvision"
)


# The demo command's run in a fresh process without the warning: tests/test_cli.py::test_demo_as_a_user_runs_it.


@needs_no_torchvision
def test_the_shapes_pipeline_and_scorers_build_without_torchvision_warning(tmp_path):
    result = _run(["-c", SHAPES_SCORERS], tmp_path)
    assert "built DenseCaptioner" in result.stdout
    assert TORCHVISION_WARNING not in result.stderr + result.stdout


@needs_no_torchvision
def test_the_default_names_are_the_pillow_classes():
    """The names diffusers imports resolve to the Pillow classes, as transformers' own fallback would."""
    import transformers

    assert transformers.CLIPImageProcessor is transformers.CLIPImageProcessorPil
    assert transformers.SiglipImageProcessor is transformers.SiglipImageProcessorPil


def _bar_lines(stderr: str) -> list[str]:
    return [line for line in stderr.replace("\r", "\n").splitlines() if "|" in line and "/" in line]


def test_the_shapes_demo_shows_one_bar_over_the_job(tmp_path, capsys):
    argv = ["demo", "--steps", "2", "--num_images", "2", "--search_seeds", "3", "--out", str(tmp_path)]
    assert main(argv) == 0
    bars = _bar_lines(capsys.readouterr().err)
    assert bars, "no progress bar"
    # searched 3 + shown 2 + the layout control's 1: one total for every update, no per-call bar of 2 steps
    assert {line.split("|")[-1].split("[")[0].strip().split("/")[-1] for line in bars} == {"6"}
    assert "image" in bars[-1]

    assert main([*argv, "-q"]) == 0
    assert not _bar_lines(capsys.readouterr().err)


def test_the_tiny_demo_shows_one_bar_over_both_runs(tmp_path, capsys):
    assert main(["demo", "--tiny", "--steps", "2", "--height", "32", "--width", "32", "--out", str(tmp_path)]) == 0
    bars = _bar_lines(capsys.readouterr().err)
    assert bars and {line.split("|")[-1].split("[")[0].strip().split("/")[-1] for line in bars} == {"2"}
    assert any(line.startswith("realigned") for line in bars)
