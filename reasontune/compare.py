"""``reasontune compare``: side-by-side pass@k / maj@k / avg@k of runs on the benchmarks they share, with paired p-values.

A run is given as any of:

- an eval directory holding ``records.jsonl`` (and ``summary.json``), e.g. ``reasontune eval --output-dir``
  on one dataset: its benchmark is the summary's ``benchmark`` field, else ``eval``;
- an eval output directory holding one such directory per benchmark (``OUT/math500/records.jsonl`` …);
- a training run directory with ``eval/``: its latest evaluation (``eval/final`` where present, else
  the highest ``eval/step-N``), read as either of the above.

Questions are matched across runs by ``question_id`` (falling back to the prompt text); only
questions every run answered count, and how many were left out is reported. The first run is
the baseline: each other run's difference carries a paired interval and p-value over the matched
questions (``estimators.paired_difference``: exact McNemar and Newcombe's interval for 0/1
scores, else the paired bootstrap).

Evaluations with tool calls (``reasontune eval --env python``) add each run's tool use
(``tool_use``: share of trajectories calling the tool, calls per trajectory, error rate,
accuracy with and without a call), over all of that run's records, side by side.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

from reasontune.config import help_field, positional_field
from reasontune.data import DataError
from reasontune.estimators import (
    BOOTSTRAP,
    METRICS,
    WILSON,
    Equivalent,
    bootstrap_interval,
    default_equivalent,
    format_p_value,
    group_samples,
    paired_difference,
    parse_ks,
    proportion_interval,
    question_key,
    question_scores,
)
from reasontune.run_layout import RECORDS_FILE, SUMMARY_FILE, find_evaluations, read_jsonl

# What sampled an evaluation (its summary.json), as the table names them: runs that differ here are not
# comparable as models alone (a greedy 1,024-token evaluation beside a T=0.6 256-token one).
SAMPLING_SETTINGS = (("temperature", "temperature"), ("top_p", "top-p"), ("max_new_tokens", "max new tokens"),
                     ("n", "samples per question"), ("template", "prompt template"), ("env", "environment"))


# ---------------------------------------------------------------------------------------------
# Finding and reading evaluations


def read_eval_records(path: str | Path) -> list[dict[str, Any]]:
    """Returns the records of an evaluation's ``records.jsonl`` (``run_layout.read_jsonl``, strict), each checked to be graded."""
    records = read_jsonl(path, strict=True)
    for number, record in enumerate(records, start=1):
        if "answer_reward" not in record:
            raise DataError(f"{path}: record {number}: field 'answer_reward' missing (not an eval record)")
        # The fields the estimators read, each of the type they need: a crafted file is named, not a traceback.
        for field_name, kinds, required in (("answer_reward", (int, float), True), ("sample", (int,), False),
                                            ("question_id", (str, int), False), ("prompt", (str,), False),
                                            ("answer", (str, type(None)), False)):
            value = record.get(field_name)
            if (required or value is not None) and (not isinstance(value, kinds) or
                                                    (field_name == "answer_reward" and value != value)):
                raise DataError(f"{path}: record {number}: field {field_name!r} must be "
                                f"{' or '.join(k.__name__ for k in kinds)}, got {type(value).__name__}")
        if record.get("question_id") is None and record.get("prompt") is None:
            raise DataError(f"{path}: record {number}: needs 'question_id' or 'prompt' to match questions across runs")
    return records


