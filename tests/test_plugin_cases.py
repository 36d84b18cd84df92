"""Saving corrected cases from the widget into engine's CaseStore, and refusing bad folders/layers.

Run under a virtual display: ``xvfb-run -a python -m pytest tests/test_plugin_cases.py``.
"""
from __future__ import annotations

import os
import shutil
import subprocess

import nibabel as nib
import numpy as np
import pytest

from plugin_support import (  # noqa: F401 - fixtures
    saved_case,
    modality_questions,
    TINY_CLASSES, notifications, phantom_layer, plugin_env, tiny_checkpoint, viewer_widget, wait_job,
)

pytestmark = pytest.mark.gui


def _errors(notes):
    return [m for s, m in notes if s == "error"]


def _open_pair(viewer, widget, tmp_volume):
    img_path, lab_path, affine = tmp_volume
    # marked a label map, as this plugin saves a segmentation: its values (1, 2) fit the model's classes, so they take
    # the model's names; a label file from elsewhere that names nothing shows "label N"
    # (tests/test_napari_walk5b_label_names.py)
    label = nib.load(str(lab_path))
    header = label.header.copy()
    header.set_intent("label")
    nib.save(nib.Nifti1Image(np.asarray(label.dataobj), label.affine, header), str(lab_path))
    [image] = viewer.open(str(img_path), plugin="napari-mambahome")
    [labels] = viewer.open(str(lab_path), plugin="napari-mambahome")
    widget.panels["segment"].image_combo.setCurrentText(image.name)
    widget.panels["correct"].labels_combo.setCurrentText(labels.name)
    widget.panels["segment"].modality_combo.setCurrentText("MR")
    return image, labels, affine


def test_save_case_writes_image_and_labels_on_the_source_grid(qtbot, viewer_widget, tmp_volume, plugin_env, monkeypatch):
    from qtpy.QtWidgets import QMessageBox

    from engine.cases import CaseStore

    viewer, widget = viewer_widget
    image, labels, affine = _open_pair(viewer, widget, tmp_volume)
    labels.data[0:3, 0:3, 0:3] = 1  # a correction
    record = saved_case(qtbot, widget)
    assert record is not None
    store = CaseStore(plugin_env["cases"])
    assert [r.case_id for r in store.list()] == [record.case_id]
    # layers show the file in the radiological display order; the case holds the file's voxel order
    order = image.metadata["mambahome"]["display"]["order"]
    assert image.metadata["mambahome"]["display"]["flip"] == [False, False, False]
    for name, layer in (("image.nii.gz", image), ("label.nii.gz", labels)):
        expected = np.transpose(layer.data, np.argsort(order))
        back = nib.load(str(record.folder / name))
        np.testing.assert_array_equal(back.affine, affine)
        np.testing.assert_array_equal(np.asarray(back.dataobj), expected)
    assert record.modality == "MR" and record.class_names == TINY_CLASSES
    assert record.source_file == str(tmp_volume[0])
    assert widget.panels["cases"].cases_list.count() == 1 and "1 case(s): 1 MR" == widget.panels["cases"].cases_count_label.text()

    # the same scan again: the dock asks; "No" keeps the saved case and adds another
    monkeypatch.setattr(QMessageBox, "question", lambda *a, **k: QMessageBox.StandardButton.No)
    second = saved_case(qtbot, widget)
    assert second.case_id != record.case_id and widget.panels["cases"].cases_list.count() == 2

    # removing asks first; "No" keeps the case
    widget.panels["cases"].cases_list.setCurrentRow(0)
    monkeypatch.setattr(QMessageBox, "question", lambda *a, **k: QMessageBox.StandardButton.No)
    assert widget.panels["cases"].remove_selected_case() is False and len(store.list()) == 2
    monkeypatch.setattr(QMessageBox, "question", lambda *a, **k: QMessageBox.StandardButton.Yes)
    assert widget.panels["cases"].remove_selected_case() is True
    assert len(store.list()) == 1 and widget.panels["cases"].cases_list.count() == 1
    assert "removed from" in widget.status_label.text()  # said, not only seen in the list


