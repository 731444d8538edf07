"""The report's plots: training and rollout curves of a run, the evaluation plots of an eval directory, the bars of a comparison.

``build_plots`` returns the figures (tests read their axes); ``write_plots`` saves them. Each
plot is drawn only from what the directory holds, and its title names only the curves drawn
(a GRPO run without a KL term gets "Clipped tokens", not "… and KL"). Steps are whole numbers
on every x axis.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from matplotlib.figure import Figure

from reasontune.compare import plot_comparison
from reasontune.eval_plots import accuracy_by_length_figure, length_by_category_figure, pass_at_k_figure
from reasontune.plotting import fraction_axis, integer_steps, log_scale_if_wide, new_axes, new_figure, save, style_axes
from reasontune.report.reading import RunData, eval_rows, graded_records, series
from reasontune.report.tools import is_share, tool_metric_keys

# Rollout curves of GRPO / EI from the train lines: (file, y label, fraction axis, title when every curve is
# drawn or None to name the drawn ones, [(key, legend label, title part)]).
ROLLOUT_PLOTS = (
    ("rollout_reward.png", "mean reward per response", True, "Rollout reward",
     [("reward", "reward", ""), ("format_reward", "format reward", ""), ("answer_reward", "answer reward", "")]),
    ("rollout_accuracy.png", "fraction of rollouts", True, None,
     [("accuracy", "accuracy (answer reward 1)", "rollout accuracy"),
      ("pass_at_n", "pass@group (a question solved by some sample)", "pass@group"),
      ("format_rate", "format rate", "format rate")]),
    ("clip_fraction_kl.png", "per token", False, None,
     [("clip_fraction", "clip fraction", "clipped tokens"), ("kl", "KL (k3) to the starting model", "KL to the reference")]),
    ("rollout_length.png", "mean response length (tokens)", False, "Rollout response length",
     [("mean_response_tokens", "all", ""), ("mean_response_tokens_correct", "correct", ""),
      ("mean_response_tokens_incorrect", "incorrect", ""), ("mean_response_tokens_truncated", "truncated", "")]),
    ("ei_kept.png", "responses", False, "Kept responses per EI step",
     [("kept", "kept (correct)", ""), ("samples", "sampled", "")]),
)
COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red")
# Above this many points a curve is drawn faint, with its moving average over it.
MANY_POINTS = 40
TOOL_PANELS_PER_FIGURE = 3


def title_of(parts: list[str]) -> str:
    """Returns a title naming ``parts`` in order ("A", "A and B", "A, B and C"), its first letter capitalised."""
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return text[:1].upper() + text[1:]


def moving_average(values: list[float], window: int) -> list[float]:
    """Returns the trailing mean over ``window`` values at each point, non-finite values left out (NaN where none is finite)."""
    averaged, finite = [], []
    for value in values:
        finite.append(value if math.isfinite(value) else None)
        window_values = [v for v in finite[-window:] if v is not None]
        averaged.append(sum(window_values) / len(window_values) if window_values else math.nan)
    return averaged


def plot_training_curve(axes, steps: list[int], values: list[float], label: str, color: str) -> None:
    """Returns nothing; draws one per-step curve, faint with its moving average over it when it has many points."""
    many = len(steps) > MANY_POINTS
    axes.plot(steps, values, color=color, alpha=0.35 if many else 1.0, linewidth=1.0,
              marker=None if many else ".", label=label if not many else f"{label} (per step)")
    if many:
        window = max(5, len(steps) // 25)
        axes.plot(steps, moving_average(values, window), color=color, linewidth=2.0,
                  label=f"{label} (moving average of {window})")


@dataclasses.dataclass
class Plot:
    """One figure of the report, drawn and not yet written: its file name and caption beside the page."""

    file_name: str
    caption: str
    figure: Figure


def build_plots(run: RunData) -> list[Plot]:
    """Returns the figures of ``run``'s report, in page order; plots without data are left out.

    Rollout curves are drawn wherever a run's train lines hold them (GRPO and EI log them), so
    nothing depends on recognising the trainer.
    """
    if run.kind == "compare":
        return []  # compare draws its own bars (``write_plots``)
    if run.kind == "eval":
        return evaluation_plots(run)
    return rollout_plots(run) + tool_plots(run) + loss_plots(run) + training_curves(run) + validation_plots(run)


def write_plots(run: RunData, out_dir: Path) -> list[tuple[str, str]]:
    """Returns (file name, caption) of each PNG written into ``out_dir``."""
    if run.kind == "compare":
        if not run.comparison.rows:
            return []
        plot_comparison(run.comparison, out_dir / "comparison.png")
        return [("comparison.png", "Runs compared (bars: 95% bootstrap intervals over matched questions)")]
    written = []
    for plot in build_plots(run):
        save(plot.figure, out_dir / plot.file_name)
        written.append((plot.file_name, plot.caption))
    return written


def _finished(figure: Figure, axes_list, file_name: str, caption: str) -> Plot:
    for axes in axes_list:
        integer_steps(axes)
        axes.legend(loc="best")
    return Plot(file_name, caption, figure)


def loss_plots(run: RunData) -> list[Plot]:
    """Returns loss.png: the loss as optimised and, where it is not already the per-token NLL, that NLL beside it.

    A summed loss (SFT's ``sequence_sum``, a constant normaliser) grows with response length:
    its value says little, while the per-token NLL is what a reader compares across runs.
    """
    steps, losses = series(run.train, "loss")
    if not steps:
        return []
    nll_steps, nlls = series(run.train, "mean_token_nll")
    if not _differs(steps, losses, nll_steps, nlls):
        figure, axes = new_axes("Training loss", "loss", run.step_unit)
        plot_training_curve(axes, steps, losses, "loss", "tab:blue")
        log_scale_if_wide(axes, losses)
        return [_finished(figure, [axes], "loss.png", "Training loss")]
    aggregation = (run.config or {}).get("loss_aggregation")
    how = f" ({aggregation})" if isinstance(aggregation, str) else ""
    figure, (left, right) = new_figure(2)
    style_axes(left, f"Training loss as optimised{how}", "loss", run.step_unit)
    plot_training_curve(left, steps, losses, "loss", "tab:blue")
    log_scale_if_wide(left, losses)
    style_axes(right, "Per-token NLL of the response tokens", "nats per token", run.step_unit)
    plot_training_curve(right, nll_steps, nlls, "mean token NLL", "tab:purple")
    return [_finished(figure, [left, right], "loss.png", f"Training loss as optimised{how} and the per-token NLL")]


def _differs(steps: list[int], losses: list[float], nll_steps: list[int], nlls: list[float]) -> bool:
    """Returns whether any logged per-token NLL is not the loss of its step (a token-mean loss is that NLL already)."""
    by_step = dict(zip(steps, losses))
    return any(step not in by_step or not math.isclose(by_step[step], nll, rel_tol=1e-6, abs_tol=1e-9)
               for step, nll in zip(nll_steps, nlls) if math.isfinite(nll))


def training_curves(run: RunData) -> list[Plot]:
    """Returns the learning-rate and gradient-norm curves."""
    plots = []
    for key, title, ylabel, file_name, color in (
        ("lr", "Learning rate", "learning rate", "learning_rate.png", "tab:green"),
        ("grad_norm", "Gradient norm (before clipping)", "global L2 norm", "grad_norm.png", "tab:red"),
    ):
        steps, values = series(run.train, key)
        if not steps:
            continue
        figure, axes = new_axes(title, ylabel, run.step_unit)
        plot_training_curve(axes, steps, values, key, color)
        if key != "lr":
            log_scale_if_wide(axes, values)
        plots.append(_finished(figure, [axes], file_name, title))
    return plots


def validation_plots(run: RunData) -> list[Plot]:
    """Returns the in-loop evaluation curves (accuracy and format rate, entropy, response length) by step."""
    plots = []
    evals, unit = eval_rows(run), run.step_unit
    accuracy_steps, accuracy = series(evals, "accuracy")
    format_steps, format_rate = series(evals, "format_rate")
    if accuracy_steps or format_steps:
        title = "Validation " + " and ".join(name for name, steps in (("accuracy", accuracy_steps),
                                                                      ("format rate", format_steps)) if steps)
        figure, axes = new_axes(title, "fraction of validation examples", unit)
        if accuracy_steps:
            axes.plot(accuracy_steps, accuracy, marker="o", color="tab:blue", label="accuracy (answer reward 1)")
        if format_steps:
            axes.plot(format_steps, format_rate, marker="s", linestyle="--", color="tab:orange", label="format rate")
        fraction_axis(axes)
        plots.append(_finished(figure, [axes], "accuracy.png", title))

    train_entropy_steps, train_entropy = series(run.train, "token_entropy")
    eval_entropy_steps, eval_entropy = series(evals, "mean_entropy")
    if train_entropy_steps or eval_entropy_steps:
        figure, axes = new_axes("Response token entropy", "entropy (nats per token)", unit)
        if train_entropy_steps:
            plot_training_curve(axes, train_entropy_steps, train_entropy, "training responses", "tab:purple")
        if eval_entropy_steps:
            axes.plot(eval_entropy_steps, eval_entropy, marker="o", color="tab:brown", label="validation generations")
        plots.append(_finished(figure, [axes], "entropy.png", "Response token entropy"))

    length_steps, lengths = series(evals, "mean_response_tokens")
    if length_steps:
        figure, axes = new_axes("Validation response length", "mean response length (tokens)", unit)
        axes.plot(length_steps, lengths, marker="o", color="tab:cyan", label="all responses")
        axes.set_ylim(bottom=0)
        plots.append(_finished(figure, [axes], "response_length.png", "Validation response length"))
    return plots


def rollout_plots(run: RunData) -> list[Plot]:
    """Returns the rollout plots of the train lines that hold them (reward, accuracy, clip fraction and KL, lengths, EI's kept)."""
    plots = []
    for file_name, ylabel, fraction, fixed_title, keys in ROLLOUT_PLOTS:
        drawn = [(label, part, *series(run.train, key)) for key, label, part in keys]
        drawn = [(label, part, steps, values) for label, part, steps, values in drawn if steps]
        if not drawn:
            continue
        title = fixed_title or title_of([part for _, part, _, _ in drawn])
        figure, axes = new_axes(title, ylabel, run.step_unit)
        for (label, _, steps, values), color in zip(drawn, COLORS):
            plot_training_curve(axes, steps, values, label, color)
        if fraction:
            fraction_axis(axes)
        plots.append(_finished(figure, [axes], file_name, title))
    return plots


def tool_plots(run: RunData) -> list[Plot]:
    """Returns tool_use.png (then tool_use_2.png …): the tool metrics of the train lines (``tools.is_tool_metric``), three panels a figure.

    The shares (``tools.is_share``: call rate, error rate, accuracy with and without a call)
    share one percent panel, with the in-loop evaluations' shares as dashed markers; every other
    tool metric (calls in all, calls per trajectory, seconds) gets its own panel, as their units differ.
    """
    keys = tool_metric_keys(run.train)
    evals = eval_rows(run)
    shares = [key for key in keys if is_share(key, series(run.train, key)[1])]
    eval_shares = [key for key in tool_metric_keys(evals) if is_share(key, series(evals, key)[1])]
    panels = ([("shares", shares)] if shares or (keys and eval_shares) else []) + [(key, [key]) for key in keys
                                                                                   if key not in shares]
    plots = []
    for first in range(0, len(panels), TOOL_PANELS_PER_FIGURE):
        chosen = panels[first:first + TOOL_PANELS_PER_FIGURE]
        figure, axes_list = new_figure(len(chosen))
        for (name, panel_keys), axes in zip(chosen, axes_list):
            if name == "shares":
                style_axes(axes, "Tool use (shares)", "fraction", run.step_unit)
                colors = {key: f"C{index}" for index, key in enumerate(dict.fromkeys(shares + eval_shares))}
                for key in shares:
                    plot_training_curve(axes, *series(run.train, key), key, colors[key])
                for key in eval_shares:
                    axes.plot(*series(evals, key), marker="o", linestyle="--", color=colors[key], label=f"{key} (validation)")
                fraction_axis(axes)
            else:
                style_axes(axes, name.replace("_", " "), name, run.step_unit)
                plot_training_curve(axes, *series(run.train, name), name, "tab:blue")
        number = first // TOOL_PANELS_PER_FIGURE + 1
        plots.append(_finished(figure, axes_list, f"tool_use{'' if number == 1 else f'_{number}'}.png",
                               "Tool use per step: " + ", ".join(key for _, panel_keys in chosen for key in panel_keys)))
        if chosen[0][0] == "shares":  # up to eight curves in one panel: a smaller legend hides less of them
            axes_list[0].legend(loc="best", fontsize="small")
    return plots


def evaluation_plots(run: RunData) -> list[Plot]:
    """Returns the plots of an eval directory: pass@k against k (when there are several k), then per benchmark accuracy by length and length by outcome."""
    by_benchmark = {result.name or "eval": records for result in run.evals if (records := graded_records(result.records))}
    if not by_benchmark:
        return []
    plots = []
    if (figure := pass_at_k_figure(by_benchmark)) is not None:
        plots.append(Plot("pass_at_k.png", "pass@k against k (unbiased; band: 95% bootstrap over questions)", figure))
    for name, records in by_benchmark.items():
        label = name if len(by_benchmark) > 1 else ""
        suffix = f" ({name})" if label else ""
        plots.append(Plot(f"accuracy_by_length{f'_{label}' if label else ''}.png", f"Accuracy by response length{suffix}",
                          accuracy_by_length_figure(records, label)))
        plots.append(Plot(f"length_by_category{f'_{label}' if label else ''}.png", f"Response length by outcome{suffix}",
                          length_by_category_figure(records, label)))
    return plots
