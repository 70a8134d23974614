"""End-to-end training speed: store -> sampler -> augment -> loader -> U-Net step, with peers.

Every pipeline feeds the same model, loss, optimizer and step code (a copy of
hipseg.train's inner loop, with its defaults from TrainConfig) at the same batch
size, slice size and number of loader workers, on the same cases, so the steps/s
differ only by how batches are made:

``hipseg``             hipseg.loader.SliceLoader over the converted store (the real thing)
``prebuilt``           a few batches made beforehand and cycled: the model-only ceiling
``monai-nifti``        the idiomatic MONAI pipeline: NIfTI loaded and preprocessed per sample
``monai-nifti-cache``  the same with MONAI's CacheDataset (loading and preprocessing cached)
``monai-cache``        the loader benchmark's peer: CacheDataset over the store's slices

Steps/s is also given as a ratio to the seed project's 1000 steps/hour on a T4.
On CUDA, mixed precision and channels_last variants run too, and a sweep of
loader workers shows how many keep the GPU busy.
"""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import _common as c

# Side by side, every pipeline feeds single slices (context 0): the MONAI peers are the 2D
# slice pipelines of the original report. "hipseg-2.5d" is hipseg.train's own default
# (TrainConfig.context neighbouring slices on each side as channels), measured beside them.
PIPELINES = (
    "hipseg", "prebuilt", "monai-nifti", "monai-nifti-cache", "monai-cache", "hipseg-2.5d"
)
VARIANTS = ("default", "fp32", "amp", "channels_last", "amp+channels_last")
GPU_WORKERS = (0, 1, 2, 4, 8, 12)
PREBUILT_BATCHES = 8


def train_defaults() -> dict[str, Any]:
    """hipseg.train.TrainConfig's defaults, resolved (batch size, workers, model, loss, lr, ...)."""
    from hipseg.train import TrainConfig

    return TrainConfig(store="-", out="-").to_dict()


def variant_flags(variant: str, device: str) -> tuple[bool, bool]:
    """(amp, channels_last) of a variant; ``default`` is TrainConfig's (amp on CUDA only)."""
    defaults = train_defaults()
    if variant == "default":
        return bool(defaults["amp"]) and device == "cuda", bool(defaults["channels_last"])
    return "amp" in variant, "channels_last" in variant


# ---------------------------------------------------------------- the step (as hipseg.train)


class Stepper:
    """Model, loss, optimizer and one training step exactly as hipseg.train runs them."""

    def __init__(
        self, in_channels: int, n_classes: int, device: str, amp: bool, channels_last: bool
    ) -> None:
        import torch

        from hipseg.losses import build_loss
        from hipseg.models import build_model

        d = train_defaults()
        if d.get("threads") is not None:
            torch.set_num_threads(d["threads"])
        torch.manual_seed(0)
        self.torch = torch
        self.device = torch.device(device)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        model = build_model(d["model"], in_channels, n_classes, **dict(d["model_options"] or {}))
        self.model = model.to(self.device).to(memory_format=self.memory_format).train()
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=d["lr"], weight_decay=d["weight_decay"]
        )
        self.use_amp = amp and self.device.type == "cuda"
        self.amp_dtype = (
            torch.bfloat16 if self.use_amp and torch.cuda.is_bf16_supported() else torch.float16
        )
        self.scaler = torch.amp.GradScaler(
            "cuda", enabled=self.use_amp and self.amp_dtype == torch.float16
        )
        self.loss_fn = build_loss(d["loss"])

    def step(self, batch: dict) -> float:
        torch = self.torch
        image = (
            batch["image"].to(self.device, non_blocking=True).to(memory_format=self.memory_format)
        )
        label = batch["label"].to(self.device, non_blocking=True)
        if label.dtype != torch.int64:  # MONAI pipelines carry labels as float MetaTensors
            label = label.long()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.use_amp):
            loss = self.loss_fn(self.model(image), label)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return float(loss.detach())  # hipseg.train reads the loss every step, so this sync is real

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()


# ---------------------------------------------------------------- batch sources


# The MONAI peers run with two loader workers: their transforms are CPU-heavy Python, and
# fewer workers only slow them down, so this is their best case on 2 cores.
MONAI_WORKERS = 2


def train_workers() -> int:
    """Loader workers hipseg.train uses here (TrainConfig.num_workers, else its machine default)."""
    from hipseg.train import default_workers

    configured = train_defaults()["num_workers"]
    return default_workers() if configured is None else int(configured)


