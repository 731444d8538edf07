"""Expert iteration: sample responses from the current policy, keep the correct ones, SFT on them, repeat.

Each EI step draws a seeded batch of questions, samples ``samples_per_question`` responses to
each with the generator on the current policy, grades them against the references, keeps
exactly the responses with answer reward 1, and fine-tunes the policy on those with the SFT
loop of ``reasontune.training.sft`` (``run_sft`` on ``ei-step-N/data.jsonl``, run directory
``ei-step-N/sft``, whose ``final/`` becomes the next policy). The SFT loop, its loss and its
gradient-accumulation scaling therefore exist once, in ``sft.py``.

The run directory holds config.json, metrics.jsonl (``train``: one line per EI step;
``eval``: held-out accuracy, step 0 before any EI step), ``ei-step-N/`` (rollouts.jsonl with
every graded sample, data.jsonl with the kept ones, sft/ with the SFT run), ``eval/step-N/``
(records.jsonl and summary.json as ``reasontune eval`` writes them), ``final`` (a copy of the
last policy) and report/.
"""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
import statistics
import time
from pathlib import Path
from typing import Any, Literal, Sequence

import torch

from reasontune.config import help_field


@dataclasses.dataclass
class ExpertIterationConfig:
    """Options of ``reasontune ei``."""

    # data and model
    model: str = help_field("Qwen/Qwen2.5-Math-1.5B", "hub name or local directory of the starting policy (with its tokenizer)")
    train_data: str = help_field("", "questions with reference answers to sample from: JSONL of {prompt, ground_truth}, {question, answer}, GSM8K/MATH, ...")
    val_data: str | None = help_field(None, "held-out questions with references, evaluated before the first and after every EI step (none: no evaluation)")
    prompt_template: str = help_field("r1_zero", "template for data without a prompt field: r1_zero, question_only or a file with {question}")
    reward: Literal["r1_zero", "question_only"] = help_field("r1_zero", "reward function: r1_zero (<think>…</think> <answer>…</answer>) or question_only (last \\boxed{})")
    output_dir: str = help_field("runs/ei", "run directory: config.json, metrics.jsonl, ei-step-N/, eval/, final/, report/")
    overwrite: bool = help_field(False, "start afresh in an --output-dir that already holds a run (its files are replaced)")
    # expert iteration
    n_ei_steps: int = help_field(5, "expert-iteration steps (sample → grade → keep correct → SFT)")
    questions_per_step: int = help_field(512, "questions sampled (seeded, without replacement) from the training data per EI step")
    samples_per_question: int = help_field(4, "responses sampled per question (G)")
    sampling_temperature: float = help_field(1.0, "temperature of the rollouts")
    sampling_top_p: float = help_field(1.0, "nucleus-sampling threshold of the rollouts")
    sampling_min_tokens: int = help_field(4, "no EOS or stop string before this many tokens (>= 1, so no response is empty)")
    sampling_max_tokens: int = help_field(1024, "token budget of each sampled response")
    # SFT on the kept responses (each EI step is one run of reasontune.training.sft)
    sft_epochs: int = help_field(1, "SFT epochs over each step's kept responses (E)")
    learning_rate: float = help_field(1e-5, "peak AdamW learning rate of each step's SFT")
    batch_size: int = help_field(4, "examples per SFT microbatch")
    gradient_accumulation_steps: int = help_field(8, "SFT microbatches per optimizer step")
    max_length: int | None = help_field(1024, "truncate prompt+response to this many tokens in SFT")
    loss_normalization: Literal["constant", "token_mean"] = help_field("constant", "SFT loss normalisation (see reasontune sft --help)")
    lr_scheduler: Literal["cosine", "linear", "constant"] = help_field("constant", "SFT learning-rate decay after warmup, within each EI step")
    warmup_ratio: float = help_field(0.0, "fraction of each step's SFT steps spent warming up")
    weight_decay: float = help_field(0.0, "AdamW weight decay")
    max_grad_norm: float = help_field(1.0, "clip the global gradient norm to this (0 disables clipping)")
    gradient_checkpointing: bool = help_field(False, "recompute activations in backward to save memory")
    # evaluation and run
    eval_examples: int = help_field(256, "held-out examples per evaluation (0: no evaluation)")
    eval_max_new_tokens: int = help_field(1024, "token budget of each evaluation response (greedy)")
    generation_batch_size: int = help_field(64, "sequences per generate call (hf backend)")
    grading_workers: int | None = help_field(None, "grading worker processes (0: grade in this process; none: the grader's choice)")
    seed: int = help_field(0, "seed of question batches, sampling and SFT data order")
    dtype: Literal["float32", "bfloat16", "float16"] = help_field("float32", "parameter dtype (bfloat16 on a GPU)")
    device: str | None = help_field(None, "torch device (default: cuda when available, else cpu)")
    backend: Literal["hf", "vllm"] = help_field("hf", "generator of rollouts and evaluation: hf (model.generate) or vllm (policy weights loaded into it)")
    vllm_gpu_memory_utilization: float = help_field(0.3, "fraction of the GPU vLLM may take (vllm backend)")
    num_threads: int | None = help_field(None, "torch CPU threads (default: torch's choice)")
    progress: bool = help_field(True, "show the SFT progress bars")
    write_report: bool = help_field(True, "write report/ (plots and summary page) at the end")

    def validate(self) -> None:
        """Raises SystemExit naming the option when a value cannot work."""
        problems = []
        if not self.train_data:
            problems.append("--train-data is required")
        if self.n_ei_steps < 1 or self.questions_per_step < 1 or self.samples_per_question < 1 or self.sft_epochs < 1:
            problems.append("--n-ei-steps, --questions-per-step, --samples-per-question and --sft-epochs must be >= 1")
        if not 1 <= self.sampling_min_tokens <= self.sampling_max_tokens:
            problems.append("need 1 <= --sampling-min-tokens <= --sampling-max-tokens")
        if self.sampling_temperature <= 0:
            problems.append("--sampling-temperature must be > 0 (expert iteration needs diverse samples)")
        if self.batch_size < 1 or self.gradient_accumulation_steps < 1:
            problems.append("--batch-size and --gradient-accumulation-steps must be >= 1")
        if problems:
            raise SystemExit("error: " + "; ".join(problems))


