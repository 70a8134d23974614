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
    """Dice of each foreground class (1..K-1); 1.0 where both are empty (nothing missed, nothing
    added: the convention of MONAI's ``DiceMetric(ignore_empty=False)``)."""
    scores = np.empty(n_classes - 1)
    for c in range(1, n_classes):
        p, t = prediction == c, label == c
        total = int(p.sum()) + int(t.sum())
        scores[c - 1] = 1.0 if total == 0 else 2.0 * int(np.logical_and(p, t).sum()) / total
    return scores


def hd95_per_class(prediction: np.ndarray, label: np.ndarray, n_classes: int,
                   spacing: Sequence[float]) -> list[float]:
    """95th-percentile Hausdorff distance in mm per foreground class (MONAI), with a convention
    for a class missing from the prediction or the label.

    MONAI's value is used where the class is in both. Where it is in both neither, the
    distance is 0.0 (nothing to disagree on, as Dice is 1.0 there). Where it is in exactly
    one, the distance is undefined (MONAI says inf or nan) and the case counts at the
    worst case: the image diagonal in mm, ``sqrt(sum((shape * spacing) ** 2))``, an upper
    bound on any distance between two voxels of the image (the BraTS challenge scores a
    missed region the same way: 373.13 mm, the diagonal of its 240x240x155 1 mm grid).
    :func:`hd95_missing` says which classes took that value.
    """
    def one_hot(volume: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.stack([volume == c for c in range(n_classes)])[None])

    with warnings.catch_warnings():
        # MONAI warns about empty classes (handled below) and about a deprecated
        # argument that it passes to itself; neither is actionable for a user.
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", FutureWarning)
        distances = compute_hausdorff_distance(
            one_hot(prediction), one_hot(label), include_background=False, percentile=95,
            spacing=[float(s) for s in spacing])
    worst = image_diagonal_mm(label.shape, spacing)
    values = []
    for c, d in enumerate(distances[0].tolist(), start=1):
        in_prediction, in_label = bool(np.any(prediction == c)), bool(np.any(label == c))
        if in_prediction and in_label and math.isfinite(d):
            values.append(float(d))
        elif not in_prediction and not in_label:
            values.append(0.0)
        else:
            values.append(worst)
    return values


def hd95_missing(prediction: np.ndarray, label: np.ndarray, n_classes: int) -> list[bool]:
    """Per foreground class: present in exactly one of prediction and label (HD95 at worst case)."""
    return [bool(np.any(prediction == c)) != bool(np.any(label == c)) for c in range(1, n_classes)]


def image_diagonal_mm(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """Length of the image's diagonal in mm: the largest distance between two of its voxels."""
    return float(np.sqrt(np.sum((np.asarray(shape[:3], float) * np.asarray(spacing[:3], float)) ** 2)))


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
