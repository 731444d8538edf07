"""A user's mistakes through the real command line: one ``error:`` line per problem, exit 2, no traceback, output untouched.

Each case of issue 15 is run with ``reasontune.cli.main`` in a scratch working directory that
holds a tiny model (``model/``), SFT data, questions and an earlier finished run (``run/``);
the output directory must be exactly as it was before the command (absent stays absent).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import pytest
from conftest import build_tiny_model_dir

from reasontune.cli import main

SFT_RECORDS = [{"prompt": f"What is {i} + 30?", "response": f" {i} + 30 = {i + 30} </think> <answer>{i + 30}</answer>",
                "ground_truth": str(i + 30)} for i in range(8)]
QUESTIONS = [{"question": f"What is {i} + 4?", "answer": str(i + 4)} for i in range(4)]
TINY_SFT = ["--batch-size", "2", "--gradient-accumulation-steps", "1", "--max-length", "64", "--num-threads", "1",
            "--no-progress", "--no-write-report", "--eval-examples", "0"]


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A directory with model/, sft.jsonl, questions.jsonl and run/ (a finished 2-step SFT run started with --overwrite)."""
    root = tmp_path_factory.mktemp("workspace")
    build_tiny_model_dir(root / "model")
    write_jsonl(root / "sft.jsonl", SFT_RECORDS)
    write_jsonl(root / "questions.jsonl", QUESTIONS)
    (root / "empty.jsonl").write_text("")
    bad = [json.dumps(r) for r in SFT_RECORDS]
    bad[2] = '{"prompt": "What is 2 + 30?", "response"'
    (root / "bad.jsonl").write_text("\n".join(bad) + "\n")
    (root / "two.yaml").write_text("batch_size: two\nmax_length: 12.5\n")
    import os

    before = Path.cwd()
    os.chdir(root)
    try:
        assert main(["sft", "--model", "model", "--train-data", "sft.jsonl", "--output-dir", "run", "--max-steps", "2",
                     "--overwrite", "--save-every", "1", *TINY_SFT]) == 0
    finally:
        os.chdir(before)
    return root


def snapshot(path: Path) -> dict[str, str] | None:
    """Returns {relative path: content hash} of every file under ``path`` (None when it does not exist)."""
    if not path.exists():
        return None
    return {str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(path.rglob("*"))
            if f.is_file()}


def run_refused(argv: list[str], output: str, capsys) -> str:
    """Returns stderr after checking that ``argv`` exits 2 with ``error:`` lines, no traceback, and ``output`` unchanged."""
    before = snapshot(Path(output))
    capsys.readouterr()
    status = main(argv)
    err = capsys.readouterr().err
    assert status == 2, err
    assert err.startswith("error: ") and "Traceback" not in err
    assert snapshot(Path(output)) == before, f"{output} changed"
    return err


SFT = ["sft", "--model", "model", "--train-data", "sft.jsonl", *TINY_SFT]

