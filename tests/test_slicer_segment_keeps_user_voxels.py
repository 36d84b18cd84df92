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


def test_segment_again_keeps_an_edited_result_and_writes_no_second_segment_of_a_users_class(mod, served, root,
                                                                                            tmp_path):
    """A reviewer's find: Segment again replaced an automatic segment the user had corrected with the Segment Editor
    (not renamed) by the model's, without a word; and beside a segment of the user's named as a class it wrote a
    second one of that name (the saved case then refused for repeated classes)."""
    scene, volume, seg, logic = _setup(mod, served, root)
    shape, affine = volume.GetImageData().GetDimensions(), _affine(volume)
    first = logic.segment(volume, seg)
    edited_name, other_name = first.class_names[1], first.class_names[2]
    corrected = (first.labels == 1) | _box_around(first.labels, half=2)
    editor = slicer.vtkSlicerSegmentationsModuleLogic
    assert editor.SetBinaryLabelmapToSegment(mod._oriented_mask(corrected, affine), seg, _ids(seg)[edited_name],
                                             editor.MODE_REPLACE)
    edited = mod.segment_mask(seg, _ids(seg)[edited_name], shape, affine)
    assert not np.array_equal(edited, first.labels == 1), "the test needs a real edit"
    assert _ids(seg)[edited_name] not in mod.MambaHoMELogic.automatic_segment_ids(seg)
    assert _ids(seg)[other_name] in mod.MambaHoMELogic.automatic_segment_ids(seg)  # untouched: still Segment's

    status = logic.show_segmentation(seg, volume, first)  # Segment again

    names = [seg.GetSegmentation().GetNthSegment(n).GetName()
             for n in range(seg.GetSegmentation().GetNumberOfSegments())]
    assert sorted(names) == sorted(first.class_names[1:]), names  # one segment per class, no repeat
    after = _masks(mod, seg, shape, affine)
    assert np.array_equal(after[edited_name], edited)  # the correction stands, voxel for voxel
    assert np.array_equal(after[other_name], (first.labels == 2) & ~edited)
    assert f"did not write the new {edited_name}" in status and "your segment of that class stay" in status, status
    _check_saved(mod, seg, tmp_path / "kept.seg.nrrd", after, shape, affine)

    # the user's own segment named as a class, in a fresh node: no second segment of that name either
    fresh = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "mine")
    own = slicer.vtkSegment()
    own.SetName(other_name)
    own.AddRepresentation(mod.LABELMAP, mod._oriented_mask(_box_around(first.labels), affine))
    fresh.GetSegmentation().AddSegment(own, "by_hand")
    status = logic.show_segmentation(fresh, volume, first)
    names = [fresh.GetSegmentation().GetNthSegment(n).GetName()
             for n in range(fresh.GetSegmentation().GetNumberOfSegments())]
    assert sorted(names) == sorted(first.class_names[1:]) and names.count(other_name) == 1, names
    assert f"did not write the new {other_name}" in status, status


def test_an_open_object_is_kept_as_drawn_when_its_volume_is_uploaded_again(mod, served, root):
    """A reviewer's find: Segment with another modality (or a restarted server, or changed voxels) uploads the volume
    again, and the next click replaced the open object, its box and the user's painting by a new one made of the old
    clicks alone, without a word. It now ends and is kept as drawn, as on a switch of model or volume."""
    scene, volume, seg, logic = _setup(mod, served, root)
    shape, affine = volume.GetImageData().GetDimensions(), _affine(volume)
    logic.set_prompt_model("echo", segmentation_node=seg)
    plus = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "plus")
    plus.AddControlPointWorld(vtk.vtkVector3d(*(affine @ np.r_[16, 16, 12, 1.0])[:3]))
    logic.prompt_points(volume, seg, plus, None)
    open_id = logic.open_segment_id(seg)
    painted = mod.segment_mask(seg, open_id, shape, affine)
    painted[2:6, 2:6, 2:6] = True  # the user's painting into the open object
    editor = slicer.vtkSlicerSegmentationsModuleLogic
    assert editor.SetBinaryLabelmapToSegment(mod._oriented_mask(painted, affine), seg, open_id, editor.MODE_REPLACE)

    logic.segment(volume, seg, modality="CT")  # another modality than the prompts' upload: uploaded again
    plus.AddControlPointWorld(vtk.vtkVector3d(*(affine @ np.r_[25, 25, 18, 1.0])[:3]))
    logic.prompt_points(volume, seg, plus, None)

    masks = _masks(mod, seg, shape, affine)
    kept = [name for name in masks if name.startswith(mod.INTERACTIVE_SEGMENT + " (")]
    assert len(kept) == 1, sorted(masks)
    assert np.array_equal(masks[kept[0]], painted)  # as drawn: the click's object and the painting
    now = masks[mod.INTERACTIVE_SEGMENT]
    assert now[25, 25, 18] and not (now & painted).any()  # the new object: the new click only


