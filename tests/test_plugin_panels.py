"""Issue 13/14 in the dock: panels over one session, classes, contrast, modality, responsiveness, width.

Run under a virtual display: ``xvfb-run -a python -m pytest tests/test_plugin_panels.py``. Real
volumes come from the shared data (abdomen CT/MRI, hippocampus MRI); the tests skip without it.
"""
from __future__ import annotations

import threading

import nibabel as nib
import numpy as np
import pytest

from plugin_support import (  # noqa: F401 - fixtures
    saved_case, status_messages,
    TINY_CLASSES, modality_questions, needs_display, notifications, plugin_env, tiny_checkpoint, viewer_widget,
    wait_job,
)

pytestmark = pytest.mark.gui


def _open(viewer, path):
    return viewer.open(str(path), plugin="napari-mambahome")[0]


def _hippocampus(shared_data, kind="imagesTr"):
    return sorted((shared_data / "hippocampus" / kind).glob("*.nii.gz"))[0]


# ---------------------------------------------------------------- panels and session
def test_a_new_panel_is_one_class_in_one_list(make_napari_viewer, plugin_env, monkeypatch):
    needs_display()
    from qtpy.QtWidgets import QLabel, QVBoxLayout

    from napari_mambahome import panels
    from napari_mambahome._widget import MambaHoMEWidget

    class Clicks(panels.Panel):
        name, title = "clicks", "Clicks"

        def __init__(self, session, parent=None):
            super().__init__(session, parent)
            self.seen = []
            QVBoxLayout(self).addWidget(QLabel("clicks"))
            session.image_changed.connect(self.seen.append)

    monkeypatch.setattr(panels, "PANELS", [*panels.PANELS, Clicks])
    monkeypatch.setattr("napari_mambahome._widget.PANELS", panels.PANELS)
    viewer = make_napari_viewer(show=True)
    dock = MambaHoMEWidget(viewer)
    other = MambaHoMEWidget(viewer)
    assert list(dock.panels) == ["model", "segment", "interactive", "contrast", "correct", "cases", "finetune",
                                 "clicks"]
    layer = viewer.add_image(np.zeros((8, 8, 8), np.float32), name="new")
    assert dock.panel("clicks").seen == [layer]
    # one session per dock: a job slot or a model choice is never shared
    assert dock.session is not other.session and dock.panel("segment").session is dock.session


def test_the_image_box_follows_a_newly_opened_or_selected_image(viewer_widget, shared_data):
    viewer, widget = viewer_widget
    segment = widget.panels["segment"]
    ct = _open(viewer, shared_data / "abdomen_ct_mr" / "ct_image.nii.gz")
    assert segment.image_combo.currentText() == ct.name and widget.session.image_layer is ct
    mr = _open(viewer, shared_data / "abdomen_ct_mr" / "mr_image.nii.gz")
    assert segment.image_combo.currentText() == mr.name
    viewer.layers.selection.active = ct  # clicked in the layer list
    assert segment.image_combo.currentText() == ct.name and widget.session.image_layer is ct


def test_no_model_is_built_on_the_gui_thread(make_napari_viewer, plugin_env, tiny_checkpoint, modality_questions,
                                              qtbot, shared_data, monkeypatch):
    """Opening the dock, choosing a model and switching images build nothing; segmenting builds in a worker."""
    needs_display()
    import engine.inference
    import engine.networks
    from napari_mambahome._widget import MambaHoMEWidget

    built = []
    real_build, real_init = engine.networks.build_network_from_spec, engine.inference.Predictor.__init__

    def build(*args, **kwargs):
        built.append(threading.current_thread() is threading.main_thread())
        return real_build(*args, **kwargs)

    def predictor_init(self, *args, **kwargs):
        built.append(threading.current_thread() is threading.main_thread())
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(engine.networks, "build_network_from_spec", build)
    monkeypatch.setattr(engine.inference.Predictor, "__init__", predictor_init)
    viewer = make_napari_viewer(show=True)
    ct = _open(viewer, shared_data / "abdomen_ct_mr" / "ct_image.nii.gz")
    widget = MambaHoMEWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Mamba-HoME")
    assert widget.session.load_model_file(tiny_checkpoint) is not None
    assert "parameters:" in widget.panels["model"].model_info.text()  # from the checkpoint header
    _open(viewer, _hippocampus(shared_data))
    widget.session.set_image(ct)
    assert built == []
    widget.panels["segment"].segment()
    wait_job(qtbot, widget, timeout=300_000)
    assert built and not any(built), built


