"""A torchrun job pushing an FSDP2-sharded policy to a vLLM server: ``server_push.py URL OUT``.

Every rank builds the same seeded tiny Qwen2 model, shards it with ``shard_model`` and calls
``VLLMServerGenerator.sync_weights`` on it against the HTTP server at URL (started by the test);
NCCL is replaced by a sender that records what rank 0 sends. Rank r writes ``OUT/rank-r.json``
(the number of tensors it pushed) and rank 0 also ``OUT/sent.safetensors`` (the tensors it sent,
in order, under their announced names). tests/test_vllm_server.py compares them with the
unsharded model.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import ClassVar

import torch
from safetensors.torch import save_file

from reasontune import distributed
from reasontune.process_exit import exit_process
from reasontune.generation.vllm_server import VLLMServerGenerator
from reasontune.modeling import build_model_from_config, tiny_qwen2_config


class RecordingSender:
    """Stands in for rank 0 of the NCCL weight group: keeps a copy of each tensor sent."""

    sent: ClassVar[list[torch.Tensor]] = []

    def __init__(self, address: str, port: int, world_size: int):
        self.world_size = world_size

    def send(self, tensor: torch.Tensor) -> None:
        RecordingSender.sent.append(tensor.detach().clone())

    def wait(self) -> None:
        pass


def main(url: str, out: Path) -> None:
    torch.set_num_threads(1)
    ctx = distributed.init_distributed("cpu")
    with distributed.stop_all_ranks_on_error(ctx):
        model = build_model_from_config(tiny_qwen2_config(vocab_size=97, hidden_size=32, num_heads=4, num_kv_heads=2),
                                        seed=0)
        model = distributed.shard_model(model, ctx)
        assert distributed.is_sharded(model)
        generator = VLLMServerGenerator(url, sync_address="127.0.0.1", sync_port=1, chunk_bytes=5000,
                                        sender_factory=RecordingSender)
        pushed = generator.sync_weights(model)
        (out / f"rank-{ctx.rank}.json").write_text(json.dumps({"pushed": pushed}))
        if ctx.is_main:
            save_file({f"{i:04d}": tensor.contiguous() for i, tensor in enumerate(RecordingSender.sent)},
                      out / "sent.safetensors")
    distributed.close_distributed()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
    exit_process(0)
