"""Every NIfTI real cohorts produce is read exactly or refused by name: sizes, datatypes, labels, pairs."""

from __future__ import annotations

import gzip
import tracemalloc

import nibabel as nib
import numpy as np
import pytest
from nifti_factory import write_nifti

from hipseg.convert import convert
from hipseg.errors import InputError, MissingInputError
from hipseg.nifti import load_case, read_nifti, validate_label
from hipseg.nifti_read import MAX_BYTES_ENV
from hipseg.store import open_store

# ---------------------------------------------------------------- declared sizes


def _patched_dims(tmp_path, name: str, dims=(32767, 32767, 32767)):
    """A real 120 KB volume whose header was patched to declare ``dims`` (int16)."""
    data = np.arange(40 * 40 * 40, dtype=np.int16).reshape(40, 40, 40)
    path = tmp_path / name
    write_nifti(path, data.tobytes(order="F"), dims, np.int16)
    return path


@pytest.mark.parametrize("name", ["huge.nii", "huge.nii.gz"])
def test_header_declaring_terabytes_is_refused_before_allocating(tmp_path, name):
    path = _patched_dims(tmp_path, name)
    tracemalloc.start()
    try:
        with pytest.raises(InputError) as caught:
            load_case(path, None, 3)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    message = str(caught.value)
    assert str(path) in message and "(32767, 32767, 32767)" in message and "int16" in message
    assert f"{path.stat().st_size:,}" in message  # the real file size, beside the declared shape
    assert peak < 16 << 20  # nothing near the declared 70 TB, nor even the 120 KB x 1032 bound


@pytest.mark.parametrize("name", ["short.nii", "short.nii.gz"])
def test_declared_size_just_above_the_data_is_refused_with_the_file_size(tmp_path, name):
    data = np.ones((20, 20, 20), np.float32)
    path = write_nifti(tmp_path / name, data, truncate=4)  # one voxel short
    with pytest.raises(InputError, match="truncated") as caught:
        read_nifti(path)
    assert str(path) in str(caught.value) and "(20, 20, 20)" in str(caught.value)


def test_vox_offset_past_the_end_is_refused(tmp_path):
    path = write_nifti(tmp_path / "offset.nii", np.ones((4, 4, 4), np.uint8), vox_offset=352)
    raw = bytearray(path.read_bytes())
    raw[108:112] = np.float32(1 << 20).tobytes()  # vox_offset field: 1 MiB into a 416-byte file
    path.write_bytes(bytes(raw))
    with pytest.raises(InputError, match="offset 1048576"):
        read_nifti(path)


def test_the_size_cap_is_configurable(tmp_path, monkeypatch):
    path = write_nifti(tmp_path / "a.nii.gz", np.ones((10, 10, 10), np.float32))
    assert read_nifti(path)[0].shape == (10, 10, 10)
    monkeypatch.setenv(MAX_BYTES_ENV, "3999")
    with pytest.raises(InputError, match=f"limit of 3,999 bytes.*{MAX_BYTES_ENV}"):
        read_nifti(path)


def test_truncated_gzip_within_the_ratio_bound_is_refused_after_a_bounded_read(tmp_path):
    """Under the ratio bound, so the bounded stream must find the shortfall itself."""
    path = tmp_path / "zeros.nii.gz"
    noise = np.random.default_rng(0).integers(0, 4, (64, 64, 64)).astype(np.float32)
    write_nifti(tmp_path / "zeros.nii", noise)
    raw = (tmp_path / "zeros.nii").read_bytes()
    path.write_bytes(gzip.compress(raw[: len(raw) // 2]))  # a download cut half-way, re-gzipped
    with pytest.raises(InputError, match=r"truncated: the header needs 1,048,928 bytes \(shape "
                       r"\(64, 64, 64\) of float32\) but the gzip stream holds 524,464"):
        read_nifti(path)


def test_gzip_header_beyond_the_deflate_bound_is_refused_unread(tmp_path):
    path = tmp_path / "tiny.nii.gz"
    write_nifti(tmp_path / "tiny.nii", np.zeros((64, 64, 64), np.float32))
    path.write_bytes(gzip.compress((tmp_path / "tiny.nii").read_bytes()[:20000]))
    with pytest.raises(InputError, match=r"gzip bytes, which cannot hold more than"):
        read_nifti(path)


def test_corrupt_gzip_is_refused_by_name(tmp_path):
    path = write_nifti(tmp_path / "cut.nii.gz", np.ones((30, 30, 30), np.float32))
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) - 40])  # the gzip trailer and some deflate blocks gone
    with pytest.raises(InputError, match="cut.nii.gz"):
        read_nifti(path)


# ---------------------------------------------------------------- datatypes

