"""An edit between two prompts that takes voxels OUT of the object being prompted (napari's eraser, or another class
painted over the object) takes them out of the object itself, not only out of the labels under it: the next prompt
starts from the edited object and does not draw them back (they came back: 6 of 9 erased voxels on a real CT), and
the Interactive section's Undo takes the edit back as one step.

On a real MRI opened with our reader (radiological display order != file order), prompted through GuidanceEcho
(object = previous mask or positive prompts): run under a virtual display,
``xvfb-run -a python -m pytest tests/test_napari_erase_object.py``.
"""
from __future__ import annotations

import numpy as np
import pytest

from plugin_support import (  # noqa: F401 - fixtures
    modality_questions, needs_display, notifications, plugin_env, status_messages, tiny_checkpoint, viewer_widget,
)
from test_plugin_interactive import (  # noqa: F401 - fixtures
    RADIUS, _ball_in_display, _centre, _idle, interactive_checkpoint, prompting,
)
from test_napari_removed_labels_and_undo import _prompted_object, _stroke

pytestmark = pytest.mark.gui


def _object_in_display(panel):
    return panel.ctx.geometry.to_display(panel.ctx.state.mask) != 0


HALF = 5
ERASE = (-4, 3, 3)  # a dab inside the object, away from the click below
CLICK = (0, HALF + 1, HALF + 1)  # a positive point at the object's edge (adds a missed part): the box of its change
# holds the dab, which lies farther than the point's radius from it (GuidanceEcho repaints every voxel within an
# earlier positive prompt's radius: the object is seeded instead, as "Refine this class" does)


def _seeded_object(viewer, widget, panel, image, qtbot):
    """The object the automatic segmentation made (a cube around the centre), taken up with "Refine this class"."""
    c = np.asarray(_centre(image))
    cube = np.zeros(np.shape(image.data), bool)
    cube[tuple(slice(v - HALF, v + HALF + 1) for v in c)] = True
    labels = viewer.add_labels(cube.astype(np.uint8), name="auto", scale=image.scale, translate=image.translate)
    widget.session.set_labels(labels)
    assert panel.refine_class()
    _idle(qtbot, panel)
    np.testing.assert_array_equal(np.asarray(labels.data) != 0, cube)
    return c, labels, cube


def test_erased_voxels_stay_erased_after_the_next_prompt_and_undo_takes_the_edit_back(prompting, qtbot):
    viewer, widget, panel, image, echo = prompting
    c, target, cube = _seeded_object(viewer, widget, panel, image, qtbot)
    shape = np.shape(target.data)
    _stroke(target, c + ERASE, 0, offsets=(0,))  # napari's eraser over part of the object
    erased = cube & (np.asarray(target.data) == 0)
    assert erased.any()
    statuses = status_messages(widget)
    click = c + CLICK
    panel.add_point(click)
    _idle(qtbot, panel)
    labels = np.asarray(target.data)
    ball = _ball_in_display(shape, tuple(click), RADIUS)
    assert not (erased & ball).any()
    np.testing.assert_array_equal(labels[erased], 0)  # the erased voxels stay erased
    np.testing.assert_array_equal(labels == 1, (cube & ~erased) | ball)
    assert not (_object_in_display(panel) & erased).any()  # taken out of the object, not only hidden
    said = f"brush edit: {int(erased.sum())} voxels taken out of the object"
    assert any(said in s for s in statuses), statuses
    assert panel.history == ["initial", "initial", "prompt"] and panel.interactions == 1
    panel.undo()  # the added part goes; the edit stays
    _idle(qtbot, panel)
    np.testing.assert_array_equal(np.asarray(target.data) == 1, cube & ~erased)
    panel.undo()  # the edit: the object as it was before it
    _idle(qtbot, panel)
    np.testing.assert_array_equal(np.asarray(target.data), cube.astype(np.uint8))
    panel.undo()  # the step before it (the seed)
    _idle(qtbot, panel)
    assert not np.asarray(target.data).any() and panel.history == []


def test_an_edit_between_two_prompts_is_one_undo_step_between_them(prompting, qtbot):
    """Prompt, erase, prompt: Undo takes back the second prompt, then the edit, then the first prompt."""
    viewer, widget, panel, image, echo = prompting
    c, target, cube = _seeded_object(viewer, widget, panel, image, qtbot)
    shape = np.shape(target.data)
    first = c + (0, 0, -HALF - 1)
    panel.add_point(first)
    _idle(qtbot, panel)
    grown = cube | _ball_in_display(shape, tuple(first), RADIUS)
    np.testing.assert_array_equal(np.asarray(target.data) != 0, grown)
    _stroke(target, c + ERASE, 0, offsets=(0,))
    erased = grown & (np.asarray(target.data) == 0)
    panel.add_point(c + CLICK)
    _idle(qtbot, panel)
    assert panel.history == ["initial", "prompt", "initial", "prompt"] and panel.interactions == 2
    np.testing.assert_array_equal(np.asarray(target.data)[erased], 0)
    for expected in (grown & ~erased, grown, cube):
        panel.undo()
        _idle(qtbot, panel)
        np.testing.assert_array_equal(np.asarray(target.data) != 0, expected)


