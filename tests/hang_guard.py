"""A hang guard for tests with worker processes that tells "hung" from "slow on a loaded machine".

A wall-clock guard (``signal.alarm(120)``) fails a test whenever the machine is busy
enough: spawned loader workers spent 58 s of a 120 s guard just starting (importing
torch took 26 s of wall time for 2 s of CPU) at a load average of 20 on 2 cores, which
made those tests fail intermittently. A deadlocked worker uses no CPU, a slow one does;
so the guard fails only when the whole process tree has made no CPU progress for
``idle_seconds``, however long the test takes.
"""

from __future__ import annotations

import contextlib
import signal

import psutil

# CPU seconds the tree must use per check to count as progress: far above the main
# process's idle polling (torch checks its workers every 5 s, microseconds each), far
# below what one starting worker uses even at a 5 % share of a core.
PROGRESS_CPU_S = 0.02


def tree_cpu_seconds(process: psutil.Process) -> float:
    """User + system CPU of ``process``, its reaped children and its live descendants."""
    times = process.cpu_times()
    total = times.user + times.system + times.children_user + times.children_system
    for child in process.children(recursive=True):
        try:
            child_times = child.cpu_times()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue  # exited between listing and reading
        total += child_times.user + child_times.system
    return total


@contextlib.contextmanager
def no_hang(idle_seconds: int = 120, check_every: int = 5):
    """Raise TimeoutError in the main thread if the process tree stays idle for ``idle_seconds``."""
    me = psutil.Process()
    state = {"cpu": tree_cpu_seconds(me), "idle": 0}

    def _check(signum, frame):
        cpu = tree_cpu_seconds(me)
        if cpu - state["cpu"] >= PROGRESS_CPU_S:
            state["cpu"], state["idle"] = cpu, 0
        else:
            state["idle"] += check_every
            if state["idle"] >= idle_seconds:
                raise TimeoutError(f"no process of the test used CPU for {state['idle']} s: hung")
        signal.alarm(check_every)

    previous = signal.signal(signal.SIGALRM, _check)
    signal.alarm(check_every)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
