"""NRRD ``space`` values read as ITK (SimpleITK, 3D Slicer) reads them, and `mambahome dataset` reporting every
case's problems in one run.

Reproductions (before the fix):
- a NRRD with ``space: scanner-xyz`` or ``3D-right-handed`` was read as RAS, ITK reads those numbers as LPS (it
  converts only RAS and LAS): the image sat mirrored in x and y, and labels written back (space LPS) lay
  mirrored beside the image in Slicer/ITK; ``3D-left-handed`` (which ITK reads, as LPS) was refused, and
  space-time spaces got "has 3 spatial axes ... expected a 3D volume" instead of naming the space;
- a ``.seg.nrrd`` whose space was spelled ``LPS`` / ``scanner-xyz`` was "corrupt, truncated" (slicerio knows
  the two spellings 3D Slicer writes only): now refused naming the space;
- `mambahome dataset` stopped at the first kind of problem: a NaN voxel in one case was reported, the
  label on another grid in another case only in the next run (and an unreadable label hid both).
"""
from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from engine.formats import FormatError, read_raw
from engine.io import load_label, load_volume, save_volume

sitk = pytest.importorskip("SimpleITK")
pytest.importorskip("nrrd")

SHAPE = (4, 5, 6)
DIRECTIONS = "(0,1.5,0) (-2,0,0) (0.3,0,3)"  # oblique, an axis swap: any wrong sign shows
ORIGIN = "(10,-20,30)"
LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
CORNERS = [(0, 0, 0), (3, 0, 0), (0, 4, 0), (0, 0, 5), (3, 4, 5)]


def _write_nrrd(path, space=None, extra=""):
    """A NRRD written by hand, so any ``space`` spelling goes in as given (pynrrd writes the header verbatim)."""
    data = np.arange(np.prod(SHAPE), dtype=np.uint8)
    head = "NRRD0004\ntype: uint8\ndimension: 3\n" + (f"space: {space}\n" if space else "") + extra
    head += f"sizes: {' '.join(map(str, SHAPE))}\n"
    if space or extra:
        head += f"space directions: {DIRECTIONS}\nspace origin: {ORIGIN}\n"
    else:  # no space at all: only spacings (space directions need a space or a space dimension)
        head += "spacings: 1.5 2 3\n"
    head += "kinds: domain domain domain\nencoding: raw\n\n"
    path.write_bytes(head.encode() + data.tobytes())
    return path


def _itk_ras_points(path, corners=CORNERS):
    image = sitk.ReadImage(str(path))
    lps = np.array([image.TransformIndexToPhysicalPoint(c) for c in corners])
    return lps * np.array([-1.0, -1.0, 1.0])


def _our_ras_points(affine, corners=CORNERS):
    return (np.asarray(affine) @ np.c_[np.array(corners, float), np.ones(len(corners))].T).T[:, :3]


@pytest.mark.parametrize("space, extra", [
    ("right-anterior-superior", ""), ("RAS", ""), ("Right-Anterior-Superior", ""),
    ("left-anterior-superior", ""), ("LAS", ""),
    ("left-posterior-superior", ""), ("LPS", ""),
    ("scanner-xyz", ""), ("3D-right-handed", ""), ("3D-left-handed", ""),
    (None, ""), (None, "space dimension: 3\n"),
])
def test_every_3d_nrrd_space_reads_where_itk_puts_it(tmp_path, space, extra):
    path = _write_nrrd(tmp_path / "x.nrrd", space, extra)
    vol = read_raw(path)
    np.testing.assert_allclose(_our_ras_points(vol.affine), _itk_ras_points(path), atol=1e-9)
    assert vol.data[1, 2, 3] == sitk.GetArrayFromImage(sitk.ReadImage(str(path)))[3, 2, 1]


