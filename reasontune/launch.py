"""A command's entry under torchrun or alone: check the config, join the process group, run, close it.

Apart from ``distributed`` so that the process-group module knows nothing of configs: the
config check is the command's, the collectives are torch's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from reasontune import distributed
from reasontune.config import check_config


def run_on_every_rank(config: Any, work: Callable[[distributed.DistributedContext], Any]) -> Any:
    """Returns ``work(ctx)`` after checking ``config`` and joining torchrun's process group (none without torchrun).

    The config is checked (``config.check_config``: its values and the files, model and
    packages it names) before any process group starts; an error on one rank stops every rank
    with one message (``distributed.stop_all_ranks_on_error``); the process group is closed at
    the end, also after an exit every rank agreed on (``SystemExit`` with a status). A command's
    entry point is ``run_on_every_rank(config, lambda ctx: …)``.
    """
    check_config(config)
    timeout_s = getattr(config, "process_group_timeout", distributed.DEFAULT_TIMEOUT_S)
    ctx = distributed.init_distributed(config.device, timeout_s=timeout_s)
    try:
        with distributed.stop_all_ranks_on_error(ctx):
            result = work(ctx)
    except SystemExit:
        # An exit every rank agreed on (a finished run, a stop by a signal; any other error never gets here at
        # world size > 1): the process group is destroyed first, as after success. Python tearing down a live
        # gloo group can abort ("terminate called without an active exception", pytorch#190489).
        distributed.close_distributed()
        raise
    distributed.close_distributed()
    return result
