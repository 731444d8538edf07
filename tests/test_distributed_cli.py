"""The real commands under torchrun: ``torchrun --nproc_per_node 2 -m reasontune sft|eval …`` (gloo on CPU).

SFT at world size 2 × accumulation 1 must end with the weights of one process × accumulation 2
on the same global batch (the loss counts are summed over ranks, FSDP2 sums the gradients);
eval sharded over 2 ranks must write the records of one process, in order. A bad flag is
refused before any process group starts, and an error on one rank stops both with one message.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_distributed import SCRIPTS, launch

sys.path.insert(0, str(SCRIPTS))

from reasontune.cli import main

STEPS = 3


def write_uneven_sft_data(path: Path, count: int) -> Path:
    """Writes ``count`` SFT records whose responses run from 2 to about 40 tokens (so ranks' token counts differ)."""
    with open(path, "w") as handle:
        for i in range(count):
            words = " ".join(str(7 * i + k) for k in range(1 + (i * 5) % 17))
            handle.write(json.dumps({"prompt": f"User: count from {7 * i}. Assistant:", "response": f" {words}",
                                     "ground_truth": str(i)}) + "\n")
    return path


def sft_flags(model_dir: Path, data: Path, output_dir: Path, accumulation: int, *extra: str) -> list[str]:
    return ["sft", "--model", str(model_dir), "--train-data", str(data), "--output-dir", str(output_dir),
            "--gradient-accumulation-steps", str(accumulation), "--learning-rate", "1e-2", "--num-epochs", "1",
            "--max-length", "48", "--num-threads", "1", "--no-progress", "--no-write-report", "--warmup-ratio", "0",
            "--lr-scheduler", "constant", "--max-grad-norm", "1.0", "--normalize-constant", "3.0",
            "--dtype", "float32", "--device", "cpu", *extra]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """Returns every tensor of ``final/`` (one safetensors file from one process, one per layer group from FSDP2)."""
    weights = {}
    for path in sorted((run_dir / "final").glob("model*.safetensors")):
        weights.update(load_file(path))
    return weights


def records_at(run_dir: Path, step: int) -> str:
    return (run_dir / "eval" / f"step-{step:06d}" / "records.jsonl").read_text()


def same_records(one: str, two: str) -> bool:
    """Returns whether two records.jsonl texts hold the same records: every value equal, floats within 1e-6 relative."""
    def close(a, b) -> bool:
        if isinstance(a, float) or isinstance(b, float):
            return isinstance(a, (int, float)) and isinstance(b, (int, float)) and a == pytest.approx(b, rel=1e-6)
        if isinstance(a, dict) and isinstance(b, dict):
            return a.keys() == b.keys() and all(close(a[k], b[k]) for k in a)
        if isinstance(a, list) and isinstance(b, list):
            return len(a) == len(b) and all(map(close, a, b))
        return a == b

    first, second = one.splitlines(), two.splitlines()
    return len(first) == len(second) and all(close(json.loads(a), json.loads(b)) for a, b in zip(first, second))


def train_metrics(run_dir: Path) -> list[dict]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [line for line in lines if line["kind"] == "train"]


# padded: 10 examples in microbatches of 2 -> 5 microbatches -> steps of 2, 2 and 1 microbatch (rank 1 takes a
# filler microbatch in step 3); packed: rows of 47 tokens, one row a microbatch, cut to 3 steps.
LAYOUTS = {"padded": (10, ["--batch-size", "2"]), "packed": (24, ["--batch-size", "1", "--packing", "--max-steps", "3"])}


def test_rank_microbatches_deal_out_a_step_and_pad_short_ranks_with_fillers():
    from reasontune.distributed import DistributedContext
    from reasontune.training.data_parallel import rank_microbatches

    def ctx(rank):
        return DistributedContext(rank=rank, world_size=2, local_rank=rank, device=torch.device("cpu"), backend="gloo")

    step = [{"response_mask": torch.ones(1, 3, dtype=torch.bool), "num_examples": 1, "id": i} for i in range(3)]
    rank0, rank1 = rank_microbatches(step, ctx(0)), rank_microbatches(step, ctx(1))
    assert [mb["id"] for mb in rank0] == [0, 1] and [mb["id"] for mb in rank1[:1]] == [2]
    assert len(rank1) == 2 and rank1[1]["filler"] and rank1[1]["num_examples"] == 0  # as many passes as rank 0
    assert not rank1[1]["response_mask"].any() and step[0]["response_mask"].all()  # the template is untouched
    last = rank_microbatches(step[:1], ctx(1))  # a step of one microbatch: rank 1 gets only a filler
    assert len(last) == 1 and last[0]["filler"]


@pytest.mark.parametrize("command", ["filter", "demo"])
def test_a_command_that_is_not_data_parallel_refuses_torchrun(monkeypatch, capsys, command):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it for every rank
    with pytest.raises(SystemExit) as stopped:
        main([command])
    assert stopped.value.code == 2
    assert f"reasontune {command} does not run under torchrun" in capsys.readouterr().err


def test_the_launch_recorded_in_config_json_loads_back_and_serves_as_config_file(tmp_path):
    from reasontune.config import load_config, load_config_file, save_config
    from reasontune.training.sft import SFTConfig

    config = SFTConfig(train_data="train.jsonl", batch_size=3, gradient_accumulation_steps=5)
    save_config(config, tmp_path / "config.json", launch={"world_size": 4, "backend": "gloo",
                                                          **config.launch_sizes(4)})
    # global batch = 4 ranks x batch 3 x accumulation 5 = 60
    assert json.loads((tmp_path / "config.json").read_text())["distributed"] == {
        "world_size": 4, "backend": "gloo", "global_batch": 60, "per_rank_batch": 3, "gradient_accumulation_steps": 5}
    assert load_config(tmp_path / "config.json", SFTConfig) == config
    assert load_config_file(tmp_path / "config.json", SFTConfig)["batch_size"] == 3


def test_merged_rollouts_keep_the_order_and_time_the_slowest_rank():
    from reasontune.generation import Completion
    from reasontune.rollouts import Rollouts, merge_rollouts

    def part(prompts, seconds, tokens):
        return Rollouts(prompts=prompts, ground_truths=["1"] * len(prompts),
                        completions=[[Completion(text="x", token_ids=[1], finish_reason="length")] for _ in prompts],
                        rewards=[[{"format_reward": 0.0, "answer_reward": 0.0, "reward": 0.0}] for _ in prompts],
                        timing={"generation_seconds": seconds, "grading_seconds": 0.5, "generated_tokens": tokens})

    merged = merge_rollouts([part(["a", "b"], 2.0, 30), part(["c"], 4.0, 10)])
    assert merged.prompts == ["a", "b", "c"] and [r["index"] for r in merged.records()] == [0, 1, 2]
    # ranks generate at once: the slowest rank's 4 s; 30 + 10 tokens in 4 s = 10 tokens/s
    assert merged.timing == {"generation_seconds": 4.0, "grading_seconds": 0.5, "generated_tokens": 40,
                             "tokens_per_second": 10.0}


# Each case pays a torchrun launch (two ranks importing torch and transformers, about 20 s on 2 shared cores): the
# padded sequence_sum case (filler microbatch, resume at another world size) runs by default, the others are slow.
@pytest.mark.parametrize("layout, aggregation", [("padded", "sequence_sum"),
                                                 pytest.param("packed", "token_mean", marks=pytest.mark.slow),
                                                 pytest.param("padded", "token_mean", marks=pytest.mark.slow),
                                                 pytest.param("packed", "sequence_sum", marks=pytest.mark.slow)])
def test_sft_world_two_equals_one_process_with_twice_the_accumulation(tiny_model_dir, tmp_path, layout, aggregation):
    count, layout_flags = LAYOUTS[layout]
    data = write_uneven_sft_data(tmp_path / "train.jsonl", count)
    first_case = layout == "padded" and aggregation == "sequence_sum"
    # The first case also evaluates before and after training (in-loop evaluation sharded over the ranks; greedy,
    # one prompt a generation batch as in the eval test) and saves checkpoints, resumed below.
    evaluating = ["--val-data", str(data), "--eval-examples", "3", "--eval-max-new-tokens", "6",
                  "--generation-batch-size", "1", "--grading-workers", "0"] if first_case else []
    saving = ["--save-every", "1"] if first_case else []
    flags = [*layout_flags, "--loss-aggregation", aggregation, *evaluating]
    assert main(sft_flags(tiny_model_dir, data, tmp_path / "one", 2, *flags)) == 0
    result = launch(["-m", "reasontune", *sft_flags(tiny_model_dir, data, tmp_path / "two", 1, *flags, *saving)],
                    world_size=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("global batch") == 1  # rank 0 alone prints
    launch_record = json.loads((tmp_path / "two" / "config.json").read_text())["distributed"]
    assert launch_record["world_size"] == 2 and launch_record["gradient_accumulation_steps"] == 1

    one, two = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    assert one.keys() == two.keys()
    initial = load_file(tiny_model_dir / "model.safetensors")
    moved = max(float((one[name] - initial[name]).abs().max()) for name in one)
    assert moved > 1e-3, "training barely moved the weights: the comparison would prove nothing"
    # The whole model, as one fp32 vector, within 1e-6 relative (measured: 1e-8 to 8e-8). Each tensor within 1e-4:
    # AdamW divides each gradient by its own running RMS, so on tensors whose gradient is tiny (the k_proj biases:
    # measured 4e-8 to 1e-5) it magnifies the rounding differences of summing in another order into the update.
    # AdamW is blind to a uniform gradient scale, so the logged global gradient norms are compared too (below).
    difference = sum(float((two[name] - one[name]).double().square().sum()) for name in one) ** 0.5
    size = sum(float(one[name].double().square().sum()) for name in one) ** 0.5
    assert difference / size <= 1e-6, f"world 2 differs from world 1 by {difference / size:.2e} (relative)"
    per_tensor = {name: float((two[name] - one[name]).norm() / one[name].norm()) for name in one}
    worst = max(per_tensor, key=per_tensor.get)
    print(f"{layout} {aggregation}: world 2 vs 1, relative difference {difference / size:.1e} (whole model), "
          f"{per_tensor[worst]:.1e} (worst tensor, {worst})")
    assert per_tensor[worst] <= 1e-4, f"{worst}: world 2 differs from world 1 by {per_tensor[worst]:.2e} (relative)"
    metrics_one, metrics_two = train_metrics(tmp_path / "one"), train_metrics(tmp_path / "two")
    assert len(metrics_two) == STEPS
    for key in ("loss", "grad_norm", "response_tokens", "examples"):  # global reductions, logged by rank 0
        assert [m[key] for m in metrics_two] == pytest.approx([m[key] for m in metrics_one], rel=1e-6), key
    if first_case:
        # Before training the weights are the same bit for bit: so are the records' texts and rewards, and their
        # log-probs within float rounding (the ranks' batches have other shapes, which an AVX-512 kernel rounds
        # differently: 7e-8 relative measured). Afterwards the weights differ in their last bits, which could flip
        # a greedy choice: only the count is checked.
        assert same_records(records_at(tmp_path / "two", 0), records_at(tmp_path / "one", 0))
        assert len(records_at(tmp_path / "two", STEPS).splitlines()) == 3
        # Resume the world-2 run from its checkpoint-2 (model + optimizer sharded over 2 ranks) in ONE process with
        # accumulation 2: the third step must land on the weights of the uninterrupted one-process run.
        resumed = tmp_path / "resumed"
        shutil.copytree(tmp_path / "two", resumed)
        shutil.rmtree(resumed / "final")
        assert (resumed / "checkpoint-2" / "sharded" / ".metadata").exists()
        assert main(sft_flags(tiny_model_dir, data, resumed, 2, *flags, "--resume")) == 0
        after = final_weights(resumed)
        difference = sum(float((after[name] - one[name]).double().square().sum()) for name in one) ** 0.5
        assert difference / size <= 1e-6, f"resumed at world size 1: {difference / size:.2e} (relative)"
        assert [m["step"] for m in train_metrics(resumed)] == [1, 2, 3]


def test_sft_with_lora_on_two_ranks_trains_the_adapter_of_one_process_with_twice_the_accumulation(tiny_model_dir,
                                                                                                     tmp_path):
    from transformers import AutoModelForCausalLM

    data = write_uneven_sft_data(tmp_path / "train.jsonl", 10)
    # Adapters in the decoder layers and on lm_head (the FSDP2 root's own module, taken by the fused log-prob path),
    # the RMSNorms trained in full (modules_to_save in both the layers and the root).
    flags = ["--batch-size", "2", "--loss-aggregation", "sequence_sum", "--lora-rank", "4",
             "--lora-target-modules", "q_proj", "v_proj", "down_proj", "lm_head", "--lora-trainable-modules", "norm"]
    assert main(sft_flags(tiny_model_dir, data, tmp_path / "one", 2, *flags)) == 0
    result = launch(["-m", "reasontune", *sft_flags(tiny_model_dir, data, tmp_path / "two", 1, *flags,
                                                     "--save-every", "2")], world_size=2)
    assert result.returncode == 0, result.stderr[-3000:]
    adapters = [load_file(tmp_path / run / "final" / "adapter" / "adapter_model.safetensors") for run in ("one", "two")]
    one, two = adapters
    # Per layer A and B of 3 projections and 2 norms; the root: lm_head's A, B and base weight (PEFT saves an
    # adapted lm_head whole), the final norm.
    assert one.keys() == two.keys() and len(one) == 2 * (3 * 2 + 2) + 3 + 1
    assert sum(".lora_B." in name for name in one) == 7 and any("lm_head" in name for name in one)
    assert min(float(one[name].abs().max()) for name in one if ".lora_B." in name) > 1e-3  # B starts at 0: it moved
    difference = sum(float((two[name] - one[name]).double().square().sum()) for name in one) ** 0.5
    size = sum(float(one[name].double().square().sum()) for name in one) ** 0.5
    print(f"LoRA: world 2 vs 1, relative difference of the adapter {difference / size:.1e}")
    assert difference / size <= 1e-6, f"world 2's adapter differs from world 1's by {difference / size:.2e}"
    metrics_one, metrics_two = train_metrics(tmp_path / "one"), train_metrics(tmp_path / "two")
    assert [m["loss"] for m in metrics_two] == pytest.approx([m["loss"] for m in metrics_one], rel=1e-6)
    # final/: the merged model, written layer by layer from the shards, loads without peft and equals world 1's.
    merged_one, merged_two = (AutoModelForCausalLM.from_pretrained(tmp_path / run / "final").state_dict()
                              for run in ("one", "two"))
    assert merged_two.keys() == merged_one.keys()
    assert max(float((merged_two[k] - merged_one[k]).norm() / merged_one[k].norm()) for k in merged_one) <= 1e-6
    # checkpoint-2: the adapter gathered on rank 0, model + optimizer state sharded; resumed in one process.
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "two", resumed)
    shutil.rmtree(resumed / "final")
    assert (resumed / "checkpoint-2" / "adapter_model.safetensors").exists()
    assert (resumed / "checkpoint-2" / "sharded" / ".metadata").exists()
    assert main(sft_flags(tiny_model_dir, data, resumed, 2, *flags, "--resume")) == 0
    after = load_file(resumed / "final" / "adapter" / "adapter_model.safetensors")
    difference = sum(float((after[name] - one[name]).double().square().sum()) for name in one) ** 0.5
    assert difference / size <= 1e-6, f"resumed at world size 1: {difference / size:.2e} (relative)"


SFT_FLAGS_REFUSED = ["--batch-size", "0"]


@pytest.mark.slow
def test_a_bad_flag_is_refused_before_any_process_group_starts(tiny_model_dir, tmp_path):
    data = write_uneven_sft_data(tmp_path / "train.jsonl", 4)
    result = launch(["-m", "reasontune", *sft_flags(tiny_model_dir, data, tmp_path / "run", 1, *SFT_FLAGS_REFUSED)],
                    world_size=2, timeout=120)
    assert result.returncode != 0
    assert result.stderr.count("error: --batch-size: must be >= 1, got 0") == 1  # rank 0 says it, once
    # Refused by the config check in each rank before init_distributed: no rank reached the failure handler
    # that runs inside the process group, and no run directory was made.
    assert "error on rank" not in result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_an_error_on_one_rank_of_sft_stops_both_with_one_message(tiny_model_dir, tmp_path):
    data = write_uneven_sft_data(tmp_path / "train.jsonl", 8)
    started = time.time()
    result = launch([str(SCRIPTS / "failing_cli.py"),
                     *sft_flags(tiny_model_dir, data, tmp_path / "run", 1, "--batch-size", "2")], world_size=2,
                    timeout=180)
    assert result.returncode != 0
    assert result.stderr.count("error on rank 1 of 2: RuntimeError: injected failure in step 2") == 1
    assert "error on rank 0" not in result.stderr  # rank 0 only says that a peer failed
    assert time.time() - started < 90  # not the 600 s collective timeout
    assert not (tmp_path / "run" / "final").exists()


@pytest.mark.slow
def test_eval_sharded_over_two_ranks_writes_the_records_of_one_process(tiny_model_dir, tmp_path):
    data = tmp_path / "questions.jsonl"
    # 5 questions: rank 0 takes 3, rank 1 takes 2; the gathered records must keep the original order.
    data.write_text("".join(json.dumps({"question": f"What is {a} + {a}?", "answer": str(2 * a)}) + "\n"
                            for a in (3, 14, 15, 92, 65)))
    flags = ["eval", "--model", str(tiny_model_dir), "--data", str(data), "--eval-max-new-tokens", "8",
             "--generation-batch-size", "1", "--grading-workers", "0", "--n-bootstrap", "20", "--device", "cpu"]
    # One thread, as each of the two ranks gets on this 2-core machine: a sum over the vocabulary split over
    # two threads rounds differently in its last bits (the entropies), which is not what this test is about.
    assert main([*flags, "--num-threads", "1", "--output-dir", str(tmp_path / "one")]) == 0
    result = launch(["-m", "reasontune", *flags, "--output-dir", str(tmp_path / "two")], world_size=2, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("wrote ") == 1  # rank 0 alone reports
    one = (tmp_path / "one" / "records.jsonl").read_text().splitlines()
    two = (tmp_path / "two" / "records.jsonl").read_text().splitlines()
    assert len(one) == 5 and [json.loads(line)["line"] for line in two] == [1, 2, 3, 4, 5]
    # Generation batches of one prompt: each response comes from the same computation in both runs (wider
    # batches would left-pad each prompt differently and move the entropies in their last bits).
    assert two == one
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["n_examples"] == 5 and summary["n_samples"] == 5


@pytest.mark.slow
def test_ei_on_two_ranks_samples_every_question_once_and_fine_tunes_on_the_kept_responses(tiny_model_dir, tmp_path):
    answer = " 12 + 30 = 42 </think> <answer>42</answer>"
    prompts = [f"User: What is {a} + {b}? Assistant: <think>" for a, b in ((12, 30), (20, 22), (40, 2))]
    teach = tmp_path / "teach.jsonl"  # first taught to answer 42 to everything (one process)
    teach.write_text("".join(json.dumps({"prompt": p, "response": answer}) + "\n" for p in prompts))
    assert main(sft_flags(tiny_model_dir, teach, tmp_path / "teach", 1, "--batch-size", "3", "--num-epochs", "60",
                          "--max-length", "64")) == 0
    taught = tmp_path / "teach" / "final"
    questions = tmp_path / "questions.jsonl"  # the second reference is 43: its memorised "42" is wrong
    questions.write_text("".join(json.dumps({"prompt": p, "ground_truth": t}) + "\n"
                                 for p, t in zip(prompts, ["42", "43", "42"])))
    flags = ["ei", "--model", str(taught), "--train-data", str(questions), "--val-data", str(questions),
             "--output-dir", str(tmp_path / "run"), "--n-ei-steps", "1", "--questions-per-step", "3",
             "--group-size", "2", "--sampling-min-tokens", "1", "--sampling-max-tokens", "24", "--batch-size", "1",
             "--gradient-accumulation-steps", "1", "--learning-rate", "1e-3", "--max-length", "64",
             "--eval-examples", "3", "--eval-max-new-tokens", "24", "--dtype", "float32", "--device", "cpu",
             "--num-threads", "1", "--no-progress", "--no-write-report"]
    result = launch(["-m", "reasontune", *flags], world_size=2, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "run"
    rollouts = [json.loads(line) for line in (run_dir / "ei-step-1" / "rollouts.jsonl").read_text().splitlines()]
    # 3 questions (2 on rank 0, 1 on rank 1) x 2 samples, gathered in the order of the step's question batch.
    assert len(rollouts) == 6 and [r["index"] for r in rollouts] == [0, 0, 1, 1, 2, 2]
    assert len({r["prompt"] for r in rollouts}) == 3
    correct = [r for r in rollouts if r["category"] == "correct"]
    assert len(correct) >= 2 and all(r["ground_truth"] == "42" for r in correct)
    (line,) = [m for m in train_metrics(run_dir)]
    # Kept responses in microbatches of 1, 2 ranks x 1 accumulation a step.
    assert line["kept"] == len(correct) and line["sft_steps"] == (len(correct) + 1) // 2
    final, before = final_weights(run_dir), load_file(taught / "model.safetensors")
    assert any(not torch.equal(final[name], before[name]) for name in before)
    summary = json.loads((run_dir / "eval" / "step-000001" / "summary.json").read_text())
    assert summary["n_examples"] == 3


def test_grpo_trainer_steps_on_two_ranks_equal_one_process_with_twice_the_accumulation(tmp_path):
    import grpo_trainer_steps  # tests/dist_scripts: world size 1 runs in this process

    grpo_trainer_steps.run(tmp_path)
    result = launch([str(SCRIPTS / "grpo_trainer_steps.py"), str(tmp_path)], world_size=2)
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = load_file(tmp_path / "world-1.safetensors"), load_file(tmp_path / "world-2.safetensors")
    assert one.keys() == two.keys()
    worst = max(float((two[name] - one[name]).norm() / one[name].norm()) for name in one)
    print(f"GRPO trainer steps: world 2 vs 1, worst tensor relative difference {worst:.1e}")
    for name in one:  # SGD: the update is the gradient itself, so fp32 rounding is all that may differ
        assert torch.allclose(two[name], one[name], rtol=1e-6, atol=1e-7), name
    histories = [json.loads((tmp_path / f"world-{n}.json").read_text()) for n in (1, 2)]
    # 3 rollout batches: 2 optimizer steps each off-policy (rollout batch 8, train batch 4), 1 on-policy
    assert {case: len(steps) for case, steps in histories[0].items()} == {
        "grpo_clip-sequence_mean": 6, "grpo_clip-token_mean": 6, "reinforce_with_baseline-sequence_sum": 3}
    for case, steps in histories[0].items():
        for key in ("loss", "grad_norm", "response_tokens", "token_entropy"):
            assert [s[key] for s in histories[1][case]] == pytest.approx([s[key] for s in steps], rel=1e-5), key


# Full fine-tuning by default; LoRA (adapters + trained norms, grpo_clip with a KL penalty against the frozen base) slow.
@pytest.mark.parametrize("lora", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_grpo_world_two_samples_and_trains_as_one_process_with_twice_the_accumulation(tiny_model_dir, tmp_path,
                                                                                     varied_reward, lora):
    from test_grpo import _write_questions

    # The rollouts of a question are seeded by its index in the step's batch (not by the rank drawing it), so both
    # worlds sample the same responses; a reward that differs within every group makes every step move the weights.
    data = _write_questions(tmp_path / "questions.jsonl", 8)
    flags = ["grpo", "--model", str(tiny_model_dir), "--train-data", str(data), "--n-grpo-steps", str(STEPS),
             "--rollout-batch-size", "8", "--group-size", "2", "--train-batch-size", "8", "--learning-rate", "1e-2",
             "--loss-type", "reinforce_with_baseline", "--reward", varied_reward, "--sampling-min-tokens", "2",
             "--sampling-max-tokens", "6", "--grading-workers", "0", "--num-threads", "1", "--no-progress",
             "--no-write-report", "--device", "cpu", "--dtype", "float32"]
    if lora:
        flags += ["--lora-rank", "4", "--lora-trainable-modules", "norm", "--loss-type", "grpo_clip", "--kl-coef", "0.1"]
    assert main([*flags, "--output-dir", str(tmp_path / "one"), "--gradient-accumulation-steps", "2"]) == 0
    result = launch(["-m", "reasontune", *flags, "--output-dir", str(tmp_path / "two"),
                     "--gradient-accumulation-steps", "1"], world_size=2)
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")  # merged, with LoRA
    initial = load_file(tiny_model_dir / "model.safetensors")
    assert max(float((one[name] - initial[name]).abs().max()) for name in one) > 1e-3  # training moved the weights
    if lora:  # the adapter itself too
        one, two = (load_file(tmp_path / run / "final" / "adapter" / "adapter_model.safetensors") for run in ("one", "two"))
    difference = sum(float((two[name] - one[name]).double().square().sum()) for name in one) ** 0.5
    size = sum(float(one[name].double().square().sum()) for name in one) ** 0.5
    print(f"GRPO (LoRA {lora}): world 2 vs 1, relative difference {difference / size:.1e} (whole model)")
    assert difference / size <= 1e-6, f"world 2 differs from world 1 by {difference / size:.2e} (relative)"
    metrics_one, metrics_two = train_metrics(tmp_path / "one"), train_metrics(tmp_path / "two")
    for key in ("reward", "mean_response_tokens"):  # the same responses: the same rewards and lengths
        assert [m[key] for m in metrics_two] == pytest.approx([m[key] for m in metrics_one], rel=1e-9), key


@pytest.mark.slow
def test_grpo_on_two_ranks_trains_evaluates_checkpoints_and_resumes_in_one_process(tiny_model_dir, tmp_path):
    from test_grpo import _write_questions

    data = _write_questions(tmp_path / "questions.jsonl", 8)
    # Off-policy grpo_clip with a KL penalty: rollout batches of 4 questions x 2 responses, train batches of 4
    # rollouts = 2 ranks x 1 microbatch of 2, two epochs.
    flags = ["grpo", "--model", str(tiny_model_dir), "--train-data", str(data), "--val-data", str(data),
             "--output-dir", str(tmp_path / "run"), "--n-grpo-steps", "2", "--rollout-batch-size", "8",
             "--group-size", "2", "--train-batch-size", "4", "--epochs-per-rollout-batch", "2",
             "--loss-type", "grpo_clip", "--kl-coef", "0.1", "--learning-rate", "1e-3", "--sampling-min-tokens", "1",
             "--sampling-max-tokens", "5", "--eval-every", "1", "--eval-examples", "3", "--eval-max-new-tokens", "5",
             "--save-every", "1", "--grading-workers", "0", "--num-threads", "1", "--no-progress", "--no-write-report",
             "--device", "cpu", "--dtype", "float32"]
    result = launch(["-m", "reasontune", *flags, "--gradient-accumulation-steps", "1"], world_size=2, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "run"
    train = train_metrics(run_dir)
    assert [line["step"] for line in train] == [1, 2]
    for line in train:
        assert line["optimizer_steps"] == 4  # 2 train batches x 2 epochs
        assert line["reward"] is not None and line["kl"] is not None and line["mean_response_tokens"] >= 1
    assert json.loads((run_dir / "config.json").read_text())["distributed"]["microbatch_per_rank"] == 2
    for step in (0, 1, 2):
        assert json.loads((run_dir / "eval" / f"step-{step:06d}" / "summary.json").read_text())["n_examples"] == 3
    # Resume step 2 from the world-2 checkpoint-1 in one process with accumulation 2 (the same global batch).
    shutil.rmtree(run_dir / "final")
    assert main([*flags, "--gradient-accumulation-steps", "2", "--resume"]) == 0
    assert [line["step"] for line in train_metrics(run_dir)] == [1, 2]
    assert (run_dir / "final" / "model.safetensors").exists()


@pytest.mark.slow
def test_sigterm_to_a_torchrun_job_saves_on_every_rank_and_the_run_resumes(tiny_model_dir, tmp_path):
    import os
    import signal
    import subprocess

    data = write_uneven_sft_data(tmp_path / "train.jsonl", 40)
    flags = sft_flags(tiny_model_dir, data, tmp_path / "run", 1, "--batch-size", "1", "--num-epochs", "30")
    environment = {**os.environ, "OMP_NUM_THREADS": "1",
                   "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
               "-m", "reasontune", *flags]
    # As SLURM's scancel or a Ctrl-C does: the signal reaches the agent and both ranks (torchrun forwards it again).
    process = subprocess.Popen(command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and '"kind": "train"' in metrics.read_text()):
        assert process.poll() is None and time.monotonic() < deadline, "no training step before the signal"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGTERM)
    try:
        _, stderr = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        pytest.fail("the job did not stop within 120 s of SIGTERM")
    assert stderr.count("stopped by SIGTERM after step") == 1, stderr[-3000:]  # rank 0 says it, once
    (checkpoint,) = sorted((tmp_path / "run").glob("checkpoint-*"))
    assert (checkpoint / "sharded" / ".metadata").exists() and not (tmp_path / "run" / "final").exists()
    stopped_at = int(checkpoint.name.removeprefix("checkpoint-"))
    # Resume in one process with accumulation 2 (the same global batch) to the end of a shorter plan.
    assert main(sft_flags(tiny_model_dir, data, tmp_path / "run", 2, "--batch-size", "1", "--num-epochs", "30",
                          "--resume", "--max-steps", str(stopped_at + 2))) == 0
    assert [m["step"] for m in train_metrics(tmp_path / "run")] == list(range(1, stopped_at + 3))
