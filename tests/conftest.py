"""Fixtures shared by the test modules: tiny random models saved to folders, and a loopback chat server.

Model folders are built by :mod:`realign_pipeline.testing` the first time a test asks for one, once per test
session (under ``make test``, once per pytest-xdist worker), and tests load them with ``from_pretrained``, so
every test gets its own fresh objects. Tests must not write into these folders: at the end of the session each
one is checked to be unchanged (its files, their sizes and modification times).

- ``tiny_folders``: the builder behind them, for other variants (``tiny_folders.clip(seed=1)``,
  ``tiny_folders.blip2_captioner(words=[...])``, ``tiny_folders.stable_diffusion("sd2")``);
- ``tiny_sd_dir`` (a ``StableDiffusionPipeline`` folder, SD 1.x style, seed 0), ``tiny_realign_sd_dir`` (the
  same weights saved as a ``RealignDiffPipeline``), ``tiny_sdxl_dir`` (a ``StableDiffusionXLPipeline`` folder,
  seed 0), ``tiny_clip_dir``, ``tiny_blip2_itm_dir``, ``tiny_grounding_dino_dir``, ``tiny_sam_dir``: the default
  folders, as ``pathlib.Path``;
- ``chat_server``: a :class:`realign_pipeline.testing.ChatServer` shared by the session and reset for each
  test (no script: it answers ``"{}"``; no recorded requests). A test that closes a server starts its own.

The slowest files (:data:`SLOW_FILES`) are collected first, each file's tests in their own order: ``make test``
(two workers, ``--dist loadfile --no-loadscope-reorder``) hands whole files to the workers in collection order,
so the long files start at once and the many short ones even out the end.

After collection and after each test file, the garbage is collected and every object still alive is frozen
(``gc.freeze``): most of a test process's objects are the imported libraries' (torch, diffusers, transformers,
~0.4 million), and without this every full collection, and every ``gc.collect()`` the code under test makes
(``run_evaluation`` makes one per configuration), walked them all again: about 0.25-0.5 s each. Frozen objects
are still freed by reference counting; only a reference cycle among them is never collected. The youngest
generation is collected every 20,000 allocations instead of 700 (the tests allocate many short-lived objects:
about 15,000 collections for 80 tests otherwise).
"""

from __future__ import annotations

import gc
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

#: The test files that take longest, slowest first (CPU seconds of a single-worker run on the shared 2-core
#: machine, ``pytest -p no:xdist --durations=0``: about 5-35 s each, the other files under 5 s). A file not
#: named here keeps its place after them; a name without a file is ignored.
SLOW_FILES = (
    "test_train_refl.py",
    "test_shapes_models.py",
    "test_shapes_experiment.py",
    "test_docs.py",
    "test_realign.py",
    "test_eval_generate.py",
    "test_pipeline.py",
    "test_bench_training_cost.py",
    "test_cli_output.py",
    "test_shapes_coarse_stage.py",
    "test_pipeline_xl.py",
    "test_examples.py",
    "test_cli.py",
    "test_train_draft.py",
    "test_train_refl_xl.py",
    "test_shapes_fine_stage_rates.py",
)


