"""Reading math datasets into one ``Example`` type; prompt templates; subsets, splits; filtering by reward.

Accepted inputs (design.md "Data"), detected per record:

- ``{"prompt", "response"}`` (SFT) and ``{"prompt", "ground_truth"}`` (eval, RL);
- ``{"question", "answer"}`` where ``answer`` is the reference answer, or GSM8K's worked
  solution ending in ``#### N`` (then ``N`` is the reference and the solution is kept);
- MATH: ``{"problem", "solution"}`` (reference = last ``\\boxed{}`` of the solution) or with ``answer``;
- chat ``{"messages": [{"role", "content"}, ...]}``: prompt = the user turn, response = the
  assistant turn, reference = the user turn's ``info.reference_answer`` (seed 001's build_text_pairs);
- a ``reference`` / ``reference_answer`` key is accepted as the reference in every format.

Files: ``.jsonl`` (and ``.json`` holding either JSON lines or one array) are read here so that
errors name the line; ``.parquet``, ``.arrow`` and ``.csv`` go through Hugging Face ``datasets``
(rows are numbered from 1); anything that is not a local path is tried as a hub dataset name.
A malformed record raises ``DataError("path:line: field 'answer' missing ...")``, or with
``skip_bad=True`` is skipped and counted by reason in ``ExampleSet.skipped``.

No torch here: this module is imported by the ``filter`` command and by data tooling.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from reasontune.rewards import extract_boxed_answer

GroundTruth = str | list[str]

_LOCAL_SUFFIXES = {".jsonl", ".json", ".parquet", ".arrow", ".csv"}
_MAX_SKIP_EXAMPLES = 5  # how many skipped lines are kept verbatim for the report


class DataError(ValueError):
    """A malformed data file or record; the message names file, line and field."""


@dataclass(frozen=True)
class Example:
    """One math example, whatever file format it came from.

    ``question`` is the bare problem text that a template wraps; ``prompt`` is set only when
    the data fixes the exact prompt text (SFT ``prompt`` fields, chat user turns), in which case
    it is used verbatim. ``response`` is an SFT target or a response to grade; ``solution`` is a
    reference worked solution (GSM8K, MATH) that ``r1_zero_sft_target`` can turn into a
    response. ``ground_truth`` is the reference answer (a string, or a list of acceptable
    strings). ``source`` and ``line`` (1-based line or row) say where it came from; ``raw`` is
    the record as read (kept so ``filter`` writes records back unchanged).
    """

    question: str
    prompt: str | None = None
    response: str | None = None
    ground_truth: GroundTruth | None = None
    solution: str | None = None
    source: str = ""
    line: int = 0
    raw: dict[str, Any] | None = field(default=None, repr=False, compare=False)


@dataclass
class ExampleSet(Sequence[Example]):
    """Returns nothing; holds loaded examples plus what was skipped and why (never a silent drop).

    ``skipped`` maps a reason (``"field 'answer' missing"``, ``"invalid JSON"`` ...) to a count;
    ``skipped_lines`` keeps the first few ``"path:line: message"`` strings for the report;
    ``total_records`` counts every record read, kept or not.
    """

    examples: list[Example]
    skipped: dict[str, int] = field(default_factory=dict)
    skipped_lines: list[str] = field(default_factory=list)
    total_records: int = 0
    source: str = ""
    valid_records: int = 0  # well-formed records before a max_examples subset was drawn

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index):  # type: ignore[override]
        return self.examples[index]

    def __iter__(self) -> Iterator[Example]:
        return iter(self.examples)

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    def report(self) -> str:
        """Returns a one-paragraph account: records read, kept, skipped by reason."""
        text = f"{self.source}: {self.total_records} records read"
        if self.skipped:
            reasons = ", ".join(f"{count} {reason}" for reason, count in sorted(self.skipped.items()))
            text += f", {self.n_skipped} malformed skipped ({reasons})"
        if self.valid_records != len(self.examples):
            text += f", {len(self.examples)} of {self.valid_records} drawn (max_examples)"
        else:
            text += f", {len(self.examples)} examples"
        if self.skipped_lines:
            text += "; first skipped: " + " | ".join(self.skipped_lines)
        return text


# ---------------------------------------------------------------------------------------------
# Record → Example


def _require_str(record: dict, key: str, where: str, what: str) -> str:
    if key not in record or record[key] is None:
        raise DataError(f"{where}: field {key!r} missing ({what}); keys present: {sorted(record)}")
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    return value


def _ground_truth(value: Any, where: str, key: str) -> GroundTruth:
    """Returns the reference as a string or list of strings (numbers are written as text)."""
    if isinstance(value, bool):
        raise DataError(f"{where}: field {key!r} is a boolean; expected a string, number or list")
    if isinstance(value, (int, float)):
        return repr(value) if isinstance(value, float) else str(value)
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in value):
        return [v if isinstance(v, str) else str(v) for v in value]
    raise DataError(f"{where}: field {key!r} must be a string, number or non-empty list of them, "
                    f"got {type(value).__name__}")


def split_gsm8k_solution(solution: str) -> tuple[str, str] | None:
    """Returns (reasoning, final answer) of a GSM8K solution ``... #### N``, or None without ``####``.

    The reasoning loses GSM8K's ``<<48/2=24>>`` calculator annotations; the answer is the text
    after the last ``####`` with thousands separators removed (``1,000`` → ``1000``).
    """
    if "####" not in solution:
        return None
    reasoning, _, answer = solution.rpartition("####")
    reasoning = re.sub(r"<<[^<>]*>>", "", reasoning).strip()
    answer = answer.strip().replace(",", "")
    return reasoning, answer


def _boxed_answer(solution: str) -> str | None:
    return extract_boxed_answer(solution)  # the rewards package is the one place that parses \boxed{}


def _reference_key(record: dict) -> str | None:
    for key in ("ground_truth", "reference_answer", "reference"):
        if record.get(key) is not None:
            return key
    return None


def example_from_record(record: Any, source: str = "", line: int = 0) -> Example:
    """Returns the ``Example`` for one decoded record (a dict in any accepted format).

    Raises ``DataError`` naming ``source:line`` and the missing or ill-typed field.
    """
    where = f"{source}:{line}"
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    ref_key = _reference_key(record)
    ground_truth = _ground_truth(record[ref_key], where, ref_key) if ref_key else None

    if "messages" in record:
        return _example_from_messages(record, where, source, line, ground_truth)
    if "prompt" in record:
        prompt = _require_str(record, "prompt", where, "the prompt text")
        response = record.get("response", record.get("completion"))
        if response is not None and not isinstance(response, str):
            raise DataError(f"{where}: field 'response' must be a string, got {type(response).__name__}")
        if response is None and ground_truth is None:
            raise DataError(f"{where}: field 'response' or 'ground_truth' missing; a prompt record needs "
                            f"a response (SFT) or a ground_truth (eval/RL); keys present: {sorted(record)}")
        return Example(question=prompt, prompt=prompt, response=response, ground_truth=ground_truth,
                       source=source, line=line, raw=record)
    if "problem" in record:  # MATH
        problem = _require_str(record, "problem", where, "the MATH problem")
        solution = record.get("solution")
        if solution is not None and not isinstance(solution, str):
            raise DataError(f"{where}: field 'solution' must be a string, got {type(solution).__name__}")
        if ground_truth is None and record.get("answer") is not None:
            ground_truth = _ground_truth(record["answer"], where, "answer")
        if ground_truth is None:
            if solution is None:
                raise DataError(f"{where}: field 'answer' missing and no 'solution' to take a \\boxed{{}} answer from")
            boxed = _boxed_answer(solution)
            if boxed is None:
                raise DataError(f"{where}: field 'solution' has no \\boxed{{}} answer and field 'answer' is missing")
            ground_truth = boxed
        return Example(question=problem, solution=solution, ground_truth=ground_truth, source=source, line=line,
                       raw=record)
    if "question" in record:
        question = _require_str(record, "question", where, "the question text")
        solution = None
        if ground_truth is None:
            if record.get("answer") is None:
                raise DataError(f"{where}: field 'answer' missing (the reference answer, or a GSM8K solution "
                                f"ending in '#### N'); keys present: {sorted(record)}")
            answer = record["answer"]
            split = split_gsm8k_solution(answer) if isinstance(answer, str) else None
            if split is not None:
                solution, ground_truth = answer, split[1]
                if not ground_truth:
                    raise DataError(f"{where}: field 'answer' has nothing after '####'")
            else:
                ground_truth = _ground_truth(answer, where, "answer")
        return Example(question=question, solution=solution, ground_truth=ground_truth, source=source, line=line,
                       raw=record)
    raise DataError(f"{where}: unrecognised record: expected 'prompt', 'question', 'problem' or 'messages'; "
                    f"keys present: {sorted(record)}")


def _example_from_messages(record: dict, where: str, source: str, line: int, ground_truth) -> Example:
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: field 'messages' must be a non-empty list of {{'role', 'content'}}")
    user = assistant = None
    for position, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataError(f"{where}: field 'messages[{position}]' needs 'role' and 'content'")
        if message["role"] == "user" and user is None:
            user = message
        elif message["role"] == "assistant" and assistant is None:
            assistant = message
    if user is None:
        raise DataError(f"{where}: field 'messages' has no turn with role 'user'")
    if not isinstance(user["content"], str):
        raise DataError(f"{where}: field 'messages[user].content' must be a string")
    info = user.get("info")
    if ground_truth is None and isinstance(info, dict) and info.get("reference_answer") is not None:
        ground_truth = _ground_truth(info["reference_answer"], where, "messages[user].info.reference_answer")
    response = assistant["content"] if assistant is not None else None
    if response is not None and not isinstance(response, str):
        raise DataError(f"{where}: field 'messages[assistant].content' must be a string")
    return Example(question=user["content"], prompt=user["content"], response=response, ground_truth=ground_truth,
                   source=source, line=line, raw=record)


# ---------------------------------------------------------------------------------------------
# Files → records


def _reason(message: str) -> str:
    """Returns the part of an error message after ``path:line:`` (the skip reason used as a count key)."""
    reason = message.split(": ", 1)[1] if ": " in message else message
    return reason.split(";")[0].split(" (")[0]


def _read_json_records(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    """Yields (line, record or None, error) for a JSONL file, or for a .json holding one array."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte {raw[error.start]:#04x} at offset {error.start}); "
                        "save the file as UTF-8") from None
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            array = json.loads(text)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}:{error.lineno}: invalid JSON: {error.msg}") from None
        except RecursionError:
            raise DataError(f"{path}:1: invalid JSON: nested too deeply") from None
        except ValueError as error:  # a number past int()'s digit limit
            raise DataError(f"{path}:1: invalid JSON: {' '.join(str(error).split(';')[0].split())}") from None
        if not isinstance(array, list):
            raise DataError(f"{path}:1: expected a JSON array of records or JSON lines")
        for index, record in enumerate(array, start=1):
            yield index, record, None
        return
    for number, raw_line in enumerate(text.splitlines(), start=1):
        if not raw_line.strip():
            continue
        try:
            record = json.loads(raw_line)
        except json.JSONDecodeError as error:
            yield number, None, f"invalid JSON: {error.msg} at column {error.colno}"
        except RecursionError:
            yield number, None, "invalid JSON: nested too deeply"
        except ValueError as error:  # a number past int()'s digit limit
            yield number, None, f"invalid JSON: {str(error).split(';')[0]}"
        else:
            yield number, record, None


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def looks_like_local_file(source: str) -> bool:
    """Returns whether a data source names a local path rather than a hub dataset: it exists, starts like a path, or ends in a file suffix.

    A hub id is ``name`` or ``organisation/name``; ``data/train.tsv`` or ``./x`` is a path, and
    so is any name ending in a letters-only suffix (``.tsv``, ``.txt``); a version suffix such
    as ``NuminaMath-1.5`` is not one.
    """
    path = Path(source).expanduser()
    if path.exists() or source.startswith((".", "/", "~")) or not _HUB_ID.fullmatch(source):
        return True
    return bool(re.fullmatch(r"\.[A-Za-z]+", path.suffix))


