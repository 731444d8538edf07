"""--async-steps: which weights sample which step, the ratio against the behaviour policy, and K = 0 being on-policy."""

from __future__ import annotations

import dataclasses
import json
import threading

import pytest
import torch

from reasontune.config import check_config
from reasontune.logprobs import get_response_log_probs
from reasontune.modeling import load_model
from reasontune.training.optimizer_step import clip_and_step
from reasontune.training.grpo import GRPOConfig, run_grpo, setup_grpo, train_step
from reasontune.training.grpo_rollouts import RolloutPipeline, rank_train_batches, rollout_batch, training_microbatches


def _questions(path, count: int):
    path.write_text("".join(json.dumps({"question": f"What is 12 + {i}?", "answer": str(12 + i)}) + "\n"
                            for i in range(count)))
    return path


@pytest.fixture(autouse=True)
def reward(varied_reward) -> str:
    return varied_reward


def _config(tiny_model_dir, tmp_path, **overrides) -> GRPOConfig:
    values = dict(model=str(tiny_model_dir), reward="length_reward:reward", train_data=str(_questions(tmp_path / "q.jsonl", 12)),
                  output_dir=str(tmp_path / "run"), n_grpo_steps=4, rollout_batch_size=4, group_size=2,
                  train_batch_size=4, gradient_accumulation_steps=2, loss_type="grpo_clip", learning_rate=5e-3,
                  sampling_min_tokens=1, sampling_max_tokens=6, sampling_temperature=1.0, grading_workers=0,
                  num_threads=1, progress=False, write_report=False, eval_examples=0)
    values.update(overrides)
    return GRPOConfig(**values)


def _weights(model) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def _update(session, batch) -> None:
    for train_batch in batch.train_batches:
        metrics = train_step(session.model, train_batch, session.config, session.device)
        clip_and_step(session.model, session.optimizer, session.scheduler, session.config.max_grad_norm, metrics["loss"])


def test_each_step_samples_from_the_weights_k_steps_back_and_its_ratio_is_against_them(tiny_model_dir, tmp_path):
    """K = 2 over 5 real updates: step s's rollouts and old log-probs are those of the weights after step max(s - 3, 0)."""
    config = _config(tiny_model_dir, tmp_path, async_steps=2, n_grpo_steps=5)
    session = setup_grpo(config)
    versions = {0: _weights(session.model)}  # weights after each step, by step
    pipeline = RolloutPipeline(session, first_step=1, last_step=config.n_grpo_steps)
    try:
        for step in range(1, config.n_grpo_steps + 1):
            batch, _ = pipeline.take(step)
            assert batch.policy_version == max(step - 1 - 2, 0)
            pipeline.drain()  # the background thread idle: the generator and the RNG are ours to check with
            behaviour = load_model(str(tiny_model_dir))
            behaviour.load_state_dict(versions[batch.policy_version])
            # The same seeded sampling from the recorded version reproduces the step's rollouts token for token.
            again, _ = rollout_batch(session, step, behaviour)
            assert ([c.token_ids for c in again.flat_completions()]
                    == [c.token_ids for c in batch.rollouts.flat_completions()])
            # The old log-probs are the behaviour weights' own (independently recomputed), not the current policy's.
            for train_batch in batch.train_batches:
                for mb in train_batch:
                    with torch.no_grad():
                        expected = get_response_log_probs(behaviour, mb["input_ids"], mb["labels"],
                                                          response_mask=mb["response_mask"])["log_probs"]
                        current = get_response_log_probs(session.model, mb["input_ids"], mb["labels"],
                                                         response_mask=mb["response_mask"])["log_probs"]
                    mask = mb["response_mask"]
                    torch.testing.assert_close(mb["old_log_probs"][mask], expected[mask], rtol=0, atol=1e-6)
                    if step - 1 > batch.policy_version:  # stale: the policy has moved since, visibly
                        assert (current[mask] - expected[mask]).abs().max() > 1e-4
            _update(session, batch)
            versions[step] = _weights(session.model)
            pipeline.updated(step)
    finally:
        pipeline.close()
    assert not pipeline.pending


