"""The option groups every command composes its config from: one name per concept across all commands.

Each group is a dataclass of fields with help text and a ``--help`` group name; a command's
config inherits the groups it needs (``class SFTConfig(LoggingOptions, …, ModelOptions)``) and
adds its own fields, so ``--prompt-template``, ``--grading-workers``, ``--backend`` or
``--wandb`` mean the same thing wherever they appear. A command that wants another default
for a shared option redeclares it with ``same_field(Group, "name", new_default)``.
Configs stop at the entry points: components take plain arguments.
"""

from __future__ import annotations

import difflib
import importlib.util
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from reasontune.config import help_field
from reasontune.shipped import REWARD_NAMES, SHIPPED_TEMPLATES
from reasontune.gguf_models import gguf_file_problem, is_gguf_file, missing_gguf_packages, missing_packages_message

DType = Literal["float32", "bfloat16", "float16"]
DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".arrow", ".csv")
# A hub id: "name" or "organisation/name" (letters, digits, - _ .), optionally with a revision after "@".
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?(@[\w./-]+)?")


@dataclass
class RunOptions:
    """Seed and CPU threads."""

    seed: int = help_field(0, "seed of data order, subsets, initialisation and sampling", group="run")
    num_threads: int | None = help_field(None, "torch CPU threads (default: torch's choice)", group="run")
    process_group_timeout: float = help_field(600.0, "under torchrun: seconds a rank waits in one collective for the others (every process group) before the job stops, naming the rank that stopped answering", group="distributed")

    def problems(self) -> list[str]:
        """Returns what is wrong with the thread count and the collective timeout."""
        problems: list[str] = []
        _range(problems, "--num-threads", self.num_threads, 1)
        _range(problems, "--process-group-timeout", self.process_group_timeout, 0, low_open=True, hint="seconds, e.g. 600")
        return problems


@dataclass
class ModelOptions:
    """Which model, in which dtype, on which device."""

    model: str = help_field("Qwen/Qwen2.5-Math-1.5B", "hub name, local directory (with its tokenizer) or local .gguf file (dequantised to --dtype; needs reasontune[gguf]) of the causal LM", group="model", aliases=("model-path", "model-name-or-path"))
    dtype: DType | None = help_field(None, "parameter dtype (default: bfloat16 on a GPU, float32 on a CPU)", group="model")
    device: str | None = help_field(None, "torch device (default: cuda when available, else cpu)", group="model")
    attn_implementation: str | None = help_field(None, "attention kernel: sdpa, flash_attention_2 or eager (default: flash_attention_2 when installed on CUDA, else sdpa)", group="model")

    def machine_problems(self) -> list[str]:
        """Returns what this machine lacks for --model and --device: the model, CUDA."""
        problems = model_problems("--model", self.model)
        if self.device and self.device.startswith("cuda"):
            import torch  # lazy: only when a CUDA device is asked for

            if not torch.cuda.is_available():
                problems.append(f"--device {self.device}: CUDA is not available here; drop --device or use cpu")
        return problems


@dataclass
class TaskOptions:
    """How questions become prompts and responses become rewards."""

    prompt_template: str = help_field("r1_zero", "template turning a question into a prompt (data with a prompt field keeps it): r1_zero, question_only or a file containing {question}", group="data")
    reward: str = help_field("auto", "reward function: r1_zero (<think>…</think> <answer>…</answer>), question_only (last \\boxed{}), auto (question_only for the question_only template, else r1_zero), or module:function of your own, called as function(response, ground_truth) -> {'format_reward', 'answer_reward', 'reward'} in the grading workers", group="data")
    skip_bad: bool = help_field(False, "skip malformed data records (counted and reported) instead of stopping at the first", group="data")
    chat_template: Literal["auto", "none"] = help_field("auto", "chat data ({\"messages\": [...]}): auto renders its system/user turns with the tokenizer's chat template when the model has one; none uses the user turn's text as the prompt", group="data")
    split: str | None = help_field(None, "split of a hub dataset (default: train)", group="data")
    data_config: str | None = help_field(None, "config (subset) name of a hub dataset, e.g. main for openai/gsm8k", group="data")

    def environment_problems(self) -> list[str]:
        """Returns what the machine lacks for this config: files, the model, the reward, packages (``options.environment_problems``)."""
        return environment_problems(self)

    def machine_problems(self) -> list[str]:
        """Returns what is wrong here with --prompt-template's file and --reward's function."""
        return template_problems(self.prompt_template) + reward_problems(self.reward)

    def problems(self) -> list[str]:
        """Returns what is wrong with --reward's value: neither a shipped name nor module:function."""
        if self.reward in REWARD_NAMES or ":" in self.reward:
            return []
        return [f"--reward {self.reward}: unknown; give {', '.join(REWARD_NAMES)} or module:function"]

    @property
    def reward_name(self) -> str:
        """Returns the reward function's name with ``auto`` resolved."""
        if self.reward != "auto":
            return self.reward
        return "question_only" if self.prompt_template == "question_only" else "r1_zero"


