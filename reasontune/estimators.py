"""Sampling estimators of reasoning benchmarks: pass@k, maj@k, avg@k, bootstrap intervals, paired p-values.

Everything here is a pure function of per-sample outcomes (numpy, no torch, no I/O); answers are
compared with the grader's ``answers_equivalent`` unless another function is given.

Definitions, for one question with ``n`` samples of which ``c`` are correct:

- **pass@k** is the probability that at least one of ``k`` samples is correct, estimated without
  bias from all ``n`` samples (Chen et al., 2021, "Evaluating Large Language Models Trained on
  Code", eq. 1): ``1 - C(n-c, k) / C(n, k)``, computed in the numerically stable product form
  ``1 - prod_{i=n-c+1..n} (1 - k / i)`` (their Figure 3). A plain "any of the n correct" is the
  biased special case k = n.
- **maj@k** (majority vote, Wang et al., 2022 "self-consistency"; Lewkowycz et al., 2022
  "Minerva", maj1@k) is 1 when the answer most of the *first* ``k`` samples agree on is correct.
  Answers are clustered by an ``equivalent(a, b)`` function (the grader's, so ``1/2`` and ``0.5``
  are one vote); a sample without an answer (None) never votes; a tie goes to the cluster whose
  first member came earliest. Why the first k when n > k: samples are i.i.d., so any fixed
  k-subset is an unbiased estimate of the population maj@k; averaging over all C(n, k) subsets
  would only lower the variance (Rao-Blackwell) and has no closed form for votes over arbitrary
  clusters. The first k is also exactly what a reader reproduces with ``n = k``; use n = max k
  for the headline figure.
- **avg@k** is the mean accuracy of the first ``k`` samples (DeepSeek-R1's "pass@1 averaged over
  k samples"). Its expectation does not depend on k; k says how many samples went in.

A figure is the mean over questions of a per-question value. Its 95% interval depends on what
the values are:

- **0/1 per question** (pass@1 with one sample, the common case, and maj@k): the Wilson score
  interval (Wilson, 1927), which stays honest at 0 and 1: 0 correct of 200 is [0, 1.9]%, where
  a bootstrap of 200 zeros says [0, 0]. Two runs on the same questions: the exact McNemar test
  (a two-sided binomial test on the discordant questions; McNemar, 1947) for the p-value and
  Newcombe's hybrid score interval for the paired difference (Newcombe, 1998, method 10).
- **fractions** (pass@k, avg@k from several samples): the percentile bootstrap over questions
  (Efron & Tibshirani, 1993), seeded; two runs by the paired bootstrap over questions (Koehn,
  2004; Berg-Kirkpatrick et al., 2012).

``proportion_interval`` and ``paired_difference`` choose; each result says which it used.
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from reasontune.rewards import answers_equivalent

Equivalent = Callable[[str, str], bool]
METRICS = ("pass", "maj", "avg")


def exact_equivalent(left: str, right: str) -> bool:
    """Returns whether two answers are the same string after stripping surrounding whitespace."""
    return left.strip() == right.strip()


def default_equivalent() -> Equivalent:
    """Returns the grader's ``answers_equivalent``: votes count ``1/2`` and ``0.5`` as one answer, with the grading policy's bounds."""
    return answers_equivalent


# ---------------------------------------------------------------------------------------------
# Per-question estimators


def pass_at_k(n: int, c: int, k: int) -> float:
    """Returns the unbiased pass@k of one question with ``n`` samples, ``c`` correct (Chen et al., 2021)."""
    if not 0 <= c <= n or k < 1:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and k >= 1; got n={n}, c={c}, k={k}")
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per question, got {n}")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    # 1 - C(n-c, k)/C(n, k) = 1 - prod_{i=n-c+1..n} (1 - k/i): no huge binomials, no cancellation.
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def avg_at_k(correct: Sequence[bool], k: int) -> float:
    """Returns the fraction of the first ``k`` samples that are correct."""
    if k < 1 or k > len(correct):
        raise ValueError(f"avg@{k} needs 1 <= k <= the {len(correct)} samples of the question")
    return sum(bool(x) for x in correct[:k]) / k


def vote(answers: Sequence[str | None], equivalent: Equivalent | None = None) -> int | None:
    """Returns the index of the sample whose answer wins the majority vote, or None when no sample has an answer.

    Answers are clustered greedily: each answer joins the first cluster whose first member it is
    ``equivalent`` to (default: the grader's ``answers_equivalent``), else starts a new one. The largest
    cluster wins; among equally large clusters, the one whose first member came earliest. The
    returned index is that first member's.
    """
    equivalent = equivalent or answers_equivalent
    representatives: list[int] = []  # index of each cluster's first member
    sizes: list[int] = []
    for index, answer in enumerate(answers):
        if answer is None:
            continue
        for cluster, first in enumerate(representatives):
            if equivalent(answer, answers[first]):  # type: ignore[arg-type]
                sizes[cluster] += 1
                break
        else:
            representatives.append(index)
            sizes.append(1)
    if not sizes:
        return None
    # max() returns the first maximum: clusters are in order of their first member, so ties go to the earliest.
    best = max(range(len(sizes)), key=lambda cluster: sizes[cluster])
    return representatives[best]


def maj_at_k(answers: Sequence[str | None], correct: Sequence[bool], k: int,
             equivalent: Equivalent | None = None) -> float:
    """Returns 1.0 when the majority answer of the first ``k`` samples is correct, else 0.0.

    The winning cluster is correct when its first member was graded correct (the grader, not
    the clustering, decides correctness). No answer among the first k scores 0.
    """
    if len(answers) != len(correct):
        raise ValueError(f"maj@k: {len(answers)} answers but {len(correct)} correctness flags")
    if k < 1 or k > len(answers):
        raise ValueError(f"maj@{k} needs 1 <= k <= the {len(answers)} samples of the question")
    winner = vote(answers[:k], equivalent)
    return float(winner is not None and bool(correct[winner]))


def question_scores(metric: str, k: int, correct: Sequence[Sequence[bool]],
                    answers: Sequence[Sequence[str | None]] | None = None,
                    equivalent: Equivalent | None = None) -> np.ndarray:
    """Returns the per-question values of ``metric@k`` (``metric`` in pass, maj, avg), shape (questions,) float64.

    ``correct[q][s]`` says whether sample ``s`` of question ``q`` is correct; ``answers[q][s]``
    is its extracted answer (needed for maj only).
    """
    if metric == "pass":
        return np.array([pass_at_k(len(flags), sum(bool(f) for f in flags), k) for flags in correct])
    if metric == "avg":
        return np.array([avg_at_k(flags, k) for flags in correct])
    if metric == "maj":
        if answers is None:
            raise ValueError("maj@k needs the extracted answer of every sample")
        return np.array([maj_at_k(a, flags, k, equivalent) for a, flags in zip(answers, correct, strict=True)])
    raise ValueError(f"unknown metric {metric!r}; expected one of {', '.join(METRICS)}")


# ---------------------------------------------------------------------------------------------
# Bootstrap over questions


def _resampled_means(values: np.ndarray, n_bootstrap: int, seed: int, chunk: int = 1000) -> np.ndarray:
    """Returns the means of ``n_bootstrap`` resamples (with replacement) of ``values``, shape (n_bootstrap,) float64."""
    rng = np.random.default_rng(seed)
    means = np.empty(n_bootstrap, dtype=np.float64)
    for start in range(0, n_bootstrap, chunk):  # bounded memory: chunk × questions indices at a time
        count = min(chunk, n_bootstrap - start)
        indices = rng.integers(0, len(values), size=(count, len(values)))
        means[start:start + count] = values[indices].mean(axis=1)
    return means


def bootstrap_interval(values: Sequence[float] | np.ndarray, n_bootstrap: int = 1000, seed: int = 0,
                       confidence: float = 0.95) -> tuple[float, float]:
    """Returns the (low, high) percentile-bootstrap interval of the mean of per-question ``values`` (shape (questions,)).

    Questions are resampled with replacement ``n_bootstrap`` times with ``numpy.random.default_rng(seed)``.
    """
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"bootstrap_interval needs a non-empty 1-D array of per-question values, got shape {array.shape}")
    if n_bootstrap < 1 or not 0.0 < confidence < 1.0:
        raise ValueError(f"need n_bootstrap >= 1 and 0 < confidence < 1; got {n_bootstrap}, {confidence}")
    means = _resampled_means(array, n_bootstrap, seed)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return float(low), float(high)


def paired_bootstrap(values_a: Sequence[float] | np.ndarray, values_b: Sequence[float] | np.ndarray,
                     n_bootstrap: int = 1000, seed: int = 0, confidence: float = 0.95) -> dict[str, float]:
    """Returns ``{"difference", "low", "high", "p_value"}`` for mean(b) - mean(a) over the same questions.

    ``values_a[q]`` and ``values_b[q]`` are two runs' scores on question q (shape (questions,)).
    The per-question differences are resampled together (paired). The two-sided p-value tests
    "no difference" by shifting the bootstrap distribution to the null (Berg-Kirkpatrick et
    al., 2012): the share of resampled mean differences at least |observed| away from the
    observed one, counted as (1 + hits) / (1 + n_bootstrap) so it is never exactly 0.
    Identical runs give p = 1.
    """
    a = np.asarray(values_a, dtype=np.float64)
    b = np.asarray(values_b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"paired_bootstrap needs two equal-length non-empty 1-D arrays, got {a.shape} and {b.shape}")
    differences = b - a
    observed = float(differences.mean())
    means = _resampled_means(differences, n_bootstrap, seed)
    # A tolerance so that float noise in the means of identical data is not read as a difference.
    hits = int(np.sum(np.abs(means - observed) >= abs(observed) - 1e-12))
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return {"difference": observed, "low": float(low), "high": float(high),
            "p_value": (1 + hits) / (1 + n_bootstrap)}


WILSON = "Wilson score"
BOOTSTRAP = "percentile bootstrap"
MCNEMAR = "exact McNemar"
PAIRED_BOOTSTRAP = "paired bootstrap"
NEWCOMBE = "Newcombe hybrid score"


def _z(confidence: float) -> float:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"need 0 < confidence < 1; got {confidence}")
    return NormalDist().inv_cdf(0.5 + confidence / 2.0)


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Returns the (low, high) Wilson score interval of a binomial proportion ``successes / n``.

    ``center ± z·sqrt(p(1-p)/n + z²/4n²)`` with ``center = (p + z²/2n) / (1 + z²/n)``, all over
    ``1 + z²/n``; it never leaves [0, 1] and is not empty at 0 or n successes.
    """
    if n < 1 or not 0 <= successes <= n:
        raise ValueError(f"wilson_interval needs 0 <= successes <= n and n >= 1; got {successes} of {n}")
    z = _z(confidence)
    p = successes / n
    scale = 1.0 + z * z / n
    center = (p + z * z / (2 * n)) / scale
    half = z * math.sqrt(p * (1.0 - p) / n + z * z / (4 * n * n)) / scale
    # At 0 or n successes the bound is exactly 0 or 1; rounding must not move it past.
    low = 0.0 if successes == 0 else max(0.0, center - half)
    high = 1.0 if successes == n else min(1.0, center + half)
    return low, high


def _is_binary(values: np.ndarray) -> bool:
    return bool(np.all((values == 0.0) | (values == 1.0)))


def proportion_interval(values: Sequence[float] | np.ndarray, n_bootstrap: int = 1000, seed: int = 0,
                        confidence: float = 0.95) -> tuple[float, float, str]:
    """Returns (low, high, method) of the mean of per-question ``values`` (shape (questions,)).

    All values 0 or 1: the Wilson score interval (``WILSON``); otherwise the seeded percentile
    bootstrap over questions (``BOOTSTRAP``).
    """
    array = np.asarray(values, dtype=np.float64)
    if array.ndim == 1 and array.size and _is_binary(array):
        return (*wilson_interval(int(array.sum()), array.size, confidence), WILSON)
    return (*bootstrap_interval(array, n_bootstrap, seed, confidence), BOOTSTRAP)


def mcnemar_exact_p(only_first: int, only_second: int) -> float:
    """Returns the two-sided exact McNemar p-value for ``only_first`` and ``only_second`` discordant pairs.

    Under "no difference" each of the ``m = only_first + only_second`` discordant questions goes
    either way with probability 1/2, so the smaller count is Binomial(m, 1/2): the p-value is
    ``min(1, 2 · P(X <= min))``, computed in exact integers. No discordant question: p = 1.
    """
    if only_first < 0 or only_second < 0:
        raise ValueError(f"discordant counts must be >= 0; got {only_first}, {only_second}")
    m = only_first + only_second
    if m == 0:
        return 1.0
    smaller = min(only_first, only_second)
    tail = sum(math.comb(m, i) for i in range(smaller + 1))
    return min(1.0, 2 * tail / 2 ** m)


def newcombe_paired_interval(values_a: np.ndarray, values_b: np.ndarray,
                             confidence: float = 0.95) -> tuple[float, float]:
    """Returns the (low, high) interval of mean(b) - mean(a) for paired 0/1 values (Newcombe, 1998, method 10).

    With Wilson intervals (l1, u1) of p1 = mean(a) and (l2, u2) of p2 = mean(b), the difference
    d = p2 - p1 and the phi coefficient φ of the 2×2 table of (a, b) pairs (0 when a margin is
    empty): low = d - sqrt((p2-l2)² - 2φ(p2-l2)(u1-p1) + (u1-p1)²) and
    high = d + sqrt((u2-p2)² - 2φ(u2-p2)(p1-l1) + (p1-l1)²).
    """
    n = values_a.size
    both = int(np.sum((values_a == 1.0) & (values_b == 1.0)))
    only_a = int(np.sum((values_a == 1.0) & (values_b == 0.0)))
    only_b = int(np.sum((values_a == 0.0) & (values_b == 1.0)))
    neither = n - both - only_a - only_b
    p1, p2 = (both + only_a) / n, (both + only_b) / n
    l1, u1 = wilson_interval(both + only_a, n, confidence)
    l2, u2 = wilson_interval(both + only_b, n, confidence)
    margins = (both + only_a) * (only_b + neither) * (both + only_b) * (only_a + neither)
    phi = (both * neither - only_a * only_b) / math.sqrt(margins) if margins else 0.0
    difference = p2 - p1
    below = (p2 - l2) ** 2 - 2 * phi * (p2 - l2) * (u1 - p1) + (u1 - p1) ** 2
    above = (u2 - p2) ** 2 - 2 * phi * (u2 - p2) * (p1 - l1) + (p1 - l1) ** 2
    return max(-1.0, difference - math.sqrt(max(below, 0.0))), min(1.0, difference + math.sqrt(max(above, 0.0)))


def paired_difference(values_a: Sequence[float] | np.ndarray, values_b: Sequence[float] | np.ndarray,
                      n_bootstrap: int = 1000, seed: int = 0, confidence: float = 0.95) -> dict[str, Any]:
    """Returns ``{"difference", "low", "high", "p_value", "method"}`` for mean(b) - mean(a) over the same questions.

    Both runs 0/1 per question: Newcombe's interval and the exact McNemar p-value (``method``
    ``"exact McNemar"``); otherwise ``paired_bootstrap`` (``"paired bootstrap"``).
    """
    a = np.asarray(values_a, dtype=np.float64)
    b = np.asarray(values_b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"paired_difference needs two equal-length non-empty 1-D arrays, got {a.shape} and {b.shape}")
    if not (_is_binary(a) and _is_binary(b)):
        return {**paired_bootstrap(a, b, n_bootstrap, seed, confidence), "method": PAIRED_BOOTSTRAP}
    low, high = newcombe_paired_interval(a, b, confidence)
    only_a = int(np.sum((a == 1.0) & (b == 0.0)))
    only_b = int(np.sum((a == 0.0) & (b == 1.0)))
    return {"difference": float(b.mean() - a.mean()), "low": low, "high": high,
            "p_value": mcnemar_exact_p(only_a, only_b), "method": MCNEMAR}


# ---------------------------------------------------------------------------------------------
# Records → figures


def question_key(record: Mapping[str, Any]) -> str:
    """Returns the key that identifies a record's question across runs: ``question_id``, else the prompt text."""
    if record.get("question_id") is not None:
        return str(record["question_id"])
    if record.get("prompt") is not None:
        return str(record["prompt"])
    raise ValueError(f"record of question {record.get('index')!r} has neither 'question_id' nor 'prompt'")


def group_samples(records: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, list]]:
    """Returns ``{question key: {"correct": [bool], "answers": [str | None]}}``, samples in ``sample`` order.

    Correct means ``answer_reward >= 1``. Questions keep the order of their first record.
    """
    grouped: dict[str, list[Mapping[str, Any]]] = {}
    for record in records:
        grouped.setdefault(question_key(record), []).append(record)
    result = {}
    for key, samples in grouped.items():
        samples = sorted(samples, key=lambda r: r.get("sample", 0))
        result[key] = {"correct": [float(r["answer_reward"]) >= 1.0 for r in samples],
                       "answers": [r.get("answer") for r in samples],
                       "has_answers": all("answer" in r for r in samples)}
    return result


