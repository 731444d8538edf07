"""Issue 12's objectives, advantages, overlong shaping, rollout correction, dynamic sampling and recipes, by hand."""

from __future__ import annotations

import math

import pytest
import torch

from reasontune.losses import (
    compute_advantages,
    compute_cispo_loss,
    compute_clip_higher_loss,
    compute_grpo_clip_loss,
    compute_gspo_loss,
    compute_policy_loss,
    grpo_microbatch_train_step,
    mask_truncated_responses,
    masked_mean,
    overlong_penalty,
    rollout_correction_weights,
    rollout_mismatch_metrics,
)
from reasontune.rl_recipes import RECIPES, expand_recipe, fill_batch, informative_groups

T, F = True, False
LN2, LN3, LN4 = math.log(2.0), math.log(3.0), math.log(4.0)


def log_tensor(values) -> torch.Tensor:
    return torch.tensor([[math.log(v) for v in row] for row in values], dtype=torch.float32)


# --- clip-higher and dual clip


def clip_case():
    # ratios (old log-probs 0): row 0 (A = +1) 1.5, 1.25, 0.5; row 1 (A = -1) 0.5, 0.9, 4.0
    policy = log_tensor([[1.5, 1.25, 0.5], [0.5, 0.9, 4.0]]).requires_grad_(True)
    return policy, torch.zeros(2, 3), torch.tensor([1.0, -1.0])


def test_clip_higher_hand_values_flags_and_gradient():
    policy, old, advantages = clip_case()
    loss, meta = compute_clip_higher_loss(advantages, policy, old, eps_low=0.2, eps_high=0.28)
    # A = +1: -min(r, clip(r, 0.8, 1.28)) -> -1.28 (clipped high), -1.25, -0.5 (a low ratio is never clipped for A > 0)
    # A = -1: max(r, clip(r)) -> 0.8 (clipped low), 0.9, 4.0 (a high ratio is never clipped for A < 0)
    torch.testing.assert_close(loss.detach(), torch.tensor([[-1.28, -1.25, -0.5], [0.8, 0.9, 4.0]]))
    assert meta["clipped_high"].tolist() == [[T, F, F], [F, F, F]]
    assert meta["clipped_low"].tolist() == [[F, F, F], [T, F, F]]
    loss.sum().backward()
    # d(-A r)/d log r = -A r where unclipped, 0 where clipped
    torch.testing.assert_close(policy.grad, torch.tensor([[0.0, -1.25, -0.5], [0.0, 0.9, 4.0]]))


def test_dual_clip_bounds_negative_advantage_tokens():
    policy, old, advantages = clip_case()
    loss, meta = compute_clip_higher_loss(advantages, policy, old, eps_low=0.2, eps_high=0.28, dual_clip_c=3.0)
    # only the A = -1, r = 4 token changes: min(4.0, -c A = 3.0) = 3.0, with no gradient
    torch.testing.assert_close(loss.detach(), torch.tensor([[-1.28, -1.25, -0.5], [0.8, 0.9, 3.0]]))
    assert meta["dual_clipped"].tolist() == [[F, F, F], [F, F, T]]
    loss.sum().backward()
    torch.testing.assert_close(policy.grad, torch.tensor([[0.0, -1.25, -0.5], [0.0, 0.9, 0.0]]))
    with pytest.raises(ValueError, match="dual_clip_c"):
        compute_clip_higher_loss(advantages, policy, old, 0.2, 0.2, dual_clip_c=1.0)


def test_symmetric_clip_higher_equals_the_existing_grpo_clip():
    generator = torch.Generator().manual_seed(3)
    policy, old = torch.randn(4, 7, generator=generator) * 0.3, torch.randn(4, 7, generator=generator) * 0.3
    advantages = torch.tensor([0.7, -1.3, 0.0, 2.1])
    ours, meta = compute_clip_higher_loss(advantages, policy, old, 0.2, 0.2)
    reference, reference_meta = compute_grpo_clip_loss(advantages, policy, old, 0.2)
    torch.testing.assert_close(ours, reference)
    assert torch.equal(meta["clipped"], reference_meta["clipped"])


# --- GSPO


