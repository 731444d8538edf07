"""Rank 1 raises while rank 0 waits in a collective: every rank must stop promptly with one clear message.

Run with ``torchrun --nproc_per_node 2 fail_fast.py``; tests/test_distributed.py times it.
"""

import torch

from reasontune import distributed
from reasontune.process_exit import exit_process

ctx = distributed.init_distributed("cpu", timeout_s=120)
with distributed.stop_all_ranks_on_error(ctx):
    if ctx.rank == 1:
        raise ValueError("microbatch 17 has no response tokens")
    distributed.global_sum(torch.ones(3))  # rank 0 would wait here for ever without the failure handling
distributed.close_distributed()
exit_process(0)
