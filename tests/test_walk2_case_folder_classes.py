"""An annotator's walk on real hippocampus MRI scans: a scan segmented with a model of other class names is saved into
the hippocampus case folder in one click.

The case folder holds hippocampus cases (classes anterior, posterior); the model labels every scan organ / vessel /
gland (the bundled default model's names; here the untrained test model with the same names). Saving a scan was
refused, naming the clashing case, and the annotator then renamed two classes and removed one, through three dialogs,
on every scan. Now, when the case is refused only for its names and every value painted in it has a class in the
folder, the refusal asks once: "Save with the case folder's classes (anterior, posterior)" renames the layer's class
table value by value (the voxels untouched) and saves. Values the folder has no class for mean the question is not
asked: the refusal says which.

Run under a virtual display: ``xvfb-run -a python -m pytest tests/test_walk2_case_folder_classes.py``. The real volumes
are found through ``MAMBAHOME_SHARED_DATA`` (default ``../shared/data``); the tests skip without them.
"""
from __future__ import annotations

import numpy as np
import pytest

from plugin_support import (  # noqa: F401 - fixtures
    modality_questions, needs_display, notifications, plugin_env, tiny_checkpoint, viewer_widget, wait_job,
)

pytestmark = pytest.mark.gui

HIPPO_CLASSES = ["background", "anterior", "posterior"]
ACTION = "Save with the case folder's classes (anterior, posterior)"


def _scans(shared_data):
    return sorted((shared_data / "hippocampus" / "imagesTr").glob("*.nii.gz"))


def _question_boxes():
    from qtpy.QtWidgets import QApplication, QMessageBox

    return [w for w in QApplication.topLevelWidgets() if isinstance(w, QMessageBox) and w.isVisible()]


def _question(qtbot):
    """The question the dock shows (waited for, as the annotator sees it come)."""
    qtbot.waitUntil(lambda: bool(_question_boxes()), timeout=30_000)
    [box] = _question_boxes()
    return box


def _button(box, text):
    buttons = [b for b in box.buttons() if b.text().replace("&", "") == text]
    assert buttons, [b.text() for b in box.buttons()]
    return buttons[0]


def _press_save(qtbot, widget):
    """Press "Save as training case" as the annotator does; the job it started (None: refused before one started)."""
    widget.panels["cases"].save_case_button.click()
    job = widget.session.job
    if job is not None:
        qtbot.waitUntil(lambda: not job.running, timeout=60_000)
        qtbot.wait(20)
    return job


@pytest.fixture
def segmented(viewer_widget, shared_data, plugin_env, qtbot):
    """One hippocampus case in the folder (anterior/posterior, the manual labels), the next scan segmented by the
    model (organ/vessel/gland)."""
    from engine.cases import CaseStore
    from engine.io import load_label, load_volume

    first = _scans(shared_data)[0]
    image = load_volume(first)
    truth = load_label(shared_data / "hippocampus" / "labelsTr" / first.name, reference=image).data
    CaseStore(plugin_env["cases"]).add(image, np.asarray(truth), modality="MR", class_names=HIPPO_CLASSES)
    viewer, widget = viewer_widget
    widget.panels["cases"].refresh()
    scan = viewer.open(str(_scans(shared_data)[1]), plugin="napari-mambahome")[0]
    scan.metadata["modality"], scan.metadata["modality_source"] = "MR", "user"
    widget.panels["segment"].image_combo.setCurrentText(scan.name)
    assert widget.panels["segment"].segment() is not None
    assert wait_job(qtbot, widget).outcome == "done"
    labels = widget.session.labels_layer
    assert list(widget.session.class_table(labels).names) == ["background", "organ", "vessel", "gland"]
    assert set(np.unique(np.asarray(labels.data)).tolist()) == {0, 1, 2, 3}  # the untrained model paints all three
    return viewer, widget, scan, labels


def _clear_gland(widget):
    """The annotator's correction: the model's gland voxels are wrong on a hippocampus; Clear class in Correct."""
    correct = widget.panels["correct"]
    correct.class_combo.setCurrentIndex(correct.class_combo.findData(3))
    correct.helper_buttons["Clear class"].click()


