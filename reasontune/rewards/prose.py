"""The answer a sentence states: find the final result inside prose (``The answer is $9$.``).

Used when an answer is not a bare expression: the ``<answer>`` content of an R1-Zero
response written as a sentence, or a question-only response without a ``\\boxed{}``. Only
the last ``MAX_PROSE_CHARS`` characters are read, and every step is a linear scan or a
regular expression without nested repetition, so a huge response costs no more than a
small one.

The rule: split the tail into sentences (math delimited by ``$…$``, ``$$…$$``, ``\\(…\\)`` or
``\\[…\\]`` never splits one) and, from the last sentence backwards, take the first that
states something: the delimited math right after its last "is", "=", "answer:" or
"equals" (with math joined to it by "and", "or" or commas), else its last delimited math,
else the text after that marker, else — in an answer field, not a whole solution — its one
number. A sentence that states only words is passed over for an earlier one with math.
"""

from __future__ import annotations

import re

MAX_PROSE_CHARS = 4000
"""Only this many characters at the end of a response are searched for a stated answer."""

MAX_SENTENCES = 8
"""Sentences read backwards from the end before giving up."""

_DELIMITERS = (("$$", "$$"), ("\\[", "\\]"), ("\\(", "\\)"), ("$", "$"))
_MARKER = re.compile(
    r"(?:(?:answer|result|solution|total|value|sum|\bis)\s*:|\bis\b|\bare\b|\bequals\b|\bbe\b|\bwas\b|\bit['’]s\b|=)", re.I
)
# Words that make a sentence with math in it state a result, in a whole solution (strict mode).
_RESULT_WORD = re.compile(
    r"\b(?:answer|result|value|total|sum|therefore|thus|hence|so|giving|gives|get|obtain|final|find|found"
    r"|conclude|yields)\b",
    re.I,
)
_FILLER = re.compile(
    r"^(?:\s+|,|:|(?:therefore|thus|hence|so|then|just|exactly|equal to|approximately|about|simply|the value"
    r"|given by|indeed|now|only)\b)+",
    re.I,
)
_NUMBER_TOKEN = re.compile(r"[-+$]?\s?\d[\d,. ]*\d(?:\s?%)?\S*|[-+$]?\d\S*")
# Words that make a number in a sentence a bound or a guess, not the answer ("at least 5").
_QUALIFIER = re.compile(
    r"\b(?:least|most|more|less|than|greater|fewer|over|under|between|not|maybe|perhaps|either|or|nor|except)\b", re.I
)
_NAME = re.compile(r"^\s*(?:[a-zA-Z]|\\[a-zA-Z]+)(?:_\{?\w+\}?)?\s*$")
_JOINERS = (",", "and", ", and", "or", ", or")
_MATHY = re.compile(r"[\d\\]")
_DIGIT = re.compile(r"\d")
_WORD = re.compile(r"[A-Za-z]{2,}")
_CODE_CHARACTERS = frozenset("()[]{}'\"_=;\\")
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)|\n\s*\n")
_MARKUP = re.compile(r"\*\*|__|^#+\s*", re.M)


def math_segments(text: str) -> list[tuple[int, int, str]]:
    """Return ``(start, end, inner text)`` of every delimited math segment in ``text``, in order."""
    segments = []
    index = 0
    length = len(text)
    while index < length:
        if text[index] not in "$\\":
            index += 1
            continue
        found = False
        for opening, closing in _DELIMITERS:
            if text.startswith(opening, index) and not (opening == "$" and index > 0 and text[index - 1] == "\\"):
                close = text.find(closing, index + len(opening))
                while close > 0 and closing == "$" and text[close - 1] == "\\":
                    close = text.find(closing, close + 1)  # \$ is a dollar sign, not a delimiter
                if close >= 0:
                    segments.append((index, close + len(closing), text[index + len(opening) : close]))
                    index = close + len(closing)
                    found = True
                break
        if not found:
            index += 1
    return segments


def _sentences(text: str, segments: list[tuple[int, int, str]]) -> list[tuple[int, int]]:
    """Return ``(start, end)`` spans of the sentences of ``text``; math segments never split one."""
    inside = [False] * (len(text) + 1)
    for start, end, _ in segments:
        for position in range(start, end):
            inside[position] = True
    spans, start = [], 0
    for match in _SENTENCE_END.finditer(text):
        if inside[match.start()] or (text[match.start()] == "." and match.start() > 0 and text[match.start() - 1].isdigit()
                                     and match.end() < len(text) and text[match.end()].isdigit()):
            continue
        spans.append((start, match.end()))
        start = match.end()
    spans.append((start, len(text)))
    return [(a, b) for a, b in spans if text[a:b].strip()]


