"""Token-budget batching: packing several examples into one row, and dynamic batches by token count.

Packing puts several shifted examples side by side in a row. Each example keeps its own
``position_ids`` (restarting at 0) and attends only to itself, so its log-probs equal those of
the same example run alone. Which attention arguments achieve that depends on the kernel, and
``packed_forward_kwargs`` returns them:

- ``flash_attention_2``/``_3`` (and hub flash kernels): ``cu_seq_lens_q/k`` and
  ``max_length_q/k``, so flash-attention runs its varlen kernel over the real segments;
  ``attention_mask`` is None. No ``(s, s)`` mask is ever built.
- ``packed_attention.VARLEN_SDPA`` (what the SFT trainer runs a sdpa model's packed forwards
  with): the same varlen arguments; each segment goes through its own causal sdpa call.
- ``sdpa`` and ``eager``: an explicit 4-D block-causal mask ``(rows, 1, T, T)`` (boolean for
  sdpa, additive in the model dtype for eager, which adds the mask to the scores).

We build the sdpa/eager mask ourselves rather than rely on transformers' detection of packed
``position_ids``: in transformers 5.x that detection runs only when ``attention_mask`` is None
*and* there is no cache, and the models create a ``DynamicCache`` whenever ``use_cache`` is true
(the config default, in train mode too), so a plain ``model(input_ids, position_ids=...)`` lets
packed examples attend to each other without any warning.

Pure functions of their arguments: no I/O, no global state.
"""

from __future__ import annotations

import bisect
import random
from typing import Any, Sequence

import torch

__all__ = [
    "block_causal_attention_mask",
    "pack_examples",
    "pack_rows",
    "packed_forward_kwargs",
    "split_packed",
    "token_budget_batches",
    "varlen_attention_kwargs",
]

# The attention kernel name of reasontune.packed_attention (sdpa one packed example at a time).
VARLEN_SDPA = "reasontune_varlen_sdpa"


def _seeded_order(count: int, shuffle_seed: int | None) -> list[int]:
    order = list(range(count))
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(order)
    return order


def _windows(order: list[int], window: int | None) -> list[list[int]]:
    if window is not None and window < 1:
        raise ValueError(f"window must be positive or None, got {window}")
    size = len(order) if window is None else window
    return [order[start:start + size] for start in range(0, len(order), max(size, 1))]


def pack_rows(
    lengths: Sequence[int],
    tokens_per_row: int,
    shuffle_seed: int | None = None,
    window: int | None = None,
) -> list[list[int]]:
    """Returns rows of example indices whose ``lengths`` sum to at most ``tokens_per_row`` each.

    Best-fit decreasing bin packing: examples (in a seeded random order when ``shuffle_seed``
    is given) are cut into windows of ``window`` examples (None: one window of all); within a
    window the longest example goes first into the fullest row that still has room. Rows are
    then shuffled with the same seed. Every index appears in exactly one row; an example of
    length 0 takes no room. Within a row, indices keep the order they were placed in.

    Args:
        lengths: tokens each example occupies in a row (for shifted examples, its token count
            minus one).
        tokens_per_row: the row budget; every length must fit in it.
        shuffle_seed: seed of the example order and of the row order; None keeps input order.
        window: examples packed together at most; smaller windows mix lengths across the
            epoch at some cost in padding.
    """
    if tokens_per_row < 1:
        raise ValueError(f"tokens_per_row must be positive, got {tokens_per_row}")
    too_long = [i for i, length in enumerate(lengths) if length > tokens_per_row]
    if too_long:
        raise ValueError(f"{len(too_long)} examples are longer than tokens_per_row={tokens_per_row} "
                         f"(first: index {too_long[0]}, {lengths[too_long[0]]} tokens); truncate them first")
    if any(length < 0 for length in lengths):
        raise ValueError("lengths must be non-negative")
    rows: list[list[int]] = []
    for chunk in _windows(_seeded_order(len(lengths), shuffle_seed), window):
        chunk_rows: list[list[int]] = []
        # (room left, row number) sorted: bisect finds the fullest row with enough room.
        room: list[tuple[int, int]] = []
        for index in sorted(chunk, key=lambda i: -lengths[i]):  # stable: ties keep the seeded order
            length = lengths[index]
            position = bisect.bisect_left(room, (length, -1))
            if position == len(room):
                chunk_rows.append([index])
                bisect.insort(room, (tokens_per_row - length, len(chunk_rows) - 1))
            else:
                left, row = room.pop(position)
                chunk_rows[row].append(index)
                bisect.insort(room, (left - length, row))
        rows.extend(chunk_rows)
    if shuffle_seed is not None:
        random.Random(shuffle_seed + 1).shuffle(rows)
    return rows


