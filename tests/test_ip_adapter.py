"""RealignDiffPipeline with an IP-Adapter loaded: Eq. 8 on the text keys, the image prompt as diffusers computes it.

The adapter is built for the tiny UNet by the test (random ``image_proj`` and ``to_k_ip``/``to_v_ip`` weights of the
right shapes), saved as a safetensors file and loaded with ``pipe.load_ip_adapter``, as a user loads a real one.
The image prompt is given as ``ip_adapter_image_embeds``, so no image encoder is needed. The same with a LoRA
loaded beside the adapter (``load_lora_weights``), and on RealignDiffXLPipeline.
"""

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from diffusers.models.attention_processor import Attention, IPAdapterAttnProcessor2_0
from safetensors.torch import save_file

from realign_pipeline import Layout, RealignDiffPipeline, Region
from realign_pipeline.attention import RealignAttentionState, RealignIPAdapterAttnProcessor
from realign_pipeline.testing import tiny_pipeline

PROMPT = "a red book and a yellow vase"
LAYOUT = Layout([Region("red book", box=[0.0, 0.0, 0.5, 1.0]), Region("yellow vase", box=[0.5, 0.0, 1.0, 1.0])])
IMAGE_EMBED_DIM = 16


def ip_adapter_state_dict(unet, seed: int = 0) -> dict[str, torch.Tensor]:
    """An IP-Adapter (the base kind: ``ImageProjection`` with 4 tokens) for `unet`, in the file layout of the
    released checkpoints: ``image_proj.*`` and ``ip_adapter.{1, 3, 5, ...}.to_{k,v}_ip.weight``, one pair per
    cross-attention layer in ``unet.attn_processors`` order."""
    generator = torch.Generator().manual_seed(seed)
    width = unet.config.cross_attention_dim
    state = {
        "image_proj.proj.weight": torch.randn(4 * width, IMAGE_EMBED_DIM, generator=generator) * 0.3,
        "image_proj.proj.bias": torch.randn(4 * width, generator=generator) * 0.1,
        "image_proj.norm.weight": torch.ones(width),
        "image_proj.norm.bias": torch.zeros(width),
    }
    key_id = 1
    for name in unet.attn_processors:
        if name.endswith("attn2.processor"):
            inner = unet.get_submodule(name.removesuffix(".processor")).to_k.out_features
            for kind in ("to_k_ip", "to_v_ip"):
                state[f"ip_adapter.{key_id}.{kind}.weight"] = torch.randn(inner, width, generator=generator) * 0.3
            key_id += 2
    return state


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    pipeline = tiny_pipeline(RealignDiffPipeline)
    folder = tmp_path_factory.mktemp("ip-adapter")
    save_file(ip_adapter_state_dict(pipeline.unet), str(folder / "ip_adapter.safetensors"))
    pipeline.load_ip_adapter(str(folder), subfolder="", weight_name="ip_adapter.safetensors", image_encoder_folder=None)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(scope="module")
def pipe_without_adapter():
    pipeline = tiny_pipeline(RealignDiffPipeline)  # the same seed: the same weights as `pipe` before its adapter
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def image_embeds() -> list[torch.Tensor]:
    """One adapter's embeddings for a guided call: (negative, positive) stacked, one image each."""
    return [torch.randn(2, 1, IMAGE_EMBED_DIM, generator=torch.Generator().manual_seed(1))]


def run(pipeline, ip_scale: float | None = 0.8, steps: int = 3, **kwargs):
    if ip_scale is not None:
        pipeline.set_ip_adapter_scale(ip_scale)
        kwargs["ip_adapter_image_embeds"] = image_embeds()
    kwargs.setdefault("output_type", "np")
    return pipeline(PROMPT, num_inference_steps=steps, generator=torch.Generator().manual_seed(0), **kwargs)


def parent_of(pipeline) -> StableDiffusionPipeline:
    parent = StableDiffusionPipeline(**pipeline.components)
    parent.set_progress_bar_config(disable=True)
    return parent


def ip_processors(unet) -> dict:
    return {n: p for n, p in unet.attn_processors.items() if isinstance(p, IPAdapterAttnProcessor2_0)}


def test_the_adapter_is_loaded_and_changes_the_image(pipe):
    assert len(ip_processors(pipe.unet)) == 7  # every cross-attention layer of the tiny UNet
    assert not np.array_equal(run(pipe, ip_scale=0.8).images, run(pipe, ip_scale=0.0).images)


def test_without_layout_it_is_the_parent_pipeline_with_the_adapter(pipe):
    assert np.array_equal(run(pipe).images, run(parent_of(pipe)).images)


