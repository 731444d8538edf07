"""Data: every accepted format from tiny files, file:line:field errors, counted skips, subsets, templates, filter."""

from __future__ import annotations

import json

import pytest

from reasontune.data import (
    DataError,
    Example,
    example_from_record,
    example_prompt,
    format_prompt,
    load_examples,
    load_template,
    train_validation_split,
    with_r1_zero_targets,
)
from reasontune.filtering import FilterConfig, run_filter

R1_ZERO = (
    "A conversation between User and Assistant. The User asks a question, and the Assistant solves it. The Assistant "
    "first thinks about the reasoning process in the mind and then provides the User with the answer. The reasoning "
    "process is enclosed within <think> </think> and answer is enclosed within <answer> </answer> tags, respectively, "
    "i.e., <think> reasoning process here </think> <answer> answer here </answer>.\nUser: {question}\nAssistant: <think>"
)
GSM8K_RECORD = {"question": "Tom has 3 apples and buys 4. How many?",
                "answer": "He has 3 + 4 = <<3+4=7>>7 apples.\nIn total 1,007 - 1000 = <<1007-1000=7>>7.\n#### 7"}


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_every_record_format_becomes_one_example_type(tmp_path):
    records = [
        {"prompt": "P1", "response": "R1"},
        {"prompt": "P2", "ground_truth": 42},
        {"question": "Q3", "answer": "3/4"},
        GSM8K_RECORD,
        {"problem": "M5", "solution": "so \\boxed{5}", "answer": "5"},
        {"messages": [{"role": "user", "content": "U6", "info": {"reference_answer": "6"}},
                      {"role": "assistant", "content": "A6"}]},
        {"question": "Q7", "answer": ["7", "seven"]},
    ]
    examples = load_examples(write_jsonl(tmp_path / "mixed.jsonl", records))
    assert len(examples) == 7 and examples.n_skipped == 0 and examples.total_records == 7
    e = examples
    assert (e[0].prompt, e[0].response, e[0].ground_truth) == ("P1", "R1", None)
    assert (e[1].prompt, e[1].ground_truth) == ("P2", "42")
    assert (e[2].question, e[2].prompt, e[2].ground_truth) == ("Q3", None, "3/4")
    assert (e[3].ground_truth, e[3].solution) == ("7", GSM8K_RECORD["answer"])
    assert (e[4].question, e[4].ground_truth, e[4].solution) == ("M5", "5", "so \\boxed{5}")
    assert (e[5].prompt, e[5].response, e[5].ground_truth) == ("U6", "A6", "6")
    assert e[6].ground_truth == ["7", "seven"]
    assert [x.line for x in e] == list(range(1, 8)) and e[3].source.endswith("mixed.jsonl")
    assert e[0].raw == records[0]


def test_math_reference_comes_from_the_last_boxed_answer(tmp_path):
    pytest.importorskip("reasontune.rewards")
    record = {"problem": "Find x.", "solution": "First \\boxed{1} then $x = \\boxed{\\frac{1}{2}}$."}
    [example] = load_examples(write_jsonl(tmp_path / "math.jsonl", [record]))
    assert example.ground_truth == "\\frac{1}{2}"
    [target] = with_r1_zero_targets([example])  # SFT's target: the whole solution, then the reference
    assert target.response == " First \\boxed{1} then $x = \\boxed{\\frac{1}{2}}$. </think> <answer>\\frac{1}{2}</answer>"


def test_json_array_and_parquet_files_load(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"question": "Q", "answer": "1"}, GSM8K_RECORD]))
    assert [e.ground_truth for e in load_examples(tmp_path / "a.json")] == ["1", "7"]
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list([{"problem": "M", "answer": "9"}, {"problem": "N", "answer": "10"}]).to_parquet(
        str(tmp_path / "m.parquet"))
    parquet = load_examples(tmp_path / "m.parquet")
    assert [(e.question, e.ground_truth, e.line) for e in parquet] == [("M", "9", 1), ("N", "10", 2)]


def test_malformed_lines_name_file_line_and_field(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"question": "ok", "answer": "1"}, {"question": "no answer"}])
    with pytest.raises(DataError, match=rf"^{path}:2: field 'answer' missing"):
        load_examples(path)
    path = write_jsonl(tmp_path / "broken.jsonl", [{"question": "ok", "answer": "1"}, "", '{"question": "x",'])
    with pytest.raises(DataError, match=rf"^{path}:3: invalid JSON"):
        load_examples(path)
    path = write_jsonl(tmp_path / "typed.jsonl", [{"prompt": 5, "response": "r"}])
    with pytest.raises(DataError, match=rf"^{path}:1: field 'prompt' must be a string"):
        load_examples(path)
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "assistant", "content": "a"}]}])
    with pytest.raises(DataError, match=rf"^{path}:1: field 'messages' has no turn with role 'user'"):
        load_examples(path)


def test_skip_bad_counts_every_skipped_record_by_reason(tmp_path, capsys):
    path = write_jsonl(tmp_path / "some_bad.jsonl", [
        {"question": "a", "answer": "1"}, {"question": "b"}, "not json", {"question": "c"}, {"question": "d", "answer": 4},
    ])
    loaded = load_examples(path, skip_bad=True)
    assert [e.question for e in loaded] == ["a", "d"]
    assert loaded.total_records == 5 and loaded.n_skipped == 3
    assert loaded.skipped == {"field 'answer' missing": 2, "invalid JSON: Expecting value at column 1": 1}
    assert f"{path}:2: field 'answer' missing" in loaded.skipped_lines[0]
    assert "3 malformed skipped" in capsys.readouterr().err


