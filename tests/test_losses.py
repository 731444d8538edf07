"""Masked reductions, SFT and policy-gradient losses against hand-derived values and slow references."""

from __future__ import annotations

import math

import pytest
import torch

from reasontune import (
    compute_group_normalized_rewards,
    compute_grpo_clip_loss,
    compute_naive_policy_gradient_loss,
    compute_policy_gradient_loss,
    get_response_log_probs,
    grpo_microbatch_train_step,
    masked_mean,
    masked_normalize,
    sft_microbatch_train_step,
)

T, F = True, False


def test_masked_normalize_hand_values():
    tensor = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[T, F, T], [F, T, T]])
    # all: (1 + 3 + 5 + 6) / 42 ; rows: (4, 11) / 42 ; columns: (1, 5, 9) / 42
    assert masked_normalize(tensor, mask, 42.0).item() == pytest.approx(15 / 42)
    assert masked_normalize(tensor, mask, 42.0, dim=-1).tolist() == pytest.approx([4 / 42, 11 / 42])
    assert masked_normalize(tensor, mask, 42.0, dim=0).tolist() == pytest.approx([1 / 42, 5 / 42, 9 / 42])


def test_masked_reductions_ignore_nonfinite_masked_entries():
    tensor = torch.tensor([[float("nan"), 2.0], [float("-inf"), 4.0]])
    mask = torch.tensor([[F, T], [F, T]])
    assert masked_normalize(tensor, mask, 3.0).item() == pytest.approx(2.0)
    assert masked_mean(tensor, mask).item() == pytest.approx(3.0)


def test_masked_mean_hand_values():
    tensor = torch.tensor([[1.0, 2.0, 3.0, 10.0], [4.0, 5.0, 6.0, 20.0]])
    mask = torch.tensor([[T, T, F, F], [T, T, T, F]])
    assert masked_mean(tensor, mask).item() == pytest.approx((1 + 2 + 4 + 5 + 6) / 5)
    assert masked_mean(tensor, mask, dim=1).tolist() == pytest.approx([1.5, 5.0])
    assert masked_mean(tensor, mask, dim=0).tolist()[:3] == pytest.approx([2.5, 3.5, 6.0])
    assert math.isnan(masked_mean(tensor, mask, dim=0)[3].item())  # empty column: 0 / 0


def test_sft_microbatch_step_hand_values_and_gradient():
    log_probs = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.25, -4.0]], requires_grad=True)
    mask = torch.tensor([[F, T, T], [T, T, F]])
    loss, meta = sft_microbatch_train_step(log_probs, mask, gradient_accumulation_steps=3, normalize_constant=7.0)
    # per-sequence sums 5 and 0.75, / 7, batch mean, / 3 accumulation
    expected = ((5.0 / 7 + 0.75 / 7) / 2) / 3
    assert loss.item() == pytest.approx(expected)
    # d loss / d log_prob = -1 / (7 * 2 * 3) on masked entries, 0 elsewhere
    g = -1.0 / 42
    torch.testing.assert_close(log_probs.grad, torch.tensor([[0, g, g], [g, g, 0]]))
    assert meta["masked_nll_sum"].item() == pytest.approx(5.75)
    assert meta["num_response_tokens"].item() == 4


