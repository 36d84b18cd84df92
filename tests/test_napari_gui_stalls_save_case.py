"""Save as training case on a labels layer kept off the GUI thread: the whole-volume comparison that decides whether
the layer still holds what was saved runs in the worker (it held the GUI thread 0.2-0.5 s on a 512x512x400 CT), and
the case still holds the labels shown at the click, whatever is painted after it.

Run under a virtual display: ``xvfb-run -a python -m pytest tests/test_napari_gui_stalls_save_case.py``.
"""
from __future__ import annotations

import threading

import nibabel as nib
import numpy as np
import pytest

from plugin_support import (  # noqa: F401 - fixtures
    modality_questions, plugin_env, tiny_checkpoint, viewer_widget,
)

pytestmark = pytest.mark.gui


def _pair(viewer, widget, tmp_volume):
    img_path, lab_path, _ = tmp_volume
    [image] = viewer.open(str(img_path), plugin="napari-mambahome")
    [labels] = viewer.open(str(lab_path), plugin="napari-mambahome")
    widget.panels["segment"].image_combo.setCurrentText(image.name)
    widget.panels["correct"].labels_combo.setCurrentText(labels.name)
    widget.panels["segment"].modality_combo.setCurrentText("MR")
    return image, labels


def _saved_labels(record, labels):
    order = np.argsort(labels.metadata["mambahome"]["display"]["order"])
    return np.transpose(np.asarray(nib.load(str(record.folder / "label.nii.gz")).dataobj), np.argsort(order))


def _hold_the_write(monkeypatch):
    from engine.cases import CaseStore

    writing, release = threading.Event(), threading.Event()
    real_add = CaseStore.add

    def slow_add(self, *args, **kwargs):
        writing.set()
        assert release.wait(30)
        return real_add(self, *args, **kwargs)

    monkeypatch.setattr(CaseStore, "add", slow_add)
    return writing, release


def _whole_volume_comparisons(monkeypatch, shape):
    """The threads (True: the GUI thread) np.array_equal compared a volume of ``shape`` on."""
    seen = []
    real = np.array_equal

    def array_equal(a, b, *args, **kwargs):
        if np.shape(a) == tuple(shape):
            seen.append(threading.current_thread() is threading.main_thread())
        return real(a, b, *args, **kwargs)

    monkeypatch.setattr(np, "array_equal", array_equal)
    return seen


def test_the_saved_check_compares_the_volume_in_the_worker_and_marks_an_untouched_layer_saved(
        qtbot, viewer_widget, tmp_volume, monkeypatch):
    from napari_mambahome._session import saved_as

    viewer, widget = viewer_widget
    _, labels = _pair(viewer, widget, tmp_volume)
    labels.data[0:3, 0:3, 0:3] = 1
    shown = labels.data.copy()
    seen = _whole_volume_comparisons(monkeypatch, labels.data.shape)
    job = widget.panels["cases"].save_case()
    qtbot.waitUntil(lambda: not job.running, timeout=60_000)
    assert job.outcome == "done"
    assert seen and not any(seen)  # compared, and never on the GUI thread
    np.testing.assert_array_equal(_saved_labels(job.result, labels), shown)
    assert saved_as(labels) == f"case {job.result.case_id} in {job.result.folder.parent}"


@pytest.mark.parametrize("edit", ["brush stroke", "undo", "data replaced"])
def test_an_edit_after_the_click_is_not_in_the_case_and_the_layer_is_not_marked_saved(
        qtbot, viewer_widget, tmp_volume, monkeypatch, edit):
    """Edits made while the case is written (after the worker compared, too) stay out of the case, and the layer then
    does not claim to be what was saved."""
    from napari_mambahome._session import saved_as

    viewer, widget = viewer_widget
    _, labels = _pair(viewer, widget, tmp_volume)
    labels.selected_label = 1
    labels.paint((1, 1, 1), 1)  # an edit before the click: in the case, and undoable after it
    shown = labels.data.copy()
    writing, release = _hold_the_write(monkeypatch)
    compared = threading.Event()
    real = np.array_equal

    def array_equal(a, b, *args, **kwargs):
        result = real(a, b, *args, **kwargs)
        if threading.current_thread() is not threading.main_thread():
            compared.set()
        return result

    monkeypatch.setattr(np, "array_equal", array_equal)
    job = widget.panels["cases"].save_case()
    qtbot.waitUntil(writing.is_set, timeout=10_000)
    release.set()
    # the worker has compared the layer with the case; its ``done`` waits for the GUI thread, which edits first
    assert compared.wait(30)
    if edit == "brush stroke":
        labels.paint((5, 5, 5), 1)
    elif edit == "undo":
        labels.undo()
    else:
        labels.data = np.zeros_like(shown)
    qtbot.waitUntil(lambda: not job.running, timeout=60_000)
    assert job.outcome == "done"
    np.testing.assert_array_equal(_saved_labels(job.result, labels), shown)
    assert saved_as(labels) is None