@dataclass
class GradingOptions:
    """Where grading runs."""

    grading_workers: int | None = help_field(None, "grading worker processes (0: grade in this process; default: this node's cores divided by the ranks on it, LOCAL_WORLD_SIZE under torchrun)", group="grading")

    def problems(self) -> list[str]:
        """Returns what is wrong with the number of grading workers."""
        problems: list[str] = []
        _range(problems, "--grading-workers", self.grading_workers, 0)
        return problems


@dataclass
class GenerationOptions:
    """Which generator samples rollouts and evaluation answers."""

    backend: Literal["hf", "vllm"] = help_field("hf", "generator: hf (the model's own generate, CPU or GPU) or vllm (GPU, optional extra; policy weights synced into it)", group="generation")
    generation_batch_size: int = help_field(64, "sequences per generate call (hf backend)", group="generation")
    vllm_gpu_memory_utilization: float = help_field(0.3, "fraction of the GPU the vLLM engine may take", group="generation")
    vllm_device: str | None = help_field(None, "device of the vLLM engine (default: the policy's GPU, with sleep mode between uses)", group="generation")
    vllm_tensor_parallel_size: int = help_field(1, "GPUs one in-process vLLM engine shards the model over (tensor parallel); under torchrun each rank runs its own engine, so 1 there", group="generation")
    vllm_data_parallel_size: int | None = help_field(None, "vLLM engine replicas (data parallel), which the launch decides: under torchrun one engine per rank (the world size; a value given must match it), in one process 1 (vLLM's LLM cannot run data-parallel engines in one process), for --vllm-server-url the server's own --data-parallel-size", group="generation")
    vllm_server_url: str | None = help_field(None, "sample from a running `vllm serve` (e.g. http://gpu-node:8000) instead of an in-process engine; see docs/scaling.md", group="generation")
    vllm_weight_sync: Literal["auto", "nccl", "none"] = help_field("auto", "how the policy's weights reach the --vllm-server-url server: nccl (vLLM's weight-transfer API; the server needs --weight-transfer-config '{\"backend\": \"nccl\"}') or none (the server keeps its weights; eval only); auto: nccl for trainers, none for eval", group="generation")
    vllm_weight_sync_address: str | None = help_field(None, "this trainer's address as the vLLM server's workers can reach it, for the NCCL weight group (default: this host's IP address)", group="generation")
    vllm_weight_sync_port: int = help_field(0, "TCP port of the NCCL weight group's rendezvous on this trainer (0: a free port)", group="generation")
    vllm_timeout: float = help_field(600.0, "seconds one request to the --vllm-server-url server may take, its reply included (a completions request samples all its responses in that time)", group="generation")
    # Whether the config trains the policy it generates from (a trainer pushes weights to a vLLM server; eval does not).
    trains_policy: ClassVar[bool] = False

    def problems(self) -> list[str]:
        """Returns what is wrong with the generation options: batch size, vLLM's memory share, the vLLM flags together."""
        problems: list[str] = []
        _range(problems, "--generation-batch-size", self.generation_batch_size, 1)
        _range(problems, "--vllm-gpu-memory-utilization", self.vllm_gpu_memory_utilization, 0, 1, low_open=True)
        return problems + self.vllm_problems(trainer=self.trains_policy)

    def vllm_problems(self, trainer: bool) -> list[str]:
        """Returns what is wrong with the vLLM options: flags that need another, sizes out of range, a malformed server URL."""
        problems: list[str] = []
        _range(problems, "--vllm-tensor-parallel-size", self.vllm_tensor_parallel_size, 1)
        _range(problems, "--vllm-data-parallel-size", self.vllm_data_parallel_size, 1)
        world_size = int(os.environ.get("WORLD_SIZE", "1"))  # torchrun sets it before any config is read
        _range(problems, "--vllm-weight-sync-port", self.vllm_weight_sync_port, 0, 65535)
        given = [flag for flag, value in (("--vllm-server-url", self.vllm_server_url),
                                          ("--vllm-device", self.vllm_device),
                                          ("--vllm-tensor-parallel-size", self.vllm_tensor_parallel_size != 1),
                                          ("--vllm-data-parallel-size", self.vllm_data_parallel_size)) if value]
        if self.backend != "vllm" and given:
            problems.append(f"{', '.join(given)} given with --backend {self.backend}: add --backend vllm or drop them")
        _range(problems, "--vllm-timeout", self.vllm_timeout, 0, low_open=True, hint="seconds, e.g. 600")
        sync_flags = [flag for flag, value in (("--vllm-weight-sync", self.vllm_weight_sync != "auto"),
                                               ("--vllm-weight-sync-address", self.vllm_weight_sync_address),
                                               ("--vllm-weight-sync-port", self.vllm_weight_sync_port)) if value]
        if not self.vllm_server_url:
            if sync_flags:
                problems.append(f"{', '.join(sync_flags)} given without --vllm-server-url: weights are pushed over "
                                "NCCL only to a vllm serve server; give its URL or drop them")
            if self.vllm_timeout != 600.0:
                problems.append("--vllm-timeout given without --vllm-server-url: it bounds requests to a vllm serve "
                                "server; give its URL or drop the flag")
            return problems + self.launch_problems(world_size)
        problems += server_url_problems(self.vllm_server_url)
        for flag, value in (("--vllm-device", self.vllm_device),
                            ("--vllm-tensor-parallel-size", self.vllm_tensor_parallel_size != 1),
                            ("--vllm-data-parallel-size", self.vllm_data_parallel_size)):
            if value:
                problems.append(f"{flag} with --vllm-server-url: the server owns its GPUs; give its devices and "
                                "sizes on the vllm serve command line (CUDA_VISIBLE_DEVICES, --tensor-parallel-size, "
                                "--data-parallel-size) and drop the flag here")
        sync = self.weight_sync_mode(trainer)
        if trainer and sync == "none":
            problems.append("--vllm-weight-sync none: a trainer's rollouts must come from the policy being trained; "
                            "use nccl (start the server with --weight-transfer-config '{\"backend\": \"nccl\"}')")
        if not trainer and sync == "nccl":
            problems.append("--vllm-weight-sync nccl: eval has no policy to push; the server samples from the model "
                            "it loaded, so drop the flag")
        if sync == "none" and (self.vllm_weight_sync_address or self.vllm_weight_sync_port):
            problems.append("--vllm-weight-sync-address/--vllm-weight-sync-port need --vllm-weight-sync nccl")
        return problems

    def launch_problems(self, world_size: int) -> list[str]:
        """Returns why the vLLM generator cannot run at this world size (none for hf)."""
        if self.backend != "vllm":
            return []
        problems = []
        if world_size > 1 and getattr(self, "async_steps", 0):
            # The background rollout thread would sync weights with collectives (layer gathers, the barrier after a
            # push) on the main process group, beside FSDP's collectives of the training step.
            problems.append("--async-steps with --backend vllm under torchrun: a background weight sync would share "
                            "the process group with training; use --backend hf, one process, or --async-steps 0")
        if self.vllm_server_url:
            return problems
        if self.vllm_data_parallel_size not in (None, world_size):
            problems.append(
                f"--vllm-data-parallel-size {self.vllm_data_parallel_size}: "
                + ("vLLM's LLM cannot run data-parallel engines in one process; launch with torchrun "
                   f"--nproc_per_node {self.vllm_data_parallel_size} (one engine per rank) or use a vllm serve "
                   "server (--vllm-server-url) started with --data-parallel-size" if world_size == 1 else
                   f"under torchrun each of the {world_size} ranks runs its own engine, so the data-parallel "
                   f"size is {world_size}; drop the flag or launch {self.vllm_data_parallel_size} processes"))
        if world_size > 1 and self.vllm_tensor_parallel_size > 1:
            problems.append(f"--vllm-tensor-parallel-size {self.vllm_tensor_parallel_size} under torchrun: each rank "
                            "samples its own questions with its own engine, which a tensor-parallel group of ranks "
                            "cannot; use a vllm serve server (--vllm-server-url) started with --tensor-parallel-size, "
                            "or tensor parallel 1")
        if world_size > 1 and self.vllm_device:
            problems.append(f"--vllm-device {self.vllm_device} under torchrun: each rank's engine shares the rank's "
                            "own GPU; to generate on other GPUs start a vllm serve server there (--vllm-server-url)")
        if world_size == 1 and self.vllm_device and self.vllm_tensor_parallel_size > 1:
            problems.append(f"--vllm-device with --vllm-tensor-parallel-size {self.vllm_tensor_parallel_size}: one "
                            "device cannot hold a tensor-parallel engine; choose its GPUs with CUDA_VISIBLE_DEVICES")
        return problems

    def weight_sync_mode(self, trainer: bool) -> str:
        """Returns ``--vllm-weight-sync`` with auto resolved: nccl for a trainer, none for eval."""
        if self.vllm_weight_sync != "auto":
            return self.vllm_weight_sync
        return "nccl" if trainer else "none"

    def machine_problems(self) -> list[str]:
        """Returns what this machine lacks for --backend vllm: its package where this process loads or feeds the engine."""
        # A vllm serve server without weight pushes is plain HTTP: this side needs no vllm package.
        if self.backend != "vllm" or (self.vllm_server_url and self.weight_sync_mode(self.trains_policy) != "nccl"):
            return []
        problems = package_problems("--backend vllm", "vllm", "vllm")
        model = getattr(self, "model", None)  # the config's ModelOptions, where it has them
        if model and is_gguf_file(model):
            problems.append(f"--backend vllm: loads --model itself, and {model} is a GGUF file; convert it once "
                            f"with reasontune models get --gguf {model} --output-dir DIR and give --model DIR")
        return problems


