"""The shapes-world training scripts (training/shapes/) run, checkpoint and resume, at a few steps each."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).resolve().parents[1] / "training" / "shapes"


@pytest.fixture(scope="module")
def scripts():
    sys.path.insert(0, str(SCRIPTS))
    threads = torch.get_num_threads()
    try:
        import train_blip2
        import train_clip
        import train_unet
        import train_vae

        yield {"vae": train_vae, "clip": train_clip, "unet": train_unet, "blip2": train_blip2}
    finally:
        torch.set_num_threads(threads)
        sys.path.remove(str(SCRIPTS))


def run(module, monkeypatch, *argv: str) -> None:
    monkeypatch.setattr(sys, "argv", [module.__file__, *argv])
    module.main()


def steps_logged(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(scripts, tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes-train")
    with pytest.MonkeyPatch.context() as mp:
        common = ["--train_batch_size", "4", "--log_steps", "1", "--checkpointing_steps", "2"]
        run(scripts["vae"], mp, "--output_dir", str(root / "vae"), "--max_train_steps", "2", *common)
        run(scripts["clip"], mp, "--output_dir", str(root / "clip"), "--max_train_steps", "2", *common)
    return root


def test_vae_resumes_from_its_checkpoint(scripts, trained, monkeypatch, capsys):
    out = trained / "vae"
    assert (out / "final" / "config.json").exists()
    assert steps_logged(out) == [1, 2]
    before = torch.load(out / "checkpoint" / "state.pt", weights_only=False)
    assert before["step"] == 2
    run(scripts["vae"], monkeypatch, "--output_dir", str(out), "--max_train_steps", "3",
        "--train_batch_size", "4", "--log_steps", "1", "--checkpointing_steps", "2")
    assert "resumed from" in capsys.readouterr().out
    assert steps_logged(out) == [1, 2, 3]  # steps 1-2 were not redone
    after = torch.load(out / "checkpoint" / "state.pt", weights_only=False)
    assert after["step"] == 3
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(out / "final")
    assert vae.config.scaling_factor > 0 and vae.config.scaling_factor != 0.18215


def test_clip_saves_a_model_the_text_encoder_loads_from(trained):
    from transformers import CLIPTextModel, CLIPTokenizer

    text_encoder = CLIPTextModel.from_pretrained(trained / "clip" / "final")
    tokenizer = CLIPTokenizer.from_pretrained(trained / "clip" / "final")
    ids = tokenizer(["a red circle"], padding="max_length", max_length=tokenizer.model_max_length,
                    return_tensors="pt").input_ids
    assert tokenizer.model_max_length == 16
    assert text_encoder(ids)[0].shape == (1, 16, text_encoder.config.hidden_size)


def test_unet_trains_on_the_frozen_vae_and_clip(scripts, trained, monkeypatch):
    out = trained / "unet"
    run(scripts["unet"], monkeypatch, "--output_dir", str(out), "--vae", str(trained / "vae" / "final"),
        "--clip", str(trained / "clip" / "final"), "--max_train_steps", "2", "--train_batch_size", "4",
        "--log_steps", "1", "--checkpointing_steps", "1", "--validation_steps", "0")
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(out / "final")
    assert unet.config.cross_attention_dim == 64 and unet.config.sample_size == 8
    state = torch.load(out / "checkpoint" / "state.pt", weights_only=False)
    assert set(state["modules"]) == {"unet", "ema"} and state["step"] == 2
    # the saved model is the EMA, not the raw weights
    saved = unet.state_dict()
    name = "conv_in.weight"
    assert torch.equal(saved[name], state["modules"]["ema"][name])
    assert not torch.equal(saved[name], state["modules"]["unet"][name])


def test_unet_trains_on_three_object_scenes_with_a_shipped_text_encoder(scripts, trained, monkeypatch):
    from realign_pipeline.shapes.pretrained import shapes_model_path

    out = trained / "unet-triples"
    run(scripts["unet"], monkeypatch, "--output_dir", str(out), "--vae", str(trained / "vae" / "final"),
        "--clip", str(shapes_model_path("pipeline-bow")), "--scenes", "triples", "--max_train_steps", "1",
        "--train_batch_size", "2", "--log_steps", "1", "--validation_steps", "0")
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(out / "final")
    assert unet.config.sample_size == 12  # 48 px images through the 4x VAE
    args = json.loads((out / "final" / "training_args.json").read_text())
    assert args["scenes"] == "triples" and args["resolution"] == 48


@pytest.mark.parametrize("model", ["captioner", "itm"])
def test_blip2_models_train_and_load(scripts, tmp_path, monkeypatch, model):
    run(scripts["blip2"], monkeypatch, "--model", model, "--output_dir", str(tmp_path), "--max_train_steps", "2",
        "--train_batch_size", "4", "--log_steps", "1")
    from transformers import Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval, Blip2Processor

    cls = Blip2ForConditionalGeneration if model == "captioner" else Blip2ForImageTextRetrieval
    assert isinstance(cls.from_pretrained(tmp_path / "final"), cls)
    tokenizer = Blip2Processor.from_pretrained(tmp_path / "final").tokenizer
    assert tokenizer.unk_token_id not in tokenizer("a purple cross to the left of a green circle").input_ids
