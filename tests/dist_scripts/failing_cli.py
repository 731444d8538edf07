"""The real ``reasontune`` command under torchrun, with rank 1 failing at its second optimizer step.

``torchrun --nproc_per_node 2 failing_cli.py sft …``: on rank 1 only, ``train_step`` raises at
the second call (rank 0 then waits in that step's collectives); tests/test_distributed_cli.py
checks that both ranks stop promptly with one message.
"""

import os
import sys

from reasontune.cli import main
from reasontune.training import sft

if os.environ.get("RANK") == "1":
    real_train_step, calls = sft.train_step, []

    def failing_train_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected failure in step 2")
        return real_train_step(*args, **kwargs)

    sft.train_step = failing_train_step

sys.exit(main(sys.argv[1:]))
