"""Expert iteration: sample responses from the current policy, keep the correct ones, SFT on them, repeat.

Each EI step draws a seeded batch of questions, samples ``group_size`` responses to each with
the generator on the current policy, grades them against the references, keeps exactly the
responses with answer reward 1 (``Rollouts.correct``), and fine-tunes the policy on those with
the SFT loop of ``reasontune.training.sft``, in memory, on the model it already holds (a
fresh optimizer per EI step, as in the SFT of each step of the original recipe). The SFT loop,
its loss and its gradient-accumulation scaling therefore exist once, in ``sft.py``.

``setup_expert_iteration(config)`` returns the objects; ``train_expert_iteration(session)`` is
the loop. The run directory holds config.json, metrics.jsonl (``train``: one line per EI step;
``eval``: held-out accuracy, step 0 before any EI step), ``ei-step-N/rollouts.jsonl`` (every
graded sample), ``eval/step-N/``, ``checkpoint-N/`` (with --save-every), ``final/`` and report/.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, ClassVar, Literal

from reasontune import distributed, launch
from reasontune.checkpoint import restore_training_state, save_training_checkpoint, trainer_state
from reasontune.config import check_config, help_field, resume_command, same_field
from reasontune.data import Example, load_template
from reasontune.losses import LossAggregation
from reasontune.options import (CheckpointOptions, InLoopEvaluationOptions, OptimizerOptions, RolloutOptions,
                                ToolOptions, TrainerOptions)
from reasontune.rollouts import reward_fn_by_name, write_jsonl
from reasontune.run_layout import FINAL_DIR, checkpoint_name, ei_rollouts_file
from reasontune.training.data_parallel import (SINGLE_PROCESS, generation_model, refuse_what_torchrun_cannot_run,
                                               shard_policy, sharded_rollouts, unsharded_replica)
from reasontune.training.in_loop_eval import evaluation_sampling, evaluation_sets, log_evaluation
from reasontune.training.policy_sampling import (TOOL_METRICS, PolicySession, load_questions, question_batch,
                                                 rollout_environment, rollout_sampling, step_seed)
from reasontune.training.run_setup import finish_run, load_policy, log_resumed, make_generator, make_logger, start_run
from reasontune.training.sft import SFTConfig, prepare_session, train_sft
from reasontune.training.stop_signals import stop_for_signal


@dataclasses.dataclass
class ExpertIterationConfig(RolloutOptions, ToolOptions, TrainerOptions):
    """Options of ``reasontune ei``."""

    command: ClassVar[str] = "ei"

    output_dir: str = same_field(CheckpointOptions, "output_dir", "runs/ei")
    learning_rate: float = same_field(OptimizerOptions, "learning_rate", 1e-5)
    group_size: int = same_field(RolloutOptions, "group_size", 4)
    eval_every: int = same_field(InLoopEvaluationOptions, "eval_every", 1)
    # expert iteration
    n_ei_steps: int = help_field(5, "expert-iteration steps (sample → grade → keep correct → SFT)", group="expert iteration")
    questions_per_step: int = help_field(512, "questions sampled (seeded, without replacement) from the training data per EI step", group="expert iteration")
    # SFT on the kept responses (each EI step runs the SFT loop of reasontune.training.sft)
    sft_epochs: int = help_field(1, "SFT epochs over each step's kept responses (E)", group="expert iteration")
    batch_size: int = help_field(4, "examples per SFT microbatch", group="expert iteration")
    gradient_accumulation_steps: int = help_field(8, "SFT microbatches per optimizer step", group="expert iteration")
    max_length: int | None = help_field(1024, "truncate prompt+response to this many tokens in SFT", group="expert iteration")
    loss_aggregation: LossAggregation = help_field("sequence_sum", "SFT loss aggregation (see reasontune sft --help)", group="expert iteration")
    lr_scheduler: Literal["cosine", "linear", "constant"] = help_field("constant", "SFT learning-rate decay after warmup, within each EI step", group="expert iteration")
    warmup_ratio: float = help_field(0.0, "fraction of each step's SFT steps spent warming up", group="expert iteration")

    @property
    def planned_steps(self) -> int:
        """Returns the EI steps the run trains: ``n_ei_steps``."""
        return self.n_ei_steps

    def launch_sizes(self, world_size: int) -> dict[str, int]:
        """Returns the sizes config.json records of a launch on ``world_size`` ranks."""
        return {"questions_per_step": self.questions_per_step,
                "sft_global_batch": world_size * self.batch_size * self.gradient_accumulation_steps}

    def problems(self) -> list[str]:
        """Returns what is wrong with the EI options themselves (the shared groups check theirs: ``config.value_problems``)."""
        problems = []
        for flag, value in (("--n-ei-steps", self.n_ei_steps), ("--questions-per-step", self.questions_per_step),
                            ("--sft-epochs", self.sft_epochs), ("--batch-size", self.batch_size),
                            ("--gradient-accumulation-steps", self.gradient_accumulation_steps)):
            if value < 1:
                problems.append(f"{flag}: must be >= 1, got {value}")
        if self.max_length is not None and self.max_length < 2:
            problems.append(f"--max-length: must be at least 2, got {self.max_length}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            problems.append(f"--warmup-ratio: must be in [0, 1), got {self.warmup_ratio:g}")
        return problems


def sft_config_for_step(config: ExpertIterationConfig, step: int) -> SFTConfig:
    """Returns the ``SFTConfig`` of one EI step's SFT phase on its kept responses (in memory: no run directory, no evaluation)."""
    return SFTConfig(
        train_data="(kept responses)", reward=config.reward, prompt_template=config.prompt_template,
        model=config.model, dtype=config.dtype, device=config.device, gradient_checkpointing=config.gradient_checkpointing,
        num_epochs=config.sft_epochs, batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps, learning_rate=config.learning_rate,
        weight_decay=config.weight_decay, adam_beta1=config.adam_beta1, adam_beta2=config.adam_beta2,
        max_grad_norm=config.max_grad_norm, lr_scheduler=config.lr_scheduler, warmup_ratio=config.warmup_ratio,
        max_length=config.max_length, loss_aggregation=config.loss_aggregation,
        seed=step_seed(config.seed, step), eval_examples=0, progress=config.progress, write_report=False,
    )


