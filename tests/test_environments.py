"""The environment contract and the multi-turn rollout loop: tool calls run in the sandbox, every turn is recorded, budgets hold."""

from __future__ import annotations

import re
from typing import Sequence

import pytest

from reasontune.environments import build_environment
from reasontune.environments.driver import generate_trajectories
from reasontune.environments.python import PythonEnvironment, extract_program, format_output
from reasontune.environments.sandbox import SandboxLimits, SandboxUnavailable, run_python
from reasontune.generation import Completion, Generator, SamplingOptions, cut_at_stop
from reasontune.rewards import r1_zero_reward_fn
from reasontune.rollouts import generate_rollouts, summarize

LIMITS = SandboxLimits(wall_seconds=8.0, cpu_seconds=4)


@pytest.fixture(scope="module", autouse=True)
def sandbox_available():
    try:
        run_python("pass", LIMITS)
    except SandboxUnavailable as error:
        pytest.skip(f"no namespaces on this machine: {error}")


class MultiplyingPolicy(Generator):
    """A rule-based policy behind the Generator contract (text in, text out, stop strings honoured, one token a byte).

    For "What is A*B?" it writes a program printing A*B (or, with ``program``, that text),
    and once an ``<output>`` block is in its context, answers with the number it read there.
    ``calls`` records every context it was given, to check what the driver fed back.
    """

    def __init__(self, program: str | None = None, always_call: bool = False):
        self.program = program
        self.always_call = always_call
        self.calls: list[list[str]] = []

    def generate(self, prompts: Sequence[str], options: SamplingOptions) -> list[list[Completion]]:
        self.calls.append(list(prompts))
        return [[self._complete(prompt, options) for _ in range(options.n)] for prompt in prompts]

    def _complete(self, context: str, options: SamplingOptions) -> Completion:
        a, b = map(int, re.search(r"What is (\d+)\*(\d+)\?", context).groups())
        outputs = re.findall(r"<output>\n(.*?)</output>", context, re.DOTALL)
        if outputs and not self.always_call:
            text = f" I read {outputs[-1].strip()}. </think> <answer>{outputs[-1].strip()}</answer>"
        else:
            program = self.program if self.program is not None else f"print({a} * {b})"
            text = f" Let me compute. <python>\n{program}\n</python> and then more text that a stop string cuts"
        text, stop_string = cut_at_stop(text, options.stop)
        token_ids = list(text.encode())
        finish = "stop" if stop_string else "length"
        if len(token_ids) > options.max_new_tokens:
            token_ids, finish, stop_string = token_ids[:options.max_new_tokens], "length", None
            text = bytes(token_ids).decode("utf-8", "replace")
        return Completion(text=text, token_ids=token_ids, finish_reason=finish, stop_string=stop_string,
                          logprobs=[-0.5] * len(token_ids), prompt_token_count=len(context.encode()))

    def sync_weights(self, model) -> None:
        pass

    def sleep(self) -> None:
        pass

    def wake(self) -> None:
        pass

    def close(self) -> None:
        pass


PROMPTS = ["User: What is 1234*5678? Assistant: <think>", "User: What is 99*101? Assistant: <think>"]
TRUTHS = ["7006652", "9999"]  # 1234 * 5678 = 7006652 and 99 * 101 = 9999, by hand


def test_extract_program_takes_the_last_block_of_a_turn_and_drops_a_fence():
    assert extract_program("a <python>x=1</python> b <python>\nprint(2)\n</python>") == "print(2)"
    assert extract_program("<python>```python\nprint(3)\n```</python>") == "print(3)"
    assert extract_program("no opener </python>") is None
    assert extract_program("<python>print(1)") is None  # not a finished tool call


def test_format_output_wraps_and_notes_the_status():
    assert format_output("42\n", "ok", 10) == "<output>\n42\n</output>\n"
    assert format_output("42", "ok", 10) == "<output>\n42\n</output>\n"
    assert format_output("", "timeout", 10) == "<output>\n[timed out]\n</output>\n"
    assert format_output("xx", "output_limit", 2) == "<output>\nxx\n[output cut at 2 bytes]\n</output>\n"


