"""GRPO with verified rewards: rollouts, group-normalised advantages, policy-gradient steps.

Each GRPO step samples ``rollout_batch_size / group_size`` questions, generates ``group_size``
responses to each with the current policy, grades them, normalises the rewards within each
group into advantages and takes ``epochs_per_rollout_batch`` passes of policy-gradient steps
over the rollouts (one optimizer step per ``train_batch_size`` rollouts). Loss aggregation and
gradient-accumulation scaling live in ``reasontune.losses.grpo_microbatch_train_step``.
``setup_grpo(config)`` returns the objects; ``train_grpo(session)`` is the loop.
"""

from __future__ import annotations

import concurrent.futures
import copy
import dataclasses
import statistics
import time
from pathlib import Path
from typing import Any, Literal

import torch

from reasontune import distributed
from reasontune.checkpoint import CheckpointError
from reasontune.config import help_field, raise_problems, same_field
from reasontune.data import load_template
from reasontune.logprobs import get_response_log_probs
from reasontune.losses import (AdvantageBaseline, AdvantageStd, LossAggregation, PolicyLossType, RolloutCorrection,
                               compute_advantages, grpo_microbatch_train_step, mask_truncated_responses, masked_mean,
                               overlong_penalty, rollout_correction_weights, rollout_mismatch_metrics,
                               sequences_with_loss_tokens)
from reasontune.modeling import load_model
from reasontune.options import (CheckpointOptions, InLoopEvaluationOptions, OptimizerOptions, RolloutOptions,
                                TrainerOptions, resolved_dtype, validate_common)
from reasontune.rl_recipes import RECIPES, expand_recipe, fill_batch, informative_groups
from reasontune.rollouts import Rollouts, reward_fn_by_name
from reasontune.tokenization import pad_and_shift, pad_token_id_of
from reasontune.tracking import Progress
from reasontune.training.common import (NonFiniteStep, PolicySession, clip_and_step, log_evaluation,
                                        evaluation_sampling, evaluation_sets, finish_run, load_policy, load_questions,
                                        make_generator, make_logger, make_optimizer, question_batch,
                                        restore_training_state, rollout_sampling, save_run_checkpoint, start_run,
                                        stop_diverged, stop_for_signal, stop_requested)
from reasontune.training.data_parallel import (SINGLE_PROCESS, generation_model, rank_microbatches,
                                               record_launch, refuse_what_torchrun_cannot_run,
                                               shard_policy, sharded_rollouts, unsharded_replica)


# A step whose every advantage is below this (equal rewards in every group) gives no policy gradient.
ZERO_ADVANTAGE = 1e-8
# After this many such steps in a row the run says so (once per streak): the run trains on nothing.
DEGENERATE_REWARD_STEPS = 3


