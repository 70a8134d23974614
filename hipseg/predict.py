"""Prediction: a label map in each input's own grid, and hippocampal volumes in mm^3, for NIfTI files.

Each volume is put in the canonical RAS+ orientation, normalised as the store's
crops were, segmented by :func:`hipseg.inference.segment` (coarse pass, ROI
location, fine pass; see that module) and returned to the input's orientation.
Full-head scans instead go through :func:`hipseg.localise.segment_head` (registration
to a template, one crop per hemisphere, quality flags)."""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from tqdm.auto import tqdm

from hipseg.discovery import list_inputs
from hipseg.errors import InputError, SkippedCasesError
from hipseg.inference import TEST_TIME_FLIP, load_runs, segment
from hipseg.localise import is_full_head, segment_head, volume_columns
from hipseg.nifti import case_id_from_path, from_canonical, load_case
from hipseg.nifti_read import is_nifti_name, nifti_suffix
from hipseg.preprocess import normalise_intensity
from hipseg.safety import check_not_input

VOLUMES_CSV = "volumes.csv"


def _label_image(label: np.ndarray, reference: nib.Nifti1Image) -> nib.Nifti1Image:
    """``label`` as a uint8 NIfTI image in ``reference``'s grid, affine and header fields."""
    header = reference.header.copy()
    header.set_data_dtype(np.uint8)
    header.set_slope_inter(None, None)  # a scaled int16 input must not scale the labels
    return nib.Nifti1Image(label.astype(np.uint8), reference.affine, header)


def _temporary(target: Path) -> Path:
    # nibabel picks the format from the name, so the temporary keeps the NIfTI suffix.
    suffix = nifti_suffix(target) or ""
    return target.with_name(f".{target.name[:len(target.name) - len(suffix)]}.tmp{os.getpid()}{suffix}")


def save_atomic(image: nib.Nifti1Image, target: Path) -> None:
    """Write ``image`` to a hidden temporary beside ``target``, then rename: never half a file."""
    temporary = _temporary(target)
    try:
        nib.save(image, str(temporary))
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)


