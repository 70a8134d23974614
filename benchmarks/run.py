"""Run the asv benchmark classes in benchmarks/bench_*.py directly, without asv.

    python benchmarks/run.py [--quick] [--data PATH] [--device cpu|cuda] [--only RE] [--out DIR]

Calls each class's ``setup_cache`` / ``setup`` / ``teardown`` and its ``time_*``,
``track_*`` and ``peakmem_*`` methods over all ``params`` combinations, as asv
does (``NotImplementedError`` from a setup skips that combination). ``time_*``
methods are repeated and reported as medians; ``peakmem_*`` report the peak
resident memory of the whole process tree during the call. Prints a table,
writes ``results-<time>.json`` (with the machine description) and
``headlines-<time>.png`` into ``--out`` (default benchmarks/results/).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import itertools
import json
import math
import os
import re
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
KINDS = ("time", "track", "peakmem")
BENCH_PATTERN = re.compile(rf"^({'|'.join(KINDS)})_")

# Headline ratios for the chart and the summary: (panel title, benchmark-name regex). A benchmark
# method can also declare ``headline = "panel title"`` itself.
HEADLINE_PANELS = (
    "training steps/s ÷ T4 baseline (1000 steps/h)",
    "loader ÷ MONAI CacheDataset, slices/s per core",
    "loader overhead (real loader ÷ prebuilt batches)",
    "3D patches: hipseg ÷ peer, patches/s per core",
    "plain torch DataLoader ÷ MONAI CacheDataset, slices/s",
    "unet3d loader overhead (PatchLoader ÷ prebuilt batches)",
)
HEADLINE_PATTERNS = (
    (HEADLINE_PANELS[0], r"\.track_ratio_to_t4_baseline$"),
    (HEADLINE_PANELS[1], r"^bench_loader\.LoaderVsMonai\.track_ratio_to_monai_per_core$"),
    (HEADLINE_PANELS[2], r"^bench_loader\.LoaderOverhead\.track_overhead_ratio$"),
    (HEADLINE_PANELS[3], r"^bench_patches\.PatchVsPeers\.track_ratio_per_core$"),
    (HEADLINE_PANELS[4], r"^bench_loader\.PlainDataLoaderVsMonai\.track_ratio_to_monai_wall$"),
    (HEADLINE_PANELS[5], r"^bench_patches\.PatchTrainingOverhead\.track_overhead_ratio$"),
)


@dataclass
class Result:
    name: str  # module.Class.method
    kind: str
    params: dict[str, Any]
    status: str = "ok"  # ok, skipped, failed
    value: float | None = None
    unit: str = ""
    samples: list[float] = field(default_factory=list)
    seconds: float = 0.0
    message: str = ""
    headline: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


# ---------------------------------------------------------------- discovery


def discover(only: str | None) -> list[tuple[type, list[str]]]:
    """(class, [method names]) of each class in benchmarks/bench_*.py matching ``only``."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    pattern = re.compile(only) if only else None
    found = []
    for path in sorted((REPO / "benchmarks").glob("bench_*.py")):
        module = importlib.import_module(f"benchmarks.{path.stem}")
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ != module.__name__:
                continue
            methods = [
                m for m in sorted(vars(cls)) if BENCH_PATTERN.match(m) and callable(getattr(cls, m))
            ]
            methods = [m for m in methods if pattern is None or pattern.search(full_name(cls, m))]
            if methods:
                found.append((cls, methods))
    return found


def full_name(cls: type, method: str) -> str:
    return f"{cls.__module__.rsplit('.', 1)[-1]}.{cls.__name__}.{method}"


def param_grid(cls: type) -> tuple[list[str], list[tuple]]:
    params = getattr(cls, "params", None)
    if not params:
        return [], [()]
    if not isinstance(params[0], (list, tuple)):
        params = [params]
    names = list(getattr(cls, "param_names", None) or [f"param{i + 1}" for i in range(len(params))])
    return names, list(itertools.product(*params))


