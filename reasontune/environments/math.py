"""The single-turn math environment, the default: one prompt, one completion, graded on its final answer.

It never answers the model, so a rollout in it is exactly today's single generator call
(``generate_rollouts`` takes that path unchanged, sample for sample).
"""

from __future__ import annotations

from reasontune.environments.base import Environment, Trajectory, Turn


class MathEnvironment(Environment):
    """One model turn per trajectory; nothing is ever appended."""

    name = "math"
    stop = ()
    max_tool_calls = 0

    def respond(self, model_turn: Turn, trajectory: Trajectory) -> Turn | None:
        """Returns None: the first model turn is the whole response."""
        return None
