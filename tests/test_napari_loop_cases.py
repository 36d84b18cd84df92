"""The Cases section when the case folder changes on disk behind it (an annotator tidying up in a file manager).

Run under a virtual display: ``xvfb-run -a python -m pytest tests/test_napari_loop_cases.py``.
"""
from __future__ import annotations

import shutil

import pytest
from qtpy.QtWidgets import QMessageBox

from plugin_support import (  # noqa: F401 - fixtures
    modality_questions, notifications, phantom_layer, plugin_env, saved_case, tiny_checkpoint, viewer_widget,
    wait_job,
)

pytestmark = pytest.mark.gui


def test_removing_a_case_deleted_on_disk_updates_the_list(viewer_widget, qtbot, plugin_env, notifications,
                                                          monkeypatch):
    viewer, widget = viewer_widget
    for seed in (3, 4):
        layer, truth = phantom_layer(viewer, seed=seed)
        layer.name = f"phantom {seed}"
        widget.panels["segment"].image_combo.setCurrentText(layer.name)
        widget.panels["segment"].segment()
        assert wait_job(qtbot, widget).outcome == "done"
        labels = viewer.layers[f"{layer.name} labels"]
        labels.data = truth.astype(labels.data.dtype)
        assert saved_case(qtbot, widget) is not None
    panel = widget.panels["cases"]
    assert panel.cases_list.count() == 2
    gone = panel.cases_list.item(0).data(256)  # Qt.UserRole: the case id
    shutil.rmtree(plugin_env["cases"] / gone)  # deleted outside napari while the panel is open
    asked = []
    monkeypatch.setattr(QMessageBox, "question", staticmethod(lambda *a, **k: asked.append(a) or QMessageBox.StandardButton.Yes))
    panel.cases_list.setCurrentRow(0)
    assert panel.remove_selected_case() is False
    assert asked == []  # no "Delete case?" for a case that is not there
    assert not any(s == "error" for s, _ in notifications)
    assert any(s == "warning" and gone in m and "no longer" in m for s, m in notifications)
    assert panel.cases_list.count() == 1 and panel.cases_count_label.text().startswith("1 case")


def test_saving_a_class_the_model_lacks_says_so(viewer_widget, qtbot, notifications):
    """Value 7 painted on a 3-class model's labels: the case gets 'label 4'...'label 7', and saving says it."""
    from napari_mambahome.panels.cases import unnamed_classes

    viewer, widget = viewer_widget
    layer, truth = phantom_layer(viewer, seed=3)
    widget.panels["segment"].image_combo.setCurrentText(layer.name)
    widget.panels["segment"].segment()
    assert wait_job(qtbot, widget).outcome == "done"
    labels = viewer.layers[f"{layer.name} labels"]
    data = truth.astype(labels.data.dtype)
    data[:4, :4, :4] = 7  # one stroke with the label spinner too high
    labels.data = data
    record = saved_case(qtbot, widget)
    assert record is not None and record.class_names[4:] == ["label 4", "label 5", "label 6", "label 7"]
    [warning] = [m for s, m in notifications if s == "warning"]
    assert "painted with label 7, which has no class name" in warning
    assert "label 4, label 5, label 6 (not painted)" in warning and record.case_id in warning
    # named classes only: nothing to say
    assert unnamed_classes(["background", "organ", "tumour"], [0, 1, 2]) == ""
