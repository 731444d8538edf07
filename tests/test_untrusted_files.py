"""What a run directory, a checkpoint or a data file hands back is untrusted: refused in one line, never run, never lost.

Every case goes through the real command line (``reasontune.cli.main``) on a real tiny SFT run
with sharded checkpoints (``checkpoint-1``, ``checkpoint-2``), copied per test and then damaged
or crafted the way an attacker or a full disk would. A crafted file must end in one ``error:``
line with exit 2, and the marker file its payload would write must never appear.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_model_dir

from reasontune import checkpoint
from reasontune.cli import main

SFT_RECORDS = [{"prompt": f"What is {i} + 30?", "response": f" {i} + 30 = {i + 30} </think> <answer>{i + 30}</answer>",
                "ground_truth": str(i + 30)} for i in range(8)]
TINY = ["--batch-size", "2", "--gradient-accumulation-steps", "1", "--max-length", "64", "--num-threads", "1",
        "--no-progress", "--no-write-report", "--eval-examples", "0"]
SFT = ["sft", "--model", "model", "--train-data", "sft.jsonl", *TINY]


class WritesMarker:
    """Unpickles into a call that writes ``marker``: proof that a file ran code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran"))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """model/, sft.jsonl and base/ (3 SFT steps: checkpoint-1, checkpoint-2, sharded; final/ removed, so it resumes)."""
    root = tmp_path_factory.mktemp("untrusted")
    build_tiny_model_dir(root / "model")
    (root / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in SFT_RECORDS))
    before = Path.cwd()
    os.chdir(root)
    try:
        assert main([*SFT, "--output-dir", "base", "--max-steps", "3", "--save-every", "1"]) == 0
    finally:
        os.chdir(before)
    shutil.rmtree(root / "base" / "final")
    assert (root / "base" / "checkpoint-2" / "sharded" / ".metadata").is_file()
    return root


@pytest.fixture
def run(workspace, monkeypatch, tmp_path):
    """Returns a fresh copy of base/ as ``run`` inside the workspace (the working directory)."""
    monkeypatch.chdir(workspace)
    target = workspace / f"run-{tmp_path.name}"
    shutil.copytree(workspace / "base", target)
    yield target
    shutil.rmtree(target, ignore_errors=True)


def refused(argv: list[str], capsys) -> str:
    """Returns the one stderr line of a command that must exit 2 without a traceback."""
    capsys.readouterr()
    status = main(argv)
    err = capsys.readouterr().err
    assert status == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def resume(run: Path) -> list[str]:
    return ["sft", "--resume", "--output-dir", run.name]


# ---------------------------------------------------------------------------------------------
# Pickles in a checkpoint never run


def test_the_hole_is_real_torchs_own_reader_runs_a_crafted_metadata_pickle(tmp_path):
    """The control: the same crafted .metadata through torch's FileSystemReader does run (so the tests below can fail)."""
    import torch.distributed.checkpoint as dcp

    marker = tmp_path / "marker"
    (tmp_path / "sharded").mkdir()
    (tmp_path / "sharded" / ".metadata").write_bytes(pickle.dumps(WritesMarker(marker)))
    with warnings.catch_warnings(), pytest.raises(BaseException):  # noqa: B017, PT011 — whatever follows the payload
        warnings.simplefilter("ignore")
        dcp.load({"x": torch.zeros(1)}, checkpoint_id=str(tmp_path / "sharded"), no_dist=True)
    assert marker.exists()