def test_a_scan_named_by_the_model_saves_with_the_folders_classes_in_one_click(segmented, qtbot, plugin_env,
                                                                               notifications):
    from engine.cases import CaseStore
    from engine.io import load_label, load_volume

    viewer, widget, scan, labels = segmented
    # with gland voxels painted, the folder's names cannot be taken as they are: refused as before, saying why
    assert _press_save(qtbot, widget).outcome == "error"
    qtbot.wait(100)
    assert not _question_boxes()
    [error] = [m for s, m in notifications if s == "error"]
    assert error.startswith("saving the case failed: its classes") and "hippocampus_001" in error
    assert "gland (3)" in error and "no class for" in error
    notifications.clear()

    _clear_gland(widget)
    drawn = np.array(labels.data, copy=True)
    assert set(np.unique(drawn).tolist()) == {0, 1, 2}
    assert _press_save(qtbot, widget).outcome == "error"  # refused for its names only: asked, not just refused
    box = _question(qtbot)
    assert "hippocampus_001" in box.text() and "['anterior', 'posterior']" in box.text()
    assert "organ \u2192 anterior, vessel \u2192 posterior" in box.informativeText()
    assert "gland (no voxels) is dropped" in box.informativeText()
    assert not [m for s, m in notifications if s == "error"]  # the question says it, not a second error on top
    assert [r.case_id for r in CaseStore(plugin_env["cases"]).list()] == ["hippocampus_001"]  # nothing saved yet

    _button(box, ACTION).click()
    qtbot.waitUntil(lambda: len(CaseStore(plugin_env["cases"]).list()) == 2, timeout=60_000)
    job = widget.session.job
    qtbot.waitUntil(lambda: not job.running, timeout=60_000)
    qtbot.wait(20)
    assert job.outcome == "done" and not [m for s, m in notifications if s == "error"], notifications
    record = job.result
    assert record.class_names == HIPPO_CLASSES
    assert list(widget.session.class_table(labels).names) == HIPPO_CLASSES  # the layer says what was saved
    correct = widget.panels["correct"]
    assert [correct.class_combo.itemText(i) for i in range(correct.class_combo.count())] == \
        ["1: anterior", "2: posterior"]
    np.testing.assert_array_equal(np.asarray(labels.data), drawn)  # not a voxel changed
    saved = load_label(record.label_path, reference=load_volume(record.image_path)).data
    assert set(np.unique(np.asarray(saved)).tolist()) == {0, 1, 2}
    assert int((np.asarray(saved) == 1).sum()) == int((drawn == 1).sum())
    assert any("with the case folder's classes (organ \u2192 anterior, vessel \u2192 posterior" in m
               for _, m in notifications), notifications

    # the next save of this scan asks only whether to replace its case: the names already agree
    from qtpy.QtWidgets import QMessageBox
    widget.session.status.emit("")
    asked = []
    original = QMessageBox.question
    QMessageBox.question = staticmethod(lambda *a, **k: asked.append(a[2]) or QMessageBox.StandardButton.Yes)
    try:
        assert _press_save(qtbot, widget).outcome == "done"
    finally:
        QMessageBox.question = original
    assert len(asked) == 1 and "saved from the same scan" in asked[0] and not _question_boxes()


def test_cancel_leaves_the_classes_and_the_folder_as_they_were(segmented, qtbot, plugin_env, notifications):
    from engine.cases import CaseStore

    viewer, widget, scan, labels = segmented
    _clear_gland(widget)
    drawn = np.array(labels.data, copy=True)
    assert _press_save(qtbot, widget).outcome == "error"
    box = _question(qtbot)
    box.button(box.StandardButton.Cancel).click()
    qtbot.waitUntil(lambda: not _question_boxes(), timeout=10_000)
    qtbot.wait(50)
    [error] = [m for s, m in notifications if s == "error"]  # the refusal, as it always said it
    assert error.startswith("saving the case failed: its classes") and "hippocampus_001" in error
    assert list(widget.session.class_table(labels).names) == ["background", "organ", "vessel", "gland"]
    np.testing.assert_array_equal(np.asarray(labels.data), drawn)
    assert [r.case_id for r in CaseStore(plugin_env["cases"]).list()] == ["hippocampus_001"]
