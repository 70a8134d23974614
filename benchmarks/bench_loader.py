"""Loader benchmarks: hipseg's SliceLoader against the idiomatic MONAI pipeline, side by side.

On one store (``HIPSEG_BENCH_STORE``, else the suite's training data converted:
``HIPSEG_BENCH_DATA`` or the built-in synthetic cases), with flips, rotation and
elastic deformation on:

- ``LoaderThroughput``: augmented slices/s, slices per CPU-second of the whole
  process tree ("per core"), and resident memory (RSS, and PSS, which counts the
  shared RAM cache once) with 1 and 2 workers;
- ``MonaiPeerThroughput``: the same for ``peers_monai`` (CacheDataset + RandFlipd +
  RandRotated + Rand2DElasticd + DataLoader) with the same workers;
- ``LoaderVsMonai``: the ratios (target: >= 100x per core);
- ``PlainDataLoaderVsMonai``: ``HippocampusSliceDataset`` under a plain torch
  ``DataLoader(ds, batch_size, num_workers, shuffle=True)`` (``__getitems__``: one
  kernel call per batch) ÷ the MONAI peer, same settings (target: >= 100x);
- ``LoaderOverhead``: training steps/s of the compact U-Net fed by the loader
  divided by steps/s fed prebuilt batches (target: >= 0.97);
- ``AugmentKernel``: the fused kernel alone, in process.

``HIPSEG_BENCH_QUICK=1`` shortens every measurement. ``python benchmarks/bench_loader.py
[--store PATH] [--quick]`` prints the numbers and ratios without asv.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: make `benchmarks` importable as under asv
    sys.path.insert(0, str(REPO))

from benchmarks import _common as c  # noqa: E402
from benchmarks import peers_monai  # noqa: E402

STORE_ENV = "HIPSEG_BENCH_STORE"
BATCH_SIZE = 32
AXIS = "axial"
PEER_WORKERS = 2  # the MONAI peer and the ratios use the hipseg default worker count


def bench_store() -> Path:
    """The store every loader benchmark reads."""
    given = os.environ.get(STORE_ENV)
    if given:
        path = Path(given).resolve()
        if not (path / "zarr.json").is_file():
            raise FileNotFoundError(
                f"{STORE_ENV}={given}: not a converted hipseg store (no zarr.json); "
                "run `hipseg convert` first"
            )
        return path
    _, source = c.training_source()
    return c.converted_store(source)


def sizes() -> dict[str, float]:
    """Warm-up and timed work per measurement: a quick run trades precision for minutes.

    Streams run for at least ``*_batches`` batches and ``*_seconds`` seconds, so the
    10 ms granularity of process CPU times stays below 1% of what is measured.
    """
    if c.is_quick():
        return {
            "hipseg_warmup": 20,
            "hipseg_batches": 100,
            "hipseg_seconds": 2.0,
            "monai_warmup": 2,
            "monai_batches": 4,
            "monai_seconds": 4.0,
            "train_warmup": 2,
            "train_steps": 6,
            "train_chunks": 3,
        }
    return {
        "hipseg_warmup": 30,
        "hipseg_batches": 300,
        "hipseg_seconds": 6.0,
        "monai_warmup": 3,
        "monai_batches": 20,
        "monai_seconds": 15.0,
        "train_warmup": 4,
        "train_steps": 15,
        "train_chunks": 5,
    }


# ---------------------------------------------------------------- measuring a batch stream


def _tree(process) -> list:
    return [process, *process.children(recursive=True)]


def tree_cpu_seconds(process) -> float:
    """User + system CPU seconds of a process and its live descendants (the loader workers)."""
    import psutil

    total = 0.0
    for p in _tree(process):
        try:
            times = p.cpu_times()
            total += times.user + times.system
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total


def tree_memory(process) -> tuple[int, int]:
    """(RSS, PSS) bytes of the tree: RSS counts shared pages in every process, PSS once overall."""
    import psutil

    rss = pss = 0
    for p in _tree(process):
        try:
            info = p.memory_full_info()
            rss += info.rss
            pss += getattr(info, "pss", info.rss)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return rss, pss


def measure_stream(
    start: Callable[[], tuple[Iterator[dict], Callable[[], None]]],
    warmup: int,
    batches: int,
    seconds: float,
) -> dict[str, float]:
    """Throughput and memory of a batch stream after ``warmup`` batches (workers, caches, JIT)."""
    import psutil

    me = psutil.Process()
    rss0, pss0 = tree_memory(me)
    stream, close = start()
    try:
        for _ in range(warmup):
            next(stream)
        cpu0, t0, slices, done = tree_cpu_seconds(me), time.perf_counter(), 0, 0
        while done < batches or time.perf_counter() - t0 < seconds:
            slices += int(next(stream)["image"].shape[0])
            done += 1
        wall, cpu = time.perf_counter() - t0, tree_cpu_seconds(me) - cpu0
        rss, pss = tree_memory(me)
    finally:
        close()
    return {
        "slices_per_s": slices / wall,
        "slices_per_cpu_s": slices / max(cpu, 1e-9),
        "cpu_busy": cpu / wall,
        "rss_mb": rss / 2**20,
        "pss_mb": pss / 2**20,
        "rss_added_mb": (rss - rss0) / 2**20,
        "pss_added_mb": (pss - pss0) / 2**20,
        "slices": float(slices),
        "seconds": wall,
    }


def hipseg_stream(
    store: Path, workers: int, **options: Any
) -> tuple[Iterator[dict], Callable[[], None]]:
    from hipseg.loader import SliceLoader

    loader = SliceLoader(
        store, batch_size=BATCH_SIZE, axis=AXIS, num_workers=workers, seed=0, **options
    )
    return iter(loader), loader.close


def plain_dataloader_stream(store: Path, workers: int) -> tuple[Iterator[dict], Callable[[], None]]:
    """The slice dataset as a MONAI or Lightning user plugs it in: a plain DataLoader."""
    import torch

    from hipseg.dataset import HippocampusSliceDataset

    dataset = HippocampusSliceDataset(store, axis=AXIS, seed=0)
    loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH_SIZE, shuffle=True,
                                         num_workers=workers, persistent_workers=workers > 0)

    def batches() -> Iterator[dict]:
        while True:
            yield from loader

    stream = batches()
    return stream, stream.close


def measure_plain_dataloader(store: Path, workers: int) -> dict[str, float]:
    from hipseg.augment import warmup

    warmup()
    n = sizes()
    return measure_stream(
        lambda: plain_dataloader_stream(store, workers),
        int(n["hipseg_warmup"]),
        int(n["hipseg_batches"]),
        n["hipseg_seconds"],
    )


def monai_stream(store: Path, workers: int) -> tuple[Iterator[dict], Callable[[], None]]:
    stream = peers_monai.monai_batches(store, BATCH_SIZE, workers, AXIS)
    return stream, stream.close


def measure_hipseg(store: Path, workers: int) -> dict[str, float]:
    from hipseg.augment import warmup

    warmup()  # Numba's one-time load stays out of the "added" memory, whichever run is first
    n = sizes()
    return measure_stream(
        lambda: hipseg_stream(store, workers),
        int(n["hipseg_warmup"]),
        int(n["hipseg_batches"]),
        n["hipseg_seconds"],
    )


def measure_monai(store: Path, workers: int) -> dict[str, float]:
    n = sizes()
    return measure_stream(
        lambda: monai_stream(store, workers),
        int(n["monai_warmup"]),
        int(n["monai_batches"]),
        n["monai_seconds"],
    )


# ---------------------------------------------------------------- loader overhead in training


def _model(in_channels: int):
    """The compact U-Net hipseg.train builds by default."""
    from hipseg.models import build_model

    return build_model("unet", in_channels=in_channels, out_channels=3)


def training_overhead(
    loader: Any, model: Any, device: Any, sizes_: dict[str, float], n_prebuilt: int = 8
) -> dict[str, float]:
    """Steps/s of ``model`` fed by ``loader``, and fed the loader's own batches prebuilt.

    Chunks of each alternate, so a slow spell on a shared machine hits both; the
    overhead ratio is the median over neighbouring (prebuilt, loader) chunk pairs,
    which one burst of load from elsewhere cannot swing, and steps/s use the sums.
    Closes the loader.
    """
    import torch

    from hipseg.losses import build_loss

    stream = iter(loader)
    prebuilt = [
        {"image": b["image"].clone(), "label": b["label"].clone()}
        for b in itertools.islice(stream, n_prebuilt)
    ]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = build_loss("dice_ce")

    def run(source: Iterator[dict], steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            batch = next(source)
            image = batch["image"].to(device, non_blocking=True)
            label = batch["label"].to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(image), label)
            loss.backward()
            optimizer.step()
            float(loss.detach())  # a training loop reads the loss; this also syncs CUDA
        return time.perf_counter() - start

    cycled = itertools.cycle(prebuilt)
    warmup, steps, chunks = (int(sizes_[k]) for k in ("train_warmup", "train_steps", "train_chunks"))
    try:
        run(cycled, warmup)
        run(stream, warmup)
        pairs = [(run(cycled, steps), run(stream, steps)) for _ in range(chunks)]
    finally:
        loader.close()
    return {
        "steps_per_s_loader": steps * chunks / sum(t for _, t in pairs),
        "steps_per_s_prebuilt": steps * chunks / sum(t for t, _ in pairs),
        "overhead_ratio": float(np.median([pre / real for pre, real in pairs])),
    }


def measure_training(store: Path, workers: int = PEER_WORKERS) -> dict[str, float]:
    """The compact U-Net's steps/s with SliceLoader ÷ with prebuilt batches (``training_overhead``)."""
    import torch

    from hipseg.loader import SliceLoader

    device = torch.device(c.require_device())
    torch.manual_seed(0)
    loader = SliceLoader(
        store,
        batch_size=BATCH_SIZE,
        axis=AXIS,
        num_workers=workers,
        seed=0,
        pin_memory=device.type == "cuda",
    )
    model = _model(loader.image_shape[0]).to(device)
    return training_overhead(loader, model, device, sizes())


