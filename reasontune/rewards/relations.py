"""Inequalities and intervals as sets of real numbers: ``x<5``, ``5 \\ge x``, ``0<y<1``, ``x \\ne 3``.

A set is a tuple of intervals ``(low, low_closed, high, high_closed)`` whose ends are
expression trees with a real constant value (or ±∞). ``relation_set`` reads a relation in one
variable; ``canonical`` sorts and merges intervals so that two ways of writing the same set
compare equal end by end (``(-\\infty, 1) \\cup [1, 2]`` is ``(-\\infty, 2]``). Ends are ordered
by their floating-point values and compared exactly (rationals, or the caller's exact check).
"""

from __future__ import annotations

import math
import re
from fractions import Fraction
from typing import Callable

from reasontune.rewards.parse import NotRational, ParseError, numeric_value, parse_expression, rational_value, symbols_of

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


def _affine(node: tuple, variable: str) -> tuple[Fraction, tuple] | None:
    """Return ``(a, b)`` with ``node = a·variable + b`` (``a`` rational, ``b`` a constant tree), or None.

    Read off the tree's structure (sums, negations, products and quotients by rational
    constants), never by sampling, so ``x(x-1)(x-2) + x`` is not mistaken for ``x``.
    """
    if variable not in symbols_of(node):
        return Fraction(0), node
    kind = node[0]
    if kind == "sym":
        return Fraction(1), ("num", Fraction(0))
    if kind == "neg":
        inner = _affine(node[1], variable)
        return None if inner is None else (-inner[0], ("neg", inner[1]))
    if kind == "add":
        parts = [_affine(term, variable) for term in node[1]]
        if any(part is None for part in parts):
            return None
        return sum((part[0] for part in parts), Fraction(0)), ("add", tuple(part[1] for part in parts))
    if kind == "mul":
        varying = [factor for factor in node[1] if variable in symbols_of(factor)]
        constants = [factor for factor in node[1] if variable not in symbols_of(factor)]
        inner = _affine(varying[0], variable) if len(varying) == 1 else None
        try:
            scale = math.prod((rational_value(factor) for factor in constants), start=Fraction(1))
        except (NotRational, ParseError):
            return None
        return None if inner is None else (scale * inner[0], ("mul", (("num", scale), inner[1])))
    if kind == "div" and variable not in symbols_of(node[2]):
        inner = _affine(node[1], variable)
        try:
            divisor = rational_value(node[2])
        except (NotRational, ParseError):
            return None
        if inner is None or divisor == 0:
            return None
        return inner[0] / divisor, ("div", inner[1], ("num", divisor))
    return None


_FLIPPED = {"<": ">", ">": "<", "\\le": "\\ge", "\\ge": "\\le", "\\ne": "\\ne"}


def _link_set(quantity: tuple, operator: str, bound: tuple, variable: str | None) -> tuple:
    """Return the set of values of ``variable`` where ``quantity operator bound`` holds (canonical intervals).

    ``quantity`` is the variable itself (``variable`` None: a named quantity such as ``f(x)``),
    an affine expression in it (``-2x + 4 < 0`` is ``x > 2``: dividing by a negative number
    flips the relation) or the absolute value of one (``|x - 2| \\ge 3`` is ``x \\le -1`` or
    ``x \\ge 5``).
    """
    end_value(bound)
    if quantity[0] == "func" and quantity[1] == "abs":
        negated = ("neg", bound)
        if operator == "\\ne":
            return intersect(_link_set(quantity[2], "\\ne", bound, variable), _link_set(quantity[2], "\\ne", negated, variable))
        if operator in ("<", "\\le"):  # -c < u < c
            return intersect(_link_set(quantity[2], operator, bound, variable),
                             _link_set(quantity[2], _FLIPPED[operator], negated, variable))
        # |u| > c: u > c or u < -c (every real when c < 0)
        return canonical(_link_set(quantity[2], operator, bound, variable)
                         + _link_set(quantity[2], _FLIPPED[operator], negated, variable))
    if variable is not None:
        affine = _affine(quantity, variable)
        if affine is None or affine[0] == 0:
            raise ParseError("a relation that is not affine in its variable")
        slope, offset = affine
        if slope != 1 or offset != ("num", Fraction(0)):
            bound = ("div", ("add", (bound, ("neg", offset))), ("num", slope))
            if slope < 0:
                operator = _FLIPPED[operator]
    if operator == "\\ne":
        return canonical((interval(NEGATIVE_INFINITY, False, bound, False), interval(bound, False, INFINITY, False)))
    direction, closed = _ORDER[operator]
    if direction < 0:
        return canonical((interval(NEGATIVE_INFINITY, False, bound, closed),))
    return canonical((interval(bound, closed, INFINITY, False),))


def relation_set(text: str, parse: Callable[[str], tuple] = parse_expression) -> tuple[str, tuple]:
    """Return ``(variable, intervals)`` of one relation chain such as ``-1 < x \\le 3``, ``x \\ne 0``, ``|x| < 1``.

    Exactly one side of the chain varies: one variable (bare, in an affine expression such as
    ``-x > -1``, or inside an absolute value), or a function's value such as ``f(x)`` (``0 < f(x) < 1``
    is the interval ``(0, 1)``, named ``f(x)``). The other
    sides are real constants. A chain is the intersection of its links, so it may not change
    direction (``1 < x > 0``).
    """
    parts = split_relation(text)
    sides, operators = parts[0::2], parts[1::2]
    if len(sides) > 3 or len(operators) == 0:
        raise ParseError("an unsupported relation chain")
    trees = [parse(side) for side in sides]
    varying = [index for index, tree in enumerate(trees) if symbols_of(tree) - {"e"}]
    if len(varying) != 1:
        raise ParseError("a relation that is not one varying side against constants")
    position = varying[0]
    free = sorted(symbols_of(trees[position]) - {"e", "i"})
    if len(free) == 1 and "i" not in symbols_of(trees[position]) and not _is_function_of(sides[position]):
        variable, name = free[0], free[0]
    elif _is_function_of(sides[position]):
        variable, name = None, "".join(sides[position].split())
    else:
        raise ParseError("a relation in several variables")
    quantity = trees[position] if variable is not None else ("sym", name)
    directions = {_ORDER[operator][0] for operator in operators if operator != "\\ne"}
    if len(directions) > 1 or (len(operators) > 1 and "\\ne" in operators):
        raise ParseError("a chain that changes direction")
    result = None
    for index, operator in enumerate(operators):
        if index == position:  # quantity operator bound
            link = _link_set(quantity, operator, trees[index + 1], variable)
        elif index + 1 == position:  # bound operator quantity
            link = _link_set(quantity, _FLIPPED[operator], trees[index], variable)
        else:
            raise ParseError("a relation between two constants")
        result = link if result is None else intersect(result, link)
    return name, result


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


_FUNCTION_OF = re.compile(r"^\s*[a-zA-Z](?:_\{?\w+\}?)?\s*\(\s*[a-zA-Z]\s*\)\s*$")


def _is_function_of(side: str) -> bool:
    """Return True for a side that names a function's value (``f(x)``, ``g_1(t)``), not a product like ``x(x+1)``."""
    return _FUNCTION_OF.match(side) is not None
