"""pass@k, maj@k, avg@k, bootstrap intervals and paired p-values against hand values and brute force."""

from __future__ import annotations

import itertools
import math
import random
from collections import Counter
from fractions import Fraction

import numpy as np
import pytest

from reasontune.estimators import (
    avg_at_k,
    bootstrap_interval,
    group_samples,
    maj_at_k,
    paired_bootstrap,
    parse_ks,
    pass_at_k,
    question_scores,
    results_table,
    summarize_samples,
    vote,
)

# ---------------------------------------------------------------------------------------------
# pass@k


@pytest.mark.parametrize("n, c, k, expected", [
    (5, 2, 2, 0.7),        # 1 - C(3,2)/C(5,2) = 1 - 3/10
    (10, 1, 1, 0.1),       # pass@1 = c/n
    (4, 0, 2, 0.0),        # nothing correct
    (3, 2, 2, 1.0),        # n - c = 1 < k: every pair holds a correct sample
    (6, 3, 3, 0.95),       # 1 - C(3,3)/C(6,3) = 1 - 1/20
    (8, 2, 4, 11 / 14),    # 1 - C(6,4)/C(8,4) = 1 - 15/70
])
def test_pass_at_k_hand_values(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_equals_brute_force_over_all_k_subsets():
    for n in range(1, 8):
        for c in range(n + 1):
            samples = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(samples, k))
                brute = sum(any(subset) for subset in subsets) / len(subsets)
                assert pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12), (n, c, k)


def test_pass_at_k_is_stable_where_binomials_overflow_floats():
    # C(1000, 500) ~ 2.7e299 and C(1200, 500) overflows a float; exact rationals are the reference.
    n, c, k = 1200, 30, 500
    exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
    assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-9)
    assert pass_at_k(1000, 1, 1) == pytest.approx(0.001, rel=1e-12)


def test_pass_at_k_rejects_k_above_n():
    with pytest.raises(ValueError, match="at least 5 samples"):
        pass_at_k(4, 1, 5)


# ---------------------------------------------------------------------------------------------
# maj@k and avg@k


def test_vote_majority_ties_and_missing_answers():
    assert vote(["3", "4", "4"]) == 1            # "4" has two votes; its first member is sample 1
    assert vote(["3", "4", "4", None, "3"]) == 0  # 2-2 tie: the cluster that appeared first ("3") wins
    assert vote([None, None, "5"]) == 2           # None never votes
    assert vote([None, None]) is None
    assert vote([" 7", "7 ", "8"]) == 0           # default: the grader's equivalence (7 == 7)


def test_maj_at_k_uses_first_k_samples_and_the_graders_equivalence():
    answers = ["0.5", "1/2", "7", "7", "7"]
    correct = [True, True, False, False, False]
    # k=4, exact strings: clusters {0.5}, {1/2}, {7, 7} -> "7" wins (wrong).
    assert maj_at_k(answers, correct, 4, lambda a, b: a.strip() == b.strip()) == 0.0
    # k=4, the default (the grader's answers_equivalent) joins 0.5 and 1/2: a 2-2 tie the earlier cluster wins.
    assert maj_at_k(answers, correct, 4) == 1.0
    # k=4, 1/2 == 0.5: clusters {0.5, 1/2}, {7, 7} tie 2-2 -> the earlier cluster (0.5, correct) wins.
    same_value = lambda a, b: {a, b} <= {"0.5", "1/2"} or a == b  # noqa: E731
    assert maj_at_k(answers, correct, 4, same_value) == 1.0
    # k=5: "7" has three votes and wins even with the equivalence.
    assert maj_at_k(answers, correct, 5, same_value) == 0.0
    assert maj_at_k([None, None], [False, False], 2) == 0.0


def _reference_majority_correct(answers, correct, k):
    """Independent slow reference: Counter over stripped strings, ties by earliest first occurrence."""
    first = answers[:k]
    counts = Counter(a.strip() for a in first if a is not None)
    if not counts:
        return 0.0
    top = max(counts.values())
    tied = [a for a in counts if counts[a] == top]
    winner = min(tied, key=lambda a: next(i for i, x in enumerate(first) if x is not None and x.strip() == a))
    index = next(i for i, x in enumerate(first) if x is not None and x.strip() == winner)
    return float(correct[index])