def test_a_tool_call_runs_and_its_output_feeds_the_next_turn():
    policy = MultiplyingPolicy()
    environment = PythonEnvironment(max_tool_calls=2, limits=LIMITS)
    sampling = SamplingOptions(temperature=0.0, max_new_tokens=200, n=2)
    rollouts = generate_rollouts(policy, PROMPTS, TRUTHS, sampling, r1_zero_reward_fn, grading_workers=0,
                                 environment=environment)
    assert [r["reward"] for r in rollouts.flat_rewards()] == [1.0] * 4
    # round 0: the prompts, stop strings of the sampling and the environment; round 1: each sample's context
    assert policy.calls[0] == PROMPTS and len(policy.calls) == 2 and len(policy.calls[1]) == 4
    trajectory = rollouts.trajectories[0][1]
    assert [t.role for t in trajectory.turns] == ["model", "environment", "model"]
    assert trajectory.turns[0].text.endswith("</python>") and "more text" not in trajectory.turns[0].text
    assert trajectory.turns[1].program == "print(1234 * 5678)" and trajectory.turns[1].output == "7006652\n"
    assert trajectory.turns[1].text == "<output>\n7006652\n</output>\n"
    assert policy.calls[1][1] == PROMPTS[0] + trajectory.turns[0].text + trajectory.turns[1].text
    completion = rollouts.completions[0][1]
    assert completion.text == trajectory.response and completion.finish_reason == "stop"
    # generated tokens are the model turns' alone (one a byte here), never the environment's
    assert completion.num_tokens == len(trajectory.turns[0].text.encode()) + len(trajectory.turns[2].text.encode())
    record = rollouts.records()[1]
    assert record["tool_calls"] == 1 and record["tool_errors"] == 0 and len(record["turns"]) == 3
    assert record["turns"][1]["status"] == "ok" and record["turns"][1]["seconds"] > 0
    # the SFT records of correct samples: one per model turn, the tool's output in the second one's prompt
    kept = rollouts.correct()
    assert len(kept) == 8 and kept[1]["prompt"] == PROMPTS[0] + trajectory.turns[0].text + trajectory.turns[1].text
    assert kept[1]["response"] == trajectory.turns[2].text and kept[0]["response"] == trajectory.turns[0].text
    summary = rollouts.summary()
    assert summary["tool_calls"] == 4 and summary["tool_call_rate"] == 1.0 and summary["tool_error_rate"] == 0.0
    assert summary["accuracy_with_tool"] == 1.0 and summary["accuracy_without_tool"] is None


def test_a_failing_program_is_an_error_turn_and_the_call_budget_ends_the_trajectory():
    policy = MultiplyingPolicy(program="1/0", always_call=True)
    environment = PythonEnvironment(max_tool_calls=2, limits=LIMITS)
    sampling = SamplingOptions(temperature=0.0, max_new_tokens=200)
    [[trajectory]] = generate_trajectories(policy, PROMPTS[:1], sampling, environment)
    assert [t.role for t in trajectory.turns] == ["model", "environment", "model", "environment", "model"]
    assert all(t.status == "error" and "ZeroDivisionError" in t.output for t in trajectory.tool_turns)
    assert trajectory.finish_reason == "turns"


def test_the_response_token_budget_ends_the_trajectory_between_turns():
    policy = MultiplyingPolicy(always_call=True)
    environment = PythonEnvironment(max_tool_calls=10, limits=LIMITS)
    first_turn = len(" Let me compute. <python>\nprint(99 * 101)\n</python>".encode())  # 51 bytes, one token each
    sampling = SamplingOptions(temperature=0.0, max_new_tokens=200)
    [[trajectory]] = generate_trajectories(policy, PROMPTS[1:], sampling, environment,
                                           max_response_tokens=2 * first_turn + 10)
    # turn 3 is capped at the 10 tokens left and ends by length; nothing more is generated
    assert [len(t.token_ids) for t in trajectory.model_turns] == [first_turn, first_turn, 10]
    assert trajectory.finish_reason == "length"


