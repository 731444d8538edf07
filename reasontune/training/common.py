"""What every trainer's setup and loop share: run directory, policy, optimizer, generator, logger, in-loop evaluation, the optimizer step.

Plain arguments only where the function is a component (configs stop at the entry points);
the ``*_for`` helpers read the shared option groups of ``reasontune.options`` that every
trainer config composes, so SFT, expert iteration and GRPO set themselves up the same way.
"""

from __future__ import annotations

import math
import os
import random
import re
import shlex
import shutil
import signal
import statistics
import sys
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from reasontune import distributed
from reasontune.checkpoint import (SHARDED_DIR, TRAINER_STATE, CheckpointError, check_trainer_state,
                                   checkpoint_problem, latest_checkpoint, list_checkpoints, load_sharded, load_trainer_state,
                                   prune_checkpoints, remove_stale_temporaries, restore_rng, rng_state, save_checkpoint,
                                   set_rng_state)
from reasontune.benchmarks import load_benchmarks
from reasontune.config import UserError, check_config, resume_command, save_config
from reasontune.data import Example, load_examples, with_chat_template
from reasontune.evaluation import EvalSet, evaluate_sets
from reasontune.generation import Generator, SamplingOptions, VLLMServerOptions, build_generator
from reasontune.lora import apply_lora, is_peft_model, load_for_resume, save_merged
from reasontune.modeling import load_model, load_tokenizer
from reasontune.options import RolloutOptions, TrainerOptions, resolved_dtype
from reasontune.rollouts import RewardFn
from reasontune.tracking import MetricsLogger
from reasontune.training.data_parallel import SINGLE_PROCESS, generation_model


# What a training run writes into its directory: --overwrite replaces these and nothing else.
RUN_ENTRIES = re.compile(r"config\.json|metrics\.jsonl(\.tmp)?|checkpoint-\d+|final|eval|report|tensorboard|wandb|"
                         r"wandb_run_id|ei-step-\d+|\..+\.(tmp|old)-\d+|\.replaced-\d+")
# The files inside those entries that reasontune writes (paths relative to the run directory). Anything else
# there (a README.md added to final/, notes in eval/) is the user's: --overwrite keeps it.
_CHECKPOINT = r"(checkpoint-\d+|final|\.[^/]+\.(tmp|old)-\d+)(/adapter)?"
RUN_FILES = re.compile("|".join((
    r"config\.json|metrics\.jsonl(\.tmp)?|wandb_run_id",
    r"(.+/)?\.[^/]+\.tmp-\d+",  # a records file's temporary, left by a crash
    _CHECKPOINT + r"/([^/]+\.(safetensors|json|jinja|model)|merges\.txt|vocab\.txt|sharded/[^/]+)",
    r"eval(/[^/]+)*/(records\.jsonl|summary\.json|results\.(md|json)|config\.json|eval_metrics\.jsonl|[^/]+\.png)",
    r"report/[^/]+\.(png|svg|html|md)",
    r"ei-step-\d+/rollouts\.jsonl",
    r"(tensorboard|wandb)/.+",
)))
REPLACED_RUN = ".replaced-{pid}"


def run_started(run_dir: Path) -> bool:
    """Returns whether ``run_dir`` holds a run that trained: a checkpoint, final/ or a ``train`` line in metrics.jsonl."""
    if latest_checkpoint(run_dir) is not None or (run_dir / "final").is_dir():
        return True
    metrics = run_dir / "metrics.jsonl"
    return metrics.exists() and '"kind": "train"' in metrics.read_text(encoding="utf-8", errors="replace")


