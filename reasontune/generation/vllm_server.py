"""Sampling from a running ``vllm serve`` (disaggregated mode): OpenAI-compatible completions over HTTP, weights over NCCL.

The server runs on other GPUs (or another node) and is started by the user (docs/scaling.md
gives the command line). This side speaks two of its protocols:

- **Sampling**: ``POST /v1/completions``, one request per prompt (so that each prompt has its
  own ``seed``, and a prompt repeated in a batch still gets different samples), sent
  concurrently; vLLM's extra request fields ask for what the generator contract needs:
  ``return_token_ids`` (the sampled token ids, vLLM 0.10.2+), ``min_tokens``,
  ``include_stop_str_in_output``, and ``logprobs: 0`` for the sampled tokens' log-probs, which
  are those of the distribution actually sampled from when the server was started with
  ``--logprobs-mode processed_logprobs``. ``stop_reason`` tells a stop string from EOS.
- **Weights** (``weight_sync="nccl"``): vLLM's weight-transfer HTTP routes (the server started
  with ``--weight-transfer-config '{"backend": "nccl"}'`` and ``VLLM_SERVER_DEV_MODE=1``).
  Once: ``GET /get_world_size`` (the server's workers, all data-parallel replicas), then ``POST
  /init_weight_transfer_engine`` while this process (rank 0 of a new NCCL group, the server's
  workers being ranks 1…) opens the group with vLLM's ``StatelessProcessGroup`` and
  ``PyNcclCommunicator``. Each sync: ``/pause?mode=wait`` (requests in flight finish first),
  ``/start_weight_update`` (servers before the four-phase protocol answer 404: skipped), then
  per batch of about ``chunk_bytes`` one ``/update_weights`` naming the tensors (names, dtypes,
  shapes) while they are broadcast one by one in that order, then ``/finish_weight_update``
  and ``/resume``.

Under torchrun every rank sends its own prompts to the server; on ``sync_weights`` every rank
walks the FSDP2 policy one gathered layer at a time (collectives) and rank 0 alone pushes them;
all ranks then wait for each other, so that no rank samples before the new weights are in.
"""

from __future__ import annotations

import json
import math
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol
from urllib.parse import urlsplit

from reasontune.generation.base import Completion, Generator, SamplingOptions, cut_at_stop
from reasontune.generation.vllm import policy_weight_batches

TOKEN_ID_PREFIX = "token_id:"  # vLLM's return_tokens_as_token_ids spelling of a token in logprobs.tokens
DEFAULT_TIMEOUT_S = 600.0
# Replies are read up to a bound, never whole whatever their size: 1 MiB for the small routes (models, worker
# count, acknowledgements); a completions reply also gets REPLY_BYTES_PER_TOKEN for each token it may hold (a
# sampled token costs about 100 bytes there: its id, its text, its log-prob and its "token_id:N").
MAX_REPLY_BYTES = 1 << 20
REPLY_BYTES_PER_TOKEN = 512
MAX_ERROR_BYTES = 1 << 16
MAX_SERVER_WORKERS = 1 << 16
# A sampled token's log-prob is <= 0; a reply may round the certain token's 0 up by a float's last digits.
LOGPROB_SLACK = 1e-4


class VLLMServerError(RuntimeError):
    """The vLLM server could not be reached, refused a request, or answered something unreadable."""


class WeightSender(Protocol):
    """Sends tensors to the server's workers, in order (rank 0 of the NCCL weight group)."""

    def send(self, tensor: Any) -> None:
        """Returns nothing; queues ``tensor`` (on this rank's GPU) for the server's workers."""

    def wait(self) -> None:
        """Returns once every queued tensor has been sent."""


