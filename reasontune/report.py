"""Plots and a one-page summary of a run directory (``reasontune report RUN_DIR``).

Reads what a run leaves behind — ``config.json``, ``metrics.jsonl``, ``eval/step-N/`` with
``summary.json`` and ``records.jsonl``, ``checkpoint-N/`` and ``final/`` — and writes
``RUN_DIR/report/``: one PNG per curve, ``index.html`` (self-contained, images referenced
relatively) and ``summary.md``. Reading is tolerant: a malformed line is skipped and named on
the page, a missing piece is said to be missing. Model text is untrusted and is escaped.
"""

from __future__ import annotations

import dataclasses
import datetime
import html
import json
import math
import re
from numbers import Number
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import PercentFormatter

from reasontune.config import positional_field
from reasontune.rollouts import CATEGORIES, category

REPORT_DIR = "report"
# The settings each kind of run shows in its config table (the run's own fields, as given).
CONFIG_HIGHLIGHTS = {
    "sft": ("model", "train_data", "learning_rate", "lr_scheduler", "batch_size", "gradient_accumulation_steps",
            "num_epochs", "max_steps", "max_length", "loss_aggregation", "packing", "tokens_per_batch", "dtype", "seed"),
    "ei": ("model", "train_data", "n_ei_steps", "questions_per_step", "group_size", "sampling_temperature",
           "sampling_max_tokens", "reward", "sft_epochs", "learning_rate", "batch_size", "gradient_accumulation_steps",
           "loss_aggregation", "dtype", "seed"),
    "grpo": ("model", "train_data", "n_grpo_steps", "rollout_batch_size", "group_size", "train_batch_size",
             "gradient_accumulation_steps", "epochs_per_rollout_batch", "loss_type", "loss_aggregation",
             "use_std_normalization", "cliprange", "kl_coef", "learning_rate", "sampling_temperature",
             "sampling_max_tokens", "reward", "dtype", "seed"),
    "eval": ("model", "data", "benchmarks", "prompt_template", "reward", "eval_n_samples", "eval_temperature",
             "eval_top_p", "eval_max_new_tokens", "k", "max_examples", "backend", "seed"),
}
STEP_UNIT = {"sft": "optimizer step", "ei": "EI step (sample → grade → SFT)", "grpo": "GRPO step (one rollout batch)",
             "eval": "evaluation"}
# GRPO / EI rollout curves from the train lines: (title, y label, file, [(key, label)], fraction axis).
ROLLOUT_PLOTS = (
    ("Rollout reward", "mean reward per response", "rollout_reward.png",
     [("reward", "reward"), ("format_reward", "format reward"), ("answer_reward", "answer reward")], True),
    ("Rollout accuracy", "fraction of rollouts", "rollout_accuracy.png",
     [("accuracy", "accuracy (answer reward 1)"), ("pass_at_n", "pass@group (a question solved by some sample)"),
      ("format_rate", "format rate")], True),
    ("Clipped tokens and KL to the reference", "per token", "clip_fraction_kl.png",
     [("clip_fraction", "clip fraction"), ("kl", "KL (k3) to the starting model")], False),
    ("Rollout response length", "mean response length (tokens)", "rollout_length.png",
     [("mean_response_tokens", "all"), ("mean_response_tokens_correct", "correct"),
      ("mean_response_tokens_incorrect", "incorrect"), ("mean_response_tokens_truncated", "truncated")], False),
    ("Kept responses per EI step", "responses", "ei_kept.png", [("kept", "kept (correct)"), ("samples", "sampled")], False),
)
SAMPLES_PER_OUTCOME = 3
PROMPT_TAIL_CHARS = 300
RESPONSE_MAX_CHARS = 2000


@dataclasses.dataclass
class ReportConfig:
    """Options of ``reasontune report``."""

    run_dir: str = positional_field("directory written by a training run (config.json, metrics.jsonl, eval/, checkpoints) or by reasontune eval (summary.json, records.jsonl)")


