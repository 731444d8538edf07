"""Supervised fine-tuning on prompt/response traces with the loss on response tokens only.

``setup_sft(config)`` returns every object the loop needs (model, tokenizer, optimizer,
schedule, planned steps, generator, validation data, logger); ``train_sft(session)`` is the
loop, top to bottom: microbatches → log-probs → ``sft_microbatch_train_step`` → accumulation →
clip and step → log → evaluate → checkpoint. The loop also runs in memory on a live model and
in-memory examples (``prepare_session``), as expert iteration's SFT phase does.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal, Sequence

import torch

from reasontune import distributed, launch
from reasontune.batching import flatten_packed, pack_examples, packed_forward_kwargs, token_budget_batches
from reasontune.checkpoint import restore_training_state, save_run_checkpoint
from reasontune.config import check_config, help_field, resume_command, same_field
from reasontune.data import (Example, example_prompt, load_examples, load_template, train_validation_split,
                             with_chat_template, with_r1_zero_targets)
from reasontune.evaluation import EvalSet
from reasontune.generation import Generator
from reasontune.logprobs import get_response_log_probs
from reasontune.losses import LossAggregation, sft_microbatch_train_step
from reasontune.packed_attention import packed_attention, packed_kernel
from reasontune.options import (CheckpointOptions, EvaluationOptions, GenerationOptions, InLoopEvaluationOptions,
                                OptimizerOptions, TrainerOptions)
from reasontune.rollouts import RewardFn, reward_fn_by_name
from reasontune.tokenization import pad_and_shift, pad_token_id_of
from reasontune.tracking import MetricsLogger, Progress
from reasontune.run_layout import FINAL_DIR, checkpoint_name
from reasontune.training.data_parallel import (SINGLE_PROCESS, UnshardedReplica, rank_microbatches,
                                               refuse_what_torchrun_cannot_run, shard_policy, unsharded_replica)
from reasontune.training.in_loop_eval import evaluation_sampling, evaluation_sets, log_evaluation
from reasontune.training.optimizer_step import NonFiniteStep, clip_and_step, make_optimizer, stop_diverged
from reasontune.training.run_setup import (finish_run, load_policy, log_resumed, make_generator, make_logger,
                                           start_run)
from reasontune.training.stop_signals import StopSignals, stop_for_signal


@dataclasses.dataclass
class SFTConfig(TrainerOptions):
    """Options of ``reasontune sft`` (the seeds' flags, plus what a real run needs)."""

    command: ClassVar[str] = "sft"

    output_dir: str = same_field(CheckpointOptions, "output_dir", "runs/sft")
    learning_rate: float = same_field(OptimizerOptions, "learning_rate", 2e-5)
    eval_examples: int = same_field(InLoopEvaluationOptions, "eval_examples", 64)
    eval_max_new_tokens: int = same_field(EvaluationOptions, "eval_max_new_tokens", 512)
    generation_batch_size: int = same_field(GenerationOptions, "generation_batch_size", 32)
    # data
    max_train_examples: int | None = help_field(None, "use a seeded random subset of this many training examples (dataset-size sweeps)", group="data", aliases=("max-examples",))
    val_fraction: float = help_field(0.0, "hold out this fraction of the training data as validation when --val-data is not given", group="data")
    # optimisation
    num_epochs: int = help_field(1, "passes over the training data", group="optimisation")
    max_steps: int | None = help_field(None, "stop after this many optimizer steps (overrides --num-epochs when smaller)", group="optimisation")
    batch_size: int = help_field(4, "examples per microbatch (the per-forward batch)", group="optimisation")
    gradient_accumulation_steps: int = help_field(8, "microbatches per optimizer step; effective batch = batch-size x this", group="optimisation")
    lr_scheduler: Literal["cosine", "linear", "constant"] = help_field("cosine", "decay after warmup", group="optimisation")
    warmup_ratio: float = help_field(0.03, "fraction of optimizer steps spent warming up linearly from 0", group="optimisation")
    min_lr_ratio: float = help_field(0.0, "the schedule decays to learning-rate x this", group="optimisation")
    max_length: int | None = help_field(1024, "truncate prompt+response to this many tokens (counts logged); none keeps all", group="optimisation")
    loss_aggregation: LossAggregation = help_field("sequence_sum", "sequence_sum: each sequence's summed NLL / normalize-constant, mean over the step's sequences (the design's sft_microbatch_train_step); token_mean: mean NLL over the step's response tokens; sequence_mean: mean of each sequence's mean NLL", group="optimisation")
    normalize_constant: float = help_field(1.0, "divisor of each sequence's summed NLL under sequence_sum", group="optimisation")
    packing: bool = help_field(False, "pack several examples into rows of --tokens-per-batch tokens, without attention across examples", group="optimisation")
    packing_layout: Literal["rows", "flat"] = help_field("rows", "with --packing: rows (--batch-size rows of --max-length tokens, padded to the fullest) or flat (those rows' tokens in one row without padding, as TRL's padding-free: no compute on padding; sdpa and flash attention still score each example alone, eager attention spans the whole microbatch)", group="optimisation")
    tokens_per_batch: int | None = help_field(None, "with --packing (or dynamic batching): token budget of a microbatch instead of --batch-size examples", group="optimisation")

    @property
    def planned_steps(self) -> int | None:
        """Returns ``--max-steps``: the optimizer steps of the run when given (else known only once the data is planned)."""
        return self.max_steps

    def launch_sizes(self, world_size: int) -> dict[str, int]:
        """Returns the batch sizes config.json records of a launch on ``world_size`` ranks."""
        return {"global_batch": world_size * self.batch_size * self.gradient_accumulation_steps,
                "per_rank_batch": self.batch_size, "gradient_accumulation_steps": self.gradient_accumulation_steps}

    def problems(self) -> list[str]:
        """Returns what is wrong with the SFT options themselves (the shared groups check theirs: ``config.value_problems``)."""
        problems = []
        for flag, value in (("--batch-size", self.batch_size), ("--gradient-accumulation-steps", self.gradient_accumulation_steps),
                            ("--num-epochs", self.num_epochs), ("--max-steps", self.max_steps),
                            ("--max-train-examples", self.max_train_examples), ("--tokens-per-batch", self.tokens_per_batch)):
            if value is not None and value < 1:
                problems.append(f"{flag}: must be >= 1, got {value}" + ("; to train nothing, do not run sft"
                                                                        if flag == "--max-steps" else ""))
        if self.max_length is not None and self.max_length < 2:
            problems.append(f"--max-length: must be at least 2 (a prompt and a response token), got {self.max_length}")
        if self.packing and self.max_length is None and self.tokens_per_batch is None:
            problems.append("--packing: needs --max-length (the row width) or --tokens-per-batch")
        if self.tokens_per_batch is not None and self.batch_size != SFTConfig.batch_size:
            problems.append(f"--batch-size {self.batch_size}: has no effect with --tokens-per-batch (a microbatch is a "
                            "token budget then); drop one of them")
        if not 0.0 <= self.warmup_ratio < 1.0:
            problems.append(f"--warmup-ratio: must be in [0, 1), got {self.warmup_ratio:g}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            problems.append(f"--min-lr-ratio: must be in [0, 1], got {self.min_lr_ratio:g}")
        if not 0.0 <= self.val_fraction < 1.0:
            problems.append(f"--val-fraction: must be in [0, 1), got {self.val_fraction:g}")
        if self.normalize_constant <= 0:
            problems.append(f"--normalize-constant: must be > 0, got {self.normalize_constant:g}")
        if self.eval_every and not (self.val_data or self.val_fraction > 0 or self.eval_benchmarks):
            problems.append(f"--eval-every {self.eval_every}: nothing to evaluate; give --val-data FILE, "
                            "--val-fraction 0.05 (a split of the training data) or --eval-benchmarks")
        return problems


# ---------------------------------------------------------------------------------------------
# Data: examples → token ids → a deterministic plan of optimizer steps


@dataclasses.dataclass
class TokenizedData:
    """Token ids of the training examples that keep at least one response token after truncation."""

    prompt_ids: list[list[int]]
    output_ids: list[list[int]]
    counts: dict[str, int]


def load_sft_examples(config: SFTConfig):
    """Returns (train examples with responses, validation examples, data counts) for ``config``."""
    train_set = load_examples(config.train_data, split=config.split, hub_config=config.data_config,
                              max_examples=config.max_train_examples, seed=config.seed, skip_bad=config.skip_bad)
    train = with_r1_zero_targets(train_set.examples)
    counts = {"train_records": train_set.total_records, "train_skipped_bad": train_set.n_skipped}
    if config.val_data:
        validation = load_examples(config.val_data, seed=config.seed, skip_bad=config.skip_bad).examples
    elif config.val_fraction > 0:
        train, validation = train_validation_split(train, config.val_fraction, seed=config.seed)
    else:
        validation = []
    validation = [e for e in validation if e.ground_truth is not None]
    if config.eval_examples and len(validation) > config.eval_examples:
        validation = validation[: config.eval_examples]
    counts.update(train_examples=len(train), validation_examples=len(validation))
    return train, validation, counts


def tokenize_examples(examples, tokenizer, template: str, max_length: int | None) -> TokenizedData:
    """Returns the examples' prompt/response ids, cut to ``max_length``; those left without a response token are dropped and counted."""
    prompts = [example_prompt(e, template) for e in examples]
    prompt_ids = tokenizer(prompts, add_special_tokens=True)["input_ids"]
    output_ids = tokenizer([e.response for e in examples], add_special_tokens=False)["input_ids"]
    kept_prompts, kept_outputs = [], []
    counts = {"truncated": 0, "dropped_empty_response": 0, "dropped_response_truncated_away": 0}
    for p, o in zip(prompt_ids, output_ids):
        if not o:
            counts["dropped_empty_response"] += 1
            continue
        if max_length is not None and len(p) + len(o) > max_length:
            counts["truncated"] += 1
            if len(p) >= max_length:
                counts["dropped_response_truncated_away"] += 1
                continue
            o = o[: max_length - len(p)]
        kept_prompts.append(list(p))
        kept_outputs.append(list(o))
    if not kept_prompts:
        raise SystemExit(f"error: no training example keeps a response token (counts: {counts}); raise --max-length")
    counts["trained_examples"] = len(kept_prompts)
    return TokenizedData(kept_prompts, kept_outputs, counts)


def plan_microbatches(data: TokenizedData, config: SFTConfig, epoch: int, pad_token_id: int) -> list[dict]:
    """Returns one epoch's microbatches (dicts of tensors), a pure function of the data, config and epoch."""
    seed = config.seed * 100_003 + epoch
    if config.packing:
        row_width = (config.max_length or config.tokens_per_batch) - 1
        rows = max(1, (config.tokens_per_batch or config.batch_size * row_width) // row_width)
        packed = pack_examples(data.prompt_ids, data.output_ids, pad_token_id, tokens_per_row=row_width,
                               rows_per_batch=rows, max_length=config.max_length, shuffle_seed=seed)
        return [flatten_packed(batch) for batch in packed] if config.packing_layout == "flat" else packed
    lengths = [len(p) + len(o) for p, o in zip(data.prompt_ids, data.output_ids)]
    if config.tokens_per_batch:
        groups = token_budget_batches(lengths, config.tokens_per_batch, shuffle_seed=seed)
    else:
        order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed)).tolist()
        groups = [order[i:i + config.batch_size] for i in range(0, len(order), config.batch_size)]
    microbatches = []
    for group in groups:
        batch = pad_and_shift([data.prompt_ids[i] for i in group], [data.output_ids[i] for i in group], pad_token_id)
        batch["num_examples"] = len(group)
        microbatches.append(batch)
    return microbatches


def plan_steps(data: TokenizedData, config: SFTConfig, pad_token_id: int, world_size: int = 1
               ) -> list[tuple[float, list[dict]]]:
    """Returns every optimizer step of the run as (epoch progress, microbatches); steps never span epochs.

    A step holds ``world_size × gradient_accumulation_steps`` microbatches of the one global
    plan (each rank then takes its ``rank_microbatches``), so the plan, and with it the run,
    depends on the product only: world size 2 × accumulation 1 trains on the steps of world
    size 1 × accumulation 2.
    """
    steps = []
    for epoch in range(config.num_epochs):
        microbatches = plan_microbatches(data, config, epoch, pad_token_id)
        accumulation = config.gradient_accumulation_steps * world_size
        per_epoch = math.ceil(len(microbatches) / accumulation)
        for k in range(per_epoch):
            steps.append((epoch + (k + 1) / per_epoch, microbatches[k * accumulation:(k + 1) * accumulation]))
    if config.max_steps is not None:
        steps = steps[: config.max_steps]
    return steps


def learning_rate_lambda(config: SFTConfig, total_steps: int):
    """Returns the multiplier of the peak learning rate at each step: linear warmup, then cosine/linear/constant."""
    warmup = int(round(config.warmup_ratio * total_steps))

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if config.lr_scheduler == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        decay = 0.5 * (1.0 + math.cos(math.pi * progress)) if config.lr_scheduler == "cosine" else 1.0 - progress
        return config.min_lr_ratio + (1.0 - config.min_lr_ratio) * decay

    return multiplier


# ---------------------------------------------------------------------------------------------
# One optimizer step


def train_step(model, microbatches: list[dict], config: SFTConfig, device: torch.device) -> dict[str, float]:
    """Returns the step's metrics after forward and backward of every microbatch (gradients accumulated, no optimizer step).

    Under torchrun ``microbatches`` are this rank's (``rank_microbatches``): the example and
    token counts that normalise the loss, and every metric, are summed over all ranks, so the
    gradients summed by FSDP2 are those of the whole step. A ``filler`` microbatch (a rank
    with fewer microbatches in a short last step) runs forward and backward with loss 0.
    """
    examples_in_step = distributed.global_sum(sum(mb["num_examples"] for mb in microbatches))
    tokens_in_step = distributed.global_sum(int(sum(int(mb["response_mask"].sum()) for mb in microbatches)))
    totals = {"loss": 0.0, "nll_sum": 0.0, "response_tokens": 0, "tokens": 0, "entropy_sum": 0.0}
    for mb in microbatches:
        input_ids, labels = mb["input_ids"].to(device), mb["labels"].to(device)
        response_mask = mb["response_mask"].to(device)
        kernel = model.config._attn_implementation
        if "position_ids" in mb:
            # sdpa runs each packed example through its own causal call (no block mask to score).
            kernel = packed_kernel(kernel)
            forward = packed_forward_kwargs(mb, kernel, dtype=model.dtype)
            forward = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in forward.items()}
            tokens = int((mb["sequence_ids"] >= 0).sum())
        else:
            # Right padding under a causal mask: real tokens never attend to the padding after
            # them, so no attention mask is needed (and sdpa keeps its fast causal kernel).
            forward = {}
            tokens = int((mb["prompt_lengths"] + mb["response_lengths"] - 1).sum())
        with packed_attention(model, kernel):
            outputs = get_response_log_probs(model, input_ids, labels, return_token_entropy=True,
                                             response_mask=response_mask, **forward)
        if mb.get("filler"):
            (outputs["log_probs"].sum() * 0.0).backward()  # joins the gradient reduce-scatters, adds nothing
            continue
        totals["tokens"] += tokens
        loss, metadata = sft_microbatch_train_step(
            outputs["log_probs"], response_mask, config.gradient_accumulation_steps,
            normalize_constant=config.normalize_constant, aggregation=config.loss_aggregation,
            tokens_in_step=tokens_in_step, examples_in_step=examples_in_step,
        )
        totals["loss"] += float(loss)
        totals["nll_sum"] += float(metadata["masked_nll_sum"])
        totals["response_tokens"] += int(metadata["num_response_tokens"])
        totals["entropy_sum"] += float(outputs["token_entropy"].detach()[response_mask].float().sum())
    summed = distributed.global_sum(torch.tensor(list(totals.values()), dtype=torch.float64)).tolist()
    totals = {key: int(value) if key in ("response_tokens", "tokens") else value for key, value in zip(totals, summed)}
    tokens = max(totals["response_tokens"], 1)
    return {"loss": totals["loss"], "mean_token_nll": totals["nll_sum"] / tokens,
            "token_entropy": totals["entropy_sum"] / tokens, "response_tokens": totals["response_tokens"],
            "tokens": totals["tokens"], "examples": examples_in_step}


