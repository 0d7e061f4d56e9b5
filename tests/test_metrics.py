"""Evaluation metrics (issue 5, Metrics): CLIP / NegCLIP score, BLIP-2 ITM + ITC, the caption reward. Tiny
models loaded with from_pretrained from temporary folders; nothing is downloaded."""

from __future__ import annotations

import math

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F

from realign_pipeline.evaluation.fid import FrechetDistance, feature_statistics, frechet_distance, image_files
from realign_pipeline.evaluation.metrics import (
    CLIP_VIT_B_32,
    METRICS,
    BlipItmScore,
    CaptionRewardScore,
    ClipScore,
    NegClipScore,
)
from realign_pipeline.rewards import CaptionReward

WORDS = ["a", "an", "the", "red", "green", "blue", "yellow", "circle", "square", "triangle", "star", "of", "and", "on"]
PROMPTS = ["a red circle", "a blue square", "a green star", "the yellow triangle"]


@pytest.fixture(scope="module")
def paths(tiny_folders, tiny_clip_dir, tiny_blip2_itm_dir):
    return {
        "clip": tiny_clip_dir,
        "clip2": tiny_folders.clip(seed=1),
        "itm": tiny_blip2_itm_dir,
        "cap": tiny_folders.blip2_captioner(words=WORDS),
    }


def _images(n=4, seed=0, size=40):
    rng = np.random.default_rng(seed)
    return [PIL.Image.fromarray(rng.integers(0, 256, (size, size + 8, 3), dtype=np.uint8)) for _ in range(n)]


def _assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k, v in a.items():
        if isinstance(v, float):
            assert v == pytest.approx(b[k], rel=1e-5, abs=1e-6), k  # float32 batch-size rounding
        else:
            assert v == b[k], k


def test_clip_score_fields_ranges_and_model(paths):
    m = ClipScore.from_pretrained(str(paths["clip"]))
    m.update(_images(), PROMPTS)
    r = m.compute()
    assert r["metric"] == "clip_score" and r["model"] == str(paths["clip"]) and r["count"] == 4
    assert set(r) == {"metric", "model", "count", "mean", "std", "clipscore_100_mean", "clipscore_100_std"}
    cos = torch.tensor(m.scores["cosine"])
    assert cos.shape == (4,) and bool((cos.abs() <= 1 + 1e-6).all())
    assert r["mean"] == pytest.approx(cos.double().mean().item())
    assert r["std"] == pytest.approx(cos.double().std(unbiased=False).item())
    assert r["clipscore_100_mean"] == pytest.approx((100 * cos.clamp(min=0)).double().mean().item(), abs=1e-5)
    assert 0 <= r["clipscore_100_mean"] <= 100
    # a (B, C, H, W) tensor in [-1, 1] works too
    m.reset()
    m.update(torch.rand(2, 3, 32, 32) * 2 - 1, PROMPTS[:2])
    assert m.compute()["count"] == 2


def test_clip_score_matches_hand_computation(paths):
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(paths["clip"]).eval()
    proc = CLIPProcessor.from_pretrained(paths["clip"])
    image, prompt = _images(1, seed=3)[0], "a red circle"
    with torch.no_grad():
        inputs = proc(text=[prompt], images=[image], return_tensors="pt", padding=True)
        out = model(**inputs)
    img, txt = out.image_embeds[0], out.text_embeds[0]  # projected embeddings
    expected = float(img @ txt / (img.norm() * txt.norm()))
    m = ClipScore.from_pretrained(paths["clip"])
    m.update(image, prompt)
    r = m.compute()
    assert r["count"] == 1 and r["std"] == 0.0
    assert r["mean"] == pytest.approx(expected, abs=1e-5)
    assert r["clipscore_100_mean"] == pytest.approx(100 * max(expected, 0.0), abs=1e-3)


def test_clip_score_batching_invariance_and_reset(paths):
    images = _images(4, seed=1)
    one = ClipScore.from_pretrained(paths["clip"])
    one.update(images, PROMPTS)
    two = ClipScore.from_pretrained(paths["clip"])
    two.update(images[:1], PROMPTS[:1])
    two.update(images[1:], PROMPTS[1:])
    _assert_same(one.compute(), two.compute())
    np.testing.assert_allclose(one.scores["cosine"], two.scores["cosine"], atol=1e-6)
    two.reset()
    empty = two.compute()
    assert empty["count"] == 0 and math.isnan(empty["mean"]) and math.isnan(empty["std"])
    two.update(images, PROMPTS)  # reset keeps the model; a fresh accumulation gives the same result
    _assert_same(one.compute(), two.compute())