def test_layout_with_the_adapter_modulates_text_attention(pipe):
    def first_step_maps(**kwargs):
        def stop(pipeline, step, timestep, tensors):
            pipeline._interrupt = True
            return tensors

        return run(pipe, steps=50, return_attention_maps=True, callback_on_step_end=stop, **kwargs).attention_maps[0]

    def share(maps: dict, words: list[str], mask: torch.Tensor) -> float:
        mass = sum(maps[w] for w in words)
        return float((mass * mask).sum() / mass.sum())

    plain, guided = first_step_maps(), first_step_maps(layout=LAYOUT)
    for region, words in zip(LAYOUT, (["red", "book"], ["yellow", "vase"])):
        mask = region.mask_at(16, 16)
        assert share(guided, words, mask) > share(plain, words, mask) + 0.01, region.phrase
    # the maps are over the 77 text keys only: the adapter's 4 image tokens are not words of the prompt
    assert list(plain) == ["a", "red", "book", "and", "a#2", "yellow", "vase"]


def test_ip_scale_zero_with_a_layout_is_the_layout_without_an_adapter(pipe, pipe_without_adapter):
    ours = run(pipe, ip_scale=0.0, layout=LAYOUT).images
    no_adapter = run(pipe_without_adapter, ip_scale=None, layout=LAYOUT).images
    assert np.array_equal(ours, no_adapter)
    # and the adapter really takes part in the layout call when its scale is not 0
    assert not np.array_equal(run(pipe, ip_scale=0.8, layout=LAYOUT).images, ours)


def test_layout_of_strength_zero_keeps_diffusers_image_prompt_attention(pipe):
    ours = run(pipe, layout=LAYOUT, cross_attention_strength=0.0).images
    assert np.array_equal(ours, run(parent_of(pipe)).images)


def test_ip_processors_are_restored_and_stay_registered_during_the_call(pipe):
    original = pipe.unet.attn_processors
    weights = {k for k in pipe.unet.state_dict() if "to_k_ip" in k}
    seen = []

    def look(pipeline, step, timestep, tensors):
        installed = pipeline.unet.attn_processors
        seen.append(sum(isinstance(p, RealignIPAdapterAttnProcessor) for p in installed.values()))
        # the adapter's weights stay under the UNet (for .to() and offload hooks) while wrapped
        seen.append(sum("to_k_ip" in k for k in pipeline.unet.state_dict()))
        return tensors

    run(pipe, layout=LAYOUT, callback_on_step_end=look)
    assert seen[:2] == [7, len(weights)]
    assert all(pipe.unet.attn_processors[n] is p for n, p in original.items())
    assert {k for k in pipe.unet.state_dict() if "to_k_ip" in k} == weights

    def explode(pipeline, step, timestep, tensors):
        raise RuntimeError("stop here")

    with pytest.raises(RuntimeError, match="stop here"):
        run(pipe, layout=LAYOUT, callback_on_step_end=explode)
    assert all(pipe.unet.attn_processors[n] is p for n, p in original.items())
    assert {k for k in pipe.unet.state_dict() if "to_k_ip" in k} == weights


# ---------------------------------------------------------------- one layer: the image branch is diffusers' own
def _layer(scale):
    torch.manual_seed(0)
    attn = Attention(query_dim=32, cross_attention_dim=16, heads=4, dim_head=8).eval()
    ip = IPAdapterAttnProcessor2_0(hidden_size=32, cross_attention_dim=16, num_tokens=(4, 4), scale=scale).eval()
    generator = torch.Generator().manual_seed(2)
    hidden = torch.randn(2, 24, 32, generator=generator)
    text = torch.randn(2, 7, 16, generator=generator)
    # per adapter (batch, image prompts, tokens, width), as the UNet's image projection hands them over
    images = [torch.randn(2, 1, 4, 16, generator=generator), torch.randn(2, 2, 4, 16, generator=generator)]
    return attn, ip, hidden, text, images


def _state(modulating: bool) -> RealignAttentionState:
    from realign_pipeline import resolve_layout
    from realign_pipeline.testing import clip_tokenizer

    resolved = resolve_layout(Layout([Region("cat", box=[0, 0, 0.5, 1])]), "a cat", clip_tokenizer())
    state = RealignAttentionState(
        latent_height=4, latent_width=6, num_images=1, do_classifier_free_guidance=True, sequence_length=7,
        layouts=[resolved],
    )
    state.set_step(0 if modulating else 9, 981 if modulating else 1, num_steps=10)
    return state


