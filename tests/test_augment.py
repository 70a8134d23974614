"""Augmentation: configuration, and the fused kernel against numpy / scipy.ndimage references.

Tolerances: bilinear rotation agrees with ``scipy.ndimage.rotate(order=1,
mode="nearest", reshape=False)`` within 1e-5 (float32 rounding); nearest-neighbour
labels may differ from ``order=0`` on at most 0.5% of pixels (ties at exactly
half a pixel, which random angles essentially never hit).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage

from hipseg.augment import (
    AugmentConfig,
    AugmentParams,
    SliceAugmenter,
    resolve_config,
    spline_weights,
)
from hipseg.dataset import axis_geometry
from hipseg.errors import ConfigError

IMAGE_TOL = 1e-5
LABEL_MISMATCH = 0.005


def _slice_data(shape=(24, 32), seed=0):
    """A smooth image (so bilinear differences stay small) and a 3-class label, as float16/uint8."""
    rng = np.random.default_rng(seed)
    image = ndimage.gaussian_filter(rng.random(shape), 1.5)
    image = ((image - image.min()) / np.ptp(image)).astype(np.float16)
    label = np.zeros(shape, np.uint8)
    label[4:14, 6:20] = 1
    label[10:20, 15:28] = 2
    return image, label


def _run(image, label, params, config=None):
    """Augment one 2D slice (a volume of depth 1 viewed along 'axial')."""
    config = AugmentConfig.none() if config is None else config
    H, W = image.shape
    roi = (H, W, 1)
    geom, canvas = axis_geometry(roi, ("axial",))
    augmenter = SliceAugmenter(config, canvas)
    B = params.flips.shape[0]
    out_image = np.zeros((B, 1, H, W), np.float32)
    out_label = np.zeros((B, 1, H, W), np.int64)
    augmenter.apply(
        np.ascontiguousarray(image).view(np.uint16).reshape(-1),
        label.reshape(-1),
        H * W,
        np.zeros((B, 3), np.int64),
        geom,
        0,
        params,
        out_image,
        out_label,
    )
    return out_image[:, 0], out_label[:, 0]


def _params(flips=(0, 0), degrees=0.0):
    p = AugmentParams.identity(1)
    p.flips[0] = flips
    p.angles[0] = np.deg2rad(degrees)
    return p


@pytest.mark.parametrize("flips", [(1, 0), (0, 1), (1, 1)])
def test_flips_equal_np_flip(flips):
    image, label = _slice_data()
    out_image, out_label = _run(image, label, _params(flips))
    axes = tuple(a for a in (0, 1) if flips[a])
    np.testing.assert_array_equal(out_image[0], np.flip(image.astype(np.float32), axes))
    np.testing.assert_array_equal(out_label[0], np.flip(label, axes))


@pytest.mark.parametrize("degrees", [-10.0, -3.3, 4.0, 10.0, 45.0])
@pytest.mark.parametrize("flips", [(0, 0), (1, 0)])
def test_rotation_matches_scipy(degrees, flips):
    image, label = _slice_data()
    out_image, out_label = _run(image, label, _params(flips, degrees))
    axes = tuple(a for a in (0, 1) if flips[a])
    src_image = np.flip(image.astype(np.float32), axes)
    src_label = np.flip(label, axes)
    ref_image = ndimage.rotate(src_image, degrees, reshape=False, order=1, mode="nearest")
    ref_label = ndimage.rotate(src_label, degrees, reshape=False, order=0, mode="nearest")
    assert np.abs(out_image[0] - ref_image).max() <= IMAGE_TOL
    assert (out_label[0] != ref_label).mean() <= LABEL_MISMATCH
    assert (out_label[0] != src_label).any()  # the rotation did something


def test_zero_strength_draws_are_the_identity():
    config = AugmentConfig(flip=0.0, rotate_degrees=0.0, elastic_alpha=0.0)
    assert config.is_identity
    image, label = _slice_data()
    H, W = image.shape
    augmenter = SliceAugmenter(config, (H, W))
    params = augmenter.draw(np.random.default_rng(3), 4)
    out_image, out_label = _run(np.ascontiguousarray(image), label, params, config)
    for b in range(4):
        np.testing.assert_array_equal(out_image[b], image.astype(np.float32))
        np.testing.assert_array_equal(out_label[b], label)


def test_elastic_with_zero_rotation_and_flip_moves_pixels_smoothly():
    H, W = 48, 64
    ramp = np.tile(np.arange(W, dtype=np.float16), (H, 1))  # value = x, exact in float16
    config = AugmentConfig(flip=0.0, rotate_degrees=0.0, elastic_alpha=2.0, elastic_sigma=12.0)
    augmenter = SliceAugmenter(config, (H, W))
    params = augmenter.draw(np.random.default_rng(0), 1)
    out_image, _ = _run(ramp, np.zeros((H, W), np.uint8), params, config)
    dx = out_image[0, :, 4:-4] - ramp[:, 4:-4].astype(
        np.float32
    )  # the x displacement, away from borders
    assert 0.2 < np.abs(dx).max() < 8.0  # moved, by a few pixels
    # Smooth: neighbouring displacements differ by far less than the displacement itself.
    assert np.abs(np.diff(dx, axis=1)).max() < 0.5
    assert np.abs(np.diff(dx, axis=0)).max() < 0.5


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    flip=st.floats(0, 1),
    degrees=st.floats(0, 180),
    alpha=st.floats(0, 6),
    sigma=st.floats(1, 30),
)
def test_labels_never_leave_the_class_set(seed, flip, degrees, alpha, sigma):
    image, label = _slice_data(seed=seed % 7)
    config = AugmentConfig(
        flip=flip, rotate_degrees=degrees, elastic_alpha=alpha, elastic_sigma=sigma
    )
    augmenter = SliceAugmenter(config, image.shape)
    params = augmenter.draw(np.random.default_rng(seed), 3)
    out_image, out_label = _run(image, label, params, config)
    assert set(np.unique(out_label)) <= {0, 1, 2}
    assert np.isfinite(out_image).all()
    assert out_image.min() >= 0.0 and out_image.max() <= 1.0  # interpolation stays in range


def test_intensity_scale_and_shift_apply_per_sample():
    image, label = _slice_data()
    params = AugmentParams.identity(2)
    params.intensity[:, 0] = [1.5, 0.5]
    params.intensity[:, 1] = [0.1, -0.2]
    out_image, _ = _run(image, label, params)
    src = image.astype(np.float32)
    np.testing.assert_allclose(out_image[0], src * 1.5 + 0.1, atol=1e-6)
    np.testing.assert_allclose(out_image[1], src * 0.5 - 0.2, atol=1e-6)


def test_draw_is_deterministic_and_within_ranges():
    config = AugmentConfig(rotate_degrees=7.0, intensity_scale=0.1)
    augmenter = SliceAugmenter(config, (32, 48))
    a = augmenter.draw(np.random.default_rng(1), 500)
    b = augmenter.draw(np.random.default_rng(1), 500)
    for field in ("flips", "angles", "ctrl", "intensity", "noise_seed"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert np.abs(a.angles).max() <= np.deg2rad(7.0) + 1e-7
    assert 0.4 < a.flips.mean() < 0.6
    assert np.abs(a.intensity[:, 0] - 1).max() <= 0.1 + 1e-6
    assert a.ctrl.shape == (500, 2, *augmenter.ctrl_shape[1:])


@pytest.mark.parametrize("n,spacing", [(48, 12.0), (64, 7.5), (5, 30.0), (1, 1.0)])
def test_spline_weights_partition_unity_and_stay_in_grid(n, spacing):
    weights, first, n_ctrl = spline_weights(n, spacing)
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, atol=1e-6)
    assert (weights >= 0).all()
    assert first.min() >= 0 and first.max() + 3 < n_ctrl


def test_config_validation_and_round_trip():
    config = AugmentConfig(flip=0.2, noise_std=0.05)
    assert AugmentConfig.from_dict(config.to_dict()) == config
    assert resolve_config(False) == AugmentConfig.none()
    assert resolve_config(True) == AugmentConfig()
    assert resolve_config(config.to_dict()) == config
    with pytest.raises(ConfigError, match="flip"):
        AugmentConfig(flip=1.5)
    with pytest.raises(ConfigError, match="elastic_sigma"):
        AugmentConfig(elastic_sigma=0.0)
    with pytest.raises(ConfigError, match="unknown"):
        AugmentConfig.from_dict({"brightness": 1})
    with pytest.raises(ConfigError):
        resolve_config("yes")
