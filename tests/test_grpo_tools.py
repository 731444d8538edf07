"""GRPO and expert iteration on tool trajectories (``--env python``): a real tiny policy calling the real sandbox.

The policy (``tests/tool_policy.py``) writes ``<python>print(A*B)</python>`` calls, so every run
here holds environment turns. What is checked: inside the trainer's own step no environment
token's log-prob carries gradient and the response mask is exactly the model's tokens; a run
logs its tool use and resumes bit for bit (also with ``--async-steps 1``, whose pending rollouts
are tool trajectories); LoRA trains; two torchrun ranks train the weights of one process on the
same global batch; EI keeps one SFT record per model turn; and the default ``--env math`` is
the single-turn trainer, weight for weight.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_distributed import launch
from tool_policy import write_tool_questions

from reasontune.cli import main
from reasontune.config import check_config, load_config
from reasontune.environments.sandbox import SandboxLimits, SandboxUnavailable, run_python
from reasontune.training.expert_iteration import ExpertIterationConfig
from reasontune.training.grpo import setup_grpo, train_step
from reasontune.training.grpo_config import GRPOConfig
from reasontune.training.grpo_rollouts import prepare_step
from reasontune.training.policy_sampling import TOOL_METRICS


@pytest.fixture(scope="module", autouse=True)
def sandbox_available():
    try:
        run_python("pass", SandboxLimits(wall_seconds=8.0, cpu_seconds=4))
    except SandboxUnavailable as error:
        pytest.skip(f"no namespaces on this machine: {error}")


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    weights = {}
    for path in sorted((run_dir / "final").glob("model*.safetensors")):
        weights.update(load_file(path))
    return weights


def train_lines(run_dir: Path) -> list[dict]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [line for line in lines if line["kind"] == "train"]


def grpo_flags(model_dir: Path, data: Path, output_dir: Path, reward: str, *extra: str) -> list[str]:
    """Two steps of 4 questions x 4 responses, one optimizer step of 2 microbatches each, with the python tool."""
    return ["grpo", "--model", str(model_dir), "--train-data", str(data), "--output-dir", str(output_dir),
            "--env", "python", "--max-tool-calls", "2", "--tool-timeout", "5", "--n-grpo-steps", "2",
            "--rollout-batch-size", "16", "--group-size", "4", "--train-batch-size", "16",
            "--gradient-accumulation-steps", "2", "--learning-rate", "1e-3", "--reward", reward,
            "--sampling-min-tokens", "1", "--sampling-max-tokens", "40", "--grading-workers", "0", "--num-threads", "1",
            "--no-progress", "--no-write-report", "--device", "cpu", "--dtype", "float32", *extra]


def test_tool_options_are_checked_like_every_option():
    good = dict(train_data="q.jsonl", env="python", rollout_batch_size=4, group_size=2, train_batch_size=4,
                gradient_accumulation_steps=1)
    check_config(GRPOConfig(**good), environment=False)
    with pytest.raises(SystemExit) as refused:
        check_config(GRPOConfig(**{**good, "max_tool_calls": 0, "tool_timeout": -1.0}), environment=False)
    assert "--max-tool-calls: must be >= 1, got 0" in str(refused.value)
    assert "--tool-timeout: must be > 0, got -1" in str(refused.value)
    with pytest.raises(SystemExit) as refused:
        check_config(ExpertIterationConfig(train_data="q.jsonl", env="python", tool_output_bytes=0), environment=False)
    assert "--tool-output-bytes: must be >= 1, got 0" in str(refused.value)
    # math ignores the tool bounds; an unknown environment is refused by the parser, naming the choices
    check_config(GRPOConfig(**{**good, "env": "math", "max_tool_calls": 0}), environment=False)
    with pytest.raises(SystemExit):
        main(["grpo", "--train-data", "q.jsonl", "--env", "ruby"])


@pytest.mark.slow
def test_no_environment_token_carries_gradient_in_the_trainers_step(tool_policy_dir, tool_reward, tmp_path):
    """GRPO's own rollouts and step (grpo_clip, a KL penalty, token TIS): the hidden state each label is predicted from
    gets gradient exactly at the model's tokens, never at an environment token, a prompt token or padding."""
    data = write_tool_questions(tmp_path / "questions.jsonl", 8)
    config = GRPOConfig(model=str(tool_policy_dir), train_data=str(data), output_dir=str(tmp_path / "run"),
                        env="python", max_tool_calls=2, tool_timeout=5.0, n_grpo_steps=1, rollout_batch_size=16,
                        group_size=4, train_batch_size=16, gradient_accumulation_steps=2, loss_type="grpo_clip",
                        kl_coef=0.1, rollout_correction="token_tis", reward=tool_reward, sampling_min_tokens=1,
                        sampling_max_tokens=40, grading_workers=0, num_threads=1, progress=False, write_report=False,
                        device="cpu", dtype="float32")
    session = setup_grpo(config)
    batch = prepare_step(session, 1, 0)
    [microbatches] = batch.train_batches
    assert batch.metrics["nonzero_advantage_fraction"] > 0 and batch.metrics["tool_calls"] > 0
    trajectories = [t for group in batch.rollouts.trajectories for t in group]
    rows = [(mb, i) for mb in microbatches for i in range(len(mb["input_ids"]))]
    assert len(rows) == len(trajectories) == 16
    tokenizer, environment_tokens = session.tokenizer, 0
    for (mb, i), trajectory in zip(rows, trajectories):
        # Row i: the prompt, then every turn's tokens in order (the model's as sampled, the environment's from its
        # text); the labels are those shifted by one, the mask True exactly over the model's.
        start = len(tokenizer(trajectory.prompt)["input_ids"]) - 1
        ids, trained = [], []
        for turn in trajectory.turns:
            turn_ids = (turn.token_ids if turn.role == "model"
                        else tokenizer(turn.text, add_special_tokens=False)["input_ids"])
            ids += turn_ids
            trained += [turn.role == "model"] * len(turn_ids)
        environment_tokens += trained.count(False)
        assert mb["labels"][i, start:start + len(ids)].tolist() == ids
        expected_mask = torch.zeros_like(mb["response_mask"][i])
        expected_mask[start:start + len(ids)] = torch.tensor(trained)
        assert torch.equal(mb["response_mask"][i], expected_mask)
        assert torch.equal(mb["old_log_probs" if "old_log_probs" in mb else "ref_log_probs"][i][~expected_mask],
                           torch.zeros(int((~expected_mask).sum())))
    assert environment_tokens > 100  # the tool ran in most trajectories: its output is in the batch

    grads = []

    def keep_gradient(module, inputs, output) -> None:  # the final norm's output: what the logits are computed from
        output.register_hook(lambda grad: grads.append(grad.detach().clone()))

    hook = session.model.model.norm.register_forward_hook(keep_gradient)
    try:
        metrics = train_step(session.model, microbatches, config, session.device)
    finally:
        hook.remove()
    assert len(grads) == len(microbatches) and metrics["response_tokens"] == sum(
        int(mb["response_mask"].sum()) for mb in microbatches)
    for mb, grad in zip(microbatches, grads):
        per_position = grad.abs().sum(-1)  # (micro, L - 1): position t predicts label t
        mask = mb["response_mask"]
        assert torch.all(per_position[~mask] == 0)  # environment, prompt and padding: exactly no gradient
        moving = mb["advantages"].abs() > 1e-6
        assert torch.all(per_position[mask & moving[:, None]] > 0)  # every model token of a row with a signal
    session.generator.close()