def sampling_settings(directory: Path) -> dict[str, Any]:
    """Returns how the evaluation in ``directory`` was sampled, from its summary.json: ``SAMPLING_SETTINGS`` keys, those it records.

    ``template`` is the template's name as given, with the prompt text itself under
    ``template_text`` when the summary holds it (two runs may name the same text differently).
    ``env`` is the summary's environment where it names one (``python``: tool calls).
    """
    try:
        summary = json.loads((directory / SUMMARY_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(summary, dict):
        return {}
    sampling = summary.get("sampling") if isinstance(summary.get("sampling"), dict) else {}
    settings = {key: sampling[key] for key, _ in SAMPLING_SETTINGS if key in sampling}
    if isinstance(summary.get("template"), str):
        settings["template"] = summary["template"]
    estimates = summary.get("estimates") if isinstance(summary.get("estimates"), dict) else {}
    if isinstance(estimates.get("prompt"), str):
        settings["template_text"] = estimates["prompt"]
        settings.setdefault("template", "(recorded text)")
    if isinstance(summary.get("env"), str):
        settings["env"] = summary["env"]
    return settings


def sampling_differences(settings: list[dict[str, Any]]) -> list[str]:
    """Returns the names (``SAMPLING_SETTINGS`` keys) of the settings in which the runs differ; a setting some run does not record is not compared."""
    differing = []
    for key, _ in SAMPLING_SETTINGS:
        compared = "template_text" if key == "template" and all("template_text" in one for one in settings) else key
        if all(compared in one for one in settings) and len({json.dumps(one[compared]) for one in settings}) > 1:
            differing.append(key)
    return differing


# ---------------------------------------------------------------------------------------------
# Tool use


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _share(values: list[float], n_bootstrap: int, seed: int) -> dict[str, Any] | None:
    """Returns the mean of ``values`` with its 95% interval (Wilson for 0/1 values, else bootstrap), its n and, for 0/1, its successes."""
    if not values:
        return None
    low, high, method = proportion_interval(values, n_bootstrap, seed)
    figure = {"value": sum(values) / len(values), "low": low, "high": high, "method": method, "n": len(values)}
    if method == WILSON:
        figure["successes"] = int(sum(values))
    return figure


def _per_question(records: list[dict[str, Any]], value: Callable[[dict[str, Any]], float]) -> list[float]:
    """Returns the mean of ``value(record)`` over each question's records (``question_key``; a record naming none is its own)."""
    groups: dict[str, list[float]] = {}
    for position, record in enumerate(records):
        try:
            key = question_key(record)
        except ValueError:
            key = f"record {position}"
        groups.setdefault(key, []).append(value(record))
    return [sum(values) / len(values) for values in groups.values()]


def tool_use(records: list[dict[str, Any]], n_bootstrap: int = 1000, seed: int = 0) -> dict[str, Any] | None:
    """Returns how multi-turn eval records used the tool, with 95% intervals; None when no record carries tool counts.

    A record counts when its ``tool_calls`` and ``tool_errors`` are counts (errors at most
    calls) and its ``answer_reward`` a finite number; the others are ``skipped``. Keys: ``trajectories``,
    ``questions``, ``skipped``, ``with_tool`` (trajectories with a call), ``calls``, ``errors``,
    ``statuses`` (calls by sandbox status, from the turns), and the figures (``{"value", "low",
    "high", "method", "n"}``, plus ``successes`` for a share of 0/1 values; None where n is 0):

    - ``tool_use_rate`` (trajectories with a call) and ``calls_per_trajectory``: the interval is
      over questions (``proportion_interval`` / ``bootstrap_interval`` of each question's share or
      mean), as a question's samples are not independent; with one sample a question it is the
      Wilson interval of the trajectories;
    - ``error_rate`` (calls that did not end cleanly) and ``accuracy_with_tool`` /
      ``accuracy_without_tool`` (answer reward over the trajectories with / without a call):
      ratios whose denominators differ by question, so the interval (Wilson for 0/1 values) is
      over calls / trajectories as if independent: with several samples a question, or several
      calls a trajectory, it is narrower than an interval over questions would be.

    ``seconds_per_call`` is ``{"mean", "median", "max", "n"}`` of the calls whose time is recorded.
    """
    counted = [r for r in records if _count(r.get("tool_calls")) is not None and _count(r.get("tool_errors")) is not None
               and r["tool_errors"] <= r["tool_calls"] and isinstance(r.get("answer_reward"), (int, float))
               and not isinstance(r.get("answer_reward"), bool) and math.isfinite(r["answer_reward"])]
    if not counted:
        return None
    calls, errors = sum(r["tool_calls"] for r in counted), sum(r["tool_errors"] for r in counted)
    statuses: dict[str, int] = {}
    seconds: list[float] = []
    for record in counted:
        turns = record.get("turns") if isinstance(record.get("turns"), list) else []
        for turn in turns:
            if isinstance(turn, dict) and turn.get("role") == "environment" and turn.get("program") is not None:
                status = turn.get("status") if isinstance(turn.get("status"), str) else "unrecorded"
                statuses[status] = statuses.get(status, 0) + 1
                time = turn.get("seconds")
                if isinstance(time, (int, float)) and not isinstance(time, bool) and 0 <= time < float("inf"):
                    seconds.append(float(time))
    with_tool = [float(r["answer_reward"]) for r in counted if r["tool_calls"] > 0]
    without_tool = [float(r["answer_reward"]) for r in counted if r["tool_calls"] == 0]
    shares = _per_question(counted, lambda record: float(record["tool_calls"] > 0))
    low, high, method = proportion_interval(shares, n_bootstrap, seed)
    calls_low, calls_high = bootstrap_interval(_per_question(counted, lambda record: float(record["tool_calls"])),
                                               n_bootstrap, seed)
    return {
        "trajectories": len(counted), "questions": len(shares), "skipped": len(records) - len(counted),
        "with_tool": len(with_tool), "calls": calls, "errors": errors, "statuses": statuses,
        "tool_use_rate": {"value": len(with_tool) / len(counted), "low": low, "high": high, "method": method,
                          "n": len(counted), "successes": len(with_tool)},
        "calls_per_trajectory": {"value": calls / len(counted), "low": calls_low, "high": calls_high,
                                 "method": BOOTSTRAP, "n": len(counted)},
        "error_rate": _share([1.0] * errors + [0.0] * (calls - errors), n_bootstrap, seed),
        "accuracy_with_tool": _share(with_tool, n_bootstrap, seed),
        "accuracy_without_tool": _share(without_tool, n_bootstrap, seed),
        "seconds_per_call": {"mean": statistics.fmean(seconds), "median": statistics.median(seconds),
                             "max": max(seconds), "n": len(seconds)} if seconds else None,
    }


# ---------------------------------------------------------------------------------------------
# The comparison


@dataclass
class Comparison:
    """Returns nothing; the compared runs and one row per (benchmark, metric@k).

    Each row: ``benchmark``, ``metric`` (``pass@1`` …), ``n_questions`` (matched), ``values``
    (one ``{"value", "low", "high", "method"}`` per run) and ``differences`` (one ``paired_difference``
    dict per run after the first, against the first). ``notes`` say what was left out and why.
    ``sampling``: per benchmark, each run's ``sampling_settings``; ``warnings``: benchmarks whose
    runs were sampled differently (their differences are not the models' alone). ``tools``: per
    benchmark where some run called a tool, each run's ``tool_use`` (None for a run without tool counts).
    """

    runs: list[str]
    rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    sampling: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    tools: dict[str, list[dict[str, Any] | None]] = field(default_factory=dict)


def _compare_benchmark(benchmark: str, grouped_runs: list[dict[str, dict]], ks: list[int], metrics: list[str],
                       n_bootstrap: int, seed: int, equivalent: Equivalent | None, comparison: Comparison) -> None:
    shared = [key for key in grouped_runs[0] if all(key in grouped for grouped in grouped_runs[1:])]
    for label, grouped in zip(comparison.runs, grouped_runs):
        if len(grouped) > len(shared):
            comparison.notes.append(f"{benchmark}: {len(grouped) - len(shared)} question(s) of {label} not in every run, left out")
    if not shared:
        comparison.notes.append(f"{benchmark}: no question is shared by every run (no common question_id or prompt text)")
        return
    for k in ks:
        for metric in metrics:
            name = f"{metric}@{k}"
            fewest = min(len(grouped[key]["correct"]) for grouped in grouped_runs for key in shared)
            if fewest < k:
                comparison.notes.append(f"{benchmark}: {name} left out: a run has only {fewest} sample(s) per question")
                continue
            if metric == "maj" and not all(grouped[key]["has_answers"] for grouped in grouped_runs for key in shared):
                comparison.notes.append(f"{benchmark}: {name} left out: records without an extracted 'answer'")
                continue
            scores = [question_scores(metric, k, [grouped[key]["correct"] for key in shared],
                                      [grouped[key]["answers"] for key in shared], equivalent)
                      for grouped in grouped_runs]
            values = []
            for run_scores in scores:
                low, high, method = proportion_interval(run_scores, n_bootstrap, seed)
                values.append({"value": float(run_scores.mean()), "low": low, "high": high, "method": method})
            differences = [paired_difference(scores[0], other, n_bootstrap, seed) for other in scores[1:]]
            comparison.rows.append({"benchmark": benchmark, "metric": name, "n_questions": len(shared),
                                    "values": values, "differences": differences})


def compare_runs(paths: list[str | Path], ks: str | list[int] = (1,), metrics: str | list[str] = METRICS,
                 n_bootstrap: int = 1000, seed: int = 0, equivalent: Equivalent | None = None,
                 labels: list[str] | None = None) -> Comparison:
    """Returns the ``Comparison`` of the runs at ``paths`` (first = baseline) over the benchmarks all of them have.

    ``ks`` (``"1,4"`` or a list) and ``metrics`` (subset of pass, maj, avg) choose the rows;
    ``equivalent`` clusters answers for maj@k (default: the grader's, see
    ``estimators.default_equivalent``).
    """
    if len(paths) < 2:
        raise ValueError(f"compare needs at least two runs, got {len(paths)}")
    if not labels:
        labels = [Path(p).name or str(p) for p in paths]
        labels = labels if len(set(labels)) == len(labels) else [str(p) for p in paths]
    if len(labels) != len(paths):
        raise ValueError(f"{len(labels)} labels for {len(paths)} runs")
    metrics = [m.strip() for m in metrics.split(",")] if isinstance(metrics, str) else list(metrics)
    if unknown := [m for m in metrics if m not in METRICS]:
        raise ValueError(f"unknown metric(s) {', '.join(unknown)}; choose from {', '.join(METRICS)}")
    ks = parse_ks(ks)
    equivalent = equivalent or default_equivalent()
    evaluations = [find_evaluations(path) for path in paths]
    comparison = Comparison(runs=labels, settings={"ks": ks, "metrics": metrics, "n_bootstrap": n_bootstrap,
                                                   "seed": seed, "paths": [str(p) for p in paths]})
    benchmarks = [name for name in evaluations[0] if all(name in found for found in evaluations[1:])]
    for label, found in zip(labels, evaluations):
        if missing := [name for name in found if name not in benchmarks]:
            comparison.notes.append(f"{label}: benchmark(s) {', '.join(missing)} not in every run, left out")
    if not benchmarks:
        raise ValueError("the runs share no benchmark: " + "; ".join(
            f"{label}: {', '.join(found)}" for label, found in zip(labels, evaluations)))
    for benchmark in benchmarks:
        settings = [sampling_settings(found[benchmark]) for found in evaluations]
        if any("env" in one for one in settings):  # a summary naming no environment was written by the single-turn one
            for one in settings:
                one.setdefault("env", "math")
        comparison.sampling[benchmark] = settings
        if differing := sampling_differences(settings):
            names = dict(SAMPLING_SETTINGS)
            comparison.warnings.append(
                f"{benchmark}: the runs were sampled differently ("
                + "; ".join(f"{names[key]} " + " vs ".join(_setting_text(one, key) for one in settings)
                            for key in differing)
                + "): their differences mix the models with how they were sampled; evaluate them alike "
                  "(--eval-temperature, --eval-max-new-tokens, --n-samples, --prompt-template, --env) to compare the "
                  "models")
        records = [read_eval_records(found[benchmark] / RECORDS_FILE) for found in evaluations]
        tools = [tool_use(run_records, n_bootstrap, seed) for run_records in records]
        if any(one is not None for one in tools):
            comparison.tools[benchmark] = tools
        grouped_runs = [group_samples(run_records) for run_records in records]
        _compare_benchmark(benchmark, grouped_runs, ks, metrics, n_bootstrap, seed, equivalent, comparison)
    return comparison


def _setting_text(settings: dict[str, Any], key: str) -> str:
    if key not in settings:
        return "?"
    value = settings[key]
    if key == "template" and "template_text" in settings:
        return f"{value} ({len(settings['template_text'])} chars)"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _percent(figure: dict[str, float]) -> str:
    return f"{100 * figure['value']:5.1f} [{100 * figure['low']:5.1f}, {100 * figure['high']:5.1f}]"


def format_comparison(comparison: Comparison) -> str:
    """Returns the comparison as an aligned text table (percent, 95% intervals, differences against the first run, p-values)."""
    header = ["benchmark", "metric", "questions", *comparison.runs]
    header += [f"{label} - {comparison.runs[0]} (p)" for label in comparison.runs[1:]]
    rows = [header]
    for row in comparison.rows:
        cells = [row["benchmark"], row["metric"], str(row["n_questions"]), *(_percent(v) for v in row["values"])]
        cells += [f"{100 * d['difference']:+5.1f} [{100 * d['low']:+5.1f}, {100 * d['high']:+5.1f}] "
                  f"(p {format_p_value(d['p_value'])})" for d in row["differences"]]
        rows.append(cells)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(r, widths)).rstrip() for r in rows]
    settings = comparison.settings
    methods = sorted({v["method"] for row in comparison.rows for v in row["values"]}
                     | {d["method"] for row in comparison.rows for d in row["differences"]})
    lines.append(f"percent; [95% interval over matched questions: Wilson score and, for differences, Newcombe's "
                 f"paired score interval where every question scores 0 or 1; else percentile bootstrap, "
                 f"{settings.get('n_bootstrap')} resamples, seed {settings.get('seed')}]; p: exact McNemar (0/1 "
                 f"scores) or paired bootstrap, two-sided; used here: {', '.join(methods) or 'none'}")
    lines += [f"note: {note}" for note in comparison.notes]
    for benchmark, settings in comparison.sampling.items():
        differing = set(sampling_differences(settings))
        if not differing:
            continue
        table = [[f"sampling ({benchmark})", *comparison.runs]]
        table += [[f"{label}{' (differs)' if key in differing else ''}", *(_setting_text(one, key) for one in settings)]
                  for key, label in SAMPLING_SETTINGS if any(key in one for one in settings)]  # a row of "?" says nothing
        widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
        lines += ["", *("  ".join(cell.ljust(width) for cell, width in zip(r, widths)).rstrip() for r in table)]
    for benchmark, per_run in comparison.tools.items():
        lines += ["", *_aligned([[f"tool use ({benchmark}, all records)", *comparison.runs],
                                 *([label, *(_tool_text(one, key) for one in per_run)] for key, label in TOOL_LINES)])]
    lines += [f"warning: {warning}" for warning in comparison.warnings]
    return "\n".join(lines)


