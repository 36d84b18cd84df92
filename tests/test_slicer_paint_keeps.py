"""The 3D Slicer module keeps what the user painted into (or erased from) the open object's segment with the Segment
Editor: the next point or box sends the segment's mask to the server as the object's new mask first (an undoable
step), so the answer refines the painted object. Real MRML classes (``slicer-core``), strokes made with Slicer's own
``vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment`` (what the Segment Editor's effects call), a live
server on the CPU with the deterministic "echo" promptable model (its object is the previous mask plus the positive
prompts, less the negative ones).

The defect: the server answered from its own previous mask, which never saw the painting, and the module then rewrote
the segment from that mask: painted voxels vanished and erased ones came back, without a word. Undo after such a prompt
goes back to the painted object, a second Undo to the object before the painting; an Undo before any prompt took the
painting keeps it drawn over the undone object (as napari's Interactive section keeps a brush edit over its Undo). An
emptied segment clears the object (as Reset); a deleted one is written again from the object (as before). When nothing
was painted nothing more is sent, and the check reads no voxel."""
from __future__ import annotations

import tracemalloc
from typing import Any, List, Tuple

import numpy as np
import pytest

from slicer_support import int16_volume_node, unfilled_volume_node, load_module, slicer  # noqa: F401 - skips first
import vtk  # noqa: E402

from server_support import connected_client, echo_server  # noqa: E402

pytest.importorskip("engine.interactive")

TOKEN = "slicer-paint-keeps"
SHAPE = (64, 48, 40)
AFFINE = np.array([[-1.5, 0, 0, 10.0], [0, -1.25, 0, -4.0], [0, 0, 2.0, 7.0], [0, 0, 0, 1.0]])
BOX = ((6, 14), (6, 14), (6, 12))  # the first prompt's box (I, J, K), inclusive corners
FAR = (slice(30, 35), slice(26, 31), slice(22, 27))  # a stroke away from the object (I, J, K)
# A click whose answer's window (32 voxels a side around it) misses the first box: the echo model redraws every positive
# prompt the object keeps inside its window (the server keeps the prompt history under a new mask), so an erased voxel
# of that box comes back only when a later answer's window reaches it, as a real model may draw it again there
AWAY = [56, 40, 32]


@pytest.fixture(scope="module")
def mod():
    return load_module()


class Annotator:
    """A scene (volume, output node, + and - points, an ROI), the Logic connected to the echo server, and a second
    client reading the server's object; every request the Logic's client sends is recorded."""

    def __init__(self, mod: Any, url: str) -> None:
        self.mod = mod
        self.scene = slicer.vtkMRMLScene()
        rng = np.random.default_rng(0)
        self.volume = int16_volume_node(self.scene, rng.integers(0, 400, size=SHAPE), AFFINE, "mr")
        self.seg = self.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "mr MambaHoME")
        self.plus = self.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "plus")
        self.minus = self.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "minus")
        self.logic = mod.MambaHoMELogic()
        self.logic.connect(url, TOKEN)
        self.logic.set_prompt_model("echo", check=False)
        self.reader = connected_client(url, TOKEN)
        self.sent: List[Tuple[str, str]] = []
        client = self.logic.client
        real = client._request

        def recorded(method, path, *args, **kwargs):
            body = kwargs.get("json_body")
            what = body.get("type") if isinstance(body, dict) else path.rsplit("/", 1)[-1]
            self.sent.append((method, what))
            return real(method, path, *args, **kwargs)

        client._request = recorded

    # -- prompts
    def box(self) -> None:
        lo_ijk = np.array([BOX[0][0], BOX[1][0], BOX[2][0]], float)
        hi_ijk = np.array([BOX[0][1], BOX[1][1], BOX[2][1]], float)
        a, b = (AFFINE @ np.r_[lo_ijk, 1.0])[:3], (AFFINE @ np.r_[hi_ijk, 1.0])[:3]
        roi = self.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode")
        roi.SetCenterWorld(*((a + b) / 2))
        roi.SetSizeWorld(*np.abs(b - a))
        self.logic.prompt_roi(self.volume, self.seg, roi)

    def click(self, voxel, positive: bool = True) -> None:
        node = self.plus if positive else self.minus
        node.AddControlPointWorld(vtk.vtkVector3d(*(AFFINE @ np.r_[np.asarray(voxel, float), 1.0])[:3]))
        self.logic.prompt_points(self.volume, self.seg, self.plus, self.minus)

    # -- the Segment Editor
    def _stroke(self, where: Tuple[slice, ...], value: int, mode: str) -> None:
        """One stroke over the box ``where`` (I, J, K) as the Segment Editor's effects make it: a modifier labelmap on
        the volume's grid merged into the segment by Slicer's own logic."""
        logic = slicer.vtkSlicerSegmentationsModuleLogic
        kji = tuple(where[::-1])
        size = tuple(s.stop - s.start for s in kji)
        modifier = self.mod._box_labelmap(np.full(size, value, np.uint8), tuple(s.start for s in kji), AFFINE)
        assert logic.SetBinaryLabelmapToSegment(modifier, self.seg, self.segment_id(), getattr(logic, mode))

    def paint(self, where: Tuple[slice, ...]) -> None:
        before = self.shown()
        self._stroke(where, 1, "MODE_MERGE_MAX")
        before[where] = True
        assert np.array_equal(self.shown(), before)  # the stroke painted exactly its box

    def erase(self, where: Tuple[slice, ...]) -> None:
        before = self.shown()
        self._stroke(where, 0, "MODE_MERGE_MIN")
        before[where] = False
        assert np.array_equal(self.shown(), before)  # the stroke erased exactly its box

    # -- reading
    def segment_id(self) -> str:
        return self.logic.open_segment_id(self.seg)

    def shown(self) -> np.ndarray:
        return self.mod.segment_mask(self.seg, self.segment_id(), SHAPE, AFFINE)

    def server(self) -> np.ndarray:
        sid = self.logic.session_for(self.volume).session_id
        out = np.zeros(SHAPE, dtype=bool)
        self.reader.object_mask(sid).apply(out)
        return out

    def check(self, expected: np.ndarray, step: str) -> None:
        """The segment shows ``expected``, and it is the server's object and the Logic's mask."""
        assert np.array_equal(self.shown(), expected), step
        assert np.array_equal(self.server(), expected), step
        assert np.array_equal(self.logic.mask, expected), step


