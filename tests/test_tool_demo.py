"""The tool demo's data, configs and stages: traces that call Python once, split into per-turn SFT pairs whose loss is the trajectory's."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from reasontune import get_response_log_probs, masked_normalize
from reasontune.config import check_config, config_from_dict
from reasontune.demo import TOOL_DEMO_PRESETS, DemoConfig, build_demo_model, build_demo_tokenizer
from reasontune.environments.base import Trajectory, Turn
from reasontune.environments.python import extract_program
from reasontune.environments.sandbox import SandboxUnavailable, run_python
from reasontune.environments.tokens import trajectory_batch
from reasontune.modeling import load_tokenizer
from reasontune.tokenization import tokenize_prompt_and_output
from reasontune.modeling import load_model
from reasontune.rollouts import write_jsonl
from reasontune.tool_demo import (RESPONSE_TOKENS, TOOL_START_TARGET, TOOL_TAGS, TOOL_TEMPLATE, TURN_TOKENS, StartPicker, evaluate_held_out,
                                  make_multiplication_questions, prepare_tool_demo, question_records, tool_grpo_config,
                                  tool_sft_config, tool_trace, turn_records)
from reasontune.training.sft import run_sft


def test_questions_are_distinct_4_digit_pairs_with_8_digit_products():
    pairs = make_multiplication_questions(500, seed=0)
    assert len(set(pairs)) == 500
    assert all(1000 <= a <= 9999 and 1000 <= b <= 9999 and len(str(a * b)) == 8 for a, b in pairs)
    assert make_multiplication_questions(500, seed=0) == pairs
    assert not set(make_multiplication_questions(500, seed=1, exclude=set(pairs))) & set(pairs)


def test_turn_records_hold_each_model_turn_with_the_tool_output_as_context():
    first, second = turn_records([(1234, 8765)])
    assert first["prompt"] == TOOL_TEMPLATE.format(question="What is 1234*8765?")
    assert first["response"] == " <python>print(1234*8765)</python>"
    # 1234 * 8765 = 1234 * 8000 + 1234 * 765 = 9872000 + 944010 = 10816010
    assert second["prompt"] == first["prompt"] + first["response"] + "<output>\n10816010\n</output>\n"
    assert second["response"] == " I read the output. </think> <answer>10816010</answer>"
    assert second["ground_truth"] == "10816010"


def test_the_trace_program_really_prints_the_product():
    call, output, _ = tool_trace(1234, 8765)
    try:
        result = run_python(extract_program(call))
    except SandboxUnavailable as error:
        pytest.skip(str(error))
    assert result.output == "10816010\n" and output == "<output>\n10816010\n</output>\n"


def test_per_turn_sft_pairs_have_the_loss_of_the_masked_trajectory():
    records = turn_records([(1234, 8765), (4321, 8765)])
    tokenizer = build_demo_tokenizer([r["prompt"] + r["response"] for r in records], vocab_size=300, extra_tags=TOOL_TAGS)
    assert all(len(tokenizer(tag, add_special_tokens=False)["input_ids"]) == 1 for tag in TOOL_TAGS)
    model = build_demo_model(tokenizer, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, seed=0)
    with torch.no_grad():
        pairs = tokenize_prompt_and_output([r["prompt"] for r in records[:2]], [r["response"] for r in records[:2]],
                                           tokenizer)
        pair_log_probs = get_response_log_probs(model, pairs["input_ids"], pairs["labels"])["log_probs"]
        pair_sum = float(masked_normalize(-pair_log_probs, pairs["response_mask"], 1.0))
        call, output, answer = tool_trace(1234, 8765)
        trajectory = Trajectory(prompt=records[0]["prompt"], turns=[
            Turn(role="model", text=call, token_ids=tokenizer(call, add_special_tokens=False)["input_ids"]),
            Turn(role="environment", text=output),
            Turn(role="model", text=answer, token_ids=tokenizer(answer, add_special_tokens=False)["input_ids"])])
        batch = trajectory_batch([trajectory], tokenizer)
        log_probs = get_response_log_probs(model, batch["input_ids"], batch["labels"])["log_probs"]
        trajectory_sum = float(masked_normalize(-log_probs, batch["response_mask"], 1.0))
    assert trajectory_sum == pytest.approx(pair_sum, rel=1e-5)


def test_tools_presets_fill_what_was_not_given_and_leave_the_addition_demo_alone():
    tools = config_from_dict({"algorithm": "tools", "hidden_size": 64}, DemoConfig)
    assert tools.hidden_size == 64  # given: it wins over the preset
    assert (tools.n_train, tools.num_layers, tools.num_heads, tools.learning_rate) == (16000, 2, 4, 3e-3)
    assert DemoConfig.for_algorithm("tools").hidden_size == TOOL_DEMO_PRESETS["hidden_size"] == 128
    addition = config_from_dict({}, DemoConfig)
    assert (addition.n_train, addition.hidden_size, addition.num_layers, addition.num_heads, addition.learning_rate) \
        == (12800, 256, 3, 8, 1e-3) == (DemoConfig().n_train, DemoConfig().hidden_size, DemoConfig().num_layers,
                                          DemoConfig().num_heads, DemoConfig().learning_rate)
    assert config_from_dict({"algorithm": "grpo"}, DemoConfig).hidden_size == 256
    with pytest.raises(SystemExit, match="twice --batch-size"):
        config_from_dict({"algorithm": "tools", "n_train": 32}, DemoConfig)


@pytest.fixture(scope="module")
def demo_files(tmp_path_factory):
    config = DemoConfig.for_algorithm("tools", output_dir=str(tmp_path_factory.mktemp("tools")), n_train=400, n_eval=50,
                                      hidden_size=32, num_layers=1, num_heads=4)
    return config, prepare_tool_demo(config)


def test_prepared_files_keep_the_held_out_questions_apart(demo_files):
    config, files = demo_files
    read = {name: [json.loads(line) for line in path.read_text().splitlines()]
            for name, path in (("train", files.train), ("questions", files.questions), ("held_out", files.held_out))}
    assert len(read["train"]) == 400 and len(read["questions"]) == 200 and len(read["held_out"]) == 50
    held_out = {r["prompt"] for r in read["held_out"]}
    assert not held_out & {r["prompt"] for r in read["questions"]}
    assert {r["prompt"] for r in read["questions"]} == {r["prompt"] for r in read["train"] if r["response"].startswith(" <python>")}
    assert files.template.read_text() == TOOL_TEMPLATE and (files.base_model / "config.json").is_file()


def test_both_copies_are_at_a_fixed_token_distance(demo_files):
    """The design the SFT's speed rests on: every digit a model turn writes stands one fixed number of tokens after its source."""
    _, files = demo_files
    tokenizer = load_tokenizer(str(files.base_model))
    distances = set()
    for a, b in make_multiplication_questions(40, seed=5):
        prompt = TOOL_TEMPLATE.format(question=f"What is {a}*{b}?")
        call, output, answer = tool_trace(a, b)
        pieces = [tokenizer.decode([i]) for i in tokenizer(prompt + call + output + answer)["input_ids"]]
        digits = [k for k, piece in enumerate(pieces) if piece.isdigit()]
        assert all(len(pieces[k]) == 1 for k in digits) and len(digits) == 8 + 8 + 8 + 8  # one token a digit
        question, program, printed, answered = (digits[i:i + 8] for i in range(0, 32, 8))
        distances.add((tuple(p - q for p, q in zip(program, question)), tuple(r - p for p, r in zip(printed, answered))))
    assert len(distances) == 1
    (program_distance, answer_distance), = distances
    assert len(set(program_distance)) == 1 and set(answer_distance) == set(program_distance)  # one distance for both