@dataclass
class ShardingOptions:
    """How FSDP2 shards the policy under torchrun (no effect on one process, so refused there)."""

    fsdp_mixed_precision: bool = help_field(False, "under torchrun: gather parameters as bfloat16 for compute and reduce gradients in float32, the sharded master weights and optimizer state staying in --dtype (use with --dtype float32 for fp32 master weights)", group="distributed")
    fsdp_cpu_offload: bool = help_field(False, "under torchrun on GPUs: keep the sharded parameters, gradients and optimizer state in CPU memory (slower steps, much less GPU memory)", group="distributed")

    def problems(self) -> list[str]:
        """Returns what is wrong with the FSDP flags given this config's --device (launch and CUDA are environment checks)."""
        device = getattr(self, "device", None)
        if self.fsdp_cpu_offload and device and not str(device).startswith("cuda"):
            return [(f"--fsdp-cpu-offload with --device {device}: offload moves sharded GPU state to CPU memory; on "
                     "a CPU run it is there already, so drop the flag")]
        return []

    def machine_problems(self) -> list[str]:
        """Returns what this launch lacks for the FSDP flags: torchrun with several processes, and CUDA for offload."""
        flags = [flag for flag, on in (("--fsdp-mixed-precision", self.fsdp_mixed_precision),
                                       ("--fsdp-cpu-offload", self.fsdp_cpu_offload)) if on]
        if not flags:
            return []
        problems = []
        if int(os.environ.get("WORLD_SIZE", "1")) < 2:
            problems.append(f"{', '.join(flags)}: FSDP2 shards the model only under torchrun with several processes "
                            "(torchrun --nproc_per_node N -m reasontune …); one process trains in --dtype, so drop "
                            "the flag")
        if self.fsdp_cpu_offload:
            import torch  # lazy: only when offload is asked for

            if not torch.cuda.is_available():
                problems.append("--fsdp-cpu-offload: CUDA is not available here; offload moves sharded GPU state "
                                "to CPU memory, so drop the flag on a CPU machine")
        return problems


