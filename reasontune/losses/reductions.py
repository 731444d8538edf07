"""Masked reductions: the one place where a per-token loss becomes a microbatch's scalar.

``aggregate_loss`` is shared by SFT and every policy-gradient objective, so gradient-accumulation
scaling and the divisor of each aggregation exist once. Pure functions of their arguments.
"""

from __future__ import annotations

from typing import Literal

import torch

# The per-token-loss -> scalar reductions, one set of names for SFT and GRPO (see aggregate_loss).
LossAggregation = Literal["sequence_mean", "sequence_sum", "token_mean"]


def masked_normalize(
    tensor: torch.Tensor,
    mask: torch.Tensor,
    normalize_constant: float,
    dim: int | None = None,
) -> torch.Tensor:
    """Returns the sum of ``tensor`` where ``mask`` is true, over ``dim`` (all if None), / ``normalize_constant``.

    Args:
        tensor: (...) float.
        mask: same shape, bool or 0/1. Masked-out entries are ignored even if they are inf/nan.
        normalize_constant: the divisor.
        dim: dimension to sum over; None sums every element (a 0-d result).
    """
    selected = torch.where(mask.bool(), tensor, torch.zeros((), dtype=tensor.dtype, device=tensor.device))
    total = selected.sum() if dim is None else selected.sum(dim=dim)
    return total / normalize_constant


