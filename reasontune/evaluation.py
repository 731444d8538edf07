"""Generate → grade → records and summary: ``evaluate`` (files), ``log_generations`` (in-loop), ``reasontune eval``.

Every sample falls in exactly one category: ``correct`` (answer reward 1), ``formatted_wrong``
(format reward 1, answer reward 0) or ``unformatted`` (format reward 0, answer reward 0).
Accuracy and format rate are means over samples (``n`` per example); ``pass_at_n`` is the
fraction of examples with at least one correct sample. Lengths are counted in generated tokens.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

from reasontune.config import help_field, save_config
from reasontune.data import DataError, Example, example_prompt, load_examples, load_template
from reasontune.generation import Completion, Generator, SamplingOptions

RewardFn = Callable[[str, Any], dict[str, float]]
CATEGORIES = ("correct", "formatted_wrong", "unformatted")


def category(rewards: dict[str, float]) -> str:
    """Returns ``"correct"``, ``"formatted_wrong"`` or ``"unformatted"`` for one reward dict."""
    if rewards["answer_reward"] >= 1.0:
        return "correct"
    return "formatted_wrong" if rewards["format_reward"] >= 1.0 else "unformatted"


def grade(responses: Sequence[str], ground_truths: Sequence[Any], reward_fn: RewardFn,
          workers: int | None = None) -> list[dict[str, float]]:
    """Returns one reward dict per response, in order, graded by ``reasontune.rewards.grade_batch``.

    Grading runs in bounded worker processes (``workers=0``: in this process); ``reward_fn``
    must be a module-level function. An item that could not be graded comes back all-zero
    with a ``"grading_error"`` key.
    """
    from reasontune.rewards import grade_batch

    return list(grade_batch(list(responses), list(ground_truths), reward_fn=reward_fn, workers=workers))


def _mean(values: Sequence[float]) -> float | None:
    return statistics.fmean(values) if values else None


def _generate_and_grade(generator: Generator, prompts: Sequence[str], ground_truths: Sequence[Any],
                        reward_fn: RewardFn, options: SamplingOptions, workers: int | None
                        ) -> tuple[list[list[Completion]], list[dict[str, float]], dict[str, float]]:
    """Returns (completions grouped per prompt, flat reward dicts prompt-major, timing)."""
    started = time.perf_counter()
    groups = generator.generate(prompts, options)
    generated = time.perf_counter()
    flat = [(completion, truth) for group, truth in zip(groups, ground_truths) for completion in group]
    rewards = grade([c.text for c, _ in flat], [truth for _, truth in flat], reward_fn, workers)
    graded = time.perf_counter()
    tokens = sum(c.num_tokens for c, _ in flat)
    timing = {"generation_seconds": generated - started, "grading_seconds": graded - generated,
              "generated_tokens": tokens,
              "tokens_per_second": tokens / (generated - started) if generated > started else None}
    return groups, rewards, timing


def summarize(records: Sequence[dict[str, Any]], n_examples: int) -> dict[str, Any]:
    """Returns the summary of per-sample records (each with rewards, ``category``, ``response_tokens``, ``mean_entropy``, ``index``)."""
    counts = {name: sum(r["category"] == name for r in records) for name in CATEGORIES}
    lengths = [r["response_tokens"] for r in records]
    correct_lengths = [r["response_tokens"] for r in records if r["category"] == "correct"]
    incorrect_lengths = [r["response_tokens"] for r in records if r["category"] != "correct"]
    entropies = [r["mean_entropy"] for r in records if r.get("mean_entropy") is not None]
    solved = {r["index"] for r in records if r["category"] == "correct"}
    finish: dict[str, int] = {}
    for r in records:
        finish[r["finish_reason"]] = finish.get(r["finish_reason"], 0) + 1
    n_samples = len(records)
    return {
        "accuracy": _mean([r["answer_reward"] for r in records]),
        "format_rate": _mean([r["format_reward"] for r in records]),
        "mean_reward": _mean([r["reward"] for r in records]),
        "pass_at_n": len(solved) / n_examples if n_examples else None,
        "counts": counts,
        "mean_response_tokens": _mean(lengths),
        "mean_response_tokens_correct": _mean(correct_lengths),
        "mean_response_tokens_incorrect": _mean(incorrect_lengths),
        "mean_entropy": _mean(entropies),
        "finish_reasons": finish,
        "grading_errors": sum("grading_error" in r for r in records),
        "n_examples": n_examples,
        "n_samples": n_samples,
    }


def evaluate(generator: Generator, examples: Sequence[Example], reward_fn: RewardFn, options: SamplingOptions,
             output_dir: str | Path | None = None, template: str = "r1_zero", workers: int | None = None
             ) -> dict[str, Any]:
    """Returns ``{"summary": dict, "records": list[dict]}`` for ``examples`` (``options.n`` samples each).

    ``template`` is a shipped name, a file path, or template text containing ``{question}``;
    examples with a fixed ``prompt`` use it verbatim. With ``output_dir``, writes
    ``records.jsonl`` (one line per sample) and ``summary.json`` there.
    """
    template_text = template if "{question}" in template else load_template(template)
    missing = [e for e in examples if e.ground_truth is None]
    if missing:
        raise DataError(f"{missing[0].source}:{missing[0].line}: field 'ground_truth' missing "
                        f"({len(missing)} of {len(examples)} examples have no reference answer to grade against)")
    prompts = [example_prompt(e, template_text) for e in examples]
    groups, rewards, timing = _generate_and_grade(generator, prompts, [e.ground_truth for e in examples],
                                                  reward_fn, options, workers)
    records = []
    flat_rewards = iter(rewards)
    for index, (example, prompt, group) in enumerate(zip(examples, prompts, groups)):
        for sample, completion in enumerate(group):
            reward = next(flat_rewards)
            records.append({
                "index": index, "sample": sample, "source": example.source, "line": example.line,
                "prompt": prompt, "response": completion.text, "ground_truth": example.ground_truth,
                "format_reward": reward["format_reward"], "answer_reward": reward["answer_reward"],
                "reward": reward["reward"], "category": category(reward),
                "response_tokens": completion.num_tokens, "prompt_tokens": completion.prompt_token_count,
                "finish_reason": completion.finish_reason, "mean_entropy": completion.mean_entropy,
            })
            if "grading_error" in reward:
                records[-1]["grading_error"] = reward["grading_error"]
    summary = summarize(records, len(examples))
    summary.update(timing)
    summary["sampling"] = asdict(options)
    if output_dir is not None:
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        with (out / "records.jsonl").open("w", encoding="utf-8") as handle:
            for record in records:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return {"summary": summary, "records": records}


def log_generations(generator: Generator, prompts: Sequence[str], ground_truths: Sequence[Any], reward_fn: RewardFn,
                    options: SamplingOptions, workers: int | None = None) -> dict[str, Any]:
    """Returns ``{"records", "summary"}`` for in-loop logging of already-formatted prompts (seed 001's fields).

    Each record: prompt, response, ground_truth, format_reward, answer_reward, reward,
    avg_token_entropy (None without entropies), response_length (tokens). Summary: accuracy,
    format_rate, mean_response_length, mean_response_length_correct / _incorrect,
    mean_token_entropy, n_samples. Use an ``HFGenerator`` around the training model (it
    switches to eval mode and back) or a ``VLLMGenerator`` after ``load_policy_weights``.
    """
    groups, rewards, timing = _generate_and_grade(generator, prompts, ground_truths, reward_fn, options, workers)
    records = []
    flat_rewards = iter(rewards)
    for prompt, truth, group in zip(prompts, ground_truths, groups):
        for completion in group:
            reward = next(flat_rewards)
            records.append({"prompt": prompt, "response": completion.text, "ground_truth": truth,
                            "format_reward": reward["format_reward"], "answer_reward": reward["answer_reward"],
                            "reward": reward["reward"], "avg_token_entropy": completion.mean_entropy,
                            "response_length": completion.num_tokens})
    correct = [r["response_length"] for r in records if r["answer_reward"] >= 1.0]
    incorrect = [r["response_length"] for r in records if r["answer_reward"] < 1.0]
    summary = {
        "accuracy": _mean([r["answer_reward"] for r in records]),
        "format_rate": _mean([r["format_reward"] for r in records]),
        "mean_response_length": _mean([r["response_length"] for r in records]),
        "mean_response_length_correct": _mean(correct),
        "mean_response_length_incorrect": _mean(incorrect),
        "mean_token_entropy": _mean([r["avg_token_entropy"] for r in records if r["avg_token_entropy"] is not None]),
        "n_samples": len(records),
        **timing,
    }
    return {"records": records, "summary": summary}


# ---------------------------------------------------------------------------------------------
# reasontune eval


@dataclass
class EvalConfig:
    """Options of ``reasontune eval``."""

    model: str = help_field("", "model directory or hub name (with its tokenizer)")
    data: str = help_field("", "evaluation data: JSONL/JSON/Parquet in any accepted format, or a hub dataset name")
    output_dir: str = help_field("", "directory for records.jsonl, summary.json and config.json")
    prompt: str = help_field("r1_zero", "prompt template: r1_zero, question_only, or a file containing {question}")
    reward: Literal["auto", "r1_zero", "question_only"] = help_field(
        "auto", "reward function (auto: question_only for the question_only template, else r1_zero)")
    max_examples: int | None = help_field(None, "evaluate a seeded random subset of this many examples")
    split: str | None = help_field(None, "split of a hub dataset (default train)")
    data_config: str | None = help_field(None, "config (subset) name of a hub dataset, e.g. main for openai/gsm8k")
    n: int = help_field(1, "samples per example")
    temperature: float = help_field(0.0, "sampling temperature (0 = greedy)")
    top_p: float = help_field(1.0, "nucleus sampling threshold")
    max_new_tokens: int = help_field(1024, "maximum generated tokens per sample")
    stop: list[str] | None = help_field(None, "stop strings, kept in the output (default: </answer> for r1_zero rewards, none otherwise)")
    batch_size: int = help_field(32, "sequences per generate call (hf backend)")
    backend: Literal["hf", "vllm"] = help_field("hf", "generation backend: hf (CPU or GPU) or vllm (GPU, optional extra)")
    dtype: str | None = help_field(None, "model dtype: float32, bfloat16, float16 (default: bfloat16 on GPU, float32 on CPU)")
    device: str | None = help_field(None, "device for the hf backend (default: cuda if available, else cpu)")
    gpu_memory_utilization: float = help_field(0.85, "vllm: fraction of GPU memory the engine may take")
    entropy: bool = help_field(True, "hf backend: record per-token entropy (mean per response in records)")
    seed: int = help_field(0, "seed of the example subset and of sampling")
    workers: int | None = help_field(None, "grading workers (default: the grader's choice)")
    skip_bad: bool = help_field(False, "skip malformed data records (counted and reported) instead of stopping")

    def validate(self) -> None:
        if not self.model or not self.data or not self.output_dir:
            raise SystemExit("error: reasontune eval needs --model PATH --data PATH --output-dir DIR")
        if self.n < 1 or self.max_new_tokens < 1 or self.batch_size < 1:
            raise SystemExit("error: --n, --max-new-tokens and --batch-size must be >= 1")


def reward_fn_by_name(name: str) -> RewardFn:
    """Returns ``r1_zero_reward_fn`` or ``question_only_reward_fn`` from ``reasontune.rewards``."""
    from reasontune import rewards

    if name == "r1_zero":
        return rewards.r1_zero_reward_fn
    if name == "question_only":
        return rewards.question_only_reward_fn
    raise ValueError(f"unknown reward {name!r}; expected r1_zero or question_only")


def build_generator(config: EvalConfig) -> Generator:
    """Returns the generator the config asks for (model loaded from ``config.model``)."""
    import torch

    if config.backend == "vllm":
        from reasontune.generation.vllm import VLLMGenerator

        return VLLMGenerator(config.model, dtype=config.dtype or "bfloat16", seed=config.seed,
                             gpu_memory_utilization=config.gpu_memory_utilization)
    from reasontune.generation.hf import HFGenerator
    from reasontune.modeling import load_model, load_tokenizer

    device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = config.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    return HFGenerator(load_model(config.model, dtype=dtype, device=device), load_tokenizer(config.model),
                       batch_size=config.batch_size)


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
    reward = config.reward if config.reward != "auto" else ("question_only" if config.prompt == "question_only" else "r1_zero")
    stop = tuple(config.stop) if config.stop is not None else (("</answer>",) if reward == "r1_zero" else ())
    template = load_template(config.prompt)
    examples = load_examples(config.data, split=config.split, hub_config=config.data_config,
                             max_examples=config.max_examples, seed=config.seed, skip_bad=config.skip_bad)
    print(examples.report(), file=sys.stderr)
    options = SamplingOptions(temperature=config.temperature, top_p=config.top_p, max_new_tokens=config.max_new_tokens,
                              stop=stop, n=config.n, seed=config.seed,
                              return_entropy=config.entropy and config.backend == "hf")
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, output_dir / "config.json")
    generator = build_generator(config)
    result = evaluate(generator, examples.examples, reward_fn_by_name(reward), options, output_dir=output_dir,
                      template=template, workers=config.workers)
    summary = result["summary"]
    summary_path = output_dir / "summary.json"
    summary["data"] = {"source": config.data, "records_read": examples.total_records, "skipped": examples.skipped}
    summary["template"] = config.prompt
    summary["reward"] = reward
    summary_path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(format_summary(summary))
    print(f"wrote {output_dir / 'records.jsonl'} and {summary_path}")
    return 0