@dataclass
class EvaluationOptions:
    """How answers are sampled for evaluation."""

    eval_temperature: float = help_field(0.0, "sampling temperature of evaluation (0: greedy)", group="evaluation")
    eval_top_p: float = help_field(1.0, "nucleus-sampling threshold of evaluation", group="evaluation")
    eval_max_new_tokens: int = help_field(1024, "token budget of each evaluation response", group="evaluation")
    eval_n_samples: int = help_field(1, "responses sampled per evaluation question (more than 1 needs --eval-temperature > 0 to differ)", group="evaluation")

    def problems(self) -> list[str]:
        """Returns what is wrong with the evaluation sampling options."""
        problems: list[str] = []
        _range(problems, "--eval-temperature", self.eval_temperature, 0)
        _range(problems, "--eval-top-p", self.eval_top_p, 0, 1, low_open=True)
        _range(problems, "--eval-max-new-tokens", self.eval_max_new_tokens, 1)
        _range(problems, "--eval-n-samples", self.eval_n_samples, 1)
        if self.eval_n_samples > 1 and self.eval_temperature == 0:
            problems.append(f"--eval-n-samples {self.eval_n_samples}: greedy decoding (--eval-temperature 0) makes "
                            "every sample identical; set --eval-temperature > 0 (e.g. 0.6) or --eval-n-samples 1")
        return problems


