"""SIGINT/SIGTERM during training: the step finishes, a checkpoint is saved, the resume command is printed, exit 130.

A real run (a subprocess on the tiny model, CPU, one thread) is interrupted at whatever step
the signal lands on and resumed with the command it printed; the final weights must equal
those of the same run left uninterrupted (resume restores weights, optimizer, schedule, RNG
and data position, so nothing may differ, whichever step was interrupted).
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_model_dir
from safetensors.torch import load_file

from reasontune.cli import main

REPO = Path(__file__).resolve().parents[1]


def reasontune_process(argv: list[str], cwd: Path) -> subprocess.Popen:
    """Starts ``python -m reasontune ARGV`` with this checkout first on the path and one CPU thread."""
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "reasontune", *argv], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for_train_line(run_dir: Path, process: subprocess.Popen, timeout: float = 120.0) -> None:
    """Returns once metrics.jsonl holds a ``train`` line (the loop is running); fails if the process ends first."""
    deadline = time.monotonic() + timeout
    metrics = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline:
        if metrics.exists() and '"kind": "train"' in metrics.read_text():
            return
        if process.poll() is not None:
            pytest.fail(f"the run ended before training: {process.communicate()}")
        time.sleep(0.02)
    process.kill()
    pytest.fail("no train line within the timeout")


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "final" / "model.safetensors")


def write_sft_data(path: Path, count: int) -> Path:
    with path.open("w") as handle:
        for i in range(count):
            handle.write(json.dumps({"prompt": f"What is {i} + 30?",
                                     "response": f" {i} + 30 = {i + 30} </think> <answer>{i + 30}</answer>"}) + "\n")
    return path


def interrupt_and_resume(tmp_path: Path, argv: list[str], run_dir: Path, signum: int) -> str:
    """Returns the interrupted run's stderr after sending ``signum`` mid-training and resuming with the printed command."""
    process = reasontune_process(argv, tmp_path)
    wait_for_train_line(run_dir, process)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert any(run_dir.glob("checkpoint-*")) and not (run_dir / "final").exists()
    command = stderr.strip().splitlines()[-1]
    assert command.startswith("resume with: reasontune "), stderr
    resumed = reasontune_process(shlex.split(command.removeprefix("resume with: reasontune ")), tmp_path)
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    return stderr


def assert_same_final_weights(expected_dir: Path, got_dir: Path) -> None:
    expected, got = final_weights(expected_dir), final_weights(got_dir)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    events = [json.loads(line) for line in (got_dir / "metrics.jsonl").read_text().splitlines()]
    assert any(e["kind"] == "event" and "stopped by" in e["message"] for e in events)
    assert any(e["kind"] == "event" and "resumed from checkpoint-" in e["message"] for e in events)


@pytest.mark.slow
def test_sft_interrupted_by_sigint_and_resumed_ends_at_the_uninterrupted_weights(tmp_path, monkeypatch):
    model = build_tiny_model_dir(tmp_path / "model")
    data = write_sft_data(tmp_path / "train.jsonl", 24)
    # 24 examples, batch 1, 5 epochs: 120 optimizer steps, seconds of training after a few of startup.
    common = ["sft", "--model", str(model), "--train-data", str(data), "--batch-size", "1",
              "--gradient-accumulation-steps", "1", "--num-epochs", "5", "--learning-rate", "1e-3",
              "--max-length", "64", "--num-threads", "1", "--no-progress", "--no-write-report", "--eval-examples", "0"]
    stderr = interrupt_and_resume(tmp_path, [*common, "--output-dir", "stopped"], tmp_path / "stopped", signal.SIGINT)
    assert "SIGINT" in stderr
    monkeypatch.chdir(tmp_path)
    assert main([*common, "--output-dir", "straight"]) == 0  # the same run, uninterrupted, in this process
    assert_same_final_weights(tmp_path / "straight", tmp_path / "stopped")


@pytest.mark.slow
@pytest.mark.parametrize("overlap", [[], ["--async-steps", "1", "--loss-type", "grpo_clip"]], ids=["on-policy", "async-1"])
def test_grpo_interrupted_by_sigterm_and_resumed_ends_at_the_uninterrupted_weights(tmp_path, monkeypatch, overlap,
                                                                                   varied_reward):
    model = build_tiny_model_dir(tmp_path / "model")
    with (tmp_path / "questions.jsonl").open("w") as handle:
        for i in range(12):
            handle.write(json.dumps({"question": f"What is {i} + 30?", "answer": str(i + 30)}) + "\n")
    # varied_reward: a reward a random model earns unevenly, so every step moves the weights.
    # 2 questions x 2 samples of 6 tokens a step, graded in this process: many short steps. With --async-steps 1
    # the checkpoint must also hold the next step's rollouts, sampled from the weights before it.
    common = ["grpo", "--model", str(model), "--train-data", str(tmp_path / "questions.jsonl"), "--n-grpo-steps", "60",
              "--rollout-batch-size", "4", "--group-size", "2", "--train-batch-size", "4",
              "--gradient-accumulation-steps", "2", "--sampling-max-tokens", "6", "--sampling-min-tokens", "1",
              "--learning-rate", "1e-3", "--grading-workers", "0", "--num-threads", "1", "--no-progress",
              "--no-write-report", "--eval-examples", "0", "--device", "cpu", "--dtype", "float32",
              "--reward", varied_reward, *overlap]
    stderr = interrupt_and_resume(tmp_path, [*common, "--output-dir", "stopped"], tmp_path / "stopped", signal.SIGTERM)
    assert "SIGTERM" in stderr
    monkeypatch.chdir(tmp_path)
    assert main([*common, "--output-dir", "straight"]) == 0
    assert_same_final_weights(tmp_path / "straight", tmp_path / "stopped")
    start = load_file(model / "model.safetensors")
    assert any(not torch.equal(start[name], tensor) for name, tensor in final_weights(tmp_path / "straight").items())
    events = [json.loads(line) for line in (tmp_path / "stopped" / "metrics.jsonl").read_text().splitlines()]
    assert not any("sample from the resumed weights" in e.get("message", "") for e in events)
