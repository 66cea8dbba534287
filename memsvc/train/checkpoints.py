"""The checkpoints of one training run, each a model directory plus the trainer's state.

    OUT/checkpoints/step-00000400-r0/   config.json, model.safetensors (save_model),
                                        trainer.pt (optimizer, step, stage, RNG, recipe)
    OUT/checkpoints/latest              the name of the newest complete checkpoint

A checkpoint is written into a temporary directory, its files fsynced, renamed
into place, and only then named in `latest` (itself replaced atomically): a
crash at any point leaves `latest` naming a complete checkpoint. `-rN` counts
the rollbacks before it, so a step reached again after a rollback gets a new
name. Each checkpoint directory is itself a model directory (`load_model` reads
it and ignores trainer.pt).
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor

from memsvc.model import MAGModel, ModelConfig, save_model
from memsvc.model.io import WEIGHTS_FILE, load_config
from memsvc.store.durable_files import fsync_directory, write_atomically

TRAINER_FILE = "trainer.pt"
LATEST_FILE = "latest"
_NAME = re.compile(r"step-(\d{8})-r(\d+)")


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoint_position(path: Path) -> tuple[int, int]:
    """(step, rollbacks before it) of a checkpoint directory."""
    match = _NAME.fullmatch(path.name)
    if match is None:
        raise ValueError(f"{path} is not a checkpoint directory")
    return int(match[1]), int(match[2])


class RunCheckpoints:
    """Writes, finds and reads the checkpoints under `out / "checkpoints"`."""

    def __init__(self, out: str | os.PathLike[str]) -> None:
        self.root = Path(out) / "checkpoints"

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None before the first."""
        pointer = self.root / LATEST_FILE
        if not pointer.exists():
            return None
        path = self.root / pointer.read_text().strip()
        if not (path / TRAINER_FILE).is_file():
            raise FileNotFoundError(f"{pointer} names {path.name}, which is incomplete")
        return path

    def save(
        self, model: MAGModel, trainer: dict[str, Any], step: int, rollbacks: int, keep: int
    ) -> Path:
        """Write a checkpoint of `model` and the trainer state; keep the newest `keep`."""
        self.root.mkdir(parents=True, exist_ok=True)
        name = f"step-{step:08d}-r{rollbacks}"
        staging = self.root / f".{name}.{secrets.token_hex(4)}.tmp"
        try:
            save_model(model, staging)
            write_atomically(staging / TRAINER_FILE, lambda f: torch.save(trainer, f))
            for file in staging.iterdir():
                _fsync_file(file)
            final = self.root / name
            if final.exists():  # an interrupted run reached this step before
                shutil.rmtree(final)
            os.replace(staging, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        fsync_directory(self.root)
        write_atomically(self.root / LATEST_FILE, lambda f: f.write(name.encode()))
        self._prune(keep, final)
        return final

    def remove_temporaries(self) -> None:
        """Staging directories left by a crash (call while no rank is writing)."""
        for staging in self.root.glob(".step-*.tmp"):
            shutil.rmtree(staging, ignore_errors=True)

    def _prune(self, keep: int, latest: Path) -> None:
        found = sorted(
            (checkpoint_position(path), path)
            for path in self.root.iterdir()
            if _NAME.fullmatch(path.name) and path.is_dir()
        )
        for _, path in found[:-keep]:
            if path != latest:
                shutil.rmtree(path, ignore_errors=True)


@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint read back, on the CPU (the optimizer moves its state itself)."""

    path: Path
    model_config: ModelConfig
    weights: dict[str, Tensor]
    trainer: dict[str, Any]


def read_checkpoint(path: Path) -> Checkpoint:
    return Checkpoint(
        path=path,
        model_config=load_config(path),
        weights=load_file(path / WEIGHTS_FILE),
        trainer=torch.load(path / TRAINER_FILE, map_location="cpu", weights_only=True),
    )
