"""No command destroys the user's files; batch predict and evaluate name bad inputs and finish the rest.

Every test hashes the inputs before and after and compares them byte for byte.
"""

from __future__ import annotations

import csv
import json
import shutil

import nibabel as nib
import numpy as np
import pytest
from nifti_factory import hashes

import hipseg.evaluate as evaluate_module
import hipseg.predict as predict_module
from hipseg.cli import main
from hipseg.convert import convert
from hipseg.errors import InputError, SkippedCasesError
from hipseg.inference import Segmentation
from hipseg.predict import predict
from hipseg.store import open_store


@pytest.fixture
def data(synth_dataset, tmp_path):
    """A private copy of the synthetic Decathlon task (tests may try to destroy it)."""
    return shutil.copytree(synth_dataset, tmp_path / "Task")


# ---------------------------------------------------------------- convert


def test_convert_into_the_dataset_itself_is_refused(data, capsys):
    before = hashes(data)
    assert main(["convert", str(data), str(data), "--overwrite", "--quiet"]) == 2
    assert "is the input itself" in capsys.readouterr().err
    assert hashes(data) == before


@pytest.mark.parametrize("where", ["inside", "around"])
def test_convert_inside_or_around_the_dataset_is_refused(data, where):
    before = hashes(data)
    dst = data / "imagesTr" / "s.zarr" if where == "inside" else data.parent
    with pytest.raises(InputError, match="lies inside the input" if where == "inside" else "contains"):
        convert(data, dst, workers=1, progress=False, overwrite=True)
    assert hashes(data) == before and not (data / "imagesTr" / "s.zarr").exists()


def test_overwrite_never_replaces_a_folder_that_is_not_a_store(data, tmp_path, capsys):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "thesis.txt").write_text("three years of work")
    (notes / "sub").mkdir()
    (notes / "sub" / "fig.png").write_bytes(b"\x89PNG")
    before = hashes(notes, data)
    assert main(["convert", str(data), str(notes), "--overwrite", "--quiet"]) == 2
    assert "not a store made by hipseg" in capsys.readouterr().err
    assert hashes(notes, data) == before


def test_overwrite_never_replaces_a_file(data, tmp_path):
    target = tmp_path / "important.zarr"
    target.write_text("not a store")
    with pytest.raises(InputError, match="not a store made by hipseg"):
        convert(data, target, workers=1, progress=False, overwrite=True)
    assert target.read_text() == "not a store"


def test_overwrite_replaces_a_hipseg_store_and_an_empty_folder_is_fine(data, tmp_path):
    before = hashes(data)
    empty = tmp_path / "empty.zarr"
    empty.mkdir()
    convert(data, empty, workers=1, progress=False, roi="32x48x32")
    convert(data, empty, workers=1, progress=False, overwrite=True)  # other options: a new store
    store = open_store(empty)
    assert store.n_volumes == 12 and store.roi_shape != (32, 48, 32) and hashes(data) == before


def test_a_foreign_dot_partial_folder_is_not_deleted(data, tmp_path):
    keep = tmp_path / "out.zarr.partial"
    keep.mkdir()
    (keep / "mine.txt").write_text("keep me")
    with pytest.raises(InputError, match="unfinished conversion"):
        convert(data, tmp_path / "out.zarr", workers=1, progress=False)
    assert (keep / "mine.txt").read_text() == "keep me"


def test_a_label_map_run_stopped_before_its_plan_is_resumed(data, tmp_path):
    """A --label-map conversion writes its hemisphere crops before plan.json: a rerun must
    recognise that folder as its own unfinished work and finish."""
    partial = tmp_path / "out.zarr.partial"
    (partial / "hemispheres").mkdir(parents=True)
    convert(data, tmp_path / "out.zarr", workers=1, progress=False)
    assert open_store(tmp_path / "out.zarr").n_volumes == 12 and not partial.exists()


# ---------------------------------------------------------------- predict


def _threshold(runs, image, **options):
    """A stand-in segmenter (the batch policy is under test here, not the network): fast and known."""
    return Segmentation((image > 0.7).astype(np.uint8) + (image > 0.9).astype(np.uint8), (0, 0, 0), True)


@pytest.fixture
def run(synth_store, make_run, tmp_path, monkeypatch):
    monkeypatch.setattr(predict_module, "segment", _threshold)
    monkeypatch.setattr(evaluate_module, "segment", _threshold)
    return make_run(synth_store, tmp_path / "run", val_cases=[])


@pytest.fixture
def scans(synth_dataset, tmp_path):
    folder = tmp_path / "scans"
    folder.mkdir()
    for i in range(3):
        shutil.copy(synth_dataset / "imagesTr" / f"synth_{i:04d}.nii.gz", folder / f"s{i}.nii.gz")
    return folder


def test_predict_into_its_input_folder_is_refused(run, scans, capsys):
    before = hashes(scans)
    assert main(["predict", str(run), str(scans), str(scans), "--overwrite", "--quiet"]) == 2
    assert "output folder is the input itself" in capsys.readouterr().err
    assert hashes(scans) == before


def test_predict_never_writes_over_an_input_file(run, scans):
    before = hashes(scans)
    one = scans / "s0.nii.gz"
    with pytest.raises(InputError, match="is an input file"):
        predict(run, one, one, progress=False, overwrite=True)
    assert hashes(scans) == before


