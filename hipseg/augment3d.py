"""3D patch augmentation: draw flip, rotation, scaling and elastic parameters per sample, apply in one kernel.

The 3D counterpart of ``hipseg.augment``: parameters come from an explicit
``numpy.random.Generator``; flip, the rotation about all three axes and the
isotropic scaling are composed into one 3x3 matrix per sample and passed,
with the coarse elastic control grid, to ``hipseg._kernels3d.augment3d_batch``,
which writes image (trilinear) and label (nearest) into batch buffers in one
pass. Same defaults as the slices: left-right flip, ±10° rotations, a gentle
B-spline field; scaling and intensity changes off.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from hipseg import _kernels3d
from hipseg.augment import LUT, AugmentConfig, spline_weights
from hipseg.errors import ConfigError


@dataclass(frozen=True)
class PatchAugmentConfig(AugmentConfig):
    """``AugmentConfig`` for 3D patches, plus optional isotropic scaling.

    The fields mean what they mean for slices, in voxels: ``flip`` mirrors array
    axis 0 (left-right in a RAS crop; the other axes never), ``rotate_degrees``
    bounds each of the three rotation angles (about axes 0, 1, 2) drawn uniformly,
    ``elastic_alpha`` / ``elastic_sigma`` are the control-point displacement
    standard deviation and spacing of the cubic B-spline field.

    scale : float
        Off by default. Isotropic zoom factor drawn from [1 - scale, 1 + scale].
    """

    scale: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (0.0 <= self.scale < 1.0 and math.isfinite(self.scale)):
            raise ConfigError(f"PatchAugmentConfig.scale must be within [0, 1), got {self.scale!r}")

    @property
    def is_identity(self) -> bool:
        return self == PatchAugmentConfig.none()

    @classmethod
    def from_augment(cls, config: AugmentConfig) -> PatchAugmentConfig:
        """The same strengths for patches (``scale`` off unless ``config`` is already one)."""
        if isinstance(config, PatchAugmentConfig):
            return config
        return cls(**config.to_dict())


def resolve_patch_config(augment: bool | AugmentConfig | dict) -> PatchAugmentConfig:
    """``True`` -> defaults, ``False`` -> identity, a dict or config as given."""
    if isinstance(augment, AugmentConfig):
        return PatchAugmentConfig.from_augment(augment)
    if isinstance(augment, bool):
        return PatchAugmentConfig() if augment else PatchAugmentConfig.none()
    if isinstance(augment, dict):
        return PatchAugmentConfig.from_dict(augment)
    raise ConfigError(f"augment must be True, False, a dict or an AugmentConfig, got {augment!r}")


def rotation_matrix(angles: np.ndarray) -> np.ndarray:
    """(B, 3, 3) float64 rotations R = R0 @ R1 @ R2 from (B, 3) angles in radians about axes 0, 1, 2."""
    B = angles.shape[0]
    out = np.empty((B, 3, 3))
    eye = np.eye(3)
    for b in range(B):
        m = eye
        for axis in range(3):
            i, j = [k for k in range(3) if k != axis]
            c, s = math.cos(angles[b, axis]), math.sin(angles[b, axis])
            r = np.eye(3)
            r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
            m = m @ r
        out[b] = m
    return out


@dataclass
class PatchParams:
    """Per-sample numbers for one batch, as the kernel takes them."""

    matrices: np.ndarray  # float32 (B, 3, 3): flip @ rotation * scale
    ctrl: np.ndarray  # float32 (B, 3, g0, g1, g2); g0 = 0 when the elastic field is off
    intensity: np.ndarray  # float32 (B, 3): scale, shift, noise std
    noise_seed: np.ndarray  # uint64 (B,)


class PatchAugmenter:
    """Draws parameters and runs the fused 3D kernel for one patch shape (P0, P1, P2).

    Built once per dataset, so spline tables are computed once and the output
    shape is known before the first batch.
    """

    def __init__(self, config: PatchAugmentConfig, patch: tuple[int, int, int],
                 parallel: bool = False) -> None:
        self.config = config
        self.patch = tuple(int(p) for p in patch)
        self.parallel = parallel
        tables = []
        for n in self.patch:
            if config.elastic_alpha > 0:
                w, first, n_ctrl = spline_weights(n, config.elastic_sigma)
            else:
                w, first, n_ctrl = np.zeros((0, 4), np.float32), np.zeros(0, np.int64), 0
            tables.append((w, first, n_ctrl))
        self.tables = [(w, i) for w, i, _ in tables]
        self.ctrl_shape = (3, *(n for _, _, n in tables)) if config.elastic_alpha > 0 else (3, 0, 0, 0)

    def draw(self, rng: np.random.Generator, batch: int) -> PatchParams:
        """Parameters for ``batch`` samples; always the same sequence of draws for one config."""
        cfg = self.config
        intensity = np.zeros((batch, 3), np.float32)
        intensity[:, 0] = 1.0
        if cfg.is_identity:
            return PatchParams(np.broadcast_to(np.eye(3, dtype=np.float32), (batch, 3, 3)).copy(),
                               np.zeros((batch, *self.ctrl_shape), np.float32), intensity,
                               np.zeros(batch, np.uint64))
        flip = rng.random(batch) < cfg.flip
        angles = np.deg2rad(rng.uniform(-cfg.rotate_degrees, cfg.rotate_degrees, (batch, 3)))
        zoom = 1.0 + rng.uniform(-cfg.scale, cfg.scale, batch)
        matrices = rotation_matrix(angles) * zoom[:, None, None]
        matrices[flip, 0, :] *= -1.0  # mirror the source's axis 0 (left-right) about the centre
        if self.ctrl_shape[1]:
            ctrl = rng.standard_normal((batch, *self.ctrl_shape), dtype=np.float32)
            ctrl *= np.float32(cfg.elastic_alpha)
        else:
            ctrl = np.zeros((batch, *self.ctrl_shape), np.float32)
        intensity[:, 0] = 1.0 + rng.uniform(-cfg.intensity_scale, cfg.intensity_scale, batch)
        intensity[:, 1] = rng.uniform(-cfg.intensity_shift, cfg.intensity_shift, batch)
        intensity[:, 2] = cfg.noise_std
        noise_seed = rng.integers(0, np.iinfo(np.uint64).max, batch, dtype=np.uint64, endpoint=True)
        return PatchParams(matrices.astype(np.float32), ctrl, intensity, noise_seed)

    def apply(self, images: np.ndarray, labels: np.ndarray, vol_shape: tuple[int, int, int],
              volumes: np.ndarray, centres: np.ndarray, params: PatchParams,
              out_image: np.ndarray, out_label: np.ndarray) -> None:
        """Fill ``out_image`` (B, 1, P0, P1, P2) float32 and ``out_label`` int64 in one call.

        ``images`` holds float16 bit patterns (uint16) and ``labels`` uint8, both flat
        over C-ordered crops of ``vol_shape``; ``volumes`` (B,) picks the crop of each
        sample and ``centres`` (B, 3) the source voxel its patch centre maps to.
        """
        B = volumes.shape[0]
        expected = (B, 1, *self.patch)
        if out_image.shape != expected or out_label.shape != expected:
            raise ConfigError(f"output buffers {out_image.shape} / {out_label.shape} do not match "
                              f"the batch {expected}")
        kernel = _kernels3d.augment3d_batch_parallel if self.parallel else _kernels3d.augment3d_batch
        (w0, i0), (w1, i1), (w2, i2) = self.tables
        kernel(images, labels, LUT, np.asarray(vol_shape, np.int64),
               np.ascontiguousarray(volumes, np.int64), np.ascontiguousarray(centres, np.float32),
               params.matrices, params.ctrl, w0, i0, w1, i1, w2, i2, params.intensity,
               params.noise_seed, out_image, out_label)


def warmup() -> None:
    """Compile (or load from Numba's disk cache) the serial 3D kernel with the production types.

    Called in the parent before workers fork (the parallel kernel is left alone:
    starting Numba's thread pool before a fork is unsafe).
    """
    images = np.zeros(8, np.uint16)
    labels = np.zeros(8, np.uint8)
    images.flags.writeable = False
    labels.flags.writeable = False
    augmenter = PatchAugmenter(PatchAugmentConfig(elastic_sigma=1.0), (2, 2, 2))
    params = augmenter.draw(np.random.default_rng(0), 1)
    augmenter.apply(images, labels, (2, 2, 2), np.zeros(1, np.int64), np.full((1, 3), 0.5, np.float32),
                    params, np.zeros((1, 1, 2, 2, 2), np.float32), np.zeros((1, 1, 2, 2, 2), np.int64))
