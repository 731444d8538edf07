"""The report of each kind of directory: GRPO/EI rollout curves in their own step unit, the run's own config fields, eval directories."""

from __future__ import annotations

import json
from pathlib import Path

from reasontune.cli import main
from reasontune.report import write_report
from reasontune.report.reading import read_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_jsonl(path: Path, records) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_grpo_report_plots_rollout_curves_per_grpo_step_and_shows_grpo_settings(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"command": "grpo", "model": "m", "train_data": "q.jsonl", "n_grpo_steps": 3,
                                                      "group_size": 8, "loss_type": "grpo_clip", "kl_coef": 0.04,
                                                      "batch_size_never_a_grpo_field": 99}))
    write_jsonl(tmp_path / "metrics.jsonl", [
        {"kind": "train", "step": s, "loss": 0.1 * s, "reward": 0.2 * s, "format_reward": 0.3, "answer_reward": 0.2 * s,
         "accuracy": 0.2 * s, "pass_at_n": 0.5, "clip_fraction": 0.01 * s, "kl": 0.002 * s, "token_entropy": 1.0,
         "mean_response_tokens": 100 + s, "mean_response_tokens_correct": 90, "mean_response_tokens_incorrect": 120}
        for s in (1, 2, 3)])
    run = read_run(tmp_path)
    assert run.kind == "grpo" and run.step_unit.startswith("GRPO step")
    report = write_report(tmp_path)
    for name in ("rollout_reward.png", "rollout_accuracy.png", "clip_fraction_kl.png", "rollout_length.png",
                 "entropy.png", "loss.png"):
        assert (report / name).read_bytes()[:8] == PNG_MAGIC, name
    assert not (report / "ei_kept.png").exists()  # no EI fields in a GRPO run
    page = (report / "index.html").read_text()
    assert "kl_coef" in page and "grpo_clip" in page and "GRPO steps" in page
    summary = (report / "summary.md").read_text()  # the settings table: the run's GRPO fields only
    assert "kl_coef" in summary and "batch_size_never_a_grpo_field" not in summary


def test_report_works_on_an_eval_directory(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"command": "eval", "model": "m", "data": "q.jsonl", "eval_n_samples": 1}))
    write_jsonl(tmp_path / "records.jsonl", [
        {"index": 0, "sample": 0, "prompt": "Q", "response": "</think> <answer>1</answer>", "ground_truth": "1",
         "format_reward": 1.0, "answer_reward": 1.0, "reward": 1.0, "category": "correct", "response_tokens": 5,
         "finish_reason": "stop"}])
    (tmp_path / "summary.json").write_text(json.dumps({"accuracy": 0.25, "format_rate": 0.75}))
    assert main(["report", str(tmp_path)]) == 0
    page = (tmp_path / "report" / "index.html").read_text()
    assert "25.0%" in page and "75.0%" in page and "q.jsonl" in page
    assert read_run(tmp_path).kind == "eval"
