import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
from hypothesis import given, settings
from hypothesis import strategies as st

from realign_pipeline.attention import (
    RealignAttentionState,
    RealignAttnProcessor,
    attention_grid_sizes,
    cross_attention_modulation_weights,
    modulate_scores,
    realign_attention_processors,
    reweighted_attention_scores,
    self_attention_modulation_weights,
    timestep_strength,
)
from realign_pipeline.layout import Layout, Region, resolve_layout
from realign_pipeline.testing import clip_tokenizer, tiny_components


def inside_share(probs: torch.Tensor, mask: torch.Tensor, tokens: list[int]) -> torch.Tensor:
    """Share of the phrase's attention mass (summed over its tokens and over queries) inside the mask."""
    phrase_mass = probs[..., tokens].sum(-1)  # (..., Q)
    return (phrase_mass * mask).sum(-1) / phrase_mass.sum(-1)


# ---------------------------------------------------------------- the pure function
@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    heads=st.integers(1, 4),
    queries=st.integers(4, 40),
    keys=st.integers(3, 12),
    score=st.floats(0.05, 2.0),
    strength=st.floats(0.05, 2.0),
    l_t=st.floats(0.01, 1.0),
    size_weight=st.floats(0.0, 0.9),
)
def test_share_of_phrase_attention_inside_its_mask_strictly_rises(
    seed, heads, queries, keys, score, strength, l_t, size_weight
):
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randn(2, heads, queries, keys, generator=generator, dtype=torch.float64) * 3
    mask = (torch.rand(queries, generator=generator) < 0.4).double()
    mask[0], mask[1] = 1.0, 0.0  # neither empty nor full
    n_tokens = int(torch.randint(1, keys, (1,), generator=generator))
    tokens = torch.randperm(keys, generator=generator)[:n_tokens].tolist()
    token_map = torch.zeros(1, keys, dtype=torch.float64)
    token_map[0, tokens] = 1
    area = mask.mean().reshape(1)

    modulated = reweighted_attention_scores(
        scores, token_map, mask[None], torch.tensor([score], dtype=torch.float64), area, strength, l_t, size_weight
    )
    before = inside_share(scores.softmax(-1), mask, tokens)
    after = inside_share(modulated.softmax(-1), mask, tokens)
    # Eq. 8 moves a phrase score toward the row max inside the mask and toward the row min outside it, so the
    # share cannot fall; it stays put only where every phrase score already sits at that bound
    phrase = scores[..., tokens]
    inside, outside = mask.bool(), ~mask.bool()
    can_move = (phrase[..., inside, :] < scores[..., inside, :].amax(-1, keepdim=True)).flatten(-2).any(-1) | (
        phrase[..., outside, :] > scores[..., outside, :].amin(-1, keepdim=True)
    ).flatten(-2).any(-1)
    assert (after[can_move] > before[can_move]).all()
    assert (after[~can_move] >= before[~can_move] - 1e-12).all()


@pytest.mark.parametrize("zero", ["score", "strength", "l_t"])
def test_zero_score_strength_or_time_gives_exactly_the_unmodulated_scores(zero):
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(2, 3, 16, 7, generator=generator)
    mask = (torch.rand(2, 16, generator=generator) > 0.5).float()
    token_map = torch.zeros(2, 7)
    token_map[0, 1:3] = 1
    token_map[1, 4] = 1
    region_scores = torch.tensor([2.0, 0.5])
    kwargs = {"strength": 1.0, "l_t": 0.8}
    if zero == "score":
        region_scores = torch.zeros(2)
    else:
        kwargs[zero] = 0.0
    out = reweighted_attention_scores(scores, token_map, mask, region_scores, mask.mean(1), **kwargs)
    assert torch.equal(out, scores)


def test_a_region_with_score_zero_does_not_modulate_and_unclaimed_tokens_are_untouched():
    generator = torch.Generator().manual_seed(1)
    scores = torch.randn(1, 2, 16, 6, generator=generator)
    masks = torch.zeros(2, 16)
    masks[0, :8] = 1
    masks[1, 8:] = 1
    token_map = torch.zeros(2, 6)
    token_map[0, 1] = 1
    token_map[1, 3] = 1
    both = reweighted_attention_scores(scores, token_map, masks, torch.tensor([2.0, 0.0]), masks.mean(1))
    only_first = reweighted_attention_scores(scores, token_map[:1], masks[:1], torch.tensor([2.0]), masks[:1].mean(1))
    assert torch.equal(both, only_first)
    untouched = [0, 2, 3, 4, 5]
    assert torch.equal(both[..., untouched], scores[..., untouched])
    assert not torch.equal(both[..., 1], scores[..., 1])


