"""Bounded worker processes: run grading functions with a hard time and memory limit.

A worker is a fresh Python interpreter (``subprocess``, so it works from any thread, under
any ``__main__`` and without re-importing the caller's script or torch) that talks to its
parent over a socket pair with ``multiprocessing.connection``. It sets ``RLIMIT_AS`` on
itself, preloads sympy, and then runs requests: a pickled function reference plus a list of
argument tuples, answering one result per item. The parent waits on each item with a
deadline; a worker that overruns is killed and replaced, and one that dies (``os._exit``, a
segfault, the out-of-memory killer) is noticed as end-of-file and replaced. Idle workers are
kept in a small pool for the next call. No signals are used, so any thread may call.

``multiprocessing.Pool`` and ``concurrent.futures`` are not used because a worker that dies
breaks them (a hung ``Pool`` or a ``BrokenProcessPool`` for every pending item) and because
their spawn start method re-imports the caller's main module.
"""

from __future__ import annotations

import atexit
import importlib
import importlib.util
import os
import pickle
import subprocess
import sys
import threading
import time
from multiprocessing import Pipe
from multiprocessing.connection import Connection, wait

DEFAULT_MEMORY_LIMIT_BYTES = 4 * 1024**3
"""Address-space limit of a worker: sympy blow-ups die with MemoryError, not the machine."""

STARTUP_TIMEOUT_SECONDS = 60.0

_PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_PACKAGE_DIR = os.path.join(_PACKAGE_PARENT, "reasontune")

# Runs in the worker: a bare ``reasontune`` package object stands in for the real one so
# that ``reasontune/__init__.py`` (which imports torch) is not run just to grade answers.
_BOOTSTRAP = (
    "import sys, types\n"
    "package = types.ModuleType('reasontune')\n"
    "package.__path__ = [sys.argv[2]]\n"
    "sys.modules['reasontune'] = package\n"
    "from reasontune.rewards import sandbox\n"
    "sandbox.worker_main(int(sys.argv[1]), int(sys.argv[3]))\n"
)

_in_worker = False


def in_worker() -> bool:
    """Return True inside a bounded worker process (where grading may run sympy directly)."""
    return _in_worker


class WorkerDied(RuntimeError):
    """The worker process ended while it was running an item."""


class WorkerFailedToLoad(RuntimeError):
    """The worker could not import the function it was asked to run."""


def _real_package_attribute(name: str):
    """Return ``reasontune.<name>``, loading the real package ``__init__`` on first need.

    Installed as the stand-in package's module ``__getattr__``: a caller's reward function
    that does ``from reasontune import X`` still works, and only then pays for torch.
    """
    if os.path.exists(os.path.join(_PACKAGE_DIR, name + ".py")) or os.path.isdir(os.path.join(_PACKAGE_DIR, name)):
        raise AttributeError(name)  # a submodule: let the import system load it
    package = sys.modules["reasontune"]
    del package.__getattr__
    spec = importlib.util.spec_from_file_location(
        "reasontune", os.path.join(_PACKAGE_DIR, "__init__.py"), submodule_search_locations=[_PACKAGE_DIR]
    )
    spec.loader.exec_module(package)
    return getattr(package, name)


def worker_main(fd: int, memory_limit_bytes: int) -> None:
    """Serve requests on the socket ``fd`` until the parent closes it (worker side)."""
    global _in_worker
    _in_worker = True
    package = sys.modules.get("reasontune")
    if package is not None and not hasattr(package, "__file__"):
        package.__getattr__ = _real_package_attribute
    if memory_limit_bytes > 0:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (memory_limit_bytes, memory_limit_bytes))
    connection = Connection(fd)
    _, paths = connection.recv()
    sys.path[:] = [path for path in paths if path] + [path for path in sys.path if path not in paths]
    import reasontune.rewards.symbolic  # noqa: F401  (preload sympy before saying ready)

    connection.send(("ready", os.getpid()))
    functions: dict[bytes, object] = {}
    while True:
        try:
            blob, (module, parent_paths), items = connection.recv()
        except (EOFError, OSError):
            return
        sys.path.extend(path for path in parent_paths if path and path not in sys.path)
        function = functions.get(blob)
        if function is None:
            try:
                function = functions[blob] = pickle.loads(blob)
            except Exception as error:  # noqa: BLE001 - reported to the parent, which raises
                connection.send(("load_error", f"{type(error).__name__}: {error}"))
                continue
            connection.send(("loaded", None))  # the items' time bound starts now, not with the import
        for arguments in items:
            try:
                reply = ("ok", function(*arguments))
            except MemoryError:
                reply = ("error", "MemoryError: memory limit reached")
            except Exception as error:  # noqa: BLE001 - one bad item must not end the worker
                reply = ("error", f"{type(error).__name__}: {error}")
            connection.send(reply)


