"""Training: a store and a TrainConfig in, a run folder with checkpoints, metrics and curves out.

The run folder's layout, its atomic checkpoints and how a trained run is loaded back are
:mod:`hipseg.runs`' concern; this module is the step loop that fills it.

Resuming: batch ``k`` of the sampler stream is a pure function of (seed, k), so a
resumed run asks the loader for batches from the checkpoint's step on and ends
exactly where an uninterrupted run ends (tests/test_train.py shows it with kill -9).

Data-parallel: under ``torchrun --nproc_per_node=N -m hipseg train ...`` each rank
trains a DistributedDataParallel replica on its own shard of the sampler stream
(batch ``k`` of rank ``r`` is a pure function of (seed, r, k)), gradients are averaged,
and rank 0 alone validates and writes the run folder (``run.json`` records
``world_size`` and each rank's final weight digest). Time budgets follow rank 0's clock,
broadcast every step, so all ranks stop at the same step. docs/distributed.md.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from hipseg import distributed
from hipseg.config import DEFAULT_MINUTES, RESUMABLE, SCHEDULES, TrainConfig, read_config_file
from hipseg.errors import ConfigError, HipsegError
from hipseg.inference import volume_probabilities
from hipseg.losses import build_loss
from hipseg.metrics import dice_per_class
from hipseg.models import build_model, spatial_dims
from hipseg.runs import (
    BEST,
    CHECKPOINT,
    CHECKPOINT_FORMAT,
    CONFIG,
    CURVE,
    METRICS,
    SPLIT,
    SUMMARY,
    LoadedRun,
    RunResult,
    append_metrics,
    atomic_save,
    build_config,
    load_checkpoint,
    load_run,
    plot_curve,
    prepare_folder,
    read_metrics,
    run_meta,
    save_weights,
    split_cases,
    write_json,
)
from hipseg.runtime import default_workers, resolve_device
from hipseg.store import HippocampusStore, open_store

# Re-exported: the public training API has lived in this module since 0.1.
__all__ = ["BEST", "CHECKPOINT", "CHECKPOINT_FORMAT", "CONFIG", "CURVE", "DEFAULT_MINUTES", "METRICS",
           "RESUMABLE", "SCHEDULES", "SPLIT", "SUMMARY", "LoadedRun", "RunResult", "TrainConfig",
           "atomic_save", "build_config", "default_workers", "dice_per_class", "load_checkpoint",
           "load_run", "lr_factor", "read_config_file", "resolve_device", "run_meta", "save_weights",
           "split_cases", "train", "validate"]


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


# ---------------------------------------------------------------- data streams

def _slice_batches(store: HippocampusStore, config: TrainConfig, cases: list[str], start: int,
                   pin_memory: bool = False, rank: int = 0,
                   world_size: int = 1) -> tuple[Iterator[dict], Any]:
    from hipseg.augment import AugmentConfig
    from hipseg.loader import SliceLoader
    from hipseg.sampler import SamplerConfig

    augment = AugmentConfig(**config.augment_options) if config.augment else False
    sampler = SamplerConfig(foreground_fraction=config.foreground_fraction,
                            edge_fraction=config.edge_fraction)
    loader = SliceLoader(
        store, batch_size=config.batch_size, axis=config.axis, context=config.context,
        augment=augment, cases=cases, seed=config.seed,
        num_workers=default_workers() if config.num_workers is None else config.num_workers,
        mode="infinite", start_batch=start, sampler_config=sampler, pin_memory=pin_memory,
        rank=rank, world_size=world_size, storage_options=store.storage_options or None,
    )
    return iter(loader), loader


def _patch_batches(store: HippocampusStore, config: TrainConfig, cases: list[str], start: int,
                   pin_memory: bool = False, rank: int = 0,
                   world_size: int = 1) -> tuple[Iterator[dict], Any]:
    """Whole ROI crops for the 3D model from ``PatchLoader``; batch k a pure function of (seed, rank, k).

    Augmentation follows ``config.augment_options`` (a PatchAugmentConfig): left-right
    flip, rotation about the three axes and the elastic field by default, scaling and
    intensity changes only when asked for; built in loader workers as for slices.
    """
    from hipseg.augment3d import PatchAugmentConfig
    from hipseg.loader import PatchLoader

    augment = PatchAugmentConfig(**config.augment_options) if config.augment else False
    loader = PatchLoader(
        store, batch_size=config.batch_size, augment=augment, cases=cases, seed=config.seed,
        num_workers=default_workers() if config.num_workers is None else config.num_workers,
        mode="infinite", start_batch=start, pin_memory=pin_memory, rank=rank,
        world_size=world_size, storage_options=store.storage_options or None,
    )
    return iter(loader), loader


# ---------------------------------------------------------------- validation and logging

def validate(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray, config: TrainConfig,
             window: tuple[int, ...], n_classes: int, device: torch.device) -> np.ndarray:
    """Mean 3D Dice per foreground class over the validation crops (no augmentation)."""
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



# ---------------------------------------------------------------- the loop

class _Session:
    """The mutable parts of one training process: model, optimizer, counters, and their saving."""

    def __init__(self, config: TrainConfig, meta: dict[str, Any], device: torch.device,
                 context: distributed.Context | None = None) -> None:
        self.config, self.meta, self.device = config, meta, device
        self.context = context or distributed.Context(device=device)
        self.run_dir = Path(config.out)
        model = build_model(config.model, meta["in_channels"], len(meta["class_names"]),
                            **config.model_options)
        channels_last = config.channels_last and meta["spatial_dims"] == 2
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = model.to(device).to(memory_format=self.memory_format)
        replica: torch.nn.Module = self.model
        if self.context.active:
            # DDP broadcasts rank 0's initial weights and averages gradients in backward.
            from torch.nn.parallel import DistributedDataParallel

            replica = DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None)
        self.forward = torch.compile(replica) if config.compile else replica
        # EMA of the weights (and GroupNorm has no running buffers to average): torch's own
        # AveragedModel with get_ema_multi_avg_fn, updated after every optimizer step.
        self.ema = None
        if config.ema_decay > 0:
            from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

            self.ema = AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(config.ema_decay),
                                     use_buffers=True)
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

    def restore(self, saved: dict[str, Any] | None) -> None:
        """Continue from rank 0's checkpoint ``saved``, sent to the others (no shared filesystem)."""
        saved = distributed.broadcast_object(self.context, saved)
        self.model.load_state_dict(saved["model"])
        if self.ema is not None:
            self.ema.module.load_state_dict(saved["ema_model"])
            self.ema.n_averaged.fill_(int(saved["ema_n_averaged"]))
        self.optimizer.load_state_dict(saved["optimizer"])
        if saved.get("scaler"):
            self.scaler.load_state_dict(saved["scaler"])
        torch.set_rng_state(saved["torch_rng"])
        self.state.update(saved["state"])
        if self.context.is_main:
            # Lines logged after the checkpoint belong to steps that will be run again.
            kept = read_metrics(self.run_dir / METRICS, self.state["step"])
            (self.run_dir / METRICS).write_text("".join(json.dumps(r) + "\n" for r in kept))

    def checkpoint(self) -> None:
        atomic_save({
            "format": CHECKPOINT_FORMAT, "kind": "full", "step": self.state["step"],
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "torch_rng": torch.get_rng_state(), "config": self.config.to_dict(), "meta": self.meta,
            "state": {**self.state, "world_size": self.context.world_size},
            **({} if self.ema is None else {"ema_model": self.ema.module.state_dict(),
                                            "ema_n_averaged": int(self.ema.n_averaged)}),
        }, self.run_dir / CHECKPOINT)

    @property
    def inference_model(self) -> torch.nn.Module:
        """The weights validated and saved as the run's model: the EMA when on."""
        return self.model if self.ema is None else self.ema.module

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
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        self.state["step"] += 1
        self.state["loss_sum"] += float(loss.detach())
        self.state["loss_count"] += 1

    def pop_mean_loss(self) -> float:
        mean = self.state["loss_sum"] / max(self.state["loss_count"], 1)
        self.state["loss_sum"], self.state["loss_count"] = 0.0, 0
        return mean