def test_saved_cases_number_classes_by_name_not_by_segment_order(mod, served, root):
    """A reviewer's find: a case numbered its classes by the segments' order in the node, so a user's segment drawn
    before Segment, or a wrong class deleted, made a label set the server refused against the earlier cases
    ("disagree with case ...") although every name matched."""
    scene, volume, seg, logic = _setup(mod, served, root)
    shape, affine = volume.GetImageData().GetDimensions(), _affine(volume)
    first = logic.segment(volume, seg)
    classes = list(first.class_names)
    assert len(classes) >= 4, "the test needs three classes"
    saved = logic.save_case(volume, seg, "MR", case_id="a")
    assert saved

    # the user's own segment first, then Segment: its class comes after the model's
    mine = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "mine")
    drawn = _box_around(first.labels, half=1)
    own = slicer.vtkSegment()
    own.SetName("lesion")
    own.AddRepresentation(mod.LABELMAP, mod._oriented_mask(drawn, affine))
    mine.GetSegmentation().AddSegment(own, "lesion_by_hand")
    logic.show_segmentation(mine, volume, first)
    labels, names = logic.labels_from_segmentation(mine, volume, logic.class_names)
    assert names == classes + ["lesion"]
    assert np.array_equal(labels == len(classes), drawn)
    for value in range(1, len(classes)):
        assert np.array_equal(labels == value, (first.labels == value) & ~drawn)
    assert logic.save_case(volume, mine, "MR", case_id="b")  # accepted: the same label set, one class more

    # a wrong class deleted: it stays in the label set, empty, and the case is accepted
    gone = classes[2]
    seg.GetSegmentation().RemoveSegment(_ids(seg)[gone])
    labels, names = logic.labels_from_segmentation(seg, volume, logic.class_names)
    assert names[:len(classes)] == classes and not (labels == 2).any()
    assert logic.save_case(volume, seg, "MR", case_id="c")


def test_an_edit_that_erases_as_many_voxels_as_it_paints_is_still_the_users(mod, served, root):
    # a reviewer's find: the edit detection compared voxel counts only, so erasing one block of a result and painting
    # one of the same size elsewhere counted as unedited, and Segment again put the model's voxels back over it
    scene, volume, seg, logic = _setup(mod, served, root)
    shape, affine = volume.GetImageData().GetDimensions(), _affine(volume)
    first = logic.segment(volume, seg)
    name = first.class_names[1]
    mine = first.labels == 1
    inside = np.argwhere(mine)
    erased = tuple(int(v) for v in inside[0])
    outside = np.argwhere(first.labels == 0)
    painted = tuple(int(v) for v in outside[len(outside) // 2])
    corrected = mine.copy()
    corrected[erased] = False
    corrected[painted] = True
    assert corrected.sum() == mine.sum() and not np.array_equal(corrected, mine)
    editor = slicer.vtkSlicerSegmentationsModuleLogic
    assert editor.SetBinaryLabelmapToSegment(mod._oriented_mask(corrected, affine), seg, _ids(seg)[name],
                                             editor.MODE_REPLACE)
    assert _ids(seg)[name] not in mod.MambaHoMELogic.automatic_segment_ids(seg)
    logic.show_segmentation(seg, volume, first)  # Segment again
    after = mod.segment_mask(seg, _ids(seg)[name], shape, affine)
    assert after[painted] and not after[erased]
    np.testing.assert_array_equal(after, corrected)
