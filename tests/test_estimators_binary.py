"""Intervals and p-values for 0/1 per-question scores: Wilson, exact McNemar, Newcombe, against independent derivations."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

from reasontune.estimators import (
    BOOTSTRAP,
    MCNEMAR,
    PAIRED_BOOTSTRAP,
    WILSON,
    mcnemar_exact_p,
    newcombe_paired_interval,
    paired_difference,
    proportion_interval,
    summarize_samples,
    wilson_interval,
)

Z95 = 1.959963984540054


def _score_test_bounds(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson interval by its definition, not its closed form: the p whose score statistic
    |successes/n - p| / sqrt(p(1-p)/n) is at most z, found by bisection on each side of the estimate."""
    estimate = successes / n

    def inside(p: float) -> bool:
        return abs(estimate - p) <= z * math.sqrt(p * (1 - p) / n)

    def edge(outside: float, inner: float) -> float:
        for _ in range(200):
            middle = (outside + inner) / 2
            outside, inner = (outside, middle) if inside(middle) else (middle, inner)
        return inner

    low = 0.0 if successes == 0 else edge(0.0, estimate)
    high = 1.0 if successes == n else edge(1.0, estimate)
    return low, high


@pytest.mark.parametrize("successes,n", [(0, 200), (1, 200), (7, 200), (100, 200), (200, 200), (3, 10), (0, 1)])
def test_wilson_interval_is_the_score_test_inversion(successes, n):
    assert wilson_interval(successes, n) == pytest.approx(_score_test_bounds(successes, n), abs=1e-9)


def test_zero_of_200_is_not_a_zero_width_interval():
    # z² / (n + z²) = 3.8415 / 203.8415: the upper Wilson bound at 0 successes.
    low, high, method = proportion_interval(np.zeros(200))
    assert (low, method) == (0.0, WILSON)
    assert high == pytest.approx(Z95 ** 2 / (200 + Z95 ** 2)) and high == pytest.approx(0.018845, abs=1e-6)


def test_fractional_scores_keep_the_bootstrap():
    values = np.array([0.0, 0.5, 1.0, 0.25] * 10)
    low, high, method = proportion_interval(values, n_bootstrap=300, seed=1)
    assert method == BOOTSTRAP and low < values.mean() < high


def _brute_mcnemar(only_first: int, only_second: int) -> float:
    """Two-sided exact test by enumeration: the probability, under Binomial(m, 1/2), of every
    split at least as unlikely as the observed one."""
    m = only_first + only_second
    probability = [Fraction(math.comb(m, i), 2 ** m) for i in range(m + 1)]
    observed = probability[only_first]
    return float(sum(p for p in probability if p <= observed))


@pytest.mark.parametrize("only_first,only_second", [(0, 0), (0, 1), (1, 0), (0, 6), (6, 0), (2, 9), (10, 10), (3, 30)])
def test_mcnemar_exact_matches_enumeration(only_first, only_second):
    assert mcnemar_exact_p(only_first, only_second) == pytest.approx(_brute_mcnemar(only_first, only_second), rel=1e-12)


def test_one_discordant_question_is_no_evidence_and_six_one_way_are():
    assert mcnemar_exact_p(0, 1) == 1.0            # 2 · (1/2) capped at 1
    assert mcnemar_exact_p(0, 6) == pytest.approx(2 / 64)   # 2 · (1/2)^6 = 0.03125 < 0.05
    assert mcnemar_exact_p(0, 5) == pytest.approx(2 / 32)   # 0.0625: five are not enough


def test_newcombe_by_hand_when_the_first_run_solves_nothing():
    # n = 10, run a solves none, run b solves 2 (both only in b): φ = 0 (a margin is empty).
    # Wilson(0/10) = [0, z²/(10+z²)] = [0, 0.277533]; Wilson(2/10): center (0.2 + z²/20)/(1 + z²/10)
    # = 0.283260, half z·sqrt(0.016 + z²/400)/(1 + z²/10) = 0.226578 → [0.056682, 0.509838].
    # low = 0.2 - sqrt((0.2-0.056682)² + 0.277533²) = -0.112353; high = 0.2 + (0.509838 - 0.2) = 0.509838.
    a = np.zeros(10)
    b = np.array([1.0, 1.0] + [0.0] * 8)
    low, high = newcombe_paired_interval(a, b)
    assert low == pytest.approx(-0.112353, abs=2e-6) and high == pytest.approx(0.509838, abs=2e-6)


def test_newcombe_identical_runs_contain_zero_and_are_narrower_than_independent_ones():
    rng = np.random.default_rng(3)
    a = (rng.random(200) < 0.3).astype(float)
    low, high = newcombe_paired_interval(a, a.copy())
    assert low < 0.0 < high
    shuffled = rng.permutation(a)   # same rate, pairing broken: φ near 0, so a wider interval
    low_independent, high_independent = newcombe_paired_interval(a, shuffled)
    assert high - low < high_independent - low_independent


def test_newcombe_covers_the_true_difference_about_95_percent_of_the_time():
    # Correlated pairs: a question is hard for both runs with probability 0.9; otherwise each run
    # solves it independently with 0.3 (run a) and 0.5 (run b). True difference 0.1 × (0.5 - 0.3) = 0.02.
    rng = np.random.default_rng(0)
    trials, covered = 600, 0
    for _ in range(trials):
        easy = rng.random(200) < 0.1
        a = (easy & (rng.random(200) < 0.3)).astype(float)
        b = (easy & (rng.random(200) < 0.5)).astype(float)
        low, high = newcombe_paired_interval(a, b)
        covered += low <= 0.02 <= high
    assert 0.92 <= covered / trials <= 0.995


def test_paired_difference_chooses_by_the_scores():
    a = np.array([1.0, 0.0] * 50)
    b = np.ones(100)
    exact = paired_difference(a, b)
    assert exact["method"] == MCNEMAR and exact["difference"] == pytest.approx(0.5)
    assert exact["p_value"] == pytest.approx(2 * 0.5 ** 50) and exact["low"] > 0.3
    fractional = paired_difference(a * 0.5, b, n_bootstrap=300)
    assert fractional["method"] == PAIRED_BOOTSTRAP


def test_summary_reports_a_nonzero_upper_bound_for_zero_correct():
    records = [{"question_id": str(q), "sample": 0, "answer_reward": 0.0} for q in range(200)]
    summary = summarize_samples(records, ks=[1])
    figure = summary["metrics"]["pass@1"]
    assert figure["method"] == WILSON and figure["value"] == 0.0 and figure["high"] > 0.018
