"""A small recursive-descent parser from normalised LaTeX to an expression tree.

Model output is untrusted, so no text ever reaches Python's or sympy's string parsers
(those end in a call to Python's evaluator). This parser reads a closed grammar — numbers,
one-letter and Greek symbols, ``+ - * / ^ !``, parentheses and braces, ``\\frac``,
``\\sqrt``, ``\\binom``, ``\\pi``, ``\\infty``, implicit multiplication and a few named
functions — into a tree of tuples, and refuses anything else. Every step is bounded: the
input is at most a few thousand characters, nesting is capped at ``MAX_DEPTH``, number
literals at ``MAX_DIGITS`` digits, and exact arithmetic refuses a power or factorial whose
result would exceed ``MAX_RESULT_BITS`` bits before computing it.

Tree nodes (all tuples, so they pickle and compare cheaply):
``("num", Fraction)``, ``("sym", name)``, ``("const", "pi" | "inf")``,
``("add", (terms…))``, ``("mul", (factors…))``, ``("neg", x)``, ``("div", a, b)``,
``("pow", base, exponent)``, ``("root", x, index)``, ``("fact", x)``, ``("binom", n, k)``,
``("func", name, x)``.
"""

from __future__ import annotations

import cmath
import math
import re
from fractions import Fraction

MAX_DEPTH = 100
MAX_DIGITS = 400
MAX_RESULT_BITS = 20_000
MAX_FACTORIAL = 1000
MAX_TOKENS = 600


class ParseError(ValueError):
    """The text is not an expression of the grammar this parser reads."""


class Refused(ParseError):
    """The expression is well formed but too large to grade (a huge power, a deep nest…)."""


FUNCTIONS = frozenset(
    "sin cos tan sec csc cot arcsin arccos arctan sinh cosh tanh ln log exp".split()
)
GREEK = frozenset(
    "alpha beta gamma delta epsilon varepsilon zeta eta theta vartheta iota kappa lambda mu nu "
    "xi rho sigma tau upsilon phi varphi chi psi omega Gamma Delta Theta Lambda Xi Sigma Phi "
    "Psi Omega".split()
)
_WORD_NAMES = {"pi": ("const", "pi"), "sqrt": ("cmd", "sqrt"), "infty": ("const", "inf")}

_NUMBER = re.compile(
    r"(\d+(?:\.\d*)?|\.\d+)"  # digits with an optional decimal part
    r"(?:\\overline\s*\{(\d+)\}|\\overline\s*(\d))?"  # a repeating block: 0.\overline{3}
    r"(?:[eE]([+-]?\d{1,4})(?![\d.]))?"  # scientific notation: 3.2e5
    r"(?:_\s*\{\s*\d+\s*\}|_\s*\d+)?"  # a base subscript, ignored: 1010_2
)
_COMMAND = re.compile(r"\\([a-zA-Z]+)")
_SUBSCRIPT = re.compile(r"_\s*(\{[a-zA-Z0-9]{1,8}\}|[a-zA-Z0-9])")


def _number_value(integer_and_decimal: str, repeating: str | None, exponent: str | None) -> Fraction:
    """Return the exact value of a decimal literal, with its repeating block and exponent."""
    digits = integer_and_decimal.replace(".", "")
    if len(digits) > MAX_DIGITS:
        raise Refused("number literal too long")
    value = Fraction(integer_and_decimal if not integer_and_decimal.endswith(".") else integer_and_decimal[:-1] or "0")
    if repeating:
        decimals = len(integer_and_decimal.split(".")[1]) if "." in integer_and_decimal else 0
        # 0.1\overline{6}: the block repeats from the decimal place after the written ones.
        value += Fraction(int(repeating), (10 ** len(repeating) - 1) * 10**decimals)
    if exponent:
        power = int(exponent)
        if abs(power) > 1000:
            raise Refused("exponent too large")
        value *= Fraction(10) ** power
    return value


