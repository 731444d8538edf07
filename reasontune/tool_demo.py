"""``reasontune demo --algorithm tools``: a task the tiny model cannot do in its head but can with one Python call.

The task is multiplying two 4-digit numbers. A trace calls the tool once, reads the product
and answers:

    <think> <python>print(1234*5678)</python><output>\\n7006652\\n</output>\\n </think> <answer>7006652</answer>

SFT trains on the model's turns only: each trace becomes one prompt/response pair per model
turn (the second one's prompt holds the first turn and the tool's output), so the tool's
output is context and never a target — the same loss as the trajectory's with the environment
masked out (``tests/test_trajectory_tokens.py``). The SFT run's own evaluations are without
the tool (the model's "output" is then its own guess); the held-out set is then evaluated with
the ``python`` environment, both under the same total token budget, and both accuracies printed.

Measured once (``reasontune demo --algorithm tools --n-train 6400 --n-eval 128``: 200 SFT steps,
on the shared 2-core machine under a load of ~10, 30 min in all): 0.0% without the tool -> 78.1%
with it, 128 calls, none failing. Every program copied its operands right; the misses are
answers that miscopy the printed product (repeated or dropped digits), which more SFT steps or a
GRPO stage on the tool rollouts (not wired into the GRPO trainer yet) should remove. The issue's
bar (>= 90% with the tool, in <= 10 minutes) is not shown yet.
"""

from __future__ import annotations

import dataclasses
import random
import time
from pathlib import Path
from typing import Any

import torch

from reasontune.data import load_examples
from reasontune.demo import build_demo_model, build_demo_tokenizer, claim_demo_dir, demo_sft_config, eval_summaries
from reasontune.environments.python import PythonEnvironment, format_output
from reasontune.environments.sandbox import SandboxLimits
from reasontune.generation import SamplingOptions, build_generator
from reasontune.modeling import load_model, load_tokenizer
from reasontune.rewards import r1_zero_reward_fn
from reasontune.rollouts import rollouts_for_examples, write_jsonl
from reasontune.training.sft import run_sft

TOOL_TAGS = ("<python>", "</python>", "<output>", "</output>")
TOOL_TEMPLATE = ("Think in <think> </think>. Run Python in <python> </python>; its output follows in <output> </output>. "
                 "Then answer in <answer> </answer>.\nUser: {question}\nAssistant: <think>")
TURN_TOKENS = 24  # one model turn: " <python>print(" + 4 digits + "*" + 4 digits + ")</python>" is ~16 tokens
TOOL_NUM_DIGITS = 4


def tool_trace(a: int, b: int) -> tuple[str, str, str]:
    """Returns (first model turn, the tool's output turn, last model turn) of the trace for ``a * b``."""
    call = f" <python>print({a}*{b})</python>"
    return call, format_output(f"{a * b}\n", "ok", 4096), f" </think> <answer>{a * b}</answer>"


def make_multiplication_questions(n: int, seed: int, exclude: set[tuple[int, int]] = frozenset(),
                                  num_digits: int = TOOL_NUM_DIGITS) -> list[tuple[int, int]]:
    """Returns ``n`` distinct seeded operand pairs of ``num_digits`` digits, none in ``exclude``."""
    low, high = 10 ** (num_digits - 1), 10 ** num_digits - 1
    rng, taken, pairs = random.Random(seed), set(exclude), []
    while len(pairs) < n:
        pair = (rng.randint(low, high), rng.randint(low, high))
        if pair not in taken:
            taken.add(pair)
            pairs.append(pair)
    return pairs


def turn_records(pairs: list[tuple[int, int]]) -> list[dict[str, str]]:
    """Returns the SFT records of the traces: one ``{prompt, response, ground_truth}`` per model turn."""
    records = []
    for a, b in pairs:
        prompt = TOOL_TEMPLATE.format(question=f"What is {a}*{b}?")
        call, output, answer = tool_trace(a, b)
        records.append({"prompt": prompt, "response": call, "ground_truth": str(a * b)})
        records.append({"prompt": prompt + call + output, "response": answer, "ground_truth": str(a * b)})
    return records


