"""The embedded default: a synthetic arithmetic task, a tiny tokenizer and model, SFT, eval before/after.

``reasontune demo`` needs no download and no GPU. It writes column-addition questions with
step-by-step traces in the R1-Zero format, builds a byte-level BPE tokenizer (digits one token
each) and a tiny randomly initialised Qwen2-style model from scratch, saves both as a normal
Hugging Face model directory, and hands that directory to the SFT trainer, which evaluates
before and after training with the same generator and reward code as real runs and writes the
report.
"""

from __future__ import annotations

import dataclasses
import random
import time
from pathlib import Path
from typing import Any, ClassVar, Literal, Sequence

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from reasontune.config import UserError, help_field
from reasontune.modeling import QWEN2_PATTERN, build_model_from_config, tiny_qwen2_config
from reasontune.rollouts import write_jsonl
from reasontune.run_layout import FINAL_DIR, checkpoint_name, eval_summaries
from reasontune.training.expert_iteration import ExpertIterationConfig, run_expert_iteration
from reasontune.training.grpo import GRPOConfig, run_grpo
from reasontune.training.sft import SFTConfig, run_sft

DEMO_TEMPLATE_PATH = Path(__file__).resolve().parent / "templates" / "demo_arithmetic.prompt"
# Tags of the R1-Zero format, each one token so the model never has to spell them.
FORMAT_TAGS = ("<think>", "</think>", "<answer>", "</answer>")
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"


def load_demo_template() -> str:
    """Returns the demo's prompt template (a compact R1-Zero prompt with ``{question}``, ending in ``<think>``)."""
    return DEMO_TEMPLATE_PATH.read_text()


def addition_trace(a: int, b: int) -> str:
    """Returns the column-addition reasoning for ``a + b``, least significant digit first.

    Each column is written ``x+y+c=s`` with the carry ``c`` in (0 for the first column) and the
    column sum ``s`` in two digits, so the digit written down is always the second one and the
    carry out the first: 457 + 368 gives ``7+8+0=15 5+6+1=12 4+3+1=08``.
    """
    digits_a, digits_b = str(a)[::-1], str(b)[::-1]
    carry, steps = 0, []
    for column in range(max(len(digits_a), len(digits_b))):
        x = int(digits_a[column]) if column < len(digits_a) else 0
        y = int(digits_b[column]) if column < len(digits_b) else 0
        total = x + y + carry
        steps.append(f"{x}+{y}+{carry}={total:02d}")
        carry = total // 10
    return " ".join(steps)


def make_arithmetic_example(a: int, b: int, template: str) -> dict[str, str]:
    """Returns one record ``{question, prompt, response, ground_truth}`` for ``a + b``."""
    question = f"What is {a}+{b}?"
    answer = str(a + b)
    return {
        "question": question,
        "prompt": template.format(question=question),
        "response": f" {addition_trace(a, b)} </think> <answer>{answer}</answer>",
        "ground_truth": answer,
    }


def make_arithmetic_examples(n: int, seed: int, num_digits: int = 3, template: str | None = None,
                             exclude: Sequence[dict[str, Any]] = ()) -> list[dict[str, str]]:
    """Returns ``n`` distinct seeded addition examples of two ``num_digits``-digit numbers.

    Records are ``{"question", "prompt", "response", "ground_truth"}``; the response is the
    column-addition trace after a space (the prompt ends in ``<think>``), then
    `` </think> <answer>SUM</answer>``. Questions of ``exclude`` (e.g. the training set when making the held-out
    set) are never drawn, so two calls can give disjoint splits.
    """
    template = load_demo_template() if template is None else template
    low, high = 10 ** (num_digits - 1), 10 ** num_digits - 1
    available = (high - low + 1) ** 2 - len(exclude)
    if n > available:
        raise ValueError(f"asked for {n} distinct {num_digits}-digit additions but only {available} exist")
    taken = {record["question"] for record in exclude}
    rng = random.Random(seed)
    examples = []
    while len(examples) < n:
        example = make_arithmetic_example(rng.randint(low, high), rng.randint(low, high), template)
        if example["question"] not in taken:
            taken.add(example["question"])
            examples.append(example)
    return examples