@pytest.mark.slow
def test_grpo_env_python_logs_tool_use_and_resumes_bit_for_bit(tool_policy_dir, tool_reward, tmp_path):
    data = write_tool_questions(tmp_path / "questions.jsonl", 8)
    run_dir = tmp_path / "run"
    assert main(grpo_flags(tool_policy_dir, data, run_dir, tool_reward, "--save-every", "1", "--val-data", str(data),
                           "--eval-examples", "3", "--eval-every", "1", "--eval-max-new-tokens", "24")) == 0
    saved = json.loads((run_dir / "config.json").read_text())
    assert (saved["env"], saved["max_tool_calls"], saved["tool_timeout"]) == ("python", 2, 5.0)
    assert load_config(run_dir / "config.json", GRPOConfig).env == "python"
    lines = train_lines(run_dir)
    for line in lines:
        assert set(TOOL_METRICS) <= set(line)
        assert line["tool_calls"] == pytest.approx(16 * line["mean_tool_calls"]) and line["tool_calls"] >= 8
        assert 0 < line["tool_call_rate"] <= 1 and 0 <= line["tool_error_rate"] <= 1
        assert line["mean_response_tokens"] <= 40  # model tokens of all turns, within --sampling-max-tokens
    # In-loop evaluation runs with the tool too: every held-out record has its turns, the eval line the tool rates.
    evaluation = json.loads((run_dir / "eval" / "step-000001" / "summary.json").read_text())
    records = [json.loads(line) for line in (run_dir / "eval" / "step-000001" / "records.jsonl").open()]
    assert evaluation["tool_calls"] == sum(r["tool_calls"] for r in records) > 0 and all(r["turns"] for r in records)
    evals = [line for line in map(json.loads, (run_dir / "metrics.jsonl").open()) if line["kind"] == "eval"]
    assert [e["step"] for e in evals] == [0, 1, 2] and all("tool_call_rate" in e for e in evals)
    initial = load_file(tool_policy_dir / "model.safetensors")
    uninterrupted = final_weights(run_dir)
    assert max(float((uninterrupted[k] - initial[k]).abs().max()) for k in initial) > 1e-4
    # Resume step 2 from checkpoint-1, the options read back from config.json (the reward confirmed, as always).
    shutil.rmtree(run_dir / "final")
    assert main(["grpo", "--resume", "--output-dir", str(run_dir), "--reward", tool_reward]) == 0
    resumed = final_weights(run_dir)
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)
    assert train_lines(run_dir)[-1]["tool_calls"] == lines[-1]["tool_calls"]