# The tool-use figures ``format_comparison`` and the report show side by side: (key of ``tool_use``, label).
TOOL_LINES = (("tool_use_rate", "trajectories calling the tool"), ("calls_per_trajectory", "calls per trajectory"),
              ("error_rate", "calls ending in an error"), ("accuracy_with_tool", "accuracy with a call"),
              ("accuracy_without_tool", "accuracy without a call"))


def _aligned(table: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in table]


def tool_figure_text(figure: dict[str, Any] | None, percent: bool = True) -> str:
    """Returns a ``tool_use`` figure as ``2/3 = 66.7% [20.8, 93.9]`` (a count: ``1.33 [0.67, 2]``), or — for None."""
    if not figure:
        return "—"
    if not percent:
        return f"{figure['value']:.3g} [{figure['low']:.3g}, {figure['high']:.3g}]"
    counts = f"{figure['successes']}/{figure['n']} = " if "successes" in figure else f"n {figure['n']}: "
    return f"{counts}{100 * figure['value']:.1f}% [{100 * figure['low']:.1f}, {100 * figure['high']:.1f}]"


def _tool_text(tools: dict[str, Any] | None, key: str) -> str:
    return tool_figure_text(tools.get(key) if tools else None, percent=key != "calls_per_trajectory")


def plot_comparison(comparison: Comparison, path: str | Path) -> Path:
    """Returns ``path`` after drawing the comparison as grouped bars (one group per row, one bar per run, 95% intervals)."""
    from reasontune.plotting import new_axes, save  # lazy: matplotlib, only when a plot is drawn

    rows = comparison.rows
    figure, axes = new_axes("runs compared (bars: 95% intervals over matched questions)",
                            "percent of questions", xlabel="",
                            size=(max(6.0, 1.2 * len(rows) * len(comparison.runs) / 2 + 2), 4.5))
    width = 0.8 / len(comparison.runs)
    for run_index, label in enumerate(comparison.runs):
        xs = [i + (run_index - (len(comparison.runs) - 1) / 2) * width for i in range(len(rows))]
        values = [100 * row["values"][run_index]["value"] for row in rows]
        errors = [[100 * (row["values"][run_index]["value"] - row["values"][run_index]["low"]) for row in rows],
                  [100 * (row["values"][run_index]["high"] - row["values"][run_index]["value"]) for row in rows]]
        axes.bar(xs, values, width=width, yerr=errors, capsize=3, label=label)
    axes.set_xticks(range(len(rows)), [f"{row['benchmark']}\n{row['metric']}" for row in rows])
    axes.set_ylim(0, 100)
    axes.grid(False, axis="x")
    axes.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))  # outside the axes: bars reach 100%
    return save(figure, path)


