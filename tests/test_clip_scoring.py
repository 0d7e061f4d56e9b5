"""ClipScorer on a tiny random CLIP saved to a temp folder and loaded back through from_pretrained (offline)."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import CLIPImageProcessor

from realign_pipeline.scoring import DEFAULT_CLIP_MODEL, ClipScorer, clip_preprocess_tensor, cosine_similarity
from realign_pipeline.testing import TINY_CLIP_IMAGE_SIZE


@pytest.fixture(scope="module")
def scorer(tiny_clip_dir):
    return ClipScorer.from_pretrained(tiny_clip_dir)


def _smooth_image(h: int, w: int, seed: int) -> PIL.Image.Image:
    """A random but natural-looking image: low-resolution noise upsampled (resize errors stay small)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    return PIL.Image.fromarray(small).resize((w, h), PIL.Image.BILINEAR)


def _noise_image(h: int, w: int, seed: int) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _to_tensor(img: PIL.Image.Image) -> torch.Tensor:
    return torch.tensor(np.array(img)).permute(2, 0, 1)[None].float() / 255.0


def test_lazy_loading_and_config(tiny_clip_dir):
    s = ClipScorer.from_pretrained(tiny_clip_dir)
    assert not s.is_loaded
    assert ClipScorer().model_id_or_path == DEFAULT_CLIP_MODEL == "openai/clip-vit-large-patch14"
    s.text_embeds(["a cat"])
    assert s.is_loaded
    assert not any(p.requires_grad for p in s.model.parameters())
    cfg = s.to_config()
    assert cfg == {"model": str(tiny_clip_dir), "dtype": None}
    assert ClipScorer.from_config(cfg).model_id_or_path == str(tiny_clip_dir)
    assert ClipScorer.from_config({"model": str(tiny_clip_dir), "dtype": "float64"})._dtype == torch.float64


