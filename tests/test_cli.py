"""Tests for the `realigndiff` command line (realign_pipeline.cli) and its drawing helpers (visualize)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from realign_pipeline import Layout, Region, __version__
from realign_pipeline.cli import main
from realign_pipeline.cli.demo import DEMO_REGIONS
from realign_pipeline.visualize import attention_grid, display_size, heatmap, overlay_layout, region_box

DEMO_FILES = (
    "plain.png", "realigned.png", "layout.json", "layout.png", "attention_maps.png", "panel.png", "summary.json"
)


def _not_blank(path) -> Image.Image:
    image = Image.open(path)
    image.load()
    assert np.asarray(image.convert("RGB"), dtype=np.float64).std() > 0, f"{path.name} is blank"
    return image


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """One small demo run shared by the checks below (3 steps so that one step is modulated with l_t > 0.1).

    The demo runs torch on 1 thread by default (--threads): a busy 2-core machine made 2 threads 10x slower.
    """
    out = tmp_path_factory.mktemp("demo")
    argv = ["demo", "--tiny", "--out", str(out), "--steps", "3", "--height", "32", "--width", "48", "--quiet"]
    threads = torch.get_num_threads()
    code = main(argv)
    assert torch.get_num_threads() == threads  # restored
    return out, code


def test_demo_writes_every_file(demo_run):
    out, code = demo_run
    assert code == 0
    for name in DEMO_FILES:
        assert (out / name).is_file(), name
    assert _not_blank(out / "plain.png").size == (48, 32)
    assert _not_blank(out / "realigned.png").size == (48, 32)
    assert _not_blank(out / "layout.png").size == display_size((48, 32), 256) == (384, 256)
    grid = _not_blank(out / "attention_maps.png")
    cell = display_size((48, 32), 128)
    # a label column plus plain | realigned | difference, one row per phrase word (red, book, yellow, vase)
    assert grid.width > 3 * cell[0] and grid.height > 4 * cell[1]


def test_demo_layout_json_is_the_builtin_layout(demo_run):
    out, _ = demo_run
    layout = Layout.from_json(out / "layout.json")
    assert [(r.phrase, list(r.box)) for r in layout] == [(p, b) for p, b in DEMO_REGIONS]


def test_demo_summary_numbers(demo_run):
    out, _ = demo_run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["prompt"] == summary["encoded_prompt"] == "a red book and a yellow vase"
    assert summary["attention_map_size"] == [16, 24]
    assert [row["phrase"] for row in summary["phrases"]] == ["red book", "yellow vase"]
    assert [row["words"] for row in summary["phrases"]] == [["red", "book"], ["yellow", "vase"]]
    for row in summary["phrases"]:
        for key in ("area", "plain", "realigned"):
            assert isinstance(row[key], float) and 0.0 <= row[key] <= 1.0, (row["phrase"], key, row[key])
        # the layout pulls each phrase's attention into its region
        assert row["realigned"] > row["plain"]
    assert set(summary["timings_s"]) == {"load", "plain", "realigned", "pictures"}
    assert summary["seed"] == 42  # --tiny keeps its fixed default seed
    assert 0 <= summary["image_change_0_255"]["mean"] <= summary["image_change_0_255"]["max"] <= 255


def test_demo_intro_says_random_and_shows_real_usage():
    from realign_pipeline.cli.demo import _intro, demo_layout

    intro = _intro("a red book and a yellow vase", demo_layout(), None)
    assert intro.startswith("realigndiff demo: these are tiny RANDOM weights") and "NOISE" in intro
    assert 'from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5", dtype=torch.float16).to("cuda")' in intro
    snippet = intro.split("\n\n")[-1]
    assert len(snippet.strip().splitlines()) == 5
    compile(snippet.replace("\n    ", "\n").strip(), "<snippet>", "exec")


def test_demo_prints_table_and_summary_line(tmp_path, capsys):
    layout = {
        "format": "realign-layout",
        "version": 1,
        "regions": [
            {"phrase": "cat", "box": [0.0, 0.0, 0.5, 1.0]},
            {"phrase": "dog", "mask": [[0, 0, 1, 1]] * 4, "score": 0.5},  # not in the prompt: appended
        ],
    }
    path = tmp_path / "layout.json"
    path.write_text(json.dumps(layout))
    out = tmp_path / "out"
    code = main(["demo", "--tiny", "--out", str(out), "--steps", "1", "--height", "32", "--width", "32", "-q",
                 "--prompt", "a cat", "--layout", str(path)])
    assert code == 0
    text = capsys.readouterr().out
    assert "tiny RANDOM weights" in text and "layout = Layout.from_json(" in text
    assert "note: phrases ['dog'] are not in the prompt" in text
    assert "cat " in text and "dog " in text and "realigned" in text
    last = text.strip().splitlines()[-1]
    assert last.startswith(f"wrote 7 files to {out}/") and all(f"{s} " in last for s in ("load", "plain", "realigned", "pictures"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["encoded_prompt"] == "a cat, dog" and summary["appended_phrases"] == ["dog"]
    assert [row["area"] for row in summary["phrases"]] == pytest.approx([0.5, 0.5])
    _not_blank(out / "layout.png")


@pytest.mark.parametrize("argv", [["--help"], ["demo", "--help"]])
def test_help_has_examples(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "examples:" in text and "realigndiff demo" in text


def test_demo_help_names_both_worlds(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--tiny" in text and "trained shapes world" in text and "the code path only" in text


def test_demo_without_tiny_runs_the_shapes_world(monkeypatch, tmp_path):
    """Without --tiny the demo hands the parsed arguments, unfilled, to cli.shapes_demo.shapes_demo."""
    import realign_pipeline.cli.shapes_demo as shapes_demo_module

    seen = {}

    def fake(args):
        seen.update(vars(args))
        return 7

    monkeypatch.setattr(shapes_demo_module, "shapes_demo", fake)
    assert main(["demo", "--out", str(tmp_path), "--steps", "4"]) == 7
    assert seen["prompt"] is None and seen["height"] is None and seen["width"] is None
    assert seen["tiny"] is False and seen["steps"] == 4 and seen["out"] == str(tmp_path)
    assert seen["seed"] is None and seen["search_seeds"] == 32 and seen["num_images"] == 4  # None: search for seeds


def test_demo_help_layout_example_is_a_valid_layout():
    from realign_pipeline.cli.demo import DEMO_EPILOG

    text = DEMO_EPILOG[DEMO_EPILOG.index("{") :]
    assert [region.phrase for region in Layout.from_json(text)] == ["cat", "sofa"]


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"realigndiff {__version__}"


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "demo" in capsys.readouterr().err


@pytest.mark.parametrize(
    "content, expected",
    [
        ("{not json", "not valid JSON"),
        ('{"regions": [{"phrase": "red book", "box": [0.5, 0.1, 0.2, 0.9]}]}', "region 0 ('red book')"),
        ('{"regions": []}', "no regions"),
        ('{"format": "other", "regions": []}', "unsupported layout format"),
        (None, "cannot read layout file"),
    ],
)
def test_bad_layout_file_exits_2_with_message(tmp_path, capsys, content, expected):
    path = tmp_path / "bad.json"
    if content is not None:
        path.write_text(content)
    code = main(["demo", "--tiny", "--out", str(tmp_path / "out"), "--layout", str(path), "--steps", "1", "-q"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("realigndiff demo: error: --layout ") and expected in err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("option, value", [("--height", "30"), ("--width", "1024"), ("--steps", "0")])
def test_bad_numbers_are_usage_errors(option, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", option, value])
    assert exit_info.value.code == 2
    assert option in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------------
# visualize
# ------------------------------------------------------------------------------------------------------------
def test_heatmap_size_and_normalization():
    ramp = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    image = heatmap(ramp, (40, 30))
    assert image.size == (40, 30) and image.mode == "RGB"
    pixels = np.asarray(image)
    assert not np.array_equal(pixels[0, 0], pixels[-1, -1])
    flat = np.asarray(heatmap(torch.ones(3, 3), (8, 8)))
    assert (flat == flat[0, 0]).all()  # a constant map is one color


def test_overlay_layout_draws_masks_and_boxes():
    mask = np.zeros((8, 8), dtype=bool)
    mask[2:6, 4:8] = True
    layout = Layout([Region("a", box=[0.0, 0.0, 0.5, 0.5]), Region("b", mask=mask)])
    assert region_box(layout[1]) == (0.5, 0.25, 1.0, 0.75)
    gray = Image.new("RGB", (32, 32), (128, 128, 128))
    drawn = np.asarray(overlay_layout(gray, layout, min_side=64))
    assert drawn.shape == (64, 64, 3)
    assert not np.array_equal(drawn[20, 20], drawn[40, 60])  # different colors for the two regions
    assert (drawn[60, 2] == 128).all()  # outside every region: untouched


def test_attention_grid_rows_and_missing_word():
    before = {"cat": torch.rand(4, 4), "sofa": torch.rand(4, 4)}
    after = {k: v + 0.1 for k, v in before.items()}
    grid = attention_grid(before, after, ["cat", "sofa"], 32, show_difference=False)
    assert grid.height > 2 * 32 and grid.width > 2 * 32
    with pytest.raises(KeyError, match="dog"):
        attention_grid(before, after, ["dog"], 32)


def test_demo_as_a_user_runs_it(tmp_path):
    """The console entry point in a fresh process, as `make demo` runs it; without torchvision installed it prints
    no transformers warning about it (merged from test_cli_output.py's
    test_the_demo_command_prints_no_torchvision_warning: a fresh process, since transformers warns once per process
    and the warnings come from first imports; ``-q`` turns off only the progress bars)."""
    import importlib.util
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "warning"}
    result = subprocess.run(
        [sys.executable, "-m", "realign_pipeline.cli", "demo", "--tiny", "--out", str(tmp_path / "out"), "--steps", "2",
         "-q"],
        capture_output=True, text=True, env=env, timeout=300, check=False, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    out = tmp_path / "out"
    for name in ("plain.png", "realigned.png", "panel.png", "attention_maps.png", "layout.json", "summary.json"):
        assert (out / name).is_file(), name
    _not_blank(out / "panel.png")
    assert "RANDOM" in result.stdout.upper()
    if importlib.util.find_spec("torchvision") is None:  # the warning appears only without torchvision
        assert "requires torchvision" not in result.stderr + result.stdout