# ---------------------------------------------------------------------------------------------
# Pure pieces: question batches, the filter, step statistics


def sample_question_batch(n_questions: int, batch_size: int, seed: int, step: int) -> list[int]:
    """Returns the indices of EI step ``step``'s questions: ``min(batch_size, n_questions)`` distinct, seeded by (seed, step)."""
    rng = random.Random(seed * 1_000_003 + step)
    return rng.sample(range(n_questions), min(batch_size, n_questions))


def keep_correct(prompts: Sequence[str], ground_truths: Sequence[Any], completions: Sequence[Sequence[Any]],
                 rewards: Sequence[dict[str, float]]) -> list[dict[str, Any]]:
    """Returns the SFT records ``{prompt, response, ground_truth}`` of exactly the samples with answer reward 1.

    ``completions[i]`` holds prompt i's samples (objects with ``.text``) and ``rewards`` one
    reward dict per sample, prompt-major (prompt 0's samples, then prompt 1's, …). Order is
    kept; duplicate correct responses to one prompt are kept as sampled (each was drawn).
    """
    flat = [(prompt, truth, completion) for prompt, truth, group in zip(prompts, ground_truths, completions)
            for completion in group]
    if len(flat) != len(rewards):
        raise ValueError(f"{len(rewards)} rewards for {len(flat)} samples")
    return [{"prompt": prompt, "response": completion.text, "ground_truth": truth}
            for (prompt, truth, completion), reward in zip(flat, rewards) if reward["answer_reward"] >= 1.0]


