"""GRPO's rollouts: each step's graded responses, their advantages and microbatches, produced in line or ahead of training.

``prepare_step`` turns one step's seeded questions into a ``RolloutBatch`` (sampled, graded,
rewards shaped, group-normalised advantages, this rank's microbatches with old / reference
log-probs); ``RolloutPipeline`` produces those batches up to ``--async-steps`` steps ahead in a
background thread, or in line when that is 0.
"""

from __future__ import annotations

import concurrent.futures
import copy
import dataclasses
import statistics
import time
from typing import Any

import torch

from reasontune import distributed
from reasontune.checkpoint import CheckpointError
from reasontune.environments.tokens import trajectory_microbatches
from reasontune.logprobs import get_response_log_probs
from reasontune.losses import compute_advantages, mask_truncated_responses, overlong_penalty
from reasontune.rl_recipes import fill_batch, informative_groups
from reasontune.rollouts import Rollouts
from reasontune.tokenization import pad_and_shift, pad_token_id_of
from reasontune.training.data_parallel import generation_model, rank_microbatches, sharded_rollouts
from reasontune.training.policy_sampling import TOOL_METRICS, PolicySession, question_batch, step_seed

# A step whose every advantage is below this (equal rewards in every group) gives no policy gradient.
ZERO_ADVANTAGE = 1e-8


def rollout_microbatches(prompt_ids: list[list[int]], response_ids: list[list[int]], advantages: torch.Tensor,
                         raw_rewards: torch.Tensor, micro_batch_size: int, pad_token_id: int) -> list[dict]:
    """Returns the rollouts cut into microbatches of ``micro_batch_size`` (in rollout order), each padded to its longest.

    Each dict holds ``input_ids``/``labels``/``response_mask`` (micro, L - 1) from ``pad_and_shift``
    and ``advantages``/``raw_rewards`` (micro,) float32. The response tokens are the sampled ids
    themselves, not a re-tokenisation of the text, so the log-probs are of what was sampled.
    """
    microbatches = []
    for start in range(0, len(prompt_ids), micro_batch_size):
        rows = slice(start, start + micro_batch_size)
        batch = pad_and_shift(prompt_ids[rows], response_ids[rows], pad_token_id)
        microbatches.append({"input_ids": batch["input_ids"], "labels": batch["labels"],
                             "response_mask": batch["response_mask"],
                             "advantages": advantages[rows], "raw_rewards": raw_rewards[rows]})
    return microbatches


@torch.no_grad()
def add_log_probs(model, microbatches: list[dict], key: str, device: torch.device, temperature: float = 1.0) -> None:
    """Stores ``model``'s response log-probs (micro, L - 1) at ``temperature``, without gradient, under ``key`` of each microbatch."""
    for mb in microbatches:
        mask = mb["response_mask"].to(device)
        mb[key] = get_response_log_probs(model, mb["input_ids"].to(device), mb["labels"].to(device),
                                         response_mask=mask, temperature=temperature)["log_probs"]



def rollout_batch(session: GRPOSession, step: int, policy=None, group=None) -> tuple[Rollouts, dict[str, float]]:
    """Returns step ``step``'s graded rollouts (seeded questions, ``group_size`` responses each) and their counts.

    The responses are sampled from ``policy`` (an unsharded model; default: the current policy,
    through its refreshed replica when sharded, which is a collective). With
    ``--dynamic-sampling`` groups whose rewards are all equal are dropped and fresh questions
    drawn (seeds varied per draw) until the batch is full or the tries run out. Under torchrun
    the ranks' rollouts are gathered over ``group`` (default: the default process group).
    """
    config = session.config
    needed = config.rollout_batch_size // config.group_size
    session.generator.sync_weights(policy if policy is not None else generation_model(session.model, session.replica))

    def draw(attempt: int) -> tuple[list[Rollouts], list[bool]]:
        indices = question_batch(len(session.questions), needed, config.seed + 7919 * attempt, step)
        batch = [session.questions[i] for i in indices]
        # Under torchrun each rank samples its slice of the questions; every rank gets all the rollouts back.
        drawn = sharded_rollouts(session.generator, batch, session.template,
                                 session.rollouts.replace(seed=step_seed(config.seed, step) + 104_729 * attempt),
                                 session.reward_fn, session.ctx, grading_workers=config.grading_workers, group=group,
                                 environment=session.environment)
        rewards = torch.tensor([r["reward"] for r in drawn.flat_rewards()], dtype=torch.float32)
        keep = informative_groups(rewards, config.group_size).tolist() if config.dynamic_sampling else [True] * len(batch)
        return [drawn.select([i]) for i in range(len(batch))], keep

    filled = fill_batch(draw, needed, config.dynamic_sampling_max_tries if config.dynamic_sampling else 1)
    if not config.async_steps:  # with overlap the engine generates while the policy trains: it never sleeps
        session.generator.sleep()
    return (Rollouts.concat(filled.groups) if filled.groups else None), filled.metrics()


