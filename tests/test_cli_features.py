"""What users of other toolkits expect from the command line: chat templates, their own reward function, hub splits, progress in logs."""

from __future__ import annotations

import io
import json

import pytest
from conftest import build_tiny_model_dir

from reasontune.cli import COMMANDS, main
from reasontune.data import Example, with_chat_template
from reasontune.tracking import Progress

CHAT_TEMPLATE = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}[assistant]{% endif %}")
CHAT_RECORD = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"},
                            {"role": "assistant", "content": "4"}], "ground_truth": "4"}


class TemplatedTokenizer:
    chat_template = CHAT_TEMPLATE

    def apply_chat_template(self, turns, tokenize, add_generation_prompt):
        assert tokenize is False and add_generation_prompt is True
        return "".join(f"[{t['role']}] {t['content']}\n" for t in turns) + "[assistant]"


def test_chat_records_are_rendered_with_the_chat_template_unless_none():
    chat = Example(question="What is 2 + 2?", prompt="What is 2 + 2?", response="4", raw=CHAT_RECORD)
    plain = Example(question="What is 3 + 3?", raw={"question": "What is 3 + 3?"})
    rendered = with_chat_template([chat, plain], TemplatedTokenizer(), "auto")
    # system and user turns, not the assistant's; then the generation prompt
    assert rendered[0].prompt == "[system] Be brief.\n[user] What is 2 + 2?\n[assistant]"
    assert rendered[0].response == "4" and rendered[1] == plain
    assert with_chat_template([chat], TemplatedTokenizer(), "none")[0].prompt == "What is 2 + 2?"
    no_template = type("Plain", (), {"chat_template": None})()
    assert with_chat_template([chat], no_template, "auto")[0].prompt == "What is 2 + 2?"


@pytest.fixture
def chat_model(tmp_path):
    from transformers import AutoTokenizer

    model = build_tiny_model_dir(tmp_path / "model")
    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(model)
    return model


def test_eval_renders_chat_data_with_the_models_template(chat_model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "chat.jsonl").write_text(json.dumps(CHAT_RECORD) + "\n")
    argv = ["eval", "--model", str(chat_model), "--data", "chat.jsonl", "--eval-max-new-tokens", "2",
            "--reward", "question_only", "--n-bootstrap", "10"]
    assert main([*argv, "--output-dir", "auto"]) == 0
    assert main([*argv, "--output-dir", "none", "--chat-template", "none"]) == 0
    prompt = json.loads((tmp_path / "auto" / "records.jsonl").read_text().splitlines()[0])["prompt"]
    assert prompt == "[system] Be brief.\n[user] What is 2 + 2?\n[assistant]"
    assert json.loads((tmp_path / "none" / "records.jsonl").read_text().splitlines()[0])["prompt"] == "What is 2 + 2?"


REWARD_MODULE = '''
def last_word_reward(response, ground_truth):
    """1 when the response's last word is the reference answer (no format required)."""
    words = response.split()
    correct = float(bool(words) and words[-1] == str(ground_truth))
    return {"format_reward": 1.0, "answer_reward": correct, "reward": correct}
'''


def test_a_reward_function_of_the_users_own_grades_in_the_workers(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))  # what the console script gets from the working directory
    (tmp_path / "my_rewards.py").write_text(REWARD_MODULE)
    records = [{"prompt": "2+2?", "response": "it is 4", "ground_truth": "4"},
               {"prompt": "3+3?", "response": "<answer>6</answer> or 7", "ground_truth": "6"},
               {"prompt": "5+5?", "response": "10", "ground_truth": "10"}]
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert main(["filter", "--data", "sft.jsonl", "--out", "kept.jsonl", "--reward", "my_rewards:last_word_reward",
                 "--grading-workers", "1"]) == 0
    kept = [json.loads(line)["prompt"] for line in (tmp_path / "kept.jsonl").read_text().splitlines()]
    assert kept == ["2+2?", "5+5?"]  # the r1_zero reward would keep none of them: no <think> format
    assert main(["filter", "--data", "sft.jsonl", "--out", "k2.jsonl", "--reward", "my_rewards:no_such"]) == 2
    assert "module 'my_rewards' has no function 'no_such'" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["sft", "ei", "grpo", "eval", "filter"])
def test_every_data_command_takes_hub_split_config_skip_bad_and_chat_template(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = capsys.readouterr().out
    for flag in ("--split", "--data-config", "--skip-bad", "--chat-template", "--reward"):
        assert flag in text, (command, flag)
    assert command in COMMANDS


def test_progress_prints_plain_lines_with_rate_and_eta_when_not_a_terminal():
    stream = io.StringIO()  # not a terminal: a batch job's log
    progress = Progress(4, description="generate", unit="prompt", stream=stream, plain_every_s=0.0)
    progress.update(1, loss=1094.0, token_loss=0.93)
    progress.update(4)
    progress.close()
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("generate prompt 1/4 (25%) loss=1094 nll/token=0.93")
    assert "prompts/s" in lines[0] and "ETA" in lines[0]
    assert lines[-1].startswith("generate prompt 4/4 (100%)")
    quiet = io.StringIO()
    silent = Progress(4, stream=quiet, enabled=False, plain_every_s=0.0)
    silent.update(4)
    assert quiet.getvalue() == ""
