"""Answer equivalence: parse both answers into structures and compare them as a grader would.

``parse_answer`` turns a normalised answer into an ``Answer`` (a number or expression, an
equation, an ordered tuple or interval, an unordered solution list or set — "3 or 5"
included —, a union of intervals, an inequality read as a set of reals, a ratio, a matrix,
or text). ``answers_match`` compares two of them. Comparison is exact:
rationals are compared as fractions; anything else is first compared numerically at fixed
sample points, which can only prove a difference, and when the samples agree the decision is
left to an exact symbolic check supplied by the caller (``exact_equal``) — by default one
that raises ``NeedsSymbolic`` so that sympy runs only inside a bounded worker process.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from fractions import Fraction
from typing import Callable

from reasontune.rewards import relations
from reasontune.rewards.normalize import normalize_answer, normalize_text
from reasontune.rewards.parse import (
    NotRational,
    numeric_value,
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
    (``(open, close, values)``: tuples and intervals, ordered), ``set`` (values, unordered:
    comma lists, ``3 or 5``, several boxes), ``union`` (``seq`` values, unordered),
    ``relation`` (``(variable, intervals)``: a set of reals, see ``relations``), ``reals``
    (intervals, from ``\\mathbb{R} \\setminus \\{…\\}``), ``assignment`` (``(names, trees)``
    of ``x = 2, y = 3``), ``ratio``
    (trees), ``matrix`` (rows of trees), ``text`` (folded string), ``empty`` or ``refused``.
    Elements of ``seq`` and ``set`` are ``(kind, value)`` pairs of the same kinds.
    ``equation`` keeps ``(lhs, rhs)`` of a labelled answer such as ``y = 2x+1`` (whose value
    side is the answer) so that it can still be compared as an equation; ``decimals`` is the
    number of decimal places when the answer is a single decimal literal (``0.33`` → 2).
    ``comma_decimal`` is the tree of the decimal-comma reading of a lone ``2,74`` (used only
    against a single number, see ``answers_match``); ``bases`` the explicit base subscripts
    written on numbers (``1011_2`` → ``{"2"}``); ``choice`` the letter of a multiple-choice
    answer followed by its text (``C. x = 42`` → ``"C"``, valued as ``x = 42``).
    Kinds added to the above: ``time`` (``(hours, minutes)`` of ``h:mm``) and ``group``
    (values in plain braces ``{1, 3}``: a list, or a tuple against a tuple).
    """

    kind: str
    value: object
    percent: bool
    text: str
    normalized: str = ""
    equation: tuple | None = None
    decimals: int | None = None
    comma_decimal: tuple | None = None
    bases: frozenset = frozenset()
    choice: str | None = None


_OR_SEPARATORS = (" or ", "\\lor", "\\vee")
_EITHER = re.compile(r"^\s*either\s+")
_CHOICE = re.compile(r"^\(?\s*([A-E])\s*\)?$")
_GIVEN_CHOICE = re.compile(r"^(?:\(?\s*([A-Ea-e])\s*\)?\.?|\(\s*([A-E])\s*\)\s+[^A-Za-z()]+)$")
_MATRIX = re.compile(r"^\\begin\{([pbBvV]?matrix|smallmatrix|array)\}(?:\{[^{}]*\})?(.*)\\end\{\1\}$", re.S)
_BRACKETED_MATRIX = re.compile(r"^[(\[]\s*(\\begin\{(?:array|matrix)\}.*\\end\{(?:array|matrix)\})\s*[)\]]$", re.S)
# What a label may be: ``x``, ``x_1``, ``\theta``, ``f(x)``, ``(p, q)``, ``\angle ABC``; and
# names built from letters alone such as ``AB``, ``\frac{AB}{CD}``, ``V_1:V_2`` (see is_label).
_SYMBOL = r"(?:[a-zA-Z]|\\[a-zA-Z]+)(?:_\{?\w+\}?)?(?:'|\\prime)*(?:\s*\^\s*\{?\s*(?:-1|T|\\top)\s*\}?)?"
_LABEL = re.compile(
    rf"^\s*(?:{_SYMBOL}\s*(?:\(\s*[a-zA-Z0-9,.\s+-]*\))?|\(\s*{_SYMBOL}(?:\s*,\s*{_SYMBOL})+\s*\)"
    r"|(?:m\s*)?\\(?:angle|triangle|measuredangle)\s*[A-Z]{1,3}"
    r"|\|\s*(?:\\overline\s*\{\s*[A-Z]{1,4}\s*\}|\\vec\s*\{?\s*[a-zA-Z]{1,2}\s*\}?|[A-Z]{1,4})\s*\|"  # |AB|, |\vec{v}|
    r"|\\(?:overline|widehat|overrightarrow)\s*\{\s*[A-Z]{1,4}\s*\})\s*$"
)
_LETTER_NAME = re.compile(r"^(?:[a-zA-Z\s{}/:]|\\frac|\\cdot|_\{?\w+\}?)+$")
_EMPTY_SET = re.compile(r"^(?:\\emptyset|\\varnothing|\\\{\s*\\\}|\{\s*\})$")
_DECIMAL = re.compile(r"^[-+]?(\d*)\.(\d+)$")
_TIME = re.compile(r"^([01]?\d|2[0-3]):([0-5]\d)$")
_COMMA_DECIMAL = re.compile(r"^([-+]?\d+),(\d+)$")
_BASE = re.compile(r"(?<![a-zA-Z\\_{])\d+\s*_\s*\{?\s*(\d+)\s*\}?")
# A choice letter with its text after it: "C. x = 42", "(C) 12", "C) 12", "C: 12".
_CHOICE_WITH_TEXT = re.compile(r"^(?:\(\s*([A-E])\s*\)\s*|([A-E])\s*[.:)]\s+)(\S.*)$")
_OTHER_CHOICE = re.compile(r"(?:^|\s)\(?[A-E][.:)]\s|\([A-E]\)")
_OPENERS = "([{"
_CLOSERS = ")]}"
MAX_NESTING = 6


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


