"""The vLLM backend (optional ``vllm`` extra): fast sampling, with the training policy's weights pushed in.

How weights get in, for vLLM's V1 engine (0.10 and later): the old path
``llm.llm_engine.model_executor.driver_worker.model_runner.model`` is gone when the engine core
runs in its own process (V1's default), so we never reach into engine internals. Instead the
engine's workers are given a small extension class (``worker_extension_cls``, vLLM's
documented hook for RLHF weight updates) with one method, and ``sync_weights`` calls it
through ``llm.collective_rpc``. By default the engine core runs in this process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``, as TRL's colocate mode does): the RPC is then a plain
call and tensors are handed over without serialisation or copies; the model's own
``load_weights`` fuses q/k/v and gate/up and casts to the engine's dtype. With an
out-of-process engine (``in_process=False``, needed to put vLLM on a second GPU) the same call
works, the tensors being serialised in chunks of about ``chunk_bytes``.

Sharing one GPU with the policy: keep ``gpu_memory_utilization`` low enough for training, or
``enable_sleep_mode=True`` and call ``sleep()`` after each rollout (frees the KV cache, and
with level 1 offloads weights to CPU); ``generate`` and ``sync_weights`` wake it.

Parallelism: ``tensor_parallel_size`` shards one engine over that many GPUs (vLLM's own worker
processes). Under torchrun (``external_launcher=True``) every rank builds its own engine on its
own GPU in vLLM's ``external_launcher`` mode, which joins torchrun's process group instead of
spawning workers (as TRL's colocate mode does): the ranks are the data-parallel engines, each
sampling its own slice of the questions; tensor parallel stays 1 there (ranks of a
tensor-parallel group would have to submit the same prompts). vLLM's ``LLM`` refuses
``data_parallel_size > 1`` in one process, so data parallel comes from the launch.

A policy sharded with FSDP2 is synced one decoder layer at a time (``policy_weight_batches``):
every rank gathers each layer (a collective) and loads it into its own engine, so the whole
model is never gathered on one device besides the engine's own copy.

Log-probs: the engine is built with ``logprobs_mode="processed_logprobs"`` (vLLM 0.10.2+),
so a completion's log-probs are those of the distribution actually sampled from
(temperature and top-p applied), as the generator contract requires.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any

from reasontune.generation.base import Completion, Generator, SamplingOptions

_NAME_PREFIXES_TO_DROP = ("_orig_mod.", "module.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")


class WeightSyncExtension:
    """Mixed into vLLM's GPU worker (``worker_extension_cls``); runs inside the engine's worker."""

    def reasontune_load_weights(self, named_tensors: list) -> int:
        """Returns the number of tensors given to the model's ``load_weights`` (HF checkpoint names)."""
        runner = self.model_runner  # type: ignore[attr-defined]  (set by vLLM's Worker)
        model = runner.get_model() if hasattr(runner, "get_model") else runner.model
        model.load_weights(weights=iter(named_tensors))
        return len(named_tensors)


def check_engine_layout(tensor_parallel_size: int, external_launcher: bool, device: str | None,
                             in_process: bool | None) -> None:
    """Raises ValueError when an in-process engine's parallel layout cannot run (sizes, torchrun and a device)."""
    if tensor_parallel_size < 1:
        raise ValueError(f"tensor_parallel_size must be >= 1, got {tensor_parallel_size}")
    if external_launcher and (tensor_parallel_size != 1 or device is not None or in_process is False):
        raise ValueError("under torchrun each rank's engine runs in process on the rank's own GPU with tensor "
                         "parallel 1; for tensor parallel or other GPUs use a vllm serve server (--vllm-server-url)")
    if device is not None and tensor_parallel_size != 1:
        raise ValueError(f"device={device!r} puts the engine on one GPU, tensor_parallel_size={tensor_parallel_size} "
                         "on several; choose one (CUDA_VISIBLE_DEVICES picks the GPUs of a tensor-parallel engine)")


def _checkpoint_name(name: str) -> str:
    """Returns a parameter name as it appears in a Hugging Face checkpoint (wrapper prefixes removed)."""
    for prefix in _NAME_PREFIXES_TO_DROP:
        name = name.replace(prefix, "")
    return name


