"""Property: any NIfTI header + file is read exactly or refused with an InputError naming the file.

Hypothesis draws the header fields real files get wrong (dims, datatype, byte order,
pixdim, vox_offset, scaling, qform/sform codes) and damages the file (truncation, dims
patched far beyond the data). Every outcome must be either a case whose voxels equal
the numpy reference after the orientation round trip, or an InputError naming the
file: never another exception, and never memory beyond a bound set by the real bytes.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from nifti_factory import write_nifti

from hipseg.errors import InputError
from hipseg.nifti import from_canonical, load_case

READABLE = ["uint8", "int8", "int16", "uint16", "int32", "uint32", "int64", "uint64", "float32", "float64"]
REFUSED_CODES = [0, 1, 32, 128, 255, 1536, 1792, 2048, 2304, 4000]


@st.composite
def nifti_files(draw):
    shape = tuple(draw(st.lists(st.integers(1, 6), min_size=3, max_size=3)))
    # Weighted towards files that should be accepted, so both outcomes are well exercised.
    shape += draw(st.sampled_from([(), (), (), (1,), (2,)]))
    datatype = draw(st.sampled_from(READABLE * 3 + REFUSED_CODES))
    byteorder = draw(st.sampled_from("<>"))
    fields = {
        "byteorder": byteorder,
        "pixdim": tuple(draw(st.lists(st.sampled_from([0.5, 1.0, 1.25, 3.0] * 4 + [0.0]), min_size=3,
                                      max_size=3))),
        "vox_offset": draw(st.sampled_from([352, 352, 352, 368, 512, 0, 100])),
        "qform_code": draw(st.integers(0, 4)),
        "sform_code": draw(st.integers(0, 4)),
    }
    if draw(st.booleans()):
        fields["slope"] = draw(st.sampled_from([0.5, 2.0, -1.0, 0.1]))
        fields["inter"] = draw(st.sampled_from([0.0, 3.0]))
    n = int(np.prod(shape))
    if isinstance(datatype, str):
        dtype = np.dtype(datatype).newbyteorder(byteorder)
        values = np.arange(n).reshape(shape, order="F") % 97
        data = values.astype(dtype)
        payload = data.tobytes(order="F")
    else:
        data, payload = None, b"\3" * (8 * n)
    declared = shape
    if draw(st.integers(0, 9)) == 0:
        declared = (32767, 32767, 32767)  # a header patched far beyond its data
    truncate = draw(st.sampled_from([0] * 6 + [1, 7, len(payload) // 2]))
    gz = draw(st.booleans())
    return declared, datatype, fields, data, payload, truncate, gz


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec=nifti_files())
def test_any_header_reads_exactly_or_is_refused_by_name(tmp_path, spec):
    declared, datatype, fields, data, payload, truncate, gz = spec
    path = tmp_path / ("case.nii.gz" if gz else "case.nii")
    write_nifti(path, payload, declared, datatype, truncate=truncate, **fields)
    raw_bytes = len(payload) + 1024
    tracemalloc.start()
    try:
        case = load_case(path, None, 3)
    except InputError as error:
        assert str(path) in str(error)
        event("refused by name")  # tallied by pytest --hypothesis-show-statistics
        return
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert peak < 64 * raw_bytes + (4 << 20)  # never sized by the header's word alone
    # Accepted: it was complete and of a readable type, and must hold exactly the numbers written.
    assert data is not None and truncate == 0 and declared != (32767, 32767, 32767)
    slope = fields.get("slope", 1.0)
    inter = fields.get("inter", 0.0)
    reference = data.astype(np.float64) * slope + inter
    reference = reference.reshape(reference.shape[:3]) if reference.ndim == 4 else reference
    back = from_canonical(case.image, case.affine)
    np.testing.assert_allclose(back, reference.astype(np.float32), rtol=1e-6)
    assert case.original_shape == reference.shape
    event("accepted, values exact")
