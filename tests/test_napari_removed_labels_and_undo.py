"""Two annotator safety nets of the dock, on a real MRI opened with our reader (radiological display order):

* a labels layer holding the plugin's or the user's work that is removed (napari's layer-list delete button,
  ``viewer.layers.remove``) is kept and offered back ("Restore removed mask" in the Correct section), and the
  session and the Interactive section let go of the dead layer;
* napari's own undo (Ctrl+Z in the labels layer, ``layer.undo()``) of a brush stroke made between two prompts
  is seen by the prompt session: the next prompt starts from what the layer shows and does not bring the
  undone stroke back (and a redo brings it back for good).

Run under a virtual display: ``xvfb-run -a python -m pytest tests/test_napari_removed_labels_and_undo.py``.
"""
from __future__ import annotations

import numpy as np
import pytest

from plugin_support import (  # noqa: F401 - fixtures
    modality_questions, needs_display, notifications, plugin_env, status_messages, tiny_checkpoint, viewer_widget,
)
from test_plugin_interactive import (  # noqa: F401 - fixtures
    RADIUS, _ball_in_display, _centre, _idle, _open, interactive_checkpoint, prompting,
)

pytestmark = pytest.mark.gui


def _stroke(layer, centre, label, offsets=(-1, 0, 1)):
    """One brush stroke as napari's brush makes it: several ``paint`` calls grouped into one undo step."""
    layer.brush_size = 3
    with layer.block_history():
        for d in offsets:
            layer.paint(tuple(int(v) for v in np.asarray(centre) + (0, d, 0)), label)


def _prompted_object(prompting, qtbot):
    viewer, widget, panel, image, echo = prompting
    c = np.asarray(_centre(image))
    panel.add_point(c)
    _idle(qtbot, panel)
    return c, panel.target


# ---------------------------------------------------------------- napari's undo between prompts
def test_undoing_a_brush_stroke_in_napari_is_not_brought_back_by_the_next_prompt(prompting, qtbot):
    viewer, widget, panel, image, echo = prompting
    c, target = _prompted_object(prompting, qtbot)
    ball = _ball_in_display(np.shape(target.data), tuple(c), RADIUS)
    before = np.array(target.data, copy=True)
    # a stroke of the object's own class beside the object and one of another class, then Ctrl+Z on both
    _stroke(target, c + (0, RADIUS + 3, 0), 1)
    _stroke(target, c + (0, -RADIUS - 3, 0), 2)
    painted = np.asarray(target.data) != before
    assert painted.any() and not (painted & ball).any()
    target.undo()
    target.undo()  # napari's Ctrl+Z in the labels layer (the Correct section's Undo does the same)
    np.testing.assert_array_equal(np.asarray(target.data), before)
    panel.add_point(c + (0, 1, 0))  # the same object: the prompt's region covers the undone strokes
    _idle(qtbot, panel)
    labels = np.asarray(target.data)
    moved = _ball_in_display(labels.shape, tuple(c + (0, 1, 0)), RADIUS)
    np.testing.assert_array_equal(labels[painted & ~moved], 0)  # the undone strokes stay undone
    np.testing.assert_array_equal(labels != 0, ball | moved)
    panel.undo()  # and undoing the prompt returns to what the layer showed before it, without the strokes
    _idle(qtbot, panel)
    np.testing.assert_array_equal(np.asarray(target.data), before)


def test_an_undone_eraser_stroke_over_the_object_and_a_redone_stroke(prompting, qtbot):
    viewer, widget, panel, image, echo = prompting
    c, target = _prompted_object(prompting, qtbot)
    # erase part of the object, undo it: the object is whole again
    _stroke(target, c + (0, 0, 2), 0, offsets=(0,))
    target.undo()
    assert (np.asarray(target.data) == 1).sum() == _ball_in_display(np.shape(target.data), tuple(c), RADIUS).sum()
    # paint another class where the next prompt's change lands, undo and redo it (napari's Ctrl+Shift+Z): the stroke
    # is back for good, the next prompt keeps it
    nxt = c + (0, 0, RADIUS)
    _stroke(target, nxt + (0, RADIUS - 1, RADIUS - 1), 2, offsets=(0,))
    stroke = np.asarray(target.data) == 2
    target.undo()
    assert not (np.asarray(target.data) == 2).any()
    target.redo()
    np.testing.assert_array_equal(np.asarray(target.data) == 2, stroke)
    panel.add_point(nxt)
    _idle(qtbot, panel)
    labels = np.asarray(target.data)
    np.testing.assert_array_equal(labels[stroke], 2)
    ball = _ball_in_display(labels.shape, tuple(c), RADIUS) | _ball_in_display(labels.shape, tuple(nxt), RADIUS)
    np.testing.assert_array_equal(labels == 1, ball & ~stroke)