def test_saving_a_scan_again_asks_and_replaces_its_case_instead_of_adding_a_duplicate(
        qtbot, viewer_widget, tmp_volume, plugin_env, monkeypatch):
    """An annotator saves a case, corrects more and saves again: the scan must not be stored twice silently (it would
    count twice in fine-tuning, and one copy could be held out to score a model trained on the other)."""
    from qtpy.QtWidgets import QMessageBox

    from engine.cases import CaseStore

    viewer, widget = viewer_widget
    image, labels, _ = _open_pair(viewer, widget, tmp_volume)
    labels.data[0:3, 0:3, 0:3] = 1
    first = saved_case(qtbot, widget)
    store = CaseStore(plugin_env["cases"])
    asked = []
    # Cancel: nothing is written
    monkeypatch.setattr(QMessageBox, "question",
                        lambda *a, **k: asked.append(a[2]) or QMessageBox.StandardButton.Cancel)
    labels.data[5:8, 5:8, 5:8] = 2  # more corrections
    assert saved_case(qtbot, widget) is None
    assert [r.case_id for r in store.list()] == [first.case_id] and first.case_id in asked[-1]
    # Yes: the saved case holds the new labels, still one case
    monkeypatch.setattr(QMessageBox, "question", lambda *a, **k: asked.append(a[2]) or QMessageBox.StandardButton.Yes)
    again = saved_case(qtbot, widget)
    assert again is not None and again.case_id == first.case_id and len(asked) == 2
    assert [r.case_id for r in store.list()] == [first.case_id]
    assert widget.panels["cases"].cases_list.count() == 1
    order = image.metadata["mambahome"]["display"]["order"]
    saved = np.asarray(nib.load(str(again.folder / "label.nii.gz")).dataobj)
    np.testing.assert_array_equal(saved, np.transpose(labels.data, np.argsort(order)))


def test_a_case_reopened_from_its_folder_is_the_same_scan(qtbot, viewer_widget, tmp_volume, plugin_env, monkeypatch):
    """File > Open on <case>/image.nii.gz and label.nii.gz, correct, Save: the annotator is asked whether to replace
    that case (it was saved again as a second case named "image", without a word: the scan counted twice)."""
    from qtpy.QtWidgets import QMessageBox

    from engine.cases import CaseStore

    viewer, widget = viewer_widget
    image, labels, _ = _open_pair(viewer, widget, tmp_volume)
    labels.data[0:3, 0:3, 0:3] = 1
    first = saved_case(qtbot, widget)
    store = CaseStore(plugin_env["cases"])
    viewer.layers.clear()
    [image] = viewer.open(str(first.image_path), plugin="napari-mambahome")
    [labels] = viewer.open(str(first.label_path), plugin="napari-mambahome")
    # named after the case, as its scan's layers were ("image" and "label" said nothing of which case is open)
    assert (image.name, labels.name) == (first.case_id, f"{first.case_id} labels")
    widget.panels["segment"].image_combo.setCurrentText(image.name)
    widget.panels["correct"].labels_combo.setCurrentText(labels.name)
    labels.data[5:8, 5:8, 5:8] = 2
    asked = []
    monkeypatch.setattr(QMessageBox, "question", lambda *a, **k: asked.append(a[2]) or QMessageBox.StandardButton.Yes)
    again = saved_case(qtbot, widget)
    assert len(asked) == 1 and first.case_id in asked[0] and str(tmp_volume[0]) in asked[0]
    assert again.case_id == first.case_id and [r.case_id for r in store.list()] == [first.case_id]
    assert again.source_file == str(tmp_volume[0])  # still the scan it came from, not the case's own copy
    # No: another case of the scan, named after the scan, not "image"
    monkeypatch.setattr(QMessageBox, "question", lambda *a, **k: QMessageBox.StandardButton.No)
    other = saved_case(qtbot, widget)
    assert other.case_id.startswith(first.case_id) and other.case_id != first.case_id
    assert other.source_file == str(tmp_volume[0])

    # the first case reopened again while the scan has two: the one offered is the one reopened (the newest case of
    # the scan was offered, and Yes overwrote it with the first case's labels: the second case's work was lost)
    kept_other = (other.folder / "label.nii.gz").read_bytes()
    viewer.layers.clear()
    [image] = viewer.open(str(first.image_path), plugin="napari-mambahome")
    [labels] = viewer.open(str(first.label_path), plugin="napari-mambahome")
    widget.panels["segment"].image_combo.setCurrentText(image.name)
    widget.panels["correct"].labels_combo.setCurrentText(labels.name)
    labels.data[1:2, 1:2, 1:2] = 2
    asked.clear()
    monkeypatch.setattr(QMessageBox, "question", lambda *a, **k: asked.append(a[2]) or QMessageBox.StandardButton.Yes)
    third = saved_case(qtbot, widget)
    assert asked and asked[0].startswith(f"Case {first.case_id} in ") and third.case_id == first.case_id
    assert (other.folder / "label.nii.gz").read_bytes() == kept_other
    assert sorted(r.case_id for r in store.list()) == sorted([first.case_id, other.case_id])


