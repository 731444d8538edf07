"""Data parallelism: rank slices, world-size invariance of training, sharded checkpoints across world sizes, failure handling.

The multi-process tests launch ``torchrun --nproc_per_node 2`` (gloo on CPU) on the scripts in
tests/dist_scripts/ and compare with the same scripts under plain python (world size 1). Three
launches serve every invariance and checkpoint test (module fixture); one more tests failures.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from reasontune import checkpoint, distributed, run_layout

SCRIPTS = Path(__file__).parent / "dist_scripts"
REPOSITORY = Path(__file__).resolve().parents[1]


# A rank of a torchrun run on this CPU has twice died by a signal in CI (SIGSEGV once, SIGABRT
# "terminate called without an active exception" once), in different tests, never reproduced in
# a dozen isolated runs. Until it is found, a run that crashed that way (and never a wrong result
# or an ordinary error) is launched once more from a fresh output directory, with a warning.
CRASH = re.compile(r"Signal (11|6) \((SIGSEGV|SIGABRT)\)")


def launch(arguments: list[str], world_size: int, timeout: float = 300) -> subprocess.CompletedProcess:
    """Runs a dist_scripts script under plain python (world size 1) or torchrun, with this checkout importable."""
    output = Path(arguments[arguments.index("--output-dir") + 1]) if "--output-dir" in arguments else None
    fresh = output is not None and not output.exists()
    result = _launch_once(arguments, world_size, timeout)
    if world_size > 1 and result.returncode != 0 and CRASH.search(result.stderr) and fresh:
        warnings.warn(f"a torchrun rank died by a signal; launched once more:\n{result.stderr[-1500:]}")
        shutil.rmtree(output, ignore_errors=True)
        result = _launch_once(arguments, world_size, timeout)
    return result


def _launch_once(arguments: list[str], world_size: int, timeout: float) -> subprocess.CompletedProcess:
    environment = {**os.environ, "OMP_NUM_THREADS": "1",
                   "PYTHONPATH": os.pathsep.join([str(REPOSITORY), os.environ.get("PYTHONPATH", "")])}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        environment.pop(name, None)
    if world_size == 1:
        command = [sys.executable, *arguments]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world_size),
                   "--standalone", *arguments]
    process = subprocess.Popen(command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # torchrun's workers too, not only the agent
        stdout, stderr = process.communicate()
        pytest.fail(f"{' '.join(command)} ran past {timeout} s:\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def single(ctx_rank: int, world_size: int) -> distributed.DistributedContext:
    return distributed.DistributedContext(rank=ctx_rank, world_size=world_size, local_rank=ctx_rank,
                                          device=torch.device("cpu"), backend="gloo")


# ---------------------------------------------------------------------------------------------
# Pure pieces


@pytest.mark.parametrize("n_items, group_size, world_size", [(8, 1, 2), (12, 4, 2), (10, 2, 3), (6, 3, 4), (7, 1, 1)])
def test_rank_slices_are_disjoint_cover_everything_and_never_split_a_group(n_items, group_size, world_size):
    taken = []
    for rank in range(world_size):
        part = range(n_items)[distributed.rank_slice(n_items, single(rank, world_size), group_size)]
        assert part.start % group_size == 0 and len(part) % group_size == 0
        taken += list(part)
    assert taken == list(range(n_items))  # disjoint, in order, nothing dropped
    sizes = [len(range(n_items)[distributed.rank_slice(n_items, single(r, world_size), group_size)]) // group_size
             for r in range(world_size)]
    assert max(sizes) - min(sizes) <= 1  # groups dealt out evenly


def test_rank_slice_refuses_items_that_do_not_form_whole_groups():
    with pytest.raises(ValueError, match="groups of 4"):
        distributed.rank_slice(10, single(0, 2), group_size=4)


def test_plain_process_is_world_size_one_without_a_process_group(monkeypatch, tiny_qwen2):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    ctx = distributed.init_distributed("cpu")
    assert (ctx.rank, ctx.world_size, ctx.is_main, ctx.backend) == (0, 1, True, None)
    assert not torch.distributed.is_initialized()
    assert distributed.shard_model(tiny_qwen2, ctx) is tiny_qwen2 and not distributed.is_sharded(tiny_qwen2)
    assert distributed.global_sum(3) == 3 and distributed.global_max(2.5) == 2.5
    assert distributed.all_gather_objects({"a": 1}) == [{"a": 1}]
    assert distributed.rank_slice(4, ctx, group_size=2) == slice(0, 4)
    layers = list(distributed.full_state_dict_layers(tiny_qwen2))
    assert len(layers) == 1 + 2  # the root's tensors, then each of the 2 decoder layers
    assert sorted(k for layer in layers for k in layer) == sorted(tiny_qwen2.state_dict())


def test_cpu_offload_is_refused_where_it_cannot_apply(tiny_qwen2):
    with pytest.raises(ValueError, match="on a CPU run"):
        distributed.shard_model(tiny_qwen2, single(0, 2), cpu_offload=True)
    one_gpu = distributed.DistributedContext(rank=0, world_size=1, local_rank=0, device=torch.device("cuda", 0),
                                             backend=None)
    with pytest.raises(ValueError, match="torchrun"):
        distributed.shard_model(tiny_qwen2, one_gpu, cpu_offload=True)


def test_grpo_examples_in_step_makes_uneven_microbatches_a_mean_over_all_sequences():
    from reasontune.losses import PolicyLossSettings, policy_microbatch_train_step

    # Two microbatches of 1 and 3 responses; advantages 2, -1, 0.5, 3 on the first response token only.
    # sequence_sum with constant 5: per-sequence loss = -A * logp / 5 at logp = -1 -> A / 5.
    # Mean over the 4 sequences = (2 - 1 + 0.5 + 3) / 5 / 4 = 0.225; the batch means / 2 would give
    # 2/5/2 + (-1 + 0.5 + 3)/5/3/2 = 0.2 + 0.08333 = 0.28333.
    advantages = [torch.tensor([2.0]), torch.tensor([-1.0, 0.5, 3.0])]
    total = 0.0
    for advantage in advantages:
        log_probs = torch.full((len(advantage), 3), -1.0, requires_grad=True)
        mask = torch.tensor([[True, False, False]] * len(advantage))
        settings = PolicyLossSettings("reinforce_with_baseline", 2, aggregation="sequence_sum", normalize_constant=5.0)
        loss, _ = policy_microbatch_train_step(log_probs, mask, settings, advantages=advantage, examples_in_step=4)
        total += float(loss)
    assert total == pytest.approx(0.225, rel=1e-6)
    with pytest.raises(ValueError, match="examples_in_step"):
        policy_microbatch_train_step(torch.zeros(1, 2, requires_grad=True), torch.ones(1, 2, dtype=torch.bool),
                                     PolicyLossSettings("reinforce_with_baseline"), advantages=torch.ones(1),
                                     examples_in_step=0)


# ---------------------------------------------------------------------------------------------
# Trainer state: JSON + safetensors, nothing unpickled


def test_trainer_state_round_trips_optimizer_scheduler_and_every_rng(tmp_path, tiny_qwen2):
    optimizer = torch.optim.AdamW(tiny_qwen2.parameters(), lr=1e-3, betas=(0.9, 0.95))
    tiny_qwen2(torch.tensor([[1, 2, 3]])).logits.sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5)
    random.seed(3), np.random.seed(3), torch.manual_seed(3)
    state = {"step": 7, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "rng": checkpoint.rng_state(), "plan_fingerprint": "abc", "loss": float("nan")}
    expected = [random.random(), float(np.random.rand()), float(torch.rand(()))]
    checkpoint.save_trainer_state(tmp_path, state)
    random.seed(99), np.random.seed(99), torch.manual_seed(99)

    loaded = checkpoint.load_trainer_state(tmp_path)
    assert loaded["step"] == 7 and loaded["plan_fingerprint"] == "abc" and loaded["loss"] != loaded["loss"]
    assert loaded["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.95)
    original, restored = optimizer.state_dict()["state"], loaded["optimizer"]["state"]
    assert sorted(restored) == sorted(original)  # integer parameter ids come back as ints
    for index in original:
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(restored[index][key], original[index][key])
    fresh = torch.optim.AdamW(tiny_qwen2.parameters(), lr=1e-3)
    fresh.load_state_dict(loaded["optimizer"])
    checkpoint.set_rng_state(loaded["rng"])
    assert [random.random(), float(np.random.rand()), float(torch.rand(()))] == expected


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran"))


def test_a_crafted_pickle_trainer_state_is_refused_and_never_run(tmp_path):
    crafted = tmp_path / "checkpoint-5"
    crafted.mkdir()
    marker = tmp_path / "pwned"
    torch.save({"step": 5, "payload": _Payload(marker)}, crafted / "trainer_state.pt")

    with pytest.raises(ValueError, match="has no trainer_state.json"):
        checkpoint.load_trainer_state(crafted)
    assert not marker.exists()
    assert run_layout.latest_checkpoint(tmp_path) is None  # not even offered for --resume


def test_trainer_state_refuses_objects_and_reports_broken_files(tmp_path):
    with pytest.raises(TypeError, match="/sampler is a object"):
        checkpoint.save_trainer_state(tmp_path, {"sampler": object()})
    (tmp_path / "trainer_state.json").write_text('{"step": 1,\n "rng": {"__tensor__": "rng/torch"}}')
    with pytest.raises(ValueError, match="rng/torch"):
        checkpoint.load_trainer_state(tmp_path)
    (tmp_path / "trainer_state.json").write_text('{"step": 1,\n oops}')
    with pytest.raises(ValueError, match="line 2"):
        checkpoint.load_trainer_state(tmp_path)


# ---------------------------------------------------------------------------------------------
# World size 2 with FSDP2 against world size 1 (three launches for all of these)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Launch 1 (world 1): invariance + save A. Launch 2 (world 2): invariance + save C + resume A -> B.
    Launch 3 (world 1): resume C -> D. Launch 2 also gathers rank slices; launches 1 and 2 run the fused log-probs."""
    out = tmp_path_factory.mktemp("dist")
    jobs = str(SCRIPTS / "jobs.py")
    started = time.time()
    for arguments, world_size in [
        ([jobs, "invariance", out / "invariance", "save", out / "A", "fused", out / "fused"], 1),
        ([jobs, "invariance", out / "invariance", "save", out / "C", "resume", out / "A" / "checkpoint-2", out / "B",
          "gather", out / "gathered.json", "fused", out / "fused"], 2),
        ([jobs, "resume", out / "C" / "checkpoint-2", out / "D"], 1),
    ]:
        result = launch([str(a) for a in arguments], world_size)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    print(f"three launches: {time.time() - started:.1f} s")
    return out


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def whole_model_difference(weights: dict, reference: dict) -> float:
    """Returns |weights - reference| / |reference| over every tensor as one float64 vector."""
    difference = sum(float((weights[k] - reference[k]).double().square().sum()) for k in reference) ** 0.5
    return difference / sum(float(reference[k].double().square().sum()) for k in reference) ** 0.5


