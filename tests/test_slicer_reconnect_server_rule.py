"""A reconnect ends the open prompted object whichever model answers prompts: its segment is kept (renamed
*MambaHoME interactive (model)*), accepted (it takes its voxels from the other segments, said on the status line) and
the next prompt starts a new object. Real MRML classes (``slicer-core``), a live server on the CPU with the
deterministic "echo" promptable model, the Widget's Connect flow with its form stood in for (no Qt here): ``connect``
and the model list on a worker thread, then ``_connected`` on this (the GUI) thread.

The defect: with the prompt model left to the server's choice, a reconnect ended the object only in the Logic; its
segment stayed the open *MambaHoME interactive* (not renamed, not accepted, overlapping the other segments, nothing
said) until the next prompt, and a prompt into another segmentation node left it open for good, to be overwritten by a
later prompt into its node. A chosen model ended it at once (the Widget sets the chosen model again after Connect).
Undo right after a reconnect (either way) sent an undo into the new session: "HTTP 400: nothing to undo"."""
from __future__ import annotations

import threading
import types

import numpy as np
import pytest

from slicer_support import load_module  # noqa: F401 - skips first
import vtk  # noqa: E402

from test_slicer_accept_followups import _expected_counts, _says_counts  # noqa: E402
from test_slicer_accept_overwrites import TOKEN, _click, _ids, _masks, _scene, mod, served  # noqa: E402, F401 - the scene's fixtures

pytest.importorskip("engine.interactive")


class Combo:
    """The few QComboBox calls the Widget's model lists make."""

    def __init__(self, items=()) -> None:
        self.items, self.index = list(items), 0

    def clear(self) -> None:
        self.items, self.index = [], -1

    def addItem(self, text, data=None) -> None:  # noqa: N802 - Qt's name
        self.items.append((text, data))
        if self.index < 0:
            self.index = 0

    def findData(self, data) -> int:  # noqa: N802
        return next((n for n, (_, d) in enumerate(self.items) if d == data), -1)

    def setCurrentIndex(self, index) -> None:  # noqa: N802
        self.index = index

    def itemData(self, index):  # noqa: N802
        return self.items[index][1]

    @property
    def currentData(self):  # noqa: N802
        return self.items[self.index][1] if 0 <= self.index < len(self.items) else None


def _widget(mod, logic, seg, prompt_model):
    widget = mod.MambaHoMEWidget()
    widget.logic = logic
    rule = (mod.SERVER_RULE_LABEL, "")
    prompt_combo = Combo([rule, ("echo (echo-stand-in)", "echo")])
    prompt_combo.setCurrentIndex(prompt_combo.findData(prompt_model or ""))
    widget.ui = types.SimpleNamespace(modelComboBox=Combo(), promptModelComboBox=prompt_combo,
                                      segmentationSelector=types.SimpleNamespace(currentNode=lambda: seg))
    shown = []
    widget._status = shown.append
    return widget, shown


def _connect_as_the_widget_does(widget, url) -> None:
    """onConnect: connect and list the models on a worker thread; then _connected on the GUI thread."""
    box = {}

    def work() -> None:
        box["result"] = (widget.logic.connect(url, TOKEN), widget.logic.models())

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(timeout=60)
    widget._connected(box["result"])


@pytest.mark.parametrize("prompt_model", [None, "echo"], ids=["server-rule", "chosen-model"])
def test_a_reconnect_ends_the_open_object_and_keeps_it_as_a_segment(mod, served, prompt_model):
    scene, volume, seg, logic, plus = _scene(mod, served)
    logic.set_prompt_model(prompt_model, segmentation_node=seg)
    widget, shown = _widget(mod, logic, seg, prompt_model)
    before = _masks(mod, seg)
    _click(plus, (12, 10, 5))
    (update,) = logic.prompt_points(volume, seg, plus, None)
    assert update.model_id == "echo"  # the server's rule picks the echo model too
    obj = logic.mask.copy()
    counts = _expected_counts(before, obj)
    object_id = _ids(seg)[mod.INTERACTIVE_SEGMENT]

    _connect_as_the_widget_does(widget, served)

    assert logic.prompt_model == prompt_model  # the Widget kept the choice
    kept = f"{mod.INTERACTIVE_SEGMENT} (echo)"
    ids = _ids(seg)
    assert mod.INTERACTIVE_SEGMENT not in ids, "the open object's segment is still open after the reconnect"
    assert ids[kept] == object_id
    tag = vtk.mutable("")
    assert seg.GetSegmentation().GetSegment(object_id).GetTag(mod.OBJECT_TAG, tag) and str(tag) == "accepted"
    after = _masks(mod, seg)
    assert np.array_equal(after[kept], obj)
    for name, mask in before.items():  # accepted: the other segments lost the object's voxels
        assert np.array_equal(after[name], mask & ~obj), name
    assert shown and shown[-1].startswith("Connected: server"), shown
    _says_counts(shown[-1], counts)  # said on the status line of the connect, as after a switch of model
    assert logic.take_notice() is None

    # Undo has nothing to take back, naming the kept segment; the next prompt starts a new object (the first click is
    # not sent again) and leaves the kept segment alone
    with pytest.raises(mod.NothingToUndoError, match="accepted as segment 'MambaHoME interactive \\(echo\\)'"):
        logic.undo(volume, seg)
    _click(plus, (4, 5, 10))
    (update,) = logic.prompt_points(volume, seg, plus, None)
    assert not logic.mask[12, 10, 5] and logic.mask[4, 5, 10]
    masks = _masks(mod, seg)
    assert np.array_equal(masks[kept], obj) and set(masks) == set(after) | {mod.INTERACTIVE_SEGMENT}


def test_after_a_reconnect_a_prompt_into_another_node_leaves_the_first_nodes_object_kept(mod, served):
    """The object ended by the reconnect is kept in its own node, not in the node the next prompt writes to: a later
    prompt into its node does not overwrite it."""
    scene, volume, seg, logic, plus = _scene(mod, served)
    logic.set_prompt_model(None, segmentation_node=seg)
    widget, shown = _widget(mod, logic, seg, None)
    _click(plus, (12, 10, 5))
    logic.prompt_points(volume, seg, plus, None)
    obj = logic.mask.copy()
    other = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "another output")
    widget.ui.segmentationSelector = types.SimpleNamespace(currentNode=lambda: other)  # the user chose another output

    _connect_as_the_widget_does(widget, served)
    _click(plus, (4, 5, 10))
    logic.prompt_points(volume, other, plus, None)  # into the other node
    _click(plus, (20, 15, 12))
    logic.prompt_points(volume, seg, plus, None)  # back into the first node: a new object there

    masks = _masks(mod, seg)
    kept = f"{mod.INTERACTIVE_SEGMENT} (echo)"
    assert kept in masks and np.array_equal(masks[kept], obj), "the first object was overwritten"
