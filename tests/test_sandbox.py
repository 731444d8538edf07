"""The Python sandbox against hostile programs: each ends as a bounded error within its budget, and the machine is unharmed."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from reasontune.environments.sandbox import SANDBOX_UID_BASE, SandboxLimits, SandboxUnavailable, run_python

LIMITS = SandboxLimits(wall_seconds=6.0, cpu_seconds=2, memory_bytes=512 * 1024**2, output_bytes=2048, processes=16)
# Start-up of the launcher and interpreter takes ~0.3 s on an idle machine; the shared one is loaded.
SLACK_SECONDS = 4.0


def _sandbox_processes() -> list[str]:
    """Returns a description of every live process that belongs to a sandbox: a sandbox uid's, or a launcher."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
        except OSError:
            continue
        uid = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("Uid:"))
        zombie = "State:\tZ" in status
        if not zombie and (uid >= SANDBOX_UID_BASE and os.geteuid() == 0 or "reasontune-sandbox-" in command):
            found.append(f"{entry.name} uid={uid} {command[:80]}")
    return found


@pytest.fixture(autouse=True)
def machine_unharmed():
    before = set(_sandbox_processes())
    try:
        run_python("print(1)", LIMITS)
    except SandboxUnavailable as error:
        pytest.skip(f"no namespaces on this machine: {error}")
    yield
    deadline = time.monotonic() + 5  # the kernel tears a PID namespace down asynchronously
    while set(_sandbox_processes()) - before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert set(_sandbox_processes()) - before == set()
    leftovers = [p for p in Path(os.environ.get("TMPDIR", "/tmp")).glob("reasontune-sandbox-*")]
    assert leftovers == []


def test_a_plain_program_prints_and_sees_only_its_sandbox():
    result = run_python("import os, sys\nprint(6 * 7)\nprint(os.getcwd(), sorted(os.listdir('/sandbox')))\n"
                        "print(sorted(os.environ))\nprint(os.getpid())", LIMITS)
    assert result.status == "ok" and result.exit_code == 0
    lines = result.output.splitlines()
    assert lines[0] == "42"
    assert lines[1] == "/sandbox ['program.py']"
    assert "REASONTUNE" not in lines[2] and "PYTHONPATH" not in lines[2]  # the parent's environment stays out
    assert lines[3] == "2"  # in its own PID namespace, whose init (PID 1) waits for it


def test_an_exception_comes_back_as_an_error_with_its_traceback():
    result = run_python("x = [1, 2]\nprint('before')\nx[5]", LIMITS)
    assert result.status == "error" and result.exit_code == 1
    assert result.output.startswith("before\n") and "IndexError: list index out of range" in result.output


def test_an_infinite_loop_hits_the_cpu_bound():
    started = time.monotonic()
    result = run_python("while True:\n    pass", LIMITS)
    assert result.status == "timeout"
    assert time.monotonic() - started < LIMITS.cpu_seconds + SLACK_SECONDS


def test_a_sleeping_program_hits_the_wall_bound():
    limits = SandboxLimits(wall_seconds=1.5, cpu_seconds=5)
    started = time.monotonic()
    result = run_python("import time\nprint('start', flush=True)\ntime.sleep(60)", limits)
    assert result.status == "timeout" and result.output == "start\n"
    assert time.monotonic() - started < limits.wall_seconds + SLACK_SECONDS


def test_a_fork_bomb_is_bounded_and_leaves_no_process():
    program = ("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n")
    started = time.monotonic()
    result = run_python(program, LIMITS)
    assert result.status in ("timeout", "killed")
    assert time.monotonic() - started < LIMITS.wall_seconds + SLACK_SECONDS
    # the fixture checks that no forked process survived


def test_a_detached_child_dies_with_the_program():
    # setsid leaves the process group; the PID namespace still ends it when PID 1 exits.
    program = ("import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\nprint('parent done')")
    result = run_python(program, LIMITS)
    assert result.status == "ok" and result.output == "parent done\n"


def test_reading_dev_zero_hits_the_memory_bound():
    started = time.monotonic()
    result = run_python("data = open('/dev/zero', 'rb').read(10**10)\nprint(len(data))", LIMITS)
    assert result.status in ("error", "killed", "timeout")
    assert "MemoryError" in result.output or result.status != "error"
    assert time.monotonic() - started < LIMITS.wall_seconds + SLACK_SECONDS


