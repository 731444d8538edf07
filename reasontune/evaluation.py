"""The ``eval`` command: generate answers for a dataset, grade them, write records.jsonl and summary.json.

Generation, grading, records and statistics are the one rollout path of
``reasontune.rollouts``; this module adds the command around it: data, model, generator,
and the files of an evaluation directory.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from reasontune.config import help_field, same_field, save_config
from reasontune.data import Example, load_examples, load_template
from reasontune.generation import Generator, SamplingOptions, build_generator
from reasontune.modeling import load_model, load_tokenizer
from reasontune.options import (EvaluationOptions, GenerationOptions, GradingOptions, ModelOptions, RunOptions,
                                TaskOptions, resolved_dtype)
from reasontune.rollouts import RewardFn, generate_rollouts, reward_fn_by_name, rollouts_for_examples


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
class EvalConfig(GenerationOptions, GradingOptions, EvaluationOptions, TaskOptions, ModelOptions, RunOptions):
    """Options of ``reasontune eval``."""

    data: str = help_field("", "evaluation data: JSONL/JSON/Parquet in any accepted format, or a hub dataset name", group="data")
    output_dir: str = help_field("", "directory for records.jsonl, summary.json and config.json", group="data")
    max_examples: int | None = help_field(None, "evaluate a seeded random subset of this many examples", group="data")
    split: str | None = help_field(None, "split of a hub dataset (default train)", group="data")
    data_config: str | None = help_field(None, "config (subset) name of a hub dataset, e.g. main for openai/gsm8k", group="data")
    eval_n_samples: int = same_field(EvaluationOptions, "eval_n_samples", 1, aliases=("n-samples",))
    stop: list[str] | None = help_field(None, "stop strings, kept in the output (default: </answer> for r1_zero rewards, none otherwise)", group="evaluation")
    entropy: bool = help_field(True, "hf backend: record per-token entropy (mean per response in records)", group="evaluation")
    generation_batch_size: int = same_field(GenerationOptions, "generation_batch_size", 32)
    vllm_gpu_memory_utilization: float = same_field(GenerationOptions, "vllm_gpu_memory_utilization", 0.85)

    def validate(self) -> None:
        if not self.model or not self.data or not self.output_dir:
            raise SystemExit("error: reasontune eval needs --model PATH --data PATH --output-dir DIR")
        if self.eval_n_samples < 1 or self.eval_max_new_tokens < 1 or self.generation_batch_size < 1:
            raise SystemExit("error: --eval-n-samples, --eval-max-new-tokens and --generation-batch-size must be >= 1")


def build_eval_generator(config: EvalConfig) -> Generator:
    """Returns the generator the config asks for (model loaded from ``config.model``)."""
    device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = resolved_dtype(config.dtype, device)
    if config.backend == "vllm":
        return build_generator("vllm", model_name=config.model, dtype=dtype, seed=config.seed,
                               vllm_device=config.vllm_device,
                               vllm_gpu_memory_utilization=config.vllm_gpu_memory_utilization)
    model = load_model(config.model, dtype=dtype, attn_implementation=config.attn_implementation, device=device)
    return build_generator("hf", model=model, tokenizer=load_tokenizer(config.model),
                           batch_size=config.generation_batch_size)


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
        f"generation {summary['generation_seconds']:.1f}s ({number(summary['tokens_per_second'], '.1f')} tokens/s), "
        f"grading {summary['grading_seconds']:.1f}s",
    ])


def run_eval(config: EvalConfig) -> int:
    """Returns 0 after evaluating ``config.model`` on ``config.data``; writes records.jsonl, summary.json, config.json."""
    config.validate()
    reward = config.reward_name
    stop = tuple(config.stop) if config.stop is not None else (("</answer>",) if reward == "r1_zero" else ())
    template = load_template(config.prompt_template)
    examples = load_examples(config.data, split=config.split, hub_config=config.data_config,
                             max_examples=config.max_examples, seed=config.seed, skip_bad=config.skip_bad)
    print(examples.report(), file=sys.stderr)
    options = SamplingOptions(temperature=config.eval_temperature, top_p=config.eval_top_p,
                              max_new_tokens=config.eval_max_new_tokens, stop=stop, n=config.eval_n_samples,
                              seed=config.seed, return_entropy=config.entropy and config.backend == "hf")
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, output_dir / "config.json")
    generator = build_eval_generator(config)
    rollouts = rollouts_for_examples(generator, examples.examples, template, options, reward_fn_by_name(reward),
                                     grading_workers=config.grading_workers)
    generator.close()
    summary = rollouts.write(output_dir, extra_summary={
        "data": {"source": config.data, "records_read": examples.total_records, "skipped": examples.skipped},
        "template": config.prompt_template, "reward": reward})
    print(format_summary(summary))
    print(f"wrote {output_dir / 'records.jsonl'} and {output_dir / 'summary.json'}")
    return 0