@dataclasses.dataclass
class GRPOConfig(RolloutOptions, TrainerOptions):
    """Options of ``reasontune grpo`` (defaults: the CS336 handout's GRPO settings for Qwen2.5-Math-1.5B)."""

    output_dir: str = same_field(CheckpointOptions, "output_dir", "runs/grpo")
    learning_rate: float = same_field(OptimizerOptions, "learning_rate", 1e-5)
    eval_every: int = same_field(InLoopEvaluationOptions, "eval_every", 5)
    eval_examples: int = same_field(InLoopEvaluationOptions, "eval_examples", 1024)
    # GRPO
    n_grpo_steps: int = help_field(200, "GRPO steps: each one rollout batch, then epochs-per-rollout-batch passes of optimizer steps over it", group="grpo")
    rollout_batch_size: int = help_field(256, "responses generated per GRPO step (questions x group-size)", group="grpo")
    train_batch_size: int = help_field(256, "rollouts per optimizer step (smaller than rollout-batch-size: several off-policy steps per rollout batch)", group="grpo")
    gradient_accumulation_steps: int = help_field(128, "microbatches per optimizer step; microbatch = train-batch-size / this", group="grpo")
    epochs_per_rollout_batch: int = help_field(1, "passes over each rollout batch (more than 1 is off-policy: use grpo_clip)", group="grpo")
    recipe: Literal["grpo", "dr_grpo", "dapo", "gspo", "cispo", "rloo"] | None = help_field(None, "set the objective of a paper at once (loss, clip range, aggregation, advantages, KL, overlong shaping, dynamic sampling; see rl_recipes.RECIPES); any flag given overrides the recipe's value", group="grpo")
    loss_type: PolicyLossType = help_field("reinforce_with_baseline", "policy-gradient loss: no_baseline (raw rewards), reinforce_with_baseline (advantages), grpo_clip (PPO-style clipped ratio; clip-higher with --cliprange-high, dual clip with --dual-clip-c), gspo (sequence-level ratio) or cispo (clipped importance weight, gradient through every token)", group="grpo")
    advantage_baseline: AdvantageBaseline = help_field("group_mean", "subtracted from each reward: group_mean (GRPO), leave_one_out (RLOO) or batch_mean (REINFORCE++)", group="grpo")
    advantage_std: AdvantageStd = help_field("group", "advantages divided by the std of: group (GRPO), batch (REINFORCE++) or none (Dr. GRPO, RLOO)", group="grpo")
    advantage_eps: float = help_field(1e-6, "added to the std before dividing", group="grpo")
    cliprange: float | None = help_field(0.2, "epsilon of the ratio clip (grpo_clip, gspo; eps_low with --cliprange-high)", group="grpo")
    cliprange_high: float | None = help_field(None, "upper epsilon of the clip (DAPO's clip-higher; none: --cliprange; the only bound cispo uses)", group="grpo")
    dual_clip_c: float | None = help_field(None, "dual-clip bound c > 1 for negative advantages (grpo_clip; none: off)", group="grpo")
    overlong_buffer_fraction: float = help_field(0.0, "DAPO soft overlong penalty: a linear penalty down to -1 over the last fraction of --sampling-max-tokens (0: off)", group="grpo")
    overlong_penalty_factor: float = help_field(1.0, "scale of the soft overlong penalty", group="grpo")
    mask_truncated: bool = help_field(False, "leave responses cut by --sampling-max-tokens out of the loss", group="grpo")
    dynamic_sampling: bool = help_field(False, "DAPO dynamic sampling: drop groups whose rewards are all equal and draw more questions until the batch is full", group="grpo")
    dynamic_sampling_max_tries: int = help_field(4, "draws per step at most for --dynamic-sampling (the batch trains short after that, counted in the metrics)", group="grpo")
    rollout_correction: RolloutCorrection = help_field("none", "correct the rollout engine's log-probs against the trainer's: token_tis / seq_tis (truncated importance weights), token_mask / seq_mask (drop tokens or responses whose weight leaves [1/C, C]) or none (the mismatch is still logged)", group="grpo")
    rollout_correction_cap: float = help_field(2.0, "the cap C of --rollout-correction (> 1)", group="grpo")
    loss_aggregation: LossAggregation = help_field("sequence_mean", "per-token loss to scalar: sequence_mean (GRPO), sequence_sum (Dr. GRPO; constant = sampling-max-tokens) or token_mean (DAPO; over the optimizer step's tokens)", group="grpo")
    kl_coef: float = help_field(0.0, "weight of a per-token k3 KL penalty against the frozen starting model (0: off, no reference model loaded)", group="grpo")
    async_steps: int = help_field(0, "overlap generation with training: the rollouts of step k+1 … k+K are generated in the background while step k trains, from weights at most K steps stale (0: on-policy, no overlap; > 0 needs grpo_clip, gspo or cispo)", group="grpo")

    @property
    def micro_train_batch_size(self) -> int:
        return self.train_batch_size // self.gradient_accumulation_steps

    def microbatch_size(self, world_size: int) -> int:
        """Returns the rollouts in one microbatch of one rank: train-batch-size / (world size x accumulation)."""
        return self.train_batch_size // (world_size * self.gradient_accumulation_steps)

    def world_problems(self, world_size: int) -> list[str]:
        """Returns what keeps the batch sizes from splitting over ``world_size`` ranks (empty at world size 1)."""
        if world_size == 1:
            return []
        split = world_size * self.gradient_accumulation_steps
        if self.train_batch_size % split:
            return [f"--train-batch-size ({self.train_batch_size}) does not split over {world_size} ranks x "
                    f"{self.gradient_accumulation_steps} microbatches; choose a multiple of {split}"]
        if self.rollout_batch_size % self.microbatch_size(world_size):
            return [f"--rollout-batch-size ({self.rollout_batch_size}) must be divisible by the microbatch size "
                    f"(train-batch-size / (ranks x gradient-accumulation-steps) = {self.microbatch_size(world_size)})"]
        return []

    @classmethod
    def expand_presets(cls, values: dict[str, Any]) -> dict[str, Any]:
        """Returns ``values`` (the options given) with ``recipe``'s settings filled in under them: a given option wins."""
        recipe = values.get("recipe")
        if recipe is None:
            return values
        expanded, _ = expand_recipe(recipe, {**RECIPES[recipe], **values}, explicit=set(values))
        return expanded

    @classmethod
    def from_recipe(cls, recipe: str | None, **values: Any) -> GRPOConfig:
        """Returns the config of ``recipe`` with ``values`` (explicit options) overriding it."""
        return cls(**cls.expand_presets({**values, "recipe": recipe}))

    def recipe_settings(self) -> dict[str, Any]:
        """Returns the recipe's fields with the value this config has for each (empty without a recipe)."""
        return {name: getattr(self, name) for name in RECIPES.get(self.recipe or "", {})}

    @property
    def optimizer_steps_per_rollout_batch(self) -> int:
        return self.rollout_batch_size // self.train_batch_size

    @property
    def off_policy(self) -> bool:
        """Whether some optimizer step trains on rollouts sampled by an earlier version of the policy."""
        return self.epochs_per_rollout_batch > 1 or self.train_batch_size < self.rollout_batch_size or self.async_steps > 0

    def validate(self) -> None:
        """Raises ``UserError`` naming every option whose value cannot work (shared groups: ``validate_common``)."""
        problems = validate_common(self)
        positive = ("n_grpo_steps", "rollout_batch_size", "group_size", "train_batch_size",
                    "gradient_accumulation_steps", "epochs_per_rollout_batch")
        problems += [f"--{name.replace('_', '-')}: must be >= 1, got {getattr(self, name)}"
                     for name in positive if getattr(self, name) < 1]
        if self.async_steps < 0:
            problems.append(f"--async-steps: must be >= 0, got {self.async_steps}")
        if self.group_size == 1:
            problems.append("--group-size 1: a group of one response has no baseline (its advantage is always 0, "
                            "nothing is learned); use --group-size 2 or more")
        raise_problems(problems)
        if self.train_batch_size % self.gradient_accumulation_steps:
            problems.append(f"--train-batch-size ({self.train_batch_size}) must be divisible by "
                            f"--gradient-accumulation-steps ({self.gradient_accumulation_steps})")
        if self.rollout_batch_size % self.group_size:
            problems.append(f"--rollout-batch-size ({self.rollout_batch_size}) must be divisible by --group-size "
                            f"({self.group_size}): each question gets group-size responses")
        if self.train_batch_size < self.group_size:
            problems.append(f"--train-batch-size ({self.train_batch_size}) must be at least --group-size ({self.group_size})")
        if self.micro_train_batch_size and self.rollout_batch_size % self.micro_train_batch_size:
            problems.append(f"--rollout-batch-size ({self.rollout_batch_size}) must be divisible by the microbatch size "
                            f"(train-batch-size / gradient-accumulation-steps = {self.micro_train_batch_size})")
        if self.rollout_batch_size % self.train_batch_size:
            problems.append(f"--rollout-batch-size ({self.rollout_batch_size}) must be divisible by --train-batch-size "
                            f"({self.train_batch_size}), so that every optimizer step sees a full train batch")
        if self.loss_type in ("grpo_clip", "gspo") and (self.cliprange is None or self.cliprange <= 0):
            problems.append(f"--loss-type {self.loss_type} needs --cliprange > 0")
        if self.loss_type == "cispo" and (self.cliprange_high if self.cliprange_high is not None else self.cliprange or 0) <= 0:
            problems.append("--loss-type cispo needs --cliprange-high > 0 (its clip of the importance weight)")
        if self.cliprange_high is not None and self.cliprange is not None and self.cliprange_high < self.cliprange:
            problems.append(f"--cliprange-high ({self.cliprange_high}) must be at least --cliprange ({self.cliprange})")
        if self.dual_clip_c is not None and self.dual_clip_c <= 1:
            problems.append(f"--dual-clip-c ({self.dual_clip_c}) must be > 1")
        if self.off_policy and self.loss_type not in ("grpo_clip", "gspo", "cispo"):
            problems.append(f"epochs-per-rollout-batch > 1, train-batch-size < rollout-batch-size or async-steps > 0 "
                            f"is off-policy; --loss-type {self.loss_type} has no importance ratio for it: use "
                            "grpo_clip, gspo or cispo")
        if self.advantage_baseline == "leave_one_out" and self.group_size < 2:
            problems.append("--advantage-baseline leave_one_out needs --group-size >= 2")
        if not 0.0 <= self.overlong_buffer_fraction <= 1.0:
            problems.append("--overlong-buffer-fraction must be in [0, 1]")
        if self.dynamic_sampling_max_tries < 1:
            problems.append("--dynamic-sampling-max-tries must be >= 1")
        if self.rollout_correction_cap <= 1:
            problems.append("--rollout-correction-cap must be > 1")
        if self.kl_coef < 0:
            problems.append(f"--kl-coef: must be >= 0, got {self.kl_coef:g}")
        raise_problems(problems)


