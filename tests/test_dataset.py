"""HippocampusSliceDataset on converted stores: contents, caches, and plain DataLoader workers."""

from __future__ import annotations

import gc
import itertools
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hang_guard import no_hang
from torch.utils.data import DataLoader

from hipseg import HippocampusSliceDataset
from hipseg.dataset import _shm_dir
from hipseg.errors import ConfigError
from hipseg.store import AXIS_NAMES, open_store


@pytest.fixture(scope="module")
def volumes(synth_store):
    images, labels = open_store(synth_store).read_all()
    return images.astype(np.float32), labels


@pytest.mark.parametrize("axis", AXIS_NAMES)
@pytest.mark.parametrize("context", [0, 2])
def test_unaugmented_items_are_the_store_slices(synth_store, volumes, axis, context):
    images, labels = volumes
    ds = HippocampusSliceDataset(synth_store, axis=axis, context=context, augment=False)
    store = open_store(synth_store)
    assert len(ds) == store.slice_table(axis).shape[0]
    a = AXIS_NAMES.index(axis)
    n_slices = store.roi_shape[a]
    for i in np.linspace(0, len(ds) - 1, 7).astype(int):
        item = ds[int(i)]
        assert item["image"].dtype == torch.float32 and item["label"].dtype == torch.int64
        assert tuple(item["image"].shape) == (2 * context + 1, *store.slice_shape(axis))
        assert tuple(item["label"].shape) == (1, *store.slice_shape(axis))
        v = store.case_ids.index(item["case_id"])
        s = item["slice"]
        assert item["axis"] == axis
        for c in range(2 * context + 1):
            sc = min(max(s + c - context, 0), n_slices - 1)
            np.testing.assert_array_equal(item["image"][c].numpy(), np.take(images[v], sc, axis=a))
        np.testing.assert_array_equal(item["label"][0].numpy(), np.take(labels[v], s, axis=a))


def test_mixed_axes_share_one_canvas(synth_store):
    ds = HippocampusSliceDataset(synth_store, axis=["axial", "coronal"], augment=False)
    store = open_store(synth_store)
    shapes = [store.slice_shape(a) for a in ("axial", "coronal")]
    canvas = (max(s[0] for s in shapes), max(s[1] for s in shapes))
    assert ds.image_shape == (1, *canvas)
    assert len(ds) == sum(store.slice_table(a).shape[0] for a in ("axial", "coronal"))
    assert {ds[0]["axis"], ds[len(ds) - 1]["axis"]} == {"axial", "coronal"}


