"""Inference on canonical, normalised volumes: softmax of a trained run, ROI location, segmentation.

How one volume is segmented (:func:`segment`), without ever looking at a label:

1. The image is put in the canonical RAS+ orientation and normalised exactly as
   the store's crops were (per-volume [p0.5, p99.5] -> [0, 1]).
2. Coarse pass over the whole volume. A 2D model sees every slice along its
   axis through :func:`monai.inferers.sliding_window_inference` with windows of
   the slice shape it was trained on (so its group normalisation sees crops of
   the size it learned from), 25 % overlap and Gaussian blending of the
   softmax; volumes smaller than a window are zero-padded, as the store's crops
   are. A 3D model slides a window of the store's ROI over the volume.
3. Locate: the largest connected component of predicted hippocampus; the ROI
   (the store's crop shape) is centred on its bounding box, the same rule
   ``hipseg convert`` used to centre training crops on the label's box. When the
   coarse pass finds nothing, the ROI is centred on the volume.
4. Fine pass on that ROI crop, where the input looks like the training data; with
   several runs (a multi-view ensemble, e.g. axial + sagittal + coronal models) their
   softmax outputs are averaged, and with ``flip`` each run's softmax is averaged with
   that of the left-right mirrored crop (test-time augmentation).
5. The crop's labels are put back into the volume (background outside the ROI)
   and the volume is returned to the input's own orientation.

Scans of full-head size (e.g. 182x218x182; :func:`hipseg.localise.is_full_head`) do not
come here: ``hipseg predict`` sends them through :func:`hipseg.localise.segment_head`
(template registration locates both hippocampi). The coarse pass above is for volumes
larger than the ROI but smaller than a head.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from scipy import ndimage

from hipseg.errors import ConfigError
from hipseg.preprocess import crop, label_bbox, roi_offset, uncrop
from hipseg.runs import LoadedRun, load_run
from hipseg.store import axis_index


def slice_stack(volume: np.ndarray, axis: int, context: int) -> np.ndarray:
    """(n, 2*context+1, H, W): each slice along ``axis`` with its neighbours as channels.

    Neighbours beyond the volume's ends repeat the end slice, as in the training loader.
    """
    moved = np.moveaxis(volume, axis, 0)
    n = moved.shape[0]
    index = np.clip(np.arange(n)[:, None] + np.arange(-context, context + 1)[None, :], 0, n - 1)
    return np.ascontiguousarray(moved[index], dtype=np.float32)


def volume_probabilities(
    model: torch.nn.Module, volume: np.ndarray, *, axis: str, context: int, window: Sequence[int],
    dims: int, device: torch.device | str = "cpu", batch_size: int = 64, overlap: float = 0.25,
) -> np.ndarray:
    """Softmax (K, *volume.shape) of ``model`` over a canonical, normalised ``volume``.

    Inputs exactly the size of ``window`` go through the model directly; any other size
    goes through sliding-window inference with windows of that size.
    """
    window = tuple(int(w) for w in window)

    def predictor(x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(model(x), dim=1)

    def run(batch: torch.Tensor) -> torch.Tensor:
        batch = batch.to(device)
        if tuple(batch.shape[2:]) == window:
            return predictor(batch)
        return sliding_window_inference(batch, window, batch_size, predictor, overlap=overlap,
                                        mode="gaussian", padding_mode="constant", cval=0.0)

    with torch.inference_mode():
        if dims == 3:
            probs = run(torch.from_numpy(np.ascontiguousarray(volume, np.float32))[None, None])
            return probs[0].float().cpu().numpy()
        a = axis_index(axis)
        stack = torch.from_numpy(slice_stack(volume, a, context))
        chunks = [run(stack[i:i + batch_size]).float().cpu()
                  for i in range(0, len(stack), batch_size)]
        probs = torch.cat(chunks).numpy()  # (n, K, H, W)
    return np.ascontiguousarray(np.moveaxis(probs, 0, 1 + a))


# Test-time left-right flip by default in evaluate, predict and crossval. Chosen by the
# 5-fold cross-validation of the default 10-minute run on the 200 real cases (docs/training.md):
# mean Dice 0.872 -> 0.875, better on every fold (+0.002 to +0.005), as it was at 400 steps;
# the price is a second fine pass.
TEST_TIME_FLIP = True


def run_probabilities(run: LoadedRun, volume: np.ndarray, batch_size: int = 64,
                      flip: bool = False) -> np.ndarray:
    """Softmax (K, *volume.shape) of one run over a canonical, normalised volume.

    ``flip``: test-time augmentation by the left-right mirror, the flip the model was
    trained with: the softmax of the volume and the mirrored softmax of its mirror are
    averaged. Left-right is array axis 0 of a canonical RAS+ volume.
    """
    def probs(v: np.ndarray) -> np.ndarray:
        return volume_probabilities(run.model, v, axis=run.config.axis,
                                    context=run.config.context, window=run.window,
                                    dims=run.spatial_dims, device=run.device,
                                    batch_size=batch_size)

    out = probs(volume)
    if flip:
        out = 0.5 * (out + probs(np.ascontiguousarray(volume[::-1]))[:, ::-1])
    return out


def locate(foreground: np.ndarray, roi_shape: Sequence[int]) -> np.ndarray | None:
    """Offset of a ROI centred on the largest connected foreground component; None if empty."""
    components, n = ndimage.label(foreground)
    if n == 0:
        return None
    largest = int(np.argmax(np.bincount(components.ravel())[1:])) + 1
    box = label_bbox(components == largest)
    return None if box is None else roi_offset(box[0], box[1], roi_shape)


@dataclass(frozen=True)
class Segmentation:
    """A canonical label map and where its ROI was placed."""

    label: np.ndarray  # uint8, canonical, the volume's shape
    offset: tuple[int, int, int] | None  # None: crops placed by hipseg.localise (full heads)
    located: bool  # False when the coarse pass found nothing and the ROI was centred




def segment(runs: Sequence[LoadedRun], image: np.ndarray, batch_size: int = 64,
            flip: bool = TEST_TIME_FLIP) -> Segmentation:
    """Segment one canonical, normalised volume (see the module docstring for the steps).

    ``flip`` adds the left-right mirror to the fine pass (:func:`run_probabilities`).
    """
    if not runs:
        raise ConfigError("segment needs at least one trained run")
    roi = runs[0].roi_shape
    coarse = run_probabilities(runs[0], image, batch_size).argmax(0) > 0
    offset = locate(coarse, roi)
    located = offset is not None
    if offset is None:
        offset = (np.asarray(image.shape) - np.asarray(roi)) // 2
    patch = crop(image, offset, roi)
    probs = np.mean([run_probabilities(r, patch, batch_size, flip) for r in runs], axis=0)
    label = uncrop(probs.argmax(0).astype(np.uint8), offset, image.shape)
    return Segmentation(label, tuple(int(o) for o in offset), located)  # type: ignore[arg-type]


def load_runs(run_dir: str | Path, ensemble: Sequence[str | Path] = (), which: str = "best",
              device: str = "cpu") -> list[LoadedRun]:
    """The run and any ensemble members; they must share classes and ROI shape."""
    runs = [load_run(d, which, device) for d in [run_dir, *ensemble]]
    for d, r in zip(ensemble, runs[1:], strict=True):
        if r.class_names != runs[0].class_names or r.roi_shape != runs[0].roi_shape:
            raise ConfigError(f"{d}: ensemble member trained on classes {r.class_names} and ROI "
                              f"{r.roi_shape}, but {run_dir} on {runs[0].class_names} and "
                              f"{runs[0].roi_shape}; ensemble runs trained on the same store")
    return runs
