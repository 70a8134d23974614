"""SliceLoader: batches, determinism across workers, resume, epochs, failures that never hang."""

from __future__ import annotations

import os
import shutil
import signal
from collections import Counter

import numpy as np
import pytest
import torch
from hang_guard import no_hang

from hipseg.errors import WorkerError
from hipseg.loader import SliceLoader
from hipseg.store import open_store


def _take(loader, n):
    out = []
    with no_hang():
        for batch in loader:
            out.append(batch)
            if len(out) == n:
                break
    return out


def _same(a, b):
    return (
        torch.equal(a["image"], b["image"])
        and torch.equal(a["label"], b["label"])
        and a["case_id"] == b["case_id"]
        and torch.equal(a["slice"], b["slice"])
    )


def test_batch_structure(synth_store):
    loader = SliceLoader(synth_store, batch_size=8, context=1, num_workers=0)
    (batch,) = _take(loader, 1)
    H, W = open_store(synth_store).slice_shape("axial")
    assert batch["image"].shape == (8, 3, H, W) and batch["image"].dtype == torch.float32
    assert batch["label"].shape == (8, 1, H, W) and batch["label"].dtype == torch.int64
    assert batch["slice"].shape == (8,) and batch["slice"].dtype == torch.int64
    assert len(batch["case_id"]) == len(batch["axis"]) == 8
    assert set(torch.unique(batch["label"]).tolist()) <= {0, 1, 2}
    assert loader.image_shape == (3, H, W)


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_workers_give_the_in_process_stream(synth_store, start_method):
    reference = _take(SliceLoader(synth_store, batch_size=8, num_workers=0, seed=4), 5)
    with SliceLoader(
        synth_store, batch_size=8, num_workers=2, seed=4, start_method=start_method
    ) as loader:
        batches = _take(loader, 5)
    assert all(_same(a, b) for a, b in zip(reference, batches, strict=True))


def test_start_batch_resumes_the_stream_and_iteration_continues(synth_store):
    with SliceLoader(
        synth_store, batch_size=4, num_workers=1, seed=9, start_method="fork"
    ) as loader:
        first = _take(loader, 3)
        assert loader.position == 3
        more = _take(loader, 3)  # a new pass continues after the last batch yielded
    resumed = _take(SliceLoader(synth_store, batch_size=4, num_workers=0, seed=9, start_batch=3), 3)
    assert all(_same(a, b) for a, b in zip(more, resumed, strict=True))
    assert not _same(first[0], more[0])


def test_stream_and_ram_caches_give_identical_batches(synth_store):
    batches = {}
    for cache in ("ram", "stream"):
        with SliceLoader(
            synth_store, batch_size=8, num_workers=1, cache=cache, context=1, start_method="fork"
        ) as loader:
            batches[cache] = _take(loader, 3)
    assert all(_same(a, b) for a, b in zip(batches["ram"], batches["stream"], strict=True))


def test_epoch_mode_covers_every_slice_once_across_ranks(synth_store):
    store = open_store(synth_store)
    expected = store.slice_table("coronal").shape[0]
    seen = Counter()
    for rank in range(2):
        loader = SliceLoader(
            synth_store,
            batch_size=50,
            axis="coronal",
            num_workers=0,
            mode="epoch",
            rank=rank,
            world_size=2,
            augment=False,
        )
        loader.set_epoch(3)
        batches = _take(loader, 10**6)
        assert len(batches) == len(loader)
        for b in batches:
            seen.update(zip(b["case_id"], b["slice"].tolist(), strict=True))
    assert len(seen) == expected and set(seen.values()) == {1}


def test_epoch_start_batch_skips_into_the_first_pass_only(synth_store):
    full = SliceLoader(synth_store, batch_size=32, num_workers=0, mode="epoch")
    late = SliceLoader(synth_store, batch_size=32, num_workers=0, mode="epoch", start_batch=2)
    assert len(late) == len(full) - 2
    all_batches, tail = _take(full, 100), _take(late, 100)
    assert all(_same(a, b) for a, b in zip(all_batches[2:], tail, strict=True))
    assert len(_take(late, 100)) == len(all_batches)  # the next pass is whole


