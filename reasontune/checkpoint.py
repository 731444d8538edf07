"""Atomic checkpoints: a consolidated HF model directory, sharded model + optimizer state, and trainer state for exact resume.

A checkpoint is written into a temporary sibling directory and renamed into place only when
complete (after every rank has written its part), so a crash mid-write leaves the previous
checkpoint intact and never a half one under a final name. Layout of ``checkpoint-N/``::

    config.json, model*.safetensors, tokenizer files   consolidated weights (rank 0; from_pretrained, vLLM)
    trainer_state.json + trainer_state.safetensors     step, scheduler, RNG, data position (rank 0)
    rng-rank-R.json + rng-rank-R.safetensors           each rank's random generators
    sharded/                                           torch.distributed.checkpoint: model + optimizer,
                                                       one file per rank; loads at any world size

Nothing here unpickles: trainer state is JSON plus tensors in safetensors, so a crafted
checkpoint directory cannot run code on ``--resume``.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

TRAINER_STATE = "trainer_state.json"
LEGACY_TRAINER_STATE = "trainer_state.pt"
SHARDED_DIR = "sharded"
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


# ---------------------------------------------------------------------------------------------
# Trainer state without pickle: JSON for the structure, safetensors for the tensors


def _encode(value: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if torch.is_tensor(value):
        tensors[path] = value.detach().cpu().contiguous().clone()
        return {"__tensor__": path}
    if isinstance(value, np.ndarray):
        # safetensors has no uint32 for every torch version: store int64, remember the dtype.
        tensors[path] = torch.from_numpy(value.astype(np.int64) if value.dtype.kind in "iub" else value.copy())
        return {"__ndarray__": path, "dtype": str(value.dtype)}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(item, tensors, f"{path}/{i}") for i, item in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(item, tensors, f"{path}/{i}") for i, item in enumerate(value)]
    if isinstance(value, dict):
        if all(isinstance(key, str) and not key.startswith("__") for key in value):
            return {key: _encode(item, tensors, f"{path}/{key}") for key, item in value.items()}
        return {"__items__": [[_encode(key, tensors, f"{path}/key{i}"), _encode(item, tensors, f"{path}/{i}")]
                              for i, (key, item) in enumerate(value.items())]}
    raise TypeError(f"trainer state field {path or '/'} is a {type(value).__name__}; only None, bool, int, float, "
                    "str, list, tuple, dict, torch tensors and numpy arrays can be saved")


def _decode(value: Any, tensors: dict[str, torch.Tensor], source: Path) -> Any:
    if isinstance(value, list):
        return [_decode(item, tensors, source) for item in value]
    if not isinstance(value, dict):
        return value
    if "__tensor__" in value or "__ndarray__" in value:
        key = value.get("__tensor__", value.get("__ndarray__"))
        if key not in tensors:
            raise ValueError(f"{source}: field {key!r} names a tensor that its .safetensors file lacks")
        if "__tensor__" in value:
            return tensors[key]
        return tensors[key].numpy().astype(np.dtype(value["dtype"]))
    if "__tuple__" in value:
        return tuple(_decode(item, tensors, source) for item in value["__tuple__"])
    if "__items__" in value:
        return {_decode(key, tensors, source): _decode(item, tensors, source) for key, item in value["__items__"]}
    return {key: _decode(item, tensors, source) for key, item in value.items()}


def save_trainer_state(directory: str | Path, state: dict[str, Any], name: str = "trainer_state") -> Path:
    """Returns the path of ``name``.json after writing ``state`` there (structure) and to ``name``.safetensors (tensors).

    ``state`` may nest dicts, lists and tuples of None/bool/int/float/str, torch tensors and
    numpy arrays (an optimizer's or scheduler's ``state_dict()``, ``rng_state()``); anything else
    raises TypeError naming the field, so no object ever needs pickling.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    tensors: dict[str, torch.Tensor] = {}
    encoded = _encode(state, tensors, "")
    save_file(tensors, str(directory / f"{name}.safetensors"))
    path = directory / f"{name}.json"
    path.write_text(json.dumps(encoded))
    return path


