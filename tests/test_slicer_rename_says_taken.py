"""An object the user accepts by renaming it in the Segment Editor says which segments lost voxels to it, as an object
the module ends does (``MambaHoMELogic.taken_text`` through the notice); real MRML classes (``slicer-core``), a live
server on the CPU with the deterministic "echo" promptable model.

The defect: the rename observer accepted the object (it took its voxels from the automatic and hand-drawn segments,
Slicer's *Overwrite all*) and threw the counts away: nothing was said, while the same accept after a switch of model
named each segment and how many voxels it lost. Now the Logic's notice says it, and the Widget puts it on its status
line at once (the user is in the Segment Editor, not pressing one of this module's buttons)."""
from __future__ import annotations

import types

import numpy as np
import pytest

from slicer_support import load_module  # noqa: F401 - skips first

from test_slicer_accept_followups import _expected_counts, _says_counts  # noqa: E402
from test_slicer_accept_overwrites import _click, _ids, _masks, _scene, mod, served  # noqa: E402, F401 - the scene's fixtures

pytest.importorskip("engine.interactive")


def test_a_renamed_object_says_which_segments_lost_voxels(mod, served):
    scene, volume, seg, logic, plus = _scene(mod, served)
    before = _masks(mod, seg)
    _click(plus, (12, 10, 5))
    logic.prompt_points(volume, seg, plus, None)
    obj = logic.mask.copy()
    counts = _expected_counts(before, obj)
    assert logic.take_notice() is None

    seg.GetSegmentation().GetSegment(_ids(seg)[mod.INTERACTIVE_SEGMENT]).SetName("lesion")  # the user accepts it

    after = _masks(mod, seg)
    assert not (after["drawn"] & obj).any()  # taken, as before ...
    notice = logic.take_notice()  # ... and said, naming each segment and how many, and the accepted segment
    _says_counts(notice, counts)
    assert "'lesion'" in notice and "Overwrite all" in notice, notice
    assert logic.take_notice() is None  # told once


def test_a_renamed_object_that_took_nothing_says_nothing(mod, served):
    scene, volume, seg, logic, plus = _scene(mod, served)
    _click(plus, (23, 19, 15))  # far from every other segment
    logic.prompt_points(volume, seg, plus, None)
    obj = logic.mask.copy()
    others = [m for name, m in _masks(mod, seg).items() if name != mod.INTERACTIVE_SEGMENT]
    assert obj.any() and not any((m & obj).any() for m in others), "the test needs an object over no other segment"
    seg.GetSegmentation().GetSegment(_ids(seg)[mod.INTERACTIVE_SEGMENT]).SetName("lesion")
    assert logic.take_notice() is None


def test_the_widgets_status_line_says_it_as_soon_as_the_object_is_renamed(mod, served):
    scene, volume, seg, logic, plus = _scene(mod, served)
    before = _masks(mod, seg)
    _click(plus, (12, 10, 5))
    logic.prompt_points(volume, seg, plus, None)
    counts = _expected_counts(before, logic.mask)

    widget = mod.MambaHoMEWidget()  # the Widget without its form (no Qt here): its status line stood in for
    widget.ui = types.SimpleNamespace()
    shown = []
    widget._status = shown.append
    widget._useLogic(logic)  # as setup() takes its Logic

    seg.GetSegmentation().GetSegment(_ids(seg)[mod.INTERACTIVE_SEGMENT]).SetName("lesion")  # in the Segment Editor
    lesion = _masks(mod, seg)["lesion"]

    assert len(shown) == 1, shown
    _says_counts(shown[0], counts)
    assert "'lesion'" in shown[0]
    assert logic.take_notice() is None  # shown, not kept for a later dialog

    # the next prompt starts a new object and says nothing of the old one
    _click(plus, (4, 5, 10))
    logic.prompt_points(volume, seg, plus, None)
    assert logic.take_notice() is None and len(shown) == 1
    assert np.array_equal(_masks(mod, seg)["lesion"], lesion)
