"""Three optimizer steps of SFT and GRPO on a tiny Qwen2, written like a data-parallel trainer.

``run_cases(ctx, OUT)`` (through jobs.py, under plain python for world size 1 with accumulation
2, or torchrun --nproc_per_node 2 for world size 2 with accumulation 1) takes the same global
batch every step either way. Rank 0 writes ``OUT/world-N.safetensors`` (each case's final weights,
gathered layer by layer) and ``OUT/world-N.json`` (each step's gradient norm before clipping);
tests/test_distributed.py compares the two worlds.

The step is the trainers' own: reasontune.logprobs.get_response_log_probs,
reasontune.losses.sft_microbatch_train_step / policy_microbatch_train_step with counts summed over every rank and
microbatch (distributed.global_sum), then training.optimizer_step.clip_and_step.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from reasontune import distributed
from reasontune.batching import pack_examples, packed_forward_kwargs
from reasontune.logprobs import get_response_log_probs
from reasontune.losses import PolicyLossSettings, policy_microbatch_train_step, sft_microbatch_train_step
from reasontune.modeling import build_model_from_config, tiny_qwen2_config
from reasontune.tokenization import pad_and_shift
from reasontune.training.optimizer_step import clip_and_step

VOCAB, PAD = 97, 0
GLOBAL_EXAMPLES = 4  # per optimizer step: 2 microbatches of 2 (world 1) or 1 of 2 per rank (world 2)
GROUP_SIZE = 2
STEPS = 3
SFT_NORMALIZE_CONSTANT = 3.0  # distinct from every length in the data
GRPO_NORMALIZE_CONSTANT = 16.0


def sft_examples(step: int) -> list[tuple[list[int], list[int]]]:
    """Returns the step's global batch; the first half (rank 0's) has much longer responses than the second."""
    generator = torch.Generator().manual_seed(1000 + step)
    examples = []
    for index in range(GLOBAL_EXAMPLES):
        prompt_length = int(torch.randint(2, 6, (), generator=generator))
        response_length = int(torch.randint(8, 13, (), generator=generator)) if index < GLOBAL_EXAMPLES // 2 \
            else int(torch.randint(1, 4, (), generator=generator))
        tokens = torch.randint(1, VOCAB, (prompt_length + response_length,), generator=generator).tolist()
        examples.append((tokens[:prompt_length], tokens[prompt_length:]))
    return examples


def sft_microbatches(examples, packed: bool) -> list[dict]:
    prompts, outputs = [p for p, _ in examples], [o for _, o in examples]
    if packed:
        return pack_examples(prompts, outputs, PAD, tokens_per_row=32, rows_per_batch=1)
    batch = pad_and_shift(prompts, outputs, PAD)
    batch["num_examples"] = len(examples)
    return [batch]


def sft_step(model, examples, ctx, accumulation: int, aggregation: str, packed: bool) -> dict:
    """Runs forward/backward of this rank's share of the step (gradients accumulated)."""
    mine = examples[distributed.rank_slice(len(examples), ctx)]
    per_microbatch = len(mine) // accumulation
    microbatches = [mb for k in range(accumulation)
                    for mb in sft_microbatches(mine[k * per_microbatch:(k + 1) * per_microbatch], packed)]
    examples_in_step = distributed.global_sum(sum(mb["num_examples"] for mb in microbatches))
    tokens_in_step = distributed.global_sum(sum(int(mb["response_mask"].sum()) for mb in microbatches))
    loss_sum = 0.0
    for mb in microbatches:
        forward = packed_forward_kwargs(mb, model.config._attn_implementation) if packed else {}
        outputs = get_response_log_probs(model, mb["input_ids"], mb["labels"], response_mask=mb["response_mask"],
                                         **forward)
        loss, _ = sft_microbatch_train_step(outputs["log_probs"], mb["response_mask"], accumulation,
                                            normalize_constant=SFT_NORMALIZE_CONSTANT, aggregation=aggregation,
                                            tokens_in_step=tokens_in_step, examples_in_step=examples_in_step)
        loss_sum += float(loss)
    return {"loss": distributed.global_sum(loss_sum)}


def grpo_rollouts(step: int) -> dict:
    """Returns a rollout batch of 2 groups of 2 responses; group 0 (rank 0's) has the long responses."""
    examples = sft_examples(step)
    batch = pad_and_shift([p for p, _ in examples], [o for _, o in examples], PAD)
    generator = torch.Generator().manual_seed(2000 + step)
    batch["advantages"] = torch.randn(GLOBAL_EXAMPLES, generator=generator)
    batch["raw_rewards"] = torch.rand(GLOBAL_EXAMPLES, generator=generator)
    return batch


