"""Trajectories → a training batch: token ids, labels, and a response mask over the model's turns only.

The prompt is tokenised with the tokenizer's special tokens, as everywhere; a model turn
contributes the token ids it was sampled as (never a re-tokenisation of its text, so the
log-probs trained on are of what was sampled); an environment turn is tokenised from its
text without special tokens. Environment tokens are context: they are never labels of the
loss, their log-probs never enter a mean, and the sampler's log-probs
(``behaviour_log_probs``) sit at the model tokens' positions alone.

The HF generator's sessions continue a trajectory from its token ids (the kept KV cache, then
the environment's text tokenised without special tokens), so a later model turn was sampled in
exactly these joined ids. Backends without sessions (vLLM, the server) continue from the
joined text, whose tokenisation can differ from these ids at a turn boundary when a tokenizer
merges across it; the rollout-mismatch metrics show it. Tags that are single tokens (as in the
demo's tokenizer) leave no such difference.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from reasontune.environments.base import Trajectory
from reasontune.tokenization import pad_and_shift_segments, pad_token_id_of, scatter_response_values


def trajectory_batch(trajectories: Sequence[Trajectory], tokenizer: Any, max_length: int | None = None
                     ) -> dict[str, torch.Tensor]:
    """Returns ``pad_and_shift_segments`` of ``trajectories`` (see the module docstring), plus ``behaviour_log_probs``.

    Returns:
        input_ids, labels: (batch, L - 1) int64.
        response_mask: (batch, L - 1) bool, True exactly at the labels that are model-turn tokens.
        response_lengths: (batch,) int64; truncated: (batch,) bool.
        behaviour_log_probs: (batch, L - 1) float32, the sampler's log-probs at the model tokens
            (0 elsewhere); present only when every model turn carries them.
    """
    prompt_ids = tokenizer([t.prompt for t in trajectories], add_special_tokens=True)["input_ids"]
    environment_texts = [turn.text for t in trajectories for turn in t.turns if turn.role == "environment"]
    environment_ids = iter(tokenizer(environment_texts, add_special_tokens=False)["input_ids"]) if environment_texts \
        else iter(())
    segments, trained = [], []
    for trajectory in trajectories:
        segments.append([list(turn.token_ids or []) if turn.role == "model" else list(next(environment_ids))
                         for turn in trajectory.turns])
        trained.append([turn.role == "model" for turn in trajectory.turns])
    batch = pad_and_shift_segments(prompt_ids, segments, trained, pad_token_id_of(tokenizer), max_length=max_length)
    if all(turn.logprobs is not None for t in trajectories for turn in t.model_turns):
        values = [[v for turn in t.model_turns for v in turn.logprobs] for t in trajectories]
        batch["behaviour_log_probs"] = scatter_response_values(values, batch["response_mask"])
    return batch


def trajectory_microbatches(trajectories: Sequence[Trajectory], advantages: torch.Tensor, raw_rewards: torch.Tensor,
                            micro_batch_size: int, tokenizer: Any) -> list[dict[str, torch.Tensor]]:
    """Returns the trajectories cut into GRPO microbatches (in order), each ``trajectory_batch`` of its rows plus rewards.

    The multi-turn counterpart of ``training.grpo.rollout_microbatches``, with the same keys:
    ``input_ids``/``labels``/``response_mask`` (micro, L - 1), ``advantages``/``raw_rewards``
    (micro,) float32, and ``behaviour_log_probs`` (micro, L - 1) when the sampler returned
    log-probs. For one-turn trajectories it is the same batch as the single-turn path.
    """
    microbatches = []
    for start in range(0, len(trajectories), micro_batch_size):
        rows = slice(start, start + micro_batch_size)
        batch = trajectory_batch(trajectories[rows], tokenizer)
        microbatch = {"input_ids": batch["input_ids"], "labels": batch["labels"], "response_mask": batch["response_mask"],
                      "advantages": advantages[rows], "raw_rewards": raw_rewards[rows]}
        if "behaviour_log_probs" in batch:
            microbatch["behaviour_log_probs"] = batch["behaviour_log_probs"]
        microbatches.append(microbatch)
    return microbatches