def prepare_run_dir(output_dir: str | Path, resume: bool = False, overwrite: bool = False) -> Path:
    """Returns the run directory, refusing to mix a new run into an old one unless asked, and never deleting others' files.

    ``--resume`` wins over ``--overwrite`` (a run started with --overwrite resumes with its own
    config.json). ``--overwrite`` refuses a directory that holds anything a run does not write;
    otherwise the old run is moved aside into ``.replaced-<pid>/`` inside the directory, to be
    removed only once the new run's setup has succeeded (``discard_replaced_run``) or put back
    when it fails (``restore_replaced_run``). A directory whose start failed before any step is reused.
    """
    run_dir = Path(output_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--output-dir {run_dir}: is a file; give a directory")
    entries = sorted(run_dir.iterdir()) if run_dir.is_dir() else []
    strangers = [child.name for child in entries if not RUN_ENTRIES.fullmatch(child.name)]
    if entries and not resume:
        if strangers:
            raise UserError(f"--output-dir {run_dir}: holds files a reasontune run did not write "
                            f"({', '.join(strangers[:5])}); choose a new or empty --output-dir")
        if run_started(run_dir) and not overwrite:
            raise UserError(f"--output-dir {run_dir}: already holds a run; pass --resume to continue it, "
                            "--overwrite to replace it, or another --output-dir")
        aside = run_dir / REPLACED_RUN.format(pid=os.getpid())
        aside.mkdir()
        for child in entries:  # only reasontune's own entries (checked above); renames, so nothing is copied
            child.rename(aside / child.name)
    run_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(run_dir)
    return run_dir


def restore_replaced_run(run_dir: str | Path) -> bool:
    """Returns True after putting back the run that this process's ``--overwrite`` moved aside, removing what the failed start wrote.

    Called when the new run fails before ``discard_replaced_run``: the directory is then as it
    was before the command.
    """
    run_dir = Path(run_dir)
    aside = run_dir / REPLACED_RUN.format(pid=os.getpid())
    if not aside.is_dir():
        return False
    for child in run_dir.iterdir():
        if child != aside and RUN_ENTRIES.fullmatch(child.name):
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    for child in aside.iterdir():
        if not (run_dir / child.name).exists():
            child.rename(run_dir / child.name)
    shutil.rmtree(aside, ignore_errors=True) if not any(aside.iterdir()) else None
    return True


KEPT_BY_OVERWRITE = "kept-by-overwrite"


def _peft_model_card(path: Path, relative: str) -> bool:
    """Returns whether ``path`` is the README.md that peft writes beside an adapter (a user's own README is not)."""
    if path.name != "README.md" or not re.fullmatch(_CHECKPOINT + r"/README\.md", relative):
        return False
    if not (path.parent / "adapter_config.json").is_file():
        return False
    head = path.read_text(encoding="utf-8", errors="replace")[:2000]
    return "library_name: peft" in head


def discard_replaced_run(run_dir: str | Path) -> list[Path]:
    """Returns the files kept in ``RUN/kept-by-overwrite/`` after deleting the replaced run's files that reasontune wrote.

    Only ``RUN_FILES`` are deleted; any other file inside the old run's directories (a README
    added to final/, notes in eval/) moves to ``kept-by-overwrite/<its old relative path>``,
    where no later save or prune of the new run can reach it, and is listed. (Being a name no
    run writes, that folder also makes a later ``--overwrite`` refuse until the user moves it.)
    """
    run_dir = Path(run_dir)
    aside = run_dir / REPLACED_RUN.format(pid=os.getpid())
    if not aside.is_dir():
        return []
    kept = []
    for path in sorted(aside.rglob("*")):
        if not path.is_file() and not path.is_symlink():
            continue
        relative = path.relative_to(aside).as_posix()
        while re.match(r"\.replaced-\d+/", relative):  # an older replacement a killed start left inside
            relative = relative.split("/", 1)[1]
        if RUN_FILES.fullmatch(relative) or _peft_model_card(path, relative):
            path.unlink()
            continue
        target = run_dir / KEPT_BY_OVERWRITE / relative
        while target.exists():
            target = target.with_name(target.name + ".kept")
        target.parent.mkdir(parents=True, exist_ok=True)
        path.rename(target)
        kept.append(target)
    shutil.rmtree(aside)
    if kept:
        print(f"--overwrite: replaced the old run in {run_dir}; kept {len(kept)} file(s) reasontune did not write in "
              f"{run_dir / KEPT_BY_OVERWRITE}: {', '.join(str(k.relative_to(run_dir / KEPT_BY_OVERWRITE)) for k in kept[:10])}",
              file=sys.stderr)
    return kept


def finished_run_check(run_dir: Path, planned_steps: int | None) -> Path | None:
    """Returns final/ to resume from when it holds fewer steps than planned, None when there is no final/; exits 0 when the run is done.

    ``planned_steps`` None (SFT without --max-steps: known only after planning) counts final/ as done.
    """
    final = run_dir / "final"
    if not (final / TRAINER_STATE).exists():
        return None
    done = load_trainer_state(final)["step"]
    if planned_steps is None or done >= planned_steps:
        report = run_dir / "report" / "index.html"
        print(f"{run_dir} already finished: final/ holds step {done}"
              f"{'' if planned_steps is None else f' of {planned_steps}'}; nothing to resume"
              f"{f'; its report is {report}' if report.exists() else ''}. To train longer, raise the step count "
              "(--max-steps, --n-ei-steps, --n-grpo-steps) with --resume.")
        raise SystemExit(0)
    return final


def resume_point(run_dir: Path, planned_steps: int | None, command: str) -> Path | None:
    """Returns the checkpoint ``--resume`` continues from (final/ when it is behind the plan, else the newest checkpoint-N), None when there is none.

    The chosen checkpoint is checked whole first (``checkpoint_problem``): a damaged one is
    refused with the newest intact checkpoint and the exact commands that resume from it
    (``command``: the resume command line), rather than silently falling back to an older one.
    """
    newest_first = [path for _, path in reversed(list_checkpoints(run_dir))]
    if (run_dir / "final" / TRAINER_STATE).exists():
        newest_first.insert(0, run_dir / "final")
    if not newest_first:
        return None
    problem = checkpoint_problem(newest_first[0])
    if problem is None:
        final = finished_run_check(run_dir, planned_steps)
        return final if final is not None else next(p for p in newest_first if p.name != "final")
    refuse_damaged_checkpoint(newest_first[0], problem, command)


def refuse_damaged_checkpoint(damaged: Path, problem: str, command: str | None = None) -> None:
    """Raises the ``UserError`` of a checkpoint that cannot be resumed from: the problem, the newest intact older checkpoint, and how to resume from it.

    ``command`` is the resume command line (None: "the same command").
    """
    run_dir = damaged.parent
    numbered = re.fullmatch(r"checkpoint-(\d+)", damaged.name)
    older = [path for number, path in reversed(list_checkpoints(run_dir))
             if path != damaged and (numbered is None or number < int(numbered.group(1)))]
    intact = next((path for path in older if checkpoint_problem(path) is None), None)
    if intact is None:
        raise UserError(f"--resume: {problem}; no intact checkpoint is left in {run_dir} to resume from; start "
                        "afresh with --overwrite")
    aside = damaged.with_name(f"damaged-{damaged.name}")
    raise UserError(f"--resume: {problem}. The newest intact checkpoint is {intact}; resume from it with: "
                    f"mv {shlex.quote(str(damaged))} {shlex.quote(str(aside))} && "
                    f"{command or 'the same command again'}")


def seed_and_device(seed: int, num_threads: int | None, device: str | None) -> torch.device:
    """Returns the training device (``device``, else cuda when available, else cpu) after seeding torch and setting its CPU threads."""
    if num_threads:
        torch.set_num_threads(num_threads)
    torch.manual_seed(seed)
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def start_run(config: TrainerOptions, ctx: distributed.DistributedContext | None = None
              ) -> tuple[Path, torch.device, Path | None]:
    """Returns (run directory, device, checkpoint to resume from or None) after writing config.json and seeding.

    With ``--resume`` and no checkpoint yet, the run starts from step 0 (and says so). Under
    torchrun (``ctx``) rank 0 prepares the directory and finds the checkpoint; every rank gets
    the same answer and trains on ``ctx.device``.
    """
    decision = None
    if ctx is None or ctx.is_main:
        try:
            decision = ("start", _prepare_run(config))
        except SystemExit as stop:  # a finished run (exit 0): every rank exits as rank 0 does
            decision = ("exit", stop.code)
        # Any other error propagates: under torchrun stop_all_ranks_on_error then stops every rank.
    decision = distributed.broadcast_object(decision)
    if decision[0] == "exit":
        raise SystemExit(decision[1])
    device = seed_and_device(config.seed, config.num_threads,
                             str(ctx.device) if ctx is not None and ctx.is_distributed else config.device)
    arm_stop_signals()
    return Path(config.output_dir), device, decision[1]


def _prepare_run(config: TrainerOptions) -> Path | None:
    """Returns the checkpoint to resume from (None: start afresh) after preparing the run directory and writing config.json."""
    check_config(config)  # values, files, model, packages: before the run directory is touched
    run_dir = prepare_run_dir(config.output_dir, resume=config.resume, overwrite=config.overwrite)
    checkpoint = None
    if config.resume:
        planned = getattr(config, "n_grpo_steps", getattr(config, "n_ei_steps", getattr(config, "max_steps", None)))
        checkpoint = resume_point(run_dir, planned, resume_command(COMMAND_OF_CONFIG.get(type(config).__name__, "sft"),
                                                                   config))
        if checkpoint is None:
            print(f"no checkpoint in {run_dir}; starting from step 0")
    save_config(config, run_dir / "config.json")
    return checkpoint


def load_policy(config: TrainerOptions, device: torch.device, weights: str | Path | None = None):
    """Returns (model, tokenizer) of ``weights`` (default: ``config.model``), ready to train.

    Gradient checkpointing as asked; with ``--lora-rank`` the model gets LoRA adapters on a
    frozen base (a checkpoint holding an adapter is the base ``config.model`` plus that adapter).
    """
    source = str(weights) if weights is not None else config.model
    dtype = resolved_dtype(config.dtype, str(device))
    try:
        tokenizer = load_tokenizer(source)
        if config.lora_rank and (Path(source) / "adapter_config.json").exists():
            model = load_for_resume(config.model, source, dtype=dtype, attn_implementation=config.attn_implementation,
                                    device=device)
        else:
            # A checkpoint is reasontune's own: safetensors only, never a pickled .bin a crafted directory slipped in.
            safetensors_only = {"use_safetensors": True} if weights is not None else {}
            model = load_model(source, dtype=dtype, attn_implementation=config.attn_implementation, device=device,
                               **safetensors_only)
    except OSError as error:  # not on the hub, no network, not a model directory: the user's to fix
        raise UserError(f"--model {source}: cannot be loaded ({str(error).splitlines()[0]})") from error
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if config.lora_rank and not is_peft_model(model):
        model = apply_lora(model, config.lora_rank, config.lora_alpha, config.lora_dropout,
                           config.lora_target_modules, config.lora_trainable_modules or ())
    return model, tokenizer


def make_optimizer(model, config: TrainerOptions, learning_rate: float | None = None) -> torch.optim.AdamW:
    """Returns AdamW over the model's trainable parameters with the config's rate, decay and betas."""
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                             lr=config.learning_rate if learning_rate is None else learning_rate,
                             weight_decay=config.weight_decay, betas=(config.adam_beta1, config.adam_beta2))


