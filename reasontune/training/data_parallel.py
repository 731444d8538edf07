"""What the trainers and ``eval`` need on top of reasontune.distributed to run under torchrun.

- ``rank_microbatches``: this rank's share of an optimizer step's global microbatches, padded
  with zero-gradient filler microbatches so that every rank runs as many forward/backward
  passes (FSDP2 gathers each layer's weights in a collective: unequal counts would hang).
- ``UnshardedReplica``: a full copy of a sharded policy for in-loop evaluation with the HF
  generator. Ranks stop generating after different numbers of tokens, so generating with the
  FSDP2 model itself would leave ranks waiting in each other's weight gathers; the replica is
  refreshed from the shards (one layer gathered at a time) before each evaluation and then
  every rank generates on its own questions without any collective.
- ``sharded_rollouts``: EI's and GRPO's rollouts, each rank sampling its slice of the questions
  (whole groups), gathered in order so that every rank holds the whole batch.
- ``unsharded_replica`` / ``shard_policy``: the replica where the HF generator needs one, and
  FSDP2 sharding with the run's ``--fsdp-*`` flags.

At world size 1 each of these is the identity or does nothing.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch

from reasontune import distributed
from reasontune.data import Example, example_prompt
from reasontune.distributed import (
    DistributedContext,
    all_gather_objects,
    full_state_dict_layers,
    is_sharded,
    rank_slice,
)
from reasontune.environments import Environment
from reasontune.generation import Generator, SamplingOptions
from reasontune.rollouts import RewardFn, Rollouts, generate_rollouts, merge_rollouts

SINGLE_PROCESS = DistributedContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend=None)


def rank_microbatches(step_microbatches: list[dict], ctx: DistributedContext) -> list[dict]:
    """Returns this rank's contiguous part of an optimizer step's microbatches, padded with fillers to the largest rank's count.

    The step's ``world_size × accumulation`` microbatches are dealt out with ``rank_slice``
    (deterministic: the same plan gives the same slices on a resume). A last, shorter step can
    leave a rank fewer (or none); it gets filler microbatches, copies of the step's first
    microbatch marked ``filler`` with ``num_examples`` 0 and an empty response mask, which the
    trainer runs forward and backward with a zero loss, so every rank joins every collective.
    """
    if not ctx.is_distributed:
        return list(step_microbatches)
    mine = list(step_microbatches[rank_slice(len(step_microbatches), ctx)])
    most = -(-len(step_microbatches) // ctx.world_size)
    while len(mine) < most:
        mine.append(filler_microbatch(step_microbatches[0]))
    return mine


def filler_microbatch(template: dict) -> dict:
    """Returns ``template`` (a microbatch dict) with no response token and no example: it contributes nothing but its passes."""
    filler = dict(template)
    filler["response_mask"] = torch.zeros_like(template["response_mask"])
    filler["num_examples"] = 0
    filler["filler"] = True
    return filler


class UnshardedReplica:
    """A full, unsharded copy of a policy, refreshed from the FSDP2 shards for generation (world size > 1).

    Build it from the model BEFORE ``shard_model`` (a deep copy: full weights on the same
    device, so it costs one more copy of the parameters per rank, no gradients or optimizer
    state). ``refresh(sharded)`` copies the current weights in, one decoder layer gathered at a
    time; every rank must call it (the gathers are collectives).
    """

    def __init__(self, model: torch.nn.Module):
        self.model = copy.deepcopy(model)
        self.model.requires_grad_(False)
        self.model.eval()

    @torch.no_grad()
    def refresh(self, sharded: torch.nn.Module) -> torch.nn.Module:
        """Returns the replica after loading ``sharded``'s full weights into it."""
        own = self.model.state_dict()
        for layer in full_state_dict_layers(sharded):
            for name, tensor in layer.items():
                own[name].copy_(tensor)
        return self.model


