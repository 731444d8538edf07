"""The optimizer every trainer builds and the step it takes: clip, refuse a non-finite step, AdamW, schedule; and stopping a run that diverged."""

from __future__ import annotations

import math
from typing import NoReturn

import torch


class TrainingDiverged(RuntimeError):
    """The loss or gradient norm became NaN/inf; the message says where the last good weights are."""


class NonFiniteStep(ArithmeticError):
    """An optimizer step was refused because its loss or gradient norm is not finite (gradients dropped)."""


def make_optimizer(model, config, learning_rate: float | None = None, fused: bool = False) -> torch.optim.AdamW:
    """Returns AdamW over the model's trainable parameters with the config's rate, decay and betas (``OptimizerOptions``).

    ``fused``: torch's fused kernel (one pass over each tensor; on SmolLM2's 135M parameters on
    a CPU about 5x faster than the per-tensor loop), for parameters that are plain tensors (not
    FSDP2 shards). It is what transformers' Trainer uses by default (``adamw_torch_fused``).
    """
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                             lr=config.learning_rate if learning_rate is None else learning_rate,
                             weight_decay=config.weight_decay, betas=(config.adam_beta1, config.adam_beta2),
                             fused=fused or None)


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


def stop_diverged(message: str, step: int, logger, progress) -> NoReturn:
    """Raises ``TrainingDiverged(message)`` after logging it as an event and closing the logger and progress bar."""
    if logger is not None:
        logger.log("event", step, message=message)
        logger.close()
    progress.close()
    raise TrainingDiverged(message)
