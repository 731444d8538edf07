"""The ``filter`` command: keep the SFT examples whose response earns answer reward 1 against the reference.

Responses are graded through the one rollout path (``reasontune.rollouts.grade_completions``)
in the bounded grading workers; the kept records are written back exactly as read.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar, Sequence

from reasontune.config import UserError, check_config, help_field
from reasontune.data import Example, load_examples
from reasontune.generation import Completion
from reasontune.options import GradingOptions, TaskOptions, TrackingOptions, data_source_problems
from reasontune.rollouts import grade_completions, reward_fn_by_name, write_jsonl

REASONS = ("kept", "formatted but wrong", "unformatted", "no response", "no reference answer")


@dataclass
class FilterConfig(TrackingOptions, GradingOptions, TaskOptions):
    """Options of ``reasontune filter``."""

    command: ClassVar[str] = "filter"

    data: str = help_field("", "SFT data (JSONL/JSON/Parquet, any accepted format) whose responses are graded", group="data")
    out: str = help_field("", "where to write the kept records (JSONL, each record exactly as read)", group="data")

    def problems(self) -> list[str]:
        """Returns what is wrong with this command's own options (an --out that is --data, a missing file …)."""
        problems = []
        if not self.data or not self.out:
            problems.append("reasontune filter needs --data SFT.jsonl and --out FILTERED.jsonl")
        if self.out and self.data and Path(self.out).resolve() == Path(self.data).resolve():
            problems.append(f"--out {self.out}: is the input file; write the kept records to another file")
        if self.out and Path(self.out).is_dir():
            problems.append(f"--out {self.out}: is a directory; give a file name such as {Path(self.out) / 'kept.jsonl'}")
        return problems

    def machine_problems(self) -> list[str]:
        """Returns what is wrong with --data's file on this machine (see ``options.environment_problems``)."""
        return data_source_problems("--data", self.data)


def filter_examples(examples: Sequence[Example], reward: str = "r1_zero", grading_workers: int | None = None
                    ) -> tuple[list[Example], dict[str, int]]:
    """Returns (kept examples, counts by reason) keeping those whose response earns answer reward 1.

    Reasons: ``kept``, ``no response``, ``no reference answer``, ``unformatted`` (format reward
    0) and ``formatted but wrong``.
    """
    counts = {reason: 0 for reason in REASONS}
    gradable = []
    for example in examples:
        if example.response is None:
            counts["no response"] += 1
        elif example.ground_truth is None:
            counts["no reference answer"] += 1
        else:
            gradable.append(example)
    rollouts = grade_completions(
        [e.prompt or e.question for e in gradable], [e.ground_truth for e in gradable],
        [[Completion(text=e.response, token_ids=[], finish_reason="stop")] for e in gradable],
        reward_fn_by_name(reward), grading_workers=grading_workers, examples=gradable)
    kept = []
    for example, record in zip(gradable, rollouts.records()):
        reason = {"correct": "kept", "formatted_wrong": "formatted but wrong", "unformatted": "unformatted"}[record["category"]]
        counts[reason] += 1
        if reason == "kept":
            kept.append(example)
    return kept, {reason: count for reason, count in counts.items() if count}


def run_filter(config: FilterConfig) -> int:
    """Returns 0 after writing the examples of ``config.data`` whose response is correct to ``config.out``."""
    check_config(config)
    loaded = load_examples(config.data, split=config.split, hub_config=config.data_config, skip_bad=config.skip_bad)
    gradable = sum(e.response is not None and e.ground_truth is not None for e in loaded.examples)
    if not gradable:
        without_response = sum(e.response is None for e in loaded.examples)
        raise UserError(f"--data {config.data}: none of its {len(loaded)} examples has both a response and a reference "
                        f"answer ({without_response} without a response); filter grades SFT data "
                        "({prompt, response, ground_truth}); to sample responses first, run reasontune eval")
    kept, counts = filter_examples(loaded.examples, config.reward_name, config.grading_workers)
    out = write_jsonl([example.raw for example in kept], Path(config.out))
    print(f"filter: {len(loaded)} examples read from {config.data} -> {len(kept)} kept in {out}")
    for reason in REASONS:
        if counts.get(reason):
            print(f"  {reason}: {counts[reason]}")
    if loaded.skipped:
        print(f"  malformed records skipped: {loaded.n_skipped} ({loaded.report()})")
    if config.wandb or config.tensorboard:
        from reasontune.tracking import MetricsLogger

        with MetricsLogger(out.parent, wandb_project=config.wandb, tensorboard=config.tensorboard, config=asdict(config),
                           metrics_file=f"{out.stem}.metrics.jsonl") as logger:
            logger.log("data", None, read=len(loaded), kept=len(kept), skipped_bad=loaded.n_skipped,
                       **{reason.replace(" ", "_"): count for reason, count in counts.items()})
    return 0
