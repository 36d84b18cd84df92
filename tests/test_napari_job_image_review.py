"""A reviewer's walk through the dock while a job runs on one image and the annotator works on another.

1. A Segment that finishes took the choice back: the job's end chose the segmented scan (and its new labels) again,
   although the annotator had chosen another image meanwhile, and Cases > Save then saved the model's output of the
   scan they were not working on. Now the result layer is added, the choice stays, and the status line says where the
   result went; without a change of image the result is chosen as before.
2. Removing the image layer while it was segmented did not stop the job: it ran to its end (55 s on a CPU, Segment
   greyed out) only to drop its result. Now the removal cancels the job at once, through its cancel token.
3. "Start prompting" was accepted while a job ran, and then every click was refused. Now it is greyed out while a job
   runs, its tooltip saying why, and enabled again when the job ends.

Run under a virtual display: ``xvfb-run -a python -m pytest tests/test_napari_job_image_review.py``.
"""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from plugin_support import (  # noqa: F401 - fixtures
    modality_questions, needs_display, notifications, phantom_layer, plugin_env, saved_case, status_messages,
    tiny_checkpoint, viewer_widget, wait_job,
)
from test_plugin_interactive import Echo, interactive_checkpoint  # noqa: F401 - fixture

pytestmark = pytest.mark.gui


class _Gated:
    """The session's real predictor, whose ``predict`` first waits for ``gate`` (honouring the job's cancel token as
    the engine does): the job is still running while the test acts as the annotator, however fast the machine."""

    def __init__(self, real, gate: threading.Event) -> None:
        self.real, self.gate = real, gate

    def predict(self, volume, *, cancel=None, **kwargs):
        while not self.gate.wait(0.02):
            cancel.raise_if_cancelled()
        return self.real.predict(volume, cancel=cancel, **kwargs)

    def __getattr__(self, name):
        return getattr(self.real, name)


def _gate_segmentation(monkeypatch, session) -> threading.Event:
    gate = threading.Event()
    real = session.predictor
    monkeypatch.setattr(session, "predictor", lambda entry, device: _Gated(real(entry, device), gate))
    return gate


def test_a_finished_segment_keeps_the_image_the_user_chose_meanwhile(viewer_widget, qtbot, monkeypatch,
                                                                     notifications):
    viewer, widget = viewer_widget
    session, panel = widget.session, widget.panels["segment"]
    first, _ = phantom_layer(viewer, shape=(24, 40, 36), seed=1)
    first.name = "kept scan"
    # unchanged choice: the result is chosen with its image, as before
    panel.image_combo.setCurrentText("kept scan")
    panel.segment_button.click()
    assert wait_job(qtbot, widget).outcome == "done"
    kept_labels = viewer.layers["kept scan labels"]
    assert session.image_layer is first and session.labels_layer is kept_labels
    assert viewer.layers.selection.active is kept_labels

    other, _ = phantom_layer(viewer, shape=(32, 32, 32), seed=2)
    other.name = "segmented scan"
    gate = _gate_segmentation(monkeypatch, session)
    panel.image_combo.setCurrentText("segmented scan")
    panel.segment_button.click()
    job = session.job
    assert job is not None and job.running
    panel.image_combo.setCurrentText("kept scan")  # the annotator goes back to the other scan while it runs
    viewer.layers.selection.active = first
    assert session.image_layer is first and session.labels_layer is kept_labels
    gate.set()
    assert wait_job(qtbot, widget).outcome == "done"

    result = viewer.layers["segmented scan labels"]  # the result is shown...
    assert result.metadata["mambahome"]["image_layer"] == "segmented scan"
    # ...and the annotator's choice stays: image box, chosen image and labels, napari's active layer
    assert session.image_layer is first and session.labels_layer is kept_labels
    assert panel.image_combo.currentText() == "kept scan"
    assert viewer.layers.selection.active is first
    status = widget.status_label.text()
    assert "'segmented scan labels'" in status and "'kept scan'" in status and "stays chosen" in status, status
    assert any("stays chosen" in message for _, message in notifications)
    # Cases > Save saves the scan the annotator works on
    record = saved_case(qtbot, widget)
    assert record is not None and tuple(record.shape) == (24, 40, 36), record
    # choosing the segmented scan again brings its result with it
    panel.image_combo.setCurrentText("segmented scan")
    assert session.image_layer is other and session.labels_layer is result