def rollout_statistics(completions: Sequence[Sequence[Any]], rewards: Sequence[dict[str, float]]) -> dict[str, Any]:
    """Returns the rollouts' accuracy, format rate, token-weighted mean entropy and response lengths (tokens)."""
    flat = [completion for group in completions for completion in group]
    correct = [c.num_tokens for c, r in zip(flat, rewards) if r["answer_reward"] >= 1.0]
    incorrect = [c.num_tokens for c, r in zip(flat, rewards) if r["answer_reward"] < 1.0]
    starts = [sum(len(g) for g in completions[:i]) for i in range(len(completions))]
    with_entropy = [c for c in flat if c.entropies]
    entropy_tokens = sum(len(c.entropies) for c in with_entropy)

    def mean(values):
        return statistics.fmean(values) if values else None

    return {
        "samples": len(flat),
        "sample_accuracy": mean([r["answer_reward"] for r in rewards]),
        "sample_format_rate": mean([r["format_reward"] for r in rewards]),
        "questions_solved": sum(any(r["answer_reward"] >= 1.0 for r in rewards[start:start + len(group)])
                                for start, group in zip(starts, completions)),
        "token_entropy": sum(sum(c.entropies) for c in with_entropy) / entropy_tokens if entropy_tokens else None,
        "mean_response_tokens": mean([c.num_tokens for c in flat]),
        "mean_response_tokens_correct": mean(correct),
        "mean_response_tokens_incorrect": mean(incorrect),
    }


def rollout_records(prompts: Sequence[str], ground_truths: Sequence[Any], completions: Sequence[Sequence[Any]],
                    rewards: Sequence[dict[str, float]]) -> list[dict[str, Any]]:
    """Returns one record per sample (prompt-major): index, sample, prompt, response, ground truth, rewards, tokens."""
    flat_rewards = iter(rewards)
    records = []
    for index, (prompt, truth, group) in enumerate(zip(prompts, ground_truths, completions)):
        for sample, completion in enumerate(group):
            reward = next(flat_rewards)
            records.append({"index": index, "sample": sample, "prompt": prompt, "response": completion.text,
                            "ground_truth": truth, "format_reward": reward["format_reward"],
                            "answer_reward": reward["answer_reward"], "reward": reward["reward"],
                            "response_tokens": completion.num_tokens, "finish_reason": completion.finish_reason})
    return records


def write_jsonl(records: Sequence[dict[str, Any]], path: Path) -> Path:
    """Writes one JSON object a line; returns ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


# ---------------------------------------------------------------------------------------------
# Edges: run directory, generator, SFT of one step, evaluation


def sft_config_for_step(config: ExpertIterationConfig, policy: str, data_path: Path, output_dir: Path, step: int):
    """Returns the ``SFTConfig`` that fine-tunes ``policy`` on one EI step's kept responses (no evaluation inside)."""
    from reasontune.training.sft import SFTConfig

    return SFTConfig(
        train_data=str(data_path), val_data=None, val_fraction=0.0, reward=config.reward,
        prompt_template=config.prompt_template, model=policy, output_dir=str(output_dir), overwrite=True,
        dtype=config.dtype, device=config.device, gradient_checkpointing=config.gradient_checkpointing,
        num_epochs=config.sft_epochs, batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps, learning_rate=config.learning_rate,
        weight_decay=config.weight_decay, max_grad_norm=config.max_grad_norm, lr_scheduler=config.lr_scheduler,
        warmup_ratio=config.warmup_ratio, max_length=config.max_length, loss_normalization=config.loss_normalization,
        seed=config.seed * 1_000_003 + step, eval_examples=0, eval_before_training=False,
        progress=config.progress, write_report=False, num_threads=config.num_threads,
    )


