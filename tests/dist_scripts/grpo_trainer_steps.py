"""GRPO's own trainer functions at world size 1 x accumulation 2 and world size 2 x accumulation 1.

``run(OUT)`` (plain python, or ``torchrun --nproc_per_node 2 grpo_trainer_steps.py OUT``) takes 3
rollout batches of fixed token ids through reasontune.training.grpo's ``rollout_microbatches``
(microbatches of ``config.microbatch_size(world size)``), ``rank_train_batches`` (this rank's
microbatches of each optimizer step, fillers where a batch is short, old log-probs on every
rank) and ``train_step`` (counts and metrics reduced over ranks), then ``clip_and_step``. Rank 0
writes ``OUT/world-N.safetensors`` (each case's final weights) and ``OUT/world-N.json`` (each
optimizer step's metrics and gradient norm); tests/test_distributed_cli.py compares them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import save_file

from reasontune.config import check_config
from reasontune import distributed
from reasontune.process_exit import exit_process
from reasontune.modeling import build_model_from_config, tiny_qwen2_config
from reasontune.training.optimizer_step import clip_and_step
from reasontune.training.grpo import GRPOConfig, train_step
from reasontune.training.grpo_rollouts import rank_train_batches, rollout_microbatches

VOCAB, PAD, GROUP = 97, 0, 2
# (loss type, aggregation, rollout batch, train batch): off-policy when the train batch is the smaller
CASES = [("grpo_clip", "sequence_mean", 8, 4), ("grpo_clip", "token_mean", 8, 4),
         ("reinforce_with_baseline", "sequence_sum", 8, 8)]


def rollout_batch(step: int, size: int) -> tuple[list[list[int]], list[list[int]], torch.Tensor, torch.Tensor]:
    """Returns (prompt ids, response ids, advantages, raw rewards) of ``size`` rollouts; lengths vary from 1 to 12 tokens."""
    generator = torch.Generator().manual_seed(3000 + step)
    prompts, responses = [], []
    for index in range(size):
        length = int(torch.randint(8, 13, (), generator=generator)) if index % 3 == 0 else int(
            torch.randint(1, 4, (), generator=generator))
        prompts.append(torch.randint(1, VOCAB, (int(torch.randint(2, 5, (), generator=generator)),),
                                     generator=generator).tolist())
        responses.append(torch.randint(1, VOCAB, (length,), generator=generator).tolist())
    return prompts, responses, torch.randn(size, generator=generator), torch.rand(size, generator=generator)


def run_case(case, ctx) -> tuple[dict[str, torch.Tensor], list[dict]]:
    loss_type, aggregation, rollout_size, train_size = case
    config = GRPOConfig(train_data="x", loss_type=loss_type, loss_aggregation=aggregation, group_size=GROUP,
                        rollout_batch_size=rollout_size, train_batch_size=train_size,
                        gradient_accumulation_steps=2 // ctx.world_size, sampling_max_tokens=16, cliprange=0.2,
                        sampling_temperature=1.0)
    check_config(config, environment=False)
    assert not config.world_problems(ctx.world_size)
    model = distributed.shard_model(build_model_from_config(
        tiny_qwen2_config(vocab_size=VOCAB, hidden_size=32, num_heads=4, num_kv_heads=2), seed=0), ctx)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)  # SGD: a wrong gradient scale changes the weights
    session = SimpleNamespace(config=config, ctx=ctx, model=model, reference=None, device=torch.device("cpu"))
    history = []
    for step in range(3):
        microbatches = rollout_microbatches(*rollout_batch(step, rollout_size), config.microbatch_size(ctx.world_size),
                                            PAD)
        if step == 2:
            microbatches = microbatches[:-1]  # a short batch (dynamic sampling): rank 1 runs a filler at world 2
        for train_batch in rank_train_batches(session, microbatches):
            if not train_batch:
                continue
            metrics = train_step(model, train_batch, config, session.device, ctx)
            metrics["grad_norm"] = clip_and_step(model, optimizer, None, 0.0, metrics["loss"])
            history.append(metrics)
    weights = {}
    for layer in distributed.full_state_dict_layers(model):
        weights.update({f"{loss_type}-{aggregation}/{name}": tensor.clone() for name, tensor in layer.items()})
    return weights, history


def run(out: Path) -> None:
    torch.set_num_threads(1)
    ctx = distributed.init_distributed("cpu")
    with distributed.stop_all_ranks_on_error(ctx):
        weights, histories = {}, {}
        for case in CASES:
            case_weights, histories[f"{case[0]}-{case[1]}"] = run_case(case, ctx)
            weights.update(case_weights)
        if ctx.is_main:
            out.mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in weights.items()}, str(out / f"world-{ctx.world_size}.safetensors"))
            (out / f"world-{ctx.world_size}.json").write_text(json.dumps(histories))
    distributed.close_distributed()


if __name__ == "__main__":
    run(Path(sys.argv[1]))
    exit_process(0)
