"""MetricsLogger's JSONL contract, resume truncation, optional backends; Progress off the terminal."""

from __future__ import annotations

import io
import json
import math
import sys
import types

import pytest

from reasontune.tracking import MetricsLogger, Progress


def read_lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_each_line_is_flushed_before_close(tmp_path):
    logger = MetricsLogger(tmp_path)
    logger.log("data", train_examples=37, truncated=3)
    logger.log("train", 1, loss=2.5, lr=1e-4)
    # Read while the logger is still open: a crash right now must lose nothing.
    assert read_lines(tmp_path / "metrics.jsonl") == [
        {"kind": "data", "train_examples": 37, "truncated": 3},
        {"kind": "train", "step": 1, "loss": 2.5, "lr": 1e-4},
    ]
    logger.close()
    logger.close()


def test_tensor_and_numpy_values_become_plain_numbers_and_nan_stays_visible(tmp_path):
    import numpy as np
    import torch

    with MetricsLogger(tmp_path) as logger:
        logger.log("train", 3, loss=torch.tensor(0.75), grad_norm=np.float32(1.5), response_tokens=np.int64(41),
                   token_entropy=None, bad=float("nan"))
    (record,) = read_lines(tmp_path / "metrics.jsonl")
    assert record["loss"] == 0.75 and record["grad_norm"] == 1.5 and record["response_tokens"] == 41
    assert record["token_entropy"] is None
    assert math.isnan(record["bad"])


def test_fresh_run_starts_a_new_file_and_resume_appends(tmp_path):
    with MetricsLogger(tmp_path) as logger:
        logger.log("train", 1, loss=3.0)
    with MetricsLogger(tmp_path) as logger:
        logger.log("train", 1, loss=2.0)
    assert [r["loss"] for r in read_lines(tmp_path / "metrics.jsonl")] == [2.0]
    with MetricsLogger(tmp_path, resume=True) as logger:
        logger.log("train", 2, loss=1.0)
    assert [r["loss"] for r in read_lines(tmp_path / "metrics.jsonl")] == [2.0, 1.0]


def test_truncate_after_drops_steps_beyond_the_checkpoint(tmp_path):
    with MetricsLogger(tmp_path) as logger:
        logger.log("data", train_examples=11)
        for step in range(1, 8):
            logger.log("train", step, loss=10.0 - step)
        logger.log("eval", 5, accuracy=0.25)
        logger.log("eval", 7, accuracy=0.5)
        logger.log("event", 7, message="stopped: loss is NaN")
    # A crash in the middle of a write leaves an unterminated, unparseable last line.
    with open(tmp_path / "metrics.jsonl", "a") as file:
        file.write('{"kind": "train", "step": 8, "lo')

    with MetricsLogger(tmp_path, resume=True) as logger:
        dropped = logger.truncate_after(5)
        logger.log("event", 5, message="resumed from checkpoint-5")
        logger.log("train", 6, loss=4.5)
    records = read_lines(tmp_path / "metrics.jsonl")
    # 7 train + 2 eval + 1 event + 1 data + 1 partial = 12 lines; kept: data, train 1..5, eval 5 = 7.
    assert dropped == 5
    assert [(r["kind"], r.get("step")) for r in records] == [
        ("data", None), ("train", 1), ("train", 2), ("train", 3), ("train", 4), ("train", 5), ("eval", 5),
        ("event", 5), ("train", 6),
    ]
    assert records[-1]["loss"] == 4.5


def test_missing_backends_fail_clearly_only_when_asked_for(tmp_path, monkeypatch):
    # None in sys.modules makes `import` raise ImportError whether or not the package is installed.
    monkeypatch.setitem(sys.modules, "wandb", None)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ImportError, match=r"pip install 'reasontune\[wandb\]'"):
        MetricsLogger(tmp_path / "a", wandb_project="reasontune-test")
    with pytest.raises(ImportError, match=r"pip install 'reasontune\[tensorboard\]'"):
        MetricsLogger(tmp_path / "b", tensorboard=True)
    # Failing before touching the run directory leaves no half-made metrics file behind.
    assert not (tmp_path / "a" / "metrics.jsonl").exists()
    with MetricsLogger(tmp_path / "c") as logger:
        logger.log("train", 1, loss=1.0)


class FakeWandbRun:
    def __init__(self, run_id):
        self.id = run_id
        self.logged = []
        self.summary = {}
        self.finished = False

    def log(self, values):
        self.logged.append(values)

    def finish(self):
        self.finished = True


def make_fake_wandb(calls):
    module = types.ModuleType("wandb")

    def init(**kwargs):
        calls.append(("init", kwargs))
        run = FakeWandbRun(kwargs.get("id") or "run-abc123")
        calls.append(("run", run))
        return run

    module.init = init
    module.define_metric = lambda name, step_metric=None: calls.append(("define_metric", name, step_metric))
    return module


def test_wandb_gets_per_kind_step_axes_and_resumes_the_same_run(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "wandb", make_fake_wandb(calls))
    with MetricsLogger(tmp_path, wandb_project="proj", config={"learning_rate": 3e-5}) as logger:
        logger.log("train", 4, loss=1.25, token_entropy=None)
        logger.log("eval", 4, accuracy=0.5, dir="eval/step-000004")
        run = next(c[1] for c in calls if c[0] == "run")
    assert ("define_metric", "train/*", "train_step") in calls
    assert ("define_metric", "eval/*", "eval_step") in calls
    assert run.logged == [{"train/loss": 1.25, "train_step": 4}, {"eval/accuracy": 0.5, "eval_step": 4}]
    assert run.finished
    init_kwargs = calls[0][1]
    assert init_kwargs["project"] == "proj" and init_kwargs["config"] == {"learning_rate": 3e-5}
    assert init_kwargs["id"] is None

    calls.clear()
    with MetricsLogger(tmp_path, wandb_project="proj", resume=True):
        pass
    assert calls[0][1]["id"] == "run-abc123" and calls[0][1]["resume"] == "allow"


def test_progress_is_silent_off_a_terminal_and_when_disabled():
    not_a_terminal = io.StringIO()
    with Progress(total_steps=10, stream=not_a_terminal) as progress:
        progress.update(3, loss=1.5, tokens_per_s=1234.0)
        assert not progress.enabled and progress.step == 3
    assert not_a_terminal.getvalue() == ""

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal = Terminal()
    with Progress(total_steps=10, stream=terminal, enabled=False) as progress:
        progress.update(2, loss=1.0)
    assert terminal.getvalue() == ""

    terminal = Terminal()
    with Progress(total_steps=10, initial_step=2, stream=terminal) as progress:
        progress.update(5, loss=0.8125, tokens_per_s=2048.0)
    shown = terminal.getvalue()
    assert "5/10" in shown and "loss=0.8125" in shown and "2,048" in shown
