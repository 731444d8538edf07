"""GRPO with verified rewards: rollouts, group-normalised advantages, policy-gradient steps.

Each GRPO step samples ``rollout_batch_size / group_size`` questions, generates ``group_size``
responses to each with the current policy, grades them, normalises the rewards within each
group into advantages and takes ``epochs_per_rollout_batch`` passes of policy-gradient steps
over the rollouts (one optimizer step per ``train_batch_size`` rollouts). Loss aggregation and
gradient-accumulation scaling live in ``reasontune.losses.grpo_microbatch_train_step``.
``setup_grpo(config)`` returns the objects; ``train_grpo(session)`` is the loop.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Literal

import torch

from reasontune.config import help_field, same_field
from reasontune.data import example_prompt, load_template
from reasontune.logprobs import get_response_log_probs
from reasontune.losses import LossAggregation, compute_group_normalized_rewards, grpo_microbatch_train_step
from reasontune.modeling import load_model
from reasontune.options import (CheckpointOptions, InLoopEvaluationOptions, OptimizerOptions, RolloutOptions,
                                TrainerOptions, resolved_dtype)
from reasontune.rollouts import Rollouts, generate_rollouts, reward_fn_by_name
from reasontune.tokenization import pad_and_shift, pad_token_id_of
from reasontune.tracking import Progress
from reasontune.training.common import (NonFiniteStep, PolicySession, clip_and_step, eval_metrics, evaluate_policy,
                                        evaluation_sampling, finish_run, load_policy, load_questions, make_generator,
                                        make_logger, make_optimizer, question_batch, restore_training_state,
                                        rollout_sampling, save_training_checkpoint, start_run, stop_diverged,
                                        trainer_state)


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
    loss_type: Literal["no_baseline", "reinforce_with_baseline", "grpo_clip"] = help_field("reinforce_with_baseline", "policy-gradient loss: no_baseline (raw rewards), reinforce_with_baseline (group-normalised advantages) or grpo_clip (PPO-style clipped ratio)", group="grpo")
    use_std_normalization: bool = help_field(True, "divide advantages by the group's reward std (false: Dr. GRPO's mean-centring only)", group="grpo")
    advantage_eps: float = help_field(1e-6, "added to the group std before dividing", group="grpo")
    cliprange: float | None = help_field(0.2, "epsilon of grpo_clip's ratio clip", group="grpo")
    loss_aggregation: LossAggregation = help_field("sequence_mean", "per-token loss to scalar: sequence_mean (GRPO), sequence_sum (Dr. GRPO; constant = sampling-max-tokens) or token_mean (DAPO; over the optimizer step's tokens)", group="grpo")
    kl_coef: float = help_field(0.0, "weight of a per-token k3 KL penalty against the frozen starting model (0: off, no reference model loaded)", group="grpo")

    @property
    def micro_train_batch_size(self) -> int:
        return self.train_batch_size // self.gradient_accumulation_steps

    @property
    def optimizer_steps_per_rollout_batch(self) -> int:
        return self.rollout_batch_size // self.train_batch_size

    @property
    def off_policy(self) -> bool:
        """Whether some optimizer step trains on rollouts sampled by an earlier version of the policy."""
        return self.epochs_per_rollout_batch > 1 or self.train_batch_size < self.rollout_batch_size

    def validate(self) -> None:
        """Raises SystemExit naming the options when the batch sizes or loss settings cannot work together."""
        problems = []
        if not self.train_data:
            problems.append("--train-data is required")
        if self.sampling_temperature <= 0:
            problems.append("--sampling-temperature must be > 0 (GRPO needs different responses within a group)")
        positive = ("n_grpo_steps", "rollout_batch_size", "group_size", "train_batch_size",
                    "gradient_accumulation_steps", "epochs_per_rollout_batch", "generation_batch_size")
        problems += [f"--{name.replace('_', '-')} must be >= 1" for name in positive if getattr(self, name) < 1]
        if problems:
            raise SystemExit("error: " + "; ".join(problems))
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
        if self.loss_type == "grpo_clip" and (self.cliprange is None or self.cliprange <= 0):
            problems.append("--loss-type grpo_clip needs --cliprange > 0")
        if self.off_policy and self.loss_type != "grpo_clip":
            problems.append(f"epochs-per-rollout-batch > 1 or train-batch-size < rollout-batch-size is off-policy; "
                            f"--loss-type {self.loss_type} has no importance ratio for it: use grpo_clip")
        if not 1 <= self.sampling_min_tokens <= self.sampling_max_tokens:
            problems.append(f"need 1 <= --sampling-min-tokens ({self.sampling_min_tokens}) <= --sampling-max-tokens "
                            f"({self.sampling_max_tokens}): an empty response has no token to train")
        if self.kl_coef < 0:
            problems.append("--kl-coef must be >= 0")
        if problems:
            raise SystemExit("error: " + "; ".join(problems))


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
def add_log_probs(model, microbatches: list[dict], key: str, device: torch.device) -> None:
    """Stores ``model``'s response log-probs (micro, L - 1), without gradient, under ``key`` of each microbatch."""
    for mb in microbatches:
        mask = mb["response_mask"].to(device)
        mb[key] = get_response_log_probs(model, mb["input_ids"].to(device), mb["labels"].to(device),
                                         response_mask=mask)["log_probs"]


