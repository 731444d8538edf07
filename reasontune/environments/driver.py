"""The multi-turn rollout loop over any ``Generator``: generate to a tool tag, run the tool, append its output, continue.

Round 0 samples ``n`` first turns per prompt in one ``generate`` call, with the environment's
stop strings added to the sampling's own (``</answer>``). Each later round continues the open
trajectories: a context is the original prompt followed by the text of its turns so far, one
sample each, seeded by the trajectory's index in the whole batch (``first_prompt_index × n``
plus its row), so a trajectory samples the same turns whether one process or a rank holding
its slice of the prompts continues it. That index is ``SamplingOptions.first_prompt_index`` of
the call, so one call takes a run of consecutive open rows: one call a round when every
trajectory continues, one per run of continuing rows otherwise. Backends take text, so each
round re-prefills the context: the HF generator keeps no KV cache across rounds; vLLM's prefix
caching (on in ``VLLMGenerator``) reuses the cached blocks of the shared prefix, so there the
re-prefill costs only the new tokens. Tool calls of a round run concurrently, each in its own
sandbox process.

Budgets: ``sampling.max_new_tokens`` bounds each model turn, ``max_response_tokens`` the model
tokens of the whole trajectory (checked between turns: an open trajectory over it ends with
``length``), and the environment's ``max_tool_calls`` the environment turns.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

from reasontune.environments.base import Environment, Trajectory, Turn
from reasontune.generation import Completion, Generator, SamplingOptions


def _model_turn(completion: Completion) -> Turn:
    return Turn(role="model", text=completion.text, token_ids=list(completion.token_ids),
                logprobs=completion.logprobs, entropies=completion.entropies,
                finish_reason=completion.finish_reason, stop_string=completion.stop_string)


def _round_seed(seed: int | None, round_index: int) -> int | None:
    """Returns the sampling seed of a continuation round: a hash of the run's seed and the round (None stays None)."""
    if seed is None or round_index == 0:
        return seed
    digest = hashlib.blake2b(f"{seed}/round/{round_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _consecutive_runs(rows: list[int]) -> list[list[int]]:
    """Returns sorted ``rows`` cut into runs of consecutive integers: ``[0, 1, 3]`` → ``[[0, 1], [3]]``."""
    runs: list[list[int]] = []
    for row in rows:
        if runs and row == runs[-1][-1] + 1:
            runs[-1].append(row)
        else:
            runs.append([row])
    return runs


def generate_trajectories(generator: Generator, prompts: Sequence[str], sampling: SamplingOptions,
                          environment: Environment, *, max_response_tokens: int | None = None,
                          tool_workers: int | None = None) -> list[list[Trajectory]]:
    """Returns ``sampling.n`` trajectories per prompt, prompt-major, each run until the model answers or a budget ends.

    ``max_response_tokens`` (None: ``max_tool_calls + 1`` turns of ``sampling.max_new_tokens``)
    bounds the model tokens of one trajectory; ``tool_workers`` the concurrent tool calls.
    """
    stop = tuple(dict.fromkeys(sampling.stop + environment.stop))
    turn_sampling = sampling.replace(stop=stop)
    budget = max_response_tokens or sampling.max_new_tokens * (environment.max_tool_calls + 1)
    groups = generator.generate(list(prompts), turn_sampling)
    trajectories = [[Trajectory(prompt=prompt, prompt_token_count=c.prompt_token_count) for c in group]
                    for prompt, group in zip(prompts, groups)]
    flat = [t for group in trajectories for t in group]
    completions = [c for group in groups for c in group]
    open_rows = list(range(len(flat)))
    workers = tool_workers or max(1, os.cpu_count() or 1)
    round_index = 0
    with ThreadPoolExecutor(max_workers=workers) as pool:
        while open_rows:
            replies = {}
            for row, completion in zip(open_rows, completions):
                trajectory = flat[row]
                turn = _model_turn(completion)
                trajectory.turns.append(turn)
                trajectory.finish_reason = completion.finish_reason
            calls = [row for row in open_rows if flat[row].turns[-1].stop_string in environment.stop]
            for row in calls:
                if len(flat[row].tool_turns) >= environment.max_tool_calls:
                    flat[row].finish_reason = "turns"
                elif flat[row].model_token_count >= budget:
                    flat[row].finish_reason = "length"
                else:
                    replies[row] = pool.submit(environment.respond, flat[row].turns[-1], flat[row])
            continuing = []
            for row, future in replies.items():
                reply = future.result()
                if reply is not None:
                    flat[row].turns.append(reply)
                    continuing.append(row)
            open_rows = sorted(continuing)
            if not open_rows:
                break
            round_index += 1
            # Rows near the end of their budget get shorter turns: one call per distinct turn cap (usually one).
            caps = {row: min(sampling.max_new_tokens, budget - flat[row].model_token_count) for row in open_rows}
            by_row: dict[int, Completion] = {}
            for cap in sorted(set(caps.values())):
                for rows in _consecutive_runs([row for row in open_rows if caps[row] == cap]):
                    # A continuation is seeded by its trajectory's index in the whole batch (the caller's
                    # first_prompt_index on): the same draw whichever rank or call continues it.
                    options = turn_sampling.replace(
                        n=1, seed=_round_seed(sampling.seed, round_index), max_new_tokens=cap, min_new_tokens=0,
                        first_prompt_index=sampling.first_prompt_index * sampling.n + rows[0])
                    contexts = [flat[row].prompt + flat[row].response for row in rows]
                    for row, group in zip(rows, generator.generate(contexts, options)):
                        by_row[row] = group[0]
            completions = [by_row[row] for row in open_rows]
    return trajectories