def masked_mean(tensor: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Returns the mean of ``tensor`` over the entries where ``mask`` is true, over ``dim`` (all if None).

    A slice with no true entry gives nan (0 / 0), as an empty mean should.

    Args:
        tensor: (...) float.
        mask: same shape, bool or 0/1.
        dim: dimension to average over; None averages over every masked element.
    """
    mask = mask.bool()
    selected = torch.where(mask, tensor, torch.zeros((), dtype=tensor.dtype, device=tensor.device))
    if dim is None:
        return selected.sum() / mask.sum()
    return selected.sum(dim=dim) / mask.sum(dim=dim)


def aggregate_loss(
    per_token_loss: torch.Tensor,
    response_mask: torch.Tensor,
    aggregation: LossAggregation,
    gradient_accumulation_steps: int,
    normalize_constant: float | None = None,
    tokens_in_step: int | None = None,
    examples_in_step: int | None = None,
) -> torch.Tensor:
    """Returns the scalar loss of one microbatch: ``per_token_loss`` reduced over its response tokens.

    The one place where a per-token loss becomes the value a microbatch back-propagates, for
    SFT and GRPO alike (gradient-accumulation scaling included):

    - ``sequence_mean`` (GRPO): each sequence's masked mean, then the mean over sequences.
    - ``sequence_sum`` (SFT's default; Dr. GRPO): each sequence's masked sum divided
      by ``normalize_constant``, then the mean over sequences.
    - ``token_mean`` (DAPO; SFT's per-token mean): the masked sum divided by ``tokens_in_step``,
      the response tokens of the whole optimizer step (all microbatches, all ranks); without
      it, this microbatch's count times ``gradient_accumulation_steps``.

    The mean over sequences is ``sum / examples_in_step`` when ``examples_in_step`` (the
    sequences of the whole optimizer step) is given — exact for uneven microbatches, packing
    and data parallelism — and otherwise this microbatch's mean divided by
    ``gradient_accumulation_steps`` (equal when every microbatch holds as many sequences).

    A sequence with no loss tokens (a response masked out whole, e.g. truncated under
    ``--mask-truncated``) is out of the loss, as verl's aggregation treats it: it adds 0 to the
    value and to the gradient, and it is not one of the sequences the mean divides by. Callers
    count ``examples_in_step`` the same way (``sequences_with_loss_tokens``), so dropping such
    a row from the batch changes nothing, whatever the split over microbatches and ranks. A
    step with no loss token at all gives a loss of 0 with zero gradient (never 0 / 0).

    Args:
        per_token_loss: (batch, seq) float, the loss of each token (with gradient).
        response_mask: (batch, seq) bool, True on the tokens that count.
        aggregation: a ``LossAggregation`` name.
        gradient_accumulation_steps: microbatches per optimizer step (>= 1).
        normalize_constant: divisor of each sequence's sum (``sequence_sum`` only; required there).
        tokens_in_step: response tokens in the optimizer step (``token_mean``).
        examples_in_step: sequences in the optimizer step (``sequence_mean`` / ``sequence_sum``).

    Returns:
        0-d tensor (with gradient).
    """
    if per_token_loss.shape != response_mask.shape:
        raise ValueError(f"per-token loss {tuple(per_token_loss.shape)} and response_mask "
                         f"{tuple(response_mask.shape)} must have the same shape")
    if gradient_accumulation_steps < 1:
        raise ValueError(f"gradient_accumulation_steps must be >= 1, got {gradient_accumulation_steps}")
    mask = response_mask.bool()
    # 0 with a zero gradient: the value of a microbatch that has nothing to learn from
    nothing = masked_normalize(per_token_loss, mask, 1.0)
    if aggregation == "token_mean":
        tokens = int(mask.sum())
        denominator = tokens_in_step if tokens_in_step is not None else tokens * gradient_accumulation_steps
        if denominator < tokens or denominator < 0:
            raise ValueError(f"tokens_in_step ({denominator}) is fewer than this microbatch's {tokens} response "
                             "tokens; count the whole optimizer step")
        return nothing if tokens == 0 else masked_normalize(per_token_loss, mask, float(denominator))
    token_counts = mask.sum(dim=-1)
    if aggregation == "sequence_mean":
        # A count clamped to 1 only where the sum is over no token: the row's mean is 0, not 0 / 0.
        per_sequence = masked_normalize(per_token_loss, mask, 1.0, dim=-1) / token_counts.clamp(min=1)
    elif aggregation == "sequence_sum":
        if normalize_constant is None:
            raise ValueError("loss aggregation 'sequence_sum' needs normalize_constant")
        per_sequence = masked_normalize(per_token_loss, mask, normalize_constant, dim=-1)
    else:
        raise ValueError(f"unknown loss aggregation {aggregation!r}; expected sequence_mean, sequence_sum or token_mean")
    counted = sequences_with_loss_tokens(mask)
    if examples_in_step is not None:
        if examples_in_step < counted or examples_in_step < 0:
            raise ValueError(f"examples_in_step must be positive and at least this microbatch's {counted} sequences "
                             f"with loss tokens, got {examples_in_step}")
        return nothing if counted == 0 else per_sequence.sum() / examples_in_step
    if counted == 0:
        return nothing
    return per_sequence.sum() / counted / gradient_accumulation_steps


def sequences_with_loss_tokens(response_mask: torch.Tensor) -> int:
    """Returns how many rows of ``response_mask`` (batch, seq) bool hold at least one True: the sequences a per-sequence mean counts."""
    return int(response_mask.bool().any(dim=-1).sum())


def masked_metric_mean(tensor: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Returns the 0-d mean of ``tensor`` over ``mask`` for logging: 0 for a microbatch without a masked token (weighted by 0 tokens)."""
    return masked_normalize(tensor, mask, float(max(int(mask.bool().sum()), 1)))


def mask_truncated_responses(response_mask: torch.Tensor, truncated: torch.Tensor) -> torch.Tensor:
    """Returns ``response_mask`` with every row of a truncated response set to False, (batch, seq) bool.

    DAPO's overlong filtering (arXiv 2503.14476, section 3.4): a response cut by the length
    budget has no verdict on its reasoning, so its tokens leave the loss rather than being
    punished. Aggregations that divide by token counts must count with the returned mask.

    Args:
        response_mask: (batch, seq) bool.
        truncated: (batch,) bool, True where generation stopped at the budget (finish_reason "length").
    """
    if truncated.shape != response_mask.shape[:1]:
        raise ValueError(f"truncated {tuple(truncated.shape)} needs one flag per row of response_mask "
                         f"{tuple(response_mask.shape)}")
    return response_mask.bool() & ~truncated.bool().reshape(-1, 1)