# ---------------------------------------------------------------- asv classes


def _setup_cache() -> dict[str, str]:
    c.prune_runs()
    return {"run": c.new_run_token(), "store": str(bench_store())}


class LoaderThroughput:
    """hipseg SliceLoader: augmented slices/s, per CPU-second, and memory, by worker count."""

    params = [[1, 2]]
    param_names = ["workers"]
    timeout = 600.0

    def setup_cache(self) -> dict[str, str]:
        return _setup_cache()

    setup_cache.timeout = 1800.0  # type: ignore[attr-defined]  # may convert the synthetic store

    def _result(self, cache: dict, workers: int) -> dict:
        return c.measure_once(
            cache["run"],
            f"hipseg-loader-{workers}",
            lambda: measure_hipseg(Path(cache["store"]), workers),
        )

    def track_slices_per_s(self, cache: dict, workers: int) -> float:
        return self._result(cache, workers)["slices_per_s"]

    track_slices_per_s.unit = "slices/s"  # type: ignore[attr-defined]

    def track_slices_per_core_s(self, cache: dict, workers: int) -> float:
        """Slices per CPU-second of the main process and its workers."""
        return self._result(cache, workers)["slices_per_cpu_s"]

    track_slices_per_core_s.unit = "slices/CPU-s"  # type: ignore[attr-defined]

    def track_rss_mb(self, cache: dict, workers: int) -> float:
        return self._result(cache, workers)["rss_mb"]

    track_rss_mb.unit = "MiB"  # type: ignore[attr-defined]

    def track_pss_mb(self, cache: dict, workers: int) -> float:
        """Proportional set size: the RAM cache shared by the workers counts once."""
        return self._result(cache, workers)["pss_mb"]

    track_pss_mb.unit = "MiB"  # type: ignore[attr-defined]

    def track_pss_added_mb(self, cache: dict, workers: int) -> float:
        """What starting the loader added to the tree's PSS (workers, RAM cache, ring)."""
        return self._result(cache, workers)["pss_added_mb"]

    track_pss_added_mb.unit = "MiB"  # type: ignore[attr-defined]


