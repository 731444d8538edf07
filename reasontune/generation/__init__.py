"""One ``Generator`` contract for sampling responses; Hugging Face and vLLM backends; one factory.

The contract every backend implements, so that trainers never ask which backend they hold:

- ``generate(prompts, options)`` returns ``list[list[Completion]]``: one inner list per prompt,
  in the order of ``prompts``, each holding ``options.n`` completions. A stop string ends a
  completion and is kept in its text (cut right after it); ``temperature == 0`` is greedy.
  With ``options.return_logprobs`` each completion carries its sampled tokens' log-probs
  **under the distribution actually sampled from**: temperature, top-p and EOS suppression
  (``min_new_tokens``) applied, as importance correction against the trainer needs (for
  greedy decoding, which has no sampling distribution, the model's own log-probs at
  temperature 1). Per-token entropies, where the backend has the full distribution, are of
  the model's own (temperature 1) distribution.
- ``sync_weights(model)``: make the next ``generate`` sample from ``model``'s current weights
  (the HF generator samples from the policy object itself; vLLM copies the weights in).
- ``sleep()`` / ``wake()``: free and take back accelerator memory between rollouts (no-ops
  where meaningless); ``generate`` and ``sync_weights`` wake a sleeping engine themselves.
- ``close()``: release the backend's resources.

``build_generator`` is the one factory. Backends: ``HFGenerator`` (``reasontune.generation.hf``;
CPU and GPU), ``VLLMGenerator`` (``reasontune.generation.vllm``; optional ``vllm`` extra) and
``VLLMServerGenerator`` (``reasontune.generation.vllm_server``: a running ``vllm serve``).
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

    def generate_flat(self, prompts: Sequence[str], options: SamplingOptions) -> list[Completion]:
        """Returns the completions as one list: prompt 0's n samples, then prompt 1's, … (GRPO's layout)."""
        return [completion for group in self.generate(prompts, options) for completion in group]


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


def build_generator(backend: Literal["hf", "vllm"], *, model=None, tokenizer=None, model_name: str = "",
                    dtype: str = "float32", seed: int = 0, batch_size: int = 32, vllm_device: str | None = None,
                    vllm_gpu_memory_utilization: float = 0.85, share_gpu_with_training: bool = False,
                    vllm_tensor_parallel_size: int = 1, vllm_external_launcher: bool = False,
                    vllm_server: VLLMServerOptions | None = None) -> Generator:
    """Returns the generator of ``backend``: HF ``generate`` on ``model`` itself, a vLLM engine built from ``model_name``, or a vLLM server.

    A vLLM engine starts from the weights in ``model_name``; trainers call ``sync_weights``
    before each rollout or evaluation. ``share_gpu_with_training`` (a vLLM engine on the
    policy's own GPU) turns on sleep mode, so ``sleep()`` gives the KV cache back to training.
    ``vllm_tensor_parallel_size`` shards the engine over GPUs; ``vllm_external_launcher``: one
    engine per torchrun rank. With ``vllm_server`` (``backend == "vllm"``) nothing starts here:
    ``VLLMServerGenerator`` samples from that server, weights pushed to it in ``dtype``.
    """
    if backend == "vllm" and vllm_server is not None:
        import torch

        from reasontune.generation.vllm_server import VLLMServerGenerator  # plain HTTP; NCCL pushes import vllm

        return VLLMServerGenerator(vllm_server.url, weight_sync=vllm_server.weight_sync,
                                   sync_address=vllm_server.sync_address, sync_port=vllm_server.sync_port,
                                   dtype=getattr(torch, dtype), timeout_s=vllm_server.timeout_s,
                                   vocab_size=vllm_server.vocab_size or model_vocab_size(model, model_name))
    if backend == "vllm":
        from reasontune.generation.vllm import VLLMGenerator  # optional extra: imported only when asked for

        return VLLMGenerator(model_name, device=vllm_device, dtype=dtype, seed=seed,
                             gpu_memory_utilization=vllm_gpu_memory_utilization,
                             enable_sleep_mode=share_gpu_with_training and vllm_device is None,
                             tensor_parallel_size=vllm_tensor_parallel_size, external_launcher=vllm_external_launcher)
    if backend != "hf":
        raise ValueError(f"unknown generation backend {backend!r}; expected hf or vllm")
    if model is None or tokenizer is None:
        raise ValueError("the hf backend samples from a loaded model: pass model= and tokenizer=")
    from reasontune.generation.hf import HFGenerator  # torch/transformers stay out of `import reasontune.generation`

    return HFGenerator(model, tokenizer, batch_size=batch_size)


def model_vocab_size(model=None, model_name: str = "") -> int | None:
    """Returns the vocabulary size of ``model`` (its config), else of the config of ``model_name`` when it is on disk or cached; None when unknown."""
    config = getattr(model, "config", None)
    size = getattr(config, "vocab_size", None)
    if isinstance(size, int):
        return size
    if not model_name:
        return None
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model_name, local_files_only=True)  # never a download for a bound
    except (OSError, ValueError, ImportError):
        return None
    config = getattr(config, "text_config", None) or config
    size = getattr(config, "vocab_size", None)
    return size if isinstance(size, int) else None


def __getattr__(name: str):
    # Backends are imported on first use: torch/transformers (hf) and vllm stay out of `import reasontune.generation`.
    if name == "HFGenerator":
        from reasontune.generation.hf import HFGenerator

        return HFGenerator
    if name == "VLLMGenerator":
        from reasontune.generation.vllm import VLLMGenerator

        return VLLMGenerator
    if name == "VLLMServerGenerator":
        from reasontune.generation.vllm_server import VLLMServerGenerator

        return VLLMServerGenerator
    raise AttributeError(f"module 'reasontune.generation' has no attribute {name!r}")


__all__ = ["Completion", "FinishReason", "Generator", "HFGenerator", "SamplingOptions", "VLLMGenerator",
           "VLLMServerGenerator", "VLLMServerOptions", "build_generator", "cut_at_stop"]