# ---------------------------------------------------------------------------------------------
# Data, rollouts and microbatches


def rollout_microbatches(prompt_ids: list[list[int]], response_ids: list[list[int]], advantages: torch.Tensor,
                         raw_rewards: torch.Tensor, micro_batch_size: int, pad_token_id: int) -> list[dict]:
    """Returns the rollouts cut into microbatches of ``micro_batch_size`` (in rollout order), each padded to its longest.

    Each dict holds ``input_ids``/``labels``/``response_mask`` (micro, L - 1) from ``pad_and_shift``
    and ``advantages``/``raw_rewards`` (micro,) float32. The response tokens are the sampled ids
    themselves, not a re-tokenisation of the text, so the log-probs are of what was sampled.
    """
    microbatches = []
    for start in range(0, len(prompt_ids), micro_batch_size):
        rows = slice(start, start + micro_batch_size)
        batch = pad_and_shift(prompt_ids[rows], response_ids[rows], pad_token_id)
        microbatches.append({"input_ids": batch["input_ids"], "labels": batch["labels"],
                             "response_mask": batch["response_mask"],
                             "advantages": advantages[rows], "raw_rewards": raw_rewards[rows]})
    return microbatches


@torch.no_grad()
def add_log_probs(model, microbatches: list[dict], key: str, device: torch.device, temperature: float = 1.0) -> None:
    """Stores ``model``'s response log-probs (micro, L - 1) at ``temperature``, without gradient, under ``key`` of each microbatch."""
    for mb in microbatches:
        mask = mb["response_mask"].to(device)
        mb[key] = get_response_log_probs(model, mb["input_ids"].to(device), mb["labels"].to(device),
                                         response_mask=mask, temperature=temperature)["log_probs"]


# ---------------------------------------------------------------------------------------------
# One optimizer step


def train_step(model, microbatches: list[dict], config: GRPOConfig, device: torch.device,
               ctx: distributed.DistributedContext = SINGLE_PROCESS) -> dict[str, float]:
    """Returns the step's metrics after forward and backward of every microbatch (gradients accumulated, no optimizer step).

    Old log-probs: the ones stored per rollout batch when off-policy; on-policy, the current
    ones detached (ratio 1, so grpo_clip equals REINFORCE with baseline). The rollout engine's
    log-probs (``behaviour_log_probs``, when the generator returned them) are compared with
    those old log-probs: the mismatch is logged, and ``--rollout-correction`` weights each
    token's loss by the truncated or masked importance ratio. The policy's log-probs are
    taken at the sampling temperature, the distribution the rollouts were drawn from.

    Under torchrun ``microbatches`` are this rank's: the token and sequence counts that
    normalise the loss and every metric are reduced over all ranks (sums; the largest
    mismatch), and a ``filler`` microbatch runs forward and backward with loss 0.
    """
    real = [mb for mb in microbatches if not mb.get("filler")]
    tokens_in_step = distributed.global_sum(int(sum(int(mb["response_mask"].sum()) for mb in real)))
    # Responses masked out whole (--mask-truncated) are out of the loss, also out of its divisor (aggregate_loss).
    examples_in_step = distributed.global_sum(sum(sequences_with_loss_tokens(mb["response_mask"]) for mb in real))
    sums: dict[str, float] = {"loss": 0.0, "response_tokens": 0}
    for mb in microbatches:
        input_ids, labels = mb["input_ids"].to(device), mb["labels"].to(device)
        response_mask = mb["response_mask"].to(device)
        # Right padding under a causal mask: real tokens never attend to the padding after them.
        outputs = get_response_log_probs(model, input_ids, labels, return_token_entropy=True, response_mask=response_mask,
                                         temperature=config.sampling_temperature)
        if mb.get("filler"):
            (outputs["log_probs"].sum() * 0.0).backward()  # joins the gradient reduce-scatters, adds nothing
            continue
        old_log_probs = mb.get("old_log_probs")
        if old_log_probs is None:
            old_log_probs = outputs["log_probs"].detach()
        weights, per_batch = None, {}
        behaviour = mb.get("behaviour_log_probs")
        if behaviour is not None and response_mask.any():
            per_batch = {k: float(v) for k, v in rollout_mismatch_metrics(old_log_probs, behaviour, response_mask).items()}
            if config.rollout_correction != "none":
                weights, correction = rollout_correction_weights(old_log_probs, behaviour, response_mask,
                                                                 config.rollout_correction, config.rollout_correction_cap)
                per_batch.update({k: float(v) for k, v in correction.items()})
        loss, metadata = grpo_microbatch_train_step(
            outputs["log_probs"], response_mask, config.gradient_accumulation_steps, config.loss_type,
            raw_rewards=mb["raw_rewards"].to(device), advantages=mb["advantages"].to(device),
            old_log_probs=old_log_probs, cliprange=config.cliprange, loss_aggregation=config.loss_aggregation,
            normalize_constant=float(config.sampling_max_tokens), tokens_in_step=tokens_in_step,
            examples_in_step=examples_in_step, ref_log_probs=mb.get("ref_log_probs"), kl_coef=config.kl_coef,
            cliprange_high=config.cliprange_high, dual_clip_c=config.dual_clip_c, rollout_weights=weights,
        )
        tokens = int(metadata["num_response_tokens"])
        sums["loss"] += float(loss)
        sums["response_tokens"] += tokens
        per_batch.update(token_entropy=float(masked_mean(outputs["token_entropy"].detach(), response_mask)) if tokens else 0.0,
                         **{key: float(metadata[key]) for key in ("clip_fraction", "clip_fraction_low",
                                                                  "clip_fraction_high", "kl") if key in metadata})
        for key, value in per_batch.items():  # token-weighted means over the step (max for the max)
            if key == "mismatch_max_abs_log_ratio":
                sums[key] = max(sums.get(key, 0.0), value)
            else:
                sums[key] = sums.get(key, 0.0) + value * tokens
    sums = global_metric_sums(sums, ctx, maximum="mismatch_max_abs_log_ratio")
    tokens = max(sums["response_tokens"], 1)
    return {key: value if key in ("loss", "response_tokens", "mismatch_max_abs_log_ratio") else value / tokens
            for key, value in sums.items()}


