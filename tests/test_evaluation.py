"""Evaluation: records and summary against a hand-computed example; log_generations; the eval command end to end."""

from __future__ import annotations

import json

import pytest
import torch

from reasontune.data import Example
from reasontune.evaluation import EvalConfig, evaluate, log_generations
from reasontune.generation import Completion, Generator, SamplingOptions

rewards = pytest.importorskip("reasontune.rewards")


class ScriptedGenerator(Generator):
    """Returns fixed completions per prompt (generation itself is tested in test_generation.py)."""

    def __init__(self, by_prompt: dict[str, list[Completion]]):
        self.by_prompt = by_prompt
        self.seen: list[str] = []

    def generate(self, prompts, options):
        self.seen.extend(prompts)
        return [self.by_prompt[p][: options.n] for p in prompts]

    def sync_weights(self, model):
        pass

    def sleep(self):
        pass

    def wake(self):
        pass

    def close(self):
        pass


def completion(text: str, tokens: int, entropies=None, finish="stop") -> Completion:
    return Completion(text=text, token_ids=list(range(tokens)), finish_reason=finish, entropies=entropies)


def scripted():
    return ScriptedGenerator({
        "Q: a": [completion(" a </think> <answer>7</answer>", 4, [1.0, 3.0, 2.0, 2.0]),  # correct, entropy 2
                 completion(" b </think> <answer>8</answer>", 6, [4.0] * 6)],  # formatted, wrong; entropy 4
        "Q: b": [completion("no tags 12", 3, finish="length"),  # unformatted
                 completion(" </think> <answer>12</answer>", 5)],  # correct
        "Q: c": [completion("x", 1, finish="eos"), completion("y", 2, finish="eos")],  # unformatted twice
    })


EXAMPLES = [Example(question="a", ground_truth="7", source="f.jsonl", line=1),
            Example(question="b", ground_truth="12", source="f.jsonl", line=2),
            Example(question="c", ground_truth="3", source="f.jsonl", line=3)]


def test_records_and_summary_match_a_hand_computed_example(tmp_path):
    generator = scripted()
    result = evaluate(generator, EXAMPLES, rewards.r1_zero_reward_fn, SamplingOptions(n=2), output_dir=tmp_path,
                      template="Q: {question}", grading_workers=0)
    summary = result["summary"]
    assert generator.seen == ["Q: a", "Q: b", "Q: c"]
    assert summary["n_examples"] == 3 and summary["n_samples"] == 6
    assert summary["counts"] == {"correct": 2, "formatted_wrong": 1, "unformatted": 3}
    assert summary["accuracy"] == pytest.approx(2 / 6)
    assert summary["format_rate"] == pytest.approx(3 / 6)
    assert summary["pass_at_n"] == pytest.approx(2 / 3)  # examples a and b have a correct sample
    assert summary["mean_response_tokens"] == pytest.approx((4 + 6 + 3 + 5 + 1 + 2) / 6)  # 3.5
    assert summary["mean_response_tokens_correct"] == pytest.approx((4 + 5) / 2)  # 4.5
    assert summary["mean_response_tokens_incorrect"] == pytest.approx((6 + 3 + 1 + 2) / 4)  # 3.0
    assert summary["mean_entropy"] == pytest.approx((2.0 + 4.0) / 2)  # only two samples carry entropies
    assert summary["finish_reasons"] == {"stop": 3, "length": 1, "eos": 2}
    assert summary["generated_tokens"] == 21 and summary["grading_errors"] == 0

    lines = [json.loads(line) for line in (tmp_path / "records.jsonl").read_text().splitlines()]
    assert lines == result["records"] and len(lines) == 6
    assert [(r["index"], r["sample"], r["category"]) for r in lines] == [
        (0, 0, "correct"), (0, 1, "formatted_wrong"), (1, 0, "unformatted"),
        (1, 1, "correct"), (2, 0, "unformatted"), (2, 1, "unformatted")]
    first = lines[0]
    assert first["prompt"] == "Q: a" and first["ground_truth"] == "7" and first["response_tokens"] == 4
    assert (first["format_reward"], first["answer_reward"], first["reward"]) == (1.0, 1.0, 1.0)
    assert first["mean_entropy"] == pytest.approx(2.0) and lines[2]["mean_entropy"] is None
    assert (first["source"], first["line"]) == ("f.jsonl", 1)
    assert json.loads((tmp_path / "summary.json").read_text()) == json.loads(json.dumps(summary))


def test_log_generations_has_seed_001_fields():
    logged = log_generations(scripted(), ["Q: a", "Q: b"], ["7", "12"], rewards.r1_zero_reward_fn,
                             SamplingOptions(n=1), grading_workers=0)
    assert [r["response_length"] for r in logged["records"]] == [4, 3]
    assert logged["records"][0]["avg_token_entropy"] == pytest.approx(2.0)
    assert set(logged["records"][0]) >= {"prompt", "response", "ground_truth", "format_reward", "answer_reward",
                                         "reward", "avg_token_entropy", "response_length"}
    summary = logged["summary"]
    assert summary["accuracy"] == pytest.approx(0.5)
    assert summary["mean_response_length_correct"] == 4 and summary["mean_response_length_incorrect"] == 3
    assert summary["mean_token_entropy"] == pytest.approx(2.0)