def gspo_case():
    # response log-ratios: row 0 (2 tokens + a padded one) 0.1, 0.3 -> mean 0.2; row 1: -0.3, 0.0, 0.03 -> mean -0.09
    old = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -1.5, -2.5]])
    policy = (old + torch.tensor([[0.1, 0.3, 5.0], [-0.3, 0.0, 0.03]])).requires_grad_(True)
    mask = torch.tensor([[T, T, F], [T, T, T]])
    return policy, old, mask, torch.tensor([1.0, -1.0])


def test_gspo_ratio_is_the_geometric_mean_and_gradient_is_sequence_level():
    policy, old, mask, advantages = gspo_case()
    loss, meta = compute_gspo_loss(advantages, policy, old, mask, eps_low=0.3, eps_high=0.3)
    # geometric mean of the token ratios: (e^0.1 e^0.3)^(1/2) = e^0.2 = 1.2214; (e^-0.3 e^0 e^0.03)^(1/3) = e^-0.09 = 0.9139
    torch.testing.assert_close(meta["sequence_ratio"], torch.tensor([math.exp(0.2), math.exp(-0.09)]))
    masked_mean(loss, mask, dim=-1).mean().backward()
    # independent reference: the sequence-level objective -mean_i(s_i A_i), s_i = exp(mean_t(policy - old)), by autograd
    reference_policy = policy.detach().clone().requires_grad_(True)
    s = torch.exp(masked_mean(reference_policy - old, mask, dim=-1))
    (-(s * advantages).mean()).backward()
    torch.testing.assert_close(policy.grad, reference_policy.grad)
    # by hand: -A_i s_i / |y_i| / batch
    row0, row1 = -math.exp(0.2) / 2 / 2, math.exp(-0.09) / 3 / 2
    torch.testing.assert_close(policy.grad, torch.tensor([[row0, row0, 0.0], [row1, row1, row1]]))


def test_gspo_clips_whole_sequences():
    policy, old, mask, advantages = gspo_case()
    # 1.2214 > 1 + 0.1 with A > 0: clipped high; 0.9139 < 1 - 0.05 with A < 0: clipped low
    loss, meta = compute_gspo_loss(advantages, policy, old, mask, eps_low=0.05, eps_high=0.1)
    assert meta["clipped_high"].tolist() == [[T, T, T], [F, F, F]]
    assert meta["clipped_low"].tolist() == [[F, F, F], [T, T, T]]
    masked_mean(loss, mask, dim=-1).mean().backward()
    torch.testing.assert_close(policy.grad, torch.zeros(2, 3))
    # values: -clip(s) A = -1.1 and +0.95 on every token
    torch.testing.assert_close(masked_mean(loss.detach(), mask, dim=-1), torch.tensor([-1.1, 0.95]))


def test_gspo_with_a_response_masked_out_whole_leaves_it_out_as_verl_does():
    """A row without response tokens (--mask-truncated) has sequence ratio 1 and adds nothing; the other row is unchanged."""
    from reasontune.losses import grpo_microbatch_train_step

    policy, old, mask, advantages = gspo_case()
    empty = torch.tensor([[T, T, F], [F, F, F]])  # row 1 truncated: masked out whole
    loss, meta = compute_gspo_loss(advantages, policy, old, empty, eps_low=0.3, eps_high=0.3)
    # row 0 as before: s = e^0.2; row 1: log-ratio sum 0 over a length clamped to 1 -> s = e^0 = 1 (verl's clamp)
    torch.testing.assert_close(meta["sequence_ratio"], torch.tensor([math.exp(0.2), 1.0]))
    assert not meta["clipped"][1].any()
    assert torch.isfinite(loss).all()
    step_loss, step_meta = grpo_microbatch_train_step(policy, empty, 1, "gspo", advantages=advantages,
                                                      old_log_probs=old, cliprange=0.3)
    # sequence_mean over the one row that counts: -A s = -1 * e^0.2; gradient -A s / |y| = -e^0.2 / 2 on its 2 tokens
    assert step_loss.item() == pytest.approx(-math.exp(0.2))
    row0 = -math.exp(0.2) / 2
    torch.testing.assert_close(policy.grad, torch.tensor([[row0, row0, 0.0], [0.0, 0.0, 0.0]]))
    assert float(step_meta["clip_fraction"]) == 0.0