def test_emptied_labels_never_replace_a_saved_case_and_an_empty_new_case_is_warned_of(
        qtbot, viewer_widget, tmp_volume, plugin_env, monkeypatch, notifications):
    """An annotator's Clear class then Save (Yes, replace) replaced a corrected case with an empty one without a word.
    The save is refused naming the case it would have replaced, which stays as it was; an empty case saved as a new
    one (a scan without the structure) is saved with a warning."""
    from qtpy.QtWidgets import QMessageBox

    from engine.cases import CaseStore

    viewer, widget = viewer_widget
    image, labels, _ = _open_pair(viewer, widget, tmp_volume)
    labels.data[:] = 0
    labels.data[0:3, 0:3, 0:3] = 1
    first = saved_case(qtbot, widget)
    before = (first.folder / "label.nii.gz").read_bytes()
    labels.data[:] = 0  # the class cleared
    monkeypatch.setattr(QMessageBox, "question", lambda *a, **k: QMessageBox.StandardButton.Yes)
    assert saved_case(qtbot, widget) is None
    assert any(f"would replace case '{first.case_id}', which holds 27 labelled voxels" in m for _, m in notifications)
    assert (first.folder / "label.nii.gz").read_bytes() == before
    monkeypatch.setattr(QMessageBox, "question", lambda *a, **k: QMessageBox.StandardButton.No)  # a new case
    empty = saved_case(qtbot, widget)
    assert empty is not None and empty.case_id != first.case_id
    assert len(CaseStore(plugin_env["cases"]).list()) == 2
    assert any("it holds no class (every voxel is background)" in m for _, m in notifications)


def test_labels_of_another_shape_are_refused(qtbot, viewer_widget, tmp_volume, plugin_env, notifications):
    viewer, widget = viewer_widget
    image, _, _ = _open_pair(viewer, widget, tmp_volume)
    viewer.add_labels(np.zeros((5, 6, 7), np.uint8), name="wrong")
    widget.panels["correct"].labels_combo.setCurrentText("wrong")
    assert saved_case(qtbot, widget) is None
    assert "wrong" in _errors(notifications)[-1] and "shape" in _errors(notifications)[-1]
    assert not any(plugin_env["cases"].iterdir())


