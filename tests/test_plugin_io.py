"""Plugin reader, writer, geometry and manifest (no viewer needed)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from napari_mambahome._geometry import META_KEY, LayerGeometryError, geometry_from_state, scale_translate
from napari_mambahome._reader import get_reader, is_label_file, read_volumes
from napari_mambahome._writer import write_labels

REPO = Path(__file__).resolve().parents[1]


def _state(data, kwargs):
    """What napari hands a writer for a layer built from reader kwargs (Layer._get_state subset)."""
    return {"name": kwargs["name"], "scale": list(kwargs["scale"]), "translate": list(kwargs["translate"]),
            "metadata": kwargs["metadata"]}


def test_get_reader_accepts_nifti_only(tmp_volume):
    img_path, _, _ = tmp_volume
    assert get_reader(str(img_path)) is read_volumes
    assert get_reader([str(img_path), str(img_path)]) is read_volumes
    assert get_reader("slice.png") is None
    assert get_reader(["a.nii.gz", "b.tif"]) is None


def test_get_reader_claims_every_supported_format_and_dicom_folders(tmp_path):
    for name in ("scan.nrrd", "scan.NHDR", "organs.seg.nrrd", "scan.mha", "scan.mhd", "brain.mgz", "slice1.dcm"):
        assert get_reader(name) is read_volumes, name
    from engine.io import VolumeError

    with pytest.raises(VolumeError, match="not a DICOM series folder.*it is empty"):  # the reason, not napari's
        get_reader(str(tmp_path))(str(tmp_path))                                        # "refused the file"
    (tmp_path / "IM0001").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 64)  # DICOM files need no suffix
    assert get_reader(str(tmp_path)) is read_volumes


def test_reader_keeps_geometry_of_oblique_file(tmp_volume):
    img_path, lab_path, affine = tmp_volume
    [(data, kwargs, kind)] = read_volumes(str(img_path))
    assert kind == "image"
    # file axes run posterior, left, superior: shown as (superior, posterior, left), no flips
    assert data.shape == (16, 20, 24)
    np.testing.assert_allclose(kwargs["scale"], (2.0, 1.5, 1.5))
    meta = kwargs["metadata"][META_KEY]
    np.testing.assert_array_equal(np.asarray(meta["affine"]), affine)
    assert meta["display"] == {"order": [2, 0, 1], "flip": [False, False, False]}
    assert meta["path"] == str(img_path)
    assert meta["volume"].header is not None
    np.testing.assert_array_equal(data[5, 3, 7], meta["volume"].data[3, 7, 5])  # a view, not a resampling
    # napari's world position of a voxel is the file's world position expressed in the layer's axis frame
    display_affine = affine[:, [2, 0, 1, 3]]
    directions = display_affine[:3, :3] / np.array([2.0, 1.5, 1.5])
    voxel = np.array([5, 3, 7])
    napari_world = np.asarray(kwargs["scale"]) * voxel + np.asarray(kwargs["translate"])
    np.testing.assert_allclose(directions @ napari_world, (display_affine @ np.r_[voxel, 1])[:3])


def test_reader_opens_label_files_as_labels(tmp_volume, tmp_path):
    _, lab_path, _ = tmp_volume
    [(data, kwargs, kind)] = read_volumes(str(lab_path))
    assert kind == "labels"
    assert np.issubdtype(data.dtype, np.integer)
    assert set(np.unique(data)) == {0, 1, 2}
    assert is_label_file(tmp_path / "labelsTr" / "case_001.nii.gz")
    assert is_label_file("ct_label_auto.nii.gz")
    assert not is_label_file("ct_image.nii.gz")


def test_reader_bad_file_names_it(tmp_path):
    from engine.io import VolumeError

    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"not a nifti file at all")
    with pytest.raises(VolumeError, match="broken.nii.gz"):
        read_volumes(str(bad))
    flat = tmp_path / "slice.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((10, 12), np.float32), np.eye(4)), str(flat))
    with pytest.raises(VolumeError, match="slice.nii.gz.*2D"):
        read_volumes(str(flat))


def test_writer_round_trip_keeps_source_affine_and_data(tmp_volume, tmp_path):
    img_path, _, affine = tmp_volume
    [(data, kwargs, _)] = read_volumes(str(img_path))
    labels = np.zeros(data.shape, np.uint8)
    labels[2:9, 3:11, 4:12] = 2
    labels[10:15, 1:5, 0:3] = 1
    meta = _state(labels, kwargs)
    [written] = write_labels(str(tmp_path / "out" / "seg"), labels, meta)
    assert written.endswith("seg.nii.gz")
    back = nib.load(written)
    np.testing.assert_array_equal(back.affine, nib.load(str(img_path)).affine)
    # the layer shows file axes (2, 0, 1): the file holds the labels in its own voxel order
    np.testing.assert_array_equal(np.asarray(back.dataobj), np.transpose(labels, (1, 2, 0)))
    assert back.shape == nib.load(str(img_path)).shape
    # no temp files are left beside the result (atomic write)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["seg.nii.gz"]


def test_writer_without_source_uses_scale_and_says_so(tmp_path, monkeypatch):
    messages = []
    monkeypatch.setattr("napari.utils.notifications.show_info", messages.append)
    labels = np.zeros((8, 9, 10), np.int32)
    labels[1:4, 2:5, 3:6] = 3
    meta = {"name": "drawn", "scale": [2.0, 0.5, 0.75], "translate": [10.0, -4.0, 3.0], "metadata": {}}
    [written] = write_labels(str(tmp_path / "drawn.nii"), labels, meta)
    back = nib.load(written)
    np.testing.assert_allclose(back.affine[:3, :3], np.diag([2.0, 0.5, 0.75]))
    np.testing.assert_allclose(back.affine[:3, 3], [10.0, -4.0, 3.0])
    np.testing.assert_array_equal(np.asarray(back.dataobj), labels)
    assert messages and "without a source image" in messages[0] and "drawn" in messages[0]


def test_writer_refuses_labels_of_another_shape(tmp_volume, tmp_path):
    img_path, _, _ = tmp_volume
    [(data, kwargs, _)] = read_volumes(str(img_path))
    wrong = np.zeros((5, 5, 5), np.uint8)
    with pytest.raises(LayerGeometryError, match="shape"):
        write_labels(str(tmp_path / "x.nii.gz"), wrong, _state(wrong, kwargs))
    assert not (tmp_path / "x.nii.gz").exists()


def test_geometry_refuses_2d_and_rgb():
    with pytest.raises(LayerGeometryError, match="2 dimensions"):
        geometry_from_state("photo", np.zeros((10, 10)), {}, (1, 1), (0, 0))
    with pytest.raises(LayerGeometryError, match="RGB"):
        geometry_from_state("photo", np.zeros((10, 10, 3)), {}, (1, 1), (0, 0), rgb=True)
    geo = geometry_from_state("plain", np.zeros((4, 5, 6)), {}, (1, 1, 1), (0, 0, 0))
    assert geo.spacing == (1.0, 1.0, 1.0) and "assuming 1 mm" in geo.notes[0]


def test_scale_translate_of_axis_aligned_affine():
    affine = np.diag([0.8, 0.8, 3.0, 1.0])
    affine[:3, 3] = (-100.0, 20.0, 5.0)
    scale, translate = scale_translate(affine, (0.8, 0.8, 3.0))
    assert scale == (0.8, 0.8, 3.0)
    assert translate == (-100.0, 20.0, 5.0)


def test_reader_on_real_shared_case(shared_data):
    img = sorted((shared_data / "hippocampus" / "imagesTr").glob("*.nii.gz"))[0]
    [(data, kwargs, kind)] = read_volumes(str(img))
    ref = nib.load(str(img))
    order = kwargs["metadata"][META_KEY]["display"]["order"]
    assert kind == "image" and data.shape == tuple(ref.shape[i] for i in order)
    np.testing.assert_allclose(kwargs["scale"], [ref.header.get_zooms()[i] for i in order], rtol=1e-6)
    lab = shared_data / "hippocampus" / "labelsTr" / img.name
    [(ldata, lkwargs, lkind)] = read_volumes(str(lab))
    assert lkind == "labels" and ldata.shape == data.shape
    np.testing.assert_allclose(lkwargs["translate"], kwargs["translate"])


def test_manifest_validates():
    out = subprocess.run([sys.executable, "-m", "npe2", "validate", "napari-mambahome"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "valid" in out.stdout


def test_package_manifest_is_the_top_level_manifest():
    pkg = REPO / "napari_mambahome" / "napari.yaml"
    assert pkg.read_text() == (REPO / "napari.yaml").read_text()


def _oblique_anisotropic_copy(shared_data, tmp_path):
    """The real spinal cord T2 on an oblique (7 degrees about two axes), anisotropic, LPS-ordered grid."""
    src = nib.load(str(shared_data / "spinal_cord_mri" / "t2_image.nii.gz"))
    a, b = np.deg2rad(7.0), np.deg2rad(-4.0)
    rot_x = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    rot_y = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    affine = np.eye(4)
    affine[:3, :3] = rot_x @ rot_y @ np.diag([-0.7, -1.3, 2.4])  # runs left, posterior, superior
    affine[:3, 3] = (41.5, 22.25, -80.0)
    path = tmp_path / "t2_oblique.nii.gz"
    nib.save(nib.Nifti1Image(np.asanyarray(src.dataobj), affine), str(path))
    return path, nib.load(str(path)).affine


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".seg.nrrd", ".mha"])
def test_read_layer_write_labels_lands_on_the_exact_source_grid(shared_data, tmp_path, suffix):
    from engine.io import load_label, load_volume, save_volume

    nifti, affine = _oblique_anisotropic_copy(shared_data, tmp_path)
    source = nifti
    if suffix != ".nii.gz":  # the image itself in the other format (the file the user opened)
        source = save_volume(tmp_path / "t2_oblique.nrrd", load_volume(nifti).data, load_volume(nifti))
    [(data, kwargs, kind)] = read_volumes(str(source))
    file_shape = nib.load(str(nifti)).shape
    assert kind == "image" and data.shape != file_shape  # reoriented for display...
    assert sorted(data.shape) == sorted(file_shape)
    labels = np.zeros(data.shape, np.uint8)
    labels[3:9, 10:30, 5:20] = 1
    labels[10:12, 2:6, 30:33] = 2
    [written] = write_labels(str(tmp_path / f"cord_label{suffix}"), labels, _state(labels, kwargs))
    back = load_label(written)
    assert back.shape == file_shape  # ...and written back in the file's voxel order
    if suffix == ".mha":
        np.testing.assert_allclose(back.affine, load_volume(source).affine, rtol=0, atol=1e-12)
    else:
        np.testing.assert_array_equal(back.affine, load_volume(source).affine)
    np.testing.assert_allclose(back.affine, affine, atol=1e-5)
    display = kwargs["metadata"][META_KEY]["display"]
    np.testing.assert_array_equal(back.data, np.transpose(np.flip(labels, [a for a, f in enumerate(display["flip"])
                                                                           if f]), np.argsort(display["order"])))
    # and the label file opened again lies exactly on the image layer
    [(ldata, lkwargs, lkind)] = read_volumes(str(written))
    assert lkind == "labels"
    np.testing.assert_array_equal(ldata, labels)
    np.testing.assert_allclose(lkwargs["scale"], kwargs["scale"])
    np.testing.assert_allclose(lkwargs["translate"], kwargs["translate"], atol=1e-6)


def test_radiological_first_view_of_the_real_ct(shared_data):
    [(data, kwargs, _)] = read_volumes(str(shared_data / "abdomen_ct_mr" / "ct_image.nii.gz"))
    # RAS 122x101x30 file: 30 axial slices of 101 rows (anterior at the top) x 122 columns
    assert data.shape == (30, 101, 122)
    meta = kwargs["metadata"][META_KEY]
    assert meta["display"] == {"order": [2, 1, 0], "flip": [False, True, True]}
    ref = meta["volume"]
    np.testing.assert_array_equal(data[4, 0, 0], ref.data[121, 100, 4])  # row 0 = most anterior, col 0 = right
    assert kwargs["metadata"]["modality"] == "CT" and kwargs["metadata"]["modality_source"] == "guessed"
    assert kwargs["contrast_limits"] == (-160.0, 240.0)  # W400/L40 soft tissue


def test_mr_gets_no_modality_and_percentile_contrast(shared_data):
    [(data, kwargs, _)] = read_volumes(str(shared_data / "abdomen_ct_mr" / "mr_image.nii.gz"))
    assert kwargs["metadata"]["modality"] is None and kwargs["metadata"]["modality_source"] is None
    lo, hi = kwargs["contrast_limits"]
    np.testing.assert_allclose((lo, hi), np.percentile(data, [0.5, 99.5]))


@pytest.fixture
def npe2_plugins():
    """npe2's plugin manager with installed plugins discovered (napari does this when a viewer starts)."""
    import npe2

    pm = npe2.PluginManager.instance()
    pm.discover()
    return pm