@pytest.mark.parametrize("space", ["scanner-xyz", "3D-right-handed", "3D-left-handed", "LAS", None])
def test_3d_slicer_puts_every_voxel_where_we_do(tmp_path, space):
    """3D Slicer's own volume reader (slicer-core's MRML storage node; it may reorder a left-handed grid's slices,
    so voxel centres and values are compared, not matrices)."""
    slicer = pytest.importorskip("slicer", reason="needs the slicer-core package (MRML classes)")
    if not hasattr(slicer, "vtkMRMLScene"):
        pytest.skip("the installed 'slicer' package has no MRML classes")
    import vtk
    from vtk.util import numpy_support

    path = _write_nrrd(tmp_path / "x.nrrd", space)
    scene = slicer.vtkMRMLScene()
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    assert storage.ReadData(node)
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    slicer_affine = np.array([[m.GetElement(i, j) for j in range(4)] for i in range(4)])
    dims = node.GetImageData().GetDimensions()
    slicer_data = numpy_support.vtk_to_numpy(node.GetImageData().GetPointData().GetScalars())
    slicer_data = slicer_data.reshape(dims[::-1]).transpose(2, 1, 0)

    def voxels(affine, data):
        idx = np.argwhere(np.ones(data.shape, bool))
        pts = np.round(_our_ras_points(affine, idx), 6)
        order = np.lexsort(pts.T)
        return pts[order], data[tuple(idx.T)][order]

    ours = read_raw(path)
    (p_slicer, v_slicer), (p_ours, v_ours) = voxels(slicer_affine, slicer_data), voxels(ours.affine, ours.data)
    np.testing.assert_allclose(p_ours, p_slicer, atol=1e-6)
    np.testing.assert_array_equal(v_ours, v_slicer)


@pytest.mark.parametrize("space", ["scanner-xyz-time", "3D-right-handed-time", "3D-left-handed-time", "RAST",
                                   "right-anterior-superior-time", "LAST", "LPST", "left-posterior-superior-time"])
def test_space_time_nrrd_is_refused_naming_the_file_and_space(tmp_path, space):
    path = tmp_path / "t.nrrd"
    data = np.zeros(np.prod(SHAPE), np.uint8)
    head = (f"NRRD0004\ntype: uint8\ndimension: 4\nspace: {space}\nsizes: 4 5 6 1\n"
            "space directions: (0,1.5,0,0) (-2,0,0,0) (0.3,0,3,0) (0,0,0,1)\nspace origin: (10,-20,30,0)\n"
            "kinds: domain domain domain domain\nencoding: raw\n\n")
    path.write_bytes(head.encode() + data.tobytes())
    with pytest.raises(FormatError, match=rf"t\.nrrd: NRRD space '{space}' is a space-time \(4D\) space"):
        read_raw(path)


def test_unknown_space_and_2d_space_dimension_are_refused_by_name(tmp_path):
    with pytest.raises(FormatError, match=r"u\.nrrd: NRRD space 'patient-xyz' is not a 3D space"):
        read_raw(_write_nrrd(tmp_path / "u.nrrd", "patient-xyz"))
    path = tmp_path / "d.nrrd"
    path.write_bytes(b"NRRD0004\ntype: uint8\ndimension: 2\nspace dimension: 2\nsizes: 2 2\n"
                     b"space directions: (1,0) (0,1)\nencoding: raw\n\n" + bytes(4))
    with pytest.raises(FormatError, match=r"d\.nrrd: NRRD 'space dimension: 2' is not a 3D space"):
        read_raw(path)


