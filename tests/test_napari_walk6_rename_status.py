"""An annotator's sixth walk, renaming a class in the Correct section (Rename…): the rename was done, but the status line
kept what it said before (here "…opened…"), so nothing showed it had happened; a refused rename (a name another class
has) must say why, naming the class it was about.

Run under a virtual display: ``xvfb-run -a python -m pytest tests/test_napari_walk6_rename_status.py``. The real data is
found through ``MAMBAHOME_SHARED_DATA`` (default ``../shared/data``); the tests skip without it.
"""
from __future__ import annotations

import pytest

from plugin_support import (  # noqa: F401 - fixtures
    modality_questions, needs_display, plugin_env, tiny_checkpoint, viewer_widget,
)

pytestmark = pytest.mark.gui


def _open_hippocampus(viewer, shared_data):
    image = sorted((shared_data / "hippocampus" / "imagesTr").glob("*.nii.gz"))[0]
    labels = sorted((shared_data / "hippocampus" / "labelsTr").glob("*.nii.gz"))[0]
    viewer.open(str(image), plugin="napari-mambahome")
    return viewer.open(str(labels), plugin="napari-mambahome")[0]


def _answer_rename(monkeypatch, name):
    from qtpy.QtWidgets import QInputDialog

    monkeypatch.setattr(QInputDialog, "getText", staticmethod(lambda *args, **kwargs: (name, True)))


def test_a_rename_says_old_and_new_name(viewer_widget, shared_data, monkeypatch):
    viewer, widget = viewer_widget
    labels = _open_hippocampus(viewer, shared_data)
    correct = widget.panels["correct"]
    assert widget.session.labels_layer is labels
    assert widget.session.class_table(labels).names[:3] == ["background", "anterior", "posterior"]
    widget.session.status.emit("something said earlier")
    correct.class_combo.setCurrentIndex(correct.class_combo.findData(1))
    _answer_rename(monkeypatch, "head")
    correct.rename_class_button.click()  # Rename…, answered "head"
    assert widget.session.class_table(labels).names[1] == "head"
    text = widget.status_label.text()
    assert "something said earlier" not in text, text
    assert "anterior" in text and "head" in text and "renamed" in text, text
    assert text.index("anterior") < text.index("head")  # old -> new


def test_a_refused_rename_says_why(viewer_widget, shared_data, monkeypatch):
    viewer, widget = viewer_widget
    labels = _open_hippocampus(viewer, shared_data)
    correct = widget.panels["correct"]
    widget.session.status.emit("something said earlier")
    assert not correct.rename_class(1, "Posterior")  # names are unique, case-insensitively
    assert widget.session.class_table(labels).names[1] == "anterior"
    text = widget.status_label.text()
    assert text.startswith("Error:") and "already a class named 'Posterior'" in text, text
    assert "class 1 'anterior' was not renamed" in text, text
    assert not correct.rename_class(1, "   ")  # an empty name
    assert "needs a name" in widget.status_label.text()


def test_renaming_with_no_labels_layer_says_so(viewer_widget):
    viewer, widget = viewer_widget
    widget.session.status.emit("something said earlier")
    assert not widget.panels["correct"].rename_class(1, "liver")
    text = widget.status_label.text()
    assert text.startswith("Error:") and "labels layer" in text, text
