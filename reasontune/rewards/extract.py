"""Answer extraction: the R1-Zero ``<answer>`` tag, the last ``\\boxed{}``, GSM8K's ``####`` line.

Everything here is linear in the input and scans at most ``max_chars`` characters of an
answer, so a million-character response costs one ``rfind`` and no more.
"""

from __future__ import annotations

import re

MAX_ANSWER_CHARS = 2000
"""Answers longer than this are refused (graded wrong) before any parsing."""

THINK_ANSWER_OPEN = "</think> <answer>"
ANSWER_OPEN = "<answer>"
ANSWER_CLOSE = "</answer>"

_BOX_COMMANDS = ("\\boxed", "\\fbox")
_GSM8K_ANSWER = re.compile(r"####\s*([^\n]*)")


def extract_r1_zero_answer(response: str) -> str | None:
    """Return the text inside the last ``<answer>…</answer>`` pair, or None when unformatted.

    The response is formatted when it contains ``</think> <answer>`` followed, somewhere
    after it, by ``</answer>``. The answer is the inside of the last complete
    ``<answer>…</answer>`` pair (text after its ``</answer>`` is ignored); an empty answer
    is returned as ``""`` (formatted but wrong).
    """
    start = response.find(THINK_ANSWER_OPEN)
    if start < 0:
        return None
    close = response.rfind(ANSWER_CLOSE)
    if close < start + len(THINK_ANSWER_OPEN):
        return None
    # The last <answer> that some </answer> follows, paired with the first </answer> after it.
    open_ = response.rfind(ANSWER_OPEN, 0, close)
    close = response.find(ANSWER_CLOSE, open_)
    return response[open_ + len(ANSWER_OPEN) : close]


def _find_last_box(text: str) -> int:
    """Return the index of the last ``\\boxed``/``\\fbox`` command in ``text``, or -1."""
    best = -1
    for command in _BOX_COMMANDS:
        position = text.rfind(command)
        while position >= 0:
            after = position + len(command)
            # ``\boxed`` must not be the prefix of a longer command name.
            if after >= len(text) or not text[after].isalpha():
                break
            position = text.rfind(command, 0, position)
        best = max(best, position)
    return best


def _box_at(text: str, position: int, max_chars: int) -> tuple[str, int] | None:
    """Return ``(contents, end)`` of the box command at ``position``, or None when it never closes."""
    command = "\\boxed" if text.startswith("\\boxed", position) else "\\fbox"
    index = position + len(command)
    while index < len(text) and text[index] == " ":
        index += 1
    if index >= len(text):
        return None
    if text[index] != "{":
        # ``\boxed 5``: the argument runs to the next ``$`` or end of line.
        match = re.match(r"[^$\n]*", text[index : index + max_chars + 1])
        argument = match.group(0).strip()
        return (argument, index + match.end()) if argument and len(argument) <= max_chars else None
    depth = 0
    limit = min(len(text), index + max_chars + 2)
    for cursor in range(index, limit):
        char = text[cursor]
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[index + 1 : cursor], cursor + 1
    return None


def extract_boxed_answer(text: str, max_chars: int = MAX_ANSWER_CHARS) -> str | None:
    """Return the contents of the last ``\\boxed{…}`` (or ``\\fbox{…}``) in ``text``, or None.

    Braces are matched, so ``\\boxed{\\frac{1}{2}}`` gives ``\\frac{1}{2}``; ``\\boxed 5``
    gives ``5``. None when there is no box, its braces never close, or its contents exceed
    ``max_chars`` characters (the scan stops there rather than reading on).
    """
    position = _find_last_box(text)
    if position < 0:
        return None
    box = _box_at(text, position, max_chars)
    return None if box is None else box[0]


# What may stand between boxes that together state one answer: ``\boxed{3}, \boxed{5}``, math
# delimiters (``\(\boxed{1}\) and \(\boxed{2}\)``) and words that name parts of one question
# (``\boxed{(3, 3)} \text{ for part (a) and } \boxed{(1, 1)}``).
_PART_WORDS = r"(?:and|or|for|part|parts|the|first|second|third|question|respectively|\([a-dA-D]\)|\((?:i|ii|iii|iv)\)|[a-d]\))"
_BOX_JOINER = re.compile(
    r"^(?:\s|,|;|\.|\$|\\quad|\\qquad|\\[()\[\]]|\\text\{(?:\s|,|" + _PART_WORDS + r")*\}"
    r"|(?<![a-zA-Z])" + _PART_WORDS + r"(?![a-zA-Z])|\\[,;!])*$"
)


# Between the answers to the parts of one question: "$\boxed{3}$. Part (b): $\boxed{5}$",
# "\boxed{3}$ and for part (b) it is $\boxed{5}". A part label must be there, so a correction
# ("\boxed{4}, but the answer is \boxed{5}") never joins.
_PART_GAP = re.compile(
    r"^(?:[\s,;:.$]|\\[()\[\]]|\\text\s*\{|\}|\\quad|\\qquad|(?<![a-zA-Z])(?:and|for|part|parts|the|answer|answers|is|it|to"
    r"|question|\((?:[a-dA-D]|i{1,3}|iv)\)|[a-d]\))(?![a-zA-Z]))*$",
    re.I,
)
_PART_LABEL = re.compile(r"(?<![a-zA-Z])part\b|\((?:[a-dA-D]|i{1,3}|iv)\)", re.I)


def extract_boxed_answers(text: str, max_chars: int = MAX_ANSWER_CHARS, max_boxes: int = 16) -> list[str]:
    """Return the contents of the last box and of the boxes just before it that join it into one answer.

    Boxes join when only separators stand between them (spaces, commas, ``and``, ``or``,
    ``$``): ``\\boxed{3} and \\boxed{5}`` gives ``["3", "5"]``; ``\\boxed{4}, no wait, \\boxed{5}``
    gives ``["5"]``. Empty when there is no complete box. At most ``max_boxes`` are read.
    """
    boxes: list[str] = []
    end = len(text)
    next_start = None
    while len(boxes) < max_boxes:
        position = _find_last_box(text[:end]) if end < len(text) else _find_last_box(text)
        if position < 0:
            break
        box = _box_at(text, position, max_chars)
        if box is None:
            break
        contents, box_end = box
        gap = text[box_end:next_start] if next_start is not None else ""
        if next_start is not None and not (
            (len(gap) <= 40 and _BOX_JOINER.match(gap)) or (len(gap) <= 60 and _PART_GAP.match(gap) and _PART_LABEL.search(gap))
        ):
            break
        boxes.append(contents)
        next_start, end = position, position
    return boxes[::-1]


def extract_gsm8k_answer(solution: str) -> str | None:
    """Return the final answer of a GSM8K solution (the text after ``####``), commas removed.

    ``"… #### 1,072"`` gives ``"1072"``; None when there is no ``####`` line.
    """
    matches = _GSM8K_ANSWER.findall(solution)
    if not matches:
        return None
    return matches[-1].strip().replace(",", "")


def extract_math_answer(solution: str) -> str | None:
    """Return the reference answer of a MATH solution: its last ``\\boxed{}``, or None."""
    return extract_boxed_answer(solution)