def test_a_gigabyte_print_is_cut_at_the_output_bound():
    started = time.monotonic()
    result = run_python("chunk = 'x' * 10**6\nfor _ in range(1000):\n    print(chunk)", LIMITS)
    assert result.status == "output_limit" and result.truncated
    assert len(result.output.encode()) <= LIMITS.output_bytes and set(result.output) == {"x"}
    assert time.monotonic() - started < LIMITS.wall_seconds


def test_the_run_directory_can_be_neither_read_nor_written(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    os.chmod(tmp_path, 0o755)
    secret = run_dir / "metrics.jsonl"
    secret.write_text("secret\n")
    os.chmod(run_dir, 0o777)  # even a world-writable run directory is out of reach: it is not in the sandbox's view
    program = (f"import os\nfor action in (lambda: open({str(secret)!r}).read(), lambda: open({str(run_dir / 'x')!r}, 'w'),\n"
               f"               lambda: open('/tmp/escaped', 'w'), lambda: open('/usr/escaped', 'w'),\n"
               f"               lambda: os.listdir({str(run_dir)!r})):\n"
               "    try:\n        print('did', action())\n    except OSError as error:\n        print(type(error).__name__)\n")
    result = run_python(program, LIMITS)
    assert result.status == "ok"
    assert all(not line.startswith("did") for line in result.output.splitlines()), result.output
    assert secret.read_text() == "secret\n" and sorted(p.name for p in run_dir.iterdir()) == ["metrics.jsonl"]
    assert not Path("/tmp/escaped").exists() and not Path("/usr/escaped").exists()


def test_the_network_is_unreachable():
    program = ("import socket\nfor address in (('1.1.1.1', 80), ('127.0.0.1', 22)):\n    s = socket.socket()\n"
               "    s.settimeout(2)\n    try:\n        s.connect(address)\n        print('connected')\n"
               "    except OSError as error:\n        print(type(error).__name__, error.errno)\n")
    result = run_python(program, LIMITS)
    assert result.status == "ok" and "connected" not in result.output
    assert len(result.output.splitlines()) == 2


def test_files_in_the_sandbox_are_bounded_and_private_to_one_call():
    first = run_python("open('state.txt', 'w').write('x')\nopen('big', 'wb').write(b'0' * (64 * 1024**2))", LIMITS)
    assert first.status in ("error", "killed") and "program.py" in first.output or first.status == "killed"
    second = run_python("import os\nprint(os.path.exists('state.txt'))", LIMITS)
    assert second.output == "False\n"


@pytest.mark.skipif(os.geteuid() != 0, reason="per-call uids need root; without it the caller's user is the count")
def test_concurrent_calls_each_have_their_own_process_bound_and_uid():
    """A call that holds every process its bound allows leaves another call, running beside it, all of its own."""
    import concurrent.futures

    # the holder forks until RLIMIT_NPROC refuses, keeps its children asleep, then reports the count and its uid
    holder = ("import os, time\nforks = 0\nwhile True:\n    try:\n        pid = os.fork()\n    except OSError:\n"
              "        break\n    if pid == 0:\n        time.sleep(6)\n        os._exit(0)\n    forks += 1\n"
              "print(forks, os.getuid(), flush=True)\ntime.sleep(4)\n")
    # the other one starts while the holder's children sleep and forks 8 children of its own
    other = ("import os, time\ntime.sleep(1.5)\npids = []\nfor _ in range(8):\n    pid = os.fork()\n"
             "    if pid == 0:\n        os._exit(0)\n    pids.append(pid)\nfor pid in pids:\n    os.waitpid(pid, 0)\n"
             "print(len(pids), os.getuid())\n")
    limits = SandboxLimits(wall_seconds=12.0, cpu_seconds=4, memory_bytes=512 * 1024**2, processes=16)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        held = pool.submit(run_python, holder, limits)
        time.sleep(0.5)
        beside = pool.submit(run_python, other, limits)
        held, beside = held.result(), beside.result()
    assert held.status == "ok" and beside.status == "ok", (held, beside)
    held_forks, held_uid = map(int, held.output.split())
    beside_forks, beside_uid = map(int, beside.output.split())
    assert held_forks == 16 - 2  # the bound, less PID 1 and the program itself
    assert beside_forks == 8  # with one uid for both calls its first fork would have been refused
    assert held_uid != beside_uid and min(held_uid, beside_uid) >= SANDBOX_UID_BASE
