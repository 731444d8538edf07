"""GRPO with verified rewards: rollouts, group-normalised advantages, policy-gradient steps.

Each GRPO step samples ``rollout_batch_size / group_size`` questions, generates ``group_size``
responses to each with the current policy, grades them, normalises the rewards within each
group into advantages and takes ``epochs_per_rollout_batch`` passes of policy-gradient steps
over the rollouts (one optimizer step per ``train_batch_size`` rollouts). Loss aggregation and
gradient-accumulation scaling live in ``reasontune.losses.grpo_microbatch_train_step``.
"""

from __future__ import annotations

import dataclasses
import random
import time
from pathlib import Path
from typing import Literal

import torch

from reasontune.config import help_field


@dataclasses.dataclass
class GRPOConfig:
    """Options of ``reasontune grpo`` (defaults: the CS336 handout's GRPO settings for Qwen2.5-Math-1.5B)."""

    # data and reward
    train_data: str = help_field("", "questions with reference answers to roll out on: JSONL of {prompt|question, ground_truth|answer}, GSM8K/MATH, JSON/Parquet or a hub name")
    val_data: str | None = help_field(None, "validation questions with references, evaluated every --eval-every steps (none: no evaluation)")
    prompt_template: str = help_field("r1_zero", "template turning a question into a prompt (data with a prompt field keeps it): r1_zero, question_only or a file with {question}")
    reward: Literal["r1_zero", "question_only"] = help_field("r1_zero", "reward function: r1_zero (<think>…</think> <answer>…</answer>) or question_only (last \\boxed{})")
    # model and run directory
    model: str = help_field("Qwen/Qwen2.5-Math-1.5B", "hub name or local directory of the policy to start from (usually an SFT checkpoint)")
    output_dir: str = help_field("runs/grpo", "run directory: config.json, metrics.jsonl, checkpoint-N/, final/, eval/, report/")
    overwrite: bool = help_field(False, "start afresh in an --output-dir that already holds a run (its files are replaced)")
    dtype: Literal["float32", "bfloat16", "float16"] = help_field("float32", "parameter dtype (bfloat16 on a GPU)")
    device: str | None = help_field(None, "torch device of the policy (default: cuda when available, else cpu)")
    gradient_checkpointing: bool = help_field(False, "recompute activations in backward to save memory")
    # GRPO
    n_grpo_steps: int = help_field(200, "GRPO steps: each one rollout batch, then epochs-per-rollout-batch passes of optimizer steps over it")
    learning_rate: float = help_field(1e-5, "AdamW learning rate (constant)")
    weight_decay: float = help_field(0.0, "AdamW weight decay")
    adam_beta1: float = help_field(0.9, "AdamW beta1")
    adam_beta2: float = help_field(0.95, "AdamW beta2")
    rollout_batch_size: int = help_field(256, "responses generated per GRPO step (questions x group-size)")
    group_size: int = help_field(8, "responses per question; advantages are normalised within each group")
    train_batch_size: int = help_field(256, "rollouts per optimizer step (smaller than rollout-batch-size: several off-policy steps per rollout batch)")
    gradient_accumulation_steps: int = help_field(128, "microbatches per optimizer step; microbatch = train-batch-size / this")
    epochs_per_rollout_batch: int = help_field(1, "passes over each rollout batch (more than 1 is off-policy: use grpo_clip)")
    sampling_temperature: float = help_field(1.0, "temperature of rollout sampling")
    sampling_min_tokens: int = help_field(4, "minimum tokens of a rollout response (>= 1, so no response is empty)")
    sampling_max_tokens: int = help_field(1024, "token budget of a rollout response (also the constant of sequence_sum_constant)")
    loss_type: Literal["no_baseline", "reinforce_with_baseline", "grpo_clip"] = help_field("reinforce_with_baseline", "policy-gradient loss: no_baseline (raw rewards), reinforce_with_baseline (group-normalised advantages) or grpo_clip (PPO-style clipped ratio)")
    use_std_normalization: bool = help_field(True, "divide advantages by the group's reward std (false: Dr. GRPO's mean-centring only)")
    advantage_eps: float = help_field(1e-6, "added to the group std before dividing")
    cliprange: float | None = help_field(0.2, "epsilon of grpo_clip's ratio clip")
    loss_aggregation: Literal["sequence_mean", "sequence_sum_constant", "token_mean"] = help_field("sequence_mean", "per-token loss to scalar: sequence_mean (GRPO), sequence_sum_constant (Dr. GRPO; constant = sampling-max-tokens) or token_mean (DAPO; over the optimizer step's tokens)")
    kl_coef: float = help_field(0.0, "weight of a per-token k3 KL penalty against the frozen starting model (0: off, no reference model loaded)")
    max_grad_norm: float = help_field(1.0, "clip the global gradient norm to this (0 disables clipping)")
    grading_workers: int | None = help_field(None, "reward grading processes (none: one per CPU; 0: grade in this process)")
    # generation, evaluation, checkpoints
    backend: Literal["hf", "vllm"] = help_field("hf", "generator of rollouts and evaluation: hf (the policy's own generate) or vllm (policy weights loaded before each rollout)")
    generation_batch_size: int = help_field(64, "sequences per generate call (hf backend)")
    vllm_gpu_memory_utilization: float = help_field(0.3, "fraction of the GPU vLLM may take (vllm backend)")
    vllm_device: str | None = help_field(None, "device of the vLLM engine (default: the policy's GPU, with sleep mode between rollouts)")
    eval_every: int = help_field(5, "evaluate on --val-data every N GRPO steps (besides before and after training; 0: only those)")
    eval_examples: int = help_field(1024, "validation examples per evaluation")
    eval_max_new_tokens: int = help_field(1024, "token budget of each evaluation response")
    eval_temperature: float = help_field(0.0, "sampling temperature of evaluation (0: greedy)")
    save_every: int = help_field(0, "write checkpoint-N/ every N GRPO steps (0: only final/)")
    seed: int = help_field(0, "seed of question sampling, rollout sampling and evaluation")
    num_threads: int | None = help_field(None, "torch CPU threads (default: torch's choice)")
    progress: bool = help_field(True, "show a progress bar (step, loss, ETA)")
    write_report: bool = help_field(True, "write report/ (plots and summary page) at the end")

    @property
    def micro_train_batch_size(self) -> int:
        return self.train_batch_size // self.gradient_accumulation_steps

    @property
    def off_policy(self) -> bool:
        """Whether some optimizer step trains on rollouts sampled by an earlier version of the policy."""
        return self.epochs_per_rollout_batch > 1 or self.train_batch_size < self.rollout_batch_size

    def validate(self) -> None:
        """Raises SystemExit naming the options when the batch sizes or loss settings cannot work together."""
        problems = []
        if not self.train_data:
            problems.append("--train-data is required")
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


