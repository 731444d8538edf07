"""The ``eval`` command: generate answers for a dataset, grade them, write records.jsonl and summary.json.

Generation, grading, records and statistics are the one rollout path of
``reasontune.rollouts``; this module adds the command around it: data, model, generator,
and the files of an evaluation directory.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, Sequence

import torch
import torch.distributed as dist

from reasontune.benchmarks import BENCHMARKS, STANDARD_PROMPT, STANDARD_REWARD, load_benchmarks, resolve_benchmarks
from reasontune.config import UserError, help_field, same_field, save_config
from reasontune.environments import Environment, build_environment
from reasontune.data import Example, load_examples, load_template, with_chat_template
from reasontune.estimators import parse_ks, results_table, summarize_samples
from reasontune.eval_plots import write_eval_plots
from reasontune.generation import Generator, SamplingOptions, VLLMServerOptions, build_generator
from reasontune.modeling import load_model, load_tokenizer
from reasontune.options import (EvaluationOptions, GenerationOptions, GradingOptions, ModelOptions, RunOptions,
                                TaskOptions, TrackingOptions, data_source_problems, resolved_dtype)
from reasontune import distributed, launch
from reasontune.run_layout import (CONFIG_FILE, EVAL_METRICS_FILE, RECORDS_FILE, REPORT_DIR, RESULTS_FILES,
                                   SUMMARY_FILE, is_training_run)
from reasontune.rollouts import (RewardFn, generate_rollouts, merge_rollouts, reward_fn_by_name, rollouts_for_examples,
                                 stop_sequences)


def evaluate(generator: Generator, examples: Sequence[Example], reward_fn: RewardFn, options: SamplingOptions,
             output_dir: str | Path | None = None, template: str = "r1_zero", grading_workers: int | None = None
             ) -> dict[str, Any]:
    """Returns ``{"summary": dict, "records": list[dict]}`` for ``examples`` (``options.n`` samples each).

    ``template`` is a shipped name, a file path, or template text containing ``{question}``;
    examples with a fixed ``prompt`` use it verbatim. With ``output_dir``, writes
    ``records.jsonl`` (one line per sample) and ``summary.json`` there.
    """
    template_text = template if "{question}" in template else load_template(template)
    rollouts = rollouts_for_examples(generator, examples, template_text, options, reward_fn,
                                     grading_workers=grading_workers)
    summary = rollouts.write(output_dir) if output_dir is not None else rollouts.summary()
    return {"summary": summary, "records": rollouts.records()}


def log_generations(generator: Generator, prompts: Sequence[str], ground_truths: Sequence[Any], reward_fn: RewardFn,
                    options: SamplingOptions, grading_workers: int | None = None) -> dict[str, Any]:
    """Returns ``{"records", "summary"}`` of already-formatted prompts under the field names of the user's seed 001.

    A view of ``generate_rollouts``: each record has prompt, response, ground_truth,
    format_reward, answer_reward, reward, avg_token_entropy (None without entropies) and
    response_length (tokens); the summary accuracy, format_rate, mean_response_length (and
    _correct / _incorrect), mean_token_entropy and n_samples, plus the timing.
    """
    rollouts = generate_rollouts(generator, prompts, ground_truths, options, reward_fn, grading_workers=grading_workers)
    records = [{"prompt": r["prompt"], "response": r["response"], "ground_truth": r["ground_truth"],
                "format_reward": r["format_reward"], "answer_reward": r["answer_reward"], "reward": r["reward"],
                "avg_token_entropy": r["mean_entropy"], "response_length": r["response_tokens"]}
               for r in rollouts.records()]
    summary = rollouts.summary()
    renamed = {"mean_response_length": "mean_response_tokens", "mean_response_length_correct": "mean_response_tokens_correct",
               "mean_response_length_incorrect": "mean_response_tokens_incorrect", "mean_token_entropy": "mean_entropy"}
    return {"records": records, "summary": {
        "accuracy": summary["accuracy"], "format_rate": summary["format_rate"],
        **{seed_name: summary[ours] for seed_name, ours in renamed.items()},
        "n_samples": summary["n_samples"], **rollouts.timing}}


@dataclass
class EvalSet:
    """One named set of examples to evaluate, with its prompt template (text) and reward name."""

    name: str
    examples: list[Example]
    template: str
    reward: str
    question_ids: list[str] | None = None


def evaluate_sets(generator: Generator, sets: Sequence[EvalSet], sampling: SamplingOptions, output_dir: str | Path, *,
                  ks: Sequence[int] = (1,), n_bootstrap: int = 1000, seed: int = 0, grading_workers: int | None = None,
                  plots: bool = True, stop: Sequence[str] | None = None,
                  extra_summary: dict[str, Any] | None = None,
                  ctx: distributed.DistributedContext | None = None,
                  environment: Environment | None = None) -> dict[str, dict[str, Any]]:
    """Returns ``{set name: summary}`` after generating, grading and writing each set; with several sets, one table too.

    Each set's ``records.jsonl`` and ``summary.json`` go to ``output_dir/<name>/`` (straight into
    ``output_dir`` for a single set named ``""``); every summary carries ``estimates``: pass@k,
    maj@k and avg@k for each k (up to the samples drawn) with 95% bootstrap intervals over
    questions, beside the sample count, seed, temperature and prompt they were made with.
    ``results.md`` / ``results.json`` and the plots (pass@k against k, accuracy by length,
    length by outcome) are written into ``output_dir``. ``stop`` strings (default: ``</answer>``
    for a set graded by the r1_zero reward, none otherwise) end each response.

    ``environment`` (None: single-turn) makes each sample a trajectory of model and
    environment turns (``--env python``: tool calls), every turn in the records.

    Under torchrun (``ctx`` with world size > 1) every rank calls it: each generates and grades
    its ``rank_slice`` of every set's questions with its own (unsharded) generator, the slices
    are gathered in the original order, and rank 0 alone writes the files; every rank gets the
    summaries back.
    """
    out = Path(output_dir)
    sharded = ctx is not None and ctx.is_distributed
    writes = ctx is None or ctx.is_main
    summaries: dict[str, dict[str, Any]] = {}
    records_by_set: dict[str, list[dict[str, Any]]] = {}
    for eval_set in sets:
        options = sampling.replace(stop=tuple(stop) if stop is not None else stop_sequences(eval_set.reward, eval_set.template))
        examples = eval_set.examples
        if sharded:  # this rank's slice; a question's samples seeded by its index in the set, as in one process
            part = distributed.rank_slice(len(examples), ctx)
            examples, options = list(examples[part]), options.replace(first_prompt_index=part.start)
        rollouts = rollouts_for_examples(generator, examples, eval_set.template, options,
                                         reward_fn_by_name(eval_set.reward), grading_workers=grading_workers,
                                         environment=environment)
        if sharded:
            rollouts = merge_rollouts(distributed.all_gather_objects(rollouts))
        rollouts.question_ids = eval_set.question_ids
        records = rollouts.records()
        usable_ks = [k for k in ks if k <= sampling.n] or [1]
        estimates = summarize_samples(records, usable_ks, n_bootstrap=n_bootstrap, seed=seed, n_samples=sampling.n,
                                      temperature=sampling.temperature, prompt=eval_set.template) if records else None
        extra = {"benchmark": eval_set.name or None, "reward": eval_set.reward, "estimates": estimates,
                 **(extra_summary or {})}
        summaries[eval_set.name or "eval"] = rollouts.write(out / eval_set.name, extra_summary=extra) if writes \
            else {**rollouts.summary(), **extra}
        records_by_set[eval_set.name or "eval"] = records
    with_estimates = {name: summary["estimates"] for name, summary in summaries.items() if summary["estimates"]}
    if with_estimates and writes:
        markdown, table = results_table(with_estimates)
        (out / "results.md").write_text(markdown, encoding="utf-8")
        (out / "results.json").write_text(json.dumps(table, indent=2) + "\n", encoding="utf-8")
    if plots and writes and any(records_by_set.values()):
        write_eval_plots({name: records for name, records in records_by_set.items() if records}, out,
                         n_bootstrap=min(n_bootstrap, 200), seed=seed)
    return summaries


@dataclass
class EvalConfig(TrackingOptions, GenerationOptions, GradingOptions, EvaluationOptions, TaskOptions, ModelOptions,
                 RunOptions):
    """Options of ``reasontune eval``."""

    command: ClassVar[str] = "eval"

    data: str | None = help_field(None, "evaluation data: JSONL/JSON/Parquet in any accepted format, or a hub dataset name (or use --benchmarks)", group="data")
    benchmarks: str | None = help_field(None, f"comma-separated benchmarks, or all: {', '.join(BENCHMARKS)} (hub datasets, or --benchmark-dir)", group="data")
    benchmark_dir: str | None = help_field(None, "read the benchmarks from local files <dir>/<name>.jsonl|.json|.parquet in each dataset's own schema instead of the hub", group="data")
    output_dir: str = help_field("", "directory for records.jsonl, summary.json and config.json (one subdirectory per benchmark, results.md/json)", group="data")
    max_examples: int | None = help_field(None, "evaluate a seeded random subset of this many examples (per benchmark)", group="data")
    prompt_template: str = help_field("auto", "prompt template: r1_zero, question_only, a file containing {question}, or auto (r1_zero for --data; each benchmark's standard prompt, with the question_only reward, for --benchmarks)", group="data")
    eval_n_samples: int = same_field(EvaluationOptions, "eval_n_samples", 1, aliases=("n-samples",))
    k: str = help_field("1", "comma-separated k of pass@k, maj@k and avg@k (each at most --n-samples), e.g. 1,4,16", group="evaluation")
    n_bootstrap: int = help_field(1000, "bootstrap resamples over questions for the 95% intervals", group="evaluation")
    stop: list[str] | None = help_field(None, "stop strings, kept in the output (default: </answer> when the reward is r1_zero or the prompt template asks for the tag, none otherwise)", group="evaluation")
    entropy: bool = help_field(True, "hf backend: record per-token entropy (mean per response in records)", group="evaluation")
    generation_batch_size: int = same_field(GenerationOptions, "generation_batch_size", 32)
    vllm_gpu_memory_utilization: float = same_field(GenerationOptions, "vllm_gpu_memory_utilization", 0.85)
    env: Literal["math", "python"] = help_field("math", "environment: math (one completion per sample) or python (the model may write <python>…</python>; each program runs in a fresh sandbox and its output follows in <output>…</output>; see docs/tools.md)", group="evaluation")
    max_tool_calls: int = help_field(4, "--env python: tool calls allowed per response (--eval-max-new-tokens bounds each model turn)", group="evaluation")
    tool_timeout: float = help_field(10.0, "--env python: wall-clock seconds of one program (its CPU seconds too)", group="evaluation")
    tool_output_bytes: int = help_field(4096, "--env python: bytes of a program's output kept; it is killed past them", group="evaluation")

    def problems(self) -> list[str]:
        """Returns what is wrong with this command's own options (data or benchmarks, k against the samples, …)."""
        problems = []
        if not self.output_dir or not (self.data or self.benchmarks):
            problems.append("reasontune eval needs --output-dir DIR and --data PATH or --benchmarks NAMES")
        if self.data and self.benchmarks:
            problems.append("--data / --benchmarks: give one of them, not both")
        if self.env == "python" and (self.max_tool_calls < 1 or self.tool_timeout <= 0 or self.tool_output_bytes < 1):
            problems.append(f"--max-tool-calls ({self.max_tool_calls}), --tool-timeout ({self.tool_timeout}) and "
                            f"--tool-output-bytes ({self.tool_output_bytes}) must be positive with --env python")
        if self.max_examples is not None and self.max_examples < 1:
            problems.append(f"--max-examples: must be >= 1, got {self.max_examples}")
        try:
            ks = parse_ks(self.k)
            if ks[-1] > self.eval_n_samples:
                problems.append(f"--k {self.k}: k = {ks[-1]} exceeds --n-samples {self.eval_n_samples}; "
                                f"draw at least {ks[-1]} samples")
        except ValueError as error:
            problems.append(f"--k: {error}")
        if self.benchmarks:
            try:
                resolve_benchmarks(self.benchmarks)
            except ValueError as error:
                problems.append(f"--benchmarks: {error}")
        return problems

    def machine_problems(self) -> list[str]:
        """Returns what is wrong with --data's file and --output-dir on this machine (see ``options.environment_problems``)."""
        return data_source_problems("--data", self.data) + eval_output_problems(self.output_dir)