def make_generator(config: TrainerOptions, model, tokenizer, device: torch.device) -> Generator:
    """Returns the run's generator of rollouts and evaluation (HF on the policy itself, or vLLM synced from it).

    vLLM: an engine in this process (under torchrun one per rank, in vLLM's ``external_launcher``
    mode), or with ``--vllm-server-url`` a running ``vllm serve`` the weights are pushed to.
    """
    server, torchrun = None, torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
    if config.vllm_server_url:
        server = VLLMServerOptions(url=config.vllm_server_url, weight_sync=config.weight_sync_mode(trainer=True),
                                   sync_address=config.vllm_weight_sync_address, sync_port=config.vllm_weight_sync_port,
                                   timeout_s=config.vllm_timeout)
    return build_generator(config.backend, model=model, tokenizer=tokenizer, model_name=config.model,
                           dtype=resolved_dtype(config.dtype, str(device)), seed=config.seed,
                           batch_size=config.generation_batch_size, vllm_device=config.vllm_device,
                           vllm_gpu_memory_utilization=config.vllm_gpu_memory_utilization,
                           share_gpu_with_training=True, vllm_tensor_parallel_size=config.vllm_tensor_parallel_size,
                           vllm_external_launcher=torchrun, vllm_server=server)


def make_logger(run_dir: Path, config: TrainerOptions, resume: bool) -> MetricsLogger:
    """Returns the run's metrics logger (metrics.jsonl always; wandb and TensorBoard as the logging options ask).

    Every trainer makes it last in its setup, once model, tokenizer, data and generator have
    loaded: a run that ``--overwrite`` moved aside is discarded here, never earlier.
    """
    logger = MetricsLogger(run_dir, wandb_project=config.wandb, tensorboard=config.tensorboard, config=asdict(config),
                           resume=resume)
    discard_replaced_run(run_dir)
    return logger