@pytest.fixture
def user(mod, tmp_path):
    with echo_server(tmp_path, TOKEN) as (url, _):
        yield Annotator(mod, url)


def test_voxels_painted_far_from_the_next_click_are_still_there_after_its_answer(user):
    user.box()
    boxed = user.shown()
    assert boxed[8:12, 8:12, 7:11].all() and not boxed[FAR].any()
    user.paint(FAR)
    painted = user.shown()
    user.sent.clear()
    user.click([20, 18, 15])
    shown = user.shown()
    assert shown[FAR].all(), "the painting was lost"
    assert shown[20, 18, 15] and np.array_equal(shown & painted, painted)
    user.check(shown, "after the click")
    # the painting went first, as the object's mask, then the click; nothing else
    assert user.sent == [("POST", "initial-mask"), ("POST", "point")]


def test_erased_voxels_stay_erased_after_the_next_answer(user):
    user.box()
    erased = (slice(6, 15), slice(6, 15), slice(6, 9))  # the box's lowest slices
    user.erase(erased)
    painted = user.shown()
    assert painted.any()
    user.click(AWAY)
    shown = user.shown()
    assert not shown[erased].any(), "erased voxels came back"
    assert shown[tuple(AWAY)] and np.array_equal(shown, painted | _ball_at(shown, AWAY))
    user.check(shown, "after the click")


def _ball_at(mask: np.ndarray, voxel) -> np.ndarray:
    """The voxels of ``mask`` within 8 voxels of ``voxel``: where the echo model draws a click's ball."""
    grid = np.indices(mask.shape)
    near = sum((g - v) ** 2 for g, v in zip(grid, voxel)) <= 64
    return mask & near


def test_undo_after_the_prompt_goes_back_to_the_painting_and_then_to_before_it(user):
    user.box()
    boxed = user.shown()
    user.paint(FAR)
    user.erase((slice(6, 15), slice(6, 9), slice(6, 13)))
    painted = user.shown()
    user.click(AWAY)
    clicked = user.shown()
    assert clicked[tuple(AWAY)] and np.array_equal(clicked, painted | _ball_at(clicked, AWAY))
    user.logic.undo(user.volume, user.seg)
    user.check(painted, "the first Undo: the painted object")
    user.logic.undo(user.volume, user.seg)
    user.check(boxed, "the second Undo: the object before the painting")
    # and the painting is not sent again: the segment is what the server holds
    user.sent.clear()
    user.click([25, 20, 18])
    assert ("POST", "initial-mask") not in user.sent
    assert user.shown()[25, 20, 18] and not user.shown()[FAR].any()


