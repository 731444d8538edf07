"""``reasontune demo --algorithm tools``: a task the tiny model cannot do in its head but can with one Python call.

The task is multiplying two 4-digit numbers whose product has 8 digits (83% of all 4-digit
pairs). A trace calls the tool once, reads the product and answers:

    <think> <python>print(1234*8765)</python><output>\\n10816010\\n</output>\\n I read the output. </think> <answer>10816010</answer>

Both model turns are copies at one fixed distance: the program's digits stand a fixed number of
tokens after the question's (every prompt has the same length), and the answer's the same number
after the output's (every product has 8 digits, and " I read the output." pads the answer turn
to that distance on the demo's tokenizer). So one attention pattern, "the token that many back",
writes both turns. A tiny transformer learns a fixed-distance copy abruptly after a plateau;
with 7- and 8-digit products mixed the answer's distance varies and the copy takes far longer,
and with the answer at its own distance the plateau's length varied with the seed (docs/tools.md).

Stages, each timed (wall and CPU seconds, sandbox processes included):

1. SFT on the model's turns only: each trace becomes one prompt/response pair per model turn
   (the second one's prompt holds the first turn and the tool's output), so the tool's output
   is context and never a target, the same loss as the trajectory's with the environment
   masked out (``tests/test_trajectory_tokens.py``). Its final evaluation is without the tool:
   the model's "output" is then its own guess.
2. The held-out questions answered with the ``python`` environment (each program in a fresh
   sandbox), under the same total token budget.
3. GRPO with ``env="python"`` from the SFT step nearest ``TOOL_START_TARGET`` greedy accuracy
   with the tool on the selection traces (``StartPicker``; from the SFT's end every group is
   all right and GRPO has no signal): rollouts are tool trajectories, the loss covers the
   model's tokens only; the held-out set is evaluated with the tool before and after it, and
   the GRPO weights then without it.
"""

from __future__ import annotations

import dataclasses
import random
import resource
import time
from pathlib import Path
from typing import Any

import torch

from reasontune.data import load_examples
from reasontune.demo import build_demo_model, build_demo_tokenizer, claim_demo_dir, demo_sft_config
from reasontune.environments.python import PythonEnvironment, format_output
from reasontune.environments.sandbox import SandboxLimits
from reasontune.generation import SamplingOptions, build_generator
from reasontune.modeling import load_model, load_tokenizer
from reasontune.rewards import r1_zero_reward_fn
from reasontune.rollouts import rollouts_for_examples, write_jsonl
from reasontune.run_layout import FINAL_DIR, eval_summaries
from reasontune.tokenization import pad_and_shift_segments, pad_token_id_of
from reasontune.training.grpo import GRPOConfig, run_grpo
from reasontune.training.sft import run_sft, tokenize_examples

TOOL_TAGS = ("<python>", "</python>", "<output>", "</output>")
TOOL_TEMPLATE = "Compute with <python> </python>, answer in <answer> </answer>.\nUser: {question}\nAssistant: <think>"
TOOL_NUM_DIGITS = 4
TURN_TOKENS = 24  # one model turn: " <python>print(" + 4 digits + "*" + 4 digits + ")</python>" is 17 tokens
RESPONSE_TOKENS = 2 * TURN_TOKENS  # the whole response's model tokens, with the tool or without it
TOOL_TIMEOUT = 10.0
ANSWER_LEAD = " I read the output."  # puts the answer's digits as far after the output's as the program's after the question's

# GRPO from the SFT step nearest TOOL_START_TARGET (see tool_grpo_config for why these settings).
TOOL_START_TARGET = 0.35
TOOL_SELECTION_QUESTIONS = 128
TOOL_GRPO_QUESTIONS = 4
TOOL_GRPO_GROUP = 16
TOOL_GRPO_LEARNING_RATE = 3e-4
TOOL_GRPO_TEMPERATURE = 0.3


def tool_trace(a: int, b: int) -> tuple[str, str, str]:
    """Returns (first model turn, the tool's output turn, last model turn) of the trace for ``a * b``."""
    call = f" <python>print({a}*{b})</python>"
    return call, format_output(f"{a * b}\n", "ok", 4096), f"{ANSWER_LEAD} </think> <answer>{a * b}</answer>"


