"""HF backend speed and memory on CPU, each against a baseline measured in the same run.

Sections (``--sections``, comma-separated; all by default):

- ``smollm2``: SmolLM2-135M-Instruct (``--model DIR``, default ``$REASONTUNE_SMOLLM2_DIR``; the
  section is skipped with the reason where there is no such directory; ``reasontune models get
  smollm2-135m-instruct --output-dir DIR`` makes one) on GSM8K prompts in the R1-Zero template,
  at batch 1, 8, 32 and 64, greedy and sampled (temperature 1) with log-probs. Three columns:
  ``HFGenerator``; plain ``model.generate`` on the same left-padded batches (log-probs from
  ``output_scores`` and ``compute_transition_scores``, as a user of transformers gets them); and
  a roofline measured here: the time of the model's own matrix multiplies (every linear layer
  with its own weights, ``torch.mm``; attention's two products, ``torch.bmm``; the LM head on the
  last position) at the shapes of one unpadded prefill of every prompt and of each decode step.
  Every row generates exactly ``--max-new-tokens`` (``min_new_tokens`` equal, no stop strings),
  so all three count the same tokens. ``HFGenerator`` prefills a template prefix shared by the
  batch once, which the roofline's full prefill does not, so it may pass 100% of it.
- ``ablation``: SmolLM2 at ``--ablation-batch`` (sampled with log-probs, ``--ablation-samples``
  samples per prompt, EOS and the ``</answer>`` stop honoured as in a GRPO rollout): the default
  settings, then each ``DecodeSettings`` switch flipped alone (the off-by-default fused
  projections turned on; ``transposed_weights off`` is what the transposed weight copies buy),
  and 2 threads against 1.
- ``profile``: where ``HFGenerator``'s time goes at ``--ablation-batch`` (torch.profiler
  operators and the Python functions with the most own time).
- ``tools``: multi-turn rollouts on SmolLM2 (``--ablation-batch`` rows, an environment that
  answers each turn ending at '.' with a fixed output block, ``--tool-calls`` times at most):
  each row's KV cache kept between turns (``HFSession``) against re-prefilling the whole text.
- ``memory``: peak memory (resident set growth over the process before the call, each length in a
  fresh process) of greedy generation with entropy and log-probs recorded, against new tokens
  256 → 4,096, on a tiny random Qwen2 with the Qwen2.5 vocabulary (151,936: where anything kept
  at vocabulary size per step would show at once), next to the size of the KV cache.
- ``tiny`` and ``samples``: batched greedy ``HFGenerator`` vs ``model.generate`` one prompt at a
  time, and one call with n = N samples vs N calls, on two tiny models (``qwen-vocab``: hidden
  64 with the Qwen2.5 tokenizer; ``demo-vocab``: the demo's model and tokenizer).

The machine this runs on is usually shared: runs alternate between the sides compared, and the
ratios, not the absolute rates, are what carries over.

    python bench/generation.py [--sections smollm2,ablation,profile,memory,tiny,samples] [--model DIR]
        [--batch-sizes 1,8,32,64] [--max-new-tokens 32] [--threads 1] [--repeats 1]
        [--memory-tokens 256,1024,4096]
    python bench/generation.py --only-samples     # the second tiny table alone
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from reasontune.data import example_prompt, load_examples, load_template
from reasontune.environments.base import Environment, Trajectory, Turn
from reasontune.environments.driver import generate_trajectories
from reasontune.generation import SamplingOptions
from reasontune.generation.hf import DecodeSettings, HFGenerator
from reasontune.modeling import QWEN2_5_VOCAB_SIZE, build_model_from_config, qwen2_tokenizer_offline, tiny_qwen2_config

GSM8K = Path(os.environ.get("REASONTUNE_GSM8K_DIR", Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k")
             ) / "test.jsonl"
SECTIONS = ("smollm2", "ablation", "profile", "tools", "memory", "tiny", "samples")


def gsm8k_prompts(count: int) -> list[str]:
    template = load_template("r1_zero")
    if GSM8K.exists():
        return [example_prompt(e, template) for e in load_examples(GSM8K, max_examples=count, seed=0)]
    return [template.replace("{question}", f"What is {i} times {i + 7}, plus {3 * i}?" * (1 + i % 4)) for i in range(count)]


def interleaved(sides: dict, repeats: int, cpu_rates: dict | None = None, after: dict | None = None
                ) -> tuple[dict[str, float], dict[str, int]]:
    """Returns (median tokens/s, tokens of the last run) per side; the sides alternate ``repeats`` times.

    ``after``: per side, a function run (untimed) right after each of its runs.

    With ``cpu_rates`` (a dict), each side's median tokens per second of this process's CPU
    time goes there too: on a machine other jobs load, CPU time moves less than wall time.
    """
    rates: dict[str, list[float]] = {side: [] for side in sides}
    per_cpu: dict[str, list[float]] = {side: [] for side in sides}
    tokens: dict[str, int] = {}
    for _ in range(repeats):
        for side, run in sides.items():
            start, cpu_start = time.perf_counter(), time.process_time()
            tokens[side] = run()
            rates[side].append(tokens[side] / (time.perf_counter() - start))
            per_cpu[side].append(tokens[side] / max(time.process_time() - cpu_start, 1e-9))
            if after and side in after:
                after[side]()
    if cpu_rates is not None:
        cpu_rates.update({side: statistics.median(values) for side, values in per_cpu.items()})
    return {side: statistics.median(values) for side, values in rates.items()}, tokens


# ---------------------------------------------------------------- SmolLM2: ours, generate, roofline


def fixed_length_options(sampled: bool, max_new_tokens: int, **changes) -> SamplingOptions:
    """Returns options that make every row exactly ``max_new_tokens`` long: greedy, or temperature 1 with log-probs."""
    return SamplingOptions(temperature=1.0 if sampled else 0.0, max_new_tokens=max_new_tokens,
                           min_new_tokens=max_new_tokens, stop=(), seed=0, return_logprobs=sampled, **changes)


def ours(generator: HFGenerator, prompts: list[str], options: SamplingOptions) -> int:
    """Returns the tokens ``HFGenerator`` generated for ``prompts``."""
    return sum(c.num_tokens for group in generator.generate(prompts, options) for c in group)


def plain_generate(model, tokenizer, prompts: list[str], batch_size: int, sampled: bool, max_new_tokens: int) -> int:
    """Returns the tokens plain ``model.generate`` generated for ``prompts`` in left-padded batches of ``batch_size``.

    Sampled: temperature 1, no top-k or top-p, and each token's log-prob under that
    distribution from the step scores (``output_scores`` + ``compute_transition_scores``).
    """
    generated = 0
    tokenizer.padding_side = "left"
    sampling = dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=0, output_scores=True) if sampled else dict(do_sample=False)
    with torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            encoded = tokenizer(prompts[start:start + batch_size], return_tensors="pt", padding=True)
            out = model.generate(**encoded, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                                 pad_token_id=tokenizer.pad_token_id, return_dict_in_generate=True, **sampling)
            if sampled:
                logprobs = model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)
                assert torch.isfinite(logprobs).all()
            generated += (out.sequences.shape[1] - encoded["input_ids"].shape[1]) * out.sequences.shape[0]
    return generated


class Roofline:
    """The time of a causal LM's own matrix multiplies at the shapes of one forward, measured with torch.mm.

    Every linear layer of every decoder layer runs with its own weight (so the weights stream
    from memory as in a real forward), attention's scores and weighted sum run as
    ``torch.bmm`` per (row, key-value head) with the query heads of a group stacked, and the
    LM head runs on each row's last position only, as generation keeps only those logits.
    Norms, activations, rotary embeddings, softmax and sampling are left out: this is what the
    matmuls alone cost at these shapes on this machine, now.
    """

    def __init__(self, model, repeats: int = 1):
        config = model.config
        self.layers = [[m.weight for m in layer.modules() if isinstance(m, torch.nn.Linear)]
                       for layer in model.model.layers]
        self.lm_head = model.get_output_embeddings().weight
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.repeats = repeats

    @torch.no_grad()
    def forward_seconds(self, rows: int, new_tokens: int, context: int) -> float:
        """Returns the fastest of ``repeats`` runs of the matmuls of ``rows`` sequences of ``new_tokens`` attending to ``context`` positions."""
        tokens = rows * new_tokens
        inputs = {w.shape[1]: torch.randn(tokens, w.shape[1]) for layer in self.layers for w in layer}
        group = self.heads // self.kv_heads
        queries = torch.randn(rows * self.kv_heads, group * new_tokens, self.head_dim)
        keys = torch.randn(rows * self.kv_heads, self.head_dim, context)
        weights = torch.randn(rows * self.kv_heads, group * new_tokens, context)
        values = torch.randn(rows * self.kv_heads, context, self.head_dim)
        last = torch.randn(rows, self.lm_head.shape[1])

        def run() -> None:
            for layer in self.layers:
                for weight in layer:
                    torch.mm(inputs[weight.shape[1]], weight.t())
                torch.bmm(queries, keys)
                torch.bmm(weights, values)
            torch.mm(last, self.lm_head.t())

        run()  # warm-up: first touch of the buffers
        best = float("inf")
        for _ in range(self.repeats):
            start = time.perf_counter()
            run()
            best = min(best, time.perf_counter() - start)
        return best

    def generation_seconds(self, prompt_lengths: list[int], batch_size: int, max_new_tokens: int
                           ) -> tuple[float, float]:
        """Returns (prefill, decode) matmul seconds of ``max_new_tokens`` for each of these prompts, in batches of ``batch_size``.

        Per batch: a prefill of every prompt at the batch's mean length (no padding: the
        linear layers' work is per token; the whole prompt, though a generator that shares the
        template prefix runs less) and ``max_new_tokens - 1`` decode steps (the first token
        comes from the prefill's logits), each priced at the context midway through.
        """
        prefill = decode = 0.0
        for start in range(0, len(prompt_lengths), batch_size):
            lengths = prompt_lengths[start:start + batch_size]
            mean_length = round(sum(lengths) / len(lengths))
            prefill += self.forward_seconds(len(lengths), mean_length, mean_length)
            decode += (max_new_tokens - 1) * self.forward_seconds(len(lengths), 1, mean_length + max_new_tokens // 2)
        return prefill, decode


def smollm2_dir(args) -> Path | None:
    """Returns SmolLM2's HF directory (``--model``), or None after printing why the SmolLM2 sections are skipped."""
    if not args.model:
        print("SmolLM2 sections skipped: no --model DIR and no $REASONTUNE_SMOLLM2_DIR "
              "(make one with: reasontune models get smollm2-135m-instruct --output-dir DIR)")
        return None
    if not (Path(args.model) / "config.json").exists():
        print(f"SmolLM2 sections skipped: {args.model} is not a Hugging Face model directory (no config.json)")
        return None
    return Path(args.model)


def load_smollm2(model_dir: Path):
    """Returns (model in eval mode, tokenizer) of the HF directory, float32."""
    from reasontune.modeling import load_model, load_tokenizer

    return load_model(str(model_dir)).eval(), load_tokenizer(str(model_dir))


def smollm2_table(model, tokenizer, args) -> None:
    """Prints ours vs plain generate vs the rooflines at each batch size, greedy and sampled with log-probs."""
    roofline = Roofline(model)
    print(f"\nSmolLM2-135M-Instruct ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M params, float32), "
          f"GSM8K prompts in the r1_zero template, exactly {args.max_new_tokens} new tokens a row, "
          f"{torch.get_num_threads()} thread(s). tok/s = new tokens / wall time; 'cpu' = the same per second of this "
          "process's CPU time (steadier on a loaded machine). Rooflines = the same work's matmuls alone (torch.mm), "
          "measured here: 'all' = an unpadded prefill of every whole prompt + each decode step, 'decode' = the decode "
          "steps alone against our time outside the prefill, 'prefill' = the whole-prompt prefill against our prefill "
          "(which skips the shared template prefix, so it can pass 100%)")
    print(f"{'batch':>5} {'mode':<16} {'ours tok/s':>10} {'generate':>9} {'ours/generate':>14} {'cpu ratio':>10} "
          f"{'% roofline all':>15} {'% decode':>9} {'% prefill':>10}")
    warm = HFGenerator(model, tokenizer, batch_size=2)
    ours(warm, gsm8k_prompts(2), fixed_length_options(True, 2))  # warm-up: lazy imports, first allocations
    for batch_size in args.batch_sizes:
        prompts = gsm8k_prompts(max(batch_size, args.min_prompts))
        lengths = [len(ids) for ids in tokenizer(prompts)["input_ids"]]
        generator = HFGenerator(model, tokenizer, batch_size=batch_size)
        for sampled in (False, True):
            options = fixed_length_options(sampled, args.max_new_tokens)
            seconds = {}

            def timed_ours() -> int:
                start = time.perf_counter()
                count = ours(generator, prompts, options)
                seconds["total"], seconds["prefill"] = time.perf_counter() - start, generator.last_prefill_seconds
                return count

            def measure_roofline() -> None:  # right after each of our runs, untimed: under the same load as it
                seconds["roof_prefill"], seconds["roof_decode"] = roofline.generation_seconds(
                    lengths, batch_size, args.max_new_tokens)

            cpu: dict[str, float] = {}
            rates, tokens = interleaved(
                {"generate": lambda: plain_generate(model, tokenizer, prompts, batch_size, sampled, args.max_new_tokens),
                 "ours": timed_ours}, args.repeats, cpu, after={"ours": measure_roofline})
            assert tokens["generate"] == tokens["ours"] == len(prompts) * args.max_new_tokens, tokens
            mode = "sampled+logprobs" if sampled else "greedy"
            roof_prefill, roof_decode = seconds["roof_prefill"], seconds["roof_decode"]
            roofline_rate = tokens["ours"] / (roof_prefill + roof_decode)
            decode_share = 100 * roof_decode / max(seconds["total"] - seconds["prefill"], 1e-9)
            prefill_share = 100 * roof_prefill / max(seconds["prefill"], 1e-9)
            print(f"{batch_size:>5} {mode:<16} {rates['ours']:>10.1f} {rates['generate']:>9.1f} "
                  f"{rates['ours'] / rates['generate']:>13.2f}x {cpu['ours'] / cpu['generate']:>9.2f}x "
                  f"{100 * rates['ours'] / roofline_rate:>14.0f}% {decode_share:>8.0f}% {prefill_share:>9.0f}%", flush=True)
        if batch_size == args.batch_sizes[0] or batch_size == 8:
            greedy = fixed_length_options(False, args.max_new_tokens)
            assert [c[0].token_ids for c in generator.generate(prompts, greedy)] == \
                plain_generate_tokens(model, tokenizer, prompts, batch_size, args.max_new_tokens), \
                "greedy tokens differ from plain generate's"
            print(f"{'':>5} greedy tokens equal plain generate's at batch {batch_size}")


def plain_generate_tokens(model, tokenizer, prompts: list[str], batch_size: int, max_new_tokens: int) -> list[list[int]]:
    """Returns plain greedy ``model.generate``'s new tokens per prompt, in left-padded batches of ``batch_size``."""
    tokenizer.padding_side = "left"
    rows = []
    with torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            encoded = tokenizer(prompts[start:start + batch_size], return_tensors="pt", padding=True)
            out = model.generate(**encoded, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
            rows += out[:, encoded["input_ids"].shape[1]:].tolist()
    return rows


ABLATIONS = (
    ("all on", {}),
    ("preallocated_cache off", {"preallocated_cache": False}),
    ("drop_finished off", {"drop_finished": False}),
    ("prefill_buckets off", {"prefill_buckets": False}),
    ("shared_prefill off", {"shared_prefill": False}),
    ("shared_prefix off", {"shared_prefix": False}),
    ("fused_sampler off", {"fused_sampler": False}),
    ("own_decode_step off", {"own_decode_step": False}),  # the model's own forward each step
    ("transposed_weights off", {"transposed_weights": False}),  # F.linear over the (out, in) weights
    ("fused_projections ON", {"fused_projections": True}),  # off by default: below 1x here means it would help
    ("2 threads", {"num_threads": 2}),
)


def rollout_options(args) -> SamplingOptions:
    """Returns GRPO-rollout-like options: temperature 1, log-probs, ``--ablation-samples`` per prompt, EOS and </answer> honoured."""
    return SamplingOptions(temperature=1.0, max_new_tokens=args.ablation_tokens, stop=("</answer>",), seed=0,
                           n=args.ablation_samples, return_logprobs=True)


def ablation_table(model, tokenizer, args) -> None:
    """Prints tokens/s with all optimisations on and with each switched off alone, each against all-on in the same run."""
    options = rollout_options(args)
    prompts = gsm8k_prompts(max(1, args.ablation_batch // args.ablation_samples))
    print(f"\nAblation: SmolLM2, {len(prompts)} prompts x {args.ablation_samples} samples (batch "
          f"{args.ablation_batch}), temperature 1 with log-probs, up to {args.ablation_tokens} new tokens, EOS and "
          f"</answer> end rows; each setting alternates with all-on, medians of {args.repeats}")
    print(f"{'setting':<24} {'tok/s':>8} {'default tok/s':>13} {'default buys':>12} {'(cpu time)':>11}")
    all_on = HFGenerator(model, tokenizer, batch_size=args.ablation_batch)
    threads = torch.get_num_threads()
    for name, change in ABLATIONS:
        if not change or (args.ablations and name not in args.ablations):
            continue
        if "num_threads" in change and change["num_threads"] == threads:
            continue
        settings = DecodeSettings(**change)
        other = HFGenerator(model, tokenizer, batch_size=args.ablation_batch, settings=settings)
        cpu: dict[str, float] = {}
        rates, tokens = interleaved({"all_on": lambda: ours(all_on, prompts, options),
                                     "other": lambda: ours(other, prompts, options)}, args.repeats, cpu)
        print(f"{name:<24} {rates['other']:>8.1f} {rates['all_on']:>13.1f} {rates['all_on'] / rates['other']:>11.2f}x"
              f" {cpu['all_on'] / cpu['other']:>10.2f}x  tokens {tokens['other']}/{tokens['all_on']}", flush=True)


def profile_table(model, tokenizer, args) -> None:
    """Prints where HFGenerator's time goes: torch operators by own time, prefill vs decode, Python functions by own time."""
    import cProfile
    import pstats

    from torch.profiler import ProfilerActivity, profile, record_function

    from reasontune.generation import hf

    options = rollout_options(args)
    prompts = gsm8k_prompts(max(1, args.ablation_batch // args.ablation_samples))
    generator = HFGenerator(model, tokenizer, batch_size=args.ablation_batch)
    ours(generator, prompts[:1], options.replace(max_new_tokens=2, n=2))
    prefill = hf.HFGenerator._prefill

    def labelled_prefill(self, *arguments):
        with record_function("prefill"):
            return prefill(self, *arguments)

    hf.HFGenerator._prefill = labelled_prefill
    try:
        with profile(activities=[ProfilerActivity.CPU]) as profiler:
            start = time.perf_counter()
            ours(generator, prompts, options)
            total = time.perf_counter() - start
    finally:
        hf.HFGenerator._prefill = prefill
    averages = profiler.key_averages()
    prefill_s = sum(e.cpu_time_total for e in averages if e.key == "prefill") / 1e6
    print(f"\nProfile (torch.profiler) of the ablation's all-on run: {total:.1f} s, of which prefill {prefill_s:.1f} s")
    print(averages.table(sort_by="self_cpu_time_total", row_limit=12))
    python_profile = cProfile.Profile()
    python_profile.enable()
    ours(generator, prompts, options)
    python_profile.disable()
    print("Python functions by own time (cProfile):")
    pstats.Stats(python_profile, stream=sys.stdout).sort_stats("tottime").print_stats(10)


# ---------------------------------------------------------------- multi-turn rollouts: kept KV cache vs re-prefill


class ReplyAtTag(Environment):
    """Answers every model turn that ends with ``tag`` with a fixed ``<output>`` block: a tool turn of a known size."""

    def __init__(self, tag: str, reply: str, max_tool_calls: int):
        self.stop, self.reply, self.max_tool_calls = (tag,), reply, max_tool_calls

    def respond(self, model_turn: Turn, trajectory: Trajectory) -> Turn | None:
        if model_turn.stop_string not in self.stop:
            return None
        return Turn(role="environment", text=self.reply, program="", output=self.reply, status="ok", seconds=0.0)


def tools_table(model, tokenizer, args) -> None:
    """Prints multi-turn rollout speed with each row's KV cache kept between turns against re-prefilling the whole text."""
    reply = "<output>\n" + "\n".join(str(17 * i) for i in range(1, 6)) + "\n</output>\n"
    environment = ReplyAtTag(".", reply, args.tool_calls)
    prompts = gsm8k_prompts(max(1, args.ablation_batch // args.ablation_samples))
    options = SamplingOptions(temperature=1.0, max_new_tokens=args.tool_turn_tokens, stop=("</answer>",), seed=0,
                              n=args.ablation_samples, return_logprobs=True)
    print(f"\nMulti-turn rollouts: SmolLM2, {len(prompts)} prompts x {args.ablation_samples} samples, temperature 1 "
          f"with log-probs, up to {args.tool_turn_tokens} tokens a model turn; an environment answers every turn that "
          f"ends at '.' with a {len(tokenizer(reply, add_special_tokens=False)['input_ids'])}-token output block, up "
          f"to {args.tool_calls} times. Kept cache (HFSession: a continuation prefills only the new tokens) vs "
          "re-prefill (keep_cache off: each round prefills its whole text again); medians of "
          f"{args.repeats}, interleaved")
    sides = {}
    for name, keep in (("kept cache", True), ("re-prefill", False)):
        generator = HFGenerator(model, tokenizer, batch_size=args.ablation_batch, settings=DecodeSettings(keep_cache=keep))

        def run(generator=generator) -> int:
            groups = generate_trajectories(generator, prompts, options, environment)
            return sum(t.model_token_count for group in groups for t in group)

        sides[name] = run
    cpu: dict[str, float] = {}
    rates, tokens = interleaved(sides, args.repeats, cpu)
    print(f"{'path':<12} {'model tok/s':>12} {'tokens':>7}")
    for name in sides:
        print(f"{name:<12} {rates[name]:>12.1f} {tokens[name]:>7}")
    print(f"kept cache buys {rates['kept cache'] / rates['re-prefill']:.2f}x (wall), "
          f"{cpu['kept cache'] / cpu['re-prefill']:.2f}x (cpu time); the token counts differ where the two contexts "
          "differ (the kept one is the sampled ids, the re-prefilled one the joined text's tokenisation)", flush=True)


# ---------------------------------------------------------------- memory vs new tokens

MEMORY_CHILD = r"""
import ctypes, json, re, sys, torch
from reasontune.generation import SamplingOptions
from reasontune.generation.hf import HFGenerator
from reasontune.modeling import QWEN2_5_VOCAB_SIZE, build_model_from_config, qwen2_tokenizer_offline, tiny_qwen2_config
new_tokens, rows = int(sys.argv[1]), int(sys.argv[2])
torch.set_num_threads(1)
def resident_kib(field):
    return int(re.search(field + r":\s+(\d+) kB", open("/proc/self/status").read()).group(1))
config = tiny_qwen2_config(vocab_size=QWEN2_5_VOCAB_SIZE, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2)
model = build_model_from_config(config, seed=0).eval()
tokenizer = qwen2_tokenizer_offline()
generator = HFGenerator(model, tokenizer, batch_size=rows)
prompts = [f"Question {i}: what is {i} plus {2 * i}? Answer:" for i in range(rows)]
options = SamplingOptions(temperature=1.0, max_new_tokens=new_tokens, min_new_tokens=new_tokens, stop=(), seed=0,
                          return_logprobs=True, return_entropy=True)
# No warm-up call: what a first call allocates (lazy imports, one step's temporaries) is the same at every length.
# Memory freed while the model and tokenizer were built would be reused unseen (resident already): give it back.
ctypes.CDLL("libc.so.6").malloc_trim(0)
open("/proc/self/clear_refs", "w").write("5")  # resets the peak resident set (VmHWM) to the current one
before = resident_kib("VmRSS")
completions = generator.generate(prompts, options)
peak = resident_kib("VmHWM")
width = max(len(ids) for ids in tokenizer(prompts)["input_ids"])
# Keys and values: 2 tensors x layers x rows x kv heads x head dim x positions x 4 bytes (float32).
head_dim = config.hidden_size // config.num_attention_heads
kv_bytes = 2 * config.num_hidden_layers * rows * config.num_key_value_heads * head_dim * (width + new_tokens) * 4
assert all(len(c.entropies) == len(c.logprobs) == new_tokens for group in completions for c in group)
print(json.dumps({"growth_bytes": (peak - before) * 1024, "kv_bytes": kv_bytes,
                  "step_logits_bytes": rows * QWEN2_5_VOCAB_SIZE * 4}))
"""


def memory_row(new_tokens: int, rows: int) -> dict:
    """Returns the peak growth, KV-cache size and one step's logits size of one generation, measured in a fresh process."""
    out = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(new_tokens), str(rows)], capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def memory_table(args) -> None:
    """Prints peak memory growth of generation against new tokens, beside the KV cache's size, and how fast each grows."""
    rows = args.memory_rows
    print(f"\nPeak memory vs new tokens: tiny random Qwen2 (hidden 64, 2 layers, vocab 151,936), {rows} rows, "
          "temperature 1, entropy and log-probs recorded, exactly that many tokens a row. growth = peak resident set "
          "during generate minus before it, each length in a fresh process; 'growth since first' / 'KV since first' "
          "is how fast memory grows against the KV cache (the goal: no faster, i.e. about 1.5 or less with the "
          "cache's doubling). 'kept per step' is what keeping one step's logits would cost instead.")
    print(f"{'new tokens':>10} {'peak growth MiB':>16} {'KV cache MiB':>13} {'growth since first MiB':>23} "
          f"{'KV since first MiB':>19} {'ratio':>6} {'kept per step MiB':>18}")
    first = None
    mib = 2 ** 20
    for new_tokens in args.memory_tokens:
        row = memory_row(new_tokens, rows)
        first = first or row
        growth, kv = row["growth_bytes"] - first["growth_bytes"], row["kv_bytes"] - first["kv_bytes"]
        ratio = f"{growth / kv:>6.2f}" if kv else f"{'-':>6}"
        print(f"{new_tokens:>10} {row['growth_bytes'] / mib:>16.1f} {row['kv_bytes'] / mib:>13.1f} {growth / mib:>23.1f} "
              f"{kv / mib:>19.1f} {ratio} {new_tokens * row['step_logits_bytes'] / mib:>18.0f}", flush=True)


# ---------------------------------------------------------------- tiny models: batched vs one at a time, n samples


def qwen_vocab_setup(count: int):
    """Returns (model, tokenizer, prompts): tiny Qwen2 (hidden 64) with Qwen2.5's tokenizer, GSM8K prompts."""
    tokenizer = qwen2_tokenizer_offline()
    model = build_model_from_config(tiny_qwen2_config(vocab_size=QWEN2_5_VOCAB_SIZE, hidden_size=64, num_layers=2,
                                                      num_heads=4, num_kv_heads=2), seed=0)
    return model, tokenizer, gsm8k_prompts(count)


def demo_vocab_setup(count: int):
    """Returns (model, tokenizer, prompts): the demo's tokenizer and model (default sizes) and arithmetic prompts."""
    from reasontune.demo import build_demo_model, build_demo_tokenizer, load_demo_template, make_arithmetic_examples

    template = load_demo_template()
    corpus = [template] + [e["prompt"] + e["response"] for e in make_arithmetic_examples(2000, seed=0, template=template)]
    tokenizer = build_demo_tokenizer(corpus)
    model = build_demo_model(tokenizer, seed=0)
    prompts = [e["prompt"] for e in make_arithmetic_examples(count, seed=1, template=template)]
    return model, tokenizer, prompts


SETUPS = (("qwen-vocab", qwen_vocab_setup), ("demo-vocab", demo_vocab_setup))


def one_at_a_time(model, tokenizer, prompts: list[str], max_new_tokens: int) -> int:
    """Returns the tokens generated by plain greedy ``model.generate`` calls, one prompt each."""
    generated = 0
    with torch.no_grad():
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt")
            out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
            generated += out.shape[1] - ids["input_ids"].shape[1]
    return generated


def batched(generator: HFGenerator, prompts: list[str], max_new_tokens: int) -> int:
    """Returns the tokens generated by ``HFGenerator`` (EOS included, as ``model.generate`` counts it)."""
    options = SamplingOptions(temperature=0.0, max_new_tokens=max_new_tokens, stop=())
    return sum(group[0].num_tokens for group in generator.generate(prompts, options))


def measure(setup, args) -> dict:
    """Returns tokens and median tokens/s of both sides for one model, runs interleaved."""
    model, tokenizer, prompts = setup(args.prompts)
    model.eval()
    generator = HFGenerator(model, tokenizer, batch_size=args.batch_size)
    one_at_a_time(model, tokenizer, prompts[:2], 4)  # warm-up: first-call allocations and lazy imports
    batched(generator, prompts[:2], 4)
    rates, tokens = interleaved({"one_at_a_time": lambda: one_at_a_time(model, tokenizer, prompts, args.max_new_tokens),
                                 "batched": lambda: batched(generator, prompts, args.max_new_tokens)}, args.repeats)
    return {"vocab": model.config.vocab_size, "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
            "one_at_a_time": rates["one_at_a_time"], "batched": rates["batched"],
            "speedup": rates["batched"] / rates["one_at_a_time"],
            "tokens": (tokens["one_at_a_time"], tokens["batched"])}


def sample_tokens(generator: HFGenerator, prompts: list[str], max_new_tokens: int, n: int, calls: int) -> int:
    """Returns the tokens of ``calls`` generate calls of ``n`` samples per prompt (temperature 1, fixed length)."""
    tokens = 0
    for call in range(calls):
        options = SamplingOptions(temperature=1.0, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                                  stop=(), n=n, seed=call)
        tokens += sum(c.num_tokens for group in generator.generate(prompts, options) for c in group)
    return tokens


def measure_samples(setup, args) -> dict:
    """Returns median tokens/s of N independent n=1 calls and of one n=N call, runs interleaved."""
    model, tokenizer, prompts = setup(args.sample_prompts)
    model.eval()
    generator = HFGenerator(model, tokenizer, batch_size=args.batch_size)
    sample_tokens(generator, prompts[:1], 4, 2, 1)  # warm-up
    rates, tokens = interleaved(
        {"independent": lambda: sample_tokens(generator, prompts, args.max_new_tokens, 1, args.samples),
         "one_call": lambda: sample_tokens(generator, prompts, args.max_new_tokens, args.samples, 1)}, args.repeats)
    return {"independent": rates["independent"], "one_call": rates["one_call"],
            "speedup": rates["one_call"] / rates["independent"], "tokens": (tokens["independent"], tokens["one_call"])}


def print_table(header: str, measure_row, format_row, args) -> None:
    """Prints ``header`` and one row per model setup: ``format_row(measure_row(setup, args))``."""
    print(header)
    for name, setup in SETUPS:
        print(f"{name:<12} {format_row(measure_row(setup, args))}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {', '.join(SECTIONS)}")
    parser.add_argument("--model", default=os.environ.get("REASONTUNE_SMOLLM2_DIR"),
                        help="SmolLM2-135M-Instruct's HF directory (default $REASONTUNE_SMOLLM2_DIR)")
    parser.add_argument("--batch-sizes", default="1,8,32,64", help="SmolLM2 table: batch sizes")
    parser.add_argument("--min-prompts", type=int, default=4, help="SmolLM2 table: prompts per cell at least (batch 1 runs them one by one)")
    parser.add_argument("--ablation-batch", type=int, default=32, help="ablation and profile: rows decoded together")
    parser.add_argument("--ablation-samples", type=int, default=4, help="ablation and profile: samples per prompt")
    parser.add_argument("--ablation-tokens", type=int, default=64, help="ablation and profile: max new tokens")
    parser.add_argument("--ablations", default="", help="ablation: comma-separated setting names to run (default all), "
                        "e.g. 'own_decode_step off,fused_projections off'")
    parser.add_argument("--tool-calls", type=int, default=3, help="tools: environment turns per rollout at most")
    parser.add_argument("--tool-turn-tokens", type=int, default=24, help="tools: max new tokens of one model turn")
    parser.add_argument("--memory-tokens", default="256,1024,4096", help="memory table: new-token counts")
    parser.add_argument("--memory-rows", type=int, default=8, help="memory table: rows generated together")
    parser.add_argument("--prompts", type=int, default=32, help="tiny table: prompts per configuration")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="new tokens per row (tiny and SmolLM2 tables)")
    parser.add_argument("--batch-size", type=int, default=32, help="tiny tables: HFGenerator batch size")
    parser.add_argument("--repeats", type=int, default=1, help="alternating timed runs of each side; medians reported")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core CPU)")
    parser.add_argument("--samples", type=int, default=8, help="samples per prompt N of the n-samples table")
    parser.add_argument("--sample-prompts", type=int, default=4, help="prompts of the n-samples table")
    parser.add_argument("--only-samples", action="store_true", help="run only the n-samples table (--sections samples)")
    args = parser.parse_args()
    sections = ["samples"] if args.only_samples else [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"--sections: unknown {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    args.ablations = [a.strip() for a in args.ablations.split(",") if a.strip()]
    args.memory_tokens = [int(t) for t in args.memory_tokens.split(",")]
    torch.set_num_threads(args.threads)

    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.1f}, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}; "
          f"median of {args.repeats} interleaved run(s)")
    if {"smollm2", "ablation", "profile", "tools"} & set(sections):
        model_dir = smollm2_dir(args)
        if model_dir is not None:
            model, tokenizer = load_smollm2(model_dir)
            if "smollm2" in sections:
                smollm2_table(model, tokenizer, args)
            if "ablation" in sections:
                ablation_table(model, tokenizer, args)
            if "profile" in sections:
                profile_table(model, tokenizer, args)
            if "tools" in sections:
                tools_table(model, tokenizer, args)
            del model
    if "memory" in sections:
        memory_table(args)
    if "tiny" in sections:
        print()
        greedy_table(args)
    if "samples" in sections:
        print(f"\n{args.samples} samples per prompt, temperature 1, {args.sample_prompts} prompts, exactly "
              f"{args.max_new_tokens} new tokens each, batch size {args.batch_size}: one generate call with "
              f"n={args.samples} vs {args.samples} calls with n=1")
        print_table(f"{'configuration':<12} {f'{args.samples} calls n=1 tok/s':>20} {f'1 call n={args.samples} tok/s':>20} "
                    f"{'speedup':>8}  tokens (calls/one)", measure_samples,
                    lambda row: f"{row['independent']:>20.0f} {row['one_call']:>20.0f} {row['speedup']:>7.1f}x  "
                                f"{row['tokens'][0]}/{row['tokens'][1]}", args)


def greedy_table(args) -> None:
    """Prints the first table: batched greedy ``HFGenerator`` against one-prompt-at-a-time ``model.generate``."""
    print(f"{args.prompts} prompts, greedy, max_new_tokens {args.max_new_tokens}, batch size {args.batch_size}")
    print_table(f"{'configuration':<12} {'vocab':>7} {'params':>7} {'one-at-a-time tok/s':>20} {'batched tok/s':>14} "
                f"{'speedup':>8}  tokens (one/batched)", measure,
                lambda row: f"{row['vocab']:>7} {row['params_m']:>6.1f}M {row['one_at_a_time']:>20.0f} "
                            f"{row['batched']:>14.0f} {row['speedup']:>7.1f}x  {row['tokens'][0]}/{row['tokens'][1]}", args)


if __name__ == "__main__":
    main()
