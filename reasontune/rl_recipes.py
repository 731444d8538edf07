"""RL recipes (the settings of each paper's method) and dynamic sampling's group filter and batch filling.

``RECIPES`` maps ``--recipe`` names to GRPO config values; ``expand_recipe`` applies one under the
flags the user gave explicitly. ``informative_groups`` and ``fill_batch`` are DAPO's dynamic
sampling: keep only groups whose rewards differ (the others have zero advantage and no gradient)
and draw more questions until the batch is full, within a bounded number of tries.
Pure functions of their arguments (``fill_batch`` calls the given draw function).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Generic, Mapping, Sequence, TypeVar

import torch

# Field names are GRPOConfig's: loss_type, cliprange / cliprange_high (eps_low / eps_high of
# the clip; cliprange_high None: equal to cliprange; CISPO uses only eps_high), dual_clip_c,
# loss_aggregation, advantage_baseline, advantage_std, kl_coef, overlong_buffer_fraction (the
# soft penalty's buffer as a fraction of sampling_max_tokens; 0: no penalty),
# overlong_penalty_factor, mask_truncated, dynamic_sampling.
RECIPES: dict[str, dict[str, Any]] = {
    # DeepSeekMath (Shao et al. 2024, arXiv 2402.03300): PPO clip 0.2, per-response token mean,
    # group mean / std, k3 KL 0.04 against the reference model.
    "grpo": dict(loss_type="grpo_clip", cliprange=0.2, cliprange_high=0.2, dual_clip_c=None,
                 loss_aggregation="sequence_mean", advantage_baseline="group_mean", advantage_std="group",
                 kl_coef=0.04, overlong_buffer_fraction=0.0, overlong_penalty_factor=1.0, mask_truncated=False,
                 dynamic_sampling=False),
    # Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training", arXiv 2503.20783): no
    # length normalisation (sum / a constant) and no std normalisation, no KL.
    "dr_grpo": dict(loss_type="grpo_clip", cliprange=0.2, cliprange_high=0.2, dual_clip_c=None,
                    loss_aggregation="sequence_sum", advantage_baseline="group_mean", advantage_std="none",
                    kl_coef=0.0, overlong_buffer_fraction=0.0, overlong_penalty_factor=1.0, mask_truncated=False,
                    dynamic_sampling=False),
    # DAPO (Yu et al. 2025, arXiv 2503.14476): clip-higher 0.2 / 0.28, token-level loss, no KL,
    # soft overlong punishment (L_cache 4096 of L_max 20480: a fifth of the budget), dynamic sampling.
    "dapo": dict(loss_type="grpo_clip", cliprange=0.2, cliprange_high=0.28, dual_clip_c=None,
                 loss_aggregation="token_mean", advantage_baseline="group_mean", advantage_std="group",
                 kl_coef=0.0, overlong_buffer_fraction=0.2, overlong_penalty_factor=1.0, mask_truncated=False,
                 dynamic_sampling=True),
    # GSPO (Zheng et al. 2025, arXiv 2507.18071): sequence-level length-normalised ratio, clip
    # 3e-4 / 4e-4, GRPO's group advantages, per-response mean (GSPO-token), no KL.
    "gspo": dict(loss_type="gspo", cliprange=3e-4, cliprange_high=4e-4, dual_clip_c=None,
                 loss_aggregation="sequence_mean", advantage_baseline="group_mean", advantage_std="group",
                 kl_coef=0.0, overlong_buffer_fraction=0.0, overlong_penalty_factor=1.0, mask_truncated=False,
                 dynamic_sampling=False),
    # CISPO (MiniMax-M1, arXiv 2506.13585): clipped IS weight, no lower bound, only eps_high tuned
    # (the paper gives no value; 0.28 as DAPO's eps_high), token-level loss over the group's tokens, no KL.
    "cispo": dict(loss_type="cispo", cliprange=None, cliprange_high=0.28, dual_clip_c=None,
                  loss_aggregation="token_mean", advantage_baseline="group_mean", advantage_std="group",
                  kl_coef=0.0, overlong_buffer_fraction=0.0, overlong_penalty_factor=1.0, mask_truncated=False,
                  dynamic_sampling=False),
    # RLOO (Ahmadian et al. 2024, "Back to Basics", arXiv 2402.14740): on-policy REINFORCE of the
    # whole response (sum of token log-probs, here / the budget as a constant), leave-one-out
    # baseline, no std. (The paper's KL is a reward penalty, which reasontune does not have: 0 here.)
    "rloo": dict(loss_type="reinforce_with_baseline", cliprange=None, cliprange_high=None, dual_clip_c=None,
                 loss_aggregation="sequence_sum", advantage_baseline="leave_one_out", advantage_std="none",
                 kl_coef=0.0, overlong_buffer_fraction=0.0, overlong_penalty_factor=1.0, mask_truncated=False,
                 dynamic_sampling=False),
}


def expand_recipe(recipe: str | None, values: Mapping[str, Any],
                  explicit: set[str] | frozenset[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """Returns ``(config values with the recipe applied, the source of each recipe field)``.

    Every field of ``RECIPES[recipe]`` replaces ``values``' unless its name is in ``explicit``
    (the flags the user gave: a flag always overrides the recipe). The source map says
    ``"recipe <name>"`` or ``"flag"`` for each recipe field, for printing at start and saving
    in config.json. ``recipe`` None returns ``values`` unchanged.

    Raises ValueError for an unknown recipe or a recipe field that ``values`` lacks.
    """
    if recipe is None:
        return dict(values), {}
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; expected one of {', '.join(sorted(RECIPES))}")
    missing = sorted(set(RECIPES[recipe]) - set(values))
    if missing:
        raise ValueError(f"recipe {recipe!r} sets {', '.join(missing)}, which the config does not have")
    expanded, sources = dict(values), {}
    for name, value in RECIPES[recipe].items():
        if name in explicit:
            sources[name] = "flag"
            continue
        expanded[name] = value
        sources[name] = f"recipe {recipe}"
    return expanded, sources


def informative_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Returns (groups,) bool: True for each group whose rewards are not all equal (DAPO's dynamic sampling keeps these).

    A group whose responses all got the same reward has advantage 0 for every response under
    any group baseline, hence no policy gradient; DAPO (arXiv 2503.14476, section 3.2) drops it.

    Args:
        rewards: (groups * group_size,) float, each group contiguous.
        group_size: responses per prompt.
    """
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.reshape(-1, group_size)
    return (grouped != grouped[:, :1]).any(dim=1)


