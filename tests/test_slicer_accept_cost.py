"""Accepting a prompted object (``MambaHoMELogic.accept_segment``: it takes its voxels from every other segment, as
Slicer's Segment Editor paints with *Overwrite all*) costs the object's box, not the volume times the segments; real
MRML classes (``slicer-core``), no server.

The defect: every other segment was read as a whole-volume mask, compared with the object and written back whole, on
the GUI thread (a rename in the Segment Editor, the end of an object): on a 512x512x400 CT with 100 automatic segments
one accept took over three minutes. Now only the object's box of each labelmap is read and changed, in place, the
segments sharing a labelmap at once, and a labelmap whose extent misses the box is not read at all. The voxels taken
and the counts reported are those of the whole-volume way (kept below as the reference), on a node with segments in one
shared labelmap, in labelmaps of their own (whole-volume and cropped, one whose extent meets the object's box but whose
voxels do not), in a second shared labelmap, on another grid (resampled, as before) and empty."""
from __future__ import annotations

import time
from typing import Dict

import numpy as np
import pytest

from slicer_support import load_module, slicer  # noqa: F401 - skips first
import vtk  # noqa: E402
from vtk.util import numpy_support  # noqa: E402

SHAPE = (40, 36, 30)
AFFINE = np.array([[-1.5, 0, 0, 10.0], [0, -1.25, 0, -4.0], [0, 0, 2.0, 7.0], [0, 0, 0, 1.0]])


@pytest.fixture(scope="module")
def mod():
    return load_module()


def _volume(scene, shape, affine):
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "ct")
    image = vtk.vtkImageData()
    image.SetDimensions(*shape)
    image.AllocateScalars(vtk.VTK_SHORT, 1)
    node.SetAndObserveImageData(image)
    m = vtk.vtkMatrix4x4()
    for i in range(4):
        for j in range(4):
            m.SetElement(i, j, float(affine[i, j]))
    node.SetIJKToRASMatrix(m)
    return node


def _image(values_ijk: np.ndarray, affine: np.ndarray, origin_ijk=(0, 0, 0)):
    """A labelmap holding ``values_ijk`` (uint8) whose first voxel is the grid voxel ``origin_ijk`` (a cropped extent,
    as Slicer keeps a segment's effective extent)."""
    img = slicer.vtkOrientedImageData()
    lo = [int(o) for o in origin_ijk]
    hi = [o + n - 1 for o, n in zip(lo, values_ijk.shape)]
    img.SetExtent(lo[0], hi[0], lo[1], hi[1], lo[2], hi[2])
    img.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    numpy_support.vtk_to_numpy(img.GetPointData().GetScalars())[:] = \
        np.ascontiguousarray(values_ijk.astype(np.uint8).transpose(2, 1, 0)).ravel()
    m = vtk.vtkMatrix4x4()
    for i in range(4):
        for j in range(4):
            m.SetElement(i, j, float(affine[i, j]))
    img.SetImageToWorldMatrix(m)
    return img


def _add(mod, seg, segment_id: str, image, label_value: int = 1) -> None:
    segment = slicer.vtkSegment()
    segment.SetName(segment_id.replace("_", " "))
    segment.SetLabelValue(label_value)
    segment.AddRepresentation(mod.LABELMAP, image)
    assert seg.GetSegmentation().AddSegment(segment, segment_id)