def training_microbatches(session: GRPOSession, rollouts: Rollouts) -> tuple[list[dict], dict[str, float]]:
    """Returns (microbatches with advantages and old / reference / behaviour log-probs, reward statistics) of a rollout batch.

    Rewards get DAPO's soft overlong penalty when asked; advantages come from
    ``compute_advantages`` (baseline and std as configured); truncated responses leave the
    loss with ``--mask-truncated``. Tool trajectories (``rollouts.trajectories``) are cut by
    ``trajectory_microbatches``: the environment's tokens are context, outside the response
    mask, so the loss, the old / reference log-probs and the rollout-mismatch metrics (all
    masked means) cover the model's tokens only.
    """
    config = session.config
    completions = rollouts.flat_completions()
    scores = rollouts.flat_rewards()
    raw_rewards = torch.tensor([float(s["reward"]) for s in scores], dtype=torch.float32)
    if config.overlong_buffer_fraction > 0:
        raw_rewards = raw_rewards + overlong_penalty(
            torch.tensor([c.num_tokens for c in completions]), config.sampling_max_tokens,
            max(1, round(config.overlong_buffer_fraction * config.sampling_max_tokens)), config.overlong_penalty_factor)
    advantages = compute_advantages(raw_rewards, config.group_size, config.advantage_baseline, config.advantage_std,
                                    config.advantage_eps)
    reward_stats = {"nonzero_advantage_fraction": float((advantages.abs() > ZERO_ADVANTAGE).float().mean()),
                    "reward_mean": float(raw_rewards.mean()),
                    "reward_std": float(raw_rewards.std()) if raw_rewards.numel() > 1 else 0.0,
                    "answer_reward_mean": statistics.fmean(float(s["answer_reward"]) for s in scores),
                    "format_reward_mean": statistics.fmean(float(s["format_reward"]) for s in scores)}
    micro = config.microbatch_size(session.ctx.world_size)
    if rollouts.trajectories is not None:  # --env python: model and environment turns, the model's alone trained
        trajectories = [t for group in rollouts.trajectories for t in group]
        microbatches = trajectory_microbatches(trajectories, advantages, raw_rewards, micro, session.tokenizer)
        if config.mask_truncated:
            for start, mb in zip(range(0, len(completions), micro), microbatches):
                truncated = torch.tensor([c.finish_reason == "length" for c in completions[start:start + micro]])
                mb["response_mask"] = mask_truncated_responses(mb["response_mask"], truncated)
        return microbatches, reward_stats
    prompt_ids = [ids for ids in session.tokenizer(rollouts.prompts, add_special_tokens=True)["input_ids"]
                  for _ in range(config.group_size)]
    microbatches = rollout_microbatches(prompt_ids, [c.token_ids for c in completions], advantages, raw_rewards,
                                        micro, pad_token_id_of(session.tokenizer))
    for start, mb in zip(range(0, len(completions), micro), microbatches):
        rows = completions[start:start + micro]
        if config.mask_truncated:
            mb["response_mask"] = mask_truncated_responses(
                mb["response_mask"], torch.tensor([c.finish_reason == "length" for c in rows]))
        if all(c.logprobs is not None and len(c.logprobs) == c.num_tokens for c in rows):
            # The engine's log-probs sit where the labels are those tokens: the response positions, in order.
            behaviour = torch.zeros(mb["labels"].shape, dtype=torch.float32)
            full_mask = pad_and_shift(prompt_ids[start:start + micro], [c.token_ids for c in rows],
                                      0)["response_mask"]
            behaviour[full_mask] = torch.tensor([lp for c in rows for lp in c.logprobs], dtype=torch.float32)
            mb["behaviour_log_probs"] = behaviour
    return microbatches, reward_stats


def rank_train_batches(session: GRPOSession, microbatches: list[dict], behaviour=None) -> list[list[dict]]:
    """Returns this rank's microbatches of each optimizer step of a rollout batch, with old / reference log-probs added.

    An optimizer step takes ``world size x gradient-accumulation-steps`` consecutive microbatches
    (``train-batch-size`` rollouts) and each rank its ``rank_microbatches`` of them (fillers where
    a dynamic-sampling batch stayed short); at world size 1 the step's microbatches themselves.
    The old log-probs of an off-policy run are those of ``behaviour``, the unsharded model that
    sampled the rollouts (``--async-steps``), or else of the current policy, which sampled them:
    every rank computes them for its own microbatches (the same number on every rank: the
    sharded policy's forwards are collectives).
    """
    config = session.config
    per_step = session.ctx.world_size * config.gradient_accumulation_steps
    steps = [microbatches[k * per_step:(k + 1) * per_step] for k in range(config.optimizer_steps_per_rollout_batch)]
    mine = [rank_microbatches(step, session.ctx) if step else [] for step in steps]
    if config.off_policy and config.loss_type in ("grpo_clip", "gspo", "cispo"):
        for train_batch in mine:
            add_log_probs(behaviour if behaviour is not None else session.model, train_batch, "old_log_probs",
                          session.device, config.sampling_temperature)
    if session.reference is not None:
        for train_batch in mine:
            add_log_probs(session.reference, train_batch, "ref_log_probs", session.device)
    return mine


