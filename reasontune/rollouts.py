"""The one path prompts → generator → grader → records and statistics, for eval, filter, EI, GRPO and the report.

``generate_rollouts`` samples ``n`` completions per prompt, grades every one in the bounded
grading workers and returns a ``Rollouts``: prompt-major (question, reference, the ``n``
completions with token ids, text, sampling log-probs and finish reason, their rewards and
outcome categories). From it come the one record format written to ``records.jsonl``
(``records()``), the one ``summary()`` (the keys of ``summary.json``) and the one filter of
correct samples (``correct()``). Nothing else computes outcome categories or length statistics:
``summarize`` also serves records read back from disk (the report).

Every sample falls in exactly one category: ``correct`` (answer reward 1), ``formatted_wrong``
(format reward 1, answer reward 0) or ``unformatted`` (format reward 0). Lengths are counted
in generated tokens.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from reasontune.data import DataError, Example, example_prompt
from reasontune.generation import Completion, Generator, SamplingOptions
from reasontune.rewards import extract_final_answer, grade_batch, question_only_reward_fn, r1_zero_reward_fn

RewardFn = Callable[[str, Any], dict[str, float]]
CATEGORIES = ("correct", "formatted_wrong", "unformatted")
RECORDS_FILE = "records.jsonl"
SUMMARY_FILE = "summary.json"


def reward_fn_by_name(name: str) -> RewardFn:
    """Returns the reward function called ``name``: ``r1_zero``, ``question_only``, or ``module:function`` of the user's own.

    ``module:function`` is imported from ``sys.path`` as it stands (``PYTHONPATH``, installed
    packages; never the working directory implicitly, which may be someone else's run
    directory) and must be a module-level callable ``function(response, ground_truth) ->
    {"format_reward", "answer_reward", "reward"}``; being module-level, it runs in the grading
    workers under the same time and memory bounds as the shipped ones.
    """
    functions = {"r1_zero": r1_zero_reward_fn, "question_only": question_only_reward_fn}
    if name in functions:
        return functions[name]
    module_name, colon, function_name = name.partition(":")
    if not colon or not module_name or not function_name:
        raise ValueError(f"unknown reward {name!r}; expected r1_zero, question_only or module:function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ImportError(f"cannot import module {module_name!r} ({error}); put the directory holding "
                          f"{module_name}.py on PYTHONPATH (e.g. PYTHONPATH=. reasontune …): the working directory "
                          "is not searched") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise TypeError(f"module {module_name!r} has no function {function_name!r}")
    return function


def final_answer(response: str, reward_fn: RewardFn | None) -> str | None:
    """Returns the answer ``reward_fn`` grades in ``response`` (the last <answer> of r1_zero, the last box of question_only), or None."""
    if reward_fn is r1_zero_reward_fn:
        return extract_final_answer(response, "r1_zero")
    if reward_fn is question_only_reward_fn:
        return extract_final_answer(response, "question_only")
    return None


def category(rewards: Mapping[str, Any]) -> str:
    """Returns ``"correct"``, ``"formatted_wrong"`` or ``"unformatted"`` for one reward dict (or record)."""
    if float(rewards["answer_reward"]) >= 1.0:
        return "correct"
    return "formatted_wrong" if float(rewards.get("format_reward", 0.0)) >= 1.0 else "unformatted"


def _mean(values: Sequence[float]) -> float | None:
    return statistics.fmean(values) if values else None


def summarize(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Returns the statistics of per-sample records (the keys of ``summary.json``, timing aside).

    Each record needs ``index`` (its prompt), ``format_reward``, ``answer_reward``, ``reward``,
    ``response_tokens`` and ``finish_reason``; ``category`` and ``mean_entropy`` are used when
    present. Accuracy, format rate and mean reward are means over samples; ``pass_at_n`` is the
    fraction of prompts with at least one correct sample; ``truncated_fraction`` the fraction of
    samples that hit the token budget.
    """
    kinds = [r.get("category") or category(r) for r in records]
    lengths = [r["response_tokens"] for r in records]
    by_kind = {"correct": [], "incorrect": [], "truncated": []}
    for record, kind in zip(records, kinds):
        by_kind["correct" if kind == "correct" else "incorrect"].append(record["response_tokens"])
        if record.get("finish_reason") == "length":
            by_kind["truncated"].append(record["response_tokens"])
    prompts = {r["index"] for r in records}
    solved = {r["index"] for r, kind in zip(records, kinds) if kind == "correct"}
    finish: dict[str, int] = {}
    for record in records:
        finish[record["finish_reason"]] = finish.get(record["finish_reason"], 0) + 1
    entropies = [r["mean_entropy"] for r in records if r.get("mean_entropy") is not None]
    return {
        "accuracy": _mean([r["answer_reward"] for r in records]),
        "format_rate": _mean([r["format_reward"] for r in records]),
        "mean_reward": _mean([r["reward"] for r in records]),
        "pass_at_n": len(solved) / len(prompts) if prompts else None,
        "counts": {name: kinds.count(name) for name in CATEGORIES},
        "mean_response_tokens": _mean(lengths),
        "mean_response_tokens_correct": _mean(by_kind["correct"]),
        "mean_response_tokens_incorrect": _mean(by_kind["incorrect"]),
        "mean_response_tokens_truncated": _mean(by_kind["truncated"]),
        "truncated_fraction": len(by_kind["truncated"]) / len(records) if records else None,
        "mean_entropy": _mean(entropies),
        "finish_reasons": finish,
        "grading_errors": sum("grading_error" in r for r in records),
        "n_examples": len(prompts),
        "n_samples": len(records),
    }


