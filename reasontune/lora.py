"""LoRA adapters (the optional ``peft`` library): wrap a causal LM, save the adapter, merge it into the base weights, resume.

A LoRA-wrapped policy is a ``peft.PeftModel`` whose base weights are frozen; only the adapter's
``lora_A`` / ``lora_B`` matrices train. Where the adapter goes:

- ``checkpoint-N/``: the adapter alone (``adapter_config.json`` + ``adapter_model.safetensors``,
  PEFT's format), a few MB; ``modeling.load_for_resume(base, checkpoint)`` rebuilds the trainable model.
- ``final/``: also a merged full model (``checkpoint.save_merged`` of ``merged_weights``): base
  + scaled ``B @ A`` in every adapted layer, loadable by ``from_pretrained`` and vLLM without peft.
- A rollout engine that holds its own copy of the weights (vLLM) gets ``merged_weights``
  at each sync, under the base model's parameter names; the HF generator samples from the
  wrapped model itself and needs nothing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from reasontune.distributed import full_state_dict_layers, full_tensor, is_sharded
from reasontune.model_layers import decoder_layer_prefixes, is_peft_model

# The decoder's linear layers in Qwen2/2.5, Qwen3, Llama and Mistral: attention and MLP projections.
DECODER_LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
INSTALL_HINT = "pip install 'reasontune[lora]'"


def require_peft():
    """Returns the ``peft`` module; raises ImportError naming the extra to install when it is missing."""
    try:
        import peft
    except ImportError as error:
        raise ImportError(f"LoRA needs the peft library, which is not installed: {INSTALL_HINT}") from error
    return peft


def apply_lora(model: nn.Module, rank: int, alpha: float | None = None, dropout: float = 0.0,
               target_modules: Sequence[str] | None = None, trainable_modules: Sequence[str] = ()) -> nn.Module:
    """Returns ``model`` wrapped as a ``peft.PeftModel`` with LoRA adapters; its base weights are frozen.

    Each adapted linear layer computes ``W x + (alpha / rank) * B A dropout(x)`` with ``A``
    (rank, in) random and ``B`` (out, rank) zero, so the wrapped model starts equal to ``model``.

    Args:
        model: a Hugging Face causal LM (modified in place: its linear layers are replaced).
        rank: the adapter rank r (>= 1).
        alpha: the scaling numerator (None: 2 x rank, i.e. scale 2).
        dropout: dropout on the adapter's input during training (0 disables it).
        target_modules: module names to adapt (the last component of the name, e.g. ``q_proj``);
            None adapts every linear layer of the decoder present in the model
            (``DECODER_LINEAR_MODULES``). ``lm_head`` may be listed unless the model ties it to
            the input embeddings.
        trainable_modules: names of further modules trained in full and saved with the adapter
            (PEFT's ``modules_to_save``; a name matches every module whose name ends with it, so
            ``norm`` selects all RMSNorm weights). A base model whose norms stay frozen cannot
            sharpen its output distribution beyond what its frozen output projection allows: the
            demo's random base (embedding rows of norm 0.32, final RMSNorm weight 1) caps every
            logit at 5.7, so its LoRA runs train ``norm`` too (a few hundred weights).
    """
    peft = require_peft()
    if rank < 1:
        raise ValueError(f"LoRA rank must be at least 1, got {rank}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
    if target_modules is None:
        present = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, nn.Linear)}
        target_modules = [name for name in DECODER_LINEAR_MODULES if name in present]
        if not target_modules:
            raise ValueError(f"{type(model).__name__} has none of the decoder linear layers {DECODER_LINEAR_MODULES}; "
                             "pass target_modules (--lora-target-modules) naming its layers")
    target_modules = list(target_modules)
    if "lm_head" in target_modules and _ties_lm_head(model):
        raise ValueError("lm_head shares its weight with the input embeddings (tie_word_embeddings), so a merged "
                         "model could not keep both; leave lm_head out of the LoRA target modules")
    tying = {}
    if _ties_lm_head(model) and any(model.get_input_embeddings() is module for name, module in model.named_modules()
                                    if any(name.endswith(wanted) for wanted in trainable_modules)):
        # Without this peft trains a copy of the embeddings while the tied lm_head keeps the frozen
        # original, and the merged (tied) model could not hold both.
        if "ensure_weight_tying" not in {field.name for field in dataclasses.fields(peft.LoraConfig)}:
            raise ValueError("training the tied input embeddings needs a peft with LoraConfig.ensure_weight_tying (0.21 has it): "
                             "pip install -U peft")
        tying["ensure_weight_tying"] = True
    config = peft.LoraConfig(r=rank, lora_alpha=2 * rank if alpha is None else alpha, lora_dropout=dropout,
                             target_modules=target_modules, modules_to_save=list(trainable_modules) or None,
                             bias="none", task_type="CAUSAL_LM", **tying)
    return peft.get_peft_model(model, config)


def _ties_lm_head(model: nn.Module) -> bool:
    head, embeddings = getattr(model, "lm_head", None), model.get_input_embeddings()
    return head is not None and embeddings is not None and head.weight is embeddings.weight


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Returns the parameters that require gradients (for a LoRA model: the adapter's), for the optimizer."""
    return [parameter for parameter in model.parameters() if parameter.requires_grad]


