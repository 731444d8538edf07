"""The report's tool sections: how an evaluation with ``--env python`` used the tool, a few trajectories turn by turn, a run's tool metrics.

- An evaluation whose records carry tool counts (``reasontune eval --env python``) gets a
  "Tool use" table per benchmark (``compare.tool_use``: trajectories calling the tool, calls per
  trajectory, calls ending in an error, seconds per call, accuracy with and without a call,
  each share with its Wilson interval and its counts) and "Tool trajectories": a few records
  shown turn by turn (each model turn, each program with its status and time, its output).
- A training run gets a table of the tool metrics its metrics lines log (``is_tool_metric``: a
  key one of whose underscore-separated words is ``tool``, as GRPO / EI with ``--env python``
  log ``rollouts.tool_statistics``: ``tool_calls``, ``tool_call_rate``, ``tool_error_rate``,
  ``mean_tool_calls``, ``accuracy_with_tool``, ``accuracy_without_tool``; the curves are in
  ``plots.tool_plots``) and the tool use of its last evaluation with tool calls.
- A comparison gets each run's tool use side by side (``Comparison.tools``).

Programs, outputs and model turns are untrusted text: they go into ``Code`` blocks, which the
renderers escape (HTML) or fence (Markdown); nothing here escapes or trusts them.
"""

from __future__ import annotations

from numbers import Number
from typing import Any

from reasontune.compare import TOOL_LINES, Comparison, tool_figure_text, tool_use
from reasontune.report.blocks import Block, Card, Code, Grid, KeyValues, Section, Text, clip_head, clip_tail, format_number
from reasontune.report.reading import EvalResult, RunData, number, outcome

TOOL_WORD = "tool"
"""A metrics-line key is a tool metric when one of its ``_``-separated words is this: tabled and plotted."""
SHARE_WORDS = ("rate", "accuracy", "fraction", "share")
TRAJECTORIES_SHOWN = 4
TEXT_MAX_CHARS = 1500
PROMPT_TAIL_CHARS = 300
TURNS_SHOWN = 12
OUTCOME_TEXT = {"correct": "correct", "formatted_wrong": "formatted but wrong", "unformatted": "unformatted"}
INTERVALS = ("Shares in percent with their counts (successes/n) and 95% intervals. Trajectories calling the tool and "
             "calls per trajectory: over questions, as the samples of one question are not independent (with one "
             "sample a question, the Wilson score interval of the trajectories; else a percentile bootstrap over "
             "questions). Calls ending in an error and accuracy with or without a call: the Wilson score interval over "
             "calls or trajectories, which treats them as independent, so with several samples a question (or calls a "
             "trajectory) it is narrower than an interval over questions would be. Accuracy is the mean answer reward.")


# ---------------------------------------------------------------------------------------------
# Which records and metrics are about the tool


def has_tool_counts(records: list[dict[str, Any]] | None) -> bool:
    """Returns whether any record carries tool counts (written by an evaluation with a tool environment)."""
    return any(isinstance(record, dict) and "tool_calls" in record for record in records or [])


def is_tool_metric(key: str) -> bool:
    """Returns whether a metrics-line key is about the tool (``tool_call_rate``, ``mean_tool_calls``, ``accuracy_with_tool`` …)."""
    return TOOL_WORD in key.split("_")


def is_share(key: str, values: list[float]) -> bool:
    """Returns whether a metric is a share (its name says rate, accuracy, fraction or share and every value is in [0, 1])."""
    return any(word in key.split("_") for word in SHARE_WORDS) and all(0.0 <= value <= 1.0 for value in values)


def tool_metric_keys(rows: list[dict[str, Any]]) -> list[str]:
    """Returns the tool metrics (``is_tool_metric``) that hold a number in some row, in the order they first appear."""
    return list(dict.fromkeys(key for row in rows for key, value in row.items()
                              if is_tool_metric(key) and number(value) is not None))


# ---------------------------------------------------------------------------------------------
# The tool-use table


def _seconds_text(seconds: dict[str, Any] | None) -> str:
    if not seconds:
        return "—"
    return (f"mean {seconds['mean']:.3f} s, median {seconds['median']:.3f} s, max {seconds['max']:.3f} s "
            f"({seconds['n']} calls)")


