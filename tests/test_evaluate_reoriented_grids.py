"""`mambahome evaluate` and `mambahome prompt`'s mask files accept a label map whose grid is the reference's voxels in
another axis order/direction (a DICOM series saved in the opposite slice order from the NIfTI of the same scan): it
is reoriented, not refused; any other grid is still refused. `evaluate` also takes two single files."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from engine.cli import main
from engine.evaluation import EvaluationError, evaluate_folders
from engine.interactive.command import _mask_file
from engine.io import VolumeError, load_label, load_volume


def _real_label(shared_data):
    return nib.load(str(shared_data / "spinal_cord_mri" / "t2_label.nii.gz"))


def _save(data, affine, path):
    nib.save(nib.Nifti1Image(np.ascontiguousarray(data).astype(np.uint8), affine), str(path))
    return path


def _flipped_k(img):
    """The same voxels in space, slice order reversed: data flipped along k, affine moved so every voxel centre
    stays at its world point."""
    data = np.asarray(img.dataobj)
    flip = np.eye(4)
    flip[2, 2], flip[2, 3] = -1, data.shape[2] - 1
    return np.flip(data, axis=2), img.affine @ flip


def _permuted_flipped(img):
    """Axes (k, i, j) with i reversed: still the same voxel centres."""
    data = np.asarray(img.dataobj)
    perm = (2, 0, 1)
    moved = np.transpose(data, perm)
    out = np.flip(moved, axis=1)  # new axis 1 = old i, reversed
    m = np.zeros((4, 4))
    m[3, 3] = 1
    for new, old in enumerate(perm):
        m[old, new] = 1
    m[0, 1], m[0, 3] = -1, data.shape[0] - 1  # old i = n-1 - new axis 1
    return out, img.affine @ m


def _evaluate(tmp_path, truth_img, pred_data, pred_affine):
    (tmp_path / "pred").mkdir()
    (tmp_path / "truth").mkdir()
    _save(np.asarray(truth_img.dataobj), truth_img.affine, tmp_path / "truth" / "c.nii.gz")
    _save(pred_data, pred_affine, tmp_path / "pred" / "c.nii.gz")
    out = tmp_path / "r.json"
    rc = main(["evaluate", "--pred", str(tmp_path / "pred"), "--truth", str(tmp_path / "truth"), "--out", str(out),
               "--classes", "background", "cord"])
    return rc, json.loads(out.read_text()) if out.exists() else None


@pytest.mark.parametrize("make", [_flipped_k, _permuted_flipped], ids=["k-flip", "permuted+flipped"])
def test_evaluate_reorients_flipped_prediction(shared_data, tmp_path, make):
    truth = _real_label(shared_data)
    data, affine = make(truth)
    assert not np.allclose(affine, truth.affine, atol=1e-3)  # the old check refused this (up to ~51 mm apart)
    rc, report = _evaluate(tmp_path, truth, data, affine)
    assert rc == 0 and report["failed"] == {}
    assert report["cases"]["c"]["classes"]["cord"]["dice"] == pytest.approx(1.0)


def test_evaluate_still_refuses_other_grids(shared_data, tmp_path, capsys):
    truth = _real_label(shared_data)
    data, affine = _flipped_k(truth)
    affine = affine.copy()
    affine[2, 3] += 1.0  # one slice off: not the same voxels
    rc, report = _evaluate(tmp_path, truth, data, affine)
    # the only case not scored: exit 2 and no report (tests/test_cli_review_reports.py)
    assert rc == 2 and report is None and "different grid than ground truth" in capsys.readouterr().err


def test_prompt_mask_files_reoriented_or_refused(shared_data, tmp_path):
    truth = _real_label(shared_data)
    image = load_volume(shared_data / "spinal_cord_mri" / "t2_image.nii.gz")
    data, affine = _permuted_flipped(truth)
    mask = _mask_file(str(_save(data, affine, tmp_path / "m.nii.gz")), image, "initial mask")
    assert mask.shape == image.shape and np.array_equal(mask, np.asarray(truth.dataobj) != 0)
    with pytest.raises(VolumeError, match="initial mask shape .* differs from input"):  # permuted and shifted
        _mask_file(str(_save(data, affine + _shift(0.5), tmp_path / "p.nii.gz")), image,
                   "initial mask")
    data, affine = _flipped_k(truth)
    assert np.array_equal(_mask_file(str(_save(data, affine, tmp_path / "f.nii.gz")), image, "scribble"),
                          np.asarray(truth.dataobj) != 0)
    with pytest.raises(VolumeError, match="scribble lies on a different grid than input"):  # flipped and shifted
        _mask_file(str(_save(data, affine + _shift(0.5), tmp_path / "s.nii.gz")), image, "scribble")


def _shift(mm):
    m = np.zeros((4, 4))
    m[:3, 3] = mm
    return m


def test_evaluate_two_files(shared_data, tmp_path):
    truth = _real_label(shared_data)
    (tmp_path / "out").mkdir()
    pred = _save(*_flipped_k(truth), tmp_path / "out" / "t2.pred.nii.gz")
    label = _save(np.asarray(truth.dataobj), truth.affine, tmp_path / "t2_label.nii.gz")
    out = tmp_path / "r.json"
    assert main(["evaluate", "--pred", str(pred), "--truth", str(label), "--out", str(out),
                 "--classes", "background", "cord"]) == 0
    report = json.loads(out.read_text())
    assert list(report["cases"]) == ["t2_label"]
    assert report["cases"]["t2_label"]["classes"]["cord"]["dice"] == pytest.approx(1.0)


def test_evaluate_file_and_folder_mixed_or_missing(tmp_path):
    (tmp_path / "truth").mkdir()
    f = _save(np.zeros((4, 4, 4)), np.eye(4), tmp_path / "a.nii.gz")
    with pytest.raises(EvaluationError, match="is a file but .*truth is a folder: --pred and --truth take two folders"):
        evaluate_folders(f, tmp_path / "truth")
    with pytest.raises(EvaluationError, match="nope.nrrd: prediction file not found .*two folders .* or two label files"):
        evaluate_folders(tmp_path / "nope.nrrd", f)


@pytest.mark.parametrize("degrees", [0.0, 45.0, 17.0], ids=["straight", "oblique-45", "oblique-17"])
def test_onto_grid_every_axis_order_and_direction(degrees):
    """All 48 axis orders/directions of one grid come back onto it exactly, also for an oblique scan (at 45 degrees
    no world axis is nearest); a half-voxel shift or another voxel size is refused with check_same_grid's message."""
    import itertools

    from engine.io import Volume, onto_grid

    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    ref_affine = np.array([[c, -s, 0, 0], [s, c, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]) @ np.diag([0.8, 1.1, 2.5, 1])
    ref_affine[:3, 3] = (-20.0, 7.0, 31.0)
    data = np.random.default_rng(0).integers(0, 4, (5, 6, 7)).astype(np.uint8)
    reference = Volume.from_array(data, ref_affine, path="truth.nii.gz")
    for perm in itertools.permutations(range(3)):
        for flips in itertools.product((False, True), repeat=3):
            to_ref = np.zeros((4, 4))  # label voxel -> reference voxel
            to_ref[3, 3] = 1
            for label_axis, ref_axis in enumerate(perm):
                to_ref[ref_axis, label_axis] = -1 if flips[label_axis] else 1
                to_ref[ref_axis, 3] = data.shape[ref_axis] - 1 if flips[label_axis] else 0
            label_data = np.transpose(np.flip(data, [perm[a] for a in range(3) if flips[a]]), perm)
            label = Volume.from_array(label_data, ref_affine @ to_ref, path="pred.nii.gz")
            moved = onto_grid(label, reference, what="prediction", reference_what="ground truth")
            assert np.array_equal(moved.data, data) and np.allclose(moved.affine, ref_affine)
            if perm != (0, 1, 2) or any(flips):
                axes = [perm.index(a) for a in range(3)]  # reference axis a <- label axis axes[a]
                flipped = sorted(perm[a] for a in range(3) if flips[a])
                assert moved.notes == [f"prediction reoriented onto the ground truth grid (array axes {axes}"
                                       + (f", flipped along reference axes {flipped}" if flipped else "")
                                       + "; no resampling)"]
            shifted = Volume.from_array(label_data, ref_affine @ to_ref + _shift(0.5), path="pred.nii.gz")
            with pytest.raises(VolumeError, match="pred.nii.gz: prediction (lies on a different grid|shape)"):
                onto_grid(shifted, reference, what="prediction", reference_what="ground truth")
            coarser = Volume.from_array(label_data, ref_affine @ to_ref @ np.diag([2, 1, 1, 1]), path="pred.nii.gz")
            with pytest.raises(VolumeError, match="pred.nii.gz: prediction (lies on a different grid|shape)"):
                onto_grid(coarser, reference, what="prediction", reference_what="ground truth")
