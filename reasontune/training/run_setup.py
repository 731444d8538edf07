"""How every trainer starts and ends a run: its directory and config.json, seed and device, policy, generator, logger; the finish.

Components take plain arguments where they can (configs stop at the entry points); the
functions that take a config read only the shared option groups of ``reasontune.options``
that every trainer config composes, so SFT, expert iteration and GRPO set themselves up alike.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from reasontune import distributed
from reasontune.checkpoint import remove_stale_temporaries, resume_point
from reasontune.config import UserError, check_config, resume_command, save_config
from reasontune.generation import Generator, VLLMServerOptions, build_generator
from reasontune.lora import apply_lora
from reasontune.model_layers import is_peft_model
from reasontune.modeling import load_for_resume, load_model, load_tokenizer
from reasontune.options import TrainerOptions, resolved_dtype
from reasontune.run_layout import (CHECKPOINT_PATH, CONFIG_FILE, KEPT_BY_OVERWRITE, REPLACED_RUN_NAME, REPORT_PAGE,
                                   RUN_ENTRIES, RUN_FILES, has_trained, replaced_run_dir)
from reasontune.tracking import MetricsLogger
from reasontune.training.stop_signals import StopSignals

# ---------------------------------------------------------------------------------------------
# The run directory: a new run never mixes into an old one, and --overwrite never deletes others' files


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
        if has_trained(run_dir) and not overwrite:
            raise UserError(f"--output-dir {run_dir}: already holds a run; pass --resume to continue it, "
                            "--overwrite to replace it, or another --output-dir")
        aside = replaced_run_dir(run_dir, os.getpid())
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
    aside = replaced_run_dir(run_dir, os.getpid())
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


def _peft_model_card(path: Path, relative: str) -> bool:
    """Returns whether ``path`` is the README.md that peft writes beside an adapter (a user's own README is not)."""
    if path.name != "README.md" or not re.fullmatch(CHECKPOINT_PATH + r"/README\.md", relative):
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
    aside = replaced_run_dir(run_dir, os.getpid())
    if not aside.is_dir():
        return []
    kept = []
    for path in sorted(aside.rglob("*")):
        if not path.is_file() and not path.is_symlink():
            continue
        relative = path.relative_to(aside).as_posix()
        while re.match(REPLACED_RUN_NAME.pattern + "/", relative):  # an older replacement a killed start left inside
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


# ---------------------------------------------------------------------------------------------
# Starting a run


def seed_and_device(seed: int, num_threads: int | None, device: str | None) -> torch.device:
    """Returns the training device (``device``, else cuda when available, else cpu) after seeding torch and setting its CPU threads."""
    if num_threads:
        torch.set_num_threads(num_threads)
    torch.manual_seed(seed)
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def start_run(config: TrainerOptions, ctx: distributed.DistributedContext
              ) -> tuple[Path, torch.device, Path | None, StopSignals]:
    """Returns (run directory, device, checkpoint to resume from or None, the armed stop signals) after writing config.json and seeding.

    config.json records the command and the launch (``config.launch_sizes``: world size, global
    batch), written once. With ``--resume`` and no checkpoint yet, the run starts from step 0
    (and says so). Under torchrun rank 0 prepares the directory and finds the checkpoint; every
    rank gets the same answer and trains on ``ctx.device``.
    """
    decision = None
    if ctx.is_main:
        try:
            decision = ("start", _prepare_run(config, ctx))
        except SystemExit as stop:  # a finished run (exit 0): every rank exits as rank 0 does
            decision = ("exit", stop.code)
        # Any other error propagates: under torchrun stop_all_ranks_on_error then stops every rank.
    decision = distributed.broadcast_object(decision)
    if decision[0] == "exit":
        raise SystemExit(decision[1])
    device = seed_and_device(config.seed, config.num_threads, str(ctx.device) if ctx.is_distributed else config.device)
    return Path(config.output_dir), device, decision[1], StopSignals().arm()


def _prepare_run(config: TrainerOptions, ctx: distributed.DistributedContext) -> Path | None:
    """Returns the checkpoint to resume from (None: start afresh) after preparing the run directory and writing config.json."""
    check_config(config)  # values, files, model, packages: before the run directory is touched
    run_dir = prepare_run_dir(config.output_dir, resume=config.resume, overwrite=config.overwrite)
    checkpoint = None
    if config.resume:
        checkpoint = resume_point(run_dir, config.planned_steps, resume_command(config.command, config))
        if checkpoint is None:
            print(f"no checkpoint in {run_dir}; starting from step 0")
    launch = {"world_size": ctx.world_size, "backend": ctx.backend, **config.launch_sizes(ctx.world_size)}
    save_config(config, run_dir / CONFIG_FILE, launch=launch)
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


def log_resumed(logger: MetricsLogger | None, checkpoint: Path, step: int, note: str = "") -> None:
    """Returns nothing; drops the metrics logged after ``step`` (they are trained again) and logs the resume (rank 0)."""
    if logger is not None:
        logger.truncate_after(step)
        logger.log("event", step, message=f"resumed from {checkpoint.name}{note}")


# ---------------------------------------------------------------------------------------------
# Finishing a run


def finish_run(run_dir: Path, logger: MetricsLogger | None, stop: StopSignals, write_report: bool) -> Path:
    """Returns the run directory after putting back the signal handlers, closing the logger and writing report/ when asked (rank 0: ``logger``)."""
    stop.disarm()
    if logger is None:  # the ranks other than 0 write nothing
        return run_dir
    logger.close()
    if write_report:
        from reasontune.report import write_report as write  # lazy: matplotlib, only when a report is written

        print(f"report: {write(run_dir) / REPORT_PAGE}")
    print(f"run directory: {run_dir}")
    return run_dir