def headline_of(cls: type, method: str) -> str | None:
    declared = getattr(getattr(cls, method), "headline", None)
    if declared:
        return str(declared)
    name = full_name(cls, method)
    for panel, pattern in HEADLINE_PATTERNS:
        if re.search(pattern, name):
            return panel
    return None


# ---------------------------------------------------------------- running


def _time(function, args: tuple, repeats: int, number: int | None) -> list[float]:
    """Seconds per call: ``repeats`` samples, each the mean of ``number`` calls (auto: 0.05 s)."""
    started = time.perf_counter()
    function(*args)  # warm-up, and the size of one call
    once = time.perf_counter() - started
    number = number or max(1, math.ceil(0.05 / max(once, 1e-6)))
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(number):
            function(*args)
        samples.append((time.perf_counter() - started) / number)
    return samples


def run_method(
    instance: Any, cls: type, method: str, names: list[str], values: tuple, cache: Any, repeats: int
) -> Result:
    from benchmarks._common import PeakTreeMemory

    kind = method.split("_", 1)[0]
    function = getattr(instance, method)
    result = Result(
        full_name(cls, method),
        kind,
        dict(zip(names, values, strict=True)),
        unit=getattr(
            function, "unit", "seconds" if kind == "time" else "bytes" if kind == "peakmem" else ""
        ),
        headline=headline_of(cls, method),
    )
    args = ((cache,) if cache is not None else ()) + tuple(values)
    started = time.perf_counter()
    try:
        try:
            if hasattr(instance, "setup"):
                instance.setup(*args)
        except NotImplementedError as reason:
            result.status, result.message = "skipped", str(reason)
            return result
        try:
            if kind == "time":
                result.samples = _time(
                    function,
                    args,
                    repeats,
                    getattr(function, "number", None) or getattr(instance, "number", None),
                )
                result.value = statistics.median(result.samples)
            elif kind == "peakmem":
                with PeakTreeMemory() as memory:
                    function(*args)
                result.value = float(memory.peak)
            else:
                value = function(*args)
                result.value = None if value is None else float(value)
        finally:
            if hasattr(instance, "teardown"):
                instance.teardown(*args)
    except NotImplementedError as reason:
        result.status, result.message = "skipped", str(reason)
    except Exception as error:  # report and go on: one failing benchmark must not lose the others
        result.status = "failed"
        result.message = f"{type(error).__name__}: {error}"
        traceback.print_exc(file=sys.stderr)
    finally:
        result.seconds = time.perf_counter() - started
    return result


def _whole_class(cls: type, methods: list[str], status: str, message: str) -> list[Result]:
    """One result per method when a class cannot run at all (its setup_cache skipped or failed)."""
    results = [
        Result(full_name(cls, m), m.split("_", 1)[0], {}, status=status, message=message)
        for m in methods
    ]
    for result in results:
        print_row(result)
    return results


def run_all(found: list[tuple[type, list[str]]], repeats: int) -> list[Result]:
    results = []
    print(f"{'benchmark':58s} {'parameters':38s} {'value':>16s}", flush=True)
    for cls, methods in found:
        instance = cls()
        names, grid = param_grid(cls)
        cache = None
        if hasattr(instance, "setup_cache"):
            started = time.perf_counter()
            print(f"[{cls.__name__}] preparing data (setup_cache) ...", flush=True)
            try:
                cache = instance.setup_cache()
            except NotImplementedError as reason:
                results += _whole_class(cls, methods, "skipped", str(reason))
                continue
            except Exception as error:
                traceback.print_exc(file=sys.stderr)
                results += _whole_class(cls, methods, "failed", f"setup_cache: {error}")
                continue
            print(
                f"[{cls.__name__}] data ready in {time.perf_counter() - started:.1f} s", flush=True
            )
        skipped: dict[str, set] = {}
        for method in methods:
            for values in grid:
                result = run_method(instance, cls, method, names, values, cache, repeats)
                results.append(result)
                if result.status == "skipped":  # the same for every method: summarised below
                    skipped.setdefault(result.message, set()).add(values)
                else:
                    print_row(result)
        for reason, sets in skipped.items():
            print(f"{cls.__name__}: {len(sets)} parameter set(s) skipped: {reason}", flush=True)
    return results


