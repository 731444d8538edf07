"""Losses: masked reductions, policy-gradient objectives, advantages, rollout correction and the microbatch train steps.

- ``reductions``: masked sums and means, ``aggregate_loss`` (per-token loss -> a microbatch's scalar).
- ``policy``: per-token objectives (REINFORCE, PPO clip with clip-higher and dual clip, GSPO,
  CISPO, k3 KL) and their one dispatcher ``compute_policy_loss``.
- ``advantages``: rewards -> advantages (group, leave-one-out, batch baselines) and overlong shaping.
- ``rollout_correction``: the generator-vs-trainer log-prob mismatch and its importance weights.
- ``train_steps``: the SFT and policy-gradient microbatch steps, where accumulation scaling lives.

The design's primitives (``compute_policy_gradient_loss``, ``compute_grpo_clip_loss``,
``compute_group_normalized_rewards``, ``grpo_microbatch_train_step``) are thin wrappers over
what the trainer calls.
"""

from reasontune.losses.advantages import (AdvantageBaseline, AdvantageStd, compute_advantages,
                                          compute_group_normalized_rewards, overlong_penalty)
from reasontune.losses.policy import (MAX_LOG_RATIO, PolicyLossType, clamped_log_ratio, compute_cispo_loss,
                                      compute_clip_higher_loss, compute_grpo_clip_loss, compute_gspo_loss,
                                      compute_k3_kl, compute_naive_policy_gradient_loss,
                                      compute_policy_gradient_loss, compute_policy_loss)
from reasontune.losses.reductions import (LossAggregation, aggregate_loss, mask_truncated_responses,
                                          masked_mean, masked_metric_mean, masked_normalize,
                                          sequences_with_loss_tokens)
from reasontune.losses.rollout_correction import (RolloutCorrection, rollout_correction_weights,
                                                  rollout_mismatch_metrics)
from reasontune.losses.train_steps import (PolicyLossSettings, grpo_microbatch_train_step,
                                           policy_microbatch_train_step, sft_microbatch_train_step)

__all__ = [
    "AdvantageBaseline", "AdvantageStd", "LossAggregation", "MAX_LOG_RATIO", "PolicyLossSettings", "PolicyLossType",
    "RolloutCorrection", "aggregate_loss", "clamped_log_ratio", "compute_advantages", "compute_cispo_loss",
    "compute_clip_higher_loss", "compute_group_normalized_rewards", "compute_grpo_clip_loss", "compute_gspo_loss",
    "compute_k3_kl", "compute_naive_policy_gradient_loss", "compute_policy_gradient_loss", "compute_policy_loss",
    "grpo_microbatch_train_step", "mask_truncated_responses", "masked_mean", "masked_metric_mean",
    "masked_normalize", "overlong_penalty", "policy_microbatch_train_step", "rollout_correction_weights",
    "rollout_mismatch_metrics", "sequences_with_loss_tokens", "sft_microbatch_train_step",
]
