"""Shared benchmark helpers: settings, seeded cached data, machine description, process-tree memory.

Everything here is used both by asv (which imports the bench_* modules in fresh
processes) and by ``benchmarks/run.py`` (which calls the same classes in one
process). Settings therefore travel in environment variables, which run.py sets
from its flags and an asv user sets by hand:

==========================  ====================================================
``HIPSEG_BENCH_QUICK=1``    short run: fewer full-head volumes, fewer steps
``HIPSEG_BENCH_DATA``       a Decathlon task folder to train and load from
                            (default: built-in synthetic data)
``HIPSEG_BENCH_DEVICE``     ``cpu`` (default) or ``cuda``
``HIPSEG_BENCH_CACHE``      where generated data and stores are kept
                            (default ``benchmarks/.cache``)
``HIPSEG_DATA``             folder holding ``Task04_Hippocampus`` (or the task
                            folder itself) for the real-data conversion
                            benchmark; default ``../shared/data``
==========================  ====================================================
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parents[1]
QUICK_ENV = "HIPSEG_BENCH_QUICK"
DATA_ENV = "HIPSEG_BENCH_DATA"
DEVICE_ENV = "HIPSEG_BENCH_DEVICE"
CACHE_ENV = "HIPSEG_BENCH_CACHE"
REAL_ENV = "HIPSEG_DATA"
REAL_TASK = "Task04_Hippocampus"

# The seed project's training speed: 1000 steps per hour on an NVIDIA T4.
T4_BASELINE_STEPS_PER_HOUR = 1000.0
T4_BASELINE_STEPS_PER_S = T4_BASELINE_STEPS_PER_HOUR / 3600.0

LIBRARIES = (
    "hipseg",
    "numpy",
    "torch",
    "monai",
    "zarr",
    "numcodecs",
    "numba",
    "dask",
    "distributed",
    "nibabel",
    "scipy",
    "psutil",
    "asv",
)


# ---------------------------------------------------------------- settings


@dataclass(frozen=True)
class Scale:
    """How much work one run does; ``--quick`` picks the small one."""

    name: str
    synth_cases: int  # built-in training/loading data set (crop-sized, like the real cases)
    head_cases: int  # full-head 182x218x182 int16 volumes for the conversion benchmark
    convert_repeats: int
    warmup_steps: int  # training steps run before timing (worker start, JIT, caches)
    train_steps: int  # timed training steps, in train_chunks chunks (median of chunk rates)
    train_chunks: int
    time_repeats: int  # samples per time_* benchmark in run.py

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


QUICK = Scale(
    "quick",
    synth_cases=200,
    head_cases=4,
    convert_repeats=1,
    warmup_steps=2,
    train_steps=9,
    train_chunks=3,
    time_repeats=3,
)
FULL = Scale(
    "full",
    synth_cases=200,
    head_cases=200,
    convert_repeats=1,
    warmup_steps=10,
    train_steps=100,
    train_chunks=5,
    time_repeats=7,
)


def is_quick() -> bool:
    return os.environ.get(QUICK_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def scale() -> Scale:
    return QUICK if is_quick() else FULL


def device_name() -> str:
    """The torch device the training benchmarks run on: ``cpu`` or ``cuda``."""
    name = os.environ.get(DEVICE_ENV, "cpu").strip().lower() or "cpu"
    if name not in {"cpu", "cuda"}:
        raise ValueError(f"{DEVICE_ENV}={name!r}: expected cpu or cuda")
    return name


def require_device() -> str:
    """The configured device, or a benchmark skip (NotImplementedError, asv's convention)."""
    name = device_name()
    if name == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise NotImplementedError(f"{DEVICE_ENV}=cuda but torch sees no CUDA device")
    return name


def cache_dir() -> Path:
    path = Path(os.environ.get(CACHE_ENV) or REPO / "benchmarks" / ".cache")
    path.mkdir(parents=True, exist_ok=True)
    return path


# ---------------------------------------------------------------- data


def _digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:12]