class MonaiPeerThroughput:
    """The idiomatic MONAI pipeline (peers_monai) on the same store: slices/s and memory."""

    params = [[PEER_WORKERS]]
    param_names = ["workers"]
    timeout = 900.0

    def setup_cache(self) -> dict[str, str]:
        return _setup_cache()

    setup_cache.timeout = 1800.0  # type: ignore[attr-defined]

    def _result(self, cache: dict, workers: int) -> dict:
        return c.measure_once(
            cache["run"],
            f"monai-peer-{workers}",
            lambda: measure_monai(Path(cache["store"]), workers),
        )

    def track_slices_per_s(self, cache: dict, workers: int) -> float:
        return self._result(cache, workers)["slices_per_s"]

    track_slices_per_s.unit = "slices/s"  # type: ignore[attr-defined]

    def track_slices_per_core_s(self, cache: dict, workers: int) -> float:
        return self._result(cache, workers)["slices_per_cpu_s"]

    track_slices_per_core_s.unit = "slices/CPU-s"  # type: ignore[attr-defined]

    def track_rss_mb(self, cache: dict, workers: int) -> float:
        return self._result(cache, workers)["rss_mb"]

    track_rss_mb.unit = "MiB"  # type: ignore[attr-defined]

    def track_pss_added_mb(self, cache: dict, workers: int) -> float:
        return self._result(cache, workers)["pss_added_mb"]

    track_pss_added_mb.unit = "MiB"  # type: ignore[attr-defined]


