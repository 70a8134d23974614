"""Full-head test subjects: a template head moved by a random pose onto a scanner-like grid.

Follows ``$HIPSEG_DATA/fullhead/README.md``: a random affine in world space (rotation
±15°, translation ±15 mm, scale 0.92-1.08), resampled onto a grid with its own field of
view, voxel size and axis order, a smooth multiplicative bias field (±20 %) and a little
noise, stored int16; the labels follow the same transform (nearest neighbour). The
template is either the real MNI152 + FreeSurfer labels (tests, benchmarks) or, with no
data at hand, the ICBM152 template (read from nilearn) with a synthetic tube painted at each
hippocampus (:func:`painted_template`: the demo and the synthetic tests).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.orientations import axcodes2ornt
from scipy import ndimage
from scipy.spatial.transform import Rotation

from hipseg.localise import HEMISPHERES, HIPPOCAMPUS_CENTRE_MM, load_template
from hipseg.synth import _tube

# Centre of the head's field of view in MNI mm (between the ears, mid-brain height).
HEAD_CENTRE_MM = (0.0, -18.0, 18.0)


@dataclass(frozen=True)
class HeadPose:
    """Template (MNI mm) -> subject (world mm) affine and how it was drawn."""

    matrix: np.ndarray  # 4x4
    rotation_deg: tuple[float, float, float]
    shift_mm: tuple[float, float, float]
    scale: float


def random_pose(rng: np.random.Generator, rotation_deg: float = 15.0, shift_mm: float = 15.0,
                scale: tuple[float, float] = (0.92, 1.08)) -> HeadPose:
    angles = rng.uniform(-rotation_deg, rotation_deg, 3)
    shift = rng.uniform(-shift_mm, shift_mm, 3)
    factor = float(rng.uniform(*scale))
    return make_pose(angles, shift, factor)


def make_pose(angles_deg: Sequence[float], shift_mm: Sequence[float], scale: float) -> HeadPose:
    """Rotate (xyz Euler, degrees) and scale about the head centre, then shift."""
    matrix = np.eye(4)
    linear = Rotation.from_euler("xyz", angles_deg, degrees=True).as_matrix() * scale
    centre = np.asarray(HEAD_CENTRE_MM)
    matrix[:3, :3] = linear
    matrix[:3, 3] = centre - linear @ centre + np.asarray(shift_mm)
    return HeadPose(matrix, tuple(float(a) for a in angles_deg),  # type: ignore[arg-type]
                    tuple(float(s) for s in shift_mm), float(scale))  # type: ignore[arg-type]


def grid_affine(shape: Sequence[int], spacing: Sequence[float], axcodes: str,
                centre_mm: Sequence[float]) -> np.ndarray:
    """Affine of a grid whose voxel axes follow ``axcodes`` (e.g. "LPS", "ASR"), centred on ``centre_mm``.

    ``spacing`` is per voxel axis, in the file's own axis order.
    """
    ornt = axcodes2ornt(tuple(axcodes))  # voxel axis i -> world axis ornt[i, 0], sign ornt[i, 1]
    affine = np.eye(4)
    affine[:3, :3] = 0
    for i, (world_axis, sign) in enumerate(ornt):
        affine[int(world_axis), i] = sign * spacing[i]
    middle = (np.asarray(shape) - 1) / 2.0
    affine[:3, 3] = np.asarray(centre_mm) - affine[:3, :3] @ middle
    return affine


def resample(data: np.ndarray, affine: np.ndarray, world_to_source: np.ndarray, shape: Sequence[int],
             out_affine: np.ndarray, order: int) -> np.ndarray:
    """``data`` (grid ``affine``) seen on the grid ``out_affine``, through a world map (4x4)."""
    to_source = np.linalg.inv(affine) @ world_to_source @ out_affine
    return ndimage.affine_transform(np.asarray(data), to_source[:3, :3], to_source[:3, 3], tuple(shape),
                                    order=order, mode="constant", cval=0)


def bias_field(rng: np.random.Generator, shape: Sequence[int], strength: float = 0.2) -> np.ndarray:
    """Smooth multiplicative field within 1 ± strength (trilinear upsampling of a 3x3x3 draw)."""
    coarse = rng.uniform(-1.0, 1.0, (3, 3, 3))
    index = [np.linspace(0, 2, s) for s in shape]
    field = ndimage.map_coordinates(coarse, np.meshgrid(*index, indexing="ij"), order=1)
    return (1.0 + strength * field).astype(np.float32)


def make_head(template: nib.Nifti1Image, labels: nib.Nifti1Image, pose: HeadPose, *,
              shape: Sequence[int] = (176, 208, 176), spacing: Sequence[float] = (1.0, 1.0, 1.0),
              axcodes: str = "RAS", neck: bool = True, bias: float = 0.2, noise: float = 0.02,
              rng: np.random.Generator | None = None) -> tuple[nib.Nifti1Image, nib.Nifti1Image]:
    """A posed head (int16) and its labels (their own values and dtype), on one grid.

    ``labels`` lies in the template's world (e.g. :func:`freesurfer_hippocampi`: 1 = left,
    2 = right hippocampus, or a whole FreeSurfer aseg).
    The field of view starts at the template's lowest slice (MNI z = -72 mm, the top of the
    neck) or, without ``neck``, at z = -50 mm (through the cerebellum), about 20 or 40 mm
    below the hippocampi.
    """
    rng = rng or np.random.default_rng(0)
    centre = np.array(HEAD_CENTRE_MM, float)
    vertical = [i for i, code in enumerate(axcodes) if code in "SI"][0]
    height = shape[vertical] * spacing[vertical]
    centre[2] = (-72.0 if neck else -50.0) + height / 2.0  # lowest slice: neck, or cerebellum
    world_centre = pose.matrix @ np.array([*centre, 1.0])
    out_affine = grid_affine(shape, spacing, axcodes, world_centre[:3])
    to_template = np.linalg.inv(pose.matrix)
    image = resample(np.asarray(template.dataobj, np.float32), template.affine, to_template, shape,
                     out_affine, order=1)
    label = resample(np.asarray(labels.dataobj), labels.affine, to_template, shape, out_affine, order=0)
    scale = 1000.0 / max(float(np.percentile(image, 99.5)), 1e-6)
    image = image * scale * bias_field(rng, shape, bias)
    image += noise * 1000.0 * rng.standard_normal(image.shape).astype(np.float32)
    head = nib.Nifti1Image(np.clip(np.round(image), -32768, 32767).astype(np.int16), out_affine)
    head.header.set_xyzt_units("mm")
    label_image = nib.Nifti1Image(label, out_affine)  # the labels' own values and dtype
    label_image.header.set_xyzt_units("mm")
    return head, label_image


def freesurfer_hippocampi(atlas: nib.Nifti1Image) -> nib.Nifti1Image:
    """1 = Left-Hippocampus (17), 2 = Right-Hippocampus (53) of a FreeSurfer aseg, else 0."""
    data = np.asarray(atlas.dataobj)
    out = np.where(data == 17, 1, np.where(data == 53, 2, 0)).astype(np.uint8)
    return nib.Nifti1Image(out, atlas.affine)


def painted_template(seed: int = 0, contrast: float = 1.3) -> tuple[nib.Nifti1Image, nib.Nifti1Image]:
    """The ICBM152 template (hipseg.localise.load_template) at 1 mm with a synthetic
    hippocampus tube painted in each hemisphere.

    For the demo and tests without real data: the model trained on hipseg's synthetic tubes
    (:mod:`hipseg.synth`) can segment these, and their labels are exact. Returns (head float32,
    labels uint8 with 1 = left, 2 = right) on one 1 mm grid in MNI space.
    """
    coarse = load_template()
    shape = (180, 216, 180)
    affine = np.eye(4)
    affine[:3, 3] = (-90.0, -126.0, -72.0)
    head = resample(np.asarray(coarse.dataobj, np.float32), coarse.affine, np.eye(4), shape, affine, 1)
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.uint8)
    bright = contrast * float(np.percentile(head, 99))
    for value, hemisphere in enumerate(HEMISPHERES, start=1):
        centre = np.linalg.inv(affine) @ np.array([*HIPPOCAMPUS_CENTRE_MM[hemisphere], 1.0])
        tube = _tube(rng, shape, (1.0, 1.0, 1.0), centre[:3])
        labels[tube > 0] = value
    head[labels > 0] = bright
    return nib.Nifti1Image(head, affine), nib.Nifti1Image(labels, affine)


AXCODES = ("RAS", "LPS", "LAS", "ASR", "PIL", "SRA", "IPR")


def make_cohort(template: nib.Nifti1Image, labels: nib.Nifti1Image, out: str | Path, n: int,
                seed: int = 0) -> Path:
    """``n`` posed heads in ``out/images`` and their hemisphere labels in ``out/labels``.

    Each head draws a pose, a field of view of 176x208x176 ± 16 voxels, 1 mm voxels and an
    axis order from :data:`AXCODES` (the README's recipe); every other head has no neck.
    """
    out = Path(out)
    for folder in ("images", "labels"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    for index in range(n):
        rng = np.random.default_rng([seed, index])
        shape = tuple(int(s) for s in np.array([176, 208, 176]) + rng.integers(-16, 17, 3))
        axcodes = AXCODES[index % len(AXCODES)]
        head, label = make_head(template, labels, random_pose(rng), shape=shape, axcodes=axcodes,
                                neck=index % 2 == 0, rng=rng)
        nib.save(head, out / "images" / f"head_{index:03d}.nii.gz")
        nib.save(label, out / "labels" / f"head_{index:03d}.nii.gz")
    return out


def hemisphere_agreement(prediction: np.ndarray, truth: np.ndarray, spacing: Sequence[float],
                         within_mm: float = 3.0) -> dict[str, dict[str, float]]:
    """Per hemisphere: Dice, share of predicted voxels within ``within_mm`` of the true one, recall.

    ``prediction`` holds any foreground classes of one head (hemisphere told by ``truth``'s
    nearer side); ``truth`` 1 = left, 2 = right (e.g. moved FreeSurfer labels). Distances are
    Euclidean in mm (scipy's distance transform with the voxel ``spacing``).
    """
    predicted = prediction > 0
    distance, nearest = ndimage.distance_transform_edt(truth == 0, sampling=spacing, return_indices=True)
    side_of = truth[tuple(nearest)]  # each voxel's nearest true hippocampus: 1 left, 2 right
    result = {}
    for value, hemisphere in enumerate(HEMISPHERES, start=1):
        mine = predicted & (side_of == value)
        true = truth == value
        overlap = float(np.logical_and(mine, true).sum())
        result[hemisphere] = {
            "dice": 2 * overlap / max(float(mine.sum() + true.sum()), 1.0),
            "within_mm": float((distance[mine] <= within_mm).mean()) if mine.any() else 0.0,
            "recall": overlap / max(float(true.sum()), 1.0),
            "predicted_voxels": float(mine.sum()),
        }
    return result