def is_label(text: str) -> bool:
    """Return True when ``text`` names what an answer is (``x``, ``(p,q)``, ``\\frac{AB}{CD}``), not a value."""
    text = text.strip()
    if not text or len(text) > 40:
        return False
    if _LABEL.match(text):
        return True
    # A name made of letters only: AB, \frac{AB}{CD}, V_1:V_2 (no digits outside subscripts, no + - ^).
    letters = sum(char.isalpha() for char in text.replace("\\frac", "").replace("\\cdot", ""))
    return _LETTER_NAME.match(text) is not None and letters >= 2


def _element(text: str, depth: int) -> list[tuple]:
    """Return the values one list element stands for: ``x=3`` → [3]; ``1\\pm 2`` → [3, -1]."""
    parts = split_top_level(text, ("=",))
    if len(parts) > 1:
        if not is_label(parts[0]):
            raise ParseError("equation inside a list")
        text = parts[-1]
    for sign in ("\\pm", "\\mp"):
        if sign in text:
            plus, minus = text.replace(sign, "+", 1), text.replace(sign, "-", 1)
            if sign == "\\mp":
                plus, minus = minus, plus
            return _element(plus, depth) + _element(minus, depth)
    if _is_structure(text):
        return [_structure(text, depth + 1)]
    return [("expr", parse_expression(text))]


def _is_structure(text: str) -> bool:
    """Return True when a list element is itself a tuple, interval, set or matrix (not an expression)."""
    if text.startswith("\\{") or text.startswith("\\begin"):
        return True
    if text[:1] in "([" and _matching_close(text) == len(text) - 1:
        inner = text[1:-1]
        return len(split_top_level(inner, (",",))) > 1 or len(split_top_level(inner, (";",))) > 1
    return False


def _elements(parts: list[str], depth: int) -> tuple:
    if len(parts) > MAX_ITEMS:
        raise Refused("too many elements")
    values: list[tuple] = []
    for part in parts:
        if not part:
            raise ParseError("an empty element")
        values.extend(_element(part, depth))
    return tuple(values)


_NAME = re.compile(r"^\s*([a-zA-Z](?:_\{?\w+\}?)?|\\[a-zA-Z]+)\s*$")


def _assignment(parts: list[str]) -> tuple | None:
    """Return ``(names, trees)`` sorted by name for ``x = 2, y = 3`` (distinct names), else None.

    Such an answer is the tuple of its values in the order of the names, so it equals
    ``(2, 3)``; one name given several values (``x=3, x=5``) is a list of solutions instead.
    """
    pairs = []
    for part in parts:
        sides = split_top_level(part, ("=",))
        name = _NAME.match(sides[0]) if len(sides) == 2 else None
        if name is None or "\\pm" in sides[1] or "\\mp" in sides[1]:
            return None
        pairs.append((name.group(1), sides[1]))
    names = [name for name, _ in pairs]
    if len(set(names)) != len(names) or len(names) > MAX_ITEMS:
        return None
    pairs.sort()
    try:
        return tuple(names_ for names_, _ in pairs), tuple(parse_expression(value) for _, value in pairs)
    except (ParseError, RecursionError, ValueError, ZeroDivisionError):
        return None


def _trees(values: tuple) -> tuple:
    """Return the trees of ``values`` (matrix cells hold plain expressions only)."""
    if any(kind != "expr" for kind, _ in values):
        raise ParseError("a nested structure where an expression belongs")
    return tuple(tree for _, tree in values)