class LoaderVsMonai:
    """hipseg ÷ MONAI: same workers, store and augmentations (target >= 100x per core)."""

    timeout = 900.0

    def setup_cache(self) -> dict[str, str]:
        return _setup_cache()

    setup_cache.timeout = 1800.0  # type: ignore[attr-defined]

    def _results(self, cache: dict) -> tuple[dict, dict]:
        store = Path(cache["store"])
        ours = c.measure_once(
            cache["run"],
            f"hipseg-loader-{PEER_WORKERS}",
            lambda: measure_hipseg(store, PEER_WORKERS),
        )
        peer = c.measure_once(
            cache["run"], f"monai-peer-{PEER_WORKERS}", lambda: measure_monai(store, PEER_WORKERS)
        )
        return ours, peer

    def track_ratio_to_monai_per_core(self, cache: dict) -> float:
        ours, peer = self._results(cache)
        return ours["slices_per_cpu_s"] / peer["slices_per_cpu_s"]

    track_ratio_to_monai_per_core.unit = "x"  # type: ignore[attr-defined]

    def track_ratio_to_monai_wall(self, cache: dict) -> float:
        ours, peer = self._results(cache)
        return ours["slices_per_s"] / peer["slices_per_s"]

    track_ratio_to_monai_wall.unit = "x"  # type: ignore[attr-defined]


class PlainDataLoaderVsMonai:
    """HippocampusSliceDataset in a plain DataLoader ÷ MONAI, same settings (target >= 100x)."""

    timeout = 900.0

    def setup_cache(self) -> dict[str, str]:
        return _setup_cache()

    setup_cache.timeout = 1800.0  # type: ignore[attr-defined]

    def _results(self, cache: dict) -> tuple[dict, dict]:
        store = Path(cache["store"])
        ours = c.measure_once(
            cache["run"],
            f"plain-dataloader-{PEER_WORKERS}",
            lambda: measure_plain_dataloader(store, PEER_WORKERS),
        )
        peer = c.measure_once(
            cache["run"], f"monai-peer-{PEER_WORKERS}", lambda: measure_monai(store, PEER_WORKERS)
        )
        return ours, peer

    def track_slices_per_s(self, cache: dict) -> float:
        return self._results(cache)[0]["slices_per_s"]

    track_slices_per_s.unit = "slices/s"  # type: ignore[attr-defined]

    def track_ratio_to_monai_wall(self, cache: dict) -> float:
        ours, peer = self._results(cache)
        return ours["slices_per_s"] / peer["slices_per_s"]

    track_ratio_to_monai_wall.unit = "x"  # type: ignore[attr-defined]

    def track_ratio_to_monai_per_core(self, cache: dict) -> float:
        ours, peer = self._results(cache)
        return ours["slices_per_cpu_s"] / peer["slices_per_cpu_s"]

    track_ratio_to_monai_per_core.unit = "x"  # type: ignore[attr-defined]


class LoaderOverhead:
    """Compact U-Net steps/s with the real loader ÷ with prebuilt batches (target >= 0.97).

    For 0 workers (batches built in the training process, hipseg.train's default on a
    machine of 2 cores or fewer), 1 and 2 worker processes.
    """

    timeout = 900.0
    params = [[0, 1, 2]]
    param_names = ["workers"]

    def setup_cache(self) -> dict[str, str]:
        return _setup_cache()

    setup_cache.timeout = 1800.0  # type: ignore[attr-defined]

    def _result(self, cache: dict, workers: int) -> dict:
        return c.measure_once(
            cache["run"],
            f"loader-overhead-{c.device_name()}-{workers}",
            lambda: measure_training(Path(cache["store"]), workers),
        )

    def track_overhead_ratio(self, cache: dict, workers: int) -> float:
        return self._result(cache, workers)["overhead_ratio"]

    track_overhead_ratio.unit = "ratio"  # type: ignore[attr-defined]

    def track_steps_per_s_loader(self, cache: dict, workers: int) -> float:
        return self._result(cache, workers)["steps_per_s_loader"]

    track_steps_per_s_loader.unit = "steps/s"  # type: ignore[attr-defined]

    def track_steps_per_s_prebuilt(self, cache: dict, workers: int) -> float:
        return self._result(cache, workers)["steps_per_s_prebuilt"]

    track_steps_per_s_prebuilt.unit = "steps/s"  # type: ignore[attr-defined]


