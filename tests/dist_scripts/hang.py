"""Rank 1 stops answering (sleeps) while rank 0 waits in a collective: the job must stop after the timeout, naming rank 1.

Run with ``torchrun --nproc_per_node 2 hang.py main|side TIMEOUT_S``: ``main`` waits in the default process group,
``side`` in ``side_group()`` (GRPO's --async-steps thread uses one); both must keep the same timeout.
"""

import sys
import time

import torch

from reasontune import distributed
from reasontune.process_exit import exit_process

group_kind, timeout_s = sys.argv[1], float(sys.argv[2])
ctx = distributed.init_distributed("cpu", timeout_s=timeout_s)
side = distributed.side_group() if group_kind == "side" else None
with distributed.stop_all_ranks_on_error(ctx):
    if ctx.rank == 1:
        time.sleep(120)  # hung: in a stuck read, a deadlock, a generation that never ends
    if side is None:
        distributed.global_sum(torch.ones(3))
    else:
        distributed.all_gather_objects({"rank": ctx.rank}, group=side)
distributed.close_distributed()
exit_process(0)
