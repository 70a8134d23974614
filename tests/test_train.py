"""Training: configs, the split, schedules, run folders, weights-only checkpoints, resume."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import hipseg.train as train_module
from hipseg.errors import ConfigError, StoreError
from hipseg.store import open_store
from hipseg.train import (
    TrainConfig,
    build_config,
    dice_per_class,
    load_checkpoint,
    load_run,
    lr_factor,
    read_config_file,
    split_cases,
    train,
)

REPO = Path(__file__).resolve().parents[1]
# A model small enough that a step takes milliseconds on a shared 2-core machine.
TINY = {"channels": [4, 8], "strides": [2], "num_res_units": 1, "groups": 2}


def tiny_config(store: Path, out: Path, **changes) -> TrainConfig:
    settings = dict(store=str(store), out=str(out), model_options=TINY, batch_size=4, steps=12,
                    val_every=6, checkpoint_every=6, log_every=3, num_workers=0, seed=1)
    settings.update(changes)
    return TrainConfig(**settings)


# ---------------------------------------------------------------- configuration

def test_config_round_trips_through_plain_json(tmp_path):
    config = tiny_config(tmp_path / "s.zarr", tmp_path / "run", context=2, loss="dice_focal",
                         schedule="cosine", max_minutes=3.5)
    data = json.loads(json.dumps(config.to_dict()))
    assert TrainConfig.from_dict(data) == config


def test_neither_steps_nor_minutes_means_the_default_time_budget():
    assert TrainConfig(store="s", out="o").max_minutes == train_module.DEFAULT_MINUTES
    assert TrainConfig(store="s", out="o", steps=5).max_minutes is None


@pytest.mark.parametrize("change", [
    {"model": "resnet"}, {"loss": "l1"}, {"axis": "oblique"}, {"context": -1},
    {"model": "unet3d", "context": 1}, {"steps": 0}, {"max_minutes": 0}, {"batch_size": 0},
    {"val_fraction": 1.0}, {"schedule": "step"}, {"warmup": 1.0}, {"lr": 0},
    {"model_options": {"depth": 3}},
])
def test_bad_settings_are_config_errors(change):
    with pytest.raises(ConfigError):
        TrainConfig(store="s", out="o", **change)


def test_unknown_keys_in_a_dict_are_named():
    with pytest.raises(ConfigError, match="learning_rate"):
        TrainConfig.from_dict({"store": "s", "out": "o", "learning_rate": 1.0})


@pytest.mark.parametrize("suffix, text", [
    (".toml", 'batch_size = 8\nlr = 0.01\naxis = "coronal"\n'),
    (".json", '{"train": {"batch_size": 8, "lr": 0.01, "axis": "coronal"}}'),
])
def test_config_files_are_read_and_flags_override_them(tmp_path, suffix, text):
    path = tmp_path / f"settings{suffix}"
    path.write_text(text)
    assert read_config_file(path) == {"batch_size": 8, "lr": 0.01, "axis": "coronal"}
    config = build_config("s.zarr", tmp_path / "run", config_file=path, lr=0.5, steps=7, seed=None)
    assert (config.batch_size, config.lr, config.axis, config.steps) == (8, 0.5, "coronal", 7)
    assert config.max_minutes is None  # --steps alone means exactly that many steps
    assert config.seed == 0  # None is "not given"


def test_a_broken_config_file_names_itself(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("batch_size = = 3")
    with pytest.raises(ConfigError, match="bad.toml"):
        read_config_file(path)


# ---------------------------------------------------------------- pure pieces

@given(st.lists(st.text(min_size=1, max_size=6), min_size=2, max_size=60, unique=True),
       st.floats(0.05, 0.95), st.integers(0, 5))
def test_split_is_a_deterministic_partition_by_case(ids, fraction, seed):
    train_ids, val_ids = split_cases(ids, fraction, seed)
    assert sorted(train_ids + val_ids) == sorted(ids)
    assert not set(train_ids) & set(val_ids)
    assert train_ids and val_ids
    assert split_cases(list(reversed(ids)), fraction, seed) == (train_ids, val_ids)


def test_split_of_200_cases_is_160_40():
    train_ids, val_ids = split_cases([f"case_{i:03d}" for i in range(200)], 0.2, 0)
    assert (len(train_ids), len(val_ids)) == (160, 40)


@pytest.mark.parametrize("schedule", ["onecycle", "cosine", "constant"])
def test_lr_schedules(schedule):
    values = np.array([lr_factor(p, schedule, 0.1) for p in np.linspace(0, 1, 101)])
    assert np.all((values >= 0) & (values <= 1 + 1e-9))
    if schedule == "constant":
        assert np.all(values == 1)
        return
    assert values[-1] < 1e-6
    peak = int(np.argmax(values))
    assert np.all(np.diff(values[peak:]) <= 1e-12)
    if schedule == "onecycle":
        assert peak == 10 and values[0] < 0.1 and np.all(np.diff(values[:peak + 1]) > 0)


def test_dice_per_class_on_known_overlaps():
    label = np.zeros((4, 4, 4), np.uint8)
    label[:2] = 1
    prediction = label.copy()
    prediction[0] = 0  # half of class 1 missed
    scores = dice_per_class(prediction, label, 3)
    assert scores[0] == pytest.approx(2 * 16 / (16 + 32))
    assert scores[1] == 1.0  # absent from both


# ---------------------------------------------------------------- runs

@pytest.fixture(scope="module")
def tiny_run(synth_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "run"
    seen_cases: set[str] = set()
    original = train_module._slice_batches

    def recording(store, config, cases, start, **options):
        batches, loader = original(store, config, cases, start, **options)

        def stream():
            for batch in batches:
                seen_cases.update(batch["case_id"])
                yield batch
        return stream(), loader

    train_module._slice_batches = recording
    try:
        result = train(tiny_config(synth_store, out, context=1), progress=False)
    finally:
        train_module._slice_batches = original
    return result, out, seen_cases


def test_a_run_folder_holds_everything_it_promises(tiny_run):
    result, out, _ = tiny_run
    for name in ("config.json", "split.json", "metrics.jsonl", "curve.png", "checkpoint.pt",
                 "best.pt", "run.json"):
        assert (out / name).stat().st_size > 0, name
    assert result.steps == 12
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [3, 6, 9, 12]
    val = [r for r in rows if r["kind"] == "val"]
    assert [r["step"] for r in val] == [6, 12]
    assert all(0.0 <= d <= 1.0 for r in val for d in r["dice"].values())
    assert result.best_mean_dice == max(r["mean_dice"] for r in val)
    assert json.loads((out / "run.json").read_text())["steps"] == 12


def test_no_validation_case_reaches_training(tiny_run):
    _, out, seen = tiny_run
    split = json.loads((out / "split.json").read_text())
    assert seen and seen <= set(split["train"])
    assert not seen & set(split["val"])


def test_checkpoints_load_with_weights_only(tiny_run):
    _, out, _ = tiny_run
    for name in ("checkpoint.pt", "best.pt"):
        data = torch.load(out / name, weights_only=True)
        assert data["format"] == 1
        assert all(isinstance(v, torch.Tensor) for v in data["model"].values())
    full = torch.load(out / "checkpoint.pt", weights_only=True)
    assert full["step"] == 12 and "optimizer" in full and full["meta"]["in_channels"] == 3


def test_a_pickled_object_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": 1, "payload": _Unsafe()}, path)
    with pytest.raises(Exception, match="[Ww]eights only"):
        load_checkpoint(path)


class _Unsafe:
    pass


def test_load_run_rebuilds_the_trained_model(tiny_run, synth_store):
    _, out, _ = tiny_run
    run = load_run(out)
    saved = torch.load(out / "best.pt", weights_only=True)["model"]
    for name, tensor in run.model.state_dict().items():
        assert torch.equal(tensor, saved[name])
    assert run.window == (32, 64) and run.config.context == 1


def test_starting_over_an_existing_run_needs_resume(tiny_run, synth_store):
    _, out, _ = tiny_run
    with pytest.raises(ConfigError, match="--resume"):
        train(tiny_config(synth_store, out, context=1), progress=False)
    with pytest.raises(ConfigError, match="lr"):
        train(tiny_config(synth_store, out, context=1, lr=0.1), resume=True, progress=False)


def test_missing_checkpoint_is_a_store_error(tmp_path):
    with pytest.raises(StoreError, match="train"):
        load_run(tmp_path)


def test_the_3d_model_trains_on_whole_crops(synth_store, tmp_path):
    config = tiny_config(synth_store, tmp_path / "run3d", model="unet3d", batch_size=2, steps=2,
                         val_every=2, checkpoint_every=2)
    result = train(config, progress=False)
    assert result.steps == 2 and set(result.final_dice) == {"anterior", "posterior"}
    assert load_run(tmp_path / "run3d").window == (32, 64, 32)


# ---------------------------------------------------------------- kill -9 and resume

def _train_command(store: Path, out: Path, steps: int) -> list[str]:
    return [sys.executable, "-m", "hipseg", "train", str(store), "--out", str(out),
            "--steps", str(steps), "--checkpoint-every", "4", "--val-every", "8",
            "--log-every", "4", "--batch-size", "4",
            "--channels", "4,8", "--strides", "2", "--res-units", "1", "--groups", "2",
            "--workers", "0", "--seed", "3", "--deterministic", "--quiet"]


def _env() -> dict[str, str]:
    # One thread in both runs: the same reduction order, so equal inputs give equal bits.
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def test_kill_9_then_resume_ends_where_an_uninterrupted_run_ends(synth_store, tmp_path):
    steps = 40
    reference = subprocess.Popen(_train_command(synth_store, tmp_path / "straight", steps),
                                 env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    interrupted = tmp_path / "interrupted"
    victim = subprocess.Popen(_train_command(synth_store, interrupted, steps), env=_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (interrupted / "checkpoint.pt").exists():
        assert victim.poll() is None, victim.stderr.read().decode()
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL
    killed_at = torch.load(interrupted / "checkpoint.pt", weights_only=True)["step"]
    assert 0 < killed_at < steps

    resumed = subprocess.run([sys.executable, "-m", "hipseg", "train", "--out", str(interrupted),
                              "--resume", "--quiet"], env=_env(), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert reference.wait() == 0, reference.stderr.read().decode()

    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    b = torch.load(interrupted / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == steps
    assert a["model"].keys() == b["model"].keys()
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name

    def logged(run: Path) -> list[tuple]:
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [(r["kind"], r["step"], r.get("loss"), r.get("mean_dice")) for r in rows]

    assert logged(interrupted) == logged(tmp_path / "straight")


@pytest.mark.parametrize("augment", [False, True])
def test_3d_flip_only_batches_are_crops_or_their_left_right_mirror(synth_store, tmp_path, augment):
    """No intensity change unless asked for, and only the left-right axis is ever flipped."""
    from hipseg.train import _patch_batches

    store = open_store(synth_store)
    images, labels = store.read_all()
    images = images.astype(np.float32)
    config = tiny_config(synth_store, tmp_path / "r", model="unet3d", augment=augment,
                         augment_options={"rotate_degrees": 0.0, "elastic_alpha": 0.0})
    batches, loader = _patch_batches(store, config, store.case_ids, 0)
    flipped = 0
    for batch in itertools.islice(batches, 4):
        for image, label in zip(batch["image"][:, 0].numpy(), batch["label"][:, 0].numpy()):
            match = [i for i in range(len(images)) if np.array_equal(image, images[i])
                     or np.array_equal(image, images[i][::-1])]
            assert match, "a crop was changed beyond a left-right flip"
            i = match[0]
            is_flipped = not np.array_equal(image, images[i])
            np.testing.assert_array_equal(label, labels[i][::-1] if is_flipped else labels[i])
            flipped += is_flipped
    loader.close()
    assert (flipped > 0) == augment


def test_3d_batches_rotate_and_deform_by_default(synth_store, tmp_path):
    from hipseg.train import _patch_batches

    store = open_store(synth_store)
    images = store.read_all()[0].astype(np.float32)
    config = tiny_config(synth_store, tmp_path / "r", model="unet3d")
    batches, loader = _patch_batches(store, config, store.case_ids, 0)
    batch = next(batches)
    loader.close()
    assert batch["image"].shape == (config.batch_size, 1, *store.roi_shape)
    assert set(batch["label"].unique().tolist()) <= {0, 1, 2}
    for image in batch["image"][:, 0].numpy():
        assert not any(np.array_equal(image, c) or np.array_equal(image, c[::-1]) for c in images)
    with pytest.raises(ConfigError, match="augment"):
        tiny_config(synth_store, tmp_path / "r2", augment_options={"scale": 0.1})
    tiny_config(synth_store, tmp_path / "r3", model="unet3d", augment_options={"scale": 0.1})