def test_errors_go_to_the_status_line_in_full(viewer_widget, notifications):
    viewer, widget = viewer_widget
    assert widget.panels["segment"].segment() is None
    message = [m for s, m in notifications if s == "error"][-1]
    assert message in widget.status_label.text() and "open a volume" in widget.status_label.text()


def test_dock_is_wide_enough_that_no_button_text_is_clipped(viewer_widget, qtbot):
    from qtpy.QtWidgets import QPushButton

    viewer, widget = viewer_widget
    viewer.window._qt_window.resize(1280, 800)
    qtbot.wait(50)
    clipped = [(b.text(), b.width(), b.sizeHint().width()) for b in widget.findChildren(QPushButton)
               if b.isVisible() and b.width() < b.minimumSizeHint().width()]
    assert widget.width() >= widget.minimumWidth() >= 400
    assert clipped == []


# ---------------------------------------------------------------- modality
def test_guessed_modality_is_shown_as_a_guess_and_the_users_choice_wins(viewer_widget, shared_data):
    viewer, widget = viewer_widget
    segment = widget.panels["segment"]
    mr = _open(viewer, shared_data / "abdomen_ct_mr" / "mr_image.nii.gz")
    mr.metadata["modality"], mr.metadata["modality_source"] = "MR", "guessed"  # what the reader writes
    widget.session.set_image(None)
    widget.session.set_image(mr)
    assert segment.modality_combo.currentText() == "MR" and "GUESSED" in segment.modality_note.text()
    segment.modality_combo.setCurrentText("CT")
    assert widget.session.modality_of(mr) == ("CT", "user") and "your choice" in segment.modality_note.text()


def test_an_image_without_modality_is_asked_once_and_saved_as_answered(viewer_widget, qtbot, modality_questions):
    viewer, widget = viewer_widget
    raw = viewer.add_image(np.random.default_rng(0).normal(0, 50, (24, 24, 24)).astype(np.float32), name="raw")
    segment = widget.panels["segment"]
    assert segment.modality_combo.currentText() == "choose…"
    for _ in range(2):
        segment.segment()
        wait_job(qtbot, widget)
    assert len(modality_questions) == 1 and "raw" in modality_questions[0]
    assert segment.modality_combo.currentText() == "CT"   # the answer (the model's modality by default)
    record = saved_case(qtbot, widget)
    assert record.modality == "CT" and widget.session.modality_of(raw) == ("CT", "user")


# ---------------------------------------------------------------- classes
def test_label_file_takes_class_names_from_dataset_json_and_legend_follows_layer(viewer_widget, shared_data):
    viewer, widget = viewer_widget
    correct = widget.panels["correct"]
    image = _open(viewer, _hippocampus(shared_data))
    labels = _open(viewer, _hippocampus(shared_data, "labelsTr"))
    assert widget.session.labels_layer is labels
    assert [name for _, name, _ in correct.legend.entries] == ["anterior", "posterior"]
    hand = viewer.add_labels(np.zeros(image.data.shape, np.uint8), name="hand")
    hand.data[0, 0, 0] = 1
    widget.session.set_labels(None)
    widget.session.set_labels(hand)
    # no names of its own: the selected model's
    assert [name for _, name, _ in correct.legend.entries] == TINY_CLASSES[1:]
    correct.labels_combo.setCurrentText(labels.name)
    assert [name for _, name, _ in correct.legend.entries] == ["anterior", "posterior"]