def load_questions(config: TrainerOptions, needed: int = 1, tokenizer=None
                   ) -> tuple[list[Example], list[Example], dict[str, int]]:
    """Returns (training questions with a reference, validation examples, data counts) of an RL trainer (EI, GRPO).

    Fewer than ``needed`` questions with a reference answer is an error naming the file;
    validation is the first ``eval_examples`` of ``val_data`` that have a reference (none when
    either is unset or 0). With ``tokenizer``, chat records are rendered with its chat template
    as ``--chat-template`` says.
    """
    train_set = load_examples(config.train_data, split=config.split, hub_config=config.data_config, seed=config.seed,
                              skip_bad=config.skip_bad)
    questions = [e for e in train_set.examples if e.ground_truth is not None]
    if len(questions) < needed:
        raise UserError(f"--train-data {config.train_data}: has {len(questions)} questions with a reference answer to "
                        f"grade against; a step needs {needed}")
    validation = []
    if config.val_data and config.eval_examples:
        validation = [e for e in load_examples(config.val_data, seed=config.seed, skip_bad=config.skip_bad).examples
                      if e.ground_truth is not None][: config.eval_examples]
    counts = {"train_records": train_set.total_records, "train_skipped_bad": train_set.n_skipped,
              "train_questions": len(questions), "validation_examples": len(validation)}
    if tokenizer is not None:
        questions = with_chat_template(questions, tokenizer, config.chat_template)
        validation = with_chat_template(validation, tokenizer, config.chat_template)
    return questions, validation, counts


