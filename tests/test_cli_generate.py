"""`realigndiff generate` run as a user runs it, on tiny random models saved to folders: the captioned (realign)
path, the hand-layout path with a prompt file, each actionable error, --help; and the two pictures (Figure 6
panel, Figure 7 maps) drawn directly.

The command runs through the console script's ``main`` in this process, with its own environment, its exit code
and what it prints to stdout and stderr (warnings included, once per place as in a fresh process) read back like
a subprocess's: an interpreter start-up per command cost more than the command. The entry point in a fresh
process is tests/test_cli.py::test_demo_as_a_user_runs_it."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import traceback
import warnings
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image

from realign_pipeline import Layout, Region
from realign_pipeline.cli import main
from realign_pipeline.visualize import display_size, figure6_panel, figure7_maps

PROMPT = "a red book and a yellow vase"
SIZE = ["--height", "32", "--width", "48"]


def _env(**extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("OPENAI_")}
    env.update({"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **extra})
    return env


def run_cli(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``realigndiff *argv`` with the environment `env` (default :func:`_env`; ``CUDA_VISIBLE_DEVICES=""``
    hides the GPU from torch too), as ``python -m realign_pipeline.cli`` would run it: the exit code (an uncaught
    exception is 1 with its traceback on stderr), stdout, and stderr with the warnings shown."""
    import huggingface_hub.constants
    import torch

    env = env or _env()
    out, err = io.StringIO(), io.StringIO()
    patches = [mock.patch.dict(os.environ, env, clear=True),
               mock.patch.object(huggingface_hub.constants, "HF_HUB_OFFLINE", env.get("HF_HUB_OFFLINE") == "1")]
    if env.get("CUDA_VISIBLE_DEVICES") == "":
        patches.append(mock.patch.object(torch.cuda, "is_available", lambda: False))
    with contextlib.ExitStack() as stack:
        for patch in patches:
            stack.enter_context(patch)
        caught = stack.enter_context(warnings.catch_warnings(record=True))
        warnings.simplefilter("default")  # as a fresh interpreter shows them: once per place
        stack.enter_context(contextlib.redirect_stdout(out))
        stack.enter_context(contextlib.redirect_stderr(err))
        try:
            code = main(list(argv))
        except SystemExit as exit_:  # argparse: --help (0) and usage errors (2)
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        except Exception:  # noqa: BLE001 - what the interpreter would print, and its exit code
            traceback.print_exc(file=err)
            code = 1
    for warning in caught:
        err.write(warnings.formatwarning(warning.message, warning.category, warning.filename, warning.lineno))
    return subprocess.CompletedProcess(["realigndiff", *argv], code, out.getvalue(), err.getvalue())


def _not_blank(path) -> Image.Image:
    image = Image.open(path)
    image.load()
    assert np.asarray(image.convert("RGB"), dtype=np.float64).std() > 0, f"{path} is blank"
    return image


@pytest.fixture(scope="module")
def models(tiny_sd_dir, tiny_clip_dir, tiny_grounding_dino_dir, tiny_sam_dir):
    return {"sd": str(tiny_sd_dir), "clip": str(tiny_clip_dir), "dino": str(tiny_grounding_dino_dir),
            "sam": str(tiny_sam_dir)}


def _captioner_flags(models) -> list[str]:
    return ["--model", models["sd"], "--tagger-model", models["clip"], "--detector", models["dino"],
            "--segmenter", models["sam"], "--tag-threshold", "0", "--box-threshold", "0", "--text-threshold", "0",
            "--device", "cpu", "--steps", "3", *SIZE]


@pytest.fixture(scope="module")
def realign_run(models, tmp_path_factory):
    """The captioned path, with --llm openai and no key: falls back to the rule-based LLM (one warning)."""
    out = tmp_path_factory.mktemp("realign")
    result = run_cli("generate", PROMPT, *_captioner_flags(models), "--llm", "openai", "--out", str(out))
    return out, result