def tool_use_grid(labels: list[str], per_column: list[dict[str, Any] | None], corner: str = "") -> Grid:
    """Returns the tool use of each column (a benchmark, a run) side by side: counts, shares with intervals, times, statuses."""
    def row(label: str, text) -> list[str]:
        return [label, *(text(one) if one else "—" for one in per_column)]

    rows = [row("trajectories", lambda one: format_number(one["trajectories"])),
            row("questions", lambda one: format_number(one["questions"]) if one.get("questions") is not None else "—"),
            row("tool calls", lambda one: format_number(one["calls"]))]
    rows += [row(label, lambda one, key=key: tool_figure_text(one.get(key), percent=key != "calls_per_trajectory"))
             for key, label in TOOL_LINES]
    rows += [row("seconds per call", lambda one: _seconds_text(one.get("seconds_per_call"))),
             row("calls by status", lambda one: ", ".join(f"{status} {count}" for status, count in
                                                           sorted(one["statuses"].items())) or "—")]
    if any(one and one.get("skipped") for one in per_column):
        rows.append(row("records without tool counts (left out)", lambda one: format_number(one["skipped"])))
    return Grid([corner, *labels], rows)


# ---------------------------------------------------------------------------------------------
# Trajectories, turn by turn


def pick_trajectories(records: list[dict[str, Any]], count: int = TRAJECTORIES_SHOWN) -> list[dict[str, Any]]:
    """Returns up to ``count`` records with turns, taken in turn from: correct with a call, a failing call, wrong with a call, no call."""
    with_turns = [r for r in records if isinstance(r.get("turns"), list) and isinstance(r.get("tool_calls"), int)
                  and outcome(r) is not None]
    errors = [r for r in with_turns if isinstance(r.get("tool_errors"), int) and r["tool_errors"] > 0]
    called = [r for r in with_turns if r["tool_calls"] > 0]
    groups = [[r for r in called if outcome(r) == "correct"], errors, [r for r in called if outcome(r) != "correct"],
              [r for r in with_turns if r["tool_calls"] == 0], called]
    picked: list[dict[str, Any]] = []
    while len(picked) < count and any(groups):
        for group in groups:
            while group and any(group[0] is chosen for chosen in picked):
                group.pop(0)
            if group and len(picked) < count:
                picked.append(group.pop(0))
    return picked


def _text(value: Any) -> str:
    return clip_head(value if isinstance(value, str) else "" if value is None else str(value), TEXT_MAX_CHARS)


def _turn_blocks(turns: list[Any]) -> list[Block]:
    blocks: list[Block] = []
    model_turns = calls = 0
    for turn in turns[:TURNS_SHOWN]:
        if not isinstance(turn, dict):
            blocks.append(Text("A turn that is not a JSON object (left out).", empty=True))
        elif turn.get("role") == "model":
            model_turns += 1
            tokens = turn.get("tokens")
            how = [f"{tokens} tokens" if isinstance(tokens, int) else "",
                   f"ended by {turn['finish_reason']}" if isinstance(turn.get("finish_reason"), str) else ""]
            detail = ", ".join(part for part in how if part)
            blocks.append(Code(f"Model turn {model_turns}" + (f" ({detail})" if detail else ""), _text(turn.get("text"))))
        elif turn.get("program") is not None:
            calls += 1
            seconds = number(turn.get("seconds"))
            status = turn.get("status") if isinstance(turn.get("status"), str) else "status not recorded"
            blocks.append(Code(f"Program {calls} ({status}" + (f", {seconds:.3f} s)" if seconds is not None else ")"),
                               _text(turn.get("program"))))
            blocks.append(Code(f"Output {calls}", _text(turn.get("output")).rstrip("\n") or "(nothing printed)"))
        else:
            blocks.append(Code("Environment turn", _text(turn.get("text"))))
    if len(turns) > TURNS_SHOWN:
        blocks.append(Text(f"… {len(turns) - TURNS_SHOWN} more turns (records.jsonl has them all).", empty=True))
    return blocks