def question_batch(n_questions: int, count: int, seed: int, step: int) -> list[int]:
    """Returns the indices of step ``step``'s questions: ``min(count, n_questions)`` distinct, a pure function of (seed, step)."""
    return random.Random(seed * 1_000_003 + step).sample(range(n_questions), min(count, n_questions))


def rollout_sampling(config: RolloutOptions, reward_name: str, return_entropy: bool = False) -> SamplingOptions:
    """Returns the sampling options of an RL trainer's rollouts: ``group_size`` responses a question, stop at </answer> for r1_zero."""
    return SamplingOptions(temperature=config.sampling_temperature, top_p=config.sampling_top_p,
                           max_new_tokens=config.sampling_max_tokens, min_new_tokens=config.sampling_min_tokens,
                           stop=("</answer>",) if reward_name == "r1_zero" else (), n=config.group_size,
                           return_entropy=return_entropy)


@dataclass
class PolicySession:
    """What every trainer that samples from its own policy holds (expert iteration and GRPO extend it)."""

    config: TrainerOptions
    model: Any
    tokenizer: Any
    device: torch.device
    generator: Generator
    questions: list[Example]
    validation: list[EvalSet]
    template: str
    reward_fn: RewardFn
    rollouts: SamplingOptions
    run_dir: Path
    logger: MetricsLogger | None  # None on the ranks other than 0
    ctx: distributed.DistributedContext = SINGLE_PROCESS
    replica: Any = None  # world size > 1: the UnshardedReplica the generator samples from


def evaluation_sampling(config: TrainerOptions, backend: str) -> SamplingOptions:
    """Returns the sampling options of in-loop evaluation (stop at </answer> for the r1_zero reward)."""
    return SamplingOptions(temperature=config.eval_temperature, top_p=config.eval_top_p,
                           max_new_tokens=config.eval_max_new_tokens,
                           stop=("</answer>",) if config.reward_name == "r1_zero" else (), n=config.eval_n_samples,
                           seed=config.seed,
                           return_entropy=backend == "hf")


def evaluation_sets(config: TrainerOptions, validation: Sequence[Example], template: str) -> list[EvalSet]:
    """Returns what in-loop evaluation covers: the validation examples, then each of ``--eval-benchmarks`` (run's template and reward)."""
    sets = [EvalSet("", list(validation), template, config.reward_name)] if validation else []
    if config.eval_benchmarks and config.eval_examples:
        for name, benchmark in load_benchmarks(config.eval_benchmarks, config.benchmark_dir, config.eval_examples,
                                               config.seed).items():
            sets.append(EvalSet(name, benchmark.examples.examples, template, config.reward_name, benchmark.question_ids))
    return sets


def evaluate_policy(step: int, model, generator: Generator, sets: Sequence[EvalSet], run_dir: Path, *,
                    sampling: SamplingOptions, grading_workers: int | None = None,
                    ctx: distributed.DistributedContext | None = None) -> dict:
    """Returns the summary of generating and grading every evaluation set with the current weights.

    Writes ``eval/step-<N>/records.jsonl`` and ``summary.json`` as ``reasontune eval`` does (a
    benchmark's under ``eval/step-<N>/<name>/``). With several sets the summary holds the mean
    accuracy, format rate and length over the sets and ``sets`` with each one's. The RNG is
    forked so that sampling in evaluation never changes the training run's random stream; the
    generator sleeps afterwards (giving a shared GPU back to training). Under torchrun (``ctx``)
    every rank calls it, with an unsharded ``model`` for the HF generator (a vLLM generator takes
    the sharded one, gathered layer by layer): each generates its slice of every set and rank 0
    writes the records, gathered in the original order.
    """
    generator.sync_weights(model)
    with torch.random.fork_rng(devices=[]):
        summaries = evaluate_sets(generator, sets, sampling, run_dir / "eval" / f"step-{step:06d}",
                                  ks=sorted({1, sampling.n}), n_bootstrap=200, seed=sampling.seed or 0,
                                  grading_workers=grading_workers, plots=False, ctx=ctx)
    generator.sleep()
    if len(summaries) == 1:
        return next(iter(summaries.values()))
    mean = {key: statistics.fmean(s[key] for s in summaries.values() if s[key] is not None)
            for key in ("accuracy", "format_rate", "mean_response_tokens")}
    return {**mean, "mean_entropy": None, "sets": summaries}


