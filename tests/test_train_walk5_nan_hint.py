"""A file with NaN or infinite voxels: the message names the file and the count (unchanged) and now the way out.

Before: `mambahome prompt --input nan.nii.gz ...` (and a worklist, a training dataset) said only
"nan.nii.gz: 27 of 171600 voxels are NaN or infinite": which file, not what to do about it.
"""
from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from conftest import REPO_ROOT
from engine.cli import main
from engine.io import VolumeError, check_finite_voxels, load_volume

BUNDLED = REPO_ROOT / "napari_mambahome" / "models" / "interactive.safetensors"


def _nan_scan(path, shape=(20, 22, 18), bad=27):
    data = np.full(shape, -200.0, np.float32)
    data.reshape(-1)[:bad] = np.nan  # a CT exported with NaN outside the scan field
    nib.save(nib.Nifti1Image(data, np.diag([1.5, 1.5, 2.0, 1.0])), str(path))
    return path


def _says_the_way_out(message: str) -> None:
    assert "background value" in message and "-1024" in message and "nan_to_num" in message, message
    assert "save it again" in message, message


def test_a_file_with_nan_voxels_says_what_to_do(tmp_path):
    path = _nan_scan(tmp_path / "nan.nii.gz")
    with pytest.raises(VolumeError, match=rf"^{path}: 27 of 7920 voxels are NaN or infinite; ") as caught:
        load_volume(path)
    _says_the_way_out(str(caught.value))
    # a volume that is no file (a napari layer, an in-memory array) keeps the count alone
    with pytest.raises(VolumeError, match=r"^holes: 1 of 3 voxels are NaN or infinite$"):
        check_finite_voxels(np.array([1.0, np.nan, 2.0]), "holes")


def test_prompt_shows_the_way_out(tmp_path, capsys):
    if not BUNDLED.is_file():
        pytest.skip("the bundled interactive model is not in this checkout")
    scan = _nan_scan(tmp_path / "nan.nii.gz")
    assert main(["prompt", "--checkpoint", str(BUNDLED), "--input", str(scan), "--output", str(tmp_path / "o.nii.gz"),
                 "--point", "10", "10", "9", "--device", "cpu", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "nan.nii.gz: 27 of 7920 voxels are NaN or infinite" in err, err
    _says_the_way_out(err)
