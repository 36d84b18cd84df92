"""`mambahome evaluate` memory, and the same numbers as before on a real case.

Before: every class made two float32 copies of the whole grid for MONAI (470 MB per class on a 512x512x224 CT,
for a gland of a few thousand voxels), and every case's label maps stayed in memory until the last case was
scored (2.3 GB for a folder of two clinical CTs). Now MONAI gets the masks cropped to the box it crops to itself,
and a case's volumes are let go before the next one loads.
"""
from __future__ import annotations

import tracemalloc
import warnings

import nibabel as nib
import numpy as np
import pytest

from engine.evaluation import evaluate_arrays, evaluate_folders


def _reference(pred, truth, class_names, spacing):
    """The metrics as computed before the change: MONAI on float32 copies of the whole grid."""
    import torch
    from monai.metrics import DiceMetric, HausdorffDistanceMetric

    out = {}
    for k, name in enumerate(class_names):
        if k == 0:
            continue
        yp = torch.from_numpy((pred == k).astype(np.float32))[None, None]
        yt = torch.from_numpy((truth == k).astype(np.float32))[None, None]
        dice = float(DiceMetric(include_background=True, reduction="none")(yp, yt).reshape(-1)[0])
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*")
            hd = HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none")(
                yp, yt, spacing=[float(s) for s in spacing])
        out[name] = (dice, float(hd.reshape(-1)[0]))
    return out


def _perturbed(truth, seed=0):
    """A prediction-like copy: shifted a voxel, a few voxels dropped, a stray blob at the border."""
    rng = np.random.default_rng(seed)
    pred = np.roll(truth, 1, axis=0).copy()
    pred[(rng.random(pred.shape) < 0.05) & (pred > 0)] = 0
    pred[0, 0, :3] = 2  # a false positive on the array's edge: the crop must not lose its margin there
    return pred


def test_hippocampus_case_scores_exactly_as_before(shared_data):
    folder = shared_data / "hippocampus" / "labelsTr"
    for name in sorted(p.name for p in folder.glob("*.nii.gz"))[:3]:
        img = nib.load(str(folder / name))
        truth = np.asarray(img.dataobj).astype(np.uint8)
        pred = _perturbed(truth)
        spacing = tuple(float(s) for s in img.header.get_zooms()[:3])
        names = ["background", "anterior", "posterior"]
        res = evaluate_arrays(pred, truth, names, spacing)
        ref = _reference(pred, truth, names, spacing)
        for cname in names[1:]:
            # bit for bit: the cropped box is the one MONAI crops to, and Dice only counts voxels inside it
            assert (res["classes"][cname]["dice"], res["classes"][cname]["hd95"]) == ref[cname], (name, cname)
            assert 0 < res["classes"][cname]["dice"] < 1 and res["classes"][cname]["hd95"] > 0


def test_folder_scores_with_and_without_class_names_agree(shared_data, tmp_path):
    folder = shared_data / "hippocampus" / "labelsTr"
    pred_dir, truth_dir = tmp_path / "pred", tmp_path / "truth"
    pred_dir.mkdir()
    truth_dir.mkdir()
    for name in sorted(p.name for p in folder.glob("*.nii.gz"))[:2]:
        img = nib.load(str(folder / name))
        truth = np.asarray(img.dataobj).astype(np.uint8)
        nib.save(nib.Nifti1Image(truth, img.affine), str(truth_dir / name))
        nib.save(nib.Nifti1Image(_perturbed(truth), img.affine), str(pred_dir / name))
    named = evaluate_folders(pred_dir, truth_dir, class_names=["background", "class_1", "class_2"])
    unnamed = evaluate_folders(pred_dir, truth_dir)  # named class_K after all cases are scored by value
    assert unnamed["class_names"] == named["class_names"] and unnamed["cases"] == named["cases"]


def _small_objects(shape=(160, 160, 128)):
    truth = np.zeros(shape, np.uint8)
    truth[40:60, 50:70, 30:50] = 1
    truth[100:108, 100:110, 80:86] = 2
    return truth, np.roll(truth, 2, axis=1)


def _warm_up():
    """One small evaluation first: MONAI's and scipy's first use allocate (imports, tables) what a peak would count."""
    truth, pred = _small_objects((24, 24, 24))
    evaluate_arrays(pred, truth, ["background", "organ", "gland"], (1.0, 1.0, 1.0))


def test_small_classes_do_not_copy_the_whole_grid_as_float():
    _warm_up()
    truth, pred = _small_objects()
    tracemalloc.start()
    try:
        evaluate_arrays(pred, truth, ["background", "organ", "gland"], (0.8, 0.8, 1.5))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # two bool masks and their union are 3 bytes a voxel; one float32 copy of the grid alone is 4
    assert peak < 4 * truth.size, f"{peak / truth.size:.1f} bytes a voxel"


def _folder_peak(tmp_path, n_cases, class_names):
    truth, pred = _small_objects((96, 96, 80))
    root = tmp_path / f"n{n_cases}-{class_names is None}"
    for sub, data in (("truth", truth), ("pred", pred)):
        (root / sub).mkdir(parents=True)
        for i in range(n_cases):
            nib.save(nib.Nifti1Image(data, np.eye(4)), str(root / sub / f"case{i}.nii.gz"))
    tracemalloc.start()
    try:
        evaluate_folders(root / "pred", root / "truth", class_names=class_names)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak


@pytest.mark.parametrize("class_names", [["background", "organ", "gland"], None])
def test_a_folder_holds_one_case_at_a_time(tmp_path, class_names):
    _warm_up()
    one = _folder_peak(tmp_path, 1, class_names)
    four = _folder_peak(tmp_path, 4, class_names)
    # a case is two uint8 maps, 2 bytes a voxel: three more cases held until the end were 6 more
    assert four < one + 96 * 96 * 80, (one, four)