def question_records(pairs: list[tuple[int, int]]) -> list[dict[str, str]]:
    """Returns ``{prompt, ground_truth}`` evaluation records of the questions."""
    return [{"prompt": TOOL_TEMPLATE.format(question=f"What is {a}*{b}?"), "ground_truth": str(a * b)} for a, b in pairs]


def prepare_tool_demo(config) -> tuple[Path, Path, Path]:
    """Writes data/train.jsonl (turn records), data/val.jsonl (held-out questions) and base-model/; returns their paths."""

    output_dir = Path(config.output_dir)
    held_out = make_multiplication_questions(config.n_eval, seed=config.seed + 1)
    train = make_multiplication_questions(config.n_train // 2, seed=config.seed, exclude=set(held_out))
    train_path, val_path = output_dir / "data" / "train.jsonl", output_dir / "data" / "val.jsonl"
    records = turn_records(train)
    random.Random(config.seed).shuffle(records)
    write_jsonl(records, train_path)
    write_jsonl(question_records(held_out), val_path)
    corpus = [TOOL_TEMPLATE] + [r["prompt"] + r["response"] for r in records[:4000]]
    tokenizer = build_demo_tokenizer(corpus, vocab_size=config.vocab_size, extra_tags=TOOL_TAGS)
    model = build_demo_model(tokenizer, hidden_size=config.hidden_size, num_layers=config.num_layers,
                             num_heads=config.num_heads, num_kv_heads=config.num_kv_heads, seed=config.seed)
    model_dir = output_dir / "base-model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return train_path, val_path, model_dir


def evaluate_with_tool(model_dir: Path, val_path: Path, output_dir: Path, config) -> dict[str, Any]:
    """Returns the summary of the held-out questions answered with the ``python`` environment (written to ``output_dir``)."""
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    generator = build_generator("hf", model=load_model(str(model_dir)), tokenizer=load_tokenizer(str(model_dir)),
                                batch_size=config.eval_batch_size)
    examples = load_examples(str(val_path)).examples
    sampling = SamplingOptions(temperature=0.0, max_new_tokens=TURN_TOKENS)
    environment = PythonEnvironment(max_tool_calls=1, limits=SandboxLimits(wall_seconds=10.0, cpu_seconds=5))
    rollouts = rollouts_for_examples(generator, examples, "{question}", sampling, r1_zero_reward_fn, grading_workers=0,
                                     environment=environment, max_response_tokens=2 * TURN_TOKENS)
    return rollouts.write(output_dir, extra_summary={"env": "python"})


def tool_sft_config(config, train_path: Path, val_path: Path, model_dir: Path):
    """Returns the demo's SFT config on the turn records; its evaluations are without the tool, at the same total budget."""

    return dataclasses.replace(demo_sft_config(config, train_path, val_path, model_dir),
                               eval_max_new_tokens=2 * TURN_TOKENS, eval_every=0)


def run_tool_demo(config) -> int:
    """Runs the tool demo: data, tiny model, SFT on the traces' model turns, then held-out accuracy with and without the tool."""
    started = time.time()
    claim_demo_dir(config.output_dir)
    print(f"demo: {config.n_train // 2} traces of 4-digit multiplications that call Python once "
          f"({config.n_train} model turns), {config.n_eval} held-out questions, under {config.output_dir}", flush=True)
    train_path, val_path, model_dir = prepare_tool_demo(config)
    run_dir = Path(run_sft(tool_sft_config(config, train_path, val_path, model_dir)))
    summaries = eval_summaries(run_dir)
    without_tool = summaries[-1][1] if summaries else {}
    with_tool = evaluate_with_tool(run_dir / "final", val_path, run_dir / "eval-python", config)
    elapsed = time.time() - started
    print(f"demo: held-out accuracy after SFT, {2 * TURN_TOKENS} tokens each: {without_tool.get('accuracy', float('nan')):.1%} "
          f"without the tool -> {with_tool['accuracy']:.1%} with it ({with_tool['tool_calls']} calls, error rate "
          f"{with_tool['tool_error_rate'] or 0:.1%}; {elapsed / 60:.1f} min)")
    print(f"demo: run directory {run_dir} (records with every turn: {run_dir / 'eval-python' / 'records.jsonl'})")
    return 0
