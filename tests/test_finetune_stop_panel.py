"""The Fine-tune section's "Stop and keep": a running local fine-tune ends early through the normal done path (a new
version selected, then scored), a stop before the first step keeps nothing and says so, and a server's fine-tune,
which can only be cancelled, leaves the button off with the reason in its tooltip.

Run under a virtual display: ``xvfb-run -a python -m pytest tests/test_finetune_stop_panel.py``.
"""
from __future__ import annotations

import time

import numpy as np
import pytest

from plugin_support import (  # noqa: F401 - fixtures
    TINY_CLASSES, modality_questions, notifications, plugin_env, tiny_checkpoint, viewer_widget, wait_job,
)

pytestmark = pytest.mark.gui


def _saved_case(store_root, seed=3):
    """One corrected CT case labelled with the tiny model's own classes (no "classes differ" question)."""
    from engine.cases import CaseStore
    from engine.synth import make_phantom

    image, label = make_phantom((32, 32, 32), modality="CT", seed=seed).to_volumes()
    labels = np.asarray(label.data).astype(np.uint8)
    return CaseStore(store_root).add(image, labels, modality="CT", class_names=TINY_CLASSES, case_id=f"case_{seed}")


def test_stop_and_keep_ends_the_finetune_with_a_scored_new_version(viewer_widget, qtbot, plugin_env):
    from engine.checkpoint import read_checkpoint_metadata
    from napari_mambahome._models import fine_tuned_entries
    from napari_mambahome.panels.finetune import STOP_TIP

    viewer, widget = viewer_widget
    panel, session = widget.panels["finetune"], widget.session
    parent = session.current_model
    _saved_case(plugin_env["cases"])
    stop = panel.finetune_stop_button
    assert not stop.isEnabled() and stop.toolTip() == STOP_TIP  # nothing runs: nothing to stop
    panel.steps_spin.setValue(500)
    job = panel.finetune()
    assert job is not None and stop.isEnabled() and panel.finetune_cancel_button.isEnabled()
    qtbot.waitUntil(lambda: len(panel.loss_plot.values) >= 1, timeout=120_000)  # it has learnt something
    stop.click()
    assert not stop.isEnabled() and panel.finetune_cancel_button.isEnabled()  # Cancel still discards
    assert panel.finetune_result.text().startswith("stopping…")
    wait_job(qtbot, widget, timeout=300_000)
    assert job.outcome == "done", widget.status_label.text()

    new = session.entries[-1]  # listed; selected once scored
    assert new is not parent and new.origin == "fine-tuned" and new.parent == parent.version
    steps = session.last_finetune["stopped_at"]
    assert 1 <= steps < 500
    assert f"stopped and kept at step {steps}" in panel.finetune_result.text()
    provenance = read_checkpoint_metadata(new.path)["provenance"]
    assert provenance["steps"] == steps and provenance["stopped_on_request"] is True
    # one file a version, no resume state: the next session lists it as a finished version
    assert [p.name for p in new.path.parent.glob("*.safetensors")] == [new.path.name]
    assert new.path in [e.path for e in fine_tuned_entries(plugin_env["models"])]

    scoring = session.job  # scored against the parent as at a normal end; the scoring is no fine-tune to stop
    assert scoring is not job and not stop.isEnabled()
    wait_job(qtbot, widget, timeout=300_000)
    assert scoring.outcome == "done", widget.status_label.text()
    dice = session.last_finetune["dice"]
    assert dice["after"] and set(dice["before"]) == set(dice["after"])
    assert not panel.scores_table.isHidden() and panel.scores_table.rowCount() == len(dice["after"])
    assert f"(stopped and kept at step {steps})" in panel.finetune_result.text()
    # the stopped version stays selected unless it scores below its parent (then it is added, not selected)
    from engine.scoring import weaker

    assert session.current_model is (parent if weaker(dice) else new)
    assert not stop.isEnabled() and panel.finetune_button.isEnabled()


def test_stop_before_the_first_step_makes_no_version_and_says_so(viewer_widget, qtbot, plugin_env):
    viewer, widget = viewer_widget
    panel, session = widget.panels["finetune"], widget.session
    parent, versions = session.current_model, list(session.entries)
    _saved_case(plugin_env["cases"])
    panel.steps_spin.setValue(500)
    job = panel.finetune()
    panel.finetune_stop_button.click()  # at once: the worker is still preparing, no step has finished
    wait_job(qtbot, widget, timeout=120_000)
    assert job.outcome == "cancelled"
    assert session.current_model is parent and session.entries == versions
    assert not plugin_env["models"].exists() or not any(plugin_env["models"].iterdir())
    text = panel.finetune_result.text()
    assert "stopped before its first training step finished" in text and "no new version" in text
    assert panel.finetune_button.isEnabled() and not panel.finetune_stop_button.isEnabled()


def test_stop_and_keep_stays_off_for_a_server_finetune(viewer_widget, qtbot):
    """A server older than Stop and keep (this stand-in has no ``can_stop_jobs``) can only cancel its fine-tune jobs: the
    button stays off and says why (a server that can stop: tests/test_napari_walk6_remote_stop.py)."""
    from engine.progress import Cancelled
    from napari_mambahome.panels.finetune import REMOTE_STOP_TIP, STOP_TIP

    viewer, widget = viewer_widget
    panel, session = widget.panels["finetune"], widget.session

    class Server:
        """Stands in for a connected RemoteBackend: its fine-tune job runs until cancelled."""
        url = "http://127.0.0.1:9"

        def owns(self, entry):
            return False

        def case_records(self):
            return []

        def finetune(self, entry, steps, lr, on_finished, **kwargs):
            def run(progress, cancel):
                while not cancel.cancelled:
                    time.sleep(0.02)
                raise Cancelled("cancelled")

            return session.start_job(run, what="fine-tuning on the server", on_done=lambda _: None,
                                     on_finished=on_finished, engine=False)

    session.remote = Server()
    try:
        job = panel.finetune()
        assert job is not None and job.running
        assert panel.finetune_cancel_button.isEnabled()
        assert not panel.finetune_stop_button.isEnabled() and panel.finetune_stop_button.toolTip() == REMOTE_STOP_TIP
        panel.finetune_stop_button.click()  # disabled: nothing happens
        assert not job.token.stop_requested
        session.cancel_job()
        assert wait_job(qtbot, widget).outcome == "cancelled"
    finally:
        session.remote = None
    panel._offer_stop()
    assert panel.finetune_stop_button.toolTip() == STOP_TIP
