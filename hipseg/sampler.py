"""Sampling: which (volume, slice) pairs each batch holds, drawn from the slice tables alone.

Two modes:

- ``infinite``: batch ``k`` is a pure function of (seed, rank, k), so a run resumed
  at batch ``k`` continues the exact stream, whatever the number of workers. At
  least ``foreground_fraction`` of each batch is drawn from slices holding
  hippocampus (the rest uniformly from all slices), and those foreground draws
  pick the anterior or posterior class with equal probability and an edge slice
  (hippocampus only partly present) with probability ``edge_fraction``.
- ``epoch``: every eligible slice exactly once per epoch, shuffled by
  (seed, epoch), split across ranks without overlap (``perm[rank::world_size]``,
  so shards differ by at most one slice). No oversampling: an epoch is a census,
  e.g. for validation or epoch-based schedules.

The per-batch draws are a handful of vectorised numpy calls (tens of
microseconds for a batch): a Numba kernel would not pay for its dispatch there.
Classifying edge slices is a grouped scan over the tables, written as a kernel
(``_kernels.classify_edges``) because numpy would need sorts and ``reduceat``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch.utils.data

from hipseg import _kernels
from hipseg.errors import ConfigError

MODES = ("infinite", "epoch")
# Tags that keep the random streams of different purposes apart for one seed.
_TAG_PERMUTATION, _TAG_INFINITE, _TAG_EPOCH, _TAG_ITEM = 1, 2, 3, 4
_DRAW_ROWS, _DRAW_AUGMENT = 0, 1


@dataclass(frozen=True)
class SamplerConfig:
    """How infinite-mode batches are composed.

    Parameters
    ----------
    foreground_fraction : float
        Share of each batch drawn from slices holding hippocampus (any class);
        per batch floor(f * B) draws, plus one with probability of the remainder.
    edge_fraction : float
        Share of those foreground draws taken from edge slices of the chosen class.
    edge_threshold : float
        A slice is an edge slice when its class voxels are at most this fraction of
        the volume's largest count for that class along the axis...
    edge_width : int
        ...or it is within this many slices of either end of the class's range.
    balance_classes : bool
        Foreground draws choose the class (anterior, posterior) uniformly first.
    """

    foreground_fraction: float = 1.0 / 3.0
    edge_fraction: float = 0.3
    edge_threshold: float = 0.25
    edge_width: int = 1
    balance_classes: bool = True

    def __post_init__(self) -> None:
        for name in ("foreground_fraction", "edge_fraction", "edge_threshold"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"SamplerConfig.{name} must be within [0, 1], got {value!r}")
        if self.edge_width < 0:
            raise ConfigError(f"SamplerConfig.edge_width must be at least 0, got {self.edge_width}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> SamplerConfig:
        return cls(**data)


@dataclass(frozen=True)
class SliceIndex:
    """The eligible slices: one row per (volume, axis, slice) of the selected cases.

    ``volume`` indexes ``store_volumes`` (the selected volumes, in store order).
    """

    axes: tuple[str, ...]
    volume: np.ndarray  # int32 (M,)
    slice: np.ndarray  # int32 (M,)
    axis: np.ndarray  # int8 (M,), index into ``axes``
    counts: np.ndarray  # int32 (M, K) voxels of each foreground class
    edge: np.ndarray  # uint8 (M, K) edge slice for that class
    store_volumes: np.ndarray  # int64 (V,)
    case_ids: tuple[str, ...]  # (V,)

    def __len__(self) -> int:
        return int(self.volume.shape[0])

    @property
    def foreground(self) -> np.ndarray:
        return self.counts.sum(axis=1) > 0


def select_volumes(
    store_case_ids: Sequence[str], cases: Sequence[str] | None, store_name: str = "store"
) -> np.ndarray:
    """Store indices of the chosen case ids, in store order (all when ``cases`` is None)."""
    if cases is None:
        return np.arange(len(store_case_ids), dtype=np.int64)
    if isinstance(cases, str):
        raise ConfigError(f"cases must be a list of case ids, got the string {cases!r}")
    position = {case: i for i, case in enumerate(store_case_ids)}
    unknown = [c for c in cases if c not in position]
    if unknown:
        raise ConfigError(
            f"{store_name}: unknown case id(s) {unknown[:5]}"
            f"{' ...' if len(unknown) > 5 else ''}; the store holds "
            f"{len(store_case_ids)} cases such as {list(store_case_ids[:3])}"
        )
    chosen = np.unique(np.array([position[c] for c in cases], dtype=np.int64))
    if chosen.size == 0:
        raise ConfigError(f"{store_name}: cases is empty; pass None for all cases")
    return chosen


def build_index(
    tables: dict[str, np.ndarray],
    store_case_ids: Sequence[str],
    volumes: np.ndarray,
    config: SamplerConfig,
) -> SliceIndex:
    """Keep the rows of the selected volumes, renumber them, and mark edge slices per axis."""
    lookup = np.full(len(store_case_ids), -1, np.int64)
    lookup[volumes] = np.arange(volumes.size)
    parts = []
    for axis_id, table in enumerate(tables.values()):
        local = lookup[table[:, 0]]
        keep = local >= 0
        rows = table[keep]
        counts = np.ascontiguousarray(rows[:, 2:], dtype=np.int32)
        vol = local[keep].astype(np.int32)
        sl = np.ascontiguousarray(rows[:, 1], dtype=np.int32)
        edge = np.zeros(counts.shape, np.uint8)
        _kernels.classify_edges(
            vol,
            sl,
            counts,
            int(volumes.size),
            float(config.edge_threshold),
            int(config.edge_width),
            edge,
        )
        parts.append((vol, sl, np.full(vol.size, axis_id, np.int8), counts, edge))
    volume, slice_, axis_ids, counts, edge = (np.concatenate(p) for p in zip(*parts, strict=True))
    return SliceIndex(
        tuple(tables),
        volume,
        slice_,
        axis_ids,
        counts,
        edge,
        volumes.astype(np.int64),
        tuple(store_case_ids[v] for v in volumes),
    )


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) for k in key])


class SliceSampler(torch.utils.data.Sampler):
    """Rows of a ``SliceIndex`` for each batch; also a torch ``Sampler`` over single rows.

    Used directly with ``HippocampusSliceDataset`` in a plain ``DataLoader``
    (``sampler=ds.sampler(...)``), it yields row indices batch after batch; the
    loader uses ``batch_rows`` and ``augment_rng`` to build whole batches.
    """

    def __init__(
        self,
        index: SliceIndex,
        config: SamplerConfig = SamplerConfig(),
        batch_size: int = 32,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        mode: str = "infinite",
        start_batch: int = 0,
    ) -> None:
        if mode not in MODES:
            raise ConfigError(f"mode must be one of {MODES}, got {mode!r}")
        if batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(
                f"rank must be within [0, world_size); got rank={rank}, world_size={world_size}"
            )
        if seed < 0 or start_batch < 0:
            raise ConfigError(f"seed and start_batch must be at least 0, got {seed}, {start_batch}")
        if len(index) == 0:
            raise ConfigError("no eligible slices: the selected cases have empty slice tables")
        self.index = index
        self.config = config
        self.batch_size = int(batch_size)
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.mode = mode
        self.start_batch = int(start_batch)
        self.epoch = 0
        self._pools = _foreground_pools(index, config.balance_classes)
        self._shard_cache: tuple[int, np.ndarray] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    # -- epoch mode ---------------------------------------------------------------
    def shard(self, epoch: int) -> np.ndarray:
        """This rank's rows for ``epoch``: a slice of one permutation shared by all ranks."""
        if self._shard_cache is None or self._shard_cache[0] != epoch:
            perm = _rng(self.seed, _TAG_PERMUTATION, epoch).permutation(len(self.index))
            self._shard_cache = (epoch, perm[self.rank :: self.world_size])
        return self._shard_cache[1]

    def batches_per_epoch(self) -> int:
        n = len(range(self.rank, len(self.index), self.world_size))
        return math.ceil(n / self.batch_size)

    # -- both modes -----------------------------------------------------------------
    def batch_rows(self, k: int, epoch: int = 0) -> np.ndarray:
        """Row indices (int64) of batch ``k``; infinite mode: a function of (seed, rank, k)."""
        if self.mode == "epoch":
            start = k * self.batch_size
            return self.shard(epoch)[start : start + self.batch_size].astype(np.int64)
        rng = _rng(self.seed, _TAG_INFINITE, self.rank, k, _DRAW_ROWS)
        return self._draw(rng, self.batch_size)

    def augment_rng(self, k: int, epoch: int = 0) -> np.random.Generator:
        """Generator for batch ``k``'s augmentation: a stream apart from the row draws."""
        if self.mode == "epoch":
            return _rng(self.seed, _TAG_EPOCH, self.rank, epoch, k)
        return _rng(self.seed, _TAG_INFINITE, self.rank, k, _DRAW_AUGMENT)

    def _draw(self, rng: np.random.Generator, batch: int) -> np.ndarray:
        f = self.config.foreground_fraction * batch
        n_fg = int(math.floor(f)) + int(rng.random() < f - math.floor(f))
        starts, lengths, flat = self._pools
        out = np.empty(batch, np.int64)
        if lengths.sum() == 0:  # no foreground at all (e.g. unlabelled cases): all uniform
            n_fg = 0
        if n_fg:
            n_groups = starts.shape[0]
            group = rng.integers(0, n_groups, n_fg)
            want_edge = (rng.random(n_fg) < self.config.edge_fraction).astype(np.int64)
            u = rng.random(n_fg)
            s = starts[group, want_edge]
            n = lengths[group, want_edge]
            out[:n_fg] = flat[s + np.minimum((u * n).astype(np.int64), n - 1)]
        out[n_fg:] = rng.integers(0, len(self.index), batch - n_fg)
        return out

    # -- torch Sampler protocol: single rows ----------------------------------------
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
            raise TypeError("an infinite SliceSampler has no length; use mode='epoch'")
        n = len(range(self.rank, len(self.index), self.world_size))
        return max(0, n - self.start_batch * self.batch_size)


