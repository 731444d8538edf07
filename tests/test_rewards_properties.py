"""Property tests of the whole grading path: distinct values never grade equal, one value in two forms does.

Random values of many kinds (integers, fractions, decimals, surds, intervals, tuples, sets,
times of day, numbers with a base subscript, polynomials) are rendered in varied LaTeX and
plain forms and graded through ``r1_zero_reward_fn`` (extraction, normalisation, parsing,
comparison, the bounded sympy worker). The expected verdict comes from the values
themselves — exact ``Fraction`` arithmetic, tuples and sets of them — plus the conventions
docs/grading.md states, written out here independently of the grader's code:

- a decimal *reference* equals an exact answer that rounds to it at its places (a tie
  rounds away from zero); a short decimal *answer* never equals an exact reference;
- a one-element list equals its element; a bare list is unordered;
- ``{a, b}`` in plain braces is a tuple against a tuple and a list otherwise;
- an open interval ``(a, b)`` and the pair ``(a, b)`` are written alike and compare alike;
- ``h:mm`` is a time of day when the minutes have a leading zero or share a factor with the
  hour (``3:00``, ``10:30``); otherwise (``11:21``) a ratio, which equals its quotient; a
  time in the reference equals only the same time, an answer ``h:mm`` against a ratio or a
  number is read as a ratio;
- a base subscript may be absent on one side; two explicit bases must agree.
"""

from __future__ import annotations

import math
import os
from fractions import Fraction

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reasontune.rewards import r1_zero_reward_fn

EXAMPLES = int(os.environ.get("REASONTUNE_PROPERTY_EXAMPLES", "250"))
SETTINGS = settings(
    max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck),
    derandomize="REASONTUNE_PROPERTY_RANDOM" not in os.environ,  # fixed examples in CI; random when hunting
)


def graded_equal(answer: str, reference: str) -> bool:
    response = f"Reasoning. </think> <answer>{answer}</answer>"
    return r1_zero_reward_fn(response, reference, timeout=10.0)["answer_reward"] == 1.0


# ---------------------------------------------------------------------------------------
# Values: (kind, identity, facts) where facts carry what a convention needs (decimal places,
# plain braces) about the rendering drawn.

small = st.integers(min_value=-60, max_value=60)
positive = st.integers(min_value=1, max_value=60)


def render_rational(value: Fraction, draw) -> str:
    """Return an exact (non-decimal) spelling of ``value``."""
    if value.denominator == 1:
        n = value.numerator
        forms = [str(n), f"\\frac{{{2 * n}}}{{2}}", f"{n}.0" if n >= 0 else f"-{-n}.0"]
        if n >= 0:
            forms += [f"+{n}", f"{{{n}}}"]
        return draw(st.sampled_from(forms))
    p, q = abs(value.numerator), value.denominator
    sign = "-" if value < 0 else ""
    k = draw(st.integers(min_value=1, max_value=3))
    forms = [f"{sign}\\frac{{{p}}}{{{q}}}", f"{sign}{p}/{q}", f"{sign}\\dfrac{{{p * k}}}{{{q * k}}}",
             f"\\frac{{{sign}{p}}}{{{q}}}", f"{sign}\\tfrac{{{p}}}{{{q}}}"]
    return draw(st.sampled_from(forms))


def decimal_text(value: Fraction, places: int) -> str:
    """Return ``value`` (a multiple of 10^-places) written with exactly ``places`` decimals."""
    scaled = abs(value) * 10**places
    assert scaled.denominator == 1
    digits = str(scaled.numerator).rjust(places + 1, "0")
    return ("-" if value < 0 else "") + digits[:-places] + "." + digits[-places:]


def two(draw, kind, identity, render) -> tuple:
    """Return ``(kind, identity, [(text, facts), (text, facts)])``: two renderings drawn independently."""
    return kind, identity, [render(), render()]


@st.composite
def numbers(draw):
    form = draw(st.sampled_from(["int", "frac", "dec"]))
    if form == "dec":
        places = draw(st.integers(min_value=1, max_value=4))
        value = Fraction(draw(st.integers(min_value=-3000, max_value=3000)), 10**places)
        if value.denominator == 1:
            value += Fraction(1, 10**places)
        return two(draw, "num", value, lambda: (decimal_text(value, places), {"places": places}))
    value = Fraction(draw(small), 1 if form == "int" else draw(st.integers(min_value=2, max_value=12)))
    return two(draw, "num", value, lambda: (render_rational(value, draw), {"places": None}))


SQUAREFREE = [2, 3, 5, 6, 7, 10, 11, 13, 14, 15]


