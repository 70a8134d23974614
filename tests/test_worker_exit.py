"""Spawned DataLoader workers exit cleanly after an early break (hipseg.worker_exit)."""

from __future__ import annotations

import gc
import multiprocessing
import signal
import threading

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from hipseg.worker_exit import FEEDER_THREAD_NAME, guard_worker_exit, join_queue_feeders


class _Guarded(Dataset):
    """Items whose collate builds a large ordinary tensor: freeing it takes long enough in the
    queue feeder thread that an unguarded spawned worker, ending meanwhile, aborts in nearly
    every round (10 of 12 workers in 6 rounds, docs/reliability.md)."""

    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> int:
        guard_worker_exit()  # what the hipseg datasets do on their first use in a process
        return i


def _big_batch(batch: list[int]) -> torch.Tensor:
    return torch.ones(32 << 20, dtype=torch.uint8)


def test_spawned_workers_do_not_abort_after_an_early_break():
    aborted = []
    for _ in range(3):
        loader = DataLoader(_Guarded(), batch_size=1, num_workers=2, collate_fn=_big_batch,
                            multiprocessing_context="spawn")
        iterator = iter(loader)
        next(iterator)
        workers = list(iterator._workers)
        del iterator  # shuts the workers down while they still send prefetched batches
        gc.collect()
        aborted += [w.exitcode for w in workers if w.exitcode == -signal.SIGABRT]
    assert aborted == []


def test_the_guard_is_inert_outside_workers(monkeypatch):
    import atexit

    registered = []
    monkeypatch.setattr(atexit, "register", registered.append)
    guard_worker_exit()  # the main process of a test: not a DataLoader worker
    assert registered == []


def test_joining_waits_for_a_queue_feeder_to_finish():
    """The name is CPython's, and joining returns once the feeder has sent everything."""
    queue = multiprocessing.get_context("spawn").Queue()
    queue.put(torch.zeros(1 << 20))  # starts the feeder thread
    feeders = [t for t in threading.enumerate() if t.name == FEEDER_THREAD_NAME]
    assert feeders, "multiprocessing no longer names its feeder thread " + FEEDER_THREAD_NAME
    assert torch.equal(queue.get(timeout=60), torch.zeros(1 << 20))
    queue.close()  # the feeder ends after sending what it holds
    join_queue_feeders(timeout=30)
    assert not any(t.is_alive() for t in feeders)


@pytest.mark.parametrize("kind", ["slices", "patches"])
def test_the_datasets_install_the_guard(synth_store, kind, monkeypatch):
    import hipseg.dataset
    from hipseg import HippocampusPatchDataset, HippocampusSliceDataset

    calls = []
    monkeypatch.setattr(hipseg.dataset, "guard_worker_exit", lambda: calls.append(1))
    dataset_type = HippocampusSliceDataset if kind == "slices" else HippocampusPatchDataset
    ds = dataset_type(synth_store, seed=1)
    ds[0], ds[1]
    assert calls == [1]  # once per process, when its volume source is opened