def test_undo_before_a_prompt_took_the_painting_keeps_it_over_the_undone_object(user):
    user.box()
    boxed = user.shown()
    user.click([25, 20, 18])
    user.paint(FAR)
    user.erase((slice(6, 15), slice(6, 15), slice(6, 8)))
    painted = user.shown()
    user.sent.clear()
    user.logic.undo(user.volume, user.seg)
    assert user.sent == [("POST", "undo")]  # the painting is not sent for an Undo
    kept = boxed.copy()
    kept[FAR] = True
    kept[:, :, 6:8] &= painted[:, :, 6:8]
    assert not user.shown()[25, 20, 18], "the click was not taken back"
    assert np.array_equal(user.shown(), kept), "the painting was not kept over the undone object"
    assert np.array_equal(user.server(), boxed) and np.array_equal(user.logic.mask, boxed)
    # the next prompt sends it, and the answer keeps it
    user.click(AWAY)
    assert user.sent[-2:] == [("POST", "initial-mask"), ("POST", "point")]
    shown = user.shown()
    assert shown[tuple(AWAY)] and np.array_equal(shown, kept | _ball_at(shown, AWAY))
    user.check(shown, "after the next click")
    user.logic.undo(user.volume, user.seg)
    user.check(kept, "Undo: the painted object")


def test_a_segment_erased_whole_clears_the_object_as_reset(user, mod):
    user.box()
    first = user.logic.session_for(user.volume).session_id
    user.erase((slice(0, SHAPE[0]), slice(0, SHAPE[1]), slice(0, SHAPE[2])))
    assert not user.shown().any()
    user.sent.clear()
    user.click([25, 20, 18])
    assert user.sent == [("POST", "reset"), ("POST", "point")]  # no whole-volume mask of nothing sent
    shown = user.shown()
    assert shown[25, 20, 18] and not shown[8:12, 8:12, 7:11].any()
    user.check(shown, "after the click")
    assert user.logic.session_for(user.volume).session_id == first
    user.logic.undo(user.volume, user.seg)  # the click only: the cleared object has no older step
    user.check(np.zeros(SHAPE, bool), "Undo")

    # erased whole, then Undo: the object is cleared, and there is nothing to take back
    user.click([25, 20, 18])
    user.erase((slice(0, SHAPE[0]), slice(0, SHAPE[1]), slice(0, SHAPE[2])))
    with pytest.raises(mod.NothingToUndoError, match="erased whole"):
        user.logic.undo(user.volume, user.seg)
    user.check(np.zeros(SHAPE, bool), "Undo of an erased segment")


def test_a_deleted_segment_is_written_again_from_the_object(user):
    user.box()
    boxed = user.shown()
    user.seg.GetSegmentation().RemoveSegment(user.segment_id())
    user.sent.clear()
    user.click([25, 20, 18])
    assert user.sent == [("POST", "point")]
    shown = user.shown()
    assert np.array_equal(shown & boxed, boxed) and shown[25, 20, 18]
    user.check(shown, "after the click")


def test_reset_clears_the_painting_with_the_object(user):
    user.box()
    user.paint(FAR)
    user.sent.clear()
    user.logic.reset(user.volume, user.seg)
    assert user.sent == [("POST", "reset")]
    user.check(np.zeros(SHAPE, bool), "Reset")


def test_nothing_painted_sends_nothing_more(user):
    """Prompts, Undo and Reset on an unpainted object send only themselves; so do a stroke into another segment and a
    stroke taken back (the labelmap modified, its voxels those of the last answer)."""
    user.box()
    other = slicer.vtkSegment()
    other.SetName("mine")
    other.AddRepresentation(user.mod.LABELMAP, user.mod._oriented_mask(np.zeros(SHAPE, bool), AFFINE))
    user.seg.GetSegmentation().AddSegment(other, "mine")
    user.sent.clear()
    user.click([25, 20, 18])
    user.click([20, 18, 15], positive=False)
    mine = user.mod._box_labelmap(np.ones((3, 3, 3), np.uint8), (1, 1, 1), AFFINE)
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    assert logic.SetBinaryLabelmapToSegment(mine, user.seg, "mine", logic.MODE_MERGE_MAX)
    user.click([22, 18, 15])
    before = user.shown()
    user.paint(FAR)
    user.erase(FAR)  # painted and erased again: the same voxels
    assert np.array_equal(user.shown(), before)
    user.logic.undo(user.volume, user.seg)
    user.click([22, 19, 15])
    user.logic.reset(user.volume, user.seg)
    assert user.sent == [("POST", "point")] * 3 + [("POST", "undo"), ("POST", "point"), ("POST", "reset")]


