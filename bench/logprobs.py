"""Peak memory and time of log-probs + entropy, forward and backward: ours vs the seeds' version.

Each variant runs in a fresh process (this script re-runs itself with ``--variant``), so one
variant's allocations cannot hide or inflate another's peak. Peak memory is the process's
peak resident set (``ru_maxrss``) minus its resident set after the model, inputs and gradient
buffers exist; time is the best of ``--repeats`` runs of forward + backward of

    loss = -(sum of log-probs on response tokens) + (mean entropy on response tokens)

Variants:
    straightforward  seed 000's code: full logits -> log_softmax -> gather; entropy via
                     log_softmax + exp (``implementation="naive"``).
    ours             ``get_response_log_probs`` with default arguments.
    ours+mask        the same, passing ``response_mask`` (what the SFT trainer does).
    chunked          the fallback path for models without an accessible body/head.

Usage: python bench/logprobs.py [--vocab 151936 --tokens 1024 --batch 4 --hidden 64 --threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = {
    "straightforward": {"implementation": "naive"},
    "ours": {},
    "ours+mask": {"pass_response_mask": True},
    "chunked": {"implementation": "chunked"},
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=151936, help="vocabulary size (Qwen2.5's by default)")
    parser.add_argument("--tokens", type=int, default=1024, help="tokens per sequence")
    parser.add_argument("--batch", type=int, default=4, help="sequences per batch")
    parser.add_argument("--hidden", type=int, default=64, help="hidden size of the tiny Qwen2 model")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the bench machine is shared)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per variant; the best is reported")
    parser.add_argument("--variants", default="straightforward,ours,ours+mask",
                        help=f"comma-separated, from {', '.join(VARIANTS)}; the first is the baseline")
    parser.add_argument("--chunk-size", type=int, default=None,
                        help="tokens per chunk for our variants (default: the library's default)")
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # child mode
    parser.add_argument("--output", help=argparse.SUPPRESS)
    return parser.parse_args()


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_variant(args: argparse.Namespace) -> None:
    """Child: builds the model and inputs, runs one variant, writes results and outputs."""
    import torch

    from reasontune.logprobs import get_response_log_probs
    from reasontune.modeling import build_model_from_config, tiny_qwen2_config

    torch.set_num_threads(args.threads)
    options = dict(VARIANTS[args.variant])
    pass_mask = options.pop("pass_response_mask", False)
    if args.chunk_size and options.get("implementation") != "naive":
        options["chunk_size"] = args.chunk_size
    config = tiny_qwen2_config(vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers,
                               num_heads=4, num_kv_heads=2, max_position_embeddings=max(2048, args.tokens))
    model = build_model_from_config(config, seed=0)
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, args.vocab, (args.batch, args.tokens), generator=generator)
    labels = torch.randint(0, args.vocab, (args.batch, args.tokens), generator=generator)
    # Prompts of different lengths (a quarter to a half of the row), then responses, then 7 pads.
    prompt_lengths = torch.linspace(args.tokens // 4, args.tokens // 2, args.batch).long()
    positions = torch.arange(args.tokens)
    response_mask = (positions >= prompt_lengths.unsqueeze(1)) & (positions < args.tokens - 7)
    # Gradient buffers exist before the baseline, as in training after the first step.
    for parameter in model.parameters():
        parameter.grad = torch.zeros_like(parameter)

    baseline = rss_bytes()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times = []
    for _ in range(args.repeats):
        for parameter in model.parameters():
            parameter.grad.zero_()
        start = time.perf_counter()
        result = get_response_log_probs(model, input_ids, labels, return_token_entropy=True,
                                        response_mask=response_mask if pass_mask else None, **options)
        mask = response_mask.float()
        loss = -(result["log_probs"] * mask).sum() + (result["token_entropy"] * mask).sum() / mask.sum()
        loss.backward()
        times.append(time.perf_counter() - start)
        if _ == 0:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    outputs = {"log_probs": result["log_probs"].detach(), "token_entropy": result["token_entropy"].detach(),
               "response_mask": response_mask,
               "grads": {name: p.grad.clone() for name, p in model.named_parameters()}}
    torch.save(outputs, args.output + ".pt")
    with open(args.output, "w") as handle:
        json.dump({"peak_bytes": peak - baseline, "baseline_bytes": baseline,
                   "build_peak_over_baseline": peak_before - baseline, "times": times}, handle)


def main() -> None:
    args = parse_args()
    if args.variant:
        run_variant(args)
        return
    import torch

    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{args.threads} thread(s), python {platform.python_version()}")
    print(f"size: vocab {args.vocab}, {args.batch} x {args.tokens} tokens, hidden {args.hidden}, "
          f"{args.layers} layers, fp32; one float32 [b, s, V] tensor = "
          f"{args.batch * args.tokens * args.vocab * 4 / 2**30:.2f} GiB")
    results, outputs = {}, {}
    with tempfile.TemporaryDirectory() as scratch:
        for variant in variants:
            output = str(Path(scratch) / "result.json")
            command = [sys.executable, __file__, "--variant", variant, "--output", output] + [
                f"--{name}={getattr(args, name)}" for name in ("vocab", "tokens", "batch", "hidden", "layers",
                                                               "threads", "repeats")]
            command += [f"--chunk-size={args.chunk_size}"] if args.chunk_size else []
            subprocess.run(command, check=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
            results[variant] = json.loads(Path(output).read_text())
            outputs[variant] = torch.load(output + ".pt")

    baseline_name = variants[0]
    base = results[baseline_name]
    print()
    print(f"{'variant':<16} {'peak MiB':>10} {'time s':>8} {'peak ratio':>11} {'time ratio':>11} "
          f"{'max|d lp|':>10} {'max|d H|':>10} {'max|d grad|':>11}")
    reference = outputs[baseline_name]
    mask = reference["response_mask"]
    for variant in variants:
        result, output = results[variant], outputs[variant]
        best = min(result["times"])
        log_prob_diff = (output["log_probs"] - reference["log_probs"])[mask].abs().max().item()
        entropy_diff = (output["token_entropy"] - reference["token_entropy"])[mask].abs().max().item()
        grad_diff = max((output["grads"][name] - grad).abs().max().item() for name, grad in reference["grads"].items())
        print(f"{variant:<16} {result['peak_bytes'] / 2**20:>10.1f} {best:>8.2f} "
              f"{result['peak_bytes'] / base['peak_bytes']:>11.4f} {best / min(base['times']):>11.3f} "
              f"{log_prob_diff:>10.2e} {entropy_diff:>10.2e} {grad_diff:>11.2e}")
        if result["build_peak_over_baseline"] > result["peak_bytes"]:
            print(f"  warning: {variant}'s build peak exceeded its run peak; its peak is understated")
    print(f"\nratios are {{variant}} / {baseline_name}; diffs on response positions (all parameters for grads)")


if __name__ == "__main__":
    main()
