"""The HF backend's own decode step and its multi-turn sessions (KV cache kept between turns), on real forward passes.

References are independent of the code under test: the model's own forward over the whole
token sequence (teacher forcing, no cache at all), the model's own decode loop
(``own_decode_step`` off), plain ``model.generate``, and the re-prefill path of the rollout
driver.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from reasontune.environments.base import Environment, Trajectory, Turn
from reasontune.environments.driver import generate_trajectories
from reasontune.generation import SamplingOptions
from reasontune.generation.decode_step import unsupported_reason
from reasontune.generation.hf import DecodeSettings, HFGenerator
from reasontune.modeling import QWEN2_5_VOCAB_SIZE, build_model_from_config, load_model, load_tokenizer, tiny_qwen2_config

OWN_STEP = DecodeSettings(own_decode_step=True, fused_projections=True)
OUTPUT = "<output>\n408\n</output>\n"
PROMPTS = ["What is 12*34? <think>", "Compute 7+8 please. <think>", "How many legs has a cat? <think>"]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(str(tiny_model_dir)).eval(), load_tokenizer(str(tiny_model_dir))


class ReplyAtTag(Environment):
    """Answers a model turn that ended with its tag with a fixed ``<output>`` block, ``max_tool_calls`` times at most."""

    def __init__(self, tag: str, reply: str = OUTPUT, max_tool_calls: int = 2):
        self.stop, self.reply, self.max_tool_calls = (tag,), reply, max_tool_calls

    def respond(self, model_turn: Turn, trajectory: Trajectory) -> Turn | None:
        if model_turn.stop_string not in self.stop:
            return None
        return Turn(role="environment", text=self.reply, program="", output=self.reply, status="ok", seconds=0.0)


def teacher_forced_logprobs(model, ids: list[int]) -> torch.Tensor:
    """Returns (len(ids) - 1, vocab) float32 log-probs of each next token: the model's forward over the whole sequence."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
    return torch.log_softmax(logits, dim=-1)


def assert_is_the_models_own_continuation(model, context: list[int], completion, greedy: bool, atol: float = 1e-4):
    """Asserts ``completion``'s tokens are argmax (greedy) and its log-probs those of one cache-free forward after ``context``."""
    reference = teacher_forced_logprobs(model, context + completion.token_ids)[len(context) - 1:]
    picked = reference.gather(1, torch.tensor(completion.token_ids)[:, None]).squeeze(1)
    torch.testing.assert_close(torch.tensor(completion.logprobs), picked, atol=atol, rtol=0)
    if greedy:
        assert completion.token_ids == reference.argmax(dim=-1).tolist()


@pytest.mark.parametrize("settings", [DecodeSettings(), OWN_STEP], ids=["model-forward", "own-step"])
def test_a_kept_cache_continues_each_row_as_the_models_forward_over_its_whole_token_sequence(tiny, settings):
    model, tokenizer = tiny
    generator = HFGenerator(model, tokenizer, batch_size=2, settings=settings)  # two batches: rows of different batches and cached lengths
    greedy = SamplingOptions(temperature=0.0, max_new_tokens=10, stop=(), return_logprobs=True)
    free = [group[0] for group in generator.generate(PROMPTS, greedy)]
    # Stop strings taken from the rows' own greedy text end rows at different steps, some mid-token.
    stops = (free[0].text[3:5], free[1].text[5:7])
    options = greedy.replace(stop=stops)
    prompt_ids = tokenizer(PROMPTS)["input_ids"]
    output_ids = tokenizer(OUTPUT, add_special_tokens=False)["input_ids"]
    with generator.open_session() as session:
        first = [group[0] for group in session.generate(PROMPTS, options)]
        assert len({c.num_tokens for c in first}) > 1
        second = session.extend([0, 1, 2], [OUTPUT] * 3, options)
        third = session.extend([2, 0], [OUTPUT] * 2, options)  # another order, one row left out
    for row in range(3):
        context = prompt_ids[row]
        assert_is_the_models_own_continuation(model, context, first[row], greedy=True)
        context = context + first[row].token_ids + output_ids
        assert second[row].prompt_token_count == len(context)
        assert_is_the_models_own_continuation(model, context, second[row], greedy=True)
        if row != 1:
            context = context + second[row].token_ids + output_ids
            assert_is_the_models_own_continuation(model, context, third[[2, 0].index(row)], greedy=True)


