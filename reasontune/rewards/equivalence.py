"""Answer equivalence: parse both answers into structures and compare them as a grader would.

``parse_answer`` turns a normalised answer into an ``Answer`` (a number or expression, an
equation, an ordered tuple or interval, an unordered solution list or set, a union of
intervals, a matrix, or text). ``answers_match`` compares two of them. Comparison is exact:
rationals are compared as fractions; anything else is first compared numerically at fixed
sample points, which can only prove a difference, and when the samples agree the decision is
left to an exact symbolic check supplied by the caller (``exact_equal``) — by default one
that raises ``NeedsSymbolic`` so that sympy runs only inside a bounded worker process.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable

from reasontune.rewards.normalize import normalize_answer, normalize_text
from reasontune.rewards.parse import (
    NotRational,
    ParseError,
    Refused,
    parse_expression,
    rational_value,
    sample_values,
    symbols_of,
)

MAX_EXPONENT = 1000
"""Numeric exponents beyond this on a non-rational base are refused before any sympy work."""

MAX_ITEMS = 64
"""Lists, tuples and matrices with more elements than this are refused."""


class NeedsSymbolic(Exception):
    """The cheap checks could not decide; an exact symbolic comparison is needed."""


@dataclass(frozen=True)
class Answer:
    """A parsed answer.

    ``kind`` is one of ``expr`` (``value`` = tree), ``eq`` (``(lhs, rhs)`` trees), ``seq``
    (``(open, close, trees)``: tuples and intervals, ordered), ``set`` (trees, unordered),
    ``union`` (``seq`` values, unordered), ``matrix`` (rows of trees), ``text`` (folded
    string), ``hedge`` (several candidates offered), ``empty`` or ``refused``.
    """

    kind: str
    value: object
    percent: bool
    text: str
    normalized: str = ""


_HEDGE = re.compile(r"\bor\b|\beither\b|\\lor(?![a-zA-Z])|\\vee(?![a-zA-Z])")
_CHOICE = re.compile(r"^\(?\s*([A-E])\s*\)?$")
_GIVEN_CHOICE = re.compile(r"^\(?\s*([A-Ea-e])\s*\)?\.?$")
_MATRIX = re.compile(r"^\\begin\{([pbBvV]?matrix|smallmatrix|array)\}(?:\{[^{}]*\})?(.*)\\end\{\1\}$", re.S)
_LABEL = re.compile(r"^\s*(?:[a-zA-Z](?:_\{?\w+\}?)?|\\[a-zA-Z]+)\s*(?:\(\s*[a-zA-Z]?\s*\))?\s*$")
_EMPTY_SET = re.compile(r"^(?:\\emptyset|\\varnothing|\\\{\s*\\\}|\{\s*\})$")
_OPENERS = "([{"
_CLOSERS = ")]}"


def split_top_level(text: str, separators: tuple[str, ...]) -> list[str]:
    """Return ``text`` split at ``separators`` that sit outside every bracket."""
    parts, depth, start, index = [], 0, 0, 0
    while index < len(text):
        char = text[index]
        if char in _OPENERS:
            depth += 1
        elif char in _CLOSERS:
            depth -= 1
        elif depth == 0:
            for separator in separators:
                if text.startswith(separator, index):
                    parts.append(text[start:index])
                    index += len(separator)
                    start = index
                    break
            else:
                index += 1
                continue
            continue
        index += 1
    parts.append(text[start:])
    return [part.strip() for part in parts]


def _matching_close(text: str) -> int:
    """Return the index of the bracket closing ``text[0]`` (any bracket type), or -1."""
    depth = 0
    for index, char in enumerate(text):
        if char in _OPENERS:
            depth += 1
        elif char in _CLOSERS:
            depth -= 1
            if depth == 0:
                return index
    return -1


def _element(text: str) -> list[tuple]:
    """Return the trees one list element stands for: ``x=3`` → [3]; ``1\\pm 2`` → [3, -1]."""
    parts = split_top_level(text, ("=",))
    if len(parts) > 1:
        if not _LABEL.match(parts[0]):
            raise ParseError("equation inside a list")
        text = parts[-1]
    for sign in ("\\pm", "\\mp"):
        if sign in text:
            plus, minus = text.replace(sign, "+", 1), text.replace(sign, "-", 1)
            if sign == "\\mp":
                plus, minus = minus, plus
            return _element(plus) + _element(minus)
    return [parse_expression(text)]


def _elements(parts: list[str]) -> tuple:
    if len(parts) > MAX_ITEMS:
        raise Refused("too many elements")
    trees: list[tuple] = []
    for part in parts:
        trees.extend(_element(part))
    return tuple(trees)


def _structure(text: str) -> tuple[str, object]:
    """Return ``(kind, value)`` of a normalised answer; raise ParseError when it has none."""
    if _EMPTY_SET.match(text):
        return "set", ()
    matrix = _MATRIX.match(text)
    if matrix is not None:
        rows = [row for row in matrix.group(2).split("\\\\") if row.strip()]
        if len(rows) > MAX_ITEMS:
            raise Refused("matrix too large")
        return "matrix", tuple(_elements([cell.strip() for cell in row.split("&")]) for row in rows)
    unions = split_top_level(text, ("\\cup", "\\sqcup"))
    if len(unions) > 1:
        intervals = []
        for part in unions:
            kind, value = _structure(part)
            if kind != "seq" or len(value[2]) != 2:
                raise ParseError("a union of something other than intervals")
            intervals.append(value)
        return "union", tuple(intervals)
    if text.startswith("\\{") and text.endswith("\\}"):
        inner = text[2:-2]
        return "set", _elements(split_top_level(inner, (",", ";")) if inner.strip() else [])
    if text[:1] in "([" and _matching_close(text) == len(text) - 1:
        parts = split_top_level(text[1:-1], (",",))
        if len(parts) > 1:
            return "seq", (text[0], text[-1], _elements(parts))
    parts = split_top_level(text, (",", ";", " and ", "\\text{and}"))
    if len(parts) > 1:
        return "set", _elements(parts)
    sides = split_top_level(text, ("=",))
    if len(sides) > 1 and not _LABEL.match(sides[0]):
        if len(sides) != 2:
            raise ParseError("a chain of equations")
        return "eq", (parse_expression(sides[0]), parse_expression(sides[1]))
    if len(sides) > 1 and "\\pm" not in sides[-1] and "\\mp" not in sides[-1]:
        return _structure(sides[-1])
    trees = _element(text)
    return ("expr", trees[0]) if len(trees) == 1 else ("set", tuple(trees))


def parse_answer(raw: str) -> Answer:
    """Return the parsed ``Answer`` of a raw answer string (never raises)."""
    normalized = normalize_answer(raw)
    if normalized is None:
        return Answer("refused", None, False, "")
    text, percent = normalized
    folded = normalize_text(text)
    if not text:
        return Answer("empty", None, percent, "")
    if _HEDGE.search(text):
        return Answer("hedge", None, percent, folded, text)
    try:
        kind, value = _structure(text)
    except Refused:
        return Answer("refused", None, percent, folded, text)
    except (ParseError, RecursionError, ValueError, ZeroDivisionError):
        return Answer("text", folded, percent, folded, text)
    return Answer(kind, value, percent, folded, text)


# ---------------------------------------------------------------------------------------
# Comparison

ExactEqual = Callable[[tuple, tuple], bool]


def defer_to_symbolic(left: tuple, right: tuple) -> bool:
    """Raise NeedsSymbolic: the default exact check, used outside a bounded worker."""
    raise NeedsSymbolic


def _infinity_sign(tree: tuple) -> int:
    """Return +1 or -1 when ``tree`` is ±∞, else 0."""
    sign = 1
    while tree[0] == "neg":
        sign, tree = -sign, tree[1]
    return sign if tree == ("const", "inf") else 0


def trees_equal(left: tuple, right: tuple, exact_equal: ExactEqual = defer_to_symbolic) -> bool:
    """Return True when two expression trees have equal values (exactly, never approximately)."""
    if left == right:
        return True
    left_infinity, right_infinity = _infinity_sign(left), _infinity_sign(right)
    if left_infinity or right_infinity:
        return left_infinity == right_infinity
    try:
        return rational_value(left) == rational_value(right)
    except NotRational:
        pass
    except (Refused, ParseError, ZeroDivisionError, OverflowError):
        return False
    try:
        check_exponents(left)
        check_exponents(right)
    except (Refused, ParseError, ZeroDivisionError):
        return False
    names = sorted((symbols_of(left) | symbols_of(right)) - {"i", "e"})
    try:
        left_values, right_values = sample_values(left, names), sample_values(right, names)
    except (ArithmeticError, ValueError, KeyError, TypeError):
        return exact_equal(left, right)
    for a, b in zip(left_values, right_values):
        if abs(a - b) > 1e-9 * max(1.0, abs(a), abs(b)):
            return False
    return exact_equal(left, right)


def check_exponents(tree: tuple) -> None:
    """Raise Refused when ``tree`` has a numeric exponent beyond ``MAX_EXPONENT`` (x^{10^{10}})."""
    kind = tree[0]
    if kind == "pow":
        try:
            exponent = rational_value(tree[2])
        except NotRational:
            exponent = None
        if exponent is not None and abs(exponent) > MAX_EXPONENT:
            raise Refused("exponent too large")
    if kind in ("add", "mul"):
        for child in tree[1]:
            check_exponents(child)
    elif kind in ("neg", "fact"):
        check_exponents(tree[1])
    elif kind in ("div", "pow", "root", "binom"):
        check_exponents(tree[1])
        check_exponents(tree[2])
    elif kind == "func":
        check_exponents(tree[2])


def _scaled(tree: tuple, percent: bool) -> list[tuple]:
    """Return the readings of a number written with a percent sign: 50% is 50 and 0.5."""
    return [tree, ("div", tree, ("num", Fraction(100)))] if percent else [tree]


def _items_equal(left: tuple, right: tuple, exact_equal: ExactEqual) -> bool:
    return len(left) == len(right) and all(trees_equal(a, b, exact_equal) for a, b in zip(left, right))


def _unordered_equal(left: tuple, right: tuple, equal: Callable[[object, object], bool]) -> bool:
    if len(left) != len(right):
        return False
    unused = list(right)
    for item in left:
        for position, candidate in enumerate(unused):
            if equal(item, candidate):
                del unused[position]
                break
        else:
            return False
    return True


def _seq_equal(left: tuple, right: tuple, exact_equal: ExactEqual) -> bool:
    return left[0] == right[0] and left[1] == right[1] and _items_equal(left[2], right[2], exact_equal)


def answers_match(given: Answer, truth: Answer, exact_equal: ExactEqual = defer_to_symbolic) -> bool:
    """Return True when the ``given`` answer is equivalent to the reference ``truth``.

    Raises NeedsSymbolic when only an exact symbolic check can decide and ``exact_equal`` is
    the default.
    """
    if given.kind in ("refused", "empty") or truth.kind in ("refused", "empty"):
        return False
    if given.text and given.text == truth.text and given.percent == truth.percent:
        return True
    if given.kind == "hedge" or truth.kind == "hedge":
        return False
    choice = _CHOICE.match(truth.normalized)
    if choice is not None:
        # A multiple-choice reference: (B), B and \\text{(B)} all name the same letter.
        given_choice = _GIVEN_CHOICE.match(given.normalized)
        return given_choice is not None and given_choice.group(1).upper() == choice.group(1)
    kinds = {given.kind, truth.kind}
    if kinds == {"expr"}:
        if given.percent == truth.percent:
            return trees_equal(given.value, truth.value, exact_equal)
        # One side has a percent sign: 50\\% matches both 50 and 0.5.
        readings = _scaled(given.value, given.percent) if given.percent else _scaled(truth.value, True)
        other = truth.value if given.percent else given.value
        return any(trees_equal(reading, other, exact_equal) for reading in readings)
    if kinds == {"eq"}:
        left = ("add", (given.value[0], ("neg", given.value[1])))
        right = ("add", (truth.value[0], ("neg", truth.value[1])))
        return trees_equal(left, right, exact_equal) or trees_equal(left, ("neg", right), exact_equal)
    if kinds == {"seq"}:
        return _seq_equal(given.value, truth.value, exact_equal)
    if kinds == {"set"}:
        return _unordered_equal(given.value, truth.value, lambda a, b: trees_equal(a, b, exact_equal))
    if kinds == {"set", "expr"}:
        items = given.value if given.kind == "set" else truth.value
        single = truth.value if given.kind == "set" else given.value
        return len(items) == 1 and trees_equal(items[0], single, exact_equal)
    if kinds == {"union"}:
        return _unordered_equal(given.value, truth.value, lambda a, b: _seq_equal(a, b, exact_equal))
    if kinds == {"matrix"}:
        return len(given.value) == len(truth.value) and all(
            _items_equal(a, b, exact_equal) for a, b in zip(given.value, truth.value)
        )
    if kinds == {"matrix", "seq"}:
        matrix = given.value if given.kind == "matrix" else truth.value
        seq = given.value if given.kind == "seq" else truth.value
        # A column or row vector equals the tuple of its entries.
        entries = tuple(row[0] for row in matrix) if all(len(row) == 1 for row in matrix) else (
            matrix[0] if len(matrix) == 1 else None
        )
        return entries is not None and seq[0] == "(" and _items_equal(entries, seq[2], exact_equal)
    return False
