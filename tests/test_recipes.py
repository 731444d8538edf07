"""The SmolLM2 GSM8K recipe's pieces: its prompt is the model's own chat template, its table reads a run's files."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

from reasontune.data import example_from_record, load_template, with_r1_zero_targets

RECIPES = Path(__file__).resolve().parents[1] / "examples" / "recipes"
SMOLLM2_DIR = Path(os.environ.get("REASONTUNE_SMOLLM2_DIR", RECIPES.parents[1] / "models" / "smollm2"))


def test_recipe_prompt_is_smollm2_chat_template_with_r1_zero_instruction_ending_in_think():
    if not (SMOLLM2_DIR / "tokenizer.json").exists():
        pytest.skip(f"no SmolLM2 tokenizer at {SMOLLM2_DIR} (set REASONTUNE_SMOLLM2_DIR)")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(SMOLLM2_DIR)
    template = load_template(str(RECIPES / "smollm2_r1_zero_chat.prompt"))
    system = "Think step by step in <think> </think>, then answer in <answer> </answer>."
    expected = tokenizer.apply_chat_template([{"role": "system", "content": system},
                                              {"role": "user", "content": "{question}"}],
                                             tokenize=False, add_generation_prompt=True) + "<think>"
    assert template == expected
    # The SFT target continues the prompt: " reasoning </think> <answer>N</answer>", annotations gone.
    record = {"question": "Q", "answer": "She sold 48/2 = <<48/2=24>>24 clips.\n#### 1,024"}
    [example] = with_r1_zero_targets([example_from_record(record)])
    assert example.response == " She sold 48/2 = 24 clips. </think> <answer>1024</answer>"
    ids = tokenizer(template.replace("{question}", "Q"))["input_ids"]
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")  # special tokens parsed, not spelled out


def _load_table_module():
    spec = importlib.util.spec_from_file_location("recipe_table", RECIPES / "recipe_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_recipe_table_reads_minutes_loads_summaries_and_paired_comparisons(tmp_path):
    # sft ran in two parts (12.0 min at load 6.0 with 2.5 CPU min, 1.5 at load 3.0 with 0.5);
    # eval-sft's line has no load or CPU column (older runs).
    (tmp_path / "minutes.tsv").write_text("eval-zero-shot\t14.9\t4.0\t6.1\nsft\t12.0\t6.0\t2.5\nsft\t1.5\t3.0\t0.5\n"
                                          "eval-sft\t13.2\n")
    for stage, value, low, high, format_rate, tokens in (("zero-shot", 0.0, 0.0, 0.0, 0.0, 196.55),
                                                         ("sft", 0.035, 0.01, 0.06, 0.955, 120.25)):
        (tmp_path / f"eval-{stage}").mkdir()
        (tmp_path / f"eval-{stage}" / "summary.json").write_text(json.dumps({
            "n_examples": 200, "format_rate": format_rate, "mean_response_tokens": tokens,
            "estimates": {"metrics": {"pass@1": {"value": value, "low": low, "high": high}}}}))
    # The comparison's per-stage intervals (recomputed from the records) win over the summaries' ones.
    (tmp_path / "compare-zero-shot-sft").mkdir()
    (tmp_path / "compare-zero-shot-sft" / "comparison.json").write_text(json.dumps(
        {"rows": [{"values": [{"value": 0.0, "low": 0.0, "high": 0.0188}, {"value": 0.035, "low": 0.0171, "high": 0.0706}],
                   "differences": [{"difference": 0.035, "low": 0.01, "high": 0.06, "p_value": 0.004}]}]}))
    lines = _load_table_module().table(tmp_path).splitlines()
    assert lines[2] == "| eval zero-shot | 14.9 | 4.0 | 6.1 | 0.0 [0.0, 1.9] |  | 0.0 | 196.6 |"
    # 12.0 + 1.5 minutes, 2.5 + 0.5 CPU minutes; load weighted by minutes: (12.0 * 6.0 + 1.5 * 3.0) / 13.5 = 5.67
    assert lines[3] == "| sft training | 13.5 | 5.7 | 3.0 | | | | |"
    assert lines[4] == "| eval sft | 13.2 |  |  | 3.5 [1.7, 7.1] | +3.5 [+1.0, +6.0] (p 0.004) | 95.5 | 120.2 |"
    assert lines[5:7] == ["| grpo training | not run | | | | | | |", "| eval grpo | not run | | | | | | |"]
    # 14.9 + 13.5 + 13.2; no CPU total, since eval-sft has none
    assert "Total wall-clock: 41.6 minutes; 200 test questions" in lines[-1]
    (tmp_path / "minutes.tsv").write_text("eval-zero-shot\t14.9\t4.0\t6.1\nsft\t12.0\t6.0\t2.5\neval-sft\t13.2\t5.0\t4.4\n")
    assert "Total wall-clock: 40.1 minutes; CPU: 13.0 minutes; 200" in _load_table_module().table(tmp_path)


def _load_compact_traces_module():
    spec = importlib.util.spec_from_file_location("compact_traces", RECIPES / "compact_traces.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_compact_traces_keep_the_equations_and_filter_by_their_count(tmp_path):
    compact = _load_compact_traces_module()
    natalia = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
               "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72")
    assert compact.equations(natalia) == ["48/2=24", "48+24=72"]
    assert compact.compact_target(natalia) == " 48/2=24\n48+24=72 </think> <answer>72</answer>"
    # No annotation: the sentences stay; no '####': no target.
    assert compact.compact_target("Half of 10 is 5.\n#### 5") == " Half of 10 is 5. </think> <answer>5</answer>"
    assert compact.compact_target("no answer here") is None

    three = "a <<1+1=2>>2, b <<2*3=6>>6, c <<6-1=5>>5\n#### 5"
    source = tmp_path / "train.jsonl"
    source.write_text("\n".join(json.dumps(r) for r in [
        {"question": "How many clips?", "answer": natalia},
        {"question": "Three steps?", "answer": three},
        {"question": "Unanswered?", "answer": "no answer here"},
    ]) + "\n")
    template = tmp_path / "t.prompt"
    template.write_text("Q: {question}\nA: <think>\n")
    out = tmp_path / "out.jsonl"
    assert compact.main([str(source), str(out), "--prompt-template", str(template), "--max-equations", "2"]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert records == [{"prompt": "Q: How many clips?\nA: <think>",
                        "response": " 48/2=24\n48+24=72 </think> <answer>72</answer>", "ground_truth": "72"}]
    # reasontune reads the records as fixed prompts with their SFT targets and references.
    example = example_from_record(records[0], str(out), 1)
    assert (example.prompt, example.response, example.ground_truth) == (records[0]["prompt"], records[0]["response"], "72")
    assert compact.main([str(source), str(out), "--prompt-template", str(template)]) == 0
    assert len(out.read_text().splitlines()) == 2


@pytest.mark.slow  # about 30 s a case on a loaded 2-core machine: bash, and Python started six times
@pytest.mark.parametrize("traces, questions", [("full", "all"), ("compact", "easy")])
def test_recipe_script_passes_each_modes_data_and_records_cpu_minutes(tmp_path, traces, questions):
    import subprocess

    gsm8k = tmp_path / "gsm8k"
    gsm8k.mkdir()
    (gsm8k / "train.jsonl").write_text(json.dumps({"question": "Q?", "answer": "a <<1+1=2>>2\n#### 2"}) + "\n")
    runs = tmp_path / "runs"
    env = dict(os.environ, GSM8K_DIR=str(gsm8k), RUNS=str(runs), MODEL="m", REASONTUNE="echo",
               SFT_TRACES=traces, RL_QUESTIONS=questions)
    result = subprocess.run(["bash", str(RECIPES / "smollm2_gsm8k.sh"), "sft", "grpo"], env=env,
                            capture_output=True, text=True, timeout=120, check=True)
    sft, grpo = [line.split() for line in result.stdout.splitlines() if line.startswith(("sft ", "grpo "))]
    flag = lambda command, name: command[command.index(name) + 1]
    if traces == "compact":
        assert flag(sft, "--train-data") == str(runs / "data" / "train_compact.jsonl") and "--prompt-template" not in sft
        assert (flag(sft, "--batch-size"), flag(sft, "--learning-rate"), flag(sft, "--max-steps")) == ("4", "1e-4", "160")
        assert flag(grpo, "--train-data") == str(runs / "data" / "train_easy.jsonl") and "--prompt-template" not in grpo
    else:
        assert flag(sft, "--train-data") == str(gsm8k / "train.jsonl") and flag(sft, "--prompt-template").endswith(".prompt")
        assert (flag(sft, "--batch-size"), flag(sft, "--learning-rate"), flag(sft, "--max-steps")) == ("8", "2e-4", "44")
        assert flag(grpo, "--train-data") == str(gsm8k / "train.jsonl")
    # the published GRPO stage: 4 questions x 16 a draw, Dr. GRPO's constant token weight, KL to the SFT weights
    assert (flag(grpo, "--group-size"), flag(grpo, "--rollout-batch-size"), flag(grpo, "--recipe"),
            flag(grpo, "--kl-coef"), flag(grpo, "--n-grpo-steps")) == ("16", "64", "dr_grpo", "0.05", "4")
    assert flag(sft, "--save-total-limit") == flag(grpo, "--save-total-limit") == "2"  # 2.2 GB a SmolLM2 checkpoint
    rows = [line.split("\t") for line in (runs / "minutes.tsv").read_text().splitlines()]
    assert [row[0] for row in rows] == ["sft", "grpo"] and all(len(row) == 4 for row in rows)
    assert all(float(row[3]) >= 0.0 for row in rows)  # CPU minutes of `echo`: 0.0 after rounding
