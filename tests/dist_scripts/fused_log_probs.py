"""The fused log-prob path on an FSDP2-sharded model: log-probs, entropies and gradients of one process.

``run(ctx, OUT)`` (through jobs.py: plain python for world size 1, torchrun --nproc_per_node 2 for
world size 2) takes a tiny Qwen2 (tied and untied embeddings), sharded at world size 2, through two
iterations of: forward and backward of ``get_response_log_probs(implementation="fused")`` on this
rank's rows of a fixed batch (a weighted sum of log-probs and entropies), then an SGD step. Every
call is counted at the fused autograd Function (the chunked fallback would leave the count at 0).
Rank 0 writes ``OUT/world-N.safetensors``: the gathered log-probs and entropies of each iteration,
the full gradients of each iteration (FSDP2 sums the ranks' shares: the gradient of the whole
batch) and the final weights; at world size 1 also the ``naive`` log-probs and gradients as the
independent reference. ``OUT/world-N.json`` holds the call count and the model class.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from reasontune import distributed, logprobs
from reasontune.logprobs import get_response_log_probs
from reasontune.modeling import build_model_from_config, tiny_qwen2_config

VOCAB, ROWS, SEQ, CHUNK = 97, 4, 11, 5  # chunks of 5 tokens: several per row, the last one short
ITERATIONS = 2


def fixed_batch() -> dict[str, torch.Tensor]:
    """Returns input ids, labels, a response mask (3 to 9 tokens a row) and per-token loss weights, (ROWS, SEQ)."""
    generator = torch.Generator().manual_seed(4242)
    input_ids = torch.randint(1, VOCAB, (ROWS, SEQ), generator=generator)
    labels = torch.randint(0, VOCAB, (ROWS, SEQ), generator=generator)
    starts = torch.tensor([2, 5, 1, 8])
    mask = torch.arange(SEQ).unsqueeze(0) >= starts.unsqueeze(1)
    weights = torch.randn(ROWS, SEQ, generator=generator)
    return {"input_ids": input_ids, "labels": labels, "response_mask": mask, "weights": weights}


class CallCounter:
    """Counts calls of the fused autograd Function (``logprobs._FusedLinearLogProbs.apply``)."""

    def __init__(self):
        self.calls = 0
        self.original = logprobs._FusedLinearLogProbs.apply

    def __call__(self, *args):
        self.calls += 1
        return self.original(*args)


def full(tensor: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach().clone()


def run_model(ctx, tied: bool, implementation: str, counter: CallCounter) -> dict[str, torch.Tensor]:
    """Returns the gathered log-probs, entropies, gradients and final weights of ``ITERATIONS`` iterations."""
    model = build_model_from_config(tiny_qwen2_config(vocab_size=VOCAB, hidden_size=32, num_heads=4, num_kv_heads=2,
                                                      tie_word_embeddings=tied), seed=0)
    model = distributed.shard_model(model, ctx)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    batch = fixed_batch()
    mine = distributed.rank_slice(ROWS, ctx)
    results = {}
    for iteration in range(ITERATIONS):
        optimizer.zero_grad()
        part = {key: value[mine] for key, value in batch.items()}
        outputs = get_response_log_probs(model, part["input_ids"], part["labels"], return_token_entropy=True,
                                         response_mask=part["response_mask"], implementation=implementation,
                                         chunk_size=CHUNK)
        # Distinct weights for log-probs and entropies: a gradient of either one that went missing shows.
        loss = (part["weights"] * outputs["log_probs"]).sum() + (0.3 * part["weights"].flip(1) *
                                                                  outputs["token_entropy"]).sum()
        loss.backward()
        for key in ("log_probs", "token_entropy"):
            results[f"{iteration}/{key}"] = torch.cat(distributed.all_gather_objects(outputs[key].detach()))
        for name, parameter in model.named_parameters():
            results[f"{iteration}/grad/{name}"] = full(parameter.grad)
        optimizer.step()
    for layer in distributed.full_state_dict_layers(model):
        results.update({f"final/{name}": tensor.clone() for name, tensor in layer.items()})
    results["model_class"] = type(model).__name__
    return results


def run(ctx, out_dir: Path) -> None:
    counter = CallCounter()
    logprobs._FusedLinearLogProbs.apply = counter
    try:
        tensors, facts = {}, {"fused_calls": {}, "model_class": {}}
        implementations = ["fused", "naive"] if not ctx.is_distributed else ["fused"]
        for tied in (False, True):
            for implementation in implementations:
                before = counter.calls
                results = run_model(ctx, tied, implementation, counter)
                case = f"{'tied' if tied else 'untied'}-{implementation}"
                facts["model_class"][case] = results.pop("model_class")
                facts["fused_calls"][case] = counter.calls - before
                tensors.update({f"{case}/{key}": value for key, value in results.items()})
    finally:
        logprobs._FusedLinearLogProbs.apply = counter.original
    if ctx.is_main:
        from safetensors.torch import save_file

        out_dir.mkdir(parents=True, exist_ok=True)
        save_file({key: value.contiguous() for key, value in tensors.items()},
                  str(out_dir / f"world-{ctx.world_size}.safetensors"))
        (out_dir / f"world-{ctx.world_size}.json").write_text(json.dumps(facts))
