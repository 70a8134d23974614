"""The run folder: its layout, atomic checkpoints, the case split, metrics and curves, loading a trained run.

A run folder holds::

    config.json       the TrainConfig (plain JSON; ``--resume`` reads it back)
    split.json        validation and training case ids (by case, so no slice leaks)
    metrics.jsonl     one JSON object per log line: training loss, lr, speed, validation Dice
    curve.png         loss and validation Dice against steps
    checkpoint.pt     everything needed to continue (weights, optimizer, step, RNG, timers)
    best.pt           the weights with the best validation Dice so far
    run.json          the summary written at the end (a RunResult)

Every ``.pt`` file holds only tensors and plain Python values, so
``torch.load(path, weights_only=True)`` reads it without running any code, and is
written to a temporary file first and renamed into place, so a run killed at any
moment leaves either the old or the new checkpoint, never half of one.

Resuming: batch ``k`` of the sampler stream is a pure function of (seed, k), so a
resumed run asks the loader for batches from the checkpoint's step on and ends
exactly where an uninterrupted run ends (tests/test_train.py shows it with kill -9).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hipseg.config import RESUMABLE, TrainConfig, read_config_file
from hipseg.errors import ConfigError, StoreError
from hipseg.models import build_model, spatial_dims
from hipseg.runtime import resolve_device
from hipseg.safety import check_not_input, owned_by_hipseg
from hipseg.store import HippocampusStore, axis_index

CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"
CONFIG = "config.json"
SPLIT = "split.json"
METRICS = "metrics.jsonl"
CURVE = "curve.png"
SUMMARY = "run.json"
CHECKPOINT_FORMAT = 1


def explicit_settings(config_file: str | Path | None, overrides: dict[str, Any]) -> dict[str, Any]:
    """The settings a user gave: a JSON/TOML ``config_file``, then ``overrides`` (flags; None
    values are ignored, and a flag changes one ``model_options``/``augment_options`` key, not
    the whole table). ``steps`` without ``max_minutes`` drops the default time budget."""
    explicit = dict(read_config_file(config_file)) if config_file else {}
    for key, value in overrides.items():
        if value is None:
            continue
        if key in ("model_options", "augment_options") and isinstance(explicit.get(key), dict):
            value = {**explicit[key], **value}
        explicit[key] = value
    if "steps" in explicit and "max_minutes" not in explicit:
        explicit["max_minutes"] = None
    return explicit


def build_config(store: str | Path | None, out: str | Path, *,
                 config_file: str | Path | None = None, resume: bool = False,
                 **overrides: Any) -> TrainConfig:
    """A TrainConfig from, lowest priority first: the defaults, the run's saved config when
    resuming, a JSON/TOML ``config_file``, then ``overrides`` (None values are ignored).

    ``steps`` given without ``max_minutes`` means "exactly that many steps": the default
    time budget is then dropped rather than silently capping the run.
    """
    settings: dict[str, Any] = {}
    if resume:
        saved = Path(out) / CONFIG
        if not saved.exists():
            raise ConfigError(f"{saved}: nothing to resume here; drop --resume to start a new run")
        settings.update(json.loads(saved.read_text()))
    settings.update(explicit_settings(config_file, overrides))
    if store is not None:
        settings["store"] = str(store)
    settings["out"] = str(out)
    if "store" not in settings:
        raise ConfigError("no store given: pass STORE (or --resume an existing run)")
    return TrainConfig.from_dict(settings)


@dataclass(frozen=True)
class RunResult:
    """What :func:`train` returns (and writes to run.json)."""

    run_dir: str
    steps: int
    elapsed_s: float
    steps_per_s: float
    samples_per_s: float
    best_step: int
    best_dice: dict[str, float]
    best_mean_dice: float
    final_dice: dict[str, float]
    checkpoint: str
    best: str  # the run's model: best.pt, or checkpoint.pt when no case was held out
    world_size: int = 1  # processes that trained it (torchrun); samples_per_s counts all of them
    weights_sha256: list[str] = dataclasses.field(default_factory=list)  # final weights, per rank
    selection: str = "best"  # "best" on held-out validation, or "final"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunResult:
        return cls(**data)


# ---------------------------------------------------------------- small pure pieces

MONITOR_CASES = 8  # training cases validated for the curve when none is held out


def split_cases(case_ids: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(train, val) case ids: a seeded shuffle of the sorted ids, at least one case on each side
    (none on the validation side when ``val_fraction`` is 0)."""
    ids = sorted(case_ids)
    if val_fraction == 0:
        return ids, []
    if len(ids) < 2:
        raise ConfigError(f"need at least 2 cases to hold some out for validation, "
                          f"the store has {len(ids)}")
    order = np.random.default_rng([seed, 0x5EED]).permutation(len(ids))
    n_val = min(len(ids) - 1, max(1, round(len(ids) * val_fraction)))
    val = sorted(ids[i] for i in order[:n_val])
    return sorted(set(ids) - set(val)), val



