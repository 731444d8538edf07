"""The ``reasontune`` command: turns flags and config files into calls of the entry points.

Each subcommand names the module that holds its config dataclass and its entry function;
modules are imported only when their subcommand runs, so ``reasontune --help`` is instant.

A user's mistake (``UserError``, ``DataError``, a ``SystemExit("error: …")``) ends as
``error: <flag or file:line:field>: <what to do>`` lines and exit status 2, without a
traceback (``--debug`` shows it); internal errors keep theirs. A start that fails leaves the
output directory as it was; an interrupted training run exits 130 after saving.
"""

from __future__ import annotations

import argparse
import difflib
import errno
import importlib
import os
import re
import shutil
import signal
import sys
import threading
from pathlib import Path

from reasontune import __version__
from reasontune.config import add_dataclass_arguments, config_from_namespace
from reasontune.process_exit import exit_process
from reasontune.run_layout import START_FILES, has_trained, replaced_run_dir

# name -> (module, config class, entry function, one-line help)
COMMANDS: dict[str, tuple[str, str, str, str]] = {
    "demo": ("reasontune.demos", "DemoConfig", "run_demo",
             "the embedded default: synthetic arithmetic task, tiny model, SFT, eval before/after, report (CPU, no download)"),
    "sft": ("reasontune.training.sft", "SFTConfig", "run_sft",
            "supervised fine-tuning on prompt/response traces, loss on response tokens only"),
    "ei": ("reasontune.training.expert_iteration", "ExpertIterationConfig", "run_expert_iteration",
           "expert iteration: sample, grade, keep the correct responses, SFT on them, repeat"),
    "grpo": ("reasontune.training.grpo", "GRPOConfig", "run_grpo",
             "GRPO with verified rewards: rollouts, group-normalised advantages, policy-gradient steps"),
    "eval": ("reasontune.evaluation", "EvalConfig", "run_eval",
             "generate answers for a dataset, grade them, write records.jsonl and summary.json"),
    "filter": ("reasontune.filtering", "FilterConfig", "run_filter",
               "keep SFT examples whose response earns answer reward 1 against the reference"),
    "compare": ("reasontune.compare", "CompareConfig", "run_compare",
                "side-by-side table of runs or evaluations over their shared benchmarks, with paired p-values and a plot"),
    "report": ("reasontune.report", "ReportConfig", "run_report",
               "plots and a summary page for a run directory"),
    "models": ("reasontune.models", "ModelsConfig", "run_models",
               "write a model directory for --model: a known model (models get NAME), a GGUF file converted (--gguf), "
               "a tiny random one (models tiny), or list the known ones"),
}