def run_report(config: ReportConfig) -> int:
    """Writes the report of ``config.run_dir`` and prints the path of its index.html; returns the exit status."""
    run_dir = Path(config.run_dir)
    if not run_dir.is_dir():
        raise SystemExit(f"error: run directory {run_dir} does not exist (give the --output-dir of a training run "
                         "or of reasontune eval)")
    if not any((run_dir / name).exists() for name in ("metrics.jsonl", "summary.json", "results.json", "config.json")):
        raise SystemExit(f"error: {run_dir}: neither a run directory (metrics.jsonl) nor an evaluation directory "
                         "(summary.json); give the --output-dir of reasontune sft/ei/grpo/eval")
    print(write_report(run_dir) / "index.html")
    return 0


# ---------------------------------------------------------------------------------------------
# Reading a run directory


@dataclasses.dataclass
class EvalResult:
    """One evaluation: its numbers (from metrics.jsonl and/or summary.json) and its records."""

    step: int
    values: dict[str, Any] = dataclasses.field(default_factory=dict)
    summary: dict[str, Any] | None = None
    directory: Path | None = None
    records: list[dict[str, Any]] | None = None


@dataclasses.dataclass
class RunData:
    """Everything the report shows, read tolerantly from a run directory."""

    run_dir: Path
    config: dict[str, Any] | None = None
    train: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    evals: list[EvalResult] = dataclasses.field(default_factory=list)
    data: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    events: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    problems: list[str] = dataclasses.field(default_factory=list)
    checkpoints: list[str] = dataclasses.field(default_factory=list)
    evaluation_only: bool = False  # written by reasontune eval, not by a training run

    @property
    def kind(self) -> str:
        """Returns ``sft``, ``ei``, ``grpo`` or ``eval`` (what wrote the directory), from its config's fields."""
        config = self.config or {}
        if self.evaluation_only:
            return "eval"
        return "grpo" if "n_grpo_steps" in config else "ei" if "n_ei_steps" in config else "sft"

    @property
    def step_unit(self) -> str:
        """Returns what one step on the x axis is for this kind of run."""
        return STEP_UNIT[self.kind]


def _read_jsonl(path: Path, problems: list[str], label: str) -> list[dict[str, Any]]:
    """Returns the JSON objects of ``path``'s lines; each unreadable line is skipped and noted in ``problems``."""
    records = []
    skipped = []
    with open(path, encoding="utf-8", errors="replace") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                skipped.append(f"{label} line {number} skipped: not valid JSON ({error.msg} at column {error.colno})")
                continue
            except (RecursionError, ValueError):
                skipped.append(f"{label} line {number} skipped: not valid JSON (nested too deeply, or a number "
                               "too long)")
                continue
            if not isinstance(record, dict):
                skipped.append(f"{label} line {number} skipped: expected a JSON object, got {type(record).__name__}")
                continue
            records.append(record)
    # Name the first few; a file of thousands of bad lines should not bury the page.
    problems.extend(skipped[:10])
    if len(skipped) > 10:
        problems.append(f"{label}: {len(skipped) - 10} more lines skipped")
    return records


def _read_json_object(path: Path, problems: list[str], label: str) -> dict[str, Any] | None:
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


def _step_of(name: str, prefix: str) -> int | None:
    match = re.fullmatch(re.escape(prefix) + r"(\d+)", name)
    return int(match.group(1)) if match else None


def read_run(run_dir: str | Path) -> RunData:
    """Returns the contents of a run directory; unreadable pieces are listed in ``problems``."""
    run_dir = Path(run_dir)
    run = RunData(run_dir=run_dir)
    if (run_dir / "config.json").is_file():
        run.config = _read_json_object(run_dir / "config.json", run.problems, "config.json")

    evals: dict[int, EvalResult] = {}
    if (run_dir / "metrics.jsonl").is_file():
        train_by_step: dict[int, dict[str, Any]] = {}
        for record in _read_jsonl(run_dir / "metrics.jsonl", run.problems, "metrics.jsonl"):
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

    eval_root = run_dir / "eval"
    if eval_root.is_dir():
        for directory in eval_root.iterdir():
            step = _step_of(directory.name, "step-")
            if step is not None and directory.is_dir():
                result = evals.setdefault(step, EvalResult(step=step))
                if result.directory is None or not result.directory.is_dir():
                    result.directory = directory
    if not evals and not (run_dir / "metrics.jsonl").is_file():
        # reasontune eval's directory: one evaluation (summary.json here, or one per benchmark below).
        for directory in [run_dir] + sorted(d for d in run_dir.iterdir() if d.is_dir() and d.name != REPORT_DIR):
            if (directory / "summary.json").is_file():
                evals[len(evals)] = EvalResult(step=len(evals), directory=directory)
                run.evaluation_only = True
    for result in evals.values():
        _read_eval_directory(result, run, run_dir)
    run.evals = [evals[step] for step in sorted(evals)]

    checkpoints = [(step, path.name) for path in run_dir.glob("checkpoint-*")
                   if path.is_dir() and (step := _step_of(path.name, "checkpoint-")) is not None]
    run.checkpoints = [name for _, name in sorted(checkpoints)]
    if (run_dir / "final").is_dir():
        run.checkpoints.append("final")
    return run