def global_metric_sums(sums: dict[str, float], ctx: distributed.DistributedContext, maximum: str) -> dict[str, float]:
    """Returns ``sums`` summed over the ranks (``maximum``: the largest of the ranks' values); unchanged at world size 1.

    A key that only some ranks have (the mismatch metrics need the engine's log-probs) counts 0
    on the others.
    """
    if not ctx.is_distributed:
        return sums
    keys = sorted({key for part in distributed.all_gather_objects(sorted(sums)) for key in part})
    values = torch.tensor([float(sums.get(key, 0.0)) for key in keys], dtype=torch.float64)
    summed = distributed.global_sum(values).tolist()
    largest = distributed.global_max(values).tolist()
    reduced = {key: (largest[i] if key == maximum else summed[i]) for i, key in enumerate(keys)}
    reduced["response_tokens"] = int(reduced["response_tokens"])
    return reduced


# ---------------------------------------------------------------------------------------------
# Setup


@dataclasses.dataclass
class GRPOSession(PolicySession):
    """Every object the GRPO loop needs (``setup_grpo`` builds it): the policy session plus optimizer and reference."""

    optimizer: torch.optim.Optimizer | None = None
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    reference: Any = None  # frozen starting model for the KL penalty, or None
    start_step: int = 0
    restored_batches: list[RolloutBatch] = dataclasses.field(default_factory=list)  # --async-steps: from the checkpoint
    steps_without_signal: list[int] = dataclasses.field(default_factory=list)  # consecutive steps, every advantage 0


def setup_grpo(config: GRPOConfig, ctx: distributed.DistributedContext | None = None) -> GRPOSession:
    """Returns the session of ``reasontune grpo``: run directory, policy (from the newest checkpoint on --resume), reference, data, optimizer, generator, logger.

    Under torchrun (``ctx`` of world size > 1) the policy is sharded with FSDP2 before the
    optimizer is built over its shards; the HF generator samples from an unsharded replica and
    each rank keeps its own unsharded reference (forward only); rank 0 alone writes and logs.
    """
    config.validate()
    ctx = ctx or SINGLE_PROCESS
    refuse_what_torchrun_cannot_run(config, ctx)
    if config.world_problems(ctx.world_size):
        raise SystemExit("error: " + "; ".join(config.world_problems(ctx.world_size)))
    run_dir, device, checkpoint = start_run(config, ctx)
    model, tokenizer = load_policy(config, device, weights=checkpoint)
    reference = None
    if config.kl_coef > 0:  # the reference is the starting model, also after a resume
        reference = load_model(config.model, dtype=resolved_dtype(config.dtype, str(device)),
                               device=device).eval().requires_grad_(False)
    questions, validation, data_counts = load_questions(config, needed=config.rollout_batch_size // config.group_size,
                                                        tokenizer=tokenizer)
    replica = unsharded_replica(model, config, ctx)
    model = shard_policy(model, config, ctx)
    optimizer = make_optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)  # constant, kept for the trainer state
    session = GRPOSession(
        config=config, model=model, tokenizer=tokenizer, device=device,
        generator=make_generator(config, replica.model if replica else model, tokenizer, device), questions=questions,
        validation=evaluation_sets(config, validation, load_template(config.prompt_template)),
        template=load_template(config.prompt_template), reward_fn=reward_fn_by_name(config.reward_name),
        rollouts=rollout_sampling(config, config.reward_name).replace(return_logprobs=True), run_dir=run_dir,
        logger=make_logger(run_dir, config, resume=checkpoint is not None) if ctx.is_main else None,
        ctx=ctx, replica=replica, optimizer=optimizer, scheduler=scheduler, reference=reference)
    record_launch(run_dir / "config.json", ctx, train_batch_size=config.train_batch_size,
                  rollout_batch_size=config.rollout_batch_size,
                  microbatch_per_rank=config.microbatch_size(ctx.world_size),
                  gradient_accumulation_steps=config.gradient_accumulation_steps)
    if checkpoint is not None:
        state = restore_training_state(checkpoint, optimizer, scheduler, model=model, ctx=ctx)
        session.start_step = state["step"]
        pending = state.get("pending_rollouts") or {}
        where = str(checkpoint / "trainer_state.json")
        if not isinstance(pending, dict) or not isinstance(pending.get("batches", []), list):
            raise CheckpointError(f"{where}: field 'pending_rollouts' must be an object with a list of batches")
        if pending.get("async_steps") == config.async_steps:
            session.restored_batches = [RolloutBatch.from_state(batch, where) for batch in pending["batches"]]
        resampled = [step for step in range(session.start_step + 1, session.start_step + config.async_steps + 1)
                     if step <= config.n_grpo_steps and step not in {b.step for b in session.restored_batches}]
        if session.logger is not None:
            session.logger.truncate_after(session.start_step)
            session.logger.log("event", session.start_step, message=f"resumed from {checkpoint.name}" + (
                f"; the rollouts of steps {resampled[0]}-{resampled[-1]} were not in it (torchrun, or another "
                "--async-steps), so they sample from the resumed weights: less stale than an uninterrupted run's, "
                "and not bit-identical to it" if resampled else ""))
    elif session.logger is not None:
        session.logger.log("data", 0, **data_counts, loss_type=config.loss_type,
                           loss_aggregation=config.loss_aggregation, off_policy=config.off_policy)
    if not ctx.is_main:
        return session
    if config.recipe:
        print(f"recipe {config.recipe}: " + ", ".join(f"{k}={v}" for k, v in config.recipe_settings().items()))
    if ctx.is_distributed:
        print(f"{ctx.world_size} ranks: each takes {config.microbatch_size(ctx.world_size)} rollouts x "
              f"{config.gradient_accumulation_steps} microbatches of each optimizer step's {config.train_batch_size}")
    print(f"GRPO on {config.model}: {config.n_grpo_steps} steps of {config.rollout_batch_size // config.group_size} "
          f"questions x {config.group_size} responses, {config.optimizer_steps_per_rollout_batch} optimizer step(s) "
          f"each; loss {config.loss_type}, aggregation {config.loss_aggregation}"
          f"{', off-policy' if config.off_policy else ''}")
    return session


