"""The 3D Slicer module after a prompt it gave up (the server did not answer within the prompt timeout, then applied the
prompt late: a stopped server resumed), as an annotator meets it.

Found in review:

- The given-up prompt was remembered in one slot, forgotten by the first prompt on another volume: a prompt on volume
  B, then back on volume A (whose server object the late prompt had changed), and the module took the late change for
  another client's ("Another client changed this object"), a false warning dialog.
- The late answer caught up before the next prompt was written over the open segment: what the user had painted into it
  with the Segment Editor since the last answer, and not sent yet, was gone without a word. Now the painting is drawn
  again over the caught-up object (the user's edits are the newest), said so, and sent with the point that follows.

A real server (the echo promptable model: its object is the previous mask plus the positive clicks) runs in a process
of its own, stopped with SIGSTOP and resumed with SIGCONT (the fixtures of ``test_slicer_walk5_hung_server``); real
MRML classes from ``slicer-core``; the strokes are Slicer's own ``SetBinaryLabelmapToSegment`` (what the Segment
Editor's effects call).
"""
from __future__ import annotations

from typing import Tuple

import numpy as np
import pytest

from slicer_support import int16_volume_node, load_module, slicer  # noqa: F401 - skips first
import vtk  # noqa: E402

from test_slicer_walk5_hung_server import (  # noqa: E402,F401 - fixtures
    AFFINE, SHORT_S, TOKEN, server, server_process, settle, stop, timed)

pytest.importorskip("engine.interactive")

SHAPE = (24, 20, 16)
# volume B lies elsewhere in the world (100 mm to the right): points placed on one volume lie outside the other
AFFINE_B = AFFINE + np.array([[0, 0, 0, 100.0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])


def _place(markups, affine, voxel) -> None:
    markups.AddControlPointWorld(vtk.vtkVector3d(*(affine @ np.r_[np.asarray(voxel, float), 1.0])[:3]))


@pytest.fixture()
def two_volumes(server):
    mod = load_module()
    scene = slicer.vtkMRMLScene()
    rng = np.random.default_rng(0)
    vol_a = int16_volume_node(scene, rng.integers(0, 400, size=SHAPE), AFFINE, "A")
    vol_b = int16_volume_node(scene, rng.integers(0, 400, size=SHAPE), AFFINE_B, "B")
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "seg")
    plus = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "plus")
    logic = mod.MambaHoMELogic()
    logic.connect(server["url"], TOKEN)
    logic.set_prompt_model("echo", check=False)
    return mod, logic, vol_a, vol_b, seg, plus


def _give_up_a_prompt(mod, server, logic, volume, seg, plus, affine, voxel) -> str:
    """Stop the server, send a point that is given up after the short prompt timeout, resume the server and wait until
    it applied the given-up point (late): returns the volume's session ID."""
    from mambahome_client import Client

    sid = logic.session_for(volume).session_id
    stop(server, logic)
    _place(plus, affine, voxel)
    box, _ = timed(SHORT_S + 15, logic.prompt_points, volume, seg, plus, None)
    assert isinstance(box.get("error"), mod.PromptTimeoutError), box
    server["resume"]()
    reader = Client(server["url"], token=TOKEN)
    settle(reader, sid)
    assert reader.object_mask(sid).mask[tuple(voxel)]  # the resumed server applied the given-up point
    return sid


def _open_mask(mod, logic, seg, shape) -> np.ndarray:
    return mod.segment_mask(seg, logic.open_segment_id(seg), shape, AFFINE)


def test_a_prompt_given_up_on_one_volume_is_no_other_clients_change_after_prompting_another(server, two_volumes):
    """Volume A: a point answered, a second one given up (the server applied it late). The annotator goes on with volume
    B, then back to volume A. Neither prompt is told that another client changed the object: no other client exists.
    Before, B's prompt forgot the given-up prompt of A's session, and back on A the late change was taken for another
    client's (the reset that starts A's new object met a revision it did not expect)."""
    mod, logic, vol_a, vol_b, seg, plus = two_volumes
    _place(plus, AFFINE, [3, 4, 5])
    logic.prompt_points(vol_a, seg, plus, None)
    _give_up_a_prompt(mod, server, logic, vol_a, seg, plus, AFFINE, [20, 15, 2])

    _place(plus, AFFINE_B, [6, 6, 6])
    box, _ = timed(60, logic.prompt_points, vol_b, seg, plus, None)  # A's unsent point lies outside B: not sent
    assert "result" in box, box
    notice = logic.take_notice() or ""
    assert "Another client" not in notice, notice
    assert logic.mask[6, 6, 6]

    _place(plus, AFFINE, [10, 11, 12])
    box, _ = timed(60, logic.prompt_points, vol_a, seg, plus, None)
    assert "result" in box, box
    notice = logic.take_notice() or ""
    assert "Another client" not in notice, notice
    # a new object on A (the first ended when B was prompted): the given-up point, still unsent, and the new one
    assert logic.mask[10, 11, 12] and logic.mask[20, 15, 2] and not logic.mask[3, 4, 5]
    np.testing.assert_array_equal(_open_mask(mod, logic, seg, SHAPE), logic.mask)


def _stroke(mod, seg, segment_id: str, where: Tuple[slice, ...], value: int, mode: str) -> None:
    """One Segment Editor stroke over the box ``where`` (I, J, K) of the volume A's grid."""
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    kji = tuple(where[::-1])
    size = tuple(s.stop - s.start for s in kji)
    modifier = mod._box_labelmap(np.full(size, value, np.uint8), tuple(s.start for s in kji), AFFINE)
    assert logic.SetBinaryLabelmapToSegment(modifier, seg, segment_id, getattr(logic, mode))


def test_painting_not_sent_yet_is_kept_over_a_caught_up_late_answer_and_sent_with_the_next_point(server, two_volumes):
    """A point answered, a second given up (applied late by the resumed server). The annotator then paints a block into
    the open segment and sends a third point. The module first takes the server's object
    (the late point), and the painting stays: drawn over that object, said so, and sent to the server before the point
    (the server's object holds it after the answer). Before, the caught-up object was written over the segment and
    the painting was gone without a word."""
    from mambahome_client import Client

    mod, logic, vol_a, vol_b, seg, plus = two_volumes
    _place(plus, AFFINE, [3, 4, 5])
    logic.prompt_points(vol_a, seg, plus, None)
    sid = _give_up_a_prompt(mod, server, logic, vol_a, seg, plus, AFFINE, [20, 15, 2])

    painted = (slice(10, 14), slice(2, 6), slice(9, 13))  # away from the clicks
    assert not logic.mask[painted].any()
    _stroke(mod, seg, logic.open_segment_id(seg), painted, 1, "MODE_MERGE_MAX")

    _place(plus, AFFINE, [7, 8, 9])
    box, _ = timed(60, logic.prompt_points, vol_a, seg, plus, None)
    assert "result" in box, box
    shown = _open_mask(mod, logic, seg, SHAPE)
    server_mask = Client(server["url"], token=TOKEN).object_mask(sid).mask
    for where, mask in (("segment", shown), ("module", logic.mask), ("server", server_mask)):
        assert mask[painted].all(), f"the painting is not in the {where}'s object"
        assert mask[20, 15, 2] and mask[7, 8, 9] and mask[3, 4, 5], where  # the late point, the new one, the first
    np.testing.assert_array_equal(shown, server_mask)
    np.testing.assert_array_equal(logic.mask, server_mask)
    notice = logic.take_notice() or ""
    assert "Another client" not in notice, notice
    assert "not answered in time" in notice and "painting" in notice and "kept" in notice, notice