def _read_with_datasets(source: str, split: str | None, hub_config: str | None) -> Iterator[tuple[int, Any, None]]:
    import datasets  # lazy: a heavy import (seconds), needed only for Parquet, JSON arrays and hub names

    suffix = Path(source).suffix
    if suffix in _LOCAL_SUFFIXES:
        builder = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv"}[suffix]
        # Quiet: a failure is reported once, below; datasets would log it and draw a bar for a local file first.
        verbosity, bars = datasets.logging.get_verbosity(), datasets.is_progress_bar_enabled()
        datasets.logging.set_verbosity(datasets.logging.CRITICAL)
        datasets.disable_progress_bars()
        try:
            dataset = datasets.load_dataset(builder, data_files=source, split="train")
        except Exception as error:  # noqa: BLE001 - a truncated or mislabelled file: the datasets builders raise many kinds
            while error.__cause__ is not None:  # "an error occurred while generating the dataset": say which
                error = error.__cause__
            first = " ".join(str(error).split())[:200] or type(error).__name__
            raise DataError(f"{source}: cannot be read as {builder} ({first})") from None
        finally:
            datasets.logging.set_verbosity(verbosity)
            if bars:
                datasets.enable_progress_bars()
    else:
        try:
            dataset = datasets.load_dataset(source, hub_config, split=split or "train")
        except Exception as error:  # noqa: BLE001 - offline, unknown name, missing config: say which
            raise DataError(f"{source}: not a local file and could not be loaded as a hub dataset "
                            f"(config={hub_config!r}, split={split or 'train'!r}): {error}") from None
    for index, record in enumerate(dataset, start=1):
        yield index, record, None


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _without_lone_surrogates(value: Any) -> Any:
    """Returns ``value`` itself when no string in it holds a lone surrogate, else a copy with each replaced by U+FFFD.

    JSON may spell half of a UTF-16 pair (``"\\ud83d"``); Python decodes it to a surrogate that
    UTF-8 and every tokenizer refuse, so it would stop the run at the first batch that holds it.
    """
    if isinstance(value, str):
        return _LONE_SURROGATE.sub("\ufffd", value) if _LONE_SURROGATE.search(value) else value
    if isinstance(value, list):
        items = [_without_lone_surrogates(item) for item in value]
        return items if any(a is not b for a, b in zip(items, value)) else value
    if isinstance(value, dict):
        items = {_without_lone_surrogates(key): _without_lone_surrogates(item) for key, item in value.items()}
        changed = any(a is not b for a, b in zip(items, value)) or any(items[k] is not v for k, v in zip(items, value.values()))
        return items if changed else value
    return value


