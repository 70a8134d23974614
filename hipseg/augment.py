"""Augmentation: draw flip, rotation and elastic parameters per sample, apply them in one kernel.

Parameters are drawn with an explicit ``numpy.random.Generator`` (seeded by the
caller from seed, rank and batch number) and passed as numbers into
``hipseg._kernels.augment_batch``, which extracts each slice from its volume and
applies flip, rotation and elastic deformation in a single pass: image bilinear,
label nearest neighbour, one geometry for both. Defaults follow what works for
grayscale MRI: geometric transforms on; intensity scaling, shifts and noise off.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from hipseg import _kernels
from hipseg.errors import ConfigError


@dataclass(frozen=True)
class AugmentConfig:
    """What to randomise per sample.

    Parameters
    ----------
    flip : float
        Probability of a left-right flip. Only the left-right axis is ever
        flipped: left and right hippocampi are mirror images, whereas a flip of
        the anterior-posterior or superior-inferior axis would move the classes
        to where they never are. Sagittal slices have no left-right in-plane
        axis and are never flipped (see :func:`left_right_flip_mask`).
    rotate_degrees : float
        Rotation angle drawn uniformly from [-rotate_degrees, rotate_degrees].
    elastic_alpha : float
        Standard deviation, in pixels, of the random displacement at each
        control point of the elastic field; 0 turns the field off.
    elastic_sigma : float
        Control-point spacing in pixels: the field is a cubic B-spline through
        them, so this is its smoothness length (larger = smoother).
    intensity_scale, intensity_shift : float
        Off by default. Intensities are multiplied by a factor drawn from
        [1 - intensity_scale, 1 + intensity_scale] and shifted by one drawn from
        [-intensity_shift, intensity_shift].
    noise_std : float
        Off by default. Standard deviation of additive Gaussian noise.
    """

    flip: float = 0.5
    rotate_degrees: float = 10.0
    elastic_alpha: float = 1.5
    elastic_sigma: float = 12.0
    intensity_scale: float = 0.0
    intensity_shift: float = 0.0
    noise_std: float = 0.0

    def __post_init__(self) -> None:
        checks = [
            ("flip", 0.0 <= self.flip <= 1.0, "a probability in [0, 1]"),
            ("rotate_degrees", 0.0 <= self.rotate_degrees <= 180.0, "within [0, 180]"),
            ("elastic_alpha", self.elastic_alpha >= 0.0, "at least 0"),
            ("elastic_sigma", self.elastic_sigma >= 1.0, "at least 1 pixel"),
            ("intensity_scale", 0.0 <= self.intensity_scale < 1.0, "within [0, 1)"),
            ("intensity_shift", self.intensity_shift >= 0.0, "at least 0"),
            ("noise_std", self.noise_std >= 0.0, "at least 0"),
        ]
        for name, ok, expected in checks:
            value = getattr(self, name)
            if not (ok and math.isfinite(value)):
                raise ConfigError(f"AugmentConfig.{name} must be {expected}, got {value!r}")

    @classmethod
    def none(cls) -> AugmentConfig:
        """The identity: every strength zero."""
        return cls(flip=0.0, rotate_degrees=0.0, elastic_alpha=0.0)

    @property
    def is_identity(self) -> bool:
        return self == AugmentConfig.none()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AugmentConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"AugmentConfig: unknown field(s) {unknown}; known: {sorted(known)}")
        return cls(**{k: float(v) for k, v in data.items()})


def resolve_config(augment: bool | AugmentConfig | dict) -> AugmentConfig:
    """``True`` -> defaults, ``False`` -> identity, a dict or config as given."""
    if isinstance(augment, AugmentConfig):
        return augment
    if isinstance(augment, bool):
        return AugmentConfig() if augment else AugmentConfig.none()
    if isinstance(augment, dict):
        return AugmentConfig.from_dict(augment)
    raise ConfigError(f"augment must be True, False, a dict or an AugmentConfig, got {augment!r}")


def left_right_flip_mask(axes: Sequence[str]) -> np.ndarray:
    """(n_axes, 2) uint8: which in-plane axis (H, W) of a slice along each axis is left-right.

    Crops are RAS+, so left-right is array axis 0: the H axis of axial and coronal
    slices; sagittal slices have none.
    """
    return np.array([(1, 0) if axis != "sagittal" else (0, 0) for axis in axes], dtype=np.uint8)


@dataclass
class AugmentParams:
    """Per-sample numbers for one batch, as the kernel takes them."""

    flips: np.ndarray  # uint8 (B, 2)
    angles: np.ndarray  # float32 (B,), radians
    ctrl: np.ndarray  # float32 (B, 2, gh, gw); gh = 0 when the elastic field is off
    intensity: np.ndarray  # float32 (B, 3): scale, shift, noise std
    noise_seed: np.ndarray  # uint64 (B,)

    @classmethod
    def identity(cls, batch: int) -> AugmentParams:
        intensity = np.zeros((batch, 3), np.float32)
        intensity[:, 0] = 1.0
        return cls(
            np.zeros((batch, 2), np.uint8),
            np.zeros(batch, np.float32),
            np.zeros((batch, 2, 0, 0), np.float32),
            intensity,
            np.zeros(batch, np.uint64),
        )


def spline_weights(n: int, spacing: float) -> tuple[np.ndarray, np.ndarray, int]:
    """Uniform cubic B-spline weights (n, 4) and first control index (n,) for pixels 0..n-1.

    Returns the number of control points too: pixel p lies in cell floor(p / spacing)
    and reads control points cell .. cell + 3 (one before, two after, shifted by one).
    """
    t = np.arange(n, dtype=np.float64) / spacing
    cell = np.floor(t)
    u = t - cell
    weights = np.stack(
        [
            (1 - u) ** 3 / 6,
            (3 * u**3 - 6 * u**2 + 4) / 6,
            (-3 * u**3 + 3 * u**2 + 3 * u + 1) / 6,
            u**3 / 6,
        ],
        axis=1,
    ).astype(np.float32)
    n_ctrl = int(cell[-1]) + 4 if n else 0
    return np.ascontiguousarray(weights), cell.astype(np.int64), n_ctrl


def banded_weights(
    weights: np.ndarray, first: np.ndarray, n_ctrl: int
) -> tuple[np.ndarray, np.ndarray]:
    """The same weights as a dense (n_ctrl, n) matrix plus each control point's [start, stop) band.

    The kernel sums control columns along a row with contiguous inner loops that
    vectorise, instead of four gathers per pixel.
    """
    n = first.shape[0]
    dense = np.zeros((n_ctrl, n), np.float32)
    for t in range(4):
        dense[first + t, np.arange(n)] = weights[:, t]
    band = np.zeros((n_ctrl, 2), np.int64)
    for j in range(n_ctrl):
        nonzero = np.flatnonzero(dense[j])
        if nonzero.size:
            band[j] = (nonzero[0], nonzero[-1] + 1)
    return dense, band


class SliceAugmenter:
    """Draws parameters and runs the fused kernel for one output canvas (H, W).

    Built once per dataset, so spline tables are computed once and the output
    shape is known before the first batch.
    """

    def __init__(
        self, config: AugmentConfig, canvas: tuple[int, int], parallel: bool = False
    ) -> None:
        self.config = config
        self.canvas = (int(canvas[0]), int(canvas[1]))
        self.parallel = parallel
        H, W = self.canvas
        if config.elastic_alpha > 0:
            self.wy, self.iy, gh = spline_weights(H, config.elastic_sigma)
            self.wxd, self.xband = banded_weights(*spline_weights(W, config.elastic_sigma))
            gw = self.wxd.shape[0]
        else:
            self.wy, self.iy, gh = np.zeros((0, 4), np.float32), np.zeros(0, np.int64), 0
            self.wxd, self.xband, gw = np.zeros((0, W), np.float32), np.zeros((0, 2), np.int64), 0
        self.ctrl_shape = (2, gh, gw)

    def draw(self, rng: np.random.Generator, batch: int,
             flip_mask: np.ndarray | None = None) -> AugmentParams:
        """Parameters for ``batch`` samples; always the same sequence of draws for one config.

        ``flip_mask`` (B, 2) uint8 says which in-plane axes of each sample may be flipped
        (:func:`left_right_flip_mask`); None allows both.
        """
        cfg = self.config
        if cfg.is_identity:
            return AugmentParams.identity(batch)
        flips = (rng.random((batch, 2)) < cfg.flip).astype(np.uint8)
        if flip_mask is not None:
            flips *= flip_mask
        angles = np.deg2rad(rng.uniform(-cfg.rotate_degrees, cfg.rotate_degrees, batch)).astype(
            np.float32
        )
        if self.ctrl_shape[1]:
            ctrl = rng.standard_normal((batch, *self.ctrl_shape), dtype=np.float32)
            ctrl *= np.float32(cfg.elastic_alpha)
        else:
            ctrl = np.zeros((batch, 2, 0, 0), np.float32)
        intensity = np.empty((batch, 3), np.float32)
        intensity[:, 0] = 1.0 + rng.uniform(-cfg.intensity_scale, cfg.intensity_scale, batch)
        intensity[:, 1] = rng.uniform(-cfg.intensity_shift, cfg.intensity_shift, batch)
        intensity[:, 2] = cfg.noise_std
        noise_seed = rng.integers(0, np.iinfo(np.uint64).max, batch, dtype=np.uint64, endpoint=True)
        return AugmentParams(flips, angles, np.ascontiguousarray(ctrl), intensity, noise_seed)

    def apply(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        vol_stride: int,
        rows: np.ndarray,
        geom: np.ndarray,
        context: int,
        params: AugmentParams,
        out_image: np.ndarray,
        out_label: np.ndarray,
    ) -> None:
        """Fill ``out_image`` (B, C, H, W) float32 and ``out_label`` (B, 1, H, W) int64 in one call.

        ``images`` holds float16 bit patterns (uint16) and ``labels`` uint8, both
        flat over volumes of ``vol_stride`` voxels; see ``_kernels.augment_batch``.
        """
        B = rows.shape[0]
        expected = (B, 2 * context + 1, *self.canvas)
        if out_image.shape != expected or out_label.shape != (B, 1, *self.canvas):
            raise ConfigError(
                f"output buffers {out_image.shape} / {out_label.shape} do not match "
                f"the batch {expected}"
            )
        kernel = _kernels.augment_batch_parallel if self.parallel else _kernels.augment_batch
        kernel(
            images,
            labels,
            LUT,
            int(vol_stride),
            rows,
            geom,
            int(context),
            params.flips,
            params.angles,
            params.ctrl,
            self.wy,
            self.iy,
            self.wxd,
            self.xband,
            params.intensity,
            params.noise_seed,
            out_image,
            out_label,
        )


def warmup() -> None:
    """Compile (or load from Numba's disk cache) the serial kernel with the production types.

    Called in the parent before workers fork, so each of them does not compile it
    again; the parallel kernel is left alone there, because starting Numba's
    thread pool before a fork is unsafe.
    """
    images = np.zeros(8, np.uint16)
    labels = np.zeros(8, np.uint8)
    images.flags.writeable = False
    labels.flags.writeable = False
    geom = np.array([[4, 2, 1, 2, 2, 2, 0, 0]], np.int64)
    augmenter = SliceAugmenter(AugmentConfig(), (2, 2))
    params = augmenter.draw(np.random.default_rng(0), 1)
    augmenter.apply(
        images,
        labels,
        8,
        np.zeros((1, 3), np.int64),
        geom,
        0,
        params,
        np.zeros((1, 1, 2, 2), np.float32),
        np.zeros((1, 1, 2, 2), np.int64),
    )


LUT = _kernels.half_lut()
LUT.flags.writeable = False
