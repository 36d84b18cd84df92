"""An accepted prompted object takes its voxels from the node's other segments, as 3D Slicer's Segment Editor paints
with its default *Overwrite: all segments*; real MRML classes (``slicer-core``), a live server on the CPU with the
deterministic "echo" promptable model.

The defect: after **Segment**, a prompted object accepted into the node (renamed by the user, or kept when the object
ended) overlapped the automatic segments; the node saved as ``.seg.nrrd`` (Slicer writes overlapping segments as
layers) was refused by the engine as a training case ("segments overlap")."""
from __future__ import annotations

import numpy as np
import pytest

from slicer_support import int16_volume_node, load_module, slicer, slicerio  # noqa: F401 - skips first
import vtk  # noqa: E402

from engine.io import VolumeError  # noqa: E402
from engine.io import load_label  # noqa: E402,F811
from server_support import echo_server  # noqa: E402

pytest.importorskip("engine.interactive")

TOKEN = "slicer-accept"
SHAPE = (24, 20, 16)
AFFINE = np.array([[-1.5, 0, 0, 10.0], [0, -1.25, 0, -4.0], [0, 0, 2.0, 7.0], [0, 0, 0, 1.0]])


@pytest.fixture(scope="module")
def mod():
    return load_module()


@pytest.fixture()
def served(tmp_path):
    with echo_server(tmp_path, TOKEN) as (url, _):
        yield url


def _automatic_labels() -> np.ndarray:
    """What Segment writes: two classes side by side, meeting where the object will be clicked."""
    labels = np.zeros(SHAPE, dtype=np.uint8)
    labels[2:12, 3:17, 3:13] = 1
    labels[12:22, 3:17, 3:13] = 2
    return labels


def _ids(seg_node) -> dict:
    segmentation = seg_node.GetSegmentation()
    return {segmentation.GetNthSegment(n).GetName(): segmentation.GetNthSegmentID(n)
            for n in range(segmentation.GetNumberOfSegments())}


def _masks(mod, seg_node) -> dict:
    return {name: mod.segment_mask(seg_node, sid, SHAPE, AFFINE) for name, sid in _ids(seg_node).items()}


def _click(points, voxel) -> None:
    points.AddControlPointWorld(vtk.vtkVector3d(*(AFFINE @ np.r_[voxel, 1.0])[:3]))


def _scene(mod, url):
    """A volume, a node holding a Segment result (two classes, one shared labelmap) and a hand-drawn segment in a
    labelmap of its own, and a logic connected to the server with the echo model chosen."""
    scene = slicer.vtkMRMLScene()
    rng = np.random.default_rng(0)
    volume = int16_volume_node(scene, rng.integers(0, 100, SHAPE), AFFINE, "ct")
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "ct MambaHoME")
    drawn = np.zeros(SHAPE, dtype=bool)
    drawn[9:15, 8:12, 0:9] = True  # meets both classes and the object
    labels = _automatic_labels()
    labels[drawn] = 0  # painted in the Segment Editor (Overwrite all): the automatic segments lost those voxels
    mod.MambaHoMELogic.set_segments(seg, volume, labels, ["background", "liver", "spleen"],
                                    [[0, 0, 0], [1, 0, 0], [0, 1, 0]], model_id="auto")
    own = slicer.vtkSegment()
    own.SetName("drawn")
    own.AddRepresentation(mod.LABELMAP, mod._oriented_mask(drawn, AFFINE))
    seg.GetSegmentation().AddSegment(own, "drawn_by_hand")
    logic = mod.MambaHoMELogic()
    logic.connect(url, TOKEN)
    logic.set_prompt_model("echo")
    plus = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "plus")
    return scene, volume, seg, logic, plus


def _check_taken(before: dict, after: dict, obj_name: str, obj: np.ndarray) -> None:
    """The object's voxels are its own; every other segment lost exactly those voxels, nothing else."""
    assert np.array_equal(after[obj_name], obj)
    for name, mask in before.items():
        assert np.array_equal(after[name], mask & ~obj), name
        assert (mask & obj).any() or name == "drawn", f"{name}: the test needs an overlap to take"
    for name, mask in after.items():
        if name != obj_name:
            assert not (mask & obj).any(), name