def test_each_scan_keeps_its_own_labels_and_a_scan_is_never_saved_with_anothers(qtbot, viewer_widget, plugin_env,
                                                                                   notifications):
    """Two scans of one matrix size (as CT series often are): choosing a scan chooses its labels, and saving a
    scan with the other scan's labels (same shape, so the shape check passed) is refused."""
    viewer, widget = viewer_widget
    segment, correct = widget.panels["segment"], widget.panels["correct"]
    scans = [phantom_layer(viewer, seed=seed)[0] for seed in (3, 4)]
    assert scans[0].name != scans[1].name and scans[0].data.shape == scans[1].data.shape
    labels = []
    for scan in scans:
        segment.image_combo.setCurrentText(scan.name)
        assert segment.segment() is not None and wait_job(qtbot, widget).outcome == "done"
        labels.append(widget.session.labels_layer)
    assert labels[0] is not labels[1] and labels[1].name == f"{scans[1].name} labels"
    for scan, own in ((scans[0], labels[0]), (scans[1], labels[1]), (scans[0], labels[0])):
        segment.image_combo.setCurrentText(scan.name)
        assert widget.session.image_layer is scan and widget.session.labels_layer is own
        assert correct.labels_combo.currentText() == own.name
    correct.labels_combo.setCurrentText(labels[1].name)  # the annotator picks the other scan's labels by hand
    assert widget.session.image_layer is scans[0] and widget.session.labels_layer is labels[1]
    assert saved_case(qtbot, widget) is None
    assert f"was made for image '{scans[1].name}', not '{scans[0].name}'" in _errors(notifications)[-1]
    assert not any(plugin_env["cases"].iterdir())
    correct.labels_combo.setCurrentText(labels[0].name)
    assert saved_case(qtbot, widget) is not None
    segment.image_combo.setCurrentText(scans[1].name)
    assert widget.session.labels_layer is labels[1]
    viewer.layers.remove(labels[1])  # removing scan B's labels does not hand B scan A's (the last in the list)
    assert widget.session.image_layer is scans[1] and widget.session.labels_layer is None


def test_a_scan_gets_back_the_labels_last_chosen_with_it(qtbot, viewer_widget, plugin_env):
    """Labels napari made (its "new labels" button: no owner in their metadata) for scan A are let go on scan B
    of another shape, and chosen again when the annotator returns to A."""
    viewer, widget = viewer_widget
    segment, correct = widget.panels["segment"], widget.panels["correct"]
    a = phantom_layer(viewer, seed=3)[0]
    b = phantom_layer(viewer, shape=(24, 32, 28), seed=4)[0]
    segment.image_combo.setCurrentText(a.name)
    drawn = viewer.add_labels(np.zeros(a.data.shape, np.uint8), name="my labels", scale=a.scale)
    correct.labels_combo.setCurrentText(drawn.name)
    assert widget.session.image_layer is a and widget.session.labels_layer is drawn
    segment.image_combo.setCurrentText(b.name)
    assert widget.session.labels_layer is None  # another shape: not b's
    segment.image_combo.setCurrentText(a.name)
    assert widget.session.labels_layer is drawn
    viewer.layers.remove(drawn)
    segment.image_combo.setCurrentText(b.name)
    segment.image_combo.setCurrentText(a.name)
    assert widget.session.labels_layer is None  # removed: nothing stale comes back


def test_missing_case_folder_is_reported_not_recreated(qtbot, viewer_widget, tmp_volume, plugin_env, notifications,
                                                      monkeypatch, tmp_path):
    viewer, widget = viewer_widget
    _open_pair(viewer, widget, tmp_volume)
    gone = tmp_path / "unmounted" / "cases"
    monkeypatch.setenv("MAMBAHOME_CASES_DIR", str(gone))
    assert saved_case(qtbot, widget) is None
    assert str(gone) in _errors(notifications)[-1] and "does not exist" in _errors(notifications)[-1]
    assert not gone.exists()
    assert widget.panels["finetune"].finetune() is None  # same refusal, nothing started
    assert widget.session.job is None


@pytest.fixture
def readonly_folder(tmp_path):
    """A folder nobody can write to: chmod 555, plus the immutable flag when tests run as root."""
    folder = tmp_path / "readonly_cases"
    folder.mkdir()
    folder.chmod(0o555)
    immutable = False
    if os.geteuid() == 0 and shutil.which("chattr"):
        immutable = subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0
    try:
        (folder / "probe").touch()
    except OSError:
        pass
    else:
        (folder / "probe").unlink()
        pytest.skip("cannot make a read-only folder here (root without chattr)")
    yield folder
    if immutable:
        subprocess.run(["chattr", "-i", str(folder)], check=True)
    folder.chmod(0o755)


