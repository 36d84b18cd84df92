"""The whole loop in the widget: segment -> correct -> save cases -> fine-tune in a worker.

Run under a virtual display: ``xvfb-run -a python -m pytest tests/test_plugin_finetune.py``.
"""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from plugin_support import (  # noqa: F401 - fixtures
    modality_questions,
    TINY_CLASSES, notifications, phantom_layer, plugin_env, tiny_checkpoint, viewer_widget, wait_job,
)

pytestmark = pytest.mark.gui


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _errors(notes):
    return [m for s, m in notes if s == "error"]


def _save_corrected_cases(viewer, widget, qtbot, seeds=(3, 4)):
    """Segment phantoms, 'correct' them to their ground truth, save each as a case."""
    for seed in seeds:
        layer, truth = phantom_layer(viewer, seed=seed)
        layer.name = f"phantom {seed}"
        widget.panels["segment"].image_combo.setCurrentText(layer.name)
        widget.panels["segment"].segment()
        job = wait_job(qtbot, widget)
        assert job.outcome == "done"
        labels = viewer.layers[f"{layer.name} labels"]
        labels.data = truth.astype(labels.data.dtype)  # the user's correction, in one go
        assert widget.panels["cases"].save_case() is not None


def test_finetune_two_steps_selects_new_version_with_dice(viewer_widget, qtbot, tiny_checkpoint, plugin_env):
    viewer, widget = viewer_widget
    parent = widget.session.current_model
    parent_sha = _sha(tiny_checkpoint)
    _save_corrected_cases(viewer, widget, qtbot)
    widget.panels["finetune"].steps_spin.setValue(2)
    job = widget.panels["finetune"].finetune()
    assert job is not None and not widget.panels["segment"].segment_button.isEnabled()
    wait_job(qtbot, widget, timeout=300_000)
    assert job.outcome == "done", widget.status_label.text()

    new = widget.session.current_model
    assert new is not parent and new.origin == "fine-tuned"
    assert new.parent == parent.version and new.class_names == TINY_CLASSES
    assert new.path.is_file() and plugin_env["models"] in new.path.parents
    assert widget.panels["model"].model_combo.currentText() == new.label
    assert len(widget.panels["finetune"].loss_plot.values) == 2 and all(np.isfinite(widget.panels["finetune"].loss_plot.values))
    # the new version is selected before scoring; scoring runs as the next job, timed on its own
    assert widget.session.last_finetune["dice"] is None
    assert "training" in widget.panels["finetune"].finetune_result.text()
    scoring = widget.session.job
    assert scoring is not job
    wait_job(qtbot, widget, timeout=300_000)
    assert scoring.outcome == "done", widget.status_label.text()
    assert widget.session.current_model is new
    dice = widget.session.last_finetune["dice"]
    # per class, only the classes drawn in the corrected cases (two cases: scored on the training cases)
    present = {TINY_CLASSES[v] for v in range(1, len(TINY_CLASSES))
               if any((viewer.layers[f"phantom {s} labels"].data == v).any() for s in (3, 4))}
    assert set(dice["before"]) == set(dice["after"]) == present
    assert all(0.0 <= v <= 1.0 for v in [*dice["before"].values(), *dice["after"].values()])
    text = widget.panels["finetune"].finetune_result.text()
    table = widget.panels["finetune"].scores_table
    rows = {table.item(r, 0).text(): (table.item(r, 1).text(), table.item(r, 2).text()) for r in range(table.rowCount())}
    assert rows == {n: (f"{dice['before'][n]:.3f}", f"{dice['after'][n]:.3f}") for n in present}
    assert "training case" in text and "scoring" in text
    # one checkpoint per version
    assert [p.name for p in new.path.parent.glob("*.safetensors")] == [new.path.name]
    assert _sha(tiny_checkpoint) == parent_sha  # the parent file is never written
    # CUDA graphs are asked for only where a CUDA GPU runs the steps
    run_config = json.loads((new.path.parent / "train_config.json").read_text())
    assert run_config["cuda_graphs"] is None  # auto: the engine graphs steps on one CUDA GPU

    # the versions list offers a rollback to the parent
    texts = [widget.panels["finetune"].versions_list.item(i).text() for i in range(widget.panels["finetune"].versions_list.count())]
    assert any(new.version in t and t.startswith("●") for t in texts)
    widget.panels["finetune"].versions_list.setCurrentRow(widget.session.entries.index(parent))
    widget.panels["finetune"].use_version_button.click()
    assert widget.session.current_model is parent

    # a new widget (next session) finds the fine-tuned version again, and the version used last
    from napari_mambahome._widget import MambaHoMEWidget

    widget.session.select_model(new)
    again = MambaHoMEWidget(viewer)
    assert new.path in [e.path for e in again.session.entries]
    assert again.session.current_model.path == new.path
    again.deleteLater()