def log_evaluation(session: Any, step: int, sampling: SamplingOptions, progress: Any) -> dict:
    """Returns the evaluation summary of ``session``'s policy at ``step`` after logging it (rank 0); every rank calls it.

    ``session`` is a trainer's session (model, replica, generator, validation, run_dir, config,
    ctx, logger); a sharded policy generates through its refreshed unsharded replica.
    """
    summary = evaluate_policy(step, generation_model(session.model, session.replica), session.generator,
                              session.validation, session.run_dir, sampling=sampling,
                              grading_workers=session.config.grading_workers, ctx=session.ctx)
    if session.logger is not None:
        session.logger.log("eval", step, **eval_metrics(summary, step))
        progress.write(f"step {step}: accuracy {summary['accuracy']:.3f}, format rate {summary['format_rate']:.3f}")
    return summary


def eval_metrics(summary: dict, step: int) -> dict:
    """Returns the fields of an evaluation summary that a trainer logs as its ``eval`` metrics line (per set: ``accuracy/<name>``)."""
    per_set = {f"accuracy/{name}": each["accuracy"] for name, each in summary.get("sets", {}).items()}
    return {"accuracy": summary["accuracy"], "format_rate": summary["format_rate"],
            "mean_response_tokens": summary.get("mean_response_tokens"), "mean_entropy": summary.get("mean_entropy"),
            **per_set, "dir": f"eval/step-{step:06d}"}


