"""`realigndiff generate` on a tiny SDXL folder, through the CLI's main(argv) in-process: the XL pipeline chosen
from model_index.json, SDXL's default size and guidance, plain and with the fine stage (`--realign`)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from realign_pipeline import Layout
from realign_pipeline.cli import main

PROMPT = "a red book and a yellow vase"


def test_generate_plain_picks_the_xl_pipeline_and_sdxls_defaults(tiny_sdxl_dir, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    assert main(["generate", PROMPT, "--model", str(tiny_sdxl_dir), "--no-realign", "--device", "cpu",
                 "--steps", "2", "--seed", "3", "--out", str(tmp_path), "-q"]) == 0  # fmt: skip
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["pipeline"] == "RealignDiffXLPipeline" and summary["mode"] == "plain"
    assert (summary["height"], summary["width"], summary["guidance"]) == (32, 32, 5.0)  # sample size 16 x VAE scale 2
    image = np.asarray(Image.open(tmp_path / "000-a-red-book-and-a-yellow-vase" / "image.png"), dtype=np.float64)
    # without a layout it is StableDiffusionXLPipeline with its own defaults
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(PROMPT, num_inference_steps=2, generator=torch.Generator("cpu").manual_seed(3)).images[0]
    assert np.abs(image - np.asarray(expected, dtype=np.float64)).max() <= 1


def test_generate_realign_on_sdxl_writes_every_picture(tiny_sdxl_dir, tiny_clip_dir, tiny_grounding_dino_dir,
                                                        tiny_sam_dir, tmp_path):
    argv = ["generate", PROMPT, "--model", str(tiny_sdxl_dir), "--pipeline", "xl", "--realign",
            "--tagger-model", str(tiny_clip_dir), "--detector", str(tiny_grounding_dino_dir),
            "--segmenter", str(tiny_sam_dir), "--tag-threshold", "0", "--box-threshold", "0", "--text-threshold", "0",
            "--device", "cpu", "--steps", "2", "--height", "32", "--width", "48", "--guidance", "4",
            "--out", str(tmp_path), "-q"]  # fmt: skip
    assert main(argv) == 0
    folder = tmp_path / "000-a-red-book-and-a-yellow-vase"
    for name in ("image.png", "coarse.png", "panel.png", "attention_maps.png"):
        assert (folder / name).is_file(), name
    assert Image.open(folder / "image.png").size == (48, 32)
    assert sorted(region.phrase for region in Layout.from_json(folder / "layout.json")) == ["red book", "yellow vase"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["mode"] == "realign" and summary["prompts"][0]["realigned"] is True
    assert (summary["pipeline"], summary["guidance"]) == ("RealignDiffXLPipeline", 4.0)


def test_a_pipeline_flag_that_contradicts_model_index_is_a_usage_error(tiny_sdxl_dir, tmp_path, capsys):
    assert main(["generate", PROMPT, "--model", str(tiny_sdxl_dir), "--pipeline", "sd", "--no-realign",
                 "--device", "cpu", "--out", str(tmp_path)]) == 2  # fmt: skip
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("realigndiff generate: error: --pipeline sd:") and "StableDiffusionXLPipeline" in error
    assert "use --pipeline xl" in error


@pytest.mark.parametrize("flag", ["--pipeline", "--variant"])
def test_generate_help_lists_the_xl_flags(flag, capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    assert flag in capsys.readouterr().out
