"""Removing segments that share a labelmap (``MambaHoMELogic.remove_segments``: a second **Segment** replacing the
automatic segments of the first) reads each shared labelmap once; real MRML classes (``slicer-core``), no server.

The defect: ``write_segments`` removed the automatic segments one by one with Slicer's
``vtkSegmentation.RemoveSegment``, which first separates a segment from its shared labelmap with two passes of VTK's
threshold over the whole layer: 1.9 s for the 100 segments of one result on 256x256x200, 24 s on 512x512x400, on the GUI
thread. The node left behind is that of the one by one removal (kept below as the reference): the kept segments, their
order, label values, labelmaps (shared as before, each voxel's value) and masks."""
from __future__ import annotations

import time
from typing import Dict, List

import numpy as np
import pytest

from slicer_support import int16_volume_node, unfilled_volume_node, load_module, slicer  # noqa: F401 - skips first
import vtk  # noqa: E402
from vtk.util import numpy_support  # noqa: E402

SHAPE = (30, 26, 20)
AFFINE = np.array([[0, -1.2, 0, 30.0], [0.9, 0, 0, -10.0], [0, 0, 2.5, 4.0], [0, 0, 0, 1.0]])  # axes swapped


@pytest.fixture(scope="module")
def mod():
    return load_module()


def _labels(shape, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, dtype=np.uint8)
    for value in range(1, n + 1):
        c = rng.integers(3, np.array(shape) - 3)
        r = rng.integers(2, 6, 3)
        lo = np.maximum(c - r, 0)
        labels[lo[0]:c[0] + r[0], lo[1]:c[1] + r[1], lo[2]:c[2] + r[2]] = value
    return labels


def _add(mod, seg, segment_id: str, image, label_value: int = 1) -> None:
    segment = slicer.vtkSegment()
    segment.SetName(segment_id.replace("_", " "))
    segment.SetLabelValue(label_value)
    segment.AddRepresentation(mod.LABELMAP, image)
    assert seg.GetSegmentation().AddSegment(segment, segment_id)


def _node(mod):
    """A Segment result (6 classes, one shared labelmap) joined there by a segment the user drew (Slicer's Segment
    Editor adds a new segment to the first segment's labelmap), a second shared labelmap of two segments, segments in
    labelmaps of their own."""
    scene = slicer.vtkMRMLScene()
    volume = int16_volume_node(scene, np.zeros(SHAPE), AFFINE, "ct")
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "ct MambaHoME")
    labels = _labels(SHAPE, 6, 0)
    names = ["background"] + [f"organ {v}" for v in range(1, 7)]
    mod.MambaHoMELogic.set_segments(seg, volume, labels, names, [[0, 0, 0]] + [[0.5, 0.5, 0.5]] * 6, model_id="auto")
    segmentation = seg.GetSegmentation()
    shared = segmentation.GetNthSegment(0).GetRepresentation(mod.LABELMAP)
    view = numpy_support.vtk_to_numpy(shared.GetPointData().GetScalars()).reshape(SHAPE[::-1])
    view[0:3, 0:4, 0:5] = 7  # the user's segment, painted into the shared labelmap
    _add(mod, seg, "drawn_in_the_layer", shared, 7)
    pair = np.zeros(SHAPE, dtype=np.uint8)
    pair[2:8, 2:8, 2:8] = 1
    pair[10:14, 10:20, 5:9] = 2
    other = mod._oriented_mask(pair, AFFINE)
    _add(mod, seg, "pair_one", other, 1)
    _add(mod, seg, "pair_two", other, 2)
    alone = np.zeros(SHAPE, dtype=bool)
    alone[20:28, 3:9, 10:18] = True
    _add(mod, seg, "alone", mod._oriented_mask(alone, AFFINE))
    _add(mod, seg, "alone_too", mod._oriented_mask(~alone, AFFINE))
    return volume, seg


def _ids(seg) -> Dict[str, str]:
    """``{name: segment ID}`` (the names are unique here; the Segment result's IDs are random)."""
    segmentation = seg.GetSegmentation()
    return {segmentation.GetNthSegment(n).GetName(): segmentation.GetNthSegmentID(n)
            for n in range(segmentation.GetNumberOfSegments())}


def _state(mod, seg) -> List[tuple]:
    """Everything the removal may change, in the node's order: name, label value, the segment's mask, its labelmap's
    extent, every value and IJK-to-RAS of it, and which segments (names) share that labelmap."""
    segmentation = seg.GetSegmentation()
    ids = [segmentation.GetNthSegmentID(n) for n in range(segmentation.GetNumberOfSegments())]
    layer: Dict[str, List[str]] = {}
    for sid in ids:
        segment = segmentation.GetSegment(sid)
        layer.setdefault(segment.GetRepresentation(mod.LABELMAP).GetAddressAsString("vtkObject"),
                         []).append(segment.GetName())
    out = []
    for sid in ids:
        segment = segmentation.GetSegment(sid)
        rep = segment.GetRepresentation(mod.LABELMAP)
        values = numpy_support.vtk_to_numpy(rep.GetPointData().GetScalars()).copy()
        m = vtk.vtkMatrix4x4()
        rep.GetImageToWorldMatrix(m)
        out.append((segment.GetName(), segment.GetLabelValue(), mod.segment_mask(seg, sid, SHAPE, AFFINE),
                    tuple(rep.GetExtent()), values, [[m.GetElement(r, c) for c in range(4)] for r in range(4)],
                    layer[rep.GetAddressAsString("vtkObject")]))
    return out


