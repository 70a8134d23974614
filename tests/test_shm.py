"""Containers with little shared memory: a 16 MB /dev/shm in a private mount namespace, never a SIGBUS."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from hipseg import shm
from hipseg.convert import convert


def _namespace_error() -> str | None:
    """Why a private mount namespace with its own /dev/shm cannot be made here, or None."""
    probe = "mount -t tmpfs -o size=16m tmpfs /dev/shm && test -w /dev/shm"
    try:
        result = subprocess.run(["unshare", "-m", "sh", "-c", probe], capture_output=True, text=True,
                                timeout=30)
    except FileNotFoundError:
        return "unshare(1) is not installed"
    if result.returncode != 0:
        return f"cannot mount a private /dev/shm (needs root or CAP_SYS_ADMIN): {result.stderr.strip()}"
    return None


def _in_small_shm(code: str, cwd: Path) -> subprocess.CompletedProcess:
    reason = _namespace_error()
    if reason:
        pytest.skip(reason)
    script = cwd / "inside.py"
    script.write_text(code)
    command = f"mount -t tmpfs -o size=16m tmpfs /dev/shm && exec {sys.executable} {script}"
    env = {k: v for k, v in os.environ.items() if k != shm.CACHE_DIR_ENV}
    return subprocess.run(["unshare", "-m", "sh", "-c", command], capture_output=True, text=True,
                          timeout=300, cwd=cwd, env=env)


@pytest.fixture(scope="module")
def big_store(synth_dataset, tmp_path_factory) -> Path:
    """8 volumes of 96^3: a 21 MB RAM cache, more than a 16 MB /dev/shm holds."""
    out = tmp_path_factory.mktemp("big") / "big.zarr"
    convert(synth_dataset, out, roi="96x96x96", workers=1, progress=False)
    return out


def test_cache_folder_falls_back_when_shm_is_too_small(monkeypatch, tmp_path):
    monkeypatch.delenv(shm.CACHE_DIR_ENV, raising=False)
    monkeypatch.setattr(shm, "free_bytes", lambda folder: 1 << 20 if folder == shm.SHM else 1 << 40)
    with pytest.warns(UserWarning, match="--shm-size"):
        assert shm.cache_folder(100 << 20, "test cache") != shm.SHM
    monkeypatch.setenv(shm.CACHE_DIR_ENV, str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert shm.cache_folder(100 << 20, "test cache") == tmp_path


def test_allocate_raises_instead_of_sigbus(tmp_path, monkeypatch):
    def full(fd, offset, length):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(shm.CacheSpaceError, match="shm-size"):
        shm.allocate(tmp_path / "cache.bin", 1 << 20)
    assert not (tmp_path / "cache.bin").exists()


def test_dataloader_with_two_workers_in_16mb_shm(big_store, tmp_path):
    code = f"""
import warnings, torch
from hipseg.dataset import HippocampusSliceDataset
from hipseg.store import open_store
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    ds = HippocampusSliceDataset({str(big_store)!r}, augment=False)
print("cache_file", ds._cache_path)
print("warned", [str(w.message) for w in caught])
loader = torch.utils.data.DataLoader(ds, batch_size=8, num_workers=2, shuffle=False)
labelled = sum(int((batch["label"] > 0).sum()) for batch in loader)
store = open_store({str(big_store)!r})
print("labelled", labelled, int((store.labels[...] > 0).sum()))
"""
    result = _in_small_shm(code, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines())
    assert not lines["cache_file"].startswith("/dev/shm")
    assert "--shm-size" in lines["warned"]
    got, expected = lines["labelled"].split()
    assert got == expected  # every labelled voxel of every axial slice came through


def test_training_in_16mb_shm(big_store, tmp_path):
    code = f"""
import sys
from hipseg.cli import main
sys.exit(main(["train", {str(big_store)!r}, "--out", {str(tmp_path / "run")!r}, "--steps", "3",
               "--batch-size", "4", "--workers", "2", "--threads", "1", "--channels", "4,8",
               "--strides", "2", "--res-units", "1", "--groups", "2", "--val-every", "3", "--quiet"]))
"""
    result = _in_small_shm(code, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "does not fit in shared memory" in result.stderr and "--shm-size" in result.stderr
    assert (tmp_path / "run" / "run.json").exists()


def test_stream_fallback_when_nowhere_has_room(big_store, monkeypatch):
    from hipseg.dataset import HippocampusSliceDataset

    monkeypatch.delenv(shm.CACHE_DIR_ENV, raising=False)
    monkeypatch.setattr(shm, "free_bytes", lambda folder: 0)
    with pytest.warns(UserWarning, match="reading volumes from the store"):
        ds = HippocampusSliceDataset(big_store, augment=False)
    assert ds.cache == "stream"
    assert np.isfinite(ds[0]["image"].numpy()).all()


def test_local_ranks_of_one_torchrun_job_share_one_cache_file(synth_store, monkeypatch):
    """Under torchrun, the ranks of a node map one RAM cache; local rank 0 alone removes it."""
    import gc

    from hipseg.dataset import HippocampusSliceDataset

    monkeypatch.delenv(shm.CACHE_DIR_ENV, raising=False)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test-job")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    rank0 = HippocampusSliceDataset(synth_store, augment=False)
    monkeypatch.setenv("LOCAL_RANK", "1")
    rank1 = HippocampusSliceDataset(synth_store, augment=False, rank=1, world_size=2)
    assert rank0._cache_path == rank1._cache_path
    first = rank1[0]  # rank 1 happens to fill it
    filled = os.stat(rank0._cache_path).st_mtime_ns
    np.testing.assert_array_equal(rank0[0]["label"].numpy(), first["label"].numpy())
    assert os.stat(rank0._cache_path).st_mtime_ns == filled  # mapped, not filled again
    path = rank0._cache_path
    del rank1, first
    gc.collect()
    assert os.path.exists(path)
    del rank0
    gc.collect()
    assert not os.path.exists(path)
