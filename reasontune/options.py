"""The option groups every command composes its config from: one name per concept across all commands.

Each group is a dataclass of fields with help text and a ``--help`` group name; a command's
config inherits the groups it needs (``class SFTConfig(LoggingOptions, …, ModelOptions)``) and
adds its own fields, so ``--prompt-template``, ``--grading-workers``, ``--backend`` or
``--wandb`` mean the same thing wherever they appear. A command that wants another default
for a shared option redeclares it with ``same_field(Group, "name", new_default)``.
Configs stop at the entry points: components take plain arguments.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Literal

from reasontune.config import help_field

DType = Literal["float32", "bfloat16", "float16"]
Reward = Literal["auto", "r1_zero", "question_only"]


@dataclass
class RunOptions:
    """Seed and CPU threads."""

    seed: int = help_field(0, "seed of data order, subsets, initialisation and sampling", group="run")
    num_threads: int | None = help_field(None, "torch CPU threads (default: torch's choice)", group="run")


@dataclass
class ModelOptions:
    """Which model, in which dtype, on which device."""

    model: str = help_field("Qwen/Qwen2.5-Math-1.5B", "hub name or local directory of the causal LM (with its tokenizer)", group="model")
    dtype: DType | None = help_field(None, "parameter dtype (default: bfloat16 on a GPU, float32 on a CPU)", group="model")
    device: str | None = help_field(None, "torch device (default: cuda when available, else cpu)", group="model")
    attn_implementation: str | None = help_field(None, "attention kernel: sdpa, flash_attention_2 or eager (default: flash_attention_2 when installed on CUDA, else sdpa)", group="model")


@dataclass
class TaskOptions:
    """How questions become prompts and responses become rewards."""

    prompt_template: str = help_field("r1_zero", "template turning a question into a prompt (data with a prompt field keeps it): r1_zero, question_only or a file containing {question}", group="data")
    reward: Reward = help_field("auto", "reward function: r1_zero (<think>…</think> <answer>…</answer>), question_only (last \\boxed{}), or auto (question_only for the question_only template, else r1_zero)", group="data")
    skip_bad: bool = help_field(False, "skip malformed data records (counted and reported) instead of stopping at the first", group="data")

    @property
    def reward_name(self) -> str:
        """Returns the reward function's name with ``auto`` resolved."""
        if self.reward != "auto":
            return self.reward
        return "question_only" if self.prompt_template == "question_only" else "r1_zero"


@dataclass
class GradingOptions:
    """Where grading runs."""

    grading_workers: int | None = help_field(None, "grading worker processes (0: grade in this process; default: the grader's choice)", group="grading")


@dataclass
class GenerationOptions:
    """Which generator samples rollouts and evaluation answers."""

    backend: Literal["hf", "vllm"] = help_field("hf", "generator: hf (the model's own generate, CPU or GPU) or vllm (GPU, optional extra; policy weights synced into it)", group="generation")
    generation_batch_size: int = help_field(64, "sequences per generate call (hf backend)", group="generation")
    vllm_gpu_memory_utilization: float = help_field(0.3, "fraction of the GPU the vLLM engine may take", group="generation")
    vllm_device: str | None = help_field(None, "device of the vLLM engine (default: the policy's GPU, with sleep mode between uses)", group="generation")


@dataclass
class EvaluationOptions:
    """How answers are sampled for evaluation."""

    eval_temperature: float = help_field(0.0, "sampling temperature of evaluation (0: greedy)", group="evaluation")
    eval_top_p: float = help_field(1.0, "nucleus-sampling threshold of evaluation", group="evaluation")
    eval_max_new_tokens: int = help_field(1024, "token budget of each evaluation response", group="evaluation")
    eval_n_samples: int = help_field(1, "responses sampled per evaluation question (more than 1 needs --eval-temperature > 0 to differ)", group="evaluation")


@dataclass
class InLoopEvaluationOptions(EvaluationOptions):
    """When a trainer evaluates, and on what."""

    val_data: str | None = help_field(None, "held-out questions with references, evaluated before training, every --eval-every steps and at the end (none: no evaluation)", group="evaluation")
    eval_examples: int = help_field(256, "held-out examples per evaluation (0: no evaluation)", group="evaluation")
    eval_every: int = help_field(0, "evaluate every N steps (0: only before and after training)", group="evaluation")
    eval_before_training: bool = help_field(True, "evaluate once before the first step", group="evaluation")
    eval_benchmarks: str | None = help_field(None, "also evaluate on these benchmarks (comma-separated, or all; see reasontune eval --help), with the run's prompt template and reward", group="evaluation")
    benchmark_dir: str | None = help_field(None, "read --eval-benchmarks from local files <dir>/<name>.jsonl|.json|.parquet instead of the hub", group="evaluation")