def scores_by_question(records: Iterable[Mapping[str, Any]], metric: str, k: int,
                       equivalent: Equivalent | None = None) -> dict[str, float]:
    """Returns ``{question key: metric@k}`` for one run's records (every question needs at least k samples)."""
    grouped = group_samples(records)
    too_few = [key for key, g in grouped.items() if len(g["correct"]) < k]
    if too_few:
        raise ValueError(f"{metric}@{k} needs {k} samples per question; {len(too_few)} question(s) have fewer "
                         f"(first: {too_few[0][:80]!r} with {len(grouped[too_few[0]]['correct'])})")
    if metric == "maj" and not all(g["has_answers"] for g in grouped.values()):
        raise ValueError("maj@k needs an extracted 'answer' field in every record")
    values = question_scores(metric, k, [g["correct"] for g in grouped.values()],
                             [g["answers"] for g in grouped.values()], equivalent)
    return dict(zip(grouped, values.tolist()))


def parse_ks(text: str | Sequence[int]) -> list[int]:
    """Returns the sorted distinct k values of ``"1,4,16"`` (or of a list of ints); each must be >= 1."""
    values = [int(part) for part in text.split(",") if part.strip()] if isinstance(text, str) else list(text)
    if not values or any(k < 1 for k in values):
        raise ValueError(f"k values must be integers >= 1, got {text!r}")
    return sorted(set(values))