def make_multiplication_questions(n: int, seed: int, exclude: set[tuple[int, int]] = frozenset()
                                  ) -> list[tuple[int, int]]:
    """Returns ``n`` distinct seeded pairs of 4-digit operands whose product has 8 digits, none in ``exclude``."""
    low, high = 10 ** (TOOL_NUM_DIGITS - 1), 10 ** TOOL_NUM_DIGITS - 1
    smallest_product = 10 ** (2 * TOOL_NUM_DIGITS - 1)
    rng, taken, pairs = random.Random(seed), set(exclude), []
    while len(pairs) < n:
        pair = (rng.randint(low, high), rng.randint(low, high))
        if pair not in taken and pair[0] * pair[1] >= smallest_product:
            taken.add(pair)
            pairs.append(pair)
    return pairs


def question_prompt(a: int, b: int) -> str:
    return TOOL_TEMPLATE.format(question=f"What is {a}*{b}?")


def turn_records(pairs: list[tuple[int, int]]) -> list[dict[str, str]]:
    """Returns the SFT records of the traces: one ``{prompt, response, ground_truth}`` per model turn."""
    records = []
    for a, b in pairs:
        prompt = question_prompt(a, b)
        call, output, answer = tool_trace(a, b)
        records.append({"prompt": prompt, "response": call, "ground_truth": str(a * b)})
        records.append({"prompt": prompt + call + output, "response": answer, "ground_truth": str(a * b)})
    return records


def question_records(pairs: list[tuple[int, int]]) -> list[dict[str, str]]:
    """Returns ``{prompt, ground_truth}`` records of the questions (evaluation, GRPO rollouts)."""
    return [{"prompt": question_prompt(a, b), "ground_truth": str(a * b)} for a, b in pairs]


@dataclasses.dataclass(frozen=True)
class ToolDemoFiles:
    """What ``prepare_tool_demo`` writes under the output directory."""

    train: Path  # data/train.jsonl: SFT records, two per trace
    questions: Path  # data/questions.jsonl: the training traces' questions, GRPO's rollout prompts
    held_out: Path  # data/val.jsonl: held-out questions, disjoint from the training ones
    selection: Path  # data/select.jsonl: turn records of traces disjoint from both, which pick GRPO's start
    template: Path  # data/tool.prompt: the prompt template (the records hold their prompts; it names the format)
    base_model: Path  # base-model/: the tokenizer and the randomly initialised model


