"""Reference-answer and response extraction helpers."""

from __future__ import annotations

from reasontune.rewards import extract_boxed_answer, extract_gsm8k_answer, extract_math_answer, extract_r1_zero_answer


def test_gsm8k_answer_is_the_text_after_the_hash_marks_without_commas():
    assert extract_gsm8k_answer("She sells 16 - 3 - 4 = <<16-3-4=9>>9 eggs.\n#### 18") == "18"
    assert extract_gsm8k_answer("so the total is 1,072 dollars\n#### 1,072") == "1072"
    assert extract_gsm8k_answer("#### -5") == "-5"
    assert extract_gsm8k_answer("no final line") is None


def test_boxed_extraction_matches_braces_and_takes_the_last_box():
    assert extract_boxed_answer("so \\boxed{\\frac{1}{2}} and") == "\\frac{1}{2}"
    assert extract_boxed_answer("\\boxed{1} then \\boxed{2}") == "2"
    assert extract_boxed_answer("\\fbox{7}") == "7"
    assert extract_boxed_answer("\\boxed{\\{1, 2\\}}") == "\\{1, 2\\}"
    assert extract_boxed_answer("\\boxed{unclosed") is None
    assert extract_boxed_answer("no box") is None
    assert extract_boxed_answer("\\boxed 5$") == "5"
    assert extract_math_answer("Thus $x = \\boxed{\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}}$.") == (
        "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}"
    )


def test_r1_zero_extraction_follows_the_format_rule():
    assert extract_r1_zero_answer("a </think> <answer> 5 </answer>") == " 5 "
    assert extract_r1_zero_answer("a </think> <answer>1</answer> b <answer>2</answer> c") == "2"
    assert extract_r1_zero_answer("a </think> <answer></answer>") == ""
    assert extract_r1_zero_answer("a </think><answer>5</answer>") is None
    assert extract_r1_zero_answer("a <answer>5</answer>") is None
    assert extract_r1_zero_answer("a </think> <answer>5") is None


def test_gsm8k_references_grade_themselves_right_and_neighbours_wrong(gsm8k_dir):
    import json

    from reasontune.rewards import r1_zero_reward_fn

    lines = (gsm8k_dir / "test.jsonl").read_text().splitlines()[:200]
    for line in lines:
        answer = extract_gsm8k_answer(json.loads(line)["answer"])
        assert answer is not None and answer.lstrip("-").replace(".", "").isdigit(), answer
        assert r1_zero_reward_fn(f"t </think> <answer>{answer}</answer>", answer)["reward"] == 1.0
        wrong = str(int(float(answer)) + 1)
        assert r1_zero_reward_fn(f"t </think> <answer>{wrong}</answer>", answer)["reward"] == 0.0
