"""Finding cases: a Decathlon task folder, images/ + labels/ folders, or loose NIfTI files to predict."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from hipseg import store
from hipseg.errors import InputError
from hipseg.nifti import case_id_from_path, is_nifti_name


@dataclass(frozen=True)
class CaseSource:
    """Where one case's files are; either may be missing (that case is then skipped)."""

    case_id: str
    image: str | None
    label: str | None


def _inside(root: Path, relative: str) -> Path | None:
    path = (root / relative).resolve()
    return path if path.is_relative_to(root.resolve()) else None


def discover_decathlon(root: Path) -> tuple[list[CaseSource], list[dict], tuple[str, ...]]:
    """Cases listed in dataset.json's "training"; entries pointing outside the folder are skipped."""
    manifest_path = root / "dataset.json"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise InputError(manifest_path, f"cannot read dataset.json ({error})") from error
    labels = manifest.get("labels") or {"0": "background", "1": "anterior", "2": "posterior"}
    class_names = tuple(str(labels[k]).lower() for k in sorted(labels, key=int))
    sources, skipped = [], []
    for entry in manifest.get("training", []):
        image_rel, label_rel = entry.get("image", ""), entry.get("label", "")
        case_id = case_id_from_path(image_rel or label_rel)
        image, label = _inside(root, image_rel), _inside(root, label_rel)
        if image is None or label is None:
            bad = image_rel if image is None else label_rel
            skipped.append({"case": case_id, "reason": f"dataset.json entry {bad!r} points outside {root}"})
            continue
        sources.append(CaseSource(case_id, str(image), str(label)))
    return sources, skipped, class_names


def discover_folders(root: Path) -> tuple[list[CaseSource], list[dict], tuple[str, ...]]:
    """images/ + labels/ paired by file name."""

    def by_id(folder: Path) -> dict[str, Path]:
        return {case_id_from_path(p): p for p in sorted(folder.iterdir()) if is_nifti_name(p)}

    images, labels = by_id(root / "images"), by_id(root / "labels")
    sources = [
        CaseSource(
            c, str(images.get(c)) if c in images else None, str(labels.get(c)) if c in labels else None
        )
        for c in sorted(set(images) | set(labels))
    ]
    strays = [
        {"case": p.name, "reason": f"{p}: not a NIfTI file (expected .nii or .nii.gz)"}
        for folder in ("images", "labels")
        for p in sorted((root / folder).iterdir())
        if p.is_file() and not p.name.startswith(".") and not is_nifti_name(p)
    ]
    return sources, strays, store.CLASS_NAMES


def discover(src: str | Path) -> tuple[list[CaseSource], list[dict], tuple[str, ...]]:
    root = Path(src)
    if (root / "dataset.json").is_file():
        return discover_decathlon(root)
    if (root / "images").is_dir() and (root / "labels").is_dir():
        return discover_folders(root)
    if not root.exists():
        raise InputError(root, "no such folder")
    raise InputError(
        root,
        "expected a Decathlon task folder (dataset.json, imagesTr/, labelsTr/) "
        "or a folder with images/ and labels/",
    )


def list_inputs(inputs: str | Path) -> list[Path]:
    """A NIfTI file, or the NIfTI files of a folder (else of its images/, imagesTs/, imagesTr/)."""
    path = Path(inputs)
    if path.is_file():
        if not is_nifti_name(path):
            raise InputError(path, "not a NIfTI file (expected a .nii or .nii.gz name)")
        return [path]
    if not path.is_dir():
        raise InputError(path, "no such file or folder")
    for folder in (path, path / "images", path / "imagesTs", path / "imagesTr"):
        if folder.is_dir():
            files = sorted(p for p in folder.iterdir()
                           if is_nifti_name(p) and not p.name.startswith("."))
            if files:
                return files
    raise InputError(path, "no .nii or .nii.gz files here (nor in images/, imagesTs/, imagesTr/)")