def train(config: TrainConfig, *, resume: bool = False, progress: bool = True,
          storage_options: dict[str, Any] | None = None) -> RunResult:
    """Train ``config.model`` on ``config.store``; write the run folder ``config.out``.

    Parameters
    ----------
    config
        What to train and for how long.
    resume
        Continue the run in ``config.out`` from its last checkpoint; the settings must equal the
        saved ones except those in :data:`RESUMABLE`, and the world size must be the same.
    progress
        Show a tqdm progress bar (steps/s and samples/s; rank 0 only).
    storage_options
        Filesystem arguments when ``config.store`` is a URL (not saved in the run folder).

    Under torchrun (``WORLD_SIZE`` > 1) this trains data-parallel; see the module docstring.
    """
    store = open_store(config.store, storage_options)
    device = resolve_device(config.device)
    context = distributed.setup(device)
    try:
        return _train(config, store, context, resume, progress)
    finally:
        distributed.teardown(context)


def _check_world_size(saved: dict[str, Any], run_dir: Path, world_size: int) -> None:
    trained_with = int(saved["state"].get("world_size", 1))
    if trained_with != world_size:
        raise ConfigError(
            f"{run_dir}: trained with world_size {trained_with}, resumed with {world_size}; batch k "
            f"of rank r depends on both, so resume with the same number of processes "
            f"(torchrun --nproc_per_node x nodes = {trained_with})")


