"""Files whose geometry makes no sense for a model are refused before any work, named, with exit code 2."""
from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from engine.cli import main
from engine.inference import PredictionError, Predictor
from engine.io import Volume, VolumeError, load_volume, read_grid
from engine.preprocess import MAX_UPSAMPLED_VOXELS, Preprocessing, check_network_size, network_grid_shape


@pytest.fixture
def checkpoint(tmp_path):
    from engine.checkpoint import save_checkpoint
    from engine.networks import build_network

    torch.manual_seed(0)
    path = tmp_path / "model.safetensors"
    pp = Preprocessing.for_modality("CT", target_spacing=(1.5, 1.5, 1.5))
    save_checkpoint(path, build_network("mambahome", 1, 2, "tiny"),
                    {"class_names": ["background", "a"], "modality": "CT", "patch_size": [32, 32, 32],
                     "preprocessing": pp.to_dict()})
    return path


def test_a_header_in_the_wrong_unit_is_refused_before_resampling(tmp_path, checkpoint, capsys):
    """10^3 voxels of 150 mm become a 901 x 901 x 676 grid at 1.5 mm: a crash deep in MONAI's resampling (or minutes of
    work on nothing) became a named refusal."""
    src = tmp_path / "bigvox.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((10, 10, 10), dtype=np.float32) * 100,
                             np.diag([150.0, 150.0, 150.0, 1.0])), src)
    out = tmp_path / "out.nii.gz"
    assert main(["predict", "--quiet", "--checkpoint", str(checkpoint), "--input", str(src), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{src}: its 10 x 10 x 10 voxels at 150 x 150 x 150 mm spacing would become 901 x 901 x 901" in err
    assert "check the voxel spacing in the file's header" in err and "Traceback" not in err
    assert not out.exists()
    with pytest.raises(PredictionError, match="would become"):
        Predictor(str(checkpoint), device="cpu").predict(load_volume(src))


def test_large_scans_and_thick_slices_pass_the_size_check():
    pp = Preprocessing.for_modality("CT", target_spacing=(1.5, 1.5, 1.5))
    # a 1024^2 x 600 CT at its own 0.5 mm: a large grid, but not larger than the scan
    big = Volume(np.zeros((1, 1, 1), np.float32), np.diag([0.5, 0.5, 0.5, 1.0]), (0.5, 0.5, 0.5))
    big.data = np.broadcast_to(np.float32(0), (1024, 1024, 600))
    check_network_size(big, pp)
    # 512^2 x 60 slices of 5 mm, upsampled 3.3x along one axis
    thick = Volume(np.broadcast_to(np.float32(0), (512, 512, 60)), np.diag([0.8, 0.8, 5.0, 1.0]), (0.8, 0.8, 5.0))
    check_network_size(thick, pp)
    assert network_grid_shape((512, 512, 60), thick.affine, pp) == (274, 274, 198)
    # the same file with millimetres written as centimetres' worth of voxels: refused
    wrong = Volume(np.broadcast_to(np.float32(0), (512, 512, 60)), np.diag([8.0, 8.0, 50.0, 1.0]), (8.0, 8.0, 50.0))
    assert np.prod(network_grid_shape((512, 512, 60), wrong.affine, pp)) > MAX_UPSAMPLED_VOXELS
    with pytest.raises(ValueError, match="<in-memory volume>: its 512 x 512 x 60 voxels at 8 x 8 x 50 mm"):
        check_network_size(wrong, pp)


def test_a_volume_with_an_empty_axis_is_called_that(tmp_path):
    path = tmp_path / "zero.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((0, 5, 5), np.float32), np.eye(4)), path)
    for read in (load_volume, read_grid):
        with pytest.raises(VolumeError, match=r"zero.nii.gz: shape \(0, 5, 5\) has an empty axis"):
            read(path)
