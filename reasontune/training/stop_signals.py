"""SIGINT / SIGTERM during training: finish the optimizer step, save a checkpoint, print how to resume, exit 130.

``StopSignals`` is armed by ``start_run`` and held by the trainer's session: a first signal
only asks the loop to stop after its current step (``requested``), a second one stops at once.
Under torchrun every rank asks ``requested(ctx)`` at the same point of its loop, so all of them
save and stop together when any one got a signal.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any, Callable, NoReturn

from reasontune import distributed
from reasontune.run_layout import checkpoint_name
from reasontune.tracking import MetricsLogger

_HANDLED = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """SIGINT and SIGTERM turned into a request to stop after the current step (handlers replaced in the main thread only)."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def arm(self) -> StopSignals:
        """Returns itself after replacing the SIGINT/SIGTERM handlers (off the main thread nothing changes: signals go there)."""
        if threading.current_thread() is threading.main_thread():
            for signum in _HANDLED:
                self._previous[signum] = signal.signal(signum, self._on_signal)
        return self

    def disarm(self) -> None:
        """Returns nothing; puts back the handlers ``arm`` replaced."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def requested(self, ctx: distributed.DistributedContext | None = None) -> bool:
        """Returns whether SIGINT or SIGTERM arrived since ``arm``; under torchrun (``ctx``) True on every rank as soon as any rank got one.

        Under torchrun every rank must call it at the same point: it is a collective.
        """
        local = self.signal is not None
        if ctx is None or not ctx.is_distributed:
            return local
        return bool(distributed.global_max(int(local)))

    @property
    def name(self) -> str:
        """Returns the signal's name (SIGINT, SIGTERM), or what stopped a rank that got none itself."""
        return signal.Signals(self.signal).name if self.signal is not None else "a signal to another rank"

    def _on_signal(self, signum, frame) -> None:
        if self.signal is not None:  # a second signal: stop at once
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:
                return  # torchrun forwards to its workers the signal a user sent the whole job: the same request again
            raise KeyboardInterrupt
        self.signal = signum
        print(f"\n{signal.Signals(signum).name}: finishing the current step, then saving a checkpoint "
              "(send it again to stop at once, unsaved)", file=sys.stderr, flush=True)


def stop_for_signal(stop: StopSignals, resume_command: str, step: int, save: Callable[[int, str], Any],
                    logger: MetricsLogger | None, progress) -> NoReturn:
    """Exits 130 after ``save(step, "checkpoint-<step>")`` (every rank), logging the stop and printing ``resume_command``."""
    path = save(step, checkpoint_name(step))
    if progress is not None:
        progress.close()
    stop.disarm()
    if logger is not None:  # rank 0
        logger.log("event", step, message=f"stopped by {stop.name} after step {step}; saved {path.name}")
        logger.close()
        print(f"stopped by {stop.name} after step {step}; checkpoint saved in {path}\nresume with: {resume_command}",
              file=sys.stderr, flush=True)
    raise SystemExit(130)
