"""Per-token policy-gradient objectives: REINFORCE, the PPO clip (clip-higher, dual clip), GSPO, CISPO, k3 KL.

Each function returns a per-token tensor (batch, seq); aggregation and accumulation scaling
happen afterwards, in ``reductions.aggregate_loss`` through the microbatch train steps.
``compute_policy_loss`` is the one dispatcher over every loss type; the design's
``compute_policy_gradient_loss`` and ``compute_grpo_clip_loss`` are thin wrappers over it and
``compute_clip_higher_loss``, so they exercise what the trainer runs.
"""

from __future__ import annotations

from typing import Literal

import torch

from reasontune.losses.reductions import masked_metric_mean, masked_normalize

PolicyLossType = Literal["no_baseline", "reinforce_with_baseline", "grpo_clip", "gspo", "cispo"]

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


def compute_grpo_clip_loss(
    advantages: torch.Tensor,
    policy_log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    cliprange: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Returns ``(-min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A), metadata)``, per token (batch, seq).

    The symmetric case of ``compute_clip_higher_loss``, the function the trainer calls, so the
    two cannot drift apart. Log-ratios are clamped to +-``MAX_LOG_RATIO`` before ``exp``.

    Args:
        advantages: (batch, 1) or (batch,) float.
        policy_log_probs: (batch, seq) float, current policy (with gradient).
        old_log_probs: (batch, seq) float, the policy that sampled the rollouts (no gradient).
        cliprange: epsilon of the clip.

    Returns:
        loss: (batch, seq).
        metadata: ``clipped`` (batch, seq) bool, True where the clipped term was the smaller
            (the token's gradient is cut), and ``ratio`` (batch, seq), detached; also
            ``compute_clip_higher_loss``'s ``clipped_low`` and ``clipped_high``.
    """
    return compute_clip_higher_loss(advantages, policy_log_probs, old_log_probs, cliprange, cliprange)


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


def compute_policy_loss(
    loss_type: PolicyLossType,
    policy_log_probs: torch.Tensor,
    response_mask: torch.Tensor,
    advantages: torch.Tensor | None = None,
    raw_rewards: torch.Tensor | None = None,
    old_log_probs: torch.Tensor | None = None,
    cliprange: float | None = None,
    cliprange_high: float | None = None,
    dual_clip_c: float | None = None,
    rollout_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Returns the per-token loss (batch, seq) of ``loss_type`` and its metadata with low/high clip fractions.

    - ``no_baseline``: ``-raw_rewards * log_probs``.
    - ``reinforce_with_baseline``: ``-advantages * log_probs``.
    - ``grpo_clip``: ``compute_clip_higher_loss`` with ``eps_low = cliprange`` and ``eps_high =
      cliprange_high`` (None: ``cliprange``): the PPO clip, clip-higher when ``cliprange_high``
      is larger, dual clip with ``dual_clip_c``.
    - ``gspo``: ``compute_gspo_loss`` with the same clip range (aggregate with ``sequence_mean``).
    - ``cispo``: ``compute_cispo_loss`` with ``eps_high = cliprange_high`` (None: ``cliprange``)
      and no lower bound, as in the paper (aggregate with ``token_mean``).

    ``rollout_weights`` (batch, seq), from ``rollout_correction_weights``, multiply the per-token
    loss (detached): the truncated or masked importance weight between the trainer's old
    log-probs and the rollout engine's.

    Args:
        loss_type: one of the above.
        policy_log_probs: (batch, seq) float, with gradient.
        response_mask: (batch, seq) bool: the tokens the fractions are taken over (and GSPO's lengths).
        advantages: (batch,) or (batch, 1) float; raw_rewards: the same, for ``no_baseline``.
        old_log_probs: (batch, seq) float, needed by grpo_clip, gspo and cispo.
        cliprange, cliprange_high: the clip range (see above); grpo_clip, gspo and cispo need ``cliprange``
            or, for cispo, ``cliprange_high``.
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

    eps_high = cliprange_high if cliprange_high is not None else cliprange
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
        require(advantages=advantages, old_log_probs=old_log_probs, cliprange=cliprange)
        loss, metadata = compute_clip_higher_loss(advantages, policy_log_probs, old_log_probs, cliprange, eps_high,
                                                  dual_clip_c)
    elif loss_type == "gspo":
        require(advantages=advantages, old_log_probs=old_log_probs, cliprange=cliprange)
        loss, metadata = compute_gspo_loss(advantages, policy_log_probs, old_log_probs, response_mask,
                                           cliprange, eps_high)
    elif loss_type == "cispo":
        require(advantages=advantages, old_log_probs=old_log_probs, cliprange=eps_high)
        loss, metadata = compute_cispo_loss(advantages, policy_log_probs, old_log_probs, eps_high)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected no_baseline, reinforce_with_baseline, "
                         "grpo_clip, gspo or cispo")
    metadata = dict(metadata)
    for suffix in ("", "_low", "_high"):
        flags = metadata.get(f"clipped{suffix}")
        metadata[f"clip_fraction{suffix}"] = (masked_metric_mean(flags.float(), response_mask) if flags is not None
                                              else torch.zeros((), device=policy_log_probs.device))
    if rollout_weights is not None:
        if rollout_weights.shape != policy_log_probs.shape:
            raise ValueError(f"rollout_weights {tuple(rollout_weights.shape)} must have the shape of policy_log_probs "
                             f"{tuple(policy_log_probs.shape)}")
        loss = loss * rollout_weights.detach().to(loss.dtype)
        metadata["rollout_weight_mean"] = masked_metric_mean(rollout_weights.detach().float(), response_mask)
    return loss, metadata


def compute_policy_gradient_loss(
    policy_log_probs: torch.Tensor,
    loss_type: PolicyLossType,
    raw_rewards: torch.Tensor | None = None,
    advantages: torch.Tensor | None = None,
    old_log_probs: torch.Tensor | None = None,
    cliprange: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Returns the per-token policy-gradient loss (batch, seq) of ``loss_type`` and its metadata.

    - ``no_baseline``: needs ``raw_rewards`` (batch, 1).
    - ``reinforce_with_baseline``: needs ``advantages`` (batch, 1).
    - ``grpo_clip``: needs ``advantages``, ``old_log_probs`` (batch, seq) and ``cliprange``.

    ``compute_policy_loss`` (the trainer's dispatcher) over every token, so it also takes
    ``gspo`` and ``cispo``; the metadata holds its clip fractions.
    """
    every_token = torch.ones_like(policy_log_probs, dtype=torch.bool)
    return compute_policy_loss(loss_type, policy_log_probs, every_token, advantages=advantages,
                               raw_rewards=raw_rewards, old_log_probs=old_log_probs, cliprange=cliprange)
