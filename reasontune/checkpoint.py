"""Atomic checkpoints: a model directory loadable with ``from_pretrained`` plus trainer state for exact resume.

A checkpoint is written into a temporary sibling directory and renamed into place only when
complete, so a crash mid-write leaves the previous checkpoint intact and never a half one
under a final name.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

TRAINER_STATE = "trainer_state.pt"
_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")


def rng_state() -> dict[str, Any]:
    """Returns the state of every random generator a run draws from (Python, NumPy, torch CPU/CUDA)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restores the generators saved by ``rng_state``."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_tree(directory: Path) -> None:
    for path in directory.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def save_checkpoint(directory: str | Path, model: Any, tokenizer: Any, trainer_state: dict[str, Any] | None = None,
                    extra_files: dict[str, str] | None = None) -> Path:
    """Returns ``directory`` after writing model, tokenizer and trainer state there atomically.

    ``trainer_state`` (optimizer, scheduler, RNG, step, data position …) goes to
    ``trainer_state.pt``; ``extra_files`` maps file names to text (e.g. the run's config.json).
    An existing directory of that name is replaced only once the new one is complete.
    """
    directory = Path(directory)
    temporary = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    if temporary.exists():
        shutil.rmtree(temporary)
    temporary.mkdir(parents=True)
    model.save_pretrained(temporary, safe_serialization=True)
    tokenizer.save_pretrained(temporary)
    if trainer_state is not None:
        torch.save(trainer_state, temporary / TRAINER_STATE)
    for name, text in (extra_files or {}).items():
        (temporary / name).write_text(text)
    _fsync_tree(temporary)
    if directory.exists():
        retired = directory.with_name(f".{directory.name}.old-{os.getpid()}")
        directory.rename(retired)
        temporary.rename(directory)
        shutil.rmtree(retired)
    else:
        temporary.rename(directory)
    return directory


def load_trainer_state(directory: str | Path) -> dict[str, Any]:
    """Returns the trainer state saved in a checkpoint directory."""
    path = Path(directory) / TRAINER_STATE
    if not path.exists():
        raise FileNotFoundError(f"{directory} has no {TRAINER_STATE}; it cannot be resumed from")
    return torch.load(path, map_location="cpu", weights_only=False)


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Returns the complete ``checkpoint-N`` directories of a run, oldest first, as (N, path)."""
    found = []
    run_dir = Path(run_dir)
    if not run_dir.exists():
        return found
    for path in run_dir.iterdir():
        match = _CHECKPOINT_NAME.match(path.name)
        if match and path.is_dir() and (path / TRAINER_STATE).exists():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """Returns the newest complete ``checkpoint-N`` of a run, or None."""
    checkpoints = list_checkpoints(run_dir)
    return checkpoints[-1][1] if checkpoints else None


def remove_stale_temporaries(run_dir: str | Path) -> list[Path]:
    """Returns and deletes half-written checkpoint directories left by a crash."""
    removed = []
    for path in Path(run_dir).glob(".*.tmp-*"):
        if path.is_dir():
            shutil.rmtree(path)
            removed.append(path)
    return removed


def prune_checkpoints(run_dir: str | Path, keep: int | None) -> list[Path]:
    """Returns and deletes the oldest ``checkpoint-N`` directories beyond the newest ``keep``."""
    if keep is None or keep <= 0:
        return []
    checkpoints = list_checkpoints(run_dir)
    doomed = [path for _, path in checkpoints[:-keep]]
    for path in doomed:
        shutil.rmtree(path)
    return doomed
