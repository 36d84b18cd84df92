"""Follow-ups of the accepted prompted object (``MambaHoMELogic.accept_segment``, ``OBJECT_TAG``): real MRML classes
(``slicer-core``), a live server on the CPU with the deterministic "echo" promptable model.

1. An object the MODULE ends (a switch of prompt model or of volume, a reconnect) takes its voxels from the node's
   other segments, the user's hand-drawn ones included (Slicer's *Overwrite all*). That stays, but it is said: the
   notice / status line names each segment that lost voxels and how many (before, the counts were thrown away and the
   status said only "the next prompt starts a new object").
2. An accepted segment renamed back to "MambaHoME interactive" was deleted by the next prompt, which wrote the new
   object under that name. An accepted segment is never deleted nor overwritten by a prompt, whatever its name.
3. Undo right after a rename-accept sent a reset, wrote an empty "MambaHoME interactive" segment and then failed with
   "HTTP 400: nothing to undo". After an accept there is nothing to undo in the module: it says so, leaving the node
   and the server alone."""
from __future__ import annotations

import types

import numpy as np
import pytest

from slicer_support import int16_volume_node, load_module, slicer  # noqa: F401 - skips first
import vtk  # noqa: E402

# the scene of the accept tests: a Segment result (liver, spleen) and a hand-drawn segment, the echo model chosen
from test_slicer_accept_overwrites import AFFINE, SHAPE, _click, _ids, _masks, _scene, mod, served  # noqa: E402, F401 - the scene's fixtures

pytest.importorskip("engine.interactive")


def _by_id(mod, seg_node) -> dict:
    """``{segment ID: (name, mask)}``: names may repeat."""
    segmentation = seg_node.GetSegmentation()
    out = {}
    for n in range(segmentation.GetNumberOfSegments()):
        sid = segmentation.GetNthSegmentID(n)
        out[sid] = (segmentation.GetNthSegment(n).GetName(), mod.segment_mask(seg_node, sid, SHAPE, AFFINE))
    return out


def _tag(mod, seg_node, segment_id) -> str:
    tag = vtk.mutable("")
    return str(tag) if seg_node.GetSegmentation().GetSegment(segment_id).GetTag(mod.OBJECT_TAG, tag) else ""


def _expected_counts(before: dict, obj: np.ndarray) -> dict:
    counts = {name: int((mask & obj).sum()) for name, mask in before.items()}
    counts = {name: n for name, n in counts.items() if n}
    assert "drawn" in counts and "liver" in counts, "the test needs the object over the hand-drawn segment and liver"
    return counts


def _says_counts(text: str, counts: dict) -> None:
    assert text, "nothing said"
    for name, n in counts.items():
        assert f"'{name}' ({n} voxel" in text, (name, n, text)


# ---------------------------------------------------------------------------------------------------- 1
def test_an_object_ended_by_a_switch_of_model_says_which_segments_lost_voxels(mod, served):
    scene, volume, seg, logic, plus = _scene(mod, served)
    before = _masks(mod, seg)
    _click(plus, (12, 10, 5))
    logic.prompt_points(volume, seg, plus, None)
    obj = logic.mask.copy()
    counts = _expected_counts(before, obj)

    kept = logic.set_prompt_model(None, segmentation_node=seg)  # the module ends the object (Overwrite all)
    assert kept
    name = seg.GetSegmentation().GetSegment(kept).GetName()
    after = _masks(mod, seg)
    assert not (after["drawn"] & obj).any()  # the rule stays: the hand-drawn segment lost those voxels ...
    notice = logic.take_notice()  # ... and it is said, naming each segment and how many
    _says_counts(notice, counts)
    assert f"'{name}'" in notice, notice
    assert logic.take_notice() is None  # told once


def test_the_widgets_status_line_names_the_segments_that_lost_voxels_on_a_switch_of_model(mod, served):
    scene, volume, seg, logic, plus = _scene(mod, served)
    before = _masks(mod, seg)
    _click(plus, (12, 10, 5))
    logic.prompt_points(volume, seg, plus, None)
    counts = _expected_counts(before, logic.mask)

    widget = mod.MambaHoMEWidget()  # the Widget's onPromptModel with its form stood in for (no Qt here)
    widget.logic = widget_logic = logic
    items = {0: "", 1: "echo"}
    widget.ui = types.SimpleNamespace(
        promptModelComboBox=types.SimpleNamespace(itemData=lambda i: items[i]),
        segmentationSelector=types.SimpleNamespace(currentNode=lambda: seg))
    shown = []
    widget._status = shown.append
    widget.onPromptModel(0)  # the server's rule: the echo object ends
    assert widget_logic.prompt_model is None
    assert shown and "next prompt starts a new object" in shown[-1]
    _says_counts(shown[-1], counts)
    # the docstrings no longer promise the segment "stays (exactly) as drawn"
    for fn in (mod.MambaHoMEWidget.onPromptModel, mod.MambaHoMELogic.set_prompt_model):
        doc = " ".join((fn.__doc__ or "").split())
        assert "stays as drawn" not in doc and "exactly as drawn" not in doc, fn.__name__