# ---------------------------------------------------------------------------------------------
# reasontune compare


@dataclass
class CompareConfig:
    """Options of ``reasontune compare``."""

    command: ClassVar[str] = "compare"

    runs: list[str] = positional_field("run directories, eval output directories or eval directories; the first is the baseline")
    labels: list[str] | None = help_field(None, "a name per run for the table and plot (default: directory names)")
    k: str = help_field("1", "comma-separated k values of pass@k, maj@k and avg@k, e.g. 1,4,16")
    metrics: str = help_field("pass,maj,avg", "comma-separated metrics among pass, maj, avg")
    n_bootstrap: int = help_field(1000, "bootstrap resamples for the intervals and the paired p-values")
    seed: int = help_field(0, "seed of the bootstrap")
    output_dir: str = help_field("compare", "directory for comparison.png, comparison.txt and comparison.json")

    def problems(self) -> list[str]:
        """Returns what is wrong with the runs, labels and bootstrap options."""
        problems = []
        if len(self.runs) < 2:
            problems.append("reasontune compare needs at least two runs: reasontune compare RUN_A RUN_B ...")
        if self.n_bootstrap < 1:
            problems.append("--n-bootstrap must be >= 1")
        if self.labels is not None and len(self.labels) != len(self.runs):
            problems.append(f"--labels gives {len(self.labels)} names for {len(self.runs)} runs")
        return problems


def run_compare(config: CompareConfig) -> int:
    """Returns 0 after printing the comparison of ``config.runs`` and writing comparison.{txt,json,png} to ``config.output_dir``."""
    comparison = compare_runs(config.runs, config.k, config.metrics, config.n_bootstrap, config.seed,
                              labels=config.labels)
    text = format_comparison(comparison)
    print(text)
    for warning in comparison.warnings:  # also on stderr: a log that keeps only errors still shows it
        print(f"warning: {warning}", file=sys.stderr)
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "comparison.txt").write_text(text + "\n", encoding="utf-8")
    payload = {"runs": comparison.runs, "rows": comparison.rows, "notes": comparison.notes,
               "sampling": comparison.sampling, "warnings": comparison.warnings, "tools": comparison.tools,
               **comparison.settings}
    (out / "comparison.json").write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    if comparison.rows:
        print(f"wrote {plot_comparison(comparison, out / 'comparison.png')}")
    return 0
