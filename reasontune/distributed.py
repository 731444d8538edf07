"""Data parallelism with torchrun and FSDP2: the process group, sharding, rank slices, named cross-rank reductions.

A plain ``python -m reasontune …`` is world size 1: no process group is created and every
function here is the identity (``global_sum(x) == x``, ``rank_slice`` takes everything,
``shard_model`` returns the model untouched): one process runs the same code with no process group.
Under ``torchrun --nproc_per_node N`` the same code runs on N ranks.

Loss normalisation across ranks: the microbatch losses divide by counts summed over every rank
and microbatch of the optimizer step (``global_sum``), so each rank's gradient is its share of
the global loss's gradient. FSDP must then SUM the ranks' gradients, not average them:
``shard_model`` sets the gradient divide factor to 1. World size 2 × accumulation k then gives
the gradients of world size 1 × accumulation 2k (tests/test_distributed.py checks the weights).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from reasontune import process_exit
from reasontune.model_layers import decoder_layer_prefixes, decoder_layers


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands: its rank among ``world_size`` processes and the device it trains on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None  # None: world size 1 without a process group

    @property
    def is_main(self) -> bool:
        """True on the one rank that writes logs, reports and consolidated checkpoints."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


DEFAULT_TIMEOUT_S = 600.0
# Every process group of the job waits this long at most in one collective (init_distributed sets it).
_process_group_timeout_s = DEFAULT_TIMEOUT_S
# After a failed collective, how long a rank waits to hear from the others (each says why it stopped) before it
# names the ranks that said nothing: long enough for every rank waiting in the same collective to time out too.
REPORT_GRACE_S = 10.0
_REPORT_KEY = "reasontune/stopped/"


def _launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distributed(device: str | None = None, backend: str | None = None,
                     timeout_s: float = 600.0) -> DistributedContext:
    """Returns this process's ``DistributedContext``, joining torchrun's process group when launched by torchrun.

    Without torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``…)
    it is world size 1 and no process group is created. With it: NCCL on CUDA (device
    ``cuda:LOCAL_RANK``), gloo on CPU, and ``timeout_s`` bounds how long a collective waits for a
    rank that has died or diverged, so a failure never hangs the job silently.

    Args:
        device: "cpu", "cuda" or None (cuda when available, else cpu).
        backend: "nccl" or "gloo"; None picks by device.
        timeout_s: seconds a collective may wait before the process group gives up; the same
            bound for every group of the job (``side_group`` too), ``--process-group-timeout``.
    """
    global _process_group_timeout_s
    _process_group_timeout_s = float(timeout_s)
    kind = device or ("cuda" if torch.cuda.is_available() else "cpu")
    kind = torch.device(kind).type
    if not _launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        local = torch.device("cuda", torch.cuda.current_device()) if kind == "cuda" else torch.device(kind)
        return DistributedContext(rank=0, world_size=1, local_rank=0, device=local, backend=None)
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if kind == "cuda":
        torch.cuda.set_device(local_rank)
        local = torch.device("cuda", local_rank)
    else:
        local = torch.device(kind)
    backend = backend or ("nccl" if kind == "cuda" else "gloo")
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=local if kind == "cuda" else None)
    return DistributedContext(rank=rank, world_size=world_size, local_rank=local_rank, device=local, backend=backend)


def close_distributed() -> None:
    """Destroys the process group if there is one (call once at the end of a run, on every rank).

    Every rank first waits for the others, so that none tears its gloo pairs down while another
    still writes its files. The group itself outlives this call, so a process that closed a group
    of several ranks ends through ``process_exit.exit_process`` (its docstring says why).
    """
    if dist.is_initialized():
        several = dist.get_world_size() > 1
        if several:
            dist.barrier()
        dist.destroy_process_group()
        if several:
            # The group outlives this call (DTensor's caches hold it): the process ends through exit_process.
            process_exit.mark_process_group_closed()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@contextlib.contextmanager
