"""The generation harness (`evaluation.generate`, `evaluation.configs`, `realigndiff evaluate generate`) on tiny
random models saved to folders: manifest and seeding, resume after a kill, two-process sharding through the
command line, the GenEval and T2I-CompBench folder layouts, the presets, ReFL checkpoints, Promptist with a tiny
GPT-2, DenseDiffusion-style unit scores."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from realign_pipeline import Layout, RealignDiffPipeline, Region
from realign_pipeline.captioner import CaptionerWrapper
from realign_pipeline.evaluation import load_prompts
from realign_pipeline.evaluation.configs import (
    PRESETS,
    EvalConfig,
    build_pipeline,
    load_config,
)
from realign_pipeline.evaluation.generate import generate_images, read_manifest
from realign_pipeline.testing import tiny_pipeline

STEPS = 2


@pytest.fixture(scope="module")
def sd_folder(tiny_realign_sd_dir) -> str:
    return str(tiny_realign_sd_dir)


@pytest.fixture(scope="module")
def config(sd_folder) -> EvalConfig:
    return load_config("sd15").replace(name="tiny-sd15", model=sd_folder, steps=STEPS)


@pytest.fixture(scope="module")
def pipe(config):
    return build_pipeline(config, device="cpu")


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_manifest_seeding_and_files(config, pipe, tmp_path):
    records = load_prompts("cc500", limit=3)
    result = generate_images(config, records, tmp_path, seed=42, batch_size=2, pipeline=pipe, progress=False)
    assert result["generated"] == 3 and result["skipped"] == 0
    rows = read_manifest(tmp_path)
    assert [row["index"] for row in rows] == [0, 1, 2]
    row = rows[1]
    assert row["prompt"] == records[1].text and row["prompt_set"] == "cc500"
    assert row["record"] == {"text": records[1].text, "id": "001", "set": "cc500", "metadata": {"line": 2}}
    assert row["seed"] == 43 and row["file"] == "images/00001.png" and row["config"] == "tiny-sd15"
    assert row["settings"] == {"num_inference_steps": STEPS, "guidance_scale": 7.5, "height": 32, "width": 32}
    assert row["timings"]["total_s"] > 0 and row["realigned"] is None
    assert EvalConfig.from_json(tmp_path / "config.json") == config
    # the seed of prompt i is seed + i, whatever the batch: the same image as a plain call with that seed
    direct = pipe(records[1].text, num_inference_steps=STEPS, generator=torch.Generator("cpu").manual_seed(43)).images[0]
    assert np.abs(_pixels(tmp_path / row["file"]) - np.asarray(direct, dtype=np.int16)).max() <= 1
    assert not (tmp_path / "geneval").exists() and not (tmp_path / "t2icompbench").exists()


def test_resume_after_kill_regenerates_only_missing(config, pipe, tmp_path, monkeypatch):
    records = load_prompts("cc500", limit=4)
    calls = {"n": 0}
    original = type(pipe).__call__

    def dies_on_third_call(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # killed while the third image is in flight
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(pipe), "__call__", dies_on_third_call)
    with pytest.raises(KeyboardInterrupt):
        generate_images(config, records, tmp_path, pipeline=pipe, progress=False)
    monkeypatch.setattr(type(pipe), "__call__", original)
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == ["00000.png", "00001.png"]
    assert not list((tmp_path / ".partial").iterdir())
    # a kill between the image and its manifest line: the image of index 1 is there, its line is not
    manifest = tmp_path / "manifest.rank0.jsonl"
    lines = manifest.read_text().splitlines()
    manifest.write_text(lines[0] + "\n" + lines[1][:20])  # the second line cut mid-way
    kept = (tmp_path / "images" / "00000.png").stat().st_mtime_ns
    os.utime(tmp_path / "images" / "00000.png", ns=(kept - 10**9, kept - 10**9))
    kept -= 10**9
    result = generate_images(config, records, tmp_path, pipeline=pipe, progress=False)
    assert result == {**result, "generated": 3, "skipped": 1}
    assert (tmp_path / "images" / "00000.png").stat().st_mtime_ns == kept
    assert [row["index"] for row in read_manifest(tmp_path)] == [0, 1, 2, 3]
    again = generate_images(config, records, tmp_path, pipeline=pipe, progress=False)
    assert again["generated"] == 0 and again["skipped"] == 4
    with pytest.raises(ValueError, match="another configuration"):
        generate_images(config.replace(steps=3), records, tmp_path, pipeline=pipe, progress=False)
    with pytest.raises(ValueError, match="another prompt set"):
        generate_images(config, records, tmp_path, seed=0, pipeline=pipe, progress=False)


def test_resume_after_a_cut_manifest_line_then_score(config, pipe, tmp_path):
    """Killed while appending a manifest line: resuming makes that image again, then the folder scores."""
    from realign_pipeline.evaluation.score import score_folder

    records = load_prompts("cc500", limit=2)
    generate_images(config, records, tmp_path, pipeline=pipe, progress=False)
    manifest = tmp_path / "manifest.rank0.jsonl"
    whole = manifest.read_text().splitlines()
    manifest.write_text(whole[0] + "\n" + whole[1][: len(whole[1]) // 2])  # the second line cut mid-way
    with pytest.warns(UserWarning, match="cut short"):
        assert [row["index"] for row in read_manifest(tmp_path)] == [0]
    result = generate_images(config, records, tmp_path, pipeline=pipe, progress=False)
    assert result["generated"] == 1 and result["skipped"] == 1
    lines = manifest.read_text().splitlines()
    assert lines[0] == whole[0] and [json.loads(line)["index"] for line in lines] == [0, 1]  # no cut line left
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing left to warn about
        scored = score_folder(tmp_path, ["timings"], progress=False)
    assert scored["num_images"] == 2 and scored["metrics"]["timings"]["n"] == 2


def test_geneval_and_t2icompbench_layouts(config, pipe, tmp_path):
    geneval = load_prompts("geneval", limit=4, seed=1)
    generate_images(config, geneval, tmp_path / "geneval-run", pipeline=pipe, progress=False)
    asset = Path(__file__).parents[1] / "src/realign_pipeline/assets/prompts/geneval/evaluation_metadata.jsonl"
    lines = asset.read_text().splitlines()
    for index, record in enumerate(geneval):
        folder = tmp_path / "geneval-run" / "geneval" / f"{int(record.id):05d}"
        assert json.loads((folder / "metadata.jsonl").read_text()) == json.loads(lines[int(record.id)])
        assert sorted(p.name for p in (folder / "samples").iterdir()) == ["0000.png"]
        assert (folder / "samples/0000.png").read_bytes() == (tmp_path / f"geneval-run/images/{index:05d}.png").read_bytes()

    t2i = load_prompts("t2icompbench-color", limit=2)
    two = config.replace(images_per_prompt=2)
    generate_images(two, t2i, tmp_path / "t2i-run", pipeline=pipe, progress=False)
    assert sorted(p.name for p in (tmp_path / "t2i-run/images").iterdir()) == [
        "00000_0.png", "00000_1.png", "00001_0.png", "00001_1.png"]
    samples = tmp_path / "t2i-run/t2icompbench/samples"
    names = os.listdir(samples)
    assert len(names) == 4
    names.sort(key=lambda x: int(x.split("_")[-1].split(".")[0]))  # as BLIP_vqa.py reads them
    assert [name.split("_")[0] for name in names] == [t2i[0].text] * 2 + [t2i[1].text] * 2
    assert [row["benchmark_files"]["t2icompbench"] for row in read_manifest(tmp_path / "t2i-run")] == [
        f"t2icompbench/samples/{name}" for name in names]


def test_two_processes_and_help_through_the_command_line(config, tmp_path, capsys):
    """Two shards at once in two processes: shard 0 via ``python -m realign_pipeline.evaluation`` in a fresh
    subprocess, shard 1 via ``realigndiff evaluate generate`` through the CLI's main in this process while the
    other runs; and ``--help`` through main."""
    from realign_pipeline.cli import main

    config_path = tmp_path / "tiny.json"
    config.to_json(config_path)
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    common = ["--config", str(config_path), "--prompts", "cc500", "--limit", "5", "--out", str(out), "-q",
              "--device", "cpu", "--num-processes", "2"]
    with (tmp_path / "shard0.out").open("w+") as stdout, (tmp_path / "shard0.err").open("w+") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "realign_pipeline.evaluation", *common, "--process-index", "0"],
                                env=env, stdout=stdout, stderr=stderr, text=True)
        try:
            with pytest.raises(SystemExit) as exited:
                main(["evaluate", "generate", "--help"])
            assert exited.value.code == 0
            help_text = capsys.readouterr().out
            assert main(["evaluate", "generate", *common, "--process-index", "1"]) == 0
            shard1 = capsys.readouterr()
            assert proc.wait(timeout=300) == 0, stderr.seek(0) or stderr.read()[-2000:]
        finally:
            if proc.poll() is None:
                proc.kill()
        stderr.seek(0)
        assert "Traceback" not in stderr.read() and "Traceback" not in shard1.err
    assert "process 1/2: generated 2 image(s)" in shard1.out
    assert "--process-index" in help_text and "densediffusion" in help_text
    rows = read_manifest(out)
    assert [row["index"] for row in rows] == [0, 1, 2, 3, 4]
    for rank in (0, 1):
        shard = [json.loads(line)["index"] for line in (out / f"manifest.rank{rank}.jsonl").read_text().splitlines()]
        assert shard == [i for i in range(5) if i % 2 == rank]

    assert main(["evaluate", "generate", "--config", "sd16", "--prompts", "cc500", "--out", str(tmp_path)]) == 2
    assert "presets: sd15, refl, realign" in capsys.readouterr().err
    assert main(["evaluate", "generate", "--config", str(config_path), "--prompts", "cc501", "--out", str(tmp_path)]) == 2
    assert "unknown prompt set 'cc501'" in capsys.readouterr().err


def test_presets_and_config_errors(tmp_path, sd_folder):
    assert set(PRESETS) == {"sd15", "refl", "realign", "refl+realign", "imagereward-refl", "densediffusion",
                            "promptist", "sdxl", "sdxl+realign", "shapes", "shapes-realign", "shapes-refl", "shapes-refl+realign"}
    assert load_config("sdxl").pipeline == "realign-xl" and load_config("promptist").promptist == "microsoft/Promptist"
    assert load_config("refl+realign").realign and load_config("refl+realign").requires_checkpoint
    with pytest.raises(ValueError, match="presets: sd15, refl, realign, refl\\+realign"):
        load_config("sd14")
    with pytest.raises(ValueError, match="needs a ReFL checkpoint: set lora"):
        build_pipeline("refl", device="cpu")
    with pytest.raises(ValueError, match="no such file or folder"):
        build_pipeline(load_config("refl").replace(model=sd_folder, lora="./missing-lora"), device="cpu")
    with pytest.raises(ValueError, match="need pipeline='realign'"):
        load_config("sdxl").replace(pipeline="auto", realign=True)
    with pytest.raises(ValueError, match="unknown pipeline_kwargs"):
        load_config("sd15").replace(pipeline_kwargs={"cross_strength": 1})
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"preset": "densediffusion", "pipeline_kwargs": {"self_attention_strength": 0.5}}))
    mine = load_config(str(path))
    assert mine.name == "mine" and mine.unit_scores
    assert mine.pipeline_kwargs == {"cross_attention_strength": 1.0, "self_attention_strength": 0.5}


def test_refl_checkpoints_and_auto_pipeline(config, pipe, tiny_sd_dir, tmp_path, save_random_lora):
    save_random_lora(tiny_pipeline(RealignDiffPipeline), tmp_path / "lora")
    refl = load_config("refl").replace(model=config.model, lora=str(tmp_path / "lora"), steps=STEPS)
    with_lora = build_pipeline(refl, device="cpu")
    assert with_lora.get_active_adapters()
    tiny_pipeline(RealignDiffPipeline, seed=1).unet.save_pretrained(tmp_path / "unet")
    full = build_pipeline(refl.replace(lora=None, unet=str(tmp_path / "unet")), device="cpu")
    assert not torch.equal(next(full.unet.parameters()), next(pipe.unet.parameters()))

    records = load_prompts("cc500", limit=1)
    auto = config.replace(name="auto", pipeline="auto", model=str(tiny_sd_dir))  # a folder of a diffusers class
    generate_images(auto, records, tmp_path / "auto", progress=False, device="cpu")
    generate_images(config, records, tmp_path / "plain", pipeline=pipe, progress=False)
    assert type(build_pipeline(auto, device="cpu")).__name__ == "StableDiffusionPipeline"
    assert np.abs(_pixels(tmp_path / "auto/images/00000.png") - _pixels(tmp_path / "plain/images/00000.png")).max() <= 1


def _tiny_gpt2(folder: Path) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2Tokenizer

    from realign_pipeline.testing import bytes_to_unicode

    vocab = {char: i for i, char in enumerate(bytes_to_unicode())}
    vocab["<|endoftext|>"] = len(vocab)
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = GPT2Tokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(vocab), n_positions=256, n_embd=32, n_layer=2, n_head=2,
                                       bos_token_id=len(vocab) - 1, eos_token_id=len(vocab) - 1))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_promptist_rewrites_the_prompt(config, tmp_path):
    from realign_pipeline.evaluation.configs import PromptistRewriter

    lm = _tiny_gpt2(tmp_path / "promptist")
    rewriter = PromptistRewriter(str(lm), max_new_tokens=6, num_beams=2)
    prompts = ["a red book", "a yellow vase"]
    first = rewriter(prompts)
    assert len(first) == 2 and all(isinstance(text, str) and text for text in first)
    assert rewriter(prompts) == first  # beam search: deterministic
    inputs = rewriter.tokenizer("a red book" + PromptistRewriter.MARKER)["input_ids"]
    assert rewriter.tokenizer.decode(inputs) == "a red book Rephrase:"

    promptist = config.replace(name="promptist", promptist=str(lm), promptist_max_new_tokens=6, promptist_num_beams=2)
    records = load_prompts("cc500", limit=1)
    generate_images(promptist, records, tmp_path / "out", progress=False, device="cpu")
    row = read_manifest(tmp_path / "out")[0]
    assert row["prompt"] == records[0].text
    assert row["generation_prompt"] == rewriter([records[0].text])[0]
    assert "rewrite_s" in row["timings"]


class BoxCaptioner:
    """A stand-in dense captioner: the two objects of "a red book and a yellow vase" in fixed boxes, Eq. 6 scores."""

    def __call__(self, images, prompts):
        return [Layout([Region("red book", box=[0.0, 0.2, 0.5, 1.0], score=2.0),
                        Region("yellow vase", box=[0.5, 0.0, 1.0, 1.0], score=0.5)]) for _ in images]


def test_densediffusion_unit_scores(config, tmp_path):
    wrapped = CaptionerWrapper(BoxCaptioner(), score=1.0)
    layout = wrapped([None], ["a red book and a yellow vase"])[0]
    assert [region.score for region in layout] == [1.0, 1.0] and layout.source["unit_scores"] == 1.0
    assert [list(region.box) for region in layout] == [[0.0, 0.2, 0.5, 1.0], [0.5, 0.0, 1.0, 1.0]]

    dense = load_config("densediffusion").replace(name="dd", model=config.model, steps=STEPS)
    dd_pipe = build_pipeline(dense, device="cpu", captioner=BoxCaptioner())
    unit = dd_pipe.dense_captioner
    assert isinstance(unit, CaptionerWrapper) and unit.score == 1.0 and isinstance(unit.captioner, BoxCaptioner)
    records = load_prompts(tmp_path / "p.txt") if (tmp_path / "p.txt").write_text(
        "a red book and a yellow vase\n") else None
    generate_images(dense, records, tmp_path / "out", pipeline=dd_pipe, progress=False)
    row = read_manifest(tmp_path / "out")[0]
    assert row["realigned"] is True
    assert row["phrases"] == [{"phrase": "red book", "score": 1.0}, {"phrase": "yellow vase", "score": 1.0}]
    assert row["settings"]["self_attention_strength"] == 0.3 and row["settings"]["realign"] is True
    assert {"coarse_s", "caption_s", "fine_s", "total_s"} <= set(row["timings"])
    assert [r.score for r in Layout.from_json(tmp_path / "out" / row["layout_file"])] == [1.0, 1.0]
    assert (tmp_path / "out" / row["coarse_file"]).is_file()
    assert dd_pipe.dense_captioner is unit  # the timing wrapper is removed afterwards


def test_score_report_and_study_through_the_command_line(config, pipe, tmp_path, capsys):
    """The other `evaluate` steps (evaluation.score / report / human) on two generated folders, through the CLI's
    parser (``main``, in this process: the fresh-process runs of ``realigndiff`` are the two shards above and
    test_cli.py's test_demo_as_a_user_runs_it)."""
    import re

    from realign_pipeline.cli import main

    records = load_prompts("cc500", limit=2)
    folders = [tmp_path / "a", tmp_path / "b"]
    generate_images(config, records, folders[0], pipeline=pipe, progress=False)
    generate_images(config.replace(name="tiny-b"), records, folders[1], seed=7, pipeline=pipe, progress=False)
    a, b = map(str, folders)
    for argv in (["evaluate", "score", a, b, "--metrics", "timings", "-q"],
                 ["evaluate", "report", a, b, "--out", str(tmp_path / "report")],
                 ["evaluate", "study-page", a, b, "--out", str(tmp_path / "study.html"), "--num-prompts", "2"]):
        assert main(argv) == 0, (argv, capsys.readouterr().err[-2000:])
    assert json.loads((folders[0] / "metrics.json").read_text())["metrics"]["timings"]["n"] == 2
    assert (tmp_path / "report").is_dir() and any((tmp_path / "report").iterdir())
    page = (tmp_path / "study.html").read_text()
    data = json.loads(re.search(r'<script type="application/json" id="study-data">(.*?)</script>', page, re.DOTALL).group(1))
    rankings = {"rater": "r1", "study_id": data["study_id"],
                "rankings": [{"prompt_index": item["prompt_index"], "ranking": sorted(item["order"])}
                             for item in data["items"]]}
    (tmp_path / "r1.json").write_text(json.dumps(rankings))

    from realign_pipeline.cli import main

    assert main(["evaluate", "study-results", str(tmp_path / "r1.json"), "--out", str(tmp_path / "alignment.json")]) == 0
    result = json.loads((tmp_path / "alignment.json").read_text())
    assert result["configs"]["tiny-sd15"]["mean_rank"] == 2.0 and result["configs"]["tiny-b"]["first_share"] == 1.0
    assert result["num_rankings"] == 2
    capsys.readouterr()
