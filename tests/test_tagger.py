"""ClipTagger / RamTagger on a tiny random CLIP loaded through from_pretrained from a temp folder (offline)."""

from __future__ import annotations

import json
import sys

import numpy as np
import PIL.Image
import pytest
import torch

from realign_pipeline.captioner.base import Tagger
from realign_pipeline.captioner.tagger import (
    ClipTagger,
    MissingDependencyError,
    RamTagger,
    load_ram_tag_list,
    load_ram_thresholds,
    merge_tags,
)
from realign_pipeline.scoring import ClipScorer

SMALL_TAGS = ["cat", "dog", "red cube", "tree", "car", "banana", "sky", "person"]


def words_in_prompt(prompt: str) -> list[str]:
    """A module-level prompt_objects callable (so a config can name it)."""
    return [w for w in prompt.replace(",", " ").split() if w in {"cat", "dog", "zebra", "kite"}]


@pytest.fixture(scope="module")
def scorer(tiny_clip_dir):
    return ClipScorer.from_pretrained(tiny_clip_dir)


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [PIL.Image.fromarray(rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)) for _ in range(2)]


def test_shipped_ram_vocabulary():
    tags, thr = load_ram_tag_list(), load_ram_thresholds()
    assert len(tags) == len(thr) == 4585
    assert len(set(tags)) == 4585
    assert tags[:3] == ["3D CG rendering", "3D glasses", "abacus"]
    assert all(0 < t <= 1 for t in thr)


def test_is_a_tagger_and_returns_vocabulary_tags(scorer, images):
    t = ClipTagger(scorer, tag_list=SMALL_TAGS, thresholds=0.0, top_k=3)
    assert isinstance(t, Tagger)
    out = t.tag(images, ["a photo", "a photo"])
    assert len(out) == 2
    assert all(len(row) == 3 and set(row) <= set(SMALL_TAGS) for row in out)
    # best first: the scores come back in descending order
    for row in t.tag_with_scores(images, ["", ""]):
        scores = [s for _, s in row]
        assert scores == sorted(scores, reverse=True)


def test_thresholds(scorer, images):
    prompts = ["a cat and a kite", "a dog"]
    # threshold 0: everything passes, top_k caps
    assert [len(r) for r in ClipTagger(scorer, SMALL_TAGS, thresholds=0.0, top_k=5).tag(images)] == [5, 5]
    assert [len(r) for r in ClipTagger(scorer, SMALL_TAGS, thresholds=0.0).tag(images)] == [8, 8]
    # above 1: nothing from the image (relative scores are <= 1), only the prompt's words
    t = ClipTagger(scorer, SMALL_TAGS, thresholds=1.01, prompt_objects=words_in_prompt)
    assert t.tag(images, prompts) == [["cat", "kite"], ["dog"]]
    # relative mode: the best tag scores exactly 1, so a threshold of 1 keeps exactly one tag per image
    one = ClipTagger(scorer, SMALL_TAGS, thresholds=1.0).tag_with_scores(images)
    assert [len(r) for r in one] == [1, 1] and all(r[0][1] == pytest.approx(1.0) for r in one)
    # per-tag thresholds: a tag with an impossible threshold is never returned
    thr = [0.0] * len(SMALL_TAGS)
    thr[SMALL_TAGS.index("banana")] = 2.0
    assert all("banana" not in r for r in ClipTagger(scorer, SMALL_TAGS, thresholds=thr).tag(images))
    # threshold_scale scales every threshold: 1.5 * 0.9 > 1 -> nothing
    assert ClipTagger(scorer, SMALL_TAGS, thresholds=0.9, threshold_scale=1.5).tag(images) == [[], []]
    # min_score on the raw cosine: above any cosine -> nothing
    assert ClipTagger(scorer, SMALL_TAGS, thresholds=0.0, min_score=1.01).tag(images) == [[], []]


def test_scores_modes_agree_with_hand_computation(scorer, images):
    t = ClipTagger(scorer, SMALL_TAGS, thresholds=0.0)
    cos = t.cosines(images)
    texts = [f"a photo of a {x}." for x in SMALL_TAGS]
    torch.testing.assert_close(cos, scorer.similarity_matrix(images, texts))
    s = scorer.logit_scale
    torch.testing.assert_close(
        t.scores_from_cosines(cos), (s * cos).softmax(-1) / (s * cos).softmax(-1).max(-1, True).values
    )
    t.score_mode = "softmax"
    torch.testing.assert_close(t.scores(images).sum(-1), torch.ones(2))
    t.score_mode = "cosine"
    torch.testing.assert_close(t.scores(images), cos)
    t2 = ClipTagger(scorer, SMALL_TAGS, logit_scale=3.0)
    torch.testing.assert_close(t2.scores_from_cosines(cos), torch.exp(3.0 * (cos - cos.max(-1, True).values)))
    with pytest.raises(ValueError, match="score_mode"):
        ClipTagger(scorer, SMALL_TAGS, score_mode="bogus")
    with pytest.raises(ValueError, match="thresholds for"):
        ClipTagger(scorer, SMALL_TAGS, thresholds=[0.5, 0.5])


