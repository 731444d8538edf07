"""compute_entropy and get_response_log_probs: values, gradients and memory bounds of every path.

References are independent: float64 explicit sums, or the straightforward full log-softmax
(``implementation="naive"``, the seeds' code) on the same model.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from reasontune.logprobs import (
    LogitTransform,
    _ChunkedLogitsStatistics,
    _FusedLinearLogProbs,
    compute_entropy,
    fused_unsupported_reason,
    get_response_log_probs,
)
from reasontune.modeling import build_model_from_config, tiny_qwen2_config

VOCAB = 97


def entropy_float64(logits: torch.Tensor) -> torch.Tensor:
    """-sum p log p with an explicit float64 softmax."""
    z = logits.double()
    z = z - z.max(dim=-1, keepdim=True).values
    log_p = z - z.exp().sum(dim=-1, keepdim=True).log()
    return -(log_p.exp() * log_p).sum(dim=-1)


def batch(seed: int, batch_size: int = 3, seq: int = 11, vocab: int = VOCAB):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (batch_size, seq), generator=generator)
    labels = torch.randint(0, vocab, (batch_size, seq), generator=generator)
    # Rows keep different prompt lengths and end in padding; at least one True per row.
    positions = torch.arange(seq)
    starts = torch.tensor([2, 5, 3])[:batch_size]
    response_mask = (positions >= starts.unsqueeze(1)) & (positions < seq - 2)
    return input_ids, labels, response_mask


def run(model, input_ids, labels, loss_weights, **options):
    """Returns (log_probs, entropy, {param name: grad}) of a loss mixing log-probs and entropy."""
    model.zero_grad(set_to_none=True)
    result = get_response_log_probs(model, input_ids, labels, return_token_entropy=True, **options)
    weight_lp, weight_entropy = loss_weights
    loss = (result["log_probs"] * weight_lp).sum() + (result["token_entropy"] * weight_entropy).sum()
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return result["log_probs"].detach(), result["token_entropy"].detach(), grads


def loss_weights_for(labels: torch.Tensor, seed: int = 7):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(labels.shape, generator=generator), torch.randn(labels.shape, generator=generator)


def assert_grads_close(actual, expected, atol, rtol=1e-5):
    # Gradient entries reach ~20 (embedding rows hit by many tokens); float32 summation in another
    # order moves such an entry by ~1e-5 absolute, i.e. 6e-7 relative, so the bound is relative too.
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], atol=atol, rtol=rtol, msg=lambda m, name=name: f"{name}: {m}")


# ----------------------------------------------------------------------------- compute_entropy


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_entropy_of_uniform_logits_is_log_vocab(dtype):
    logits = torch.full((2, 3, 1000), 3.75, dtype=dtype)
    entropy = compute_entropy(logits)
    assert entropy.dtype == torch.float32 and entropy.shape == (2, 3)
    torch.testing.assert_close(entropy, torch.full((2, 3), math.log(1000)), atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_entropy_of_one_hot_is_zero(dtype):
    logits = torch.full((4, 50), -1e4, dtype=dtype)
    logits[torch.arange(4), torch.tensor([0, 7, 49, 3])] = torch.tensor([0.0, 1e4, 5.0, -20.0], dtype=dtype)
    entropy = compute_entropy(logits)
    assert torch.equal(entropy, torch.zeros(4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_entropy_stable_at_logits_of_1e4(dtype):
    generator = torch.Generator().manual_seed(3)
    spread = torch.randn(6, 200, generator=generator) * 2
    cases = torch.cat([
        1e4 + spread[:2],                                               # all huge and near each other
        -1e4 + spread[2:4],                                             # all hugely negative
        torch.where(spread[4:] > 0, 1e4, -1e4) + spread[4:] / 4,        # two clusters 2e4 apart
    ]).to(dtype)
    entropy = compute_entropy(cases)
    assert torch.isfinite(entropy).all()
    # The reference sees the same (rounded) input values; float32 rounding of z - max is the only error.
    torch.testing.assert_close(entropy.double(), entropy_float64(cases), atol=2e-4, rtol=0)
    assert entropy[:4].min() > 1.0  # the near-uniform rows really have entropy


def test_entropy_and_its_gradient_match_float64_reference_across_chunks():
    generator = torch.Generator().manual_seed(4)
    logits = (torch.randn(3, 7, 131, generator=generator) * 3).requires_grad_()
    upstream = torch.randn(3, 7, generator=generator)
    entropy = compute_entropy(logits, chunk_size=4)  # 21 rows: chunks of 4, 4, 4, 4, 4, 1
    (entropy * upstream).sum().backward()
    reference_logits = logits.detach().double().requires_grad_()
    reference = entropy_float64(reference_logits)
    (reference * upstream.double()).sum().backward()
    torch.testing.assert_close(entropy.double(), reference.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(logits.grad.double(), reference_logits.grad, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- autograd Functions


@pytest.mark.parametrize("transform", [LogitTransform(), LogitTransform(scale=0.37, softcap=2.5)],
                         ids=["plain", "scaled-softcapped"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
def test_fused_function_gradcheck_float64(transform, with_bias):
    generator = torch.Generator().manual_seed(5)
    hidden = torch.randn(7, 5, dtype=torch.float64, generator=generator, requires_grad=True)
    weight = torch.randn(11, 5, dtype=torch.float64, generator=generator, requires_grad=True)
    bias = torch.randn(11, dtype=torch.float64, generator=generator, requires_grad=True) if with_bias else None
    labels = torch.randint(0, 11, (7,), generator=generator)

    def both(hidden, weight, bias):
        return _FusedLinearLogProbs.apply(hidden, weight, bias, labels, 3, transform, True)

    inputs = (hidden, weight, bias)
    assert torch.autograd.gradcheck(both, inputs)

    def log_probs_only(hidden, weight, bias):  # the backward without an entropy gradient
        return _FusedLinearLogProbs.apply(hidden, weight, bias, labels, 3, transform, False)[0]

    assert torch.autograd.gradcheck(log_probs_only, inputs)

    def entropy_only(hidden, weight, bias):  # and without a log-prob gradient
        return _FusedLinearLogProbs.apply(hidden, weight, bias, labels, 3, transform, True)[1]

    assert torch.autograd.gradcheck(entropy_only, inputs)


def test_fused_function_values_match_explicit_float64_formula():
    generator = torch.Generator().manual_seed(6)
    hidden = torch.randn(9, 4, dtype=torch.float64, generator=generator)
    weight = torch.randn(13, 4, dtype=torch.float64, generator=generator)
    labels = torch.randint(0, 13, (9,), generator=generator)
    transform = LogitTransform(scale=0.5, softcap=3.0)
    log_probs, entropy = _FusedLinearLogProbs.apply(hidden, weight, None, labels, 4, transform, True)
    z = 3.0 * torch.tanh(0.5 * (hidden @ weight.T) / 3.0)
    log_p = z - z.exp().sum(-1, keepdim=True).log()
    torch.testing.assert_close(log_probs.double(), log_p[torch.arange(9), labels], atol=1e-6, rtol=0)
    torch.testing.assert_close(entropy.double(), -(log_p.exp() * log_p).sum(-1), atol=1e-6, rtol=0)


def test_chunked_function_gradcheck_float64_with_selected_rows():
    generator = torch.Generator().manual_seed(8)
    logits = torch.randn(10, 6, dtype=torch.float64, generator=generator, requires_grad=True)
    rows = torch.tensor([1, 2, 4, 7, 9])
    labels = torch.randint(0, 6, (5,), generator=generator)

    def both(logits):
        return _ChunkedLogitsStatistics.apply(logits, rows, labels, 2, LogitTransform(), True, True)

    assert torch.autograd.gradcheck(both, (logits,))


# ----------------------------------------------------------------------------- get_response_log_probs


def test_tiny_qwen2_takes_the_fused_path_without_ever_calling_lm_head_on_a_token(tiny_qwen2):
    assert fused_unsupported_reason(tiny_qwen2) is None
    input_ids, labels, _ = batch(seed=1)
    expected = get_response_log_probs(tiny_qwen2, input_ids, labels, implementation="naive")["log_probs"]
    original = tiny_qwen2.lm_head.forward

    def forbidden(hidden):  # the model's forward runs (for wrappers' hooks), its projection on no position
        if hidden.numel():
            raise AssertionError(f"the fused path must not run lm_head over tokens, got {tuple(hidden.shape)}")
        return original(hidden)

    tiny_qwen2.lm_head.forward = forbidden
    actual = get_response_log_probs(tiny_qwen2, input_ids, labels)["log_probs"]
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("implementation", ["fused", "chunked"])
@pytest.mark.parametrize("chunk_size", [5, None], ids=["chunk5", "default-chunk"])
def test_log_probs_entropy_and_all_gradients_match_naive_fp32(tiny_qwen2, implementation, chunk_size):
    input_ids, labels, _ = batch(seed=2)  # 33 tokens: chunks of 5 leave a remainder of 3
    weights = loss_weights_for(labels)
    lp_ref, entropy_ref, grads_ref = run(tiny_qwen2, input_ids, labels, weights, implementation="naive")
    lp, entropy, grads = run(tiny_qwen2, input_ids, labels, weights, implementation=implementation,
                             chunk_size=chunk_size)
    assert lp.dtype == entropy.dtype == torch.float32 and lp.shape == labels.shape
    torch.testing.assert_close(lp, lp_ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(entropy, entropy_ref, atol=1e-5, rtol=0)
    assert {"lm_head.weight", "model.embed_tokens.weight"} <= grads.keys()
    assert_grads_close(grads, grads_ref, atol=1e-5)
    # The naive log-probs really are log-softmax values (an independent float64 check).
    logits = tiny_qwen2(input_ids=input_ids).logits.double()
    torch.testing.assert_close(lp.double(), logits.log_softmax(-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1),
                               atol=1e-5, rtol=0)


def test_tied_embeddings_receive_both_gradients():
    model = build_model_from_config(tiny_qwen2_config(vocab_size=VOCAB, hidden_size=32, tie_word_embeddings=True),
                                    seed=3)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert fused_unsupported_reason(model) is None
    input_ids, labels, _ = batch(seed=3)
    weights = loss_weights_for(labels)
    lp_ref, entropy_ref, grads_ref = run(model, input_ids, labels, weights, implementation="naive")
    lp, entropy, grads = run(model, input_ids, labels, weights, implementation="fused", chunk_size=4)
    torch.testing.assert_close(lp, lp_ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(entropy, entropy_ref, atol=1e-5, rtol=0)
    assert "lm_head.weight" not in grads  # named_parameters lists the shared tensor once
    assert_grads_close(grads, grads_ref, atol=1e-5)


def test_lm_head_bias_is_used_and_gets_its_gradient(tiny_qwen2):
    torch.manual_seed(9)
    head = nn.Linear(32, VOCAB, bias=True)
    nn.init.normal_(head.bias, std=2.0)
    tiny_qwen2.lm_head = head
    assert fused_unsupported_reason(tiny_qwen2) is None
    input_ids, labels, _ = batch(seed=4)
    weights = loss_weights_for(labels)
    lp_ref, entropy_ref, grads_ref = run(tiny_qwen2, input_ids, labels, weights, implementation="naive")
    lp, entropy, grads = run(tiny_qwen2, input_ids, labels, weights, implementation="fused", chunk_size=7)
    torch.testing.assert_close(lp, lp_ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(entropy, entropy_ref, atol=1e-5, rtol=0)
    assert grads["lm_head.bias"].abs().max() > 1e-3
    assert_grads_close(grads, grads_ref, atol=1e-5)


@pytest.mark.parametrize("implementation", ["fused", "chunked"])
def test_response_mask_computes_only_masked_positions(tiny_qwen2, implementation):
    input_ids, labels, response_mask = batch(seed=5)
    labels = labels.masked_fill(~response_mask, -100)  # ignored positions need not be valid ids
    weights = loss_weights_for(labels)
    _, _, grads_ref = run(tiny_qwen2, input_ids, labels.clamp(min=0),
                          (weights[0] * response_mask, weights[1] * response_mask), implementation="naive")
    lp_ref, entropy_ref, _ = run(tiny_qwen2, input_ids, labels.clamp(min=0), weights, implementation="naive")
    lp, entropy, grads = run(tiny_qwen2, input_ids, labels, weights, implementation=implementation,
                             response_mask=response_mask, chunk_size=4)
    torch.testing.assert_close(lp[response_mask], lp_ref[response_mask], atol=1e-5, rtol=0)
    torch.testing.assert_close(entropy[response_mask], entropy_ref[response_mask], atol=1e-5, rtol=0)
    assert torch.equal(lp[~response_mask], torch.zeros(int((~response_mask).sum())))
    assert torch.equal(entropy[~response_mask], torch.zeros(int((~response_mask).sum())))
    assert_grads_close(grads, grads_ref, atol=1e-5)


def test_invalid_labels_are_reported(tiny_qwen2):
    input_ids, labels, _ = batch(seed=6)
    labels[0, 0] = -100
    with pytest.raises(ValueError, match="response_mask"):
        get_response_log_probs(tiny_qwen2, input_ids, labels)


def test_attention_mask_and_position_ids_reach_the_model(tiny_qwen2):
    input_ids, labels, _ = batch(seed=7)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, -3:] = 0
    # Packing: row 0 holds two sequences, positions restart at 6.
    position_ids = torch.arange(11).repeat(3, 1)
    position_ids[0, 6:] = torch.arange(5)
    options = {"attention_mask": attention_mask, "position_ids": position_ids}
    expected = get_response_log_probs(tiny_qwen2, input_ids, labels, implementation="naive", **options)["log_probs"]
    plain = get_response_log_probs(tiny_qwen2, input_ids, labels)["log_probs"]
    for implementation in ("fused", "chunked"):
        actual = get_response_log_probs(tiny_qwen2, input_ids, labels, implementation=implementation,
                                        chunk_size=6, **options)["log_probs"]
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)
    assert (plain[0, 6:] - expected[0, 6:]).abs().max() > 1e-4  # position_ids changed the result


def test_bf16_fused_is_as_close_to_float64_as_naive():
    model = build_model_from_config(tiny_qwen2_config(vocab_size=VOCAB, hidden_size=32), seed=4, dtype=torch.bfloat16)
    reference_model = build_model_from_config(tiny_qwen2_config(vocab_size=VOCAB, hidden_size=32), seed=4,
                                              dtype=torch.float64)
    reference_model.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    input_ids, labels, _ = batch(seed=8)
    weights = loss_weights_for(labels)
    lp_64, entropy_64, grads_64 = run(reference_model, input_ids, labels, weights, implementation="naive")
    lp_naive, entropy_naive, grads_naive = run(model, input_ids, labels, weights, implementation="naive")
    lp, entropy, grads = run(model, input_ids, labels, weights, implementation="fused", chunk_size=5)
    assert lp.dtype == torch.float32
    # Both paths share the bf16 body (identical hidden states) and round the bf16 logits alike;
    # they differ only in the projection's accumulation order and in grad_weight being rounded
    # to bf16 once per chunk (7 chunks here) instead of once. So ours must be no further from
    # the float64 truth than the naive bf16 result, up to half its error again (measured: equal
    # errors for log-probs, entropy and the body's grads; lm_head 5.5e-3 vs 4.6e-3 relative).
    for name, ours, naive, truth in (("log_probs", lp, lp_naive, lp_64), ("entropy", entropy, entropy_naive, entropy_64)):
        error_ours = (ours.double() - truth).abs().max()
        error_naive = (naive.double() - truth).abs().max()
        assert error_naive > 1e-6, name  # the comparison means something only if bf16 is inexact
        assert error_ours <= 1.5 * error_naive + 1e-6, name
    for name, truth in grads_64.items():
        error_ours = (grads[name].double() - truth).norm() / truth.norm()
        error_naive = (grads_naive[name].double() - truth).norm() / truth.norm()
        assert error_ours <= 1.5 * error_naive, name


def _tiny_config(model_type: str):
    from transformers import Gemma2Config, GraniteConfig, LlamaConfig, MistralConfig, Qwen3Config

    common = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}
    if model_type == "qwen3":
        return Qwen3Config(head_dim=8, **common), "sdpa"
    if model_type == "llama":
        return LlamaConfig(**common), "sdpa"
    if model_type == "mistral":
        return MistralConfig(sliding_window=None, **common), "sdpa"
    if model_type == "gemma2":  # softcap 2.0 so the tanh visibly bends the random logits
        return Gemma2Config(head_dim=8, final_logit_softcapping=2.0, **common), "eager"
    if model_type == "granite":
        return GraniteConfig(logits_scaling=3.5, **common), "sdpa"
    raise AssertionError(model_type)


@pytest.mark.parametrize("model_type", ["qwen3", "llama", "mistral", "gemma2", "granite"])
def test_every_fused_model_family_matches_its_own_forward(model_type):
    config, attention = _tiny_config(model_type)
    model = build_model_from_config(config, seed=5, attn_implementation=attention)
    assert fused_unsupported_reason(model) is None
    input_ids, labels, _ = batch(seed=9)
    weights = loss_weights_for(labels)
    lp_ref, entropy_ref, grads_ref = run(model, input_ids, labels, weights, implementation="naive")
    lp, entropy, grads = run(model, input_ids, labels, weights, implementation="fused", chunk_size=8)
    torch.testing.assert_close(lp, lp_ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(entropy, entropy_ref, atol=1e-5, rtol=0)
    assert_grads_close(grads, grads_ref, atol=1e-5)


def test_unknown_model_classes_fall_back_to_chunked_and_refuse_fused(tiny_qwen2):
    from transformers import Qwen2ForCausalLM

    class ScaledQwen2(Qwen2ForCausalLM):  # a subclass may change the logits: never fuse it
        def forward(self, *args, **kwargs):
            output = super().forward(*args, **kwargs)
            output.logits = output.logits * 3.0
            return output

    model = ScaledQwen2(tiny_qwen2.config)
    model.load_state_dict(tiny_qwen2.state_dict())
    assert "not a causal LM whose logit computation is known" in fused_unsupported_reason(model)
    input_ids, labels, _ = batch(seed=10)
    expected = get_response_log_probs(model, input_ids, labels, implementation="naive")["log_probs"]
    actual = get_response_log_probs(model, input_ids, labels)["log_probs"]
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="fused"):
        get_response_log_probs(model, input_ids, labels, implementation="fused")


class LargestVocabTensor(TorchDispatchMode):
    """Records the most elements of any float32 tensor with a last dimension of ``vocab`` made by an op."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.largest = vocab, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(tensor, torch.Tensor) and tensor.dtype == torch.float32 and tensor.dim() >= 1 \
                    and tensor.shape[-1] == self.vocab:
                self.largest = max(self.largest, tensor.numel())
        return out


