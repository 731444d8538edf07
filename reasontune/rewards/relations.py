"""Inequalities and intervals as sets of real numbers: ``x<5``, ``5 \\ge x``, ``0<y<1``, ``x \\ne 3``.

A set is a tuple of intervals ``(low, low_closed, high, high_closed)`` whose ends are
expression trees with a real constant value (or ±∞). ``relation_set`` reads a relation in one
variable; ``canonical`` sorts and merges intervals so that two ways of writing the same set
compare equal end by end (``(-\\infty, 1) \\cup [1, 2]`` is ``(-\\infty, 2]``). Ends are ordered
by their floating-point values and compared exactly (rationals, or the caller's exact check).
"""

from __future__ import annotations

import math
from typing import Callable

from reasontune.rewards.parse import ParseError, numeric_value, parse_expression, symbols_of

INFINITY = ("const", "inf")
NEGATIVE_INFINITY = ("neg", ("const", "inf"))
_RELATIONS = ("\\le", "\\ge", "\\ne", "<", ">")
_ORDER = {"<": (-1, False), "\\le": (-1, True), ">": (1, False), "\\ge": (1, True)}
MAX_INTERVALS = 32


def has_relation(text: str) -> bool:
    """Return True when ``text`` holds an order relation (``<``, ``>``, ``\\le``, ``\\ge``, ``\\ne``)."""
    return any(operator in text for operator in _RELATIONS)


def split_relation(text: str) -> list[str]:
    """Return ``[side, operator, side, operator, side…]`` for a chain like ``0 < x \\le 1``."""
    parts, start, index = [], 0, 0
    while index < len(text):
        for operator in _RELATIONS:
            if text.startswith(operator, index) and not (operator[0] == "\\" and text[index + len(operator): index + len(operator) + 1].isalpha()):
                parts += [text[start:index].strip(), operator]
                index += len(operator)
                start = index
                break
        else:
            index += 1
    parts.append(text[start:].strip())
    return parts


def end_value(tree: tuple) -> float:
    """Return the real value of an interval end (±inf for infinities); raise ParseError otherwise."""
    sign = 1
    node = tree
    while node[0] == "neg":
        sign, node = -sign, node[1]
    if node == INFINITY:
        return sign * math.inf
    if symbols_of(tree) - {"e"}:
        raise ParseError("an interval end with a variable")
    try:
        value = numeric_value(tree, {})
    except (ArithmeticError, ValueError, KeyError, TypeError) as error:
        raise ParseError("an interval end without a value") from error
    if abs(value.imag) > 1e-12 or not math.isfinite(value.real):
        raise ParseError("an interval end that is not real")
    return value.real


def interval(low: tuple, low_closed: bool, high: tuple, high_closed: bool) -> tuple:
    """Return an interval tuple; infinite ends are always open."""
    low_closed = low_closed and end_value(low) != -math.inf
    high_closed = high_closed and end_value(high) != math.inf
    return (low, low_closed, high, high_closed)


def relation_set(text: str, parse: Callable[[str], tuple] = parse_expression) -> tuple[str, tuple]:
    """Return ``(variable, intervals)`` of one relation chain such as ``-1 < x \\le 3`` or ``x \\ne 0``."""
    parts = split_relation(text)
    sides, operators = parts[0::2], parts[1::2]
    trees = [parse(side) for side in sides]
    variables = [index for index, tree in enumerate(trees) if tree[0] == "sym" and tree[1] not in ("e", "i")]
    if len(variables) != 1 or any(symbols_of(tree) - {"e"} for index, tree in enumerate(trees) if index not in variables):
        raise ParseError("a relation that is not one variable against constants")
    position = variables[0]
    variable = trees[position][1]
    if operators == ["\\ne"]:
        value = trees[1 - position]
        end_value(value)
        return variable, (interval(NEGATIVE_INFINITY, False, value, False), interval(value, False, INFINITY, False))
    if "\\ne" in operators or len(sides) > 3:
        raise ParseError("an unsupported relation chain")
    low, low_closed, high, high_closed = NEGATIVE_INFINITY, False, INFINITY, False
    for index, operator in enumerate(operators):
        direction, closed = _ORDER[operator]
        left, right = index, index + 1
        # Read every link as "variable above a bound" or "variable below a bound".
        if position == left:
            bound, below = trees[right], direction < 0
        elif position == right:
            bound, below = trees[left], direction > 0
        else:
            raise ParseError("a relation between two constants")
        if below:
            high, high_closed = bound, closed
        else:
            low, low_closed = bound, closed
    if len(operators) == 2 and _ORDER[operators[0]][0] != _ORDER[operators[1]][0]:
        raise ParseError("a chain that changes direction")
    return variable, (interval(low, low_closed, high, high_closed),)


def canonical(intervals: tuple) -> tuple:
    """Return ``intervals`` sorted, without empty ones, and with overlapping or touching ones merged."""
    if len(intervals) > MAX_INTERVALS:
        raise ParseError("too many intervals")
    keyed = []
    for low, low_closed, high, high_closed in intervals:
        low_value, high_value = end_value(low), end_value(high)
        if low_value > high_value or (low_value == high_value and not (low_closed and high_closed)):
            continue
        keyed.append([low_value, not low_closed, low, low_closed, high_value, high, high_closed])
    keyed.sort(key=lambda item: (item[0], item[1]))
    merged: list[list] = []
    for item in keyed:
        if merged:
            last = merged[-1]
            touching = item[0] < last[4] or (item[0] == last[4] and (last[6] or item[3]))
            if touching:
                if item[4] > last[4] or (item[4] == last[4] and item[6]):
                    last[4], last[5], last[6] = item[4], item[5], item[6] or (item[4] == last[4] and last[6])
                continue
        merged.append(item)
    return tuple((item[2], item[3], item[5], item[6]) for item in merged)


def intersect(first: tuple, second: tuple) -> tuple:
    """Return the intersection of two canonical interval sets."""
    result = []
    for a_low, a_low_closed, a_high, a_high_closed in first:
        for b_low, b_low_closed, b_high, b_high_closed in second:
            a_low_value, b_low_value = end_value(a_low), end_value(b_low)
            a_high_value, b_high_value = end_value(a_high), end_value(b_high)
            if a_low_value > b_low_value or (a_low_value == b_low_value and not a_low_closed):
                low = (a_low, a_low_closed)
            else:
                low = (b_low, b_low_closed)
            if a_high_value < b_high_value or (a_high_value == b_high_value and not a_high_closed):
                high = (a_high, a_high_closed)
            else:
                high = (b_high, b_high_closed)
            result.append((low[0], low[1], high[0], high[1]))
    return canonical(tuple(result))


def sets_equal(first: tuple, second: tuple, ends_equal: Callable[[tuple, tuple], bool]) -> bool:
    """Return True when two canonical interval sets are equal (ends compared with ``ends_equal``)."""
    if len(first) != len(second):
        return False
    for (a_low, a_low_closed, a_high, a_high_closed), (b_low, b_low_closed, b_high, b_high_closed) in zip(first, second):
        if a_low_closed != b_low_closed or a_high_closed != b_high_closed:
            return False
        if not (ends_equal(a_low, b_low) and ends_equal(a_high, b_high)):
            return False
    return True