Group = TypeVar("Group")


@dataclasses.dataclass
class FilledBatch(Generic[Group]):
    """What ``fill_batch`` returns: the kept groups and the counts to log."""

    groups: list  # the kept groups, in draw order, at most needed_groups
    tries: int  # draws made
    drawn: int  # groups drawn in all
    dropped: int  # groups dropped as uninformative
    surplus: int  # informative groups beyond needed_groups, discarded
    full: bool  # whether len(groups) == needed_groups

    def metrics(self) -> dict[str, float]:
        """Returns the counts as the ``dynamic_sampling_*`` metrics of a train log line."""
        return {"dynamic_sampling_tries": self.tries, "groups_drawn": self.drawn, "groups_kept": len(self.groups),
                "groups_dropped": self.dropped, "groups_surplus": self.surplus, "batch_full": float(self.full)}


def fill_batch(draw_fn: Callable[[int], tuple[Sequence[Group], Sequence[bool]]], needed_groups: int,
               max_tries: int) -> FilledBatch[Group]:
    """Returns the first ``needed_groups`` kept groups of up to ``max_tries`` draws, with counts.

    ``draw_fn(attempt)`` (attempt 0, 1, ...) samples fresh questions, rolls them out and returns
    ``(groups, keep)``: one flag per group (e.g. ``informative_groups`` of its rewards). Draws
    stop as soon as the batch is full. After ``max_tries`` draws without filling it, the batch
    is returned short (``full`` False) rather than raised on, so the caller can train on fewer
    groups (or skip the step when none was kept) and log it. DAPO (arXiv 2503.14476, section 3.2;
    verl's ``max_num_gen_batches``) bounds the draws the same way.
    """
    if needed_groups < 1 or max_tries < 1:
        raise ValueError(f"need needed_groups >= 1 and max_tries >= 1, got {needed_groups} and {max_tries}")
    kept: list = []
    tries = drawn = dropped = surplus = 0
    while tries < max_tries and len(kept) < needed_groups:
        groups, keep = draw_fn(tries)
        tries += 1
        if len(groups) != len(keep):
            raise ValueError(f"draw_fn returned {len(groups)} groups but {len(keep)} keep flags (attempt {tries - 1})")
        drawn += len(groups)
        for group, informative in zip(groups, keep):
            if not informative:
                dropped += 1
            elif len(kept) < needed_groups:
                kept.append(group)
            else:
                surplus += 1
    return FilledBatch(kept, tries, drawn, dropped, surplus, len(kept) == needed_groups)
