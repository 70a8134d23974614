"""Synthetic hippocampus-like data in the Decathlon layout, for tests, the demo and scale benchmarks.

Each case is a curved tube (the hippocampus runs roughly posterior to anterior)
split into an anterior part (label 1) and a posterior part (label 2), in a
textured MRI-like background. Every case is a pure function of (config, index).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, ornt_transform
from scipy import ndimage
from tqdm.auto import tqdm

from hipseg.errors import ConfigError

DTYPES = ("uint8", "int16", "float32")


@dataclass(frozen=True)
class SynthConfig:
    """What to generate. ``shape`` and ``spacing`` are in canonical RAS order."""

    n_cases: int = 24
    shape: tuple[int, int, int] = (36, 50, 36)
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    orientation: str = "RAS"
    dtype: str = "float32"
    intensity_scale: float = 1.0
    off_centre: float = 0.0  # how far (fraction of the shape) the tube's centre may move from the middle
    contrast: float = 0.35  # hippocampus minus surrounding intensity, before scaling
    blur: float = 0.0  # Gaussian sigma in voxels: a motion-blur-like degradation
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_cases < 1:
            raise ConfigError(f"n_cases must be at least 1, got {self.n_cases}")
        if len(self.shape) != 3 or min(self.shape) < 16:
            raise ConfigError(f"shape must be 3 sizes of at least 16 voxels, got {self.shape}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        codes = self.orientation.upper()
        if len(codes) != 3 or sorted(set(codes.translate(str.maketrans("LPI", "RAS")))) != ["A", "R", "S"]:
            raise ConfigError(
                f"orientation must be 3 axis codes like 'RAS' or 'LPI', got {self.orientation!r}"
            )
        if not 0.0 <= self.off_centre <= 0.35:
            raise ConfigError(f"off_centre must be within 0..0.35, got {self.off_centre}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> SynthConfig:
        data = dict(data)
        for key in ("shape", "spacing"):
            if key in data:
                data[key] = tuple(data[key])
        return cls(**data)


PRESETS = {
    "crop": SynthConfig(),
    "head": SynthConfig(
        shape=(182, 218, 182), dtype="int16", intensity_scale=1000.0, off_centre=0.2, orientation="LPS"
    ),
}


def preset(name: str, **overrides) -> SynthConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return replace(PRESETS[name], **overrides)


def _smooth_noise(rng: np.random.Generator, shape: Sequence[int], cell: int) -> np.ndarray:
    """Low-frequency texture: coarse noise upsampled linearly (cheap even for full heads)."""
    coarse = rng.standard_normal([max(2, s // cell + 2) for s in shape]).astype(np.float32)
    factors = [(s + cell) / c for s, c in zip(shape, coarse.shape)]
    fine = ndimage.zoom(coarse, factors, order=1)
    return fine[tuple(slice(0, s) for s in shape)]


def _tube(
    rng: np.random.Generator, shape: Sequence[int], spacing: Sequence[float], centre: np.ndarray
) -> np.ndarray:
    """Label volume with a curved tube along axis 1 (posterior→anterior), split into two classes."""
    spacing = np.asarray(spacing, dtype=np.float64)
    length_mm = rng.uniform(28.0, 36.0)
    bend_mm = rng.uniform(3.0, 6.0) * rng.choice([-1.0, 1.0])
    lift_mm = rng.uniform(2.0, 5.0)
    radius_mm = rng.uniform(3.2, 4.2)
    split = rng.uniform(0.4, 0.55)  # fraction of the length that is posterior
    t = np.linspace(0.0, 1.0, 64)
    centreline = (
        np.stack(
            [
                bend_mm * np.sin(np.pi * t),
                length_mm * (t - 0.5),
                lift_mm * (2.0 * t - 1.0) ** 2,
            ],
            axis=1,
        )
        / spacing
        + centre
    )
    radius = radius_mm * (0.75 + 0.5 * t)  # the anterior head is thicker than the tail

    reach = np.ceil(np.abs(centreline - centre).max(axis=0) + radius.max() / spacing.min() + 2).astype(int)
    lo = np.maximum(np.floor(centre).astype(int) - reach, 0)
    hi = np.minimum(np.ceil(centre).astype(int) + reach + 1, shape)
    grid = np.stack(np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi)], indexing="ij"), axis=-1)
    points_mm = grid.reshape(-1, 3) * spacing
    distance = np.full(points_mm.shape[0], np.inf)
    nearest = np.zeros(points_mm.shape[0], dtype=np.int64)
    for i, point in enumerate(centreline * spacing):
        d = np.linalg.norm(points_mm - point, axis=1) - radius[i]
        closer = d < distance
        distance[closer] = d[closer]
        nearest[closer] = i
    inside = distance <= 0
    classes = np.where(t[nearest] < split, 2, 1).astype(np.uint8)  # posterior 2, anterior 1
    label = np.zeros(tuple(shape), dtype=np.uint8)
    label[tuple(slice(a, b) for a, b in zip(lo, hi))] = np.where(inside, classes, 0).reshape(grid.shape[:3])
    return label


def synth_canonical(config: SynthConfig, index: int) -> tuple[np.ndarray, np.ndarray]:
    """One case in canonical RAS orientation: (image float32 in [0, 1]-ish, label uint8)."""
    rng = np.random.default_rng([config.seed, index])
    shape = np.asarray(config.shape)
    jitter = rng.uniform(-config.off_centre, config.off_centre, size=3) * shape
    centre = shape / 2.0 + jitter
    label = _tube(rng, config.shape, config.spacing, centre)
    texture = _smooth_noise(rng, config.shape, cell=6)
    head = np.linalg.norm((np.indices(config.shape).T - shape / 2.0) / (shape / 2.0), axis=-1).T
    background = 0.25 + 0.25 * (head < 0.95) + 0.05 * texture
    image = background + config.contrast * (label > 0) + 0.03 * rng.standard_normal(config.shape)
    if config.blur > 0:
        image = ndimage.gaussian_filter(image, config.blur)
    return image.astype(np.float32), label


def _to_orientation(array: np.ndarray, affine: np.ndarray, axcodes: str):
    transform = ornt_transform(axcodes2ornt(("R", "A", "S")), axcodes2ornt(tuple(axcodes)))
    return apply_orientation(array, transform), affine @ inv_ornt_aff(transform, array.shape)


def synth_case(config: SynthConfig, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One case as stored on disk: (image in config.dtype, label, affine), in config.orientation."""
    image, label = synth_canonical(config, index)
    scaled = image * config.intensity_scale * (255.0 if config.dtype == "uint8" else 1.0)
    if config.dtype != "float32":
        info = np.iinfo(config.dtype)
        scaled = np.clip(np.round(scaled), info.min, info.max)
    affine = np.diag([*config.spacing, 1.0])
    affine[:3, 3] = -np.asarray(config.shape) * np.asarray(config.spacing) / 2.0
    image_out, affine_out = _to_orientation(scaled.astype(config.dtype), affine, config.orientation.upper())
    label_out, _ = _to_orientation(label, affine, config.orientation.upper())
    return image_out, label_out, affine_out


