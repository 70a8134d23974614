"""Cross-validation: folds partition the cases, each case is scored once, aggregates, resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import hipseg.crossval as cv
from hipseg.cli import main
from hipseg.errors import ConfigError
from hipseg.store import open_store
from hipseg.synth import SynthConfig, make_dataset

TINY = {"channels": [4, 8], "strides": [2], "num_res_units": 1, "groups": 2}
SETTINGS = {"model_options": TINY, "batch_size": 4, "steps": 3, "val_every": 3,
            "checkpoint_every": 3, "log_every": 3, "num_workers": 0}


@given(st.integers(2, 40), st.integers(2, 8), st.integers(0, 5))
def test_folds_are_disjoint_balanced_and_cover_every_case(n, folds, seed):
    ids = [f"case_{i:03d}" for i in range(n)]
    if folds > n:
        with pytest.raises(ConfigError):
            cv.fold_cases(ids, folds, seed)
        return
    parts = cv.fold_cases(ids[::-1], folds, seed)
    assert parts == cv.fold_cases(ids, folds, seed)  # the order given does not matter
    flat = [c for p in parts for c in p]
    assert sorted(flat) == ids and len(flat) == len(set(flat))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
    """6 small synthetic cases: 3 folds of 2, each fold trained and scored in seconds."""
    return make_dataset(tmp_path_factory.mktemp("cvdata") / "Task",
                        SynthConfig(n_cases=6, shape=(20, 28, 20), seed=5), progress=False)


@pytest.fixture(scope="module")
def small_store(small_dataset, tmp_path_factory):
    from hipseg.convert import convert

    out = tmp_path_factory.mktemp("cvstore") / "small.zarr"
    convert(small_dataset, out, workers=1, progress=False)
    return out


class _Counter:
    """Wraps a function of crossval and records which fold's run folder it was called for."""

    def __init__(self, function, fail_on: str | None = None):
        self.function, self.fail_on, self.calls = function, fail_on, []

    def __call__(self, first, *args, **kwargs):
        where = str(getattr(first, "out", first))
        fold = next(p for p in where.split("/") if p.startswith("fold"))
        self.calls.append(fold)
        if fold == self.fail_on:
            raise RuntimeError(f"killed in {fold}")
        return self.function(first, *args, **kwargs)


@pytest.fixture(scope="module")
def finished(small_store, small_dataset, tmp_path_factory):
    """A 3-fold run interrupted during fold 1's evaluation, then resumed; call counts kept."""
    out = tmp_path_factory.mktemp("cv") / "cv"
    mp = pytest.MonkeyPatch()
    try:
        failing = _Counter(cv.evaluate, fail_on="fold1")
        mp.setattr(cv, "evaluate", failing)
        with pytest.raises(RuntimeError, match="fold1"):
            cv.crossval(small_store, out, folds=3, data=small_dataset, settings=SETTINGS,
                        progress=False)
        first_result = (out / "fold0" / "result.json").stat().st_mtime_ns
        trains, evaluates = _Counter(cv.train), _Counter(failing.function)
        mp.setattr(cv, "train", trains)
        mp.setattr(cv, "evaluate", evaluates)
        document = cv.crossval(small_store, out, folds=3, data=small_dataset, settings=SETTINGS,
                               progress=False)
    finally:
        mp.undo()
    return out, document, trains.calls, evaluates.calls, first_result


def test_resume_skips_finished_folds(finished):
    out, _, trains, evaluates, first_result = finished
    # fold0 was done; fold1 was trained but died in evaluation; fold2 had not started.
    assert trains == ["fold2"]
    assert evaluates == ["fold1", "fold2"]
    assert (out / "fold0" / "result.json").stat().st_mtime_ns == first_result


def test_every_case_is_held_out_and_scored_exactly_once(finished, small_store):
    out, document, *_ = finished
    ids = sorted(open_store(small_store).case_ids)
    folds = document["plan"]["folds"]
    assert sorted(c for f in folds for c in f) == ids
    scored = []
    for k, fold in enumerate(document["folds"]):
        held_out = set(folds[k])
        assert set(fold["cases"]) == held_out
        split = json.loads((out / f"fold{k}" / "run" / "split.json").read_text())
        assert sorted(split["train"] + split["val"]) == sorted(set(ids) - held_out)
        assert not held_out & set(split["train"] + split["val"])
        evaluation = json.loads((out / f"fold{k}" / "evaluation.json").read_text())
        assert sorted(r["case"] for r in evaluation["cases"]) == sorted(held_out)
        scored += [r["case"] for r in fold["per_case"]]
    assert sorted(scored) == ids


