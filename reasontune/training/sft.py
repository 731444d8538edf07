"""Supervised fine-tuning on prompt/response traces with the loss on response tokens only."""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Literal

import torch

from reasontune.config import help_field
from reasontune.training.common import TrainingDiverged  # noqa: F401  (raised by run_sft; importable from here)


@dataclasses.dataclass
class SFTConfig:
    """Options of ``reasontune sft`` (the seeds' flags, plus what a real run needs)."""

    # data
    train_data: str = help_field("", "training data: JSONL of {prompt, response}, chat messages, GSM8K/MATH, JSON/Parquet or a hub name")
    val_data: str | None = help_field(None, "validation data with references for periodic evaluation (default: a split of the training data)")
    reward: Literal["r1_zero", "question_only"] = help_field("r1_zero", "reward function of evaluation: r1_zero (<think>…</think> <answer>…</answer>) or question_only (last \\boxed{})")
    prompt_template: str = help_field("r1_zero", "template turning a question into a prompt for data without a prompt field, and for evaluation: r1_zero, question_only or a file with {question}")
    max_train_examples: int | None = help_field(None, "use a seeded random subset of this many training examples (dataset-size sweeps)")
    val_fraction: float = help_field(0.0, "hold out this fraction of the training data as validation when --val-data is not given")
    skip_bad: bool = help_field(False, "skip malformed data lines (counted and reported) instead of stopping at the first")
    # model
    model: str = help_field("Qwen/Qwen2.5-Math-1.5B", "hub name or local directory of the causal LM to fine-tune")
    output_dir: str = help_field("runs/sft", "run directory: config.json, metrics.jsonl, checkpoint-N/, final/, eval/, report/")
    dtype: Literal["float32", "bfloat16", "float16"] = help_field("float32", "parameter dtype (bfloat16 on a GPU)")
    attn_implementation: str | None = help_field(None, "attention kernel: sdpa, flash_attention_2 or eager (default: flash_attention_2 when installed on CUDA, else sdpa)")
    gradient_checkpointing: bool = help_field(False, "recompute activations in backward to save memory (sets use_cache=False)")
    device: str | None = help_field(None, "torch device (default: cuda when available, else cpu)")
    # optimisation
    num_epochs: int = help_field(1, "passes over the training data")
    max_steps: int | None = help_field(None, "stop after this many optimizer steps (overrides --num-epochs when smaller)")
    batch_size: int = help_field(4, "examples per microbatch (the per-forward batch)")
    gradient_accumulation_steps: int = help_field(8, "microbatches per optimizer step; effective batch = batch-size x this")
    learning_rate: float = help_field(2e-5, "peak learning rate of AdamW")
    weight_decay: float = help_field(0.0, "AdamW weight decay")
    adam_beta1: float = help_field(0.9, "AdamW beta1")
    adam_beta2: float = help_field(0.95, "AdamW beta2")
    max_grad_norm: float = help_field(1.0, "clip the global gradient norm to this (0 disables clipping)")
    lr_scheduler: Literal["cosine", "linear", "constant"] = help_field("cosine", "decay after warmup")
    warmup_ratio: float = help_field(0.03, "fraction of optimizer steps spent warming up linearly from 0")
    min_lr_ratio: float = help_field(0.0, "the schedule decays to learning-rate x this")
    max_length: int | None = help_field(1024, "truncate prompt+response to this many tokens (counts logged); none keeps all")
    loss_normalization: Literal["constant", "token_mean"] = help_field("constant", "constant: per-sequence sum / normalize-constant, batch mean, / accumulation (the design's sft_microbatch_train_step); token_mean: mean NLL over the step's response tokens")
    normalize_constant: float = help_field(1.0, "divisor of each sequence's summed NLL under constant normalisation")
    packing: bool = help_field(False, "pack several examples into rows of --tokens-per-batch tokens, without attention across examples")
    tokens_per_batch: int | None = help_field(None, "with --packing (or dynamic batching): token budget of a microbatch instead of --batch-size examples")
    seed: int = help_field(0, "seed of data order, subsets, initialisation and sampling")
    # evaluation, checkpoints, logging
    eval_every: int = help_field(0, "evaluate by generating and grading every N optimizer steps (0: only before and after training)")
    eval_examples: int = help_field(64, "validation examples per evaluation")
    eval_before_training: bool = help_field(True, "evaluate once before the first step")
    eval_backend: Literal["hf", "vllm"] = help_field("hf", "generator for evaluation: hf (model.generate) or vllm (policy weights loaded into it)")
    eval_batch_size: int = help_field(32, "prompts per generation batch (hf backend)")
    eval_max_new_tokens: int = help_field(512, "token budget of each generated response")
    eval_temperature: float = help_field(0.0, "sampling temperature of evaluation (0: greedy)")
    vllm_gpu_memory_utilization: float = help_field(0.3, "fraction of the GPU vLLM may take (vllm backend)")
    vllm_device: str | None = help_field(None, "device of the vLLM engine (default: the policy's)")
    save_every: int = help_field(0, "write checkpoint-N/ every N optimizer steps (0: only final/)")
    save_total_limit: int | None = help_field(None, "keep only the newest N checkpoint-N/ directories")
    overwrite: bool = help_field(False, "start afresh in an --output-dir that already holds a run (its files are replaced)")
    resume: bool = help_field(False, "continue from the newest checkpoint-N/ in --output-dir (model, optimizer, scheduler, RNG, data position)")
    log_every: int = help_field(1, "write a metrics line every N optimizer steps")
    wandb_project: str | None = help_field(None, "also log to this Weights & Biases project (needs the wandb extra)")
    tensorboard: bool = help_field(False, "also write TensorBoard event files into output-dir/tensorboard")
    progress: bool = help_field(True, "show a progress bar (step, loss, tokens/s, ETA)")
    write_report: bool = help_field(True, "write report/ (plots and summary page) at the end")
    num_threads: int | None = help_field(None, "torch CPU threads (default: torch's choice)")

    def validate(self) -> None:
        """Raises SystemExit naming the option when a value cannot work."""
        problems = []
        if not self.train_data:
            problems.append("--train-data is required")
        if self.batch_size < 1 or self.gradient_accumulation_steps < 1 or self.num_epochs < 1:
            problems.append("--batch-size, --gradient-accumulation-steps and --num-epochs must be >= 1")
        if self.max_length is not None and self.max_length < 2:
            problems.append("--max-length must be at least 2")
        if self.packing and self.max_length is None and self.tokens_per_batch is None:
            problems.append("--packing needs --max-length (the row width) or --tokens-per-batch")
        if not 0.0 <= self.warmup_ratio < 1.0:
            problems.append("--warmup-ratio must be in [0, 1)")
        if self.resume and self.overwrite:
            problems.append("--resume and --overwrite contradict each other")
        if problems:
            raise SystemExit("error: " + "; ".join(problems))


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
    from reasontune.data import load_examples, train_validation_split, with_r1_zero_targets

    train_set = load_examples(config.train_data, max_examples=config.max_train_examples, seed=config.seed,
                              skip_bad=config.skip_bad)
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
    from reasontune.data import example_prompt

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
    from reasontune.batching import pack_examples, token_budget_batches
    from reasontune.tokenization import pad_and_shift

    seed = config.seed * 100_003 + epoch
    if config.packing:
        row_width = (config.max_length or config.tokens_per_batch) - 1
        rows = max(1, (config.tokens_per_batch or config.batch_size * row_width) // row_width)
        return pack_examples(data.prompt_ids, data.output_ids, pad_token_id, tokens_per_row=row_width,
                             rows_per_batch=rows, max_length=config.max_length, shuffle_seed=seed)
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


def plan_steps(data: TokenizedData, config: SFTConfig, pad_token_id: int) -> list[tuple[float, list[dict]]]:
    """Returns every optimizer step of the run as (epoch progress, microbatches); steps never span epochs."""
    steps = []
    for epoch in range(config.num_epochs):
        microbatches = plan_microbatches(data, config, epoch, pad_token_id)
        accumulation = config.gradient_accumulation_steps
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
    """Returns the step's metrics after forward and backward of every microbatch (gradients accumulated, no optimizer step)."""
    from reasontune.batching import packed_forward_kwargs
    from reasontune.logprobs import get_response_log_probs
    from reasontune.losses import sft_microbatch_train_step

    examples_in_step = sum(mb["num_examples"] for mb in microbatches)
    tokens_in_step = int(sum(int(mb["response_mask"].sum()) for mb in microbatches))
    totals = {"loss": 0.0, "nll_sum": 0.0, "response_tokens": 0, "tokens": 0, "entropy_sum": 0.0}
    for mb in microbatches:
        input_ids, labels = mb["input_ids"].to(device), mb["labels"].to(device)
        response_mask = mb["response_mask"].to(device)
        if "position_ids" in mb:
            forward = packed_forward_kwargs(mb, model.config._attn_implementation, dtype=model.dtype)
            forward = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in forward.items()}
            totals["tokens"] += int((mb["sequence_ids"] >= 0).sum())
        else:
            # Right padding under a causal mask: real tokens never attend to the padding after
            # them, so no attention mask is needed (and sdpa keeps its fast causal kernel).
            forward = {}
            totals["tokens"] += int((mb["prompt_lengths"] + mb["response_lengths"] - 1).sum())
        outputs = get_response_log_probs(model, input_ids, labels, return_token_entropy=True,
                                         response_mask=response_mask, **forward)
        loss, metadata = sft_microbatch_train_step(
            outputs["log_probs"], response_mask, config.gradient_accumulation_steps,
            normalize_constant=config.normalize_constant, normalization=config.loss_normalization,
            tokens_in_step=tokens_in_step, examples_in_step=examples_in_step,
        )
        totals["loss"] += float(loss)
        totals["nll_sum"] += float(metadata["masked_nll_sum"])
        totals["response_tokens"] += int(metadata["num_response_tokens"])
        totals["entropy_sum"] += float(outputs["token_entropy"].detach()[response_mask].float().sum())
    tokens = max(totals["response_tokens"], 1)
    return {"loss": totals["loss"], "mean_token_nll": totals["nll_sum"] / tokens,
            "token_entropy": totals["entropy_sum"] / tokens, "response_tokens": totals["response_tokens"],
            "tokens": totals["tokens"], "examples": examples_in_step}


