"""Runs one model-written Python program in a fresh, isolated, bounded process and returns its output.

Each call starts a small trusted launcher (``python -I -S``, no torch, no site) with
``subprocess``; the launcher builds the isolation and then turns into the program:

1. ``unshare`` new network, PID, mount and IPC namespaces (through libc, as Python 3.11 has no
   ``os.unshare``). The network namespace holds only a loopback device that is down: every
   ``connect`` fails. When not root, a user namespace comes first, so the rest needs no privilege.
2. In the mount namespace (propagation private, nothing leaks back), a size-bounded tmpfs
   becomes the new root. Only ``/usr``, ``/etc``, the library directories and the Python
   installation are bind-mounted into it, read-only; ``/dev/null``, ``/dev/zero`` and
   ``/dev/urandom`` as single nodes. The run directory, the checkpoints, the data, ``/tmp`` and
   ``/root`` do not exist in that view. ``/sandbox`` (the working directory) is the one
   writable place, on the same bounded tmpfs, gone when the call ends.
3. A fork: the child is PID 1 of the new PID namespace, so when it ends, or is killed, the
   kernel kills every process left in it (a fork bomb dies with it). It ``chroot``s into the
   new root, drops to a uid of its own (groups cleared) when the launcher is root, sets rlimits (CPU
   seconds, address space, file size, open files, processes, no core dumps), asks to be killed
   when the launcher dies (``PR_SET_PDEATHSIG``), forks the program's process (``python -I`` on
   the program, PID 2) and waits for it.

The caller (``run_python``) reads the merged stdout/stderr with a wall-clock deadline and an
output bound, and kills the launcher's process group on either; the launcher's death kills
PID 1, and PID 1's death kills the namespace. Model-written code never runs in the caller's
process, nor in any process that shares its filesystem view, network or PIDs.

What this does *not* protect against is written in ``docs/tools.md``: kernel exploits (there
is no seccomp filter), CPU and memory pressure within the bounds, reading the world-readable
files of ``/usr`` and ``/etc``.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

# Runs as the launcher: ``python -I -S -c _LAUNCHER '<json settings>'``, the program on stdin.
_LAUNCHER = r'''
import ctypes, json, os, resource, signal, sys
settings = json.loads(sys.argv[1])
program = sys.stdin.buffer.read()
libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
NEWNS, NEWIPC, NEWUSER, NEWPID, NEWNET = 0x20000, 0x8000000, 0x10000000, 0x20000000, 0x40000000
BIND, REC, PRIVATE, REMOUNT, RDONLY, NOSUID, NODEV = 4096, 16384, 1 << 18, 32, 1, 2, 4

def fail(step):
    error = ctypes.get_errno()
    sys.stderr.write(f"sandbox setup failed at {step}: {os.strerror(error)}\n")
    os._exit(125)

def mount(source, target, kind, flags, data=None):
    if libc.mount(source.encode(), target.encode(), kind.encode() if kind else None, flags,
                  data.encode() if data else None) != 0:
        fail(f"mount {target}")

root_user = os.geteuid() == 0
uid, gid = os.geteuid(), os.getegid()
flags = NEWNS | NEWIPC | NEWPID | NEWNET | (0 if root_user else NEWUSER)
if libc.unshare(flags) != 0:
    fail("unshare")
if not root_user:  # become root of the new user namespace (only this user mapped), to mount
    for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1")):
        with open(f"/proc/self/{name}", "w") as handle:
            handle.write(text)
mount("none", "/", None, REC | PRIVATE)
new_root = settings["root"]
mount("sandbox", new_root, "tmpfs", NOSUID | NODEV, f"size={settings['disk_bytes']},mode=755")
for path in settings["binds"]:
    target = new_root + path
    if os.path.islink(path):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.symlink(os.readlink(path), target)
        continue
    if os.path.isdir(path):
        os.makedirs(target, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        open(target, "w").close()
    mount(path, target, None, BIND | REC)
    if os.path.isdir(path):
        mount("none", target, None, BIND | REMOUNT | RDONLY | NOSUID | REC)
work = new_root + "/sandbox"
os.makedirs(work)
with open(work + "/program.py", "wb") as handle:
    handle.write(program)
drop = root_user and settings["uid_base"] is not None
if drop:  # a uid (and gid) of this call alone: its RLIMIT_NPROC counts its own processes, no other sandbox's
    sandbox_id = settings["uid_base"] + os.getpid()  # the launcher's pid, unique among live launchers
    os.chown(work, sandbox_id, sandbox_id)
child = os.fork()
if child == 0:
    try:
        os.chroot(new_root)
        os.chdir("/sandbox")
        if drop:
            os.setgroups([])
            os.setgid(sandbox_id)
            os.setuid(sandbox_id)
        seconds = settings["cpu_seconds"]
        for limit, value in ((resource.RLIMIT_CPU, (seconds, seconds + 1)),
                             (resource.RLIMIT_AS, settings["memory_bytes"]),
                             (resource.RLIMIT_FSIZE, settings["disk_bytes"]),
                             (resource.RLIMIT_NOFILE, 64), (resource.RLIMIT_CORE, 0),
                             (resource.RLIMIT_NPROC, settings["processes"])):
            resource.setrlimit(limit, value if isinstance(value, tuple) else (value, value))
        # PR_SET_PDEATHSIG is cleared by a change of credentials, so it comes after setuid. Should the
        # launcher die before this line, the caller's kill of the process group (still ours) ends us.
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)
        # The program is not PID 1: the kernel ignores default-action signals to a namespace's init,
        # SIGXCPU from RLIMIT_CPU among them. PID 1 waits for it and, by exiting, ends everything left.
        program_pid = os.fork()
        if program_pid == 0:
            environment = {"PATH": "/usr/bin:/bin", "HOME": "/sandbox", "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"}
            os.execve(settings["python"], [settings["python"], "-I", "-u", "program.py"], environment)
        _, status = os.waitpid(program_pid, 0)
        os._exit(os.waitstatus_to_exitcode(status) & 255 if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))
    except BaseException as error:
        sys.stderr.write(f"sandbox setup failed: {type(error).__name__}: {error}\n")
    os._exit(125)
_, status = os.waitpid(child, 0)
os._exit(os.waitstatus_to_exitcode(status) & 255 if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))
'''

SETUP_FAILED_EXIT = 125
# Under root each call's program runs as uid = gid = SANDBOX_UID_BASE + its launcher's pid: no
# account, no file owned on the host, and an RLIMIT_NPROC count of its own. The base is high
# (2**31 - 2**24) so the ids are clear of every real user and of pid_max (at most 2**22) above it.
SANDBOX_UID_BASE = 2**31 - 2**24


class SandboxUnavailable(RuntimeError):
    """This machine does not let us build the isolation (no namespaces); model code is not run."""


@dataclass(frozen=True)
class SandboxLimits:
    """The bounds of one program run.

    ``wall_seconds`` bounds the whole call (start-up included), ``cpu_seconds`` the program's
    CPU time (``RLIMIT_CPU``), ``memory_bytes`` its address space (``RLIMIT_AS``, per process),
    ``disk_bytes`` its tmpfs and any one file, ``processes`` the processes of the call
    (``RLIMIT_NPROC``, counted per uid: under root each call has its own; without root the
    caller's user is the count, all its processes included), ``output_bytes`` the
    merged stdout and stderr kept (the program is killed once it prints more).
    """

    wall_seconds: float = 10.0
    cpu_seconds: int = 5
    memory_bytes: int = 1024**3
    disk_bytes: int = 16 * 1024**2
    processes: int = 32
    output_bytes: int = 4096

    def __post_init__(self) -> None:
        if self.wall_seconds <= 0 or self.cpu_seconds < 1 or self.output_bytes < 1 or self.processes < 1:
            raise ValueError(f"sandbox limits must be positive, got {self}")
        if self.memory_bytes < 64 * 1024**2 or self.disk_bytes < 1024**2:
            raise ValueError("sandbox memory_bytes must be >= 64 MiB and disk_bytes >= 1 MiB "
                             "(the interpreter needs that much to start)")


@dataclass(frozen=True)
class ExecutionResult:
    """What one program run gave back.

    ``output``: merged stdout and stderr, decoded as UTF-8 (bad bytes replaced), at most
    ``output_bytes`` bytes of it. ``status``: ``"ok"`` (exit 0), ``"error"`` (non-zero exit, an
    exception's traceback in ``output``), ``"timeout"`` (wall or CPU bound), ``"output_limit"``
    (printed more than the bound; killed) or ``"killed"`` (a signal, e.g. the memory bound).
    """

    output: str
    status: str
    exit_code: int | None
    seconds: float
    truncated: bool = False

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def _python_installation() -> list[str]:
    """Returns the directories the interpreter needs: its base prefix (and a virtual environment's prefix)."""
    paths = {os.path.realpath(sys.base_prefix), os.path.realpath(sys.prefix)}
    return sorted(paths)


def _binds() -> list[str]:
    system = [path for path in ("/usr", "/bin", "/lib", "/lib64", "/lib32", "/sbin", "/etc") if os.path.lexists(path)]
    devices = [path for path in ("/dev/null", "/dev/zero", "/dev/urandom") if os.path.exists(path)]
    installation = [path for path in _python_installation() if not any(path.startswith(s + "/") for s in system)]
    return system + installation + devices


def run_python(program: str, limits: SandboxLimits = SandboxLimits()) -> ExecutionResult:
    """Returns the result of running ``program`` (Python source) in a fresh isolated process under ``limits``.

    Never raises for anything the program does; raises ``SandboxUnavailable`` when the
    isolation cannot be built here (then nothing was run).
    """
    started = time.monotonic()
    mount_point = tempfile.mkdtemp(prefix="reasontune-sandbox-")  # only a mount point: the tmpfs covers it
    os.chmod(mount_point, 0o700)
    python = os.path.realpath(sys.executable)
    settings = {
        "root": mount_point, "binds": _binds(), "python": python, "uid_base": SANDBOX_UID_BASE,
        "cpu_seconds": limits.cpu_seconds, "memory_bytes": limits.memory_bytes, "disk_bytes": limits.disk_bytes,
        "processes": limits.processes,
    }
    process = subprocess.Popen([python, "-I", "-S", "-c", _LAUNCHER, json.dumps(settings)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               start_new_session=True, close_fds=True, env={"PATH": "/usr/bin:/bin"})
    try:
        output, status = _communicate(process, program.encode("utf-8", "replace"), limits, started)
    finally:
        _kill_group(process)
        try:
            os.rmdir(mount_point)
        except OSError:
            shutil.rmtree(mount_point, ignore_errors=True)
    exit_code = process.returncode
    text = output[:limits.output_bytes].decode("utf-8", "replace")
    truncated = len(output) > limits.output_bytes
    if status == "done":
        if exit_code == SETUP_FAILED_EXIT and text.startswith("sandbox setup failed"):
            raise SandboxUnavailable(text.strip())
        if exit_code == 0:
            status = "ok"
        elif exit_code == 128 + signal.SIGXCPU:  # the launcher reports a signal as 128 + its number
            status = "timeout"
        elif exit_code >= 128 or exit_code < 0:
            status = "killed"
        else:
            status = "error"
    return ExecutionResult(output=text, status=status, exit_code=exit_code,
                           seconds=time.monotonic() - started, truncated=truncated)


def _communicate(process: subprocess.Popen, program: bytes, limits: SandboxLimits,
                 started: float) -> tuple[bytes, str]:
    """Returns (output read, ``"done"`` | ``"timeout"`` | ``"output_limit"``) after feeding ``program`` to stdin."""
    try:
        process.stdin.write(program)
        process.stdin.close()
    except BrokenPipeError:
        pass
    chunks, size = [], 0
    deadline = started + limits.wall_seconds
    descriptor = process.stdout.fileno()
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return b"".join(chunks), "timeout"
        ready, _, _ = select.select([descriptor], [], [], remaining)
        if not ready:
            continue
        chunk = os.read(descriptor, 65536)
        if not chunk:  # every process holding the pipe has ended
            try:
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                return b"".join(chunks), "timeout"
            return b"".join(chunks), "done"
        chunks.append(chunk)
        size += len(chunk)
        if size > limits.output_bytes:
            return b"".join(chunks), "output_limit"


def _kill_group(process: subprocess.Popen) -> None:
    """Kills the launcher's process group (the launcher's death then kills the namespace) and reaps the launcher."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    process.stdout.close()
