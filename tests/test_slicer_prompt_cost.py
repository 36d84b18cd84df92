"""A prompt answer costs its box, not the volume: ``MambaHoMELogic._apply`` writes the server's changed box into the
open object's labelmap in place; real MRML classes (``slicer-core``), synthetic answers and a live server with the
deterministic "echo" promptable model.

The defect: every answer (a prompt, Undo, Reset) replaced the *MambaHoME interactive* segment by a new whole-volume
labelmap built from the whole mask, on Slicer's GUI thread: over a second per prompt on a 512x512x400 CT
(``benchmarks/slicer_prompt_cost.py``). Now the segment's labelmap spans the object's box only (widened when an answer
draws outside it) and an answer writes only the box it changed. The voxels are those of the whole-volume way (kept below
as the reference), each at the same RAS point, on an axis-aligned and on an oblique grid, through undos, a reset and the
accept; when something else changed the labelmap (the Segment Editor painted it, it joined a shared layer, it was
deleted) the segment is written anew from the object's mask, as before."""
from __future__ import annotations

import time
import tracemalloc
from typing import Dict, List, Tuple

import numpy as np
import pytest

from slicer_support import int16_volume_node, unfilled_volume_node, load_module, slicer  # noqa: F401 - skips first
import vtk  # noqa: E402
from vtk.util import numpy_support  # noqa: E402

SHAPE = (40, 36, 30)
AXIS_ALIGNED = np.array([[-1.5, 0, 0, 10.0], [0, -1.25, 0, -4.0], [0, 0, 2.0, 7.0], [0, 0, 0, 1.0]])


def _oblique() -> np.ndarray:
    """A grid turned 30 degrees about S and 20 about R, one axis flipped, anisotropic voxels: no axis of IJK is an
    axis of RAS."""
    a, b = np.radians(30), np.radians(20)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    m = np.eye(4)
    m[:3, :3] = rz @ rx @ np.diag([0.7, -0.9, 1.6])
    m[:3, 3] = [12.0, -30.0, 55.0]
    return m


OBLIQUE = _oblique()


@pytest.fixture(scope="module")
def mod():
    return load_module()


def _ball(shape, center, radii) -> Tuple[Tuple[slice, ...], np.ndarray]:
    lo = [max(int(c - r), 0) for c, r in zip(center, radii)]
    hi = [min(int(c + r) + 1, n) for c, r, n in zip(center, radii, shape)]
    grid = np.ogrid[tuple(slice(a, b) for a, b in zip(lo, hi))]
    inside = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, center, radii)) <= 1.0
    return tuple(slice(a, b) for a, b in zip(lo, hi)), inside


def _answers(shape) -> List[Tuple[str, Tuple[slice, ...], np.ndarray]]:
    """``[(step, box (I, J, K), mask there)]``: what the server answers to an annotator's prompts, undos and a reset
    (each box the one it changed, as the engine's session answers)."""
    obj = np.zeros(shape, dtype=bool)
    out, history = [], []
    c = np.array(shape) // 2

    def answer(step, box, new):
        history.append((box, obj[box].copy()))
        obj[box] = new
        out.append((step, box, np.array(new, dtype=bool)))

    def undo(step):
        box, previous = history.pop()
        obj[box] = previous
        out.append((step, box, previous))

    box, inside = _ball(shape, c, (8, 7, 5))
    answer("first prompt", box, inside)
    box, cut = _ball(shape, c + [6, 0, 0], (3, 3, 2))
    answer("- click", box, obj[box] & ~cut)
    box, add = _ball(shape, c + [0, 9, 3], (4, 3, 3))
    answer("+ click beyond the object's box", box, obj[box] | add)
    box, edge = _ball(shape, (shape[0] - 2, 3, c[2]), (4, 4, 3))
    answer("+ click at the volume's edge", box, obj[box] | edge)
    answer("an answer that changed nothing", (slice(c[0], c[0]), slice(c[1], c[1]), slice(c[2], c[2])),
           np.zeros((0, 0, 0), dtype=bool))
    box, wider = _ball(shape, c, (10, 9, 7))
    answer("the object redrawn in its whole box", box, obj[box] | wider)
    undo("undo the redraw")
    undo("undo the edge")
    undo("undo the + click")
    nz = [np.flatnonzero(obj.any(axis=tuple(a for a in range(3) if a != ax))) for ax in range(3)]
    box = tuple(slice(int(n[0]), int(n[-1]) + 1) for n in nz)
    answer("reset", box, np.zeros(tuple(s.stop - s.start for s in box), dtype=bool))
    box, inside = _ball(shape, c - [9, 8, 4], (5, 4, 3))
    answer("a prompt after the reset", box, inside)
    return out


