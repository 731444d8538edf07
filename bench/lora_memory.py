"""Peak memory and step time of LoRA vs full fine-tuning (the baseline), same model, batch and step.

Both variants train the same random Qwen2 (default ~100M parameters: hidden 1024, 6 layers,
vocabulary 32,000, tied embeddings as in Qwen2.5-0.5B/1.5B) on the same random batch with the
same step: ``get_response_log_probs`` (fused path) → summed NLL of the response tokens →
backward → AdamW. They differ only in what trains:

    full   every weight (AdamW keeps two float32 moments per weight, and every weight gets a gradient)
    lora   ``apply_lora(rank=--rank)`` on every decoder linear layer; AdamW over the adapter only

Every variant runs in a fresh process (this script re-runs itself with ``--variant``), so its
peak RSS (``ru_maxrss``: imports, model, optimizer, activations) is its own. Reported per
variant: peak RSS, RSS once the model is built (before any step), their difference (what
training adds), and the median wall time of steps 2..N (step 1 allocates optimizer state and
warms up). Ratios are printed as full / lora.

Usage: python bench/lora_memory.py [--hidden 1024 --layers 6 --vocab 32000 --batch-size 2
       --seq-len 128 --rank 16 --steps 4 --threads 1]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's reasontune, also in the re-run variants
VARIANTS = ("full", "lora")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per variant (the first is not timed)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def rss_bytes() -> int:
    """Returns this process's resident set size now (Linux /proc)."""
    import os

    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_variant(args: argparse.Namespace) -> dict:
    """Returns the variant's measurements after building the model and taking ``--steps`` steps."""
    import torch

    from reasontune.logprobs import get_response_log_probs
    from reasontune.lora import apply_lora, trainable_parameters
    from reasontune.modeling import build_model_from_config, tiny_qwen2_config

    torch.set_num_threads(args.threads)
    config = tiny_qwen2_config(vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers,
                               num_heads=args.hidden // 64, num_kv_heads=max(1, args.hidden // 256),
                               intermediate_size=int(2.75 * args.hidden), tie_word_embeddings=True)
    model = build_model_from_config(config, seed=0)
    total_parameters = sum(p.numel() for p in model.parameters())
    if args.variant == "lora":
        model = apply_lora(model, rank=args.rank, alpha=2 * args.rank, dropout=0.0)
    parameters = trainable_parameters(model)
    optimizer = torch.optim.AdamW(parameters, lr=1e-4, betas=(0.9, 0.95))
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, args.vocab, (args.batch_size, args.seq_len), generator=generator)
    labels = torch.randint(0, args.vocab, (args.batch_size, args.seq_len), generator=generator)
    response_mask = torch.zeros_like(labels, dtype=torch.bool)
    response_mask[:, args.seq_len // 4:] = True  # a prompt quarter, then the response
    model.train()
    rss_after_setup = rss_bytes()
    times = []
    for _ in range(args.steps):
        tick = time.perf_counter()
        log_probs = get_response_log_probs(model, input_ids, labels, response_mask=response_mask)["log_probs"]
        loss = -log_probs.sum() / response_mask.sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - tick)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return {"variant": args.variant, "parameters": total_parameters,
            "trainable_parameters": sum(p.numel() for p in parameters), "peak_rss_bytes": peak,
            "setup_rss_bytes": rss_after_setup, "training_rss_bytes": peak - rss_after_setup,
            "median_step_s": statistics.median(times[1:] or times), "loss": float(loss)}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.variant:
        print(json.dumps(run_variant(args)))
        return 0
    passthrough = [a for a in (argv if argv is not None else sys.argv[1:])]
    results = {}
    for variant in VARIANTS:
        completed = subprocess.run([sys.executable, __file__, *passthrough, "--variant", variant],
                                   capture_output=True, text=True, cwd=REPO)
        if completed.returncode != 0:
            sys.stderr.write(completed.stderr)
            raise SystemExit(f"variant {variant} failed (exit {completed.returncode})")
        results[variant] = json.loads(completed.stdout.strip().splitlines()[-1])
    mib = 2**20
    print(f"model: {results['full']['parameters'] / 1e6:.1f}M parameters (hidden {args.hidden}, {args.layers} layers, "
          f"vocab {args.vocab}); batch {args.batch_size} x {args.seq_len} tokens; LoRA rank {args.rank}; "
          f"{args.threads} thread(s); {platform.processor() or platform.machine()}")
    print(f"{'variant':8} {'trainable':>12} {'peak RSS':>11} {'setup RSS':>11} {'training adds':>14} {'step (median)':>14}")
    for variant in VARIANTS:
        r = results[variant]
        print(f"{variant:8} {r['trainable_parameters'] / 1e6:>11.2f}M {r['peak_rss_bytes'] / mib:>9.0f}Mi "
              f"{r['setup_rss_bytes'] / mib:>9.0f}Mi {r['training_rss_bytes'] / mib:>12.0f}Mi {r['median_step_s']:>13.2f}s")
    full, lora = results["full"], results["lora"]
    print(f"ratios full / lora: peak RSS {full['peak_rss_bytes'] / lora['peak_rss_bytes']:.2f}x, "
          f"memory training adds {full['training_rss_bytes'] / max(lora['training_rss_bytes'], 1):.2f}x, "
          f"step time {full['median_step_s'] / lora['median_step_s']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
