"""reasontune: teach language models to reason on math with verified rewards.

The numerical primitives are importable from here; everything else lives in its module
(``reasontune.rewards``, ``reasontune.data``, ``reasontune.generation``, ``reasontune.training``…).
The primitives are imported on first use, so ``import reasontune.rewards`` (and the grading
worker processes) never pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_PRIMITIVES = {
    "compute_entropy": "reasontune.logprobs",
    "get_response_log_probs": "reasontune.logprobs",
    "compute_group_normalized_rewards": "reasontune.losses",
    "compute_grpo_clip_loss": "reasontune.losses",
    "compute_naive_policy_gradient_loss": "reasontune.losses",
    "compute_policy_gradient_loss": "reasontune.losses",
    "grpo_microbatch_train_step": "reasontune.losses",
    "masked_mean": "reasontune.losses",
    "masked_normalize": "reasontune.losses",
    "sft_microbatch_train_step": "reasontune.losses",
    "tokenize_prompt_and_output": "reasontune.tokenization",
}

__all__ = sorted(_PRIMITIVES)


def __getattr__(name: str) -> Any:
    if name in _PRIMITIVES:
        value = getattr(importlib.import_module(_PRIMITIVES[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'reasontune' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)


if TYPE_CHECKING:
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