def make_demo_splits(n_train: int, n_eval: int, seed: int, num_digits: int = 3,
                     template: str | None = None) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Returns (train, held-out) example lists with no question in common, both seeded by ``seed``."""
    held_out = make_arithmetic_examples(n_eval, seed=seed + 1, num_digits=num_digits, template=template)
    train = make_arithmetic_examples(n_train, seed=seed, num_digits=num_digits, template=template, exclude=held_out)
    return train, held_out


def build_demo_tokenizer(texts: Sequence[str], vocab_size: int = 384, extra_tags: Sequence[str] = ()):
    """Returns a ``PreTrainedTokenizerFast``: byte-level BPE trained on ``texts``, digits one token each.

    The pre-tokenizer is Qwen2's pattern (every digit its own piece, spaces kept), applied
    before byte-level mapping, so any string round-trips: ``decode(encode(x)) == x``. The
    R1-Zero tags are added tokens (one id each, not special, so decoding keeps them); EOS is
    ``<|endoftext|>`` and padding ``<|pad|>``. No BOS is added. ``extra_tags`` (the tool
    demo's ``<python>`` … ``</output>``) become added tokens the same way.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN, PAD_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    tokenizer.add_tokens(list(FORMAT_TAGS) + list(extra_tags))
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
                                      clean_up_tokenization_spaces=False)
    wrapped.model_max_length = 512
    return wrapped


def build_demo_model(tokenizer, hidden_size: int = 256, num_layers: int = 3, num_heads: int = 8,
                     num_kv_heads: int = 2, intermediate_size: int | None = None, seed: int = 0,
                     max_position_embeddings: int = 256):
    """Returns a randomly initialised tiny Qwen2 causal LM (fp32, SDPA, tied embeddings) for ``tokenizer``.

    Generation ends at the stop string ``</answer>`` (the generator's default, kept in the
    text), not at an EOS token: the demo's training targets end in ``</answer>`` with no EOS
    after it. ``</answer>`` is deliberately not an EOS id, since generators drop the EOS token
    from the completion text and the grader needs the closing tag.
    """
    config = tiny_qwen2_config(
        vocab_size=len(tokenizer), hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
        num_kv_heads=num_kv_heads, intermediate_size=intermediate_size, tie_word_embeddings=True,
        max_position_embeddings=max_position_embeddings,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
    )
    model = build_model_from_config(config, seed=seed)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = None
    return model


# Tuned on a 2-core CPU (see run_demo): an under-trained SFT, then EI that lifts it. Held-out accuracy
# jumps from ~20% to ~80% within 40 steps somewhere between step 150 and 250 (where depends on the
# schedule's length and even the thread count), so the start is picked by accuracy, not by a step count.
WARMUP_SFT_STEPS = 280
WARMUP_EVAL_EVERY = 20
WARMUP_TARGET_ACCURACY = 0.45
EI_STEPS = 8
EI_QUESTIONS = 256
EI_SAMPLES = 4
EI_TEMPERATURE = 0.7
EI_LEARNING_RATE = 2e-4
EI_EPOCHS = 2
# --lora-rank: the random base's tied embedding / output head and its norms train in full beside
# the adapters (frozen, they cap every logit near 5.7: LoRA plus norms reached 0.8% after 1000
# steps). Rank 16 at 3e-3, one thread of a busy 2-core CPU: one epoch (400 steps) gave 100% held-out
# accuracy with seed 0 but 83% with seed 1 (loss 0.02); two epochs (800 steps) give 100% with seeds 0
# and 1 (8-13 min, loss < 1e-4; seed 0 was at 90% by step 480); 1e-2 stalled at loss 2.5.
LORA_TRAINABLE_MODULES = ("embed_tokens", "norm")
LORA_LEARNING_RATE = 3e-3
LORA_NUM_EPOCHS = 2
# --algorithm tools (reasontune.tool_demo) fills these in where not given: its copy task is learnt fast by a smaller
# model at a higher rate, a step costing a fifth of the CPU time of the addition demo's model (0.22 s on one thread).
# The copy is learnt abruptly after a plateau (held-out accuracy with the tool from 0% to >= 99% within 50 steps, at
# step 100-250 in the runs of docs/tools.md), so the schedule is long enough to hold a high rate past it: 500 steps
# of 32 turns. Cosine over 300 steps decayed the rate before the answer's copy was learnt (4%).
TOOL_DEMO_PRESETS = {"n_train": 16000, "hidden_size": 128, "num_layers": 2, "num_heads": 4, "learning_rate": 3e-3}
TOOL_GRPO_STEPS = 40


