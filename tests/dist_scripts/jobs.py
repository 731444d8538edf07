"""Runs distributed test jobs in one process (one launch pays the imports once): ``jobs.py JOB ARGS [JOB ARGS …]``.

Jobs: ``invariance OUT`` (invariance.run_cases), ``save OUT`` and ``resume FROM OUT``
(checkpoint_resume.save_or_resume), ``fused OUT`` (fused_log_probs.run), ``gather OUT`` (each rank takes its groups of 2 of 10
items; gathering every rank's part with ``all_gather_objects`` must give all 10 in order). Works under plain python (world size 1) and torchrun.
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from checkpoint_resume import save_or_resume
from fused_log_probs import run as run_fused_log_probs
from invariance import run_cases

from reasontune import distributed
from reasontune.process_exit import exit_process


def main(arguments: list[str]) -> None:
    torch.set_num_threads(1)
    ctx = distributed.init_distributed("cpu")
    with distributed.stop_all_ranks_on_error(ctx):
        while arguments:
            job = arguments.pop(0)
            if job == "invariance":
                run_cases(ctx, Path(arguments.pop(0)))
            elif job == "save":
                save_or_resume(ctx, Path(arguments.pop(0)), None)
            elif job == "resume":
                source = Path(arguments.pop(0))
                save_or_resume(ctx, Path(arguments.pop(0)), source)
            elif job == "fused":
                run_fused_log_probs(ctx, Path(arguments.pop(0)))
            elif job == "gather":
                mine = [f"item-{i}" for i in range(10)][distributed.rank_slice(10, ctx, group_size=2)]
                gathered = [item for part in distributed.all_gather_objects(mine) for item in part]
                if ctx.is_main:
                    Path(arguments.pop(0)).write_text(json.dumps({"mine": mine, "gathered": gathered}))
                else:
                    arguments.pop(0)
            else:
                raise SystemExit(f"unknown job {job!r}; expected invariance, save, resume, fused or gather")
    distributed.close_distributed()


if __name__ == "__main__":
    main(sys.argv[1:])
    exit_process(0)
