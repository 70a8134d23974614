"""Reading NIfTI cases with nibabel: validation, canonical orientation and checksums."""

from __future__ import annotations

import gzip
import hashlib
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform

from hipseg.errors import InputError, MissingInputError

CANONICAL = ("R", "A", "S")
NIFTI_SUFFIXES = (".nii", ".nii.gz")


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
    name = Path(path).name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def is_nifti_name(path: str | Path) -> bool:
    return str(path).endswith(NIFTI_SUFFIXES)


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_nifti(path: str | Path) -> tuple[np.ndarray, nib.Nifti1Image]:
    """Load a NIfTI file fully, turning every way it can fail into one clear InputError."""
    path = Path(path)
    if not path.exists():
        raise MissingInputError(path, "file does not exist")
    if not is_nifti_name(path):
        raise InputError(path, "not a NIfTI file (expected a .nii or .nii.gz name)")
    try:
        image = nib.load(str(path))
    except ImageFileError as error:
        raise InputError(path, f"not a readable NIfTI file ({error})") from error
    except (OSError, EOFError, zlib.error, gzip.BadGzipFile) as error:
        raise InputError(path, f"unreadable or truncated file ({error})") from error
    try:
        data = np.asarray(image.dataobj)
    except (OSError, EOFError, ValueError, zlib.error, gzip.BadGzipFile) as error:
        raise InputError(path, f"unreadable or truncated file ({error})") from error
    while data.ndim > 3 and data.shape[-1] == 1:  # (X, Y, Z, 1) is still one 3D volume
        data = data[..., 0]
    if data.ndim != 3:
        raise InputError(path, f"expected a 3D volume, found shape {tuple(data.shape)}")
    return data, image


def orientation_to_canonical(affine: np.ndarray) -> np.ndarray:
    return ornt_transform(io_orientation(affine), axcodes2ornt(CANONICAL))


def to_canonical(array: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Reorder and flip axes of ``array`` (in ``affine``'s orientation) to RAS+."""
    return np.ascontiguousarray(apply_orientation(array, orientation_to_canonical(affine)))


def from_canonical(array: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Inverse of :func:`to_canonical`: back to the orientation of ``affine``."""
    back = ornt_transform(axcodes2ornt(CANONICAL), io_orientation(affine))
    return np.ascontiguousarray(apply_orientation(array, back))


def validate_label(path: str | Path, label: np.ndarray, n_classes: int) -> np.ndarray:
    """Integer labels within 0..n_classes-1, as uint8; anything else is an InputError."""
    if not np.issubdtype(label.dtype, np.integer):
        if not np.all(np.isfinite(label)) or np.any(label != np.round(label)):
            raise InputError(path, "label holds non-integer values")
    values = np.unique(label)
    outside = values[(values < 0) | (values >= n_classes)]
    if outside.size:
        raise InputError(
            path, f"label values {outside.tolist()[:5]} outside the declared classes 0..{n_classes - 1}"
        )
    return label.astype(np.uint8)


def load_case(image_path: str | Path, label_path: str | Path | None, n_classes: int) -> Case:
    """Read, validate and reorient one case; raise InputError naming the bad file."""
    image_data, image = read_nifti(image_path)
    if not np.all(np.isfinite(image_data)):
        raise InputError(image_path, "image contains NaN or Inf intensities")
    affine = np.asarray(image.affine, dtype=np.float64)
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
        label = to_canonical(validate_label(label_path, label_data, n_classes), affine)
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
