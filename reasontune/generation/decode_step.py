"""One decode step of a Llama-family causal LM written out over the model's own modules, for ``HFGenerator``'s loop.

At a decode step (one new token per row) a small model on a CPU spends a quarter of its time
outside the matrix multiplies: the HF forward builds a 4-D mask, runs flash attention's kernel
for a query of length one, and calls three projections where one would do. This step calls
the model's own embedding, norms, rotary embedding and ``apply_rotary_pos_emb`` (so those are
the model's arithmetic exactly) and replaces three things:

- the query/key/value projections and the gate/up projections run as one matrix multiply
  each, over weights concatenated once (``fused``), rebuilt on ``refresh()`` (the generator
  calls it at the start of every ``generate``: torch's fused AdamW moves no version counter)
  and whenever a source weight's version counter or storage changes;
- attention over the preallocated cache is two batched products per (row, key-value head)
  with the group's query heads stacked (no repeat of the keys), an additive mask kept by the
  loop and one float32 softmax, as HF's eager attention computes it;
- no mask or cache object is built per step.

``transposed``: every projection (q/k/v, o, gate/up, down) and the LM head runs as
``torch.mm(x, w_t)`` over a contiguous transposed copy ``w_t`` (in, out) of its weight, made
once and remade when a source weight changes, as the fused ones are. On a CPU at decode
shapes (a few to a few dozen rows) that is faster than ``F.linear`` with the (out, in) weight
(on SmolLM2-135M the decode step spent 72% of its time in ``aten::mm``; ``bench/generation.py
--sections ablation`` prints what the copies buy). It holds a copy of every projection weight
and of the LM head (its own copy even when tied to the embedding): for SmolLM2-135M, 134.5M
floats, about 540 MB in float32 (the fused copies are these transposed ones, not extra).

Only plain Llama / Qwen2 / Mistral layers qualify (``DecodeStep.unsupported_reason`` says
why another model does not, and the loop then runs the model's own forward): SiLU MLP, no
query/key norms, no sliding window, no adapter wrappers. Float results differ from HF's
forward in the last bits (another attention kernel); greedy tokens and log-probs are tested
against it.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

_MODEL_TYPES = ("llama", "qwen2", "mistral")


def unsupported_reason(model) -> str | None:
    """Returns why ``DecodeStep`` cannot run ``model`` (None: it can)."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "model_type", None) not in _MODEL_TYPES:
        return f"model type {getattr(config, 'model_type', None)!r} is not one of {', '.join(_MODEL_TYPES)}"
    if hasattr(model, "get_base_model") or hasattr(model, "peft_config"):
        return "an adapter-wrapped model (its projections are not plain linear layers)"
    if getattr(config, "hidden_act", None) != "silu":
        return f"hidden_act {config.hidden_act!r} (only silu)"
    if getattr(config, "use_sliding_window", False) or "sliding_attention" in (getattr(config, "layer_types", None) or ()):
        return "sliding-window attention"
    base = getattr(model, "model", None)
    if base is None or not hasattr(base, "layers") or not hasattr(base, "rotary_emb"):
        return "no model.layers / model.rotary_emb"
    for layer in base.layers:
        attention, mlp = layer.self_attn, layer.mlp
        projections = [getattr(attention, name, None) for name in ("q_proj", "k_proj", "v_proj", "o_proj")]
        projections += [getattr(mlp, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
        if any(type(p) is not torch.nn.Linear for p in projections):
            return "a projection that is not a plain torch.nn.Linear"
        if hasattr(attention, "q_norm") or hasattr(attention, "k_norm"):
            return "query/key norms"
        if any(m._forward_hooks or m._forward_pre_hooks for m in layer.modules()):
            return "forward hooks on a decoder layer"
    return None


class DecodeStep:
    """Runs one decode step of a supported model (see the module docstring): new tokens (rows,) → logits (rows, vocab).

    ``fused``: one matmul for q/k/v and one for gate/up over concatenated weights (an extra
    copy of those weights is held); otherwise the model's own projection modules.
    ``transposed``: every projection and the LM head as ``torch.mm`` over transposed copies.
    """

    def __init__(self, model, fused: bool = True, transposed: bool = False):
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"DecodeStep cannot run this model: {reason}")
        self.model, self.fused, self.transposed = model, fused, transposed
        base = model.model
        first = base.layers[0].self_attn
        self.head_dim = first.head_dim
        self.heads = model.config.num_attention_heads
        self.kv_heads = model.config.num_key_value_heads
        self.scaling = first.scaling
        self.apply_rotary = sys.modules[type(first).__module__].apply_rotary_pos_emb
        self._fused_weights: list[tuple] | None = None
        self._head: tuple | None = None
        self._versions: list[tuple[int, int]] | None = None

    def refresh(self) -> None:
        """Returns nothing; the held copies are remade from the model's weights at the next step (updates no counter saw)."""
        self._versions = None

    def _linears(self, layer) -> tuple:
        attention, mlp = layer.self_attn, layer.mlp
        return (attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj,
                mlp.gate_proj, mlp.up_proj, mlp.down_proj)

    def _sources(self) -> list[torch.Tensor]:
        """Returns every tensor the held copies are made from (with ``transposed``, the o/down projections and LM head too)."""
        tensors = []
        for layer in self.model.model.layers:
            linears = self._linears(layer)
            for linear in linears if self.transposed else linears[:3] + linears[4:6]:
                tensors.append(linear.weight)
                if linear.bias is not None:
                    tensors.append(linear.bias)
        if self.transposed:
            tensors.append(self.model.lm_head.weight)
            if self.model.lm_head.bias is not None:
                tensors.append(self.model.lm_head.bias)
        return tensors

    def _weights(self) -> list[tuple]:
        """Returns per layer ((weight, bias) of q/k/v, of o, of gate/up, of down), rebuilt if any source tensor changed since.

        Unfused, q/k/v and gate/up are tuples of (weight, bias) per projection; without
        ``transposed``, o and down are None (their modules run) and the weights are (out, in);
        with it, every weight is a contiguous (in, out) copy.
        """
        sources = self._sources()
        versions = [(t._version, t.data_ptr()) for t in sources]
        if self._fused_weights is None or versions != self._versions:
            self._fused_weights = self._head = None  # the old copies go before the new ones are made
            orient = (lambda w: w.detach().t().contiguous()) if self.transposed else (lambda w: w.detach())

            def own(linears):
                if len(linears) == 1 or not self.fused:
                    pairs = tuple((orient(p.weight), None if p.bias is None else p.bias.detach()) for p in linears)
                    return pairs[0] if len(linears) == 1 else pairs
                weight = torch.cat([p.weight.detach() for p in linears])
                has_bias = [p.bias is not None for p in linears]
                if any(has_bias) and not all(has_bias):
                    raise ValueError("fused projections where only some have a bias")
                bias = torch.cat([p.bias.detach() for p in linears]) if all(has_bias) else None
                return orient(weight), bias

            weights = []
            for layer in self.model.model.layers:
                q, k, v, o, gate, up, down = self._linears(layer)
                if self.transposed:
                    weights.append((own((q, k, v)), own((o,)), own((gate, up)), own((down,))))
                else:
                    weights.append((own((q, k, v)), None, own((gate, up)), None))
            head = self.model.lm_head
            if self.transposed:
                self._head = (orient(head.weight), None if head.bias is None else head.bias.detach())
            self._fused_weights, self._versions = weights, versions
        return self._fused_weights

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, layers, mask_bias: torch.Tensor) -> torch.Tensor:
        """Returns the logits (rows, vocab) after feeding ``tokens`` (rows,) at ``positions`` (rows,).

        ``layers``: the cache's ``_PreallocatedLayer`` per decoder layer (each step's keys and
        values are written into it). ``mask_bias``: (rows, cached positions + 1) float, 0 where a
        position may be attended to and the dtype's minimum where not (padding).
        """
        base = self.model.model
        rows, d = tokens.shape[0], self.head_dim
        q_width, kv_width = self.heads * d, self.kv_heads * d
        group = self.heads // self.kv_heads
        hidden = base.embed_tokens(tokens[:, None])  # (rows, 1, hidden)
        cos, sin = base.rotary_emb(hidden, positions[:, None])
        bias = mask_bias[:, None, None, :]
        own = self.fused or self.transposed
        held = self._weights() if own else [None] * len(base.layers)
        project = self._project
        for layer, cache_layer, weights in zip(base.layers, layers, held):
            attention, mlp = layer.self_attn, layer.mlp
            normed = layer.input_layernorm(hidden)
            if weights is None:
                query, key, value = attention.q_proj(normed), attention.k_proj(normed), attention.v_proj(normed)
            elif self.fused:
                query, key, value = project(normed, weights[0]).split((q_width, kv_width, kv_width), dim=-1)
            else:
                query, key, value = (project(normed, pair) for pair in weights[0])
            query = query.view(rows, 1, self.heads, d).transpose(1, 2)
            key = key.view(rows, 1, self.kv_heads, d).transpose(1, 2)
            value = value.view(rows, 1, self.kv_heads, d).transpose(1, 2)
            query, key = self.apply_rotary(query, key, cos, sin)
            keys, values = cache_layer.update(key, value)  # (rows, kv_heads, positions, d)
            grouped = query.reshape(rows, self.kv_heads, group, d)
            scores = torch.matmul(grouped, keys.transpose(2, 3)).mul_(self.scaling).add_(bias)
            probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
            attended = torch.matmul(probs, values).reshape(rows, 1, q_width)
            hidden = hidden + (project(attended, weights[1]) if self.transposed else attention.o_proj(attended))
            normed = layer.post_attention_layernorm(hidden)
            if weights is None:
                gate, up = mlp.gate_proj(normed), mlp.up_proj(normed)
            elif self.fused:
                gate, up = project(normed, weights[2]).chunk(2, dim=-1)
            else:
                gate, up = (project(normed, pair) for pair in weights[2])
            activated = mlp.act_fn(gate) * up
            hidden = hidden + (project(activated, weights[3]) if self.transposed else mlp.down_proj(activated))
        normed = base.norm(hidden)
        if self.transposed:
            return project(normed, self._head)[:, -1]
        return self.model.lm_head(normed)[:, -1]

    def _project(self, x: torch.Tensor, pair: tuple) -> torch.Tensor:
        """Returns ``x`` (rows, 1, in) through one held (weight, bias): (in, out) with ``transposed``, else (out, in)."""
        weight, bias = pair
        if not self.transposed:
            return F.linear(x, weight, bias)
        flat = x.reshape(-1, x.shape[-1])
        out = torch.mm(flat, weight) if bias is None else torch.addmm(bias, flat, weight)
        return out.view(*x.shape[:-1], weight.shape[1])
