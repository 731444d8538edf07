"""`reasontune report` on runs with tool calls: the tool-use table (counts, Wilson intervals), trajectories turn by turn, escaping, compare, training tool metrics.

The evaluations are real: a tiny model is first taught (SFT, one process) to answer three questions
three ways — one calls Python with a program printing ``<script>x</script>`` and answers right, one
calls a program that prints a run of backticks and pipes and then divides by zero, one answers
without a call — and is then evaluated greedily with ``reasontune eval --env python`` (each program
in the sandbox), beside the untaught model, which never calls the tool.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reasontune.cli import main
from reasontune.environments.python import format_output
from reasontune.environments.sandbox import SandboxUnavailable, run_python
from reasontune.report import write_report
from reasontune.report.blocks import Page, Section
from reasontune.report.pages import render_html, render_markdown
from reasontune.report.plots import build_plots
from reasontune.report.pages import build_page
from reasontune.report.reading import EvalResult, RunData, read_run
from reasontune.report.tools import pick_trajectories, trajectory_card

PROMPT = "User: What is {}? Assistant: <think>"
SCRIPT_CALL = ' <python>print("<script>x</script>", 12 + 30)</python>'
FAILING_CALL = ' <python>print("``` | a |"); print(7 / 0)</python>'
# (question, first model turn or None, the output it gets when known, the last model turn, reference)
TRACES = [
    ("12 + 30", SCRIPT_CALL, format_output("<script>x</script> 42\n", "ok", 4096), " </think> <answer>42</answer>", "42"),
    ("7 / 0", FAILING_CALL, None, " </think> <answer>7</answer>", "0"),
    ("20 + 22", None, None, " 20 + 22 = 42 </think> <answer>42</answer>", "42"),
]


def wilson(successes: int, n: int) -> tuple[float, float]:
    """The Wilson score interval written out from Wilson (1927), z = 1.959964 (95%): the test's own reference."""
    z, p = 1.959964, successes / n
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, center - half), min(1.0, center + half)


def share_text(successes: int, n: int) -> str:
    low, high = wilson(successes, n)
    return f"{successes}/{n} = {100 * successes / n:.1f}% [{100 * low:.1f}, {100 * high:.1f}]"


def cell_texts(tokens, opening_type: str) -> list[str]:
    """Returns the text a Markdown reader sees in each element opened by ``opening_type`` (escapes and entities decoded)."""
    return ["".join(child.content for child in inline.children if child.type in ("text", "code_inline"))
            for opening, inline in zip(tokens, tokens[1:]) if opening.type == opening_type]


def tool_turns(record: dict) -> list[dict]:
    return [turn for turn in record["turns"] if turn["role"] == "environment" and turn["program"] is not None]