def train_flip() -> float:
    """The flip probability hipseg.train uses, so the MONAI peers flip the same way."""
    from hipseg.augment import AugmentConfig

    d = train_defaults()
    return AugmentConfig(**d.get("augment_options", {})).flip if d["augment"] else 0.0


def hipseg_batches(
    store: Path, batch_size: int, workers: int, device: str, context: int = 0
) -> tuple[Iterator[dict], Callable]:
    """hipseg.loader.SliceLoader with hipseg.train's arguments (infinite, seeded, augmented)."""
    from hipseg.augment import AugmentConfig
    from hipseg.loader import SliceLoader

    d = train_defaults()
    # Exactly hipseg.train's arguments (it does not pin memory, so neither does this).
    kwargs = dict(
        batch_size=batch_size,
        axis=d["axis"],
        context=context,
        augment=AugmentConfig(**d.get("augment_options", {})) if d["augment"] else False,
        num_workers=workers,
        seed=0,
        mode="infinite",
        foreground_fraction=d["foreground_fraction"],
    )
    loader = SliceLoader(str(store), **kwargs)
    iterator = iter(loader)
    return iterator, getattr(loader, "close", lambda: None)


def prebuilt_batches(
    store: Path, batch_size: int, workers: int, device: str
) -> tuple[Iterator[dict], Callable]:
    """A few hipseg batches made up front and cycled: what the step costs with a free loader."""
    iterator, close = hipseg_batches(store, batch_size, workers, device)
    batches = [
        {"image": b["image"].clone(), "label": b["label"].clone()}
        for b in itertools.islice(iterator, PREBUILT_BATCHES)
    ]
    close()
    return itertools.cycle(batches), lambda: None