def _read_eval_directory(result: EvalResult, run: RunData, run_dir: Path) -> None:
    directory = result.directory
    if directory is None or not directory.is_dir():
        return
    label = directory.relative_to(run_dir).as_posix() if directory.is_relative_to(run_dir) else str(directory)
    if (directory / "summary.json").is_file():
        result.summary = _read_json_object(directory / "summary.json", run.problems, f"{label}/summary.json")
        # Numbers missing from the metrics line (or no metrics line at all) come from the summary.
        for key, value in (result.summary or {}).items():
            result.values.setdefault(key, value)
    if (directory / "records.jsonl").is_file():
        result.records = _read_jsonl(directory / "records.jsonl", run.problems, f"{label}/records.jsonl")


# ---------------------------------------------------------------------------------------------
# Reading fields of records


def _number(value: Any) -> float | None:
    """Returns ``value`` as a float when it is a number (NaN included), else None."""
    if isinstance(value, Number) and not isinstance(value, bool):
        return float(value)
    return None


def _reward(record: dict[str, Any], name: str) -> float | None:
    return _number(record.get(name))


def outcome(record: dict[str, Any]) -> str | None:
    """Returns the record's category ("correct", "formatted_wrong", "unformatted"; ``rollouts.category``), or None when it is not graded."""
    if isinstance(record.get("category"), str) and record["category"] in CATEGORIES:
        return record["category"]
    if _reward(record, "answer_reward") is None:
        return None
    return category({"answer_reward": record["answer_reward"], "format_reward": _reward(record, "format_reward") or 0.0})


def outcome_counts(records: list[dict[str, Any]]) -> dict[str, int]:
    """Returns the count of each outcome ("correct", "formatted_wrong", "unformatted") among graded records."""
    kinds = [outcome(record) for record in records]
    return {name: kinds.count(name) for name in CATEGORIES}


def pick_samples(records: list[dict[str, Any]], per_outcome: int = SAMPLES_PER_OUTCOME) -> tuple[list[dict], list[dict]]:
    """Returns (correct, incorrect) samples, the first ``per_outcome`` of each; incorrect ones alternate formatted-but-wrong and unformatted."""
    correct = [r for r in records if outcome(r) == "correct"][:per_outcome]
    formatted_wrong = [r for r in records if outcome(r) == "formatted_wrong"]
    unformatted = [r for r in records if outcome(r) == "unformatted"]
    incorrect = []
    for pair in zip(formatted_wrong, unformatted):
        incorrect.extend(pair)
    shorter = len(min(formatted_wrong, unformatted, key=len))
    incorrect.extend(formatted_wrong[shorter:] + unformatted[shorter:])
    return correct, incorrect[:per_outcome]


def _clip_tail(text: str, limit: int) -> str:
    return text if len(text) <= limit else "…" + text[-limit:]


def _clip_head(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + f"… ({len(text) - limit} more characters)"


def _format_number(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, Number):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if not math.isfinite(value):
        return str(value)
    if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e6):
        return f"{value:.3e}"
    return f"{value:.4g}"


def _format_rate(value: Any) -> str:
    number = _number(value)
    return "—" if number is None else f"{100 * number:.1f}%"


def _format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


