"""Atomic checkpoints: a consolidated HF model directory, sharded model + optimizer state, and trainer state for exact resume.

A checkpoint is written into a temporary sibling directory and renamed into place only when
complete (after every rank has written its part), so a crash mid-write leaves the previous
checkpoint intact and never a half one under a final name. Layout of ``checkpoint-N/``::

    config.json, model*.safetensors, tokenizer files   consolidated weights (rank 0; from_pretrained, vLLM)
    trainer_state.json + trainer_state.safetensors     step, scheduler, RNG, data position (rank 0)
    rng-rank-R.json + rng-rank-R.safetensors           each rank's random generators
    sharded/                                           torch.distributed.checkpoint: model + optimizer,
                                                       one file per rank; loads at any world size

Nothing read from a checkpoint is unpickled freely, so a crafted checkpoint directory cannot
run code on ``--resume``: trainer state is JSON plus tensors in safetensors, checked against
its schema; ``sharded/.metadata`` (a pickle that ``torch.distributed.checkpoint`` writes) is
read by an unpickler that builds only DCP's own metadata classes, torch sizes and dtypes; the
shards' bytes go through ``torch.load(weights_only=True)``. Every refusal is a
``CheckpointError`` naming the file (docs/security.md lists every file and how it is parsed).
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import pickle
import random
import shlex
import shutil
import struct
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
import torch.distributed as dist

from reasontune import distributed
from reasontune.distributed import full_state_dict_layers, is_sharded
from reasontune.lora import merged_state_dict, merged_weights_by_layer, save_adapter
from reasontune.model_layers import decoder_layers, is_peft_model

from reasontune.config import UserError
from reasontune.run_layout import (ADAPTER_DIR, CHECKPOINT_CONFIG_COPY, CHECKPOINT_NAME, CONFIG_FILE, FINAL_DIR,
                                   REPORT_DIR, REPORT_PAGE, SHARDED_DIR, TRAINER_STATE, final_checkpoint,
                                   latest_checkpoint, list_checkpoints)

# File kinds that torch.load / pickle would read: never in a checkpoint reasontune wrote.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


class CheckpointError(ValueError):
    """A checkpoint file that is missing, truncated, corrupt or crafted; the message names the file and what is wrong."""


class DiskFull(OSError):
    """A checkpoint could not be written for lack of space; its partial files are removed, older checkpoints kept."""


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
            raise CheckpointError(f"{source}: field {key!r} names a tensor that its .safetensors file lacks")
        if "__tensor__" in value:
            return tensors[key]
        dtype = np.dtype(str(value.get("dtype")))
        if dtype.kind not in "biuf":
            raise CheckpointError(f"{source}: field {key!r} has dtype {dtype}; only numeric arrays are stored")
        return tensors[key].numpy().astype(dtype)
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
    directory = Path(directory)
    tensors: dict[str, torch.Tensor] = {}
    encoded = _encode(state, tensors, "")
    safetensors.torch.save_file(tensors, str(directory / f"{name}.safetensors"))
    path = directory / f"{name}.json"
    path.write_text(json.dumps(encoded))
    return path


def load_trainer_state(directory: str | Path, name: str = "trainer_state") -> dict[str, Any]:
    """Returns the trainer state saved by ``save_trainer_state``, without unpickling anything.

    Any damage (truncated JSON or safetensors, a crafted structure, nesting too deep for the
    parser) raises ``CheckpointError`` naming the file.
    """
    directory = Path(directory)
    path = directory / f"{name}.json"
    if not path.exists():
        raise CheckpointError(f"{directory} has no {path.name}; it cannot be resumed from")
    try:
        encoded = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path}: line {error.lineno}: not valid JSON ({error.msg})") from None
    except (ValueError, RecursionError) as error:  # not UTF-8, nested too deeply, a number past int()'s limit
        raise CheckpointError(f"{path}: not a trainer state ({_why(error)})") from None
    tensor_file = directory / f"{name}.safetensors"
    try:
        tensors = safetensors.torch.load_file(str(tensor_file)) if tensor_file.exists() else {}
    except Exception as error:  # noqa: BLE001 — safetensors' one error type: truncated or corrupt
        raise CheckpointError(f"{tensor_file}: truncated or corrupt ({_why(error)})") from None
    try:
        state = _decode(encoded, tensors, path)
    except CheckpointError:
        raise
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as error:
        raise CheckpointError(f"{path}: malformed trainer state ({_why(error)})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a JSON object at the top, got {type(state).__name__}")
    return state


def _why(error: BaseException) -> str:
    """Returns an exception as one short line (its type when it has no message)."""
    text = " ".join(str(error).split())[:200]
    return text or type(error).__name__


def check_rng_state(state: Any, where: str) -> None:
    """Raises ``CheckpointError`` unless ``state`` is what ``rng_state`` returns (checked on scratch generators, none changed)."""
    if not isinstance(state, dict) or not {"python", "numpy", "torch"} <= set(state):
        raise CheckpointError(f"{where}: field 'rng' must hold the python, numpy and torch generator states")
    try:
        random.Random().setstate(state["python"])
        np.random.RandomState().set_state(state["numpy"])
        if not (torch.is_tensor(state["torch"]) and state["torch"].dtype == torch.uint8 and state["torch"].dim() == 1):
            raise TypeError("torch generator state must be a 1-D uint8 tensor")
        torch.Generator().set_state(state["torch"])
        cuda = state.get("cuda", [])
        if not (isinstance(cuda, list) and all(torch.is_tensor(t) and t.dtype == torch.uint8 for t in cuda)):
            raise TypeError("cuda generator states must be a list of uint8 tensors")
    except (TypeError, ValueError, RuntimeError, OverflowError) as error:
        raise CheckpointError(f"{where}: field 'rng' is not a generator state ({_why(error)})") from None


def check_trainer_state(state: dict[str, Any], where: str) -> None:
    """Raises ``CheckpointError`` naming the field when ``state`` lacks the shape a resume reads (step, fingerprint, rng, optimizer, scheduler)."""
    step = state.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise CheckpointError(f"{where}: field 'step' must be a whole number >= 0, got {step!r:.40}")
    if "plan_fingerprint" in state and not isinstance(state["plan_fingerprint"], str):
        raise CheckpointError(f"{where}: field 'plan_fingerprint' must be a string")
    for key in ("optimizer", "scheduler"):
        if state.get(key) is not None and not isinstance(state[key], dict):
            raise CheckpointError(f"{where}: field {key!r} must be an object or null, got {type(state[key]).__name__}")
    check_rng_state(state.get("rng"), where)


# ---------------------------------------------------------------------------------------------
# Reading the sharded state without trusting its pickle


_DCP_METADATA_CLASSES = {
    ("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "MetadataIndex", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "TensorStorageMetadata", "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
     ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
     ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath")}


class _MetadataUnpickler(pickle.Unpickler):
    """Builds only the classes DCP's metadata is made of (plus torch sizes, dtypes and layouts); any other global is refused.

    The classes admitted are plain records (dataclasses, an enum, ``torch.Size``, paths) whose
    construction runs no code of the file's choosing, so a crafted ``.metadata`` can at worst
    describe tensors wrongly, which ``load_sharded`` then checks.
    """

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if (module, name) not in _DCP_METADATA_CLASSES:
            raise pickle.UnpicklingError(f"refused global {module}.{name}")
        return super().find_class(module, name)


def read_sharded_metadata(sharded: str | Path) -> Any:
    """Returns the ``Metadata`` of a DCP checkpoint directory, read with ``_MetadataUnpickler`` and checked against its files.

    Every storage item must name a file inside ``sharded`` (no path separators) that is long
    enough for its byte range; anything else raises ``CheckpointError``.
    """
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex

    sharded = Path(sharded)
    path = sharded / ".metadata"
    try:
        data = path.read_bytes()
        metadata = _MetadataUnpickler(io.BytesIO(data)).load()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, KeyError, IndexError,
            RecursionError, ImportError, struct.error) as error:
        raise CheckpointError(f"{path}: not DCP metadata, or truncated ({_why(error)}); it is not loaded") from None
    if not isinstance(metadata, Metadata) or not isinstance(metadata.storage_data, dict):
        raise CheckpointError(f"{path}: not DCP metadata (holds a {type(metadata).__name__})")
    sizes: dict[str, int] = {}
    for index, info in metadata.storage_data.items():
        if not isinstance(index, MetadataIndex) or not isinstance(info, _StorageInfo):
            raise CheckpointError(f"{path}: malformed storage entry {index!r:.60}")
        name = info.relative_path
        if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", ".."):
            raise CheckpointError(f"{path}: entry {index.fqn!r} names the file {name!r:.60}, outside {sharded}")
        offset, length = info.offset, info.length
        if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in (offset, length)):
            raise CheckpointError(f"{path}: entry {index.fqn!r} has a malformed byte range")
        if name not in sizes:
            file = sharded / name
            if not file.is_file():
                raise CheckpointError(f"{file}: missing (named by {path.name})")
            sizes[name] = file.stat().st_size
        if offset + length > sizes[name]:
            raise CheckpointError(f"{sharded / name}: truncated ({sizes[name]} bytes; {index.fqn!r} needs bytes "
                                  f"{offset}-{offset + length})")
    return metadata


def _safe_dcp_reader_and_planner(path: Path) -> tuple[Any, Any]:
    """Returns (a DCP storage reader whose metadata comes from ``read_sharded_metadata``, a load planner that unpickles with ``weights_only``)."""
    from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class CheckedReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            if kwargs.get("rank") is not None:
                raise CheckpointError(f"{path}: rank-local metadata is not read; resume from a checkpoint with "
                                      ".metadata")
            metadata = read_sharded_metadata(path)
            metadata.storage_meta = metadata.storage_meta if isinstance(metadata.storage_meta, StorageMeta) else StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    class WeightsOnlyPlanner(DefaultLoadPlanner):
        # Non-tensor values (optimizer hyperparameters) are torch.save'd; torch's own planner loads them unrestricted.
        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            from torch.distributed.checkpoint._traverse import set_element

            try:
                loaded = torch.load(value, weights_only=True)
            except Exception as error:  # noqa: BLE001 — the restricted unpickler refuses with several types
                raise CheckpointError(f"{path}: value {read_item.dest_index.fqn!r} refused by the weights-only "
                                      f"loader ({_why(error)})") from None
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
            else:
                self.state_dict[read_item.dest_index.fqn] = loaded

    return CheckedReader(str(path)), WeightsOnlyPlanner()


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
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    files = len(decoder_layers(model)) + 1  # the root's tensors, then one file per decoder layer
    weight_map, total_bytes = {}, 0
    if is_main:
        directory.mkdir(parents=True, exist_ok=True)
    for number, layer in enumerate(layers, start=1):
        layer = {name: tensor.cpu().contiguous() for name, tensor in layer.items() if name not in tied}
        file_name = f"model-{number:05d}-of-{files:05d}.safetensors"
        if is_main:
            safetensors.torch.save_file(layer, str(directory / file_name), metadata={"format": "pt"})
        weight_map.update({name: file_name for name in layer})
        total_bytes += sum(tensor.numel() * tensor.element_size() for tensor in layer.values())
    if is_main:
        index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        model.config.save_pretrained(directory)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(directory)


def save_merged(model: Any, tokenizer: Any, directory: str | Path, is_main: bool = True) -> Path:
    """Returns ``directory`` after writing a full model with the adapter merged in, plus the tokenizer.

    The directory loads with ``AutoModelForCausalLM.from_pretrained`` and vLLM, without peft.
    The live LoRA model is unchanged (the merged weights are new tensors, see ``lora.merged_state_dict``).
    An FSDP2-sharded model is gathered and merged one decoder layer at a time and written as
    one safetensors file per layer group (every rank calls it; ``is_main`` writes).
    """
    directory = Path(directory)
    base = model.get_base_model() if is_peft_model(model) else model
    if is_sharded(model):
        save_layer_files(directory, base, merged_weights_by_layer(model), is_main)
    elif is_main:
        base.save_pretrained(directory, state_dict=merged_state_dict(model), safe_serialization=True)
    if tokenizer is not None and is_main:
        tokenizer.save_pretrained(directory)
    return directory


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
    rank = ctx.rank if ctx is not None else (dist.get_rank() if dist.is_initialized() else 0)
    is_main = rank == 0
    directory = Path(directory)
    # One temporary name for every rank: rank 0's pid.
    temporary = directory.with_name(f".{directory.name}.tmp-{distributed.broadcast_object(os.getpid())}")
    try:
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
                (temporary / name).write_text(text, encoding="utf-8")
        distributed.barrier()  # every rank's files are in place
        if is_main:
            _fsync_tree(temporary)
    except BaseException as error:
        # Whatever stopped the write (a full disk, a signal), no half checkpoint stays behind, under any name.
        if is_main:
            shutil.rmtree(temporary, ignore_errors=True)
        if _is_disk_full(error):
            kept = latest_checkpoint(directory.parent)
            raise DiskFull(errno.ENOSPC, f"{directory}: no space left on the device while writing it; its partial "
                           "files are removed and " + (f"{kept} is kept" if kept is not None else
                                                       "there is no earlier checkpoint")) from None
        raise
    if is_main:
        move_into_place(temporary, directory)
    distributed.barrier()
    return directory


def _is_disk_full(error: BaseException) -> bool:
    """Returns whether a write failed for lack of space: ENOSPC/EDQUOT, or the same as safetensors and torch's zip writer word it."""
    for cause in (error, error.__cause__, error.__context__):
        if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(cause or "")
        if any(sign in text for sign in ("No space left on device", "StorageFull", "Disk quota exceeded")):
            return True
    return False


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
    Its metadata is read by ``read_sharded_metadata`` and its non-tensor values with
    ``weights_only``: nothing in the directory can run code. Every rank calls it, after
    ``shard_model`` and after building the optimizer.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    path = Path(directory) / SHARDED_DIR
    if not (path / ".metadata").exists():
        raise CheckpointError(f"{directory} has no {SHARDED_DIR}/ model and optimizer state to resume from")
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    read_sharded_metadata(path)  # refused here, in one clear line, before DCP wraps errors per rank
    reader, planner = _safe_dcp_reader_and_planner(path)
    with _one_process_intended():
        try:
            dcp.load(state, storage_reader=reader, planner=planner, no_dist=not dist.is_initialized())
        except CheckpointException as error:  # a BaseException: one entry per rank that failed
            failures = [failure[0] if isinstance(failure, tuple) else failure for failure in error.failures.values()]
            first = next((f for f in failures if isinstance(f, CheckpointError)), failures[0] if failures else error)
            if isinstance(first, CheckpointError):
                raise first from None
            detail = ("a value's bytes are not a tensor: the weights-only loader refused them"
                      if isinstance(first, pickle.UnpicklingError) else _why(first))
            raise CheckpointError(f"{path}: truncated or corrupt, or not this model's and optimizer's state "
                                  f"({detail})") from None
        except (ValueError, RuntimeError, KeyError, pickle.UnpicklingError) as error:
            raise CheckpointError(f"{path}: cannot be loaded into this model and optimizer ({_why(error)})") from None
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def restore_rng(directory: str | Path, rank: int = 0) -> bool:
    """Returns True after restoring this rank's random generators from a checkpoint, False when it has none for ``rank``.

    A resume at a different world size finds no state for its new ranks: they keep their seeds.
    """
    path = Path(directory) / f"rng-rank-{rank}.json"
    if not path.exists():
        return False
    state = load_trainer_state(directory, name=f"rng-rank-{rank}")
    check_rng_state(state, str(path))
    set_rng_state(state)
    return True