@dataclass
class InLoopEvaluationOptions(EvaluationOptions):
    """When a trainer evaluates, and on what."""

    val_data: str | None = help_field(None, "held-out questions with references, evaluated before training, every --eval-every steps and at the end (none: no held-out evaluation; sft can split one off with --val-fraction)", group="evaluation", aliases=("val-data-path",))

    def machine_problems(self) -> list[str]:
        """Returns what is wrong with --val-data's file on this machine."""
        return data_source_problems("--val-data", self.val_data)
    eval_examples: int = help_field(256, "held-out examples per evaluation (0: no evaluation)", group="evaluation")
    eval_every: int = help_field(0, "evaluate every N steps (0: only before and after training)", group="evaluation")
    eval_before_training: bool = help_field(True, "evaluate once before the first step", group="evaluation")
    eval_benchmarks: str | None = help_field(None, "also evaluate on these benchmarks (comma-separated, or all; see reasontune eval --help), with the run's prompt template and reward", group="evaluation")
    benchmark_dir: str | None = help_field(None, "read --eval-benchmarks from local files <dir>/<name>.jsonl|.json|.parquet instead of the hub", group="evaluation")

    def problems(self) -> list[str]:
        """Returns what is wrong with how many examples are evaluated and how often."""
        problems: list[str] = []
        _range(problems, "--eval-examples", self.eval_examples, 0)
        _range(problems, "--eval-every", self.eval_every, 0)
        return problems


@dataclass
class RolloutOptions:
    """How expert iteration and GRPO sample their rollouts."""

    group_size: int = help_field(8, "responses sampled per question (G)", group="rollouts")
    sampling_temperature: float = help_field(1.0, "temperature of rollout sampling", group="rollouts")
    sampling_top_p: float = help_field(1.0, "nucleus-sampling threshold of rollout sampling", group="rollouts")
    sampling_min_tokens: int = help_field(4, "no EOS or stop string before this many tokens (>= 1, so no response is empty)", group="rollouts")
    sampling_max_tokens: int = help_field(1024, "token budget of each rollout response", group="rollouts")

    def problems(self) -> list[str]:
        """Returns what is wrong with the rollout sampling options."""
        problems: list[str] = []
        _range(problems, "--group-size", self.group_size, 1)
        _range(problems, "--sampling-temperature", self.sampling_temperature, 0, low_open=True,
               hint="rollouts must be sampled")
        _range(problems, "--sampling-top-p", self.sampling_top_p, 0, 1, low_open=True)
        if not 1 <= self.sampling_min_tokens <= self.sampling_max_tokens:
            problems.append(f"--sampling-min-tokens {self.sampling_min_tokens} / --sampling-max-tokens "
                            f"{self.sampling_max_tokens}: need 1 <= min <= max")
        return problems


@dataclass
class ToolOptions:
    """The environment rollouts run in: the single-turn math task, or the python tool (``reasontune.environments``)."""

    env: Literal["math", "python"] = help_field("math", "environment of the rollouts: math (one completion per sample, the default) or python (the model may write <python>…</python>; each program runs in a fresh sandbox and its output follows in <output>…</output>; the loss trains the model's turns only; see docs/tools.md)", group="environment")
    max_tool_calls: int = help_field(4, "--env python: tool calls allowed per response; --sampling-max-tokens bounds the model tokens of the whole response, all turns together", group="environment")
    tool_timeout: float = help_field(10.0, "--env python: wall-clock seconds of one program (its CPU seconds too)", group="environment")
    tool_output_bytes: int = help_field(4096, "--env python: bytes of a program's output kept; it is killed past them", group="environment")

    def problems(self) -> list[str]:
        """Returns what is wrong with the tool bounds (checked with ``--env python`` only: math ignores them)."""
        if self.env != "python":
            return []
        problems: list[str] = []
        _range(problems, "--max-tool-calls", self.max_tool_calls, 1)
        _range(problems, "--tool-timeout", self.tool_timeout, 0, low_open=True)
        _range(problems, "--tool-output-bytes", self.tool_output_bytes, 1)
        return problems


