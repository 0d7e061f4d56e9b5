import json
import warnings

import numpy as np
import pytest
import torch

from realign_pipeline.layout import Layout, LayoutError, Region, resize_mask, resolve_layout
from realign_pipeline.testing import clip_tokenizer
from realign_pipeline.tokens import unique_word_keys, word_token_spans


@pytest.fixture(scope="module")
def tokenizer():
    return clip_tokenizer()


# ---------------------------------------------------------------- regions: bad input is a clear error
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"mask": np.ones((1, 4, 4))}, "2-D"),
        ({"mask": np.ones(4)}, "2-D"),
        ({"mask": np.full((4, 4), np.nan)}, "NaN"),
        ({"mask": np.full((4, 4), 255.0)}, "[0, 1]"),
        ({"mask": np.ones((4, 4)), "score": -1}, "non-negative"),
        ({"mask": np.ones((4, 4)), "score": float("nan")}, "non-negative"),
        ({"mask": np.ones((4, 4)), "score": "high"}, "number"),
        ({}, "mask or a box"),
        ({"box": [0.5, 0.1, 0.2, 0.9]}, "x0 < x1"),
        ({"box": [10, 10, 50, 50]}, "fractions"),
        ({"box": [0.1, 0.2]}, "four"),
        ({"mask": np.ones((4, 4)), "token_indices": []}, "empty"),
    ],
)
def test_region_rejects_bad_input_naming_the_phrase(kwargs, message):
    with pytest.raises(LayoutError) as error:
        Region("red book", **kwargs)
    assert message in str(error.value)
    assert "red book" in str(error.value)


def test_layout_error_names_the_region_index():
    with pytest.raises(LayoutError, match=r"region 1 \(.dog.\): unknown field"):
        Layout([{"phrase": "cat", "box": [0, 0, 1, 1]}, {"phrase": "dog", "box": [0, 0, 1, 1], "colour": "red"}])


def test_area_of_mask_and_box():
    mask = np.zeros((10, 20), dtype=bool)
    mask[:5, :10] = True
    assert Region("cat", mask=mask).area == pytest.approx(0.25)
    assert Region("cat", box=[0.0, 0.0, 0.5, 0.2]).area == pytest.approx(0.1)


# ---------------------------------------------------------------- masks at attention resolutions
def test_box_mask_covers_the_box_fraction_on_any_grid():
    region = Region("cat", box=[0.1, 0.25, 0.6, 0.75])
    for height, width in [(8, 8), (6, 10), (5, 3)]:
        mask = region.mask_at(height, width)
        assert mask.shape == (height, width)
        assert float(mask.sum()) / (height * width) == pytest.approx(0.5 * 0.5, abs=1e-6)
        assert float(mask.max()) <= 1.0
    assert region.mask_at(4, 4)[0].sum() == 0  # top row outside the box (y < 0.25)


def test_resize_keeps_small_objects_and_handles_non_square():
    mask = torch.zeros(64, 96)
    mask[30:33, 50:53] = 1.0  # a 3x3 object in a 64x96 image
    small = resize_mask(mask, 8, 12)
    assert small.shape == (8, 12)
    assert small.max() > 0, "a small object must not vanish at a coarse resolution"
    assert small.sum() * (64 * 96) / (8 * 12) == pytest.approx(9, rel=0.35)
    big = resize_mask(torch.tensor([[1.0, 0.0], [0.0, 0.0]]), 4, 6)
    assert big.shape == (4, 6) and big[0, 0] == 1 and big[-1, -1] == 0



def test_upsampling_repeats_values_instead_of_ramping():
    # a 2x2 mask at 8x8: each input cell becomes a 4x4 block, with no bilinear ramp across the edge
    big = resize_mask(torch.tensor([[1.0, 0.0], [0.0, 0.0]]), 8, 8)
    expected = torch.zeros(8, 8)
    expected[:4, :4] = 1.0
    assert torch.equal(big, expected)
    assert torch.equal(Region("cat", mask=np.array([[True, False], [False, False]])).mask_at(8, 8), expected)


