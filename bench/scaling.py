"""SFT response tokens/s at world size 1 vs N (torchrun + FSDP2), same global batch, and peak memory per rank.

The baseline is world size 1 (a plain process, no process group, gradient accumulation N); the
candidate is ``torchrun --nproc_per_node N`` with FSDP2 and accumulation 1, so both train on
exactly the same global batch each step. Each run is a fresh process (this script re-runs
itself with ``--worker``). Printed: response tokens/s (response tokens of the timed steps /
their wall time; the first ``--warmup`` steps are not timed), the ratio N vs 1, model FLOPs
utilisation on CUDA (6 x parameters x tokens / time / peak), and each rank's peak memory (CPU:
peak resident set; CUDA: peak allocated).

On CPU every rank gets ``--threads`` torch threads (1 by default: N ranks on N cores).

Usage:
    python bench/scaling.py                              # CPU, 1 vs 2 ranks, a 6M-parameter Qwen2
    python bench/scaling.py --device cuda --shape qwen2.5-1.5b   # 1 GPU vs all visible GPUs
    python bench/scaling.py --json results.json          # also write the rows as JSON
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
from contextlib import nullcontext
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]

# name -> (hidden, layers, heads, kv heads, intermediate, vocab, tied embeddings)
SHAPES = {
    "tiny": (64, 2, 4, 2, 256, 512, False),
    "small": (256, 4, 4, 2, 1024, 4096, False),
    "qwen2.5-0.5b": (896, 24, 14, 2, 4864, 151936, True),
    "qwen2.5-1.5b": (1536, 28, 12, 2, 8960, 151936, True),
}
# Dense bf16 peak FLOP/s by device name fragment (MFU denominator); unknown devices print no MFU.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "L4": 121e12}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cpu (gloo) or cuda (NCCL)")
    parser.add_argument("--world-sizes", default=None,
                        help="comma-separated world sizes (default: 1,2 on CPU; 1,all visible GPUs on CUDA)")
    parser.add_argument("--shape", choices=sorted(SHAPES), default=None,
                        help="model shape, random weights (default: small on CPU, qwen2.5-1.5b on CUDA)")
    parser.add_argument("--global-batch", type=int, default=None,
                        help="sequences per optimizer step, over all ranks (default: 32 on CPU, 8 x max world size on CUDA)")
    parser.add_argument("--micro-batch", type=int, default=None,
                        help="sequences per forward/backward on one rank (default: global batch / max world size)")
    parser.add_argument("--prompt-tokens", type=int, default=32, help="prompt tokens per sequence (no loss)")
    parser.add_argument("--response-tokens", type=int, default=96, help="response tokens per sequence (the loss)")
    parser.add_argument("--steps", type=int, default=4, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=1, help="untimed optimizer steps first")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per rank")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="activation checkpointing per layer")
    parser.add_argument("--json", help="also write the result rows to this JSON file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # child mode: one world size
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--accumulation", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.shape is None:
        args.shape = "small" if args.device == "cpu" else "qwen2.5-1.5b"
    return args


def world_sizes(args: argparse.Namespace) -> list[int]:
    """Returns the world sizes to compare, the baseline (1) first."""
    if args.world_sizes:
        sizes = [int(size) for size in args.world_sizes.split(",")]
    elif args.device == "cuda":
        import torch

        sizes = sorted({1, max(1, torch.cuda.device_count())})
    else:
        sizes = [1, 2]
    if sizes[0] != 1:
        raise SystemExit(f"error: --world-sizes must start with the baseline 1, got {args.world_sizes}")
    return sizes


def batch_sizes(args: argparse.Namespace, sizes: list[int]) -> tuple[int, int]:
    """Returns (global batch, micro batch), checked to split evenly at every world size."""
    largest = max(sizes)
    # On CPU a step of 16 sequences is too short to hide FSDP2's per-layer gathers over gloo (1.36x at
    # world 2 on a quiet 2-core machine, against 1.64-1.75x at 32).
    global_batch = args.global_batch or (32 if args.device == "cpu" else 8 * largest)
    micro_batch = args.micro_batch or max(1, global_batch // largest)
    for size in sizes:
        if global_batch % (size * micro_batch):
            raise SystemExit(f"error: a global batch of {global_batch} does not split into microbatches of "
                             f"{micro_batch} on {size} ranks; change --global-batch or --micro-batch")
    return global_batch, micro_batch


def model_config(shape: str):
    """Returns the Qwen2 config of a named shape (random weights; no download)."""
    from reasontune.modeling import tiny_qwen2_config

    hidden, layers, heads, kv_heads, intermediate, vocab, tied = SHAPES[shape]
    return tiny_qwen2_config(vocab_size=vocab, hidden_size=hidden, num_layers=layers, num_heads=heads,
                             num_kv_heads=kv_heads, intermediate_size=intermediate, tie_word_embeddings=tied)


def peak_memory_bytes(device) -> int:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker(args: argparse.Namespace) -> None:
    """One world size: trains ``--warmup + --steps`` SFT steps and writes its measurements (rank 0)."""
    import torch

    from reasontune import distributed
    from reasontune.logprobs import get_response_log_probs
    from reasontune.losses import sft_microbatch_train_step
    from reasontune.modeling import build_model_from_config
    from reasontune.training.optimizer_step import clip_and_step

    torch.set_num_threads(args.threads)
    ctx = distributed.init_distributed(args.device)
    with distributed.stop_all_ranks_on_error(ctx):
        cuda = ctx.device.type == "cuda"
        attention = "sdpa"
        with torch.device(ctx.device):  # initialised where it trains: a 1.5B model in seconds on a GPU
            model = build_model_from_config(model_config(args.shape), seed=0, attn_implementation=attention)
        parameters = sum(p.numel() for p in model.parameters())
        if args.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        model = distributed.shard_model(model, ctx, mixed_precision=cuda)
        # bf16 compute over fp32 weights at every world size: FSDP2's policy when sharded, autocast when not.
        precision = torch.autocast("cuda", dtype=torch.bfloat16) if cuda and not ctx.is_distributed else nullcontext()
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        vocab = model.config.vocab_size
        micro_batch = args.global_batch // ctx.world_size // args.accumulation
        length = args.prompt_tokens + args.response_tokens
        response_mask = torch.zeros(micro_batch, length - 1, dtype=torch.bool, device=ctx.device)
        response_mask[:, args.prompt_tokens - 1:] = True
        generator = torch.Generator().manual_seed(1 + ctx.rank)

        def step() -> int:
            tokens_in_step = distributed.global_sum(int(response_mask.sum()) * args.accumulation)
            loss_sum = 0.0
            for _ in range(args.accumulation):
                sequences = torch.randint(0, vocab, (micro_batch, length), generator=generator).to(ctx.device)
                with precision:
                    log_probs = get_response_log_probs(model, sequences[:, :-1], sequences[:, 1:],
                                                       response_mask=response_mask)["log_probs"]
                loss, _ = sft_microbatch_train_step(log_probs, response_mask, args.accumulation,
                                                    aggregation="token_mean", tokens_in_step=tokens_in_step)
                loss_sum += float(loss)
            clip_and_step(model, optimizer, scheduler, 1.0, distributed.global_sum(loss_sum))
            return tokens_in_step

        for _ in range(args.warmup):
            step()
        if cuda:
            torch.cuda.synchronize()
        distributed.barrier()
        started = time.perf_counter()
        response_tokens = sum(step() for _ in range(args.steps))
        if cuda:
            torch.cuda.synchronize()
        distributed.barrier()
        elapsed = time.perf_counter() - started
        peaks = distributed.all_gather_objects(peak_memory_bytes(ctx.device))
        if ctx.is_main:
            tokens_per_second = response_tokens / elapsed
            all_tokens_per_second = tokens_per_second * (length - 1) / args.response_tokens
            peak_flops = next((flops for name, flops in PEAK_BF16_FLOPS.items()
                               if cuda and name in torch.cuda.get_device_name(ctx.device)), None)
            mfu = (6 * parameters * all_tokens_per_second / (peak_flops * ctx.world_size)) if peak_flops else None
            Path(args.result).write_text(json.dumps({
                "world_size": ctx.world_size, "accumulation": args.accumulation, "parameters": parameters,
                "response_tokens_per_s": tokens_per_second, "mfu": mfu, "seconds": elapsed,
                "peak_memory_gib_per_rank": [peak / 2**30 for peak in peaks]}))
    distributed.close_distributed()


def launch(args: argparse.Namespace, world_size: int, global_batch: int, micro_batch: int, result: Path) -> dict:
    """Returns the measurements of one world size, run in a fresh process (torchrun above 1)."""
    accumulation = global_batch // world_size // micro_batch
    worker_arguments = [str(Path(__file__).resolve()), "--worker", "--result", str(result),
                        "--accumulation", str(accumulation), "--global-batch", str(global_batch),
                        "--device", args.device, "--shape", args.shape, "--prompt-tokens", str(args.prompt_tokens),
                        "--response-tokens", str(args.response_tokens), "--steps", str(args.steps),
                        "--warmup", str(args.warmup), "--threads", str(args.threads)]
    if args.gradient_checkpointing:
        worker_arguments.append("--gradient-checkpointing")
    if world_size == 1:
        command = [sys.executable, *worker_arguments]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world_size),
                   *worker_arguments]
    environment = {**os.environ, "OMP_NUM_THREADS": str(args.threads),
                   "PYTHONPATH": os.pathsep.join([str(REPOSITORY), os.environ.get("PYTHONPATH", "")])}
    completed = subprocess.run(command, env=environment, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise SystemExit(f"error: world size {world_size} failed:\n{completed.stderr[-4000:]}")
    return json.loads(result.read_text())


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return []
    sizes = world_sizes(args)
    global_batch, micro_batch = batch_sizes(args, sizes)
    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs; device {args.device}; shape {args.shape}; "
          f"global batch {global_batch} x {args.prompt_tokens}+{args.response_tokens} tokens; "
          f"microbatch {micro_batch}; {args.threads} thread(s) per rank; {args.steps} timed steps")
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for size in sizes:
            rows.append(launch(args, size, global_batch, micro_batch, Path(workdir) / f"world-{size}.json"))
    baseline = rows[0]["response_tokens_per_s"]
    print(f"{'world':>5} {'accum':>5} {'resp tok/s':>11} {'vs world 1':>10} {'MFU':>6}  peak memory per rank (GiB)")
    for row in rows:
        row["ratio_vs_world_1"] = row["response_tokens_per_s"] / baseline
        mfu = f"{100 * row['mfu']:5.1f}%" if row["mfu"] is not None else "   n/a"
        peaks = ", ".join(f"{peak:.2f}" for peak in row["peak_memory_gib_per_rank"])
        print(f"{row['world_size']:>5} {row['accumulation']:>5} {row['response_tokens_per_s']:>11.1f} "
              f"{row['ratio_vs_world_1']:>9.2f}x {mfu}  {peaks}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
    from reasontune.process_exit import exit_process  # a worker rank ends without the teardown of its gloo group

    exit_process(0)