INTEGER_EXTREMES = {
    "int8": [-128, 127], "uint8": [0, 255], "int16": [-32768, 32767], "uint16": [0, 65535],
    "int32": [-(2**31), 2**31 - 1], "uint32": [0, 2**32 - 1],
    "int64": [-(2**63), 2**63 - 1], "uint64": [0, 2**64 - 1],
}


@pytest.mark.parametrize("byteorder", ["<", ">"])
@pytest.mark.parametrize("dtype", [*INTEGER_EXTREMES, "float32", "float64"])
def test_every_integer_and_float_datatype_is_read_exactly(tmp_path, dtype, byteorder):
    values = np.arange(2 * 3 * 4).reshape(2, 3, 4) - 5
    if dtype in INTEGER_EXTREMES:
        lo, hi = INTEGER_EXTREMES[dtype]
        values = np.clip(values, 0 if lo == 0 else -5, None).astype(object)
        values.flat[0], values.flat[-1] = lo, hi  # unsigned above the signed range included
        reference = np.array(values.tolist(), dtype=dtype)
    else:
        reference = (values * 0.37).astype(dtype)
    on_disk = reference.astype(np.dtype(dtype).newbyteorder(byteorder))
    path = write_nifti(tmp_path / "v.nii.gz", on_disk)
    data, image = read_nifti(path)
    assert data.dtype == np.dtype(dtype) and data.dtype.isnative
    np.testing.assert_array_equal(data, reference)
    case = load_case(path, None, 3)
    np.testing.assert_array_equal(case.image, reference.astype(np.float32))  # canonical = RAS here
    assert np.dtype(case.source_dtype).newbyteorder("=") == np.dtype(dtype)


REFUSED = [(32, "complex64"), (1792, "complex128"), (2048, "complex256"), (1536, "float128"),
           (128, "RGB"), (2304, "RGBA"), (1, "binary"), (0, "none"), (255, "all"), (4000, "code 4000")]


@pytest.mark.parametrize("code, name", REFUSED)
def test_other_datatypes_are_refused_by_name(tmp_path, code, name):
    path = write_nifti(tmp_path / "odd.nii.gz", b"\1" * 8 * 4 * 4 * 4 * 4, (4, 4, 4), code)
    with pytest.raises(InputError) as caught:
        load_case(path, None, 3)
    assert str(path) in str(caught.value) and name in str(caught.value)


def test_complex_data_is_never_silently_cast(tmp_path):
    data = (np.ones((4, 4, 4)) + 1j * np.arange(64).reshape(4, 4, 4)).astype(np.complex64)
    path = write_nifti(tmp_path / "phase.nii", data)
    with pytest.raises(InputError, match="complex64.*magnitude"):
        load_case(path, None, 3)


# ---------------------------------------------------------------- label values

def _label_volume() -> np.ndarray:
    label = np.zeros((6, 7, 8), np.uint8)
    label[1:3, 1:5, 2:6] = 1
    label[3:5, 2:6, 1:7] = 2
    return label


@pytest.mark.parametrize("one, two", [(0.99999994, 2.0), (1.0000001, 1.9999999), (1.0, 2.0000002)])
def test_float_labels_one_rounding_step_off_are_their_integers(one, two):
    label = _label_volume()
    floats = np.select([label == 1, label == 2], [np.float32(one), np.float32(two)], 0)
    floats = floats.astype(np.float32)
    assert not np.array_equal(floats, label) or one == 1.0
    tolerance = 4 * float(np.finfo(np.float32).eps)
    np.testing.assert_array_equal(validate_label("x.nii", floats, 3, tolerance), label)


def test_real_fractions_are_refused_with_the_largest_deviation():
    label = _label_volume().astype(np.float32)
    label[0, 0, 0] = 0.25
    label[0, 0, 1] = 1.5
    with pytest.raises(InputError, match=r"2 voxel\(s\), the largest deviation 0.5 .*value 1.5"):
        validate_label("lab.nii", label, 3, 4 * float(np.finfo(np.float32).eps))


@pytest.mark.parametrize("stored_dtype, slope, inter", [
    (np.int16, 0.1, 0.0),   # stored 10, 20: 0.1 is not exact in float32
    (np.int16, 0.5, 0.0),   # stored 2, 4
    (np.uint8, 1.0, -1.0),  # stored 1, 2, 3
    (np.float32, 0.1, 0.0),
])
def test_labels_stored_through_scl_slope_and_inter_are_accepted(tmp_path, stored_dtype, slope, inter):
    label = _label_volume()
    stored = ((label - inter) / slope).round().astype(stored_dtype)
    image = write_nifti(tmp_path / "img.nii.gz", label.astype(np.float32) * 10)
    path = write_nifti(tmp_path / "lab.nii.gz", stored, slope=slope, inter=inter)
    case = load_case(image, path, 3)
    np.testing.assert_array_equal(case.label, label)