def test_mismatched_counts_are_errors(paths):
    m = ClipScore.from_pretrained(paths["clip"])
    with pytest.raises(ValueError, match="3 images but 2 prompts"):
        m.update(_images(3), PROMPTS[:2])
    with pytest.raises(ValueError, match="2 images but 1 prompts"):  # no broadcasting of one prompt
        m.update(_images(2), "a red circle")
    with pytest.raises(ValueError, match="2 images but 3 prompts"):
        m.update(torch.zeros(2, 3, 32, 32), PROMPTS[:3])
    assert m.count == 0  # nothing was half-recorded


def test_negclip_needs_a_checkpoint_and_uses_it(paths):
    with pytest.raises(ValueError, match="no default"):
        NegClipScore.from_pretrained()
    images = _images(2, seed=2)
    neg = NegClipScore.from_pretrained(paths["clip2"])
    neg.update(images, PROMPTS[:2])
    clip = ClipScore.from_pretrained(paths["clip"])
    clip.update(images, PROMPTS[:2])
    r = neg.compute()
    assert r["metric"] == "negclip_score" and r["model"] == str(paths["clip2"])
    assert r["mean"] != pytest.approx(clip.compute()["mean"])  # other weights, other numbers
    assert CLIP_VIT_B_32 == "openai/clip-vit-base-patch32"
    assert ClipScore.from_pretrained(CLIP_VIT_B_32).scorer.model_id_or_path == CLIP_VIT_B_32  # lazy: no download
    assert set(METRICS) == {"clip", "negclip", "blip_itm", "caption_reward"}


def test_blip_itm_matches_hand_computation_and_batches(paths):
    from transformers import Blip2ForImageTextRetrieval, Blip2Processor

    images = _images(3, seed=4)
    prompts = PROMPTS[:3]
    m = BlipItmScore.from_pretrained(paths["itm"])
    m.update(images, prompts)
    r = m.compute()
    assert r["metric"] == "blip_itm" and r["model"] == str(paths["itm"]) and r["count"] == 3
    itm, itc = np.array(m.scores["itm"]), np.array(m.scores["itc"])
    assert ((itm >= 0) & (itm <= 1)).all() and (np.abs(itc) <= 1 + 1e-6).all()
    assert r["itc_mean"] == pytest.approx(itc.mean()) and r["itc_std"] == pytest.approx(itc.std())

    model = Blip2ForImageTextRetrieval.from_pretrained(paths["itm"]).eval()
    proc = Blip2Processor.from_pretrained(paths["itm"])
    pv = proc.image_processor(images, return_tensors="pt")["pixel_values"]
    hand_itm, hand_itc = [], []
    with torch.no_grad():
        for i, p in enumerate(prompts):  # one pair at a time, straight through the model
            enc = proc.tokenizer([p], return_tensors="pt")
            kw = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
            out = model(pixel_values=pv[i : i + 1], use_image_text_matching_head=True, **kw)
            hand_itm.append(out.logits_per_image.softmax(-1)[0, 1].item())
            # ITC: the model's contrastive output (max over queries of the query/text [CLS] cosine)
            out = model(pixel_values=pv[i : i + 1], use_image_text_matching_head=False, **kw)
            hand_itc.append(out.logits_per_image[0, 0].item())
    np.testing.assert_allclose(itm, hand_itm, atol=1e-5)
    np.testing.assert_allclose(itc, hand_itc, atol=1e-5)

    two = BlipItmScore.from_pretrained(paths["itm"])
    two.update(images[:2], prompts[:2])
    two.update(images[2:], prompts[2:])
    _assert_same(r, two.compute())
    two.reset()
    assert two.compute()["count"] == 0


def test_caption_reward_score_is_eq4(paths):
    images = _images(2, seed=5)
    prompts = PROMPTS[:2]
    m = CaptionRewardScore.from_pretrained(paths["cap"], text_encoder=paths["itm"], max_new_tokens=8)
    m.update(images[:1], prompts[:1])
    m.update(images[1:], prompts[1:])
    r = m.compute()
    assert r["metric"] == "caption_reward" and r["model"] == str(paths["cap"]) and r["text_encoder"] == str(paths["itm"])
    ref = CaptionReward(str(paths["cap"]), str(paths["itm"]), max_new_tokens=8)
    expected, captions = ref.score_with_captions(images, prompts)
    np.testing.assert_allclose(m.scores["caption_reward"], expected.numpy(), atol=1e-5)
    assert m.captions == captions
    # Eq. 4 by hand from the captions: cosine of the Q-Former text embeddings
    emb = ref.text_embeds(captions + prompts)
    hand = F.cosine_similarity(emb[:2], emb[2:], dim=-1)
    assert r["mean"] == pytest.approx(hand.double().mean().item(), abs=1e-5)
    assert all(-1 - 1e-6 <= s <= 1 + 1e-6 for s in m.scores["caption_reward"])
    m.reset()
    assert m.captions == [] and m.compute()["count"] == 0


