"""What a run directory holds: the name of every file and folder in it, the finders over it, and its one JSONL reader.

A training run (``reasontune sft | ei | grpo``) writes::

    config.json                 the resolved config, with "command" (who wrote it) and, under
                                torchrun, "distributed" (world size, global batch)
    metrics.jsonl               one JSON line per log call: kind train | eval | data | event
    checkpoint-N/               weights, tokenizer, trainer_state.json + .safetensors, sharded/,
                                rng-rank-R.*, reasontune_config.json (a copy of config.json)
    final/                      the same for the last step (a LoRA run: merged weights, adapter/)
    eval/step-NNNNNN/           records.jsonl + summary.json of an in-loop evaluation
                                (a benchmark's under eval/step-NNNNNN/NAME/)
    ei-step-N/rollouts.jsonl    expert iteration: every graded sample of step N
    report/                     index.html, report.md and PNG plots
    tensorboard/, wandb/, wandb_run_id

``reasontune eval`` writes config.json, records.jsonl, summary.json (one directory per
benchmark when there are several, with results.md / results.json beside them) and
eval_metrics.jsonl; ``reasontune compare`` writes comparison.{txt,json,png}.

Everything here reads; nothing writes. The code that writes each file names it with the
constants below, so a reader (report, compare, resume) and a writer cannot drift apart.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterator

from reasontune.json_lines import DataError, read_json_records

# ---------------------------------------------------------------------------------------------
# Names

CONFIG_FILE = "config.json"
# config.json's record of the command that wrote it ("sft", "grpo", "eval" …)
COMMAND_RECORD = "command"
METRICS_FILE = "metrics.jsonl"
FINAL_DIR = "final"
EVAL_DIR = "eval"
REPORT_DIR = "report"
REPORT_PAGE = "index.html"
WANDB_RUN_ID_FILE = "wandb_run_id"
# Inside a checkpoint directory
TRAINER_STATE = "trainer_state.json"
SHARDED_DIR = "sharded"
CHECKPOINT_CONFIG_COPY = "reasontune_config.json"
ADAPTER_DIR = "adapter"
# An evaluation directory (in-loop under eval/step-N/, or reasontune eval's output)
RECORDS_FILE = "records.jsonl"
SUMMARY_FILE = "summary.json"
RESULTS_FILES = ("results.md", "results.json")
EVAL_METRICS_FILE = "eval_metrics.jsonl"
# reasontune compare's output
COMPARISON_FILES = ("comparison.txt", "comparison.json", "comparison.png")

CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)")
EVAL_STEP_NAME = re.compile(r"step-(\d+)")

# What a training run writes into its directory: --overwrite replaces these and nothing else.
RUN_ENTRIES = re.compile(r"config\.json|metrics\.jsonl(\.tmp)?|checkpoint-\d+|final|eval|report|tensorboard|wandb|"
                         r"wandb_run_id|ei-step-\d+|\..+\.(tmp|old)-\d+|\.replaced-\d+")
# The files inside those entries that reasontune writes (paths relative to the run directory). Anything else
# there (a README.md added to final/, notes in eval/) is the user's: --overwrite keeps it.
CHECKPOINT_PATH = r"(checkpoint-\d+|final|\.[^/]+\.(tmp|old)-\d+)(/adapter)?"
RUN_FILES = re.compile("|".join((
    r"config\.json|metrics\.jsonl(\.tmp)?|wandb_run_id",
    r"(.+/)?\.[^/]+\.tmp-\d+",  # a records file's temporary, left by a crash
    CHECKPOINT_PATH + r"/([^/]+\.(safetensors|json|jinja|model)|merges\.txt|vocab\.txt|sharded/[^/]+)",
    r"eval(/[^/]+)*/(records\.jsonl|summary\.json|results\.(md|json)|config\.json|eval_metrics\.jsonl|[^/]+\.png)",
    r"report/[^/]+\.(png|svg|html|md)",
    r"ei-step-\d+/rollouts\.jsonl",
    r"(tensorboard|wandb)/.+",
)))
# Where --overwrite sets the old run aside until the new one has started (``pid``: this process's).
REPLACED_RUN = ".replaced-{pid}"
REPLACED_RUN_NAME = re.compile(r"\.replaced-(\d+)")
# Where --overwrite moves the files of the old run that reasontune did not write.
KEPT_BY_OVERWRITE = "kept-by-overwrite"
# What a start writes before its first step: a fresh directory holding only these is removed when the start fails.
START_FILES = frozenset({CONFIG_FILE, METRICS_FILE, "tensorboard", "wandb", WANDB_RUN_ID_FILE, ".reasontune-demo"})


def checkpoint_name(step: int) -> str:
    """Returns the directory name of the checkpoint after optimizer (or EI/GRPO) step ``step``: ``checkpoint-<step>``."""
    return f"checkpoint-{step}"


def eval_step_name(step: int) -> str:
    """Returns the run-relative directory of step ``step``'s in-loop evaluation, as metrics.jsonl's ``dir`` names it."""
    return f"{EVAL_DIR}/step-{step:06d}"


def eval_step_dir(run_dir: str | Path, step: int) -> Path:
    """Returns the directory of step ``step``'s in-loop evaluation: ``RUN/eval/step-NNNNNN``."""
    return Path(run_dir) / eval_step_name(step)


