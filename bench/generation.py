"""HF backend throughput on CPU: batched ``HFGenerator`` vs ``model.generate`` one prompt at a time.

Same tiny random Qwen2 model (real Qwen2.5 tokenizer), same GSM8K-style prompts (R1-Zero
template), same greedy decoding and ``max_new_tokens`` with no stop strings, so both sides
generate exactly the same number of tokens; prints generated tokens/s of each and the ratio.
Baseline: the seed's straightforward loop, ``model.generate`` per prompt.

    python bench/generation.py [--prompts 32] [--max-new-tokens 32] [--batch-size 32] [--hidden-size 64] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from reasontune.data import example_prompt, load_examples, load_template
from reasontune.generation import SamplingOptions
from reasontune.generation.hf import HFGenerator
from reasontune.modeling import QWEN2_5_VOCAB_SIZE, build_model_from_config, qwen2_tokenizer_offline, tiny_qwen2_config

GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "test.jsonl"


def prompts_for(count: int) -> list[str]:
    template = load_template("r1_zero")
    if GSM8K.exists():
        return [example_prompt(e, template) for e in load_examples(GSM8K, max_examples=count, seed=0)]
    return [template.replace("{question}", f"What is {i} times {i + 7}, plus {3 * i}?" * (1 + i % 4)) for i in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for tiny models on shared CPUs)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    tokenizer = qwen2_tokenizer_offline()
    model = build_model_from_config(tiny_qwen2_config(vocab_size=QWEN2_5_VOCAB_SIZE, hidden_size=args.hidden_size,
                                                      num_layers=2, num_heads=4, num_kv_heads=2), seed=0).eval()
    prompts = prompts_for(args.prompts)
    eos = tokenizer.eos_token_id

    # Baseline: one prompt per generate call, greedy, EOS suppressed so every row makes max_new_tokens.
    start = time.perf_counter()
    baseline_tokens = 0
    with torch.no_grad():
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt")
            out = model.generate(**ids, max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens,
                                 do_sample=False, pad_token_id=eos)
            baseline_tokens += out.shape[1] - ids["input_ids"].shape[1]
    baseline_seconds = time.perf_counter() - start

    generator = HFGenerator(model, tokenizer, batch_size=args.batch_size)
    options = SamplingOptions(temperature=0.0, max_new_tokens=args.max_new_tokens,
                              min_new_tokens=args.max_new_tokens, stop=())
    start = time.perf_counter()
    groups = generator.generate(prompts, options)
    batched_seconds = time.perf_counter() - start
    batched_tokens = sum(g[0].num_tokens for g in groups)

    result = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}",
        "model": f"tiny Qwen2 ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, vocab {QWEN2_5_VOCAB_SIZE})",
        "prompts": len(prompts), "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size,
        "one_at_a_time_tokens_per_s": baseline_tokens / baseline_seconds,
        "batched_tokens_per_s": batched_tokens / batched_seconds,
        "generated_tokens": [baseline_tokens, batched_tokens],
    }
    result["speedup"] = result["batched_tokens_per_s"] / result["one_at_a_time_tokens_per_s"]
    print(json.dumps(result, indent=2))
    print(f"batched HFGenerator is {result['speedup']:.1f}x the one-prompt-at-a-time model.generate loop")


if __name__ == "__main__":
    main()
