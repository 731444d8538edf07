"""Where a run's numbers go: ``metrics.jsonl`` always, Weights & Biases and TensorBoard on request.

``MetricsLogger`` is the one writer of a run directory's ``metrics.jsonl`` (the contract that
``reasontune report`` reads): one JSON object per line with ``"kind"`` (``train``, ``eval``,
``data``, ``event``) and ``"step"``, flushed at every line so a crash loses nothing already
logged. ``Progress`` is the terminal bar of a training loop (step, loss, tokens/s, ETA).
"""

from __future__ import annotations

import json
import math
import os
import sys
import threading
import time
from numbers import Number
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from reasontune.run_layout import METRICS_FILE

WANDB_RUN_ID_FILE = "wandb_run_id"


def _json_default(value: Any) -> Any:
    """Turns tensors and numpy scalars into plain numbers (anything else into its str)."""
    item = getattr(value, "item", None)
    if callable(item):
        try:
            return item()
        except (TypeError, ValueError, RuntimeError):
            pass
    tolist = getattr(value, "tolist", None)
    if callable(tolist):
        return tolist()
    return str(value)


def _plain_value(value: Any) -> Any:
    return json.loads(json.dumps(value, default=_json_default))


class MetricsLogger:
    """Appends one JSON line per ``log`` call to ``run_dir/metrics.jsonl`` and mirrors numbers to wandb/TensorBoard.

    Without ``resume`` the file is started afresh; with it, lines are appended and the caller
    drops what was logged after the checkpoint it resumes from with ``truncate_after(step)``.
    Non-finite floats are written as Python's json writes them (``NaN``, ``Infinity``) so a
    diverged loss stays visible. ``metrics_file`` names the JSON-lines file (``eval`` and
    ``filter`` use their own name: ``metrics.jsonl`` marks a training run's directory).
    """

    def __init__(self, run_dir: str | Path, wandb_project: str | None = None, tensorboard: bool = False,
                 config: dict[str, Any] | None = None, resume: bool = False, metrics_file: str = METRICS_FILE):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / metrics_file
        # Optional backends are imported first so that a missing package fails before any file is touched.
        summary_writer_cls = _import_summary_writer() if tensorboard else None
        wandb = _import_wandb() if wandb_project else None
        self._file = open(self.path, "a" if resume else "w", encoding="utf-8")
        self._tensorboard_cls = summary_writer_cls
        self._tensorboard = None
        self._tensorboard_purge_step: int | None = None
        self._wandb = None
        if wandb is not None:
            self._wandb = self._start_wandb(wandb, wandb_project, config, resume)

    def _start_wandb(self, wandb: Any, project: str, config: dict[str, Any] | None, resume: bool) -> Any:
        # The run id is kept in the run directory so that --resume continues the same wandb run.
        id_file = self.run_dir / WANDB_RUN_ID_FILE
        run_id = id_file.read_text().strip() if resume and id_file.exists() else None
        run = wandb.init(project=project, config=_plain_value(config or {}), dir=str(self.run_dir),
                         id=run_id, resume="allow" if run_id else None)
        id_file.write_text(run.id + "\n")
        # Train and eval points are logged at their own step counters, so each gets its own x-axis.
        wandb.define_metric("train_step")
        wandb.define_metric("train/*", step_metric="train_step")
        wandb.define_metric("eval_step")
        wandb.define_metric("eval/*", step_metric="eval_step")
        return run

    def log(self, kind: str, step: int | None = None, **values: Any) -> dict[str, Any]:
        """Returns the record written: ``{"kind": kind, "step": step, **values}`` as one flushed JSON line."""
        record: dict[str, Any] = {"kind": kind}
        if step is not None:
            record["step"] = int(step)
        record.update(_plain_value(values))
        self._file.write(json.dumps(record, default=_json_default) + "\n")
        self._file.flush()
        numbers = {key: value for key, value in record.items()
                   if key not in ("kind", "step") and isinstance(value, Number) and not isinstance(value, bool)}
        if self._wandb is not None:
            self._log_wandb(kind, step, numbers, record)
        if self._tensorboard_cls is not None:
            self._log_tensorboard(kind, step, numbers, record)
        return record

    def _log_wandb(self, kind: str, step: int | None, numbers: dict[str, Any], record: dict[str, Any]) -> None:
        if kind in ("train", "eval") and step is not None:
            self._wandb.log({**{f"{kind}/{key}": value for key, value in numbers.items()}, f"{kind}_step": step})
        elif kind == "event":
            self._wandb.summary[f"event/step-{step}"] = record.get("message", "")
        else:
            for key, value in numbers.items():
                self._wandb.summary[f"{kind}/{key}"] = value

    def _log_tensorboard(self, kind: str, step: int | None, numbers: dict[str, Any], record: dict[str, Any]) -> None:
        if self._tensorboard is None:
            # Created at the first line so that a truncate_after() before it can purge the old events.
            self._tensorboard = self._tensorboard_cls(log_dir=str(self.run_dir / "tensorboard"),
                                                      purge_step=self._tensorboard_purge_step)
        if kind == "event":
            self._tensorboard.add_text("events", str(record.get("message", "")), global_step=step)
            return
        for key, value in numbers.items():
            if isinstance(value, float) and not math.isfinite(value):
                continue
            self._tensorboard.add_scalar(f"{kind}/{key}", value, global_step=step)
        self._tensorboard.flush()

    def truncate_after(self, step: int) -> int:
        """Returns how many lines were dropped: those of ``metrics.jsonl`` whose step is beyond ``step``.

        A resumed run calls this with its checkpoint's step so that the steps it redoes are not
        logged twice. Lines without a step (``data``) and lines that are not JSON are kept, except
        an unterminated last line (a write cut short by a crash), which is dropped.
        """
        self._file.flush()
        # Bytes, not text: a line damaged into invalid UTF-8 is kept as it was, not a reason to stop the resume.
        data = self.path.read_bytes()
        lines = data.splitlines(keepends=True)
        if lines and not lines[-1].endswith(b"\n"):
            lines.pop()
        kept = []
        for line in lines:
            try:
                record = json.loads(line.decode("utf-8", errors="replace"))
                line_step = record.get("step") if isinstance(record, dict) else None
                beyond = isinstance(line_step, Number) and not isinstance(line_step, bool) and line_step > step
            except (ValueError, RecursionError):  # not JSON, too deep, a number past int()'s limit: kept
                beyond = False
            if not beyond:
                kept.append(line)
        dropped = len(data.splitlines()) - len(kept)
        self._file.close()
        temporary = self.path.with_name(self.path.name + ".tmp")
        try:
            temporary.write_bytes(b"".join(kept))
            os.replace(temporary, self.path)
        finally:  # a full disk: the old file stays whole, and no half temporary beside it
            temporary.unlink(missing_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")
        # TensorBoard cannot rewrite its files; it hides events from this step on instead.
        self._tensorboard_purge_step = step + 1
        return dropped

    def close(self) -> None:
        """Flushes and closes every destination (safe to call twice)."""
        if not self._file.closed:
            self._file.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


def _import_wandb() -> Any:
    try:
        import wandb  # optional extra
    except ImportError as error:
        raise ImportError("--wandb-project needs the wandb package: pip install 'reasontune[wandb]' "
                          f"(or leave --wandb-project unset); importing it failed with: {error}") from error
    return wandb


def _import_summary_writer() -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter  # optional extra
    except ImportError as error:
        raise ImportError("--tensorboard needs the tensorboard package: pip install 'reasontune[tensorboard]' "
                          f"(or pass --no-tensorboard); importing it failed with: {error}") from error
    return SummaryWriter


class Progress:
    """A progress display over steps (or prompts) showing done/total, loss, throughput and ETA.

    On a terminal it is a tqdm bar; when the stream is not a terminal (a batch job's log) it
    prints a plain line ``<description> step 12/100 (12%) loss=… ETA 3m20s`` at most every
    ``plain_every_s`` seconds and at the end, so a log never goes quiet for long. ``enabled``
    false silences both.
    """

    def __init__(self, total_steps: int | None, initial_step: int = 0, enabled: bool = True,
                 description: str = "train", stream: Any = None, unit: str = "step", plain_every_s: float = 30.0,
                 leave: bool = True, show_rate: bool = True):
        self.stream = sys.stderr if stream is None else stream
        is_terminal = bool(getattr(self.stream, "isatty", lambda: False)())
        self.enabled = enabled and is_terminal
        self.plain = enabled and not is_terminal
        self.total, self.description, self.unit, self.plain_every_s = total_steps, description, unit, plain_every_s
        self.show_rate = show_rate  # False where the shown values carry the rate that means something
        # tqdm computes the rate, hence the ETA, from steps done since `initial`, so a resumed run's ETA is right.
        self._bar = tqdm(total=total_steps, initial=initial_step, desc=description, unit=unit,
                         file=self.stream, dynamic_ncols=True, disable=not self.enabled, leave=leave)
        self.step = initial_step
        self._initial = initial_step
        self._started = self._last_plain = time.monotonic()
        self._postfix: dict[str, str] = {}

    def update(self, step: int, loss: float | None = None, tokens_per_s: float | None = None,
               token_loss: float | None = None, **shown: Any) -> None:
        """Moves the display to ``step`` and shows the latest loss (the optimised scalar), per-token loss, throughput and ``shown``."""
        if step > self.step:
            self._bar.update(step - self.step)
            self.step = step
        postfix = {}
        if loss is not None:
            postfix["loss"] = f"{loss:.4g}"
        if token_loss is not None:
            postfix["nll/token"] = f"{token_loss:.4g}"
        if tokens_per_s is not None:
            postfix["tok/s"] = f"{tokens_per_s:,.0f}"
        postfix.update({key: (f"{value:.4g}" if isinstance(value, float) else str(value)) for key, value in shown.items()})
        if postfix:
            self._postfix = postfix
            self._bar.set_postfix(postfix, refresh=False)
        now = time.monotonic()
        at_end = self.total is not None and step >= self.total and now - self._started >= self.plain_every_s / 6
        if self.plain and (now - self._last_plain >= self.plain_every_s or at_end):
            self._print_plain()

    def plain_line(self) -> str:
        """Returns the plain progress line: description, done/total, percent, the shown values, rate and ETA."""
        elapsed = time.monotonic() - self._started
        done = self.step - self._initial
        rate = done / elapsed if elapsed > 0 else 0.0
        parts = [f"{self.description} {self.unit} {self.step}" + (f"/{self.total}" if self.total else "")]
        if self.total:
            parts[0] += f" ({100 * self.step / self.total:.0f}%)"
        parts += [f"{key}={value}" for key, value in self._postfix.items()]
        if self.show_rate:
            parts.append(f"{rate:.3g} {self.unit}s/s")
        if self.total and rate > 0:
            parts.append(f"ETA {_duration((self.total - self.step) / rate)}")
        return " ".join(parts)

    def _print_plain(self) -> None:
        self._last_plain = time.monotonic()
        print(self.plain_line(), file=self.stream, flush=True)

    def write(self, message: str) -> None:
        """Prints a line above the bar (or plainly when the bar is off)."""
        if self.enabled:
            self._bar.write(message)
        else:
            print(message, file=sys.stderr)

    def close(self) -> None:
        self._bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


def _duration(seconds: float) -> str:
    """Returns ``seconds`` as ``1h02m``, ``3m20s`` or ``42s``."""
    seconds = round(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Heartbeat:
    """Prints ``<description>: <elapsed> …`` every ``every_s`` seconds while a long step that reports no counts runs.

    For steps such as reading and dequantising a model file: a line each time (never a
    carriage-return bar), so a batch job's log shows the work is alive, and one closing line
    with the total time. ``status()`` (when given) adds what is known so far to each line.
    """

    def __init__(self, description: str, every_s: float = 10.0, stream: Any = None, status: Any = None):
        self.description, self.every_s, self.status = description, every_s, status
        self.stream = sys.stderr if stream is None else stream
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True)
        self._started = time.monotonic()

    def _line(self, suffix: str = "") -> str:
        known = self.status() if self.status is not None else ""
        return f"{self.description}: {_duration(time.monotonic() - self._started)}{' ' + known if known else ''}{suffix}"

    def _beat(self) -> None:
        while not self._done.wait(self.every_s):
            print(self._line(" …"), file=self.stream, flush=True)

    def __enter__(self) -> Heartbeat:
        print(f"{self.description} …", file=self.stream, flush=True)
        self._started = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, exc_type: Any, *exc_info: Any) -> None:
        self._done.set()
        self._thread.join()
        if exc_type is None:
            print(self._line(", done"), file=self.stream, flush=True)