def test_a_crafted_sharded_metadata_is_refused_on_resume_and_runs_nothing(run, capsys):
    marker = run.parent / f"{run.name}-marker"
    (run / "checkpoint-2" / "sharded" / ".metadata").write_bytes(pickle.dumps(WritesMarker(marker)))
    err = refused(resume(run), capsys)
    assert not marker.exists()
    assert "checkpoint-2/sharded/.metadata: not DCP metadata" in err and "refused global pathlib.Path.write_text" in err
    # the newest intact checkpoint and the exact command that resumes from it
    assert f"The newest intact checkpoint is {run.name}/checkpoint-1" in err
    assert (f"mv {run.name}/checkpoint-2 {run.name}/damaged-checkpoint-2 && reasontune sft --resume --output-dir "
            f"{run.name}") in err
    os.rename(run / "checkpoint-2", run / "damaged-checkpoint-2")  # the command it printed, then resume works
    assert main(resume(run)) == 0 and (run / "final").is_dir()


def test_load_sharded_itself_refuses_the_crafted_metadata(run):
    marker = run.parent / f"{run.name}-marker"
    (run / "checkpoint-1" / "sharded" / ".metadata").write_bytes(pickle.dumps(WritesMarker(marker)))
    model = torch.nn.Linear(2, 2)
    with pytest.raises(checkpoint.CheckpointError, match="refused global"):
        checkpoint.load_sharded(run / "checkpoint-1", model, torch.optim.AdamW(model.parameters()))
    assert not marker.exists()


def test_a_crafted_value_inside_the_shards_is_refused_by_the_weights_only_planner(tmp_path):
    """A non-tensor value (as optimizer hyperparameters are stored) that unpickles into code: torch's planner runs it, ours does not."""
    import torch.distributed.checkpoint as dcp

    marker = tmp_path / "marker"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"weight": torch.ones(2), "lr": WritesMarker(marker)}, checkpoint_id=str(tmp_path / "s"), no_dist=True)
        assert not marker.exists()
        dcp.load({"weight": torch.zeros(2), "lr": None}, checkpoint_id=str(tmp_path / "s"), no_dist=True)
        assert marker.exists()  # the control: torch's default planner unpickles it with weights_only=False
        marker.unlink()
        reader, planner = checkpoint._safe_dcp_reader_and_planner(tmp_path / "s")
        with pytest.raises(BaseException, match="weights-only loader"):  # noqa: PT011 — DCP wraps it per rank
            dcp.load({"weight": torch.zeros(2), "lr": None}, storage_reader=reader, planner=planner, no_dist=True)
    assert not marker.exists()


def test_a_legacy_pickle_trainer_state_is_refused_without_being_opened(run, capsys):
    marker = run.parent / f"{run.name}-marker"
    for name in ("checkpoint-1", "checkpoint-2"):
        (run / name / "trainer_state.json").unlink()
        torch.save({"step": 2, "payload": WritesMarker(marker)}, run / name / checkpoint.LEGACY_TRAINER_STATE)
    # Without trainer_state.json neither is a checkpoint: resume starts afresh, and never opens the pickle.
    assert checkpoint.latest_checkpoint(run) is None
    with pytest.raises(checkpoint.CheckpointError, match="arbitrary code"):
        checkpoint.load_trainer_state(run / "checkpoint-2")
    assert not marker.exists()


def test_a_pickled_weights_file_slipped_into_a_checkpoint_is_refused(run, capsys):
    """transformers would fall back to a pytorch_model.bin; a reasontune checkpoint never holds one."""
    marker = run.parent / f"{run.name}-marker"
    (run / "checkpoint-2" / "model.safetensors").unlink()
    torch.save({"payload": WritesMarker(marker)}, run / "checkpoint-2" / "pytorch_model.bin")
    err = refused(resume(run), capsys)
    assert "checkpoint-2/pytorch_model.bin: a pickle-format file" in err and "checkpoint-1" in err
    assert not marker.exists()


