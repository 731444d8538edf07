"""Exact symbolic equality with sympy, run only inside a bounded worker process.

Trees from ``reasontune.rewards.parse`` are turned into sympy objects node by node (sympy's
own string parsers are never used). Numeric powers and factorials go through the same size
checks as the exact rational path, so no tower of exponents reaches sympy's integers.
"""

from __future__ import annotations

from fractions import Fraction

import sympy

from reasontune.rewards.equivalence import Answer, answers_match
from reasontune.rewards.parse import MAX_FACTORIAL, NotRational, Refused, rational_value

MAX_SYMBOLIC_EXPONENT = 200
"""Integer exponents above this on a symbolic base are refused (expansion would be huge)."""

_FUNCTIONS = {
    "sin": sympy.sin, "cos": sympy.cos, "tan": sympy.tan, "sec": sympy.sec, "csc": sympy.csc,
    "cot": sympy.cot, "arcsin": sympy.asin, "arccos": sympy.acos, "arctan": sympy.atan,
    "sinh": sympy.sinh, "cosh": sympy.cosh, "tanh": sympy.tanh, "ln": sympy.log,
    "log": sympy.log, "exp": sympy.exp, "abs": sympy.Abs,
}


def _rational(value: Fraction) -> sympy.Rational:
    return sympy.Rational(value.numerator, value.denominator)


def to_sympy(node: tuple) -> sympy.Expr:
    """Return the sympy expression of a parse tree, refusing results too large to build or undefined.

    A part that is undefined (``\\frac{1}{0}``, ``\\ln 0``) is refused where it appears, before
    sympy can absorb it (``\\log_0 5`` would otherwise simplify to 0).
    """
    value = _to_sympy(node)
    if value.has(sympy.zoo, sympy.nan):
        raise Refused("an undefined value")
    return value


def _to_sympy(node: tuple) -> sympy.Expr:
    try:
        return _rational(rational_value(node))
    except NotRational:
        pass
    kind = node[0]
    if kind == "sym":
        if node[1] == "i":
            return sympy.I
        if node[1] == "e":
            return sympy.E
        return sympy.Symbol(node[1])
    if kind == "const":
        return sympy.pi if node[1] == "pi" else sympy.oo
    if kind == "neg":
        return -to_sympy(node[1])
    if kind == "add":
        return sympy.Add(*[to_sympy(term) for term in node[1]])
    if kind == "mul":
        return sympy.Mul(*[to_sympy(factor) for factor in node[1]])
    if kind == "div":
        return to_sympy(node[1]) / to_sympy(node[2])
    if kind == "pow":
        base, exponent = to_sympy(node[1]), to_sympy(node[2])
        if exponent.is_Number and abs(exponent) > MAX_SYMBOLIC_EXPONENT:
            raise Refused("exponent too large")
        if base.is_Number and exponent.is_Number and abs(base) > 10**6 and abs(exponent) > 1:
            raise Refused("power too large")
        return sympy.Pow(base, exponent)
    if kind == "root":
        radicand, index = to_sympy(node[1]), to_sympy(node[2])
        if index.is_Integer and index % 2 == 1 and radicand.is_number:
            return sympy.real_root(radicand, index)
        return sympy.Pow(radicand, 1 / index)
    if kind == "fact":
        argument = to_sympy(node[1])
        if argument.is_Number and argument > MAX_FACTORIAL:
            raise Refused("factorial too large")
        return sympy.factorial(argument)
    if kind == "binom":
        return sympy.binomial(to_sympy(node[1]), to_sympy(node[2]))
    if kind == "func":
        return _FUNCTIONS[node[1]](to_sympy(node[2]))
    raise Refused(f"unknown node {kind}")


def sympy_equal(left: tuple, right: tuple) -> bool:
    """Return True when sympy proves the two trees equal (simplification of the difference is 0)."""
    try:
        left_value, right_value = to_sympy(left), to_sympy(right)
    except (Refused, ArithmeticError, ValueError, TypeError):
        return False
    if any(side.has(sympy.zoo, sympy.nan) for side in (left_value, right_value)):
        return False  # an undefined value (a division by zero, log base 0) equals nothing
    difference = left_value - right_value
    if difference == 0:
        return True
    if sympy.expand(difference) == 0:
        return True
    return sympy.simplify(difference) == 0


def symbolic_answers_match(given: Answer, truth: Answer) -> bool:
    """Return ``answers_match`` with exact sympy checks (call this in a worker process)."""
    return answers_match(given, truth, exact_equal=sympy_equal)