def test_world_two_accumulation_one_equals_world_one_accumulation_two(runs):
    from safetensors.torch import load_file

    from reasontune.modeling import build_model_from_config, tiny_qwen2_config

    one, two = (load_file(str(runs / "invariance" / f"world-{n}.safetensors")) for n in (1, 2))
    initial = build_model_from_config(tiny_qwen2_config(vocab_size=97, hidden_size=32, num_heads=4, num_kv_heads=2),
                                      seed=0).state_dict()
    assert one.keys() == two.keys()
    cases = sorted({key.split("/")[0] for key in one})
    assert len(cases) == 10  # SFT 2 normalisations x padded/packed; GRPO 3 aggregations x on/off-policy
    for case in cases:
        names = [key for key in one if key.startswith(case + "/")]
        weights = max(relative_difference(two[k], one[k]) for k in names)
        # The update itself (weights - initial) must agree too: a gradient off by a factor (ranks
        # averaged instead of summed, a per-rank count) moves every update by 50-100 %.
        updates = max(relative_difference(two[k] - initial[k.split("/", 1)[1]], one[k] - initial[k.split("/", 1)[1]])
                      for k in names)
        assert weights <= 1e-6 and updates <= 1e-4, (case, weights, updates)
    norms_one, norms_two = (json.loads((runs / "invariance" / f"world-{n}.json").read_text()) for n in (1, 2))
    for case in cases:  # clip_and_step's gradient norm is the global one, every step
        assert norms_two[case] == pytest.approx(norms_one[case], rel=1e-6), case


