"""Training: a store and a TrainConfig in, a run folder with checkpoints, metrics and curves out.

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
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from hipseg.errors import ConfigError, StoreError
from hipseg.losses import LOSSES, build_loss
from hipseg.models import MODELS, build_model, resolve_options, spatial_dims
from hipseg.store import AXIS_NAMES, HippocampusStore, axis_index, open_store

CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"
CONFIG = "config.json"
SPLIT = "split.json"
METRICS = "metrics.jsonl"
CURVE = "curve.png"
SUMMARY = "run.json"
CHECKPOINT_FORMAT = 1
DEFAULT_MINUTES = 10.0
SCHEDULES = ("onecycle", "cosine", "constant")
# Fields a resumed run may change: how long it runs and where, not what it computes.
RESUMABLE = frozenset({"steps", "max_minutes", "device", "num_workers", "threads", "val_every",
                       "checkpoint_every", "log_every"})


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run; validated when built.

    The defaults are the measured choice for 2 CPU cores and a 10-minute budget
    (docs/training.md): the compact 2D U-Net on axial slices with one neighbouring
    slice on each side as extra channels (2.5D), left-right flips, batch 32, AdamW
    with a one-cycle schedule (short warm-up, cosine decay), Dice + cross-entropy.
    """

    store: str
    out: str
    model: str = "unet"
    model_options: dict[str, Any] = field(default_factory=dict)
    axis: str = "axial"
    # Neighbouring slices on each side as extra channels; None: 1 (2.5D) for 2D models, 0 for 3D.
    context: int | None = None
    loss: str = "dice_ce"
    batch_size: int = 32
    steps: int | None = None
    max_minutes: float | None = None  # with neither given: DEFAULT_MINUTES
    lr: float = 3e-3
    weight_decay: float = 1e-4
    schedule: str = "onecycle"
    warmup: float = 0.03
    val_fraction: float = 0.2
    val_every: int = 500
    checkpoint_every: int = 500
    log_every: int = 50
    augment: bool = True
    # AugmentConfig fields; empty = its defaults (left-right flips, ±10° rotation, elastic).
    augment_options: dict[str, Any] = field(default_factory=dict)
    foreground_fraction: float = 1.0 / 3.0
    num_workers: int | None = None  # None: default_workers() for this machine
    threads: int | None = None  # torch CPU threads; None keeps torch's default (one per core)
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    channels_last: bool = False
    compile: bool = False
    deterministic: bool = False

    def __post_init__(self) -> None:
        def bad(message: str) -> None:
            raise ConfigError(f"training config: {message}")

        if self.model not in MODELS:
            bad(f"unknown model {self.model!r}; choose from {', '.join(MODELS)}")
        resolve_options(self.model, self.model_options)
        if self.loss not in LOSSES:
            bad(f"unknown loss {self.loss!r}; choose from {', '.join(LOSSES)}")
        if self.axis not in AXIS_NAMES:
            bad(f"unknown axis {self.axis!r}; choose from {', '.join(AXIS_NAMES)}")
        if self.context is None:  # frozen: resolve the default once, at construction
            object.__setattr__(self, "context", 0 if spatial_dims(self.model) == 3 else 1)
        if self.context < 0 or (self.context and spatial_dims(self.model) == 3):
            bad(f"context must be >= 0, and 0 for the 3D model; got {self.context}")
        if self.schedule not in SCHEDULES:
            bad(f"unknown schedule {self.schedule!r}; choose from {', '.join(SCHEDULES)}")
        if self.steps is None and self.max_minutes is None:
            object.__setattr__(self, "max_minutes", DEFAULT_MINUTES)
        if self.steps is not None and self.steps < 1:
            bad(f"steps must be >= 1, got {self.steps}")
        if self.max_minutes is not None and self.max_minutes <= 0:
            bad(f"max_minutes must be > 0, got {self.max_minutes}")
        for name in ("batch_size", "val_every", "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                bad(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 < self.val_fraction < 1.0:
            bad(f"val_fraction must be between 0 and 1, got {self.val_fraction}")
        if self.lr <= 0 or self.weight_decay < 0 or not 0.0 <= self.warmup < 1.0:
            bad(f"need lr > 0, weight_decay >= 0 and 0 <= warmup < 1; got {self.lr}, "
                f"{self.weight_decay}, {self.warmup}")
        if self.augment_options:
            from hipseg.augment import AugmentConfig

            known = {f.name for f in dataclasses.fields(AugmentConfig)}
            if set(self.augment_options) - known:
                bad(f"unknown augment option(s) {sorted(set(self.augment_options) - known)}; "
                    f"known: {sorted(known)}")
            AugmentConfig(**self.augment_options)
        if not 0.0 <= self.foreground_fraction <= 1.0:
            bad(f"foreground_fraction must be within 0..1, got {self.foreground_fraction}")
        if (self.num_workers is not None and self.num_workers < 0) or (
                self.threads is not None and self.threads < 1):
            bad(f"need num_workers >= 0 and threads >= 1, got {self.num_workers} and "
                f"{self.threads}")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["model_options"] = {k: list(v) if isinstance(v, tuple) else v
                                 for k, v in self.model_options.items()}
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"training config: unknown setting(s) {unknown}; "
                              f"known: {sorted(known)}")
        return cls(**data)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Settings from a JSON or TOML file (by suffix); keys are TrainConfig field names."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise ConfigError(f"{path}: cannot read the config file ({error})") from error
    if path.suffix == ".toml":
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            raise ConfigError(f"{path}: reading TOML needs Python 3.11 or later; "
                              "write the settings as JSON instead") from None
        parse, errors, kind = tomllib.loads, (tomllib.TOMLDecodeError,), "TOML"
    else:
        parse, errors, kind = json.loads, (json.JSONDecodeError,), "JSON"
    try:
        data = parse(text)
    except errors as error:
        raise ConfigError(f"{path}: not valid {kind} ({error}); "
                          "fix it, or use a .json or .toml file") from error
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a table of settings at the top level")
    return data.get("train", data)  # a [train] table, or the settings at the top level


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
    explicit = dict(read_config_file(config_file)) if config_file else {}
    for key, value in overrides.items():
        if value is None:
            continue
        if key in ("model_options", "augment_options") and isinstance(explicit.get(key), dict):
            value = {**explicit[key], **value}  # a flag changes one option, not the whole table
        explicit[key] = value
    if "steps" in explicit and "max_minutes" not in explicit:
        explicit["max_minutes"] = None
    settings.update(explicit)
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
    best: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunResult:
        return cls(**data)