def test_predict_replaces_existing_outputs_only_with_overwrite(run, scans, tmp_path):
    out = tmp_path / "out"
    predict(run, scans, out, progress=False)
    first = hashes(out)
    with pytest.raises(InputError, match="4 output.*exist already.*--overwrite"):
        predict(run, scans, out, progress=False)
    assert hashes(out) == first
    predict(run, scans, out, progress=False, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["s0.nii.gz", "s1.nii.gz", "s2.nii.gz",
                                                      "volumes.csv"]


def test_predict_over_a_folder_with_a_nan_scan_and_a_truncated_scan_finishes_the_good_ones(
        run, scans, tmp_path, capsys):
    """The Done-when case: 5 scans, one NaN voxel, one truncated .nii.gz."""
    good = nib.load(scans / "s0.nii.gz")
    nan = np.asarray(good.dataobj, dtype=np.float32).copy()
    nan[3, 4, 5] = np.nan
    nib.save(nib.Nifti1Image(nan, good.affine), scans / "with_nan.nii.gz")
    raw = (scans / "s1.nii.gz").read_bytes()
    (scans / "cut.nii.gz").write_bytes(raw[: len(raw) // 2])
    before = hashes(scans)
    out = tmp_path / "out"
    assert main(["predict", str(run), str(scans), str(out), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "skipped with_nan:" in err and "NaN" in err
    assert "skipped cut:" in err and "cut.nii.gz" in err
    assert sorted(p.name for p in out.iterdir()) == ["s0.nii.gz", "s1.nii.gz", "s2.nii.gz",
                                                      "volumes.csv"]  # nothing half-written
    with open(out / "volumes.csv") as handle:
        assert [row["case"] for row in csv.DictReader(handle)] == ["s0", "s1", "s2"]
    assert hashes(scans) == before
    out2 = tmp_path / "out2"
    assert main(["predict", str(run), str(scans), str(out2), "--quiet", "--skip-bad"]) == 0
    assert len(list(out2.glob("*.nii.gz"))) == 3


def test_predict_with_only_bad_inputs_writes_nothing(run, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.nii.gz").write_bytes(b"\x1f\x8b not really")
    with pytest.raises(SkippedCasesError, match="x.nii.gz"):
        predict(run, bad, tmp_path / "out", progress=False, skip_bad=True)
    assert list((tmp_path / "out").iterdir()) == []


# ---------------------------------------------------------------- evaluate


def test_evaluate_skips_a_bad_case_by_name_and_scores_the_rest(run, data, tmp_path, capsys):
    label = data / "labelsTr" / "synth_0002.nii.gz"
    label.write_bytes(label.read_bytes()[:200])
    before = hashes(data)
    out = tmp_path / "e.json"
    cases = ["--cases", "synth_0000,synth_0001,synth_0002"]
    assert main(["evaluate", str(run), str(data), "--json", str(out), "--quiet", *cases]) == 1
    assert "skipped synth_0002:" in capsys.readouterr().err
    doc = json.loads(out.read_text())
    assert doc["n_cases"] == 2 and [s["case"] for s in doc["skipped"]] == ["synth_0002"]
    assert "synth_0002.nii.gz" in doc["skipped"][0]["reason"]
    assert set(doc["hd95_worst_case"]) == {"anterior", "posterior"}
    assert main(["evaluate", str(run), str(data), "--json", str(out), "--quiet", "--skip-bad",
                 "--cases", "synth_0002,synth_0003"]) == 0
    assert json.loads(out.read_text())["n_cases"] == 1
    assert hashes(data) == before


def test_evaluate_never_writes_into_the_data(run, data):
    before = hashes(data)
    for target in ({"json_out": data / "dataset.json"}, {"report_dir": data}):
        with pytest.raises(InputError, match="evaluation output"):
            evaluate_module.evaluate(run, data, progress=False, **target)
    assert hashes(data) == before


# ---------------------------------------------------------------- train


def test_train_refuses_a_non_empty_folder_that_is_not_a_run(synth_store, tmp_path, capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "data.csv").write_text("a,b\n")
    before = hashes(folder, synth_store)
    argv = ["train", str(synth_store), "--out", str(folder), "--steps", "1", "--quiet",
            "--channels", "4,8", "--strides", "2", "--groups", "2", "--workers", "0"]
    assert main(argv) == 2
    assert "not a run folder made by hipseg" in capsys.readouterr().err
    argv[3] = str(synth_store)
    assert main(argv) == 2
    assert "is the input itself" in capsys.readouterr().err
    argv[3] = str(synth_store / "run")
    assert main(argv) == 2
    assert hashes(folder, synth_store) == before and not (synth_store / "run").exists()


def test_url_destinations_skip_the_local_checks_and_create_nothing_local(tmp_path, monkeypatch):
    from hipseg.safety import check_not_input, owned_by_hipseg

    monkeypatch.chdir(tmp_path)
    check_not_input("s3://bucket/data", ["s3://bucket/data", str(tmp_path)])
    assert owned_by_hipseg("s3://bucket/x.zarr", lambda path: False, "store") is False
    assert list(tmp_path.iterdir()) == []  # no local "s3:" folder was made