def load_questions(config: GRPOConfig):
    """Returns (training questions with references, validation examples, data counts)."""
    from reasontune.data import load_examples

    train_set = load_examples(config.train_data, seed=config.seed)
    questions = [e for e in train_set.examples if e.ground_truth is not None]
    if len(questions) < config.rollout_batch_size // config.group_size:
        raise SystemExit(f"error: {config.train_data} has {len(questions)} questions with a reference answer; a rollout "
                         f"batch needs {config.rollout_batch_size // config.group_size} (rollout-batch-size / group-size)")
    validation = []
    if config.val_data:
        validation = [e for e in load_examples(config.val_data, seed=config.seed).examples if e.ground_truth is not None]
        validation = validation[: config.eval_examples] if config.eval_examples else validation
    counts = {"train_records": train_set.total_records, "train_questions": len(questions),
              "validation_examples": len(validation)}
    return questions, validation, counts


def sample_questions(questions: list, count: int, seed: int, step: int) -> list:
    """Returns ``count`` distinct questions, a pure function of the seed and the step."""
    return random.Random(seed * 1_000_003 + step).sample(questions, count)


def rollout_microbatches(prompt_ids: list[list[int]], response_ids: list[list[int]], advantages: torch.Tensor,
                         raw_rewards: torch.Tensor, micro_batch_size: int, pad_token_id: int) -> list[dict]:
    """Returns the rollouts cut into microbatches of ``micro_batch_size`` (in rollout order), each padded to its longest.

    Each dict holds ``input_ids``/``labels``/``response_mask`` (micro, L - 1) from ``pad_and_shift``
    and ``advantages``/``raw_rewards`` (micro,) float32. The response tokens are the sampled ids
    themselves, not a re-tokenisation of the text, so the log-probs are of what was sampled.
    """
    from reasontune.tokenization import pad_and_shift

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
    from reasontune.logprobs import get_response_log_probs

    for mb in microbatches:
        mask = mb["response_mask"].to(device)
        mb[key] = get_response_log_probs(model, mb["input_ids"].to(device), mb["labels"].to(device),
                                         response_mask=mask)["log_probs"]