# ---------------------------------------------------------------------------------------------
# Resume safety (the run directory, generator, evaluation and trainer state: training/common.py)


def fingerprint(steps) -> str:
    """Returns a short hash of the planned steps' tokens, so a resume whose finished steps would differ is refused."""
    import hashlib

    digest = hashlib.sha256()
    for _, microbatches in steps:
        for mb in microbatches:
            digest.update(mb["input_ids"].numpy().tobytes())
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# The loop


def run_sft(config: SFTConfig) -> Path:
    """Returns the run directory after SFT of ``config.model`` on ``config.train_data``.

    The loop: microbatches → get_response_log_probs → sft_microbatch_train_step → gradient
    accumulation → clipping → AdamW step → LR schedule → metrics → periodic evaluation →
    checkpoint. Writes config.json, metrics.jsonl, checkpoint-N/, final/, eval/ and report/.
    """
    from reasontune.checkpoint import (latest_checkpoint, load_trainer_state, prune_checkpoints,
                                       remove_stale_temporaries, save_checkpoint, set_rng_state)
    from reasontune.config import save_config
    from reasontune.data import load_template
    from reasontune.modeling import load_model, load_tokenizer
    from reasontune.tokenization import pad_token_id_of
    from reasontune.tracking import MetricsLogger, Progress
    from reasontune.training.common import (NonFiniteStep, clip_and_step, eval_metrics, evaluate_policy,
                                            make_generator, prepare_run_dir, seed_and_device, stop_diverged,
                                            trainer_state)

    # --- setup: run dir, seeds, model, data, optimizer, plan
    run_dir = prepare_run_dir(config.output_dir, resume=config.resume, overwrite=config.overwrite)
    remove_stale_temporaries(run_dir)
    save_config(config, run_dir / "config.json")
    device = seed_and_device(config.seed, config.num_threads, config.device)
    checkpoint = latest_checkpoint(run_dir) if config.resume else None
    weights = str(checkpoint) if checkpoint is not None else config.model
    tokenizer = load_tokenizer(weights)
    model = load_model(weights, dtype=config.dtype, attn_implementation=config.attn_implementation, device=device)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    template = load_template(config.prompt_template)
    train_examples, validation, data_counts = load_sft_examples(config)
    data = tokenize_examples(train_examples, tokenizer, template, config.max_length)
    steps = plan_steps(data, config, pad_token_id_of(tokenizer))
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay,
                                  betas=(config.adam_beta1, config.adam_beta2))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, learning_rate_lambda(config, len(steps)))
    generator = make_generator(config.eval_backend, model, tokenizer, model_name=config.model, dtype=config.dtype,
                               seed=config.seed, batch_size=config.eval_batch_size, vllm_device=config.vllm_device,
                               vllm_gpu_memory_utilization=config.vllm_gpu_memory_utilization) if validation else None

    start_step = 0
    logger = MetricsLogger(run_dir, wandb_project=config.wandb_project, tensorboard=config.tensorboard,
                           config=dataclasses.asdict(config), resume=checkpoint is not None)
    if checkpoint is not None:
        state = load_trainer_state(checkpoint)
        if state["plan_fingerprint"] != fingerprint(steps[: state["step"]]):
            raise SystemExit(f"error: {checkpoint} was trained on other data or batches than these options plan "
                             "for its steps; resume with the same data, seed and batching options")
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        start_step = state["step"]
        logger.truncate_after(start_step)
        logger.log("event", start_step, message=f"resumed from {checkpoint.name}")
    elif config.resume:
        print(f"no checkpoint in {run_dir}; starting from step 0")
    if start_step == 0:
        logger.log("data", 0, **data_counts, **data.counts, loss_normalization=config.loss_normalization)
    print(f"training {config.model} on {data.counts['trained_examples']} examples: {len(steps)} optimizer steps "
          f"({data.counts['truncated']} truncated, {data.counts['dropped_response_truncated_away']} dropped: "
          f"response cut away by --max-length); loss normalisation: {config.loss_normalization}")

    def save(step: int, name: str) -> Path:
        state = trainer_state(step, optimizer, scheduler, fingerprint(steps[:step]))
        config_text = (run_dir / "config.json").read_text()
        path = save_checkpoint(run_dir / name, model, tokenizer, state, {"reasontune_config.json": config_text})
        prune_checkpoints(run_dir, config.save_total_limit)
        return path

    def evaluate_and_log(step: int) -> None:
        summary = evaluate_policy(step, model, generator, validation, template, run_dir, reward=config.reward,
                                  temperature=config.eval_temperature, max_new_tokens=config.eval_max_new_tokens,
                                  seed=config.seed)
        logger.log("eval", step, **eval_metrics(summary, step))
        progress.write(f"step {step}: accuracy {summary['accuracy']:.3f}, format rate {summary['format_rate']:.3f}")

    progress = Progress(len(steps), initial_step=start_step, enabled=config.progress)
    if generator is not None and config.eval_before_training and start_step == 0:
        evaluate_and_log(0)
    model.train()
    started = time.perf_counter()
    for step in range(start_step + 1, len(steps) + 1):
        epoch, microbatches = steps[step - 1]
        # --- forward and backward of every microbatch (accumulating gradients)
        tick = time.perf_counter()
        metrics = train_step(model, microbatches, config, device)
        # --- clip, check, step
        learning_rate = scheduler.get_last_lr()[0]
        try:
            grad_norm = clip_and_step(model, optimizer, scheduler, config.max_grad_norm, metrics["loss"])
        except NonFiniteStep as problem:
            path = save(step - 1, f"checkpoint-{step - 1}")
            message = (f"{problem} at step {step}; stopped. The last good weights (after step {step - 1}) are in "
                       f"{path}; lower --learning-rate or check the data, then --resume")
            stop_diverged(message, step, logger, progress)
        # --- log
        seconds = time.perf_counter() - tick
        if step % config.log_every == 0 or step == len(steps):
            logger.log("train", step, epoch=round(epoch, 4), lr=learning_rate, grad_norm=grad_norm,
                       tokens_per_s=metrics["tokens"] / seconds, response_tokens_per_s=metrics["response_tokens"] / seconds,
                       elapsed_s=time.perf_counter() - started, **metrics)
        progress.update(step, loss=metrics["loss"], tokens_per_s=metrics["tokens"] / seconds)
        # --- evaluate
        if generator is not None and config.eval_every and step % config.eval_every == 0 and step != len(steps):
            evaluate_and_log(step)
        # --- checkpoint
        if config.save_every and step % config.save_every == 0 and step != len(steps):
            save(step, f"checkpoint-{step}")
    progress.close()

    # --- final weights, final evaluation, report
    save(len(steps), "final")
    if generator is not None:
        evaluate_and_log(len(steps))
    logger.close()
    if config.write_report:
        from reasontune.report import write_report

        print(f"report: {write_report(run_dir) / 'index.html'}")
    print(f"run directory: {run_dir}")
    return run_dir