def _relation(text: str) -> tuple[str, tuple]:
    """Return ``("relation", (variable, intervals))`` for ``x<1 or x>3``, ``0<x\\le 2``, ``x \\ne 0``."""
    variable, intervals = None, []
    for piece in split_top_level(text, _OR_SEPARATORS + ("\\cup",)):
        piece_set = None
        for link in split_top_level(piece, (" and ", "\\land", "\\wedge")):
            name, link_set = relations.relation_set(link)
            if variable not in (None, name):
                raise ParseError("a relation in two variables")
            variable = name
            link_set = relations.canonical(link_set)
            piece_set = link_set if piece_set is None else relations.intersect(piece_set, link_set)
        intervals.extend(piece_set)
    return "relation", (variable, relations.canonical(tuple(intervals)))


def _without_points(whole: str, points: str, depth: int) -> tuple[str, tuple]:
    """Return ``("reals", intervals)`` of ``\\mathbb{R} \\setminus \\{-1\\}``: a set of reals less finitely many points."""
    kind, value = _structure(whole, depth + 1)
    reals = _as_real_set(kind, value)
    point_kind, point_values = _structure(points, depth + 1)
    if reals is None or point_kind != "set" or any(item[0] != "expr" for item in point_values):
        raise ParseError("a difference that is not reals less points")
    intervals = list(reals)
    for _, point in point_values:
        where = relations.end_value(point)
        split = []
        for low, low_closed, high, high_closed in intervals:
            if relations.end_value(low) <= where <= relations.end_value(high):
                split += [(low, low_closed, point, False), (point, False, high, high_closed)]
            else:
                split.append((low, low_closed, high, high_closed))
        intervals = split
    return "reals", relations.canonical(tuple(intervals))


def _list_items(text: str) -> list[str]:
    """Return the items of one alternative of an "or" answer: ``21, 16`` → two, ``(1, 2)`` → one."""
    if _is_structure(text) or text[:1] == "{":
        return [text]
    return split_top_level(text, (",",))


def _assignment_groups(text: str) -> tuple | None:
    """Return the solutions of ``p=5, q=2; p=7, q=2`` as tuples in name order, else None.

    Groups are separated by ``;``, "and" or "or"; each must assign the same two or more names
    (a solution of a system), so ``(5, 2), (7, 2)`` is the same answer.
    """
    groups = split_top_level(text, (";",) + _OR_SEPARATORS + (" and ",))
    if len(groups) < 2 or len(groups) > MAX_ITEMS:
        return None
    solutions, names = [], None
    for group in groups:
        parts = split_top_level(group, (",",))
        assignment = _assignment(parts) if len(parts) > 1 else None
        if assignment is None or (names is not None and assignment[0] != names):
            return None
        names = assignment[0]
        solutions.append(("seq", ("(", ")", tuple(("expr", tree) for tree in assignment[1]))))
    return tuple(solutions)


def exact_side(text: str) -> str:
    """Return the part of ``a \\approx b`` that counts: the exact side, on either side of the ``\\approx``.

    ``x = \\frac13 \\approx 0.33`` gives ``x = \\frac13``; ``x \\approx 11`` gives ``x = 11``;
    ``x \\approx 1.41`` gives ``x = 1.41`` (only a decimal was written: it is graded as one).
    """
    parts = split_top_level(text, ("\\approx",))
    if len(parts) == 1:
        return text
    label = None
    if not parts[0]:
        parts = parts[1:]
    elif is_label(parts[0]) and parts[0] not in ("\\pi", "e", "\\infty"):
        label, parts = parts[0], parts[1:]
    parts = [part for part in parts if part] or [""]
    decimal = [_DECIMAL.match(split_top_level(part, ("=",))[-1].strip()) is not None for part in parts]
    chosen = next((part for part, is_decimal in zip(parts, decimal) if not is_decimal), parts[0])
    return f"{label} = {chosen}" if label else chosen


