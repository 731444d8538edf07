"""Options of ``reasontune grpo``: the config, its recipes, its batch arithmetic and what it refuses."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Literal

from reasontune.config import help_field, same_field
from reasontune.losses import AdvantageBaseline, AdvantageStd, LossAggregation, PolicyLossType, RolloutCorrection
from reasontune.options import (CheckpointOptions, InLoopEvaluationOptions, OptimizerOptions, RolloutOptions,
                                ToolOptions, TrainerOptions)
from reasontune.rl_recipes import RECIPES, expand_recipe


@dataclasses.dataclass
class GRPOConfig(RolloutOptions, ToolOptions, TrainerOptions):
    """Options of ``reasontune grpo`` (defaults: the CS336 handout's GRPO settings for Qwen2.5-Math-1.5B)."""

    command: ClassVar[str] = "grpo"

    output_dir: str = same_field(CheckpointOptions, "output_dir", "runs/grpo")
    learning_rate: float = same_field(OptimizerOptions, "learning_rate", 1e-5)
    eval_every: int = same_field(InLoopEvaluationOptions, "eval_every", 5)
    eval_examples: int = same_field(InLoopEvaluationOptions, "eval_examples", 1024)
    # GRPO
    n_grpo_steps: int = help_field(200, "GRPO steps: each one rollout batch, then epochs-per-rollout-batch passes of optimizer steps over it", group="grpo")
    rollout_batch_size: int = help_field(256, "responses generated per GRPO step (questions x group-size)", group="grpo")
    train_batch_size: int = help_field(256, "rollouts per optimizer step (smaller than rollout-batch-size: several off-policy steps per rollout batch)", group="grpo")
    gradient_accumulation_steps: int = help_field(128, "microbatches per optimizer step; microbatch = train-batch-size / this", group="grpo")
    epochs_per_rollout_batch: int = help_field(1, "passes over each rollout batch (more than 1 is off-policy: use grpo_clip)", group="grpo")
    recipe: Literal["grpo", "dr_grpo", "dapo", "gspo", "cispo", "rloo"] | None = help_field(None, "set the objective of a paper at once (loss, clip range, aggregation, advantages, KL, overlong shaping, dynamic sampling; see rl_recipes.RECIPES); any flag given overrides the recipe's value", group="grpo")
    loss_type: PolicyLossType = help_field("reinforce_with_baseline", "policy-gradient loss: no_baseline (raw rewards), reinforce_with_baseline (advantages), grpo_clip (PPO-style clipped ratio; clip-higher with --cliprange-high, dual clip with --dual-clip-c), gspo (sequence-level ratio) or cispo (clipped importance weight, gradient through every token)", group="grpo")
    advantage_baseline: AdvantageBaseline = help_field("group_mean", "subtracted from each reward: group_mean (GRPO), leave_one_out (RLOO) or batch_mean (REINFORCE++)", group="grpo")
    advantage_std: AdvantageStd = help_field("group", "advantages divided by the std of: group (GRPO), batch (REINFORCE++) or none (Dr. GRPO, RLOO)", group="grpo")
    advantage_eps: float = help_field(1e-6, "added to the std before dividing", group="grpo")
    cliprange: float | None = help_field(0.2, "epsilon of the ratio clip (grpo_clip, gspo; eps_low with --cliprange-high)", group="grpo")
    cliprange_high: float | None = help_field(None, "upper epsilon of the clip (DAPO's clip-higher; none: --cliprange; the only bound cispo uses)", group="grpo")
    dual_clip_c: float | None = help_field(None, "dual-clip bound c > 1 for negative advantages (grpo_clip; none: off)", group="grpo")
    overlong_buffer_fraction: float = help_field(0.0, "DAPO soft overlong penalty: a linear penalty down to -1 over the last fraction of --sampling-max-tokens (0: off)", group="grpo")
    overlong_penalty_factor: float = help_field(1.0, "scale of the soft overlong penalty", group="grpo")
    mask_truncated: bool = help_field(False, "leave responses cut by --sampling-max-tokens out of the loss", group="grpo")
    dynamic_sampling: bool = help_field(False, "DAPO dynamic sampling: drop groups whose rewards are all equal and draw more questions until the batch is full", group="grpo")
    dynamic_sampling_max_tries: int = help_field(4, "draws per step at most for --dynamic-sampling (the batch trains short after that, counted in the metrics)", group="grpo")
    rollout_correction: RolloutCorrection = help_field("none", "correct the rollout engine's log-probs against the trainer's: token_tis / seq_tis (truncated importance weights), token_mask / seq_mask (drop tokens or responses whose weight leaves [1/C, C]) or none (the mismatch is still logged)", group="grpo")
    rollout_correction_cap: float = help_field(2.0, "the cap C of --rollout-correction (> 1)", group="grpo")
    loss_aggregation: LossAggregation = help_field("sequence_mean", "per-token loss to scalar: sequence_mean (GRPO), sequence_sum (Dr. GRPO; constant = sampling-max-tokens) or token_mean (DAPO; over the optimizer step's tokens)", group="grpo")
    kl_coef: float = help_field(0.0, "weight of a per-token k3 KL penalty against the frozen starting model (0: off, no reference model loaded)", group="grpo")
    async_steps: int = help_field(0, "overlap generation with training: the rollouts of step k+1 … k+K are generated in the background while step k trains, from weights at most K steps stale (0: on-policy, no overlap; > 0 needs grpo_clip, gspo or cispo)", group="grpo")

    @property
    def planned_steps(self) -> int:
        """Returns the GRPO steps the run trains: ``n_grpo_steps``."""
        return self.n_grpo_steps

    def launch_sizes(self, world_size: int) -> dict[str, int]:
        """Returns the batch sizes config.json records of a launch on ``world_size`` ranks."""
        return {"train_batch_size": self.train_batch_size, "rollout_batch_size": self.rollout_batch_size,
                "microbatch_per_rank": self.microbatch_size(world_size),
                "gradient_accumulation_steps": self.gradient_accumulation_steps}

    @property
    def micro_train_batch_size(self) -> int:
        return self.train_batch_size // self.gradient_accumulation_steps

    def microbatch_size(self, world_size: int) -> int:
        """Returns the rollouts in one microbatch of one rank: train-batch-size / (world size x accumulation)."""
        return self.train_batch_size // (world_size * self.gradient_accumulation_steps)

    def world_problems(self, world_size: int) -> list[str]:
        """Returns what keeps the batch sizes from splitting over ``world_size`` ranks (empty at world size 1)."""
        if world_size == 1:
            return []
        split = world_size * self.gradient_accumulation_steps
        if self.train_batch_size % split:
            return [f"--train-batch-size ({self.train_batch_size}) does not split over {world_size} ranks x "
                    f"{self.gradient_accumulation_steps} microbatches; choose a multiple of {split}"]
        if self.rollout_batch_size % self.microbatch_size(world_size):
            return [f"--rollout-batch-size ({self.rollout_batch_size}) must be divisible by the microbatch size "
                    f"(train-batch-size / (ranks x gradient-accumulation-steps) = {self.microbatch_size(world_size)})"]
        return []

    @classmethod
    def expand_presets(cls, values: dict[str, Any]) -> dict[str, Any]:
        """Returns ``values`` (the options given) with ``recipe``'s settings filled in under them: a given option wins."""
        recipe = values.get("recipe")
        if recipe is None:
            return values
        expanded, _ = expand_recipe(recipe, {**RECIPES[recipe], **values}, explicit=set(values))
        return expanded

    @classmethod
    def from_recipe(cls, recipe: str | None, **values: Any) -> GRPOConfig:
        """Returns the config of ``recipe`` with ``values`` (explicit options) overriding it."""
        return cls(**cls.expand_presets({**values, "recipe": recipe}))

    def recipe_settings(self) -> dict[str, Any]:
        """Returns the recipe's fields with the value this config has for each (empty without a recipe)."""
        return {name: getattr(self, name) for name in RECIPES.get(self.recipe or "", {})}

    @property
    def optimizer_steps_per_rollout_batch(self) -> int:
        return self.rollout_batch_size // self.train_batch_size

    @property
    def off_policy(self) -> bool:
        """Whether some optimizer step trains on rollouts sampled by an earlier version of the policy."""
        return self.epochs_per_rollout_batch > 1 or self.train_batch_size < self.rollout_batch_size or self.async_steps > 0

    def problems(self) -> list[str]:
        """Returns what is wrong with the GRPO options themselves (the shared groups check theirs: ``config.value_problems``)."""
        positive = ("n_grpo_steps", "rollout_batch_size", "group_size", "train_batch_size",
                    "gradient_accumulation_steps", "epochs_per_rollout_batch")
        problems = [f"--{name.replace('_', '-')}: must be >= 1, got {getattr(self, name)}"
                    for name in positive if getattr(self, name) < 1]
        if self.async_steps < 0:
            problems.append(f"--async-steps: must be >= 0, got {self.async_steps}")
        if self.group_size == 1:
            problems.append("--group-size 1: a group of one response has no baseline (its advantage is always 0, "
                            "nothing is learned); use --group-size 2 or more")
        if problems:  # the divisibility checks below need these sizes positive
            return problems
        if self.train_batch_size % self.gradient_accumulation_steps:
            problems.append(f"--train-batch-size ({self.train_batch_size}) must be divisible by "
                            f"--gradient-accumulation-steps ({self.gradient_accumulation_steps})")
        if self.rollout_batch_size % self.group_size:
            problems.append(f"--rollout-batch-size ({self.rollout_batch_size}) must be divisible by --group-size "
                            f"({self.group_size}): each question gets group-size responses")
        if self.train_batch_size < self.group_size:
            problems.append(f"--train-batch-size ({self.train_batch_size}) must be at least --group-size ({self.group_size})")
        if self.micro_train_batch_size and self.rollout_batch_size % self.micro_train_batch_size:
            problems.append(f"--rollout-batch-size ({self.rollout_batch_size}) must be divisible by the microbatch size "
                            f"(train-batch-size / gradient-accumulation-steps = {self.micro_train_batch_size})")
        if self.rollout_batch_size % self.train_batch_size:
            problems.append(f"--rollout-batch-size ({self.rollout_batch_size}) must be divisible by --train-batch-size "
                            f"({self.train_batch_size}), so that every optimizer step sees a full train batch")
        if self.loss_type in ("grpo_clip", "gspo") and (self.cliprange is None or self.cliprange <= 0):
            problems.append(f"--loss-type {self.loss_type} needs --cliprange > 0")
        if self.loss_type == "cispo" and (self.cliprange_high if self.cliprange_high is not None else self.cliprange or 0) <= 0:
            problems.append("--loss-type cispo needs --cliprange-high > 0 (its clip of the importance weight)")
        if self.cliprange_high is not None and self.cliprange is not None and self.cliprange_high < self.cliprange:
            problems.append(f"--cliprange-high ({self.cliprange_high}) must be at least --cliprange ({self.cliprange})")
        if self.dual_clip_c is not None and self.dual_clip_c <= 1:
            problems.append(f"--dual-clip-c ({self.dual_clip_c}) must be > 1")
        if self.off_policy and self.loss_type not in ("grpo_clip", "gspo", "cispo"):
            problems.append(f"epochs-per-rollout-batch > 1, train-batch-size < rollout-batch-size or async-steps > 0 "
                            f"is off-policy; --loss-type {self.loss_type} has no importance ratio for it: use "
                            "grpo_clip, gspo or cispo")
        if self.advantage_baseline == "leave_one_out" and self.group_size < 2:
            problems.append("--advantage-baseline leave_one_out needs --group-size >= 2")
        if not 0.0 <= self.overlong_buffer_fraction <= 1.0:
            problems.append("--overlong-buffer-fraction must be in [0, 1]")
        if self.dynamic_sampling_max_tries < 1:
            problems.append("--dynamic-sampling-max-tries must be >= 1")
        if self.rollout_correction_cap <= 1:
            problems.append("--rollout-correction-cap must be > 1")
        if self.kl_coef < 0:
            problems.append(f"--kl-coef: must be >= 0, got {self.kl_coef:g}")
        return problems
