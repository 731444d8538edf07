"""Training on multi-turn trajectories: the response mask covers model turns only, and the loss is the sum of its turns'."""

from __future__ import annotations

import pytest
import torch

from reasontune import get_response_log_probs, masked_normalize, sft_microbatch_train_step
from reasontune.environments.base import Trajectory, Turn
from reasontune.environments.tokens import trajectory_batch
from reasontune.modeling import load_model, load_tokenizer
from reasontune.tokenization import pad_and_shift, pad_and_shift_segments, scatter_response_values

PROMPT = "User: What is 12*34? Assistant: <think>"
MODEL_1 = " I compute it. <python>print(12 * 34)</python>"
OUTPUT = "<output>\n408\n</output>\n"
MODEL_2 = " It is 408. </think> <answer>408</answer>"


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model_dir):
    return load_model(str(tiny_model_dir), dtype="float32"), load_tokenizer(str(tiny_model_dir))


def _trajectory(tokenizer, prompt=PROMPT, turns=((MODEL_1, "model"), (OUTPUT, "environment"), (MODEL_2, "model"))):
    """Returns a trajectory whose model turns carry token ids as a sampler would (here: the tokenizer's ids of the text)."""
    result = Trajectory(prompt=prompt)
    for index, (text, role) in enumerate(turns):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] if role == "model" else None
        logprobs = [-0.1 * (index + 1) - 0.01 * k for k in range(len(ids))] if ids is not None else None
        result.turns.append(Turn(role=role, text=text, token_ids=ids, logprobs=logprobs))
    return result


def test_segments_mask_exactly_the_trained_tokens_hand_example():
    # prompt [5, 6], model [7, 8], environment [9], model [10]; sequence 5 6 7 8 9 10 (+2 pads in a batch with a longer row)
    batch = pad_and_shift_segments([[5, 6], [1, 2, 3]], [[[7, 8], [9], [10]], [[4, 4, 4, 4, 4, 4]]],
                                   [[True, False, True], [True]], pad_token_id=0)
    assert batch["labels"][0].tolist() == [6, 7, 8, 9, 10, 0, 0, 0]
    assert batch["response_mask"][0].tolist() == [False, True, True, False, True, False, False, False]
    assert batch["response_lengths"].tolist() == [3, 6]
    # all segments trained: the same as pad_and_shift of them joined
    joined = pad_and_shift([[5, 6]], [[7, 8, 9, 10]], 0)
    every = pad_and_shift_segments([[5, 6]], [[[7, 8], [9], [10]]], [[True, True, True]], 0)
    assert torch.equal(every["response_mask"], joined["response_mask"])
    # truncation cuts the tail: max_length 5 keeps 5 6 7 8 9, of which 7 and 8 are trained
    cut = pad_and_shift_segments([[5, 6]], [[[7, 8], [9], [10]]], [[True, False, True]], 0, max_length=5)
    assert cut["response_mask"][0].tolist() == [False, True, True, False] and bool(cut["truncated"][0])


def test_scatter_response_values_places_values_in_order():
    mask = torch.tensor([[False, True, True, False, True], [True, False, False, False, False]])
    values = scatter_response_values([[0.1, 0.2, 0.3], [0.4, 0.5]], mask)  # row 1 truncated: 0.5 dropped
    assert torch.allclose(values, torch.tensor([[0, 0.1, 0.2, 0, 0.3], [0.4, 0, 0, 0, 0]]))


def test_trajectory_loss_is_the_sum_of_its_model_turns_and_environment_tokens_get_no_gradient(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    trajectories = [_trajectory(tokenizer),
                    _trajectory(tokenizer, prompt="User: What is 7*6? Assistant: <think>",
                                turns=((" <python>print(7*6)</python>", "model"), ("<output>\n42\n</output>\n", "environment"),
                                       (" 42 </think> <answer>42</answer>", "model")))]
    batch = trajectory_batch(trajectories, tokenizer)
    m1, m2 = (turn.token_ids for turn in trajectories[0].model_turns)
    environment_ids = tokenizer(OUTPUT, add_special_tokens=False)["input_ids"]
    assert int(batch["response_mask"][0].sum()) == len(m1) + len(m2)

    model.zero_grad()
    log_probs = get_response_log_probs(model, batch["input_ids"], batch["labels"])["log_probs"]
    log_probs.retain_grad()
    loss, _ = sft_microbatch_train_step(log_probs, batch["response_mask"], gradient_accumulation_steps=1,
                                        normalize_constant=1.0)
    # no environment (or prompt, or padding) label carries gradient; every model-turn label does: -1 / batch
    mask = batch["response_mask"]
    assert torch.all(log_probs.grad[~mask] == 0)
    assert torch.allclose(log_probs.grad[mask], torch.full((int(mask.sum()),), -1.0 / len(trajectories)))

    # independent reference: each model turn as its own prompt/output pair, in its own forward
    prompt_ids = tokenizer(PROMPT, add_special_tokens=True)["input_ids"]
    with torch.no_grad():
        turn_sums = []
        for context, output in ((prompt_ids, m1), (prompt_ids + m1 + environment_ids, m2)):
            single = pad_and_shift([context], [output], 0)
            single_log_probs = get_response_log_probs(model, single["input_ids"], single["labels"])["log_probs"]
            turn_sums.append(float(masked_normalize(-single_log_probs, single["response_mask"], 1.0)))
        trajectory_sum = float(masked_normalize(-log_probs.detach()[0], mask[0], 1.0))
    assert trajectory_sum == pytest.approx(sum(turn_sums), rel=1e-5)
    # the loss of the batch is the mean of the two trajectories' sums
    second_sum = float(masked_normalize(-log_probs.detach()[1], mask[1], 1.0))
    assert float(loss) == pytest.approx((trajectory_sum + second_sum) / 2, rel=1e-5)

    # the sampler's log-probs sit at the model tokens, in order
    behaviour = batch["behaviour_log_probs"][0][mask[0]].tolist()
    expected = trajectories[0].model_turns[0].logprobs + trajectories[0].model_turns[1].logprobs
    assert behaviour == pytest.approx(expected)
    assert torch.all(batch["behaviour_log_probs"][~mask] == 0)


def test_one_turn_trajectory_microbatches_equal_the_single_turn_grpo_batches(model_and_tokenizer):
    from reasontune.training.grpo_rollouts import rollout_microbatches

    _, tokenizer = model_and_tokenizer
    texts = [" 12 </think> <answer>12</answer>", " 7 </think> <answer>7</answer> more", " x </think> <answer></answer>"]
    trajectories = [_trajectory(tokenizer, prompt=f"Q{i}: <think>", turns=((text, "model"),)) for i, text in enumerate(texts)]
    advantages, raw_rewards = torch.tensor([0.5, -1.0, 0.25]), torch.tensor([1.0, 0.0, 0.5])
    from reasontune.environments.tokens import trajectory_microbatches

    ours = trajectory_microbatches(trajectories, advantages, raw_rewards, micro_batch_size=2, tokenizer=tokenizer)
    prompt_ids = tokenizer([t.prompt for t in trajectories], add_special_tokens=True)["input_ids"]
    theirs = rollout_microbatches(prompt_ids, [t.turns[0].token_ids for t in trajectories], advantages, raw_rewards,
                                  2, tokenizer.pad_token_id)
    assert len(ours) == len(theirs) == 2
    for mine, reference in zip(ours, theirs):
        for key in ("input_ids", "labels", "response_mask", "advantages", "raw_rewards"):
            assert torch.equal(mine[key], reference[key]), key
        assert torch.equal(mine["behaviour_log_probs"] != 0, mine["response_mask"])
