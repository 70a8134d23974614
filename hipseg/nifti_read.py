"""Reading one NIfTI file safely: names, declared sizes, datatypes and truncation, before any data.

nibabel parses the header; nothing here parses NIfTI itself. What this module adds
is the order of checks, so that nothing is allocated on a header's word alone:

1. the name: ``.nii``, ``.nii.gz`` or a ``.hdr`` (+ ``.img``) pair, any letter case;
2. the datatype: integer (8-64 bit, either byte order) and float (16-64 bit) are read,
   everything else (RGB24, RGBA32, complex, float128, binary) is refused by name;
3. the declared size (dims x datatype width + vox_offset) against the real file:
   the file size for uncompressed data, and for gzip a bound on what the compressed
   bytes can decompress to (deflate expands at most ~1032:1, RFC 1951 / zlib's
   "technical details"), and against a cap (``HIPSEG_MAX_NIFTI_BYTES``, default 4 GiB);
4. gzip data is then decompressed with a hard limit of the declared size, so memory
   is bounded by the data really there, and a short stream is refused as truncated.
"""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

from hipseg.errors import InputError, MissingInputError

MAX_BYTES_ENV = "HIPSEG_MAX_NIFTI_BYTES"
DEFAULT_MAX_BYTES = 4 << 30
# zlib's documented worst-case expansion of deflate is 1032:1 (a stream of repeated
# bytes); gzip adds a few header bytes, hence the small constant.
GZIP_MAX_RATIO = 1032
GZIP_SLACK_BYTES = 1 << 16
_READ_BLOCK = 1 << 20

SINGLE_SUFFIXES = (".nii", ".nii.gz")
PAIR_SUFFIXES = (".hdr", ".hdr.gz")
NIFTI_SUFFIXES = SINGLE_SUFFIXES + PAIR_SUFFIXES


def nifti_suffix(path: str | Path) -> str | None:
    """The NIfTI suffix of ``path`` as written (``.nii.gz``, ``.NII``, ``.hdr``...), or None."""
    name = Path(path).name
    for suffix in (".nii.gz", ".hdr.gz", ".nii", ".hdr"):
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return name[-len(suffix):]
    return None


def is_nifti_name(path: str | Path) -> bool:
    """True when ``path``'s name ends in ``.nii``, ``.nii.gz``, ``.hdr`` or ``.hdr.gz``, any letter case.

    The name alone: nothing is read, and a ``.img`` (the data half of a pair) is False.
    """
    return nifti_suffix(path) is not None


def max_bytes() -> int:
    """The cap on a volume's declared data size, from ``HIPSEG_MAX_NIFTI_BYTES`` (bytes)."""
    text = os.environ.get(MAX_BYTES_ENV)
    if not text:
        return DEFAULT_MAX_BYTES
    try:
        value = int(float(text))
    except ValueError:
        raise InputError(MAX_BYTES_ENV, f"must be a number of bytes, got {text!r}") from None
    return max(value, 1)


def datatype_name(header) -> str:
    """NIfTI's name for the header's datatype code (e.g. ``RGB24``, ``complex64``)."""
    code = int(header["datatype"]) if "datatype" in header else -1
    try:
        return str(nib.nifti1.data_type_codes.label[code])
    except KeyError:
        return f"code {code}"


def check_datatype(path: str | Path, header) -> np.dtype:
    """The on-disk dtype if hipseg reads it exactly, else an InputError naming the datatype."""
    try:
        dtype = np.dtype(header.get_data_dtype())
    except Exception as error:  # nibabel raises several types for unknown codes
        raise InputError(path, f"unknown NIfTI datatype {datatype_name(header)} ({error})") from error
    if dtype.kind in "iu" and dtype.itemsize in (1, 2, 4, 8):
        return dtype
    if dtype.kind == "f" and dtype.itemsize in (2, 4, 8):
        return dtype
    if dtype.kind == "c":
        why = "complex values (e.g. MR phase data); save the magnitude as float32"
    elif dtype.fields is not None:
        why = "colour (RGB/RGBA) voxels, not MRI intensities; save one grey channel"
    elif dtype.kind == "f":
        why = "extended-precision floats that numpy cannot convert portably; save as float32/64"
    elif dtype.kind == "b":
        why = "1-bit (binary) voxels; save as uint8"
    else:
        why = "a type with no meaning as an MRI intensity or label"
    raise InputError(path, f"NIfTI datatype {datatype_name(header)} ({dtype.str}) is not "
                           f"supported: {why}")