def rollout_metrics(completions, scores: list[dict]) -> dict[str, float]:
    """Returns mean response lengths (tokens) overall, of correct and of incorrect responses, and finish counts."""
    lengths = [c.num_tokens for c in completions]
    correct = [n for n, s in zip(lengths, scores) if s["answer_reward"] >= 1.0]
    incorrect = [n for n, s in zip(lengths, scores) if s["answer_reward"] < 1.0]
    mean = lambda values: sum(values) / len(values) if values else None  # noqa: E731
    return {"response_length": mean(lengths), "response_length_correct": mean(correct),
            "response_length_incorrect": mean(incorrect),
            "truncated_fraction": sum(c.finish_reason == "length" for c in completions) / len(completions)}


# ---------------------------------------------------------------------------------------------
# One optimizer step


def train_step(model, microbatches: list[dict], config: GRPOConfig, device: torch.device) -> dict[str, float]:
    """Returns the step's metrics after forward and backward of every microbatch (gradients accumulated, no optimizer step).

    Old log-probs: the ones stored per rollout batch when off-policy; on-policy ``grpo_clip``
    uses the current ones detached (ratio 1, so it equals REINFORCE with baseline).
    """
    from reasontune.logprobs import get_response_log_probs
    from reasontune.losses import grpo_microbatch_train_step

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
# The loop