def last_train_metrics(run_dir: Path) -> dict[str, Any]:
    """Returns the last ``train`` line of ``run_dir/metrics.jsonl`` (its ``step`` is the number of SFT steps)."""
    last: dict[str, Any] = {}
    with (run_dir / "metrics.jsonl").open(encoding="utf-8") as handle:
        for line in handle:
            record = json.loads(line)
            if record.get("kind") == "train":
                last = record
    return last


class Policy:
    """The current policy for rollouts and evaluation: a model loaded from a directory and a generator on it.

    ``load`` swaps in the weights of a new directory (HF: a generator on the new model; vLLM: one
    engine for the run, the new weights pushed into it); ``release`` frees the in-loop model and
    puts the vLLM engine to sleep, so that each step's SFT has the memory to itself.
    """

    def __init__(self, config: ExpertIterationConfig, device: torch.device):
        self.config = config
        self.device = device
        self.model = None
        self.generator = None

    def load(self, directory: str):
        """Returns the generator of the policy saved in ``directory``."""
        from reasontune.modeling import load_model, load_tokenizer
        from reasontune.training.common import make_generator

        self.release()
        self.model = load_model(directory, dtype=self.config.dtype, device=self.device)
        if self.config.backend == "hf" or self.generator is None:
            self.generator = make_generator(self.config.backend, self.model, load_tokenizer(directory),
                                            model_name=directory, dtype=self.config.dtype, seed=self.config.seed,
                                            batch_size=self.config.generation_batch_size,
                                            vllm_gpu_memory_utilization=self.config.vllm_gpu_memory_utilization)
        if hasattr(self.generator, "load_policy_weights"):
            self.generator.load_policy_weights(self.model)
        return self.generator

    def release(self) -> None:
        self.model = None
        if getattr(self.generator, "enable_sleep_mode", False):
            self.generator.sleep()
        elif self.config.backend == "hf":
            self.generator = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# The loop


