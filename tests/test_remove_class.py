"""Remove class in the Correct section's class table, driven as the annotator does: a new anatomy drops the old
label set's unused classes, a painted class is cleared after a question naming its voxels, the classes above move
down one value, and one Ctrl+Z brings values and names back. Also: the disabled "Save as training case" says why
while a fine-tune runs.

Run under a virtual display: ``xvfb-run -a python -m pytest tests/test_remove_class.py``. Real volumes are found
through ``MAMBAHOME_SHARED_DATA`` (default ``../shared/data``); tests that need them skip without them.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import List

import numpy as np
import pytest

from plugin_support import (  # noqa: F401 - fixtures
    modality_questions, needs_display, notifications, plugin_env, saved_case, tiny_checkpoint, viewer_widget,
    wait_job, write_tiny_checkpoint,
)

HIPPO_CLASSES = ["background", "anterior", "posterior"]

pytestmark = pytest.mark.gui


def _open(viewer, path: Path):
    [layer] = viewer.open(str(path), plugin="napari-mambahome")
    return layer


def _answer(monkeypatch, yes: bool) -> List[str]:
    """Answer the "Remove class?" question; returns the questions asked (a modal dialog would stop the test)."""
    from qtpy.QtWidgets import QMessageBox

    asked: List[str] = []

    def question(parent, title, text, *args, **kwargs):
        asked.append(text)
        return QMessageBox.StandardButton.Yes if yes else QMessageBox.StandardButton.No

    monkeypatch.setattr(QMessageBox, "question", staticmethod(question))
    return asked


def _choose(correct, value: int) -> None:
    index = correct.class_combo.findData(value)
    assert index >= 0, [correct.class_combo.itemText(i) for i in range(correct.class_combo.count())]
    correct.class_combo.setCurrentIndex(index)


def _classes(correct) -> List[str]:
    return [correct.class_combo.itemText(i) for i in range(correct.class_combo.count())]


def _hippocampus(shared_data: Path, folder: str = "imagesTr") -> Path:
    return shared_data / "hippocampus" / folder / "hippocampus_001.nii.gz"


def test_spinal_cord_after_hippocampus_drops_the_unused_class_and_saves_only_its_own(
        qtbot, viewer_widget, shared_data, plugin_env, monkeypatch, tmp_path):
    """The annotator's story: hippocampus names on a spinal cord label, "anterior" renamed, "posterior" removed (no
    voxels: nothing to ask), and the saved case (what fine-tuning reads) has no "posterior" output left.

    The label file is a copy marked as a label map (``NIFTI_INTENT_LABEL``), as the plugin saves segmentations: a
    label file from elsewhere no longer takes the selected model's names (tests/test_napari_walk5b_label_names.py:
    TotalSegmentator's spleen was named "organ"), so the plain t1_label.nii.gz now shows "label 1" instead."""
    viewer, widget = viewer_widget
    correct = widget.panels["correct"]
    hippo_model = write_tiny_checkpoint(tmp_path / "hippo.safetensors", HIPPO_CLASSES, modality="MR")
    assert widget.session.load_model_file(hippo_model) is not None
    assert list(widget.session.current_model.class_names) == HIPPO_CLASSES
    image = _open(viewer, shared_data / "spinal_cord_mri" / "t1_image.nii.gz")
    image.metadata["modality"] = "MR"
    import nibabel as nib

    source = nib.load(str(shared_data / "spinal_cord_mri" / "t1_label.nii.gz"))
    header = source.header.copy()
    header.set_intent("label")
    marked = tmp_path / "t1_label.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(source.dataobj), source.affine, header), str(marked))
    labels = _open(viewer, marked)
    assert widget.session.labels_layer is labels
    assert _classes(correct) == ["1: anterior", "2: posterior"]
    before = np.array(labels.data, copy=True)
    assert set(np.unique(before)) == {0, 1}
    assert correct.rename_class(1, "spinal cord")
    asked = _answer(monkeypatch, yes=False)  # an unused class is removed without a question
    _choose(correct, 2)
    correct.remove_class_button.click()
    assert asked == []
    assert _classes(correct) == ["1: spinal cord"]
    assert [name for _, name, _ in correct.legend.entries] == ["spinal cord"]
    np.testing.assert_array_equal(labels.data, before)
    assert labels.selected_label == 1
    record = saved_case(qtbot, widget)
    assert record is not None and record.class_names == ["background", "spinal cord"]

    assert correct.rename_class(1, "cord")  # renamed after the removal: undoing the removal keeps it
    labels.undo()  # Ctrl+Z: the removal had no voxels, the names still come back
    assert _classes(correct) == ["1: cord", "2: posterior"]
    labels.redo()
    assert _classes(correct) == ["1: cord"]


