"""Shared glue for the shapes-world training scripts: seeded data, checkpoint/resume, logging.

Every script saves a checkpoint (model, optimizer, step, RNG state) every ``--checkpointing_steps`` steps
and resumes from the latest one on restart, so a session that ends mid-run loses at most one interval.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from realign_pipeline.shapes import triples, world


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--output_dir", required=True, help="where checkpoints, logs and the final model go")
    parser.add_argument("--max_train_steps", type=int, default=3000)
    parser.add_argument("--train_batch_size", type=int, default=64)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--resolution", type=int, default=None, help="image side; default: the scenes' (32 or 48)")
    parser.add_argument(
        "--scenes", choices=("pairs", "triples"), default="pairs",
        help="pairs: the world of one or two objects at 32 px; triples: up to three objects at 48 px",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpointing_steps", type=int, default=500)
    parser.add_argument("--log_steps", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (the dev machine has 2 cores)")
    return parser


def setup(args: argparse.Namespace) -> Path:
    torch.set_num_threads(args.threads)
    if args.resolution is None:
        args.resolution = triples.RESOLUTION if args.scenes == "triples" else 32
    out = Path(args.output_dir)
    (out / "checkpoint").mkdir(parents=True, exist_ok=True)
    return out


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


class Checkpointer:
    """Save/restore `modules` + optimizer + data RNG under ``<out>/checkpoint/state.pt`` (atomic rename)."""

    def __init__(self, out: Path, modules: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer) -> None:
        self.path = out / "checkpoint" / "state.pt"
        self.modules = modules
        self.optimizer = optimizer

    def save(self, step: int, rng: random.Random, extra: dict[str, Any] | None = None) -> None:
        state = {
            "step": step,
            "modules": {k: m.state_dict() for k, m in self.modules.items()},
            "optimizer": self.optimizer.state_dict(),
            "rng": rng.getstate(),
            "torch_rng": torch.get_rng_state(),
            "extra": extra or {},
        }
        tmp = self.path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.path)

    def load(self, rng: random.Random) -> tuple[int, dict[str, Any]]:
        if not self.path.exists():
            return 0, {}
        state = torch.load(self.path, weights_only=False)
        for k, m in self.modules.items():
            m.load_state_dict(state["modules"][k])
        self.optimizer.load_state_dict(state["optimizer"])
        rng.setstate(state["rng"])
        torch.set_rng_state(state["torch_rng"])
        print(f"resumed from {self.path} at step {state['step']}", flush=True)
        return int(state["step"]), state.get("extra", {})


class Logger:
    """Append one JSON line per log step to ``<out>/log.jsonl`` and print it."""

    def __init__(self, out: Path) -> None:
        self.path = out / "log.jsonl"
        self.start = time.time()

    def log(self, step: int, **values: Any) -> None:
        record = {"step": step, "elapsed_s": round(time.time() - self.start, 1)}
        record.update({k: (round(v, 5) if isinstance(v, float) else v) for k, v in values.items()})
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        print(json.dumps(record), flush=True)


def batch(rng: random.Random, args: argparse.Namespace) -> tuple[torch.Tensor, list[str], list[Any]]:
    sampler = triples.train_batch if getattr(args, "scenes", "pairs") == "triples" else world.train_batch
    images, captions, scenes = sampler(rng, args.train_batch_size, args.resolution)
    return images_to_tensor(images), captions, scenes
