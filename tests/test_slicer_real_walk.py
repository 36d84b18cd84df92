"""The 3D Slicer module walked as a user walks it, on real volumes: Slicer's own storage node reads them (so the
IJK-to-RAS is Slicer's, an LPS ``.nrrd`` written by SimpleITK included), a live server on the CPU answers, and what
Slicer saves (``.seg.nrrd`` through its storage node) is read back with slicerio and with the engine, voxel for
voxel. Real MRML classes (``slicer-core``), the real spinal T2."""
from __future__ import annotations


import numpy as np
import pytest

from slicer_support import file_volume_node, load_module, slicer, slicerio  # noqa: F401 - skips first
import vtk  # noqa: E402

from server_support import cpu_server  # noqa: E402

TOKEN = "slicer-real-walk"
LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _ijk_to_ras(node) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return np.array([[m.GetElement(i, j) for j in range(4)] for i in range(4)])


def _click(points, affine, voxel) -> None:
    points.AddControlPointWorld(vtk.vtkVector3d(*(affine @ np.r_[voxel, 1.0])[:3]))


def _only(shape, offsets, *voxels) -> np.ndarray:
    """The echo model's object of clicks at ``voxels``: its click's shape (``offsets`` around the voxel) at each."""
    mask = np.zeros(shape, dtype=bool)
    for v in voxels:
        at = offsets + np.asarray(v)
        mask[tuple(at[np.all((at >= 0) & (at < np.asarray(shape)), axis=1)].T)] = True
    return mask


@pytest.fixture(scope="module")
def t2(shared_data, tmp_path_factory):
    """The real spinal T2 (NIfTI), and a crop of it written by SimpleITK as an LPS ``.nrrd`` (what Slicer's Crop
    Volume makes: the same voxels, an IJK-to-RAS with another origin)."""
    sitk = pytest.importorskip("SimpleITK")
    src = shared_data / "spinal_cord_mri" / "t2_image.nii.gz"
    if not src.is_file():
        pytest.skip(f"{src} not present")
    cropped = tmp_path_factory.mktemp("walk") / "t2_cropped.nrrd"
    sitk.WriteImage(sitk.ReadImage(str(src))[4:-6, 3:-5, 2:-4], str(cropped))
    return src, cropped


def test_a_second_volume_mid_object_keeps_each_object_on_its_own_grid(t2, tmp_path):
    """Prompting a second volume (here Slicer's crop of the first) while an object is open, then going back: each
    volume's clicks go to its own object, and each object's segment stays where the server put it.

    Before, the second volume's first Send sent every point of the list again (the first volume's clicks, inside the
    crop, became part of its object), its answer replaced the first volume's segment, and back on the first volume the
    answers were patched into the second volume's mask (another shape) and drawn on the first volume's grid."""
    pytest.importorskip("engine.interactive")
    from engine.io import load_label, load_volume
    from server_support import echo_interactive_model

    mod = load_module()
    src, cropped = t2
    with cpu_server(tmp_path / "server", TOKEN) as (url, app):
        # the echo model's object is exactly the positive clicks: every expected mask is known voxel for voxel
        app.state.models.add_in_memory("echo", *echo_interactive_model())
        scene = slicer.vtkMRMLScene()
        whole, crop = file_volume_node(scene, src, "t2"), file_volume_node(scene, cropped, "t2 cropped")
        a_whole, a_crop = _ijk_to_ras(whole), _ijk_to_ras(crop)
        shape_whole, shape_crop = whole.GetImageData().GetDimensions(), crop.GetImageData().GetDimensions()
        seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "t2 MambaHoME")
        plus = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "plus")
        logic = mod.MambaHoMELogic()
        logic.connect(url, TOKEN)
        logic.set_prompt_model("echo")

        first = [np.array([30, 27, 26]), np.array([30, 29, 26])]
        _click(plus, a_whole, first[0])
        logic.prompt_points(whole, seg, plus, None)
        # one click's shape, as the server encodes it on this grid (the crop has the same spacing and axes)
        offsets = np.argwhere(logic.mask) - first[0]
        assert logic.mask[tuple(first[0])] and np.abs(offsets).max() <= 5
        _click(plus, a_whole, first[1])
        logic.prompt_points(whole, seg, plus, None)
        assert np.array_equal(logic.mask, _only(shape_whole, offsets, *first))
        inside_crop = np.rint(np.linalg.inv(a_crop) @ a_whole @ np.r_[first[0], 1.0])[:3].astype(int)
        assert np.all((inside_crop >= 0) & (inside_crop < shape_crop))  # resent, they would land in the crop

        on_crop = np.array([12, 30, 20])
        _click(plus, a_crop, on_crop)
        (update,) = logic.prompt_points(crop, seg, plus, None)  # one answer: the one new click only
        assert np.array_equal(logic.mask, _only(shape_crop, offsets, on_crop))

        back = np.array([22, 20, 30])
        _click(plus, a_whole, back)
        (update,) = logic.prompt_points(whole, seg, plus, None)
        assert logic.mask.shape == shape_whole and np.array_equal(logic.mask, _only(shape_whole, offsets, back))
        server = np.zeros(shape_whole, dtype=bool)
        logic.client.object_mask(logic.session_for(whole).session_id).apply(server)
        assert np.array_equal(server, logic.mask)  # what Undo and the next click work on is what is drawn

        segmentation = seg.GetSegmentation()
        ids = {segmentation.GetNthSegment(n).GetName(): segmentation.GetNthSegmentID(n)
               for n in range(segmentation.GetNumberOfSegments())}
        kept = f"{mod.INTERACTIVE_SEGMENT} (echo)"
        assert set(ids) == {kept, f"{kept} 2", mod.INTERACTIVE_SEGMENT}
        expected_world = {kept: _only(shape_whole, offsets, *first), mod.INTERACTIVE_SEGMENT: _only(shape_whole, offsets, back),
                          f"{kept} 2": _only(shape_whole, offsets, np.rint(
                              np.linalg.inv(a_whole) @ a_crop @ np.r_[on_crop, 1.0])[:3].astype(int))}
        for name, expected in expected_world.items():
            assert np.array_equal(mod.segment_mask(seg, ids[name], shape_whole, a_whole), expected), name

        # The user names and colours the objects, and saves through Slicer's storage node.
        colours = {"cord": (0.1, 0.3, 0.9), "cord on the crop": (0.2, 0.8, 0.2), "canal": (0.9, 0.1, 0.1)}
        for old, new in ((kept, "cord"), (f"{kept} 2", "cord on the crop"), (mod.INTERACTIVE_SEGMENT, "canal")):
            segmentation.GetSegment(ids[old]).SetName(new)
            segmentation.GetSegment(ids[old]).SetColor(*colours[new])
            expected_world[new] = expected_world.pop(old)
        out = tmp_path / "t2.seg.nrrd"
        logic.save_segmentation_file(seg, str(out))

        read = slicerio.read_segmentation(str(out))
        np.testing.assert_allclose(read["ijkToLPS"], LPS @ a_whole, atol=1e-4)  # the first volume's grid
        voxels = read["voxels"]
        for segment in read["segments"]:
            layer = voxels[segment["layer"]] if voxels.ndim == 4 else voxels
            assert np.array_equal(layer == segment["labelValue"], expected_world[segment["name"]]), segment["name"]
            np.testing.assert_allclose(segment["color"], colours[segment["name"]], atol=1e-3)
        assert {s["name"] for s in read["segments"]} == set(colours)

        engine = load_volume(out)  # the engine reads it on the same grid...
        np.testing.assert_allclose(engine.affine, a_whole, atol=1e-4)
        label = load_label(out)  # ...and as a label map, with the segments' names and colours
        np.testing.assert_allclose(label.affine, a_whole, atol=1e-4)
        assert np.array_equal(label.data, engine.data)
        by_name = {s["name"]: s for s in label.segments}
        assert set(by_name) == set(colours)
        for name, expected in expected_world.items():
            assert np.array_equal(label.data == by_name[name]["value"], expected), name
            np.testing.assert_allclose(by_name[name]["color"], colours[name], atol=1e-3)