CASES = {
    "typo in --model": (["sft", "--model", "modle", "--train-data", "sft.jsonl", "--output-dir", "new"], "new",
                        ["--model modle: no such directory (did you mean model?)"]),
    "missing data file": (["sft", "--model", "model", "--train-data", "sft.jsnl", "--output-dir", "new"], "new",
                          ["--train-data sft.jsnl: no such file"]),
    "negative learning rate, every problem at once": (
        [*SFT, "--learning-rate", "-1e-3", "--max-steps", "-3", "--output-dir", "new"], "new",
        ["--learning-rate: must be > 0, got -0.001", "--max-steps: must be >= 1, got -3"]),
    "underscore spelling reaches validation": ([*SFT, "--learning_rate=-1e-3", "--output-dir", "new"], "new",
                                               ["--learning-rate: must be > 0"]),
    "--max-steps 0": ([*SFT, "--max-steps", "0", "--output-dir", "new"], "new", ["--max-steps: must be >= 1, got 0"]),
    "bad YAML values": ([*SFT, "--config", "two.yaml", "--output-dir", "new"], "new",
                        ["two.yaml: --batch-size: expected an integer, got 'two'",
                         "two.yaml: --max-length: expected an integer, got 12.5"]),
    "bad JSON line (fails after the start)": (
        ["sft", "--model", "model", "--train-data", "bad.jsonl", *TINY_SFT, "--output-dir", "new"], "new",
        ["bad.jsonl:3: invalid JSON", "--skip-bad"]),
    "empty training file": (["sft", "--model", "model", "--train-data", "empty.jsonl", "--output-dir", "new"], "new",
                            ["--train-data empty.jsonl: the file is empty"]),
    "batch size ignored under a token budget": (
        [*SFT, "--packing", "--tokens-per-batch", "512", "--batch-size", "64", "--output-dir", "new"], "new",
        ["--batch-size 64: has no effect with --tokens-per-batch"]),
    "--eval-every with nothing to evaluate": ([*SFT, "--eval-every", "5", "--output-dir", "new"], "new",
                                              ["--eval-every 5: nothing to evaluate", "--val-fraction"]),
    "a run already there": ([*SFT, "--output-dir", "run"], "run", ["--output-dir run: already holds a run; pass --resume"]),
    "eval: negative temperature": (["eval", "--model", "model", "--data", "questions.jsonl", "--output-dir", "ev",
                                    "--eval-temperature=-1"], "ev", ["--eval-temperature: must be >= 0, got -1"]),
    "eval: empty file": (["eval", "--model", "model", "--data", "empty.jsonl", "--output-dir", "ev"], "ev",
                         ["--data empty.jsonl: the file is empty"]),
    "eval: identical greedy samples": (["eval", "--model", "model", "--data", "questions.jsonl", "--output-dir", "ev",
                                        "--n-samples", "4", "--eval-temperature", "0"], "ev",
                                       ["greedy decoding (--eval-temperature 0) makes every sample identical"]),
    "eval into a training run": (["eval", "--model", "model", "--data", "questions.jsonl", "--output-dir", "run"], "run",
                                 ["--output-dir run: is a training run's directory"]),
    "filter: no responses to grade": (["filter", "--data", "questions.jsonl", "--out", "kept.jsonl"], "kept.jsonl",
                                      ["none of its 4 examples has both a response and a reference answer"]),
    "grpo: a group of one": (["grpo", "--model", "model", "--train-data", "questions.jsonl", "--output-dir", "g",
                              "--group-size", "1", "--rollout-batch-size", "2", "--train-batch-size", "2",
                              "--gradient-accumulation-steps", "1"], "g", ["--group-size 1: a group of one response"]),
    "ei: unknown reward function": (["ei", "--model", "model", "--train-data", "questions.jsonl", "--output-dir", "e",
                                     "--reward", "no_such_module:grade"], "e",
                                    ["--reward no_such_module:grade: cannot import module 'no_such_module'"]),
    "demo over a real run": (["demo", "--output-dir", "."], ".", ["holds files the demo did not make"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_user_mistakes_end_in_one_clear_line_and_leave_the_output_alone(case, workspace, monkeypatch, capsys):
    monkeypatch.chdir(workspace)
    argv, output, expected = CASES[case]
    err = run_refused(argv, output, capsys)
    for text in expected:
        assert text in err, err


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is not None, reason="tensorboard is installed")
def test_an_optional_package_missing_for_a_flag_is_named_before_the_start(workspace, monkeypatch, capsys):
    monkeypatch.chdir(workspace)
    for argv, output in (([*SFT, "--tensorboard", "--output-dir", "new"], "new"),
                         (["eval", "--model", "model", "--data", "questions.jsonl", "--output-dir", "ev",
                           "--tensorboard"], "ev"),
                         (["filter", "--data", "sft.jsonl", "--out", "kept.jsonl", "--tensorboard"], "kept.jsonl")):
        assert "--tensorboard: needs the tensorboard package" in run_refused(argv, output, capsys)


def test_overwrite_replaces_only_what_a_run_wrote(workspace, monkeypatch, capsys):
    monkeypatch.chdir(workspace)
    (workspace / "run" / "notes.md").write_text("my notes")
    try:
        err = run_refused([*SFT, "--output-dir", "run", "--overwrite"], "run", capsys)
    finally:
        (workspace / "run" / "notes.md").unlink()
    assert "holds files a reasontune run did not write (notes.md)" in err


def test_debug_shows_the_traceback_and_internal_errors_keep_theirs(workspace, monkeypatch):
    from reasontune.config import UserError

    monkeypatch.chdir(workspace)
    with pytest.raises(UserError, match="--learning-rate"):
        main([*SFT, "--learning-rate", "-1", "--output-dir", "new", "--debug"])
    import reasontune.filtering

    def broken(config):
        raise RuntimeError("a bug of ours")

    monkeypatch.setattr(reasontune.filtering, "run_filter", broken)
    with pytest.raises(RuntimeError, match="a bug of ours"):
        main(["filter", "--data", "sft.jsonl", "--out", "kept.jsonl"])


def test_resume_works_on_a_run_started_with_overwrite_and_a_finished_run_says_so(workspace, monkeypatch, capsys):
    monkeypatch.chdir(workspace)
    before = snapshot(workspace / "run")
    capsys.readouterr()
    # The README's command for any run (its config.json says overwrite: true) and the short form.
    assert main(["sft", "--config", "run/config.json", "--resume"]) == 0
    assert main(["sft", "--resume", "--output-dir", "run"]) == 0
    out = capsys.readouterr().out
    assert out.count("run already finished: final/ holds step 2 of 2") == 2
    assert snapshot(workspace / "run") == before


def test_a_failed_start_can_simply_be_retried(workspace, monkeypatch, capsys):
    monkeypatch.chdir(workspace)
    assert main(["sft", "--model", "model", "--train-data", "bad.jsonl", *TINY_SFT, "--output-dir", "retry"]) == 2
    assert not (workspace / "retry").exists()
    assert main([*SFT, "--output-dir", "retry", "--max-steps", "1"]) == 0
    assert (workspace / "retry" / "final").is_dir()


def test_argparse_habits(workspace, monkeypatch, capsys):
    monkeypatch.chdir(workspace)
    # no prefix matching: --learning-r is not --learning-rate; one line from the subcommand, with the closest flag
    assert main([*SFT, "--learning-r", "1e-4", "--output-dir", "new"]) == 2
    assert capsys.readouterr().err == ("error: reasontune sft: unknown option --learning-r; did you mean "
                                       "--learning-rate?\n")
    with pytest.raises(SystemExit) as exit_info:  # a value argparse refuses: one line too, not the usage
        main([*SFT, "--batch-size", "two", "--output-dir", "new"])
    assert exit_info.value.code == 2 and capsys.readouterr().err == (
        "error: reasontune sft: argument --batch-size: invalid int value: 'two'; reasontune sft --help lists every "
        "option\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.startswith("reasontune ")
    with pytest.raises(SystemExit):
        main(["sft", "--help"])
    text = capsys.readouterr().out
    assert "(default: )" not in text and "(default: None)" not in text
    assert "--learning-rate LEARNING_RATE, --lr LEARNING_RATE" in text
    for group in ("data:", "model:", "optimisation:", "evaluation:", "checkpoints:", "logging:"):
        assert f"\n{group}\n" in text
    assert text.index("\ndata:\n") < text.index("\nmodel:\n") < text.index("\noptimisation:\n") < text.index("\nlogging:\n")
    # a help text that states its default is not given a second one
    assert not any(line.count("default") > 1 for line in text.splitlines())


def test_the_users_own_sft_command_line_works_unchanged(workspace, monkeypatch, capsys):
    """The flags of the seed's scripts/sft.py (README of seed 004), as the user typed them."""
    monkeypatch.chdir(workspace)
    write_jsonl(workspace / "val.jsonl", [{"question": "What is 1 + 30?", "answer": "31"}])
    argv = ["sft", "--sft-data-path", "sft.jsonl", "--val-data-path", "val.jsonl", "--model-path", "model",
            "--output-dir", "checkpoints/sft", "--num-epochs", "1", "--batch-size", "2",
            "--gradient-accumulation-steps", "2", "--learning-rate", "5e-5", "--max-grad-norm", "1.0",
            "--max-train-examples", "4"]
    assert main([*argv, "--eval-max-new-tokens", "4", "--no-write-report", "--no-progress"]) == 0
    config = json.loads((workspace / "checkpoints" / "sft" / "config.json").read_text())
    assert (config["train_data"], config["val_data"], config["model"]) == ("sft.jsonl", "val.jsonl", "model")
    assert (config["num_epochs"], config["batch_size"], config["gradient_accumulation_steps"]) == (1, 2, 2)
    assert (config["learning_rate"], config["max_grad_norm"], config["max_train_examples"]) == (5e-5, 1.0, 4)
    # 4 examples in microbatches of 2, 2 per optimizer step: 1 step
    train = [json.loads(line) for line in (workspace / "checkpoints" / "sft" / "metrics.jsonl").read_text().splitlines()
             if '"kind": "train"' in line]
    assert [line["step"] for line in train] == [1]


def test_every_option_groups_machine_check_runs_once_for_a_trainer(workspace, tmp_path):
    """GRPO's config is made of many option groups; each checks its own files here (model, template, train and val
    data), so a config with all four wrong names all four, once each, base groups first."""
    from reasontune.options import environment_problems
    from reasontune.training.grpo_config import GRPOConfig

    config = GRPOConfig(model=str(tmp_path / "no-model"), prompt_template=str(tmp_path / "no.prompt"),
                        train_data=str(tmp_path / "no-train.jsonl"), val_data=str(tmp_path / "no-val.jsonl"),
                        output_dir=str(tmp_path / "out"))
    problems = environment_problems(config)
    flags = [problem.split(maxsplit=1)[0].rstrip(":") for problem in problems]
    assert sorted(flags) == ["--model", "--prompt-template", "--train-data", "--val-data"], problems
    assert flags.index("--model") < flags.index("--train-data")  # ModelOptions is a base of TrainerOptions
