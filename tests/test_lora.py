"""LoRA: wrapping, the fused log-prob path through an adapter, adapter/merged saving, resume, generator sync."""

from __future__ import annotations

import copy
import sys

import pytest
import torch

peft = pytest.importorskip("peft")

from reasontune.logprobs import fused_unsupported_reason, get_response_log_probs  # noqa: E402
from reasontune.lora import (apply_lora, is_peft_model, load_for_resume, merged_state_dict,  # noqa: E402
                             save_adapter, save_merged, trainable_parameters)

ALL_DECODER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def randomize_adapters(model, seed: int = 7, scale: float = 0.2) -> None:
    """Gives every lora_B a non-zero value (peft starts B at 0, where a wrong adapter path would go unseen)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
            elif ".modules_to_save." in name:  # a fully trained copy (trainable_modules), e.g. an RMSNorm weight
                parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)


def lora_model(base, rank=4, target_modules=None, seed=7, trainable_modules=()):
    model = apply_lora(base, rank=rank, alpha=3 * rank, dropout=0.0, target_modules=target_modules,
                       trainable_modules=trainable_modules)
    randomize_adapters(model, seed)
    return model


def test_apply_lora_freezes_the_base_and_adapts_every_decoder_linear(tiny_qwen2):
    model = apply_lora(tiny_qwen2, rank=4, alpha=8, dropout=0.0)
    assert is_peft_model(model)
    trainable = trainable_parameters(model)
    names = [name for name, parameter in model.named_parameters() if parameter.requires_grad]
    assert names and all(".lora_A." in name or ".lora_B." in name for name in names)
    assert not any("lm_head" in name or "embed_tokens" in name for name in names)
    assert {name.split(".lora_")[0].rsplit(".", 1)[-1] for name in names} == set(ALL_DECODER)
    # hidden 32, 4 heads of 8, 2 KV heads (k/v out 16), MLP 128; rank 4 costs 4 x (in + out) a layer:
    # q 64, k 48, v 48, o 64, gate 160, up 160, down 160 = 704 -> 2 layers x 4 x 704 = 5632.
    assert sum(p.numel() for p in trainable) == 5632
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)


def test_trainable_modules_train_in_full_beside_the_adapters(tiny_qwen2):
    model = apply_lora(tiny_qwen2, rank=4, trainable_modules=["norm"])
    names = [n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n]
    # "norm" matches every RMSNorm by suffix: 2 layers x (input, post-attention) + the final norm, 32 weights each.
    assert len(names) == 5 and all(n.endswith("norm.modules_to_save.default.weight") for n in names)
    assert sum(p.numel() for p in trainable_parameters(model)) == 5632 + 5 * 32


def test_apply_lora_refuses_bad_arguments(tiny_qwen2):
    with pytest.raises(ValueError, match="rank"):
        apply_lora(tiny_qwen2, rank=0)
    from reasontune.modeling import build_model_from_config, tiny_qwen2_config

    tied = build_model_from_config(tiny_qwen2_config(vocab_size=97, hidden_size=32, tie_word_embeddings=True))
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        apply_lora(tied, rank=2, target_modules=["q_proj", "lm_head"])


def test_missing_peft_names_the_extra(monkeypatch, tiny_qwen2):
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft now raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'reasontune\[lora\]'"):
        apply_lora(tiny_qwen2, rank=2)


def _batch(vocab_size: int, seed: int = 3):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab_size, (3, 11), generator=generator)
    labels = torch.randint(0, vocab_size, (3, 11), generator=generator)
    response_mask = torch.zeros(3, 11, dtype=torch.bool)
    response_mask[0, 4:9] = True
    response_mask[1, 2:11] = True
    response_mask[2, 7:10] = True
    return input_ids, labels, response_mask


def _full_logits_reference(model, input_ids, labels, response_mask):
    """Returns (log_probs, entropy), both (batch, seq) in the model's dtype, from the model's full logits."""
    log_p = torch.log_softmax(model(input_ids=input_ids).logits, dim=-1)
    log_probs = log_p.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    entropy = -(log_p.exp() * log_p).sum(dim=-1)
    return {"log_probs": log_probs * response_mask, "token_entropy": entropy * response_mask}


def _loss_and_grads(model, implementation, input_ids, labels, response_mask):
    """Returns (log_probs, entropy, {name: grad}) of a loss weighting each position differently."""
    model.zero_grad(set_to_none=True)
    if implementation == "reference":
        out = _full_logits_reference(model, input_ids, labels, response_mask)
    else:
        out = get_response_log_probs(model, input_ids, labels, return_token_entropy=True,
                                     response_mask=response_mask, implementation=implementation, chunk_size=3)
    weights = torch.linspace(0.5, 2.0, labels.numel(), dtype=torch.float64).view_as(labels)
    loss = (out["log_probs"] * weights).sum() + 0.3 * (out["token_entropy"] * weights.flip(0)).sum()
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    return out["log_probs"].detach(), out["token_entropy"].detach(), grads


@pytest.mark.parametrize("target_modules", [None, list(ALL_DECODER) + ["lm_head"]], ids=["decoder", "with-lm_head"])
def test_fused_log_probs_and_gradients_through_lora_equal_full_logits(tiny_qwen2, target_modules):
    base_log_probs = _full_logits_reference(tiny_qwen2.double(), *_batch(97))["log_probs"]
    # float64: the gradients reach ~60, where float32 rounding alone (~1e-5 relative to the sum of
    # many terms) would blur a 1e-5 comparison; float64 makes 1e-5 a test of the math, not of rounding.
    model = lora_model(tiny_qwen2.double(), target_modules=target_modules)
    assert fused_unsupported_reason(model) is None  # "auto" takes the fused path
    input_ids, labels, response_mask = _batch(97)
    fused = _loss_and_grads(model, "fused", input_ids, labels, response_mask)
    # Reference: the PEFT model's own forward to full logits, then log-softmax and entropy by definition.
    naive = _loss_and_grads(model, "reference", input_ids, labels, response_mask)
    torch.testing.assert_close(fused[0], naive[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused[1], naive[1], atol=1e-5, rtol=1e-5)
    assert fused[2].keys() == naive[2].keys()
    assert any("lm_head.lora_B" in name for name in fused[2]) == (target_modules is not None)
    for name in naive[2]:
        torch.testing.assert_close(fused[2][name], naive[2][name], atol=1e-5, rtol=1e-5, msg=name)
        assert fused[2][name].abs().max() > 0, name
    # The adapter matters: the wrapped model's log-probs are not the base model's.
    moved = (naive[0] - base_log_probs.detach()).abs()[response_mask]
    assert moved.max() > 0.05


def test_fused_path_drops_a_disabled_lm_head_adapter(tiny_qwen2):
    model = lora_model(tiny_qwen2, target_modules=["q_proj", "lm_head"])
    input_ids, labels, response_mask = _batch(97)

    def log_probs(implementation):
        return get_response_log_probs(model, input_ids, labels, response_mask=response_mask,
                                      implementation=implementation)["log_probs"]

    adapted = log_probs("fused")
    with model.disable_adapter():
        fused, reference = log_probs("fused"), log_probs("naive")
    torch.testing.assert_close(fused, reference, atol=1e-5, rtol=1e-5)
    assert (fused - adapted).abs().max() > 0.05


def test_merged_model_equals_the_adapter_model_and_leaves_it_intact(tiny_qwen2, tmp_path):
    from transformers import AutoModelForCausalLM

    model = lora_model(tiny_qwen2, target_modules=list(ALL_DECODER) + ["lm_head"], trainable_modules=["norm"])
    input_ids, _, _ = _batch(97)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    with torch.no_grad():
        expected = model(input_ids=input_ids).logits
    save_merged(model, None, tmp_path / "merged")
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not is_peft_model(merged) and type(merged).__name__ == "Qwen2ForCausalLM"
    with torch.no_grad():
        # float32 through two kernel paths (the adapter wrapper vs the merged model) differs by ~2e-5 on a few
        # logits; a head left at the frozen original would differ by the randomised embedding, O(0.1) and up.
        torch.testing.assert_close(merged(input_ids=input_ids).logits, expected, atol=1e-4, rtol=1e-4)
    # The live adapter model is untouched, bit for bit, and still trains only its adapters.
    for name, parameter in model.named_parameters():
        assert torch.equal(parameter, before[name]), name
    assert all(p.requires_grad == ("lora_" in n or ".modules_to_save." in n) for n, p in model.named_parameters())
    # vLLM's load_weights gets the plain checkpoint names.
    assert set(merged_state_dict(model)) == set(merged.state_dict())


def test_adapter_checkpoint_resumes_the_same_trainable_model(tiny_model_dir, tmp_path):
    from reasontune.modeling import load_model

    model = lora_model(load_model(str(tiny_model_dir)), trainable_modules=["norm"])
    save_adapter(model, tmp_path / "checkpoint-3")
    files = {path.name for path in (tmp_path / "checkpoint-3").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files
    assert "model.safetensors" not in files  # the adapter only, not the base weights
    resumed = load_for_resume(tiny_model_dir, tmp_path / "checkpoint-3")
    assert [n for n, p in resumed.named_parameters() if p.requires_grad] == \
           [n for n, p in model.named_parameters() if p.requires_grad]
    for (name, a), (_, b) in zip(model.named_parameters(), resumed.named_parameters()):
        assert torch.equal(a, b), name
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_for_resume(tiny_model_dir, tiny_model_dir)


def test_trainer_checkpoint_of_a_lora_model_holds_the_adapter(tiny_model_dir, tmp_path):
    """checkpoint.save_checkpoint (every trainer's checkpoint-N/) writes PEFT's adapter files for a LoRA model."""
    from reasontune.checkpoint import save_checkpoint
    from reasontune.modeling import load_model, load_tokenizer

    model = lora_model(load_model(str(tiny_model_dir)), rank=2)
    path = save_checkpoint(tmp_path / "checkpoint-5", model, load_tokenizer(str(tiny_model_dir)), {"step": 5})
    assert (path / "adapter_model.safetensors").exists() and not (path / "model.safetensors").exists()
    resumed = load_for_resume(tiny_model_dir, path)
    input_ids, _, _ = _batch(len(load_tokenizer(str(tiny_model_dir))))
    with torch.no_grad():
        torch.testing.assert_close(resumed(input_ids=input_ids).logits, model(input_ids=input_ids).logits)


def test_hf_generator_samples_from_the_adapter_after_a_step(tiny_model_dir):
    """The sync is real: after one large step, the generator's log-probs follow the adapted model."""
    from reasontune.generation import SamplingOptions
    from reasontune.generation.hf import HFGenerator
    from reasontune.modeling import load_model, load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model_dir))
    torch.manual_seed(0)
    model = apply_lora(load_model(str(tiny_model_dir)), rank=4, alpha=8, dropout=0.0)
    initial = copy.deepcopy(model)
    generator = HFGenerator(model, tokenizer, batch_size=2)
    options = SamplingOptions(temperature=0.0, max_new_tokens=6, stop=("\x00",), return_logprobs=True)
    prompt = "What is 12 + 30?"

    # One SGD step with a large rate on a fixed target response.
    prompt_ids = tokenizer(prompt)["input_ids"]
    target_ids = tokenizer(" 42 </think> <answer>42</answer>")["input_ids"]
    input_ids = torch.tensor([prompt_ids + target_ids[:-1]])
    labels = torch.tensor([prompt_ids[1:] + target_ids])
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[0, len(prompt_ids) - 1:] = True
    optimizer = torch.optim.SGD(trainable_parameters(model), lr=5.0)
    out = get_response_log_probs(model, input_ids, labels, response_mask=mask)
    (-(out["log_probs"].sum())).backward()
    optimizer.step()

    completion = generator.generate([prompt], options)[0][0]
    ids = prompt_ids + completion.token_ids
    full = torch.tensor([ids[:-1]])
    next_ids = torch.tensor([ids[1:]])
    response = torch.zeros_like(next_ids, dtype=torch.bool)
    response[0, len(prompt_ids) - 1:] = True
    with torch.no_grad():
        now = get_response_log_probs(model, full, next_ids, response_mask=response)["log_probs"][response]
        then = get_response_log_probs(initial, full, next_ids, response_mask=response)["log_probs"][response]
    torch.testing.assert_close(torch.tensor(completion.logprobs), now, atol=1e-4, rtol=1e-4)
    assert (now - then).abs().max() > 0.1  # the step moved these tokens' log-probs, and the generator saw it


