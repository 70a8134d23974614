"""Discovery: dataset.json in both forms, sidecars, letter case, the images/ + labels/ pairing rule."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import zarr

from hipseg.convert import convert
from hipseg.discovery import discover, list_inputs
from hipseg.errors import InputError
from hipseg.store import open_store

SIDECARS = ["._{case}.nii.gz", ".DS_Store", "Thumbs.db", "desktop.ini", "{case}.nii.gz~", ".hidden.nii"]


def _add_sidecars(folder, case: str) -> None:
    for pattern in SIDECARS:
        (folder / pattern.format(case=case)).write_bytes(b"\0\5\26\7" + b"\0" * 4092)  # AppleDouble-like


def _nnunet_twin(decathlon, out, bom_crlf: bool = False):
    """The Decathlon task rewritten as nnU-Net v2 would hold it (no training list)."""
    manifest = json.loads((decathlon / "dataset.json").read_text())
    (out / "imagesTr").mkdir(parents=True)
    (out / "labelsTr").mkdir()
    for entry in manifest["training"]:
        image, label = decathlon / entry["image"], decathlon / entry["label"]
        case = image.name[: -len(".nii.gz")]
        shutil.copy(image, out / "imagesTr" / f"{case}_0000.nii.gz")
        shutil.copy(label, out / "labelsTr" / f"{case}.nii.gz")
    labels = {name: int(value) for value, name in manifest["labels"].items()}
    text = json.dumps({"channel_names": {"0": "T1"}, "labels": labels,
                       "numTraining": len(manifest["training"]), "file_ending": ".nii.gz"}, indent=2)
    if bom_crlf:
        (out / "dataset.json").write_bytes(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode())
    else:
        (out / "dataset.json").write_text(text)
    return out


def _arrays(path):
    group = zarr.open_group(str(path), mode="r")
    ids = [v["case_id"] for v in dict(group.attrs)["volumes"]]
    s = open_store(path)
    return ids, s.images[:], s.labels[:], s.info.class_names


def test_nnunet_v2_dataset_converts_to_the_store_of_its_decathlon_twin(synth_dataset, tmp_path):
    twin = _nnunet_twin(synth_dataset, tmp_path / "Dataset004_Hippocampus")
    _add_sidecars(twin / "imagesTr", "synth_0000")
    _add_sidecars(twin / "labelsTr", "synth_0000")
    convert(synth_dataset, tmp_path / "a.zarr", workers=1, progress=False)
    convert(twin, tmp_path / "b.zarr", workers=1, progress=False)  # no case skipped: no error
    ids_a, images_a, labels_a, names_a = _arrays(tmp_path / "a.zarr")
    ids_b, images_b, labels_b, names_b = _arrays(tmp_path / "b.zarr")
    assert ids_a == ids_b and len(ids_a) == 12 and names_a == names_b
    np.testing.assert_array_equal(images_a, images_b)
    np.testing.assert_array_equal(labels_a, labels_b)


def test_nnunet_v1_training_list_finds_the_channel_files(synth_dataset, tmp_path):
    """nnU-Net v1 lists imagesTr/<case>.nii.gz while the files are <case>_0000.nii.gz."""
    v1 = tmp_path / "Task004"
    shutil.copytree(synth_dataset, v1)
    for path in sorted((v1 / "imagesTr").glob("*.nii.gz")):
        path.rename(path.with_name(path.name.replace(".nii.gz", "_0000.nii.gz")))
    sources, skipped, _ = discover(v1)
    assert skipped == [] and [s.case_id for s in sources] == [s.case_id for s in discover(synth_dataset)[0]]
    assert all(s.image.endswith("_0000.nii.gz") for s in sources)


def test_bom_and_crlf_manifest_is_read(synth_dataset, tmp_path):
    twin = _nnunet_twin(synth_dataset, tmp_path / "windows", bom_crlf=True)
    sources, skipped, names = discover(twin)
    assert len(sources) == 12 and skipped == [] and names == ("background", "anterior", "posterior")
    decathlon = tmp_path / "decathlon"
    shutil.copytree(synth_dataset, decathlon)
    text = (decathlon / "dataset.json").read_text()
    (decathlon / "dataset.json").write_bytes(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode())
    assert [s.case_id for s in discover(decathlon)[0]] == [s.case_id for s in sources]
    report = convert(decathlon, tmp_path / "bom.zarr", workers=1, progress=False)
    assert report.n_volumes == 12 and report.skipped == []


@pytest.mark.parametrize("change, words", [
    ({"labels": {"background": 0, "hippocampus": [1, 2], "anterior": 1}}, "region-based"),
    ({"regions_class_order": [1, 2]}, "region-based"),
    ({"channel_names": {"0": "T1", "1": "FLAIR"}}, "2 image channels"),
    ({"labels": {"background": 0, "anterior": 1, "posterior": 3}}, "without gaps"),
    ({"labels": {"background": 0, "anterior": 1, "posterior": 1}}, "given twice"),
    ({"file_ending": ".png"}, "NIfTI"),
])
def test_manifests_hipseg_cannot_use_are_refused_with_the_reason(synth_dataset, tmp_path, change, words):
    twin = _nnunet_twin(synth_dataset, tmp_path / "t")
    manifest = json.loads((twin / "dataset.json").read_text())
    manifest.update(change)
    (twin / "dataset.json").write_text(json.dumps(manifest))
    with pytest.raises(InputError, match=words) as caught:
        convert(twin, tmp_path / "out.zarr", workers=1, progress=False)
    assert "dataset.json" in str(caught.value)
    assert not (tmp_path / "out.zarr").exists()


def _pair_folder(root, images: list[str], labels: list[str]):
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for name in images:
        (root / "images" / name).write_bytes(b"x")
    for name in labels:
        (root / "labels" / name).write_bytes(b"x")
    return root


def test_sidecars_never_become_cases_or_strays(tmp_path):
    root = _pair_folder(tmp_path, ["a.nii.gz"], ["a.nii.gz"])
    _add_sidecars(root / "images", "a")
    _add_sidecars(root / "labels", "a")
    (root / "images" / "__MACOSX").mkdir()
    sources, skipped, _ = discover(root)
    assert [(s.case_id, s.image is not None, s.label is not None) for s in sources] == [("a", True, True)]
    assert skipped == []
    assert [p.name for p in list_inputs(root / "images")[0]] == ["a.nii.gz"]


def test_pairing_strips_the_channel_suffix_and_ignores_letter_case(tmp_path):
    root = _pair_folder(tmp_path, ["a_0000.nii.gz", "B.NII.GZ", "case_0001.nii.gz", "c.Nii"],
                        ["a.nii.gz", "B.nii.gz", "case_0001.nii.gz", "c.nii"])
    sources, skipped, _ = discover(root)
    pairs = {s.case_id: (s.image.rsplit("/", 1)[1], s.label.rsplit("/", 1)[1]) for s in sources}
    assert pairs == {"a": ("a_0000.nii.gz", "a.nii.gz"), "B": ("B.NII.GZ", "B.nii.gz"),
                     "case_0001": ("case_0001.nii.gz", "case_0001.nii.gz"), "c": ("c.Nii", "c.nii")}
    assert skipped == []


@pytest.mark.parametrize("images, labels, case, names", [
    (["a.nii", "a.nii.gz"], ["a.nii.gz"], "a", ["a.nii", "a.nii.gz"]),
    (["a.nii.gz", "a_0000.nii.gz"], ["a.nii.gz"], "a", ["a.nii.gz", "a_0000.nii.gz"]),
    (["a.nii.gz"], ["a.nii", "a.NII.GZ"], "a", ["a.nii", "a.NII.GZ"]),
])
def test_ambiguous_matches_are_refused_naming_every_candidate(tmp_path, images, labels, case, names):
    root = _pair_folder(tmp_path, images + ["ok.nii.gz"], labels + ["ok.nii.gz"])
    sources, skipped, _ = discover(root)
    assert [s.case_id for s in sources] == ["ok"]
    (entry,) = skipped
    assert entry["case"] == case and "ambiguous" in entry["reason"]
    assert all(name in entry["reason"] for name in names)


def test_several_channels_are_refused(tmp_path):
    root = _pair_folder(tmp_path, ["a_0000.nii.gz", "a_0001.nii.gz"], ["a.nii.gz"])
    sources, skipped, _ = discover(root)
    assert sources == [] and "2 image channels (_0000, _0001)" in skipped[0]["reason"]


def test_hdr_img_pairs_are_cases_and_a_lone_img_is_named(tmp_path):
    root = _pair_folder(tmp_path, ["a.hdr", "a.img", "b.img"], ["a.hdr", "a.img"])
    sources, skipped, _ = discover(root)
    assert [(s.case_id, s.image.endswith("a.hdr")) for s in sources] == [("a", True)]
    assert [s["case"] for s in skipped] == ["b.img"] and "without its .hdr" in skipped[0]["reason"]


def test_predict_inputs_of_one_case_id_are_skipped_by_name(tmp_path):
    for name in ("a.nii", "a.nii.gz", "b.nii.gz", "._b.nii.gz"):
        (tmp_path / name).write_bytes(b"x")
    files, skipped = list_inputs(tmp_path)
    assert [p.name for p in files] == ["b.nii.gz"]
    assert skipped[0]["case"] == "a" and "a.nii," in skipped[0]["reason"]
