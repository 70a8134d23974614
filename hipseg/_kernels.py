"""The 2D Numba kernels: slice classification for the sampler and the fused slice-augmentation pass.

The 3D patch kernel is in ``hipseg._kernels3d``.

Kernels are pure functions over arrays: they write into a preallocated ``out``,
hold no Python objects and draw no random numbers (the callers draw parameters
with a ``numpy.random.Generator`` and pass them in). Every kernel is compiled
with ``nogil=True`` so loader threads can run them concurrently, and
``cache=True`` so spawned workers load machine code from disk instead of
compiling again. The batch kernel exists twice, serial (the default: one
thread per loader worker, so workers x threads never oversubscribes the cores)
and ``parallel=True`` over samples, chosen by the caller.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

# Columns of the per-axis geometry table passed to the batch kernel.
GEOM_SLICE_STRIDE, GEOM_H_STRIDE, GEOM_W_STRIDE, GEOM_H, GEOM_W, GEOM_N_SLICES, GEOM_OY, GEOM_OX = (
    range(8)
)
GEOM_COLUMNS = 8
# Columns of the per-sample row table: local volume, slice, axis id.
ROW_VOLUME, ROW_SLICE, ROW_AXIS = range(3)

_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def half_lut() -> np.ndarray:
    """float32 value of each float16 bit pattern (Numba has no CPU float16: images go as bits)."""
    return np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)


@njit(nogil=True, cache=True)
def classify_edges(volume, slice_, counts, n_volumes, threshold, width, out):
    """Mark foreground slices where the hippocampus is only partly present.

    A slice is an edge slice for class k when it holds class k and either its
    voxel count is at most ``threshold`` times that volume's largest count for
    k along this axis, or it lies within ``width`` slices of either end of the
    volume's labelled range for k. One table (one axis) per call.

    A grouped scan over rows in any order: two passes with per-volume running
    maxima and ranges, which numpy could only express with sorts and
    ``reduceat``; the scratch arrays are per-volume and tiny.
    """
    n_rows, n_classes = counts.shape
    vmax = np.zeros((n_volumes, n_classes), np.int64)
    first = np.full((n_volumes, n_classes), np.iinfo(np.int64).max, np.int64)
    last = np.full((n_volumes, n_classes), -1, np.int64)
    for r in range(n_rows):
        v = volume[r]
        for k in range(n_classes):
            c = counts[r, k]
            if c > 0:
                if c > vmax[v, k]:
                    vmax[v, k] = c
                if slice_[r] < first[v, k]:
                    first[v, k] = slice_[r]
                if slice_[r] > last[v, k]:
                    last[v, k] = slice_[r]
    for r in range(n_rows):
        v = volume[r]
        for k in range(n_classes):
            c = counts[r, k]
            s = slice_[r]
            edge = c > 0 and (
                c <= threshold * vmax[v, k] or s < first[v, k] + width or s > last[v, k] - width
            )
            out[r, k] = 1 if edge else 0


@njit(nogil=True, cache=True, inline="always")
def _splitmix(x):
    x = x + _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * _MIX1
    x = (x ^ (x >> np.uint64(27))) * _MIX2
    return x ^ (x >> np.uint64(31))


@njit(nogil=True, cache=True, inline="always")
def _gauss(seed, counter):
    """Standard normal from a counter-based hash: deterministic, no hidden generator state."""
    h1 = _splitmix(seed ^ (counter * np.uint64(2)))
    h2 = _splitmix(seed ^ (counter * np.uint64(2) + np.uint64(1)))
    u1 = (np.float64(h1 >> np.uint64(11)) + 1.0) * (1.0 / 9007199254740992.0)
    u2 = np.float64(h2 >> np.uint64(11)) * (1.0 / 9007199254740992.0)
    return math.sqrt(-2.0 * math.log(u1)) * math.cos(2.0 * math.pi * u2)


@njit(nogil=True, cache=True)
def _augment_one(
    b,
    images,
    labels,
    lut,
    vol_stride,
    rows,
    geom,
    context,
    flips,
    angles,
    ctrl,
    wy,
    iy,
    wxd,
    xband,
    intensity,
    noise_seed,
    out_image,
    out_label,
):
    """One sample of the batch kernel (see ``augment_batch``).

    Row by row: the elastic displacement and the source coordinates of a whole
    output row are computed first in straight loops the compiler vectorises,
    then a gather loop reads the corners. A slice that fills the canvas (one
    axis) takes a path without the zero-padding checks.
    """
    n_channels = out_image.shape[1]
    H = out_image.shape[2]
    W = out_image.shape[3]
    v = rows[b, ROW_VOLUME]
    s = rows[b, ROW_SLICE]
    a = rows[b, ROW_AXIS]
    st_s = geom[a, GEOM_SLICE_STRIDE]
    st_h = geom[a, GEOM_H_STRIDE]
    st_w = geom[a, GEOM_W_STRIDE]
    h = geom[a, GEOM_H]
    w = geom[a, GEOM_W]
    n_slices = geom[a, GEOM_N_SLICES]
    oy = geom[a, GEOM_OY]
    ox = geom[a, GEOM_OX]
    padded = h != H or w != W
    base_v = v * vol_stride
    label_base = base_v + s * st_s
    channel_base = np.empty(n_channels, np.int64)
    for c in range(n_channels):
        channel_base[c] = base_v + min(max(s + c - context, 0), n_slices - 1) * st_s  # edges repeat

    hmax = np.float32(H - 1)
    wmax = np.float32(W - 1)
    cy = np.float32(0.5) * hmax
    cx = np.float32(0.5) * wmax
    ca = np.float32(math.cos(angles[b]))
    sa = np.float32(math.sin(angles[b]))
    # A flip maps r to max - r; written as r * sign + offset so the row loop has no branch.
    sign_y = np.float32(-1.0) if flips[b, 0] != 0 else np.float32(1.0)
    sign_x = np.float32(-1.0) if flips[b, 1] != 0 else np.float32(1.0)
    off_y = hmax if flips[b, 0] != 0 else np.float32(0.0)
    off_x = wmax if flips[b, 1] != 0 else np.float32(0.0)
    scale = intensity[b, 0]
    shift = intensity[b, 1]
    noise_std = intensity[b, 2]
    seed = noise_seed[b]
    elastic = ctrl.shape[2] > 0
    gw = ctrl.shape[3]
    gh = ctrl.shape[2]
    # Control grid already summed along x: (2, gh, W), so each row needs 4 taps per pixel.
    cw = np.zeros((2, gh, W), np.float32)
    if elastic:
        for comp in range(2):
            for i in range(gh):
                for j in range(gw):
                    value = ctrl[b, comp, i, j]
                    for x in range(xband[j, 0], xband[j, 1]):
                        cw[comp, i, x] += value * wxd[j, x]
    dy = np.zeros(W, np.float32)
    dx = np.zeros(W, np.float32)
    src_y = np.empty(W, np.float32)
    src_x = np.empty(W, np.float32)

    for y in range(H):
        if elastic:
            # Cubic B-spline, separable: the x sums are in cw; here the 4 control rows around y.
            i0 = iy[y]
            w0, w1, w2, w3 = wy[y, 0], wy[y, 1], wy[y, 2], wy[y, 3]
            for x in range(W):
                dy[x] = (
                    w0 * cw[0, i0, x]
                    + w1 * cw[0, i0 + 1, x]
                    + w2 * cw[0, i0 + 2, x]
                    + w3 * cw[0, i0 + 3, x]
                )
                dx[x] = (
                    w0 * cw[1, i0, x]
                    + w1 * cw[1, i0 + 1, x]
                    + w2 * cw[1, i0 + 2, x]
                    + w3 * cw[1, i0 + 3, x]
                )
        qy0 = np.float32(y) - cy
        for x in range(W):
            qy = qy0 + dy[x]
            qx = np.float32(x) - cx + dx[x]
            # Sign chosen so that +angle equals scipy.ndimage.rotate(slice, +degrees).
            ry = (cy + ca * qy + sa * qx) * sign_y + off_y
            rx = (cx - sa * qy + ca * qx) * sign_x + off_x
            # Border replication (scipy's mode="nearest"): clamp the source coordinate.
            src_y[x] = min(max(ry, np.float32(0.0)), hmax)
            src_x[x] = min(max(rx, np.float32(0.0)), wmax)
        for x in range(W):
            ry = src_y[x]
            rx = src_x[x]
            y0 = int(ry)
            x0 = int(rx)
            ty = ry - np.float32(y0)
            tx = rx - np.float32(x0)
            y1 = min(y0 + 1, H - 1)
            x1 = min(x0 + 1, W - 1)
            ly = int(ry + np.float32(0.5))
            lx = int(rx + np.float32(0.5))
            if not padded:
                o00 = y0 * st_h + x0 * st_w
                o01 = y0 * st_h + x1 * st_w
                o10 = y1 * st_h + x0 * st_w
                o11 = y1 * st_h + x1 * st_w
                out_label[b, 0, y, x] = labels[label_base + ly * st_h + lx * st_w]
            else:
                # Mixed axes: the slice sits at (oy, ox) on the canvas; outside it reads 0.
                # Indices are only formed for corners inside the slice.
                py0 = y0 - oy
                py1 = y1 - oy
                px0 = x0 - ox
                px1 = x1 - ox
                in_y0 = 0 <= py0 < h
                in_y1 = 0 <= py1 < h
                in_x0 = 0 <= px0 < w
                in_x1 = 0 <= px1 < w
                o00 = py0 * st_h + px0 * st_w if in_y0 and in_x0 else -1
                o01 = py0 * st_h + px1 * st_w if in_y0 and in_x1 else -1
                o10 = py1 * st_h + px0 * st_w if in_y1 and in_x0 else -1
                o11 = py1 * st_h + px1 * st_w if in_y1 and in_x1 else -1
                ly -= oy
                lx -= ox
                if 0 <= ly < h and 0 <= lx < w:
                    out_label[b, 0, y, x] = labels[label_base + ly * st_h + lx * st_w]
                else:
                    out_label[b, 0, y, x] = 0
            for c in range(n_channels):
                base = channel_base[c]
                if not padded:
                    v00 = lut[images[base + o00]]
                    v01 = lut[images[base + o01]]
                    v10 = lut[images[base + o10]]
                    v11 = lut[images[base + o11]]
                else:
                    v00 = lut[images[base + o00]] if o00 >= 0 else np.float32(0.0)
                    v01 = lut[images[base + o01]] if o01 >= 0 else np.float32(0.0)
                    v10 = lut[images[base + o10]] if o10 >= 0 else np.float32(0.0)
                    v11 = lut[images[base + o11]] if o11 >= 0 else np.float32(0.0)
                top = v00 + tx * (v01 - v00)
                bottom = v10 + tx * (v11 - v10)
                value = (top + ty * (bottom - top)) * scale + shift
                if noise_std > 0:
                    counter = np.uint64(((c * H + y) * W) + x)
                    value += noise_std * np.float32(_gauss(seed, counter))
                out_image[b, c, y, x] = value


@njit(nogil=True, cache=True)
def augment_batch(
    images,
    labels,
    lut,
    vol_stride,
    rows,
    geom,
    context,
    flips,
    angles,
    ctrl,
    wy,
    iy,
    wxd,
    xband,
    intensity,
    noise_seed,
    out_image,
    out_label,
):
    """Extract, flip, rotate and elastically deform a batch of slices in one pass.

    Parameters
    ----------
    images : uint16 (n_volumes * vol_stride,)
        float16 bit patterns of the crops, flattened; ``lut`` maps them to float32.
        Each volume is laid out for the axis its samples use (slice-major in
        hipseg.dataset, but any strides in ``geom`` work).
    labels : uint8, same layout as ``images``.
    rows : int64 (B, 3)
        Local volume, slice index and axis id of each sample.
    geom : int64 (n_axes, 8)
        Per axis: slice/row/column strides, in-plane (h, w), slices along the axis,
        and the (oy, ox) offset of the slice inside the (H, W) output canvas.
    context : int
        Neighbouring slices on each side as extra channels (C = 2 * context + 1);
        beyond the volume the edge slice repeats.
    flips : uint8 (B, 2); angles : float32 (B,) radians
    ctrl : float32 (B, 2, gh, gw)
        Elastic control-point displacements (pixels); gh = 0 disables the field.
    wy, iy : float32 (H, 4), int64 (H,)
        Cubic B-spline weights and first control row of each output row.
    wxd, xband : float32 (gw, W), int64 (gw, 2)
        B-spline weight of control column j at output column x, and the columns
        [start, stop) where it is non-zero.
    intensity : float32 (B, 3)
        Scale, shift and noise standard deviation; ``noise_seed`` uint64 (B,).
    out_image : float32 (B, C, H, W); out_label : int64 (B, 1, H, W)

    The source position of output pixel p is F(R(p + d(p))): elastic displacement
    d, rotation R about the canvas centre, then flips F; the image is sampled
    bilinearly and the label at the nearest voxel, with border replication.
    """
    for b in range(rows.shape[0]):
        _augment_one(
            b,
            images,
            labels,
            lut,
            vol_stride,
            rows,
            geom,
            context,
            flips,
            angles,
            ctrl,
            wy,
            iy,
            wxd,
            xband,
            intensity,
            noise_seed,
            out_image,
            out_label,
        )


@njit(nogil=True, cache=True, parallel=True)
def augment_batch_parallel(
    images,
    labels,
    lut,
    vol_stride,
    rows,
    geom,
    context,
    flips,
    angles,
    ctrl,
    wy,
    iy,
    wxd,
    xband,
    intensity,
    noise_seed,
    out_image,
    out_label,
):
    """``augment_batch`` with samples spread over Numba's threads (``numba.set_num_threads``)."""
    for b in prange(rows.shape[0]):
        _augment_one(
            b,
            images,
            labels,
            lut,
            vol_stride,
            rows,
            geom,
            context,
            flips,
            angles,
            ctrl,
            wy,
            iy,
            wxd,
            xband,
            intensity,
            noise_seed,
            out_image,
            out_label,
        )
