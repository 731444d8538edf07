"""The benchmark registry read from local fixture files in each dataset's hub schema (made-up rows)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from reasontune.benchmarks import (
    BENCHMARKS,
    STANDARD_PROMPT,
    load_benchmark,
    load_benchmarks,
    local_file,
    resolve_benchmarks,
)
from reasontune.data import DataError, example_prompt

FIXTURES = Path(__file__).parent / "data" / "benchmarks"


def test_resolve_benchmarks_all_and_unknown_names():
    assert resolve_benchmarks("all") == ["math500", "gsm8k", "aime24", "aime25", "amc23", "minerva", "olympiadbench"]
    assert resolve_benchmarks("gsm8k, math500,gsm8k") == ["gsm8k", "math500"]
    with pytest.raises(ValueError, match="unknown benchmark.*aime23.*choose from math500"):
        resolve_benchmarks("math500,aime23")


def test_registry_names_the_hub_datasets():
    assert (BENCHMARKS["math500"].hub_id, BENCHMARKS["math500"].split) == ("HuggingFaceH4/MATH-500", "test")
    assert (BENCHMARKS["gsm8k"].hub_id, BENCHMARKS["gsm8k"].hub_config, BENCHMARKS["gsm8k"].split) == \
        ("openai/gsm8k", "main", "test")
    assert BENCHMARKS["olympiadbench"].hub_config == "OE_TO_maths_en_COMP"


# Expected (question ids, references) per benchmark, written from the fixture rows by hand.
EXPECTED = {
    "math500": (["math500:test/prealgebra/9001.json", "math500:test/algebra/9002.json",
                 "math500:test/prealgebra/9003.json"], ["1", "-3", "\\frac{1}{4}"]),
    "gsm8k": (["gsm8k:test:1", "gsm8k:test:2"], ["42", "2500"]),   # '#### 2,500' loses its separator
    "aime24": (["aime24:60", "aime24:61"], ["249", "24"]),
    "aime25": (["aime25:0", "aime25:1"], ["25", "84"]),
    "amc23": (["amc23:0", "amc23:1", "amc23:2"], ["27", "0.125", "27"]),  # float64 27.0 -> "27"
    "minerva": (["minerva:test:1", "minerva:test:2"], ["1", "14.1"]),
    "olympiadbench": (["olympiadbench:3001", "olympiadbench:3002"], ["3, -3", "23"]),  # "$...$" removed
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_each_benchmark_loads_from_its_local_schema(name):
    data = load_benchmark(name, FIXTURES)
    ids, references = EXPECTED[name]
    assert data.question_ids == ids
    assert [e.ground_truth for e in data.examples] == references
    assert data.examples.total_records == len(ids)
    first = data.examples[0]
    assert first.question and first.source.startswith(str(FIXTURES)) and first.line == 1
    assert example_prompt(first, STANDARD_PROMPT).endswith("put your final answer within \\boxed{}.")


def test_gsm8k_keeps_the_worked_solution_and_math500_its_solution():
    assert load_benchmark("gsm8k", FIXTURES).examples[0].solution.endswith("#### 42")
    assert load_benchmark("math500", FIXTURES).examples[1].solution == "So $x = \\boxed{-3}$."


def test_load_benchmarks_subset_is_seeded_and_in_order():
    data = load_benchmarks("math500,aime25", FIXTURES, max_examples=2, seed=3)
    assert list(data) == ["math500", "aime25"]
    ids = data["math500"].question_ids
    assert len(ids) == 2 and ids == sorted(ids, key=EXPECTED["math500"][0].index)
    assert data["math500"].examples.valid_records == 3
    assert load_benchmarks("math500", FIXTURES, max_examples=2, seed=3)["math500"].question_ids == ids


def test_bad_row_names_file_line_and_field(tmp_path):
    rows = [{"problem": "Fine?", "answer": "1", "id": "a"}, {"problem": "No answer here", "id": "b"}]
    (tmp_path / "aime25.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(DataError, match=r"aime25\.jsonl:2: field 'answer' missing"):
        load_benchmark("aime25", tmp_path)
    (tmp_path / "aime25.jsonl").write_text(json.dumps({"question": "wrong field", "answer": "1", "id": "a"}) + "\n")
    with pytest.raises(DataError, match=r"aime25\.jsonl:1: field 'problem' missing"):
        load_benchmark("aime25", tmp_path)


def test_bad_gsm8k_answer_and_duplicate_ids(tmp_path):
    (tmp_path / "gsm8k.jsonl").write_text(json.dumps({"question": "q", "answer": "no final line"}) + "\n")
    with pytest.raises(DataError, match=r"gsm8k\.jsonl:1: field 'answer' must be a GSM8K solution"):
        load_benchmark("gsm8k", tmp_path)
    rows = [{"problem": "p", "answer": "1", "id": "7"}, {"problem": "q", "answer": "2", "id": "7"}]
    (tmp_path / "aime25.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(DataError, match="question ids repeat \\(aime25:7\\)"):
        load_benchmark("aime25", tmp_path)


def test_missing_local_file_lists_where_it_looked(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no local MATH-500 file.*math500\.jsonl.*math500/test\.jsonl"):
        local_file(BENCHMARKS["math500"], tmp_path)