def test_shapes_and_normalization(scorer):
    imgs = [_smooth_image(40, 56, i) for i in range(3)]
    ie = scorer.image_embeds(imgs)
    te = scorer.text_embeds(["a red cube", "a blue sphere on a table", "dog"])
    d = scorer.embed_dim
    assert ie.shape == (3, d) and te.shape == (3, d)
    assert ie.dtype == te.dtype == torch.float32
    torch.testing.assert_close(ie.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(te.norm(dim=-1), torch.ones(3))
    raw = scorer.image_embeds(imgs, normalize=False)
    torch.testing.assert_close(raw / raw.norm(dim=-1, keepdim=True), ie)
    # batching does not change the result
    te_b1 = scorer.text_embeds(["a red cube", "a blue sphere on a table", "dog"], batch_size=1)
    torch.testing.assert_close(te_b1, te, atol=1e-5, rtol=1e-5)
    assert scorer.text_embeds([]).shape == (0, d)


def test_similarity_paired_matrix_and_symmetry(scorer):
    imgs = [_smooth_image(32, 32, i) for i in range(3)]
    texts = ["a red cube", "a green ball", "two cats"]
    m = scorer.similarity_matrix(imgs, texts)
    assert m.shape == (3, 3)
    p = scorer.similarity(imgs, texts)
    assert p.shape == (3,)
    torch.testing.assert_close(p, m.diagonal())
    assert (m.abs() <= 1 + 1e-5).all()
    # same hand computation from the embeddings
    torch.testing.assert_close(m, scorer.image_embeds(imgs) @ scorer.text_embeds(texts).T)
    # one text broadcast over the images, one image over the texts
    torch.testing.assert_close(scorer.similarity(imgs, "a green ball"), m[:, 1])
    torch.testing.assert_close(scorer.similarity(imgs[2], texts), m[2])
    with pytest.raises(ValueError, match="3 images but 2 texts"):
        scorer.similarity(imgs, texts[:2])
    # cosine is symmetric: swapping the roles of the two embedding sets transposes the matrix
    a, b = torch.randn(4, 8), torch.randn(5, 8)
    torch.testing.assert_close(cosine_similarity(a, b, matrix=True), cosine_similarity(b, a, matrix=True).T)
    torch.testing.assert_close(cosine_similarity(a, a), torch.ones(4))


def _overshooting(h: int, w: int, seed: int) -> tuple[torch.Tensor, PIL.Image.Image]:
    """A smooth image stretched to [-0.25, 1.25] (a VAE's overshoot, in [0, 1] units) and the 8-bit image the
    processor is handed for it (clipped to [0, 255], as ``postprocess`` / ``numpy_to_pil`` do)."""
    x = _to_tensor(_smooth_image(h, w, seed)) * 1.5 - 0.25
    arr = (x.clamp(0, 1) * 255).round().byte()[0].permute(1, 2, 0).numpy()
    return x, PIL.Image.fromarray(arr)


@pytest.mark.parametrize("size", [(300, 200), (64, 96), (224, 224), (500, 333)])
@pytest.mark.parametrize("overshoot", [False, True], ids=["in_range", "overshoot"])
def test_tensor_preprocessing_matches_processor_vit_l(size, overshoot):
    """The torch path against the real ViT-L/14 processor settings (224 px, bicubic, OpenAI mean/std), also
    for values outside the range: the processor sees them clipped to 8 bits *before* it resizes."""
    proc = CLIPImageProcessor()  # the defaults are openai/clip-vit-large-patch14's preprocessor_config
    h, w = size
    if overshoot:
        x, img = _overshooting(h, w, seed=h)
    else:
        img = _smooth_image(h, w, seed=h)
        x = _to_tensor(img)
    ref = proc(images=[img], return_tensors="pt")["pixel_values"]
    out = clip_preprocess_tensor(x, proc, value_range=(0.0, 1.0))
    assert out.shape == ref.shape == (1, 3, 224, 224)
    # one 8-bit level is 1/255/0.27 ~= 0.015 after normalisation; the processor rounds to 8 bits
    assert (out - ref).abs().max() < 0.03
    assert (out - ref).abs().mean() < 0.006
    # [-1, 1] input gives the same result
    out_pm = clip_preprocess_tensor(x * 2 - 1, proc, value_range=(-1.0, 1.0))
    torch.testing.assert_close(out_pm, out, atol=1e-5, rtol=1e-5)


def test_tensor_preprocessing_on_noise_matches_processor():
    proc = CLIPImageProcessor()
    img = _noise_image(300, 200, seed=1)
    ref = proc(images=[img], return_tensors="pt")["pixel_values"]
    out = clip_preprocess_tensor(_to_tensor(img), proc, value_range=(0.0, 1.0))
    # within two 8-bit levels everywhere: PIL clips the bicubic overshoot between its width and height passes,
    # and so does the torch path (one joint 2-D resize was up to 0.29 apart here)
    assert (out - ref).abs().mean() < 0.006
    assert (out - ref).abs().max() < 0.03


def test_differentiable_path_matches_processor_embeddings_and_gradients_flow(scorer):
    img = _smooth_image(48, 40, seed=3)
    ref = scorer.image_embeds([img])
    x = (_to_tensor(img) * 2 - 1).requires_grad_(True)
    emb = scorer.image_embeds_from_tensor(x)  # default value_range (-1, 1), as a VAE decodes
    assert emb.shape == ref.shape
    assert torch.nn.functional.cosine_similarity(emb.detach(), ref).item() > 0.999
    pv = scorer.preprocess_tensor(x.detach())
    assert pv.shape == (1, 3, TINY_CLIP_IMAGE_SIZE, TINY_CLIP_IMAGE_SIZE)

    # gradients reach the pixels through similarity() with a tensor
    sim = scorer.similarity(x, "a red cube")
    assert sim.requires_grad
    sim.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0 and torch.isfinite(x.grad).all()
    # and a few gradient steps on the pixels raise the score (the gradient points the right way)
    y = x.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([y], lr=0.05)
    before = scorer.similarity(y, "a red cube").item()
    for _ in range(5):
        opt.zero_grad()
        (-scorer.similarity(y, "a red cube").sum()).backward()
        opt.step()
    assert scorer.similarity(y.detach(), "a red cube").item() > before
    # the no-grad helper keeps no graph
    assert not scorer.image_embeds(x).requires_grad


def test_dtype_and_device_options(tiny_clip_dir):
    s = ClipScorer.from_pretrained(tiny_clip_dir, device="cpu", dtype=torch.float64)
    assert s.dtype == torch.float64 and s.device.type == "cpu"
    e = s.image_embeds([_smooth_image(32, 32, 0)])
    assert e.dtype == torch.float32  # embeddings come back as float32 whatever the model runs in
    ref = ClipScorer.from_pretrained(tiny_clip_dir).image_embeds([_smooth_image(32, 32, 0)])
    torch.testing.assert_close(e, ref, atol=1e-4, rtol=1e-4)
