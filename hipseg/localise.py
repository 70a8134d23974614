"""Full-head scans: locate both hippocampi by affine registration, crop, segment, paste back.

The method of hippodeep and HippMapp3r: an affine fit of the head to a template
(here the MNI152 T1 that nilearn ships, block-averaged to 4 mm in memory) places a fixed box per
hemisphere, whose centre comes from FreeSurfer's hippocampus labels in MNI space.
Each step is a function of its own:

1. :func:`register` — SimpleITK, Mattes mutual information, centre-of-mass
   initialisation, similarity then affine, two resolutions (16 and 8 mm then 8 and
   4 mm), on a copy of the scan block-averaged to about 3 mm. Returns the 4x4
   RAS+ map from template (MNI) mm to scan mm and a confidence (Pearson
   correlation of template and registered scan inside the template's head).
2. :func:`hemisphere_grids` — per hemisphere, a 1 mm grid of the model's ROI shape
   whose axes are the template's (so RAS+), centred where the registration puts the
   hippocampus box centre, turned by the registration's rotation only (its polar
   part) so the head's pose is undone and the scan's own size is kept.
3. :func:`sample_crop` — the scan resampled on that grid (linear), normalised as
   the store's crops are (per crop [p0.5, p99.5] -> [0, 1]). When the training crops
   were smaller than the ROI (the Decathlon's ~35x50x36 in a 48x64x48 ROI, zero-padded),
   the crop keeps the same field of view (:func:`training_extent`, plus
   FIELD_OF_VIEW_MARGIN) and zeros around it, so it looks like what the model saw.
4. :func:`segment_crop` — the run(s) on the crop and, by default, on its left-right
   mirror (the training augmentation flips left-right), softmax averaged; a voxel is hippocampus
   where P(background) < 0.5, of the class most likely among the foreground ones; only
   the largest connected component is kept.
5. :func:`paste_back` — every voxel of the scan's own grid takes the crop label
   at its position through the affine (nearest neighbour).

:func:`segment_head` runs them all and checks the result (:class:`HeadQuality`).
Assumes an adult T1-weighted MRI of the head or brain.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from hipseg.errors import ConfigError
from hipseg.inference import TEST_TIME_FLIP, run_probabilities
from hipseg.preprocess import normalise_intensity
from hipseg.runs import LoadedRun

# nilearn ships this 1 mm head template in its wheel; block-averaged by TEMPLATE_FACTOR.
TEMPLATE = "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
TEMPLATE_FACTOR = 4
# Centres of the bounding boxes of FreeSurfer's Left-Hippocampus (17) and Right-Hippocampus (53)
# in the aparc+aseg of the cvs_avg35_inMNI152 subject (MNI mm, RAS+; $HIPSEG_DATA/fullhead,
# checked against the atlas). Bounding-box centres, as `hipseg convert` centres training crops.
# The boxes span 27 x 41 x 39 mm (left) and 32 x 39 x 40 mm (right): the model's ROI
# (48 x 64 x 48 on the Decathlon) leaves a margin of at least 4 mm on every side.
HIPPOCAMPUS_CENTRE_MM = {"left": (-24.0, -26.0, -13.0), "right": (22.5, -24.0, -11.5)}
HEMISPHERES = ("left", "right")

# A scan is a head (or a whole brain) when its field of view spans at least this much on
# every axis; an adult brain measures about 140 x 170 x 120 mm, a hippocampus crop < 70 mm.
FULL_HEAD_MIN_MM = 100.0
# Localisation fails below this correlation of template and registered scan: heads made
# from the real template score 0.97-0.99 and a scan of noise about 0 (tests/test_localise.py,
# docs/training.md).
MIN_CONFIDENCE = 0.5
# The head's size relative to the template: adult heads lie within a few per cent of 1.0;
# outside this range the registration has found something else.
SCALE_RANGE = (0.8, 1.25)
# Plausible volume of one adult hippocampus, all classes, mm^3. Manual tracings give about
# 2,500-4,500 mm^3 (the Decathlon's labels 3,000-4,000) and FreeSurfer about 3,500-5,500
# (UK Biobank nomograms, Nobis et al. 2019, NeuroImage: Clinical 23:101904); the bounds sit
# well outside both, so a flag means a failed segmentation, not an atrophied hippocampus.
VOLUME_RANGE_MM3 = (1000.0, 8000.0)

# Voxels of real anatomy kept on each side beyond the training crops' median extent. Chosen on
# 3 template-made heads with the 10-minute Decathlon model (tools/fullhead_check.py): 0 cut
# FreeSurfer's taller hippocampus (recovered 8-25 %), the whole ROI let the model reach into
# the amygdala (72-89 % of voxels within 3 mm), 4 kept >= 97 % within 3 mm.
FIELD_OF_VIEW_MARGIN = 4

_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def is_full_head(shape: Sequence[int], affine: np.ndarray) -> bool:
    """True when the scan's field of view is at least FULL_HEAD_MIN_MM on every axis."""
    spacing = np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)
    return bool(np.all(np.asarray(shape[:3]) * spacing >= FULL_HEAD_MIN_MM))


