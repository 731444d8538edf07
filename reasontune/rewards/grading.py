"""Reward functions: grade a model response against one or more reference answers."""

from __future__ import annotations

import functools
from typing import Sequence, Union

from reasontune.rewards import sandbox
from reasontune.rewards.equivalence import Answer, NeedsSymbolic, answers_match, parse_answer
from reasontune.rewards.extract import extract_boxed_answer, extract_r1_zero_answer

GroundTruth = Union[str, int, float, Sequence[Union[str, int, float]]]

DEFAULT_TIMEOUT_SECONDS = 1.0


@functools.lru_cache(maxsize=8192)
def _parse_cached(text: str) -> Answer:
    return parse_answer(text)


def _references(ground_truth: GroundTruth) -> list[str]:
    """Return the reference answers as strings (a list means any of them is accepted)."""
    if isinstance(ground_truth, (list, tuple)):
        return [text for item in ground_truth for text in _references(item)]
    if isinstance(ground_truth, bool) or ground_truth is None:
        return []
    if isinstance(ground_truth, float) and ground_truth.is_integer():
        return [str(int(ground_truth))]
    return [str(ground_truth)]


def grade_answer(answer: str, ground_truth: GroundTruth, timeout: float = DEFAULT_TIMEOUT_SECONDS) -> bool:
    """Return True when the extracted ``answer`` is equivalent to any reference in ``ground_truth``.

    Cheap exact checks run here; when only sympy can decide, the comparison runs in a
    bounded worker process and counts as wrong if it takes longer than ``timeout`` seconds.
    """
    given = _parse_cached(answer)
    if given.kind in ("refused", "empty"):
        return False
    undecided = []
    for reference in _references(ground_truth):
        truth = _parse_cached(reference)
        try:
            if answers_match(given, truth):
                return True
        except NeedsSymbolic:
            undecided.append(truth)
    for truth in undecided:
        if _symbolic_match(given, truth, timeout):
            return True
    return False


def _symbolic_match(given: Answer, truth: Answer, timeout: float) -> bool:
    """Return the sympy verdict on two answers, computed under the time and memory bound."""
    from reasontune.rewards import symbolic  # imports sympy; only reached where needed

    if sandbox.in_worker():
        # Already inside a bounded worker: its parent enforces the deadline.
        return symbolic.symbolic_answers_match(given, truth)
    status, value = sandbox.run_bounded(symbolic.symbolic_answers_match, (given, truth), timeout)
    return status == "ok" and value is True


def _rewards(format_reward: float, answer_reward: float) -> dict[str, float]:
    return {"format_reward": format_reward, "answer_reward": answer_reward, "reward": format_reward * answer_reward}


def r1_zero_reward_fn(
    response: str, ground_truth: GroundTruth, timeout: float = DEFAULT_TIMEOUT_SECONDS
) -> dict[str, float]:
    """Return ``{"format_reward", "answer_reward", "reward"}`` (each 0.0 or 1.0) of an R1-Zero response.

    Formatted: the response contains ``</think> <answer>`` and after it ``</answer>``. The
    answer is the inside of the last ``<answer>…</answer>`` (a ``\\boxed{}`` in it is
    unwrapped). Unformatted responses get 0 everywhere; formatted ones get format 1 and an
    answer reward of 1 exactly when the answer matches a reference; reward = format × answer.
    """
    answer = extract_r1_zero_answer(response)
    if answer is None:
        return _rewards(0.0, 0.0)
    correct = bool(answer.strip()) and grade_answer(answer, ground_truth, timeout)
    return _rewards(1.0, 1.0 if correct else 0.0)


def question_only_reward_fn(
    response: str, ground_truth: GroundTruth, timeout: float = DEFAULT_TIMEOUT_SECONDS
) -> dict[str, float]:
    """Return ``{"format_reward", "answer_reward", "reward"}`` grading the last ``\\boxed{}`` of a response.

    Format is 1 when the response has a complete ``\\boxed{…}``; the answer is its contents.
    """
    answer = extract_boxed_answer(response)
    if answer is None:
        return _rewards(0.0, 0.0)
    correct = bool(answer.strip()) and grade_answer(answer, ground_truth, timeout)
    return _rewards(1.0, 1.0 if correct else 0.0)