def test_weights_match_a_direct_reading_of_eq8():
    generator = torch.Generator().manual_seed(2)
    masks = torch.rand(3, 10, generator=generator)
    token_map = (torch.rand(3, 5, generator=generator) > 0.6).float()
    s = torch.tensor([2.0, 0.5, 1.0])
    areas = torch.tensor([0.1, 0.5, 0.9])
    w = 0.7
    pos, neg = cross_attention_modulation_weights(token_map, masks, s, areas, w)
    self_pos, self_neg = self_attention_modulation_weights(masks, s, areas, w)
    for q in range(10):
        for k in range(5):
            expect_pos = sum(s[r] * (1 - w * areas[r]) * masks[r, q] * token_map[r, k] for r in range(3))
            expect_neg = sum(s[r] * (1 - w * areas[r]) * (1 - masks[r, q]) * token_map[r, k] for r in range(3))
            assert pos[q, k] == pytest.approx(float(expect_pos), abs=1e-6)
            assert neg[q, k] == pytest.approx(float(expect_neg), abs=1e-6)
        for k in range(10):
            expect = sum(s[r] * (1 - w * areas[r]) * masks[r, q] * masks[r, k] for r in range(3))
            expect_neg = sum(s[r] * (1 - w * areas[r]) * masks[r, q] * (1 - masks[r, k]) for r in range(3))
            assert self_pos[q, k] == pytest.approx(float(expect), abs=1e-5)
            assert self_neg[q, k] == pytest.approx(float(expect_neg), abs=1e-5)


def test_suppressing_unclaimed_tokens_pushes_them_down_inside_regions_only():
    generator = torch.Generator().manual_seed(3)
    masks = torch.rand(2, 6, generator=generator)
    masks[:, 0] = 0.0  # a background query
    token_map = torch.zeros(2, 7)
    token_map[0, 2] = token_map[1, 4] = 1.0
    s, areas, w = torch.tensor([2.0, 0.5]), torch.tensor([0.2, 0.4]), 1.0
    pos, neg = cross_attention_modulation_weights(token_map, masks, s, areas, w)
    pos_u, neg_u = cross_attention_modulation_weights(token_map, masks, s, areas, w, suppress_unclaimed_tokens=True)
    assert torch.equal(pos_u, pos)
    claimed, unclaimed = [2, 4], [0, 1, 3, 5, 6]
    assert torch.equal(neg_u[:, claimed], neg[:, claimed])
    assert neg[:, unclaimed].abs().max() == 0
    for q in range(6):
        expect = sum(float(s[r] * (1 - w * areas[r]) * masks[r, q]) for r in range(2))
        assert neg_u[q, unclaimed].tolist() == pytest.approx([expect] * len(unclaimed), abs=1e-6)
    assert neg_u[0, unclaimed].abs().max() == 0  # no region at the background query: nothing more pushed
    zero_pos, zero_neg = cross_attention_modulation_weights(
        token_map, masks, torch.zeros(2), areas, w, suppress_unclaimed_tokens=True
    )
    assert zero_pos.abs().max() == 0 and zero_neg.abs().max() == 0


def test_modulation_moves_toward_row_max_and_min_per_head():
    scores = torch.tensor([[[[0.0, 1.0, 4.0]], [[2.0, -2.0, 0.0]]]])  # (1, 2 heads, 1 query, 3 keys)
    positive = torch.tensor([[1.0, 0.0, 0.0]])
    negative = torch.tensor([[0.0, 1.0, 0.0]])
    out = modulate_scores(scores, positive, negative, gain=0.5)
    # head 0: key 0 moves half-way to the max 4, key 1 half-way to the min 0
    assert out[0, 0, 0].tolist() == pytest.approx([2.0, 0.5, 4.0])
    # head 1: max 2, min -2, taken in that head only
    assert out[0, 1, 0].tolist() == pytest.approx([2.0, -2.0, 0.0])


def test_timestep_strength():
    assert timestep_strength(1000) == 1.0
    assert timestep_strength(500) == pytest.approx(0.5**5)
    assert timestep_strength(0) == 0.0
    assert timestep_strength(250, num_train_timesteps=500, power=2) == pytest.approx(0.25)


def test_grid_sizes_follow_stride_two_downsampling():
    assert attention_grid_sizes(12, 8) == {96: (12, 8), 24: (6, 4), 6: (3, 2), 2: (2, 1), 1: (1, 1)}


