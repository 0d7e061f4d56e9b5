"""Assemble the trained shapes-world models into the folders the package ships (fp16 safetensors).

    python training/shapes/assemble.py --runs runs/shapes --out src/realign_pipeline/assets/shapes

Writes ``pipeline/`` (a `RealignDiffPipeline` folder: vae, text_encoder, tokenizer, unet, DDIM scheduler and
the shapes dense captioner's settings), ``clip/`` (the whole small CLIP), ``blip2-captioner/`` and
``blip2-itm/`` when those runs exist, and ``training_summary.json`` (steps, final losses, wall time per run).

The second world (its CLIP trained without swapped negatives, a UNet trained on its text tower) ships only its
pipeline, beside the first world's; its images are judged by the first world's CLIP and BLIP-2:

    python training/shapes/assemble.py --runs runs/shapes-bow --out src/realign_pipeline/assets/shapes \
        --pipeline_name pipeline-bow --vae src/realign_pipeline/assets/shapes/pipeline/vae
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from train_unet import SCHEDULER_CONFIG
from transformers import (
    Blip2ForConditionalGeneration,
    Blip2ForImageTextRetrieval,
    Blip2Processor,
    CLIPImageProcessor,
    CLIPModel,
    CLIPTextModel,
    CLIPTokenizer,
)

from realign_pipeline import RealignDiffPipeline


def _summary(run: Path) -> dict:
    """Steps of the shipped weights (the last checkpoint's step: a run may have logged past it before it was
    stopped and finished from that checkpoint), wall time and the last logged values up to that step."""
    step = int(torch.load(run / "checkpoint" / "state.pt", weights_only=False)["step"])
    lines = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines() if x.strip()]
    lines = [x for x in lines if x["step"] <= step]
    last = {k: v for x in lines if x["step"] > step - 200 for k, v in x.items()}
    return {"steps": step, "wall_s": lines[-1]["elapsed_s"] if lines else 0, "last": last}


def _load_as_float32(folder: Path) -> None:
    """Weights stay fp16 on disk; ``from_pretrained`` without ``torch_dtype`` gives float32, which the CPU needs."""
    for config in folder.rglob("config.json"):
        data = json.loads(config.read_text())
        if data.get("dtype") == "float16" or data.get("torch_dtype") == "float16":
            data["dtype"] = "float32"
            data.pop("torch_dtype", None)
            config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--pipeline_name", default="pipeline",
                        help="folder of the pipeline under --out; any other name than 'pipeline' writes only it")
    parser.add_argument("--vae", default=None, help="the VAE folder (default: --runs/vae/final)")
    args = parser.parse_args()
    runs, out = Path(args.runs), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from realign_pipeline.shapes.perception import shapes_dense_captioner

    vae_path = Path(args.vae) if args.vae else runs / "vae" / "final"
    pipe = RealignDiffPipeline(
        vae=AutoencoderKL.from_pretrained(vae_path),
        text_encoder=CLIPTextModel.from_pretrained(runs / "clip" / "final"),
        tokenizer=CLIPTokenizer.from_pretrained(runs / "clip" / "final"),
        unet=UNet2DConditionModel.from_pretrained(runs / "unet" / "final"),
        scheduler=DDIMScheduler(**SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
        dense_captioner=shapes_dense_captioner(),
    )
    pipe.to(torch.float16)
    shutil.rmtree(out / args.pipeline_name, ignore_errors=True)
    pipe.save_pretrained(out / args.pipeline_name)
    summary_path = out / "training_summary.json"
    if args.pipeline_name != "pipeline":
        summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
        summary[args.pipeline_name] = {name: _summary(runs / name) for name in ("clip", "unet")}
        summary[args.pipeline_name]["vae"] = str(vae_path)
        _load_as_float32(out / args.pipeline_name)
        summary_path.write_text(json.dumps(summary, indent=2) + "\n")
        print(f"wrote {out / args.pipeline_name}")
        return
    summary = {"pipeline": {name: _summary(runs / name) for name in ("vae", "clip", "unet")}}

    clip = CLIPModel.from_pretrained(runs / "clip" / "final").to(torch.float16)
    shutil.rmtree(out / "clip", ignore_errors=True)
    clip.save_pretrained(out / "clip")
    CLIPTokenizer.from_pretrained(runs / "clip" / "final").save_pretrained(out / "clip")
    CLIPImageProcessor.from_pretrained(runs / "clip" / "final").save_pretrained(out / "clip")

    for name, cls in (("blip2-captioner", Blip2ForConditionalGeneration), ("blip2-itm", Blip2ForImageTextRetrieval)):
        final = runs / name / "final"
        if not final.exists():
            continue
        shutil.rmtree(out / name, ignore_errors=True)
        model = cls.from_pretrained(final)
        model.to(torch.float16).save_pretrained(out / name)
        processor = Blip2Processor.from_pretrained(final)
        if name == "blip2-itm":  # the Q-Former text encoder has this many positions; longer texts must be cut
            processor.tokenizer.model_max_length = model.config.qformer_config.max_position_embeddings
        processor.save_pretrained(out / name)
        summary[name] = _summary(runs / name)
    _load_as_float32(out)
    (out / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"wrote {out} ({size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