def test_a_refused_upload_of_another_volume_leaves_the_open_object_alone(t2, tmp_path):
    """Prompting a volume the server refuses (here: more voxels than its limit) while an object is open on another:
    the open object stays open, so the next click on its own volume refines it (it used to be ended before the
    upload was tried: the next click started a new object and the first one's Undo was gone)."""
    pytest.importorskip("engine.interactive")
    from server_support import echo_interactive_model

    mod = load_module()
    src, cropped = t2
    scene = slicer.vtkMRMLScene()
    crop, whole = file_volume_node(scene, cropped, "t2 cropped"), file_volume_node(scene, src, "t2")
    limit = int(np.prod(crop.GetImageData().GetDimensions()))  # the crop fits, the whole volume does not
    with cpu_server(tmp_path / "server", TOKEN, max_voxels=limit) as (url, app):
        app.state.models.add_in_memory("echo", *echo_interactive_model())
        a_crop, a_whole = _ijk_to_ras(crop), _ijk_to_ras(whole)
        seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "t2 MambaHoME")
        on_crop, on_whole = (scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", n) for n in ("crop", "whole"))
        logic = mod.MambaHoMELogic()
        logic.connect(url, TOKEN)
        logic.set_prompt_model("echo")
        first = np.array([12, 30, 20])
        _click(on_crop, a_crop, first)
        logic.prompt_points(crop, seg, on_crop, None)
        drawn = logic.mask.copy()

        _click(on_whole, a_whole, np.array([30, 27, 26]))
        with pytest.raises(Exception, match="voxels"):
            logic.prompt_points(whole, seg, on_whole, None)

        second = np.array([12, 34, 20])
        _click(on_crop, a_crop, second)
        logic.prompt_points(crop, seg, on_crop, None)
        assert logic.mask[tuple(first)] and logic.mask[tuple(second)] and (logic.mask >= drawn).all()  # one object
        segmentation = seg.GetSegmentation()
        names = [segmentation.GetNthSegment(n).GetName() for n in range(segmentation.GetNumberOfSegments())]
        assert names == [mod.INTERACTIVE_SEGMENT]  # nothing was ended and renamed
        logic.undo(crop, seg)  # the object's own history: back to the first click
        assert np.array_equal(logic.mask, drawn)