@dataclasses.dataclass
class ExpertIterationSession(PolicySession):
    """Every object the EI loop needs (``setup_expert_iteration`` builds it): the policy session and where to start."""

    start_step: int = 0


def setup_expert_iteration(config: ExpertIterationConfig, ctx: distributed.DistributedContext | None = None
                           ) -> ExpertIterationSession:
    """Returns the session of ``reasontune ei``: run directory, policy (from the newest checkpoint on --resume), data, generator, logger.

    Under torchrun (``ctx`` of world size > 1) the policy is sharded with FSDP2 and the HF
    generator samples from an unsharded replica refreshed before each use; rank 0 alone writes.
    """
    check_config(config, environment=False)
    ctx = ctx or SINGLE_PROCESS
    refuse_what_torchrun_cannot_run(config, ctx)
    environment = rollout_environment(config)
    run_dir, device, checkpoint, stop = start_run(config, ctx)
    model, tokenizer = load_policy(config, device, weights=checkpoint)
    questions, validation, data_counts = load_questions(config, tokenizer=tokenizer)
    replica = unsharded_replica(model, config, ctx)
    model = shard_policy(model, config, ctx)
    session = ExpertIterationSession(
        config=config, model=model, tokenizer=tokenizer, device=device,
        generator=make_generator(config, replica.model if replica else model, tokenizer, device), questions=questions,
        validation=evaluation_sets(config, validation, load_template(config.prompt_template)),
        template=load_template(config.prompt_template), reward_fn=reward_fn_by_name(config.reward_name),
        rollouts=rollout_sampling(config, config.reward_name, load_template(config.prompt_template), return_entropy=config.backend == "hf"), run_dir=run_dir,
        logger=make_logger(run_dir, config, resume=checkpoint is not None) if ctx.is_main else None, stop=stop,
        ctx=ctx, replica=replica, environment=environment)
    if checkpoint is not None:
        # EI keeps no optimizer across steps (each step's SFT starts a fresh one): weights, RNG and step come back.
        session.start_step = restore_training_state(checkpoint, None, None, ctx=ctx)["step"]
        log_resumed(session.logger, checkpoint, session.start_step)
    elif session.logger is not None:
        session.logger.log("data", 0, **data_counts)
    if ctx.is_distributed and ctx.is_main:
        print(f"{ctx.world_size} ranks: each samples its share of {config.questions_per_step} questions a step; "
              f"SFT global batch {ctx.world_size * config.batch_size * config.gradient_accumulation_steps} = "
              f"{ctx.world_size} ranks x --batch-size {config.batch_size} x {config.gradient_accumulation_steps} "
              "accumulation")
    return session


# ---------------------------------------------------------------------------------------------
# The loop