def eval_output_problems(output_dir: str) -> list[str]:
    """Returns why ``output_dir`` must not receive an evaluation: a training run's directory, or one holding others' files.

    An earlier evaluation's directory (its config.json beside summary.json or results.json) may
    be written again; a training run's own files (its config.json) are never touched.
    """
    path = Path(output_dir) if output_dir else None
    if path is None or not path.is_dir() or not any(path.iterdir()):
        return []
    if is_training_run(path):
        return [(f"--output-dir {output_dir}: is a training run's directory, whose config.json eval would replace; "
                 f"write under it instead, e.g. --output-dir {path / 'eval' / 'mine'}")]
    ours = {CONFIG_FILE, SUMMARY_FILE, RECORDS_FILE, *RESULTS_FILES, EVAL_METRICS_FILE, "wandb", "tensorboard",
            REPORT_DIR}
    earlier_eval = (path / CONFIG_FILE).exists() and any((path / name).exists() for name in ours - {CONFIG_FILE})
    if earlier_eval or any(child.is_dir() and (child / SUMMARY_FILE).exists() for child in path.iterdir()):
        return []
    strangers = sorted(child.name for child in path.iterdir() if child.name not in ours)
    if strangers:
        return [(f"--output-dir {output_dir}: holds files reasontune eval did not write ({', '.join(strangers[:5])}); "
                 "choose an empty or new directory")]
    return []


