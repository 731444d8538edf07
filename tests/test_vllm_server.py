"""The vLLM server backend (disaggregated mode) on CPU: its HTTP requests, reply parsing, errors, and the weight-push protocol.

vLLM itself cannot run here. These tests start a real local HTTP server that answers the
routes of ``vllm serve`` in vLLM's documented reply format: completions are sampled by the HF
generator on a real (tiny) model, so the client must carry every token id, log-prob, stop
string and finish reason through the wire unchanged; the weight routes record what they are
told, and the NCCL broadcast is replaced by a sender that records the tensors in order (also
from an FSDP2 policy under torchrun, 2 ranks on gloo). The real server and NCCL are exercised
by the ``gpu`` test (skipped without vLLM and 2 GPUs).
"""

from __future__ import annotations

import importlib.util
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from test_generation import CHAIN_TEXT, bigram_model, one_thread  # noqa: F401  (autouse: one torch thread)

from reasontune.generation import Completion, SamplingOptions, VLLMServerOptions, build_generator
from reasontune.generation.hf import HFGenerator
from reasontune.generation.vllm import policy_weight_batches
from reasontune.generation.vllm_server import (
    VLLMServerError,
    VLLMServerGenerator,
    completion_request,
    free_port,
    parse_completion_choice,
)
from reasontune.modeling import QWEN2_5_VOCAB_SIZE, build_model_from_config, tiny_qwen2_config

SERVED = "served/tiny"


class JsonServer:
    """A real HTTP server on 127.0.0.1: ``routes[(method, path)](body) -> (status, reply)``; every request is recorded."""

    def __init__(self, routes):
        self.routes, self.calls = routes, []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                self._answer("GET")

            def do_POST(self):
                self._answer("POST")

            def _answer(self, method):
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                owner.calls.append((method, self.path, body))
                route = owner.routes.get((method, self.path))
                status, reply = route(body) if route else (404, {"detail": "Not Found"})
                data = json.dumps(reply).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def paths(self):
        return [path for _, path, _ in self.calls]

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def models_route(_):
    return 200, {"object": "list", "data": [{"id": SERVED, "object": "model"}]}


def vllm_choice(index: int, completion: Completion, with_logprobs: bool) -> dict:
    """Returns a completions choice in vLLM's format (finish_reason length|stop; stop_reason: the stop string, None for EOS)."""
    choice = {"index": index, "text": completion.text, "token_ids": completion.token_ids,
              "finish_reason": "length" if completion.finish_reason == "length" else "stop",
              "stop_reason": completion.stop_string, "logprobs": None}
    if with_logprobs:
        choice["logprobs"] = {"token_logprobs": completion.logprobs,
                              "tokens": [f"token_id:{token}" for token in completion.token_ids]}
    return choice


@pytest.fixture
def completions_server(qwen_tokenizer):
    """A /v1/completions server whose samples come from the HF generator on a tiny real model (one request at a time)."""
    # "Answer:…" prompts: a model that follows a fixed chain into </answer>; others: a random model (broad samples).
    chain = HFGenerator(bigram_model(qwen_tokenizer, ["Answer:" + CHAIN_TEXT]), qwen_tokenizer, batch_size=4)
    broad = HFGenerator(build_model_from_config(tiny_qwen2_config(vocab_size=QWEN2_5_VOCAB_SIZE, hidden_size=16,
                                                                  num_layers=2, num_heads=2, num_kv_heads=1), seed=3),
                        qwen_tokenizer, batch_size=4)
    lock = threading.Lock()

    def hf_for(prompt):
        return chain if prompt.startswith("Answer:") else broad

    def complete(body):
        if body["max_tokens"] > 64:
            return 400, {"error": {"message": f"max_tokens {body['max_tokens']} is too large", "type": "BadRequest"}}
        options = SamplingOptions(temperature=body["temperature"], top_p=body["top_p"], max_new_tokens=body["max_tokens"],
                                  min_new_tokens=body["min_tokens"], stop=tuple(body["stop"]), n=body["n"],
                                  seed=body.get("seed"), return_logprobs="logprobs" in body)
        with lock:
            [completions] = hf_for(body["prompt"]).generate([body["prompt"]], options)
        time.sleep(0.05 if (body.get("seed") or 0) % 2 == 0 else 0.0)  # replies come back out of order
        choices = [vllm_choice(i, c, "logprobs" in body) for i, c in enumerate(completions)]
        return 200, {"object": "text_completion", "model": SERVED, "choices": choices[::-1],  # any order of index
                     "usage": {"prompt_tokens": completions[0].prompt_token_count}}

    server = JsonServer({("GET", "/v1/models"): models_route, ("POST", "/v1/completions"): complete})
    yield server, hf_for
    server.close()