def _prepare_on_rank_0(config: TrainConfig, store: HippocampusStore, resume: bool,
                       context: distributed.Context) -> tuple[dict[str, Any], dict | None]:
    """Rank 0 checks or creates the run folder; the others get its split (or its error).

    Returns (the split of :func:`hipseg.runs.plan_split`, the checkpoint to resume from on
    rank 0 / None).
    """
    outcome: Any = None
    saved = None
    if context.is_main:
        try:
            if resume and (Path(config.out) / CHECKPOINT).exists():
                saved = load_checkpoint(Path(config.out) / CHECKPOINT)
                _check_world_size(saved, Path(config.out), context.world_size)
            outcome = prepare_folder(config, store, resume)
        except HipsegError as error:
            outcome = error
    outcome = distributed.broadcast_object(context, outcome)
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome, saved


def _train(config: TrainConfig, store: HippocampusStore, context: distributed.Context, resume: bool,
           progress: bool) -> RunResult:
    main = context.is_main
    device = context.device
    split, saved = _prepare_on_rank_0(config, store, resume, context)
    train_cases, val_cases, monitor_cases = split["train"], split["val"], split["monitor"]
    run_dir = Path(config.out)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(config.deterministic or was_deterministic)
    torch.manual_seed(config.seed)
    meta = run_meta(store, config, val_cases)
    class_names = meta["class_names"]
    session = _Session(config, meta, device, context)
    if resume:
        session.restore(saved)
    state = session.state

    index = {c: i for i, c in enumerate(store.case_ids)}
    if main:  # validation runs once, on rank 0
        val_images = np.stack([store.read_volume(index[c])[0] for c in monitor_cases])
        val_labels = np.stack([store.read_volume(index[c])[1] for c in monitor_cases])
    make_batches = _patch_batches if meta["spatial_dims"] == 3 else _slice_batches
    batches, loader = make_batches(store, config, train_cases, state["step"],
                                   pin_memory=device.type == "cuda", rank=context.rank,
                                   world_size=context.world_size)

    budget_s = None if config.max_minutes is None else 60.0 * config.max_minutes
    started, first_step, elapsed_before = time.perf_counter(), state["step"], state["elapsed_s"]
    interval_start, interval_step = started, first_step
    global_batch = config.batch_size * context.world_size
    bar = tqdm(total=config.steps, initial=first_step, unit="step", disable=not (progress and main),
               desc=f"training {config.model}", dynamic_ncols=True)
    postfix: dict[str, str] = {}
    session.model.train()

    def clock() -> float:
        # Every rank follows rank 0's clock, so time-budgeted ranks agree on lr and on when to stop.
        return distributed.broadcast_float(context, elapsed_before + time.perf_counter() - started)

    try:
        while True:
            elapsed = clock()
            done = max(state["step"] / config.steps if config.steps else 0.0,
                       elapsed / budget_s if budget_s else 0.0)
            if done >= 1.0:
                break
            lr = config.lr * lr_factor(done, config.schedule, config.warmup)
            session.step(next(batches), lr)
            step = state["step"]
            bar.update(1)
            state["elapsed_s"] = elapsed = clock()
            finished = (config.steps is not None and step >= config.steps) or (
                budget_s is not None and elapsed >= budget_s)

            if step % config.log_every == 0 or finished:
                now = time.perf_counter()
                rate = (step - interval_step) / max(now - interval_start, 1e-9)
                interval_start, interval_step = now, step
                loss = distributed.mean_over_ranks(context, session.pop_mean_loss())
                if main:
                    append_metrics(run_dir / METRICS, {
                        "kind": "train", "step": step, "elapsed_s": round(elapsed, 3), "lr": lr,
                        "loss": loss, "steps_per_s": rate, "samples_per_s": rate * global_batch})
                postfix.update(loss=f"{loss:.3f}", samples_s=f"{rate * global_batch:.0f}")
                bar.set_postfix(postfix)
            if main and (step % config.val_every == 0 or finished):
                scores = validate(session.inference_model, val_images, val_labels, config,
                                  tuple(meta["window"]), len(class_names), device)
                dice = {name: float(s) for name, s in zip(class_names[1:], scores, strict=True)}
                mean = float(np.mean(scores))
                state["final_dice"] = dice
                append_metrics(run_dir / METRICS, {"kind": "val", "step": step, "dice": dice,
                                            "elapsed_s": round(elapsed, 3), "mean_dice": mean,
                                            "held_out": bool(val_cases)})
                # Without held-out cases validation only monitors: the last one stands.
                if not val_cases or mean > state["best_mean_dice"]:
                    state.update(best_mean_dice=mean, best_step=step, best_dice=dice)
                    if val_cases:
                        save_weights(run_dir / BEST, session.inference_model, config, meta,
                                     step, dice)
                postfix["val_dice"] = f"{mean:.3f}"
                bar.set_postfix(postfix)
            if main and (step % config.checkpoint_every == 0 or finished):
                session.checkpoint()
            if finished:
                break
    finally:
        bar.close()
        if loader is not None:
            loader.close()
        torch.use_deterministic_algorithms(was_deterministic)

    rate = (state["step"] - first_step) / max(time.perf_counter() - started, 1e-9)
    digests = distributed.gather_objects(context, distributed.weights_digest(session.model))
    result = RunResult(
        run_dir=str(run_dir), steps=state["step"], elapsed_s=float(state["elapsed_s"]),
        steps_per_s=rate, samples_per_s=rate * global_batch,
        best_step=int(state["best_step"]), best_dice=dict(state["best_dice"]),
        best_mean_dice=float(state["best_mean_dice"]), final_dice=dict(state["final_dice"]),
        checkpoint=str(run_dir / CHECKPOINT),
        best=str(run_dir / (BEST if val_cases else CHECKPOINT)), selection=split["selection"],
        world_size=context.world_size, weights_sha256=list(digests),
    )
    if main:
        plot_curve(read_metrics(run_dir / METRICS), run_dir / CURVE, class_names)
        write_json(run_dir / SUMMARY, result.to_dict())
    distributed.barrier(context)  # the others leave once run.json is written
    return result
