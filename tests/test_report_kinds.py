"""The report of each kind of directory: GRPO/EI rollout curves in their own step unit, the run's own config fields, eval directories."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

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


BENCHMARK_DIR = Path(__file__).parent / "data" / "benchmarks"


@pytest.mark.slow
def test_report_of_real_eval_and_compare_directories_shows_their_results_and_sampling(tmp_path, tiny_model_dir, capsys):
    """Two real evaluations sampled differently (T=1.0, 6 tokens vs T=0.6, 4 tokens), then compare: the report of each
    eval directory has its per-benchmark estimates, sampling and plots; the compare directory's has its table and warning."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, temperature, tokens in (("a", "1.0", "6"), ("b", "0.6", "4")):
            assert main(["eval", "--model", str(tiny_model_dir), "--benchmarks", "math500,gsm8k",
                         "--benchmark-dir", str(BENCHMARK_DIR), "--output-dir", str(tmp_path / name),
                         "--n-samples", "4", "--k", "1,4", "--eval-temperature", temperature,
                         "--eval-max-new-tokens", tokens, "--n-bootstrap", "50", "--grading-workers", "0"]) == 0
    finally:
        torch.set_num_threads(threads)
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--k", "1,4", "--n-bootstrap", "50",
                 "--output-dir", str(tmp_path / "cmp")]) == 0
    capsys.readouterr()

    assert main(["report", str(tmp_path / "a")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "a" / "report" / "index.html")
    page = (tmp_path / "a" / "report" / "index.html").read_text()
    assert "Evaluation report: a" in page and "written by reasontune eval" in page
    assert "No metrics to plot yet" not in page
    for benchmark in ("math500", "gsm8k"):
        summary = json.loads((tmp_path / "a" / benchmark / "summary.json").read_text())
        pass_at_4 = summary["estimates"]["metrics"]["pass@4"]
        shown = f"{100 * pass_at_4['value']:.1f}% [{100 * pass_at_4['low']:.1f}, {100 * pass_at_4['high']:.1f}]"
        assert f"<td>{benchmark}</td><td>{summary['estimates']['n_questions']}</td><td>4</td>" in page
        assert f"<td>{shown}</td>" in page
        assert (tmp_path / "a" / "report" / f"accuracy_by_length_{benchmark}.png").read_bytes()[:8] == PNG_MAGIC
    assert "<td>temperature</td><td>1.0</td><td>1.0</td>" in page and "<td>max new tokens</td><td>6</td><td>6</td>" in page
    assert (tmp_path / "a" / "report" / "pass_at_k.png").read_bytes()[:8] == PNG_MAGIC  # k = 1, 2, 4: a curve

    assert main(["report", str(tmp_path / "cmp")]) == 0  # a compare directory: once an exit 2
    page = (tmp_path / "cmp" / "report" / "index.html").read_text()
    comparison = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert "Comparison report: cmp" in page and "The runs were not evaluated alike:" in page
    assert "the runs were sampled differently (temperature 1 vs 0.6; max new tokens 6 vs 4)" in page
    assert "<td>temperature (differs)</td><td>1.0</td><td>0.6</td>" in page
    assert "<td>max new tokens (differs)</td><td>6</td><td>4</td>" in page
    assert "<td>samples per question</td><td>4</td><td>4</td>" in page  # alike: not marked
    for row in comparison["rows"]:
        difference = row["differences"][0]
        assert f"<td>{row['benchmark']}</td><td>{row['metric']}</td><td>{row['n_questions']}</td>" in page
        assert f"{100 * difference['difference']:+.1f} [" in page
    assert {row["metric"] for row in comparison["rows"]} == {"pass@1", "maj@1", "avg@1", "pass@4", "maj@4", "avg@4"}
    assert (tmp_path / "cmp" / "report" / "comparison.png").read_bytes()[:8] == PNG_MAGIC
    summary_md = (tmp_path / "cmp" / "report" / "summary.md").read_text()
    assert "| temperature (differs) | 1.0 | 0.6 |" in summary_md


def test_a_damaged_comparison_json_shows_its_good_rows_and_names_the_bad_ones(tmp_path, capsys):
    good = {"benchmark": "math500", "metric": "pass@1", "n_questions": 40,
            "values": [{"value": 0.5, "low": 0.35, "high": 0.65}, {"value": 1.0, "low": 1.0, "high": 1.0}],
            "differences": [{"difference": 0.5, "low": 0.35, "high": 0.65, "p_value": 0.002}]}
    short = {**good, "metric": "pass@4", "values": good["values"][:1]}  # one value for two runs
    (tmp_path / "comparison.json").write_text(json.dumps({
        "runs": ["base", "tuned"], "rows": [good, short, "not a row"], "notes": ["math500: 2 question(s) left out"],
        "sampling": {"math500": [{"temperature": 0.0}, {"temperature": 0.6}]}, "warnings": ["<b>sampled</b> apart"],
        "n_bootstrap": 1000, "seed": 0}))
    assert main(["report", str(tmp_path)]) == 0
    page = (tmp_path / "report" / "index.html").read_text()
    assert "<td>math500</td><td>pass@1</td><td>40</td><td>50.0% [35.0, 65.0]</td><td>100.0% [100.0, 100.0]</td>" in page
    assert "<td>+50.0 [+35.0, +65.0] (p 0.002)</td>" in page and "pass@4" not in page
    assert "comparison.json: row 2 skipped" in page and "comparison.json: row 3 skipped" in page
    assert "&lt;b&gt;sampled&lt;/b&gt; apart" in page and "<b>sampled" not in page
    assert "<td>temperature (differs)</td><td>0.0</td><td>0.6</td>" in page
    assert (tmp_path / "report" / "comparison.png").read_bytes()[:8] == PNG_MAGIC

    (tmp_path / "comparison.json").write_text('{"runs": "one"}')
    assert main(["report", str(tmp_path)]) == 0
    page = (tmp_path / "report" / "index.html").read_text()
    assert "comparison.json not read: field &#x27;runs&#x27; must list two or more run names" in page
