"""One prepared GPU check (<= 8 minutes on one H100/H200-class GPU): prints one table of what only a GPU can show.

Rows (random weights at Qwen2.5's shapes; nothing is downloaded):

1. log-probs + entropy, forward and backward, bf16 at Qwen2.5-1.5B's shape: the fused
   ``get_response_log_probs`` vs the straightforward full-vocabulary log-softmax
   (``implementation="naive"``): peak CUDA memory, time, largest log-prob difference.
2. packing: the same packed microbatch under SDPA (block-causal mask) and flash-attention's
   varlen kernel (``cu_seq_lens``), each against the examples run one by one: largest
   log-prob difference (skipped with a line when flash-attn is not installed).
3. SFT response tokens/s and MFU at the 1.5B shape, one GPU vs FSDP2 on all visible GPUs
   (bench/scaling.py in a torchrun subprocess).
4. vLLM: generation tokens/s and the time of one weight sync from an HF policy, and whether
   greedy tokens after the sync follow the synced weights (skipped with a line without vllm).

``--dry-run`` runs every code path on CPU with tiny shapes (rows 2 and 4 print their skip line
unless their packages exist), so the script is known to work before a GPU is lent.

Usage: python bench/gpu_check.py [--dry-run] [--skip logprobs,packing,sft,vllm]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
SECTIONS = ("logprobs", "packing", "sft", "vllm")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="exercise every path on CPU with tiny shapes")
    parser.add_argument("--skip", default="", help=f"comma-separated sections to leave out, from {', '.join(SECTIONS)}")
    parser.add_argument("--tokens", type=int, default=1024, help="tokens per sequence in the log-probs row")
    parser.add_argument("--batch", type=int, default=4, help="sequences in the log-probs row")
    args = parser.parse_args(argv)
    unknown = set(filter(None, args.skip.split(","))) - set(SECTIONS)
    if unknown:
        parser.error(f"--skip: unknown section(s) {', '.join(sorted(unknown))}; expected {', '.join(SECTIONS)}")
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU machine, or pass --dry-run to check the script on CPU")
    return args


def load_scaling():
    spec = importlib.util.spec_from_file_location("scaling", BENCH / "scaling.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def random_model(shape: str, device: torch.device, dtype: torch.dtype, attn_implementation: str = "sdpa", seed: int = 0):
    """Returns a randomly initialised causal LM of a bench/scaling.py shape, built directly on ``device``."""
    from reasontune.modeling import build_model_from_config

    with torch.device(device):
        return build_model_from_config(load_scaling().model_config(shape), seed=seed, dtype=dtype,
                                       attn_implementation=attn_implementation)


def measure(device: torch.device, work) -> tuple[float, float | None]:
    """Returns (seconds, peak CUDA GiB or None on CPU) of ``work()``, after one warm-up call."""
    work()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    work()
    if device.type == "cuda":
        torch.cuda.synchronize()
        return time.perf_counter() - started, torch.cuda.max_memory_allocated() / 2**30
    return time.perf_counter() - started, None


def logprobs_rows(args, device) -> list[dict]:
    from reasontune.logprobs import get_response_log_probs

    shape, dtype = ("tiny", torch.float32) if args.dry_run else ("qwen2.5-1.5b", torch.bfloat16)
    batch, tokens = (2, 64) if args.dry_run else (args.batch, args.tokens)
    model = random_model(shape, device, dtype)
    input_ids = torch.randint(0, model.config.vocab_size, (batch, tokens + 1), device=device)
    response_mask = torch.ones(batch, tokens, dtype=torch.bool, device=device)
    response_mask[:, : tokens // 4] = False  # a prompt quarter without loss
    results, rows = {}, []
    for name, implementation in (("straightforward (naive)", "naive"), ("fused", "fused")):
        def work(implementation=implementation):
            model.zero_grad(set_to_none=True)
            out = get_response_log_probs(model, input_ids[:, :-1], input_ids[:, 1:], return_token_entropy=True,
                                         response_mask=response_mask, implementation=implementation)
            loss = -out["log_probs"][response_mask].sum() + out["token_entropy"][response_mask].mean()
            loss.backward()
            results[implementation] = out["log_probs"].detach().float()
        seconds, peak = measure(device, work)
        rows.append({"check": f"log-probs {shape} {str(dtype)[6:]}: {name}", "time_s": seconds, "peak_gib": peak})
    difference = float((results["fused"] - results["naive"])[response_mask].abs().max())
    rows[-1]["max_difference"] = difference
    return rows


def packing_rows(args, device) -> list[dict]:
    from reasontune.batching import pack_examples, packed_forward_kwargs, split_packed
    from reasontune.logprobs import get_response_log_probs

    kernels = ["sdpa"]
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        kernels.append("flash_attention_2")
    shape, dtype = ("tiny", torch.float32) if args.dry_run else ("qwen2.5-0.5b", torch.bfloat16)
    generator = torch.Generator().manual_seed(3)
    lengths = [(5, 40), (9, 17), (3, 60), (12, 8), (7, 33)]
    prompts = [torch.randint(1, 500, (p,), generator=generator).tolist() for p, _ in lengths]
    outputs = [torch.randint(1, 500, (o,), generator=generator).tolist() for _, o in lengths]
    batch = pack_examples(prompts, outputs, pad_token_id=0, tokens_per_row=256)[0]
    rows = []
    for kernel in kernels:
        model = random_model(shape, device, dtype, attn_implementation=kernel)
        with torch.no_grad():
            forward = {k: v.to(device) if torch.is_tensor(v) else v
                       for k, v in packed_forward_kwargs(batch, kernel, dtype=dtype).items()}
            packed = get_response_log_probs(model, batch["input_ids"].to(device), batch["labels"].to(device),
                                            response_mask=batch["response_mask"].to(device), **forward)["log_probs"]
            pieces = split_packed(packed, batch)
            difference = 0.0
            for k, index in enumerate(batch["example_indices"].tolist()):
                sequence = torch.tensor([prompts[index] + outputs[index]], device=device)
                alone = get_response_log_probs(model, sequence[:, :-1], sequence[:, 1:])["log_probs"][0]
                mask = batch["response_mask"].reshape(-1)[batch["sequence_ids"].reshape(-1) == k].to(device)
                difference = max(difference, float((pieces[k] - alone)[mask].abs().max()))
        rows.append({"check": f"packing {shape} {kernel}: packed vs one by one", "max_difference": difference})
    if len(kernels) == 1:
        rows.append({"check": "packing flash_attention_2", "note": "skipped: flash-attn not installed or no CUDA"})
    return rows


def sft_rows(args, device) -> list[dict]:
    """Runs bench/scaling.py in subprocesses (torchrun for the FSDP2 world size) and returns its rows."""
    with tempfile.TemporaryDirectory() as workdir:
        result = Path(workdir) / "scaling.json"
        if args.dry_run:
            options = ["--device", "cpu", "--shape", "tiny", "--steps", "1", "--world-sizes", "1,2",
                       "--global-batch", "4", "--response-tokens", "16", "--prompt-tokens", "8"]
        else:
            # 8 sequences of 256 + 768 tokens a step, microbatches of 4 (~4k tokens): fits an 80 GB GPU.
            options = ["--device", "cuda", "--shape", "qwen2.5-1.5b", "--steps", "10", "--prompt-tokens", "256",
                       "--response-tokens", "768", "--micro-batch", "4",
                       "--global-batch", str(8 * max(1, torch.cuda.device_count()))]
        completed = subprocess.run([sys.executable, str(BENCH / "scaling.py"), *options, "--json", str(result)],
                                   capture_output=True, text=True, timeout=360, check=False)
        if completed.returncode != 0:
            return [{"check": "SFT scaling", "note": f"failed: {completed.stderr.strip()[-300:]}"}]
        scaling = json.loads(result.read_text())
    return [{"check": f"SFT {options[3]} world {row['world_size']} (accumulation {row['accumulation']})",
             "tokens_per_s": row["response_tokens_per_s"], "mfu": row["mfu"],
             "peak_gib": max(row["peak_memory_gib_per_rank"]),
             "note": f"{row['ratio_vs_world_1']:.2f}x world 1"} for row in scaling]


def vllm_rows(args, device) -> list[dict]:
    if device.type != "cuda" or importlib.util.find_spec("vllm") is None:
        return [{"check": "vLLM generation and weight sync", "note": "skipped: vllm not installed or no CUDA"}]
    from reasontune.generation import SamplingOptions
    from reasontune.generation.vllm import VLLMGenerator
    from reasontune.modeling import qwen2_tokenizer_offline

    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        base = random_model("qwen2.5-0.5b", device, torch.bfloat16, seed=0)
        base.save_pretrained(workdir)
        qwen2_tokenizer_offline().save_pretrained(workdir)
        del base
        generator = VLLMGenerator(workdir, gpu_memory_utilization=0.3, max_model_len=1024, enforce_eager=True)
        prompts = [f"Question {i}: what is {i} + {2 * i}?" for i in range(64)]
        options = SamplingOptions(temperature=0.0, max_new_tokens=128, n=1, seed=0, stop=())
        started = time.perf_counter()
        before = generator.generate_flat(prompts, options)
        seconds = time.perf_counter() - started
        rows.append({"check": "vLLM generate 64 x 128 tokens (0.5B shape)", "time_s": seconds,
                     "tokens_per_s": sum(c.num_tokens for c in before) / seconds})
        policy = random_model("qwen2.5-0.5b", device, torch.bfloat16, seed=1)
        torch.cuda.synchronize()
        started = time.perf_counter()
        generator.sync_weights(policy)
        torch.cuda.synchronize()
        sync_seconds = time.perf_counter() - started
        after = generator.generate_flat(prompts[:1], options.replace(max_new_tokens=8))[0]
        changed = after.token_ids[:8] != before[0].token_ids[:8]
        note = "greedy tokens changed with the weights" if changed else "WARNING: greedy tokens unchanged after sync"
        prompt_ids = torch.tensor([qwen2_tokenizer_offline()(prompts[0])["input_ids"]], device=device)
        with torch.no_grad():
            reference = policy.generate(prompt_ids, max_new_tokens=8, do_sample=False)[0, prompt_ids.shape[1]:]
        agree = sum(int(a == b) for a, b in zip(after.token_ids[:8], reference.tolist()))
        rows.append({"check": "vLLM weight sync (0.5B, bf16)", "time_s": sync_seconds,
                     "note": f"{note}; {agree}/8 greedy tokens equal HF generate of the synced policy"})
        generator.close()
    return rows


def print_table(rows: list[dict]) -> None:
    def cell(value, format_spec):
        return "" if value is None else format(value, format_spec)

    print(f"{'check':<58} {'time s':>8} {'peak GiB':>9} {'max diff':>9} {'tok/s':>10} {'MFU':>6}  note")
    for row in rows:
        mfu = row.get("mfu")
        print(f"{row['check']:<58} {cell(row.get('time_s'), '8.3f'):>8} {cell(row.get('peak_gib'), '9.2f'):>9} "
              f"{cell(row.get('max_difference'), '9.2e'):>9} {cell(row.get('tokens_per_s'), '10.1f'):>10} "
              f"{cell(None if mfu is None else 100 * mfu, '5.1f'):>6}  {row.get('note', '')}")


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    device = torch.device("cpu" if args.dry_run else "cuda")
    if args.dry_run:
        torch.set_num_threads(1)
    skipped = set(filter(None, args.skip.split(",")))
    started = time.perf_counter()
    name = "CPU (dry run)" if args.dry_run else torch.cuda.get_device_name(device)
    print(f"gpu_check on {name}; torch {torch.__version__}; {torch.cuda.device_count()} visible GPU(s)")
    rows = []
    for section, function in (("logprobs", logprobs_rows), ("packing", packing_rows), ("sft", sft_rows),
                              ("vllm", vllm_rows)):
        if section in skipped:
            continue
        try:
            rows += function(args, device)
        except Exception as error:  # noqa: BLE001 — one failed row must not hide the others
            rows.append({"check": section, "note": f"FAILED: {type(error).__name__}: {str(error)[:200]}"})
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print_table(rows)
    print(f"total {time.perf_counter() - started:.0f} s")
    return rows


if __name__ == "__main__":
    main()