def test_readonly_case_folder_is_reported_and_nothing_lost(qtbot, viewer_widget, tmp_volume, notifications,
                                                           monkeypatch, readonly_folder):
    viewer, widget = viewer_widget
    _, labels, _ = _open_pair(viewer, widget, tmp_volume)
    before = labels.data.copy()
    monkeypatch.setenv("MAMBAHOME_CASES_DIR", str(readonly_folder))
    assert saved_case(qtbot, widget) is None
    message = _errors(notifications)[-1]
    assert str(readonly_folder) in message and ("read-only" in message or "writable" in message)
    np.testing.assert_array_equal(labels.data, before)
    assert list(readonly_folder.iterdir()) == []


def test_saving_a_case_writes_in_a_worker_so_napari_does_not_freeze(qtbot, viewer_widget, tmp_volume, plugin_env,
                                                                    monkeypatch):
    """Gzipping a 512x512x200 CT took 8.9 s on the GUI thread; the button now returns at once and the case is written
    by a worker from a snapshot of the labels (painting on does not change what is saved); a cancel that comes
    while it is written cannot unsave it, so the case is reported saved, not 'cancelled; nothing was changed'."""
    import threading
    import time

    from engine.cases import CaseStore

    viewer, widget = viewer_widget
    _, labels, _ = _open_pair(viewer, widget, tmp_volume)
    labels.data[0:3, 0:3, 0:3] = 1
    snapshot = labels.data.copy()
    writing, release = threading.Event(), threading.Event()
    real_add = CaseStore.add

    def slow_add(self, *args, **kwargs):  # a large volume on a slow disk
        writing.set()
        assert release.wait(30)
        return real_add(self, *args, **kwargs)

    monkeypatch.setattr(CaseStore, "add", slow_add)
    t0 = time.perf_counter()
    job = widget.panels["cases"].save_case()
    assert job is not None and time.perf_counter() - t0 < 0.5
    qtbot.waitUntil(writing.is_set, timeout=10_000)
    assert not widget.panels["cases"].save_case_button.isEnabled()  # one write at a time
    labels.data[4:6, 4:6, 4:6] = 1  # the annotator paints on while it is written
    widget.session.cancel_job()
    release.set()
    qtbot.waitUntil(lambda: not job.running, timeout=30_000)
    assert job.outcome == "done" and job.result is not None
    [record] = CaseStore(plugin_env["cases"]).list()
    order = np.argsort(labels.metadata["mambahome"]["display"]["order"])
    np.testing.assert_array_equal(np.asarray(nib.load(str(record.folder / "label.nii.gz")).dataobj),
                                  np.transpose(snapshot, order))
    assert widget.panels["cases"].save_case_button.isEnabled()


