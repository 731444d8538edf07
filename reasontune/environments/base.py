"""The environment contract: a rollout is model turns and environment turns until the model answers or a budget ends.

An ``Environment`` says which stop strings end a model turn (``stop``) and, given the text of
the trajectory so far, answers a finished model turn with an environment turn or with None
(the trajectory is over: the model answered, or stopped without calling a tool). The driver
(``reasontune.environments.driver``) alternates generator calls and ``respond`` calls; the
reward is graded on the whole response text (model and environment turns joined), so the
final ``<answer>`` counts as in single-turn rollouts.

A ``Trajectory`` keeps every turn: model turns with their sampled token ids and log-probs,
environment turns with their text and, for tool calls, the program, its output, status and
seconds. ``Trajectory.completion()`` folds it into the ``Completion`` the grader and records
read: the text of all turns, the model turns' tokens.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Literal

from reasontune.generation import Completion

Role = Literal["model", "environment"]


@dataclass
class Turn:
    """One turn of a trajectory.

    ``role == "model"``: ``token_ids`` / ``logprobs`` are the sampled tokens and their sampling
    log-probs (as in ``Completion``), ``finish_reason`` / ``stop_string`` how the turn ended.
    ``role == "environment"``: ``text`` is what was appended to the context; for a tool call,
    ``program``, ``output`` (what the program printed, bounded), ``status`` (``ok``, ``error``,
    ``timeout``, ``output_limit``, ``killed``, ``no_program``) and ``seconds`` describe it.
    """

    role: Role
    text: str
    token_ids: list[int] | None = None
    logprobs: list[float] | None = None
    entropies: list[float] | None = None
    finish_reason: str | None = None
    stop_string: str | None = None
    program: str | None = None
    output: str | None = None
    status: str | None = None
    seconds: float | None = None

    def record(self) -> dict[str, Any]:
        """Returns the turn as a JSON-ready dict for ``records.jsonl`` (token ids and log-probs left out)."""
        result: dict[str, Any] = {"role": self.role, "text": self.text}
        if self.role == "model":
            result.update(tokens=len(self.token_ids or []), finish_reason=self.finish_reason)
        else:
            result.update(program=self.program, output=self.output, status=self.status, seconds=self.seconds)
        return result


@dataclass
class Trajectory:
    """The turns sampled for one prompt, in order; ``finish_reason`` is how it ended.

    ``finish_reason``: the last model turn's (``stop``, ``eos``, ``length``), or ``turns`` when
    the model asked for a tool call past the environment's ``max_tool_calls``, or
    ``length`` when the response token budget ran out between turns.
    """

    prompt: str
    turns: list[Turn] = field(default_factory=list)
    finish_reason: str = "length"
    prompt_token_count: int = 0

    @property
    def response(self) -> str:
        """Returns the text of every turn joined: what follows the prompt, and what is graded."""
        return "".join(turn.text for turn in self.turns)

    @property
    def model_turns(self) -> list[Turn]:
        return [turn for turn in self.turns if turn.role == "model"]

    @property
    def tool_turns(self) -> list[Turn]:
        return [turn for turn in self.turns if turn.role == "environment" and turn.program is not None]

    @property
    def model_token_count(self) -> int:
        return sum(len(turn.token_ids or []) for turn in self.model_turns)

    def completion(self) -> Completion:
        """Returns the trajectory as one ``Completion``: the text of all turns, the model turns' tokens and log-probs.

        ``token_ids`` are the model's sampled tokens only (the environment's are not sampled),
        so ``num_tokens`` counts generated tokens as in single-turn rollouts.
        """
        token_ids = [t for turn in self.model_turns for t in (turn.token_ids or [])]
        with_logprobs = all(turn.logprobs is not None for turn in self.model_turns)
        with_entropies = all(turn.entropies is not None for turn in self.model_turns)
        last = self.model_turns[-1] if self.model_turns else None
        return Completion(
            text=self.response, token_ids=token_ids, finish_reason=self.finish_reason,  # type: ignore[arg-type]
            logprobs=[v for turn in self.model_turns for v in turn.logprobs] if with_logprobs else None,
            entropies=[v for turn in self.model_turns for v in turn.entropies] if with_entropies else None,
            stop_string=last.stop_string if last is not None else None, prompt_token_count=self.prompt_token_count)


class Environment(abc.ABC):
    """What answers the model between its turns; see the module docstring."""

    name: str = ""
    stop: tuple[str, ...] = ()
    """Stop strings that end a model turn so the environment can answer (added to the sampling's own)."""
    max_tool_calls: int = 0
    """Environment turns allowed in one trajectory; a model turn asking for one more ends it (``turns``)."""

    @property
    def multi_turn(self) -> bool:
        """Returns whether trajectories can have more than one model turn."""
        return self.max_tool_calls > 0

    @abc.abstractmethod
    def respond(self, model_turn: Turn, trajectory: Trajectory) -> Turn | None:
        """Returns the environment turn answering ``model_turn`` (already appended to ``trajectory``), or None: the trajectory ends."""

    def tool_call_reward(self, turn: Turn) -> float:
        """Returns the shaping reward of one environment turn (0: rewards are the final answer's alone)."""
        return 0.0
