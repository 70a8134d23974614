"""A clean exit for spawned DataLoader workers.

A torch DataLoader worker sends each batch through a ``multiprocessing.Queue``, whose
*feeder thread* (a daemon thread) pickles it and then drops the last reference to its
tensors: the tensors are freed in that thread, inside torch's C++ code, which releases the
GIL while it unmaps their shared memory. When the loader is shut down early (a ``break``
out of the loop), the worker leaves its loop while batches are still in flight and
ends. A *forked* worker ends with ``os._exit``; a *spawned* one runs the interpreter's
normal finalization, and CPython 3.11 ends any daemon thread that asks for the GIL
after finalization has begun with ``pthread_exit``. Its stack unwinding through torch's
``noexcept`` C++ frame calls ``std::terminate``: "terminate called without an active
exception", SIGABRT. The core dump shows the thread in ``THPVariable_dealloc ->
PyEval_RestoreThread -> pthread_exit`` (docs/reliability.md, "The intermittent test").

The fix is to let the feeder finish before finalization starts: ``atexit`` handlers run
while daemon threads still run normally, so one that joins the queue feeder threads
(bounded: a feeder blocked on a full pipe never enters C++ again) removes the race.
"""

from __future__ import annotations

import atexit
import os
import threading

import torch.utils.data

# Python's multiprocessing names the thread that writes a Queue's items to its pipe.
FEEDER_THREAD_NAME = "QueueFeederThread"
# Long enough to pickle and send a prefetched batch on a loaded machine; short against the
# 5 s torch's loader waits for each worker (MP_STATUS_CHECK_INTERVAL) before killing it.
FEEDER_JOIN_SECONDS = 2.0

_registered_pid = -1


def join_queue_feeders(timeout: float = FEEDER_JOIN_SECONDS) -> None:
    """Wait for this process's queue feeder threads, at most ``timeout`` seconds for each
    (a DataLoader worker has one: the feeder of its data queue)."""
    for thread in threading.enumerate():
        if thread.name == FEEDER_THREAD_NAME and thread.is_alive():
            thread.join(timeout)


def guard_worker_exit() -> None:
    """In a DataLoader worker process, join the queue feeders at exit (once per process).

    A no-op outside DataLoader workers; harmless in forked workers, which never run
    ``atexit`` handlers.
    """
    global _registered_pid
    if _registered_pid == os.getpid() or torch.utils.data.get_worker_info() is None:
        return
    atexit.register(join_queue_feeders)
    _registered_pid = os.getpid()