# --- CISPO


def test_cispo_gradient_flows_through_clipped_tokens():
    # ratios 2, 1, 0.5 (old log-probs 0), A = +1
    policy = log_tensor([[2.0, 1.0, 0.5]]).requires_grad_(True)
    loss, meta = compute_cispo_loss(torch.tensor([1.0]), policy, torch.zeros(1, 3), eps_high=0.28)
    # no lower bound: weights 1.28 (capped), 1, 0.5; loss = -w A log p
    torch.testing.assert_close(meta["weight"], torch.tensor([[1.28, 1.0, 0.5]]))
    torch.testing.assert_close(loss.detach(), torch.tensor([[-1.28 * LN2, 0.0, 0.5 * LN2]]))
    loss.sum().backward()
    # d/d log p = -w A, nonzero on the clipped token (PPO's clip would give 0 there)
    torch.testing.assert_close(policy.grad, torch.tensor([[-1.28, -1.0, -0.5]]))
    assert meta["clipped_high"].tolist() == [[T, F, F]]
    _, bounded = compute_cispo_loss(torch.tensor([1.0]), policy, torch.zeros(1, 3), eps_high=0.28, eps_low=0.2)
    torch.testing.assert_close(bounded["weight"], torch.tensor([[1.28, 1.0, 0.8]]))
    assert bounded["clipped_low"].tolist() == [[F, F, T]]


# --- the dispatcher


def test_compute_policy_loss_clip_fractions_and_rollout_weights():
    policy, old, advantages = clip_case()
    mask = torch.tensor([[T, T, T], [T, T, F]])
    loss, meta = compute_policy_loss("grpo_clip", policy, mask, advantages=advantages, old_log_probs=old,
                                     eps_low=0.2, eps_high=0.28)
    # clipped high: (0, 0); clipped low: (1, 0); of 5 response tokens
    assert meta["clip_fraction_high"].item() == pytest.approx(1 / 5)
    assert meta["clip_fraction_low"].item() == pytest.approx(1 / 5)
    assert meta["clip_fraction"].item() == pytest.approx(2 / 5)
    weights = torch.tensor([[1.0, 0.5, 2.0], [0.0, 1.0, 1.0]])
    weighted, meta = compute_policy_loss("grpo_clip", policy, mask, advantages=advantages, old_log_probs=old,
                                         eps_low=0.2, eps_high=0.28, rollout_weights=weights)
    torch.testing.assert_close(weighted, loss * weights)
    assert meta["rollout_weight_mean"].item() == pytest.approx(4.5 / 5)


