"""The scale-out flags on CPU: vLLM parallel sizes, the vllm serve mode and its weight sync, the FSDP flags.

What is checked: each bad combination is refused before anything starts, naming the flag and
what to do instead (through ``config.value_problems`` and through the real command line); what runs
under torchrun (a server; one in-process engine per rank) passes ``refuse_what_torchrun_cannot_run``;
the FSDP flags reach ``distributed.shard_model`` from a real ``setup_sft``; a vLLM backend gets no
unsharded replica.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from reasontune import distributed
from reasontune.cli import main
from reasontune.distributed import DistributedContext
from reasontune.evaluation import EvalConfig
from reasontune.config import value_problems
from reasontune.options import ShardingOptions, environment_problems, server_url_problems
from reasontune.training.data_parallel import refuse_what_torchrun_cannot_run, unsharded_replica
from reasontune.training.grpo import GRPOConfig
from reasontune.training.sft import SFTConfig, setup_sft

HAS_VLLM = importlib.util.find_spec("vllm") is not None


def problems_of(config, world_size: int = 1, monkeypatch=None) -> str:
    if monkeypatch is not None:
        monkeypatch.setenv("WORLD_SIZE", str(world_size))
    return "\n".join(value_problems(config))


def grpo(**values) -> GRPOConfig:
    return GRPOConfig(train_data="train.jsonl", **values)


@pytest.mark.parametrize(("values", "expected"), [
    ({"vllm_tensor_parallel_size": 0, "backend": "vllm"}, "--vllm-tensor-parallel-size: must be >= 1, got 0"),
    ({"vllm_tensor_parallel_size": 2}, "--vllm-tensor-parallel-size given with --backend hf: add --backend vllm"),
    ({"vllm_server_url": "http://h:8000"}, "--vllm-server-url given with --backend hf"),
    ({"backend": "vllm", "vllm_data_parallel_size": 2},
     "vLLM's LLM cannot run data-parallel engines in one process; launch with torchrun --nproc_per_node 2"),
    ({"backend": "vllm", "vllm_weight_sync": "nccl"}, "--vllm-weight-sync given without --vllm-server-url"),
    ({"backend": "vllm", "vllm_weight_sync_port": 29500}, "--vllm-weight-sync-port given without --vllm-server-url"),
    ({"backend": "vllm", "vllm_device": "cuda:1", "vllm_tensor_parallel_size": 2},
     "one device cannot hold a tensor-parallel engine"),
    ({"backend": "vllm", "vllm_server_url": "gpu-node:8000"}, "give http://HOST:PORT of the vllm serve server"),
    ({"backend": "vllm", "vllm_server_url": "http://h:8000/generate"}, "without a path"),
    ({"backend": "vllm", "vllm_server_url": "http://h:99999"}, "--vllm-server-url http://h:99999: Port out of range"),
    ({"backend": "vllm", "vllm_server_url": "http://h:8000", "vllm_tensor_parallel_size": 4},
     "--vllm-tensor-parallel-size with --vllm-server-url: the server owns its GPUs"),
    ({"backend": "vllm", "vllm_server_url": "http://h:8000", "vllm_device": "cuda:1"},
     "--vllm-device with --vllm-server-url"),
    ({"backend": "vllm", "vllm_server_url": "http://h:8000", "vllm_weight_sync": "none"},
     "--vllm-weight-sync none: a trainer's rollouts must come from the policy being trained"),
    ({"backend": "vllm", "vllm_server_url": "http://h:8000", "vllm_weight_sync_port": 70000},
     "--vllm-weight-sync-port: must be >= 0 and <= 65535"),
    ({"fsdp_cpu_offload": True, "device": "cpu"}, "--fsdp-cpu-offload with --device cpu"),
    ({"backend": "vllm", "vllm_server_url": "http://h:8000", "vllm_timeout": 0.0}, "--vllm-timeout: must be > 0, got 0"),
    ({"backend": "vllm", "vllm_server_url": "http://h:8000", "vllm_timeout": float("inf")}, "--vllm-timeout: must be > 0"),
    ({"backend": "vllm", "vllm_timeout": 30.0}, "--vllm-timeout given without --vllm-server-url"),
    ({"process_group_timeout": -1.0}, "--process-group-timeout: must be > 0, got -1"),
])
def test_each_bad_combination_names_its_flag(values, expected):
    assert expected in problems_of(grpo(**values))


def test_good_combinations_pass():
    assert problems_of(grpo(backend="vllm", vllm_tensor_parallel_size=2)) == ""
    assert problems_of(grpo(backend="vllm", vllm_server_url="http://gpu-node:8000/v1/", vllm_weight_sync_port=29600,
                            vllm_weight_sync_address="10.0.0.5")) == ""
    assert problems_of(grpo(fsdp_mixed_precision=True, fsdp_cpu_offload=True, device="cuda")) == ""
    assert server_url_problems("https://[::1]:8443") == []


def test_eval_samples_from_a_server_without_pushing_weights():
    base = {"data": "d.jsonl", "output_dir": "out", "backend": "vllm", "vllm_server_url": "http://h:8000"}
    assert problems_of(EvalConfig(**base)) == ""
    assert EvalConfig(**base).weight_sync_mode(trainer=False) == "none"
    assert "eval has no policy to push" in problems_of(EvalConfig(**base, vllm_weight_sync="nccl"))
    # Plain HTTP: no vllm package needed on this side; a trainer's NCCL push needs it.
    assert not any("vllm package" in p for p in environment_problems(EvalConfig(**base, model="/nonexistent")))
    trainer_problems = environment_problems(grpo(backend="vllm", vllm_server_url="http://h:8000"))
    assert any("needs the vllm package" in p for p in trainer_problems) != HAS_VLLM


def test_what_torchrun_runs_and_what_it_refuses(monkeypatch):
    ctx = DistributedContext(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"), backend="gloo")
    refuse_what_torchrun_cannot_run(grpo(backend="vllm", vllm_server_url="http://h:8000"), ctx)  # a server: runs
    refuse_what_torchrun_cannot_run(grpo(backend="vllm"), ctx)  # one engine per rank: runs
    refuse_what_torchrun_cannot_run(grpo(backend="vllm", vllm_data_parallel_size=2), ctx)  # = the world size
    for values, expected in [
        ({"vllm_tensor_parallel_size": 2}, "each rank samples its own questions with its own engine"),
        ({"vllm_device": "cuda:7"}, "each rank's engine shares the rank's own GPU"),
        ({"vllm_data_parallel_size": 4}, "each of the 2 ranks runs its own engine, so the data-parallel size is 2"),
    ]:
        with pytest.raises(SystemExit, match=expected):
            refuse_what_torchrun_cannot_run(grpo(backend="vllm", **values), ctx)
    overlapping, overlapping_hf = grpo(backend="vllm", vllm_server_url="http://h:8000"), grpo()
    overlapping.async_steps = overlapping_hf.async_steps = 1  # GRPO's --async-steps (set as an attribute: any config)
    with pytest.raises(SystemExit, match="--async-steps with --backend vllm under torchrun"):
        refuse_what_torchrun_cannot_run(overlapping, ctx)
    refuse_what_torchrun_cannot_run(overlapping_hf, ctx)  # the HF backend's replica: not a vLLM matter
    refuse_what_torchrun_cannot_run(grpo(lora_rank=4), ctx)  # LoRA: FSDP2 shards the PEFT model
    # The same rules in validation, from torchrun's WORLD_SIZE, before any process group starts.
    assert "each rank samples its own questions" in problems_of(grpo(backend="vllm", vllm_tensor_parallel_size=2),
                                                               world_size=2, monkeypatch=monkeypatch)
    assert problems_of(grpo(backend="vllm", vllm_data_parallel_size=2), world_size=2, monkeypatch=monkeypatch) == ""


def test_vllm_backends_get_no_unsharded_replica(tiny_qwen2):
    two = DistributedContext(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"), backend="gloo")
    one = DistributedContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend=None)
    assert unsharded_replica(tiny_qwen2, grpo(backend="vllm"), two) is None
    assert unsharded_replica(tiny_qwen2, grpo(backend="vllm", vllm_server_url="http://h:8000"), two) is None
    assert unsharded_replica(tiny_qwen2, grpo(), one) is None
    assert unsharded_replica(tiny_qwen2, grpo(), two, needed=False) is None
    replica = unsharded_replica(tiny_qwen2, grpo(), two)
    assert replica is not None and replica.model is not tiny_qwen2


def test_fsdp_flags_need_torchrun_and_offload_needs_cuda(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    problems = "\n".join(environment_problems(grpo(fsdp_mixed_precision=True, model="/nonexistent")))
    assert "--fsdp-mixed-precision: FSDP2 shards the model only under torchrun" in problems
    monkeypatch.setenv("WORLD_SIZE", "2")
    problems = "\n".join(environment_problems(grpo(fsdp_mixed_precision=True, fsdp_cpu_offload=True,
                                                   model="/nonexistent")))
    assert "only under torchrun" not in problems
    assert ("--fsdp-cpu-offload: CUDA is not available here" in problems) != torch.cuda.is_available()


def test_fsdp_flags_reach_shard_model_from_setup_sft(tiny_model_dir, tmp_path, monkeypatch):
    seen = []

    def spy(model, ctx, **options):
        seen.append(options)
        return model

    monkeypatch.setattr(distributed, "shard_model", spy)
    # One CPU process here: the launch checks of the flags (tested above) would stop setup before it shards.
    monkeypatch.setattr(ShardingOptions, "machine_problems", lambda self: [])
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i} + 1 =", "response": f" {i + 1}"}) + "\n" for i in range(4)))
    for mixed, offload in [(True, False), (False, True), (False, False)]:
        config = SFTConfig(model=str(tiny_model_dir), train_data=str(data), output_dir=str(tmp_path / f"run{mixed}{offload}"),
                           eval_examples=0, eval_before_training=False, num_threads=1, progress=False,
                           write_report=False, fsdp_mixed_precision=mixed, fsdp_cpu_offload=offload)
        session = setup_sft(config)
        if getattr(session, "generator", None) is not None:
            session.generator.close()
    assert seen == [{"mixed_precision": True, "cpu_offload": False}, {"mixed_precision": False, "cpu_offload": True},
                    {"mixed_precision": False, "cpu_offload": False}]


def test_command_line_refuses_scale_out_flags_before_writing(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    data = tmp_path / "q.jsonl"
    data.write_text(json.dumps({"question": "1 + 1?", "answer": "2"}) + "\n")
    out = tmp_path / "run"
    code = main(["grpo", "--model", str(tiny_model_dir), "--train-data", str(data), "--output-dir", str(out),
                 "--backend", "vllm", "--vllm-server-url", "http://gpu-node:8000", "--vllm-tensor-parallel-size", "2",
                 "--fsdp-cpu-offload"])
    err = capsys.readouterr().err
    assert code == 2 and not Path(out).exists()
    assert "--vllm-tensor-parallel-size with --vllm-server-url" in err
    assert "--fsdp-cpu-offload: FSDP2 shards the model only under torchrun" in err


@pytest.mark.slow
def test_fsdp_mixed_precision_through_torchrun_computes_in_bfloat16_and_keeps_float32_weights(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file
    from test_distributed import launch
    from test_distributed_cli import final_weights, sft_flags, write_uneven_sft_data

    data = write_uneven_sft_data(tmp_path / "train.jsonl", 12)
    for name, extra in (("fp32", []), ("mixed", ["--fsdp-mixed-precision"])):
        result = launch(["-m", "reasontune", *sft_flags(tiny_model_dir, data, tmp_path / name, 1, *extra)],
                        world_size=2, timeout=240)
        assert result.returncode == 0, result.stderr[-3000:]
    fp32, mixed = final_weights(tmp_path / "fp32"), final_weights(tmp_path / "mixed")
    initial = load_file(tiny_model_dir / "model.safetensors")
    assert all(tensor.dtype == torch.float32 for tensor in mixed.values())  # master weights stay in --dtype
    difference = sum(float((mixed[k] - fp32[k]).double().square().sum()) for k in fp32) ** 0.5
    moved = sum(float((fp32[k] - initial[k]).double().square().sum()) for k in fp32) ** 0.5
    # bf16 compute (8 mantissa bits) changes the gradients far beyond fp32 reordering (world-size invariance holds
    # to 1e-6 of the weights, tests/test_distributed_cli.py), yet it trains the same way: a small part of the step.
    size = sum(float(fp32[k].double().square().sum()) for k in fp32) ** 0.5
    print(f"--fsdp-mixed-precision vs fp32 at world 2: {difference / size:.1e} of the weights, "
          f"{difference / moved:.1e} of the training move")
    assert difference / size > 1e-6, "--fsdp-mixed-precision changed nothing: the flag did not reach FSDP2"
    assert difference < 0.5 * moved, f"mixed precision trained elsewhere: {difference:.3g} vs a move of {moved:.3g}"
