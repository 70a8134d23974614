"""``HippocampusSliceDataset``: augmented 2D / 2.5D slices of a store as MONAI-style dicts.

Volumes reach the kernel from one of two sources:

- ``cache="ram"``: the selected crops are decoded once into one file in
  ``/dev/shm`` (float16 bits + uint8 labels) that every worker maps read-only,
  placed and reserved by :mod:`hipseg.shm` (too little shared memory: a file in the
  temporary folder or ``HIPSEG_CACHE_DIR``, else streaming, with a warning; never SIGBUS),
  so the page cache holds one copy however many workers run. The first process
  that needs it fills it under a file lock; the parent never decodes image data
  (so forking after construction is safe) and deletes the file when the dataset
  is garbage collected.
- ``cache="stream"``: each worker opens the store lazily and reads the chunks of
  the volumes a batch needs into a slab of decoded volumes (``STREAM_CACHE_BYTES``
  per worker) that the kernel reads directly, least recently used reused first.

Either way volumes are held slice-major, one copy per chosen axis (each slice a
contiguous plane), so a dataset mixing k axes holds k copies of its crops.

Several axes mix into one dataset: slices are centred on a zero-padded canvas
of H x W = the largest in-plane size over the chosen axes. With ``context=k``
the image has 2k + 1 channels (slices s-k .. s+k); beyond the volume's first or
last slice the edge slice repeats.
"""

from __future__ import annotations

import fcntl
import os
import re
import tempfile
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.utils.data

from hipseg.augment import (
    AugmentConfig,
    AugmentParams,
    SliceAugmenter,
    left_right_flip_mask,
    resolve_config,
    warmup,
)
from hipseg.errors import ConfigError
from hipseg.sampler import (
    _TAG_ITEM,
    SamplerConfig,
    SliceIndex,
    SliceSampler,
    build_index,
    select_volumes,
)
from hipseg.shm import allocate, cache_folder, cache_name, existing_folder
from hipseg.store import AXIS_NAMES, HippocampusStore, open_store
from hipseg.streams import SampleStreams, sample_keys
from hipseg.worker_exit import guard_worker_exit

CACHES = ("ram", "stream")
STREAM_CACHE_BYTES = 256 << 20  # per worker: recently read volumes kept decoded
_CACHE_PREFIX = "hipseg-cache-"


def _shm_dir() -> Path:
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())


def _sweep_stale_caches(folder: Path) -> None:
    """Remove cache files left by processes that died without cleaning up (kill -9)."""
    pattern = re.compile(re.escape(_CACHE_PREFIX) + r"(\d+)-")
    for path in folder.glob(_CACHE_PREFIX + "*"):
        match = pattern.match(path.name)
        if not match:
            continue
        try:
            os.kill(int(match.group(1)), 0)
        except ProcessLookupError:
            path.unlink(missing_ok=True)
        except PermissionError:  # alive, someone else's
            pass


def _remove_cache(path: str, owner: int) -> None:
    # Forked workers inherit the finaliser; only the process that chose the path removes it.
    if os.getpid() == owner:
        folder, name = Path(path).parent, Path(path).name
        for p in folder.glob(name + "*"):  # the file, its lock, a fill a killed worker left
            p.unlink(missing_ok=True)


def slice_major(block: np.ndarray, axis: str) -> np.ndarray:
    """Crops (n, X, Y, Z) reordered so that each slice along ``axis`` is one contiguous plane.

    The kernel then reads a slice from a few consecutive cache lines; read in the
    store's own order, an axial slice touches a line per pixel across the whole
    crop, which made augmenting axial slices three times slower.
    """
    a = AXIS_NAMES.index(axis)
    return np.ascontiguousarray(np.moveaxis(block, 1 + a, 1))