@pytest.mark.parametrize("shape, size", [((64, 48), (8, 6)), ((64, 64), (8, 8)), ((37, 50), (8, 8)), ((64, 96), (7, 5))])
def test_downsampling_is_an_area_average(shape, size):
    generator = torch.Generator().manual_seed(0)
    mask = (torch.rand(shape, generator=generator) > 0.7).float()
    mask[3:9, 5:11] = torch.rand(6, 6, generator=generator)  # soft values too
    small = resize_mask(mask, *size)
    assert small.shape == size
    assert float(small.mean()) == pytest.approx(float(mask.mean()), abs=1e-6)
    assert 0 <= float(small.min()) and float(small.max()) <= 1
    if shape[0] % size[0] == 0 and shape[1] % size[1] == 0:  # integer ratio: the mean of each block
        blocks = mask.reshape(size[0], shape[0] // size[0], size[1], shape[1] // size[1]).mean(dim=(1, 3))
        torch.testing.assert_close(small, blocks)


def test_non_integer_upsampling_mixes_only_straddling_cells():
    mask = torch.zeros(3, 5)
    mask[1, 2] = 1.0  # the centre cell: rows 1/3..2/3, columns 2/5..3/5 of the image
    big = resize_mask(mask, 8, 8)
    assert big.shape == (8, 8)
    assert float(big.mean()) == pytest.approx(1 / 15, abs=1e-6)  # the area is kept
    torch.testing.assert_close(big, _box_coverage_reference(1 / 3, 2 / 3, 2 / 5, 3 / 5, 8, 8))
    assert 0 <= float(big.min()) and float(big.max()) <= 1


def _box_coverage_reference(y0, y1, x0, x1, height, width):
    """Fraction of each cell covered by the rectangle, computed cell by cell."""
    out = torch.zeros(height, width)
    for i in range(height):
        for j in range(width):
            dy = max(0.0, min(y1, (i + 1) / height) - max(y0, i / height)) * height
            dx = max(0.0, min(x1, (j + 1) / width) - max(x0, j / width)) * width
            out[i, j] = dy * dx
    return out


# ---------------------------------------------------------------- JSON
def test_json_round_trip_keeps_every_field(tmp_path):
    binary = np.zeros((6, 9), dtype=bool)
    binary[0, 0] = True
    binary[2:5, 3:8] = True
    soft = np.linspace(0, 1, 20).reshape(4, 5)
    layout = Layout(
        [
            Region("red book", mask=binary, score=2.0, tag="book", source={"tool": "hand", "raw": "{}"}),
            Region("yellow vase", mask=soft, score=0.5, token_indices=[6, 7]),
            Region("table", box=[0.0, 0.5, 1.0, 1.0], score=0.0),
        ]
    )
    path = tmp_path / "layout.json"
    layout.to_json(path)
    data = json.loads(path.read_text())
    assert data["format"] == "realign-layout" and data["version"] == 1
    assert isinstance(data["regions"][0]["mask"], dict), "binary masks are stored as run lengths"
    for loaded in (Layout.from_json(path), Layout.from_json(path.read_text())):
        assert [r.phrase for r in loaded] == ["red book", "yellow vase", "table"]
        assert torch.equal(loaded[0].mask, torch.as_tensor(binary, dtype=torch.float32))
        assert torch.allclose(loaded[1].mask, torch.as_tensor(soft, dtype=torch.float32), atol=1e-4)
        assert loaded[0].tag == "book" and loaded[0].source == {"tool": "hand", "raw": "{}"}
        assert loaded[1].token_indices == [6, 7] and loaded[1].score == 0.5
        assert loaded[2].box == (0.0, 0.5, 1.0, 1.0) and loaded[2].mask is None


def test_hand_written_json_with_nested_list_mask():
    text = '{"regions": [{"phrase": "cat", "mask": [[0, 1], [1, 1]], "score": 2}]}'
    layout = Layout.from_json(text)
    assert layout[0].area == pytest.approx(0.75)


@pytest.mark.parametrize(
    "text, message",
    [
        ("{not json", "not valid JSON"),
        ('{"format": "realign-layout", "version": 7, "regions": []}', "version"),
        ('{"phrases": []}', "regions"),
        ('{"regions": [{"phrase": "cat", "mask": {"size": [2, 2], "counts": [1, 1]}}]}', "add up"),
        ('{"regions": [{"mask": [[1]]}]}', "phrase"),
    ],
)
def test_bad_json_is_a_clear_error(text, message):
    with pytest.raises(LayoutError, match=message):
        Layout.from_json(text)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(LayoutError, match="cannot read"):
        Layout.from_json(tmp_path / "nope.json")


# ---------------------------------------------------------------- binding a layout to a prompt
def test_phrases_map_to_their_tokens(tokenizer):
    # "a red book and a yellow vase": start token at 0, then one token per word
    layout = Layout([Region("red book", box=[0, 0, 0.5, 1]), Region("Yellow Vase", box=[0.5, 0, 1, 1])])
    resolved = resolve_layout(layout, "a red book and a yellow vase", tokenizer)
    assert resolved.token_indices == [[2, 3], [6, 7]]
    assert resolved.prompt == "a red book and a yellow vase"
    token_map = resolved.token_map(77)
    assert token_map.shape == (2, 77) and token_map.sum() == 4 and token_map[0, 2] == 1 and token_map[1, 7] == 1


def test_repeated_word_takes_successive_occurrences(tokenizer):
    layout = Layout([Region("red", box=[0, 0, 0.5, 1]), Region("red", box=[0.5, 0, 1, 1])])
    with pytest.warns(UserWarning, match="occurs 2 times"):
        resolved = resolve_layout(layout, "a red cube and a red ball", tokenizer)
    assert resolved.token_indices == [[2], [6]]


def test_explicit_token_indices_win(tokenizer):
    layout = Layout([Region("red", box=[0, 0, 1, 1], token_indices=[6])])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resolved = resolve_layout(layout, "a red cube and a red ball", tokenizer)
    assert resolved.token_indices == [[6]]


def test_missing_phrase_is_appended_or_raises_in_strict_mode(tokenizer):
    layout = Layout([Region("blue bird", box=[0, 0, 1, 1])])
    with pytest.warns(UserWarning, match="appended"):
        resolved = resolve_layout(layout, "a cat", tokenizer)
    assert resolved.prompt == "a cat, blue bird"
    assert resolved.appended_phrases == ["blue bird"]
    ids = tokenizer(resolved.prompt)["input_ids"]
    assert [ids[i] for i in resolved.token_indices[0]] == tokenizer("blue bird", add_special_tokens=False)["input_ids"]
    with pytest.raises(LayoutError, match="not in the prompt"):
        resolve_layout(layout, "a cat", tokenizer, strict=True)


def test_truncated_phrase_is_an_error_naming_the_region(tokenizer):
    prompt = " ".join(["cat"] * 80) + " red book"
    with pytest.raises(LayoutError, match=r"region 0 \('red book'\).*shorten"):
        resolve_layout(Layout([Region("red book", box=[0, 0, 1, 1])]), prompt, tokenizer)


def test_token_indices_out_of_range_and_missing_prompt(tokenizer):
    with pytest.raises(LayoutError, match="out of range"):
        resolve_layout(Layout([Region("cat", box=[0, 0, 1, 1], token_indices=[80])]), "a cat", tokenizer)
    with pytest.raises(LayoutError, match="token_indices"):
        resolve_layout(Layout([Region("cat", box=[0, 0, 1, 1])]), None, tokenizer)
    resolved = resolve_layout(Layout([Region("cat", box=[0, 0, 1, 1], token_indices=[2])]), None, tokenizer)
    assert resolved.token_indices == [[2]] and resolved.prompt is None


def test_empty_mask_is_skipped_with_a_warning(tokenizer):
    layout = Layout([Region("cat", mask=np.zeros((4, 4))), Region("dog", box=[0, 0, 1, 1])])
    with pytest.warns(UserWarning, match="empty mask"):
        resolved = resolve_layout(layout, "a cat and a dog", tokenizer)
    assert [r.phrase for r in resolved.regions] == ["dog"]


def test_word_spans_follow_the_tokenizer(tokenizer):
    prompt = "a photo of a cat"
    spans = word_token_spans(tokenizer, prompt)
    assert [s.word for s in spans] == ["a", "photo", "of", "a", "cat"]
    ids = tokenizer(prompt)["input_ids"]
    for span in spans:
        assert [ids[i] for i in span.token_indices] == tokenizer(span.word, add_special_tokens=False)["input_ids"]
    assert unique_word_keys(spans) == ["a", "photo", "of", "a#2", "cat"]
    long_spans = word_token_spans(tokenizer, " ".join(["cat"] * 100))
    assert len(long_spans) == 75 and long_spans[-1].token_indices == (75,)