def test_seg_nrrd_from_napari_keeps_names_and_colours_and_reopens_styled(tmp_volume, tmp_path, npe2_plugins):
    import slicerio
    from napari.layers import Labels
    from napari.plugins.io import save_layers

    img_path, _, affine = tmp_volume
    [(data, kwargs, _)] = read_volumes(str(img_path))
    labels = np.zeros(data.shape, np.uint8)
    labels[2:6, 3:9, 4:10] = 1
    labels[8:12, 10:15, 12:20] = 2
    meta = {**kwargs["metadata"][META_KEY], "class_names": ["background", "liver", "spleen"]}
    layer = Labels(labels, name="organs", scale=kwargs["scale"], translate=kwargs["translate"],
                   metadata={META_KEY: meta}, colormap={None: [0, 0, 0, 0], 1: [1, 0, 0, 1], 2: [0, 0.5, 1, 1]})
    [written] = save_layers(str(tmp_path / "organs.seg.nrrd"), [layer], plugin="napari-mambahome")
    seg = slicerio.read_segmentation(written)
    by_name = {s["name"]: s for s in seg["segments"]}
    assert set(by_name) == {"liver", "spleen"}
    np.testing.assert_allclose(by_name["spleen"]["color"], [0, 0.5, 1])
    np.testing.assert_allclose(seg["ijkToLPS"], np.diag([-1, -1, 1, 1]) @ affine)
    [(ldata, lkwargs, kind)] = read_volumes(written)
    assert kind == "labels"
    np.testing.assert_array_equal(ldata, labels)
    assert lkwargs["metadata"][META_KEY]["class_names"] == ["background", "liver", "spleen"]
    assert list(lkwargs["features"]["class"]) == ["background", "liver", "spleen"]
    np.testing.assert_allclose(lkwargs["colormap"][2], [0, 0.5, 1, 1])


