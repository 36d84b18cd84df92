"""Save as training case on a remote server keeps the whole-volume comparison off the GUI thread, as the local save
does (tests/test_napari_gui_stalls_save_case.py): whether the labels layer still holds what was sent is compared in
the worker once the server confirmed the case (on the GUI thread, in the job's ``done``, it held napari 0.2-0.5 s on a
512x512x400 CT), and an edit made after that comparison still keeps the layer from being marked saved.

The server is the real ``mambahome serve`` app on 127.0.0.1 (tests/server_support.py); the scan is the real abdomen
MRI. Run under a virtual display: ``xvfb-run -a python -m pytest tests/test_napari_remote_save_stall.py``.
"""
from __future__ import annotations

import threading

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from plugin_support import (  # noqa: E402,F401 - fixtures
    modality_questions, needs_display, notifications, plugin_env, tiny_checkpoint, viewer_widget, wait_job,
)
from test_plugin_remote import _open, connect, mr_path, server  # noqa: E402,F401 - fixtures

pytestmark = pytest.mark.gui


def _labels(viewer, image, name):
    from napari_mambahome._geometry import layer_geometry

    painted = np.zeros(image.data.shape, np.uint8)
    painted[5:9, 20:40, 30:60] = 1
    return viewer.add_labels(painted, name=name, scale=image.scale, translate=image.translate,
                             metadata={"mambahome": {**layer_geometry(image).layer_metadata(),
                                                     "class_names": ["background", "organ"], "edited": True}})


def _comparisons(monkeypatch, shape):
    """The threads (True: the GUI thread) np.array_equal compared a volume of ``shape`` on, and an event set once a
    worker compared one."""
    seen, in_worker = [], threading.Event()
    real = np.array_equal

    def array_equal(a, b, *args, **kwargs):
        result = real(a, b, *args, **kwargs)
        if np.shape(a) == tuple(shape):
            gui = threading.current_thread() is threading.main_thread()
            seen.append(gui)
            if not gui:
                in_worker.set()
        return result

    monkeypatch.setattr(np, "array_equal", array_equal)
    return seen, in_worker


def test_a_remote_case_is_compared_in_the_worker_and_marks_the_untouched_labels_saved(
        viewer_widget, server, qtbot, monkeypatch, mr_path):
    from napari_mambahome._session import saved_as

    viewer, widget = viewer_widget
    session = widget.session
    image = _open(viewer, mr_path)
    connect(qtbot, widget, monkeypatch, server[0])
    labels = _labels(viewer, image, "mine")
    session.set_labels(labels)
    seen, _ = _comparisons(monkeypatch, labels.data.shape)
    job = widget.panel("cases").save_case()
    assert job is not None and wait_job(qtbot, widget).outcome == "done"
    assert seen and not any(seen), seen  # compared, and never on the GUI thread
    case_id = session.remote.cases[-1]["case_id"]
    assert saved_as(labels) == f"case {case_id} on the server {server[0]}"


@pytest.mark.parametrize("edit", ["brush stroke", "undo", "data replaced"])
def test_an_edit_after_the_worker_compared_keeps_the_remote_labels_unsaved(
        viewer_widget, server, qtbot, monkeypatch, mr_path, edit):
    """The worker has compared the layer with the case the server holds; the annotator paints (undoes, or the data is
    replaced) before the job's ``done`` runs: the layer is not marked saved, and the server's case holds the labels
    shown at the click."""
    from napari_mambahome._session import saved_as

    viewer, widget = viewer_widget
    session = widget.session
    image = _open(viewer, mr_path)
    remote = connect(qtbot, widget, monkeypatch, server[0])
    labels = _labels(viewer, image, f"edited {edit}")
    session.set_labels(labels)
    labels.selected_label = 1
    labels.paint((2, 2, 2), 1)  # an edit before the click: in the case, and undoable after it
    shown = labels.data.copy()
    assert shown[2, 2, 2] == 1 and shown[3, 3, 3] == 0  # each edit changes the labels
    sent = []
    real_save = remote.client.save_case

    def save_case(session_id, labels_ijk, *args, **kwargs):
        sent.append(np.array(labels_ijk, copy=True))
        return real_save(session_id, labels_ijk, *args, **kwargs)

    monkeypatch.setattr(remote.client, "save_case", save_case)
    # the job's ``done`` waits for the GUI thread, held here until the edit is made
    _, compared = _comparisons(monkeypatch, labels.data.shape)
    job = widget.panel("cases").save_case()
    assert job is not None
    assert compared.wait(60)
    if edit == "brush stroke":
        labels.paint((3, 3, 3), 1)
    elif edit == "undo":
        labels.undo()
    else:
        labels.data = np.zeros_like(shown)
    assert wait_job(qtbot, widget).outcome == "done"
    assert saved_as(labels) is None
    from napari_mambahome._geometry import layer_geometry

    assert len(sent) == 1
    np.testing.assert_array_equal(sent[0], layer_geometry(image).to_file(shown))