# ---------------------------------------------------------------- the processor on real diffusers Attention layers
ATTENTION_CONFIGS = {
    "cross": {"query_dim": 32, "cross_attention_dim": 16, "heads": 4, "dim_head": 8},
    "cross_upcast_norm": {
        "query_dim": 32, "cross_attention_dim": 16, "heads": 4, "dim_head": 8,
        "upcast_attention": True, "cross_attention_norm": "layer_norm",
    },
    "self_groupnorm_residual": {
        "query_dim": 32, "heads": 2, "dim_head": 16, "norm_num_groups": 8,
        "residual_connection": True, "rescale_output_factor": 2.0,
    },
}


def _attention_inputs(name: str, generator: torch.Generator):
    config = ATTENTION_CONFIGS[name]
    torch.manual_seed(0)
    attn = Attention(**config).eval()
    if config.get("norm_num_groups"):
        hidden = torch.randn(2, 32, 4, 6, generator=generator)  # (batch, channels, h, w): a 4-D input
        context = None
    else:
        hidden = torch.randn(2, 24, 32, generator=generator)
        context = torch.randn(2, 7, 16, generator=generator)
    return attn, hidden, context


def _state(num_queries_hw=(4, 6), layouts=None, record=False, cfg=True):
    return RealignAttentionState(
        latent_height=num_queries_hw[0],
        latent_width=num_queries_hw[1],
        num_images=1 if cfg else 2,
        do_classifier_free_guidance=cfg,
        sequence_length=7,
        layouts=layouts,
        record_attention_maps=record,
    )


@pytest.mark.parametrize("name", list(ATTENTION_CONFIGS))
@pytest.mark.parametrize("record", [False, True])
@pytest.mark.parametrize("custom_scale", [False, True])
def test_processor_matches_the_reference_processor(name, record, custom_scale):
    attn, hidden, context = _attention_inputs(name, torch.Generator().manual_seed(3))
    if custom_scale:
        attn.scale = 0.05  # stock SDPA processor ignores attn.scale; the classic one honours it
    with torch.no_grad():
        attn.set_processor(AttnProcessor())
        reference = attn(hidden, encoder_hidden_states=context)
        attn.set_processor(RealignAttnProcessor(_state(record=record)))
        ours = attn(hidden, encoder_hidden_states=context)
    torch.testing.assert_close(ours, reference, atol=2e-5, rtol=1e-4)


def test_processor_without_modulation_or_recording_is_bitwise_sdpa():
    attn, hidden, context = _attention_inputs("cross", torch.Generator().manual_seed(4))
    with torch.no_grad():
        attn.set_processor(AttnProcessor2_0())
        reference = attn(hidden, encoder_hidden_states=context)
        attn.set_processor(RealignAttnProcessor(_state()))
        ours = attn(hidden, encoder_hidden_states=context)
    assert torch.equal(ours, reference)


def test_modulated_downsampling_names_the_grids_that_modulate():
    def state(factors):
        return RealignAttentionState(latent_height=12, latent_width=12, num_images=1, do_classifier_free_guidance=True,
                                     sequence_length=7, modulated_downsampling=factors)

    assert [state(None).modulates_grid(q) for q in (144, 36, 9)] == [True, True, True]
    assert [state((1,)).modulates_grid(q) for q in (144, 36, 9)] == [True, False, False]
    assert [state((2, 4)).modulates_grid(q) for q in (144, 36, 9)] == [False, True, True]
    with pytest.raises(RuntimeError, match="matches no UNet level"):
        state((1,)).modulates_grid(50)


def test_a_grid_left_out_of_modulated_downsampling_stays_bitwise_sdpa():
    attn, hidden, context = _attention_inputs("cross", torch.Generator().manual_seed(4))  # a 4x6 grid of queries
    layout = Layout([Region("red", box=[0.0, 0.0, 0.5, 1.0])])
    resolved = resolve_layout(layout, "a red thing", clip_tokenizer())

    def call(processor_state):
        processor_state.set_step(0, 981, num_steps=50)
        attn.set_processor(RealignAttnProcessor(processor_state))
        with torch.no_grad():
            return attn(hidden, encoder_hidden_states=context)

    def state(factors, layouts=(resolved,)):
        return RealignAttentionState(latent_height=8, latent_width=12, num_images=1, do_classifier_free_guidance=True,
                                     sequence_length=7, layouts=list(layouts), modulated_downsampling=factors)

    with torch.no_grad():
        attn.set_processor(AttnProcessor2_0())
        reference = attn(hidden, encoder_hidden_states=context)
    # the 4x6 grid is the 8x12 latents' grid downsampled twice
    assert torch.equal(call(state((1,))), reference)
    assert not torch.allclose(call(state((2,))), reference, atol=1e-4)
    assert torch.equal(call(state((2,))), call(state(None)))


