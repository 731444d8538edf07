"""reasontune: teach language models to reason on math with verified rewards.

The numerical primitives are importable from here; everything else lives in its module
(``reasontune.rewards``, ``reasontune.data``, ``reasontune.generation``, ``reasontune.training``…).
"""

from reasontune.logprobs import compute_entropy, get_response_log_probs
from reasontune.losses import (
    compute_group_normalized_rewards,
    compute_grpo_clip_loss,
    compute_naive_policy_gradient_loss,
    compute_policy_gradient_loss,
    grpo_microbatch_train_step,
    masked_mean,
    masked_normalize,
    sft_microbatch_train_step,
)
from reasontune.tokenization import tokenize_prompt_and_output

__version__ = "0.1.0"

__all__ = [
    "compute_entropy",
    "compute_group_normalized_rewards",
    "compute_grpo_clip_loss",
    "compute_naive_policy_gradient_loss",
    "compute_policy_gradient_loss",
    "get_response_log_probs",
    "grpo_microbatch_train_step",
    "masked_mean",
    "masked_normalize",
    "sft_microbatch_train_step",
    "tokenize_prompt_and_output",
]