def test_seg_nrrd_keeps_a_named_class_not_painted_yet(tmp_volume, tmp_path, npe2_plugins):
    """Only the painted values became segments: a class named but not painted yet was gone on reopening."""
    from napari.layers import Labels
    from napari.plugins.io import save_layers

    img_path, _, _ = tmp_volume
    [(data, kwargs, _)] = read_volumes(str(img_path))
    labels = np.zeros(data.shape, np.uint8)
    labels[2:6, 3:9, 4:10] = 1
    names = ["background", "anterior", "posterior", "gland"]
    layer = Labels(labels, name="hippo", scale=kwargs["scale"], translate=kwargs["translate"],
                   metadata={META_KEY: {**kwargs["metadata"][META_KEY], "class_names": names}})
    [written] = save_layers(str(tmp_path / "hippo.seg.nrrd"), [layer], plugin="napari-mambahome")
    [(ldata, lkwargs, kind)] = read_volumes(written)
    assert kind == "labels" and lkwargs["metadata"][META_KEY]["class_names"] == names
    np.testing.assert_array_equal(ldata, labels)


@pytest.mark.parametrize("ext", [".nrrd", ".mha", ".mgz", ".nii"])
def test_napari_save_dispatches_every_writer_extension(tmp_volume, tmp_path, ext, npe2_plugins):
    from napari.layers import Labels
    from napari.plugins.io import save_layers

    img_path, _, affine = tmp_volume
    [(data, kwargs, _)] = read_volumes(str(img_path))
    labels = (np.arange(data.size).reshape(data.shape) % 3).astype(np.uint8)
    layer = Labels(labels, **{k: kwargs[k] for k in ("name", "scale", "translate", "metadata")})
    [written] = save_layers(str(tmp_path / f"out{ext}"), [layer], plugin="napari-mambahome")
    from engine.io import load_label

    back = load_label(written)
    np.testing.assert_allclose(back.affine, affine, atol=1e-5)
    np.testing.assert_array_equal(back.data, np.transpose(labels, (1, 2, 0)))