def _assert_itk_overlays(label_path, image_path):
    image, label = sitk.ReadImage(str(image_path)), sitk.ReadImage(str(label_path))
    assert label.GetSize() == image.GetSize()
    np.testing.assert_allclose(label.GetOrigin(), image.GetOrigin(), atol=1e-6)
    np.testing.assert_allclose(label.GetSpacing(), image.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(label.GetDirection(), image.GetDirection(), atol=1e-6)


@pytest.mark.parametrize("space", ["scanner-xyz", "3D-right-handed", "3D-left-handed", "RAS", "LAS"])
@pytest.mark.parametrize("suffix", [".nrrd", ".seg.nrrd", ".nhdr"])
def test_labels_written_back_overlay_the_image_in_itk(tmp_path, space, suffix):
    image_path = _write_nrrd(tmp_path / "image.nrrd", space)
    ref = load_volume(image_path)
    label = np.zeros(SHAPE, np.uint8)
    label[1:3, 2:4, 3:5] = 1
    out = save_volume(tmp_path / f"label{suffix}", label, ref)
    _assert_itk_overlays(out, image_path)
    itk_label = sitk.GetArrayFromImage(sitk.ReadImage(str(out))).transpose(2, 1, 0)
    np.testing.assert_array_equal(itk_label, label)
    back = load_label(out)
    np.testing.assert_allclose(back.affine, ref.affine, atol=1e-9)


@pytest.mark.parametrize("space", ["LPS", "scanner-xyz", "RAS", "3D-right-handed", "left-posterior-superior"])
def test_seg_nrrd_in_a_space_slicer_does_not_write_is_refused_naming_it(tmp_path, space):
    slicerio = pytest.importorskip("slicerio")
    labels = np.zeros(SHAPE, np.uint8)
    labels[1:3, 1:3, 1:3] = 1
    affine = np.array([[0, -2, 0.3, 10], [1.5, 0, 0, -20], [0, 0, 3, 30], [0, 0, 0, 1]])
    path = tmp_path / "s.seg.nrrd"
    slicerio.write_segmentation(str(path), {"voxels": labels, "ijkToLPS": affine, "segments": [
        {"id": "Segment_1", "name": "liver", "labelValue": 1, "layer": 0, "extent": [1, 2, 1, 2, 1, 2]}]})
    raw = path.read_bytes()
    assert raw.count(b"space: left-posterior-superior\n") == 1
    path.write_bytes(raw.replace(b"space: left-posterior-superior\n", f"space: {space}\n".encode()))
    if space != "left-posterior-superior":
        with pytest.raises(FormatError, match=f"s.seg.nrrd: a .seg.nrrd in space '{space}'"):
            read_raw(path)
        return
    vol = read_raw(path)  # the space Slicer writes: read with ITK's geometry
    corners = [(0, 0, 0), (3, 4, 5)]
    np.testing.assert_allclose(_our_ras_points(vol.affine, corners), _itk_ras_points(path, corners), atol=1e-9)
    assert vol.segments[0]["name"] == "liver"
    np.testing.assert_array_equal(vol.data, labels)


def test_shared_label_in_scanner_xyz_nrrd_round_trips_onto_itk_image(shared_data, tmp_path):
    """A real image and label re-saved as NRRDs in ``scanner-xyz`` with ITK's (LPS) numbers, as a converter
    that writes ITK's physical space under that name does: read, written back, the label overlays in ITK."""
    import nrrd

    src = shared_data / "hippocampus"
    image_nii = nib.load(str(src / "imagesTr" / "hippocampus_001.nii.gz"))
    label_nii = nib.load(str(src / "labelsTr" / "hippocampus_001.nii.gz"))
    lps = LPS @ image_nii.affine
    header = {"space": "scanner-xyz", "space directions": lps[:3, :3].T, "space origin": lps[:3, 3],
              "kinds": ["domain"] * 3}
    nrrd.write(str(tmp_path / "image.nrrd"), np.asarray(image_nii.dataobj).astype(np.float32), header)
    ref = load_volume(tmp_path / "image.nrrd")
    np.testing.assert_allclose(ref.affine, image_nii.affine, atol=1e-5)
    label = np.asarray(label_nii.dataobj).astype(np.uint8)
    out = save_volume(tmp_path / "pred.seg.nrrd", label, ref)
    _assert_itk_overlays(out, tmp_path / "image.nrrd")
    # and ITK puts the label's voxels where NIfTI puts them
    itk = sitk.ReadImage(str(out))
    idx = tuple(int(i) for i in np.argwhere(label > 0)[0])
    ras = np.array(itk.TransformIndexToPhysicalPoint(idx)) * np.array([-1.0, -1.0, 1.0])
    np.testing.assert_allclose(ras, (label_nii.affine @ np.r_[idx, 1.0])[:3], atol=1e-4)


# ----------------------------------------------------------------------------- `mambahome dataset` in one pass
def _pairs(root, n=3, size=8):
    rng = np.random.default_rng(0)
    images, labels = root / "imgs", root / "labs"
    images.mkdir()
    labels.mkdir()
    for i in range(n):
        label = np.zeros((size,) * 3, np.uint8)
        label[2:5, 2:5, 2:5] = 1
        nib.save(nib.Nifti1Image(rng.random((size,) * 3).astype(np.float32), np.eye(4)), str(images / f"c{i}.nii.gz"))
        nib.save(nib.Nifti1Image(label, np.eye(4)), str(labels / f"c{i}.nii.gz"))
    return images, labels


def _nan_voxel(path):
    img = nib.load(str(path))
    data = img.get_fdata().astype(np.float32)
    data[1, 1, 1] = np.nan
    nib.save(nib.Nifti1Image(data, img.affine), str(path))


def _shift(path, mm=2.0):
    img = nib.load(str(path))
    affine = img.affine.copy()
    affine[0, 3] += mm
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), affine), str(path))