def load_examples(source: str | Path, *, split: str | None = None, hub_config: str | None = None,
                  max_examples: int | None = None, seed: int = 0, skip_bad: bool = False) -> ExampleSet:
    """Returns an ``ExampleSet`` of every record in ``source`` (or a seeded subset of ``max_examples``).

    ``source`` is a local .jsonl/.json/.parquet/.arrow/.csv file or a hub dataset name (then
    ``hub_config`` and ``split`` choose the subset, split defaulting to "train"). A malformed
    record raises ``DataError`` ("path:line: field 'answer' missing ..."), or with
    ``skip_bad=True`` is skipped, counted by reason and reported on stderr. ``max_examples``
    draws a subset with ``random.Random(seed)`` and keeps it in file order.
    """
    source_text = str(source)
    path = Path(source_text)
    if looks_like_local_file(source_text):  # never sent to the hub: a typo would wait on network retries
        if not path.exists():
            raise DataError(f"{path}: no such file")
        if path.is_dir():
            raise DataError(f"{path}: is a directory; give a {'/'.join(sorted(_LOCAL_SUFFIXES))} file")
        if path.suffix not in _LOCAL_SUFFIXES:
            raise DataError(f"{path}: unsupported format {path.suffix or '(no suffix)'}; give a "
                            f"{'/'.join(sorted(_LOCAL_SUFFIXES))} file (a .tsv converts with pandas: "
                            "read_csv(sep='\\t').to_json(orient='records', lines=True))")
    if path.suffix in (".jsonl", ".json"):
        records: Iterable[tuple[int, Any, str | None]] = _read_json_records(path)
    else:
        records = _read_with_datasets(source_text, split, hub_config)

    examples: list[Example] = []
    skipped: Counter[str] = Counter()
    skipped_lines: list[str] = []
    total = 0
    repaired_lines: list[int] = []
    for line, record, error in records:
        total += 1
        try:
            if error is not None:
                raise DataError(f"{source_text}:{line}: {error}")
            repaired = _without_lone_surrogates(record)
            if repaired is not record:
                record = repaired
                repaired_lines.append(line)
            examples.append(example_from_record(record, source_text, line))
        except DataError as problem:
            if not skip_bad:
                raise
            skipped[_reason(str(problem))] += 1
            if len(skipped_lines) < _MAX_SKIP_EXAMPLES:
                skipped_lines.append(str(problem))
    valid = len(examples)
    if max_examples is not None and max_examples < len(examples):
        chosen = sorted(random.Random(seed).sample(range(len(examples)), max_examples))
        examples = [examples[i] for i in chosen]
    result = ExampleSet(examples, dict(skipped), skipped_lines, total, source_text, valid)
    if repaired_lines:
        print(f"warning: {source_text}: {len(repaired_lines)} record(s) held a lone surrogate (half of a UTF-16 "
              f"pair, such as \\ud83d; lines {', '.join(map(str, repaired_lines[:5]))}"
              f"{' …' if len(repaired_lines) > 5 else ''}), replaced by U+FFFD: no tokenizer can encode it",
              file=sys.stderr)
    if skipped:
        print(f"warning: {result.report()}", file=sys.stderr)
    return result