@pytest.mark.parametrize("max_kept_bytes", [0, None])
def test_sampled_continuations_depend_on_the_seed_alone_with_or_without_kept_caches(tiny, max_kept_bytes):
    """max_kept_bytes 0: no row keeps a cache, so every continuation prefills its whole token sequence again."""
    model, tokenizer = tiny
    generator = HFGenerator(model, tokenizer, batch_size=4)
    options = SamplingOptions(temperature=1.0, max_new_tokens=6, stop=(), n=2, seed=5, return_logprobs=True)
    with generator.open_session() as reference_session:
        reference_session.generate(PROMPTS, options)
        reference = reference_session.extend(list(range(6)), [OUTPUT] * 6, options.replace(n=1, seed=9))
    with generator.open_session() as session:
        if max_kept_bytes is not None:
            session.max_kept_bytes = max_kept_bytes
        first = [c for group in session.generate(PROMPTS, options) for c in group]
        assert all(state.cached_length == (0 if max_kept_bytes == 0 else len(state.ids) - 1)
                   for state in session._states.values())
        continued = session.extend(list(range(6)), [OUTPUT] * 6, options.replace(n=1, seed=9))
    prompt_ids = tokenizer(PROMPTS)["input_ids"]
    output_ids = tokenizer(OUTPUT, add_special_tokens=False)["input_ids"]
    for row, (a, b) in enumerate(zip(continued, reference)):
        assert a.token_ids == b.token_ids
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)
        context = prompt_ids[row // 2] + first[row].token_ids + output_ids
        assert_is_the_models_own_continuation(model, context, a, greedy=False)


def test_rollouts_with_kept_caches_equal_the_re_prefill_path(tiny):
    model, tokenizer = tiny
    greedy = SamplingOptions(temperature=0.0, max_new_tokens=12, stop=("</answer>",), return_logprobs=True)
    plain = HFGenerator(model, tokenizer, batch_size=4, settings=DecodeSettings(keep_cache=False))
    [[free]] = plain.generate(PROMPTS[1:2], greedy)
    environment = ReplyAtTag(free.text[:1])  # a tag the model writes: its first character ends each of its turns
    kept = HFGenerator(model, tokenizer, batch_size=4)
    assert plain.open_session() is None and kept.open_session() is not None
    [[with_cache]] = generate_trajectories(kept, PROMPTS[1:2], greedy, environment)
    [[re_prefilled]] = generate_trajectories(plain, PROMPTS[1:2], greedy, environment)
    # The two paths agree when the joined text tokenises as its parts did (no merge across a turn boundary).
    parts = tokenizer(PROMPTS[1])["input_ids"] + [t for turn in with_cache.turns for t in (
        turn.token_ids if turn.role == "model" else tokenizer(turn.text, add_special_tokens=False)["input_ids"])]
    assert tokenizer(PROMPTS[1] + with_cache.response)["input_ids"] == parts, "pick a prompt/tag without boundary merges"
    assert [t.role for t in with_cache.turns] == ["model", "environment", "model", "environment", "model"]
    assert [t.text for t in with_cache.turns] == [t.text for t in re_prefilled.turns]
    for ours, theirs in zip(with_cache.model_turns, re_prefilled.model_turns):
        assert ours.token_ids == theirs.token_ids
        torch.testing.assert_close(torch.tensor(ours.logprobs), torch.tensor(theirs.logprobs), atol=1e-5, rtol=0)
    assert with_cache.finish_reason == re_prefilled.finish_reason


@pytest.fixture(scope="module")
def biased_qwen2():
    """A random Qwen2 (q/k/v biases, grouped heads: 4 query heads on 2 key-value heads) with the Qwen2.5 vocabulary."""
    config = tiny_qwen2_config(vocab_size=QWEN2_5_VOCAB_SIZE, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2)
    model = build_model_from_config(config, seed=1).eval()
    with torch.no_grad():  # random init leaves biases at 0; make them count
        for layer in model.model.layers:
            for projection in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                projection.bias.normal_(0, 0.5)
    return model


GSM_LIKE = ["Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
            "Weng earns $12 an hour for babysitting.", "Betty is saving money for a new wallet which costs $100."]


def decode_both_ways(model, tokenizer, prompts, options):
    own = HFGenerator(model, tokenizer, batch_size=8, settings=OWN_STEP).generate(prompts, options)
    theirs = HFGenerator(model, tokenizer, batch_size=8, settings=DecodeSettings(own_decode_step=False)).generate(
        prompts, options)
    return [g[0] for g in own], [g[0] for g in theirs]


def test_the_own_decode_step_decodes_as_the_models_forward_and_follows_weight_updates(biased_qwen2, qwen_tokenizer):
    model, tokenizer = biased_qwen2, qwen_tokenizer
    assert unsupported_reason(model) is None
    greedy = SamplingOptions(temperature=0.0, max_new_tokens=12, min_new_tokens=12, stop=(), return_logprobs=True)
    tokens_per_update = []
    for update in range(2):
        own, theirs = decode_both_ways(model, tokenizer, GSM_LIKE, greedy)
        tokens_per_update.append([c.token_ids for c in own])
        for a, b in zip(own, theirs):
            assert a.token_ids == b.token_ids
            torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)
        tokenizer.padding_side = "left"
        encoded = tokenizer(GSM_LIKE, return_tensors="pt", padding=True)
        with torch.no_grad():
            out = model.generate(**encoded, max_new_tokens=12, min_new_tokens=12, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        assert [c.token_ids for c in own] == out[:, encoded["input_ids"].shape[1]:].tolist()
        with torch.no_grad():  # an in-place update, as an optimiser step makes: the fused weights must follow it
            for layer in model.model.layers:
                layer.self_attn.k_proj.weight.mul_(3.0)
                layer.mlp.up_proj.weight.add_(0.2)
    assert tokens_per_update[0] != tokens_per_update[1]  # the update changed what is decoded, so stale weights would show


def test_models_the_own_step_does_not_cover_fall_back_to_their_forward(biased_qwen2, qwen_tokenizer):
    config = tiny_qwen2_config(vocab_size=QWEN2_5_VOCAB_SIZE, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2)
    hooked = build_model_from_config(config, seed=1).eval()
    seen = []
    hooked.model.layers[0].mlp.register_forward_hook(lambda module, args, out: seen.append(out.shape[1]))
    assert "hooks" in unsupported_reason(hooked)
    generator = HFGenerator(hooked, qwen_tokenizer, batch_size=4, settings=OWN_STEP)
    assert generator._decode_step() is None
    greedy = SamplingOptions(temperature=0.0, max_new_tokens=4, min_new_tokens=4, stop=())
    generator.generate(GSM_LIKE[:1], greedy)
    assert seen.count(1) == 3  # every decode step ran the model's forward (its hook saw one new position each)
    config.use_sliding_window, config.sliding_window = True, 8
    assert "sliding" in unsupported_reason(build_model_from_config(config, seed=1))


SMOLLM2 = os.environ.get("REASONTUNE_SMOLLM2_DIR")


@pytest.mark.slow
@pytest.mark.skipif(not (SMOLLM2 and (Path(SMOLLM2) / "config.json").exists()),
                    reason="needs $REASONTUNE_SMOLLM2_DIR (reasontune models get smollm2-135m-instruct --output-dir DIR)")
def test_smollm2_own_decode_step_and_kept_cache_match_its_forward():
    model, tokenizer = load_model(SMOLLM2).eval(), load_tokenizer(SMOLLM2)
    greedy = SamplingOptions(temperature=0.0, max_new_tokens=8, min_new_tokens=8, stop=(), return_logprobs=True)
    own, theirs = decode_both_ways(model, tokenizer, GSM_LIKE, greedy)
    for a, b in zip(own, theirs):
        assert a.token_ids == b.token_ids
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4, rtol=0)
    generator = HFGenerator(model, tokenizer, batch_size=4)
    with generator.open_session() as session:
        [[first]] = session.generate(GSM_LIKE[:1], greedy)
        [second] = session.extend([0], [OUTPUT], greedy)
    context = tokenizer(GSM_LIKE[0])["input_ids"] + first.token_ids + tokenizer(OUTPUT, add_special_tokens=False)["input_ids"]
    assert_is_the_models_own_continuation(model, context, second, greedy=True)