@pytest.fixture(scope="module")
def tool_runs(tmp_path_factory, tiny_model_dir):
    """Returns (root, records of the taught model's evaluation): eval dirs ``taught``, ``base`` (the untaught model) and
    ``single-turn`` (the taught model without the tool), and ``cmp`` comparing the first two."""
    import torch

    try:
        run_python("pass")
    except SandboxUnavailable as error:
        pytest.skip(f"no sandbox on this machine: {error}")
    root = tmp_path_factory.mktemp("tool-runs")
    teach = []
    for question, call, output, answer, _ in TRACES:
        prompt = PROMPT.format(question)
        if call is None:
            teach.append({"prompt": prompt, "response": answer})
            continue
        teach.append({"prompt": prompt, "response": call})
        if output is not None:
            teach.append({"prompt": prompt + call + output, "response": answer})
    (root / "teach.jsonl").write_text("".join(json.dumps(r) + "\n" for r in teach))
    questions = root / "questions.jsonl"
    questions.write_text("".join(json.dumps({"prompt": PROMPT.format(q), "ground_truth": truth}) + "\n"
                                 for q, _, _, _, truth in TRACES))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["sft", "--model", str(tiny_model_dir), "--train-data", str(root / "teach.jsonl"),
                     "--output-dir", str(root / "teach"), "--learning-rate", "1e-2", "--num-epochs", "40",
                     "--batch-size", str(len(teach)), "--gradient-accumulation-steps", "1", "--max-length", "192",
                     "--warmup-ratio", "0", "--lr-scheduler", "constant", "--max-grad-norm", "1.0", "--dtype", "float32",
                     "--device", "cpu", "--num-threads", "1", "--no-progress", "--no-write-report"]) == 0
        for name, model, env in (("taught", root / "teach" / "final", "python"), ("base", tiny_model_dir, "python"),
                                 ("single-turn", root / "teach" / "final", "math")):
            assert main(["eval", "--model", str(model), "--data", str(questions), "--output-dir", str(root / name),
                         "--env", env, "--max-tool-calls", "2", "--tool-timeout", "5",
                         "--eval-max-new-tokens", "64", "--eval-temperature", "0", "--grading-workers", "0",
                         "--n-bootstrap", "20", "--num-threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    assert main(["compare", str(root / "taught"), str(root / "base"), "--n-bootstrap", "50",
                 "--output-dir", str(root / "cmp")]) == 0
    records = [json.loads(line) for line in (root / "taught" / "records.jsonl").read_text().splitlines()]
    # The teaching took: the three kinds of trajectory the report must show are all there.
    by_question = {r["prompt"]: r for r in records}
    scripted, failing, plain = (by_question[PROMPT.format(q)] for q, *_ in TRACES)
    assert scripted["category"] == "correct" and [t["status"] for t in tool_turns(scripted)] == ["ok"], scripted
    assert [t["status"] for t in tool_turns(failing)] == ["error"], failing
    assert plain["tool_calls"] == 0 and plain["category"] == "correct", plain
    return root, records


@pytest.mark.slow
def test_report_of_a_real_tool_evaluation_shows_counts_intervals_and_every_turn(tool_runs, capsys):
    root, records = tool_runs
    assert main(["report", str(root / "taught")]) == 0
    page = (root / "taught" / "report" / "index.html").read_text()
    summary = json.loads((root / "taught" / "summary.json").read_text())

    # The table's numbers, counted here from the records and checked against eval's own summary.
    n = len(records)
    with_call = [r for r in records if r["tool_calls"] > 0]
    calls = [turn for r in records for turn in tool_turns(r)]
    errors = sum(turn["status"] != "ok" for turn in calls)
    correct_with = sum(r["answer_reward"] == 1 for r in with_call)
    correct_without = sum(r["answer_reward"] == 1 for r in records if r["tool_calls"] == 0)
    assert (n, len(with_call), len(calls), errors, correct_with, correct_without) == (3, 2, 2, 1, 1, 1)
    assert summary["tool_call_rate"] == pytest.approx(len(with_call) / n)
    assert summary["tool_error_rate"] == pytest.approx(errors / len(calls))
    assert summary["accuracy_with_tool"] == pytest.approx(correct_with / len(with_call))
    # 2/3 by hand: center (2/3 + 1.9208/3) / (1 + 3.8415/3) = 0.5731, half 0.3654: [20.8, 93.9]
    assert share_text(2, 3) == "2/3 = 66.7% [20.8, 93.9]"
    for label, text in (("trajectories", "3"), ("questions", "3"), ("tool calls", "2"),
                        ("trajectories calling the tool", share_text(len(with_call), n)),
                        ("calls ending in an error", share_text(errors, len(calls))),
                        ("accuracy with a call", share_text(correct_with, len(with_call))),
                        ("accuracy without a call", share_text(correct_without, n - len(with_call))),
                        ("calls by status", "error 1, ok 1")):
        assert f"<tr><td>{label}</td><td>{html.escape(text)}</td></tr>" in page, label
    seconds = [turn["seconds"] for turn in calls]
    assert (f"mean {sum(seconds) / len(seconds):.3f} s, median {sorted(seconds)[0] / 2 + sorted(seconds)[1] / 2:.3f} s, "
            f"max {max(seconds):.3f} s (2 calls)") in page

    # Every turn of the three trajectories, in order, model text escaped.
    for record in records:
        for turn in record["turns"]:
            text = turn["program"] if turn["role"] == "environment" else turn["text"]
            assert f"<pre>{html.escape(text)}</pre>" in page
    assert "<pre>&lt;script&gt;x&lt;/script&gt; 42</pre>" in page  # the output, escaped
    assert "<script>" not in page and "Program 1 (error, " in page and "Model turn 2 (" in page
    assert page.index("correct, 1 tool call (") < page.index("unformatted, 1 tool call, 1 failing (")
    # How it ran: the environment among the sampling settings, the tool settings in the config table.
    assert "<tr><td>environment</td><td>python</td></tr>" in page
    assert "<tr><th>max_tool_calls</th><td>2</td></tr>" in page and "<tr><th>tool_timeout</th><td>5.0</td></tr>" in page
    assert main(["report", str(root / "single-turn")]) == 0
    single = (root / "single-turn" / "report" / "index.html").read_text()
    assert "max_tool_calls" not in single.split("Full resolved config")[0] and "<td>environment</td>" not in single
    assert "<h2>Tool use</h2>" not in single and "<h2>Tool trajectories</h2>" not in single


