"""Masks written for oblique and sheared images open aligned with them in nibabel/napari AND in ITK (3D Slicer).

Every image geometry users bring (NIfTI with one form, both, disagreeing forms, a sheared sform, no form at all;
NRRD with non-orthogonal space directions; NRRD/MHA with a direction matrix) goes through each public writing path
(``save_volume`` / ``volume_writer`` as ``mambahome predict`` and the napari writer use them, a saved case), and
image and mask are read back with nibabel (the engine) and SimpleITK: their voxel-to-world maps must agree, or the
write must be refused with a message naming the file and the format to use instead.
"""
from __future__ import annotations

import warnings

import nibabel as nib
import nrrd
import numpy as np
import pytest
import SimpleITK as sitk

from engine.io import (VolumeError, atomic_write_all, load_label, load_volume, nifti_itk_affine, save_volume,
                       volume_writer)
from geometry_support import LPS, itk_affine

sitk.ProcessObject_SetGlobalWarningDisplay(False)  # "unexpected scales in sform" on purpose
SHAPE = (10, 12, 8)


def _rotation() -> np.ndarray:
    q, _ = np.linalg.qr(np.array([[0.9, -0.3, 0.1], [0.3, 0.9, -0.2], [0.0, 0.2, 0.95]]))
    return q * np.sign(np.diag(q))[None, :]


def _oblique(zooms=(1.5, 1.2, 2.0), offset=(10.0, -20.0, 30.0)) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = _rotation() @ np.diag(zooms)
    affine[:3, 3] = offset
    return affine


