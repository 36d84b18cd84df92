"""The 3D Slicer module's Logic against real MRML classes (the ``slicer-core`` package) and a live server.

Slicer's ``arrayFromVolume`` order is ``(K, J, I)`` and its IJK-to-RAS matrix is the NIfTI affine; these
tests load a real NRRD (LPS, axes permuted) through a storage node, segment it on the server, and check
every grid on the way: the segmentation's, the ``.seg.nrrd`` read back by slicerio, and the saved case.
"""
from __future__ import annotations

import importlib.util
import py_compile
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
nib = pytest.importorskip("nibabel")
nrrd = pytest.importorskip("nrrd")
slicerio = pytest.importorskip("slicerio")
slicer = pytest.importorskip("slicer", reason="needs the slicer-core package (MRML classes)")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the installed 'slicer' package has no MRML classes", allow_module_level=True)
import vtk  # noqa: E402

from engine.server.config import ServerConfig  # noqa: E402
from server_support import running_server  # noqa: E402

MODULE_FILE = Path(__file__).resolve().parents[1] / "slicer" / "MambaHoME" / "MambaHoME.py"
UI_FILE = MODULE_FILE.parent / "Resources" / "UI" / "MambaHoME.ui"
TOKEN = "slicer-test-token"
LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def load_module():
    spec = importlib.util.spec_from_file_location("MambaHoME", MODULE_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def mod():
    return load_module()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("slicer-server")
    cfg = ServerConfig(token=TOKEN, models_dir=root / "models", cases_dir=root / "cases", device="cpu")
    with running_server(cfg) as (url, app):
        yield url, cfg, app


@pytest.fixture(scope="module")
def spine(shared_data, tmp_path_factory):
    """A real MRI (60x55x52, axes permuted against RAS) written as an LPS NRRD, as Slicer writes volumes."""
    src = shared_data / "spinal_cord_mri" / "t2_image.nii.gz"
    if not src.is_file():
        pytest.skip(f"{src} not present")
    img = nib.load(str(src))
    lps = LPS @ img.affine
    out = tmp_path_factory.mktemp("spine") / "t2.nrrd"
    nrrd.write(str(out), np.asarray(img.dataobj, dtype=np.int16),
               {"space": "left-posterior-superior", "space directions": lps[:3, :3].T, "space origin": lps[:3, 3],
                "kinds": ["domain"] * 3, "encoding": "gzip"})
    return out, img


def ijk_to_ras(node) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return np.array([[m.GetElement(i, j) for j in range(4)] for i in range(4)])


def load_volume_node(scene, path: Path):
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "t2")
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    assert storage.ReadData(node), f"could not read {path}"
    node.SetAndObserveStorageNodeID(storage.GetID())
    return node


def test_the_widget_compiles_and_its_ui_has_every_widget_it_uses(mod):
    py_compile.compile(str(MODULE_FILE), doraise=True)
    names = {w.get("name") for w in ET.parse(UI_FILE).iter("widget")}
    used = set(re.findall(r"self\.ui\.(\w+)", MODULE_FILE.read_text()))
    assert used and used <= names, f"missing in the .ui file: {sorted(used - names)}"
    assert not mod.HAVE_GUI  # outside Slicer only the Logic is there, and it imported without Qt
    assert (MODULE_FILE.parent / "Resources" / "Icons" / "MambaHoME.png").read_bytes()[:4] == b"\x89PNG"


def test_volume_geometry_puts_every_voxel_where_the_nifti_has_it(mod, spine):
    """Slicer's reader may re-index a left-handed grid (this one: K reversed); the world must not move."""
    path, img = spine
    scene = slicer.vtkMRMLScene()
    node = load_volume_node(scene, path)
    data, affine = mod.volume_geometry(node)
    np.testing.assert_allclose(affine, ijk_to_ras(node))
    assert data.dtype == np.int16 and sorted(data.shape) == sorted(img.shape)  # sent as stored: half of float32
    # nifti voxel -> Slicer voxel: a signed axis permutation plus a shift, nothing else.
    t = np.linalg.inv(affine) @ img.affine
    np.testing.assert_allclose(t, np.rint(t), atol=1e-4)
    idx = np.indices(img.shape).reshape(3, -1)
    mapped = np.rint(t[:3, :3] @ idx + t[:3, 3:4]).astype(int)
    np.testing.assert_array_equal(data[tuple(mapped)], np.asarray(img.dataobj)[tuple(idx)])


