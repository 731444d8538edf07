"""Writes GSM8K questions as prompt records with compact R1-Zero SFT targets: the solution's equations only.

A GSM8K solution's calculator annotations (``<<48/2=24>>``) hold every computation of its
worked steps. The compact target keeps those equations, one a line, and drops the sentences
around them::

    48/2=24
    48+24=72 </think> <answer>72</answer>

On SmolLM2's tokenizer this is 42 response tokens on average against 98 for the full solution
without its annotations (measured over the first 2,000 training examples), so an SFT step
trains on shorter sequences and the model learns to reach ``</answer>`` sooner. A solution
with no annotation keeps its sentences (``reasontune.data.split_gsm8k_solution``).

Each output line is ``{"prompt", "response", "ground_truth"}``: the prompt is the question
rendered with the recipe's prompt template, so ``reasontune sft``/``grpo``/``expert-iteration``
use it as it is. ``--max-equations N`` keeps only the questions whose solution has at most N
equations (the one- and two-step questions: easier training questions for the RL stage).

    python3 examples/recipes/compact_traces.py GSM8K/train.jsonl out.jsonl \
        --prompt-template examples/recipes/smollm2_r1_zero_chat.prompt [--max-equations 2]

Skipped lines (no ``####`` answer, or over ``--max-equations``) are counted on stderr.
"""

from __future__ import annotations

import argparse
import json
import re
import sys

from reasontune.data import format_prompt, load_template, r1_zero_target, split_gsm8k_solution

ANNOTATION = re.compile(r"<<([^<>]*)>>")


def equations(solution: str) -> list[str]:
    """Returns the calculator annotations of a GSM8K solution, in order, without their ``<< >>``."""
    return [equation.strip() for equation in ANNOTATION.findall(solution.rpartition("####")[0])]


def compact_target(solution: str) -> str | None:
    """Returns the compact R1-Zero target of a GSM8K solution, or None when it has no ``####`` answer."""
    split = split_gsm8k_solution(solution)
    if split is None:
        return None
    reasoning, answer = split
    steps = equations(solution)
    return r1_zero_target("\n".join(steps) if steps else reasoning, answer)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("gsm8k", help="GSM8K JSONL: {'question', 'answer': '... #### N'}")
    parser.add_argument("output", help="JSONL to write: {'prompt', 'response', 'ground_truth'}")
    parser.add_argument("--prompt-template", required=True, help="template file containing {question}")
    parser.add_argument("--max-equations", type=int, default=None,
                        help="keep only questions whose solution has at most this many equations")
    args = parser.parse_args(argv)

    template = load_template(args.prompt_template)
    written = no_answer = too_long = 0
    with open(args.gsm8k) as source, open(args.output, "w") as out:
        for line_number, line in enumerate(source, start=1):
            if not line.strip():
                continue
            record = json.loads(line)
            if not isinstance(record.get("question"), str) or not isinstance(record.get("answer"), str):
                raise SystemExit(f"{args.gsm8k}:{line_number}: fields 'question' and 'answer' must be strings")
            target = compact_target(record["answer"])
            if target is None:
                no_answer += 1
                continue
            if args.max_equations is not None and len(equations(record["answer"])) > args.max_equations:
                too_long += 1
                continue
            out.write(json.dumps({"prompt": format_prompt(template, record["question"]), "response": target,
                                  "ground_truth": split_gsm8k_solution(record["answer"])[1]}) + "\n")
            written += 1
    print(f"wrote {written} records to {args.output}; skipped {no_answer} without a '####' answer, "
          f"{too_long} with more than {args.max_equations} equations", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