def rollout_batch(session: GRPOSession, step: int, policy=None, group=None) -> tuple[Rollouts, dict[str, float]]:
    """Returns step ``step``'s graded rollouts (seeded questions, ``group_size`` responses each) and their counts.

    The responses are sampled from ``policy`` (an unsharded model; default: the current policy,
    through its refreshed replica when sharded, which is a collective). With
    ``--dynamic-sampling`` groups whose rewards are all equal are dropped and fresh questions
    drawn (seeds varied per draw) until the batch is full or the tries run out. Under torchrun
    the ranks' rollouts are gathered over ``group`` (default: the default process group).
    """
    config = session.config
    needed = config.rollout_batch_size // config.group_size
    session.generator.sync_weights(policy if policy is not None else generation_model(session.model, session.replica))

    def draw(attempt: int) -> tuple[list[Rollouts], list[bool]]:
        indices = question_batch(len(session.questions), needed, config.seed + 7919 * attempt, step)
        batch = [session.questions[i] for i in indices]
        # Under torchrun each rank samples its slice of the questions; every rank gets all the rollouts back.
        drawn = sharded_rollouts(session.generator, batch, session.template,
                                 session.rollouts.replace(seed=config.seed * 1_000_003 + step + 104_729 * attempt),
                                 session.reward_fn, session.ctx, grading_workers=config.grading_workers, group=group)
        rewards = torch.tensor([r["reward"] for r in drawn.flat_rewards()], dtype=torch.float32)
        keep = informative_groups(rewards, config.group_size).tolist() if config.dynamic_sampling else [True] * len(batch)
        return [drawn.select([i]) for i in range(len(batch))], keep

    filled = fill_batch(draw, needed, config.dynamic_sampling_max_tries if config.dynamic_sampling else 1)
    if not config.async_steps:  # with overlap the engine generates while the policy trains: it never sleeps
        session.generator.sleep()
    return (Rollouts.concat(filled.groups) if filled.groups else None), filled.metrics()


def training_microbatches(session: GRPOSession, rollouts: Rollouts) -> tuple[list[dict], dict[str, float]]:
    """Returns (microbatches with advantages and old / reference / behaviour log-probs, reward statistics) of a rollout batch.

    Rewards get DAPO's soft overlong penalty when asked; advantages come from
    ``compute_advantages`` (baseline and std as configured); truncated responses leave the
    loss with ``--mask-truncated``.
    """
    config = session.config
    completions = rollouts.flat_completions()
    scores = rollouts.flat_rewards()
    raw_rewards = torch.tensor([float(s["reward"]) for s in scores], dtype=torch.float32)
    if config.overlong_buffer_fraction > 0:
        raw_rewards = raw_rewards + overlong_penalty(
            torch.tensor([c.num_tokens for c in completions]), config.sampling_max_tokens,
            max(1, round(config.overlong_buffer_fraction * config.sampling_max_tokens)), config.overlong_penalty_factor)
    advantages = compute_advantages(raw_rewards, config.group_size, config.advantage_baseline, config.advantage_std,
                                    config.advantage_eps)
    reward_stats = {"nonzero_advantage_fraction": float((advantages.abs() > ZERO_ADVANTAGE).float().mean()),
                    "reward_mean": float(raw_rewards.mean()),
                    "reward_std": float(raw_rewards.std()) if raw_rewards.numel() > 1 else 0.0,
                    "answer_reward_mean": statistics.fmean(float(s["answer_reward"]) for s in scores),
                    "format_reward_mean": statistics.fmean(float(s["format_reward"]) for s in scores)}
    prompt_ids = [ids for ids in session.tokenizer(rollouts.prompts, add_special_tokens=True)["input_ids"]
                  for _ in range(config.group_size)]
    micro = config.microbatch_size(session.ctx.world_size)
    microbatches = rollout_microbatches(prompt_ids, [c.token_ids for c in completions], advantages, raw_rewards,
                                        micro, pad_token_id_of(session.tokenizer))
    for start, mb in zip(range(0, len(completions), micro), microbatches):
        rows = completions[start:start + micro]
        if config.mask_truncated:
            mb["response_mask"] = mask_truncated_responses(
                mb["response_mask"], torch.tensor([c.finish_reason == "length" for c in rows]))
        if all(c.logprobs is not None and len(c.logprobs) == c.num_tokens for c in rows):
            # The engine's log-probs sit where the labels are those tokens: the response positions, in order.
            behaviour = torch.zeros(mb["labels"].shape, dtype=torch.float32)
            full_mask = pad_and_shift(prompt_ids[start:start + micro], [c.token_ids for c in rows],
                                      0)["response_mask"]
            behaviour[full_mask] = torch.tensor([lp for c in rows for lp in c.logprobs], dtype=torch.float32)
            mb["behaviour_log_probs"] = behaviour
    return microbatches, reward_stats