def test_maj_at_k_matches_a_slow_reference_on_random_small_cases():
    rng = random.Random(7)
    for _ in range(400):
        n = rng.randint(1, 7)
        answers = [rng.choice(["1", "2", " 2", "3", None]) for _ in range(n)]
        correct = [a is not None and a.strip() == "2" for a in answers]
        for k in range(1, n + 1):
            assert maj_at_k(answers, correct, k) == _reference_majority_correct(answers, correct, k), (answers, k)


def test_avg_at_k_and_its_mean_over_all_k_subsets():
    flags = [True, False, True, True]
    assert avg_at_k(flags, 2) == 0.5
    assert avg_at_k(flags, 4) == 0.75
    # Brute force: averaged over every k-subset, the accuracy of k samples is c/n (= pass@1) for every k.
    for k in range(1, 5):
        subsets = list(itertools.combinations(flags, k))
        assert sum(sum(s) / k for s in subsets) / len(subsets) == pytest.approx(pass_at_k(4, 3, 1))
    with pytest.raises(ValueError):
        avg_at_k(flags, 5)


# ---------------------------------------------------------------------------------------------
# Bootstrap


def test_bootstrap_interval_degenerate_data_has_zero_width():
    assert bootstrap_interval([1.0] * 50, n_bootstrap=200) == (1.0, 1.0)
    assert bootstrap_interval([0.0] * 50, n_bootstrap=200) == (0.0, 0.0)


def test_bootstrap_interval_covers_the_mean_and_matches_the_normal_approximation():
    rng = np.random.default_rng(3)
    values = (rng.random(400) < 0.3).astype(float)
    mean = values.mean()
    low, high = bootstrap_interval(values, n_bootstrap=4000, seed=1)
    assert low < mean < high
    # Normal approximation: half-width 1.96 * sqrt(p(1-p)/Q); a percentile bootstrap agrees to ~0.005 here.
    half_width = 1.96 * math.sqrt(mean * (1 - mean) / len(values))
    assert low == pytest.approx(mean - half_width, abs=0.006)
    assert high == pytest.approx(mean + half_width, abs=0.006)


def test_bootstrap_interval_is_seeded():
    values = [0.0, 1.0, 0.5, 0.25, 1.0, 0.0, 0.75]
    assert bootstrap_interval(values, 500, seed=4) == bootstrap_interval(values, 500, seed=4)
    assert bootstrap_interval(values, 500, seed=4) != bootstrap_interval(values, 500, seed=5)


def test_paired_bootstrap_identical_runs_give_p_one():
    values = np.random.default_rng(0).random(100)
    result = paired_bootstrap(values, values, n_bootstrap=500)
    assert result["difference"] == 0.0
    assert result["p_value"] == 1.0


def test_paired_bootstrap_clearly_better_run_gives_small_p():
    a = np.array([1.0, 0.0] * 50)           # 50% correct
    b = np.ones(100)                        # solves every question a solves, and the rest
    result = paired_bootstrap(a, b, n_bootstrap=2000, seed=0)
    assert result["difference"] == pytest.approx(0.5)
    assert result["p_value"] < 0.001
    assert result["low"] > 0.3


def test_paired_bootstrap_noise_is_not_significant():
    rng = np.random.default_rng(11)
    a = (rng.random(200) < 0.5).astype(float)
    b = a.copy()
    b[np.flatnonzero(a == 0)[:3]] = 1.0     # three questions flip to correct, one flips to wrong
    b[np.flatnonzero(a == 1)[:1]] = 0.0
    result = paired_bootstrap(a, b, n_bootstrap=2000, seed=0)
    assert result["difference"] == pytest.approx(2 / 200)
    assert result["p_value"] > 0.2
    assert result["low"] < 0 < result["high"]


# ---------------------------------------------------------------------------------------------
# Records → summary and table


def _records(per_question: list[list[tuple[str | None, bool]]], with_answer: bool = True) -> list[dict]:
    records = []
    for index, samples in enumerate(per_question):
        for sample, (answer, correct) in enumerate(samples):
            record = {"index": index, "sample": sample, "prompt": f"question {index}",
                      "answer_reward": 1.0 if correct else 0.0, "question_id": f"q:{index}"}
            if with_answer:
                record["answer"] = answer
            records.append(record)
    return records


QUESTIONS = [
    [("2", True), ("3", False), ("2", True), ("2", True)],      # c=3
    [("5", False), ("5", False), ("6", True), (None, False)],   # c=1, majority "5" (wrong)
    [(None, False), ("1", False), ("9", True), ("9", True)],    # c=2, majority "9" (right)
]