def _sheared() -> np.ndarray:
    affine = _oblique()
    affine[:3, :3] = affine[:3, :3] @ np.array([[1.0, 0.3, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    return affine


def _other() -> np.ndarray:
    affine = np.diag([1.5, 1.2, 2.0, 1.0])
    affine[:3, 3] = (-5.0, 5.0, 0.0)
    return affine


def _data():
    rng = np.random.default_rng(0)
    image = rng.normal(100.0, 20.0, size=SHAPE).astype(np.float32)
    labels = np.zeros(SHAPE, np.uint8)
    labels[2:6, 3:9, 1:5] = 1
    labels[6:9, 1:4, 5:7] = 2
    return image, labels


def _nifti(path, sform=None, s_code=0, qform=None, q_code=0, data=None):
    img = nib.Nifti1Image(_data()[0] if data is None else data, None)
    img.header.set_zooms((1.5, 1.2, 2.0))
    img.set_qform(qform, code=q_code) if qform is not None else img.set_qform(None, code=0)
    img.set_sform(sform, code=s_code) if sform is not None else img.set_sform(None, code=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nib.save(img, str(path))
    return path


NIFTI_CASES = {
    # name: (sform, sform_code, qform, qform_code, ITK places it as nibabel does)
    "qform_only": (None, 0, _oblique(), 1, True),
    "sform_only": (_oblique(), 2, None, 0, True),
    "both_agree": (_oblique(), 1, _oblique(), 1, True),
    "disagree": (_oblique(), 2, _other(), 1, False),
    "sheared_sform_with_qform": (_sheared(), 2, _oblique(), 1, False),
    "sheared_sform_only": (_sheared(), 1, None, 0, False),
    "no_form": (None, 0, None, 0, False),
}


def _nib_affine(path):
    return np.asarray(nib.load(str(path)).affine) if str(path).endswith((".nii.gz", ".nii", ".mgz")) \
        else load_volume(path).affine


def _itk_data(path):
    return np.asarray(sitk.GetArrayFromImage(sitk.ReadImage(str(path)))).transpose(2, 1, 0)


def _assert_same_place(a, b, atol=1e-4):
    assert (a is None) == (b is None), "one of image and mask is unreadable in ITK, the other is not"
    if a is not None:
        np.testing.assert_allclose(a, b, atol=atol, rtol=0)


def _header_geometry(header):
    return (int(header["qform_code"]), int(header["sform_code"]), header.get_qform(), header.get_sform(),
            np.asarray(header["pixdim"][1:4]), float(header["pixdim"][0]))


def _assert_same_header_geometry(image_header, mask_header):
    for a, b in zip(_header_geometry(image_header), _header_geometry(mask_header)):
        np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------- reading
@pytest.mark.parametrize("name", sorted(NIFTI_CASES))
def test_reading_follows_nibabel_and_itk_emulation_matches_simpleitk(tmp_path, name):
    sform, s_code, qform, q_code, agree = NIFTI_CASES[name]
    path = _nifti(tmp_path / f"{name}.nii.gz", sform, s_code, qform, q_code)
    image = nib.load(str(path))
    vol = load_volume(path)
    np.testing.assert_array_equal(vol.affine, image.header.get_best_affine())  # nibabel's choice, documented
    expected_itk = itk_affine(path)
    emulated = nifti_itk_affine(vol.header)
    _assert_same_place(emulated, expected_itk, atol=1e-4)
    # a file ITK places elsewhere says so (the napari reader shows these notes)
    assert bool(vol.notes) == (not agree)
    if not agree:
        assert "ITK" in vol.notes[0] and "nibabel" in vol.notes[0]


def test_disagreeing_forms_are_read_by_the_sform_as_nibabel_does(tmp_path):
    path = _nifti(tmp_path / "d.nii.gz", _oblique(), 2, _other(), 1)
    np.testing.assert_allclose(load_volume(path).affine, _oblique(), atol=1e-5)
    np.testing.assert_allclose(load_label(_nifti(tmp_path / "l.nii.gz", _oblique(), 2, _other(), 1,
                                                 data=_data()[1])).affine, _oblique(), atol=1e-5)
    assert "qform and sform disagree" in load_volume(path).notes[0]


def test_no_form_is_read_with_nibabels_fallback(tmp_path):
    path = _nifti(tmp_path / "n.nii.gz")
    vol = load_volume(path)
    np.testing.assert_array_equal(vol.affine, nib.load(str(path)).affine)
    assert "neither a qform nor an sform" in vol.notes[0]


# ----------------------------------------------------------------------------- NIfTI image -> masks
@pytest.mark.parametrize("name", sorted(NIFTI_CASES))
def test_nifti_mask_carries_the_image_header_exactly(tmp_path, name):
    sform, s_code, qform, q_code, _ = NIFTI_CASES[name]
    path = _nifti(tmp_path / f"{name}.nii.gz", sform, s_code, qform, q_code)
    image = load_volume(path)
    labels = _data()[1]
    out = save_volume(tmp_path / "mask.nii.gz", labels, image)
    _assert_same_header_geometry(nib.load(str(path)).header, nib.load(str(out)).header)
    np.testing.assert_array_equal(_nib_affine(out), _nib_affine(path))
    _assert_same_place(itk_affine(out), itk_affine(path))
    np.testing.assert_array_equal(load_label(out).data, labels)
    if itk_affine(out) is not None:
        np.testing.assert_array_equal(_itk_data(out), labels)
    # the all-or-nothing group predict uses (labels + probabilities) writes the same header
    probs = np.stack([labels == 0, labels == 1, labels == 2], -1).astype(np.float32)
    atomic_write_all([(tmp_path / "g.nii.gz", volume_writer(tmp_path / "g.nii.gz", labels, image)),
                      (tmp_path / "p.nii.gz", volume_writer(tmp_path / "p.nii.gz", probs, image))])
    for written in ("g.nii.gz", "p.nii.gz"):
        _assert_same_header_geometry(nib.load(str(path)).header, nib.load(str(tmp_path / written)).header)


@pytest.mark.parametrize("suffix", [".nrrd", ".seg.nrrd", ".mha", ".nhdr", ".mgz"])
@pytest.mark.parametrize("name", sorted(NIFTI_CASES))
def test_single_geometry_mask_of_a_nifti_image(tmp_path, name, suffix):
    """A format with one geometry is written when ITK and nibabel place the NIfTI image alike (and then opens
    aligned in both), and refused otherwise, naming the image and .nii.gz; nothing is left behind."""
    sform, s_code, qform, q_code, agree = NIFTI_CASES[name]
    path = _nifti(tmp_path / f"{name}.nii.gz", sform, s_code, qform, q_code)
    image = load_volume(path)
    labels = _data()[1]
    out = tmp_path / "masks" / f"mask{suffix}"
    if not agree:
        with pytest.raises(VolumeError) as err:
            save_volume(out, labels, image)
        assert str(out) in str(err.value) and str(path) in str(err.value) and ".nii.gz" in str(err.value)
        with pytest.raises(VolumeError):
            volume_writer(out, labels, image)
        assert not out.parent.exists() or not any(out.parent.iterdir())
        return
    save_volume(out, labels, image)
    mask = load_label(out)
    np.testing.assert_allclose(mask.affine, image.affine, atol=1e-5)
    np.testing.assert_array_equal(mask.data, labels)
    if suffix != ".mgz":  # SimpleITK has no MGH reader
        _assert_same_place(itk_affine(out), itk_affine(path))
        np.testing.assert_array_equal(_itk_data(out), labels)


# ----------------------------------------------------------------------------- NRRD / MHA images -> masks
def _nrrd(path, affine, space="left-posterior-superior", data=None):
    linear = LPS @ affine if space == "left-posterior-superior" else affine
    nrrd.write(str(path), _data()[0] if data is None else data,
               {"space": space, "space directions": linear[:3, :3].T, "space origin": linear[:3, 3],
                "kinds": ["domain"] * 3})
    return path


def _mha(path, affine):
    lps = LPS @ affine
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    image = sitk.GetImageFromArray(_data()[0].transpose(2, 1, 0))
    image.SetSpacing(spacing.tolist())
    image.SetDirection((lps[:3, :3] / spacing[None, :]).ravel().tolist())
    image.SetOrigin(lps[:3, 3].tolist())
    sitk.WriteImage(image, str(path))
    return path


OTHER_CASES = {
    "nrrd_oblique_lps": lambda d: _nrrd(d / "img.nrrd", _oblique()),
    "nrrd_oblique_ras": lambda d: _nrrd(d / "img.nrrd", _oblique(), space="right-anterior-superior"),
    "nrrd_sheared": lambda d: _nrrd(d / "img.nrrd", _sheared()),
    "mha_oblique": lambda d: _mha(d / "img.mha", _oblique()),
}


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".seg.nrrd", ".mha", ".nhdr"])
@pytest.mark.parametrize("name", sorted(OTHER_CASES))
def test_masks_of_nrrd_and_mha_images_open_aligned(tmp_path, name, suffix):
    path = OTHER_CASES[name](tmp_path)
    image = load_volume(path)
    np.testing.assert_allclose(image.affine, _sheared() if "sheared" in name else _oblique(), atol=1e-6)
    labels = _data()[1]
    out = tmp_path / f"mask{suffix}"
    if "sheared" in name and suffix == ".nii.gz":
        # NIfTI holds a shear in its sform only and ITK would place the mask by the (rigid) qform
        with pytest.raises(VolumeError) as err:
            save_volume(out, labels, image)
        assert str(out) in str(err.value) and ".nrrd" in str(err.value) and "sheared" in str(err.value)
        assert not out.exists()
        return
    save_volume(out, labels, image)
    mask = load_label(out)
    np.testing.assert_allclose(mask.affine, image.affine, atol=1e-5)
    np.testing.assert_array_equal(mask.data, labels)
    _assert_same_place(itk_affine(out), itk_affine(path))
    np.testing.assert_array_equal(_itk_data(out), labels)
    if suffix == ".nii.gz":
        np.testing.assert_allclose(nib.load(str(out)).header.get_qform(), image.affine, atol=1e-4)


# ----------------------------------------------------------------------------- saved cases
def test_case_of_a_sheared_nrrd_keeps_the_shear_in_one_shared_header(tmp_path):
    from engine.cases import CaseStore

    path = _nrrd(tmp_path / "tilted.nrrd", _sheared())
    image = load_volume(path)
    store = CaseStore(tmp_path / "cases")
    record = store.add(image, _data()[1], modality="CT", class_names=["background", "a", "b"])
    img_hdr, lab_hdr = nib.load(str(record.image_path)).header, nib.load(str(record.label_path)).header
    _assert_same_header_geometry(img_hdr, lab_hdr)
    np.testing.assert_allclose(lab_hdr.get_best_affine(), _sheared(), atol=1e-5)
    # no rigid qform that ITK would use to misplace the case: ITK refuses both files alike
    assert int(lab_hdr["qform_code"]) == 0
    assert itk_affine(record.label_path) is None and itk_affine(record.image_path) is None
    loaded_image, loaded_label, _ = store.load(record.case_id)
    np.testing.assert_allclose(loaded_label.affine, image.affine, atol=1e-5)
    np.testing.assert_array_equal(loaded_label.data, _data()[1])


@pytest.mark.parametrize("name", ["disagree", "sheared_sform_with_qform", "no_form"])
def test_case_of_an_ambiguous_nifti_keeps_its_header(tmp_path, name):
    from engine.cases import CaseStore

    sform, s_code, qform, q_code, _ = NIFTI_CASES[name]
    path = _nifti(tmp_path / f"{name}.nii.gz", sform, s_code, qform, q_code)
    record = CaseStore(tmp_path / "cases").add(load_volume(path), _data()[1], modality="MR",
                                               class_names=["background", "a", "b"])
    for written in (record.image_path, record.label_path):
        _assert_same_header_geometry(nib.load(str(path)).header, nib.load(str(written)).header)
        _assert_same_place(itk_affine(written), itk_affine(path))


def test_mask_of_a_nifti_emulation_is_exact_on_random_geometries(tmp_path):
    """nifti_itk_affine (which decides what is refused) agrees with SimpleITK on many random headers."""
    rng = np.random.default_rng(1)
    for t in range(60):
        q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
        qa = np.eye(4)
        qa[:3, :3] = q @ np.diag(rng.uniform(0.5, 3, 3))
        qa[:3, 3] = rng.normal(0, 50, 3)
        sa = [qa, _sheared(), _other(), qa @ np.diag([1, 1, 1.0004, 1])][t % 4]
        path = _nifti(tmp_path / f"r{t}.nii", sa, int(rng.integers(0, 4)), qa, int(rng.integers(0, 3)))
        _assert_same_place(nifti_itk_affine(nib.load(str(path)).header), itk_affine(path), atol=1e-3)