# ---------------------------------------------------------------- reporting


def format_value(result: Result) -> str:
    if result.status != "ok":
        return result.status
    if result.value is None:
        return "-"
    v = result.value
    if result.kind == "time":
        for unit, factor in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
            if v >= factor:
                return f"{v / factor:.3g} {unit}"
        return f"{v * 1e9:.3g} ns"
    if result.kind == "peakmem" or result.unit == "bytes":
        return f"{v / 2**20:.1f} MiB"
    return f"{v:.4g} {result.unit}".strip()


def format_params(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items())


def print_row(result: Result) -> None:
    note = f"  ({result.message})" if result.message else ""
    print(
        f"{result.name:58s} {format_params(result.params):38s} {format_value(result):>16s}{note}",
        flush=True,
    )


def headline_rows(results: list[Result]) -> dict[str, list[tuple[str, float]]]:
    """{panel: [(label, ratio)]}, panels in HEADLINE_PANELS order, then any declared elsewhere."""
    panels: dict[str, list[tuple[str, float]]] = {}
    for r in results:
        if r.headline and r.status == "ok" and r.value is not None:
            label = ", ".join(f"{k}={v}" for k, v in r.params.items()) or r.name.rsplit(".", 1)[-1]
            panels.setdefault(r.headline, []).append((label, r.value))
    order = {title: i for i, title in enumerate(HEADLINE_PANELS)}
    return dict(sorted(panels.items(), key=lambda item: order.get(item[0], len(order))))


def print_summary(results: list[Result], machine: dict, device: str) -> None:
    from benchmarks._common import T4_BASELINE_STEPS_PER_S, device_label

    print("\n=== headline ratios ===")
    print(f"device: {device_label(device)}; T4 baseline = {T4_BASELINE_STEPS_PER_S:.4f} steps/s")
    panels = headline_rows(results)
    if not panels:
        print("(no headline benchmark ran)")
    for panel, rows in panels.items():
        print(f"{panel}:")
        for label, value in rows:
            print(f"  {label:50s} {value:8.2f}x")
    counts = {s: sum(r.status == s for r in results) for s in ("ok", "skipped", "failed")}
    print(
        f"\n{counts['ok']} measured, {counts['skipped']} skipped, {counts['failed']} failed; "
        f"cpu: {machine['cpu_model']} ({machine['cpu_usable_cores']} usable cores), "
        f"gpu: {(machine['gpu'] or {}).get('name', 'none')}"
    )


def plot_headlines(results: list[Result], path: Path, title: str) -> bool:
    """One horizontal bar panel per headline ratio, with parity (1x) marked; False if none ran."""
    panels = headline_rows(results)
    if not panels:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heights = [max(1.6, 0.45 * len(rows) + 1.0) for rows in panels.values()]
    fig, axes = plt.subplots(
        len(panels),
        1,
        figsize=(9, sum(heights)),
        gridspec_kw={"height_ratios": heights},
        squeeze=False,
    )
    for ax, (panel, rows) in zip(axes[:, 0], panels.items(), strict=True):
        labels = [label for label, _ in rows]
        values = [value for _, value in rows]
        bars = ax.barh(
            range(len(rows)), values, color=["tab:blue" if v >= 1 else "tab:orange" for v in values]
        )
        ax.set_yticks(range(len(rows)), labels, fontsize=8)
        ax.invert_yaxis()
        ax.axvline(1.0, color="k", lw=0.8, ls="--")
        ax.set_title(panel, fontsize=10)
        ax.bar_label(bars, labels=[f"{v:.2f}x" for v in values], fontsize=8, padding=2)
        ax.set_xlim(0, max(values + [1.0]) * 1.2)
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ---------------------------------------------------------------- command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="short run (< 5 minutes on 2 cores)")
    parser.add_argument(
        "--data",
        help="a Decathlon task folder to train and load from "
        "(default: built-in synthetic data); also the real conversion source",
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="training device")
    parser.add_argument(
        "--only", help="regex on module.Class.method, e.g. 'bench_train' or 'Convert'"
    )
    parser.add_argument(
        "--out", default=str(REPO / "benchmarks" / "results"), help="results folder"
    )
    parser.add_argument(
        "--repeat", type=int, help="samples per time_* benchmark (default 3 quick, 7 full)"
    )
    parser.add_argument(
        "--cache", help="folder for generated data and stores (default benchmarks/.cache)"
    )
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    return parser.parse_args(argv)