@pytest.mark.parametrize("run, meaning", [("B", "world 1 checkpoint resumed at world 2"),
                                          ("C", "world 2, uninterrupted"),
                                          ("D", "world 2 checkpoint resumed at world 1")])
def test_sharded_checkpoint_resumes_at_another_world_size(runs, run, meaning):
    from safetensors.torch import load_file

    reference = load_file(str(runs / "A" / "after-3.safetensors"))  # world 1, uninterrupted
    weights = load_file(str(runs / run / "after-3.safetensors"))
    # Step 3 with AdamW needs the step-2 moments: a fresh optimizer or the wrong shard moves the
    # weights by ~lr = 1e-2 relative; the world-size change itself costs ~1e-7 over the whole model.
    # Per tensor, AdamW divides each gradient by its own running RMS, so where a gradient is tiny
    # (the k_proj biases) it magnifies the rounding of another summation order: up to 2.2e-5
    # measured on an AVX-512 CPU, whose kernels round differently at the two world sizes' shapes.
    assert whole_model_difference(weights, reference) <= 1e-6, meaning
    assert max(relative_difference(weights[k], reference[k]) for k in reference) <= 1e-4, meaning
    probe, reference_probe = (json.loads((runs / r / "probe.json").read_text()) for r in (run, "A"))
    assert probe["scheduler_epoch"] == 2 and probe["step"] == 2
    assert probe["rng_restored"] and probe["draws"] == reference_probe["draws"]  # rank 0's generators came back