def trajectory_card(record: dict[str, Any], source: str) -> Card:
    """Returns one record's trajectory as a card: how it ended, the end of its prompt, then every turn (programs, outputs, times)."""
    kind = outcome(record)
    calls, errors = record["tool_calls"], record.get("tool_errors")
    failing = f", {errors} failing" if isinstance(errors, int) and errors else ""
    heading = f"{OUTCOME_TEXT[kind]}, {calls} tool call{'s' if calls != 1 else ''}{failing} ({source})"
    truth = record.get("ground_truth")
    facts = [("ground truth", truth if isinstance(truth, str) else str(truth)),
             ("answer graded", "none extracted" if record.get("answer") is None else str(record.get("answer"))),
             ("rewards", ", ".join(f"{name} {format_number(value)}" for name in ("format_reward", "answer_reward", "reward")
                                   if (value := number(record.get(name))) is not None) or "none recorded")]
    for key, label in (("finish_reason", "ended by"), ("response_tokens", "model tokens")):
        if isinstance(record.get(key), (str, Number)) and not isinstance(record.get(key), bool):
            facts.append((label, str(record[key])))
    prompt = record.get("prompt")
    return Card(heading, [KeyValues(facts), Code("Prompt (end)", clip_tail(prompt if isinstance(prompt, str) else "",
                                                                           PROMPT_TAIL_CHARS)),
                          *_turn_blocks(record["turns"])], good=kind == "correct")


# ---------------------------------------------------------------------------------------------
# Sections of each kind of directory


def _with_tool_counts(results: list[EvalResult]) -> list[EvalResult]:
    return [result for result in results if has_tool_counts(result.records)]


def evaluation_tool_sections(run: RunData) -> list[Section]:
    """Returns an evaluation's "Tool use" and "Tool trajectories" sections, or none when no benchmark has tool counts."""
    results = _with_tool_counts(run.evals)
    if not results:
        return []
    grid = tool_use_grid([result.name or "eval" for result in results],
                         [tool_use(result.records) for result in results])
    cards: list[Block] = []
    for result in results:
        cards += [trajectory_card(record, result.name or "this evaluation") for record in pick_trajectories(result.records)]
    return [Section("Tool use", [grid, Text(INTERVALS)]),
            Section("Tool trajectories", cards or [Text("No record holds its turns.", empty=True)])]


def training_tool_sections(run: RunData) -> list[Section]:
    """Returns a training run's "Tool use" section (its ``tool_`` metrics, its last evaluation's tool use), or none without either."""
    keys = tool_metric_keys(run.train)
    blocks: list[Block] = []
    if keys:
        rows = []
        for key in keys:
            points = [(row["step"], value) for row in run.train if (value := number(row.get(key))) is not None]
            values = [value for _, value in points]
            rows.append([key, f"{format_number(points[0][1])} (step {points[0][0]})",
                         f"{format_number(points[-1][1])} (step {points[-1][0]})",
                         format_number(min(values)), format_number(max(values))])
        blocks += [Grid(["metric", "first", "last", "min", "max"], rows),
                   Text(f"Every tool metric (a name with the word {TOOL_WORD!r}) of the training metrics, per "
                        f"{run.step_unit}; their curves are under Curves.")]
    results = _with_tool_counts(run.evals)
    if results:
        last = results[-1]
        blocks += [Text(f"Tool use of the evaluation at step {last.step}:"),
                   tool_use_grid([f"step {last.step}"], [tool_use(last.records)]), Text(INTERVALS)]
    return [Section("Tool use", blocks)] if blocks else []


def comparison_tool_sections(comparison: Comparison) -> list[Section]:
    """Returns the compared runs' tool use side by side, one table per benchmark, or none when no run called a tool."""
    if not comparison.tools:
        return []
    blocks: list[Block] = []
    for benchmark, per_run in comparison.tools.items():
        blocks.append(tool_use_grid(comparison.runs, per_run, corner=benchmark))
    blocks.append(Text("Over all records of each run (not only the matched questions). " + INTERVALS))
    return [Section("Tool use", blocks)]
