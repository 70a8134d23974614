"""3D patch benchmarks: hipseg's patch dataset and loader against MONAI and nnU-Net v2's augmenter.

On the loader benchmarks' store (``bench_loader.bench_store``), whole ROI crops as
patches, a left-right flip, rotation about three axes and an elastic field on,
batches of ``BATCH_SIZE`` from ``PEER_WORKERS`` workers, all in one run:

- ``PatchThroughput``: augmented patches/s and patches per CPU-second of the whole
  process tree, for hipseg under a plain ``DataLoader`` (``__getitems__``: one kernel
  call per batch), hipseg's ``PatchLoader``, MONAI (CacheDataset + RandFlipd +
  RandRotated + Rand3DElasticd, MetaTensor tracking off) and batchgeneratorsv2
  (SpatialTransform + MirrorTransform); ``peers_3d`` describes the peers;
- ``PatchVsPeers``: the ratios (targets: >= 20x MONAI, >= 5x batchgeneratorsv2 per core);
- ``PatchTrainingOverhead``: unet3d steps/s fed by ``PatchLoader`` ÷ fed prebuilt
  batches (target >= 0.97).

``python benchmarks/bench_patches.py [--store PATH] [--quick]`` prints them without asv.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import _common as c  # noqa: E402
from benchmarks import peers_3d  # noqa: E402
from benchmarks.bench_loader import (  # noqa: E402
    STORE_ENV,
    bench_store,
    measure_stream,
    training_overhead,
)

BATCH_SIZE = 4
PEER_WORKERS = 2
TRAIN_BATCH = 2
PIPELINES = ("hipseg-dataloader", "hipseg-loader", "monai", "bgv2")
PEERS = {"monai": "MONAI", "bgv2": "batchgeneratorsv2"}


def sizes() -> dict[str, float]:
    """Warm-up and timed batches; the peers take about a second of CPU per patch."""
    if c.is_quick():
        return {"hipseg_warmup": 3, "hipseg_batches": 10, "hipseg_seconds": 1.0,
                "peer_warmup": 1, "peer_batches": 2, "peer_seconds": 2.0,
                "train_warmup": 1, "train_steps": 2, "train_chunks": 2}
    return {"hipseg_warmup": 10, "hipseg_batches": 100, "hipseg_seconds": 6.0,
            "peer_warmup": 2, "peer_batches": 8, "peer_seconds": 20.0,
            "train_warmup": 2, "train_steps": 5, "train_chunks": 4}


def _endless(make_loader: Callable[[], object]) -> tuple[Iterator[dict], Callable[[], None]]:
    loader = make_loader()

    def batches() -> Iterator[dict]:
        while True:
            yield from loader  # type: ignore[attr-defined]

    stream = batches()
    return stream, stream.close


def stream(pipeline: str, store: Path, workers: int) -> tuple[Iterator[dict], Callable[[], None]]:
    """An endless batch stream of ``pipeline`` and a function that stops it."""
    if pipeline == "hipseg-dataloader":
        import torch

        from hipseg.patches import HippocampusPatchDataset

        def make():
            dataset = HippocampusPatchDataset(store, augment=True)
            return torch.utils.data.DataLoader(dataset, batch_size=BATCH_SIZE, shuffle=True,
                                               num_workers=workers, persistent_workers=workers > 0)

        return _endless(make)
    if pipeline == "hipseg-loader":
        from hipseg.loader import PatchLoader

        loader = PatchLoader(store, batch_size=BATCH_SIZE, num_workers=workers, seed=0)
        return iter(loader), loader.close
    if pipeline == "monai":
        return _endless(lambda: peers_3d.monai_loader(store, BATCH_SIZE, workers))
    if pipeline == "bgv2":
        return _endless(lambda: peers_3d.bgv2_loader(store, BATCH_SIZE, workers))
    raise ValueError(f"unknown pipeline {pipeline!r}; known: {PIPELINES}")


def measure(pipeline: str, store: Path, workers: int = PEER_WORKERS) -> dict[str, float]:
    from hipseg.augment3d import warmup

    warmup()
    n = sizes()
    kind = "hipseg" if pipeline.startswith("hipseg") else "peer"
    result = measure_stream(lambda: stream(pipeline, store, workers), int(n[f"{kind}_warmup"]),
                            int(n[f"{kind}_batches"]), n[f"{kind}_seconds"])
    # measure_stream counts samples as "slices"; here each sample is a 3D patch.
    return {"patches_per_s": result["slices_per_s"], "patches_per_cpu_s": result["slices_per_cpu_s"],
            "cpu_busy": result["cpu_busy"], "pss_added_mb": result["pss_added_mb"]}


def measure_training(store: Path, workers: int) -> dict[str, float]:
    """unet3d steps/s fed by PatchLoader ÷ fed its own batches prebuilt (alternating chunks)."""
    import torch

    from hipseg.loader import PatchLoader
    from hipseg.models import build_model

    device = torch.device(c.require_device())
    torch.manual_seed(0)
    loader = PatchLoader(store, batch_size=TRAIN_BATCH, num_workers=workers, seed=0,
                         pin_memory=device.type == "cuda")
    model = build_model("unet3d", 1, 3).to(device)
    return training_overhead(loader, model, device, sizes(), n_prebuilt=4)


# ---------------------------------------------------------------- asv classes


def _setup_cache() -> dict[str, str]:
    c.prune_runs()
    return {"run": c.new_run_token(), "store": str(bench_store())}


def _result(cache: dict, pipeline: str) -> dict:
    return c.measure_once(cache["run"], f"patches-{pipeline}-{PEER_WORKERS}",
                          lambda: measure(pipeline, Path(cache["store"])))


class PatchThroughput:
    """Augmented 3D patches/s and per CPU-second: hipseg and its peers, same workers and store."""

    params = [list(PIPELINES)]
    param_names = ["pipeline"]
    timeout = 900.0

    def setup_cache(self) -> dict[str, str]:
        return _setup_cache()

    setup_cache.timeout = 1800.0  # type: ignore[attr-defined]

    def setup(self, cache: dict, pipeline: str) -> None:
        if pipeline == "bgv2":
            try:
                import batchgeneratorsv2  # noqa: F401
            except ImportError as error:
                raise NotImplementedError(f"batchgeneratorsv2 is not installed ({error}); "
                                          "pip install -e '.[bench]'") from error

    def track_patches_per_s(self, cache: dict, pipeline: str) -> float:
        return _result(cache, pipeline)["patches_per_s"]

    track_patches_per_s.unit = "patches/s"  # type: ignore[attr-defined]

    def track_patches_per_core_s(self, cache: dict, pipeline: str) -> float:
        return _result(cache, pipeline)["patches_per_cpu_s"]

    track_patches_per_core_s.unit = "patches/CPU-s"  # type: ignore[attr-defined]


class PatchVsPeers:
    """hipseg (plain DataLoader) ÷ peer, patches per CPU-second (targets: 20x MONAI, 5x bgv2)."""

    params = [list(PEERS)]
    param_names = ["peer"]
    timeout = 900.0

    def setup_cache(self) -> dict[str, str]:
        return _setup_cache()

    setup_cache.timeout = 1800.0  # type: ignore[attr-defined]

    def setup(self, cache: dict, peer: str) -> None:
        PatchThroughput().setup(cache, peer)

    def track_ratio_per_core(self, cache: dict, peer: str) -> float:
        ours = _result(cache, "hipseg-dataloader")
        return ours["patches_per_cpu_s"] / _result(cache, peer)["patches_per_cpu_s"]

    track_ratio_per_core.unit = "x"  # type: ignore[attr-defined]

    def track_ratio_wall(self, cache: dict, peer: str) -> float:
        ours = _result(cache, "hipseg-dataloader")
        return ours["patches_per_s"] / _result(cache, peer)["patches_per_s"]

    track_ratio_wall.unit = "x"  # type: ignore[attr-defined]


class PatchTrainingOverhead:
    """unet3d steps/s with PatchLoader ÷ with prebuilt batches (target >= 0.97)."""

    params = [[0, 1]]
    param_names = ["workers"]
    timeout = 1800.0

    def setup_cache(self) -> dict[str, str]:
        return _setup_cache()

    setup_cache.timeout = 1800.0  # type: ignore[attr-defined]

    def _result(self, cache: dict, workers: int) -> dict:
        return c.measure_once(cache["run"], f"patch-overhead-{c.device_name()}-{workers}",
                              lambda: measure_training(Path(cache["store"]), workers))

    def track_overhead_ratio(self, cache: dict, workers: int) -> float:
        return self._result(cache, workers)["overhead_ratio"]

    track_overhead_ratio.unit = "ratio"  # type: ignore[attr-defined]

    def track_steps_per_s_loader(self, cache: dict, workers: int) -> float:
        return self._result(cache, workers)["steps_per_s_loader"]

    track_steps_per_s_loader.unit = "steps/s"  # type: ignore[attr-defined]

    def track_steps_per_s_prebuilt(self, cache: dict, workers: int) -> float:
        return self._result(cache, workers)["steps_per_s_prebuilt"]

    track_steps_per_s_prebuilt.unit = "steps/s"  # type: ignore[attr-defined]


# ---------------------------------------------------------------- script


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", help=f"a converted store (default: ${STORE_ENV} or the suite's data)")
    parser.add_argument("--quick", action="store_true", help="short measurements")
    parser.add_argument("--pipelines", nargs="+", default=list(PIPELINES), choices=PIPELINES)
    parser.add_argument("--training-workers", type=int, nargs="*", default=[0, 1])
    args = parser.parse_args(argv)
    if args.quick:
        os.environ[c.QUICK_ENV] = "1"
    if args.store:
        os.environ[STORE_ENV] = args.store
    store = bench_store()
    print(f"store: {store}   ({c.device_label('cpu')}), batch {BATCH_SIZE}, {PEER_WORKERS} workers")
    results = {}
    for pipeline in args.pipelines:
        r = results[pipeline] = measure(pipeline, store)
        print(f"{pipeline:18s} {r['patches_per_s']:8.2f} patches/s  {r['patches_per_cpu_s']:8.2f} "
              f"patches/CPU-s  (CPU busy {r['cpu_busy']:.2f})")
    ours = results.get("hipseg-dataloader")
    for peer, name in PEERS.items():
        if ours and peer in results:
            per_core = ours["patches_per_cpu_s"] / results[peer]["patches_per_cpu_s"]
            wall = ours["patches_per_s"] / results[peer]["patches_per_s"]
            print(f"hipseg (plain DataLoader) ÷ {name}: {per_core:.1f}x per core, {wall:.1f}x wall")
    for workers in args.training_workers:
        t = measure_training(store, workers)
        print(f"unet3d, {workers} workers: {t['steps_per_s_loader']:.3f} steps/s with PatchLoader, "
              f"{t['steps_per_s_prebuilt']:.3f} prebuilt -> overhead ratio {t['overhead_ratio']:.3f}")


if __name__ == "__main__":
    main()