def load_trainer_state(directory: str | Path, name: str = "trainer_state") -> dict[str, Any]:
    """Returns the trainer state saved by ``save_trainer_state``, without unpickling anything.

    A checkpoint of the old pickle format (``trainer_state.pt``) is read only with
    ``torch.load(weights_only=True)``, which refuses every object but tensors and plain
    containers: a crafted file cannot run code, and an old file holding NumPy RNG state is
    refused with a message rather than trusted.
    """
    from safetensors.torch import load_file

    directory = Path(directory)
    path = directory / f"{name}.json"
    if not path.exists():
        legacy = directory / LEGACY_TRAINER_STATE
        if name == "trainer_state" and legacy.exists():
            try:
                return torch.load(legacy, map_location="cpu", weights_only=True)
            except Exception as error:  # noqa: BLE001 — any refusal of the safe unpickler means the same
                raise ValueError(f"{legacy} is a pickle that the safe loader refuses ({type(error).__name__}); "
                                 "it is not loaded because unpickling can run arbitrary code. Resume from a "
                                 "checkpoint written by this version, or start afresh") from None
        raise FileNotFoundError(f"{directory} has no {path.name}; it cannot be resumed from")
    try:
        encoded = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: line {error.lineno}: not valid JSON ({error.msg})") from None
    tensor_file = directory / f"{name}.safetensors"
    tensors = load_file(str(tensor_file)) if tensor_file.exists() else {}
    state = _decode(encoded, tensors, path)
    if not isinstance(state, dict):
        # A malformed file, not a caller's wrong argument: ValueError like every other bad content.
        raise ValueError(f"{path}: expected a JSON object at the top, got {type(state).__name__}")  # noqa: TRY004
    return state


# ---------------------------------------------------------------------------------------------
# Writing a checkpoint (every rank calls; rank 0 writes the shared files)


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


def save_consolidated(directory: str | Path, model: Any, is_main: bool = True) -> None:
    """Writes a ``from_pretrained``-loadable safetensors directory of ``model``'s full weights (rank 0 writes).

    An FSDP2-sharded model is gathered one decoder layer at a time (``full_state_dict_layers``)
    into one safetensors file per layer group plus ``model.safetensors.index.json``, so no
    device or host ever holds more than one layer's full tensors besides the embeddings. Every
    rank must call it (the gathers are collectives); an unsharded model uses ``save_pretrained``.
    """
    from reasontune.distributed import full_state_dict_layers, is_sharded
    from reasontune.lora import is_peft_model, save_adapter

    directory = Path(directory)
    if is_peft_model(model) and is_sharded(model):  # an adapter checkpoint, as one process writes it
        save_adapter(model, directory, is_main)
        return
    if not is_sharded(model):
        if is_main:
            model.save_pretrained(directory, safe_serialization=True)
        return
    save_layer_files(directory, model, full_state_dict_layers(model), is_main)


def save_layer_files(directory: Path, model: Any, layers: Iterator[dict[str, torch.Tensor]], is_main: bool) -> None:
    """Writes ``layers`` (the root's tensors, then one dict per decoder layer) as safetensors files plus their index and ``model``'s config.

    Every rank iterates ``layers`` (its gathers are collectives); ``is_main`` writes.
    """
    from safetensors.torch import save_file

    from reasontune.distributed import decoder_layers

    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    files = len(decoder_layers(model)) + 1  # the root's tensors, then one file per decoder layer
    weight_map, total_bytes = {}, 0
    if is_main:
        directory.mkdir(parents=True, exist_ok=True)
    for number, layer in enumerate(layers, start=1):
        layer = {name: tensor.cpu().contiguous() for name, tensor in layer.items() if name not in tied}
        file_name = f"model-{number:05d}-of-{files:05d}.safetensors"
        if is_main:
            save_file(layer, str(directory / file_name), metadata={"format": "pt"})
        weight_map.update({name: file_name for name in layer})
        total_bytes += sum(tensor.numel() * tensor.element_size() for tensor in layer.values())
    if is_main:
        index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        model.config.save_pretrained(directory)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(directory)


