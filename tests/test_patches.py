"""HippocampusPatchDataset and PatchLoader: contents, foreground placement, determinism, resume."""

from __future__ import annotations

import itertools
import shutil

import numpy as np
import pytest
import torch
import zarr
from torch.utils.data import DataLoader

from hipseg import HippocampusPatchDataset
from hipseg.errors import ConfigError
from hipseg.loader import PatchLoader
from hipseg.store import FOREGROUND, foreground_samples, open_store


@pytest.fixture(scope="module")
def volumes(synth_store):
    images, labels = open_store(synth_store).read_all()
    return images.astype(np.float32), labels


def test_unaugmented_whole_crops_are_the_store_crops(synth_store, volumes):
    images, labels = volumes
    ds = HippocampusPatchDataset(synth_store, augment=False)
    store = open_store(synth_store)
    assert len(ds) == store.n_volumes and ds.image_shape == (1, *store.roi_shape)
    for i in (0, 5, len(ds) - 1):
        item = ds[i]
        assert item["image"].dtype == torch.float32 and item["label"].dtype == torch.int64
        assert item["case_id"] == store.case_ids[i]
        np.testing.assert_array_equal(item["image"][0].numpy(), images[i])
        np.testing.assert_array_equal(item["label"][0].numpy(), labels[i])


@pytest.mark.parametrize("cache", ["ram", "stream"])
def test_small_patches_are_crops_at_their_origin_and_foreground_centred(synth_store, volumes, cache):
    images, labels = volumes
    patch = (12, 16, 8)
    ds = HippocampusPatchDataset(synth_store, patch_size=patch, augment=False, cache=cache,
                                 foreground_fraction=1.0, seed=2)
    for item in ds.__getitems__(range(len(ds))):
        v = open_store(synth_store).case_ids.index(item["case_id"])
        o = item["origin"].numpy()
        box = tuple(slice(a, a + p) for a, p in zip(o, patch, strict=True))
        np.testing.assert_array_equal(item["image"][0].numpy(), images[v][box])
        np.testing.assert_array_equal(item["label"][0].numpy(), labels[v][box])
        if labels[v].any():
            assert item["label"].sum() > 0, "a foreground-centred patch holds no label"


def test_augmented_labels_stay_within_classes_and_items_are_deterministic(synth_store):
    ds = HippocampusPatchDataset(synth_store, patch_size=(16, 16, 16), seed=7)
    again = HippocampusPatchDataset(synth_store, patch_size=(16, 16, 16), seed=7, cache="stream")
    for i in range(4):
        a, b = ds[i], again[i]
        assert set(a["label"].unique().tolist()) <= {0, 1, 2}
        torch.testing.assert_close(a["image"], b["image"], rtol=0, atol=0)
        torch.testing.assert_close(a["label"], b["label"], rtol=0, atol=0)
    ds.set_epoch(1)
    assert not torch.equal(ds[0]["image"], again[0]["image"]), "a new epoch draws anew"


def test_getitems_equals_item_by_item(synth_store):
    ds = HippocampusPatchDataset(synth_store, patch_size=(16, 20, 12), seed=3)
    ds.set_epoch(4)
    indices = [3, 0, 3, -1]
    for i, got in zip(indices, ds.__getitems__(indices), strict=True):
        want = ds[i]
        torch.testing.assert_close(got["image"], want["image"], rtol=0, atol=0)
        torch.testing.assert_close(got["label"], want["label"], rtol=0, atol=0)
        assert got["case_id"] == want["case_id"] and torch.equal(got["origin"], want["origin"])
    with pytest.raises(IndexError):
        ds.__getitems__([len(ds)])


def test_plain_dataloader_with_workers_yields_5d_batches(synth_store):
    ds = HippocampusPatchDataset(synth_store, augment=True)
    loader = DataLoader(ds, batch_size=4, num_workers=2, shuffle=True)
    batches = list(itertools.islice(loader, 2))
    for batch in batches:
        assert batch["image"].shape == (4, *ds.image_shape) and batch["image"].dtype == torch.float32
        assert set(batch["label"].unique().tolist()) <= {0, 1, 2}
        assert len(batch["case_id"]) == 4


def test_loader_resumes_exactly_and_workers_do_not_change_batches(synth_store):
    options = dict(batch_size=3, patch_size=(16, 16, 16), seed=5)
    with PatchLoader(synth_store, num_workers=0, **options) as loader:
        stream = [b for b, _ in zip(loader, range(5), strict=False)]
    with PatchLoader(synth_store, num_workers=2, start_batch=3, start_method="spawn",
                     **options) as resumed:
        tail = [b for b, _ in zip(resumed, range(2), strict=False)]
    for want, got in zip(stream[3:], tail, strict=True):
        torch.testing.assert_close(got["image"], want["image"], rtol=0, atol=0)
        torch.testing.assert_close(got["label"], want["label"], rtol=0, atol=0)
        assert got["case_id"] == want["case_id"]
        torch.testing.assert_close(got["origin"], want["origin"])


def test_epoch_mode_shards_ranks_without_overlap(synth_store):
    seen = []
    for rank in range(2):
        loader = PatchLoader(synth_store, batch_size=2, num_workers=0, mode="epoch", rank=rank,
                             world_size=2, augment=False, seed=1)
        seen.append([c for batch in loader for c in batch["case_id"]])
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(open_store(synth_store).case_ids)


def test_stores_without_the_foreground_table_compute_it(synth_store, tmp_path):
    store = open_store(synth_store)
    recorded = store.foreground_table()
    assert recorded.shape[1] == 5 and recorded.shape[0] > 0
    old = tmp_path / "old.zarr"
    shutil.copytree(synth_store, old)
    del zarr.open_group(str(old), mode="r+")[FOREGROUND]
    np.testing.assert_array_equal(open_store(old).foreground_table(), recorded)
    labels = store.read_all()[1]
    for v, c, x, y, z in recorded[:50]:
        assert labels[v, x, y, z] == c
    assert foreground_samples(np.zeros((3, 3, 3), np.uint8), 3).shape == (0, 4)


def test_bad_configurations_are_refused(synth_store):
    roi = open_store(synth_store).roi_shape
    with pytest.raises(ConfigError, match="patch_size"):
        HippocampusPatchDataset(synth_store, patch_size=(roi[0] + 1, 8, 8))
    with pytest.raises(ConfigError, match="cache"):
        HippocampusPatchDataset(synth_store, cache="disk")
    with pytest.raises(ConfigError, match="foreground_fraction"):
        HippocampusPatchDataset(synth_store, foreground_fraction=2.0)
