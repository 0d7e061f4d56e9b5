"""Scoring result folders (evaluation.score), the BLIP-VQA score (evaluation.vqa) and the Inception-FID
wrapper (evaluation.inception). Folders are built by hand; models are tiny and random; nothing is downloaded."""

from __future__ import annotations

import json
import sys
import types
import warnings
from importlib import resources
from typing import ClassVar

import numpy as np
import PIL.Image
import pytest
import torch

from realign_pipeline.evaluation.fid import FrechetDistance
from realign_pipeline.evaluation.metrics import ClipScore
from realign_pipeline.evaluation.score import METRIC_NAMES, read_results, score_folder
from realign_pipeline.evaluation.vqa import BlipVqaScore, vqa_questions
from realign_pipeline.testing import blip_image_processor

PROMPTS = ["a red book and a yellow vase", "a green bench", "a blue car on the road", "the white cat", "a dog"]


def _image(seed: int, size=(40, 48)) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))


def make_folder(root, name="cfg", n=5, seed=0, prompt_set="coco5k", shards=2):
    """A result folder as the generation step writes it: config.json, images/, manifest.rank*.jsonl."""
    folder = root / name
    (folder / "images").mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"name": name, "guidance_scale": 7.5}))
    lines = []
    for i in range(n):
        file = f"images/{i:05d}.png"
        _image(seed * 100 + i).save(folder / file)
        record = {"text": PROMPTS[i % len(PROMPTS)], "id": str(1000 + i), "set": prompt_set,
                  "metadata": {"image_id": 500 + i, "file_name": f"COCO_val2014_{500 + i:012d}.jpg"}}
        lines.append({"index": i, "prompt": record["text"], "prompt_set": prompt_set, "record": record,
                      "seed": 42 + i, "file": file, "config": name, "settings": {},
                      "timings": {"total_s": 1.0 + i, "realign_s": 0.5}, "realigned": True})
    for r in range(shards):  # rank r writes every shards-th line, in reverse order to check the sort
        part = lines[r::shards][::-1]
        (folder / f"manifest.rank{r}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in part))
    return folder


@pytest.fixture(scope="module")
def clip_path(tiny_clip_dir):
    return str(tiny_clip_dir)


def bert_tokenizer():
    """The BERT uncased WordPiece tokenizer from the bundled vocabulary (offline)."""
    from transformers import BertTokenizer

    lines = resources.files("realign_pipeline").joinpath("assets", "bert_base_uncased_vocab.txt").read_text("utf-8")
    vocab = {w: i for i, w in enumerate(lines.splitlines())}
    return BertTokenizer(vocab=vocab, do_lower_case=True, model_max_length=64)


@pytest.fixture(scope="module")
def vqa_path(tmp_path_factory):
    """A tiny random BlipForQuestionAnswering + BlipProcessor, like Salesforce/blip-vqa-base (BERT vocab +
    2 extra tokens, decoder start token 30522)."""
    from transformers import BlipConfig, BlipForQuestionAnswering, BlipProcessor

    torch.manual_seed(0)
    cfg = BlipConfig(
        text_config={"vocab_size": 30524, "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "max_position_embeddings": 64, "bos_token_id": 30522,
                     "sep_token_id": 102, "pad_token_id": 0, "encoder_hidden_size": 32, "initializer_range": 0.5},
        vision_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "image_size": 32, "patch_size": 8, "initializer_range": 0.5},
        initializer_range=0.5,
    )
    path = tmp_path_factory.mktemp("vqa") / "vqa"
    BlipForQuestionAnswering(cfg).eval().save_pretrained(path)
    BlipProcessor(image_processor=blip_image_processor(32), tokenizer=bert_tokenizer()).save_pretrained(path)
    return str(path)


# --- reading folders -----------------------------------------------------------------------------------------


def test_read_results_merges_shards_sorted(tmp_path):
    folder = make_folder(tmp_path, n=5, shards=2)
    config, entries = read_results(folder)
    assert config["name"] == "cfg" and config["guidance_scale"] == 7.5
    assert [e["index"] for e in entries] == [0, 1, 2, 3, 4]
    assert [e["prompt"] for e in entries] == PROMPTS


