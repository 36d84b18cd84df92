"""An annotator's sixth walk, remote mode: "Stop and keep" for a fine-tune running on a server.

Locally the Fine-tune section's Stop and keep ends a run at its next step and keeps its model; connected to a server
the button stayed greyed out ("its jobs can only be cancelled") although the server now stops a job and keeps the
model of that step (``POST /finetune/{job}/stop``, capability ``finetune_stop``). Now the button is enabled while a
server job runs on a server that can stop; pressing it greys it out, says the run is stopping, and sends the stop from
the job's worker (never the GUI thread); the kept model is selected and listed as a finished server fine-tune's, the
section saying "stopped and kept at step N"; a stop before the first step says nothing was kept. On a server without
the capability the button stays greyed out and its tooltip says the server is older.

A real server (uvicorn on 127.0.0.1) fine-tunes a real tiny Mamba-HoME on phantom cases on the CPU; its training is
the engine's own, only held at step 1 (a wrapped ``on_log``) until the stop has arrived, so the stop always lands
mid-run whatever the machine's speed.

Run under a virtual display: ``xvfb-run -a python -m pytest tests/test_napari_walk6_remote_stop.py``.
"""
from __future__ import annotations

import threading
import time
from typing import Any

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from plugin_support import (  # noqa: E402,F401 - fixtures
    modality_questions, notifications, plugin_env, tiny_checkpoint, viewer_widget, wait_job,
)
from server_support import connected_client, finetune_server, hold_finetune  # noqa: E402