@pytest.mark.parametrize("fused", [False, True])
def test_transposed_weights_give_the_models_logits_and_follow_weight_updates(qwen_tokenizer, fused):
    config = tiny_qwen2_config(vocab_size=QWEN2_5_VOCAB_SIZE, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                               tie_word_embeddings=True)  # the LM head is the embedding: its copy must follow both
    model = build_model_from_config(config, seed=3).eval()
    settings = DecodeSettings(own_decode_step=True, fused_projections=fused, transposed_weights=True)
    transposed = HFGenerator(model, qwen_tokenizer, batch_size=8, settings=settings)
    reference = HFGenerator(model, qwen_tokenizer, batch_size=8, settings=DecodeSettings(own_decode_step=False))
    greedy = SamplingOptions(temperature=0.0, max_new_tokens=10, min_new_tokens=10, stop=(), return_logprobs=True)
    step = transposed._decode_step()
    assert step is not None and step.transposed
    optimizer = torch.optim.SGD(model.parameters(), lr=5.0)
    fused_adamw = torch.optim.AdamW(model.parameters(), lr=0.05, fused=True)
    decoded = []
    for update in ("none", "optimizer", "fused_adamw", "data", "head"):
        if update in ("optimizer", "fused_adamw"):  # SGD bumps every version counter; fused AdamW moves none
            model.train()
            ids = torch.tensor([qwen_tokenizer(GSM_LIKE[0])["input_ids"]])
            model(input_ids=ids, labels=ids).loss.backward()
            versions = [p._version for p in model.parameters()]
            (optimizer if update == "optimizer" else fused_adamw).step()
            assert (versions == [p._version for p in model.parameters()]) == (update == "fused_adamw")
            optimizer.zero_grad()
        elif update == "data":  # through .data, which no version counter sees: sync_weights is the trainers' signal
            for layer in model.model.layers:
                layer.mlp.down_proj.weight.data.mul_(-4.0)
            transposed.sync_weights(model)
        elif update == "head":
            with torch.no_grad():
                model.lm_head.weight.mul_(torch.linspace(0.0, 6.0, model.lm_head.weight.shape[0])[:, None])
        ours = [g[0] for g in transposed.generate(GSM_LIKE, greedy)]
        theirs = [g[0] for g in reference.generate(GSM_LIKE, greedy)]
        for a, b in zip(ours, theirs):
            assert a.token_ids == b.token_ids
            torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)
        decoded.append([c.token_ids for c in ours])
    assert all(decoded[i] != decoded[i + 1] for i in range(4))  # every update changed the tokens: stale copies would show


def test_the_transposed_step_s_logits_equal_the_models_forward(biased_qwen2):
    from reasontune.generation.decode_step import DecodeStep
    from reasontune.generation.hf import _PreallocatedLayer

    model = biased_qwen2
    ids = torch.tensor([[5, 17, 230, 9, 4041, 77], [12, 8, 99, 3000, 6, 41]])
    with torch.no_grad():
        expected = model(input_ids=ids).logits[:, -1]
    step = DecodeStep(model, fused=False, transposed=True)
    layers = [_PreallocatedLayer(capacity=8, max_capacity=8) for _ in model.model.layers]
    mask = torch.zeros(2, 0)
    for position in range(ids.shape[1]):  # token by token through the step alone: its own cache, its own logits
        mask = torch.cat([mask, torch.zeros(2, 1)], dim=1)
        logits = step(ids[:, position], torch.full((2,), position), layers, mask)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