def case_name(index: int) -> str:
    return f"synth_{index:04d}"


def make_dataset(out_dir: str | Path, config: SynthConfig = SynthConfig(), progress: bool = True) -> Path:
    """Write a Decathlon-layout dataset (dataset.json, imagesTr/, labelsTr/) and return its folder."""
    out = Path(out_dir)
    (out / "imagesTr").mkdir(parents=True, exist_ok=True)
    (out / "labelsTr").mkdir(parents=True, exist_ok=True)
    training = []
    for index in tqdm(range(config.n_cases), desc="synthesising", unit="case", disable=not progress):
        image, label, affine = synth_case(config, index)
        name = f"{case_name(index)}.nii.gz"
        for data, folder in ((image, "imagesTr"), (label, "labelsTr")):
            nifti = nib.Nifti1Image(data, affine)  # the header takes the array's own dtype
            nifti.header.set_xyzt_units("mm")
            nib.save(nifti, out / folder / name)
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    manifest = {
        "name": "SynthHippocampus",
        "description": "Synthetic hippocampus-like tubes generated by hipseg.synth",
        "tensorImageSize": "3D",
        "modality": {"0": "MRI"},
        "labels": {"0": "background", "1": "Anterior", "2": "Posterior"},
        "numTraining": len(training),
        "numTest": 0,
        "training": training,
        "test": [],
        "hipseg_synth": config.to_dict(),
    }
    (out / "dataset.json").write_text(json.dumps(manifest, indent=2))
    return out