# ---------------------------------------------------------------------------------------------
# Setup


def fingerprint(steps) -> str:
    """Returns a short hash of the planned steps' tokens, so a resume whose finished steps would differ is refused."""
    digest = hashlib.sha256()
    for _, microbatches in steps:
        for mb in microbatches:
            digest.update(mb["input_ids"].numpy().tobytes())
    return digest.hexdigest()[:16]


@dataclasses.dataclass
class SFTSession:
    """Every object the SFT loop needs; ``setup_sft`` builds it from a config, ``prepare_session`` from a live model.

    ``run_dir``/``logger``/``generator`` are None for an in-memory run (expert iteration's
    SFT phase): nothing is written, logged or evaluated then.
    """

    config: SFTConfig
    model: Any
    tokenizer: Any
    device: torch.device
    data: TokenizedData
    steps: list[tuple[float, list[dict]]]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    template: str
    reward_fn: RewardFn
    generator: Generator | None = None
    validation: list[EvalSet] = dataclasses.field(default_factory=list)
    run_dir: Path | None = None
    logger: MetricsLogger | None = None
    start_step: int = 0
    stop: StopSignals | None = None  # with a run directory: SIGINT/SIGTERM save and stop after a step
    ctx: distributed.DistributedContext = SINGLE_PROCESS
    replica: UnshardedReplica | None = None  # world size > 1 with evaluation: what the HF generator samples from
    after_step: Callable[[SFTSession, int], None] | None = None  # called after each optimizer step with its number (the tool demo's start picker)


