"""The dock widget in a real, shown napari viewer: segment, correct, cancel, bad input.

Run under a virtual display: ``xvfb-run -a python -m pytest tests/test_plugin_widget.py``.
"""
from __future__ import annotations

import time

import nibabel as nib
import numpy as np
import pytest

from plugin_support import (  # noqa: F401 - fixtures
    modality_questions, status_messages,
    TINY_CLASSES, needs_display, notifications, phantom_layer, plugin_env, tiny_checkpoint, viewer_widget, wait_job,
)

pytestmark = pytest.mark.gui


def _errors(notes):
    return [m for s, m in notes if s == "error"]


def test_real_nifti_through_reader_segments_into_labels_layer(viewer_widget, qtbot, shared_data):
    viewer, widget = viewer_widget
    path = sorted((shared_data / "hippocampus" / "imagesTr").glob("*.nii.gz"))[0]
    [image] = viewer.open(str(path), plugin="napari-mambahome")
    ref = nib.load(str(path))
    display = image.metadata["mambahome"]["display"]  # the reader's radiological view of the file
    display_shape = tuple(ref.shape[i] for i in display["order"])
    np.testing.assert_allclose(image.scale, [ref.header.get_zooms()[i] for i in display["order"]])
    widget.panels["segment"].image_combo.setCurrentText(image.name)
    job = widget.panels["segment"].segment()
    assert job is not None
    wait_job(qtbot, widget)
    assert job.outcome == "done", widget.status_label.text()
    labels = viewer.layers[f"{image.name} labels"]
    assert labels.data.shape == image.data.shape == display_shape
    np.testing.assert_allclose(labels.scale, image.scale)
    np.testing.assert_allclose(labels.translate, image.translate)
    meta = labels.metadata["mambahome"]
    np.testing.assert_array_equal(np.asarray(meta["affine"]), ref.affine)
    assert meta["class_names"] == TINY_CLASSES and meta["edited"] is False
    assert list(labels.features["class"]) == TINY_CLASSES
    assert [name for _, name, _ in widget.panels["correct"].legend.entries] == TINY_CLASSES[1:]
    assert labels.metadata["mambahome"]["display"] == display
    # the label map is the model's prediction (file voxel order), shown in the image layer's order
    flips = [a for a, f in enumerate(display["flip"]) if f]
    np.testing.assert_array_equal(labels.data, np.flip(np.transpose(widget.session.last_prediction.labels,
                                                                    display["order"]), flips))


def test_segmenting_again_does_not_overwrite_user_edits(viewer_widget, qtbot, monkeypatch):
    from qtpy.QtWidgets import QMessageBox

    viewer, widget = viewer_widget
    layer, _ = phantom_layer(viewer)
    widget.panels["segment"].image_combo.setCurrentText(layer.name)
    widget.panels["segment"].segment()
    wait_job(qtbot, widget)
    labels = viewer.layers[f"{layer.name} labels"]
    # a user brush stroke through napari's own API
    labels.selected_label = 2
    labels.paint((5, 5, 5), 2)
    assert labels.metadata["mambahome"]["edited"] is True
    edited = labels.data.copy()

    asked = []
    monkeypatch.setattr(QMessageBox, "question", lambda *a, **k: asked.append(a[2]) or QMessageBox.StandardButton.No)
    widget.panels["segment"].segment()
    wait_job(qtbot, widget)
    assert len(asked) == 1 and "your edits" in asked[0]
    np.testing.assert_array_equal(labels.data, edited)  # kept
    second = viewer.layers[f"{layer.name} labels (2)"]
    assert second.data.shape == edited.shape
    # ... and still the labels corrected, prompted on and saved: the new layer took the choice and the class box
    assert widget.session.labels_layer is labels and widget.session.image_layer is layer
    assert widget.panels["correct"].labels_combo.currentText() == labels.name

    # saying Yes replaces the edited layer's data in place
    monkeypatch.setattr(QMessageBox, "question", lambda *a, **k: QMessageBox.StandardButton.Yes)
    widget.panels["segment"].image_combo.setCurrentText(layer.name)
    widget.panels["segment"].segment()
    wait_job(qtbot, widget)
    np.testing.assert_array_equal(labels.data, widget.session.last_prediction.labels)
    assert labels.metadata["mambahome"]["edited"] is False
    assert len([lyr for lyr in viewer.layers if lyr.name.startswith(f"{layer.name} labels")]) == 2

    # edited, then renamed: Segment again replaces nothing (another name), and the renamed edits stay chosen (the new
    # result took the choice without a word, and Save saved the raw output as the case)
    seen = status_messages(widget)
    labels.paint((6, 6, 6), 2)
    labels.name = "organ (my edits)"
    edited = labels.data.copy()
    widget.panels["segment"].segment()
    wait_job(qtbot, widget)
    np.testing.assert_array_equal(labels.data, edited)
    assert widget.session.labels_layer is labels and widget.panels["correct"].labels_combo.currentText() == labels.name
    new = viewer.layers[f"{layer.name} labels"]
    assert new is not labels and any(f"your edited 'organ (my edits)' stays the labels you correct and save" in m
                                     for m in seen)


