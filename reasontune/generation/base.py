"""The generator contract (see ``reasontune.generation``): sampling options, a completion, the ``Generator`` interface.

A module of its own so that the backends import the contract without importing the package's
factory, which imports them.
"""

from __future__ import annotations

import abc
import dataclasses
from dataclasses import dataclass
from typing import Literal, Sequence

FinishReason = Literal["stop", "eos", "length"]


@dataclass(frozen=True)
class SamplingOptions:
    """How to sample: the same fields for every backend (vLLM ``SamplingParams`` names where they agree).

    ``max_new_tokens`` caps generated tokens; ``min_new_tokens`` forbids EOS and stop strings
    before that many. ``stop`` strings end a completion and stay in its text. ``seed`` seeds the
    sampler (None: not reseeded). ``return_logprobs`` / ``return_entropy`` ask for per-token
    values of the sampled tokens (entropy is unavailable from vLLM and comes back None there).
    ``first_prompt_index`` is the index of a call's first prompt in the whole batch it is part
    of (a rank's slice starts there): the HF backend seeds each prompt's samples from ``seed``
    and that global index, so a question gets the same samples whichever call or rank draws it.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 1024
    min_new_tokens: int = 0
    stop: tuple[str, ...] = ("</answer>",)
    n: int = 1
    seed: int | None = None
    first_prompt_index: int = 0
    return_logprobs: bool = False
    return_entropy: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):  # a lone string would otherwise stop on each of its characters
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 means greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.max_new_tokens < 1 or not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(f"need 0 <= min_new_tokens ({self.min_new_tokens}) <= max_new_tokens "
                             f"({self.max_new_tokens}) and max_new_tokens >= 1")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def replace(self, **changes) -> "SamplingOptions":
        """Returns a copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes)


@dataclass
class Completion:
    """One sampled response.

    ``token_ids`` are the sampled tokens: through the token that completed a stop string (its
    text may run past the stop string; ``text`` is cut right after it), or through the EOS
    token (``text`` excludes EOS). ``logprobs[i]`` / ``entropies[i]`` belong to ``token_ids[i]``
    (floats, natural log) when requested. ``finish_reason``: ``"stop"`` (a stop string, named in
    ``stop_string``), ``"eos"`` or ``"length"`` (``max_new_tokens`` reached).
    """

    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    logprobs: list[float] | None = None
    entropies: list[float] | None = None
    stop_string: str | None = None
    prompt_token_count: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def mean_entropy(self) -> float | None:
        """Returns the mean per-token entropy, or None when entropies were not computed (or no tokens)."""
        if not self.entropies:
            return None
        return sum(self.entropies) / len(self.entropies)


class Generator(abc.ABC):
    """Samples completions for prompts; see the module docstring for the contract."""

    @abc.abstractmethod
    def generate(self, prompts: Sequence[str], options: SamplingOptions) -> list[list[Completion]]:
        """Returns one list of ``options.n`` completions per prompt, in prompt order."""

    @abc.abstractmethod
    def sync_weights(self, model) -> None:
        """Returns nothing; the next ``generate`` samples from ``model``'s current weights."""

    @abc.abstractmethod
    def sleep(self) -> None:
        """Returns nothing; frees accelerator memory until the next ``wake``/``generate`` (no-op where meaningless)."""

    @abc.abstractmethod
    def wake(self) -> None:
        """Returns nothing; takes back the memory ``sleep`` freed (no-op where meaningless)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Returns nothing; releases the backend (the generator is unusable afterwards)."""

    def open_session(self) -> "GenerationSession | None":
        """Returns a session that keeps each row's state (its KV cache) between the turns of a multi-turn rollout, or None
        where the backend keeps none and a continuation is a ``generate`` call on the joined text (the default)."""
        return None

    def generate_flat(self, prompts: Sequence[str], options: SamplingOptions) -> list[Completion]:
        """Returns the completions as one list: prompt 0's n samples, then prompt 1's, … (GRPO's layout)."""
        return [completion for group in self.generate(prompts, options) for completion in group]


class GenerationSession(abc.ABC):
    """A multi-turn generation whose rows keep their state between turns (``Generator.open_session``).

    ``generate`` samples the first turn as ``Generator.generate`` does, and numbers the rows
    prompt-major (prompt ``i``'s sample ``j`` is row ``i * n + j``). ``extend`` appends a text (an
    environment turn) to each given row and samples its next turn; a row's context is its
    tokens as sampled, not a re-tokenisation of its text. ``retain`` forgets every other row.
    """

    @abc.abstractmethod
    def generate(self, prompts: Sequence[str], options: SamplingOptions) -> list[list[Completion]]:
        """Returns one list of ``options.n`` completions per prompt; every row stays open for ``extend``."""

    @abc.abstractmethod
    def extend(self, rows: Sequence[int], texts: Sequence[str], options: SamplingOptions) -> list[Completion]:
        """Returns one completion per row (``options.n == 1``): its continuation after ``texts[i]`` is appended to row ``rows[i]``."""

    @abc.abstractmethod
    def retain(self, rows: Sequence[int]) -> None:
        """Returns nothing; forgets the state of every row not in ``rows``."""

    @abc.abstractmethod
    def close(self) -> None:
        """Returns nothing; frees every row's state."""

    def __enter__(self) -> "GenerationSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, str | None]:
    """Returns (text cut right after the earliest stop string, that stop string) or (text, None)."""
    best: tuple[int, str] | None = None
    for stop_string in stop:
        position = text.find(stop_string)
        if position >= 0 and (best is None or position + len(stop_string) < best[0]):
            best = (position + len(stop_string), stop_string)
    if best is None:
        return text, None
    return text[: best[0]], best[1]


@dataclass(frozen=True)
class VLLMServerOptions:
    """Where a running ``vllm serve`` is and how weights reach it (``VLLMServerGenerator``'s arguments)."""

    url: str
    weight_sync: Literal["nccl", "none"] = "nccl"
    sync_address: str | None = None
    sync_port: int = 0
    timeout_s: float = 600.0  # one request, reply included (--vllm-timeout)
    vocab_size: int | None = None  # bound of the token ids a reply may hold (None: the model's, when known here)
