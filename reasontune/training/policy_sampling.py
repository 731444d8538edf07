"""What the trainers that sample from their own policy (expert iteration, GRPO) share: questions, each step's seed and batch, rollout sampling.

Every draw of a step is a pure function of (seed, step), so a resumed run samples the
questions, and seeds the generator, exactly as the uninterrupted run did.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from reasontune import distributed
from reasontune.config import UserError
from reasontune.data import Example, load_examples, with_chat_template
from reasontune.environments import Environment, build_environment
from reasontune.environments.sandbox import SandboxUnavailable, run_python
from reasontune.evaluation import EvalSet
from reasontune.generation import Generator, SamplingOptions
from reasontune.options import RolloutOptions, ToolOptions, TrainerOptions
from reasontune.rollouts import RewardFn, stop_sequences
from reasontune.tracking import MetricsLogger
from reasontune.training.data_parallel import SINGLE_PROCESS
from reasontune.training.stop_signals import StopSignals


# What a step logs of its rollouts' tool use (--env python; ``rollouts.tool_statistics``): calls in all, the share of
# calls that failed, the share of trajectories with a call, calls per trajectory, and accuracy with and without one.
TOOL_METRICS = ("tool_calls", "tool_error_rate", "tool_call_rate", "mean_tool_calls", "accuracy_with_tool",
                "accuracy_without_tool")


def step_seed(seed: int, step: int) -> int:
    """Returns the seed of everything step ``step`` of a run seeded ``seed`` draws: distinct per step, the same on a resume."""
    return seed * 1_000_003 + step


def question_batch(n_questions: int, count: int, seed: int, step: int) -> list[int]:
    """Returns the indices of step ``step``'s questions: ``min(count, n_questions)`` distinct, a pure function of (seed, step)."""
    return random.Random(step_seed(seed, step)).sample(range(n_questions), min(count, n_questions))


def load_questions(config: TrainerOptions, needed: int = 1, tokenizer=None
                   ) -> tuple[list[Example], list[Example], dict[str, int]]:
    """Returns (training questions with a reference, validation examples, data counts) of an RL trainer (EI, GRPO).

    Fewer than ``needed`` questions with a reference answer is an error naming the file;
    validation is the first ``eval_examples`` of ``val_data`` that have a reference (none when
    either is unset or 0). With ``tokenizer``, chat records are rendered with its chat template
    as ``--chat-template`` says.
    """
    train_set = load_examples(config.train_data, split=config.split, hub_config=config.data_config, seed=config.seed,
                              skip_bad=config.skip_bad)
    questions = [e for e in train_set.examples if e.ground_truth is not None]
    if len(questions) < needed:
        raise UserError(f"--train-data {config.train_data}: has {len(questions)} questions with a reference answer to "
                        f"grade against; a step needs {needed}")
    validation = []
    if config.val_data and config.eval_examples:
        validation = [e for e in load_examples(config.val_data, seed=config.seed, skip_bad=config.skip_bad).examples
                      if e.ground_truth is not None][: config.eval_examples]
    counts = {"train_records": train_set.total_records, "train_skipped_bad": train_set.n_skipped,
              "train_questions": len(questions), "validation_examples": len(validation)}
    if tokenizer is not None:
        questions = with_chat_template(questions, tokenizer, config.chat_template)
        validation = with_chat_template(validation, tokenizer, config.chat_template)
    return questions, validation, counts


def rollout_sampling(config: RolloutOptions, reward_name: str, template: str = "",
                     return_entropy: bool = False) -> SamplingOptions:
    """Returns the sampling options of an RL trainer's rollouts: ``group_size`` responses a question, stopped as the reward
    and the prompt ``template`` need (``stop_sequences``)."""
    return SamplingOptions(temperature=config.sampling_temperature, top_p=config.sampling_top_p,
                           max_new_tokens=config.sampling_max_tokens, min_new_tokens=config.sampling_min_tokens,
                           stop=stop_sequences(reward_name, template), n=config.group_size, return_entropy=return_entropy)


def rollout_environment(config: ToolOptions) -> Environment:
    """Returns the environment of an RL trainer's rollouts (``--env``), after checking that its sandbox works here.

    ``--env python`` runs one trivial program first: a machine without the namespaces the
    sandbox is built from is refused before the run starts, with the reason, rather than at the
    first tool call of step 1 (no model-written code is ever run outside the sandbox).
    """
    environment = build_environment(config.env, max_tool_calls=config.max_tool_calls, tool_timeout=config.tool_timeout,
                                    tool_output_bytes=config.tool_output_bytes)
    if environment.multi_turn:
        try:
            run_python("pass")
        except SandboxUnavailable as error:
            raise UserError(f"--env {config.env}: the sandbox that runs the model's programs cannot be built on this "
                            f"machine ({error}); see docs/tools.md") from None
    return environment


@dataclass
class PolicySession:
    """What every trainer that samples from its own policy holds (expert iteration and GRPO extend it)."""

    config: TrainerOptions
    model: Any
    tokenizer: Any
    device: torch.device
    generator: Generator
    questions: list[Example]
    validation: list[EvalSet]
    template: str
    reward_fn: RewardFn
    rollouts: SamplingOptions
    run_dir: Path
    logger: MetricsLogger | None  # None on the ranks other than 0
    stop: StopSignals
    ctx: distributed.DistributedContext = SINGLE_PROCESS
    replica: Any = None  # world size > 1: the UnshardedReplica the generator samples from
    environment: Environment | None = None  # --env: None or math, one completion a sample; python, tool trajectories