def rank_train_batches(session: GRPOSession, microbatches: list[dict], behaviour=None) -> list[list[dict]]:
    """Returns this rank's microbatches of each optimizer step of a rollout batch, with old / reference log-probs added.

    An optimizer step takes ``world size x gradient-accumulation-steps`` consecutive microbatches
    (``train-batch-size`` rollouts) and each rank its ``rank_microbatches`` of them (fillers where
    a dynamic-sampling batch stayed short); at world size 1 the step's microbatches themselves.
    The old log-probs of an off-policy run are those of ``behaviour``, the unsharded model that
    sampled the rollouts (``--async-steps``), or else of the current policy, which sampled them:
    every rank computes them for its own microbatches (the same number on every rank: the
    sharded policy's forwards are collectives).
    """
    config = session.config
    per_step = session.ctx.world_size * config.gradient_accumulation_steps
    steps = [microbatches[k * per_step:(k + 1) * per_step] for k in range(config.optimizer_steps_per_rollout_batch)]
    mine = [rank_microbatches(step, session.ctx) if step else [] for step in steps]
    if config.off_policy and config.loss_type in ("grpo_clip", "gspo", "cispo"):
        for train_batch in mine:
            add_log_probs(behaviour if behaviour is not None else session.model, train_batch, "old_log_probs",
                          session.device, config.sampling_temperature)
    if session.reference is not None:
        for train_batch in mine:
            add_log_probs(session.reference, train_batch, "ref_log_probs", session.device)
    return mine


@dataclasses.dataclass
class RolloutBatch:
    """One GRPO step's rollouts, ready to train on: what ``prepare_step`` returns and the loop consumes.

    ``policy_version`` is the GRPO step after whose update the sampling weights were taken (0:
    the starting weights), so the rollouts of step ``step`` are ``step - 1 - policy_version``
    steps stale. ``metrics`` holds what the step logs of its rollouts (``rollout_metrics``) and
    is empty when dynamic sampling kept no group. ``rollouts`` is for inspection only: a batch
    restored from a checkpoint (``from_state``) has none.
    """

    step: int
    policy_version: int
    sampling_counts: dict[str, float]
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)
    train_batches: list[list[dict]] = dataclasses.field(default_factory=list)
    rollout_seconds: float = 0.0
    rollouts: Rollouts | None = None

    def state(self) -> dict[str, Any]:
        """Returns the batch as trainer state (JSON structure and tensors: no pickle), ``from_state``'s input."""
        return {key: value for key, value in dataclasses.asdict(self).items() if key != "rollouts"}

    @classmethod
    def from_state(cls, state: Any, where: str = "trainer state") -> RolloutBatch:
        """Returns the batch ``state()`` saved; ``CheckpointError`` naming ``where`` when it is not one."""
        fields = {f.name for f in dataclasses.fields(cls)} - {"rollouts"}
        if not isinstance(state, dict) or not {"step", "policy_version", "sampling_counts"} <= set(state) <= fields:
            raise CheckpointError(f"{where}: field 'pending_rollouts' holds a batch that is not one")
        if not (isinstance(state["step"], int) and isinstance(state.get("train_batches", []), list)
                and all(isinstance(rank, list) and all(isinstance(b, dict) for b in rank)
                        for rank in state.get("train_batches", []))):
            raise CheckpointError(f"{where}: field 'pending_rollouts' holds a malformed batch")
        return cls(**state)


def prepare_step(session: GRPOSession, step: int, policy_version: int, behaviour=None, group=None) -> RolloutBatch:
    """Returns step ``step``'s rollouts sampled from ``behaviour`` (default: the current policy), graded and cut into this rank's microbatches.

    Under torchrun the rollouts are gathered over ``group`` (``RolloutPipeline``'s own, or the default group).
    """
    tick = time.perf_counter()
    rollouts, sampling_counts = rollout_batch(session, step, behaviour, group)
    batch = RolloutBatch(step, policy_version, sampling_counts, rollouts=rollouts)
    if rollouts is not None:
        microbatches, reward_stats = training_microbatches(session, rollouts)
        batch.metrics = rollout_metrics(rollouts, reward_stats)
        batch.train_batches = rank_train_batches(session, microbatches, behaviour)
    batch.rollout_seconds = time.perf_counter() - tick
    return batch


