"""The Hugging Face backend: a decode loop of its own over a causal LM, with a preallocated KV cache, vectorised per-row sampling and progress.

Where ``model.generate`` spends a CPU's time on a whole-cache copy per step (its dynamic
cache concatenates), on rows that already stopped, on padding to the longest prompt and on
per-row Python in the logits processors, this loop prefills prompts in length buckets, writes
each step's keys and values into preallocated room, drops finished rows from the batch and
samples every row at once. Sampling stays a function of a row's seed alone.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import inspect
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from transformers import DynamicCache, StoppingCriteria
from transformers.cache_utils import DynamicLayer

from reasontune.generation.base import Completion, GenerationSession, Generator, SamplingOptions, cut_at_stop
from reasontune.generation.decode_step import DecodeStep, unsupported_reason
from reasontune.tracking import Progress


class _StopOnStrings(StoppingCriteria):
    """Marks a row finished once the text of its newest tokens contains a stop string.

    Only a window of the last tokens is decoded (a stop string of c characters completed by
    the newest token lies within its last c tokens), and after the first step where stop
    strings count, only rows whose newest token could have completed one: a stop string found
    earlier already ended its row, so a new one ends in the newest token's text. When every
    stop string ends in a printable ASCII character, that token's text must contain it (or a
    U+FFFD of a split multi-byte character, kept to stay safe); which tokens do is cached per
    token id in ``could_end_cache``. A step then costs a lookup per row and a decode per candidate.
    """

    def __init__(self, tokenizer, stop: Sequence[str], prompt_width: int, min_new_tokens: int,
                 could_end_cache: dict[int, bool] | None = None):
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.prompt_width = prompt_width
        self.min_new_tokens = max(1, min_new_tokens)
        self.window = max(len(s) for s in self.stop) + 1
        self.last_characters = {s[-1] for s in self.stop}
        self.filter_rows = all(c.isascii() and c.isprintable() and not c.isspace() for c in self.last_characters)
        self.could_end_cache = {} if could_end_cache is None else could_end_cache

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool)
        generated = input_ids.shape[1] - self.prompt_width
        if generated >= self.min_new_tokens:
            rows = list(range(input_ids.shape[0]))
            if self.filter_rows and generated > self.min_new_tokens:
                newest = input_ids[:, -1].tolist()
                rows = [row for row in rows if self._could_end_stop(newest[row])]
            if rows:
                tails = self.tokenizer.batch_decode(input_ids[rows, -min(self.window, generated):],
                                                    skip_special_tokens=True)
                for row, tail in zip(rows, tails):
                    done[row] = any(s in tail for s in self.stop)
        return done.to(input_ids.device)

    def _could_end_stop(self, token_id: int) -> bool:
        could_end = self.could_end_cache.get(token_id)
        if could_end is None:
            text = self.tokenizer.decode([token_id], skip_special_tokens=True)
            could_end = "\ufffd" in text or any(c in text for c in self.last_characters)
            self.could_end_cache[token_id] = could_end
        return could_end


_GOLDEN_GAMMA = np.uint64(0x9E3779B97F4A7C15)


def row_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """Returns the seed of one sampled row: a 63-bit hash of (sampling seed, global prompt index, sample index)."""
    digest = hashlib.blake2b(f"{seed}/{prompt_index}/{sample_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def row_uniforms(row_seeds: np.ndarray, step: int) -> torch.Tensor:
    """Returns (rows,) float64 uniforms in (0, 1]: output ``step`` of the SplitMix64 stream of each row's seed.

    A row's t-th uniform is a function of its seed and t alone (counter-based, as Philox in
    JAX), so a whole batch draws its step in a few vectorised integer operations and a row's
    samples never depend on the other rows of its batch. ``row_seeds``: (rows,) uint64.
    """
    with np.errstate(over="ignore"):  # SplitMix64 is arithmetic modulo 2^64
        z = row_seeds + _GOLDEN_GAMMA * np.uint64(step + 1)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    # The top 53 bits, shifted by one ulp: u in (0, 1], so the token it selects has probability > 0.
    return torch.from_numpy(((z >> np.uint64(11)) + np.uint64(1)).astype(np.float64) * 2.0 ** -53)


def finite_log_softmax(scores: torch.Tensor) -> torch.Tensor:
    """Returns the float32 log-softmax of ``scores`` (rows, vocab) over the vocabulary, -inf logits floored to a finite value."""
    # A model may emit -inf logits itself (masked vocab rows); a finite floor keeps p·logit at 0, not NaN.
    return torch.log_softmax(torch.nan_to_num(scores.float(), neginf=torch.finfo(torch.float32).min), dim=-1)


def nucleus_scores(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """Returns ``scores`` (rows, vocab) with -inf outside each row's nucleus: the fewest most probable tokens with mass ≥ ``top_p``."""
    sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
    probs = torch.softmax(sorted_scores.float(), dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs  # probability of the more likely tokens
    remove_sorted = mass_before >= top_p
    remove_sorted[:, 0] = False
    remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)
    return scores.masked_fill(remove, -float("inf"))


