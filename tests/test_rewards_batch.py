"""grade_batch: order, parallel workers, and survival of hung, crashed and memory-hungry items."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from reasontune.rewards import GradedBatch, grade_batch, question_only_reward_fn, r1_zero_reward_fn
from reasontune.rewards import sandbox


def misbehaving_reward_fn(response: str, ground_truth):
    """Hang, crash or blow memory on command; otherwise grade as R1-Zero."""
    if response == "hang":
        time.sleep(600)
    if response == "exit":
        os._exit(3)
    if response == "segfault":
        os.kill(os.getpid(), signal.SIGSEGV)
    if response == "memory":
        bytearray(3 * 1024**3)  # three GiB: past the worker's 1 GiB limit below
    if response == "raise":
        raise ValueError("bad item")
    return r1_zero_reward_fn(response, ground_truth)


def _ok(answer: str) -> str:
    return f"x </think> <answer>{answer}</answer>"


def test_results_come_back_in_input_order():
    # Hand-written: answers i+1 against references i+1, except every third one is off by one.
    responses = [_ok(str(i + 1 if i % 3 else i + 2)) for i in range(40)]
    truths = [str(i + 1) for i in range(40)]
    results = grade_batch(responses, truths, workers=2)
    assert isinstance(results, GradedBatch) and results.num_errors == 0
    assert [r["answer_reward"] for r in results] == [0.0 if i % 3 == 0 else 1.0 for i in range(40)]


def test_hung_and_crashed_workers_do_not_stall_the_batch():
    responses = [_ok("1"), "hang", _ok("2"), "exit", _ok("\\frac{1}{2}"), "segfault", "raise", _ok("4"), "memory", _ok("5")]
    truths = ["1", "0", "2", "0", "0.5", "0", "0", "5", "0", "5"]
    start = time.monotonic()
    with pytest.warns(UserWarning, match="5 of 10 items not graded"):
        results = grade_batch(
            responses, truths, reward_fn=misbehaving_reward_fn, workers=2, timeout=1.0,
            memory_limit_bytes=1024**3,
        )
    assert time.monotonic() - start < 30  # one hang costs ~1 s plus a worker restart
    assert len(results) == 10
    assert [r["reward"] for r in results] == [1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    assert set(results.errors) == {1, 3, 5, 6, 8}
    assert "timed out" in results.errors[1]
    assert results.errors[3] == results.errors[5] == "worker died"
    assert "ValueError" in results.errors[6] and "MemoryError" in results.errors[8]
    assert results[1]["grading_error"] and "grading_error" not in results[0]


def test_grade_batch_works_from_a_non_main_thread():
    found = {}

    def run():
        found["results"] = grade_batch(
            ["\\boxed{12}", "\\boxed{13}", "no box"], ["12", "12", "12"],
            reward_fn=question_only_reward_fn, workers=2,
        )

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(60)
    assert [r["reward"] for r in found["results"]] == [1.0, 0.0, 0.0]


def test_in_process_mode_and_input_checks():
    assert grade_batch([_ok("7")], ["7"], workers=0)[0]["reward"] == 1.0
    assert grade_batch([], [], workers=2) == []
    with pytest.raises(ValueError, match="2 responses but 1 ground truths"):
        grade_batch(["a", "b"], ["1"])


def _sleep(seconds: float) -> str:
    time.sleep(seconds)
    return "done"


def test_run_bounded_kills_an_overrunning_call_from_a_thread():
    result = {}
    thread = threading.Thread(target=lambda: result.update(value=sandbox.run_bounded(_sleep, (30,), timeout=0.5)))
    start = time.monotonic()
    thread.start()
    thread.join(30)
    assert result["value"] == ("timeout", None)
    assert time.monotonic() - start < 15
    assert sandbox.run_bounded(_sleep, (0,), timeout=5) == ("ok", "done")


def test_symbolic_items_are_graded_inside_the_workers():
    # (x-1)(x+1) = x^2 - 1 and sqrt(12) = 2 sqrt(3) by hand; x^2 + 1 differs from (x+1)^2 by 2x.
    results = grade_batch(
        [_ok("(x-1)(x+1)"), _ok("2\\sqrt{3}"), _ok("x^2+1")], ["x^2-1", "\\sqrt{12}", "(x+1)^2"], workers=2
    )
    assert [r["answer_reward"] for r in results] == [1.0, 1.0, 0.0]


def pid_reward_fn(response: str, ground_truth):
    """Grades as R1-Zero and says which worker process graded."""
    return {**r1_zero_reward_fn(response, ground_truth), "worker_pid": os.getpid()}


def test_default_workers_share_the_node_cores_among_its_ranks(monkeypatch):
    from reasontune.rewards.batch import default_grading_workers

    cores = len(os.sched_getaffinity(0))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert default_grading_workers() == cores
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun --nproc_per_node 4 sets it in every rank
    assert default_grading_workers() == max(1, cores // 4)
    # As many ranks as cores: one worker per rank; every item of a batch is graded by that one process.
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(cores))
    results = grade_batch([_ok(str(i)) for i in range(40)], [str(i) for i in range(40)], reward_fn=pid_reward_fn)
    assert len({result["worker_pid"] for result in results}) == 1 and results.num_errors == 0
    assert all(result["reward"] == 1.0 for result in results)


def test_importing_the_reward_module_is_not_charged_to_an_items_timeout():
    from slow_import_reward import slow_module_reward_fn  # 1.5 s to import, here and in each fresh worker

    sandbox.POOL.shutdown()  # fresh workers: each must import the module before its first item
    results = grade_batch([_ok("3"), _ok("4")], ["3", "5"], reward_fn=slow_module_reward_fn, workers=2, timeout=1.0)
    assert results.num_errors == 0
    assert [r["reward"] for r in results] == [1.0, 0.0]
    (status, value) = sandbox.run_bounded(slow_module_reward_fn, (_ok("7"), "7"), timeout=1.0)
    assert status == "ok" and value["reward"] == 1.0
