"""The benchmark framework: run.py's asv-style runner, shared helpers, and the peers' correctness.

No speed is asserted here (speed is only measured in benchmarks/); these tests check
that the runner calls what asv would call, that memory sampling sees worker
processes, that measurements are shared once per run, and that the MONAI peers
and the conversion benchmark produce what they claim on small synthetic data.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `benchmarks` is a package at the project root, as under asv
    sys.path.insert(0, str(REPO))

from benchmarks import _common as c  # noqa: E402
from benchmarks import run  # noqa: E402


@pytest.fixture
def bench_env(monkeypatch, tmp_path, synth_dataset):
    """Quick settings, a private cache, and the 12-case synthetic set as the benchmark data."""
    monkeypatch.setenv(c.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv(c.DATA_ENV, str(synth_dataset))
    monkeypatch.setenv(c.QUICK_ENV, "1")
    monkeypatch.setenv(c.DEVICE_ENV, "cpu")
    monkeypatch.setattr(c, "_MEMO", {})
    return tmp_path


class Dummy:
    """An asv-style class whose every result is a known function of its parameters."""

    params = [[1, 2, 3], ["a", "b"]]
    param_names = ["n", "tag"]

    def setup_cache(self) -> dict:
        return {"offset": 100}

    def setup(self, cache, n, tag):
        if n == 3:
            raise NotImplementedError("three is skipped")

    def track_value(self, cache, n, tag):
        return cache["offset"] + 10 * n + (tag == "b")

    def time_work(self, cache, n, tag):
        sum(range(100 * n))

    def track_broken(self, cache, n, tag):
        raise ValueError(f"broken at {n}{tag}")


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        (None, [()]),
        ([1, 2], [(1,), (2,)]),
        ([[1, 2], ["x"]], [(1, "x"), (2, "x")]),
    ],
)
def test_param_grid(params, expected):
    cls = type("P", (), {"params": params} if params is not None else {})
    names, grid = run.param_grid(cls)
    assert grid == expected
    assert len(names) == len(expected[0])


@pytest.mark.parametrize(("n", "tag"), [(1, "a"), (2, "b")])
def test_run_method_track_passes_cache_and_params(n, tag):
    result = run.run_method(
        Dummy(), Dummy, "track_value", Dummy.param_names, (n, tag), {"offset": 100}, 3
    )
    assert result.status == "ok"
    assert result.value == 100 + 10 * n + (tag == "b")
    assert result.params == {"n": n, "tag": tag}


def test_run_method_time_reports_median_of_repeats():
    result = run.run_method(
        Dummy(), Dummy, "time_work", Dummy.param_names, (2, "a"), {"offset": 0}, 5
    )
    assert result.status == "ok" and result.kind == "time"
    assert len(result.samples) == 5
    assert result.value == statistics.median(result.samples)


def test_run_method_skip_and_failure_are_reported_not_raised():
    skipped = run.run_method(
        Dummy(), Dummy, "track_value", Dummy.param_names, (3, "a"), {"offset": 0}, 1
    )
    assert skipped.status == "skipped" and "three" in skipped.message
    failed = run.run_method(
        Dummy(), Dummy, "track_broken", Dummy.param_names, (1, "b"), {"offset": 0}, 1
    )
    assert failed.status == "failed" and "broken at 1b" in failed.message


def test_run_all_runs_every_method_and_parameter_set(capsys):
    results = run.run_all([(Dummy, ["track_value", "track_broken"])], repeats=1)
    assert len(results) == 2 * 3 * 2
    by_status = {s: [r for r in results if r.status == s] for s in ("ok", "skipped", "failed")}
    assert [r.value for r in by_status["ok"]] == [110, 111, 120, 121]
    assert len(by_status["skipped"]) == 4 and len(by_status["failed"]) == 4
    assert "2 parameter set(s) skipped: three is skipped" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("error", "status"), [(NotImplementedError, "skipped"), (OSError, "failed")]
)
def test_a_class_whose_setup_cache_cannot_run_is_reported_per_method(error, status):
    class NoData(Dummy):
        def setup_cache(self):
            raise error("no data here")

    results = run.run_all([(NoData, ["track_value", "time_work"])], repeats=1)
    assert [(r.name.rsplit(".", 1)[-1], r.status) for r in results] == [
        ("track_value", status),
        ("time_work", status),
    ]
    assert all("no data here" in r.message for r in results)


def test_headlines_and_chart(tmp_path):
    assert (
        run.headline_of(
            __import__("benchmarks.bench_train").bench_train.TrainSteps,
            "track_ratio_to_t4_baseline",
        )
        == run.HEADLINE_PANELS[0]
    )
    results = [
        run.Result(
            "bench_train.TrainSteps.track_ratio_to_t4_baseline",
            "track",
            {"pipeline": p, "variant": "default"},
            value=v,
            headline=run.HEADLINE_PANELS[0],
        )
        for p, v in (("hipseg", 20.0), ("monai-nifti", 0.5))
    ]
    results.append(run.Result("x.Y.track_z", "track", {}, status="skipped"))
    rows = run.headline_rows(results)
    assert rows == {
        run.HEADLINE_PANELS[0]: [
            ("pipeline=hipseg, variant=default", 20.0),
            ("pipeline=monai-nifti, variant=default", 0.5),
        ]
    }
    png = tmp_path / "chart.png"
    assert run.plot_headlines(results, png, "test")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not run.plot_headlines(results[2:], tmp_path / "none.png", "test")


def test_main_lists_and_rejects_unknown_patterns(capsys, monkeypatch):
    monkeypatch.setenv(c.DEVICE_ENV, "cpu")
    assert run.main(["--list", "--only", "ConvertThroughput"]) == 0
    out = capsys.readouterr().out
    assert "bench_convert.ConvertThroughput.track_volumes_per_s  (4 parameter sets" in out
    assert run.main(["--only", "no-such-benchmark-anywhere"]) == 2


def test_peak_tree_memory_sees_child_processes():
    child_mb = 200
    code = f"import time; block = b'x' * ({child_mb} << 20); time.sleep(1.0)"
    with c.PeakTreeMemory(interval_s=0.02) as memory:
        subprocess.run([sys.executable, "-c", code], check=True)
    assert memory.peak_mb - memory.baseline_mb >= 0.75 * child_mb


def test_measure_once_measures_once_per_run(bench_env):
    calls = []

    def measure():
        calls.append(1)
        return {"value": len(calls)}

    first = c.measure_once("run-a", "key", measure)
    c._MEMO.clear()  # as in a fresh asv process: read back from disk
    assert c.measure_once("run-a", "key", measure) == first == {"value": 1}
    assert c.measure_once("run-b", "key", measure) == {"value": 2}
    assert len(calls) == 2


def test_machine_info_describes_the_machine():
    info = c.machine_info()
    assert info["cpu_usable_cores"] >= 1 and info["ram_gb"] > 0
    assert info["versions"]["hipseg"] and info["versions"]["torch"]
    assert info["cpu_model"]
    json.dumps(info)  # goes into the results file as is
    assert c.device_label("cpu").startswith(f"cpu: {info['cpu_usable_cores']} cores")


def test_settings_follow_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(c.QUICK_ENV, "1")
    assert c.scale() is c.QUICK
    monkeypatch.setenv(c.QUICK_ENV, "0")
    assert c.scale() is c.FULL
    monkeypatch.setenv(c.DEVICE_ENV, "tpu")
    with pytest.raises(ValueError, match="cpu or cuda"):
        c.device_name()
    monkeypatch.setenv(c.DATA_ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError, match="not a Decathlon task folder"):
        c.training_source()


def test_conversion_measurement_matches_the_store(bench_env, synth_dataset):
    from benchmarks.bench_convert import measure_conversion
    from hipseg.store import open_store

    out = bench_env / "out.zarr"
    result = measure_conversion(synth_dataset, workers=1, out=out)
    assert result["volumes"] == 12 == open_store(out).n_volumes
    assert result["store_mb"] * 1e6 == c.folder_bytes(out)
    nifti = sum(p.stat().st_size for p in c.nifti_files(synth_dataset))
    assert result["store_to_nifti"] == pytest.approx(c.folder_bytes(out) / nifti)
    assert result["peak_tree_rss_mb"] >= result["peak_tree_rss_increase_mb"] >= 0


def test_codec_choices_start_with_the_store_default():
    from benchmarks.bench_convert import codec_choices
    from hipseg.store import default_codec

    choices = codec_choices()
    first = next(iter(choices))
    assert first.endswith("(default)") and choices[first][0].to_dict() == default_codec().to_dict()
    assert len(choices) == len({json.dumps([x.to_dict() for x in v]) for v in choices.values()})


def test_monai_nifti_peer_reads_volumes_in_the_store_orientation(synth_dataset):
    """The peer's deterministic part puts each NIfTI label in RAS, exactly as the store does."""
    from monai.transforms import Compose

    from benchmarks.bench_train import monai_nifti_transforms

    deterministic, _ = monai_nifti_transforms((32, 64), 4, 1 / 3)
    item = c.decathlon_pairs(synth_dataset)[0]
    oriented = Compose(deterministic[:3])(dict(item))
    expected = np.asarray(nib.as_closest_canonical(nib.load(item["label"])).dataobj)
    np.testing.assert_array_equal(np.asarray(oriented["label"][0]), expected)


