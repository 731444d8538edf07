"""Prints the markdown table of a recipe run: stage, minutes, load, CPU minutes, accuracy [95% interval], paired p, format rate, mean response tokens.

    python3 examples/recipes/recipe_table.py runs/smollm2-gsm8k

Reads what examples/recipes/smollm2_gsm8k.sh wrote under the run directory: ``minutes.tsv``
(wall-clock minutes of each stage, the machine's mean 1-minute load average during it and the
user + system CPU minutes of the stage's processes: on a shared machine the CPU minutes are the
figure that does not grow with the others' load),
``eval-<stage>/summary.json`` (accuracy with its 95% interval over questions (Wilson score for
0/1 scores), format rate, mean response tokens) and
``compare-<a>-<b>/comparison.json`` (the paired difference of consecutive stages and its
p-value, and each stage's interval recomputed from its records: it is preferred to the one in
summary.json). Stages without results yet are listed as not run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

EVALUATED = (("zero-shot", None), ("sft", "zero-shot"), ("grpo", "sft"))
TRAINED = {"sft", "grpo"}


def read_minutes(runs: Path) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    """Returns ({stage: minutes}, {stage: mean load average}, {stage: CPU minutes}) from minutes.tsv.

    An interrupted and resumed stage has one line per part: minutes and CPU minutes are summed,
    loads averaged weighted by minutes. Lines without a load or CPU column (older runs) count
    for minutes only; a stage with such a line has no CPU total.
    """
    minutes: dict[str, float] = {}
    load_minutes: dict[str, float] = {}
    loaded: dict[str, float] = {}
    cpu: dict[str, float] = {}
    cpu_missing: set[str] = set()
    path = runs / "minutes.tsv"
    if path.exists():
        for line in path.read_text().splitlines():
            stage, value, *rest = line.split("\t")
            minutes[stage] = minutes.get(stage, 0.0) + float(value)
            if rest:
                load_minutes[stage] = load_minutes.get(stage, 0.0) + float(value) * float(rest[0])
                loaded[stage] = loaded.get(stage, 0.0) + float(value)
            if len(rest) > 1:
                cpu[stage] = cpu.get(stage, 0.0) + float(rest[1])
            else:
                cpu_missing.add(stage)
    loads = {stage: load_minutes[stage] / loaded[stage] for stage in load_minutes if loaded[stage] > 0}
    return minutes, loads, {stage: value for stage, value in cpu.items() if stage not in cpu_missing}


def percent(figure: dict[str, float]) -> str:
    return f"{100 * figure['value']:.1f} [{100 * figure['low']:.1f}, {100 * figure['high']:.1f}]"


def table(runs: Path) -> str:
    """Returns the markdown table of ``runs``."""
    minutes, loads, cpu = read_minutes(runs)
    lines = ["| stage | minutes | load | CPU minutes | accuracy % [95% CI] | vs previous stage (paired p) | format rate % | mean response tokens |",
             "|---|---|---|---|---|---|---|---|"]

    def timing(stage: str) -> str:
        spent = f"{minutes[stage]:.1f}" if stage in minutes else "?"
        load = f"{loads[stage]:.1f}" if stage in loads else ""
        used = f"{cpu[stage]:.1f}" if stage in cpu else ""
        return f"{spent} | {load} | {used}"

    # The comparisons recompute each stage's interval from its records with the current
    # estimator (Wilson score for 0/1 scores); summary.json holds the one of its eval run.
    intervals: dict[str, dict[str, float]] = {}
    for stage, previous in EVALUATED:
        comparison = runs / f"compare-{previous}-{stage}" / "comparison.json"
        if previous and comparison.exists():
            values = json.loads(comparison.read_text())["rows"][0]["values"]
            intervals.setdefault(previous, values[0])
            intervals[stage] = values[1]
    for stage, previous in EVALUATED:
        if stage in TRAINED:
            lines.append(f"| {stage} training | {timing(stage)} | | | | |" if stage in minutes
                         else f"| {stage} training | not run | | | | | | |")
        summary_path = runs / f"eval-{stage}" / "summary.json"
        if not summary_path.exists():
            lines.append(f"| eval {stage} | not run | | | | | | |")
            continue
        summary = json.loads(summary_path.read_text())
        accuracy = intervals.get(stage, summary["estimates"]["metrics"]["pass@1"])
        versus = ""
        comparison = runs / f"compare-{previous}-{stage}" / "comparison.json"
        if previous and comparison.exists():
            difference = json.loads(comparison.read_text())["rows"][0]["differences"][0]
            versus = (f"{100 * difference['difference']:+.1f} [{100 * difference['low']:+.1f}, "
                      f"{100 * difference['high']:+.1f}] (p {difference['p_value']:.3f})")
        lines.append(f"| eval {stage} | {timing(f'eval-{stage}')} | {percent(accuracy)} | {versus} | "
                     f"{100 * summary['format_rate']:.1f} | {summary['mean_response_tokens']:.1f} |")
    total = sum(minutes.values())
    cpu_total = f"; CPU: {sum(cpu.values()):.1f} minutes" if cpu and set(cpu) == set(minutes) else ""
    lines.append(f"\nTotal wall-clock: {total:.1f} minutes{cpu_total}; {summary_questions(runs)} test questions per evaluation; "
                 "load: the machine's mean 1-minute load average during the stage (2 cores); "
                 "CPU minutes: user + system time of the stage's processes.")
    return "\n".join(lines)


def summary_questions(runs: Path) -> str:
    path = runs / "eval-zero-shot" / "summary.json"
    return str(json.loads(path.read_text())["n_examples"]) if path.exists() else "?"


if __name__ == "__main__":
    if len(sys.argv) != 2 or not Path(sys.argv[1]).is_dir():
        sys.exit("usage: python3 examples/recipes/recipe_table.py RUNS_DIR")
    print(table(Path(sys.argv[1])))
