"""Untrusted model output: code-looking strings, huge numbers, huge and deeply nested inputs.

Every case must come back graded wrong, quickly, without running anything.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from reasontune.rewards import parse_answer, question_only_reward_fn, r1_zero_reward_fn
from reasontune.rewards import sandbox

PACKAGE = Path(__file__).resolve().parents[1] / "reasontune" / "rewards"
WRONG = {"format_reward": 1.0, "answer_reward": 0.0, "reward": 0.0}


def wrap(answer: str) -> str:
    return f"Reasoning. </think> <answer>{answer}</answer>"


def injection_strings(sentinel: Path) -> list[str]:
    return [
        f"__import__('os').system('touch {sentinel}')",
        f"__import__(\"os\").system(\"touch {sentinel}\")",
        f"open('{sentinel}', 'w').write('x')",
        "().__class__.__bases__[0].__subclasses__()",
        f"\\text{{{sentinel}}}",
        f"Symbol('x').__class__.__init__.__globals__['os'].system('touch {sentinel}')",
        f"$\\boxed{{__import__('os').system('touch {sentinel}')}}$",
        f"x = __import__('os').system('touch {sentinel}')",
        f"lambda: __import__('os').system('touch {sentinel}')",
    ]


@pytest.mark.parametrize("index", range(9))
def test_code_injection_is_graded_wrong_and_runs_nothing(tmp_path, index):
    sentinel = tmp_path / "pwned"
    attack = injection_strings(sentinel)[index]
    # The reference is "0" and os.system returns 0: evaluating the answer would "match".
    assert r1_zero_reward_fn(wrap(attack), "0") == WRONG
    assert question_only_reward_fn(f"\\boxed{{{attack}}}", "0")["answer_reward"] == 0.0
    assert not sentinel.exists()


HUGE = [
    "9^{9^{9^9}}",
    "10^{10^{10}}",
    "2^{2^{2^{2^{2^{2}}}}}",
    "1000000!",
    "(10^{100})!",
    "(3!)!!!!",
    "x^{10^{10}}",
    "\\binom{10^{10}}{5 \\cdot 10^9}",
    "10^{10^{10}} - 10^{10^{10}}",
    "\\sqrt{10^{10^{10}}}",
    "1" * 1500,
    "1e99999",
    "9" * 400 + "^{" + "9" * 400 + "}",
]


@pytest.mark.parametrize("answer", HUGE, ids=range(len(HUGE)))
def test_huge_numbers_are_refused_fast(answer):
    start = time.perf_counter()
    # The reference is 0, so a correct grader must say wrong; it must also say so quickly.
    assert r1_zero_reward_fn(wrap(answer), "0", timeout=1.0) == WRONG
    assert time.perf_counter() - start < 1.5


def test_huge_reference_number_against_itself_is_refused_not_computed():
    start = time.perf_counter()
    assert r1_zero_reward_fn(wrap("9^{9^{9^9}} + 1"), "9^{9^{9^9}}")["answer_reward"] == 0.0
    assert time.perf_counter() - start < 1.5


BIG_INPUTS = {
    "million digits": "1" * 1_000_000,
    "million letters": "a" * 1_000_000,
    "10k nested parens": "(" * 10_000 + "1" + ")" * 10_000,
    "10k nested braces": "{" * 10_000 + "1" + "}" * 10_000,
    "10k nested fracs": "\\frac{" * 10_000 + "1" + "}{2}" * 10_000,
    "10k nested sqrt": "\\sqrt{" * 10_000 + "2" + "}" * 10_000,
    "unbalanced": "(" * 50_000,
    "many boxes": "\\boxed{" * 100_000,
    "many answer tags": "<answer>" * 100_000,
    "minus run": "-" * 100_000 + "1",
    "power chain": "^".join(["2"] * 5_000),
}


@pytest.mark.parametrize("name", list(BIG_INPUTS))
def test_enormous_and_deeply_nested_answers_are_wrong_and_fast(name):
    answer = BIG_INPUTS[name]
    start = time.perf_counter()
    assert r1_zero_reward_fn(wrap(answer), "1")["answer_reward"] == 0.0
    assert question_only_reward_fn(f"\\boxed{{{answer}}}", "1")["answer_reward"] == 0.0
    assert r1_zero_reward_fn(answer, "1")["format_reward"] == 0.0
    assert time.perf_counter() - start < 1.5


ROUND_TWO_INPUTS = {
    "relation chain": "x<" * 20_000 + "1",
    "relation or-chain": " or ".join(["x<1"] * 20_000),
    "or list": " or ".join(["1"] * 50_000),
    "tuple list": "(1,2)," * 50_000,
    "ratio chain": "1:" * 50_000 + "1",
    "set builder": "\\{x \\mid " * 20_000,
    "setminus chain": "\\setminus".join(["\\mathbb{R}"] * 20_000),
    "dollar run": "$" * 200_000,
    "marker run": "is " * 200_000 + "5",
    "sentence run": "The answer is 5. " * 50_000,
    "log base chain": "\\log_" * 20_000 + "2",
    "function power chain": "\\sin^" * 20_000 + "2",
    "joined boxes": "\\boxed{1} and " * 50_000,
    "huge ratio": "10^{1000}:10^{999}",
    "deep tuples": "(" * 5_000 + "1,2" + ")" * 5_000,
}


@pytest.mark.parametrize("name", list(ROUND_TWO_INPUTS))
def test_round_two_readings_stay_bounded_on_hostile_answers(name):
    # Relations, several answers, ratios and prose are new ways to read an answer; each must
    # still refuse or answer fast, never run, and never call any of these equal to 1.
    answer = ROUND_TWO_INPUTS[name]
    start = time.perf_counter()
    assert r1_zero_reward_fn(wrap(answer), "1")["answer_reward"] == 0.0
    assert question_only_reward_fn(answer, "1")["answer_reward"] == 0.0
    assert time.perf_counter() - start < 1.5


def test_moderate_nesting_below_the_caps_still_grades():
    # 30 levels of parentheses around 1 is 1 (hand check: parentheses do not change a value).
    assert r1_zero_reward_fn(wrap("(" * 30 + "1" + ")" * 30), "1")["answer_reward"] == 1.0
    # 20 nested \sqrt{1} is 1.
    assert r1_zero_reward_fn(wrap("\\sqrt{" * 20 + "1" + "}" * 20), "1")["answer_reward"] == 1.0


def test_answers_past_the_length_cap_are_refused():
    assert parse_answer("1" * 2001).kind == "refused"
    assert parse_answer("1" * 300).kind == "expr"


def test_the_package_never_calls_a_string_evaluator():
    forbidden = re.compile(r"(?<!\w)(eval|exec)\(|(sympify|parse_expr|parse_latex)\(")
    for path in PACKAGE.glob("*.py"):
        assert not forbidden.search(path.read_text()), path
        assert not re.search(r"^\s*(import|from) torch", path.read_text(), re.M), path


def _modules_loaded() -> tuple[bool, bool]:
    import sys

    return "torch" in sys.modules, "sympy" in sys.modules


def test_worker_process_has_sympy_but_not_torch():
    status, value = sandbox.run_bounded(_modules_loaded, (), timeout=5.0)
    assert status == "ok"
    assert value == (False, True)
