"""Plots of an evaluation directory: pass@k against k, accuracy by response length, lengths by outcome.

Each plot has a pure function computing its numbers (tested) and a drawing function writing a
PNG with matplotlib's Agg canvas (a bare ``Figure``: pyplot's global backend is left alone).
Records are ``reasontune eval``'s per-sample records (``answer_reward``, ``category``,
``response_tokens``, ``sample``, ``question_id`` or ``prompt``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from reasontune.estimators import group_samples, proportion_interval, question_scores
from reasontune.report import new_axes  # the one figure style of every plot
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


def _save(figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path


def plot_pass_at_k(records_by_benchmark: Mapping[str, Sequence[Mapping[str, Any]]], out_dir: str | Path,
                   n_bootstrap: int = 200, seed: int = 0) -> Path:
    """Returns the path of ``pass_at_k.png`` in ``out_dir``: pass@k against k (log2 axis), one line per benchmark."""
    figure, axes = new_axes("pass@k (unbiased; band: 95% bootstrap over questions)", "pass@k (%)", xlabel="k (samples)")
    for name, records in records_by_benchmark.items():
        points = pass_at_k_curve(records, n_bootstrap=n_bootstrap, seed=seed)
        if not points:
            continue
        ks = [p["k"] for p in points]
        axes.plot(ks, [100 * p["value"] for p in points], marker="o", label=name)
        axes.fill_between(ks, [100 * p["low"] for p in points], [100 * p["high"] for p in points], alpha=0.2)
    axes.set_xscale("log", base=2)
    axes.set_ylim(0, 100)
    axes.legend()
    return _save(figure, Path(out_dir) / "pass_at_k.png")


def plot_accuracy_by_length(records: Sequence[Mapping[str, Any]], out_dir: str | Path, name: str = "",
                            bins: int = 10) -> Path:
    """Returns the path of ``accuracy_by_length[_NAME].png``: accuracy per response-length bin, sample counts on the bars."""
    figure, axes = new_axes(f"accuracy by response length{f' ({name})' if name else ''}", "accuracy (%)",
                            xlabel="response tokens")
    for b in accuracy_by_length(records, bins):
        axes.bar((b["low"] + b["high"]) / 2, 100 * b["accuracy"], width=(b["high"] - b["low"]) * 0.9, color="tab:blue")
        axes.annotate(str(b["count"]), ((b["low"] + b["high"]) / 2, 100 * b["accuracy"]), ha="center", va="bottom",
                      fontsize=8)
    axes.set_ylim(0, 105)
    return _save(figure, Path(out_dir) / f"accuracy_by_length{f'_{name}' if name else ''}.png")


def plot_length_by_category(records: Sequence[Mapping[str, Any]], out_dir: str | Path, name: str = "",
                            bins: int = 30) -> Path:
    """Returns the path of ``length_by_category[_NAME].png``: response-length histograms of the three outcomes."""
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
    return _save(figure, Path(out_dir) / f"length_by_category{f'_{name}' if name else ''}.png")


def write_eval_plots(records_by_benchmark: Mapping[str, Sequence[Mapping[str, Any]]], out_dir: str | Path,
                     n_bootstrap: int = 200, seed: int = 0) -> list[Path]:
    """Returns the PNGs written into ``out_dir``: the pass@k plot, then per benchmark accuracy-by-length and length-by-outcome."""
    written = [plot_pass_at_k(records_by_benchmark, out_dir, n_bootstrap, seed)]
    for name, records in records_by_benchmark.items():
        if records:
            written.append(plot_accuracy_by_length(records, out_dir, name))
            written.append(plot_length_by_category(records, out_dir, name))
    return written