def stop_all_ranks_on_error(ctx: DistributedContext) -> Iterator[None]:
    """Yields; an exception inside prints one message saying why this rank stopped and exits it with status 1.

    Under torchrun a rank exiting with an error makes the agent stop every other rank at once
    (``--max-restarts 0``, the default), so nobody waits in a collective for a dead peer; under
    another launcher the process-group timeout of ``init_distributed`` bounds that wait. The
    traceback is printed by the failing rank only. A rank whose collective failed because of
    another rank says which: the rank whose error is printed, a rank that went away without one
    (killed by a signal), or, when the collective timed out, the ranks that stopped answering
    (hung or far slower), learnt from what each rank leaves in the job's store as it stops.
    World size 1 re-raises unchanged, and so does a ``SystemExit`` with an integer status (an
    exit that every rank takes together).
    """
    try:
        yield
    except BaseException as error:  # KeyboardInterrupt too: every failure must reach the other ranks' launcher
        # A SystemExit with a status (0 done, 130 stopped by a signal after saving) is an exit every rank agreed on.
        if not ctx.is_distributed or isinstance(error, SystemExit) and (error.code is None or isinstance(error.code, int)):
            raise
        if _timed_out(error) or _lost_a_peer(error):
            # Not this rank's fault: say whose it was, once the others have said why they stopped.
            cause = "timed_out" if _timed_out(error) else "lost_peer"
            message = peer_failure_message(ctx, cause, _post_and_collect(ctx, cause))
            if message:
                print(message, file=sys.stderr, flush=True)
        else:
            _post_and_collect(ctx, "error", wait=False)
            message = f"{type(error).__name__}: {error}" if not isinstance(error, SystemExit) else str(error.code)
            traceback.print_exc(file=sys.stderr)
            print(f"error on rank {ctx.rank} of {ctx.world_size}: {message}", file=sys.stderr, flush=True)
        # NCCL: abort, so that no kernel stays queued on a collective the peers will never join.
        abort = getattr(dist, "abort_process_group", None) if ctx.backend == "nccl" else None
        with contextlib.suppress(Exception):
            (abort or dist.destroy_process_group)()
        sys.stderr.flush()
        os._exit(1)  # no atexit/collective cleanup that could wait on the other ranks


def _post_and_collect(ctx: DistributedContext, cause: str, wait: bool = True,
                      grace_s: float | None = None) -> dict[int, str] | None:
    """Returns every rank's reason for stopping that reached the job's store within the grace time (None without a store).

    This rank's ``cause`` ("error", "timed_out" or "lost_peer") is posted first. Waiting ends
    early once every rank has posted, or once one posted "error" (that rank prints the cause).
    """
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set(f"{_REPORT_KEY}{ctx.rank}", cause)
    except Exception:  # no default group or store (it was destroyed, or the store host is gone)
        return None
    if not wait:
        return {ctx.rank: cause}
    if grace_s is None:  # peers in the same collective time out within about one timeout of each other at most
        grace_s = min(REPORT_GRACE_S, max(2.0, _process_group_timeout_s))
    deadline = time.monotonic() + grace_s
    posted: dict[int, str] = {}
    while True:
        for rank in range(ctx.world_size):
            if rank in posted:
                continue
            try:
                if store.check([f"{_REPORT_KEY}{rank}"]):
                    posted[rank] = store.get(f"{_REPORT_KEY}{rank}").decode()
            except Exception:
                return posted or None
        if len(posted) == ctx.world_size or "error" in posted.values() or time.monotonic() > deadline:
            return posted
        time.sleep(0.2)


def peer_failure_message(ctx: DistributedContext, cause: str, posted: dict[int, str] | None) -> str | None:
    """Returns the one line a rank prints when a collective failed because of another rank (None: another rank prints it).

    ``posted``: each rank's reason for stopping, from the job's store (``_post_and_collect``);
    the ranks missing from it said nothing. Of the ranks that report the same thing, the
    lowest prints it.
    """
    here = f"rank {ctx.rank} of {ctx.world_size}"
    timeout = f"{_process_group_timeout_s:g}"
    if posted is None:  # the store is gone too: what this rank saw is all there is
        if cause == "timed_out":
            return (f"{here}: a collective timed out after {timeout} s (--process-group-timeout): another rank "
                    "stopped answering (hung or far slower than the others)")
        return f"{here} stopped: another rank went away (see the error above, or torchrun's summary)"
    failed = sorted(rank for rank, why in posted.items() if why == "error")
    if failed:
        return (f"{here} stopped: rank {', '.join(map(str, failed))} failed (its error is above)"
                if ctx.rank == min(rank for rank in posted if posted[rank] != "error") else None)
    silent = [rank for rank in range(ctx.world_size) if rank not in posted]
    if ctx.rank != min(posted):
        return None
    names = ", ".join(map(str, silent))
    ranks = "rank" if len(silent) == 1 else "ranks"
    if cause == "timed_out" and silent:
        return (f"{here}: hang: a collective waited {timeout} s (--process-group-timeout) for {ranks} {names}, which "
                f"stopped answering: hung or far slower than the others (a stuck data read, generation or "
                f"grading, an overloaded node); raise --process-group-timeout only if {ranks} {names} is merely slow")
    if cause == "timed_out":
        return (f"{here}: hang: every rank timed out after {timeout} s (--process-group-timeout) waiting for the "
                "others: they are in different collectives (one rank skipped or added one)")
    if silent:
        return (f"{here} stopped: {ranks} {names} went away without an error (killed by a signal: out of memory? "
                "see torchrun's summary and the system log)")
    return f"{here} stopped: another rank went away (see torchrun's summary)"