def test_generate_carries_the_samples_of_the_server_unchanged_in_prompt_order(completions_server):
    server, hf_for = completions_server
    generator = build_generator("vllm", vllm_server=VLLMServerOptions(server.url + "/v1/", weight_sync="none"))
    assert isinstance(generator, VLLMServerGenerator) and generator.model == SERVED
    prompts = ["Answer:", "Hello", "Answer:", "Hello", "Answer:"]
    options = SamplingOptions(temperature=0.8, top_p=0.95, max_new_tokens=12, min_new_tokens=2, n=2, seed=11,
                              return_logprobs=True)
    got = generator.generate(prompts, options)

    # The same samples drawn in this process, one prompt at a time with the per-prompt seed the client must send.
    expected = [hf_for(prompt).generate([prompt], options.replace(seed=11 + i))[0] for i, prompt in enumerate(prompts)]
    assert [[c.token_ids for c in group] for group in got] == [[c.token_ids for c in group] for group in expected]
    for group, reference in zip(got, expected):
        for completion, wanted in zip(group, reference):
            assert (completion.text, completion.finish_reason, completion.stop_string, completion.prompt_token_count) == (
                wanted.text, wanted.finish_reason, wanted.stop_string, wanted.prompt_token_count)
            assert completion.logprobs == wanted.logprobs  # floats survive JSON exactly
            assert completion.entropies is None
    # "Answer:" follows the chain into its stop string; "Hello" samples until the budget, differently per seed.
    assert got[0][0].finish_reason == "stop" and got[0][0].text.endswith("</answer>")
    assert got[1][0].token_ids != got[3][0].token_ids != got[3][1].token_ids
    [[short]] = generator.generate(["Answer:"], SamplingOptions(temperature=0.0, max_new_tokens=3))
    assert short.finish_reason == "length" and short.token_ids == got[0][0].token_ids[:3]

    requests = sorted((body for method, path, body in server.calls if path == "/v1/completions" and "seed" in body),
                      key=lambda body: body["seed"])
    assert [body["seed"] for body in requests][:5] == [11, 12, 13, 14, 15]
    assert [body["prompt"] for body in requests][:5] == prompts
    first = requests[0]
    assert first["model"] == SERVED and first["n"] == 2 and first["logprobs"] == 0
    assert first["return_token_ids"] is True and first["include_stop_str_in_output"] is True
    assert first["min_tokens"] == 2 and first["stop"] == ["</answer>"] and first["max_tokens"] == 12


def test_a_refused_request_and_an_unreachable_server_are_errors_naming_the_url(completions_server):
    server, _ = completions_server
    generator = VLLMServerGenerator(server.url, weight_sync="none")
    with pytest.raises(VLLMServerError, match=r"/v1/completions: HTTP 400: max_tokens 100 is too large"):
        generator.generate(["Hello"], SamplingOptions(max_new_tokens=100))
    with pytest.raises(RuntimeError, match="weight_sync='none'"):
        generator.sync_weights(torch.nn.Linear(1, 1))
    port = free_port()
    with pytest.raises(VLLMServerError, match=rf"127.0.0.1:{port}/v1/models: cannot connect"):
        VLLMServerGenerator(f"http://127.0.0.1:{port}", weight_sync="none", timeout_s=5)


