"""`reasontune report`: plots, the summary page and its escaping, tolerance of bad and missing input."""

from __future__ import annotations

import json

import pytest

from reasontune.cli import main
from reasontune.report import write_report
from reasontune.report.pages import pick_samples
from reasontune.report.reading import outcome_counts

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SCRIPT_RESPONSE = "Let me think <script>alert('x')</script> </think> <answer>41</answer>"


def write_jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def record(prompt, response, ground_truth, format_reward, answer_reward):
    return {"prompt": prompt, "response": response, "ground_truth": ground_truth, "response_tokens": len(response.split()),
            "format_reward": format_reward, "answer_reward": answer_reward, "reward": answer_reward}


@pytest.fixture
def run_dir(tmp_path):
    """A small SFT run: 12 steps, evals at 0 and 12 (27% → 73%), an event, a malformed line, a checkpoint."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({
        "command": "sft", "model": "Qwen/Qwen2.5-Math-1.5B", "learning_rate": 3e-05, "batch_size": 4, "gradient_accumulation_steps": 8,
        "num_epochs": 2, "max_length": 1024, "loss_normalization": "token_mean", "packing": False, "dtype": "bfloat16",
        "seed": 17, "eval_every": 12}))
    lines = [json.dumps({"kind": "data", "step": 0, "train_examples": 480, "truncated_examples": 3})]
    lines.append(json.dumps({"kind": "eval", "step": 0, "accuracy": 0.27, "format_rate": 0.45,
                             "mean_response_tokens": 187.5, "mean_entropy": 1.9, "dir": "eval/step-000000"}))
    for step in range(1, 13):
        lines.append(json.dumps({"kind": "train", "step": step, "epoch": step / 6, "loss": 2.0 / step, "lr": 3e-5 * (1 - step / 13),
                                 "grad_norm": 5.0 / step, "token_entropy": 1.5 - step / 20 if step != 4 else None,
                                 "response_tokens": 2000 + step, "tokens_per_s": 1000.0 + step, "response_tokens_per_s": 611.0,
                                 "elapsed_s": 10.0 * step, "some_future_key": [1, 2]}))
        if step == 5:
            lines.append('{"kind": "train", "step": 6, "loss": ')  # cut short: line 8 of the file
            lines.append(json.dumps({"kind": "event", "step": 5, "message": "resumed from checkpoint-5"}))
            lines.append(json.dumps({"kind": "gpu_memory", "step": 5, "allocated": 1.0}))  # unknown kind: ignored
    lines.append(json.dumps({"kind": "eval", "step": 12, "accuracy": 0.73, "format_rate": 0.91,
                             "mean_response_tokens": 141.0, "mean_entropy": 0.8, "dir": "eval/step-000012"}))
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")

    write_jsonl(run / "eval" / "step-000000" / "records.jsonl", [
        record("Q: 2+2?", "no idea", "4", 0.0, 0.0),
        record("Q: 3+5?", "</think> <answer>8</answer>", "8", 1.0, 1.0),
    ])
    (run / "eval" / "step-000000" / "summary.json").write_text(json.dumps({"accuracy": 0.27, "format_rate": 0.45}))
    long_prompt = "A" * 1000 + " What is 20+21? Assistant: <think>"
    write_jsonl(run / "eval" / "step-000012" / "records.jsonl", [
        record(long_prompt, SCRIPT_RESPONSE, "41", 1.0, 1.0),
        record("Q: 6*7?", "</think> <answer>43</answer> & more", "42", 1.0, 0.0),
        record("Q: 9-1?", "I give up </answer>", "8", 0.0, 0.0),
        record("Q: 1+1?", "</think> <answer>2</answer>", "2", 1.0, 1.0),
    ])
    (run / "eval" / "step-000012" / "summary.json").write_text(json.dumps(
        {"accuracy": 0.73, "format_rate": 0.91, "counts": {"correct": 2, "formatted_wrong": 1, "unformatted": 1},
         "mean_entropy": 0.8}))
    (run / "checkpoint-10").mkdir()
    (run / "checkpoint-5").mkdir()
    (run / "final").mkdir()
    return run


def test_report_writes_valid_pngs_and_a_page_with_the_run(run_dir):
    report = write_report(run_dir)
    assert report == run_dir / "report"
    for name in ("loss.png", "learning_rate.png", "grad_norm.png", "accuracy.png", "entropy.png", "response_length.png"):
        data = (report / name).read_bytes()
        assert data[:8] == PNG_MAGIC, name
        assert len(data) > 1024, name

    page = (report / "index.html").read_text()
    assert "27.0% (before training) → 73.0% (step 12)" in page
    assert "45.0% → 91.0%" in page
    # Outcomes counted from records: after = 2 correct, 1 formatted wrong (43 vs 42), 1 unformatted.
    assert "2 correct / 1 formatted but wrong / 1 unformatted of 4" in page
    assert "1 correct / 0 formatted but wrong / 1 unformatted of 2" in page
    assert "metrics.jsonl line 8 skipped: invalid JSON" in page
    assert "resumed from checkpoint-5" in page and "train_examples 480, truncated_examples 3</li>" in page
    assert "Qwen/Qwen2.5-Math-1.5B" in page and "token_mean" in page and "bfloat16" in page
    assert "1,007 (median over logged steps)" in page  # tokens/s 1001..1012: the upper median, 7th of 12
    assert "0:02:00" in page  # elapsed 120 s at step 12
    for name in ("loss.png", "accuracy.png", "response_length.png"):
        assert f"src='{name}'" in page
    # Checkpoints in step order, not name order (checkpoint-10 sorts before checkpoint-5 as text).
    assert page.index("checkpoint-5/") < page.index("checkpoint-10/") < page.index("final/")


def test_model_text_is_escaped_and_samples_come_from_the_last_eval(run_dir):
    page = (write_report(run_dir) / "index.html").read_text()
    assert "<script>" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    assert "&lt;/answer&gt; &amp; more" in page
    assert "I give up &lt;/answer&gt;" in page
    # The step-0 records are not the samples; the prompt is shown by its tail only.
    assert "no idea" not in page
    assert "A" * 301 not in page and "What is 20+21? Assistant: &lt;think&gt;" in page

    summary = (run_dir / "report" / "summary.md").read_text()
    assert "![Training loss](loss.png)" in summary
    assert "27.0% (before training) → 73.0% (step 12)" in summary
    # Model text sits inside code fences in Markdown, never as raw HTML in a paragraph.
    fenced = summary.split("<script>")[0]
    assert fenced.count("```") % 2 == 1


def test_empty_run_directory_says_there_is_nothing_to_show(tmp_path):
    report = write_report(tmp_path)
    page = (report / "index.html").read_text()
    assert "Nothing to show yet" in page
    assert "No evaluation records" in page and "No checkpoints yet" in page
    assert not list(report.glob("*.png"))
    assert "Nothing to show yet" in (report / "summary.md").read_text()


def test_training_without_eval_and_a_broken_config_still_make_a_page(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    write_jsonl(tmp_path / "metrics.jsonl", [{"kind": "train", "step": 1, "loss": float("nan")},
                                             {"kind": "train", "step": 2, "loss": 1.5, "lr": 1e-5},
                                             {"kind": "event", "step": 2, "message": "stopped: loss is NaN"}])
    page = (write_report(tmp_path) / "index.html").read_text()
    assert "config.json not read: not valid JSON" in page
    assert "No evaluation yet" in page and "stopped: loss is NaN" in page
    assert (tmp_path / "report" / "loss.png").read_bytes()[:8] == PNG_MAGIC
    assert not (tmp_path / "report" / "accuracy.png").exists()


def test_eval_directories_alone_are_read_without_metrics(tmp_path):
    write_jsonl(tmp_path / "eval" / "step-000003" / "records.jsonl", [record("Q", "</think> <answer>1</answer>", "1", 1.0, 1.0)])
    (tmp_path / "eval" / "step-000003" / "summary.json").write_text(json.dumps({"accuracy": 0.5, "format_rate": 0.75}))
    page = (write_report(tmp_path) / "index.html").read_text()
    assert "validation accuracy (step 3)" in page and "50.0%" in page and "75.0%" in page
    assert (tmp_path / "report" / "accuracy.png").exists()


def test_outcomes_and_sample_picking():
    records = [record("p", "r", "g", f, a) for f, a in [(1, 1), (1, 0), (0, 0), (1, 0), (1, 1), (0, 0), (1, 1), (1, 1)]]
    assert outcome_counts(records + [{"prompt": "ungraded"}]) == {"correct": 4, "formatted_wrong": 2, "unformatted": 2}
    correct, incorrect = pick_samples(records)
    assert len(correct) == 3
    # Incorrect samples alternate formatted-but-wrong and unformatted: indexes 1, 2, 3.
    assert incorrect == [records[1], records[2], records[3]]


def test_cli_report_prints_the_page_path(run_dir, capsys):
    assert main(["report", str(run_dir)]) == 0
    assert capsys.readouterr().out.strip() == str(run_dir / "report" / "index.html")
    assert main(["report", str(run_dir / "missing")]) == 2  # a user error: one line, exit 2
    assert "does not exist" in capsys.readouterr().err