def test_compute_policy_loss_reinforce_types_and_argument_checks():
    policy = torch.tensor([[-1.0, -2.0], [-0.5, -0.25]])
    mask = torch.ones(2, 2, dtype=torch.bool)
    loss, meta = compute_policy_loss("reinforce_with_baseline", policy, mask, advantages=torch.tensor([2.0, -1.0]))
    torch.testing.assert_close(loss, torch.tensor([[2.0, 4.0], [-0.5, -0.25]]))
    assert meta["clip_fraction_low"].item() == 0.0 and meta["clip_fraction_high"].item() == 0.0
    loss, _ = compute_policy_loss("no_baseline", policy, mask, raw_rewards=torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(loss, torch.tensor([[1.0, 2.0], [0.0, 0.0]]))
    with pytest.raises(ValueError, match="needs old_log_probs"):
        compute_policy_loss("cispo", policy, mask, advantages=torch.tensor([1.0, 1.0]), eps_high=0.2)
    with pytest.raises(ValueError, match="unknown loss_type"):
        compute_policy_loss("ppo", policy, mask, advantages=torch.tensor([1.0, 1.0]))


def test_compute_policy_loss_aggregates_like_the_existing_train_step():
    # the existing step's grpo_clip (sequence_mean) and our dispatcher's, aggregated the same way, agree
    generator = torch.Generator().manual_seed(5)
    old = torch.randn(3, 6, generator=generator) * 0.2 - 1.0
    start = old + torch.randn(3, 6, generator=generator) * 0.3
    mask = torch.tensor([[T, T, T, F, F, F], [T, T, T, T, T, T], [F, T, T, T, F, F]])
    advantages = torch.tensor([1.0, -0.5, 2.0])
    existing = start.clone().requires_grad_(True)
    grpo_microbatch_train_step(existing, mask, 1, "grpo_clip", advantages=advantages, old_log_probs=old, cliprange=0.2)
    ours = start.clone().requires_grad_(True)
    loss, _ = compute_policy_loss("grpo_clip", ours, mask, advantages=advantages, old_log_probs=old, eps_low=0.2, eps_high=0.2)
    masked_mean(loss, mask, dim=-1).mean().backward()
    torch.testing.assert_close(ours.grad, existing.grad)


def test_huge_log_ratio_gaps_stay_finite():
    policy = torch.tensor([[0.0, -1e4, 0.0], [-1e4, 0.0, -5.0]], requires_grad=True)
    old = torch.tensor([[-1e4, 0.0, 0.0], [0.0, -1e4, -5.0]])
    mask = torch.ones(2, 3, dtype=torch.bool)
    for loss_type in ("grpo_clip", "gspo", "cispo"):
        policy.grad = None
        loss, meta = compute_policy_loss(loss_type, policy, mask, advantages=torch.tensor([1.0, -1.0]),
                                         old_log_probs=old, eps_low=0.2, eps_high=0.28)
        masked_mean(loss, mask, dim=-1).mean().backward()
        assert torch.isfinite(loss).all() and torch.isfinite(policy.grad).all(), loss_type
        assert meta["ratio"].max().item() <= math.exp(20.0) * (1 + 1e-6)
    figures = rollout_mismatch_metrics(policy, old, mask)
    assert all(math.isfinite(value.item()) for value in figures.values())
    for mode in ("token_tis", "token_mask", "seq_tis", "seq_mask"):
        weights, _ = rollout_correction_weights(policy, old, mask, mode, cap=2.0)
        assert torch.isfinite(weights).all(), mode


# --- advantages

REWARDS = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0])  # two groups of 4


def test_group_advantages_hand_values():
    # group 1: mean 0.5, unbiased std sqrt(4 * 0.25 / 3) = 0.57735 -> +-0.5 / 0.57735 = +-0.86603
    # group 2: mean 0.75, std sqrt((3 * 0.0625 + 0.5625) / 3) = 0.5 -> 0.5, 0.5, 0.5, -1.5
    expected = [0.86603, -0.86603, -0.86603, 0.86603, 0.5, 0.5, 0.5, -1.5]
    assert compute_advantages(REWARDS, 4, "group_mean", "group", 0.0).tolist() == pytest.approx(expected, abs=1e-5)
    # Dr. GRPO: centring only
    assert compute_advantages(REWARDS, 4, "group_mean", "none").tolist() == pytest.approx(
        [0.5, -0.5, -0.5, 0.5, 0.25, 0.25, 0.25, -0.75])


def test_rloo_leave_one_out_hand_values():
    # group 1: r = 1 -> 1 - (0 + 0 + 1) / 3 = 2/3; r = 0 -> 0 - (1 + 0 + 1) / 3 = -2/3
    # group 2: r = 1 -> 1 - (1 + 1 + 0) / 3 = 1/3; r = 0 -> 0 - 3/3 = -1
    expected = [2 / 3, -2 / 3, -2 / 3, 2 / 3, 1 / 3, 1 / 3, 1 / 3, -1.0]
    assert compute_advantages(REWARDS, 4, "leave_one_out", "none").tolist() == pytest.approx(expected)
    with pytest.raises(ValueError, match="group_size >= 2"):
        compute_advantages(REWARDS, 1, "leave_one_out", "none")


def test_reinforce_plus_plus_batch_normalisation_hand_values():
    # batch mean 5/8: centred 0.375 (x5) and -0.625 (x3); unbiased std sqrt((5 * 0.140625 + 3 * 0.390625) / 7) = 0.517549
    high, low = 0.375 / 0.517549, -0.625 / 0.517549
    assert compute_advantages(REWARDS, 4, "batch_mean", "batch", 0.0).tolist() == pytest.approx(
        [high, low, low, high, high, high, high, low], abs=1e-5)
    # REINFORCE++-baseline: group-centred (+-0.5; 0.25 x3, -0.75), then the batch std: mean 0, sum of squares 1.75 / 7 -> 0.5
    assert compute_advantages(REWARDS, 4, "group_mean", "batch", 0.0).tolist() == pytest.approx(
        [1.0, -1.0, -1.0, 1.0, 0.5, 0.5, 0.5, -1.5], abs=1e-5)