def synthetic_dataset(preset_name: str, n_cases: int, seed: int = 0) -> Path:
    """A seeded hipseg.synth data set, generated once and kept in the cache.

    Built in a temporary folder and renamed into place, so an interrupted build
    is never mistaken for a finished one.
    """
    from hipseg.synth import make_dataset, preset

    config = preset(preset_name, n_cases=n_cases, seed=seed)
    path = cache_dir() / "data" / f"synth-{preset_name}-{n_cases}-{_digest(config.to_dict())}"
    if (path / "dataset.json").exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.partial{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    make_dataset(partial, config, progress=False)
    try:
        os.replace(partial, path)
    except OSError:  # another process finished the same data set first
        shutil.rmtree(partial, ignore_errors=True)
    return path


def _is_task_folder(path: Path) -> bool:
    return (path / "dataset.json").is_file() or (
        (path / "images").is_dir() and (path / "labels").is_dir()
    )


def real_task_dir() -> Path | None:
    """The real Decathlon task for the conversion benchmark, or None if it is not on this machine.

    ``HIPSEG_BENCH_DATA`` (run.py ``--data``) wins; otherwise ``$HIPSEG_DATA`` (the folder holding
    Task04_Hippocampus, as in the tests, or the task folder itself), default ``../shared/data``.
    """
    given = os.environ.get(DATA_ENV)
    if given:
        return Path(given).resolve()
    root = Path(os.environ.get(REAL_ENV) or REPO.parent / "shared" / "data")
    for candidate in (root, root / REAL_TASK):
        if (candidate / "dataset.json").is_file():
            return candidate.resolve()
    return None


def training_source() -> tuple[str, Path]:
    """(label, folder) of the data the loader and training benchmarks use.

    ``HIPSEG_BENCH_DATA`` (run.py ``--data``) if set, else the built-in synthetic data set
    (``hipseg.synth`` preset "crop", crop-sized volumes like the real ones).
    """
    given = os.environ.get(DATA_ENV)
    if given:
        path = Path(given).resolve()
        if not _is_task_folder(path):
            raise FileNotFoundError(
                f"{DATA_ENV}={given}: not a Decathlon task folder "
                "(no dataset.json) nor a folder with images/ and labels/"
            )
        return path.name, path
    return "synthetic", synthetic_dataset("crop", scale().synth_cases)


def converted_store(source: Path, workers: int = 1) -> Path:
    """The store converted from ``source``, kept in the cache.

    hipseg.convert recognises an up-to-date store by its fingerprint (inputs and
    options) and returns at once, so calling this again costs a metadata read.
    """
    from hipseg.convert import convert

    source = Path(source).resolve()
    path = cache_dir() / "stores" / f"{source.name}-{_digest(str(source))}.zarr"
    path.parent.mkdir(parents=True, exist_ok=True)
    convert(source, path, workers=workers, skip_bad=True, overwrite=True, progress=False)
    return path


def nifti_files(source: Path) -> list[Path]:
    """The NIfTI files of a task folder (images and labels)."""
    files = []
    for folder in ("imagesTr", "labelsTr", "images", "labels"):
        if (source / folder).is_dir():
            files += [
                p
                for p in sorted((source / folder).iterdir())
                if p.name.endswith((".nii", ".nii.gz"))
            ]
    return files


def folder_bytes(path: Path) -> int:
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def decathlon_pairs(source: Path) -> list[dict[str, str]]:
    """[{"image": path, "label": path}] of a task folder, as MONAI pipelines take them."""
    from hipseg.discovery import discover

    sources, _, _ = discover(source)
    return [{"image": s.image, "label": s.label} for s in sources if s.image and s.label]


# ---------------------------------------------------------------- measuring once per run

_MEMO: dict[tuple[str, str], dict] = {}


def new_run_token() -> str:
    """Identifies one benchmark run; setup_cache returns it so every method of a class shares it."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"


def measure_once(run_token: str, key: str, measure: Callable[[], dict]) -> dict:
    """Run an expensive measurement once per run and share it among track_* methods.

    asv calls each track method in a fresh process, so the result is also kept on
    disk under the run's token (run.py's single process uses the in-memory copy).
    A new run has a new token, so every run measures afresh.
    """
    memo_key = (run_token, key)
    if memo_key in _MEMO:
        return _MEMO[memo_key]
    folder = cache_dir() / "runs" / run_token
    path = folder / (hashlib.sha256(key.encode()).hexdigest()[:16] + ".json")
    if path.exists():
        result = json.loads(path.read_text())["result"]
    else:
        result = measure()
        folder.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(path.name + f".tmp{os.getpid()}")
        temporary.write_text(json.dumps({"key": key, "result": result}))
        os.replace(temporary, path)
    _MEMO[memo_key] = result
    return result


def prune_runs(keep_days: float = 2.0) -> None:
    """Remove measurement folders of runs older than ``keep_days``."""
    runs = cache_dir() / "runs"
    if not runs.is_dir():
        return
    limit = time.time() - keep_days * 86400
    for folder in runs.iterdir():
        if folder.is_dir() and folder.stat().st_mtime < limit:
            shutil.rmtree(folder, ignore_errors=True)


# ---------------------------------------------------------------- memory of a process tree


def tree_rss(process: psutil.Process) -> int:
    """Resident bytes of a process and all its descendants (loader workers, Dask workers).

    Pages shared between processes (copy-on-write after fork, shared memory) are
    counted once per process, so this is an upper bound on physical memory.
    """
    total = 0
    for p in [process, *process.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue  # exited between listing and reading
    return total


class PeakTreeMemory:
    """Samples :func:`tree_rss` in a background thread; ``peak`` is the largest sample.

    Usage::

        with PeakTreeMemory() as memory:
            work()
        memory.peak_mb, memory.baseline_mb
    """

    def __init__(self, pid: int | None = None, interval_s: float = 0.05) -> None:
        self.process = psutil.Process(pid or os.getpid())
        self.interval_s = interval_s
        self.baseline = 0
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="peak-tree-memory", daemon=True)

    def _sample(self) -> None:
        while True:
            self.peak = max(self.peak, tree_rss(self.process))
            if self._stop.wait(self.interval_s):
                break

    def __enter__(self) -> PeakTreeMemory:
        self.baseline = tree_rss(self.process)
        self.peak = self.baseline
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, tree_rss(self.process))

    @property
    def peak_mb(self) -> float:
        return self.peak / 2**20

    @property
    def baseline_mb(self) -> float:
        return self.baseline / 2**20


# ---------------------------------------------------------------- machine description


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if platform.system() == "Darwin":
        try:
            return subprocess.run(
                ["sysctl", "-n", "machdep.cpu.brand_string"],
                capture_output=True,
                text=True,
                timeout=5,
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine()


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _cgroup_cpu_limit() -> float | None:
    """CPUs a container may use (cgroup v2 cpu.max), which sched_getaffinity does not show."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        return None


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
        )
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def gpu_info() -> dict[str, Any] | None:
    """Name, memory and compute capability of CUDA device 0, or None without CUDA."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return {
        "name": props.name,
        "memory_gb": round(props.total_memory / 1e9, 1),
        "capability": f"{props.major}.{props.minor}",
        "count": torch.cuda.device_count(),
        "cuda": torch.version.cuda,
    }


def machine_info() -> dict[str, Any]:
    """Everything a reader needs to place a result: CPU, cores, memory, GPU, library versions."""
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    import torch

    return {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": _cpu_model(),
        "cpu_logical_cores": psutil.cpu_count(logical=True),
        "cpu_physical_cores": psutil.cpu_count(logical=False),
        "cpu_usable_cores": _usable_cores(),
        "cpu_cgroup_limit": _cgroup_cpu_limit(),
        "torch_threads": torch.get_num_threads(),
        "ram_gb": round(psutil.virtual_memory().total / 1e9, 1),
        "gpu": gpu_info(),
        "versions": versions,
        "git_commit": _git_commit(),
    }


def device_label(device: str) -> str:
    """Name of the device a result was measured on: 'cuda: <GPU>' or 'cpu: N cores of <CPU>'."""
    if device == "cuda":
        info = gpu_info()
        return f"cuda: {info['name']}" if info else "cuda: (unavailable)"
    return f"cpu: {_usable_cores()} cores of {_cpu_model()}"