def test_the_math_environment_is_todays_single_call():
    policy = MultiplyingPolicy()
    sampling = SamplingOptions(temperature=0.0, max_new_tokens=200, stop=("</answer>", "</python>"))
    with_env = generate_rollouts(policy, PROMPTS, TRUTHS, sampling, r1_zero_reward_fn, grading_workers=0,
                                 environment=build_environment("math"))
    without = generate_rollouts(policy, PROMPTS, TRUTHS, sampling, r1_zero_reward_fn, grading_workers=0)
    assert with_env.records() == without.records() and with_env.trajectories is None
    assert len(policy.calls) == 2  # one generate call each
    assert "tool_calls" not in summarize(with_env.records())


def test_eval_env_python_records_turns_and_reports_tool_statistics(tmp_path, tiny_model_dir, capsys):
    """``reasontune eval --env python`` end to end on a real (random, tiny) model: it rarely writes a tool call,
    so what is checked is the shape: every record has its turns and tool counts, the summary the tool statistics."""
    import json

    import torch

    from reasontune.cli import main

    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {a}*{b}?", "ground_truth": str(a * b)}) + "\n"
                            for a, b in ((12, 34), (56, 78), (91, 23))))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["eval", "--model", str(tiny_model_dir), "--data", str(data), "--output-dir", str(tmp_path / "out"),
                     "--env", "python", "--max-tool-calls", "2", "--tool-timeout", "5", "--eval-max-new-tokens", "8",
                     "--grading-workers", "0", "--n-bootstrap", "20"]) == 0
    finally:
        torch.set_num_threads(threads)
    records = [json.loads(line) for line in (tmp_path / "out" / "records.jsonl").read_text().splitlines()]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert len(records) == 3 and all(r["turns"][0]["role"] == "model" for r in records)
    assert all(r["tool_calls"] == sum(t["role"] == "environment" for t in r["turns"]) for r in records)
    assert summary["env"] == "python" and summary["tool_calls"] == sum(r["tool_calls"] for r in records)
    assert {"tool_call_rate", "tool_error_rate", "accuracy_with_tool", "accuracy_without_tool"} <= set(summary)
    assert "tool calls" in capsys.readouterr().out


class EchoEnvironment(PythonEnvironment):
    """Answers a model turn ending in ``stop`` with a fixed text (a stand-in tool whose tag the random model does write)."""

    def __init__(self, stop: str, reply: str):
        super().__init__(max_tool_calls=1, limits=LIMITS)
        self.stop, self.reply = (stop,), reply

    def respond(self, model_turn, trajectory):
        if model_turn.stop_string not in self.stop:
            return None
        from reasontune.environments.base import Turn

        return Turn(role="environment", text=self.reply, program="", output=self.reply, status="ok", seconds=0.0)


def test_the_hf_generator_stops_at_the_tool_tag_and_resumes_after_the_output(tiny_model_dir):
    """A real (random) model: the tool tag is a piece of text it writes greedily, so the stop is certain to fire."""
    import torch

    from reasontune.generation.hf import DecodeSettings, HFGenerator
    from reasontune.modeling import load_model, load_tokenizer

    torch.set_num_threads(1)
    model, tokenizer = load_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))
    # The re-prefill path; the kept-cache path (the default) is tested in tests/test_generation_sessions.py.
    generator = HFGenerator(model, tokenizer, batch_size=4, settings=DecodeSettings(keep_cache=False))
    prompt = "What is 12*34? <think>"
    greedy = SamplingOptions(temperature=0.0, max_new_tokens=12, stop=("</answer>",), return_logprobs=True)
    [[free]] = generator.generate([prompt], greedy)
    assert len(free.text) >= 6
    tag = free.text[3:6]  # ends the first model turn early, as </python> would
    environment = EchoEnvironment(tag, "<output>\n408\n</output>\n")
    [[trajectory]] = generate_trajectories(generator, [prompt], greedy, environment)
    first, reply, second = trajectory.turns
    assert first.text.endswith(tag) and first.stop_string == tag and free.text.startswith(first.text)
    assert first.token_ids == free.token_ids[:len(first.token_ids)]  # the same greedy tokens, cut at the tag
    assert reply.text == "<output>\n408\n</output>\n"
    # the continuation is what the generator gives for the joined text (a re-prefill; no KV cache is kept)
    [[expected]] = generator.generate([prompt + first.text + reply.text], greedy.replace(stop=("</answer>", tag)))
    assert (second.text, second.token_ids) == (expected.text, expected.token_ids)
    assert trajectory.completion().logprobs == first.logprobs + second.logprobs