def monai_nifti_transforms(
    slice_shape: tuple[int, int], samples_per_volume: int, foreground_fraction: float
) -> tuple[list, list]:
    """(deterministic, random) MONAI transforms a practitioner writes for 2D slices of 3D NIfTI.

    Load, channel first, RAS, the store's normalisation (clip to percentiles 0.5 / 99.5, scale
    to [0, 1]), pad the in-plane axes to the store's slice size; then per sample: draw axial
    slices with hipseg's foreground share and the augmentations of the loader benchmark's MONAI
    peer (benchmarks/peers_monai.py: flips, rotation, elastic), so every MONAI peer augments
    alike.
    """
    from monai import transforms as T

    from benchmarks import peers_monai

    keys = list(peers_monai.KEYS)
    deterministic = [
        T.LoadImaged(keys, image_only=True),
        T.EnsureChannelFirstd(keys),
        # nibabel's axis labels, given explicitly (MONAI warns that its default will change).
        T.Orientationd(keys, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        T.ScaleIntensityRangePercentilesd(
            "image", lower=0.5, upper=99.5, b_min=0.0, b_max=1.0, clip=True
        ),
        T.ResizeWithPadOrCropd(keys, spatial_size=(*slice_shape, -1)),
    ]
    foreground = min(max(foreground_fraction, 1e-6), 1.0 - 1e-6)
    _, augment = peers_monai.transforms(flip=train_flip())
    random = [
        T.RandCropByPosNegLabeld(
            keys,
            label_key="label",
            spatial_size=(-1, -1, 1),
            pos=foreground,
            neg=1.0 - foreground,
            num_samples=samples_per_volume,
        ),
        T.SqueezeDimd(keys, dim=-1),
        T.EnsureTyped(keys, dtype=(np.float32, np.int64)),
        *augment,
    ]
    return deterministic, random


def samples_per_volume(batch_size: int) -> int:
    """Slices drawn per loaded volume (MONAI's num_samples): 4 when the batch divides, else 1."""
    return 4 if batch_size % 4 == 0 else 1


def monai_nifti_batches(
    source: Path,
    slice_shape: tuple[int, int],
    batch_size: int,
    workers: int,
    device: str,
    cached: bool,
) -> tuple[Iterator[dict], Callable]:
    """MONAI Dataset (NIfTI read per sample) or CacheDataset over the NIfTI; shuffled, endless."""
    import torch
    from monai import data as md
    from monai import transforms as T

    per_volume = samples_per_volume(batch_size)
    deterministic, random = monai_nifti_transforms(
        slice_shape, per_volume, train_defaults()["foreground_fraction"]
    )
    items = c.decathlon_pairs(source)
    transform = T.Compose(deterministic + random)
    if cached:
        dataset = md.CacheDataset(
            items, transform, cache_rate=1.0, num_workers=max(1, workers), progress=False
        )
    else:
        dataset = md.Dataset(items, transform)
    loader = md.DataLoader(
        dataset,
        batch_size=batch_size // per_volume,
        shuffle=True,
        num_workers=workers,
        drop_last=True,
        persistent_workers=workers > 0,
        pin_memory=device == "cuda",
        generator=torch.Generator().manual_seed(0),
    )

    def endless() -> Iterator[dict]:
        while True:
            yield from loader

    return endless(), lambda: None


def monai_cache_batches(
    store: Path, batch_size: int, workers: int
) -> tuple[Iterator[dict], Callable]:
    """The loader benchmark's MONAI peer (CacheDataset over the store's slices) as a stream."""
    from benchmarks import peers_monai

    # Built here rather than through peers_monai.monai_batches (a lazy generator), so that the
    # cache is filled and MONAI's set_determinism has run before reset_torch_flags.
    loader = peers_monai.monai_loader(
        store, batch_size, workers, train_defaults()["axis"], flip=train_flip()
    )

    def endless() -> Iterator[dict]:
        while True:
            yield from loader

    return endless(), lambda: None


# ---------------------------------------------------------------- measuring


def measure_training(pipeline: str, variant: str, device: str, workers: int | None = None) -> dict:
    """Steps/s after warm-up (median over chunks), time to the first step, peak tree memory."""
    from hipseg.store import open_store

    scale = c.scale()
    d = train_defaults()
    batch_size = int(d["batch_size"])
    if workers is None:
        workers = train_workers() if pipeline.startswith(("hipseg", "prebuilt")) else MONAI_WORKERS
    label, source = c.training_source()
    store_path = c.converted_store(source)
    store = open_store(store_path)
    slice_shape = store.slice_shape(d["axis"])
    amp, channels_last = variant_flags(variant, device)

    with c.PeakTreeMemory() as memory:
        started = time.perf_counter()
        context = int(d["context"]) if pipeline == "hipseg-2.5d" else 0
        if pipeline in ("hipseg", "hipseg-2.5d"):
            batches, close = hipseg_batches(store_path, batch_size, workers, device, context)
        elif pipeline == "prebuilt":
            batches, close = prebuilt_batches(store_path, batch_size, workers, device)
        elif pipeline in ("monai-nifti", "monai-nifti-cache"):
            batches, close = monai_nifti_batches(
                source,
                slice_shape,
                batch_size,
                workers,
                device,
                cached=pipeline == "monai-nifti-cache",
            )
        elif pipeline == "monai-cache":
            batches, close = monai_cache_batches(store_path, batch_size, workers)
        else:
            raise ValueError(f"unknown pipeline {pipeline!r}; expected one of {PIPELINES}")
        reset_torch_flags()
        stepper = Stepper(2 * context + 1, len(store.class_names), device, amp, channels_last)
        try:
            first = next(batches)
            shape = tuple(first["image"].shape)
            stepper.step(first)
            stepper.synchronize()
            first_step_s = time.perf_counter() - started
            for _ in range(scale.warmup_steps):
                stepper.step(next(batches))
            stepper.synchronize()
            per_chunk = max(1, scale.train_steps // scale.train_chunks)
            rates, losses = [], []
            for _ in range(scale.train_chunks):
                chunk_start = time.perf_counter()
                for _ in range(per_chunk):
                    losses.append(stepper.step(next(batches)))
                stepper.synchronize()
                rates.append(per_chunk / (time.perf_counter() - chunk_start))
        finally:
            close()
    steps_per_s = statistics.median(rates)
    if shape[0] != batch_size or tuple(shape[2:]) != tuple(slice_shape):
        raise RuntimeError(
            f"{pipeline}: batches of {shape}, expected ({batch_size}, C, {slice_shape})"
        )
    return {
        "pipeline": pipeline,
        "variant": variant,
        "amp": amp,
        "channels_last": channels_last,
        "device": device,
        "device_label": c.device_label(device),
        "data": label,
        "batch_size": batch_size,
        "batch_shape": list(shape),
        "workers": workers,
        "steps_per_s": steps_per_s,
        "steps_per_s_chunks": rates,
        "samples_per_s": steps_per_s * batch_size,
        "ratio_to_t4_baseline": steps_per_s / c.T4_BASELINE_STEPS_PER_S,
        "first_step_s": first_step_s,
        "timed_steps": per_chunk * len(rates),
        "final_loss": float(np.mean(losses[-per_chunk:])),
        "peak_tree_rss_mb": memory.peak_mb,
    }


def reset_torch_flags() -> None:
    """torch's defaults, as hipseg.train runs with them: MONAI's set_determinism (called by the
    MONAI peer) turns cuDNN's deterministic mode on for the whole process, which would slow every
    pipeline measured after it."""
    import torch

    torch.backends.cudnn.deterministic = False
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(False)


def _skip_reason(pipeline: str, variant: str, device: str) -> str | None:
    if variant == "default":
        return None
    if device != "cuda":
        return "precision / memory-format variants run with --device cuda only"
    if pipeline.startswith("monai"):
        return "MONAI peers run in the default variant only"
    return None


class TrainSteps:
    """Training steps/s end to end for hipseg and its peers, and the ratio to the T4 baseline."""

    params = [list(PIPELINES), list(VARIANTS)]
    param_names = ["pipeline", "variant"]
    timeout = 1800.0

    def setup_cache(self) -> dict:
        label, source = c.training_source()
        store = c.converted_store(source)
        return {"run": c.new_run_token(), "source": str(source), "store": str(store), "data": label}

    setup_cache.timeout = 1800.0  # type: ignore[attr-defined]

    def setup(self, cache: dict, pipeline: str, variant: str) -> None:
        self.device = c.require_device()
        reason = _skip_reason(pipeline, variant, self.device)
        if reason:
            raise NotImplementedError(reason)

    def _result(self, cache: dict, pipeline: str, variant: str) -> dict:
        return c.measure_once(
            cache["run"],
            f"train/{pipeline}/{variant}/{self.device}",
            lambda: measure_training(pipeline, variant, self.device),
        )

    def track_steps_per_s(self, cache: dict, pipeline: str, variant: str) -> float:
        return self._result(cache, pipeline, variant)["steps_per_s"]

    track_steps_per_s.unit = "steps/s"  # type: ignore[attr-defined]

    def track_ratio_to_t4_baseline(self, cache: dict, pipeline: str, variant: str) -> float:
        """Steps/s / (1000 steps per hour), the seed project's speed on an NVIDIA T4."""
        return self._result(cache, pipeline, variant)["ratio_to_t4_baseline"]

    track_ratio_to_t4_baseline.unit = "x T4 baseline"  # type: ignore[attr-defined]

    def track_ratio_to_hipseg(self, cache: dict, pipeline: str, variant: str) -> float:
        """This pipeline's steps/s / hipseg's default (below 1: hipseg is faster)."""
        own = self._result(cache, pipeline, variant)["steps_per_s"]
        return own / self._result(cache, "hipseg", "default")["steps_per_s"]

    track_ratio_to_hipseg.unit = "x hipseg"  # type: ignore[attr-defined]

    def track_first_step_s(self, cache: dict, pipeline: str, variant: str) -> float:
        """From building the pipeline to the end of the first step (worker start, JIT, caching)."""
        return self._result(cache, pipeline, variant)["first_step_s"]

    track_first_step_s.unit = "s"  # type: ignore[attr-defined]

    def track_peak_memory_mb(self, cache: dict, pipeline: str, variant: str) -> float:
        """Peak resident memory of the process and its loader workers."""
        return self._result(cache, pipeline, variant)["peak_tree_rss_mb"]

    track_peak_memory_mb.unit = "MB"  # type: ignore[attr-defined]


class TrainLoaderWorkers:
    """hipseg steps/s on CUDA by number of CPU loader workers: how many keep the GPU busy."""

    params = [list(GPU_WORKERS)]
    param_names = ["workers"]
    timeout = 1800.0

    def setup_cache(self) -> dict:
        label, source = c.training_source()
        return {"run": c.new_run_token(), "store": str(c.converted_store(source))}

    setup_cache.timeout = 1800.0  # type: ignore[attr-defined]

    def setup(self, cache: dict, workers: int) -> None:
        self.device = c.require_device()
        if self.device != "cuda":
            raise NotImplementedError("the loader-worker sweep runs with --device cuda only")

    def _result(self, cache: dict, workers: int) -> dict:
        return c.measure_once(
            cache["run"],
            f"train-workers/{workers}",
            lambda: measure_training("hipseg", "default", self.device, workers),
        )

    def track_steps_per_s(self, cache: dict, workers: int) -> float:
        return self._result(cache, workers)["steps_per_s"]

    track_steps_per_s.unit = "steps/s"  # type: ignore[attr-defined]

    def track_fraction_of_prebuilt(self, cache: dict, workers: int) -> float:
        """Steps/s / steps/s with prebuilt batches: 1.0 means the loader keeps the GPU fully fed."""
        ceiling = c.measure_once(
            cache["run"],
            "train-workers/prebuilt",
            lambda: measure_training("prebuilt", "default", self.device),
        )
        return self._result(cache, workers)["steps_per_s"] / ceiling["steps_per_s"]

    track_fraction_of_prebuilt.unit = "ratio"  # type: ignore[attr-defined]