@dataclass
class OptimizerOptions:
    """AdamW, clipping and memory-saving recomputation."""

    learning_rate: float = help_field(2e-5, "peak AdamW learning rate", group="optimisation", aliases=("lr",))
    weight_decay: float = help_field(0.0, "AdamW weight decay", group="optimisation")
    adam_beta1: float = help_field(0.9, "AdamW beta1", group="optimisation")
    adam_beta2: float = help_field(0.95, "AdamW beta2", group="optimisation")
    max_grad_norm: float = help_field(1.0, "clip the global gradient norm to this (0 disables clipping)", group="optimisation")
    gradient_checkpointing: bool = help_field(False, "recompute activations in backward to save memory (sets use_cache=False)", group="optimisation")

    def problems(self) -> list[str]:
        """Returns what is wrong with the AdamW and clipping options."""
        problems: list[str] = []
        _range(problems, "--learning-rate", self.learning_rate, 0, low_open=True, hint="e.g. 1e-5")
        _range(problems, "--weight-decay", self.weight_decay, 0)
        _range(problems, "--adam-beta1", self.adam_beta1, 0, 1, high_open=True)
        _range(problems, "--adam-beta2", self.adam_beta2, 0, 1, high_open=True)
        _range(problems, "--max-grad-norm", self.max_grad_norm, 0, hint="0 disables clipping")
        return problems


@dataclass
class LoRAOptions:
    """Low-rank adapters (peft; pip install 'reasontune[lora]')."""

    lora_rank: int = help_field(0, "train LoRA adapters of this rank on a frozen base model (0: full fine-tuning)", group="lora")
    lora_alpha: float | None = help_field(None, "LoRA scaling alpha (default: 2 x rank)", group="lora")
    lora_dropout: float = help_field(0.0, "dropout on the LoRA input", group="lora")
    lora_target_modules: list[str] | None = help_field(None, "module names that get adapters (default: every linear layer of the decoder: q/k/v/o and gate/up/down projections)", group="lora")
    lora_trainable_modules: list[str] | None = help_field(None, "modules trained in full beside the adapters and merged with them, e.g. norm", group="lora")

    def problems(self) -> list[str]:
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
    save_every: int = help_field(0, "write checkpoint-N/ every N steps (0: only final/)", group="checkpoints", aliases=("save-every-n-steps", "save-steps"))
    save_total_limit: int | None = help_field(None, "keep only the newest N checkpoint-N/ directories", group="checkpoints")

    def problems(self) -> list[str]:
        """Returns what is wrong with the run directory and checkpoint options."""
        problems = [] if self.output_dir else ["--output-dir: required; give the run directory"]
        _range(problems, "--save-every", self.save_every, 0)
        _range(problems, "--save-total-limit", self.save_total_limit, 1)
        return problems


@dataclass
class TrackingOptions:
    """Where numbers go besides the command's own files: Weights & Biases and TensorBoard."""

    wandb: str | None = help_field(None, "also log to this Weights & Biases project (needs the wandb extra)", group="logging", aliases=("wandb-project",))
    tensorboard: bool = help_field(False, "also write TensorBoard event files into output-dir/tensorboard (needs the tensorboard extra)", group="logging")

    def machine_problems(self) -> list[str]:
        """Returns the packages this machine lacks for --tensorboard and --wandb."""
        return ((package_problems("--tensorboard", "tensorboard", "tensorboard") if self.tensorboard else [])
                + (package_problems("--wandb", "wandb", "wandb") if self.wandb else []))


@dataclass
class LoggingOptions(TrackingOptions):
    """Metrics, progress and the report (metrics.jsonl is always written)."""

    log_every: int = help_field(1, "write a metrics line every N steps", group="logging")
    progress: bool = help_field(True, "show a progress bar (step, loss, tokens/s, ETA)", group="logging")
    write_report: bool = help_field(True, "write report/ (plots and summary page) at the end", group="logging")

    def problems(self) -> list[str]:
        """Returns what is wrong with the logging interval."""
        problems: list[str] = []
        _range(problems, "--log-every", self.log_every, 1)
        return problems


