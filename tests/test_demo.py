"""The embedded demo's task, tokenizer and model (fast: no training)."""

from __future__ import annotations

import re

import pytest
import torch

from reasontune.config import check_config
from reasontune.demo import (
    DEMO_TEMPLATE_PATH,
    FORMAT_TAGS,
    LORA_LEARNING_RATE,
    LORA_NUM_EPOCHS,
    DemoConfig,
    addition_trace,
    build_demo_model,
    build_demo_tokenizer,
    demo_max_new_tokens,
    demo_sft_config,
    load_demo_template,
    make_arithmetic_example,
    make_arithmetic_examples,
    make_demo_splits,
)

STEP = re.compile(r"^(\d)\+(\d)\+(\d)=(\d\d)$")
RESPONSE = re.compile(r"^ (?P<steps>[0-9+= ]+) </think> <answer>(?P<answer>\d+)</answer>$")


@pytest.fixture(scope="module")
def splits():
    return make_demo_splits(n_train=300, n_eval=120, seed=7)


@pytest.fixture(scope="module")
def tokenizer(splits):
    train, _ = splits
    return build_demo_tokenizer([load_demo_template()] + [e["prompt"] + e["response"] for e in train])


def check_trace(question: str, response: str, ground_truth: str) -> None:
    """Re-does the column addition of ``question`` with int arithmetic and compares every step."""
    a, b = map(int, re.fullmatch(r"What is (\d+)\+(\d+)\?", question).groups())
    assert ground_truth == str(a + b)
    match = RESPONSE.fullmatch(response)
    assert match, response
    assert match["answer"] == ground_truth
    steps = match["steps"].split(" ")
    assert len(steps) == max(len(str(a)), len(str(b)))
    carry, written = 0, []
    for column, step in enumerate(steps):
        x, y, c, s = STEP.fullmatch(step).groups()
        assert int(x) == a // 10 ** column % 10 and int(y) == b // 10 ** column % 10
        assert int(c) == carry
        assert int(s) == int(x) + int(y) + int(c)
        carry, written = int(s) // 10, [int(s) % 10] + written
    assert int("".join(map(str, [carry] + written))) == a + b


def test_trace_of_a_hand_worked_sum():
    # 457 + 368: 7+8 = 15 (write 5, carry 1), 5+6+1 = 12 (write 2, carry 1), 4+3+1 = 8 -> 825.
    assert addition_trace(457, 368) == "7+8+0=15 5+6+1=12 4+3+1=08"
    # 999 + 999 = 1998: the last column's carry becomes the leading digit.
    assert addition_trace(999, 999) == "9+9+0=18 9+9+1=19 9+9+1=19"


def test_traces_are_arithmetically_right(splits):
    for example in splits[0] + splits[1]:
        check_trace(example["question"], example["response"], example["ground_truth"])
        assert example["prompt"] == load_demo_template().format(question=example["question"])
        assert example["prompt"].endswith("Assistant: <think>")
        # The strict R1-Zero format the grader requires.
        assert "</think> <answer>" in example["response"] and example["response"].endswith("</answer>")


def test_other_widths_are_right():
    for example in make_arithmetic_examples(50, seed=3, num_digits=5):
        check_trace(example["question"], example["response"], example["ground_truth"])
        a, b = map(int, re.findall(r"\d+", example["question"]))
        assert 10_000 <= a <= 99_999 and 10_000 <= b <= 99_999


def test_splits_are_disjoint_seeded_and_distinct(splits):
    train, held_out = splits
    assert len(train) == 300 and len(held_out) == 120
    train_questions = {e["question"] for e in train}
    assert len(train_questions) == 300 and len({e["question"] for e in held_out}) == 120
    assert not train_questions & {e["question"] for e in held_out}
    assert make_demo_splits(n_train=300, n_eval=120, seed=7) == splits
    assert make_demo_splits(n_train=300, n_eval=120, seed=8)[0] != train


def test_asking_for_more_examples_than_exist_fails():
    with pytest.raises(ValueError, match="only 81"):
        make_arithmetic_examples(82, seed=0, num_digits=1)