@dataclass
class Rollouts:
    """Prompt-major results of sampling and grading: ``completions[i]`` and ``rewards[i]`` belong to ``prompts[i]``.

    ``examples[i]`` (when the prompts came from examples) gives each record its source, line
    and question id (``question_ids[i]`` overrides the id, e.g. a benchmark's own); ``timing`` holds generation and grading seconds and token throughput;
    ``sampling`` the options the completions were drawn with.
    """

    prompts: list[str]
    ground_truths: list[Any]
    completions: list[list[Completion]]
    rewards: list[list[dict[str, float]]]
    examples: list[Example] | None = None
    timing: dict[str, Any] = field(default_factory=dict)
    sampling: SamplingOptions | None = None
    reward_fn: RewardFn | None = None
    question_ids: list[str] | None = None

    def __len__(self) -> int:
        return len(self.prompts)

    def flat_completions(self) -> list[Completion]:
        """Returns every completion, prompt 0's samples first (GRPO's layout)."""
        return [completion for group in self.completions for completion in group]

    def flat_rewards(self) -> list[dict[str, float]]:
        """Returns every sample's reward dict, in the order of ``flat_completions``."""
        return [reward for group in self.rewards for reward in group]

    def select(self, indices: Iterable[int]) -> Rollouts:
        """Returns the rollouts of the prompts at ``indices`` (in that order); timing and sampling are kept."""
        indices = list(indices)
        return Rollouts(
            prompts=[self.prompts[i] for i in indices], ground_truths=[self.ground_truths[i] for i in indices],
            completions=[self.completions[i] for i in indices], rewards=[self.rewards[i] for i in indices],
            examples=None if self.examples is None else [self.examples[i] for i in indices],
            timing=dict(self.timing), sampling=self.sampling, reward_fn=self.reward_fn,
            question_ids=None if self.question_ids is None else [self.question_ids[i] for i in indices])

    @staticmethod
    def concat(parts: Sequence[Rollouts]) -> Rollouts:
        """Returns the rollouts of ``parts`` one after another (prompt order kept); timing summed, sampling of the first."""
        if not parts:
            raise ValueError("concat needs at least one Rollouts")
        timing: dict[str, Any] = {}
        for part in parts:
            for key, value in part.timing.items():
                if isinstance(value, (int, float)) and key != "tokens_per_second":
                    timing[key] = timing.get(key, 0) + value
        with_examples = all(part.examples is not None for part in parts)
        with_ids = all(part.question_ids is not None for part in parts)
        return Rollouts(prompts=[p for part in parts for p in part.prompts],
                        ground_truths=[t for part in parts for t in part.ground_truths],
                        completions=[g for part in parts for g in part.completions],
                        rewards=[r for part in parts for r in part.rewards],
                        examples=[e for part in parts for e in part.examples] if with_examples else None,
                        timing=timing, sampling=parts[0].sampling, reward_fn=parts[0].reward_fn,
                        question_ids=[q for part in parts for q in part.question_ids] if with_ids else None)

    def records(self) -> list[dict[str, Any]]:
        """Returns one record per sample, prompt-major: the format of ``records.jsonl``.

        Fields: index, sample, question_id, source, line, prompt, response, answer (the extracted
        final answer the reward graded, None when there is none), ground_truth, format_reward,
        answer_reward, reward, category, response_tokens, prompt_tokens, finish_reason,
        mean_entropy (and grading_error when grading failed).
        """
        records = []
        for index, (prompt, truth, group, rewards) in enumerate(zip(self.prompts, self.ground_truths,
                                                                    self.completions, self.rewards)):
            example = self.examples[index] if self.examples is not None else None
            source, line = (example.source, example.line) if example is not None else ("", 0)
            question_id = f"{source}:{line}" if source else str(index)
            if self.question_ids is not None:
                question_id = self.question_ids[index]
            for sample, (completion, reward) in enumerate(zip(group, rewards)):
                record = {
                    "index": index, "sample": sample, "question_id": question_id, "source": source, "line": line,
                    "prompt": prompt, "response": completion.text,
                    "answer": final_answer(completion.text, self.reward_fn), "ground_truth": truth,
                    "format_reward": reward["format_reward"], "answer_reward": reward["answer_reward"],
                    "reward": reward["reward"], "category": category(reward),
                    "response_tokens": completion.num_tokens, "prompt_tokens": completion.prompt_token_count,
                    "finish_reason": completion.finish_reason, "mean_entropy": completion.mean_entropy,
                }
                if "grading_error" in reward:
                    record["grading_error"] = reward["grading_error"]
                records.append(record)
        return records

    def summary(self) -> dict[str, Any]:
        """Returns ``summarize(self.records())`` plus the timing and the sampling options."""
        result = summarize(self.records())
        result.update(self.timing)
        if self.sampling is not None:
            result["sampling"] = asdict(self.sampling)
        return result

    def correct(self) -> list[dict[str, Any]]:
        """Returns the SFT records ``{prompt, response, ground_truth}`` of exactly the samples with answer reward 1, in order.

        Duplicate correct responses to one prompt are kept as sampled (each was drawn).
        """
        return [{"prompt": prompt, "response": completion.text, "ground_truth": truth}
                for prompt, truth, group, rewards in zip(self.prompts, self.ground_truths, self.completions, self.rewards)
                for completion, reward in zip(group, rewards) if category(reward) == "correct"]

    def write(self, output_dir: str | Path, extra_summary: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Returns the summary after writing ``records.jsonl`` and ``summary.json`` (with ``extra_summary``) into ``output_dir``."""
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_jsonl(self.records(), out / RECORDS_FILE)
        summary = {**self.summary(), **(extra_summary or {})}
        (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        return summary


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def json_line(record: Mapping[str, Any]) -> str:
    """Returns ``record`` as one line of JSON, UTF-8 text kept readable and a lone surrogate written as its ``\\uXXXX`` escape.

    Text decoded from a dataset's ``"\\ud83d"`` (half an emoji) or cut mid-character holds a
    surrogate that UTF-8 cannot encode; as an escape it stays valid JSON and reads back as the
    same string, where replacing it would change the text and writing it raw would stop the run.
    """
    text = json.dumps(record, ensure_ascii=False)
    return _LONE_SURROGATE.sub(lambda match: f"\\u{ord(match.group()):04x}", text)


def write_jsonl(records: Iterable[Mapping[str, Any]], path: str | Path) -> Path:
    """Returns ``path`` after writing one JSON object a line (parent directories created; ``json_line``'s encoding).

    Written to a temporary sibling and renamed into place, so a full disk or a crash leaves the
    earlier file (or none), never half of one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with temporary.open("w", encoding="utf-8") as handle:
            for record in records:
                handle.write(json_line(record) + "\n")
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def grade_completions(prompts: Sequence[str], ground_truths: Sequence[Any], completions: Sequence[Sequence[Completion]],
                      reward_fn: RewardFn, *, grading_workers: int | None = None,
                      examples: Sequence[Example] | None = None) -> Rollouts:
    """Returns the ``Rollouts`` of already generated completions, graded in the bounded grading workers (order kept).

    ``grading_workers=0`` grades in this process; ``reward_fn`` must be a module-level
    function. A sample that could not be graded comes back all-zero with a ``grading_error``.
    """
    if not len(prompts) == len(ground_truths) == len(completions):
        raise ValueError(f"{len(prompts)} prompts, {len(ground_truths)} ground truths and {len(completions)} "
                         "completion groups must be as many")
    started = time.perf_counter()
    flat = list(grade_batch([c.text for group in completions for c in group],
                            [truth for truth, group in zip(ground_truths, completions) for _ in group],
                            reward_fn=reward_fn, workers=grading_workers))
    rewards, start = [], 0
    for group in completions:
        rewards.append(flat[start:start + len(group)])
        start += len(group)
    return Rollouts(prompts=list(prompts), ground_truths=list(ground_truths), completions=[list(g) for g in completions],
                    rewards=rewards, examples=None if examples is None else list(examples),
                    timing={"grading_seconds": time.perf_counter() - started}, reward_fn=reward_fn)


def generate_rollouts(generator: Generator, prompts: Sequence[str], ground_truths: Sequence[Any],
                      sampling: SamplingOptions, reward_fn: RewardFn, *, grading_workers: int | None = None,
                      examples: Sequence[Example] | None = None) -> Rollouts:
    """Returns the graded ``Rollouts`` of ``sampling.n`` completions per prompt from ``generator``.

    ``timing`` holds ``generation_seconds``, ``grading_seconds``, ``generated_tokens`` and
    ``tokens_per_second``.
    """
    started = time.perf_counter()
    completions = generator.generate(list(prompts), sampling)
    generation_seconds = time.perf_counter() - started
    rollouts = grade_completions(prompts, ground_truths, completions, reward_fn, grading_workers=grading_workers,
                                 examples=examples)
    tokens = sum(c.num_tokens for c in rollouts.flat_completions())
    rollouts.timing = {"generation_seconds": generation_seconds, **rollouts.timing, "generated_tokens": tokens,
                       "tokens_per_second": tokens / generation_seconds if generation_seconds > 0 else None}
    rollouts.sampling = sampling
    return rollouts


def rollouts_for_examples(generator: Generator, examples: Sequence[Example], template: str, sampling: SamplingOptions,
                          reward_fn: RewardFn, *, grading_workers: int | None = None) -> Rollouts:
    """Returns the graded ``Rollouts`` of ``examples`` (each prompted with ``template`` unless it fixes its prompt).

    Raises ``DataError`` naming the first example without a reference answer to grade against.
    """
    missing = [e for e in examples if e.ground_truth is None]
    if missing:
        raise DataError(f"{missing[0].source}:{missing[0].line}: field 'ground_truth' missing "
                        f"({len(missing)} of {len(examples)} examples have no reference answer to grade against)")
    return generate_rollouts(generator, [example_prompt(e, template) for e in examples],
                             [e.ground_truth for e in examples], sampling, reward_fn,
                             grading_workers=grading_workers, examples=examples)


def merge_rollouts(parts: Sequence[Rollouts]) -> Rollouts:
    """Returns one ``Rollouts`` of ``parts`` concatenated in order (each rank's slice of the prompts, gathered).

    Timing: the slowest part's generation and grading seconds (the parts ran at once, on
    different ranks), the total generated tokens, and their throughput over that time.
    """
    first = parts[0]
    merged = Rollouts(prompts=[p for part in parts for p in part.prompts],
                      ground_truths=[t for part in parts for t in part.ground_truths],
                      completions=[g for part in parts for g in part.completions],
                      rewards=[r for part in parts for r in part.rewards],
                      examples=None if any(part.examples is None for part in parts)
                      else [e for part in parts for e in part.examples],
                      sampling=first.sampling, reward_fn=first.reward_fn,
                      question_ids=None if any(part.question_ids is None for part in parts)
                      else [q for part in parts for q in part.question_ids])
    timing: dict[str, Any] = {}
    for key in ("generation_seconds", "grading_seconds"):
        if all(key in part.timing for part in parts):
            timing[key] = max(part.timing[key] for part in parts)
    if all("generated_tokens" in part.timing for part in parts):
        timing["generated_tokens"] = sum(part.timing["generated_tokens"] for part in parts)
        seconds = timing.get("generation_seconds", 0.0)
        timing["tokens_per_second"] = timing["generated_tokens"] / seconds if seconds > 0 else None
    merged.timing = timing
    return merged


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Returns the records of a ``records.jsonl``; a malformed line raises ``DataError`` naming file and line."""
    records = []
    for number, raw in enumerate(Path(path).read_bytes().splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise DataError(f"{path}:{number}: not UTF-8 text") from None
        except json.JSONDecodeError as error:
            raise DataError(f"{path}:{number}: invalid JSON ({error.msg})") from None
        except (ValueError, RecursionError):  # nested too deeply, a number past int()'s digit limit
            raise DataError(f"{path}:{number}: invalid JSON (nested too deeply, or a number too long)") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{number}: expected a JSON object")
        records.append(record)
    return records
