"""The evaluation report (evaluation.report): table in Table 1 layout with best marks, charts, image grid,
self-contained HTML and the literature rows. metrics.json files are written by hand with known numbers."""

from __future__ import annotations

import base64
import json
import sys

import numpy as np
import PIL.Image
import pytest

from realign_pipeline.evaluation.report import LITERATURE, write_report

PROMPTS = ["a red book", "a green bench", "a blue car"]


def make_scored(root, name, metrics, prompt_set="coco5k", n=3, color=(0, 0, 0)):
    folder = root / name
    (folder / "images").mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"name": name}))
    lines = []
    for i in range(n):
        rng = np.random.default_rng(i)
        arr = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
        arr[:4] = color  # a stripe that tells the configurations apart
        PIL.Image.fromarray(arr).save(folder / "images" / f"{i:05d}.png")
        lines.append(json.dumps({"index": i, "prompt": PROMPTS[i % 3], "prompt_set": prompt_set, "seed": i,
                                 "file": f"images/{i:05d}.png", "config": name}))
    (folder / "manifest.rank0.jsonl").write_text("\n".join(lines) + "\n")
    entries = {m: {"mean": v, "std": 0.01, "n": n, "model": f"model-{m}"} for m, v in metrics.items()}
    (folder / "metrics.json").write_text(json.dumps({"config": name, "prompt_set": prompt_set, "num_images": n,
                                                     "metrics": entries}))
    return folder


@pytest.fixture()
def folders(tmp_path):
    return [
        make_scored(tmp_path, "sd15", {"clip": 0.30, "blip_itm": 0.50, "fid": 20.0}, color=(255, 0, 0)),
        make_scored(tmp_path, "realigndiff", {"clip": 0.32, "blip_itm": 0.45, "fid": 25.0}, color=(0, 255, 0)),
        make_scored(tmp_path, "promptist", {"clip": 0.31, "blip_itm": 0.50, "fid": 18.0}, color=(0, 0, 255)),
    ]