def test_a_manifest_line_cut_by_a_kill_is_ignored_with_a_warning(tmp_path):
    folder = make_folder(tmp_path, n=4, shards=1)
    manifest = folder / "manifest.rank0.jsonl"
    lines = sorted(manifest.read_text().splitlines(), key=lambda line: json.loads(line)["index"])
    manifest.write_text("\n".join(lines[:3]) + "\n" + lines[3][:40])  # the last line cut, no newline
    with pytest.warns(UserWarning, match=r"ignoring 1 manifest line\(s\) cut short .*line\(s\) 4\b"):
        result = score_folder(folder, ["timings"], progress=False)
    assert result["num_images"] == 3 and result["metrics"]["timings"]["n"] == 3
    # a cut line that an older resume ended with a newline, in the middle; undecodable bytes count as cut
    manifest.write_bytes(b"\n".join([lines[0].encode(), lines[3][:40].encode(), b"\xff\xfe\x00", *map(str.encode, lines[1:3])]))
    with pytest.warns(UserWarning, match="ignoring 2 manifest line"):
        assert [e["index"] for e in read_results(folder)[1]] == [0, 1, 2]
    # a whole last line without its newline is whole (a cut never leaves valid JSON)
    manifest.write_text("\n".join(lines))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [e["index"] for e in read_results(folder)[1]] == [0, 1, 2, 3]
    manifest.write_text(json.dumps({"index": 0, "file": "images/00000.png"}) + "\n")
    with pytest.raises(ValueError, match=r"rank0\.jsonl:1: a manifest line needs .*missing \['prompt'\]"):
        read_results(folder)