def summarize_samples(records: Sequence[Mapping[str, Any]], ks: Sequence[int] = (1,), n_bootstrap: int = 1000,
                      seed: int = 0, equivalent: Equivalent | None = None, *, n_samples: int | None = None,
                      temperature: float | None = None, prompt: str | None = None,
                      confidence: float = 0.95) -> dict[str, Any]:
    """Returns pass@k / maj@k / avg@k of one benchmark's records, each ``{"value", "low", "high"}``, plus the settings.

    ``records`` are ``reasontune eval``'s per-sample records (``answer_reward``, ``sample``,
    ``question_id`` or ``prompt``; ``answer`` for maj@k); ``equivalent`` clusters answers for
    maj@k (default: ``default_equivalent()``). Each k must not exceed the samples per
    question. maj@k is left out (with ``"maj_missing"`` saying why) when records carry no
    ``answer``. ``n_samples``, ``temperature`` and ``prompt`` are stored beside the figures so a
    table always shows how they were made; ``n_samples`` is checked against the records.
    """
    if not records:
        raise ValueError("summarize_samples: no records")
    equivalent = equivalent or default_equivalent()
    grouped = group_samples(records)
    counts = sorted({len(g["correct"]) for g in grouped.values()})
    if len(counts) != 1:
        raise ValueError(f"questions have different sample counts {counts}; every question needs the same n")
    n = counts[0]
    if n_samples is not None and n_samples != n:
        raise ValueError(f"n_samples={n_samples} was passed but the records hold {n} samples per question")
    ks = parse_ks(ks)
    if ks[-1] > n:
        raise ValueError(f"k={ks[-1]} exceeds the {n} samples per question; use --n-samples >= {ks[-1]}")
    correct = [g["correct"] for g in grouped.values()]
    answers = [g["answers"] for g in grouped.values()]
    has_answers = all(g["has_answers"] for g in grouped.values())
    metrics: dict[str, dict[str, float]] = {}
    for k in ks:
        for metric in METRICS:
            if metric == "maj" and not has_answers:
                continue
            values = question_scores(metric, k, correct, answers, equivalent)
            low, high, method = proportion_interval(values, n_bootstrap, seed, confidence)
            metrics[f"{metric}@{k}"] = {"value": float(values.mean()), "low": low, "high": high, "method": method}
    summary: dict[str, Any] = {
        "n_questions": len(grouped), "n_samples": n, "ks": ks, "metrics": metrics,
        "temperature": temperature, "prompt": prompt, "seed": seed,
        "n_bootstrap": n_bootstrap, "confidence": confidence,
        "interval": "Wilson score for 0/1 per-question scores, else percentile bootstrap over questions",
    }
    if not has_answers:
        summary["maj_missing"] = "records carry no extracted 'answer' field"
    return summary