def policy_weights(model) -> Iterator[tuple[str, Any]]:
    """Yields ``(checkpoint name, full tensor)`` of a policy: one FSDP2 layer gathered at a time, a LoRA policy merged.

    A sharded model (``distributed.is_sharded``) goes through ``lora.merged_weights_by_layer``: every
    rank must iterate to the end (each layer's gather is a collective). A LoRA policy yields its
    merged weights under the base model's names (``lora.merged_weights``); a plain one its state dict.
    """
    from reasontune.distributed import is_sharded  # torch: only where weights move
    from reasontune.lora import merged_weights, merged_weights_by_layer

    if is_sharded(model):
        for layer in merged_weights_by_layer(model):  # a sharded LoRA policy merged layer by layer too
            for name, tensor in layer.items():
                yield _checkpoint_name(name), tensor
        return
    for name, tensor in merged_weights(model):
        yield _checkpoint_name(name), tensor.detach()


def policy_weight_batches(model, chunk_bytes: int, dtype=None) -> Iterator[list[tuple[str, Any]]]:
    """Yields the policy's weights (``policy_weights`` order) in lists of about ``chunk_bytes`` each.

    A list closes as soon as its tensors reach ``chunk_bytes`` (one tensor larger than that is a
    list of its own), so a consumer holds at most one list plus the layer being gathered.
    ``dtype`` (a torch dtype or None): tensors are cast to it (e.g. the engine's bfloat16, to
    halve what fp32 master weights would send); None keeps each tensor's own.
    """
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
    batch, size = [], 0
    for name, tensor in policy_weights(model):
        if dtype is not None and tensor.dtype != dtype and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        batch.append((name, tensor))
        size += tensor.numel() * tensor.element_size()
        if size >= chunk_bytes:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


