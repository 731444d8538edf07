"""Prompt/response tokenisation for causal-LM training: ids, shifted labels and response masks.

Pure functions of their arguments: no I/O, no global state.
"""

from __future__ import annotations

import itertools
from typing import Any, Sequence

import torch


def pad_token_id_of(tokenizer: Any) -> int:
    """Returns the id used for padding: the tokenizer's pad token, else its EOS token."""
    if getattr(tokenizer, "pad_token_id", None) is not None:
        return int(tokenizer.pad_token_id)
    if getattr(tokenizer, "eos_token_id", None) is not None:
        return int(tokenizer.eos_token_id)
    raise ValueError(
        "the tokenizer has neither a pad token nor an EOS token; set one "
        "(e.g. tokenizer.pad_token = tokenizer.eos_token or add a special token) before tokenising"
    )


def _ids(tokenizer: Any, texts: Sequence[str], add_special_tokens: bool) -> list[list[int]]:
    encoded = tokenizer(list(texts), add_special_tokens=add_special_tokens, padding=False, truncation=False)
    return [list(ids) for ids in encoded["input_ids"]]


def pad_and_shift(
    prompt_ids: Sequence[Sequence[int]],
    output_ids: Sequence[Sequence[int]],
    pad_token_id: int,
    max_length: int | None = None,
) -> dict[str, torch.Tensor]:
    """Returns shifted, right-padded ``input_ids``/``labels``/``response_mask`` from token-id lists.

    Each sequence is ``prompt_ids[i] + output_ids[i]`` cut to ``max_length`` tokens (the tail of
    the output goes first), right-padded with ``pad_token_id`` to the longest, ``L`` tokens; then
    ``input_ids = padded[:, :-1]`` and ``labels = padded[:, 1:]``.

    Returns:
        input_ids: (batch, L - 1) int64.
        labels: (batch, L - 1) int64.
        response_mask: (batch, L - 1) bool, True exactly where ``labels`` holds an output token.
        prompt_lengths: (batch,) int64, prompt tokens kept (a prompt longer than ``max_length``
            is cut too, and then no output token survives).
        response_lengths: (batch,) int64, output tokens kept after truncation (0 means the
            example has no training target).
        truncated: (batch,) bool, whether any token of the example was cut.
    """
    if len(prompt_ids) != len(output_ids):
        raise ValueError(f"got {len(prompt_ids)} prompts but {len(output_ids)} outputs")
    if len(prompt_ids) == 0:
        raise ValueError("cannot tokenise an empty batch")
    if max_length is not None and max_length < 2:
        raise ValueError(f"max_length must be at least 2 (one input and one label), got {max_length}")
    prompt_lengths = torch.tensor([len(p) for p in prompt_ids], dtype=torch.long)
    output_lengths = torch.tensor([len(o) for o in output_ids], dtype=torch.long)
    full_lengths = prompt_lengths + output_lengths
    lengths = full_lengths if max_length is None else full_lengths.clamp(max=max_length)
    kept_prompt = torch.minimum(prompt_lengths, lengths)
    kept_output = lengths - kept_prompt
    longest = int(lengths.max())
    if longest < 2:
        raise ValueError("every sequence has fewer than two tokens; nothing to predict")

    # One flat tensor of all kept tokens, scattered into the padded grid by a length mask:
    # the Python work is one list concatenation per example, none per token.
    kept = [(list(p) + list(o))[:n] for p, o, n in zip(prompt_ids, output_ids, lengths.tolist())]
    flat = torch.tensor(list(itertools.chain.from_iterable(kept)), dtype=torch.long)
    positions = torch.arange(longest)
    within = positions.unsqueeze(0) < lengths.unsqueeze(1)
    padded = torch.full((len(prompt_ids), longest), pad_token_id, dtype=torch.long)
    padded[within] = flat

    # labels[:, j] is token j + 1: an output token iff prompt_len <= j + 1 < length.
    label_positions = positions[1:].unsqueeze(0)
    response_mask = (label_positions >= kept_prompt.unsqueeze(1)) & (label_positions < lengths.unsqueeze(1))
    return {
        "input_ids": padded[:, :-1].contiguous(),
        "labels": padded[:, 1:].contiguous(),
        "response_mask": response_mask,
        "prompt_lengths": kept_prompt,
        "response_lengths": kept_output,
        "truncated": lengths < full_lengths,
    }


