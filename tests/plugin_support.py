"""Fixtures shared by the napari plugin tests (imported by tests/test_plugin_*.py).

GUI tests need a display: run them as ``xvfb-run -a python -m pytest tests/test_plugin_*.py``; they
are skipped, visibly, when no display is available.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np
import pytest

TINY_CLASSES = ["background", "organ", "vessel", "gland"]


def needs_display() -> None:
    if not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        pytest.skip("napari GUI tests need a display: run them under `xvfb-run -a python -m pytest ...`")


def write_tiny_checkpoint(path: Path, class_names: List[str] = TINY_CLASSES, modality: str = "CT",
                          patch: int = 64, seed: int = 0, version: str = "tiny-untrained") -> Path:
    """An untrained tiny-preset Mamba-HoME checkpoint with complete metadata (fast on CPU).

    A 64^3 sliding-window patch covers the small test volumes in one window (fast); the 96^3 volumes
    of the cancel tests still take several windows, so there is a "between windows" to cancel at.
    """
    import torch

    from engine.checkpoint import save_checkpoint
    from engine.config import ModelConfig
    from engine.model import MambaHoME
    from engine.preprocess import Preprocessing

    torch.manual_seed(seed)
    model = MambaHoME(ModelConfig.preset("tiny", in_channels=1, num_classes=len(class_names)))
    meta = {"class_names": list(class_names), "modality": modality,
            "preprocessing": Preprocessing.for_modality(modality).to_dict(), "patch_size": [patch] * 3,
            "version": version, "provenance": {"note": "untrained, for tests"}}
    return save_checkpoint(path, model, meta)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("models") / "tiny.safetensors")


@pytest.fixture
def plugin_env(tmp_path, monkeypatch) -> Dict[str, Path]:
    """Case, model and settings folders of the plugin redirected into the test's tmp folder."""
    dirs = {"cases": tmp_path / "cases", "models": tmp_path / "models", "config": tmp_path / "config"}
    dirs["cases"].mkdir()
    monkeypatch.setenv("MAMBAHOME_CASES_DIR", str(dirs["cases"]))
    monkeypatch.setenv("MAMBAHOME_MODELS_DIR", str(dirs["models"]))
    monkeypatch.setenv("MAMBAHOME_CONFIG_DIR", str(dirs["config"]))
    return dirs


@pytest.fixture
def notifications() -> List[Tuple[str, str]]:
    """Every napari notification raised during the test, as ``(severity, message)``."""
    from napari.utils.notifications import notification_manager

    seen: List[Tuple[str, str]] = []

    def record(notification: Any) -> None:  # a napari Notification is the event itself
        seen.append((str(notification.severity), str(notification.message)))

    notification_manager.notification_ready.connect(record)
    yield seen
    notification_manager.notification_ready.disconnect(record)


def answer_modality_questions(monkeypatch) -> List[str]:
    """Answer the dock's "What kind of image is ...?" question with its default (the model's modality).

    Returns:
        The questions asked, in order (a modal dialog would stop a test).
    """
    from qtpy.QtWidgets import QInputDialog

    asked: List[str] = []

    def get_item(parent, title, label, items, current=0, editable=True, *args, **kwargs):
        asked.append(label)
        return items[current], True

    monkeypatch.setattr(QInputDialog, "getItem", staticmethod(get_item))
    return asked


@pytest.fixture
def modality_questions(monkeypatch) -> List[str]:
    """The modality questions the dock asked during the test (answered with the default)."""
    return answer_modality_questions(monkeypatch)


@pytest.fixture
def viewer_widget(make_napari_viewer, plugin_env, tiny_checkpoint, modality_questions):
    """A shown viewer with the Mamba-HoME widget docked and the tiny test model selected; modality
    questions are answered with the default (see ``modality_questions``)."""
    needs_display()
    from napari_mambahome._widget import MambaHoMEWidget

    viewer = make_napari_viewer(show=True)
    widget = MambaHoMEWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Mamba-HoME")
    assert widget.session.load_model_file(tiny_checkpoint) is not None
    return viewer, widget


def status_messages(widget: Any) -> List[str]:
    """A list that collects every status-line message the widget's session emits from now on."""
    seen: List[str] = []
    widget.session.status.connect(seen.append)
    return seen


def wait_job(qtbot, widget, timeout: int = 120_000) -> Any:
    job = widget.session.job
    assert job is not None
    qtbot.waitUntil(lambda: not job.running, timeout=timeout)
    qtbot.wait(20)
    return job


def phantom_layer(viewer, modality: str = "CT", shape=(32, 32, 32), seed: int = 3):
    """Add a synthetic phantom (engine.synth) as an image layer with its geometry; returns (layer, truth)."""
    from engine.synth import make_phantom
    from napari_mambahome._geometry import layer_kwargs

    image, truth = make_phantom(shape, modality=modality, seed=seed).to_volumes()
    layer = viewer.add_image(image.data, **layer_kwargs(image, f"{modality} phantom", modality=modality))
    return layer, np.asarray(truth.data)


def saved_case(qtbot, widget, timeout: int = 60_000) -> Any:
    """Press the Cases section's save as the annotator does and wait for the worker writing the case: its record,
    or ``None`` when the save was refused (nothing started) or failed (the error is in the notifications)."""
    job = widget.panels["cases"].save_case()
    if job is None:
        return None
    qtbot.waitUntil(lambda: not job.running, timeout=timeout)
    qtbot.wait(20)
    return job.result if job.outcome == "done" else None
