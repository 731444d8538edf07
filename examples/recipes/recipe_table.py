"""Prints the markdown table of a recipe run: stage, minutes, accuracy [95% interval], format rate, mean response tokens.

    python3 examples/recipes/recipe_table.py runs/smollm2-gsm8k

Reads what examples/recipes/smollm2_gsm8k.sh wrote under the run directory: ``minutes.tsv``
(wall-clock minutes of each stage), ``eval-<stage>/summary.json`` (accuracy with its
percentile-bootstrap interval over questions, format rate, mean response tokens) and
``compare-<a>-<b>/comparison.json`` (the paired difference of consecutive stages and its
p-value). Stages without results yet are listed as not run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

EVALUATED = (("zero-shot", None), ("sft", "zero-shot"), ("grpo", "sft"))
TRAINED = {"sft", "grpo"}


def read_minutes(runs: Path) -> dict[str, float]:
    """Returns {stage: minutes} from minutes.tsv (an interrupted and resumed stage has one line per part; they are summed)."""
    minutes: dict[str, float] = {}
    path = runs / "minutes.tsv"
    if path.exists():
        for line in path.read_text().splitlines():
            stage, value = line.split("\t")
            minutes[stage] = minutes.get(stage, 0.0) + float(value)
    return minutes


def percent(figure: dict[str, float]) -> str:
    return f"{100 * figure['value']:.1f} [{100 * figure['low']:.1f}, {100 * figure['high']:.1f}]"


def table(runs: Path) -> str:
    """Returns the markdown table of ``runs``."""
    minutes = read_minutes(runs)
    lines = ["| stage | minutes | accuracy % [95% CI] | vs previous stage (paired p) | format rate % | mean response tokens |",
             "|---|---|---|---|---|---|"]
    for stage, previous in EVALUATED:
        if stage in TRAINED:
            trained = minutes.get(stage)
            lines.append(f"| {stage} training | {trained:.1f} | | | | |" if trained is not None
                         else f"| {stage} training | not run | | | | |")
        summary_path = runs / f"eval-{stage}" / "summary.json"
        if not summary_path.exists():
            lines.append(f"| eval {stage} | not run | | | | |")
            continue
        summary = json.loads(summary_path.read_text())
        accuracy = summary["estimates"]["metrics"]["pass@1"]
        versus = ""
        comparison = runs / f"compare-{previous}-{stage}" / "comparison.json"
        if previous and comparison.exists():
            difference = json.loads(comparison.read_text())["rows"][0]["differences"][0]
            versus = (f"{100 * difference['difference']:+.1f} [{100 * difference['low']:+.1f}, "
                      f"{100 * difference['high']:+.1f}] (p {difference['p_value']:.3f})")
        eval_minutes = minutes.get(f"eval-{stage}")
        lines.append(f"| eval {stage} | {eval_minutes:.1f} | {percent(accuracy)} | {versus} | "
                     f"{100 * summary['format_rate']:.1f} | {summary['mean_response_tokens']:.1f} |"
                     if eval_minutes is not None else
                     f"| eval {stage} | ? | {percent(accuracy)} | {versus} | {100 * summary['format_rate']:.1f} | "
                     f"{summary['mean_response_tokens']:.1f} |")
    total = sum(minutes.values())
    lines.append(f"\nTotal wall-clock: {total:.1f} minutes; {summary_questions(runs)} test questions per evaluation.")
    return "\n".join(lines)


def summary_questions(runs: Path) -> str:
    path = runs / "eval-zero-shot" / "summary.json"
    return str(json.loads(path.read_text())["n_examples"]) if path.exists() else "?"


if __name__ == "__main__":
    if len(sys.argv) != 2 or not Path(sys.argv[1]).is_dir():
        sys.exit("usage: python3 examples/recipes/recipe_table.py RUNS_DIR")
    print(table(Path(sys.argv[1])))