def _data_file(path: str | Path, image) -> str:
    """The file holding the data: ``path`` itself, or the ``.img`` of a pair."""
    holder = image.file_map["image"]
    return str(holder.filename) if holder.filename else str(path)


def _describe(shape, dtype: np.dtype, offset: int, nbytes: int) -> str:
    return (f"header declares shape {tuple(int(s) for s in shape)} of {dtype.name} "
            f"({nbytes:,} bytes from offset {offset})")


def check_declared_size(path: str | Path, image) -> int:
    """Declared data bytes, after checking them against the file and the cap (no data read)."""
    header = image.header
    shape = tuple(int(s) for s in header.get_data_shape())
    if not shape or min(shape) < 1:
        raise InputError(path, f"header declares an empty or invalid shape {shape}")
    dtype = check_datatype(path, header)
    nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize  # Python ints: no overflow
    # nibabel resets the image header's vox_offset after loading; the proxy keeps the real one.
    offset = int(getattr(image.dataobj, "offset", 0))
    needed = offset + nbytes
    single = nifti_suffix(path) is not None and nifti_suffix(path).lower() in SINGLE_SUFFIXES
    first_data_byte = int(header["sizeof_hdr"]) + 4  # the header and its 4-byte extension flag
    if single and offset < first_data_byte:
        # nibabel would read the header itself as voxels here (vox_offset 0 means "data at 0").
        raise InputError(path, f"vox_offset {offset} points into the header: a single-file NIfTI's "
                               f"data starts at byte {first_data_byte} or later")
    data_file = _data_file(path, image)
    if not os.path.isfile(data_file):
        raise MissingInputError(path, f"its data file {data_file} does not exist")
    size = os.path.getsize(data_file)
    if data_file.lower().endswith(".gz"):
        bound = size * GZIP_MAX_RATIO + GZIP_SLACK_BYTES
        if needed > bound:
            raise InputError(path, _describe(shape, dtype, offset, nbytes)
                             + f", but the file is {size:,} gzip bytes, which cannot hold more "
                             f"than {bound:,}: truncated or a corrupt header")
    elif needed > size:
        raise InputError(path, _describe(shape, dtype, offset, nbytes)
                         + f", but {Path(data_file).name} is only {size:,} bytes: truncated "
                         "or a corrupt header")
    cap = max_bytes()
    if nbytes > cap:
        raise InputError(path, _describe(shape, dtype, offset, nbytes)
                         + f", above the limit of {cap:,} bytes ({MAX_BYTES_ENV} raises it)")
    return needed


def _open(path: Path, compressed: bool):
    return gzip.open(path, "rb") if compressed else open(path, "rb")


def _read_bounded(path: Path, compressed: bool, limit: int) -> bytes:
    """Read (decompressing) at most ``limit`` bytes: memory never exceeds what is really there."""
    parts, total = [], 0
    try:
        with _open(path, compressed) as handle:
            while total < limit:
                block = handle.read(min(_READ_BLOCK, limit - total))
                if not block:
                    break
                parts.append(block)
                total += len(block)
    except (OSError, EOFError, zlib.error) as error:
        raise InputError(path, f"unreadable or truncated {'gzip ' if compressed else ''}data "
                               f"({error})") from error
    return b"".join(parts)


def _unreadable(path: Path, compressed: bool, error: Exception) -> InputError:
    """Name what nibabel refused: an unsupported datatype code by its NIfTI name, else the error."""
    try:
        with _open(path, compressed) as handle:
            header = nib.Nifti1Header.from_fileobj(handle, check=False)
        check_datatype(path, header)
    except InputError as named:
        return named
    except Exception:  # not even a header nibabel can lay out: report nibabel's first error
        pass
    if "wrong size" in str(error):  # nibabel's WrapStructError for a short header block
        return InputError(path, "not a readable NIfTI file: empty, or too short to hold a NIfTI header")
    return InputError(path, f"not a readable NIfTI file ({type(error).__name__}: {error})")


