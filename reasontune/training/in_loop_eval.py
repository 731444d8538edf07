"""Evaluation inside a training loop, the same for SFT, expert iteration and GRPO: what is evaluated, how it is sampled, the log line.

Each evaluation writes ``eval/step-N/`` as ``reasontune eval`` would (records.jsonl,
summary.json; a benchmark's under ``eval/step-N/NAME/``) and logs an ``eval`` line to
metrics.jsonl.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any, Sequence

import torch

from reasontune import distributed
from reasontune.benchmarks import load_benchmarks
from reasontune.data import Example
from reasontune.environments import Environment
from reasontune.evaluation import EvalSet, evaluate_sets
from reasontune.generation import Generator, SamplingOptions
from reasontune.options import TrainerOptions
from reasontune.run_layout import eval_step_dir, eval_step_name
from reasontune.training.data_parallel import generation_model


def evaluation_sampling(config: TrainerOptions, backend: str) -> SamplingOptions:
    """Returns the sampling options of in-loop evaluation (each set's stop strings follow its reward: ``evaluate_sets``)."""
    return SamplingOptions(temperature=config.eval_temperature, top_p=config.eval_top_p,
                           max_new_tokens=config.eval_max_new_tokens, n=config.eval_n_samples, seed=config.seed,
                           return_entropy=backend == "hf")


def evaluation_sets(config: TrainerOptions, validation: Sequence[Example], template: str) -> list[EvalSet]:
    """Returns what in-loop evaluation covers: the validation examples, then each of ``--eval-benchmarks`` (run's template and reward)."""
    sets = [EvalSet("", list(validation), template, config.reward_name)] if validation else []
    if config.eval_benchmarks and config.eval_examples:
        for name, benchmark in load_benchmarks(config.eval_benchmarks, config.benchmark_dir, config.eval_examples,
                                               config.seed).items():
            sets.append(EvalSet(name, benchmark.examples.examples, template, config.reward_name, benchmark.question_ids))
    return sets


def evaluate_policy(step: int, model, generator: Generator, sets: Sequence[EvalSet], run_dir: Path, *,
                    sampling: SamplingOptions, grading_workers: int | None = None,
                    ctx: distributed.DistributedContext | None = None, environment: Environment | None = None) -> dict:
    """Returns the summary of generating and grading every evaluation set with the current weights.

    Writes ``eval/step-<N>/records.jsonl`` and ``summary.json`` as ``reasontune eval`` does (a
    benchmark's under ``eval/step-<N>/<name>/``). With several sets the summary holds the mean
    accuracy, format rate and length over the sets and ``sets`` with each one's. The RNG is
    forked so that sampling in evaluation never changes the training run's random stream; the
    generator sleeps afterwards (giving a shared GPU back to training). Under torchrun (``ctx``)
    every rank calls it, with an unsharded ``model`` for the HF generator (a vLLM generator takes
    the sharded one, gathered layer by layer): each generates its slice of every set and rank 0
    writes the records, gathered in the original order. ``environment`` (a trainer's ``--env``)
    evaluates with the tool as the rollouts use it (``eval_max_new_tokens`` bounds each model turn).
    """
    generator.sync_weights(model)
    with torch.random.fork_rng(devices=[]):
        summaries = evaluate_sets(generator, sets, sampling, eval_step_dir(run_dir, step),
                                  ks=sorted({1, sampling.n}), n_bootstrap=200, seed=sampling.seed or 0,
                                  grading_workers=grading_workers, plots=False, ctx=ctx, environment=environment)
    generator.sleep()
    if len(summaries) == 1:
        return next(iter(summaries.values()))
    mean = {key: statistics.fmean(s[key] for s in summaries.values() if s[key] is not None)
            for key in ("accuracy", "format_rate", "mean_response_tokens")}
    return {**mean, "mean_entropy": None, "sets": summaries}


def log_evaluation(session: Any, step: int, sampling: SamplingOptions, progress: Any = None) -> dict:
    """Returns the evaluation summary of ``session``'s policy at ``step`` after logging it (rank 0); every rank calls it.

    ``session`` is a trainer's session (model, replica, generator, validation, run_dir, config,
    ctx, logger); a sharded policy generates through its refreshed unsharded replica. The
    accuracy line goes through ``progress`` (the loop's bar) when there is one, else to stdout.
    """
    summary = evaluate_policy(step, generation_model(session.model, session.replica), session.generator,
                              session.validation, session.run_dir, sampling=sampling,
                              grading_workers=session.config.grading_workers, ctx=session.ctx,
                              environment=getattr(session, "environment", None))
    if session.logger is not None:
        session.logger.log("eval", step, **eval_metrics(summary, step))
        line = f"step {step}: accuracy {summary['accuracy']:.3f}, format rate {summary['format_rate']:.3f}"
        if progress is not None:
            progress.write(line)
        else:
            print(line, flush=True)
    return summary


def eval_metrics(summary: dict, step: int) -> dict:
    """Returns the fields of an evaluation summary that a trainer logs as its ``eval`` metrics line (per set: ``accuracy/<name>``)."""
    per_set = {f"accuracy/{name}": each["accuracy"] for name, each in summary.get("sets", {}).items()}
    return {"accuracy": summary["accuracy"], "format_rate": summary["format_rate"],
            "mean_response_tokens": summary.get("mean_response_tokens"), "mean_entropy": summary.get("mean_entropy"),
            **per_set, **{key: summary[key] for key in ("tool_call_rate", "tool_error_rate", "accuracy_with_tool",
                                                       "accuracy_without_tool") if key in summary},
            "dir": eval_step_name(step)}
