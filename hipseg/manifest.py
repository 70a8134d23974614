"""dataset.json: the Medical Segmentation Decathlon form and the nnU-Net v2 form, read into one shape.

Decathlon (Simpson et al. 2019, medicaldecathlon.com): ``"labels": {"0": "background",
"1": "Anterior"}``, ``"modality": {"0": "MRI"}``, ``"training": [{"image", "label"}]``.
nnU-Net v2 (nnunetv2/dataset_conversion/generate_dataset_json.py): ``"labels":
{"background": 0, "Anterior": 1}``, ``"channel_names": {"0": "T1"}``, ``"file_ending":
".nii.gz"``, images ``imagesTr/<case>_0000<ending>`` paired with ``labelsTr/<case><ending>``
by file name (no ``training`` list). Files saved on Windows (UTF-8 byte-order mark, CRLF)
are read as well. Forms hipseg cannot train on are refused with the reason.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from hipseg.errors import InputError

MANIFEST = "dataset.json"
DEFAULT_CLASSES = ("background", "anterior", "posterior")


@dataclass(frozen=True)
class Manifest:
    """What hipseg uses of a dataset.json: class names (index = label value) and the case list."""

    class_names: tuple[str, ...]
    training: tuple[tuple[str, str], ...] | None  # (image, label) relative paths; None: pair by name
    file_ending: str


def _class_names(path: Path, labels: object) -> tuple[str, ...]:
    if not labels:
        return DEFAULT_CLASSES
    if not isinstance(labels, dict):
        raise InputError(path, f'"labels" must be an object, found {type(labels).__name__}')
    by_value: dict[int, str] = {}
    for key, value in labels.items():
        if isinstance(value, (list, tuple)):
            raise InputError(path, f'label {key!r} is a region ({value}): region-based labels '
                             "(nnU-Net's overlapping regions) cannot be trained by hipseg, which "
                             "predicts one class per voxel; list each class with its own value")
        if str(key).strip().lstrip("-").isdigit():  # Decathlon: value -> name
            number, name = int(key), str(value)
        elif isinstance(value, int) and not isinstance(value, bool):  # nnU-Net v2: name -> value
            number, name = value, str(key)
        elif isinstance(value, str) and value.strip().isdigit():
            number, name = int(value), str(key)
        else:
            raise InputError(path, f"label entry {key!r}: {value!r} is neither the Decathlon form "
                             '("1": "name") nor the nnU-Net v2 form ("name": 1)')
        if number in by_value:
            raise InputError(path, f"label value {number} is given twice "
                             f"({by_value[number]!r} and {name!r})")
        by_value[number] = name
    values = sorted(by_value)
    if values != list(range(len(values))):
        raise InputError(path, f"label values {values} must be 0, 1, ... without gaps "
                         "(0 = background); renumber the labels")
    return tuple(by_value[v].strip().lower() for v in values)


def _check_channels(path: Path, manifest: dict) -> None:
    channels = manifest.get("channel_names") or manifest.get("modality") or {}
    if isinstance(channels, dict) and len(channels) > 1:
        listed = ", ".join(f"{k}: {v}" for k, v in channels.items())
        raise InputError(path, f"declares {len(channels)} image channels ({listed}); hipseg "
                         "segments one channel (a T1 image): keep one channel per case")


def read_manifest(root: str | Path) -> Manifest:
    """Parse ``root/dataset.json`` (either form); InputError naming it when hipseg cannot use it."""
    path = Path(root) / MANIFEST
    try:
        # utf-8-sig drops a byte-order mark; json itself accepts CRLF line endings.
        manifest = json.loads(path.read_bytes().decode("utf-8-sig"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(path, f"cannot read dataset.json ({error})") from error
    if not isinstance(manifest, dict):
        raise InputError(path, "dataset.json must hold a JSON object")
    if manifest.get("regions_class_order"):
        raise InputError(path, "region-based training (regions_class_order) cannot be trained by "
                         "hipseg, which predicts one class per voxel")
    class_names = _class_names(path, manifest.get("labels"))
    _check_channels(path, manifest)
    ending = str(manifest.get("file_ending") or ".nii.gz")
    if ending.lower() not in (".nii.gz", ".nii"):
        raise InputError(path, f"file_ending {ending!r}: hipseg reads NIfTI (.nii.gz or .nii) only")
    training = manifest.get("training")
    pairs = None
    if training:
        if not isinstance(training, list):
            raise InputError(path, '"training" must be a list of {"image": ..., "label": ...}')
        pairs = []
        for entry in training:
            if not isinstance(entry, dict):
                raise InputError(path, f'"training" entry {entry!r} is not an object')
            image, label = entry.get("image", ""), entry.get("label", "")
            if isinstance(image, list):
                if len(image) != 1:
                    raise InputError(path, f"training entry with {len(image)} image channels: "
                                     "hipseg segments one channel")
                image = image[0]
            pairs.append((str(image or ""), str(label or "")))
        pairs = tuple(pairs)
    return Manifest(class_names, pairs, ending)
