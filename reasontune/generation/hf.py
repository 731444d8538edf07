"""The Hugging Face backend: batched ``model.generate`` with left padding, stop strings, sampling log-probs and entropy."""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Sequence

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from reasontune.generation import Completion, Generator, SamplingOptions, cut_at_stop
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


class _SuppressEOSUntil(LogitsProcessor):
    """Sets the EOS logits to -inf in place while fewer than ``min_new_tokens`` tokens are generated.

    Replaces ``generate(min_new_tokens=...)``, whose processor clones the whole ``(rows, vocab)``
    score matrix and rebuilds a vocab-sized EOS mask every step, even after ``min_new_tokens``:
    three vocab-wide passes a step, more than the LM head itself at Qwen's vocab on CPU. This
    one writes ``rows × len(eos)`` entries, and nothing once the minimum is reached.
    """

    def __init__(self, eos_token_ids: Sequence[int], prompt_width: int, min_new_tokens: int):
        self.eos_token_ids = list(eos_token_ids)
        self.prompt_width = prompt_width
        self.min_new_tokens = min_new_tokens

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if input_ids.shape[1] - self.prompt_width < self.min_new_tokens:
            scores[:, self.eos_token_ids] = -float("inf")  # generate hands us its own float32 copy of the logits
        return scores


class _SampledTokenLogProbs:
    """Keeps one step's log-softmax and gathers the sampled token's entry once it is known.

    The sampled token appears only at the next processor call (or after ``generate``
    returns), so one step of ``(rows, vocab)`` log-probs is kept: memory stays
    O(rows × vocab), never O(steps × vocab).
    """

    def __init__(self) -> None:
        self.previous: torch.Tensor | None = None
        self.values: list[torch.Tensor] = []  # each (rows,) float32

    def remember(self, log_probs: torch.Tensor) -> None:
        self.previous = log_probs

    def record_sampled(self, tokens: torch.Tensor) -> None:
        if self.previous is not None:
            self.values.append(self.previous.gather(-1, tokens.unsqueeze(-1)).squeeze(-1))
            self.previous = None

    def stacked(self) -> torch.Tensor | None:
        """Returns (rows, steps) float32 on the CPU, or None when nothing was recorded."""
        return torch.stack(self.values, dim=1).cpu() if self.values else None


def _finite_log_softmax(scores: torch.Tensor) -> torch.Tensor:
    # A model may emit -inf logits itself (masked vocab rows); a finite floor keeps p·logit at 0, not NaN.
    return torch.log_softmax(torch.nan_to_num(scores.float(), neginf=torch.finfo(torch.float32).min), dim=-1)


class _ModelDistributionRecorder(LogitsProcessor):
    """Records per generated position the entropy of the model's own distribution (raw logits, temperature 1).

    Runs first among the processors, before EOS suppression and the sampling warper. In
    greedy decoding it also records the sampled tokens' log-probs under this distribution
    (greedy has no sampling distribution of its own).
    """

    def __init__(self, want_entropy: bool, want_logprobs: bool):
        self.want_entropy = want_entropy
        self.logprobs = _SampledTokenLogProbs() if want_logprobs else None
        self.entropies: list[torch.Tensor] = []  # each (rows,) float32

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        log_probs = _finite_log_softmax(scores)
        if self.logprobs is not None:
            self.logprobs.record_sampled(input_ids[:, -1])
            self.logprobs.remember(log_probs)
        if self.want_entropy:
            # H = -Σ p log p from the log-softmax already at hand: one pass instead of a second reduction.
            self.entropies.append(-(log_probs.exp() * log_probs).sum(dim=-1))
        return scores