def unsharded_replica(model: torch.nn.Module, config: Any, ctx: DistributedContext,
                      needed: bool = True) -> UnshardedReplica | None:
    """Returns the ``UnshardedReplica`` the HF generator of a sharded policy samples from, or None where none is needed.

    None at world size 1, when ``needed`` is False (no generation at all), and for ``--backend
    vllm``: a vLLM engine or server takes the weights from the shards themselves, one gathered
    layer at a time (``generation.vllm.policy_weights``), so no rank holds a second full copy.
    Call it before ``shard_policy``.
    """
    if not ctx.is_distributed or not needed or getattr(config, "backend", "hf") != "hf":
        return None
    return UnshardedReplica(model)


def shard_policy(model: torch.nn.Module, config: Any, ctx: DistributedContext) -> torch.nn.Module:
    """Returns ``distributed.shard_model(model, ctx)`` with the run's ``--fsdp-mixed-precision`` and ``--fsdp-cpu-offload``."""
    return distributed.shard_model(model, ctx, mixed_precision=getattr(config, "fsdp_mixed_precision", False),
                                   cpu_offload=getattr(config, "fsdp_cpu_offload", False))


def generation_model(model: torch.nn.Module, replica: UnshardedReplica | None) -> torch.nn.Module:
    """Returns the model to generate with: the refreshed replica for a sharded policy (collective), else ``model``."""
    if replica is None or not is_sharded(model):
        return model
    return replica.refresh(model)


def sharded_rollouts(generator: Generator, examples: Sequence[Example], template: str, sampling: SamplingOptions,
                     reward_fn: RewardFn, ctx: DistributedContext, grading_workers: int | None = None,
                     group: Any = None, environment: Environment | None = None) -> Rollouts:
    """Returns the graded ``Rollouts`` of every one of ``examples``, each rank having sampled and graded its ``rank_slice``.

    A question's ``sampling.n`` responses are sampled on one rank (groups are never split),
    seeded by the question's index in ``examples`` (``SamplingOptions.first_prompt_index``), so
    that the HF generator draws the rollouts of one process; the ranks' rollouts are gathered in
    the order of ``examples`` (over ``group``: default the default group), so every rank holds the
    same ``Rollouts`` afterwards. The generator must be synced first (``generation_model``). At
    world size 1 it is ``generate_rollouts`` on all the examples.

    ``environment`` (None or single-turn: one completion a sample, as ever) makes each sample a
    trajectory of model and environment turns, kept in ``Rollouts.trajectories`` and gathered
    with the rest; ``sampling.max_new_tokens`` then bounds the model tokens of the whole
    trajectory (the trainers' ``--sampling-max-tokens`` is a response's budget, all turns
    together), and each turn at most what is left of it.
    """
    part = rank_slice(len(examples), ctx)
    mine = list(examples[part])
    rollouts = generate_rollouts(generator, [example_prompt(e, template) for e in mine], [e.ground_truth for e in mine],
                                 sampling.replace(first_prompt_index=sampling.first_prompt_index + part.start), reward_fn,
                                 grading_workers=grading_workers, examples=mine, environment=environment,
                                 max_response_tokens=sampling.max_new_tokens)
    return merge_rollouts(all_gather_objects(rollouts, group)) if ctx.is_distributed else rollouts


def refuse_what_torchrun_cannot_run(config: Any, ctx: DistributedContext) -> None:
    """Raises SystemExit naming the option when a trainer's config asks for what does not run data-parallel yet.

    ``--backend vllm`` runs: with ``--vllm-server-url`` every rank sends its own questions to the
    server and rank 0 pushes the weights; in process, one engine per rank on the rank's own GPU
    (tensor parallel 1). What cannot (``GenerationOptions.launch_problems``) is refused here.
    """
    if not ctx.is_distributed:
        return
    launch = config.launch_problems(ctx.world_size) if hasattr(config, "launch_problems") else []
    if launch:
        raise SystemExit("error: " + "; ".join(launch))