def test_image_branch_with_masks_is_bitwise_diffusers_and_survives_modulation():
    attn, ip, hidden, text, images = _layer(scale=[0.6, [0.3, 0.9]])
    masks = [None, torch.rand(1, 2, 8, 12, generator=torch.Generator().manual_seed(3))]
    context = (text, images)
    with torch.no_grad():
        attn.set_processor(ip)
        theirs = attn(hidden, encoder_hidden_states=context, ip_adapter_masks=masks)
        attn.set_processor(RealignIPAdapterAttnProcessor(_state(modulating=False), ip))
        ours = attn(hidden, encoder_hidden_states=context, ip_adapter_masks=masks)
        assert torch.equal(ours, theirs)

        # modulating: the output changes by Eq. 8 on the text keys only; the image branch adds the same amount
        attn.set_processor(RealignIPAdapterAttnProcessor(_state(modulating=True), ip))
        modulated = attn(hidden, encoder_hidden_states=context, ip_adapter_masks=masks)
        ip.scale = [0.0, [0.0, 0.0]]
        modulated_text_only = attn(hidden, encoder_hidden_states=context, ip_adapter_masks=masks)
        attn.set_processor(ip)
        text_only = attn(hidden, encoder_hidden_states=context, ip_adapter_masks=masks)
    assert not torch.allclose(modulated, ours)
    torch.testing.assert_close(modulated - modulated_text_only, theirs - text_only, atol=1e-6, rtol=0)


def test_image_prompt_states_on_a_layer_without_adapter_weights_are_refused():
    from realign_pipeline.attention import RealignAttnProcessor

    attn, _, hidden, text, images = _layer(scale=1.0)
    attn.set_processor(RealignAttnProcessor(_state(modulating=True)))
    with pytest.raises(ValueError, match="IP-Adapter"):
        attn(hidden, encoder_hidden_states=(text, images[:1]))


# ------------------------------------------------------ with a LoRA at the same time, and on SDXL (real setups)
def with_adapter(pipeline, folder):
    save_file(ip_adapter_state_dict(pipeline.unet), str(folder / "ip_adapter.safetensors"))
    pipeline.load_ip_adapter(str(folder), subfolder="", weight_name="ip_adapter.safetensors", image_encoder_folder=None)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def test_ip_adapter_and_lora_loaded_together(tmp_path, save_random_lora):
    adapter_only = with_adapter(tiny_pipeline(RealignDiffPipeline), tmp_path)
    both = with_adapter(tiny_pipeline(RealignDiffPipeline), tmp_path)
    both.load_lora_weights(save_random_lora(both, tmp_path / "lora"))
    original = both.unet.attn_processors
    assert len(ip_processors(both.unet)) == 7
    # the LoRA takes part, with and without a layout
    assert not np.array_equal(run(both).images, run(adapter_only).images)
    guided = run(both, layout=LAYOUT).images
    assert np.isfinite(guided).all() and not np.array_equal(guided, run(adapter_only, layout=LAYOUT).images)
    assert not np.array_equal(guided, run(both).images)
    # no layout: diffusers' pipeline with the same adapter and LoRA; the processors are put back after a layout
    assert np.array_equal(run(both).images, run(parent_of(both)).images)
    assert all(both.unet.attn_processors[n] is p for n, p in original.items())


def test_ip_adapter_on_sdxl_with_a_lora(tmp_path, save_random_lora):
    from diffusers import StableDiffusionXLPipeline

    from realign_pipeline import RealignDiffXLPipeline
    from realign_pipeline.testing import tiny_sdxl_pipeline

    def xl_run(pipeline, ip_scale=0.8, **kwargs):
        return run(pipeline, ip_scale=ip_scale, height=32, width=48, **kwargs)

    plain = tiny_sdxl_pipeline(RealignDiffXLPipeline)
    plain.set_progress_bar_config(disable=True)
    pipe = with_adapter(tiny_sdxl_pipeline(RealignDiffXLPipeline), tmp_path)
    assert len(ip_processors(pipe.unet)) == sum(n.endswith("attn2.processor") for n in pipe.unet.attn_processors) > 0
    assert not np.array_equal(xl_run(pipe).images, xl_run(pipe, ip_scale=0.0).images)
    parent = StableDiffusionXLPipeline(**pipe.components, add_watermarker=False)
    parent.set_progress_bar_config(disable=True)
    assert np.array_equal(xl_run(pipe).images, xl_run(parent).images)
    # Eq. 8 on the text keys: an adapter at scale 0 gives the layout's image without an adapter
    assert np.array_equal(xl_run(pipe, ip_scale=0.0, layout=LAYOUT).images,
                          xl_run(plain, ip_scale=None, layout=LAYOUT).images)
    assert not np.array_equal(xl_run(pipe, layout=LAYOUT).images, xl_run(pipe, ip_scale=0.0, layout=LAYOUT).images)

    before = xl_run(pipe).images
    pipe.load_lora_weights(save_random_lora(pipe, tmp_path / "lora"))
    original = pipe.unet.attn_processors
    assert not np.array_equal(xl_run(pipe).images, before)
    guided = xl_run(pipe, layout=LAYOUT).images
    assert np.isfinite(guided).all() and not np.array_equal(guided, xl_run(pipe).images)
    assert np.array_equal(xl_run(pipe).images, xl_run(parent).images)  # the parent shares the LoRA'd UNet
    assert all(pipe.unet.attn_processors[n] is p for n, p in original.items())