def _foreground_pools(
    index: SliceIndex, balance: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Foreground rows grouped by (class, edge), flattened: (starts (G, 2), lengths (G, 2), rows).

    With class balance each class with any foreground is a group; without it one
    group holds every foreground slice (edge when edge for any class). An empty
    edge or interior half falls back to the other half of its group.
    """
    if balance:
        groups = [
            (index.counts[:, k] > 0, index.edge[:, k] > 0) for k in range(index.counts.shape[1])
        ]
    else:
        groups = [(index.foreground, index.edge.any(axis=1))]
    groups = [(has, edge) for has, edge in groups if has.any()]
    flat, starts, lengths, offset = [], [], [], 0
    for has, edge in groups:
        interior_rows = np.flatnonzero(has & ~edge)
        edge_rows = np.flatnonzero(has & edge)
        pair = [interior_rows, edge_rows]
        if pair[0].size == 0:
            pair[0] = pair[1]
        if pair[1].size == 0:
            pair[1] = pair[0]
        row_starts = []
        for rows in pair:
            row_starts.append(offset)
            flat.append(rows)
            offset += rows.size
        starts.append(row_starts)
        lengths.append([pair[0].size, pair[1].size])
    if not groups:
        return np.zeros((1, 2), np.int64), np.zeros((1, 2), np.int64), np.zeros(0, np.int64)
    return (
        np.asarray(starts, np.int64),
        np.asarray(lengths, np.int64),
        np.concatenate(flat).astype(np.int64),
    )