CRAFTED_TRAINER_STATES = {
    "step is a string": ({"step": "2"}, "field 'step' must be a whole number"),
    "no rng": ({"rng": None}, "field 'rng' must hold the python, numpy and torch generator states"),
    "rng of the wrong shape": ({"rng": {"python": 5, "numpy": [1], "torch": 3}}, "field 'rng' is not a generator state"),
    "an object dtype": ({"rng": {"__ndarray__": "/rng/numpy/1", "dtype": "object"}}, "only numeric arrays"),
    "a key that cannot be a key": ({"optimizer": {"__items__": [[[1], 2]]}}, "malformed trainer state"),
    "a missing tensor": ({"rng": {"__tensor__": "nowhere"}}, "names a tensor that its .safetensors file lacks"),
    # load_state_dict would set these as the scheduler's attributes, to crash steps later
    "a scheduler field of the wrong type": ({"scheduler": {"base_lrs": "x", "last_epoch": 2, "_step_count": 3,
                                                           "_is_initial": False, "_get_lr_called_within_step": False,
                                                           "_last_lr": [1e-5], "lr_lambdas": [None]}},
                                            "scheduler.base_lrs: expected a list of 1"),
    "an unknown scheduler field": ({"scheduler": {"optimizer": None}}, "the optimizer or schedule state does not fit"),
}


@pytest.mark.parametrize("case", sorted(CRAFTED_TRAINER_STATES))
def test_crafted_trainer_state_fields_end_in_one_line(case, run, capsys):
    fields, expected = CRAFTED_TRAINER_STATES[case]
    path = run / "checkpoint-2" / "trainer_state.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))
    err = refused(resume(run), capsys)
    assert expected in err and "checkpoint-2/trainer_state.json" in err and "checkpoint-1" in err


def test_trainer_state_nested_too_deeply_for_the_parser(run, capsys):
    (run / "checkpoint-2" / "trainer_state.json").write_text("[" * 100_000 + "]" * 100_000)
    assert "not a trainer state" in refused(resume(run), capsys)


@pytest.mark.parametrize("target", ["trainer_state.safetensors", "model.safetensors", "tokenizer.json",
                                    "sharded/__0_0.distcp", "sharded/.metadata", "trainer_state.json"])
def test_a_truncated_checkpoint_file_names_the_newest_intact_checkpoint(target, run, capsys):
    path = run / "checkpoint-2" / target
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    err = refused(resume(run), capsys)
    assert f"checkpoint-2/{target}" in err and f"The newest intact checkpoint is {run.name}/checkpoint-1" in err


def test_a_corrupt_shard_of_the_right_length_is_refused_when_loaded(run, capsys):
    path = run / "checkpoint-2" / "sharded" / "__0_0.distcp"
    data = path.read_bytes()
    path.write_bytes(data[:64] + b"\x00" * (len(data) - 64))  # sizes intact: only loading can tell
    err = refused(resume(run), capsys)
    assert "checkpoint-2/sharded" in err and "truncated or corrupt" in err


def test_a_truncated_model_given_as_model_is_one_line(run, capsys):
    weights = run / "checkpoint-2" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    err = refused(["eval", "--model", f"{run.name}/checkpoint-2", "--data", "sft.jsonl", "--output-dir", "ev-cut"],
                  capsys)
    assert f"--model {run.name}/checkpoint-2: {run.name}/checkpoint-2/model.safetensors: truncated or corrupt" in err


def test_no_intact_checkpoint_left(run, capsys):
    for name in ("checkpoint-1", "checkpoint-2"):
        (run / name / "trainer_state.json").write_text("{")
    assert "no intact checkpoint is left" in refused(resume(run), capsys)


# ---------------------------------------------------------------------------------------------
# A full disk


