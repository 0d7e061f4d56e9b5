"""Rewards (issue 4, Rewards part): Eq. 4, its differentiable objectives, the ablation rewards. Tiny models."""

from __future__ import annotations

import sys

import numpy as np
import PIL.Image
import pytest
import torch

from realign_pipeline.rewards import (
    IMAGEREWARD_MISSING,
    BlipItmReward,
    CaptionReward,
    ClipReward,
    Reward,
    blip2_preprocess_tensor,
    load_reward,
)

WORDS = ["a", "an", "the", "red", "green", "blue", "yellow", "circle", "square", "triangle", "star", "left", "right", "above", "below", "of", "and", "on"]
PROMPTS = ["a red circle", "a blue square"]


@pytest.fixture(scope="module")
def paths(tiny_folders, tiny_blip2_itm_dir, tiny_clip_dir):
    return {"cap": tiny_folders.blip2_captioner(words=WORDS), "itm": tiny_blip2_itm_dir, "clip": tiny_clip_dir}


def _pixels(seed=0, n=2, size=40):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


@pytest.mark.parametrize("stretch", [1.0, 1.5], ids=["in_range", "overshoot"])
def test_blip2_preprocess_matches_processor_and_passes_gradients(paths, stretch):
    """Against ``Blip2Processor``; with ``stretch`` 1.5 the pixels span [-1.5, 1.5] (a VAE's overshoot) and
    the processor is handed them as the clipped 8-bit image, which is what it sees in practice."""
    from transformers import Blip2Processor

    proc = Blip2Processor.from_pretrained(paths["cap"]).image_processor
    rng = np.random.default_rng(0)
    arr = (rng.random((48, 40, 3)) * 255).astype("uint8")
    x = (torch.from_numpy(arr).permute(2, 0, 1)[None].float() / 255 * 2 - 1) * stretch
    clipped = ((x.clamp(-1, 1) + 1) * 127.5).round().byte()[0].permute(1, 2, 0).numpy()
    ref = torch.as_tensor(proc([PIL.Image.fromarray(clipped)], return_tensors="pt")["pixel_values"])
    x.requires_grad_(True)
    out = blip2_preprocess_tensor(x, proc)
    assert out.shape == ref.shape == (1, 3, 32, 32)
    diff = (out - ref).abs()
    # normalised units (one 8-bit level ~ 0.015): the processor rounds to uint8 after each resize pass, torch
    # does not. Random noise is the worst case for the bicubic overshoot that PIL clips between its two passes.
    assert diff.mean() < 0.006 and diff.max() < 0.03, (diff.mean(), diff.max())
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_tiny_checkpoints_load_with_from_pretrained(paths):
    from transformers import Blip2ForConditionalGeneration, Blip2Processor, Blip2TextModelWithProjection

    model = Blip2ForConditionalGeneration.from_pretrained(paths["cap"])
    proc = Blip2Processor.from_pretrained(paths["cap"])
    assert proc.num_query_tokens == model.config.num_query_tokens
    assert proc.tokenizer.convert_tokens_to_ids("<image>") == model.config.image_token_index
    Blip2TextModelWithProjection.from_pretrained(paths["itm"])


def test_eq4_score_matches_hand_computation(paths):
    from transformers import AutoTokenizer, Blip2Config, Blip2TextModelWithProjection

    reward = CaptionReward(paths["cap"], paths["itm"], max_new_tokens=4)
    x = _pixels()
    scores, captions = reward.score_with_captions(x, PROMPTS)
    assert scores.shape == (2,) and len(captions) == 2
    assert torch.allclose(reward.score(x, PROMPTS), scores)
    # by hand: the captioner's own greedy generate, then the Q-Former text encoder's [:, 0] embeddings
    model, proc = reward.captioner_model, reward.captioner_processor
    pv = torch.as_tensor(blip2_preprocess_tensor(x, proc.image_processor))
    start = torch.tensor([[model.config.image_token_index] * model.config.num_query_tokens + [proc.tokenizer.bos_token_id]] * 2)
    out = model.generate(pixel_values=pv, input_ids=start, attention_mask=torch.ones_like(start), max_new_tokens=4)
    hand_captions = [c.strip() for c in proc.tokenizer.batch_decode(out[:, start.shape[1] :], skip_special_tokens=True)]
    assert hand_captions == captions
    cfg = Blip2Config.from_pretrained(paths["itm"])
    cfg.qformer_config.use_qformer_text_input = True
    text_model = Blip2TextModelWithProjection.from_pretrained(paths["itm"], config=cfg).eval()
    tok = AutoTokenizer.from_pretrained(paths["itm"])
    for cap, prompt, s in zip(captions, PROMPTS, scores):
        with torch.no_grad():
            e = [text_model(**tok([t], return_tensors="pt")).text_embeds[0, 0] for t in (cap, prompt)]
        assert torch.allclose(torch.nn.functional.cosine_similarity(e[0], e[1], dim=0), s, atol=1e-5)
    # PIL images take the processor path and give the same kind of result
    pil = [PIL.Image.fromarray(((x[i].permute(1, 2, 0) + 1) * 127.5).clamp(0, 255).byte().numpy()) for i in range(2)]
    assert reward.score(pil, PROMPTS).shape == (2,)


