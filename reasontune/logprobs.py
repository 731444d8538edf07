"""Per-token log-probabilities and entropy from a causal LM, memory-bounded.

The straightforward computation (``log_softmax(model(input_ids).logits)`` then gather) holds
several float32 ``[batch, seq, vocab]`` tensors at once, in forward and again in backward: at
Qwen2.5's vocabulary (151,936) one such tensor for 4 × 1024 tokens is 2.5 GB. This module never
holds more than one chunk of tokens' float32 logits:

- ``"fused"`` (the default where the model allows it): the model body runs to hidden states and
  the output projection, log-softmax, gather and entropy run chunk by chunk over tokens inside
  one autograd Function whose backward recomputes each chunk's logits. The full logits never
  exist, in any dtype.
- ``"chunked"`` (fallback for any model): the model's own forward gives the logits in the
  model's dtype; float32 log-softmax and entropy are computed chunk by chunk, and recomputed
  chunk by chunk in backward.
- ``"naive"``: the seeds' reference computation, kept for tests and benchmarks.

Pure functions of their arguments: no I/O, no global state.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from reasontune.model_layers import is_peft_model

Implementation = Literal["auto", "fused", "chunked", "naive"]

# One float32 chunk of logits is at most this many bytes (220 tokens at vocabulary 151,936).
# A chunk's working set is two such tensors (z / log p and p). Halving it from 256 MB cost no
# time in bench/logprobs.py (CPU) and a 220 x 151,936 projection still fills a GPU.
DEFAULT_CHUNK_BYTES = 128 * 2**20


def default_chunk_size(vocab_size: int) -> int:
    """Returns the default tokens per chunk: a float32 chunk of logits fits ``DEFAULT_CHUNK_BYTES``."""
    return max(1, DEFAULT_CHUNK_BYTES // (4 * vocab_size))


@dataclass(frozen=True)
class LogitTransform:
    """What a model applies to ``lm_head(hidden)`` before returning logits.

    ``logits = softcap * tanh(scale * raw / softcap)`` when ``softcap`` is set, else
    ``scale * raw``; then divided by ``temperature`` (the sampling temperature a policy
    gradient takes its log-probs at). Applied in float32 (models apply it in their own dtype;
    for a bf16 model ours rounds once less).
    """

    scale: float = 1.0
    softcap: float | None = None
    temperature: float = 1.0


# Causal LMs whose forward is exactly ``logits = transform(lm_head(model(...).last_hidden_state))``,
# each checked against the model's own forward in tests/test_logprobs.py. A PEFT LoRA wrapper of
# one of them is unwrapped (tests/test_lora.py checks it), and so is the FSDP<Name> subclass that FSDP2
# swaps in (tests/test_distributed.py checks it); any other class (a subclass, a
# torch.compile wrapper, a model with extra logit processing) falls back to the chunked path
# rather than risk a silently different result.
_FUSED_MODELS = {
    "Qwen2ForCausalLM": lambda config: LogitTransform(),
    "Qwen3ForCausalLM": lambda config: LogitTransform(),
    "LlamaForCausalLM": lambda config: LogitTransform(),
    "MistralForCausalLM": lambda config: LogitTransform(),
    "Gemma2ForCausalLM": lambda config: LogitTransform(softcap=config.final_logit_softcapping),
    "GraniteForCausalLM": lambda config: LogitTransform(scale=1.0 / config.logits_scaling),
}


@dataclass(frozen=True)
class _LoraTerm:
    """One active LoRA adapter of the output projection: adds ``scaling * B(A(dropout(h)))``."""

    lora_A: nn.Linear
    lora_B: nn.Linear
    dropout: nn.Module
    scaling: float


def _own_class(model: Any) -> type:
    """Returns the model's own class, seen through the ``FSDP<Name>`` subclass that FSDP2's ``fully_shard`` swaps in."""
    cls = type(model)
    from torch.distributed.fsdp import FSDPModule

    if len(cls.__bases__) == 2 and cls.__bases__[0] is FSDPModule and cls.__name__ == f"FSDP{cls.__bases__[1].__name__}":
        return cls.__bases__[1]
    return cls


def _unwrap_causal_lm(model: Any) -> tuple[Any, str | None]:
    """Returns (the causal LM itself, None), or (None, reason) for a wrapper that is not a PEFT LoRA model."""
    if not is_peft_model(model):
        return model, None
    tuner = model.base_model
    if _own_class(tuner).__name__ != "LoraModel":
        return None, f"a PEFT {type(tuner).__name__} wrapper (only LoRA is unwrapped)"
    return tuner.model, None


def _output_projection(head: Any) -> tuple[nn.Linear | None, list[_LoraTerm], str | None]:
    """Returns (the plain linear output projection, its active LoRA terms, None), or (None, [], reason)."""
    if type(head) is nn.Linear:
        return head, [], None
    base = getattr(head, "base_layer", None)
    if not (type(head).__module__.startswith("peft.tuners.lora") and type(base) is nn.Linear):
        return None, [], f"lm_head is {type(head).__name__}, not a plain torch.nn.Linear or a LoRA Linear around one"
    if head.disable_adapters or head.merged:
        return base, [], None  # the base layer alone is the projection (merged: the delta is in its weight)
    terms = []
    for adapter in head.active_adapters:
        if adapter not in head.lora_A:
            continue
        if adapter in getattr(head, "lora_variant", {}) or head.lora_B[adapter].bias is not None:
            return None, [], f"lm_head's adapter {adapter!r} is a LoRA variant (DoRA, bias …) the fused path does not model"
        terms.append(_LoraTerm(head.lora_A[adapter], head.lora_B[adapter], head.lora_dropout[adapter],
                               float(head.scaling[adapter])))
    return base, terms, None


def fused_unsupported_reason(model: Any) -> str | None:
    """Returns why ``model`` cannot take the fused path, or None when it can.

    Supported: the Hugging Face causal LMs listed in ``_FUSED_MODELS`` (Qwen2/2.5, Qwen3, Llama,
    Mistral, Gemma2, Granite) with a plain ``nn.Linear`` output projection, and PEFT LoRA
    wrappers of them (``reasontune.lora.apply_lora``), whose ``lm_head`` may be adapted.
    """
    model, reason = _unwrap_causal_lm(model)
    if reason is not None:
        return reason
    cls = _own_class(model)
    name = cls.__name__
    if name not in _FUSED_MODELS or not cls.__module__.startswith("transformers.models."):
        return f"{cls.__module__}.{name} is not a causal LM whose logit computation is known"
    head = getattr(model, "lm_head", None)
    _, _, reason = _output_projection(head)
    if reason is not None:
        return reason
    if model.get_output_embeddings() is not head:
        return "get_output_embeddings() is not lm_head"
    if not isinstance(getattr(model, "model", None), nn.Module):
        return "the model has no .model body"
    transform = _FUSED_MODELS[name](model.config)
    if transform.softcap is not None and not transform.softcap > 0:
        return f"unsupported logit softcap {transform.softcap!r}"
    return None


# ---------------------------------------------------------------------------------------------
# Per-chunk kernels, shared by the fused and chunked autograd Functions.
#
# For one row z (float32 logits after the transform), p = softmax(z), log p = z - lse(z):
#   log_prob = z[label] - lse(z)                d log_prob / d z_j = onehot_j - p_j
#   H = -sum_j p_j log p_j = lse(z) - sum_j p_j z_j
#   d H / d z_j = p_j - (p_j + sum_i z_i p_i (delta_ij - p_j)) = -p_j (z_j - sum_i p_i z_i)
#               = -p_j (log p_j + H)
# so d z = g_lp * (onehot - p) - g_H * p * (log p + H) = g_lp * onehot - p * (g_lp + g_H (log p + H)).
# Through the transform: raw -> u = scale * raw -> z = c tanh(u / c), dz/du = 1 - tanh(u / c)^2.
# ---------------------------------------------------------------------------------------------


def _transformed_float32(raw: torch.Tensor, transform: LogitTransform, fresh: bool,
                         keep_softcap_derivative: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Returns ``(z, dz/du or None)``: float32 logits of a chunk, never aliasing ``raw`` unless ``fresh``."""
    z = raw.to(_work_dtype(raw.dtype), copy=not fresh)
    if transform.scale != 1.0:
        z.mul_(transform.scale)
    derivative = None
    if transform.softcap is not None:
        z.div_(transform.softcap).tanh_()
        if keep_softcap_derivative:
            derivative = 1.0 - z.square()
        z.mul_(transform.softcap)
    if transform.temperature != 1.0:
        z.div_(transform.temperature)
    return z, derivative