def prepare_session(config: SFTConfig, model, tokenizer, examples: Sequence[Example], device: torch.device,
                    template: str, world_size: int = 1) -> SFTSession:
    """Returns an in-memory session: ``examples`` tokenised and planned into steps, a fresh optimizer and schedule over ``model``.

    ``world_size`` > 1: ``model`` is already sharded, and the steps are global (see ``plan_steps``).
    """
    data = tokenize_examples(examples, tokenizer, template, config.max_length)
    steps = plan_steps(data, config, pad_token_id_of(tokenizer), world_size)
    optimizer = make_optimizer(model, config, fused=world_size == 1)  # sharded parameters take the default loop
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, learning_rate_lambda(config, len(steps)))
    return SFTSession(config=config, model=model, tokenizer=tokenizer, device=device, data=data, steps=steps,
                      optimizer=optimizer, scheduler=scheduler, template=template,
                      reward_fn=reward_fn_by_name(config.reward_name))


def setup_sft(config: SFTConfig, ctx: distributed.DistributedContext | None = None) -> SFTSession:
    """Returns the session of ``reasontune sft``: run directory, model (from the newest checkpoint on --resume), data, plan, optimizer, generator, logger.

    Under torchrun (``ctx`` of world size > 1) the model is sharded with FSDP2 before the
    optimizer is built over its shards; rank 0 alone writes the run directory and logs.
    """
    check_config(config, environment=False)
    ctx = ctx or SINGLE_PROCESS
    refuse_what_torchrun_cannot_run(config, ctx)
    run_dir, device, checkpoint, stop = start_run(config, ctx)
    model, tokenizer = load_policy(config, device, weights=checkpoint)
    template = load_template(config.prompt_template)
    train_examples, validation, data_counts = load_sft_examples(config)
    train_examples = with_chat_template(train_examples, tokenizer, config.chat_template)
    validation = with_chat_template(validation, tokenizer, config.chat_template)
    validation_sets = evaluation_sets(config, validation, template)
    replica = unsharded_replica(model, config, ctx, needed=bool(validation_sets))
    model = shard_policy(model, config, ctx)
    session = prepare_session(config, model, tokenizer, train_examples, device, template, ctx.world_size)
    session.run_dir, session.validation, session.ctx, session.replica = run_dir, validation_sets, ctx, replica
    session.stop = stop
    if session.validation:
        session.generator = make_generator(config, replica.model if replica else model, tokenizer, device)
    global_batch = config.launch_sizes(ctx.world_size)["global_batch"]
    session.logger = make_logger(run_dir, config, resume=checkpoint is not None) if ctx.is_main else None
    if checkpoint is not None:
        state = restore_training_state(checkpoint, session.optimizer, session.scheduler,
                                       lambda step: fingerprint(session.steps[:step]), model=model, ctx=ctx)
        session.start_step = state["step"]
        log_resumed(session.logger, checkpoint, session.start_step)
    elif session.logger is not None:
        session.logger.log("data", 0, **data_counts, **session.data.counts, loss_aggregation=config.loss_aggregation)
    counts = session.data.counts
    if ctx.is_main:
        microbatch = (f"--tokens-per-batch {config.tokens_per_batch} tokens" if config.tokens_per_batch
                      else f"--batch-size {config.batch_size}")
        print(f"training {config.model} on {counts['trained_examples']} examples: {len(session.steps)} optimizer steps "
              f"({counts['truncated']} truncated, {counts['dropped_response_truncated_away']} dropped: "
              f"response cut away by --max-length); loss aggregation: {config.loss_aggregation}; global batch "
              f"{global_batch} = {ctx.world_size} ranks x {microbatch} x {config.gradient_accumulation_steps} "
              "accumulation")
    return session