# --- Fréchet distance --------------------------------------------------------------------------------------


def _independent_fd(x: np.ndarray, y: np.ndarray) -> float:
    """Another route: np.cov, and tr((S1 S2)^1/2) from the (real, >= 0) eigenvalues of the non-symmetric S1 S2."""
    m1, m2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    ev = np.linalg.eigvals(s1 @ s2)
    tr = np.sqrt(np.clip(ev.real, 0, None)).sum()
    return float(((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr)


def test_frechet_distance_matches_independent_computation():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 6)) @ rng.normal(size=(6, 6))
    b = rng.normal(size=(150, 6)) @ rng.normal(size=(6, 6)) + 0.5
    mu1, s1 = feature_statistics(torch.from_numpy(a))
    mu2, s2 = feature_statistics(torch.from_numpy(b))
    np.testing.assert_allclose(s1.numpy(), np.cov(a, rowvar=False), atol=1e-10)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(_independent_fd(a, b), rel=1e-8)
    # closed form for diagonal covariances: sum (mu1 - mu2)^2 + (sqrt(v1) - sqrt(v2))^2
    v1, v2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    d1, d2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    expected = ((d1 - d2) ** 2).sum() + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum()
    assert frechet_distance(d1, np.diag(v1), d2, np.diag(v2)) == pytest.approx(expected, rel=1e-12)


def test_frechet_distance_self_zero_and_shifted_mean():
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.normal(size=(64, 8)))
    fd = FrechetDistance()
    fd.update_real(x)
    fd.update(x[:20])  # batching: two updates = one
    fd.update(x[20:])
    r = fd.compute()
    assert r["count"] == r["count_real"] == 64 and abs(r["value"]) < 1e-8
    shift = torch.tensor([1.0, -2.0, 0.0, 0.5, 0.0, 0.0, 3.0, 0.0], dtype=torch.float64)
    fd.reset()  # keeps the real features
    fd.update(x + shift)  # equal covariances: the distance is ||mu1 - mu2||^2
    assert fd.compute()["value"] == pytest.approx(float(shift @ shift), rel=1e-8)
    fd.reset(real=True)
    assert fd.count_real == 0 and math.isnan(fd.compute()["value"])
    with pytest.raises(ValueError, match="no feature_extractor"):
        fd.update(_images(2))
    # singular covariances (fewer rows than dimensions) stay finite and non-negative
    y = torch.from_numpy(rng.normal(size=(5, 16)))
    m, s = feature_statistics(y)
    assert frechet_distance(m, s, m, s) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_with_clip_extractor_and_folder(paths, tmp_path):
    images = _images(6, seed=7)
    for i, im in enumerate(images):
        im.save(tmp_path / f"{i:012d}.png")
    fd = FrechetDistance.from_pretrained(paths["clip"])
    assert fd.update_real_folder(tmp_path, batch_size=4) == 6
    fd.update(images[:3], PROMPTS[:3])
    fd.update(images[3:])
    r = fd.compute()
    assert r["model"] == f"clip:{paths['clip']}" and abs(r["value"]) < 1e-6  # identical sets: ~0
    fd.reset()
    fd.update(_images(6, seed=8))
    assert fd.compute()["value"] > 1e-4
    assert [p.name for p in image_files(tmp_path, ["000000000002", "000000000000.png"])] == [
        "000000000002.png", "000000000000.png",
    ]
    with pytest.raises(FileNotFoundError, match="1 images not found"):
        image_files(tmp_path, ["000000000099"])


def test_tiny_itm_tokenizer_is_the_real_bert_vocabulary(paths):
    # A tokenizer that maps every word to [UNK] would make every ITM/ITC text identical.
    from transformers import Blip2Processor

    tokenizer = Blip2Processor.from_pretrained(paths["itm"]).tokenizer
    ids = tokenizer("a red circle and a blue square").input_ids
    assert tokenizer.vocab_size == 30522
    assert tokenizer.unk_token_id not in ids
    assert len(set(ids)) == len(ids) - 1  # only "a" repeats