def test_table_rows_and_best_marks(folders, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # the Pillow fallback
    files = write_report(folders, tmp_path / "report")
    table = json.loads(files["table_json"].read_text())
    assert table["columns"] == ["clip", "blip_itm", "fid"]
    assert [r["config"] for r in table["rows"]] == ["sd15", "realigndiff", "promptist"]
    assert table["rows"][1]["values"] == {"clip": 0.32, "blip_itm": 0.45, "fid": 25.0}
    # higher is better but FID lower; ties are all best
    assert table["best"] == {"coco5k": {"clip": ["realigndiff"], "blip_itm": ["sd15", "promptist"], "fid": ["promptist"]}}
    assert table["lower_is_better"] == ["fid"]
    md = files["table_md"].read_text()
    rows = {line.split("|")[1].strip(): line for line in md.splitlines() if line.startswith("| ") and "images" not in line}
    assert "**0.3200**" in rows["realigndiff"] and "**0.3000**" not in rows["sd15"]
    assert "**0.5000**" in rows["sd15"] and "**0.5000**" in rows["promptist"] and "**0.4500**" not in rows["realigndiff"]
    assert "**18.00**" in rows["promptist"] and "**20.00**" not in rows["sd15"]
    assert "FID ↓" in md and "CLIP (cos) ↑" in md and "`model-clip`" in md
    assert "literature" not in md.lower().split("best value")[1]  # coco5k: no literature section

    # charts: one per metric, Pillow size, not blank, bars in the palette colours
    for m in ("clip", "blip_itm", "fid"):
        with PIL.Image.open(files[f"chart_{m}"]) as im:
            assert im.size == (640, 360)
            colors = {c for _, c in im.convert("RGB").getcolors(640 * 360)}
            assert (31, 119, 180) in colors and (255, 127, 14) in colors and len(colors) > 3


def test_grid_png_and_html(folders, tmp_path):
    files = write_report(folders, tmp_path / "report", cell=64)
    with PIL.Image.open(files["grid_png"]) as im:
        grid = np.asarray(im.convert("RGB"))
    assert grid.shape == (32 + 3 * 64, 220 + 3 * 64, 3)  # rows = 3 prompts, columns = 3 configurations
    assert grid.std() > 10
    # the stripe colours sit in the configuration's column: red, green, blue
    for j, color in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        x, y = 220 + j * 64 + 32, 32 + 64 + 6  # inside the stripe of row 1's image (24 px fitted to 60 px)
        assert tuple(grid[y, x]) == color, j
    page = files["grid_html"].read_text()
    for folder in folders:
        for i in range(3):
            data = base64.b64encode((folder / "images" / f"{i:05d}.png").read_bytes()).decode()
            assert data in page
    assert all(f"<th>{n}</th>" in page for n in ("sd15", "realigndiff", "promptist"))
    assert all(p in page for p in PROMPTS) and "src=\"http" not in page


def test_grid_matches_by_index(tmp_path):
    a = make_scored(tmp_path, "a", {"clip": 0.3}, n=3)
    b = make_scored(tmp_path, "b", {"clip": 0.2}, n=2)  # index 2 missing: only indices 0, 1 in the grid
    files = write_report([a, b], tmp_path / "r", cell=32)
    with PIL.Image.open(files["grid_png"]) as im:
        assert im.size == (220 + 2 * 32, 32 + 2 * 32)
    assert PROMPTS[2] not in files["grid_html"].read_text()


def test_literature_rows(tmp_path):
    folders = [
        make_scored(tmp_path, "sd15-color", {"blip_vqa": 0.37, "clip": 0.3}, prompt_set="t2icompbench-color"),
        make_scored(tmp_path, "sd15-ns", {"clip": 0.31}, prompt_set="t2icompbench-non-spatial"),
        make_scored(tmp_path, "sd15-geneval", {"clip": 0.3}, prompt_set="geneval"),
    ]
    # the same configuration name over several prompt sets
    for f in folders:
        (f / "config.json").write_text(json.dumps({"name": "sd15"}))
    files = write_report(folders, tmp_path / "report")
    table = json.loads(files["table_json"].read_text())
    lit = {s["benchmark"]: s for s in table["literature"]}
    assert lit["t2icompbench"]["columns"] == ["color", "non-spatial"]
    assert lit["t2icompbench"]["literature"] == {"SD v1.5": {"color": 0.3750, "non-spatial": 0.3088}}
    assert lit["t2icompbench"]["ours"] == {"sd15": {"color": 0.37, "non-spatial": 0.31}}
    assert lit["geneval"]["literature"] == {"SD v1.5": {"overall": 0.43}} and lit["geneval"]["ours"] == {"sd15": {"overall": None}}
    md = files["table_md"].read_text()
    assert "## From the literature: T2I-CompBench (val)" in md and "| SD v1.5 | literature | 0.3750 | 0.3088 |" in md
    assert "| sd15 | ours | 0.3700 | 0.3100 |" in md and "## From the literature: GenEval" in md
    assert LITERATURE["t2icompbench"]["rows"]["SD v1.5"] == {
        "color": 0.3750, "shape": 0.3724, "texture": 0.4159, "spatial": 0.1204, "non-spatial": 0.3088}
    assert set(table["best"]) == {"t2icompbench-color", "t2icompbench-non-spatial", "geneval"}


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="at least one"):
        write_report([], tmp_path / "r")
    (tmp_path / "x").mkdir()
    with pytest.raises(FileNotFoundError, match="no metrics.json"):
        write_report([tmp_path / "x"], tmp_path / "r")


def test_confidence_intervals_in_the_table(tmp_path):
    a = make_scored(tmp_path, "base", {"shapes_binding": 0.30, "fid": 20.0})
    b = make_scored(tmp_path, "realign", {"shapes_binding": 0.45, "fid": 21.0})
    for folder, (low, high) in ((a, (0.25, 0.35)), (b, (0.40, 0.50))):
        scored = json.loads((folder / "metrics.json").read_text())
        scored["metrics"]["shapes_binding"].update(ci_low=low, ci_high=high, confidence=0.95)
        (folder / "metrics.json").write_text(json.dumps(scored))
    files = write_report([a, b], tmp_path / "report", cell=32)
    md = files["table_md"].read_text()
    rows = {line.split("|")[1].strip(): line for line in md.splitlines() if line.startswith("| ") and "images" not in line}
    assert "| 0.3000 [0.2500, 0.3500] |" in rows["base"]
    assert "| **0.4500** [0.4000, 0.5000] |" in rows["realign"]  # best marked, CI kept
    assert "| 20.00 |" in rows["base"].replace("**", "")  # no CI: the mean alone
    assert "Binding ↑" in md and "95% percentile-bootstrap CI" in md
    table = json.loads(files["table_json"].read_text())
    assert table["columns"] == ["shapes_binding", "fid"]
    assert table["rows"][1]["values"] == {"shapes_binding": 0.45, "fid": 21.0}  # still plain numbers
    assert table["rows"][1]["ci"] == {"shapes_binding": [0.40, 0.50], "fid": None}