def _format_figure(figure: Mapping[str, float]) -> str:
    return f"{100 * figure['value']:.1f} [{100 * figure['low']:.1f}, {100 * figure['high']:.1f}]"


def _short_prompt(prompt: str | None, limit: int = 40) -> str:
    """Returns a prompt name or template shortened to one table cell."""
    text = str(prompt).replace("\n", "\\n").replace("|", "\\|")
    return text if len(text) <= limit else text[:limit - 3] + "..."


def results_table(per_benchmark: Mapping[str, Mapping[str, Any]]) -> tuple[str, dict[str, Any]]:
    """Returns (markdown table, JSON-able dict) of ``summarize_samples`` results keyed by benchmark name.

    Rows are benchmarks, columns every metric any benchmark has (``-`` where one lacks it), in
    percent with the 95% interval; the settings (questions, n, temperature, seed, prompt) sit
    in the row, as a reviewer asks.
    """
    columns: list[str] = []
    for summary in per_benchmark.values():
        for name in summary["metrics"]:
            if name not in columns:
                columns.append(name)
    columns.sort(key=lambda name: (int(name.split("@")[1]), METRICS.index(name.split("@")[0])))
    header = ["benchmark", "questions", "n", *columns, "temperature", "seed", "prompt"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for name, summary in per_benchmark.items():
        cells = [name, str(summary["n_questions"]), str(summary["n_samples"])]
        cells += [_format_figure(summary["metrics"][c]) if c in summary["metrics"] else "-" for c in columns]
        cells += [str(summary.get("temperature")), str(summary.get("seed")), _short_prompt(summary.get("prompt"))]
        lines.append("| " + " | ".join(cells) + " |")
    confidences = {summary.get("confidence", 0.95) for summary in per_benchmark.values()}
    note = (f"\nFigures in percent; brackets: {', '.join(f'{100 * c:g}%' for c in sorted(confidences))} "
            f"interval over questions: Wilson score where every question scores 0 or 1, else percentile "
            f"bootstrap. pass@k: unbiased estimator (Chen et al., 2021); "
            f"maj@k, avg@k: first k samples per question.\n")
    markdown = "\n".join(lines) + "\n" + note
    as_json = {"columns": columns, "benchmarks": {name: dict(summary) for name, summary in per_benchmark.items()}}
    return markdown, as_json


def format_p_value(p_value: float) -> str:
    """Returns a p-value as text: three decimals, or ``<0.001``."""
    return "<0.001" if p_value < 0.001 else f"{p_value:.3f}"