class Worker:
    """One bounded worker process (parent side)."""

    def __init__(self, memory_limit_bytes: int = DEFAULT_MEMORY_LIMIT_BYTES):
        self.memory_limit_bytes = memory_limit_bytes
        parent, child = Pipe(duplex=True)
        self.connection = parent
        self.process = subprocess.Popen(
            [sys.executable, "-c", _BOOTSTRAP, str(child.fileno()), _PACKAGE_DIR, str(memory_limit_bytes)],
            pass_fds=[child.fileno()],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            close_fds=True,
        )
        child.close()
        self.connection.send(("init", list(sys.path)))
        self.ready = False
        self.sent_functions: set[bytes] = set()

    def wait_ready(self, timeout: float = STARTUP_TIMEOUT_SECONDS) -> None:
        """Block until the worker has started; raise WorkerDied when it does not."""
        if self.ready:
            return
        try:
            if self.connection.poll(timeout):
                message = self.connection.recv()
                if message[0] == "ready":
                    self.ready = True
                    return
        except (EOFError, OSError):
            pass
        self.kill()
        raise WorkerDied("a grading worker failed to start")

    def send(self, function, items: list[tuple]) -> bool:
        """Asks the worker to run ``function(*arguments)`` for each tuple in ``items``; returns True when it loads ``function`` first.

        A worker loading a function (importing its module, which may be slow: a user's reward
        module, a test module) first replies ``("loaded", None)``; the caller bounds the load by
        ``STARTUP_TIMEOUT_SECONDS`` and each item by its own timeout from then on.
        """
        blob = pickle.dumps(function)
        loading = blob not in self.sent_functions
        self.sent_functions.add(blob)
        # The parent's search path goes along: a user's module:function (reasontune --reward) imported after the worker started.
        self.connection.send((blob, (getattr(function, "__module__", "") or "", list(sys.path)), items))
        return loading

    def receive(self) -> tuple:
        """Return the next reply, ``("ok", value)``, ``("error", message)`` or ``("loaded", None)``; raise WorkerDied."""
        try:
            reply = self.connection.recv()
        except (EOFError, OSError) as error:
            self.kill()
            raise WorkerDied("the grading worker ended unexpectedly") from error
        if reply[0] == "load_error":
            raise WorkerFailedToLoad(
                f"a grading worker could not load the function: {reply[1]}; "
                "define it at module level in an importable module (not __main__ or a lambda)"
            )
        return reply

    def kill(self) -> None:
        """End the worker process now and reap it."""
        try:
            self.process.kill()
            self.process.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            pass
        self.connection.close()

    def alive(self) -> bool:
        return self.process.poll() is None and not self.connection.closed


class WorkerPool:
    """A stock of idle workers shared by all callers in this process (thread-safe)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.idle: list[Worker] = []
        self.owner_pid = os.getpid()

    def acquire(self, count: int, memory_limit_bytes: int = DEFAULT_MEMORY_LIMIT_BYTES) -> list[Worker]:
        """Return ``count`` started workers, reusing idle ones."""
        with self.lock:
            if self.owner_pid != os.getpid():  # forked: the idle workers belong to the parent
                self.idle, self.owner_pid = [], os.getpid()
            taken = []
            while self.idle and len(taken) < count:
                worker = self.idle.pop()
                if worker.alive() and worker.memory_limit_bytes == memory_limit_bytes:
                    taken.append(worker)
                else:
                    worker.kill()
        fresh = [Worker(memory_limit_bytes) for _ in range(count - len(taken))]
        for worker in fresh:
            worker.wait_ready()
        return taken + fresh

    def release(self, workers: list[Worker]) -> None:
        """Return healthy workers to the stock (keeping at most one per CPU idle)."""
        with self.lock:
            for worker in workers:
                if worker.alive() and os.getpid() == self.owner_pid and len(self.idle) < (os.cpu_count() or 1):
                    self.idle.append(worker)
                else:
                    worker.kill()

    def shutdown(self) -> None:
        """Kill every idle worker."""
        with self.lock:
            idle, self.idle = self.idle, []
        for worker in idle:
            worker.kill()


POOL = WorkerPool()
atexit.register(POOL.shutdown)


def run_bounded(function, arguments: tuple, timeout: float, memory_limit_bytes: int = DEFAULT_MEMORY_LIMIT_BYTES):
    """Return ``("ok", value)``, ``("error", message)``, ``("timeout", None)`` or ``("died", None)``.

    Runs ``function(*arguments)`` in a pooled worker and waits at most ``timeout`` seconds
    for it (worker start-up and loading ``function`` are not counted); an overrunning worker is killed.
    """
    (worker,) = POOL.acquire(1, memory_limit_bytes)
    loading = worker.send(function, [arguments])
    deadline = time.monotonic() + (STARTUP_TIMEOUT_SECONDS if loading else timeout)
    while True:
        if not worker.connection.poll(max(0.0, deadline - time.monotonic())):
            worker.kill()
            return ("timeout", None)
        try:
            reply = worker.receive()
        except WorkerDied:
            return ("died", None)
        if reply[0] != "loaded":
            break
        deadline = time.monotonic() + timeout
    POOL.release([worker])
    return reply


def wait_for_any(workers: list[Worker], timeout: float) -> list[Worker]:
    """Return the workers among ``workers`` with a reply (or end-of-file) ready within ``timeout``."""
    by_connection = {worker.connection: worker for worker in workers}
    return [by_connection[connection] for connection in wait(list(by_connection), max(0.0, timeout))]