@pytest.mark.parametrize("pipeline", ["monai-nifti", "prebuilt"])
def test_training_measurement_runs_each_pipeline(bench_env, monkeypatch, pipeline):
    from benchmarks import bench_train
    from hipseg.store import open_store

    monkeypatch.setattr(
        c, "QUICK", dataclasses.replace(c.QUICK, warmup_steps=0, train_steps=2, train_chunks=1)
    )
    result = bench_train.measure_training(pipeline, "default", "cpu", workers=0)
    store = open_store(c.converted_store(c.training_source()[1]))
    assert result["batch_shape"] == [
        bench_train.train_defaults()["batch_size"],
        1,
        *store.slice_shape("axial"),
    ]
    assert result["timed_steps"] == 2 and np.isfinite(result["final_loss"])
    assert result["ratio_to_t4_baseline"] == pytest.approx(
        result["steps_per_s"] / c.T4_BASELINE_STEPS_PER_S
    )


def test_conversion_to_the_loopback_object_store_is_measured(synth_dataset):
    """The object-store benchmark converts every case into a real (loopback) S3 server."""
    pytest.importorskip("moto.server", reason="moto[server] is in the dev extra")
    from benchmarks.bench_distributed import measure_convert_target

    result = measure_convert_target(synth_dataset, "s3-loopback", 1)
    assert result["volumes"] == 12 and result["volumes_per_s"] > 0