def save_checkpoint(directory: str | Path, model: Any, tokenizer: Any, trainer_state: dict[str, Any] | None = None,
                    extra_files: dict[str, str] | None = None, *, optimizer: Any = None, ctx: Any = None) -> Path:
    """Returns ``directory`` after writing the checkpoint there atomically; at world size > 1 every rank calls it.

    Rank 0 writes the consolidated weights, tokenizer, ``trainer_state`` (step, scheduler, RNG,
    data position …; see ``save_trainer_state`` for what it may hold) and ``extra_files`` (file
    name -> text, e.g. the run's config.json). With ``optimizer`` every rank also writes its shard
    of model + optimizer state to ``sharded/`` (``torch.distributed.checkpoint``), and then
    ``trainer_state`` should not hold the optimizer. Each rank saves its RNG state. After a
    barrier rank 0 renames the temporary directory into place (replacing an older one of that
    name only once the new one is complete); a second barrier lets no rank run ahead of it.

    Args:
        ctx: the run's ``DistributedContext`` (None: the default process group's rank, if any).
    """
    import torch.distributed as dist

    from reasontune import distributed

    rank = ctx.rank if ctx is not None else (dist.get_rank() if dist.is_initialized() else 0)
    is_main = rank == 0
    directory = Path(directory)
    # One temporary name for every rank: rank 0's pid.
    temporary = directory.with_name(f".{directory.name}.tmp-{distributed.broadcast_object(os.getpid())}")
    if is_main:
        if temporary.exists():
            shutil.rmtree(temporary)
        temporary.mkdir(parents=True)
    distributed.barrier()
    if optimizer is not None:
        _save_sharded(temporary / SHARDED_DIR, model, optimizer)
    save_consolidated(temporary, model, is_main)
    save_trainer_state(temporary, rng_state(), name=f"rng-rank-{rank}")
    if is_main:
        if tokenizer is not None:
            tokenizer.save_pretrained(temporary)
        if trainer_state is not None:
            save_trainer_state(temporary, trainer_state)
        for name, text in (extra_files or {}).items():
            (temporary / name).write_text(text)
    distributed.barrier()  # every rank's files are in place
    if is_main:
        move_into_place(temporary, directory)
    distributed.barrier()
    return directory


def move_into_place(temporary: str | Path, directory: str | Path) -> Path:
    """Returns ``directory`` after renaming the complete ``temporary`` directory to it (synced to disk first).

    An older ``directory`` is replaced only once the new one is whole: a crash at any point
    leaves either the old or the new directory under the name, never a half-written one.
    """
    temporary, directory = Path(temporary), Path(directory)
    _fsync_tree(temporary)
    if directory.exists():
        retired = directory.with_name(f".{directory.name}.old-{os.getpid()}")
        directory.rename(retired)
        temporary.rename(directory)
        shutil.rmtree(retired)
    else:
        temporary.rename(directory)
    return directory


def _save_sharded(path: Path, model: Any, optimizer: Any) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    with _one_process_intended():
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(path),
                 no_dist=not dist.is_initialized())


@contextlib.contextmanager
def _one_process_intended() -> Iterator[None]:
    """Yields with DCP's warning that it "assumes" one process silenced: without torchrun there is one."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def load_sharded(directory: str | Path, model: Any, optimizer: Any) -> None:
    """Loads the model and optimizer state of a checkpoint's ``sharded/`` into ``model`` and ``optimizer`` in place.

    Works at any world size, whatever the one that saved: ``torch.distributed.checkpoint``
    reads the pieces each rank's shards need (FSDP2 DTensors, or whole tensors at world size 1).
    Every rank calls it, after ``shard_model`` and after building the optimizer.
    """
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    path = Path(directory) / SHARDED_DIR
    if not (path / ".metadata").exists():
        raise FileNotFoundError(f"{directory} has no {SHARDED_DIR}/ model and optimizer state to resume from")
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    with _one_process_intended():
        dcp.load(state, checkpoint_id=str(path), no_dist=not dist.is_initialized())
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def restore_rng(directory: str | Path, rank: int = 0) -> bool:
    """Returns True after restoring this rank's random generators from a checkpoint, False when it has none for ``rank``.

    A resume at a different world size finds no state for its new ranks: they keep their seeds.
    """
    path = Path(directory) / f"rng-rank-{rank}.json"
    if not path.exists():
        return False
    set_rng_state(load_trainer_state(directory, name=f"rng-rank-{rank}"))
    return True


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