@pytest.mark.slow
def test_the_markdown_summary_of_a_real_tool_evaluation_keeps_model_text_inside_its_fences(tool_runs):
    markdown_it = pytest.importorskip("markdown_it")
    root, records = tool_runs
    write_report(root / "taught")
    tokens = markdown_it.MarkdownIt("commonmark").enable("table").parse(
        (root / "taught" / "report" / "summary.md").read_text())
    assert not [t for t in tokens if t.type == "html_block"]
    assert not [child for t in tokens if t.type == "inline" for child in t.children if child.type == "html_inline"]
    fences = [t.content for t in tokens if t.type == "fence"]
    for record in records:  # each program and output is one whole code block, backticks and pipes included
        for turn in tool_turns(record):
            assert turn["program"] + "\n" in fences and turn["output"].rstrip("\n") + "\n" in fences
    rows = cell_texts(tokens, "td_open")  # the tool-use table: a cell each, whatever the cells hold
    assert "error 1, ok 1" in rows and "2/3 = 66.7% [20.8, 93.9]" in rows


@pytest.mark.slow
def test_compare_of_real_tool_evaluations_shows_each_runs_tool_use(tool_runs, capsys):
    root, records = tool_runs
    base = [json.loads(line) for line in (root / "base" / "records.jsonl").read_text().splitlines()]
    base_with_call = sum(r["tool_calls"] > 0 for r in base)
    comparison = json.loads((root / "cmp" / "comparison.json").read_text())
    taught, untaught = comparison["tools"]["eval"]
    assert (taught["trajectories"], taught["with_tool"], taught["calls"], taught["errors"]) == (3, 2, 2, 1)
    assert untaught["with_tool"] == base_with_call
    assert (taught["tool_use_rate"]["low"], taught["tool_use_rate"]["high"]) == pytest.approx(wilson(2, 3), abs=1e-6)
    text = (root / "cmp" / "comparison.txt").read_text()
    line = next(line for line in text.splitlines() if line.startswith("trajectories calling the tool"))
    assert share_text(2, 3) in line and share_text(base_with_call, 3) in line

    assert main(["report", str(root / "cmp")]) == 0
    page = (root / "cmp" / "report" / "index.html").read_text()
    assert (f"<tr><td>trajectories calling the tool</td><td>{share_text(2, 3)}</td>"
            f"<td>{share_text(base_with_call, 3)}</td></tr>") in page
    assert "<th>eval</th><th>taught</th><th>base</th>" in page


@pytest.mark.slow
def test_a_tool_run_compared_with_a_single_turn_one_is_warned_about_and_shows_where_the_tool_was(tool_runs, capsys):
    root, _ = tool_runs
    assert main(["compare", str(root / "taught"), str(root / "single-turn"), "--n-bootstrap", "50",
                 "--output-dir", str(root / "cmp-env")]) == 0
    out = capsys.readouterr().out
    assert "eval: the runs were sampled differently (environment python vs math)" in out
    line = next(line for line in out.splitlines() if line.startswith("trajectories calling the tool"))
    assert line.split()[-1] == "—"  # the single-turn run has no tool counts
    assert main(["report", str(root / "cmp-env")]) == 0
    page = (root / "cmp-env" / "report" / "index.html").read_text()
    assert "<tr><td>environment (differs)</td><td>python</td><td>math</td></tr>" in page
    assert f"<tr><td>trajectories calling the tool</td><td>{share_text(2, 3)}</td><td>—</td></tr>" in page