def sample_tokens(scores: torch.Tensor, temperature: float, top_p: float, uniforms: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (tokens (rows,) int64, their log-probs (rows,) float32) sampled from softmax(scores / temperature) within the top-p nucleus.

    Each row inverts the CDF of its distribution at its own uniform (``uniforms``: (rows,) in
    (0, 1], float64): the first token whose cumulative probability reaches ``u`` times the
    total. The log-probs are those of this distribution (temperature and nucleus applied), as
    importance correction against the trainer's log-probs needs. ``scores``: (rows, vocab).

    Three passes over the vocabulary (max, exp, cumsum): the CDF is left unnormalised, and a
    token's log-prob is its shifted score minus the log of its row's total, so no log-softmax
    over the vocabulary is needed.
    """
    scores = scores.float()
    if temperature != 1.0:
        scores = scores / temperature
    if top_p < 1.0:
        scores = nucleus_scores(scores, top_p)
    shift = scores.max(dim=-1, keepdim=True).values
    cumulative = torch.sub(scores, shift).exp_().cumsum_(dim=-1)  # exp(-inf) = 0: tokens outside the support add nothing
    total = cumulative[:, -1:]
    targets = uniforms.to(device=cumulative.device, dtype=torch.float32).unsqueeze(1) * total
    tokens = torch.searchsorted(cumulative, targets).clamp_(max=scores.shape[-1] - 1)
    log_probs = scores.gather(1, tokens) - shift - total.log()
    return tokens.squeeze(1), log_probs.squeeze(1)


def sample_tokens_unfused(scores: torch.Tensor, temperature: float, top_p: float, uniforms: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns what ``sample_tokens`` returns, through a full log-softmax first (the straightforward way; kept to measure against)."""
    scores = scores.float() / temperature
    if top_p < 1.0:
        scores = nucleus_scores(scores, top_p)
    log_probs = finite_log_softmax(scores)
    cumulative = log_probs.exp().cumsum_(dim=-1)
    targets = (uniforms.to(device=cumulative.device, dtype=torch.float32) * cumulative[:, -1]).unsqueeze(1)
    tokens = torch.searchsorted(cumulative, targets).clamp_(max=scores.shape[-1] - 1).squeeze(1)
    return tokens, log_probs.gather(1, tokens.unsqueeze(1)).squeeze(1)


def entropy_of_scores(scores: torch.Tensor) -> torch.Tensor:
    """Returns (rows,) float32: the entropy -Σ p log p of softmax(scores) over the vocabulary (``scores``: (rows, vocab))."""
    log_probs = finite_log_softmax(scores)
    return -(log_probs.exp() * log_probs).sum(dim=-1)


@dataclass(frozen=True)
class DecodeSettings:
    """How ``HFGenerator`` runs its decode loop; every switch exists so that ``bench/generation.py`` can measure what it buys.

    ``preallocated_cache``: keys and values live in a buffer with room for every new token, so a step
    writes one column instead of concatenating (copying) the whole cache. ``drop_finished``:
    rows that stopped leave the batch (the cache is compacted once an eighth of the batch has
    stopped). ``prefill_buckets``: prompts are prefilled in groups of similar length (padding
    ≤ ``bucket_padding`` of a group's width) instead of padded to the longest.
    ``shared_prefill``: a prompt with ``n`` samples is prefilled once and its cache repeated.
    ``shared_prefix``: the batch's common token prefix (the template) is prefilled once for all rows.
    ``fused_sampler``: sampling and log-probs in three passes over the vocabulary instead of a
    full log-softmax first. ``own_decode_step``: decode steps run ``decode_step.DecodeStep`` (the
    model's own modules, grouped attention over the cache, no per-step mask or cache objects)
    where the model qualifies, else the model's forward. ``fused_projections``: that step runs
    q/k/v and gate/up as one matmul each (off: it measured slower, and holds a copy of those
    weights). ``transposed_weights``: that step runs every projection and the LM head as
    ``torch.mm`` over contiguous transposed copies of their weights, remade when a weight
    changes (on SmolLM2-135M about 540 MB more memory in float32; ``decode_step`` says why it is
    faster; turn it off where that memory matters). ``bench/generation.py --sections ablation``
    prints what each buys.
    ``keep_cache``: ``open_session`` gives an ``HFSession``
    (multi-turn rollouts keep each row's KV cache between turns) instead of None (continuations
    re-prefill their whole text). ``num_threads``: torch threads during generation
    (None: leave the process setting).
    """

    preallocated_cache: bool = True
    drop_finished: bool = True
    prefill_buckets: bool = True
    shared_prefill: bool = True
    shared_prefix: bool = True
    fused_sampler: bool = True
    own_decode_step: bool = True
    fused_projections: bool = False
    transposed_weights: bool = True
    keep_cache: bool = True
    bucket_padding: float = 0.1
    num_threads: int | None = None


class _PreallocatedLayer(DynamicLayer):
    """One decoder layer's keys and values in a buffer allocated once for the whole generation: a step writes its column.

    ``keys`` / ``values`` are views ``(rows, kv_heads, length, head_dim)`` of buffers with
    ``capacity`` positions (prompt width + max new tokens), allocated uninitialised: the
    system backs their pages only as positions are written, so memory follows the tokens
    generated, never a whole-cache copy a step (as concatenation costs) or a doubling's two
    copies at once. Of the first ``prompt_width`` positions, those never written (padding left
    of a shorter prefill bucket) hold zeros: masked out, and 0 · value is 0 (uninitialised
    memory could hold NaN, and 0 · NaN is NaN). Later positions are written by their decode
    step before any attention reads them. Should a step ever pass ``capacity``, it grows
    (doubling, capped at ``max_capacity``).
    """

    def __init__(self, capacity: int, max_capacity: int, prompt_width: int = 0):
        super().__init__()
        self.capacity, self.max_capacity, self.length = capacity, max(capacity, max_capacity), 0
        self.prompt_width = min(prompt_width, capacity)
        self._key_buffer = self._value_buffer = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.place(slice(0, key_states.shape[0]), key_states.shape[0], 0, key_states, value_states)

    def place(self, rows: slice, total_rows: int, start: int, key_states: torch.Tensor, value_states: torch.Tensor
              ) -> None:
        """Writes ``key_states`` / ``value_states`` (rows, heads, positions, head_dim) into ``rows`` from position ``start``."""
        if self._key_buffer is None:
            self.device = key_states.device
            shape = (total_rows, key_states.shape[1], self.capacity, key_states.shape[3])
            self._key_buffer = key_states.new_empty(shape)
            self._value_buffer = value_states.new_empty(shape[:3] + (value_states.shape[3],))
            self._key_buffer[:, :, :self.prompt_width].zero_()
            self._value_buffer[:, :, :self.prompt_width].zero_()
            self.is_initialized = True
        end = start + key_states.shape[2]
        self._key_buffer[rows, :, start:end] = key_states
        self._value_buffer[rows, :, start:end] = value_states
        self._set_length(max(self.length, end))

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            return self.keys, self.values
        start, end = self.length, self.length + key_states.shape[2]
        if end > self._key_buffer.shape[2]:
            self._grow(end)
        self._key_buffer[:, :, start:end] = key_states
        self._value_buffer[:, :, start:end] = value_states
        self._set_length(end)
        return self.keys, self.values

    def _grow(self, needed: int) -> None:
        capacity = max(needed, min(2 * self._key_buffer.shape[2], self.max_capacity))
        for name in ("_key_buffer", "_value_buffer"):
            old = getattr(self, name)
            new = old.new_empty(old.shape[:2] + (capacity,) + old.shape[3:])
            new[:, :, :self.length] = old[:, :, :self.length]
            setattr(self, name, new)

    def _set_length(self, length: int) -> None:
        self.length = length
        self.keys = self._key_buffer[:, :, :length]
        self.values = self._value_buffer[:, :, :length]

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        # Only the written positions are copied: the rest of the new buffers stays untouched (unbacked).
        for name in ("_key_buffer", "_value_buffer"):
            old = getattr(self, name)
            new = old.new_empty((len(indices),) + old.shape[1:])
            new[:, :, :self.length] = old[indices, :, :self.length]
            setattr(self, name, new)
        self._set_length(self.length)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.batch_select_indices(torch.arange(self._key_buffer.shape[0], device=self.device).repeat_interleave(repeats))


def _forward_cache_argument(model) -> str:
    """Returns the name under which ``model``'s forward takes the KV cache (``cache`` from transformers 5.x, else ``past_key_values``)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PEFT wrapper passes kwargs on
    return "cache" if "cache" in inspect.signature(type(base).forward).parameters else "past_key_values"


@dataclass(frozen=True)
class _SharedPrefix:
    """A token prefix common to every prompt of a ``generate`` call, with its keys and values computed once.

    ``states``: per decoder layer, (keys, values) each (1, kv_heads, ``length``, head_dim).
    """

    length: int
    states: list[tuple[torch.Tensor, torch.Tensor]]


def _length_buckets(lengths: Sequence[int], padding: float) -> list[tuple[int, int]]:
    """Returns [start, end) row ranges of ``lengths`` (longest first) whose padding stays within ``padding`` of each range's width."""
    buckets, start = [], 0
    for row in range(1, len(lengths) + 1):
        if row == len(lengths) or lengths[row] < (1.0 - padding) * lengths[start]:
            buckets.append((start, row))
            start = row
    return buckets


class GenerationProgress:
    """Progress of one ``generate`` call over its token budget (rows × ``max_new_tokens``): rows and tokens done, tokens/s, ETA.

    A row that stops early spends the rest of its budget at once, so the ETA (from the budget
    spent per second) is an upper bound that tightens as rows finish. A bar on a terminal; a
    line every ``every_s`` seconds when the output is a file.
    """

    def __init__(self, rows: int, max_new_tokens: int, every_s: float = 5.0):
        self.rows, self.max_new_tokens = rows, max_new_tokens
        self.generated = self.rows_done = self.spent = 0
        self._started = time.monotonic()
        self._progress = Progress(rows * max_new_tokens, description="generate", unit="token", leave=False,
                                  plain_every_s=every_s, show_rate=False)

    def advance(self, tokens: int, finished_rows: int, step: int) -> None:
        """Counts one decode step: ``tokens`` generated, ``finished_rows`` of them their rows' last (at 0-based ``step``)."""
        self.generated += tokens
        self.rows_done += finished_rows
        self.spent += tokens + finished_rows * (self.max_new_tokens - step - 1)
        elapsed = time.monotonic() - self._started
        self._progress.update(self.spent, rows=f"{self.rows_done}/{self.rows}", generated=self.generated,
                              tokens_per_s=self.generated / elapsed if elapsed > 0 else None)

    def close(self) -> None:
        self._progress.close()


def _cached_columns(cache, mask_row: torch.Tensor, row: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Returns copies of one row's keys and values, per layer (1, kv_heads, tokens, head_dim), at the columns ``mask_row`` marks."""
    columns = mask_row[:cache.layers[0].length].nonzero().squeeze(1)
    return ([layer.keys[row:row + 1, :, columns] for layer in cache.layers],
            [layer.values[row:row + 1, :, columns] for layer in cache.layers])


@dataclass
class _RowState:
    """What a session keeps of one row between turns: its tokens so far, and the keys and values of the first ``cached_length``.

    ``ids``: the context the row was generated from followed by its generated tokens (the
    sampled ids, as training reads them). ``keys`` / ``values``: per decoder layer (1,
    kv_heads, ``cached_length``, head_dim), or None where nothing is cached. At least the last
    token is never cached, so a continuation always has a token whose logits it reads.
    """

    ids: list[int]
    keys: list[torch.Tensor] | None = None
    values: list[torch.Tensor] | None = None

    @property
    def cached_length(self) -> int:
        return 0 if self.keys is None else self.keys[0].shape[2]

    @property
    def cache_bytes(self) -> int:
        if self.keys is None:
            return 0
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    @classmethod
    def after(cls, context: list[int], generated: list[int], columns) -> "_RowState":
        """Returns the state of a row that generated ``generated`` after ``context``, given the cached ``columns`` (or None)."""
        ids = list(context) + list(generated)
        if columns is None:
            return cls(ids)
        keys, values = columns
        length = min(keys[0].shape[2], len(ids) - 1)  # a completion cut short leaves fewer tokens than were fed
        return cls(ids, [k[:, :, :length] for k in keys], [v[:, :, :length] for v in values])

    def drop_cache(self) -> None:
        self.keys = self.values = None


class HFSession(GenerationSession):
    """A multi-turn generation on ``HFGenerator`` that keeps each row's KV cache between turns.

    ``generate`` is the generator's (rows numbered prompt-major, ``n`` per prompt); ``extend``
    appends a text to each given row and continues it with one sample: only the tokens not in
    the row's cache run through the model (the last sampled token, then the appended text),
    on top of the kept keys and values. A row's context is its token ids as generated (the
    prompt's tokenisation, the sampled ids, each appended text tokenised alone, without
    special tokens): exactly the sequence ``environments.tokens`` trains on. Seeds follow
    ``generate``'s rule (``extend``'s ``i``-th row samples as ``generate``'s ``i``-th prompt would).
    Kept caches are bounded by ``max_kept_bytes``: past it, rows keep their tokens alone and
    are prefilled again when continued.
    """

    def __init__(self, generator: "HFGenerator", max_kept_bytes: int = 2 * 2**30):
        self.generator = generator
        self.max_kept_bytes = max_kept_bytes
        self._states: dict[int, _RowState] = {}

    def generate(self, prompts: Sequence[str], options: SamplingOptions) -> list[list[Completion]]:
        """Returns what ``HFGenerator.generate`` returns, keeping every row's state."""
        states: dict[int, _RowState] = {}
        groups = self.generator._generate(list(prompts), options, states)
        self._states = states
        self._bound()
        return groups

    def extend(self, rows: Sequence[int], texts: Sequence[str], options: SamplingOptions) -> list[Completion]:
        """Returns one completion per row of ``rows``, each continuing that row after ``texts[i]`` is appended to it."""
        if options.n != 1:
            raise ValueError(f"extend samples one continuation per row; got n={options.n}")
        if len(rows) != len(texts):
            raise ValueError(f"extend got {len(rows)} rows and {len(texts)} texts")
        unknown = [row for row in rows if row not in self._states]
        if unknown:
            raise KeyError(f"rows {unknown} are not open in this session")
        generator = self.generator
        if not rows:
            return []
        new_ids = generator.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        states = [self._states[row] for row in rows]
        order = sorted(range(len(rows)), key=lambda i: -(len(states[i].ids) + len(new_ids[i])))
        seed = options.seed if options.seed is not None else int(torch.randint(2**62, ()))
        results: list[Completion | None] = [None] * len(rows)
        progress = GenerationProgress(len(rows), options.max_new_tokens, generator.progress_every_s)
        with generator._generating():
            try:
                for start in range(0, len(order), generator.batch_size):
                    batch = order[start:start + generator.batch_size]
                    cache, logits, attention_mask = generator._prefill_continuations(
                        [states[i] for i in batch], [new_ids[i] for i in batch], options.max_new_tokens)
                    contexts = [states[i].ids + list(new_ids[i]) for i in batch]
                    seeds = [row_seed(seed, options.first_prompt_index + i, 0) for i in batch]
                    kept: dict[int, _RowState] = {}
                    completions = generator._decode_rows(cache, logits, attention_mask, contexts, options, seeds,
                                                         progress, kept)
                    del cache
                    for position, i in enumerate(batch):
                        results[i] = completions[position]
                        self._states[rows[i]] = kept[position]
            finally:
                progress.close()
        self._bound()
        return results  # type: ignore[return-value]

    def retain(self, rows: Sequence[int]) -> None:
        """Returns nothing; forgets every row not in ``rows``."""
        wanted = set(rows)
        self._states = {row: state for row, state in self._states.items() if row in wanted}

    def close(self) -> None:
        self._states = {}

    def _bound(self) -> None:
        """Drops kept caches past ``max_kept_bytes`` (those rows keep their tokens and are prefilled again)."""
        total, seen = 0, set()
        for state in self._states.values():
            if id(state) in seen:
                continue
            seen.add(id(state))
            total += state.cache_bytes
            if total > self.max_kept_bytes:
                total -= state.cache_bytes
                state.drop_cache()


class HFGenerator(Generator):
    """Generates with a Hugging Face causal LM (any device) in length-sorted, left-padded batches, with its own decode loop.

    ``batch_size`` bounds the sequences decoded together: ``batch_size // n`` prompts with
    their ``n`` samples each (at least one prompt). A batch is prefilled in buckets of similar
    prompt length, each prompt once for its ``n`` samples, into one preallocated KV cache; then
    each step runs the model on the batch's newest tokens, picks every row's next token
    (argmax, or ``sample_tokens`` at the row's own counter-based uniform) and drops rows that
    finished (EOS, a stop string, ``max_new_tokens``). Only per-token floats of the sampled
    tokens are kept. The model is put in eval mode for generation and returned to its
    previous mode; the KV cache is used even when the training config turned ``use_cache``
    off. Sampling uses exactly ``options`` (no top-k, no repetition penalty), never sampling
    defaults in the model's ``generation_config``. ``settings`` switches the loop's
    optimisations (all on by default) for benchmarks. Progress (rows, tokens, tok/s, ETA) is
    a bar on a terminal and a line every ``progress_every_s`` seconds otherwise (a log file).
    """

    def __init__(self, model, tokenizer, batch_size: int = 32, settings: DecodeSettings | None = None,
                 progress_every_s: float = 5.0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.settings = settings or DecodeSettings()
        self.progress_every_s = progress_every_s  # between plain progress lines when stderr is not a terminal
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if self.pad_token_id is None:
            raise ValueError("the tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token")
        eos = set()
        for candidate in (tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
            if isinstance(candidate, int):
                eos.add(candidate)
            elif isinstance(candidate, (list, tuple)):
                eos.update(int(c) for c in candidate)
        self.eos_token_ids = sorted(eos)
        self._could_end_caches: dict[str, dict[int, bool]] = {}  # stop strings' last characters → token id → bool
        self.last_prefill_seconds = 0.0  # wall time of the last generate call's prefills (shared prefix included)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def sync_weights(self, model) -> None:
        """Returns nothing; samples from ``model`` from now on (the policy object itself: no copy, always in sync).

        The own decode step's weight copies are dropped here and remade at the next decode. They
        are also remade at the start of every ``generate`` call (and every session's first
        turn), since version counters do not see every update: torch's fused AdamW
        (``fused=True``, the trainers' single-process optimizer) and writes through ``p.data``
        move none. Within a call they follow version counters.
        """
        self.model = model
        self._step = None

    def sleep(self) -> None:
        """Returns nothing: the HF generator holds no memory of its own between calls."""

    def wake(self) -> None:
        """Returns nothing: the HF generator holds no memory of its own between calls."""

    def close(self) -> None:
        """Returns nothing; drops the reference to the model (the caller owns it)."""
        self.model = None

    def generate(self, prompts: Sequence[str], options: SamplingOptions) -> list[list[Completion]]:
        """Returns one list of ``options.n`` completions per prompt, in prompt order."""
        return self._generate(list(prompts), options)

    def open_session(self) -> "HFSession | None":
        """Returns a session that keeps every row's KV cache between turns (see ``HFSession``); None with ``keep_cache`` off."""
        return HFSession(self) if self.settings.keep_cache else None

    @contextlib.contextmanager
    def _generating(self):
        """Puts the model in eval mode with the settings' thread count for one call, and restores both after."""
        was_training = self.model.training
        threads = torch.get_num_threads()
        if self.settings.num_threads is not None:
            torch.set_num_threads(self.settings.num_threads)
        self.model.eval()
        try:
            yield
        finally:
            self.model.train(was_training)
            torch.set_num_threads(threads)

    def _generate(self, prompts: list[str], options: SamplingOptions, keep: dict | None = None
                  ) -> list[list[Completion]]:
        """``generate``; with ``keep``, each flat row (prompt-major, ``n`` per prompt) gets its ``_RowState`` there."""
        if not prompts:
            return []
        prompt_ids: list[list[int]] = self.tokenizer(prompts, add_special_tokens=True)["input_ids"]
        rows_per_prompt = 1 if options.greedy else options.n  # greedy samples are identical: compute one
        prompts_per_batch = max(1, self.batch_size // rows_per_prompt)
        # Longest first: similar lengths share a batch (less padding), and an OOM shows up on the first batch.
        order = sorted(range(len(prompts)), key=lambda i: -len(prompt_ids[i]))
        results: list[list[Completion] | None] = [None] * len(prompts)

        # Each sampled row's own stream is seeded from this seed and its question's global index.
        seed = options.seed if options.seed is not None else int(torch.randint(2**62, ()))
        progress = GenerationProgress(len(prompts) * rows_per_prompt, options.max_new_tokens, self.progress_every_s)
        if getattr(self, "_step", None) is not None:
            self._step.refresh()  # a session's later turns (``extend``) keep the copies: no step comes between turns
        with self._generating():
            try:
                started = time.perf_counter()
                prefix = self._shared_prefix(prompt_ids)
                self.last_prefill_seconds = time.perf_counter() - started
                for start in range(0, len(order), prompts_per_batch):
                    batch = order[start:start + prompts_per_batch]
                    seeds = [row_seed(seed, options.first_prompt_index + index, sample)
                             for index in batch for sample in range(rows_per_prompt)]
                    states = {} if keep is not None else None
                    completions = self._generate_batch([prompt_ids[i] for i in batch], options, rows_per_prompt, seeds,
                                                       progress, prefix, states)
                    for position, index in enumerate(batch):
                        group = completions[position * rows_per_prompt:(position + 1) * rows_per_prompt]
                        if keep is not None:
                            for sample in range(options.n):
                                keep[index * options.n + sample] = states[position * rows_per_prompt
                                                                          + sample % rows_per_prompt]
                        if rows_per_prompt < options.n:
                            group = [copy.deepcopy(group[0]) for _ in range(options.n)]
                        results[index] = group
            finally:
                progress.close()
        return results  # type: ignore[return-value]

    def _decode_step(self) -> DecodeStep | None:
        """Returns the own decode step for the current model, or None where the settings or the model rule it out.

        The model is checked on every call (a hook or adapter may have been added since); the
        step, with its fused weights, is kept while the model object stays the same.
        """
        if not (self.settings.own_decode_step and self._growable()) or unsupported_reason(self.model) is not None:
            return None
        step = getattr(self, "_step", None)
        wanted = (self.settings.fused_projections, self.settings.transposed_weights)
        if step is None or step.model is not self.model or (step.fused, step.transposed) != wanted:
            step = self._step = None  # its held copies go before another step makes new ones
            step = self._step = DecodeStep(self.model, *wanted)
        return step

    @torch.no_grad()
    def _generate_batch(self, batch_ids: list[list[int]], options: SamplingOptions, rows_per_prompt: int,
                        seeds: list[int], progress: GenerationProgress, prefix: _SharedPrefix | None = None,
                        keep: dict | None = None) -> list[Completion]:
        """Returns ``len(batch_ids) * rows_per_prompt`` completions, prompt-major; ``seeds``: each row's sampling seed."""
        started = time.perf_counter()
        cache, logits, attention_mask = self._prefill(batch_ids, rows_per_prompt, options.max_new_tokens, prefix)
        self.last_prefill_seconds += time.perf_counter() - started
        contexts = [ids for ids in batch_ids for _ in range(rows_per_prompt)]
        return self._decode_rows(cache, logits, attention_mask, contexts, options, seeds, progress, keep)

    @torch.no_grad()
    def _decode_rows(self, cache, logits: torch.Tensor, attention_mask: torch.Tensor, contexts: list[list[int]],
                     options: SamplingOptions, seeds: list[int], progress: GenerationProgress,
                     keep: dict | None = None) -> list[Completion]:
        """Returns one completion per row, decoded from a prefilled ``cache`` (rows' contexts right-aligned, ``attention_mask``
        (rows, width) marking the columns that hold tokens) and the logits (rows, vocab) after each row's last context token.

        With ``keep`` (a dict), row ``r``'s ``_RowState`` goes to ``keep[r]`` (its context and
        generated tokens, with the keys and values of those of them in the cache).
        """
        device, settings, steps = self.device, self.settings, options.max_new_tokens
        rows = len(contexts)
        positions = torch.tensor([len(ids) for ids in contexts], device=device)  # the position of each row's next token
        row_seeds = np.array(seeds, dtype=np.uint64)

        tokens = torch.full((rows, steps), self.pad_token_id, dtype=torch.long)
        want_logprobs, want_entropy = options.return_logprobs, options.return_entropy
        logprobs = torch.zeros(rows, steps) if want_logprobs else None
        entropies = torch.zeros(rows, steps) if want_entropy else None
        lengths_out = torch.full((rows,), steps, dtype=torch.long)
        stopping = None
        if options.stop:
            last_characters = "".join(sorted({s[-1] for s in options.stop}))
            stopping = _StopOnStrings(self.tokenizer, options.stop, 0, options.min_new_tokens,
                                      self._could_end_caches.setdefault(last_characters, {}))
        eos = torch.tensor(self.eos_token_ids, dtype=torch.long)
        present = torch.arange(rows)  # the batch's rows (original indices), finished ones among them until compacted
        running = torch.ones(rows, dtype=torch.bool)  # per present row: not finished yet
        cache_argument = _forward_cache_argument(self.model)
        step_function = self._decode_step()
        growable = self._growable()
        width = attention_mask.shape[1]
        if step_function is not None:
            # An additive mask for every column the loop can reach, built once: 0 where a row has a token.
            dtype = self.model.get_input_embeddings().weight.dtype
            mask_bias = torch.zeros((rows, width + steps), dtype=dtype, device=device)
            mask_bias[:, :width].masked_fill_(attention_mask == 0, torch.finfo(dtype).min)
        kept: dict[int, tuple] = {}
        for step in range(steps):
            next_tokens, token_logprobs, token_entropies = self._pick(logits, options, step, row_seeds[present.numpy()])
            next_cpu = next_tokens.cpu()
            live = present[running]
            tokens[live, step] = next_cpu[running]
            if want_logprobs:
                logprobs[live, step] = token_logprobs.cpu()[running]
            if want_entropy:
                entropies[live, step] = token_entropies.cpu()[running]
            finished = running & torch.isin(next_cpu, eos) if len(eos) else torch.zeros_like(running)
            if stopping is not None:
                check = running.nonzero().squeeze(1)
                done = stopping(tokens[present[check], :step + 1], None)
                finished[check] |= done
            if step == steps - 1:
                finished = running.clone()  # the rest reached max_new_tokens
            lengths_out[present[finished]] = step + 1
            if keep is not None:
                for position in finished.nonzero().squeeze(1).tolist():
                    kept[int(present[position])] = _cached_columns(cache, attention_mask[position], position) \
                        if growable else None
            progress.advance(int(running.sum()), int(finished.sum()), step)
            running &= ~finished
            if not running.any():
                break
            stale = int((~running).sum())
            if settings.drop_finished and stale and stale >= max(1, len(present) // 8):
                keep_rows = running.nonzero().squeeze(1)
                keep_device = keep_rows.to(device)
                cache.batch_select_indices(keep_device)
                present, running = present[keep_rows], running[keep_rows]
                attention_mask, positions, next_tokens = attention_mask[keep_device], positions[keep_device], next_tokens[keep_device]
                if step_function is not None:
                    mask_bias = mask_bias[keep_device]
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(present), 1)], dim=1)
            if step_function is not None:
                logits = step_function(next_tokens, positions, cache.layers, mask_bias[:, :width + step + 1])
            else:
                output = self.model(input_ids=next_tokens.unsqueeze(1), attention_mask=attention_mask,
                                    position_ids=positions.unsqueeze(1), use_cache=True, logits_to_keep=1,
                                    **{cache_argument: cache})
                logits = output.logits[:, -1]
            positions = positions + 1
        del cache
        completions = []
        for row in range(rows):
            count = int(lengths_out[row])
            completion = self._completion(tokens[row, :count].tolist(), options, len(contexts[row]))
            count = completion.num_tokens
            if logprobs is not None:
                completion.logprobs = logprobs[row, :count].tolist()
            if entropies is not None:
                completion.entropies = entropies[row, :count].tolist()
            completions.append(completion)
            if keep is not None:
                keep[row] = _RowState.after(contexts[row], completion.token_ids, kept[row])
        return completions

    @torch.no_grad()
    def _prefill_continuations(self, states: list["_RowState"], new_ids: list[list[int]], max_new_tokens: int):
        """Returns (KV cache, last-position logits (rows, vocab), attention mask (rows, width)) after each row's context
        followed by ``new_ids`` of that row, reusing the keys and values of the row's ``state``.

        The cached part of each row sits right-aligned before one block of the new positions, in
        which each row's pending tokens (context tokens not cached yet, then ``new_ids``) are
        right-aligned too; only that block runs through the model.
        """
        device = self.device
        rows = len(states)
        cached = [state.cached_length for state in states]
        pending = [state.ids[length:] + list(ids) for state, length, ids in zip(states, cached, new_ids)]
        old, new = max(cached), max(len(p) for p in pending)
        attention_mask = torch.zeros((rows, old + new), dtype=torch.long)
        input_ids = torch.full((rows, new), self.pad_token_id, dtype=torch.long)
        for row, (length, tokens) in enumerate(zip(cached, pending)):
            attention_mask[row, old - length:old] = 1
            attention_mask[row, old + new - len(tokens):] = 1
            input_ids[row, new - len(tokens):] = torch.tensor(tokens, dtype=torch.long)
        position_ids = (attention_mask.cumsum(dim=1) - 1).clamp_(min=0)[:, old:]
        step_cache = DynamicCache()
        if old:
            layers = []
            for layer in range(len(next(state.keys for state in states if state.cached_length))):
                sample = next(state.keys[layer] for state in states if state.cached_length)
                keys = sample.new_zeros((rows,) + sample.shape[1:2] + (old,) + sample.shape[3:])
                values = torch.zeros_like(keys)
                for row, (state, length) in enumerate(zip(states, cached)):
                    if length:
                        keys[row, :, old - length:] = state.keys[layer][0]
                        values[row, :, old - length:] = state.values[layer][0]
                layers.append((keys, values))
            step_cache = DynamicCache(ddp_cache_data=layers)
        output = self.model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                            position_ids=position_ids.to(device), use_cache=True, logits_to_keep=1,
                            **{_forward_cache_argument(self.model): step_cache})
        logits = output.logits[:, -1]
        if not self._growable():
            return step_cache, logits, attention_mask.to(device)
        width = old + new
        cache = DynamicCache()
        cache.layers = [_PreallocatedLayer(width + max_new_tokens, width + max_new_tokens, width)
                        for _ in DynamicCache(config=self.model.config).layers]
        cache.layer_class_to_replicate = None
        for layer, filled in zip(cache.layers, step_cache.layers):
            layer.place(slice(0, rows), rows, 0, filled.keys, filled.values)
        return cache, logits, attention_mask.to(device)

    def _pick(self, logits: torch.Tensor, options: SamplingOptions, step: int, row_seeds: np.ndarray
              ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Returns (next tokens (rows,), their log-probs or None, the model's entropy or None) from the step's logits (rows, vocab).

        Entropy is of the model's own distribution; log-probs are under the distribution
        sampled from (EOS suppression while ``min_new_tokens`` lasts, temperature, top-p), or
        for greedy decoding under the model's own distribution.
        """
        scores = logits.float()
        entropy = entropy_of_scores(scores) if options.return_entropy else None
        log_normaliser = None
        if options.greedy and options.return_logprobs:
            # The model's own distribution, before EOS suppression: log p(token) = score - logsumexp(scores).
            log_normaliser = torch.logsumexp(scores, dim=-1)
        if step < options.min_new_tokens and self.eos_token_ids:
            scores[:, self.eos_token_ids] = -float("inf")  # the step's logits are ours to change
        if options.greedy:
            tokens = scores.argmax(dim=-1)
            # A picked token is never a suppressed one, so its score is still the model's own.
            token_logprobs = None if log_normaliser is None else scores.gather(1, tokens[:, None]).squeeze(1) - log_normaliser
            return tokens, token_logprobs, entropy
        sample = sample_tokens if self.settings.fused_sampler else sample_tokens_unfused
        tokens, token_logprobs = sample(scores, options.temperature, options.top_p, row_uniforms(row_seeds, step))
        return tokens, token_logprobs if options.return_logprobs else None, entropy

    def _growable(self) -> bool:
        """Returns whether our preallocated layers can hold the model's cache: every layer a plain ``DynamicLayer`` (no sliding window)."""
        if not (self.settings.preallocated_cache and hasattr(self.model, "config")):
            return False
        layers = DynamicCache(config=self.model.config).layers
        return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)

    @torch.no_grad()
    def _shared_prefix(self, prompt_ids: list[list[int]]) -> _SharedPrefix | None:
        """Returns the call's common token prefix (a template's instructions) with its keys and values, or None where none pays.

        It is run once for the whole call, however many batches and buckets follow; at least
        one token of every prompt stays after it, as that token's logits start the response.
        """
        if not (self.settings.shared_prefix and len(prompt_ids) > 1 and self._growable()):
            return None
        tokens = os.path.commonprefix(prompt_ids)[:min(len(ids) for ids in prompt_ids) - 1]
        if len(tokens) < 8:  # too short to pay for its own forward pass
            return None
        device, cache = self.device, DynamicCache()
        self.model(input_ids=torch.tensor([tokens], device=device), position_ids=torch.arange(len(tokens), device=device)[None],
                   use_cache=True, logits_to_keep=1, **{_forward_cache_argument(self.model): cache})
        return _SharedPrefix(len(tokens), [(layer.keys, layer.values) for layer in cache.layers])

    def _prefill(self, batch_ids: list[list[int]], rows_per_prompt: int, max_new_tokens: int,
                 prefix: _SharedPrefix | None = None):
        """Returns (KV cache, last-position logits (rows, vocab), attention mask (rows, width)) of every row after its prompt.

        The keys and values of ``prefix`` (the call's common prefix, computed once) are shared by
        every row; the rest of each prompt (longest first) is prefilled in buckets of similar
        length, each prompt once, and written right-aligned after the prefix into one cache of
        ``len(batch_ids)`` rows, then repeated ``rows_per_prompt`` times per prompt. A row's
        columns: prefix, padding, the rest of its prompt; positions skip the padding.
        """
        settings, device = self.settings, self.device
        unique = settings.shared_prefill
        prompts = batch_ids if unique else [ids for ids in batch_ids for _ in range(rows_per_prompt)]
        cache_argument = _forward_cache_argument(self.model)
        growable = self._growable()
        if not growable:
            prefix = None
        shared = 0 if prefix is None else prefix.length
        rests = [ids[shared:] for ids in prompts]
        lengths = [len(ids) for ids in rests]
        width = shared + max(lengths)
        if growable and settings.prefill_buckets:
            buckets = _length_buckets(lengths, settings.bucket_padding)
        else:  # without our own layers the cache of one bucket is the whole cache
            buckets = [(0, len(prompts))]
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        attention_mask[:, :shared] = 1
        for row, length in enumerate(lengths):
            attention_mask[row, width - length:] = 1  # LEFT padding: every prompt ends at the same column
        cache = prefix_states = None
        if growable:
            cache = DynamicCache()
            cache.layers = [_PreallocatedLayer(width + max_new_tokens, width + max_new_tokens, width)
                            for _ in DynamicCache(config=self.model.config).layers]
            cache.layer_class_to_replicate = None
        if prefix is not None:
            prefix_states = prefix.states
            for layer, (keys, values) in zip(cache.layers, prefix_states):
                layer.place(slice(0, len(prompts)), len(prompts), 0, keys.expand(len(prompts), -1, -1, -1),
                            values.expand(len(prompts), -1, -1, -1))
        last_logits = []
        for start, end in buckets:
            bucket_width = lengths[start]
            input_ids = torch.full((end - start, bucket_width), self.pad_token_id, dtype=torch.long)
            for row, ids in enumerate(rests[start:end]):
                input_ids[row, bucket_width - len(ids):] = torch.tensor(ids, dtype=torch.long)
            bucket_mask = torch.cat([attention_mask[start:end, :shared], attention_mask[start:end, width - bucket_width:]],
                                    dim=1)
            position_ids = (bucket_mask.cumsum(dim=1) - 1).clamp_(min=0)[:, shared:]
            rows = end - start
            bucket_cache = DynamicCache() if prefix_states is None else DynamicCache(
                ddp_cache_data=[(keys.expand(rows, -1, -1, -1), values.expand(rows, -1, -1, -1))
                                for keys, values in prefix_states])
            output = self.model(input_ids=input_ids.to(device), attention_mask=bucket_mask.to(device),
                                position_ids=position_ids.to(device), use_cache=True, logits_to_keep=1,
                                **{cache_argument: bucket_cache})
            last_logits.append(output.logits[:, -1])
            if not growable:
                cache = bucket_cache
                break
            for layer, filled in zip(cache.layers, bucket_cache.layers):
                layer.place(slice(start, end), len(prompts), width - bucket_width, filled.keys[:, :, shared:],
                            filled.values[:, :, shared:])
            del bucket_cache, output
        logits = torch.cat(last_logits)
        attention_mask = attention_mask.to(device)
        if unique and rows_per_prompt > 1:
            index = torch.arange(len(batch_ids), device=device).repeat_interleave(rows_per_prompt)
            cache.batch_select_indices(index)
            logits, attention_mask = logits[index], attention_mask[index]
        return cache, logits, attention_mask

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _completion(self, ids: list[int], options: SamplingOptions, prompt_length: int) -> Completion:
        """Returns the completion of one generated row: cut at the first EOS or stop string."""
        eos_ids = set(self.eos_token_ids)
        end = len(ids)
        finish = "length"
        for position in range(options.min_new_tokens, len(ids)):
            if ids[position] in eos_ids:
                end, finish = position + 1, "eos"
                break
        content_end = end - 1 if finish == "eos" else end
        text = self._decode(ids[:content_end])
        stop_string = None
        if options.stop:
            # Stop strings count only once min_new_tokens are out (as the stopping criterion enforces).
            search_from = len(self._decode(ids[:max(0, options.min_new_tokens - 1)])) if options.min_new_tokens else 0
            cut, stop_string = cut_at_stop(text[search_from:], options.stop)
            if stop_string is not None:
                text = text[:search_from] + cut
                end = self._tokens_covering(ids, len(text), content_end)
                finish = "stop"
        return Completion(text=text, token_ids=ids[:end], finish_reason=finish, stop_string=stop_string,
                          prompt_token_count=prompt_length)

    def _tokens_covering(self, ids: list[int], characters: int, upper: int) -> int:
        """Returns the fewest leading tokens (≤ upper) whose text has at least ``characters`` characters."""
        low, high = 1, upper
        while low < high:  # binary search: O(log n) decodes instead of one per token
            middle = (low + high) // 2
            if len(self._decode(ids[:middle])) >= characters:
                high = middle
            else:
                low = middle + 1
        return low