def test_aggregates_equal_the_per_fold_numbers(finished):
    out, document, *_ = finished
    saved = json.loads((out / "crossval.json").read_text())
    assert saved["summary"] == document["summary"]
    names = document["class_names"]
    assert names == ["anterior", "posterior"]
    for k, fold in enumerate(saved["folds"]):
        evaluation = json.loads((out / f"fold{k}" / "evaluation.json").read_text())
        assert fold["dice"] == evaluation["mean_dice"]
        assert fold["edge_dice"] == evaluation["edge_vs_middle"]["edge"]
    for metric in cv.METRICS:
        for n in names:
            values = [f[metric][n] for f in saved["folds"]]
            entry = saved["summary"][metric][n]
            assert entry["folds"] == values
            kept = [v for v in values if v is not None]
            if kept:
                assert entry["mean"] == pytest.approx(np.mean(kept))
                assert entry["std"] == pytest.approx(np.std(kept, ddof=1))
    per_fold = [f["mean_dice"] for f in saved["folds"]]
    assert saved["summary"]["mean_dice"]["mean"] == pytest.approx(np.mean(per_fold))
    assert (out / "crossval.png").stat().st_size > 0


def test_another_evaluation_reuses_the_trained_folds(finished, small_store, small_dataset,
                                                      monkeypatch):
    out, *_ = finished
    monkeypatch.setattr(cv, "train", _Counter(cv.train, fail_on="fold0"))
    document = cv.crossval(small_store, out, folds=3, data=small_dataset, settings=SETTINGS,
                           flip=False, progress=False)
    assert not document["flip"] and not any(f["flip"] for f in document["folds"])
    assert (out / "crossval-noflip.json").exists() and (out / "fold2" / "result-noflip.json").exists()
    assert json.loads((out / "fold2" / "result.json").read_text())["flip"]  # the default's, kept


def test_other_settings_in_the_same_folder_are_refused(finished, small_store, small_dataset):
    out, *_ = finished
    with pytest.raises(ConfigError, match="settings"):
        cv.crossval(small_store, out, folds=3, data=small_dataset,
                    settings={**SETTINGS, "lr": 0.1}, progress=False)


def test_the_command_converts_a_nifti_folder_and_runs_quick(small_dataset, tmp_path, capsys):
    out = tmp_path / "cv"
    code = main(["crossval", str(small_dataset), "--out", str(out), "--quick", "--steps", "2",
                 "--channels", "4,8", "--strides", "2", "--res-units", "1", "--groups", "2",
                 "--batch-size", "4", "--workers", "0", "--val-fraction", "0", "--quiet"])
    assert code == 0
    document = json.loads((out / "crossval.json").read_text())
    assert document["summary"]["n_folds"] == cv.QUICK_FOLDS
    assert document["plan"]["settings"]["val_fraction"] == 0.0
    assert all(f["steps"] == 2 and f["selection"] == "final" and f["val_cases"] == []
               for f in document["folds"])
    assert (out / "store.zarr").exists()
    assert "mean Dice" in capsys.readouterr().out


@pytest.mark.parametrize("argument", ["source", "out", "data"])
def test_a_url_is_refused_and_nothing_local_is_created(argument, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    kwargs = {"source": str(tmp_path / "store.zarr"), "out": tmp_path / "cv", "data": None}
    kwargs[argument] = "s3://bucket/hippo.zarr"
    with pytest.raises(ConfigError, match="needs a local"):
        cv.crossval(kwargs.pop("source"), kwargs.pop("out"), progress=False, **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_a_result_scored_another_way_is_scored_again(finished, small_store, small_dataset,
                                                     monkeypatch):
    """A folder from before the flip default kept its unflipped scores in result.json."""
    out, *_ = finished
    path = out / "fold1" / "result.json"
    stale = json.loads(path.read_text()) | {"flip": False, "mean_dice": -1.0}
    path.write_text(json.dumps(stale))
    trained = _Counter(cv.train)
    monkeypatch.setattr(cv, "train", trained)
    document = cv.crossval(small_store, out, folds=3, data=small_dataset, settings=SETTINGS,
                           progress=False)
    assert all(f["flip"] for f in document["folds"]) and document["folds"][1]["mean_dice"] >= 0
    assert json.loads(path.read_text())["flip"] and trained.calls == []  # re-scored, not trained