def test_errors(tmp_path, clip_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no manifest"):
        score_folder(empty, ["clip"], clip=clip_path, progress=False)
    folder = make_folder(tmp_path)
    with pytest.raises(ValueError, match="unknown metric.*'bogus'.*clip, negclip, blip_itm"):
        score_folder(folder, ["clip", "bogus"], progress=False)
    with pytest.raises(ValueError, match="real_images"):
        score_folder(folder, ["fid"], fid=lambda ims: torch.zeros(len(ims), 2), progress=False)
    (folder / "images" / "00003.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 images .* missing.*00003\.png"):
        score_folder(folder, ["clip"], clip=clip_path, progress=False)
    assert not (folder / "metrics.json").exists()
    assert set(METRIC_NAMES) >= {"clip", "negclip", "blip_itm", "caption_reward", "blip_vqa", "fid", "timings"}


# --- scores --------------------------------------------------------------------------------------------------


def test_clip_and_timings_match_direct_computation(tmp_path, clip_path):
    folder = make_folder(tmp_path, n=5)
    result = score_folder(folder, ["clip", "timings"], batch_size=2, progress=False, clip=clip_path)
    direct = ClipScore.from_pretrained(clip_path)
    direct.update([_image(i) for i in range(5)], PROMPTS)
    expected = direct.compute()
    clip = result["metrics"]["clip"]
    assert clip["mean"] == pytest.approx(expected["mean"], rel=1e-5, abs=1e-6)
    assert clip["std"] == pytest.approx(expected["std"], rel=1e-4, abs=1e-6)
    assert clip["n"] == 5 and clip["model"] == clip_path
    assert clip["clipscore_100_mean"] == pytest.approx(expected["clipscore_100_mean"], rel=1e-5, abs=1e-5)
    t = result["metrics"]["timings"]
    assert t["mean"] == pytest.approx(3.0) and t["n"] == 5 and t["field"] == "total_s"
    assert t["realign_s_mean"] == pytest.approx(0.5)
    assert result["config"] == "cfg" and result["prompt_set"] == "coco5k" and result["num_images"] == 5
    assert json.loads((folder / "metrics.json").read_text()) == json.loads(json.dumps(result))
    # scoring another metric later keeps the earlier ones
    again = score_folder(folder, ["timings"], progress=False)
    assert again["metrics"]["clip"] == result["metrics"]["clip"]


def test_fid_identical_sets_is_zero_and_uses_coco_ids(tmp_path):
    folder = make_folder(tmp_path, n=5)
    real = tmp_path / "val2014"
    real.mkdir()
    for i in range(5):  # the real images are the generated ones, named by the COCO image ids
        _image(i).save(real / f"COCO_val2014_{500 + i:012d}.png")
    _image(99).save(real / "COCO_val2014_000000000001.png")  # not in the prompt set: must not be used

    def features(images):
        return torch.stack([torch.from_numpy(np.asarray(im.resize((2, 2)), dtype=np.float64)).flatten() for im in images])

    result = score_folder(folder, ["fid"], real_images=real, fid=features, progress=False)
    fid = result["metrics"]["fid"]
    assert fid["n"] == 5 and fid["count_real"] == 5
    assert abs(fid["mean"]) < 1e-6 and fid["std"] is None
    # a real set that differs gives a clearly positive distance
    (real / f"COCO_val2014_{500:012d}.png").unlink()
    _image(77).save(real / f"COCO_val2014_{500:012d}.png")
    assert score_folder(folder, ["fid"], real_images=real, fid=features, progress=False)["metrics"]["fid"]["mean"] > 1.0
    (real / f"COCO_val2014_{501:012d}.png").unlink()
    with pytest.raises(FileNotFoundError, match="image id 501"):
        score_folder(folder, ["fid"], real_images=real, fid=features, progress=False)


# --- BLIP-VQA ------------------------------------------------------------------------------------------------


def test_vqa_questions():
    assert vqa_questions("a red book and a yellow vase") == ["red book?", "yellow vase?"]
    assert vqa_questions("zzxq blorp.") == ["zzxq blorp?"]


def test_blip_vqa_matches_hand_computation(vqa_path):
    from transformers import BlipForQuestionAnswering, BlipProcessor

    metric = BlipVqaScore.from_pretrained(vqa_path)
    assert metric.answer_token_id == 2748  # "yes" in the BERT uncased vocabulary
    images, prompts = [_image(1), _image(2)], ["a red book and a yellow vase", "a green bench"]
    metric.update(images, prompts)
    r = metric.compute()
    model, proc = BlipForQuestionAnswering.from_pretrained(vqa_path).eval(), BlipProcessor.from_pretrained(vqa_path)
    expected = []
    for image, questions in zip(images, [["red book?", "yellow vase?"], ["green bench?"]]):
        p = 1.0
        for q in questions:  # one question at a time, through transformers' own generate: first-step logits
            inputs = proc(images=image, text=q, return_tensors="pt")
            with torch.no_grad():
                out = model.generate(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"],
                                     max_new_tokens=1, do_sample=False, output_logits=True,
                                     return_dict_in_generate=True)
            p *= torch.softmax(out.logits[0][0].double(), -1)[2748].item()
        expected.append(p)
    assert metric.scores["blip_vqa"] == pytest.approx(expected, rel=1e-4)
    assert r["mean"] == pytest.approx(np.mean(expected), rel=1e-4) and r["model"] == vqa_path
    assert metric.questions == [["red book?", "yellow vase?"], ["green bench?"]]
    assert len(set(metric.scores["blip_vqa"])) == 2 and all(0 < s < 1 for s in metric.scores["blip_vqa"])


def test_blip_vqa_through_score_folder(tmp_path, vqa_path):
    folder = make_folder(tmp_path, n=3)
    result = score_folder(folder, ["blip_vqa"], batch_size=2, progress=False, blip_vqa=vqa_path)
    direct = BlipVqaScore.from_pretrained(vqa_path)
    direct.update([_image(i) for i in range(3)], PROMPTS[:3])
    assert result["metrics"]["blip_vqa"]["mean"] == pytest.approx(direct.compute()["mean"], rel=1e-4)
    assert result["metrics"]["blip_vqa"]["model"] == vqa_path


# --- Inception FID -------------------------------------------------------------------------------------------


def test_inception_missing_package_names_the_extra(monkeypatch):
    from realign_pipeline.evaluation.inception import InceptionFeatures, inception_fid

    monkeypatch.setitem(sys.modules, "pytorch_fid", None)  # import pytorch_fid -> ImportError
    monkeypatch.setitem(sys.modules, "pytorch_fid.inception", None)
    for build in (InceptionFeatures, inception_fid):
        with pytest.raises(ImportError, match=r'pip install "realign-pipeline\[eval\]"'):
            build()


def test_inception_features_with_a_stand_in_pytorch_fid(monkeypatch):
    """The wiring around pytorch-fid's InceptionV3 (its real weights cannot be downloaded here)."""
    seen = []

    class FakeInceptionV3(torch.nn.Module):
        BLOCK_INDEX_BY_DIM: ClassVar[dict[int, int]] = {64: 0, 192: 1, 768: 2, 2048: 3}

        def __init__(self, output_blocks):
            super().__init__()
            assert output_blocks == [3]

        def forward(self, x):  # pool3-like: (N, 2048, 1, 1) from the per-channel means
            seen.append((tuple(x.shape), float(x.min()), float(x.max())))
            return [x.mean((2, 3)).repeat(1, 683)[:, :2048, None, None]]

    pkg, mod = types.ModuleType("pytorch_fid"), types.ModuleType("pytorch_fid.inception")
    mod.InceptionV3 = FakeInceptionV3
    monkeypatch.setitem(sys.modules, "pytorch_fid", pkg)
    monkeypatch.setitem(sys.modules, "pytorch_fid.inception", mod)
    from realign_pipeline.evaluation.inception import InceptionFeatures, inception_fid

    f = InceptionFeatures()
    images = [_image(1, (16, 16)), _image(2, (20, 24)), _image(3, (16, 16))]
    feats = f(images)
    assert feats.shape == (3, 2048)
    for im, row in zip(images, feats):  # order kept although the two sizes are batched separately
        means = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255).mean((0, 1))
        assert torch.allclose(row[:3], means, atol=1e-6)
    assert all(0.0 <= lo and hi <= 1.0 for _, lo, hi in seen)  # pytorch-fid's input range: [0, 1]
    tensor = torch.rand(2, 3, 8, 8) * 2 - 1
    assert torch.allclose(f(tensor)[:, :3], ((tensor + 1) / 2).mean((2, 3)), atol=1e-6)
    fd = inception_fid()
    assert isinstance(fd, FrechetDistance) and "pytorch-fid" in fd.extractor_name and "pool3" in fd.extractor_name


