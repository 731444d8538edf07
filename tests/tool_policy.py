"""A tiny real policy that calls the python tool: a random Qwen2 taught the tool-call format by a few masked SFT steps.

A random model never writes ``</python>``, so a trainer's tool path would go untested. This one
is trained (seconds on one thread) on traces of two-digit multiplications that call Python once
and copy its output into the answer, with the loss on the model's turns only
(``environment.tokens.trajectory_batch``, the trainers' own masking). It learns the format well
and the digits partly: sampled at temperature 1 most responses call the tool (with programs
that run or fail, the operands partly miscopied) and some answers are right, so rewards differ
within groups and GRPO has a signal.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from reasontune.demo import build_demo_model, build_demo_tokenizer
from reasontune.environments.base import Trajectory, Turn
from reasontune.environments.python import OUTPUT_CLOSE, OUTPUT_OPEN, TOOL_CLOSE, TOOL_OPEN, format_output
from reasontune.environments.tokens import trajectory_batch
from reasontune.logprobs import get_response_log_probs

TOOL_TAGS = (TOOL_OPEN, TOOL_CLOSE, OUTPUT_OPEN, OUTPUT_CLOSE)
TEMPLATE = "User: {question}\nAssistant: <think>"


def question(a: int, b: int) -> str:
    return f"What is {a}*{b}?"


def trace(a: int, b: int) -> tuple[str, str, str]:
    """Returns (the call, the tool's output turn, the answer) of the trace for ``a * b``."""
    return (f" {TOOL_OPEN}print({a}*{b}){TOOL_CLOSE}", format_output(f"{a * b}\n", "ok", 4096),
            f" </think> <answer>{a * b}</answer>")


def pairs(n: int, seed: int) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    return [(rng.randint(10, 99), rng.randint(10, 99)) for _ in range(n)]


def build_tool_policy(path: Path, steps: int = 60, seed: int = 0) -> Path:
    """Returns ``path`` after saving the tokenizer and the tool-trained tiny model there (a Hugging Face directory)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        examples = pairs(256, seed)
        corpus = [TEMPLATE.format(question=question(a, b)) + "".join(trace(a, b)) for a, b in examples]
        tokenizer = build_demo_tokenizer(corpus, vocab_size=320, extra_tags=TOOL_TAGS)
        model = build_demo_model(tokenizer, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, seed=seed)
        trajectories = []
        for a, b in examples:
            call, output, answer = trace(a, b)
            turns = [Turn("model", call, token_ids=tokenizer(call, add_special_tokens=False)["input_ids"]),
                     Turn("environment", output),
                     Turn("model", answer, token_ids=tokenizer(answer, add_special_tokens=False)["input_ids"])]
            trajectories.append(Trajectory(prompt=TEMPLATE.format(question=question(a, b)), turns=turns))
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
        generator = torch.Generator().manual_seed(seed)
        model.train()
        for _ in range(steps):
            rows = torch.randperm(len(trajectories), generator=generator)[:16].tolist()
            batch = trajectory_batch([trajectories[i] for i in rows], tokenizer)
            log_probs = get_response_log_probs(model, batch["input_ids"], batch["labels"],
                                               response_mask=batch["response_mask"])["log_probs"]
            loss = -(log_probs * batch["response_mask"]).sum() / batch["response_mask"].sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
    finally:
        torch.set_num_threads(threads)
    return path


def write_tool_questions(path: Path, count: int, seed: int = 1) -> Path:
    """Writes ``count`` multiplication questions (prompt in the trace's template, the product as reference) as JSONL."""
    import json

    with open(path, "w") as handle:
        for a, b in pairs(count, seed):
            record = {"prompt": TEMPLATE.format(question=question(a, b)), "ground_truth": str(a * b)}
            handle.write(json.dumps(record) + "\n")
    return path