def _node(mod, object_shares_a_layer: bool = False):
    """``(segmentation node, the object's segment ID)``: the object (a 12x10x8 box with a corner cut off, written as the
    module writes an open object: a whole-volume labelmap of its own, or sharing a labelmap with 'shared mate') and
    segments of every kind around it."""
    scene = slicer.vtkMRMLScene()
    volume = _volume(scene, SHAPE, AFFINE)
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "ct MambaHoME")
    obj = np.zeros(SHAPE, dtype=bool)
    obj[14:26, 12:22, 10:18] = True
    obj[14:17, 12:15, 10:12] = False

    # the Segment result: one shared labelmap; liver and spleen under the object, kidney beside it (its layer's extent
    # is the whole volume), bladder far away
    labels = np.zeros(SHAPE, dtype=np.uint8)
    labels[5:18, 5:30, 5:25] = 1  # liver
    labels[20:35, 15:30, 12:28] = 2  # spleen
    labels[27:33, 2:10, 2:8] = 3  # kidney: not under the object
    labels[0:3, 0:3, 26:30] = 4  # bladder
    mod.MambaHoMELogic.set_segments(seg, volume, labels, ["background", "liver", "spleen", "kidney", "bladder"],
                                    [[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0]], model_id="auto")
    # hand-drawn, whole-volume labelmaps of their own: one under the object, one not
    drawn = np.zeros(SHAPE, dtype=bool)
    drawn[18:22, 10:14, 0:30] = True
    _add(mod, seg, "drawn_through", mod._oriented_mask(drawn, AFFINE))
    away = np.zeros(SHAPE, dtype=bool)
    away[30:38, 28:34, 22:28] = True
    _add(mod, seg, "drawn_away", mod._oriented_mask(away, AFFINE))
    # cropped extents: one inside the object's box whose voxels are only in the cut-off corner (extent meets, voxels
    # do not), one under the object, one whose extent misses the box
    corner = np.zeros((3, 3, 2), dtype=bool)
    corner[0:2, 0:2, :] = True
    _add(mod, seg, "in_the_corner", _image(corner, AFFINE, (14, 12, 10)))
    blob = np.ones((6, 5, 4), dtype=bool)
    _add(mod, seg, "cropped_under", _image(blob, AFFINE, (22, 19, 15)))
    _add(mod, seg, "cropped_far", _image(np.ones((3, 3, 3), dtype=bool), AFFINE, (1, 30, 1)))
    # a second shared labelmap (label values 1 and 2 in one image) of two user segments, one under the object
    pair = np.zeros(SHAPE, dtype=np.uint8)
    pair[10:16, 16:20, 13:16] = 1
    pair[36:40, 0:4, 0:4] = 2
    if object_shares_a_layer:
        pair[obj] = 3
    shared = mod._oriented_mask(pair, AFFINE)
    _add(mod, seg, "shared_under", shared, 1)
    _add(mod, seg, "shared_mate", shared, 2)
    # on a grid of twice the voxel size (resampled onto the volume, as before); one cell under the object
    coarse_affine = AFFINE.copy()
    coarse_affine[:3, :3] *= 2
    coarse = np.zeros((20, 18, 15), dtype=bool)
    coarse[11:13, 8:10, 6:8] = True
    _add(mod, seg, "coarse", _image(coarse, coarse_affine))
    _add(mod, seg, "coarse_far", _image(np.ones((2, 2, 2), dtype=bool), coarse_affine, (0, 0, 13)))
    _add(mod, seg, "empty", _image(np.zeros((2, 2, 2), dtype=bool), AFFINE, (0, 0, 0)))
    if object_shares_a_layer:
        _add(mod, seg, mod.INTERACTIVE_SEGMENT_ID, shared, 3)
    else:
        _add(mod, seg, mod.INTERACTIVE_SEGMENT_ID, mod._oriented_mask(obj, AFFINE))
    segment = seg.GetSegmentation().GetSegment(mod.INTERACTIVE_SEGMENT_ID)
    segment.SetName(mod.INTERACTIVE_SEGMENT)
    segment.SetTag(mod.OBJECT_TAG, "open")
    return seg, mod.INTERACTIVE_SEGMENT_ID, obj


def _whole_volume_accept(mod, seg, segment_id, shape, affine) -> Dict[str, int]:
    """The accept before: every other segment read, compared and rewritten as a whole-volume mask."""
    segmentation = seg.GetSegmentation()
    segmentation.GetSegment(segment_id).SetTag(mod.OBJECT_TAG, "accepted")
    mask = mod.segment_mask(seg, segment_id, shape, affine)
    taken: Dict[str, int] = {}
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    for other in [segmentation.GetNthSegmentID(n) for n in range(segmentation.GetNumberOfSegments())]:
        if other == segment_id:
            continue
        theirs = mod.segment_mask(seg, other, shape, affine)
        n = int((theirs & mask).sum())
        if not n:
            continue
        theirs &= ~mask
        assert logic.SetBinaryLabelmapToSegment(mod._oriented_mask(theirs, affine), seg, other, logic.MODE_REPLACE)
        taken[segmentation.GetSegment(other).GetName()] = n
    return taken