def configure_environment(args: argparse.Namespace) -> None:
    """Flags become the environment variables the benchmark modules read (as under asv)."""
    from benchmarks import _common as c

    if args.quick:
        os.environ[c.QUICK_ENV] = "1"
    else:
        os.environ.pop(c.QUICK_ENV, None)
    if args.data:
        data = Path(args.data).resolve()
        if not ((data / "dataset.json").is_file() or (data / "images").is_dir()):
            sys.exit(
                f"run.py: --data {args.data}: not a Decathlon task folder (no dataset.json); "
                "point at e.g. ../shared/data/Task04_Hippocampus"
            )
        os.environ[c.DATA_ENV] = str(data)
    if args.cache:
        os.environ[c.CACHE_ENV] = str(Path(args.cache).resolve())
    os.environ[c.DEVICE_ENV] = args.device
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            sys.exit(
                "run.py: --device cuda asked for but torch sees no CUDA device "
                f"(torch {torch.__version__}); run with --device cpu"
            )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    configure_environment(args)
    from benchmarks import _common as c

    found = discover(args.only)
    if args.list:
        for cls, methods in found:
            names, grid = param_grid(cls)
            described = ", ".join(names) or "-"
            for method in methods:
                print(f"{full_name(cls, method)}  ({len(grid)} parameter sets: {described})")
        return 0
    if not found:
        print(f"run.py: no benchmark matches --only {args.only!r}", file=sys.stderr)
        return 2

    scale = c.scale()
    machine = c.machine_info()
    repeats = args.repeat or scale.time_repeats
    print(
        f"hipseg benchmarks ({scale.name}; device {c.device_label(args.device)}; "
        f"data {os.environ.get(c.DATA_ENV, 'built-in synthetic')})",
        flush=True,
    )
    started = time.perf_counter()
    results = run_all(found, repeats)
    wall = time.perf_counter() - started
    print_summary(results, machine, args.device)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    record = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "wall_s": wall,
        "scale": scale.to_dict(),
        "args": vars(args),
        "device": args.device,
        "device_label": c.device_label(args.device),
        "data": os.environ.get(c.DATA_ENV) or "built-in synthetic",
        "t4_baseline_steps_per_s": c.T4_BASELINE_STEPS_PER_S,
        "machine": machine,
        "results": [r.to_dict() for r in results],
    }
    json_path = out / f"results-{stamp}.json"
    json_path.write_text(json.dumps(record, indent=2, default=str))
    png_path = out / f"headlines-{stamp}.png"
    title = (
        f"hipseg {scale.name} run on {c.device_label(args.device)}; "
        f"data: {Path(record['data']).name if args.data else 'built-in synthetic'}"
    )
    charted = plot_headlines(results, png_path, title)
    print(
        f"\nwall time {wall:.0f} s; results: {json_path}"
        + (f"; chart: {png_path}" if charted else "")
    )
    return 1 if any(r.status == "failed" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