def test_template_file_is_a_compact_r1_zero_prompt():
    text = DEMO_TEMPLATE_PATH.read_text()
    assert "{question}" in text and text.endswith("Assistant: <think>")
    assert "</think> <answer>" not in text.replace("</think> and", "")  # describes the tags, shows no answer


def test_tokenizer_round_trips_task_text_and_arbitrary_text(splits, tokenizer):
    texts = [e["prompt"] for e in splits[1]] + [e["response"] for e in splits[1]] + [
        "anything a model might emit: ÄÖÜ ∑ 12,345.6  \n\t<answer> x</answer>zz</think>",
    ]
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text
        assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_digits_and_tags_are_single_tokens(splits, tokenizer):
    digit_ids = set()
    for digit in "0123456789":
        ids = tokenizer(digit, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1
        digit_ids.add(ids[0])
    for tag in FORMAT_TAGS:
        assert len(tokenizer(tag, add_special_tokens=False)["input_ids"]) == 1
    # In context too: every digit of a trace is its own token (no merged "15" or " 7").
    response = splits[0][0]["response"]
    tokens = [tokenizer.decode([i]) for i in tokenizer(response, add_special_tokens=False)["input_ids"]]
    assert sum(t.isdigit() for t in tokens) == sum(ch.isdigit() for ch in response)
    assert all(len(t) == 1 for t in tokens if any(ch.isdigit() for ch in t))
    assert " </think> <answer>" in tokenizer.decode(tokenizer(response, add_special_tokens=False)["input_ids"])


def test_tokenizer_has_eos_and_pad_and_adds_no_bos(tokenizer):
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.pad_token == "<|pad|>"
    assert tokenizer.eos_token_id != tokenizer.pad_token_id
    assert tokenizer("7+8", add_special_tokens=True)["input_ids"] == tokenizer("7+8", add_special_tokens=False)["input_ids"]
    assert len(tokenizer) <= 384


def test_saved_model_and_tokenizer_load_and_run(tmp_path, splits, tokenizer):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = build_demo_model(tokenizer, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, seed=1)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded_tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.config.model_type == "qwen2" and loaded.config.vocab_size == len(loaded_tokenizer)

    prompts = [e["prompt"] for e in splits[1][:3]]
    assert [loaded_tokenizer(p)["input_ids"] for p in prompts] == [tokenizer(p)["input_ids"] for p in prompts]
    batch = loaded_tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = loaded(**batch).logits
        original = model(**batch).logits
    assert logits.shape == (3, batch["input_ids"].shape[1], len(tokenizer))
    torch.testing.assert_close(logits, original)
    # Generation ends at EOS or at the stop string </answer>, which must not be an EOS id
    # (generators drop EOS from the completion text, and the grader needs the closing tag).
    assert loaded.generation_config.eos_token_id == tokenizer.eos_token_id
    assert loaded.generation_config.pad_token_id == tokenizer.pad_token_id


def test_default_model_is_small(tokenizer):
    model = build_demo_model(tokenizer)
    parameters = sum(p.numel() for p in model.parameters())
    assert 1_000_000 < parameters < 4_000_000
    assert model.config._attn_implementation == "sdpa" and next(model.parameters()).dtype == torch.float32


@pytest.mark.parametrize("num_digits", [1, 3, 5])
def test_generation_budget_covers_the_longest_trace(num_digits):
    examples = make_arithmetic_examples(40, seed=num_digits, num_digits=num_digits)
    # The longest trace has a carry out of the last column (one more answer digit): 99..9 + 99..9.
    nines = int("9" * num_digits)
    examples.append(make_arithmetic_example(nines, nines, load_demo_template()))
    tokenizer = build_demo_tokenizer([e["prompt"] + e["response"] for e in examples])
    lengths = [len(tokenizer(e["response"], add_special_tokens=False)["input_ids"]) for e in examples]
    assert max(lengths) == 10 * num_digits + 6
    assert demo_max_new_tokens(DemoConfig(num_digits=num_digits)) >= max(lengths) + 8
    assert demo_max_new_tokens(DemoConfig(num_digits=num_digits, eval_max_new_tokens=99)) == 99


def test_sft_config_trains_one_epoch_on_the_demo_files(tmp_path):
    config = DemoConfig(output_dir=str(tmp_path), n_train=640, batch_size=32, n_eval=200)
    sft = demo_sft_config(config, tmp_path / "data" / "train.jsonl", tmp_path / "data" / "val.jsonl", tmp_path / "base-model")
    assert sft.model == str(tmp_path / "base-model") and sft.output_dir == str(tmp_path / "sft")
    assert sft.prompt_template == str(DEMO_TEMPLATE_PATH) and sft.reward == "r1_zero"
    assert (sft.num_epochs, sft.max_steps, sft.batch_size, sft.gradient_accumulation_steps) == (1, None, 32, 1)
    assert sft.eval_before_training and sft.eval_examples == 200 and sft.eval_temperature == 0.0
    assert sft.eval_max_new_tokens == 48 and sft.device == "cpu" and sft.dtype == "float32"


def test_lora_rank_turns_on_lora_with_its_own_rate_and_trained_embeddings(tmp_path):
    paths = (tmp_path / "train.jsonl", tmp_path / "val.jsonl", tmp_path / "base-model")
    full = demo_sft_config(DemoConfig(output_dir=str(tmp_path), learning_rate=1e-3), *paths)
    assert (full.lora_rank, full.lora_alpha, full.lora_trainable_modules, full.learning_rate) == (0, None, None, 1e-3)
    assert full.num_epochs == 1
    lora = demo_sft_config(DemoConfig(output_dir=str(tmp_path), learning_rate=1e-3, lora_rank=16), *paths)
    assert lora.lora_rank == 16 and lora.lora_alpha is None and lora.learning_rate == LORA_LEARNING_RATE != 1e-3
    assert lora.lora_trainable_modules == ["embed_tokens", "norm"] and lora.num_epochs == LORA_NUM_EPOCHS
    # 12800 / 32 = 400 steps an epoch; the default 4 evaluations cut the run into 5 stretches.
    assert (full.eval_every, lora.eval_every) == (400 // 5, 400 * LORA_NUM_EPOCHS // 5)
    given = demo_sft_config(DemoConfig(output_dir=str(tmp_path), lora_rank=8, lora_alpha=64.0, lora_learning_rate=5e-3,
                                       lora_trainable_modules=["norm"], lora_num_epochs=3), *paths)
    assert (given.lora_rank, given.lora_alpha, given.lora_trainable_modules, given.learning_rate) == (8, 64.0, ["norm"], 5e-3)
    assert given.num_epochs == 3


@pytest.mark.parametrize("options, message", [({"lora_rank": -1}, "--lora-rank must be >= 0"),
                                             ({"lora_num_epochs": 0}, "--lora-num-epochs >= 1"),
                                             ({"lora_rank": 16, "algorithm": "ei"}, "sft only"),
                                             ({"lora_alpha": 32.0}, "without --lora-rank")])
def test_config_rejects_lora_options_it_cannot_honour(options, message):
    from reasontune.config import config_from_dict

    with pytest.raises(SystemExit, match=message):
        config_from_dict(options, DemoConfig)


def test_config_rejects_more_examples_than_the_task_has():
    from reasontune.config import config_from_dict

    with pytest.raises(SystemExit, match="81 distinct 1-digit"):
        config_from_dict({"num_digits": 1, "n_train": 64, "n_eval": 32}, DemoConfig)
    assert config_from_dict({"num_digits": 2, "n_train": 64, "n_eval": 32}, DemoConfig).n_train == 64


def test_ei_config_starts_from_the_under_trained_sft(tmp_path):
    from reasontune.demo import demo_ei_config

    config = DemoConfig(output_dir=str(tmp_path), algorithm="ei", ei_steps=3, ei_questions=100, ei_samples=5,
                        ei_temperature=0.9, ei_learning_rate=2e-4, ei_epochs=2, n_eval=200)
    ei = demo_ei_config(config, tmp_path / "data" / "train.jsonl", tmp_path / "data" / "val.jsonl", tmp_path / "sft" / "final")
    assert ei.model == str(tmp_path / "sft" / "final") and ei.output_dir == str(tmp_path / "ei")
    assert ei.train_data == str(tmp_path / "data" / "train.jsonl") and ei.val_data == str(tmp_path / "data" / "val.jsonl")
    assert (ei.n_ei_steps, ei.questions_per_step, ei.group_size, ei.sft_epochs) == (3, 100, 5, 2)
    assert (ei.sampling_temperature, ei.learning_rate, ei.eval_examples) == (0.9, 2e-4, 200)
    assert ei.sampling_max_tokens == ei.eval_max_new_tokens == 48 and ei.sampling_min_tokens >= 1
    assert ei.prompt_template == str(DEMO_TEMPLATE_PATH) and ei.device == "cpu" and ei.backend == "hf"


def test_config_rejects_a_warmup_sft_of_no_steps():
    from reasontune.config import config_from_dict

    with pytest.raises(SystemExit, match="--warmup-sft-steps"):
        config_from_dict({"algorithm": "ei", "warmup_sft_steps": 0}, DemoConfig)
    assert config_from_dict({"algorithm": "grpo"}, DemoConfig).algorithm == "grpo"
    assert DemoConfig().algorithm == "sft"


def test_the_start_is_the_checkpoint_closest_to_the_target_accuracy(tmp_path):
    import json

    from reasontune.demo import pick_under_trained

    # step: accuracy; 60 is the last evaluation (final/), 20 has no checkpoint directory left.
    for step, accuracy in {0: 0.0, 20: 0.5, 40: 0.25, 50: 0.75, 60: 0.875}.items():
        (tmp_path / "eval" / f"step-{step:06d}").mkdir(parents=True)
        (tmp_path / "eval" / f"step-{step:06d}" / "summary.json").write_text(json.dumps({"accuracy": accuracy}))
    for name in ("checkpoint-40", "checkpoint-50", "final"):
        (tmp_path / name).mkdir()
    # |0.25 - 0.5| = |0.75 - 0.5| = 0.25 exactly (binary fractions): the earlier one wins.
    assert pick_under_trained(tmp_path, 0.5)[:2] == (tmp_path / "checkpoint-40", 40)
    assert pick_under_trained(tmp_path, 0.7)[:2] == (tmp_path / "checkpoint-50", 50)
    assert pick_under_trained(tmp_path, 1.0)[:2] == (tmp_path / "final", 60)
    assert pick_under_trained(tmp_path, 0.0)[:2] == (tmp_path / "checkpoint-40", 40)  # never the untrained step 0


def test_demo_grpo_config_is_valid_and_starts_from_the_picked_checkpoint(tmp_path):
    from reasontune.demo import demo_grpo_config

    demo = DemoConfig(output_dir=str(tmp_path), seed=3, num_threads=2)
    config = demo_grpo_config(demo, tmp_path / "data" / "train.jsonl", tmp_path / "data" / "val.jsonl",
                              tmp_path / "sft" / "checkpoint-40")
    check_config(config, environment=False)
    assert config.model == str(tmp_path / "sft" / "checkpoint-40") and config.val_data == str(tmp_path / "data" / "val.jsonl")
    assert config.seed == 3 and config.num_threads == 2 and config.eval_temperature == 0.0
    assert config.output_dir == str(tmp_path / "grpo")


def test_selection_split_is_disjoint_and_the_recipe_reaches_grpo(tmp_path):
    import json

    from reasontune.demo import demo_grpo_config, prepare_demo, selection_path

    demo = DemoConfig(output_dir=str(tmp_path), n_train=64, n_eval=16, hidden_size=32, num_layers=1, num_heads=4,
                      num_kv_heads=2, recipe="dapo")
    train_path, val_path, _ = prepare_demo(demo)
    questions = {name: {json.loads(line)["question"] for line in path.read_text().splitlines()}
                 for name, path in (("train", train_path), ("val", val_path), ("select", selection_path(tmp_path)))}
    assert len(questions["select"]) == 16
    assert not questions["select"] & questions["train"] and not questions["select"] & questions["val"]
    config = demo_grpo_config(demo, train_path, val_path, tmp_path / "sft" / "checkpoint-20")
    check_config(config, environment=False)
    assert (config.recipe, config.loss_aggregation, config.cliprange_high) == ("dapo", "token_mean", 0.28)
    assert config.learning_rate == 3e-5 and config.n_grpo_steps == 60  # the demo's settings stay under the recipe