def _masks(mod, seg) -> Dict[str, np.ndarray]:
    """``{segment name: mask on the volume}`` (the names are unique here; the Segment result's IDs are random)."""
    segmentation = seg.GetSegmentation()
    return {segmentation.GetNthSegment(n).GetName(): mod.segment_mask(seg, segmentation.GetNthSegmentID(n), SHAPE,
                                                                       AFFINE)
            for n in range(segmentation.GetNumberOfSegments())}


@pytest.mark.parametrize("object_shares_a_layer", [False, True], ids=["object-alone", "object-in-a-shared-layer"])
def test_the_box_accept_takes_the_same_voxels_and_says_the_same_counts_as_the_whole_volume_accept(
        mod, object_shares_a_layer):
    fast, object_id, obj = _node(mod, object_shares_a_layer)
    slow, _, _ = _node(mod, object_shares_a_layer)
    name = mod.INTERACTIVE_SEGMENT
    before = _masks(mod, fast)
    assert np.array_equal(before[name], obj)
    seen = {other for other, m in before.items() if other != name and (m & obj).any()}
    needed = {"liver", "spleen", "drawn through", "cropped under", "coarse"} | (
        set() if object_shares_a_layer else {"shared under"})  # in one labelmap a voxel is one segment's
    assert needed <= seen, "the node needs those overlaps"
    assert not (before["in the corner"] & obj).any() and before["in the corner"].any()
    if not object_shares_a_layer:
        assert fast.GetSegmentation().GetNumberOfLayers() >= 4  # shared and separate labelmaps

    taken = mod.MambaHoMELogic.accept_segment(fast, object_id, SHAPE, AFFINE)
    reference = _whole_volume_accept(mod, slow, object_id, SHAPE, AFFINE)

    assert list(taken.items()) == list(reference.items())  # the same counts, named in the same order
    assert set(taken) == seen
    after, expected = _masks(mod, fast), _masks(mod, slow)
    assert sorted(after) == sorted(expected) == sorted(before)
    for other in after:
        assert np.array_equal(after[other], expected[other]), other
        if other != name:
            assert np.array_equal(after[other], before[other] & ~obj), other  # lost exactly the object's voxels
    assert np.array_equal(after[name], obj)
    tag = vtk.mutable("")
    assert fast.GetSegmentation().GetSegment(object_id).GetTag(mod.OBJECT_TAG, tag) and str(tag) == "accepted"


def test_the_accept_says_the_labelmaps_it_changed_and_nothing_else(mod):
    """Slicer redraws what changed: each changed labelmap is marked modified and each segment that lost voxels is
    named, as Slicer's own vtkSegmentationModifier names them."""
    seg, object_id, _ = _node(mod)
    segmentation = seg.GetSegmentation()
    ids = [segmentation.GetNthSegmentID(n) for n in range(segmentation.GetNumberOfSegments())]
    stamps = {sid: segmentation.GetSegment(sid).GetRepresentation(mod.LABELMAP).GetMTime() for sid in ids}
    named = []

    @vtk.calldata_type(vtk.VTK_STRING)
    def said(caller, event, segment_id=None):
        named.append(segment_id)

    segmentation.AddObserver(slicer.vtkSegmentation.RepresentationModified, said)
    taken = mod.MambaHoMELogic.accept_segment(seg, object_id, SHAPE, AFFINE)
    names = {segmentation.GetSegment(sid).GetName(): sid for sid in stamps}
    lost = {names[name] for name in taken}
    assert lost and lost <= set(named)
    for sid in lost:
        assert segmentation.GetSegment(sid).GetRepresentation(mod.LABELMAP).GetMTime() > stamps[sid], sid
    for name in ("drawn away", "cropped far", "in the corner", "empty", "coarse far"):  # labelmaps of their own
        sid = names[name]
        assert sid not in named, name
        assert segmentation.GetSegment(sid).GetRepresentation(mod.LABELMAP).GetMTime() == stamps[sid], name