# --- overlong shaping


def test_soft_overlong_penalty_hand_values():
    # L_max 48, L_cache 12: free up to 36 tokens, then (36 - length) / 12, at most -1
    lengths = torch.tensor([10, 36, 37, 42, 48, 60])
    assert overlong_penalty(lengths, 48, 12).tolist() == pytest.approx([0.0, 0.0, -1 / 12, -0.5, -1.0, -1.0])
    assert overlong_penalty(lengths, 48, 12, penalty_factor=0.5).tolist() == pytest.approx(
        [0.0, 0.0, -1 / 24, -0.25, -0.5, -0.5])
    with pytest.raises(ValueError, match="buffer_length"):
        overlong_penalty(lengths, 48, 0)


def test_mask_truncated_responses():
    mask = torch.tensor([[T, T, F], [T, T, T], [F, T, T]])
    out = mask_truncated_responses(mask, torch.tensor([F, T, F]))
    assert out.tolist() == [[T, T, F], [F, F, F], [F, T, T]]
    with pytest.raises(ValueError, match="one flag per row"):
        mask_truncated_responses(mask, torch.tensor([T, F]))


# --- rollout-engine mismatch


def test_rollout_mismatch_metrics_hand_values():
    behaviour = torch.tensor([[-1.0, -2.0, -3.0], [-1.5, -0.5, -2.0]])
    # d = trainer - behaviour on the mask: 0, ln2 (row 0; the padded entry's 900 is ignored); -ln2, 0, 0 (row 1)
    trainer = behaviour + torch.tensor([[0.0, LN2, 900.0], [-LN2, 0.0, 0.0]])
    mask = torch.tensor([[T, T, F], [T, T, T]])
    figures = rollout_mismatch_metrics(trainer, behaviour, mask)
    assert figures["mismatch_kl_k1"].item() == pytest.approx(0.0, abs=1e-6)  # mean(-d) = 0
    # k3 = w - 1 - d: (2 - 1 - ln2) + (0.5 - 1 + ln2) = 0.5, over 5 tokens
    assert figures["mismatch_kl_k3"].item() == pytest.approx(0.1, abs=1e-6)
    assert figures["mismatch_max_abs_log_ratio"].item() == pytest.approx(LN2)
    # token ESS: w = 1, 2, 0.5, 1, 1: 5.5^2 / (5 * 7.25); sequence ESS: w = 2, 0.5: 2.5^2 / (2 * 4.25)
    assert figures["mismatch_token_ess"].item() == pytest.approx(30.25 / 36.25, abs=1e-6)
    assert figures["mismatch_seq_ess"].item() == pytest.approx(6.25 / 8.5, abs=1e-6)


def test_rollout_correction_weights_hand_values():
    behaviour = torch.zeros(2, 3)
    # token ratios: row 0: 1, 4 (+ padding); row 1: 0.25, 1, 2. Sequence ratios: 4 and 0.5. Cap 3.
    trainer = torch.tensor([[0.0, LN4, 50.0], [-LN4, 0.0, LN2]])
    mask = torch.tensor([[T, T, F], [T, T, T]])
    cases = {
        "none": ([[1, 1, 0], [1, 1, 1]], 0 / 5),
        "token_tis": ([[1, 3, 0], [0.25, 1, 2]], 1 / 5),  # min(w, 3)
        "token_mask": ([[1, 0, 0], [0, 1, 1]], 2 / 5),  # outside [1/3, 3]: the 4 and the 0.25
        "seq_tis": ([[3, 3, 0], [0.5, 0.5, 0.5]], 2 / 5),  # min(4, 3), min(0.5, 3)
        "seq_mask": ([[0, 0, 0], [1, 1, 1]], 2 / 5),  # 4 is outside [1/3, 3], 0.5 inside
    }
    for mode, (expected, capped) in cases.items():
        weights, meta = rollout_correction_weights(trainer, behaviour, mask, mode, cap=3.0)
        torch.testing.assert_close(weights, torch.tensor(expected, dtype=torch.float32), msg=mode)
        assert meta["rollout_capped_fraction"].item() == pytest.approx(capped), mode
    with pytest.raises(ValueError, match="cap must be > 1"):
        rollout_correction_weights(trainer, behaviour, mask, "token_tis", cap=1.0)
    with pytest.raises(ValueError, match="unknown rollout correction"):
        rollout_correction_weights(trainer, behaviour, mask, "tis", cap=2.0)