@pytest.mark.gpu
def test_vllm_generator_follows_the_adapter_after_a_step(tiny_model_dir):
    """vLLM holds its own weights: after a step, the merged weights are pushed and its log-probs follow."""
    pytest.importorskip("vllm")
    from reasontune.generation import SamplingOptions
    from reasontune.generation.vllm import VLLMGenerator
    from reasontune.modeling import load_model

    model = apply_lora(load_model(str(tiny_model_dir), device="cuda"), rank=4, alpha=8)
    generator = VLLMGenerator(str(tiny_model_dir), dtype="float32", gpu_memory_utilization=0.2, enforce_eager=True)
    options = SamplingOptions(temperature=0.0, max_new_tokens=6, stop=("\x00",), return_logprobs=True)
    before = generator.generate(["What is 12 + 30?"], options)[0][0]
    randomize_adapters(model, scale=0.5)  # stands in for a large training step
    generator.sync_weights(model)
    after = generator.generate(["What is 12 + 30?"], options)[0][0]
    from reasontune.modeling import load_tokenizer

    ids = load_tokenizer(str(tiny_model_dir))("What is 12 + 30?")["input_ids"]
    sequence = ids + after.token_ids
    labels = torch.tensor([sequence[1:]], device="cuda")
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[0, len(ids) - 1:] = True
    with torch.no_grad():
        expected = get_response_log_probs(model, torch.tensor([sequence[:-1]], device="cuda"), labels,
                                          response_mask=mask)["log_probs"][mask].cpu()
    torch.testing.assert_close(torch.tensor(after.logprobs), expected, atol=2e-3, rtol=2e-3)
    assert before.token_ids != after.token_ids or max(abs(a - b) for a, b in zip(before.logprobs, after.logprobs)) > 0.1