def test_async_steps_zero_is_the_on_policy_loop_and_runs_nothing_in_the_background(tiny_model_dir, tmp_path):
    """K = 0 through run_grpo ends with bit-identical weights to an on-policy loop written out from the primitives."""
    config = _config(tiny_model_dir, tmp_path, async_steps=0, n_grpo_steps=3, loss_type="reinforce_with_baseline")
    threads_before = threading.active_count()
    run_dir = run_grpo(config)
    assert threading.active_count() == threads_before
    trained = load_model(str(run_dir / "final"))

    # The reference: sample from the current policy, advantages, microbatches, one update, per step.
    session = setup_grpo(dataclasses.replace(config, output_dir=str(tmp_path / "reference")))
    for step in range(1, config.n_grpo_steps + 1):
        rollouts, _ = rollout_batch(session, step)
        microbatches, _ = training_microbatches(session, rollouts)
        for train_batch in rank_train_batches(session, microbatches):
            metrics = train_step(session.model, train_batch, config, session.device)
            clip_and_step(session.model, session.optimizer, session.scheduler, config.max_grad_norm, metrics["loss"])
    reference = session.model.state_dict()
    for name, tensor in trained.state_dict().items():
        assert torch.equal(tensor, reference[name]), name


def test_async_run_logs_versions_staleness_and_waits(tiny_model_dir, tmp_path):
    config = _config(tiny_model_dir, tmp_path, async_steps=1, n_grpo_steps=4, save_every=2, rollout_correction="token_tis")
    run_dir = run_grpo(config)
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in lines if r["kind"] == "train"]
    assert [r["policy_version"] for r in train] == [0, 0, 1, 2]
    assert [r["staleness"] for r in train] == [0, 1, 1, 1]
    for record in train:
        assert record["rollout_wait_s"] >= 0 and record["rollout_s"] > 0
        # Old log-probs are the behaviour weights' under the trainer's numerics: the engine (HF, same weights and
        # temperature) agrees with them up to its EOS suppression before --sampling-min-tokens.
        assert record["mismatch_max_abs_log_ratio"] < 0.05
    assert (run_dir / "checkpoint-2").is_dir() and (run_dir / "final").is_dir()
    assert json.loads((run_dir / "config.json").read_text())["async_steps"] == 1


def test_async_steps_needs_an_importance_ratio_and_a_non_negative_count():
    with pytest.raises(SystemExit, match="async-steps > 0"):
        check_config(GRPOConfig(train_data="q", async_steps=1, loss_type="reinforce_with_baseline"), environment=False)
    with pytest.raises(SystemExit, match="--async-steps: must be >= 0"):
        check_config(GRPOConfig(train_data="q", async_steps=-1, loss_type="grpo_clip"), environment=False)
    check_config(GRPOConfig(train_data="q", async_steps=2, loss_type="cispo", cliprange_high=0.2), environment=False)


@pytest.mark.slow
def test_async_grpo_on_two_ranks_is_deterministic_and_as_stale_as_asked(tiny_model_dir, tmp_path):
    """torchrun x 2 with --async-steps 1: two launches end with the same weights, bit for bit (timing decides nothing)."""
    from test_distributed import launch
    from test_distributed_cli import final_weights, train_metrics

    data = _questions(tmp_path / "q.jsonl", 12)
    flags = ["-m", "reasontune", "grpo", "--model", str(tiny_model_dir), "--train-data", str(data),
             "--reward", "length_reward:reward", "--n-grpo-steps", "3", "--rollout-batch-size", "4", "--group-size", "2",
             "--train-batch-size", "4", "--gradient-accumulation-steps", "1", "--loss-type", "grpo_clip",
             "--async-steps", "1", "--learning-rate", "5e-3", "--sampling-min-tokens", "1", "--sampling-max-tokens", "6",
             "--grading-workers", "0", "--num-threads", "1", "--no-progress", "--no-write-report", "--device", "cpu",
             "--dtype", "float32"]
    runs = []
    for name in ("a", "b"):
        result = launch([*flags, "--output-dir", str(tmp_path / name)], world_size=2, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        runs.append(tmp_path / name)
    train = train_metrics(runs[0])
    assert [line["policy_version"] for line in train] == [0, 0, 1]
    assert [line["staleness"] for line in train] == [0, 1, 1]
    assert [line["reward"] for line in train] == [line["reward"] for line in train_metrics(runs[1])]
    first, second = final_weights(runs[0]), final_weights(runs[1])
    assert first.keys() == second.keys()
    for name, tensor in first.items():
        assert torch.equal(tensor, second[name]), name
