"""An annotator's walk on the real abdomen MRI and spinal cord T1 (open, Segment, Interactive, Correct, Cases,
Fine-tune), and what careless users do on the way: here, closing the scan while prompting on it.

Run under a virtual display: ``xvfb-run -a python -m pytest tests/test_annotator_walk_mri.py``. The real data is
found through ``MAMBAHOME_SHARED_DATA`` (default ``../shared/data``); the tests skip without it. Prompts go through
the deterministic stand-in network of tests/test_plugin_interactive.py (``Echo``), slowed down so that a prediction
is still running when the scan is closed.
"""
from __future__ import annotations

import numpy as np
import pytest

from plugin_support import (  # noqa: F401 - fixtures
    modality_questions, needs_display, notifications, plugin_env, tiny_checkpoint, viewer_widget,
)
from test_plugin_interactive import Echo, interactive_checkpoint  # noqa: F401 - fixture

pytestmark = pytest.mark.gui


def _idle(qtbot, panel, timeout=30_000):
    qtbot.waitUntil(lambda: panel.worker is None and not (panel.ctx and panel.ctx.queue), timeout=timeout)
    qtbot.wait(20)


@pytest.fixture
def prompting_mri(viewer_widget, interactive_checkpoint, shared_data, qtbot):
    """Prompting on the real abdomen MRI (opened with the plugin's reader), one object drawn, each prediction 0.8 s."""
    viewer, widget = viewer_widget
    echo = Echo(delay=0.8)
    widget.session.prompt_backend_factory = echo
    widget.echo = echo  # the tests hold a prediction running with echo.gate
    image = viewer.open(str(shared_data / "abdomen_ct_mr" / "mr_image.nii.gz"), plugin="napari-mambahome")[0]
    panel = widget.panels["interactive"]
    assert panel.load_model(interactive_checkpoint) is not None
    assert panel.start()
    centre = np.asarray([s // 2 for s in np.shape(image.data)])
    panel.points_layer.add(centre.astype(float))  # as a click does
    _idle(qtbot, panel)
    assert panel.target is not None and np.asarray(panel.target.data).any()
    return viewer, widget, panel, image, centre


def test_closing_the_scan_while_its_prompt_runs_says_so_and_keeps_the_object(prompting_mri, qtbot, notifications):
    """The scan was closed (layer list's delete) while a prompt's prediction ran: prompting ended without a word, the
    prompt layers kept the closed scan's point, and the object drawn was not recorded as made by prompting."""
    from napari_mambahome._geometry import META_KEY
    from napari_mambahome.prompting import INTERACTIVE_KEY

    viewer, widget, panel, image, centre = prompting_mri
    labels = panel.target
    drawn = np.array(labels.data, copy=True)
    panel.points_layer.add((centre + (0, 4, 0)).astype(float))  # its prediction is running...
    assert panel.worker is not None
    viewer.layers.remove(image)  # ... when the scan is closed
    _idle(qtbot, panel)
    said = [message for severity, message in notifications if "closed" in message]
    assert said, notifications
    assert "mr_image" in said[-1] and "dropped" in said[-1] and "stays in 'mr_image labels'" in said[-1]
    assert labels in viewer.layers  # nothing the user made is lost: the object as drawn stays
    np.testing.assert_array_equal(np.asarray(labels.data), drawn)
    assert INTERACTIVE_KEY in labels.metadata[META_KEY]  # and counts as made by prompting
    # the closed scan's prompt layers go with it (one per event-loop turn)
    qtbot.waitUntil(lambda: not [layer for layer in viewer.layers if layer.name.startswith("prompts:")],
                    timeout=10000)
    assert panel.points_layer is None
    assert panel.interactions == 0 and "0 prompt(s)" in panel.count_label.text()


def test_save_pressed_while_predicting_then_the_scan_closed_says_the_case_was_not_saved(prompting_mri, qtbot,
                                                                                        notifications, plugin_env):
    viewer, widget, panel, image, centre = prompting_mri
    panel.points_layer.add((centre + (0, 4, 0)).astype(float))
    panel.save_case()  # waits for the prediction...
    assert "saved once" in widget.status_label.text()
    viewer.layers.remove(image)  # ... which the closed scan drops
    _idle(qtbot, panel)
    qtbot.wait(200)
    assert not any(plugin_env["cases"].iterdir())  # nothing was saved (the scan is gone) ...
    said = [message for _, message in notifications if "closed" in message]
    assert said and "NOT saved" in said[-1]  # ... and the user is told so, not left waiting for it


@pytest.mark.parametrize("where", ["another scan", "the same scan"])
def test_start_prompting_again_mid_object_keeps_the_object_as_made_by_prompting(prompting_mri, qtbot, shared_data,
                                                                                plugin_env, where):
    """An object prompted on the abdomen MRI without Enter, then Start pressed (on the spinal cord T1 just opened, or
    on the same scan again) while its last prediction still ran: the object stayed in the labels but was not recorded,
    so the case saved from them said nothing of prompting, and the dropped prediction went unmentioned."""
    from plugin_support import saved_case

    viewer, widget, panel, image, centre = prompting_mri
    labels = panel.target
    widget.echo.gate.clear()  # opening the other scan can outlast the 0.8 s prediction on a loaded machine
    panel.points_layer.add((centre + (0, 4, 0)).astype(float))  # still predicting when Start is pressed
    if where == "another scan":
        viewer.open(str(shared_data / "spinal_cord_mri" / "t1_image.nii.gz"), plugin="napari-mambahome")
    try:
        assert panel.worker is not None
        assert panel.start()
    finally:
        widget.echo.gate.set()
    text = widget.status_label.text()
    assert "object 1 stays in 'mr_image labels'" in text and "dropped" in text
    assert panel.interactions == 0
    _idle(qtbot, panel)
    viewer.layers.selection.active = image
    viewer.layers.selection.active = labels
    record = saved_case(qtbot, widget)
    assert record is not None and record.interactive is not None
    assert record.interactive.objects == 1 and record.interactive.prompts == 2


def test_segment_cancel_greys_out_at_once_and_comes_back_with_the_next_job(viewer_widget, shared_data, qtbot):
    """Cancel on a segmentation of the spinal cord T1 stayed enabled (the status said "cancelling…") until the engine
    reached its next window, so the annotator pressed it again; the Fine-tune section's Cancel already greyed out."""
    from plugin_support import wait_job

    viewer, widget = viewer_widget
    viewer.open(str(shared_data / "spinal_cord_mri" / "t1_image.nii.gz"), plugin="napari-mambahome")
    panel = widget.panels["segment"]
    job = panel.segment()
    assert job is not None and job.running and panel.cancel_button.isEnabled()
    panel.cancel_button.click()
    assert not panel.cancel_button.isEnabled() and widget.status_label.text() == "cancelling…"
    wait_job(qtbot, widget)
    assert job.outcome == "cancelled" and "nothing was changed" in widget.status_label.text()
    assert panel.segment_button.isEnabled() and not panel.cancel_button.isEnabled()
    assert panel.segment() is not None and panel.cancel_button.isEnabled()  # the next job can be cancelled again
    wait_job(qtbot, widget)
    assert not panel.cancel_button.isEnabled()


def test_use_selected_version_says_which_model_is_now_used(viewer_widget):
    """Rolling back with 'Use selected version' changed the model that segments and fine-tunes, but the status line
    kept the last scoring's text, so the annotator could not tell the click was taken."""
    viewer, widget = viewer_widget
    panel, session = widget.panels["finetune"], widget.session
    current = session.current_model
    other = next(i for i, entry in enumerate(session.entries) if entry is not current and not entry.is_interactive)
    panel.versions_list.setCurrentRow(other)
    panel.use_version_button.click()
    chosen = session.entries[other]
    assert session.current_model is chosen
    text = widget.status_label.text()
    assert f"version {chosen.version} selected instead of {current.version}" in text and "Segment" in text
    promptable = [i for i, entry in enumerate(session.entries) if entry.is_interactive]
    if promptable:  # the bundled promptable model is listed too: choosing it says what it is for
        panel.versions_list.setCurrentRow(promptable[0])
        panel.use_version_button.click()
        assert "answers prompts" in widget.status_label.text()


def test_prompting_normalises_the_image_by_the_modality_the_annotator_chose(viewer_widget, interactive_checkpoint,
                                                                            shared_data, qtbot):
    """The session normalised a prompt's image by the file's modality or the model's default (MR percentiles), not
    by the modality chosen in the dock, which Segment uses: a CT the annotator marked as CT was not windowed in HU."""
    viewer, widget = viewer_widget
    echo = Echo()
    widget.session.prompt_backend_factory = echo
    image = viewer.open(str(shared_data / "spinal_cord_mri" / "t1_image.nii.gz"), plugin="napari-mambahome")[0]
    widget.session.set_modality(image, "CT")  # the annotator's choice, whatever the file says
    panel = widget.panels["interactive"]
    assert panel.load_model(interactive_checkpoint) is not None
    assert panel.start()
    panel.points_layer.add(np.asarray([s // 2 for s in np.shape(image.data)], dtype=float))
    _idle(qtbot, panel)
    (_, volume), = echo.made
    assert volume.modality == "CT" and volume.modality_source == "user"
