"""Sharded checkpoints across world sizes: train, save at step 2, take step 3; or resume from a checkpoint and take step 3.

Through jobs.py, at any world size (plain python or torchrun):

- ``save OUT``: 2 AdamW steps from the seed-0 model, ``save_checkpoint(OUT/checkpoint-2, …,
  optimizer=…)`` (every rank writes its shard; rank 0 the consolidated weights), then step 3;
- ``resume FROM OUT``: a model from another seed, ``load_sharded`` + ``load_trainer_state`` +
  ``restore_rng`` from FROM, then step 3.

Rank 0 writes ``OUT/after-3.safetensors`` (the full weights after step 3) and ``OUT/probe.json``
(the scheduler's step, whether this rank's RNG came back, and draws from every generator right
after the save or the restore). The global batch of every step is the same at every world size.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch

from reasontune import checkpoint, distributed
from reasontune.logprobs import get_response_log_probs
from reasontune.losses import sft_microbatch_train_step
from reasontune.modeling import build_model_from_config, tiny_qwen2_config
from reasontune.tokenization import pad_and_shift
from reasontune.training.optimizer_step import clip_and_step

VOCAB, PAD, GLOBAL_EXAMPLES = 97, 0, 4


def sft_step(model, step: int, ctx, optimizer, scheduler) -> float:
    generator = torch.Generator().manual_seed(500 + step)
    lengths = torch.randint(4, 12, (GLOBAL_EXAMPLES,), generator=generator).tolist()
    sequences = [torch.randint(1, VOCAB, (n,), generator=generator).tolist() for n in lengths]
    mine = sequences[distributed.rank_slice(len(sequences), ctx)]
    accumulation = GLOBAL_EXAMPLES // ctx.world_size // 2  # microbatches of 2 examples
    examples_in_step = distributed.global_sum(len(mine))
    loss_sum = 0.0
    for k in range(accumulation):
        chunk = mine[2 * k:2 * k + 2]
        batch = pad_and_shift([s[:2] for s in chunk], [s[2:] for s in chunk], PAD)
        log_probs = get_response_log_probs(model, batch["input_ids"], batch["labels"],
                                           response_mask=batch["response_mask"])["log_probs"]
        loss, _ = sft_microbatch_train_step(log_probs, batch["response_mask"], accumulation,
                                            normalize_constant=3.0, examples_in_step=examples_in_step)
        loss_sum += float(loss)
    return clip_and_step(model, optimizer, scheduler, 1.0, distributed.global_sum(loss_sum))


def draws() -> list[float]:
    return [random.random(), float(np.random.rand()), float(torch.rand(()))]


def save_or_resume(ctx, out_dir: Path, resume_from: Path | None) -> None:
    """Trains 2 steps and saves (``resume_from`` None) or resumes, then takes step 3; rank 0 writes the results."""
    config = tiny_qwen2_config(vocab_size=VOCAB, hidden_size=32, num_heads=4, num_kv_heads=2)
    model = distributed.shard_model(build_model_from_config(config, seed=0 if resume_from is None else 123), ctx)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    seed = 7 + ctx.rank if resume_from is None else 99  # a resume gets its draws back only by restoring
    random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)
    if resume_from is None:
        for step in range(2):
            sft_step(model, step, ctx, optimizer, scheduler)
        state = {"step": 2, "scheduler": scheduler.state_dict(), "data_position": 2 * GLOBAL_EXAMPLES}
        checkpoint.save_checkpoint(out_dir / "checkpoint-2", model, None, state, optimizer=optimizer, ctx=ctx)
        rng_restored = True
    else:
        checkpoint.load_sharded(resume_from, model, optimizer)
        state = checkpoint.load_trainer_state(resume_from)
        scheduler.load_state_dict(state["scheduler"])
        rng_restored = checkpoint.restore_rng(resume_from, ctx.rank)
    probe = {"scheduler_epoch": scheduler.last_epoch, "step": state["step"], "rng_restored": rng_restored,
             "draws": draws()}
    sft_step(model, 2, ctx, optimizer, scheduler)
    weights = {}
    for layer in distributed.full_state_dict_layers(model):
        weights.update({name: tensor.clone() for name, tensor in layer.items()})
    if ctx.is_main:
        from safetensors.torch import save_file

        out_dir.mkdir(parents=True, exist_ok=True)
        save_file(weights, str(out_dir / "after-3.safetensors"))
        (out_dir / "probe.json").write_text(json.dumps(probe))
