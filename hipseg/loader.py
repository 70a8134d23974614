"""``SliceLoader`` and ``PatchLoader``: whole augmented batches built by one kernel call per worker.

A torch ``DataLoader`` with ``batch_size=None`` runs over batch keys: each worker
turns a key into a whole batch (sampler draws, one fused augmentation kernel)
written in place into a slot of a ring of batch buffers in shared memory, and
sends back only the slot number and the batch's case ids. The main process
copies the slot out (into pinned memory when ``pin_memory``): one memcpy instead
of torch's per-tensor shared-memory segments, whose creation, mapping and page
faults cost more than building the batch. Workers are persistent and prefetch
``prefetch`` batches each.

In infinite mode batch ``k`` depends on (seed, rank, k) alone, so
``SliceLoader(..., start_batch=k)`` continues the stream a previous run was on,
whatever ``num_workers``. Workers open the store themselves (fork and spawn
both work); each runs one kernel thread and one torch thread, so the thread
budget is ``num_workers`` (times ``kernel_threads`` when raised).
A failing worker raises ``WorkerError`` in the main process with the original
exception as its cause; a dead or stalled worker raises after ``timeout`` seconds
at most.
"""

from __future__ import annotations

import itertools
import os
import uuid
import warnings
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.utils.data

from hipseg.augment import AugmentConfig
from hipseg.dataset import _CACHE_PREFIX, HippocampusSliceDataset, _remove_cache
from hipseg.errors import ConfigError, WorkerError
from hipseg.patches import HippocampusPatchDataset, PatchSampler
from hipseg.sampler import SamplerConfig, SliceSampler
from hipseg.shm import CACHE_DIR_ENV, CacheSpaceError, allocate, cache_folder
from hipseg.store import HippocampusStore


def _worker_init(worker_id: int) -> None:
    # One torch thread per worker: the main process's threads belong to the model.
    torch.set_num_threads(1)
    info = torch.utils.data.get_worker_info()
    threads = getattr(info.dataset, "kernel_threads", 1) if info is not None else 1
    if threads > 1:
        import numba

        numba.set_num_threads(threads)


def _summary(error: BaseException) -> str:
    """The original error's last line (torch re-raises it with the worker traceback as text)."""
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(error).__name__


def _check_loading(num_workers: int, prefetch: int, kernel_threads: int, timeout: float) -> None:
    if num_workers < 0 or prefetch < 1 or kernel_threads < 1 or timeout <= 0:
        raise ConfigError(
            f"need num_workers >= 0, prefetch >= 1, kernel_threads >= 1 and "
            f"timeout > 0; got {num_workers}, {prefetch}, {kernel_threads}, {timeout}"
        )


class _Ring:
    """Batch slots in one shared-memory file: workers write batches in place, the main copies out.

    Slot ``k % n_slots`` holds batch ``k``. The DataLoader keeps at most
    ``prefetch * num_workers`` keys outstanding and delivers batches in order, so
    with two spare slots a worker never writes into a batch not yet copied out.
    """

    def __init__(self, n_slots: int, batch: int, image_shape: tuple[int, ...],
                 folder: str | None = None) -> None:
        self.n_slots, self.batch, self.image_shape = n_slots, batch, tuple(image_shape)
        self.label_shape = (1, *self.image_shape[1:])
        self._image_bytes = 4 * n_slots * batch * int(np.prod(self.image_shape))
        self._bytes = self._image_bytes + 8 * n_slots * batch * int(np.prod(self.label_shape))
        where = cache_folder(self._bytes, f"loader's batch ring ({n_slots} batches)", folder)
        if where is None:
            raise CacheSpaceError(
                f"no folder has room for the loader's batch ring ({self._bytes >> 20} MB); give "
                f"the container more shared memory (`docker run --shm-size=1g`), set "
                f"{CACHE_DIR_ENV}, or use num_workers=0"
            )
        self.path = str(where / f"{_CACHE_PREFIX}{os.getpid()}-ring-{uuid.uuid4().hex[:12]}.bin")
        allocate(self.path, self._bytes)  # reserved, so a full /dev/shm is an error, not a SIGBUS
        self._finalizer = weakref.finalize(self, _remove_cache, self.path, os.getpid())
        self._views: tuple[np.ndarray, np.ndarray] | None = None
        self._pid = -1

    def views(self) -> tuple[np.ndarray, np.ndarray]:
        """Images (S, B, C, H, W) float32 and labels (S, B, 1, H, W) int64, mapped per process."""
        if self._views is None or self._pid != os.getpid():
            buf = np.memmap(self.path, dtype=np.uint8, mode="r+", shape=(self._bytes,))
            images = np.asarray(buf[: self._image_bytes]).view(np.float32)
            labels = np.asarray(buf[self._image_bytes :]).view(np.int64)
            self._views = (
                images.reshape(self.n_slots, self.batch, *self.image_shape),
                labels.reshape(self.n_slots, self.batch, *self.label_shape),
            )
            self._pid = os.getpid()
        return self._views

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_views"], state["_pid"] = None, -1
        state.pop("_finalizer", None)  # the creating process alone removes the file
        return state


