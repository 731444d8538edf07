"""Benchmark our answer grader against math-verify on the hand-labeled sets, in one run.

    python bench/grader.py [--rounds N] [--workers W] [--show-misses]

The labelled cases are tests/data/reward_cases.jsonl, reward_cases_round2.jsonl and
reward_cases_round3.jsonl (only formatted responses: unformatted ones test the format rule,
which math-verify lacks). Both
graders see the same answer text: the R1-Zero format rule picks the ``<answer>`` content;
math-verify then gets its best setting (its own extraction from that text — boxes, "final
answer is", the last LaTeX — falling back to the text wrapped in ``\\boxed{}``), and for
question-only cases the whole response. Printed: accuracy and false positives (graded right,
labelled wrong) by category side by side, then totals, median and p99 time per answer
single-process, throughput pooled across worker processes, and the speed ratio
(math-verify's time / ours). math-verify reads LaTeX with sympy's ``parse_latex`` (which
hands text to Python's evaluator); acceptable for a baseline here, never in reasontune.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from reasontune.rewards import grade_batch, question_only_reward_fn, r1_zero_reward_fn  # noqa: E402
from reasontune.rewards.extract import extract_r1_zero_answer  # noqa: E402
from reasontune.rewards.grading import _parse_cached  # noqa: E402

CASES_PATHS = [ROOT / "tests" / "data" / name for name in
               ("reward_cases.jsonl", "reward_cases_round2.jsonl", "reward_cases_round3.jsonl")]


def load_cases() -> list[dict]:
    """Return the labeled cases that have a formatted response (unformatted ones test format only)."""
    cases = [json.loads(line) for path in CASES_PATHS for line in path.read_text().splitlines() if line.strip()]
    return [case for case in cases if case["format_reward"] == 1.0]


def ours(case: dict) -> float:
    """Return our answer reward for a case (parse caches cleared: every answer is graded cold)."""
    _parse_cached.cache_clear()
    reward_fn = question_only_reward_fn if case["reward_fn"] == "question_only" else r1_zero_reward_fn
    return reward_fn(case["response"], case["ground_truth"])["answer_reward"]


def math_verify(case: dict, setting: str = "extract") -> float:
    """Return math-verify's answer reward for a case under ``setting`` (see the module docstring).

    ``extract``: math-verify's own extraction from the answer text (boxes, "final answer is",
    the last LaTeX), falling back to the text wrapped in ``\\boxed{}``; ``boxed``: the text
    wrapped in ``\\boxed{}`` first. Question-only cases always give it the whole response.
    """
    from math_verify import parse, verify

    if case["reward_fn"] == "question_only":
        text = case["response"]
    else:
        text = extract_r1_zero_answer(case["response"])
    if text is None or not text.strip():
        return 0.0
    truths = case["ground_truth"] if isinstance(case["ground_truth"], list) else [case["ground_truth"]]
    if case["reward_fn"] == "question_only":
        given = parse(text)
    elif setting == "boxed":
        given = parse(f"\\boxed{{{text}}}") or parse(text)
    else:
        given = parse(text) or parse(f"\\boxed{{{text}}}")
    return 1.0 if any(verify(parse(f"\\boxed{{{truth}}}"), given) for truth in truths) else 0.0


def math_verify_boxed(case: dict) -> float:
    """Return math-verify's answer reward with the answer text wrapped in ``\\boxed{}`` first."""
    return math_verify(case, "boxed")


def _case_pair(case: dict) -> tuple[str, object]:
    return case["response"], case["ground_truth"]


def single_process(grader, cases: list[dict], rounds: int) -> tuple[list[float], list[float]]:
    """Return (answer rewards, per-case median seconds) grading every case ``rounds`` times."""
    times: list[list[float]] = [[] for _ in cases]
    rewards: list[float] = []
    for round_index in range(rounds):
        for index, case in enumerate(cases):
            start = time.perf_counter()
            reward = grader(case)
            times[index].append(time.perf_counter() - start)
            if round_index == 0:
                rewards.append(reward)
    return rewards, [statistics.median(case_times) for case_times in times]


def pooled_throughput_ours(cases: list[dict], workers: int) -> float:
    """Return answers per second of ``grade_batch`` over the set (workers already started)."""
    r1 = [case for case in cases if case["reward_fn"] == "r1_zero"]
    question_only = [case for case in cases if case["reward_fn"] == "question_only"]
    grade_batch(["x </think> <answer>1</answer>"] * workers, ["1"] * workers, workers=workers)  # start workers
    start = time.perf_counter()
    grade_batch([c["response"] for c in r1], [c["ground_truth"] for c in r1], workers=workers)
    grade_batch([c["response"] for c in question_only], [c["ground_truth"] for c in question_only],
                reward_fn=question_only_reward_fn, workers=workers)
    return len(cases) / (time.perf_counter() - start)


