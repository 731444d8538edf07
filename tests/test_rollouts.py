"""The one rollout path: records, summary, correct() and grading order against hand-computed examples."""

from __future__ import annotations

import json

import pytest

from reasontune.data import DataError, Example
from reasontune.generation import Completion
from reasontune.rewards import r1_zero_reward_fn
from reasontune.rollouts import (CATEGORIES, category, grade_completions, reward_fn_by_name,
                                 summarize)
from reasontune.run_layout import read_jsonl

CORRECT = " 12 + 30 = 42 </think> <answer>42</answer>"
FORMATTED_WRONG = " 12 + 30 = 41 </think> <answer>41</answer>"
UNFORMATTED = " the answer is 42"
PROMPTS = [f"User: What is {a} + {b}? Assistant: <think>" for a, b in ((12, 30), (20, 22), (40, 2))]


def completion(text: str, tokens: int, entropies=None, finish="stop") -> Completion:
    return Completion(text=text, token_ids=list(range(tokens)), finish_reason=finish, entropies=entropies)


def graded():
    # G = 3 samples for each of 3 prompts; the second prompt's reference is 43, so its "42" samples are wrong.
    groups = [
        [completion(CORRECT, 10), completion(FORMATTED_WRONG, 11), completion(UNFORMATTED, 4, finish="length")],
        [completion(CORRECT, 10), completion(UNFORMATTED, 4), completion(FORMATTED_WRONG, 11)],
        [completion(UNFORMATTED, 4), completion(CORRECT + " trailing", 12), completion(CORRECT, 10)],
    ]
    return grade_completions(PROMPTS, ["42", "43", "42"], groups, r1_zero_reward_fn, grading_workers=0,
                             examples=[Example(question=str(i), source="q.jsonl", line=i + 1) for i in range(3)])


def test_correct_keeps_exactly_the_correct_samples_in_order():
    rollouts = graded()
    assert [[category(r) for r in group] for group in rollouts.rewards] == [
        ["correct", "formatted_wrong", "unformatted"],
        ["formatted_wrong", "unformatted", "formatted_wrong"],  # reference 43
        ["unformatted", "correct", "correct"]]
    assert rollouts.correct() == [
        {"prompt": PROMPTS[0], "response": CORRECT, "ground_truth": "42"},
        {"prompt": PROMPTS[2], "response": CORRECT + " trailing", "ground_truth": "42"},  # text after </answer> is ignored
        {"prompt": PROMPTS[2], "response": CORRECT, "ground_truth": "42"},
    ]


def test_summary_and_records_hand_values(tmp_path):
    rollouts = graded()
    summary = rollouts.summary()
    assert summary["counts"] == {"correct": 3, "formatted_wrong": 3, "unformatted": 3}
    assert summary["accuracy"] == pytest.approx(3 / 9) and summary["format_rate"] == pytest.approx(6 / 9)
    assert summary["pass_at_n"] == pytest.approx(2 / 3)  # prompts 0 and 2 have a correct sample
    assert summary["mean_response_tokens"] == pytest.approx(76 / 9)  # 10+11+4 + 10+4+11 + 4+12+10
    assert summary["mean_response_tokens_correct"] == pytest.approx(32 / 3)  # 10, 12, 10
    assert summary["mean_response_tokens_incorrect"] == pytest.approx(44 / 6)
    assert summary["mean_response_tokens_truncated"] == 4 and summary["truncated_fraction"] == pytest.approx(1 / 9)
    assert summary["n_examples"] == 3 and summary["n_samples"] == 9 and summary["grading_seconds"] >= 0
    records = rollouts.records()
    assert [(r["index"], r["sample"]) for r in records][:4] == [(0, 0), (0, 1), (0, 2), (1, 0)]
    assert records[4]["question_id"] == "q.jsonl:2" and records[4]["category"] == "unformatted"
    rollouts.write(tmp_path, extra_summary={"template": "t"})
    # Read back from disk, the same records give the same statistics (the report's path).
    assert read_jsonl(tmp_path / "records.jsonl") == records
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["template"] == "t"
    assert summarize(read_jsonl(tmp_path / "records.jsonl"))["counts"] == summary["counts"]


def test_select_keeps_prompt_alignment_and_categories_are_exhaustive():
    chosen = graded().select([2, 0])
    assert chosen.prompts == [PROMPTS[2], PROMPTS[0]] and chosen.ground_truths == ["42", "42"]
    assert [c.num_tokens for c in chosen.completions[0]] == [4, 12, 10]
    assert chosen.examples[0].line == 3
    assert CATEGORIES == ("correct", "formatted_wrong", "unformatted")
    assert category({"answer_reward": 1.0, "format_reward": 0.0}) == "correct"


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="must be as many"):
        grade_completions(PROMPTS, ["42"], [[completion(CORRECT, 1)]], r1_zero_reward_fn, grading_workers=0)
    with pytest.raises(ValueError, match="unknown reward"):
        reward_fn_by_name("exact_match")


def test_read_jsonl_strict_names_file_and_line(tmp_path):
    path = tmp_path / "records.jsonl"
    path.write_text('{"index": 0}\n\nnot json\n')
    with pytest.raises(DataError, match=r"records.jsonl:3: invalid JSON"):
        read_jsonl(path, strict=True)


def test_grading_in_worker_processes_keeps_order():
    responses = [CORRECT if i % 3 == 0 else FORMATTED_WRONG for i in range(12)]
    rollouts = grade_completions([f"p{i}" for i in range(4)], ["42"] * 4,
                                 [[completion(t, 1) for t in responses[i * 3:(i + 1) * 3]] for i in range(4)],
                                 r1_zero_reward_fn, grading_workers=2)
    assert [r["answer_reward"] for r in rollouts.flat_rewards()] == [float(i % 3 == 0) for i in range(12)]


def test_responses_stop_at_the_answer_tag_when_the_reward_or_the_prompt_asks_for_it():
    from reasontune.data import load_template
    from reasontune.rollouts import stop_sequences

    assert stop_sequences("r1_zero") == ("</answer>",)
    # A user's own reward on the shipped R1-Zero prompt: the prompt asks for <answer>…</answer>, so stop there.
    assert stop_sequences("my_rewards:score", load_template("r1_zero")) == ("</answer>",)
    # The question-only prompt asks for no tag: nothing to stop at.
    assert "</answer>" not in load_template("question_only")
    assert stop_sequences("question_only", load_template("question_only")) == ()
    assert stop_sequences("my_rewards:score", "{question}") == ()