def train_expert_iteration(session: ExpertIterationSession) -> Path:
    """Returns the run directory after EI steps ``start_step + 1 … n_ei_steps``.

    The loop: question batch → G samples each from the current policy → grade → keep the
    correct ones → SFT on them in memory (skipped when none is correct) → metrics → held-out
    evaluation → checkpoint.
    """
    config, model, logger, run_dir = session.config, session.model, session.logger, session.run_dir
    ctx = session.ctx
    eval_sampling = evaluation_sampling(config, config.backend)

    def evaluate_and_log(step: int) -> None:
        log_evaluation(session, step, eval_sampling)

    def save(step: int, name: str) -> Path:
        state = trainer_state(step, None, None, f"ei-seed-{config.seed}")
        return save_training_checkpoint(run_dir, name, model, session.tokenizer, state, keep=config.save_total_limit,
                                        ctx=ctx)

    if session.validation and config.eval_before_training and session.start_step == 0:
        evaluate_and_log(0)
    started = time.perf_counter()
    for step in range(session.start_step + 1, config.n_ei_steps + 1):
        tick = time.perf_counter()
        # --- question batch and rollouts from the current policy (sampling seeded per step: reproducible)
        batch = [session.questions[i] for i in question_batch(len(session.questions), config.questions_per_step,
                                                               config.seed, step)]
        # Under torchrun each rank samples its slice of the questions; every rank gets all the rollouts back.
        session.generator.sync_weights(generation_model(model, session.replica))
        rollouts = sharded_rollouts(session.generator, batch, session.template,
                                    session.rollouts.replace(seed=step_seed(config.seed, step)), session.reward_fn,
                                    ctx, grading_workers=config.grading_workers, environment=session.environment)
        session.generator.sleep()
        rollout_seconds = time.perf_counter() - tick
        if ctx.is_main:
            write_jsonl(rollouts.records(), ei_rollouts_file(run_dir, step))
        # --- keep exactly the correct samples; SFT on them in memory (the SFT loop of sft.py)
        kept = [Example(question="", prompt=r["prompt"], response=r["response"], ground_truth=r["ground_truth"],
                        source=f"ei-step-{step}", line=i + 1) for i, r in enumerate(rollouts.correct())]
        sft_history: list[dict[str, Any]] = []
        if kept:
            sft = prepare_session(sft_config_for_step(config, step), model, session.tokenizer, kept, session.device,
                                  session.template, ctx.world_size)
            sft.ctx = ctx
            sft_history = train_sft(sft)
        elif logger is not None:
            message = f"EI step {step}: no correct sample among {rollouts.summary()['n_samples']}; SFT skipped, policy unchanged"
            logger.log("event", step, message=message)
            print(message, flush=True)
        # --- log
        summary = rollouts.summary()
        last = sft_history[-1] if sft_history else {}
        if logger is not None and (step % config.log_every == 0 or step == config.n_ei_steps):
            logger.log("train", step, loss=last.get("loss"), mean_token_nll=last.get("mean_token_nll"),
                       lr=config.learning_rate if kept else None,
                       grad_norm=last.get("grad_norm"), sft_steps=len(sft_history), kept=len(kept),
                       samples=summary["n_samples"], accuracy=summary["accuracy"], format_rate=summary["format_rate"],
                       pass_at_n=summary["pass_at_n"], token_entropy=summary["mean_entropy"],
                       mean_response_tokens=summary["mean_response_tokens"],
                       mean_response_tokens_correct=summary["mean_response_tokens_correct"],
                       mean_response_tokens_incorrect=summary["mean_response_tokens_incorrect"],
                       **{key: summary[key] for key in TOOL_METRICS if key in summary},
                       rollout_s=rollout_seconds, step_s=time.perf_counter() - tick,
                       elapsed_s=time.perf_counter() - started)
        entropy = "n/a" if summary["mean_entropy"] is None else f"{summary['mean_entropy']:.3f}"
        if ctx.is_main:
            print(f"EI step {step}: kept {len(kept)} of {summary['n_samples']} samples "
                  f"(sample accuracy {summary['accuracy']:.3f}, token entropy {entropy})", flush=True)
        # --- evaluate
        if session.validation and config.eval_every and (step % config.eval_every == 0 or step == config.n_ei_steps):
            evaluate_and_log(step)
        # --- checkpoint
        if config.save_every and step % config.save_every == 0 and step != config.n_ei_steps:
            save(step, checkpoint_name(step))
        if session.stop.requested(ctx) and step < config.n_ei_steps:  # SIGINT/SIGTERM: saved, exit 130
            stop_for_signal(session.stop, resume_command(config.command, config), step, save, logger, None)

    # --- final policy, report
    save(config.n_ei_steps, FINAL_DIR)
    session.generator.close()
    return finish_run(run_dir, logger, session.stop, config.write_report)


def run_expert_iteration(config: ExpertIterationConfig) -> Path:
    """Returns the run directory after ``config.n_ei_steps`` of expert iteration from ``config.model`` (``setup_expert_iteration`` then ``train_expert_iteration``).

    Under ``torchrun --nproc_per_node N -m reasontune ei …``: questions sharded over ranks for
    sampling, the kept responses gathered on every rank, their SFT data-parallel with FSDP2.
    """
    return launch.run_on_every_rank(config, lambda ctx: train_expert_iteration(setup_expert_iteration(config, ctx)))
