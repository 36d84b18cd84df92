"""engine.preprocess: preprocessing as data, MONAI pipelines, exact inversion to the source grid."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.io import Volume, VolumeError, load_label, load_volume
from engine.preprocess import (PAPER_INTENSITY, Preprocessing, PreprocessingError, default_target_spacing,
                               eval_transforms, find_user_error, normalize_modality, oriented_spacing, to_network_grid,
                               to_network_space, to_source_grid, train_transforms)

from conftest import oblique_affine

REAL_PAIRS = [
    ("abdomen_ct_mr/ct_image.nii.gz", "abdomen_ct_mr/ct_label_auto.nii.gz"),
    ("abdomen_ct_mr/mr_image.nii.gz", "abdomen_ct_mr/mr_label_auto.nii.gz"),      # LPS
    ("spinal_cord_mri/t1_image.nii.gz", "spinal_cord_mri/t1_label.nii.gz"),
    ("spinal_cord_mri/t2_image.nii.gz", "spinal_cord_mri/t2_label.nii.gz"),      # PSR: axes swapped
    ("hippocampus/imagesTr/hippocampus_001.nii.gz", "hippocampus/labelsTr/hippocampus_001.nii.gz"),
]


def test_modality_names():
    assert normalize_modality("MRI") == "MR"
    assert normalize_modality("T2w") == "MR"
    assert normalize_modality("ct") == "CT"
    assert normalize_modality("ultrasound") == "US"
    assert normalize_modality("PET") == "other"


def test_preprocessing_is_plain_data_and_rules_are_per_modality():
    pp = Preprocessing.for_modality("CT", target_spacing=(1.5, 1.5, 2.0))
    assert pp.intensity_for("CT") == {"mode": "clip", "a_min": -175.0, "a_max": 250.0}
    assert pp.intensity_for() == pp.intensity_for("CT")
    assert pp.intensity_for("T1") == PAPER_INTENSITY["MR"]  # a new modality gets its own rule
    assert Preprocessing.for_modality("MR", mr_mode="clip").intensity_for("MRI") == {
        "mode": "clip", "a_min": 0.0, "a_max": 1000.0}
    bare = Preprocessing(modality="US")
    assert bare.intensity_for() == {"mode": "clip", "a_min": 0.0, "a_max": 255.0}
    round_trip = Preprocessing.from_dict(pp.to_dict())
    assert round_trip == pp
    import json
    assert Preprocessing.from_dict(json.loads(json.dumps(pp.to_dict()))) == pp
    with pytest.raises(PreprocessingError, match="a_min 5.0 must be < a_max 1.0"):
        Preprocessing(intensity={"CT": {"mode": "clip", "a_min": 5, "a_max": 1}})
    with pytest.raises(PreprocessingError, match="target_spacing"):
        Preprocessing(target_spacing=(1.0, 0.0, 1.0))
    with pytest.raises(PreprocessingError, match="unknown preprocessing fields"):
        Preprocessing.from_dict({"target_spacing": None, "resample": True})


def test_default_target_spacing_is_median_along_network_axes():
    assert default_target_spacing([(1, 1, 3), (0.8, 0.8, 5), (1.2, 1.0, 2.5)]) == (1.0, 1.0, 3.0)
    # a volume whose first array axis is world A/P: its spacing is permuted into RAS order
    vol = Volume.from_array(np.zeros((4, 4, 4), np.float32), oblique_affine((0.7, 0.9, 3.0)))
    assert oriented_spacing(vol.affine) == pytest.approx((0.9, 0.7, 3.0))
    assert default_target_spacing([vol, vol, (1.0, 1.0, 1.0)]) == pytest.approx((0.9, 0.7, 3.0))


def test_intensity_rules_map_to_unit_range():
    rng = np.random.default_rng(0)
    hu = rng.uniform(-1000, 1000, size=(16, 16, 16)).astype(np.float32)
    vol = Volume.from_array(hu, np.eye(4))
    pp = Preprocessing.for_modality("CT")
    x, _ = to_network_space(vol, pp)
    expected = np.clip((hu + 175.0) / 425.0, 0, 1)
    np.testing.assert_allclose(x[0].numpy(), expected, atol=1e-5)
    # the same model preprocesses an MR case by the MR rule (percentiles)
    x_mr, ctx = to_network_space(vol, pp, modality="MRI")
    assert ctx.modality == "MR"
    lo, hi = np.percentile(hu, [0.5, 99.5])
    np.testing.assert_allclose(x_mr[0].numpy(), np.clip((hu - lo) / (hi - lo), 0, 1), atol=1e-5)


def test_reorientation_is_exact_and_inverted(tmp_volume):
    img_path, lab_path, _ = tmp_volume
    label = load_label(lab_path)
    pp = Preprocessing.for_modality("CT")  # no resampling: orientation only
    net, ctx = to_network_grid(label, pp, mode="nearest")
    # oblique_affine: array axis 1 runs R->L, axis 0 runs A->P, so RAS = flip(swap(axes 0,1))
    expected = np.flip(np.transpose(label.data, (1, 0, 2)), axis=(0, 1))
    np.testing.assert_array_equal(net[0].numpy(), expected)
    back = to_source_grid(net, ctx, mode="nearest")
    assert back.shape == (1,) + label.shape
    np.testing.assert_array_equal(back[0], label.data)


def test_resampling_round_trip_and_world_alignment(tmp_volume):
    _, lab_path, _ = tmp_volume
    label = load_label(lab_path)
    pp = Preprocessing.for_modality("CT", target_spacing=(0.75, 0.75, 1.0))  # 2x finer
    net, ctx = to_network_grid(label, pp, mode="nearest")
    assert ctx.network_spacing == pytest.approx((0.75, 0.75, 1.0))
    assert ctx.network_shape == tuple(net.shape[1:])
    # the network grid's affine maps voxels to the same world positions as the source grid
    src_centroid = ctx.source_affine @ np.r_[np.argwhere(label.data == 2).mean(0), 1]
    net_centroid = ctx.network_affine @ np.r_[np.argwhere(net[0].numpy() == 2).mean(0), 1]
    np.testing.assert_allclose(src_centroid[:3], net_centroid[:3], atol=0.6)
    back = to_source_grid(net, ctx, mode="nearest")
    np.testing.assert_array_equal(back[0], label.data)
    with pytest.raises(ValueError, match="expected an array"):
        to_source_grid(net[:, :-1], ctx)


@pytest.mark.parametrize("image_rel,label_rel", REAL_PAIRS)
def test_real_files_round_trip_to_source_grid(shared_data, image_rel, label_rel):
    image_path = shared_data / image_rel
    if not image_path.exists():
        pytest.skip(f"{image_path} not present")
    image = load_volume(image_path)
    label = load_label(shared_data / label_rel, reference=image)
    # native spacing (orientation only) and a finer grid must both come back exactly
    for spacing in (None, tuple(s / 2 for s in oriented_spacing(image.affine))):
        pp = Preprocessing.for_modality("MR", target_spacing=spacing)
        net, ctx = to_network_grid(label, pp, mode="nearest")
        back = to_source_grid(net, ctx, mode="nearest")
        assert back.shape == (1,) + label.shape
        np.testing.assert_array_equal(back[0], label.data)
    # a coarser, anisotropic grid loses thin structures but must still land on the source grid
    coarse = tuple(s * 1.25 for s in oriented_spacing(image.affine))
    net, ctx = to_network_grid(label, Preprocessing(target_spacing=coarse), mode="nearest")
    back = to_source_grid(net, ctx, mode="nearest")[0]
    assert back.shape == label.shape
    assert (back == label.data).mean() > 0.97
    # the image path: network intensities in [0, 1]; probabilities come back bilinearly
    x, ctx = to_network_space(image, Preprocessing.for_modality("CT", target_spacing=coarse),
                              modality="CT" if "ct_" in image_rel else "MR")
    assert x.dtype == torch.float32 and x.shape[0] == 1
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    probs = to_source_grid(torch.rand(3, *x.shape[1:]), ctx, mode="bilinear")
    assert probs.shape == (3,) + image.shape


def test_large_ct_preprocesses_in_seconds():
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    data = np.random.default_rng(0).normal(0, 200, (512, 512, 64)).astype(np.float32)
    vol = Volume.from_array(data, affine)
    start = time.perf_counter()
    x, ctx = to_network_space(vol, Preprocessing.for_modality("CT", target_spacing=(1.5, 1.5, 2.5)))
    elapsed = time.perf_counter() - start
    assert tuple(x.shape) == (1, 274, 274, 64)
    assert elapsed < 20.0, f"preprocessing a 512x512x64 CT took {elapsed:.1f} s (about 1 s expected)"


def _case(tmp_volume):
    img_path, lab_path, _ = tmp_volume
    return {"image": str(img_path), "label": str(lab_path), "modality": "CT"}


def test_train_transforms_shapes_types_and_determinism(tmp_volume):
    pp = Preprocessing.for_modality("CT", target_spacing=(1.5, 1.5, 2.0))
    case = _case(tmp_volume)
    first = train_transforms(pp, (16, 16, 16), num_samples=3, seed=7)(case)
    again = train_transforms(pp, (16, 16, 16), num_samples=3, seed=7)(case)
    assert len(first) == 3
    for a, b in zip(first, again):
        assert a["image"].shape == (1, 16, 16, 16) and a["image"].dtype == torch.float32
        assert a["label"].shape == (1, 16, 16, 16) and a["label"].dtype == torch.int64
        assert set(torch.unique(a["label"]).tolist()) <= {0, 1, 2}
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    other = train_transforms(pp, (16, 16, 16), num_samples=3, seed=8)(case)
    assert any(not torch.equal(a["image"], b["image"]) for a, b in zip(first, other))


def test_pos_neg_sampling_centres_on_foreground(tmp_volume):
    pp = Preprocessing.for_modality("CT")
    compose = train_transforms(pp, (8, 8, 8), num_samples=20, pos=1, neg=0, augment=False, seed=0)
    crops = compose(_case(tmp_volume))
    # with neg=0 every crop is centred on a labelled voxel
    assert all(int(c["label"][0, 4, 4, 4]) > 0 for c in crops)


def test_volume_smaller_than_patch_is_padded(tmp_volume):
    pp = Preprocessing.for_modality("CT")
    crops = train_transforms(pp, (32, 32, 32), num_samples=1, seed=0)(_case(tmp_volume))
    assert crops[0]["image"].shape == (1, 32, 32, 32)


def test_per_case_modality_and_in_memory_volumes(tmp_volume):
    img_path, lab_path, _ = tmp_volume
    image = load_volume(img_path)
    label = load_label(lab_path, reference=image)
    pp = Preprocessing.for_modality("CT")
    ev = eval_transforms(pp)
    as_ct = ev({"image": image, "label": label, "modality": "CT"})
    as_mr = ev({"image": image, "label": label.data, "modality": "MR"})
    assert as_ct["image"].shape == (1, 24, 20, 16)  # RAS: array axes 0 and 1 swapped
    assert torch.equal(as_ct["label"], as_mr["label"])
    # CT window squashes this image into a narrow band; MR percentiles spread it over [0, 1]
    assert float(as_mr["image"].max() - as_mr["image"].min()) == pytest.approx(1.0, abs=1e-5)
    assert float(as_ct["image"].max() - as_ct["image"].min()) < 0.6


def test_pipeline_errors_name_the_file(tmp_volume, tmp_path):
    img_path, lab_path, _ = tmp_volume
    pp = Preprocessing.for_modality("CT")
    # MONAI wraps failures of a transform in RuntimeError; the VolumeError naming the file is behind it
    with pytest.raises(RuntimeError) as info:
        eval_transforms(pp, class_ids=[0, 1])({"image": str(img_path), "label": str(lab_path)})
    err = find_user_error(info.value)
    assert isinstance(err, VolumeError) and "label.nii.gz: label values [2]" in str(err)
    with pytest.raises(RuntimeError) as info:
        eval_transforms(pp)({"image": str(tmp_path / "missing.nii.gz"), "label": str(lab_path)})
    assert "missing.nii.gz: file not found" in str(find_user_error(info.value))
    assert find_user_error(RuntimeError("unrelated")) is None


def test_a_libraries_valueerror_behind_a_pipeline_failure_is_no_user_error():
    """Only a ValueError the engine raised names a bad file; one raised inside numpy (behind MONAI's RuntimeError)
    was written for nobody, so the caller re-raises the failure as it is instead of showing numpy's text."""
    try:
        try:
            np.zeros((3, 4)) + np.zeros(5)
        except ValueError as inner:
            raise RuntimeError("applying transform <Spacingd>") from inner
    except RuntimeError as exc:
        wrapped = exc
    assert isinstance(wrapped.__cause__, ValueError) and find_user_error(wrapped) is None


def test_multichannel_volume_list(tmp_volume):
    img_path, _, _ = tmp_volume
    t1 = load_volume(img_path)
    t2 = Volume.from_array(t1.data * 3.0 + 100.0, t1.affine)
    pp = Preprocessing.for_modality("MR", target_spacing=(1.0, 1.0, 1.0))
    x, ctx = to_network_space([t1, t2], pp)
    single, _ = to_network_space(t1, pp)
    assert x.shape[0] == 2 and x.shape[1:] == single.shape[1:]
    # percentile normalisation is per channel, so an affine intensity change normalises away
    torch.testing.assert_close(x[0], single[0])
    torch.testing.assert_close(x[1], single[0], atol=1e-4, rtol=0)
    back = to_source_grid(x, ctx)
    assert back.shape == (2,) + t1.shape
    shifted_affine = t1.affine.copy()
    shifted_affine[0, 3] += 2.0
    shifted = Volume.from_array(t1.data, shifted_affine)
    with pytest.raises(VolumeError, match="image channel lies on a different grid"):
        to_network_space([t1, shifted], pp)


def test_a_case_without_foreground_trains_without_monais_warning_on_every_patch():
    # a negative example saved on purpose: "Num foregrounds 0, ... setting `pos_ratio` to 0" on stderr at each patch of
    # a fine-tune read as an error. In a fresh interpreter: pytest resets warning filters per test
    import subprocess
    import sys

    code = ("import torch, engine.preprocess\n"
            "from monai.transforms import RandCropByPosNegLabeld\n"
            "crop = RandCropByPosNegLabeld(keys=['image', 'label'], label_key='label', spatial_size=(4, 4, 4), pos=1, "
            "neg=1, num_samples=2)\n"
            "crop({'image': torch.rand(1, 8, 8, 8), 'label': torch.zeros(1, 8, 8, 8)})\n"
            "import warnings; warnings.warn('another warning stays')\n")
    done = subprocess.run([sys.executable, "-W", "default", "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=str(Path(__file__).resolve().parents[1]))
    assert done.returncode == 0, done.stderr
    assert "Num foregrounds" not in done.stderr and "another warning stays" in done.stderr, done.stderr