def test_sft_with_lora_saves_adapters_merges_final_and_resumes_exactly(tiny_model_dir, tmp_path):
    """reasontune sft --lora-rank: checkpoint-N holds the adapter, final/ a merged model that loads without peft,
    and a run resumed from checkpoint-1 ends with the weights of an uninterrupted run."""
    import json

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from reasontune.training.sft import SFTConfig, run_sft

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Q: {i}+{i}?", "response": f" {2 * i} </think> <answer>{2 * i}</answer>"})
                            + "\n" for i in range(12)))

    def config(out, **changes):
        values = dict(model=str(tiny_model_dir), train_data=str(data), output_dir=str(tmp_path / out), batch_size=4,
                      gradient_accumulation_steps=1, learning_rate=5e-3, warmup_ratio=0.0, lr_scheduler="constant",
                      max_length=64, eval_examples=0, lora_rank=4, lora_alpha=8.0, num_threads=1, progress=False,
                      write_report=False, save_every=1)
        values.update(changes)
        return SFTConfig(**values)

    reference = run_sft(config("reference", max_steps=3))
    assert (reference / "checkpoint-1" / "adapter_config.json").exists()
    assert not (reference / "final" / "adapter_config.json").exists()  # final/ is a plain merged model
    assert (reference / "final" / "adapter" / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(reference / "final")
    base = load_file(tiny_model_dir / "model.safetensors")
    moved = {k: v for k, v in merged.state_dict().items() if k in base and not torch.equal(v, base[k])}
    assert any("q_proj" in k for k in moved) and not any("layernorm" in k for k in moved)  # only adapted layers

    run_sft(config("interrupted", max_steps=2))  # leaves checkpoint-1 (and a final/ of step 2)
    resumed = run_sft(config("interrupted", max_steps=3, resume=True))
    final_a = AutoModelForCausalLM.from_pretrained(reference / "final").state_dict()
    final_b = AutoModelForCausalLM.from_pretrained(resumed / "final").state_dict()
    for name in final_a:
        torch.testing.assert_close(final_b[name], final_a[name], atol=0, rtol=0, msg=name)


def test_trained_tied_embeddings_train_the_output_head_too_and_merge_tied(tmp_path):
    from transformers import AutoModelForCausalLM

    from reasontune.modeling import build_model_from_config, tiny_qwen2_config

    base = build_model_from_config(tiny_qwen2_config(vocab_size=97, hidden_size=32, num_heads=4, num_kv_heads=2,
                                                     tie_word_embeddings=True), seed=0)
    model = lora_model(base, trainable_modules=["embed_tokens", "norm"])  # randomizes the trained embedding copy
    inner = model.get_base_model()
    embedding = inner.get_input_embeddings().modules_to_save["default"].weight
    # One trained matrix is both the input embedding and the output head (the original stays frozen).
    assert inner.lm_head.modules_to_save["default"].weight is embedding and embedding.requires_grad
    input_ids, _, _ = _batch(97)
    with torch.no_grad():
        hidden = inner.model(input_ids=input_ids).last_hidden_state
        expected = model(input_ids=input_ids).logits
    torch.testing.assert_close(expected, hidden @ embedding.T)
    # The merged model is still tied and computes the same logits: a head left at the frozen
    # original (peft's default) would disagree with the tied trained embedding after saving.
    save_merged(model, None, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert merged.lm_head.weight is merged.get_input_embeddings().weight
    with torch.no_grad():
        # float32 through two kernel paths (the adapter wrapper vs the merged model) differs by ~2e-5 on a few
        # logits; a head left at the frozen original would differ by the randomised embedding, O(0.1) and up.
        torch.testing.assert_close(merged(input_ids=input_ids).logits, expected, atol=1e-4, rtol=1e-4)
