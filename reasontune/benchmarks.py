"""The math benchmark suite: a registry of hub datasets, their fields and references, loaded from the hub or local files.

Each ``BenchmarkSpec`` names the Hugging Face dataset (id, config, split) that reasoning papers
evaluate on, the field holding the question, the field holding the reference answer and how
the reference is read from it, and the field with the dataset's own question id. The same
rows can be read from local files in the dataset's real schema (``--benchmark-dir``), since
the hub is not always reachable. Every benchmark is graded the same way: the standard prompt
``STANDARD_PROMPT`` (Qwen2.5-Math's and DeepSeek-R1's evaluation instruction) and the
``question_only`` reward (last ``\\boxed{}`` of the response).

No torch here (like ``data``).
"""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from reasontune.data import (
    DataError,
    Example,
    ExampleSet,
    GroundTruth,
    read_json_records,
    _read_with_datasets,
    split_gsm8k_solution,
)

# DeepSeek-R1's usage recommendation for math problems; Qwen2.5-Math's evaluation ("qwen25-math-cot") gives the
# same sentence as its system prompt. Papers on R1-Zero-style training use this or their own training template.
STANDARD_PROMPT = "{question}\nPlease reason step by step, and put your final answer within \\boxed{}."
STANDARD_REWARD = "question_only"
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")


def _text_reference(value: Any, where: str, field: str) -> GroundTruth:
    """Returns a reference given as a string, or as a number (``27.0`` → ``"27"``)."""
    if isinstance(value, bool) or value is None:
        raise DataError(f"{where}: field {field!r} must be a string or number, got {type(value).__name__}")
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            raise DataError(f"{where}: field {field!r} is {value}, not a finite number")
        return str(int(value)) if float(value).is_integer() else repr(float(value))
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: field {field!r} must be a non-empty string or number, got {value!r}")
    return value.strip()


def _gsm8k_reference(value: Any, where: str, field: str) -> GroundTruth:
    """Returns the number after GSM8K's ``#### `` (thousands separators removed)."""
    split = split_gsm8k_solution(value) if isinstance(value, str) else None
    if split is None or not split[1]:
        raise DataError(f"{where}: field {field!r} must be a GSM8K solution ending in '#### <number>'")
    return split[1]


