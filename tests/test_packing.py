"""Packing several examples into one row, and dynamic batching by token count.

The reference for every packed log-prob is the same example run alone (batch 1, no padding,
default positions), so a packed row that leaks attention or positions across examples fails.
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from reasontune.batching import (
    block_causal_attention_mask,
    flatten_packed,
    pack_examples,
    pack_rows,
    packed_forward_kwargs,
    split_packed,
    token_budget_batches,
    varlen_attention_kwargs,
)
from reasontune.losses import sft_microbatch_train_step
from reasontune.tokenization import pad_and_shift

VOCAB = 97
PAD = 3


def random_examples(count: int, seed: int, max_prompt: int = 6, max_output: int = 10):
    rng = random.Random(seed)
    prompts = [[rng.randrange(VOCAB) for _ in range(rng.randint(1, max_prompt))] for _ in range(count)]
    outputs = [[rng.randrange(VOCAB) for _ in range(rng.randint(1, max_output))] for _ in range(count)]
    return prompts, outputs


def tiny_model(attn_implementation: str):
    from reasontune.modeling import build_model_from_config, tiny_qwen2_config

    config = tiny_qwen2_config(vocab_size=VOCAB, hidden_size=32, num_heads=4, num_kv_heads=2)
    return build_model_from_config(config, seed=0, attn_implementation=attn_implementation)


def label_log_probs(model, input_ids, labels, **forward_kwargs):
    """log softmax(logits)[label] per token, straight from the model (independent of reasontune.logprobs)."""
    logits = model(input_ids=input_ids, **forward_kwargs).logits.float()
    return torch.gather(F.log_softmax(logits, dim=-1), -1, labels.unsqueeze(-1)).squeeze(-1)


def alone_log_probs(model, tokens):
    ids = torch.tensor([tokens])
    return label_log_probs(model, ids[:, :-1], ids[:, 1:])[0]


# --- layout -------------------------------------------------------------------------------

def test_pack_examples_layout_by_hand():
    # Example 0: prompt [10, 11], output [12, 13] -> inputs 10 11 12, labels 11 12 13, mask F T T.
    # Example 1: prompt [20], output [21, 22]     -> inputs 20 21,    labels 21 22,    mask T T.
    # Example 2: prompt [30, 31, 32], output [33] -> inputs 30 31 32, labels 31 32 33, mask F F T.
    # Rows of 5 tokens, best fit, longest first: example 0 (3) opens row A, example 2 (3) opens
    # row B, example 1 (2) fills row A exactly. One microbatch of two rows, width 5.
    batches = pack_examples([[10, 11], [20], [30, 31, 32]], [[12, 13], [21, 22], [33]],
                            pad_token_id=PAD, tokens_per_row=5, rows_per_batch=2)
    assert len(batches) == 1
    batch = batches[0]
    assert batch["input_ids"].tolist() == [[10, 11, 12, 20, 21], [30, 31, 32, PAD, PAD]]
    assert batch["labels"].tolist() == [[11, 12, 13, 21, 22], [31, 32, 33, PAD, PAD]]
    F_, T_ = False, True
    assert batch["response_mask"].tolist() == [[F_, T_, T_, T_, T_], [F_, F_, T_, F_, F_]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 0, 1]]
    assert batch["sequence_ids"].tolist() == [[0, 0, 0, 1, 1], [2, 2, 2, -1, -1]]
    assert batch["example_indices"].tolist() == [0, 1, 2]
    assert batch["response_lengths"].tolist() == [2, 2, 1]
    assert batch["truncated"].tolist() == [False, False, False]
    assert batch["num_examples"] == 3
    assert batch["input_ids"].dtype == torch.long and batch["response_mask"].dtype == torch.bool


@pytest.mark.parametrize("max_length", [None, 7])
def test_packed_examples_match_pad_and_shift_one_by_one(max_length):
    # pad_and_shift (vectorised, padded) is an independent implementation of the same shift.
    prompts, outputs = random_examples(23, seed=5)
    prompts[4] = list(range(9))  # a prompt longer than max_length=7: no output survives
    batches = pack_examples(prompts, outputs, PAD, tokens_per_row=19, rows_per_batch=3,
                            max_length=max_length, shuffle_seed=3, window=10)
    seen = []
    for batch in batches:
        assert batch["input_ids"].shape[0] <= 3 and batch["input_ids"].shape[1] <= 19
        pieces = {key: split_packed(batch[key], batch) for key in ("input_ids", "labels", "response_mask", "position_ids")}
        for k, index in enumerate(batch["example_indices"].tolist()):
            reference = pad_and_shift([prompts[index]], [outputs[index]], PAD, max_length=max_length)
            length = int(reference["prompt_lengths"][0] + reference["response_lengths"][0]) - 1
            for key in ("input_ids", "labels", "response_mask"):
                assert pieces[key][k].tolist() == reference[key][0, :length].tolist(), (index, key)
            assert pieces["position_ids"][k].tolist() == list(range(length))
            assert int(batch["response_lengths"][k]) == int(reference["response_lengths"][0])
            assert bool(batch["truncated"][k]) == bool(reference["truncated"][0])
            seen.append(index)
    assert sorted(seen) == list(range(23))
    assert sum(b["num_examples"] for b in batches) == 23


def test_example_longer_than_a_row_is_truncated_to_the_row():
    # 12 tokens need 11 input slots; rows hold 6, so the example keeps 7 tokens (6 slots):
    # labels 2 3 | 40 41 42 43, the first two prompt tokens, the other four output tokens.
    batches = pack_examples([[1, 2, 3]], [list(range(40, 49))], PAD, tokens_per_row=6)
    (batch,) = batches
    assert batch["input_ids"].tolist() == [[1, 2, 3, 40, 41, 42]]
    assert batch["labels"].tolist() == [[2, 3, 40, 41, 42, 43]]
    assert batch["response_mask"].tolist() == [[False, False, True, True, True, True]]
    assert batch["truncated"].tolist() == [True]
    assert batch["response_lengths"].tolist() == [4]


def test_pack_rows_respects_budget_and_places_every_example_once():
    rng = random.Random(0)
    lengths = [rng.randint(0, 50) for _ in range(300)]
    rows = pack_rows(lengths, tokens_per_row=64, shuffle_seed=7, window=100)
    assert sorted(i for row in rows for i in row) == list(range(300))
    assert all(sum(lengths[i] for i in row) <= 64 for row in rows)
    assert rows == pack_rows(lengths, tokens_per_row=64, shuffle_seed=7, window=100)
    assert rows != pack_rows(lengths, tokens_per_row=64, shuffle_seed=8, window=100)
    # Best fit decreasing on a hand instance: 7+3, 6+4, 5+5 fill three rows of 10 exactly.
    assert sorted(sorted(row) for row in pack_rows([6, 4, 5, 5, 3, 7], 10)) == [[0, 1], [2, 3], [4, 5]]
    with pytest.raises(ValueError, match="longer than tokens_per_row"):
        pack_rows([3, 11], tokens_per_row=10)


def test_block_causal_attention_mask_by_hand():
    mask = block_causal_attention_mask(torch.tensor([[0, 0, 1, -1]]))
    assert mask.shape == (1, 1, 4, 4) and mask.dtype == torch.bool
    assert mask[0, 0].int().tolist() == [[1, 0, 0, 0],
                                         [1, 1, 0, 0],
                                         [0, 0, 1, 0],
                                         [0, 0, 0, 1]]
    additive = block_causal_attention_mask(torch.tensor([[0, 0, 1, -1]]), dtype=torch.bfloat16)
    assert additive.dtype == torch.bfloat16
    assert torch.equal(additive[0, 0] == 0, mask[0, 0])
    assert (additive[0, 0][~mask[0, 0]] == torch.finfo(torch.bfloat16).min).all()


def test_varlen_attention_kwargs_by_hand():
    # Rows read as one flat sequence: segments [0,3) [3,5) [5,6) | [6,8) [8,12).
    kwargs = varlen_attention_kwargs(torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 0, 1, 2, 3]]))
    assert kwargs["cu_seq_lens_q"].tolist() == [0, 3, 5, 6, 8, 12]
    assert kwargs["cu_seq_lens_q"].dtype == torch.int32
    assert kwargs["cu_seq_lens_k"] is kwargs["cu_seq_lens_q"]
    assert kwargs["max_length_q"] == kwargs["max_length_k"] == 4


def test_packed_forward_kwargs_by_kernel():
    # Examples of 2 and 3 input slots in rows of 4: row 0 holds the 3, row 1 the 2 and a pad.
    (batch,) = pack_examples([[1, 2], [3]], [[4], [5, 6, 7]], PAD, tokens_per_row=4, rows_per_batch=2)
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 1, 0]]
    flash = packed_forward_kwargs(batch, "flash_attention_2")
    assert flash["attention_mask"] is None and flash["position_ids"] is batch["position_ids"]
    assert flash["cu_seq_lens_q"].tolist() == [0, 3, 5, 6]
    sdpa = packed_forward_kwargs(batch, "sdpa")
    assert sdpa["attention_mask"].dtype == torch.bool and sdpa["attention_mask"].shape == (2, 1, 3, 3)
    assert packed_forward_kwargs(batch, "eager", dtype=torch.float16)["attention_mask"].dtype == torch.float16
    with pytest.raises(ValueError, match="flex_attention"):
        packed_forward_kwargs(batch, "flex_attention")


# --- packed log-probs == unpacked log-probs ------------------------------------------------

def packed_vs_alone_error(model, batches, prompts, outputs, forward_kwargs, reference_model=None) -> float:
    """Largest |packed - alone| log-prob over all examples; alone runs on reference_model (default: model)."""
    reference_model = reference_model or model
    worst = 0.0
    with torch.no_grad():
        for batch in batches:
            log_probs = label_log_probs(model, batch["input_ids"], batch["labels"], **forward_kwargs(batch))
            for k, piece in enumerate(split_packed(log_probs, batch)):
                index = int(batch["example_indices"][k])
                reference = alone_log_probs(reference_model, prompts[index] + outputs[index])
                assert piece.shape == reference.shape
                worst = max(worst, float((piece - reference).abs().max()))
    return worst


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_packed_log_probs_equal_unpacked(attn_implementation):
    prompts, outputs = random_examples(9, seed=1)
    batches = pack_examples(prompts, outputs, PAD, tokens_per_row=24, rows_per_batch=2, shuffle_seed=0)
    assert any(b["num_examples"] > b["input_ids"].shape[0] for b in batches)  # really packed
    assert any((b["sequence_ids"] < 0).any() for b in batches)  # and padded
    model = tiny_model(attn_implementation)
    error = packed_vs_alone_error(model, batches, prompts, outputs,
                                  lambda batch: packed_forward_kwargs(batch, attn_implementation))
    assert error < 1e-5


def _reference_varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                                cu_seq_lens_q=None, cu_seq_lens_k=None, max_length_q=None, max_length_k=None,
                                **kwargs):
    """Slow varlen attention on CPU: causal sdpa on each cu_seq_lens segment of the flattened rows."""
    assert attention_mask is None, "the flash path must not build a mask"
    assert cu_seq_lens_q is not None and torch.equal(cu_seq_lens_q, cu_seq_lens_k), "cu_seq_lens did not arrive"
    batch, heads, length, head_dim = query.shape
    groups = heads // key.shape[1]
    flat = [x.repeat_interleave(n, dim=1).transpose(1, 2).reshape(batch * length, heads, head_dim).transpose(0, 1)
            for x, n in ((query, 1), (key, groups), (value, groups))]
    out = torch.empty_like(flat[0])
    bounds = cu_seq_lens_q.tolist()
    assert max_length_q == max(end - start for start, end in zip(bounds[:-1], bounds[1:]))
    for start, end in zip(bounds[:-1], bounds[1:]):
        q, k, v = (x[:, start:end] for x in flat)
        out[:, start:end] = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling)
    return out.transpose(0, 1).reshape(batch, length, heads, head_dim), None


def test_flash_varlen_kwargs_reach_attention_and_equal_unpacked():
    # No flash-attn on CPU: a registered reference varlen kernel receives exactly what
    # packed_forward_kwargs gives flash_attention_2 and must reproduce the unpacked log-probs.
    from transformers import AttentionInterface

    AttentionInterface.register("reasontune_reference_varlen", _reference_varlen_attention)
    prompts, outputs = random_examples(9, seed=2)
    batches = pack_examples(prompts, outputs, PAD, tokens_per_row=24, rows_per_batch=2, shuffle_seed=0)
    model = tiny_model("reasontune_reference_varlen")
    error = packed_vs_alone_error(model, batches, prompts, outputs,
                                  lambda batch: packed_forward_kwargs(batch, "flash_attention_2"),
                                  reference_model=tiny_model("sdpa"))
    assert error < 1e-5


def _one_triangle_per_row(batch, attn_implementation):
    # Positions reset, but one causal triangle over the whole row: attention crosses examples.
    causal = block_causal_attention_mask(torch.zeros_like(batch["sequence_ids"]),
                                         dtype=torch.float32 if attn_implementation == "eager" else None)
    return {"position_ids": batch["position_ids"], "attention_mask": causal}


def _boolean_mask_for_eager(batch, attn_implementation):
    # Eager attention adds the mask to the scores: a boolean mask adds 0/1 and blocks nothing.
    return packed_forward_kwargs(batch, "sdpa")


@pytest.mark.parametrize("attn_implementation, broken", [
    ("sdpa", _one_triangle_per_row),
    ("eager", _one_triangle_per_row),
    ("eager", _boolean_mask_for_eager),
])
def test_equivalence_check_catches_leaks(attn_implementation, broken):
    # The check above has teeth: a mask that lets examples meet moves log-probs far past 1e-5.
    prompts, outputs = random_examples(9, seed=1)
    batches = pack_examples(prompts, outputs, PAD, tokens_per_row=24, rows_per_batch=2, shuffle_seed=0)
    model = tiny_model(attn_implementation)
    error = packed_vs_alone_error(model, batches, prompts, outputs, lambda batch: broken(batch, attn_implementation))
    assert error > 1e-3


def test_varlen_check_catches_positions_that_do_not_restart():
    # With RoPE, positions shifted by a constant inside a well-masked example change nothing
    # (attention sees only relative positions), so for sdpa/eager the mask carries the
    # separation. The varlen path finds the examples from the positions: positions running on
    # across the row make one segment per row, and examples meet.
    from transformers import AttentionInterface

    AttentionInterface.register("reasontune_reference_varlen", _reference_varlen_attention)
    prompts, outputs = random_examples(9, seed=2)
    batches = pack_examples(prompts, outputs, PAD, tokens_per_row=24, rows_per_batch=2, shuffle_seed=0)
    model = tiny_model("reasontune_reference_varlen")

    def running_positions(batch):
        positions = torch.arange(batch["input_ids"].shape[1]).expand_as(batch["input_ids"])
        return packed_forward_kwargs({**batch, "position_ids": positions}, "flash_attention_2")

    error = packed_vs_alone_error(model, batches, prompts, outputs, running_positions, reference_model=tiny_model("sdpa"))
    assert error > 1e-3


# --- loss and gradients ---------------------------------------------------------------------

def test_packed_sft_loss_and_gradients_equal_unpacked():
    # Unpacked: one padded batch of N examples, accumulation 1, the design's formula
    # (per-sequence masked sum / normalize_constant, batch mean). Packed: several microbatches
    # with examples_in_step=N. Same model, same examples -> same summed loss and gradients.
    prompts, outputs = random_examples(10, seed=3)
    normalize_constant = 42.0
    model = tiny_model("sdpa")

    model.zero_grad()
    unpacked = pad_and_shift(prompts, outputs, PAD)
    assert (unpacked["input_ids"] == PAD).sum() >= 3  # padded by several tokens
    log_probs = label_log_probs(model, unpacked["input_ids"], unpacked["labels"])
    unpacked_loss, _ = sft_microbatch_train_step(log_probs, unpacked["response_mask"], gradient_accumulation_steps=1,
                                                 normalize_constant=normalize_constant)
    unpacked_grads = [p.grad.clone() for p in model.parameters()]

    model.zero_grad()
    batches = pack_examples(prompts, outputs, PAD, tokens_per_row=20, rows_per_batch=2, shuffle_seed=4)
    assert len(batches) > 1
    packed_loss = torch.zeros(())
    for batch in batches:
        log_probs = label_log_probs(model, batch["input_ids"], batch["labels"], **packed_forward_kwargs(batch, "sdpa"))
        loss, _ = sft_microbatch_train_step(log_probs, batch["response_mask"], gradient_accumulation_steps=len(batches),
                                            normalize_constant=normalize_constant, examples_in_step=len(prompts))
        packed_loss += loss
    packed_grads = [p.grad.clone() for p in model.parameters()]

    torch.testing.assert_close(packed_loss, unpacked_loss, rtol=1e-5, atol=1e-6)
    for packed_grad, unpacked_grad in zip(packed_grads, unpacked_grads):
        torch.testing.assert_close(packed_grad, unpacked_grad, rtol=1e-4, atol=1e-6)
    assert any(float(g.abs().max()) > 0 for g in packed_grads)


# --- dynamic batching by token count --------------------------------------------------------

def test_token_budget_batches_by_hand():
    # Longest first, budget 20: 12 alone (2 * 12 = 24 > 20); 9 and 8 (2 * 9 = 18, a third
    # would make 27); then 5, 5, 3, 2 (4 * 5 = 20 <= 20).
    batches = token_budget_batches([5, 12, 3, 9, 5, 8, 2], tokens_per_batch=20)
    assert batches == [[1], [3, 5], [0, 4, 2, 6]]
    # An example over the budget gets a batch of its own.
    assert token_budget_batches([30, 4, 4], tokens_per_batch=10) == [[0], [1, 2]]


def test_token_budget_batches_respect_budget_and_cover_everything():
    rng = random.Random(1)
    lengths = [rng.randint(1, 200) for _ in range(500)]
    batches = token_budget_batches(lengths, tokens_per_batch=512, shuffle_seed=3, window=128)
    assert sorted(i for batch in batches for i in batch) == list(range(500))
    assert all(len(batch) * max(lengths[i] for i in batch) <= 512 for batch in batches)
    assert batches == token_budget_batches(lengths, tokens_per_batch=512, shuffle_seed=3, window=128)
    # Sorting cuts padding: fewer padded slots than fixed batches of 4 in data order.
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    fixed = sum(len(lengths[s:s + 4]) * max(lengths[s:s + 4]) for s in range(0, 500, 4))
    assert padded < fixed


def test_packed_kwargs_through_get_response_log_probs():
    # The trainer's path: reasontune.logprobs with the packed mask/positions and the response
    # mask (fused projection on response tokens only) gives each example's unpacked log-probs.
    from reasontune.logprobs import get_response_log_probs

    prompts, outputs = random_examples(9, seed=1)
    batches = pack_examples(prompts, outputs, PAD, tokens_per_row=24, rows_per_batch=2, shuffle_seed=0)
    model = tiny_model("sdpa")
    with torch.no_grad():
        for batch in batches:
            kwargs = packed_forward_kwargs(batch, "sdpa")
            log_probs = get_response_log_probs(model, batch["input_ids"], batch["labels"],
                                               attention_mask=kwargs["attention_mask"],
                                               position_ids=kwargs["position_ids"],
                                               response_mask=batch["response_mask"])["log_probs"]
            masks = split_packed(batch["response_mask"], batch)
            for k, piece in enumerate(split_packed(log_probs, batch)):
                index = int(batch["example_indices"][k])
                reference = alone_log_probs(model, prompts[index] + outputs[index])
                torch.testing.assert_close(piece[masks[k]], reference[masks[k]], rtol=0, atol=1e-5)
                assert masks[k].any()


def test_flat_layout_by_hand_and_equal_to_each_example_alone():
    # The by-hand microbatch above: rows [10 11 12 | 20 21] and [30 31 32 | pad pad]; flat drops the
    # two padding tokens and concatenates the rows: 10 11 12 20 21 30 31 32, positions 0 1 2 0 1 0 1 2.
    prompts, outputs = [[10, 11], [20], [30, 31, 32]], [[12, 13], [21, 22], [33]]
    (rows,) = pack_examples(prompts, outputs, pad_token_id=PAD, tokens_per_row=5, rows_per_batch=2)
    flat = flatten_packed(rows)
    assert flat["input_ids"].tolist() == [[10, 11, 12, 20, 21, 30, 31, 32]]
    assert flat["labels"].tolist() == [[11, 12, 13, 21, 22, 31, 32, 33]]
    assert flat["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]
    assert flat["sequence_ids"].tolist() == [[0, 0, 0, 1, 1, 2, 2, 2]]
    assert flat["response_mask"].tolist() == [[False, True, True, True, True, False, False, True]]
    assert flat["example_indices"].tolist() == [0, 1, 2] and flat["num_examples"] == 3

    prompts, outputs = random_examples(7, seed=11)
    model = tiny_model("sdpa")
    for batch in pack_examples(prompts, outputs, pad_token_id=PAD, tokens_per_row=16, rows_per_batch=3):
        flat = flatten_packed(batch)
        assert flat["input_ids"].shape == (1, int((batch["sequence_ids"] >= 0).sum()))
        with torch.no_grad():
            packed = label_log_probs(model, flat["input_ids"], flat["labels"], **packed_forward_kwargs(flat, "sdpa"))
        for k, pieces in enumerate(split_packed(packed, flat)):
            index = int(flat["example_indices"][k])
            with torch.no_grad():
                alone = alone_log_probs(model, prompts[index] + outputs[index])
            torch.testing.assert_close(pieces, alone, atol=1e-5, rtol=0)


# --- sdpa one packed example at a time (reasontune.packed_attention) ------------------------

@pytest.mark.parametrize("layout", ["rows", "flat"])
def test_varlen_sdpa_log_probs_and_gradients_equal_each_example_alone(layout):
    from reasontune.packed_attention import VARLEN_SDPA, packed_attention

    prompts, outputs = random_examples(9, seed=5)
    batches = pack_examples(prompts, outputs, PAD, tokens_per_row=24, rows_per_batch=2, shuffle_seed=0)
    assert any(b["num_examples"] > b["input_ids"].shape[0] for b in batches)  # really packed
    if layout == "flat":
        batches = [flatten_packed(b) for b in batches]
    model = tiny_model("sdpa")
    with packed_attention(model, VARLEN_SDPA):
        assert model.config._attn_implementation == VARLEN_SDPA
        error = packed_vs_alone_error(model, batches, prompts, outputs,
                                      lambda batch: packed_forward_kwargs(batch, VARLEN_SDPA),
                                      reference_model=tiny_model("sdpa"))  # the same seeded weights
    assert model.config._attn_implementation == "sdpa"
    assert error < 1e-5

    # Gradients of the summed response log-probs: packed through VARLEN_SDPA vs every example alone.
    model.zero_grad()
    for batch in batches:
        with packed_attention(model, VARLEN_SDPA):
            log_probs = label_log_probs(model, batch["input_ids"], batch["labels"],
                                        **packed_forward_kwargs(batch, VARLEN_SDPA))
        log_probs[batch["response_mask"]].sum().backward()
    packed_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    for prompt, output in zip(prompts, outputs):
        alone_log_probs(model, prompt + output)[len(prompt) - 1:].sum().backward()
    for packed_grad, parameter in zip(packed_grads, model.parameters()):
        torch.testing.assert_close(packed_grad, parameter.grad, rtol=1e-4, atol=1e-6)
    assert any(float(g.abs().max()) > 0 for g in packed_grads)


def test_varlen_sdpa_refuses_an_unpacked_forward_and_restores_the_kernel_after_an_error():
    from reasontune.packed_attention import VARLEN_SDPA, packed_attention, packed_kernel

    assert packed_kernel("sdpa") == VARLEN_SDPA and packed_kernel("eager") == "eager"
    model = tiny_model("sdpa")
    ids = torch.tensor([[1, 2, 3, 4]])
    with pytest.raises(ValueError, match="packed forwards only"):
        with packed_attention(model, VARLEN_SDPA):
            model(input_ids=ids)
    assert model.config._attn_implementation == "sdpa"