def _update(mod, box, mask):
    return mod.MaskUpdate(bbox=box, mask=mask, latency_s=0.0, server_s=0.0, model_id="echo")


def _scene(mod, affine, shape=SHAPE):
    """A volume and a node holding a Segment result (two classes, one shared labelmap) and a hand-drawn segment, both
    under the object."""
    scene = slicer.vtkMRMLScene()
    volume = int16_volume_node(scene, np.zeros(shape, dtype=np.int16), affine, "ct")
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "ct MambaHoME")
    labels = np.zeros(shape, dtype=np.uint8)
    c = np.array(shape) // 2
    labels[c[0] - 12:c[0], c[1] - 10:c[1] + 10, c[2] - 6:c[2] + 6] = 1
    labels[c[0]:c[0] + 12, c[1] - 10:c[1] + 10, c[2] - 6:c[2] + 6] = 2
    mod.MambaHoMELogic.set_segments(seg, volume, labels, ["background", "liver", "spleen"],
                                    [[0, 0, 0], [1, 0, 0], [0, 1, 0]], model_id="auto")
    drawn = np.zeros(shape, dtype=bool)
    drawn[c[0] - 3:c[0] + 3, c[1] - 12:c[1] + 2, 0:shape[2]] = True
    own = slicer.vtkSegment()
    own.SetName("drawn")
    own.AddRepresentation(mod.LABELMAP, mod._oriented_mask(drawn, affine))
    seg.GetSegmentation().AddSegment(own, "drawn_by_hand")
    return scene, volume, seg


def _whole_volume_apply(mod, seg, volume, mask: np.ndarray, affine: np.ndarray) -> None:
    """The write before: the open segment replaced by a new one holding the whole mask as a whole-volume labelmap."""
    segmentation = seg.GetSegmentation()
    segment_id = mod.MambaHoMELogic.open_segment_id(seg)
    if segment_id:
        segmentation.RemoveSegment(segment_id)
    segment = slicer.vtkSegment()
    segment.SetName(mod.INTERACTIVE_SEGMENT)
    segment.SetTag(mod.OBJECT_TAG, "open")
    segment.AddRepresentation(mod.LABELMAP, mod._oriented_mask(mask, affine))
    assert segmentation.AddSegment(segment, segment_id or mod.INTERACTIVE_SEGMENT_ID)


def _world_points(image, label: int = 1) -> np.ndarray:
    """The RAS points of a labelmap's voxels holding ``label``, sorted: read with VTK's own layout (x fastest) and the
    image's own extent and IJK-to-RAS, not with the module's helpers."""
    ext = image.GetExtent()
    if ext[1] < ext[0] or ext[3] < ext[2] or ext[5] < ext[4]:
        return np.zeros((0, 3))
    values = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(
        ext[5] - ext[4] + 1, ext[3] - ext[2] + 1, ext[1] - ext[0] + 1)
    k, j, i = np.nonzero(values == label)
    m = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(m)
    to_world = np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])
    ijk = np.stack([i + ext[0], j + ext[2], k + ext[4], np.ones_like(i)]).astype(float)
    points = np.round((to_world @ ijk)[:3].T, 4)
    return points[np.lexsort(points.T[::-1])] if len(points) else points


def _labelmap(mod, seg, segment_id=None):
    segment_id = segment_id or mod.MambaHoMELogic.open_segment_id(seg)
    return seg.GetSegmentation().GetSegment(segment_id).GetRepresentation(mod.LABELMAP)


