"""The labeled grading set: every hand-written case in tests/data/reward_cases.jsonl.

Each expectation was written by hand from the conventions in design.md ("Rewards"), not
read off this code's output.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from reasontune.rewards import question_only_reward_fn, r1_zero_reward_fn

CASES_PATH = Path(__file__).parent / "data" / "reward_cases.jsonl"
CASES = [json.loads(line) for line in CASES_PATH.read_text().splitlines() if line.strip()]
REWARD_FNS = {"r1_zero": r1_zero_reward_fn, "question_only": question_only_reward_fn}


def test_the_labeled_set_is_large_and_covers_every_category():
    categories = Counter(case["category"] for case in CASES)
    assert len(CASES) >= 300
    assert len(categories) >= 20
    # Near misses are at least a quarter of the set, so a grader that says yes to
    # everything close cannot pass.
    assert sum(case["answer_reward"] == 0.0 for case in CASES) >= len(CASES) // 4


@pytest.mark.parametrize(
    "case", CASES, ids=[f"{index}-{case['category']}" for index, case in enumerate(CASES)]
)
def test_labeled_case(case):
    rewards = REWARD_FNS[case["reward_fn"]](case["response"], case["ground_truth"])
    expected = {
        "format_reward": case["format_reward"],
        "answer_reward": case["answer_reward"],
        "reward": case["format_reward"] * case["answer_reward"],
    }
    assert rewards == expected, f"{case['response']!r} vs {case['ground_truth']!r}"