@dataclasses.dataclass
class DemoConfig:
    """Options of ``reasontune demo`` (the defaults are tuned to reach >= 90% on a 2-core CPU in minutes)."""

    command: ClassVar[str] = "demo"

    algorithm: Literal["sft", "ei", "grpo", "tools"] = help_field("sft", "sft: SFT on the traces; ei / grpo: a deliberately under-trained SFT (--warmup-sft-steps), then expert iteration or GRPO from its final/; tools: 4-digit multiplication with a sandboxed Python tool, SFT on the traces' model turns then GRPO with the tool, accuracy with and without it (docs/tools.md; its own defaults for the options of TOOL_DEMO_PRESETS: --n-train 16000 --hidden-size 128 --num-layers 2 --num-heads 4 --learning-rate 3e-3)")
    output_dir: str = help_field("runs/demo", "directory for data/, base-model/ and the runs (sft/, and ei/ or grpo/: checkpoints, eval/, report/)")
    seed: int = help_field(0, "seed of the task, tokenizer corpus, initialisation and data order")
    n_train: int = help_field(12800, "training examples (each seen once, --lora-num-epochs times with --lora-rank: batch-size examples a step)")
    n_eval: int = help_field(256, "held-out examples evaluated before and after training (disjoint from training)")
    num_digits: int = help_field(3, "digits of each operand of the additions")
    hidden_size: int = help_field(256, "width of the tiny Qwen2 model")
    num_layers: int = help_field(3, "transformer layers of the tiny model")
    num_heads: int = help_field(8, "attention heads")
    num_kv_heads: int = help_field(2, "key/value heads (grouped-query attention, as in Qwen2.5)")
    vocab_size: int = help_field(384, "upper bound on the BPE vocabulary trained on the task's text")
    batch_size: int = help_field(32, "examples per optimizer step")
    learning_rate: float = help_field(1e-3, "peak AdamW learning rate (warmup then cosine decay)")
    warmup_ratio: float = help_field(0.05, "fraction of steps spent warming up")
    eval_max_new_tokens: int | None = help_field(None, "token budget of each generated answer (none: 10 x num-digits + 18, a trace's 10 x num-digits + 6 tokens plus margin)")
    eval_batch_size: int = help_field(128, "prompts per generation batch")
    num_threads: int | None = help_field(None, "torch CPU threads (none: torch's choice)")
    progress: bool = help_field(True, "show a progress bar")
    evaluations: int = help_field(4, "held-out evaluations during the SFT run besides before and after (so report/'s accuracy plot is a curve; 0: before and after only)")
    # --algorithm ei / grpo
    warmup_sft_steps: int = help_field(WARMUP_SFT_STEPS, "ei/grpo: optimizer steps of the first SFT (the schedule decays over these); checkpoints are saved and evaluated every --warmup-eval-every steps")
    warmup_eval_every: int = help_field(WARMUP_EVAL_EVERY, "ei/grpo: evaluate and save the first SFT every this many steps")
    warmup_target_accuracy: float = help_field(WARMUP_TARGET_ACCURACY, "ei/grpo: start from the first SFT's checkpoint whose held-out accuracy is closest to this (deliberately under-trained)")
    ei_steps: int = help_field(EI_STEPS, "ei: expert-iteration steps")
    ei_questions: int = help_field(EI_QUESTIONS, "ei: training questions sampled per EI step")
    ei_samples: int = help_field(EI_SAMPLES, "ei: responses sampled per question (G)")
    ei_temperature: float = help_field(EI_TEMPERATURE, "ei: sampling temperature of the rollouts")
    ei_learning_rate: float = help_field(EI_LEARNING_RATE, "ei: peak learning rate of each EI step's SFT on the kept responses")
    ei_epochs: int = help_field(EI_EPOCHS, "ei: SFT epochs over each step's kept responses (E)")
    # --lora-rank
    lora_rank: int = help_field(0, "train LoRA adapters of this rank on the frozen base (0: full fine-tuning)")
    lora_alpha: float | None = help_field(None, "LoRA scaling alpha (none: 2 x rank)")
    lora_trainable_modules: list[str] | None = help_field(None, f"with --lora-rank: modules trained in full beside the adapters (none: {' '.join(LORA_TRAINABLE_MODULES)})")
    lora_learning_rate: float = help_field(LORA_LEARNING_RATE, "with --lora-rank: peak learning rate, in place of --learning-rate")
    lora_num_epochs: int = help_field(LORA_NUM_EPOCHS, "with --lora-rank: epochs over the training examples (full fine-tuning runs one)")

    recipe: Literal["grpo", "dr_grpo", "dapo", "gspo", "cispo", "rloo"] | None = help_field(None, "grpo: a --recipe of reasontune grpo applied under the demo's GRPO settings")
    tool_grpo_steps: int = help_field(TOOL_GRPO_STEPS, "tools: GRPO steps with the python tool after the SFT (0: SFT only)")

    @classmethod
    def expand_presets(cls, values: dict[str, Any]) -> dict[str, Any]:
        """Returns ``values`` (the options given) with ``TOOL_DEMO_PRESETS`` under them for ``--algorithm tools``: a given option wins."""
        return {**TOOL_DEMO_PRESETS, **values} if values.get("algorithm") == "tools" else values

    @classmethod
    def for_algorithm(cls, algorithm: str, **values: Any) -> DemoConfig:
        """Returns the config of ``algorithm`` with ``values`` (explicit options) over its presets."""
        return cls(**cls.expand_presets({**values, "algorithm": algorithm}))

    def problems(self) -> list[str]:
        """Returns what is wrong with the demo's sizes and options."""
        problems = []
        if self.n_train < self.batch_size:
            problems.append(f"--n-train ({self.n_train}) must be at least --batch-size ({self.batch_size})")
        if self.n_eval < 1:
            problems.append("--n-eval must be at least 1")
        if self.evaluations < 0:
            problems.append("--evaluations must be >= 0")
        if self.algorithm == "tools" and (self.lora_rank or self.recipe):
            problems.append("--algorithm tools trains in full: drop --lora-rank / --recipe")
        if self.algorithm == "tools" and (self.n_train < 2 * self.batch_size or self.tool_grpo_steps < 0):
            problems.append("--algorithm tools: --n-train counts model turns, two a trace: it must be at least twice "
                            "--batch-size; --tool-grpo-steps must be >= 0")
        if self.algorithm != "sft" and self.warmup_sft_steps < 1:
            problems.append("--warmup-sft-steps must be at least 1")
        if self.lora_rank < 0 or self.lora_num_epochs < 1 or (self.lora_rank and self.algorithm != "sft"):
            problems.append("--lora-rank must be >= 0 (for --algorithm sft only) and --lora-num-epochs >= 1")
        if not self.lora_rank and (self.lora_alpha is not None or self.lora_trainable_modules):
            problems.append("--lora-alpha / --lora-trainable-modules given without --lora-rank")
        if self.num_digits < 1:
            problems.append("--num-digits must be at least 1")
            return problems
        distinct = (9 * 10 ** (self.num_digits - 1)) ** 2
        if self.algorithm != "tools" and self.n_train + self.n_eval > distinct:
            problems.append(f"--n-train + --n-eval ({self.n_train + self.n_eval}) exceeds the {distinct} distinct "
                            f"{self.num_digits}-digit additions; lower them or raise --num-digits")
        return problems


