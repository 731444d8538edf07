"""GRPO: the config's invariants, one policy-gradient step on a real tiny model, the KL penalty, a run end to end."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from reasontune.losses import compute_group_normalized_rewards, compute_k3_kl, grpo_microbatch_train_step
from reasontune.training.grpo import GRPOConfig, add_log_probs, rollout_microbatches, run_grpo, train_step

torch.set_num_threads(1)
CPU = torch.device("cpu")


def _grads(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


def _config(**overrides) -> GRPOConfig:
    base = dict(train_data="unused.jsonl", rollout_batch_size=4, group_size=2, train_batch_size=4,
                gradient_accumulation_steps=2, sampling_max_tokens=8, loss_type="reinforce_with_baseline")
    return GRPOConfig(**{**base, **overrides})


# Two questions, two responses each: 4 and 7 response tokens in the first group, 5 and 3 in the second.
PROMPTS = [[5, 9, 13], [5, 9, 13], [21, 8, 40, 2], [21, 8, 40, 2]]
RESPONSES = [[30, 31, 32, 33], [60, 61, 62, 63, 64, 65, 66], [70, 71, 72, 73, 74], [80, 81, 82]]
PAD = 96


def _microbatches(raw_rewards: list[float], micro: int, use_std: bool = True) -> list[dict]:
    table = iter(raw_rewards)
    advantages, raw, _ = compute_group_normalized_rewards(lambda response, truth: {"reward": next(table)},
                                                          ["r"] * 4, ["t"] * 4, 2, 1e-6, use_std)
    return rollout_microbatches(PROMPTS, RESPONSES, advantages, raw, micro, PAD)


def _response_log_prob_sums(model, microbatches) -> list[float]:
    add_log_probs(model, microbatches, "probe", CPU)
    return [float(row.sum()) for mb in microbatches for row in mb.pop("probe")]


def test_config_invariants_have_clear_errors():
    _config().validate()
    cases = [
        (dict(train_batch_size=4, gradient_accumulation_steps=3), "divisible by --gradient-accumulation-steps"),
        (dict(rollout_batch_size=6, group_size=4, train_batch_size=6, gradient_accumulation_steps=1),
         "divisible by --group-size"),
        (dict(rollout_batch_size=8, group_size=8, train_batch_size=4, loss_type="grpo_clip"), "at least --group-size"),
        (dict(rollout_batch_size=6, group_size=2, train_batch_size=4, gradient_accumulation_steps=1,
              loss_type="grpo_clip"), "divisible by the microbatch size"),
        (dict(loss_type="grpo_clip", cliprange=None), "grpo_clip needs --cliprange"),
        (dict(epochs_per_rollout_batch=2), "off-policy"),
        (dict(train_batch_size=2, gradient_accumulation_steps=1), "off-policy"),
        (dict(sampling_min_tokens=0), "sampling-min-tokens"),
        (dict(train_data=""), "--train-data: required"),
    ]
    for overrides, message in cases:
        with pytest.raises(SystemExit, match=message):
            _config(**overrides).validate()
    assert _config(train_batch_size=2, gradient_accumulation_steps=1, loss_type="grpo_clip").off_policy
    assert not _config().off_policy


def test_one_step_raises_rewarded_and_lowers_penalised_responses(tiny_qwen2):
    # Group 1: rewards 1 and 0 → advantages +0.707 / -0.707 (std of {1, 0} is 0.707, unbiased);
    # group 2: both 0 → advantage 0, no gradient from it.
    microbatches = _microbatches([1.0, 0.0, 0.0, 0.0], micro=2)
    torch.testing.assert_close(torch.cat([mb["advantages"] for mb in microbatches]),
                               torch.tensor([0.5 / math.sqrt(0.5), -0.5 / math.sqrt(0.5), 0.0, 0.0]), atol=1e-5, rtol=0)
    before = _response_log_prob_sums(tiny_qwen2, microbatches)
    optimizer = torch.optim.SGD(tiny_qwen2.parameters(), lr=0.5)
    train_step(tiny_qwen2, microbatches, _config(), CPU)
    optimizer.step()
    after = _response_log_prob_sums(tiny_qwen2, microbatches)
    assert after[0] > before[0] + 1e-3, "the rewarded response became more likely"
    assert after[1] < before[1] - 1e-3, "the penalised response became less likely"


def test_on_policy_grpo_clip_equals_reinforce_with_baseline_on_a_real_model(tiny_qwen2):
    """One epoch, train batch = rollout batch: old log-probs are the current ones, the ratio is 1, the clip inactive."""
    microbatches = _microbatches([1.0, 0.0, 0.0, 1.0], micro=2)
    tiny_qwen2.zero_grad()
    clip_metrics = train_step(tiny_qwen2, microbatches, _config(loss_type="grpo_clip", cliprange=0.2), CPU)
    clip_grads = _grads(tiny_qwen2)
    tiny_qwen2.zero_grad()
    train_step(tiny_qwen2, microbatches, _config(loss_type="reinforce_with_baseline"), CPU)
    baseline_grads = _grads(tiny_qwen2)
    assert clip_metrics["clip_fraction"] == 0.0 and len(clip_grads) > 5
    for name in baseline_grads:
        torch.testing.assert_close(clip_grads[name], baseline_grads[name], rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("aggregation", ["sequence_mean", "sequence_sum_constant", "token_mean"])
def test_train_step_accumulation_equivalence_per_aggregation(tiny_qwen2, aggregation):
    """(microbatch 4, accumulation 1) and (microbatch 1, accumulation 4) give the same gradient for each aggregation.

    token_mean only matches because the trainer passes tokens_in_step = 19 (4 + 7 + 5 + 3) to
    every microbatch; each microbatch's own count would weight a 3-token response like a 7-token one.
    """
    config = _config(loss_aggregation=aggregation)
    whole = _microbatches([1.0, 0.0, 0.0, 1.0], micro=4)
    split = _microbatches([1.0, 0.0, 0.0, 1.0], micro=1)
    tiny_qwen2.zero_grad()
    one = train_step(tiny_qwen2, whole, dataclasses.replace(config, gradient_accumulation_steps=1, train_batch_size=4), CPU)
    grads_one = _grads(tiny_qwen2)
    tiny_qwen2.zero_grad()
    four = train_step(tiny_qwen2, split, dataclasses.replace(config, gradient_accumulation_steps=4, train_batch_size=4), CPU)
    grads_four = _grads(tiny_qwen2)
    assert one["response_tokens"] == four["response_tokens"] == 19
    assert four["loss"] == pytest.approx(one["loss"], rel=1e-5, abs=1e-7)
    for name in grads_one:
        torch.testing.assert_close(grads_four[name], grads_one[name], rtol=1e-4, atol=1e-7)


def test_k3_kl_hand_values_and_gradient():
    # ref - policy = ln 2 → k3 = 2 - ln 2 - 1 = 0.30685; d k3 / d policy = 1 - 2 = -1.
    # ref = policy → k3 = 0 and d k3 / d policy = 0.
    policy = torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True)
    reference = torch.tensor([[-1.0 + math.log(2.0), -2.0, 7.0]])
    mask = torch.tensor([[True, True, False]])
    kl = compute_k3_kl(policy, reference)
    assert kl[0, 0].item() == pytest.approx(1.0 - math.log(2.0))
    assert kl[0, 1].item() == 0.0
    # No advantage: the loss is the KL alone, kl_coef 0.5, sequence mean over 2 tokens.
    loss, metadata = grpo_microbatch_train_step(policy, mask, 1, "reinforce_with_baseline",
                                                advantages=torch.zeros(1), ref_log_probs=reference, kl_coef=0.5)
    assert loss.item() == pytest.approx(0.5 * (1.0 - math.log(2.0)) / 2)
    assert metadata["kl"].item() == pytest.approx((1.0 - math.log(2.0)) / 2)
    torch.testing.assert_close(policy.grad, torch.tensor([[0.5 * -1.0 / 2, 0.0, 0.0]]))
    with pytest.raises(ValueError, match="needs ref_log_probs"):
        grpo_microbatch_train_step(policy, mask, 1, "reinforce_with_baseline", advantages=torch.zeros(1), kl_coef=0.1)


def test_kl_penalty_against_an_identical_reference_is_zero_with_zero_gradient(tiny_qwen2):
    microbatches = _microbatches([1.0, 0.0, 0.0, 1.0], micro=2)
    reference = copy.deepcopy(tiny_qwen2).requires_grad_(False)
    add_log_probs(reference, microbatches, "ref_log_probs", CPU)
    tiny_qwen2.zero_grad()
    with_kl = train_step(tiny_qwen2, microbatches, _config(kl_coef=0.5), CPU)
    grads_kl = _grads(tiny_qwen2)
    tiny_qwen2.zero_grad()
    without = train_step(tiny_qwen2, [{k: v for k, v in mb.items() if k != "ref_log_probs"} for mb in microbatches],
                         _config(), CPU)
    assert with_kl["kl"] == pytest.approx(0.0, abs=1e-6)
    assert with_kl["loss"] == pytest.approx(without["loss"], abs=1e-7)
    for name, grad in _grads(tiny_qwen2).items():
        torch.testing.assert_close(grads_kl[name], grad, rtol=1e-5, atol=1e-8)


def _write_questions(path: Path, count: int) -> Path:
    with path.open("w") as handle:
        for i in range(count):
            handle.write(json.dumps({"question": f"What is 12 + {i}?", "answer": str(12 + i)}) + "\n")
    return path


def test_run_grpo_writes_metrics_evals_checkpoints_and_final(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    data = _write_questions(tmp_path / "questions.jsonl", 8)
    # Off-policy grpo_clip (train batch 2 of a rollout batch 4, two epochs) with a KL penalty: every path at once.
    config = GRPOConfig(model=str(tiny_model_dir), train_data=str(data), val_data=str(data), output_dir=str(tmp_path / "run"),
                        n_grpo_steps=2, rollout_batch_size=4, group_size=2, train_batch_size=2,
                        gradient_accumulation_steps=2, epochs_per_rollout_batch=2, loss_type="grpo_clip",
                        kl_coef=0.1, learning_rate=1e-3, sampling_min_tokens=1, sampling_max_tokens=5,
                        eval_every=1, eval_examples=3, eval_max_new_tokens=5, save_every=1, grading_workers=0,
                        num_threads=1, progress=False, write_report=True)
    run_dir = run_grpo(config)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2]
    for record in train:
        assert record["optimizer_steps"] == 4  # 2 train batches x 2 epochs
        for key in ("loss", "lr", "grad_norm", "token_entropy", "clip_fraction", "kl", "reward", "format_reward",
                    "answer_reward", "mean_response_tokens", "accuracy", "truncated_fraction"):
            assert record[key] is not None and math.isfinite(record[key]), key
        assert 1 <= record["mean_response_tokens"] <= 5
    assert [r["step"] for r in records if r["kind"] == "eval"] == [0, 1, 2]
    for step in (0, 1, 2):
        summary = json.loads((run_dir / "eval" / f"step-{step:06d}" / "summary.json").read_text())
        assert summary["n_examples"] == 3
    assert (run_dir / "checkpoint-1" / "trainer_state.json").exists()
    assert AutoModelForCausalLM.from_pretrained(run_dir / "final").config.model_type == "qwen2"
    assert json.loads((run_dir / "config.json").read_text())["loss_type"] == "grpo_clip"
    assert (run_dir / "report" / "index.html").exists()


def test_recipe_fills_what_was_not_given_and_flags_win():
    from reasontune.cli import build_parser
    from reasontune.config import config_from_namespace

    args = ["grpo", "--train-data", "q.jsonl", "--recipe", "dapo", "--cliprange-high", "0.3", "--group-size", "8"]
    namespace = build_parser("grpo").parse_args(args)
    config = config_from_namespace(argparse_namespace(namespace), GRPOConfig)
    # DAPO (arXiv 2503.14476): clip-higher 0.2 / 0.28, token-mean loss, dynamic sampling, overlong shaping, no KL
    assert (config.loss_type, config.cliprange, config.loss_aggregation) == ("grpo_clip", 0.2, "token_mean")
    assert config.dynamic_sampling and config.overlong_buffer_fraction == 0.2 and config.kl_coef == 0.0
    assert config.cliprange_high == 0.3  # the flag given beats the recipe's 0.28
    assert GRPOConfig.from_recipe("dr_grpo", train_data="q").advantage_std == "none"
    assert GRPOConfig.from_recipe("rloo", train_data="q").advantage_baseline == "leave_one_out"
    with pytest.raises(SystemExit, match="cliprange-high"):
        GRPOConfig(train_data="q", loss_type="grpo_clip", cliprange=0.2, cliprange_high=0.1).validate()


def argparse_namespace(namespace):
    import argparse

    return argparse.Namespace(**{k: v for k, v in vars(namespace).items() if k != "command"})


def test_trainer_log_probs_at_the_sampling_temperature_match_the_generator(tiny_model_dir):
    """The rollout-engine contract on CPU: HF sampling at T = 0.7 (top-p 1) and the trainer's log-probs at T agree."""
    from reasontune.generation import SamplingOptions
    from reasontune.generation.hf import HFGenerator
    from reasontune.logprobs import get_response_log_probs
    from reasontune.losses import rollout_mismatch_metrics
    from reasontune.modeling import load_model, load_tokenizer
    from reasontune.tokenization import pad_and_shift

    model, tokenizer = load_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))
    prompts = ["What is 12 + 3?", "What is 12 + 4?"]
    groups = HFGenerator(model, tokenizer).generate(prompts, SamplingOptions(temperature=0.7, max_new_tokens=6, stop=(),
                                                                             n=2, seed=1, return_logprobs=True))
    completions = [c for g in groups for c in g]
    prompt_ids = [ids for ids in tokenizer(prompts)["input_ids"] for _ in range(2)]
    batch = pad_and_shift(prompt_ids, [c.token_ids for c in completions], tokenizer.pad_token_id)
    behaviour = torch.zeros(batch["labels"].shape)
    behaviour[batch["response_mask"]] = torch.tensor([lp for c in completions for lp in c.logprobs])
    with torch.no_grad():
        at_t = get_response_log_probs(model, batch["input_ids"], batch["labels"], response_mask=batch["response_mask"],
                                      temperature=0.7)["log_probs"]
        at_one = get_response_log_probs(model, batch["input_ids"], batch["labels"],
                                        response_mask=batch["response_mask"])["log_probs"]
    matched = rollout_mismatch_metrics(at_t, behaviour, batch["response_mask"])
    assert matched["mismatch_max_abs_log_ratio"] < 1e-4 and matched["mismatch_token_ess"] > 0.9999
    # Against temperature-1 log-probs the same tokens disagree: the mismatch figures can see a wrong contract.
    assert rollout_mismatch_metrics(at_one, behaviour, batch["response_mask"])["mismatch_max_abs_log_ratio"] > 1e-2