# ---------------------------------------------------------------------------------------------
# Plots


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    points = [(row["step"], _number(row.get(key))) for row in rows]
    points = [(step, value) for step, value in points if value is not None]
    return [p[0] for p in points], [p[1] for p in points]


def _eval_rows(run: RunData) -> list[dict[str, Any]]:
    return [{**result.values, "step": result.step} for result in run.evals]


def _moving_average(values: list[float], window: int) -> list[float]:
    averaged, total, finite = [], 0.0, []
    for value in values:
        finite.append(value if math.isfinite(value) else None)
        window_values = [v for v in finite[-window:] if v is not None]
        averaged.append(sum(window_values) / len(window_values) if window_values else math.nan)
    return averaged


def new_axes(title: str, ylabel: str, xlabel: str = "optimizer step"):
    """Returns (figure, axes) in the style of every reasontune plot: 8 x 4.5 in, titled, labelled, light grid."""
    # A bare Figure draws with Agg and leaves pyplot's global backend alone.
    figure = Figure(figsize=(8, 4.5), dpi=100, layout="constrained")
    axes = figure.add_subplot()
    axes.set_title(title)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.grid(True, alpha=0.35)
    return figure, axes


def _use_log_scale_if_wide(axes, values: list[float]) -> None:
    positive = [v for v in values if math.isfinite(v) and v > 0]
    if positive and len(positive) == len([v for v in values if math.isfinite(v)]) and max(positive) / min(positive) > 100:
        axes.set_yscale("log")


