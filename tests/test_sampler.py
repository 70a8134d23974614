"""The sampler: determinism, rank sharding, oversampling rates, case subsets (slice tables only)."""

from __future__ import annotations

import numpy as np
import pytest

from hipseg.errors import ConfigError
from hipseg.sampler import SamplerConfig, SliceSampler, build_index, select_volumes

N_VOLUMES, N_SLICES = 10, 40


def _table(n_volumes=N_VOLUMES, n_slices=N_SLICES):
    """Per volume: anterior (1) in slices 8..19 and posterior (2) in 16..27, shifted by the volume
    index; counts form a tent (small at both ends, largest in the middle)."""
    rows = []
    for v in range(n_volumes):
        for s in range(n_slices):
            a = s - 8 - v % 3
            p = s - 16 - v % 3
            anterior = (6 - abs(a - 5.5)) * 10 if 0 <= a < 12 else 0
            posterior = (6 - abs(p - 5.5)) * 10 if 0 <= p < 12 else 0
            rows.append((v, s, int(anterior), int(posterior)))
    return np.array(rows, np.int32)


CASES = [f"case_{i:02d}" for i in range(N_VOLUMES)]


def _index(config=None, cases=None, axes=("axial",)):
    config = SamplerConfig() if config is None else config
    tables = {axis: _table() for axis in axes}
    return build_index(tables, CASES, select_volumes(CASES, cases), config)


def test_edge_slices_are_the_ends_and_small_counts():
    index = _index(SamplerConfig(edge_threshold=0.25, edge_width=1))
    v0 = index.volume == 0
    anterior_edge = index.slice[v0 & (index.edge[:, 0] > 0)]
    # counts 5, 15, 25, ..., 55, 55, ..., 5: at most 0.25 * 55 = 13.75 -> the end slices only.
    np.testing.assert_array_equal(anterior_edge, [8, 19])
    index = _index(SamplerConfig(edge_threshold=0.5, edge_width=2))
    assert sorted(index.slice[v0 & (index.edge[:, 1] > 0)]) == [16, 17, 18, 25, 26, 27]


def test_batches_are_deterministic_and_depend_on_seed_rank_and_number():
    index = _index()
    a = SliceSampler(index, seed=3, batch_size=16)
    b = SliceSampler(index, seed=3, batch_size=16)
    np.testing.assert_array_equal(a.batch_rows(7), b.batch_rows(7))
    assert not np.array_equal(a.batch_rows(7), a.batch_rows(8))
    assert not np.array_equal(
        a.batch_rows(7), SliceSampler(index, seed=4, batch_size=16).batch_rows(7)
    )
    other_rank = SliceSampler(index, seed=3, batch_size=16, rank=1, world_size=2)
    assert not np.array_equal(a.batch_rows(7), other_rank.batch_rows(7))
    # Augmentation streams are reproducible too and apart from the row draws.
    assert a.augment_rng(7).random() == b.augment_rng(7).random() != a.augment_rng(8).random()


def test_infinite_iteration_from_start_batch_continues_the_stream():
    index = _index()
    full = SliceSampler(index, batch_size=5, seed=1)
    resumed = SliceSampler(index, batch_size=5, seed=1, start_batch=3)
    it_full, it_resumed = iter(full), iter(resumed)
    head = [next(it_full) for _ in range(5 * 6)]
    tail = [next(it_resumed) for _ in range(5 * 3)]
    assert head[15:] == tail


@pytest.mark.parametrize("world_size", [1, 2, 3, 7])
def test_epoch_shards_cover_everything_once(world_size):
    index = _index()
    batch = 16
    seen = []
    for rank in range(world_size):
        sampler = SliceSampler(
            index, batch_size=batch, rank=rank, world_size=world_size, mode="epoch"
        )
        sampler.set_epoch(2)
        rows = [sampler.batch_rows(k, 2) for k in range(sampler.batches_per_epoch())]
        assert all(len(r) == batch for r in rows[:-1]) and 0 < len(rows[-1]) <= batch
        assert list(sampler) == np.concatenate(rows).tolist() == sampler.shard(2).tolist()
        assert len(sampler) == len(sampler.shard(2))
        seen.append(np.concatenate(rows))
    sizes = [s.size for s in seen]
    assert max(sizes) - min(sizes) <= 1
    everything = np.concatenate(seen)
    assert everything.size == len(index)
    np.testing.assert_array_equal(np.sort(everything), np.arange(len(index)))