class _BatchSource(torch.utils.data.Dataset):
    """Map-style dataset of whole batches, keyed by (epoch, batch number, ring slot)."""

    def __init__(
        self,
        dataset: HippocampusSliceDataset | HippocampusPatchDataset,
        sampler: SliceSampler | PatchSampler,
        ring: _Ring | None,
        kernel_threads: int,
    ) -> None:
        self.dataset = dataset
        self.sampler = sampler
        self.ring = ring
        self.kernel_threads = kernel_threads

    def __getitem__(self, key: tuple[int, int, int]) -> dict:
        epoch, k, slot = key
        rows = self.sampler.batch_rows(k, epoch)
        rng = self.sampler.augment_rng(k, epoch)
        if self.ring is None:
            return self.dataset.make_batch(rows, rng)
        images, labels = self.ring.views()
        n = rows.size
        rendered = self.dataset.render(rows, rng, images[slot, :n], labels[slot, :n])
        return {"slot": slot, "n": n, "meta": self.dataset.batch_meta(rows, rendered)}


class _Keys:
    """The keys of one pass, read from the loader when a pass starts (main process only)."""

    def __init__(self, loader: _RingLoader) -> None:
        # A weak reference: no cycle, so dropping the loader frees its workers and files at once.
        self._loader = weakref.ref(loader)

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        loader = self._loader()
        if loader is None:
            return iter(())
        epoch, first, n_slots = loader.epoch, loader._pass_start, loader._n_slots
        if loader.mode == "epoch":
            last = loader._sampler.batches_per_epoch()
            return ((epoch, k, k % n_slots) for k in range(first, last))
        return ((0, k, k % n_slots) for k in itertools.count(first))


