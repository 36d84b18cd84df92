"""A real scan (shared data) made oblique and sheared, through `mambahome predict` and the napari writer: the mask
opens on the image in nibabel and in SimpleITK, or the write is refused naming the file and the format to use."""
from __future__ import annotations

import warnings

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from engine.cli import main
from geometry_support import itk_affine

sitk.ProcessObject_SetGlobalWarningDisplay(False)


def _tiny_checkpoint(path):
    import torch

    from engine.checkpoint import save_checkpoint
    from engine.networks import build_network
    from engine.preprocess import Preprocessing

    torch.manual_seed(0)
    save_checkpoint(path, build_network("mambahome", 1, 3, "tiny"),
                    {"class_names": ["background", "a", "b"], "modality": "MR", "patch_size": [32, 32, 32],
                     "preprocessing": Preprocessing.for_modality("MR", target_spacing=(2.0, 2.0, 2.0)).to_dict()})
    return path


@pytest.fixture
def oblique_scans(shared_data, tmp_path):
    """The real hippocampus scan rotated to oblique, written with (a) sform + qform agreeing and (b) a sheared sform
    over that rigid qform (the qform cannot hold the shear)."""
    scan = nib.load(str(shared_data / "hippocampus" / "imagesTr" / "hippocampus_001.nii.gz"))
    data = np.asarray(scan.dataobj, dtype=np.float32)
    angle = np.deg2rad(17.0)
    rot = np.eye(4)
    rot[:3, :3] = [[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]]
    tilt = np.eye(4)
    tilt[:3, :3] = [[1, 0, 0], [0, np.cos(0.3), -np.sin(0.3)], [0, np.sin(0.3), np.cos(0.3)]]
    oblique = tilt @ rot @ scan.affine
    sheared = oblique.copy()
    sheared[:3, :3] = sheared[:3, :3] @ np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.25], [0.0, 0.0, 1.0]])
    paths = {}
    for name, sform in (("oblique", oblique), ("sheared", sheared)):
        img = nib.Nifti1Image(data, None)
        img.set_qform(oblique, code=1)
        img.set_sform(sform, code=2)
        paths[name] = tmp_path / f"{name}.nii.gz"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            nib.save(img, str(paths[name]))
    return paths


def _same_header_geometry(a, b):
    ha, hb = nib.load(str(a)).header, nib.load(str(b)).header
    for key in ("qform_code", "sform_code"):
        assert int(ha[key]) == int(hb[key])
    np.testing.assert_array_equal(ha.get_qform(), hb.get_qform())
    np.testing.assert_array_equal(ha.get_sform(), hb.get_sform())
    np.testing.assert_array_equal(ha["pixdim"][:4], hb["pixdim"][:4])


def test_predict_on_oblique_and_sheared_real_scans(oblique_scans, tmp_path, capsys):
    ckpt = _tiny_checkpoint(tmp_path / "model.safetensors")
    for name, scan in oblique_scans.items():
        out = tmp_path / "out" / f"{name}_seg.nii.gz"
        assert main(["predict", "--checkpoint", str(ckpt), "--input", str(scan), "--output", str(out),
                     "--device", "cpu", "--quiet"]) == 0
        _same_header_geometry(scan, out)
        np.testing.assert_array_equal(nib.load(str(out)).affine, nib.load(str(scan)).affine)
        np.testing.assert_allclose(itk_affine(out), itk_affine(scan), atol=1e-5)
        assert nib.load(str(out)).shape == nib.load(str(scan)).shape
    # one geometry only: fine when ITK and nibabel agree on the image, refused when the sform is sheared
    ok = tmp_path / "out" / "oblique_seg.nrrd"
    assert main(["predict", "--checkpoint", str(ckpt), "--input", str(oblique_scans["oblique"]), "--output", str(ok),
                 "--device", "cpu", "--quiet"]) == 0
    np.testing.assert_allclose(itk_affine(ok), itk_affine(oblique_scans["oblique"]), atol=1e-4)
    capsys.readouterr()
    bad = tmp_path / "out" / "sheared_seg.nrrd"
    assert main(["predict", "--checkpoint", str(ckpt), "--input", str(oblique_scans["sheared"]), "--output", str(bad),
                 "--device", "cpu", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "sheared_seg.nrrd" in err and ".nii.gz" in err
    assert not bad.exists()


def test_napari_writer_on_a_sheared_real_scan(oblique_scans, tmp_path):
    from napari_mambahome._reader import read_volumes
    from napari_mambahome._writer import write_labels

    scan = oblique_scans["sheared"]
    [(data, kwargs, _)] = read_volumes(str(scan))
    labels = (np.asarray(data) > np.percentile(data, 80)).astype(np.uint8)
    meta = {"name": kwargs["name"], "scale": list(kwargs["scale"]), "translate": list(kwargs["translate"]),
            "metadata": kwargs["metadata"]}
    [written] = write_labels(str(tmp_path / "seg.nii.gz"), labels, meta)
    _same_header_geometry(scan, written)
    np.testing.assert_allclose(itk_affine(written), itk_affine(scan), atol=1e-5)
    assert int(np.asarray(nib.load(written).dataobj).sum()) == int(labels.sum())
    from engine.io import VolumeError

    with pytest.raises(VolumeError, match=r"\.nii\.gz"):
        write_labels(str(tmp_path / "seg.mha"), labels, meta)
    assert not (tmp_path / "seg.mha").exists()