def plan_split(config: TrainConfig, case_ids: list[str]) -> dict[str, Any]:
    """What split.json records: training, validation and monitoring case ids, and which weights
    are the run's model (``best`` on held-out validation, or ``final`` when none is held out).

    ``config.train_cases`` / ``val_cases`` when given (checked against the store), else the
    seeded split of :func:`split_cases` by ``val_fraction``.
    """
    if config.train_cases is not None:
        unknown = sorted((set(config.train_cases) | set(config.val_cases or ())) - set(case_ids))
        if unknown:
            raise ConfigError(f"case(s) {unknown[:5]} (of {len(unknown)}) given as training or "
                              f"validation cases are not in the store {config.store}")
        train, val = sorted(config.train_cases), sorted(config.val_cases or ())
    else:
        train, val = split_cases(case_ids, config.val_fraction, config.seed)
    # Without held-out cases the curve is drawn on a few training cases: a monitor, not a test.
    monitor = val if val else train[:MONITOR_CASES]
    return {"train": train, "val": val, "monitor": monitor,
            "selection": "best" if val else "final"}


def atomic_save(obj: dict[str, Any], path: Path) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over ``path``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as handle:
        torch.save(obj, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as JSON atomically: a temporary file (per process), then a rename."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a hipseg checkpoint safely (``weights_only=True``); StoreError if it is not one."""
    path = Path(path)
    if not path.exists():
        raise StoreError(f"{path}: no such checkpoint (train first, or point at a run folder)")
    data = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(data, dict) or data.get("format") != CHECKPOINT_FORMAT:
        raise StoreError(f"{path}: not a hipseg checkpoint of format {CHECKPOINT_FORMAT}")
    return data


def run_meta(store: HippocampusStore, config: TrainConfig, val_cases: list[str]) -> dict[str, Any]:
    """What inference needs to know about the training data, saved in every checkpoint."""
    dims = spatial_dims(config.model)
    window = store.roi_shape if dims == 3 else store.slice_shape(config.axis)
    return {"class_names": list(store.class_names), "roi_shape": list(store.roi_shape),
            "window": list(window), "in_channels": 1 if dims == 3 else 2 * config.context + 1,
            "spatial_dims": dims, "store": str(store.path), "val_cases": list(val_cases),
            "normalisation": dict(store.info.normalisation),
            "crop_extent": store.crop_extent}  # the training crops' field of view (hipseg.localise)


def save_weights(path: Path, model: torch.nn.Module, config: TrainConfig, meta: dict[str, Any],
                 step: int, val_dice: dict[str, float] | None = None) -> None:
    """A weights-only checkpoint (best.pt): enough for :func:`load_run`, not for resuming."""
    atomic_save({"format": CHECKPOINT_FORMAT, "kind": "weights", "step": int(step),
                 "model": model.state_dict(), "config": config.to_dict(), "meta": meta,
                 "val_dice": dict(val_dice or {})}, Path(path))


# ---------------------------------------------------------------- loading a trained run

@dataclass
class LoadedRun:
    """A trained model ready for inference, with what inference needs to know about its data."""

    model: torch.nn.Module
    config: TrainConfig
    meta: dict[str, Any]
    device: torch.device

    @property
    def spatial_dims(self) -> int:
        return int(self.meta["spatial_dims"])

    @property
    def class_names(self) -> list[str]:
        return list(self.meta["class_names"])

    @property
    def roi_shape(self) -> tuple[int, int, int]:
        return tuple(self.meta["roi_shape"])  # type: ignore[return-value]

    @property
    def window(self) -> tuple[int, ...]:
        """Spatial input size the model was trained on: the slice shape (2D) or the ROI (3D)."""
        if self.spatial_dims == 3:
            return self.roi_shape
        shape = list(self.roi_shape)
        del shape[axis_index(self.config.axis)]
        return tuple(shape)


def load_run(run_dir: str | Path, which: str = "best", device: str = "cpu") -> LoadedRun:
    """The model of a run folder: ``best`` (best validation Dice; the default) or ``last``.

    A run that held out no validation case (``val_fraction = 0``) writes no best.pt, so
    ``best`` gives its final weights. A run trained with ``ema_decay`` gives its averaged
    weights (best.pt holds them already; checkpoint.pt holds both).
    """
    run_dir = Path(run_dir)
    names = {"best": [BEST, CHECKPOINT], "last": [CHECKPOINT]}
    if which not in names:
        raise ConfigError(f"which must be 'best' or 'last', got {which!r}")
    candidates = [run_dir / n for n in names[which] if (run_dir / n).exists()]
    if not candidates:
        raise StoreError(f"{run_dir}: no {BEST} or {CHECKPOINT} here; "
                         "is this a `hipseg train` run folder?")
    data = load_checkpoint(candidates[0])
    config = TrainConfig.from_dict(data["config"])
    meta = data["meta"]
    model = build_model(config.model, int(meta["in_channels"]), len(meta["class_names"]),
                        **config.model_options)
    weights = data.get("ema_model")
    model.load_state_dict(data["model"] if weights is None else weights)
    torch_device = resolve_device(device)
    return LoadedRun(model.to(torch_device).eval(), config, meta, torch_device)


def read_metrics(path: Path, up_to_step: int | None = None) -> list[dict]:
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if up_to_step is None or r["step"] <= up_to_step]


