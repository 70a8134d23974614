"""Evaluation: metrics on known volumes, the original-grid round trip, the JSON and the report."""

from __future__ import annotations

import json

import numpy as np
import pytest

import hipseg.evaluate as evaluate_module
from hipseg.convert import convert
from hipseg.errors import ConfigError, InputError
from hipseg.evaluate import evaluate
from hipseg.inference import Segmentation
from hipseg.metrics import edge_middle_dice, hd95_missing, hd95_per_class, image_diagonal_mm
from hipseg.synth import SynthConfig, make_dataset


@pytest.fixture(scope="module")
def oblique_data(tmp_path_factory):
    """Non-canonical orientation (PIR), anisotropic spacing: every axis differs from the store's."""
    root = tmp_path_factory.mktemp("oblique")
    config = SynthConfig(n_cases=3, shape=(30, 44, 28), spacing=(1.2, 0.9, 1.5), orientation="PIR",
                         dtype="int16", intensity_scale=800.0, seed=5)
    data = make_dataset(root / "Task", config, progress=False)
    convert(data, root / "s.zarr", workers=1, progress=False)
    return data, root / "s.zarr"


# ---------------------------------------------------------------- metrics on known volumes

def test_hd95_of_a_one_voxel_shift_is_the_spacing_along_the_shift():
    label = np.zeros((8, 14, 14), np.uint8)
    label[3:5, 2:12, 2:12] = 1
    shifted = np.roll(label, 1, axis=0)
    assert hd95_per_class(label, label, 3, (2.0, 1.0, 1.0)) == [0.0, 0.0]  # class 2 in neither
    assert hd95_per_class(shifted, label, 3, (2.0, 1.0, 1.0))[0] == pytest.approx(2.0)


def test_hd95_of_a_class_missing_from_one_side_is_the_image_diagonal():
    label = np.zeros((8, 14, 14), np.uint8)
    label[3:5, 2:12, 2:12] = 1
    label[6, 6, 6] = 2
    prediction = np.where(label == 2, 0, label)  # class 2 missed
    diagonal = float(np.sqrt((8 * 2.0) ** 2 + 14.0 ** 2 + 14.0 ** 2))
    assert image_diagonal_mm(label.shape, (2.0, 1.0, 1.0)) == pytest.approx(diagonal)
    assert hd95_per_class(prediction, label, 3, (2.0, 1.0, 1.0)) == [0.0, pytest.approx(diagonal)]
    assert hd95_missing(prediction, label, 3) == [False, True]
    # the other way round: predicted but not labelled
    assert hd95_per_class(label, prediction, 3, (2.0, 1.0, 1.0))[1] == pytest.approx(diagonal)


def test_edge_and_middle_slices_are_scored_apart():
    label = np.zeros((6, 6, 16), np.uint8)
    label[1:5, 1:5, 2:12] = 1  # labelled range: slices 2..11, edge width 2
    prediction = label.copy()
    prediction[..., [2, 3, 10, 11]] = 0  # the edge slices missed, the middle exact
    edge, middle = edge_middle_dice(prediction, label, 3, axis=2)
    assert edge == [0.0, None] and middle == [1.0, None]
    edge, middle = edge_middle_dice(label, label, 3, axis=2)
    assert edge[0] == middle[0] == 1.0


# ---------------------------------------------------------------- the whole pipeline

def test_a_prediction_equal_to_the_label_scores_dice_1_in_the_original_grid(
        oblique_data, make_run, tmp_path, monkeypatch):
    """An oracle segmenter returns the canonical label; scores in the PIR grid must be perfect."""
    data, store = oblique_data
    run = make_run(store, tmp_path / "run", val_cases=[])
    seen = {}
    load_case = evaluate_module.load_case

    def remembering_load_case(*args, **kwargs):
        seen["case"] = load_case(*args, **kwargs)
        return seen["case"]

    monkeypatch.setattr(evaluate_module, "load_case", remembering_load_case)
    monkeypatch.setattr(evaluate_module, "segment",
                        lambda runs, image, **options: Segmentation(seen["case"].label, (0, 0, 0), True))
    doc = evaluate(run, data, json_out=tmp_path / "out" / "eval.json", progress=False)
    assert doc["n_cases"] == 3
    for record in doc["cases"]:
        assert record["dice"] == {"anterior": 1.0, "posterior": 1.0}
        assert record["hd95"] == {"anterior": 0.0, "posterior": 0.0}
        assert record["volume_mm3"] == record["predicted_volume_mm3"]
        assert record["shape"] == [44, 28, 30]  # the PIR file's own shape
    assert doc["mean_dice"] == {"anterior": 1.0, "posterior": 1.0}
    assert json.loads((tmp_path / "out" / "eval.json").read_text()) == json.loads(json.dumps(doc))


def test_volumes_are_reported_in_cubic_millimetres(oblique_data, make_run, tmp_path):
    data, store = oblique_data
    doc = evaluate(make_run(store, tmp_path / "run", val_cases=[]), data, progress=False)
    voxel = 1.2 * 0.9 * 1.5
    for record in doc["cases"]:
        for value in record["volume_mm3"].values():
            assert value / voxel == pytest.approx(round(value / voxel))


def test_json_schema_and_report_with_a_real_model(oblique_data, make_run, tmp_path):
    data, store = oblique_data
    run = make_run(store, tmp_path / "run", val_cases=[], context=1)
    doc = evaluate(run, data, json_out=tmp_path / "e.json", progress=False)
    assert set(doc["mean_dice"]) == {"anterior", "posterior"}
    keys = {"case", "dice", "hd95", "edge_dice", "middle_dice", "volume_mm3"}
    assert keys <= set(doc["cases"][0])
    for record in doc["cases"]:
        assert all(0.0 <= d <= 1.0 for d in record["dice"].values())
        assert all(h >= 0 for h in record["hd95"].values())
    report = (tmp_path / "evaluation.md").read_text()
    assert "## Best" in report and "## Worst" in report and "edge slices" in report
    for which in ("best", "worst"):
        assert (tmp_path / f"overlay_{which}.png").read_bytes()[:4] == b"\x89PNG"


def test_val_selects_the_runs_held_out_cases(oblique_data, make_run, tmp_path):
    data, store = oblique_data
    run = make_run(store, tmp_path / "run", val_cases=["synth_0001"])
    doc = evaluate(run, data, cases="val", progress=False)
    assert [r["case"] for r in doc["cases"]] == ["synth_0001"]
    with pytest.raises(InputError, match="no labelled cases"):
        evaluate(run, data, cases=["nobody"], progress=False)


def test_an_ensemble_averages_runs_of_the_same_store(oblique_data, make_run, synth_store, tmp_path):
    data, store = oblique_data
    first = make_run(store, tmp_path / "a", val_cases=[])
    second = make_run(store, tmp_path / "b", val_cases=[], axis="coronal", seed=1)
    doc = evaluate(first, data, ensemble=[second], progress=False)
    assert doc["ensemble"] == [str(second)] and doc["n_cases"] == 3
    other_store = make_run(synth_store, tmp_path / "c", val_cases=[])
    with pytest.raises(ConfigError, match="same store"):
        evaluate(first, data, ensemble=[other_store], progress=False)
