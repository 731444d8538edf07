"""The public helpers for majority voting: extract_final_answer and answers_equivalent.

Expectations are written by hand from docs/grading.md; the adversarial inputs must come back
wrong (or None) within the same bounds as grading.
"""

from __future__ import annotations

import time

import pytest

from reasontune.rewards import answers_equivalent, extract_final_answer


def test_r1_zero_final_answer_is_the_last_answer_content_read_like_the_grader():
    assert extract_final_answer("t </think> <answer> 42 </answer>") == " 42 "
    assert extract_final_answer("t </think> <answer>The answer is $9$.</answer>") == "9"
    assert extract_final_answer("t </think> <answer>\\boxed{3} and \\boxed{5}</answer>") == "3, 5"
    assert extract_final_answer("t </think> <answer>so it costs 1,000.99€</answer>") == "1,000.99€"
    # The strict format rule is unchanged: no "</think> <answer>", no answer.
    assert extract_final_answer("t </think><answer>42</answer>") is None
    assert extract_final_answer("The answer is 42.") is None


def test_question_only_final_answer_is_the_box_else_the_stated_result():
    assert extract_final_answer("First \\boxed{4}, no wait, \\boxed{5}.", "question_only") == "5"
    assert extract_final_answer("4 + 5 = 9. The answer is $9$.", "question_only") == "9"
    assert extract_final_answer("The final answer is $7$. I hope it is correct.", "question_only") == "7"
    assert extract_final_answer("Let me think about 12 apples", "question_only") is None
    with pytest.raises(ValueError, match="reward must be"):
        extract_final_answer("x", "gsm8k")


@pytest.mark.parametrize(
    "first, second, equal",
    [
        ("\\frac{1}{2}", "0.5", True),  # 1/2 = 0.5 exactly
        ("x < 5", "(-\\infty, 5)", True),  # the same set of reals
        ("(1,2),(3,4)", "(3,4),(1,2)", True),  # a list of tuples is unordered
        ("(1,2)", "(2,1)", False),  # a tuple is ordered
        ("3 or 5", "5, 3", True),  # several answers as a set
        ("3 or 5", "3", False),  # no credit for hedging, in either order
        ("3", "3 or 5", False),
        ("\\frac{1}{3}", "0.33", True),  # 1/3 rounds to 0.33 at two places
        ("0.33", "0.333", False),  # two decimals are compared exactly
        ("k = 3", "3", True),
        ("Monday", "\\text{monday}", True),
        ("7", "8", False),
    ],
)
def test_answers_equivalent_uses_the_grading_policy_both_ways(first, second, equal):
    assert answers_equivalent(first, second) is equal
    assert answers_equivalent(second, first) is equal


def test_answers_equivalent_is_bounded_on_hostile_answers():
    start = time.perf_counter()
    assert answers_equivalent("9^{9^{9^9}}", "9^{9^{9^9}} + 1") is False
    assert answers_equivalent("(" * 10_000 + "1" + ")" * 10_000, "1") is False
    assert answers_equivalent("__import__('os').system('true')", "0") is False
    assert time.perf_counter() - start < 3.0