@st.composite
def surds(draw):
    coefficient = draw(st.integers(min_value=-9, max_value=9).filter(bool))
    radicand = draw(st.sampled_from(SQUAREFREE))
    sign = "-" if coefficient < 0 else ""
    a = abs(coefficient)
    forms = [f"{coefficient}\\sqrt{{{radicand}}}", f"{sign}{a} \\cdot \\sqrt{{{radicand}}}",
             f"{sign}\\sqrt{{{a * a * radicand}}}", f"{sign}\\sqrt{{{radicand}}} \\cdot {a}"]
    if a == 1:
        forms.append(f"{sign}\\sqrt{{{radicand}}}")
    return two(draw, "surd", (coefficient, radicand), lambda: (draw(st.sampled_from(forms)), {}))


@st.composite
def intervals(draw):
    low, high = sorted(draw(st.lists(small, min_size=2, max_size=2, unique=True)))
    low_closed, high_closed = draw(st.booleans()), draw(st.booleans())

    def render():
        low_text, high_text = render_rational(Fraction(low), draw), render_rational(Fraction(high), draw)
        opening, closing = "[" if low_closed else "(", "]" if high_closed else ")"
        below, above = "\\le" if low_closed else "<", "\\le" if high_closed else "<"
        forms = [f"{opening}{low_text}, {high_text}{closing}", f"{low_text} {below} x {above} {high_text}",
                 f"\\left{opening}{low_text}, {high_text}\\right{closing}"]
        return draw(st.sampled_from(forms)), {}

    return two(draw, "interval", (Fraction(low), Fraction(high), low_closed, high_closed), render)


@st.composite
def tuples(draw):
    items = draw(st.lists(small, min_size=2, max_size=3))

    def render():
        texts = [render_rational(Fraction(item), draw) for item in items]
        forms = ["(" + ", ".join(texts) + ")", "\\left(" + ", ".join(texts) + "\\right)"]
        if len(items) == 2:
            forms.append(f"({texts[0]}; {texts[1]})")
        return draw(st.sampled_from(forms)), {}

    return two(draw, "tuple", tuple(Fraction(item) for item in items), render)


@st.composite
def sets(draw):
    items = draw(st.lists(small, min_size=1, max_size=4, unique=True))

    def render():
        order = draw(st.permutations(items))
        texts = [render_rational(Fraction(item), draw) for item in order]
        joined = ", ".join(texts)
        forms = [("\\{" + joined + "\\}", False), (joined, False), (" \\text{ and } ".join(texts), False),
                 (" or ".join(texts), False), ("{" + joined + "}", True),
                 (", ".join(f"\\boxed{{{text}}}" for text in texts), False)]
        text, braces = draw(st.sampled_from(forms))
        if len(items) == 1 and braces:
            text, braces = "\\{" + texts[0] + "\\}", False  # {5} alone is a braced number, not a list
        return text, {"plain_braces": braces, "order": tuple(Fraction(item) for item in order)}

    return two(draw, "set", tuple(sorted(Fraction(item) for item in items)), render)


@st.composite
def times(draw):
    hour = draw(st.integers(min_value=1, max_value=23))
    minute = draw(st.integers(min_value=0, max_value=59))

    def render():
        hour_text = draw(st.sampled_from([str(hour), str(hour).rjust(2, "0")]))
        return f"{hour_text}:{minute:02d}", {}

    return two(draw, "time", (hour, minute), render)


@st.composite
def based(draw):
    base = draw(st.integers(min_value=2, max_value=9))
    length = draw(st.integers(min_value=1, max_value=5))
    digits = "".join(str(draw(st.integers(min_value=0, max_value=base - 1))) for _ in range(length)).lstrip("0") or "0"
    forms = [f"{digits}_{{{base}}}", f"{digits}_{base}"]
    return two(draw, "based", (digits, base), lambda: (draw(st.sampled_from(forms)), {}))


@st.composite
def polynomials(draw):
    coefficients = draw(st.lists(st.integers(min_value=-5, max_value=5), min_size=2, max_size=4))
    if all(c == 0 for c in coefficients[1:]):
        coefficients[1] = 1  # degree at least one: never a number

    def render():
        terms = []
        for power, c in enumerate(coefficients):
            if c == 0:
                continue
            variable = "" if power == 0 else ("x" if power == 1 else f"x^{{{power}}}")
            magnitude = "" if abs(c) == 1 and power else str(abs(c))
            spaced = f"{magnitude} \\cdot {variable}" if magnitude and variable else magnitude + variable
            terms.append(("-" if c < 0 else "+", draw(st.sampled_from([magnitude + variable, spaced]))))
        text = "".join(f" {sign} {factor}" for sign, factor in draw(st.permutations(terms))).strip()
        return (text[2:] if text.startswith("+ ") else text), {}

    return two(draw, "poly", tuple(coefficients + [0] * (4 - len(coefficients))), render)