def _structure(text: str, depth: int = 0) -> tuple[str, object]:
    """Return ``(kind, value)`` of a normalised answer; raise ParseError when it has none."""
    if depth > MAX_NESTING:
        raise Refused("nested too deeply")
    text = text.strip()
    if _EMPTY_SET.match(text):
        return "set", ()
    bracketed = _BRACKETED_MATRIX.match(text)
    if bracketed is not None:
        text = bracketed.group(1)
    matrix = _MATRIX.match(text)
    if matrix is not None:
        rows = [row for row in matrix.group(2).split("\\\\") if row.strip()]
        if len(rows) > MAX_ITEMS:
            raise Refused("matrix too large")
        return "matrix", tuple(_trees(_elements([cell.strip() for cell in row.split("&")], depth)) for row in rows)
    if text.startswith("\\{") and text.endswith("\\}"):
        builder = split_top_level(text[2:-2], ("\\mid", "|", ":"))
        if len(builder) == 2 and relations.has_relation(builder[1]):
            return _relation(builder[1])  # set-builder notation: \{x \mid x > 2\}
    if relations.has_relation(text):
        return _relation(text)
    removed = split_top_level(text, ("\\setminus", "\\backslash"))
    if len(removed) == 2:
        return _without_points(removed[0], removed[1], depth)
    unions = split_top_level(text, ("\\cup", "\\sqcup"))
    if len(unions) > 1:
        parts = [_structure(part, depth + 1) for part in unions]
        if all(kind == "set" for kind, _ in parts):
            # \{1, 2\} \cup \{3\}: one finite set (repeated elements counted once).
            merged: list[tuple] = []
            for _, items in parts:
                merged.extend(item for item in items if item not in merged)
            return "set", tuple(merged)
        if all(kind == "seq" and len(value[2]) == 2 for kind, value in parts):
            return "union", tuple(value for _, value in parts)
        # \{-1\} \cup [0, 7): points and intervals, one set of reals (a point is [a, a]).
        intervals = []
        for kind, value in parts:
            if kind == "set" and all(item[0] == "expr" for item in value):
                intervals.extend(relations.interval(item[1], True, item[1], True) for item in value)
            elif kind == "seq" and len(value[2]) == 2:
                intervals.append(_seq_interval(value))
            else:
                raise ParseError("a union of something other than intervals and points")
        return "reals", relations.canonical(tuple(intervals))
    if text.startswith("\\{") and text.endswith("\\}") and _matching_close(text[1:]) == len(text) - 2:
        inner = text[2:-2]
        return "set", _elements(split_top_level(inner, (",", ";")) if inner.strip() else [], depth)
    solutions = _assignment_groups(text)
    if solutions is not None:
        return "set", solutions
    alternatives = split_top_level(_EITHER.sub("", text), _OR_SEPARATORS)
    if len(alternatives) > 1:
        # "3 or 5": several answers, graded as the set of them (so never as one of them);
        # "21, 16 or 11" lists three.
        flat = [item for alternative in alternatives for item in _list_items(alternative)]
        return "set", _elements(flat, depth)
    if text[:1] == "{" and _matching_close(text) == len(text) - 1:
        items = split_top_level(text[1:-1], (",", ";"))
        if len(items) > 1:
            return "group", _elements(items, depth)
    if text[:1] in "([" and _matching_close(text) == len(text) - 1:
        parts = split_top_level(text[1:-1], (",",))
        if len(parts) == 1:
            parts = split_top_level(text[1:-1], (";",))
        if len(parts) > 1:
            return "seq", (text[0], text[-1], _elements(parts, depth))
    parts = split_top_level(text, (",", ";", " and "))
    if len(parts) > 1:
        assignment = _assignment(parts)
        return ("assignment", assignment) if assignment is not None else ("set", _elements(parts, depth))
    sides = split_top_level(text, ("=",))
    if len(sides) > 2:
        # A chain a = b = c states its last side, the result of the working before it.
        return _structure(sides[-1], depth + 1)
    if len(sides) > 1 and not is_label(sides[0]):
        return "eq", (parse_expression(sides[0]), parse_expression(sides[1]))
    if len(sides) > 1 and "\\pm" not in sides[-1] and "\\mp" not in sides[-1]:
        return _structure(sides[-1], depth + 1)
    time = _TIME.match(text)
    if time is not None and (time.group(2)[0] == "0" or math.gcd(int(time.group(1)), int(time.group(2))) != 1):
        # 10:30 and 3:00 are times of day (a ratio is written in lowest terms, and never as 3:00):
        # 10:30 is not 5:15, 3:00 is not 5:00. 11:21 stays a ratio.
        return "time", (int(time.group(1)), int(time.group(2)))
    ratio = split_top_level(text, (":",))
    if len(ratio) > 1:
        if len(ratio) > MAX_ITEMS:
            raise Refused("too many ratio terms")
        return "ratio", tuple(parse_expression(part) for part in ratio)
    values = _element(text, depth)
    return values[0] if len(values) == 1 else ("set", tuple(values))


def _labelled_equation(text: str) -> tuple | None:
    """Return ``(lhs, rhs)`` trees of a labelled answer ``y = 2x + 1``, or None."""
    sides = split_top_level(text, ("=",))
    if len(sides) != 2 or not is_label(sides[0]) or "," in sides[0] or ":" in sides[0]:
        return None
    try:
        return parse_expression(sides[0]), parse_expression(sides[1])
    except (ParseError, RecursionError, ValueError, ZeroDivisionError):
        return None


def _decimals(text: str) -> int | None:
    """Return the decimal places of an answer that is one decimal literal (``x = 0.33`` → 2), else None."""
    match = _DECIMAL.match(split_top_level(text, ("=",))[-1].strip())
    return None if match is None else len(match.group(2))