@functools.cache
def _template_arrays() -> tuple[np.ndarray, np.ndarray]:
    """uint8 (X, Y, Z) RAS+ template at 4 mm and its affine, derived once per process."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("full-head localisation reads the ICBM152 template that nilearn ships; "
                          "install it with `pip install nilearn`")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / TEMPLATE
    if not path.is_file():
        raise ConfigError(f"{path}: the ICBM152 template is missing from the installed nilearn")
    image = nib.as_closest_canonical(nib.load(str(path)))
    data = np.asarray(image.dataobj, dtype=np.float32)
    f = TEMPLATE_FACTOR
    even = [s - s % f for s in data.shape]
    coarse = data[: even[0], : even[1], : even[2]].reshape(
        even[0] // f, f, even[1] // f, f, even[2] // f, f).mean(axis=(1, 3, 5))
    step = np.diag([float(f)] * 3 + [1.0])
    step[:3, 3] = (f - 1) / 2.0  # each coarse voxel's centre is its block's centre
    scaled = np.clip(coarse / np.percentile(coarse, 99.9), 0, 1) * 255
    return np.round(scaled).astype(np.uint8), image.affine @ step


def load_template() -> nib.Nifti1Image:
    """The MNI ICBM152 T1 template block-averaged to 4 mm, uint8, RAS+ (a fresh copy each call).

    Read from nilearn's package data (``mni_icbm152_t1_tal_nlin_sym_09a_converted``: Fonov
    et al. 2011, NeuroImage 54:313-327; licence notice in hipseg/data/README.md), so nothing is
    downloaded and hipseg tracks no image file. Raises ConfigError without nilearn.
    """
    data, affine = _template_arrays()
    return nib.Nifti1Image(data.copy(), affine)


def _to_sitk(data: np.ndarray, affine: np.ndarray):
    """A SimpleITK image of a (X, Y, Z) array in the RAS+ world of ``affine`` (ITK works in LPS)."""
    import SimpleITK as sitk

    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    direction = affine[:3, :3] / spacing
    u, _, vt = np.linalg.svd(direction)  # nearest orthonormal directions (ITK requires them)
    image = sitk.GetImageFromArray(np.ascontiguousarray(data.T, dtype=np.float32))
    image.SetSpacing([float(s) for s in spacing])
    image.SetDirection([float(v) for v in (_RAS_TO_LPS[:3, :3] @ (u @ vt)).ravel()])
    image.SetOrigin([float(v) for v in _RAS_TO_LPS[:3, :3] @ affine[:3, 3]])
    return image


def _downsample(data: np.ndarray, affine: np.ndarray, target_mm: float = 3.0):
    """Block-average to about ``target_mm`` voxels (registration needs no more detail)."""
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    factors = np.maximum(1, np.round(target_mm / spacing)).astype(int)
    shape = np.asarray(data.shape) // factors
    cut = data[: shape[0] * factors[0], : shape[1] * factors[1], : shape[2] * factors[2]]
    blocks = cut.reshape(shape[0], factors[0], shape[1], factors[1], shape[2], factors[2])
    step = np.diag([*factors, 1]).astype(float)
    step[:3, 3] = (factors - 1) / 2.0
    return blocks.mean(axis=(1, 3, 5), dtype=np.float32), affine @ step


def _percentile_scale(data: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(data, [1.0, 99.0])
    return np.clip((data - lo) / max(hi - lo, 1e-6), 0.0, 1.5).astype(np.float32)


def _affine_to_ras(transform) -> np.ndarray:
    """4x4 RAS+ matrix of an ITK affine (which maps LPS template points to LPS scan points)."""
    matrix = np.asarray(transform.GetMatrix()).reshape(3, 3)
    centre = np.asarray(transform.GetCenter())
    lps = np.eye(4)
    lps[:3, :3] = matrix
    lps[:3, 3] = np.asarray(transform.GetTranslation()) + centre - matrix @ centre
    return _RAS_TO_LPS @ lps @ _RAS_TO_LPS


@dataclass(frozen=True)
class Registration:
    """Template (MNI mm, RAS+) -> scan (world mm, RAS+) and how well they agree."""

    template_to_scan: np.ndarray  # 4x4
    confidence: float  # Pearson correlation inside the template's head, -1..1
    scales: tuple[float, float, float]  # singular values of the linear part


def register(data: np.ndarray, affine: np.ndarray, template: nib.Nifti1Image | None = None,
             threads: int | None = None) -> Registration:
    """Affine registration of a scan (array in its own voxel order, RAS+ ``affine``) to the template."""
    import SimpleITK as sitk

    template = template or load_template()
    small, small_affine = _downsample(np.asarray(data, np.float32), np.asarray(affine, float))
    moving = _to_sitk(_percentile_scale(small), small_affine)
    fixed_data = _percentile_scale(np.asarray(template.dataobj, np.float32))
    fixed = _to_sitk(fixed_data, template.affine)

    def agreement(transform) -> float:
        """Pearson correlation of template and registered scan inside the template's head."""
        resampled = sitk.GetArrayFromImage(sitk.Resample(moving, fixed, transform, sitk.sitkLinear,
                                                         -1.0)).T
        inside = (fixed_data > 0.1) & (resampled >= 0)
        if inside.sum() < 100 or resampled[inside].std() == 0:
            return 0.0
        return float(np.corrcoef(fixed_data[inside], resampled[inside])[0, 1])

    similarity = sitk.CenteredTransformInitializer(fixed, moving, sitk.Similarity3DTransform(),
                                                   sitk.CenteredTransformInitializerFilter.MOMENTS)
    _fit(similarity, fixed, moving, (4, 2), (2.0, 1.0), 1.0, threads)
    affine_fit = sitk.AffineTransform(3)
    affine_fit.SetCenter(similarity.GetCenter())
    affine_fit.SetMatrix(similarity.GetMatrix())
    affine_fit.SetTranslation(similarity.GetTranslation())
    _fit(affine_fit, fixed, moving, (2, 1), (1.0, 0.0), 0.5, threads)
    # The affine stage refines the similarity fit; where it wanders off (a field of view cut
    # through the skull can pull one axis' scale), the similarity fit is kept.
    candidates = [(agreement(t), t) for t in (affine_fit, similarity)]
    confidence, transform = max(candidates, key=lambda pair: pair[0])
    matrix = _affine_to_ras(transform)
    scales = np.linalg.svd(matrix[:3, :3], compute_uv=False)
    return Registration(matrix, confidence, tuple(float(s) for s in scales))  # type: ignore[arg-type]