@pytest.mark.slow
def test_grpo_env_python_async_steps_resumes_its_pending_tool_rollouts(tool_policy_dir, tool_reward, tmp_path):
    """``--async-steps 1``: step k trains on rollouts of the weights after step k - 2; a checkpoint holds the pending
    batch (tool trajectories' microbatches) and a resume from it ends with the uninterrupted run's weights."""
    data = write_tool_questions(tmp_path / "questions.jsonl", 8)
    run_dir = tmp_path / "run"
    flags = grpo_flags(tool_policy_dir, data, run_dir, tool_reward, "--async-steps", "1", "--loss-type", "grpo_clip",
                       "--n-grpo-steps", "3", "--save-every", "1")
    assert main(flags) == 0
    lines = train_lines(run_dir)
    assert [line["staleness"] for line in lines] == [0, 1, 1]
    assert all(line["tool_calls"] > 0 for line in lines)
    uninterrupted = final_weights(run_dir)
    shutil.rmtree(run_dir / "final")
    shutil.rmtree(run_dir / "checkpoint-2")
    assert main(["grpo", "--resume", "--output-dir", str(run_dir), "--reward", tool_reward]) == 0
    resumed = final_weights(run_dir)
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)


@pytest.mark.slow
def test_grpo_env_python_with_lora_trains_the_adapter(tool_policy_dir, tool_reward, tmp_path):
    pytest.importorskip("peft")
    data = write_tool_questions(tmp_path / "questions.jsonl", 8)
    run_dir = tmp_path / "run"
    assert main(grpo_flags(tool_policy_dir, data, run_dir, tool_reward, "--lora-rank", "4", "--lora-trainable-modules",
                           "norm", "--loss-type", "grpo_clip", "--learning-rate", "1e-2")) == 0
    adapter = load_file(run_dir / "final" / "adapter" / "adapter_model.safetensors")
    lora_b = [tensor for name, tensor in adapter.items() if "lora_B" in name]
    assert lora_b and max(float(t.abs().max()) for t in lora_b) > 0  # B starts at 0: the tool rollouts moved it
    assert all(line["tool_calls"] > 0 for line in train_lines(run_dir))


@pytest.mark.slow
def test_grpo_env_python_on_two_ranks_trains_as_one_process_with_twice_the_accumulation(tool_policy_dir, tool_reward,
                                                                                      tmp_path):
    """Each rank samples its half of the questions (tool calls in its own sandboxes); the trajectories are gathered and
    the step's microbatches dealt out: the same rollouts, so the same weights as one process."""
    data = write_tool_questions(tmp_path / "questions.jsonl", 8)
    flags = grpo_flags(tool_policy_dir, data, tmp_path / "one", tool_reward, "--gradient-accumulation-steps", "2")
    assert main(flags) == 0
    flags = grpo_flags(tool_policy_dir, data, tmp_path / "two", tool_reward, "--gradient-accumulation-steps", "1")
    result = launch(["-m", "reasontune", *flags], world_size=2)
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    initial = load_file(tool_policy_dir / "model.safetensors")
    assert max(float((one[k] - initial[k]).abs().max()) for k in one) > 1e-4
    difference = sum(float((two[k] - one[k]).double().square().sum()) for k in one) ** 0.5
    size = sum(float(one[k].double().square().sum()) for k in one) ** 0.5
    assert difference / size <= 1e-6, f"world 2 differs from world 1 by {difference / size:.2e} (relative)"
    for key in ("reward", "mean_response_tokens", "tool_calls", "tool_error_rate", "tool_call_rate"):
        assert [m[key] for m in train_lines(tmp_path / "two")] == [m[key] for m in train_lines(tmp_path / "one")], key