def trainer_state(step: int, optimizer, scheduler, plan_fingerprint: str, **extra: Any) -> dict:
    """Returns everything besides the weights that an exact resume needs (``extra``: a trainer's own positions)."""
    return {"step": step, "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "rng": rng_state(), "plan_fingerprint": plan_fingerprint, **extra}


def save_training_checkpoint(run_dir: Path, name: str, model, tokenizer, state: dict, keep: int | None = None, *,
                             optimizer=None, ctx: distributed.DistributedContext | None = None) -> Path:
    """Returns the checkpoint directory ``run_dir/name`` after an atomic save of weights, tokenizer, trainer state and config.json.

    A LoRA model's checkpoint holds its adapter (PEFT format); its ``final/`` holds the merged
    full model (loadable by ``from_pretrained`` and vLLM without peft) and the adapter in
    ``final/adapter/``. With ``optimizer`` the model and optimizer state also go to
    ``sharded/`` (every rank writes its shard; loadable at any world size), and ``state``
    should then not hold the optimizer. Under torchrun every rank calls it; rank 0 writes the
    shared files and prunes.
    """
    is_main = ctx is None or ctx.is_main
    extra = {"reasontune_config.json": (run_dir / "config.json").read_text()} if is_main else None
    if name == "final" and is_peft_model(model):
        path = save_merged(model, tokenizer, run_dir / name, is_main)
        save_checkpoint(path / "adapter", model, tokenizer, state, extra, ctx=ctx)
        return path
    path = save_checkpoint(run_dir / name, model, tokenizer, state, extra, optimizer=optimizer, ctx=ctx)
    if is_main:
        prune_checkpoints(run_dir, keep)
    return path


def save_run_checkpoint(run_dir: Path, name: str, model, tokenizer, step: int, optimizer, scheduler,
                        plan_fingerprint: str, *, keep: int | None = None,
                        ctx: distributed.DistributedContext | None = None, **extra: Any) -> Path:
    """Returns the checkpoint ``run_dir/name`` of a trainer with an optimizer after saving it (every rank calls it).

    The optimizer state goes to ``sharded/`` with the model's (each rank its shard), so that a
    resume may change the world size; a LoRA model in one process keeps small adapter
    checkpoints, the adapter's optimizer state in ``trainer_state`` (under torchrun: in ``sharded/``).
    """
    # A LoRA model in one process: the adapter's optimizer state is small; sharded, it is in DTensor shards.
    sharded = optimizer is not None and (not is_peft_model(model) or distributed.is_sharded(model))
    state = trainer_state(step, None if sharded else optimizer, scheduler, plan_fingerprint, **extra)
    return save_training_checkpoint(run_dir, name, model, tokenizer, state, keep=keep,
                                    optimizer=optimizer if sharded else None, ctx=ctx)


def restore_training_state(checkpoint: Path, optimizer, scheduler, fingerprint_of_steps=None, *, model=None,
                           ctx: distributed.DistributedContext | None = None) -> dict:
    """Returns the checkpoint's trainer state after loading the optimizer, schedule (each when not None) and RNG states from it.

    ``fingerprint_of_steps(step)`` (when given) must reproduce the saved fingerprint of the
    steps already trained; a resume with other data or batching is refused. With ``model`` and
    a ``sharded/`` directory in the checkpoint, model and optimizer state come from there (any
    world size; every rank calls it); each rank restores its own RNG state when the checkpoint
    has one for its rank.
    """
    try:
        return _restore_training_state(checkpoint, optimizer, scheduler, fingerprint_of_steps, model=model, ctx=ctx)
    except CheckpointError as error:  # found only now, against the live optimizer and schedule
        if ctx is not None and ctx.is_distributed:
            raise
        refuse_damaged_checkpoint(Path(checkpoint), str(error))


def _restore_training_state(checkpoint: Path, optimizer, scheduler, fingerprint_of_steps=None, *, model=None,
                            ctx: distributed.DistributedContext | None = None) -> dict:
    state = load_trainer_state(checkpoint)
    where = str(Path(checkpoint) / TRAINER_STATE)
    check_trainer_state(state, where)
    if fingerprint_of_steps is not None and state.get("plan_fingerprint") != fingerprint_of_steps(state["step"]):
        raise UserError(f"--resume: {checkpoint} was trained on other data or batches than these options plan "
                        "for its steps; resume with the same data, seed and batching options")
    if model is not None and optimizer is not None and (Path(checkpoint) / SHARDED_DIR).is_dir():
        load_sharded(checkpoint, model, optimizer)
    try:
        if optimizer is not None and state.get("optimizer") is not None and not (Path(checkpoint) / SHARDED_DIR).is_dir():
            optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state.get("scheduler") is not None:
            _check_like(state["scheduler"], scheduler.state_dict(), "scheduler")
            scheduler.load_state_dict(state["scheduler"])
    except (ValueError, TypeError, KeyError, IndexError, RuntimeError, AttributeError) as error:
        raise CheckpointError(f"{where}: the optimizer or schedule state does not fit this run "
                              f"({' '.join(str(error).split())[:200]})") from None
    set_rng_state(state["rng"])
    if ctx is not None and ctx.rank > 0:
        restore_rng(checkpoint, ctx.rank)
    return state


def _check_like(saved: Any, expected: Any, where: str) -> None:
    """Raises TypeError unless ``saved`` has ``expected``'s shape: the same keys, list lengths and value types (int for float allowed).

    A scheduler's ``load_state_dict`` sets every saved key as an attribute, so a crafted value
    would surface steps later as a crash in the schedule; checked against the fresh state first.
    """
    if isinstance(expected, dict):
        if not isinstance(saved, dict) or set(saved) != set(expected):
            raise TypeError(f"{where}: expected the fields {', '.join(sorted(map(str, expected)))}")
        for key in expected:
            _check_like(saved[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, (list, tuple)):
        if not isinstance(saved, (list, tuple)) or len(saved) != len(expected):
            raise TypeError(f"{where}: expected a list of {len(expected)}")
        for index, (item, reference) in enumerate(zip(saved, expected)):
            _check_like(item, reference, f"{where}[{index}]")
    elif expected is None or isinstance(expected, bool):
        if saved is not None and not isinstance(saved, bool):
            raise TypeError(f"{where}: expected {type(expected).__name__}")
    elif isinstance(expected, (int, float)):
        if isinstance(saved, bool) or not isinstance(saved, (int, float)) or (isinstance(expected, int) and
                                                                               not isinstance(saved, int)):
            raise TypeError(f"{where}: expected {type(expected).__name__}, got {type(saved).__name__}")
    elif type(saved) is not type(expected):
        raise TypeError(f"{where}: expected {type(expected).__name__}, got {type(saved).__name__}")


class TrainingDiverged(RuntimeError):
    """The loss or gradient norm became NaN/inf; the message says where the last good weights are."""


class NonFiniteStep(ArithmeticError):
    """An optimizer step was refused because its loss or gradient norm is not finite (gradients dropped)."""


def clip_and_step(model, optimizer, scheduler, max_grad_norm: float, loss: float) -> float:
    """Returns the gradient norm (before clipping) after clipping, the optimizer step and the schedule step.

    A loss or gradient norm that is not finite takes no step: the gradients are dropped and
    ``NonFiniteStep`` is raised, so the weights stay those of the last good step.
    """
    limit = max_grad_norm if max_grad_norm > 0 else float("inf")
    grad_norm = float(torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], limit))
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteStep(f"loss {loss} / gradient norm {grad_norm} is not finite")
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def stop_diverged(message: str, step: int, logger, progress) -> None:
    """Raises ``TrainingDiverged(message)`` after logging it as an event and closing the logger and progress bar."""
    if logger is not None:
        logger.log("event", step, message=message)
        logger.close()
    progress.close()
    raise TrainingDiverged(message)


