"""GRPO steps/s with ``--async-steps 1`` (generation overlapped with training) vs the on-policy loop, on this CPU.

The workload is the demo's GRPO stage (``reasontune.demo.demo_grpo_config``: its arithmetic task,
tiny model, 16 questions x 8 responses per step, HF generation) from the demo's freshly built
base model, with no evaluation. Every run uses ``--loss-type grpo_clip`` so that only the
overlap differs. Rows:

- ``on-policy, 1 thread``: ``--async-steps 0`` with one torch thread (one core busy);
- ``on-policy, 2 threads``: ``--async-steps 0`` with two torch threads (the baseline: both cores);
- ``async 1, 1+1 threads``: ``--async-steps 1``, one thread each for generation and training.

The first ``--warmup`` steps of each run are not timed (their rollouts were sampled before any
update); the time per step is the median of the other steps' ``step_s`` in metrics.jsonl, and the
ratio is against the 2-thread on-policy row. On a GPU, with vLLM on its own device, the overlap
is what peers report 1.2-2.7x for; on 2 shared CPU cores the two sides compete for the same
cores, so this only says what it does here.

    python bench/async_grpo.py [--steps 6] [--warmup 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

from reasontune.demo import DemoConfig, demo_grpo_config, prepare_demo
from reasontune.training.grpo import GRPOConfig, run_grpo


def run(base: GRPOConfig, directory: Path, async_steps: int, threads: int) -> dict:
    config = dataclasses.replace(base, output_dir=str(directory), async_steps=async_steps, num_threads=threads)
    started = time.perf_counter()
    run_dir = run_grpo(config)
    wall = time.perf_counter() - started
    train = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in train if r["kind"] == "train"]
    return {"train": train, "wall_s": wall}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6, help="GRPO steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="first steps of each run left out of the timing")
    parser.add_argument("--json", help="also write the rows as JSON")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        demo = DemoConfig(output_dir=str(Path(scratch) / "demo"), seed=0, num_threads=1, progress=False)
        train_path, val_path, model_dir = prepare_demo(demo)
        base = dataclasses.replace(demo_grpo_config(demo, train_path, val_path, model_dir), n_grpo_steps=args.steps,
                                   loss_type="grpo_clip", eval_examples=0, eval_every=0, eval_before_training=False,
                                   write_report=False, val_data=None)
        rows = []
        for name, async_steps, threads in (("on-policy, 1 thread", 0, 1), ("on-policy, 2 threads", 0, 2),
                                           ("async 1, 1+1 threads", 1, 1)):
            result = run(base, Path(scratch) / f"run-{len(rows)}", async_steps, threads)
            timed = result["train"][args.warmup:]
            rows.append({"run": name, "async_steps": async_steps, "threads": threads,
                         "step_s": statistics.median(r["step_s"] for r in timed),
                         "rollout_s": statistics.median(r["rollout_s"] for r in timed),
                         "wait_s": statistics.median(r.get("rollout_wait_s", r["rollout_s"]) for r in timed),
                         "wall_s": result["wall_s"]})
    baseline = rows[1]["step_s"]
    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs; demo GRPO stage, "
          f"{base.rollout_batch_size} rollouts/step, {args.steps} steps ({args.warmup} untimed)")
    print(f"{'run':<22} {'s/step':>8} {'rollout s':>10} {'waited s':>9} {'steps/s vs on-policy 2 threads':>31}")
    for row in rows:
        print(f"{row['run']:<22} {row['step_s']:8.2f} {row['rollout_s']:10.2f} {row['wait_s']:9.2f} "
              f"{baseline / row['step_s']:30.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