def _masks(mod, seg, affine, shape=SHAPE) -> Dict[str, np.ndarray]:
    segmentation = seg.GetSegmentation()
    return {segmentation.GetNthSegment(n).GetName(): mod.segment_mask(seg, segmentation.GetNthSegmentID(n), shape,
                                                                       affine)
            for n in range(segmentation.GetNumberOfSegments())}


@pytest.mark.parametrize("affine", [AXIS_ALIGNED, OBLIQUE], ids=["axis-aligned", "oblique"])
def test_answers_write_the_voxels_the_whole_volume_way_writes_at_the_same_ras_points(mod, affine):
    _, volume, fast = _scene(mod, affine)
    _, ref_volume, slow = _scene(mod, affine)
    logic = mod.MambaHoMELogic()
    expected = np.zeros(SHAPE, dtype=bool)
    drawn = None
    for step, box, mask in _answers(SHAPE):
        logic._apply(_update(mod, box, mask), fast, volume)
        expected[box] = mask
        _whole_volume_apply(mod, slow, ref_volume, expected, affine)
        assert np.array_equal(logic.mask, expected), step
        got = _masks(mod, fast, affine)
        want = _masks(mod, slow, affine)
        assert sorted(got) == sorted(want), step
        for name in got:
            assert np.array_equal(got[name], want[name]), (step, name)
        assert np.array_equal(got[mod.INTERACTIVE_SEGMENT], expected), step
        rep = _labelmap(mod, fast)
        m = vtk.vtkMatrix4x4()
        rep.GetImageToWorldMatrix(m)
        assert np.allclose([[m.GetElement(r, c) for c in range(4)] for r in range(4)], affine), step
        assert np.array_equal(_world_points(rep), _world_points(_labelmap(mod, slow))), step
        # the labelmap spans the boxes the object's voxels were drawn in, not the volume
        if mask.any():
            nz = [np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != ax))) for ax in range(3)]
            here = [(s.start + int(n[0]), s.start + int(n[-1]) + 1) for s, n in zip(box, nz)]
            drawn = here if drawn is None else [(min(a[0], b[0]), max(a[1], b[1])) for a, b in zip(drawn, here)]
        ext = rep.GetExtent()
        assert [(ext[0], ext[1] + 1), (ext[2], ext[3] + 1), (ext[4], ext[5] + 1)] == drawn, step
    assert expected.any() and np.prod([b - a for a, b in drawn]) < expected.size // 2


def test_an_answer_on_the_open_object_is_written_in_place_and_slicer_is_told(mod):
    """The same segment and labelmap, changed in the answer's box only; the labelmap is marked modified and the segment
    named as Slicer's vtkSegmentationModifier names it (Slicer redraws it); no segment is removed or added."""
    _, volume, seg = _scene(mod, OBLIQUE)
    logic = mod.MambaHoMELogic()
    answers = _answers(SHAPE)
    logic._apply(_update(mod, *answers[0][1:]), seg, volume)
    segmentation = seg.GetSegmentation()
    segment_id = logic.open_segment_id(seg)
    rep = _labelmap(mod, seg)
    others = {sid: segmentation.GetSegment(sid).GetRepresentation(mod.LABELMAP).GetMTime()
              for sid in (segmentation.GetNthSegmentID(n) for n in range(segmentation.GetNumberOfSegments()))
              if sid != segment_id}
    said: List[Tuple[str, str]] = []

    def observer(name):
        @vtk.calldata_type(vtk.VTK_STRING)
        def seen(caller, event, segment=None):
            said.append((name, segment))
        return seen

    for name in ("SourceRepresentationModified", "RepresentationModified", "SegmentAdded", "SegmentRemoved"):
        segmentation.AddObserver(getattr(slicer.vtkSegmentation, name), observer(name))
    for step, box, mask in answers[1:4]:  # a - click, a + click beyond the labelmap's extent, one at the edge
        said.clear()
        stamp = rep.GetMTime()
        logic._apply(_update(mod, box, mask), seg, volume)
        assert logic.open_segment_id(seg) == segment_id, step
        assert _labelmap(mod, seg) is rep, f"{step}: the labelmap was replaced"
        assert rep.GetMTime() > stamp, step
        assert ("SourceRepresentationModified", segment_id) in said, step
        assert ("RepresentationModified", segment_id) in said, step
        assert not [e for e in said if e[0] in ("SegmentAdded", "SegmentRemoved")], step
    for sid, stamp in others.items():  # the other segments are left alone
        assert segmentation.GetSegment(sid).GetRepresentation(mod.LABELMAP).GetMTime() == stamp, sid