def test_3d_peers_yield_augmented_whole_crops(bench_env):
    """MONAI and batchgeneratorsv2 peers: 5D batches of the store's crops, labels in the classes."""
    pytest.importorskip("batchgeneratorsv2")
    from benchmarks import peers_3d
    from benchmarks.bench_loader import bench_store
    from hipseg.store import open_store

    store = bench_store()
    roi = open_store(store).roi_shape
    for make in (peers_3d.monai_loader, peers_3d.bgv2_loader):
        batch = next(iter(make(store, batch_size=2, num_workers=0)))
        assert tuple(batch["image"].shape) == (2, 1, *roi)
        assert tuple(batch["label"].shape) == (2, 1, *roi)
        assert set(np.unique(np.asarray(batch["label"])).tolist()) <= {0, 1, 2}


def test_patch_measurement_counts_patches(bench_env):
    from benchmarks import bench_patches
    from benchmarks.bench_loader import bench_store

    result = bench_patches.measure("hipseg-dataloader", bench_store(), workers=0)
    assert result["patches_per_s"] > 0 and result["patches_per_cpu_s"] > 0
    assert run.headline_of(bench_patches.PatchVsPeers, "track_ratio_per_core") == run.HEADLINE_PANELS[3]
    assert (run.headline_of(bench_patches.PatchTrainingOverhead, "track_overhead_ratio")
            == run.HEADLINE_PANELS[5])
