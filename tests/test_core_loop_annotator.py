"""The annotator's core loop on real volumes: cancelling a fine-tune, finding a version's parent after a restart,
saving a case of another anatomy into a case folder, and the words the Fine-tune section shows on the way.

Run under a virtual display: ``xvfb-run -a python -m pytest tests/test_core_loop_annotator.py``. The real data is
found through ``MAMBAHOME_SHARED_DATA`` (default ``../shared/data``); tests that need it skip without it.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from plugin_support import (  # noqa: F401 - fixtures
    modality_questions, needs_display, notifications, plugin_env, saved_case, tiny_checkpoint, viewer_widget,
    wait_job, write_tiny_checkpoint,
)

DATA = Path(os.environ.get("MAMBAHOME_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
HIPPO = DATA / "hippocampus"
SPINE = DATA / "spinal_cord_mri"
HIPPO_CLASSES = ["background", "anterior", "posterior"]


def _need(folder: Path) -> None:
    if not folder.is_dir():
        pytest.skip(f"real data not found in {folder} (set MAMBAHOME_SHARED_DATA)")


def _store_hippocampus_cases(root: Path, count: int) -> list:
    """Corrected hippocampus cases as the Cases section writes them (the manual labels stand for the corrections)."""
    from engine.cases import CaseStore
    from engine.io import load_label, load_volume

    store = CaseStore(root)
    records = []
    for path in sorted((HIPPO / "imagesTr").glob("*.nii.gz"))[:count]:
        image = load_volume(path)
        labels = load_label(HIPPO / "labelsTr" / path.name, reference=image).data
        records.append(store.add(image, np.asarray(labels), modality="MR", class_names=HIPPO_CLASSES))
    return records


def _dock(viewer, name: str = "Mamba-HoME"):
    from napari_mambahome._widget import MambaHoMEWidget

    widget = MambaHoMEWidget(viewer)
    viewer.window.add_dock_widget(widget, name=name)
    return widget


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _rows(panel) -> list:
    return [panel.versions_list.item(i).text() for i in range(panel.versions_list.count())]


@pytest.mark.gui
def test_finetune_progress_counts_each_step_once(viewer_widget):
    _, widget = viewer_widget
    panel = widget.panels["finetune"]
    panel._progress(1, 200, "step 1/200 loss 2.1663")  # the engine's training message counts already
    assert panel.finetune_result.text() == "step 1/200 loss 2.1663"
    panel._progress(2, 3, "preprocessing training case")  # one that does not is counted here
    assert panel.finetune_result.text() == "preprocessing training case 2/3"
    panel._progress(4, 6, "before/after, new model: Dice: case 1/3")
    assert panel.finetune_result.text() == "before/after, new model: Dice: case 1/3"


def test_before_after_progress_says_which_model_is_scored(tmp_path):
    """The scoring counts the same cases twice (previous model, then new): each count names its model."""
    _need(HIPPO)
    from engine.scoring import before_after

    model = write_tiny_checkpoint(tmp_path / "hippo.safetensors", HIPPO_CLASSES, modality="MR")
    records = _store_hippocampus_cases(tmp_path / "cases", 1)
    seen = []
    before_after(model, model, records, False, device="cpu", progress=lambda d, t, m: seen.append((d, t, m)))
    assert [d for d, _, _ in seen][-1] == 2 and all(t == 2 for _, t, _ in seen)
    assert "previous model" in seen[0][2] and "new model" in seen[-1][2]


@pytest.mark.gui
def test_cancel_midway_says_so_at_once_and_keeps_cases_and_versions(make_napari_viewer, plugin_env, qtbot,
                                                                    modality_questions, tmp_path):
    """Cancel pressed during training: the click is acknowledged at once (no second press), then nothing is lost."""
    needs_display()
    _need(HIPPO)
    import shutil

    parent = write_tiny_checkpoint(tmp_path / "hippo.safetensors", HIPPO_CLASSES, modality="MR",
                                   version="tiny-hippo")
    earlier = plugin_env["models"] / "ft-earlier"  # a version fine-tuned in an earlier session
    earlier.mkdir(parents=True)
    shutil.copy(parent, earlier / "best.safetensors")
    _store_hippocampus_cases(plugin_env["cases"], 1)
    cases_before, models_before = _snapshot(plugin_env["cases"]), _snapshot(plugin_env["models"])

    viewer = make_napari_viewer(show=True)
    widget = _dock(viewer)
    assert widget.session.load_model_file(parent) is not None
    panel = widget.panels["finetune"]
    rows_before = _rows(panel)
    panel.steps_spin.setValue(500)
    job = panel.finetune()
    assert job is not None and panel.finetune_cancel_button.isEnabled()
    qtbot.waitUntil(lambda: len(panel.loss_plot.values) >= 1, timeout=120_000)  # training has started
    panel.finetune_cancel_button.click()
    # before the engine reaches its next step: the click is taken and said
    assert not panel.finetune_cancel_button.isEnabled()
    assert panel.finetune_result.text().startswith("cancelling")
    qtbot.waitUntil(lambda: not job.running, timeout=120_000)
    qtbot.wait(20)
    assert job.outcome == "cancelled"
    assert "cancelled" in panel.finetune_result.text() and "no new version" in panel.finetune_result.text()
    assert panel.finetune_button.isEnabled() and not panel.finetune_cancel_button.isEnabled()
    assert widget.session.current_model.version == "tiny-hippo"
    assert _rows(panel) == rows_before
    assert _snapshot(plugin_env["cases"]) == cases_before
    assert _snapshot(plugin_env["models"]) == models_before


@pytest.mark.gui
def test_restart_offers_the_parent_of_a_fine_tuned_version(make_napari_viewer, plugin_env, qtbot,
                                                            modality_questions, tmp_path):
    """A model loaded from a file, fine-tuned, then another model used: after a restart the version's parent is in
    the list (named in the version's label), so the annotator can switch back to it."""
    needs_display()
    from engine.checkpoint import load_checkpoint, save_checkpoint
    from engine.config import ModelConfig
    from engine.model import MambaHoME
    from napari_mambahome import _settings
    from napari_mambahome._models import BUNDLED_MODEL

    parent = write_tiny_checkpoint(tmp_path / "elsewhere" / "hippo.safetensors", HIPPO_CLASSES, modality="MR",
                                   version="tiny-hippo")
    _, meta = load_checkpoint(parent, device="cpu")
    model = MambaHoME(ModelConfig.preset("tiny", in_channels=1, num_classes=3))
    child = {k: v for k, v in meta.items() if k != "source"}
    child.update(version="ft-test-step2", parent={"version": "tiny-hippo", "path": str(parent.resolve())})
    (plugin_env["models"] / "ft-test").mkdir(parents=True)
    save_checkpoint(plugin_env["models"] / "ft-test" / "best.safetensors", model, child)
    other = BUNDLED_MODEL if BUNDLED_MODEL.is_file() else write_tiny_checkpoint(tmp_path / "other.safetensors")
    _settings.save_setting("model", str(other))  # the last session ended on another model

    viewer = make_napari_viewer(show=True)
    widget = _dock(viewer)
    session, panel = widget.session, widget.panels["finetune"]
    versions = [e.version for e in session.entries]
    assert "ft-test-step2" in versions and "tiny-hippo" in versions
    [row] = [r for r in _rows(panel) if r.lstrip("● ").startswith("ft-test-step2")]
    assert "fine-tuned from tiny-hippo" in row
    panel.versions_list.setCurrentRow(versions.index("tiny-hippo"))
    panel.use_version_button.click()
    assert session.current_model.version == "tiny-hippo"
    assert session.current_model.path.resolve() == parent.resolve()


@pytest.mark.gui
def test_case_of_another_label_set_names_the_folder_once_and_the_way_out(viewer_widget, qtbot, plugin_env,
                                                                         notifications):
    """Spinal cord after hippocampus cases: refused (one label set per folder), saying the folder once and how to
    choose another."""
    _need(HIPPO)
    _need(SPINE)
    _store_hippocampus_cases(plugin_env["cases"], 1)
    viewer, widget = viewer_widget  # the tiny model's classes are organ/vessel/gland, not the store's
    [image] = viewer.open(str(SPINE / "t1_image.nii.gz"), plugin="napari-mambahome")
    widget.panels["segment"].image_combo.setCurrentText(image.name)
    assert widget.panels["segment"].segment() is not None
    assert wait_job(qtbot, widget).outcome == "done"
    assert saved_case(qtbot, widget) is None
    [error] = [m for s, m in notifications if s == "error"]
    assert error.count(str(plugin_env["cases"])) == 1
    assert error.startswith("saving the case failed: its classes") and "'Folder…'" in error
    assert "['organ', 'vessel', 'gland']" in error and "hippocampus_001: ['anterior', 'posterior']" in error
    assert [r.name for r in plugin_env["cases"].iterdir() if r.is_dir()] == ["hippocampus_001"]


def test_weaker_warning_shows_the_difference():
    from engine.scoring import weaker_note

    note = weaker_note("tiny-hippo", {"before": {"a": 0.034}, "after": {"a": 0.031}}, where="in the Versions list",
                       interactive=False)
    assert "(0.031 vs 0.034)" in note
    note = weaker_note("v1", {"before": {"a": 0.70}, "after": {"a": 0.55}})
    assert "(0.55 vs 0.70)" in note


@pytest.mark.gui
def test_failed_finetune_does_not_leave_the_last_step_on_screen(viewer_widget, qtbot, plugin_env, notifications,
                                                                 monkeypatch):
    """The engine fails midway (a full disk, say): the section says so instead of showing the last step's loss."""
    _need(HIPPO)
    import engine.train.finetune as engine_finetune

    viewer, widget = viewer_widget
    _store_hippocampus_cases(plugin_env["cases"], 1)
    monkeypatch.setattr(widget.panels["finetune"], "_classes_agree", lambda *a: True)  # organ/... vs hippocampus

    def failing(*args, progress=None, **kwargs):
        progress(3, 200, "step 3/200 loss 1.2345")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(engine_finetune, "finetune", failing)
    panel = widget.panels["finetune"]
    before = widget.session.current_model
    assert panel.finetune() is not None
    assert wait_job(qtbot, widget).outcome == "error"
    text = panel.finetune_result.text()
    assert "failed" in text and "no new version" in text and "loss" not in text
    assert any(s == "error" and "No space left" in m for s, m in notifications)
    assert widget.session.current_model is before and panel.finetune_button.isEnabled()
    assert not any(plugin_env["models"].glob("*/best.safetensors"))
