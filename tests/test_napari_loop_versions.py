"""The Fine-tune section's versions on real hippocampus MRI: no half-trained version survives a run stopped midway,
finished versions keep their scores across sessions, and "Use selected version" never does nothing silently.

Run under a virtual display: ``xvfb-run -a python -m pytest tests/test_napari_loop_versions.py``.
The real data is found through ``MAMBAHOME_SHARED_DATA`` (default ``../shared/data``); the GUI tests skip without it.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from plugin_support import (  # noqa: F401 - fixtures
    modality_questions, notifications, plugin_env, saved_case, tiny_checkpoint, viewer_widget, wait_job,
)

DATA = Path(os.environ.get("MAMBAHOME_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
HIPPO = DATA / "hippocampus"


def _need_hippocampus() -> None:
    if not (HIPPO / "imagesTr").is_dir():
        pytest.skip(f"real hippocampus data not found in {HIPPO} (set MAMBAHOME_SHARED_DATA)")


def _save_hippocampus_cases(viewer, widget, qtbot, count: int) -> None:
    """Open real MRIs, segment them, take the manual label as the annotator's correction, save each as a case."""
    for path in sorted((HIPPO / "imagesTr").glob("*.nii.gz"))[:count]:
        [image] = viewer.open(str(path), plugin="napari-mambahome")
        widget.panels["segment"].image_combo.setCurrentText(image.name)
        assert widget.panels["segment"].segment() is not None
        assert wait_job(qtbot, widget).outcome == "done"
        labels = widget.session.labels_layer
        [truth] = viewer.open(str(HIPPO / "labelsTr" / path.name), plugin="napari-mambahome")
        labels.data = np.asarray(truth.data).astype(labels.data.dtype)
        viewer.layers.remove(truth)
        widget.session.set_image(image)
        widget.session.set_labels(labels)
        assert saved_case(qtbot, widget) is not None


def test_unfinished_run_folder_is_not_a_version(tmp_path, tiny_checkpoint):
    """A run folder napari was killed in (the engine's resume state still there) holds a half-trained best file."""
    from napari_mambahome._models import UNFINISHED_MARK, fine_tuned_entries

    for name in ("ft-finished", "ft-killed"):
        (tmp_path / name).mkdir()
        shutil.copy(tiny_checkpoint, tmp_path / name / "best.safetensors")
    shutil.copy(tiny_checkpoint, tmp_path / "ft-killed" / UNFINISHED_MARK)
    assert [e.path.parent.name for e in fine_tuned_entries(tmp_path)] == ["ft-finished"]


@pytest.mark.gui
def test_closing_napari_mid_finetune_leaves_no_half_version(viewer_widget, qtbot, plugin_env):
    _need_hippocampus()
    from napari_mambahome._models import fine_tuned_entries

    viewer, widget = viewer_widget
    _save_hippocampus_cases(viewer, widget, qtbot, 2)
    panel = widget.panels["finetune"]
    panel.steps_spin.setValue(30)  # the engine checkpoints every 3 steps: a mid-run best.safetensors
    job = panel.finetune()
    assert job is not None
    qtbot.waitUntil(lambda: bool(list(plugin_env["models"].glob("*/best.safetensors"))), timeout=120_000)
    assert job.running
    # what napari does when its window closes: the dock goes (no more callbacks) and the worker is told to quit
    widget.session.close()
    job.worker.quit()
    qtbot.waitUntil(lambda: not job.running, timeout=120_000)
    assert job.outcome == "cancelled"
    assert fine_tuned_entries(plugin_env["models"]) == []  # the next session lists no half-trained version
    assert not any(plugin_env["models"].iterdir())


@pytest.mark.gui
def test_scores_survive_a_restart_and_use_version_needs_a_row(viewer_widget, qtbot, plugin_env, notifications):
    _need_hippocampus()
    from napari_mambahome._widget import MambaHoMEWidget

    viewer, widget = viewer_widget
    _save_hippocampus_cases(viewer, widget, qtbot, 2)
    panel = widget.panels["finetune"]
    panel.steps_spin.setValue(2)
    assert panel.finetune() is not None
    assert wait_job(qtbot, widget, 300_000).outcome == "done"
    assert wait_job(qtbot, widget, 300_000).outcome == "done"  # the before/after scoring
    new = widget.session.current_model
    assert new.origin == "fine-tuned"
    after = widget.session.scores_by_version[new.version]
    assert after  # hippocampus labels 1 and 2 were drawn: two classes scored

    # no row chosen: the click used to do nothing at all
    panel.versions_list.setCurrentRow(-1)
    panel.use_version_button.click()
    assert widget.session.current_model is new
    assert any(s == "warning" and "choose a version" in m for s, m in notifications)

    # the next session (a new dock) lists the version with the Dice it was scored with
    again = MambaHoMEWidget(viewer)
    viewer.window.add_dock_widget(again, name="Mamba-HoME again")
    rows = [again.panels["finetune"].versions_list.item(i).text()
            for i in range(again.panels["finetune"].versions_list.count())]
    [row] = [r for r in rows if r.lstrip("● ").startswith(new.version)]
    assert "Dice " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(after.items())) in row
    # its run folder deleted on disk: rolling back to it is refused with the file named, nothing changes
    shutil.rmtree(new.path.parent)
    chosen = again.session.current_model
    again.panels["finetune"].versions_list.setCurrentRow(rows.index(row))
    again.panels["finetune"].use_version_button.click()
    assert again.session.current_model is chosen
    assert any(s == "error" and new.version in m and "is gone" in m for s, m in notifications)


@pytest.mark.gui
def test_case_folder_deleted_during_finetune_keeps_the_new_version(viewer_widget, qtbot, plugin_env, notifications):
    """The annotator tidies up the case folder while the model trains: the version is kept and the reason said."""
    _need_hippocampus()
    viewer, widget = viewer_widget
    _save_hippocampus_cases(viewer, widget, qtbot, 1)
    panel = widget.panels["finetune"]
    panel.steps_spin.setValue(2)
    job = panel.finetune()
    assert job is not None
    qtbot.waitUntil(lambda: len(panel.loss_plot.values) >= 1, timeout=120_000)  # the cases are read by now
    shutil.rmtree(plugin_env["cases"])
    assert wait_job(qtbot, widget, 300_000).outcome == "done"
    new = widget.session.current_model
    assert new.origin == "fine-tuned" and new.path.is_file()
    assert widget.session.job is job  # no scoring started on cases that are gone
    assert any(s == "warning" and new.version in m and "not scored" in m for s, m in notifications)
    assert "not scored" in panel.finetune_result.text()