def parse_answer(raw: str) -> Answer:
    """Return the parsed ``Answer`` of a raw answer string (never raises)."""
    normalized = normalize_answer(raw)
    if normalized is None:
        return Answer("refused", None, False, "")
    text, percent = normalized
    text = exact_side(text)
    folded = normalize_text(text)
    if not text:
        return Answer("empty", None, percent, "")
    choice, valued = None, text
    with_text = _CHOICE_WITH_TEXT.match(text)
    if with_text is not None and not _OTHER_CHOICE.search(with_text.group(3)):
        choice, valued = with_text.group(1) or with_text.group(2), with_text.group(3)
    bases = frozenset(_BASE.findall(valued))
    try:
        kind, value = _structure(valued)
    except Refused:
        return Answer("refused", None, percent, folded, text)
    except (ParseError, RecursionError, ValueError, ZeroDivisionError, OverflowError):
        return Answer("text", folded, percent, folded, text, choice=choice)
    return Answer(kind, value, percent, folded, text, _labelled_equation(valued), _decimals(valued),
                  _comma_decimal(valued), bases, choice)


def _comma_decimal(text: str) -> tuple | None:
    """Return the tree of ``2,74`` read with a decimal comma (one comma, no space, not thousands), else None."""
    match = _COMMA_DECIMAL.match(text)
    if match is None:
        return None
    try:
        return parse_expression(f"{match.group(1)}.{match.group(2)}")
    except ParseError:
        return None


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
    if commutative_form(left) == commutative_form(right):
        return True  # the same terms and factors in another order: no sympy needed
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


def commutative_form(tree: tuple) -> tuple:
    """Return ``tree`` with nested sums and products flattened and their terms in a fixed order.

    Two trees with equal forms are equal by commutativity and associativity alone
    (``2\\sqrt{33} + 15`` and ``15 + 2\\sqrt{33}``); different forms prove nothing.
    """
    kind = tree[0]
    if kind in ("add", "mul"):
        children = []
        for child in tree[1]:
            child = commutative_form(child)
            children.extend(child[1] if child[0] == kind else (child,))
        return kind, tuple(sorted(children, key=repr))
    if kind in ("neg", "fact"):
        return kind, commutative_form(tree[1])
    if kind in ("div", "pow", "root", "binom"):
        return kind, commutative_form(tree[1]), commutative_form(tree[2])
    if kind == "func":
        return kind, tree[1], commutative_form(tree[2])
    return tree


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


def _items_equal(left: tuple, right: tuple, exact_equal: ExactEqual) -> bool:
    return len(left) == len(right) and all(trees_equal(a, b, exact_equal) for a, b in zip(left, right))


def _seq_equal(left: tuple, right: tuple, exact_equal: ExactEqual) -> bool:
    return (
        left[0] == right[0] and left[1] == right[1] and len(left[2]) == len(right[2])
        and all(values_equal(a, b, exact_equal) for a, b in zip(left[2], right[2]))
    )


def _as_real_set(kind: str, value: object) -> tuple | None:
    """Return the canonical interval set of an interval, a union of intervals or a relation, else None."""
    try:
        if kind == "relation":
            return value[1]
        if kind == "reals":
            return value
        if kind == "seq" and len(value[2]) == 2 and all(item[0] == "expr" for item in value[2]):
            return relations.canonical((_seq_interval(value),))
        if kind == "union":
            return relations.canonical(tuple(_seq_interval(item) for item in value))
    except (ParseError, ValueError):
        return None
    return None


def _seq_interval(seq: tuple) -> tuple:
    """Return the interval of ``(a, b]``-style seq ``seq``; raise ParseError when it is no interval."""
    opening, closing, items = seq
    if len(items) != 2 or items[0][0] != "expr" or items[1][0] != "expr":
        raise ParseError("not an interval")
    low, high = items[0][1], items[1][1]
    if relations.end_value(low) >= relations.end_value(high):
        raise ParseError("an interval whose ends are out of order")
    return relations.interval(low, opening == "[", high, closing == "]")


def _ratio_equal(left: tuple, right: tuple, exact_equal: ExactEqual) -> bool:
    """Return True when two ratios ``a:b:c`` are proportional (cross products equal).

    Cross products against a zero term prove nothing (``3:0`` and ``5:0`` have equal cross
    products), so a ratio with a zero term equals only one with the same terms.
    """
    if len(left) != len(right):
        return False
    zero = ("num", Fraction(0))
    if any(trees_equal(term, zero, exact_equal) for term in left + right):
        return _items_equal(left, right, exact_equal)
    return all(
        trees_equal(("mul", (left[index], right[0])), ("mul", (right[index], left[0])), exact_equal)
        for index in range(1, len(left))
    )