def test_a_full_disk_keeps_the_last_good_checkpoint_and_leaves_no_temporary(run, capsys, monkeypatch):
    import safetensors.torch

    real_save_file = safetensors.torch.save_file
    calls = {"n": 0}

    def fills_the_disk(tensors, filename, metadata=None):
        calls["n"] += 1
        if "checkpoint-3" in str(filename):  # the first file of the next checkpoint: half written, then ENOSPC
            Path(filename).write_bytes(b"\x00" * 100)
            raise OSError(errno.ENOSPC, "No space left on device", str(filename))
        return real_save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", fills_the_disk)
    before = sorted(p.name for p in run.iterdir())
    err = refused([*resume(run), "--max-steps", "4", "--save-every", "1"], capsys)
    assert "no space left on the device" in err and f"{run.name}/checkpoint-2 is kept" in err
    assert f"free space, then resume with: reasontune sft --resume --output-dir {run.name}" in err
    assert sorted(p.name for p in run.iterdir()) == before  # no .checkpoint-3.tmp-*, nothing half written
    assert checkpoint.checkpoint_problem(run / "checkpoint-2") is None
    monkeypatch.setattr(safetensors.torch, "save_file", real_save_file)
    assert main([*resume(run), "--max-steps", "4", "--save-every", "1"]) == 0


def test_a_full_disk_while_logging_says_so_with_the_resume_command(run, capsys, monkeypatch):
    from reasontune.tracking import MetricsLogger

    real_log = MetricsLogger.log

    def fills_the_disk(self, kind, step=None, **values):
        if kind == "train":
            raise OSError(errno.ENOSPC, "No space left on device", str(self.path))
        return real_log(self, kind, step, **values)

    monkeypatch.setattr(MetricsLogger, "log", fills_the_disk)
    err = refused([*resume(run), "--max-steps", "4"], capsys)
    assert err == (f"error: {run.name}/metrics.jsonl: no space left on the device; free space, then resume with: "
                   f"reasontune sft --resume --output-dir {run.name}\n")


# ---------------------------------------------------------------------------------------------
# A run directory is data, not code


def test_a_run_config_naming_a_reward_module_is_not_imported_on_resume(run, capsys, monkeypatch):
    marker = run.parent / f"{run.name}-marker"
    (run / "planted_reward.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
                                           "def grade(response, ground_truth):\n    return {}\n")
    monkeypatch.chdir(run)  # the attack: a user resumes from inside the directory
    config = json.loads((run / "config.json").read_text())
    config.update(reward="planted_reward:grade", prompt_template="evil.txt")
    (run / "config.json").write_text(json.dumps(config))
    (run / "evil.txt").write_text("{question}")
    capsys.readouterr()
    assert main(["sft", "--resume", "--output-dir", "."]) == 2
    err = capsys.readouterr().err
    assert err == ("error: config.json sets --reward planted_reward:grade, --prompt-template evil.txt: a run "
                   "directory is data, not code, and these would be imported, contacted or read on its say-so; "
                   "repeat them on the command line, or pass --trust-run-config if you wrote this run\n")
    assert not marker.exists()
    # Confirmed with --trust-run-config, the module is still not imported from the working directory.
    assert main(["sft", "--resume", "--output-dir", ".", "--trust-run-config"]) == 2
    assert "cannot import module 'planted_reward'" in capsys.readouterr().err and not marker.exists()


def test_the_working_directory_is_not_searched_for_reward_modules(tmp_path, monkeypatch):
    from reasontune.rollouts import reward_fn_by_name

    monkeypatch.chdir(tmp_path)
    (tmp_path / "cwd_reward.py").write_text("def grade(response, ground_truth):\n    return {}\n")
    with pytest.raises(ImportError, match="the working directory is not searched"):
        reward_fn_by_name("cwd_reward:grade")
    monkeypatch.syspath_prepend(str(tmp_path))  # PYTHONPATH, explicitly
    assert reward_fn_by_name("cwd_reward:grade")("x", "y") == {}


def test_python_dash_m_does_not_import_from_the_working_directory(tmp_path):
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    (tmp_path / "probe.py").write_text("import pathlib\npathlib.Path('marker').write_text('ran')\n"
                                       "def grade(response, ground_truth):\n    return {}\n")
    (tmp_path / "sft.jsonl").write_text(json.dumps(SFT_RECORDS[0]) + "\n")
    done = subprocess.run([sys.executable, "-m", "reasontune", "filter", "--data", "sft.jsonl", "--out", "kept.jsonl",
                           "--reward", "probe:grade"], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(repo)},
                          text=True, capture_output=True, timeout=300)
    assert done.returncode == 2 and "cannot import module 'probe'" in done.stderr, done.stderr
    assert not (tmp_path / "marker").exists()


