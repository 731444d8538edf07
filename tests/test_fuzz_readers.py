"""Fuzzing every reader of files a run directory or a user hands in: damaged input gives a clear error, never a traceback.

Real files (a tiny SFT run's config.json, metrics.jsonl, trainer state and in-loop eval records,
and SFT/GSM8K data) are cut short, overwritten byte by byte, wrapped in deep nesting, given
numbers too long to convert, or have fields set to arbitrary JSON values, by hypothesis. Each reader must then succeed or raise the error type the command line prints as
one ``error:`` line (``user_error_message``), within the example deadline, and write nothing
outside the directory it was given.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import build_tiny_model_dir
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from reasontune.cli import main, user_error_message

SFT_RECORDS = [{"prompt": f"What is {i} + 30?", "response": f" {i} + 30 = {i + 30} </think> <answer>{i + 30}</answer>",
                "ground_truth": str(i + 30)} for i in range(6)]
# Bounded: a fixed set of examples (derandomized, so CI sees the same ones), each within the deadline; a failure is
# reported as found (no shrinking: a shrunk 200,000-bracket file would take minutes).
FUZZ = settings(max_examples=60, deadline=5_000, derandomize=True, phases=[Phase.explicit, Phase.generate],
                print_blob=False, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                                         HealthCheck.data_too_large])


@st.composite
def damaged(draw, original: bytes) -> bytes:
    """Returns ``original`` cut short, with bytes overwritten, deep brackets or a 5,000-digit number inserted (one or two of these)."""
    data = bytearray(original)
    for _ in range(draw(st.integers(1, 2))):
        kind = draw(st.sampled_from(["truncate", "bytes", "nest", "digits"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "truncate":
            del data[at:]
        elif kind == "bytes":
            data[at:at + 4] = draw(st.binary(min_size=1, max_size=4))
        elif kind == "digits":  # past Python's 4,300-digit limit on int(): a ValueError that is not a JSONDecodeError
            data[at:at] = b"7" * 5_000
        else:
            depth = draw(st.sampled_from([3, 50, 5_000, 200_000]))
            opener = draw(st.sampled_from([b"[", b'{"a":']))
            data[at:at] = opener * depth + b"1" + (b"]" if opener == b"[" else b"}") * depth
    return bytes(data)


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                     max_size=3), max_leaves=8)


@st.composite
def crafted_fields(draw, original: bytes) -> bytes:
    """Returns the JSON object of ``original`` (or one of its JSON lines) with one or two fields set to arbitrary JSON values."""
    text = original.decode("utf-8")
    try:
        whole = json.loads(text)
        lines = None
    except json.JSONDecodeError:  # JSON lines
        whole, lines = None, text.splitlines()
    index = draw(st.integers(0, len(lines) - 1)) if lines else 0
    record = whole if lines is None else json.loads(lines[index])
    for _ in range(draw(st.integers(1, 2))):
        key = draw(st.sampled_from(sorted(record) + ["command", "__items__", "__tensor__"]))
        record[key] = draw(JSON_VALUES)
    if lines is None:
        return json.dumps(record).encode()
    lines[index] = json.dumps(record)
    return ("\n".join(lines) + "\n").encode()


def mutated(original: bytes) -> st.SearchStrategy[bytes]:
    """Returns damaged bytes or crafted field values of ``original``."""
    return st.one_of(damaged(original), crafted_fields(original))


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    """A 2-step SFT run with a checkpoint and an in-loop evaluation (its records.jsonl), plus its data."""
    root = tmp_path_factory.mktemp("fuzz")
    build_tiny_model_dir(root / "model")
    (root / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in SFT_RECORDS))
    before = Path.cwd()
    os.chdir(root)
    try:
        assert main(["sft", "--model", "model", "--train-data", "sft.jsonl", "--val-data", "sft.jsonl",
                     "--eval-examples", "2", "--eval-max-new-tokens", "4", "--output-dir", "run", "--max-steps", "2",
                     "--save-every", "1", "--batch-size", "2", "--gradient-accumulation-steps", "1",
                     "--max-length", "64", "--num-threads", "1", "--no-progress", "--no-write-report"]) == 0
    finally:
        os.chdir(before)
    assert list((root / "run" / "eval").glob("step-*/records.jsonl"))
    return root


def files_outside(directory: Path) -> set[str]:
    """Returns the names beside ``directory`` (a reader must not write there)."""
    return {p.name for p in directory.parent.iterdir()}


def clear_or_none(call) -> None:
    """Runs ``call``; an exception must be one the command line prints as a clear ``error:`` line."""
    try:
        call()
    except (Exception, SystemExit) as error:  # noqa: BLE001 — the point: which ones escape
        if user_error_message(error) is None:
            raise


@FUZZ
@given(data=st.data())
def test_data_files(real_run, tmp_path_factory, data):
    from reasontune.data import load_examples

    sources = [real_run / "sft.jsonl"]
    gsm8k = Path(os.environ.get("REASONTUNE_GSM8K_DIR", Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k"))
    if (gsm8k / "test.jsonl").is_file():
        sources.append(gsm8k / "test.jsonl")
    source = data.draw(st.sampled_from(sources))
    original = b"".join(source.read_bytes().splitlines(keepends=True)[:8])
    crafted = data.draw(st.booleans())
    suffix = data.draw(st.sampled_from([".jsonl", ".json"]))
    if suffix == ".json" and data.draw(st.booleans()):  # a .json array of the same records
        original = ("[" + ",".join(line.decode() for line in original.splitlines()) + "]").encode()
    folder = tmp_path_factory.mktemp("data")
    path = folder / f"fuzzed{suffix}"
    path.write_bytes(data.draw(crafted_fields(original) if crafted and suffix == ".jsonl" else damaged(original)))
    outside = files_outside(folder)
    clear_or_none(lambda: load_examples(path, skip_bad=data.draw(st.booleans())))
    assert files_outside(folder) == outside


@FUZZ
@given(data=st.data())
def test_config_files(real_run, tmp_path_factory, data):
    from reasontune.config import load_config_file
    from reasontune.training.sft import SFTConfig

    folder = tmp_path_factory.mktemp("config")
    path = folder / data.draw(st.sampled_from(["config.json", "options.yaml"]))
    path.write_bytes(data.draw(mutated((real_run / "run" / "config.json").read_bytes())))
    outside = files_outside(folder)
    clear_or_none(lambda: load_config_file(path, SFTConfig))
    assert files_outside(folder) == outside


@FUZZ
@given(data=st.data())
def test_trainer_state(real_run, tmp_path_factory, data):
    from reasontune.checkpoint import check_trainer_state, checkpoint_problem, load_trainer_state

    folder = tmp_path_factory.mktemp("state") / "checkpoint-1"
    folder.mkdir()
    name = data.draw(st.sampled_from(["trainer_state.json", "trainer_state.safetensors"]))
    for file in ("trainer_state.json", "trainer_state.safetensors"):
        shutil.copy(real_run / "run" / "checkpoint-1" / file, folder / file)
    original = (folder / name).read_bytes()
    (folder / name).write_bytes(data.draw(mutated(original) if name.endswith(".json") else damaged(original)))
    outside = files_outside(folder.parent)

    def read() -> None:
        check_trainer_state(load_trainer_state(folder), str(folder))

    clear_or_none(read)
    assert isinstance(checkpoint_problem(folder), (str, type(None)))
    assert files_outside(folder.parent) == outside


@settings(FUZZ, max_examples=8, deadline=30_000)
@given(data=st.data())
def test_report_reads_damaged_metrics_records_and_summaries(real_run, tmp_path_factory, data, capsys):
    """``reasontune report`` over a run whose metrics.jsonl, eval records or summary is damaged."""
    folder = tmp_path_factory.mktemp("report")
    run = folder / "run"
    shutil.copytree(real_run / "run", run, ignore=shutil.ignore_patterns("checkpoint-*", "final"))
    step = sorted((run / "eval").glob("step-*"))[-1]
    target = data.draw(st.sampled_from([run / "metrics.jsonl", step / "records.jsonl", step / "summary.json",
                                        run / "config.json"]))
    target.write_bytes(data.draw(mutated(target.read_bytes())))
    outside = files_outside(run)
    status = main(["report", str(run)])
    assert status in (0, 2), capsys.readouterr().err
    assert files_outside(run) == outside


@FUZZ
@given(data=st.data())
def test_metrics_kept_across_a_resume(real_run, tmp_path_factory, data):
    """The resume's ``truncate_after`` rewrites a damaged metrics.jsonl without failing, keeping every line it cannot read."""
    from reasontune.tracking import MetricsLogger

    folder = tmp_path_factory.mktemp("metrics")
    damaged_bytes = data.draw(damaged((real_run / "run" / "metrics.jsonl").read_bytes()))
    (folder / "metrics.jsonl").write_bytes(damaged_bytes)
    logger = MetricsLogger(folder, resume=True)
    logger.truncate_after(1)
    logger.close()
    kept = (folder / "metrics.jsonl").read_bytes()
    # lines are only ever dropped whole (a step beyond 1, or a cut-off last line), never rewritten
    assert all(line in damaged_bytes.splitlines() for line in kept.splitlines())


