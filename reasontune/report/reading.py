"""Reading what the report shows: a training run, an evaluation or a comparison directory, tolerantly.

A malformed line or file is skipped and named in ``RunData.problems`` (the page lists them), a
missing piece is left empty; nothing here raises on a damaged directory. What kind of
directory it is comes from what it holds and from the ``command`` its config.json records.
"""

from __future__ import annotations

import dataclasses
import json
import re
from numbers import Number
from pathlib import Path
from typing import Any

from reasontune.compare import Comparison
from reasontune.rollouts import CATEGORIES, category
from reasontune.run_layout import (CHECKPOINT_NAME, COMPARISON_FILES, CONFIG_FILE, EVAL_DIR, EVAL_STEP_NAME, FINAL_DIR,
                                   METRICS_FILE, RECORDS_FILE, REPORT_DIR, SUMMARY_FILE, read_jsonl, recorded_command)

COMPARISON_FILE = next(name for name in COMPARISON_FILES if name.endswith(".json"))
TRAINING_COMMANDS = ("sft", "ei", "grpo")
STEP_UNIT = {"sft": "optimizer step", "ei": "EI step (sample → grade → SFT)", "grpo": "GRPO step (one rollout batch)",
             "run": "step", "eval": "evaluation", "compare": "comparison"}


@dataclasses.dataclass
class EvalResult:
    """One evaluation: its numbers (from metrics.jsonl and/or summary.json) and its records.

    ``step`` orders a training run's evaluations; ``name`` is the benchmark of one directory
    of ``reasontune eval``'s output ("" for a single, unnamed one).
    """

    step: int
    values: dict[str, Any] = dataclasses.field(default_factory=dict)
    summary: dict[str, Any] | None = None
    directory: Path | None = None
    records: list[dict[str, Any]] | None = None
    name: str = ""


@dataclasses.dataclass
class RunData:
    """Everything the report shows, read tolerantly from a run, evaluation or comparison directory."""

    run_dir: Path
    config: dict[str, Any] | None = None
    train: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    evals: list[EvalResult] = dataclasses.field(default_factory=list)
    data: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    events: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    problems: list[str] = dataclasses.field(default_factory=list)
    checkpoints: list[str] = dataclasses.field(default_factory=list)
    evaluation_only: bool = False  # written by reasontune eval, not by a training run
    comparison: Comparison | None = None  # written by reasontune compare

    @property
    def command(self) -> str | None:
        """Returns the command that wrote the directory as its config.json records it, or None."""
        return recorded_command(self.config)

    @property
    def kind(self) -> str:
        """Returns ``sft``, ``ei``, ``grpo``, ``eval``, ``compare``, or ``run`` (a training run whose config names no trainer)."""
        if self.comparison is not None:
            return "compare"
        if self.evaluation_only:
            return "eval"
        return self.command if self.command in TRAINING_COMMANDS else "run"

    @property
    def step_unit(self) -> str:
        """Returns what one step on the x axis is for this kind of directory."""
        return STEP_UNIT[self.kind]


# ---------------------------------------------------------------------------------------------
# Files


def read_json_object(path: Path, problems: list[str], label: str) -> dict[str, Any] | None:
    """Returns the JSON object in ``path``, or None with the reason in ``problems``."""
    try:
        value = json.loads(path.read_text(encoding="utf-8", errors="replace"))
    except json.JSONDecodeError as error:
        problems.append(f"{label} not read: not valid JSON ({error.msg} at line {error.lineno})")
        return None
    except (RecursionError, ValueError):
        problems.append(f"{label} not read: not valid JSON (nested too deeply, or a number too long)")
        return None
    if not isinstance(value, dict):
        problems.append(f"{label} not read: expected a JSON object")
        return None
    return value


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _step_of(name: str, pattern: re.Pattern) -> int | None:
    match = pattern.fullmatch(name)
    return int(match.group(1)) if match else None


# ---------------------------------------------------------------------------------------------
# Directories