def tokenize(text: str) -> list[tuple]:
    """Return the tokens of a normalised answer: ``(kind, value, space_before)`` tuples."""
    tokens: list[tuple] = []
    index = 0
    length = len(text)
    space = False
    while index < length:
        char = text[index]
        if len(tokens) > MAX_TOKENS:
            raise Refused("too many tokens")
        if char.isspace():
            space = True
            index += 1
            continue
        if char.isdigit() or (char == "." and index + 1 < length and text[index + 1].isdigit()):
            match = _NUMBER.match(text, index)
            value = _number_value(match.group(1), match.group(2) or match.group(3), match.group(4))
            is_integer = "." not in match.group(1) and match.group(4) is None and match.group(2) is None
            tokens.append(("num", (value, is_integer), space))
            index = match.end()
        elif char == "\\":
            match = _COMMAND.match(text, index)
            if match is None:
                if text.startswith("\\{", index) or text.startswith("\\}", index):
                    tokens.append(("open" if text[index + 1] == "{" else "close", "\\" + text[index + 1], space))
                    index += 2
                    space = False
                    continue
                raise ParseError(f"stray backslash at {index}")
            name = match.group(1)
            index = match.end()
            if name in ("cdot", "times", "ast"):
                tokens.append(("op", "*", space))
            elif name == "div":
                tokens.append(("op", "/", space))
            elif name in ("frac", "sqrt", "binom"):
                tokens.append(("cmd", name, space))
            elif name == "pi":
                tokens.append(("const", "pi", space))
            elif name == "infty":
                tokens.append(("const", "inf", space))
            elif name in FUNCTIONS:
                tokens.append(("func", name, space))
                if name == "log" and text.startswith("_", index):
                    tokens.append(("op", "_", False))  # \log_2 8: the base follows
                    index += 1
            elif name in GREEK:
                tokens.append(("sym", name, space))
            elif name in ("lvert", "rvert", "vert", "mid"):
                tokens.append(("bar", "|", space))
            elif name in ("langle", "lbrace"):
                tokens.append(("open", "(", space))
            elif name in ("rangle", "rbrace"):
                tokens.append(("close", ")", space))
            else:
                raise ParseError(f"unsupported command \\{name}")
        elif char.isalpha() and char.isascii():
            end = index
            while end < length and text[end].isalpha() and text[end].isascii():
                end += 1
            word = text[index:end]
            index = end
            if word in FUNCTIONS or word in _WORD_NAMES:
                kind, value = ("func", word) if word in FUNCTIONS else _WORD_NAMES[word]
                tokens.append((kind, value, space))
            else:
                if len(word) > 4:
                    raise ParseError("a word, not an expression")
                for position, letter in enumerate(word):
                    tokens.append(("sym", letter, space if position == 0 else False))
            # x_1, a_{n}: the subscript is part of the symbol's name.
            match = _SUBSCRIPT.match(text, index)
            if match is not None and tokens[-1][0] == "sym":
                tokens[-1] = ("sym", tokens[-1][1] + "_" + match.group(1).strip("{}"), tokens[-1][2])
                index = match.end()
        elif char in "+-*/^!=,":
            tokens.append(("op", char, space))
            index += 1
        elif char in "([{":
            tokens.append(("open", char, space))
            index += 1
        elif char in ")]}":
            tokens.append(("close", char, space))
            index += 1
        elif char == "|":
            tokens.append(("bar", "|", space))
            index += 1
        else:
            raise ParseError(f"unexpected character {char!r}")
        space = False
    return tokens


_CLOSING = {"(": ")", "[": "]", "{": "}", "\\{": "\\}"}