def pack_examples(
    prompt_ids: Sequence[Sequence[int]],
    output_ids: Sequence[Sequence[int]],
    pad_token_id: int,
    tokens_per_row: int,
    rows_per_batch: int = 1,
    max_length: int | None = None,
    shuffle_seed: int | None = None,
    window: int | None = None,
) -> list[dict[str, Any]]:
    """Returns packed microbatches: rows of several shifted examples each, with per-example positions.

    Each example ``prompt_ids[i] + output_ids[i]`` is first cut to ``max_length`` tokens and to
    ``tokens_per_row + 1`` tokens (the tail of the output goes first, as in ``pad_and_shift``;
    an example longer than a row is truncated, never given a wider row, and counted in
    ``truncated``), then shifted *within itself*: it contributes its tokens ``[:-1]`` as inputs
    and ``[1:]`` as labels, so no label crosses an example boundary. Examples are packed into
    rows of at most ``tokens_per_row`` tokens by ``pack_rows`` and rows are grouped
    ``rows_per_batch`` at a time (the last microbatch may have fewer rows). A microbatch is as
    wide as its fullest row, ``T <= tokens_per_row``; the rest of each row is padding.

    The loss of a packed microbatch is the unpacked one when the step's example count is
    passed on: ``sft_microbatch_train_step(..., examples_in_step=sum of num_examples over the
    step's microbatches)``. Feed the model ``packed_forward_kwargs(batch, attn_implementation)``.

    Args:
        prompt_ids: token ids of each prompt (with the tokenizer's special tokens).
        output_ids: token ids of each output, same count.
        pad_token_id: id written into padding (never a label that counts: response_mask is
            False there).
        tokens_per_row: row budget, in input tokens.
        rows_per_batch: rows per microbatch; ``rows_per_batch * tokens_per_row`` bounds its
            tokens. sdpa/eager attention costs grow with the row length squared, so several
            shorter rows are cheaper there; flash-attention is happy with one long row.
        max_length: cap on prompt + output tokens per example; None keeps what fits in a row.
        shuffle_seed, window: as in ``pack_rows``.

    Returns:
        A list of microbatches, each a dict:
        input_ids: (rows, T) int64.
        labels: (rows, T) int64.
        response_mask: (rows, T) bool, True exactly where ``labels`` is an output token.
        position_ids: (rows, T) int64, 0, 1, … within each example; each run of padding also
            counts from 0 so that no kernel sees it as the continuation of an example.
        sequence_ids: (rows, T) int64, the example's number within this microbatch
            (0 … num_examples - 1, in row-major order), -1 on padding.
        example_indices: (num_examples,) int64, the input index of each packed example
            (``example_indices[k]`` is the example whose ``sequence_ids`` are k).
        response_lengths: (num_examples,) int64, output tokens kept (0: nothing to learn).
        truncated: (num_examples,) bool, whether any token of the example was cut.
        num_examples: int, examples in this microbatch (an example of fewer than two tokens
            is counted, and takes no room, as it adds nothing to the loss when unpacked either).
    """
    if len(prompt_ids) != len(output_ids):
        raise ValueError(f"got {len(prompt_ids)} prompts but {len(output_ids)} outputs")
    if len(prompt_ids) == 0:
        raise ValueError("cannot pack an empty list of examples")
    if rows_per_batch < 1:
        raise ValueError(f"rows_per_batch must be positive, got {rows_per_batch}")
    if max_length is not None and max_length < 2:
        raise ValueError(f"max_length must be at least 2 (one input and one label), got {max_length}")
    cap = tokens_per_row + 1 if max_length is None else min(max_length, tokens_per_row + 1)
    full_lengths = [len(p) + len(o) for p, o in zip(prompt_ids, output_ids)]
    lengths = [min(n, cap) for n in full_lengths]
    rows = pack_rows([max(n - 1, 0) for n in lengths], tokens_per_row, shuffle_seed=shuffle_seed, window=window)

    microbatches = []
    for start in range(0, len(rows), rows_per_batch):
        batch_rows = rows[start:start + rows_per_batch]
        width = max(1, max(sum(max(lengths[i] - 1, 0) for i in row) for row in batch_rows))
        columns: dict[str, list[list[int]]] = {key: [] for key in
                                               ("input_ids", "labels", "response_mask", "position_ids", "sequence_ids")}
        example_indices, response_lengths, truncated = [], [], []
        for row in batch_rows:
            inputs, labels, mask, positions, sequences = [], [], [], [], []
            for index in row:
                n = lengths[index]
                tokens = (list(prompt_ids[index]) + list(output_ids[index]))[:n]
                kept_prompt = min(len(prompt_ids[index]), n)
                # labels[j] is token j + 1, an output token iff j + 1 >= kept_prompt (as in pad_and_shift).
                prompt_labels = min(max(kept_prompt - 1, 0), max(n - 1, 0))
                inputs += tokens[:-1]
                labels += tokens[1:]
                mask += [False] * prompt_labels + [True] * (max(n - 1, 0) - prompt_labels)
                positions += range(max(n - 1, 0))
                sequences += [len(example_indices)] * max(n - 1, 0)
                example_indices.append(index)
                response_lengths.append(n - kept_prompt)
                truncated.append(n < full_lengths[index])
            padding = width - len(inputs)
            columns["input_ids"].append(inputs + [pad_token_id] * padding)
            columns["labels"].append(labels + [pad_token_id] * padding)
            columns["response_mask"].append(mask + [False] * padding)
            columns["position_ids"].append(positions + list(range(padding)))
            columns["sequence_ids"].append(sequences + [-1] * padding)
        batch = {key: torch.tensor(values, dtype=torch.long) for key, values in columns.items()}
        batch["response_mask"] = batch["response_mask"].bool()
        batch["example_indices"] = torch.tensor(example_indices, dtype=torch.long)
        batch["response_lengths"] = torch.tensor(response_lengths, dtype=torch.long)
        batch["truncated"] = torch.tensor(truncated, dtype=torch.bool)
        batch["num_examples"] = len(example_indices)
        microbatches.append(batch)
    return microbatches