# ---------------------------------------------------------------------------------------------
# SIGINT / SIGTERM: finish the optimizer step, save, say how to resume, exit 130

COMMAND_OF_CONFIG = {"SFTConfig": "sft", "ExpertIterationConfig": "ei", "GRPOConfig": "grpo"}
_stop = {"signal": None, "previous": {}}


def _on_stop_signal(signum, frame) -> None:
    if _stop["signal"] is not None:  # a second signal: stop at once
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            return  # torchrun forwards to its workers the signal a user sent the whole job: the same request again
        raise KeyboardInterrupt
    _stop["signal"] = signum
    print(f"\n{signal.Signals(signum).name}: finishing the current step, then saving a checkpoint "
          "(send it again to stop at once, unsaved)", file=sys.stderr, flush=True)


def arm_stop_signals() -> None:
    """Returns nothing; from now on SIGINT and SIGTERM request a stop (``stop_requested``) instead of killing the run (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        return
    _stop["signal"] = None
    for signum in (signal.SIGINT, signal.SIGTERM):
        previous = signal.signal(signum, _on_stop_signal)
        if previous is not _on_stop_signal:
            _stop["previous"][signum] = previous


def disarm_stop_signals() -> None:
    """Returns nothing; puts back the SIGINT/SIGTERM handlers ``arm_stop_signals`` replaced."""
    for signum, handler in _stop["previous"].items():
        signal.signal(signum, handler)
    _stop["previous"].clear()


def stop_requested(ctx: distributed.DistributedContext | None = None) -> bool:
    """Returns whether SIGINT or SIGTERM arrived since the run started (the loop saves and stops after its step).

    Under torchrun (``ctx``) every rank must call it at the same point: True on every rank as
    soon as any rank got a signal, so that all of them save and stop together.
    """
    local = _stop["signal"] is not None
    if ctx is None or not ctx.is_distributed:
        return local
    return bool(distributed.global_max(int(local)))


def stop_for_signal(config: TrainerOptions, run_dir: Path, step: int, save, logger: MetricsLogger, progress) -> None:
    """Exits 130 after ``save(step, "checkpoint-<step>")``, logging the stop and printing the exact resume command."""
    path = save(step, f"checkpoint-{step}")  # every rank, under torchrun
    name = signal.Signals(_stop["signal"]).name if _stop["signal"] is not None else "a signal to another rank"
    command = resume_command(COMMAND_OF_CONFIG.get(type(config).__name__, "sft"), config)
    if progress is not None:
        progress.close()
    disarm_stop_signals()
    if logger is not None:  # rank 0
        logger.log("event", step, message=f"stopped by {name} after step {step}; saved {path.name}")
        logger.close()
        print(f"stopped by {name} after step {step}; checkpoint saved in {path}\nresume with: {command}",
              file=sys.stderr, flush=True)
    raise SystemExit(130)


def finish_run(run_dir: Path, logger: MetricsLogger, write_report: bool) -> Path:
    """Returns the run directory after closing the logger and writing report/ when asked."""
    disarm_stop_signals()
    logger.close()
    if write_report:
        from reasontune.report import write_report as write  # lazy: matplotlib, only when a report is written

        print(f"report: {write(run_dir) / 'index.html'}")
    print(f"run directory: {run_dir}")
    return run_dir
