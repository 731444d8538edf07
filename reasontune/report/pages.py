"""The report's pages: what each kind of directory shows (a training run, an evaluation, a comparison), written as HTML and as Markdown.

``build_page`` turns a ``RunData`` into one ``Page`` of sections holding plain text (the blocks
of ``reasontune.report.blocks``: tables, lists, figures, samples, code; runs with tool calls add
the sections of ``reasontune.report.tools``); ``render_html`` and ``render_markdown`` write that
same page, so the two files cannot say different things. Every value from the directory is
untrusted: HTML escapes it, Markdown escapes it or fences model text in a code block longer
than any run of backticks inside.
"""

from __future__ import annotations

import html
import json
import math
import re
from numbers import Number
from typing import Any

from reasontune.compare import SAMPLING_SETTINGS, sampling_differences
from reasontune.estimators import format_p_value
from reasontune.report.blocks import (Block, Bullets, Card, Code, Figures, FullConfig, Grid, KeyValues, Notice, Page,
                                      Sample, Section, Text, clip_head, clip_tail, format_duration, format_figure,
                                      format_number, format_rate)
from reasontune.report.reading import EvalResult, RunData, number, outcome, outcome_counts, series
from reasontune.report.tools import comparison_tool_sections, evaluation_tool_sections, training_tool_sections

# An evaluation's tool settings, shown only where it ran with a tool environment.
TOOL_SETTINGS = ("max_tool_calls", "tool_timeout", "tool_output_bytes")
# The settings each kind of directory shows in its config table (the run's own fields, as given).
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
             "eval_top_p", "eval_max_new_tokens", "k", "max_examples", "backend", "seed", "env", *TOOL_SETTINGS),
    # A config that names no trainer: its settings are in the full config below the table.
    "run": ("model", "train_data", "learning_rate", "seed"),
    "compare": (),
}
TITLES = {"eval": "Evaluation report", "compare": "Comparison report"}
SAMPLES_PER_OUTCOME = 3
PROMPT_TAIL_CHARS = 300
RESPONSE_MAX_CHARS = 2000


# ---------------------------------------------------------------------------------------------
# What each kind of directory shows


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


def _outcomes_text(records: list[dict[str, Any]] | None) -> str | None:
    counts = outcome_counts(records or [])
    total = sum(counts.values())
    if not total:
        return None
    return (f"{counts['correct']} correct / {counts['formatted_wrong']} formatted but wrong / "
            f"{counts['unformatted']} unformatted of {total}")


def _headline(run: RunData) -> list[tuple[str, str]]:
    """Returns (label, value) rows of a training run's final numbers."""
    rows: list[tuple[str, str]] = []
    if run.train:
        last = run.train[-1]
        steps, losses = series(run.train, "loss")
        if losses:
            rows.append(("last training loss", f"{format_number(losses[-1])} (step {steps[-1]})"))
        nll_steps, nlls = series(run.train, "mean_token_nll")
        if nlls:
            rows.append(("last per-token NLL", f"{format_number(nlls[-1])} (step {nll_steps[-1]})"))
        epoch = number(last.get("epoch"))
        rows.append((f"{run.step_unit.split(' (')[0]}s", f"{last['step']:,}" + (f" ({epoch:.2f} epochs)" if epoch is not None else "")))
        for key, label in (("tokens_per_s", "tokens/s"), ("response_tokens_per_s", "response tokens/s")):
            _, values = series(run.train, key)
            values = sorted(v for v in values if math.isfinite(v))
            if values:
                rows.append((label, f"{values[len(values) // 2]:,.0f} (median over logged steps)"))
        elapsed = number(last.get("elapsed_s"))
        if elapsed is not None and math.isfinite(elapsed):
            rows.append(("training time", format_duration(elapsed)))
    with_accuracy = [r for r in run.evals if number(r.values.get("accuracy")) is not None]
    if with_accuracy:
        first, final = with_accuracy[0], with_accuracy[-1]
        before_label = "before training" if first.step == 0 else f"first evaluation, step {first.step}"
        if first is final:
            rows.append((f"validation accuracy (step {final.step})", format_rate(final.values["accuracy"])))
            rows.append((f"format rate (step {final.step})", format_rate(final.values.get("format_rate"))))
        else:
            rows.append(("validation accuracy", f"{format_rate(first.values['accuracy'])} ({before_label}) → "
                                                f"{format_rate(final.values['accuracy'])} (step {final.step})"))
            rows.append(("format rate", f"{format_rate(first.values.get('format_rate'))} → "
                                        f"{format_rate(final.values.get('format_rate'))}"))
        compared = [(first, before_label), (final, f"step {final.step}")] if first is not final else [(final, f"step {final.step}")]
        for result, when in compared:
            if (text := _outcomes_text(result.records)) is not None:
                rows.append((f"outcomes ({when})", text))
    return rows