# ---------------------------------------------------------------------------------------------
# --overwrite that cannot lose a run


def test_a_failed_overwrite_puts_the_old_run_back_untouched(run, workspace, capsys):
    (run / "eval").mkdir(exist_ok=True)
    (run / "eval" / "my-notes.md").write_text("mine")
    before = {str(p.relative_to(run)): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    (workspace / "latin1.jsonl").write_bytes(json.dumps(SFT_RECORDS[0]).encode()[:-2] + b' caf\xe9"}\n')
    err = refused(["sft", "--model", "model", "--train-data", "latin1.jsonl", *TINY, "--output-dir", run.name,
                   "--overwrite"], capsys)
    assert "latin1.jsonl:1: not UTF-8 text (byte 0xe9" in err
    assert {str(p.relative_to(run)): p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_a_successful_overwrite_keeps_the_users_own_files(run, capsys):
    (run / "eval").mkdir(exist_ok=True)
    (run / "eval" / "my-notes.md").write_text("mine")
    (run / "checkpoint-1" / "README.md").write_text("model card")
    assert main([*SFT, "--output-dir", run.name, "--overwrite", "--max-steps", "2", "--save-every", "1"]) == 0
    assert (f"kept 2 file(s) reasontune did not write in {run.name}/kept-by-overwrite: checkpoint-1/README.md, "
            "eval/my-notes.md") in capsys.readouterr().err
    # where the new run's checkpoint-1 (saved, replaced, pruned by reasontune) cannot reach them
    kept = run / "kept-by-overwrite"
    assert (kept / "eval" / "my-notes.md").read_text() == "mine"
    assert (kept / "checkpoint-1" / "README.md").read_text() == "model card"
    assert not (run / "checkpoint-2").exists() and (run / "checkpoint-1").is_dir() and (run / "final").is_dir()
    assert sorted(p.name for p in kept.rglob("*") if p.is_file()) == ["README.md", "my-notes.md"]
    assert not any(p.name.startswith(".replaced-") for p in run.iterdir())
    assert "holds files a reasontune run did not write (kept-by-overwrite)" in refused(
        [*SFT, "--output-dir", run.name, "--overwrite"], capsys)


# ---------------------------------------------------------------------------------------------
# One clear line for every file mistake


def test_non_utf8_data_leaves_no_output_directory(workspace, monkeypatch, capsys):
    monkeypatch.chdir(workspace)
    (workspace / "latin1.jsonl").write_bytes(b'{"prompt": "caf\xe9", "response": "x"}\n')
    err = refused(["sft", "--model", "model", "--train-data", "latin1.jsonl", *TINY, "--output-dir", "fresh"], capsys)
    assert "latin1.jsonl:1: not UTF-8 text" in err and not (workspace / "fresh").exists()


def test_a_config_that_is_a_directory_or_not_utf8(workspace, monkeypatch, capsys):
    monkeypatch.chdir(workspace)
    assert "--config model: is a directory" in refused([*SFT, "--config", "model", "--output-dir", "x"], capsys)
    (workspace / "latin1.yaml").write_bytes(b"seed: 1 # caf\xe9\n")
    assert "--config latin1.yaml: not UTF-8 text" in refused([*SFT, "--config", "latin1.yaml", "--output-dir", "x"],
                                                              capsys)
    assert not (workspace / "x").exists()


@pytest.mark.parametrize("name", ["train.tsv", "data/missing.tsv", "notes.txt"])
def test_a_local_path_is_never_sent_to_the_hub(name, workspace, monkeypatch, capsys):
    import datasets

    monkeypatch.chdir(workspace)
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("sent to the hub"))
    if name != "data/missing.tsv":
        (workspace / name).write_text("prompt\tresponse\n2+2\t4\n")
    err = refused(["sft", "--model", "model", "--train-data", name, *TINY, "--output-dir", "x"], capsys)
    assert (f"--train-data {name}: no such file" if "missing" in name else
            f"--train-data {name}: unsupported format {Path(name).suffix}") in err
    from reasontune.data import DataError, load_examples

    with pytest.raises(DataError, match="no such file" if "missing" in name else "unsupported format"):
        load_examples(name)


def test_a_lone_surrogate_in_dataset_text_is_replaced_and_counted(tmp_path, capsys):
    """``"\\ud83d"`` in JSON decodes to half an emoji, which no tokenizer encodes: U+FFFD instead, and a warning names the line."""
    from reasontune.data import load_examples

    (tmp_path / "half.jsonl").write_text('{"prompt": "ok", "response": "fine"}\n'
                                         '{"prompt": "smile \\ud83d", "response": "ok \\udc00 \\ud83d\\ude00"}\n')
    examples = load_examples(tmp_path / "half.jsonl").examples
    assert (examples[1].prompt, examples[1].response) == ("smile \ufffd", "ok \ufffd \U0001f600")  # a real pair stays
    assert examples[1].raw["prompt"] == "smile \ufffd"
    assert "1 record(s) held a lone surrogate" in capsys.readouterr().err


def test_the_records_writer_escapes_a_lone_surrogate_rather_than_crashing(tmp_path):
    from reasontune.rollouts import write_jsonl

    path = write_jsonl([{"response": "half \ud83d", "ground_truth": "x\udc80"}], tmp_path / "records.jsonl")
    text = path.read_bytes().decode("utf-8")  # valid UTF-8
    assert text == '{"response": "half \\ud83d", "ground_truth": "x\\udc80"}\n'
    assert json.loads(text) == {"response": "half \ud83d", "ground_truth": "x\udc80"}  # reads back the same


def test_eval_and_report_run_on_a_question_holding_a_lone_surrogate(workspace, monkeypatch, capsys):
    monkeypatch.chdir(workspace)
    (workspace / "half.jsonl").write_text('{"question": "What is 2 + 2? \\ud83d", "answer": "4"}\n')
    assert main(["eval", "--model", "model", "--data", "half.jsonl", "--output-dir", "ev-half",
                 "--eval-max-new-tokens", "3", "--grading-workers", "0"]) == 0, capsys.readouterr().err
    text = (workspace / "ev-half" / "records.jsonl").read_bytes().decode("utf-8")
    assert "2 + 2? \ufffd\nAssistant:" in json.loads(text.splitlines()[0])["prompt"]
    assert main(["report", "ev-half"]) == 0


def test_unreadable_tabular_files_are_one_line(workspace, monkeypatch, capsys):
    monkeypatch.chdir(workspace)
    (workspace / "latin1.csv").write_bytes(b"prompt,response\ncaf\xe9,x\n")
    (workspace / "cut.parquet").write_bytes(b"PAR1" + b"\x00" * 40)
    for name, expected in (("latin1.csv", "cannot be read as csv ('utf-8' codec can't decode byte 0xe9"),
                           ("cut.parquet", "cannot be read as parquet")):
        err = refused(["sft", "--model", "model", "--train-data", name, *TINY, "--output-dir", "x"], capsys)
        assert f"{name}: {expected}" in err and not (workspace / "x").exists()


# ---------------------------------------------------------------------------------------------
# Resuming the wrong directory says so


def test_resume_errors_name_the_problem(run, workspace, capsys, monkeypatch):
    monkeypatch.chdir(workspace)
    assert refused(["sft", "--resume", "--output-dir", "nowhere"], capsys) == (
        "error: --resume --output-dir nowhere: nowhere does not exist; check the path, or drop --resume to start a "
        "new run there\n")
    (workspace / "empty-dir").mkdir(exist_ok=True)
    assert "empty-dir holds no config.json, so it is not a run directory" in refused(
        ["sft", "--resume", "--output-dir", "empty-dir"], capsys)
    assert refused(["grpo", "--resume", "--output-dir", run.name], capsys) == (
        f"error: {run.name} was written by `sft`, not `grpo`; continue it with: reasontune sft --resume "
        f"--output-dir {run.name}\n")
    # A run written before config.json recorded its command: judged by its options.
    config = json.loads((run / "config.json").read_text())
    assert config.pop("command") == "sft"
    (run / "config.json").write_text(json.dumps(config))
    assert f"{run.name} was written by `sft`, not `grpo`" in refused(["grpo", "--resume", "--output-dir", run.name],
                                                                     capsys)
    assert main(["sft", "--resume", "--output-dir", run.name]) == 0  # and its own command still resumes it
    evaluation = workspace / "ev"
    evaluation.mkdir(exist_ok=True)
    (evaluation / "config.json").write_text(json.dumps({"model": "model", "data": "sft.jsonl", "output_dir": "ev"}))
    assert "ev is an eval directory (written by `reasontune eval`), not a `sft` run" in refused(
        ["sft", "--resume", "--output-dir", "ev"], capsys)


def test_overwrite_deletes_exactly_the_files_reasontune_writes(tmp_path, capsys):
    """The file rules on a hand-made old run: what reasontune writes goes, every other file is kept and listed."""
    from reasontune.training.common import discard_replaced_run, prepare_run_dir, restore_replaced_run

    run = tmp_path / "run"
    ours = ["config.json", "metrics.jsonl", "checkpoint-3/model.safetensors", "checkpoint-3/tokenizer.json",
            "checkpoint-3/merges.txt", "checkpoint-3/sharded/.metadata", "checkpoint-3/sharded/__0_0.distcp",
            "final/adapter/adapter_model.safetensors", "eval/step-000003/records.jsonl",
            "eval/step-000003/gsm8k/summary.json", "eval/step-000003/.records.jsonl.tmp-77", "report/index.html",
            "report/loss.png", "ei-step-2/rollouts.jsonl", "tensorboard/events.out.tfevents.1", "wandb_run_id"]
    theirs = ["checkpoint-3/README.md", "checkpoint-3/notes.txt", "eval/analysis.ipynb", "report/extra.csv",
              "ei-step-2/my.jsonl"]
    for name in ours + theirs:
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text(f"'{name}'")
    (run / "checkpoint-3" / "metrics.jsonl").write_text('{"kind": "train", "step": 3}\n')  # started: --overwrite needed
    (run / "metrics.jsonl").write_text('{"kind": "train", "step": 3}\n')
    # peft's model card beside an adapter is reasontune's (peft writes it on every save); a user's README is not
    (run / "checkpoint-4").mkdir()
    (run / "checkpoint-4" / "adapter_config.json").write_text("{}")
    (run / "checkpoint-4" / "README.md").write_text("---\nbase_model: x\nlibrary_name: peft\n---\n")
    before = {str(p.relative_to(run)): p.read_bytes() for p in run.rglob("*") if p.is_file()}

    prepare_run_dir(run, overwrite=True)
    (run / "config.json").write_text("{}")  # the new run's start
    assert restore_replaced_run(run)  # a failed start: exactly as before
    assert {str(p.relative_to(run)): p.read_bytes() for p in run.rglob("*") if p.is_file()} == before

    prepare_run_dir(run, overwrite=True)
    kept = discard_replaced_run(run)
    assert sorted(str(p.relative_to(run / "kept-by-overwrite")) for p in kept) == sorted(
        theirs + ["checkpoint-3/metrics.jsonl"])
    assert sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file()) == sorted(
        f"kept-by-overwrite/{name}" for name in theirs + ["checkpoint-3/metrics.jsonl"])
    assert "kept 6 file(s) reasontune did not write" in capsys.readouterr().err
