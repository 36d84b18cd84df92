"""An image inside an MSD or nnU-Net raw dataset takes its modality from the dataset's ``dataset.json``.

Found walking the napari loop on the shared hippocampus set: every scan asked "What kind of image is ...?" although
its ``dataset.json`` says ``"modality": {"0": "MRI"}`` (the class names were already read from the same file).
"""
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from engine.io import load_volume
from engine.modality import modality_beside

SHARED = Path(os.environ.get("MAMBAHOME_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def _mr_like(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.random.default_rng(0).uniform(0, 900, (12, 14, 10)).astype(np.float32)  # no Hounsfield-unit guess
    nib.save(nib.Nifti1Image(data, np.diag([0.9, 0.9, 2.5, 1.0])), str(path))
    return path


def _meta(folder: Path, **meta) -> None:
    (folder / "dataset.json").write_text(json.dumps(meta), encoding="utf-8")


def test_msd_layout_names_the_modality_of_images_in_imagestr_and_imagests(tmp_path):
    _meta(tmp_path, name="Task04", modality={"0": "MRI"}, labels={"0": "background", "1": "a"})
    for sub in ("imagesTr", "imagesTs"):
        v = load_volume(_mr_like(tmp_path / sub / "hippo_001.nii.gz"))
        assert (v.modality, v.modality_source) == ("MR", "file")


def test_nnunet_channels_are_told_apart_by_their_suffix(tmp_path):
    _meta(tmp_path, channel_names={"0": "CT", "1": "T2"}, labels={"background": 0, "a": 1}, file_ending=".nii.gz")
    assert load_volume(_mr_like(tmp_path / "imagesTr" / "case_0001.nii.gz")).modality == "MR"
    assert modality_beside(tmp_path / "imagesTr" / "case_0000.nii.gz") == "CT"
    # a channel the dataset does not have, or a file without a channel suffix: no answer from the dataset
    assert modality_beside(tmp_path / "imagesTr" / "case_0002.nii.gz") is None
    assert load_volume(_mr_like(tmp_path / "imagesTr" / "loose.nii.gz")).modality_source != "file"


@pytest.mark.parametrize("text", ['{"channel_names": {"0": "PET"}}', "{not json", '["a list"]',
                                  '{"channel_names": {"zero": "MRI", "one": "CT"}}'])
def test_a_dataset_json_that_names_no_known_modality_falls_back_to_the_guess(tmp_path, text):
    (tmp_path / "dataset.json").write_text(text, encoding="utf-8")
    v = load_volume(_mr_like(tmp_path / "imagesTr" / "x_0000.nii.gz"))
    assert v.modality_source != "file"


def test_a_modality_the_file_itself_names_wins_over_the_dataset(tmp_path):
    import nrrd

    _meta(tmp_path, modality={"0": "MRI"})
    path = tmp_path / "imagesTr" / "c.nrrd"
    path.parent.mkdir()
    data = np.full((6, 7, 8), 40, np.int16)
    nrrd.write(str(path), data, {"space": "left-posterior-superior", "space directions": np.eye(3),
                                 "space origin": np.zeros(3), "modality": "CT"})
    assert load_volume(path).modality == "CT"


def test_a_file_outside_any_dataset_is_unchanged(tmp_path):
    v = load_volume(_mr_like(tmp_path / "a" / "b" / "scan.nii.gz"))
    assert v.modality_source != "file"


@pytest.mark.skipif(not (SHARED / "hippocampus" / "dataset.json").is_file(), reason="shared data not beside")
def test_the_shared_hippocampus_scans_are_mr_from_their_dataset_json():
    image = sorted((SHARED / "hippocampus" / "imagesTr").glob("*.nii.gz"))[0]
    v = load_volume(image)
    assert (v.modality, v.modality_source) == ("MR", "file")


def test_a_training_entrys_own_modality_wins_in_a_mixed_set(tmp_path):
    _meta(tmp_path, modality={"0": "CT"}, labels={"0": "background", "1": "a"},
          training=[{"image": "./imagesTr/ct1.nii.gz", "label": "./labelsTr/ct1.nii.gz"},
                    {"image": "./imagesTr/mr1.nii.gz", "label": "./labelsTr/mr1.nii.gz", "modality": "MR"}])
    assert load_volume(_mr_like(tmp_path / "imagesTr" / "mr1.nii.gz")).modality == "MR"
    assert modality_beside(tmp_path / "imagesTr" / "mr1_0000.nii.gz") == "MR"  # v1's channel files of that entry
    assert modality_beside(tmp_path / "imagesTr" / "ct1.nii.gz") == "CT"
    assert modality_beside(tmp_path / "imagesTs" / "unlisted.nii.gz") is None  # mixed set, file not listed


def test_only_images_folders_of_a_dataset_are_answered(tmp_path):
    _meta(tmp_path, modality={"0": "MRI"})
    assert modality_beside(tmp_path / "scan.nii.gz") is None
    assert modality_beside(tmp_path / "predictions" / "scan.nii.gz") is None
    assert modality_beside(tmp_path / "imagesTr" / "scan.nii.gz") == "MR"
