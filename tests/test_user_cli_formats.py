"""The `mambahome` command line on files as users bring them (converted from the shared real volumes).

Before: a folder holding a PACS export (``patient/study/series/*.dcm``) was predicted as if it were empty of
cases: the series were skipped without a word and the command exited 0 (or said "no DICOM series (itself or in
its subfolders)" while there were some); ``train --patch-size 16 16 16`` preprocessed every case and then
crashed at the first step with torch's traceback ("Expected more than 1 spatial element when training").
"""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

from engine.cli import main

BUNDLED = Path(__file__).resolve().parents[1] / "napari_mambahome" / "models" / "default.safetensors"


def _dicom_series(src: Path, folder: Path) -> None:
    """Write a small crop of ``src`` as an int16 DICOM series (one file per slice) into ``folder``."""
    import SimpleITK as sitk

    image = sitk.Cast(sitk.ReadImage(str(src))[40:72, 30:62, 10:18], sitk.sitkInt16)
    folder.mkdir(parents=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    uid = "1.2.826.0.1.3680043.2.1125.424242"
    direction = image.GetDirection()
    for z in range(image.GetDepth()):
        sl = image[:, :, z]
        for tag, value in (("0008|0060", "CT"), ("0020|000d", uid), ("0020|000e", uid + ".1"),
                           ("0020|0013", str(z)), ("0018|0050", str(image.GetSpacing()[2])),
                           ("0020|0032", "\\".join(map(str, image.TransformIndexToPhysicalPoint((0, 0, z))))),
                           ("0020|0037", "\\".join(map(str, direction[0:3] + direction[3:6])))):
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"IM{z:04d}.dcm"))
        writer.Execute(sl)