def test_sft_token_mean_and_examples_in_step():
    log_probs = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.25, -4.0]], requires_grad=True)
    mask = torch.tensor([[F, T, T], [T, T, F]])
    loss, _ = sft_microbatch_train_step(log_probs, mask, 2, normalization="token_mean", tokens_in_step=10)
    assert loss.item() == pytest.approx(5.75 / 10)
    assert log_probs.grad[0, 1].item() == pytest.approx(-0.1)
    log_probs.grad = None
    loss, _ = sft_microbatch_train_step(log_probs, mask, 2, normalization="token_mean")  # own count x accumulation
    assert loss.item() == pytest.approx(5.75 / (4 * 2))
    log_probs.grad = None
    loss, _ = sft_microbatch_train_step(log_probs, mask, 99, normalize_constant=2.0, examples_in_step=5)
    assert loss.item() == pytest.approx(5.75 / 2 / 5)  # accumulation already inside examples_in_step
    with pytest.raises(ValueError, match="same shape"):
        sft_microbatch_train_step(log_probs, mask[:, :2], 1)
    with pytest.raises(ValueError, match="unknown loss aggregation"):
        sft_microbatch_train_step(log_probs, mask, 1, normalization="per_token")


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradient_accumulation_equivalence_on_a_real_model(tiny_qwen2):
    """(batch 8, accumulation 1) and (batch 2, accumulation 4) give the same gradients."""
    generator = torch.Generator().manual_seed(3)
    input_ids = torch.randint(0, 97, (8, 11), generator=generator)
    labels = torch.randint(0, 97, (8, 11), generator=generator)
    mask = torch.rand(8, 11, generator=generator) > 0.4
    mask[:, 5] = True  # at least one response token per row

    def run(micro: int, steps: int):
        tiny_qwen2.zero_grad()
        total = 0.0
        for k in range(steps):
            rows = slice(k * micro, (k + 1) * micro)
            lp = get_response_log_probs(tiny_qwen2, input_ids[rows], labels[rows])["log_probs"]
            loss, _ = sft_microbatch_train_step(lp, mask[rows], steps, normalize_constant=42.0)
            total += loss.item()
        return total, _grads(tiny_qwen2)

    loss_full, grads_full = run(8, 1)
    loss_acc, grads_acc = run(2, 4)
    assert loss_acc == pytest.approx(loss_full, rel=1e-6)
    assert grads_full.keys() == grads_acc.keys() and len(grads_full) > 5
    for name in grads_full:
        torch.testing.assert_close(grads_acc[name], grads_full[name], rtol=1e-5, atol=1e-7)


def test_group_normalized_rewards_hand_values():
    def reward_fn(response, truth):
        value = float(response == truth)
        return {"reward": value, "format_reward": 1.0, "answer_reward": value}

    responses = ["1", "2", "1", "1", "3", "3", "3", "4"]
    truths = ["1"] * 4 + ["3"] * 4
    advantages, raw, meta = compute_group_normalized_rewards(reward_fn, responses, truths, 4, 1e-6, True)
    assert raw.tolist() == [1, 0, 1, 1, 1, 1, 1, 0]
    # each group: mean 0.75, unbiased std sqrt((3 * .25^2 + .75^2) / 3) = 0.5
    centred = [0.25, -0.75, 0.25, 0.25, 0.25, 0.25, 0.25, -0.75]
    expected = [c / 0.5 for c in centred]
    assert advantages.tolist() == pytest.approx([e * 0.5 / (0.5 + 1e-6) for e in expected])
    advantages, _, _ = compute_group_normalized_rewards(reward_fn, responses, truths, 4, 1e-6, False)
    assert advantages.tolist() == pytest.approx(centred)
    assert meta["reward_mean"] == pytest.approx(0.75)
    assert meta["answer_reward_mean"] == pytest.approx(0.75)
    # a group where all agree: std 0, advantages 0 (not nan) thanks to eps
    advantages, _, _ = compute_group_normalized_rewards(reward_fn, ["1", "1"], ["1", "1"], 2, 1e-6, True)
    assert advantages.tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="groups of 3"):
        compute_group_normalized_rewards(reward_fn, responses, truths, 3, 1e-6, True)


def test_naive_policy_gradient_loss_broadcasts():
    log_probs = torch.tensor([[-1.0, -2.0], [-3.0, -4.0]])
    loss = compute_naive_policy_gradient_loss(torch.tensor([[2.0], [-0.5]]), log_probs)
    assert loss.tolist() == [[2.0, 4.0], [-1.5, -2.0]]