# ---------------------------------------------------------------- small pure pieces

def split_cases(case_ids: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(train, val) case ids: a seeded shuffle of the sorted ids, at least one case on each side."""
    ids = sorted(case_ids)
    if len(ids) < 2:
        raise ConfigError(f"need at least 2 cases to hold some out for validation, "
                          f"the store has {len(ids)}")
    order = np.random.default_rng([seed, 0x5EED]).permutation(len(ids))
    n_val = min(len(ids) - 1, max(1, round(len(ids) * val_fraction)))
    val = sorted(ids[i] for i in order[:n_val])
    return sorted(set(ids) - set(val)), val


def lr_factor(progress: float, schedule: str, warmup: float) -> float:
    """Learning-rate multiplier at ``progress`` in [0, 1] of the run.

    ``onecycle``: linear warm-up over the first ``warmup`` fraction, then cosine decay to
    zero; ``cosine``: the decay without warm-up; ``constant``: 1. A function of progress
    rather than of steps, so a time-limited run (``max_minutes``) anneals too.
    """
    p = min(max(progress, 0.0), 1.0)
    if schedule == "constant":
        return 1.0
    if schedule == "onecycle" and p < warmup:
        return 0.05 + 0.95 * p / warmup
    start = warmup if schedule == "onecycle" else 0.0
    return 0.5 * (1.0 + math.cos(math.pi * (p - start) / max(1e-12, 1.0 - start)))


def dice_per_class(prediction: np.ndarray, label: np.ndarray, n_classes: int) -> np.ndarray:
    """Dice of each foreground class (1..K-1); 1.0 where both are empty."""
    scores = np.empty(n_classes - 1)
    for c in range(1, n_classes):
        p, t = prediction == c, label == c
        total = int(p.sum()) + int(t.sum())
        scores[c - 1] = 1.0 if total == 0 else 2.0 * int(np.logical_and(p, t).sum()) / total
    return scores


def default_workers() -> int:
    """Loader worker processes when none are asked for: none on a machine of 2 cores or fewer.

    There torch's two compute threads already fill the cores, and a worker process
    competing with them slowed training more than building each batch in-process costs
    (docs/training.md has the paired measurements); with more cores, two workers keep
    batch building off the training path.
    """
    return 0 if (os.cpu_count() or 1) <= 2 else 2


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ConfigError(f"unknown device {name!r} ({error}); "
                          "use cpu, cuda, cuda:N or auto") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for but CUDA is not available; use --device cpu")
    return device


def atomic_save(obj: dict[str, Any], path: Path) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over ``path``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as handle:
        torch.save(obj, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
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
            "normalisation": dict(store.info.normalisation)}


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
    """The model of a run folder: ``best`` (best validation Dice; the default) or ``last``."""
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
    model.load_state_dict(data["model"])
    torch_device = resolve_device(device)
    return LoadedRun(model.to(torch_device).eval(), config, meta, torch_device)


# ---------------------------------------------------------------- data streams

def _slice_batches(store: HippocampusStore, config: TrainConfig, cases: list[str], start: int,
                   pin_memory: bool = False) -> tuple[Iterator[dict], Any]:
    from hipseg.augment import AugmentConfig
    from hipseg.loader import SliceLoader

    augment = AugmentConfig(**config.augment_options) if config.augment else False
    loader = SliceLoader(
        store, batch_size=config.batch_size, axis=config.axis, context=config.context,
        augment=augment, cases=cases, seed=config.seed,
        num_workers=default_workers() if config.num_workers is None else config.num_workers,
        mode="infinite", start_batch=start, foreground_fraction=config.foreground_fraction,
        pin_memory=pin_memory,
    )
    return iter(loader), loader


def _volume_batches(images: np.ndarray, labels: np.ndarray, config: TrainConfig,
                    start: int) -> Iterator[dict]:
    """Batches of whole ROI crops for the 3D model; batch k is a pure function of (seed, k).

    Augmentation follows ``config.augment_options`` (an AugmentConfig) where it applies
    to whole crops: the left-right flip (array axis 0 of a RAS crop; anterior/posterior
    are never flipped) and, only when asked for, intensity scale and shift. Rotation and
    elastic deformation are 2D kernels and are not applied to the 3D model's crops.
    """
    from hipseg.augment import AugmentConfig

    augment = AugmentConfig(**config.augment_options) if config.augment else AugmentConfig.none()
    step = start
    while True:
        rng = np.random.default_rng([config.seed, 3, step])
        pick = rng.integers(0, images.shape[0], config.batch_size)
        image = images[pick].astype(np.float32)
        label = labels[pick].astype(np.int64)
        flip = rng.random(config.batch_size) < augment.flip
        image[flip] = image[flip][:, ::-1]
        label[flip] = label[flip][:, ::-1]
        shape = (config.batch_size, 1, 1, 1)
        scale = 1.0 + rng.uniform(-augment.intensity_scale, augment.intensity_scale, shape)
        shift = rng.uniform(-augment.intensity_shift, augment.intensity_shift, shape)
        image = image * scale.astype(np.float32) + shift.astype(np.float32)
        yield {"image": torch.from_numpy(np.ascontiguousarray(image[:, None])),
               "label": torch.from_numpy(np.ascontiguousarray(label[:, None]))}
        step += 1


# ---------------------------------------------------------------- validation and logging

def validate(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray, config: TrainConfig,
             window: tuple[int, ...], n_classes: int, device: torch.device) -> np.ndarray:
    """Mean 3D Dice per foreground class over the validation crops (no augmentation)."""
    from hipseg.predict import volume_probabilities

    scores = []
    was_training = model.training
    model.eval()
    try:
        for image, label in zip(images, labels, strict=True):
            probs = volume_probabilities(model, image.astype(np.float32), axis=config.axis,
                                         context=config.context, window=window,
                                         dims=spatial_dims(config.model), device=device)
            scores.append(dice_per_class(probs.argmax(0), label, n_classes))
    finally:
        model.train(was_training)
    return np.mean(scores, axis=0)


def _read_metrics(path: Path, up_to_step: int | None = None) -> list[dict]:
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


# ---------------------------------------------------------------- the loop

def _check_resume(config: TrainConfig, saved: TrainConfig, run_dir: Path) -> None:
    changed = sorted(k for k, v in config.to_dict().items()
                     if k not in RESUMABLE and saved.to_dict().get(k) != v)
    if changed:
        raise ConfigError(f"{run_dir}: cannot resume with changed setting(s) {changed}; a "
                          f"resumed run may change only {sorted(RESUMABLE)} (or start a new --out)")


def _prepare_folder(config: TrainConfig, store: HippocampusStore,
                    resume: bool) -> tuple[list[str], list[str]]:
    """Check or create the run folder; return (train, val) case ids, new or as saved."""
    run_dir = Path(config.out)
    if resume:
        if not (run_dir / CHECKPOINT).exists():
            raise ConfigError(f"{run_dir}: nothing to resume (no {CHECKPOINT}); "
                              "drop --resume to start a new run")
        saved = TrainConfig.from_dict(json.loads((run_dir / CONFIG).read_text()))
        _check_resume(config, saved, run_dir)
        split = json.loads((run_dir / SPLIT).read_text())
        train_cases, val_cases = split["train"], split["val"]
    else:
        if (run_dir / CHECKPOINT).exists():
            raise ConfigError(f"{run_dir}: holds a run already; pass --resume to continue it or "
                              "choose another --out")
        run_dir.mkdir(parents=True, exist_ok=True)
        train_cases, val_cases = split_cases(store.case_ids, config.val_fraction, config.seed)
        _write_json(run_dir / SPLIT, {"train": train_cases, "val": val_cases})
        (run_dir / METRICS).unlink(missing_ok=True)
    _write_json(run_dir / CONFIG, config.to_dict())
    return train_cases, val_cases


def _append(path: Path, row: dict) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps(row) + "\n")


class _Session:
    """The mutable parts of one training process: model, optimizer, counters, and their saving."""

    def __init__(self, config: TrainConfig, meta: dict[str, Any], device: torch.device) -> None:
        self.config, self.meta, self.device = config, meta, device
        self.run_dir = Path(config.out)
        model = build_model(config.model, meta["in_channels"], len(meta["class_names"]),
                            **config.model_options)
        channels_last = config.channels_last and meta["spatial_dims"] == 2
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = model.to(device).to(memory_format=self.memory_format)
        self.forward = torch.compile(self.model) if config.compile else self.model
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.lr,
                                           weight_decay=config.weight_decay)
        self.use_amp = config.amp and device.type == "cuda"
        bf16 = self.use_amp and torch.cuda.is_bf16_supported()
        self.amp_dtype = torch.bfloat16 if bf16 else torch.float16
        # float16 needs loss scaling against underflowing gradients; bfloat16 does not.
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp and not bf16)
        self.loss_fn = build_loss(config.loss)
        self.state: dict[str, Any] = {
            "step": 0, "best_mean_dice": -1.0, "best_step": 0, "best_dice": {}, "final_dice": {},
            "elapsed_s": 0.0, "loss_sum": 0.0, "loss_count": 0}

    def restore(self) -> None:
        saved = load_checkpoint(self.run_dir / CHECKPOINT)
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        if saved.get("scaler"):
            self.scaler.load_state_dict(saved["scaler"])
        torch.set_rng_state(saved["torch_rng"])
        self.state.update(saved["state"])
        # Lines logged after the checkpoint belong to steps that will be run again.
        kept = _read_metrics(self.run_dir / METRICS, self.state["step"])
        (self.run_dir / METRICS).write_text("".join(json.dumps(r) + "\n" for r in kept))

    def checkpoint(self) -> None:
        atomic_save({
            "format": CHECKPOINT_FORMAT, "kind": "full", "step": self.state["step"],
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "torch_rng": torch.get_rng_state(), "config": self.config.to_dict(), "meta": self.meta,
            "state": dict(self.state),
        }, self.run_dir / CHECKPOINT)

    def step(self, batch: dict, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        image = batch["image"].to(self.device, non_blocking=True)
        image = image.to(memory_format=self.memory_format)
        label = batch["label"].to(self.device, non_blocking=True)
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.use_amp):
            loss = self.loss_fn(self.forward(image), label)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.state["step"] += 1
        self.state["loss_sum"] += float(loss.detach())
        self.state["loss_count"] += 1

    def pop_mean_loss(self) -> float:
        mean = self.state["loss_sum"] / max(self.state["loss_count"], 1)
        self.state["loss_sum"], self.state["loss_count"] = 0.0, 0
        return mean


def train(config: TrainConfig, *, resume: bool = False, progress: bool = True) -> RunResult:
    """Train ``config.model`` on ``config.store``; write the run folder ``config.out``.

    Parameters
    ----------
    config
        What to train and for how long.
    resume
        Continue the run in ``config.out`` from its last checkpoint; the settings must equal the
        saved ones except those in :data:`RESUMABLE`.
    progress
        Show a tqdm progress bar (steps/s and samples/s).
    """
    store = open_store(config.store)
    train_cases, val_cases = _prepare_folder(config, store, resume)
    run_dir = Path(config.out)
    device = resolve_device(config.device)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(config.deterministic or was_deterministic)
    torch.manual_seed(config.seed)
    meta = run_meta(store, config, val_cases)
    class_names = meta["class_names"]
    session = _Session(config, meta, device)
    if resume:
        session.restore()
    state = session.state

    index = {c: i for i, c in enumerate(store.case_ids)}
    val_images = np.stack([store.read_volume(index[c])[0] for c in val_cases])
    val_labels = np.stack([store.read_volume(index[c])[1] for c in val_cases])
    loader = None
    if meta["spatial_dims"] == 3:
        picked = [index[c] for c in train_cases]
        batches = _volume_batches(store.images.oindex[picked], store.labels.oindex[picked],
                                  config, state["step"])
    else:
        batches, loader = _slice_batches(store, config, train_cases, state["step"],
                                         pin_memory=device.type == "cuda")

    budget_s = None if config.max_minutes is None else 60.0 * config.max_minutes
    started, first_step, elapsed_before = time.perf_counter(), state["step"], state["elapsed_s"]
    interval_start, interval_step = started, first_step
    bar = tqdm(total=config.steps, initial=first_step, unit="step", disable=not progress,
               desc=f"training {config.model}", dynamic_ncols=True)
    postfix: dict[str, str] = {}
    session.model.train()
    try:
        while True:
            elapsed = elapsed_before + time.perf_counter() - started
            done = max(state["step"] / config.steps if config.steps else 0.0,
                       elapsed / budget_s if budget_s else 0.0)
            if done >= 1.0:
                break
            lr = config.lr * lr_factor(done, config.schedule, config.warmup)
            session.step(next(batches), lr)
            step = state["step"]
            bar.update(1)
            state["elapsed_s"] = elapsed = elapsed_before + time.perf_counter() - started
            finished = (config.steps is not None and step >= config.steps) or (
                budget_s is not None and elapsed >= budget_s)

            if step % config.log_every == 0 or finished:
                now = time.perf_counter()
                rate = (step - interval_step) / max(now - interval_start, 1e-9)
                interval_start, interval_step = now, step
                loss = session.pop_mean_loss()
                _append(run_dir / METRICS, {
                    "kind": "train", "step": step, "elapsed_s": round(elapsed, 3), "lr": lr,
                    "loss": loss, "steps_per_s": rate, "samples_per_s": rate * config.batch_size})
                postfix.update(loss=f"{loss:.3f}", samples_s=f"{rate * config.batch_size:.0f}")
                bar.set_postfix(postfix)
            if step % config.val_every == 0 or finished:
                scores = validate(session.model, val_images, val_labels, config,
                                  tuple(meta["window"]), len(class_names), device)
                dice = {name: float(s) for name, s in zip(class_names[1:], scores, strict=True)}
                mean = float(np.mean(scores))
                state["final_dice"] = dice
                _append(run_dir / METRICS, {"kind": "val", "step": step, "dice": dice,
                                            "elapsed_s": round(elapsed, 3), "mean_dice": mean})
                if mean > state["best_mean_dice"]:
                    state.update(best_mean_dice=mean, best_step=step, best_dice=dice)
                    save_weights(run_dir / BEST, session.model, config, meta, step, dice)
                postfix["val_dice"] = f"{mean:.3f}"
                bar.set_postfix(postfix)
            if step % config.checkpoint_every == 0 or finished:
                session.checkpoint()
            if finished:
                break
    finally:
        bar.close()
        if loader is not None:
            loader.close()
        torch.use_deterministic_algorithms(was_deterministic)

    rate = (state["step"] - first_step) / max(time.perf_counter() - started, 1e-9)
    plot_curve(_read_metrics(run_dir / METRICS), run_dir / CURVE, class_names)
    result = RunResult(
        run_dir=str(run_dir), steps=state["step"], elapsed_s=float(state["elapsed_s"]),
        steps_per_s=rate, samples_per_s=rate * config.batch_size,
        best_step=int(state["best_step"]), best_dice=dict(state["best_dice"]),
        best_mean_dice=float(state["best_mean_dice"]), final_dice=dict(state["final_dice"]),
        checkpoint=str(run_dir / CHECKPOINT), best=str(run_dir / BEST),
    )
    _write_json(run_dir / SUMMARY, result.to_dict())
    return result