pytestmark = pytest.mark.gui
TOKEN = "walk6-remote-stop-token"
MODEL = "tiny-ct"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A CPU server with a tiny untrained CT model and three saved phantom cases (:func:`finetune_server`)."""
    root = tmp_path_factory.mktemp("remote-stop-server")
    with finetune_server(root, TOKEN, MODEL) as (url, app):
        yield url, app, root


def connect(qtbot, widget, monkeypatch, url):
    """Choose "Remote server…" in the device box, the dialog answered with the test server; the server's active
    model (the tiny one) is selected."""
    from napari_mambahome import _remote_dialog
    from napari_mambahome.panels.model import REMOTE

    connected_client(url, TOKEN).select_model(MODEL)  # the model fine-tuned: the tiny one, seconds a step on a CPU
    monkeypatch.setattr(_remote_dialog, "ask_connection", lambda parent=None: (url, TOKEN))
    widget.panel("model").device_combo.setCurrentText(REMOTE)
    wait_job(qtbot, widget)
    remote = widget.session.remote
    assert remote is not None and widget.session.current_model.model_id == MODEL
    return remote


def slow_stops_off_the_gui_thread(monkeypatch, remote) -> list:
    """Each ``stop_job`` the plugin sends, as the thread that sent it; each takes a second more than the server does,
    so a stop sent on the GUI thread would hold the click for a second."""
    sent: list = []
    real = remote.client.stop_job

    def stop_job(job_id: str) -> Any:
        sent.append(threading.current_thread())
        time.sleep(1.0)
        return real(job_id)

    monkeypatch.setattr(remote.client, "stop_job", stop_job)
    return sent


def test_stop_and_keep_on_a_server_keeps_the_model_of_the_step_and_selects_it(viewer_widget, served, qtbot,
                                                                              monkeypatch):
    from napari_mambahome.panels.finetune import STOP_TIP

    viewer, widget = viewer_widget
    url, app, root = served
    session, panel = widget.session, widget.panel("finetune")
    remote = connect(qtbot, widget, monkeypatch, url)
    parent = session.current_model
    stop = panel.finetune_stop_button
    assert remote.client.can_stop_jobs
    assert not stop.isEnabled() and stop.toolTip() == STOP_TIP  # nothing runs yet: nothing to stop
    sent = slow_stops_off_the_gui_thread(monkeypatch, remote)
    reached = hold_finetune(monkeypatch)
    statuses: list = []
    session.status.connect(statuses.append)

    panel.steps_spin.setValue(200)
    job = panel.finetune()
    assert job is not None
    assert stop.isEnabled() and stop.toolTip() == STOP_TIP  # a server job trains on a server that can stop it
    assert reached.wait(300)  # step 1 trained, held there until the stop arrives
    started = time.perf_counter()
    stop.click()
    clicked = time.perf_counter() - started
    assert clicked < 0.5, f"the click held the GUI thread {clicked:.2f} s"  # the stop itself takes over a second
    assert job.token.stop_requested and not job.token.cancelled
    assert not stop.isEnabled()  # greyed out once pressed
    assert panel.finetune_result.text().startswith("stopping…"), panel.finetune_result.text()
    assert any("stopping the fine-tune on the server" in s for s in statuses), statuses
    assert panel.finetune_cancel_button.isEnabled()  # Cancel still discards the run

    assert wait_job(qtbot, widget, timeout=300_000).outcome == "done", panel.finetune_result.text()
    assert len(sent) == 1 and all(t is not threading.main_thread() for t in sent)  # sent once, by the worker
    [server_job] = [j for j in app.state.jobs.jobs.values() if j.model_id and j.parent == MODEL]
    stopped_at = server_job.stopped_at
    assert stopped_at is not None and 1 <= stopped_at < 200
    new = session.current_model
    assert new is not parent and new.model_id == server_job.model_id and new.model_id.startswith("finetune-")
    assert new in session.entries and panel.versions_list.count() == len(session.entries)
    assert connected_client(url, TOKEN).models()["active"] == new.model_id  # selected on the server as well
    text = panel.finetune_result.text()
    assert new.version in text and f"stopped and kept at step {stopped_at}" in text, text
    assert session.last_finetune["stopped_at"] == stopped_at and session.last_finetune["new"] == new.version
    assert any(f"stopped and kept at step {stopped_at}" in s for s in statuses), statuses
    assert not stop.isEnabled() and panel.finetune_button.isEnabled()  # the job ended: nothing to stop


def test_stop_and_keep_before_the_first_step_on_a_server_says_nothing_was_kept(viewer_widget, served, qtbot,
                                                                               monkeypatch):

    viewer, widget = viewer_widget
    url, app, root = served
    session, panel = widget.session, widget.panel("finetune")
    remote = connect(qtbot, widget, monkeypatch, url)
    parent = session.current_model
    before = {m["id"] for m in connected_client(url, TOKEN).models()["models"]}
    # the job runs, nothing prepared or trained yet: held until the stop arrived
    entered = hold_finetune(monkeypatch, before_first_step=True)
    panel.steps_spin.setValue(200)
    job = panel.finetune()
    assert job is not None and entered.wait(60)
    qtbot.waitUntil(panel.finetune_stop_button.isEnabled, timeout=5_000)
    panel.finetune_stop_button.click()
    assert not panel.finetune_stop_button.isEnabled()
    assert wait_job(qtbot, widget, timeout=300_000).outcome == "cancelled"
    text = panel.finetune_result.text()
    assert "stopped before its first training step finished" in text and "no new version was made" in text, text
    assert "stopped and kept" not in text and "cancelled on the server" not in text, text
    assert session.current_model is parent and remote.owns(parent)
    assert {m["id"] for m in connected_client(url, TOKEN).models()["models"]} == before


def test_stop_and_keep_stays_greyed_on_a_server_older_than_the_stop(viewer_widget, served, qtbot, monkeypatch):
    from napari_mambahome.panels.finetune import REMOTE_STOP_TIP

    viewer, widget = viewer_widget
    url, app, root = served
    session, panel = widget.session, widget.panel("finetune")
    remote = connect(qtbot, widget, monkeypatch, url)
    # a server before the stop: its /version lists no finetune_stop
    caps = [c for c in remote.client.server_info.get("capabilities") or [] if c != "finetune_stop"]
    monkeypatch.setitem(remote.client.server_info, "capabilities", caps)
    assert not remote.client.can_stop_jobs
    panel._offer_stop()  # (the panel reads the capability when the connection changes or a job starts)
    stop = panel.finetune_stop_button
    assert not stop.isEnabled() and stop.toolTip() == REMOTE_STOP_TIP
    assert "older" in REMOTE_STOP_TIP and "cancelled" in REMOTE_STOP_TIP
    reached = hold_finetune(monkeypatch)
    panel.steps_spin.setValue(200)
    job = panel.finetune()
    assert job is not None and reached.wait(300)
    assert panel.finetune_cancel_button.isEnabled()
    assert not stop.isEnabled() and stop.toolTip() == REMOTE_STOP_TIP
    panel.stop()  # (a disabled button cannot be clicked; the slot refuses as well)
    assert not job.token.stop_requested
    panel.finetune_cancel_button.click()
    assert wait_job(qtbot, widget, timeout=300_000).outcome == "cancelled"
    assert "cancelled on the server" in panel.finetune_result.text()