def test_grpo_clip_loss_hand_values():
    old = torch.log(torch.tensor([[0.5, 0.5, 0.5]]))
    new = torch.log(torch.tensor([[0.5, 0.7, 0.2]]))  # ratios 1.0, 1.4, 0.4
    loss, meta = compute_grpo_clip_loss(torch.tensor([[1.0]]), new, old, cliprange=0.2)
    # A > 0: min(r, clip(r)) = 1.0, 1.2, 0.4
    assert loss.tolist()[0] == pytest.approx([-1.0, -1.2, -0.4])
    assert meta["clipped"].tolist() == [[F, T, F]]
    loss, meta = compute_grpo_clip_loss(torch.tensor([-2.0]), new, old, cliprange=0.2)
    # A < 0: min(-2r, -2 clip(r)) = -2, -2.8, -1.6
    assert loss.tolist()[0] == pytest.approx([2.0, 2.8, 1.6])
    assert meta["clipped"].tolist() == [[F, F, T]]


def test_policy_gradient_wrapper_dispatch_and_argument_errors():
    log_probs = torch.tensor([[-1.0, -2.0]])
    rewards = torch.tensor([[3.0]])
    advantages = torch.tensor([[0.5]])
    loss, _ = compute_policy_gradient_loss(log_probs, "no_baseline", raw_rewards=rewards)
    assert loss.tolist() == [[3.0, 6.0]]
    loss, _ = compute_policy_gradient_loss(log_probs, "reinforce_with_baseline", advantages=advantages)
    assert loss.tolist() == [[0.5, 1.0]]
    loss, _ = compute_policy_gradient_loss(log_probs, "grpo_clip", advantages=advantages,
                                           old_log_probs=log_probs.clone(), cliprange=0.2)
    torch.testing.assert_close(loss, torch.tensor([[-0.5, -0.5]]))  # ratio 1
    with pytest.raises(ValueError, match="needs raw_rewards"):
        compute_policy_gradient_loss(log_probs, "no_baseline", advantages=advantages)
    with pytest.raises(ValueError, match="needs advantages"):
        compute_policy_gradient_loss(log_probs, "reinforce_with_baseline", raw_rewards=rewards)
    with pytest.raises(ValueError, match="needs old_log_probs, cliprange"):
        compute_policy_gradient_loss(log_probs, "grpo_clip", advantages=advantages)
    with pytest.raises(ValueError, match="unknown loss_type"):
        compute_policy_gradient_loss(log_probs, "ppo", advantages=advantages)


def test_grpo_microbatch_aggregations_on_4_and_7_tokens():
    # Two responses with 4 and 7 response tokens; per-token loss = -A * log_prob.
    log_probs = torch.full((2, 8), -1.0, requires_grad=True)
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[0, 1:5] = True
    mask[1, 1:8] = True
    advantages = torch.tensor([[2.0], [-1.0]])
    # per-token loss: row 0 = 2.0 on 4 tokens, row 1 = -1.0 on 7 tokens
    loss, _ = grpo_microbatch_train_step(log_probs, mask, 2, "reinforce_with_baseline", advantages=advantages)
    assert loss.item() == pytest.approx(((2.0 + -1.0) / 2) / 2)  # sequence_mean
    assert log_probs.grad[0, 1].item() == pytest.approx(-2.0 / 4 / 2 / 2)
    assert log_probs.grad[1, 1].item() == pytest.approx(1.0 / 7 / 2 / 2)
    log_probs.grad = None
    loss, _ = grpo_microbatch_train_step(log_probs, mask, 2, "reinforce_with_baseline", advantages=advantages,
                                         loss_aggregation="sequence_sum_constant", normalize_constant=8.0)
    assert loss.item() == pytest.approx(((8.0 / 8) + (-7.0 / 8)) / 2 / 2)
    log_probs.grad = None
    loss, _ = grpo_microbatch_train_step(log_probs, mask, 2, "reinforce_with_baseline", advantages=advantages,
                                         loss_aggregation="token_mean", tokens_in_step=22)
    assert loss.item() == pytest.approx((8.0 - 7.0) / 22)
    assert log_probs.grad[0, 1].item() == pytest.approx(-2.0 / 22)
    with pytest.raises(ValueError, match="needs normalize_constant"):
        grpo_microbatch_train_step(log_probs, mask, 1, "reinforce_with_baseline", advantages=advantages,
                                   loss_aggregation="sequence_sum_constant")