@settings(FUZZ, max_examples=20, deadline=20_000)
@given(data=st.data())
def test_compare_reads_damaged_records(real_run, tmp_path_factory, data, capsys):
    """``reasontune compare`` of an evaluation against a damaged copy of it (records.jsonl or summary.json)."""
    folder = tmp_path_factory.mktemp("compare")
    step = sorted((real_run / "run" / "eval").glob("step-*"))[-1]
    shutil.copytree(step, folder / "a")
    shutil.copytree(step, folder / "b")
    target = folder / "b" / data.draw(st.sampled_from(["records.jsonl", "summary.json"]))
    target.write_bytes(data.draw(mutated(target.read_bytes())))
    status = main(["compare", str(folder / "a"), str(folder / "b"), "--output-dir", str(folder / "out"),
                   "--n-bootstrap", "20"])
    assert status in (0, 2), capsys.readouterr().err
    assert {p.name for p in folder.iterdir()} <= {"a", "b", "out"}


@settings(FUZZ, max_examples=15, deadline=60_000)
@given(data=st.data())
def test_resume_from_a_crafted_trainer_state(real_run, tmp_path_factory, data, capsys):
    """``--resume`` from a checkpoint whose trainer state has crafted fields: it resumes or refuses in one line."""
    folder = tmp_path_factory.mktemp("resume")
    run = folder / "run"
    shutil.copytree(real_run / "run", run, ignore=shutil.ignore_patterns("final"))
    state = run / "checkpoint-1" / "trainer_state.json"
    state.write_bytes(data.draw(crafted_fields(state.read_bytes())))
    before = Path.cwd()
    os.chdir(real_run)  # the run's config names model/ and sft.jsonl relative to it
    try:
        status = main(["sft", "--resume", "--output-dir", str(run)])
    finally:
        os.chdir(before)
    err = capsys.readouterr().err
    assert status in (0, 2), err
    assert status == 0 or (err.count("error: ") == 1 and "Traceback" not in err), err
    assert {p.name for p in folder.iterdir()} == {"run"}