@dataclass
class RolloutOptions:
    """How expert iteration and GRPO sample their rollouts."""

    group_size: int = help_field(8, "responses sampled per question (G)", group="rollouts")
    sampling_temperature: float = help_field(1.0, "temperature of rollout sampling", group="rollouts")
    sampling_top_p: float = help_field(1.0, "nucleus-sampling threshold of rollout sampling", group="rollouts")
    sampling_min_tokens: int = help_field(4, "no EOS or stop string before this many tokens (>= 1, so no response is empty)", group="rollouts")
    sampling_max_tokens: int = help_field(1024, "token budget of each rollout response", group="rollouts")


@dataclass
class OptimizerOptions:
    """AdamW, clipping and memory-saving recomputation."""

    learning_rate: float = help_field(2e-5, "peak AdamW learning rate", group="optimisation")
    weight_decay: float = help_field(0.0, "AdamW weight decay", group="optimisation")
    adam_beta1: float = help_field(0.9, "AdamW beta1", group="optimisation")
    adam_beta2: float = help_field(0.95, "AdamW beta2", group="optimisation")
    max_grad_norm: float = help_field(1.0, "clip the global gradient norm to this (0 disables clipping)", group="optimisation")
    gradient_checkpointing: bool = help_field(False, "recompute activations in backward to save memory (sets use_cache=False)", group="optimisation")


@dataclass
class LoRAOptions:
    """Low-rank adapters (peft; pip install 'reasontune[lora]')."""

    lora_rank: int = help_field(0, "train LoRA adapters of this rank on a frozen base model (0: full fine-tuning)", group="lora")
    lora_alpha: float | None = help_field(None, "LoRA scaling alpha (default: 2 x rank)", group="lora")
    lora_dropout: float = help_field(0.0, "dropout on the LoRA input", group="lora")
    lora_target_modules: list[str] | None = help_field(None, "module names that get adapters (default: every linear layer of the decoder: q/k/v/o and gate/up/down projections)", group="lora")
    lora_trainable_modules: list[str] | None = help_field(None, "modules trained in full beside the adapters and merged with them, e.g. norm", group="lora")

    def lora_problems(self) -> list[str]:
        """Returns what is wrong with the LoRA options (flags without --lora-rank, a missing peft)."""
        problems = []
        if self.lora_rank < 0:
            problems.append("--lora-rank must be >= 0")
        given = [flag for flag, value in (("--lora-alpha", self.lora_alpha), ("--lora-target-modules", self.lora_target_modules),
                                          ("--lora-trainable-modules", self.lora_trainable_modules)) if value]
        if self.lora_rank == 0 and (given or self.lora_dropout):
            problems.append(f"{', '.join(given) or '--lora-dropout'} given without --lora-rank: set a rank to train LoRA")
        if not 0.0 <= self.lora_dropout < 1.0:
            problems.append("--lora-dropout must be in [0, 1)")
        if self.lora_rank and importlib.util.find_spec("peft") is None:
            problems.append("--lora-rank needs the peft package: pip install 'reasontune[lora]'")
        return problems


@dataclass
class CheckpointOptions:
    """Where a run lives and when it is saved."""

    output_dir: str = help_field("runs/run", "run directory: config.json, metrics.jsonl, checkpoint-N/, final/, eval/, report/", group="checkpoints")
    overwrite: bool = help_field(False, "start afresh in an --output-dir that already holds a run (its files are replaced)", group="checkpoints")
    resume: bool = help_field(False, "continue from the newest checkpoint-N/ in --output-dir (weights, optimizer, schedule, RNG, data position)", group="checkpoints")
    save_every: int = help_field(0, "write checkpoint-N/ every N steps (0: only final/)", group="checkpoints")
    save_total_limit: int | None = help_field(None, "keep only the newest N checkpoint-N/ directories", group="checkpoints")


@dataclass
class LoggingOptions:
    """Metrics, progress and the report (metrics.jsonl is always written)."""

    log_every: int = help_field(1, "write a metrics line every N steps", group="logging")
    wandb: str | None = help_field(None, "also log to this Weights & Biases project (needs the wandb extra)", group="logging", aliases=("wandb-project",))
    tensorboard: bool = help_field(False, "also write TensorBoard event files into output-dir/tensorboard (needs the tensorboard extra)", group="logging")
    progress: bool = help_field(True, "show a progress bar (step, loss, tokens/s, ETA)", group="logging")
    write_report: bool = help_field(True, "write report/ (plots and summary page) at the end", group="logging")


@dataclass
class TrainerOptions(LoggingOptions, CheckpointOptions, InLoopEvaluationOptions, GenerationOptions, GradingOptions,
                     LoRAOptions, OptimizerOptions, TaskOptions, ModelOptions, RunOptions):
    """Every option the three trainers share (SFT, expert iteration and GRPO add their own)."""

    train_data: str = help_field("", "training data: JSONL/JSON/Parquet in any accepted format, or a hub dataset name", group="data")


def resolved_dtype(dtype: str | None, device: str) -> str:
    """Returns ``dtype``, or bfloat16 on a CUDA device and float32 elsewhere when it is None."""
    if dtype is not None:
        return dtype
    return "bfloat16" if str(device).startswith("cuda") else "float32"