def _softmax_inplace(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(log p, p)`` of float32 logits ``z`` (n, V); ``log p`` is ``z``'s buffer, rewritten.

    Shifting by the row maximum first keeps ``log p`` exact to float32 rounding even at logits
    of ±1e4, where ``z - logsumexp(z)`` would lose ~1e-3 to the rounding of the large logsumexp.
    Two (n, V) buffers in all: no temporary beyond ``p``.
    """
    z.sub_(z.amax(dim=-1, keepdim=True))
    p = z.exp()
    total = p.sum(dim=-1, keepdim=True)
    p.div_(total)
    return z.sub_(total.log_()), p


def _chunk_statistics(raw: torch.Tensor, labels: torch.Tensor | None, transform: LogitTransform,
                      fresh: bool, with_entropy: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Returns ``(log_prob (n,) float32 or None, entropy (n,) float32 or None)`` of a logits chunk (n, V)."""
    z, _ = _transformed_float32(raw, transform, fresh, keep_softcap_derivative=False)
    del raw
    log_p, p = _softmax_inplace(z)
    log_prob = None if labels is None else log_p.gather(1, labels.unsqueeze(1)).squeeze(1)
    # H = -sum p log p, the product built in p's buffer (p is not needed after) and summed by
    # torch's pairwise reduction: a bmm dot product accumulates serially and loses ~1e-5.
    entropy = -p.mul_(log_p).sum(dim=-1) if with_entropy else None
    return log_prob, entropy


def _chunk_grad_raw(raw: torch.Tensor, labels: torch.Tensor | None, transform: LogitTransform, fresh: bool,
                    grad_log_prob: torch.Tensor | None, grad_entropy: torch.Tensor | None,
                    entropy: torch.Tensor | None) -> torch.Tensor:
    """Returns d loss / d raw logits (n, V) float32 for a chunk, from the output gradients (n,)."""
    z, softcap_derivative = _transformed_float32(raw, transform, fresh, keep_softcap_derivative=True)
    del raw
    log_p, p = _softmax_inplace(z)
    if grad_entropy is not None:
        # coefficient_j = g_lp + g_H (log p_j + H), built in the log_p buffer.
        coefficient = log_p.add_(entropy.unsqueeze(1)).mul_(grad_entropy.unsqueeze(1))
        if grad_log_prob is not None:
            coefficient.add_(grad_log_prob.unsqueeze(1))
        grad = p.mul_(coefficient).neg_()
        del coefficient
    else:
        del log_p
        grad = p.mul_(-grad_log_prob.unsqueeze(1))
    if grad_log_prob is not None:
        grad.scatter_add_(1, labels.unsqueeze(1), grad_log_prob.unsqueeze(1))
    if softcap_derivative is not None:
        grad.mul_(softcap_derivative)
    if transform.scale != 1.0 or transform.temperature != 1.0:
        grad.mul_(transform.scale / transform.temperature)
    return grad


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Returns float32 for float32 and lower precisions; float64 stays float64 (for gradcheck)."""
    return torch.promote_types(dtype, torch.float32)


def _work_grad(grad: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if grad is None else grad.to(_work_dtype(dtype))


class _FusedLinearLogProbs(torch.autograd.Function):
    """log-probs and entropy of ``transform(hidden @ weight.T + bias [+ lora_hidden @ lora_weight.T])``, chunked over tokens.

    The optional low-rank term is a LoRA-adapted output projection: ``lora_hidden`` (tokens, r)
    is ``scaling * lora_A(dropout(hidden))`` computed by the caller (so autograd carries its
    gradient on to ``lora_A`` and ``hidden``) and ``lora_weight`` (V, r) is ``lora_B``'s weight.
    Forward saves only the inputs and the entropies; backward recomputes each chunk's logits and
    accumulates the gradients of ``hidden``, ``weight``, ``bias``, ``lora_hidden`` and
    ``lora_weight``. Peak extra memory: two ``(chunk_size, V)`` float32 buffers (plus the chunk's
    logits in the weight's dtype when that is not float32) and one gradient buffer the size of
    each weight that needs one.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk_size, transform, with_entropy, lora_hidden=None,
                lora_weight=None):
        tokens = hidden.shape[0]
        log_probs = hidden.new_empty(tokens, dtype=_work_dtype(hidden.dtype))
        entropy = hidden.new_empty(tokens if with_entropy else 0, dtype=_work_dtype(hidden.dtype))
        for start in range(0, tokens, chunk_size):
            stop = min(start + chunk_size, tokens)
            # The chunk's logits are passed without a local name so the callee can free them.
            chunk_log_probs, chunk_entropy = _chunk_statistics(
                _projected_chunk(hidden, weight, bias, lora_hidden, lora_weight, slice(start, stop)),
                labels[start:stop], transform, fresh=True, with_entropy=with_entropy)
            log_probs[start:stop] = chunk_log_probs
            if with_entropy:
                entropy[start:stop] = chunk_entropy
        ctx.save_for_backward(hidden, weight, bias, labels, entropy, lora_hidden, lora_weight)
        ctx.chunk_size, ctx.transform, ctx.with_entropy = chunk_size, transform, with_entropy
        ctx.set_materialize_grads(False)
        if not with_entropy:
            ctx.mark_non_differentiable(entropy)
        return log_probs, entropy

    @staticmethod
    def backward(ctx, grad_log_probs, grad_entropy):
        hidden, weight, bias, labels, entropy, lora_hidden, lora_weight = ctx.saved_tensors
        if not ctx.with_entropy:
            grad_entropy = None
        grad_log_probs = _work_grad(grad_log_probs, hidden.dtype)
        grad_entropy = _work_grad(grad_entropy, hidden.dtype)
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        need_lora_hidden, need_lora_weight = ctx.needs_input_grad[7:9] if len(ctx.needs_input_grad) > 7 else (False,) * 2
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        # Accumulated in the weight's dtype, one rounding per chunk (as Liger's fused kernels do):
        # a float32 buffer for a bf16 weight would cost as much as several chunks.
        grad_weight = torch.zeros_like(weight) if need_weight else None
        grad_bias = torch.zeros(weight.shape[0], dtype=_work_dtype(weight.dtype), device=weight.device) \
            if need_bias else None
        grad_lora_hidden = torch.zeros_like(lora_hidden) if need_lora_hidden else None
        grad_lora_weight = torch.zeros_like(lora_weight) if need_lora_weight else None
        if grad_log_probs is not None or grad_entropy is not None:
            for start in range(0, hidden.shape[0], ctx.chunk_size):
                rows = slice(start, min(start + ctx.chunk_size, hidden.shape[0]))
                grad_raw = _chunk_grad_raw(
                    _projected_chunk(hidden, weight, bias, lora_hidden, lora_weight, rows), labels[rows],
                    ctx.transform, fresh=True,
                    grad_log_prob=None if grad_log_probs is None else grad_log_probs[rows],
                    grad_entropy=None if grad_entropy is None else grad_entropy[rows],
                    entropy=entropy[rows] if grad_entropy is not None else None,
                )
                if need_bias:
                    grad_bias += grad_raw.sum(dim=0)
                grad_raw = grad_raw.to(weight.dtype)
                if need_hidden:
                    grad_hidden[rows] = grad_raw @ weight
                if need_weight:
                    grad_weight.addmm_(grad_raw.t(), hidden[rows].to(weight.dtype))
                if need_lora_hidden:
                    grad_lora_hidden[rows] = (grad_raw @ lora_weight.to(weight.dtype)).to(lora_hidden.dtype)
                if need_lora_weight:
                    grad_lora_weight.addmm_(grad_raw.t().to(lora_weight.dtype), lora_hidden[rows].to(lora_weight.dtype))
                del grad_raw  # before the next chunk's logits exist, or two chunks' buffers overlap
        elif need_hidden:
            grad_hidden.zero_()
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, grad_lora_hidden, grad_lora_weight


def _projected_chunk(hidden, weight, bias, lora_hidden, lora_weight, rows: slice) -> torch.Tensor:
    """Returns a fresh (n, V) tensor of raw logits of ``hidden[rows]`` (weight's dtype), with the low-rank term when given."""
    raw = F.linear(hidden[rows], weight, bias)
    if lora_hidden is not None:
        raw.addmm_(lora_hidden[rows].to(raw.dtype), lora_weight.t().to(raw.dtype))
    return raw


class _ChunkedLogitsStatistics(torch.autograd.Function):
    """log-probs and entropy of given logits rows, float32 work one chunk at a time.

    ``logits`` is (N, V) in any float dtype; ``rows`` (n,) int64 selects the rows to compute
    (None: all). Backward writes d logits (N, V, the logits' dtype) chunk by chunk, recomputing
    each chunk's float32 softmax.
    """

    @staticmethod
    def forward(ctx, logits, rows, labels, chunk_size, transform, with_log_probs, with_entropy):
        tokens = logits.shape[0] if rows is None else rows.shape[0]
        log_probs = logits.new_empty(tokens if with_log_probs else 0, dtype=_work_dtype(logits.dtype))
        entropy = logits.new_empty(tokens if with_entropy else 0, dtype=_work_dtype(logits.dtype))
        for start in range(0, tokens, chunk_size):
            stop = min(start + chunk_size, tokens)
            chunk_log_probs, chunk_entropy = _chunk_statistics(
                logits[start:stop] if rows is None else logits[rows[start:stop]],
                labels[start:stop] if with_log_probs else None, transform,
                fresh=rows is not None, with_entropy=with_entropy)
            if with_log_probs:
                log_probs[start:stop] = chunk_log_probs
            if with_entropy:
                entropy[start:stop] = chunk_entropy
        ctx.save_for_backward(logits, rows, labels, entropy)
        ctx.chunk_size, ctx.transform = chunk_size, transform
        ctx.with_log_probs, ctx.with_entropy = with_log_probs, with_entropy
        ctx.set_materialize_grads(False)
        for output, wanted in ((log_probs, with_log_probs), (entropy, with_entropy)):
            if not wanted:
                ctx.mark_non_differentiable(output)
        return log_probs, entropy

    @staticmethod
    def backward(ctx, grad_log_probs, grad_entropy):
        logits, rows, labels, entropy = ctx.saved_tensors
        grad_log_probs = _work_grad(grad_log_probs, logits.dtype) if ctx.with_log_probs else None
        grad_entropy = _work_grad(grad_entropy, logits.dtype) if ctx.with_entropy else None
        if not ctx.needs_input_grad[0]:
            return (None,) * 7
        grad_logits = torch.zeros_like(logits) if rows is not None or (
            grad_log_probs is None and grad_entropy is None) else torch.empty_like(logits)
        if grad_log_probs is None and grad_entropy is None:
            return (grad_logits,) + (None,) * 6
        tokens = logits.shape[0] if rows is None else rows.shape[0]
        for start in range(0, tokens, ctx.chunk_size):
            stop = min(start + ctx.chunk_size, tokens)
            selected = slice(start, stop) if rows is None else rows[start:stop]
            grad_raw = _chunk_grad_raw(
                logits[selected], None if labels is None else labels[start:stop], ctx.transform,
                fresh=rows is not None,
                grad_log_prob=None if grad_log_probs is None else grad_log_probs[start:stop],
                grad_entropy=None if grad_entropy is None else grad_entropy[start:stop],
                entropy=entropy[start:stop] if grad_entropy is not None else None,
            )
            grad_logits[selected] = grad_raw.to(logits.dtype)
            del grad_raw
        return (grad_logits,) + (None,) * 6


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def compute_entropy(logits: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
    """Returns the entropy of ``softmax(logits)`` over the last axis, float32, shape ``logits.shape[:-1]``.

    Computed in float32 (any input dtype), shifted by each row's maximum, so it is exact to
    float32 rounding at logits of ±1e4; uniform logits give log V, a one-hot (one finite logit
    far above the rest) gives 0. Rows are processed ``chunk_size`` at a time (default: a float32
    chunk of ~128 MB), so a bf16 ``[batch, seq, vocab]`` input never has a full float32 copy.
    Differentiable.

    Args:
        logits: (..., V) float (float32, bfloat16 or float16).
        chunk_size: rows per chunk; None picks ``default_chunk_size(V)``.

    Returns:
        (...) float32.
    """
    vocab_size = logits.shape[-1]
    flat = logits.reshape(-1, vocab_size)
    chunk_size = chunk_size or default_chunk_size(vocab_size)
    _, entropy = _ChunkedLogitsStatistics.apply(flat, None, None, chunk_size, LogitTransform(), False, True)
    return entropy.reshape(logits.shape[:-1])


def get_response_log_probs(
    model: Any,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    return_token_entropy: bool = False,
    *,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    response_mask: torch.Tensor | None = None,
    implementation: Implementation = "auto",
    chunk_size: int | None = None,
    temperature: float = 1.0,
    **model_kwargs: Any,
) -> dict[str, torch.Tensor]:
    """Returns per-token log-probabilities of ``labels`` (and entropies) under ``model``.

    ``log_probs[i, t] = log_softmax(model(input_ids).logits[i, t])[labels[i, t]]``, unmasked
    unless ``response_mask`` is given. Gradients flow to the model when the caller enables
    them; no float32 ``[batch, seq, vocab]`` tensor is held beyond one chunk of tokens, in
    forward or backward (except by ``implementation="naive"``, and, on the chunked path, the
    model's own logits when the model itself is float32).

    Args:
        model: a causal LM (``model(input_ids=…, attention_mask=…, position_ids=…).logits``).
        input_ids: (batch, seq) int64.
        labels: (batch, seq) int64, the token each position predicts; valid vocabulary ids
            wherever log-probs are computed.
        return_token_entropy: also return the entropy of each position's next-token distribution.
        attention_mask: (batch, seq) 0/1, passed to the model (None: all ones).
        position_ids: (batch, seq) int64, passed to the model (packing restarts them per sequence).
        **model_kwargs: further keyword arguments of the model forward, e.g. the flash-attention
            varlen boundaries (``cu_seq_lens_q/k``, ``max_length_q/k``) from ``packed_forward_kwargs``.
        response_mask: (batch, seq) bool; when given, only the True positions go through the
            output projection and softmax, and every other position gets log-prob 0, entropy 0
            and no gradient. Pass the SFT ``response_mask`` to skip prompt and padding tokens.
        implementation: ``"fused"`` (model body to hidden states, then projection + softmax
            chunk by chunk with recomputation in backward), ``"chunked"`` (the model's logits,
            float32 softmax chunk by chunk), ``"naive"`` (full float32 log-softmax, reference
            only), or ``"auto"``: fused when ``fused_unsupported_reason(model)`` is None, else
            chunked. ``"fused"`` on an unsupported model raises ValueError.
        chunk_size: tokens per chunk; None picks ``default_chunk_size(vocab)`` (220 tokens at
            vocabulary 151,936, a 128 MB float32 chunk).
        temperature: the log-probs (and entropies) are those of ``softmax(logits / temperature)``,
            the distribution a generator samples from at that temperature (> 0).

    Returns:
        log_probs: (batch, seq) float32.
        token_entropy: (batch, seq) float32, only when ``return_token_entropy``.
    """
    if input_ids.shape != labels.shape or input_ids.dim() != 2:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} and labels {tuple(labels.shape)} must both be (batch, seq)")
    if response_mask is not None and response_mask.shape != labels.shape:
        raise ValueError(f"response_mask {tuple(response_mask.shape)} must match labels {tuple(labels.shape)}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of tokens, got {chunk_size}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    model_inputs = {"attention_mask": attention_mask, "position_ids": position_ids, **model_kwargs}

    if implementation == "auto":
        implementation = "fused" if fused_unsupported_reason(model) is None else "chunked"
    if implementation == "naive":
        return _naive_log_probs(model, input_ids, labels, return_token_entropy, response_mask, model_inputs, temperature)
    if implementation not in ("fused", "chunked"):
        raise ValueError(f"unknown implementation {implementation!r}; expected auto, fused, chunked or naive")

    batch, seq = labels.shape
    rows = None if response_mask is None else response_mask.reshape(-1).nonzero().squeeze(1)
    selected_labels = labels.reshape(-1) if rows is None else labels.reshape(-1)[rows]

    if implementation == "fused":
        reason = fused_unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"implementation='fused' is not available for this model: {reason}; "
                             "use implementation='chunked' (or 'auto', which falls back to it)")
        causal_lm, _ = _unwrap_causal_lm(model)
        head, lora_terms, _ = _output_projection(causal_lm.lm_head)
        _check_labels(selected_labels, head.out_features)
        hidden = _body_hidden_states(model, causal_lm, input_ids, model_inputs).reshape(batch * seq, -1)
        if rows is not None:
            hidden = hidden[rows]
        # An adapted lm_head adds sum_k scaling_k B_k A_k dropout_k(h): the rank-r inputs
        # scaling_k A_k dropout_k(h) are small (tokens, r) tensors built here with autograd, and
        # the B_k join the chunked projection, so the adapted logits never exist in full either.
        lora_hidden = lora_weight = None
        if lora_terms:
            lora_hidden = torch.cat([term.lora_A(term.dropout(hidden.to(term.lora_A.weight.dtype))) * term.scaling
                                     for term in lora_terms], dim=-1)
            lora_weight = torch.cat([term.lora_B.weight for term in lora_terms], dim=-1)
        log_probs, entropy = _FusedLinearLogProbs.apply(
            hidden, head.weight, head.bias, selected_labels,
            chunk_size or default_chunk_size(head.out_features),
            dataclasses.replace(_FUSED_MODELS[_own_class(causal_lm).__name__](causal_lm.config), temperature=temperature),
            return_token_entropy, lora_hidden, lora_weight)
    else:
        logits = model(input_ids=input_ids, use_cache=False, **model_inputs).logits
        vocab_size = logits.shape[-1]
        _check_labels(selected_labels, vocab_size)
        log_probs, entropy = _ChunkedLogitsStatistics.apply(
            logits.reshape(batch * seq, vocab_size), rows, selected_labels,
            chunk_size or default_chunk_size(vocab_size), LogitTransform(temperature=temperature), True,
            return_token_entropy)

    result = {"log_probs": _scatter_rows(log_probs, rows, batch, seq)}
    if return_token_entropy:
        result["token_entropy"] = _scatter_rows(entropy, rows, batch, seq)
    return result


def _body_hidden_states(model: Any, causal_lm: Any, input_ids: torch.Tensor, model_inputs: dict) -> torch.Tensor:
    """Returns the decoder body's last hidden states (batch, seq, hidden), from a forward of the whole ``model``.

    The whole model runs, not its body alone, so that a wrapper's hooks fire: FSDP2 all-gathers
    the root's own parameters (embeddings, final norm, lm_head) in the root's pre-forward hook,
    keeps them gathered through backward (``shard_model``: the root does not reshard after
    forward) and reduce-scatters their gradients once backward is done. Its output projection
    runs on no position (``logits_to_keep`` empty): the caller projects the hidden states itself.
    """
    captured = []
    handle = causal_lm.model.register_forward_hook(lambda module, args, output: captured.append(output.last_hidden_state))
    try:
        model(input_ids=input_ids, use_cache=False, logits_to_keep=input_ids.new_empty(0), **model_inputs)
    finally:
        handle.remove()
    (hidden,) = captured
    return hidden


def _check_labels(labels: torch.Tensor, vocab_size: int) -> None:
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= vocab_size):
        raise ValueError(f"labels must be token ids in [0, {vocab_size}) at every computed position, got values in "
                         f"[{int(labels.min())}, {int(labels.max())}]; pass response_mask to skip ignored positions")