@pytest.mark.slow
def test_a_training_run_shows_the_tool_use_of_its_last_evaluation_with_tool_calls(tool_runs, tmp_path):
    """A run directory whose in-loop evaluation (eval/step-N) is the real tool evaluation."""
    import shutil

    root, _ = tool_runs
    (tmp_path / "config.json").write_text(json.dumps({"command": "grpo", "model": "m", "train_data": "q.jsonl"}))
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"kind": "train", "step": 2, "loss": 0.5}) + "\n")
    shutil.copytree(root / "taught", tmp_path / "eval" / "step-000002", ignore=shutil.ignore_patterns("report"))
    write_report(tmp_path)
    page = (tmp_path / "report" / "index.html").read_text()
    assert "<h2>Tool use</h2>" in page and "Tool use of the evaluation at step 2:" in page
    assert f"<tr><td>trajectories calling the tool</td><td>{share_text(2, 3)}</td></tr>" in page
    assert "tool_use.png" not in page  # its train lines log no tool_ metric


def test_hostile_text_in_turns_cannot_break_the_markdown_or_the_html():
    """What a model may write (backtick runs past the fence, pipes, HTML, a closing pre) and a damaged status."""
    markdown_it = pytest.importorskip("markdown_it")
    program = 'print("`````` | x | </pre><script>alert(1)</script>")'
    output = "`````` | x | </pre><script>alert(1)</script>\n````"
    record = {"prompt": "Q <img src=x onerror=alert(1)>", "ground_truth": "1 | 2", "answer": "[a](javascript:x)",
              "format_reward": 1.0, "answer_reward": 0.0, "reward": 0.0, "tool_calls": 1, "tool_errors": 1,
              "response_tokens": 9, "finish_reason": "stop",
              "turns": [{"role": "model", "text": f"<python>{program}</python>", "tokens": 9, "finish_reason": "stop"},
                        {"role": "environment", "text": "…", "program": program, "output": output,
                         "status": "error | <b>", "seconds": 0.5}]}
    page = Page("t", "here", [], [Section("Tool trajectories", [trajectory_card(record, "bench | <i>")])])
    rendered = render_html(page)
    assert "<script>" not in rendered and "<img" not in rendered and "<b>" not in rendered and "<i>" not in rendered
    assert f"<pre>{html.escape(program)}</pre>" in rendered and f"<pre>{html.escape(output.rstrip())}</pre>" in rendered
    tokens = markdown_it.MarkdownIt("commonmark").enable("table").parse(render_markdown(page))
    inline = [child for t in tokens if t.type == "inline" for child in t.children]
    assert not [t for t in tokens if t.type == "html_block"] and not [c for c in inline if c.type == "html_inline"]
    assert not [c for c in inline if c.type == "link_open"]  # the answer's [a](javascript:x) stays text
    fences = [t.content for t in tokens if t.type == "fence"]
    assert f"<python>{program}</python>\n" in fences and program + "\n" in fences and output + "\n" in fences
    cells = cell_texts(tokens, "td_open")
    assert "1 | 2" in cells and "[a](javascript:x)" in cells  # one cell each: the pipe did not split the row
    assert "formatted but wrong, 1 tool call, 1 failing (bench | <i>)" in cell_texts(tokens, "heading_open")
    assert "Program 1 (error | <b>, 0.500 s)" in cell_texts(tokens, "paragraph_open")


