"""The deterministic per-volume steps shared by conversion and inference: normalise, locate, crop."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from hipseg.store import NORMALISATION


def normalise_intensity(image: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Clip to the volume's [p0.5, p99.5] and scale to [0, 1].

    Percentiles rather than min/max because the real data mixes uint8 and float32
    scans and some have outlier intensities 1000x above the rest.
    """
    lo, hi = np.percentile(image, [NORMALISATION["low_percentile"], NORMALISATION["high_percentile"]])
    return apply_normalisation(image, float(lo), float(hi)), float(lo), float(hi)


def apply_normalisation(image: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Map intensities ``lo``..``hi`` linearly to 0..1 and clip outside.

    Parameters
    ----------
    image
        Any shape and real dtype.
    lo, hi
        The volume's bounds in its own intensity units (the stored [p0.5, p99.5] of
        :func:`normalise_intensity`).

    Returns
    -------
    float32 array of ``image``'s shape in [0, 1]; all zeros when ``hi <= lo`` (a constant
    volume). Raises nothing.
    """
    scale = 1.0 / (hi - lo) if hi > lo else 0.0
    return np.clip((image.astype(np.float32) - lo) * scale, 0.0, 1.0).astype(np.float32)


def label_bbox(label: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(start, stop) of the foreground's bounding box, or None when there is none."""
    nonzero = np.nonzero(label)
    if nonzero[0].size == 0:
        return None
    start = np.array([axis.min() for axis in nonzero], dtype=np.int64)
    stop = np.array([axis.max() + 1 for axis in nonzero], dtype=np.int64)
    return start, stop


def derive_roi_shape(
    extents: Sequence[Sequence[int]], margin: int, multiple: int = 16
) -> tuple[int, int, int]:
    """Smallest shape holding every bounding box plus margin, rounded up so U-Nets need no padding."""
    largest = np.max(np.asarray(extents, dtype=np.int64), axis=0) + 2 * margin
    rounded = -(-largest // multiple) * multiple
    return tuple(int(s) for s in rounded)  # type: ignore[return-value]


def roi_offset(start: np.ndarray, stop: np.ndarray, roi_shape: Sequence[int]) -> np.ndarray:
    """Corner of a ROI of ``roi_shape`` centred on the box; may lie outside the volume."""
    centre = (np.asarray(start) + np.asarray(stop)) // 2
    return (centre - np.asarray(roi_shape) // 2).astype(np.int64)


def _overlap(offset: np.ndarray, roi_shape: Sequence[int], shape: Sequence[int]):
    """Matching slices of the volume and of the crop where the ROI overlaps the volume."""
    source, target = [], []
    for o, r, s in zip(offset, roi_shape, shape):
        lo, hi = max(int(o), 0), min(int(o) + int(r), int(s))
        source.append(slice(lo, max(lo, hi)))
        target.append(slice(lo - int(o), max(lo, hi) - int(o)))
    return tuple(source), tuple(target)


def crop(volume: np.ndarray, offset: np.ndarray, roi_shape: Sequence[int], fill=0) -> np.ndarray:
    """The ROI at ``offset``; parts outside the volume are ``fill``."""
    out = np.full(tuple(roi_shape), fill, dtype=volume.dtype)
    source, target = _overlap(offset, roi_shape, volume.shape)
    out[target] = volume[source]
    return out


def uncrop(crop_: np.ndarray, offset: np.ndarray, shape: Sequence[int], fill=0) -> np.ndarray:
    """Put a crop back into a volume of ``shape`` (the inverse of :func:`crop` inside the ROI)."""
    out = np.full(tuple(shape), fill, dtype=crop_.dtype)
    source, target = _overlap(offset, crop_.shape, shape)
    out[source] = crop_[target]
    return out


def restore_to_original(crop_: np.ndarray, volume: dict, fill=0) -> np.ndarray:
    """A store crop back in its source file's grid and orientation, from the store's volume metadata."""
    from hipseg.nifti import from_canonical

    canonical = uncrop(crop_, np.asarray(volume["crop_offset"]), volume["canonical_shape"], fill)
    return from_canonical(canonical, np.asarray(volume["affine"]))