def _plot_training_curve(axes, steps: list[int], values: list[float], label: str, color: str) -> None:
    many = len(steps) > 40
    axes.plot(steps, values, color=color, alpha=0.35 if many else 1.0, linewidth=1.0,
              marker=None if many else ".", label=label if not many else f"{label} (per step)")
    if many:
        window = max(5, len(steps) // 25)
        axes.plot(steps, _moving_average(values, window), color=color, linewidth=2.0,
                  label=f"{label} (moving average of {window})")


def _save(figure, path: Path) -> None:
    figure.savefig(path)


def write_plots(run: RunData, out_dir: Path) -> list[tuple[str, str]]:
    """Returns (file name, caption) of each PNG written into ``out_dir``; curves without data are left out."""
    written: list[tuple[str, str]] = []
    evals = _eval_rows(run)
    unit = run.step_unit
    if run.kind == "eval":  # one evaluation (per benchmark): no curves; reasontune eval drew its own plots
        return written
    if run.kind in ("ei", "grpo"):
        written += _write_rollout_plots(run, out_dir, unit)

    for key, title, ylabel, file_name, color in (
        ("loss", "Training loss", "loss", "loss.png", "tab:blue"),
        ("lr", "Learning rate", "learning rate", "learning_rate.png", "tab:green"),
        ("grad_norm", "Gradient norm (before clipping)", "global L2 norm", "grad_norm.png", "tab:red"),
    ):
        steps, values = _series(run.train, key)
        if not steps:
            continue
        figure, axes = new_axes(title, ylabel, unit)
        _plot_training_curve(axes, steps, values, key, color)
        if key != "lr":
            _use_log_scale_if_wide(axes, values)
        axes.legend(loc="best")
        _save(figure, out_dir / file_name)
        written.append((file_name, title))

    accuracy_steps, accuracy = _series(evals, "accuracy")
    format_steps, format_rate = _series(evals, "format_rate")
    if accuracy_steps or format_steps:
        figure, axes = new_axes("Validation accuracy and format rate", "fraction of validation examples", unit)
        if accuracy_steps:
            axes.plot(accuracy_steps, accuracy, marker="o", color="tab:blue", label="accuracy (answer reward 1)")
        if format_steps:
            axes.plot(format_steps, format_rate, marker="s", linestyle="--", color="tab:orange", label="format rate")
        axes.set_ylim(-0.03, 1.03)
        axes.yaxis.set_major_formatter(_percent_formatter())
        axes.legend(loc="best")
        _save(figure, out_dir / "accuracy.png")
        written.append(("accuracy.png", "Validation accuracy and format rate"))

    train_entropy_steps, train_entropy = _series(run.train, "token_entropy")
    eval_entropy_steps, eval_entropy = _series(evals, "mean_entropy")
    if train_entropy_steps or eval_entropy_steps:
        figure, axes = new_axes("Response token entropy", "entropy (nats per token)", unit)
        if train_entropy_steps:
            _plot_training_curve(axes, train_entropy_steps, train_entropy, "training responses", "tab:purple")
        if eval_entropy_steps:
            axes.plot(eval_entropy_steps, eval_entropy, marker="o", color="tab:brown", label="validation generations")
        axes.legend(loc="best")
        _save(figure, out_dir / "entropy.png")
        written.append(("entropy.png", "Response token entropy"))

    length_steps, lengths = _series(evals, "mean_response_tokens")
    if length_steps:
        figure, axes = new_axes("Validation response length", "mean response length (tokens)", unit)
        axes.plot(length_steps, lengths, marker="o", color="tab:cyan", label="all responses")
        axes.set_ylim(bottom=0)
        axes.legend(loc="best")
        _save(figure, out_dir / "response_length.png")
        written.append(("response_length.png", "Validation response length"))
    return written


def _write_rollout_plots(run: RunData, out_dir: Path, unit: str) -> list[tuple[str, str]]:
    """Returns (file name, caption) of each rollout plot of an EI/GRPO run (reward, accuracy, clip fraction, KL, lengths)."""
    written = []
    colors = ("tab:blue", "tab:orange", "tab:green", "tab:red")
    for title, ylabel, file_name, keys, fraction in ROLLOUT_PLOTS:
        series = [(label, *_series(run.train, key)) for key, label in keys]
        series = [(label, steps, values) for label, steps, values in series if steps]
        if not series:
            continue
        figure, axes = new_axes(title, ylabel, unit)
        for (label, steps, values), color in zip(series, colors):
            _plot_training_curve(axes, steps, values, label, color)
        if fraction:
            axes.set_ylim(-0.03, 1.03)
            axes.yaxis.set_major_formatter(_percent_formatter())
        axes.legend(loc="best")
        _save(figure, out_dir / file_name)
        written.append((file_name, title))
    return written


def _percent_formatter():
    return PercentFormatter(xmax=1.0)


# ---------------------------------------------------------------------------------------------
# The summary: facts shared by the HTML page and the Markdown file


@dataclasses.dataclass
class Sample:
    outcome: str
    prompt_tail: str
    response: str
    ground_truth: str
    rewards: str
    length: Any


def _headline(run: RunData) -> list[tuple[str, str]]:
    """Returns (label, value) rows of the run's final numbers (plain text, to be escaped by the writer)."""
    rows: list[tuple[str, str]] = []
    if run.train:
        last = run.train[-1]
        steps, losses = _series(run.train, "loss")
        if losses:
            rows.append(("last training loss", f"{_format_number(losses[-1])} (step {steps[-1]})"))
        epoch = _number(last.get("epoch"))
        rows.append((f"{run.step_unit.split(' (')[0]}s", f"{last['step']:,}" + (f" ({epoch:.2f} epochs)" if epoch is not None else "")))
        for key, label in (("tokens_per_s", "tokens/s"), ("response_tokens_per_s", "response tokens/s")):
            _, values = _series(run.train, key)
            values = sorted(v for v in values if math.isfinite(v))
            if values:
                rows.append((label, f"{values[len(values) // 2]:,.0f} (median over logged steps)"))
        elapsed = _number(last.get("elapsed_s"))
        if elapsed is not None and math.isfinite(elapsed):
            rows.append(("training time", _format_duration(elapsed)))
    with_accuracy = [r for r in run.evals if _number(r.values.get("accuracy")) is not None]
    if with_accuracy:
        first, final = with_accuracy[0], with_accuracy[-1]
        before_label = "before training" if first.step == 0 else f"first evaluation, step {first.step}"
        if first is final:
            rows.append((f"validation accuracy (step {final.step})", _format_rate(final.values["accuracy"])))
            rows.append((f"format rate (step {final.step})", _format_rate(final.values.get("format_rate"))))
        else:
            rows.append(("validation accuracy", f"{_format_rate(first.values['accuracy'])} ({before_label}) → "
                                                f"{_format_rate(final.values['accuracy'])} (step {final.step})"))
            rows.append(("format rate", f"{_format_rate(first.values.get('format_rate'))} → "
                                        f"{_format_rate(final.values.get('format_rate'))}"))
        compared = [(first, before_label), (final, f"step {final.step}")] if first is not final else [(final, f"step {final.step}")]
        for result, when in compared:
            if result.records:
                counts = outcome_counts(result.records)
                total = sum(counts.values())
                if total:
                    rows.append((f"outcomes ({when})", f"{counts['correct']} correct / {counts['formatted_wrong']} "
                                                       f"formatted but wrong / {counts['unformatted']} unformatted "
                                                       f"of {total}"))
    return rows


def _config_rows(run: RunData) -> list[tuple[str, str]]:
    if not run.config:
        return []
    # Settings are shown as given (3e-05, 1024), not rounded like measurements.
    return [(key, str(run.config[key])) for key in CONFIG_HIGHLIGHTS[run.kind]
            if key in run.config and run.config[key] not in (None, "")]


def _summary_comparison(run: RunData) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """Returns (column headers, rows) comparing the scalar numbers of the first and last eval summaries."""
    with_summary = [r for r in run.evals if r.summary]
    if not with_summary:
        return [], []
    chosen = [with_summary[0]] if len(with_summary) == 1 else [with_summary[0], with_summary[-1]]
    flattened = [_flatten_scalars(result.summary) for result in chosen]
    keys = list(dict.fromkeys(key for values in flattened for key in values))
    headers = [f"step {result.step}" for result in chosen]
    rows = [(key, [_format_number(values[key]) if key in values else "—" for values in flattened]) for key in keys]
    return headers, rows


def _flatten_scalars(value: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, item in value.items():
        name = f"{prefix}{key}"
        if isinstance(item, dict):
            flat.update(_flatten_scalars(item, name + "."))
        elif isinstance(item, (Number, str)) or item is None:
            flat[name] = item
    return flat


def _samples(run: RunData) -> tuple[EvalResult | None, list[Sample]]:
    """Returns the last evaluation that has records and a few of its correct and incorrect generations."""
    with_records = [r for r in run.evals if r.records]
    if not with_records:
        return None, []
    last = with_records[-1]
    correct, incorrect = pick_samples(last.records)
    samples = []
    for record in correct + incorrect:
        rewards = ", ".join(f"{name} {_format_number(value)}" for name in ("format_reward", "answer_reward", "reward")
                            if (value := _reward(record, name)) is not None)
        samples.append(Sample(
            outcome={"correct": "correct", "formatted_wrong": "formatted but wrong",
                     "unformatted": "unformatted"}[outcome(record)],
            prompt_tail=_clip_tail(str(record.get("prompt", "")), PROMPT_TAIL_CHARS),
            response=_clip_head(str(record.get("response", "")), RESPONSE_MAX_CHARS),
            ground_truth=json.dumps(record.get("ground_truth"), ensure_ascii=False)
            if not isinstance(record.get("ground_truth"), str) else record["ground_truth"],
            rewards=rewards,
            length=record.get("response_tokens"),
        ))
    return last, samples


def _data_text(record: dict[str, Any]) -> str:
    return ", ".join(f"{key} {_format_number(value) if isinstance(value, Number) else value}"
                     for key, value in record.items())


def _event_text(record: dict[str, Any]) -> tuple[str, str]:
    step = record.get("step")
    return ("—" if step is None else str(step)), str(record.get("message", json.dumps(record)))


# ---------------------------------------------------------------------------------------------
# Writers


_CSS = """
body { font-family: system-ui, -apple-system, Segoe UI, sans-serif; max-width: 1000px; margin: 2em auto; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { margin-top: 1.8em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.5em 0; } td, th { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f5f5f5; } .notice { background: #fff4e5; border-left: 4px solid #f0a020; padding: 0.5em 1em; }
.empty { color: #666; font-style: italic; } img { max-width: 100%; border: 1px solid #eee; }
pre { white-space: pre-wrap; word-break: break-word; background: #f7f7f7; padding: 0.6em; border-radius: 4px; }
.sample { border: 1px solid #ddd; border-radius: 6px; padding: 0.4em 1em; margin: 1em 0; }
.correct { border-left: 6px solid #2a9d4b; } .incorrect { border-left: 6px solid #d64541; }
"""


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _html_table(rows: list[tuple[str, str]]) -> str:
    return "<table>" + "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows) + "</table>"


def render_html(run: RunData, plots: list[tuple[str, str]], generated_at: str) -> str:
    """Returns the report page: self-contained HTML with every value from the run escaped."""
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>Run report: {_e(run.run_dir.name)}</title>"
             f"<style>{_CSS}</style></head><body>",
             f"<h1>Run report: {_e(run.run_dir.name)}</h1>",
             f"<p>Run directory <code>{_e(run.run_dir)}</code>; report written {_e(generated_at)}.</p>"]
    nothing = not run.train and not run.evals
    if nothing:
        parts.append("<p class='notice'>Nothing to show yet: this directory has no training metrics "
                     "(metrics.jsonl) and no evaluation results (eval/step-N/).</p>")
    if run.problems:
        parts.append("<div class='notice'><strong>Some input was skipped:</strong><ul>"
                     + "".join(f"<li>{_e(p)}</li>" for p in run.problems) + "</ul></div>")

    parts.append("<h2>Final numbers</h2>")
    headline = _headline(run)
    parts.append(_html_table(headline) if headline else "<p class='empty'>No training or evaluation numbers yet.</p>")
    if run.train and not run.evals:
        parts.append("<p class='empty'>No evaluation yet.</p>")

    parts.append("<h2>Configuration</h2>")
    config_rows = _config_rows(run)
    if run.config is None:
        parts.append("<p class='empty'>No readable config.json.</p>")
    else:
        parts.append(_html_table(config_rows) if config_rows else "<p class='empty'>None of the usual options are set.</p>")
        parts.append("<details><summary>Full resolved config</summary><pre>"
                     + _e(json.dumps(run.config, indent=2, sort_keys=True)) + "</pre></details>")

    parts.append("<h2>Events</h2>")
    if run.data:
        parts.append("<p>Data:</p><ul>" + "".join(f"<li>{_e(_data_text(record))}</li>" for record in run.data) + "</ul>")
    if run.events:
        parts.append("<table><tr><th>step</th><th>event</th></tr>"
                     + "".join("<tr><td>{}</td><td>{}</td></tr>".format(*map(_e, _event_text(e))) for e in run.events)
                     + "</table>")
    if not run.data and not run.events:
        parts.append("<p class='empty'>No events logged.</p>")

    parts.append("<h2>Curves</h2>")
    if plots:
        parts.extend(f"<figure><img src='{_e(name)}' alt='{_e(caption)}'><figcaption>{_e(caption)}</figcaption></figure>"
                     for name, caption in plots)
    else:
        parts.append("<p class='empty'>No metrics to plot yet.</p>")

    headers, rows = _summary_comparison(run)
    if rows:
        parts.append("<h2>Evaluation summaries</h2><table><tr><th></th>"
                     + "".join(f"<th>{_e(h)}</th>" for h in headers) + "</tr>"
                     + "".join(f"<tr><th>{_e(k)}</th>" + "".join(f"<td>{_e(v)}</td>" for v in values) + "</tr>"
                               for k, values in rows) + "</table>")

    parts.append("<h2>Sample generations</h2>")
    source, samples = _samples(run)
    if source is None:
        parts.append("<p class='empty'>No evaluation records (eval/step-N/records.jsonl) yet.</p>")
    elif not samples:
        parts.append(f"<p class='empty'>The records of step {source.step} carry no rewards to sort them by.</p>")
    else:
        parts.append(f"<p>From the evaluation at step {source.step} ({len(source.records)} records).</p>")
        for sample in samples:
            css = "correct" if sample.outcome == "correct" else "incorrect"
            length = f", response length {_e(sample.length)}" if sample.length is not None else ""
            parts.append(f"<div class='sample {css}'><p><strong>{_e(sample.outcome)}</strong> — rewards: "
                         f"{_e(sample.rewards or 'none recorded')}{length}</p>"
                         f"<p>Prompt (end):</p><pre>{_e(sample.prompt_tail)}</pre>"
                         f"<p>Response:</p><pre>{_e(sample.response)}</pre>"
                         f"<p>Ground truth: <code>{_e(sample.ground_truth)}</code></p></div>")

    parts.append("<h2>Checkpoints</h2>")
    parts.append("<ul>" + "".join(f"<li><code>{_e(name)}/</code></li>" for name in run.checkpoints) + "</ul>"
                 if run.checkpoints else "<p class='empty'>No checkpoints yet.</p>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _md(text: Any) -> str:
    """Escapes text for a Markdown paragraph or table cell (no raw HTML, no table breaks)."""
    return (str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace("|", "\\|").replace("`", "\\`").replace("\n", " "))


def _md_code_block(text: str) -> str:
    # A fence longer than any run of backticks inside keeps model text from closing it.
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}text\n{text}\n{fence}"


def _md_table(rows: list[tuple[str, str]]) -> list[str]:
    return ["| | |", "|---|---|"] + [f"| {_md(k)} | {_md(v)} |" for k, v in rows]


def render_markdown(run: RunData, plots: list[tuple[str, str]], generated_at: str) -> str:
    """Returns the one-page summary as Markdown (images relative, model text inside code fences)."""
    lines = [f"# Run report: {_md(run.run_dir.name)}", "", f"Report written {_md(generated_at)}.", ""]
    if not run.train and not run.evals:
        lines += ["Nothing to show yet: this directory has no training metrics (metrics.jsonl) and no "
                  "evaluation results (eval/step-N/).", ""]
    if run.problems:
        lines += ["**Some input was skipped:**", ""] + [f"- {_md(p)}" for p in run.problems] + [""]
    headline = _headline(run)
    lines += ["## Final numbers", ""] + (_md_table(headline) if headline else ["No training or evaluation numbers yet."]) + [""]
    config_rows = _config_rows(run)
    lines += ["## Configuration", ""] + (_md_table(config_rows) if config_rows else ["No readable config.json."]) + [""]
    lines += ["## Events", ""]
    lines += [f"- data: {_md(_data_text(record))}" for record in run.data]
    lines += ["- step {}: {}".format(*map(_md, _event_text(event))) for event in run.events]
    if not run.data and not run.events:
        lines.append("No events logged.")
    lines += ["", "## Curves", ""]
    lines += [f"![{_md(caption)}]({name})\n" for name, caption in plots] or ["No metrics to plot yet."]
    lines += ["", "## Sample generations", ""]
    source, samples = _samples(run)
    if source is None:
        lines.append("No evaluation records yet.")
    for sample in samples:
        length = f", response length {_md(sample.length)}" if sample.length is not None else ""
        lines += [f"### {_md(sample.outcome)} (step {source.step}) — rewards: {_md(sample.rewards or 'none recorded')}{length}",
                  "", "Prompt (end):", "", _md_code_block(sample.prompt_tail), "", "Response:", "",
                  _md_code_block(sample.response), "", "Ground truth:", "", _md_code_block(sample.ground_truth), ""]
    lines += ["", "## Checkpoints", ""]
    lines += [f"- `{_md(name)}/`" for name in run.checkpoints] or ["No checkpoints yet."]
    return "\n".join(lines) + "\n"


def write_report(run_dir: str | Path) -> Path:
    """Returns ``run_dir/report``, after writing its PNG plots, index.html and summary.md."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist")
    run = read_run(run_dir)
    out_dir = run_dir / REPORT_DIR
    out_dir.mkdir(exist_ok=True)
    plots = write_plots(run, out_dir)
    generated_at = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    # A lone surrogate in a record's text (a dataset's half emoji) shows as U+FFFD rather than stopping the report.
    (out_dir / "index.html").write_text(render_html(run, plots, generated_at), encoding="utf-8", errors="replace")
    (out_dir / "summary.md").write_text(render_markdown(run, plots, generated_at), encoding="utf-8", errors="replace")
    return out_dir
