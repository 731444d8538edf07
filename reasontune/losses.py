"""Masked reductions, SFT and policy-gradient losses, and the microbatch train steps.

Gradient-accumulation scaling and loss aggregation live here and nowhere else: the trainers
(SFT, expert iteration, GRPO) call the microbatch steps and never re-derive them.
Pure functions of their arguments (the train steps also call ``backward``).
"""

from __future__ import annotations

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
    if aggregation == "token_mean":
        denominator = tokens_in_step if tokens_in_step is not None else (
            int(response_mask.sum()) * gradient_accumulation_steps)
        if denominator <= 0:
            raise ValueError("token_mean aggregation needs at least one response token in the step")
        return masked_normalize(per_token_loss, response_mask, float(denominator))
    if aggregation == "sequence_mean":
        per_sequence = masked_mean(per_token_loss, response_mask, dim=-1)
    elif aggregation == "sequence_sum":
        if normalize_constant is None:
            raise ValueError("loss aggregation 'sequence_sum' needs normalize_constant")
        per_sequence = masked_normalize(per_token_loss, response_mask, normalize_constant, dim=-1)
    else:
        raise ValueError(f"unknown loss aggregation {aggregation!r}; expected sequence_mean, sequence_sum or token_mean")
    if examples_in_step is not None:
        if examples_in_step <= 0:
            raise ValueError(f"examples_in_step must be positive, got {examples_in_step}")
        return per_sequence.sum() / examples_in_step
    return per_sequence.mean() / gradient_accumulation_steps


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
    loss_type: PolicyGradientLossType,
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
        ref_log_probs: (batch, seq) float, the reference model's log-probs (needed when
            ``kl_coef > 0``; when given with ``kl_coef == 0`` the KL is only reported).
        kl_coef: weight of the per-token k3 KL penalty (0: off).

    Returns:
        loss: 0-d detached tensor, the back-propagated value.
        metadata: the loss function's metadata plus ``clip_fraction`` (grpo_clip: fraction of
            response tokens clipped), ``num_response_tokens`` and, with ``ref_log_probs``, ``kl``
            (0-d, the mean k3 KL over response tokens, detached).
    """
    if policy_log_probs.shape != response_mask.shape:
        raise ValueError(f"policy_log_probs {tuple(policy_log_probs.shape)} and response_mask "
                         f"{tuple(response_mask.shape)} must have the same shape")
    per_token, metadata = compute_policy_gradient_loss(
        policy_log_probs, loss_type, raw_rewards=raw_rewards, advantages=advantages,
        old_log_probs=old_log_probs, cliprange=cliprange,
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
    if "clipped" in metadata:
        metadata["clip_fraction"] = masked_mean(metadata["clipped"].float(), response_mask)
    if kl is not None:
        metadata["kl"] = masked_mean(kl.detach(), response_mask)
    return loss.detach(), metadata
