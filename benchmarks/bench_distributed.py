"""Beyond one process: data-parallel training against world size, conversion to an object store.

``DataParallelScaling``   ``torchrun --standalone --nproc_per_node=N -m hipseg train`` with one
                          torch thread per rank (gloo on CPU, NCCL on CUDA): steps/s and global
                          samples/s from the run's own metrics (warm-up interval dropped), and the
                          speed-up of N ranks over 1.
``ConvertToObjectStore``  ``hipseg convert`` of the same cases to local disk and to an S3 server
                          on 127.0.0.1 (moto's server, in its own process): volumes/s and the
                          ratio. moto keeps objects in memory, so this measures hipseg's client
                          path (s3fs, HTTP, one PUT per shard), not a real bucket's bandwidth.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import _common as c

WORLD_SIZES = (1, 2)
TARGETS = ("local", "s3-loopback")


# ---------------------------------------------------------------- data-parallel training


def measure_ddp(store: Path, world_size: int, steps_per_chunk: int, chunks: int) -> dict:
    """One torchrun training; the rate of every logged interval after the first (warm-up)."""
    device = c.device_name()
    with tempfile.TemporaryDirectory(prefix="hipseg-ddp-bench-") as folder:
        out = Path(folder) / "run"
        steps = steps_per_chunk * (chunks + 1)
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={world_size}", "-m", "hipseg", "train", str(store),
                   "--out", str(out), "--steps", str(steps), "--log-every", str(steps_per_chunk),
                   "--val-every", str(steps), "--checkpoint-every", str(steps), "--threads", "1",
                   "--workers", "0", "--device", device, "--quiet"]
        result = subprocess.run(command, capture_output=True, text=True, timeout=3600)
        if result.returncode != 0:
            raise RuntimeError(f"torchrun failed: {result.stderr[-2000:]}")
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        summary = json.loads((out / "run.json").read_text())
    rates = [r["steps_per_s"] for r in rows if r["kind"] == "train"][1:]
    samples = [r["samples_per_s"] for r in rows if r["kind"] == "train"][1:]
    return {"world_size": summary["world_size"], "steps_per_s": statistics.median(rates),
            "samples_per_s": statistics.median(samples), "intervals": rates, "device": device}


class DataParallelScaling:
    """Training speed against the number of torchrun processes (one torch thread each)."""

    params = [list(WORLD_SIZES)]
    param_names = ["world_size"]
    timeout = 3600.0

    def setup_cache(self) -> dict:
        c.prune_runs()
        _, source = c.training_source()
        return {"run": c.new_run_token(), "store": str(c.converted_store(source))}

    setup_cache.timeout = 1800.0  # type: ignore[attr-defined]

    def setup(self, cache: dict, world_size: int) -> None:
        if world_size > (os.cpu_count() or 1) and c.device_name() == "cpu":
            raise NotImplementedError(f"{world_size} ranks need {world_size} cores")

    def _result(self, cache: dict, world_size: int) -> dict:
        scale = c.scale()
        per_chunk = max(1, scale.train_steps // scale.train_chunks)
        return c.measure_once(cache["run"], f"ddp/{world_size}", lambda: measure_ddp(
            Path(cache["store"]), world_size, per_chunk, scale.train_chunks))

    def track_steps_per_s(self, cache: dict, world_size: int) -> float:
        """Optimizer steps per second (each step: one batch per rank)."""
        return self._result(cache, world_size)["steps_per_s"]

    track_steps_per_s.unit = "steps/s"  # type: ignore[attr-defined]

    def track_samples_per_s(self, cache: dict, world_size: int) -> float:
        """Training samples per second over all ranks (batch size x world size x steps/s)."""
        return self._result(cache, world_size)["samples_per_s"]

    track_samples_per_s.unit = "samples/s"  # type: ignore[attr-defined]

    def track_samples_speedup_vs_one_rank(self, cache: dict, world_size: int) -> float:
        """Global samples/s of this world size / that of one process, measured in the same run."""
        return (self._result(cache, world_size)["samples_per_s"]
                / self._result(cache, 1)["samples_per_s"])

    track_samples_speedup_vs_one_rank.unit = "ratio"  # type: ignore[attr-defined]


# ---------------------------------------------------------------- conversion to an object store


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class _LoopbackS3:
    """moto's S3 server in its own process on 127.0.0.1, with one bucket."""

    def __enter__(self) -> _LoopbackS3:
        port = _free_port()
        self.endpoint = f"http://127.0.0.1:{port}"
        self.process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                                         "-p", str(port)], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        self.options = {"endpoint_url": self.endpoint, "key": "bench", "secret": "bench"}
        import s3fs

        fs = s3fs.S3FileSystem(skip_instance_cache=True, **self.options)
        deadline = time.monotonic() + 60
        while True:
            try:
                fs.mkdir("bench")
                return self
            except Exception:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise
                time.sleep(0.2)

    def __exit__(self, *exc: object) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


def measure_convert_target(source: Path, target: str, workers: int) -> dict:
    from hipseg.convert import convert

    if target == "local":
        with tempfile.TemporaryDirectory(prefix="hipseg-convert-bench-") as folder:
            started = time.perf_counter()
            report = convert(source, Path(folder) / "x.zarr", workers=workers, progress=False,
                             skip_bad=True)
            seconds = time.perf_counter() - started
    else:
        with _LoopbackS3() as server:
            started = time.perf_counter()
            report = convert(source, "s3://bench/x.zarr", workers=workers, progress=False,
                             skip_bad=True, storage_options=server.options)
            seconds = time.perf_counter() - started
    return {"seconds": seconds, "volumes": report.n_volumes, "volumes_per_s": report.n_volumes / seconds}


class ConvertToObjectStore:
    """``hipseg convert`` of the training cases to local disk and to a loopback S3 server, 2 workers."""

    params = [list(TARGETS)]
    param_names = ["target"]
    timeout = 3600.0

    def setup_cache(self) -> dict:
        _, source = c.training_source()
        return {"run": c.new_run_token(), "source": str(source)}

    def setup(self, cache: dict, target: str) -> None:
        if target != "local":
            try:
                import moto.server  # noqa: F401
                import s3fs  # noqa: F401
            except ImportError as error:
                raise NotImplementedError(f"needs the dev extra (s3fs, moto[server]): {error}") from None

    def _result(self, cache: dict, target: str) -> dict:
        return c.measure_once(cache["run"], f"convert-target/{target}",
                              lambda: measure_convert_target(Path(cache["source"]), target, 2))

    def track_volumes_per_s(self, cache: dict, target: str) -> float:
        return self._result(cache, target)["volumes_per_s"]

    track_volumes_per_s.unit = "volumes/s"  # type: ignore[attr-defined]

    def track_ratio_to_local_disk(self, cache: dict, target: str) -> float:
        """Volumes/s to this target / to local disk, measured in the same run."""
        return self._result(cache, target)["volumes_per_s"] / self._result(cache, "local")["volumes_per_s"]

    track_ratio_to_local_disk.unit = "ratio"  # type: ignore[attr-defined]