def grpo_step(model, rollouts, ctx, accumulation: int, aggregation: str) -> dict:
    """Runs forward/backward of this rank's groups (whole groups only), counts summed over ranks."""
    mine = distributed.rank_slice(GLOBAL_EXAMPLES, ctx, group_size=GROUP_SIZE)
    rows = range(mine.start, mine.stop)
    per_microbatch = len(rows) // accumulation
    microbatches = [{key: value[rows[k * per_microbatch]:rows[k * per_microbatch] + per_microbatch]
                     for key, value in rollouts.items()} for k in range(accumulation)]
    tokens_in_step = distributed.global_sum(sum(int(mb["response_mask"].sum()) for mb in microbatches))
    examples_in_step = distributed.global_sum(sum(len(mb["input_ids"]) for mb in microbatches))
    loss_sum = 0.0
    for mb in microbatches:
        outputs = get_response_log_probs(model, mb["input_ids"], mb["labels"], response_mask=mb["response_mask"])
        old_log_probs = mb.get("old_log_probs", outputs["log_probs"].detach())
        settings = PolicyLossSettings("grpo_clip", accumulation, cliprange=0.2, aggregation=aggregation,
                                      normalize_constant=GRPO_NORMALIZE_CONSTANT)
        loss, _ = policy_microbatch_train_step(
            outputs["log_probs"], mb["response_mask"], settings, raw_rewards=mb["raw_rewards"],
            advantages=mb["advantages"], old_log_probs=old_log_probs, tokens_in_step=tokens_in_step,
            examples_in_step=examples_in_step)
        loss_sum += float(loss)
    return {"loss": distributed.global_sum(loss_sum)}


CASES = [("sft", aggregation, packed) for aggregation in ("sequence_sum", "token_mean") for packed in (False, True)] + [
    ("grpo", aggregation, off_policy) for aggregation in ("sequence_mean", "sequence_sum", "token_mean")
    for off_policy in (False, True)]


def case_name(case) -> str:
    kind, variant, flag = case
    return f"{kind}-{variant}-" + (("packed" if flag else "padded") if kind == "sft" else ("off" if flag else "on"))


def run_case(case, ctx, accumulation: int) -> tuple[dict, list[float]]:
    kind, variant, flag = case
    model = build_model_from_config(tiny_qwen2_config(vocab_size=VOCAB, hidden_size=32, num_heads=4, num_kv_heads=2),
                                    seed=0)
    if case == CASES[0]:
        model.gradient_checkpointing_enable()  # before sharding …
    model = distributed.shard_model(model, ctx)
    if case == CASES[1]:
        model.gradient_checkpointing_enable()  # … and after: both compose with FSDP2
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)  # SGD: a wrong gradient scale changes the weights
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    grad_norms = []
    rollouts = grpo_rollouts(0) if kind == "grpo" else None
    if kind == "grpo" and flag:  # off-policy: one rollout batch, old log-probs of the sampling policy, 3 steps
        with torch.no_grad():
            rollouts["old_log_probs"] = get_response_log_probs(
                model, rollouts["input_ids"], rollouts["labels"], response_mask=rollouts["response_mask"])["log_probs"]
    for step in range(STEPS):
        if kind == "sft":
            metrics = sft_step(model, sft_examples(step), ctx, accumulation, variant, flag)
        else:
            metrics = grpo_step(model, rollouts if flag else grpo_rollouts(step), ctx, accumulation, variant)
        grad_norms.append(clip_and_step(model, optimizer, scheduler, 0.0, metrics["loss"]))
    weights = {}
    for layer in distributed.full_state_dict_layers(model):
        weights.update({f"{case_name(case)}/{name}": tensor.clone() for name, tensor in layer.items()})
    return weights, grad_norms


def run_cases(ctx, out_dir: Path) -> None:
    """Runs every case at this world size (accumulation 2 / world size) and writes the results from rank 0."""
    accumulation = 2 // ctx.world_size
    weights, grad_norms = {}, {}
    for case in CASES:
        case_weights, grad_norms[case_name(case)] = run_case(case, ctx, accumulation)
        weights.update(case_weights)
    if ctx.is_main:
        from safetensors.torch import save_file

        out_dir.mkdir(parents=True, exist_ok=True)
        save_file(weights, str(out_dir / f"world-{ctx.world_size}.safetensors"))
        (out_dir / f"world-{ctx.world_size}.json").write_text(json.dumps(grad_norms))
