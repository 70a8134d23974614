"""``HippocampusPatchDataset``: augmented 3D patches of a store as MONAI-style dicts.

The 3D counterpart of ``hipseg.dataset``: the same volume sources (``cache="ram"``,
one shared read-only file; ``cache="stream"``, a per-worker slab read from the
store), the same seeding from (seed, rank, epoch, index), and one fused kernel
call per batch (``hipseg._kernels3d``). A patch is the whole ROI crop by default;
a smaller ``patch_size`` is placed at random, or, for a ``foreground_fraction``
of the samples, centred on a labelled voxel taken from the store's foreground
table (recorded at conversion, as nnU-Net records class locations), the class
chosen uniformly among those the volume holds. Label arrays are never scanned
per sample.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.utils.data

from hipseg.augment import AugmentConfig
from hipseg.augment3d import PatchAugmenter, PatchParams, resolve_patch_config, warmup
from hipseg.dataset import _VolumeSourceMixin
from hipseg.errors import ConfigError
from hipseg.sampler import MODES, _rng, select_volumes
from hipseg.store import HippocampusStore, open_store
from hipseg.streams import SampleStreams, sample_keys

# Tags that keep patch streams apart from the slice streams (hipseg.sampler uses 1-4).
_TAG_PATCH_ITEM, _TAG_PATCH_PERMUTATION, _TAG_PATCH_INFINITE, _TAG_PATCH_EPOCH = 11, 12, 13, 14
_DRAW_ROWS, _DRAW_AUGMENT = 0, 1
# A RAS crop laid out as stored: volume v of the kernel is store volume v, C-ordered (X, Y, Z).
_NATURAL = ("sagittal",)


def foreground_pools(
    table: np.ndarray, volumes: np.ndarray, n_classes: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Foreground voxels grouped by (selected volume, class): (starts (V, K), counts (V, K), xyz (F, 3)).

    ``table`` is the store's (volume, class, x, y, z) table; rows of volumes not
    selected are dropped and volumes renumbered to their position in ``volumes``.
    """
    lookup = np.full(int(max(volumes.max(initial=0), table[:, 0].max(initial=0))) + 1, -1, np.int64)
    lookup[volumes] = np.arange(volumes.size)
    local = lookup[table[:, 0]]
    keep = (local >= 0) & (table[:, 1] >= 1) & (table[:, 1] < n_classes)
    local, cls, xyz = local[keep], table[keep, 1] - 1, table[keep, 2:5]
    order = np.lexsort((cls, local))
    local, cls, xyz = local[order], cls[order], xyz[order]
    K = n_classes - 1
    counts = np.zeros((volumes.size, K), np.int64)
    np.add.at(counts, (local, cls), 1)
    starts = (np.cumsum(counts.reshape(-1)) - counts.reshape(-1)).reshape(volumes.size, K)
    return starts, counts, np.ascontiguousarray(xyz, np.int64)


class PatchSampler(torch.utils.data.Sampler):
    """Volume indices for each batch; also a torch ``Sampler`` over single indices.

    Infinite mode: batch ``k`` is drawn uniformly from the volumes by (seed, rank, k)
    alone. Epoch mode: each volume once per epoch, shuffled by (seed, epoch), split
    across ranks as ``perm[rank::world_size]``.
    """

    def __init__(self, n_volumes: int, batch_size: int = 2, seed: int = 0, rank: int = 0,
                 world_size: int = 1, mode: str = "infinite", start_batch: int = 0) -> None:
        if mode not in MODES:
            raise ConfigError(f"mode must be one of {MODES}, got {mode!r}")
        if batch_size < 1 or n_volumes < 1:
            raise ConfigError(f"batch_size and volumes must be at least 1, got {batch_size}, {n_volumes}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(
                f"rank must be within [0, world_size); got rank={rank}, world_size={world_size}"
            )
        if seed < 0 or start_batch < 0:
            raise ConfigError(f"seed and start_batch must be at least 0, got {seed}, {start_batch}")
        self.n_volumes, self.batch_size = int(n_volumes), int(batch_size)
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.mode, self.start_batch, self.epoch = mode, int(start_batch), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def shard(self, epoch: int) -> np.ndarray:
        perm = _rng(self.seed, _TAG_PATCH_PERMUTATION, epoch).permutation(self.n_volumes)
        return perm[self.rank :: self.world_size]

    def batches_per_epoch(self) -> int:
        return math.ceil(len(range(self.rank, self.n_volumes, self.world_size)) / self.batch_size)

    def batch_rows(self, k: int, epoch: int = 0) -> np.ndarray:
        if self.mode == "epoch":
            start = k * self.batch_size
            return self.shard(epoch)[start : start + self.batch_size].astype(np.int64)
        rng = _rng(self.seed, _TAG_PATCH_INFINITE, self.rank, k, _DRAW_ROWS)
        return rng.integers(0, self.n_volumes, self.batch_size).astype(np.int64)

    def augment_rng(self, k: int, epoch: int = 0) -> np.random.Generator:
        if self.mode == "epoch":
            return _rng(self.seed, _TAG_PATCH_EPOCH, self.rank, epoch, k)
        return _rng(self.seed, _TAG_PATCH_INFINITE, self.rank, k, _DRAW_AUGMENT)

    def __iter__(self) -> Iterator[int]:
        if self.mode == "epoch":
            yield from self.shard(self.epoch)[self.start_batch * self.batch_size :].tolist()
            return
        k = self.start_batch
        while True:
            yield from self.batch_rows(k).tolist()
            k += 1

    def __len__(self) -> int:
        if self.mode != "epoch":
            raise TypeError("an infinite PatchSampler has no length; use mode='epoch'")
        n = len(range(self.rank, self.n_volumes, self.world_size))
        return max(0, n - self.start_batch * self.batch_size)