def test_scaled_labels_that_are_not_integers_are_refused(tmp_path):
    label = _label_volume()
    image = write_nifti(tmp_path / "img.nii.gz", label.astype(np.float32))
    path = write_nifti(tmp_path / "lab.nii.gz", label.astype(np.int16), slope=0.3)
    with pytest.raises(InputError, match="lab.nii.gz: label holds non-integer values"):
        load_case(image, path, 3)


def test_near_integer_float_labels_convert_with_the_voxel_counts_of_their_integer_twin(
        synth_dataset, tmp_path):
    """The Done-when case: float32 labels of 0.99999994 and 1.0000001 against the uint8 originals."""
    import shutil

    twin = tmp_path / "floats"
    shutil.copytree(synth_dataset, twin)
    for path in sorted((twin / "labelsTr").glob("*.nii.gz")):
        source = nib.load(path)
        label = np.asarray(source.dataobj)
        floats = np.select([label == 1, label == 2], [np.float32(0.99999994), np.float32(2.0000002)],
                           0).astype(np.float32)
        floats[label == 1] = np.where(np.arange((label == 1).sum()) % 2, np.float32(1.0000001),
                                      np.float32(0.99999994))
        nib.save(nib.Nifti1Image(floats, source.affine), path)
    a = convert(synth_dataset, tmp_path / "ints.zarr", workers=1, progress=False)
    b = convert(twin, tmp_path / "floats.zarr", workers=1, progress=False)
    assert a.n_volumes == b.n_volumes == 12
    va, vb = open_store(a.path).info, open_store(b.path).info
    assert va.n_volumes == vb.n_volumes
    import zarr

    counts_a = [v["class_voxels"] for v in dict(zarr.open_group(str(a.path), mode="r").attrs)["volumes"]]
    counts_b = [v["class_voxels"] for v in dict(zarr.open_group(str(b.path), mode="r").attrs)["volumes"]]
    assert counts_a == counts_b and all(c[1] > 0 and c[2] > 0 for c in counts_a)
    np.testing.assert_array_equal(open_store(a.path).labels[:], open_store(b.path).labels[:])


# ---------------------------------------------------------------- pairs, names, other formats

def test_hdr_img_pair_is_read(tmp_path):
    data = np.arange(60, dtype=np.int16).reshape(3, 4, 5)
    nib.save(nib.Nifti1Pair(data, np.diag([2.0, 2.0, 2.0, 1.0])), tmp_path / "pair.hdr")
    assert (tmp_path / "pair.img").exists()
    read, image = read_nifti(tmp_path / "pair.hdr")
    np.testing.assert_array_equal(read, data)
    assert load_case(tmp_path / "pair.hdr", None, 3).spacing == (2.0, 2.0, 2.0)


def test_hdr_without_its_img_is_refused_naming_the_missing_file(tmp_path):
    nib.save(nib.Nifti1Pair(np.ones((3, 4, 5), np.int16), np.eye(4)), tmp_path / "pair.hdr")
    (tmp_path / "pair.img").unlink()
    with pytest.raises(InputError, match="pair.img"):
        read_nifti(tmp_path / "pair.hdr")


def test_truncated_img_is_refused(tmp_path):
    nib.save(nib.Nifti1Pair(np.ones((10, 10, 10), np.int16), np.eye(4)), tmp_path / "pair.hdr")
    img = tmp_path / "pair.img"
    img.write_bytes(img.read_bytes()[:100])
    with pytest.raises(InputError, match="pair.img is only 100 bytes"):
        read_nifti(tmp_path / "pair.hdr")


def test_analyze_without_orientation_is_refused_by_name(tmp_path):
    nib.save(nib.AnalyzeImage(np.ones((3, 4, 5), np.int16), np.eye(4)), tmp_path / "old.hdr")
    with pytest.raises(InputError, match="AnalyzeImage"):
        read_nifti(tmp_path / "old.hdr")


def test_img_given_directly_is_refused_pointing_at_its_hdr(tmp_path):
    (tmp_path / "x.img").write_bytes(b"\0" * 64)
    with pytest.raises(InputError, match="give its .hdr"):
        read_nifti(tmp_path / "x.img")


@pytest.mark.parametrize("name", ["UPPER.NII.GZ", "Mixed.Nii", "upper.NII"])
def test_extensions_match_without_regard_to_case(tmp_path, name):
    data = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    write_nifti(tmp_path / name, data)
    np.testing.assert_array_equal(read_nifti(tmp_path / name)[0], data)
    assert load_case(tmp_path / name, None, 3).case_id == name.split(".")[0]


def test_missing_file_is_a_missing_input_error(tmp_path):
    with pytest.raises(MissingInputError):
        read_nifti(tmp_path / "nowhere.nii.gz")


def test_not_a_nifti_at_all_is_refused(tmp_path):
    (tmp_path / "junk.nii").write_bytes(b"this is no header" * 30)
    with pytest.raises(InputError, match="junk.nii"):
        read_nifti(tmp_path / "junk.nii")