def test_the_accept_reads_no_whole_volume_mask_and_leaves_far_labelmaps_unread(mod, monkeypatch):
    seg, object_id, obj = _node(mod)
    calls = []
    real = mod.segment_mask

    def counted(node, segment_id, *args):
        calls.append(node.GetSegmentation().GetSegment(segment_id).GetName())
        return real(node, segment_id, *args)

    monkeypatch.setattr(mod, "segment_mask", counted)
    mod.MambaHoMELogic.accept_segment(seg, object_id, SHAPE, AFFINE)
    assert calls == ["coarse"], "only a segment on another grid that reaches the object is resampled whole"


def test_voxels_of_a_segment_outside_the_volume_are_kept(mod):
    """A labelmap reaching beyond the volume (Slicer keeps what was drawn there) loses the object's voxels only:
    rewritten as a whole-volume mask it lost everything outside the volume too."""
    seg, object_id, obj = _node(mod)
    beyond = np.ones((8, 6, 6), dtype=bool)
    _add(mod, seg, "beyond", _image(beyond, AFFINE, (SHAPE[0] - 4, 15, 12)))  # half of it outside the volume
    before = mod.segment_mask(seg, "beyond", SHAPE, AFFINE)
    obj_beyond = np.zeros(SHAPE, dtype=bool)
    obj_beyond[SHAPE[0] - 4:, 15:21, 12:18] = True
    image = seg.GetSegmentation().GetSegment(object_id).GetRepresentation(mod.LABELMAP)
    view = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(SHAPE[::-1])
    view[12:18, 15:21, SHAPE[0] - 4:] = 1  # the object reaches the volume's edge there
    image.Modified()
    taken = mod.MambaHoMELogic.accept_segment(seg, object_id, SHAPE, AFFINE)
    assert taken["beyond"] == int((before & obj_beyond).sum()) > 0
    rep = seg.GetSegmentation().GetSegment("beyond").GetRepresentation(mod.LABELMAP)
    ext = rep.GetExtent()
    values = numpy_support.vtk_to_numpy(rep.GetPointData().GetScalars()).reshape(
        ext[5] - ext[4] + 1, ext[3] - ext[2] + 1, ext[1] - ext[0] + 1)
    assert ext[1] == SHAPE[0] + 3, "the labelmap was cut to the volume"
    outside = values[:, :, SHAPE[0] - ext[0]:]
    assert outside.size == 4 * 6 * 6 and outside.all(), "voxels outside the volume were lost"
    assert not mod.segment_mask(seg, "beyond", SHAPE, AFFINE)[SHAPE[0] - 4:, 15:21, 12:18].any()


def test_an_accept_on_a_large_node_stays_under_the_gui_budget(mod):
    """256x256x200 (13 M voxels), 100 automatic segments in one labelmap and the object: well under the GUI rule's
    100 ms (the whole-volume accept took seconds here)."""
    shape = (256, 256, 200)
    rng = np.random.default_rng(0)
    scene = slicer.vtkMRMLScene()
    volume = _volume(scene, shape, AFFINE)
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "big")
    labels = np.zeros(shape, dtype=np.uint8)
    for value in range(1, 101):
        c = rng.integers(10, np.array(shape) - 10) if value > 3 else np.array(shape) // 2 + rng.integers(-8, 9, 3)
        labels[c[0] - 6:c[0] + 6, c[1] - 6:c[1] + 6, c[2] - 4:c[2] + 4] = value
    mod.MambaHoMELogic.set_segments(seg, volume, labels, ["background"] + [f"organ {v}" for v in range(1, 101)],
                                    [[0, 0, 0]] + [[0.5, 0.5, 0.5]] * 100)
    obj = np.zeros(shape, dtype=bool)
    c = np.array(shape) // 2
    obj[c[0] - 12:c[0] + 12, c[1] - 12:c[1] + 12, c[2] - 8:c[2] + 8] = True
    _add(mod, seg, "object", mod._oriented_mask(obj, AFFINE))
    t0 = time.perf_counter()
    taken = mod.MambaHoMELogic.accept_segment(seg, "object", shape, AFFINE)
    seconds = time.perf_counter() - t0
    assert {"organ 1", "organ 2", "organ 3"} <= set(taken)
    assert seconds < 0.1, f"{seconds:.3f} s on the GUI thread"
