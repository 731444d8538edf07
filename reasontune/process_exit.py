"""How a reasontune process ends: ``sys.exit``, or, for a rank that closed its process group, without the interpreter's teardown.

Torch-free, so that ``cli`` (and ``reasontune --help``) can end through it without loading torch.

``destroy_process_group`` does not free a gloo group: DTensor's sharding caches (specs holding
the device mesh, which holds the group) keep it and its worker threads alive until the
interpreter tears its modules down, and there a finished rank was seen to abort ("terminate
called without an active exception", status -6) after it had saved everything. So such a rank
runs the ``atexit`` handlers and flushes its streams while the interpreter is whole, then leaves
with ``os._exit``: only the module teardown is skipped.
"""

from __future__ import annotations

import atexit
import os
import sys
from typing import NoReturn

_closed_a_process_group = False


def mark_process_group_closed() -> None:
    """Records that this process destroyed a process group of more than one rank (``distributed.close_distributed``)."""
    global _closed_a_process_group
    _closed_a_process_group = True


def exit_process(status: int) -> NoReturn:
    """Ends the process with ``status``: ``sys.exit``, or ``atexit`` handlers, flush and ``os._exit`` after a closed group.

    Call it last: nothing after it runs, and in a rank that closed its group no ``finally`` or
    ``with`` block that is still open finishes either.
    """
    if not _closed_a_process_group:
        sys.exit(status)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken stream has nothing left to lose
            pass
    os._exit(status)
