"""The tool demo's data: traces that call Python once, split into per-turn SFT pairs whose loss is the trajectory's."""

from __future__ import annotations

import pytest
import torch

from reasontune import get_response_log_probs, masked_normalize
from reasontune.demo import build_demo_model, build_demo_tokenizer
from reasontune.environments.base import Trajectory, Turn
from reasontune.environments.python import extract_program
from reasontune.environments.sandbox import SandboxUnavailable, run_python
from reasontune.environments.tokens import trajectory_batch
from reasontune.tokenization import tokenize_prompt_and_output
from reasontune.tool_demo import TOOL_TAGS, make_multiplication_questions, tool_trace, turn_records


def test_turn_records_hold_each_model_turn_with_the_tool_output_as_context():
    pairs = make_multiplication_questions(3, seed=0)
    assert len(set(pairs)) == 3 and all(1000 <= a <= 9999 and 1000 <= b <= 9999 for a, b in pairs)
    assert not set(make_multiplication_questions(3, seed=1, exclude=set(pairs))) & set(pairs)
    first, second = turn_records(pairs[:1])
    a, b = pairs[0]
    assert first["response"] == f" <python>print({a}*{b})</python>"
    assert second["prompt"] == first["prompt"] + first["response"] + f"<output>\n{a * b}\n</output>\n"
    assert second["response"] == f" </think> <answer>{a * b}</answer>" and second["ground_truth"] == str(a * b)


def test_the_trace_program_really_prints_the_product():
    call, output, _ = tool_trace(1234, 5678)
    try:
        result = run_python(extract_program(call))
    except SandboxUnavailable as error:
        pytest.skip(str(error))
    assert result.output == "7006652\n" and output == "<output>\n7006652\n</output>\n"  # 1234 * 5678 by hand


def test_per_turn_sft_pairs_have_the_loss_of_the_masked_trajectory():
    records = turn_records([(1234, 5678), (4321, 8765)])
    tokenizer = build_demo_tokenizer([r["prompt"] + r["response"] for r in records], vocab_size=300, extra_tags=TOOL_TAGS)
    assert all(len(tokenizer(tag, add_special_tokens=False)["input_ids"]) == 1 for tag in TOOL_TAGS)
    model = build_demo_model(tokenizer, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, seed=0)
    with torch.no_grad():
        pairs = tokenize_prompt_and_output([r["prompt"] for r in records[:2]], [r["response"] for r in records[:2]],
                                           tokenizer)
        pair_log_probs = get_response_log_probs(model, pairs["input_ids"], pairs["labels"])["log_probs"]
        pair_sum = float(masked_normalize(-pair_log_probs, pairs["response_mask"], 1.0))
        call, output, answer = tool_trace(1234, 5678)
        trajectory = Trajectory(prompt=records[0]["prompt"], turns=[
            Turn(role="model", text=call, token_ids=tokenizer(call, add_special_tokens=False)["input_ids"]),
            Turn(role="environment", text=output),
            Turn(role="model", text=answer, token_ids=tokenizer(answer, add_special_tokens=False)["input_ids"])])
        batch = trajectory_batch([trajectory], tokenizer)
        log_probs = get_response_log_probs(model, batch["input_ids"], batch["labels"])["log_probs"]
        trajectory_sum = float(masked_normalize(-log_probs, batch["response_mask"], 1.0))
    assert trajectory_sum == pytest.approx(pair_sum, rel=1e-5)