@dataclass
class TrainerOptions(LoggingOptions, CheckpointOptions, InLoopEvaluationOptions, GenerationOptions, GradingOptions,
                     LoRAOptions, OptimizerOptions, ShardingOptions, TaskOptions, ModelOptions, RunOptions):
    """Every option the three trainers share (SFT, expert iteration and GRPO add their own).

    Each trainer's config also declares ``command`` (its subcommand, recorded in config.json),
    ``planned_steps`` (the steps a run trains; None when known only after planning) and
    ``launch_sizes(world_size)`` (the batch sizes config.json records of a launch).
    """

    command: ClassVar[str]
    trains_policy: ClassVar[bool] = True

    train_data: str = help_field("", "training data: JSONL/JSON/Parquet in any accepted format, or a hub dataset name (required)", group="data", aliases=("sft-data-path", "train-data-path"))

    def problems(self) -> list[str]:
        """Returns what is wrong with --train-data's value (its file is an environment check)."""
        return [] if self.train_data else ["--train-data: required; give a JSONL/JSON/Parquet file or a hub dataset name"]

    def machine_problems(self) -> list[str]:
        """Returns what is wrong with --train-data's file on this machine."""
        return data_source_problems("--train-data", self.train_data)


def resolved_dtype(dtype: str | None, device: str) -> str:
    """Returns ``dtype``, or bfloat16 on a CUDA device and float32 elsewhere when it is None."""
    if dtype is not None:
        return dtype
    return "bfloat16" if str(device).startswith("cuda") else "float32"


# ---------------------------------------------------------------------------------------------
# Checks every command runs before it touches its output directory


def looks_like_path(text: str) -> bool:
    """Returns whether ``text`` names a local file or directory rather than a hub id (it exists, or is not shaped like one)."""
    if not text:
        return False
    path = Path(text).expanduser()
    if path.exists() or text.startswith((".", "/", "~")) or path.suffix in DATA_SUFFIXES:
        return True
    # "runs/sft/final" or "runs/finall" (a typo under an existing directory) is a path, not a hub id.
    return not HUB_ID.fullmatch(text) or Path(text.split("/")[0]).is_dir()


def data_source_problems(flag: str, source: str | None) -> list[str]:
    """Returns what is wrong with a data flag's value: a local file that is missing, a directory or empty (hub names pass)."""
    if not source:
        return []
    from reasontune.data import looks_like_local_file  # lazy: the data module imports the graders

    if not looks_like_path(source) and not looks_like_local_file(source):
        nearby = _nearby(source, files=True)
        return [f"{flag} {source}: no such file (did you mean {nearby}?), and it would be tried as a hub dataset"] if nearby else []
    path = Path(source).expanduser()
    if not path.exists():
        return [f"{flag} {source}: no such file; check the path (or give a hub dataset name)"]
    if path.is_dir():
        return [f"{flag} {source}: is a directory; give a .jsonl/.json/.parquet file"]
    if path.suffix not in DATA_SUFFIXES:
        return [f"{flag} {source}: unsupported format {path.suffix or '(no suffix)'}; give a "
                f"{'/'.join(DATA_SUFFIXES)} file (local files are never looked up on the hub)"]
    if path.stat().st_size == 0 or (path.suffix in (".jsonl", ".json") and path.stat().st_size < 1 << 20
                                     and not path.read_text(encoding="utf-8", errors="replace").strip()):
        return [f"{flag} {source}: the file is empty; give a file with at least one record"]
    return []


def model_problems(flag: str, model: str) -> list[str]:
    """Returns what is wrong with a model flag: a local directory that is missing or holds no config.json, or a malformed hub id."""
    if not model:
        return [f"{flag}: required; give a local model directory or a hub id such as Qwen/Qwen2.5-Math-1.5B"]
    if is_gguf_file(model):  # a local GGUF file, dequantised on load
        problem = gguf_file_problem(model)
        missing = missing_gguf_packages()
        return ([f"{flag} {model}: {problem}"] if problem else []) + (
            [f"{flag} {model}: {missing_packages_message(missing)}"] if missing else [])
    if not looks_like_path(model):
        return hub_model_problems(flag, model)
    path = Path(model).expanduser()
    if not path.exists():
        return [f"{flag} {model}: no such directory, and not a hub id (organisation/name); check the path"]
    if not path.is_dir() or not (path / "config.json").exists():
        return [(f"{flag} {model}: not a model directory (no config.json); give the directory save_pretrained wrote, "
                 "e.g. a run's final/")]
    from reasontune.checkpoint import model_files_problem  # lazy: imports torch

    problem = model_files_problem(path)
    return [f"{flag} {model}: {problem}"] if problem else []


def _nearby(name: str, files: bool) -> str | None:
    """Returns the local file (or directory) whose path is closest to ``name``, when one is close enough to be a typo of it."""
    parent = Path(name).parent
    if not parent.is_dir():
        return None
    candidates = [str(child) if str(parent) != "." else child.name for child in parent.iterdir()
                  if (child.is_file() if files else child.is_dir())]
    close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.75)
    return close[0] if close else None