def _timed_out(error: BaseException) -> bool:
    """Returns True for a collective that gave up waiting after the process-group timeout (gloo's "Timed out waiting")."""
    text = str(error)
    return isinstance(error, RuntimeError) and ("Timed out waiting" in text or "timed out" in text.lower()
                                                and ("gloo" in text or "collective" in text.lower()))


def _lost_a_peer(error: BaseException) -> bool:
    """Returns True for a collective that failed because another rank went away (gloo or NCCL)."""
    if isinstance(error, getattr(dist, "DistError", ())):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(
        sign in text for sign in ("Connection reset by peer", "Connection closed by peer", "gloo/transport"))


# ---------------------------------------------------------------------------------------------
# Named reductions across ranks (identity at world size 1)


def global_sum(value: float | torch.Tensor) -> int | float | torch.Tensor:
    """Returns ``value`` summed over every rank (same type back: int, float or a tensor on its device)."""
    return _all_reduce(value, dist.ReduceOp.SUM)


def global_max(value: float | torch.Tensor) -> int | float | torch.Tensor:
    """Returns the largest ``value`` of every rank (same type back)."""
    return _all_reduce(value, dist.ReduceOp.MAX)


def _all_reduce(value, op):
    if not _active():
        return value
    device = _collective_device()
    if torch.is_tensor(value):
        reduced = value.detach().to(device, copy=True)
        dist.all_reduce(reduced, op=op)
        return reduced.to(value.device)
    dtype = torch.int64 if isinstance(value, (bool, int)) else torch.float64
    reduced = torch.tensor(value, dtype=dtype, device=device)
    dist.all_reduce(reduced, op=op)
    return int(reduced.item()) if dtype == torch.int64 else float(reduced.item())


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_objects(obj: Any, group: Any = None) -> list[Any]:
    """Returns the list of every rank's ``obj`` (picklable, from our own processes), in rank order; ``[obj]`` at world size 1.

    ``group``: a process group of every rank other than the default one (``side_group``), for
    a thread that gathers while the main thread runs collectives of its own.
    """
    if not _active():
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj, group=group)
    return gathered


def side_group() -> Any:
    """Returns a new gloo process group of every rank (None at world size 1); every rank must call it, in the same order.

    Collectives of one group run in order; a background thread (GRPO's ``--async-steps``) that
    gathers objects on the default group would interleave with the main thread's FSDP
    collectives. Its own group keeps the two streams apart (gloo: the objects are on CPU).
    """
    if not _active():
        return None
    return dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=_process_group_timeout_s))


def broadcast_object(obj: Any, source_rank: int = 0) -> Any:
    """Returns ``source_rank``'s ``obj`` on every rank (e.g. a path or seed rank 0 chose)."""
    if not _active():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=source_rank)
    return holder[0]


def barrier() -> None:
    """Waits until every rank arrives (no-op at world size 1)."""
    if _active():
        dist.barrier()


# ---------------------------------------------------------------------------------------------
# Which items of a global batch this rank takes


def rank_slice(n_items: int, ctx: DistributedContext, group_size: int = 1) -> slice:
    """Returns the contiguous slice of ``n_items`` that this rank takes: disjoint, covering, groups never split.

    Items come in groups of ``group_size`` (a GRPO/EI prompt's responses); the ``n_items //
    group_size`` groups are dealt out in contiguous runs, the first ``groups % world_size`` ranks
    taking one more. Deterministic: it depends only on the counts and the rank, so a resumed run
    slices its batches exactly as the interrupted one did.
    """
    if group_size < 1 or n_items % group_size:
        raise ValueError(f"{n_items} items do not split into groups of {group_size}")
    groups = n_items // group_size
    base, extra = divmod(groups, ctx.world_size)
    start = ctx.rank * base + min(ctx.rank, extra)
    stop = start + base + (1 if ctx.rank < extra else 0)
    return slice(start * group_size, stop * group_size)




