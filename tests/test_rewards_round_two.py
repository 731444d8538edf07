"""Round two of the labelled grading set (issue 9): tests/data/reward_cases_round2.jsonl.

Every label was decided by hand from the policy in docs/grading.md before the grader ran:
positives and near misses for inequalities, intervals, lists of tuples, number formatting,
labelled answers, ratios, several answers, rounding, equations, identities, matrices and
answers stated in prose.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from reasontune.rewards import question_only_reward_fn, r1_zero_reward_fn

CASES_PATH = Path(__file__).parent / "data" / "reward_cases_round2.jsonl"
CASES = [json.loads(line) for line in CASES_PATH.read_text().splitlines() if line.strip()]
REWARD_FNS = {"r1_zero": r1_zero_reward_fn, "question_only": question_only_reward_fn}


def test_round_two_has_300_cases_with_near_misses_in_every_category():
    categories = Counter(case["category"] for case in CASES)
    assert len(CASES) >= 300
    for category in categories:
        labels = {case["answer_reward"] for case in CASES if case["category"] == category}
        assert labels == {0.0, 1.0}, f"{category} lacks positives or near misses"


@pytest.mark.parametrize("case", CASES, ids=[f"{index}-{case['category']}" for index, case in enumerate(CASES)])
def test_round_two_case(case):
    rewards = REWARD_FNS[case["reward_fn"]](case["response"], case["ground_truth"])
    expected = {
        "format_reward": case["format_reward"],
        "answer_reward": case["answer_reward"],
        "reward": case["format_reward"] * case["answer_reward"],
    }
    assert rewards == expected, f"{case['response']!r} vs {case['ground_truth']!r}"