def _difference(equation: tuple) -> tuple:
    return ("add", (equation[0], ("neg", equation[1])))


def equations_equal(left: tuple, right: tuple, exact_equal: ExactEqual) -> bool:
    """Return True when two equations ``(lhs, rhs)`` are the same up to rearrangement and a non-zero factor.

    ``2x + 4y - 3 = 0`` equals ``y = -x/2 + 3/4``: the differences ``lhs - rhs`` are
    proportional. The factor is read off sample points and must be a rational number; the
    final check is exact.
    """
    first, second = _difference(left), _difference(right)
    if trees_equal(first, second, exact_equal) or trees_equal(first, ("neg", second), exact_equal):
        return True
    names = sorted((symbols_of(first) | symbols_of(second)) - {"i", "e"})
    if not names:
        return False
    try:
        check_exponents(first)
        check_exponents(second)
        ratios = [a / b for a, b in zip(sample_values(first, names), sample_values(second, names))]
    except (ArithmeticError, ValueError, KeyError, TypeError, Refused, ParseError):
        return False
    factor = ratios[0]
    if abs(factor.imag) > 1e-12 or abs(factor) < 1e-12 or abs(factor) > 1e12:
        return False
    if any(abs(ratio - factor) > 1e-9 * abs(factor) for ratio in ratios):
        return False
    scale = Fraction(factor.real).limit_denominator(10_000)
    if scale == 0 or abs(float(scale) - factor.real) > 1e-9 * abs(factor.real):
        return False
    return trees_equal(first, ("mul", (("num", scale), second)), exact_equal)


FLOAT_PRECISION_DIGITS = 12
"""A decimal with at least this many significant digits is a value written to float precision."""


def _decimal_digits(decimal_text: str) -> int:
    """Return the significant digits written in a decimal literal (``0.0830`` → 3, ``4.10`` → 3)."""
    digits = decimal_text.lstrip("+-").replace(".", "").lstrip("0")
    return len(digits)


def _exact_number(tree: tuple) -> Fraction | float | None:
    """Return the value of a constant tree: a Fraction when rational, a float when real, else None."""
    if symbols_of(tree) - {"e"}:
        return None
    try:
        return rational_value(tree)
    except NotRational:
        pass
    except (ParseError, Refused, ZeroDivisionError, OverflowError):
        return None
    try:
        check_exponents(tree)
        value = numeric_value(tree, {})
    except (ArithmeticError, ValueError, KeyError, TypeError, Refused, ParseError):
        return None
    if abs(value.imag) > 1e-12 or not abs(value.real) < 1e300:
        return None
    return value.real


def _float_precision_equal(exact: tuple, decimal: tuple) -> bool:
    """Return True when a decimal written to float precision agrees with ``exact`` to 12 significant digits.

    ``0.0833333333333333`` (the float of 1/12) and ``0.6666666666666666`` equal ``\\frac1{12}``
    and ``\\frac23``; the agreement is within half a unit of the twelfth significant digit.
    """
    value = _exact_number(exact)
    written = _exact_number(decimal)
    if value is None or written is None or value == 0:
        return False
    exponent = math.floor(math.log10(abs(float(value))))
    tolerance = Fraction(1, 2) * Fraction(10) ** (exponent - FLOAT_PRECISION_DIGITS + 1)
    if isinstance(value, Fraction):
        return abs(value - written) <= tolerance
    return abs(value - float(written)) <= float(tolerance)


def _round_half_away(value: Fraction, places: int) -> Fraction:
    """Return ``value`` rounded to ``places`` decimals, a tie rounding away from zero (0.125 → 0.13)."""
    scaled = abs(value) * 10**places
    rounded = Fraction(math.floor(scaled + Fraction(1, 2)), 10**places)
    return rounded if value >= 0 else -rounded


def _rounds_to(exact: tuple, decimal: tuple, places: int, digits: int) -> bool:
    """Return True when the exact value ``exact`` rounds to the reference decimal ``decimal`` at its ``places``.

    ``\\frac{1}{3}`` rounds to 0.33 and to 0.333, ``\\pi`` to 3.14; never 0.34. A tie rounds
    away from zero: ``\\frac18`` is 0.13, not 0.12. The decimal must carry at least two
    significant digits (``digits``), and the exact side must be a constant. A decimal written
    to float precision (12 or more significant digits) is compared to that precision instead.
    """
    if digits >= FLOAT_PRECISION_DIGITS:
        return _float_precision_equal(exact, decimal)
    if digits < 2:
        return False
    value, written = _exact_number(exact), _exact_number(decimal)
    if value is None or not isinstance(written, Fraction):
        return False
    if isinstance(value, Fraction):
        return _round_half_away(value, places) == written
    if abs(value) > 1e6:
        return False
    half_step = Fraction(1, 2 * 10**places)
    # Strictly inside the rounding interval, with room for floating-point error at its edges
    # (an irrational value is never exactly on a tie).
    return abs(value - float(written)) < float(half_step) * (1 - 1e-6)


