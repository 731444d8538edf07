"""Multi-turn tool rollouts through the vLLM server client: the call shape on the wire (vLLM itself cannot run here).

The local server answers ``/v1/completions`` in vLLM's reply format with the rule-based
policy of ``test_environments``; what is checked is what the client sends each round: the
stop strings of the sampling and the environment, one continuation request per open
trajectory whose prompt is the prompt plus every turn so far (which vLLM's prefix caching
serves from cached blocks), and that the tool's output reached the final answer.
"""

from __future__ import annotations

import inspect

from test_environments import LIMITS, PROMPTS, TRUTHS, MultiplyingPolicy, sandbox_available  # noqa: F401
from test_vllm_server import SERVED, JsonServer, models_route, vllm_choice

from reasontune.environments.python import PythonEnvironment
from reasontune.generation import SamplingOptions
from reasontune.generation.vllm import VLLMGenerator
from reasontune.generation.vllm_server import VLLMServerGenerator
from reasontune.rewards import r1_zero_reward_fn
from reasontune.rollouts import generate_rollouts


def test_a_tool_rollout_through_the_server_client_sends_each_turn_as_a_continuation():
    policy = MultiplyingPolicy()

    def complete(body):
        options = SamplingOptions(temperature=body["temperature"], max_new_tokens=body["max_tokens"],
                                  stop=tuple(body["stop"]), n=body["n"], return_logprobs="logprobs" in body)
        [group] = policy.generate([body["prompt"]], options)
        return 200, {"object": "text_completion", "model": SERVED,
                     "choices": [vllm_choice(i, c, "logprobs" in body) for i, c in enumerate(group)],
                     "usage": {"prompt_tokens": group[0].prompt_token_count}}

    server = JsonServer({("GET", "/v1/models"): models_route, ("POST", "/v1/completions"): complete})
    try:
        generator = VLLMServerGenerator(server.url, weight_sync="none", vocab_size=256)
        sampling = SamplingOptions(temperature=0.0, max_new_tokens=200, return_logprobs=True)
        rollouts = generate_rollouts(generator, PROMPTS, TRUTHS, sampling, r1_zero_reward_fn, grading_workers=0,
                                     environment=PythonEnvironment(max_tool_calls=2, limits=LIMITS))
    finally:
        server.close()
    assert [r["reward"] for r in rollouts.flat_rewards()] == [1.0, 1.0]
    requests = [body for _, path, body in server.calls if path == "/v1/completions"]
    assert len(requests) == 4  # two prompts, two rounds
    assert all(body["stop"] == ["</answer>", "</python>"] and body["include_stop_str_in_output"] for body in requests)
    first_round, second_round = requests[:2], requests[2:]
    assert sorted(body["prompt"] for body in first_round) == sorted(PROMPTS)
    for trajectory in (group[0] for group in rollouts.trajectories):
        model_turn, tool_turn = trajectory.turns[:2]
        assert any(body["prompt"] == trajectory.prompt + model_turn.text + tool_turn.text and body["n"] == 1
                   for body in second_round)
        assert trajectory.completion().logprobs == [-0.5] * trajectory.model_token_count


def test_the_in_process_vllm_engine_keeps_prefix_caching_on_by_default():
    # continuation rounds re-send the trajectory's text; with prefix caching vLLM prefills only the new turn
    assert inspect.signature(VLLMGenerator.__init__).parameters["enable_prefix_caching"].default is True