def pooled_throughput_math_verify(cases: list[dict], workers: int, grader=math_verify) -> float:
    """Return answers per second of math-verify in a ProcessPoolExecutor (workers already started)."""
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(grader, cases[:workers]))  # start and import in every worker
        start = time.perf_counter()
        list(pool.map(grader, cases, chunksize=max(1, len(cases) // (4 * workers))))
        return len(cases) / (time.perf_counter() - start)


def quality(rewards: list[float], cases: list[dict]) -> dict:
    """Return accuracy, false positives and false negatives against the labels."""
    labels = [case["answer_reward"] for case in cases]
    false_positives = [c for r, c in zip(rewards, cases) if r == 1.0 and c["answer_reward"] == 0.0]
    false_negatives = [c for r, c in zip(rewards, cases) if r == 0.0 and c["answer_reward"] == 1.0]
    positives = sum(labels)
    return {
        "accuracy": sum(r == label for r, label in zip(rewards, labels)) / len(cases),
        "false_positives": false_positives,
        "false_negatives": false_negatives,
        "recall": (positives - len(false_negatives)) / positives,
    }


def print_by_category(cases: list[dict], ours: list[float], theirs: list[float]) -> None:
    """Print accuracy and false positives per category for both graders, side by side."""
    rows: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0, 0, 0, 0])
    for case, our, their in zip(cases, ours, theirs):
        row = rows[case["category"]]
        label = case["answer_reward"]
        row[0] += 1
        row[1] += our == label
        row[2] += their == label
        row[3] += our == 1.0 and label == 0.0
        row[4] += their == 1.0 and label == 0.0
    print(f"{'category':30}{'cases':>6}{'acc ours':>10}{'acc m-v':>9}{'FP ours':>9}{'FP m-v':>8}")
    for category, (count, our_right, their_right, our_fp, their_fp) in sorted(rows.items()):
        print(f"{category:30}{count:>6}{our_right / count:>10.1%}{their_right / count:>9.1%}{our_fp:>9}{their_fp:>8}")
    totals = [sum(row[index] for row in rows.values()) for index in range(5)]
    print(f"{'all':30}{totals[0]:>6}{totals[1] / totals[0]:>10.1%}{totals[2] / totals[0]:>9.1%}{totals[3]:>9}{totals[4]:>8}\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1, help="times each answer is graded single-process")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="worker processes for throughput")
    parser.add_argument("--show-misses", action="store_true", help="list every misgraded case")
    args = parser.parse_args()

    cases = load_cases()
    r1_zero_reward_fn("x </think> <answer>\\sqrt{2}</answer>", "\\frac{2}{\\sqrt{2}}")  # start our sympy worker
    math_verify(cases[0])  # import math-verify and sympy's LaTeX parser
    results = {}
    # math-verify's best setting on this set: whichever reading of the answer text scores higher.
    settings = {"extract": math_verify, "boxed": math_verify_boxed}
    scores = {name: sum(grader(case) == case["answer_reward"] for case in cases) for name, grader in settings.items()}
    best_setting = max(scores, key=scores.get)
    print(f"math-verify settings (correct of {len(cases)}): {scores}; best: {best_setting}")
    for name, grader in (("reasontune", ours), ("math-verify", settings[best_setting])):
        rewards, seconds = single_process(grader, cases, args.rounds)
        results[name] = quality(rewards, cases) | {
            "rewards": rewards,
            "median_ms": 1000 * statistics.median(seconds),
            "p99_ms": 1000 * sorted(seconds)[int(0.99 * (len(seconds) - 1))],
        }
    results["reasontune"]["pooled"] = pooled_throughput_ours(cases, args.workers)
    results["math-verify"]["pooled"] = pooled_throughput_math_verify(cases, args.workers, settings[best_setting])
    for result in results.values():
        result["single"] = 1000 / result["median_ms"]

    print(f"machine: {platform.machine()} {platform.processor() or ''} {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}, sympy {version('sympy')}, math-verify {version('math-verify')}")
    print(f"labeled set: {len(cases)} formatted cases ({sum(c['answer_reward'] for c in cases):.0f} correct), "
          f"{args.rounds} round(s), {args.workers} workers pooled\n")
    ours_, theirs = results["reasontune"], results["math-verify"]
    print_by_category(cases, ours_["rewards"], theirs["rewards"])
    rows = [
        ("accuracy", "{:.1%}", "accuracy"),
        ("recall", "{:.1%}", "recall"),
        ("false positives", "{}", "false_positives"),
        ("false negatives", "{}", "false_negatives"),
        ("median ms / answer", "{:.3f}", "median_ms"),
        ("p99 ms / answer", "{:.2f}", "p99_ms"),
        ("answers/s pooled", "{:.0f}", "pooled"),
    ]
    print(f"{'':22}{'reasontune':>12}{'math-verify':>13}{'ratio':>9}")
    for label, fmt, key in rows:
        a, b = ours_[key], theirs[key]
        if isinstance(a, list):
            a, b = len(a), len(b)
        ratio = f"{a / b:.2f}" if b else "-"
        print(f"{label:22}{fmt.format(a):>12}{fmt.format(b):>13}{ratio:>9}")
    for name, result in results.items():
        misses = result["false_positives"] + result["false_negatives"]
        if misses and (args.show_misses or name == "reasontune"):
            print(f"\n{name} misgraded:")
            for case in misses:
                answer = case["response"].split("<answer>")[-1].replace("</answer>", "")
                print(f"  [{case['category']}] {answer!r} vs {case['ground_truth']!r} (label {case['answer_reward']:.0f})")
    print(f"\nspeed: reasontune is {theirs['median_ms'] / ours_['median_ms']:.1f}x faster per answer "
          f"(median, single process) and {ours_['pooled'] / theirs['pooled']:.1f}x in pooled throughput")
    print(f"\ndone when: no false positives ({len(ours_['false_positives']) == 0}), recall >= math-verify's "
          f"({ours_['recall'] >= theirs['recall']}), median time <= half of math-verify's "
          f"({ours_['median_ms'] <= theirs['median_ms'] / 2})")


if __name__ == "__main__":
    main()
