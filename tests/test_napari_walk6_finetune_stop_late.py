"""An annotator's sixth walk, the Fine-tune section's "Stop and keep" pressed as the run was finishing its last step:
the engine ended the run by its own step count (nothing was cut short, the checkpoint's provenance says no
``stopped_on_request``), yet the section said "stopped and kept at step N", read from the cancel token's stop flag. What
the section says now comes from what the engine returns (``RunResult.stopped_on_request``).

Run under a virtual display: ``xvfb-run -a python -m pytest tests/test_napari_walk6_finetune_stop_late.py``.
"""
from __future__ import annotations

import threading

import numpy as np
import pytest

from plugin_support import (  # noqa: F401 - fixtures
    TINY_CLASSES, modality_questions, notifications, plugin_env, tiny_checkpoint, viewer_widget, wait_job,
)

pytestmark = pytest.mark.gui

STEPS = 2


def _saved_case(store_root, seed=3):
    from engine.cases import CaseStore
    from engine.synth import make_phantom

    image, label = make_phantom((32, 32, 32), modality="CT", seed=seed).to_volumes()
    labels = np.asarray(label.data).astype(np.uint8)
    return CaseStore(store_root).add(image, labels, modality="CT", class_names=TINY_CLASSES, case_id=f"case_{seed}")


def test_a_stop_pressed_after_the_last_step_is_not_called_stopped_and_kept(viewer_widget, qtbot, plugin_env,
                                                                           monkeypatch):
    import engine.train.finetune as engine_finetune
    from engine.checkpoint import read_checkpoint_metadata

    viewer, widget = viewer_widget
    panel, session = widget.panels["finetune"], widget.session
    parent = session.current_model
    _saved_case(plugin_env["cases"])
    trained, pressed = threading.Event(), threading.Event()
    real = engine_finetune.finetune
    returned = []

    def finetune_then_wait_for_the_click(*args, **kwargs):  # worker thread
        result = real(*args, **kwargs)  # every step run: the run ended by its own step count
        returned.append(result)
        trained.set()
        pressed.wait(60)  # Stop and keep lands here, as the finished run hands its result back
        return result

    monkeypatch.setattr(engine_finetune, "finetune", finetune_then_wait_for_the_click)
    panel.steps_spin.setValue(STEPS)
    job = panel.finetune()
    assert job is not None
    qtbot.waitUntil(trained.is_set, timeout=240_000)
    assert panel.finetune_stop_button.isEnabled()  # the job still runs: the annotator can press it
    panel.finetune_stop_button.click()
    assert job.token.stop_requested
    pressed.set()
    wait_job(qtbot, widget, timeout=240_000)
    assert job.outcome == "done", widget.status_label.text()

    [result] = returned
    assert int(result.steps_done) == STEPS and not getattr(result, "stopped_on_request", False)
    new = session.entries[-1]  # listed; selected once scored
    assert new is not parent and new.origin == "fine-tuned"
    assert not read_checkpoint_metadata(new.path)["provenance"].get("stopped_on_request")
    assert session.last_finetune["stopped_at"] is None
    text = panel.finetune_result.text()
    assert "stopped and kept" not in text, text
    assert "nothing was cut short" in text, text
    assert "stopped and kept" not in widget.status_label.text()

    scoring = session.job  # the scoring that follows says nothing of a stop either
    if scoring is not None and scoring is not job:
        wait_job(qtbot, widget, timeout=240_000)
    assert "stopped and kept" not in panel.finetune_result.text(), panel.finetune_result.text()


def test_the_engine_answer_decides_whether_a_run_was_stopped(tmp_path):
    """``stopped_on_request`` reads the engine's RunResult, or (from a result without it) the last checkpoint's
    provenance; never the token."""
    from types import SimpleNamespace

    from plugin_support import write_tiny_checkpoint

    from engine.checkpoint import load_checkpoint, save_checkpoint
    from napari_mambahome.panels.finetune import stopped_on_request

    assert stopped_on_request(SimpleNamespace(stopped_on_request=True))
    assert not stopped_on_request(SimpleNamespace(stopped_on_request=False, last_checkpoint=None))
    plain = write_tiny_checkpoint(tmp_path / "plain.safetensors")
    model, meta = load_checkpoint(plain)
    meta = {k: v for k, v in meta.items() if k != "source"}
    meta["provenance"] = dict(meta.get("provenance") or {}, stopped_on_request=True)
    marked = save_checkpoint(tmp_path / "marked.safetensors", model, meta)
    assert stopped_on_request(SimpleNamespace(last_checkpoint=marked, best_checkpoint=plain))
    assert not stopped_on_request(SimpleNamespace(last_checkpoint=plain, best_checkpoint=plain))
    assert not stopped_on_request(SimpleNamespace(last_checkpoint=None, best_checkpoint=None))
