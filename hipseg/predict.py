"""Prediction: a label map in each input's own grid, and hippocampal volumes in mm^3, for NIfTI files.

Each volume is put in the canonical RAS+ orientation, normalised as the store's
crops were, segmented by :func:`hipseg.inference.segment` (coarse pass, ROI
location, fine pass; see that module) and returned to the input's orientation.
Full-head scans instead go through :func:`hipseg.localise.segment_head` (registration
to a template, one crop per hemisphere, quality flags)."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from tqdm.auto import tqdm

from hipseg.discovery import list_inputs
from hipseg.inference import load_runs, segment
from hipseg.localise import is_full_head, segment_head, volume_columns
from hipseg.nifti import case_id_from_path, from_canonical, is_nifti_name, load_case
from hipseg.preprocess import normalise_intensity

VOLUMES_CSV = "volumes.csv"


def _label_image(label: np.ndarray, reference: nib.Nifti1Image) -> nib.Nifti1Image:
    """``label`` as a uint8 NIfTI image in ``reference``'s grid, affine and header fields."""
    header = reference.header.copy()
    header.set_data_dtype(np.uint8)
    header.set_slope_inter(None, None)  # a scaled int16 input must not scale the labels
    return nib.Nifti1Image(label.astype(np.uint8), reference.affine, header)


def predict(run_dir: str | Path, inputs: str | Path, out: str | Path, *,
            ensemble: Sequence[str | Path] = (), which: str = "best", device: str = "cpu",
            progress: bool = True) -> list[dict[str, Any]]:
    """Write a label map per input NIfTI and a CSV of hippocampal volumes (mm^3 per class).

    Parameters
    ----------
    run_dir
        A ``hipseg train`` run folder; ``ensemble`` adds runs whose softmax is averaged in.
    inputs
        A NIfTI file or a folder of them, of any size: ROI-sized crops or full heads.
    out
        Output folder (``<case>.nii.gz`` per input plus ``volumes.csv``); for a single input
        file, ``out`` may also be a ``.nii.gz`` path (the CSV then goes beside it).

    Returns
    -------
    One dict per input: case, input, output, shape, voxel_mm3, located and ``<class>_mm3``.
    Full-head scans (:func:`hipseg.localise.is_full_head`) go through :mod:`hipseg.localise`
    and add ``left_/right_<class>_mm3``, ``localisation_confidence``, ``quality`` ("ok" or
    "flagged") and ``quality_reasons``; their volumes are empty when localisation failed.
    """
    runs = load_runs(run_dir, ensemble, which, device)
    files = list_inputs(inputs)
    class_names = runs[0].class_names
    out = Path(out)
    single = len(files) == 1 and is_nifti_name(out)
    folder = out.parent if single else out
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for path in tqdm(files, desc="predicting", unit="volume", disable=not progress):
        case = load_case(path, None, len(class_names))
        target = out if single else folder / f"{case_id_from_path(path)}.nii.gz"
        voxel_mm3 = float(np.prod(case.spacing))
        row: dict[str, Any] = {"case": case.case_id, "input": str(path), "output": str(target)}
        if is_full_head(case.original_shape, case.affine):  # hipseg.localise: both hippocampi
            head = segment_head(runs, from_canonical(case.image, case.affine), case.affine)
            label = head.label
            row.update({"shape": "x".join(map(str, label.shape)), "voxel_mm3": voxel_mm3,
                        "located": head.quality.localised, **volume_columns(head, class_names)})
        else:
            normalised, _, _ = normalise_intensity(case.image)
            result = segment(runs, normalised)
            label = from_canonical(result.label, case.affine)
            counts = np.bincount(label.ravel(), minlength=len(class_names))
            row.update({"shape": "x".join(map(str, label.shape)), "voxel_mm3": voxel_mm3,
                        "located": result.located})
            for c, name in enumerate(class_names[1:], start=1):
                row[f"{name}_mm3"] = float(counts[c]) * voxel_mm3
            row["total_mm3"] = float(counts[1:].sum()) * voxel_mm3
        nib.save(_label_image(label, nib.load(str(path))), str(target))
        rows.append(row)
    fields = list(dict.fromkeys(key for row in rows for key in row))  # full-head rows add columns
    with open(folder / VOLUMES_CSV, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(rows)
    return rows
