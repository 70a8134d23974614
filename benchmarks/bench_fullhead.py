"""Full-head prediction speed: seconds per scan with the localiser (hipseg.localise) and without.

One template-made head (``$HIPSEG_DATA/fullhead`` when present, else hipseg's painted
template: hipseg.headsynth), 176x208x176 at 1 mm, LPS, turned by 10-15° — what a user's
T1 scan looks like. The model is the default 2D U-Net of ``hipseg train`` for the
Decathlon's 48x64x48 ROI, randomly initialised: its weights do not change the time.

``localiser``    hipseg.localise.segment_head: registration + two crops + paste back
``coarse-pass``  hipseg.inference.segment on the canonical volume: the path full heads took
                 before the localiser (a sliding-window pass over the whole head, then one ROI)
``register``     the registration alone
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from benchmarks import _common as c

ROI = (48, 64, 48)
MODES = ("localiser", "coarse-pass", "register")


def make_head_scan() -> tuple[np.ndarray, np.ndarray, str]:
    import nibabel as nib

    from hipseg.headsynth import freesurfer_hippocampi, make_head, make_pose, painted_template

    folder = Path(os.environ.get(c.REAL_ENV) or c.REPO.parent / "shared" / "data") / "fullhead"
    if (folder / "MNI152_T1_2mm.nii.gz").exists():
        template = (nib.load(folder / "MNI152_T1_2mm.nii.gz"),
                    freesurfer_hippocampi(nib.load(folder / "atlas_desikan_killiany.nii.gz")))
        source = "MNI152 2 mm + FreeSurfer"
    else:
        template, source = painted_template(), "packaged template, painted"
    head, _ = make_head(*template, make_pose((12, -10, 15), (8, -12, 6), 1.03), axcodes="LPS",
                        rng=np.random.default_rng(0))
    return np.asarray(head.dataobj), head.affine, source


def default_run():
    import torch

    from hipseg.config import TrainConfig
    from hipseg.models import build_model
    from hipseg.runs import LoadedRun

    config = TrainConfig(store="unused", out="unused", steps=1)
    in_channels = 2 * config.context + 1
    torch.manual_seed(0)
    model = build_model(config.model, in_channels, 3, **config.model_options).eval()
    meta = {"class_names": ["background", "anterior", "posterior"], "roi_shape": list(ROI),
            "in_channels": in_channels, "spatial_dims": 2}
    return LoadedRun(model, config, meta, torch.device("cpu"))


class FullHeadPredict:
    """Seconds per full-head scan on the CPU (torch threads: benchmarks/run.py's setting)."""

    params = [list(MODES)]
    param_names = ["mode"]
    timeout = 600.0

    def setup_cache(self) -> dict:
        data, affine, source = make_head_scan()
        return {"data": data, "affine": affine, "source": source}

    def setup(self, cache: dict, mode: str) -> None:
        from hipseg.nifti import to_canonical
        from hipseg.preprocess import normalise_intensity

        self.run = default_run()
        if mode == "coarse-pass":
            self.canonical = normalise_intensity(to_canonical(cache["data"], cache["affine"]))[0]

    def time_scan(self, cache: dict, mode: str) -> None:
        from hipseg.inference import segment
        from hipseg.localise import register, segment_head

        if mode == "localiser":
            segment_head([self.run], cache["data"], cache["affine"])
        elif mode == "coarse-pass":
            # flip=False: the coarse pass as recorded in docs/benchmarks.md, before the flip default
            segment([self.run], self.canonical, flip=False)
        else:
            register(cache["data"], cache["affine"])
