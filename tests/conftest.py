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
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest


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
