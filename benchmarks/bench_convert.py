"""Conversion benchmarks: NIfTI -> store throughput, memory and size; zarr codecs for the crops."""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import numpy as np

from benchmarks import _common as c

SOURCES = ("real", "head")


def source_folder(name: str) -> Path | None:
    """The Decathlon folder behind a source name, or None when it is not available here.

    ``real``: the real Task04_Hippocampus cases (see _common.real_task_dir);
    ``head``: seeded synthetic full-head volumes, 182x218x182 int16 (hipseg.synth preset "head").
    """
    if name == "real":
        return c.real_task_dir()
    if name == "head":
        return c.synthetic_dataset("head", c.scale().head_cases)
    raise ValueError(f"unknown conversion source {name!r}; expected one of {SOURCES}")


def _voxel_bytes(files: list[Path]) -> int:
    """Uncompressed bytes of the NIfTI arrays in their own dtype, from the headers alone."""
    import nibabel as nib

    total = 0
    for path in files:
        header = nib.load(path).header
        total += int(np.prod(header.get_data_shape())) * header.get_data_dtype().itemsize
    return total


def measure_conversion(source: Path, workers: int, out: Path, repeats: int = 1) -> dict:
    """Convert ``source`` ``repeats`` times from scratch: median time, peak memory of the tree."""
    from hipseg.convert import convert

    files = c.nifti_files(source)
    nifti_bytes = sum(p.stat().st_size for p in files)
    voxel_bytes = _voxel_bytes(files)
    seconds, peaks, increases = [], [], []
    for _ in range(repeats):
        for stale in (out, out.with_name(out.name + ".partial")):
            shutil.rmtree(stale, ignore_errors=True)
        with c.PeakTreeMemory() as memory:
            started = time.perf_counter()
            report = convert(source, out, workers=workers, progress=False, skip_bad=True)
            seconds.append(time.perf_counter() - started)
        peaks.append(memory.peak_mb)
        increases.append(memory.peak_mb - memory.baseline_mb)
    median = float(np.median(seconds))
    store_bytes = c.folder_bytes(out)
    return {
        "volumes": report.n_volumes,
        "skipped": len(report.skipped),
        "roi_shape": list(report.roi_shape),
        "seconds": median,
        "seconds_all": seconds,
        "workers": workers,
        "volumes_per_s": report.n_volumes / median,
        "nifti_mb": nifti_bytes / 1e6,
        "nifti_mb_per_s": nifti_bytes / 1e6 / median,
        "voxel_mb": voxel_bytes / 1e6,
        "voxel_mb_per_s": voxel_bytes / 1e6 / median,
        "store_mb": store_bytes / 1e6,
        "store_to_nifti": store_bytes / nifti_bytes,
        "peak_tree_rss_mb": float(max(peaks)),
        "peak_tree_rss_increase_mb": float(max(increases)),
    }


class ConvertThroughput:
    """``hipseg convert`` on the real cases and full-head synthetic volumes, 1 and 2 Dask workers.

    One conversion per (source, workers) per run, shared by all track methods
    (see _common.measure_once). Conversions start from no store, with the NIfTI
    files in the page cache after the first one (as on any second run).
    """

    params = [list(SOURCES), [1, 2]]
    param_names = ["source", "workers"]
    timeout = 3600.0

    def setup_cache(self) -> dict:
        c.prune_runs()
        folders = {}
        for name in SOURCES:
            folder = source_folder(name)
            folders[name] = str(folder) if folder is not None else None
        return {"run": c.new_run_token(), "folders": folders}

    setup_cache.timeout = 3600.0  # type: ignore[attr-defined]  # first run generates the head volumes

    def setup(self, cache: dict, source: str, workers: int) -> None:
        if cache["folders"][source] is None:
            raise NotImplementedError(
                f"no data for source {source!r} on this machine (set {c.REAL_ENV} or pass --data)"
            )

    def _result(self, cache: dict, source: str, workers: int) -> dict:
        out = c.cache_dir() / "convert-out" / f"{source}-w{workers}.zarr"
        out.parent.mkdir(parents=True, exist_ok=True)
        return c.measure_once(
            cache["run"],
            f"convert/{source}/{workers}",
            lambda: measure_conversion(
                Path(cache["folders"][source]), workers, out, c.scale().convert_repeats
            ),
        )

    def track_volumes_per_s(self, cache: dict, source: str, workers: int) -> float:
        return self._result(cache, source, workers)["volumes_per_s"]

    track_volumes_per_s.unit = "volumes/s"  # type: ignore[attr-defined]

    def track_nifti_mb_per_s(self, cache: dict, source: str, workers: int) -> float:
        """NIfTI files (compressed, as on disk) converted per second."""
        return self._result(cache, source, workers)["nifti_mb_per_s"]

    track_nifti_mb_per_s.unit = "MB/s"  # type: ignore[attr-defined]

    def track_voxel_mb_per_s(self, cache: dict, source: str, workers: int) -> float:
        """Uncompressed source voxels (their own dtype) converted per second."""
        return self._result(cache, source, workers)["voxel_mb_per_s"]

    track_voxel_mb_per_s.unit = "MB/s"  # type: ignore[attr-defined]

    def track_peak_memory_mb(self, cache: dict, source: str, workers: int) -> float:
        """Peak resident memory of this process and its Dask workers together."""
        return self._result(cache, source, workers)["peak_tree_rss_mb"]

    track_peak_memory_mb.unit = "MB"  # type: ignore[attr-defined]

    def track_store_mb(self, cache: dict, source: str, workers: int) -> float:
        return self._result(cache, source, workers)["store_mb"]

    track_store_mb.unit = "MB"  # type: ignore[attr-defined]

    def track_store_to_nifti_ratio(self, cache: dict, source: str, workers: int) -> float:
        """Store size / NIfTI size (images and labels, compressed files on disk)."""
        return self._result(cache, source, workers)["store_to_nifti"]

    track_store_to_nifti_ratio.unit = "ratio"  # type: ignore[attr-defined]


