"""The report page's building blocks: sections of plain-text blocks (tables, lists, figures, samples, code), and how numbers are written.

``pages`` builds a ``Page`` of these for each kind of directory and renders it as HTML and as
Markdown; ``tools`` builds the tool-use blocks. Blocks hold plain, unescaped text: escaping is
the renderers' job, so no builder can forget it.
"""

from __future__ import annotations

import dataclasses
import math
from numbers import Number
from typing import Any, Union

from reasontune.report.reading import number


# ---------------------------------------------------------------------------------------------
# A page: sections of plain-text blocks


@dataclasses.dataclass
class Text:
    """A paragraph; ``empty`` marks a "nothing here yet" line, ``notice`` one the reader must not miss."""

    text: str
    empty: bool = False
    notice: bool = False


@dataclasses.dataclass
class KeyValues:
    """A two-column table: (label, value) rows."""

    rows: list[tuple[str, str]]


@dataclasses.dataclass
class Grid:
    """A table with a header row; each row's first cell labels it."""

    headers: list[str]
    rows: list[list[str]]


@dataclasses.dataclass
class Bullets:
    items: list[str]
    lead: str = ""


@dataclasses.dataclass
class Notice:
    """A highlighted box: a heading line and its items (skipped input, warnings)."""

    heading: str
    items: list[str]


@dataclasses.dataclass
class Figures:
    """PNG files beside the page: (file name, caption)."""

    plots: list[tuple[str, str]]


@dataclasses.dataclass
class FullConfig:
    """The resolved config as JSON; only the HTML page carries it (the Markdown summary keeps to the highlights)."""

    text: str


@dataclasses.dataclass
class Sample:
    """One generation shown in full: its outcome, where it comes from, the end of its prompt, its response."""

    outcome: str
    source: str
    prompt_tail: str
    response: str
    ground_truth: str
    rewards: str
    length: Any


@dataclasses.dataclass
class Code:
    """Untrusted text shown verbatim (a program, its output, a model turn) under a label."""

    label: str
    text: str


@dataclasses.dataclass
class Card:
    """A framed group of blocks under a heading (one trajectory); ``good`` colours its edge as correct, False as not, None plain."""

    heading: str
    blocks: list["Block"]
    good: bool | None = None


Block = Union[Text, KeyValues, Grid, Bullets, Notice, Figures, FullConfig, Sample, Code, Card]


@dataclasses.dataclass
class Section:
    title: str
    blocks: list[Block]


@dataclasses.dataclass
class Page:
    title: str
    location: str
    notices: list[Block]
    sections: list[Section]


# ---------------------------------------------------------------------------------------------
# Formatting numbers


def format_number(value: Any) -> str:
    """Returns a measurement as text: integers with thousands separators, floats to 4 significant digits."""
    if isinstance(value, bool) or not isinstance(value, Number):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if not math.isfinite(value):
        return str(value)
    if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e6):
        return f"{value:.3e}"
    return f"{value:.4g}"


def format_rate(value: Any) -> str:
    """Returns a 0..1 fraction as a percentage with one decimal, or — when it is not a number."""
    rate = number(value)
    return "—" if rate is None else f"{100 * rate:.1f}%"


def format_figure(figure: Any) -> str:
    """Returns an estimate ``{"value", "low", "high"}`` as ``45.0% [40.1, 50.2]``, or — when it is not one."""
    if not (isinstance(figure, dict) and all(number(figure.get(key)) is not None for key in ("value", "low", "high"))):
        return "—"
    return f"{100 * figure['value']:.1f}% [{100 * figure['low']:.1f}, {100 * figure['high']:.1f}]"


def format_duration(seconds: float) -> str:
    """Returns seconds as H:MM:SS."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


def clip_tail(text: str, limit: int) -> str:
    """Returns the last ``limit`` characters of ``text``, "…" before them when it was cut."""
    return text if len(text) <= limit else "…" + text[-limit:]


def clip_head(text: str, limit: int) -> str:
    """Returns the first ``limit`` characters of ``text``, saying how many more there were when it was cut."""
    return text if len(text) <= limit else text[:limit] + f"… ({len(text) - limit} more characters)"