def test_new_class_can_be_added_painted_recoloured_and_saved(qtbot, viewer_widget, shared_data, plugin_env):
    from engine.cases import CaseStore

    viewer, widget = viewer_widget
    correct = widget.panels["correct"]
    image = _open(viewer, _hippocampus(shared_data))
    image.metadata["modality"] = "MR"
    labels = _open(viewer, _hippocampus(shared_data, "labelsTr"))
    value = correct.add_class("tumour")
    assert value == 3 and labels.selected_label == 3 and correct.selected_class == 3
    said = status_messages(widget)
    assert correct.add_class("Tumour") is None  # names are unique, case-insensitively
    assert correct.add_class("cyst") == 4  # said: the status line kept the refusal above
    assert said[-1] == f"'{labels.name}': class 4 'cyst' added and chosen for painting", said
    labels.selected_label = 3
    labels.paint((10, 10, 10), 3)
    labels.data[1, 1, 1] = 7                    # a value painted without a name first
    assert correct.recolour_class(3, "#ff00ff")
    np.testing.assert_allclose(np.asarray(labels.get_color(3))[:3], [1, 0, 1])
    assert correct.rename_class(7, "polyp")
    record = saved_case(qtbot, widget)
    assert record is not None
    assert record.class_names == ["background", "anterior", "posterior", "tumour",
                                  "cyst", "label 5", "label 6", "polyp"]
    saved = np.asarray(nib.load(str(record.label_path)).dataobj)
    from napari_mambahome._geometry import layer_geometry

    # the layer shows the file in the reader's display order; the case holds the file's order
    assert (saved == 7).sum() == 1 and layer_geometry(labels).to_display(saved)[1, 1, 1] == 7
    assert (saved == 3).any()
    assert record.modality == "MR" and CaseStore(plugin_env["cases"]).list()[0].case_id == record.case_id
    assert "[MR]" in widget.panels["cases"].cases_list.item(0).text()


# ---------------------------------------------------------------- contrast
def test_ct_window_presets_and_mr_percentiles_on_real_volumes(viewer_widget, shared_data):
    from napari_mambahome.panels.contrast import CT_WINDOWS, PERCENTILES

    viewer, widget = viewer_widget
    contrast = widget.panels["contrast"]
    ct = _open(viewer, shared_data / "abdomen_ct_mr" / "ct_image.nii.gz")
    expected = {"CT soft tissue (W400 L40)": (-160, 240), "CT lung (W1500 L-600)": (-1350, 150),
                "CT bone (W1800 L400)": (-500, 1300), "CT brain (W80 L40)": (0, 80)}
    assert set(expected) == set(CT_WINDOWS)
    for preset, limits in expected.items():
        assert contrast.apply(preset) == limits
        np.testing.assert_allclose(ct.contrast_limits, limits)
    mr = _open(viewer, shared_data / "abdomen_ct_mr" / "mr_image.nii.gz")
    data = np.asarray(mr.data)
    lo, hi = contrast.apply("MR 1-99 percentile")
    np.testing.assert_allclose((lo, hi), np.percentile(data[data != 0], [1, 99]), rtol=1e-5)
    np.testing.assert_allclose(mr.contrast_limits, (lo, hi), rtol=1e-5)
    np.testing.assert_allclose(ct.contrast_limits, expected["CT brain (W80 L40)"])  # the other image untouched
    assert "MR 0.5-99.5 percentile" in PERCENTILES


def test_percentiles_of_a_layer_holding_nan_are_of_its_finite_voxels(viewer_widget, shared_data):
    # an in-memory layer (a script's, a computed map) may hold NaN: the status said "contrast nan to nan"
    viewer, widget = viewer_widget
    data = np.asarray(nib.load(str(shared_data / "abdomen_ct_mr" / "mr_image.nii.gz")).dataobj, np.float32)
    holed = data.copy()
    holed[:, :, :3] = np.nan
    layer = viewer.add_image(holed, name="with nan")
    widget.session.set_image(layer)
    lo, hi = widget.panels["contrast"].apply("MR 1-99 percentile")
    finite = holed[np.isfinite(holed)]
    np.testing.assert_allclose((lo, hi), np.percentile(finite[finite != 0], [1, 99]), rtol=1e-5)