def test_painted_class_is_asked_about_cleared_and_the_classes_above_move_down(viewer_widget, shared_data,
                                                                               monkeypatch):
    viewer, widget = viewer_widget
    correct = widget.panels["correct"]
    _open(viewer, _hippocampus(shared_data))
    labels = _open(viewer, _hippocampus(shared_data, "labelsTr"))
    assert _classes(correct) == ["1: anterior", "2: posterior"]
    before = np.array(labels.data, copy=True)
    anterior = int((before == 1).sum())
    assert anterior > 0 and (before == 2).any()
    assert correct.recolour_class(2, "#ff00ff")  # a chosen colour follows its class to its new value

    asked = _answer(monkeypatch, yes=False)
    _choose(correct, 1)
    correct.remove_class_button.click()
    assert len(asked) == 1 and f"{anterior:,} painted voxels" in asked[0] and "'anterior'" in asked[0]
    np.testing.assert_array_equal(labels.data, before)  # declined: nothing changed
    assert _classes(correct) == ["1: anterior", "2: posterior"]

    _answer(monkeypatch, yes=True)
    correct.remove_class_button.click()
    expected = np.where(before == 1, 0, np.where(before == 2, 1, before))
    np.testing.assert_array_equal(labels.data, expected)
    assert _classes(correct) == ["1: posterior"]
    np.testing.assert_allclose(np.asarray(labels.get_color(1))[:3], [1, 0, 1])
    assert widget.session.class_table(labels).colours == {1: "#ff00ff"}

    labels.undo()  # one Ctrl+Z: values and names (and the colour's value) as they were
    np.testing.assert_array_equal(labels.data, before)
    assert _classes(correct) == ["1: anterior", "2: posterior"]
    np.testing.assert_allclose(np.asarray(labels.get_color(2))[:3], [1, 0, 1])


def test_background_cannot_be_removed(viewer_widget, shared_data, notifications):
    viewer, widget = viewer_widget
    correct = widget.panels["correct"]
    _open(viewer, _hippocampus(shared_data))
    labels = _open(viewer, _hippocampus(shared_data, "labelsTr"))
    before = np.array(labels.data, copy=True)
    assert correct.remove_class(0) is None
    assert any(s == "error" and "background" in m for s, m in notifications)
    assert _classes(correct) == ["1: anterior", "2: posterior"]
    np.testing.assert_array_equal(labels.data, before)
    assert not labels._undo_history  # nothing to undo


def test_a_large_volume_is_removed_in_a_worker_as_one_undoable_edit(qtbot, viewer_widget, shared_data, monkeypatch):
    """Over ``INLINE_VOXELS`` the voxel work runs off the GUI thread (as the helpers'); the edit lands as one item."""
    viewer, widget = viewer_widget
    correct = widget.panels["correct"]
    _open(viewer, _hippocampus(shared_data))
    labels = _open(viewer, _hippocampus(shared_data, "labelsTr"))
    monkeypatch.setattr(type(correct), "INLINE_VOXELS", 1000)  # the hippocampus crop (~60k voxels) counts as large
    before = np.array(labels.data, copy=True)
    gui = threading.get_ident()
    computed_on: list = []
    import napari_mambahome.panels.correct as correct_module

    real = correct_module.removal_edit

    def removal_edit(data, value):
        computed_on.append(threading.get_ident())
        return real(data, value)

    monkeypatch.setattr(correct_module, "removal_edit", removal_edit)
    asked = _answer(monkeypatch, yes=True)
    _choose(correct, 1)
    correct.remove_class_button.click()
    job = correct.helper_job
    assert job is not None
    qtbot.waitUntil(lambda: not job.running, timeout=30_000)
    qtbot.wait(20)
    assert computed_on and gui not in computed_on
    assert len(asked) == 1
    np.testing.assert_array_equal(labels.data, np.where(before == 1, 0, np.where(before == 2, 1, before)))
    assert _classes(correct) == ["1: posterior"]
    assert correct.remove_class_button.isEnabled()
    labels.undo()
    np.testing.assert_array_equal(labels.data, before)
    assert _classes(correct) == ["1: anterior", "2: posterior"]


def test_save_case_says_why_it_is_disabled_while_a_finetune_runs(qtbot, viewer_widget, shared_data, plugin_env,
                                                                 monkeypatch):
    import engine.train.finetune as engine_finetune
    from engine.cases import CaseStore
    from engine.io import load_label, load_volume

    viewer, widget = viewer_widget
    image = load_volume(_hippocampus(shared_data))
    CaseStore(plugin_env["cases"]).add(image, np.asarray(load_label(_hippocampus(shared_data, "labelsTr"),
                                                                    reference=image).data),
                                       modality="MR", class_names=HIPPO_CLASSES)
    widget.panels["cases"].refresh()
    monkeypatch.setattr(widget.panels["finetune"], "_classes_agree", lambda *a: True)  # tiny model: organ/...
    release = threading.Event()

    def waiting(*args, progress=None, **kwargs):
        release.wait(30)
        raise OSError("stopped by the test")

    monkeypatch.setattr(engine_finetune, "finetune", waiting)
    button = widget.panels["cases"].save_case_button
    assert button.isEnabled() and button.toolTip() == ""
    assert widget.panels["finetune"].finetune() is not None
    try:
        assert not button.isEnabled()
        tip = button.toolTip().lower()
        assert "fine-tune" in tip and "one job at a time" in tip
    finally:
        release.set()
    wait_job(qtbot, widget)
    assert button.isEnabled() and button.toolTip() == ""
