"""Training configuration: :class:`TrainConfig`, validated when built, and its JSON/TOML files."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hipseg.errors import ConfigError
from hipseg.losses import LOSSES
from hipseg.models import MODELS, resolve_options, spatial_dims
from hipseg.store import AXIS_NAMES

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

    Levers measured by ``hipseg crossval`` (docs/training.md, "Cross-validated accuracy and the levers"):
    ``val_fraction = 0`` (train on every case, keep the final weights), explicit
    ``train_cases`` / ``val_cases``, ``ema_decay`` (EMA of the weights), ``edge_fraction``
    (share of edge slices among the foreground draws); the measured effect of each is in
    that section of docs/training.md, and none of them changed a default.
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
    # 0: train on every case; validation (on a few training cases) is then only for monitoring
    # and the final weights, not the best-on-validation ones, are what load_run picks.
    val_fraction: float = 0.2
    # Explicit case ids instead of val_fraction's seeded split (e.g. one cross-validation fold).
    train_cases: tuple[str, ...] | None = None
    val_cases: tuple[str, ...] | None = None
    val_every: int = 500
    checkpoint_every: int = 500
    log_every: int = 50
    augment: bool = True
    # AugmentConfig fields; empty = its defaults (left-right flips, ±10° rotation, elastic).
    augment_options: dict[str, Any] = field(default_factory=dict)
    foreground_fraction: float = 1.0 / 3.0
    # Share of the foreground draws taken from edge slices (hipseg.sampler.SamplerConfig).
    edge_fraction: float = 0.3
    # Exponential moving average of the weights (0: off); used for validation and inference.
    ema_decay: float = 0.0
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
        if not 0.0 <= self.val_fraction < 1.0:
            bad(f"val_fraction must be within [0, 1), got {self.val_fraction}")
        for name in ("train_cases", "val_cases"):
            value = getattr(self, name)
            if value is not None:  # frozen: a tuple, so the config stays hashable and comparable
                object.__setattr__(self, name, tuple(str(c) for c in value))
        if (self.train_cases is None) != (self.val_cases is None):
            bad("give both train_cases and val_cases (val_cases may be empty), or neither")
        if self.train_cases is not None:
            if not self.train_cases:
                bad("train_cases is empty")
            both = sorted(set(self.train_cases) & set(self.val_cases or ()))
            if both:
                bad(f"case(s) {both[:5]} are in both train_cases and val_cases")
        if not 0.0 <= self.ema_decay < 1.0:
            bad(f"ema_decay must be within [0, 1) (0: off), got {self.ema_decay}")
        if not 0.0 <= self.edge_fraction <= 1.0:
            bad(f"edge_fraction must be within 0..1, got {self.edge_fraction}")
        if self.lr <= 0 or self.weight_decay < 0 or not 0.0 <= self.warmup < 1.0:
            bad(f"need lr > 0, weight_decay >= 0 and 0 <= warmup < 1; got {self.lr}, "
                f"{self.weight_decay}, {self.warmup}")
        if self.augment_options:
            from hipseg.augment import AugmentConfig
            from hipseg.augment3d import PatchAugmentConfig

            # 3D patches take the slice options plus isotropic scaling.
            kind = PatchAugmentConfig if spatial_dims(self.model) == 3 else AugmentConfig
            known = {f.name for f in dataclasses.fields(kind)}
            if set(self.augment_options) - known:
                bad(f"unknown augment option(s) {sorted(set(self.augment_options) - known)}; "
                    f"known: {sorted(known)}")
            kind(**self.augment_options)
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
        for name in ("train_cases", "val_cases"):
            if data[name] is not None:
                data[name] = list(data[name])
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