# --- bootstrap confidence intervals ----------------------------------------------------------------------------


def test_bootstrap_ci_properties():
    from realign_pipeline.evaluation.score import bootstrap_ci, summarize

    rng = np.random.default_rng(0)
    values = rng.normal(0.5, 0.2, 40).tolist()
    low, high = bootstrap_ci(values, seed=3)
    assert low < float(np.mean(values)) < high
    assert bootstrap_ci(values, seed=3) == (low, high)  # seeded
    assert bootstrap_ci(values, seed=4) != (low, high)
    assert bootstrap_ci([0.7] * 9) == (0.7, 0.7) and bootstrap_ci([]) == (bootstrap_ci([])[0],) * 2
    # more data: a narrower interval (same distribution)
    more = rng.normal(0.5, 0.2, 640).tolist()
    low_m, high_m = bootstrap_ci(more, seed=3)
    assert high_m - low_m < (high - low) / 2
    # 95% of a normal mean: about 2 * 1.96 * sd / sqrt(n)
    assert high_m - low_m == pytest.approx(2 * 1.96 * np.std(more) / np.sqrt(len(more)), rel=0.15)
    # None / NaN (e.g. position of prompts without one) are left out
    assert bootstrap_ci([*values, None, float("nan")], seed=3) == (low, high)
    # seeds of one prompt stay together: three identical copies per prompt give the one-copy interval, while
    # treating them as independent images would (wrongly) narrow it
    groups = [i for i in range(40) for _ in range(3)]
    tripled = [values[i] for i in groups]
    assert bootstrap_ci(tripled, groups, seed=3) == pytest.approx((low, high))
    naive = bootstrap_ci(tripled, seed=3)
    assert naive[1] - naive[0] < 0.75 * (high - low)
    s = summarize([1.0, 0.0, None, 1.0], groups=["a", "a", "b", "c"])
    assert s["n"] == 3 and s["n_prompts"] == 2 and s["mean"] == pytest.approx(2 / 3) and s["confidence"] == 0.95
    with pytest.raises(ValueError, match="group labels"):
        bootstrap_ci([1.0, 2.0], groups=["a"])