def test_undoing_a_stroke_made_before_the_object_began(prompting, qtbot):
    """The stroke is in the labels the next object is drawn over (copied when it began); undoing it afterwards must
    take it out of those labels too."""
    viewer, widget, panel, image, echo = prompting
    c, target = _prompted_object(prompting, qtbot)
    assert panel.accept_object()
    _idle(qtbot, panel)
    first = np.array(target.data, copy=True)
    p2 = c + (0, RADIUS + 6, 0)
    p3 = p2 + (0, 0, RADIUS)
    _stroke(target, p3 + (0, RADIUS - 1, RADIUS - 1), 1, offsets=(0,))  # where the third prompt's change lands
    stroke = (np.asarray(target.data) != 0) & (first == 0)
    assert stroke.any()
    panel.add_point(p2)  # the second object begins: the labels it is drawn over are copied, with the stroke
    _idle(qtbot, panel)
    target.undo()  # napari's history: the stroke (the object is drawn outside napari's history)
    assert not np.asarray(target.data)[stroke].any()
    panel.add_point(p3)
    _idle(qtbot, panel)
    labels = np.asarray(target.data)
    second = _ball_in_display(labels.shape, tuple(p2), RADIUS) | _ball_in_display(labels.shape, tuple(p3), RADIUS)
    assert (stroke & ~second).any()
    np.testing.assert_array_equal(labels[stroke & ~second], 0)
    np.testing.assert_array_equal(labels != 0, (first != 0) | second)


# ---------------------------------------------------------------- removing the labels layer
def _restore_button(widget):
    return widget.panels["correct"].restore_button


def test_a_removed_edited_labels_layer_is_kept_and_restored(prompting, qtbot, notifications):
    viewer, widget, panel, image, echo = prompting
    session = widget.session
    c, target = _prompted_object(prompting, qtbot)
    _stroke(target, c + (0, RADIUS + 3, 0), 2)  # 20 minutes of corrections
    work = np.array(target.data, copy=True)
    name, scale, translate = target.name, np.array(target.scale), np.array(target.translate)
    names = session.class_table(target).names
    affine = np.array(target.affine.affine_matrix)
    meta_path = target.metadata["mambahome"].get("path")
    assert meta_path
    assert not _restore_button(widget).isVisible()
    # napari's delete button in the layer list removes the selected layers
    viewer.layers.selection = {target}
    viewer.layers.remove_selected()
    qtbot.wait(20)
    assert target not in viewer.layers
    # the session and the Interactive section let go of the dead layer
    assert session.labels_layer is not target
    assert panel.target is None and panel._listened is None
    assert all(pair[1] is not target for pair in session._paired.values())
    warned = [m for s, m in notifications if "Restore removed mask" in m]
    assert warned and name in warned[-1]
    button = _restore_button(widget)
    assert button.isVisible() and button.isEnabled()
    button.click()
    restored = session.labels_layer
    assert restored is not None and restored is not target and restored in viewer.layers
    assert restored.name == name
    np.testing.assert_array_equal(np.asarray(restored.data), work)
    np.testing.assert_allclose(restored.scale, scale)
    np.testing.assert_allclose(restored.translate, translate)
    np.testing.assert_allclose(restored.affine.affine_matrix, affine)
    assert restored.metadata["mambahome"]["path"] == meta_path
    # its class table came back too (stored with the layer, not named again)
    assert restored.metadata["mambahome"].get("class_names") == names == session.class_table(restored).names
    assert not button.isVisible()
    # the next prompt goes into the restored labels and keeps the corrections
    panel.add_point(c + (0, 0, 1))
    _idle(qtbot, panel)
    assert panel.target is restored
    labels = np.asarray(restored.data)
    np.testing.assert_array_equal(labels[work == 2], 2)
    assert labels[tuple(c)] == 1
    # the restored layer's strokes still reach the session (it is watched like the one made by the plugin)
    assert restored.metadata["mambahome"].get("edited")