def _fit(transform, fixed, moving, shrink: Sequence[int], smooth: Sequence[float], step: float,
         threads: int | None) -> None:
    """One multi-resolution Mattes-MI fit of ``transform`` (changed in place)."""
    import SimpleITK as sitk

    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    method.SetMetricSamplingStrategy(method.NONE)  # every voxel: deterministic, cheap at 4 mm
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(learningRate=step, minStep=1e-3,
                                                    numberOfIterations=150, relaxationFactor=0.6)
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel(list(shrink))
    method.SetSmoothingSigmasPerLevel(list(smooth))
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    if threads:
        method.SetNumberOfThreads(threads)
    method.SetInitialTransform(transform, inPlace=True)
    method.Execute(fixed, moving)


def rotation_part(linear: np.ndarray) -> np.ndarray:
    """The rotation R of the polar decomposition ``linear = R @ P`` (P symmetric positive)."""
    u, _, vt = np.linalg.svd(linear)
    rotation = u @ vt
    if np.linalg.det(rotation) < 0:  # a reflection: keep a proper rotation
        u[:, -1] *= -1
        rotation = u @ vt
    return rotation


@dataclass(frozen=True)
class CropGrid:
    """A 1 mm ROI grid in scan world mm: voxel v sits at ``centre + rotation @ (v - roi // 2)``."""

    hemisphere: str
    centre: np.ndarray  # (3,) scan world mm, RAS+
    rotation: np.ndarray  # (3, 3) template axes -> scan world axes
    roi_shape: tuple[int, int, int]

    def voxel_to_world(self) -> np.ndarray:
        """4x4 affine from crop voxel indices to scan world mm."""
        out = np.eye(4)
        out[:3, :3] = self.rotation
        out[:3, 3] = self.centre - self.rotation @ (np.asarray(self.roi_shape) // 2)
        return out


def hemisphere_grids(registration: Registration, roi_shape: Sequence[int]) -> list[CropGrid]:
    """One grid per hemisphere, centred on the registered hippocampus box centre."""
    rotation = rotation_part(registration.template_to_scan[:3, :3])
    grids = []
    for hemisphere in HEMISPHERES:
        centre = registration.template_to_scan @ np.array([*HIPPOCAMPUS_CENTRE_MM[hemisphere], 1.0])
        grids.append(CropGrid(hemisphere, centre[:3], rotation,
                              tuple(int(s) for s in roi_shape)))  # type: ignore[arg-type]
    return grids


def _grid_in_scan_voxels(grid: CropGrid, affine: np.ndarray) -> np.ndarray:
    """(3, X, Y, Z) scan voxel coordinates of every crop voxel."""
    index = np.indices(grid.roi_shape, dtype=np.float64).reshape(3, -1)
    to_voxels = np.linalg.inv(affine) @ grid.voxel_to_world()
    coords = to_voxels[:3, :3] @ index + to_voxels[:3, 3:]
    return coords.reshape(3, *grid.roi_shape)


def training_extent(run: LoadedRun) -> tuple[int, int, int] | None:
    """Median shape of the source crops a run trained on (None: not recorded, or the whole ROI).

    Read from the run's metadata (``crop_extent``) or, for runs saved before it was recorded,
    from the store the run names, when that store is still there.
    """
    extent = run.meta.get("crop_extent")
    if extent is None:
        from hipseg.errors import StoreError
        from hipseg.store import open_store

        try:
            extent = open_store(run.meta.get("store") or run.config.store).crop_extent
        except (StoreError, OSError):  # no store at hand: use the whole ROI
            return None
    if extent is None or np.all(np.asarray(extent) >= np.asarray(run.roi_shape)):
        return None
    return tuple(int(e) for e in extent)  # type: ignore[return-value]


def sample_crop(data: np.ndarray, affine: np.ndarray, grid: CropGrid,
                extent: Sequence[int] | None = None) -> np.ndarray:
    """The scan on ``grid`` (trilinear; 0 outside), normalised as the store's crops: float32 ROI.

    With ``extent``, only a central box of that shape (+ FIELD_OF_VIEW_MARGIN a side) keeps the
    scan, normalised on its own, and the rest is 0, as in the store's zero-padded crops.
    """
    coords = _grid_in_scan_voxels(grid, np.asarray(affine, float))
    values = ndimage.map_coordinates(np.asarray(data, np.float32), coords, order=1, mode="constant",
                                     cval=0.0)
    if extent is None:
        return normalise_intensity(values)[0]
    roi = np.asarray(grid.roi_shape)
    lo = np.maximum((roi - np.asarray(extent)) // 2 - FIELD_OF_VIEW_MARGIN, 0)
    hi = np.minimum(lo + np.asarray(extent) + 2 * FIELD_OF_VIEW_MARGIN, roi)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    out = np.zeros(values.shape, np.float32)
    out[box] = normalise_intensity(values[box])[0]
    return out


def segment_crop(runs: Sequence[LoadedRun], crop: np.ndarray, batch_size: int = 64,
                 flip: bool = TEST_TIME_FLIP) -> np.ndarray:
    """uint8 labels of a normalised ROI crop; only the largest connected hippocampus component.

    ``flip``: test-time left-right flip (:func:`hipseg.inference.run_probabilities`)."""
    probs = np.mean([run_probabilities(r, crop, batch_size, flip) for r in runs], axis=0)
    label = np.where(probs[0] < 0.5, probs[1:].argmax(0) + 1, 0).astype(np.uint8)
    components, n = ndimage.label(label > 0)
    if n > 1:
        largest = int(np.argmax(np.bincount(components.ravel())[1:])) + 1
        label[components != largest] = 0
    return label


def paste_back(crop_label: np.ndarray, grid: CropGrid, shape: Sequence[int],
               affine: np.ndarray) -> np.ndarray:
    """The crop's labels on the scan's own voxel grid (nearest neighbour through the affine)."""
    affine = np.asarray(affine, float)
    out = np.zeros(tuple(shape[:3]), np.uint8)
    to_crop = np.linalg.inv(grid.voxel_to_world()) @ affine  # scan voxel -> crop voxel
    corners = np.array(np.meshgrid(*[[0, s - 1] for s in grid.roi_shape], indexing="ij")).reshape(3, -1)
    in_scan = (np.linalg.inv(affine) @ grid.voxel_to_world())[:3] @ np.vstack([corners, np.ones(8)])
    lo = np.clip(np.floor(in_scan.min(axis=1)).astype(int) - 1, 0, np.asarray(shape[:3]))
    hi = np.clip(np.ceil(in_scan.max(axis=1)).astype(int) + 2, 0, np.asarray(shape[:3]))
    if np.any(hi <= lo):
        return out
    index = np.indices(tuple(hi - lo), dtype=np.float64).reshape(3, -1) + lo[:, None]
    coords = to_crop[:3, :3] @ index + to_crop[:3, 3:]
    values = ndimage.map_coordinates(crop_label, coords, order=0, mode="constant", cval=0)
    out[tuple(slice(a, b) for a, b in zip(lo, hi))] = values.reshape(tuple(hi - lo))
    return out


@dataclass(frozen=True)
class HeadQuality:
    """Whether a full-head result can be trusted, and why not."""

    confidence: float
    reasons: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.reasons

    @property
    def localised(self) -> bool:
        return not any(r.startswith("localisation") for r in self.reasons)


@dataclass(frozen=True)
class HeadSegmentation:
    """A full-head label map in the scan's own grid, split by hemisphere."""

    label: np.ndarray  # uint8, the scan's shape and voxel order
    hemispheres: dict[str, np.ndarray]  # hemisphere -> uint8 labels of that side only
    registration: Registration
    grids: list[CropGrid]
    quality: HeadQuality
    volumes_mm3: dict[str, np.ndarray] = field(default_factory=dict)  # hemisphere -> per class


def check_localisation(registration: Registration) -> list[str]:
    """Why a registration cannot be trusted; empty when it can.

    Parameters
    ----------
    registration
        From :func:`register`: ``confidence`` (Pearson correlation, -1..1) and ``scales``
        (singular values of the template-to-scan linear part, unitless).

    Returns
    -------
    One reason per failed check: correlation below ``MIN_CONFIDENCE``, or a scale outside
    ``SCALE_RANGE``. Raises nothing; callers flag the scan and write no volumes.
    """
    reasons = []
    if not registration.confidence >= MIN_CONFIDENCE:
        reasons.append(f"localisation failed: template correlation {registration.confidence:.2f} "
                       f"< {MIN_CONFIDENCE} (not a T1 head, or registration lost)")
    low, high = SCALE_RANGE
    if min(registration.scales) < low or max(registration.scales) > high:
        reasons.append("localisation failed: head scaled by "
                       + "/".join(f"{s:.2f}" for s in registration.scales)
                       + f" against the template, outside {low}-{high}")
    return reasons


def check_volumes(volumes_mm3: dict[str, np.ndarray]) -> list[str]:
    """Why segmented hippocampal volumes are implausible for an adult; empty when they are not.

    Parameters
    ----------
    volumes_mm3
        ``{hemisphere: per-class volumes}``, each a float array of shape (n_classes,) in mm^3
        with background at index 0 (ignored).

    Returns
    -------
    One reason per hemisphere whose foreground total lies outside ``VOLUME_RANGE_MM3``
    (1,000-8,000 mm^3; sources beside the constant). Raises nothing.
    """
    low, high = VOLUME_RANGE_MM3
    reasons = []
    for hemisphere, per_class in volumes_mm3.items():
        total = float(np.sum(per_class[1:]))
        if not low <= total <= high:
            reasons.append(f"implausible {hemisphere} hippocampus: {total:.0f} mm3 outside the adult "
                           f"range {low:.0f}-{high:.0f} mm3")
    return reasons


def segment_head(runs: Sequence[LoadedRun], data: np.ndarray, affine: np.ndarray,
                 batch_size: int = 64, template: nib.Nifti1Image | None = None,
                 registration: Registration | None = None,
                 flip: bool = TEST_TIME_FLIP) -> HeadSegmentation:
    """Locate, crop, segment and paste back both hippocampi of a full-head scan.

    Parameters
    ----------
    runs
        Trained runs sharing classes and ROI (softmax averaged).
    data, affine
        The scan as stored (X, Y, Z) in any orientation and voxel size, and its 4x4 RAS+ affine.
    registration
        A registration of this scan already made by :func:`register` (else made here).
    flip
        Test-time left-right flip of each hemisphere crop (:func:`segment_crop`).

    Returns
    -------
    HeadSegmentation; when localisation fails the label map is empty and no volumes are given.
    """
    affine = np.asarray(affine, float)
    registration = registration or register(data, affine, template)
    reasons = check_localisation(registration)
    grids = hemisphere_grids(registration, runs[0].roi_shape)
    label = np.zeros(data.shape[:3], np.uint8)
    sides: dict[str, np.ndarray] = {}
    volumes: dict[str, np.ndarray] = {}
    if not reasons:
        n_classes = len(runs[0].class_names)
        voxel_mm3 = abs(float(np.linalg.det(affine[:3, :3])))
        extent = training_extent(runs[0])
        for grid in grids:
            crop_label = segment_crop(runs, sample_crop(data, affine, grid, extent), batch_size, flip)
            side = paste_back(crop_label, grid, data.shape, affine)
            side[label > 0] = 0  # a voxel belongs to one hemisphere (the first that claimed it)
            sides[grid.hemisphere] = side
            label = np.maximum(label, side)
            volumes[grid.hemisphere] = np.bincount(side.ravel(), minlength=n_classes) * voxel_mm3
        reasons = check_volumes(volumes)
    quality = HeadQuality(registration.confidence, tuple(reasons))
    return HeadSegmentation(label, sides, registration, grids, quality, volumes)


def volume_columns(result: HeadSegmentation, class_names: Sequence[str]) -> dict[str, object]:
    """volumes.csv fields of a full-head scan: both sides, each side, and the quality flag.

    Volumes are left empty ("") when localisation failed: there is nothing to measure.
    """
    row: dict[str, object] = {}
    names = list(class_names[1:])
    given = result.quality.localised
    both = sum(result.volumes_mm3.values()) if given else None
    for c, name in enumerate(names, start=1):
        row[f"{name}_mm3"] = float(both[c]) if given else ""
    row["total_mm3"] = float(np.sum(both[1:])) if given else ""
    for hemisphere in HEMISPHERES:
        per_class = result.volumes_mm3.get(hemisphere)
        for c, name in enumerate(names, start=1):
            row[f"{hemisphere}_{name}_mm3"] = float(per_class[c]) if per_class is not None else ""
        row[f"{hemisphere}_total_mm3"] = float(np.sum(per_class[1:])) if per_class is not None else ""
    row["localisation_confidence"] = round(result.quality.confidence, 4)
    row["quality"] = "ok" if result.quality.ok else "flagged"
    row["quality_reasons"] = "; ".join(result.quality.reasons)
    return row
