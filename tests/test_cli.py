"""The command line: every command's --help, config files under flags, configs that load back equal."""

from __future__ import annotations

import dataclasses

import pytest

from reasontune.cli import COMMANDS, main
from reasontune.config import config_from_namespace, load_config, save_config
from reasontune.training.sft import SFTConfig


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_explains_its_options(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert f"usage: reasontune {command}" in text and "--config FILE.yaml" in text


def test_top_level_help_lists_the_commands(capsys):
    assert main([]) == 2
    text = capsys.readouterr().out
    assert all(name in text for name in COMMANDS)


def parse_sft(argv):
    import argparse

    from reasontune.cli import build_parser

    namespace = build_parser("sft").parse_args(["sft", *argv])
    values = {k: v for k, v in vars(namespace).items() if k != "command"}
    return config_from_namespace(argparse.Namespace(**values), SFTConfig)


def test_flags_override_the_config_file_which_overrides_defaults(tmp_path):
    config_file = tmp_path / "sft.yaml"
    config_file.write_text("train-data: a.jsonl\nlearning_rate: 3e-5\nbatch-size: 8\npacking: true\nmax_length: null\n")
    config = parse_sft(["--config", str(config_file), "--batch-size", "2", "--no-packing"])
    assert config.train_data == "a.jsonl"
    assert config.learning_rate == 3e-5  # from the file (a YAML "3e-5" string becomes a float)
    assert config.batch_size == 2 and config.packing is False  # flags win
    assert config.max_length is None
    assert config.gradient_accumulation_steps == SFTConfig.gradient_accumulation_steps  # default


def test_config_errors_name_the_problem(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning-rate: 1e-5\nlearnin_rate: 2\n")
    with pytest.raises(SystemExit, match="unknown option 'learnin_rate'"):
        parse_sft(["--config", str(bad), "--train-data", "x"])
    with pytest.raises(SystemExit, match="--train-data: required"):
        parse_sft([])
    with pytest.raises(SystemExit):
        parse_sft(["--train-data", "x", "--loss-normalization", "per_token"])


def test_resolved_config_loads_back_equal(tmp_path):
    config = dataclasses.replace(SFTConfig(train_data="t.jsonl"), learning_rate=1e-4, max_length=None, packing=True,
                                 tokens_per_batch=256)
    save_config(config, tmp_path / "config.json")
    assert load_config(tmp_path / "config.json", SFTConfig) == config