def _two_images_per_prompt(folder):
    """Rewrite a make_folder manifest so that images 2k and 2k+1 are two seeds of prompt k."""
    entries = read_results(folder)[1]
    for manifest in folder.glob("manifest*.jsonl"):
        manifest.unlink()
    for e in entries:
        k = e["index"] // 2
        e["record"] = {**e["record"], "id": str(k)}
        e.update(index=k, image=e["index"] % 2, prompt=e["record"]["text"])
    (folder / "manifest.rank0.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))


def test_score_folder_writes_cis_per_image_scores_and_pools_seeds(tmp_path, clip_path):
    from realign_pipeline.evaluation.score import bootstrap_ci, combine_scores

    folders = [make_folder(tmp_path, name=f"seed{s}", n=6, seed=s, shards=1) for s in (0, 1)]
    for folder in folders:
        (folder / "config.json").write_text(json.dumps({"name": "cfg"}))
    _two_images_per_prompt(folders[0])
    result = score_folder(folders[0], ["clip", "timings"], progress=False, clip=clip_path, bootstrap=500, ci_seed=1)
    clip, timings = result["metrics"]["clip"], result["metrics"]["timings"]
    assert list(clip)[:4] == ["mean", "std", "n", "model"]
    assert clip["ci_low"] <= clip["mean"] <= clip["ci_high"] and clip["n_prompts"] == 3
    assert clip["clipscore_100_ci_low"] <= clip["clipscore_100_mean"] <= clip["clipscore_100_ci_high"]
    # timings 1..6, prompts {1,2}, {3,4}, {5,6}: the CI is the prompt-level bootstrap of those numbers
    assert timings["mean"] == pytest.approx(3.5)
    expected = bootstrap_ci([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], [0, 0, 1, 1, 2, 2], n_resamples=500, seed=1)
    assert (timings["ci_low"], timings["ci_high"]) == pytest.approx(expected)
    lines = [json.loads(x) for x in (folders[0] / "per_image.jsonl").read_text().splitlines()]
    assert [x["prompt_key"] for x in lines] == ["coco5k/0", "coco5k/0", "coco5k/1", "coco5k/1", "coco5k/2", "coco5k/2"]
    assert [x["scores"]["timings"] for x in lines] == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    # scoring another metric later keeps the per-image columns scored before
    score_folder(folders[0], ["timings"], progress=False)
    assert "clip" in json.loads((folders[0] / "per_image.jsonl").read_text().splitlines()[0])["scores"]
    assert json.loads((folders[0] / "metrics.json").read_text())["metrics"]["clip"] == clip

    # pooling two seed folders: prompts matched by record id across folders
    with pytest.raises(FileNotFoundError, match="score it first"):
        combine_scores(folders)
    _two_images_per_prompt(folders[1])  # the same three prompts, other seeds
    score_folder(folders[1], ["timings"], progress=False)
    with pytest.raises(ValueError, match="'clip' is not scored"):
        combine_scores(folders, metrics=["clip"])
    pooled = combine_scores(folders, out=tmp_path / "pooled", bootstrap=500, ci_seed=1)
    t = pooled["metrics"]["timings"]
    assert pooled["config"] == "cfg" and pooled["num_images"] == 12 and list(pooled["metrics"]) == ["timings"]
    assert t["n"] == 12 and t["n_prompts"] == 3 and t["mean"] == pytest.approx(3.5)
    # each prompt's four images (two per folder) are resampled together
    values = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0] * 2
    expected = bootstrap_ci(values, [0, 0, 1, 1, 2, 2] * 2, n_resamples=500, seed=1)
    assert (t["ci_low"], t["ci_high"]) == pytest.approx(expected) and t["ci_low"] < 3.5 < t["ci_high"]
    assert json.loads((tmp_path / "pooled" / "metrics.json").read_text())["metrics"]["timings"] == t
