"""Tests for realign_pipeline.testing: the offline tokenizer and tiny random SD components."""

from __future__ import annotations

import gzip
import inspect
from importlib import resources

import numpy as np
import pytest
import regex
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

from realign_pipeline.testing import STYLES, clip_tokenizer, tiny_components, tiny_pipeline

# Ids produced by the real CLIP tokenizer (openai/CLIP and openai/clip-vit-large-patch14) for this prompt.
CAT_IDS = [49406, 320, 1125, 539, 320, 2368, 49407]


# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------


def test_clip_tokenizer_known_ids():
    tok = clip_tokenizer()
    assert tok("a photo of a cat").input_ids == CAT_IDS
    assert tok.convert_ids_to_tokens(CAT_IDS[1:-1]) == ["a</w>", "photo</w>", "of</w>", "a</w>", "cat</w>"]
    assert len(tok) == 49408
    assert (tok.bos_token, tok.bos_token_id) == ("<|startoftext|>", 49406)
    assert (tok.eos_token, tok.eos_token_id) == ("<|endoftext|>", 49407)
    assert (tok.pad_token, tok.pad_token_id) == ("<|endoftext|>", 49407)  # as in SD 1.5
    assert tok.model_max_length == 77
    # Case and runs of whitespace are normalised like CLIP does.
    assert tok("A  Photo of a   CAT").input_ids == CAT_IDS
    assert tok.decode(CAT_IDS, skip_special_tokens=True) == "a photo of a cat"


