"""Per-sample random streams for whole batches: counter-based, so a batch draws what its samples would.

``__getitems__`` must give each sample the numbers that ``ds[i]`` alone would give
it. Seeding one ``numpy.random.Generator`` per sample does that, but costs about
37 µs per sample with its draws (1.2 ms per batch of 32, docs/benchmarks.md), close to
the fused kernel's whole work on a slice. A
counter-based generator has no state to seed: the k-th number of sample i is a
pure hash of (key_i, k), computed for the whole batch in a few numpy operations.

The hash is SplitMix64's output function over the Weyl sequence key + k * gamma
(Steele, Lea & Flood, "Fast splittable pseudorandom number generators", OOPSLA
2014; the generator Java's ``SplittableRandom`` uses), which passes BigCrush.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

_GAMMA = np.uint64(0x9E3779B97F4A7C15)  # 2^64 / golden ratio, odd (SplitMix64)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_MASK = (1 << 64) - 1


def _mix(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on uint64 arrays (wrapping arithmetic)."""
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def sample_keys(base: Sequence[int], items: np.ndarray) -> np.ndarray:
    """uint64 (B,) stream keys, a hash of ``(*base, item)`` for each item.

    ``base`` is e.g. (seed, tag, rank, epoch); ``items`` (B,) the dataset indices.
    """
    key = np.zeros(1, np.uint64)
    for value in base:
        key = _mix(key + _GAMMA + np.array([int(value) & _MASK], np.uint64))
    return _mix(key + _GAMMA + (np.asarray(items).astype(np.int64).astype(np.uint64)))


class SampleStreams:
    """A ``numpy.random.Generator`` look-alike for a batch: row i of every draw comes from stream i.

    Every draw's shape starts with the batch size B; each row draws the same count of
    numbers per call, so row i's numbers depend only on ``keys[i]`` and the calls made
    before, never on the other rows: drawing a batch equals drawing each sample alone.
    Only the methods the augmenters and samplers call are provided.

    Parameters
    ----------
    keys
        uint64 (B,), e.g. from :func:`sample_keys`.
    """

    def __init__(self, keys: np.ndarray) -> None:
        self.keys = np.ascontiguousarray(keys, dtype=np.uint64).reshape(-1)
        self.counter = 0

    def _shape(self, size: int | Sequence[int]) -> tuple[int, ...]:
        shape = (int(size),) if np.isscalar(size) else tuple(int(s) for s in size)
        if not shape or shape[0] != self.keys.size:
            raise ValueError(f"draws need the batch ({self.keys.size}) as first axis, got {shape}")
        return shape

    def _bits(self, shape: tuple[int, ...]) -> np.ndarray:
        n = int(np.prod(shape[1:], dtype=np.int64))
        counters = np.arange(self.counter + 1, self.counter + 1 + n, dtype=np.uint64)
        self.counter += n
        return _mix(self.keys[:, None] + counters[None, :] * _GAMMA).reshape(shape)

    def random(self, size: int | Sequence[int]) -> np.ndarray:
        """float64 uniforms in [0, 1) (53 random bits each)."""
        return (self._bits(self._shape(size)) >> np.uint64(11)).astype(np.float64) * 2.0**-53

    def uniform(self, low: float, high: float, size: int | Sequence[int]) -> np.ndarray:
        return low + (high - low) * self.random(size)

    def standard_normal(self, size: int | Sequence[int], dtype: type = np.float64) -> np.ndarray:
        """Normal deviates by the Box-Muller transform of two uniforms each."""
        u1, u2 = self.random(size), self.random(size)
        return (np.sqrt(-2.0 * np.log1p(-u1)) * np.cos(2.0 * np.pi * u2)).astype(dtype)

    def integers(self, low: int, high: int, size: int | Sequence[int], dtype: type = np.int64,
                 endpoint: bool = False) -> np.ndarray:
        """Integers in [low, high) ([low, high] with ``endpoint``); the full uint64 range is exact,
        smaller ranges take the remainder of 64 random bits (bias below span / 2^64)."""
        bits = self._bits(self._shape(size))
        span = int(high) - int(low) + int(endpoint)
        if span <= 0:
            raise ValueError(f"empty range [{low}, {high}{']' if endpoint else ')'}")
        if low == 0 and span == 1 << 64:
            return bits.astype(dtype)
        return (np.int64(low) + (bits % np.uint64(span)).astype(np.int64)).astype(dtype)