def test_segment_into_a_segmentation_node_on_the_volume_grid(mod, server, spine, tmp_path):
    url, cfg = server[:2]
    path, img = spine
    scene = slicer.vtkMRMLScene()
    volume = load_volume_node(scene, path)
    seg_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "spine seg")
    logic = mod.MambaHoMELogic()
    info = logic.connect(url, TOKEN)
    assert info["protocol"] == 1

    result = logic.segment(volume, seg_node, modality="MR")
    assert result.labels.shape == volume.GetImageData().GetDimensions()
    segmentation = seg_node.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == len(result.class_names) - 1
    for n in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(n)
        assert segment.GetName() == result.class_names[n + 1]
        assert np.allclose(segment.GetColor(), result.colors[n + 1])
        rep = segment.GetRepresentation(mod.LABELMAP)
        m = vtk.vtkMatrix4x4()
        rep.GetImageToWorldMatrix(m)
        np.testing.assert_allclose([[m.GetElement(i, j) for j in range(4)] for i in range(4)], ijk_to_ras(volume),
                                   atol=1e-6)
    labels, names = logic.labels_from_segmentation(seg_node, volume)
    assert names == result.class_names and np.array_equal(labels, result.labels)

    # The .seg.nrrd Slicer would write reads back with slicerio on the same grid and with the same voxels.
    out = tmp_path / "spine.seg.nrrd"
    logic.save_segmentation_file(seg_node, str(out))
    read = slicerio.read_segmentation(str(out))
    np.testing.assert_allclose(read["ijkToLPS"], LPS @ ijk_to_ras(volume), atol=1e-4)
    voxels = read["voxels"]
    assert voxels.shape == result.labels.shape
    by_name = {s["name"]: s["labelValue"] for s in read["segments"]}
    for value, name in enumerate(result.class_names[1:], start=1):
        assert np.array_equal(voxels == by_name[name], result.labels == value), name

    # Uploading again is skipped while the image is unchanged.
    assert logic.session_for(volume).session_id == logic.session_for(volume).session_id


def test_save_case_from_segments_keeps_the_geometry(mod, server, spine):
    url, cfg = server[:2]
    path, img = spine
    scene = slicer.vtkMRMLScene()
    volume = load_volume_node(scene, path)
    seg_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    labels = np.zeros(volume.GetImageData().GetDimensions(), dtype=np.uint8)
    labels[20:40, 10:30, 15:35] = 1
    labels[5:15, 30:50, 5:20] = 2
    mod.MambaHoMELogic.set_segments(seg_node, volume, labels, ["background", "cord", "csf"],
                                    [(0, 0, 0), (1, 0, 0), (0, 1, 0)])
    logic = mod.MambaHoMELogic()
    logic.connect(url, TOKEN)
    rec = logic.save_case(volume, seg_node, "MR", case_id="spine_t2")
    assert rec["class_names"] == ["background", "cord", "csf"] and rec["shape"] == list(labels.shape)
    case_label = nib.load(str(cfg.cases_dir / "spine_t2" / "label.nii.gz"))
    case_image = nib.load(str(cfg.cases_dir / "spine_t2" / "image.nii.gz"))
    np.testing.assert_allclose(case_label.affine, ijk_to_ras(volume), atol=1e-4)
    np.testing.assert_allclose(case_image.affine, ijk_to_ras(volume), atol=1e-4)
    np.testing.assert_array_equal(np.asarray(case_image.dataobj), mod.volume_geometry(volume)[0])
    assert np.array_equal(np.asarray(case_label.dataobj), labels)


def test_markups_points_become_voxels_once(mod, spine):
    path, img = spine
    scene = slicer.vtkMRMLScene()
    volume = load_volume_node(scene, path)
    points = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "plus")
    affine = ijk_to_ras(volume)
    voxel = np.array([30, 20, 25])
    ras = (affine @ np.r_[voxel, 1.0])[:3]
    points.AddControlPointWorld(vtk.vtkVector3d(*ras))
    points.AddControlPointWorld(vtk.vtkVector3d(1e4, 1e4, 1e4))  # outside the volume: dropped
    logic = mod.MambaHoMELogic()
    first = logic._new_points(points, affine, img.shape)
    assert first.tolist() == [voxel.tolist()]
    assert len(logic._new_points(points, affine, img.shape)) == 0  # already sent
    points.AddControlPointWorld(vtk.vtkVector3d(*(affine @ np.r_[voxel + 2, 1.0])[:3]))
    assert logic._new_points(points, affine, img.shape).tolist() == [(voxel + 2).tolist()]


def test_prompts_fill_the_interactive_segment(mod, server, spine):
    pytest.importorskip("engine.interactive")
    from server_support import echo_interactive_model

    url, _, app = server
    app.state.models.add_in_memory("echo", *echo_interactive_model())
    path, img = spine
    scene = slicer.vtkMRMLScene()
    volume = load_volume_node(scene, path)
    seg_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    points = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "plus")
    affine = ijk_to_ras(volume)
    voxel = np.array([30, 27, 26])
    points.AddControlPointWorld(vtk.vtkVector3d(*(affine @ np.r_[voxel, 1.0])[:3]))
    logic = mod.MambaHoMELogic()
    logic.connect(url, TOKEN)
    updates = logic.prompt_points(volume, seg_node, points, None)
    assert len(updates) == 1 and logic.mask[tuple(voxel)]
    seg_id = seg_node.GetSegmentation().GetSegmentIdBySegmentName(mod.INTERACTIVE_SEGMENT)
    mask = mod.segment_mask(seg_node, seg_id, logic.mask.shape, affine)
    assert np.array_equal(mask, logic.mask)
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode")
    roi.SetCenterWorld(*(affine @ np.r_[voxel, 1.0])[:3])
    roi.SetSizeWorld(10, 10, 10)
    logic.prompt_roi(volume, seg_node, roi)
    logic.undo(volume, seg_node)
    logic.reset(volume, seg_node)
    assert not logic.mask.any()