def test_eval_command_writes_readable_records_and_summary(tmp_path, qwen_tokenizer):
    from reasontune.cli import main
    from reasontune.modeling import QWEN2_5_VOCAB_SIZE, build_model_from_config, tiny_qwen2_config

    model_dir = tmp_path / "tiny"
    build_model_from_config(tiny_qwen2_config(vocab_size=QWEN2_5_VOCAB_SIZE, hidden_size=16, num_layers=1,
                                              num_heads=2, num_kv_heads=1), seed=0).save_pretrained(model_dir)
    qwen_tokenizer.save_pretrained(model_dir)
    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps({"question": f"What is {i} + {i}?", "answer": f"{i} + {i} = {2 * i}\n#### {2 * i}"})
                            + "\n" for i in range(5)))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        code = main(["eval", "--model", str(model_dir), "--data", str(data), "--output-dir", str(tmp_path / "out"),
                     "--max-examples", "3", "--eval-max-new-tokens", "4", "--generation-batch-size", "2",
                     "--grading-workers", "0", "--num-threads", "1"])
        threads_used = torch.get_num_threads()
    finally:
        torch.set_num_threads(threads)
    assert code == 0 and threads_used == 1  # --num-threads reaches torch (it was set to 2 before)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    records = [json.loads(line) for line in (tmp_path / "out" / "records.jsonl").read_text().splitlines()]
    assert summary["n_examples"] == 3 and len(records) == 3
    assert sum(summary["counts"].values()) == 3 and summary["mean_entropy"] is not None
    assert all(r["response_tokens"] <= 4 and r["prompt"].endswith("Assistant: <think>") for r in records)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["max_examples"] == 3
    assert EvalConfig().prompt_template == "auto" and EvalConfig().reward_name == "r1_zero"


BENCHMARK_DIR = __import__("pathlib").Path(__file__).parent / "data" / "benchmarks"


def test_eval_suite_with_samples_writes_per_benchmark_results_and_compare_reads_them(tmp_path, tiny_model_dir, capsys):
    """--benchmarks from local files, 4 samples each: per-benchmark records/summaries with pass@k / maj@k / avg@k and
    intervals, one results table, plots; then `reasontune compare` of two such evaluations."""
    from reasontune.cli import main
    from reasontune.estimators import pass_at_k

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, seed in (("a", "0"), ("b", "1")):
            assert main(["eval", "--model", str(tiny_model_dir), "--benchmarks", "math500,gsm8k",
                         "--benchmark-dir", str(BENCHMARK_DIR), "--output-dir", str(tmp_path / name),
                         "--n-samples", "4", "--k", "1,2,4", "--eval-temperature", "1.0", "--eval-max-new-tokens", "6",
                         "--n-bootstrap", "50", "--grading-workers", "0", "--seed", seed]) == 0
    finally:
        torch.set_num_threads(threads)
    for benchmark in ("math500", "gsm8k"):
        records = [json.loads(line) for line in (tmp_path / "a" / benchmark / "records.jsonl").read_text().splitlines()]
        summary = json.loads((tmp_path / "a" / benchmark / "summary.json").read_text())
        questions = sorted({r["question_id"] for r in records})
        assert len(records) == 4 * len(questions) and all(q.startswith(f"{benchmark}:") for q in questions)
        assert all("answer" in r for r in records) and summary["benchmark"] == benchmark
        assert summary["reward"] == "question_only"  # the benchmark's standard prompt asks for \boxed{}
        estimates = summary["estimates"]
        assert set(estimates["metrics"]) == {f"{m}@{k}" for m in ("pass", "maj", "avg") for k in (1, 2, 4)}
        assert estimates["n_samples"] == 4 and estimates["temperature"] == 1.0 and "boxed" in estimates["prompt"]
        # pass@2 recomputed from the records by hand: mean over questions of the unbiased estimator.
        correct = {q: sum(r["answer_reward"] for r in records if r["question_id"] == q) for q in questions}
        expected = sum(pass_at_k(4, int(c), 2) for c in correct.values()) / len(questions)
        assert estimates["metrics"]["pass@2"]["value"] == pytest.approx(expected)
        low, high = estimates["metrics"]["pass@2"]["low"], estimates["metrics"]["pass@2"]["high"]
        assert low <= expected <= high
    table = (tmp_path / "a" / "results.md").read_text()
    assert "math500" in table and "gsm8k" in table and "pass@4" in table
    results = json.loads((tmp_path / "a" / "results.json").read_text())
    assert set(results["benchmarks"]) == {"math500", "gsm8k"} and "maj@4" in results["columns"]
    assert (tmp_path / "a" / "pass_at_k.png").exists()
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--k", "1,4", "--n-bootstrap", "50",
                 "--output-dir", str(tmp_path / "cmp")]) == 0
    printed = capsys.readouterr().out
    assert "math500" in printed and "gsm8k" in printed and "p" in printed
    assert (tmp_path / "cmp" / "comparison.png").exists()


def test_eval_rejects_k_beyond_the_samples_and_unknown_benchmarks(tmp_path):
    with pytest.raises(SystemExit, match="exceeds --n-samples"):
        EvalConfig(model="m", data="d.jsonl", output_dir=str(tmp_path), k="1,8", eval_n_samples=4).validate()
    with pytest.raises(SystemExit, match="--benchmarks"):
        EvalConfig(model="m", benchmarks="math500,mathbench", output_dir=str(tmp_path)).validate()
    with pytest.raises(SystemExit, match="not both"):
        EvalConfig(model="m", data="d.jsonl", benchmarks="gsm8k", output_dir=str(tmp_path)).validate()