def test_dataset_reports_image_label_and_grid_problems_of_every_case_at_once(tmp_path, capsys):
    from engine.cli import main

    images, labels = _pairs(tmp_path, n=4)
    _nan_voxel(images / "c0.nii.gz")                       # an image problem
    _shift(labels / "c1.nii.gz")                           # a grid problem
    (labels / "c2.nii.gz").write_bytes(b"not a volume")    # an unreadable label
    _nan_voxel(images / "c2.nii.gz")                       # ... beside a bad image of the same case
    out = tmp_path / "ds"
    assert main(["dataset", "--images", str(images), "--labels", str(labels), "--modality", "MR",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "4 problem(s)" in err, err
    assert f"case c0: {images / 'c0.nii.gz'}" in err and "voxels are NaN" in err
    assert f"case c1: label {labels / 'c1.nii.gz'} lies on a different grid" in err
    assert f"case c2: {labels / 'c2.nii.gz'}" in err and f"case c2: {images / 'c2.nii.gz'}" in err
    assert "case c3" not in err
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_dataset_report_is_bounded_and_counts_the_rest(tmp_path):
    from engine.datasets import DatasetError, make_dataset

    images, labels = _pairs(tmp_path, n=24, size=6)
    for i in range(12):
        _nan_voxel(images / f"c{i}.nii.gz")
        _shift(labels / f"c{i}.nii.gz")
    with pytest.raises(DatasetError) as err:
        make_dataset(images, labels, tmp_path / "ds", "MR")
    msg = str(err.value)
    assert "24 problem(s)" in msg and "... and 4 more" in msg
    assert len([line for line in msg.splitlines() if line.startswith("  case ")]) == 20
    assert not (tmp_path / "ds").exists()


def test_validate_names_an_unreadable_label_and_an_off_grid_channel_together(tmp_path):
    from engine.datasets import CaseRef, Dataset, DatasetError

    images, labels = _pairs(tmp_path, n=1)
    second = images / "c0_0001.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.diag([2.0, 1, 1, 1])), str(second))
    (labels / "c0.nii.gz").write_bytes(b"not a volume")
    case = CaseRef(case_id="c0", image=[images / "c0.nii.gz", second], label=labels / "c0.nii.gz",
                   modality="MR")
    ds = Dataset(name="d", root=tmp_path, cases=[case], class_names=["background", "a"], modality="MR",
                 channel_names=["MR", "MR"], layout="msd")
    with pytest.raises(DatasetError) as err:
        ds.validate(deep=True)
    msg = str(err.value)
    assert "2 problem(s)" in msg and "channel" in msg and str(labels / "c0.nii.gz") in msg