def test_cancel_finetune_keeps_previous_model(viewer_widget, qtbot, tiny_checkpoint, plugin_env):
    viewer, widget = viewer_widget
    parent = widget.session.current_model
    versions = list(widget.session.entries)
    parent_sha = _sha(tiny_checkpoint)
    _save_corrected_cases(viewer, widget, qtbot, seeds=(5,))
    widget.panels["finetune"].steps_spin.setValue(500)
    reports = []
    job = widget.panels["finetune"].finetune()
    job.relay.progress.connect(lambda d, t, m: reports.append(m))
    qtbot.waitUntil(lambda: "training" in " ".join(reports), timeout=120_000)
    widget.panels["finetune"].finetune_cancel_button.click()
    wait_job(qtbot, widget, timeout=120_000)
    assert job.outcome == "cancelled"
    assert widget.session.current_model is parent and widget.session.entries == versions
    assert _sha(tiny_checkpoint) == parent_sha
    assert not plugin_env["models"].exists() or not any(plugin_env["models"].iterdir())
    assert "cancelled" in widget.panels["finetune"].finetune_result.text()
    assert widget.panels["finetune"].finetune_button.isEnabled()


def test_finetune_without_cases_is_refused(viewer_widget, notifications, plugin_env):
    viewer, widget = viewer_widget
    assert widget.panels["finetune"].finetune() is None
    assert "no saved cases" in _errors(notifications)[-1] and str(plugin_env["cases"]) in _errors(notifications)[-1]
    assert widget.session.job is None


def test_finetune_on_cases_with_other_classes_asks_first(viewer_widget, notifications, plugin_env, monkeypatch):
    from qtpy.QtWidgets import QMessageBox

    from engine.cases import CaseStore
    from engine.synth import make_phantom

    viewer, widget = viewer_widget
    image, label = make_phantom((32, 32, 32), modality="CT", seed=9).to_volumes()
    labels = np.clip(label.data, 0, 2)
    CaseStore(plugin_env["cases"]).add(image, labels, modality="CT", class_names=["background", "liver", "spleen"])
    asked = []
    monkeypatch.setattr(QMessageBox, "question", lambda *a, **k: asked.append(a[2]) or QMessageBox.StandardButton.No)
    assert widget.panels["finetune"].finetune() is None
    assert asked and "liver" in asked[0] and "organ" in asked[0]
    assert any("not started" in m and "liver" in m for s, m in notifications if s == "warning")
    assert widget.session.job is None and widget.session.current_model.version == "tiny-untrained"


def test_enough_real_cases_are_scored_on_held_out_cases_per_class(viewer_widget, qtbot, plugin_env, shared_data,
                                                                  monkeypatch):
    """Six hippocampus MRIs with new class names: a fifth is held out, scored per class, new classes start at 0."""
    from qtpy.QtWidgets import QMessageBox

    from engine.cases import CaseStore
    from engine.io import load_label, load_volume
    from napari_mambahome.panels.finetune import HELD_OUT_MIN_CASES

    viewer, widget = viewer_widget
    store = CaseStore(plugin_env["cases"])
    images = sorted((shared_data / "hippocampus" / "imagesTr").glob("*.nii.gz"))[:HELD_OUT_MIN_CASES]
    for path in images:
        image = load_volume(path)
        label = load_label(shared_data / "hippocampus" / "labelsTr" / path.name, reference=image)
        store.add(image, np.asarray(label.data), modality="MR", class_names=["background", "anterior", "posterior"])
    widget.panels["cases"].refresh()
    monkeypatch.setattr(QMessageBox, "question", lambda *a, **k: QMessageBox.StandardButton.Yes)  # new classes
    widget.panels["finetune"].steps_spin.setValue(2)
    job = widget.panels["finetune"].finetune()
    wait_job(qtbot, widget, timeout=300_000)
    assert job.outcome == "done", widget.status_label.text()
    new = widget.session.current_model
    assert new.class_names == ["background", "anterior", "posterior"]
    wait_job(qtbot, widget, timeout=300_000)
    info = widget.session.last_finetune
    split = json.loads((new.path.parent / "split.json").read_text())
    assert info["held_out"] is True and sorted(info["scored_on"]) == sorted(split["val"]) and split["val"]
    assert not set(split["val"]) & set(split["train"])
    assert set(info["dice"]["before"]) == set(info["dice"]["after"]) == {"anterior", "posterior"}
    assert info["dice"]["before"] == {"anterior": 0.0, "posterior": 0.0}  # the parent never knew these classes
    assert "held-out" in widget.panels["finetune"].finetune_result.text()