def build_eval_generator(config: EvalConfig) -> Generator:
    """Returns the generator the config asks for (model loaded from ``config.model``)."""
    try:
        return _build_eval_generator(config)
    except OSError as error:  # not on the hub, no network, not a model directory: the user's to fix
        raise UserError(f"--model {config.model}: cannot be loaded ({str(error).splitlines()[0]})") from error


def _build_eval_generator(config: EvalConfig) -> Generator:
    device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = resolved_dtype(config.dtype, device)
    if config.backend == "vllm":
        server = (VLLMServerOptions(config.vllm_server_url, weight_sync="none", timeout_s=config.vllm_timeout)
                  if config.vllm_server_url else None)
        return build_generator("vllm", model_name=config.model, dtype=dtype, seed=config.seed,
                               vllm_device=config.vllm_device,
                               vllm_gpu_memory_utilization=config.vllm_gpu_memory_utilization,
                               vllm_tensor_parallel_size=config.vllm_tensor_parallel_size,
                               vllm_external_launcher=dist.is_initialized() and dist.get_world_size() > 1,
                               vllm_server=server)
    model = load_model(config.model, dtype=dtype, attn_implementation=config.attn_implementation, device=device)
    return build_generator("hf", model=model, tokenizer=load_tokenizer(config.model),
                           batch_size=config.generation_batch_size)


