"""Each script of examples/ run as a user runs it, with --tiny: tiny random offline models.

A script runs through its ``__main__`` block with its own ``sys.argv`` and environment (``runpy``), in the test's
process: an interpreter start-up (torch, diffusers, transformers imports) per script cost more than the scripts.
The console entry point in a fresh process is tests/test_cli.py::test_demo_as_a_user_runs_it."""

import json
import os
import runpy
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture()
def run_example(monkeypatch, capsys):
    """``run_example(script, *argv, **env)``: the script's ``__main__`` block with ``sys.argv = [script, *argv]``,
    ``env`` set, no ``OPENAI_*`` variables and the hub offline; returns its ``stdout`` / ``stderr``."""

    def run(script: str, *argv: str, **env_extra: str) -> SimpleNamespace:
        with monkeypatch.context() as patch:
            for key in [key for key in os.environ if key.startswith("OPENAI_")]:
                patch.delenv(key)
            for key, value in {"HF_HUB_OFFLINE": "1", **env_extra}.items():
                patch.setenv(key, value)
            patch.setattr(sys, "argv", [str(EXAMPLES / script), *argv])
            capsys.readouterr()
            try:
                runpy.run_path(str(EXAMPLES / script), run_name="__main__")
            except SystemExit as exit_:
                assert exit_.code in (None, 0), f"{script} exited with {exit_.code}:\n{capsys.readouterr()}"
            captured = capsys.readouterr()
        return SimpleNamespace(stdout=captured.out, stderr=captured.err)

    return run


def image(path: Path, size: int = 32) -> np.ndarray:
    with Image.open(path) as picture:
        assert picture.size == (size, size)
        pixels = np.asarray(picture.convert("RGB"), dtype=np.float64)
    assert pixels.std() > 0, f"{path} is blank"
    return pixels


def test_every_example_has_help_and_a_tiny_option():
    scripts = sorted(p.name for p in EXAMPLES.glob("*.py"))
    assert scripts == ["evaluate_prompt_set.py", "layout_generate.py", "load_refl_lora.py", "prompt_sets.py",
                       "realign_generate.py"]
    for script in scripts:
        source = (EXAMPLES / script).read_text()
        assert "--tiny" in source and source.startswith('"""')


def test_layout_generate(run_example, tmp_path):
    run_example("layout_generate.py", "--tiny", "--out", str(tmp_path))
    plain, realigned = image(tmp_path / "plain.png"), image(tmp_path / "realigned.png")
    assert np.abs(plain - realigned).max() > 0  # the layout changed the image from the same noise
    layout = json.loads((tmp_path / "layout.json").read_text())
    assert [region["phrase"] for region in layout["regions"]] == ["red book", "yellow vase"]


def test_realign_generate_with_the_rule_based_llm(run_example, tmp_path):
    result = run_example("realign_generate.py", "--out", str(tmp_path), REALIGNDIFF_EXAMPLES_TINY="1")
    image(tmp_path / "coarse.png")
    image(tmp_path / "realigned.png")
    layout = json.loads((tmp_path / "layout.json").read_text())
    assert {region["phrase"] for region in layout["regions"]} == {"red book", "yellow vase"}
    assert "realigned: True" in result.stdout


def test_realign_generate_with_an_openai_compatible_server(run_example, tmp_path, chat_server):
    answer = {"objects": [{"tag": "book", "score": 2, "phrase": "red book"},
                          {"tag": "vase", "score": 0.5, "phrase": "yellow vase"}]}
    chat_server.reply(json.dumps(answer))  # every request gets this answer
    run_example("realign_generate.py", "--tiny", "--llm", "openai", "--llm-model", "local",
                "--base-url", chat_server.url, "--out", str(tmp_path))
    assert len(chat_server.requests) >= 1
    layout = json.loads((tmp_path / "layout.json").read_text())
    scores = {region["phrase"]: region["score"] for region in layout["regions"]}
    assert scores == {"red book": 2.0, "yellow vase": 0.5}  # the server's answer, not the rule-based one


def test_load_refl_lora(run_example, tmp_path):
    result = run_example("load_refl_lora.py", "--tiny", "--out", str(tmp_path))
    assert np.abs(image(tmp_path / "base.png") - image(tmp_path / "lora.png")).max() > 0
    assert "loaded LoRA" in result.stdout


def test_prompt_sets(run_example):
    listing = run_example("prompt_sets.py").stdout
    assert "cc500" in listing and " 446 " in listing and "abc6k" in listing
    table = run_example("prompt_sets.py", "cc500", "--limit", "3", "--tiny").stdout.splitlines()
    assert table[1].split(maxsplit=2) == ["000", "cc500", "a green bench and a red car"]
    assert table[-1].startswith("3 prompts")


def test_evaluate_prompt_set_prints_the_table(run_example, tmp_path):
    result = run_example("evaluate_prompt_set.py", "--tiny", "--out", str(tmp_path))
    rows = [line for line in result.stdout.splitlines() if line.startswith("| tiny")]
    assert [row.split("|")[1].strip() for row in rows] == ["tiny", "tiny+realign"]
    assert all(row.split("|")[2].strip() == "3" for row in rows)  # three images each
    assert (tmp_path / "report" / "table.json").exists() and (tmp_path / "report" / "grid.png").exists()