def hub_model_problems(flag: str, model: str) -> list[str]:
    """Returns what is wrong with a hub id that is not in the local cache: a likely typo of a local directory, or offline mode."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return []
    repo_id = model.split("@")[0]
    if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
        return []
    nearby = _nearby(model, files=False)
    if nearby:
        return [f"{flag} {model}: no such directory (did you mean {nearby}?) and not a downloaded hub model"]
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return [(f"{flag} {model}: not in the local Hugging Face cache and HF_HUB_OFFLINE is set; download it first "
                 "or give a local model directory")]
    return []


def package_problems(flag: str, package: str, extra: str) -> list[str]:
    """Returns a problem naming ``flag`` when the optional ``package`` is not installed."""
    if importlib.util.find_spec(package) is None:
        return [(f"{flag}: needs the {package} package, which is not installed; pip install 'reasontune[{extra}]' "
                 f"or drop {flag}")]
    return []


def reward_problems(reward: str) -> list[str]:
    """Returns what is wrong with a --reward of module:function on this machine: not importable, or not a reward function.

    An unknown name is a value problem (``TaskOptions.problems``), named there once.
    """
    if reward in REWARD_NAMES or ":" not in reward:
        return []
    from reasontune.rollouts import reward_fn_by_name  # lazy: imports the graders

    try:
        reward_fn_by_name(reward)
    except (ValueError, ImportError, TypeError) as error:
        return [f"--reward {reward}: {error}"]
    return []


def template_problems(template: str) -> list[str]:
    """Returns what is wrong with --prompt-template: neither a shipped name nor a readable file containing {question}."""
    if template in SHIPPED_TEMPLATES or template == "auto":
        return []
    path = Path(template).expanduser()
    if not path.is_file():
        return [(f"--prompt-template {template}: neither a shipped template ({', '.join(SHIPPED_TEMPLATES)}) "
                 "nor an existing file")]
    if "{question}" not in path.read_text(encoding="utf-8", errors="replace"):
        return [f"--prompt-template {template}: the file has no {{question}} placeholder; add one where the question goes"]
    return []


def server_url_problems(url: str) -> list[str]:
    """Returns what is wrong with --vllm-server-url: not http(s)://host[:port] (a trailing / or /v1 is accepted)."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        port = parts.port  # ValueError when not a number in 0..65535
    except ValueError as error:
        return [f"--vllm-server-url {url}: {error}; give http://HOST:PORT of the vllm serve server"]
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return [f"--vllm-server-url {url}: give http://HOST:PORT of the vllm serve server (e.g. http://gpu-node:8000)"]
    if parts.path.rstrip("/") not in ("", "/v1") or parts.query or parts.fragment:
        return [f"--vllm-server-url {url}: give the server's base URL, http://HOST:PORT, without a path"]
    if port == 0:
        return [f"--vllm-server-url {url}: port 0; give the port vllm serve listens on (8000 by default)"]
    return []


def _range(problems: list[str], flag: str, value: Any, low: float | None = None, high: float | None = None,
           low_open: bool = False, high_open: bool = False, hint: str = "") -> None:
    """Appends a problem when ``value`` is not finite or not within [low, high] (or the open ends)."""
    if value is None:
        return
    bad = isinstance(value, float) and not math.isfinite(value)
    if low is not None:
        bad = bad or (value <= low if low_open else value < low)
    if high is not None:
        bad = bad or (value >= high if high_open else value > high)
    if bad:
        left = "" if low is None else (f"> {low:g}" if low_open else f">= {low:g}")
        right = "" if high is None else (f"< {high:g}" if high_open else f"<= {high:g}")
        wanted = " and ".join(part for part in (left, right) if part) or "finite"
        problems.append(f"{flag}: must be {wanted}, got {value:g}{'; ' + hint if hint else ''}")


def environment_problems(config: Any) -> list[str]:
    """Returns every problem of ``config`` with this machine: missing or empty files, a model that is not there, packages the flags need.

    ``config.value_problems`` checks that the values can work together; this checks that they can work
    here and now. Both run before a command touches its output directory. Like ``value_problems``,
    it is the ``machine_problems()`` of each class the config is made of, base groups first: each
    group checks the fields it declares, and a command adds its own (eval's output directory).
    """
    problems: list[str] = []
    for cls in reversed(type(config).__mro__):
        own = vars(cls).get("machine_problems")
        if callable(own):
            problems += [problem for problem in own(config) if problem not in problems]
    return problems