def _last_side(math: str) -> str:
    """Return the right-hand side of a chain ``a = b = c`` when it is a plain number-like value."""
    parts = math.split("=")
    if len(parts) > 2 or (len(parts) == 2 and not re.search(r"[a-zA-Z]", parts[1].replace("\\frac", "").replace("\\sqrt", "").replace("\\pi", ""))
                          and re.search(r"[\d}]", parts[1]) and re.search(r"[-+*/^\d]", parts[0])
                          and not re.fullmatch(r"\s*\\?[a-zA-Z]+(?:_\{?\w+\}?)?\s*", parts[0])):
        return parts[-1].strip()
    return math.strip()


def _joined_segments(text: str, inside: list[tuple[int, int, str]]) -> str:
    """Return the last math segment, or the last few joined as a list when only "and", "or" or commas separate them.

    ``The solutions are $x=2$ and $x=3$.`` states ``x=2, x=3``; "$3$ or $5$" states ``3 or 5``.
    """
    parts = [_last_side(inside[-1][2])]
    joiner = ", "
    for previous, following in zip(reversed(inside[:-1]), reversed(inside[1:])):
        gap = text[previous[1] : following[0]].strip().lower()
        # Only parallel statements join: "$x=2$ and $x=3$", "$2$ and $3$", not "$2x=8$ and $x=4$".
        if gap not in _JOINERS or not (_is_value(previous[2]) and _is_value(following[2])):
            break
        joiner = " or " if gap.endswith("or") else ", "
        parts.append(_last_side(previous[2]))
    return joiner.join(reversed(parts))


def _is_value(math: str) -> bool:
    """Return True when a math segment is a value or ``name = value`` (``x = 4``), not an equation."""
    sides = math.split("=")
    return len(sides) == 1 or (len(sides) == 2 and _NAME.match(sides[0]) is not None)


def _first_run_after(text: str, inside: list[tuple[int, int, str]], position: int) -> list[tuple[int, int, str]]:
    """Return the first math segment after ``position`` and those joined to it ("$2$ and $3$")."""
    after = [segment for segment in inside if segment[0] >= position]
    run = after[:1]
    for following in after[1:]:
        if text[run[-1][1] : following[0]].strip().lower() not in _JOINERS:
            break
        run.append(following)
    return run


def _is_wordy(sentence: str) -> bool:
    """Return True for a sentence of plain words ("so it costs 1,000.99€"), not code (``lambda: 0``)."""
    return not _CODE_CHARACTERS.intersection(sentence) and len(_WORD.findall(sentence)) >= 2


def stated_answers(text: str, strict: bool = False) -> list[str]:
    """Return candidate answers a piece of prose states, best first (empty when none is found).

    ``"The answer is $9$."`` gives ``["9", …]``; ``"so it costs 1,000.99€"`` gives
    ``["1,000.99€"]``. The caller grades the first candidate that reads as mathematics.
    ``strict`` (for whole solutions rather than an answer field): only a sentence with a
    marker ("is", "=", "answer:", …) or the word "answer" states a result, and a bare last
    number does not count.
    """
    text = _MARKUP.sub("", text[-MAX_PROSE_CHARS:])
    segments = math_segments(text)
    spans = _sentences(text, segments)
    # A sentence that states words only ("I hope it is correct.") is kept as a last resort.
    worded: list[str] = []
    for start, end in reversed(spans[-MAX_SENTENCES:]):
        candidates = []
        inside = [segment for segment in segments if segment[0] >= start and segment[1] <= end and segment[2].strip()]
        plain = text[start:end]
        for a, b, _ in reversed(inside):
            plain = plain[: a - start] + " " * (b - a) + plain[b - start :]
        markers = list(_MARKER.finditer(plain))
        if strict and not markers and not (inside and ("=" in inside[-1][2] or _RESULT_WORD.search(plain))):
            continue
        stating = [marker for marker in markers if inside and inside[-1][0] >= start + marker.end()]
        stated = ""
        if markers:
            stated = text[start + markers[-1].end() : end]
            stated = _FILLER.sub("", stated).strip().rstrip(".!?;, ").strip()
        if stated and not [segment for segment in inside if segment[0] >= start + markers[-1].end()] and _DIGIT.search(stated):
            # "The largest $n$ is 34.": the plain number after the last marker, not the math before it.
            candidates.append(stated)
        if stating:
            # "The answer is $5$ because $x > 2$": the math right after the last marker that has some.
            candidates.append(_joined_segments(text, _first_run_after(text, inside, start + stating[-1].end())))
        if inside:
            candidates.append(_joined_segments(text, inside))
        if stated:
            candidates.append(stated)
        numbers = [] if strict or not _is_wordy(plain) or _QUALIFIER.search(plain) else _NUMBER_TOKEN.findall(plain)
        if len(numbers) == 1:  # one number in a sentence of words; two would be a hedge
            candidates.append(numbers[-1].strip().rstrip(".!?;,").strip())
        candidates = [candidate for candidate in candidates if candidate]
        if inside or any(_MATHY.search(candidate) for candidate in candidates):
            return list(dict.fromkeys(candidates))
        worded = worded or candidates
    return worded