@pytest.mark.parametrize("implementation,bounded", [("fused", True), ("naive", False)])
def test_fused_path_never_makes_a_float32_tensor_larger_than_one_chunk(implementation, bounded):
    vocab, hidden, chunk = 5000, 16, 20
    model = build_model_from_config(tiny_qwen2_config(vocab_size=vocab, hidden_size=hidden, num_layers=1), seed=6)
    input_ids, labels, _ = batch(seed=11, batch_size=2, seq=30, vocab=vocab)  # 60 tokens = 3 chunks
    # (The lm_head weight seen transposed, (hidden, vocab), is 16 rows: below a chunk's 20.)
    tracker = LargestVocabTensor(vocab)
    with tracker:
        result = get_response_log_probs(model, input_ids, labels, return_token_entropy=True,
                                        implementation=implementation, chunk_size=chunk)
        (result["log_probs"].sum() + result["token_entropy"].sum()).backward()
    assert (tracker.largest <= chunk * vocab) == bounded, tracker.largest


@pytest.mark.parametrize("implementation", ["fused", "chunked"])
def test_temperature_scales_the_logits_before_the_softmax(tiny_qwen2, implementation):
    """log_probs at temperature T = log_softmax(logits / T) gathered, checked against the full-logits computation, gradients too."""
    torch.manual_seed(0)
    input_ids = torch.randint(0, 97, (2, 7))
    labels = torch.randint(0, 97, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[0, :3] = False
    out = get_response_log_probs(tiny_qwen2, input_ids, labels, return_token_entropy=True, response_mask=mask,
                                 implementation=implementation, temperature=0.6)
    (out["log_probs"].sum() + out["token_entropy"].sum()).backward()
    ours = {n: p.grad.clone() for n, p in tiny_qwen2.named_parameters() if p.grad is not None}
    tiny_qwen2.zero_grad()
    logits = tiny_qwen2(input_ids).logits.float() / 0.6
    log_p = torch.log_softmax(logits, -1)
    expected = torch.where(mask, log_p.gather(-1, labels[..., None]).squeeze(-1), torch.zeros(()))
    entropy = torch.where(mask, -(log_p.exp() * log_p).sum(-1), torch.zeros(()))
    torch.testing.assert_close(out["log_probs"], expected.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["token_entropy"], entropy.detach(), atol=1e-5, rtol=1e-5)
    (expected.sum() + entropy.sum()).backward()
    for name, parameter in tiny_qwen2.named_parameters():
        torch.testing.assert_close(ours[name], parameter.grad, atol=1e-5, rtol=1e-4, msg=name)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        get_response_log_probs(tiny_qwen2, input_ids, labels, temperature=0.0)