def ei_rollouts_file(run_dir: str | Path, step: int) -> Path:
    """Returns where expert iteration keeps step ``step``'s graded samples: ``RUN/ei-step-N/rollouts.jsonl``."""
    return Path(run_dir) / f"ei-step-{step}" / "rollouts.jsonl"


def replaced_run_dir(run_dir: str | Path, pid: int) -> Path:
    """Returns where process ``pid``'s ``--overwrite`` set the old run of ``run_dir`` aside."""
    return Path(run_dir) / REPLACED_RUN.format(pid=pid)


# ---------------------------------------------------------------------------------------------
# Finders


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Returns the complete ``checkpoint-N`` directories of a run (those holding trainer state), oldest first, as (N, path)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = []
    for path in run_dir.iterdir():
        match = CHECKPOINT_NAME.fullmatch(path.name)
        if match and path.is_dir() and (path / TRAINER_STATE).exists():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """Returns the newest complete ``checkpoint-N`` of a run, or None."""
    checkpoints = list_checkpoints(run_dir)
    return checkpoints[-1][1] if checkpoints else None


def final_checkpoint(run_dir: str | Path) -> Path | None:
    """Returns the run's ``final/`` when it holds trainer state (a resumable last checkpoint), else None."""
    final = Path(run_dir) / FINAL_DIR
    return final if (final / TRAINER_STATE).exists() else None


def has_trained(run_dir: str | Path) -> bool:
    """Returns whether ``run_dir`` holds a run that trained: a checkpoint, final/ or a ``train`` line in metrics.jsonl."""
    run_dir = Path(run_dir)
    if latest_checkpoint(run_dir) is not None or (run_dir / FINAL_DIR).is_dir():
        return True
    metrics = run_dir / METRICS_FILE
    return metrics.is_file() and '"kind": "train"' in metrics.read_text(encoding="utf-8", errors="replace")


def is_training_run(path: str | Path) -> bool:
    """Returns whether ``path`` is a training run's directory: metrics.jsonl, final/ or a checkpoint-N/ in it."""
    path = Path(path)
    return ((path / METRICS_FILE).exists() or (path / FINAL_DIR).is_dir()
            or any(CHECKPOINT_NAME.fullmatch(child.name) for child in path.glob("checkpoint-*")))


def is_eval_dir(path: str | Path) -> bool:
    """Returns whether ``path`` holds one evaluation (records.jsonl or summary.json), as ``reasontune eval`` and in-loop evaluation write it."""
    path = Path(path)
    return (path / RECORDS_FILE).is_file() or (path / SUMMARY_FILE).is_file()


def is_eval_output(path: str | Path) -> bool:
    """Returns whether ``path`` is an evaluation, or ``reasontune eval``'s output of several (results.json / results.md, or a NAME/summary.json)."""
    path = Path(path)
    if is_eval_dir(path) or any((path / name).is_file() for name in RESULTS_FILES):
        return True
    return path.is_dir() and any(child.is_dir() and (child / SUMMARY_FILE).is_file() for child in path.iterdir())


def is_compare_dir(path: str | Path) -> bool:
    """Returns whether ``path`` holds the output of ``reasontune compare`` (comparison.json)."""
    return (Path(path) / "comparison.json").is_file()


