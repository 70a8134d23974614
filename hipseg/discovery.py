"""Finding cases: a Decathlon / nnU-Net v2 task folder, images/ + labels/ folders, or NIfTI files to predict.

Which files count (every listing below): regular files with a NIfTI name (``.nii``,
``.nii.gz``, ``.hdr`` of a ``.hdr`` + ``.img`` pair; letter case ignored). Hidden
files (``.*``, which includes macOS ``._*`` AppleDouble sidecars and ``.DS_Store``),
``Thumbs.db``, ``desktop.ini``, editor backups (``*~``, ``~$*``) and ``__MACOSX``
are never cases. Other files are listed as skipped ("not a NIfTI file").

Pairing rule (images/ + labels/, and nnU-Net v2's imagesTr/ + labelsTr/): the case id
is the file name without its NIfTI suffix. An image pairs with the label of the same
id; failing that, an image ``<case>_0000`` (nnU-Net's channel suffix, four digits)
pairs with the label ``<case>``. Two files that give one case id (``a.nii`` and
``a.nii.gz``, or ``a.nii.gz`` and ``a_0000.nii.gz``) make the case ambiguous: it is
skipped naming every candidate. Several channels (``_0000`` and ``_0001``) are refused.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from hipseg import store
from hipseg.errors import InputError
from hipseg.manifest import read_manifest
from hipseg.nifti import case_id_from_path
from hipseg.nifti_read import is_nifti_name, nifti_suffix

SIDECAR_NAMES = frozenset({"thumbs.db", "desktop.ini", "ehthumbs.db", "icon\r", "__macosx"})
CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


@dataclass(frozen=True)
class CaseSource:
    """Where one case's files are; either may be missing (that case is then skipped)."""

    case_id: str
    image: str | None
    label: str | None


def is_sidecar(path: Path) -> bool:
    """Hidden files, OS metadata and editor backups: never a case, never reported."""
    name = path.name
    return (name.startswith((".", "~$")) or name.endswith("~")
            or name.lower() in SIDECAR_NAMES)


def _entries(folder: Path) -> tuple[list[Path], list[dict]]:
    """NIfTI files of ``folder`` (sorted) and the non-NIfTI files it holds, as skipped entries."""
    files, strays = [], []
    if not folder.is_dir():
        return files, strays
    names = {p.name.lower() for p in folder.iterdir()}
    for path in sorted(folder.iterdir()):
        if is_sidecar(path) or not path.is_file():
            continue
        if is_nifti_name(path):
            files.append(path)
        elif path.name.lower().endswith((".img", ".img.gz")):
            stem = path.name[: -len(".img.gz")] if path.name.lower().endswith(".gz") else path.stem
            if not {f"{stem.lower()}.hdr", f"{stem.lower()}.hdr.gz"} & names:
                strays.append({"case": path.name,
                               "reason": f"{path}: the data half of a NIfTI pair without its .hdr"})
        else:
            strays.append({"case": path.name,
                           "reason": f"{path}: not a NIfTI file (expected .nii, .nii.gz or .hdr)"})
    return files, strays


def _by_id(files: list[Path]) -> tuple[dict[str, Path], dict[str, list[Path]]]:
    found: dict[str, list[Path]] = defaultdict(list)
    for path in files:
        found[case_id_from_path(path)].append(path)
    unique = {c: paths[0] for c, paths in found.items() if len(paths) == 1}
    return unique, {c: paths for c, paths in found.items() if len(paths) > 1}


def _ambiguous(case_id: str, paths: list[Path]) -> dict:
    names = ", ".join(str(p) for p in paths)
    return {"case": case_id, "reason": f"ambiguous: {len(paths)} files give case id {case_id!r} "
            f"({names}); keep one"}


def pair_folders(images_dir: Path, labels_dir: Path) -> tuple[list[CaseSource], list[dict]]:
    """Pair image and label files by name (rule in the module docstring)."""
    image_files, skipped = _entries(images_dir)
    label_files, label_strays = _entries(labels_dir)
    skipped += label_strays
    labels, label_clashes = _by_id(label_files)
    skipped += [_ambiguous(c, paths) for c, paths in sorted(label_clashes.items())]
    per_case: dict[str, list[tuple[Path, str | None]]] = defaultdict(list)
    for path in image_files:
        file_id = case_id_from_path(path)
        match = CHANNEL_SUFFIX.match(file_id)
        if file_id in labels or file_id in label_clashes or match is None:
            per_case[file_id].append((path, None))
        else:
            per_case[match["case"]].append((path, match["channel"]))
    sources = []
    for case_id in sorted(set(per_case) | set(labels)):
        candidates = per_case.get(case_id, [])
        label = labels.get(case_id)
        if case_id in label_clashes:
            continue
        if len(candidates) > 1:
            channels = sorted(c for _, c in candidates if c is not None)
            if len(channels) == len(candidates) and len(set(channels)) == len(channels):
                skipped.append({"case": case_id, "reason": f"{len(channels)} image channels "
                                f"({', '.join('_' + c for c in channels)}) in {images_dir}: "
                                "hipseg segments one channel (a T1 image)"})
            else:
                skipped.append(_ambiguous(case_id, [p for p, _ in candidates]))
            continue
        image = candidates[0][0] if candidates else None
        sources.append(CaseSource(case_id, None if image is None else str(image),
                                  None if label is None else str(label)))
    return sources, skipped