def train_validation_split(examples: Sequence[Example], validation_size: int | float, seed: int = 0
                           ) -> tuple[list[Example], list[Example]]:
    """Returns (train, validation): a seeded disjoint split, each kept in the original order.

    ``validation_size`` is a count (int ≥ 1) or a fraction in (0, 1).
    """
    total = len(examples)
    if isinstance(validation_size, float):
        if not 0.0 < validation_size < 1.0:
            raise ValueError(f"validation_size as a fraction must be in (0, 1), got {validation_size}")
        count = max(1, round(total * validation_size))
    else:
        count = validation_size
    if not 0 < count < total:
        raise ValueError(f"validation_size {validation_size} leaves no train or no validation examples of {total}")
    chosen = set(random.Random(seed).sample(range(total), count))
    train = [e for i, e in enumerate(examples) if i not in chosen]
    validation = [e for i, e in enumerate(examples) if i in chosen]
    return train, validation


# ---------------------------------------------------------------------------------------------
# Templates and SFT targets

SHIPPED_TEMPLATES = ("r1_zero", "question_only")


def load_template(name_or_path: str | Path) -> str:
    """Returns the template text of a shipped name (``r1_zero``, ``question_only``) or a file with ``{question}``.

    One trailing newline of a file is dropped (editors add it; R1-Zero prompts end in ``<think>``).
    """
    name = str(name_or_path)
    if name in SHIPPED_TEMPLATES:
        text = resources.files("reasontune").joinpath("templates", f"{name}.prompt").read_text(encoding="utf-8")
        where = f"template {name}"
    else:
        path = Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"prompt template {name!r} is neither a shipped template "
                                    f"({', '.join(SHIPPED_TEMPLATES)}) nor an existing file")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            raise DataError(f"{path}: not UTF-8 text (byte offset {error.start}); save the template as UTF-8") from None
        where = str(path)
    text = text[:-1] if text.endswith("\n") else text
    if "{question}" not in text:
        raise DataError(f"{where}: a prompt template must contain the placeholder {{question}}")
    return text