def test_prompt_words_added_without_duplicates(scorer, images):
    t = ClipTagger(scorer, SMALL_TAGS, thresholds=0.0, top_k=8, prompt_objects=words_in_prompt)
    rows = t.tag(images, ["a zebra near a cat", "a kite"])
    assert rows[0][-1] == "zebra" and rows[0].count("cat") == 1 and len(rows[0]) == 9
    assert rows[1][-1] == "kite"
    ws = t.tag_with_scores(images[:1], ["a zebra"])[0]
    assert ws[-1] == ("zebra", None)
    assert merge_tags(["Cat", "dog"], ["cat", " red  cube", "red cube"]) == ["Cat", "dog", "red  cube"]
    # one prompt for several images is broadcast; a count mismatch is an error
    assert len(t.tag(images, ["a kite"])) == 2
    with pytest.raises(ValueError, match="2 images but 3 prompts"):
        t.tag(images, ["a", "b", "c"])


def test_text_embeddings_cached(scorer, images, monkeypatch):
    t = ClipTagger(scorer, SMALL_TAGS, thresholds=0.0, text_batch_size=3)
    calls = []
    original = scorer.model.get_text_features

    def counting(*args, **kwargs):
        calls.append(kwargs["input_ids"].shape[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(scorer.model, "get_text_features", counting)
    first = t.tag(images, ["a", "b"])
    assert calls == [3, 3, 2]  # 8 tags in batches of 3, once
    second = t.tag(images, ["a", "b"])
    assert calls == [3, 3, 2]  # no text-encoder forward the second time
    assert first == second
    t.clear_cache()
    t.tag(images[:1])
    assert len(calls) == 6


def test_config_round_trip(tiny_clip_dir, scorer, images):
    t = ClipTagger(
        scorer,
        SMALL_TAGS,
        thresholds=0.3,
        template="a picture of {}",
        top_k=4,
        threshold_scale=0.5,
        min_score=-1.0,
        logit_scale=20.0,
        prompt_objects=words_in_prompt,
    )
    cfg = t.to_config()
    assert json.loads(json.dumps(cfg)) == cfg  # plain JSON, no weights
    assert cfg["scorer"]["model"] == str(tiny_clip_dir)
    assert cfg["prompt_objects"] == f"{__name__}:words_in_prompt"
    t2 = ClipTagger.from_config(json.loads(json.dumps(cfg)))
    assert t2.to_config() == cfg
    assert t2.tag(images, ["a kite", "a dog"]) == t.tag(images, ["a kite", "a dog"])
    # the default RAM list is recorded by reference, not copied into the config
    ram_cfg = ClipTagger(scorer).to_config()
    assert ram_cfg["tag_list"] is None and ram_cfg["thresholds"] is None and ram_cfg["prompt_objects"] is None
    # custom tags without thresholds: RAM's threshold where RAM has the tag, else default_threshold
    ram = dict(zip(load_ram_tag_list(), load_ram_thresholds()))
    t3 = ClipTagger(scorer, ["cat", "not-a-ram-tag"], default_threshold=0.42)
    assert t3.thresholds.tolist() == pytest.approx([ram["cat"], 0.42])


def test_full_ram_vocabulary_runs(tiny_clip_dir, images):
    t = ClipTagger(str(tiny_clip_dir), top_k=10)  # a path: the tagger builds its own scorer
    assert len(t.tags) == 4585
    rows = t.tag(images, ["a cat", "a dog"])
    vocab = set(t.tags)
    assert all(1 <= len(r) <= 10 and set(r) <= vocab for r in rows)  # the best tag always passes
    assert t.tag_embeds.shape == (4585, t.scorer.embed_dim)


def test_ram_tagger_missing_package_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "ram", None)  # makes `import ram` fail even if it were installed
    with pytest.raises(ImportError) as info:
        RamTagger("ram_plus_swin_large_14m.pth")
    assert isinstance(info.value, MissingDependencyError)
    msg = str(info.value)
    assert "pip install git+https://github.com/xinyu1205/recognize-anything.git" in msg
    assert "not on PyPI" in msg and "ClipTagger" in msg