def _inside(root: Path, relative: str) -> Path | None:
    path = (root / relative).resolve()
    return path if path.is_relative_to(root.resolve()) else None


def _channel_file(image: Path) -> Path | None:
    """nnU-Net v1 lists ``imagesTr/<case>.nii.gz`` while the file is ``<case>_0000.nii.gz``."""
    suffix = nifti_suffix(image)
    if suffix is None:
        return None
    candidate = image.with_name(f"{image.name[: -len(suffix)]}_0000{suffix}")
    return candidate if candidate.exists() else None


def discover_manifest(root: Path) -> tuple[list[CaseSource], list[dict], tuple[str, ...]]:
    """Cases of a dataset.json folder: its "training" list, else imagesTr/ + labelsTr/ by name."""
    manifest = read_manifest(root)
    if manifest.training is None:
        sources, skipped = pair_folders(root / "imagesTr", root / "labelsTr")
        return sources, skipped, manifest.class_names
    sources, skipped = [], []
    for image_rel, label_rel in manifest.training:
        case_id = case_id_from_path(image_rel or label_rel)
        image, label = _inside(root, image_rel), _inside(root, label_rel)
        if image is not None and not image.exists():
            image = _channel_file(image) or image
        if image is None or label is None:
            bad = image_rel if image is None else label_rel
            skipped.append({"case": case_id, "reason": f"dataset.json entry {bad!r} points outside {root}"})
            continue
        sources.append(CaseSource(case_id, str(image), str(label)))
    return sources, skipped, manifest.class_names


def discover_folders(root: Path) -> tuple[list[CaseSource], list[dict], tuple[str, ...]]:
    """images/ + labels/ paired by file name."""
    sources, skipped = pair_folders(root / "images", root / "labels")
    return sources, skipped, store.CLASS_NAMES


def discover(src: str | Path) -> tuple[list[CaseSource], list[dict], tuple[str, ...]]:
    """The training cases of a dataset folder, the files skipped on the way, and its class names.

    Parameters
    ----------
    src
        A local folder: a Decathlon or nnU-Net v2 task folder (``dataset.json``; its
        "training" list, else ``imagesTr/`` + ``labelsTr/``), or a folder holding ``images/``
        and ``labels/`` (paired by case id, module docstring).

    Returns
    -------
    sources
        One :class:`CaseSource` per case id (image and label paths; either may be None).
    skipped
        ``{"case": ..., "reason": ...}`` for each file or entry that is not a usable case.
    class_names
        Class names, background first: from ``dataset.json``'s labels, else
        ``hipseg.store.CLASS_NAMES``.

    Raises
    ------
    InputError
        ``src`` does not exist or has neither layout, or its ``dataset.json`` cannot be used.
    """
    root = Path(src)
    if (root / "dataset.json").is_file():
        return discover_manifest(root)
    if (root / "images").is_dir() and (root / "labels").is_dir():
        return discover_folders(root)
    if not root.exists():
        raise InputError(root, "no such folder")
    raise InputError(
        root,
        "expected a Decathlon or nnU-Net v2 task folder (dataset.json, imagesTr/, labelsTr/) "
        "or a folder with images/ and labels/",
    )


def list_inputs(inputs: str | Path) -> tuple[list[Path], list[dict]]:
    """NIfTI files to predict, and the files skipped among them (ambiguous case ids).

    ``inputs`` is a NIfTI file, or a folder whose NIfTI files are used (else those of
    its images/, imagesTs/, imagesTr/). Sidecars are ignored as in discovery; two files
    of one case id (``a.nii`` and ``a.nii.gz``) would write one output and are skipped.
    """
    path = Path(inputs)
    if path.is_file():
        if not is_nifti_name(path):
            raise InputError(path, "not a NIfTI file (expected a .nii, .nii.gz or .hdr name)")
        return [path], []
    if not path.is_dir():
        raise InputError(path, "no such file or folder")
    for folder in (path, path / "images", path / "imagesTs", path / "imagesTr"):
        files, _ = _entries(folder)
        if files:
            unique, clashes = _by_id(files)
            skipped = [_ambiguous(c, paths) for c, paths in sorted(clashes.items())]
            return sorted(unique.values()), skipped
    raise InputError(path, "no NIfTI files here (nor in images/, imagesTs/, imagesTr/)")
