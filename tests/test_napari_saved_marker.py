"""The annotator's "saved" mark and the labels the next prompt draws into, on a real MRI opened with our reader:

* a labels layer written by napari's File > Save Selected Layers (our writer) or by 'Save as training case' and then
  removed is announced as saved (with where), not as removed "with unsaved edits"; the next edit takes the mark away;
* choosing another labels layer while an object is prompted, or restoring a removed mask then, ends the object in
  its labels and the next prompt draws into the chosen (restored) labels.

Run under a virtual display: ``xvfb-run -a python -m pytest tests/test_napari_saved_marker.py``.
"""
from __future__ import annotations

import numpy as np
import pytest

from plugin_support import (  # noqa: F401 - fixtures
    modality_questions, needs_display, notifications, plugin_env, tiny_checkpoint, viewer_widget, wait_job,
)
from test_plugin_interactive import (  # noqa: F401 - fixtures
    RADIUS, _ball_in_display, _centre, _idle, _open, interactive_checkpoint, prompting,
)
from test_napari_removed_labels_and_undo import _stroke

pytestmark = pytest.mark.gui


def _removal_message(notifications, name):
    found = [m for s, m in notifications if "Restore removed mask" in m and f"'{name}'" in m]
    assert found, notifications
    return found[-1]


def _prompted(prompting, qtbot, offset=(0, 0, 0)):
    viewer, widget, panel, image, echo = prompting
    c = np.asarray(_centre(image)) + np.asarray(offset)
    panel.add_point(c)
    _idle(qtbot, panel)
    return c, panel.target


def test_labels_saved_with_napari_then_removed_are_announced_as_saved(prompting, qtbot, notifications, tmp_path):
    viewer, widget, panel, image, echo = prompting
    session = widget.session
    c, target = _prompted(prompting, qtbot)
    _stroke(target, c + (0, RADIUS + 3, 0), 1)
    viewer.layers.selection = {target}
    [written] = viewer.layers.save(str(tmp_path / "mine.nii.gz"), selected=True, plugin="napari-mambahome")
    assert written == str(tmp_path / "mine.nii.gz")
    name = target.name
    viewer.layers.remove(target)
    qtbot.wait(50)
    message = _removal_message(notifications, name)
    assert f"(saved as {written})" in message and "unsaved" not in message, message
    assert len(session.removed_labels()) == 1  # still kept, to be offered back
    # restored, it still says where it was saved; an edit takes the mark away
    restored = session.restore_removed_labels()
    assert restored.metadata["mambahome"].get("saved") == written
    _stroke(restored, c + (0, -RADIUS - 3, 0), 1)
    assert "saved" not in restored.metadata["mambahome"]
    viewer.layers.remove(restored)
    qtbot.wait(50)
    message = _removal_message(notifications, name)
    assert "with unsaved edits" in message and "saved as" not in message, message


def test_a_prompt_after_saving_takes_the_saved_mark_away(prompting, qtbot, notifications, tmp_path):
    from napari.plugins.io import save_layers

    viewer, widget, panel, image, echo = prompting
    c, target = _prompted(prompting, qtbot)
    [written] = save_layers(str(tmp_path / "mine.nrrd"), [target], plugin="napari-mambahome")
    assert target.metadata["mambahome"]["saved"] == written
    panel.add_point(c + (0, 0, 2 * RADIUS + 4))  # the object is drawn outside napari's paint events
    _idle(qtbot, panel)
    assert "saved" not in target.metadata["mambahome"]
    name = target.name
    viewer.layers.remove(target)
    qtbot.wait(50)
    assert "with unsaved edits" in _removal_message(notifications, name)


def test_labels_saved_as_a_case_then_removed_are_announced_as_saved(prompting, qtbot, notifications, plugin_env):
    viewer, widget, panel, image, echo = prompting
    c, target = _prompted(prompting, qtbot)
    panel.save_case()
    _idle(qtbot, panel)
    job = wait_job(qtbot, widget)
    assert job.outcome == "done"
    case_id = job.result.case_id if hasattr(job.result, "case_id") else job.result.value.case_id
    saved = target.metadata["mambahome"].get("saved")
    assert saved and saved.startswith(f"case {case_id} in ")
    name = target.name
    viewer.layers.remove(target)
    qtbot.wait(50)
    message = _removal_message(notifications, name)
    assert f"(saved as case {case_id} in " in message and "unsaved" not in message, message