def read_run(run_dir: str | Path) -> RunData:
    """Returns the contents of a run, evaluation or comparison directory; unreadable pieces are listed in ``problems``."""
    run_dir = Path(run_dir)
    run = RunData(run_dir=run_dir)
    if (run_dir / CONFIG_FILE).is_file():
        run.config = read_json_object(run_dir / CONFIG_FILE, run.problems, CONFIG_FILE)
    if (run_dir / COMPARISON_FILE).is_file():
        run.comparison = read_comparison(run_dir / COMPARISON_FILE, run.problems)
        if run.comparison is not None:
            return run

    evals: dict[int, EvalResult] = {}
    metrics = run_dir / METRICS_FILE
    if metrics.is_file():
        train_by_step: dict[int, dict[str, Any]] = {}
        for record in read_jsonl(metrics, strict=False, problems=run.problems):
            kind, step = record.get("kind"), _as_int(record.get("step"))
            if kind == "train" and step is not None:
                # A resumed run that was not truncated repeats steps; the later line is the run that went on.
                train_by_step[step] = record
            elif kind == "eval" and step is not None:
                result = evals.setdefault(step, EvalResult(step=step))
                result.values.update(record)
                if isinstance(record.get("dir"), str):
                    result.directory = run_dir / record["dir"]
            elif kind == "data":
                run.data.append({k: v for k, v in record.items() if k not in ("kind", "step")})
            elif kind == "event":
                run.events.append(record)
        run.train = [train_by_step[step] for step in sorted(train_by_step)]

    eval_root = run_dir / EVAL_DIR
    if eval_root.is_dir():
        for directory in eval_root.iterdir():
            step = _step_of(directory.name, EVAL_STEP_NAME)
            if step is not None and directory.is_dir():
                result = evals.setdefault(step, EvalResult(step=step))
                if result.directory is None or not result.directory.is_dir():
                    result.directory = directory
    if not evals and not metrics.is_file() and run.command not in TRAINING_COMMANDS:
        # reasontune eval's output: one evaluation here, or one per benchmark below.
        for directory in [run_dir] + sorted(d for d in run_dir.iterdir() if d.is_dir() and d.name != REPORT_DIR):
            if (directory / SUMMARY_FILE).is_file() or (directory / RECORDS_FILE).is_file():
                evals[len(evals)] = EvalResult(step=len(evals), directory=directory,
                                               name="" if directory == run_dir else directory.name)
                run.evaluation_only = True
    for result in evals.values():
        _read_eval_directory(result, run, run_dir)
    run.evals = [evals[step] for step in sorted(evals)]

    # Every checkpoint directory is listed, a partial one too: the page shows what is on disk.
    checkpoints = [(step, path.name) for path in run_dir.glob("checkpoint-*")
                   if path.is_dir() and (step := _step_of(path.name, CHECKPOINT_NAME)) is not None]
    run.checkpoints = [name for _, name in sorted(checkpoints)]
    if (run_dir / FINAL_DIR).is_dir():
        run.checkpoints.append(FINAL_DIR)
    return run


def _read_eval_directory(result: EvalResult, run: RunData, run_dir: Path) -> None:
    directory = result.directory
    if directory is None or not directory.is_dir():
        return
    label = directory.relative_to(run_dir).as_posix() if directory.is_relative_to(run_dir) else str(directory)
    label = "" if label == "." else f"{label}/"
    if (directory / SUMMARY_FILE).is_file():
        result.summary = read_json_object(directory / SUMMARY_FILE, run.problems, f"{label}{SUMMARY_FILE}")
        # Numbers missing from the metrics line (or no metrics line at all) come from the summary.
        for key, value in (result.summary or {}).items():
            result.values.setdefault(key, value)
        if not result.name and isinstance((result.summary or {}).get("benchmark"), str):
            result.name = result.summary["benchmark"]
    if (directory / RECORDS_FILE).is_file():
        result.records = read_jsonl(directory / RECORDS_FILE, strict=False, problems=run.problems,
                                    label=f"{label}{RECORDS_FILE}")


def _is_figure(value: Any, keys: tuple[str, ...]) -> bool:
    return isinstance(value, dict) and all(number(value.get(key)) is not None for key in keys)


def read_comparison(path: Path, problems: list[str]) -> Comparison | None:
    """Returns the ``Comparison`` that ``reasontune compare`` wrote to ``path``, its malformed rows skipped and named; None when unreadable."""
    payload = read_json_object(path, problems, path.name)
    if payload is None:
        return None
    runs = payload.get("runs")
    if not (isinstance(runs, list) and len(runs) >= 2 and all(isinstance(label, str) for label in runs)):
        problems.append(f"{path.name} not read: field 'runs' must list two or more run names")
        return None
    comparison = Comparison(runs=runs, settings={key: payload[key] for key in ("ks", "metrics", "n_bootstrap", "seed",
                                                                              "paths") if key in payload})
    rows = payload.get("rows") if isinstance(payload.get("rows"), list) else []
    for number_of_row, row in enumerate(rows, start=1):
        well_formed = (isinstance(row, dict) and isinstance(row.get("benchmark"), str)
                       and isinstance(row.get("metric"), str) and _as_int(row.get("n_questions")) is not None
                       and isinstance(row.get("values"), list) and len(row["values"]) == len(runs)
                       and all(_is_figure(v, ("value", "low", "high")) for v in row["values"])
                       and isinstance(row.get("differences"), list) and len(row["differences"]) == len(runs) - 1
                       and all(_is_figure(d, ("difference", "low", "high", "p_value")) for d in row["differences"]))
        if well_formed:
            comparison.rows.append(row)
        else:
            problems.append(f"{path.name}: row {number_of_row} skipped: needs benchmark, metric, n_questions, one "
                            f"value per run ({len(runs)}) and one difference per run after the first")
    for key in ("notes", "warnings"):
        value = payload.get(key)
        setattr(comparison, key, [str(item) for item in value] if isinstance(value, list) else [])
    tools = payload.get("tools")
    for benchmark, per_run in (tools.items() if isinstance(tools, dict) else ()):
        if not (isinstance(per_run, list) and len(per_run) == len(runs)):
            problems.append(f"{path.name}: tool use of {benchmark} skipped: needs one entry (or null) per run ({len(runs)})")
            continue
        comparison.tools[str(benchmark)] = [_tool_use(one) for one in per_run]
        for label, one, read in zip(runs, per_run, comparison.tools[str(benchmark)]):
            if one is not None and read is None:
                problems.append(f"{path.name}: tool use of {benchmark}, run {label} not read: needs the counts "
                                "trajectories, calls and with_tool")
    sampling = payload.get("sampling")
    if isinstance(sampling, dict):
        comparison.sampling = {str(name): settings for name, settings in sampling.items()
                               if isinstance(settings, list) and len(settings) == len(runs)
                               and all(isinstance(one, dict) for one in settings)}
    return comparison


