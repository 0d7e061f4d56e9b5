"""Evaluation metrics (issue 5, Metrics): CLIP / NegCLIP score, BLIP-2 ITM + ITC, the caption reward. Tiny
models loaded with from_pretrained from temporary folders; nothing is downloaded."""

from __future__ import annotations

import math

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F

from realign_pipeline._tiny_blip2 import tiny_blip2_captioner, tiny_blip2_itm
from realign_pipeline._tiny_clip import tiny_clip
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
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("metrics")
    return {
        "clip": tiny_clip(root / "clip"),
        "clip2": tiny_clip(root / "clip2", seed=1),
        "itm": tiny_blip2_itm(root / "itm"),
        "cap": tiny_blip2_captioner(root / "cap", words=WORDS),
    }


def _images(n=4, seed=0, size=40):
    rng = np.random.default_rng(seed)
    return [PIL.Image.fromarray(rng.integers(0, 256, (size, size + 8, 3), dtype=np.uint8)) for _ in range(n)]


def _assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], float):
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), k  # float32 batch-size rounding
        else:
            assert a[k] == b[k], k


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
