"""The SFT trainer: schedule, plan, exact resume after kill -9, NaN stop, run directory contents."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from reasontune.config import load_config
from reasontune.training.optimizer_step import TrainingDiverged
from reasontune.training.sft import SFTConfig, learning_rate_lambda, run_sft, setup_sft


def write_sft_data(path: Path, count: int = 40) -> Path:
    with open(path, "w") as handle:
        for i in range(count):
            a, b = 7 * i + 3, 11 * i + 5
            record = {"prompt": f"User: What is {a} + {b}? Assistant: <think>",
                      "response": f" {a} + {b} = {a + b} </think> <answer>{a + b}</answer>",
                      "ground_truth": str(a + b)}
            handle.write(json.dumps(record) + "\n")
    return path


def sft_args(model_dir: Path, data: Path, output_dir: Path, *extra: str) -> list[str]:
    return ["sft", "--model", str(model_dir), "--train-data", str(data), "--output-dir", str(output_dir),
            "--batch-size", "4", "--gradient-accumulation-steps", "2", "--learning-rate", "3e-3",
            "--num-epochs", "2", "--max-length", "64", "--num-threads", "1", "--no-progress",
            "--no-write-report", "--warmup-ratio", "0.2", *extra]


def test_learning_rate_schedule_hand_values():
    config = SFTConfig(train_data="x", warmup_ratio=0.2, lr_scheduler="cosine", min_lr_ratio=0.1)
    multiplier = learning_rate_lambda(config, total_steps=10)  # 2 warmup steps, then 8 of cosine
    assert [multiplier(0), multiplier(1)] == pytest.approx([0.5, 1.0])
    assert multiplier(2) == pytest.approx(1.0)
    # step 6: progress 4/8 -> cosine factor 0.5 -> 0.1 + 0.9 * 0.5
    assert multiplier(6) == pytest.approx(0.55)
    linear = learning_rate_lambda(SFTConfig(train_data="x", warmup_ratio=0.0, lr_scheduler="linear"), 4)
    assert [linear(s) for s in range(4)] == pytest.approx([1.0, 0.75, 0.5, 0.25])


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "final" / "model.safetensors")


def test_kill_minus_nine_then_resume_reproduces_uninterrupted_run(tiny_model_dir, tmp_path):
    data = write_sft_data(tmp_path / "train.jsonl")
    from reasontune.cli import main

    # The uninterrupted reference run.
    assert main(sft_args(tiny_model_dir, data, tmp_path / "straight")) == 0
    reference = final_weights(tmp_path / "straight")
    # 40 examples / (4 x 2) = 5 steps an epoch, 10 steps in all.
    assert json.loads((tmp_path / "straight" / "final" / "config.json").read_text())["model_type"] == "qwen2"

    # The same run in a subprocess, killed with SIGKILL once checkpoint-4 exists.
    interrupted = tmp_path / "interrupted"
    command = [sys.executable, "-m", "reasontune.cli", *sft_args(tiny_model_dir, data, interrupted, "--save-every", "2")]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (interrupted / "checkpoint-4" / "trainer_state.json").exists():
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline, "no checkpoint-4 within the time limit"
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (interrupted / "final").exists(), "killed too late to test anything"

    assert main(sft_args(tiny_model_dir, data, interrupted, "--save-every", "2", "--resume")) == 0
    resumed = final_weights(interrupted)
    assert resumed.keys() == reference.keys()
    for name in reference:
        assert torch.equal(resumed[name], reference[name]), f"{name} differs after resume"
    # metrics.jsonl has each train step once, in order, after the resume truncated the rest.
    steps = [json.loads(line)["step"] for line in (interrupted / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert steps == list(range(1, 11))
    # The resolved config loads back equal.
    config = load_config(interrupted / "config.json", SFTConfig)
    assert config.resume and config.learning_rate == 3e-3 and config.loss_aggregation == "sequence_sum"


def test_divergence_stops_with_a_usable_checkpoint(tiny_model_dir, tmp_path):
    data = write_sft_data(tmp_path / "train.jsonl", count=16)
    config = SFTConfig(model=str(tiny_model_dir), train_data=str(data), output_dir=str(tmp_path / "run"),
                       batch_size=4, gradient_accumulation_steps=1, learning_rate=1e30, max_grad_norm=0.0,
                       warmup_ratio=0.0, lr_scheduler="constant", num_epochs=3, progress=False,
                       write_report=False, num_threads=1)
    with pytest.raises(TrainingDiverged, match="not finite") as failure:
        run_sft(config)
    checkpoints = sorted((tmp_path / "run").glob("checkpoint-*"))
    assert checkpoints, "no checkpoint was written on divergence"
    weights = load_file(checkpoints[-1] / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert str(checkpoints[-1]) in str(failure.value)
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(e["kind"] == "event" and "not finite" in e["message"] for e in events)


def test_existing_run_dir_is_not_overwritten_silently(tiny_model_dir, tmp_path):
    data = write_sft_data(tmp_path / "train.jsonl", count=8)
    config = SFTConfig(model=str(tiny_model_dir), train_data=str(data), output_dir=str(tmp_path / "run"),
                       batch_size=4, gradient_accumulation_steps=1, max_steps=1, progress=False,
                       write_report=False, num_threads=1)
    run_sft(config)
    with pytest.raises(SystemExit, match="already holds a run"):
        run_sft(config)


def test_truncation_drops_and_counts_examples_whose_response_is_cut_away(tiny_model_dir, tmp_path):
    from reasontune.data import load_examples
    from reasontune.modeling import load_tokenizer
    from reasontune.training.sft import tokenize_examples

    records = [{"prompt": "Q: 1+1?", "response": " 2 </think> <answer>2</answer>"},
               {"prompt": "Q: what is the sum of twelve and thirty, in words?", "response": " forty-two"},
               {"prompt": "Q: 12+30?", "response": " 12 + 30 = 42, since 10 + 30 = 40 and 40 + 2 = 42; so it is 42 </think> <answer>42</answer>"}]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    tokenizer = load_tokenizer(str(tiny_model_dir))
    prompt_lengths = [len(tokenizer(r["prompt"])["input_ids"]) for r in records]
    total_lengths = [p + len(tokenizer(r["response"], add_special_tokens=False)["input_ids"])
                     for p, r in zip(prompt_lengths, records)]
    cap = prompt_lengths[1]  # the long prompt fills the cap: its response is cut away entirely
    assert prompt_lengths[0] < cap and prompt_lengths[2] < cap < total_lengths[2]
    tokenized = tokenize_examples(load_examples(data).examples, tokenizer, "{question}", max_length=cap)
    assert tokenized.counts["dropped_response_truncated_away"] == 1
    assert tokenized.counts["truncated"] == sum(n > cap for n in total_lengths)
    assert tokenized.counts["trained_examples"] == 2
    assert [len(p) for p in tokenized.prompt_ids] == [prompt_lengths[0], prompt_lengths[2]]
    assert all(1 <= len(o) and len(p) + len(o) <= cap for p, o in zip(tokenized.prompt_ids, tokenized.output_ids))


def test_run_directory_holds_config_metrics_evals_checkpoints_and_report(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    data = write_sft_data(tmp_path / "train.jsonl", count=24)
    config = SFTConfig(model=str(tiny_model_dir), train_data=str(data), output_dir=str(tmp_path / "run"),
                       batch_size=4, gradient_accumulation_steps=2, learning_rate=1e-3, max_length=64,
                       val_fraction=0.25, eval_examples=4, eval_every=1, eval_max_new_tokens=6, save_every=2,
                       save_total_limit=1, progress=False, num_threads=1, packing=True, tokens_per_batch=126)
    run_dir = run_sft(config)
    # 18 training examples packed into rows of 63 tokens; 6 held out for evaluation.
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    data_line = next(r for r in records if r["kind"] == "data")
    assert data_line["train_examples"] == 18 and data_line["validation_examples"] == 4
    assert data_line["loss_aggregation"] == "sequence_sum"
    train_steps = [r["step"] for r in records if r["kind"] == "train"]
    eval_steps = [r["step"] for r in records if r["kind"] == "eval"]
    assert train_steps == list(range(1, len(train_steps) + 1))
    assert eval_steps == list(range(0, len(train_steps) + 1))  # before training, each step, and after
    assert all(r["mean_response_tokens"] > 0 for r in records if r["kind"] == "eval")
    assert sum(r["examples"] for r in records if r["kind"] == "train") == 18
    for step in eval_steps:
        summary = json.loads((run_dir / "eval" / f"step-{step:06d}" / "summary.json").read_text())
        assert 0.0 <= summary["accuracy"] <= summary["format_rate"] <= 1.0 and summary["n_examples"] == 4
        assert len((run_dir / "eval" / f"step-{step:06d}" / "records.jsonl").read_text().splitlines()) == 4
    checkpoints = sorted(p.name for p in run_dir.glob("checkpoint-*"))
    assert len(checkpoints) == 1  # save_total_limit
    model = AutoModelForCausalLM.from_pretrained(run_dir / "final")
    assert model.config.model_type == "qwen2"
    assert (run_dir / "report" / "index.html").exists() and (run_dir / "report" / "loss.png").exists()


def test_resume_with_more_max_steps_follows_the_new_schedule_from_its_first_step(tiny_model_dir, tmp_path):
    data = write_sft_data(tmp_path / "train.jsonl", count=16)  # 16 examples / batch 4 = 4 steps an epoch
    peak = 3e-3

    def config(max_steps: int, resume: bool) -> SFTConfig:
        return SFTConfig(model=str(tiny_model_dir), train_data=str(data), output_dir=str(tmp_path / "run"),
                         batch_size=4, gradient_accumulation_steps=1, learning_rate=peak, lr_scheduler="cosine",
                         warmup_ratio=0.0, max_steps=max_steps, resume=resume, progress=False,
                         write_report=False, num_threads=1, max_length=64)

    run_sft(config(2, resume=False))
    # Cosine over 4 steps without warmup, by hand: step s (0-based) has peak * (1 + cos(pi * s / 4)) / 2.
    # The saved 2-step schedule would give step 3 (s = 2) peak * (1 + cos(pi)) / 2 = 0.
    expected = {3: peak * 0.5, 4: peak * (1 + math.cos(3 * math.pi / 4)) / 2}

    session = setup_sft(config(4, resume=True))
    assert session.start_step == 2
    assert [group["lr"] for group in session.optimizer.param_groups] == pytest.approx([expected[3]], rel=1e-12)
    assert session.scheduler.get_last_lr() == pytest.approx([expected[3]], rel=1e-12)
    session.logger.close()
    session.stop.disarm()

    run_sft(config(4, resume=True))
    logged = {line["step"]: line["lr"] for line in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
              if line["kind"] == "train"}
    assert [logged[1], logged[2]] == pytest.approx([peak, peak * 0.5])  # the 2-step run's schedule: (1 + cos(pi * s / 2)) / 2
    assert {step: logged[step] for step in (3, 4)} == pytest.approx(expected, rel=1e-12)
