"""**Segment** leaves the user's segments their voxels: real MRML classes (``slicer-core``), a live server on the CPU
with the tests' tiny automatic model and the deterministic "echo" promptable model.

The defect: Segment kept the segments the user owns (a hand-drawn segment, an accepted prompted object, a renamed
automatic segment) and replaced only its own earlier result, but its new automatic segments were the server's classes
whole, so they overlapped the kept ones (an accepted 'lesion' inside the automatic 'liver'). The node saved as
``.seg.nrrd`` was then refused by the engine as a training case ("segments overlap"). The user's segments are
corrections and win, as Slicer's Segment Editor paints them over the others: the automatic segments leave out their
voxels, and the status line says how many."""
from __future__ import annotations

import numpy as np
import pytest

from slicer_support import file_volume_node, load_module, slicer, slicerio, tiny_mr_root  # noqa: F401 - skips first
import vtk  # noqa: E402

from engine.io import load_label  # noqa: E402
from server_support import echo_server  # noqa: E402

pytest.importorskip("engine.interactive")

TOKEN = "slicer-keeps-user-voxels"
TINY = "tiny-mr"


@pytest.fixture(scope="module")
def mod():
    return load_module()


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tiny_mr_root(tmp_path_factory.mktemp("keeps"), TINY)


@pytest.fixture()
def served(root, tmp_path):
    with echo_server(tmp_path, TOKEN, root / "models") as (url, app):
        yield url


def _affine(node) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return np.array([[m.GetElement(i, j) for j in range(4)] for i in range(4)])


def _ids(seg_node) -> dict:
    segmentation = seg_node.GetSegmentation()
    return {segmentation.GetNthSegment(n).GetName(): segmentation.GetNthSegmentID(n)
            for n in range(segmentation.GetNumberOfSegments())}


def _masks(mod, seg_node, shape, affine) -> dict:
    return {name: mod.segment_mask(seg_node, sid, shape, affine) for name, sid in _ids(seg_node).items()}


def _box_around(labels: np.ndarray, half: int = 3) -> np.ndarray:
    """A hand-drawn box centred on a foreground voxel of the result, reaching past the result's classes."""
    fg = np.argwhere(labels > 0)
    centre = fg[len(fg) // 2]
    box = np.zeros(labels.shape, dtype=bool)
    box[tuple(slice(max(int(c) - half, 0), int(c) + half + 1) for c in centre)] = True
    return box


def _setup(mod, url, root):
    scene = slicer.vtkMRMLScene()
    volume = file_volume_node(scene, root / "mr.nii.gz", "mr")
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "mr MambaHoME")
    logic = mod.MambaHoMELogic()
    logic.connect(url, TOKEN)
    logic.models()
    logic.select_model(TINY)
    return scene, volume, seg, logic


def _check_saved(mod, seg, path, masks: dict, shape, affine) -> None:
    """Saved by Slicer's storage node, the node reads back through the engine as one label map: each segment's voxels
    carry its value, every other voxel 0 (the engine refuses a file whose segments overlap)."""
    mod.MambaHoMELogic.save_segmentation_file(seg, str(path))
    label = load_label(path)
    assert label.data.shape == tuple(shape)
    assert np.allclose(label.affine, affine, atol=1e-4)
    by_name = {s["name"]: s["value"] for s in label.segments}
    assert len(set(by_name.values())) == len(by_name)
    want = np.zeros(tuple(shape), dtype=np.int64)
    for name, mask in masks.items():
        if mask.any():
            want[mask] = by_name[name]
    assert np.array_equal(label.data.astype(np.int64), want)
    assert {s["name"] for s in slicerio.read_segmentation(str(path))["segments"]} <= set(masks)


