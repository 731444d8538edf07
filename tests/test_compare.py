"""reasontune compare over eval directories in each accepted layout, and the eval plots."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from reasontune.config import check_config
from reasontune.compare import CompareConfig, compare_runs, format_comparison, run_compare
from reasontune.run_layout import find_evaluations, read_jsonl
from reasontune.data import DataError
from reasontune.eval_plots import accuracy_by_length, curve_ks, lengths_by_category, pass_at_k_curve, write_eval_plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write_eval(directory: Path, outcomes: list[list[bool]], benchmark: str | None = None, with_ids: bool = True,
                first_question: int = 0) -> None:
    """Writes records.jsonl and summary.json: question q (numbered from first_question) has the given sample outcomes."""
    directory.mkdir(parents=True, exist_ok=True)
    lines = []
    for offset, samples in enumerate(outcomes):
        q = first_question + offset
        for sample, correct in enumerate(samples):
            record = {"index": offset, "sample": sample, "prompt": f"Question {q}?", "response": "...",
                      "answer_reward": 1.0 if correct else 0.0, "format_reward": 1.0, "reward": 1.0 if correct else 0.0,
                      "category": "correct" if correct else "formatted_wrong", "response_tokens": 10 + q % 7,
                      "answer": str(q) if correct else "wrong"}
            if with_ids:
                record["question_id"] = f"bench:{q}"
            lines.append(json.dumps(record))
    (directory / "records.jsonl").write_text("\n".join(lines) + "\n")
    (directory / "summary.json").write_text(json.dumps({"benchmark": benchmark} if benchmark else {}))


HALF = [[q % 2 == 0, q % 2 == 0] for q in range(40)]   # 20 of 40 questions solved by both samples
ALL = [[True, True] for _ in range(40)]


def test_compare_eval_output_dir_against_a_run_dirs_latest_eval(tmp_path):
    _write_eval(tmp_path / "a" / "math500", HALF)
    _write_eval(tmp_path / "a" / "gsm8k", HALF)
    _write_eval(tmp_path / "b" / "eval" / "step-10" / "math500", HALF)          # older: must not be read
    _write_eval(tmp_path / "b" / "eval" / "step-200" / "math500", ALL + [[True, True]])  # one extra question
    _write_eval(tmp_path / "b" / "eval" / "step-200" / "aime24", ALL)
    comparison = compare_runs([tmp_path / "a", tmp_path / "b"], ks="1,2", metrics="pass,maj", n_bootstrap=500)
    assert comparison.runs == ["a", "b"]
    by_metric = {row["metric"]: row for row in comparison.rows}
    assert [row["benchmark"] for row in comparison.rows] == ["math500"] * 4
    pass1 = by_metric["pass@1"]
    assert pass1["n_questions"] == 40
    assert [v["value"] for v in pass1["values"]] == [0.5, 1.0]
    assert pass1["differences"][0]["difference"] == pytest.approx(0.5)
    # 0/1 scores: exact McNemar. b solves the 20 questions a misses, a nothing b misses: 2 · (1/2)^20.
    assert pass1["differences"][0]["method"] == "exact McNemar"
    assert pass1["differences"][0]["p_value"] == pytest.approx(2 * 0.5 ** 20)
    assert by_metric["maj@2"]["values"][1]["value"] == 1.0
    notes = " | ".join(comparison.notes)
    assert "gsm8k" in notes and "aime24" in notes and "1 question(s) of b not in every run" in notes
    text = format_comparison(comparison)
    assert "b - a (p)" in text and "+50.0" in text and "(p <0.001)" in text


def test_identical_runs_have_p_one_and_prompt_text_matches_without_ids(tmp_path):
    _write_eval(tmp_path / "x", HALF, benchmark="math500", with_ids=False)
    _write_eval(tmp_path / "y", HALF, benchmark="math500", with_ids=False)
    comparison = compare_runs([tmp_path / "x", tmp_path / "y"], ks=[1], metrics=["pass", "avg"], n_bootstrap=300)
    assert [row["metric"] for row in comparison.rows] == ["pass@1", "avg@1"]
    for row in comparison.rows:
        assert row["n_questions"] == 40
        assert row["differences"][0]["difference"] == 0.0 and row["differences"][0]["p_value"] == 1.0


def test_rows_needing_more_samples_are_left_out_with_a_note(tmp_path):
    _write_eval(tmp_path / "x", HALF, benchmark="gsm8k")
    _write_eval(tmp_path / "y", ALL, benchmark="gsm8k")
    comparison = compare_runs([tmp_path / "x", tmp_path / "y"], ks=[1, 4], metrics=["pass"], n_bootstrap=100)
    assert [row["metric"] for row in comparison.rows] == ["pass@1"]
    assert any("pass@4 left out: a run has only 2 sample(s)" in note for note in comparison.notes)


def test_disjoint_questions_and_benchmarks_are_reported(tmp_path):
    _write_eval(tmp_path / "x", HALF, benchmark="gsm8k")
    _write_eval(tmp_path / "y", HALF, benchmark="gsm8k", first_question=100)
    comparison = compare_runs([tmp_path / "x", tmp_path / "y"], n_bootstrap=100)
    assert comparison.rows == [] and any("no question is shared" in note for note in comparison.notes)
    _write_eval(tmp_path / "z", HALF, benchmark="math500")
    with pytest.raises(ValueError, match="share no benchmark"):
        compare_runs([tmp_path / "x", tmp_path / "z"])


def test_find_evaluations_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        find_evaluations(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="found no records.jsonl"):
        find_evaluations(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "records.jsonl").write_text('{"answer_reward": 1.0, "prompt": "p"}\n{not json\n')
    _write_eval(tmp_path / "good", HALF, benchmark="eval")
    with pytest.raises(DataError, match=r"records\.jsonl:2: invalid JSON"):
        compare_runs([tmp_path / "good", bad])


def test_run_compare_prints_and_writes_files(tmp_path, capsys):
    _write_eval(tmp_path / "base" / "math500", HALF)
    _write_eval(tmp_path / "tuned" / "math500", ALL)
    config = CompareConfig(runs=[str(tmp_path / "base"), str(tmp_path / "tuned")], k="1", n_bootstrap=200,
                           output_dir=str(tmp_path / "out"))
    check_config(config, environment=False)
    assert run_compare(config) == 0
    printed = capsys.readouterr().out
    assert "math500" in printed and "tuned - base (p)" in printed
    assert (tmp_path / "out" / "comparison.png").read_bytes().startswith(PNG_MAGIC)
    payload = json.loads((tmp_path / "out" / "comparison.json").read_text())
    assert payload["rows"][0]["values"][1]["value"] == 1.0
    with pytest.raises(SystemExit, match="at least two runs"):
        check_config(CompareConfig(runs=["one"]), environment=False)


def _set_sampling(directory: Path, **sampling) -> None:
    summary = json.loads((directory / "summary.json").read_text())
    (directory / "summary.json").write_text(json.dumps({**summary, "sampling": sampling}))


def test_runs_sampled_differently_are_marked_in_the_table_and_warned_about(tmp_path, capsys):
    """A greedy 1,024-token evaluation beside a T=0.6 256-token one: the table states both settings, marked, and warns."""
    _write_eval(tmp_path / "greedy" / "math500", HALF)
    _write_eval(tmp_path / "sampled" / "math500", ALL)
    _set_sampling(tmp_path / "greedy" / "math500", temperature=0.0, top_p=1.0, max_new_tokens=1024, n=2)
    _set_sampling(tmp_path / "sampled" / "math500", temperature=0.6, top_p=1.0, max_new_tokens=256, n=2)
    config = CompareConfig(runs=[str(tmp_path / "greedy"), str(tmp_path / "sampled")], k="1", n_bootstrap=50,
                           output_dir=str(tmp_path / "out"))
    assert run_compare(config) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    header = lines.index(next(line for line in lines if line.startswith("sampling (math500)")))
    table = [line.split() for line in lines[header:header + 6]]
    assert table[0] == ["sampling", "(math500)", "greedy", "sampled"]
    assert table[1] == ["temperature", "(differs)", "0", "0.6"]
    assert table[2] == ["top-p", "1", "1"]  # alike: shown, not marked
    assert table[3] == ["max", "new", "tokens", "(differs)", "1024", "256"]
    assert table[4] == ["samples", "per", "question", "2", "2"]
    assert table[5][:1] == ["warning:"]  # the prompt template, recorded by neither, gets no row of "?"
    warning = ("warning: math500: the runs were sampled differently (temperature 0 vs 0.6; max new tokens 1024 vs 256)")
    assert warning in captured.out and warning in captured.err  # stderr too: a log of errors only still shows it
    assert (tmp_path / "out" / "comparison.txt").read_text().count("(differs)") == 2
    payload = json.loads((tmp_path / "out" / "comparison.json").read_text())
    assert payload["sampling"]["math500"][1] == {"temperature": 0.6, "top_p": 1.0, "max_new_tokens": 256, "n": 2}
    assert len(payload["warnings"]) == 1


def test_runs_sampled_alike_or_recording_a_setting_once_get_no_warning(tmp_path):
    _write_eval(tmp_path / "a" / "math500", HALF)
    _write_eval(tmp_path / "b" / "math500", ALL)
    _set_sampling(tmp_path / "a" / "math500", temperature=0.6, max_new_tokens=256)
    _set_sampling(tmp_path / "b" / "math500", temperature=0.6)  # an older summary without max_new_tokens
    comparison = compare_runs([tmp_path / "a", tmp_path / "b"], ks="1", n_bootstrap=20)
    assert comparison.warnings == []
    assert "sampling (" not in format_comparison(comparison)  # nothing differs: no settings table


# ---------------------------------------------------------------------------------------------
# eval_plots


def test_curve_ks():
    assert curve_ks(8) == [1, 2, 4, 8]
    assert curve_ks(6) == [1, 2, 4, 6]
    assert curve_ks(1) == [1]


def test_accuracy_by_length_hand_bins():
    records = [{"response_tokens": t, "answer_reward": float(c)} for t, c in [(0, 1), (5, 1), (10, 0), (15, 0), (20, 1)]]
    # Edges [0, 10, 20]: bin 0 holds 0 and 5 (both right); bin 1 holds 10, 15, 20 (one of three right).
    assert accuracy_by_length(records, bins=2) == [
        {"low": 0.0, "high": 10.0, "count": 2, "accuracy": 1.0},
        {"low": 10.0, "high": 20.0, "count": 3, "accuracy": pytest.approx(1 / 3)},
    ]


def test_pass_at_k_curve_and_categories(tmp_path):
    _write_eval(tmp_path / "e", [[True, False, False, False], [False, False, False, False]])
    records = read_jsonl(tmp_path / "e" / "records.jsonl")
    curve = pass_at_k_curve(records, n_bootstrap=50)
    # Question 0: c=1 of 4 -> pass@1 1/4, pass@2 1 - C(3,2)/C(4,2) = 1/2, pass@4 1; question 1: 0. Mean over 2.
    assert [p["k"] for p in curve] == [1, 2, 4]
    assert [p["value"] for p in curve] == pytest.approx([1 / 8, 1 / 4, 1 / 2])
    assert {k: len(v) for k, v in lengths_by_category(records).items()} == \
        {"correct": 1, "formatted_wrong": 7, "unformatted": 0}
    written = write_eval_plots({"math500": records}, tmp_path / "plots", n_bootstrap=50)
    assert [p.name for p in written] == ["pass_at_k.png", "accuracy_by_length_math500.png",
                                         "length_by_category_math500.png"]
    assert all(p.read_bytes().startswith(PNG_MAGIC) for p in written)