class HippocampusPatchDataset(_VolumeSourceMixin, torch.utils.data.Dataset):
    """Augmented 3D patches of a converted store, as MONAI-style dicts.

    Parameters
    ----------
    store : path or HippocampusStore
    patch_size : (int, int, int), optional
        Patch shape in voxels, at most the ROI along each axis; None: the whole ROI crop.
    augment : bool, dict or AugmentConfig
        Flip (left-right), rotation about three axes, elastic field, optional
        scaling (``hipseg.augment3d.PatchAugmentConfig``).
    cases : list of case ids, optional
    foreground_fraction : float
        Share of patches (when smaller than the ROI) centred on a labelled voxel.
    seed, rank, world_size : int
    cache : 'ram' or 'stream'
        As for ``HippocampusSliceDataset`` (the same volume sources and RAM-cache folders).
    parallel : bool
        Use the multi-threaded kernel (Numba threads) instead of the serial one.
    cache_dir, storage_options
        As for ``HippocampusSliceDataset``.

    ``ds[i]`` is a patch of selected volume ``i`` with placement and augmentation
    drawn from (seed, rank, epoch, i): ``{"image": float32 (1, P0, P1, P2),
    "label": int64 (1, P0, P1, P2), "case_id": str, "origin": int64 (3,)}``;
    ``origin`` is the ROI voxel of the unaugmented patch's corner.
    """

    def __init__(
        self,
        store: str | Path | HippocampusStore,
        patch_size: Sequence[int] | None = None,
        augment: bool | AugmentConfig | dict = True,
        cases: Sequence[str] | None = None,
        foreground_fraction: float = 1.0 / 3.0,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        cache: str = "ram",
        parallel: bool = False,
        cache_dir: str | None = None,
        storage_options: dict | None = None,
    ) -> None:
        opened = store if isinstance(store, HippocampusStore) else open_store(store, storage_options)
        self.store_path = opened.location
        self.storage_options = opened.storage_options or None
        if not 0.0 <= foreground_fraction <= 1.0:
            raise ConfigError(f"foreground_fraction must be within [0, 1], got {foreground_fraction!r}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(
                f"rank must be within [0, world_size); got rank={rank}, world_size={world_size}"
            )
        self.roi = tuple(int(s) for s in opened.roi_shape)
        patch = self.roi if patch_size is None else tuple(int(p) for p in patch_size)
        if len(patch) != 3 or any(not 1 <= p <= r for p, r in zip(patch, self.roi, strict=True)):
            raise ConfigError(f"patch_size must be 3 sizes within 1..ROI {self.roi}, got {patch_size!r}")
        self.patch_size: tuple[int, int, int] = patch  # type: ignore[assignment]
        self.cache, self.seed, self.foreground_fraction = cache, int(seed), float(foreground_fraction)
        self.rank, self.world_size, self.epoch = int(rank), int(world_size), 0
        self.augment_config = resolve_patch_config(augment)
        self.class_names = tuple(opened.class_names)
        self.store_volumes = select_volumes(opened.case_ids, cases, self.store_path)
        self.case_ids = tuple(opened.case_ids[v] for v in self.store_volumes)
        # Where labelled voxels are, from the store's table (metadata): no image is decoded here.
        self.fg_starts, self.fg_counts, self.fg_xyz = foreground_pools(
            opened.foreground_table(), self.store_volumes, len(self.class_names))
        self.augmenter = PatchAugmenter(self.augment_config, self.patch_size, parallel=parallel)
        self.cache = self._init_source(cache, self.store_path, self.store_volumes, self.roi, _NATURAL,
                                       self.storage_options, cache_dir)

    @property
    def image_shape(self) -> tuple[int, int, int, int]:
        """(1, P0, P1, P2) of every image."""
        return (1, *self.patch_size)

    def __len__(self) -> int:
        return int(self.store_volumes.size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def sampler(self, batch_size: int = 2, mode: str = "infinite", start_batch: int = 0) -> PatchSampler:
        """A torch Sampler over this dataset's volumes with its seed and rank."""
        return PatchSampler(len(self), batch_size, self.seed, self.rank, self.world_size, mode, start_batch)

    def warmup(self) -> None:
        warmup()

    # -- drawing ----------------------------------------------------------------------
    def draw_origins(self, rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """int64 (B, 3) patch corners: foreground-centred for a share of samples, else uniform."""
        B = rows.size
        room = np.asarray(self.roi) - np.asarray(self.patch_size)  # >= 0 by construction
        wants_fg = rng.random(B) < self.foreground_fraction
        u_class, u_voxel = rng.random(B), rng.random(B)
        uniform = (rng.random((B, 3)) * (room + 1)).astype(np.int64)
        origins = uniform
        counts = self.fg_counts[rows]  # (B, K)
        for b in np.flatnonzero(wants_fg & (counts.sum(axis=1) > 0)).tolist():
            present = np.flatnonzero(counts[b])
            k = present[min(int(u_class[b] * present.size), present.size - 1)]
            n = counts[b, k]
            voxel = self.fg_xyz[self.fg_starts[rows[b], k] + min(int(u_voxel[b] * n), n - 1)]
            origins[b] = np.clip(voxel - np.asarray(self.patch_size) // 2, 0, room)
        return origins

    def draw(self, rows: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, PatchParams]:
        """Placement and augmentation of a batch, drawn in that order from ``rng``."""
        return self.draw_origins(rows, rng), self.augmenter.draw(rng, rows.size)

    # -- building samples ---------------------------------------------------------------
    def render(self, rows: np.ndarray, rng: np.random.Generator | tuple[np.ndarray, PatchParams],
               out_image: np.ndarray, out_label: np.ndarray) -> np.ndarray:
        """Fill preallocated (B, 1, P0, P1, P2) buffers; return the origins (B, 3).

        ``rng`` draws the batch's placement and parameters, or is them already drawn.
        """
        origins, params = rng if isinstance(rng, tuple) else self.draw(rows, rng)
        zeros = np.zeros(rows.size, np.int64)
        images, labels, slots = self._volumes().prepare(rows.astype(np.int64), zeros)
        centres = origins + (np.asarray(self.patch_size) - 1) / 2.0
        self.augmenter.apply(images, labels, self.roi, slots, centres, params, out_image, out_label)
        return origins

    def batch_meta(self, rows: np.ndarray, origins: np.ndarray) -> dict:
        """Plain-Python metadata of a batch (what loader workers send back)."""
        return {"case_id": [self.case_ids[v] for v in rows.tolist()], "origin": origins.tolist()}

    def make_batch(self, rows: np.ndarray, rng: np.random.Generator | tuple[np.ndarray, PatchParams]) -> dict:
        """One batch dict from volume indices, placed and augmented with draws from ``rng``."""
        B = int(rows.size)
        image = torch.empty((B, *self.image_shape), dtype=torch.float32)
        label = torch.empty((B, *self.image_shape), dtype=torch.int64)
        origins = self.render(rows, rng, image.numpy(), label.numpy())
        return {"image": image, "label": label, **self.finish_meta(self.batch_meta(rows, origins))}

    @staticmethod
    def finish_meta(meta: dict) -> dict:
        return {"case_id": meta["case_id"], "origin": torch.tensor(meta["origin"], dtype=torch.int64)}

    def __getitems__(self, indices: Sequence[int]) -> list[dict]:
        """``[self[i] for i in indices]`` with one kernel call (torch's batched-fetch protocol).

        Each sample draws from its own (seed, rank, epoch, i) stream (one
        :class:`hipseg.streams.SampleStreams` for the batch), so the
        results equal item-by-item access; samples are views into one batch tensor.
        """
        n = len(self)
        rows = np.asarray(indices, dtype=np.int64).reshape(-1)
        bad = rows[(rows < -n) | (rows >= n)]
        if bad.size:
            raise IndexError(f"volume {int(bad[0])} out of range for a dataset of {n} volumes")
        rows = rows % n
        streams = SampleStreams(sample_keys((self.seed, _TAG_PATCH_ITEM, self.rank, self.epoch), rows))
        batch = self.make_batch(rows, self.draw(rows, streams))
        return [{"image": batch["image"][j], "label": batch["label"][j], "case_id": batch["case_id"][j],
                 "origin": batch["origin"][j]} for j in range(rows.size)]

    def __getitem__(self, i: int) -> dict:
        return self.__getitems__([i])[0]

    def __repr__(self) -> str:
        return (f"HippocampusPatchDataset({self.store_path!r}, volumes={len(self)}, "
                f"patch={self.patch_size}, cache={self.cache!r}, augment={self.augment_config})")
