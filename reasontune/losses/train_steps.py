"""The microbatch train steps: per-token loss -> aggregation -> gradient-accumulation scaling -> ``backward``.

SFT, expert iteration and GRPO call these and never re-derive the scaling. The policy-gradient
step takes its settings as one ``PolicyLossSettings``, built once from a trainer's config, and
the microbatch's tensors as arguments; the design's ``grpo_microbatch_train_step`` is a thin
wrapper over it.
"""

from __future__ import annotations

import dataclasses

import torch

from reasontune.losses.policy import PolicyLossType, compute_k3_kl, compute_policy_loss
from reasontune.losses.reductions import LossAggregation, aggregate_loss, masked_metric_mean, masked_normalize


def sft_microbatch_train_step(
    policy_log_probs: torch.Tensor,
    response_mask: torch.Tensor,
    gradient_accumulation_steps: int,
    normalize_constant: float = 1.0,
    aggregation: LossAggregation = "sequence_sum",
    tokens_in_step: int | None = None,
    examples_in_step: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Returns ``(loss, metadata)`` of one SFT microbatch after calling ``loss.backward()``.

    The loss is ``aggregate_loss(-policy_log_probs, response_mask, aggregation, …)``. With the
    default ``aggregation="sequence_sum"`` (the design's semantics)::

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
        aggregation: a ``LossAggregation`` name: "sequence_sum", "token_mean" or "sequence_mean".
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
    loss = aggregate_loss(-policy_log_probs, response_mask, aggregation, gradient_accumulation_steps,
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


@dataclasses.dataclass(frozen=True)
class PolicyLossSettings:
    """What turns a microbatch's log-probs into a policy-gradient loss, fixed for a whole run.

    Attributes:
        loss_type: a ``PolicyLossType`` (see ``compute_policy_loss``).
        gradient_accumulation_steps: microbatches per optimizer step (>= 1).
        cliprange: eps (eps_low) of the ratio clip; grpo_clip and gspo need it.
        cliprange_high: eps_high (None: ``cliprange``); DAPO's clip-higher when larger, the only
            bound CISPO uses.
        dual_clip_c: the dual-clip bound for negative advantages (None: off).
        aggregation: a ``LossAggregation`` name (see ``aggregate_loss``).
        normalize_constant: divisor of each sequence's sum (``sequence_sum``; e.g. the maximum
            response length, as in Dr. GRPO).
        kl_coef: weight of the per-token k3 KL penalty against the reference (0: off).
    """

    loss_type: PolicyLossType
    gradient_accumulation_steps: int = 1
    cliprange: float | None = None
    cliprange_high: float | None = None
    dual_clip_c: float | None = None
    aggregation: LossAggregation = "sequence_mean"
    normalize_constant: float | None = None
    kl_coef: float = 0.0

    def __post_init__(self) -> None:
        if self.kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {self.kl_coef}")
        if self.gradient_accumulation_steps < 1:
            raise ValueError(f"gradient_accumulation_steps must be >= 1, got {self.gradient_accumulation_steps}")


def policy_microbatch_train_step(
    policy_log_probs: torch.Tensor,
    response_mask: torch.Tensor,
    settings: PolicyLossSettings,
    *,
    advantages: torch.Tensor | None = None,
    raw_rewards: torch.Tensor | None = None,
    old_log_probs: torch.Tensor | None = None,
    ref_log_probs: torch.Tensor | None = None,
    rollout_weights: torch.Tensor | None = None,
    tokens_in_step: int | None = None,
    examples_in_step: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Returns ``(loss, metadata)`` of one policy-gradient microbatch after ``loss.backward()``.

    The per-token loss is ``compute_policy_loss`` of ``settings.loss_type`` (weighted by
    ``rollout_weights`` when given); with ``settings.kl_coef > 0``, ``kl_coef *
    compute_k3_kl(policy_log_probs, ref_log_probs)`` is added to each token's loss before
    aggregation, so the penalty is aggregated and scaled exactly like the loss it regularises.
    The microbatch's scalar is ``aggregate_loss`` with ``settings.aggregation`` (the one place
    for it), with gradient-accumulation scaling (or ``tokens_in_step`` / ``examples_in_step``,
    the counts of the whole optimizer step over every microbatch and rank) as documented there.

    Args:
        policy_log_probs: (batch, seq) float, with gradient.
        response_mask: (batch, seq) bool.
        settings: the run's loss settings.
        advantages: (batch,) or (batch, 1) float; raw_rewards: the same, for ``no_baseline``.
        old_log_probs: (batch, seq) float, the policy that sampled the rollouts (clipped losses).
        ref_log_probs: (batch, seq) float, the reference model's log-probs (needed when
            ``kl_coef > 0``; when given with ``kl_coef == 0`` the KL is only reported).
        rollout_weights: (batch, seq) detached importance weights against the rollout engine
            (``rollout_correction_weights``), multiplying each token's loss.
        tokens_in_step, examples_in_step: see ``aggregate_loss``.

    Returns:
        loss: 0-d detached tensor, the back-propagated value.
        metadata: ``compute_policy_loss``'s metadata (with ``clip_fraction``, ``clip_fraction_low``
            and ``clip_fraction_high``: fractions of response tokens clipped, 0 for REINFORCE
            losses), ``num_response_tokens`` and, with ``ref_log_probs``, ``kl`` (0-d, the mean
            k3 KL over response tokens, detached).
    """
    per_token, metadata = compute_policy_loss(
        settings.loss_type, policy_log_probs, response_mask, advantages=advantages, raw_rewards=raw_rewards,
        old_log_probs=old_log_probs, cliprange=settings.cliprange, cliprange_high=settings.cliprange_high,
        dual_clip_c=settings.dual_clip_c, rollout_weights=rollout_weights,
    )
    if settings.kl_coef > 0 and ref_log_probs is None:
        raise ValueError("kl_coef > 0 needs ref_log_probs (the reference model's per-token log-probs)")
    kl = None
    if ref_log_probs is not None:
        kl = compute_k3_kl(policy_log_probs, ref_log_probs)
        if settings.kl_coef > 0:
            per_token = per_token + settings.kl_coef * kl
    loss = aggregate_loss(per_token, response_mask, settings.aggregation, settings.gradient_accumulation_steps,
                          normalize_constant=settings.normalize_constant, tokens_in_step=tokens_in_step,
                          examples_in_step=examples_in_step)
    loss.backward()
    metadata["num_response_tokens"] = response_mask.sum()
    if kl is not None:
        metadata["kl"] = masked_metric_mean(kl.detach(), response_mask)
    return loss.detach(), metadata


def grpo_microbatch_train_step(
    policy_log_probs: torch.Tensor,
    response_mask: torch.Tensor,
    gradient_accumulation_steps: int,
    loss_type: PolicyLossType,
    raw_rewards: torch.Tensor | None = None,
    advantages: torch.Tensor | None = None,
    old_log_probs: torch.Tensor | None = None,
    cliprange: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Returns ``(loss, metadata)`` of one ``sequence_mean`` policy-gradient microbatch after ``loss.backward()``.

    Per-token loss, then ``masked_mean(..., dim=-1)``, the batch mean, divided by
    ``gradient_accumulation_steps``: ``policy_microbatch_train_step`` (the trainer's step) with
    these settings and the defaults of the others.

    Args:
        policy_log_probs, response_mask: (batch, seq) float (with gradient) and bool.
        gradient_accumulation_steps: microbatches per optimizer step.
        loss_type, raw_rewards, advantages, old_log_probs, cliprange: as in
            ``compute_policy_gradient_loss``.

    Returns:
        loss: 0-d detached tensor; metadata: as ``policy_microbatch_train_step``'s.
    """
    settings = PolicyLossSettings(loss_type, gradient_accumulation_steps, cliprange=cliprange)
    return policy_microbatch_train_step(policy_log_probs, response_mask, settings, advantages=advantages,
                                        raw_rewards=raw_rewards, old_log_probs=old_log_probs)