values = st.one_of(numbers(), surds(), intervals(), tuples(), sets(), times(), based(), polynomials())


# ---------------------------------------------------------------------------------------
# The verdict the conventions give


def round_half_away(value: Fraction, places: int) -> Fraction:
    scaled = abs(value) * 10**places
    rounded = Fraction(math.floor(scaled + Fraction(1, 2)), 10**places)
    return rounded if value >= 0 else -rounded


def real_value(value) -> float | Fraction | None:
    kind, identity, _ = value
    if kind == "num":
        return identity
    if kind == "surd":
        return identity[0] * math.sqrt(identity[1])
    if kind == "based":
        return Fraction(int(identity[0]))
    return None


def is_time_of_day(hour: int, minute: int) -> bool:
    return minute < 10 or math.gcd(hour, minute) != 1


def expected_equal(answer, reference) -> bool:
    """Return whether the answer grades equal to the reference under the documented conventions."""
    (kind, identity, facts), (ref_kind, ref_identity, ref_facts) = answer, reference
    if ref_kind == "time":
        hour, minute = ref_identity
        if is_time_of_day(hour, minute):
            return kind == "time" and identity == ref_identity
        if kind == "time":
            return identity[0] * minute == identity[1] * hour
        value = real_value(answer)
        return isinstance(value, Fraction) and value == Fraction(hour, minute)
    if kind == "time":
        value = real_value(reference)
        return identity[1] != 0 and isinstance(value, Fraction) and value == Fraction(*identity)
    if kind == "set" and len(identity) == 1 and ref_kind != "set":
        return expected_equal(("num", identity[0], {"places": None}), reference)
    if ref_kind == "set" and len(ref_identity) == 1 and kind != "set":
        return expected_equal(answer, ("num", ref_identity[0], ref_facts | {"places": None}))
    if kind == "based" and ref_kind == "based":
        return identity == ref_identity
    if {kind, ref_kind} <= {"num", "surd", "based"}:
        value, ref_value = real_value(answer), real_value(reference)
        if kind == "surd" and ref_kind == "surd":
            return identity == ref_identity
        if isinstance(value, Fraction) and isinstance(ref_value, Fraction) and value == ref_value:
            return True
        places = ref_facts.get("places")
        if places is None or facts.get("places") is not None or len(str(abs(ref_value * 10**places).numerator)) < 2:
            return False
        if isinstance(value, Fraction):
            return round_half_away(value, places) == ref_value
        return abs(value - float(ref_value)) < 0.5 * 10**-places
    if {kind, ref_kind} <= {"interval", "tuple"}:
        def as_interval(kind_, identity_):
            if kind_ == "interval":
                return identity_
            if len(identity_) == 2 and identity_[0] < identity_[1]:
                return (identity_[0], identity_[1], False, False)
            return ("tuple",) + identity_
        return as_interval(kind, identity) == as_interval(ref_kind, ref_identity)
    if {kind, ref_kind} == {"set", "tuple"}:
        set_facts, tuple_identity = (facts, ref_identity) if kind == "set" else (ref_facts, identity)
        return bool(set_facts["plain_braces"]) and set_facts["order"] == tuple_identity
    if kind == ref_kind == "set":
        return sorted(identity) == sorted(ref_identity)
    if kind == ref_kind:
        return identity == ref_identity
    return False


def first_rendering(value) -> tuple:
    kind, identity, renderings = value
    text, facts = renderings[0]
    return (kind, identity, facts), text


@SETTINGS
@given(values, values)
def test_two_values_grade_equal_exactly_when_the_conventions_say_so(answer, reference):
    (answer_value, answer_text), (reference_value, reference_text) = first_rendering(answer), first_rendering(reference)
    expected = expected_equal(answer_value, reference_value)
    assert graded_equal(answer_text, reference_text) is expected, (answer_text, reference_text)


@SETTINGS
@given(st.one_of(numbers(), surds(), intervals(), tuples(), sets(), based(), polynomials(), times()))
def test_one_value_in_two_forms_grades_equal(value):
    kind, identity, ((first, first_facts), (second, second_facts)) = value
    assert expected_equal((kind, identity, first_facts), (kind, identity, second_facts))
    assert graded_equal(first, second), (first, second)


# ---------------------------------------------------------------------------------------
# Near misses: a value and a small change of it (one bracket, one entry, one digit, the base,
# the same ratio as a different time, a decimal one unit away from the exact value's rounding).