class _Parser:
    """Recursive-descent parser over a token list (one instance per expression)."""

    def __init__(self, tokens: list[tuple]):
        self.tokens = tokens
        self.position = 0
        self.depth = 0

    def peek(self, offset: int = 0) -> tuple | None:
        index = self.position + offset
        return self.tokens[index] if index < len(self.tokens) else None

    def take(self) -> tuple:
        token = self.peek()
        if token is None:
            raise ParseError("unexpected end")
        self.position += 1
        return token

    def expect(self, kind: str, value: str) -> None:
        token = self.take()
        if token[0] != kind or token[1] != value:
            raise ParseError(f"expected {value!r}")

    def enter(self) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise Refused("nested too deeply")

    def parse(self) -> tuple:
        node = self.expression()
        if self.peek() is not None:
            raise ParseError(f"unexpected {self.peek()[1]!r}")
        return node

    def expression(self) -> tuple:
        self.enter()
        terms = [self.term()]
        while (token := self.peek()) is not None and token[0] == "op" and token[1] in "+-":
            self.take()
            term = self.term()
            terms.append(("neg", term) if token[1] == "-" else term)
        self.depth -= 1
        return terms[0] if len(terms) == 1 else ("add", tuple(terms))

    def term(self) -> tuple:
        node = self.unary()
        while (token := self.peek()) is not None:
            if token[0] == "op" and token[1] in "*/":
                self.take()
                right = self.unary()
                node = ("div", node, right) if token[1] == "/" else ("mul", (node, right))
            elif self.starts_primary(token):
                if token[0] == "num" and node_is_number(node):
                    raise ParseError("two numbers side by side")
                node = ("mul", (node, self.power()))
            else:
                break
        return node

    @staticmethod
    def starts_primary(token: tuple) -> bool:
        return token[0] in ("num", "sym", "const", "cmd", "func") or (token[0] == "open" and token[1] in "([{")

    def unary(self) -> tuple:
        token = self.peek()
        if token is not None and token[0] == "op" and token[1] in "+-":
            self.take()
            self.enter()
            operand = self.unary()
            self.depth -= 1
            return ("neg", operand) if token[1] == "-" else operand
        return self.power()

    def power(self) -> tuple:
        base = self.postfix()
        token = self.peek()
        if token is not None and token[0] == "op" and token[1] == "^":
            self.take()
            self.enter()
            exponent = self.unary()
            self.depth -= 1
            return ("pow", base, exponent)
        return base

    def postfix(self) -> tuple:
        node = self.primary()
        while (token := self.peek()) is not None and token[0] == "op" and token[1] == "!":
            self.take()
            node = ("fact", node)
        return node

    def group(self) -> tuple:
        """Parse ``{…}`` (a LaTeX argument) and return its expression."""
        self.expect("open", "{")
        node = self.expression()
        self.expect("close", "}")
        return node

    def primary(self) -> tuple:
        token = self.take()
        kind, value, _ = token
        if kind == "num":
            number, is_integer = value
            if is_integer:
                mixed = self.mixed_number(number)
                if mixed is not None:
                    return mixed
            return ("num", number)
        if kind == "sym":
            return ("sym", value)
        if kind == "const":
            return ("const", value)
        if kind == "open":
            self.enter()
            node = self.expression()
            closing = self.take()
            if closing[0] != "close" or closing[1] != _CLOSING[value]:
                raise ParseError("unbalanced brackets")
            self.depth -= 1
            return node
        if kind == "bar":
            self.enter()
            node = self.expression()
            self.expect("bar", "|")
            self.depth -= 1
            return ("func", "abs", node)
        if kind == "cmd":
            self.enter()
            if value == "frac":
                node = ("div", self.group(), self.group())
            elif value == "binom":
                node = ("binom", self.group(), self.group())
            else:  # sqrt, with an optional [index]
                index = ("num", Fraction(2))
                following = self.peek()
                if following is not None and following[0] == "open" and following[1] == "[":
                    self.take()
                    index = self.expression()
                    self.expect("close", "]")
                following = self.peek()
                if following is not None and following[0] == "open" and following[1] == "{":
                    node = ("root", self.group(), index)
                else:
                    node = ("root", self.power(), index)
            self.depth -= 1
            return node
        if kind == "func":
            self.enter()
            following = self.peek()
            if value == "log" and following is not None and following[0] == "op" and following[1] == "_":
                self.take()
                base = self.primary()
                argument = self.function_argument()
                self.depth -= 1
                return ("div", ("func", "ln", argument), ("func", "ln", base))
            exponent = None
            if following is not None and following[0] == "op" and following[1] == "^":
                # \sin^2 x is (\sin x)^2; \sin^{-1} x is \arcsin x.
                self.take()
                exponent = self.primary()
            argument = self.function_argument()
            self.depth -= 1
            if exponent is None:
                return ("func", value, argument)
            if exponent == ("neg", ("num", Fraction(1))) and value in ("sin", "cos", "tan"):
                return ("func", "arc" + value, argument)
            return ("pow", ("func", value, argument), exponent)
        raise ParseError(f"unexpected {value!r}")

    def function_argument(self) -> tuple:
        """Parse a function's argument: ``(…)``, or an implicit product such as ``2x`` in ``\\sin 2x``."""
        node = self.power()
        following = self.peek()
        if following is not None and following[0] == "open" or node[0] == "func":
            return node
        while (token := self.peek()) is not None and token[0] in ("num", "sym", "const") and not (
            token[0] == "num" and node_is_number(node)
        ):
            node = ("mul", (node, self.power()))
        return node

    def mixed_number(self, whole: Fraction) -> tuple | None:
        """Return the node of a mixed number starting at ``whole`` (``2\\frac{1}{2}``, ``2 1/2``)."""
        tokens = self.tokens[self.position : self.position + 7]
        shape = [(token[0], token[1]) if token[0] != "num" else ("num", token[1][1]) for token in tokens]
        braced = [("cmd", "frac"), ("open", "{"), ("num", True), ("close", "}"), ("open", "{"), ("num", True), ("close", "}")]
        if shape[:7] == braced:
            numerator, denominator = tokens[2][1][0], tokens[5][1][0]
            self.position += 7
        elif shape[:3] == [("num", True), ("op", "/"), ("num", True)] and tokens[0][2]:
            after = self.peek(3)
            if after is not None and after[0] != "close" and not (after[0] == "op" and after[1] in "+-,="):
                return None
            numerator, denominator = tokens[0][1][0], tokens[2][1][0]
            self.position += 3
        else:
            return None
        if denominator == 0:
            raise ParseError("zero denominator")
        if numerator >= denominator:
            # 11 7/6 is no mixed number (its fraction part is improper): neither 73/6 nor 11·7/6.
            raise ParseError("an improper fraction in a mixed number")
        return ("num", whole + numerator / denominator)


