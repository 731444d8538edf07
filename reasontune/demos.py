"""The ``reasontune demo`` command: the demo that ``--algorithm`` names.

``demo`` holds the addition task (SFT, EI, GRPO) and the options of both (``DemoConfig``;
``--algorithm tools`` fills in its own sizes where not given); ``tool_demo`` the multiplication
task solved with the Python tool (SFT on tool-calling traces, then GRPO with the tool), built on
the addition demo's tokenizer, model and SFT settings.
"""

from __future__ import annotations

from reasontune.demo import DemoConfig, run_demo as run_addition_demo
from reasontune.tool_demo import run_tool_demo

__all__ = ["DemoConfig", "run_demo"]


def run_demo(config: DemoConfig) -> int:
    """Runs the demo of ``config.algorithm``; returns the exit status."""
    if config.algorithm == "tools":
        return run_tool_demo(config)
    return run_addition_demo(config)
