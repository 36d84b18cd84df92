"""``mambahome predict`` writes the model's class names into a NIfTI label map (the class record napari reads), but
``mambahome evaluate`` read names only from ``.seg.nrrd`` segments: the same prediction was reported as ``organ``,
``vessel`` when saved as ``pred.seg.nrrd`` and as ``class_1``, ``class_2`` when saved as ``pred.nii.gz`` (files walk,
bundled model on the real spinal cord T2). The record now names the report's classes as segments do; a ground
truth's own names still win, and a mask whose record says its names are unknown (``mambahome prompt``) names
nothing."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np

from engine.cli import main


def _checkpoint(path):
    import torch

    from engine.checkpoint import save_checkpoint
    from engine.networks import build_network
    from engine.preprocess import Preprocessing

    torch.manual_seed(0)
    save_checkpoint(path, build_network("mambahome", 1, 3, "tiny"),
                    {"class_names": ["background", "liver", "spleen"], "modality": "MR", "patch_size": [32, 32, 32],
                     "preprocessing": Preprocessing.for_modality("MR", target_spacing=(2.0, 2.0, 2.0)).to_dict()})
    return path


def _report_classes(path):
    return json.loads(path.read_text())["class_names"]


def test_a_nifti_prediction_names_the_report_as_its_seg_nrrd_twin_does(tmp_path, capsys):
    affine = np.diag([1.5, 1.5, 2.0, 1.0])
    rng = np.random.default_rng(0)
    scan = tmp_path / "case.nii.gz"
    nib.save(nib.Nifti1Image(rng.normal(100.0, 20.0, (20, 18, 12)).astype(np.float32), affine), str(scan))
    truth = np.zeros((20, 18, 12), np.uint8)
    truth[4:10, 4:10, 3:8] = 1
    truth[12:16, 10:15, 4:9] = 2
    truth_file = tmp_path / "truth" / "case.nii.gz"
    truth_file.parent.mkdir()
    nib.save(nib.Nifti1Image(truth, affine), str(truth_file))
    ckpt = _checkpoint(tmp_path / "model.safetensors")
    reports = {}
    for name in ("pred.nii.gz", "pred.seg.nrrd"):
        out = tmp_path / name
        assert main(["predict", "--checkpoint", str(ckpt), "--input", str(scan), "--output", str(out),
                     "--device", "cpu", "--quiet"]) == 0
        report = tmp_path / f"{name}.json"
        assert main(["evaluate", "--pred", str(out), "--truth", str(truth_file), "--out", str(report),
                     "--quiet"]) in (0, 1)
        reports[name] = _report_classes(report)
    assert reports["pred.nii.gz"] == reports["pred.seg.nrrd"] == ["background", "liver", "spleen"]
    capsys.readouterr()


def test_a_ground_truths_names_win_and_an_unknown_record_names_nothing(tmp_path):
    from engine.io import load_volume, save_volume

    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    mask = np.zeros((10, 10, 10), np.uint8)
    mask[2:6, 2:6, 2:6] = 1
    reference = tmp_path / "ref.nii.gz"
    nib.save(nib.Nifti1Image(mask.astype(np.float32), affine), str(reference))
    volume = load_volume(reference)
    (tmp_path / "pred").mkdir()
    (tmp_path / "truth").mkdir()
    (tmp_path / "unknown").mkdir()
    save_volume(tmp_path / "pred" / "a.nii.gz", mask, volume, segments=[{"value": 1, "name": "organ"}])
    save_volume(tmp_path / "truth" / "a.nii.gz", mask, volume, segments=[{"value": 1, "name": "hippocampus"}])
    save_volume(tmp_path / "unknown" / "a.nii.gz", mask, volume, label_map=True)
    nib.save(nib.Nifti1Image(mask, affine), str(tmp_path / "plain.nii.gz"))
    assert main(["evaluate", "--pred", str(tmp_path / "pred"), "--truth", str(tmp_path / "truth"), "--out",
                 str(tmp_path / "r1.json"), "--quiet"]) == 0
    assert _report_classes(tmp_path / "r1.json") == ["background", "hippocampus"]
    assert main(["evaluate", "--pred", str(tmp_path / "unknown" / "a.nii.gz"), "--truth", str(tmp_path / "plain.nii.gz"),
                 "--out", str(tmp_path / "r2.json"), "--quiet"]) == 0
    assert _report_classes(tmp_path / "r2.json") == ["background", "class_1"]


def test_a_class_only_the_prediction_names_and_no_file_holds_is_not_scored(tmp_path):
    """predict's NIfTI names every class of the model; a class absent from both files (a liver/spleen model's liver on
    a spleen-only case) was scored "both empty", Dice 1, lifting the mean of a poor prediction."""
    from engine.io import load_volume, save_volume

    truth = np.zeros((12, 12, 12), np.uint8)
    truth[2:8, 2:8, 2:8] = 2
    pred = np.zeros_like(truth)
    pred[5:11, 5:11, 5:11] = 2  # overlaps the truth poorly
    reference = tmp_path / "ref.nii.gz"
    nib.save(nib.Nifti1Image(truth.astype(np.float32), np.eye(4)), str(reference))
    volume = load_volume(reference)
    for folder in ("pred", "truth"):
        (tmp_path / folder).mkdir()
    save_volume(tmp_path / "pred" / "a.nii.gz", pred, volume,
                segments=[{"value": 1, "name": "liver"}, {"value": 2, "name": "spleen"}])
    nib.save(nib.Nifti1Image(truth, np.eye(4)), str(tmp_path / "truth" / "a.nii.gz"))
    out = tmp_path / "r.json"
    assert main(["evaluate", "--pred", str(tmp_path / "pred"), "--truth", str(tmp_path / "truth"), "--out", str(out),
                 "--quiet"]) == 0
    report = json.loads(out.read_text())
    classes = report["cases"]["a"]["classes"]
    assert set(classes) == {"spleen"}
    assert report["cases"]["a"]["mean_dice"] == classes["spleen"]["dice"] < 0.5