def test_predict_names_dicom_series_nested_below_a_subfolder(tmp_path, capsys, shared_data):
    export = tmp_path / "export"
    series = export / "patient1" / "study1" / "series1"
    _dicom_series(shared_data / "abdomen_ct_mr" / "ct_image.nii.gz", series)

    # only the nested series: the error names where the series is, not "no DICOM series"
    assert main(["predict", "--checkpoint", str(BUNDLED), "--input", str(export),
                 "--output", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "patient1/" in err and str(series) in err, err

    # beside a volume file: the volume is segmented and the skipped series is named
    hip = nib.load(str(shared_data / "hippocampus" / "imagesTr" / "hippocampus_001.nii.gz"))
    nib.save(hip, str(export / "hip.nii.gz"))
    assert main(["predict", "--checkpoint", str(BUNDLED), "--input", str(export),
                 "--output", str(tmp_path / "out2"), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "patient1/" in captured.out + captured.err and str(series) in captured.out + captured.err
    out = nib.load(str(tmp_path / "out2" / "hip.nii.gz"))
    assert out.shape == hip.shape and np.allclose(out.affine, hip.affine)


def test_train_refuses_a_patch_that_leaves_a_one_voxel_bottleneck(tmp_path, capsys, shared_data):
    hippo = shared_data / "hippocampus"
    ds = tmp_path / "Dataset001_Hip"
    (ds / "imagesTr").mkdir(parents=True)
    (ds / "labelsTr").mkdir()
    for case in ("hippocampus_001", "hippocampus_003"):  # nnU-Net v2 layout, `_0000` channel suffix
        nib.save(nib.load(str(hippo / "imagesTr" / f"{case}.nii.gz")), str(ds / "imagesTr" / f"{case}_0000.nii.gz"))
        nib.save(nib.load(str(hippo / "labelsTr" / f"{case}.nii.gz")), str(ds / "labelsTr" / f"{case}.nii.gz"))
    (ds / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "MRI"}, "labels": {"background": 0, "anterior": 1, "posterior": 2},
        "numTraining": 2, "file_ending": ".nii.gz"}))
    run = tmp_path / "run"
    assert main(["train", "--dataset", str(ds), "--out", str(run), "--preset", "tiny", "--steps", "1",
                 "--patch-size", "16", "16", "16", "--val-fraction", "0", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "patch size [16, 16, 16]" in err and "--patch-size 32 32 32" in err, err
    assert not run.exists()


def test_evaluate_a_0_255_mask_scores_only_the_values_files_hold(tmp_path, capsys, shared_data):
    # a binary mask saved as 0/255 (many tools do) against the 0/1 truth: values 2..254 are in no file;
    # they were scored "both empty" (Dice 1) and made the mean foreground Dice of this wrong mask 0.99
    truth = shared_data / "spinal_cord_mri" / "t2_label.nii.gz"
    lab = nib.load(str(truth))
    mask = tmp_path / "t2_label.nii.gz"
    nib.save(nib.Nifti1Image((np.asanyarray(lab.dataobj) > 0).astype(np.uint8) * 255, lab.affine), str(mask))
    report = tmp_path / "report.json"
    assert main(["evaluate", "--pred", str(mask), "--truth", str(truth), "--out", str(report), "--quiet"]) == 0
    result = json.loads(report.read_text())
    assert result["summary"]["__mean__"]["dice_mean"] == 0.0
    assert sorted(result["cases"]["t2_label"]["classes"]) == ["class_1", "class_255"]
    out = capsys.readouterr().out
    assert "class_2 " not in out and "253 label value(s)" in out, out


def test_dataset_of_0_255_masks_says_to_rewrite_them_as_0_1(tmp_path, capsys, shared_data):
    cord = shared_data / "spinal_cord_mri"
    pairs = tmp_path / "pairs"
    pairs.mkdir()
    lab = nib.load(str(cord / "t2_label.nii.gz"))
    nib.save(nib.load(str(cord / "t2_image.nii.gz")), str(pairs / "sc.nii.gz"))
    nib.save(nib.Nifti1Image((np.asanyarray(lab.dataobj) > 0).astype(np.uint8) * 255, lab.affine),
             str(pairs / "sc_mask.nii.gz"))
    assert main(["dataset", "--images", str(pairs), "--labels", str(pairs), "--out", str(tmp_path / "ds"),
                 "--modality", "MR", "--classes", "cord"]) == 2
    err = capsys.readouterr().err
    assert "sc_mask.nii.gz" in err and "0/255" in err and "as 0/1" in err, err
    assert not (tmp_path / "ds").exists()


def test_evaluate_names_the_case_names_that_do_not_match(tmp_path, capsys, shared_data):
    labels = shared_data / "hippocampus" / "labelsTr"
    pred, truth = tmp_path / "pred", tmp_path / "truth"
    pred.mkdir()
    truth.mkdir()
    for case in ("hippocampus_001", "hippocampus_003"):  # predictions kept the image's `_0000` channel suffix
        lab = nib.load(str(labels / f"{case}.nii.gz"))
        nib.save(lab, str(truth / f"{case}.nii.gz"))
        nib.save(lab, str(pred / f"{case}_0000.nii.gz"))
    assert main(["evaluate", "--pred", str(pred), "--truth", str(truth), "--out", str(tmp_path / "r.json"),
                 "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "'hippocampus_001_0000'" in err and "'hippocampus_001'" in err, err
    assert not (tmp_path / "r.json").exists()


def test_nrrd_without_a_space_is_segmented_onto_the_grid_itk_and_slicer_see(tmp_path, shared_data):
    # pynrrd/teem write `space dimension` + directions without `space`; ITK (so 3D Slicer and SimpleITK) reads
    # those numbers as LPS. Read as RAS, the labels (written back with space LPS) lay mirrored in x and y.
    import nrrd
    import SimpleITK as sitk

    from engine.io import load_volume

    hip = nib.load(str(shared_data / "hippocampus" / "imagesTr" / "hippocampus_001.nii.gz"))
    scan, seg = tmp_path / "scan.nrrd", tmp_path / "seg.nrrd"
    nrrd.write(str(scan), np.asanyarray(hip.dataobj).astype(np.int16),
               {"space dimension": 3, "space directions": np.diag([0.8, 0.9, 1.2]),
                "space origin": np.array([10.0, -20.0, 30.0])})
    assert main(["predict", "--checkpoint", str(BUNDLED), "--input", str(scan), "--output", str(seg),
                 "--quiet"]) == 0
    a, b = sitk.ReadImage(str(scan)), sitk.ReadImage(str(seg))
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(b.GetOrigin(), a.GetOrigin(), atol=1e-6)
    np.testing.assert_allclose(b.GetDirection(), a.GetDirection(), atol=1e-6)
    np.testing.assert_allclose(b.GetSpacing(), a.GetSpacing(), atol=1e-6)
    # and the engine places the scan where ITK does (LPS -> RAS: x and y negated)
    np.testing.assert_allclose(load_volume(scan).affine[:3, 3], [-10.0, 20.0, 30.0])
