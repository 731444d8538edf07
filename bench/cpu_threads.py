"""Prints SmolLM2-135M's prefill and decode-step time at 1 and 2 torch threads, and their ratio, measured in one run.

    python3 bench/cpu_threads.py --model /work/cache/smollm2-hf --batch-size 64

Why: on a shared 2-core machine, two OpenMP threads that must wait for each other lose when
other processes hold a core. Each thread count runs in its own process (torch fixes its pool
at first use), on the same random prompts (``--prompt-tokens`` long) and 8 greedy decode steps
with the KV cache; the baseline is 2 threads. Say what else was running when you quote it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, sys, time, torch
from transformers import AutoModelForCausalLM
threads, model_dir, batch, prompt_tokens = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
torch.manual_seed(0)
model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
ids = torch.randint(100, 40000, (batch, prompt_tokens))
with torch.inference_mode():
    tick = time.perf_counter(); out = model(ids, use_cache=True); prefill = time.perf_counter() - tick
    cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    tick = time.perf_counter()
    for _ in range(8):
        out = model(token, past_key_values=cache, use_cache=True); token = out.logits[:, -1:].argmax(-1)
    step = (time.perf_counter() - tick) / 8
print(json.dumps({"prefill_s": prefill, "decode_step_s": step}))
"""


def measure(threads: int, args) -> dict[str, float]:
    """Returns {"prefill_s", "decode_step_s"} measured in a fresh process with ``threads`` torch threads."""
    out = subprocess.run([sys.executable, "-c", CHILD, str(threads), args.model, str(args.batch_size),
                          str(args.prompt_tokens)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=170)
    args = parser.parse_args()
    with open("/proc/loadavg") as handle:
        load = handle.read().split()[0]
    results = {threads: measure(threads, args) for threads in (2, 1)}
    print(f"batch {args.batch_size}, prompt {args.prompt_tokens} tokens, 1-minute load average at start {load}")
    for threads, r in results.items():
        print(f"  {threads} thread(s): prefill {r['prefill_s']:.2f} s "
              f"({args.batch_size * args.prompt_tokens / r['prefill_s']:.0f} tokens/s), decode step "
              f"{1000 * r['decode_step_s']:.0f} ms ({args.batch_size / r['decode_step_s']:.0f} tokens/s)")
    print(f"  1 thread vs 2 (baseline): prefill {results[2]['prefill_s'] / results[1]['prefill_s']:.2f}x, "
          f"decode {results[2]['decode_step_s'] / results[1]['decode_step_s']:.2f}x faster")


if __name__ == "__main__":
    main()