def test_reader_opens_a_dicom_series_axially_with_its_modality(shared_data, tmp_path):
    sitk = pytest.importorskip("SimpleITK")
    from tests.test_formats import write_dicom_series

    src = shared_data / "abdomen_ct_mr" / "ct_image.nii.gz"
    series = write_dicom_series(sitk.ReadImage(str(src)), tmp_path / "abdomen_ct")
    assert get_reader(str(series)) is read_volumes
    [(data, kwargs, kind)] = read_volumes(str(series / "slice003.dcm"))
    assert kind == "image" and kwargs["name"] == "abdomen_ct"
    assert kwargs["metadata"]["modality"] == "CT" and kwargs["metadata"]["modality_source"] == "file"
    [(nifti_data, nifti_kwargs, _)] = read_volumes(str(src))
    # the same radiological view whatever the file's slice order
    np.testing.assert_array_equal(data, nifti_data)
    np.testing.assert_allclose(kwargs["scale"], nifti_kwargs["scale"], atol=1e-6)
    np.testing.assert_allclose(kwargs["translate"], nifti_kwargs["translate"], atol=1e-3)


def test_labels_saved_under_any_nifti_name_reopen_as_labels(shared_data, tmp_path, make_napari_viewer):
    """An annotator saves the corrected spinal cord labels as ``corrected.nii.gz`` (File > Save Selected Layers) and
    opens them again to go on correcting: they came back as an image layer, since only the file name
    (``*_label*``, ``*_seg*``...) told labels from images. The writer now marks the NIfTI header as a label map."""
    viewer = make_napari_viewer()
    [image] = viewer.open(str(shared_data / "spinal_cord_mri" / "t2_image.nii.gz"), plugin="napari-mambahome")
    [labels] = viewer.open(str(shared_data / "spinal_cord_mri" / "t2_label.nii.gz"), plugin="napari-mambahome")
    labels.data[0:2, 0:2, 0:2] = 1  # a correction
    from napari.plugins.io import save_layers

    [written] = save_layers(str(tmp_path / "corrected.nii.gz"), [labels], plugin="napari-mambahome")
    assert nib.load(written).header.get_intent()[0] == "label"
    np.testing.assert_array_equal(nib.load(written).affine,
                                  nib.load(str(shared_data / "spinal_cord_mri" / "t2_image.nii.gz")).affine)
    [again] = viewer.open(written, plugin="napari-mambahome")
    assert again._type_string == "labels"
    np.testing.assert_array_equal(np.asarray(again.data), np.asarray(labels.data))
    np.testing.assert_allclose(again.scale, image.scale)
    np.testing.assert_allclose(again.translate, image.translate)
    # an image is still an image
    [(_, _, kind)] = read_volumes(str(shared_data / "spinal_cord_mri" / "t2_image.nii.gz"))
    assert kind == "image"
