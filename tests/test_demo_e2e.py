"""The README's first command, end to end: `reasontune demo` learns the task (slow: minutes on 2 CPUs)."""

from __future__ import annotations

import json

import pytest

from reasontune.cli import main


@pytest.mark.slow
def test_demo_reaches_90_percent_held_out_accuracy(tmp_path):
    assert main(["demo", "--output-dir", str(tmp_path), "--no-progress"]) == 0
    run_dir = tmp_path / "sft"
    summaries = sorted((run_dir / "eval").glob("step-*/summary.json"))
    # before training, --evaluations (4) in between, after: report/accuracy.png is a curve
    assert len(summaries) == 6, "expected evaluations before, during and after training"
    before, after = (json.loads(path.read_text()) for path in (summaries[0], summaries[-1]))
    assert before["accuracy"] <= 0.05, "an untrained model should not solve the task"
    assert after["accuracy"] >= 0.90 and after["format_rate"] >= 0.90
    assert after["n_examples"] == 256
    records = [json.loads(line) for line in (summaries[-1].parent / "records.jsonl").read_text().splitlines()]
    assert sum(r["answer_reward"] for r in records) / len(records) == pytest.approx(after["accuracy"])
    for plot in ("loss.png", "accuracy.png", "learning_rate.png"):
        assert (run_dir / "report" / plot).stat().st_size > 1000
    assert (run_dir / "final" / "model.safetensors").exists()