def test_grpo_clip_equals_reinforce_with_baseline_on_policy():
    """On-policy (old = current, one epoch) the clip is inactive: same gradient as REINFORCE with baseline."""
    base = torch.tensor([[-1.2, -0.3, -2.0, -0.7], [-0.1, -1.5, -0.4, -3.0]])
    mask = torch.tensor([[F, T, T, T], [T, T, F, F]])
    advantages = torch.tensor([[1.5], [-0.8]])
    a = base.clone().requires_grad_(True)
    grpo_microbatch_train_step(a, mask, 1, "grpo_clip", advantages=advantages, old_log_probs=base.clone(), cliprange=0.2)
    b = base.clone().requires_grad_(True)
    grpo_microbatch_train_step(b, mask, 1, "reinforce_with_baseline", advantages=advantages)
    torch.testing.assert_close(a.grad, b.grad)


def test_aggregate_loss_is_one_reduction_for_sft_and_grpo():
    """Hand values: per-token loss [[·, 2, 4], [1, 3, ·]] (· masked), accumulation 2, 5 sequences / 9 tokens in the step."""
    from reasontune.losses import aggregate_loss

    per_token = torch.tensor([[9.0, 2.0, 4.0], [1.0, 3.0, 9.0]])
    mask = torch.tensor([[F, T, T], [T, T, F]])
    # sequence_mean: means 3 and 2 -> batch mean 2.5 -> / 2 steps; with examples_in_step: (3 + 2) / 5
    assert aggregate_loss(per_token, mask, "sequence_mean", 2).item() == pytest.approx(1.25)
    assert aggregate_loss(per_token, mask, "sequence_mean", 2, examples_in_step=5).item() == pytest.approx(1.0)
    # sequence_sum with constant 4: sums 6 and 4 -> 1.5 and 1 -> mean 1.25 / 2; examples_in_step: 2.5 / 5
    assert aggregate_loss(per_token, mask, "sequence_sum", 2, normalize_constant=4.0).item() == pytest.approx(0.625)
    assert aggregate_loss(per_token, mask, "sequence_sum", 2, normalize_constant=4.0,
                          examples_in_step=5).item() == pytest.approx(0.5)
    # the earlier names are the same reduction
    for alias in ("constant", "sequence_sum_constant"):
        assert aggregate_loss(per_token, mask, alias, 2, normalize_constant=4.0).item() == pytest.approx(0.625)
    # token_mean: 10 / 9 tokens of the step; without the count: 10 / (4 * 2)
    assert aggregate_loss(per_token, mask, "token_mean", 2, tokens_in_step=9).item() == pytest.approx(10 / 9)
    assert aggregate_loss(per_token, mask, "token_mean", 2).item() == pytest.approx(10 / 8)
    with pytest.raises(ValueError, match="needs normalize_constant"):
        aggregate_loss(per_token, mask, "sequence_sum", 1)
    with pytest.raises(ValueError, match="examples_in_step must be positive"):
        aggregate_loss(per_token, mask, "sequence_mean", 1, examples_in_step=0)


