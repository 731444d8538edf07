"""The ``python`` environment: the model writes ``<python>…</python>``, the sandbox runs it, ``<output>…</output>`` follows.

The tag pair, exactly: a model turn that ends with ``</python>`` (a stop string) is a tool
call; the program is the text after the last ``<python>`` of that turn (a Markdown fence
around it is dropped). The environment appends ``<output>\\n{printed text}</output>\\n``, where
the printed text is the program's merged stdout and stderr (a traceback included), bounded
by ``SandboxLimits.output_bytes`` and followed by a bracketed note when the program timed
out, was killed or printed past the bound. The model continues after it. A model turn that
ends any other way (``</answer>``, EOS, the token budget) ends the trajectory.

Each call runs in a fresh sandbox (``reasontune.environments.sandbox``): programs share no
state across calls, as in ToRA's and SimpleTIR's executors; a model that needs an earlier
value writes it again. Per-call shaping (``tool_call_reward``, ``tool_error_reward``) is 0 by
default: rewards come from the final answer alone, as ZeroTIR and SimpleTIR train.
"""

from __future__ import annotations

import re

from reasontune.environments.base import Environment, Trajectory, Turn
from reasontune.environments.sandbox import SandboxLimits, run_python

TOOL_OPEN, TOOL_CLOSE = "<python>", "</python>"
OUTPUT_OPEN, OUTPUT_CLOSE = "<output>", "</output>"
_FENCE = re.compile(r"^\s*```(?:python|py)?\s*\n(.*?)\n?\s*```\s*$", re.DOTALL)
_NOTES = {"timeout": "[timed out]", "output_limit": "[output cut at {bytes} bytes]", "killed": "[killed]"}


def extract_program(turn_text: str) -> str | None:
    """Returns the program of a model turn ending in ``</python>``: the text after its last ``<python>``, or None."""
    if not turn_text.endswith(TOOL_CLOSE):
        return None
    body = turn_text[: -len(TOOL_CLOSE)]
    start = body.rfind(TOOL_OPEN)
    if start < 0:
        return None
    program = body[start + len(TOOL_OPEN):]
    fenced = _FENCE.match(program)
    return fenced.group(1) if fenced else program.strip("\n")


def format_output(printed: str, status: str, output_bytes: int) -> str:
    """Returns the environment turn's text for a program that printed ``printed`` and ended with ``status``."""
    note = _NOTES.get(status, "").format(bytes=output_bytes)
    body = printed if not printed or printed.endswith("\n") else printed + "\n"
    if note:
        body += note + "\n"
    return f"{OUTPUT_OPEN}\n{body}{OUTPUT_CLOSE}\n"


class PythonEnvironment(Environment):
    """Runs each ``<python>`` block of the model in a fresh sandbox and appends its output; see the module docstring."""

    name = "python"
    stop = (TOOL_CLOSE,)

    def __init__(self, max_tool_calls: int = 4, limits: SandboxLimits = SandboxLimits(),
                 tool_call_reward: float = 0.0, tool_error_reward: float = 0.0):
        if max_tool_calls < 1:
            raise ValueError(f"max_tool_calls must be >= 1 for the python environment, got {max_tool_calls}")
        self.max_tool_calls = max_tool_calls
        self.limits = limits
        self.call_reward = tool_call_reward
        self.error_reward = tool_error_reward

    def respond(self, model_turn: Turn, trajectory: Trajectory) -> Turn | None:
        """Returns the ``<output>`` turn of the program ``model_turn`` ends with, or None when it called no tool."""
        if model_turn.stop_string != TOOL_CLOSE:
            return None
        program = extract_program(model_turn.text)
        if program is None:
            text = f"{OUTPUT_OPEN}\n[no {TOOL_OPEN} before {TOOL_CLOSE}: nothing was run]\n{OUTPUT_CLOSE}\n"
            return Turn(role="environment", text=text, program="", output="", status="no_program", seconds=0.0)
        result = run_python(program, self.limits)
        return Turn(role="environment", text=format_output(result.output, result.status, self.limits.output_bytes),
                    program=program, output=result.output, status=result.status, seconds=result.seconds)

    def tool_call_reward(self, turn: Turn) -> float:
        """Returns ``tool_call_reward`` for a program that ran cleanly, ``tool_error_reward`` otherwise (both 0 by default)."""
        return self.call_reward if turn.status == "ok" else self.error_reward