def format_prompt(template: str, question: str) -> str:
    """Returns ``template`` with ``{question}`` replaced (plain replacement: other braces, e.g. LaTeX, stay)."""
    return template.replace("{question}", question)


def example_prompt(example: Example, template: str) -> str:
    """Returns the prompt of ``example``: its fixed ``prompt`` when the data gave one, else the template applied."""
    return example.prompt if example.prompt is not None else format_prompt(template, example.question)


def with_chat_template(examples: Sequence[Example], tokenizer: Any, mode: str = "auto") -> list[Example]:
    """Returns ``examples`` with each chat record's prompt (``messages``) rendered by the tokenizer's chat template.

    ``mode`` ``auto`` renders when the tokenizer has a chat template, ``none`` never (the user
    turn's text is the prompt, as read). The rendered prompt holds the turns before the first
    assistant turn (system and user) and the generation prompt, so a response follows it
    directly; other examples are returned unchanged.
    """
    if mode == "none" or not getattr(tokenizer, "chat_template", None):
        return list(examples)
    rendered = []
    for example in examples:
        messages = example.raw.get("messages") if isinstance(example.raw, dict) else None
        if not isinstance(messages, list):
            rendered.append(example)
            continue
        turns = []
        for message in messages:
            if message.get("role") == "assistant":
                break
            turns.append({"role": message["role"], "content": message["content"]})
        prompt = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
        rendered.append(dataclasses.replace(example, prompt=prompt))
    return rendered