def pytest_collection_modifyitems(config, items) -> None:
    """The files of :data:`SLOW_FILES` first, slowest first; the order of the tests within a file is kept."""
    rank = {name: index for index, name in enumerate(SLOW_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # a stable sort


def _freeze_survivors() -> None:
    gc.collect()
    gc.freeze()


def pytest_configure(config) -> None:
    gc.set_threshold(20_000, 10, 10)


def pytest_collection_finish(session) -> None:
    _freeze_survivors()  # the test modules' imports


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item, nextitem):
    yield
    if nextitem is None or nextitem.path != item.path:  # a file done, its module fixtures torn down
        _freeze_survivors()


class TinyModelFolders:
    """Tiny random models saved under ``root``, each built on first use and then reused."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._folders: dict[str, Path] = {}
        self._fingerprints: dict[Path, dict[str, tuple[int, int]]] = {}

    def _folder(self, name: str, build: Callable[[Path], object]) -> Path:
        if name not in self._folders:
            folder = self.root / name
            build(folder)
            self._folders[name] = folder
            self._fingerprints[folder] = _fingerprint(folder)
        return self._folders[name]

    def stable_diffusion(self, style: str = "sd1", pipeline: str = "StableDiffusionPipeline") -> Path:
        """``testing.tiny_pipeline`` (seed 0) saved as ``pipeline`` (``"StableDiffusionPipeline"`` or
        ``"RealignDiffPipeline"``: the same files but for the class name in ``model_index.json``)."""

        def build(folder: Path) -> None:
            from diffusers import StableDiffusionPipeline

            from realign_pipeline import RealignDiffPipeline
            from realign_pipeline.testing import tiny_pipeline

            classes = {cls.__name__: cls for cls in (StableDiffusionPipeline, RealignDiffPipeline)}
            tiny_pipeline(classes[pipeline], style=style).save_pretrained(folder)

        return self._folder(f"sd-{style}-{pipeline}", build)

    def stable_diffusion_xl(self) -> Path:
        """``testing.tiny_sdxl_pipeline`` (seed 0) saved as a plain ``StableDiffusionXLPipeline``."""

        def build(folder: Path) -> None:
            from diffusers import StableDiffusionXLPipeline

            from realign_pipeline.testing import tiny_sdxl_pipeline

            tiny_sdxl_pipeline(StableDiffusionXLPipeline).save_pretrained(folder)

        return self._folder("sdxl", build)

    def clip(self, seed: int = 0) -> Path:
        from realign_pipeline.testing import tiny_clip

        return self._folder(f"clip-{seed}", lambda folder: tiny_clip(folder, seed=seed))

    def blip2_captioner(self, words: list[str] | None = None) -> Path:
        from realign_pipeline.testing import tiny_blip2_captioner

        name = "blip2-captioner" if words is None else "blip2-captioner-" + "-".join(words)
        return self._folder(name, lambda folder: tiny_blip2_captioner(folder, words=words))

    def blip2_itm(self) -> Path:
        from realign_pipeline.testing import tiny_blip2_itm

        return self._folder("blip2-itm", tiny_blip2_itm)

    def grounding_dino(self) -> Path:
        from realign_pipeline.testing import tiny_grounding_dino

        return self._folder("grounding-dino", tiny_grounding_dino)

    def sam(self) -> Path:
        from realign_pipeline.testing import tiny_sam

        return self._folder("sam", tiny_sam)

    def changed(self) -> list[str]:
        """The folders whose files differ from what was built (a test wrote into a shared folder)."""
        return [str(folder) for folder, before in self._fingerprints.items() if _fingerprint(folder) != before]


def _fingerprint(folder: Path) -> dict[str, tuple[int, int]]:
    files = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            stat = path.stat()
            files[os.fspath(path.relative_to(folder))] = (stat.st_size, stat.st_mtime_ns)
    return files


@pytest.fixture(scope="session")
def tiny_folders(tmp_path_factory) -> Iterator[TinyModelFolders]:
    folders = TinyModelFolders(tmp_path_factory.mktemp("tiny-models"))
    yield folders
    changed = folders.changed()
    assert not changed, f"a test wrote into the shared tiny model folders {changed}; copy a folder before changing it"


@pytest.fixture(scope="session")
def tiny_sd_dir(tiny_folders) -> Path:
    return tiny_folders.stable_diffusion()


@pytest.fixture(scope="session")
def tiny_realign_sd_dir(tiny_folders) -> Path:
    return tiny_folders.stable_diffusion(pipeline="RealignDiffPipeline")


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tiny_folders) -> Path:
    return tiny_folders.stable_diffusion_xl()


@pytest.fixture(scope="session")
def tiny_clip_dir(tiny_folders) -> Path:
    return tiny_folders.clip()


@pytest.fixture(scope="session")
def tiny_blip2_itm_dir(tiny_folders) -> Path:
    return tiny_folders.blip2_itm()


@pytest.fixture(scope="session")
def tiny_grounding_dino_dir(tiny_folders) -> Path:
    return tiny_folders.grounding_dino()


@pytest.fixture(scope="session")
def tiny_sam_dir(tiny_folders) -> Path:
    return tiny_folders.sam()


@pytest.fixture(scope="session")
def _chat_server_session():
    from realign_pipeline.testing import ChatServer

    with ChatServer() as server:
        yield server


@pytest.fixture()
def chat_server(_chat_server_session):
    yield _chat_server_session.reset()
    _chat_server_session.reset()  # ends the replies a test left stalled


@pytest.fixture()
def fresh_accelerate_state() -> Iterator[None]:
    """accelerate keeps one process-wide state; a test that runs ``train_refl.main`` in this process with other
    settings needs it reset before and after (``pytestmark = pytest.mark.usefixtures(...)`` in those modules)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="session")
def save_random_lora() -> Callable[..., str]:
    """``save(pipeline, folder) -> folder``: the training LoRA (``realign_pipeline.training.lora``, rank 4) on a
    copy of `pipeline`'s UNet, its ``lora_B`` drawn from N(0, 0.5^2) (peft starts it at zero, which would make
    the adapter a no-op), saved with the pipeline class's ``save_lora_weights`` for ``load_lora_weights``."""

    def save(pipeline, folder) -> str:
        import copy

        import torch
        from peft.utils import get_peft_model_state_dict

        from realign_pipeline.training.lora import unet_lora_config

        unet = copy.deepcopy(pipeline.unet)
        unet.add_adapter(unet_lora_config(4))
        with torch.no_grad():
            for name, parameter in unet.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(std=0.5, generator=torch.Generator().manual_seed(0))
        type(pipeline).save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(unet))
        return str(folder)

    return save
