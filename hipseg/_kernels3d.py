"""Numba kernel of the fused 3D patch augmentation: extract, flip, rotate, scale, deform in one pass.

Same contract as ``hipseg._kernels``: pure functions over arrays that write into
a preallocated ``out``, hold no Python objects and draw no random numbers (the
caller draws the parameters with a ``numpy.random.Generator`` and composes
flip, rotation and scaling into one 3x3 matrix per sample). ``nogil=True`` so
loader threads can run them concurrently, ``cache=True`` so spawned workers
load machine code from disk; serial (the default, one thread per worker) and
``parallel=True`` over samples.

Why our own kernel: MONAI's ``Rand3DElasticd`` and batchgeneratorsv2's
``SpatialTransform`` build a dense coordinate grid as torch tensors and call a
generic resampler, several full-volume passes per sample; here the B-spline
field is evaluated separably (three small passes over the coarse grid, then
four taps per voxel) and each output voxel is computed once.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from hipseg._kernels import _gauss


@njit(nogil=True, cache=True)
def _field_planes(ctrl_b, w1, i1, w2, i2, out):
    """Coarse control grid (3, g0, g1, g2) summed along axes 2 and 1: out (3, g0, P1, P2).

    The remaining sum along axis 0 (four taps) happens per output plane x.
    """
    n_comp, g0, g1, g2 = ctrl_b.shape
    P1 = w1.shape[0]
    P2 = w2.shape[0]
    along_z = np.empty((g1, P2), np.float32)
    for c in range(n_comp):
        for i in range(g0):
            for j in range(g1):
                for z in range(P2):
                    k = i2[z]
                    along_z[j, z] = (
                        w2[z, 0] * ctrl_b[c, i, j, k]
                        + w2[z, 1] * ctrl_b[c, i, j, k + 1]
                        + w2[z, 2] * ctrl_b[c, i, j, k + 2]
                        + w2[z, 3] * ctrl_b[c, i, j, k + 3]
                    )
            for y in range(P1):
                j = i1[y]
                for z in range(P2):
                    out[c, i, y, z] = (
                        w1[y, 0] * along_z[j, z]
                        + w1[y, 1] * along_z[j + 1, z]
                        + w1[y, 2] * along_z[j + 2, z]
                        + w1[y, 3] * along_z[j + 3, z]
                    )


@njit(nogil=True, cache=True)
def _augment3d_one(
    b,
    images,
    labels,
    lut,
    vol_shape,
    volumes,
    centres,
    matrices,
    ctrl,
    w0,
    i0,
    w1,
    i1,
    w2,
    i2,
    intensity,
    noise_seed,
    out_image,
    out_label,
):
    """One sample of ``augment3d_batch``."""
    P0 = out_image.shape[2]
    P1 = out_image.shape[3]
    P2 = out_image.shape[4]
    X = vol_shape[0]
    Y = vol_shape[1]
    Z = vol_shape[2]
    st0 = Y * Z
    st1 = Z
    base = volumes[b] * X * Y * Z
    xmax = np.float32(X - 1)
    ymax = np.float32(Y - 1)
    zmax = np.float32(Z - 1)
    half = np.float32(0.5)
    c0 = np.float32(P0 - 1) * half
    c1 = np.float32(P1 - 1) * half
    c2 = np.float32(P2 - 1) * half
    s0 = centres[b, 0]
    s1 = centres[b, 1]
    s2 = centres[b, 2]
    m00, m01, m02 = matrices[b, 0, 0], matrices[b, 0, 1], matrices[b, 0, 2]
    m10, m11, m12 = matrices[b, 1, 0], matrices[b, 1, 1], matrices[b, 1, 2]
    m20, m21, m22 = matrices[b, 2, 0], matrices[b, 2, 1], matrices[b, 2, 2]
    scale = intensity[b, 0]
    shift = intensity[b, 1]
    noise_std = intensity[b, 2]
    seed = noise_seed[b]
    elastic = ctrl.shape[2] > 0
    if elastic:
        planes = np.empty((3, ctrl.shape[2], P1, P2), np.float32)
        _field_planes(ctrl[b], w1, i1, w2, i2, planes)
    else:
        planes = np.zeros((3, 0, 0, 0), np.float32)
    d0 = np.zeros(P2, np.float32)
    d1 = np.zeros(P2, np.float32)
    d2 = np.zeros(P2, np.float32)
    for x in range(P0):
        if elastic:
            g = i0[x]
            a0, a1, a2, a3 = w0[x, 0], w0[x, 1], w0[x, 2], w0[x, 3]
        for y in range(P1):
            if elastic:
                for z in range(P2):
                    d0[z] = (
                        a0 * planes[0, g, y, z]
                        + a1 * planes[0, g + 1, y, z]
                        + a2 * planes[0, g + 2, y, z]
                        + a3 * planes[0, g + 3, y, z]
                    )
                    d1[z] = (
                        a0 * planes[1, g, y, z]
                        + a1 * planes[1, g + 1, y, z]
                        + a2 * planes[1, g + 2, y, z]
                        + a3 * planes[1, g + 3, y, z]
                    )
                    d2[z] = (
                        a0 * planes[2, g, y, z]
                        + a1 * planes[2, g + 1, y, z]
                        + a2 * planes[2, g + 2, y, z]
                        + a3 * planes[2, g + 3, y, z]
                    )
            q0 = np.float32(x) - c0
            q1 = np.float32(y) - c1
            for z in range(P2):
                p0 = q0 + d0[z]
                p1 = q1 + d1[z]
                p2 = np.float32(z) - c2 + d2[z]
                # Border replication (scipy's mode="nearest"): clamp the source coordinate.
                r0 = min(max(s0 + m00 * p0 + m01 * p1 + m02 * p2, np.float32(0.0)), xmax)
                r1 = min(max(s1 + m10 * p0 + m11 * p1 + m12 * p2, np.float32(0.0)), ymax)
                r2 = min(max(s2 + m20 * p0 + m21 * p1 + m22 * p2, np.float32(0.0)), zmax)
                f0 = int(r0)
                f1 = int(r1)
                f2 = int(r2)
                t0 = r0 - np.float32(f0)
                t1 = r1 - np.float32(f1)
                t2 = r2 - np.float32(f2)
                n0 = min(f0 + 1, X - 1) - f0
                n1 = min(f1 + 1, Y - 1) - f1
                n2 = min(f2 + 1, Z - 1) - f2
                o = base + f0 * st0 + f1 * st1 + f2
                o0 = n0 * st0
                o1 = n1 * st1
                v000 = lut[images[o]]
                v001 = lut[images[o + n2]]
                v010 = lut[images[o + o1]]
                v011 = lut[images[o + o1 + n2]]
                v100 = lut[images[o + o0]]
                v101 = lut[images[o + o0 + n2]]
                v110 = lut[images[o + o0 + o1]]
                v111 = lut[images[o + o0 + o1 + n2]]
                a = v000 + t2 * (v001 - v000)
                bb = v010 + t2 * (v011 - v010)
                cc = v100 + t2 * (v101 - v100)
                dd = v110 + t2 * (v111 - v110)
                lo = a + t1 * (bb - a)
                hi = cc + t1 * (dd - cc)
                value = (lo + t0 * (hi - lo)) * scale + shift
                if noise_std > 0:
                    counter = np.uint64((x * P1 + y) * P2 + z)
                    value += noise_std * np.float32(_gauss(seed, counter))
                out_image[b, 0, x, y, z] = value
                l0 = int(r0 + half)
                l1 = int(r1 + half)
                l2 = int(r2 + half)
                out_label[b, 0, x, y, z] = labels[base + l0 * st0 + l1 * st1 + l2]


@njit(nogil=True, cache=True)
def augment3d_batch(
    images,
    labels,
    lut,
    vol_shape,
    volumes,
    centres,
    matrices,
    ctrl,
    w0,
    i0,
    w1,
    i1,
    w2,
    i2,
    intensity,
    noise_seed,
    out_image,
    out_label,
):
    """Extract, flip, rotate, scale and elastically deform a batch of 3D patches in one pass.

    Parameters
    ----------
    images : uint16 (n_volumes * X * Y * Z,)
        float16 bit patterns of the crops, C-ordered (X, Y, Z) each; ``lut`` maps them
        to float32.
    labels : uint8, same layout as ``images``.
    vol_shape : int64 (3,) the crops' (X, Y, Z).
    volumes : int64 (B,) which crop each sample reads.
    centres : float32 (B, 3) source voxel coordinates the patch centre maps to.
    matrices : float32 (B, 3, 3)
        Flip, rotation and scaling composed: output offset from the patch centre ->
        source offset from ``centres``.
    ctrl : float32 (B, 3, g0, g1, g2)
        Elastic control-point displacements in voxels (output frame); g0 = 0 turns
        the field off.
    w0, i0 ... w2, i2 : float32 (P_a, 4), int64 (P_a,)
        Cubic B-spline weights and first control index of each output index per axis.
    intensity : float32 (B, 3) scale, shift, noise standard deviation; ``noise_seed``
        uint64 (B,).
    out_image : float32 (B, 1, P0, P1, P2); out_label : int64 (B, 1, P0, P1, P2)

    Output voxel p reads source ``centres + M (p - c + d(p))`` with c the patch centre
    ((P - 1) / 2) and d the B-spline displacement: the image trilinearly, the label at
    the nearest voxel, coordinates clamped to the crop (border replication).
    """
    for b in range(volumes.shape[0]):
        _augment3d_one(
            b, images, labels, lut, vol_shape, volumes, centres, matrices, ctrl,
            w0, i0, w1, i1, w2, i2, intensity, noise_seed, out_image, out_label,
        )  # fmt: skip


@njit(nogil=True, cache=True, parallel=True)
def augment3d_batch_parallel(
    images,
    labels,
    lut,
    vol_shape,
    volumes,
    centres,
    matrices,
    ctrl,
    w0,
    i0,
    w1,
    i1,
    w2,
    i2,
    intensity,
    noise_seed,
    out_image,
    out_label,
):
    """``augment3d_batch`` with samples spread over Numba's threads."""
    for b in prange(volumes.shape[0]):
        _augment3d_one(
            b, images, labels, lut, vol_shape, volumes, centres, matrices, ctrl,
            w0, i0, w1, i1, w2, i2, intensity, noise_seed, out_image, out_label,
        )  # fmt: skip
