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

The contract lives in ``reasontune.generation.base`` (which the backends import); ``build_generator`` is the one factory. Backends: ``HFGenerator`` (``reasontune.generation.hf``;
CPU and GPU), ``VLLMGenerator`` (``reasontune.generation.vllm``; optional ``vllm`` extra) and
``VLLMServerGenerator`` (``reasontune.generation.vllm_server``: a running ``vllm serve``).
"""

from __future__ import annotations

from typing import Literal

from reasontune.generation.base import (Completion, FinishReason, Generator, SamplingOptions, VLLMServerOptions,
                                        cut_at_stop)
# Both import vllm itself only inside the calls that need it, so they are cheap to import here.
from reasontune.generation.vllm import VLLMGenerator
from reasontune.generation.vllm_server import VLLMServerGenerator

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

        return VLLMServerGenerator(vllm_server.url, weight_sync=vllm_server.weight_sync,
                                   sync_address=vllm_server.sync_address, sync_port=vllm_server.sync_port,
                                   dtype=getattr(torch, dtype), timeout_s=vllm_server.timeout_s,
                                   vocab_size=vllm_server.vocab_size or model_vocab_size(model, model_name))
    if backend == "vllm":
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
    # The HF backend is imported on first use: torch/transformers stay out of `import reasontune.generation`.
    if name == "HFGenerator":
        from reasontune.generation.hf import HFGenerator

        return HFGenerator
    raise AttributeError(f"module 'reasontune.generation' has no attribute {name!r}")


__all__ = ["Completion", "FinishReason", "Generator", "HFGenerator", "SamplingOptions", "VLLMGenerator",
           "VLLMServerGenerator", "VLLMServerOptions", "build_generator", "cut_at_stop"]
