"""The GUI thread stays responsive (project rule: nothing over ~100 ms on it): long work runs in workers.

Run under a virtual display: ``xvfb-run -a python -m pytest tests/test_napari_gui_latency.py``.
"""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from plugin_support import (  # noqa: F401 - fixtures
    modality_questions, needs_display, notifications, plugin_env, tiny_checkpoint, viewer_widget,
)

pytestmark = pytest.mark.gui


def _labels_with_hole(viewer, widget, shape=(20, 20, 20)):
    data = np.zeros(shape, np.uint8)
    data[2:10, 2:10, 2:10] = 1
    data[5, 5, 5] = 0  # an enclosed hole
    labels = viewer.add_labels(data.copy(), name="big labels")
    correct = widget.panels["correct"]
    correct.labels_combo.setCurrentText("big labels")
    correct.class_combo.setCurrentIndex(correct.class_combo.findData(1))
    return labels, data, correct


def _slow_fill_holes(monkeypatch, delay=0.0):
    """Wrap the Fill holes helper: record the thread it runs in, optionally take ``delay`` seconds."""
    from napari_mambahome import _correct

    real = _correct.HELPERS["Fill holes"]
    threads = []

    def helper(labels, class_id, *args):
        threads.append(threading.current_thread())
        time.sleep(delay)
        return real(labels, class_id, *args)

    monkeypatch.setitem(_correct.HELPERS, "Fill holes", helper)
    return threads


def test_a_correction_of_a_big_volume_runs_in_a_worker_and_stays_one_undo(viewer_widget, qtbot, monkeypatch):
    """A full-resolution CT (512x512x200) takes 1.2-2 s per helper: it froze the viewer when run on the GUI thread."""
    viewer, widget = viewer_widget
    labels, data, correct = _labels_with_hole(viewer, widget)
    monkeypatch.setattr(type(correct), "INLINE_VOXELS", 100)  # this small volume counts as big
    threads = _slow_fill_holes(monkeypatch, delay=0.5)
    start = time.perf_counter()
    assert correct.run_helper("Fill holes") is None  # started, not done
    assert time.perf_counter() - start < 0.3  # the GUI thread did not wait for the helper
    assert labels.data[5, 5, 5] == 0 and not correct.helper_buttons["Fill holes"].isEnabled()
    qtbot.waitUntil(lambda: not correct.helper_job.running, timeout=30_000)
    assert threads and threads[0] is not threading.main_thread()
    assert labels.data[5, 5, 5] == 1 and "1 voxels changed" in widget.status_label.text()
    assert correct.helper_buttons["Fill holes"].isEnabled()
    correct.undo()  # one undo entry, as on the GUI thread
    np.testing.assert_array_equal(labels.data, data)


def test_an_edit_made_while_a_correction_runs_is_not_overwritten(viewer_widget, qtbot, monkeypatch):
    viewer, widget = viewer_widget
    labels, data, correct = _labels_with_hole(viewer, widget)
    monkeypatch.setattr(type(correct), "INLINE_VOXELS", 100)
    _slow_fill_holes(monkeypatch, delay=0.5)
    correct.run_helper("Fill holes")
    labels.data_setitem((np.array([15]), np.array([15]), np.array([15])), 1)  # a brush stroke meanwhile
    qtbot.waitUntil(lambda: not correct.helper_job.running, timeout=30_000)
    assert labels.data[15, 15, 15] == 1 and labels.data[5, 5, 5] == 0  # the stroke kept, the stale result dropped
    assert "run it again" in widget.status_label.text()


def test_a_small_volume_is_still_corrected_at_once(viewer_widget, qtbot, monkeypatch):
    viewer, widget = viewer_widget
    labels, data, correct = _labels_with_hole(viewer, widget)
    threads = _slow_fill_holes(monkeypatch)
    assert correct.run_helper("Fill holes") == 1 and labels.data[5, 5, 5] == 1
    assert threads == [threading.main_thread()]