def test_a_damaged_tool_table_in_comparison_json_shows_what_is_sound_and_names_the_rest(tmp_path):
    figure = {"value": 0.5, "low": 0.2, "high": 0.8, "n": 4, "successes": 2}
    sound = {"trajectories": 4, "calls": 3, "with_tool": 2, "tool_use_rate": figure,
             "error_rate": {"value": "high", "low": 0, "high": 1, "n": 3},  # not a figure: shown as —
             "statuses": {"ok": 3, "<b>odd</b>": 1, "bad": "2"}, "seconds_per_call": {"mean": 1, "n": 3}}
    (tmp_path / "comparison.json").write_text(json.dumps({
        "runs": ["a", "b"], "rows": [], "n_bootstrap": 10, "seed": 0,
        "tools": {"math500": [sound, {"trajectories": "4"}], "gsm8k": [sound], "aime": "none"}}))
    assert main(["report", str(tmp_path)]) == 0
    page = (tmp_path / "report" / "index.html").read_text()
    assert "<tr><td>trajectories calling the tool</td><td>2/4 = 50.0% [20.0, 80.0]</td><td>—</td></tr>" in page
    assert "<tr><td>calls ending in an error</td><td>—</td><td>—</td></tr>" in page
    assert "<tr><td>calls by status</td><td>&lt;b&gt;odd&lt;/b&gt; 1, ok 3</td><td>—</td></tr>" in page
    assert "<tr><td>seconds per call</td><td>—</td><td>—</td></tr>" in page
    assert "comparison.json: tool use of math500, run b not read" in page
    assert "comparison.json: tool use of gsm8k skipped" in page and "comparison.json: tool use of aime skipped" in page


def test_with_several_samples_a_question_the_tool_use_interval_is_over_questions():
    """Two questions, two samples each: q1 calls in both (2 and 1 calls), q2 in one (1 call)."""
    from reasontune.compare import tool_use
    from reasontune.estimators import BOOTSTRAP, WILSON

    def made(question, calls, answer_reward):
        return {"question_id": question, "tool_calls": calls, "tool_errors": 0, "answer_reward": answer_reward}

    use = tool_use([made("q1", 2, 1.0), made("q1", 1, 0.0), made("q2", 1, 1.0), made("q2", 0, 0.0)])
    assert (use["trajectories"], use["questions"], use["with_tool"]) == (4, 2, 3)
    rate = use["tool_use_rate"]
    # Per question 1 and 1/2; two questions resampled give means 1, 3/4, 1/2 with chances 1/4, 1/2, 1/4: [1/2, 1].
    # Over the four trajectories as if independent it would be Wilson(3, 4) = [30.1, 95.4]%.
    assert (rate["value"], rate["low"], rate["high"], rate["method"]) == (0.75, 0.5, 1.0, BOOTSTRAP)
    calls = use["calls_per_trajectory"]  # per question 3/2 and 1/2: [1/2, 3/2]
    assert (calls["value"], calls["low"], calls["high"]) == (1.0, 0.5, 1.5)
    assert use["accuracy_with_tool"]["method"] == WILSON and use["accuracy_with_tool"]["successes"] == 2


def test_trajectories_are_picked_from_each_kind_and_bad_counts_are_left_out():
    def made(calls, errors, answer_reward, name):
        return {"name": name, "tool_calls": calls, "tool_errors": errors, "answer_reward": answer_reward,
                "format_reward": 1.0, "turns": []}

    records = [made(0, 0, 1.0, "plain"), made(1, 0, 0.0, "wrong call"), made(2, 1, 0.0, "failing"),
               made(1, 0, 1.0, "good call"), made(1, 0, 1.0, "second good call")]
    assert [r["name"] for r in pick_trajectories(records, 4)] == ["good call", "failing", "wrong call", "plain"]
    assert [r["name"] for r in pick_trajectories(records, 5)][-1] == "second good call"
    from reasontune.compare import tool_use

    damaged = records + [{"tool_calls": "2", "tool_errors": 0, "answer_reward": 1.0},
                         {"tool_calls": 1, "tool_errors": 2, "answer_reward": 1.0}, {"answer_reward": 1.0},
                         {"tool_calls": 1, "tool_errors": 0, "answer_reward": float("nan")}]
    use = tool_use(damaged)
    assert (use["trajectories"], use["skipped"], use["calls"], use["errors"], use["with_tool"]) == (5, 4, 5, 1, 4)
    assert use["calls_per_trajectory"]["value"] == 1.0 and use["tool_use_rate"]["successes"] == 4
    assert use["accuracy_with_tool"]["successes"] == 2 and use["seconds_per_call"] is None