def write_volumes_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write ``volumes.csv`` atomically: a hidden temporary beside ``path``, then renamed.

    Parameters
    ----------
    path
        Local destination, replaced if present.
    rows
        One dict per case (``case``, ``<class>_mm3`` volumes in mm^3, ...); the columns are
        the union of the rows' keys in first-seen order, blank where a row lacks one.

    Raises
    ------
    OSError
        The folder cannot be written; ``path`` itself is then unchanged.
    """
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fields = list(dict.fromkeys(key for row in rows for key in row))  # full-head rows add columns
    with open(temporary, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(temporary, path)


def plan_outputs(files: Sequence[Path], out: Path, overwrite: bool) -> tuple[Path, dict[Path, Path]]:
    """The output folder and each input's label-map path, refused before any work when unsafe.

    An output that is an input file, or an input folder that the outputs go into, is
    refused whatever the flags; an existing output (label map or volumes.csv) only
    with ``overwrite``.
    """
    single = len(files) == 1 and is_nifti_name(out)
    folder = out.parent if single else out
    if folder.exists() and not folder.is_dir():
        raise InputError(folder, "exists and is not a folder; choose an output folder")
    targets = {path: out if single else folder / f"{case_id_from_path(path)}.nii.gz" for path in files}
    inputs = {path.resolve() for path in files}
    if not single:
        check_not_input(folder, {path.parent for path in files}, "output folder")
    existing = []
    for target in [*targets.values(), folder / VOLUMES_CSV]:
        if target.resolve() in inputs:
            raise InputError(target, "is an input file; predict never writes over its inputs: "
                             "choose another output")
        if os.path.lexists(target):
            existing.append(target)
    if existing and not overwrite:
        names = ", ".join(str(t) for t in existing[:5]) + (" ..." if len(existing) > 5 else "")
        raise InputError(folder, f"{len(existing)} output(s) exist already ({names}); pass "
                         "--overwrite to replace them or choose another output folder")
    return folder, targets


def predict(run_dir: str | Path, inputs: str | Path, out: str | Path, *,
            ensemble: Sequence[str | Path] = (), which: str = "best", device: str = "cpu",
            progress: bool = True, overwrite: bool = False,
            skip_bad: bool = False, flip: bool = TEST_TIME_FLIP) -> list[dict[str, Any]]:
    """Write a label map per input NIfTI and a CSV of hippocampal volumes (mm^3 per class).

    Parameters
    ----------
    run_dir
        A ``hipseg train`` run folder; ``ensemble`` adds runs whose softmax is averaged in.
    inputs
        A NIfTI file or a folder of them, of any size: ROI-sized crops or full heads.
    out
        Output folder (``<case>.nii.gz`` per input plus ``volumes.csv``); for a single input
        file, ``out`` may also be a ``.nii.gz`` path (the CSV then goes beside it). Never an
        input file or an input folder; existing outputs are replaced only with ``overwrite``.
    skip_bad
        A bad input (unreadable, truncated, NaN/Inf voxels...) is always skipped and named,
        and every good one written; without ``skip_bad``, :class:`SkippedCasesError` is
        raised at the end (its ``rows`` and ``skipped`` say what was done). When no input
        could be processed it is raised even with ``skip_bad``.
    flip
        Test-time left-right flip (default on, ``inference.TEST_TIME_FLIP``), of crops and of
        each hemisphere crop of a full head.

    Returns
    -------
    One dict per written input: case, input, output, shape, voxel_mm3, located and
    ``<class>_mm3``. Full-head scans (:func:`hipseg.localise.is_full_head`) go through
    :mod:`hipseg.localise` and add ``left_/right_<class>_mm3``, ``localisation_confidence``,
    ``quality`` ("ok" or "flagged") and ``quality_reasons``; their volumes are empty when
    localisation failed. Label maps and volumes.csv are written atomically (temporary + rename).
    """
    files, skipped = list_inputs(inputs)
    out = Path(out)
    folder, targets = plan_outputs(files, out, overwrite)
    runs = load_runs(run_dir, ensemble, which, device)
    class_names = runs[0].class_names
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for path in tqdm(files, desc="predicting", unit="volume", disable=not progress):
        try:
            case = load_case(path, None, len(class_names))
        except InputError as error:
            skipped.append({"case": case_id_from_path(path), "reason": str(error)})
            continue
        target = targets[path]
        voxel_mm3 = float(np.prod(case.spacing))
        row: dict[str, Any] = {"case": case.case_id, "input": str(path), "output": str(target)}
        if is_full_head(case.original_shape, case.affine):  # hipseg.localise: both hippocampi
            head = segment_head(runs, from_canonical(case.image, case.affine), case.affine, flip=flip)
            label = head.label
            row.update({"shape": "x".join(map(str, label.shape)), "voxel_mm3": voxel_mm3,
                        "located": head.quality.localised, **volume_columns(head, class_names)})
        else:
            normalised, _, _ = normalise_intensity(case.image)
            result = segment(runs, normalised, flip=flip)
            label = from_canonical(result.label, case.affine)
            counts = np.bincount(label.ravel(), minlength=len(class_names))
            row.update({"shape": "x".join(map(str, label.shape)), "voxel_mm3": voxel_mm3,
                        "located": result.located})
            for c, name in enumerate(class_names[1:], start=1):
                row[f"{name}_mm3"] = float(counts[c]) * voxel_mm3
            row["total_mm3"] = float(counts[1:].sum()) * voxel_mm3
        save_atomic(_label_image(label, nib.load(str(path))), target)  # header only: checked
        rows.append(row)
    if rows:
        write_volumes_csv(folder / VOLUMES_CSV, rows)
    if skipped and (not skip_bad or not rows):
        error = SkippedCasesError(skipped)
        error.rows = rows  # type: ignore[attr-defined]
        raise error
    return rows