def test_infinite_loader_has_no_length_and_batches_survive_slot_reuse(synth_store):
    loader = SliceLoader(synth_store, batch_size=4, num_workers=1, start_method="fork", prefetch=1)
    with pytest.raises(TypeError):
        len(loader)
    kept = _take(loader, 12)  # 3 ring slots, each rewritten 3 times while the batches are kept
    again = _take(SliceLoader(synth_store, batch_size=4, num_workers=0), 12)
    assert all(_same(a, b) for a, b in zip(kept, again, strict=True))
    loader.close()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback without CUDA")
def test_pin_memory_without_cuda_warns_and_still_loads(synth_store):
    with pytest.warns(UserWarning, match="pin_memory"):
        loader = SliceLoader(synth_store, batch_size=4, num_workers=1, pin_memory=True)
    (batch,) = _take(loader, 1)
    assert batch["image"].shape[0] == 4 and not batch["image"].is_pinned()
    loader.close()


def test_dropping_the_loader_removes_its_shared_files(synth_store):
    loader = SliceLoader(synth_store, batch_size=4, num_workers=2, start_method="fork")
    _take(loader, 2)
    files = [loader.dataset._cache_path, loader._ring.path]
    assert all(os.path.exists(f) for f in files)
    del loader  # no reference cycle: freed at once, workers stopped, files removed
    assert not any(os.path.exists(f) for f in files)


def _corrupt_copy(store, tmp_path):
    bad = tmp_path / "bad.zarr"
    shutil.copytree(store, bad)
    shard = next(p for p in (bad / "images").rglob("*") if p.is_file() and p.name != "zarr.json")
    shard.write_bytes(np.random.default_rng(0).bytes(shard.stat().st_size))
    return bad


@pytest.mark.parametrize("cache", ["ram", "stream"])
def test_failing_worker_raises_in_main_with_its_cause(synth_store, tmp_path, cache):
    bad = _corrupt_copy(synth_store, tmp_path)
    loader = SliceLoader(bad, batch_size=4, num_workers=2, cache=cache, start_method="fork")
    with pytest.raises(WorkerError, match="checksum") as info:
        _take(loader, 2)
    assert info.value.__cause__ is not None and str(bad) in str(info.value)
    loader.close()


def test_killed_worker_raises_instead_of_hanging(synth_store):
    loader = SliceLoader(synth_store, batch_size=4, num_workers=2, start_method="fork", timeout=60)
    with no_hang():
        iterator = iter(loader)
        next(iterator)
        # torch's SIGCHLD handler may raise its own RuntimeError at any point after the kill;
        # the loader wraps what surfaces in next() as WorkerError (a RuntimeError too).
        with pytest.raises(RuntimeError, match="(?i)worker"):
            for worker in loader._loader._iterator._workers:
                os.kill(worker.pid, signal.SIGKILL)
            for _ in range(100):
                next(iterator)
    loader.close()


@pytest.mark.realdata
def test_real_store_batches(real_store):
    with SliceLoader(real_store, batch_size=32, axis="axial", num_workers=2, context=1) as loader:
        batches = _take(loader, 4)
    fg = torch.cat([(b["label"].flatten(1) > 0).any(dim=1) for b in batches]).float().mean()
    assert fg >= 1 / 3
    assert all(set(torch.unique(b["label"]).tolist()) <= {0, 1, 2} for b in batches)
    assert batches[0]["image"].shape[1:] == (3, *open_store(real_store).slice_shape("axial"))


def test_the_hang_guard_fails_a_process_tree_that_uses_no_cpu():
    """The guard the worker tests rely on: an idle wait (a deadlock's signature) is stopped."""
    import time

    with pytest.raises(TimeoutError, match="hung"), no_hang(idle_seconds=2, check_every=1):
        time.sleep(60)