def row_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """Returns the seed of one sampled row: a 63-bit hash of (sampling seed, global prompt index, sample index)."""
    digest = hashlib.blake2b(f"{seed}/{prompt_index}/{sample_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class _SamplingWarper(LogitsProcessor):
    """Applies temperature and top-p, samples each row with its own generator, and records the sampled tokens' log-probs.

    The last processor. ``generate`` decodes greedily: this returns scores that are -inf
    everywhere but at the token it sampled, so ``generate``'s argmax takes that token. Each row
    has its own ``torch.Generator`` (seeded by ``row_seed`` from its question's global index and
    its sample index) and draws one uniform per generated token, sampled by inverting the CDF of
    ``softmax(scores)``: a row's tokens depend on its prompt and seed alone, not on which other
    prompts share its batch or rank. The recorded log-probs are those of the distribution
    actually sampled from (after EOS suppression too), which importance correction against the
    trainer's log-probs needs. Top-p keeps the smallest set of most probable tokens whose mass
    reaches ``top_p`` (at least one token).
    """

    def __init__(self, temperature: float, top_p: float, want_logprobs: bool, generators: list[torch.Generator]):
        self.temperature = temperature
        self.top_p = top_p
        self.logprobs = _SampledTokenLogProbs() if want_logprobs else None
        self.generators = generators  # one per row, on the CPU

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.logprobs is not None:
            self.logprobs.record_sampled(input_ids[:, -1])
        scores = scores / self.temperature
        if self.top_p < 1.0:
            sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
            probs = torch.softmax(sorted_scores.float(), dim=-1)
            mass_before = torch.cumsum(probs, dim=-1) - probs  # probability of the more likely tokens
            remove_sorted = mass_before >= self.top_p
            remove_sorted[:, 0] = False
            remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)
            scores = scores.masked_fill(remove, -float("inf"))
        log_probs = _finite_log_softmax(scores)
        if self.logprobs is not None:
            self.logprobs.remember(log_probs)
        # u in (0, 1]: the first token whose cumulative probability reaches u has probability > 0.
        uniforms = 1.0 - torch.tensor([float(torch.rand((), dtype=torch.float64, generator=g)) for g in self.generators],
                                      dtype=torch.float32)
        cumulative = log_probs.exp().cumsum(dim=-1)
        targets = (uniforms.to(cumulative.device) * cumulative[:, -1]).unsqueeze(1)
        tokens = torch.searchsorted(cumulative, targets).clamp_(max=scores.shape[-1] - 1)
        return torch.full_like(scores, -float("inf")).scatter_(1, tokens, 0.0)