def _adam(objective, x, steps, lr=0.05):
    x = x.clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=lr)
    for _ in range(steps):
        loss = -objective(x).sum()
        opt.zero_grad()
        loss.backward()
        assert x.grad is not None and x.grad.abs().sum() > 0
        opt.step()
        with torch.no_grad():
            x.clamp_(-1, 1)
    return x.detach()


def test_likelihood_objective_raises_prompt_log_likelihood(paths):
    reward = load_reward("caption", captioner=paths["cap"], text_encoder=paths["itm"], objective="likelihood")
    x0 = _pixels()
    before = reward.prompt_log_likelihood(x0, PROMPTS).detach()
    assert torch.allclose(reward.objective(x0, PROMPTS).detach(), before)
    assert (before <= 0).all()
    x1 = _adam(lambda x: reward.objective(x, PROMPTS), x0, steps=10)
    after = reward.prompt_log_likelihood(x1, PROMPTS).detach()
    assert (after > before + 0.1).all(), (before, after)


def _caption_start(model, tok) -> list[int]:
    return [model.config.image_token_index] * model.config.num_query_tokens + [tok.bos_token_id]


def test_likelihood_scores_the_normalised_prompt_as_a_whole_caption(paths):
    """The prompt is teacher-forced as the captioner writes captions -- lower case, no final period, single
    spaces -- and followed by EOS, so the objective is exactly the captioner's own training loss on it."""
    reward = CaptionReward(paths["cap"], paths["itm"])
    model, tok = reward.captioner_model, reward.captioner_processor.tokenizer
    eos = model.config.text_config.eos_token_id
    assert reward.eos_token_id == eos == tok.eos_token_id and reward.caption_end_ids == [eos]
    ids, mask = reward.caption_tokens(["A Red Circle.", "  a   red\tcircle ", "a red circle and a blue square"])
    want = tok("a red circle", add_special_tokens=False).input_ids + [eos]
    assert ids[0, : len(want)].tolist() == ids[1, : len(want)].tolist() == want
    assert mask.sum(1).tolist() == [4, 4, 8] and ids[2, 7] == eos
    with pytest.raises(ValueError, match="empty prompt"):
        reward.caption_tokens([" . "])
    # the same number from the model's own loss (labels: the caption and its EOS, as the captioner was trained)
    x = _pixels(n=1)
    row = _caption_start(model, tok) + want
    input_ids = torch.tensor([row])
    labels = input_ids.clone()
    labels[:, : len(row) - len(want)] = -100
    with torch.no_grad():
        loss = model(pixel_values=reward.pixel_values(x), input_ids=input_ids, attention_mask=torch.ones_like(input_ids), labels=labels).loss
        ll = reward.prompt_log_likelihood(x, ["A Red Circle."])
    torch.testing.assert_close(ll, -loss.view(1), atol=1e-5, rtol=1e-5)


