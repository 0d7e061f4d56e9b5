"""`realigndiff evaluate` with SDXL: the `sdxl` preset on RealignDiffXLPipeline, `sdxl+realign`, and one
`evaluate run` of both on 2 prompts with a tiny SDXL folder and tiny captioner models, in-process."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from realign_pipeline.cli import main
from realign_pipeline.evaluation.configs import PRESETS, SDXL, load_config, model_family, pipeline_class

PROMPTS = ["a red book and a yellow vase", "a blue cube"]


def test_sdxl_presets_and_pipeline_choice(tiny_sdxl_dir, tiny_realign_sd_dir):
    sdxl, realign = load_config("sdxl"), load_config("sdxl+realign")
    assert (sdxl.model, sdxl.pipeline, sdxl.realign) == (SDXL, "realign-xl", False)
    assert (realign.model, realign.pipeline, realign.realign) == (SDXL, "realign-xl", True)
    assert "sdxl+realign" in PRESETS and realign.call_kwargs()["realign"] is True
    assert pipeline_class(sdxl).__name__ == "RealignDiffXLPipeline"  # without reading anything
    # "realign" reads the model's model_index.json: an SDXL folder gets the XL pipeline
    assert model_family(str(tiny_sdxl_dir)) == ("xl", "StableDiffusionXLPipeline")
    assert model_family(str(tiny_realign_sd_dir)) == ("sd", "RealignDiffPipeline")
    assert pipeline_class(load_config("sd15").replace(model=str(tiny_sdxl_dir))).__name__ == "RealignDiffXLPipeline"
    assert pipeline_class(load_config("sd15").replace(model=str(tiny_realign_sd_dir))).__name__ == "RealignDiffPipeline"
    assert pipeline_class(sdxl.replace(pipeline="auto")).__name__ == "DiffusionPipeline"
    with pytest.raises(ValueError, match="need pipeline='realign' \\(or 'realign-xl'\\)"):
        sdxl.replace(pipeline="auto", realign=True)


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_sdxl_dir, tiny_clip_dir, tiny_grounding_dino_dir, tiny_sam_dir):
    root = tmp_path_factory.mktemp("eval-xl")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    common = {"model": str(tiny_sdxl_dir), "steps": 2, "dtype": "float32"}
    captioner = {"tagger_model": str(tiny_clip_dir), "detector": str(tiny_grounding_dino_dir),
                 "segmenter": str(tiny_sam_dir), "tag_threshold": 0.0, "box_threshold": 0.0, "text_threshold": 0.0}
    (root / "sdxl.json").write_text(json.dumps({"preset": "sdxl", **common}))
    (root / "sdxl-realign.json").write_text(json.dumps({"preset": "sdxl+realign", **common, "captioner": captioner}))
    out = root / "out"
    argv = ["evaluate", "run", "--config-file", str(root / "sdxl.json"), str(root / "sdxl-realign.json"),
            "--prompts", str(root / "prompts.txt"), "--metrics", "clip,timings", "--model-path",
            f"clip={tiny_clip_dir}", "--device", "cpu", "--out", str(out), "-q"]  # fmt: skip
    assert main(argv) == 0
    return out


def test_evaluate_run_sdxl_and_sdxl_realign(run):
    plain, fine = run / "sdxl" / "seed42", run / "sdxl-realign" / "seed42"
    rows = {name: [json.loads(line) for line in (folder / "manifest.rank0.jsonl").read_text().splitlines()]
            for name, folder in (("plain", plain), ("fine", fine))}
    assert [r["prompt"] for r in rows["plain"]] == [r["prompt"] for r in rows["fine"]] == PROMPTS
    assert all(r["realigned"] is None for r in rows["plain"])
    assert all(r["realigned"] and r["layout_file"] for r in rows["fine"])
    assert {"coarse_s", "caption_s", "fine_s"} <= set(rows["fine"][0]["timings"])
    settings = rows["fine"][0]["settings"]
    assert settings["realign"] is True and (settings["height"], settings["width"]) == (32, 32)  # the model's size
    def pixels(path):
        return np.asarray(Image.open(path), dtype=np.int16)

    for index in range(len(PROMPTS)):
        # the fine stage's coarse image is the plain configuration's image: same pipeline, seed and settings
        assert np.abs(pixels(fine / "coarse" / f"{index:05d}.png") - pixels(plain / "images" / f"{index:05d}.png")).max() <= 1
    assert not np.array_equal(pixels(fine / "images/00000.png"), pixels(plain / "images/00000.png"))  # re-aligned
    table = json.loads((run / "report" / "table.json").read_text())
    assert [row["config"] for row in table["rows"]] == ["sdxl", "sdxl-realign"]
    assert all(row["num_images"] == len(PROMPTS) for row in table["rows"])
