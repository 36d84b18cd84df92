"""Ctrl+Z after accepting an object: the predictions drew the object straight into the labels' data, outside
napari's history, so neither the panel's Undo ("nothing to undo") nor napari's Ctrl+Z in the labels layer could take
an accepted object back; only painting it out by hand could. Accepting now records the object as one napari edit.

On a real MRI opened with our reader, prompted through GuidanceEcho (object = a ball around positive clicks):
``xvfb-run -a python -m pytest tests/test_napari_undo_accepted_object.py``.
"""
from __future__ import annotations

import numpy as np
import pytest
from napari.utils.key_bindings import KeyBinding

from napari_mambahome._geometry import META_KEY
from napari_mambahome.prompting import INTERACTIVE_KEY
from plugin_support import (  # noqa: F401 - fixtures
    modality_questions, needs_display, notifications, plugin_env, status_messages, tiny_checkpoint, viewer_widget,
)
from test_napari_removed_labels_and_undo import _prompted_object
from test_plugin_interactive import (  # noqa: F401 - fixtures
    _idle, interactive_checkpoint, prompting,
)

pytestmark = pytest.mark.gui


def _ctrl_z(panel):
    panel.points_layer.keymap[KeyBinding.from_str("Control-Z")](panel.points_layer)


def _accepted_object(prompting, qtbot):
    """One click at the image's centre, the object accepted (Enter): its centre and labels layer."""
    panel = prompting[2]
    c, target = _prompted_object(prompting, qtbot)
    assert panel.accept_object()
    _idle(qtbot, panel)
    return c, target


def test_ctrl_z_after_accept_takes_the_object_back_and_redo_brings_it_back(prompting, qtbot):
    viewer, widget, panel, image, echo = prompting
    seen = status_messages(widget)
    c, target = _prompted_object(prompting, qtbot)
    panel.add_point(c + (0, 2, 0))
    _idle(qtbot, panel)
    assert panel.accept_object()
    _idle(qtbot, panel)
    first = np.asarray(target.data).copy()
    assert (first == panel.class_id).sum() > 0 and panel.objects_accepted == 1 and panel.prompts_accepted == 2
    assert target.metadata[META_KEY][INTERACTIVE_KEY]["objects"] == 1

    panel.add_point(c + (0, 0, 12))  # a second object, its one prompt
    _idle(qtbot, panel)
    assert panel.accept_object()
    _idle(qtbot, panel)
    both = np.asarray(target.data).copy()
    assert panel.objects_accepted == 2 and not np.array_equal(both, first)

    _ctrl_z(panel)  # no prompt in effect: the second object goes, whole
    _idle(qtbot, panel)
    np.testing.assert_array_equal(np.asarray(target.data), first)
    assert panel.objects_accepted == 1 and panel.prompts_accepted == 2
    assert target.metadata[META_KEY][INTERACTIVE_KEY]["objects"] == 1
    assert "1 object(s) accepted" in panel.count_label.text()
    assert any("accepted object was taken back" in m for m in seen), seen

    _ctrl_z(panel)  # and then the first
    _idle(qtbot, panel)
    assert not np.asarray(target.data).any()  # the first object was drawn in new labels
    assert panel.objects_accepted == 0 and INTERACTIVE_KEY not in target.metadata[META_KEY]

    target.redo()  # napari's Ctrl+Shift+Z in the labels layer
    _idle(qtbot, panel)
    np.testing.assert_array_equal(np.asarray(target.data), first)
    assert panel.objects_accepted == 1 and target.metadata[META_KEY][INTERACTIVE_KEY]["objects"] == 1

    # the next object is prompted over the labels as they are now (the first object, not the undone second)
    panel.add_point(c + (0, 0, -12))
    _idle(qtbot, panel)
    labels = np.asarray(target.data)
    np.testing.assert_array_equal(labels[first != 0], first[first != 0])
    assert not labels[(both != 0) & (first == 0)].any()  # the undone second object stays undone
    assert (labels[(labels != 0) & (first == 0)] == panel.class_id).any()


def test_ctrl_z_undoes_a_brush_stroke_made_after_accepting_before_the_object(prompting, qtbot):
    viewer, widget, panel, image, echo = prompting
    seen = status_messages(widget)
    c, target = _accepted_object(prompting, qtbot)
    accepted = np.asarray(target.data).copy()
    target.brush_size = 3
    target.paint(tuple(int(v) for v in c + (0, 10, 0)), 1)  # the annotator paints after accepting
    assert not np.array_equal(np.asarray(target.data), accepted)
    _ctrl_z(panel)  # the stroke first, as Ctrl+Z in the labels layer
    _idle(qtbot, panel)
    np.testing.assert_array_equal(np.asarray(target.data), accepted)
    assert panel.objects_accepted == 1 and "undid the last edit of" in seen[-1], seen
    _ctrl_z(panel)  # then the object
    _idle(qtbot, panel)
    assert not np.asarray(target.data).any() and panel.objects_accepted == 0
    _ctrl_z(panel)
    _idle(qtbot, panel)
    assert "nothing to undo" in seen[-1]