class HFGenerator(Generator):
    """Generates with a Hugging Face causal LM (any device) in length-sorted, left-padded batches.

    ``batch_size`` bounds the sequences per ``generate`` call: ``batch_size // n`` prompts with
    their ``n`` samples each (at least one prompt). The model is put in eval mode for
    generation and returned to its previous mode; the KV cache is used even when the training
    config turned ``use_cache`` off. Sampling uses exactly ``options`` (top-k off, no
    repetition penalty), ignoring sampling defaults in the model's ``generation_config``.
    """

    def __init__(self, model, tokenizer, batch_size: int = 32):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
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

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def sync_weights(self, model) -> None:
        """Returns nothing; samples from ``model`` from now on (the policy object itself: no copy, always in sync)."""
        self.model = model

    def sleep(self) -> None:
        """Returns nothing: the HF generator holds no memory of its own between calls."""

    def wake(self) -> None:
        """Returns nothing: the HF generator holds no memory of its own between calls."""

    def close(self) -> None:
        """Returns nothing; drops the reference to the model (the caller owns it)."""
        self.model = None

    def generate(self, prompts: Sequence[str], options: SamplingOptions) -> list[list[Completion]]:
        """Returns one list of ``options.n`` completions per prompt, in prompt order."""
        prompts = list(prompts)
        if not prompts:
            return []
        prompt_ids: list[list[int]] = self.tokenizer(prompts, add_special_tokens=True)["input_ids"]
        rows_per_prompt = 1 if options.greedy else options.n  # greedy samples are identical: compute one
        prompts_per_batch = max(1, self.batch_size // rows_per_prompt)
        # Longest first: similar lengths share a batch (less padding), and an OOM shows up on the first batch.
        order = sorted(range(len(prompts)), key=lambda i: -len(prompt_ids[i]))
        results: list[list[Completion] | None] = [None] * len(prompts)

        # Each sampled row's own generator is seeded from this seed and its question's global index.
        seed = options.seed if options.seed is not None else int(torch.randint(2**62, ()))
        was_training = self.model.training
        self.model.eval()
        # prompts/s and ETA when the call spans several batches (a bar on a terminal, a line every 30 s in a log)
        progress = Progress(len(prompts), description="generate", unit="prompt", leave=False,
                            enabled=len(order) > prompts_per_batch)
        try:
            for start in range(0, len(order), prompts_per_batch):
                progress.update(start)
                batch = order[start:start + prompts_per_batch]
                seeds = [row_seed(seed, options.first_prompt_index + index, sample)
                         for index in batch for sample in range(rows_per_prompt)]
                completions = self._generate_batch([prompt_ids[i] for i in batch], options, rows_per_prompt, seeds)
                for position, index in enumerate(batch):
                    group = completions[position * rows_per_prompt:(position + 1) * rows_per_prompt]
                    if rows_per_prompt < options.n:
                        group = [copy.deepcopy(group[0]) for _ in range(options.n)]
                    results[index] = group
        finally:
            progress.update(len(prompts))
            progress.close()
            self.model.train(was_training)
        return results  # type: ignore[return-value]

    @torch.no_grad()
    def _generate_batch(self, batch_ids: list[list[int]], options: SamplingOptions, rows_per_prompt: int,
                        seeds: list[int]) -> list[Completion]:
        """Returns ``len(batch_ids) * rows_per_prompt`` completions, prompt-major; ``seeds``: each row's sampling seed."""
        width = max(len(ids) for ids in batch_ids)
        input_ids = torch.full((len(batch_ids), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch_ids), width), dtype=torch.long)
        for row, ids in enumerate(batch_ids):  # LEFT padding: every prompt ends at the same column
            input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, width - len(ids):] = 1
        stopping = StoppingCriteriaList()
        if options.stop:
            last_characters = "".join(sorted({s[-1] for s in options.stop}))
            stopping.append(_StopOnStrings(self.tokenizer, options.stop, width, options.min_new_tokens,
                                           self._could_end_caches.setdefault(last_characters, {})))
        processors = LogitsProcessorList()
        model_recorder = None
        if options.return_entropy or (options.return_logprobs and options.greedy):
            model_recorder = _ModelDistributionRecorder(options.return_entropy, options.return_logprobs and options.greedy)
            processors.append(model_recorder)  # first: it sees the raw distribution, before EOS suppression
        if options.min_new_tokens and self.eos_token_ids:
            processors.append(_SuppressEOSUntil(self.eos_token_ids, width, options.min_new_tokens))
        warper = None
        if not options.greedy:
            warper = _SamplingWarper(options.temperature, options.top_p, options.return_logprobs,
                                     [torch.Generator().manual_seed(seed) for seed in seeds])
            processors.append(warper)  # last: it samples, and generate's argmax takes its token
        # Greedy decoding with repetition penalty 1: generate adds no warper of its own (ours applies temperature
        # and top-p, and samples) and ignores sampling defaults a checkpoint may carry. The samples of a prompt are
        # its rows repeated here, as generate's num_return_sequences would.
        device = self.device
        sequences = self.model.generate(
            input_ids=input_ids.repeat_interleave(rows_per_prompt, dim=0).to(device),
            attention_mask=attention_mask.repeat_interleave(rows_per_prompt, dim=0).to(device),
            max_new_tokens=options.max_new_tokens, min_new_tokens=None, min_length=0, repetition_penalty=1.0,
            eos_token_id=self.eos_token_ids or None, pad_token_id=self.pad_token_id, use_cache=True,
            stopping_criteria=stopping, logits_processor=processors, return_dict_in_generate=False, do_sample=False,
        )
        logprobs = entropies = None
        for recorder in (model_recorder, warper):
            if recorder is not None and recorder.logprobs is not None:
                recorder.logprobs.record_sampled(sequences[:, -1])
                logprobs = recorder.logprobs.stacked()
        if model_recorder is not None and model_recorder.entropies:
            entropies = torch.stack(model_recorder.entropies, dim=1).cpu()
        generated = sequences[:, width:].cpu()
        completions = []
        for row in range(generated.shape[0]):
            prompt_length = len(batch_ids[row // rows_per_prompt])
            completion = self._completion(generated[row].tolist(), options, prompt_length)
            count = completion.num_tokens
            if logprobs is not None:
                completion.logprobs = logprobs[row, :count].tolist()
            if entropies is not None:
                completion.entropies = entropies[row, :count].tolist()
            completions.append(completion)
        return completions

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