def test_prompting_after_the_labels_were_removed_starts_new_labels_and_only_the_last_removal_is_kept(
        prompting, qtbot, notifications):
    viewer, widget, panel, image, echo = prompting
    session = widget.session
    c, first = _prompted_object(prompting, qtbot)
    first_data = np.array(first.data, copy=True)
    viewer.layers.remove(first)
    qtbot.wait(20)
    assert session.labels_layer is None  # no other labels of this scan: the next prompt makes new ones
    spot = c + (0, 0, 2 * RADIUS + 4)
    panel.add_point(spot)  # no failure, no write into the dead layer: new labels for this image
    _idle(qtbot, panel)
    second = panel.target
    assert second is not None and second is not first and second in viewer.layers
    assert session.labels_layer is second
    np.testing.assert_array_equal(np.asarray(second.data) != 0,
                                  _ball_in_display(np.shape(second.data), tuple(spot), RADIUS))
    np.testing.assert_array_equal(np.asarray(first.data), first_data)
    second_data = np.array(second.data, copy=True)
    viewer.layers.remove(second)
    qtbot.wait(20)
    kept = session.removed_labels()
    assert len(kept) == 1  # one scan, one mask kept: the most recent
    assert _restore_button(widget).isVisible()
    _restore_button(widget).click()
    np.testing.assert_array_equal(np.asarray(session.labels_layer.data), second_data)
    assert session.removed_labels() == []


def test_removing_an_untouched_label_file_keeps_nothing_but_a_painted_one_is_kept(viewer_widget, shared_data, qtbot,
                                                                                  notifications):
    viewer, widget = viewer_widget
    session = widget.session
    image_path = sorted((shared_data / "hippocampus" / "imagesTr").glob("*.nii.gz"))[0]
    _open(viewer, image_path)
    labels = _open(viewer, shared_data / "hippocampus" / "labelsTr" / image_path.name)
    assert labels.__class__.__name__ == "Labels"
    viewer.layers.remove(labels)  # the file is on disk: nothing to offer back
    qtbot.wait(20)
    assert session.removed_labels() == [] and not _restore_button(widget).isVisible()
    labels = _open(viewer, shared_data / "hippocampus" / "labelsTr" / image_path.name)
    _stroke(labels, _centre(labels), 1)
    work = np.array(labels.data, copy=True)
    viewer.layers.remove(labels)
    qtbot.wait(20)
    assert len(session.removed_labels()) == 1 and _restore_button(widget).isVisible()
    assert session.restore_removed_labels() is not None
    np.testing.assert_array_equal(np.asarray(session.labels_layer.data), work)


# ---------------------------------------------------------------- napari's undo under the object, removal mid-object
def _shown_object(panel):
    """What the layer must show: the object's mask drawn over the labels it is drawn over."""
    from napari_mambahome.prompting import compose

    mask = panel.ctx.geometry.to_display(panel.ctx.state.mask)
    return compose(panel.base, mask, panel.class_id, panel.overwrite_check.isChecked())


def test_undoing_a_stroke_the_object_grew_over_shows_the_object_there(prompting, qtbot):
    """A stroke of another class beside the object, then a prompt that grows the object over it (kept: overwrite is
    off), then napari's Ctrl+Z of the stroke: napari puts back the voxels' values from before the stroke (background),
    which left a hole in the object that the layer showed, and an accepted object saved with it."""
    viewer, widget, panel, image, echo = prompting
    c, target = _prompted_object(prompting, qtbot)
    table = widget.session.class_table(target)
    table.add("second")
    widget.session.set_class_table(target, table)
    spot = c + (0, RADIUS + 3, 0)
    _stroke(target, spot, 2)
    stroke = np.asarray(target.data) == 2
    panel.add_point(spot)  # the object grows over the stroke, which keeps its class
    _idle(qtbot, panel)
    np.testing.assert_array_equal(np.asarray(target.data), _shown_object(panel))
    target.undo()
    labels = np.asarray(target.data)
    np.testing.assert_array_equal(labels, _shown_object(panel))
    grown = _ball_in_display(labels.shape, tuple(spot), RADIUS)
    assert (stroke & grown).any()
    np.testing.assert_array_equal(labels[stroke & grown], 1)  # the object, not a hole
    assert not (labels == 2).any()


