"""The fused 3D augmentation kernel against scipy.ndimage on the same drawn parameters."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage

from hipseg.augment import spline_weights
from hipseg.augment3d import PatchAugmentConfig, PatchAugmenter, PatchParams, rotation_matrix
from hipseg.errors import ConfigError

VOL = (14, 17, 12)


def _volumes(seed: int, n: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Smooth images (so trilinear differences stay small) and blocky labels 0..2."""
    rng = np.random.default_rng(seed)
    image = ndimage.gaussian_filter(rng.random((n, *VOL)), (0, 1, 1, 1)).astype(np.float16)
    label = (ndimage.zoom(rng.integers(0, 3, (n, 4, 5, 4)), (1, 4, 4, 3), order=0)[
        :, : VOL[0], : VOL[1], : VOL[2]]).astype(np.uint8)
    return image, label


def _run(augmenter, image, label, params, centres, volumes=None):
    B = centres.shape[0]
    volumes = np.arange(B) % image.shape[0] if volumes is None else volumes
    out_image = np.full((B, 1, *augmenter.patch), np.nan, np.float32)
    out_label = np.full((B, 1, *augmenter.patch), -1, np.int64)
    augmenter.apply(image.view(np.uint16).reshape(-1), label.reshape(-1), VOL, volumes, centres,
                    params, out_image, out_label)
    return out_image, out_label


def _coordinates(augmenter, params, centres, b):
    """Source coordinates (3, P0, P1, P2) of every output voxel, from the dense B-spline field."""
    patch = np.array(augmenter.patch)
    grid = np.stack(np.meshgrid(*[np.arange(p) for p in patch], indexing="ij")).astype(np.float64)
    q = grid - ((patch - 1) / 2.0)[:, None, None, None]
    if params.ctrl.shape[2]:
        dense = []
        for n, g in zip(patch, params.ctrl.shape[2:], strict=True):
            w, first, _ = spline_weights(int(n), augmenter.config.elastic_sigma)
            m = np.zeros((n, g))
            for t in range(4):
                m[np.arange(n), first + t] = w[:, t]
            dense.append(m)
        q = q + np.einsum("xi,yj,zk,cijk->cxyz", *dense, params.ctrl[b].astype(np.float64))
    return centres[b].astype(np.float64)[:, None, None, None] + np.einsum(
        "ij,jxyz->ixyz", params.matrices[b].astype(np.float64), q)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31), scale=st.sampled_from([0.0, 0.15]),
       patch=st.sampled_from([VOL, (8, 9, 6), (14, 10, 12)]))
def test_affine_matches_scipy_affine_transform(seed, scale, patch):
    image, label = _volumes(seed)
    augmenter = PatchAugmenter(PatchAugmentConfig(elastic_alpha=0.0, scale=scale), patch)
    rng = np.random.default_rng(seed)
    params = augmenter.draw(rng, 2)
    centres = (rng.random((2, 3)) * (np.array(VOL) - 1)).astype(np.float32)
    out_image, out_label = _run(augmenter, image, label, params, centres)
    c = (np.array(patch) - 1) / 2.0
    for b in range(2):
        matrix = params.matrices[b].astype(np.float64)
        offset = centres[b] - matrix @ c
        want = ndimage.affine_transform(image[b].astype(np.float32), matrix, offset=offset,
                                        output_shape=patch, order=1, mode="nearest")
        np.testing.assert_allclose(out_image[b, 0], want, atol=1e-4)
        # Nearest neighbour: exact wherever no coordinate sits near a tie.
        coords = _coordinates(augmenter, params, centres, b)
        clamped = np.clip(coords, 0, (np.array(VOL) - 1)[:, None, None, None])
        safe = (np.abs(clamped - np.floor(clamped) - 0.5) > 1e-3).all(axis=0)
        want_label = ndimage.affine_transform(label[b], matrix, offset=offset, output_shape=patch,
                                              order=0, mode="nearest")
        np.testing.assert_array_equal(out_label[b, 0][safe], want_label[safe])


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31), sigma=st.sampled_from([3.0, 5.0]))
def test_elastic_matches_map_coordinates(seed, sigma):
    image, label = _volumes(seed)
    config = PatchAugmentConfig(elastic_alpha=1.5, elastic_sigma=sigma, scale=0.1)
    augmenter = PatchAugmenter(config, (10, 12, 9))
    rng = np.random.default_rng(seed)
    params = augmenter.draw(rng, 2)
    centres = (rng.random((2, 3)) * (np.array(VOL) - 1)).astype(np.float32)
    out_image, out_label = _run(augmenter, image, label, params, centres)
    for b in range(2):
        coords = _coordinates(augmenter, params, centres, b)
        want = ndimage.map_coordinates(image[b].astype(np.float32), coords, order=1, mode="nearest")
        np.testing.assert_allclose(out_image[b, 0], want, atol=1e-4)
        clamped = np.clip(coords, 0, (np.array(VOL) - 1)[:, None, None, None])
        safe = (np.abs(clamped - np.floor(clamped) - 0.5) > 1e-3).all(axis=0)
        want_label = ndimage.map_coordinates(label[b], coords, order=0, mode="nearest")
        np.testing.assert_array_equal(out_label[b, 0][safe], want_label[safe])
        assert set(np.unique(out_label[b])) <= {0, 1, 2}


