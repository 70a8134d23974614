"""The Zarr store layout: the one place that knows array names, chunking and the schema version.

A store is a Zarr v3 group (readable with plain ``zarr.open``)::

    images            float16 (N, X, Y, Z)  normalised ROI crops, one chunk per volume, sharded
    labels            uint8   (N, X, Y, Z)  label ROI crops, same chunking
    slices/sagittal   int32   (M, 2 + K)    (volume, slice, voxels of class 1..K) per slice
    slices/coronal    int32   ...
    slices/axial      int32   ...
    foreground        int32   (F, 5)        (volume, class, x, y, z) sample of labelled voxels

Volumes are in the canonical RAS+ orientation, so array axis 0 runs left to right
(sagittal slices), axis 1 posterior to anterior (coronal) and axis 2 inferior to
superior (axial).  Group attributes ``hipseg`` hold the store-wide metadata and
``volumes`` the per-volume metadata; docs/store-format.md describes every field.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
import zarr.codecs

from hipseg import storage
from hipseg.errors import HipsegError, StoreError

FORMAT_VERSION = 1
CLASS_NAMES: tuple[str, ...] = ("background", "anterior", "posterior")
AXIS_NAMES: tuple[str, ...] = ("sagittal", "coronal", "axial")
IMAGES = "images"
LABELS = "labels"
SLICES = "slices"
FOREGROUND = "foreground"
# Labelled voxels recorded per class and volume for foreground-centred patches (nnU-Net keeps
# a sample of class locations the same way); evenly spaced in C order, so they span the class.
FOREGROUND_PER_CLASS = 64
IMAGE_DTYPE = np.dtype("float16")
LABEL_DTYPE = np.dtype("uint8")
NORMALISATION = {
    "scheme": "percentile-minmax",
    "description": "per volume: clip to [p0.5, p99.5] of all voxels, then scale to [0, 1]",
    "low_percentile": 0.5,
    "high_percentile": 99.5,
}


def axis_index(axis: str) -> int:
    """Array axis of a crop that a named view slices along."""
    try:
        return AXIS_NAMES.index(axis)
    except ValueError:
        raise StoreError(f"unknown axis {axis!r}; expected one of {', '.join(AXIS_NAMES)}") from None


def slice_table_columns(class_names: Sequence[str] = CLASS_NAMES) -> list[str]:
    return ["volume", "slice", *class_names[1:]]


def default_codec() -> zarr.codecs.ZstdCodec:
    # Plain zstd level 3: on the 200 real crops it gave the smallest store of the codecs
    # measured (15.4 MB vs 16.4 MB for blosc-zstd+shuffle, 24.9 MB for blosc-lz4) and read
    # no slower (benchmarks/bench_convert.py, CodecChoice).
    return zarr.codecs.ZstdCodec(level=3)


def volumes_per_shard(
    roi_shape: Sequence[int], n_volumes: int, target_bytes: int = 4 << 20, most: int = 16
) -> int:
    """How many volumes one shard (one file, one conversion task) holds.

    About 4 MiB of image crops and at most 16 volumes: few enough files for large
    datasets, and enough tasks for every Dask worker to stay busy.
    """
    crop_bytes = int(np.prod(roi_shape)) * IMAGE_DTYPE.itemsize
    return int(max(1, min(n_volumes, most, target_bytes // max(crop_bytes, 1))))


def create_arrays(group: zarr.Group, n_volumes: int, roi_shape: Sequence[int], shard_volumes: int) -> None:
    """Create the image and label arrays of a new store (data is written block by block)."""
    roi = tuple(int(s) for s in roi_shape)
    for name, dtype in ((IMAGES, IMAGE_DTYPE), (LABELS, LABEL_DTYPE)):
        group.create_array(
            name,
            shape=(n_volumes, *roi),
            chunks=(1, *roi),
            shards=(shard_volumes, *roi),
            dtype=dtype,
            compressors=[default_codec()],
            fill_value=0,
            overwrite=True,
        )


def write_block(group: zarr.Group, start: int, images: np.ndarray, labels: np.ndarray) -> None:
    """Write whole shards of crops starting at volume ``start`` (a block is one shard)."""
    stop = start + images.shape[0]
    group[IMAGES][start:stop] = images.astype(IMAGE_DTYPE, copy=False)
    group[LABELS][start:stop] = labels.astype(LABEL_DTYPE, copy=False)


def slice_counts(label_crop: np.ndarray, n_classes: int) -> dict[str, np.ndarray]:
    """Voxels of each foreground class in every slice of a crop, per axis: {axis: (n_slices, K)}."""
    counts = {}
    for axis_number, axis in enumerate(AXIS_NAMES):
        moved = np.moveaxis(label_crop, axis_number, 0).reshape(label_crop.shape[axis_number], -1)
        per_class = np.stack([(moved == c).sum(axis=1) for c in range(1, n_classes)], axis=1).astype(np.int32)
        counts[axis] = per_class
    return counts


def build_slice_table(per_volume_counts: Sequence[np.ndarray]) -> np.ndarray:
    """Stack per-volume (n_slices, K) counts into one (M, 2 + K) table of (volume, slice, counts)."""
    rows = []
    for volume, counts in enumerate(per_volume_counts):
        n = counts.shape[0]
        ids = np.stack([np.full(n, volume, np.int32), np.arange(n, dtype=np.int32)], axis=1)
        rows.append(np.concatenate([ids, counts.astype(np.int32)], axis=1))
    width = 2 + (per_volume_counts[0].shape[1] if per_volume_counts else len(CLASS_NAMES) - 1)
    return np.concatenate(rows, axis=0) if rows else np.zeros((0, width), np.int32)


def write_slice_tables(group: zarr.Group, tables: dict[str, np.ndarray]) -> None:
    slices = group.require_group(SLICES)
    for axis, table in tables.items():
        slices.create_array(
            axis,
            data=np.ascontiguousarray(table, dtype=np.int32),
            chunks=(max(1, table.shape[0]), table.shape[1]),
            overwrite=True,
        )


def foreground_samples(
    label_crop: np.ndarray, n_classes: int, per_class: int = FOREGROUND_PER_CLASS
) -> np.ndarray:
    """Up to ``per_class`` voxels of each foreground class of a crop: int32 (n, 4) (class, x, y, z).

    Evenly spaced through the class's voxels in C order (deterministic, no random
    state), so the sample spans the structure from one end to the other.
    """
    rows = []
    flat = label_crop.reshape(-1)
    for c in range(1, n_classes):
        where = np.flatnonzero(flat == c)
        if where.size == 0:
            continue
        pick = where[np.unique(np.linspace(0, where.size - 1, min(per_class, where.size)).astype(np.int64))]
        coords = np.stack(np.unravel_index(pick, label_crop.shape), axis=1)
        rows.append(np.concatenate([np.full((pick.size, 1), c), coords], axis=1))
    return np.concatenate(rows).astype(np.int32) if rows else np.zeros((0, 4), np.int32)


def build_foreground_table(per_volume: Sequence[np.ndarray]) -> np.ndarray:
    """Stack per-volume (n, 4) samples into one int32 (F, 5) table of (volume, class, x, y, z)."""
    rows = [
        np.concatenate([np.full((len(s), 1), v, np.int32), np.asarray(s, np.int32).reshape(-1, 4)], axis=1)
        for v, s in enumerate(per_volume)
    ]
    return np.concatenate(rows).astype(np.int32) if rows else np.zeros((0, 5), np.int32)


def write_foreground_table(group: zarr.Group, table: np.ndarray) -> None:
    group.create_array(
        FOREGROUND,
        data=np.ascontiguousarray(table, dtype=np.int32).reshape(-1, 5),
        chunks=(max(1, table.shape[0]), 5),
        overwrite=True,
    )


@dataclass(frozen=True)
class StoreInfo:
    """Store-wide metadata (the ``hipseg`` group attribute)."""

    format_version: int
    class_names: tuple[str, ...]
    roi_shape: tuple[int, int, int]
    n_volumes: int
    normalisation: dict
    skipped: tuple[dict, ...] = ()
    source: str = ""
    axes: tuple[str, ...] = AXIS_NAMES

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "class_names": list(self.class_names),
            "roi_shape": list(self.roi_shape),
            "n_volumes": self.n_volumes,
            "normalisation": dict(self.normalisation),
            "skipped": [dict(s) for s in self.skipped],
            "source": self.source,
            "axes": list(self.axes),
            "slice_table_columns": slice_table_columns(self.class_names),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StoreInfo:
        return cls(
            format_version=int(data["format_version"]),
            class_names=tuple(data["class_names"]),
            roi_shape=tuple(int(s) for s in data["roi_shape"]),  # type: ignore[arg-type]
            n_volumes=int(data["n_volumes"]),
            normalisation=dict(data["normalisation"]),
            skipped=tuple(data.get("skipped", ())),
            source=str(data.get("source", "")),
            axes=tuple(data.get("axes", AXIS_NAMES)),
        )


class HippocampusStore:
    """Read-only view of a converted store: metadata, slice tables and crops.

    Opening is cheap (metadata only); image data is read on demand, so a view may
    be opened inside each DataLoader worker.

    Parameters
    ----------
    path
        A local path or an fsspec URL (``s3://bucket/x.zarr``); a URL is opened through
        Zarr's FsspecStore and never becomes a local path.
    storage_options
        Filesystem arguments for a URL (credentials, ``endpoint_url``, ...); the
        standard environment (``AWS_*``) is used when not given.
    """

    def __init__(self, path: str | Path, storage_options: dict[str, Any] | None = None) -> None:
        self.location = storage.normalise(path)
        self.storage_options = dict(storage_options or {})
        #: local stores: the Path (as before); URLs: the URL string.
        self.path: str | Path = self.location if storage.is_url(path) else Path(self.location)
        try:
            self.group = storage.open_group(self.location, "r", self.storage_options)
        except FileNotFoundError:
            raise StoreError(f"{self.location}: no such store (run `hipseg convert` first)") from None
        except HipsegError:  # a missing filesystem package (ConfigError naming the extra)
            raise
        except Exception as error:  # zarr raises several types for a non-store folder
            if not storage.exists(self.location, self.storage_options):
                raise StoreError(f"{self.location}: no such store (run `hipseg convert` first)") from None
            raise StoreError(f"{self.location}: not a Zarr v3 group ({error})") from error
        attrs = dict(self.group.attrs)
        if "hipseg" not in attrs:
            raise StoreError(
                f"{self.location}: not a complete hipseg store (no 'hipseg' attribute; a conversion "
                "writes it last, so an interrupted one is resumed by running it again)"
            )
        self.info = StoreInfo.from_dict(attrs["hipseg"])
        if self.info.format_version != FORMAT_VERSION:
            raise StoreError(
                f"{self.location}: store format version {self.info.format_version}, "
                f"this hipseg reads version {FORMAT_VERSION}; convert the data again"
            )
        self.volumes: list[dict] = list(attrs.get("volumes", []))

    @property
    def n_volumes(self) -> int:
        return self.info.n_volumes

    @property
    def roi_shape(self) -> tuple[int, int, int]:
        return self.info.roi_shape

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.info.class_names

    @property
    def case_ids(self) -> list[str]:
        return [v["case_id"] for v in self.volumes]

    @property
    def crop_extent(self) -> tuple[int, int, int] | None:
        """Median canonical shape of the source volumes (their extent inside the ROI crops).

        Decathlon crops (about 35x50x36) fill only the middle of a 48x64x48 ROI, the rest being
        zero padding; full-head inference reproduces that field of view (hipseg.localise).
        """
        shapes = [v["canonical_shape"] for v in self.volumes if "canonical_shape" in v]
        if not shapes:
            return None
        return tuple(int(s) for s in np.median(np.asarray(shapes), axis=0))  # type: ignore[return-value]

    @property
    def hemispheres(self) -> list[str | None]:
        """Side of each crop ("left", "right"), None where not recorded (Decathlon crops, old stores)."""
        return [v.get("hemisphere") for v in self.volumes]

    @property
    def images(self) -> zarr.Array:
        return self.group[IMAGES]

    @property
    def labels(self) -> zarr.Array:
        return self.group[LABELS]

    def slice_table(self, axis: str) -> np.ndarray:
        """The slice index table of one view, read whole.

        Parameters
        ----------
        axis
            ``"sagittal"``, ``"coronal"`` or ``"axial"``.

        Returns
        -------
        int32 array of shape (N * S, 2 + K): rows (volume, slice, then the voxel count of
        each of the K foreground classes in that slice), S the crop's length along ``axis``
        (docs/store-format.md).

        Raises
        ------
        StoreError
            Unknown ``axis``.
        """
        axis_index(axis)
        return np.asarray(self.group[f"{SLICES}/{axis}"][...])

    def foreground_table(self) -> np.ndarray:
        """int32 (F, 5) rows (volume, class, x, y, z): a sample of each volume's labelled voxels.

        Stores written before the table existed (it is optional within format
        version 1) get it computed here from the labels, once per open.
        """
        if FOREGROUND in self.group:
            return np.asarray(self.group[FOREGROUND][...])
        labels = self.labels
        return build_foreground_table(
            [foreground_samples(np.asarray(labels[v]), len(self.class_names)) for v in range(self.n_volumes)]
        )

    def slice_shape(self, axis: str) -> tuple[int, int]:
        """In-plane (H, W) of slices along ``axis``: the ROI shape without that axis."""
        shape = list(self.roi_shape)
        del shape[axis_index(axis)]
        return (shape[0], shape[1])

    def read_volume(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """One volume's (image float32, label uint8) crops."""
        return (np.asarray(self.images[index], dtype=np.float32), np.asarray(self.labels[index]))

    def read_all(self) -> tuple[np.ndarray, np.ndarray]:
        """All crops at once: (images float16, labels uint8), shaped (N, X, Y, Z)."""
        return np.asarray(self.images[...]), np.asarray(self.labels[...])

    def __repr__(self) -> str:
        return (
            f"HippocampusStore({self.location!r}, volumes={self.n_volumes}, "
            f"roi={self.roi_shape}, classes={list(self.class_names)})"
        )


def open_store(path: str | Path, storage_options: dict[str, Any] | None = None) -> HippocampusStore:
    """Open a converted store at a local path or an fsspec URL; see :class:`HippocampusStore`."""
    return HippocampusStore(path, storage_options)
