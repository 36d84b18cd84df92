"""An annotator's fifth walk on the real upper-abdomen CT (3 mm, opened with the plugin's reader), what the dock said or
offered that it should not have:

* Enter on a prompted object said "object 1 accepted; prompt the next one", and a moment later the status line read
  "next object: object updated" (the answer of the model's reset for the next object), which reads as if the accepted
  object had been changed again;
* the Correct section's Undo said "undid the last edit of '<labels>'" when there was nothing left to undo;
* with no labels layer at all (only the CT open), every Correct button (add / rename / colour / remove a class, the
  helpers, Undo) was enabled, and each press only answered with an error.

Run under a virtual display: ``xvfb-run -a python -m pytest tests/test_napari_walk5_messages_and_buttons.py``. The real
data is found through ``MAMBAHOME_SHARED_DATA`` (default ``../shared/data``); the tests skip without it. Prompts go
through the deterministic stand-in network of tests/test_plugin_interactive.py (``Echo``).
"""
from __future__ import annotations

import numpy as np
import pytest

from plugin_support import (  # noqa: F401 - fixtures
    modality_questions, needs_display, notifications, plugin_env, tiny_checkpoint, viewer_widget,
)
from test_plugin_interactive import Echo, interactive_checkpoint  # noqa: F401 - fixture

pytestmark = pytest.mark.gui


def _open_ct(viewer, shared_data):
    return viewer.open(str(shared_data / "abdomen_ct_mr" / "ct_image.nii.gz"), plugin="napari-mambahome")[0]


def _idle(qtbot, panel, timeout=30_000):
    qtbot.waitUntil(lambda: panel.worker is None and not (panel.ctx and panel.ctx.queue), timeout=timeout)
    qtbot.wait(50)


def test_accepting_an_object_keeps_saying_it_was_accepted(viewer_widget, interactive_checkpoint, shared_data, qtbot):
    viewer, widget = viewer_widget
    widget.session.prompt_backend_factory = Echo()
    image = _open_ct(viewer, shared_data)
    panel = widget.panels["interactive"]
    assert panel.load_model(interactive_checkpoint) is not None
    assert panel.start()
    _idle(qtbot, panel)
    centre = np.asarray([s // 2 for s in np.shape(image.data)], float)
    panel.points_layer.add(centre)  # a click on the liver side of the CT
    _idle(qtbot, panel)
    assert np.asarray(panel.target.data).any()
    assert panel.accept_object()  # Enter
    _idle(qtbot, panel)  # the model's reset for the next object has answered
    text = widget.status_label.text()
    assert "object 1 accepted" in text and "next object" not in text, text


def test_correct_undo_with_nothing_to_undo_says_so(viewer_widget, shared_data):
    viewer, widget = viewer_widget
    _open_ct(viewer, shared_data)
    labels = viewer.open(str(shared_data / "abdomen_ct_mr" / "ct_label_auto.nii.gz"), plugin="napari-mambahome")[0]
    correct = widget.panels["correct"]
    before = np.array(labels.data, copy=True)
    labels.selected_label = 5
    with labels.block_history():  # one brush stroke, as napari records a mouse drag
        labels.paint((19, 60, 60), 5)
    assert np.count_nonzero(np.asarray(labels.data) != before)
    correct.undo_button.click()
    np.testing.assert_array_equal(np.asarray(labels.data), before)
    assert "undid the last edit of 'ct_label_auto'" in widget.status_label.text()
    correct.undo_button.click()  # nothing left: the status must not claim an edit was undone
    text = widget.status_label.text()
    assert "undid" not in text and "nothing to undo" in text, text
    np.testing.assert_array_equal(np.asarray(labels.data), before)


def test_correct_buttons_are_greyed_out_without_a_labels_layer(viewer_widget, shared_data, qtbot):
    viewer, widget = viewer_widget
    correct = widget.panels["correct"]
    buttons = [correct.add_class_button, correct.rename_class_button, correct.recolour_class_button,
               correct.remove_class_button, correct.undo_button, *correct.helper_buttons.values()]
    image = _open_ct(viewer, shared_data)
    assert widget.session.labels_layer is None
    assert not [b.text() for b in buttons if b.isEnabled()]  # nothing to add a class to, correct or undo
    labels = viewer.open(str(shared_data / "abdomen_ct_mr" / "ct_label_auto.nii.gz"), plugin="napari-mambahome")[0]
    assert widget.session.labels_layer is labels
    assert all(b.isEnabled() for b in buttons)
    viewer.layers.remove(labels)  # the labels layer closed: greyed out again
    qtbot.wait(20)
    assert widget.session.labels_layer is None and widget.session.image_layer is image
    assert not [b.text() for b in buttons if b.isEnabled()]
