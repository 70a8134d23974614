"""Crop geometry, normalisation and orientation: property tests against plain numpy."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, ornt_transform

from hipseg.nifti import from_canonical, to_canonical
from hipseg.preprocess import (
    crop,
    derive_roi_shape,
    label_bbox,
    normalise_intensity,
    roi_offset,
    uncrop,
)

shapes = st.tuples(*[st.integers(4, 20)] * 3)


@settings(max_examples=60, deadline=None)
@given(shape=shapes, roi=shapes, data=st.data())
def test_crop_then_uncrop_restores_the_overlap(shape, roi, data):
    offset = np.array([data.draw(st.integers(-r, s)) for r, s in zip(roi, shape)])
    volume = np.arange(np.prod(shape), dtype=np.int32).reshape(shape) + 1  # every voxel unique
    cropped = crop(volume, offset, roi)
    restored = uncrop(cropped, offset, shape)
    inside = np.zeros(shape, bool)
    inside[tuple(slice(max(o, 0), max(min(o + r, s), 0)) for o, r, s in zip(offset, roi, shape))] = True
    np.testing.assert_array_equal(restored[inside], volume[inside])
    assert (restored[~inside] == 0).all()
    # And every crop voxel is the volume voxel at index + offset, or 0 outside the volume.
    for index in [(0, 0, 0), tuple(r - 1 for r in roi)]:
        source = np.add(index, offset)
        inside_volume = all(0 <= v < s for v, s in zip(source, shape))
        assert cropped[index] == (volume[tuple(source)] if inside_volume else 0)


@settings(max_examples=40, deadline=None)
@given(shape=shapes, data=st.data())
def test_roi_around_bbox_contains_every_labelled_voxel(shape, data):
    label = np.zeros(shape, np.uint8)
    start = [data.draw(st.integers(0, s - 1)) for s in shape]
    stop = [data.draw(st.integers(a + 1, s)) for a, s in zip(start, shape)]
    label[tuple(slice(a, b) for a, b in zip(start, stop))] = 2
    box = label_bbox(label)
    assert box is not None and list(box[0]) == start and list(box[1]) == stop
    roi = derive_roi_shape([np.subtract(stop, start)], margin=2, multiple=8)
    offset = roi_offset(*box, roi)
    np.testing.assert_array_equal(uncrop(crop(label, offset, roi), offset, shape), label)


def test_label_bbox_of_empty_label_is_none():
    assert label_bbox(np.zeros((4, 4, 4))) is None


def test_roi_shape_rounds_up_to_multiple():
    assert derive_roi_shape([(30, 41, 20), (33, 40, 25)], margin=4) == (48, 64, 48)


@pytest.mark.parametrize("dtype,scale", [(np.uint8, 1.0), (np.float32, 1.0), (np.float32, 1e6)])
def test_normalisation_is_robust_to_dtype_and_outliers(dtype, scale):
    rng = np.random.default_rng(0)
    image = (rng.uniform(20, 200, (30, 30, 30)) * scale).astype(dtype)
    image.flat[:10] = np.iinfo(np.uint8).max if dtype == np.uint8 else 1e9  # a few hot voxels
    normalised, lo, hi = normalise_intensity(image)
    assert normalised.dtype == np.float32
    assert normalised.min() == 0.0 and normalised.max() == 1.0
    assert lo < hi
    # The hot voxels are clipped instead of squashing everything else towards 0.
    assert np.median(normalised) > 0.3


ALL_AXCODES = [
    "".join(p) for perm in itertools.permutations(["RL", "AP", "SI"]) for p in itertools.product(*perm)
]


@pytest.mark.parametrize("axcodes", ALL_AXCODES)
def test_canonical_round_trip_for_every_orientation(axcodes):
    canonical = np.arange(3 * 4 * 5).reshape(3, 4, 5)
    transform = ornt_transform(axcodes2ornt("RAS"), axcodes2ornt(tuple(axcodes)))
    oriented = apply_orientation(canonical, transform)
    affine = np.diag([1.0, 1.0, 1.0, 1.0]) @ inv_ornt_aff(transform, canonical.shape)
    np.testing.assert_array_equal(to_canonical(oriented, affine), canonical)
    np.testing.assert_array_equal(from_canonical(canonical, affine), oriented)