# ---------------------------------------------------------------------------------------------
# One optimizer step


def train_step(model, microbatches: list[dict], config: GRPOConfig, device: torch.device) -> dict[str, float]:
    """Returns the step's metrics after forward and backward of every microbatch (gradients accumulated, no optimizer step).

    Old log-probs: the ones stored per rollout batch when off-policy; on-policy ``grpo_clip``
    uses the current ones detached (ratio 1, so it equals REINFORCE with baseline).
    """
    tokens_in_step = int(sum(int(mb["response_mask"].sum()) for mb in microbatches))
    totals = {"loss": 0.0, "entropy_sum": 0.0, "clipped_sum": 0.0, "kl_sum": 0.0, "response_tokens": 0}
    for mb in microbatches:
        input_ids, labels = mb["input_ids"].to(device), mb["labels"].to(device)
        response_mask = mb["response_mask"].to(device)
        # Right padding under a causal mask: real tokens never attend to the padding after them.
        outputs = get_response_log_probs(model, input_ids, labels, return_token_entropy=True, response_mask=response_mask)
        old_log_probs = mb.get("old_log_probs")
        if old_log_probs is None and config.loss_type == "grpo_clip":
            old_log_probs = outputs["log_probs"].detach()
        loss, metadata = grpo_microbatch_train_step(
            outputs["log_probs"], response_mask, config.gradient_accumulation_steps, config.loss_type,
            raw_rewards=mb["raw_rewards"].to(device), advantages=mb["advantages"].to(device),
            old_log_probs=old_log_probs, cliprange=config.cliprange, loss_aggregation=config.loss_aggregation,
            normalize_constant=float(config.sampling_max_tokens), tokens_in_step=tokens_in_step,
            ref_log_probs=mb.get("ref_log_probs"), kl_coef=config.kl_coef,
        )
        tokens = int(metadata["num_response_tokens"])
        totals["loss"] += float(loss)
        totals["response_tokens"] += tokens
        totals["entropy_sum"] += float(outputs["token_entropy"].detach()[response_mask].float().sum())
        totals["clipped_sum"] += float(metadata.get("clip_fraction", 0.0)) * tokens
        totals["kl_sum"] += float(metadata.get("kl", 0.0)) * tokens
    tokens = max(totals["response_tokens"], 1)
    return {"loss": totals["loss"], "token_entropy": totals["entropy_sum"] / tokens,
            "clip_fraction": totals["clipped_sum"] / tokens, "kl": totals["kl_sum"] / tokens,
            "response_tokens": totals["response_tokens"]}


# ---------------------------------------------------------------------------------------------
# Setup


@dataclasses.dataclass
class GRPOSession(PolicySession):
    """Every object the GRPO loop needs (``setup_grpo`` builds it): the policy session plus optimizer and reference."""

    optimizer: torch.optim.Optimizer | None = None
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    reference: Any = None  # frozen starting model for the KL penalty, or None
    start_step: int = 0


