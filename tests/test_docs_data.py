"""docs/prepare-data.md stays true: its sample files exist and load, and its command lines parse."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from reasontune.cli import build_parser, normalise_argv
from reasontune.data import load_examples

REPO = Path(__file__).resolve().parents[1]
DOC = (REPO / "docs" / "prepare-data.md").read_text()


@pytest.mark.parametrize("path", sorted(set(re.findall(r"examples/data/[\w.-]+", DOC))))
def test_every_sample_file_the_guide_names_exists_and_loads(path):
    examples = load_examples(REPO / path)
    assert len(examples) >= 1 and all(e.ground_truth is not None for e in examples)


def test_every_command_line_in_the_guide_parses():
    lines = [line.split("#")[0] for line in re.findall(r"^reasontune .*$", DOC, flags=re.MULTILINE)]
    assert len(lines) >= 5
    for line in lines:
        argv = normalise_argv(shlex.split(line)[1:])
        build_parser(argv[0]).parse_args(argv)  # exits 2 on an unknown flag


def test_the_flags_the_guide_mentions_exist():
    help_text = "".join(build_parser(command).format_help() + build_parser(command)._subparsers._group_actions[0]
                        .choices[command].format_help() for command in ("sft", "eval", "filter", "grpo"))
    for flag in set(re.findall(r"`(--[a-z-]+)", DOC)):
        assert flag in help_text, flag
