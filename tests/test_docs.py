"""The docs cannot rot: every fenced ```python block of README.md and docs/*.md runs here, offline.

Blocks written for real models run on tiny random ones: hub ids the docs use are redirected to tiny models
saved in a temporary folder (``RealignDiffPipeline.from_pretrained``, ``load_lora_weights``,
``RealignDiffXLPipeline`` / ``StableDiffusionXLImg2ImgPipeline.from_pretrained`` without their ``variant``,
``ClipScorer`` / ``ClipTagger``, ``GroundingDinoSamGrounder``, ``CaptionReward``), and the block's source is run with
``"cuda"`` read as ``"cpu"`` and ``torch.float16`` as ``torch.float32``. The pipelines the docs call
(``RealignDiffPipeline``, ``RealignDiffXLPipeline``, ``StableDiffusionXLImg2ImgPipeline``) denoise at most
``DOC_STEPS`` steps (the docs' 20-50 steps on tiny random models drew nothing more and were most of this test's
time); every line still runs. The blocks of one file run in order
in one namespace (a later block may use the ``pipe`` of an earlier one), which starts with the names the prose
around the fragments stands for (``image``, ``images``, ``prompt``, ``tagger``, ``llm``, ``grounder``, ``pipe``
...; see ``PRELUDE_NAMES``), in a temporary working directory.

A block that cannot run here is marked in the markdown, on the line right before its fence, with
``<!-- docs-test: skip (the reason) -->``; a marker without a reason fails the test. ``realigndiff ...``
command lines in the other blocks are checked by parsing them with the CLI's own parser (nothing runs).
"""

from __future__ import annotations

import functools
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```([\w+-]*)[^\n]*\n(.*?)^```[ \t]*$", re.DOTALL | re.MULTILINE)
SKIP = re.compile(r"<!--\s*docs-test:\s*skip\b(.*?)-->")
SKIP_WITH_REASON = re.compile(r"<!--\s*docs-test:\s*skip\s*\(\s*\S[^)]*\)\s*-->")
PROMPT = "a red book and a yellow vase"
#: The most denoising steps a docs block's pipeline call takes here (its own number when smaller).
DOC_STEPS = 4
PRELUDE_NAMES = ("torch", "image", "images", "pil_images", "prompt", "prompts", "texts", "phrases",
                 "phrases_per_image", "pixels", "x", "batches", "tagger", "llm", "grounder", "pipe")


def blocks(path: Path):
    """(line, language, code, skip reason or None) of every fenced block of ``path``."""
    text = path.read_text()
    for match in FENCE.finditer(text):
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        skip = SKIP.search(before)
        reason = skip.group(1).strip(" ()") if skip else None
        yield text[: match.start()].count("\n") + 1, match.group(1).lower(), match.group(2), reason


def python_files():
    return [p for p in DOC_FILES if any(lang == "python" for _, lang, _, _ in blocks(p))]


# --- tiny stand-ins for the hub ids the docs use ---------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory, tiny_folders, tiny_realign_sd_dir, tiny_sdxl_dir, tiny_clip_dir,
                tiny_grounding_dino_dir, tiny_sam_dir, tiny_blip2_itm_dir, save_random_lora):
    from realign_pipeline import RealignDiffPipeline
    from realign_pipeline.testing import tiny_pipeline

    sd, lora = str(tiny_realign_sd_dir), str(tmp_path_factory.mktemp("tiny-hub") / "lora")
    save_random_lora(tiny_pipeline(RealignDiffPipeline), lora)  # the weights of `sd`, built in memory
    words = ["a", "red", "yellow", "book", "vase", "and", "the", "on"]
    models = {
        "stable-diffusion-v1-5/stable-diffusion-v1-5": sd,
        "realigndiff-refl": sd,  # training.md: a fully fine-tuned output folder is a pipeline
        "stabilityai/stable-diffusion-xl-base-1.0": str(tiny_sdxl_dir),
        "stabilityai/stable-diffusion-xl-refiner-1.0": str(tiny_sdxl_dir),  # the base's modules stand in
        "openai/clip-vit-large-patch14": str(tiny_clip_dir),
        "IDEA-Research/grounding-dino-tiny": str(tiny_grounding_dino_dir),
        "facebook/sam-vit-base": str(tiny_sam_dir),
        "Salesforce/blip2-opt-2.7b": str(tiny_folders.blip2_captioner(words=words)),
        "Salesforce/blip2-itm-vit-g": str(tiny_blip2_itm_dir),
    }
    return {"models": models, "loras": {"realigndiff-refl": lora}}


def _mapping(table: dict[str, str], func):
    def swap(value):
        return table.get(value, value) if isinstance(value, str) else value

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        return func(*map(swap, args), **{key: swap(value) for key, value in kwargs.items()})

    return wrapper