class _RamVolumes:
    """All selected crops, one slice-major copy per chosen axis, in one shared read-only file.

    Kernel volume ``axis_id * V + v`` is volume ``v`` laid out for axis ``axis_id``.
    """

    def __init__(
        self,
        store_path: str,
        store_volumes: np.ndarray,
        roi: tuple[int, int, int],
        axes: tuple[str, ...],
        path: str,
        storage_options: dict | None = None,
    ) -> None:
        self.store_path, self.store_volumes, self.axes, self.path = (
            store_path,
            store_volumes,
            axes,
            path,
        )
        self.storage_options = storage_options
        self.vol_size = int(np.prod(roi))
        self.n = len(axes) * store_volumes.size * self.vol_size
        self._arrays: tuple[np.ndarray, np.ndarray] | None = None

    def _fill(self) -> None:
        store = open_store(self.store_path, self.storage_options)
        V = self.store_volumes.size
        tmp = f"{self.path}.tmp-{os.getpid()}"
        try:
            allocate(tmp, 3 * self.n)  # reserved first: no room is an error, never a SIGBUS
            buf = np.memmap(tmp, dtype=np.uint8, mode="r+", shape=(3 * self.n,))
            images = buf[: 2 * self.n].view(np.uint16).reshape(len(self.axes), V, -1)
            labels = buf[2 * self.n :].reshape(len(self.axes), V, -1)
            # Contiguous runs of volumes, so whole shards decode in one request.
            runs = np.split(np.arange(V), np.flatnonzero(np.diff(self.store_volumes) != 1) + 1)
            for run in runs:
                lo, hi = int(self.store_volumes[run[0]]), int(self.store_volumes[run[-1]]) + 1
                image = (
                    np.asarray(store.images[lo:hi]).astype(np.float16, copy=False).view(np.uint16)
                )
                label = np.asarray(store.labels[lo:hi])
                for i, axis in enumerate(self.axes):
                    images[i, run[0] : run[-1] + 1] = slice_major(image, axis).reshape(hi - lo, -1)
                    labels[i, run[0] : run[-1] + 1] = slice_major(label, axis).reshape(hi - lo, -1)
            buf.flush()
            del buf, images, labels
            os.replace(tmp, self.path)
        finally:
            Path(tmp).unlink(missing_ok=True)

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        if self._arrays is None:
            if not os.path.exists(self.path):
                with open(self.path + ".lock", "a+") as lock:
                    fcntl.flock(lock, fcntl.LOCK_EX)
                    if not os.path.exists(self.path):
                        self._fill()
            buf = np.memmap(self.path, dtype=np.uint8, mode="r", shape=(3 * self.n,))
            self._arrays = (
                np.asarray(buf[: 2 * self.n].view(np.uint16)),
                np.asarray(buf[2 * self.n :]),
            )
        return self._arrays

    def prepare(
        self, volumes: np.ndarray, axis_ids: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        images, labels = self.arrays()
        return images, labels, axis_ids.astype(np.int64) * self.store_volumes.size + volumes


class _StreamVolumes:
    """Reads the volumes a batch needs from the store into a slab of decoded slots.

    The slab holds up to ``budget_bytes`` of slice-major volumes, reused least
    recently used first, and the kernel reads batches straight from it: a warm
    batch costs no copy, a cold one one chunk read per missing volume.
    """

    def __init__(
        self,
        store_path: str,
        store_volumes: np.ndarray,
        roi: tuple[int, int, int],
        axes: tuple[str, ...],
        budget_bytes: int | None = None,
        storage_options: dict | None = None,
    ) -> None:
        self.store_path, self.store_volumes, self.axes = store_path, store_volumes, axes
        self.storage_options = storage_options
        self.vol_size = int(np.prod(roi))
        budget = STREAM_CACHE_BYTES if budget_bytes is None else budget_bytes
        self.capacity = max(1, budget // (3 * self.vol_size))
        self._store: HippocampusStore | None = None
        self._slots: OrderedDict[int, int] = OrderedDict()  # volume key -> slot, oldest first
        self._images = np.empty((0, self.vol_size), np.uint16)
        self._labels = np.empty((0, self.vol_size), np.uint8)

    def _read(self, key: int, slot: int) -> None:
        if self._store is None:
            self._store = open_store(self.store_path, self.storage_options)
        axis_id, local = divmod(key, self.store_volumes.size)
        v = int(self.store_volumes[local])
        image = np.asarray(self._store.images[v : v + 1]).astype(np.float16, copy=False)
        axis = self.axes[axis_id]
        self._images[slot] = slice_major(image.view(np.uint16), axis).reshape(-1)
        self._labels[slot] = slice_major(np.asarray(self._store.labels[v : v + 1]), axis).reshape(
            -1
        )

    def prepare(
        self, volumes: np.ndarray, axis_ids: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        keys = axis_ids.astype(np.int64) * self.store_volumes.size + volumes
        unique, remapped = np.unique(keys, return_inverse=True)
        capacity = max(self.capacity, unique.size)
        if self._images.shape[0] < capacity:  # first batch, or one larger than the budget
            # np.empty: pages are only committed as slots fill.
            self._images = np.empty((capacity, self.vol_size), np.uint16)
            self._labels = np.empty((capacity, self.vol_size), np.uint8)
            self._slots.clear()
        slot_of = np.empty(unique.size, np.int64)
        missing = []
        for i, key in enumerate(unique.tolist()):
            if key in self._slots:
                self._slots.move_to_end(key)
                slot_of[i] = self._slots[key]
            else:
                missing.append(i)
        for i in missing:
            key = int(unique[i])
            if len(self._slots) < self._images.shape[0]:
                slot = len(self._slots)
            else:  # the oldest entry: never one of this batch's, which were just moved last
                _, slot = self._slots.popitem(last=False)
            self._read(key, slot)
            self._slots[key] = slot
            slot_of[i] = slot
        # Read-only views, like the RAM cache's mapping, so the kernel compiles one signature.
        images, labels = self._images.reshape(-1).view(), self._labels.reshape(-1).view()
        images.flags.writeable = False
        labels.flags.writeable = False
        return images, labels, slot_of[remapped]


class _VolumeSourceMixin:
    """The dataset's volumes (RAM cache or stream), opened lazily in each process.

    Shared by the slice and patch datasets; the RAM cache file belongs to the process
    that built the dataset, which alone removes it.
    """

    def _init_source(
        self,
        cache: str,
        store_path: str,
        store_volumes: np.ndarray,
        roi: tuple,
        axes: tuple,
        storage_options: dict | None = None,
        cache_dir: str | None = None,
    ) -> str:
        """Choose the volume source; returns the cache in effect ('ram' falls back to 'stream'
        when no folder has room for it)."""
        if cache not in CACHES:
            raise ConfigError(f"cache must be one of {CACHES}, got {cache!r}")
        self._source_args = (store_path, store_volumes, roi, axes)
        self._source_options = storage_options
        if cache == "ram":
            identity = f"{store_path}|{store_volumes.tolist()}|{axes}|{roi}"
            name, owner = cache_name(_CACHE_PREFIX, identity)
            nbytes = 3 * len(axes) * store_volumes.size * int(np.prod(roi))
            folder = existing_folder(name, cache_dir) or cache_folder(
                nbytes, f"RAM cache of {store_volumes.size} volumes", cache_dir)
            if folder is None:
                cache = "stream"
        if cache == "ram":
            _sweep_stale_caches(folder)
            path = str(folder / name)
            self._cache_path = path
            # Forked workers and the other local ranks never remove it: the owner alone does.
            self._finalizer = weakref.finalize(self, _remove_cache, path,
                                               os.getpid() if owner else -1)
        self._cache_kind = cache
        self._source: Any = None
        self._source_pid = -1
        return cache

    def _volumes(self) -> Any:
        if self._source is None or self._source_pid != os.getpid():
            guard_worker_exit()  # a new process: in a spawned DataLoader worker, exit cleanly
            if self._cache_kind == "ram":
                self._source = _RamVolumes(*self._source_args, self._cache_path,
                                           self._source_options)
            else:
                self._source = _StreamVolumes(*self._source_args,
                                              storage_options=self._source_options)
            self._source_pid = os.getpid()
        return self._source

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_source"], state["_source_pid"] = None, -1
        state.pop("_finalizer", None)  # the owner alone removes the cache file
        return state


def axis_geometry(roi: Sequence[int], axes: Sequence[str]) -> tuple[np.ndarray, tuple[int, int]]:
    """Kernel geometry of slice-major volumes per axis, and the common (H, W) canvas.

    Per axis: slice, row and column strides, in-plane (h, w), slices along the
    axis, and the offset that centres the slice on the canvas.
    """
    planes = []
    for axis in axes:
        a = AXIS_NAMES.index(axis)
        h, w = [roi[i] for i in range(3) if i != a]
        planes.append((h * w, w, 1, h, w, roi[a]))
    H = max(p[3] for p in planes)
    W = max(p[4] for p in planes)
    geom = np.array([(*p, (H - p[3]) // 2, (W - p[4]) // 2) for p in planes], dtype=np.int64)
    return geom, (int(H), int(W))


def _resolve_axes(axis: str | Sequence[str]) -> tuple[str, ...]:
    axes = (axis,) if isinstance(axis, str) else tuple(axis)
    bad = [a for a in axes if a not in AXIS_NAMES]
    if not axes or bad or len(set(axes)) != len(axes):
        raise ConfigError(
            f"axis must be one or several distinct names of {AXIS_NAMES}, got {axis!r}"
        )
    return axes


class HippocampusSliceDataset(_VolumeSourceMixin, torch.utils.data.Dataset):
    """Augmented slices of a converted store, as MONAI-style dicts.

    Parameters
    ----------
    store : path, URL or HippocampusStore
        A local path or an fsspec URL (``s3://...``); see :mod:`hipseg.storage`.
    axis : str or list of str
        'sagittal', 'coronal', 'axial', or several mixed (slices centred on a
        zero-padded canvas of the largest in-plane size).
    context : int
        k neighbouring slices on each side as channels (2k + 1); the edge slice
        repeats beyond the volume.
    augment : bool or AugmentConfig
    cases : list of case ids, optional
        The cases to use (a train/validation split without rewriting the store).
    foreground_fraction : float
        For samplers made with ``sampler()``; see ``hipseg.sampler.SamplerConfig``.
    seed, rank, world_size : int
    cache : 'ram' or 'stream'
        'ram' decodes the crops once into a shared file (in ``/dev/shm``, or where
        :func:`hipseg.shm.cache_folder` finds room; streaming when nowhere has room);
        'stream' reads chunks on demand.
    cache_dir : str, optional
        Folder of the RAM cache file (default ``$HIPSEG_CACHE_DIR``, else ``/dev/shm``).
    storage_options : dict, optional
        Filesystem arguments for a URL store (credentials, ``endpoint_url``).
    sampler_config : SamplerConfig, optional
        Every sampling knob; ``foreground_fraction`` must then stay at its default.
    parallel : bool
        Use the multi-threaded kernel (Numba threads) instead of the serial one.

    ``ds[i]`` is eligible slice ``i`` (rows ordered by axis, volume, slice) with
    augmentation drawn from (seed, rank, epoch, i): ``{"image": float32 (C, H, W),
    "label": int64 (1, H, W), "case_id": str, "axis": str, "slice": int}``.
    """

    def __init__(
        self,
        store: str | Path | HippocampusStore,
        axis: str | Sequence[str] = "axial",
        context: int = 0,
        augment: bool | AugmentConfig = True,
        cases: Sequence[str] | None = None,
        foreground_fraction: float = 1.0 / 3.0,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        cache: str = "ram",
        sampler_config: SamplerConfig | None = None,
        parallel: bool = False,
        cache_dir: str | None = None,
        storage_options: dict | None = None,
    ) -> None:
        if isinstance(store, HippocampusStore):
            opened = store
        else:
            opened = open_store(store, storage_options)
        self.store_path = opened.location
        self.storage_options = opened.storage_options or None
        self.axes = _resolve_axes(axis)
        if not isinstance(context, int) or context < 0:
            raise ConfigError(f"context must be an integer of at least 0, got {context!r}")
        if cache not in CACHES:
            raise ConfigError(f"cache must be one of {CACHES}, got {cache!r}")
        if sampler_config is None:
            sampler_config = SamplerConfig(foreground_fraction=foreground_fraction)
        elif foreground_fraction != 1.0 / 3.0:
            raise ConfigError("pass foreground_fraction inside sampler_config, not both")
        self.sampler_config = sampler_config
        self.context, self.cache, self.seed = context, cache, int(seed)
        self.rank, self.world_size, self.epoch = int(rank), int(world_size), 0
        self.augment_config = resolve_config(augment)
        self.roi = tuple(int(s) for s in opened.roi_shape)
        self.class_names = tuple(opened.class_names)
        volumes = select_volumes(opened.case_ids, cases, self.store_path)
        # Slice tables and metadata only: no image chunk is decoded in this process here.
        tables = {a: opened.slice_table(a) for a in self.axes}
        self.index: SliceIndex = build_index(tables, opened.case_ids, volumes, sampler_config)
        self.geom, self.canvas = axis_geometry(self.roi, self.axes)
        self.flip_mask = left_right_flip_mask(self.axes)
        self.augmenter = SliceAugmenter(self.augment_config, self.canvas, parallel=parallel)
        self.vol_size = int(np.prod(self.roi))
        self.cache = self._init_source(cache, self.store_path, self.index.store_volumes, self.roi,
                                       self.axes, self.storage_options, cache_dir)

    # -- shape declarations ---------------------------------------------------------
    @property
    def channels(self) -> int:
        return 2 * self.context + 1

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of every image."""
        return (self.channels, *self.canvas)

    def __len__(self) -> int:
        return len(self.index)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def sampler(
        self, batch_size: int = 32, mode: str = "infinite", start_batch: int = 0
    ) -> SliceSampler:
        """A torch Sampler over this dataset's rows with its seed, rank and oversampling."""
        return SliceSampler(
            self.index,
            self.sampler_config,
            batch_size,
            self.seed,
            self.rank,
            self.world_size,
            mode,
            start_batch,
        )

    # -- building samples -------------------------------------------------------------
    def render(
        self,
        rows: np.ndarray,
        rng: np.random.Generator | AugmentParams,
        out_image: np.ndarray,
        out_label: np.ndarray,
    ) -> None:
        """Fill preallocated (B, C, H, W) / (B, 1, H, W) buffers with the rows, augmented.

        ``rng`` draws the batch's parameters, or is them already drawn (``__getitems__``).
        """
        axis_ids = self.index.axis[rows]
        images, labels, local = self._volumes().prepare(
            self.index.volume[rows].astype(np.int64), axis_ids
        )
        kernel_rows = np.stack([local, self.index.slice[rows], axis_ids], axis=1).astype(np.int64)
        if isinstance(rng, AugmentParams):
            params = rng
        else:
            params = self.augmenter.draw(rng, rows.size, self.flip_mask[axis_ids])
        self.augmenter.apply(
            images,
            labels,
            self.vol_size,
            kernel_rows,
            self.geom,
            self.context,
            params,
            out_image,
            out_label,
        )

    def batch_meta(self, rows: np.ndarray, rendered: object = None) -> dict:
        """Plain-Python metadata of a batch (what loader workers send back)."""
        index = self.index
        return {
            "case_id": [index.case_ids[v] for v in index.volume[rows].tolist()],
            "axis": [self.axes[a] for a in index.axis[rows].tolist()],
            "slice": index.slice[rows].tolist(),
        }

    @staticmethod
    def finish_meta(meta: dict) -> dict:
        return {
            "case_id": meta["case_id"],
            "axis": meta["axis"],
            "slice": torch.tensor(meta["slice"], dtype=torch.int64),
        }

    def warmup(self) -> None:
        warmup()

    def make_batch(self, rows: np.ndarray, rng: np.random.Generator | AugmentParams) -> dict:
        """One batch dict from row indices, augmented with parameters drawn from ``rng``."""
        B = int(rows.size)
        image = torch.empty((B, *self.image_shape), dtype=torch.float32)
        label = torch.empty((B, 1, *self.canvas), dtype=torch.int64)
        self.render(rows, rng, image.numpy(), label.numpy())
        return {"image": image, "label": label, **self.finish_meta(self.batch_meta(rows))}

    def _rows(self, indices: Sequence[int]) -> np.ndarray:
        n = len(self)
        rows = np.asarray(indices, dtype=np.int64).reshape(-1)
        bad = rows[(rows < -n) | (rows >= n)]
        if bad.size:
            raise IndexError(f"slice {int(bad[0])} out of range for a dataset of {n} slices")
        return rows % n

    def __getitems__(self, indices: Sequence[int]) -> list[dict]:
        """``[self[i] for i in indices]`` with one kernel call (torch's batched-fetch protocol).

        Each sample's parameters come from its own (seed, rank, epoch, i) stream
        (:class:`hipseg.streams.SampleStreams`, drawn for the whole batch at once), so the
        results equal item-by-item access; the samples are views
        into one batch tensor, and torch's default collate stacks them.
        """
        rows = self._rows(indices)
        axis_ids = self.index.axis[rows]
        streams = SampleStreams(sample_keys((self.seed, _TAG_ITEM, self.rank, self.epoch), rows))
        params = self.augmenter.draw(streams, rows.size, self.flip_mask[axis_ids])
        B = int(rows.size)
        image = torch.empty((B, *self.image_shape), dtype=torch.float32)
        label = torch.empty((B, 1, *self.canvas), dtype=torch.int64)
        self.render(rows, params, image.numpy(), label.numpy())
        meta = self.batch_meta(rows)
        # unbind: one call for all views, cheaper than B tensor indexings.
        return [
            {"image": im, "label": lb, "case_id": case, "axis": axis, "slice": s}
            for im, lb, case, axis, s in zip(
                image.unbind(0), label.unbind(0), meta["case_id"], meta["axis"], meta["slice"],
                strict=True,
            )
        ]

    def __getitem__(self, i: int) -> dict:
        return self.__getitems__([i])[0]

    def __repr__(self) -> str:
        return (
            f"HippocampusSliceDataset({self.store_path!r}, axes={list(self.axes)}, "
            f"slices={len(self)}, image={self.image_shape}, cache={self.cache!r}, "
            f"augment={self.augment_config})"
        )