def _first_cross_attention(unet) -> Attention:
    return next(m for n, m in unet.named_modules() if n.endswith("attn2"))


@pytest.mark.parametrize("cfg", [True, False])
def test_first_modulated_call_moves_phrase_attention_into_its_mask(cfg):
    components = tiny_components("sd1", seed=0)
    tokenizer, text_encoder = clip_tokenizer(), components["text_encoder"]
    attn = _first_cross_attention(components["unet"])
    prompt = "a red book and a yellow vase"
    layout = Layout([Region("red book", box=[0.0, 0.0, 0.5, 1.0]), Region("yellow vase", box=[0.5, 0.0, 1.0, 1.0])])
    resolved = resolve_layout(layout, prompt, tokenizer)
    ids = tokenizer([prompt], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        context = text_encoder(ids)[0].repeat(2, 1, 1)
    hidden = torch.randn(2, 16 * 16, attn.to_q.in_features, generator=torch.Generator().manual_seed(5))

    def record(layouts):
        state = RealignAttentionState(
            latent_height=16, latent_width=16, num_images=1 if cfg else 2, do_classifier_free_guidance=cfg,
            sequence_length=77, layouts=layouts, record_attention_maps=True,
        )
        state.set_step(0, 981, num_steps=50)
        attn.set_processor(RealignAttnProcessor(state))
        with torch.no_grad():
            attn(hidden, encoder_hidden_states=context)
        return state.token_attention_maps()  # (images, 77, 16, 16)

    plain = record([None] * (1 if cfg else 2))
    guided = record([resolved] * (1 if cfg else 2))
    for region, tokens in zip(resolved.regions, resolved.token_indices):
        mask = region.mask_at(16, 16).flatten()
        for image in range(plain.shape[0]):
            before = inside_share(plain[image].flatten(1).T, mask, tokens)
            after = inside_share(guided[image].flatten(1).T, mask, tokens)
            assert (after > before).all(), (region.phrase, before, after)


def test_processor_rejects_an_unexpected_batch():
    attn, hidden, context = _attention_inputs("cross", torch.Generator().manual_seed(6))
    attn.set_processor(RealignAttnProcessor(_state(record=True)))
    with pytest.raises(RuntimeError, match="expected a batch of 2"):
        attn(torch.cat([hidden, hidden]), encoder_hidden_states=torch.cat([context, context]))


def test_processors_are_installed_only_on_cross_attention_and_restored_on_error():
    unet = tiny_components("sd1")["unet"]
    original = unet.attn_processors
    state = _state(layouts=None, record=True)
    with pytest.raises(KeyError), realign_attention_processors(unet, state):
        installed = unet.attn_processors
        assert all(isinstance(p, RealignAttnProcessor) == n.endswith("attn2.processor") for n, p in installed.items())
        raise KeyError("boom")
    restored = unet.attn_processors
    assert restored.keys() == original.keys()
    assert all(restored[name] is original[name] for name in original)


def test_explicit_self_attention_path_matches_the_reference_when_weights_are_zero():
    attn, hidden, _ = _attention_inputs("self_groupnorm_residual", torch.Generator().manual_seed(7))
    # a region of score 0 would switch the explicit path off; a size term of 0 (area 0.5, weight 2) zeroes
    # the weights while the region stays active
    resolved = resolve_layout(Layout([Region("cat", box=[0, 0, 0.5, 1], score=1.0)]), "a cat", clip_tokenizer())
    state = _state(layouts=[resolved])
    state.self_attention_strength = 1.0
    state.size_weight = 2.0
    state.set_step(0, 999, num_steps=10)
    calls = []
    original_weights = state.self_weights
    state.self_weights = lambda *a: calls.append(a) or original_weights(*a)
    with torch.no_grad():
        attn.set_processor(AttnProcessor())
        reference = attn(hidden)
        attn.set_processor(RealignAttnProcessor(state))
        ours = attn(hidden)
    assert calls, "the explicit self-attention path must have run"
    torch.testing.assert_close(ours, reference, atol=2e-5, rtol=1e-4)


def test_column_update_equals_the_full_update():
    from realign_pipeline.attention import modulate_columns_

    generator = torch.Generator().manual_seed(8)
    scores = torch.randn(2, 3, 20, 9, generator=generator)
    positive = torch.zeros(2, 1, 20, 9)
    negative = torch.zeros(2, 1, 20, 9)
    columns = torch.tensor([2, 5, 6])
    positive[..., columns] = torch.rand(2, 1, 20, 3, generator=generator)
    negative[..., columns] = torch.rand(2, 1, 20, 3, generator=generator)
    full = modulate_scores(scores, positive, negative, gain=0.7)
    in_place = modulate_columns_(scores.clone(), positive[..., columns], negative[..., columns], 0.7, columns)
    torch.testing.assert_close(in_place, full)
    assert not torch.equal(full, scores)


@pytest.mark.parametrize("cfg", [True, False])
def test_self_attention_modulation_in_query_blocks_equals_the_pure_math(monkeypatch, cfg):
    from realign_pipeline import attention

    # 4 x 6 latents, 2 heads: blocks of 7 queries (7, 7, 7, 3), so no block holds all 24 rows
    images = 1 if cfg else 2
    monkeypatch.setattr(attention, "SELF_ATTENTION_CHUNK_ELEMENTS", images * 2 * 24 * 7)
    torch.manual_seed(0)
    attn = Attention(query_dim=32, heads=2, dim_head=16).eval()
    hidden = torch.randn(2, 24, 32, generator=torch.Generator().manual_seed(9))
    layout = Layout([Region("cat", box=[0, 0, 0.5, 1], score=2.0), Region("dog", box=[0.25, 0.5, 1, 1], score=0.5)])
    resolved = resolve_layout(layout, "a cat and a dog", clip_tokenizer())
    layouts = [resolved] if cfg else [None, resolved]
    state = _state(layouts=layouts, cfg=cfg)
    state.self_attention_strength, state.size_weight = 0.3, 0.7
    state.set_step(0, 981, num_steps=50)
    rows_built = []
    original_weights = state.self_weights
    state.self_weights = lambda q, device, rows=None: rows_built.append(range(q)[rows]) or original_weights(q, device, rows)
    with torch.no_grad():
        attn.set_processor(RealignAttnProcessor(state))
        ours = attn(hidden)

        # the reference: full (Q, Q) maps from the pure functions, Eq. 8 on the conditional images only
        query = attn.to_q(hidden).view(2, 24, 2, 16).transpose(1, 2)
        key = attn.to_k(hidden).view(2, 24, 2, 16).transpose(1, 2)
        value = attn.to_v(hidden).view(2, 24, 2, 16).transpose(1, 2)
        scores = query @ key.transpose(-1, -2) * attn.scale
        gain = 0.3 * state.l_t
        masks = resolved.masks_at(4, 6)
        positive, negative = self_attention_modulation_weights(masks, resolved.scores(), resolved.areas(), 0.7)
        modulated = scores.clone()
        modulated[-1] = modulate_scores(scores[-1], positive, negative, gain)  # the last image has the layout
        expected = (modulated.softmax(-1) @ value).transpose(1, 2).reshape(2, 24, 32)
        expected = attn.to_out[0](expected)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ours, attn.to_out[0]((scores.softmax(-1) @ value).transpose(1, 2).reshape(2, 24, 32)))
    assert [list(r) for r in rows_built] == [list(range(s, min(s + 7, 24))) for s in range(0, 24, 7)]
    # only the (regions, queries) masks are kept between calls, never a (queries, queries) map
    kept = [t for per_image in state._self_cache.values() for factors in per_image if factors for t in factors]
    assert kept and all(t.numel() < 24 * 24 for t in kept)


def test_in_place_row_sum_update_equals_the_full_update():
    from realign_pipeline.attention import modulate_scores_by_rows_, self_attention_modulation_rows

    generator = torch.Generator().manual_seed(10)
    scores = torch.randn(2, 3, 20, 20, generator=generator) * 3
    masks = torch.rand(3, 20, generator=generator)
    region_scores, areas = torch.tensor([2.0, 0.5, 1.0]), torch.tensor([0.1, 0.5, 0.9])
    positive, negative = self_attention_modulation_weights(masks, region_scores, areas, 0.7)
    full = modulate_scores(scores, positive, negative, gain=0.6)
    rows_positive, row_sums = self_attention_modulation_rows(masks, region_scores, areas, 0.7, queries=slice(5, 12))
    torch.testing.assert_close(rows_positive, positive[5:12])
    in_place = modulate_scores_by_rows_(scores[..., 5:12, :].clone(), rows_positive, row_sums[:, None], 0.6)
    torch.testing.assert_close(in_place, full[..., 5:12, :], atol=1e-5, rtol=1e-5)
    assert not torch.equal(full, scores)
