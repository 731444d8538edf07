"""Plots of an evaluation directory: pass@k against k, accuracy by response length, lengths by outcome.

Each plot has a pure function computing its numbers (tested) and a drawing function writing a
PNG in the one figure style of ``reasontune.plotting``. A pass@k "curve" of one k (one sample per
question) is one dot: it is left to the tables, which state it as a number.
Records are ``reasontune eval``'s per-sample records (``answer_reward``, ``category``,
``response_tokens``, ``sample``, ``question_id`` or ``prompt``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

from reasontune.estimators import group_samples, proportion_interval, question_scores
from reasontune.plotting import new_axes, powers_of_two_axis, save
from reasontune.rollouts import CATEGORIES  # the one definition of the outcome categories


def curve_ks(n: int) -> list[int]:
    """Returns the k values of a pass@k curve for n samples: powers of two below n, then n."""
    ks, k = [], 1
    while k < n:
        ks.append(k)
        k *= 2
    return ks + [n]


def pass_at_k_curve(records: Sequence[Mapping[str, Any]], ks: Sequence[int] | None = None, n_bootstrap: int = 200,
                    seed: int = 0) -> list[dict[str, float]]:
    """Returns ``[{"k", "value", "low", "high"}]``: unbiased pass@k over questions with its 95% interval (``proportion_interval``), per k.

    ``ks`` defaults to ``curve_ks`` of the smallest sample count of any question.
    """
    correct = [g["correct"] for g in group_samples(records).values()]
    if not correct:
        return []
    ks = list(ks) if ks is not None else curve_ks(min(len(flags) for flags in correct))
    points = []
    for k in ks:
        values = question_scores("pass", k, correct)
        low, high, _ = proportion_interval(values, n_bootstrap, seed)
        points.append({"k": k, "value": float(values.mean()), "low": low, "high": high})
    return points


def accuracy_by_length(records: Sequence[Mapping[str, Any]], bins: int = 10) -> list[dict[str, float]]:
    """Returns ``[{"low", "high", "count", "accuracy"}]`` over equal-width bins of ``response_tokens`` (empty bins left out).

    Bins span [0, longest response]; the last bin includes its upper edge.
    """
    lengths = np.array([r["response_tokens"] for r in records], dtype=np.float64)
    correct = np.array([float(r["answer_reward"]) >= 1.0 for r in records], dtype=np.float64)
    if lengths.size == 0:
        return []
    edges = np.linspace(0.0, max(float(lengths.max()), 1.0), bins + 1)
    which = np.clip(np.searchsorted(edges, lengths, side="right") - 1, 0, bins - 1)
    result = []
    for b in range(bins):
        members = which == b
        if members.any():
            result.append({"low": float(edges[b]), "high": float(edges[b + 1]), "count": int(members.sum()),
                           "accuracy": float(correct[members].mean())})
    return result


def lengths_by_category(records: Sequence[Mapping[str, Any]]) -> dict[str, list[int]]:
    """Returns ``{category: [response_tokens]}`` for correct, formatted_wrong and unformatted (every category present)."""
    result: dict[str, list[int]] = {name: [] for name in CATEGORIES}
    for record in records:
        if record["category"] not in result:
            raise ValueError(f"record of question {record.get('index')!r} has unknown category {record['category']!r}")
        result[record["category"]].append(int(record["response_tokens"]))
    return result


def pass_at_k_figure(records_by_benchmark: Mapping[str, Sequence[Mapping[str, Any]]], n_bootstrap: int = 200,
                     seed: int = 0) -> Figure | None:
    """Returns pass@k against k (log2 axis, one line per benchmark, 95% interval band), or None when no benchmark has several k.

    One dot is not a curve: with a single k the tables give pass@k as a number. A one-k
    benchmark beside curves is a dot with its interval, its value in the legend.
    """
    curves = {name: points for name, records in records_by_benchmark.items()
              if (points := pass_at_k_curve(records, n_bootstrap=n_bootstrap, seed=seed))}
    if not any(len(points) > 1 for points in curves.values()):
        return None
    figure, axes = new_axes("pass@k (unbiased; band: 95% interval over questions)", "pass@k (%)", xlabel="k (samples)")
    for name, points in curves.items():
        ks = [p["k"] for p in points]
        values = [100 * p["value"] for p in points]
        if len(points) == 1:
            axes.errorbar(ks, values, yerr=[[values[0] - 100 * points[0]["low"]], [100 * points[0]["high"] - values[0]]],
                          marker="o", capsize=3, label=f"{name}: pass@{ks[0]} {values[0]:.1f}%")
            continue
        axes.plot(ks, values, marker="o", label=name)
        axes.fill_between(ks, [100 * p["low"] for p in points], [100 * p["high"] for p in points], alpha=0.2)
    powers_of_two_axis(axes, [p["k"] for points in curves.values() for p in points])
    axes.set_ylim(0, 100)
    axes.legend()
    return figure


def plot_pass_at_k(records_by_benchmark: Mapping[str, Sequence[Mapping[str, Any]]], out_dir: str | Path,
                   n_bootstrap: int = 200, seed: int = 0) -> Path | None:
    """Returns the path of ``pass_at_k.png`` in ``out_dir`` (``pass_at_k_figure``), or None, writing nothing, when there is one k."""
    figure = pass_at_k_figure(records_by_benchmark, n_bootstrap, seed)
    return None if figure is None else save(figure, Path(out_dir) / "pass_at_k.png")


def accuracy_by_length_figure(records: Sequence[Mapping[str, Any]], name: str = "", bins: int = 10) -> Figure:
    """Returns accuracy per response-length bin as bars, the sample count on each."""
    figure, axes = new_axes(f"accuracy by response length{f' ({name})' if name else ''}", "accuracy (%)",
                            xlabel="response tokens")
    for b in accuracy_by_length(records, bins):
        axes.bar((b["low"] + b["high"]) / 2, 100 * b["accuracy"], width=(b["high"] - b["low"]) * 0.9, color="tab:blue")
        axes.annotate(str(b["count"]), ((b["low"] + b["high"]) / 2, 100 * b["accuracy"]), ha="center", va="bottom",
                      fontsize=8)
    axes.set_ylim(0, 105)
    return figure


def plot_accuracy_by_length(records: Sequence[Mapping[str, Any]], out_dir: str | Path, name: str = "",
                            bins: int = 10) -> Path:
    """Returns the path of ``accuracy_by_length[_NAME].png`` (``accuracy_by_length_figure``) in ``out_dir``."""
    return save(accuracy_by_length_figure(records, name, bins),
                Path(out_dir) / f"accuracy_by_length{f'_{name}' if name else ''}.png")


def length_by_category_figure(records: Sequence[Mapping[str, Any]], name: str = "", bins: int = 30) -> Figure:
    """Returns response-length histograms of the three outcomes, each labelled with its count."""
    figure, axes = new_axes(f"response length by outcome{f' ({name})' if name else ''}", "samples",
                            xlabel="response tokens")
    groups = lengths_by_category(records)
    longest = max((max(v) for v in groups.values() if v), default=1)
    edges = np.linspace(0, max(longest, 1), bins + 1)
    colors = {"correct": "tab:green", "formatted_wrong": "tab:orange", "unformatted": "tab:red"}
    for category, lengths in groups.items():
        if lengths:
            axes.hist(lengths, bins=edges, alpha=0.5, color=colors[category], label=f"{category} ({len(lengths)})")
    axes.legend()
    return figure


def plot_length_by_category(records: Sequence[Mapping[str, Any]], out_dir: str | Path, name: str = "",
                            bins: int = 30) -> Path:
    """Returns the path of ``length_by_category[_NAME].png`` (``length_by_category_figure``) in ``out_dir``."""
    return save(length_by_category_figure(records, name, bins),
                Path(out_dir) / f"length_by_category{f'_{name}' if name else ''}.png")


def write_eval_plots(records_by_benchmark: Mapping[str, Sequence[Mapping[str, Any]]], out_dir: str | Path,
                     n_bootstrap: int = 200, seed: int = 0) -> list[Path]:
    """Returns the PNGs written into ``out_dir``: the pass@k plot (when some benchmark has several k), then per benchmark accuracy-by-length and length-by-outcome."""
    pass_at_k = plot_pass_at_k(records_by_benchmark, out_dir, n_bootstrap, seed)
    written = [pass_at_k] if pass_at_k is not None else []
    for name, records in records_by_benchmark.items():
        if records:
            written.append(plot_accuracy_by_length(records, out_dir, name))
            written.append(plot_length_by_category(records, out_dir, name))
    return written
