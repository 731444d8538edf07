"""Expert iteration: the keep-correct filter, question batches, and the loop end to end on a tiny real model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from reasontune.generation import Completion
from reasontune.rewards import r1_zero_reward_fn
from reasontune.training.expert_iteration import (
    ExpertIterationConfig,
    keep_correct,
    rollout_statistics,
    run_expert_iteration,
    sample_question_batch,
)

torch.set_num_threads(1)

CORRECT = " 12 + 30 = 42 </think> <answer>42</answer>"
FORMATTED_WRONG = " 12 + 30 = 41 </think> <answer>41</answer>"
UNFORMATTED = " the answer is 42"
PROMPTS = [f"User: What is {a} + {b}? Assistant: <think>" for a, b in ((12, 30), (20, 22), (40, 2))]


def completion(text: str, tokens: int, entropies=None) -> Completion:
    return Completion(text=text, token_ids=list(range(tokens)), finish_reason="stop", entropies=entropies)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_keep_correct_keeps_exactly_the_correct_samples_in_order():
    from reasontune.evaluation import grade

    # G = 3 samples for each of 3 prompts; the second prompt's reference is 43, so its "42" samples are wrong.
    truths = ["42", "43", "42"]
    groups = [
        [completion(CORRECT, 10), completion(FORMATTED_WRONG, 11), completion(UNFORMATTED, 4)],
        [completion(CORRECT, 10), completion(UNFORMATTED, 4), completion(FORMATTED_WRONG, 11)],
        [completion(UNFORMATTED, 4), completion(CORRECT + " trailing", 12), completion(CORRECT, 10)],
    ]
    rewards = grade([c.text for g in groups for c in g], [t for t, g in zip(truths, groups) for _ in g],
                    r1_zero_reward_fn, workers=0)
    # The three categories really occur: formatted-wrong has format 1 and answer 0, unformatted format 0.
    assert [(r["format_reward"], r["answer_reward"]) for r in rewards[:3]] == [(1.0, 1.0), (1.0, 0.0), (0.0, 0.0)]
    kept = keep_correct(PROMPTS, truths, groups, rewards)
    assert kept == [
        {"prompt": PROMPTS[0], "response": CORRECT, "ground_truth": "42"},
        {"prompt": PROMPTS[2], "response": CORRECT + " trailing", "ground_truth": "42"},  # text after </answer> is ignored
        {"prompt": PROMPTS[2], "response": CORRECT, "ground_truth": "42"},
    ]
    with pytest.raises(ValueError, match="8 rewards for 9 samples"):
        keep_correct(PROMPTS, truths, groups, rewards[:8])


def test_rollout_statistics_hand_values():
    groups = [[completion(CORRECT, 10, [0.5] * 10), completion(UNFORMATTED, 4, [2.0] * 4)],
              [completion(FORMATTED_WRONG, 6, [1.0] * 6), completion(UNFORMATTED, 2, [3.0] * 2)]]
    rewards = [r1_zero_reward_fn(c.text, "42") for g in groups for c in g]
    stats = rollout_statistics(groups, rewards)
    assert stats["samples"] == 4 and stats["sample_accuracy"] == 0.25 and stats["sample_format_rate"] == 0.5
    assert stats["questions_solved"] == 1
    # Token-weighted: (10*0.5 + 4*2 + 6*1 + 2*3) / 22 = 25 / 22 (not the mean of per-sample means, 1.625).
    assert stats["token_entropy"] == pytest.approx(25 / 22)
    assert stats["mean_response_tokens"] == 5.5
    assert stats["mean_response_tokens_correct"] == 10 and stats["mean_response_tokens_incorrect"] == 4


def test_question_batches_are_seeded_distinct_and_vary_by_step():
    first = sample_question_batch(50, 8, seed=3, step=1)
    assert len(first) == 8 and len(set(first)) == 8 and all(0 <= i < 50 for i in first)
    assert sample_question_batch(50, 8, seed=3, step=1) == first
    assert sample_question_batch(50, 8, seed=3, step=2) != first
    assert sample_question_batch(50, 8, seed=4, step=1) != first
    assert sorted(sample_question_batch(5, 8, seed=0, step=1)) == [0, 1, 2, 3, 4]


def ei_config(model, train: Path, val: Path, out: Path, **changes) -> ExpertIterationConfig:
    values = dict(model=str(model), train_data=str(train), val_data=str(val), output_dir=str(out), n_ei_steps=1,
                  questions_per_step=3, samples_per_question=2, sampling_temperature=1.0, sampling_min_tokens=1,
                  sampling_max_tokens=8, sft_epochs=1, learning_rate=1e-3, batch_size=2, gradient_accumulation_steps=1,
                  max_length=64, eval_examples=2, eval_max_new_tokens=8, dtype="float32", device="cpu",
                  num_threads=1, progress=False, write_report=True, seed=0)
    values.update(changes)
    return ExpertIterationConfig(**values)


def write_questions(path: Path, truths) -> Path:
    path.write_text("".join(json.dumps({"prompt": p, "ground_truth": t}) + "\n" for p, t in zip(PROMPTS, truths)))
    return path


def test_random_model_keeps_nothing_and_skips_sft(tiny_model_dir, tmp_path):
    train = write_questions(tmp_path / "train.jsonl", ["42", "42", "42"])
    run_dir = run_expert_iteration(ei_config(tiny_model_dir, train, train, tmp_path / "run"))
    rollouts = read_jsonl(run_dir / "ei-step-1" / "rollouts.jsonl")
    assert len(rollouts) == 6 and all(r["answer_reward"] == 0.0 for r in rollouts)
    assert all(1 <= r["response_tokens"] <= 8 for r in rollouts)  # min tokens 1: no empty response
    assert read_jsonl(run_dir / "ei-step-1" / "data.jsonl") == []
    assert not (run_dir / "ei-step-1" / "sft").exists()
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    (train_line,) = [m for m in metrics if m["kind"] == "train"]
    assert train_line["kept"] == 0 and train_line["loss"] is None and train_line["sample_accuracy"] == 0.0
    assert train_line["token_entropy"] > 0 and train_line["policy"] == str(tiny_model_dir)
    assert any(m["kind"] == "event" and "SFT skipped" in m["message"] for m in metrics)
    assert [m["step"] for m in metrics if m["kind"] == "eval"] == [0, 1]
    for step in (0, 1):
        summary = json.loads((run_dir / "eval" / f"step-{step:06d}" / "summary.json").read_text())
        assert summary["n_examples"] == 2 and summary["accuracy"] == 0.0
    assert (run_dir / "final" / "config.json").exists() and (run_dir / "report" / "index.html").exists()


def test_policy_that_answers_gets_fine_tuned_on_its_correct_samples(tiny_model_dir, tmp_path):
    """A tiny model first taught one response by SFT; EI keeps exactly its samples that match the reference."""
    from safetensors.torch import load_file

    from reasontune.training.sft import SFTConfig, run_sft

    sft_data = tmp_path / "teach.jsonl"
    sft_data.write_text("".join(json.dumps({"prompt": p, "response": CORRECT}) + "\n" for p in PROMPTS))
    taught = run_sft(SFTConfig(model=str(tiny_model_dir), train_data=str(sft_data), output_dir=str(tmp_path / "teach"),
                               num_epochs=60, batch_size=3, gradient_accumulation_steps=1, learning_rate=1e-2,
                               warmup_ratio=0.0, lr_scheduler="constant", max_length=64, eval_examples=0,
                               device="cpu", num_threads=1, progress=False, write_report=False)) / "final"
    # The reference of the second question is 43: its (memorised) "42" samples are formatted but wrong.
    train = write_questions(tmp_path / "train.jsonl", ["42", "43", "42"])
    run_dir = run_expert_iteration(ei_config(taught, train, train, tmp_path / "run", n_ei_steps=2,
                                             sampling_max_tokens=24, eval_max_new_tokens=24, eval_examples=3))
    for step in (1, 2):
        rollouts = read_jsonl(run_dir / f"ei-step-{step}" / "rollouts.jsonl")
        kept = read_jsonl(run_dir / f"ei-step-{step}" / "data.jsonl")
        correct = [r for r in rollouts if r["answer_reward"] == 1.0]
        assert len(correct) >= 2, rollouts  # the taught model answers 42 nearly always
        assert kept == [{"prompt": r["prompt"], "response": r["response"], "ground_truth": r["ground_truth"]}
                        for r in correct]
        assert all(k["ground_truth"] == "42" and k["prompt"] != PROMPTS[1] for k in kept)
        sft_metrics = read_jsonl(run_dir / f"ei-step-{step}" / "sft" / "metrics.jsonl")
        assert [m["step"] for m in sft_metrics if m["kind"] == "train"] == list(range(1, (len(kept) + 1) // 2 + 1))
    # Step 2 samples from step 1's policy, and the run's final/ is step 2's.
    train_lines = [m for m in read_jsonl(run_dir / "metrics.jsonl") if m["kind"] == "train"]
    assert train_lines[1]["policy"] == str(run_dir / "ei-step-2" / "sft" / "final")
    assert (json.loads((run_dir / "ei-step-2" / "sft" / "config.json").read_text())["model"]
            == str(run_dir / "ei-step-1" / "sft" / "final"))
    assert all(m["loss"] is not None and m["kept"] >= 2 and m["lr"] == 1e-3 for m in train_lines)
    final, before = load_file(run_dir / "final" / "model.safetensors"), load_file(taught / "model.safetensors")
    assert any(not torch.equal(final[k], before[k]) for k in before)
    assert torch.equal(final["model.norm.weight"], load_file(run_dir / "ei-step-2" / "sft" / "final" / "model.safetensors")["model.norm.weight"])
    summary = json.loads((run_dir / "eval" / "step-000002" / "summary.json").read_text())
    assert summary["n_examples"] == 3


def test_demo_with_ei_runs_end_to_end(tmp_path, capsys):
    """``reasontune demo --algorithm ei`` at toy size: under-trained SFT, EI from its final/, base -> SFT -> EI printed."""
    from reasontune.demo import DemoConfig, run_demo

    config = DemoConfig(algorithm="ei", output_dir=str(tmp_path), n_train=64, n_eval=4, hidden_size=32, num_layers=1,
                        num_heads=4, num_kv_heads=2, batch_size=16, eval_max_new_tokens=12, warmup_sft_steps=2,
                        ei_steps=1, ei_questions=3, ei_samples=2, num_threads=1, progress=False)
    assert run_demo(config) == 0
    assert sorted(p.name for p in (tmp_path / "sft" / "eval").iterdir()) == ["step-000000", "step-000002"]
    assert sorted(p.name for p in (tmp_path / "ei" / "eval").iterdir()) == ["step-000000", "step-000001"]
    for summary in [tmp_path / "sft" / "eval" / "step-000002" / "summary.json", tmp_path / "ei" / "eval" / "step-000001" / "summary.json"]:
        assert json.loads(summary.read_text())["n_examples"] == 4
    assert json.loads((tmp_path / "ei" / "config.json").read_text())["model"] == str(tmp_path / "sft" / "final")
    assert (tmp_path / "ei" / "report" / "index.html").exists()
    assert "base ->" in capsys.readouterr().out
