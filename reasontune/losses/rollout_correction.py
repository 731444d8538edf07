"""Rollout-engine mismatch: how far the generator's log-probs are from the trainer's, and weights that correct it.

The generator (vLLM, or HF with another kernel) samples from a distribution slightly off the
trainer's; these figures diagnose the gap and ``rollout_correction_weights`` reweights or masks
the per-token loss (``compute_policy_loss(rollout_weights=...)``).
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from reasontune.losses.policy import MAX_LOG_RATIO, clamped_log_ratio
from reasontune.losses.reductions import masked_mean

RolloutCorrection = Literal["none", "token_tis", "token_mask", "seq_tis", "seq_mask"]


def rollout_mismatch_metrics(
    trainer_log_probs: torch.Tensor,
    behaviour_log_probs: torch.Tensor,
    response_mask: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Returns 0-d float32 figures of how far the rollout engine's log-probs are from the trainer's on the same tokens.

    With ``d = trainer - behaviour`` per token (clamped to +-``MAX_LOG_RATIO``), ``w = exp(d)``
    the importance weight of the trainer's policy pi over the engine's mu, samples from mu:

    - ``mismatch_kl_k1``: mean of ``-d``, the k1 estimate of KL(mu || pi);
    - ``mismatch_kl_k3``: mean of ``w - 1 - d`` (>= 0 per token), the k3 estimate of KL(mu || pi);
    - ``mismatch_max_abs_log_ratio``: max of ``|d|``;
    - ``mismatch_token_ess``: ``(sum w)^2 / (N sum w^2)`` over the N tokens, in (0, 1], 1 when equal;
    - ``mismatch_seq_ess``: the same over responses with ``w_i = exp(sum_t d)``.

    These are the diagnostics of Yao et al. 2025 ("Your Efficient RL Framework Secretly Brings You
    Off-Policy RL Training", fengyao.notion.site/off-policy-rl) and of verl's rollout IS metrics.

    Args:
        trainer_log_probs: (batch, seq) float, the trainer's log-probs of the sampled tokens.
        behaviour_log_probs: (batch, seq) float, the generator's log-probs of the same tokens
            under the distribution it sampled from.
        response_mask: (batch, seq) bool, at least one true entry.
    """
    mask = response_mask.bool()
    log_ratio = clamped_log_ratio(trainer_log_probs.detach(), behaviour_log_probs.detach())
    zero = torch.zeros((), dtype=log_ratio.dtype, device=log_ratio.device)
    log_ratio = torch.where(mask, log_ratio, zero)
    weight = torch.exp(log_ratio)
    sequence_log_ratio = log_ratio.sum(dim=-1).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)

    def normalised_ess(log_weights: torch.Tensor) -> torch.Tensor:
        # Shifted by the max so the squares cannot overflow; the ratio is shift-invariant.
        shifted = torch.exp(log_weights - log_weights.max())
        return shifted.sum() ** 2 / (log_weights.numel() * (shifted ** 2).sum())

    return {
        "mismatch_kl_k1": masked_mean(-log_ratio, mask),
        "mismatch_kl_k3": masked_mean(weight - 1.0 - log_ratio, mask),
        "mismatch_max_abs_log_ratio": torch.where(mask, log_ratio.abs(), zero).max(),
        "mismatch_token_ess": normalised_ess(log_ratio[mask]),
        "mismatch_seq_ess": normalised_ess(sequence_log_ratio),
    }


def rollout_correction_weights(
    trainer_log_probs: torch.Tensor,
    behaviour_log_probs: torch.Tensor,
    response_mask: torch.Tensor,
    mode: RolloutCorrection,
    cap: float = 2.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Returns the detached per-token weights (batch, seq) float32 that correct rollout-engine mismatch, and metadata.

    ``w = exp(trainer - behaviour)`` (log-ratios clamped to +-``MAX_LOG_RATIO`` before ``exp``):

    - ``none``: all ones.
    - ``token_tis``: ``min(w_t, cap)``, truncated importance sampling per token (Yao et al. 2025,
      "Your Efficient RL Framework Secretly Brings You Off-Policy RL Training"; Ionides 2008).
    - ``seq_tis``: ``min(prod_t w_t, cap)`` of the whole response, broadcast over its tokens.
    - ``token_mask``: 1 where ``1/cap <= w_t <= cap``, else 0 (masked importance sampling: drop
      the tokens the engine and trainer disagree on instead of reweighting them; Liu, Yao et al.
      2025, "When Speed Kills Stability: Demystifying RL Collapse from the Training-Inference
      Mismatch", and verl's rollout_is "mask" mode).
    - ``seq_mask``: 1 for every token of a response whose ``prod_t w_t`` is within
      ``[1/cap, cap]``, else 0 (the whole response rejected).

    Multiply the per-token policy loss by the weights (``compute_policy_loss(rollout_weights=...)``).

    Args:
        trainer_log_probs: (batch, seq) float, the trainer's (old) log-probs of the sampled tokens.
        behaviour_log_probs: (batch, seq) float, the generator's log-probs of the same tokens.
        response_mask: (batch, seq) bool.
        mode: see above.
        cap: C > 1.

    Returns:
        weights: (batch, seq) float32, detached, 0 off the mask.
        metadata: 0-d ``rollout_capped_fraction`` (tokens whose weight was capped or masked out,
            over the mask) and ``rollout_weight_mean``.
    """
    if cap <= 1.0:
        raise ValueError(f"the rollout-correction cap must be > 1, got {cap}")
    mask = response_mask.bool()
    log_ratio = clamped_log_ratio(trainer_log_probs.detach(), behaviour_log_probs.detach())
    log_ratio = torch.where(mask, log_ratio, torch.zeros((), dtype=log_ratio.dtype, device=log_ratio.device))
    log_cap = math.log(cap)
    if mode == "none":
        weights, changed = torch.ones_like(log_ratio), torch.zeros_like(mask)
    elif mode in ("token_tis", "token_mask"):
        per_token = log_ratio
    elif mode in ("seq_tis", "seq_mask"):
        per_token = log_ratio.sum(dim=-1, keepdim=True).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO).expand_as(log_ratio)
    else:
        raise ValueError(f"unknown rollout correction {mode!r}; expected none, token_tis, token_mask, seq_tis or seq_mask")
    if mode.endswith("_tis"):
        weights, changed = torch.exp(per_token.clamp(max=log_cap)), per_token > log_cap
    elif mode.endswith("_mask"):
        changed = per_token.abs() > log_cap
        weights = (~changed).to(log_ratio.dtype)
    weights = torch.where(mask, weights, torch.zeros((), dtype=weights.dtype, device=weights.device))
    return weights, {"rollout_capped_fraction": masked_mean((changed & mask).float(), mask),
                     "rollout_weight_mean": masked_mean(weights, mask)}
