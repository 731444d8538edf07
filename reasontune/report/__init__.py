"""``reasontune report DIR``: plots and a one-page summary of a training run, an evaluation or a comparison.

Parts, one job each: ``reading`` (what the directory holds, read tolerantly: a malformed
line is skipped and named on the page), ``plots`` (the PNGs, drawn in ``reasontune.plotting``'s
style, which evaluation and compare share), ``blocks`` (the page's plain-text building blocks),
``tools`` (the tool-use sections of runs with tool calls) and ``pages`` (what each kind of
directory shows, as ``index.html`` and ``summary.md``). Everything goes to ``DIR/report/``.

- a training run (``sft`` / ``ei`` / ``grpo``: config.json records which): its curves, final
  numbers, settings, events, evaluations, sample generations and checkpoints;
- an evaluation (``reasontune eval``'s output): accuracy, outcomes and pass@k / maj@k / avg@k
  per benchmark, how it was sampled, its plots and sample generations; with ``--env python``
  its tool use (calls, errors, times, accuracy with and without a call) and trajectories turn by turn;
- a comparison (``reasontune compare``'s output): the table with its intervals and p-values,
  each run's tool use where they called one, how each run was sampled (differences marked)
  and its warnings, the bars.

A training run's metrics lines that log ``tool_``-prefixed numbers get their own curves and table.
"""

from __future__ import annotations

import dataclasses
import datetime
from pathlib import Path

from reasontune.config import positional_field
from reasontune.report.pages import build_page, render_html, render_markdown
from reasontune.report.plots import write_plots
from reasontune.report.reading import read_run
from reasontune.run_layout import CONFIG_FILE, REPORT_DIR, is_compare_dir, is_eval_output, is_training_run


@dataclasses.dataclass
class ReportConfig:
    """Options of ``reasontune report``."""

    run_dir: str = positional_field("directory written by a training run (config.json, metrics.jsonl, eval/, checkpoints), "
                                    "by reasontune eval (summary.json, records.jsonl) or by reasontune compare "
                                    "(comparison.json)")


def run_report(config: ReportConfig) -> int:
    """Writes the report of ``config.run_dir`` and prints the path of its index.html; returns the exit status."""
    run_dir = Path(config.run_dir)
    if not run_dir.is_dir():
        raise SystemExit(f"error: run directory {run_dir} does not exist (give the --output-dir of a training run, "
                         "of reasontune eval or of reasontune compare)")
    if not ((run_dir / CONFIG_FILE).is_file() or is_training_run(run_dir) or is_eval_output(run_dir)
            or is_compare_dir(run_dir)):
        raise SystemExit(f"error: {run_dir}: neither a run directory (metrics.jsonl), an evaluation directory "
                         "(summary.json) nor a comparison (comparison.json); give the --output-dir of reasontune "
                         "sft/ei/grpo/eval/compare")
    print(write_report(run_dir) / "index.html")
    return 0


def write_report(run_dir: str | Path) -> Path:
    """Returns ``run_dir/report``, after writing its PNG plots, index.html and summary.md."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist")
    run = read_run(run_dir)
    out_dir = run_dir / REPORT_DIR
    out_dir.mkdir(exist_ok=True)
    plots = write_plots(run, out_dir)
    page = build_page(run, plots, datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"))
    # A lone surrogate in a record's text (a dataset's half emoji) shows as U+FFFD rather than stopping the report.
    (out_dir / "index.html").write_text(render_html(page), encoding="utf-8", errors="replace")
    (out_dir / "summary.md").write_text(render_markdown(page), encoding="utf-8", errors="replace")
    return out_dir