@pytest.mark.parametrize("outcome", ["written", "refused"])
def test_closing_the_dock_while_a_case_is_written_lets_it_finish_and_says_how_it_ended(
        qtbot, viewer_widget, tmp_volume, plugin_env, monkeypatch, notifications, outcome):
    # the dock's close button cancelled nothing a write could take back, but dropped what came after: a saved case
    # went unmentioned and its labels were still "unsaved edits"; a refused one was not saved without a word
    import threading

    from engine.cases import CaseStore
    from napari_mambahome._geometry import META_KEY
    from napari_mambahome._session import SAVED_KEY

    viewer, widget = viewer_widget
    image, labels, _ = _open_pair(viewer, widget, tmp_volume)
    labels.data[0:3, 0:3, 0:3] = 1
    gate, entered = threading.Event(), threading.Event()
    add = CaseStore.add

    def held(self, *args, **kwargs):
        entered.set()
        gate.wait(60)
        if outcome == "refused":
            raise ValueError("the case folder is read-only now")
        return add(self, *args, **kwargs)

    monkeypatch.setattr(CaseStore, "add", held)
    job = widget.panels["cases"].save_case()
    assert job is not None and entered.wait(60)
    viewer.window.remove_dock_widget(widget)  # the dock's ✕
    assert not widget.session.alive
    gate.set()
    qtbot.waitUntil(lambda: not job.running, timeout=60_000)
    qtbot.wait(50)
    saved = CaseStore(plugin_env["cases"]).list()
    if outcome == "written":
        assert job.outcome == "done" and [r.case_id for r in saved] == [job.result.case_id]
        assert any(s == "info" and "after the Mamba-HoME dock was closed" in m and job.result.case_id in m
                   for s, m in notifications), notifications
        assert SAVED_KEY in labels.metadata[META_KEY]  # removing the labels later does not warn of unsaved edits
    else:
        assert job.outcome == "error" and not saved
        assert any("saving the case failed" in m and "read-only now" in m for m in _errors(notifications)), notifications


def test_a_case_folder_that_cannot_be_written_still_lists_and_trains_its_cases(qtbot, viewer_widget, tmp_volume,
                                                                              plugin_env, monkeypatch, notifications):
    # a shared, read-only folder showed "0 case(s)" and refused fine-tuning, which only reads the cases
    import napari_mambahome._session as session_module

    viewer, widget = viewer_widget
    image, labels, _ = _open_pair(viewer, widget, tmp_volume)
    labels.data[0:3, 0:3, 0:3] = 1
    record = saved_case(qtbot, widget)
    assert record is not None
    cases_dir = str(plugin_env["cases"])
    real_access = session_module.os.access
    monkeypatch.setattr(session_module.os, "access",  # as a read-only mount answers (root passes mode bits)
                        lambda path, mode, **kw: False if str(path) == cases_dir else real_access(path, mode, **kw))
    store = widget.session.case_store(ask=False)
    assert store is not None and store.readonly and [r.case_id for r in store.list()] == [record.case_id]
    widget.panels["cases"].refresh()
    assert widget.panels["cases"].cases_dir_label.text() == (
        f"folder: {cases_dir} (read-only: cases can be listed and trained on, not saved or removed)")
    from qtpy.QtWidgets import QMessageBox

    asked = []  # refused before any question: "Replace the saved case?" / "Delete case …?" were asked, then refused
    monkeypatch.setattr(QMessageBox, "question", lambda *a, **k: asked.append(a[2]) or QMessageBox.StandardButton.No)
    labels.data[4:6, 4:6, 4:6] = 1
    assert widget.panels["cases"].save_case() is None
    assert widget.panels["cases"].cases_list.count() == 1
    assert any("read-only" in m and "writable case folder" in m for m in _errors(notifications)), notifications
    widget.panels["cases"].cases_list.setCurrentRow(0)
    assert widget.panels["cases"].remove_selected_case() is False
    assert not asked and [r.case_id for r in store.list()] == [record.case_id]
    assert _errors(notifications)[-1].startswith(f"could not remove case {record.case_id}: ")


def test_choosing_a_folder_while_the_environment_names_one_says_which_stays(viewer_widget, plugin_env, monkeypatch,
                                                                           tmp_path, notifications):
    # Folder... was silently ignored while MAMBAHOME_CASES_DIR was set: the label kept the other folder, no word
    from qtpy.QtWidgets import QFileDialog

    viewer, widget = viewer_widget
    other = tmp_path / "other_cases"
    other.mkdir()
    monkeypatch.setattr(QFileDialog, "getExistingDirectory", lambda *a, **k: str(other))
    assert widget.session.ask_cases_dir() == plugin_env["cases"]
    warnings = [m for s, m in notifications if s == "warning"]
    assert any("MAMBAHOME_CASES_DIR" in m and str(other) in m and "stays the case folder" in m for m in warnings)