# --- dynamic sampling


def test_informative_groups():
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.5])
    assert informative_groups(rewards, 3).tolist() == [False, False, True]
    with pytest.raises(ValueError, match="groups of 4"):
        informative_groups(rewards, 4)


def test_fill_batch_counts_tries_drops_and_surplus():
    draws = [(["a", "b", "c"], [T, F, F]), (["d", "e"], [F, T]), (["f", "g", "h"], [T, T, F]), (["never"], [T])]
    calls = []

    def draw(attempt):
        calls.append(attempt)
        return draws[attempt]

    filled = fill_batch(draw, needed_groups=3, max_tries=10)
    # kept a, e, f; the batch is full after the third draw, whose g is surplus and h dropped
    assert filled.groups == ["a", "e", "f"] and filled.full
    assert (filled.tries, filled.drawn, filled.dropped, filled.surplus) == (3, 8, 4, 1)
    assert calls == [0, 1, 2]
    short = fill_batch(lambda attempt: draws[attempt], needed_groups=3, max_tries=2)
    assert short.groups == ["a", "e"] and not short.full
    assert short.metrics() == {"dynamic_sampling_tries": 2, "groups_drawn": 5, "groups_kept": 2, "groups_dropped": 3,
                               "groups_surplus": 0, "batch_full": 0.0}
    with pytest.raises(ValueError, match="keep flags"):
        fill_batch(lambda attempt: (["a"], [T, F]), 1, 1)


# --- recipes

CONFIG = {name: "default" for recipe in RECIPES.values() for name in recipe} | {"learning_rate": 1e-6}


def test_recipes_carry_their_papers_settings():
    assert set(RECIPES) == {"grpo", "dr_grpo", "dapo", "gspo", "cispo", "rloo"}
    # DAPO section 3.1: eps_low 0.2, eps_high 0.28; token-level loss; dynamic sampling; overlong 4096 / 20480
    dapo = RECIPES["dapo"]
    assert (dapo["cliprange"], dapo["cliprange_high"], dapo["loss_aggregation"]) == (0.2, 0.28, "token_mean")
    assert dapo["dynamic_sampling"] and dapo["overlong_buffer_fraction"] == pytest.approx(4096 / 20480)
    # GSPO section 5.1: 3e-4 / 4e-4
    assert (RECIPES["gspo"]["cliprange"], RECIPES["gspo"]["cliprange_high"]) == (3e-4, 4e-4)
    assert RECIPES["dr_grpo"]["advantage_std"] == "none" and RECIPES["dr_grpo"]["loss_aggregation"] == "sequence_sum"
    assert RECIPES["rloo"]["advantage_baseline"] == "leave_one_out" and RECIPES["cispo"]["cliprange"] is None
    assert RECIPES["grpo"]["kl_coef"] == 0.04  # DeepSeekMath's beta


def test_expand_recipe_flags_override():
    values, sources = expand_recipe("dapo", CONFIG, explicit={"cliprange_high", "learning_rate"})
    assert values["cliprange"] == 0.2 and values["loss_aggregation"] == "token_mean"
    assert values["cliprange_high"] == "default"  # the user's flag wins
    assert values["learning_rate"] == 1e-6  # not a recipe field: untouched
    assert sources["cliprange_high"] == "flag" and sources["cliprange"] == "recipe dapo"
    assert expand_recipe(None, CONFIG, set()) == (CONFIG, {})
    with pytest.raises(ValueError, match="unknown recipe 'ppo'"):
        expand_recipe("ppo", CONFIG, set())
    with pytest.raises(ValueError, match="does not have"):
        expand_recipe("gspo", {"loss_type": "x"}, set())