class VLLMGenerator(Generator):
    """Samples with a vLLM ``LLM`` built from a model directory or hub name (one GPU, or ``tensor_parallel_size`` GPUs).

    ``device``: None for the current GPU (shared with the policy), or e.g. ``"cuda:1"`` for a
    second GPU; that starts the engine in its own process with only that GPU visible.
    ``external_launcher``: under torchrun, one engine per rank joined to torchrun's process
    group (tensor parallel 1, the current GPU, in process). ``llm_kwargs`` go to ``vllm.LLM``
    unchanged (``max_num_seqs``, ``enforce_eager`` …).
    """

    def __init__(self, model: str, *, tokenizer: str | None = None, dtype: str = "bfloat16",
                 gpu_memory_utilization: float = 0.85, max_model_len: int | None = None,
                 enable_sleep_mode: bool = False, enable_prefix_caching: bool = True, seed: int = 0,
                 device: str | None = None, in_process: bool | None = None, chunk_bytes: int = 1 << 30,
                 tensor_parallel_size: int = 1, external_launcher: bool = False, **llm_kwargs: Any):
        check_engine_layout(tensor_parallel_size, external_launcher, device, in_process)
        try:
            from vllm import LLM
        except ImportError as error:
            raise ImportError("the vLLM backend needs vllm: pip install 'reasontune[vllm]' (a CUDA GPU is required)"
                              ) from error
        if external_launcher:
            # vLLM's torchrun mode: reads RANK/LOCAL_RANK/WORLD_SIZE/MASTER_* from torchrun's environment.
            llm_kwargs.setdefault("distributed_executor_backend", "external_launcher")
            in_process = True
        self.chunk_bytes = chunk_bytes
        self.enable_sleep_mode = enable_sleep_mode
        self._asleep = False
        self._weights_valid = True
        if in_process is None:
            in_process = device is None
        saved_env = {key: os.environ.get(key) for key in ("VLLM_ENABLE_V1_MULTIPROCESSING", "CUDA_VISIBLE_DEVICES")}
        try:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if in_process else "1"
            if device is not None:
                if in_process:
                    raise ValueError("a vLLM engine on another GPU (device=...) must run out of process; "
                                     "leave in_process unset or False")
                index = device.split(":", 1)[1] if ":" in device else "0"
                visible = (saved_env["CUDA_VISIBLE_DEVICES"] or "").split(",")
                # The engine process sees only that GPU (as its cuda:0); indices follow the caller's visibility.
                os.environ["CUDA_VISIBLE_DEVICES"] = visible[int(index)] if visible != [""] else index
            llm_kwargs.setdefault("logprobs_mode", "processed_logprobs")
            self.llm = LLM(model=model, tokenizer=tokenizer, dtype=dtype, gpu_memory_utilization=gpu_memory_utilization,
                           max_model_len=max_model_len, enable_sleep_mode=enable_sleep_mode,
                           enable_prefix_caching=enable_prefix_caching, seed=seed,
                           tensor_parallel_size=tensor_parallel_size,
                           worker_extension_cls=f"{__name__}.WeightSyncExtension", **llm_kwargs)
        finally:
            for key, value in saved_env.items():
                if key == "VLLM_ENABLE_V1_MULTIPROCESSING":
                    continue  # read again by vLLM at runtime; keep it as the engine was built
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value

    # -- memory sharing with a training policy -------------------------------------------------

    def sleep(self, level: int = 1) -> None:
        """Returns nothing; with sleep mode frees the KV cache (level 1 also offloads weights to CPU, level 2 drops them); else a no-op."""
        if self.enable_sleep_mode and not self._asleep:
            self.llm.sleep(level=level)
            self._asleep = True
            self._weights_valid = level == 1

    def wake(self, tags: list[str] | None = None) -> None:
        """Returns nothing; maps the weights and KV cache back (``tags`` limits it to ``["weights"]`` or ``["kv_cache"]``)."""
        if self._asleep:
            self.llm.wake_up(tags=tags)
            if tags is None or "kv_cache" in tags:
                self._asleep = False

    def close(self) -> None:
        """Returns nothing; shuts the engine down and frees its GPU memory."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            engine = getattr(llm, "llm_engine", None)
            shutdown = getattr(getattr(engine, "engine_core", None), "shutdown", None)
            if callable(shutdown):
                shutdown()
            del llm

    # -- weights ---------------------------------------------------------------------------------

    def sync_weights(self, policy_model) -> int:
        """Returns the number of tensors copied from ``policy_model`` (a HF causal LM) into the engine.

        Call before each rollout or evaluation. Tensors go in chunks of about ``chunk_bytes``; the
        prefix cache is reset afterwards because cached KV blocks were computed with the old weights.
        """
        if self._asleep:
            self.llm.wake_up(tags=["weights"])  # weights must be mapped before they are written
        total = 0
        # A LoRA policy: base + B A under the base model's names; an FSDP2 policy: one gathered layer at a time.
        for chunk in policy_weight_batches(policy_model, self.chunk_bytes):
            results = self.llm.collective_rpc("reasontune_load_weights", args=(chunk,))
            total += results[0]
        self.llm.reset_prefix_cache()
        self._weights_valid = True
        return total

    # -- sampling --------------------------------------------------------------------------------

    def generate(self, prompts: Sequence[str], options: SamplingOptions) -> list[list[Completion]]:
        """Returns one list of ``options.n`` completions per prompt, in prompt order (entropies: None)."""
        from vllm import SamplingParams  # optional extra: only here, where vLLM is in use

        if self._asleep:
            if not self._weights_valid:
                raise RuntimeError("the engine slept at level 2 (weights dropped): call sync_weights first")
            self.wake()
        params = [
            SamplingParams(
                n=options.n, temperature=options.temperature, top_p=options.top_p, top_k=-1,
                max_tokens=options.max_new_tokens, min_tokens=options.min_new_tokens, stop=list(options.stop),
                include_stop_str_in_output=True, skip_special_tokens=True,
                # One seed per prompt, so that a prompt repeated in the batch still gets different samples.
                seed=None if options.seed is None else options.seed + options.first_prompt_index + index,
                logprobs=0 if options.return_logprobs else None,
            )
            for index in range(len(prompts))
        ]
        # vLLM's own bar (prompts/s, ETA) on a terminal; not in a batch job's log
        outputs = self.llm.generate(list(prompts), params, use_tqdm=sys.stderr.isatty())
        return [[self._completion(sample, len(output.prompt_token_ids or [])) for sample in output.outputs]
                for output in outputs]

    @staticmethod
    def _completion(sample, prompt_token_count: int) -> Completion:
        token_ids = list(sample.token_ids)
        if sample.finish_reason == "length":
            finish, stop_string = "length", None
        elif isinstance(sample.stop_reason, str):
            finish, stop_string = "stop", sample.stop_reason
        else:
            finish, stop_string = "eos", None
        logprobs = None
        if sample.logprobs is not None:
            logprobs = [float(position[token].logprob) for position, token in zip(sample.logprobs, token_ids)]
        return Completion(text=sample.text, token_ids=token_ids, finish_reason=finish, logprobs=logprobs,
                          entropies=None, stop_string=stop_string, prompt_token_count=prompt_token_count)
