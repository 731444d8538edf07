"""Expert iteration: the keep-correct filter, question batches, and the loop end to end on a tiny real model."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from reasontune.training.policy_sampling import question_batch
from reasontune.training.expert_iteration import ExpertIterationConfig, run_expert_iteration

torch.set_num_threads(1)

CORRECT = " 12 + 30 = 42 </think> <answer>42</answer>"
FORMATTED_WRONG = " 12 + 30 = 41 </think> <answer>41</answer>"
UNFORMATTED = " the answer is 42"
PROMPTS = [f"User: What is {a} + {b}? Assistant: <think>" for a, b in ((12, 30), (20, 22), (40, 2))]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_question_batches_are_seeded_distinct_and_vary_by_step():
    first = question_batch(50, 8, seed=3, step=1)
    assert len(first) == 8 and len(set(first)) == 8 and all(0 <= i < 50 for i in first)
    assert question_batch(50, 8, seed=3, step=1) == first
    assert question_batch(50, 8, seed=3, step=2) != first
    assert question_batch(50, 8, seed=4, step=1) != first
    assert sorted(question_batch(5, 8, seed=0, step=1)) == [0, 1, 2, 3, 4]


def ei_config(model, train: Path, val: Path, out: Path, **changes) -> ExpertIterationConfig:
    values = dict(model=str(model), train_data=str(train), val_data=str(val), output_dir=str(out), n_ei_steps=1,
                  questions_per_step=3, group_size=2, sampling_temperature=1.0, sampling_min_tokens=1,
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
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    (train_line,) = [m for m in metrics if m["kind"] == "train"]
    assert train_line["kept"] == 0 and train_line["loss"] is None and train_line["accuracy"] == 0.0
    assert train_line["token_entropy"] > 0 and train_line["sft_steps"] == 0
    final, start = load_file(run_dir / "final" / "model.safetensors"), load_file(tiny_model_dir / "model.safetensors")
    assert all(torch.equal(final[k], start[k]) for k in start)  # nothing kept: the policy is unchanged
    assert any(m["kind"] == "event" and "SFT skipped" in m["message"] for m in metrics)
    assert [m["step"] for m in metrics if m["kind"] == "eval"] == [0, 1]
    for step in (0, 1):
        summary = json.loads((run_dir / "eval" / f"step-{step:06d}" / "summary.json").read_text())
        assert summary["n_examples"] == 2 and summary["accuracy"] == 0.0
    assert (run_dir / "final" / "config.json").exists() and (run_dir / "report" / "index.html").exists()


def teach(tiny_model_dir, tmp_path) -> Path:
    """Returns a tiny model taught by SFT to answer every prompt with CORRECT (42)."""
    from reasontune.training.sft import SFTConfig, run_sft

    sft_data = tmp_path / "teach.jsonl"
    sft_data.write_text("".join(json.dumps({"prompt": p, "response": CORRECT}) + "\n" for p in PROMPTS))
    return run_sft(SFTConfig(model=str(tiny_model_dir), train_data=str(sft_data), output_dir=str(tmp_path / "teach"),
                             num_epochs=60, batch_size=3, gradient_accumulation_steps=1, learning_rate=1e-2,
                             warmup_ratio=0.0, lr_scheduler="constant", max_length=64, eval_examples=0,
                             device="cpu", num_threads=1, progress=False, write_report=False)) / "final"


def test_resumed_expert_iteration_ends_with_the_uninterrupted_weights(tiny_model_dir, tmp_path):
    """EI resumed from checkpoint-1 (weights, RNG, step) reaches step 3 with bit-identical weights."""
    taught = teach(tiny_model_dir, tmp_path)
    train = write_questions(tmp_path / "train.jsonl", ["42", "43", "42"])
    settings = dict(sampling_max_tokens=24, eval_examples=0, save_every=1, write_report=False)
    reference = run_expert_iteration(ei_config(taught, train, train, tmp_path / "ref", n_ei_steps=3, **settings))
    run_expert_iteration(ei_config(taught, train, train, tmp_path / "cut", n_ei_steps=2, **settings))  # checkpoint-1
    resumed = run_expert_iteration(ei_config(taught, train, train, tmp_path / "cut", n_ei_steps=3, resume=True,
                                             **settings))
    kept = [m["kept"] for m in read_jsonl(reference / "metrics.jsonl") if m["kind"] == "train"]
    assert len(kept) == 3 and sum(kept) > 0  # SFT phases really ran
    expected, got = load_file(reference / "final" / "model.safetensors"), load_file(resumed / "final" / "model.safetensors")
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


def test_policy_that_answers_gets_fine_tuned_on_its_correct_samples(tiny_model_dir, tmp_path):
    """A tiny model first taught one response by SFT; EI keeps exactly its samples that match the reference."""
    taught = teach(tiny_model_dir, tmp_path)
    # The reference of the second question is 43: its (memorised) "42" samples are formatted but wrong.
    train = write_questions(tmp_path / "train.jsonl", ["42", "43", "42"])
    run_dir = run_expert_iteration(ei_config(taught, train, train, tmp_path / "run", n_ei_steps=2,
                                             sampling_max_tokens=24, eval_max_new_tokens=24, eval_examples=3))
    train_lines = [m for m in read_jsonl(run_dir / "metrics.jsonl") if m["kind"] == "train"]
    for step, line in zip((1, 2), train_lines):
        rollouts = read_jsonl(run_dir / f"ei-step-{step}" / "rollouts.jsonl")
        correct = [r for r in rollouts if r["category"] == "correct"]
        assert len(correct) >= 2, rollouts  # the taught model answers 42 nearly always
        assert all(r["ground_truth"] == "42" and r["prompt"] != PROMPTS[1] for r in correct)
        # Exactly the correct samples were trained on, in memory: batch 2, one epoch.
        assert line["kept"] == len(correct) and line["sft_steps"] == (len(correct) + 1) // 2
        assert line["loss"] is not None and line["lr"] == 1e-3
        assert line["mean_token_nll"] > 0  # the per-token number the report plots beside a summed loss
    assert not list(run_dir.glob("ei-step-*/sft"))  # no per-step SFT run directory written and read back
    final, before = load_file(run_dir / "final" / "model.safetensors"), load_file(taught / "model.safetensors")
    assert any(not torch.equal(final[k], before[k]) for k in before)
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
    assert "base (selection split) ->" in capsys.readouterr().out