def _config_rows(run: RunData) -> list[tuple[str, str]]:
    if not run.config:
        return []
    # Settings are shown as given (3e-05, 1024), not rounded like measurements.
    single_turn = run.config.get("env", "math") == "math"
    return [(key, str(run.config[key])) for key in CONFIG_HIGHLIGHTS[run.kind]
            if key in run.config and run.config[key] not in (None, "") and not (single_turn and key in TOOL_SETTINGS)]


def _flatten_scalars(value: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, item in value.items():
        name = f"{prefix}{key}"
        if isinstance(item, dict):
            flat.update(_flatten_scalars(item, name + "."))
        elif isinstance(item, (Number, str)) or item is None:
            flat[name] = item
    return flat


def _summary_comparison(run: RunData) -> Grid | None:
    """Returns the scalar numbers of the first and last eval summaries side by side, or None without summaries."""
    with_summary = [r for r in run.evals if r.summary]
    if not with_summary:
        return None
    chosen = [with_summary[0]] if len(with_summary) == 1 else [with_summary[0], with_summary[-1]]
    flattened = [_flatten_scalars(result.summary) for result in chosen]
    keys = list(dict.fromkeys(key for values in flattened for key in values))
    return Grid(["", *(f"step {result.step}" for result in chosen)],
                [[key, *(format_number(values[key]) if key in values else "—" for values in flattened)] for key in keys])


def _samples_of(result: EvalResult, source: str) -> list[Sample]:
    correct, incorrect = pick_samples(result.records or [])
    samples = []
    for record in correct + incorrect:
        rewards = ", ".join(f"{name} {format_number(value)}" for name in ("format_reward", "answer_reward", "reward")
                            if (value := number(record.get(name))) is not None)
        truth = record.get("ground_truth")
        samples.append(Sample(
            outcome={"correct": "correct", "formatted_wrong": "formatted but wrong",
                     "unformatted": "unformatted"}[outcome(record)],
            source=source,
            prompt_tail=clip_tail(str(record.get("prompt", "")), PROMPT_TAIL_CHARS),
            response=clip_head(str(record.get("response", "")), RESPONSE_MAX_CHARS),
            ground_truth=truth if isinstance(truth, str) else json.dumps(truth, ensure_ascii=False),
            rewards=rewards,
            length=record.get("response_tokens"),
        ))
    return samples


def _training_samples(run: RunData) -> list[Block]:
    with_records = [r for r in run.evals if r.records]
    if not with_records:
        return [Text("No evaluation records (eval/step-N/records.jsonl) yet.", empty=True)]
    last = with_records[-1]
    samples = _samples_of(last, f"step {last.step}")
    if not samples:
        return [Text(f"The records of step {last.step} carry no rewards to sort them by.", empty=True)]
    return [Text(f"From the evaluation at step {last.step} ({len(last.records)} records).")] + samples


def _events(run: RunData) -> list[Block]:
    blocks: list[Block] = []
    if run.data:
        blocks.append(Bullets([", ".join(f"{key} {format_number(value) if isinstance(value, Number) else value}"
                                         for key, value in record.items()) for record in run.data], lead="Data:"))
    if run.events:
        blocks.append(Grid(["step", "event"], [["—" if e.get("step") is None else str(e.get("step")),
                                                str(e.get("message", json.dumps(e)))] for e in run.events]))
    return blocks or [Text("No events logged.", empty=True)]


def _configuration(run: RunData) -> list[Block]:
    if run.config is None:
        return [Text("No readable config.json.", empty=True)]
    rows = _config_rows(run)
    blocks: list[Block] = [KeyValues(rows) if rows else Text("None of the usual options are set.", empty=True)]
    return blocks + [FullConfig(json.dumps(run.config, indent=2, sort_keys=True))]


def _curves(plots: list[tuple[str, str]], nothing: str = "No metrics to plot yet.") -> list[Block]:
    return [Figures(plots)] if plots else [Text(nothing, empty=True)]


def _training_sections(run: RunData, plots: list[tuple[str, str]]) -> list[Section]:
    headline = _headline(run)
    final = [KeyValues(headline) if headline else Text("No training or evaluation numbers yet.", empty=True)]
    if run.train and not run.evals:
        final.append(Text("No evaluation yet.", empty=True))
    sections = [Section("Final numbers", final), Section("Configuration", _configuration(run)),
                Section("Events", _events(run)), Section("Curves", _curves(plots)), *training_tool_sections(run)]
    if (summaries := _summary_comparison(run)) is not None:
        sections.append(Section("Evaluation summaries", [summaries]))
    sections.append(Section("Sample generations", _training_samples(run)))
    checkpoints = [Bullets([f"{name}/" for name in run.checkpoints])] if run.checkpoints else [
        Text("No checkpoints yet.", empty=True)]
    sections.append(Section("Checkpoints", checkpoints))
    return sections


def _estimates(result: EvalResult) -> dict[str, Any]:
    estimates = (result.summary or {}).get("estimates")
    metrics = estimates.get("metrics") if isinstance(estimates, dict) else None
    return metrics if isinstance(metrics, dict) else {}


def _evaluation_results(run: RunData) -> Grid:
    """Returns one row per benchmark: questions, samples, accuracy, format rate, outcomes and every pass@k / maj@k / avg@k."""
    metric_names = list(dict.fromkeys(name for result in run.evals for name in _estimates(result)))
    headers = ["benchmark", "questions", "samples per question", "accuracy", "format rate", "outcomes", *metric_names]
    rows = []
    for result in run.evals:
        values, estimates = result.values, (result.summary or {}).get("estimates")
        estimates = estimates if isinstance(estimates, dict) else {}
        sampling = values.get("sampling") if isinstance(values.get("sampling"), dict) else {}
        rows.append([result.name or "eval", format_number(estimates.get("n_questions", values.get("n_questions", "—"))),
                     format_number(estimates.get("n_samples", sampling.get("n", "—"))),
                     format_rate(values.get("accuracy")), format_rate(values.get("format_rate")),
                     _outcomes_text(result.records) or "—",
                     *(format_figure(_estimates(result).get(name)) for name in metric_names)])
    return Grid(headers, rows)


def _evaluation_sampling(run: RunData) -> Grid:
    """Returns how each benchmark was sampled (temperature, top-p, max new tokens, samples, template) as the summaries record it."""
    columns = []
    for result in run.evals:
        summary = result.summary or {}
        sampling = summary.get("sampling") if isinstance(summary.get("sampling"), dict) else {}
        settings = {key: sampling[key] for key, _ in SAMPLING_SETTINGS if key in sampling}
        if isinstance(summary.get("template"), str):
            settings["template"] = summary["template"]
        estimates = summary.get("estimates") if isinstance(summary.get("estimates"), dict) else {}
        if "template" not in settings and isinstance(estimates.get("prompt"), str):
            settings["template"] = clip_head(estimates["prompt"], 80)
        if isinstance(summary.get("env"), str):  # a summary naming none was written by the single-turn environment
            settings["env"] = summary["env"]
        for key in ("seed", "reward"):
            if key in sampling or key in summary:
                settings[key] = sampling.get(key, summary.get(key))
        columns.append(settings)
    if any("env" in one for one in columns):
        for one in columns:
            one.setdefault("env", "math")
    keys = [(key, label) for key, label in (*SAMPLING_SETTINGS, ("seed", "seed"), ("reward", "reward"))
            if any(key in one for one in columns)]
    return Grid(["", *(result.name or "eval" for result in run.evals)],
                [[label, *(str(one.get(key, "—")) for one in columns)] for key, label in keys])


def _evaluation_sections(run: RunData, plots: list[tuple[str, str]]) -> list[Section]:
    sampling = _evaluation_sampling(run)
    tool_sections = evaluation_tool_sections(run)
    sections = [Section("Results", [_evaluation_results(run),
                                    Text("Estimates in percent with their 95% percentile bootstrap interval over "
                                         "questions; pass@k is the unbiased estimator, maj@k and avg@k use the first "
                                         "k samples of each question.")]),
                *tool_sections[:1],
                Section("How it was sampled", [sampling] if sampling.rows else [
                    Text("The summaries record no sampling settings.", empty=True)]),
                Section("Configuration", _configuration(run)),
                Section("Plots", _curves(plots, "No graded records (records.jsonl) to plot.")),
                *tool_sections[1:]]
    samples: list[Block] = []
    for result in run.evals:
        if result.records:
            samples += _samples_of(result, result.name or "this evaluation")
    sections.append(Section("Sample generations", samples or [Text("No graded records (records.jsonl).", empty=True)]))
    return sections


def _comparison_sections(run: RunData, plots: list[tuple[str, str]]) -> list[Section]:
    comparison = run.comparison
    baseline = comparison.runs[0]
    headers = ["benchmark", "metric", "questions", *comparison.runs,
               *(f"{label} − {baseline} (p)" for label in comparison.runs[1:])]
    rows = [[row["benchmark"], row["metric"], format_number(row["n_questions"]),
             *(format_figure(value) for value in row["values"]),
             *(f"{100 * d['difference']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}] "
               f"(p {format_p_value(d['p_value'])})" for d in row["differences"])] for row in comparison.rows]
    settings = comparison.settings
    table: list[Block] = [Grid(headers, rows) if rows else Text("No metric could be compared (see the notes).", empty=True),
                          Text(f"Percent; brackets: 95% percentile bootstrap over the matched questions "
                               f"({settings.get('n_bootstrap', '?')} resamples, seed {settings.get('seed', '?')}); "
                               f"differences against the baseline {baseline}, p from a paired bootstrap, two-sided.")]
    if comparison.notes:
        table.append(Bullets(comparison.notes, lead="Left out:"))
    sampling: list[Block] = []
    for benchmark, per_run in comparison.sampling.items():
        differing = set(sampling_differences(per_run))
        sampling.append(Grid([benchmark, *comparison.runs],
                             [[f"{label}{' (differs)' if key in differing else ''}",
                               *(str(one.get(key, "?")) for one in per_run)]
                              for key, label in SAMPLING_SETTINGS if any(key in one for one in per_run)]))
    paths = settings.get("paths")
    runs = ([Bullets([f"{label}: {path}" for label, path in zip(comparison.runs, paths)])]
            if isinstance(paths, list) else [])
    return [Section("Comparison", table), *comparison_tool_sections(comparison),
            Section("How each run was sampled", sampling or [Text("The evaluations record no sampling settings.",
                                                                   empty=True)]),
            Section("Plot", _curves(plots, "No rows to plot.")),
            *([Section("Runs", runs)] if runs else [])]


def build_page(run: RunData, plots: list[tuple[str, str]], generated_at: str) -> Page:
    """Returns the page of ``run``: its sections for its kind (training run, evaluation, comparison), in plain text."""
    notices: list[Block] = []
    if run.kind == "compare":
        sections = _comparison_sections(run, plots)
        if run.comparison.warnings:
            notices.append(Notice("The runs were not evaluated alike:", run.comparison.warnings))
    elif run.kind == "eval":
        sections = _evaluation_sections(run, plots)
    else:
        if not run.train and not run.evals:
            notices.append(Text("Nothing to show yet: this directory has no training metrics (metrics.jsonl) and no "
                                "evaluation results (eval/step-N/).", notice=True))
        sections = _training_sections(run, plots)
    if run.problems:
        notices.append(Notice("Some input was skipped:", run.problems))
    who = f", written by reasontune {run.command}" if run.command else ""
    return Page(title=f"{TITLES.get(run.kind, 'Run report')}: {run.run_dir.name}",
                location=f"{run.run_dir}{who}; report written {generated_at}", notices=notices, sections=sections)


# ---------------------------------------------------------------------------------------------
# HTML


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


def _html_block(block: Block) -> str:
    if isinstance(block, Text):
        css = " class='empty'" if block.empty else " class='notice'" if block.notice else ""
        return f"<p{css}>{_e(block.text)}</p>"
    if isinstance(block, KeyValues):
        return "<table>" + "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in block.rows) + "</table>"
    if isinstance(block, Grid):
        return ("<table><tr>" + "".join(f"<th>{_e(h)}</th>" for h in block.headers) + "</tr>"
                + "".join("<tr>" + "".join(f"<td>{_e(cell)}</td>" for cell in row) + "</tr>" for row in block.rows)
                + "</table>")
    if isinstance(block, Bullets):
        lead = f"<p>{_e(block.lead)}</p>" if block.lead else ""
        return lead + "<ul>" + "".join(f"<li>{_e(item)}</li>" for item in block.items) + "</ul>"
    if isinstance(block, Notice):
        return (f"<div class='notice'><strong>{_e(block.heading)}</strong><ul>"
                + "".join(f"<li>{_e(item)}</li>" for item in block.items) + "</ul></div>")
    if isinstance(block, Figures):
        return "".join(f"<figure><img src='{_e(name)}' alt='{_e(caption)}'><figcaption>{_e(caption)}</figcaption></figure>"
                       for name, caption in block.plots)
    if isinstance(block, FullConfig):
        return f"<details><summary>Full resolved config</summary><pre>{_e(block.text)}</pre></details>"
    if isinstance(block, Code):
        return f"<p>{_e(block.label)}</p><pre>{_e(block.text)}</pre>"
    if isinstance(block, Card):
        css = "" if block.good is None else " correct" if block.good else " incorrect"
        return (f"<div class='sample{css}'><p><strong>{_e(block.heading)}</strong></p>"
                + "".join(_html_block(inner) for inner in block.blocks) + "</div>")
    css = "correct" if block.outcome == "correct" else "incorrect"
    length = f", response length {_e(block.length)}" if block.length is not None else ""
    return (f"<div class='sample {css}'><p><strong>{_e(block.outcome)}</strong> ({_e(block.source)}) — rewards: "
            f"{_e(block.rewards or 'none recorded')}{length}</p>"
            f"<p>Prompt (end):</p><pre>{_e(block.prompt_tail)}</pre>"
            f"<p>Response:</p><pre>{_e(block.response)}</pre>"
            f"<p>Ground truth: <code>{_e(block.ground_truth)}</code></p></div>")


def render_html(page: Page) -> str:
    """Returns the page as self-contained HTML (images referenced relatively), every value escaped."""
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{_e(page.title)}</title>"
             f"<style>{_CSS}</style></head><body>", f"<h1>{_e(page.title)}</h1>", f"<p>{_e(page.location)}.</p>"]
    parts += [_html_block(block) for block in page.notices]
    for section in page.sections:
        parts.append(f"<h2>{_e(section.title)}</h2>")
        parts += [_html_block(block) for block in section.blocks]
    parts.append("</body></html>\n")
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------
# Markdown


