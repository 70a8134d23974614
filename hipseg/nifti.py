"""Reading NIfTI cases with nibabel: validation, canonical orientation and checksums."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform

from hipseg.errors import InputError
from hipseg.nifti_read import load_image, nifti_suffix, read_array

CANONICAL = ("R", "A", "S")
# Float labels within this many rounding steps of an integer are that integer: resampling
# and format tools write 0.99999994 for 1 (one float32 step below) and the like.
LABEL_ROUNDING_STEPS = 4


@dataclass(frozen=True)
class Case:
    """One image (and label, when there is one) in the canonical RAS+ orientation."""

    case_id: str
    image_path: str
    label_path: str | None
    image: np.ndarray  # float32, canonical
    label: np.ndarray | None  # uint8, canonical
    affine: np.ndarray  # the image's original affine (4x4)
    original_shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    axcodes: tuple[str, str, str]  # original orientation
    source_dtype: str
    image_sha256: str
    label_sha256: str | None


def case_id_from_path(path: str | Path) -> str:
    """The file name without its NIfTI suffix (``.nii.gz``, ``.nii``, ``.hdr``; any case)."""
    name = Path(path).name
    suffix = nifti_suffix(name)
    return name[: -len(suffix)] if suffix else Path(name).stem


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_nifti(path: str | Path) -> tuple[np.ndarray, nib.Nifti1Image]:
    """Load a NIfTI file fully, turning every way it can fail into one clear InputError.

    Sizes, datatype and truncation are checked before the data is read
    (:mod:`hipseg.nifti_read`); the array is 3D, in native byte order.
    """
    image = load_image(path)
    return read_array(path, image), image


def orientation_to_canonical(affine: np.ndarray) -> np.ndarray:
    return ornt_transform(io_orientation(affine), axcodes2ornt(CANONICAL))


def to_canonical(array: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Reorder and flip axes of ``array`` (in ``affine``'s orientation) to RAS+."""
    return np.ascontiguousarray(apply_orientation(array, orientation_to_canonical(affine)))


def from_canonical(array: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Inverse of :func:`to_canonical`: back to the orientation of ``affine``."""
    back = ornt_transform(axcodes2ornt(CANONICAL), io_orientation(affine))
    return np.ascontiguousarray(apply_orientation(array, back))


def label_tolerance(image) -> float:
    """Relative rounding tolerance of a label image's values (0 for unscaled integers).

    A value is exact to one rounding step of the coarsest float it passed through: the
    stored float type, and float32 when ``scl_slope`` / ``scl_inter`` (float32 header
    fields) scale it. LABEL_ROUNDING_STEPS such steps are allowed.
    """
    eps = 0.0
    stored = np.dtype(image.get_data_dtype())
    if stored.kind == "f":
        eps = max(eps, float(np.finfo(stored).eps))
    # nibabel moves the scaling from the loaded header to the array proxy.
    slope = float(getattr(image.dataobj, "slope", 1.0))
    inter = float(getattr(image.dataobj, "inter", 0.0))
    if (slope, inter) != (1.0, 0.0):
        eps = max(eps, float(np.finfo(np.float32).eps))
    return LABEL_ROUNDING_STEPS * eps


def validate_label(path: str | Path, label: np.ndarray, n_classes: int,
                   tolerance: float = 0.0) -> np.ndarray:
    """Integer labels within 0..n_classes-1, as uint8; anything else is an InputError.

    Float values within ``tolerance`` x max(1, |value|) of an integer are rounded to it;
    real fractions are refused with the largest deviation found.
    """
    if not np.issubdtype(label.dtype, np.integer):
        if not np.all(np.isfinite(label)):
            raise InputError(path, "label holds NaN or Inf values")
        rounded = np.round(label)
        deviation = np.abs(label - rounded)
        allowed = tolerance * np.maximum(1.0, np.abs(rounded))
        bad = deviation > allowed
        if np.any(bad):
            worst = int(np.argmax(np.where(bad, deviation, -1.0)))
            value = label.flat[worst]
            raise InputError(
                path, f"label holds non-integer values: {int(bad.sum())} voxel(s), the largest "
                f"deviation {float(deviation.flat[worst]):.3g} from an integer at value "
                f"{float(value)!r} (allowed: {LABEL_ROUNDING_STEPS} float rounding steps); "
                "labels must be class numbers")
        label = rounded
    values = np.unique(label)
    outside = values[(values < 0) | (values >= n_classes)]
    if outside.size:
        shown = [int(v) for v in outside.tolist()[:5]]
        raise InputError(
            path, f"label values {shown} outside the declared classes 0..{n_classes - 1}"
        )
    return label.astype(np.uint8)


def check_affine(path: str | Path, affine: np.ndarray | None) -> np.ndarray:
    """The voxel-to-world affine as float64 if it can orient a volume (finite, invertible)."""
    affine = np.asarray(np.eye(4) if affine is None else affine, dtype=np.float64)
    rotation = affine[:3, :3]
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(rotation)) < 1e-12:
        raise InputError(path, "the voxel-to-world affine (sform/qform, pixdim) is singular or not "
                               f"finite ({np.round(rotation, 4).tolist()}): the orientation is "
                               "unknown; fix the header's voxel sizes and sform")
    return affine


def load_case(image_path: str | Path, label_path: str | Path | None, n_classes: int) -> Case:
    """Read, validate and reorient one case; raise InputError naming the bad file."""
    image_data, image = read_nifti(image_path)
    if not np.all(np.isfinite(image_data)):
        raise InputError(image_path, "image contains NaN or Inf intensities")
    affine = check_affine(image_path, image.affine)
    label = None
    if label_path is not None:
        label_data, label_image = read_nifti(label_path)
        if label_data.shape != image_data.shape:
            raise InputError(
                label_path,
                f"label has shape {label_data.shape} but image has {image_data.shape} "
                f"({Path(image_path).name})",
            )
        if not np.allclose(label_image.affine, affine, atol=1e-3):
            raise InputError(label_path, f"label affine differs from the image's ({Path(image_path).name})")
        tolerance = label_tolerance(label_image)
        label = to_canonical(validate_label(label_path, label_data, n_classes, tolerance), affine)
    zooms = image.header.get_zooms()[:3]
    return Case(
        case_id=case_id_from_path(image_path),
        image_path=str(image_path),
        label_path=None if label_path is None else str(label_path),
        image=to_canonical(image_data.astype(np.float32, copy=False), affine),
        label=label,
        affine=affine,
        original_shape=tuple(int(s) for s in image_data.shape),  # type: ignore[arg-type]
        spacing=tuple(float(z) for z in zooms),  # type: ignore[arg-type]
        axcodes=tuple(nib.aff2axcodes(affine)),  # type: ignore[arg-type]
        source_dtype=str(image.get_data_dtype()),
        image_sha256=sha256_of(image_path),
        label_sha256=None if label_path is None else sha256_of(label_path),
    )