def test_dapo_recipe_run_logs_clip_fractions_mismatch_and_dynamic_sampling(tiny_model_dir, tmp_path):
    data = _write_questions(tmp_path / "questions.jsonl", 12)
    config = GRPOConfig.from_recipe(
        "dapo", model=str(tiny_model_dir), train_data=str(data), output_dir=str(tmp_path / "run"), n_grpo_steps=2,
        rollout_batch_size=4, group_size=2, train_batch_size=4, gradient_accumulation_steps=2, learning_rate=1e-3,
        sampling_min_tokens=1, sampling_max_tokens=5, sampling_temperature=0.8, rollout_correction="token_tis",
        dynamic_sampling=False, grading_workers=0, num_threads=1, progress=False, write_report=False)
    assert config.overlong_buffer_fraction == 0.2 and config.cliprange_high == 0.28
    run_dir = run_grpo(config)
    train = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2]
    for record in train:
        for key in ("clip_fraction_low", "clip_fraction_high", "mismatch_kl_k3", "mismatch_max_abs_log_ratio",
                    "mismatch_token_ess", "rollout_weight_mean", "groups_kept", "groups_dropped"):
            assert record[key] is not None and math.isfinite(record[key]), key
        # Same weights, same temperature: the only difference is the generator's EOS suppression before
        # --sampling-min-tokens (its first token's distribution renormalised without EOS): small, not zero.
        assert record["mismatch_max_abs_log_ratio"] < 0.05 and abs(record["rollout_weight_mean"] - 1) < 0.05
    # Dynamic sampling with a random model: every group scores 0, so all are dropped and no update happens.
    dynamic = dataclasses.replace(config, dynamic_sampling=True, dynamic_sampling_max_tries=2, n_grpo_steps=1,
                                  output_dir=str(tmp_path / "dyn"))
    run_dir = run_grpo(dynamic)
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    (event,) = [r for r in lines if r["kind"] == "event"]
    assert "equal rewards" in event["message"] and event["dynamic_sampling_tries"] == 2
    assert event["groups_drawn"] == 4 and event["groups_dropped"] == 4


