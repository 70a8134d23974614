"""Peers of the 3D patch benchmark: what practitioners write for augmented 3D crops.

Both read the same store content as hipseg (every selected ROI crop, already
cropped and normalised, whole crops as patches) and apply the same kinds of
augmentation: a left-right flip, rotation about all three axes (±10°) and an
elastic deformation, image bilinear and label nearest, batched by a torch
``DataLoader`` with the same batch size and workers.

- MONAI: ``CacheDataset`` (deterministic part cached) + ``RandFlipd`` +
  ``RandRotated`` (three axes) + ``Rand3DElasticd``, with MetaTensor tracking off
  (``monai.data.set_track_meta(False)``), its fastest setting.
- nnU-Net v2's augmenter ``batchgeneratorsv2``: ``SpatialTransform`` (rotation
  about three axes and elastic deformation in one resampling, as nnU-Net
  configures it, plus ``p_elastic_deform=1``) + ``MirrorTransform`` on the
  left-right axis, per sample in a map-style dataset.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

KEYS = ("image", "label")
ROTATE_DEGREES = 10.0


def crop_items(store_path: str | Path, cases: Sequence[str] | None = None) -> list[dict[str, np.ndarray]]:
    """Every crop as {"image": float32 (1, X, Y, Z), "label": uint8 (1, X, Y, Z)}."""
    from hipseg.store import open_store

    store = open_store(store_path)
    images, labels = store.read_all()
    chosen = range(store.n_volumes) if cases is None else [store.case_ids.index(c) for c in cases]
    return [{"image": images[v][None].astype(np.float32), "label": labels[v][None].copy()}
            for v in chosen]


# ---------------------------------------------------------------- MONAI


def monai_transforms(roi: Sequence[int]):
    """(deterministic, random) MONAI transform lists; strengths as hipseg's defaults allow."""
    from monai import transforms as mt

    angle = math.radians(ROTATE_DEGREES)
    deterministic = [mt.EnsureTyped(keys=KEYS, dtype=(np.float32, np.int64), track_meta=False)]
    random = [
        mt.RandFlipd(keys=KEYS, prob=0.5, spatial_axis=0),  # left-right only, like hipseg
        mt.RandRotated(keys=KEYS, range_x=angle, range_y=angle, range_z=angle, prob=1.0,
                       mode=("bilinear", "nearest"), padding_mode="border"),
        # Gaussian-smoothed displacement (sigma in voxels) of about the B-spline field's size.
        mt.Rand3DElasticd(keys=KEYS, sigma_range=(5.0, 7.0), magnitude_range=(1.0, 2.0), prob=1.0,
                          spatial_size=tuple(int(s) for s in roi), mode=("bilinear", "nearest"),
                          padding_mode="border"),
    ]
    return deterministic, random


def monai_loader(store_path: str | Path, batch_size: int = 4, num_workers: int = 2, seed: int = 0):
    """``CacheDataset`` + flip, 3-axis rotation, 3D elastic + ``DataLoader``, seeded, tracking off."""
    from monai.data import CacheDataset, DataLoader, set_track_meta
    from monai.transforms import Compose
    from monai.utils import set_determinism

    from hipseg.store import open_store

    set_track_meta(False)  # MetaTensor bookkeeping costs more than the maths (MONAI's own advice)
    set_determinism(seed=seed)
    deterministic, random = monai_transforms(open_store(store_path).roi_shape)
    dataset = CacheDataset(crop_items(store_path), Compose(deterministic + random), cache_rate=1.0,
                           num_workers=0, progress=False)
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=num_workers,
                      persistent_workers=num_workers > 0)


# ---------------------------------------------------------------- batchgeneratorsv2 (nnU-Net v2)


def bgv2_transform(roi: Sequence[int]):
    """nnU-Net v2's SpatialTransform + MirrorTransform with hipseg's kinds and strengths."""
    from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
    from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
    from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms

    angle = math.radians(ROTATE_DEGREES)
    return ComposeTransforms([
        SpatialTransform(
            tuple(int(s) for s in roi), patch_center_dist_from_border=0, random_crop=False,
            p_elastic_deform=1.0, p_rotation=1.0, rotation=(-angle, angle), p_rot_per_axis=1.0,
            p_scaling=0.0, mode_seg="nearest", border_mode_seg="border",
            padding_mode_image="border"),
        MirrorTransform(allowed_axes=(0,)),
    ])


class Bgv2Dataset:
    """Map-style dataset: one crop through the batchgeneratorsv2 transforms per item."""

    def __init__(self, store_path: str | Path) -> None:
        import torch

        from hipseg.store import open_store

        self.items = [{"image": torch.from_numpy(i["image"]), "segmentation": torch.from_numpy(
            i["label"].astype(np.int16))} for i in crop_items(store_path)]
        self.transform = bgv2_transform(open_store(store_path).roi_shape)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        out = self.transform(**{k: v.clone() for k, v in self.items[i].items()})
        return {"image": out["image"], "label": out["segmentation"].long()}


def bgv2_loader(store_path: str | Path, batch_size: int = 4, num_workers: int = 2, seed: int = 0):
    import torch

    torch.manual_seed(seed)
    return torch.utils.data.DataLoader(Bgv2Dataset(store_path), batch_size=batch_size, shuffle=True,
                                       num_workers=num_workers, persistent_workers=num_workers > 0)
