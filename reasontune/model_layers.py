"""The structure of a decoder-only causal LM: its decoder blocks and their names, seen through a PEFT wrapper.

Torch-only and free of process groups and files, so the modules that shard, save, adapt or
score a model (``distributed``, ``checkpoint``, ``lora``, ``logprobs``) all import it and
none of them needs another for these questions.
"""

from __future__ import annotations

from typing import Any

import torch


def is_peft_model(model: Any) -> bool:
    """Returns True when ``model`` is a ``peft.PeftModel`` (without importing peft when it is absent)."""
    return any(cls.__module__.startswith("peft.") and cls.__name__ == "PeftModel" for cls in type(model).__mro__)


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Returns the model's transformer blocks (``model.model.layers`` for Llama/Qwen-style HF models, also under a PEFT wrapper)."""
    if is_peft_model(model):
        model = model.get_base_model()
    body = getattr(model, "model", None)
    layers = getattr(body, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no model.layers; shard_model knows HF decoder-only LMs")
    return list(layers)


def decoder_layer_prefixes(model: torch.nn.Module) -> list[str]:
    """Returns the ``state_dict`` name prefix of each decoder layer (``"model.layers.0."``, under PEFT ``"base_model.model.model.layers.0."``)."""
    names = {id(module): name for name, module in model.named_modules()}
    return [names[id(layer)] + "." for layer in decoder_layers(model)]
