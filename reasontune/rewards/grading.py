"""Reward functions: grade a model response against one or more reference answers."""

from __future__ import annotations

import functools
import re
from typing import Sequence, Union

from reasontune.rewards import sandbox
from reasontune.rewards.equivalence import Answer, NeedsSymbolic, answers_match, parse_answer
from reasontune.rewards.extract import extract_boxed_answers, extract_r1_zero_answer
from reasontune.rewards.prose import MAX_PROSE_CHARS, math_segments, stated_answers

GroundTruth = Union[str, int, float, Sequence[Union[str, int, float]]]

DEFAULT_TIMEOUT_SECONDS = 1.0


@functools.lru_cache(maxsize=8192)
def _parse_cached(text: str) -> Answer:
    return parse_answer(text)


_UNREAD = ("text", "refused", "empty")
# Two words in a row (outside LaTeX commands) make a sentence: "The area is 12.5", not "7 apples".
_SENTENCE = re.compile(r"(?<![A-Za-z])[A-Za-z]{2,}[ ,]+[A-Za-z]{2}")
_WORDS = re.compile(r"[A-Za-z]{2,}")
_COMMAND = re.compile(r"\\[a-zA-Z]+")


def _joined_boxes(text: str) -> str | None:
    """Return the last box's contents, or several adjacent boxes joined as a list (``3, 5``)."""
    boxes = extract_boxed_answers(text)
    return ", ".join(boxes) if boxes else None


def _stated_answer(text: str, strict: bool = False) -> str | None:
    """Return the answer a piece of prose states: the first candidate that reads as mathematics.

    Unless ``strict``, a sentence that states its result ("The answer is 9.") is preferred
    to a later one that merely ends in a number ("Checking 3 cases confirms it.").
    """
    readings = [stated_answers(text, True)] + ([] if strict else [stated_answers(text, False)])
    for candidates in readings:
        for candidate in candidates:
            if _parse_cached(candidate).kind not in _UNREAD:
                return candidate
    candidates = readings[-1]
    return candidates[0] if candidates else None


def _is_prose(text: str) -> bool:
    """Return True for a sentence ("The area is 12.5") or words around delimited math ("So $x = 3$.")."""
    if _SENTENCE.search(_COMMAND.sub(" ", text)):
        return True
    segments = math_segments(text)
    if not segments:
        return False
    outside = "".join(text[end:start] for (_, end, _), (start, _, _) in zip([(0, 0, "")] + segments, segments + [(len(text), 0, "")]))
    return _WORDS.search(outside) is not None


def select_answer(text: str) -> str:
    """Return the part of an answer text that is graded: its boxes, itself when bare, or what its prose states.

    ``"\\boxed{3} and \\boxed{5}"`` gives ``"3, 5"``; ``"42"`` gives ``"42"``; ``"The answer is $9$."``
    gives ``"9"``. A text that reads neither as mathematics nor as a statement is returned whole
    (compared as words).
    """
    boxed = _joined_boxes(text)
    if boxed is not None:
        return boxed
    stated = _stated_answer(text) if _is_prose(text[-MAX_PROSE_CHARS:]) else None
    if stated is not None and _parse_cached(stated).kind not in _UNREAD:
        return stated
    if _parse_cached(text).kind not in _UNREAD:
        return text
    stated = _stated_answer(text) if stated is None else stated
    return text if stated is None else stated


def extract_final_answer(response: str, reward: str = "r1_zero") -> str | None:
    """Return the answer the grader grades in ``response``, or None when it has none.

    ``reward="r1_zero"``: the last ``<answer>…</answer>`` content under the strict format rule,
    then its boxes or the result its prose states. ``reward="question_only"``: the last box
    (adjacent boxes joined as a list), else the result the last stating sentence gives.
    """
    if reward == "r1_zero":
        answer = extract_r1_zero_answer(response)
        return None if answer is None else select_answer(answer)
    if reward == "question_only":
        boxed = _joined_boxes(response)
        return boxed if boxed is not None else _stated_answer(response, strict=True)
    raise ValueError(f"reward must be 'r1_zero' or 'question_only', not {reward!r}")


def answers_equivalent(first: str, second: str, timeout: float = DEFAULT_TIMEOUT_SECONDS) -> bool:
    """Return True when two extracted final answers are equivalent under the grading policy.

    For majority voting: the same comparison as grading (``second`` plays the reference), with
    symbolic checks bounded by ``timeout`` seconds in a worker process.
    """
    return grade_answer(first, second, timeout) or grade_answer(second, first, timeout)


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
    answer = extract_final_answer(response, "r1_zero")
    if answer is None:
        return _rewards(0.0, 0.0)
    correct = bool(answer.strip()) and grade_answer(answer, ground_truth, timeout)
    return _rewards(1.0, 1.0 if correct else 0.0)


def question_only_reward_fn(
    response: str, ground_truth: GroundTruth, timeout: float = DEFAULT_TIMEOUT_SECONDS
) -> dict[str, float]:
    """Return ``{"format_reward", "answer_reward", "reward"}`` grading the final answer of a free-form response.

    The answer is the last complete ``\\boxed{…}`` (boxes standing together are one list
    answer); without a box, the result the last stating sentence gives ("The answer is
    $9$."). Format is 1 when an answer was found.
    """
    answer = extract_final_answer(response, "question_only")
    if answer is None:
        return _rewards(0.0, 0.0)
    correct = bool(answer.strip()) and grade_answer(answer, ground_truth, timeout)
    return _rewards(1.0, 1.0 if correct else 0.0)
