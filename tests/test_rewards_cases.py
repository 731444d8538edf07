"""The labeled grading sets: every hand-written case in tests/data/reward_cases*.jsonl.

reward_cases.jsonl is the first set; reward_cases_round2.jsonl (issue 9) adds inequalities,
intervals, lists of tuples, number formatting, labelled answers, ratios, several answers,
rounding, equations, identities, matrices and answers stated in prose. reward_cases_round3.jsonl
(issue 21) adds rounding in one direction, times of day, base subscripts, several answers in the
reference, braces as grouping, inequalities under a negative factor and with absolute values,
approximations, equation chains, systems of assignments, choice letters with text, digit
grouping, decimal commas, commutative rewrites, matrix entries, undefined parts, and prose
(stated results after math, boxes mid-sentence, units and decimal commas, thin spaces, parts,
matrices). Each expectation was written by hand from the conventions in docs/grading.md, not
read off this code's output; where round three changed a convention (a short decimal answer
against an exact reference, a lone decimal comma against one number, |x| >= 2 against its
intervals) the earlier sets were relabelled to it.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from reasontune.rewards import question_only_reward_fn, r1_zero_reward_fn

DATA = Path(__file__).parent / "data"
FIRST = [json.loads(line) for line in (DATA / "reward_cases.jsonl").read_text().splitlines() if line.strip()]
ROUND_TWO = [json.loads(line) for line in (DATA / "reward_cases_round2.jsonl").read_text().splitlines() if line.strip()]
ROUND_THREE = [json.loads(line) for line in (DATA / "reward_cases_round3.jsonl").read_text().splitlines() if line.strip()]
CASES = FIRST + ROUND_TWO + ROUND_THREE
REWARD_FNS = {"r1_zero": r1_zero_reward_fn, "question_only": question_only_reward_fn}


def test_the_labeled_set_is_large_and_covers_every_category():
    categories = Counter(case["category"] for case in FIRST)
    assert len(FIRST) >= 300
    assert len(categories) >= 20
    # Near misses are at least a quarter of the set, so a grader that says yes to
    # everything close cannot pass.
    assert sum(case["answer_reward"] == 0.0 for case in CASES) >= len(CASES) // 4


def test_round_two_has_300_cases_with_near_misses_in_every_category():
    assert len(ROUND_TWO) >= 300
    for category in {case["category"] for case in ROUND_TWO}:
        labels = {case["answer_reward"] for case in ROUND_TWO if case["category"] == category}
        assert labels == {0.0, 1.0}, f"{category} lacks positives or near misses"


def test_round_three_has_positives_and_near_misses_in_every_class():
    categories = Counter(case["category"] for case in ROUND_THREE)
    assert len(ROUND_THREE) >= 200 and len(categories) >= 20
    for category in categories:
        labels = {case["answer_reward"] for case in ROUND_THREE if case["category"] == category}
        assert labels == {0.0, 1.0}, f"{category} lacks positives or near misses"


@pytest.mark.parametrize(
    "case", CASES, ids=[f"{index}-{case['category']}" for index, case in enumerate(CASES)]
)
def test_labeled_case(case):
    # A generous symbolic time limit: these cases test what is equal, not speed (the machine
    # running the suite may be busy); test_rewards_safety.py tests the bounds.
    rewards = REWARD_FNS[case["reward_fn"]](case["response"], case["ground_truth"], timeout=10.0)
    expected = {
        "format_reward": case["format_reward"],
        "answer_reward": case["answer_reward"],
        "reward": case["format_reward"] * case["answer_reward"],
    }
    assert rewards == expected, f"{case['response']!r} vs {case['ground_truth']!r}"