def test_seeded_subset_keeps_file_order_and_split_is_disjoint(tmp_path):
    path = write_jsonl(tmp_path / "many.jsonl", [{"question": f"q{i}", "answer": str(i)} for i in range(50)])
    first = load_examples(path, max_examples=10, seed=3)
    again = load_examples(path, max_examples=10, seed=3)
    other = load_examples(path, max_examples=10, seed=4)
    lines = [e.line for e in first]
    assert lines == [e.line for e in again] == sorted(lines) and len(set(lines)) == 10
    assert lines != [e.line for e in other]
    assert "10 of 50 drawn" in first.report()
    train, validation = train_validation_split(load_examples(path).examples, 0.2, seed=1)
    assert len(train) == 40 and len(validation) == 10
    assert {e.line for e in train}.isdisjoint(e.line for e in validation)
    assert [e.line for e in validation] == sorted(e.line for e in validation)
    with pytest.raises(ValueError):
        train_validation_split(train, 40)


def test_templates(tmp_path):
    assert load_template("r1_zero") == R1_ZERO
    assert load_template("question_only") == "{question}"
    assert format_prompt(load_template("r1_zero"), "What is $\\frac{1}{2}$?").endswith(
        "User: What is $\\frac{1}{2}$?\nAssistant: <think>")
    custom = tmp_path / "mine.prompt"
    custom.write_text("Solve {question} in {braces}\n")
    assert format_prompt(load_template(custom), "2+2") == "Solve 2+2 in {braces}"
    (tmp_path / "none.prompt").write_text("no placeholder")
    with pytest.raises(DataError, match="must contain the placeholder"):
        load_template(tmp_path / "none.prompt")
    with pytest.raises(FileNotFoundError):
        load_template("no_such_template")
    assert example_prompt(Example(question="Q", prompt="fixed"), R1_ZERO) == "fixed"
    assert example_prompt(Example(question="Q"), "<{question}>") == "<Q>"


def test_gsm8k_solution_becomes_an_r1_zero_target():
    # Annotations <<…>> dropped, the '#### 7' line moved into <answer>, thousands separator removed.
    records = [GSM8K_RECORD, {"question": "Q", "answer": "a\n#### 1,234"}]
    gsm8k, thousands = with_r1_zero_targets([example_from_record(record) for record in records])
    assert gsm8k.response == " He has 3 + 4 = 7 apples.\nIn total 1,007 - 1000 = 7. </think> <answer>7</answer>"
    assert thousands.response == " a </think> <answer>1234</answer>"
    [kept] = with_r1_zero_targets([Example(question="Q", response=" mine", solution="x\n#### 2", ground_truth="2")])
    assert kept.response == " mine"


def test_gsm8k_sample_loads_in_full(gsm8k_dir):
    test = load_examples(gsm8k_dir / "test.jsonl")
    train = load_examples(gsm8k_dir / "train.jsonl")
    assert (len(test), len(train)) == (1319, 7473)
    assert test.n_skipped == train.n_skipped == 0
    assert test[0].ground_truth == "18" and test[0].solution.endswith("#### 18")


def test_filter_keeps_only_correct_responses_and_reports_reasons(tmp_path, capsys):
    pytest.importorskip("reasontune.rewards")
    records = [
        {"prompt": "2+2?", "response": " 2 and 2 </think> <answer>4</answer>", "ground_truth": "4"},
        {"prompt": "2+3?", "response": " guess </think> <answer>6</answer>", "ground_truth": "5"},
        {"prompt": "2+4?", "response": "6", "ground_truth": "6"},
        {"prompt": "2+5?", "response": " x </think> <answer>7</answer>"},
        {"messages": [{"role": "user", "content": "3*3?", "info": {"reference_answer": "9"}},
                      {"role": "assistant", "content": " 3*3 </think> <answer>9</answer>"}]},
    ]
    source = write_jsonl(tmp_path / "sft.jsonl", records)
    out = tmp_path / "kept" / "filtered.jsonl"
    assert run_filter(FilterConfig(data=str(source), out=str(out), grading_workers=0)) == 0
    kept = [json.loads(line) for line in out.read_text().splitlines()]
    assert kept == [records[0], records[4]]
    printed = capsys.readouterr().out
    assert "5 examples read" in printed and "2 kept" in printed
    for line in ("kept: 2", "formatted but wrong: 1", "unformatted: 1", "no reference answer: 1"):
        assert line in printed


def test_json_lines_holding_unicode_line_separators_read_back_whole(tmp_path):
    """JSON leaves U+2028, U+2029, U+0085 and \\x1c unescaped in strings (json.dumps(ensure_ascii=False) writes them raw):
    they are inside a record, not ends of lines."""
    from reasontune.rollouts import write_jsonl
    from reasontune.run_layout import read_jsonl

    records = [{"response": f"before{separator}after"} for separator in ("\u2028", "\u2029", "\x85", "\x1c", "\x0c")]
    path = write_jsonl(records + [{"response": "plain"}], tmp_path / "records.jsonl")
    assert "\u2028" in path.read_text(encoding="utf-8")  # written raw, so the reader must not split there
    assert read_jsonl(path, strict=True) == records + [{"response": "plain"}]
    problems: list[str] = []
    assert read_jsonl(path, strict=False, problems=problems) == records + [{"response": "plain"}] and problems == []
    (tmp_path / "crlf.jsonl").write_bytes(b'{"a": 1}\r\n{"a": 2}\r{"a": 3}\n')
    assert read_jsonl(tmp_path / "crlf.jsonl") == [{"a": 1}, {"a": 2}, {"a": 3}]