def _painted(mod, seg, logic):
    """The Segment Editor painted the open segment (its labelmap changed, Modified)."""
    rep = _labelmap(mod, seg)
    values = numpy_support.vtk_to_numpy(rep.GetPointData().GetScalars())
    values[:5] = 1
    rep.GetPointData().GetScalars().Modified()
    rep.Modified()


def _shared(mod, seg, logic):
    """Another segment joined the open segment's labelmap (Slicer's shared layers): label 2 there."""
    rep = _labelmap(mod, seg)
    other = slicer.vtkSegment()
    other.SetName("in the layer")
    other.SetLabelValue(2)
    other.AddRepresentation(mod.LABELMAP, rep)
    assert seg.GetSegmentation().AddSegment(other, "in_the_layer")


def _deleted(mod, seg, logic):
    seg.GetSegmentation().RemoveSegment(logic.open_segment_id(seg))


@pytest.mark.parametrize("change", [_painted, _shared, _deleted], ids=["painted", "shared-layer", "deleted"])
def test_a_labelmap_changed_by_something_else_is_written_anew_from_the_objects_mask(mod, change):
    _, volume, seg = _scene(mod, AXIS_ALIGNED)
    logic = mod.MambaHoMELogic()
    answers = _answers(SHAPE)
    expected = np.zeros(SHAPE, dtype=bool)
    for _, box, mask in answers[:2]:
        logic._apply(_update(mod, box, mask), seg, volume)
        expected[box] = mask
    before = _masks(mod, seg, AXIS_ALIGNED)
    change(mod, seg, logic)
    _, box, mask = answers[2]
    logic._apply(_update(mod, box, mask), seg, volume)
    expected[box] = mask
    after = _masks(mod, seg, AXIS_ALIGNED)
    assert np.array_equal(after[mod.INTERACTIVE_SEGMENT], expected)  # the object's mask, exactly
    for name in ("liver", "spleen", "drawn"):
        assert np.array_equal(after[name], before[name]), name
    if change is _shared:
        assert after["in the layer"].sum() == 0  # it had no voxel; it keeps none of the object's
    tag = vtk.mutable("")
    segment = seg.GetSegmentation().GetSegment(logic.open_segment_id(seg))
    assert segment.GetTag(mod.OBJECT_TAG, tag) and str(tag) == "open"
    # and the next answer is in place again
    rep = _labelmap(mod, seg)
    _, box, mask = answers[3]
    logic._apply(_update(mod, box, mask), seg, volume)
    expected[box] = mask
    assert _labelmap(mod, seg) is rep
    assert np.array_equal(_masks(mod, seg, AXIS_ALIGNED)[mod.INTERACTIVE_SEGMENT], expected)


@pytest.mark.parametrize("affine", [AXIS_ALIGNED, OBLIQUE], ids=["axis-aligned", "oblique"])
def test_the_accept_after_in_place_answers_takes_what_the_whole_volume_object_takes(mod, affine):
    _, volume, fast = _scene(mod, affine)
    _, ref_volume, slow = _scene(mod, affine)
    logic = mod.MambaHoMELogic()
    expected = np.zeros(SHAPE, dtype=bool)
    for _, box, mask in _answers(SHAPE)[:-2]:  # up to the undos, before the reset
        logic._apply(_update(mod, box, mask), fast, volume)
        expected[box] = mask
    _whole_volume_apply(mod, slow, ref_volume, expected, affine)
    open_id = logic.open_segment_id(fast)
    taken = mod.MambaHoMELogic.accept_segment(fast, open_id, SHAPE, affine)
    reference = mod.MambaHoMELogic.accept_segment(slow, mod.MambaHoMELogic.open_segment_id(slow), SHAPE, affine)
    assert taken == reference and {"liver", "spleen", "drawn"} <= set(taken)
    got, want = _masks(mod, fast, affine), _masks(mod, slow, affine)
    assert sorted(got) == sorted(want)
    for name in got:
        assert np.array_equal(got[name], want[name]), name