def node_is_number(node: tuple) -> bool:
    """Return True when ``node`` is a literal number (possibly negated)."""
    while node[0] == "neg":
        node = node[1]
    return node[0] == "num"


def parse_expression(text: str) -> tuple:
    """Return the expression tree of ``text``; raise ParseError (or Refused) when it is not one."""
    tokens = tokenize(text)
    if not tokens:
        raise ParseError("empty")
    return _Parser(tokens).parse()


# ---------------------------------------------------------------------------------------
# Exact rational values


class NotRational(Exception):
    """The expression's value is not (known to be) a rational number."""


def _checked_power(base: Fraction, exponent: Fraction) -> Fraction:
    """Return ``base ** exponent`` for an integer exponent, refusing results too large to hold."""
    if exponent.denominator != 1:
        raise NotRational("fractional exponent")
    power = exponent.numerator
    if base in (0, 1) or power == 0:
        if base == 0 and power < 0:
            raise ParseError("division by zero")
        return base**power
    if base == -1:
        return Fraction(-1 if power % 2 else 1)
    size = max(abs(base.numerator).bit_length(), base.denominator.bit_length())
    if abs(power) > MAX_RESULT_BITS or abs(power) * size > MAX_RESULT_BITS:
        raise Refused("power too large")
    return base**power


def rational_value(node: tuple) -> Fraction:
    """Return the exact rational value of ``node``; raise NotRational when it has none."""
    kind = node[0]
    if kind == "num":
        return node[1]
    if kind == "neg":
        return -rational_value(node[1])
    if kind == "add":
        return sum((rational_value(term) for term in node[1]), Fraction(0))
    if kind == "mul":
        result = Fraction(1)
        for factor in node[1]:
            result *= rational_value(factor)
            if abs(result.numerator).bit_length() + result.denominator.bit_length() > 2 * MAX_RESULT_BITS:
                raise Refused("product too large")
        return result
    if kind == "div":
        numerator, denominator = rational_value(node[1]), rational_value(node[2])
        if denominator == 0:
            raise ParseError("division by zero")
        return numerator / denominator
    if kind == "pow":
        return _checked_power(rational_value(node[1]), rational_value(node[2]))
    if kind == "fact":
        value = rational_value(node[1])
        if value.denominator != 1 or value < 0:
            raise ParseError("factorial of a non-natural number")
        if value > MAX_FACTORIAL:
            raise Refused("factorial too large")
        return Fraction(math.factorial(int(value)))
    if kind == "binom":
        n, k = rational_value(node[1]), rational_value(node[2])
        if n.denominator != 1 or k.denominator != 1 or n < 0:
            raise NotRational("binomial outside the naturals")
        if n > 50 * MAX_FACTORIAL:
            raise Refused("binomial too large")
        return Fraction(math.comb(int(n), int(k)) if k >= 0 else 0)
    raise NotRational(kind)