def setup_grpo(config: GRPOConfig) -> GRPOSession:
    """Returns the session of ``reasontune grpo``: run directory, policy (from the newest checkpoint on --resume), reference, data, optimizer, generator, logger."""
    config.validate()
    run_dir, device, checkpoint = start_run(config)
    model, tokenizer = load_policy(config, device, weights=checkpoint)
    reference = None
    if config.kl_coef > 0:  # the reference is the starting model, also after a resume
        reference = load_model(config.model, dtype=resolved_dtype(config.dtype, str(device)),
                               device=device).eval().requires_grad_(False)
    questions, validation, data_counts = load_questions(config, needed=config.rollout_batch_size // config.group_size)
    optimizer = make_optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)  # constant, kept for the trainer state
    session = GRPOSession(
        config=config, model=model, tokenizer=tokenizer, device=device,
        generator=make_generator(config, model, tokenizer, device), questions=questions, validation=validation,
        template=load_template(config.prompt_template), reward_fn=reward_fn_by_name(config.reward_name),
        rollouts=rollout_sampling(config, config.reward_name), run_dir=run_dir,
        logger=make_logger(run_dir, config, resume=checkpoint is not None),
        optimizer=optimizer, scheduler=scheduler, reference=reference)
    if checkpoint is not None:
        session.start_step = restore_training_state(checkpoint, optimizer, scheduler)["step"]
        session.logger.truncate_after(session.start_step)
        session.logger.log("event", session.start_step, message=f"resumed from {checkpoint.name}")
    else:
        session.logger.log("data", 0, **data_counts, loss_type=config.loss_type,
                           loss_aggregation=config.loss_aggregation, off_policy=config.off_policy)
    print(f"GRPO on {config.model}: {config.n_grpo_steps} steps of {config.rollout_batch_size // config.group_size} "
          f"questions x {config.group_size} responses, {config.optimizer_steps_per_rollout_batch} optimizer step(s) "
          f"each; loss {config.loss_type}, aggregation {config.loss_aggregation}"
          f"{', off-policy' if config.off_policy else ''}")
    return session