def latest_eval(run_dir: str | Path) -> Path | None:
    """Returns the run's newest in-loop evaluation directory (``eval/final`` where present, else the highest ``eval/step-N``), or None."""
    eval_root = Path(run_dir) / EVAL_DIR
    if not eval_root.is_dir():
        return None
    if (eval_root / FINAL_DIR).is_dir():
        return eval_root / FINAL_DIR
    steps = [(int(match.group(1)), child) for child in eval_root.iterdir()
             if child.is_dir() and (match := EVAL_STEP_NAME.fullmatch(child.name))]
    return max(steps)[1] if steps else None


def eval_summaries(run_dir: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """Returns ``(step, summary)`` of every in-loop evaluation of a run (``eval/step-N/summary.json``), by step; unreadable ones are left out."""
    found = []
    for path in (Path(run_dir) / EVAL_DIR).glob("step-*/" + SUMMARY_FILE):
        match = EVAL_STEP_NAME.fullmatch(path.parent.name)
        try:
            summary = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):
            continue
        if match and isinstance(summary, dict):
            found.append((int(match.group(1)), summary))
    return sorted(found, key=lambda item: item[0])


def find_evaluations(path: str | Path) -> dict[str, Path]:
    """Returns ``{benchmark: directory with records.jsonl}`` of an eval directory, an eval output of several, or a training run (its latest eval/).

    Raises FileNotFoundError naming ``path`` when none is found.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such directory (give a run directory, an eval output directory "
                                f"or an eval directory with {RECORDS_FILE})")
    if (path / RECORDS_FILE).is_file():
        try:
            summary = json.loads((path / SUMMARY_FILE).read_text(encoding="utf-8")) \
                if (path / SUMMARY_FILE).is_file() else {}
        except (ValueError, RecursionError):  # not UTF-8, not JSON, too deep: the benchmark name is then unknown
            summary = {}
        name = summary.get("benchmark") if isinstance(summary, dict) else None
        return {str(name or "eval"): path}
    found = {child.name: child for child in sorted(path.iterdir()) if (child / RECORDS_FILE).is_file()}
    if found:
        return found
    latest = latest_eval(path)
    if latest is not None:
        return find_evaluations(latest)
    raise FileNotFoundError(f"{path}: found no {RECORDS_FILE} in it, in its subdirectories, or in its latest "
                            f"{EVAL_DIR}/ directory")


def recorded_command(config: Any) -> str | None:
    """Returns the command a config.json's contents say wrote it (``"command"``: sft, ei, grpo, eval …), or None when it names none."""
    command = config.get(COMMAND_RECORD) if isinstance(config, dict) else None
    return command if isinstance(command, str) else None


def command_that_wrote(directory: str | Path) -> str | None:
    """Returns the command that wrote ``directory`` as its config.json records it, or None (no config.json, unreadable, or none named)."""
    try:
        config = json.loads((Path(directory) / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return recorded_command(config)


# ---------------------------------------------------------------------------------------------
# Reading JSON lines


def read_jsonl(path: str | Path, strict: bool = True, problems: list[str] | None = None,
               label: str | None = None, most_problems: int = 10) -> list[dict[str, Any]]:
    """Returns the JSON objects of a JSONL file's lines (blank lines skipped), in file order.

    ``strict`` (records that feed numbers: compare, a resume): the first line that is not UTF-8,
    not JSON or not an object raises ``DataError("path:line: …")``. Otherwise (pages that show
    what they can: the report) each such line is skipped and named in ``problems`` as
    ``"<label> line N skipped: …"`` (``label`` defaults to the file name), the first
    ``most_problems`` of them and then a count, so a file of thousands of bad lines does not
    bury the page.
    """
    path = Path(path)
    label = label or path.name
    records, skipped = [], []
    for number, record, error in read_json_records(path, errors="strict" if strict else "replace"):
        if error is None and not isinstance(record, dict):
            error = f"expected a JSON object, got {type(record).__name__}"
        if error is None:
            records.append(record)
        elif strict:
            raise DataError(f"{path}:{number}: {error}")
        else:
            skipped.append(f"{label} line {number} skipped: {error}")
    if problems is not None:
        problems.extend(skipped[:most_problems])
        if len(skipped) > most_problems:
            problems.append(f"{label}: {len(skipped) - most_problems} more lines skipped")
    return records


def iter_metrics(run_dir: str | Path, kind: str | None = None, strict: bool = True) -> Iterator[dict[str, Any]]:
    """Yields the lines of a run's metrics.jsonl (only those of ``kind`` when given: train, eval, data, event)."""
    for record in read_jsonl(Path(run_dir) / METRICS_FILE, strict=strict):
        if kind is None or record.get("kind") == kind:
            yield record