def _check_saved(mod, seg, tmp_path, expected: dict) -> None:
    """Saved by Slicer's storage node, the file reads back in the engine as one label map: each segment's voxels
    carry that segment's value, every other voxel is 0."""
    path = tmp_path / "accepted.seg.nrrd"
    mod.MambaHoMELogic.save_segmentation_file(seg, str(path))
    label = load_label(path)
    assert label.data.shape == SHAPE
    assert np.allclose(label.affine, AFFINE, atol=1e-4)
    by_name = {s["name"]: s["value"] for s in label.segments}
    assert sorted(by_name) == sorted(expected)
    want = np.zeros(SHAPE, dtype=np.int64)
    for name, mask in expected.items():
        want[mask] = by_name[name]
    assert np.array_equal(label.data.astype(np.int64), want)
    assert len(set(by_name.values())) == len(by_name)
    read = slicerio.read_segmentation(str(path))  # slicerio reads the same file (3D Slicer's own reader's layout)
    assert {s["name"] for s in read["segments"]} == set(expected)


def test_renamed_object_takes_its_voxels_and_saves_as_a_valid_label_map(mod, served, tmp_path):
    scene, volume, seg, logic, plus = _scene(mod, served)
    before = _masks(mod, seg)
    _click(plus, (12, 10, 5))
    logic.prompt_points(volume, seg, plus, None)
    obj = logic.mask.copy()
    assert obj.any()
    # while the object is open (prompts still change it) nothing is taken: Undo and negative points must give back
    assert all(np.array_equal(_masks(mod, seg)[n], m) for n, m in before.items())

    seg.GetSegmentation().GetSegment(_ids(seg)[mod.INTERACTIVE_SEGMENT]).SetName("lesion")  # the user accepts it

    after = _masks(mod, seg)
    _check_taken(before, after, "lesion", obj)
    tag = vtk.mutable("")
    assert seg.GetSegmentation().GetSegment(_ids(seg)["lesion"]).GetTag(mod.OBJECT_TAG, tag) and str(tag) == "accepted"
    _check_saved(mod, seg, tmp_path, after)

    # the next click starts a new object: the accepted one is not written again, nor overwritten
    _click(plus, (4, 5, 10))
    logic.prompt_points(volume, seg, plus, None)
    masks = _masks(mod, seg)
    assert np.array_equal(masks["lesion"], obj)
    assert not (masks[mod.INTERACTIVE_SEGMENT] & obj).any()


def test_object_ended_by_a_switch_of_model_is_accepted(mod, served, tmp_path):
    scene, volume, seg, logic, plus = _scene(mod, served)
    before = _masks(mod, seg)
    _click(plus, (11, 9, 6))
    logic.prompt_points(volume, seg, plus, None)
    obj = logic.mask.copy()
    kept = logic.set_prompt_model(None, segmentation_node=seg)  # ends the object: its segment is kept, renamed
    assert kept
    name = seg.GetSegmentation().GetSegment(kept).GetName()
    assert name.startswith(f"{mod.INTERACTIVE_SEGMENT} (")
    after = _masks(mod, seg)
    _check_taken(before, after, name, obj)
    _check_saved(mod, seg, tmp_path, after)


def test_an_open_object_saved_mid_prompt_is_refused_saying_what_to_do(mod, served, tmp_path):
    """A node saved while the object is still open overlaps: the engine refuses it (a label map holds one label per
    voxel) and tells a Slicer user how to resolve it."""
    scene, volume, seg, logic, plus = _scene(mod, served)
    _click(plus, (12, 10, 5))
    logic.prompt_points(volume, seg, plus, None)
    path = tmp_path / "open.seg.nrrd"
    mod.MambaHoMELogic.save_segmentation_file(seg, str(path))
    with pytest.raises(VolumeError) as err:
        load_label(path)
    message = str(err.value)
    assert str(path) in message and "segments overlap" in message
    assert mod.INTERACTIVE_SEGMENT in message
    assert "Overwrite" in message and "rename" in message.lower(), message