def test_consolidated_checkpoint_from_two_ranks_loads_with_from_pretrained(runs):
    from transformers import AutoModelForCausalLM

    sharded = runs / "C" / "checkpoint-2"
    assert (sharded / "sharded" / ".metadata").exists() and len(list((sharded / "sharded").glob("*.distcp"))) == 2
    assert {path.name for path in sharded.glob("rng-rank-*.json")} == {"rng-rank-0.json", "rng-rank-1.json"}
    from_two = AutoModelForCausalLM.from_pretrained(sharded).state_dict()
    from_one = AutoModelForCausalLM.from_pretrained(runs / "A" / "checkpoint-2").state_dict()
    assert from_two.keys() == from_one.keys()
    # As above: the whole model within 1e-6, each tensor within AdamW's magnified rounding (1.2e-5 measured).
    assert whole_model_difference(from_two, from_one) <= 1e-6
    assert max(relative_difference(from_two[k], from_one[k]) for k in from_one) <= 1e-4
    assert run_layout.latest_checkpoint(runs / "C") == sharded
    assert not list((runs / "C").glob(".*tmp*"))  # renamed into place, nothing left behind


def test_rank_slices_gathered_on_two_ranks_come_back_in_the_original_order(runs):
    result = json.loads((runs / "gathered.json").read_text())
    assert result["mine"] == ["item-0", "item-1", "item-2", "item-3", "item-4", "item-5"]  # rank 0: 3 of 5 groups
    assert result["gathered"] == [f"item-{i}" for i in range(10)]