def test_stage_configs_train_on_the_files_with_the_tool_budget(demo_files, tmp_path):
    config, files = demo_files
    sft = tool_sft_config(config, files)
    assert (sft.train_data, sft.val_data, sft.model) == (str(files.train), str(files.held_out), str(files.base_model))
    assert sft.prompt_template == str(files.template) and sft.learning_rate == 3e-3
    assert not sft.eval_before_training and sft.eval_every == 0 and sft.eval_max_new_tokens == RESPONSE_TOKENS
    grpo = tool_grpo_config(config, files, tmp_path / "sft" / "final")
    check_config(grpo, environment=False)
    assert grpo.model == str(tmp_path / "sft" / "final") and grpo.train_data == str(files.questions)
    assert (grpo.env, grpo.max_tool_calls, grpo.n_grpo_steps) == ("python", 1, config.tool_grpo_steps)
    # the rollouts' budget is the whole response, the evaluation's each turn: the same 2 x 24 tokens
    assert grpo.sampling_max_tokens == RESPONSE_TOKENS == 2 * grpo.eval_max_new_tokens == 2 * TURN_TOKENS
    # the start is measured on the held-out set with the tool before the first step
    assert grpo.eval_temperature == 0.0 and grpo.eval_examples == config.n_eval and grpo.eval_before_training
    assert (grpo.group_size, grpo.rollout_batch_size, grpo.sampling_temperature) == (16, 64, 0.3)