@pytest.mark.parametrize("masked_atom", [True, False])  # napari >= 0.6's box-and-mask history, and the older one
def test_record_applied_edit_undoes_and_redoes_exactly(masked_atom, monkeypatch):
    import builtins

    from napari.layers import Labels

    from napari_mambahome._history import record_applied_edit

    if not masked_atom:
        real_import = builtins.__import__

        def no_masked_atom(name, globals=None, locals=None, fromlist=(), level=0):
            if name == "napari.layers.labels.labels" and fromlist and "_MaskedPaintAtom" in fromlist:
                raise ImportError("an older napari")
            return real_import(name, globals, locals, fromlist, level)

        monkeypatch.setattr(builtins, "__import__", no_masked_atom)
    before = np.zeros((12, 14, 16), np.uint8)
    before[2:5, 2:5, 2:5] = 3  # another class the object does not cover
    layer = Labels(before.copy())
    key = (slice(4, 9), slice(3, 10), slice(5, 12))
    layer.data[key] = np.where(layer.data[key] == 0, 2, layer.data[key])  # the object, drawn outside the history
    after = layer.data.copy()
    changed = after[key] != before[key]
    painted = []
    layer.events.paint.connect(lambda e: painted.append(e.value))
    atom = record_applied_edit(layer, key, changed, before[key][changed], 2)
    assert atom is not None and len(painted) == 1
    np.testing.assert_array_equal(layer.data, after)  # recording changes nothing
    layer.undo()
    np.testing.assert_array_equal(layer.data, before)
    layer.redo()
    np.testing.assert_array_equal(layer.data, after)
    assert record_applied_edit(layer, key, np.zeros_like(changed), np.empty(0, np.uint8), 2) is None


def test_mask_box_is_the_tight_bounding_box():
    from napari_mambahome.panels.interactive import _mask_box

    mask = np.zeros((20, 30, 40), bool)
    assert _mask_box(mask) is None
    mask[3, 7, 9] = mask[11, 4, 30] = True
    assert _mask_box(mask) == (slice(3, 12), slice(4, 8), slice(9, 31))


def test_ctrl_z_at_once_after_enter_takes_the_object_back(prompting, qtbot):
    """Enter queues the model's reset for the next object; Ctrl+Z pressed before it ran said "nothing to undo"."""
    viewer, widget, panel, image, echo = prompting
    c, target = _prompted_object(prompting, qtbot)
    _press_enter_then_ctrl_z(panel)
    _idle(qtbot, panel)
    assert not np.asarray(target.data).any() and panel.objects_accepted == 0


def _press_enter_then_ctrl_z(panel):
    panel.points_layer.keymap[KeyBinding.from_str("Enter")](panel.points_layer)
    _ctrl_z(panel)  # no event loop in between: the reset Enter queued has not run


def test_undo_and_redo_of_an_accepted_object_take_the_saved_mark_away(prompting, qtbot):
    from napari_mambahome._session import mark_saved, saved_as

    viewer, widget, panel, image, echo = prompting
    c, target = _accepted_object(prompting, qtbot)
    mark_saved(target.metadata, "case x in /cases")  # as saving the case does
    _ctrl_z(panel)
    _idle(qtbot, panel)
    assert saved_as(target) is None  # the labels are no longer the saved case's
    mark_saved(target.metadata, "case x in /cases")
    target.redo()
    assert saved_as(target) is None


def test_an_erase_stroke_undone_after_its_object_was_taken_back_brings_none_of_it_back(prompting, qtbot):
    viewer, widget, panel, image, echo = prompting
    c, target = _prompted_object(prompting, qtbot)
    target.brush_size = 3
    target.paint(tuple(int(v) for v in c), 0)  # the annotator erases part of the object while prompting it
    erased = np.asarray(target.data).copy()
    assert (erased == panel.class_id).any()
    assert panel.accept_object()
    _idle(qtbot, panel)
    _ctrl_z(panel)  # the object goes
    _idle(qtbot, panel)
    assert not np.asarray(target.data).any()
    _ctrl_z(panel)  # then the erase stroke: it erased object voxels, which are gone with the object
    _idle(qtbot, panel)
    assert not np.asarray(target.data).any(), np.count_nonzero(np.asarray(target.data))


def test_a_new_prompt_after_taking_an_object_back_ends_its_redo(prompting, qtbot):
    viewer, widget, panel, image, echo = prompting
    c, target = _accepted_object(prompting, qtbot)
    _ctrl_z(panel)
    _idle(qtbot, panel)
    panel.add_point(c + (0, 0, 12))  # a new object: a new edit of the labels
    _idle(qtbot, panel)
    now = np.asarray(target.data).copy()
    target.redo()  # napari's Ctrl+Shift+Z: nothing to redo any more, as after a brush stroke
    np.testing.assert_array_equal(np.asarray(target.data), now)
    assert panel.objects_accepted == 0


def _ctrl_shift_z(panel):
    panel.points_layer.keymap[KeyBinding.from_str("Control-Shift-Z")](panel.points_layer)


def test_ctrl_shift_z_on_a_prompt_layer_redoes_an_object_taken_back_and_says_when_it_cannot(prompting, qtbot):
    """Ctrl+Shift+Z on the prompt layers did nothing and said nothing; it now redoes what Ctrl+Z took back of the
    labels (an accepted object) and says that an undone prompt is not redone."""
    viewer, widget, panel, image, echo = prompting
    seen = status_messages(widget)
    c, target = _accepted_object(prompting, qtbot)
    accepted = np.asarray(target.data).copy()
    _ctrl_z(panel)
    _idle(qtbot, panel)
    assert not np.asarray(target.data).any() and panel.objects_accepted == 0
    _ctrl_shift_z(panel)
    _idle(qtbot, panel)
    np.testing.assert_array_equal(np.asarray(target.data), accepted)
    assert panel.objects_accepted == 1

    panel.add_point(c + (0, 0, 12))  # a prompt, taken back: not redone, and said so
    _idle(qtbot, panel)
    _ctrl_z(panel)
    _idle(qtbot, panel)
    seen.clear()
    _ctrl_shift_z(panel)
    _idle(qtbot, panel)
    np.testing.assert_array_equal(np.asarray(target.data), accepted)
    assert any(m.startswith("nothing to redo: a prompt taken back is not redone") for m in seen), seen