def test_removing_the_image_cancels_its_segmentation_at_once(viewer_widget, qtbot, notifications):
    viewer, widget = viewer_widget
    session, panel = widget.session, widget.panels["segment"]
    # long along one axis: many window batches, so the removal lands well before the last one (as the cancel test)
    big = viewer.add_image(np.random.default_rng(0).normal(0, 100, (96, 96, 320)).astype(np.float32), name="big")
    panel.image_combo.setCurrentText("big")
    before = [layer.name for layer in viewer.layers if layer is not big]
    reports = []
    panel.segment_button.click()
    job = session.job
    job.relay.progress.connect(lambda done, total, message: reports.append((done, total)))
    qtbot.waitUntil(lambda: any(total > 0 for _, total in reports), timeout=60_000)
    viewer.layers.remove(big)  # the annotator closes the scan being segmented
    assert job.token.cancelled  # at once, through the job's cancel token
    assert not panel.cancel_button.isEnabled()  # as after a press of Cancel
    assert "'big' was closed" in widget.status_label.text()
    start = time.monotonic()
    wait_job(qtbot, widget)
    assert job.outcome == "cancelled"
    assert time.monotonic() - start < 30
    assert reports[-1][0] < reports[-1][1]  # it stopped before its last window
    assert [layer.name for layer in viewer.layers] == before  # no result layer
    warnings = [message for severity, message in notifications if severity == "warning"]
    assert warnings and "'big' was closed while it was being segmented" in warnings[-1], warnings
    assert "cancelled" in warnings[-1] and "dropped" in warnings[-1], warnings
    assert "dropped" in widget.status_label.text()
    assert panel.segment_button.isEnabled() and not panel.cancel_button.isEnabled()
    assert not session.busy


def test_start_prompting_is_greyed_out_while_a_job_runs(viewer_widget, interactive_checkpoint, qtbot, monkeypatch,
                                                        notifications):
    viewer, widget = viewer_widget
    session, segment, panel = widget.session, widget.panels["segment"], widget.panels["interactive"]
    session.prompt_backend_factory = Echo()
    assert panel.load_model(interactive_checkpoint) is not None
    image, _ = phantom_layer(viewer)
    assert panel.start_button.isEnabled()
    idle_tip = panel.start_button.toolTip()
    gate = _gate_segmentation(monkeypatch, session)
    segment.segment_button.click()
    job = session.job
    assert job is not None and job.running
    assert not panel.start_button.isEnabled()
    tip = panel.start_button.toolTip()
    assert "job" in tip and "segmenting" in tip and "finished" in tip, tip
    panel.start_button.click()  # a click on the greyed-out button does nothing
    assert panel.ctx is None
    n = len(notifications)
    assert not panel.start()  # nor does a call (Refine this class, a script): it says why
    assert panel.ctx is None and "is running" in notifications[n][1], notifications[n:]
    gate.set()
    assert wait_job(qtbot, widget).outcome == "done"
    assert panel.start_button.isEnabled() and panel.start_button.toolTip() == idle_tip
    panel.start_button.click()  # the annotator starts prompting once the job has finished
    assert panel.ctx is not None and panel.ctx.image is image
    qtbot.waitUntil(lambda: panel.worker is None and not panel.ctx.queue, timeout=30_000)


def test_start_prompting_comes_back_after_a_cancelled_job(viewer_widget, qtbot, monkeypatch):
    viewer, widget = viewer_widget
    session, segment, panel = widget.session, widget.panels["segment"], widget.panels["interactive"]
    phantom_layer(viewer)
    _gate_segmentation(monkeypatch, session)  # never opened: the job ends by the annotator's Cancel
    segment.segment_button.click()
    assert not panel.start_button.isEnabled()
    segment.cancel_button.click()
    assert wait_job(qtbot, widget).outcome == "cancelled"
    assert panel.start_button.isEnabled() and "running" not in panel.start_button.toolTip()


def test_a_finished_segment_leaves_prompting_on_another_image_as_it_was(viewer_widget, interactive_checkpoint, qtbot,
                                                                        monkeypatch):
    viewer, widget = viewer_widget
    session, segment, panel = widget.session, widget.panels["segment"], widget.panels["interactive"]
    session.prompt_backend_factory = Echo()
    assert panel.load_model(interactive_checkpoint) is not None
    segmented, _ = phantom_layer(viewer, shape=(32, 32, 32), seed=1)
    segmented.name = "segmented scan"
    prompted, _ = phantom_layer(viewer, shape=(24, 40, 36), seed=2)
    prompted.name = "prompted scan"
    panel.start_button.click()  # prompting on the scan opened last
    centre = np.asarray(prompted.data.shape) // 2
    assert panel.add_point(centre)
    qtbot.waitUntil(lambda: panel.worker is None and not panel.ctx.queue, timeout=30_000)
    target = panel.target
    assert target is not None and session.labels_layer is target
    gate = _gate_segmentation(monkeypatch, session)
    segment.image_combo.setCurrentText("segmented scan")
    segment.segment_button.click()
    assert session.job is not None and session.job.running
    segment.image_combo.setCurrentText("prompted scan")  # back to prompting, while the other scan is segmented
    viewer.layers.selection.active = panel.points_layer
    gate.set()
    assert wait_job(qtbot, widget).outcome == "done"
    assert "segmented scan labels" in [layer.name for layer in viewer.layers]
    # prompting goes on where it was: its image and labels chosen, the points layer active for the next click
    assert session.image_layer is prompted and session.labels_layer is target
    assert panel.ctx is not None and panel.ctx.image is prompted and panel.target is target
    assert viewer.layers.selection.active is panel.points_layer
    assert panel.add_point(centre + (0, 2, 0))  # the next click is honoured, in the same labels
    qtbot.waitUntil(lambda: panel.worker is None and not panel.ctx.queue, timeout=30_000)
    assert panel.target is target and np.asarray(target.data).any()