# ---------------------------------------------------------------------------------------------
# The loop


def train_sft(session: SFTSession) -> list[dict[str, float]]:
    """Returns the metrics of every optimizer step run, after training ``session.model`` through ``session.steps``.

    With a run directory it also evaluates (before, every --eval-every steps, at the end),
    saves checkpoints and ``final/``, and writes the report.
    """
    config, model, steps, run_dir, logger = session.config, session.model, session.steps, session.run_dir, session.logger
    ctx = session.ctx
    sampling = evaluation_sampling(config, config.backend)

    def save(step: int, name: str) -> Path:
        return save_run_checkpoint(run_dir, name, model, session.tokenizer, step, session.optimizer, session.scheduler,
                                   fingerprint(steps[:step]), keep=config.save_total_limit, ctx=ctx)

    def evaluate_and_log(step: int) -> None:
        log_evaluation(session, step, sampling, progress)

    evaluating = session.generator is not None and run_dir is not None
    progress = Progress(len(steps), initial_step=session.start_step, enabled=config.progress and ctx.is_main)
    if evaluating and config.eval_before_training and session.start_step == 0:
        evaluate_and_log(0)
    model.train()
    history: list[dict[str, float]] = []
    started = time.perf_counter()
    for step in range(session.start_step + 1, len(steps) + 1):
        epoch, microbatches = steps[step - 1]
        # --- forward and backward of every microbatch (accumulating gradients)
        tick = time.perf_counter()
        metrics = train_step(model, rank_microbatches(microbatches, ctx), config, session.device)
        # --- clip, check, step
        learning_rate = session.scheduler.get_last_lr()[0]
        try:
            grad_norm = clip_and_step(model, session.optimizer, session.scheduler, config.max_grad_norm, metrics["loss"])
        except NonFiniteStep as problem:
            where = f"in {save(step - 1, checkpoint_name(step - 1))}" if run_dir is not None else "in memory"
            stop_diverged(f"{problem} at step {step}; stopped. The last good weights (after step {step - 1}) are "
                          f"{where}; lower --learning-rate or check the data, then --resume", step, logger, progress)
        # --- log
        seconds = time.perf_counter() - tick
        metrics.update(epoch=round(epoch, 4), lr=learning_rate, grad_norm=grad_norm,
                       tokens_per_s=metrics["tokens"] / seconds, response_tokens_per_s=metrics["response_tokens"] / seconds,
                       elapsed_s=time.perf_counter() - started)
        history.append(metrics)
        if logger is not None and (step % config.log_every == 0 or step == len(steps)):
            logger.log("train", step, **metrics)
        progress.update(step, loss=metrics["loss"], tokens_per_s=metrics["tokens_per_s"], token_loss=metrics["mean_token_nll"])
        if session.after_step is not None:
            session.after_step(session, step)
        # --- evaluate
        if evaluating and config.eval_every and step % config.eval_every == 0 and step != len(steps):
            evaluate_and_log(step)
        # --- checkpoint
        if run_dir is not None and config.save_every and step % config.save_every == 0 and step != len(steps):
            save(step, checkpoint_name(step))
        if session.stop is not None and session.stop.requested(ctx) and step < len(steps):  # SIGINT/SIGTERM: saved, exit 130
            stop_for_signal(session.stop, resume_command(config.command, config), step, save, logger, progress)
    progress.close()

    # --- final weights, final evaluation, report
    if run_dir is not None:
        save(len(steps), FINAL_DIR)
        if evaluating:
            evaluate_and_log(len(steps))
        finish_run(run_dir, logger, session.stop, config.write_report)
    return history


def run_sft(config: SFTConfig, after_step: Callable[[SFTSession, int], None] | None = None) -> Path:
    """Returns the run directory after SFT of ``config.model`` on ``config.train_data`` (``setup_sft`` then ``train_sft``).

    ``after_step(session, step)``, if given, runs after each optimizer step on every rank. Under ``torchrun --nproc_per_node N -m reasontune sft …`` it trains data-parallel with
    FSDP2: the flags are checked before any process group starts, and an error on one rank
    stops every rank with one message.
    """
    def setup_and_train(ctx: distributed.DistributedContext) -> Path:
        session = setup_sft(config, ctx)
        session.after_step = after_step
        train_sft(session)
        return session.run_dir

    return launch.run_on_every_rank(config, setup_and_train)