def run_expert_iteration(config: ExpertIterationConfig) -> Path:
    """Returns the run directory after ``n_ei_steps`` of expert iteration starting from ``config.model``.

    The loop: question batch → G samples each from the current policy → grade → keep the
    correct ones → SFT on them (``run_sft``; skipped when none is correct) → metrics → held-out
    evaluation. Writes config.json, metrics.jsonl, ei-step-N/, eval/, final/ and report/.
    """
    from reasontune.config import save_config
    from reasontune.data import example_prompt, load_examples, load_template
    from reasontune.evaluation import grade, reward_fn_by_name
    from reasontune.generation import SamplingOptions
    from reasontune.tracking import MetricsLogger
    from reasontune.training.common import eval_metrics, evaluate_policy, prepare_run_dir, seed_and_device
    from reasontune.training.sft import run_sft

    # --- setup: run dir, seeds, data, policy
    config.validate()
    run_dir = prepare_run_dir(config.output_dir, overwrite=config.overwrite)
    save_config(config, run_dir / "config.json")
    device = seed_and_device(config.seed, config.num_threads, config.device)
    template = load_template(config.prompt_template)
    reward_fn = reward_fn_by_name(config.reward)
    train_set = load_examples(config.train_data, seed=config.seed)
    questions = [e for e in train_set.examples if e.ground_truth is not None]
    if not questions:
        raise SystemExit(f"error: {config.train_data} holds no example with a reference answer to grade against")
    validation = []
    if config.val_data and config.eval_examples:
        validation = [e for e in load_examples(config.val_data, seed=config.seed).examples
                      if e.ground_truth is not None][: config.eval_examples]
    rollout_options = SamplingOptions(
        temperature=config.sampling_temperature, top_p=config.sampling_top_p, max_new_tokens=config.sampling_max_tokens,
        min_new_tokens=config.sampling_min_tokens, stop=("</answer>",) if config.reward == "r1_zero" else (),
        n=config.samples_per_question, return_entropy=config.backend == "hf")
    logger = MetricsLogger(run_dir, config=dataclasses.asdict(config))
    logger.log("data", 0, train_records=train_set.total_records, train_skipped_bad=train_set.n_skipped,
               questions=len(questions), validation_examples=len(validation))
    policy = config.model
    current = Policy(config, device)
    generator = current.load(policy)

    def evaluate_and_log(step: int) -> None:
        summary = evaluate_policy(step, current.model, generator, validation, template, run_dir, reward=config.reward,
                                  temperature=0.0, max_new_tokens=config.eval_max_new_tokens, seed=config.seed)
        logger.log("eval", step, **eval_metrics(summary, step))
        print(f"EI step {step}: held-out accuracy {summary['accuracy']:.3f}, format rate {summary['format_rate']:.3f}",
              flush=True)

    if validation:
        evaluate_and_log(0)
    started = time.perf_counter()
    for step in range(1, config.n_ei_steps + 1):
        step_dir = run_dir / f"ei-step-{step}"
        tick = time.perf_counter()
        # --- question batch
        batch = [questions[i] for i in sample_question_batch(len(questions), config.questions_per_step, config.seed, step)]
        prompts = [example_prompt(e, template) for e in batch]
        ground_truths = [e.ground_truth for e in batch]
        # --- rollouts from the current policy (sampling seeded per step, so a step's samples are reproducible)
        completions = generator.generate(prompts, rollout_options.replace(seed=config.seed * 1_000_003 + step))
        rollout_seconds = time.perf_counter() - tick
        # --- grade and keep exactly the correct samples
        rewards = grade([c.text for group in completions for c in group],
                        [truth for truth, group in zip(ground_truths, completions) for _ in group], reward_fn,
                        workers=config.grading_workers)
        kept = keep_correct(prompts, ground_truths, completions, rewards)
        rollout = rollout_statistics(completions, rewards)
        write_jsonl(rollout_records(prompts, ground_truths, completions, rewards), step_dir / "rollouts.jsonl")
        data_path = write_jsonl(kept, step_dir / "data.jsonl")
        # --- SFT on the kept samples: the SFT loop of sft.py, whose final/ becomes the next policy
        sft_metrics: dict[str, Any] = {}
        if kept:
            current.release()  # SFT loads the policy itself
            sft_dir = run_sft(sft_config_for_step(config, policy, data_path, step_dir / "sft", step))
            sft_metrics = last_train_metrics(Path(sft_dir))
            policy = str(Path(sft_dir) / "final")
            generator = current.load(policy)
        else:
            logger.log("event", step, message=f"EI step {step}: no correct sample among {rollout['samples']}; SFT skipped, policy unchanged")
            print(f"EI step {step}: no correct sample among {rollout['samples']}; SFT skipped", flush=True)
        # --- log
        logger.log("train", step, loss=sft_metrics.get("loss"), lr=config.learning_rate if kept else None,
                   grad_norm=sft_metrics.get("grad_norm"), sft_steps=sft_metrics.get("step", 0), kept=len(kept),
                   **rollout, policy=policy, rollout_seconds=rollout_seconds,
                   step_seconds=time.perf_counter() - tick, elapsed_s=time.perf_counter() - started)
        entropy = "n/a" if rollout["token_entropy"] is None else f"{rollout['token_entropy']:.3f}"
        print(f"EI step {step}: kept {len(kept)} of {rollout['samples']} samples "
              f"(sample accuracy {rollout['sample_accuracy']:.3f}, token entropy {entropy})", flush=True)
        # --- evaluate
        if validation:
            evaluate_and_log(step)

    # --- final policy, report
    current.release()
    if Path(policy).is_dir():  # the last SFT's final/ (or the starting model when no step kept anything)
        shutil.copytree(policy, run_dir / "final", ignore=shutil.ignore_patterns("trainer_state.pt"))
    logger.close()
    if config.write_report:
        from reasontune.report import write_report

        print(f"report: {write_report(run_dir) / 'index.html'}")
    print(f"run directory: {run_dir}")
    return run_dir