class AugmentKernel:
    """One batch of 32 augmented slices rendered in process (sampler draws + fused kernel)."""

    params = [[0, 1], ["ram", "stream"]]
    param_names = ["context", "cache"]

    def setup(self, context: int, cache: str) -> None:
        from hipseg.dataset import HippocampusSliceDataset

        self.dataset = HippocampusSliceDataset(
            bench_store(), axis=AXIS, context=context, cache=cache
        )
        self.sampler = self.dataset.sampler(BATCH_SIZE)
        self.k = 0
        self.time_batch(context, cache)  # compile / load kernels, fill the cache

    def time_batch(self, context: int, cache: str) -> None:
        self.k += 1
        self.dataset.make_batch(self.sampler.batch_rows(self.k), self.sampler.augment_rng(self.k))

    def peakmem_batches(self, context: int, cache: str) -> None:
        for k in range(20):
            self.dataset.make_batch(self.sampler.batch_rows(k), self.sampler.augment_rng(k))


# ---------------------------------------------------------------- script


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--store", help=f"a converted store (default: ${STORE_ENV} or the suite's data)"
    )
    parser.add_argument("--quick", action="store_true", help="short measurements")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--skip-monai", action="store_true")
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--plain-dataloader", action="store_true",
                        help="also the slice dataset under a plain torch DataLoader")
    args = parser.parse_args(argv)
    if args.quick:
        os.environ[c.QUICK_ENV] = "1"
    if args.store:
        os.environ[STORE_ENV] = args.store
    store = bench_store()
    print(
        f"store: {store}   ({c.device_label('cpu')}, torch threads in main: "
        f"{__import__('torch').get_num_threads()})"
    )
    ours = {}
    for workers in args.workers:
        r = ours[workers] = measure_hipseg(store, workers)
        print(
            f"hipseg  workers={workers}: {r['slices_per_s']:9.0f} slices/s  "
            f"{r['slices_per_cpu_s']:9.0f} slices/CPU-s  (CPU busy {r['cpu_busy']:.2f})  "
            f"RSS {r['rss_mb']:6.0f} MiB  PSS {r['pss_mb']:6.0f} MiB "
            f"(loader added: RSS {r['rss_added_mb']:+.0f}, PSS {r['pss_added_mb']:+.0f} MiB)"
        )
    if not args.skip_monai:
        peer = measure_monai(store, PEER_WORKERS)
        print(
            f"MONAI   workers={PEER_WORKERS}: {peer['slices_per_s']:9.1f} slices/s  "
            f"{peer['slices_per_cpu_s']:9.1f} slices/CPU-s  (CPU busy {peer['cpu_busy']:.2f})  "
            f"RSS {peer['rss_mb']:6.0f} MiB  PSS {peer['pss_mb']:6.0f} MiB "
            f"(loader added: RSS {peer['rss_added_mb']:+.0f}, PSS {peer['pss_added_mb']:+.0f} MiB)"
        )
        mine = ours.get(PEER_WORKERS) or measure_hipseg(store, PEER_WORKERS)
        per_core = mine["slices_per_cpu_s"] / peer["slices_per_cpu_s"]
        wall = mine["slices_per_s"] / peer["slices_per_s"]
        print(
            f"ratio hipseg/MONAI per core: {per_core:.0f}x   wall: {wall:.0f}x   "
            "(target >= 100x per core)"
        )
    if args.plain_dataloader:
        plain = measure_plain_dataloader(store, PEER_WORKERS)
        print(
            f"plain DataLoader workers={PEER_WORKERS}: {plain['slices_per_s']:9.0f} slices/s  "
            f"{plain['slices_per_cpu_s']:9.0f} slices/CPU-s  (CPU busy {plain['cpu_busy']:.2f})"
        )
        if not args.skip_monai:
            print(
                f"ratio plain DataLoader/MONAI: wall {plain['slices_per_s'] / peer['slices_per_s']:.0f}x"
                f"   per core {plain['slices_per_cpu_s'] / peer['slices_per_cpu_s']:.0f}x "
                "(target >= 100x)"
            )
    if not args.skip_training:
        t = measure_training(store)
        print(
            f"training: {t['steps_per_s_loader']:.2f} steps/s with the loader, "
            f"{t['steps_per_s_prebuilt']:.2f} with prebuilt batches -> overhead ratio "
            f"{t['overhead_ratio']:.3f} (target >= 0.97)"
        )


if __name__ == "__main__":
    main()