@dataclasses.dataclass
class RolloutBatch:
    """One GRPO step's rollouts, ready to train on: what ``prepare_step`` returns and the loop consumes.

    ``policy_version`` is the GRPO step after whose update the sampling weights were taken (0:
    the starting weights), so the rollouts of step ``step`` are ``step - 1 - policy_version``
    steps stale. ``metrics`` holds what the step logs of its rollouts (``rollout_metrics``) and
    is empty when dynamic sampling kept no group. ``rollouts`` is for inspection only: a batch
    restored from a checkpoint (``from_state``) has none.
    """

    step: int
    policy_version: int
    sampling_counts: dict[str, float]
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)
    train_batches: list[list[dict]] = dataclasses.field(default_factory=list)
    rollout_seconds: float = 0.0
    rollouts: Rollouts | None = None

    def state(self) -> dict[str, Any]:
        """Returns the batch as trainer state (JSON structure and tensors: no pickle), ``from_state``'s input."""
        return {key: value for key, value in dataclasses.asdict(self).items() if key != "rollouts"}

    @classmethod
    def from_state(cls, state: Any, where: str = "trainer state") -> RolloutBatch:
        """Returns the batch ``state()`` saved; ``CheckpointError`` naming ``where`` when it is not one."""
        fields = {f.name for f in dataclasses.fields(cls)} - {"rollouts"}
        if not isinstance(state, dict) or not {"step", "policy_version", "sampling_counts"} <= set(state) <= fields:
            raise CheckpointError(f"{where}: field 'pending_rollouts' holds a batch that is not one")
        if not (isinstance(state["step"], int) and isinstance(state.get("train_batches", []), list)
                and all(isinstance(rank, list) and all(isinstance(b, dict) for b in rank)
                        for rank in state.get("train_batches", []))):
            raise CheckpointError(f"{where}: field 'pending_rollouts' holds a malformed batch")
        return cls(**state)


@dataclasses.dataclass
class GRPOSession(PolicySession):
    """Every object the GRPO loop and its rollout production need (``grpo.setup_grpo`` builds it): the policy session plus optimizer and reference."""

    optimizer: torch.optim.Optimizer | None = None
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    reference: Any = None  # frozen starting model for the KL penalty, or None
    start_step: int = 0
    restored_batches: list[RolloutBatch] = dataclasses.field(default_factory=list)  # --async-steps: from the checkpoint
    steps_without_signal: list[int] = dataclasses.field(default_factory=list)  # consecutive steps, every advantage 0



def prepare_step(session: GRPOSession, step: int, policy_version: int, behaviour=None, group=None) -> RolloutBatch:
    """Returns step ``step``'s rollouts sampled from ``behaviour`` (default: the current policy), graded and cut into this rank's microbatches.

    Under torchrun the rollouts are gathered over ``group`` (``RolloutPipeline``'s own, or the default group).
    """
    tick = time.perf_counter()
    rollouts, sampling_counts = rollout_batch(session, step, behaviour, group)
    batch = RolloutBatch(step, policy_version, sampling_counts, rollouts=rollouts)
    if rollouts is not None:
        microbatches, reward_stats = training_microbatches(session, rollouts)
        batch.metrics = rollout_metrics(rollouts, reward_stats)
        batch.train_batches = rank_train_batches(session, microbatches, behaviour)
    batch.rollout_seconds = time.perf_counter() - tick
    return batch