# ---------------------------------------------------------------- the labels the next prompt draws into
def test_choosing_other_labels_while_prompting_sends_the_next_prompt_there(prompting, qtbot):
    viewer, widget, panel, image, echo = prompting
    session = widget.session
    c, first = _prompted(prompting, qtbot)
    first_data = np.array(first.data, copy=True)
    other = viewer.add_labels(np.zeros(np.shape(image.data), np.uint8), name="other labels", scale=image.scale,
                              translate=image.translate)
    widget.panels["correct"].labels_combo.setCurrentText(other.name)  # the annotator chooses other labels
    assert session.labels_layer is other
    spot = c + (0, 0, 2 * RADIUS + 4)
    panel.add_point(spot)
    _idle(qtbot, panel)
    assert panel.target is other
    np.testing.assert_array_equal(np.asarray(first.data), first_data)  # the first object stays where it was
    np.testing.assert_array_equal(np.asarray(other.data) != 0,
                                  _ball_in_display(np.shape(other.data), tuple(spot), RADIUS))


def test_restoring_a_removed_mask_while_prompting_in_new_labels_sends_the_next_prompt_to_it(prompting, qtbot):
    viewer, widget, panel, image, echo = prompting
    session = widget.session
    c, first = _prompted(prompting, qtbot)
    first_data = np.array(first.data, copy=True)
    viewer.layers.remove(first)  # removed mid-prompting
    qtbot.wait(20)
    spot = c + (0, 0, 2 * RADIUS + 4)
    panel.add_point(spot)  # prompted again: new labels
    _idle(qtbot, panel)
    second = panel.target
    assert second is not None and second is not first
    second_data = np.array(second.data, copy=True)
    widget.panels["correct"].restore_button.click()
    restored = session.labels_layer
    assert restored is not second and restored.name.startswith(first.name)  # napari adds " [1]" to a taken name
    np.testing.assert_array_equal(np.asarray(restored.data), first_data)
    third = c + (0, 0, -2 * RADIUS - 4)
    panel.add_point(third)
    _idle(qtbot, panel)
    assert panel.target is restored
    np.testing.assert_array_equal(np.asarray(second.data), second_data)  # nothing more drawn into the new labels
    np.testing.assert_array_equal(np.asarray(restored.data) != 0,
                                  (first_data != 0) | _ball_in_display(np.shape(first_data), tuple(third), RADIUS))


def test_saving_a_case_after_every_object_was_accepted_says_no_refusal(prompting, qtbot, plugin_env):
    """'Save as training case' with every object accepted (N, then Save) showed "no object to accept yet: click on the
    structure ... first" before "saving the case…": the save accepts an open object first, and none was open."""
    viewer, widget, panel, image, echo = prompting
    statuses = []
    widget.session.status.connect(statuses.append)
    _prompted(prompting, qtbot)
    assert panel.accept_object()
    _idle(qtbot, panel)
    statuses.clear()
    panel.save_case()
    _idle(qtbot, panel)
    job = wait_job(qtbot, widget)
    assert job.outcome == "done"
    assert not [s for s in statuses if "no object to accept" in s], statuses


def test_choosing_another_modality_while_prompting_restarts_with_it(prompting, qtbot):
    """The network sees the image normalised by its modality, fixed when prompting starts: choosing CT in the Segment
    section for the MRI being prompted was ignored (the next click gave the MR-normalised mask) without a word. Now
    prompting starts again with it, the object drawn so far staying in its labels; choosing the same again does
    nothing."""
    viewer, widget, panel, image, echo = prompting
    session = widget.session
    statuses = []
    session.status.connect(statuses.append)
    assert panel.ctx.volume.modality == "MR"
    c, target = _prompted(prompting, qtbot)
    drawn = np.asarray(target.data).copy()
    assert drawn.any()
    first = panel.ctx
    session.set_modality(image, "CT")
    _idle(qtbot, panel)
    assert panel.ctx is not first and panel.ctx.image is image and panel.ctx.volume.modality == "CT"
    assert any(s.startswith(f"modality CT chosen for '{image.name}': prompting started again") for s in statuses), statuses
    np.testing.assert_array_equal(np.asarray(target.data), drawn)  # the object stays as drawn
    assert panel.objects_accepted == 1
    again = panel.ctx
    session.set_modality(image, "CT")
    assert panel.ctx is again
    panel.add_point(c)
    _idle(qtbot, panel)
    assert panel.ctx is again and not panel.ctx.ended
