"""Environments: what answers the model between its turns, the multi-turn rollout loop, and the sandbox for programs.

``base`` holds the contract (``Environment``, ``Turn``, ``Trajectory``); ``math`` the default
single-turn environment; ``python`` the tool environment (``<python>…</python>`` →
``<output>…</output>``); ``driver`` the rollout loop over any generator; ``sandbox`` the
isolated process a program runs in. ``build_environment`` is the one factory.
"""

from __future__ import annotations

from typing import Literal

from reasontune.environments.base import Environment, Trajectory, Turn
from reasontune.environments.math import MathEnvironment
from reasontune.environments.python import PythonEnvironment
from reasontune.environments.sandbox import SandboxLimits

ENVIRONMENTS = ("math", "python")


def build_environment(name: Literal["math", "python"], *, max_tool_calls: int = 4, tool_timeout: float = 10.0,
                      tool_output_bytes: int = 4096) -> Environment:
    """Returns the environment called ``name``; the python one with its call budget and each call's wall time and output bounds."""
    if name == "math":
        return MathEnvironment()
    if name == "python":
        limits = SandboxLimits(wall_seconds=tool_timeout, cpu_seconds=max(1, int(tool_timeout)),
                               output_bytes=tool_output_bytes)
        return PythonEnvironment(max_tool_calls=max_tool_calls, limits=limits)
    raise ValueError(f"unknown environment {name!r}; expected one of {', '.join(ENVIRONMENTS)}")


__all__ = ["ENVIRONMENTS", "Environment", "Trajectory", "Turn", "build_environment"]
