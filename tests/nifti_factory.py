"""NIfTI files with exactly the header fields a test asks for, written with nibabel's header class.

Real cohorts hold headers no writer of ours would produce (dims patched by hand, a
datatype code nibabel cannot map, vox_offset past the end, truncated gzip), so these
files are assembled from ``Nifti1Header.binaryblock`` plus raw data bytes.
"""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import nibabel as nib
import numpy as np


def header_bytes(shape, datatype: int | np.dtype, *, byteorder: str = "<", pixdim=(1.0, 1.0, 1.0),
                 vox_offset: int = 352, slope: float | None = None, inter: float | None = None,
                 qform_code: int = 1, sform_code: int = 1, affine: np.ndarray | None = None) -> bytes:
    """348 header bytes + the 4-byte extension flag, padded with zeros up to ``vox_offset``."""
    header = nib.Nifti1Header()
    header.set_data_shape(tuple(int(s) for s in shape))
    if isinstance(datatype, (int, np.integer)):
        header["datatype"] = int(datatype)
        header["bitpix"] = 8
    else:
        header.set_data_dtype(np.dtype(datatype).newbyteorder("="))
    affine = np.diag([*pixdim[:3], 1.0]) if affine is None else affine
    # nibabel cannot derive a quaternion from a singular affine: fields written as given.
    header.set_qform(np.where(np.eye(4, dtype=bool) & (affine == 0), 1.0, affine), code=qform_code)
    header.set_sform(affine, code=sform_code)
    header["pixdim"][1:4] = [float(p) for p in pixdim[:3]]
    header["vox_offset"] = vox_offset
    header["scl_slope"] = np.nan if slope is None else slope
    header["scl_inter"] = (np.nan if slope is None else 0.0) if inter is None else inter
    if byteorder == ">":
        header = header.as_byteswapped(">")
    block = header.binaryblock + b"\0\0\0\0"
    return block + b"\0" * max(0, vox_offset - len(block))


def write_nifti(path: Path, data: np.ndarray | bytes, shape=None, datatype=None, *, truncate: int = 0,
                **fields) -> Path:
    """Write header + data to ``path`` (.nii or .nii.gz); ``truncate`` drops that many final bytes."""
    if isinstance(data, np.ndarray):
        shape = data.shape if shape is None else shape
        datatype = data.dtype if datatype is None else datatype
        byteorder = ">" if data.dtype.byteorder == ">" else "<"
        fields.setdefault("byteorder", byteorder)
        payload = np.asarray(data).tobytes(order="F")
    else:
        payload = data
    raw = header_bytes(shape, datatype, **fields) + payload
    if truncate:
        raw = raw[:-truncate]
    path = Path(path)
    if path.name.lower().endswith(".gz"):
        path.write_bytes(gzip.compress(raw, compresslevel=1))
    else:
        path.write_bytes(raw)
    return path


def hashes(*roots: Path) -> dict[str, str]:
    """sha256 of every file under ``roots`` (to check inputs byte for byte after a command)."""
    result = {}
    for root in roots:
        paths = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for path in paths:
            result[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return result