def _header_image(path: Path, compressed: bool):
    """A single-file image from its stream, whatever the letter case of its name (no data read)."""
    first_error: Exception | None = None
    for klass in (nib.Nifti1Image, nib.Nifti2Image):
        try:
            with _open(path, compressed) as handle:
                image = klass.from_stream(handle)
            return image
        except Exception as error:
            # nibabel reports a malformed header through many exception types (HeaderDataError,
            # WrapStructError, ValueError, struct.error, OSError...); each means "not readable".
            first_error = first_error or error
    raise _unreadable(path, compressed, first_error) from first_error


def _load_pair_header(path: Path):
    try:
        return nib.load(str(path))
    except Exception as error:  # as in _header_image
        raise _unreadable(path, path.name.lower().endswith(".gz"), error) from error


def load_image(path: str | Path):
    """A nibabel image whose header passed every check, with its data safe to read.

    Returns a ``Nifti1Image`` / ``Nifti2Image`` whose data is already in memory, read
    under the declared-size limit, or a ``Nifti1Pair`` whose ``.img`` size was checked.
    Raises InputError (MissingInputError for a missing file) naming ``path``.
    """
    path = Path(path)
    if not path.exists():
        raise MissingInputError(path, "file does not exist")
    suffix = nifti_suffix(path)
    if suffix is None:
        if path.name.lower().endswith((".img", ".img.gz")):
            raise InputError(path, "the data half of a NIfTI pair: give its .hdr file")
        raise InputError(path, "not a NIfTI file (expected a .nii, .nii.gz or .hdr name)")
    if suffix.lower() in PAIR_SUFFIXES:
        image = _load_pair_header(path)
        if not isinstance(image, (nib.Nifti1Pair, nib.Nifti2Pair)):
            raise InputError(path, f"a {type(image).__name__} (no NIfTI orientation); hipseg reads "
                                   "NIfTI-1/2 only: convert it, e.g. with nibabel or dcm2niix")
        volume_shape(path, image)
        check_declared_size(path, image)
        return image
    compressed = suffix.lower() == ".nii.gz"
    image = _header_image(path, compressed)
    volume_shape(path, image)
    needed = check_declared_size(path, image)
    raw = _read_bounded(path, compressed, needed)
    if len(raw) < needed:
        shape = tuple(int(s) for s in image.header.get_data_shape())
        stream = "gzip stream" if compressed else "file"
        raise InputError(path, f"truncated: the header needs {needed:,} bytes (shape {shape} "
                               f"of {image.get_data_dtype()}) but the {stream} holds {len(raw):,}")
    try:
        return type(image).from_bytes(raw)
    except Exception as error:  # as in _header_image
        raise InputError(path, f"not a readable NIfTI file ({type(error).__name__}: {error})") from error


def volume_shape(path: str | Path, image) -> tuple[int, int, int]:
    """The declared 3D shape; trailing axes of length 1 dropped, anything else refused."""
    declared = tuple(int(s) for s in image.header.get_data_shape())
    shape = declared
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) != 3:
        raise InputError(path, f"expected a 3D volume, found shape {declared}")
    return shape  # type: ignore[return-value]


def read_array(path: str | Path, image) -> np.ndarray:
    """The data of ``image`` (from :func:`load_image`) as a numpy array, scaling applied.

    Integers come back in their own dtype (native byte order); scaled data and floats as
    float (nibabel's scaling rules). Trailing axes of length 1 are dropped; anything but
    3D is an InputError.
    """
    shape = volume_shape(path, image)
    try:
        data = np.asarray(image.dataobj)
    except Exception as error:  # truncated data, unreadable gzip, bad scaling: as in _header_image
        raise InputError(path, f"unreadable or truncated data ({type(error).__name__}: "
                               f"{error})") from error
    data = data.reshape(shape)
    if data.dtype.byteorder not in ("=", "|"):
        data = data.astype(data.dtype.newbyteorder("="))
    return data