def r1_zero_target(reasoning: str, answer: str) -> str:
    """Returns the R1-Zero SFT target ``" {reasoning} </think> <answer>{answer}</answer>"``.

    It continues a prompt ending in ``<think>``, hence the leading space.
    """
    return f" {reasoning.strip()} </think> <answer>{answer.strip()}</answer>"


def gsm8k_to_r1_zero(solution: str) -> str:
    """Returns the R1-Zero target of a GSM8K solution: annotations dropped, ``#### N`` moved into ``<answer>``."""
    split = split_gsm8k_solution(solution)
    if split is None:
        raise DataError("GSM8K solution has no '#### N' final-answer line")
    return r1_zero_target(*split)


def math_to_r1_zero(solution: str, answer: str | None = None) -> str:
    """Returns the R1-Zero target of a MATH solution; the answer is ``answer`` or the solution's last ``\\boxed{}``."""
    if answer is None:
        answer = _boxed_answer(solution)
        if answer is None:
            raise DataError("MATH solution has no \\boxed{} answer and no answer was given")
    return r1_zero_target(solution, answer)


def with_r1_zero_targets(examples: Iterable[Example]) -> list[Example]:
    """Returns the examples with ``response`` set to the R1-Zero target built from their ``solution``.

    Examples that already have a response keep it; one with neither raises ``DataError``.
    """
    converted = []
    for example in examples:
        if example.response is not None:
            converted.append(example)
            continue
        if example.solution is None or example.ground_truth is None:
            raise DataError(f"{example.source}:{example.line}: field 'solution' missing; cannot build an SFT target")
        split = split_gsm8k_solution(example.solution)
        reasoning = split[0] if split is not None else example.solution
        answer = example.ground_truth if isinstance(example.ground_truth, str) else example.ground_truth[0]
        converted.append(dataclasses.replace(example, response=r1_zero_target(reasoning, answer)))
    return converted