def test_generate_realign_writes_every_picture(realign_run):
    out, result = realign_run
    assert result.returncode == 0, result.stderr[-2000:]
    folder = out / "000-a-red-book-and-a-yellow-vase"
    for name in ("image.png", "coarse.png"):
        assert _not_blank(folder / name).size == (48, 32)
    panel = _not_blank(folder / "panel.png")
    cell = display_size((48, 32), 256)
    assert panel.width > 3 * cell[0] and panel.height > cell[1]
    maps = _not_blank(folder / "attention_maps.png")
    small = display_size((48, 32), 128)
    assert maps.width > 3 * small[0] and maps.height > 4 * small[1]  # red, book, yellow, vase
    layout = Layout.from_json(folder / "layout.json")
    assert sorted(region.phrase for region in layout) == ["red book", "yellow vase"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "realign" and summary["prompts"][0]["realigned"] is True
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("wrote 6 files for 1 prompt(s) to ") and "generate" in last and "pictures" in last


def test_generate_openai_without_key_falls_back_once(realign_run):
    _, result = realign_run
    assert result.returncode == 0
    assert result.stderr.count("falling back to rule-based") == 1
    assert "Traceback" not in result.stderr


def test_generate_hand_layout_from_prompt_file(models, tmp_path):
    layout = Layout([Region("red book", box=[0.05, 0.35, 0.45, 0.95]), Region("yellow vase", box=[0.55, 0.15, 0.95, 0.95])])
    layout.to_json(tmp_path / "layout.json")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{PROMPT}\n\na yellow vase and a red book\n")
    out = tmp_path / "out"
    result = run_cli("generate", "--prompts-file", str(prompts), "--layout", str(tmp_path / "layout.json"),
                     "--model", models["sd"], "--device", "cpu", "--steps", "2", *SIZE, "--out", str(out), "-q")
    assert result.returncode == 0, result.stderr[-2000:]
    folders = sorted(path.name for path in out.iterdir() if path.is_dir())
    assert folders == ["000-a-red-book-and-a-yellow-vase", "001-a-yellow-vase-and-a-red-book"]
    for folder in folders:
        for name in ("image.png", "coarse.png", "panel.png", "attention_maps.png"):
            _not_blank(out / folder / name)
        saved = Layout.from_json(out / folder / "layout.json")
        assert [region.phrase for region in saved] == ["red book", "yellow vase"]
    assert json.loads((out / "summary.json").read_text())["mode"] == "layout"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "nobody/not-a-cached-model"], "run with --model PATH"),
        (["--device", "cuda"], "use --device cpu --dtype float32, expect minutes"),
        (["--device", "cpu", "--dtype", "float16"], "--dtype float16 does not run on the CPU"),
    ],
    ids=["no-network-no-cache", "no-gpu", "float16-on-cpu"],
)
def test_generate_errors_are_one_actionable_line(argv, message):
    env = {**_env(), "CUDA_VISIBLE_DEVICES": ""}  # the no-GPU message is checked even on a GPU machine
    result = run_cli("generate", PROMPT, *argv, "--no-realign", env=env)
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("realigndiff generate: error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_generate_bad_layout_names_region_and_field(models, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "realign-layout", "version": 1, "regions": [
        {"phrase": "red book", "box": [0.1, 0.2, 0.5, 0.9]}, {"phrase": "vase", "box": [0.1, 0.2, 0.5]}]}))
    result = run_cli("generate", PROMPT, "--layout", str(bad), "--model", models["sd"], "--device", "cpu")
    assert result.returncode == 2
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("realigndiff generate: error: --layout") and "region 1" in line and "box" in line
    assert "Traceback" not in result.stderr


def test_generate_help_has_examples():
    result = run_cli("generate", "--help")
    assert result.returncode == 0
    assert "examples:" in result.stdout and 'realigndiff generate "a red book and a yellow vase"' in result.stdout
    for flag in ("--model", "--lora", "--realign", "--no-realign", "--layout", "--llm", "--llm-model",
                 "--llm-base-url", "--seed", "--steps", "--guidance", "--height", "--width", "--device", "--dtype",
                 "--out", "--prompts-file"):
        assert flag in result.stdout, flag


def test_generate_without_prompt_is_a_usage_error(capsys):
    assert main(["generate", "--device", "cpu"]) == 2
    assert "no prompt" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------
# the pictures, drawn directly
# ----------------------------------------------------------------------------------------------------------
def test_figure6_panel_three_cells_with_colored_masks():
    rng = np.random.default_rng(0)
    coarse = Image.fromarray(rng.integers(0, 255, (32, 48, 3), dtype=np.uint8))
    final = Image.fromarray(rng.integers(0, 255, (32, 48, 3), dtype=np.uint8))
    mask = torch.zeros(8, 12)
    mask[2:6, 3:9] = 1
    regions = [Region("cat", mask=mask, score=1.5), Region("sofa", box=[0.0, 0.5, 1.0, 1.0])]
    panel = figure6_panel(coarse, regions, final)
    cell = display_size((48, 32), 256)
    assert panel.mode == "RGB" and panel.width >= 3 * cell[0] and panel.height >= cell[1]
    assert np.asarray(panel, dtype=np.float64).std() > 0
    assert coarse.size == (48, 32)  # inputs untouched


def test_figure7_maps_one_row_per_word():
    before = {"red": torch.rand(4, 6), "book": torch.rand(4, 6)}
    after = {"red": torch.rand(4, 6), "book": torch.rand(4, 6)}
    one = figure7_maps(before, after, ["red"], (48, 32))
    two = figure7_maps(before, after, ["red", "book"], (48, 32))
    assert two.width == one.width and two.height > one.height + 32
    with pytest.raises(ValueError):
        figure7_maps(before, after, [], (48, 32))


@pytest.mark.parametrize("world", ["shapes", "shapes-bow", "shapes-triples"])
def test_generate_keeps_the_captioners_record_when_it_keeps_nothing(tmp_path, world):
    """No shape of any world is a dog: the image is the coarse one, and layout.json says why."""
    assert main(["generate", "a dog", "--model", world, "--steps", "2", "--out", str(tmp_path)]) == 0
    folder = tmp_path / "000-a-dog"
    layout = Layout.from_json(folder / "layout.json")
    assert len(layout) == 0
    assert layout.source["ungrounded_phrases"] == ["dog"] and "dog" in layout.source["tags"]
    assert not (folder / "panel.png").exists()
    assert json.loads((tmp_path / "summary.json").read_text())["prompts"][0]["realigned"] is False
