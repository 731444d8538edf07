"""Rewards: answer extraction, normalisation, equivalence and bounded, parallel grading.

Model output is untrusted: nothing here hands it to a code evaluator or to sympy's string
parsers; expressions are read by a small hand-written parser (``parse``), compared exactly,
and symbolic simplification runs only in worker processes with a time and memory limit.
This package does not import torch.
"""

from reasontune.rewards.batch import GradedBatch, grade_batch
from reasontune.rewards.equivalence import Answer, answers_match, parse_answer
from reasontune.rewards.extract import (
    extract_boxed_answer,
    extract_gsm8k_answer,
    extract_math_answer,
    extract_r1_zero_answer,
)
from reasontune.rewards.grading import (
    answers_equivalent,
    extract_final_answer,
    grade_answer,
    question_only_reward_fn,
    r1_zero_reward_fn,
)
from reasontune.rewards.normalize import normalize_answer

__all__ = [
    "Answer",
    "answers_equivalent",
    "GradedBatch",
    "answers_match",
    "extract_boxed_answer",
    "extract_final_answer",
    "extract_gsm8k_answer",
    "extract_math_answer",
    "extract_r1_zero_answer",
    "grade_answer",
    "grade_batch",
    "normalize_answer",
    "parse_answer",
    "question_only_reward_fn",
    "r1_zero_reward_fn",
]
