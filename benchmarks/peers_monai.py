"""The MONAI peer of the loader benchmark: what a practitioner writes for augmented 2D slices.

Same store content as hipseg's loader (every slice of the chosen axis, already
cropped and normalised), held in a ``CacheDataset`` (the deterministic part is
cached, as MONAI recommends), then per sample the usual dictionary transforms:
``RandFlipd`` on the left-right axis (as hipseg flips), ``RandRotated`` (±10°) and ``Rand2DElasticd``
with bilinear images and nearest labels, batched by MONAI's ``DataLoader`` with
the same number of workers. Strengths match ``hipseg.augment.AugmentConfig()``'s
defaults as closely as MONAI's parametrisation allows.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

KEYS = ("image", "label")


def slice_items(
    store_path: str | Path, axis: str = "axial", cases: Sequence[str] | None = None
) -> list[dict[str, np.ndarray]]:
    """Every slice of ``axis`` as {"image": float32 (1, H, W), "label": uint8 (1, H, W)} dicts."""
    from hipseg.store import AXIS_NAMES, open_store

    store = open_store(store_path)
    a = AXIS_NAMES.index(axis)
    images, labels = store.read_all()
    chosen = range(store.n_volumes) if cases is None else [store.case_ids.index(c) for c in cases]
    items = []
    for v in chosen:
        image = np.moveaxis(images[v].astype(np.float32), a, 0)
        label = np.moveaxis(labels[v], a, 0)
        for s in range(image.shape[0]):
            items.append(
                {
                    "image": np.ascontiguousarray(image[s][None]),
                    "label": np.ascontiguousarray(label[s][None]),
                }
            )
    return items


def transforms(
    flip: float = 0.5,
    rotate_degrees: float = 10.0,
    elastic_spacing: float = 12.0,
    elastic_magnitude: tuple[float, float] = (1.0, 2.0),
):
    """(deterministic, random) transform lists of the idiomatic MONAI 2D augmentation pipeline."""
    from monai import transforms as mt

    deterministic = [mt.EnsureTyped(keys=KEYS, dtype=(np.float32, np.int64))]
    random = [
        # Left-right only, like hipseg.augment: axis 0 of axial and coronal slices is left-right.
        mt.RandFlipd(keys=KEYS, prob=flip, spatial_axis=0),
        mt.RandRotated(
            keys=KEYS,
            range_x=math.radians(rotate_degrees),
            prob=1.0,
            mode=("bilinear", "nearest"),
            padding_mode="border",
        ),
        mt.Rand2DElasticd(
            keys=KEYS,
            spacing=(elastic_spacing, elastic_spacing),
            magnitude_range=elastic_magnitude,
            prob=1.0,
            mode=("bilinear", "nearest"),
            padding_mode="border",
        ),
    ]
    return deterministic, random


def monai_loader(
    store_path: str | Path,
    batch_size: int = 32,
    num_workers: int = 2,
    axis: str = "axial",
    cases: Sequence[str] | None = None,
    seed: int = 0,
    flip: float = 0.5,
):
    """``CacheDataset`` + flips, rotation, elastic + ``DataLoader``, seeded."""
    from monai.data import CacheDataset, DataLoader
    from monai.transforms import Compose
    from monai.utils import set_determinism

    set_determinism(seed=seed)
    deterministic, random = transforms(flip=flip)
    dataset = CacheDataset(
        slice_items(store_path, axis, cases),
        Compose(deterministic + random),
        cache_rate=1.0,
        num_workers=0,
        progress=False,
    )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
    )


def monai_batches(
    store_path: str | Path,
    batch_size: int = 32,
    num_workers: int = 2,
    axis: str = "axial",
    seed: int = 0,
) -> Iterator[dict]:
    """Endless batches from ``monai_loader``, epoch after epoch."""
    loader = monai_loader(store_path, batch_size, num_workers, axis, seed=seed)
    while True:
        yield from loader
