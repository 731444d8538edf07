"""What the report's figures draw, read back from their matplotlib axes: the per-token NLL beside a summed loss,
whole-number step ticks, titles naming only drawn curves, and a one-k pass@k left to the tables."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from reasontune.eval_plots import pass_at_k_figure, write_eval_plots
from reasontune.report import write_report
from reasontune.report.plots import build_plots
from reasontune.report.reading import read_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(run_dir: Path, config: dict, train_lines: list[dict]) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(config))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"kind": "train", **line}) + "\n" for line in train_lines))
    return run_dir


def plots_by_file(run_dir: Path) -> dict:
    return {plot.file_name: plot for plot in build_plots(read_run(run_dir))}


def curves(axes) -> dict[str, list[float]]:
    """Returns {legend label: y values} of the lines drawn on ``axes``."""
    return {line.get_label(): [float(y) for y in line.get_ydata()] for line in axes.get_lines()}


def test_real_sft_run_plots_the_per_token_nll_beside_its_summed_loss(tiny_model_dir, tmp_path):
    """A real SFT run with the default sequence_sum loss: loss.png has a second panel with the per-token NLL it logs."""
    from reasontune.training.sft import SFTConfig, run_sft

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"User: {i} + {i}? Assistant: <think>",
                                        "response": f" {i} + {i} = {2 * i} </think> <answer>{2 * i}</answer>"}) + "\n"
                            for i in range(8)))
    config = SFTConfig(model=str(tiny_model_dir), train_data=str(data), output_dir=str(tmp_path / "run"), batch_size=2,
                       gradient_accumulation_steps=2, max_length=64, eval_examples=0, save_every=0, progress=False,
                       num_threads=1, normalize_constant=3.0, write_report=True)
    run_dir = run_sft(config)
    train = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]
    assert len(train) == 2
    for line in train:
        # sequence_sum: loss = (sum of every response token's NLL) / (normalize_constant * sequences in the step),
        # so the per-token NLL is loss * 3 * examples / response tokens: an independent check of what SFT logs.
        assert line["mean_token_nll"] == pytest.approx(line["loss"] * 3.0 * line["examples"] / line["response_tokens"],
                                                       rel=1e-5)
        assert line["loss"] > 2 * line["mean_token_nll"]  # summed over ~15 tokens a sequence: not a per-token number

    loss = plots_by_file(run_dir)["loss.png"]
    left, right = loss.figure.axes
    assert left.get_title() == "Training loss as optimised (sequence_sum)"
    assert right.get_title() == "Per-token NLL of the response tokens" and right.get_ylabel() == "nats per token"
    assert curves(left)["loss"] == pytest.approx([line["loss"] for line in train])
    assert curves(right)["mean token NLL"] == pytest.approx([line["mean_token_nll"] for line in train])
    assert loss.caption == "Training loss as optimised (sequence_sum) and the per-token NLL"
    page = (run_dir / "report" / "index.html").read_text()
    assert "last per-token NLL" in page and (run_dir / "report" / "loss.png").read_bytes()[:8] == PNG_MAGIC


def test_a_token_mean_loss_is_plotted_once(tmp_path):
    """token_mean's loss is the per-token NLL: a second panel would draw the same numbers twice."""
    run_dir = write_run(tmp_path / "run", {"command": "sft", "loss_aggregation": "token_mean"},
                        [{"step": s, "loss": 2.0 / s, "mean_token_nll": 2.0 / s} for s in (1, 2, 3)])
    loss = plots_by_file(run_dir)["loss.png"]
    (axes,) = loss.figure.axes
    assert axes.get_title() == "Training loss" and list(curves(axes)) == ["loss"]


@pytest.mark.parametrize("steps", [(1, 2, 3), (1,)], ids=["three steps", "one step"])
def test_step_ticks_are_whole_numbers_on_every_curve(tmp_path, steps):
    """Three steps span 1..3: matplotlib's default locator would put ticks at 1.25, 1.5, ... (no such steps);
    one step spans 0.95..1.05, where even an integer locator falls back to fractions."""
    run_dir = write_run(tmp_path / "run", {"command": "grpo"}, [
        {"step": s, "loss": 0.5 / s, "lr": 1e-5, "grad_norm": 1.0 + s, "reward": 0.1 * s, "accuracy": 0.1 * s,
         "format_rate": 0.2, "clip_fraction": 0.01 * s, "mean_response_tokens": 30 + s, "token_entropy": 1.2}
        for s in steps])
    plots = build_plots(read_run(run_dir))
    assert {plot.file_name for plot in plots} >= {"loss.png", "rollout_reward.png", "clip_fraction_kl.png"}
    for plot in plots:
        for axes in plot.figure.axes:
            low, high = axes.get_xlim()
            shown = [tick for tick in axes.get_xticks() if low <= tick <= high]
            assert shown and all(float(tick).is_integer() for tick in shown), (plot.file_name, shown)