def run_grpo(config: GRPOConfig) -> Path:
    """Returns the run directory after ``config.n_grpo_steps`` GRPO steps on ``config.train_data``.

    The loop: sample questions → generate group-size responses each → grade → group-normalised
    advantages → tokenise → (old / reference log-probs) → epochs × optimizer steps of
    grpo_microbatch_train_step → clip → AdamW → metrics → periodic evaluation → checkpoint.
    Writes config.json, metrics.jsonl, checkpoint-N/, final/, eval/ and report/.
    """
    from reasontune.checkpoint import remove_stale_temporaries, save_checkpoint
    from reasontune.config import save_config
    from reasontune.data import example_prompt, load_template
    from reasontune.evaluation import reward_fn_by_name
    from reasontune.generation import SamplingOptions
    from reasontune.losses import compute_group_normalized_rewards
    from reasontune.modeling import load_model, load_tokenizer
    from reasontune.rewards import grade_batch
    from reasontune.tokenization import pad_token_id_of
    from reasontune.tracking import MetricsLogger, Progress
    from reasontune.training.common import (NonFiniteStep, clip_and_step, eval_metrics, evaluate_policy,
                                            make_generator, prepare_run_dir, seed_and_device, stop_diverged,
                                            trainer_state)

    # --- setup: run dir, seeds, policy (and frozen reference), data, optimizer, generator
    config.validate()
    run_dir = prepare_run_dir(config.output_dir, overwrite=config.overwrite)
    remove_stale_temporaries(run_dir)
    save_config(config, run_dir / "config.json")
    device = seed_and_device(config.seed, config.num_threads, config.device)
    tokenizer = load_tokenizer(config.model)
    model = load_model(config.model, dtype=config.dtype, device=device)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    reference = None
    if config.kl_coef > 0:
        reference = load_model(config.model, dtype=config.dtype, device=device).eval().requires_grad_(False)
    template = load_template(config.prompt_template)
    questions, validation, data_counts = load_questions(config)
    reward_fn = reward_fn_by_name(config.reward)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay,
                                  betas=(config.adam_beta1, config.adam_beta2))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)  # constant, kept for the trainer state
    generator = make_generator(config.backend, model, tokenizer, model_name=config.model, dtype=config.dtype,
                               seed=config.seed, batch_size=config.generation_batch_size, vllm_device=config.vllm_device,
                               vllm_gpu_memory_utilization=config.vllm_gpu_memory_utilization)
    sampling = SamplingOptions(temperature=config.sampling_temperature, max_new_tokens=config.sampling_max_tokens,
                               min_new_tokens=config.sampling_min_tokens, stop=("</answer>",), n=config.group_size)
    prompts_per_step = config.rollout_batch_size // config.group_size
    optimizer_steps_per_epoch = config.rollout_batch_size // config.train_batch_size
    logger = MetricsLogger(run_dir, config=dataclasses.asdict(config))
    logger.log("data", 0, **data_counts, loss_type=config.loss_type, loss_aggregation=config.loss_aggregation,
               off_policy=config.off_policy)
    print(f"GRPO on {config.model}: {config.n_grpo_steps} steps of {prompts_per_step} questions x {config.group_size} "
          f"responses, {optimizer_steps_per_epoch * config.epochs_per_rollout_batch} optimizer step(s) each; loss "
          f"{config.loss_type}, aggregation {config.loss_aggregation}{', off-policy' if config.off_policy else ''}")

    def save(step: int, name: str) -> Path:
        state = trainer_state(step, optimizer, scheduler, plan_fingerprint=f"grpo-seed-{config.seed}")
        return save_checkpoint(run_dir / name, model, tokenizer, state,
                               {"reasontune_config.json": (run_dir / "config.json").read_text()})

    def evaluate_and_log(step: int) -> None:
        summary = evaluate_policy(step, model, generator, validation, template, run_dir, reward=config.reward,
                                  temperature=config.eval_temperature, max_new_tokens=config.eval_max_new_tokens,
                                  seed=config.seed)
        logger.log("eval", step, **eval_metrics(summary, step))
        progress.write(f"step {step}: accuracy {summary['accuracy']:.3f}, format rate {summary['format_rate']:.3f}")

    progress = Progress(config.n_grpo_steps, enabled=config.progress, description="grpo")
    if validation:
        evaluate_and_log(0)
    started = time.perf_counter()
    for step in range(1, config.n_grpo_steps + 1):
        tick = time.perf_counter()
        # --- rollouts: sample questions, generate group_size responses to each with the current policy
        batch = sample_questions(questions, prompts_per_step, config.seed, step)
        prompts = [example_prompt(e, template) for e in batch]
        if hasattr(generator, "load_policy_weights"):
            generator.load_policy_weights(model)  # vLLM; the HF generator samples from the policy object itself
        completions = generator.generate_flat(prompts, sampling.replace(seed=config.seed * 1_000_003 + step))
        if getattr(generator, "enable_sleep_mode", False):
            generator.sleep()
        rollout_seconds = time.perf_counter() - tick
        # --- rewards → group-normalised advantages (graded in parallel, read back in order)
        responses = [c.text for c in completions]
        ground_truths = [e.ground_truth for e in batch for _ in range(config.group_size)]
        scores = grade_batch(responses, ground_truths, reward_fn=reward_fn, workers=config.grading_workers)
        graded = iter(scores)
        advantages, raw_rewards, reward_stats = compute_group_normalized_rewards(
            lambda response, truth: next(graded), responses, ground_truths, config.group_size,
            config.advantage_eps, config.use_std_normalization)
        # --- tokenise; old log-probs once per rollout batch when off-policy, reference log-probs for the KL
        prompt_ids = [ids for ids in tokenizer(prompts, add_special_tokens=True)["input_ids"]
                      for _ in range(config.group_size)]
        microbatches = rollout_microbatches(prompt_ids, [c.token_ids for c in completions], advantages, raw_rewards,
                                            config.micro_train_batch_size, pad_token_id_of(tokenizer))
        if config.off_policy and config.loss_type == "grpo_clip":
            add_log_probs(model, microbatches, "old_log_probs", device)
        if reference is not None:
            add_log_probs(reference, microbatches, "ref_log_probs", device)
        # --- policy-gradient steps: epochs × train batches, each accumulated over its microbatches
        model.train()
        step_metrics = []
        for epoch in range(config.epochs_per_rollout_batch):
            for k in range(optimizer_steps_per_epoch):
                train_batch = microbatches[k * config.gradient_accumulation_steps:(k + 1) * config.gradient_accumulation_steps]
                metrics = train_step(model, train_batch, config, device)
                try:
                    grad_norm = clip_and_step(model, optimizer, scheduler, config.max_grad_norm, metrics["loss"])
                except NonFiniteStep as problem:
                    path = save(step - 1, f"checkpoint-{step - 1}")
                    message = (f"{problem} at GRPO step {step}; stopped. The weights after step {step - 1} are in "
                               f"{path}; lower --learning-rate")
                    stop_diverged(message, step, logger, progress)
                step_metrics.append({**metrics, "grad_norm": grad_norm})
        # --- log (means over the step's optimizer steps; rewards and lengths of the rollouts)
        mean = {key: sum(m[key] for m in step_metrics) / len(step_metrics)
                for key in ("loss", "grad_norm", "token_entropy", "clip_fraction", "kl")}
        logger.log("train", step, lr=scheduler.get_last_lr()[0], **mean, optimizer_steps=len(step_metrics),
                   reward=reward_stats["reward_mean"], reward_std=reward_stats["reward_std"],
                   format_reward=reward_stats.get("format_reward_mean"),
                   answer_reward=reward_stats.get("answer_reward_mean"), **rollout_metrics(completions, scores),
                   rollout_s=rollout_seconds, step_s=time.perf_counter() - tick, elapsed_s=time.perf_counter() - started)
        progress.update(step, loss=mean["loss"])
        # --- evaluate
        if validation and config.eval_every and step % config.eval_every == 0 and step != config.n_grpo_steps:
            evaluate_and_log(step)
        # --- checkpoint
        if config.save_every and step % config.save_every == 0 and step != config.n_grpo_steps:
            save(step, f"checkpoint-{step}")
    progress.close()

    # --- final weights, final evaluation, report
    save(config.n_grpo_steps, "final")
    if validation:
        evaluate_and_log(config.n_grpo_steps)
    logger.close()
    if config.write_report:
        from reasontune.report import write_report

        print(f"report: {write_report(run_dir) / 'index.html'}")
    print(f"run directory: {run_dir}")
    return run_dir