def prepare_demo(config: DemoConfig) -> tuple[Path, Path, Path]:
    """Writes data/train.jsonl, data/val.jsonl, data/select.jsonl and base-model/ under ``config.output_dir``; returns the first two and the model's.

    ``select.jsonl`` (seeded ``seed + 2``, disjoint from both other splits, as large as the
    held-out set) is the selection split: ei/grpo pick their SFT start on it, so the held-out
    accuracy they report was never used to choose anything.
    """
    output_dir = Path(config.output_dir)
    template = load_demo_template()
    train, held_out = make_demo_splits(config.n_train, config.n_eval, config.seed, config.num_digits, template)
    train_path, val_path = output_dir / "data" / "train.jsonl", output_dir / "data" / "val.jsonl"
    write_jsonl(train, train_path)
    write_jsonl(held_out, val_path)
    write_jsonl(make_arithmetic_examples(config.n_eval, seed=config.seed + 2, num_digits=config.num_digits,
                                         template=template, exclude=train + held_out), selection_path(output_dir))

    # A few thousand traces already hold every word and digit pattern the task can produce.
    corpus = [template] + [example["prompt"] + example["response"] for example in train[:4000]]
    tokenizer = build_demo_tokenizer(corpus, vocab_size=config.vocab_size)
    model = build_demo_model(tokenizer, hidden_size=config.hidden_size, num_layers=config.num_layers,
                             num_heads=config.num_heads, num_kv_heads=config.num_kv_heads, seed=config.seed)
    model_dir = output_dir / "base-model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return train_path, val_path, model_dir