def test_prepared_selection_traces_are_apart_from_training_and_held_out(demo_files):
    _, files = demo_files
    prompts = {name: {json.loads(line)["prompt"] for line in path.read_text().splitlines()}
               for name, path in (("selection", files.selection), ("questions", files.questions),
                                  ("held_out", files.held_out))}
    selection = [json.loads(line) for line in files.selection.read_text().splitlines()]
    questions = {r["prompt"] for r in selection if r["response"].startswith(" <python>")}
    assert len(selection) == 2 * len(questions) == 256
    assert not questions & prompts["questions"] and not questions & prompts["held_out"]


@pytest.mark.slow
def test_start_picker_measures_greedy_accuracy_with_the_tool_and_keeps_the_step_nearest_its_target(tmp_path):
    """SFT memorises 8 traces; at every step the picker's one forward pass says which of them greedy decoding with
    the sandboxed tool answers right, checked question by question against real rollouts of the weights it kept."""
    try:
        run_python("pass")
    except SandboxUnavailable as error:
        pytest.skip(str(error))
    config = DemoConfig.for_algorithm("tools", output_dir=str(tmp_path), n_train=64, n_eval=8, hidden_size=64,
                                      num_layers=2, num_heads=4, num_threads=1, progress=False)
    files = prepare_tool_demo(config)
    pairs = make_multiplication_questions(8, seed=11)
    write_jsonl(turn_records(pairs), files.selection)
    write_jsonl(question_records(pairs), tmp_path / "questions.jsonl")
    sft = dataclasses.replace(tool_sft_config(config, files), train_data=str(files.selection), val_data=None,
                              batch_size=16, num_epochs=80, lr_scheduler="constant", warmup_ratio=0.0)
    picker = StartPicker(files.selection, 0.5, tmp_path / "start", tmp_path / "curve.jsonl")
    run_dir = Path(run_sft(sft, after_step=picker))
    curve = [json.loads(line) for line in (tmp_path / "curve.jsonl").read_text().splitlines()]
    accuracies = [point["accuracy"] for point in curve]
    # every step is measured until one reaches twice the target (here all 8 traces), then none
    assert [point["step"] for point in curve] == list(range(1, len(curve) + 1)) == [h["step"] for h in picker.history]
    assert accuracies[0] == 0.0 and accuracies[-1] == 1.0 and max(accuracies[:-1]) < 1.0 and len(curve) < 80
    nearest = min(abs(a - 0.5) for a in accuracies)
    assert abs(picker.accuracy - 0.5) == nearest and accuracies[picker.step - 1] == picker.accuracy
    assert 0.0 < picker.accuracy < 1.0  # so the check below sees right and wrong traces
    assert all(abs(a - 0.5) > nearest for a in accuracies[: picker.step - 1])  # the earliest of the nearest
    for weights in (tmp_path / "start", run_dir / "final"):
        matches = picker.trace_matches(load_model(str(weights)), load_tokenizer(str(weights)), TOOL_TEMPLATE)
        evaluate_held_out(weights, tmp_path / "questions.jsonl", tmp_path / f"eval-{weights.name}", config, with_tool=True)
        records = [json.loads(line) for line in (tmp_path / f"eval-{weights.name}" / "records.jsonl").read_text().splitlines()]
        assert [r["reward"] == 1.0 for r in sorted(records, key=lambda r: r["index"])] == matches
        assert all(r["tool_calls"] == 1 for r in records)


