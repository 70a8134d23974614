"""Full-head localisation: registration, per-hemisphere crops, paste back, quality flags, predict."""

from __future__ import annotations

import csv

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import data_root
from torch import nn

import hipseg.localise as localise
from hipseg.cli import main
from hipseg.headsynth import (
    freesurfer_hippocampi,
    hemisphere_agreement,
    make_head,
    make_pose,
    painted_template,
)
from hipseg.localise import (
    HIPPOCAMPUS_CENTRE_MM,
    CropGrid,
    HeadQuality,
    HeadSegmentation,
    Registration,
    check_volumes,
    hemisphere_grids,
    is_full_head,
    load_template,
    paste_back,
    register,
    rotation_part,
    sample_crop,
    segment_head,
    volume_columns,
)
from hipseg.predict import predict
from hipseg.runs import LoadedRun
from hipseg.train import TrainConfig

ROI = (48, 64, 48)


def threshold_run(threshold: float = 0.9, roi=ROI) -> LoadedRun:
    """A 'network' with known output: class 1 where the normalised crop exceeds ``threshold``."""
    conv = nn.Conv2d(1, 3, kernel_size=1)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([0.0, 40.0, 0.0]).reshape(3, 1, 1, 1))
        conv.bias.copy_(torch.tensor([0.0, -40.0 * threshold, -100.0]))
    config = TrainConfig(store="unused", out="unused", steps=1, axis="axial", context=0)
    meta = {"class_names": ["background", "anterior", "posterior"], "roi_shape": list(roi),
            "in_channels": 1, "spatial_dims": 2}
    return LoadedRun(conv.eval(), config, meta, torch.device("cpu"))


@pytest.fixture(scope="module")
def painted():
    """The ICBM152 template (from nilearn) at 1 mm with a bright synthetic hippocampus tube per hemisphere."""
    return painted_template(seed=0)


def true_centre(pose, hemisphere: str) -> np.ndarray:
    return (pose.matrix @ np.array([*HIPPOCAMPUS_CENTRE_MM[hemisphere], 1.0]))[:3]


def angle_deg(a: np.ndarray, b: np.ndarray) -> float:
    cosine = (np.trace(a.T @ b) - 1.0) / 2.0
    return float(np.degrees(np.arccos(np.clip(cosine, -1.0, 1.0))))


# Every orientation and pose of the issue, combined so each head covers several at once.
HEADS = {
    "RAS-1mm-neck-rot+15": dict(angles=(15, -15, 15), shift=(15, -15, 15), scale=1.08, axcodes="RAS",
                                spacing=(1.0, 1.0, 1.0), neck=True),
    "LPS-1mm-noneck-rot-15": dict(angles=(-15, 15, -15), shift=(-15, 15, -15), scale=0.92,
                                  axcodes="LPS", spacing=(1.0, 1.0, 1.0), neck=False),
    "ASR-anisotropic": dict(angles=(10, 5, -12), shift=(8, -12, 5), scale=1.0, axcodes="ASR",
                            spacing=(0.8, 1.2, 1.5), neck=True),
    "PIL-1.5mm-bias": dict(angles=(-8, -15, 6), shift=(-10, 5, 12), scale=1.05, axcodes="PIL",
                           spacing=(1.5, 1.5, 1.5), neck=False),
}


def posed_head(painted, name: str, bias: float = 0.2):
    spec = HEADS[name]
    pose = make_pose(spec["angles"], spec["shift"], spec["scale"])
    fov = np.array([176, 208, 176]) if spec["neck"] else np.array([176, 208, 150])
    shape = tuple(int(round(f / s)) for f, s in zip(fov, spec["spacing"]))
    head, label = make_head(*painted, pose, shape=shape, spacing=spec["spacing"], axcodes=spec["axcodes"],
                            neck=spec["neck"], bias=bias, rng=np.random.default_rng(1))
    return pose, head, label


