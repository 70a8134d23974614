"""Inference: the test-time left-right flip."""

from __future__ import annotations

import numpy as np
import torch

from hipseg.config import TrainConfig
from hipseg.inference import run_probabilities, segment
from hipseg.models import build_model
from hipseg.runs import LoadedRun

TINY = {"channels": [4, 8], "strides": [2], "num_res_units": 1, "groups": 2}


def _run(axis: str = "axial") -> LoadedRun:
    torch.manual_seed(0)
    model = build_model("unet", 3, 3, **TINY).eval()
    config = TrainConfig(store="s", out="o", model_options=TINY, axis=axis)
    meta = {"class_names": ["background", "anterior", "posterior"], "roi_shape": [16, 24, 20],
            "window": [16, 24], "in_channels": 3, "spatial_dims": 2}
    return LoadedRun(model, config, meta, torch.device("cpu"))


def test_flip_averages_the_mirror_so_the_result_is_left_right_equivariant():
    run = _run()
    volume = np.random.default_rng(0).random((16, 24, 20), dtype=np.float32)
    plain = run_probabilities(run, volume)
    mirrored = run_probabilities(run, np.ascontiguousarray(volume[::-1]))
    flipped = run_probabilities(run, volume, flip=True)
    # An untrained network is not mirror-symmetric, so the check below can fail...
    assert not np.allclose(plain, mirrored[:, ::-1], atol=1e-4)
    # ...the average of the volume and its mirror, mirrored back, is.
    np.testing.assert_allclose(flipped, 0.5 * (plain + mirrored[:, ::-1]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(flipped, run_probabilities(
        run, np.ascontiguousarray(volume[::-1]), flip=True)[:, ::-1], rtol=1e-5, atol=1e-6)


def test_segment_passes_flip_to_the_fine_pass(monkeypatch):
    import hipseg.inference

    # No foreground found: the ROI is centred in both volumes, so their labels must mirror.
    monkeypatch.setattr(hipseg.inference, "locate", lambda *args: None)
    run = _run()
    volume = np.random.default_rng(1).random((16, 24, 20), dtype=np.float32)
    a, b = segment([run], volume, flip=True), segment([run], volume[::-1].copy(), flip=True)
    assert a.label.shape == volume.shape and a.label.dtype == np.uint8 and a.offset == b.offset
    np.testing.assert_array_equal(a.label, b.label[::-1])


def test_the_flip_is_on_by_default_and_can_be_turned_off():
    """The default chosen by cross-validation (inference.TEST_TIME_FLIP), in every command."""
    import inspect

    from hipseg.cli import build_parser
    from hipseg.crossval import crossval
    from hipseg.evaluate import evaluate
    from hipseg.inference import TEST_TIME_FLIP
    from hipseg.predict import predict

    for function in (segment, evaluate, predict, crossval):
        assert inspect.signature(function).parameters["flip"].default is TEST_TIME_FLIP
    parser = build_parser()
    for argv in (["evaluate", "RUN", "DATA"], ["predict", "RUN", "IN", "OUT"],
                 ["crossval", "STORE", "--out", "CV"]):
        assert parser.parse_args(argv).flip is True
        assert parser.parse_args([*argv, "--no-flip"]).flip is False
