"""Counter-based per-sample streams: a batch draws exactly what its samples draw alone."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from hipseg.augment import AugmentConfig, SliceAugmenter
from hipseg.streams import SampleStreams, sample_keys


def _draws(streams: SampleStreams) -> list[np.ndarray]:
    b = streams.keys.size
    return [streams.random((b, 3)), streams.uniform(-2.0, 5.0, b),
            streams.standard_normal((b, 2, 4), dtype=np.float32),
            streams.integers(0, np.iinfo(np.uint64).max, b, dtype=np.uint64, endpoint=True),
            streams.integers(3, 9, (b, 2))]


def test_a_batch_equals_its_samples_drawn_one_by_one():
    items = np.array([7, 0, 123456, 7, 2**40])
    batch = _draws(SampleStreams(sample_keys((1, 2, 3), items)))
    for j, item in enumerate(items):
        alone = _draws(SampleStreams(sample_keys((1, 2, 3), np.array([item]))))
        for b, a in zip(batch, alone):
            np.testing.assert_array_equal(b[j], a[0])
    np.testing.assert_array_equal(batch[0][0], batch[0][3])  # same item, same numbers


def test_keys_depend_on_every_part():
    base = sample_keys((0, 5, 0, 0), np.arange(4))
    for other in [(1, 5, 0, 0), (0, 6, 0, 0), (0, 5, 1, 0), (0, 5, 0, 1)]:
        assert not np.intersect1d(base, sample_keys(other, np.arange(4))).size
    assert np.unique(sample_keys((0,), np.arange(10_000))).size == 10_000


def test_distributions():
    """Kolmogorov-Smirnov against the uniform and normal laws on a fixed seed (deterministic)."""
    s = SampleStreams(sample_keys((42,), np.arange(4000)))
    u = s.random((4000, 5)).ravel()
    assert 0.0 <= u.min() and u.max() < 1.0
    assert stats.kstest(u, "uniform").pvalue > 1e-3
    assert stats.kstest(s.standard_normal((4000, 5)).ravel(), "norm").pvalue > 1e-3
    k = s.integers(3, 9, (4000, 5))
    assert k.min() == 3 and k.max() == 8
    # neighbouring samples are independent streams, not shifted copies of one another
    assert abs(np.corrcoef(u.reshape(4000, 5)[:-1, 0], u.reshape(4000, 5)[1:, 0])[0, 1]) < 0.05


def test_the_augmenter_draws_from_streams_as_from_a_generator():
    augmenter = SliceAugmenter(AugmentConfig(), (48, 64))
    rows = np.arange(6)
    params = augmenter.draw(SampleStreams(sample_keys((0,), rows)), 6, np.ones((6, 2), np.uint8))
    assert params.ctrl.shape == (6, *augmenter.ctrl_shape) and params.ctrl.dtype == np.float32
    assert np.all(np.abs(np.rad2deg(params.angles)) <= 10.0 + 1e-5)


def test_a_draw_without_the_batch_axis_is_refused():
    with pytest.raises(ValueError, match="batch"):
        SampleStreams(sample_keys((0,), np.arange(3))).random((2, 3))