def test_segment_leaves_a_hand_drawn_segment_and_an_accepted_object_their_voxels(mod, served, root, tmp_path):
    scene, volume, seg, logic = _setup(mod, served, root)
    shape, affine = volume.GetImageData().GetDimensions(), _affine(volume)

    first = logic.segment(volume, seg)  # Segment into an empty node: the server's result as it is
    assert (first.labels > 0).any() and len(first.class_names) > 2
    for value, name in enumerate(first.class_names[1:], start=1):
        assert np.array_equal(mod.segment_mask(seg, _ids(seg)[name], shape, affine), first.labels == value), name

    # the user corrects it: draws 'lesion' by hand (a labelmap of its own, over the result's classes) ...
    drawn = _box_around(first.labels)
    own = slicer.vtkSegment()
    own.SetName("lesion")
    own.AddRepresentation(mod.LABELMAP, mod._oriented_mask(drawn, affine))
    seg.GetSegmentation().AddSegment(own, "lesion_by_hand")
    # ... and accepts a prompted object (renamed): it takes its voxels from the others (accept_segment)
    logic.set_prompt_model("echo")
    plus = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "plus")
    voxel = np.argwhere((first.labels > 0) & ~drawn)[0]
    plus.AddControlPointWorld(vtk.vtkVector3d(*(affine @ np.r_[voxel, 1.0])[:3]))
    logic.prompt_points(volume, seg, plus, None)
    obj = logic.mask.copy()
    assert obj.any()
    seg.GetSegmentation().GetSegment(_ids(seg)[mod.INTERACTIVE_SEGMENT]).SetName("nodule")
    before = _masks(mod, seg, shape, affine)
    assert np.array_equal(before["nodule"], obj) and np.array_equal(before["lesion"], drawn)

    status = logic.show_segmentation(seg, volume, first)  # Segment again (what the Widget runs on the GUI thread)

    users = drawn | obj
    result = first.labels
    assert ((result > 0) & drawn).any() and ((result > 0) & obj).any(), "the test needs the result over both"
    after = _masks(mod, seg, shape, affine)
    assert sorted(after) == sorted(["lesion", "nodule"] + list(first.class_names[1:]))
    # the user's segments are unchanged, voxel for voxel
    assert np.array_equal(after["lesion"], drawn) and np.array_equal(after["nodule"], obj)
    # the automatic segments are the server's result less the user's voxels
    for value, name in enumerate(first.class_names[1:], start=1):
        assert np.array_equal(after[name], (result == value) & ~users), name
    # no voxel is in two segments
    assert int(sum(m.astype(np.int64) for m in after.values()).max()) <= 1
    # the status line says how many voxels of the result were left to the user's segments
    left = int(((result > 0) & users).sum())
    assert "kept your other segments (lesion, nodule)" in status, status
    assert f"left {left} voxels of the result to your segments (lesion: {int(((result > 0) & drawn).sum())}, " \
           f"nodule: {int(((result > 0) & obj).sum())})" in status, status
    # the automatic segments stay Segment's: a third press replaces them and nothing else
    tag = vtk.mutable("")
    auto = seg.GetSegmentation().GetSegment(_ids(seg)[first.class_names[1]])
    assert auto.GetTag(mod.AUTOMATIC_TAG, tag) and str(tag) == first.class_names[1]
    assert sorted(mod.MambaHoMELogic.automatic_segment_ids(seg)) == sorted(
        _ids(seg)[n] for n in first.class_names[1:])

    _check_saved(mod, seg, tmp_path / "corrected.seg.nrrd", after, shape, affine)


def test_an_open_object_keeps_nothing_until_it_is_accepted(mod, served, root, tmp_path):
    """The open prompted object (its voxels still change with Undo and negative points) takes no voxels from the new
    automatic segments: Segment writes the result whole under it, and accepting the object then takes its voxels
    (as before this change), so the saved node is a valid label map again."""
    scene, volume, seg, logic = _setup(mod, served, root)
    shape, affine = volume.GetImageData().GetDimensions(), _affine(volume)
    logic.set_prompt_model("echo")
    plus = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "plus")
    plus.AddControlPointWorld(vtk.vtkVector3d(*(affine @ np.r_[16, 16, 12, 1.0])[:3]))
    logic.prompt_points(volume, seg, plus, None)
    obj = logic.mask.copy()

    result = logic.segment(volume, seg)
    assert ((result.labels > 0) & obj).any(), "the test needs the result over the object"
    masks = _masks(mod, seg, shape, affine)
    for value, name in enumerate(result.class_names[1:], start=1):
        assert np.array_equal(masks[name], result.labels == value), name
    assert np.array_equal(masks[mod.INTERACTIVE_SEGMENT], obj)

    seg.GetSegmentation().GetSegment(_ids(seg)[mod.INTERACTIVE_SEGMENT]).SetName("lesion")  # accepted
    masks = _masks(mod, seg, shape, affine)
    assert np.array_equal(masks["lesion"], obj)
    for value, name in enumerate(result.class_names[1:], start=1):
        assert np.array_equal(masks[name], (result.labels == value) & ~obj), name
    _check_saved(mod, seg, tmp_path / "accepted.seg.nrrd", masks, shape, affine)
