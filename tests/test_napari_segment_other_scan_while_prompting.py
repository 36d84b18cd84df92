"""Segment on another scan while an object is prompted on a first one: the other scan's new labels become the chosen
labels (as the guide says: labels made for another open scan are never kept chosen with it). The prompting kept the
first scan's labels chosen with the second scan, so Clear class edited the first patient's mask, unannounced, and
Save as training case refused the pair (found by an annotator on the real spinal cord T1 and T2).

Run under a virtual display: ``xvfb-run -a python -m pytest tests/test_napari_segment_other_scan_while_prompting.py``.
"""
from __future__ import annotations

import numpy as np
import pytest

from plugin_support import (  # noqa: F401 - fixtures
    modality_questions, needs_display, plugin_env, status_messages, tiny_checkpoint, viewer_widget, wait_job,
)
from test_plugin_interactive import Echo, _centre, _idle, _open, interactive_checkpoint  # noqa: F401

pytestmark = pytest.mark.gui


@pytest.mark.parametrize("second", ["t2_image.nii.gz", "t1_image.nii.gz"], ids=["another-shape", "same-shape"])
def test_segmenting_another_scan_mid_object_chooses_its_labels_and_keeps_the_object(
        viewer_widget, interactive_checkpoint, shared_data, qtbot, tmp_path, second):
    import shutil

    viewer, widget = viewer_widget
    session = widget.session
    session.prompt_backend_factory = Echo()
    spinal = shared_data / "spinal_cord_mri"
    first = _open(viewer, spinal / "t1_image.nii.gz")
    session.set_modality(first, "MR")
    panel = widget.panels["interactive"]
    assert panel.load_model(interactive_checkpoint) is not None
    assert panel.start()
    panel.points_layer.add(np.asarray(_centre(first), float))
    _idle(qtbot, panel)
    prompted = panel.target
    drawn = np.array(prompted.data, copy=True)
    assert drawn.any() and session.labels_layer is prompted

    # the same scan under another name (same shape: only its owner tells them apart), or another shape
    copy = tmp_path / f"other {second}"
    shutil.copyfile(spinal / second, copy)
    other = _open(viewer, copy)
    session.set_modality(other, "MR")
    viewer.layers.selection.active = other
    qtbot.waitUntil(lambda: session.image_layer is other, timeout=5_000)
    segment = widget.panels["segment"]
    assert segment.segment() is not None
    assert wait_job(qtbot, widget, timeout=300_000).outcome == "done"
    qtbot.wait(50)  # a choice the prompting would take back is made in a zero-delay timer

    made = next(lay for lay in viewer.layers if lay.name == f"{other.name} labels")
    assert session.image_layer is other and session.labels_layer is made
    assert widget.panels["correct"].labels_combo.currentText() == made.name
    np.testing.assert_array_equal(np.asarray(prompted.data), drawn)  # the object stays where it was drawn
    assert panel.target is not prompted  # ended there: the next prompt does not draw into the first scan's labels

    # Correct edits the chosen scan's labels, never the first scan's
    widget.panels["correct"].run_helper("Clear class")
    if session.job is not None:
        wait_job(qtbot, widget)
    np.testing.assert_array_equal(np.asarray(prompted.data), drawn)

    # and the pair saves as a case
    said = status_messages(widget)
    job = widget.panels["cases"].save_case()
    if job is not None:
        wait_job(qtbot, widget)
    assert any(m.startswith("saved case") for m in said), said
