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

Log-probs: the engine is built with ``logprobs_mode="processed_logprobs"`` (vLLM 0.10.2+),
so a completion's log-probs are those of the distribution actually sampled from
(temperature and top-p applied), as the generator contract requires.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Iterable, Sequence

from reasontune.generation import Completion, Generator, SamplingOptions

_NAME_PREFIXES_TO_DROP = ("_orig_mod.", "module.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")


class WeightSyncExtension:
    """Mixed into vLLM's GPU worker (``worker_extension_cls``); runs inside the engine's worker."""

    def reasontune_load_weights(self, named_tensors: list) -> int:
        """Returns the number of tensors given to the model's ``load_weights`` (HF checkpoint names)."""
        runner = self.model_runner  # type: ignore[attr-defined]  (set by vLLM's Worker)
        model = runner.get_model() if hasattr(runner, "get_model") else runner.model
        model.load_weights(weights=iter(named_tensors))
        return len(named_tensors)


def _checkpoint_name(name: str) -> str:
    """Returns a parameter name as it appears in a Hugging Face checkpoint (wrapper prefixes removed)."""
    for prefix in _NAME_PREFIXES_TO_DROP:
        name = name.replace(prefix, "")
    return name


class VLLMGenerator(Generator):
    """Samples with a vLLM ``LLM`` built from a model directory or hub name (one GPU, tensor parallel 1).

    ``device``: None for the current GPU (shared with the policy), or e.g. ``"cuda:1"`` for a
    second GPU; that starts the engine in its own process with only that GPU visible.
    ``llm_kwargs`` go to ``vllm.LLM`` unchanged (``max_num_seqs``, ``enforce_eager`` …).
    """

    def __init__(self, model: str, *, tokenizer: str | None = None, dtype: str = "bfloat16",
                 gpu_memory_utilization: float = 0.85, max_model_len: int | None = None,
                 enable_sleep_mode: bool = False, enable_prefix_caching: bool = True, seed: int = 0,
                 device: str | None = None, in_process: bool | None = None, chunk_bytes: int = 1 << 30,
                 **llm_kwargs: Any):
        try:
            from vllm import LLM
        except ImportError as error:
            raise ImportError("the vLLM backend needs vllm: pip install 'reasontune[vllm]' (a CUDA GPU is required)"
                              ) from error
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
        from reasontune.lora import merged_weights  # a LoRA policy: base + B A under the base model's names

        for chunk in self._chunks(merged_weights(policy_model)):
            results = self.llm.collective_rpc("reasontune_load_weights", args=(chunk,))
            total += results[0]
        self.llm.reset_prefix_cache()
        self._weights_valid = True
        return total

    def _chunks(self, items: Iterable[tuple[str, Any]]):
        chunk, size = [], 0
        for name, tensor in items:
            chunk.append((_checkpoint_name(name), tensor.detach()))
            size += tensor.numel() * tensor.element_size()
            if size >= self.chunk_bytes:
                yield chunk
                chunk, size = [], 0
        if chunk:
            yield chunk

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
                seed=None if options.seed is None else options.seed + index,
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