def test_a_prompt_on_a_large_volume_writes_no_whole_volume_array(mod, monkeypatch):
    """256x256x200 (13 M voxels): no whole-volume labelmap is built, the segment's labelmap holds the object's box, and
    no answer allocates anything near the volume's size (the first only the object's mask, untouched but for its box);
    each well under the GUI rule's 100 ms."""
    shape = (256, 256, 200)
    scene = slicer.vtkMRMLScene()
    volume = unfilled_volume_node(scene, shape, OBLIQUE)
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "big")
    built = []
    real = mod._oriented_mask
    monkeypatch.setattr(mod, "_oriented_mask", lambda mask, *a: built.append(mask.shape) or real(mask, *a))
    logic = mod.MambaHoMELogic()
    voxels = int(np.prod(shape))
    expected = np.zeros(shape, dtype=bool)
    for n, (step, box, mask) in enumerate(_answers(shape)):
        update = _update(mod, box, mask)
        tracemalloc.start()
        t0 = time.perf_counter()
        logic._apply(update, seg, volume)
        seconds = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        expected[box] = mask
        # the first answer allocates the object's mask (1 byte a voxel, zeros the OS hands out): nothing else
        assert peak < (voxels if n == 0 else 0) + voxels // 20, f"{step}: {peak} bytes allocated"
        assert seconds < 0.1, f"{step}: {seconds:.3f} s on the GUI thread"
        rep = _labelmap(mod, seg)
        held = rep.GetPointData().GetScalars().GetNumberOfTuples()
        assert held < voxels // 20, f"{step}: the labelmap holds {held} voxels"
    assert built == [], "a whole-volume labelmap was built"
    ext = _labelmap(mod, seg).GetExtent()
    nz = np.nonzero(expected)
    assert ext[0] <= nz[0].min() and nz[0].max() <= ext[1] and ext[2] <= nz[1].min() and nz[1].max() <= ext[3]
    assert ext[4] <= nz[2].min() and nz[2].max() <= ext[5]
    view = mod.segment_mask(seg, logic.open_segment_id(seg), shape, OBLIQUE)
    assert np.array_equal(view, expected)


def test_prompts_undo_and_reset_on_a_server_keep_the_segment_the_servers_object(mod, tmp_path):
    """The echo model on a live server, an oblique volume: after each answer the segment is the server's object."""
    pytest.importorskip("engine.interactive")
    from server_support import connected_client, echo_server

    token = "slicer-prompt-cost"
    scene, volume, seg = _scene(mod, OBLIQUE)
    plus = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "plus")
    minus = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "minus")
    with echo_server(tmp_path, token) as (url, _):
        logic = mod.MambaHoMELogic()
        logic.connect(url, token)
        logic.set_prompt_model("echo")
        reader = connected_client(url, token)

        def check(step):
            sid = logic.session_for(volume).session_id
            server = np.zeros(SHAPE, dtype=bool)
            reader.object_mask(sid).apply(server)
            assert np.array_equal(logic.mask, server), step
            assert np.array_equal(mod.segment_mask(seg, logic.open_segment_id(seg), SHAPE, OBLIQUE), server), step

        c = np.array(SHAPE) // 2
        for step, node, voxel in (("+", plus, c), ("+ beyond", plus, c + [9, 8, 5]), ("-", minus, c + [1, 0, 0]),
                                  ("+ edge", plus, [SHAPE[0] - 1, 0, c[2]])):
            node.AddControlPointWorld(vtk.vtkVector3d(*(OBLIQUE @ np.r_[voxel, 1.0])[:3]))
            logic.prompt_points(volume, seg, plus, minus)
            check(step)
        assert logic.mask.any()
        rep = _labelmap(mod, seg)
        for n in range(2):
            logic.undo(volume, seg)
            check(f"undo {n}")
            assert _labelmap(mod, seg) is rep  # in place
        logic.reset(volume, seg)
        check("reset")
        assert not logic.mask.any()