def test_epochs_reshuffle():
    sampler = SliceSampler(_index(), mode="epoch")
    first = sampler.shard(0).copy()
    assert not np.array_equal(first, sampler.shard(1))
    np.testing.assert_array_equal(first, sampler.shard(0))


def _draw_many(index, config, n_batches=600, batch=32):
    sampler = SliceSampler(index, config, batch_size=batch, seed=11)
    return np.concatenate([sampler.batch_rows(k) for k in range(n_batches)])


@pytest.mark.parametrize("fraction", [0.0, 1.0 / 3.0, 0.5, 1.0])
def test_foreground_oversampling_rate(fraction):
    index = _index()
    config = SamplerConfig(foreground_fraction=fraction)
    rows = _draw_many(index, config)
    p = index.foreground.mean()  # the uniform draws hit foreground this often
    expected = fraction + (1 - fraction) * p
    observed = index.foreground[rows].mean()
    tolerance = 4 * np.sqrt(expected * (1 - expected) / rows.size) + 1e-9
    assert abs(observed - expected) <= tolerance, (observed, expected)


def test_every_batch_holds_its_foreground_share():
    index = _index()
    sampler = SliceSampler(index, SamplerConfig(foreground_fraction=0.25), batch_size=32, seed=2)
    for k in range(50):
        assert index.foreground[sampler.batch_rows(k)].sum() >= 8


def test_foreground_draws_balance_classes_and_favour_edges():
    index = _index()
    config = SamplerConfig(foreground_fraction=1.0, edge_fraction=0.4)
    rows = _draw_many(index, config)
    has = index.counts[rows] > 0
    # Each class is chosen half of the time; slices holding both add to either share.
    assert has[:, 0].mean() >= 0.47 and has[:, 1].mean() >= 0.47
    edge = (index.edge[rows] > 0).any(axis=1)
    natural_edge = (index.edge > 0).any(axis=1)[index.foreground].mean()
    assert natural_edge < 0.3
    assert edge.mean() >= 0.4 - 0.02


def test_unbalanced_draws_follow_the_foreground_population():
    index = _index()
    rows = _draw_many(
        index, SamplerConfig(foreground_fraction=1.0, balance_classes=False, edge_fraction=0.0)
    )
    assert index.foreground[rows].all()
    assert not (index.edge[rows] > 0).any()


def test_case_subset_selects_rows_and_rejects_unknown_ids():
    index = _index(cases=["case_03", "case_07"])
    assert index.case_ids == ("case_03", "case_07")
    assert len(index) == 2 * N_SLICES
    np.testing.assert_array_equal(np.unique(index.volume), [0, 1])
    np.testing.assert_array_equal(index.store_volumes, [3, 7])
    with pytest.raises(ConfigError, match="case_99"):
        select_volumes(CASES, ["case_99"])
    with pytest.raises(ConfigError, match="list"):
        select_volumes(CASES, "case_01")


def test_several_axes_concatenate_tables():
    index = _index(axes=("axial", "coronal"))
    assert len(index) == 2 * N_VOLUMES * N_SLICES
    assert set(np.unique(index.axis)) == {0, 1}


def test_invalid_settings_raise_config_errors():
    index = _index()
    with pytest.raises(ConfigError, match="mode"):
        SliceSampler(index, mode="forever")
    with pytest.raises(ConfigError, match="rank"):
        SliceSampler(index, rank=2, world_size=2)
    with pytest.raises(ConfigError, match="foreground_fraction"):
        SamplerConfig(foreground_fraction=1.5)
    with pytest.raises(TypeError):
        len(SliceSampler(index))


def test_without_any_foreground_draws_are_uniform():
    table = _table()
    table[:, 2:] = 0
    index = build_index({"axial": table}, CASES, select_volumes(CASES, None), SamplerConfig())
    rows = SliceSampler(index, batch_size=64).batch_rows(0)
    assert rows.min() >= 0 and rows.max() < len(index)