def _without_variant(func):
    """The tiny folders have no fp16 variant: load their only weights."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        kwargs.pop("variant", None)
        return func(*args, **kwargs)

    return wrapper


def _few_steps(call):
    """``__call__`` with ``num_inference_steps`` (a keyword, or the default) at most :data:`DOC_STEPS`."""

    @functools.wraps(call)
    def wrapper(self, *args, **kwargs):
        kwargs["num_inference_steps"] = min(kwargs.get("num_inference_steps") or DOC_STEPS, DOC_STEPS)
        return call(self, *args, **kwargs)

    return wrapper


@pytest.fixture()
def redirected(tiny_models, monkeypatch, tmp_path):
    from diffusers import StableDiffusionXLImg2ImgPipeline

    from realign_pipeline import RealignDiffPipeline, RealignDiffXLPipeline
    from realign_pipeline.captioner import ClipTagger, GroundingDinoSamGrounder
    from realign_pipeline.rewards.caption import CaptionReward
    from realign_pipeline.scoring import ClipScorer

    models = tiny_models["models"]
    for cls, name in [(RealignDiffPipeline, "from_pretrained"), (ClipScorer, "from_pretrained")]:
        bound = getattr(cls, name)
        monkeypatch.setattr(cls, name, classmethod(_mapping(models, bound.__func__)))
    for cls in (RealignDiffXLPipeline, StableDiffusionXLImg2ImgPipeline):
        loader = _without_variant(_mapping(models, cls.from_pretrained.__func__))
        monkeypatch.setattr(cls, "from_pretrained", classmethod(loader))
    for cls in (RealignDiffPipeline, RealignDiffXLPipeline, StableDiffusionXLImg2ImgPipeline):
        monkeypatch.setattr(cls, "__call__", _few_steps(cls.__call__))
    for cls in (ClipTagger, GroundingDinoSamGrounder, CaptionReward):
        monkeypatch.setattr(cls, "__init__", _mapping(models, cls.__init__))
    monkeypatch.setattr(RealignDiffPipeline, "load_lora_weights",
                        _mapping(tiny_models["loras"], RealignDiffPipeline.load_lora_weights))
    for key in ("OPENAI_API_KEY", "OPENAI_BASE_URL"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_prompts.csv").write_text("prompt\na red book and a yellow vase\na green bench\n")
    return tiny_models


def prelude(models: dict[str, str]) -> dict:
    """The names the docs' fragments take from their prose, built on the tiny models."""
    from realign_pipeline import RealignDiffPipeline
    from realign_pipeline.captioner import ClipTagger, DenseCaptioner, GroundingDinoSamGrounder, RuleBasedLLM

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    tagger = ClipTagger(models["openai/clip-vit-large-patch14"], tag_list=["book", "vase"], thresholds=0.0)
    llm = RuleBasedLLM()
    grounder = GroundingDinoSamGrounder(models["IDEA-Research/grounding-dino-tiny"], models["facebook/sam-vit-base"],
                                        box_threshold=0.0, text_threshold=0.0)
    pipe = RealignDiffPipeline.from_pretrained(models["stable-diffusion-v1-5/stable-diffusion-v1-5"],
                                               dense_captioner=DenseCaptioner(tagger, llm, grounder))
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    names = {
        "torch": torch, "image": image, "images": [image, image], "pil_images": [image, image],
        "prompt": PROMPT, "prompts": [PROMPT, "a green bench"], "texts": [PROMPT, "a green bench"],
        "phrases": ["red book", "yellow vase"], "phrases_per_image": [["red book"], ["yellow vase"]],
        "pixels": pixels, "x": pixels, "batches": [([image, image], [PROMPT, "a green bench"])], "tagger": tagger, "llm": llm, "grounder": grounder, "pipe": pipe,
    }
    assert set(names) == set(PRELUDE_NAMES)
    return names


def on_cpu(code: str) -> str:
    return code.replace('"cuda"', '"cpu"').replace("torch.float16", "torch.float32")


@pytest.mark.parametrize("path", python_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_python_blocks_run(path, redirected):
    namespace = prelude(redirected["models"])
    ran = 0
    for line, lang, code, reason in blocks(path):
        if lang != "python" or reason is not None:
            continue
        with _quiet():
            try:
                exec(compile(on_cpu(code), f"{path.name}:{line}", "exec"), namespace)  # noqa: S102 (the docs themselves)
            except Exception as error:
                raise AssertionError(f"{path.relative_to(ROOT)} block at line {line} failed: {error!r}") from error
        ran += 1
    assert ran or all(reason for _, lang, _, reason in blocks(path) if lang == "python")


class _quiet:
    def __enter__(self):
        from diffusers.utils import logging

        self._diffusers = logging.is_progress_bar_enabled()
        logging.disable_progress_bar()

    def __exit__(self, *exc):
        from diffusers.utils import logging

        if self._diffusers:
            logging.enable_progress_bar()


def test_every_skipped_block_says_why():
    markers = 0
    for path in DOC_FILES:
        text = path.read_text()
        for match in SKIP.finditer(text):
            markers += 1
            where = f"{path.relative_to(ROOT)}:{text[: match.start()].count(chr(10)) + 1}"
            assert SKIP_WITH_REASON.fullmatch(match.group(0)), f"{where}: a skip marker needs a (reason)"
            following = text[match.end():].lstrip(" \t")
            assert following.startswith("\n```python"), f"{where}: the marker must sit right before a python fence"
    skipped = [(p.name, line) for p in DOC_FILES for line, lang, _, reason in blocks(p) if lang == "python" and reason]
    assert len(skipped) == markers


def realigndiff_commands():
    for path in DOC_FILES:
        for line, lang, code, _ in blocks(path):
            if lang not in ("", "bash", "sh", "shell", "console"):
                continue
            for command in code.replace("\\\n", " ").splitlines():
                command = command.strip().removeprefix("$ ")
                if not command.startswith("realigndiff "):
                    continue
                words = shlex.split(command, comments=True)
                if words[:1] == ["realigndiff"]:
                    yield pytest.param(words[1:], id=f"{path.name}:{line}:{' '.join(words[1:3])}")


@pytest.mark.parametrize("argv", list(realigndiff_commands()))
def test_realigndiff_command_lines_parse(argv):
    from realign_pipeline.cli import build_parser

    build_parser().parse_args(argv)  # argparse exits (SystemExit) on an unknown flag or a bad value
