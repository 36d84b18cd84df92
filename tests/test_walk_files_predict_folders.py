"""``mambahome predict`` on folders and files as users keep them (files walk):

- an nnU-Net v2 ``imagesTs`` in a format other than NIfTI (``file_ending`` ``.nrrd``, ``.mha``: what ``train --dataset``
  reads) kept ``<case>_0000.nrrd`` as output names, so ``mambahome evaluate`` matched none of them to
  ``labelsTr/<case>.nrrd``;
- a folder of numbered cases (``subject_0001.nii.gz``, ``subject_0002.nii.gz``..., ``scan_2019.nii.gz``) was read as
  one case with one channel per file, and the whole folder was refused ("expects 1 input channel(s) but ... provides
  3") by a one-channel model;
- a NIfTI-2 scan got a NIfTI-1 mask, and nibabel printed "sizeof_hdr should be 348; set sizeof_hdr to 348" on the
  console while converting its header.
"""
from __future__ import annotations

import logging

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from engine.cli import main

sitk.ProcessObject_SetGlobalWarningDisplay(False)


def _checkpoint(path, in_channels=1):
    import torch

    from engine.checkpoint import save_checkpoint
    from engine.networks import build_network
    from engine.preprocess import Preprocessing

    torch.manual_seed(0)
    save_checkpoint(path, build_network("mambahome", in_channels, 2, "tiny"),
                    {"class_names": ["background", "a"], "modality": "MR", "patch_size": [32, 32, 32],
                     "preprocessing": Preprocessing.for_modality("MR", target_spacing=(2.0, 2.0, 2.0)).to_dict()})
    return path


def _voxels(seed=0):
    return np.random.default_rng(seed).normal(100.0, 20.0, (20, 18, 12)).astype(np.float32)


@pytest.mark.parametrize("ending", [".nrrd", ".mha"])
def test_an_nnunet_folder_in_another_format_is_predicted_per_case_and_evaluated(tmp_path, capsys, ending):
    images, labels = tmp_path / "imagesTs", tmp_path / "labelsTs"
    images.mkdir()
    labels.mkdir()
    for case in ("liver_1", "liver_2"):
        image = sitk.GetImageFromArray(_voxels().T.copy())
        image.SetSpacing((1.5, 1.5, 2.0))
        image.SetOrigin((10.0, -20.0, 5.0))
        sitk.WriteImage(image, str(images / f"{case}_0000{ending}"))
        label = sitk.GetImageFromArray(np.zeros((12, 18, 20), np.uint8))
        label.CopyInformation(image)
        sitk.WriteImage(label, str(labels / f"{case}{ending}"))
    ckpt = _checkpoint(tmp_path / "model.safetensors")
    preds = tmp_path / "preds"
    assert main(["predict", "--checkpoint", str(ckpt), "--input", str(images), "--output", str(preds),
                 "--device", "cpu", "--quiet"]) == 0
    assert sorted(p.name for p in preds.iterdir()) == [f"liver_1{ending}", f"liver_2{ending}"]
    written = sitk.ReadImage(str(preds / f"liver_1{ending}"))
    assert written.GetSpacing() == (1.5, 1.5, 2.0) and written.GetOrigin() == (10.0, -20.0, 5.0)
    capsys.readouterr()
    assert main(["evaluate", "--pred", str(preds), "--truth", str(labels), "--out", str(tmp_path / "report.json"),
                 "--quiet"]) == 0


def test_numbered_cases_are_each_their_own_input_for_a_one_channel_model(tmp_path, capsys):
    scans = tmp_path / "scans"
    scans.mkdir()
    names = ["subject_0001.nii.gz", "subject_0002.nii.gz", "scan_2019.nii.gz"]
    for seed, name in enumerate(names):
        nib.save(nib.Nifti1Image(_voxels(seed), np.diag([1.5, 1.5, 2.0, 1.0])), str(scans / name))
    ckpt = _checkpoint(tmp_path / "model.safetensors")
    out = tmp_path / "labels"
    assert main(["predict", "--checkpoint", str(ckpt), "--input", str(scans), "--output", str(out),
                 "--device", "cpu", "--quiet"]) == 0, capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == sorted(names)


def test_channel_files_of_a_two_channel_model_are_still_one_case(tmp_path):
    from engine.inference import group_input_files

    files = [tmp_path / n for n in ("b_0001.nrrd", "a_0000.nrrd", "a_0001.nrrd", "b_0000.nrrd")]
    groups = group_input_files(sorted(files), channels=2)
    assert [(name, [f.name for f in chans]) for chans, name in groups] == [
        ("a.nrrd", ["a_0000.nrrd", "a_0001.nrrd"]), ("b.nrrd", ["b_0000.nrrd", "b_0001.nrrd"])]
    # a one-channel model's nnU-Net folder: case_0000 files, one case each, named as nnU-Net names them
    single = [tmp_path / n for n in ("a_0000.mha", "b_0000.mha")]
    assert [name for _, name in group_input_files(single, channels=1)] == ["a.mha", "b.mha"]


def test_a_nifti2_scan_gets_a_nifti2_mask_without_console_noise(tmp_path, capsys, caplog):
    affine = np.array([[0.0, 0.0, 2.0, -10.0], [-1.5, 0.0, 0.0, 30.0], [0.0, 1.5, 0.0, -5.0], [0, 0, 0, 1]])
    scan = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti2Image(_voxels(), affine), str(scan))
    ckpt = _checkpoint(tmp_path / "model.safetensors")
    out = tmp_path / "seg.nii.gz"
    with caplog.at_level(logging.INFO, logger="nibabel"):
        assert main(["predict", "--checkpoint", str(ckpt), "--input", str(scan), "--output", str(out),
                     "--device", "cpu", "--quiet"]) == 0
    assert "sizeof_hdr" not in caplog.text + capsys.readouterr().err
    written = nib.load(str(out))
    assert isinstance(written, nib.Nifti2Image) and written.header.get_intent()[0] == "label"
    np.testing.assert_array_equal(written.affine, nib.load(str(scan)).affine)
    assert written.shape == (20, 18, 12)


def test_one_file_of_a_dicom_series_into_a_folder_gives_a_nifti_label_map(tmp_path):
    """``--input IM0000.dcm --output labels/`` stands for the file's series: named ``labels/IM0000.dcm`` the label
    map had a type no writer takes (refused, or written nowhere after the network ran); it is a NIfTI, as a series
    folder's label map is."""
    from tests.test_formats import write_dicom_series

    image = sitk.GetImageFromArray(_voxels().T.copy())
    image.SetSpacing((1.5, 1.5, 2.0))
    series = write_dicom_series(image, tmp_path / "series", modality="MR")
    first = sorted(series.glob("*.dcm"))[0]
    ckpt = _checkpoint(tmp_path / "model.safetensors")
    out = tmp_path / "labels"
    assert main(["predict", "--checkpoint", str(ckpt), "--input", str(first), "--output", f"{out}/",
                 "--device", "cpu", "--quiet"]) == 0
    written = out / f"{first.name[:-len('.dcm')]}.nii.gz"
    assert sorted(p.name for p in out.iterdir()) == [written.name]
    assert nib.load(written).shape == (20, 18, 12)
