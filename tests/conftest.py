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
    return make_dataset(
        tmp_path_factory.mktemp("synth") / "Task", SynthConfig(n_cases=12, seed=3), progress=False
    )


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


@pytest.fixture
def make_run():
    """Factory for untrained run folders in hipseg.train's format (for inference geometry tests).

    ``make_run(store, out, val_cases=[...], seed=0, **TrainConfig changes)`` saves a tiny
    randomly initialised model as best.pt with the store's metadata, plus split.json.
    """
    import json

    import torch

    from hipseg.models import build_model
    from hipseg.store import open_store
    from hipseg.train import TrainConfig, run_meta, save_weights

    tiny = {"channels": [4, 8], "strides": [2], "num_res_units": 1, "groups": 2}

    def factory(store: Path, out: Path, val_cases: list[str] = (), seed: int = 0, **changes) -> Path:
        config = TrainConfig(store=str(store), out=str(out), model_options=tiny, steps=1, **changes)
        opened = open_store(store)
        meta = run_meta(opened, config, list(val_cases))
        torch.manual_seed(seed)
        model = build_model(config.model, meta["in_channels"], len(meta["class_names"]), **tiny)
        out.mkdir(parents=True)
        save_weights(out / "best.pt", model, config, meta, step=0)
        (out / "split.json").write_text(
            json.dumps({"train": [c for c in opened.case_ids if c not in val_cases], "val": list(val_cases)})
        )
        return out

    return factory