def test_tool_metrics_of_training_lines_are_plotted_and_tabled(tmp_path):
    """Train lines with the tool metrics GRPO / EI with --env python log (``rollouts.tool_statistics``' names): the shares
    in one percent panel with the in-loop evaluations' beside them, each count in its own, the table their ends."""
    (tmp_path / "config.json").write_text(json.dumps({"command": "grpo", "model": "m", "train_data": "q.jsonl"}))
    lines = [{"kind": "train", "step": step, "loss": 0.5, "reward": 0.1 * step, "tool_calls": 3 * step,
              "tool_error_rate": 0.4 / step, "tool_call_rate": 0.2 * step, "mean_tool_calls": 0.5 * step,
              "accuracy_with_tool": None if step == 1 else 0.25 * step, "accuracy_without_tool": 0.1}
             for step in (1, 2, 3, 4)]
    lines += [{"kind": "eval", "step": step, "accuracy": 0.5, "tool_call_rate": 0.2 * step} for step in (2, 4)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    plots = {plot.file_name: plot for plot in build_plots(read_run(tmp_path))}
    shares, calls, per_trajectory = plots["tool_use.png"].figure.axes
    assert "tool_use_2.png" not in plots
    # In the order they first hold a number: step 1 logged accuracy_with_tool None (no call, no accuracy).
    assert [line.get_label() for line in shares.lines] == ["tool_error_rate", "tool_call_rate", "accuracy_without_tool",
                                                           "accuracy_with_tool", "tool_call_rate (validation)"]
    assert list(shares.lines[1].get_ydata()) == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert list(shares.lines[3].get_xdata()) == [2, 3, 4]
    assert list(shares.lines[4].get_xdata()) == [2, 4] and list(shares.lines[4].get_ydata()) == pytest.approx([0.4, 0.8])
    assert shares.lines[4].get_color() == shares.lines[1].get_color()
    assert shares.get_ylim() == pytest.approx((-0.03, 1.03))
    assert (calls.get_ylabel(), list(calls.lines[0].get_ydata())) == ("tool_calls", [3, 6, 9, 12])
    assert (per_trajectory.get_ylabel(), list(per_trajectory.lines[0].get_ydata())) == ("mean_tool_calls",
                                                                                        [0.5, 1.0, 1.5, 2.0])
    write_report(tmp_path)
    page = (tmp_path / "report" / "index.html").read_text()
    assert "<h2>Tool use</h2>" in page and "tool_use.png" in page
    assert "<tr><td>tool_calls</td><td>3 (step 1)</td><td>12 (step 4)</td><td>3</td><td>12</td></tr>" in page
    assert "<tr><td>tool_error_rate</td><td>0.4 (step 1)</td><td>0.1 (step 4)</td><td>0.1</td><td>0.4</td></tr>" in page
    assert "<tr><td>accuracy_with_tool</td><td>0.5 (step 2)</td><td>1 (step 4)</td><td>0.5</td><td>1</td></tr>" in page
    assert "<td>reward</td>" not in page.split("<h2>Tool use</h2>")[1]


JSON = st.recursive(st.none() | st.booleans() | st.integers(-3, 3) | st.floats() | st.text(max_size=6),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                    max_leaves=6)
TURN = st.fixed_dictionaries({}, optional={"role": st.sampled_from(["model", "environment"]) | JSON, "text": JSON,
                                           "program": JSON, "output": JSON, "status": JSON, "seconds": JSON,
                                           "tokens": JSON, "finish_reason": JSON})
RECORD = st.fixed_dictionaries(
    {"tool_calls": st.integers(0, 3) | JSON, "answer_reward": st.sampled_from([0.0, 1.0]) | JSON},
    optional={"tool_errors": st.integers(0, 3) | JSON, "turns": st.lists(TURN | JSON, max_size=4) | JSON,
              "format_reward": JSON, "prompt": JSON, "question_id": JSON, "ground_truth": JSON, "answer": JSON,
              "finish_reason": JSON, "response_tokens": JSON, "category": JSON})


@settings(max_examples=60, deadline=5_000, derandomize=True)
@given(st.lists(RECORD, min_size=1, max_size=5))
def test_tool_sections_render_any_record_values(records):
    """Records whose tool fields hold arbitrary JSON values: the page is built and rendered, never a traceback."""
    run = RunData(run_dir=Path("eval-dir"), evals=[EvalResult(step=0, records=records, name="fuzz")],
                  evaluation_only=True)
    page = build_page(run, [], "now")
    assert "<h2>Tool use</h2>" in render_html(page) and "## Tool use" in render_markdown(page)
