"""Full-head training cases: map a whole-head label (e.g. FreeSurfer's aseg) and split it per hemisphere.

``hipseg convert --label-map 17:1,53:1`` turns each full-head case into two cases, one per
hippocampus, as the Decathlon's crops hold one each: the label is mapped (values not in the
map become background), put in RAS+ order, and its foreground split into left and right by
the plane halfway between the centroids of its two largest connected components (in RAS+
the left one has the smaller x). Each side is written as a NIfTI crop of its bounding box
plus a margin (the other side's labels removed), which the conversion then treats like any
other case; the store records the side in each volume's ``hemisphere`` field.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.orientations import inv_ornt_aff
from scipy import ndimage

from hipseg.discovery import CaseSource
from hipseg.errors import ConfigError, InputError
from hipseg.nifti import orientation_to_canonical, read_nifti, to_canonical

SIDES = ("left", "right")
# Context kept around each hippocampus: more than the ROI margin convert centres crops with,
# so crops of the store's ROI (48x64x48 on the Decathlon) hold real anatomy, not padding.
CROP_MARGIN = 32


def parse_label_map(text: str | dict[int, int]) -> dict[int, int]:
    """``"17:1,53:1"`` -> {17: 1, 53: 1}; a ConfigError names what is wrong."""
    if isinstance(text, dict):
        return {int(k): int(v) for k, v in text.items()}
    mapping = {}
    for item in str(text).split(","):
        source, _, target = item.partition(":")
        try:
            mapping[int(source)] = int(target)
        except ValueError:
            raise ConfigError(f"--label-map: {item!r} is not SOURCE:TARGET with integers "
                              f"(e.g. 17:1,53:1 for FreeSurfer's hippocampi)") from None
    if not mapping or min(mapping.values()) < 1:
        raise ConfigError(f"--label-map {text!r}: map each label to a foreground class (>= 1)")
    return mapping


def split_case(source: CaseSource, mapping: dict[int, int], out: Path) -> list[tuple[CaseSource, str]]:
    """Write the left and right crops of one full-head case under ``out``; [(case, side), ...].

    Raises InputError naming the file when the mapped label does not hold two hippocampi.
    """
    image, image_nifti = read_nifti(source.image)
    label, _ = read_nifti(source.label)
    if label.shape != image.shape:
        raise InputError(source.label, f"label has shape {label.shape} but image has {image.shape}")
    mapped = np.zeros(label.shape, np.uint8)
    for value, target in mapping.items():
        mapped[label == value] = target
    affine = np.asarray(image_nifti.affine, float)
    ornt = orientation_to_canonical(affine)
    canonical_affine = affine @ inv_ornt_aff(ornt, image.shape)
    image, mapped = to_canonical(image, affine), to_canonical(mapped, affine)
    components, n = ndimage.label(mapped > 0)
    if n < 2:
        raise InputError(source.label, f"after --label-map {mapping} the label holds {n} connected "
                         "region(s); a full-head label needs both hippocampi")
    sizes = np.bincount(components.ravel())[1:]
    two = np.argsort(sizes)[-2:] + 1
    centres = [np.argwhere(components == c)[:, 0].mean() for c in two]
    middle = int(round(float(np.mean(centres))))
    results = []
    for side, half in zip(SIDES, (slice(0, middle), slice(middle, None))):
        side_label = np.zeros_like(mapped)
        side_label[half] = mapped[half]
        nonzero = np.argwhere(side_label)
        lo = np.maximum(nonzero.min(axis=0) - CROP_MARGIN, 0)
        hi = np.minimum(nonzero.max(axis=0) + 1 + CROP_MARGIN, side_label.shape)
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        shift = np.eye(4)
        shift[:3, 3] = lo
        crop_affine = canonical_affine @ shift
        case_id = f"{source.case_id}_{side}"
        paths = {}
        for kind, data in (("image", image[box]), ("label", side_label[box])):
            nifti = nib.Nifti1Image(np.ascontiguousarray(data), crop_affine)
            nifti.header.set_xyzt_units("mm")
            paths[kind] = out / f"{kind}s" / f"{case_id}.nii.gz"  # the file name is the case id
            paths[kind].parent.mkdir(parents=True, exist_ok=True)
            nib.save(nifti, paths[kind])
        results.append((CaseSource(case_id, str(paths["image"]), str(paths["label"])), side))
    return results


def split_sources(sources: list[CaseSource], mapping: dict[int, int],
                  out: Path) -> tuple[list[CaseSource], list[dict], dict[str, str]]:
    """Every full-head case split per hemisphere: (cases, skipped, {case id: side})."""
    split, skipped, sides = [], [], {}
    for source in sources:
        if source.image is None or source.label is None:
            split.append(source)  # the conversion reports the missing file
            continue
        try:
            pairs = split_case(source, mapping, out)
        except InputError as error:
            skipped.append({"case": source.case_id, "reason": str(error)})
            continue
        for case, side in pairs:
            split.append(case)
            sides[case.case_id] = side
    return split, skipped, sides