# ---------------------------------------------------------------------------------------------
# FSDP2


def shard_model(model: torch.nn.Module, ctx: DistributedContext, *, mixed_precision: bool = False,
                cpu_offload: bool = False, reshard_after_forward: bool = True) -> torch.nn.Module:
    """Returns ``model`` sharded with FSDP2 (``fully_shard`` per decoder layer, then the root); unchanged at world size 1.

    The model must already be on ``ctx.device`` (or on CPU with ``cpu_offload``). Parameters
    become DTensors sharded on dim 0 over the ranks; each layer is all-gathered for its forward
    and backward and its gradients are reduce-scattered. Gradients are SUMMED over ranks (divide
    factor 1): our losses already divide by counts summed over every rank.

    Args:
        mixed_precision: bf16 parameters for compute with fp32 gradient reduction (GPU);
            the sharded master weights and optimizer state stay in the model's dtype.
        cpu_offload: keep sharded parameters, gradients and optimizer state in CPU memory
            (GPU runs under torchrun only; ValueError otherwise, never silently ignored).
        reshard_after_forward: free each layer's gathered weights after its forward (less
            memory, one more all-gather in backward).

    Activation checkpointing composes either way round: ``model.gradient_checkpointing_enable()``
    may be called before or after this.
    """
    if cpu_offload and ctx.device.type != "cuda":
        raise ValueError("cpu_offload moves sharded parameters from the GPU to CPU memory; on a CPU run they are "
                         "there already: turn it off")
    if cpu_offload and not ctx.is_distributed:
        raise ValueError("cpu_offload works through FSDP2 sharding, which needs a torchrun launch "
                         "(torchrun --nproc_per_node N …); turn it off for a single process")
    if not ctx.is_distributed:
        return model
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    options: dict[str, Any] = {
        "mp_policy": MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if mixed_precision else MixedPrecisionPolicy(),
        "offload_policy": CPUOffloadPolicy() if cpu_offload else OffloadPolicy(),
    }
    for layer in decoder_layers(model):
        fully_shard(layer, reshard_after_forward=reshard_after_forward, **options)
    # The root (embeddings, final norm, LM head) stays gathered after forward: backward needs it at once.
    fully_shard(model, reshard_after_forward=False, **options)
    for module in model.modules():
        if hasattr(module, "set_gradient_divide_factor") and hasattr(module, "set_force_sum_reduction_for_comms"):
            module.set_gradient_divide_factor(1.0)
            # A plain SUM collective: gloo has no PREMUL_SUM, and NCCL reduces SUM zero-copy.
            module.set_force_sum_reduction_for_comms(True)
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    """Returns True when ``model`` was sharded by ``shard_model`` (its parameters are DTensors)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """Returns the whole of ``tensor`` (detached): a sharded DTensor gathered (a collective: every rank calls it), else itself."""
    from torch.distributed.tensor import DTensor

    tensor = tensor.detach()
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def full_state_dict_layers(model: torch.nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Yields the model's full (unsharded) weights a few at a time: the root's own tensors, then one decoder layer per dict.

    Each dict maps the HF parameter/buffer name (as in ``model.state_dict()``) to a full tensor
    on the parameter's device; only one layer is ever gathered at once, so a generator (vLLM
    ``load_weights``) or a safetensors writer never needs the whole model on one device. Every
    rank must iterate (the gathers are collectives); every rank receives the full tensors.
    Works unsharded too (then it is a plain walk over ``state_dict``).
    """
    state = model.state_dict()  # sharded DTensors: nothing is gathered yet
    layer_prefixes = decoder_layer_prefixes(model)
    own = {name: full_tensor(tensor) for name, tensor in state.items()
           if not any(name.startswith(prefix) for prefix in layer_prefixes)}
    yield own
    for prefix in layer_prefixes:
        yield {name: full_tensor(tensor) for name, tensor in state.items() if name.startswith(prefix)}