def save_adapter(model: nn.Module, directory: str | Path, is_main: bool = True) -> Path:
    """Returns ``directory`` after writing the adapter there in PEFT's format (safetensors).

    An FSDP2-sharded model's adapter matrices, ``trainable_modules`` and root tensors are gathered
    in full first, on every rank (collectives: every rank calls it); ``is_main`` writes.
    """
    if not is_peft_model(model):
        raise TypeError(f"save_adapter needs a LoRA-wrapped model (apply_lora), got {type(model).__name__}")
    directory = Path(directory)
    state = None
    if is_sharded(model):
        # What PEFT may save: the adapter matrices and trained copies, and the root's tensors (with an adapted
        # lm_head PEFT saves its base weight too); PEFT picks from these. Never a decoder layer's frozen weights.
        layers = tuple(decoder_layer_prefixes(model))
        state = {name: full_tensor(tensor) for name, tensor in model.state_dict().items()
                 if not name.startswith(layers) or ".lora_" in name or ".modules_to_save." in name}
    if is_main:
        model.save_pretrained(directory, safe_serialization=True, state_dict=state)
    return directory


def merged_weights(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields ``(name, tensor)`` of the merged model under the base model's names (a plain model: its state dict).

    Every adapted linear layer's weight is ``W + scaling * B @ A`` (summed in float32, cast to
    ``W``'s dtype), a new tensor made when it is yielded, so a consumer that sends weights in
    chunks (the vLLM sync) never holds a second copy of the model; the live model is not touched
    and training continues exactly. Other tensors are the model's own (a module trained in full,
    ``trainable_modules``, yields its trained copy). Names are those of ``from_pretrained``
    checkpoints (``model.layers.0.self_attn.q_proj.weight``), as vLLM's ``load_weights`` expects.
    An unsharded model only (a sharded one: ``merged_weights_by_layer``).
    """
    if not is_peft_model(model):
        yield from model.state_dict().items()
        return
    yield from _merged(model, model.get_base_model().state_dict())


def merged_weights_by_layer(model: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Yields the merged model's full tensors (as ``merged_weights``) a few at a time: the root's, then one decoder layer's.

    For an FSDP2-sharded model: each dict is gathered by ``full_state_dict_layers`` (collectives:
    every rank iterates, every rank receives full tensors) and merged, so no rank ever holds
    more than one layer's full weights besides the embeddings. Unsharded models work too.
    """
    prefix = "base_model.model." if is_peft_model(model) else ""
    for layer in full_state_dict_layers(model):
        base_state = {name.removeprefix(prefix): tensor for name, tensor in layer.items()}
        yield dict(_merged(model, base_state)) if prefix else base_state


def _merged(model: nn.Module, base_state: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields the merged ``(name, tensor)`` of ``base_state`` (a PEFT model's base state dict, or part of it, full tensors).

    Each adapted layer's ``base_layer.weight`` must come with its adapter matrices (they do:
    both lie in the same decoder layer or both in the root).
    """
    from peft.tuners.lora import LoraLayer

    adapted = {name: module for name, module in model.get_base_model().named_modules()
               if isinstance(module, LoraLayer) and not module.merged}  # merged: the delta is already in W
    trained_copy = f".modules_to_save.{model.active_adapter}."
    for name, tensor in base_state.items():
        # Adapter matrices are merged into their layer's weight; a trained copy replaces its original.
        if ".lora_" in name or ".original_module." in name:
            continue
        if ".modules_to_save." in name:
            if trained_copy not in name:
                continue
            name = name.replace(trained_copy, ".")
        module_name, _, leaf = name.rpartition(".base_layer.")
        if leaf == "weight" and module_name in adapted:
            module = adapted[module_name]
            merged = tensor.detach().to(torch.float32, copy=True)  # .float() would alias a float32 W
            for adapter in module.active_adapters:
                if adapter in module.lora_A:
                    lora_a = base_state[f"{module_name}.lora_A.{adapter}.weight"].detach().float()
                    lora_b = base_state[f"{module_name}.lora_B.{adapter}.weight"].detach().float()
                    delta = (lora_b @ lora_a) * module.scaling[adapter]  # peft's get_delta_weight, in float32
                    merged += delta.T if module.fan_in_fan_out else delta
            yield f"{module_name}.weight", merged.to(tensor.dtype)
        else:
            yield name.replace(".base_layer.", "."), tensor


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Returns ``dict(merged_weights(model))``: the merged model's full state dict (new tensors for adapted layers)."""
    return dict(merged_weights(model))