def test_case_subset(synth_store):
    store = open_store(synth_store)
    chosen = store.case_ids[2:5]
    ds = HippocampusSliceDataset(synth_store, cases=chosen)
    assert len(ds) == 3 * store.roi_shape[2]
    assert {ds[i]["case_id"] for i in range(len(ds))} == set(chosen)
    with pytest.raises(ConfigError, match="unknown case"):
        HippocampusSliceDataset(synth_store, cases=["nope"])


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"axis": "transverse"}, "axis"),
        ({"cache": "disk"}, "cache"),
        ({"context": -1}, "context"),
    ],
)
def test_bad_settings_raise(synth_store, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        HippocampusSliceDataset(synth_store, **kwargs)


@pytest.mark.parametrize("budget_volumes", [None, 20])
def test_stream_and_ram_give_identical_samples(synth_store, monkeypatch, budget_volumes):
    ram = HippocampusSliceDataset(synth_store, axis=["axial", "coronal"], context=1, seed=5)
    stream = HippocampusSliceDataset(
        synth_store, axis=["axial", "coronal"], context=1, cache="stream", seed=5
    )
    if budget_volumes:  # a slab smaller than the store: volumes are evicted and read again
        volume_bytes = 3 * int(np.prod(open_store(synth_store).roi_shape))
        monkeypatch.setattr("hipseg.dataset.STREAM_CACHE_BYTES", budget_volumes * volume_bytes)
    sampler = ram.sampler(batch_size=16)
    for k in range(8):
        a = ram.make_batch(sampler.batch_rows(k), sampler.augment_rng(k))
        b = stream.make_batch(sampler.batch_rows(k), sampler.augment_rng(k))
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    assert torch.equal(ram[10]["image"], stream[10]["image"])


def test_epoch_changes_augmentation_reproducibly(synth_store):
    ds = HippocampusSliceDataset(synth_store, seed=1)
    first = ds[20]["image"]
    assert torch.equal(first, ds[20]["image"])
    ds.set_epoch(1)
    assert not torch.equal(first, ds[20]["image"])
    ds.set_epoch(0)
    assert torch.equal(first, ds[20]["image"])


def _cache_files(ds) -> list[Path]:
    return [
        p for p in _shm_dir().glob(Path(ds._cache_path).name + "*") if not p.name.endswith(".lock")
    ]


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_plain_dataloader_workers_share_one_ram_copy(synth_store, start_method):
    ds = HippocampusSliceDataset(synth_store, seed=2)
    assert _cache_files(ds) == []  # constructing it decodes nothing
    expected = [ds[i] for i in range(6)]
    path = ds._cache_path
    os.unlink(path)  # the in-process reads above filled it; let the workers fill it again
    # No wall-clock timeout (torch still raises at once if a worker dies): spawned workers can
    # take minutes to start on a loaded machine. The watchdog fails only a real hang.
    loader = DataLoader(ds, batch_size=3, num_workers=2, multiprocessing_context=start_method)
    batches = []
    with no_hang():
        for i, batch in enumerate(loader):
            batches.append(batch)
            if i == 1:
                break
    assert [Path(p).name for p in _cache_files(ds)] == [Path(path).name]
    images = torch.cat([b["image"] for b in batches])
    assert torch.equal(images, torch.stack([e["image"] for e in expected]))
    assert sum((b["case_id"] for b in batches), []) == [e["case_id"] for e in expected]
    del loader, batches
    del ds
    gc.collect()
    assert not os.path.exists(path)


def test_cache_files_of_dead_processes_are_swept(synth_store):
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()  # its pid is now free: a process that died without cleaning up
    stale = _shm_dir() / f"hipseg-cache-{process.pid}-0123456789ab.bin"
    stale.write_bytes(b"left behind")
    HippocampusSliceDataset(synth_store)
    assert not stale.exists()


def test_sampler_method_oversamples(synth_store):
    ds = HippocampusSliceDataset(synth_store, foreground_fraction=1.0, augment=False)
    rows = np.fromiter(itertools.islice(ds.sampler(batch_size=8), 200), int)
    assert ds.index.foreground[rows].all()


@pytest.mark.realdata
def test_real_store_slices(real_store):
    ds = HippocampusSliceDataset(real_store, axis=["axial", "sagittal"], context=1)
    store = open_store(real_store)
    assert len(ds) == sum(store.slice_table(a).shape[0] for a in ("axial", "sagittal"))
    sampler = ds.sampler(batch_size=64)
    batch = ds.make_batch(sampler.batch_rows(0), sampler.augment_rng(0))
    assert batch["image"].shape[1] == 3
    assert set(torch.unique(batch["label"]).tolist()) <= {0, 1, 2}
    assert (batch["label"].flatten(1) > 0).any(dim=1).float().mean() >= 1 / 3


@pytest.mark.parametrize("axis", ["axial", "coronal", "sagittal"])
def test_only_the_left_right_axis_is_ever_flipped(synth_store, axis):
    """Anterior and posterior must stay where they are: never flip A-P or S-I."""
    from hipseg.augment import AugmentConfig

    flip_only = AugmentConfig(flip=1.0, rotate_degrees=0.0, elastic_alpha=0.0)
    flipped = HippocampusSliceDataset(synth_store, axis=axis, augment=flip_only, seed=1)
    plain = HippocampusSliceDataset(synth_store, axis=axis, augment=False, seed=1)
    for index in range(0, len(plain), max(1, len(plain) // 10)):
        a, b = flipped[index]["image"][0].numpy(), plain[index]["image"][0].numpy()
        expected = b if axis == "sagittal" else b[::-1, :]  # H is left-right for axial and coronal
        np.testing.assert_array_equal(a, expected)


@pytest.mark.parametrize("context", [0, 1])
def test_getitems_equals_item_by_item(synth_store, context):
    ds = HippocampusSliceDataset(synth_store, axis=["axial", "sagittal"], context=context, seed=3)
    ds.set_epoch(2)
    indices = [5, 0, len(ds) - 1, 5, -2]
    batch = ds.__getitems__(indices)
    for i, got in zip(indices, batch, strict=True):
        want = ds[i]
        assert set(got) == set(want)
        torch.testing.assert_close(got["image"], want["image"], rtol=0, atol=0)
        torch.testing.assert_close(got["label"], want["label"], rtol=0, atol=0)
        assert (got["case_id"], got["axis"], got["slice"]) == (
            want["case_id"], want["axis"], want["slice"])
    with pytest.raises(IndexError):
        ds.__getitems__([0, len(ds)])


def test_plain_dataloader_batches_equal_items(synth_store):
    """DataLoader with a batch sampler calls __getitems__; default collate stacks the views."""
    ds = HippocampusSliceDataset(synth_store, axis="axial", seed=1)
    loader = DataLoader(ds, batch_size=4, shuffle=False, num_workers=0)
    batch = next(iter(loader))
    assert batch["image"].shape == (4, *ds.image_shape)
    want = torch.stack([ds[i]["image"] for i in range(4)])
    torch.testing.assert_close(batch["image"], want, rtol=0, atol=0)
    assert batch["case_id"] == [ds[i]["case_id"] for i in range(4)]