def prepare_tool_demo(config) -> ToolDemoFiles:
    """Writes the data files, the tokenizer and the tiny model under ``config.output_dir``; returns their paths."""
    output_dir = Path(config.output_dir)
    held_out = make_multiplication_questions(config.n_eval, seed=config.seed + 1)
    train = make_multiplication_questions(config.n_train // 2, seed=config.seed, exclude=set(held_out))
    selection = make_multiplication_questions(TOOL_SELECTION_QUESTIONS, seed=config.seed + 2,
                                              exclude=set(held_out) | set(train))
    files = ToolDemoFiles(train=output_dir / "data" / "train.jsonl", questions=output_dir / "data" / "questions.jsonl",
                          held_out=output_dir / "data" / "val.jsonl", selection=output_dir / "data" / "select.jsonl",
                          template=output_dir / "data" / "tool.prompt", base_model=output_dir / "base-model")
    records = turn_records(train)
    random.Random(config.seed).shuffle(records)
    write_jsonl(records, files.train)
    write_jsonl(question_records(train), files.questions)
    write_jsonl(question_records(held_out), files.held_out)
    write_jsonl(turn_records(selection), files.selection)
    files.template.write_text(TOOL_TEMPLATE)
    corpus = [TOOL_TEMPLATE] + [r["prompt"] + r["response"] for r in records[:4000]]
    tokenizer = build_demo_tokenizer(corpus, vocab_size=config.vocab_size, extra_tags=TOOL_TAGS)
    model = build_demo_model(tokenizer, hidden_size=config.hidden_size, num_layers=config.num_layers,
                             num_heads=config.num_heads, num_kv_heads=config.num_kv_heads, seed=config.seed)
    model.save_pretrained(files.base_model)
    tokenizer.save_pretrained(files.base_model)
    return files


def tool_sft_config(config, files: ToolDemoFiles):
    """Returns the demo's SFT config on the turn records: one evaluation, at the end, without the tool and at the whole budget."""
    return dataclasses.replace(demo_sft_config(config, files.train, files.held_out, files.base_model),
                               prompt_template=str(files.template), eval_max_new_tokens=RESPONSE_TOKENS,
                               eval_every=0, eval_before_training=False)


class StartPicker:
    """An SFT ``after_step`` hook: greedy accuracy with the tool on the selection traces after each step; keeps the weights nearest ``target``.

    A greedy rollout with the tool writes a trace token for token exactly when each of its two
    model turns is the model's argmax at every position given what precedes it (the question;
    then the question, the program and the tool's output, which the program fixes). So one
    teacher-forced forward pass over the selection traces (tokenised as SFT tokenises their
    turn pairs; one row a trace where the first pair is a prefix of the second, as on the
    demo's tokenizer) measures the share the model writes itself: its greedy accuracy with the
    tool, or a lower bound of it where the model finds another right program
    (``tests/test_tool_demo.py`` checks it question by question against real rollouts). The
    copy is learnt abruptly (about 1% to 100% within 20 steps, docs/tools.md), so each step is
    measured, where a checkpoint a step would cost a few GB, until one reaches twice the target
    (nearer steps do not come after that on a rise this steep). The weights are written to
    ``directory`` (an HF model directory) whenever a step comes nearer ``target`` than every
    earlier one (the earliest wins a tie), and the curve, one ``{step, accuracy}`` a measured
    step, to ``curve`` after the last.
    """

    def __init__(self, selection: Path, target: float, directory: Path, curve: Path):
        self.examples, self.target, self.directory, self.curve = load_examples(str(selection)).examples, target, directory, curve
        self.batch: tuple[dict[str, torch.Tensor], list[int]] | None = None  # padded rows, each row's trace
        self.step, self.accuracy, self.history, self.done = 0, float("nan"), [], False

    def _tokenise(self, tokenizer, template: str) -> None:
        data = tokenize_examples(self.examples, tokenizer, template, max_length=None)
        if len(data.prompt_ids) != len(self.examples) or len(self.examples) % 2:
            raise ValueError(f"{len(self.examples)} selection turns, {len(data.prompt_ids)} tokenised: expected two a trace")
        prompts, segments, trained, traces = [], [], [], []  # traces: the trace of each row
        for trace, first in enumerate(range(0, len(self.examples), 2)):
            (p1, p2), (o1, o2) = data.prompt_ids[first: first + 2], data.output_ids[first: first + 2]
            if p2[: len(p1) + len(o1)] == p1 + o1:  # the second pair continues the first: one row, the output untrained
                rows = [(p1, [o1, p2[len(p1) + len(o1):], o2], [True, False, True])]
            else:
                rows = [(p1, [o1], [True]), (p2, [o2], [True])]
            for prompt, row_segments, row_trained in rows:
                prompts.append(prompt)
                segments.append(row_segments)
                trained.append(row_trained)
                traces.append(trace)
        self.batch = (pad_and_shift_segments(prompts, segments, trained, pad_token_id_of(tokenizer)), traces)

    def trace_matches(self, model, tokenizer, template: str) -> list[bool]:
        """Returns, for each selection trace, whether its every model-turn token is ``model``'s argmax given its prefix."""
        if self.batch is None:
            self._tokenise(tokenizer, template)
        batch, traces = self.batch
        was_training = model.training
        model.eval()
        with torch.no_grad():  # right padding: a causal model's positions never see the pads after them
            predicted = model(input_ids=batch["input_ids"]).logits.argmax(dim=-1)
        model.train(was_training)
        rows_right = ((predicted == batch["labels"]) | ~batch["response_mask"]).all(dim=1).tolist()
        matches = [True] * (traces[-1] + 1)
        for trace, right in zip(traces, rows_right):
            matches[trace] = matches[trace] and right
        return matches

    def accuracy_of(self, model, tokenizer, template: str) -> float:
        matches = self.trace_matches(model, tokenizer, template)
        return sum(matches) / len(matches)

    def __call__(self, session, step: int) -> None:
        if not self.done:
            accuracy = self.accuracy_of(session.model, session.tokenizer, session.template)
            self.history.append({"step": step, "accuracy": accuracy})
            if self.step == 0 or abs(accuracy - self.target) < abs(self.accuracy - self.target):
                self.step, self.accuracy = step, accuracy
                session.model.save_pretrained(self.directory)
                session.tokenizer.save_pretrained(self.directory)
            self.done = accuracy >= min(1.0, 2 * self.target)
        if step == len(session.steps):
            write_jsonl(self.history, self.curve)


def tool_grpo_config(config, files: ToolDemoFiles, policy_dir: Path) -> GRPOConfig:
    """Returns the ``GRPOConfig`` of the demo's GRPO stage: tool rollouts from ``policy_dir`` (the SFT weights ``StartPicker`` kept).

    The start is an SFT step part way up the copy's abrupt rise (nearest ``TOOL_START_TARGET``
    on the selection traces): from the SFT's end every sampled trajectory is right and every
    group's advantages are 0 (docs/tools.md). Each step samples ``TOOL_GRPO_QUESTIONS``
    training questions x ``TOOL_GRPO_GROUP`` trajectories at ``TOOL_GRPO_TEMPERATURE`` and
    takes one on-policy optimizer step on them. Measured from a start at 21.9% (128 held-out
    questions, greedy with the tool): at 3e-4, 100% after 40 steps (seed 0) and after 30
    (seed 1); 5e-4 and 1e-3 collapsed to 0% (after 20 and 3 steps), 1e-4 (8 x 16) was at 47.7%
    after 15, and temperature 0.7 at 3e-4 left greedy accuracy flat for 30 steps (94.5% after
    40). A trajectory has at most one tool call and ``RESPONSE_TOKENS`` model tokens, the
    budget of the evaluations. The held-out set is evaluated with the tool before the first
    step (the start) and after the last.
    """
    return GRPOConfig(
        model=str(policy_dir), train_data=str(files.questions), val_data=str(files.held_out),
        prompt_template=str(files.template), reward="r1_zero", output_dir=str(Path(config.output_dir) / "grpo"),
        overwrite=True, dtype="float32", device="cpu", n_grpo_steps=config.tool_grpo_steps,
        learning_rate=TOOL_GRPO_LEARNING_RATE, rollout_batch_size=TOOL_GRPO_QUESTIONS * TOOL_GRPO_GROUP,
        group_size=TOOL_GRPO_GROUP, train_batch_size=TOOL_GRPO_QUESTIONS * TOOL_GRPO_GROUP,
        gradient_accumulation_steps=1, epochs_per_rollout_batch=1, sampling_temperature=TOOL_GRPO_TEMPERATURE,
        sampling_min_tokens=1, sampling_max_tokens=RESPONSE_TOKENS, max_grad_norm=1.0, loss_type="grpo_clip",
        cliprange=0.2, advantage_std="group", loss_aggregation="sequence_mean", kl_coef=0.0,
        env="python", max_tool_calls=1, tool_timeout=TOOL_TIMEOUT,
        # Integer answers grade in microseconds: worker processes would only compete for the CPU.
        grading_workers=0, backend="hf", generation_batch_size=config.eval_batch_size,
        eval_every=0, eval_before_training=True, eval_examples=config.n_eval, eval_max_new_tokens=TURN_TOKENS,
        eval_temperature=0.0, save_every=0, seed=config.seed, num_threads=config.num_threads,
        progress=config.progress, write_report=True,
    )


def evaluate_held_out(model_dir: Path, held_out: Path, output_dir: Path, config, with_tool: bool) -> dict[str, Any]:
    """Returns the summary of the held-out questions answered greedily by ``model_dir`` (written to ``output_dir``).

    With the tool each model turn has ``TURN_TOKENS`` and the response ``RESPONSE_TOKENS``;
    without it the response has ``RESPONSE_TOKENS`` in one turn (it stops at ``</answer>``
    only, so a model that writes a program goes on to guess its output).
    """
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    generator = build_generator("hf", model=load_model(str(model_dir)), tokenizer=load_tokenizer(str(model_dir)),
                                batch_size=config.eval_batch_size)
    examples = load_examples(str(held_out)).examples
    if with_tool:
        sampling = SamplingOptions(temperature=0.0, max_new_tokens=TURN_TOKENS)
        environment = PythonEnvironment(max_tool_calls=1, limits=SandboxLimits(wall_seconds=TOOL_TIMEOUT,
                                                                               cpu_seconds=int(TOOL_TIMEOUT)))
        rollouts = rollouts_for_examples(generator, examples, TOOL_TEMPLATE, sampling, r1_zero_reward_fn,
                                         grading_workers=0, environment=environment,
                                         max_response_tokens=RESPONSE_TOKENS)
    else:
        sampling = SamplingOptions(temperature=0.0, max_new_tokens=RESPONSE_TOKENS)
        rollouts = rollouts_for_examples(generator, examples, TOOL_TEMPLATE, sampling, r1_zero_reward_fn,
                                         grading_workers=0)
    return rollouts.write(output_dir, extra_summary={"env": "python" if with_tool else "math"})


class StageClock:
    """Wall and CPU seconds of each stage; CPU counts this process and its finished children (the sandboxes)."""

    def __init__(self):
        self.wall, self.cpu, self.stages = time.time(), self._cpu(), {}

    @staticmethod
    def _cpu() -> float:
        own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime

    def lap(self, name: str) -> str:
        """Returns ``name``'s minutes (wall, CPU) since the last lap, after recording them."""
        wall, cpu = time.time(), self._cpu()
        self.stages[name] = (wall - self.wall, cpu - self.cpu)
        self.wall, self.cpu = wall, cpu
        return minutes(*self.stages[name])

    def total(self) -> str:
        return minutes(sum(w for w, _ in self.stages.values()), sum(c for _, c in self.stages.values()))


def minutes(wall: float, cpu: float) -> str:
    return f"{wall / 60:.1f} min, CPU {cpu / 60:.1f} min"


def tool_line(summary: dict[str, Any]) -> str:
    calls, errors = summary.get("tool_calls", 0), summary.get("tool_error_rate") or 0.0
    return f"{summary['accuracy']:.1%} with it ({calls} calls, {errors:.1%} failing)"


def run_tool_demo(config) -> int:
    """Runs the tool demo (data, tiny model, SFT, evaluations, GRPO); prints held-out accuracy with and without the tool."""
    clock = StageClock()
    claim_demo_dir(config.output_dir)
    print(f"demo: {config.n_train // 2} traces of 4-digit multiplications that call Python once "
          f"({config.n_train} model turns), {config.n_eval} held-out questions, {RESPONSE_TOKENS} model tokens "
          f"an answer; under {config.output_dir}", flush=True)
    files = prepare_tool_demo(config)
    sft_config = tool_sft_config(config, files)
    picker = StartPicker(files.selection, TOOL_START_TARGET, Path(sft_config.output_dir) / "grpo-start",
                         Path(sft_config.output_dir) / "selection-curve.jsonl")
    sft_dir = Path(run_sft(sft_config, after_step=picker))
    summaries = eval_summaries(sft_dir)
    sft_without = summaries[-1][1] if summaries else {"accuracy": float("nan")}
    sft_time = clock.lap("sft")
    sft_with = evaluate_held_out(sft_dir / FINAL_DIR, files.held_out, sft_dir / "eval-python", config, with_tool=True)
    eval_time = clock.lap("sft-eval")
    print(f"demo: after SFT ({sft_time}; tool evaluation {eval_time}): held-out accuracy "
          f"{sft_without['accuracy']:.1%} without the tool -> {tool_line(sft_with)}", flush=True)
    if config.tool_grpo_steps:
        print(f"demo: GRPO starts from SFT step {picker.step} ({picker.directory}): {picker.accuracy:.1%} of the "
              f"{TOOL_SELECTION_QUESTIONS} selection traces written greedily with the tool, the step nearest "
              f"{TOOL_START_TARGET:.0%} (curve: {picker.curve})", flush=True)
        grpo_dir = Path(run_grpo(tool_grpo_config(config, files, picker.directory)))
        grpo_summaries = eval_summaries(grpo_dir)
        nothing = {"accuracy": float("nan")}
        grpo_start = grpo_summaries[0][1] if len(grpo_summaries) > 1 else nothing
        grpo_with = grpo_summaries[-1][1] if grpo_summaries else nothing
        grpo_without = evaluate_held_out(grpo_dir / FINAL_DIR, files.held_out, grpo_dir / "eval-no-tool", config,
                                         with_tool=False)
        print(f"demo: after GRPO ({config.tool_grpo_steps} steps from {grpo_start['accuracy']:.1%} with the tool, "
              f"{clock.lap('grpo')}): held-out accuracy {grpo_without['accuracy']:.1%} without the tool -> "
              f"{tool_line(grpo_with)}")
        print(f"demo: runs {sft_dir} and {grpo_dir} (records with every turn: {grpo_dir / 'eval'}); "
              f"{clock.total()} in all")
    else:
        print(f"demo: run {sft_dir} (records with every turn: {sft_dir / 'eval-python'}); {clock.total()} in all")
    return 0