def test_grpo_titles_name_only_the_curves_drawn(tmp_path):
    """Without a KL term (kl_coef 0 logs no kl) and without pass@group, the titles do not promise them."""
    lines = [{"step": s, "loss": 0.1, "accuracy": 0.2 * s, "format_rate": 0.5, "clip_fraction": 0.01 * s}
             for s in (1, 2)]
    plots = plots_by_file(write_run(tmp_path / "no-kl", {"command": "grpo", "kl_coef": 0.0}, lines))
    (clip,) = plots["clip_fraction_kl.png"].figure.axes
    assert clip.get_title() == "Clipped tokens" and list(curves(clip)) == ["clip fraction"]
    (accuracy,) = plots["rollout_accuracy.png"].figure.axes
    assert accuracy.get_title() == "Rollout accuracy and format rate"
    assert list(curves(accuracy)) == ["accuracy (answer reward 1)", "format rate"]

    with_kl = [{**line, "kl": 0.003 * line["step"], "pass_at_n": 0.6} for line in lines]
    plots = plots_by_file(write_run(tmp_path / "kl", {"command": "grpo", "kl_coef": 0.04}, with_kl))
    (clip,) = plots["clip_fraction_kl.png"].figure.axes
    assert clip.get_title() == "Clipped tokens and KL to the reference"
    assert curves(clip)["KL (k3) to the starting model"] == pytest.approx([0.003, 0.006])
    assert plots["rollout_accuracy.png"].figure.axes[0].get_title() == "Rollout accuracy, pass@group and format rate"


def eval_records(outcomes: list[list[bool]]) -> list[dict]:
    return [{"question_id": f"q{q}", "sample": s, "answer_reward": float(correct), "format_reward": 1.0,
             "category": "correct" if correct else "formatted_wrong", "response_tokens": 5 + q}
            for q, samples in enumerate(outcomes) for s, correct in enumerate(samples)]


def test_one_k_pass_at_k_is_not_a_plot_and_a_one_k_benchmark_beside_curves_is_a_labelled_dot(tmp_path):
    one_sample = eval_records([[True], [False], [True], [False]])
    assert pass_at_k_figure({"math500": one_sample}, n_bootstrap=20) is None
    written = write_eval_plots({"math500": one_sample}, tmp_path / "one", n_bootstrap=20)
    assert [path.name for path in written] == ["accuracy_by_length_math500.png", "length_by_category_math500.png"]
    assert not (tmp_path / "one" / "pass_at_k.png").exists()

    # Four samples, question 0 solved once, question 1 never: pass@1 = 1/8, pass@2 = 1/4, pass@4 = 1/2 (each question's
    # 1 - C(n-c, k)/C(n, k), averaged). Beside it the one-sample benchmark: pass@1 = 2 of 4 = 50%.
    figure = pass_at_k_figure({"gsm8k": eval_records([[True, False, False, False], [False] * 4]),
                               "math500": one_sample}, n_bootstrap=20)
    (axes,) = figure.axes
    drawn = curves(axes)
    assert drawn["gsm8k"] == pytest.approx([12.5, 25.0, 50.0])
    (dot,) = axes.containers  # an errorbar: its marker line and the interval around it
    assert dot.get_label() == "math500: pass@1 50.0%"
    assert [float(y) for y in dot.lines[0].get_ydata()] == pytest.approx([50.0])
    assert [float(tick) for tick in axes.get_xticks()] == [1.0, 2.0, 4.0]
    assert [label.get_text() for label in axes.get_xticklabels()] == ["1", "2", "4"]


def test_report_of_an_eval_directory_with_one_sample_gives_pass_at_1_as_a_number(tmp_path):
    """reasontune eval's single-benchmark output at n = 1: no pass@k plot, pass@1 in the results table."""
    from reasontune.estimators import summarize_samples

    records = [{**record, "prompt": f"Q{index}", "response": "r", "ground_truth": "1"}
               for index, record in enumerate(eval_records([[True], [False], [True]]))]
    (tmp_path / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    estimates = summarize_samples(records, [1], n_bootstrap=50, n_samples=1, temperature=0.0, prompt="r1_zero")
    (tmp_path / "summary.json").write_text(json.dumps({
        "accuracy": 2 / 3, "format_rate": 1.0, "benchmark": None, "estimates": estimates,
        "sampling": {"temperature": 0.0, "top_p": 1.0, "max_new_tokens": 512, "n": 1}}))
    (tmp_path / "config.json").write_text(json.dumps({"command": "eval", "data": "q.jsonl"}))
    report = write_report(tmp_path)
    page = (report / "index.html").read_text()
    assert not (report / "pass_at_k.png").exists() and (report / "accuracy_by_length.png").exists()
    pass_at_1 = estimates["metrics"]["pass@1"]
    assert pass_at_1["value"] == pytest.approx(2 / 3)  # 2 of 3 questions
    assert f"<td>66.7% [{100 * pass_at_1['low']:.1f}, {100 * pass_at_1['high']:.1f}]</td>" in page
    assert "No metrics to plot yet" not in page and "Evaluation report" in page
    assert "<td>max new tokens</td><td>512</td>" in page
    assert "2 correct / 1 formatted but wrong / 0 unformatted of 3" in page
