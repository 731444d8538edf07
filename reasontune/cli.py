"""The ``reasontune`` command: turns flags and config files into calls of the entry points.

Each subcommand names the module that holds its config dataclass and its entry function;
modules are imported only when their subcommand runs, so ``reasontune --help`` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from reasontune.config import add_dataclass_arguments, config_from_namespace

# name -> (module, config class, entry function, one-line help)
COMMANDS: dict[str, tuple[str, str, str, str]] = {
    "demo": ("reasontune.demo", "DemoConfig", "run_demo",
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
                "side-by-side table of runs or evaluations over their shared benchmarks, with paired bootstrap p-values and a plot"),
    "report": ("reasontune.report", "ReportConfig", "run_report",
               "plots and a summary page for a run directory"),
}


# Commands that run data-parallel under torchrun (the others must not run once per rank).
DATA_PARALLEL_COMMANDS = ("sft", "ei", "grpo", "eval")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """Returns the top-level parser; only ``command``'s module is imported to add its flags."""
    parser = argparse.ArgumentParser(prog="reasontune", description="Teach language models to reason on math with verified rewards.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, config_name, _, help_text) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text,
                                    )
        if name == command:
            config_cls = getattr(importlib.import_module(module_name), config_name)
            add_dataclass_arguments(sub, config_cls)
    return parser


def _quiet_library_progress_bars() -> None:
    """Silences transformers' per-checkpoint "Loading weights"/"Writing model shards" bars; ours show the run."""
    try:
        # Lazy: importing transformers takes seconds, and `reasontune --help` must be instant.
        from transformers.utils import logging as transformers_logging
    except ImportError:
        return
    transformers_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    if command not in COMMANDS:
        command = None
    parser = build_parser(command)
    namespace = parser.parse_args(argv)
    if namespace.command is None:
        parser.print_help()
        return 2
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and namespace.command not in DATA_PARALLEL_COMMANDS:
        parser.exit(2, f"error: reasontune {namespace.command} does not run under torchrun (each rank would run it "
                       f"whole); run it in one process. Data-parallel: {', '.join(DATA_PARALLEL_COMMANDS)}\n")
    module_name, config_name, function_name, _ = COMMANDS[namespace.command]
    _quiet_library_progress_bars()
    module = importlib.import_module(module_name)
    config = config_from_namespace(argparse.Namespace(**{k: v for k, v in vars(namespace).items() if k != "command"}),
                                   getattr(module, config_name))
    result = getattr(module, function_name)(config)
    return int(result) if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