class RolloutPipeline:
    """Rollout batches of GRPO steps, generated up to ``--async-steps`` K steps ahead of training (K = 0: in line).

    With K > 0 one background thread owns a behaviour copy of the policy. After the update of
    step ``k`` the loop hands over a snapshot of the weights (``policy_version`` k) for the
    rollouts of step ``k + 1 + K``, so step ``s`` trains on rollouts of the weights after step
    ``max(s - 1 - K, first)``: at most K steps stale, and which weights produced which rollout
    is fixed by the step numbers, never by timing. The thread also computes the old log-probs
    under those same weights, so the importance ratio is against the behaviour policy (AReaL,
    arXiv 2505.24298, and PipelineRL run training ahead of generation the same way). With K = 0
    nothing runs in the background: each step samples from the current policy when it starts,
    exactly the on-policy loop.

    Under torchrun every rank runs its own thread on its slice of the questions and the thread
    gathers the rollouts over a process group of its own; the snapshots (layer-by-layer gathers
    of the shards) are taken by the main thread, between optimizer steps, on every rank alike.
    """

    def __init__(self, session: GRPOSession, first_step: int, last_step: int):
        self.session, self.last_step = session, last_step
        self.ahead = session.config.async_steps
        self.pending: dict[int, concurrent.futures.Future] = {}
        self.behaviour = self.executor = self.group = None
        if self.ahead:
            self.group = distributed.side_group()  # under torchrun: the thread's gathers stay off the FSDP collectives
            self.behaviour = copy.deepcopy(generation_model(session.model, session.replica)).eval().requires_grad_(False)
            self.executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="grpo-rollouts")
            restored = {batch.step: batch for batch in session.restored_batches}
            for step in range(first_step, min(first_step + self.ahead, last_step) + 1):
                if step in restored:  # sampled before the checkpoint from weights it does not hold
                    self.pending[step] = concurrent.futures.Future()
                    self.pending[step].set_result(restored[step])
                else:
                    self._submit(step, first_step - 1)

    def _submit(self, step: int, policy_version: int) -> None:
        # Gathered layer by layer when sharded (collectives on the main thread, between steps), copied either way.
        weights = {name: tensor.clone() for layer in distributed.full_state_dict_layers(self.session.model)
                   for name, tensor in layer.items()}
        self.pending[step] = self.executor.submit(self._produce, step, policy_version, weights)

    @torch.no_grad()
    def _produce(self, step: int, policy_version: int, weights: dict[str, torch.Tensor]) -> RolloutBatch:
        self.behaviour.load_state_dict(weights)
        return prepare_step(self.session, step, policy_version, self.behaviour, self.group)

    def take(self, step: int) -> tuple[RolloutBatch, float]:
        """Returns (step ``step``'s rollout batch, seconds the trainer waited for it)."""
        tick = time.perf_counter()
        if not self.ahead:
            return prepare_step(self.session, step, step - 1), time.perf_counter() - tick
        batch = self.pending.pop(step).result()
        return batch, time.perf_counter() - tick

    def updated(self, step: int) -> None:
        """Returns nothing; after step ``step``'s update, starts the rollouts of step ``step + 1 + K`` from the new weights."""
        if self.ahead and step + 1 + self.ahead <= self.last_step:
            self._submit(step + 1 + self.ahead, step)

    def pending_state(self, step: int) -> dict[str, Any] | None:
        """Returns the batches of steps after ``step`` sampled from weights before it, as trainer state (None: nothing to keep).

        A checkpoint of step ``step`` holds the weights that sample step ``step + 1 + K``; the
        batches of steps ``step + 1 … step + K`` come from older weights, so an exact resume
        needs them saved (their rollouts are waited for). One process only: under torchrun each
        rank holds its own microbatches, and a resume samples them again.
        """
        if not self.ahead or self.session.ctx.is_distributed:
            return None
        older = [batch for later, batch in sorted(self.pending.items()) if later <= step + self.ahead]
        return {"async_steps": self.ahead, "batches": [future.result().state() for future in older]}

    def drain(self) -> None:
        """Returns nothing once the background thread is idle (the generator is then free, e.g. to evaluate with)."""
        concurrent.futures.wait(list(self.pending.values()))

    def close(self) -> None:
        """Returns nothing; cancels rollouts not yet started and waits for the running one."""
        if self.executor is not None:
            self.executor.shutdown(wait=True, cancel_futures=True)
        self.pending.clear()


def rollout_metrics(rollouts: Rollouts, reward_stats: dict[str, float]) -> dict[str, Any]:
    """Returns what a GRPO step logs of its rollouts: rewards, accuracy, response lengths (correct / incorrect /
    truncated) and, with ``--env python``, the ``TOOL_METRICS`` (lengths count model tokens only)."""
    summary = rollouts.summary()
    return {"reward": reward_stats["reward_mean"], "reward_std": reward_stats["reward_std"],
            "nonzero_advantage_fraction": reward_stats["nonzero_advantage_fraction"],
            "format_reward": reward_stats.get("format_reward_mean"), "answer_reward": reward_stats.get("answer_reward_mean"),
            **{key: summary[key] for key in ("accuracy", "pass_at_n", "mean_response_tokens",
                                             "mean_response_tokens_correct", "mean_response_tokens_incorrect",
                                             "mean_response_tokens_truncated", "truncated_fraction")},
            **{key: summary[key] for key in TOOL_METRICS if key in summary}}