def test_reply_parsing_finish_reasons_token_id_fallback_and_bad_replies():
    options = SamplingOptions(return_logprobs=True, stop=("</answer>",))
    # A stop string: the text is cut right after it (vLLM may detokenise a little past it).
    stop = parse_completion_choice({"text": " 7 </answer> x", "token_ids": [1, 2], "finish_reason": "stop",
                                    "stop_reason": "</answer>", "logprobs": {"token_logprobs": [-0.5, -0.25]}},
                                   options, 4, "here")
    assert (stop.text, stop.finish_reason, stop.stop_string, stop.logprobs, stop.prompt_token_count) == (
        " 7 </answer>", "stop", "</answer>", [-0.5, -0.25], 4)
    # EOS (stop_reason None) and a stop token id (an int) both end like EOS; ids from "token_id:N" without token_ids.
    for stop_reason in (None, 151643):
        eos = parse_completion_choice({"text": "ab", "finish_reason": "stop", "stop_reason": stop_reason,
                                       "logprobs": {"tokens": ["token_id:5", "token_id:151643"],
                                                    "token_logprobs": [-1.0, -2.0]}}, options, 0, "here")
        assert (eos.token_ids, eos.finish_reason, eos.stop_string) == ([5, 151643], "eos", None)
    length = parse_completion_choice({"text": "abc", "token_ids": [7], "finish_reason": "length",
                                      "logprobs": {"token_logprobs": [-3.0]}}, options, 0, "here")
    assert length.finish_reason == "length"
    with pytest.raises(VLLMServerError, match="no token ids; the server must be vLLM 0.10.2"):
        parse_completion_choice({"text": "a", "finish_reason": "stop"}, SamplingOptions(), 0, "here")
    with pytest.raises(VLLMServerError, match="log-probs, got 1 for 2 tokens"):
        parse_completion_choice({"text": "a", "token_ids": [1, 2], "finish_reason": "stop",
                                 "logprobs": {"token_logprobs": [-1.0]}}, options, 0, "here")
    with pytest.raises(VLLMServerError, match="not token_id:N"):
        parse_completion_choice({"text": "a", "finish_reason": "stop", "logprobs": {"tokens": ["a"]}}, options, 0, "h")
    greedy = completion_request("m", "p", SamplingOptions(temperature=0.0, seed=None), seed=None)
    assert "seed" not in greedy and "logprobs" not in greedy and greedy["temperature"] == 0.0


class RecordingSender:
    """Stands in for NCCL rank 0: keeps a copy of each tensor in the order it was sent."""

    def __init__(self, address, port, world_size):
        self.address, self.port, self.world_size, self.sent, self.waits = address, port, world_size, [], 0

    def send(self, tensor):
        self.sent.append(tensor.detach().clone())

    def wait(self):
        self.waits += 1


def weight_server(four_phase: bool = True, fail_update: bool = False) -> JsonServer:
    ok = lambda _: (200, {})
    routes = {("GET", "/v1/models"): models_route, ("GET", "/get_world_size"): lambda _: (200, {"world_size": 2}),
              ("POST", "/init_weight_transfer_engine"): ok, ("POST", "/pause?mode=wait"): ok, ("POST", "/resume"): ok,
              ("POST", "/update_weights"): (lambda _: (500, {"message": "load_weights failed"})) if fail_update else ok}
    if four_phase:
        routes[("POST", "/start_weight_update")] = ok
        routes[("POST", "/finish_weight_update")] = ok
    return JsonServer(routes)


