"""Evaluation configurations: every row of the paper's Table 1 as an :class:`EvalConfig`, and their pipelines.

A configuration names the model (a diffusers id or folder), an optional ReFL checkpoint (a LoRA folder / hub id,
or a fine-tuned UNet), whether the fine stage runs (``realign=True``: coarse pass, dense captions, fine pass),
the fine stage's attention settings, an optional Promptist prompt rewriter, and the sampling settings.
Configurations come from the built-in presets (:data:`PRESETS`) or from JSON files (:meth:`EvalConfig.from_json`)
and are turned into a ready pipeline by :func:`build_pipeline`.

    >>> from realign_pipeline.evaluation.configs import load_config
    >>> config = load_config("densediffusion")
    >>> config.unit_scores, config.pipeline_kwargs["self_attention_strength"]
    (True, 0.3)
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..captioner.build import DEFAULT_CAPTIONER_SETTINGS, build_captioner
from ..captioner.wrapper import CaptionerWrapper

__all__ = [
    "DEFAULT_CAPTIONER",
    "PIPELINES",
    "PRESETS",
    "SD15",
    "SDXL",
    "SHAPES_MODEL",
    "EvalConfig",
    "PromptistRewriter",
    "build_captioner",
    "build_pipeline",
    "check_checkpoint",
    "load_config",
    "model_family",
    "pipeline_class",
    "resolve_model",
]

SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SDXL = "stabilityai/stable-diffusion-xl-base-1.0"
PROMPTIST = "microsoft/Promptist"
#: The shipped shapes-world pipeline (``realign_pipeline/assets/shapes/pipeline``), resolved when a pipeline is
#: built (:func:`resolve_model`), so the presets exist even where the weights are not installed.
SHAPES_MODEL = "shapes:pipeline"
_SHAPES_PREFIX = "shapes:"
#: ``EvalConfig.pipeline``: RealignDiff's pipeline for the model (SD 1.x/2.x, or SDXL when the model's
#: ``model_index.json`` says so), RealignDiff's SDXL pipeline whatever the model says, or any diffusers pipeline.
PIPELINES = ("realign", "realign-xl", "auto")
#: The ``pipeline`` values that run RealignDiff (layouts, the fine stage, ``pipeline_kwargs``).
REALIGN_PIPELINES = ("realign", "realign-xl")
#: The dense captioner of the fine stage, as ``realigndiff generate`` builds it by default (the settings of
#: :func:`~realign_pipeline.captioner.build_captioner`, which builds it).
DEFAULT_CAPTIONER: dict[str, Any] = DEFAULT_CAPTIONER_SETTINGS
#: Pipeline call arguments a configuration may set (``RealignDiffPipeline.__call__``'s own arguments).
REALIGN_KWARGS = (
    "cross_attention_strength",
    "self_attention_strength",
    "modulation_fraction",
    "timestep_power",
    "size_weight",
    "suppress_unclaimed_tokens",
    "modulated_downsampling",
    "replace_phrase_embeddings",
    "strict_layout",
)


@dataclass
class EvalConfig:
    """One generation configuration (one row of Table 1).

    Args:
        name: the configuration's name (the manifest's ``config`` field and the report's row label).
        model: diffusers hub id or local folder of the pipeline, or ``"shapes:pipeline"`` (:data:`SHAPES_MODEL`,
            the shipped shapes-world pipeline).
        pipeline: ``"realign"`` (:class:`~realign_pipeline.RealignDiffPipeline` for Stable Diffusion 1.x/2.x, or
            :class:`~realign_pipeline.RealignDiffXLPipeline` when the model's ``model_index.json`` names an SDXL
            pipeline), ``"realign-xl"`` (:class:`~realign_pipeline.RealignDiffXLPipeline`) or ``"auto"``
            (``diffusers.DiffusionPipeline``: any pipeline; no fine stage).
        lora: a LoRA folder or hub id (e.g. a ReFL LoRA from ``train_refl.py --use_lora``).
        lora_scale: the LoRA's weight (``fuse_lora``-free: passed as ``cross_attention_kwargs={"scale": ...}``).
        unet: a fine-tuned UNet folder (``unet/config.json`` or ``config.json``), e.g. ReFL's full fine-tuning.
        realign: run the fine stage (coarse pass, dense captioner, fine pass with the captioned layouts).
        unit_scores: DenseDiffusion-style: every captioned region's score set to 1 (no Eq. 6 likelihoods).
        pipeline_kwargs: arguments of the pipeline call, e.g. ``cross_attention_strength``,
            ``self_attention_strength`` (only with ``pipeline="realign"`` or ``"realign-xl"``).
        captioner: the dense captioner's settings (keys of :data:`DEFAULT_CAPTIONER`); ``None`` uses the one
            saved with the model folder, else the defaults.
        promptist: a causal LM id or folder that rewrites every prompt first (``microsoft/Promptist``).
        promptist_tokenizer: its tokenizer (``None``: the model's own, else ``gpt2`` as Promptist's demo does).
        promptist_max_new_tokens, promptist_num_beams: the rewrite's generation settings (Promptist's demo: 75, 8).
        requires_checkpoint: the preset needs ``lora`` or ``unet`` (the ReFL rows).
        steps, guidance, height, width, negative_prompt, images_per_prompt: sampling settings (``None`` height /
            width: the model's own size).
        dtype: ``"float16"``, ``"bfloat16"``, ``"float32"`` or ``None`` (float16 on a GPU, float32 on the CPU).
        description: free text for the report.
    """

    name: str
    model: str = SD15
    pipeline: str = "realign"
    lora: str | None = None
    lora_scale: float | None = None
    unet: str | None = None
    realign: bool = False
    unit_scores: bool = False
    pipeline_kwargs: dict[str, Any] = field(default_factory=dict)
    captioner: dict[str, Any] | None = None
    promptist: str | None = None
    promptist_tokenizer: str | None = None
    promptist_max_new_tokens: int = 75
    promptist_num_beams: int = 8
    requires_checkpoint: bool = False
    steps: int = 50
    guidance: float = 7.5
    height: int | None = None
    width: int | None = None
    negative_prompt: str | None = None
    images_per_prompt: int = 1
    dtype: str | None = None
    description: str = ""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` with what to change when the settings cannot work together."""
        where = f"config {self.name!r}"
        if self.pipeline not in PIPELINES:
            raise ValueError(f"{where}: pipeline must be one of {list(PIPELINES)}, got {self.pipeline!r}.")
        if self.pipeline == "auto" and (self.realign or self.unit_scores or self.pipeline_kwargs):
            raise ValueError(
                f"{where}: realign, unit_scores and pipeline_kwargs need pipeline='realign' (or 'realign-xl') "
                "(a generic DiffusionPipeline has no layout-guided attention)."
            )
        if self.unit_scores and not self.realign:
            raise ValueError(f"{where}: unit_scores changes the captioned layouts, so it needs realign=true.")
        unknown = set(self.pipeline_kwargs) - set(REALIGN_KWARGS)
        if unknown:
            raise ValueError(f"{where}: unknown pipeline_kwargs {sorted(unknown)}; known: {list(REALIGN_KWARGS)}.")
        if self.captioner is not None:
            unknown = set(self.captioner) - set(DEFAULT_CAPTIONER)
            if unknown:
                raise ValueError(f"{where}: unknown captioner keys {sorted(unknown)}; known: {list(DEFAULT_CAPTIONER)}.")
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None and (int(value) <= 0 or int(value) % 8):
                raise ValueError(f"{where}: {name} must be a positive multiple of 8, got {value}.")
        if int(self.steps) < 1 or int(self.images_per_prompt) < 1:
            raise ValueError(f"{where}: steps and images_per_prompt must be at least 1.")
        if self.dtype not in (None, "float32", "float16", "bfloat16"):
            raise ValueError(f"{where}: dtype must be float32, float16, bfloat16 or null, got {self.dtype!r}.")

    # ------------------------------------------------------------------------------------------ (de)serialise
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvalConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown configuration keys {sorted(unknown)}; known: {sorted(known)}.")
        if "name" not in data:
            raise ValueError("a configuration needs a 'name'.")
        return cls(**data)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> EvalConfig:
        """A configuration from a JSON file (an object with :class:`EvalConfig`'s fields; ``name`` defaults to
        the file's stem). A ``"preset"`` key starts from that preset and overrides its fields."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except OSError as error:
            raise ValueError(f"cannot read the configuration file {path}: {error.strerror or error}") from None
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not JSON: {error}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object with the configuration's fields.")  # noqa: TRY004
        preset = data.pop("preset", None)
        if preset is not None:
            return load_config(preset).replace(**{"name": data.pop("name", path.stem), **data})
        data.setdefault("name", path.stem)
        return cls.from_dict(data)

    def to_json(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")

    def replace(self, **changes: Any) -> EvalConfig:
        """A copy with `changes` (validated); ``pipeline_kwargs`` / ``captioner`` dicts are merged, not replaced."""
        data = self.to_dict()
        for key in ("pipeline_kwargs", "captioner"):
            if isinstance(changes.get(key), dict) and data.get(key) is not None:
                changes[key] = {**data[key], **changes[key]}
        return EvalConfig.from_dict({**data, **changes})

    def call_kwargs(self) -> dict[str, Any]:
        """The pipeline call's settings (what the manifest records as ``settings``)."""
        kwargs: dict[str, Any] = {"num_inference_steps": int(self.steps), "guidance_scale": float(self.guidance)}
        if self.height is not None:
            kwargs["height"] = int(self.height)
        if self.width is not None:
            kwargs["width"] = int(self.width)
        if self.negative_prompt:
            kwargs["negative_prompt"] = self.negative_prompt
        if self.lora and self.lora_scale is not None:
            kwargs["cross_attention_kwargs"] = {"scale": float(self.lora_scale)}
        if self.pipeline in REALIGN_PIPELINES:
            kwargs.update(self.pipeline_kwargs)
            if self.realign:
                kwargs["realign"] = True
        return kwargs


def _preset(name: str, description: str, **fields: Any) -> EvalConfig:
    return EvalConfig(name=name, description=description, **fields)


#: The shapes-world sampling settings: the shipped 32x32 pipeline (fp16 weights, loaded in float32), its saved
#: DDIM scheduler (v-prediction) with 20 steps and guidance 4, as its training validated it.
_SHAPES: dict[str, Any] = {"model": SHAPES_MODEL, "dtype": "float32", "height": 32, "width": 32, "steps": 20,
                           "guidance": 4.0}


#: The built-in configurations: the rows of Table 1 (``sd15``, ``imagereward-refl``, ``densediffusion``,
#: ``promptist``, ``sdxl``, ``refl+realign`` = RealignDiff), the ablation's parts (``refl``, ``realign``), SDXL
#: with the fine stage (``sdxl+realign``) and the shapes-world ablation (``shapes``, ``shapes-realign``,
#: ``shapes-refl``, ``shapes-refl+realign``).
PRESETS: dict[str, EvalConfig] = {
    preset.name: preset
    for preset in (
        _preset("sd15", "Stable Diffusion v1.5"),
        _preset("refl", "coarse stage only: SD v1.5 + a ReFL checkpoint (--lora or --unet)", requires_checkpoint=True),
        _preset("realign", "fine stage only: SD v1.5 + dense captions + Eq. 8 attention modulation", realign=True),
        _preset(
            "refl+realign",
            "RealignDiff: the ReFL checkpoint (coarse) + the fine stage",
            realign=True,
            requires_checkpoint=True,
        ),
        _preset(
            "imagereward-refl",
            "ImageReward-ReFL: SD v1.5 + a checkpoint of train_refl.py --reward imagereward (--lora or --unet)",
            requires_checkpoint=True,
        ),
        _preset(
            "densediffusion",
            "DenseDiffusion-style: the fine stage with self- and cross-attention modulation and unit scores",
            realign=True,
            unit_scores=True,
            pipeline_kwargs={"cross_attention_strength": 1.0, "self_attention_strength": 0.3},
        ),
        _preset("promptist", "Promptist: the prompt rewritten by microsoft/Promptist, then SD v1.5", promptist=PROMPTIST),
        _preset("sdxl", "SD-XL base 1.0 through RealignDiffXLPipeline without a layout (StableDiffusionXLPipeline's "
                "images); any diffusers pipeline id works with pipeline='auto'", model=SDXL, pipeline="realign-xl"),
        _preset("sdxl+realign", "SD-XL base 1.0 + the fine stage: dense captions + Eq. 8 attention modulation",
                model=SDXL, pipeline="realign-xl", realign=True),
        _preset("shapes", "shapes world: the shipped tiny pipeline, coarse stage only", **_SHAPES),
        _preset("shapes-realign", "shapes world + the fine stage with the shapes dense captioner saved with the model",
                realign=True, **_SHAPES),
        _preset("shapes-refl", "shapes world + a ReFL checkpoint of the shapes UNet (--lora or --unet)",
                requires_checkpoint=True, **_SHAPES),
        _preset("shapes-refl+realign", "shapes world: the ReFL checkpoint (coarse) + the fine stage",
                realign=True, requires_checkpoint=True, **_SHAPES),
    )
}


def load_config(name_or_path: str | os.PathLike | EvalConfig) -> EvalConfig:
    """A preset by name (see :data:`PRESETS`) or a JSON file's configuration."""
    if isinstance(name_or_path, EvalConfig):
        return name_or_path
    key = os.fspath(name_or_path)
    if key in PRESETS:
        return PRESETS[key].replace()
    if key.endswith(".json") or os.sep in key or "/" in key or Path(key).is_file():
        if not Path(key).is_file():
            raise ValueError(f"configuration file {key!r} does not exist; presets: {', '.join(PRESETS)}.")
        return EvalConfig.from_json(key)
    raise ValueError(f"unknown configuration {key!r}; presets: {', '.join(PRESETS)}, or a path to a JSON file.")


# ---------------------------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------------------------
def _dtype(config: EvalConfig, device: str, dtype: Any):
    import torch

    if dtype is not None:
        return getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if config.dtype is not None:
        return getattr(torch, config.dtype)
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32


def _load_unet(path: str, dtype):
    from diffusers import UNet2DConditionModel

    local = Path(path)
    if local.exists() and not local.is_dir():
        raise ValueError(f"unet {path}: expected a folder with a UNet (config.json + weights), got a file.")
    if local.is_dir():
        subfolder = "unet" if (local / "unet" / "config.json").is_file() else None
        if subfolder is None and not (local / "config.json").is_file():
            raise ValueError(f"unet {path}: no config.json there nor in unet/; point at a saved UNet or pipeline folder.")
        return UNet2DConditionModel.from_pretrained(path, subfolder=subfolder, dtype=dtype)
    return UNet2DConditionModel.from_pretrained(path, subfolder="unet", dtype=dtype)


def check_checkpoint(config: EvalConfig) -> None:
    """Raise ``ValueError`` when a ReFL preset has no checkpoint or a local LoRA / UNet path does not exist."""
    if config.requires_checkpoint and not (config.lora or config.unet):
        raise ValueError(
            f"config {config.name!r} needs a ReFL checkpoint: set lora (a LoRA folder or hub id) or unet (a fine-tuned "
            "UNet or pipeline folder), e.g. --lora outputs/refl-lora or --unet outputs/refl-full."
        )
    for key in ("lora", "unet"):
        value = getattr(config, key)
        looks_local = value and (value.startswith((".", "/", "~")) or value.count("/") > 1 or "\\" in value)
        if looks_local and not Path(value).expanduser().exists():
            raise ValueError(f"{key} {value}: no such file or folder (a hub id is written owner/name).")


def resolve_model(model: str) -> str:
    """The folder or hub id to load for ``model``: ``"shapes:<name>"`` becomes the shipped shapes-world folder.

    Raises:
        FileNotFoundError: the shapes-world weights are not installed, or a local folder holds no pipeline
            (no ``model_index.json``).
    """
    model = str(model)
    if model.startswith(_SHAPES_PREFIX):
        from ..shapes.pretrained import shapes_model_path

        model = str(shapes_model_path(model.removeprefix(_SHAPES_PREFIX) or "pipeline"))
    local = Path(model).expanduser()
    if local.is_dir() and not (local / "model_index.json").is_file():
        raise FileNotFoundError(
            f"model {model}: the folder holds no diffusers pipeline (no model_index.json); for the shapes presets, "
            "install the shapes-world weights (realign_pipeline/assets/shapes/pipeline, see docs/shapes.md) or set "
            "model= to a saved pipeline folder."
        )
    return model


def model_family(model: str) -> tuple[str | None, str | None]:
    """``("xl" | "sd" | None, the _class_name)`` of a model folder or hub id, from its ``model_index.json``.

    ``"xl"``: ``StableDiffusionXLPipeline`` or ``RealignDiffXLPipeline``; ``"sd"``: ``StableDiffusionPipeline`` or
    ``RealignDiffPipeline``; ``None``: another pipeline, or no ``model_index.json`` to read (a hub id neither
    cached nor reachable; nothing but that file is fetched).
    """
    from ..training.sdxl import SDXL_PIPELINE_CLASSES, read_model_index

    index = read_model_index(model) or {}
    name = index.get("_class_name")
    if name in SDXL_PIPELINE_CLASSES:
        return "xl", name
    if name in ("StableDiffusionPipeline", "RealignDiffPipeline"):
        return "sd", name
    return None, name


def pipeline_class(config: EvalConfig, model: str | None = None) -> type:
    """The class :func:`build_pipeline` loads `config`'s model with.

    ``"realign-xl"``: :class:`~realign_pipeline.RealignDiffXLPipeline`. ``"realign"``:
    :class:`~realign_pipeline.RealignDiffPipeline`, or the XL one when the model's ``model_index.json`` (a local
    folder, or the Hugging Face cache for a hub id) names ``StableDiffusionXLPipeline`` or
    ``RealignDiffXLPipeline`` (:func:`model_family`). ``"auto"``: ``diffusers.DiffusionPipeline``.
    """
    if config.pipeline == "auto":
        from diffusers import DiffusionPipeline

        return DiffusionPipeline
    if config.pipeline == "realign-xl" or model_family(model or resolve_model(config.model))[0] == "xl":
        from ..pipeline_xl import RealignDiffXLPipeline

        return RealignDiffXLPipeline
    from ..pipeline import RealignDiffPipeline

    return RealignDiffPipeline


def build_pipeline(config: EvalConfig | str, device: str | None = None, dtype: Any = None, captioner: Any = None):
    """The pipeline of `config` on `device`, ready to call with :meth:`EvalConfig.call_kwargs`.

    Loads the model with :func:`pipeline_class`, the ReFL checkpoint (``unet`` replaces the UNet, ``lora`` is
    loaded with ``load_lora_weights``), and for ``realign=True`` the dense captioner (`captioner` if given, else the one saved
    with the model, else :func:`build_captioner` with ``config.captioner``), wrapped by
    :class:`~realign_pipeline.captioner.CaptionerWrapper` with ``score=1`` when ``unit_scores``. A :class:`PromptistRewriter` is attached as
    ``pipe.prompt_rewriter`` when ``config.promptist`` is set (``None`` otherwise).

    A shapes-world model (``"shapes:pipeline"``) without a saved captioner gets
    :func:`~realign_pipeline.shapes.perception.shapes_dense_captioner`.

    Raises:
        ValueError: a setting that cannot work (a ReFL preset without a checkpoint, a missing LoRA folder).
        FileNotFoundError: the shapes-world weights are not installed, or a local model folder is not a pipeline.
        OSError: weights that cannot be loaded (not cached and offline, a broken folder).
    """
    import torch

    config = load_config(config)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = _dtype(config, device, dtype)
    check_checkpoint(config)
    model = resolve_model(config.model)
    load_kwargs: dict[str, Any] = {"dtype": torch_dtype}
    if config.unet:
        load_kwargs["unet"] = _load_unet(config.unet, torch_dtype)
    if config.pipeline in REALIGN_PIPELINES:
        cls = pipeline_class(config, model)
        if cls.__name__ == "RealignDiffPipeline":
            load_kwargs.update(safety_checker=None, requires_safety_checker=False)
        if captioner is not None:
            load_kwargs["dense_captioner"] = captioner
        pipe = cls.from_pretrained(model, **load_kwargs)
    else:
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(model, **load_kwargs)
        if getattr(pipe, "safety_checker", None) is not None:
            pipe.safety_checker = None
    if config.lora:
        if not hasattr(pipe, "load_lora_weights"):
            raise ValueError(f"config {config.name!r}: {type(pipe).__name__} cannot load LoRA weights.")
        pipe.load_lora_weights(config.lora)
    pipe.to(device)
    if config.realign:
        if pipe.dense_captioner is None and config.captioner is None and config.model.startswith(_SHAPES_PREFIX):
            from ..shapes.perception import shapes_dense_captioner

            pipe.dense_captioner = shapes_dense_captioner()
        elif pipe.dense_captioner is None or config.captioner is not None:
            pipe.dense_captioner = build_captioner(config.captioner, device=device)
        if config.unit_scores:
            pipe.dense_captioner = CaptionerWrapper(pipe.dense_captioner, score=1.0)
    pipe.prompt_rewriter = (
        PromptistRewriter(
            config.promptist, tokenizer=config.promptist_tokenizer, device=device,
            max_new_tokens=config.promptist_max_new_tokens, num_beams=config.promptist_num_beams,
        )
        if config.promptist
        else None
    )
    return pipe


# ---------------------------------------------------------------------------------------------------------
# Promptist
# ---------------------------------------------------------------------------------------------------------
class PromptistRewriter:
    """Rewrites prompts with a causal LM as Promptist does (Hao et al., 2022): ``"<prompt> Rephrase:"``, beam
    search, the text after the marker.

    Args:
        model: hub id or folder of the LM (``microsoft/Promptist``).
        tokenizer: hub id or folder of its tokenizer; ``None`` tries the model's own and falls back to ``gpt2``
            (Promptist's demo loads the ``gpt2`` tokenizer).
        max_new_tokens, num_beams, length_penalty: generation settings of Promptist's demo (75, 8, -1.0).
    """

    MARKER = " Rephrase:"

    def __init__(
        self,
        model: str = PROMPTIST,
        tokenizer: str | None = None,
        device: str | None = None,
        max_new_tokens: int = 75,
        num_beams: int = 8,
        length_penalty: float = -1.0,
    ):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model_name = str(model)
        self.model = AutoModelForCausalLM.from_pretrained(self.model_name).eval()
        if device is not None:
            self.model.to(device)
        if tokenizer is None:
            try:
                self.tokenizer = AutoTokenizer.from_pretrained(self.model_name)
            except (OSError, ValueError):
                self.tokenizer = AutoTokenizer.from_pretrained("gpt2")
        else:
            self.tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "left"
        self.max_new_tokens = int(max_new_tokens)
        self.num_beams = int(num_beams)
        self.length_penalty = float(length_penalty)

    def __call__(self, prompts: str | Sequence[str]) -> list[str]:
        """The rewritten prompts, one per prompt (the original where the LM writes nothing)."""
        import torch

        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        rewritten = []
        for prompt in prompts:  # one at a time: beam search with left padding changes the result
            inputs = self.tokenizer(prompt.strip() + self.MARKER, return_tensors="pt").to(self.model.device)
            eos = self.tokenizer.eos_token_id
            with torch.no_grad():
                output = self.model.generate(
                    **inputs, do_sample=False, max_new_tokens=self.max_new_tokens, num_beams=self.num_beams,
                    eos_token_id=eos, pad_token_id=eos,
                    length_penalty=self.length_penalty if self.num_beams > 1 else 1.0,
                )
            text = self.tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
            rewritten.append(text or prompt)
        return rewritten