def block_causal_attention_mask(sequence_ids: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Returns the (rows, 1, T, T) mask letting each token attend to earlier tokens of its own example only.

    ``mask[r, 0, q, k]`` allows attention when ``sequence_ids[r, q] == sequence_ids[r, k]`` and
    ``k <= q``. Padding (-1) attends to earlier padding of its row, so no query row is empty
    (an empty row would give nan in softmax).

    Args:
        sequence_ids: (rows, T) int, the example number of each token, -1 on padding.
        dtype: None for a boolean mask (True = attend; what sdpa takes), or a float dtype for
            an additive mask (0 where allowed, the dtype's minimum elsewhere; what eager
            attention takes, in the model's dtype).
    """
    same_example = sequence_ids.unsqueeze(-1) == sequence_ids.unsqueeze(-2)
    width = sequence_ids.shape[-1]
    causal = torch.ones(width, width, dtype=torch.bool, device=sequence_ids.device).tril()
    allowed = (same_example & causal).unsqueeze(1)
    if dtype is None:
        return allowed
    additive = torch.zeros(allowed.shape, dtype=dtype, device=sequence_ids.device)
    return additive.masked_fill_(~allowed, torch.finfo(dtype).min)


def varlen_attention_kwargs(position_ids: torch.Tensor) -> dict[str, Any]:
    """Returns flash-attention varlen arguments for packed rows: cumulative segment lengths and the longest.

    The rows are read as one flattened sequence (the way transformers' flash path reshapes
    ``(rows, T, …)`` to ``(rows * T, …)``); a segment starts wherever ``position_ids`` is 0
    (each example, and each run of padding, as ``pack_examples`` numbers them).

    Args:
        position_ids: (rows, T) int, restarting at 0 at each segment; every row starts at 0.

    Returns:
        cu_seq_lens_q, cu_seq_lens_k: (segments + 1,) int32, 0, end of segment 1, …, rows * T.
        max_length_q, max_length_k: int, the longest segment.
    """
    if not bool((position_ids[:, 0] == 0).all()):
        raise ValueError("every packed row must start a segment (position id 0)")
    flat = position_ids.reshape(-1)
    starts = torch.nonzero(flat == 0).reshape(-1)
    cu_seq_lens = torch.cat([starts, torch.tensor([flat.numel()], device=flat.device)]).to(torch.int32)
    longest = int(cu_seq_lens.diff().max())
    return {"cu_seq_lens_q": cu_seq_lens, "cu_seq_lens_k": cu_seq_lens,
            "max_length_q": longest, "max_length_k": longest}


def packed_forward_kwargs(
    batch: dict[str, Any],
    attn_implementation: str,
    dtype: torch.dtype = torch.float32,
) -> dict[str, Any]:
    """Returns the model-forward keyword arguments that keep the examples of a packed microbatch apart.

    Always ``position_ids`` (rows, T). Then, by attention kernel:

    - a flash kernel (name containing "flash", e.g. ``flash_attention_2``) or
      ``packed_attention.VARLEN_SDPA`` (sdpa one example at a time): ``attention_mask`` None
      and ``varlen_attention_kwargs`` (cu_seq_lens_q/k, max_length_q/k), which transformers
      hands to the kernel;
    - ``sdpa``: ``attention_mask`` = the boolean (rows, 1, T, T) ``block_causal_attention_mask``;
    - ``eager``: the same mask, additive, in ``dtype`` (the model's compute dtype).

    Other kernels (flex_attention, paged) raise: their packed path is untested here.

    Args:
        batch: a microbatch from ``pack_examples`` (needs ``position_ids``, ``sequence_ids``).
        attn_implementation: the model's ``config._attn_implementation``.
        dtype: dtype of the eager additive mask.
    """
    position_ids, sequence_ids = batch["position_ids"], batch["sequence_ids"]
    if "flash" in attn_implementation or attn_implementation == VARLEN_SDPA:
        return {"position_ids": position_ids, "attention_mask": None, **varlen_attention_kwargs(position_ids)}
    if attn_implementation == "sdpa":
        return {"position_ids": position_ids, "attention_mask": block_causal_attention_mask(sequence_ids)}
    if attn_implementation == "eager":
        return {"position_ids": position_ids, "attention_mask": block_causal_attention_mask(sequence_ids, dtype)}
    raise ValueError(f"packing supports sdpa, eager and flash-attention kernels, not {attn_implementation!r}; "
                     "choose one with --attn-implementation or turn packing off")


def flatten_packed(batch: dict[str, Any]) -> dict[str, Any]:
    """Returns a packed microbatch with its rows' tokens concatenated into one row and the padding dropped.

    The same examples in the same order, positions restarting at each one: with
    ``packed_forward_kwargs`` every example still attends only to itself, so log-probs and
    gradients are those of the rows layout (up to float summation order). No compute is spent
    on padding (what TRL calls padding-free). Under a block mask (sdpa, eager) attention spans
    the whole microbatch, whose cost grows with its length squared; flash-attention's varlen and
    ``VARLEN_SDPA`` (the SFT trainer's sdpa path) score each example alone.

    Args:
        batch: a microbatch from ``pack_examples`` ((rows, T) tensors).

    Returns:
        The microbatch with input_ids, labels, response_mask, position_ids and sequence_ids of
        shape (1, N), N = its tokens that are not padding; the per-example fields unchanged.
    """
    keep = batch["sequence_ids"] >= 0  # row-major: examples stay in sequence-id order
    if not bool(keep.any()):
        return batch
    flat = dict(batch)
    for key in ("input_ids", "labels", "response_mask", "position_ids", "sequence_ids"):
        flat[key] = batch[key][keep].unsqueeze(0)
    return flat


def split_packed(values: torch.Tensor, batch: dict[str, Any]) -> list[torch.Tensor]:
    """Returns the per-example slices of a packed (rows, T) tensor, in ``batch["example_indices"]`` order.

    Element k is a 1-D tensor of the ``values`` where ``sequence_ids == k`` (row-major, so in
    token order), e.g. one example's log-probs, the same as its unpacked row up to its length.
    Examples that took no room give empty tensors.

    Args:
        values: (rows, T) tensor aligned with the batch (log-probs, entropies, masks).
        batch: the microbatch from ``pack_examples``.
    """
    sequence_ids = batch["sequence_ids"].to(values.device)
    flat_ids, flat_values = sequence_ids.reshape(-1), values.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)
    counts = torch.bincount(flat_ids[flat_ids >= 0], minlength=batch["num_examples"]).tolist()
    padding = int((flat_ids < 0).sum())
    return list(flat_values[order[padding:]].split(counts))


def token_budget_batches(
    lengths: Sequence[int],
    tokens_per_batch: int,
    shuffle_seed: int | None = None,
    window: int | None = None,
) -> list[list[int]]:
    """Returns batches of example indices with ``len(batch) * max(lengths in batch) <= tokens_per_batch``.

    Dynamic batching for unpacked (padded) microbatches: the padded size of a batch is its
    row count times its longest example, so examples are sorted by length (longest first)
    within windows of ``window`` examples of a seeded random order (None: one window of all),
    and cut greedily into batches under the budget; the batch order is then shuffled with the
    seed. An example longer than the budget gets a batch of its own. Every index appears once.
    With constant SFT normalisation pass ``examples_in_step`` (the examples of the step's
    microbatches) to ``sft_microbatch_train_step``, since batch sizes vary.

    Args:
        lengths: tokens per example as it will be padded (e.g. prompt + output after
            truncation), non-negative.
        tokens_per_batch: the budget of one padded microbatch.
        shuffle_seed: seed of the example and batch order; None keeps input order and
            batch order longest first.
        window: examples sorted together at most; smaller windows keep batches closer to
            the data's random order at some cost in padding.
    """
    if tokens_per_batch < 1:
        raise ValueError(f"tokens_per_batch must be positive, got {tokens_per_batch}")
    batches: list[list[int]] = []
    for chunk in _windows(_seeded_order(len(lengths), shuffle_seed), window):
        current: list[int] = []
        for index in sorted(chunk, key=lambda i: -lengths[i]):
            # Longest first: the batch's first example sets its width.
            width = lengths[current[0]] if current else lengths[index]
            if current and (len(current) + 1) * width > tokens_per_batch:
                batches.append(current)
                current = []
            current.append(index)
        if current:
            batches.append(current)
    if shuffle_seed is not None:
        random.Random(shuffle_seed + 1).shuffle(batches)
    return batches