def tokenize_prompt_and_output(
    prompt_strs: Sequence[str],
    output_strs: Sequence[str],
    tokenizer: Any,
    max_length: int | None = None,
    return_lengths: bool = False,
) -> dict[str, torch.Tensor]:
    """Returns ``input_ids``, ``labels`` and ``response_mask`` for a batch of prompt/output pairs.

    Prompts are tokenised with the tokenizer's special tokens (BOS where it adds one), outputs
    without. Sequences are concatenated, cut to ``max_length`` tokens if given (the tail of the
    output is cut first), right-padded with the pad id (the EOS id when there is no pad token)
    and shifted: ``input_ids = padded[:, :-1]``, ``labels = padded[:, 1:]``.

    Args:
        prompt_strs: batch of prompt strings.
        output_strs: batch of output (response) strings, same length.
        tokenizer: a Hugging Face tokenizer (callable returning ``input_ids`` lists).
        max_length: cap on prompt + output tokens per example; None keeps everything.
        return_lengths: also return ``prompt_lengths``, ``response_lengths`` (output tokens
            kept; 0 means the output was cut away entirely and the example must not be
            trained on) and ``truncated``, each (batch,).

    Returns:
        input_ids: (batch, L - 1) int64, L = longest prompt + output after truncation.
        labels: (batch, L - 1) int64.
        response_mask: (batch, L - 1) bool, True exactly where ``labels`` is an output token.
    """
    if len(prompt_strs) != len(output_strs):
        raise ValueError(f"got {len(prompt_strs)} prompts but {len(output_strs)} outputs")
    batch = pad_and_shift(
        _ids(tokenizer, prompt_strs, add_special_tokens=True),
        _ids(tokenizer, output_strs, add_special_tokens=False),
        pad_token_id_of(tokenizer),
        max_length=max_length,
    )
    if not return_lengths:
        for key in ("prompt_lengths", "response_lengths", "truncated"):
            batch.pop(key)
    return batch


def pad_and_shift_segments(
    prompt_ids: Sequence[Sequence[int]],
    segment_ids: Sequence[Sequence[Sequence[int]]],
    segment_trained: Sequence[Sequence[bool]],
    pad_token_id: int,
    max_length: int | None = None,
) -> dict[str, torch.Tensor]:
    """Returns shifted, right-padded ``input_ids``/``labels``/``response_mask`` of multi-turn trajectories.

    Example i is ``prompt_ids[i]`` followed by its segments ``segment_ids[i][0], [1], …`` (model
    turns and environment turns, in order); ``segment_trained[i][k]`` says whether segment k is
    the model's own (a loss token) or not (an environment turn: context, never a target). The
    sequence is cut to ``max_length`` tokens (the tail goes first), padded and shifted as in
    ``pad_and_shift``. With every segment trained, this is ``pad_and_shift`` of the segments
    joined.

    Returns:
        input_ids: (batch, L - 1) int64.
        labels: (batch, L - 1) int64.
        response_mask: (batch, L - 1) bool, True exactly where ``labels`` holds a token of a
            trained segment; the environment's tokens and the prompt are False.
        response_lengths: (batch,) int64, trained tokens kept after truncation.
        truncated: (batch,) bool, whether any token of the example was cut.
    """
    if not len(prompt_ids) == len(segment_ids) == len(segment_trained):
        raise ValueError(f"got {len(prompt_ids)} prompts, {len(segment_ids)} segment lists and "
                         f"{len(segment_trained)} trained-flag lists")
    outputs, trained_flags = [], []
    for segments, trained in zip(segment_ids, segment_trained):
        if len(segments) != len(trained):
            raise ValueError(f"an example has {len(segments)} segments but {len(trained)} trained flags")
        outputs.append([token for segment in segments for token in segment])
        trained_flags.append([bool(flag) for segment, flag in zip(segments, trained) for _ in segment])
    batch = pad_and_shift(prompt_ids, outputs, pad_token_id, max_length=max_length)
    # label j is output token (j + 1 - prompt length); trained where that token's segment is
    width = batch["labels"].shape[1]
    trained_grid = torch.zeros((len(prompt_ids), width), dtype=torch.bool)
    for row, (flags, prompt_length) in enumerate(zip(trained_flags, batch["prompt_lengths"].tolist())):
        start = prompt_length - 1
        if start < 0:  # an empty prompt: the first output token is no label
            flags, start = flags[1:], 0
        kept = flags[:max(0, width - start)]
        trained_grid[row, start:start + len(kept)] = torch.tensor(kept, dtype=torch.bool)
    response_mask = batch["response_mask"] & trained_grid
    return {"input_ids": batch["input_ids"], "labels": batch["labels"], "response_mask": response_mask,
            "response_lengths": response_mask.sum(dim=1), "truncated": batch["truncated"]}


def scatter_response_values(values: Sequence[Sequence[float]], response_mask: torch.Tensor) -> torch.Tensor:
    """Returns a (batch, L - 1) float32 tensor holding ``values[i]`` at row i's True positions of ``response_mask``, in order, 0 elsewhere.

    Used for per-token values of the trained tokens (the sampler's log-probs of the model
    turns): row i takes its first ``response_mask[i].sum()`` values (a truncated tail drops the rest).
    """
    result = torch.zeros(response_mask.shape, dtype=torch.float32)
    for row, row_values in enumerate(values):
        positions = response_mask[row].nonzero().squeeze(-1)
        if len(row_values) < len(positions):
            raise ValueError(f"row {row}: {len(row_values)} values for {len(positions)} trained tokens")
        result[row, positions] = torch.tensor(list(row_values[:len(positions)]), dtype=torch.float32)
    return result
