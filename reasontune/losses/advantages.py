"""Rewards to advantages: group, leave-one-out and batch baselines, std normalisation, DAPO's overlong penalty.

``compute_advantages`` is what the trainer calls; the design's ``compute_group_normalized_rewards``
grades responses and hands the rewards to it.
"""

from __future__ import annotations

from typing import Callable, Literal, Sequence

import torch

AdvantageBaseline = Literal["group_mean", "leave_one_out", "batch_mean"]
AdvantageStd = Literal["group", "batch", "none"]


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
    ``r - group mean`` when ``normalize_by_std`` is False: ``compute_advantages`` (the trainer's
    function) with the ``group_mean`` baseline, applied to ``reward_fn``'s scores.

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
    scores = [reward_fn(response, truth) for response, truth in zip(rollout_responses, repeated_ground_truths)]
    raw_rewards = torch.tensor([float(s["reward"]) for s in scores], dtype=torch.float32)
    advantages = compute_advantages(raw_rewards, group_size, "group_mean", "group" if normalize_by_std else "none",
                                    advantage_eps)
    metadata = {
        "reward_mean": float(raw_rewards.mean()),
        "reward_std": float(raw_rewards.std()) if raw_rewards.numel() > 1 else 0.0,
        "reward_min": float(raw_rewards.min()),
        "reward_max": float(raw_rewards.max()),
    }
    for key in ("format_reward", "answer_reward"):
        if all(key in s for s in scores):
            metadata[f"{key}_mean"] = sum(float(s[key]) for s in scores) / len(scores)
    return advantages, raw_rewards, metadata


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