@pytest.mark.parametrize("aggregation", ["sequence_mean", "sequence_sum"])
def test_a_sequence_without_loss_tokens_is_out_of_the_loss_value_gradient_and_divisor(aggregation):
    """The case above plus a third row masked out whole, nan and inf under its mask: same value, same gradient."""
    from reasontune.losses import aggregate_loss, sequences_with_loss_tokens

    per_token = torch.tensor([[9.0, 2.0, 4.0], [1.0, 3.0, 9.0], [float("nan"), float("inf"), 7.0]], requires_grad=True)
    mask = torch.tensor([[F, T, T], [T, T, F], [F, F, F]])
    assert sequences_with_loss_tokens(mask) == 2
    constant = {"normalize_constant": 4.0} if aggregation == "sequence_sum" else {}
    loss = aggregate_loss(per_token, mask, aggregation, 2, **constant)
    # sequence_mean: (3 + 2) over the 2 sequences that have loss tokens, / 2 steps = 1.25 (the third row not counted);
    # sequence_sum: (6/4 + 4/4) / 2 / 2 = 0.625.
    assert loss.item() == pytest.approx(1.25 if aggregation == "sequence_mean" else 0.625)
    loss.backward()
    # d/d token: sequence_mean 1 / (2 tokens) / (2 sequences) / 2 steps = 1/8; sequence_sum 1/4 / 2 / 2 = 1/16
    g = 1 / 8 if aggregation == "sequence_mean" else 1 / 16
    torch.testing.assert_close(per_token.grad, torch.tensor([[0.0, g, g], [g, g, 0.0], [0.0, 0.0, 0.0]]))
    # With the step's count (the sequences with loss tokens of every microbatch, here 5): (3 + 2) / 5 = 1.0
    counted = aggregate_loss(per_token, mask, aggregation, 2, examples_in_step=5, **constant)
    assert counted.item() == pytest.approx(1.0 if aggregation == "sequence_mean" else 0.5)


@pytest.mark.parametrize("aggregation", ["sequence_mean", "sequence_sum", "token_mean"])
def test_a_microbatch_or_step_without_any_loss_token_is_zero_with_zero_gradient(aggregation):
    from reasontune.losses import aggregate_loss

    per_token = torch.tensor([[float("nan"), 2.0], [float("-inf"), 4.0]], requires_grad=True)
    mask = torch.zeros(2, 2, dtype=torch.bool)
    for counts in ({}, {"examples_in_step": 0, "tokens_in_step": 0}, {"examples_in_step": 3, "tokens_in_step": 7}):
        loss = aggregate_loss(per_token, mask, aggregation, 2, normalize_constant=4.0, **counts)
        assert loss.item() == 0.0
        loss.backward()
        assert torch.equal(per_token.grad, torch.zeros(2, 2))
    with pytest.raises(ValueError, match="fewer than this microbatch's 1 response tokens"):
        aggregate_loss(per_token.detach(), torch.tensor([[F, T], [F, F]]), "token_mean", 1, tokens_in_step=0)


def test_grpo_step_with_a_truncated_response_masked_out_has_no_nan():
    """--mask-truncated on a microbatch: the truncated row adds nothing; the loss is the kept row's, by hand."""
    from reasontune.losses import mask_truncated_responses

    log_probs = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -1.5, -2.5]], requires_grad=True)
    mask = mask_truncated_responses(torch.ones(2, 3, dtype=torch.bool), torch.tensor([False, True]))
    for loss_type in ("reinforce_with_baseline", "grpo_clip"):
        log_probs.grad = None
        loss, metadata = grpo_microbatch_train_step(log_probs, mask, 1, loss_type, advantages=torch.tensor([2.0, -1.0]),
                                                    old_log_probs=log_probs.detach(), cliprange=0.2)
        # row 0 only: per-token -A log p = 2, 4, 6 -> mean 4 over its 3 tokens, 1 sequence counted; on-policy
        # grpo_clip has ratio 1: loss -A = -2 in value (same gradient as REINFORCE).
        assert loss.item() == pytest.approx(4.0 if loss_type == "reinforce_with_baseline" else -2.0)
        torch.testing.assert_close(log_probs.grad, torch.tensor([[-2 / 3] * 3, [0.0] * 3]))
        assert all(math.isfinite(float(value)) for value in metadata.values() if value.dim() == 0)