def test_zero_strength_is_the_identity():
    image, label = _volumes(1)
    augmenter = PatchAugmenter(PatchAugmentConfig.none(), VOL)
    params = augmenter.draw(np.random.default_rng(0), 2)
    centres = np.tile(((np.array(VOL) - 1) / 2.0).astype(np.float32), (2, 1))
    out_image, out_label = _run(augmenter, image, label, params, centres)
    np.testing.assert_array_equal(out_image[:, 0], image.astype(np.float32))
    np.testing.assert_array_equal(out_label[:, 0], label)


def test_flip_is_np_flip_on_the_left_right_axis_only():
    image, label = _volumes(2)
    augmenter = PatchAugmenter(
        PatchAugmentConfig(flip=1.0, rotate_degrees=0.0, elastic_alpha=0.0), VOL)
    params = augmenter.draw(np.random.default_rng(0), 2)
    np.testing.assert_array_equal(params.matrices, np.tile(np.diag([-1.0, 1, 1]), (2, 1, 1)))
    centres = np.tile(((np.array(VOL) - 1) / 2.0).astype(np.float32), (2, 1))
    out_image, out_label = _run(augmenter, image, label, params, centres)
    np.testing.assert_array_equal(out_image[:, 0], np.flip(image, axis=1).astype(np.float32))
    np.testing.assert_array_equal(out_label[:, 0], np.flip(label, axis=1))


def test_rotation_matrix_is_a_rotation():
    angles = np.random.default_rng(0).uniform(-0.3, 0.3, (5, 3))
    m = rotation_matrix(angles)
    np.testing.assert_allclose(m @ np.transpose(m, (0, 2, 1)), np.tile(np.eye(3), (5, 1, 1)),
                               atol=1e-12)
    np.testing.assert_allclose(np.linalg.det(m), 1.0)


@pytest.mark.parametrize("parallel", [False, True])
def test_serial_and_parallel_agree_and_batches_are_per_sample(parallel):
    image, label = _volumes(3, n=3)
    config = PatchAugmentConfig(elastic_sigma=4.0)
    rng = np.random.default_rng(5)
    serial = PatchAugmenter(config, (9, 10, 8))
    params = serial.draw(rng, 3)
    centres = np.array([[6, 8, 5], [7, 8, 6], [5.5, 9, 5.5]], np.float32)
    want = _run(serial, image, label, params, centres)
    got = _run(PatchAugmenter(config, (9, 10, 8), parallel=parallel), image, label, params, centres)
    np.testing.assert_array_equal(want[0], got[0])
    np.testing.assert_array_equal(want[1], got[1])
    one = PatchParams(*(a[1:2] for a in (params.matrices, params.ctrl, params.intensity,
                                         params.noise_seed)))
    alone = _run(serial, image, label, one, centres[1:2], volumes=np.array([1]))
    np.testing.assert_array_equal(alone[0][0], want[0][1])


def test_config_validation_and_draws_are_seeded():
    with pytest.raises(ConfigError, match="scale"):
        PatchAugmentConfig(scale=1.5)
    augmenter = PatchAugmenter(PatchAugmentConfig(), (16, 16, 16))
    a = augmenter.draw(np.random.default_rng(4), 3)
    b = augmenter.draw(np.random.default_rng(4), 3)
    np.testing.assert_array_equal(a.matrices, b.matrices)
    np.testing.assert_array_equal(a.ctrl, b.ctrl)
    angles = np.degrees(np.arcsin(np.clip(np.abs(a.matrices[:, 0, 2]), 0, 1)))
    assert (angles <= 10.0 + 1e-4).all()