def test_helpers_change_selected_class_and_undo(viewer_widget, qtbot):
    viewer, widget = viewer_widget
    data = np.zeros((20, 20, 20), np.uint8)
    data[2:10, 2:10, 2:10] = 1          # big component of class 1 ...
    data[5, 5, 5] = 0                   # ... with an enclosed hole
    data[15:17, 15:17, 15:17] = 1       # small island of class 1 (8 voxels)
    data[12:18, 2:6, 2:6] = 2           # class 2 must never be touched
    labels = viewer.add_labels(data.copy(), name="edit me", scale=(2, 2, 2))
    widget.panels["correct"].labels_combo.setCurrentText("edit me")
    widget.panels["correct"].class_combo.setCurrentIndex(widget.panels["correct"].class_combo.findData(1))
    assert widget.panels["correct"].selected_class == 1 and labels.selected_label == 1

    changed = widget.panels["correct"].run_helper("Fill holes")
    assert changed == 1 and labels.data[5, 5, 5] == 1
    widget.panels["correct"].island_spin.setValue(9)
    changed = widget.panels["correct"].run_helper("Remove small islands")
    assert changed == 8 and not labels.data[15:17, 15:17, 15:17].any()
    np.testing.assert_array_equal(labels.data == 2, data == 2)

    assert "(Undo reverts)" in widget.status_label.text()
    widget.panels["correct"].undo()
    np.testing.assert_array_equal(labels.data[15:17, 15:17, 15:17], 1)   # island back
    # the status line says the press did something (it kept the helper's "... (Undo reverts)")
    assert "undid the last edit of 'edit me'" in widget.status_label.text()
    assert labels.data[5, 5, 5] == 1                                       # earlier edit kept
    widget.panels["correct"].undo()
    np.testing.assert_array_equal(labels.data, data)                       # back to the start

    widget.panels["correct"].run_helper("Keep largest component")
    assert not labels.data[15:17, 15:17, 15:17].any() and labels.data[3, 3, 3] == 1
    widget.panels["correct"].run_helper("Clear class")
    assert not (labels.data == 1).any() and (labels.data == 2).sum() == (data == 2).sum()
    labels.undo()  # napari's own undo (Ctrl+Z) reverts a helper too
    assert (labels.data == 1).sum() == 8 * 8 * 8 - 1  # the big component, hole and all


def test_cancel_segmentation_leaves_layers_unchanged(viewer_widget, qtbot):
    viewer, widget = viewer_widget
    # long along one axis: many window batches, so the cancel lands well before the last one (at 96^3 the windows
    # were two batches, and a loaded machine sometimes finished both before the click reached the worker)
    big = np.random.default_rng(0).normal(0, 100, (96, 96, 320)).astype(np.float32)
    viewer.add_image(big, name="big")
    widget.panels["segment"].image_combo.setCurrentText("big")
    before = [lyr.name for lyr in viewer.layers]
    reports = []
    job = widget.panels["segment"].segment()
    job.relay.progress.connect(lambda d, t, m: reports.append((d, t)))
    qtbot.waitUntil(lambda: any(t > 0 for _, t in reports), timeout=60_000)
    widget.panels["segment"].cancel_button.click()
    wait_job(qtbot, widget)
    assert job.outcome == "cancelled"
    assert [lyr.name for lyr in viewer.layers] == before
    assert "cancelled" in widget.status_label.text()
    assert widget.panels["segment"].segment_button.isEnabled() and not widget.panels["segment"].cancel_button.isEnabled()
    assert reports[-1][0] < reports[-1][1]  # it stopped before the last window


def test_event_loop_serves_while_segmenting(viewer_widget, qtbot):
    from qtpy.QtCore import QTimer

    viewer, widget = viewer_widget
    viewer.add_image(np.random.default_rng(1).normal(0, 100, (96, 96, 96)).astype(np.float32), name="vol")
    widget.panels["segment"].image_combo.setCurrentText("vol")
    job = widget.panels["segment"].segment()
    delays = []
    while job.running and len(delays) < 10:
        start = time.perf_counter()
        fired = []
        QTimer.singleShot(0, lambda: fired.append(time.perf_counter()))
        qtbot.waitUntil(lambda: bool(fired), timeout=2000)
        if job.running:  # only timings taken while the worker computes count
            delays.append(fired[0] - start)
    widget.session.cancel_job()
    wait_job(qtbot, widget)
    assert len(delays) >= 3, "segmentation finished too fast to measure; use a larger volume"
    assert max(delays) < 0.25, delays


