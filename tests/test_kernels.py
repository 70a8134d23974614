"""The Numba kernels against plain numpy references."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hipseg import _kernels
from hipseg.augment import LUT, AugmentConfig, AugmentParams, SliceAugmenter
from hipseg.dataset import axis_geometry, slice_major
from hipseg.store import AXIS_NAMES


def test_half_lut_matches_numpy_for_every_finite_pattern():
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    values = bits.view(np.float16)
    finite = np.isfinite(values)
    np.testing.assert_array_equal(LUT[finite], values[finite].astype(np.float32))


def _edges_reference(volume, slice_, counts, threshold, width):
    out = np.zeros(counts.shape, np.uint8)
    for k in range(counts.shape[1]):
        for v in np.unique(volume):
            mine = (volume == v) & (counts[:, k] > 0)
            if not mine.any():
                continue
            vmax = counts[mine, k].max()
            first, last = slice_[mine].min(), slice_[mine].max()
            for r in np.flatnonzero(mine):
                c, s = counts[r, k], slice_[r]
                out[r, k] = c <= threshold * vmax or s < first + width or s > last - width
    return out


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    n_volumes=st.integers(1, 4),
    n_slices=st.integers(1, 12),
    threshold=st.floats(0.0, 1.0),
    width=st.integers(0, 3),
)
def test_classify_edges_matches_reference(seed, n_volumes, n_slices, threshold, width):
    rng = np.random.default_rng(seed)
    volume = np.repeat(np.arange(n_volumes, dtype=np.int32), n_slices)
    slice_ = np.tile(np.arange(n_slices, dtype=np.int32), n_volumes)
    counts = (rng.integers(0, 50, (volume.size, 2)) * (rng.random((volume.size, 2)) < 0.6)).astype(
        np.int32
    )
    order = rng.permutation(volume.size)  # the kernel must not rely on row order
    volume, slice_, counts = volume[order], slice_[order], np.ascontiguousarray(counts[order])
    out = np.zeros(counts.shape, np.uint8)
    _kernels.classify_edges(volume, slice_, counts, n_volumes, threshold, width, out)
    np.testing.assert_array_equal(out, _edges_reference(volume, slice_, counts, threshold, width))


def _volumes(n, roi, seed=0):
    """Images whose float16 values encode (volume, x, y, z); labels cycle through 0..2."""
    idx = np.indices((n, *roi)).astype(np.float32)
    images = ((idx[0] * 7 + idx[1] * 3 + idx[2] * 5 + idx[3]) % 97 / 97).astype(np.float16)
    labels = ((idx[1] + 2 * idx[2] + idx[3] + idx[0]) % 3).astype(np.uint8)
    return images, labels


def kernel_inputs(images, labels, axes):
    """Flat slice-major copies per axis, as the dataset builds them: kernel volume a * V + v."""
    flat_i = np.concatenate([slice_major(images, a).view(np.uint16).reshape(-1) for a in axes])
    flat_l = np.concatenate([slice_major(labels, a).reshape(-1) for a in axes])
    return flat_i, flat_l


def _identity_batch(images, labels, rows, axes, context, parallel=False):
    """rows: (volume, slice, axis id) in store terms."""
    roi = images.shape[1:]
    geom, canvas = axis_geometry(roi, axes)
    augmenter = SliceAugmenter(AugmentConfig.none(), canvas, parallel=parallel)
    B = rows.shape[0]
    out_image = np.full((B, 2 * context + 1, *canvas), np.nan, np.float32)
    out_label = np.full((B, 1, *canvas), -1, np.int64)
    kernel_rows = rows.copy()
    kernel_rows[:, 0] = rows[:, 2] * images.shape[0] + rows[:, 0]
    augmenter.apply(
        *kernel_inputs(images, labels, axes),
        int(np.prod(roi)),
        kernel_rows,
        geom,
        context,
        AugmentParams.identity(B),
        out_image,
        out_label,
    )
    return out_image, out_label, geom, canvas


@settings(max_examples=30, deadline=None)
@given(
    axis=st.sampled_from(AXIS_NAMES),
    context=st.integers(0, 3),
    seed=st.integers(0, 2**31),
    roi=st.tuples(st.integers(3, 9), st.integers(3, 9), st.integers(3, 9)),
)
def test_identity_extracts_slices_with_clamped_context(axis, context, seed, roi):
    images, labels = _volumes(3, roi)
    a = AXIS_NAMES.index(axis)
    rng = np.random.default_rng(seed)
    rows = np.stack([rng.integers(0, 3, 5), rng.integers(0, roi[a], 5), np.zeros(5, int)], 1)
    out_image, out_label, _, _ = _identity_batch(
        images, labels, rows.astype(np.int64), (axis,), context
    )
    for b, (v, s, _) in enumerate(rows):
        for c in range(2 * context + 1):
            sc = min(max(s + c - context, 0), roi[a] - 1)
            expected = np.take(images[v], sc, axis=a).astype(np.float32)
            np.testing.assert_array_equal(out_image[b, c], expected)
        np.testing.assert_array_equal(out_label[b, 0], np.take(labels[v], s, axis=a))


def test_mixed_axes_are_centred_on_a_zero_padded_canvas():
    roi = (4, 8, 6)
    images, labels = _volumes(2, roi)
    axes = ("sagittal", "axial")  # planes (8, 6) and (4, 8) -> canvas (8, 8)
    rows = np.array([[1, 2, 0], [0, 3, 1]], np.int64)
    out_image, out_label, geom, canvas = _identity_batch(images, labels, rows, axes, 0)
    assert canvas == (8, 8)
    expected = np.zeros((8, 8), np.float32)
    expected[:, 1:7] = images[1, 2].astype(np.float32)
    np.testing.assert_array_equal(out_image[0, 0], expected)
    expected = np.zeros((8, 8), np.float32)
    expected[2:6, :] = images[0, :, :, 3].astype(np.float32)
    np.testing.assert_array_equal(out_image[1, 0], expected)
    assert out_label[1, 0, :2].max() == 0 and out_label[1, 0, 6:].max() == 0


def _random_params(augmenter, batch, seed):
    return augmenter.draw(np.random.default_rng(seed), batch)


@pytest.mark.parametrize(
    "config", [AugmentConfig(), AugmentConfig(noise_std=0.1, intensity_scale=0.2)]
)
def test_parallel_kernel_equals_serial(config):
    roi = (12, 16, 10)
    images, labels = _volumes(4, roi)
    geom, canvas = axis_geometry(roi, ("axial",))
    rows = np.stack([np.arange(8) % 4, np.arange(8) % 10, np.zeros(8, int)], 1).astype(np.int64)
    outputs = []
    for parallel in (False, True):
        augmenter = SliceAugmenter(config, canvas, parallel=parallel)
        params = _random_params(augmenter, 8, seed=5)
        out_image = np.zeros((8, 3, *canvas), np.float32)
        out_label = np.zeros((8, 1, *canvas), np.int64)
        augmenter.apply(
            *kernel_inputs(images, labels, ("axial",)),
            int(np.prod(roi)),
            rows,
            geom,
            1,
            params,
            out_image,
            out_label,
        )
        outputs.append((out_image, out_label))
    np.testing.assert_array_equal(outputs[0][0], outputs[1][0])
    np.testing.assert_array_equal(outputs[0][1], outputs[1][1])


def test_noise_is_deterministic_standard_normal_per_seed():
    roi = (1, 64, 64)
    images = np.zeros((1, *roi), np.float16)
    labels = np.zeros((1, *roi), np.uint8)
    geom, canvas = axis_geometry(roi, ("sagittal",))
    augmenter = SliceAugmenter(AugmentConfig.none(), canvas)
    params = AugmentParams.identity(2)
    params.intensity[:, 2] = 1.0
    params.noise_seed[:] = [11, 12]
    outs = []
    for _ in range(2):
        out = np.zeros((2, 1, *canvas), np.float32)
        augmenter.apply(
            images.view(np.uint16).reshape(-1),
            labels.reshape(-1),
            64 * 64,
            np.zeros((2, 3), np.int64),
            geom,
            0,
            params,
            out,
            np.zeros((2, 1, *canvas), np.int64),
        )
        outs.append(out)
    np.testing.assert_array_equal(outs[0], outs[1])
    assert not np.array_equal(outs[0][0], outs[0][1])
    noise = outs[0].ravel()
    assert abs(noise.mean()) < 0.05 and abs(noise.std() - 1.0) < 0.05