@pytest.mark.slow
def test_ei_env_python_fine_tunes_on_each_model_turn_of_the_kept_trajectories(tool_policy_dir, tool_reward, tmp_path):
    data = write_tool_questions(tmp_path / "questions.jsonl", 8)
    run_dir = tmp_path / "run"
    assert main(["ei", "--model", str(tool_policy_dir), "--train-data", str(data), "--output-dir", str(run_dir),
                 "--env", "python", "--max-tool-calls", "2", "--tool-timeout", "5", "--n-ei-steps", "1",
                 "--questions-per-step", "4", "--group-size", "2", "--reward", tool_reward,
                 "--sampling-min-tokens", "1", "--sampling-max-tokens", "40", "--batch-size", "2",
                 "--gradient-accumulation-steps", "1", "--learning-rate", "1e-3", "--grading-workers", "0",
                 "--num-threads", "1", "--no-progress", "--no-write-report", "--eval-examples", "0", "--device", "cpu",
                 "--dtype", "float32"]) == 0
    records = [json.loads(line) for line in (run_dir / "ei-step-1" / "rollouts.jsonl").read_text().splitlines()]
    assert len(records) == 8 and all(r["turns"] and "tool_calls" in r for r in records)
    kept_turns = sum(sum(turn["role"] == "model" for turn in r["turns"]) for r in records if r["answer_reward"] == 1)
    [line] = train_lines(run_dir)
    assert line["kept"] == kept_turns > 0 and line["sft_steps"] >= 1
    assert line["tool_calls"] == sum(r["tool_calls"] for r in records) > 0
    assert json.loads((run_dir / "config.json").read_text())["env"] == "python"


def test_default_env_math_is_the_single_turn_trainer(tiny_model_dir, tmp_path, varied_reward):
    """``--env math`` (the default) takes today's path: the same weights as a run without the flag, bit for bit."""
    data = tmp_path / "questions.jsonl"
    data.write_text("".join(json.dumps({"question": f"What is 12 + {i}?", "answer": str(12 + i)}) + "\n"
                            for i in range(4)))
    flags = ["grpo", "--model", str(tiny_model_dir), "--train-data", str(data), "--n-grpo-steps", "2",
             "--rollout-batch-size", "4", "--group-size", "2", "--train-batch-size", "4", "--learning-rate", "1e-2",
             "--gradient-accumulation-steps", "2", "--reward", varied_reward, "--sampling-min-tokens", "2",
             "--sampling-max-tokens", "6", "--grading-workers", "0", "--num-threads", "1", "--no-progress",
             "--no-write-report", "--device", "cpu", "--dtype", "float32"]
    assert main([*flags, "--output-dir", str(tmp_path / "plain")]) == 0
    assert main([*flags, "--output-dir", str(tmp_path / "math"), "--env", "math"]) == 0
    plain, math = final_weights(tmp_path / "plain"), final_weights(tmp_path / "math")
    initial = load_file(tiny_model_dir / "model.safetensors")
    assert max(float((plain[k] - initial[k]).abs().max()) for k in plain) > 1e-4
    assert all(torch.equal(plain[k], math[k]) for k in plain)
    assert not any(key in line for line in train_lines(tmp_path / "math") for key in TOOL_METRICS)


@pytest.mark.slow
def test_a_trajectory_samples_the_same_turns_whichever_slice_of_the_prompts_continues_it(tool_policy_dir):
    """The driver seeds each continuation by the trajectory's index in the whole batch: the prompts in one call, or cut
    in two slices (as two ranks hold them, ``first_prompt_index`` marking the second), give the same trajectories."""
    from reasontune.environments import build_environment
    from reasontune.environments.driver import generate_trajectories
    from reasontune.generation import SamplingOptions
    from reasontune.generation.hf import HFGenerator
    from reasontune.modeling import load_model, load_tokenizer

    torch.set_num_threads(1)
    generator = HFGenerator(load_model(str(tool_policy_dir)), load_tokenizer(str(tool_policy_dir)), batch_size=16)
    prompts = [json.loads(line)["prompt"] for line in write_tool_questions(Path(tool_policy_dir).parent / "q.jsonl", 6)
               .read_text().splitlines()]
    sampling = SamplingOptions(temperature=1.0, max_new_tokens=40, n=3, seed=11, return_logprobs=True)
    environment = build_environment("python", max_tool_calls=2, tool_timeout=5.0)

    def turns(groups):
        return [[(turn.role, turn.text, turn.token_ids) for turn in t.turns] for group in groups for t in group]

    whole = generate_trajectories(generator, prompts, sampling, environment, max_response_tokens=40)
    halves = (generate_trajectories(generator, prompts[:2], sampling, environment, max_response_tokens=40)
              + generate_trajectories(generator, prompts[2:], sampling.replace(first_prompt_index=2), environment,
                                      max_response_tokens=40))
    assert sum(len(t.tool_turns) for group in whole for t in group) >= 9  # continuations were sampled
    assert turns(halves) == turns(whole)