def _safetensors_problem(path: Path) -> str | None:
    """Returns what is wrong with a safetensors file's framing (header length, JSON header, data size), or None; no tensor is read."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            return f"{path}: truncated ({size} bytes)"
        (header_length,) = struct.unpack("<Q", head)
        if header_length > min(size - 8, 100 << 20):
            return f"{path}: truncated or corrupt (its header says {header_length} bytes; the file has {size})"
        try:
            header = json.loads(handle.read(header_length).decode("utf-8"))
        except (ValueError, RecursionError):
            return f"{path}: corrupt (its header is not JSON)"
    if not isinstance(header, dict):
        return f"{path}: corrupt (its header is not a JSON object)"
    ends = [entry.get("data_offsets", [0, 0])[1] for key, entry in header.items()
            if key != "__metadata__" and isinstance(entry, dict) and isinstance(entry.get("data_offsets"), list)
            and len(entry["data_offsets"]) == 2]
    needed = 8 + header_length + max(ends, default=0)
    if not all(isinstance(end, int) for end in ends) or needed != size:
        return f"{path}: truncated or corrupt ({size} bytes; its header describes {needed})"
    return None


def model_files_problem(directory: str | Path) -> str | None:
    """Returns what is wrong with a model directory's top-level files (a JSON file that does not parse, a truncated safetensors file), or None.

    Cheap (no tensor is read): run before loading, so a damaged ``final/`` given as ``--model``
    is one line rather than a loader's traceback.
    """
    for path in sorted(Path(directory).iterdir()):
        if not path.is_file():
            continue
        problem = _file_problem(path)
        if problem:
            return problem
    return None


def _file_problem(path: Path) -> str | None:
    """Returns why one JSON or safetensors file is truncated or corrupt, or None (other files are not read)."""
    if path.suffix == ".json":
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, RecursionError) as error:
            return f"{path}: truncated or corrupt JSON ({_why(error)})"
    elif path.suffix == ".safetensors":
        return _safetensors_problem(path)
    return None


def checkpoint_problem(directory: str | Path) -> str | None:
    """Returns why a checkpoint directory cannot be resumed from (a missing, truncated, corrupt or crafted file), or None when it is intact.

    Checks without loading weights: trainer state (JSON, tensors, schema), every JSON file
    (config, tokenizer), the framing of every safetensors file, ``sharded/``'s metadata
    against its shard files' sizes, and that no pickle-format file (``.bin``, ``.pt`` …) is
    there for a loader to fall back on.
    """
    directory = Path(directory)
    try:
        check_trainer_state(load_trainer_state(directory), str(directory / f"{TRAINER_STATE}"))
        for path in sorted(directory.rglob("*")):
            if not path.is_file():
                continue
            if path.suffix in PICKLE_SUFFIXES:
                return (f"{path}: a pickle-format file, which reasontune never writes into a checkpoint and does not "
                        "open (unpickling can run code)")
            problem = _file_problem(path)
            if problem:
                return problem
        if (directory / SHARDED_DIR).is_dir():
            read_sharded_metadata(directory / SHARDED_DIR)
    except CheckpointError as error:
        return str(error)
    except OSError as error:
        return f"{directory}: unreadable ({_why(error)})"
    return None


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


# ---------------------------------------------------------------------------------------------
# A trainer's checkpoints: what an exact resume needs, saved and restored, and which checkpoint to resume from


def trainer_state(step: int, optimizer, scheduler, plan_fingerprint: str, **extra: Any) -> dict:
    """Returns everything besides the weights that an exact resume needs (``extra``: a trainer's own positions)."""
    return {"step": step, "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "rng": rng_state(), "plan_fingerprint": plan_fingerprint, **extra}


def save_training_checkpoint(run_dir: Path, name: str, model, tokenizer, state: dict, keep: int | None = None, *,
                             optimizer=None, ctx: Any = None) -> Path:
    """Returns the checkpoint directory ``run_dir/name`` after an atomic save of weights, tokenizer, trainer state and config.json.

    A LoRA model's checkpoint holds its adapter (PEFT format); its ``final/`` holds the merged
    full model (loadable by ``from_pretrained`` and vLLM without peft) and the adapter in
    ``final/adapter/``. With ``optimizer`` the model and optimizer state also go to
    ``sharded/`` (every rank writes its shard; loadable at any world size), and ``state``
    should then not hold the optimizer. Under torchrun every rank calls it; rank 0 writes the
    shared files and prunes.
    """
    is_main = ctx is None or ctx.is_main
    extra = {CHECKPOINT_CONFIG_COPY: (run_dir / CONFIG_FILE).read_text()} if is_main else None
    if name == FINAL_DIR and is_peft_model(model):
        path = save_merged(model, tokenizer, run_dir / name, is_main)
        save_checkpoint(path / ADAPTER_DIR, model, tokenizer, state, extra, ctx=ctx)
        return path
    path = save_checkpoint(run_dir / name, model, tokenizer, state, extra, optimizer=optimizer, ctx=ctx)
    if is_main:
        prune_checkpoints(run_dir, keep)
    return path


def save_run_checkpoint(run_dir: Path, name: str, model, tokenizer, step: int, optimizer, scheduler,
                        plan_fingerprint: str, *, keep: int | None = None, ctx: Any = None, **extra: Any) -> Path:
    """Returns the checkpoint ``run_dir/name`` of a trainer with an optimizer after saving it (every rank calls it).

    The optimizer state goes to ``sharded/`` with the model's (each rank its shard), so that a
    resume may change the world size; a LoRA model in one process keeps small adapter
    checkpoints, the adapter's optimizer state in ``trainer_state`` (under torchrun: in ``sharded/``).
    """
    # A LoRA model in one process: the adapter's optimizer state is small; sharded, it is in DTensor shards.
    sharded = optimizer is not None and (not is_peft_model(model) or is_sharded(model))
    state = trainer_state(step, None if sharded else optimizer, scheduler, plan_fingerprint, **extra)
    return save_training_checkpoint(run_dir, name, model, tokenizer, state, keep=keep,
                                    optimizer=optimizer if sharded else None, ctx=ctx)


def restore_training_state(checkpoint: Path, optimizer, scheduler, fingerprint_of_steps=None, *, model=None,
                           ctx: Any = None) -> dict:
    """Returns the checkpoint's trainer state after loading the optimizer, schedule (each when not None) and RNG states from it.

    ``fingerprint_of_steps(step)`` (when given) must reproduce the saved fingerprint of the
    steps already trained; a resume with other data or batching is refused. With ``model`` and
    a ``sharded/`` directory in the checkpoint, model and optimizer state come from there (any
    world size; every rank calls it); each rank restores its own RNG state when the checkpoint
    has one for its rank.
    """
    try:
        return _restore_training_state(checkpoint, optimizer, scheduler, fingerprint_of_steps, model=model, ctx=ctx)
    except CheckpointError as error:  # found only now, against the live optimizer and schedule
        if ctx is not None and ctx.is_distributed:
            raise
        refuse_damaged_checkpoint(Path(checkpoint), str(error))


def _restore_training_state(checkpoint: Path, optimizer, scheduler, fingerprint_of_steps=None, *, model=None,
                            ctx: Any = None) -> dict:
    state = load_trainer_state(checkpoint)
    where = str(Path(checkpoint) / TRAINER_STATE)
    check_trainer_state(state, where)
    if fingerprint_of_steps is not None and state.get("plan_fingerprint") != fingerprint_of_steps(state["step"]):
        raise UserError(f"--resume: {checkpoint} was trained on other data or batches than these options plan "
                        "for its steps; resume with the same data, seed and batching options")
    sharded = (Path(checkpoint) / SHARDED_DIR).is_dir()
    # Which AdamW kernel runs is this run's choice (fused in one process, the loop over shards); the state is the same.
    kernels = [{key: group[key] for key in ("fused", "foreach") if key in group}
               for group in (optimizer.param_groups if optimizer is not None else [])]
    if model is not None and optimizer is not None and sharded:
        load_sharded(checkpoint, model, optimizer)
    try:
        if optimizer is not None and state.get("optimizer") is not None and not sharded:
            optimizer.load_state_dict(state["optimizer"])
        for group, kernel in zip(optimizer.param_groups if optimizer is not None else [], kernels):
            group.update(kernel)
        if scheduler is not None and state.get("scheduler") is not None:
            _check_like(state["scheduler"], scheduler.state_dict(), "scheduler")
            live_base_lrs = list(scheduler.base_lrs)
            scheduler.load_state_dict(state["scheduler"])
            follow_live_schedule(scheduler, live_base_lrs)
    except (ValueError, TypeError, KeyError, IndexError, RuntimeError, AttributeError) as error:
        raise CheckpointError(f"{where}: the optimizer or schedule state does not fit this run "
                              f"({' '.join(str(error).split())[:200]})") from None
    set_rng_state(state["rng"])
    if ctx is not None and ctx.rank > 0:
        restore_rng(checkpoint, ctx.rank)
    return state


def follow_live_schedule(scheduler, base_lrs: list[float]) -> None:
    """Returns nothing; sets the optimizer's rates to the live schedule (its rates and multipliers) at the restored step count.

    The saved state brings the step count; the rates it saved (and the optimizer's, saved with
    its state) belong to the schedule of the interrupted run, which differs when the resume
    plans another number of steps (a larger --max-steps): the first resumed step must take
    the new schedule's rate at that step. With unchanged options the rates are the same.
    """
    scheduler.base_lrs = base_lrs
    scheduler.last_epoch -= 1
    scheduler.step()  # last_epoch back to the restored count; every param group's lr and get_last_lr() from the live schedule


def _check_like(saved: Any, expected: Any, where: str) -> None:
    """Raises TypeError unless ``saved`` has ``expected``'s shape: the same keys, list lengths and value types (int for float allowed).

    A scheduler's ``load_state_dict`` sets every saved key as an attribute, so a crafted value
    would surface steps later as a crash in the schedule; checked against the fresh state first.
    """
    if isinstance(expected, dict):
        if not isinstance(saved, dict) or set(saved) != set(expected):
            raise TypeError(f"{where}: expected the fields {', '.join(sorted(map(str, expected)))}")
        for key in expected:
            _check_like(saved[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, (list, tuple)):
        if not isinstance(saved, (list, tuple)) or len(saved) != len(expected):
            raise TypeError(f"{where}: expected a list of {len(expected)}")
        for index, (item, reference) in enumerate(zip(saved, expected)):
            _check_like(item, reference, f"{where}[{index}]")
    elif expected is None or isinstance(expected, bool):
        if saved is not None and not isinstance(saved, bool):
            raise TypeError(f"{where}: expected {type(expected).__name__}")
    elif isinstance(expected, (int, float)):
        if isinstance(saved, bool) or not isinstance(saved, (int, float)) or (isinstance(expected, int) and
                                                                               not isinstance(saved, int)):
            raise TypeError(f"{where}: expected {type(expected).__name__}, got {type(saved).__name__}")
    elif type(saved) is not type(expected):
        raise TypeError(f"{where}: expected {type(expected).__name__}, got {type(saved).__name__}")


def finished_run_check(run_dir: Path, planned_steps: int | None) -> Path | None:
    """Returns final/ to resume from when it holds fewer steps than planned, None when there is no final/; exits 0 when the run is done.

    ``planned_steps`` None (SFT without --max-steps: known only after planning) counts final/ as done.
    """
    final = final_checkpoint(run_dir)
    if final is None:
        return None
    done = load_trainer_state(final)["step"]
    if planned_steps is None or done >= planned_steps:
        report = run_dir / REPORT_DIR / REPORT_PAGE
        print(f"{run_dir} already finished: final/ holds step {done}"
              f"{'' if planned_steps is None else f' of {planned_steps}'}; nothing to resume"
              f"{f'; its report is {report}' if report.exists() else ''}. To train longer, raise the step count "
              "(--max-steps, --n-ei-steps, --n-grpo-steps) with --resume.")
        raise SystemExit(0)
    return final


def resume_point(run_dir: Path, planned_steps: int | None, command: str) -> Path | None:
    """Returns the checkpoint ``--resume`` continues from (final/ when it is behind the plan, else the newest checkpoint-N), None when there is none.

    The chosen checkpoint is checked whole first (``checkpoint_problem``): a damaged one is
    refused with the newest intact checkpoint and the exact commands that resume from it
    (``command``: the resume command line), rather than silently falling back to an older one.
    """
    newest_first = [path for _, path in reversed(list_checkpoints(run_dir))]
    if final_checkpoint(run_dir) is not None:
        newest_first.insert(0, run_dir / FINAL_DIR)
    if not newest_first:
        return None
    problem = checkpoint_problem(newest_first[0])
    if problem is None:
        final = finished_run_check(run_dir, planned_steps)
        return final if final is not None else next(p for p in newest_first if p.name != FINAL_DIR)
    refuse_damaged_checkpoint(newest_first[0], problem, command)


def refuse_damaged_checkpoint(damaged: Path, problem: str, command: str | None = None) -> None:
    """Raises the ``UserError`` of a checkpoint that cannot be resumed from: the problem, the newest intact older checkpoint, and how to resume from it.

    ``command`` is the resume command line (None: "the same command").
    """
    run_dir = damaged.parent
    numbered = CHECKPOINT_NAME.fullmatch(damaged.name)
    older = [path for number, path in reversed(list_checkpoints(run_dir))
             if path != damaged and (numbered is None or number < int(numbered.group(1)))]
    intact = next((path for path in older if checkpoint_problem(path) is None), None)
    if intact is None:
        raise UserError(f"--resume: {problem}; no intact checkpoint is left in {run_dir} to resume from; start "
                        "afresh with --overwrite")
    aside = damaged.with_name(f"damaged-{damaged.name}")
    raise UserError(f"--resume: {problem}. The newest intact checkpoint is {intact}; resume from it with: "
                    f"mv {shlex.quote(str(damaged))} {shlex.quote(str(aside))} && "
                    f"{command or 'the same command again'}")