class _RingLoader:
    """Batches of a dataset built whole by workers into a shared ring (see the module docstring).

    The dataset provides ``sampler``, ``render``, ``make_batch``, ``batch_meta``,
    ``finish_meta``, ``image_shape``, ``set_epoch`` and ``warmup``.
    """

    def _setup(
        self,
        dataset: Any,
        batch_size: int,
        num_workers: int,
        mode: str,
        start_batch: int,
        pin_memory: bool,
        prefetch: int,
        start_method: str | None,
        timeout: float,
        kernel_threads: int,
        cache_dir: str | None = None,
    ) -> None:
        self.dataset = dataset
        self._sampler = self.dataset.sampler(batch_size, mode, start_batch)
        self.batch_size, self.mode, self.num_workers = int(batch_size), mode, int(num_workers)
        self.epoch = 0
        self._pass_start = int(start_batch)
        self._position = int(start_batch)
        # Keys outstanding in the DataLoader, the batch being copied out, and one spare.
        self._n_slots = prefetch * num_workers + 2
        self._ring = (
            _Ring(self._n_slots, batch_size, self.image_shape, cache_dir) if num_workers else None
        )
        self._pin = pin_memory and torch.cuda.is_available()
        if pin_memory and not self._pin:
            warnings.warn(
                "pin_memory=True but CUDA is not available: batches are not pinned", stacklevel=2
            )
        source = _BatchSource(self.dataset, self._sampler, self._ring, kernel_threads)
        options: dict[str, Any] = {}
        if num_workers:
            options = dict(
                persistent_workers=True,
                prefetch_factor=prefetch,
                timeout=timeout,
                worker_init_fn=_worker_init,
                multiprocessing_context=start_method,
            )
        self._loader = torch.utils.data.DataLoader(
            source,
            batch_size=None,
            sampler=_Keys(self),
            num_workers=num_workers,
            pin_memory=self._pin and not num_workers,  # with workers, _take pins as it copies
            **options,
        )
        if num_workers:
            self.dataset.warmup()
        elif kernel_threads > 1:
            import numba

            numba.set_num_threads(kernel_threads)

    @property
    def image_shape(self) -> tuple[int, ...]:
        """(C, H, W) or (1, P0, P1, P2) of each sample."""
        return self.dataset.image_shape

    @property
    def position(self) -> int:
        """Number of the next batch this loader yields (store it to resume with start_batch)."""
        return self._position

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for ``epoch`` (epoch mode; infinite batches do not depend on it)."""
        self.epoch = int(epoch)
        self._sampler.set_epoch(epoch)
        self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        if self.mode != "epoch":
            raise TypeError(f"an infinite {type(self).__name__} has no length; use mode='epoch'")
        return self._sampler.batches_per_epoch() - self._pass_start

    def __iter__(self) -> Iterator[dict]:
        if self.mode == "epoch":
            self._position = self._pass_start
        else:
            self._pass_start = self._position
        batches = iter(self._loader)
        if self.mode == "epoch":
            self._pass_start = 0  # start_batch applies to the first pass only
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except Exception as error:
                raise WorkerError(
                    f"{self.dataset.store_path}: building batch {self._position} failed with "
                    f"{_summary(error)} (the chained cause holds the worker's traceback; check "
                    "the store with `hipseg.open_store`, or use num_workers=0 to debug in-process)"
                ) from error
            self._position += 1
            yield self._take(batch) if self._ring is not None else batch

    def _take(self, meta: dict) -> dict:
        """The batch in ring slot ``meta["slot"]``, copied out so the slot can be reused."""
        images, labels = self._ring.views()
        n = meta["n"]
        image = torch.empty((n, *images.shape[2:]), dtype=torch.float32, pin_memory=self._pin)
        label = torch.empty((n, *labels.shape[2:]), dtype=torch.int64, pin_memory=self._pin)
        # numpy's single-threaded copy: torch's copy_ would open an OpenMP region whose
        # threads then spin for milliseconds, taking a core from the workers.
        np.copyto(image.numpy(), images[meta["slot"], :n])
        np.copyto(label.numpy(), labels[meta["slot"], :n])
        return {"image": image, "label": label, **self.dataset.finish_meta(meta["meta"])}

    def close(self) -> None:
        """Stop the worker processes now (they also stop when the loader is garbage collected)."""
        iterator = getattr(self._loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
        self._loader._iterator = None

    def __enter__(self) -> _RingLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SliceLoader(_RingLoader):
    """Iterate augmented slice batches: ``{"image": float32 (B, C, H, W), "label": int64
    (B, 1, H, W), "case_id": list[str], "axis": list[str], "slice": int64 (B,)}``.

    Parameters follow ``HippocampusSliceDataset``; beyond them:

    batch_size : int
    num_workers : int
        Worker processes (0 builds batches in the calling process).
    mode : 'infinite' or 'epoch'
        Infinite: an endless stream, batch k a pure function of (seed, rank, k);
        a new ``iter()`` continues after the last batch yielded. Epoch: every
        eligible slice of this rank's shard once per pass (the last batch may be
        smaller); call ``set_epoch`` between passes to reshuffle.
    start_batch : int
        First batch of the stream (infinite) or of the first pass (epoch).
    pin_memory : bool
        Pin batches (use when training on CUDA).
    prefetch : int
        Batches in flight per worker.
    start_method : 'fork', 'spawn', 'forkserver' or None (the platform default)
    timeout : float
        Seconds to wait for one batch before raising ``WorkerError``.
    kernel_threads : int
        Numba threads per worker for the batch kernel (1 = the serial kernel).
    cache_dir, storage_options
        As for ``HippocampusSliceDataset``; ``cache_dir`` also holds the batch ring.
    """

    def __init__(
        self,
        store: str | Path | HippocampusStore,
        batch_size: int = 32,
        axis: str | Sequence[str] = "axial",
        context: int = 0,
        augment: bool | AugmentConfig = True,
        cases: Sequence[str] | None = None,
        num_workers: int = 2,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        mode: str = "infinite",
        start_batch: int = 0,
        cache: str = "ram",
        foreground_fraction: float = 1.0 / 3.0,
        pin_memory: bool = False,
        prefetch: int = 2,
        start_method: str | None = None,
        timeout: float = 300.0,
        kernel_threads: int = 1,
        sampler_config: SamplerConfig | None = None,
        cache_dir: str | None = None,
        storage_options: dict | None = None,
    ) -> None:
        _check_loading(num_workers, prefetch, kernel_threads, timeout)
        dataset = HippocampusSliceDataset(
            store,
            axis=axis,
            context=context,
            augment=augment,
            cases=cases,
            foreground_fraction=foreground_fraction,
            seed=seed,
            rank=rank,
            world_size=world_size,
            cache=cache,
            sampler_config=sampler_config,
            parallel=kernel_threads > 1,
            cache_dir=cache_dir,
            storage_options=storage_options,
        )
        self._setup(dataset, batch_size, num_workers, mode, start_batch, pin_memory, prefetch,
                    start_method, timeout, kernel_threads, cache_dir)



class PatchLoader(_RingLoader):
    """Iterate augmented 3D patch batches: ``{"image": float32 (B, 1, P0, P1, P2), "label": int64
    (B, 1, P0, P1, P2), "case_id": list[str], "origin": int64 (B, 3)}``.

    Parameters follow ``hipseg.patches.HippocampusPatchDataset``; the loading ones
    (``batch_size``, ``num_workers``, ``mode``, ``start_batch``, ``pin_memory``,
    ``prefetch``, ``start_method``, ``timeout``, ``kernel_threads``) as for
    ``SliceLoader``, as are ``cache_dir`` and ``storage_options``. In infinite mode
    batch k draws its volumes uniformly and its placement and augmentation from
    (seed, rank, k) alone, so ``start_batch=k`` resumes the exact stream whatever
    ``num_workers``.
    """

    def __init__(
        self,
        store: str | Path | HippocampusStore,
        batch_size: int = 2,
        patch_size: Sequence[int] | None = None,
        augment: bool | AugmentConfig | dict = True,
        cases: Sequence[str] | None = None,
        num_workers: int = 2,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        mode: str = "infinite",
        start_batch: int = 0,
        cache: str = "ram",
        foreground_fraction: float = 1.0 / 3.0,
        pin_memory: bool = False,
        prefetch: int = 2,
        start_method: str | None = None,
        timeout: float = 300.0,
        kernel_threads: int = 1,
        cache_dir: str | None = None,
        storage_options: dict | None = None,
    ) -> None:
        _check_loading(num_workers, prefetch, kernel_threads, timeout)
        dataset = HippocampusPatchDataset(
            store,
            patch_size=patch_size,
            augment=augment,
            cases=cases,
            foreground_fraction=foreground_fraction,
            seed=seed,
            rank=rank,
            world_size=world_size,
            cache=cache,
            parallel=kernel_threads > 1,
            cache_dir=cache_dir,
            storage_options=storage_options,
        )
        self._setup(dataset, batch_size, num_workers, mode, start_batch, pin_memory, prefetch,
                    start_method, timeout, kernel_threads, cache_dir)