def eval_sets(config: EvalConfig) -> tuple[list[EvalSet], dict[str, Any]]:
    """Returns (the sets ``config`` asks for, what was read of the data) after loading them (counts printed)."""
    template_name = "r1_zero" if config.prompt_template == "auto" else config.prompt_template
    if not config.benchmarks:
        examples = load_examples(config.data, split=config.split, hub_config=config.data_config,
                                 max_examples=config.max_examples, seed=config.seed, skip_bad=config.skip_bad)
        print(examples.report(), file=sys.stderr)
        if not examples.examples:
            raise UserError(f"--data {config.data}: no example to evaluate ({examples.report()})")
        if config.chat_template != "none" and any(isinstance(e.raw, dict) and "messages" in e.raw for e in examples):
            examples.examples = with_chat_template(examples.examples, load_tokenizer(config.model), config.chat_template)
        data = {"source": config.data, "records_read": examples.total_records, "skipped": examples.skipped}
        return [EvalSet("", examples.examples, load_template(template_name), config.reward_name)], {"data": data}
    sets, read = [], {}
    for name, benchmark in load_benchmarks(config.benchmarks, config.benchmark_dir, config.max_examples,
                                           config.seed).items():
        print(benchmark.examples.report(), file=sys.stderr)
        standard = config.prompt_template == "auto"
        template = STANDARD_PROMPT if standard else load_template(config.prompt_template)
        reward = config.reward if config.reward != "auto" else (STANDARD_REWARD if standard else config.reward_name)
        sets.append(EvalSet(name, benchmark.examples.examples, template, reward, benchmark.question_ids))
        read[name] = {"records_read": benchmark.examples.total_records, "skipped": benchmark.examples.skipped}
    return sets, {"data": read}