def test_the_labels_box_is_blank_when_the_chosen_scan_has_no_labels(qtbot, viewer_widget, shared_data):
    # the box kept showing the previous scan's labels while every Correct button was off
    viewer, widget = viewer_widget
    mr = _open(viewer, shared_data / "abdomen_ct_mr" / "mr_image.nii.gz")
    labels = viewer.add_labels(np.zeros(np.shape(mr.data), np.uint8), name="mr labels")
    widget.session.set_labels(labels)
    correct = widget.panels["correct"]
    assert correct.labels_combo.currentText() == "mr labels"
    ct = _open(viewer, shared_data / "abdomen_ct_mr" / "ct_image.nii.gz")
    assert widget.session.image_layer is ct and widget.session.labels_layer is None
    assert correct.labels_combo.currentText() == ""
    viewer.layers.selection.active = mr  # back to the scan with labels: they come with it
    qtbot.waitUntil(lambda: correct.labels_combo.currentText() == "mr labels", timeout=5000)


# ---------------------------------------------------------------- which labels belong to which scan
def test_a_scan_closed_while_segmented_gets_no_labels_and_is_not_chosen_again(qtbot, viewer_widget, shared_data,
                                                                              notifications):
    viewer, widget = viewer_widget
    first = _open(viewer, _hippocampus(shared_data))
    second = _open(viewer, sorted((shared_data / "hippocampus" / "imagesTr").glob("*.nii.gz"))[1])
    for layer in (first, second):
        layer.metadata["modality"] = "MR"
    widget.session.set_image(second)
    job = widget.panels["segment"].segment()
    assert job is not None
    viewer.layers.remove(second)
    qtbot.waitUntil(lambda: not job.running, timeout=120_000)
    qtbot.wait(50)
    assert widget.session.image_layer is first  # not the closed scan, which would be segmented or saved next
    assert [layer.name for layer in viewer.layers] == [first.name]
    assert any("was closed while it was being segmented" in m for s, m in notifications if s == "warning")


def test_labels_stay_with_their_scan_through_renames_and_a_same_named_scan_of_another_file(
        qtbot, viewer_widget, shared_data, tmp_path, monkeypatch):
    """Labels were tied to their image by the layer's name: a second patient's scan opened as ``ct_image`` took the
    first one's labels (and saved them as its case), and Segment on it offered to overwrite them."""
    import shutil

    from qtpy.QtWidgets import QMessageBox

    viewer, widget = viewer_widget
    session = widget.session
    asked = []
    monkeypatch.setattr(QMessageBox, "question", lambda *a, **k: asked.append(a) or QMessageBox.StandardButton.Yes)
    src = _hippocampus(shared_data)
    for patient in ("a", "b"):
        (tmp_path / patient).mkdir()
        shutil.copy(src, tmp_path / patient / "scan.nii.gz")
    a = _open(viewer, tmp_path / "a" / "scan.nii.gz")
    a.metadata["modality"] = "MR"
    wait_segment = widget.panels["segment"].segment()
    qtbot.waitUntil(lambda: not wait_segment.running, timeout=120_000)
    labels_a = session.labels_layer
    assert labels_a is not None and labels_a.name == "scan labels"
    labels_a.data[0, 0, 0] = 2  # the annotator's correction
    labels_a.metadata["mambahome"]["edited"] = True

    a.name = "patient A"  # renamed: its labels stay its own
    assert session.labels_made_for(a) is labels_a
    b = _open(viewer, tmp_path / "b" / "scan.nii.gz")  # another file under A's old name
    b.metadata["modality"] = "MR"
    session.set_image(b)
    assert session.labels_made_for(b) is None and session.labels_belong_elsewhere(labels_a, b)
    assert session.labels_layer is not labels_a
    job = widget.panels["segment"].segment()
    qtbot.waitUntil(lambda: not job.running, timeout=120_000)
    assert not asked  # not asked to replace A's edited labels, which are another scan's
    assert labels_a.data[0, 0, 0] == 2 and session.labels_layer is not labels_a
    assert session.labels_made_for(b) is session.labels_layer

    viewer.layers.remove(a)  # A closed, its labels kept: still not B's (another file)
    assert session.labels_belong_elsewhere(labels_a, b) and session.labels_made_for(b) is not labels_a
    again = _open(viewer, tmp_path / "a" / "scan.nii.gz")  # A opened again: its labels are its own again
    assert not session.labels_belong_elsewhere(labels_a, again)
    assert session.labels_made_for(again) is labels_a


