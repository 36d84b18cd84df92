"""What the status line tells an annotator in two situations that looked like a silent no-op or a wrong count:

* Enter (accept) before any prompt said "object 0 accepted; prompt the next one" and sent a reset to the model;
  an object left empty by negative prompts was announced as accepted too;
* a click whose object lies mostly under another class's labels (prompting the liver, labelled 5 in a label file,
  with class 1 chosen) changed nothing visible while the status said "object updated": it now says how much of the
  object is not drawn and how to draw it.

On a real MRI opened with our reader, prompted through GuidanceEcho (object = a ball around positive clicks):
``xvfb-run -a python -m pytest tests/test_napari_annotator_messages.py``.
"""
from __future__ import annotations

import re

import numpy as np
import pytest

from plugin_support import (  # noqa: F401 - fixtures
    modality_questions, needs_display, notifications, plugin_env, status_messages, tiny_checkpoint, viewer_widget,
)
from test_plugin_interactive import (  # noqa: F401 - fixtures
    RADIUS, _ball_in_display, _centre, _idle, interactive_checkpoint, prompting,
)

pytestmark = pytest.mark.gui


def test_enter_before_any_prompt_accepts_nothing_and_says_so(prompting, qtbot):
    viewer, widget, panel, image, echo = prompting
    seen = status_messages(widget)
    assert not panel.accept_object()
    _idle(qtbot, panel)
    assert panel.objects_accepted == 0 and "0 object(s) accepted" in panel.count_label.text()
    assert seen and "no object to accept" in seen[-1] and not any(re.match(r"object \d+ accepted", m) for m in seen)
    # the first click afterwards is object 1, drawn as usual
    c = _centre(image)
    panel.add_point(np.asarray(c))
    _idle(qtbot, panel)
    assert np.asarray(panel.target.data)[c] == panel.class_id
    assert panel.accept_object()
    _idle(qtbot, panel)
    assert panel.objects_accepted == 1 and any(m.startswith("object 1 accepted") for m in seen), seen


def test_an_object_left_empty_by_negative_prompts_is_not_counted_as_accepted(prompting, qtbot):
    viewer, widget, panel, image, echo = prompting
    seen = status_messages(widget)
    panel.add_point(np.asarray(_centre(image)), positive=False)  # a negative click on an empty object: adds nothing
    _idle(qtbot, panel)
    assert panel.interactions == 1 and not panel.ctx.state.mask.any()
    assert panel.accept_object()  # the prompts end (the next object starts clean), nothing is accepted
    _idle(qtbot, panel)
    assert panel.objects_accepted == 0 and panel.interactions == 0 and len(panel.points_layer.data) == 0
    assert any("the object was empty: nothing accepted" in m for m in seen), seen
    assert not any(re.match(r"object \d+ accepted", m) for m in seen), seen


def test_an_object_under_another_class_is_reported_not_silently_hidden(prompting, qtbot):
    viewer, widget, panel, image, echo = prompting
    c = _centre(image)
    # the structure the annotator clicks already carries another label (class 5 in a label file)
    painted = np.zeros(np.shape(image.data), np.uint8)
    painted[tuple(slice(v - RADIUS - 1, v + RADIUS + 2) for v in c)] = 5
    labels = viewer.add_labels(painted, name="file labels", scale=image.scale, translate=image.translate)
    widget.session.set_labels(labels)
    seen = status_messages(widget)
    panel.add_point(np.asarray(c))
    _idle(qtbot, panel)
    assert panel.target is labels and not (np.asarray(labels.data) == panel.class_id).any()  # nothing shows
    ball = int(_ball_in_display(np.shape(image.data), c, RADIUS).sum())
    note = [m for m in seen if "lie under other classes' labels and are not drawn" in m]
    assert note and f"{ball} of the object's {ball} voxels" in note[-1], seen
    assert "Overwrite other classes' labels" in note[-1]
    # with Overwrite on, the next prompt draws it and says nothing of the kind
    panel.overwrite_check.setChecked(True)
    seen.clear()
    panel.add_point(np.asarray(c) + (0, 1, 0))
    _idle(qtbot, panel)
    assert (np.asarray(labels.data) == panel.class_id).sum() > 0
    assert seen and not any("not drawn" in m for m in seen), seen


def test_a_few_voxels_at_a_neighbours_boundary_are_not_reported(prompting, qtbot):
    viewer, widget, panel, image, echo = prompting
    c = _centre(image)
    painted = np.zeros(np.shape(image.data), np.uint8)
    painted[c[0], c[1], c[2] + RADIUS] = 2  # one voxel of a neighbour inside the object's ball
    labels = viewer.add_labels(painted, name="neighbour", scale=image.scale, translate=image.translate)
    widget.session.set_labels(labels)
    seen = status_messages(widget)
    panel.add_point(np.asarray(c))
    _idle(qtbot, panel)
    assert np.asarray(labels.data)[c[0], c[1], c[2] + RADIUS] == 2  # kept, as before
    assert seen and not any("not drawn" in m for m in seen), seen