def rollout_batch(session: GRPOSession, step: int) -> Rollouts:
    """Returns step ``step``'s graded rollouts: its seeded questions, ``group_size`` responses each from the current policy."""
    config = session.config
    indices = question_batch(len(session.questions), config.rollout_batch_size // config.group_size, config.seed, step)
    batch = [session.questions[i] for i in indices]
    session.generator.sync_weights(session.model)
    rollouts = generate_rollouts(session.generator, [example_prompt(e, session.template) for e in batch],
                                 [e.ground_truth for e in batch],
                                 session.rollouts.replace(seed=config.seed * 1_000_003 + step),
                                 session.reward_fn, grading_workers=config.grading_workers, examples=batch)
    session.generator.sleep()
    return rollouts


def training_microbatches(session: GRPOSession, rollouts: Rollouts) -> tuple[list[dict], dict[str, float]]:
    """Returns (microbatches with advantages and any old/reference log-probs, reward statistics) of a rollout batch."""
    config = session.config
    completions = rollouts.flat_completions()
    graded = iter(rollouts.flat_rewards())
    responses = [c.text for c in completions]
    advantages, raw_rewards, reward_stats = compute_group_normalized_rewards(
        lambda response, truth: next(graded), responses,
        [truth for truth in rollouts.ground_truths for _ in range(config.group_size)], config.group_size,
        config.advantage_eps, config.use_std_normalization)
    prompt_ids = [ids for ids in session.tokenizer(rollouts.prompts, add_special_tokens=True)["input_ids"]
                  for _ in range(config.group_size)]
    microbatches = rollout_microbatches(prompt_ids, [c.token_ids for c in completions], advantages, raw_rewards,
                                        config.micro_train_batch_size, pad_token_id_of(session.tokenizer))
    if config.off_policy and config.loss_type == "grpo_clip":
        add_log_probs(session.model, microbatches, "old_log_probs", session.device)
    if session.reference is not None:
        add_log_probs(session.reference, microbatches, "ref_log_probs", session.device)
    return microbatches, reward_stats


def rollout_metrics(rollouts: Rollouts, reward_stats: dict[str, float]) -> dict[str, Any]:
    """Returns what a GRPO step logs of its rollouts: rewards, accuracy and response lengths (correct / incorrect / truncated)."""
    summary = rollouts.summary()
    return {"reward": reward_stats["reward_mean"], "reward_std": reward_stats["reward_std"],
            "format_reward": reward_stats.get("format_reward_mean"), "answer_reward": reward_stats.get("answer_reward_mean"),
            **{key: summary[key] for key in ("accuracy", "pass_at_n", "mean_response_tokens",
                                             "mean_response_tokens_correct", "mean_response_tokens_incorrect",
                                             "mean_response_tokens_truncated", "truncated_fraction")}}


# ---------------------------------------------------------------------------------------------
# The loop


def train_grpo(session: GRPOSession) -> Path:
    """Returns the run directory after GRPO steps ``start_step + 1 … n_grpo_steps``.

    The loop: rollouts (sample questions → group-size responses each → grade) → group-normalised
    advantages → microbatches (old / reference log-probs) → epochs × optimizer steps of
    grpo_microbatch_train_step → clip → AdamW → metrics → periodic evaluation → checkpoint.
    Writes metrics.jsonl, checkpoint-N/, final/, eval/ and report/.
    """
    config, model, logger, run_dir = session.config, session.model, session.logger, session.run_dir
    eval_sampling = evaluation_sampling(config, config.backend)

    def save(step: int, name: str) -> Path:
        state = trainer_state(step, session.optimizer, session.scheduler, plan_fingerprint=f"grpo-seed-{config.seed}")
        return save_training_checkpoint(run_dir, name, model, session.tokenizer, state, keep=config.save_total_limit)

    def evaluate_and_log(step: int) -> None:
        summary = evaluate_policy(step, model, session.generator, session.validation, session.template, run_dir,
                                  reward_fn=session.reward_fn, sampling=eval_sampling,
                                  grading_workers=config.grading_workers)
        logger.log("eval", step, **eval_metrics(summary, step))
        progress.write(f"step {step}: accuracy {summary['accuracy']:.3f}, format rate {summary['format_rate']:.3f}")

    progress = Progress(config.n_grpo_steps, initial_step=session.start_step, enabled=config.progress,
                        description="grpo")
    if session.validation and config.eval_before_training and session.start_step == 0:
        evaluate_and_log(0)
    started = time.perf_counter()
    for step in range(session.start_step + 1, config.n_grpo_steps + 1):
        tick = time.perf_counter()
        # --- rollouts: seeded questions, group-size graded responses each from the current policy
        rollouts = rollout_batch(session, step)
        rollout_seconds = time.perf_counter() - tick
        # --- group-normalised advantages → microbatches (old log-probs once when off-policy; reference log-probs)
        microbatches, reward_stats = training_microbatches(session, rollouts)
        # --- policy-gradient steps: epochs × train batches, each accumulated over its microbatches
        model.train()
        step_metrics = []
        for _ in range(config.epochs_per_rollout_batch):
            for k in range(config.optimizer_steps_per_rollout_batch):
                accumulation = config.gradient_accumulation_steps
                metrics = train_step(model, microbatches[k * accumulation:(k + 1) * accumulation], config, session.device)
                try:
                    grad_norm = clip_and_step(model, session.optimizer, session.scheduler, config.max_grad_norm,
                                              metrics["loss"])
                except NonFiniteStep as problem:
                    path = save(step - 1, f"checkpoint-{step - 1}")
                    stop_diverged(f"{problem} at GRPO step {step}; stopped. The weights after step {step - 1} are in "
                                  f"{path}; lower --learning-rate", step, logger, progress)
                step_metrics.append({**metrics, "grad_norm": grad_norm})
        # --- log (means over the step's optimizer steps; rewards and lengths of the rollouts)
        mean = {key: sum(m[key] for m in step_metrics) / len(step_metrics)
                for key in ("loss", "grad_norm", "token_entropy", "clip_fraction", "kl")}
        if step % config.log_every == 0 or step == config.n_grpo_steps:
            logger.log("train", step, lr=session.scheduler.get_last_lr()[0], **mean, optimizer_steps=len(step_metrics),
                       **rollout_metrics(rollouts, reward_stats), rollout_s=rollout_seconds,
                       step_s=time.perf_counter() - tick, elapsed_s=time.perf_counter() - started)
        progress.update(step, loss=mean["loss"])
        # --- evaluate
        if session.validation and config.eval_every and step % config.eval_every == 0 and step != config.n_grpo_steps:
            evaluate_and_log(step)
        # --- checkpoint
        if config.save_every and step % config.save_every == 0 and step != config.n_grpo_steps:
            save(step, f"checkpoint-{step}")
    progress.close()

    # --- final weights, final evaluation, report
    save(config.n_grpo_steps, "final")
    if session.validation:
        evaluate_and_log(config.n_grpo_steps)
    session.generator.close()
    return finish_run(run_dir, logger, config.write_report)


def run_grpo(config: GRPOConfig) -> Path:
    """Returns the run directory after ``config.n_grpo_steps`` GRPO steps on ``config.train_data`` (``setup_grpo`` then ``train_grpo``)."""
    return train_grpo(setup_grpo(config))