def test_removing_the_labels_mid_object_ends_its_prompts(prompting, qtbot, notifications):
    """The labels layer removed while an object is prompted: the object is reset; its prompts must not stay "in
    effect" (the count said 1 prompt, and Undo asked the backend to undo past the reset: "undo failed")."""
    viewer, widget, panel, image, echo = prompting
    c, target = _prompted_object(prompting, qtbot)
    seen = status_messages(widget)
    viewer.layers.remove(target)
    qtbot.wait(20)
    _idle(qtbot, panel)
    assert panel.interactions == 0 and panel.history == []
    # the model's reset for the ended object says nothing: "reset: object updated" replaced what the removal said
    assert seen and not any("object updated" in m for m in seen), seen
    assert len(panel.points_layer.data) == 0  # the ended object's point is not shown as a prompt in effect
    assert not panel.undo()
    _idle(qtbot, panel)
    assert not [m for severity, m in notifications if "failed" in m], notifications


def test_a_scribble_stroke_is_read_from_its_box_not_the_whole_volume(prompting, qtbot):
    """The scribble handler compared and copied the whole scribble volume at every stroke (0.4 s on the GUI thread for
    a 300x404x488 CT): it now reads the stroke's box from napari's history atoms and updates what it saw in place."""
    viewer, widget, panel, image, echo = prompting
    layer = panel.scribbles_layer
    seen = panel._scribble_seen
    c = np.asarray(_centre(image))
    layer.brush_size = 3
    with layer.block_history():
        layer.paint(tuple(int(v) for v in c), 1)
    _idle(qtbot, panel)
    assert panel._scribble_seen is seen  # updated inside the stroke's box, not replaced by a copy of the volume
    np.testing.assert_array_equal(seen, np.asarray(layer.data))
    assert panel.interactions == 1 and panel.target is not None
    labels = np.asarray(panel.target.data)
    assert labels[tuple(c)] == 1  # the scribble prompted the object (GuidanceEcho: the positive scribble itself)
    with layer.block_history():  # a second stroke elsewhere is a second prompt, the first one is not counted again
        layer.paint(tuple(int(v) for v in c + (0, 6, 0)), 1)
    _idle(qtbot, panel)
    assert panel.interactions == 2
    np.testing.assert_array_equal(seen, np.asarray(layer.data))


def test_a_polygon_scribble_and_a_bare_paint_prompt_as_a_brush_stroke_does(prompting, qtbot):
    """napari fires ``paint`` before it writes the voxels of a polygon (and of a bare ``Labels.paint``): the scribble
    was read from the layer at that moment, found nothing new and was dropped without a word. The stroke is now read
    from the event's history atoms."""
    viewer, widget, panel, image, echo = prompting
    layer = panel.scribbles_layer
    c = np.asarray(_centre(image))
    z, y, x = (int(v) for v in c)
    layer.mode = "polygon"
    overlay = layer._overlays["polygon"]
    overlay.points = [[z, y - 2, x - 2], [z, y - 2, x + 2], [z, y + 2, x + 2], [z, y + 2, x - 2]]
    overlay.add_polygon_to_labels(layer)
    _idle(qtbot, panel)
    assert int((np.asarray(layer.data) == 1).sum()) > 0
    assert panel.interactions == 1 and panel.target is not None
    assert np.asarray(panel.target.data)[z, y, x] == 1  # the polygon prompted the object (GuidanceEcho)
    np.testing.assert_array_equal(panel._scribble_seen, np.asarray(layer.data))
    layer.mode = "paint"
    layer.brush_size = 3
    layer.paint((z, y + 6, x), 1)  # outside a brush stroke: the event comes first here too
    _idle(qtbot, panel)
    assert panel.interactions == 2
    np.testing.assert_array_equal(panel._scribble_seen, np.asarray(layer.data))