def test_classes_added_after_a_recolour_are_visible_and_hover_shows_new_names(viewer_widget, shared_data):
    viewer, widget = viewer_widget
    correct = widget.panels["correct"]
    _open(viewer, _hippocampus(shared_data))
    labels = _open(viewer, _hippocampus(shared_data, "labelsTr"))
    assert correct.recolour_class(1, "#ff00ff")
    value = correct.add_class("tumour")
    labels.data[2, 2, 2] = value
    labels.data[3, 3, 3] = 9  # painted before it has a name
    for v in (value, 9):
        assert np.asarray(labels.get_color(v))[3] > 0, v  # drawn, not transparent
    np.testing.assert_allclose(np.asarray(labels.get_color(1))[:3], [1, 0, 1])
    assert correct.rename_class(1, "head")
    assert list(labels.features["class"])[:2] == ["background", "head"]


def test_a_saved_case_reopens_with_its_class_names_and_modality(qtbot, viewer_widget, shared_data, plugin_env):
    viewer, widget = viewer_widget
    correct = widget.panels["correct"]
    image = _open(viewer, _hippocampus(shared_data))
    image.metadata["modality"], image.metadata["modality_source"] = "MR", "user"
    _open(viewer, _hippocampus(shared_data, "labelsTr"))
    assert correct.rename_class(1, "head")
    record = saved_case(qtbot, widget)
    assert record is not None and record.class_names == ["background", "head", "posterior"]
    reopened_image = _open(viewer, record.image_path)
    assert (reopened_image.metadata["modality"], reopened_image.metadata["modality_source"]) == ("MR", "file")
    reopened = _open(viewer, record.label_path)
    widget.session.set_labels(reopened)
    assert [name for _, name, _ in correct.legend.entries] == ["head", "posterior"]


def test_a_model_whose_weights_fail_their_checksum_is_taken_off_the_list_and_not_chosen_again(
        qtbot, viewer_widget, plugin_env, tmp_path, notifications):
    # a file changed after it was chosen stayed chosen after Segment found it damaged, and was chosen at every start
    from plugin_support import phantom_layer, wait_job, write_tiny_checkpoint

    from napari_mambahome import _settings

    viewer, widget = viewer_widget
    bad = write_tiny_checkpoint(tmp_path / "bad.safetensors", version="tiny-damaged")
    data = bytearray(bad.read_bytes())
    data[-64:] = bytes(255 - b for b in data[-64:])  # the last weights' bytes: same size, same header
    bad.write_bytes(bytes(data))
    entry = widget.session.load_model_file(bad)
    assert entry is not None and widget.session.current_model is entry  # its header alone is read at load
    phantom_layer(viewer)
    assert widget.panels["segment"].segment() is not None
    wait_job(qtbot, widget)
    errors = [m for s, m in notifications if s == "error"]
    assert any("checksum" in m and "taken off the Model list" in m for m in errors), errors
    assert widget.session.current_model is not entry and entry not in widget.session.entries
    assert _settings.load_settings().get("model") != str(bad)
