"""engine.synth: phantoms with 2-4 structures, CT/MR intensity ranges, the synth command."""
from __future__ import annotations

import argparse
import json
import time

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from engine.io import load_label, load_volume
from engine.synth import make_phantom, register_cli, sample_volume


@pytest.mark.parametrize("num_structures", [2, 3, 4])
@pytest.mark.parametrize("modality", ["CT", "MR"])
def test_phantom_structures(modality, num_structures):
    ph = make_phantom((32, 32, 32), modality=modality, seed=3, num_structures=num_structures)
    assert ph.image.shape == ph.label.shape == (32, 32, 32)
    assert ph.image.dtype == np.float32 and ph.label.dtype == np.uint8
    assert ph.class_names[0] == "background" and len(ph.class_names) == num_structures + 1
    values = set(np.unique(ph.label).tolist())
    assert values == set(range(num_structures + 1))
    sizes = [int((ph.label == k).sum()) for k in range(1, num_structures + 1)]
    assert min(sizes) >= 20
    assert len(set(sizes)) == num_structures  # different sizes
    # the last structure touches the first (like a lesion on an organ)
    last = ph.label == num_structures
    assert (ndimage.binary_dilation(last) & (ph.label == 1)).any()


def test_ct_ranges_and_contrast():
    ph = make_phantom((48, 48, 32), modality="CT", seed=1)
    air = ph.image[0:3, 0:3, 0:3]  # corner: outside the body
    assert -1100 < air.mean() < -900
    assert 10 < air.std() < 30  # ~20 HU noise
    for k in range(1, 4):
        assert 40 < ph.image[ph.label == k].mean() < 170
    means = [ph.image[ph.label == k].mean() for k in range(1, 4)]
    assert min(abs(a - b) for i, a in enumerate(means) for b in means[i + 1:]) > 15  # distinguishable


def test_mr_ranges_differ_from_ct():
    ph = make_phantom((48, 48, 32), modality="MR", seed=1)
    assert ph.image.min() >= 0.0  # magnitude images (Rician noise) are non-negative
    assert 200 < ph.image.max() < 1000
    assert ph.image[0:3, 0:3, 0:3].mean() < 60  # dark background, not -1000
    ct = make_phantom((48, 48, 32), modality="CT", seed=1)
    np.testing.assert_array_equal(ph.label, ct.label)  # same anatomy under the same seed
    mr_means = [ph.image[ph.label == k].mean() for k in range(1, 4)]
    assert not np.allclose(mr_means, [ct.image[ct.label == k].mean() for k in range(1, 4)], atol=50)


def test_seed_determinism_and_geometry():
    a = make_phantom((32, 32, 32), seed=5)
    b = make_phantom((32, 32, 32), seed=5)
    c = make_phantom((32, 32, 32), seed=6)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.label, b.label)
    assert not np.array_equal(a.label, c.label)
    assert not np.allclose(a.affine, np.eye(4))
    assert nib.aff2axcodes(a.affine) == ("L", "P", "S")
    np.testing.assert_allclose(np.linalg.norm(a.affine[:3, :3], axis=0), (1.5, 1.5, 2.0))
    image, label, affine, names = a  # tuple unpacking as documented in ARCHITECTURE.md
    assert names == a.class_names


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_structures must be 2-4"):
        make_phantom((32, 32, 32), num_structures=5)
    with pytest.raises(ValueError, match="modality"):
        make_phantom((32, 32, 32), modality="PET")
    with pytest.raises(ValueError, match="shape"):
        make_phantom((8, 32, 32))


def test_sample_volume_is_quick():
    start = time.perf_counter()
    image, label = sample_volume("MR")
    assert time.perf_counter() - start < 1.0
    assert image.shape == label.shape
    assert image.data.dtype == np.float32 and label.data.max() >= 2
    np.testing.assert_array_equal(image.affine, label.affine)


def test_synth_command_writes_nnunet_raw(tmp_path):
    parser = argparse.ArgumentParser()
    register_cli(parser.add_subparsers())
    out = tmp_path / "ds"
    args = parser.parse_args(["synth", "--out", str(out), "--cases", "2", "--modality", "MR",
                              "--shape", "32", "32", "24", "--seed", "4"])
    assert args.func(args) == 0
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "MR"}
    assert meta["labels"] == {"background": 0, "organ": 1, "vessel": 2, "gland": 3}
    assert meta["numTraining"] == 2 and meta["file_ending"] == ".nii.gz"
    for i in range(2):
        image = load_volume(out / "imagesTr" / f"phantom_{i:03d}_0000.nii.gz")
        label = load_label(out / "labelsTr" / f"phantom_{i:03d}.nii.gz", reference=image, class_ids=[0, 1, 2, 3])
        expected = make_phantom((32, 32, 24), modality="MR", seed=4 + i)
        np.testing.assert_array_equal(label.data, expected.label)
        np.testing.assert_allclose(image.data, expected.image)
        np.testing.assert_allclose(image.affine, expected.affine, atol=1e-4)
    # refuses to overwrite an existing dataset
    with pytest.raises(ValueError, match="already holds a phantom dataset"):
        args.func(args)