# ---------------------------------------------------------------- codecs for the image crops


def _codec_name(compressors: list) -> str:
    if not compressors:
        return "none"
    codec = compressors[0].to_dict()
    name, conf = codec["name"], codec.get("configuration", {})
    if name == "blosc":
        return f"blosc-{conf['cname']}-L{conf['clevel']}-{conf['shuffle']}"
    return f"{name}-L{conf.get('level', '?')}"


def codec_choices() -> dict[str, list]:
    """Candidate compressors for the ``images`` array, store.default_codec() first (marked so)."""
    import zarr.codecs

    from hipseg.store import default_codec

    blosc = zarr.codecs.BloscCodec
    default = [default_codec()]
    choices = {_codec_name(default) + " (default)": default}
    for compressors in (
        [blosc(cname="zstd", clevel=3, shuffle="shuffle")],
        [blosc(cname="lz4", clevel=5, shuffle="shuffle")],
        [blosc(cname="zstd", clevel=3, shuffle="bitshuffle")],
        [zarr.codecs.ZstdCodec(level=3)],
        [],
    ):
        name = _codec_name(compressors)
        if name != _codec_name(default):
            choices[name] = compressors
    return choices


def write_images(path: Path, images: np.ndarray, compressors: list, shard_volumes: int) -> None:
    """The images array in hipseg.store's layout (a chunk per volume, sharded), other codecs."""
    import zarr

    shutil.rmtree(path, ignore_errors=True)
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    array = group.create_array(
        "images",
        shape=images.shape,
        chunks=(1, *images.shape[1:]),
        shards=(shard_volumes, *images.shape[1:]),
        dtype=images.dtype,
        compressors=compressors,
        fill_value=0,
    )
    array[...] = images


class StoreCodecs:
    """Size and read speed of the store's image crops under several zarr codecs.

    The images of the benchmark's data (the real cases where present, else the
    built-in synthetic set) are rewritten with each codec in the store's own
    layout, so hipseg.store.default_codec is a measured choice.
    """

    params = [list(codec_choices())]
    param_names = ["codec"]
    timeout = 600.0

    def setup_cache(self) -> dict:
        from hipseg.store import open_store, volumes_per_shard

        source = c.real_task_dir() or c.training_source()[1]
        store = open_store(c.converted_store(source))
        images = np.asarray(store.images[...])
        shard_volumes = volumes_per_shard(store.roi_shape, store.n_volumes)
        paths = {}
        for name, compressors in codec_choices().items():
            path = c.cache_dir() / "codecs" / (re.sub(r"[^\w.-]+", "_", name).strip("_") + ".zarr")
            write_images(path, images, compressors, shard_volumes)
            paths[name] = str(path)
        return {
            "source": str(source),
            "paths": paths,
            "raw_bytes": images.nbytes,
            "shard_volumes": shard_volumes,
        }

    setup_cache.timeout = 1800.0  # type: ignore[attr-defined]

    def setup(self, cache: dict, codec: str) -> None:
        import zarr

        self.path = Path(cache["paths"][codec])
        self.array = zarr.open_group(str(self.path), mode="r")["images"]
        self.compressors = codec_choices()[codec]
        self.write_path = self.path.with_name(self.path.stem + "-write.zarr")
        self.images = self.array[...]  # for time_write_all
        self.rng = np.random.default_rng(0)

    def teardown(self, cache: dict, codec: str) -> None:
        shutil.rmtree(self.write_path, ignore_errors=True)

    def track_size_mb(self, cache: dict, codec: str) -> float:
        return c.folder_bytes(self.path) / 1e6

    track_size_mb.unit = "MB"  # type: ignore[attr-defined]

    def track_compression_ratio(self, cache: dict, codec: str) -> float:
        """Raw float16 bytes / bytes on disk."""
        return cache["raw_bytes"] / c.folder_bytes(self.path)

    track_compression_ratio.unit = "ratio"  # type: ignore[attr-defined]

    def time_read_all(self, cache: dict, codec: str) -> None:
        """What the loader's RAM cache does at start: every crop at once."""
        self.array[...]

    def time_read_32_volumes(self, cache: dict, codec: str) -> None:
        """32 crops one by one in random order: what a loader without a RAM cache does."""
        for index in self.rng.integers(0, self.array.shape[0], 32):
            self.array[int(index)]

    def time_write_all(self, cache: dict, codec: str) -> None:
        write_images(self.write_path, self.images, self.compressors, cache["shard_volumes"])
