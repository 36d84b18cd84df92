"""A mask whose format cannot hold the scan's grid was refused only when it was written, after the network had run
(files walk: a NRRD scan with a tilted-gantry shear predicted to ``.nii.gz``, a NIfTI whose qform and sform disagree
prompted into ``.mha``): minutes lost on a CT on the CPU, and for each case of a folder. ``predict``, ``prompt`` and
``prompt --worklist`` now refuse right after reading the scan, with the same message, and write nothing."""
from __future__ import annotations

import time
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from engine.cli import main

sitk.ProcessObject_SetGlobalWarningDisplay(False)
INTERACTIVE = Path(__file__).resolve().parents[1] / "napari_mambahome" / "models" / "interactive.safetensors"


def _checkpoint(path: Path) -> Path:
    import torch

    from engine.checkpoint import save_checkpoint
    from engine.networks import build_network
    from engine.preprocess import Preprocessing

    torch.manual_seed(0)
    save_checkpoint(path, build_network("mambahome", 1, 2, "tiny"),
                    {"class_names": ["background", "a"], "modality": "MR", "patch_size": [32, 32, 32],
                     "preprocessing": Preprocessing.for_modality("MR", target_spacing=(2.0, 2.0, 2.0)).to_dict()})
    return path


def _voxels() -> np.ndarray:
    return np.random.default_rng(0).normal(100.0, 20.0, (20, 18, 12)).astype(np.float32)


def _sheared_nrrd(path: Path) -> Path:
    import nrrd

    directions = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.4, 2.0]])  # k tilted towards j: a gantry tilt
    nrrd.write(str(path), _voxels(), {"space": "left-posterior-superior", "space directions": directions,
                                      "space origin": [0.0, 0.0, 0.0]})
    return path


def _qform_sform_apart(path: Path) -> Path:
    img = nib.Nifti1Image(_voxels(), None)
    sform = np.diag([1.0, 1.0, 2.0, 1.0])
    qform = sform.copy()
    qform[:3, 3] = 25.0
    img.set_sform(sform, code=2)
    img.set_qform(qform, code=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nib.save(img, str(path))
    return path


def _tilted_dicom_series(folder: Path) -> Path:
    folder.mkdir()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    uid = f"1.2.826.0.1.3680043.2.1125.77.{int(time.time())}"
    for k, voxels in enumerate(np.random.default_rng(0).integers(-100, 100, (8, 16, 16)).astype(np.int16)):
        one = sitk.GetImageFromArray(voxels)
        for key, value in (("0008|0060", "CT"), ("0020|000e", uid), ("0020|000d", uid + ".1"),
                           ("0008|0016", "1.2.840.10008.5.1.4.1.1.2"), ("0020|0032", f"0\\{0.5 * k}\\{2.0 * k}"),
                           ("0020|0037", "1\\0\\0\\0\\1\\0"), ("0020|0013", str(k + 1)), ("0018|0050", "2")):
            one.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"{k}.dcm"))
        writer.Execute(one)
    return folder


def _no_network(*args, **kwargs):
    raise AssertionError("the network ran before the output's format was checked against the scan's grid")


@pytest.mark.parametrize("scan, output, says", [
    (_sheared_nrrd, "mask.nii.gz", "not perpendicular"),
    (_qform_sform_apart, "mask.nrrd", "qform and sform disagree"),
])
def test_predict_refuses_a_grid_its_output_cannot_hold_before_the_network(tmp_path, monkeypatch, capsys, scan,
                                                                           output, says):
    from engine.inference import Predictor

    image = scan(tmp_path / ("scan.nrrd" if scan is _sheared_nrrd else "scan.nii.gz"))
    ckpt = _checkpoint(tmp_path / "model.safetensors")
    monkeypatch.setattr(Predictor, "predict", _no_network)
    out = tmp_path / "out" / output
    assert main(["predict", "--checkpoint", str(ckpt), "--input", str(image), "--output", str(out),
                 "--device", "cpu", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert says in err and str(out) in err
    assert not out.exists() and not (tmp_path / "out").exists()


def test_prompt_refuses_a_grid_its_output_cannot_hold_before_any_prompt(tmp_path, monkeypatch, capsys):
    from engine.interactive import command

    monkeypatch.setattr(command, "run_prompts", _no_network)
    image = _qform_sform_apart(tmp_path / "scan.nii.gz")
    out = tmp_path / "mask.mha"
    assert main(["prompt", "--checkpoint", str(INTERACTIVE), "--input", str(image), "--output", str(out),
                 "--point", "10", "9", "6", "--device", "cpu", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "qform and sform disagree" in err and str(out) in err and ".nii.gz" in err
    assert not out.exists()


def test_worklist_skips_a_tilted_series_before_prompting_it(tmp_path, monkeypatch, capsys):
    """A DICOM series' mask is named ``<series>.nii.gz``: a tilted series is reported before its prompts run."""
    from engine.interactive import command

    monkeypatch.setattr(command, "apply_prompts", _no_network)
    _tilted_dicom_series(tmp_path / "tilted")
    worklist = tmp_path / "list.csv"
    worklist.write_text("image,label,prompt\ntilted,1,point 8 8 4\n")
    out = tmp_path / "masks"
    assert main(["prompt", "--checkpoint", str(INTERACTIVE), "--worklist", str(worklist), "--output-dir", str(out),
                 "--device", "cpu", "--quiet"]) == 2  # its only image skipped: nothing written (predict's rule)
    captured = capsys.readouterr()
    assert "not perpendicular" in captured.out and "tilted.nii.gz" in captured.out
    assert not (out / "tilted.nii.gz").exists()


def test_predict_refuses_an_output_without_a_type_before_reading_the_scan(tmp_path, monkeypatch, capsys):
    """``--output labels`` for one scan (meant as a folder) was refused only after the whole prediction."""
    import engine.io

    def not_read(*args, **kwargs):
        raise AssertionError("the scan was read before the output's type was checked")

    image = _qform_sform_apart(tmp_path / "scan.nii.gz")
    ckpt = _checkpoint(tmp_path / "model.safetensors")
    monkeypatch.setattr(engine.io, "load_volume", not_read)
    out = tmp_path / "labels"
    assert main(["predict", "--checkpoint", str(ckpt), "--input", str(image), "--output", str(out),
                 "--device", "cpu", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "cannot write this file type" in err and f"end the name with / ({out}/)" in err
    assert not out.exists()