def _olympiad_reference(value: Any, where: str, field: str) -> GroundTruth:
    """Returns OlympiadBench's ``final_answer`` list as one answer, ``$...$`` removed; several join with ", "."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, str) for v in value):
        raise DataError(f"{where}: field {field!r} must be a non-empty list of strings (OlympiadBench final_answer)")
    parts = [v.strip().removeprefix("$").removesuffix("$").strip() for v in value]
    if not all(parts):
        raise DataError(f"{where}: field {field!r} holds an empty answer")
    # Several parts are one multi-part answer (is_multiple_answer), which the grader compares as a list.
    return ", ".join(parts)


@dataclass(frozen=True)
class BenchmarkSpec:
    """Returns nothing; where one benchmark lives and how its rows become ``Example``s.

    ``question_fields`` are tried in order (the hub dataset's own field first); ``reference``
    turns the ``answer_field`` value into the ground truth; ``id_field`` is the dataset's own
    question id (None: the row number is the id).
    """

    name: str
    title: str
    hub_id: str
    hub_config: str | None
    split: str
    question_fields: tuple[str, ...]
    answer_field: str
    id_field: str | None
    reference: Callable[[Any, str, str], GroundTruth]
    solution_field: str | None = None


# Hub ids, configs, splits and fields as published on the Hugging Face hub (dataset cards' dataset_info):
BENCHMARKS: dict[str, BenchmarkSpec] = {spec.name: spec for spec in (
    # huggingface.co/datasets/HuggingFaceH4/MATH-500: split test (500); problem, solution, answer, subject, level, unique_id.
    BenchmarkSpec("math500", "MATH-500", "HuggingFaceH4/MATH-500", None, "test", ("problem",), "answer",
                  "unique_id", _text_reference, "solution"),
    # huggingface.co/datasets/openai/gsm8k: config main, split test (1,319); question, answer ("... #### 72").
    BenchmarkSpec("gsm8k", "GSM8K", "openai/gsm8k", "main", "test", ("question",), "answer", None,
                  _gsm8k_reference, "answer"),
    # huggingface.co/datasets/HuggingFaceH4/aime_2024: split train (30, AIME 2024 I and II); id, problem, solution, answer, url, year.
    BenchmarkSpec("aime24", "AIME 2024", "HuggingFaceH4/aime_2024", None, "train", ("problem",), "answer", "id",
                  _text_reference, "solution"),
    # huggingface.co/datasets/math-ai/aime25: split test (30, AIME 2025 I and II); problem, answer, id.
    BenchmarkSpec("aime25", "AIME 2025", "math-ai/aime25", None, "test", ("problem",), "answer", "id",
                  _text_reference),
    # huggingface.co/datasets/math-ai/amc23: split test (40); question, answer (a number), id, url.
    # Mirrors of the same 40 problems (e.g. FlippyDora/amc23) carry "problem" as well: accepted second.
    BenchmarkSpec("amc23", "AMC 2023", "math-ai/amc23", None, "test", ("question", "problem"), "answer", "id",
                  _text_reference),
    # huggingface.co/datasets/math-ai/minervamath: split test (272, Minerva's OCW problems); question, answer.
    BenchmarkSpec("minerva", "Minerva Math", "math-ai/minervamath", None, "test", ("question",), "answer", None,
                  _text_reference),
    # huggingface.co/datasets/Hothan/OlympiadBench (He et al., 2024, arXiv:2402.14008): config OE_TO_maths_en_COMP
    # (open-ended, text-only, English maths competitions; 675), split train; id, question, solution (list),
    # final_answer (list of "$...$" strings), is_multiple_answer, unit, answer_type.
    BenchmarkSpec("olympiadbench", "OlympiadBench", "Hothan/OlympiadBench", "OE_TO_maths_en_COMP", "train",
                  ("question",), "final_answer", "id", _olympiad_reference),
)}


def resolve_benchmarks(names: str | Sequence[str]) -> list[str]:
    """Returns the benchmark names of ``"math500,gsm8k"`` (or a list), ``all`` standing for every one; unknown names raise."""
    requested = [n.strip() for n in names.split(",")] if isinstance(names, str) else [n.strip() for n in names]
    requested = [n for n in requested if n]
    if "all" in requested:
        return list(BENCHMARKS)
    unknown = [n for n in requested if n not in BENCHMARKS]
    if unknown or not requested:
        raise ValueError(f"unknown benchmark(s) {', '.join(unknown) or '(none given)'}; "
                         f"choose from {', '.join(BENCHMARKS)} or all")
    return list(dict.fromkeys(requested))


def example_from_row(spec: BenchmarkSpec, row: Any, source: str, line: int) -> tuple[Example, str]:
    """Returns (``Example``, question id) of one row of ``spec``'s dataset; a bad row raises ``DataError`` naming source:line and the field.

    The question id is ``"<benchmark>:<the dataset's id>"``, or ``"<benchmark>:<split>:<row>"``
    for datasets without one (GSM8K, Minerva), so it is the same for the hub and a local copy.
    """
    where = f"{source}:{line}"
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object (a {spec.title} row), got {type(row).__name__}")
    field = next((f for f in spec.question_fields if row.get(f) is not None), None)
    if field is None or not isinstance(row[field], str) or not row[field].strip():
        raise DataError(f"{where}: field {spec.question_fields[0]!r} missing or not a non-empty string "
                        f"({spec.title} rows hold the question there); keys present: {sorted(row)}")
    if row.get(spec.answer_field) is None:
        raise DataError(f"{where}: field {spec.answer_field!r} missing ({spec.title}'s reference answer); "
                        f"keys present: {sorted(row)}")
    ground_truth = spec.reference(row[spec.answer_field], where, spec.answer_field)
    solution = row.get(spec.solution_field) if spec.solution_field else None
    if spec.id_field is not None:
        if row.get(spec.id_field) is None:
            raise DataError(f"{where}: field {spec.id_field!r} missing ({spec.title}'s question id)")
        question_id = f"{spec.name}:{row[spec.id_field]}"
    else:
        question_id = f"{spec.name}:{spec.split}:{line}"
    example = Example(question=row[field], ground_truth=ground_truth,
                      solution=solution if isinstance(solution, str) else None, source=source, line=line, raw=row)
    return example, question_id


def local_file(spec: BenchmarkSpec, benchmark_dir: str | Path) -> Path:
    """Returns the local data file of ``spec`` under ``benchmark_dir``.

    Looked up, in order: ``<dir>/<name>.{jsonl,json,parquet}``, ``<dir>/<name>/<split>.{...}``, and
    the only data file in ``<dir>/<name>/`` (``<dir>/<name>/<config>.json`` for OlympiadBench's own
    release). Raises ``FileNotFoundError`` listing what was tried.
    """
    root = Path(benchmark_dir)
    folder = root / spec.name
    candidates = [root / f"{spec.name}{suffix}" for suffix in LOCAL_SUFFIXES]
    candidates += [folder / f"{stem}{suffix}" for stem in (spec.split, spec.hub_config) if stem
                   for suffix in LOCAL_SUFFIXES]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    files = sorted(p for p in folder.glob("*") if p.suffix in LOCAL_SUFFIXES) if folder.is_dir() else []
    if len(files) == 1:
        return files[0]
    tried = ", ".join(str(c) for c in candidates)
    found = f"; {folder} holds several data files: {', '.join(f.name for f in files)}" if len(files) > 1 else ""
    raise FileNotFoundError(f"no local {spec.title} file for benchmark {spec.name!r}: tried {tried}{found}")


def _rows(source: Path | str, spec: BenchmarkSpec, local: bool) -> Iterator[tuple[int, Any, str | None]]:
    if local and Path(source).suffix in (".jsonl", ".json"):
        return read_json_records(Path(source))
    if local:
        return _read_with_datasets(str(source), None, None)
    return _read_with_datasets(spec.hub_id, spec.split, spec.hub_config)


@dataclass
class BenchmarkData:
    """Returns nothing; one benchmark's examples and their question ids (same order)."""

    spec: BenchmarkSpec
    examples: ExampleSet
    question_ids: list[str]


def load_benchmark(name: str, benchmark_dir: str | Path | None = None, max_examples: int | None = None,
                   seed: int = 0) -> BenchmarkData:
    """Returns the examples of benchmark ``name`` from ``benchmark_dir`` (local files) or else from the hub.

    Every row must be well formed: a bad one raises ``DataError`` naming file, line and field
    (a benchmark with silently dropped questions is not the benchmark). ``max_examples`` keeps
    a seeded subset in dataset order (for smoke runs; the table then says how many).
    """
    spec = BENCHMARKS[resolve_benchmarks([name])[0]]
    local = benchmark_dir is not None
    source = str(local_file(spec, benchmark_dir)) if local else spec.hub_id
    examples: list[Example] = []
    ids: list[str] = []
    total = 0
    for line, row, error in _rows(source, spec, local):
        total += 1
        if error is not None:
            raise DataError(f"{source}:{line}: {error}")
        example, question_id = example_from_row(spec, row, source, line)
        examples.append(example)
        ids.append(question_id)
    duplicates = sorted(i for i, count in Counter(ids).items() if count > 1)
    if duplicates:
        raise DataError(f"{source}: question ids repeat ({', '.join(duplicates[:3])}); field {spec.id_field!r} must be unique")
    valid = len(examples)
    if max_examples is not None and max_examples < valid:
        chosen = sorted(random.Random(seed).sample(range(valid), max_examples))
        examples, ids = [examples[i] for i in chosen], [ids[i] for i in chosen]
    return BenchmarkData(spec, ExampleSet(examples, total_records=total, source=source, valid_records=valid), ids)


def load_benchmarks(names: str | Iterable[str], benchmark_dir: str | Path | None = None,
                    max_examples: int | None = None, seed: int = 0) -> dict[str, BenchmarkData]:
    """Returns ``{name: BenchmarkData}`` for ``"math500,gsm8k"``, a list of names or ``"all"``, in the order given."""
    names = resolve_benchmarks(names if isinstance(names, str) else list(names))
    return {name: load_benchmark(name, benchmark_dir, max_examples, seed) for name in names}