def test_likelihood_no_longer_rewards_a_caption_prefix(paths):
    """A captioner trained to caption an image Y ("a red circle and a blue square") gives Y a higher likelihood
    than its prefix "a red circle" and than Y + more words. (Scored without EOS, the prefix won: -0.010 against
    -0.016 nats/token for Y.)"""
    from transformers import Blip2ForConditionalGeneration

    reward = CaptionReward(paths["cap"], paths["itm"])
    tok = reward.captioner_processor.tokenizer
    caption = "a red circle and a blue square"
    x = _pixels(n=1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Blip2ForConditionalGeneration.from_pretrained(paths["cap"]).train()
        row = _caption_start(model, tok) + tok(caption, add_special_tokens=False).input_ids + [tok.eos_token_id]
        input_ids = torch.tensor([row])
        labels = input_ids.clone()
        labels[:, : model.config.num_query_tokens + 1] = -100
        pv = reward.pixel_values(x)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(20):
            loss = model(pixel_values=pv, input_ids=input_ids, attention_mask=torch.ones_like(input_ids), labels=labels).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    trained = CaptionReward(paths["cap"], paths["itm"], captioner_model=model, captioner_processor=reward.captioner_processor)
    assert trained.captions(x) == [caption]
    with torch.no_grad():
        whole, prefix, longer = trained.prompt_log_likelihood(x.repeat(3, 1, 1, 1), [caption, "a red circle", caption + " and a star"])
    assert whole > -0.2, whole
    assert whole > prefix + 0.5 and whole > longer + 0.5, (whole, prefix, longer)


def test_end_of_caption_is_the_language_models_eos_not_the_tokenizers(paths):
    """blip2-opt-2.7b ends captions with "\\n" (``text_config.eos_token_id`` 50118), its tokenizer's EOS is </s>:
    the end appended to a scored prompt (and where sampled captions are cut) is the token ``generate`` stops at,
    the language model's."""
    from transformers import Blip2ForConditionalGeneration

    reward = CaptionReward(paths["cap"], paths["itm"])
    tok = reward.captioner_processor.tokenizer
    model = Blip2ForConditionalGeneration.from_pretrained(paths["cap"])
    end = tok.convert_tokens_to_ids("on")  # stands in for "\\n"
    model.config.text_config.eos_token_id = end
    model.language_model.generation_config.eos_token_id = end
    r = CaptionReward(paths["cap"], paths["itm"], captioner_model=model, captioner_processor=reward.captioner_processor)
    assert r.caption_end_ids == [end] and r.eos_token_id == end != tok.eos_token_id
    ids, _ = r.caption_tokens(["A red circle."])
    assert ids[0].tolist() == tok("a red circle", add_special_tokens=False).input_ids + [end]


def test_score_function_objective_raises_exact_expected_eq4_reward(paths):
    """With one-token captions the expectation of Eq. 4 over the caption distribution is computable exactly
    (a sum over the vocabulary), so the test measures the true expected reward, not a noisy estimate."""
    reward = CaptionReward(
        paths["cap"], paths["itm"], objective="score_function", num_samples=16, seed=0, max_new_tokens=1
    )
    tok = reward.captioner_processor.tokenizer
    vocab = torch.arange(len(tok)).view(-1, 1)
    captions = reward.decode(vocab)
    table = torch.stack([reward.caption_similarity(captions, [p] * len(captions)) for p in PROMPTS])

    def expected_reward(x):
        with torch.no_grad():
            pv = reward.pixel_values(x)
            lp = reward.sequence_log_likelihood(pv, vocab.repeat(2, 1), torch.ones(2 * len(tok), 1, dtype=torch.long))
        return (lp.view(2, -1).exp() * table).sum(1)

    x0 = _pixels()
    value = reward.objective(x0.clone().requires_grad_(True), PROMPTS)
    assert value.shape == (2,) and value.requires_grad and ((value >= -1) & (value <= 1)).all()
    before = expected_reward(x0)
    x1 = _adam(lambda x: reward.objective(x, PROMPTS), x0, steps=20)
    after = expected_reward(x1)
    assert (after > before).all(), (before, after)
    assert (after - before).sum() > 0.01


@pytest.mark.parametrize("head", ["itm", "itc"])
def test_blip_reward_shapes_ranges_gradients(paths, head):
    reward = load_reward("blip", model=paths["itm"], head=head)
    x = _pixels(n=3).requires_grad_(True)
    s = reward.score(x, ["a red circle", "a star", "two squares"])
    assert s.shape == (3,) and not s.requires_grad
    lo = 0.0 if head == "itm" else -1.0
    assert ((s >= lo - 1e-6) & (s <= 1 + 1e-6)).all()
    o = reward.objective(x, ["a red circle", "a star", "two squares"])
    assert torch.allclose(o.detach(), s, atol=1e-5)
    o.sum().backward()
    assert x.grad.abs().sum() > 0


def test_clip_reward_shapes_ranges_gradients(paths):
    reward = load_reward("clip", model=str(paths["clip"]))
    x = _pixels(n=3).requires_grad_(True)
    s = reward.score(x, "a red circle")
    assert s.shape == (3,) and ((s >= -1) & (s <= 1)).all()
    o = reward.objective(x, ["a red circle"] * 3)
    assert torch.allclose(o.detach(), s, atol=1e-5)
    o.sum().backward()
    assert x.grad.abs().sum() > 0


@pytest.mark.parametrize("objective", ["likelihood", "score_function"])
def test_caption_objectives_reach_pixels(paths, objective):
    reward = CaptionReward(paths["cap"], paths["itm"], objective=objective, num_samples=2, seed=1, max_new_tokens=3)
    x = _pixels().requires_grad_(True)
    reward.objective(x, PROMPTS).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_load_reward_names_and_errors(paths):
    assert isinstance(load_reward("caption", captioner=paths["cap"], text_encoder=paths["itm"]), CaptionReward)
    assert isinstance(load_reward("clip", model=str(paths["clip"])), ClipReward)
    assert isinstance(load_reward("BLIP"), BlipItmReward)  # lazy: nothing loads until used
    for r in (load_reward("caption"), load_reward("blip"), load_reward("clip", model=str(paths["clip"]))):
        assert isinstance(r, Reward) and r.to("cpu") is r
    with pytest.raises(ValueError, match="unknown reward 'pickscore'.*caption"):
        load_reward("pickscore")
    with pytest.raises(ValueError, match="unknown caption objective"):
        load_reward("caption", objective="ppo")
    with pytest.raises(ValueError, match="one prompt per image"):
        load_reward("clip", model=str(paths["clip"])).score(_pixels(n=3), ["a", "b"])


def test_imagereward_missing_package_message(monkeypatch):
    # the message must be tested whether or not the package happens to be installed: hide it
    monkeypatch.setitem(sys.modules, "ImageReward", None)
    with pytest.raises(ImportError) as info:
        load_reward("imagereward")
    msg = str(info.value)
    assert "pip install image-reward" in msg and "torchvision" in msg
    assert msg == IMAGEREWARD_MISSING