class ServerClient:
    """JSON over HTTP to one server: ``get``/``post`` return the decoded reply or raise ``VLLMServerError`` naming the URL.

    Every request is bounded: ``timeout_s`` for the whole exchange (connecting, waiting and
    reading: a server that answers one byte at a time is cut off too), and ``max_bytes`` for the
    body, checked before it is decoded.
    """

    def __init__(self, url: str, timeout_s: float = DEFAULT_TIMEOUT_S):
        if not (isinstance(timeout_s, (int, float)) and math.isfinite(timeout_s) and timeout_s > 0):
            raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
        parts = urlsplit(url)
        self.base = f"{parts.scheme}://{parts.netloc}"  # a trailing / or /v1 given by the user is dropped
        self.host, self.port = parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
        self.timeout_s = float(timeout_s)

    def get(self, path: str) -> Any:
        """Returns the decoded JSON of ``GET path``."""
        return self._request(urllib.request.Request(self.base + path, method="GET"))

    def post(self, path: str, payload: dict | None = None, missing_ok: bool = False,
             max_bytes: int = MAX_REPLY_BYTES) -> Any:
        """Returns the decoded JSON of ``POST path`` (None for an empty body, or a 404 when ``missing_ok``); a body over ``max_bytes`` is an error."""
        request = urllib.request.Request(self.base + path, data=json.dumps(payload or {}).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
        return self._request(request, missing_ok=missing_ok, max_bytes=max_bytes)

    def _request(self, request: urllib.request.Request, missing_ok: bool = False,
                 max_bytes: int = MAX_REPLY_BYTES) -> Any:
        url = request.full_url
        deadline = time.monotonic() + self.timeout_s
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                body = _read_bounded(response, max_bytes, deadline, url, self.timeout_s)
        except urllib.error.HTTPError as error:
            if missing_ok and error.code == 404:
                return None
            raise VLLMServerError(f"vLLM server {url}: HTTP {error.code}: {_error_message(error)}") from None
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            if isinstance(error, TimeoutError) or isinstance(reason, TimeoutError):
                raise VLLMServerError(f"vLLM server {url}: no reply within {self.timeout_s:g} s (--vllm-timeout); "
                                      "is the server overloaded, or the request too large?") from None
            raise VLLMServerError(f"vLLM server {url}: cannot connect ({reason}); is `vllm serve` "
                                  "running there (docs/scaling.md)?") from None
        if not body.strip():
            return None
        try:
            return json.loads(body)
        except (ValueError, RecursionError):  # not JSON, not UTF-8, or nested beyond the parser's depth
            raise VLLMServerError(f"vLLM server {url}: answered something that is not JSON: "
                                  f"{body[:200]!r}") from None


def _read_bounded(response: Any, max_bytes: int, deadline: float, url: str, timeout_s: float) -> bytes:
    """Returns the body of ``response``, read in chunks until ``deadline``; more than ``max_bytes`` is a ``VLLMServerError``."""
    declared = response.headers.get("Content-Length")
    if declared is not None and declared.strip().isdigit() and int(declared) > max_bytes:
        raise VLLMServerError(f"vLLM server {url}: the reply body is {int(declared)} bytes, more than the "
                              f"{max_bytes} this request can need; not read")
    chunks, size = [], 0
    while True:
        if time.monotonic() > deadline:
            raise VLLMServerError(f"vLLM server {url}: the reply took longer than {timeout_s:g} s to arrive "
                                  "(--vllm-timeout)")
        chunk = response.read1(1 << 16) if hasattr(response, "read1") else response.read(1 << 16)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > max_bytes:
            raise VLLMServerError(f"vLLM server {url}: the reply body is more than the {max_bytes} bytes this "
                                  "request can need; stopped reading")
        chunks.append(chunk)


def _error_message(error: urllib.error.HTTPError) -> str:
    """Returns the message of an error reply (vLLM's {"error": {"message"}} or {"message"}, else its text), read up to a bound."""
    try:
        text = error.read(MAX_ERROR_BYTES).decode("utf-8", errors="replace")
    except OSError:
        text = ""
    try:
        payload = json.loads(text)
    except (ValueError, RecursionError):
        return text[:500] or str(error.reason)
    inner = payload.get("error", payload) if isinstance(payload, dict) else payload
    if isinstance(inner, dict):
        return str(inner.get("message") or inner.get("detail") or inner)[:500]
    return str(inner)[:500]


def completion_reply_bytes(options: SamplingOptions) -> int:
    """Returns the largest completions reply body accepted for ``options``: ``MAX_REPLY_BYTES`` plus room for every token asked for."""
    return MAX_REPLY_BYTES + REPLY_BYTES_PER_TOKEN * options.n * options.max_new_tokens


def completion_request(model: str, prompt: str, options: SamplingOptions, seed: int | None) -> dict[str, Any]:
    """Returns the JSON body of one ``/v1/completions`` request sampling ``options.n`` completions of ``prompt``."""
    body: dict[str, Any] = {
        "model": model, "prompt": prompt, "n": options.n, "temperature": options.temperature,
        "top_p": options.top_p, "max_tokens": options.max_new_tokens, "stop": list(options.stop),
        # vLLM's extra sampling fields (SamplingParams names; top-k stays off, its default)
        "min_tokens": options.min_new_tokens, "include_stop_str_in_output": True,
        "skip_special_tokens": True, "return_token_ids": True,
    }
    if seed is not None:
        body["seed"] = seed
    if options.return_logprobs:
        body["logprobs"] = 0  # the sampled token's own log-prob, no alternatives
        body["return_tokens_as_token_ids"] = True  # logprobs.tokens as "token_id:N": ids even without token_ids
    return body


def parse_completion_choice(choice: dict[str, Any], options: SamplingOptions, prompt_token_count: int,
                            where: str, vocab_size: int | None = None) -> Completion:
    """Returns the ``Completion`` of one ``choices[i]`` of a vLLM completions reply (``where`` names it in errors).

    The reply is checked, not believed: token ids are integers in ``[0, vocab_size)`` (``>= 0``
    when the vocabulary is unknown), at most ``options.max_new_tokens`` of them; log-probs, when
    asked for, are finite numbers <= 0, one per token; ``text`` is a string; ``finish_reason``
    is ``stop`` or ``length``, and a ``stop_reason`` string is one of ``options.stop``. Each
    violation is a ``VLLMServerError`` naming ``where`` and the field.
    """
    if not isinstance(choice, dict):
        raise VLLMServerError(f"{where}: is {type(choice).__name__}, not a JSON object")
    logprob_block = choice.get("logprobs") or {}
    if not isinstance(logprob_block, dict):
        raise VLLMServerError(f"{where}: field logprobs is {type(logprob_block).__name__}, not an object")
    token_ids = choice.get("token_ids")
    if token_ids is None and logprob_block.get("tokens") is not None:
        tokens = logprob_block["tokens"]
        if not isinstance(tokens, list):
            raise VLLMServerError(f"{where}: field logprobs.tokens is {type(tokens).__name__}, not a list")
        token_ids = [_token_id(token, where) for token in tokens]
    if token_ids is None:
        raise VLLMServerError(f"{where}: the reply carries no token ids; the server must be vLLM 0.10.2 or later "
                              "(return_token_ids)")
    token_ids = _checked_token_ids(token_ids, options.max_new_tokens, vocab_size, where)
    logprobs = None
    if options.return_logprobs:
        values = logprob_block.get("token_logprobs")
        if not isinstance(values, list) or len(values) != len(token_ids) or any(value is None for value in values):
            count = "none" if values is None else len(values) if isinstance(values, list) else type(values).__name__
            raise VLLMServerError(f"{where}: field logprobs.token_logprobs: asked for the sampled tokens' log-probs, "
                                  f"got {count} for {len(token_ids)} tokens")
        for position, value in enumerate(values):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value > LOGPROB_SLACK:
                raise VLLMServerError(f"{where}: field logprobs.token_logprobs[{position}] is {value!r}, not a "
                                      "finite log-probability (<= 0)")
        logprobs = [min(float(value), 0.0) for value in values]
    text, stop_reason, finish_reason = choice.get("text", ""), choice.get("stop_reason"), choice.get("finish_reason")
    if not isinstance(text, str):
        raise VLLMServerError(f"{where}: field text is {type(text).__name__}, not a string")
    if finish_reason not in ("stop", "length"):
        raise VLLMServerError(f"{where}: field finish_reason is {finish_reason!r}; expected stop or length "
                              "(a request the server aborted has no usable sample)")
    if isinstance(stop_reason, str) and stop_reason not in options.stop:
        raise VLLMServerError(f"{where}: field stop_reason is {stop_reason[:100]!r}, not one of the stop strings "
                              f"asked for {list(options.stop)}")
    if finish_reason == "length":
        finish, stop_string = "length", None
    elif isinstance(stop_reason, str):
        finish = "stop"
        text, stop_string = cut_at_stop(text, [stop_reason])
    else:  # finish_reason "stop" without a stop string: EOS (or a stop token id, which ends like EOS)
        finish, stop_string = "eos", None
    return Completion(text=text, token_ids=token_ids, finish_reason=finish, logprobs=logprobs, entropies=None,
                      stop_string=stop_string, prompt_token_count=prompt_token_count)


def _checked_token_ids(token_ids: Any, max_tokens: int, vocab_size: int | None, where: str) -> list[int]:
    """Returns ``token_ids`` as ints after checking it is a list of at most ``max_tokens`` ids in ``[0, vocab_size)``."""
    if not isinstance(token_ids, list):
        raise VLLMServerError(f"{where}: field token_ids is {type(token_ids).__name__}, not a list")
    if len(token_ids) > max_tokens:
        raise VLLMServerError(f"{where}: field token_ids holds {len(token_ids)} tokens; at most {max_tokens} were "
                              "asked for (max_tokens)")
    for position, token in enumerate(token_ids):
        if isinstance(token, bool) or not isinstance(token, int) or token < 0 or (
                vocab_size is not None and token >= vocab_size):
            bound = f"[0, {vocab_size})" if vocab_size is not None else "[0, vocabulary size)"
            raise VLLMServerError(f"{where}: field token_ids[{position}] is {token!r}, not a token id in {bound}")
    return list(token_ids)


def _token_id(token: str, where: str) -> int:
    if isinstance(token, str) and token.startswith(TOKEN_ID_PREFIX) and token[len(TOKEN_ID_PREFIX):].isdigit() \
            and len(token) <= len(TOKEN_ID_PREFIX) + 12:
        return int(token[len(TOKEN_ID_PREFIX):])
    raise VLLMServerError(f"{where}: field logprobs.tokens holds {str(token)[:100]!r}, not {TOKEN_ID_PREFIX}N")


def route_address(host: str, port: int) -> str:
    """Returns this machine's IP address on the route to ``host`` (what the server's workers can connect back to)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((socket.gethostbyname(host), port))  # UDP: no packet is sent
            return probe.getsockname()[0]
        except OSError:
            return socket.gethostbyname(socket.gethostname())


def free_port() -> int:
    """Returns a TCP port that is free on this machine right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("", 0))
        return probe.getsockname()[1]