# ---------------------------------------------------------------------------------------------
# The demo's GRPO stage


def demo_grpo_config(sft_run_dir: Path, data_dir: Path, output_dir: Path, seed: int = 0, num_threads: int | None = None,
                     max_new_tokens: int = 48, progress: bool = True) -> GRPOConfig:
    """Returns the GRPOConfig that continues the demo's (under-trained) SFT run with GRPO on the arithmetic task.

    ``sft_run_dir/final`` is the starting policy; ``data_dir`` holds the demo's ``train.jsonl``
    (questions with references; their SFT responses are ignored) and ``val.jsonl`` (held-out,
    evaluated greedily before, every few steps and after). ``max_new_tokens`` is the demo's
    generation budget (``demo_max_new_tokens``: 48 for 3-digit operands).

    NOT YET TUNED to the demo's goal (+15 points of held-out greedy accuracy in minutes). From a
    13.7% SFT checkpoint on a contended 2-core CPU (30 steps of 16 questions x 8, ~6 s a step):
    lr 2e-4 and 5e-4 collapsed the reward to 0 within 4 steps, 3e-5 drifted down (13.7 -> 8.2%),
    1e-5 rose slightly (13.7 -> 17.6% after 30 steps, 3.5 min). Next to try: a 30-60% start, group size
    16, temperature 0.7 to make successes less rare, more steps.
    """
    from reasontune.demo import DEMO_TEMPLATE_PATH

    data_dir = Path(data_dir)
    return GRPOConfig(
        model=str(Path(sft_run_dir) / "final"), train_data=str(data_dir / "train.jsonl"),
        val_data=str(data_dir / "val.jsonl"), prompt_template=str(DEMO_TEMPLATE_PATH), reward="r1_zero",
        # The demo regenerates its data and models on every run, so its GRPO run starts afresh too.
        output_dir=str(output_dir), overwrite=True, dtype="float32", device="cpu",
        n_grpo_steps=30, learning_rate=1e-5, rollout_batch_size=128, group_size=8, train_batch_size=128,
        gradient_accumulation_steps=1, epochs_per_rollout_batch=1, sampling_temperature=1.0,
        sampling_min_tokens=1, sampling_max_tokens=max_new_tokens, loss_type="reinforce_with_baseline",
        use_std_normalization=True, loss_aggregation="sequence_mean", kl_coef=0.0, max_grad_norm=1.0,
        # Integer answers grade in microseconds: worker processes would only compete for the CPU.
        grading_workers=0, backend="hf", generation_batch_size=256,
        eval_every=10, eval_examples=256, eval_max_new_tokens=max_new_tokens, eval_temperature=0.0,
        save_every=0, seed=seed, num_threads=num_threads, progress=progress, write_report=True,
    )
