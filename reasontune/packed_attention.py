"""Packed attention for sdpa: each packed example attends through its own causal sdpa call.

A packed microbatch under plain sdpa needs a block-causal ``(rows, 1, T, T)`` mask
(``batching.block_causal_attention_mask``): every query scores every key of its row, masked
or not, and a mask keeps the kernel from skipping the upper triangle. Here the segments of the
packed rows (``batching.varlen_attention_kwargs``: ``cu_seq_lens_q``) go one by one through
transformers' own sdpa forward with ``is_causal`` and no mask, which scores only the lower
triangle of each example: on SmolLM2 at 512-token rows this cut the attention time of an SFT
step about fourfold (bench/sft_throughput.py says what it buys end to end). The results equal
those of each example alone (tests/test_packing.py, against a float64 forward per example).

``VARLEN_SDPA`` is registered with transformers' ``AttentionInterface``; it has no mask
function there, so the model builds no mask for it. ``packed_attention(model)`` switches a
sdpa model to it for the forwards of packed microbatches only, and back.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from reasontune.batching import VARLEN_SDPA


def varlen_sdpa_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                  attention_mask: torch.Tensor | None, *, cu_seq_lens_q: torch.Tensor | None = None,
                                  cu_seq_lens_k: torch.Tensor | None = None, **kwargs: Any
                                  ) -> tuple[torch.Tensor, None]:
    """Returns ``(attention output (rows, T, heads, head_dim), None)``, each segment of the flattened rows attending causally to itself.

    ``query`` is (rows, heads, T, head_dim), ``key``/``value`` (rows, kv_heads, T, head_dim);
    ``cu_seq_lens_q`` the segment boundaries over the rows read as one sequence of rows × T
    tokens (segments never cross rows). Refuses a mask or a missing ``cu_seq_lens_q``: this
    kernel serves packed forwards only.
    """
    if attention_mask is not None or cu_seq_lens_q is None:
        raise ValueError(f"{VARLEN_SDPA} runs packed forwards only: pass cu_seq_lens_q (batching.packed_forward_kwargs) "
                         "and no attention mask")
    if cu_seq_lens_k is not None and not torch.equal(cu_seq_lens_k, cu_seq_lens_q):
        raise ValueError(f"{VARLEN_SDPA}: query and key segments must be the same (no cache)")
    rows, _, width, _ = query.shape

    def flat(states: torch.Tensor) -> torch.Tensor:  # (rows, h, T, d) -> (1, h, rows * T, d)
        return states if rows == 1 else states.transpose(0, 1).reshape(1, states.shape[1], rows * width, -1)

    query, key, value = flat(query), flat(key), flat(value)
    bounds = cu_seq_lens_q.tolist()
    kwargs.pop("is_causal", None)
    outputs = [sdpa_attention_forward(module, query[:, :, start:stop], key[:, :, start:stop], value[:, :, start:stop],
                                      None, is_causal=True, **kwargs)[0]
               for start, stop in zip(bounds[:-1], bounds[1:])]
    output = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)  # (1, rows * T, heads, head_dim)
    return output.reshape(rows, width, *output.shape[2:]), None


AttentionInterface.register(VARLEN_SDPA, varlen_sdpa_attention_forward)


def packed_kernel(attn_implementation: str) -> str:
    """Returns the attention kernel a packed forward runs with: ``VARLEN_SDPA`` for a sdpa model, else the model's own."""
    return VARLEN_SDPA if attn_implementation == "sdpa" else attn_implementation


@contextlib.contextmanager
def packed_attention(model: Any, kernel: str) -> Iterator[None]:
    """Runs the block with ``model``'s attention kernel set to ``kernel`` (from ``packed_kernel``), then restores it.

    Only the forward looks the kernel up; the backward of a forward run inside follows it.
    """
    config = model.config
    previous = config._attn_implementation
    if kernel == previous:
        yield
        return
    config._attn_implementation = kernel
    try:
        yield
    finally:
        config._attn_implementation = previous
