"""Synthetic data: deterministic, correctly oriented, and shaped like a hippocampus."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from hipseg.errors import ConfigError
from hipseg.nifti import load_case
from hipseg.synth import SynthConfig, make_dataset, preset, synth_canonical, synth_case


def test_same_seed_same_case_other_seed_other_case():
    config = SynthConfig(n_cases=2, seed=1)
    a, b = synth_case(config, 1), synth_case(config, 1)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    other = synth_case(SynthConfig(n_cases=2, seed=2), 1)
    assert not np.array_equal(a[1], other[1])


def test_label_has_anterior_and_posterior_parts_in_order():
    image, label = synth_canonical(SynthConfig(), 0)
    assert set(np.unique(label)) == {0, 1, 2}
    # Axis 1 runs posterior -> anterior in RAS: class 2 (posterior) lies behind class 1.
    y_anterior = np.nonzero(label == 1)[1].mean()
    y_posterior = np.nonzero(label == 2)[1].mean()
    assert y_posterior < y_anterior
    # The hippocampus is brighter than its surroundings by about the configured contrast.
    difference = image[label > 0].mean() - image[label == 0].mean()
    assert 0.2 < difference < 0.6


@pytest.mark.parametrize("orientation", ["RAS", "LPS", "PIR"])
@pytest.mark.parametrize("dtype", ["uint8", "int16", "float32"])
def test_written_files_reorient_back_to_the_canonical_case(tmp_path, orientation, dtype):
    config = SynthConfig(n_cases=1, orientation=orientation, dtype=dtype, seed=4)
    root = make_dataset(tmp_path, config, progress=False)
    manifest = json.loads((root / "dataset.json").read_text())
    entry = manifest["training"][0]
    case = load_case(root / entry["image"], root / entry["label"], 3)
    assert "".join(case.axcodes) == orientation
    assert nib.load(root / entry["image"]).get_data_dtype() == np.dtype(dtype)
    _, label = synth_canonical(config, 0)
    np.testing.assert_array_equal(case.label, label)


def test_head_preset_is_a_full_head_with_an_off_centre_hippocampus():
    config = preset("head", n_cases=1, shape=(96, 112, 96))
    image, label, _ = synth_case(config, 0)
    assert image.dtype == np.int16 and image.shape == (96, 112, 96)
    assert 0 < (label > 0).sum() < 0.01 * label.size


@pytest.mark.parametrize(
    "bad",
    [
        {"n_cases": 0},
        {"shape": (8, 50, 35)},
        {"dtype": "float64"},
        {"orientation": "RRS"},
        {"off_centre": 0.9},
    ],
)
def test_bad_config_is_refused(bad):
    with pytest.raises(ConfigError):
        SynthConfig(**bad)


def test_config_round_trips_through_dict():
    config = preset("head", n_cases=3)
    assert SynthConfig.from_dict(config.to_dict()) == config