def test_a_refused_painting_changes_nothing_and_is_sent_with_the_next_prompt(user, mod, monkeypatch):
    user.box()
    boxed = user.shown()
    user.paint(FAR)
    painted = user.shown()
    client = user.logic.client
    real = client.set_initial_mask

    def busy(*args, **kwargs):
        raise mod.BusyError("the GPU is busy", status=503, code="busy")

    monkeypatch.setattr(client, "set_initial_mask", busy)
    with pytest.raises(mod.BusyError):
        user.click([25, 20, 18])
    assert np.array_equal(user.logic.mask, boxed) and np.array_equal(user.server(), boxed)
    assert np.array_equal(user.shown(), painted)
    monkeypatch.setattr(client, "set_initial_mask", real)
    user.plus.RemoveAllControlPoints()  # the refused point was not counted as sent: placed again, sent once
    user.click([25, 20, 18])
    shown = user.shown()
    assert shown[FAR].all() and shown[25, 20, 18]
    user.check(shown, "the next prompt")


def test_the_check_reads_no_voxel_when_nothing_was_painted_and_only_the_boxes_when_it_was(mod, monkeypatch):
    """256x256x200 (13 M voxels), synthetic answers: unpainted, the check before a prompt reads nothing (no labelmap
    view, no whole-volume mask, no allocation); painted, it reads the labelmap's extent and the object's box only."""
    shape = (256, 256, 200)
    scene = slicer.vtkMRMLScene()
    volume = unfilled_volume_node(scene, shape, AFFINE)
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "big")
    logic = mod.MambaHoMELogic()
    box = (slice(100, 140), slice(90, 130), slice(80, 110))
    answer = np.zeros(tuple(s.stop - s.start for s in box), bool)
    answer[5:35, 5:35, 5:25] = True
    logic._apply(mod.MaskUpdate(bbox=box, mask=answer, latency_s=0.0, server_s=0.0, model_id="echo"), seg, volume)

    reads: List[str] = []
    for name in ("_labelmap_view", "segment_mask"):
        real = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _n=name, _r=real: reads.append(_n) or _r(*a))
    tracemalloc.start()
    assert logic._painting(seg, volume) is None
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert reads == [] and peak < 64 * 1024, (reads, peak)

    segment_id = logic.open_segment_id(seg)
    stroke = mod._box_labelmap(np.ones((4, 4, 4), np.uint8), (150, 150, 150), AFFINE)  # (k, j, i) far from the object
    logic_ = slicer.vtkSlicerSegmentationsModuleLogic
    assert logic_.SetBinaryLabelmapToSegment(stroke, seg, segment_id, logic_.MODE_MERGE_MAX)
    found = logic._painting(seg, volume)
    assert found is not None and "segment_mask" not in reads
    region, painted = found
    assert region == ((85, 154), (95, 154), (105, 154))  # the object's box and the stroke's, not the volume
    assert int(painted.sum()) == int(answer.sum()) + 64


def test_a_painted_segment_on_another_grid_is_read_resampled_and_kept(user, mod):
    """The open segment's labelmap replaced by one on a grid one voxel off the volume's (as a segmentation with its own
    geometry holds it): read resampled onto the volume, sent, and the answer written on the volume's grid again."""
    user.box()
    painted = user.shown()
    painted[FAR] = True
    shift = np.eye(4)
    shift[0, 3] = -1.0  # its voxel i is the volume's i - 1
    grid = AFFINE @ shift
    moved = np.zeros(SHAPE, bool)
    moved[1:] = painted[:-1]
    segment = user.seg.GetSegmentation().GetSegment(user.segment_id())
    segment.AddRepresentation(mod.LABELMAP, mod._oriented_mask(moved, grid))
    assert np.array_equal(user.shown(), painted)
    user.sent.clear()
    user.click(AWAY)
    assert user.sent == [("POST", "initial-mask"), ("POST", "point")]
    shown = user.shown()
    assert np.array_equal(shown, painted | _ball_at(shown, AWAY)) and shown[tuple(AWAY)]
    user.check(shown, "after the click")
    assert mod._on_grid(user.seg.GetSegmentation().GetSegment(user.segment_id()).GetRepresentation(mod.LABELMAP),
                        AFFINE)