def format_summary(summary: dict[str, Any]) -> str:
    """Returns a few human-readable lines of an eval summary."""
    def number(value, spec=".3f"):
        return "n/a" if value is None else format(value, spec)

    counts = summary["counts"]
    return "\n".join([
        f"examples {summary['n_examples']}, samples {summary['n_samples']}",
        f"accuracy {number(summary['accuracy'])}  format rate {number(summary['format_rate'])}  "
        f"pass@n {number(summary['pass_at_n'])}",
        f"correct {counts['correct']}  formatted but wrong {counts['formatted_wrong']}  unformatted {counts['unformatted']}",
        f"mean response tokens {number(summary['mean_response_tokens'], '.1f')} "
        f"(correct {number(summary['mean_response_tokens_correct'], '.1f')}, "
        f"incorrect {number(summary['mean_response_tokens_incorrect'], '.1f')})  "
        f"mean entropy {number(summary['mean_entropy'])}",
        *([f"tool calls {summary['tool_calls']} (in {number(summary['tool_call_rate'])} of samples, "
           f"error rate {number(summary['tool_error_rate'])})  accuracy with tool {number(summary['accuracy_with_tool'])}, "
           f"without {number(summary['accuracy_without_tool'])}"] if "tool_calls" in summary else []),
        f"generation {summary['generation_seconds']:.1f}s ({number(summary['tokens_per_second'], '.1f')} tokens/s), "
        f"grading {summary['grading_seconds']:.1f}s",
    ])




def track_summaries(config: EvalConfig, summaries: dict[str, dict[str, Any]]) -> None:
    """Logs each set's accuracy, format rate and mean length to wandb / TensorBoard (and ``eval_metrics.jsonl``)."""
    from reasontune.tracking import MetricsLogger

    numbers = {}
    for name, summary in summaries.items():
        prefix = f"{name}/" if config.benchmarks else ""
        numbers.update({f"{prefix}{key}": summary.get(key) for key in ("accuracy", "format_rate", "mean_response_tokens")})
    with MetricsLogger(config.output_dir, wandb_project=config.wandb, tensorboard=config.tensorboard,
                       config=asdict(config), metrics_file=EVAL_METRICS_FILE) as logger:
        logger.log("eval", 0, **numbers)


def run_eval(config: EvalConfig) -> int:
    """Returns 0 after evaluating ``config.model`` on ``config.data`` or ``config.benchmarks``; writes records, summaries, results and config.json.

    Under ``torchrun --nproc_per_node N -m reasontune eval …`` each rank loads the whole model
    and evaluates its slice of the questions; rank 0 gathers the records in the original order
    and writes every file (the same records.jsonl as one process, for greedy decoding).
    """
    return launch.run_on_every_rank(config, lambda ctx: _run_eval(config, ctx))


def _run_eval(config: EvalConfig, ctx: distributed.DistributedContext) -> int:
    if ctx.is_distributed and config.launch_problems(ctx.world_size):  # vLLM: a server, or one engine per rank
        raise SystemExit("error: " + "; ".join(config.launch_problems(ctx.world_size)))
    with contextlib.nullcontext() if ctx.is_main else contextlib.redirect_stderr(io.StringIO()):
        sets, read = eval_sets(config)  # every rank reads the data; rank 0 reports what was read
    if config.num_threads:  # e.g. 1 on a loaded machine, where OpenMP threads fighting over cores cost 10x
        torch.set_num_threads(config.num_threads)
    options = SamplingOptions(temperature=config.eval_temperature, top_p=config.eval_top_p,
                              max_new_tokens=config.eval_max_new_tokens, n=config.eval_n_samples, seed=config.seed,
                              return_entropy=config.entropy and config.backend == "hf")
    output_dir = Path(config.output_dir)
    if ctx.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, output_dir / "config.json")
    generator = build_eval_generator(config)
    environment = build_environment(config.env, max_tool_calls=config.max_tool_calls, tool_timeout=config.tool_timeout,
                                    tool_output_bytes=config.tool_output_bytes)
    summaries = evaluate_sets(generator, sets, options, output_dir, ks=parse_ks(config.k), n_bootstrap=config.n_bootstrap,
                              seed=config.seed, grading_workers=config.grading_workers, stop=config.stop,
                              extra_summary={"template": config.prompt_template, **read,
                                            **({"env": config.env} if config.env != "math" else {})}, ctx=ctx,
                              environment=environment)
    generator.close()
    if not ctx.is_main:
        return 0
    if config.wandb or config.tensorboard:
        track_summaries(config, summaries)
    for name, summary in summaries.items():
        if config.benchmarks:
            print(f"== {name}")
        print(format_summary(summary))
    if (output_dir / "results.md").exists():
        print((output_dir / "results.md").read_text(encoding="utf-8"))
    print(f"wrote {output_dir}")
    return 0
