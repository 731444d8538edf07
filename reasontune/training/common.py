"""What every trainer's loop shares: the run directory, the generator, in-loop evaluation, the optimizer step, trainer state.

Plain arguments only (configs stop at the entry points): SFT, expert iteration and GRPO each
pass their own config's values.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal, Sequence

import torch


def prepare_run_dir(output_dir: str | Path, resume: bool = False, overwrite: bool = False) -> Path:
    """Returns the run directory, refusing to mix a new run into an old one unless asked."""
    import shutil

    run_dir = Path(output_dir)
    if run_dir.exists() and (run_dir / "config.json").exists() and not resume:
        if not overwrite:
            raise SystemExit(f"error: {run_dir} already holds a run; pass --resume to continue it, "
                             "--overwrite to start afresh, or another --output-dir")
        for child in run_dir.iterdir():
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def seed_and_device(seed: int, num_threads: int | None, device: str | None) -> torch.device:
    """Returns the training device (``device``, else cuda when available, else cpu) after seeding torch and setting its CPU threads."""
    if num_threads:
        torch.set_num_threads(num_threads)
    torch.manual_seed(seed)
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def make_generator(backend: Literal["hf", "vllm"], model, tokenizer, *, model_name: str, dtype: str, seed: int,
                   batch_size: int, vllm_device: str | None = None, vllm_gpu_memory_utilization: float = 0.3):
    """Returns a generator: HF ``generate`` on the policy object itself, or a vLLM engine built from ``model_name``.

    The vLLM engine starts from the base weights; callers load the policy's current ones
    (``generator.load_policy_weights(model)``) before each rollout or evaluation. Sharing the
    policy's GPU (``vllm_device`` None) turns on sleep mode so training gets the KV cache back.
    """
    if backend == "vllm":
        from reasontune.generation.vllm import VLLMGenerator

        shared_device = vllm_device is None
        return VLLMGenerator(model_name, device=vllm_device, dtype=dtype, gpu_memory_utilization=vllm_gpu_memory_utilization,
                             seed=seed, enable_sleep_mode=shared_device)
    from reasontune.generation.hf import HFGenerator

    return HFGenerator(model, tokenizer, batch_size=batch_size)


def evaluate_policy(step: int, model, generator, validation: Sequence, template: str, run_dir: Path, *,
                    reward: str, temperature: float, max_new_tokens: int, seed: int) -> dict:
    """Returns the summary of generating and grading the validation examples with the current weights.

    Writes ``eval/step-<N>/records.jsonl`` and ``summary.json`` as ``reasontune eval`` does. The
    RNG is forked so that sampling in evaluation never changes the training run's random stream.
    """
    from reasontune.evaluation import evaluate, reward_fn_by_name
    from reasontune.generation import SamplingOptions

    if hasattr(generator, "load_policy_weights"):
        generator.load_policy_weights(model)
    hf_backend = not hasattr(generator, "load_policy_weights")
    options = SamplingOptions(temperature=temperature, max_new_tokens=max_new_tokens, stop=("</answer>",), n=1,
                              seed=seed, return_entropy=hf_backend)
    with torch.random.fork_rng(devices=[]):
        result = evaluate(generator, validation, reward_fn_by_name(reward), options,
                          output_dir=run_dir / "eval" / f"step-{step:06d}", template=template)
    if getattr(generator, "enable_sleep_mode", False):
        generator.sleep()  # give the shared GPU's KV cache back to training
    return result["summary"]


def eval_metrics(summary: dict, step: int) -> dict:
    """Returns the fields of an evaluation summary that a trainer logs as its ``eval`` metrics line."""
    return {"accuracy": summary["accuracy"], "format_rate": summary["format_rate"],
            "mean_response_length": summary.get("mean_response_tokens"), "mean_entropy": summary.get("mean_entropy"),
            "dir": f"eval/step-{step:06d}"}


def trainer_state(step: int, optimizer, scheduler, plan_fingerprint: str) -> dict:
    """Returns everything besides the weights that an exact resume needs."""
    from reasontune.checkpoint import rng_state

    return {"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "rng": rng_state(), "plan_fingerprint": plan_fingerprint}


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
    grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), limit))
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteStep(f"loss {loss} / gradient norm {grad_norm} is not finite")
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def stop_diverged(message: str, step: int, logger, progress) -> None:
    """Raises ``TrainingDiverged(message)`` after logging it as an event and closing the logger and progress bar."""
    logger.log("event", step, message=message)
    logger.close()
    progress.close()
    raise TrainingDiverged(message)