# ---------------------------------------------------------------------------------------
# Numeric values at sample points (a fast filter; never the final word on equality)

_SAMPLE_POINTS = (
    (0.5772156649, 1.3247179572, 0.7390851332, 1.6180339887, 0.9159655942, 1.2020569032),
    (1.4142135623, 0.6931471805, 1.7320508075, 0.3678794411, 1.2599210498, 0.8862269254),
)
_NUMERIC_FUNCTIONS = {
    "sin": cmath.sin, "cos": cmath.cos, "tan": cmath.tan, "sinh": cmath.sinh, "cosh": cmath.cosh,
    "tanh": cmath.tanh, "arcsin": cmath.asin, "arccos": cmath.acos, "arctan": cmath.atan,
    "ln": cmath.log, "log": cmath.log, "exp": cmath.exp, "abs": abs,
    "sec": lambda x: 1 / cmath.cos(x), "csc": lambda x: 1 / cmath.sin(x), "cot": lambda x: 1 / cmath.tan(x),
}


def symbols_of(node: tuple, found: set | None = None) -> set:
    """Return the set of symbol names in ``node``."""
    found = set() if found is None else found
    if node[0] == "sym":
        found.add(node[1])
    elif node[0] in ("add", "mul"):
        for child in node[1]:
            symbols_of(child, found)
    elif node[0] in ("neg", "fact"):
        symbols_of(node[1], found)
    elif node[0] in ("div", "pow", "root", "binom"):
        symbols_of(node[1], found)
        symbols_of(node[2], found)
    elif node[0] == "func":
        symbols_of(node[2], found)
    return found


def numeric_value(node: tuple, values: dict) -> complex:
    """Return ``node`` evaluated in complex floating point with symbols set from ``values``."""
    kind = node[0]
    if kind == "num":
        return complex(node[1])
    if kind == "sym":
        if node[1] == "i":
            return 1j
        if node[1] == "e":
            return complex(math.e)
        return complex(values[node[1]])
    if kind == "const":
        if node[1] == "pi":
            return complex(math.pi)
        raise OverflowError("infinity")
    if kind == "neg":
        # 0 - z, not -z: -(1+0j) has a negative zero imaginary part, which puts \sqrt{-1} on the
        # other side of the branch cut (-i instead of i).
        return 0 - numeric_value(node[1], values)
    if kind == "add":
        return sum(numeric_value(term, values) for term in node[1])
    if kind == "mul":
        result = complex(1)
        for factor in node[1]:
            result *= numeric_value(factor, values)
        return result
    if kind == "div":
        return numeric_value(node[1], values) / numeric_value(node[2], values)
    if kind == "pow":
        base, exponent = numeric_value(node[1], values), numeric_value(node[2], values)
        if abs(exponent) > 1000:
            raise OverflowError("exponent")
        return base**exponent
    if kind == "root":
        index, radicand = numeric_value(node[2], values), numeric_value(node[1], values)
        if not index.imag and not radicand.imag and radicand.real < 0 and index.real % 2 == 1:
            return -((-radicand) ** (1 / index))  # the real odd root: \sqrt[3]{-8} = -2
        return radicand ** (1 / index)
    if kind == "fact":
        value = numeric_value(node[1], values)
        if value.imag or value.real < 0 or value.real > 170:
            raise OverflowError("factorial")
        return complex(math.gamma(value.real + 1))
    if kind == "binom":
        n, k = numeric_value(node[1], values), numeric_value(node[2], values)
        if n.imag or k.imag or abs(n.real) > 170 or abs(k.real) > 170:
            raise OverflowError("binomial")
        return complex(math.gamma(n.real + 1) / (math.gamma(k.real + 1) * math.gamma(n.real - k.real + 1)))
    if kind == "func":
        return complex(_NUMERIC_FUNCTIONS[node[1]](numeric_value(node[2], values)))
    raise OverflowError(kind)


def sample_values(node: tuple, names: list[str]) -> list[complex]:
    """Return ``node``'s numeric values at the fixed sample points for symbols ``names``."""
    results = []
    for point in _SAMPLE_POINTS:
        values = {name: point[position % len(point)] + 0.1 * (position // len(point)) for position, name in enumerate(names)}
        results.append(numeric_value(node, values))
    return results