def _same(a: List[tuple], b: List[tuple]) -> None:
    assert [s[:2] for s in a] == [s[:2] for s in b]
    for x, y in zip(a, b):
        assert np.array_equal(x[2], y[2]), x[0]
        assert x[3] == y[3] and np.array_equal(x[4], y[4]) and np.allclose(x[5], y[5]), x[0]
        assert x[6] == y[6], x[0]


@pytest.mark.parametrize("which", ["automatic", "some-of-each-layer", "all"])
def test_removing_segments_leaves_the_node_the_one_by_one_removal_leaves(mod, which):
    _, fast = _node(mod)
    _, slow = _node(mod)
    names = list(_ids(fast))
    automatic = [n for n in names if n.startswith("organ ")]
    # an organ the user's segment was painted over (the corner (I, J, K) < (5, 4, 3)) is an edited one, the user's
    painted_over = {f"organ {v}" for v in np.unique(_labels(SHAPE, 6, 0)[0:5, 0:4, 0:3]) if v}
    fast_ids = _ids(fast)
    assert len(automatic) == 6 and sorted(mod.MambaHoMELogic.automatic_segment_ids(fast)) == sorted(
        fast_ids[n] for n in automatic if n not in painted_over)
    gone = {"automatic": automatic,
            "some-of-each-layer": automatic[1:4] + ["pair two", "alone"],
            "all": names}[which]
    fast_ids, slow_ids = _ids(fast), _ids(slow)
    mod.MambaHoMELogic.remove_segments(fast, [fast_ids[n] for n in gone])
    for name in gone:
        slow.GetSegmentation().RemoveSegment(slow_ids[name])
    after = _state(mod, fast)
    _same(after, _state(mod, slow))
    assert [s[0] for s in after] == [n for n in names if n not in gone]
    if which == "automatic":  # the user's segment keeps its voxels, alone in the labelmap now
        kept = {s[0]: s for s in after}["drawn in the layer"]
        assert kept[2].sum() == 3 * 4 * 5 and set(np.unique(kept[4])) == {0, 7} and kept[6] == ["drawn in the layer"]


def test_a_second_segment_leaves_the_node_the_one_by_one_removal_leaves(mod):
    volume, fast = _node(mod)
    _, slow = _node(mod)
    labels = _labels(SHAPE, 5, 1)
    names = ["background"] + [f"tissue {v}" for v in range(1, 6)]
    colors = [[0, 0, 0]] + [[0.2, 0.4, 0.6]] * 5
    for sid in mod.MambaHoMELogic.automatic_segment_ids(slow):  # the way before
        slow.GetSegmentation().RemoveSegment(sid)
    fast_result = mod.MambaHoMELogic.write_segments(fast, volume, labels, names, colors, model_id="again")
    slow_result = mod.MambaHoMELogic.write_segments(slow, volume, labels, names, colors, model_id="again")
    assert fast_result[1:] == slow_result[1:]
    _same(_state(mod, fast), _state(mod, slow))


def test_a_second_segment_on_a_large_node_removes_the_first_result_under_the_gui_budget(mod):
    """256x256x200 (13 M voxels), 100 automatic segments in one labelmap: removing them took 1.9 s one by one, each
    removal rewriting the whole shared labelmap (twice)."""
    shape = (256, 256, 200)
    scene = slicer.vtkMRMLScene()
    volume = unfilled_volume_node(scene, shape, AFFINE)
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "big")
    rng = np.random.default_rng(0)

    def result():
        labels = np.zeros(shape, dtype=np.uint8)
        for value in range(1, 101):
            c = rng.integers(10, np.array(shape) - 10)
            labels[c[0] - 6:c[0] + 6, c[1] - 6:c[1] + 6, c[2] - 4:c[2] + 4] = value
        return labels, ["background"] + [f"organ {v}" for v in range(1, 101)], [[0, 0, 0]] + [[0.5, 0.5, 0.5]] * 100

    mod.MambaHoMELogic.write_segments(seg, volume, *result())
    segmentation = seg.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == 100 and segmentation.GetNumberOfLayers() == 1
    first = segmentation.GetNthSegment(0).GetRepresentation(mod.LABELMAP)
    rewritten = []
    first.AddObserver(vtk.vtkCommand.ModifiedEvent, lambda caller, event: rewritten.append(1))
    ids, _, _ = mod.MambaHoMELogic.write_segments(seg, volume, *result())  # Segment again
    assert len(ids) == 100 and segmentation.GetNumberOfSegments() == 100
    assert not rewritten, f"the first result's labelmap was rewritten {len(rewritten)} times"
    t0 = time.perf_counter()
    mod.MambaHoMELogic.remove_segments(seg, mod.MambaHoMELogic.automatic_segment_ids(seg))
    seconds = time.perf_counter() - t0
    assert segmentation.GetNumberOfSegments() == 0
    assert seconds < 0.1, f"{seconds:.3f} s on the GUI thread"
