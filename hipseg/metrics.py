"""Segmentation metrics: Dice, HD95 and the edge-slice / middle-slice split, per foreground class."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from monai.metrics import compute_hausdorff_distance

EDGE_FRACTION = 0.2


def dice_per_class(prediction: np.ndarray, label: np.ndarray, n_classes: int) -> np.ndarray:
    """Dice of each foreground class (1..K-1); 1.0 where both are empty."""
    scores = np.empty(n_classes - 1)
    for c in range(1, n_classes):
        p, t = prediction == c, label == c
        total = int(p.sum()) + int(t.sum())
        scores[c - 1] = 1.0 if total == 0 else 2.0 * int(np.logical_and(p, t).sum()) / total
    return scores


def hd95_per_class(prediction: np.ndarray, label: np.ndarray, n_classes: int,
                   spacing: Sequence[float]) -> list[float | None]:
    """95th-percentile Hausdorff distance in mm per foreground class (MONAI); None when undefined.

    Undefined means the class is missing from the prediction or the label, where
    MONAI returns inf or nan; JSON has no such numbers, so the case says null.
    """
    def one_hot(volume: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.stack([volume == c for c in range(n_classes)])[None])

    with warnings.catch_warnings():
        # MONAI warns about empty classes (handled below as None) and about a deprecated
        # argument that it passes to itself; neither is actionable for a user.
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", FutureWarning)
        distances = compute_hausdorff_distance(
            one_hot(prediction), one_hot(label), include_background=False, percentile=95,
            spacing=[float(s) for s in spacing])
    return [float(d) if math.isfinite(float(d)) else None for d in distances[0]]


def edge_middle_dice(
    prediction: np.ndarray, label: np.ndarray, n_classes: int, axis: int,
    edge_fraction: float = EDGE_FRACTION,
) -> tuple[list[float | None], list[float | None]]:
    """Dice per class pooled over edge slices and over middle slices of the labelled range.

    The labelled range is the run of slices along ``axis`` holding any hippocampus;
    its first and last ``edge_fraction`` (at least one slice each) are the edge
    slices. None where a set of slices holds neither label nor prediction of a class.
    """
    has_label = np.moveaxis(label > 0, axis, 0).reshape(label.shape[axis], -1).any(axis=1)
    present = np.flatnonzero(has_label)
    if present.size == 0:
        return [None] * (n_classes - 1), [None] * (n_classes - 1)
    first, last = int(present[0]), int(present[-1])
    width = max(1, int(round(edge_fraction * (last - first + 1))))
    index = np.arange(label.shape[axis])
    edge = ((index >= first) & (index < first + width)) | ((index <= last) & (index > last - width))
    middle = (index >= first + width) & (index <= last - width)

    def pooled(mask: np.ndarray) -> list[float | None]:
        p = np.compress(mask, prediction, axis=axis)
        t = np.compress(mask, label, axis=axis)
        scores: list[float | None] = []
        for c in range(1, n_classes):
            total = int((p == c).sum() + (t == c).sum())
            scores.append(None if total == 0 else 2.0 * int(((p == c) & (t == c)).sum()) / total)
        return scores

    return pooled(edge), pooled(middle)