# Commands that run data-parallel under torchrun (the others must not run once per rank).
DATA_PARALLEL_COMMANDS = ("sft", "ei", "grpo", "eval")


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose mistakes are one ``error: reasontune CMD: …`` line (``--help`` shows the usage)."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message}; {self.prog} --help lists every option\n")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """Returns the top-level parser; only ``command``'s module is imported to add its flags."""
    parser = OneLineParser(prog="reasontune", allow_abbrev=False,
                           description="Teach language models to reason on math with verified rewards.")
    parser.add_argument("--version", action="version", version=f"reasontune {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    for name, (module_name, config_name, _, help_text) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text, allow_abbrev=False)
        if name == command:
            config_cls = getattr(importlib.import_module(module_name), config_name)
            add_dataclass_arguments(sub, config_cls)
            positionals = " ".join(a.metavar or a.dest.upper() for a in sub._actions if not a.option_strings)
            sub.usage = f"%(prog)s [options] {positionals}".rstrip() + "   (grouped options below)"
    return parser


def unknown_arguments_message(parser: argparse.ArgumentParser, command: str, unknown: list[str]) -> str:
    """Returns one ``error:`` line naming the arguments ``command`` does not take, with the closest flag it does take."""
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    flags = sorted(f for a in subparsers.choices[command]._actions for f in a.option_strings if f.startswith("--"))
    named = [token for token in unknown if token.startswith("-")] or unknown
    first = named[0].partition("=")[0]
    close = difflib.get_close_matches(first, flags, n=1, cutoff=0.6) if first.startswith("--") else []
    hint = f"did you mean {close[0]}?" if close else f"reasontune {command} --help lists every option"
    what = "unknown option" if first.startswith("-") else "unexpected argument"
    others = f" (and {', '.join(named[1:])})" if len(named) > 1 else ""
    return f"error: reasontune {command}: {what} {first}{others}; {hint}"


def _quiet_library_progress_bars() -> None:
    """Silences transformers' per-checkpoint "Loading weights"/"Writing model shards" bars; ours show the run."""
    try:
        # Lazy: importing transformers takes seconds, and `reasontune --help` must be instant.
        from transformers.utils import logging as transformers_logging
    except ImportError:
        return
    transformers_logging.disable_progress_bar()


NUMBER = re.compile(r"-(\d+\.?\d*|\.\d+)(e[-+]?\d+)?|-inf|-nan", re.IGNORECASE)


def normalise_argv(argv: list[str]) -> list[str]:
    """Returns ``argv`` with ``--snake_case`` flags spelled ``--kebab-case`` and negative numbers joined to their flag (``--lr=-1e-3``).

    argparse takes ``-1e-3`` for a flag and ``--learning_rate`` (as TRL users type it) for an
    unknown option; both are values and spellings the user meant.
    """
    normalised: list[str] = []
    for token in argv:
        if token == "--":
            normalised.extend(argv[len(normalised):])
            break
        if token.startswith("--"):
            name, equals, value = token.partition("=")
            token = name.replace("_", "-") + equals + value
        elif (NUMBER.fullmatch(token) and normalised and normalised[-1].startswith("--")
              and "=" not in normalised[-1]):
            normalised[-1] = f"{normalised[-1]}={token}"
            continue
        normalised.append(token)
    return normalised


def _run_dir_snapshot(config) -> tuple[Path | None, bool]:
    """Returns (the command's output directory or None, whether it existed before the command)."""
    output = getattr(config, "output_dir", None)
    if not output:
        return None, False
    path = Path(output)
    return path, path.exists()


def _undo_failed_start(path: Path | None, existed: bool) -> None:
    """Puts back a run that ``--overwrite`` had moved aside, or removes a directory this command created when it holds nothing but start files (a failed start leaves no trace)."""
    if path is not None and replaced_run_dir(path, os.getpid()).is_dir():
        from reasontune.training.run_setup import restore_replaced_run  # loaded already: a trainer was running

        restore_replaced_run(path)
        return
    if path is None or existed or not path.is_dir():
        return
    if has_trained(path):
        return  # steps were trained: their metrics are the user's record of the run
    if all(child.name in START_FILES for child in path.iterdir()):
        shutil.rmtree(path)


def user_error_message(error: BaseException, command: str | None = None, config: object = None) -> str | None:
    """Returns the ``error: …`` text of a user's mistake, or None for an internal error (which keeps its traceback).

    Damaged or crafted checkpoint files and a full disk count as the user's to fix; for a
    full disk the message ends with the command that resumes once space is freed.
    """
    from reasontune.data import DataError  # light: no torch

    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        where = error.strerror if type(error).__name__ == "DiskFull" else f"{error.filename or 'a file'}: no space left on the device"
        if command in ("sft", "ei", "grpo") and config is not None:
            from reasontune.config import resume_command

            resume = f"; free space, then resume with: {resume_command(command, config)}"
        else:
            resume = "; free space and run it again"
        return f"error: {where}{resume}"
    if type(error).__name__ == "CheckpointError":  # reasontune.checkpoint imports torch: compared by name
        return f"error: {' '.join(str(error).split())}"
    if isinstance(error, DataError):
        text = " ".join(str(error).split())
        if re.match(r"\S+:\d+: ", text) and "--skip-bad" not in text and "reference answer to grade" not in text:
            text += " (fix the record, or pass --skip-bad to skip malformed records, counted and reported)"
        return text if text.startswith("error: ") else f"error: {text}"
    if isinstance(error, SystemExit) and isinstance(error.code, str) and error.code.startswith("error:"):
        return error.code
    return None


def entry() -> None:
    """The ``reasontune`` console script: runs ``main`` on the process's arguments and ends with its status."""
    exit_process(main())


def main(argv: list[str] | None = None) -> int:
    """Returns the exit status of one ``reasontune`` command line: 0 done, 2 a user error, 130 interrupted."""
    argv = normalise_argv(list(sys.argv[1:] if argv is None else argv))
    debug = "--debug" in argv
    command = next((a for a in argv if not a.startswith("-")), None)
    if command not in COMMANDS:
        command = None
    parser = build_parser(command)
    namespace, unknown = parser.parse_known_args(argv)
    if unknown and namespace.command is not None:
        print(unknown_arguments_message(parser, namespace.command, unknown), file=sys.stderr)
        return 2
    if unknown:
        parser.error(f"unknown arguments {' '.join(unknown)}")
    if namespace.command is None:
        parser.print_help()
        return 2
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and namespace.command not in DATA_PARALLEL_COMMANDS:
        parser.exit(2, f"error: reasontune {namespace.command} does not run under torchrun (each rank would run it "
                       f"whole); run it in one process. Data-parallel: {', '.join(DATA_PARALLEL_COMMANDS)}\n")
    module_name, config_name, function_name, _ = COMMANDS[namespace.command]
    output_dir, existed, config = None, False, None
    # Training arms its own SIGINT/SIGTERM handlers (save, then exit 130); whatever happens, the caller's come back.
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        _quiet_library_progress_bars()
        module = importlib.import_module(module_name)
        config = config_from_namespace(argparse.Namespace(**{k: v for k, v in vars(namespace).items() if k != "command"}),
                                       getattr(module, config_name), environment=True)
        output_dir, existed = _run_dir_snapshot(config)
        result = getattr(module, function_name)(config)
    except KeyboardInterrupt:
        # Outside a training step (loading, evaluation, a second Ctrl-C): nothing to save.
        _undo_failed_start(output_dir, existed)
        print("\ninterrupted", file=sys.stderr)
        return 130
    except (Exception, SystemExit) as error:
        if isinstance(error, SystemExit) and isinstance(error.code, int):
            return error.code  # an interrupted run (130, checkpoint saved) or a finished one (0) said so already
        message = user_error_message(error, namespace.command, config)
        if message is None:
            _undo_failed_start(output_dir, True)  # an internal error: only a replaced run is put back
            raise
        _undo_failed_start(output_dir, existed)
        if debug:
            raise
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank finds the same mistake: one says it
            print(message, file=sys.stderr)
        return 2
    finally:
        if threading.current_thread() is threading.main_thread():
            for signum, handler in handlers.items():
                signal.signal(signum, handler)
    return int(result) if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
