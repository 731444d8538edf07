"""GRPO with verified rewards: rollouts, group-normalised advantages, policy-gradient steps.

Each GRPO step samples ``rollout_batch_size / group_size`` questions, generates ``group_size``
responses to each with the current policy, grades them, normalises the rewards within each
group into advantages and takes ``epochs_per_rollout_batch`` passes of policy-gradient steps
over the rollouts (one optimizer step per ``train_batch_size`` rollouts). Loss aggregation and
gradient-accumulation scaling live in ``reasontune.losses.policy_microbatch_train_step``.
``setup_grpo(config)`` returns the objects; ``train_grpo(session)`` is the loop.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch

from reasontune import distributed, launch
from reasontune.checkpoint import CheckpointError, restore_training_state, save_run_checkpoint
from reasontune.config import check_config, resume_command
from reasontune.data import load_template
from reasontune.logprobs import get_response_log_probs
from reasontune.losses import (PolicyLossSettings, masked_mean, policy_microbatch_train_step, rollout_correction_weights,
                               rollout_mismatch_metrics, sequences_with_loss_tokens)
from reasontune.modeling import load_model
from reasontune.options import resolved_dtype
from reasontune.rollouts import reward_fn_by_name
from reasontune.run_layout import FINAL_DIR, TRAINER_STATE, checkpoint_name
from reasontune.tracking import Progress
from reasontune.training.data_parallel import (SINGLE_PROCESS, refuse_what_torchrun_cannot_run, shard_policy,
                                               unsharded_replica)
from reasontune.training.grpo_config import GRPOConfig
from reasontune.training.grpo_rollouts import GRPOSession, RolloutBatch, RolloutPipeline
from reasontune.training.in_loop_eval import evaluation_sampling, evaluation_sets, log_evaluation
from reasontune.training.optimizer_step import NonFiniteStep, clip_and_step, make_optimizer, stop_diverged
from reasontune.training.policy_sampling import load_questions, rollout_environment, rollout_sampling
from reasontune.training.run_setup import (finish_run, load_policy, log_resumed, make_generator, make_logger,
                                           start_run)
from reasontune.training.stop_signals import stop_for_signal

# After this many such steps in a row the run says so (once per streak): the run trains on nothing.
DEGENERATE_REWARD_STEPS = 3


# ---------------------------------------------------------------------------------------------
# One optimizer step


def loss_settings(config: GRPOConfig) -> PolicyLossSettings:
    """Returns the loss settings of ``config``: what ``policy_microbatch_train_step`` needs besides the microbatch."""
    # Dr. GRPO's constant is the generation budget: every response divided by the same length.
    return PolicyLossSettings(
        loss_type=config.loss_type, gradient_accumulation_steps=config.gradient_accumulation_steps,
        cliprange=config.cliprange, cliprange_high=config.cliprange_high, dual_clip_c=config.dual_clip_c,
        aggregation=config.loss_aggregation, normalize_constant=float(config.sampling_max_tokens),
        kl_coef=config.kl_coef,
    )


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
    settings = loss_settings(config)
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
        loss, metadata = policy_microbatch_train_step(
            outputs["log_probs"], response_mask, settings, raw_rewards=mb["raw_rewards"].to(device),
            advantages=mb["advantages"].to(device), old_log_probs=old_log_probs, ref_log_probs=mb.get("ref_log_probs"),
            rollout_weights=weights, tokens_in_step=tokens_in_step, examples_in_step=examples_in_step,
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


def setup_grpo(config: GRPOConfig, ctx: distributed.DistributedContext | None = None) -> GRPOSession:
    """Returns the session of ``reasontune grpo``: run directory, policy (from the newest checkpoint on --resume), reference, data, optimizer, generator, logger.

    Under torchrun (``ctx`` of world size > 1) the policy is sharded with FSDP2 before the
    optimizer is built over its shards; the HF generator samples from an unsharded replica and
    each rank keeps its own unsharded reference (forward only); rank 0 alone writes and logs.
    """
    check_config(config, environment=False)
    ctx = ctx or SINGLE_PROCESS
    refuse_what_torchrun_cannot_run(config, ctx)
    if config.world_problems(ctx.world_size):
        raise SystemExit("error: " + "; ".join(config.world_problems(ctx.world_size)))
    environment = rollout_environment(config)
    run_dir, device, checkpoint, stop = start_run(config, ctx)
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
        rollouts=rollout_sampling(config, config.reward_name, load_template(config.prompt_template)).replace(return_logprobs=True), run_dir=run_dir,
        logger=make_logger(run_dir, config, resume=checkpoint is not None) if ctx.is_main else None, stop=stop,
        ctx=ctx, replica=replica, optimizer=optimizer, scheduler=scheduler, reference=reference,
        environment=environment)
    if checkpoint is not None:
        state = restore_training_state(checkpoint, optimizer, scheduler, model=model, ctx=ctx)
        session.start_step = state["step"]
        pending = state.get("pending_rollouts") or {}
        where = str(checkpoint / TRAINER_STATE)
        if not isinstance(pending, dict) or not isinstance(pending.get("batches", []), list):
            raise CheckpointError(f"{where}: field 'pending_rollouts' must be an object with a list of batches")
        if pending.get("async_steps") == config.async_steps:
            session.restored_batches = [RolloutBatch.from_state(batch, where) for batch in pending["batches"]]
        resampled = [step for step in range(session.start_step + 1, session.start_step + config.async_steps + 1)
                     if step <= config.n_grpo_steps and step not in {b.step for b in session.restored_batches}]
        log_resumed(session.logger, checkpoint, session.start_step, note=(
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
          f"{', off-policy' if config.off_policy else ''}"
          f"{f'; env python (up to {config.max_tool_calls} tool calls a response)' if config.env == 'python' else ''}")
    return session


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
                path = save(step - 1, checkpoint_name(step - 1))
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
                save(step, checkpoint_name(step))
            if session.stop.requested(ctx) and step < config.n_grpo_steps:  # SIGINT/SIGTERM: saved, exit 130
                stop_for_signal(session.stop, resume_command(config.command, config), step, save, logger, progress)
    finally:
        pipeline.close()
    progress.close()

    # --- final weights, final evaluation, report
    save(config.n_grpo_steps, FINAL_DIR)
    if session.validation:
        evaluate_and_log(config.n_grpo_steps)
    session.generator.close()
    return finish_run(run_dir, logger, session.stop, config.write_report)


def run_grpo(config: GRPOConfig) -> Path:
    """Returns the run directory after ``config.n_grpo_steps`` GRPO steps on ``config.train_data`` (``setup_grpo`` then ``train_grpo``).

    Under ``torchrun --nproc_per_node N -m reasontune grpo …``: each rank samples its slice of
    every step's questions (whole groups), the rollouts are gathered on every rank, and each
    optimizer step's train batch is split over the ranks (FSDP2, counts summed over ranks).
    """
    return launch.run_on_every_rank(config, lambda ctx: train_grpo(setup_grpo(config, ctx)))
