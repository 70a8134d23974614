"""Prediction: slice stacks, sliding windows, locating the ROI, outputs in each input's own grid."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

import hipseg.predict as predict_module
from hipseg.cli import main
from hipseg.discovery import list_inputs
from hipseg.errors import InputError
from hipseg.inference import Segmentation, locate, segment, slice_stack, volume_probabilities
from hipseg.predict import predict
from hipseg.preprocess import label_bbox, normalise_intensity
from hipseg.synth import SynthConfig, make_dataset, synth_case
from hipseg.train import LoadedRun, TrainConfig


def threshold_model(threshold: float, dims: int = 2) -> nn.Module:
    """A 'network' with known output: class 1 where the intensity exceeds ``threshold``."""
    conv = (nn.Conv2d if dims == 2 else nn.Conv3d)(1, 3, kernel_size=1)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([0.0, 40.0, 0.0]).reshape(3, 1, *([1] * dims)))
        conv.bias.copy_(torch.tensor([0.0, -40.0 * threshold, -100.0]))
    return conv.eval()


def threshold_run(threshold: float, roi=(32, 64, 32), axis="axial") -> LoadedRun:
    config = TrainConfig(store="unused", out="unused", steps=1, axis=axis, context=0)
    meta = {"class_names": ["background", "anterior", "posterior"], "roi_shape": list(roi),
            "in_channels": 1, "spatial_dims": 2}
    return LoadedRun(threshold_model(threshold), config, meta, torch.device("cpu"))


# ---------------------------------------------------------------- building blocks

@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("context", [0, 1, 2])
def test_slice_stack_holds_clamped_neighbours(axis, context):
    shape = (5, 6, 7)
    volume = np.indices(shape)[axis].astype(np.float32)  # value = index along the slicing axis
    stack = slice_stack(volume, axis, context)
    n = shape[axis]
    assert stack.shape == (n, 2 * context + 1, *[s for i, s in enumerate(shape) if i != axis])
    for s in range(n):
        for c in range(2 * context + 1):
            assert np.all(stack[s, c] == min(max(s + c - context, 0), n - 1))


@pytest.mark.parametrize("shape", [(40, 90, 70), (20, 30, 24)])
@pytest.mark.parametrize("dims", [2, 3])
def test_sliding_windows_agree_with_the_pointwise_answer(shape, dims):
    """For a pointwise model every window and the padding must give each voxel its own answer."""
    rng = np.random.default_rng(0)
    volume = rng.random(shape, dtype=np.float32)
    model = threshold_model(0.5, dims)
    window = (32, 48) if dims == 2 else (16, 32, 16)
    probs = volume_probabilities(model, volume, axis="coronal", context=0, window=window, dims=dims)
    assert probs.shape == (3, *shape)
    logits = np.stack([0.0 * volume, 40.0 * volume - 20.0, 0.0 * volume - 100.0])
    expected = np.exp(logits - logits.max(axis=0)) / np.exp(logits - logits.max(axis=0)).sum(axis=0)
    np.testing.assert_allclose(probs, expected, atol=1e-5)


def test_locate_centres_the_roi_on_the_largest_component():
    foreground = np.zeros((60, 70, 80), bool)
    foreground[10:20, 30:50, 40:50] = True  # the hippocampus
    foreground[50:52, 2:4, 2:4] = True  # a small false positive far away
    offset = locate(foreground, (16, 32, 16))
    assert offset.tolist() == [15 - 8, 40 - 16, 45 - 8]
    assert locate(np.zeros((5, 5, 5), bool), (4, 4, 4)) is None


def test_a_full_head_is_located_and_segmented_without_its_label():
    config = SynthConfig(n_cases=1, shape=(90, 110, 90), off_centre=0.2, contrast=1.5, seed=11)
    image, label, affine = synth_case(config, 0)  # RAS: already canonical
    normalised, _, _ = normalise_intensity(image)
    run = threshold_run(0.99, roi=(32, 64, 32))
    result = segment([run], normalised)
    assert result.located
    start, stop = label_bbox(label)
    offset = np.asarray(result.offset)
    assert np.all(offset <= start) and np.all(offset + np.array([32, 64, 32]) >= stop)
    assert result.label.shape == image.shape
    overlap = np.logical_and(result.label > 0, label > 0).sum() / (label > 0).sum()
    assert overlap > 0.5


def test_list_inputs(tmp_path):
    (tmp_path / "images").mkdir()
    for name in ("b.nii.gz", "a.nii", "notes.txt"):
        (tmp_path / "images" / name).write_bytes(b"")
    assert [p.name for p in list_inputs(tmp_path)[0]] == ["a.nii", "b.nii.gz"]
    with pytest.raises(InputError, match="NIfTI"):
        list_inputs(tmp_path / "images" / "notes.txt")
    with pytest.raises(InputError, match="no such"):
        list_inputs(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no NIfTI"):
        list_inputs(tmp_path / "empty")


# ---------------------------------------------------------------- outputs in the input's own grid

@pytest.fixture(scope="module")
def mixed_inputs(tmp_path_factory, synth_store):
    """A crop in PIR orientation with anisotropic voxels, and a full head in LPS, int16."""
    root = tmp_path_factory.mktemp("inputs")
    crop_config = SynthConfig(n_cases=1, shape=(30, 44, 28), spacing=(1.2, 0.9, 1.5),
                              orientation="PIR", seed=2)
    head_config = SynthConfig(n_cases=1, shape=(80, 96, 80), orientation="LPS", dtype="int16",
                              intensity_scale=1000.0, off_centre=0.2, seed=4)
    crop = make_dataset(root / "crop", crop_config, progress=False)
    head = make_dataset(root / "head", head_config, progress=False)
    folder = root / "in"
    folder.mkdir()
    (crop / "imagesTr" / "synth_0000.nii.gz").rename(folder / "crop_pir.nii.gz")
    (head / "imagesTr" / "synth_0000.nii.gz").rename(folder / "head_lps.nii.gz")
    return folder


def test_label_maps_are_written_in_each_inputs_grid_and_affine(mixed_inputs, make_run, synth_store,
                                                                tmp_path):
    run = make_run(synth_store, tmp_path / "run", val_cases=[])
    rows = predict(run, mixed_inputs, tmp_path / "out", progress=False)
    assert [r["case"] for r in rows] == ["crop_pir", "head_lps"]
    for row in rows:
        source = nib.load(row["input"])
        written = nib.load(row["output"])
        assert written.shape == source.shape
        np.testing.assert_allclose(written.affine, source.affine)
        assert nib.aff2axcodes(written.affine) == nib.aff2axcodes(source.affine)
        data = np.asarray(written.dataobj)
        assert data.dtype == np.uint8 and set(np.unique(data)) <= {0, 1, 2}
        voxel = float(np.prod(source.header.get_zooms()[:3]))
        assert row["anterior_mm3"] == pytest.approx((data == 1).sum() * voxel)
        assert row["posterior_mm3"] == pytest.approx((data == 2).sum() * voxel)
    with open(tmp_path / "out" / "volumes.csv") as handle:
        table = list(csv.DictReader(handle))
    assert [t["case"] for t in table] == ["crop_pir", "head_lps"]
    assert float(table[0]["total_mm3"]) == pytest.approx(rows[0]["total_mm3"])


def test_labels_land_on_the_voxels_they_were_predicted_for(mixed_inputs, make_run, synth_store,
                                                           tmp_path, monkeypatch):
    """A segmenter thresholding the canonical image must give the threshold of the file itself."""
    monkeypatch.setattr(predict_module, "segment", lambda runs, image, flip: Segmentation(
        (image > 0.8).astype(np.uint8) + (image > 0.95).astype(np.uint8), (0, 0, 0), True))
    run = make_run(synth_store, tmp_path / "run", val_cases=[])
    for row in predict(run, mixed_inputs, tmp_path / "out", progress=False):
        source, _, _ = normalise_intensity(np.asarray(nib.load(row["input"]).dataobj, np.float32))
        expected = (source > 0.8).astype(np.uint8) + (source > 0.95).astype(np.uint8)
        np.testing.assert_array_equal(np.asarray(nib.load(row["output"]).dataobj), expected)


def test_a_single_file_can_go_to_a_named_output(mixed_inputs, make_run, synth_store, tmp_path):
    run = make_run(synth_store, tmp_path / "run", val_cases=[])
    rows = predict(run, mixed_inputs / "crop_pir.nii.gz", tmp_path / "seg.nii.gz", progress=False)
    assert rows[0]["output"] == str(tmp_path / "seg.nii.gz")
    assert (tmp_path / "seg.nii.gz").exists() and (tmp_path / "volumes.csv").exists()


# ---------------------------------------------------------------- the command line, end to end

def test_train_evaluate_predict_from_the_command_line(synth_dataset, synth_store, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", str(synth_store), "--out", str(run), "--steps", "6", "--batch-size", "4",
                 "--channels", "4,8", "--strides", "2", "--groups", "2", "--val-every", "3",
                 "--workers", "0", "--quiet"]) == 0
    assert "best validation Dice" in capsys.readouterr().out
    assert main(["evaluate", str(run), str(synth_dataset), "--cases", "val", "--quiet",
                 "--json", str(tmp_path / "e" / "eval.json")]) == 0
    doc = json.loads((tmp_path / "e" / "eval.json").read_text())
    assert doc["n_cases"] == len(json.loads((run / "split.json").read_text())["val"])
    assert (tmp_path / "e" / "evaluation.md").exists()
    one = synth_dataset / "imagesTr" / "synth_0003.nii.gz"
    assert main(["predict", str(run), str(one), str(tmp_path / "p"), "--quiet"]) == 0
    written = sorted(p.name for p in (tmp_path / "p").iterdir())
    assert written == ["synth_0003.nii.gz", "volumes.csv"]
    capsys.readouterr()
    assert main(["models", "--json"]) == 0
    assert {row["model"] for row in json.loads(capsys.readouterr().out)} >= {"unet", "unet3d"}