class RolloutPipeline:
    """Rollout batches of GRPO steps, generated up to ``--async-steps`` K steps ahead of training (K = 0: in line).

    With K > 0 one background thread owns a behaviour copy of the policy. After the update of
    step ``k`` the loop hands over a snapshot of the weights (``policy_version`` k) for the
    rollouts of step ``k + 1 + K``, so step ``s`` trains on rollouts of the weights after step
    ``max(s - 1 - K, first)``: at most K steps stale, and which weights produced which rollout
    is fixed by the step numbers, never by timing. The thread also computes the old log-probs
    under those same weights, so the importance ratio is against the behaviour policy (AReaL,
    arXiv 2505.24298, and PipelineRL run training ahead of generation the same way). With K = 0
    nothing runs in the background: each step samples from the current policy when it starts,
    exactly the on-policy loop.

    Under torchrun every rank runs its own thread on its slice of the questions and the thread
    gathers the rollouts over a process group of its own; the snapshots (layer-by-layer gathers
    of the shards) are taken by the main thread, between optimizer steps, on every rank alike.
    """

    def __init__(self, session: GRPOSession, first_step: int, last_step: int):
        self.session, self.last_step = session, last_step
        self.ahead = session.config.async_steps
        self.pending: dict[int, concurrent.futures.Future] = {}
        self.behaviour = self.executor = self.group = None
        if self.ahead:
            self.group = distributed.side_group()  # under torchrun: the thread's gathers stay off the FSDP collectives
            self.behaviour = copy.deepcopy(generation_model(session.model, session.replica)).eval().requires_grad_(False)
            self.executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="grpo-rollouts")
            restored = {batch.step: batch for batch in session.restored_batches}
            for step in range(first_step, min(first_step + self.ahead, last_step) + 1):
                if step in restored:  # sampled before the checkpoint from weights it does not hold
                    self.pending[step] = concurrent.futures.Future()
                    self.pending[step].set_result(restored[step])
                else:
                    self._submit(step, first_step - 1)

    def _submit(self, step: int, policy_version: int) -> None:
        # Gathered layer by layer when sharded (collectives on the main thread, between steps), copied either way.
        weights = {name: tensor.clone() for layer in distributed.full_state_dict_layers(self.session.model)
                   for name, tensor in layer.items()}
        self.pending[step] = self.executor.submit(self._produce, step, policy_version, weights)

    @torch.no_grad()
    def _produce(self, step: int, policy_version: int, weights: dict[str, torch.Tensor]) -> RolloutBatch:
        self.behaviour.load_state_dict(weights)
        return prepare_step(self.session, step, policy_version, self.behaviour, self.group)

    def take(self, step: int) -> tuple[RolloutBatch, float]:
        """Returns (step ``step``'s rollout batch, seconds the trainer waited for it)."""
        tick = time.perf_counter()
        if not self.ahead:
            return prepare_step(self.session, step, step - 1), time.perf_counter() - tick
        batch = self.pending.pop(step).result()
        return batch, time.perf_counter() - tick

    def updated(self, step: int) -> None:
        """Returns nothing; after step ``step``'s update, starts the rollouts of step ``step + 1 + K`` from the new weights."""
        if self.ahead and step + 1 + self.ahead <= self.last_step:
            self._submit(step + 1 + self.ahead, step)

    def pending_state(self, step: int) -> dict[str, Any] | None:
        """Returns the batches of steps after ``step`` sampled from weights before it, as trainer state (None: nothing to keep).

        A checkpoint of step ``step`` holds the weights that sample step ``step + 1 + K``; the
        batches of steps ``step + 1 … step + K`` come from older weights, so an exact resume
        needs them saved (their rollouts are waited for). One process only: under torchrun each
        rank holds its own microbatches, and a resume samples them again.
        """
        if not self.ahead or self.session.ctx.is_distributed:
            return None
        older = [batch for later, batch in sorted(self.pending.items()) if later <= step + self.ahead]
        return {"async_steps": self.ahead, "batches": [future.result().state() for future in older]}

    def drain(self) -> None:
        """Returns nothing once the background thread is idle (the generator is then free, e.g. to evaluate with)."""
        concurrent.futures.wait(list(self.pending.values()))

    def close(self) -> None:
        """Returns nothing; cancels rollouts not yet started and waits for the running one."""
        if self.executor is not None:
            self.executor.shutdown(wait=True, cancel_futures=True)
        self.pending.clear()


def rollout_metrics(rollouts: Rollouts, reward_stats: dict[str, float]) -> dict[str, Any]:
    """Returns what a GRPO step logs of its rollouts: rewards, accuracy and response lengths (correct / incorrect / truncated)."""
    summary = rollouts.summary()
    return {"reward": reward_stats["reward_mean"], "reward_std": reward_stats["reward_std"],
            "nonzero_advantage_fraction": reward_stats["nonzero_advantage_fraction"],
            "format_reward": reward_stats.get("format_reward_mean"), "answer_reward": reward_stats.get("answer_reward_mean"),
            **{key: summary[key] for key in ("accuracy", "pass_at_n", "mean_response_tokens",
                                             "mean_response_tokens_correct", "mean_response_tokens_incorrect",
                                             "mean_response_tokens_truncated", "truncated_fraction")}}


# ---------------------------------------------------------------------------------------------
# The loop


def train_one_step(session: GRPOSession, pipeline: RolloutPipeline, step: int, progress: Progress, started: float,
                   save) -> None:
    """Returns nothing after GRPO step ``step``: its rollouts (from ``pipeline``), epochs x optimizer steps on them, the step's log line."""
    config, model, logger, ctx = session.config, session.model, session.logger, session.ctx
    tick = time.perf_counter()
    # --- rollouts: seeded questions, group-size graded responses each (from the current policy, or K steps back)
    batch, waited = pipeline.take(step)
    if not batch.metrics:  # dynamic sampling found no group with differing rewards: nothing to learn from
        pipeline.updated(step)
        if logger is not None:
            logger.log("event", step, message=f"GRPO step {step}: every drawn group had equal rewards; no update",
                       **batch.sampling_counts)
        progress.update(step)
        return
    # --- policy-gradient steps: epochs x train batches (this rank's part of each), each accumulated over its microbatches
    model.train()
    step_metrics, skipped_updates = [], 0
    for _ in range(config.epochs_per_rollout_batch):
        for train_batch in batch.train_batches:
            if not train_batch:  # a dynamic-sampling batch that stayed short
                continue
            metrics = train_step(model, train_batch, config, session.device, ctx)
            if metrics["response_tokens"] == 0:  # every response masked out (--mask-truncated): no update at all,
                session.optimizer.zero_grad(set_to_none=True)  # not even AdamW's momentum and weight decay
                skipped_updates += 1
                step_metrics.append({**metrics, "grad_norm": 0.0})
                continue
            try:
                grad_norm = clip_and_step(model, session.optimizer, session.scheduler, config.max_grad_norm,
                                          metrics["loss"])
            except NonFiniteStep as problem:
                pipeline.close()
                path = save(step - 1, f"checkpoint-{step - 1}")
                stop_diverged(f"{problem} at GRPO step {step}; stopped. The weights after step {step - 1} are in "
                              f"{path}; lower --learning-rate", step, logger, progress)
            step_metrics.append({**metrics, "grad_norm": grad_norm})
    pipeline.updated(step)
    # --- log (means over the step's optimizer steps; rewards and lengths of the rollouts)
    mean = {key: statistics.fmean(m[key] for m in step_metrics if key in m)
            for key in step_metrics[0] if key != "response_tokens"}
    if logger is not None and (step % config.log_every == 0 or step == config.n_grpo_steps):
        overlap = ({"policy_version": batch.policy_version, "staleness": step - 1 - batch.policy_version,
                    "rollout_wait_s": waited} if config.async_steps else {})
        logger.log("train", step, lr=session.scheduler.get_last_lr()[0], **mean,
                   optimizer_steps=len(step_metrics) - skipped_updates, **({"skipped_updates": skipped_updates}
                                                                          if skipped_updates else {}),
                   **batch.metrics, **batch.sampling_counts,
                   rollout_s=batch.rollout_seconds, **overlap, step_s=time.perf_counter() - tick,
                   elapsed_s=time.perf_counter() - started)
    progress.update(step, loss=mean["loss"], reward=batch.metrics["reward"], accuracy=batch.metrics["accuracy"])
    warn_when_rewards_carry_no_signal(session, step, batch.metrics, progress)


