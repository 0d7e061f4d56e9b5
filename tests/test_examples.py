"""Each script of examples/ run as a user runs it (a subprocess), with --tiny: tiny random offline models."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(script: str, *argv: str, **env_extra: str) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if not key.startswith("OPENAI_")}
    env.update({"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **env_extra})
    result = subprocess.run([sys.executable, str(EXAMPLES / script), *argv], capture_output=True, text=True,
                            env=env, timeout=240, check=False)
    assert result.returncode == 0, f"{script} failed:\n{result.stdout}\n{result.stderr}"
    return result


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


def test_layout_generate(tmp_path):
    run_example("layout_generate.py", "--tiny", "--out", str(tmp_path))
    plain, realigned = image(tmp_path / "plain.png"), image(tmp_path / "realigned.png")
    assert np.abs(plain - realigned).max() > 0  # the layout changed the image from the same noise
    layout = json.loads((tmp_path / "layout.json").read_text())
    assert [region["phrase"] for region in layout["regions"]] == ["red book", "yellow vase"]


def test_realign_generate_with_the_rule_based_llm(tmp_path):
    result = run_example("realign_generate.py", "--out", str(tmp_path), REALIGNDIFF_EXAMPLES_TINY="1")
    image(tmp_path / "coarse.png")
    image(tmp_path / "realigned.png")
    layout = json.loads((tmp_path / "layout.json").read_text())
    assert {region["phrase"] for region in layout["regions"]} == {"red book", "yellow vase"}
    assert "realigned: True" in result.stdout


def test_realign_generate_with_an_openai_compatible_server(tmp_path, chat_server):
    answer = {"objects": [{"tag": "book", "score": 2, "phrase": "red book"},
                          {"tag": "vase", "score": 0.5, "phrase": "yellow vase"}]}
    chat_server.reply(json.dumps(answer))  # every request gets this answer
    run_example("realign_generate.py", "--tiny", "--llm", "openai", "--llm-model", "local",
                "--base-url", chat_server.url, "--out", str(tmp_path))
    assert len(chat_server.requests) >= 1
    layout = json.loads((tmp_path / "layout.json").read_text())
    scores = {region["phrase"]: region["score"] for region in layout["regions"]}
    assert scores == {"red book": 2.0, "yellow vase": 0.5}  # the server's answer, not the rule-based one


def test_load_refl_lora(tmp_path):
    result = run_example("load_refl_lora.py", "--tiny", "--out", str(tmp_path))
    assert np.abs(image(tmp_path / "base.png") - image(tmp_path / "lora.png")).max() > 0
    assert "loaded LoRA" in result.stdout


def test_prompt_sets():
    listing = run_example("prompt_sets.py").stdout
    assert "cc500" in listing and " 446 " in listing and "abc6k" in listing
    table = run_example("prompt_sets.py", "cc500", "--limit", "3", "--tiny").stdout.splitlines()
    assert table[1].split(maxsplit=2) == ["000", "cc500", "a green bench and a red car"]
    assert table[-1].startswith("3 prompts")


def test_evaluate_prompt_set_prints_the_table(tmp_path):
    result = run_example("evaluate_prompt_set.py", "--tiny", "--out", str(tmp_path))
    rows = [line for line in result.stdout.splitlines() if line.startswith("| tiny")]
    assert [row.split("|")[1].strip() for row in rows] == ["tiny", "tiny+realign"]
    assert all(row.split("|")[2].strip() == "3" for row in rows)  # three images each
    assert (tmp_path / "report" / "table.json").exists() and (tmp_path / "report" / "grid.png").exists()
