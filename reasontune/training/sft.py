"""Supervised fine-tuning on prompt/response traces with the loss on response tokens only."""

from __future__ import annotations

import dataclasses
from typing import Literal

from reasontune.config import help_field


@dataclasses.dataclass
class SFTConfig:
    """Options of ``reasontune sft`` (the seeds' flags, plus what a real run needs)."""

    # data
    train_data: str = help_field("", "training data: JSONL of {prompt, response}, chat messages, GSM8K/MATH, JSON/Parquet or a hub name")
    val_data: str | None = help_field(None, "validation data with references for periodic evaluation (default: a split of the training data)")
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
    resume: bool = help_field(False, "continue from the newest checkpoint-N/ in --output-dir (model, optimizer, scheduler, RNG, data position)")
    log_every: int = help_field(1, "write a metrics line every N optimizer steps")
    wandb_project: str | None = help_field(None, "also log to this Weights & Biases project (needs the wandb extra)")
    tensorboard: bool = help_field(False, "also write TensorBoard event files into output-dir/tensorboard")
    progress: bool = help_field(True, "show a progress bar (step, loss, tokens/s, ETA)")
    write_report: bool = help_field(True, "write report/ (plots and summary page) at the end")
    num_threads: int | None = help_field(None, "torch CPU threads (default: torch's choice)")
