"""The one figure style of every reasontune plot (report, evaluation, compare) and the axis rules they share.

Every figure is a bare matplotlib ``Figure`` drawn with the Agg canvas, so pyplot's global
backend (a user's notebook, a headless server) is left alone.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, MaxNLocator, NullLocator, PercentFormatter, ScalarFormatter

FIGURE_SIZE = (8.0, 4.5)  # inches, at 100 dpi


def new_figure(columns: int = 1, size: tuple[float, float] = FIGURE_SIZE) -> tuple[Figure, list[Axes]]:
    """Returns (figure, axes) with ``columns`` panels side by side, each as wide as ``size`` asks for one figure."""
    figure = Figure(figsize=(size[0] * (1 if columns == 1 else 0.62 * columns), size[1]), dpi=100, layout="constrained")
    return figure, [figure.add_subplot(1, columns, column + 1) for column in range(columns)]


def style_axes(axes: Axes, title: str, ylabel: str, xlabel: str) -> Axes:
    """Returns ``axes`` titled and labelled, with the light grid of every plot."""
    axes.set_title(title)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.grid(True, alpha=0.35)
    return axes


def new_axes(title: str, ylabel: str, xlabel: str = "optimizer step",
             size: tuple[float, float] = FIGURE_SIZE) -> tuple[Figure, Axes]:
    """Returns (figure, axes) in the style of every reasontune plot: 8 x 4.5 in, titled, labelled, light grid."""
    figure, (axes,) = new_figure(1, size)
    return figure, style_axes(axes, title, ylabel, xlabel)


def integer_steps(axes: Axes) -> None:
    """Returns nothing; puts the x ticks on whole numbers (a step 2.5 does not exist).

    Call it after drawing. A single logged step gives a view narrower than one step, where no
    whole number but the step itself fits and the integer locator falls back to fractions:
    such a view is widened to one step either side.
    """
    low, high = axes.get_xlim()
    if high - low < 2:
        middle = round((low + high) / 2)
        axes.set_xlim(middle - 1, middle + 1)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))


def fraction_axis(axes: Axes) -> None:
    """Returns nothing; shows a 0..1 y axis as 0%..100%, with a little room for points on the edges."""
    axes.set_ylim(-0.03, 1.03)
    axes.yaxis.set_major_formatter(PercentFormatter(xmax=1.0))


def powers_of_two_axis(axes: Axes, ks: Sequence[int]) -> None:
    """Returns nothing; a log2 x axis with a tick at each of ``ks``, labelled 1, 2, 4 (not 2^0, 2^1)."""
    axes.set_xscale("log", base=2)
    axes.xaxis.set_major_locator(FixedLocator(sorted(set(ks))))
    axes.xaxis.set_major_formatter(ScalarFormatter())
    axes.xaxis.set_minor_locator(NullLocator())


def log_scale_if_wide(axes: Axes, values: Sequence[float]) -> None:
    """Returns nothing; turns the y axis logarithmic when every finite value is positive and they span over 100x."""
    finite = [v for v in values if math.isfinite(v)]
    if finite and min(finite) > 0 and max(finite) / min(finite) > 100:
        axes.set_yscale("log")


def save(figure: Figure, path: str | Path) -> Path:
    """Returns ``path`` after writing ``figure`` there as PNG (parent directories created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path