def test_gspo_with_mask_truncated_when_every_response_is_truncated_takes_no_step(tiny_model_dir, tmp_path):
    """Every response cut by the budget and masked out: no NaN, loss 0, no optimizer step (AdamW's weight decay included)."""
    from safetensors.torch import load_file

    data = _write_questions(tmp_path / "questions.jsonl", 8)
    config = GRPOConfig(model=str(tiny_model_dir), train_data=str(data), output_dir=str(tmp_path / "run"),
                        n_grpo_steps=1, rollout_batch_size=4, group_size=2, train_batch_size=4,
                        gradient_accumulation_steps=2, loss_type="gspo", mask_truncated=True, weight_decay=0.1,
                        learning_rate=1e-2, sampling_min_tokens=3, sampling_max_tokens=3, grading_workers=0,
                        num_threads=1, progress=False, write_report=False, eval_before_training=False)
    run_dir = run_grpo(config)
    (train,) = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
                if json.loads(line)["kind"] == "train"]
    assert train["truncated_fraction"] == 1.0  # EOS is forbidden before the 3-token budget: all cut by it
    assert train["loss"] == 0.0 and train["skipped_updates"] == 1 and train["optimizer_steps"] == 0
    assert all(math.isfinite(value) for value in train.values() if isinstance(value, float))
    start = load_file(tiny_model_dir / "model.safetensors")
    final = load_file(run_dir / "final" / "model.safetensors")
    assert all(torch.equal(start[name], final[name]) for name in start)