@pytest.mark.parametrize("tied", ["untied", "tied"])
def test_fused_log_probs_of_a_sharded_model_equal_one_process_in_value_and_gradient(runs, tied):
    from safetensors.torch import load_file

    one, two = (load_file(str(runs / "fused" / f"world-{n}.safetensors")) for n in (1, 2))
    facts_one, facts_two = (json.loads((runs / "fused" / f"world-{n}.json").read_text()) for n in (1, 2))
    fused, naive = f"{tied}-fused/", f"{tied}-naive/"
    # The sharded model took the fused path: implementation="fused" raises on a model it does not know, and each
    # of the 2 iterations called the fused Function once on each rank (rank 0 counts its own).
    assert facts_two["model_class"][f"{tied}-fused"] == "FSDPQwen2ForCausalLM"
    assert facts_two["fused_calls"][f"{tied}-fused"] == 2 and facts_one["fused_calls"][f"{tied}-naive"] == 0
    names = [key.removeprefix(fused) for key in one if key.startswith(fused)]
    assert len([name for name in names if "/grad/" in name]) == 2 * (27 if tied == "untied" else 26)  # 2 layers x 12 + embeddings, norm (+ lm_head)
    for name in names:
        # World 1 fused against the naive full log-softmax: an independent reference (measured <= 3e-6).
        assert relative_difference(one[fused + name], one[naive + name]) <= 1e-5, name
        # World 2 against world 1 on the same path, per tensor. Iteration 0 starts from the same weights bit for
        # bit: the same computation split over ranks (measured <= 2e-7). Afterwards the weights differ in their
        # last bits, which the second iteration moves by up to 7e-7 (measured; lr 0.1).
        assert relative_difference(two[fused + name], one[fused + name]) <= (1e-6 if name.startswith("0/") else 1e-5)
    for group in ("0/grad/", "1/grad/", "final/", "1/log_probs", "1/token_entropy"):
        # Each iteration's whole gradient, the final weights: one vector each, within 1e-6 (measured <= 3e-7).
        keys = [fused + name for name in names if name.startswith(group)]
        difference = sum(float((two[k] - one[k]).double().square().sum()) for k in keys) ** 0.5
        size = sum(float(one[k].double().square().sum()) for k in keys) ** 0.5
        assert difference / size <= 1e-6, (group, difference / size)
    head = "lm_head.weight" if tied == "untied" else "model.embed_tokens.weight"
    assert float(one[f"{fused}0/grad/{head}"].abs().max()) > 1e-2  # the output projection's gradient is no rounding


# ---------------------------------------------------------------------------------------------
# Failure


def test_an_error_on_one_rank_stops_every_rank_promptly_with_one_message():
    started = time.time()
    result = launch([str(SCRIPTS / "fail_fast.py")], world_size=2, timeout=120)
    elapsed = time.time() - started
    assert result.returncode != 0
    assert result.stderr.count("error on rank 1 of 2: ValueError: microbatch 17 has no response tokens") == 1
    assert result.stderr.count("error on rank 0") == 0  # rank 0 only says it stopped because of a peer
    assert elapsed < 60  # the process-group timeout is 120 s: rank 0 did not wait it out


@pytest.mark.parametrize("group", ["main", "side"])
def test_a_hung_rank_is_reported_as_a_hang_naming_it_after_the_timeout_of_every_group(group):
    """Rank 1 sleeps 120 s; with a 3 s timeout the job ends within seconds and rank 0 names rank 1 (default or side group)."""
    started = time.time()
    result = launch([str(SCRIPTS / "hang.py"), group, "3"], world_size=2, timeout=90)
    elapsed = time.time() - started
    assert result.returncode != 0
    assert result.stderr.count("rank 0 of 2: hang: a collective waited 3 s (--process-group-timeout) for rank 1, "
                               "which stopped answering") == 1, result.stderr[-2000:]
    assert "its error is above" not in result.stderr and "error on rank" not in result.stderr
    # 3 s timeout + at most 3 s for rank 1 to say why it stopped (it never does) + start-up; never rank 1's 120 s
    # (nor torch's 30-minute default that a side group used to keep)
    assert elapsed < 60