def _tool_figure(value: Any) -> dict[str, Any] | None:
    if not (_is_figure(value, ("value", "low", "high")) and _as_int(value.get("n")) is not None):
        return None
    figure = {key: float(value[key]) for key in ("value", "low", "high")} | {"n": _as_int(value["n"])}
    if _as_int(value.get("successes")) is not None:
        figure["successes"] = _as_int(value["successes"])
    return figure


def _tool_use(value: Any) -> dict[str, Any] | None:
    """Returns one run's ``compare.tool_use`` as comparison.json holds it, each part checked (a malformed one is None), or None."""
    if not (isinstance(value, dict) and all(_as_int(value.get(key)) is not None
                                            for key in ("trajectories", "calls", "with_tool"))):
        return None
    tools = {key: _as_int(value[key]) for key in ("trajectories", "calls", "with_tool")}
    tools["skipped"] = _as_int(value.get("skipped")) or 0
    tools["questions"] = _as_int(value.get("questions"))
    statuses = value.get("statuses") if isinstance(value.get("statuses"), dict) else {}
    tools["statuses"] = {str(status): count for status, count in statuses.items() if _as_int(count) is not None}
    for key in ("tool_use_rate", "calls_per_trajectory", "error_rate", "accuracy_with_tool", "accuracy_without_tool"):
        tools[key] = _tool_figure(value.get(key))
    seconds = value.get("seconds_per_call")
    tools["seconds_per_call"] = ({key: float(seconds[key]) for key in ("mean", "median", "max")} | {"n": _as_int(seconds["n"])}
                                 if _is_figure(seconds, ("mean", "median", "max")) and _as_int(seconds.get("n")) is not None
                                 else None)
    return tools


# ---------------------------------------------------------------------------------------------
# Fields of records


def number(value: Any) -> float | None:
    """Returns ``value`` as a float when it is a number (NaN included), else None."""
    if isinstance(value, Number) and not isinstance(value, bool):
        return float(value)
    return None


def series(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """Returns (steps, values) of ``key`` over ``rows`` that hold it as a number."""
    points = [(row["step"], number(row.get(key))) for row in rows]
    points = [(step, value) for step, value in points if value is not None]
    return [p[0] for p in points], [p[1] for p in points]


def eval_rows(run: RunData) -> list[dict[str, Any]]:
    """Returns one row per evaluation: its numbers and its ``step``."""
    return [{**result.values, "step": result.step} for result in run.evals]


def outcome(record: dict[str, Any]) -> str | None:
    """Returns the record's category ("correct", "formatted_wrong", "unformatted"; ``rollouts.category``), or None when it is not graded."""
    if isinstance(record.get("category"), str) and record["category"] in CATEGORIES:
        return record["category"]
    if number(record.get("answer_reward")) is None:
        return None
    return category({"answer_reward": record["answer_reward"], "format_reward": number(record.get("format_reward")) or 0.0})


def outcome_counts(records: list[dict[str, Any]]) -> dict[str, int]:
    """Returns the count of each outcome ("correct", "formatted_wrong", "unformatted") among graded records."""
    kinds = [outcome(record) for record in records]
    return {name: kinds.count(name) for name in CATEGORIES}


def graded_records(records: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """Returns the records the evaluation plots can draw: graded, with a category, a whole response length and a question."""
    usable = []
    for record in records or []:
        kind = outcome(record)
        question = record.get("question_id") if record.get("question_id") is not None else record.get("prompt")
        if (kind is not None and _as_int(record.get("response_tokens")) is not None
                and isinstance(question, (str, int)) and not isinstance(question, bool)
                and (record.get("sample") is None or _as_int(record.get("sample")) is not None)):
            usable.append({**record, "category": kind})
    return usable