def test_screenshot_shows_image_and_labels(viewer_widget, qtbot):
    viewer, widget = viewer_widget
    layer, _ = phantom_layer(viewer)
    widget.panels["segment"].image_combo.setCurrentText(layer.name)
    widget.panels["segment"].segment()
    wait_job(qtbot, widget)
    shot = viewer.screenshot(canvas_only=True, flash=False)
    assert shot.ndim == 3 and shot.shape[2] == 4
    rgb = shot[..., :3].astype(int)
    assert rgb.std() > 10                     # not blank
    assert (np.abs(rgb[..., 0] - rgb[..., 2]) > 40).mean() > 0.001   # coloured labels over grey image


@pytest.mark.parametrize("kind", ["2d", "rgb"])
def test_2d_and_rgb_images_are_refused_with_a_message(viewer_widget, notifications, kind):
    viewer, widget = viewer_widget
    if kind == "2d":
        viewer.add_image(np.zeros((40, 50), np.float32), name="flat")
    else:
        viewer.add_image(np.zeros((40, 50, 3), np.uint8), name="flat", rgb=True)
    widget.panels["segment"].image_combo.setCurrentText("flat")
    n_layers = len(viewer.layers)
    assert widget.panels["segment"].segment() is None
    errors = _errors(notifications)
    assert errors and "flat" in errors[-1] and ("3D" in errors[-1] or "RGB" in errors[-1])
    assert len(viewer.layers) == n_layers and widget.panels["segment"].segment_button.isEnabled()


def test_an_image_with_nan_voxels_is_refused_with_a_message_not_segmented_to_nothing(viewer_widget, qtbot,
                                                                                       notifications):
    # a layer made in napari (another reader, a computed image) can hold NaNs; the file reader refuses them,
    # but the dock used to segment such a layer anyway and report "nothing found" with no word about why
    viewer, widget = viewer_widget
    data = np.random.default_rng(2).normal(size=(24, 32, 32)).astype(np.float32)
    data[3:6] = np.nan
    viewer.add_image(data, name="holes")
    widget.panels["segment"].image_combo.setCurrentText("holes")
    job = widget.panels["segment"].segment()
    assert job is not None
    wait_job(qtbot, widget)
    assert job.outcome == "error"
    errors = _errors(notifications)
    assert errors and "holes" in errors[-1] and "3072 of 24576 voxels are NaN or infinite" in errors[-1]
    assert "holes labels" not in [layer.name for layer in viewer.layers]


def test_a_nifti_with_nan_voxels_opens_for_viewing_and_segment_names_it(viewer_widget, qtbot, notifications,
                                                                           tmp_path):
    """The reader refused such a file outright, and napari fell back to "no reader plugin" for it: the user could
    not even look at the scan to see where the NaN voxels are. Shown with a warning; Segment refuses it by name."""
    import nibabel as nib

    viewer, widget = viewer_widget
    data = np.random.default_rng(3).normal(size=(20, 24, 28)).astype(np.float32)
    data[:, :2] = np.nan  # a scan exported with NaN outside its field of view
    path = tmp_path / "nan_fov.nii.gz"
    nib.save(nib.Nifti1Image(data, np.diag([0.8, 0.8, 2.0, 1.0])), str(path))
    [layer] = viewer.open(str(path), plugin="napari-mambahome")
    assert layer.data.shape == (28, 24, 20) and np.isnan(layer.data).sum() == 20 * 2 * 28
    assert np.all(np.isfinite(layer.contrast_limits))
    assert any(kind == "warning" and "nan_fov.nii.gz" in m and "1120 of 13440 voxels are NaN or infinite" in m
               and "refuse this image" in m for kind, m in notifications)
    widget.panels["segment"].image_combo.setCurrentText(layer.name)
    job = widget.panels["segment"].segment()
    if job is not None:
        wait_job(qtbot, widget)
        assert job.outcome == "error"
    errors = _errors(notifications)
    assert errors and "nan_fov" in errors[-1] and "1120 of 13440 voxels are NaN or infinite" in errors[-1]
    assert f"{layer.name} labels" not in [la.name for la in viewer.layers]