def test_peer_failure_messages_name_whose_fault_it_was():
    ctx = distributed.DistributedContext(rank=0, world_size=4, local_rank=0, device=torch.device("cpu"), backend="gloo")
    # ranks 0 and 2 timed out, rank 1 and 3 said nothing: they stopped answering
    assert "for ranks 1, 3, which stopped answering" in distributed.peer_failure_message(
        ctx, "timed_out", {0: "timed_out", 2: "timed_out"})
    # everyone timed out: the ranks wait in different collectives
    assert "they are in different collectives" in distributed.peer_failure_message(
        ctx, "timed_out", {rank: "timed_out" for rank in range(4)})
    # a rank with an error prints it; the others point to it
    assert distributed.peer_failure_message(ctx, "lost_peer", {0: "lost_peer", 3: "error"}) == (
        "rank 0 of 4 stopped: rank 3 failed (its error is above)")
    # a rank that went away silently (killed by a signal) is named as such
    assert "rank 2 went away without an error (killed by a signal" in distributed.peer_failure_message(
        ctx, "lost_peer", {0: "lost_peer", 1: "lost_peer", 3: "lost_peer"})
    # only the lowest of the ranks that saw the same thing prints it
    later = dataclasses.replace(ctx, rank=2)
    assert distributed.peer_failure_message(later, "timed_out", {0: "timed_out", 2: "timed_out"}) is None


# ---------------------------------------------------------------------------------------------
# The GPU check and scaling bench are ready before a GPU is lent


def load_bench(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPOSITORY / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_arguments_and_cpu_dry_run_rows():
    gpu_check = load_bench("gpu_check")
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--dry-run", "--skip", "logprobs,warp-drive"])
    args = gpu_check.parse_args(["--dry-run", "--skip", "sft,vllm"])
    rows = gpu_check.logprobs_rows(args, torch.device("cpu")) + gpu_check.packing_rows(args, torch.device("cpu"))
    assert rows[1]["max_difference"] < 1e-4  # fused vs naive log-probs agree (fp32, tiny shape)
    assert rows[2]["max_difference"] < 1e-4  # packed sdpa equals the examples run one by one
    assert gpu_check.vllm_rows(args, torch.device("cpu"))[0]["note"].startswith("skipped")


def test_scaling_bench_refuses_a_global_batch_that_does_not_split():
    scaling = load_bench("scaling")
    assert scaling.batch_sizes(scaling.parse_args(["--global-batch", "8", "--micro-batch", "2"]), [1, 2]) == (8, 2)
    with pytest.raises(SystemExit, match="does not split"):  # 6 sequences = 2 ranks x 1.5 microbatches of 2
        scaling.batch_sizes(scaling.parse_args(["--global-batch", "6", "--micro-batch", "2"]), [1, 2])


EXIT_SCRIPT = """
import atexit, sys
from pathlib import Path
from reasontune import process_exit
atexit.register(lambda: Path(sys.argv[1]).write_text("atexit ran"))
if sys.argv[2] == "closed":
    process_exit.mark_process_group_closed()
try:
    sys.stdout.write("buffered, not flushed")
    process_exit.exit_process(3)
finally:
    Path(sys.argv[1] + ".finally").write_text("finally ran")
"""


@pytest.mark.parametrize("state", ["closed", "open"])
def test_exit_process_keeps_status_atexit_and_output_and_skips_teardown_only_after_a_closed_group(tmp_path, state):
    marker = tmp_path / "marker"
    result = subprocess.run([sys.executable, "-c", EXIT_SCRIPT, str(marker), state], capture_output=True, text=True,
                            timeout=60, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert result.returncode == 3, result.stderr
    assert result.stdout == "buffered, not flushed"
    assert marker.read_text() == "atexit ran"
    # sys.exit unwinds the stack (the finally block runs); os._exit, after a closed group, leaves at once.
    assert (tmp_path / "marker.finally").exists() == (state == "open")
