"""String normalisation of answers: what a grader strips before it compares.

Only string operations with linear-time regular expressions live here; nothing parses or
evaluates. The output is a plain string plus a flag saying whether a percent sign was seen.
"""

from __future__ import annotations

import re

from reasontune.rewards.extract import MAX_ANSWER_CHARS, extract_boxed_answers

# Commands that only change how something looks.
_DROP_COMMANDS = re.compile(
    r"\\(?:left|right|bigl|bigr|Bigl|Bigr|biggl|biggr|big|Big|bigg|Bigg|displaystyle|textstyle"
    r"|scriptstyle|limits|nolimits|mathstrut|strut|therefore|because|phantom\{[^{}]*\})(?![a-zA-Z])"
)
_THIN_SPACING = re.compile(r"(?<!\\)\\(?:,|!|;|:|>|thinspace|medspace|thickspace)")
_SPACING = re.compile(r"\\(?:quad|qquad|enspace|hspace\{[^{}]*\})|~|(?<!\\)\\ ")
_UNICODE = str.maketrans({
    "−": "-", "–": "-", "×": "*", "·": "*", "÷": "/", "π": "\\pi ", "∞": "\\infty ", "²": "^2", "³": "^3",
    "≤": "\\le ", "≥": "\\ge ", "≠": "\\ne ", "≈": "\\approx ", "∪": "\\cup ", "∈": "\\in ", "√": "\\sqrt ",
    "€": " ", "£": " ", "¥": " ", "₹": " ", "\u00a0": " ", "\u2009": "", "\u202f": "",
})
_TEXT_COMMANDS = re.compile(
    r"\\(?:text|textbf|textit|textrm|textsf|texttt|textup|mbox|mathrm|mathbf|mathit|mathsf|mathtt|mathnormal"
    r"|mathcal|mathscr|mathfrak|boldsymbol|bm|operatorname|emph|textnormal|hbox)\s*\{([^{}]*)\}"
)
# JSON-escaped LaTeX: ``\\frac`` written with a doubled backslash.
_DOUBLED_BACKSLASH = re.compile(
    r"(?<!\\)\\(?=\\(?:frac|dfrac|tfrac|sqrt|pi|infty|left|right|cdot|times|text|mathrm|mathbf|boxed|le|ge|leq|geq"
    r"|neq|ne|lt|gt|cup|in|pm|mp|sin|cos|tan|log|ln|theta|alpha|beta|circ|approx|begin|end|binom|over)(?![a-zA-Z]))"
)
_TRAILING_BACKSLASH = re.compile(r"(?<!\\)(?:\\\\|\\)\s*$")
_REALS = re.compile(r"\\mathbb\s*\{?\s*R\s*\}?|ℝ|(?:\\text\s*\{\s*)?\ball real numbers\b(?:\s*\})?", re.I)
_CURRENCY = re.compile(r"\\(?:euro|EUR|pounds|textdollar|textsterling|texteuro|yen)(?![a-zA-Z])|\b(?:USD|EUR|GBP)\b")
# A unit in a text command after a number (5\text{ m}^2, 10\,\mathrm{kg}) or a known unit symbol
# with a power sign (5 m²): removed whatever its length, since it follows a number.
_TEXT_UNIT = re.compile(
    r"(?<=[\d})])\s*\\(?:text|mathrm|textrm|mbox|operatorname)\s*\{\s*[a-zA-Z]{1,12}(?:\s*/\s*[a-zA-Z]{1,6})?\.?\s*\}"
    r"(?:\s*\^\s*\{?\s*[23]\s*\}?)?[\s.]*$"
)
# A unit of two or more letters written against its number: 7,5cm, 12kg (never one letter: 5m may be 5·m).
_ATTACHED_UNIT = re.compile(r"(?<=\d)(?:mm|cm|km|kg|mg|ml|mL|min|ft|yd|mi|km/h|m/s)\.?\s*$")
_UNIT_SYMBOL = re.compile(r"(?<=\d)\s*(?:mm|cm|km|m|g|kg|mg|L|mL|s|ms|h|ft|in|yd|mi)\s*\^\s*\{?[23]\}?\s*$")
_SPACE_THOUSANDS = re.compile(r"(?<![\d.,])\d{1,3}(?: \d{3})+(?![\d,]|\s*\d)")
_RELATION_WORDS = (
    (re.compile(r"\\(?:leq|leqslant|le)(?![a-zA-Z])|<="), "\\le "),
    (re.compile(r"\\(?:geq|geqslant|ge)(?![a-zA-Z])|>="), "\\ge "),
    (re.compile(r"\\(?:neq|ne)(?![a-zA-Z])|!=|=/="), "\\ne "),
    (re.compile(r"\\lt(?![a-zA-Z])"), "<"),
    (re.compile(r"\\gt(?![a-zA-Z])"), ">"),
    (re.compile(r"\\(?:approx|simeq|doteq|thickapprox)(?![a-zA-Z])"), " \\approx "),
)
_DEGREES = re.compile(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|\\circ|°|\\degree(?![a-zA-Z])|\^\s*\{\s*o\s*\}")
_PERCENT = re.compile(r"\\%|%|\\text\{\s*percent\s*\}|\bpercent\b")
_DOLLAR = re.compile(r"\\\$|\$|\\\(|\\\)|\\\[|\\\]")
# No group of thousands starts with 0: 0,111 is not 111 (it may be a decimal comma, see equivalence).
_THOUSANDS = re.compile(r"(?<![\d.,])[1-9]\d{0,2}(?:,\d{3})+(?![\d,])")
# A comma followed by a negative thin space between digits is always digit grouping, whatever the
# group sizes (MATH writes 10,\!000; Indian grouping 56,\!01,\!78,\!95,\!760).
_GROUPED_DIGITS = re.compile(r"(?<=\d),\s*\\!\s*(?=\d)")
# "(11,7)or(7,11)": an "or" written without spaces between brackets still separates answers.
_SERIAL_AND = re.compile(r",\s*and\s+")
_TIGHT_OR = re.compile(r"(?<=[)\]}])\s*or\s*(?=[(\[{\\])")
_BRACED_COMMA = re.compile(r"\{,\}")
_FRAC_VARIANTS = re.compile(r"\\[dt]frac(?![a-zA-Z])|\\cfrac(?![a-zA-Z])")
_BINOM_VARIANTS = re.compile(r"\\[dt]binom(?![a-zA-Z])")
_SHORT_FRAC = re.compile(r"\\frac\s*(\d)\s*(\d)")
_SHORT_FRAC_FIRST = re.compile(r"\\frac\s*(\d)\s*\{")
_SHORT_FRAC_SECOND = re.compile(r"\\frac\s*\{([^{}]*)\}\s*(\d)")
_SHORT_SQRT = re.compile(r"\\sqrt\s*(\d+|[a-zA-Z])(?![a-zA-Z])")
_IN_PREFIX = re.compile(r"^\s*[a-zA-Z]\s*\\in\s*")
_TRAILING_PUNCT = re.compile(r"[\s.;:]+$")
_TRAILING_WORD = re.compile(r"(?:^|(?<=[\s}]))([a-zA-Z]+)\.?\s*(?:\^\s*\{?\s*[23]\s*\}?)?\s*$")

# Words that carry mathematical meaning (or scale a number: 5 million is not 5) and so are never
# stripped as units.
_MATH_WORDS = frozenset(
    "pi e i or and sqrt sin cos tan sec csc cot log ln exp arcsin arccos arctan infty inf "
    "infinity no none undefined true false yes hundred thousand million billion trillion dozen".split()
)


def strip_text_commands(text: str) -> str:
    """Return ``text`` with ``\\text{…}``-style commands replaced by their padded contents."""
    for _ in range(4):  # nested \text{\textbf{…}} unwraps from the inside out
        new = _TEXT_COMMANDS.sub(lambda match: " " + match.group(1) + " ", text)
        if new == text:
            break
        text = new
    return text


def strip_unit_words(text: str) -> str:
    """Return ``text`` without trailing unit words (``5 apples`` → ``5``, ``12 sq ft`` → ``12``).

    A word is stripped only when a space separates it from a number, a closed group or
    another strippable word, and never a word with mathematical meaning such as ``or`` or a
    ``\\command``; ``2ab`` and ``3 \\pi`` stay whole.
    """
    words: list[str] = []
    rest = text.rstrip()
    while True:
        match = _TRAILING_WORD.search(rest)
        if match is None:
            break
        word = match.group(1)
        if len(word) < 2 or word.lower() in _MATH_WORDS:
            break
        words.append(word)
        rest = rest[: match.start()].rstrip()
    if words and rest and (rest[-1].isdigit() or rest[-1] in "})"):
        return rest
    return text.rstrip()


def normalize_answer(text: str) -> tuple[str, bool] | None:
    """Return ``(normalised answer, had_percent_sign)``, or None when the answer is refused.

    Refused: longer than ``MAX_ANSWER_CHARS``. The normalised string has ``\\boxed{}``
    unwrapped, ``$``, ``\\left``/``\\right``, spacing commands, degree marks, ``\\text{}``
    wrappers, trailing unit words, thousands separators and trailing punctuation removed,
    and ``\\dfrac``/``\\tfrac`` spelled ``\\frac``.
    """
    if len(text) > MAX_ANSWER_CHARS:
        return None
    text = _DOUBLED_BACKSLASH.sub("", text)
    if "\\boxed" in text or "\\fbox" in text:
        boxes = extract_boxed_answers(text)
        if boxes:
            text = ", ".join(boxes) if len(boxes) > 1 else boxes[0]
    text = _TRAILING_BACKSLASH.sub("", text)  # a cut-off command or a line break after the answer
    text = _CURRENCY.sub(" ", text)
    text = _DOLLAR.sub(" ", text)
    text = _DROP_COMMANDS.sub("", text)
    text = text.translate(_UNICODE)
    text = _GROUPED_DIGITS.sub("", text)
    text = _THIN_SPACING.sub("", text)  # 1\\,000 is one thousand
    text = _SPACING.sub(" ", text)
    text = _DEGREES.sub(" ", text)
    text = _REALS.sub("(-\\\\infty,\\\\infty)", text)
    for pattern, replacement in _RELATION_WORDS:
        text = pattern.sub(lambda _, spelled=replacement: spelled, text)
    text = _TEXT_UNIT.sub("", text)
    text = _UNIT_SYMBOL.sub("", text)
    text = _ATTACHED_UNIT.sub("", text)
    had_percent = _PERCENT.search(text) is not None
    if had_percent:
        text = _PERCENT.sub(" ", text)
    text = strip_text_commands(text)
    text = _FRAC_VARIANTS.sub(r"\\frac", text)
    text = _BINOM_VARIANTS.sub(r"\\binom", text)
    text = _SHORT_FRAC.sub(r"\\frac{\1}{\2}", text)
    text = _SHORT_FRAC_FIRST.sub(r"\\frac{\1}{", text)
    text = _SHORT_FRAC_SECOND.sub(r"\\frac{\1}{\2}", text)
    text = _SHORT_SQRT.sub(r"\\sqrt{\1}", text)
    text = _BRACED_COMMA.sub(",", text)
    text = _TIGHT_OR.sub(" or ", text)
    text = _SERIAL_AND.sub(", ", text)  # "19, 46, and 82": the serial comma's "and" joins nothing more
    text = _IN_PREFIX.sub("", text)
    text = text.replace("\\dots", "").replace("\\ldots", "")
    text = _TRAILING_PUNCT.sub("", text).strip()
    text = text[1:].strip() if text.startswith("=") and not text.startswith("==") else text  # "= 5" states 5
    text = strip_unit_words(text)
    if not any(char in text for char in "([{"):
        text = _THOUSANDS.sub(lambda match: match.group(0).replace(",", ""), text)
    text = _SPACE_THOUSANDS.sub(lambda match: match.group(0).replace(" ", ""), text)
    text = re.sub(r"\s+", " ", text).strip()
    return text, had_percent


def normalize_text(text: str) -> str:
    """Return ``text`` folded for comparing word answers: lower case, no spaces or braces."""
    text = strip_text_commands(text)
    text = re.sub(r"[{}$]|\\(?=[a-zA-Z])", "", text).lower()
    text = re.sub(r"\s*([,;:()\[\]])\s*", r"\1", text)  # [0, 7) and [0,7) are written alike
    return " ".join(text.split()).strip(".")