def plot_curve(metrics: list[dict], out: Path, class_names: list[str]) -> None:
    """Training loss and validation Dice against steps, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train_rows = [r for r in metrics if r["kind"] == "train"]
    val_rows = [r for r in metrics if r["kind"] == "val"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    if train_rows:
        left.plot([r["step"] for r in train_rows], [r["loss"] for r in train_rows], lw=1)
    left.set(xlabel="step", ylabel="training loss", title="loss")
    left.grid(alpha=0.3)
    for name in class_names[1:]:
        right.plot([r["step"] for r in val_rows], [r["dice"][name] for r in val_rows],
                   marker=".", label=name)
    right.plot([r["step"] for r in val_rows], [r["mean_dice"] for r in val_rows], "k--",
               label="mean")
    right.set(xlabel="step", ylabel="validation Dice (3D, crops)", title="validation Dice",
              ylim=(0, 1))
    right.grid(alpha=0.3)
    right.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)



def check_resume(config: TrainConfig, saved: TrainConfig, run_dir: Path) -> None:
    changed = sorted(k for k, v in config.to_dict().items()
                     if k not in RESUMABLE and saved.to_dict().get(k) != v)
    if changed:
        raise ConfigError(f"{run_dir}: cannot resume with changed setting(s) {changed}; a "
                          f"resumed run may change only {sorted(RESUMABLE)} (or start a new --out)")


def is_run_folder(path: Path) -> bool:
    """A folder ``hipseg train`` wrote (its config.json or a checkpoint is there)."""
    return (path / CONFIG).is_file() or (path / CHECKPOINT).is_file() or (path / SPLIT).is_file()


def prepare_folder(config: TrainConfig, store: HippocampusStore,
                    resume: bool) -> dict[str, Any]:
    """Check or create the run folder; return its split (see :func:`plan_split`), new or saved."""
    run_dir = Path(config.out)
    if resume:
        if not (run_dir / CHECKPOINT).exists():
            raise ConfigError(f"{run_dir}: nothing to resume (no {CHECKPOINT}); "
                              "drop --resume to start a new run")
        saved = TrainConfig.from_dict(json.loads((run_dir / CONFIG).read_text()))
        check_resume(config, saved, run_dir)
        split = json.loads((run_dir / SPLIT).read_text())
        split.setdefault("monitor", split["val"])  # split.json of runs made before these keys
        split.setdefault("selection", "best" if split["val"] else "final")
    else:
        if (run_dir / CHECKPOINT).exists():
            raise ConfigError(f"{run_dir}: holds a run already; pass --resume to continue it or "
                              "choose another --out")
        # Never into, around or over the store, nor into a folder of other things.
        check_not_input(run_dir, [config.store], "run folder (--out)")
        owned_by_hipseg(run_dir, is_run_folder, "run folder")
        run_dir.mkdir(parents=True, exist_ok=True)
        split = plan_split(config, list(store.case_ids))
        write_json(run_dir / SPLIT, split)
        (run_dir / METRICS).unlink(missing_ok=True)
    write_json(run_dir / CONFIG, config.to_dict())
    return split


def append_metrics(path: Path, row: dict) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps(row) + "\n")