class NcclWeightSender:
    """Rank 0 of a new NCCL group with the server's workers (vLLM's ``StatelessProcessGroup`` + ``PyNcclCommunicator``)."""

    def __init__(self, address: str, port: int, world_size: int):
        import torch
        from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
        from vllm.distributed.utils import StatelessProcessGroup

        group = StatelessProcessGroup.create(host=address, port=port, rank=0, world_size=world_size)
        self.communicator = PyNcclCommunicator(group, device=torch.cuda.current_device())
        self._torch = torch

    def send(self, tensor: Any) -> None:
        """Returns nothing; broadcasts ``tensor`` (moved to this rank's GPU, contiguous) from rank 0 on the current stream."""
        tensor = tensor.to(self._torch.cuda.current_device(), non_blocking=True).contiguous()
        self.communicator.broadcast(tensor, src=0, stream=self._torch.cuda.current_stream())

    def wait(self) -> None:
        """Returns once the queued broadcasts have run."""
        self._torch.cuda.current_stream().synchronize()


class VLLMServerGenerator(Generator):
    """Samples from a running ``vllm serve`` at ``url``; pushes the policy's weights to it over NCCL (see the module docstring).

    Args:
        url: the server's base URL, http://HOST:PORT.
        weight_sync: "nccl" (``sync_weights`` pushes the weights) or "none" (the server keeps
            its own: evaluation of the model it loaded).
        sync_address / sync_port: where the server's workers reach this process for the NCCL
            group (default: this machine's address on the route to the server; a free port).
        dtype: a torch dtype the weights are cast to before they are sent (None: as they are).
        chunk_bytes: about how many bytes one ``/update_weights`` batch holds.
        max_concurrent_requests: completions requests in flight at once.
        timeout_s: how long one HTTP request may take, reply included (``--vllm-timeout``).
        vocab_size: the policy's vocabulary size; a reply's token ids must lie in ``[0, vocab_size)``
            (None: only ``>= 0`` is checked).
        sender_factory: builds the ``WeightSender`` from (address, port, NCCL world size);
            default ``NcclWeightSender``.
    """

    def __init__(self, url: str, *, weight_sync: str = "nccl", sync_address: str | None = None, sync_port: int = 0,
                 dtype: Any = None, chunk_bytes: int = 1 << 30, max_concurrent_requests: int = 64,
                 timeout_s: float = DEFAULT_TIMEOUT_S, vocab_size: int | None = None,
                 sender_factory: Callable[[str, int, int], WeightSender] | None = None):
        if weight_sync not in ("nccl", "none"):
            raise ValueError(f"weight_sync must be nccl or none, got {weight_sync!r}")
        if max_concurrent_requests < 1 or chunk_bytes < 1:
            raise ValueError("max_concurrent_requests and chunk_bytes must be >= 1")
        if vocab_size is not None and vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
        self.client = ServerClient(url, timeout_s=timeout_s)
        self.vocab_size = vocab_size
        self.weight_sync, self.sync_address, self.sync_port = weight_sync, sync_address, sync_port
        self.dtype, self.chunk_bytes, self.max_concurrent_requests = dtype, chunk_bytes, max_concurrent_requests
        self.sender_factory = sender_factory or NcclWeightSender
        self._sender: WeightSender | None = None
        self._background = ThreadPoolExecutor(max_workers=1)  # the HTTP call that stays open during a transfer
        models = self.client.get("/v1/models") or {}
        entries = models.get("data", []) if isinstance(models, dict) else None
        if not isinstance(entries, list):
            raise VLLMServerError(f"vLLM server {self.client.base}/v1/models: field data is not a list of models")
        served = [entry.get("id") for entry in entries if isinstance(entry, dict) and isinstance(entry.get("id"), str)]
        if not served:
            raise VLLMServerError(f"vLLM server {self.client.base}/v1/models: field data lists no model id")
        self.model = served[0]

    # -- sampling --------------------------------------------------------------------------------

    def generate(self, prompts: Sequence[str], options: SamplingOptions) -> list[list[Completion]]:
        """Returns one list of ``options.n`` completions per prompt, in prompt order (entropies: None)."""
        if not prompts:
            return []

        def sample(index: int) -> list[Completion]:
            # One seed per prompt, so that a prompt repeated in the batch still gets different samples.
            seed = None if options.seed is None else options.seed + options.first_prompt_index + index
            reply = self.client.post("/v1/completions", completion_request(self.model, prompts[index], options, seed),
                                     max_bytes=completion_reply_bytes(options))
            return self._completions(reply, options, f"vLLM server {self.client.base}/v1/completions (prompt {index})",
                                     self.vocab_size)

        with ThreadPoolExecutor(max_workers=min(self.max_concurrent_requests, len(prompts))) as pool:
            return list(pool.map(sample, range(len(prompts))))

    @staticmethod
    def _completions(reply: Any, options: SamplingOptions, where: str, vocab_size: int | None = None) -> list[Completion]:
        choices = reply.get("choices") if isinstance(reply, dict) else None
        if not isinstance(choices, list) or len(choices) != options.n:
            raise VLLMServerError(f"{where}: field choices: expected {options.n} choices, got "
                                  f"{len(choices) if isinstance(choices, list) else 'none'}")
        if not all(isinstance(choice, dict) for choice in choices):
            raise VLLMServerError(f"{where}: field choices holds something that is not a JSON object")
        indices = [choice.get("index", position) for position, choice in enumerate(choices)]
        if sorted(index for index in indices if isinstance(index, int) and not isinstance(index, bool)) != list(
                range(options.n)):
            raise VLLMServerError(f"{where}: field choices[].index is {indices[:10]}, not each of 0..{options.n - 1} "
                                  "once")
        prompt_ids = reply.get("prompt_token_ids")
        if prompt_ids is None:  # older servers put them on each choice, or only count them
            prompt_ids = choices[0].get("prompt_token_ids")
        if prompt_ids is not None:
            if not isinstance(prompt_ids, list):
                raise VLLMServerError(f"{where}: field prompt_token_ids is {type(prompt_ids).__name__}, not a list")
            prompt_count = len(prompt_ids)
        else:
            usage = reply.get("usage") or {}
            prompt_count = usage.get("prompt_tokens", 0) if isinstance(usage, dict) else None
            if isinstance(prompt_count, bool) or not isinstance(prompt_count, int) or prompt_count < 0:
                raise VLLMServerError(f"{where}: field usage.prompt_tokens is {prompt_count!r}, not a token count")
        ordered = [choice for _, choice in sorted(zip(indices, choices), key=lambda pair: pair[0])]
        return [parse_completion_choice(choice, options, prompt_count, f"{where} choice {i}", vocab_size)
                for i, choice in enumerate(ordered)]

    # -- weights ---------------------------------------------------------------------------------

    def sync_weights(self, model) -> int:
        """Returns the number of tensors pushed to the server (0 on ranks other than 0, which only join the gathers).

        Every rank of a torchrun job must call it (an FSDP2 policy's layers are gathered with
        collectives); generation is paused on the server for the push and resumed after it.
        """
        if self.weight_sync != "nccl":
            raise RuntimeError("this generator was built with weight_sync='none': the server keeps its own weights")
        from reasontune import distributed  # torch: only where weights move

        rank = _rank()
        batches = policy_weight_batches(model, self.chunk_bytes, dtype=self.dtype)
        if rank != 0:
            for _ in batches:  # join rank 0's layer gathers
                pass
            distributed.barrier()
            return 0
        sender = self._connect()
        total = 0
        self.client.post("/pause?mode=wait")  # requests in flight finish on the old weights, none is aborted
        try:
            self.client.post("/start_weight_update", {"is_checkpoint_format": True}, missing_ok=True)
            for batch in batches:
                total += self._push(sender, batch)
            self.client.post("/finish_weight_update", {}, missing_ok=True)
        finally:
            self.client.post("/resume")
        distributed.barrier()
        return total

    def _connect(self) -> WeightSender:
        """Returns the weight sender, opening the NCCL group with the server's workers on first use."""
        if self._sender is not None:
            return self._sender
        reply = self.client.get("/get_world_size") or {}
        workers = reply.get("world_size") if isinstance(reply, dict) else None
        if isinstance(workers, bool) or not isinstance(workers, int) or not 1 <= workers <= MAX_SERVER_WORKERS:
            raise VLLMServerError(f"vLLM server {self.client.base}/get_world_size: no worker count in the reply; "
                                  "start it with VLLM_SERVER_DEV_MODE=1 and --weight-transfer-config "
                                  "'{\"backend\": \"nccl\"}' (docs/scaling.md)")
        address = self.sync_address or route_address(self.client.host, self.client.port)
        port = self.sync_port or free_port()
        init_info = {"master_address": address, "master_port": port, "rank_offset": 1, "world_size": workers + 1}
        # The server's workers join the group while this call is open, and this side joins it meanwhile.
        reply = self._background.submit(self.client.post, "/init_weight_transfer_engine", {"init_info": init_info})
        self._sender = self.sender_factory(address, port, workers + 1)
        reply.result()
        return self._sender

    def _push(self, sender: WeightSender, batch: list[tuple[str, Any]]) -> int:
        """Returns len(batch) after announcing ``batch`` with ``/update_weights`` and sending its tensors in that order."""
        update_info = {"names": [name for name, _ in batch],
                       "dtype_names": [str(tensor.dtype).removeprefix("torch.") for _, tensor in batch],
                       "shapes": [list(tensor.shape) for _, tensor in batch], "packed": False}
        reply = self._background.submit(self.client.post, "/update_weights", {"update_info": update_info})
        for _, tensor in batch:
            sender.send(tensor)  # queued on the GPU stream: returns before the server has received it
        reply.result()  # the server answers once it has received and loaded the batch (or raises its error)
        sender.wait()
        return len(batch)

    # -- the server's memory is its own ------------------------------------------------------------

    def sleep(self) -> None:
        """Returns nothing (the server's GPUs are not the trainer's)."""

    def wake(self) -> None:
        """Returns nothing (see ``sleep``)."""

    def close(self) -> None:
        """Returns nothing; drops the weight group (the server keeps running)."""
        self._sender = None
        self._background.shutdown(wait=False)


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