@pytest.mark.parametrize("four_phase", [True, False], ids=["start-update-finish", "update-only server"])
def test_weight_push_announces_each_batch_and_sends_its_tensors_in_that_order(tiny_qwen2, four_phase):
    server = weight_server(four_phase)
    senders = []

    def factory(address, port, world_size):
        senders.append(RecordingSender(address, port, world_size))
        return senders[-1]

    chunk_bytes = 6000
    generator = VLLMServerGenerator(server.url, sync_address="10.1.2.3", sync_port=29555, dtype=torch.bfloat16,
                                    chunk_bytes=chunk_bytes, sender_factory=factory)
    state = {name: tensor.clone() for name, tensor in tiny_qwen2.state_dict().items()}  # before training moves them
    assert generator.sync_weights(tiny_qwen2) == len(state)
    with torch.no_grad():
        tiny_qwen2.model.norm.weight.add_(1.0)  # training moved the weights
    generator.sync_weights(tiny_qwen2)
    server.close()

    assert len(senders) == 1  # the NCCL group is opened once
    sender = senders[0]
    assert (sender.address, sender.port, sender.world_size) == ("10.1.2.3", 29555, 3)  # trainer + 2 server workers
    [init] = [body for _, path, body in server.calls if path == "/init_weight_transfer_engine"]
    assert init == {"init_info": {"master_address": "10.1.2.3", "master_port": 29555, "rank_offset": 1,
                                  "world_size": 3}}
    paths = [p for p in server.paths() if p not in ("/v1/models", "/get_world_size", "/init_weight_transfer_engine")]
    one_sync = [p for p in paths[: len(paths) // 2]]
    assert one_sync[0] == "/pause?mode=wait" and one_sync[1] == "/start_weight_update" and one_sync[-1] == "/resume"
    assert one_sync[-2] == "/finish_weight_update" and set(one_sync[2:-2]) == {"/update_weights"}
    assert paths[len(paths) // 2:] == one_sync  # the second sync is the same conversation

    updates = [body["update_info"] for _, path, body in server.calls if path == "/update_weights"]
    first_sync = updates[: len(updates) // 2]
    names = [name for info in first_sync for name in info["names"]]
    assert names == list(state)  # every tensor once, in state-dict order, under checkpoint names
    sent = sender.sent[: len(names)]
    offset = 0
    for info in first_sync:
        assert not info["packed"]
        batch = sent[offset: offset + len(info["names"])]
        offset += len(batch)
        assert info["dtype_names"] == ["bfloat16"] * len(batch) == [str(t.dtype).removeprefix("torch.") for t in batch]
        assert info["shapes"] == [list(t.shape) for t in batch]
        sizes = [t.numel() * 2 for t in batch]
        # A batch closes as soon as it reaches chunk_bytes: without its last tensor it was still below.
        assert sum(sizes[:-1]) < chunk_bytes
        if info is not first_sync[-1]:
            assert sum(sizes) >= chunk_bytes
    assert len(first_sync) > 2
    for name, tensor in zip(names, sent):
        assert torch.equal(tensor, state[name].to(torch.bfloat16))
    second = dict(zip(names, sender.sent[len(names):]))
    assert torch.equal(second["model.norm.weight"], tiny_qwen2.model.norm.weight.to(torch.bfloat16))
    if not four_phase:
        assert "/start_weight_update" in server.paths() and "/finish_weight_update" in server.paths()  # tried: 404


def test_a_failed_weight_update_is_an_error_and_generation_is_resumed(tiny_qwen2):
    server = weight_server(fail_update=True)
    generator = VLLMServerGenerator(server.url, sync_address="127.0.0.1", sync_port=1,
                                    sender_factory=RecordingSender)
    with pytest.raises(VLLMServerError, match="/update_weights: HTTP 500: load_weights failed"):
        generator.sync_weights(tiny_qwen2)
    server.close()
    assert server.paths()[-1] == "/resume"


def test_weight_batches_cover_the_policy_once_with_wrapper_prefixes_removed(tiny_qwen2):
    compiled_names = {f"_orig_mod.{name}": tensor for name, tensor in tiny_qwen2.state_dict().items()}

    class Wrapped(torch.nn.Module):  # what torch.compile's wrapper does to state-dict names
        def state_dict(self):
            return compiled_names

        def parameters(self):
            return tiny_qwen2.parameters()

    batches = list(policy_weight_batches(Wrapped(), chunk_bytes=1))
    assert all(len(batch) == 1 for batch in batches)  # every tensor reaches 1 byte: one per batch
    assert [name for [(name, _)] in batches] == list(tiny_qwen2.state_dict())
    [whole] = list(policy_weight_batches(tiny_qwen2, chunk_bytes=1 << 40))
    assert all(tensor.dtype == torch.float32 for _, tensor in whole)  # no dtype: as they are
    with pytest.raises(ValueError, match="chunk_bytes must be >= 1"):
        next(policy_weight_batches(tiny_qwen2, chunk_bytes=0))


@pytest.mark.gpu
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm not installed")
def test_real_vllm_server_samples_and_takes_pushed_weights(tmp_path):
    """Starts `vllm serve` on a tiny saved model with NCCL weight transfer; pushes changed weights; greedy output follows them."""
    import os
    import subprocess
    import sys

    from conftest import build_tiny_model_dir

    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs: one for the server, one for this trainer")
    model_dir = build_tiny_model_dir(tmp_path / "model")
    port = free_port()
    env = dict(os.environ, VLLM_SERVER_DEV_MODE="1", CUDA_VISIBLE_DEVICES="1")
    server = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", str(model_dir),
                               "--port", str(port), "--enforce-eager", "--gpu-memory-utilization", "0.3",
                               "--logprobs-mode", "processed_logprobs",
                               "--weight-transfer-config", '{"backend": "nccl"}'], env=env)
    try:
        generator = None
        for _ in range(300):
            try:
                generator = VLLMServerGenerator(f"http://127.0.0.1:{port}", dtype=torch.bfloat16, timeout_s=60)
                break
            except VLLMServerError:
                time.sleep(1)
        assert generator is not None, "vllm serve did not come up in 300 s"
        from transformers import AutoModelForCausalLM

        torch.cuda.set_device(0)
        policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).cuda()
        greedy = SamplingOptions(temperature=0.0, max_new_tokens=8, stop=(), return_logprobs=True)
        before = generator.generate(["What is 12 + 30?"], greedy)[0][0]
        with torch.no_grad():  # untied LM head (tiny_qwen2_config): only tokens 5 and 6 get a non-zero logit
            policy.lm_head.weight.zero_()
            policy.lm_head.weight[5, 0], policy.lm_head.weight[6, 0] = 1.0, -1.0  # ±h0: one of them is the argmax
        generator.sync_weights(policy)
        after = generator.generate(["What is 12 + 30?"], greedy)[0][0]
        assert len(after.token_ids) == 8 and set(after.token_ids) <= {5, 6}, (before.token_ids, after.token_ids)
    finally:
        server.terminate()
        server.wait(timeout=60)


def test_an_fsdp2_policy_under_torchrun_is_pushed_by_rank_0_one_gathered_layer_at_a_time(tiny_qwen2, tmp_path):
    from safetensors.torch import load_file
    from test_distributed import SCRIPTS, launch

    server = weight_server()
    result = launch([str(SCRIPTS / "server_push.py"), server.url, str(tmp_path)], world_size=2, timeout=240)
    server.close()
    assert result.returncode == 0, result.stderr[-3000:]
    state = tiny_qwen2.state_dict()  # the same seeded model, unsharded
    assert json.loads((tmp_path / "rank-0.json").read_text())["pushed"] == len(state)
    assert json.loads((tmp_path / "rank-1.json").read_text())["pushed"] == 0  # rank 1 only joins the gathers
    sent = load_file(tmp_path / "sent.safetensors")
    names = [name for _, path, body in server.calls if path == "/update_weights" for name in body["update_info"]["names"]]
    # full_state_dict_layers' order: the root's own tensors (embeddings, final norm, LM head), then layer by layer.
    layers = [[name for name in state if name.startswith(f"model.layers.{i}.")] for i in range(2)]
    assert names == [name for name in state if not name.startswith("model.layers.")] + layers[0] + layers[1]
    assert len(sent) == len(state)
    for index, name in enumerate(names):  # full tensors, not shards, equal to the unsharded model's
        assert torch.equal(sent[f"{index:04d}"], state[name]), name
    assert [path for path in server.paths() if path in ("/pause?mode=wait", "/resume")] == ["/pause?mode=wait",
                                                                                           "/resume"]
    assert server.paths().count("/init_weight_transfer_engine") == 1


# --- replies are checked, not believed: each violation is a VLLMServerError naming the URL and the field

VOCAB = 1000


def good_choice(**changes):
    choice = {"index": 0, "text": " 7 </answer>", "token_ids": [5, 6, 7], "finish_reason": "stop",
              "stop_reason": "</answer>", "logprobs": {"token_logprobs": [-0.5, -0.25, -1.0],
                                                      "tokens": ["token_id:5", "token_id:6", "token_id:7"]}}
    return {**choice, **changes}


def crafted_server(reply_of):
    """A /v1/completions server whose reply is ``reply_of(request body)`` (a dict, sent as JSON)."""
    return JsonServer({("GET", "/v1/models"): models_route,
                       ("POST", "/v1/completions"): lambda body: (200, reply_of(body))})


@pytest.mark.parametrize(("reply", "field"), [
    ({"choices": [good_choice(token_ids=[5, -1, 7])]}, r"token_ids\[1\] is -1, not a token id in \[0, 1000\)"),
    ({"choices": [good_choice(token_ids=[5, 6, VOCAB])]}, r"token_ids\[2\] is 1000, not a token id in \[0, 1000\)"),
    ({"choices": [good_choice(token_ids=[5, 6.5, 7])]}, r"token_ids\[1\] is 6.5"),
    ({"choices": [good_choice(token_ids=list(range(4)))]}, r"token_ids holds 4 tokens; at most 3 were asked for"),
    ({"choices": [good_choice(token_ids=None, logprobs={"token_logprobs": [-1.0], "tokens": ["token_id:-3"]})]},
     r"logprobs.tokens holds 'token_id:-3'"),
    ({"choices": [good_choice(logprobs={"token_logprobs": [-0.5, float("nan"), -1.0]})]},
     r"logprobs.token_logprobs\[1\] is nan, not a finite log-probability"),
    ({"choices": [good_choice(logprobs={"token_logprobs": [-0.5, -0.25, float("-inf")]})]},
     r"logprobs.token_logprobs\[2\] is -inf"),
    ({"choices": [good_choice(logprobs={"token_logprobs": [-0.5, 3.0, -1.0]})]}, r"token_logprobs\[1\] is 3.0"),
    ({"choices": [good_choice(logprobs={"token_logprobs": [-0.5]})]}, r"token_logprobs: .* got 1 for 3 tokens"),
    ({"choices": [good_choice(finish_reason="abort")]}, r"finish_reason is 'abort'"),
    ({"choices": [good_choice(stop_reason="7")]}, r"stop_reason is '7', not one of the stop strings"),
    ({"choices": [good_choice(text=["x"])]}, r"field text is list"),
    ({"choices": [good_choice(index=3)]}, r"choices\[\]\.index is \[3\]"),
    ({"choices": [good_choice(), good_choice()]}, r"field choices: expected 1 choices, got 2"),
    ({"choices": [good_choice()], "prompt_token_ids": None, "usage": {"prompt_tokens": -4}},
     r"usage.prompt_tokens is -4"),
], ids=["negative id", "id = vocab", "float id", "more tokens than asked", "negative token_id:N", "nan log-prob",
        "-inf log-prob", "positive log-prob", "log-prob count", "aborted", "unasked stop string", "text not a string",
        "index out of range", "extra choice", "negative prompt count"])
def test_each_violation_of_a_completions_reply_is_an_error_naming_the_url_and_the_field(reply, field):
    server = crafted_server(lambda body: reply)
    try:
        generator = VLLMServerGenerator(server.url, weight_sync="none", vocab_size=VOCAB, timeout_s=10)
        with pytest.raises(VLLMServerError, match=rf"{server.url}/v1/completions \(prompt 0\).*{field}"):
            generator.generate(["Hello"], SamplingOptions(max_new_tokens=3, return_logprobs=True))
    finally:
        server.close()


def test_a_valid_crafted_reply_passes_and_the_vocabulary_comes_from_the_model(tiny_qwen2):
    server = crafted_server(lambda body: {"choices": [good_choice()], "usage": {"prompt_tokens": 2}})
    try:
        [[completion]] = VLLMServerGenerator(server.url, weight_sync="none", vocab_size=VOCAB).generate(
            ["Hello"], SamplingOptions(max_new_tokens=3, return_logprobs=True))
        assert (completion.token_ids, completion.logprobs, completion.stop_string) == (
            [5, 6, 7], [-0.5, -0.25, -1.0], "</answer>")
        generator = build_generator("vllm", model=tiny_qwen2, vllm_server=VLLMServerOptions(
            server.url, weight_sync="none", timeout_s=7.0))
        assert generator.vocab_size == tiny_qwen2.config.vocab_size and generator.client.timeout_s == 7.0
    finally:
        server.close()


def test_a_reply_body_larger_than_the_request_can_need_is_refused_unread():
    # 1 token asked for: the bound is 1 MiB + 512 bytes; a 2 MiB text is more than any honest reply.
    server = crafted_server(lambda body: {"choices": [good_choice(text="x" * (2 << 20), token_ids=[5],
                                                                  logprobs=None)]})
    try:
        generator = VLLMServerGenerator(server.url, weight_sync="none", vocab_size=VOCAB)
        with pytest.raises(VLLMServerError, match=rf"{server.url}/v1/completions: the reply body is \d+ bytes, "
                                                  r"more than the 1049088 this request can need"):
            generator.generate(["Hello"], SamplingOptions(max_new_tokens=1))
    finally:
        server.close()


class SlowServer:
    """A real HTTP server whose /v1/completions reply trickles out a byte every ``gap_s`` (no Content-Length) or never comes."""

    def __init__(self, gap_s: float, silent: bool = False):
        owner = self
        self.stop = threading.Event()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"  # the body ends when the connection closes

            def do_GET(self):
                data = json.dumps(models_route(None)[1]).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if silent:
                    owner.stop.wait(10)
                    return
                self.send_response(200)
                self.end_headers()
                while not owner.stop.is_set():
                    try:
                        self.wfile.write(b" ")
                        self.wfile.flush()
                    except OSError:
                        return
                    owner.stop.wait(gap_s)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.mark.parametrize("silent", [True, False], ids=["no answer", "one byte at a time"])
def test_vllm_timeout_bounds_the_whole_request_also_a_reply_that_trickles(silent):
    server = SlowServer(gap_s=0.1, silent=silent)
    try:
        generator = VLLMServerGenerator(server.url, weight_sync="none", timeout_s=1.0)
        started = time.monotonic()
        expected = "no reply within 1 s" if silent else "the reply took longer than 1 s to arrive"
        with pytest.raises(VLLMServerError, match=rf"{server.url}/v1/completions: {expected} \(--vllm-timeout\)"):
            generator.generate(["Hello"], SamplingOptions(max_new_tokens=3))
        assert time.monotonic() - started < 5  # each byte came within the socket timeout: only the deadline stops it
    finally:
        server.close()


def test_malformed_model_list_and_worker_count_are_errors():
    for reply, message in (([1, 2], "field data is not a list of models"),
                           ({"data": [{"id": 3}]}, "field data lists no model id")):
        server = JsonServer({("GET", "/v1/models"): lambda _, reply=reply: (200, reply)})
        with pytest.raises(VLLMServerError, match=rf"{server.url}/v1/models: {message}"):
            VLLMServerGenerator(server.url, weight_sync="none")
        server.close()
    server = weight_server()
    server.routes[("GET", "/get_world_size")] = lambda _: (200, {"world_size": 10 ** 9})
    generator = VLLMServerGenerator(server.url, sync_address="127.0.0.1", sync_port=1, sender_factory=RecordingSender)
    with pytest.raises(VLLMServerError, match="/get_world_size: no worker count"):
        generator.sync_weights(torch.nn.Linear(1, 1))
    server.close()