def test_an_object_ended_by_a_switch_of_volume_says_which_segments_lost_voxels(mod, served):
    scene, volume, seg, logic, plus = _scene(mod, served)
    before = _masks(mod, seg)
    _click(plus, (12, 10, 5))
    logic.prompt_points(volume, seg, plus, None)
    obj = logic.mask.copy()
    counts = _expected_counts(before, obj)
    other = int16_volume_node(scene, np.random.default_rng(1).integers(0, 100, SHAPE), AFFINE, "ct2")
    _click(plus, (3, 3, 14))  # on the other volume (same grid): the first object ends in the node written to
    logic.prompt_points(other, seg, plus, None)
    _says_counts(logic.take_notice(), counts)


# ---------------------------------------------------------------------------------------------------- 2
def test_an_accepted_segment_renamed_back_to_the_working_name_survives_the_next_prompt(mod, served):
    scene, volume, seg, logic, plus = _scene(mod, served)
    _click(plus, (12, 10, 5))
    logic.prompt_points(volume, seg, plus, None)
    obj = logic.mask.copy()
    accepted = _ids(seg)[mod.INTERACTIVE_SEGMENT]
    segment = seg.GetSegmentation().GetSegment(accepted)
    segment.SetName("lesion")  # accepted
    assert _tag(mod, seg, accepted) == "accepted"
    segment.SetName(mod.INTERACTIVE_SEGMENT)  # ... and renamed back (by mistake, or to look at it)

    _click(plus, (4, 5, 10))
    logic.prompt_points(volume, seg, plus, None)
    new = logic.mask.copy()
    assert new.any() and not (new & obj).any()
    segs = _by_id(mod, seg)
    assert accepted in segs, "the accepted segment was deleted by the next prompt"
    assert segs[accepted][0] == mod.INTERACTIVE_SEGMENT and np.array_equal(segs[accepted][1], obj)
    assert _tag(mod, seg, accepted) == "accepted"
    opened = [sid for sid, (name, _) in segs.items() if sid != accepted and _tag(mod, seg, sid) == "open"]
    assert len(opened) == 1 and np.array_equal(segs[opened[0]][1], new)

    # a further prompt and the end of the object leave it alone too
    _click(plus, (5, 5, 10))
    logic.prompt_points(volume, seg, plus, None)
    logic.set_prompt_model(None, segmentation_node=seg)
    segs = _by_id(mod, seg)
    assert segs[accepted][0] == mod.INTERACTIVE_SEGMENT and np.array_equal(segs[accepted][1], obj)


# ---------------------------------------------------------------------------------------------------- 3
def test_undo_right_after_an_accept_says_there_is_nothing_to_undo_and_touches_nothing(mod, served):
    scene, volume, seg, logic, plus = _scene(mod, served)
    _click(plus, (12, 10, 5))
    logic.prompt_points(volume, seg, plus, None)
    seg.GetSegmentation().GetSegment(_ids(seg)[mod.INTERACTIVE_SEGMENT]).SetName("lesion")  # accepted
    before = _by_id(mod, seg)

    calls = []
    client = logic.client
    for name in ("reset", "undo"):
        real = getattr(client, name)

        def spy(*a, _real=real, _name=name, **kw):
            calls.append(_name)
            return _real(*a, **kw)

        setattr(client, name, spy)

    with pytest.raises(Exception) as err:
        logic.undo(volume, seg)
    message = str(err.value)
    assert "nothing to undo" in message.lower() and "HTTP" not in message, message
    assert "lesion" in message, message
    assert calls == [], "the server was asked for a reset/undo that could only fail"
    after = _by_id(mod, seg)
    assert sorted(after) == sorted(before), "the node changed (an empty working segment was written)"
    assert mod.INTERACTIVE_SEGMENT not in {name for name, _ in after.values()}
    for sid, (name, mask) in before.items():
        assert after[sid][0] == name and np.array_equal(after[sid][1], mask)

    # the next prompt still starts a new object (a reset first), and its Undo works as before
    _click(plus, (4, 5, 10))
    logic.prompt_points(volume, seg, plus, None)
    assert calls == ["reset"] and logic.mask.any()
    logic.undo(volume, seg)
    assert calls == ["reset", "undo"] and not logic.mask.any()
