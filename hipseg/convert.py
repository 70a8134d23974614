"""Conversion: NIfTI cases -> one Zarr store, in parallel on Dask, resumable after any interruption.

Two passes over the cases. The first validates every case and finds its label's
bounding box, which fixes the store's ROI shape and each crop's offset (the plan).
The second normalises, crops and writes whole shards, one Dask task per shard,
so no two tasks ever write the same file.

Crash safety: all work happens in ``DST.partial/`` (plan, one JSON file per
finished shard, the store itself); the finished store is moved to ``DST`` with
one atomic rename. A killed run leaves no ``DST`` and a ``DST.partial/`` that the
next run of the same command picks up where it stopped.

At a URL (``s3://bucket/x.zarr``; object stores have no rename) the store is written
in place at ``DST`` and the plan and shard records under the prefix ``DST.partial/``;
every object is one PUT, so none is ever half-written, and the store's ``hipseg``
attribute, written last, is what makes it a store: ``open_store`` refuses ``DST``
until the conversion completed. Workers on any machine write their shards
straight to the bucket; no shared filesystem is needed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from hipseg import __version__, storage, store
from hipseg.discovery import CaseSource, discover
from hipseg.errors import ConfigError, InputError, SkippedCasesError, StoreExistsError
from hipseg.hemispheres import parse_label_map, split_sources
from hipseg.nifti import load_case
from hipseg.preprocess import crop, derive_roi_shape, label_bbox, normalise_intensity, roi_offset
from hipseg.safety import check_not_input, is_hipseg_store, owned_by_hipseg

PLAN = "plan.json"
BLOCKS = "blocks"
STORE = "store.zarr"
HEMISPHERES = "hemispheres"  # --label-map: the hemisphere crops the conversion reads


@dataclass
class ConvertReport:
    path: Path | str  # a URL stays a string
    n_volumes: int
    roi_shape: tuple[int, int, int]
    skipped: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    resumed_blocks: int = 0
    up_to_date: bool = False

    def summary(self) -> str:
        lines = [
            f"{self.path}: {self.n_volumes} volumes, ROI {'x'.join(map(str, self.roi_shape))}"
            + (" (already up to date)" if self.up_to_date else f", {self.seconds:.1f} s")
        ]
        if self.resumed_blocks:
            lines.append(f"resumed: {self.resumed_blocks} shard(s) were already done")
        for s in self.skipped:
            lines.append(f"skipped {s['case']}: {s['reason']}")
        return "\n".join(lines)


# ---------------------------------------------------------------- discovery


# ---------------------------------------------------------------- per-case work (runs on workers)


def scan_case(source: CaseSource, n_classes: int) -> dict:
    """Pass 1: validate a case and return its canonical shape and label bounding box."""
    if source.image is None:
        return {"case": source.case_id, "reason": f"label without an image ({source.label})"}
    if source.label is None:
        return {"case": source.case_id, "reason": f"image without a label ({source.image})"}
    try:
        case = load_case(source.image, source.label, n_classes)
    except InputError as error:
        return {"case": source.case_id, "reason": str(error)}
    box = label_bbox(case.label)
    if box is None:
        return {"case": source.case_id, "reason": f"{source.label}: label has no hippocampus voxels"}
    return {
        "case": source.case_id,
        "shape": list(case.image.shape),
        "start": box[0].tolist(),
        "stop": box[1].tolist(),
    }


def convert_block(
    work: str,
    start: int,
    entries: Sequence[dict],
    roi_shape: Sequence[int],
    class_names: Sequence[str],
    target: str | None = None,
    storage_options: dict | None = None,
) -> int:
    """Pass 2: crop and write one shard, then record it as done (the record is the commit).

    ``work`` and ``target`` (the store being written; default ``work/store.zarr``) are local
    paths or URLs; ``storage_options`` reach the URL's filesystem.
    """
    images = np.zeros((len(entries), *roi_shape), dtype=store.IMAGE_DTYPE)
    labels = np.zeros((len(entries), *roi_shape), dtype=store.LABEL_DTYPE)
    volumes, counts, foreground = [], [], []
    for i, entry in enumerate(entries):
        case = load_case(entry["image"], entry["label"], len(class_names))
        normalised, lo, hi = normalise_intensity(case.image)
        offset = np.asarray(entry["offset"])
        images[i] = crop(normalised, offset, roi_shape)
        labels[i] = crop(case.label, offset, roi_shape)
        counts.append(
            {axis: c.tolist() for axis, c in store.slice_counts(labels[i], len(class_names)).items()}
        )
        foreground.append(store.foreground_samples(labels[i], len(class_names)).tolist())
        volumes.append(
            {
                "case_id": entry["case_id"],  # the discovered id (channel suffix stripped)
                "image_path": case.image_path,
                "label_path": case.label_path,
                "original_shape": list(case.original_shape),
                "canonical_shape": list(case.image.shape),
                "affine": case.affine.tolist(),
                "spacing": list(case.spacing),
                "axcodes": list(case.axcodes),
                "source_dtype": case.source_dtype,
                "crop_offset": offset.tolist(),
                "normalisation": {"low": lo, "high": hi},
                "class_voxels": np.bincount(case.label.ravel(), minlength=len(class_names)).tolist(),
                "sha256": {"image": case.image_sha256, "label": case.label_sha256},
            }
        )
        if "hemisphere" in entry:
            volumes[-1]["hemisphere"] = entry["hemisphere"]
    group = storage.open_group(target or storage.join(work, STORE), "r+", storage_options)
    store.write_block(group, start, images, labels)
    record = {"volumes": volumes, "counts": counts, "foreground": foreground}
    storage.write_json(_block_record(work, start), record, storage_options)
    return start


def _block_record(work: str, start: int) -> str:
    return storage.join(work, BLOCKS, f"{start:08d}.json")


def _convert_block_args(args: tuple) -> int:
    return convert_block(*args)


# ---------------------------------------------------------------- helpers


def _fingerprint(sources: Sequence[CaseSource], options: dict) -> str:
    """Identity of a conversion: inputs (path, size, mtime) and options, for resume and reruns."""
    digest = hashlib.sha256(json.dumps(options, sort_keys=True).encode())
    for s in sources:
        for path in (s.image, s.label):
            stat = os.stat(path) if path and os.path.exists(path) else None
            digest.update(
                f"{path}|{stat.st_size if stat else -1}|{stat.st_mtime_ns if stat else -1}\n".encode()
            )
    return digest.hexdigest()


def _parse_roi(roi: Sequence[int] | str | None) -> tuple[int, int, int] | None:
    if roi is None:
        return None
    values = [int(v) for v in roi.lower().split("x")] if isinstance(roi, str) else [int(v) for v in roi]
    if len(values) != 3 or min(values) < 8:
        raise ConfigError(f"ROI must be three sizes of at least 8 voxels like 48x64x48, got {roi!r}")
    return tuple(values)  # type: ignore[return-value]


class _Runner:
    """Runs tasks in-process (one worker) or on a dask.distributed cluster, with a progress bar."""

    def __init__(self, workers: int, scheduler: str | None, progress: bool) -> None:
        self.progress = progress
        self.client = None
        self.cluster = None
        if scheduler:
            from distributed import Client

            self.client = Client(scheduler)
        elif workers > 1:
            from distributed import Client, LocalCluster

            # Threads, not processes: NIfTI decompression (zlib) and the numpy work release the
            # GIL, and on the benchmark machine threads were faster (200 full heads: 40.9 s vs
            # 49.2 s with 2 processes) and need no `if __name__ == "__main__"` guard in a user's
            # script. Peak memory stays bounded by workers x one volume.
            self.cluster = LocalCluster(
                n_workers=workers, threads_per_worker=1, processes=False, dashboard_address=None
            )
            self.client = Client(self.cluster)

    def map(self, function: Callable, items: Sequence, description: str, stop_early=None) -> Iterable:
        bar = tqdm(total=len(items), desc=description, unit="task", disable=not self.progress)
        try:
            if self.client is None:
                for item in items:
                    result = function(item)
                    bar.update()
                    yield result
                    if stop_early and stop_early(result):
                        return
            else:
                from distributed import as_completed

                futures = [self.client.submit(function, item, pure=False) for item in items]
                for future in as_completed(futures):
                    result = future.result()
                    bar.update()
                    yield result
                    if stop_early and stop_early(result):
                        for f in futures:
                            f.cancel()
                        return
        finally:
            bar.close()

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
        if self.cluster is not None:
            self.cluster.close()


# ---------------------------------------------------------------- the conversion


def _plan(sources, class_names, roi, margin, runner, strict, fingerprint) -> dict:
    """Pass 1: validate every case, then fix the ROI shape, offsets and shard size."""
    n_classes = len(class_names)
    scans = {}
    for result in runner.map(
        partial(scan_case, n_classes=n_classes),
        sources,
        "checking cases",
        stop_early=(lambda r: "reason" in r) if strict else None,
    ):
        scans[result["case"]] = result
    skipped = [scans[s.case_id] for s in sources if "reason" in scans.get(s.case_id, {})]
    if strict and skipped:
        raise InputError(skipped[0]["case"], skipped[0]["reason"])
    good = [s for s in sources if s.case_id in scans and "reason" not in scans[s.case_id]]
    extents = [np.subtract(scans[s.case_id]["stop"], scans[s.case_id]["start"]) for s in good]
    roi_shape = roi or (derive_roi_shape(extents, margin) if extents else (16, 16, 16))
    entries = []
    for source, extent in zip(good, extents):
        if np.any(extent > np.asarray(roi_shape)):
            skipped.append(
                {
                    "case": source.case_id,
                    "reason": f"labelled region {tuple(int(e) for e in extent)} "
                    f"does not fit the ROI {roi_shape}; give a larger --roi",
                }
            )
            continue
        scan = scans[source.case_id]
        offset = roi_offset(np.asarray(scan["start"]), np.asarray(scan["stop"]), roi_shape)
        entries.append(
            {
                "case_id": source.case_id,
                "image": source.image,
                "label": source.label,
                "offset": offset.tolist(),
            }
        )
    return {
        "fingerprint": fingerprint,
        "roi_shape": list(roi_shape),
        "entries": entries,
        "skipped": skipped,
        "class_names": list(class_names),
    }


def _finalise(work: str, plan: dict, shard: int, source: str, target: str, options: dict) -> None:
    volumes, per_axis, foreground = [], {axis: [] for axis in store.AXIS_NAMES}, []
    group = storage.open_group(target, "r+", options)
    for start in range(0, len(plan["entries"]), shard):
        block = storage.read_json(_block_record(work, start), options)
        volumes.extend(block["volumes"])
        if "foreground" in block:
            foreground.extend(np.asarray(f, np.int32).reshape(-1, 4) for f in block["foreground"])
        else:  # a block recorded by a hipseg before the foreground table: read its labels back
            n_classes = len(plan["class_names"])
            foreground.extend(
                store.foreground_samples(np.asarray(group[store.LABELS][v]), n_classes)
                for v in range(start, start + len(block["volumes"]))
            )
        for counts in block["counts"]:
            for axis in store.AXIS_NAMES:
                per_axis[axis].append(np.asarray(counts[axis], dtype=np.int32))
    store.write_slice_tables(group, {axis: store.build_slice_table(c) for axis, c in per_axis.items()})
    store.write_foreground_table(group, store.build_foreground_table(foreground))
    info = store.StoreInfo(
        format_version=store.FORMAT_VERSION,
        class_names=tuple(plan["class_names"]),
        roi_shape=tuple(plan["roi_shape"]),
        n_volumes=len(volumes),
        normalisation=store.NORMALISATION,
        skipped=tuple(plan["skipped"]),
        source=source,
    )
    # Written last: a store whose attributes exist is complete.
    group.attrs.update(
        {
            "hipseg": {**info.to_dict(), "fingerprint": plan["fingerprint"], "hipseg_version": __version__},
            "volumes": volumes,
        }
    )


def _is_partial_run(path: Path) -> bool:
    # HEMISPHERES alone: a --label-map run stopped before its plan was written.
    return any((path / name).exists() for name in (PLAN, STORE, BLOCKS, HEMISPHERES))


def _existing_fingerprint(location: str, options: dict) -> str | None:
    try:
        return dict(storage.open_group(location, "r", options).attrs)["hipseg"].get("fingerprint")
    except Exception:  # not a (complete) hipseg store
        return None


def convert(
    src: str | Path,
    dst: str | Path,
    *,
    roi: Sequence[int] | str | None = None,
    margin: int = 4,
    workers: int | None = None,
    scheduler: str | None = None,
    skip_bad: bool = False,
    strict: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    shard_volumes: int | None = None,
    storage_options: dict | None = None,
    label_map: str | dict[int, int] | None = None,
) -> ConvertReport:
    """Convert a Decathlon task folder, or images/ + labels/ folders, into one Zarr store.

    Parameters
    ----------
    src, dst
        Source folder, and destination store: a local path or an fsspec URL
        (``s3://bucket/x.zarr``; see :mod:`hipseg.storage`).
    roi
        Fixed ROI shape (canonical X, Y, Z), e.g. ``"48x64x48"``; derived from the labels if None.
    margin
        Voxels added around each label's bounding box when deriving the ROI.
    workers, scheduler
        Local Dask workers, threads of one in-process cluster (default: all cores, at most 4;
        1 runs without Dask), or the address of an existing dask.distributed scheduler.
    skip_bad, strict
        Bad cases are always skipped and listed; without ``skip_bad`` the conversion raises
        :class:`SkippedCasesError` at the end when any was skipped; ``strict`` stops at the first.
    overwrite
        Replace an existing store at ``dst`` (the old one is removed only once the new one is in place).
    shard_volumes
        Volumes per shard (and per task); by default about 4 MiB of image crops and at most 16
        volumes (:func:`hipseg.store.volumes_per_shard`).
    storage_options
        Filesystem arguments for a URL destination (credentials, ``endpoint_url``); the
        standard environment (``AWS_*``) is used when not given.
    label_map
        Full-head labels, e.g. ``"17:1,53:1"`` (FreeSurfer's hippocampi -> class 1): each case is
        mapped and split into a left and a right crop (:mod:`hipseg.hemispheres`); the store
        records each crop's ``hemisphere``.
    """
    started = time.perf_counter()
    options_fs = dict(storage_options or {})
    at_url = storage.is_url(dst)
    dst = storage.normalise(dst)  # a string from here on: a URL must never become a Path
    work = storage.sibling(dst, ".partial")
    # Locally the store is built inside the work folder and renamed into place; at a URL
    # (no rename) it is built at dst and becomes a store when its attributes are written.
    target = dst if at_url else storage.join(work, STORE)
    roi_shape = _parse_roi(roi)
    if margin < 0:
        raise ConfigError(f"margin must be >= 0, got {margin}")
    workers = workers or min(os.cpu_count() or 1, 4)
    # Before anything is read or written: the destination must be neither an input nor
    # around one, and an existing one must be a hipseg store (or its unfinished run).
    check_not_input(dst, [src])
    # A local non-store is never replaced; a missing or empty local folder is simply used.
    dst_holds_store = owned_by_hipseg(dst, is_hipseg_store, "store")
    owned_by_hipseg(work, _is_partial_run, "unfinished conversion (.partial)")
    sources, skipped_early, class_names = discover(src)
    if not sources and not skipped_early:
        raise InputError(src, "no cases found")
    if strict and skipped_early:
        raise InputError(skipped_early[0]["case"], skipped_early[0]["reason"])
    options = {
        "roi": roi_shape,
        "margin": margin,
        "shard_volumes": shard_volumes,
        "format": store.FORMAT_VERSION,
        "classes": class_names,
    }
    if label_map is not None:
        label_map = parse_label_map(label_map)
        if max(label_map.values()) >= len(class_names):
            raise ConfigError(f"--label-map targets {sorted(set(label_map.values()))}: the classes are "
                              f"{', '.join(f'{i} {n}' for i, n in enumerate(class_names))}")
        options["label_map"] = sorted(label_map.items())
        if at_url:  # the hemisphere crops are NIfTI files in the local work folder
            raise ConfigError(f"{dst}: --label-map writes to a local store only; convert to a "
                              "local path, then copy the store to its URL")
    fingerprint = _fingerprint(sources, options)
    plan_path = storage.join(work, PLAN)
    plan = storage.read_json(plan_path, options_fs) if storage.exists(plan_path, options_fs) else None

    if storage.exists(dst, options_fs) if at_url else dst_holds_store:
        if _existing_fingerprint(dst, options_fs) == fingerprint:
            existing = store.open_store(dst, options_fs)
            # left over if a run died right after its rename (or, at a URL, its last attribute write)
            storage.remove_tree(work, options_fs)
            report = ConvertReport(
                _shown(dst), existing.n_volumes, existing.roi_shape, list(existing.info.skipped),
                up_to_date=True,
            )
            _raise_if_skipped(report, skip_bad)
            return report
        # At a URL, dst is an unfinished store of ours when the work prefix holds a plan.
        ours = at_url and plan is not None and _existing_fingerprint(dst, options_fs) is None
        if not overwrite and not ours:
            raise StoreExistsError(
                f"{dst}: already exists and was made from other inputs or options; "
                "pass --overwrite to replace it or choose another destination"
            )
        if at_url and overwrite and not ours:
            # No rename in object stores: the old store goes first (docs/distributed.md says so).
            storage.remove_tree(dst, options_fs)

    if plan is not None and plan.get("fingerprint") != fingerprint:
        plan = None
    if plan is None:
        storage.remove_tree(work, options_fs)  # an unfinished run of other inputs: nothing reusable

    runner = _Runner(workers, scheduler, progress)
    try:
        if plan is None:
            sides: dict[str, str] = {}
            if label_map is not None:  # full heads: one case per hippocampus, written in work/
                sources, split_skipped, sides = split_sources(sources, label_map, Path(work) / HEMISPHERES)
                skipped_early = skipped_early + split_skipped
            plan = _plan(sources, class_names, roi_shape, margin, runner, strict, fingerprint)
            plan["skipped"] = skipped_early + plan["skipped"]
            for entry in plan["entries"]:
                if entry["case_id"] in sides:
                    entry["hemisphere"] = sides[entry["case_id"]]
            entries = plan["entries"]
            if not entries:
                raise SkippedCasesError(plan["skipped"])
            plan["shard_volumes"] = shard_volumes or store.volumes_per_shard(plan["roi_shape"], len(entries))
            group = storage.open_group(target, "w", options_fs, zarr_format=3)
            store.create_arrays(group, len(entries), plan["roi_shape"], plan["shard_volumes"])
            storage.write_json(plan_path, plan, options_fs)  # from here on, the run can be resumed
        entries, shard = plan["entries"], plan["shard_volumes"]
        starts = list(range(0, len(entries), shard))
        todo = [s for s in starts if not storage.exists(_block_record(work, s), options_fs)]
        roi_final, names = tuple(plan["roi_shape"]), plan["class_names"]
        blocks = [(work, s, entries[s : s + shard], roi_final, names, target, options_fs or None)
                  for s in todo]
        for _ in runner.map(_convert_block_args, blocks, "converting shards"):
            pass
    finally:
        runner.close()

    _finalise(work, plan, shard, str(Path(src).resolve()), target, options_fs)
    if not at_url:
        old = f"{dst}.old{os.getpid()}"
        if os.path.exists(dst):
            os.replace(dst, old)
        os.replace(target, dst)
        shutil.rmtree(old, ignore_errors=True)
    storage.remove_tree(work, options_fs)
    report = ConvertReport(
        _shown(dst),
        len(entries),
        roi_final,
        list(plan["skipped"]),
        time.perf_counter() - started,
        resumed_blocks=len(starts) - len(todo),
    )
    _raise_if_skipped(report, skip_bad)
    return report


def _shown(location: str) -> Path | str:
    """How a report names the store: a Path when local (as always), the URL string otherwise."""
    return location if storage.is_url(location) else Path(location)


def _raise_if_skipped(report: ConvertReport, skip_bad: bool) -> None:
    if report.skipped and not skip_bad:
        error = SkippedCasesError(report.skipped)
        error.report = report  # type: ignore[attr-defined]
        raise error