def test_clip_tokenizer_pads_and_truncates_to_77():
    tok = clip_tokenizer()
    ids = tok("a photo of a cat", padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    assert ids.shape == (1, 77)
    assert ids[0, :7].tolist() == CAT_IDS
    assert (ids[0, 7:] == 49407).all()

    long = tok(" ".join(["cat"] * 200), padding="max_length", max_length=tok.model_max_length,
               truncation=True).input_ids
    assert len(long) == 77
    assert long[0] == 49406 and long[-1] == 49407 and long[1:-1] == [2368] * 75


def _reference_clip_encode(text: str) -> list[int]:
    """openai/CLIP's SimpleTokenizer.encode, written out independently (minus ftfy, not needed here)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    byte_encoder = dict(zip(bs, map(chr, cs)))
    raw = resources.files("realign_pipeline").joinpath("assets", "clip_bpe_simple_vocab_16e6.txt.gz").read_bytes()
    merges = [tuple(m.split()) for m in gzip.decompress(raw).decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]]
    vocab = list(byte_encoder.values())
    vocab += [v + "</w>" for v in vocab] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    encoder = {v: i for i, v in enumerate(vocab)}
    ranks = {m: i for i, m in enumerate(merges)}

    def bpe(token: str) -> list[str]:
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        while len(word) > 1:
            pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
            best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
            if best not in ranks:
                break
            out, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            word = tuple(out)
        return list(word)

    pat = regex.compile(
        r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
        regex.IGNORECASE,
    )
    text = regex.sub(r"\s+", " ", text).strip().lower()
    ids = [encoder["<|startoftext|>"]]
    for piece in pat.findall(text):
        ids += [encoder[t] for t in bpe("".join(byte_encoder[b] for b in piece.encode("utf-8")))]
    return ids + [encoder["<|endoftext|>"]]


def test_clip_tokenizer_matches_reference_bpe():
    tok = clip_tokenizer()
    prompts = [
        "a photo of a cat",
        "A red cube and a BLUE sphere, on a wooden table!",
        "it's 3 dogs' toys -- and 12 birds",
        "an astronaut riding a horse on mars, trending on artstation, 4k",
        "a café in Zürich at dusk",
        "supercalifragilisticexpialidocious hippopotamus",
    ]
    assert _reference_clip_encode(prompts[0]) == CAT_IDS  # the reference itself is right
    for prompt in prompts:
        assert tok(prompt).input_ids == _reference_clip_encode(prompt), prompt


def test_clip_tokenizer_returns_independent_copies():
    a, b = clip_tokenizer(), clip_tokenizer()
    assert a is not b
    a.add_tokens(["<my-new-token>"])
    assert len(a) == 49409 and len(b) == 49408
    assert len(clip_tokenizer()) == 49408


# --------------------------------------------------------------------------------------------------
# Components
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=STYLES)
def components(request):
    return request.param, tiny_components(request.param)


def test_tiny_components_keys_are_the_pipeline_kwargs(components):
    _, comps = components
    params = set(inspect.signature(StableDiffusionPipeline.__init__).parameters) - {"self", "requires_safety_checker"}
    assert set(comps) == params
    assert comps["safety_checker"] is None and comps["feature_extractor"] is None and comps["image_encoder"] is None


def test_tiny_components_config(components):
    style, c = components
    sd2 = style == "sd2"
    unet, vae, te, sched = c["unet"], c["vae"], c["text_encoder"], c["scheduler"]

    assert unet.config.sample_size == 16
    assert tuple(unet.config.block_out_channels) == (32, 64)
    assert unet.config.layers_per_block == 1
    assert tuple(unet.config.down_block_types) == ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
    assert tuple(unet.config.up_block_types) == ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
    assert unet.config.cross_attention_dim == te.config.hidden_size == 32
    assert unet.config.upcast_attention is sd2
    assert unet.config.use_linear_projection is sd2
    cross = [m for name, m in unet.named_modules() if name.endswith("attn2")]
    assert cross and all(m.heads > 1 for m in cross)

    assert 2 ** (len(vae.config.block_out_channels) - 1) == 2  # the pipeline's vae_scale_factor
    assert vae.config.latent_channels == unet.config.in_channels == 4

    assert te.config.vocab_size == 49408 == len(c["tokenizer"])
    assert (te.config.bos_token_id, te.config.eos_token_id, te.config.pad_token_id) == (49406, 49407, 49407)
    assert te.config.max_position_embeddings == 77
    assert te.config.hidden_act == ("gelu" if sd2 else "quick_gelu")

    assert isinstance(sched, DDIMScheduler)
    assert sched.config.beta_start == 0.00085 and sched.config.beta_end == 0.012
    assert sched.config.beta_schedule == "scaled_linear"
    assert sched.config.clip_sample is False and sched.config.set_alpha_to_one is False
    assert sched.config.steps_offset == 1
    assert sched.config.prediction_type == ("v_prediction" if sd2 else "epsilon")

    for model in (unet, vae, te):
        assert not model.training
        assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in model.parameters())


def _state(comps):
    return {k: comps[k].state_dict() for k in ("unet", "vae", "text_encoder")}


def test_tiny_components_seeded():
    rng_before = torch.get_rng_state()
    a, b, c = _state(tiny_components(seed=0)), _state(tiny_components(seed=0)), _state(tiny_components(seed=1))
    assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's RNG is left alone
    for model in a:
        assert a[model].keys() == b[model].keys()
        assert all(torch.equal(a[model][k], b[model][k]) for k in a[model]), model
        assert not all(torch.equal(a[model][k], c[model][k]) for k in a[model]), model
        # Really random: some weight tensor is neither constant nor shared across seeds.
        assert any(v.numel() > 1 and v.float().std() > 0 for v in a[model].values())


def test_unknown_style_raises():
    with pytest.raises(ValueError, match="sd1.*sd2"):
        tiny_components("sdxl")
    with pytest.raises(ValueError, match="sdxl"):
        tiny_pipeline(style="sdxl")


# --------------------------------------------------------------------------------------------------
# Pipelines
# --------------------------------------------------------------------------------------------------


def _run(pipe, seed=0):
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator("cpu").manual_seed(seed)
    return pipe("a photo of a cat", num_inference_steps=2, height=32, width=32, output_type="np",
                generator=gen).images


@pytest.mark.parametrize("style", STYLES)
def test_stable_diffusion_pipeline_runs(style):
    pipe = StableDiffusionPipeline(**tiny_components(style), requires_safety_checker=False)
    assert pipe.vae_scale_factor == 2
    image = _run(pipe)
    assert image.shape == (1, 32, 32, 3)
    assert np.isfinite(image).all()
    assert image.std() > 0


class _SubPipeline(StableDiffusionPipeline):
    """Stands in for RealignDiffPipeline: tiny_pipeline must honour the class it is given."""


@pytest.mark.parametrize("style", STYLES)
def test_tiny_pipeline_save_dir_round_trip(style, tmp_path):
    direct = tiny_pipeline(_SubPipeline, style=style, seed=3)
    loaded = tiny_pipeline(_SubPipeline, style=style, seed=3, save_dir=tmp_path / "tiny")
    assert type(direct) is _SubPipeline and type(loaded) is _SubPipeline
    assert (tmp_path / "tiny" / "model_index.json").is_file()
    assert loaded.safety_checker is None
    assert loaded.scheduler.config.prediction_type == ("v_prediction" if style == "sd2" else "epsilon")
    assert loaded.tokenizer("a photo of a cat").input_ids == CAT_IDS
    np.testing.assert_allclose(_run(loaded), _run(direct), rtol=0, atol=1e-6)


def test_tiny_pipeline_kwargs_replace_components():
    sched = DDIMScheduler.from_config(tiny_components()["scheduler"].config, prediction_type="sample")
    pipe = tiny_pipeline(scheduler=sched)
    assert type(pipe) is StableDiffusionPipeline
    assert pipe.scheduler is sched


# --------------------------------------------------------------------------------------------------
# The package's public names; the loopback chat server
# --------------------------------------------------------------------------------------------------


def test_every_public_name_is_reexported_from_its_module():
    import importlib
    import pkgutil

    from realign_pipeline import testing

    modules = [importlib.import_module(f"realign_pipeline.testing.{info.name}")
               for info in pkgutil.iter_modules(testing.__path__)]
    assert {"stable_diffusion", "clip", "blip2", "grounding", "chat"} <= {m.__name__.rsplit(".", 1)[1] for m in modules}
    assert sorted(testing.__all__) == sorted(name for module in modules for name in module.__all__)
    for module in modules:
        for name in module.__all__:
            assert getattr(testing, name) is getattr(module, name), name


def _post(url: str, body: bytes, timeout: float = 5.0, **headers: str):
    """(status, parsed JSON body) of a POST to the server's chat completions route."""
    import json
    import urllib.error
    import urllib.request

    request = urllib.request.Request(f"{url}/chat/completions", data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _content(answer: dict) -> str:
    return answer["choices"][0]["message"]["content"]


def test_chat_server_script_then_and_repeat():
    from realign_pipeline.testing import ChatServer

    with ChatServer(["first", ("status", 503)], then=("json", {"x": 1})) as server:
        assert server.url.startswith("http://127.0.0.1:") and server.url.endswith("/v1")
        status, answer = _post(server.url, b'{"model": "m"}', Authorization="Bearer sk-1")
        assert status == 200 and _content(answer) == "first" and answer["model"] == "m"
        status, answer = _post(server.url, b"{}")
        assert status == 503 and "error" in answer
        assert _post(server.url, b"{}") == _post(server.url, b"{}") == (200, {"x": 1})  # `then`, every time
        assert server.requests[0] == {"model": "m"} and len(server.requests) == 4
        assert server.headers[0]["authorization"] == "Bearer sk-1" and server.headers[1]["Authorization"] is None
        server.reply("a", "b")  # without `then`: the last reply repeats
        assert [_content(_post(server.url, b"{}")[1]) for _ in range(3)] == ["a", "b", "b"]
        server.reset()
        assert server.requests == [] and _content(_post(server.url, b"not json")[1]) == "{}"
        assert server.requests == ["not json"]
    with pytest.raises(ValueError, match="kind"):
        ChatServer([("teapot", 418)])


def test_chat_server_handler_stall_reset_and_close():
    import http.client
    import socket
    import threading
    import time
    import urllib.error

    from realign_pipeline.testing import ChatServer

    server = ChatServer(["scripted"], handler=lambda body: "handled" if body.get("model") == "h" else None)
    with server:
        assert _content(_post(server.url, b'{"model": "h"}')[1]) == "handled"
        assert _content(_post(server.url, b'{"model": "other"}')[1]) == "scripted"
        server.reply(("stall", 30.0))
        with pytest.raises((TimeoutError, socket.timeout, urllib.error.URLError)):
            _post(server.url, b"{}", timeout=0.2)
        ended = threading.Event()

        def stalled_client():
            try:
                _post(server.url, b"{}", timeout=30)
            except (OSError, http.client.HTTPException):  # the connection closes without an answer
                ended.set()

        start = time.monotonic()
        threading.Thread(target=stalled_client, daemon=True).start()
        while len(server.requests) < 4:
            time.sleep(0.01)
        server.reset()  # ends the stall at once, not after 30 s
        assert ended.wait(5) and time.monotonic() - start < 5
        assert server.handler is None
    assert server.closed
    server.close()  # idempotent
    with pytest.raises(urllib.error.URLError):
        _post(server.url, b"{}", timeout=2)
    with pytest.raises(RuntimeError, match="closed"):
        server.reset()