@pytest.mark.slow
def test_the_demo_runs_every_stage_and_prints_what_its_evaluations_wrote(tmp_path, capsys):
    """The stages end to end at a toy size (seconds, not the demo's minutes): its accuracy bar is measured in docs/tools.md."""
    from reasontune.cli import main

    try:
        run_python("pass")
    except SandboxUnavailable as error:
        pytest.skip(str(error))
    assert main(["demo", "--algorithm", "tools", "--output-dir", str(tmp_path), "--no-progress", "--n-train", "128",
                 "--n-eval", "16", "--hidden-size", "32", "--num-layers", "1", "--tool-grpo-steps", "1",
                 "--num-threads", "1"]) == 0
    printed = capsys.readouterr().out

    def summary(path):
        return json.loads((tmp_path / path / "summary.json").read_text())

    # 64 traces = 128 turns = 4 SFT steps of 32; the SFT's one evaluation is its last step's; GRPO's are its start's
    # and its last step's
    assert [p.name for p in (tmp_path / "sft" / "eval").iterdir()] == ["step-000004"]
    assert sorted(p.name for p in (tmp_path / "grpo" / "eval").iterdir()) == ["step-000000", "step-000001"]
    sft_without, sft_with = summary("sft/eval/step-000004"), summary("sft/eval-python")
    grpo_with, grpo_without = summary("grpo/eval/step-000001"), summary("grpo/eval-no-tool")
    for with_tool, without_tool in ((sft_with, sft_without), (grpo_with, grpo_without)):
        assert with_tool["n_examples"] == without_tool["n_examples"] == 16
        assert "tool_calls" in with_tool and "tool_calls" not in without_tool
        assert "</python>" not in without_tool["sampling"]["stop"]  # without the tool nothing ends a turn at a call
    assert ("after SFT" in printed and f"{sft_without['accuracy']:.1%} without the tool -> "
            f"{sft_with['accuracy']:.1%} with it ({sft_with['tool_calls']} calls" in printed)
    grpo_start = summary("grpo/eval/step-000000")
    assert (f"after GRPO (1 steps from {grpo_start['accuracy']:.1%} with the tool" in printed
            and f"{grpo_without['accuracy']:.1%} without the tool -> "
            f"{grpo_with['accuracy']:.1%} with it ({grpo_with['tool_calls']} calls" in printed)
    curve = [json.loads(line) for line in (tmp_path / "sft" / "selection-curve.jsonl").read_text().splitlines()]
    assert [point["step"] for point in curve] == [1, 2, 3, 4]
    assert f"GRPO starts from SFT step {min(curve, key=lambda p: abs(p['accuracy'] - TOOL_START_TARGET))['step']} " in printed
    grpo = json.loads((tmp_path / "grpo" / "config.json").read_text())
    assert grpo["env"] == "python" and grpo["model"] == str(tmp_path / "sft" / "grpo-start")
    rollouts = [json.loads(line) for line in (tmp_path / "grpo" / "metrics.jsonl").read_text().splitlines()
                if json.loads(line)["kind"] == "train"]
    assert len(rollouts) == 1 and "tool_calls" in rollouts[0]