def test_an_erase_undone_in_napari_before_the_next_prompt_takes_nothing_out(prompting, qtbot):
    viewer, widget, panel, image, echo = prompting
    c, target, cube = _seeded_object(viewer, widget, panel, image, qtbot)
    shape = np.shape(target.data)
    _stroke(target, c + ERASE, 0, offsets=(0,))
    assert (cube & (np.asarray(target.data) == 0)).any()
    target.undo()  # napari's Ctrl+Z of the eraser stroke
    np.testing.assert_array_equal(np.asarray(target.data) != 0, cube)
    assert not panel._pending
    click = c + CLICK
    panel.add_point(click)
    _idle(qtbot, panel)
    np.testing.assert_array_equal(np.asarray(target.data) == 1, cube | _ball_in_display(shape, tuple(click), RADIUS))
    assert panel.history == ["initial", "prompt"]


def test_another_class_painted_over_the_object_keeps_its_class_after_the_next_prompt(prompting, qtbot):
    viewer, widget, panel, image, echo = prompting
    c, target, cube = _seeded_object(viewer, widget, panel, image, qtbot)
    table = widget.session.class_table(target)
    table.add("second")
    widget.session.set_class_table(target, table)
    panel.overwrite_check.setChecked(True)  # the object may be drawn over other classes: the edit must still win
    shape = np.shape(target.data)
    _stroke(target, c + ERASE, 2, offsets=(0,))
    over = cube & (np.asarray(target.data) == 2)
    assert over.any()
    click = c + CLICK
    panel.add_point(click)
    _idle(qtbot, panel)
    labels = np.asarray(target.data)
    np.testing.assert_array_equal(labels[over], 2)
    np.testing.assert_array_equal(labels == 1, (cube & ~over) | _ball_in_display(shape, tuple(click), RADIUS))
    assert not (_object_in_display(panel) & over).any()
    # painting the object's own class outside it needs no step: the stroke stays and shows
    before = np.array(target.data, copy=True)
    _stroke(target, c + (0, -HALF - 3, 0), 1)
    own = (np.asarray(target.data) == 1) & (before != 1)
    assert own.any()
    panel.add_point(c + (0, 0, -HALF - 1))
    _idle(qtbot, panel)
    np.testing.assert_array_equal(np.asarray(target.data)[own], 1)
    np.testing.assert_array_equal(np.asarray(target.data)[over], 2)
    assert panel.history == ["initial", "initial", "prompt", "prompt"]


def test_an_erase_made_while_a_prediction_runs_is_not_drawn_over(prompting, qtbot):
    viewer, widget, panel, image, echo = prompting
    c, target, cube = _seeded_object(viewer, widget, panel, image, qtbot)
    shape = np.shape(target.data)
    backend = panel.ctx.backend  # made on the seed; slow from now on
    add_point = backend.add_point

    def slow(*args, **kwargs):
        import time
        time.sleep(0.6)
        return add_point(*args, **kwargs)
    backend.add_point = slow
    click = c + CLICK
    panel.add_point(click)  # slow: the eraser stroke comes while it runs
    assert panel.worker is not None
    _stroke(target, c + ERASE, 0, offsets=(0,))
    erased = cube & (np.asarray(target.data) == 0)
    assert erased.any()
    _idle(qtbot, panel)
    ball = _ball_in_display(shape, tuple(click), RADIUS)
    np.testing.assert_array_equal(np.asarray(target.data)[erased], 0)  # the result did not draw them back
    np.testing.assert_array_equal(np.asarray(target.data) == 1, (cube & ~erased) | ball)
    panel.add_point(c + (0, 0, -HALF - 1))  # the next prompt takes them out of the object for good
    _idle(qtbot, panel)
    np.testing.assert_array_equal(np.asarray(target.data)[erased], 0)
    assert panel.history == ["initial", "prompt", "initial", "prompt"]
    assert not (_object_in_display(panel) & erased).any()


def test_a_stroke_is_only_recorded_on_the_gui_thread(prompting, qtbot):
    """The paint handler keeps the stroke's history atoms, no copy of the volume (a CT is 512x512x300)."""
    viewer, widget, panel, image, echo = prompting
    c, target = _prompted_object(prompting, qtbot)
    _stroke(target, c + (0, 0, -2), 0)
    assert panel._pending and all(type(atom).__name__ != "ndarray" for atom in panel._pending.values())
    assert panel.history == ["prompt"]  # nothing queued until the next prompt