def test_image_without_spacing_assumes_1mm_and_says_so(viewer_widget, qtbot, notifications):
    viewer, widget = viewer_widget
    viewer.add_image(np.random.default_rng(2).normal(size=(32, 32, 32)).astype(np.float32), name="raw")
    widget.panels["segment"].image_combo.setCurrentText("raw")
    job = widget.panels["segment"].segment()
    assert job is not None
    assert any("raw" in m and "1 mm" in m for s, m in notifications if s == "warning")
    wait_job(qtbot, widget)
    assert job.outcome == "done"
    np.testing.assert_allclose(viewer.layers["raw labels"].scale, (1, 1, 1))


def test_checkpoint_not_ours_is_refused(viewer_widget, tmp_path, notifications):
    import torch
    from safetensors.torch import save_file

    viewer, widget = viewer_widget
    selected = widget.session.current_model
    pickle = tmp_path / "model.pth"
    torch.save({"w": torch.zeros(2)}, pickle)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    for path in (pickle, foreign, tmp_path / "missing.safetensors"):
        assert widget.session.load_model_file(path) is None
        assert path.name in _errors(notifications)[-1]
    assert "pickle" in _errors(notifications)[0]
    assert widget.session.current_model is selected


def test_closing_viewer_while_segmenting_stops_worker(viewer_widget, qtbot):
    viewer, widget = viewer_widget
    viewer.add_image(np.random.default_rng(0).normal(0, 100, (96, 96, 96)).astype(np.float32), name="big")
    widget.panels["segment"].image_combo.setCurrentText("big")
    reports = []
    job = widget.panels["segment"].segment()
    job.relay.progress.connect(lambda d, t, m: reports.append((d, t)))
    qtbot.waitUntil(lambda: any(t > 0 for _, t in reports), timeout=60_000)
    viewer.close()
    qtbot.waitUntil(lambda: not job.running, timeout=60_000)
    assert job.outcome == "cancelled"
    assert job.token.cancelled
    assert "big labels" not in [lyr.name for lyr in viewer.layers]


def test_manifest_contributions_work_in_napari(make_napari_viewer, plugin_env, tmp_path):
    needs_display()
    from napari_mambahome._widget import MambaHoMEWidget

    viewer = make_napari_viewer(show=True)
    [ct] = viewer.open_sample("napari-mambahome", "ct_phantom")
    assert ct.data.shape == (64, 64, 48) and tuple(ct.scale) == (1.5, 1.5, 2.0)
    assert ct.metadata["mambahome"]["modality"] == "CT"
    _, widget = viewer.window.add_plugin_dock_widget("napari-mambahome", "Mamba-HoME")
    assert isinstance(widget, MambaHoMEWidget)
    assert widget.panels["segment"].image_combo.currentText() == ct.name and widget.panels["segment"].modality_combo.currentText() == "CT"
    # napari's own File > Save path goes through the plugin writer and keeps the source affine
    labels = viewer.add_labels((ct.data > 100).astype(np.uint8), name="bright", scale=ct.scale,
                               translate=ct.translate, metadata=dict(ct.metadata))
    viewer.layers.selection = {labels}
    [saved] = viewer.layers.save(str(tmp_path / "bright.nii.gz"), selected=True, plugin="napari-mambahome")
    back = nib.load(saved)
    # the sample lives in memory (float64 affine); NIfTI stores it as float32
    np.testing.assert_allclose(back.affine, ct.metadata["mambahome"]["volume"].affine, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(back.dataobj), labels.data)


def test_gpu_choice_without_cuda_falls_back_with_a_warning(viewer_widget, notifications):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    _, widget = viewer_widget
    widget.panels["model"].device_combo.setCurrentText("GPU")
    assert widget.session.device == "auto"
    assert any("no CUDA GPU" in m for s, m in notifications if s == "warning")


def test_hand_made_labels_layer_with_the_result_name_is_not_overwritten(viewer_widget, qtbot, monkeypatch):
    from qtpy.QtWidgets import QMessageBox

    viewer, widget = viewer_widget
    layer, _ = phantom_layer(viewer)
    mine = np.zeros(layer.data.shape, np.uint8)
    mine[3:9, 3:9, 3:9] = 2
    hand = viewer.add_labels(mine.copy(), name=f"{layer.name} labels")
    asked = []
    monkeypatch.setattr(QMessageBox, "question", lambda *a, **k: asked.append(a[2]) or QMessageBox.StandardButton.No)
    widget.panels["segment"].image_combo.setCurrentText(layer.name)
    widget.panels["segment"].segment()
    wait_job(qtbot, widget)
    assert len(asked) == 1
    np.testing.assert_array_equal(hand.data, mine)
    assert f"{layer.name} labels (2)" in [lyr.name for lyr in viewer.layers]
