"""Conversion: content, exact round trips, bad input, resumability after kill -9."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import zarr

from hipseg import store
from hipseg.convert import convert
from hipseg.errors import InputError, SkippedCasesError, StoreExistsError
from hipseg.preprocess import restore_to_original
from hipseg.synth import SynthConfig, make_dataset, preset

REPO = Path(__file__).resolve().parents[1]


def assert_labels_round_trip(store_path: Path) -> None:
    s = store.open_store(store_path)
    for index, volume in enumerate(s.volumes):
        original = np.asarray(nib.load(volume["label_path"]).dataobj)
        restored = restore_to_original(np.asarray(s.labels[index]), volume)
        assert restored.shape == original.shape, volume["case_id"]
        np.testing.assert_array_equal(restored, original, err_msg=volume["case_id"])
        assert volume["class_voxels"] == np.bincount(original.ravel(), minlength=3).tolist()


def test_synthetic_store_layout(synth_store):
    group = zarr.open_group(str(synth_store), mode="r")
    info = dict(group.attrs)["hipseg"]
    assert info["format_version"] == store.FORMAT_VERSION
    assert info["class_names"] == ["background", "anterior", "posterior"]
    assert group["images"].shape == (12, *info["roi_shape"])
    assert group["images"].dtype == np.float16 and group["labels"].dtype == np.uint8
    images = group["images"][...]
    assert 0.0 <= images.min() and images.max() <= 1.0
    s = store.open_store(synth_store)
    for axis_number, axis in enumerate(store.AXIS_NAMES):
        table = s.slice_table(axis)
        assert table.shape == (12 * info["roi_shape"][axis_number], 4)
        labels = group["labels"][...]
        for volume, slice_index, anterior, posterior in table[::7]:
            plane = np.take(labels[volume], slice_index, axis=axis_number)
            assert (anterior, posterior) == ((plane == 1).sum(), (plane == 2).sum())


def test_synthetic_round_trip_is_exact(synth_store):
    assert_labels_round_trip(synth_store)


@pytest.mark.parametrize("orientation", ["LPS", "PIR"])
def test_full_head_off_centre_round_trip(tmp_path, orientation):
    config = preset("head", n_cases=3, shape=(96, 112, 96), orientation=orientation, off_centre=0.3, seed=5)
    source = make_dataset(tmp_path / "head", config, progress=False)
    report = convert(source, tmp_path / "head.zarr", workers=1, progress=False)
    assert report.n_volumes == 3
    assert max(report.roi_shape) < 96  # the ROI is a crop, not the head
    assert_labels_round_trip(tmp_path / "head.zarr")


def test_real_round_trip_keeps_every_labelled_voxel(real_store):
    s = store.open_store(real_store)
    assert s.n_volumes == 200
    assert_labels_round_trip(real_store)


def test_normalised_image_matches_source(synth_store):
    from hipseg.nifti import load_case
    from hipseg.preprocess import crop, normalise_intensity

    s = store.open_store(synth_store)
    volume = s.volumes[4]
    case = load_case(volume["image_path"], volume["label_path"], 3)
    expected, lo, hi = normalise_intensity(case.image)
    assert (lo, hi) == (volume["normalisation"]["low"], volume["normalisation"]["high"])
    crop_ = crop(expected, np.asarray(volume["crop_offset"]), s.roi_shape)
    np.testing.assert_allclose(s.read_volume(4)[0], crop_, atol=1e-3)  # float16 storage


def test_dask_workers_give_identical_store(synth_dataset, synth_store, tmp_path):
    convert(synth_dataset, tmp_path / "two.zarr", workers=2, progress=False)
    assert_same_content(synth_store, tmp_path / "two.zarr")


def assert_same_content(a: Path, b: Path) -> None:
    ga, gb = zarr.open_group(str(a), mode="r"), zarr.open_group(str(b), mode="r")
    for name in ["images", "labels", *(f"slices/{axis}" for axis in store.AXIS_NAMES)]:
        np.testing.assert_array_equal(ga[name][...], gb[name][...], err_msg=name)
    assert dict(ga.attrs) == dict(gb.attrs)


def test_messy_names_all_three_bad_cases(real_messy_dir, tmp_path):
    with pytest.raises(SkippedCasesError) as caught:
        convert(real_messy_dir, tmp_path / "m.zarr", workers=1, progress=False)
    reasons = {s["case"]: s["reason"] for s in caught.value.skipped}
    assert set(reasons) == {"hippocampus_010", "hippocampus_118", "hippocampus_281"}
    assert "image without a label" in reasons["hippocampus_118"]
    assert "label without an image" in reasons["hippocampus_281"]
    assert not (tmp_path / "m.zarr").exists()


def test_cli_messy_exits_non_zero_naming_cases(real_messy_dir, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "hipseg", "convert", str(real_messy_dir), str(tmp_path / "m.zarr"), "--quiet"],
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    for case in ("hippocampus_010", "hippocampus_118", "hippocampus_281"):
        assert case in result.stdout + result.stderr
    assert "Traceback" not in result.stderr


def _write(path: Path, data: np.ndarray, affine=None) -> None:
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), path)


@pytest.fixture()
def folder_pair(tmp_path, synth_dataset):
    """A plain images/ + labels/ copy of three synthetic cases, to be broken by each test."""
    root = tmp_path / "pairs"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for name in sorted(os.listdir(synth_dataset / "imagesTr"))[:3]:
        shutil.copy(synth_dataset / "imagesTr" / name, root / "images" / name)
        shutil.copy(synth_dataset / "labelsTr" / name, root / "labels" / name)
    return root


def _break(root: Path, kind: str) -> tuple[str, str]:
    """Damage case synth_0001 in one way; return (case, expected words in the reason)."""
    image, label = root / "images" / "synth_0001.nii.gz", root / "labels" / "synth_0001.nii.gz"
    good = nib.load(image)
    if kind == "truncated":
        data = image.read_bytes()
        image.write_bytes(data[: len(data) // 2])
        return "synth_0001", "truncated"
    if kind == "not-nifti":
        image.write_bytes(b"this is not an image at all" * 10)
        return "synth_0001", "NIfTI"
    if kind == "shape":
        _write(label, np.zeros((10, 10, 10), np.uint8), good.affine)
        return "synth_0001", "shape"
    if kind == "affine":
        affine = good.affine.copy()
        affine[0, 3] += 5
        _write(label, np.asarray(nib.load(label).dataobj), affine)
        return "synth_0001", "affine"
    if kind == "label-values":
        data = np.asarray(nib.load(label).dataobj).copy()
        data[0, 0, 0] = 7
        _write(label, data, good.affine)
        return "synth_0001", "outside the declared classes"
    if kind == "nan":
        data = np.asarray(good.dataobj).astype(np.float32)
        data[1, 2, 3] = np.nan
        _write(image, data, good.affine)
        return "synth_0001", "NaN"
    if kind == "4d":
        _write(image, np.zeros((8, 8, 8, 3), np.float32), good.affine)
        return "synth_0001", "3D"
    raise ValueError(kind)


BAD_KINDS = ["truncated", "not-nifti", "shape", "affine", "label-values", "nan", "4d"]


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_case_is_skipped_and_named(folder_pair, tmp_path, kind):
    case, words = _break(folder_pair, kind)
    with pytest.raises(SkippedCasesError) as caught:
        convert(folder_pair, tmp_path / "out.zarr", workers=1, progress=False)
    (skipped,) = caught.value.skipped
    assert skipped["case"] == case and words in skipped["reason"] and case in skipped["reason"]
    # The good cases are still converted, and the bad one is recorded in the store.
    s = store.open_store(tmp_path / "out.zarr")
    assert s.n_volumes == 2 and s.info.skipped[0]["case"] == case


def test_stray_non_nifti_file_is_listed(folder_pair, tmp_path):
    (folder_pair / "images" / "notes.txt").write_text("not an image")
    with pytest.raises(SkippedCasesError, match="notes.txt: not a NIfTI file"):
        convert(folder_pair, tmp_path / "out.zarr", workers=1, progress=False)
    assert store.open_store(tmp_path / "out.zarr").n_volumes == 3


def test_skip_bad_accepts_and_strict_stops(folder_pair, tmp_path):
    _break(folder_pair, "nan")
    report = convert(folder_pair, tmp_path / "a.zarr", workers=1, progress=False, skip_bad=True)
    assert report.n_volumes == 2 and len(report.skipped) == 1
    with pytest.raises(InputError, match="NaN"):
        convert(folder_pair, tmp_path / "b.zarr", workers=1, progress=False, strict=True)
    assert not (tmp_path / "b.zarr").exists()


def test_dataset_json_entry_outside_folder_is_skipped(synth_dataset, tmp_path):
    root = tmp_path / "task"
    shutil.copytree(synth_dataset, root)
    manifest = json.loads((root / "dataset.json").read_text())
    manifest["training"][0]["image"] = "../../etc/passwd.nii.gz"
    (root / "dataset.json").write_text(json.dumps(manifest))
    with pytest.raises(SkippedCasesError, match="outside"):
        convert(root, tmp_path / "o.zarr", workers=1, progress=False)


def test_existing_store_is_protected_and_rerun_is_idempotent(synth_dataset, synth_store, tmp_path):
    report = convert(synth_dataset, synth_store, workers=1, progress=False)
    assert report.up_to_date
    other = make_dataset(tmp_path / "other", SynthConfig(n_cases=2, seed=9), progress=False)
    with pytest.raises(StoreExistsError):
        convert(other, synth_store, workers=1, progress=False)
    assert store.open_store(synth_store).n_volumes == 12  # untouched


def test_cli_error_is_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "hipseg", "convert", str(tmp_path / "nowhere"), str(tmp_path / "o.zarr")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "nowhere" in result.stderr


@pytest.mark.parametrize("kill_after_blocks", [-1, 0, 2, 5])
def test_kill_9_then_rerun_completes_identically(synth_dataset, synth_store, tmp_path, kill_after_blocks):
    """A real conversion process is killed with SIGKILL mid-way; the same command then finishes it."""
    dst = tmp_path / "killed.zarr"
    command = [
        sys.executable,
        "-c",
        "import sys, time, hipseg.convert as c\n"
        "original = c.convert_block\n"
        "def slow(*a, **k):\n"
        "    time.sleep(0.3)\n"
        "    return original(*a, **k)\n"
        "c.convert_block = slow\n"
        f"c.convert({str(synth_dataset)!r}, {str(dst)!r}, workers=1, progress=False, shard_volumes=1)\n",
    ]
    process = subprocess.Popen(command)
    blocks = dst.with_name(dst.name + ".partial") / "blocks"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        done = len(list(blocks.glob("*.json"))) if blocks.exists() else -1
        if done >= kill_after_blocks:
            break
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not dst.exists()  # never a half-written store at the destination
    report = convert(synth_dataset, dst, workers=1, progress=False, shard_volumes=1)
    assert report.n_volumes == 12
    assert report.resumed_blocks >= kill_after_blocks
    reference = tmp_path / "reference.zarr"
    convert(synth_dataset, reference, workers=1, progress=False, shard_volumes=1)
    assert_same_content(reference, dst)
    assert not dst.with_name(dst.name + ".partial").exists()


def test_runs_on_an_existing_dask_cluster(synth_dataset, synth_store, tmp_path):
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        convert(synth_dataset, tmp_path / "cluster.zarr", scheduler=cluster.scheduler_address, progress=False)
    assert_same_content(synth_store, tmp_path / "cluster.zarr")


def test_parallel_conversion_from_a_plain_script(synth_dataset, synth_store, tmp_path):
    """A user's script without an `if __name__ == "__main__"` guard can still use workers."""
    script = tmp_path / "convert_script.py"
    out = tmp_path / "script.zarr"
    script.write_text(
        "from hipseg.convert import convert\n"
        f"convert({str(synth_dataset)!r}, {str(out)!r}, workers=2, progress=False)\n"
    )
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert_same_content(synth_store, out)