def _assignment_equal(left: tuple, right: tuple, exact_equal: ExactEqual) -> bool:
    """Return True when ``x=2, y=3`` equals the other side: the same names and values, the tuple
    ``(2, 3)`` of its values in name order, or the set of its values."""
    assignment, other = (left[1], right) if left[0] == "assignment" else (right[1], left)
    names, trees = assignment
    kind, value = other
    if kind == "assignment":
        return value[0] == names and _items_equal(trees, value[1], exact_equal)
    if kind == "seq" and value[0] == "(":
        return len(value[2]) == len(trees) and all(
            values_equal(("expr", tree), item, exact_equal) for tree, item in zip(trees, value[2])
        )
    if kind == "set":
        return _unordered_equal(tuple(("expr", tree) for tree in trees), value, lambda a, b: values_equal(a, b, exact_equal))
    return False


def values_equal(left: tuple, right: tuple, exact_equal: ExactEqual = defer_to_symbolic) -> bool:
    """Return True when two ``(kind, value)`` structures are equal (elements of tuples and sets)."""
    (left_kind, left_value), (right_kind, right_value) = left, right
    if left_kind == "group":
        left_kind = "seq" if right_kind == "seq" and right_value[:2] == ("(", ")") else "set"
        left_value = ("(", ")", left_value) if left_kind == "seq" else left_value
    if right_kind == "group":
        right_kind = "seq" if left_kind == "seq" and left_value[:2] == ("(", ")") else "set"
        right_value = ("(", ")", right_value) if right_kind == "seq" else right_value
    kinds = {left_kind, right_kind}
    if "time" in kinds:
        return left_kind == right_kind and left_value == right_value
    if kinds == {"expr"}:
        return trees_equal(left_value, right_value, exact_equal)
    if kinds == {"eq"}:
        return equations_equal(left_value, right_value, exact_equal)
    if kinds == {"set"}:
        return _unordered_equal(left_value, right_value, lambda a, b: values_equal(a, b, exact_equal))
    if kinds == {"ratio"}:
        return _ratio_equal(left_value, right_value, exact_equal)
    if kinds == {"ratio", "expr"}:
        ratio = left_value if left_kind == "ratio" else right_value
        single = right_value if left_kind == "ratio" else left_value
        return len(ratio) == 2 and trees_equal(("div", ratio[0], ratio[1]), single, exact_equal)
    if kinds == {"matrix"}:
        return len(left_value) == len(right_value) and all(
            _items_equal(a, b, exact_equal) for a, b in zip(left_value, right_value)
        )
    if kinds == {"matrix", "seq"}:
        matrix = left_value if left_kind == "matrix" else right_value
        seq = left_value if left_kind == "seq" else right_value
        # A column or row vector equals the tuple of its entries.
        entries = tuple(row[0] for row in matrix) if all(len(row) == 1 for row in matrix) else (
            matrix[0] if len(matrix) == 1 else None
        )
        return (
            entries is not None and seq[0] == "(" and len(entries) == len(seq[2])
            and all(values_equal(("expr", a), b, exact_equal) for a, b in zip(entries, seq[2]))
        )
    if "assignment" in kinds:
        return _assignment_equal(left, right, exact_equal)
    if kinds == {"seq"} and _seq_equal(left_value, right_value, exact_equal):
        return True
    if kinds == {"union"} and _unordered_equal(left_value, right_value, lambda a, b: _seq_equal(a, b, exact_equal)):
        return True
    if kinds <= {"seq", "union", "relation", "reals"}:
        if kinds == {"relation"} and left_value[0] != right_value[0]:
            return False  # x < 5 and y < 5 name different unknowns
        left_set, right_set = _as_real_set(left_kind, left_value), _as_real_set(right_kind, right_value)
        if left_set is None or right_set is None or (kinds == {"seq"}):
            return False
        return relations.sets_equal(left_set, right_set, lambda a, b: trees_equal(a, b, exact_equal))
    return False


def _decimal_digits_of(answer: Answer) -> int:
    """Return the significant digits of an answer that is one decimal literal (``x = 0.0830`` → 3)."""
    digits = split_top_level(answer.normalized, ("=",))[-1].strip().lstrip("+-").replace(".", "")
    return len(digits.lstrip("0"))


