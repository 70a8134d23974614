"""Shared fixtures: small synthetic datasets and stores, and the real data when present."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hipseg.synth import SynthConfig, make_dataset

REPO = Path(__file__).resolve().parents[1]
DATA_ENV = "HIPSEG_DATA"


def data_root() -> Path:
    """Real data: $HIPSEG_DATA, defaulting to ../shared/data beside the project root."""
    return Path(os.environ.get(DATA_ENV, REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def real_task_dir() -> Path:
    path = data_root() / "Task04_Hippocampus"
    if not (path / "dataset.json").exists():
        pytest.skip(f"real Decathlon data not found at {path} (set {DATA_ENV} to its parent folder)")
    return path


@pytest.fixture(scope="session")
def real_messy_dir() -> Path:
    path = data_root() / "messy"
    if not path.exists():
        pytest.skip(f"real problem cases not found at {path} (set {DATA_ENV} to its parent folder)")
    return path


@pytest.fixture(scope="session")
def synth_dataset(tmp_path_factory) -> Path:
    """12 small synthetic cases in the Decathlon layout."""
    return make_dataset(tmp_path_factory.mktemp("synth") / "Task", SynthConfig(n_cases=12, seed=3),
                        progress=False)


@pytest.fixture(scope="session")
def synth_store(synth_dataset, tmp_path_factory) -> Path:
    """The synthetic dataset converted to a store (in-process, one worker)."""
    from hipseg.convert import convert

    out = tmp_path_factory.mktemp("store") / "synth.zarr"
    convert(synth_dataset, out, workers=1, progress=False)
    return out


@pytest.fixture(scope="session")
def real_store(real_task_dir, tmp_path_factory) -> Path:
    """The 200 real cases converted once per test session."""
    from hipseg.convert import convert

    out = tmp_path_factory.mktemp("real") / "real.zarr"
    convert(real_task_dir, out, workers=2, progress=False)
    return out