def test_summarize_samples_hand_computed():
    summary = summarize_samples(list(reversed(_records(QUESTIONS))), ks=[1, 2, 4], n_bootstrap=300, seed=0,
                                n_samples=4, temperature=1.0, prompt="r1_zero")
    m = summary["metrics"]
    # pass@1 = mean(c/n) = (3/4 + 1/4 + 2/4) / 3 = 0.5
    assert m["pass@1"]["value"] == pytest.approx(0.5)
    # pass@2 = mean(1 - C(n-c,2)/C(4,2)) = (1 + (1 - 3/6) + (1 - 1/6)) / 3 = (1 + 0.5 + 5/6) / 3
    assert m["pass@2"]["value"] == pytest.approx((1 + 0.5 + 5 / 6) / 3)
    assert m["pass@4"]["value"] == pytest.approx(1.0)
    # maj@4: q0 "2" right, q1 "5" wrong, q2 "9" right -> 2/3; maj@2: q0 tie 2|3 -> "2" right, q1 "5" wrong, q2 "1" wrong
    assert m["maj@4"]["value"] == pytest.approx(2 / 3)
    assert m["maj@2"]["value"] == pytest.approx(1 / 3)
    # avg@2: (1/2 + 0 + 0) / 3; avg@4 = pass@1
    assert m["avg@2"]["value"] == pytest.approx(1 / 6)
    assert m["avg@4"]["value"] == pytest.approx(0.5)
    for figure in m.values():
        assert figure["low"] <= figure["value"] <= figure["high"]
    assert (summary["n_questions"], summary["n_samples"], summary["temperature"], summary["prompt"]) == (3, 4, 1.0, "r1_zero")


def test_summarize_samples_refuses_inconsistent_inputs():
    records = _records(QUESTIONS)
    with pytest.raises(ValueError, match="exceeds the 4 samples"):
        summarize_samples(records, ks=[8])
    with pytest.raises(ValueError, match="n_samples=8"):
        summarize_samples(records, ks=[1], n_samples=8)
    with pytest.raises(ValueError, match="different sample counts"):
        summarize_samples(records[:-1], ks=[1])


def test_summarize_samples_without_answers_leaves_maj_out():
    summary = summarize_samples(_records(QUESTIONS, with_answer=False), ks=[1, 4], n_bootstrap=100)
    assert "maj@4" not in summary["metrics"] and "pass@4" in summary["metrics"]
    assert "answer" in summary["maj_missing"]


def test_samples_are_grouped_by_prompt_text_without_a_question_id():
    """compare's path: group_samples, then question_scores over the groups."""
    records = _records(QUESTIONS)
    for record in records:
        del record["question_id"]
    grouped = group_samples(records)
    assert list(grouped) == ["question 0", "question 1", "question 2"]
    scores = question_scores("pass", 1, [group["correct"] for group in grouped.values()])
    assert scores.tolist() == [0.75, 0.25, 0.5]


def test_results_table_markdown_and_json():
    summary = summarize_samples(_records(QUESTIONS), ks=[1, 4], n_bootstrap=200, temperature=0.6, prompt="r1_zero")
    markdown, as_json = results_table({"math500": summary})
    header, _, row = markdown.splitlines()[:3]
    assert header.split(" | ")[3:6] == ["pass@1", "maj@1", "avg@1"]
    assert row.startswith("| math500 | 3 | 4 | 50.0 [")
    assert "| 0.6 | 0 | r1_zero |" in row
    assert as_json["benchmarks"]["math500"]["metrics"]["maj@4"]["value"] == pytest.approx(2 / 3)


def test_parse_ks():
    assert parse_ks("16,1,4,4") == [1, 4, 16]
    with pytest.raises(ValueError):
        parse_ks("0,2")


def test_majority_vote_uses_the_graders_equivalence_by_default():
    """Answers 1/2, 0.5 and \\frac{1}{2} are one vote (3) against 0.25 twice: the vote is 1/2 under the default."""
    from reasontune.estimators import vote

    answers = ["0.25", "1/2", "0.25", "0.5", "\\frac{1}{2}"]
    assert vote(answers) == 1  # the cluster of 1/2 wins; its first member is sample 1
    assert vote(answers, equivalent=lambda a, b: a == b) == 0  # by exact strings 0.25 has the most votes