def selection_path(output_dir: str | Path) -> Path:
    """Returns the demo's selection split, ``data/select.jsonl`` (picks the SFT start; never reported as held-out)."""
    return Path(output_dir) / "data" / "select.jsonl"


def demo_max_new_tokens(config: DemoConfig) -> int:
    """Returns the generation budget: ``--eval-max-new-tokens``, else a trace's length plus 12 tokens.

    A trace of d-digit operands is 10d + 6 tokens: a space, d columns of 8 (``x+y+c=ss``) with
    d - 1 spaces between them, `` </think> <answer>`` (4), at most d + 1 answer digits and
    ``</answer>``.
    """
    return config.eval_max_new_tokens if config.eval_max_new_tokens is not None else 10 * config.num_digits + 18


def demo_num_epochs(config: DemoConfig) -> int:
    """Returns the SFT run's epochs: one, or ``--lora-num-epochs`` with ``--lora-rank``."""
    return config.lora_num_epochs if config.lora_rank else 1


def demo_eval_every(config: DemoConfig) -> int:
    """Returns the SFT run's --eval-every: its steps (all epochs) cut into ``evaluations + 1`` stretches (0: no evaluation in between)."""
    steps = config.n_train // config.batch_size * demo_num_epochs(config)
    return 0 if config.evaluations < 1 else max(1, steps // (config.evaluations + 1))


DEMO_MARKER = ".reasontune-demo"
DEMO_ENTRIES = {DEMO_MARKER, "data", "base-model", "sft", "ei", "grpo"}


def claim_demo_dir(output_dir: str | Path) -> Path:
    """Returns the demo's output directory after marking it as the demo's; refuses one holding anything the demo did not make.

    The demo regenerates its data, model and runs on every start, so it may only replace what
    an earlier demo wrote: a directory it created carries the ``.reasontune-demo`` marker.
    """
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise UserError(f"--output-dir {path}: is a file; give a directory for the demo")
    entries = sorted(child.name for child in path.iterdir()) if path.is_dir() else []
    if entries and (DEMO_MARKER not in entries or set(entries) - DEMO_ENTRIES):
        foreign = sorted(set(entries) - DEMO_ENTRIES) if DEMO_MARKER in entries else entries
        raise UserError(f"--output-dir {path}: holds files the demo did not make ({', '.join(foreign[:5])}); "
                        "the demo replaces its output directory's contents, so give a new or empty one, "
                        "e.g. --output-dir runs/demo")
    path.mkdir(parents=True, exist_ok=True)
    (path / DEMO_MARKER).write_text("made by reasontune demo: its contents are regenerated on every run\n")
    return path


def demo_sft_config(config: DemoConfig, train_path: Path, val_path: Path, model_dir: Path):
    """Returns the ``SFTConfig`` of the demo's training run (one epoch over the training examples)."""
    return SFTConfig(
        train_data=str(train_path), val_data=str(val_path), reward="r1_zero", prompt_template=str(DEMO_TEMPLATE_PATH),
        # The demo regenerates its data and base model on every run, so its SFT run starts afresh too.
        model=str(model_dir), output_dir=str(Path(config.output_dir) / "sft"), overwrite=True, dtype="float32",
        attn_implementation="sdpa", device="cpu",
        num_epochs=demo_num_epochs(config), batch_size=config.batch_size, gradient_accumulation_steps=1,
        learning_rate=config.lora_learning_rate if config.lora_rank else config.learning_rate, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.95, max_grad_norm=1.0,
        lr_scheduler="cosine", warmup_ratio=config.warmup_ratio, min_lr_ratio=0.0, max_length=None,
        loss_aggregation="token_mean", seed=config.seed,
        eval_every=demo_eval_every(config), eval_examples=config.n_eval, eval_before_training=True, backend="hf",
        generation_batch_size=config.eval_batch_size, eval_max_new_tokens=demo_max_new_tokens(config),
        eval_temperature=0.0, grading_workers=0,
        save_every=0, progress=config.progress, write_report=True, num_threads=config.num_threads,
        lora_rank=config.lora_rank, lora_alpha=config.lora_alpha if config.lora_rank else None,
        lora_trainable_modules=(list(config.lora_trainable_modules or LORA_TRAINABLE_MODULES) if config.lora_rank else None),
    )


def demo_ei_config(config: DemoConfig, train_path: Path, val_path: Path, policy_dir: Path):
    """Returns the ``ExpertIterationConfig`` of the demo's EI run, starting from the under-trained SFT's ``final/``."""
    budget = demo_max_new_tokens(config)
    return ExpertIterationConfig(
        model=str(policy_dir), train_data=str(train_path), val_data=str(val_path),
        prompt_template=str(DEMO_TEMPLATE_PATH), reward="r1_zero", output_dir=str(Path(config.output_dir) / "ei"),
        overwrite=True, n_ei_steps=config.ei_steps, questions_per_step=config.ei_questions,
        group_size=config.ei_samples, sampling_temperature=config.ei_temperature, sampling_top_p=1.0,
        sampling_min_tokens=1, sampling_max_tokens=budget, sft_epochs=config.ei_epochs,
        learning_rate=config.ei_learning_rate, batch_size=config.batch_size, gradient_accumulation_steps=1,
        max_length=None, loss_aggregation="token_mean", lr_scheduler="constant", warmup_ratio=0.1,
        eval_examples=config.n_eval, eval_max_new_tokens=budget, generation_batch_size=config.eval_batch_size,
        # Integer answers grade in microseconds: worker processes would only compete for the CPU.
        grading_workers=0, seed=config.seed, dtype="float32", device="cpu", backend="hf", num_threads=config.num_threads,
        progress=config.progress, write_report=True,
    )


def accuracy_of(summary: dict[str, Any]) -> str:
    return f"{summary.get('accuracy', float('nan')):.1%}"


def run_demo(config: DemoConfig) -> int:
    """Runs the embedded demo end to end; prints held-out accuracy (base -> SFT [-> EI/GRPO]) and the run directory."""
    started = time.time()
    claim_demo_dir(config.output_dir)
    print(f"demo: writing {config.n_train} training and {config.n_eval} held-out additions, "
          f"tokenizer and tiny model under {config.output_dir}", flush=True)
    train_path, val_path, model_dir = prepare_demo(config)
    if config.algorithm != "sft":
        return run_demo_rl(config, train_path, val_path, model_dir, started)
    run_dir = Path(run_sft(demo_sft_config(config, train_path, val_path, model_dir)))
    summaries = eval_summaries(run_dir)
    elapsed = time.time() - started
    if len(summaries) >= 2:
        (_, before), (last_step, after) = summaries[0], summaries[-1]
        print(f"demo: held-out accuracy {before.get('accuracy', float('nan')):.1%} before training -> "
              f"{after.get('accuracy', float('nan')):.1%} after {last_step} steps ({elapsed / 60:.1f} min)")
    else:
        print(f"demo: finished in {elapsed / 60:.1f} min (no before/after evaluations found in {run_dir / 'eval'})")
    print(f"demo: run directory {run_dir} (report: {run_dir / 'report'})")
    return 0


def pick_under_trained(sft_dir: Path, target: float) -> tuple[Path, int, dict[str, Any]]:
    """Returns (checkpoint directory, step, eval summary) of the SFT run's evaluated checkpoint closest to ``target`` accuracy.

    The last evaluation is of ``final/``; the earliest checkpoint wins a tie; step 0 (the untrained model) is never picked.
    """
    summaries = eval_summaries(sft_dir)
    candidates = []
    for step, summary in summaries:
        directory = sft_dir / (FINAL_DIR if step == summaries[-1][0] else checkpoint_name(step))
        if step > 0 and directory.is_dir():
            candidates.append((abs(summary.get("accuracy", 0.0) - target), step, directory, summary))
    if not candidates:
        raise SystemExit(f"error: no evaluated checkpoint in {sft_dir}")
    _, step, directory, summary = min(candidates, key=lambda item: (item[0], item[1]))
    return directory, step, summary


def run_demo_rl(config: DemoConfig, train_path: Path, val_path: Path, model_dir: Path, started: float) -> int:
    """``--algorithm ei|grpo``: SFT, then EI or GRPO from its checkpoint nearest the target accuracy; prints base -> SFT -> after."""
    # The warm-up SFT is evaluated on the selection split, which picks the start; the RL stage's
    # step-0 evaluation then measures that start on the held-out set, the one that is reported.
    sft_config = dataclasses.replace(demo_sft_config(config, train_path, selection_path(config.output_dir), model_dir),
                                     max_steps=config.warmup_sft_steps, eval_every=config.warmup_eval_every,
                                     save_every=config.warmup_eval_every)
    print(f"demo: SFT ({config.warmup_sft_steps} steps, evaluated every {config.warmup_eval_every}), then "
          f"{config.algorithm} from the checkpoint closest to {config.warmup_target_accuracy:.0%} accuracy on the "
          "selection split", flush=True)
    sft_dir = Path(run_sft(sft_config))
    start_dir, start_step, sft = pick_under_trained(sft_dir, config.warmup_target_accuracy)
    print(f"demo: {config.algorithm} starts from {start_dir} (step {start_step}, selection-split accuracy "
          f"{accuracy_of(sft)})", flush=True)
    sft_minutes = (time.time() - started) / 60
    rl_started = time.time()
    if config.algorithm == "ei":
        run_dir = Path(run_expert_iteration(demo_ei_config(config, train_path, val_path, start_dir)))
    else:
        run_dir = Path(run_grpo(demo_grpo_config(config, train_path, val_path, start_dir)))
    sft_summaries, rl_summaries = eval_summaries(sft_dir), eval_summaries(run_dir)
    if not sft_summaries or not rl_summaries:
        print(f"demo: finished, but evaluations are missing in {sft_dir / 'eval'} or {run_dir / 'eval'}")
        return 1
    base, start, after = sft_summaries[0][1], rl_summaries[0][1], rl_summaries[-1][1]
    print(f"demo: held-out accuracy {accuracy_of(base)} base (selection split) -> {accuracy_of(start)} after {start_step} "
          f"SFT steps (SFT stage {sft_minutes:.1f} min) -> {accuracy_of(after)} after {config.algorithm} "
          f"({(time.time() - rl_started) / 60:.1f} min; {(time.time() - started) / 60:.1f} min in all)")
    print(f"demo: runs {sft_dir} and {run_dir} (report: {run_dir / 'report'})")
    return 0


def demo_grpo_config(config: DemoConfig, train_path: Path, val_path: Path, policy_dir: Path) -> GRPOConfig:
    """Returns the ``GRPOConfig`` of the demo's GRPO run, starting from the under-trained SFT checkpoint ``policy_dir``.

    The questions of ``train_path`` (their SFT responses are ignored) are rolled out; ``val_path``
    is evaluated greedily before, every 10 steps and after. Each step samples 16 questions x 8
    responses at temperature 0.7 and takes two optimizer steps of 64 rollouts on them (grpo_clip,
    so the second, one step stale, is importance-weighted; the clip rarely binds: < 0.1% of tokens).

    Why these settings: what the warm-up SFT start gets wrong is mostly writing the sum out of
    its own trace (the last digits come from the first columns, far back), a skill that grows
    with the number of updates rather than with less noise per update. So the budget goes to
    updates: two per rollout batch (one more no-grad forward pass per step), 60 steps at lr
    3e-5 (7e-5 and above collapse the policy), 16 questions a step at temperature 0.7 (twice
    the questions or temperature 1.0 gain less per minute). From the 23-52% starts of seeds
    0-2 this adds 21 to 74 points of held-out greedy accuracy (256 answers, about +-3 points of
    noise) in 4-8 minutes of a 2-core CPU; ``reasontune demo --algorithm grpo --seed N`` shows
    it. ``--recipe`` applies a paper's objective (DAPO: clip-higher, token mean, dynamic
    sampling) under the same settings, and gains as much.
    """
    budget = demo_max_new_tokens(config)
    return GRPOConfig.from_recipe(config.recipe,
        model=str(policy_dir), train_data=str(train_path), val_data=str(val_path), prompt_template=str(DEMO_TEMPLATE_PATH),
        reward="r1_zero", output_dir=str(Path(config.output_dir) / "grpo"), overwrite=True, dtype="float32", device="cpu",
        n_grpo_steps=60, learning_rate=3e-5, rollout_batch_size=128, group_size=8, train_batch_size=64,
        gradient_accumulation_steps=1, epochs_per_rollout_batch=1, sampling_temperature=0.7,
        sampling_min_tokens=1, sampling_max_tokens=budget, max_grad_norm=1.0,
        **({} if config.recipe else dict(loss_type="grpo_clip", cliprange=0.2, advantage_std="group",
                                          loss_aggregation="sequence_mean", kl_coef=0.0)),
        # Integer answers grade in microseconds: worker processes would only compete for the CPU.
        grading_workers=0, backend="hf", generation_batch_size=256,
        eval_every=10, eval_examples=config.n_eval, eval_max_new_tokens=budget, eval_temperature=0.0,
        save_every=0, seed=config.seed, num_threads=config.num_threads, progress=config.progress, write_report=True,
    )
