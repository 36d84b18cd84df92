"""Choosing another interactive model while an object is prompted ends that object as Enter does: kept in its labels,
recorded as made by prompting, its prompts cleared; the next "Start prompting" begins a new object with the new model.

Before: the old point stayed in the prompt layer and in the counts ("object 1: 1 prompt(s)"), the object was not
recorded as made by prompting (a case saved from those labels did not say so), nothing said that prompting had ended,
and the next click was refused with "choose an image and press 'Start prompting on the image'" although the image
was chosen.

On a real MRI opened with our reader, prompted through GuidanceEcho (object = a ball around positive clicks):
``xvfb-run -a python -m pytest tests/test_napari_switch_model_mid_object.py``.
"""
from __future__ import annotations

import numpy as np
import pytest

from plugin_support import (  # noqa: F401 - fixtures
    modality_questions, needs_display, notifications, plugin_env, tiny_checkpoint, viewer_widget,
)
from test_plugin_interactive import (  # noqa: F401 - fixtures
    RADIUS, _ball_in_display, _centre, _idle, interactive_checkpoint, prompting, write_interactive_checkpoint,
)

pytestmark = pytest.mark.gui


def test_a_new_model_mid_object_keeps_the_object_and_the_next_click_starts_a_new_one(
        prompting, qtbot, tmp_path, notifications):
    viewer, widget, panel, image, echo = prompting
    seen = []
    widget.session.status.connect(seen.append)
    c = np.asarray(_centre(image))
    panel.points_layer.add(c.astype(float))  # as a click in the points layer does
    _idle(qtbot, panel)
    target, first_model = panel.target, panel.model_entry
    first = np.asarray(target.data) == panel.class_id
    assert first.any() and len(panel.points_layer.data) == 1

    other = write_interactive_checkpoint(tmp_path / "other.safetensors")
    entry = panel.load_model(other)
    assert entry is not None and panel.model_entry is entry
    # the object stays as drawn and is recorded as made by prompting, with the model that made it
    np.testing.assert_array_equal(np.asarray(target.data) == panel.class_id, first)
    record = target.metadata["mambahome"]["interactive"]
    assert record["objects"] == 1 and record["prompts"] == 1
    assert record["model_name"] == first_model.path.name != entry.path.name
    assert panel.objects_accepted == 1 and "1 object(s) accepted" in panel.count_label.text()
    assert len(panel.points_layer.data) == 0 and panel.interactions == 0  # its prompts ended with it
    assert seen and f"model changed to {entry.version}: object 1 stays in '{target.name}'" in seen[-1], seen
    assert "press 'Start prompting on the image'" in seen[-1] and panel.ctx is None

    # a click now says what is missing (the image IS chosen); Start then prompts with the new model
    far = c + (0, 0, 2 * RADIUS + 3)
    assert not panel.add_point(far)
    errors = [m for kind, m in notifications if kind == "error"]
    assert errors and f"press 'Start prompting on the image' to prompt on '{image.name}'" in errors[-1], errors
    assert panel.start() and panel.ctx.entry is entry
    assert not panel.undo()  # the ended object is not undone through the new model
    panel.points_layer.add(np.asarray(far, float))
    _idle(qtbot, panel)
    labels = np.asarray(target.data)
    assert labels[tuple(far)] == panel.class_id and (labels == panel.class_id)[first].all()
    assert panel.interactions == 1 and len(echo.made) == 2  # a new backend: the new model answers
    assert "1 object(s) accepted" in panel.count_label.text()


def test_a_new_model_after_choosing_another_image_ends_the_object_too(prompting, qtbot, tmp_path, shared_data):
    from test_plugin_interactive import _open

    viewer, widget, panel, image, echo = prompting
    panel.add_point(np.asarray(_centre(image)))
    _idle(qtbot, panel)
    second = _open(viewer, sorted((shared_data / "hippocampus" / "imagesTr").glob("*.nii.gz"))[1])
    widget.session.set_image(second)
    seen = []
    widget.session.status.connect(seen.append)
    assert panel.load_model(write_interactive_checkpoint(tmp_path / "other.safetensors")) is not None
    assert panel.ctx is None and len(panel.points_layer.data) == 0
    assert seen and "press 'Start prompting on the image'" in seen[-1], seen
    assert panel.start() and panel.ctx.image is second