def _scatter_rows(values: torch.Tensor, rows: torch.Tensor | None, batch: int, seq: int) -> torch.Tensor:
    """Returns (batch, seq) float32: ``values`` (n,) at ``rows`` of the flattened grid, 0 elsewhere."""
    if rows is None:
        return values.view(batch, seq)
    return values.new_zeros(batch * seq).index_put((rows,), values).view(batch, seq)


def _naive_log_probs(model, input_ids, labels, return_token_entropy, response_mask, model_inputs, temperature=1.0):
    """The seeds' straightforward version: full float32 log-softmax, gather, entropy via log-softmax."""
    logits = model(input_ids=input_ids, use_cache=False, **model_inputs).logits.float() / temperature
    log_probs_all = F.log_softmax(logits, dim=-1)
    log_probs = torch.gather(log_probs_all, dim=-1, index=labels.unsqueeze(-1)).squeeze(-1)
    result = {"log_probs": log_probs}
    if return_token_entropy:
        log_p = F.log_softmax(logits, dim=-1)
        result["token_entropy"] = -torch.sum(torch.exp(log_p) * log_p, dim=-1)
    if response_mask is not None:
        result = {key: torch.where(response_mask, value, torch.zeros((), device=value.device))
                  for key, value in result.items()}
    return result
