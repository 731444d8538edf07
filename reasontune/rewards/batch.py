"""Parallel grading of a batch in bounded worker processes."""

from __future__ import annotations

import os
import time
import warnings
from collections import deque
from typing import Callable, Sequence

from reasontune.rewards import sandbox
from reasontune.rewards.grading import DEFAULT_TIMEOUT_SECONDS, GroundTruth, r1_zero_reward_fn

RewardFn = Callable[[str, GroundTruth], dict]


class GradedBatch(list):
    """A list of reward dicts in input order, plus ``errors``: {index: why it was not graded}.

    An item whose worker overran the time limit or died is graded as all zeros and its
    dict carries ``"grading_error"``; nothing is dropped.
    """

    def __init__(self, items, errors: dict[int, str]):
        super().__init__(items)
        self.errors = errors

    @property
    def num_errors(self) -> int:
        return len(self.errors)


def _failed(reason: str) -> dict:
    return {"format_reward": 0.0, "answer_reward": 0.0, "reward": 0.0, "grading_error": reason}


def default_grading_workers() -> int:
    """Returns the grading workers one process starts by default: this node's cores shared by its ranks (``LOCAL_WORLD_SIZE``, torchrun's), at least 1.

    Every rank grades its own slice, so N ranks on a node with ``os.cpu_count()`` workers each
    would start N times as many processes as cores.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        local_ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        local_ranks = 1
    return max(1, cores // local_ranks)


def grade_batch(
    responses: Sequence[str],
    ground_truths: Sequence[GroundTruth],
    reward_fn: RewardFn = r1_zero_reward_fn,
    workers: int | None = None,
    timeout: float = DEFAULT_TIMEOUT_SECONDS,
    memory_limit_bytes: int = sandbox.DEFAULT_MEMORY_LIMIT_BYTES,
    chunk_size: int | None = None,
) -> GradedBatch:
    """Return ``reward_fn(response, ground_truth)`` for every pair, in input order, as a GradedBatch.

    Items run in ``workers`` worker processes (default: ``default_grading_workers()``, this
    node's cores divided by its ranks; at most one per item),
    each limited to ``memory_limit_bytes`` of address space; an item gets ``timeout`` seconds
    of wall time. A worker that overruns is killed, one that dies is noticed, both are
    replaced, and their item is graded all-zero with ``"grading_error"`` set. ``reward_fn``
    must be importable by name (a module-level function). ``workers=0`` grades in the calling
    process (symbolic checks are still bounded, but a crashing ``reward_fn`` is not contained).
    Safe to call from any thread.
    """
    if len(responses) != len(ground_truths):
        raise ValueError(f"{len(responses)} responses but {len(ground_truths)} ground truths")
    total = len(responses)
    if workers == 0:
        return GradedBatch([reward_fn(response, truth) for response, truth in zip(responses, ground_truths)], {})
    if total == 0:
        return GradedBatch([], {})
    workers = max(1, min(workers or default_grading_workers(), total))
    chunk_size = chunk_size or max(1, min(32, total // (4 * workers)))
    results: list[dict | None] = [None] * total
    errors: dict[int, str] = {}
    pending = deque(range(total))
    pool = sandbox.POOL.acquire(workers, memory_limit_bytes)
    # For each busy worker: the indices it was sent, not yet answered, and its deadline.
    assigned: dict[sandbox.Worker, tuple[deque, float]] = {}
    # responses/s and ETA for a large batch (a bar on a terminal, a line every 30 s in a log); lazy: workers never need it
    from reasontune.tracking import Progress

    progress = Progress(total, description="grade", unit="response", leave=False, enabled=total >= 512)

    def give_work(worker: sandbox.Worker) -> None:
        indices = deque(pending.popleft() for _ in range(min(chunk_size, len(pending))))
        loading = worker.send(reward_fn, [(responses[index], ground_truths[index]) for index in indices])
        # A worker's first chunk waits for it to import reward_fn's module, bounded as a start-up.
        assigned[worker] = (indices, time.monotonic() + (sandbox.STARTUP_TIMEOUT_SECONDS if loading else timeout))

    def replace(worker: sandbox.Worker, reason: str) -> None:
        indices, _ = assigned.pop(worker)
        failed = indices.popleft()
        results[failed], errors[failed] = _failed(reason), reason
        pending.extendleft(reversed(indices))
        worker.kill()
        pool.remove(worker)
        pool.extend(sandbox.POOL.acquire(1, memory_limit_bytes))

    try:
        while pending or assigned:
            for worker in pool:
                if worker not in assigned and pending:
                    give_work(worker)
            nearest = min(deadline for _, deadline in assigned.values())
            for worker in sandbox.wait_for_any(list(assigned), nearest - time.monotonic()):
                try:
                    status, value = worker.receive()
                except sandbox.WorkerDied:
                    replace(worker, "worker died")
                    continue
                indices, _ = assigned[worker]
                if status == "loaded":  # reward_fn imported: the first item's time starts now
                    assigned[worker] = (indices, time.monotonic() + timeout)
                    continue
                index = indices.popleft()
                progress.update(progress.step + 1)
                if status == "ok":
                    results[index] = value
                else:
                    results[index], errors[index] = _failed(value), value
                if indices:
                    assigned[worker] = (indices, time.monotonic() + timeout)
                else:
                    del assigned[worker]
            now = time.monotonic()
            for worker in [worker for worker, (_, deadline) in assigned.items() if deadline <= now]:
                replace(worker, f"timed out after {timeout:g} s")
    finally:
        progress.close()
        for worker in assigned:
            worker.kill()
        sandbox.POOL.release([worker for worker in pool if worker not in assigned])
    if errors:
        warnings.warn(f"grade_batch: {len(errors)} of {total} items not graded (scored 0): {sorted(errors)[:10]}", stacklevel=2)
    return GradedBatch(results, errors)