@pytest.fixture(scope="module", params=list(HEADS))
def head_case(request, painted):
    """(name, pose, head, truth labels, registration) of each posed painted head."""
    pose, head, label = posed_head(painted, request.param)
    return request.param, pose, head, label, register(np.asarray(head.dataobj), head.affine)


# ---------------------------------------------------------------- building blocks

def test_full_head_rule():
    assert is_full_head((176, 208, 176), np.eye(4))
    assert is_full_head((91, 109, 91), np.diag([2.0, 2.0, 2.0, 1.0]))
    assert not is_full_head((35, 50, 35), np.eye(4))  # a Decathlon crop
    assert not is_full_head((80, 96, 80), np.eye(4))  # a partial volume keeps the coarse pass
    assert not is_full_head((512, 512, 20), np.diag([0.4, 0.4, 3.0, 1.0]))  # a slab


def test_packaged_template():
    """nilearn's 1 mm ICBM152 head (197 x 233 x 189) in 4 mm blocks, RAS+, read without a download."""
    template = load_template()
    assert template.shape == (197 // 4, 233 // 4, 189 // 4)
    assert template.get_data_dtype() == np.uint8 and np.asarray(template.dataobj).max() == 255
    assert nib.aff2axcodes(template.affine) == ("R", "A", "S")
    np.testing.assert_allclose(np.linalg.norm(template.affine[:3, :3], axis=0), 4.0)
    # MNI (0, 0, 0) (the anterior commissure) lies inside the brain: bright tissue there
    centre = np.round(np.linalg.inv(template.affine) @ [0, 0, 0, 1]).astype(int)[:3]
    assert np.asarray(template.dataobj)[tuple(centre)] > 60


def test_rotation_part_of_a_scaled_rotation():
    pose = make_pose((10, -20, 5), (0, 0, 0), 1.07)
    rotation = rotation_part(pose.matrix[:3, :3] @ np.diag([1.0, 1.1, 0.9]))
    np.testing.assert_allclose(rotation @ rotation.T, np.eye(3), atol=1e-9)
    assert np.linalg.det(rotation) == pytest.approx(1.0)
    # scale * diag is symmetric positive definite, so the polar factor is the pose's rotation
    np.testing.assert_allclose(rotation, pose.matrix[:3, :3] / 1.07, atol=1e-9)


@pytest.mark.parametrize("axcodes", ["RAS", "LPS", "SAL"])
def test_crop_and_paste_back_follow_the_affine_exactly(axcodes):
    """A grid on the scan's voxel centres: the crop is the array itself, pasting back is exact."""
    from hipseg.headsynth import grid_affine

    shape = (30, 40, 35)
    affine = grid_affine(shape, (1.0, 1.0, 1.0), axcodes, (3.0, -2.0, 5.0))
    data = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    canonical = nib.as_closest_canonical(nib.Nifti1Image(data, affine))
    roi = (8, 10, 12)
    corner = np.array([5, 7, 9])  # canonical voxel of the grid's first voxel
    centre = (canonical.affine @ [*(corner + np.array(roi) // 2), 1])[:3]
    grid = CropGrid("left", centre, np.eye(3), roi)
    coords = localise._grid_in_scan_voxels(grid, affine)
    np.testing.assert_allclose(coords, np.round(coords), atol=1e-6)
    raw = np.asarray(canonical.dataobj)[tuple(slice(c, c + r) for c, r in zip(corner, roi))]
    sampled = np.asarray(data)[tuple(np.round(coords).astype(int))]
    np.testing.assert_array_equal(sampled, raw)
    crop_label = (np.arange(np.prod(roi)).reshape(roi) % 3).astype(np.uint8)
    pasted = paste_back(crop_label, grid, shape, affine)
    expected = np.zeros(shape, np.uint8)
    expected[tuple(np.round(coords).astype(int))] = crop_label
    np.testing.assert_array_equal(pasted, expected)


def test_sample_crop_is_normalised_like_the_store():
    data = np.random.default_rng(0).random((60, 70, 60)).astype(np.float32) * 500
    grid = CropGrid("left", np.array([0.0, 0.0, 0.0]), np.eye(3), (16, 16, 16))
    affine = np.eye(4)
    affine[:3, 3] = -30
    crop = sample_crop(data, affine, grid)
    assert crop.shape == (16, 16, 16) and crop.dtype == np.float32
    assert crop.min() == 0.0 and crop.max() == 1.0


# ---------------------------------------------------------------- any head

def test_both_hippocampi_are_found_in_every_pose_and_grid(head_case):
    name, pose, head, _, registration = head_case
    assert registration.confidence > localise.MIN_CONFIDENCE, name
    for grid in hemisphere_grids(registration, ROI):
        error = np.linalg.norm(grid.centre - true_centre(pose, grid.hemisphere))
        assert error < 4.0, f"{name} {grid.hemisphere}: box centre {error:.1f} mm off"
        assert angle_deg(grid.rotation, rotation_part(pose.matrix[:3, :3])) < 4.0, name


def test_segment_head_recovers_the_painted_hippocampi(head_case):
    """Known-output model on painted heads: the labels land on the moved hippocampi in the scan's grid."""
    name, pose, head, truth_image, registration = head_case
    data = np.asarray(head.dataobj)
    result = segment_head([threshold_run()], data, head.affine, registration=registration)
    assert result.label.shape == data.shape
    assert result.quality.localised, result.quality.reasons
    truth = np.asarray(truth_image.dataobj)
    scores = hemisphere_agreement(result.label, truth, head.header.get_zooms()[:3])
    voxel = abs(np.linalg.det(head.affine[:3, :3]))
    for side, value in (("left", 1), ("right", 2)):
        # Measured once (threshold model, these four heads, the ICBM152 template): Dice
        # 0.861-0.896, all predicted voxels within 3 mm, volume 0.77-0.83 of the true one
        # (interpolated tube edges fall under the threshold).
        assert scores[side]["dice"] > 0.8, (name, side, scores[side])
        assert scores[side]["within_mm"] > 0.99, (name, side, scores[side])
        true_mm3 = (truth == value).sum() * voxel
        predicted_mm3 = result.volumes_mm3[side][1:].sum()
        assert 0.72 < predicted_mm3 / true_mm3 < 0.88, (name, side, predicted_mm3, true_mm3)
        assert np.all(truth[result.hemispheres[side] > 0] != 3 - value)  # never the other side


# ---------------------------------------------------------------- quality flags

def test_implausible_volumes_are_flagged():
    plausible = {"left": np.array([0, 2000.0, 1500.0]), "right": np.array([0, 1800.0, 1800.0])}
    assert check_volumes(plausible) == []
    reasons = check_volumes({"left": np.array([0, 200.0, 100.0]), "right": np.array([0, 1800.0, 1800.0])})
    assert len(reasons) == 1 and "left" in reasons[0] and "300 mm3" in reasons[0]


def test_failed_localisation_gives_no_volumes():
    registration = Registration(np.eye(4), 0.05, (1.4, 1.4, 1.4))
    reasons = localise.check_localisation(registration)
    assert len(reasons) == 2 and all(r.startswith("localisation failed") for r in reasons)
    result = HeadSegmentation(np.zeros((4, 4, 4), np.uint8), {}, registration, [],
                              HeadQuality(0.05, tuple(reasons)))
    row = volume_columns(result, ["background", "anterior", "posterior"])
    assert row["quality"] == "flagged" and row["total_mm3"] == "" and row["left_total_mm3"] == ""


@pytest.fixture(scope="module")
def predict_inputs(tmp_path_factory, painted):
    """A posed painted head, a noise 'scan' of head size, and a Decathlon-sized crop."""
    folder = tmp_path_factory.mktemp("fullhead") / "in"
    folder.mkdir()
    _, head, _ = posed_head(painted, "LPS-1mm-noneck-rot-15")
    nib.save(head, folder / "head.nii.gz")
    noise = np.random.default_rng(0).normal(500, 150, (160, 192, 160)).astype(np.int16)
    nib.save(nib.Nifti1Image(noise, np.diag([-1.0, 1.0, 1.0, 1.0])), folder / "noise.nii.gz")
    return folder


def test_predict_full_heads_flags_noise_and_keeps_the_input_grid(predict_inputs,
                                                                  tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("hipseg.predict.load_runs", lambda *a, **k: [threshold_run()])
    out = tmp_path / "out"
    assert main(["predict", "unused-run", str(predict_inputs), str(out), "--quiet"]) == 0
    assert "WARNING noise: localisation failed" in capsys.readouterr().err
    with open(out / "volumes.csv") as handle:
        table = {row["case"]: row for row in csv.DictReader(handle)}
    assert table["head"]["quality"] == "ok"
    assert 1000 < float(table["head"]["left_total_mm3"]) < 8000
    assert 1000 < float(table["head"]["right_total_mm3"]) < 8000
    assert float(table["head"]["total_mm3"]) == pytest.approx(
        float(table["head"]["left_total_mm3"]) + float(table["head"]["right_total_mm3"]))
    assert table["noise"]["quality"] == "flagged" and table["noise"]["total_mm3"] == ""
    for case in ("head", "noise"):
        source, written = nib.load(predict_inputs / f"{case}.nii.gz"), nib.load(out / f"{case}.nii.gz")
        assert written.shape == source.shape
        np.testing.assert_array_equal(written.affine, source.affine)
        assert written.header.get_zooms() == source.header.get_zooms()
    assert not np.asarray(nib.load(out / "noise.nii.gz").dataobj).any()


def test_roi_sized_scans_keep_the_coarse_pass(mixed_inputs_crop, make_run, synth_store, tmp_path,
                                              monkeypatch):
    """An ROI-sized scan never reaches the localiser, and volumes.csv keeps its old columns."""
    def no_registration(*args, **kwargs):
        raise AssertionError("ROI-sized scans must not be registered")

    run = make_run(synth_store, tmp_path / "run", val_cases=[])
    monkeypatch.setattr(localise, "register", no_registration)
    after = predict(run, mixed_inputs_crop, tmp_path / "after", progress=False)
    assert after and all(row["located"] is not None for row in after)
    with open(tmp_path / "after" / "volumes.csv") as handle:
        header = next(csv.reader(handle))
    assert header == ["case", "input", "output", "shape", "voxel_mm3", "located", "anterior_mm3",
                      "posterior_mm3", "total_mm3"]


@pytest.fixture
def mixed_inputs_crop(tmp_path):
    from hipseg.synth import SynthConfig, make_dataset

    data = make_dataset(tmp_path / "crop", SynthConfig(n_cases=1, shape=(30, 44, 28),
                                                         spacing=(1.2, 0.9, 1.5), orientation="PIR",
                                                         seed=2), progress=False)
    return data / "imagesTr"


# ---------------------------------------------------------------- real anatomy (../shared/data/fullhead)

@pytest.fixture(scope="module")
def real_fullhead():
    folder = data_root() / "fullhead"
    if not (folder / "MNI152_T1_2mm.nii.gz").exists():
        pytest.skip(f"real full-head template not found at {folder} (set HIPSEG_DATA to its parent)")
    return (nib.load(folder / "MNI152_T1_2mm.nii.gz"),
            freesurfer_hippocampi(nib.load(folder / "atlas_desikan_killiany.nii.gz")))


@pytest.mark.realdata
@pytest.mark.parametrize("name", ["RAS-1mm-neck-rot+15", "LPS-1mm-noneck-rot-15"])
def test_real_template_heads_hold_each_whole_hippocampus_in_its_crop(real_fullhead, name):
    """On the MNI152 with FreeSurfer's labels moved along: the box sits on each real hippocampus."""
    pose, head, label = posed_head(real_fullhead, name)
    truth = np.asarray(label.dataobj)
    registration = register(np.asarray(head.dataobj), head.affine)
    assert registration.confidence > 0.9  # measured once: 0.97-0.99
    for grid in hemisphere_grids(registration, ROI):
        value = 1 if grid.hemisphere == "left" else 2
        inside = paste_back(np.ones(ROI, np.uint8), grid, truth.shape, head.affine)
        assert inside[truth == value].mean() > 0.99, (name, grid.hemisphere)
        world = nib.affines.apply_affine(head.affine, np.argwhere(truth == value))
        centre = (world.min(axis=0) + world.max(axis=0)) / 2
        assert np.linalg.norm(grid.centre - centre) < 5.0, (name, grid.hemisphere)


# ---------------------------------------------------------------- convert --label-map

def test_convert_label_map_writes_one_crop_per_hemisphere(painted, tmp_path, synth_store):
    from hipseg.convert import convert
    from hipseg.store import open_store

    pose, head, label = posed_head(painted, "PIL-1.5mm-bias")
    for folder, image in (("images", head), ("labels", label)):
        (tmp_path / "src" / folder).mkdir(parents=True)
        nib.save(image, tmp_path / "src" / folder / "subject.nii.gz")
    report = convert(tmp_path / "src", tmp_path / "heads.zarr", workers=1, progress=False,
                     label_map="1:1,2:1")  # painted left (1) and right (2) -> class 1
    store = open_store(report.path)
    assert store.case_ids == ["subject_left", "subject_right"]
    assert store.hemispheres == ["left", "right"]
    for volume in store.volumes:
        # each crop holds one hippocampus, on its own side of the head
        centre_voxel = np.asarray(volume["crop_offset"]) + np.asarray(store.roi_shape) // 2
        centre = nib.affines.apply_affine(np.asarray(volume["affine"]) @ _canonical_shift(volume),
                                          centre_voxel)
        expected = true_centre(pose, volume["hemisphere"])
        assert np.linalg.norm(centre - expected) < 8.0, volume["hemisphere"]
        assert volume["class_voxels"][1] > 0 and volume["class_voxels"][2] == 0
    assert open_store(synth_store).hemispheres == [None] * open_store(synth_store).n_volumes


def _canonical_shift(volume: dict) -> np.ndarray:
    """Canonical voxel -> the crop file's voxel (the crops are written canonical: identity)."""
    assert tuple(volume["axcodes"]) == ("R", "A", "S")
    return np.eye(4)


def test_label_map_errors_name_the_problem():
    from hipseg.errors import ConfigError
    from hipseg.hemispheres import parse_label_map

    assert parse_label_map("17:1,53:1") == {17: 1, 53: 1}
    with pytest.raises(ConfigError, match="SOURCE:TARGET"):
        parse_label_map("17-1")
    with pytest.raises(ConfigError, match="foreground"):
        parse_label_map("17:0")


def test_evaluate_scores_full_heads_through_the_localiser(painted, tmp_path, monkeypatch):
    from hipseg.evaluate import evaluate

    _, head, label = posed_head(painted, "PIL-1.5mm-bias")
    whole = nib.Nifti1Image((np.asarray(label.dataobj) > 0).astype(np.uint8), label.affine)
    for folder, image in (("images", head), ("labels", whole)):  # whole hippocampus as class 1
        (tmp_path / "data" / folder).mkdir(parents=True)
        nib.save(image, tmp_path / "data" / folder / "subject.nii.gz")
    monkeypatch.setattr("hipseg.evaluate.load_runs", lambda *a, **k: [threshold_run()])
    document = evaluate(tmp_path / "run", tmp_path / "data", progress=False)
    record = document["cases"][0]
    assert record["quality"] == "ok" and record["located"] and record["roi_offset"] is None
    assert record["dice"]["anterior"] > 0.8  # measured once: 0.85 (threshold model, both sides)