@st.composite
def near_pairs(draw):
    kind = draw(st.sampled_from(["num", "rounding", "surd", "interval", "tuple", "set", "time", "based", "poly"]))
    if kind == "num":
        value = Fraction(draw(small), draw(st.integers(min_value=1, max_value=12)))
        other = value + draw(st.sampled_from([Fraction(1), Fraction(-1), Fraction(1, value.denominator + 1), Fraction(0)]))
        return ("num", value, {"places": None}), render_rational(value, draw), ("num", other, {"places": None}), render_rational(other, draw)
    if kind == "rounding":
        exact = Fraction(draw(small), draw(st.integers(min_value=3, max_value=17)))
        places = draw(st.integers(min_value=1, max_value=4))
        decimal = round_half_away(exact, places) + draw(st.sampled_from([0, 0, Fraction(1, 10**places), -Fraction(1, 10**places)]))
        if decimal.denominator == 1:
            decimal += Fraction(1, 10**places)
        exact_value = ("num", exact, {"places": None})
        decimal_value = ("num", decimal, {"places": places})
        pair = [(exact_value, render_rational(exact, draw)), (decimal_value, decimal_text(decimal, places))]
        if draw(st.booleans()):
            pair.reverse()
        return pair[0] + pair[1]
    if kind == "surd":
        (_, (coefficient, radicand), _), text = first_rendering(draw(surds()))
        other = draw(st.sampled_from([(coefficient + 1 or 2, radicand), (coefficient, SQUAREFREE[(SQUAREFREE.index(radicand) + 1) % len(SQUAREFREE)])]))
        return ("surd", (coefficient, radicand), {}), text, ("surd", other, {}), f"{other[0]}\\sqrt{{{other[1]}}}"
    if kind == "interval":
        value, text = first_rendering(draw(intervals()))
        low, high, low_closed, high_closed = value[1]
        change = draw(st.sampled_from(["low bracket", "high bracket", "low end", "high end"]))
        low_closed ^= change == "low bracket"
        high_closed ^= change == "high bracket"
        low -= change == "low end"
        high += change == "high end"
        opening, closing = "[" if low_closed else "(", "]" if high_closed else ")"
        return value, text, ("interval", (low, high, low_closed, high_closed), {}), f"{opening}{low}, {high}{closing}"
    if kind == "tuple":
        value, text = first_rendering(draw(tuples()))
        items = list(value[1])
        if draw(st.booleans()) and items[0] != items[1]:
            items[0], items[1] = items[1], items[0]
        else:
            items[-1] += 1
        return value, text, ("tuple", tuple(items), {}), "(" + ", ".join(str(item) for item in items) + ")"
    if kind == "set":
        value, text = first_rendering(draw(sets()))
        items = list(value[1])
        extra = max(items) + 1
        items = items + [extra] if draw(st.booleans()) else items[:-1] + [extra]
        return value, text, ("set", tuple(sorted(items)), {"plain_braces": False, "order": tuple(items)}), ", ".join(str(item) for item in items)
    if kind == "time":
        change = draw(st.sampled_from(["same ratio", "whole hours", "minutes", "hour"]))
        hour = draw(st.integers(min_value=1, max_value=11))
        minute = 0 if change == "whole hours" else draw(st.sampled_from([5, 10, 15, 20, 25, 7, 13, 29]))
        scale = draw(st.integers(min_value=2, max_value=2))
        other = {"same ratio": (hour * scale, minute * scale), "whole hours": (hour + scale, 0),
                 "minutes": (hour, minute + 30), "hour": (hour + 12, minute)}[change]
        return ("time", (hour, minute), {}), f"{hour}:{minute:02d}", ("time", other, {}), f"{other[0]}:{other[1]:02d}"
    if kind == "based":
        value, text = first_rendering(draw(based()))
        digits, base = value[1]
        other = draw(st.sampled_from([(digits, base + 1), (digits + "1", base)]))
        return value, text, ("based", other, {}), f"{other[0]}_{{{other[1]}}}"
    value, text = first_rendering(draw(polynomials()))
    coefficients = list(value[1])
    coefficients[draw(st.integers(min_value=0, max_value=3))] += draw(st.sampled_from([1, -1]))
    if all(c == 0 for c in coefficients[1:]):
        coefficients[1] = 2
    other = " + ".join(f"({c}) \\cdot x^{{{power}}}" for power, c in enumerate(coefficients) if c)
    return value, text, ("poly", tuple(coefficients), {}), other


@SETTINGS
@given(near_pairs(), st.booleans())
def test_near_misses_grade_as_the_conventions_say(pair, swap):
    first_value, first_text, second_value, second_text = pair
    if swap:
        first_value, first_text, second_value, second_text = second_value, second_text, first_value, first_text
    expected = expected_equal(first_value, second_value)
    assert graded_equal(first_text, second_text) is expected, (first_text, second_text, expected)