def _md(text: Any) -> str:
    """Escapes text for a Markdown paragraph or table cell (no raw HTML, no table breaks, no links or emphasis)."""
    text = str(text).replace("\\", "\\\\").replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    for character in "|`[]*":
        text = text.replace(character, "\\" + character)
    return text.replace("\r", " ").replace("\n", " ")


def _md_code_block(text: str) -> str:
    # A fence longer than any run of backticks inside keeps model text from closing it.
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}text\n{text}\n{fence}"


def _md_block(block: Block) -> list[str]:
    if isinstance(block, Text):
        return [_md(block.text)]
    if isinstance(block, KeyValues):
        return ["| | |", "|---|---|"] + [f"| {_md(k)} | {_md(v)} |" for k, v in block.rows]
    if isinstance(block, Grid):
        return (["| " + " | ".join(_md(h) for h in block.headers) + " |", "|" + "---|" * len(block.headers)]
                + ["| " + " | ".join(_md(cell) for cell in row) + " |" for row in block.rows])
    if isinstance(block, Bullets):
        return ([_md(block.lead), ""] if block.lead else []) + [f"- {_md(item)}" for item in block.items]
    if isinstance(block, Notice):
        return [f"**{_md(block.heading)}**", ""] + [f"- {_md(item)}" for item in block.items]
    if isinstance(block, Figures):
        return [f"![{_md(caption)}]({name})\n" for name, caption in block.plots]
    if isinstance(block, FullConfig):
        return []
    if isinstance(block, Code):
        return [_md(block.label), "", _md_code_block(block.text)]
    if isinstance(block, Card):
        lines = [f"### {_md(block.heading)}"]
        for inner in block.blocks:
            lines += [""] + _md_block(inner)
        return lines
    length = f", response length {_md(block.length)}" if block.length is not None else ""
    return [f"### {_md(block.outcome)} ({_md(block.source)}) — rewards: {_md(block.rewards or 'none recorded')}{length}",
            "", "Prompt (end):", "", _md_code_block(block.prompt_tail), "", "Response:", "",
            _md_code_block(block.response), "", "Ground truth:", "", _md_code_block(block.ground_truth)]


def render_markdown(page: Page) -> str:
    """Returns the page as Markdown (images relative, model text inside code fences, no full config)."""
    lines = [f"# {_md(page.title)}", "", f"{_md(page.location)}.", ""]
    for block in page.notices:
        lines += _md_block(block) + [""]
    for section in page.sections:
        lines += [f"## {_md(section.title)}", ""]
        for block in section.blocks:
            if rendered := _md_block(block):
                lines += rendered + [""]
    return "\n".join(lines)