def _expressions_match(given: Answer, truth: Answer, exact_equal: ExactEqual) -> bool:
    """Return True when two single expressions match: exactly, through a percent sign, or by rounding.

    Rounding runs one way. A decimal reference (the dataset rounded) equals an exact answer
    that rounds to it at the reference's places. A decimal answer equals an exact reference
    only when written to float precision (12 significant digits agreeing): a short rounding
    (``0.33`` for ``\\frac13``) is a different, easier answer, not the same one.
    """
    given_readings = _scaled(given.value, given.percent and not truth.percent)
    truth_readings = _scaled(truth.value, truth.percent and not given.percent)
    for left in given_readings:
        for right in truth_readings:
            if trees_equal(left, right, exact_equal):
                return True
    if (given.decimals is None) == (truth.decimals is None):
        return False  # two decimals are never rounded to each other; two exact values must be equal
    if truth.decimals is not None:
        digits = _decimal_digits_of(truth)
        places = [truth.decimals, truth.decimals + 2] if len(truth_readings) == 2 else [truth.decimals]
        return any(
            _rounds_to(left, right, place, digits)
            for left in given_readings for right, place in zip(truth_readings, places)
        )
    if _decimal_digits_of(given) < FLOAT_PRECISION_DIGITS:
        return False
    return any(_float_precision_equal(right, left) for left in given_readings for right in truth_readings)


def _as_comma_decimal(answer: Answer) -> Answer:
    """Return ``answer`` (a lone ``2,74``) read with a decimal comma, as the number 2.74."""
    places = len(answer.normalized.split(",")[1])
    return replace(answer, kind="expr", value=answer.comma_decimal, decimals=places,
                   normalized=answer.normalized.replace(",", "."))


def _resolve_group(answer: Answer, other: Answer) -> Answer:
    """Return a plain-braces answer ``{1, 3}`` read by the other side's kind: a tuple against a tuple, else a list."""
    if answer.kind != "group":
        return answer
    if other.kind == "seq" and other.value[:2] == ("(", ")"):
        return replace(answer, kind="seq", value=("(", ")", answer.value))
    return replace(answer, kind="set")


def answers_match(given: Answer, truth: Answer, exact_equal: ExactEqual = defer_to_symbolic) -> bool:
    """Return True when the ``given`` answer is equivalent to the reference ``truth``.

    Raises NeedsSymbolic when only an exact symbolic check can decide and ``exact_equal`` is
    the default.
    """
    if given.kind in ("refused", "empty") or truth.kind in ("refused", "empty"):
        return False
    if given.text and given.text == truth.text and given.percent == truth.percent:
        return True
    choice = _CHOICE.match(truth.normalized)
    if choice is not None:
        # A multiple-choice reference: (B), B, \\text{(B)} and "B. x = 42" all name the same letter.
        given_choice = _GIVEN_CHOICE.match(given.normalized)
        letter = given.choice or (None if given_choice is None else (given_choice.group(1) or given_choice.group(2)))
        return letter is not None and letter.upper() == choice.group(1)
    if truth.choice is not None and _CHOICE.match(given.normalized):
        return _CHOICE.match(given.normalized).group(1) == truth.choice
    if given.bases and truth.bases and given.bases != truth.bases:
        return False  # 1011_{10} and 1011_2 are different numbers
    # "2,74" against one number can only mean 2.74 (a list never equals a single value).
    if given.comma_decimal is not None and truth.kind == "expr" and truth.comma_decimal is None:
        given = _as_comma_decimal(given)
    elif truth.comma_decimal is not None and given.kind == "expr" and given.comma_decimal is None:
        truth = _as_comma_decimal(truth)
    if given.kind == "time" and truth.kind != "time":
        # Only a time of day in the reference makes h:mm a time: against a ratio, 22:42 is 11:21.
        given = replace(given, kind="ratio", value=tuple(("num", Fraction(part)) for part in given.value))
    if given.kind == "group" or truth.kind == "group":
        given, truth = _resolve_group(given, truth), _resolve_group(truth, given)
    kinds = {given.kind, truth.kind}
    if kinds == {"expr"} and _expressions_match(given, truth, exact_equal):
        return True
    if kinds == {"set", "expr"}:
        items = given.value if given.kind == "set" else truth.value
        single = truth.value if given.kind == "set" else given.value
        # Several answers never match one value: no credit for hedging.
        return len(items) == 1 and values_equal(items[0], ("expr", single), exact_equal)
    if kinds != {"expr"} and "text" not in kinds and values_equal((given.kind, given.value), (truth.kind, truth.value), exact_equal):
        return True
    # An equation against a labelled answer (y = 2x + 1 against 2x - y + 1 = 0), or two labelled ones.
    given_equation = given.value if given.kind == "eq" else given.equation
    truth_equation = truth.value if truth.kind == "eq" else truth.equation
    if given_equation is not None and truth_equation is not None and "eq" in kinds | {
        "eq" if given.equation is not None and truth.equation is not None else ""
    }:
        return equations_equal(given_equation, truth_equation, exact_equal)
    return False