def test_three_steps_of_all_zero_rewards_warn_what_it_means_and_what_to_check(tiny_model_dir, tmp_path, capsys):
    """A random model never writes '</think> <answer>': every reward 0, every advantage 0, nothing learnt; the run says so."""
    data = _write_questions(tmp_path / "questions.jsonl", 8)
    config = GRPOConfig(model=str(tiny_model_dir), train_data=str(data), output_dir=str(tmp_path / "run"),
                        n_grpo_steps=4, rollout_batch_size=4, group_size=2, train_batch_size=4,
                        gradient_accumulation_steps=2, sampling_min_tokens=1, sampling_max_tokens=3, grading_workers=0,
                        num_threads=1, progress=False, write_report=False, eval_before_training=False)
    run_dir = run_grpo(config)
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in lines if r["kind"] == "train"]
    assert [r["reward"] for r in train] == [0.0] * 4 and [r["nonzero_advantage_fraction"] for r in train] == [0.0] * 4
    (event,) = [r for r in lines if r["kind"] == "event"]  # once for the streak, at its third step
    assert event["step"] == 3 and event["message"].startswith("warning: GRPO steps 1-3: every reward was 0, so every "
                                                               "advantage is 0 and the policy learns nothing")
    for hint in ("prompt template and the reward agree", "references are read", "answers are extracted"):
        assert hint in event["message"]
    assert capsys.readouterr().err.count("warning: GRPO steps 1-3: every reward was 0") == 1
