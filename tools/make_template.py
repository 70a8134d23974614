"""Derive hipseg's packaged localisation template (hipseg/data/mni152_t1_4mm.nii.gz) from the MNI152 T1.

Input: ``MNI152_T1_2mm.nii.gz`` of ``$HIPSEG_DATA/fullhead`` (FSL's MNI152 T1 2 mm template,
ICBM licence; see that folder's README). Steps: average 2x2x2 blocks of 2 mm voxels into
4 mm voxels (the affine moves half a 2 mm voxel so each new voxel centre is its block's
centre), put the axes in RAS+ order, scale [0, p99.9] to [0, 255] and store uint8. The
result is about 40 KB; the hemisphere box centres in hipseg/localise.py come from the
same folder's FreeSurfer atlas (labels 17 and 53), printed here for checking.

    python tools/make_template.py [--data ../shared/data]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "hipseg" / "data" / "mni152_t1_4mm.nii.gz"


def derive(template: nib.Nifti1Image) -> nib.Nifti1Image:
    data = np.asarray(template.dataobj, dtype=np.float32)
    canonical = nib.as_closest_canonical(nib.Nifti1Image(data, template.affine))
    data, affine = np.asarray(canonical.dataobj, dtype=np.float32), canonical.affine
    even = [s - s % 2 for s in data.shape]
    blocks = data[: even[0], : even[1], : even[2]].reshape(even[0] // 2, 2, even[1] // 2, 2, even[2] // 2, 2)
    coarse = blocks.mean(axis=(1, 3, 5))
    step = np.diag([2.0, 2.0, 2.0, 1.0])
    step[:3, 3] = 0.5
    scaled = np.clip(coarse / np.percentile(coarse, 99.9), 0, 1) * 255
    image = nib.Nifti1Image(np.round(scaled).astype(np.uint8), affine @ step)
    image.header.set_xyzt_units("mm")
    image.header["descrip"] = b"MNI152 T1 (ICBM) 4mm, derived for hipseg localisation"
    return image


def hemisphere_boxes(atlas: nib.Nifti1Image) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    labels = np.asarray(atlas.dataobj)
    boxes = {}
    for name, value in (("left", 17), ("right", 53)):
        world = nib.affines.apply_affine(atlas.affine, np.argwhere(labels == value))
        boxes[name] = (world.min(axis=0), world.max(axis=0))
    return boxes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.environ.get("HIPSEG_DATA", str(REPO.parent / "shared" / "data")))
    args = parser.parse_args()
    folder = Path(args.data) / "fullhead"
    image = derive(nib.load(folder / "MNI152_T1_2mm.nii.gz"))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, OUT)
    print(f"{OUT}: {image.shape}, {OUT.stat().st_size} bytes, axes {nib.aff2axcodes(image.affine)}")
    for name, (lo, hi) in hemisphere_boxes(nib.load(folder / "atlas_desikan_killiany.nii.gz")).items():
        print(f"{name}: box {lo} .. {hi} mm, centre {(lo + hi) / 2} mm")


if __name__ == "__main__":
    main()