def degenerate_rewards_message(steps: list[int], metrics: dict[str, Any]) -> str:
    """Returns the warning for GRPO steps ``steps`` whose every advantage was 0 (``metrics``: the last one's rollout metrics)."""
    what = ("every reward was 0" if metrics.get("reward") == 0 and not metrics.get("reward_std")
            else "every group's rewards were equal")
    return (f"warning: GRPO steps {steps[0]}-{steps[-1]}: {what}, so every advantage is 0 and the policy learns "
            "nothing from them (the loss is 0 by construction, not because training converged). Check that the "
            "prompt template and the reward agree (r1_zero wants '</think> <answer>...</answer>'; "
            "--prompt-template/--reward), that the references are read (the data's answer/ground_truth field), and "
            "that answers are extracted (reasontune eval on a few questions: its records show format and answer "
            "rewards). A model that never formats its answer needs SFT first; one that always succeeds needs "
            "harder questions.")


def warn_when_rewards_carry_no_signal(session: GRPOSession, step: int, metrics: dict[str, Any], progress: Progress) -> None:
    """Returns nothing; after ``DEGENERATE_REWARD_STEPS`` consecutive steps without a non-zero advantage, logs and prints a warning (once per streak)."""
    if metrics.get("nonzero_advantage_fraction", 1.0) > 0:
        session.steps_without_signal.clear()
        return
    session.steps_without_signal.append(step)
    if len(session.steps_without_signal) != DEGENERATE_REWARD_STEPS or session.logger is None:
        return
    message = degenerate_rewards_message(session.steps_without_signal, metrics)
    session.logger.log("event", step, message=message)
    progress.write(message)


def train_grpo(session: GRPOSession) -> Path:
    """Returns the run directory after GRPO steps ``start_step + 1 … n_grpo_steps``.

    The loop: rollouts (sample questions → group-size responses each → grade) → group-normalised
    advantages → microbatches (old / reference log-probs) → epochs × optimizer steps of
    grpo_microbatch_train_step → clip → AdamW → metrics → periodic evaluation → checkpoint.
    Writes metrics.jsonl, checkpoint-N/, final/, eval/ and report/.
    """
    config, model, logger, run_dir = session.config, session.model, session.logger, session.run_dir
    ctx = session.ctx
    eval_sampling = evaluation_sampling(config, config.backend)

    def save(step: int, name: str) -> Path:
        pending = pipeline.pending_state(step) if pipeline is not None else None
        return save_run_checkpoint(run_dir, name, model, session.tokenizer, step, session.optimizer, session.scheduler,
                                   f"grpo-seed-{config.seed}", keep=config.save_total_limit, ctx=ctx,
                                   **({"pending_rollouts": pending} if pending else {}))

    def evaluate_and_log(step: int) -> None:
        log_evaluation(session, step, eval_sampling, progress)

    progress = Progress(config.n_grpo_steps, initial_step=session.start_step, enabled=config.progress and ctx.is_main,
                        description="grpo")
    pipeline = None
    if session.validation and config.eval_before_training and session.start_step == 0:
        evaluate_and_log(0)
    started = time.perf_counter()
    pipeline = RolloutPipeline(session, session.start_step + 1, config.n_grpo_steps)
    try:
        for step in range(session.start_step + 1, config.n_grpo_steps + 1):
            train_one_step(session, pipeline, step, progress, started, save)
            # --- evaluate (the background thread idle first: it shares the generator)
            if session.validation and config.eval_every and step % config.eval_every == 0 and step != config.n_grpo_steps:
                pipeline.drain()
                evaluate_and_log(step)
            # --- checkpoint
            if config.save_every and step % config.save_every == 0 and step != config.n_grpo_steps:
                save(step, f"checkpoint-{step}")
            if stop_requested(ctx) and step < config.n_grpo_steps:  # SIGINT/SIGTERM: saved, exit 130
                stop_for_signal(config, run_dir, step, save, logger, progress)
    finally:
        pipeline.close()
    progress.close()

    # --- final weights, final evaluation, report
    save(config.n_grpo_steps, "final")
    if session.validation:
        evaluate_and_log(config.n_grpo_steps)
    session.generator.close()
    return finish_run(run_dir, logger, config.write_report) if logger is not None else run_dir


def run_grpo(config: GRPOConfig) -> Path:
    """Returns the run directory after ``config.n_grpo_steps`` GRPO steps on ``config.train_data`` (``setup_grpo`` then ``train_grpo``).

    Under ``torchrun --nproc_per_node N -m reasontune grpo …``: each rank samples its slice of
    every step's questions (whole groups), the rollouts are gathered on every rank, and each
    optimizer step's train batch is split over the ranks (FSDP2, counts summed over ranks).
    """
    return distributed.run_on_every_rank(config, lambda ctx: train_grpo(setup_grpo(config, ctx)))
