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
        widget.image_combo.setCurrentText(layer.name)
        widget.segment()
        job = wait_job(qtbot, widget)
        assert job.outcome == "done"
        labels = viewer.layers[f"{layer.name} labels"]
        labels.data = truth.astype(labels.data.dtype)  # the user's correction, in one go
        assert widget.save_case() is not None


def test_finetune_two_steps_selects_new_version_with_dice(viewer_widget, qtbot, tiny_checkpoint, plugin_env):
    viewer, widget = viewer_widget
    parent = widget.current_model
    parent_sha = _sha(tiny_checkpoint)
    _save_corrected_cases(viewer, widget, qtbot)
    widget.steps_spin.setValue(2)
    job = widget.finetune()
    assert job is not None and not widget.segment_button.isEnabled()
    wait_job(qtbot, widget, timeout=300_000)
    assert job.outcome == "done", widget.status_label.text()

    new = widget.current_model
    assert new is not parent and new.origin == "fine-tuned"
    assert new.parent == parent.version and new.class_names == TINY_CLASSES
    assert new.path.is_file() and plugin_env["models"] in new.path.parents
    assert widget.model_combo.currentText() == new.label
    assert len(widget.loss_plot.values) == 2 and all(np.isfinite(widget.loss_plot.values))
    dice = widget.last_finetune["dice"]
    assert 0.0 <= dice["before"] <= 1.0 and 0.0 <= dice["after"] <= 1.0
    assert f"{dice['before']:.3f}" in widget.finetune_result.text()
    assert _sha(tiny_checkpoint) == parent_sha  # the parent file is never written
    # CUDA graphs are asked for only where a CUDA GPU runs the steps
    run_config = json.loads((new.path.parent / "train_config.json").read_text())
    assert run_config["cuda_graphs"] is (widget.device != "cpu" and torch.cuda.is_available())

    # the versions list offers a rollback to the parent
    texts = [widget.versions_list.item(i).text() for i in range(widget.versions_list.count())]
    assert any(new.version in t and t.startswith("●") for t in texts)
    widget.versions_list.setCurrentRow(widget.entries.index(parent))
    widget.use_version_button.click()
    assert widget.current_model is parent

    # a new widget (next session) finds the fine-tuned version again, and the version used last
    from napari_mambahome._widget import MambaHoMEWidget

    widget.select_model(new)
    again = MambaHoMEWidget(viewer)
    assert new.path in [e.path for e in again.entries]
    assert again.current_model.path == new.path
    again.deleteLater()


def test_cancel_finetune_keeps_previous_model(viewer_widget, qtbot, tiny_checkpoint, plugin_env):
    viewer, widget = viewer_widget
    parent = widget.current_model
    versions = list(widget.entries)
    parent_sha = _sha(tiny_checkpoint)
    _save_corrected_cases(viewer, widget, qtbot, seeds=(5,))
    widget.steps_spin.setValue(500)
    reports = []
    job = widget.finetune()
    job.relay.progress.connect(lambda d, t, m: reports.append(m))
    qtbot.waitUntil(lambda: "training" in " ".join(reports), timeout=120_000)
    widget.finetune_cancel_button.click()
    wait_job(qtbot, widget, timeout=120_000)
    assert job.outcome == "cancelled"
    assert widget.current_model is parent and widget.entries == versions
    assert _sha(tiny_checkpoint) == parent_sha
    assert not plugin_env["models"].exists() or not any(plugin_env["models"].iterdir())
    assert "cancelled" in widget.finetune_result.text()
    assert widget.finetune_button.isEnabled()


def test_finetune_without_cases_is_refused(viewer_widget, notifications, plugin_env):
    viewer, widget = viewer_widget
    assert widget.finetune() is None
    assert "no saved cases" in _errors(notifications)[-1] and str(plugin_env["cases"]) in _errors(notifications)[-1]
    assert widget.job is None


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
    assert widget.finetune() is None
    assert asked and "liver" in asked[0] and "organ" in asked[0]
    assert any("not started" in m and "liver" in m for s, m in notifications if s == "warning")
    assert widget.job is None and widget.current_model.version == "tiny-untrained"
