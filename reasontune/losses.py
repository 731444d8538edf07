"""Masked reductions, SFT and policy-gradient losses, and the microbatch train steps.

Gradient-accumulation scaling and loss aggregation live here and nowhere else: the trainers
(SFT, expert iteration, GRPO) call the microbatch steps and never re-derive them.
Pure functions of their arguments (the train steps also call ``backward``).
"""

from __future__ import annotations

import math
from typing import Callable, Literal, Sequence

import torch

PolicyGradientLossType = Literal["no_baseline", "reinforce_with_baseline", "grpo_clip"]
# One set of names for the per-token-loss → scalar reductions, shared by SFT and GRPO (see aggregate_loss).
LossAggregation = Literal["sequence_mean", "sequence_sum", "token_mean"]
# Earlier names of the same reductions, still accepted: SFT's "constant" and GRPO's "sequence_sum_constant".
AGGREGATION_ALIASES = {"constant": "sequence_sum", "sequence_sum_constant": "sequence_sum"}


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
    - ``sequence_sum`` (the design's SFT default; Dr. GRPO): each sequence's masked sum divided
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
        aggregation: a ``LossAggregation`` name (or an alias in ``AGGREGATION_ALIASES``).
        gradient_accumulation_steps: microbatches per optimizer step (>= 1).
        normalize_constant: divisor of each sequence's sum (``sequence_sum`` only; required there).
        tokens_in_step: response tokens in the optimizer step (``token_mean``).
        examples_in_step: sequences in the optimizer step (``sequence_mean`` / ``sequence_sum``).

    Returns:
        0-d tensor (with gradient).
    """
    aggregation = AGGREGATION_ALIASES.get(aggregation, aggregation)
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


def _metric_mean(tensor: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Returns the 0-d mean of ``tensor`` over ``mask`` for logging: 0 for a microbatch without a masked token (weighted by 0 tokens)."""
    return masked_normalize(tensor, mask, float(max(int(mask.bool().sum()), 1)))


def sequences_with_loss_tokens(response_mask: torch.Tensor) -> int:
    """Returns how many rows of ``response_mask`` (batch, seq) bool hold at least one True: the sequences a per-sequence mean counts."""
    return int(response_mask.bool().any(dim=-1).sum())


def sft_microbatch_train_step(
    policy_log_probs: torch.Tensor,
    response_mask: torch.Tensor,
    gradient_accumulation_steps: int,
    normalize_constant: float = 1.0,
    normalization: LossAggregation = "sequence_sum",
    tokens_in_step: int | None = None,
    examples_in_step: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Returns ``(loss, metadata)`` of one SFT microbatch after calling ``loss.backward()``.

    The loss is ``aggregate_loss(-policy_log_probs, response_mask, normalization, …)``. With the
    default ``normalization="sequence_sum"`` (the design's semantics, formerly named
    ``"constant"``, still accepted)::

        loss = masked_normalize(-policy_log_probs, response_mask, normalize_constant, dim=-1).mean()
               / gradient_accumulation_steps

    ``"token_mean"`` is the mean NLL over the response tokens of the whole optimizer step
    (``tokens_in_step``; without it, this microbatch's count times the accumulation steps,
    which weights microbatches rather than tokens). ``examples_in_step`` serves microbatches
    whose rows are not examples (packing) or whose sizes vary (dynamic batching, several
    ranks): the per-sequence sums are divided by it instead of averaged per microbatch,
    which equals the formula above when every microbatch holds ``batch`` unpacked examples.

    Args:
        policy_log_probs: (batch, seq) float, per-token log-probabilities of the labels.
        response_mask: (batch, seq) bool, True on response tokens.
        gradient_accumulation_steps: microbatches per optimizer step.
        normalize_constant: divisor of the per-sequence sum (``sequence_sum`` only).
        normalization: a ``LossAggregation`` name: "sequence_sum", "token_mean" or "sequence_mean".
        tokens_in_step: response tokens in the whole optimizer step (token_mean only).
        examples_in_step: examples in the whole optimizer step (per-sequence reductions).

    Returns:
        loss: 0-d tensor, the value that was back-propagated.
        metadata: ``masked_nll_sum`` (0-d, detached: summed NLL of this microbatch's response
            tokens), ``num_response_tokens`` (0-d int64) and ``mean_token_nll`` (0-d, detached).
    """
    if policy_log_probs.shape != response_mask.shape:
        raise ValueError(f"policy_log_probs {tuple(policy_log_probs.shape)} and response_mask "
                         f"{tuple(response_mask.shape)} must have the same shape")
    loss = aggregate_loss(-policy_log_probs, response_mask, normalization, gradient_accumulation_steps,
                          normalize_constant=normalize_constant, tokens_in_step=tokens_in_step,
                          examples_in_step=examples_in_step)
    loss.backward()
    num_tokens = response_mask.sum()
    nll_sum = masked_normalize(-policy_log_probs.detach(), response_mask, 1.0)
    return loss.detach(), {
        "masked_nll_sum": nll_sum,
        "num_response_tokens": num_tokens,
        "mean_token_nll": nll_sum / num_tokens.clamp(min=1),
    }


def compute_group_normalized_rewards(
    reward_fn: Callable[[str, str], dict[str, float]],
    rollout_responses: Sequence[str],
    repeated_ground_truths: Sequence[str],
    group_size: int,
    advantage_eps: float,
    normalize_by_std: bool,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """Returns ``(advantages, raw_rewards, metadata)`` with rewards normalised within each group.

    ``advantages = (r - group mean) / (group std + advantage_eps)`` with the unbiased std, or
    ``r - group mean`` when ``normalize_by_std`` is False.

    Args:
        reward_fn: (response, ground_truth) -> dict with "reward" (and optionally
            "format_reward", "answer_reward").
        rollout_responses: n_prompts * group_size responses, each group contiguous.
        repeated_ground_truths: the ground truth of each response (repeated per group).
        group_size: responses per prompt.
        advantage_eps: added to the std to avoid dividing by zero.
        normalize_by_std: divide by the group std or not.

    Returns:
        advantages: (rollout_batch_size,) float32.
        raw_rewards: (rollout_batch_size,) float32.
        metadata: reward mean/std/min/max and the mean format/answer rewards.
    """
    if len(rollout_responses) != len(repeated_ground_truths):
        raise ValueError(f"got {len(rollout_responses)} responses but {len(repeated_ground_truths)} ground truths")
    if group_size < 1 or len(rollout_responses) % group_size != 0:
        raise ValueError(f"{len(rollout_responses)} responses do not split into groups of {group_size}")
    scores = [reward_fn(response, truth) for response, truth in zip(rollout_responses, repeated_ground_truths)]
    raw_rewards = torch.tensor([float(s["reward"]) for s in scores], dtype=torch.float32)
    grouped = raw_rewards.view(-1, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if normalize_by_std:
        centred = centred / (grouped.std(dim=1, keepdim=True) + advantage_eps)
    metadata = {
        "reward_mean": float(raw_rewards.mean()),
        "reward_std": float(raw_rewards.std()) if raw_rewards.numel() > 1 else 0.0,
        "reward_min": float(raw_rewards.min()),
        "reward_max": float(raw_rewards.max()),
    }
    for key in ("format_reward", "answer_reward"):
        if all(key in s for s in scores):
            metadata[f"{key}_mean"] = sum(float(s[key]) for s in scores) / len(scores)
    return centred.reshape(-1), raw_rewards, metadata


def compute_naive_policy_gradient_loss(
    raw_rewards_or_advantages: torch.Tensor,
    policy_log_probs: torch.Tensor,
) -> torch.Tensor:
    """Returns the per-token REINFORCE loss ``-A * log_probs``, (batch, seq).

    Args:
        raw_rewards_or_advantages: (batch, 1) or (batch,) float, one scalar per response.
        policy_log_probs: (batch, seq) float.
    """
    advantages = raw_rewards_or_advantages.reshape(-1, 1).to(policy_log_probs.dtype)
    return -advantages * policy_log_probs


def compute_grpo_clip_loss(
    advantages: torch.Tensor,
    policy_log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    cliprange: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Returns ``(-min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A), metadata)``, per token.

    Args:
        advantages: (batch, 1) or (batch,) float.
        policy_log_probs: (batch, seq) float, current policy (with gradient).
        old_log_probs: (batch, seq) float, the policy that sampled the rollouts (no gradient).
        cliprange: epsilon of the clip.

    Returns:
        loss: (batch, seq).
        metadata: ``clipped`` (batch, seq) bool, True where the clipped term was the smaller
            (the token's gradient is cut), and ``ratio`` (batch, seq), detached.
    """
    advantages = advantages.reshape(-1, 1).to(policy_log_probs.dtype)
    ratio = torch.exp(policy_log_probs - old_log_probs)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange) * advantages
    loss = -torch.minimum(unclipped, clipped)
    return loss, {"clipped": clipped < unclipped, "ratio": ratio.detach()}


def compute_policy_gradient_loss(
    policy_log_probs: torch.Tensor,
    loss_type: PolicyGradientLossType,
    raw_rewards: torch.Tensor | None = None,
    advantages: torch.Tensor | None = None,
    old_log_probs: torch.Tensor | None = None,
    cliprange: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Returns the per-token policy-gradient loss (batch, seq) of ``loss_type`` and its metadata.

    - ``no_baseline``: needs ``raw_rewards`` (batch, 1).
    - ``reinforce_with_baseline``: needs ``advantages`` (batch, 1).
    - ``grpo_clip``: needs ``advantages``, ``old_log_probs`` (batch, seq) and ``cliprange``.
    """
    def require(**arguments):
        missing = [name for name, value in arguments.items() if value is None]
        if missing:
            raise ValueError(f"loss_type {loss_type!r} needs {', '.join(missing)}")

    if loss_type == "no_baseline":
        require(raw_rewards=raw_rewards)
        return compute_naive_policy_gradient_loss(raw_rewards, policy_log_probs), {}
    if loss_type == "reinforce_with_baseline":
        require(advantages=advantages)
        return compute_naive_policy_gradient_loss(advantages, policy_log_probs), {}
    if loss_type == "grpo_clip":
        require(advantages=advantages, old_log_probs=old_log_probs, cliprange=cliprange)
        return compute_grpo_clip_loss(advantages, policy_log_probs, old_log_probs, cliprange)
    raise ValueError(f"unknown loss_type {loss_type!r}; expected no_baseline, reinforce_with_baseline or grpo_clip")


def compute_k3_kl(policy_log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    """Returns the per-token k3 estimate of KL(policy || reference), (batch, seq), >= 0.

    ``k3 = exp(ref - policy) - (ref - policy) - 1`` (Schulman's unbiased, non-negative
    estimator, as in DeepSeekMath's GRPO). It is 0 with gradient 0 wherever the two agree:
    d k3 / d policy = 1 - exp(ref - policy).

    Args:
        policy_log_probs: (batch, seq) float, with gradient.
        ref_log_probs: (batch, seq) float, the frozen reference model's (no gradient).
    """
    delta = ref_log_probs.to(policy_log_probs.dtype) - policy_log_probs
    return torch.exp(delta) - delta - 1.0


def grpo_microbatch_train_step(
    policy_log_probs: torch.Tensor,
    response_mask: torch.Tensor,
    gradient_accumulation_steps: int,
    loss_type: "PolicyLossType",
    raw_rewards: torch.Tensor | None = None,
    advantages: torch.Tensor | None = None,
    old_log_probs: torch.Tensor | None = None,
    cliprange: float | None = None,
    loss_aggregation: LossAggregation = "sequence_mean",
    normalize_constant: float | None = None,
    tokens_in_step: int | None = None,
    ref_log_probs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    examples_in_step: int | None = None,
    cliprange_high: float | None = None,
    dual_clip_c: float | None = None,
    rollout_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Returns ``(loss, metadata)`` of one policy-gradient microbatch after ``loss.backward()``.

    With ``kl_coef > 0``, ``kl_coef * compute_k3_kl(policy_log_probs, ref_log_probs)`` is added
    to each token's policy-gradient loss before aggregation, so the penalty is aggregated and
    scaled exactly like the loss it regularises.

    The per-token loss becomes the microbatch's scalar through ``aggregate_loss`` (the one
    place for it): ``sequence_mean`` (default, GRPO), ``sequence_sum`` (Dr. GRPO; formerly
    ``sequence_sum_constant``, still accepted; ``normalize_constant`` required, e.g. the
    maximum response length) or ``token_mean`` (DAPO; over ``tokens_in_step``), with
    gradient-accumulation scaling (or ``examples_in_step``) as documented there.

    Args:
        policy_log_probs: (batch, seq) float, with gradient.
        response_mask: (batch, seq) bool.
        gradient_accumulation_steps: microbatches per optimizer step.
        loss_type, raw_rewards, advantages, old_log_probs, cliprange: as in
            ``compute_policy_gradient_loss``.
        loss_aggregation, normalize_constant, tokens_in_step, examples_in_step: see ``aggregate_loss``.
        cliprange_high: eps_high of the clip (None: ``cliprange``; DAPO's clip-higher when larger;
            the only bound CISPO uses).
        dual_clip_c: the dual-clip bound for negative advantages (None: off).
        rollout_weights: (batch, seq) detached importance weights against the rollout engine
            (``rollout_correction_weights``), multiplying each token's loss.
        ref_log_probs: (batch, seq) float, the reference model's log-probs (needed when
            ``kl_coef > 0``; when given with ``kl_coef == 0`` the KL is only reported).
        kl_coef: weight of the per-token k3 KL penalty (0: off).

    Returns:
        loss: 0-d detached tensor, the back-propagated value.
        metadata: the loss function's metadata plus ``clip_fraction``, ``clip_fraction_low`` and
            ``clip_fraction_high`` (fractions of response tokens clipped; 0 for REINFORCE losses),
            ``num_response_tokens`` and, with ``ref_log_probs``, ``kl``
            (0-d, the mean k3 KL over response tokens, detached).
    """
    if policy_log_probs.shape != response_mask.shape:
        raise ValueError(f"policy_log_probs {tuple(policy_log_probs.shape)} and response_mask "
                         f"{tuple(response_mask.shape)} must have the same shape")
    # The per-token objective: the design's three loss types, plus GSPO and CISPO, clip-higher
    # (cliprange_high), dual clip and rollout-engine correction weights (compute_policy_loss).
    per_token, metadata = compute_policy_loss(
        loss_type, policy_log_probs, response_mask, advantages=advantages, raw_rewards=raw_rewards,
        old_log_probs=old_log_probs, eps_low=None if loss_type == "cispo" else cliprange,
        eps_high=cliprange_high if cliprange_high is not None else cliprange, dual_clip_c=dual_clip_c,
        rollout_weights=rollout_weights,
    )
    kl = None
    if kl_coef < 0:
        raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
    if kl_coef > 0 and ref_log_probs is None:
        raise ValueError("kl_coef > 0 needs ref_log_probs (the reference model's per-token log-probs)")
    if ref_log_probs is not None:
        kl = compute_k3_kl(policy_log_probs, ref_log_probs)
        if kl_coef > 0:
            per_token = per_token + kl_coef * kl
    loss = aggregate_loss(per_token, response_mask, loss_aggregation, gradient_accumulation_steps,
                          normalize_constant=normalize_constant, tokens_in_step=tokens_in_step,
                          examples_in_step=examples_in_step)
    loss.backward()
    metadata = dict(metadata)
    metadata["num_response_tokens"] = response_mask.sum()
    if kl is not None:
        metadata["kl"] = _metric_mean(kl.detach(), response_mask)
    return loss.detach(), metadata


# =============================================================================================
# The 2026 objectives (issue 12): clip-higher and dual-clip, GSPO, CISPO, RLOO and
# batch-normalised advantages, overlong shaping, rollout-engine mismatch correction, and one
# per-token dispatcher over every loss type. Each function returns a per-token (or per-response)
# tensor; aggregation and accumulation scaling stay in the microbatch step functions above.

PolicyLossType = Literal["no_baseline", "reinforce_with_baseline", "grpo_clip", "gspo", "cispo"]
AdvantageBaseline = Literal["group_mean", "leave_one_out", "batch_mean"]
AdvantageStd = Literal["group", "batch", "none"]
RolloutCorrection = Literal["none", "token_tis", "token_mask", "seq_tis", "seq_mask"]

# exp(20) is about 4.9e8: far beyond any clip or cap, and finite in float32 (ratios are taken in
# float32 or wider, whatever the log-probs' dtype).
MAX_LOG_RATIO = 20.0


def clamped_log_ratio(log_probs: torch.Tensor, other_log_probs: torch.Tensor,
                      max_log_ratio: float = MAX_LOG_RATIO) -> torch.Tensor:
    """Returns ``clamp(log_probs - other_log_probs, -max_log_ratio, max_log_ratio)`` (same shape, float32 or wider).

    The clamp happens before any ``exp``, so a ratio is at most ``exp(max_log_ratio)`` and never
    inf (verl clamps at 20 for the same reason). Outside the clamp the gradient is 0.

    Args:
        log_probs: (...) float, numerator log-probabilities (may carry gradient).
        other_log_probs: same shape, denominator log-probabilities.
    """
    dtype = torch.promote_types(log_probs.dtype, torch.float32)
    difference = log_probs.to(dtype) - other_log_probs.to(dtype)
    return difference.clamp(-max_log_ratio, max_log_ratio)


def compute_clip_higher_loss(
    advantages: torch.Tensor,
    policy_log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    eps_low: float,
    eps_high: float,
    dual_clip_c: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Returns the per-token PPO loss with asymmetric clip range and optional dual clip, (batch, seq), and metadata.

    ``loss = -min(r * A, clip(r, 1 - eps_low, 1 + eps_high) * A)`` with ``r = exp(policy - old)``.
    ``eps_high > eps_low`` is DAPO's clip-higher (Yu et al. 2025, arXiv 2503.14476, section 3.1:
    0.2 / 0.28), which leaves low-probability tokens room to grow. ``eps_low == eps_high`` is
    ``compute_grpo_clip_loss``.

    Dual clip (Ye et al. 2020, "Mastering Complex Control in MOBA Games with Deep RL", arXiv
    1912.09729): for ``A < 0`` the objective is also bounded below by ``c * A`` (``c > 1``), so a
    token whose ratio has grown far above 1 cannot contribute an unbounded loss:
    ``loss = min(-min(r A, clip(r) A), -c A)`` where ``A < 0``.

    Args:
        advantages: (batch, 1) or (batch,) float.
        policy_log_probs: (batch, seq) float, current policy (with gradient).
        old_log_probs: (batch, seq) float, the policy that sampled the rollouts.
        eps_low, eps_high: the clip range is ``[1 - eps_low, 1 + eps_high]``.
        dual_clip_c: the lower bound's ``c`` (> 1), or None for no dual clip.

    Returns:
        loss: (batch, seq) float.
        metadata: bool (batch, seq) maps ``clipped_low`` (A < 0 and r < 1 - eps_low: gradient
            cut), ``clipped_high`` (A > 0 and r > 1 + eps_high: gradient cut), ``dual_clipped``
            (A < 0 and r > c: gradient cut) and ``clipped`` (any of them); ``ratio`` (batch, seq), detached.
    """
    if eps_low < 0 or eps_high < 0:
        raise ValueError(f"clip epsilons must be >= 0, got eps_low={eps_low}, eps_high={eps_high}")
    if dual_clip_c is not None and dual_clip_c <= 1.0:
        raise ValueError(f"dual_clip_c must be > 1 (Ye et al. use 3), got {dual_clip_c}")
    advantages = advantages.reshape(-1, 1).to(policy_log_probs.dtype)
    ratio = torch.exp(clamped_log_ratio(policy_log_probs, old_log_probs)).to(policy_log_probs.dtype)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * advantages
    loss = -torch.minimum(unclipped, clipped)
    negative, positive = advantages < 0, advantages > 0
    dual_clipped = torch.zeros_like(ratio, dtype=torch.bool)
    if dual_clip_c is not None:
        loss = torch.where(negative, torch.minimum(loss, -dual_clip_c * advantages), loss)
        dual_clipped = negative & (ratio > dual_clip_c)
    clipped_low = negative & (ratio < 1.0 - eps_low)
    clipped_high = positive & (ratio > 1.0 + eps_high)
    return loss, {"clipped_low": clipped_low, "clipped_high": clipped_high, "dual_clipped": dual_clipped,
                  "clipped": clipped_low | clipped_high | dual_clipped, "ratio": ratio.detach()}


def compute_gspo_loss(
    advantages: torch.Tensor,
    policy_log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    response_mask: torch.Tensor,
    eps_low: float,
    eps_high: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Returns the per-token GSPO loss (batch, seq), to be aggregated with ``sequence_mean``, and metadata.

    GSPO (Zheng et al. 2025, "Group Sequence Policy Optimization", arXiv 2507.18071) clips one
    importance ratio per response, the length-normalised (geometric-mean) sequence ratio
    ``s_i = exp(mean_t (policy - old))`` over the response tokens, with a tiny range (the paper's
    3e-4 / 4e-4): ``J_i = min(s_i A_i, clip(s_i, 1 - eps_low, 1 + eps_high) A_i)``.

    Written as GSPO-token (the paper's eq. 13): each token carries
    ``s_i,t = sg(s_i) * exp(policy_t - sg(policy_t))``, equal in value to ``s_i``, whose gradient
    is ``s_i * grad policy_t``. The per-token loss is ``-min(s_i,t A, clip(s_i,t) A)``, so
    ``sequence_mean`` aggregation (the mean over each response's tokens, then over responses)
    gives exactly GSPO's gradient ``-A_i grad s_i`` when unclipped and 0 when clipped.

    Args:
        advantages: (batch, 1) or (batch,) float.
        policy_log_probs: (batch, seq) float, current policy (with gradient).
        old_log_probs: (batch, seq) float.
        response_mask: (batch, seq) bool; a row without a true entry has sequence ratio 1 and
            must stay out of the aggregation (``aggregate_loss`` leaves it out).
        eps_low, eps_high: the sequence ratio's clip range ``[1 - eps_low, 1 + eps_high]``.

    Returns:
        loss: (batch, seq) float (zero off the mask is not guaranteed: aggregate with the mask).
        metadata: ``sequence_ratio`` (batch,) detached; bool (batch, seq) maps ``clipped_low``,
            ``clipped_high`` and ``clipped`` (the response's sequence clip, broadcast over its tokens).
    """
    advantages = advantages.reshape(-1, 1).to(policy_log_probs.dtype)
    mask = response_mask.bool()
    log_ratio = clamped_log_ratio(policy_log_probs, old_log_probs)
    # A row with no response token (masked out whole) gets log-ratio 0, ratio 1, as in verl (its
    # length clamped to 1); its loss is never counted, since every aggregation leaves such a row out.
    mean_log_ratio = (masked_normalize(log_ratio, mask, 1.0, dim=-1) / mask.sum(dim=-1).clamp(min=1)
                      ).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
    token_log_ratio = mean_log_ratio.detach().unsqueeze(-1) + policy_log_probs - policy_log_probs.detach()
    ratio = torch.exp(token_log_ratio).to(policy_log_probs.dtype)
    loss = -torch.minimum(ratio * advantages, torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * advantages)
    sequence_ratio = torch.exp(mean_log_ratio.detach())
    clipped_low = ((advantages < 0) & (sequence_ratio.unsqueeze(-1) < 1.0 - eps_low)).expand_as(mask)
    clipped_high = ((advantages > 0) & (sequence_ratio.unsqueeze(-1) > 1.0 + eps_high)).expand_as(mask)
    return loss, {"sequence_ratio": sequence_ratio, "clipped_low": clipped_low, "clipped_high": clipped_high,
                  "clipped": clipped_low | clipped_high, "ratio": ratio.detach()}


def compute_cispo_loss(
    advantages: torch.Tensor,
    policy_log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    eps_high: float,
    eps_low: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Returns the per-token CISPO loss ``-sg(clip(r, 1 - eps_low, 1 + eps_high)) * A * log_probs``, (batch, seq), and metadata.

    CISPO (MiniMax 2025, "MiniMax-M1", arXiv 2506.13585, eq. 4-5) clips the importance-sampling
    weight instead of the update: the clipped ratio is a constant (stop-gradient) that scales a
    REINFORCE term, so every token keeps a gradient ``-clip(r) * A * grad log_probs``, including
    the rare high-ratio "fork" tokens that PPO's clip would silence. The paper sets no lower
    bound (``eps_low`` None: the weight is only capped above) and tunes ``eps_high``.

    Args:
        advantages: (batch, 1) or (batch,) float.
        policy_log_probs: (batch, seq) float, current policy (with gradient).
        old_log_probs: (batch, seq) float.
        eps_high: the weight is at most ``1 + eps_high``.
        eps_low: the weight is at least ``1 - eps_low`` (None: no lower bound).

    Returns:
        loss: (batch, seq) float.
        metadata: ``weight`` (batch, seq) the clipped IS weight, detached; bool (batch, seq)
            ``clipped_high`` (r > 1 + eps_high), ``clipped_low`` (r < 1 - eps_low) and
            ``clipped`` (either: the weight was changed, the gradient still flows).
    """
    advantages = advantages.reshape(-1, 1).to(policy_log_probs.dtype)
    ratio = torch.exp(clamped_log_ratio(policy_log_probs, old_log_probs)).detach().to(policy_log_probs.dtype)
    low = None if eps_low is None else 1.0 - eps_low
    weight = torch.clamp(ratio, min=low, max=1.0 + eps_high)
    loss = -weight * advantages * policy_log_probs
    clipped_high = ratio > 1.0 + eps_high
    clipped_low = torch.zeros_like(clipped_high) if low is None else ratio < low
    return loss, {"weight": weight, "clipped_low": clipped_low, "clipped_high": clipped_high,
                  "clipped": clipped_low | clipped_high, "ratio": ratio}


def compute_policy_loss(
    loss_type: PolicyLossType,
    policy_log_probs: torch.Tensor,
    response_mask: torch.Tensor,
    advantages: torch.Tensor | None = None,
    raw_rewards: torch.Tensor | None = None,
    old_log_probs: torch.Tensor | None = None,
    eps_low: float | None = None,
    eps_high: float | None = None,
    dual_clip_c: float | None = None,
    rollout_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Returns the per-token loss (batch, seq) of ``loss_type`` and its metadata with low/high clip fractions.

    - ``no_baseline``: ``-raw_rewards * log_probs``.
    - ``reinforce_with_baseline``: ``-advantages * log_probs``.
    - ``grpo_clip``: ``compute_clip_higher_loss`` (PPO clip; clip-higher when ``eps_high >
      eps_low``; dual clip with ``dual_clip_c``).
    - ``gspo``: ``compute_gspo_loss`` (aggregate with ``sequence_mean``).
    - ``cispo``: ``compute_cispo_loss`` (``eps_low`` None: no lower bound; aggregate with ``token_mean``).

    ``rollout_weights`` (batch, seq), from ``rollout_correction_weights``, multiply the per-token
    loss (detached): the truncated or masked importance weight between the trainer's old
    log-probs and the rollout engine's.

    Args:
        loss_type: one of the above.
        policy_log_probs: (batch, seq) float, with gradient.
        response_mask: (batch, seq) bool: the tokens the fractions are taken over (and GSPO's lengths).
        advantages: (batch,) or (batch, 1) float; raw_rewards: the same, for ``no_baseline``.
        old_log_probs: (batch, seq) float, needed by grpo_clip, gspo and cispo.
        eps_low, eps_high: clip range; grpo_clip and gspo need both, cispo needs ``eps_high``.
        dual_clip_c: grpo_clip's dual-clip bound (None: off).
        rollout_weights: (batch, seq) float or None.

    Returns:
        loss: (batch, seq) float.
        metadata: the loss function's maps plus 0-d detached ``clip_fraction``,
            ``clip_fraction_low`` and ``clip_fraction_high`` (over ``response_mask``; 0 for the
            REINFORCE losses) and, with ``rollout_weights``, ``rollout_weight_mean``.
    """
    def require(**arguments):
        missing = [name for name, value in arguments.items() if value is None]
        if missing:
            raise ValueError(f"loss_type {loss_type!r} needs {', '.join(missing)}")

    if policy_log_probs.shape != response_mask.shape:
        raise ValueError(f"policy_log_probs {tuple(policy_log_probs.shape)} and response_mask "
                         f"{tuple(response_mask.shape)} must have the same shape")
    if loss_type == "no_baseline":
        require(raw_rewards=raw_rewards)
        loss, metadata = compute_naive_policy_gradient_loss(raw_rewards, policy_log_probs), {}
    elif loss_type == "reinforce_with_baseline":
        require(advantages=advantages)
        loss, metadata = compute_naive_policy_gradient_loss(advantages, policy_log_probs), {}
    elif loss_type == "grpo_clip":
        require(advantages=advantages, old_log_probs=old_log_probs, eps_low=eps_low, eps_high=eps_high)
        loss, metadata = compute_clip_higher_loss(advantages, policy_log_probs, old_log_probs, eps_low, eps_high,
                                                  dual_clip_c)
    elif loss_type == "gspo":
        require(advantages=advantages, old_log_probs=old_log_probs, eps_low=eps_low, eps_high=eps_high)
        loss, metadata = compute_gspo_loss(advantages, policy_log_probs, old_log_probs, response_mask,
                                           eps_low, eps_high)
    elif loss_type == "cispo":
        require(advantages=advantages, old_log_probs=old_log_probs, eps_high=eps_high)
        loss, metadata = compute_cispo_loss(advantages, policy_log_probs, old_log_probs, eps_high, eps_low)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected no_baseline, reinforce_with_baseline, "
                         "grpo_clip, gspo or cispo")
    metadata = dict(metadata)
    for suffix in ("", "_low", "_high"):
        flags = metadata.get(f"clipped{suffix}")
        metadata[f"clip_fraction{suffix}"] = (_metric_mean(flags.float(), response_mask) if flags is not None
                                              else torch.zeros((), device=policy_log_probs.device))
    if rollout_weights is not None:
        if rollout_weights.shape != policy_log_probs.shape:
            raise ValueError(f"rollout_weights {tuple(rollout_weights.shape)} must have the shape of policy_log_probs "
                             f"{tuple(policy_log_probs.shape)}")
        loss = loss * rollout_weights.detach().to(loss.dtype)
        metadata["rollout_weight_mean"] = _metric_mean(rollout_weights.detach().float(), response_mask)
    return loss, metadata


def compute_advantages(
    rewards: torch.Tensor,
    group_size: int,
    baseline: AdvantageBaseline = "group_mean",
    std_normalization: AdvantageStd = "group",
    advantage_eps: float = 1e-6,
) -> torch.Tensor:
    """Returns the advantage of each response, (n,) float32, from its scalar reward.

    Baselines (subtracted from each reward):

    - ``group_mean``: the mean of the response's group (GRPO, Shao et al. 2024, arXiv 2402.03300).
    - ``leave_one_out``: the mean of the *other* ``G - 1`` rewards of its group (RLOO, Ahmadian
      et al. 2024, "Back to Basics", arXiv 2402.14740), ``= G / (G - 1) * (r - group mean)``.
    - ``batch_mean``: the mean of the whole batch (REINFORCE++, Hu et al. 2025, arXiv 2501.03262).

    Then divided by (std + ``advantage_eps``): ``group`` (GRPO: the unbiased std of the response's
    group), ``batch`` (REINFORCE++: the unbiased std of all the centred advantages; with
    ``group_mean`` this is REINFORCE++-baseline) or ``none`` (Dr. GRPO, RLOO).

    Args:
        rewards: (n,) float, n = groups * group_size, each group contiguous.
        group_size: responses per prompt (>= 2 for leave_one_out).
        baseline, std_normalization, advantage_eps: see above.
    """
    rewards = rewards.reshape(-1).to(torch.float32)
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.view(-1, group_size)
    if baseline == "group_mean":
        centred = grouped - grouped.mean(dim=1, keepdim=True)
    elif baseline == "leave_one_out":
        if group_size < 2:
            raise ValueError("the leave-one-out baseline needs group_size >= 2")
        centred = grouped - (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)
    elif baseline == "batch_mean":
        centred = grouped - rewards.mean()
    else:
        raise ValueError(f"unknown advantage baseline {baseline!r}; expected group_mean, leave_one_out or batch_mean")
    if std_normalization == "group":
        centred = centred / (grouped.std(dim=1, keepdim=True) + advantage_eps)
    elif std_normalization == "batch":
        spread = centred.std() if centred.numel() > 1 else torch.zeros(())
        centred = centred / (spread + advantage_eps)
    elif std_normalization != "none":
        raise ValueError(f"unknown std normalisation {std_normalization!r}; expected group, batch or none")
    return centred.reshape(-1)


def overlong_penalty(
    response_lengths: torch.Tensor,
    max_response_length: int,
    buffer_length: int,
    penalty_factor: float = 1.0,
) -> torch.Tensor:
    """Returns DAPO's soft overlong penalty of each response, (n,) float32, <= 0, to add to its reward.

    DAPO (arXiv 2503.14476, eq. 13, "soft overlong punishment"), with ``L_max =
    max_response_length`` and ``L_cache = buffer_length``: 0 up to ``L_max - L_cache`` tokens,
    then linear ``(L_max - L_cache - length) / L_cache`` down to -1 at ``L_max``, and -1 beyond;
    all times ``penalty_factor``.

    Args:
        response_lengths: (n,) int or float, response tokens of each response.
        max_response_length: L_max (the generation budget).
        buffer_length: L_cache, 1 <= L_cache <= L_max.
        penalty_factor: scale of the penalty (DAPO: 1).
    """
    if not 1 <= buffer_length <= max_response_length:
        raise ValueError(f"need 1 <= buffer_length ({buffer_length}) <= max_response_length ({max_response_length})")
    lengths = response_lengths.to(torch.float32)
    expected = max_response_length - buffer_length
    penalty = ((expected - lengths) / buffer_length).clamp(min=-1.0, max=0.0)
    return penalty * penalty_factor


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
