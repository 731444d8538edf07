"""Runs distributed test jobs in one process (one launch pays the imports once): ``jobs.py JOB ARGS [JOB ARGS …]``.

Jobs: ``invariance OUT`` (invariance.run_cases), ``save OUT`` and ``resume FROM OUT``
(checkpoint_resume.save_or_resume). Works under plain python (world size 1) and torchrun.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from checkpoint_resume import save_or_resume  # noqa: E402
from invariance import run_cases  # noqa: E402

from reasontune import distributed  # noqa: E402


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
            else:
                raise SystemExit(f"unknown job {job!r}; expected invariance, save or resume")
    distributed.close_distributed()


if __name__ == "__main__":
    main(sys.argv[1:])
