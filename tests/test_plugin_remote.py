"""napari remote mode (issue 17 item 2): the dock over a real ``mambahome serve`` on 127.0.0.1.

Run under a virtual display: ``xvfb-run -a python -m pytest tests/test_plugin_remote.py``. The server
is the real FastAPI app under uvicorn in a thread (tests/server_support.py), with the bundled model
and the in-memory echo interactive model; volumes come from the shared data (skipped without it).
"""
from __future__ import annotations

import json
import shutil
import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
nib = pytest.importorskip("nibabel")

from engine.server.config import ServerConfig  # noqa: E402
from mambahome_client import Client  # noqa: E402
from plugin_support import (  # noqa: E402,F401 - fixtures
    modality_questions, needs_display, notifications, plugin_env, tiny_checkpoint, viewer_widget, wait_job,
)
from server_support import free_port, running_server  # noqa: E402
from engine.scoring import ROBOT_CLICKS  # noqa: E402

pytestmark = pytest.mark.gui
TOKEN = "remote-test-token-42"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("remote-server")
    cfg = ServerConfig(token=TOKEN, models_dir=root / "models", cases_dir=root / "cases", device="cpu",
                       busy_wait_s=0.2, max_sessions=8)
    with running_server(cfg) as (url, app):
        try:
            from server_support import echo_interactive_model

            app.state.models.add_in_memory("echo", *echo_interactive_model())
        except ImportError:
            pass
        yield url, cfg, app


@pytest.fixture
def mr_path(shared_data):
    path = shared_data / "abdomen_ct_mr" / "mr_image.nii.gz"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    return path


def _open(viewer, path):
    return viewer.open(str(path), plugin="napari-mambahome")[0]


def connect(qtbot, widget, monkeypatch, url, token=TOKEN):
    """Choose "Remote server…" in the device box, answering the dialog with ``(url, token)``."""
    from qtpy.QtWidgets import QMessageBox

    from napari_mambahome import _remote_dialog
    from napari_mambahome.panels.model import REMOTE

    monkeypatch.setattr(_remote_dialog, "ask_connection", lambda parent=None: (url, token))
    # the server's cases (a hippocampus MRI) are not labelled as its model: Fine-tune asks "Classes differ" first,
    # answered Yes unless a test answers itself (a question left unanswered holds a test for ever)
    monkeypatch.setattr(QMessageBox, "question", lambda *a, **k: QMessageBox.StandardButton.Yes)
    combo = widget.panel("model").device_combo
    if combo.currentText() == REMOTE:  # connected already: the user picks the entry again
        combo.textActivated.emit(REMOTE)
    else:
        combo.setCurrentText(REMOTE)
    wait_job(qtbot, widget)
    return widget.session.remote


# ---------------------------------------------------------------- connecting
def test_connect_refuses_a_wrong_token_clearly_then_connects_and_disconnects(
        viewer_widget, server, qtbot, monkeypatch, notifications):
    viewer, widget = viewer_widget
    session, model = widget.session, widget.panel("model")
    local_entries, local_model = list(session.entries), session.current_model
    model.device_combo.setCurrentText("CPU")

    assert connect(qtbot, widget, monkeypatch, server[0], token="not-the-token-000") is None
    assert any(kind == "error" and "refused the token" in msg and "403" in msg for kind, msg in notifications)
    assert model.device_combo.currentText() == "CPU" and session.device == "cpu"  # the previous choice
    assert session.entries == local_entries and session.current_model is local_model

    with running_server(ServerConfig(device="cpu")):
        pass  # a port nobody listens on any more
    assert connect(qtbot, widget, monkeypatch, f"http://127.0.0.1:{free_port()}") is None
    assert any(kind == "error" and "cannot be reached" in msg for kind, msg in notifications)
    assert model.device_combo.currentText() == "CPU"

    import mambahome_client.client as client_module

    monkeypatch.setattr(client_module, "PROTOCOL_VERSION", 99)
    assert connect(qtbot, widget, monkeypatch, server[0]) is None
    assert any(kind == "error" and "another protocol version" in msg for kind, msg in notifications)
    monkeypatch.undo()

    remote = connect(qtbot, widget, monkeypatch, server[0])
    assert remote is not None and model.device_combo.currentText().startswith("Remote")
    # as locally, the list holds segmentation and promptable models; segmentation starts on a segmentation one
    assert [e.model_id for e in session.entries if not e.is_interactive] == ["default"]
    assert {e.model_id for e in session.entries if e.is_interactive} == {"interactive", "echo"}
    assert session.current_model.model_id == "default" and remote.owns(session.current_model)
    assert model.model_combo.currentText() == session.current_model.label and "server" in model.model_info.text()
    assert server[0] in model.remote_label.text() and not model.load_model_button.isEnabled()
    assert session.prompt_backend_factory is remote.prompt_backend_factory

    model.device_combo.setCurrentText("auto")  # back to this computer, as it was
    assert session.remote is None and session.entries == local_entries and session.current_model is local_model
    assert model.load_model_button.isEnabled() and model.remote_label.text() == ""


def test_the_dialog_remembers_the_url_and_token_file_but_not_the_token(plugin_env, tmp_path, qtbot):
    needs_display()
    from napari_mambahome import _remote_dialog, _settings

    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    dialog = _remote_dialog.RemoteDialog()
    qtbot.addWidget(dialog)
    dialog.url_edit.setText("http://127.0.0.1:9999/")
    dialog.load_token_file(token_file)
    assert dialog.values() == ("http://127.0.0.1:9999", TOKEN)
    dialog.remember()
    saved = _settings.load_settings()
    assert saved["remote_url"] == "http://127.0.0.1:9999" and saved["remote_token_file"] == str(token_file)
    assert saved.get("remote_token") is None and TOKEN not in (plugin_env["config"] / "settings.json").read_text()
    again = _remote_dialog.RemoteDialog()  # filled from the settings, the token read from its file
    qtbot.addWidget(again)
    assert again.values() == ("http://127.0.0.1:9999", TOKEN) and not again.remember_token.isChecked()
    again.remember_token.setChecked(True)
    again.remember()
    assert _settings.load_settings()["remote_token"] == TOKEN
    empty = tmp_path / "empty"
    empty.write_text("")
    again.load_token_file(empty)
    assert again.values()[1] is None and "is empty" in again.token_edit.placeholderText()


# ---------------------------------------------------------------- segment, save
def test_remote_segmentation_equals_a_local_prediction_and_uploads_once(
        viewer_widget, server, qtbot, monkeypatch, mr_path):
    from engine.inference import Predictor
    from napari_mambahome._geometry import image_volume, layer_geometry
    from napari_mambahome._models import BUNDLED_MODEL

    viewer, widget = viewer_widget
    session = widget.session
    image = _open(viewer, mr_path)
    geometry = layer_geometry(image)
    assert not geometry.display.is_identity  # an LPS file: the layer is permuted and flipped
    remote = connect(qtbot, widget, monkeypatch, server[0])
    assert widget.panel("segment").segment() is not None
    assert wait_job(qtbot, widget).outcome == "done"
    labels = session.labels_layer
    assert labels.name == f"{image.name} labels" and labels.data.shape == image.data.shape
    assert labels.metadata["mambahome"]["model_version"] == session.current_model.version
    modality = session.modality_of(image)[0]
    local = Predictor(BUNDLED_MODEL, device="cpu").predict(image_volume(image, geometry), modality=modality)
    assert np.array_equal(np.asarray(labels.data), geometry.to_display(local.labels))
    assert len(np.unique(local.labels)) > 1  # a real segmentation, not an empty one
    assert remote.uploads.uploads == 1

    widget.panel("segment").segment()  # same image, same data: nothing is sent again
    assert wait_job(qtbot, widget).outcome == "done" and remote.uploads.uploads == 1
    image.data = np.asarray(image.data) * 1.5  # the layer changed: sent again
    widget.panel("segment").segment()
    assert wait_job(qtbot, widget).outcome == "done" and remote.uploads.uploads == 2


def test_the_servers_warnings_are_shown_with_a_remote_segmentation(viewer_widget, server, qtbot, monkeypatch, mr_path):
    """The server's words about a result (a modality its model never saw) reach the annotator, as local ones do."""
    import dataclasses

    viewer, widget = viewer_widget
    image = _open(viewer, mr_path)
    connect(qtbot, widget, monkeypatch, server[0])
    real_segment = Client.segment
    said_by_server = "scan: the model default was trained on CT data only, but it looks like MR"

    def segment_with_a_warning(self, *args, **kwargs):  # the real server's answer, with a warning added
        return dataclasses.replace(real_segment(self, *args, **kwargs), warnings=[said_by_server])

    monkeypatch.setattr(Client, "segment", segment_with_a_warning)
    shown = []
    widget.session.status.connect(shown.append)
    assert widget.panel("segment").segment() is not None
    assert wait_job(qtbot, widget).outcome == "done"
    assert said_by_server in shown and widget.session.labels_layer.name == f"{image.name} labels"


def test_save_a_case_on_the_server_with_the_image_geometry(viewer_widget, server, qtbot, monkeypatch, mr_path):
    from napari_mambahome._geometry import layer_geometry

    viewer, widget = viewer_widget
    cases_dir = server[1].cases_dir
    image = _open(viewer, mr_path)
    geometry = layer_geometry(image)
    connect(qtbot, widget, monkeypatch, server[0])
    painted = np.zeros(image.data.shape, np.uint8)
    painted[5:9, 20:40, 30:60] = 1
    # the record the Interactive section keeps in a labels layer whose objects were prompted
    prompted = {"class_ids": [1], "objects": 1, "prompts": 2, "model_version": "int-v1", "model_name": "echo"}
    viewer.add_labels(painted, name="my labels", scale=image.scale, translate=image.translate,
                      metadata={"mambahome": {**geometry.layer_metadata(), "class_names": ["background", "organ"],
                                              "interactive": prompted}})
    before = {p.name for p in cases_dir.iterdir()} if cases_dir.is_dir() else set()
    job = widget.panel("cases").save_case()
    assert job is not None and wait_job(qtbot, widget).outcome == "done"
    (new,) = {p.name for p in cases_dir.iterdir()} - before
    saved_img = nib.load(str(cases_dir / new / "image.nii.gz"))
    saved_lab = nib.load(str(cases_dir / new / "label.nii.gz"))
    source = nib.load(str(mr_path))
    np.testing.assert_allclose(saved_img.affine, source.affine, atol=1e-4)
    np.testing.assert_allclose(saved_lab.affine, source.affine, atol=1e-4)
    assert np.array_equal(np.asarray(saved_lab.dataobj), geometry.to_file(painted))
    record = json.loads((cases_dir / new / "case.json").read_text())
    assert record["interactive"] == {**prompted, "classes": ["organ"]}  # the server's store notes it too
    cases = widget.panel("cases")
    assert new in [cases.cases_list.item(i).text().split()[0] for i in range(cases.cases_list.count())]
    assert server[0] in cases.cases_dir_label.text() and not cases.change_cases_dir_button.isEnabled()


def test_the_interactive_section_prompts_with_the_servers_model(viewer_widget, server, qtbot, monkeypatch, mr_path):
    """Connected to a server, the Interactive section offers the server's promptable models and a click
    becomes an object made there (the fixture server prompts with its echo model: a ball at the click)."""
    pytest.importorskip("engine.interactive")
    viewer, widget = viewer_widget
    image = _open(viewer, mr_path)
    remote = connect(qtbot, widget, monkeypatch, server[0])
    panel = widget.panel("interactive")
    offered = {e.model_id for e in panel.interactive_entries()}
    assert {"echo", "interactive"} <= offered  # the user's model and the bundled one
    assert widget.session.current_model.model_id == "default"  # segmentation keeps a segmentation model
    assert panel.start()
    centre = tuple(int(n) // 2 for n in np.shape(image.data))
    panel.points_layer.add(np.asarray(centre, float))
    qtbot.waitUntil(lambda: panel.worker is None and not (panel.ctx and panel.ctx.queue), timeout=120_000)
    labels = np.asarray(panel.target.data)
    assert labels[centre] == panel.class_id and labels.any()
    assert remote.uploads.uploads == 1


@contextmanager
def fill_model_on(app):
    """The module server offers a second promptable stand-in, ``fill`` (a click fills the window around
    it), for one test: the other tests see the server's usual models."""
    from server_support import echo_interactive_model

    app.state.models.add_in_memory("fill", *echo_interactive_model(fill=True))
    try:
        yield
    finally:
        app.state.models._memory.pop("fill", None)


def test_the_interactive_section_prompts_with_the_model_chosen_there(viewer_widget, server, qtbot, monkeypatch,
                                                                     mr_path):
    """The server's own rule would answer with ``echo``; the panel's choice, ``fill``, answers instead.
    Switching to ``echo`` ends the object (kept in the labels) and the next object is echo's."""
    pytest.importorskip("engine.interactive")
    viewer, widget = viewer_widget
    url, cfg, app = server
    with fill_model_on(app):
        image = _open(viewer, mr_path)
        remote = connect(qtbot, widget, monkeypatch, url)
        panel = widget.panel("interactive")
        by_id = {e.model_id: e for e in panel.interactive_entries()}
        assert {"echo", "fill", "interactive"} <= set(by_id)
        assert app.state.models.interactive_entry().model_id == "echo"  # what the server would pick itself
        panel.model_combo.setCurrentIndex(panel.interactive_entries().index(by_id["fill"]))
        assert panel.model_entry is by_id["fill"]

        def click(voxel):
            panel.points_layer.add(np.asarray(voxel, float))
            qtbot.waitUntil(lambda: panel.worker is None and not (panel.ctx and panel.ctx.queue), timeout=120_000)
            return app.state.sessions.get(panel.ctx.backend._session_id)

        assert panel.start()
        centre = tuple(int(n) // 2 for n in np.shape(image.data))
        held = click(centre)
        assert panel.ctx.backend.model_id == "fill" and held.interactive_model == "fill"
        filled = int(panel.ctx.state.mask.sum())
        labels = np.asarray(panel.target.data).copy()
        assert labels[centre] == panel.class_id and (labels == panel.class_id).sum() == filled > 1000

        panel.model_combo.setCurrentIndex(panel.interactive_entries().index(by_id["echo"]))
        assert panel.model_entry is by_id["echo"] and panel.ctx is None  # the fill object ended here
        assert panel.start()
        corner = (2, 2, int(np.shape(image.data)[2]) // 2)
        held = click(corner)
        assert panel.ctx.backend.model_id == "echo" and held.interactive_model == "echo"
        echoed = int(panel.ctx.state.mask.sum())
        assert 0 < echoed < filled / 10  # echo's ball, a new object: none of fill's window
        now = np.asarray(panel.target.data)
        assert now[corner] == panel.class_id and (now[labels == panel.class_id] == panel.class_id).all()
        assert remote.uploads.uploads == 1


# ---------------------------------------------------------------- fine-tune
def server_with_a_case(url, shared_data):
    """A client of the module's server, which holds at least one saved case (a real labelled MRI)."""
    from server_support import save_a_real_case

    client = Client(url, token=TOKEN)
    save_a_real_case(client, shared_data, "remote_ft")
    return client


def test_remote_finetune_selects_the_new_version_and_cancel_keeps_the_model(
        viewer_widget, server, qtbot, monkeypatch, shared_data):
    viewer, widget = viewer_widget
    session, panel = widget.session, widget.panel("finetune")
    url, cfg, app = server
    client = server_with_a_case(url, shared_data)
    connect(qtbot, widget, monkeypatch, url)
    parent = session.current_model
    assert panel.promptable_check.isEnabled() and not panel.promptable_check.isChecked()
    panel.steps_spin.setValue(2)
    # the server's cases (a hippocampus MRI, or a case of another test here: one painted class) are not labelled with
    # all of its model's classes: asked first, as locally (the job started without a word, and the new model's
    # classes were the cases')
    from qtpy.QtWidgets import QMessageBox

    asked, answer = [], [QMessageBox.StandardButton.No]
    monkeypatch.setattr(QMessageBox, "question", lambda *a, **k: asked.append(a[2]) or answer[0])
    jobs_before = len(app.state.jobs.jobs)
    assert panel.finetune() is None and len(app.state.jobs.jobs) == jobs_before
    [question] = asked
    assert f"The saved cases in the server's case folder ({url}) are labelled [" in question
    assert f"but {parent.version} segments {parent.class_names[1:]}" in question
    assert "Fine-tune anyway?" in question
    answer[0] = QMessageBox.StandardButton.Yes
    assert panel.finetune() is not None
    assert wait_job(qtbot, widget, timeout=300_000).outcome == "done"
    job = max((j for j in app.state.jobs.jobs.values() if j.model_id), key=lambda j: j.started)
    assert job.model_id.startswith("finetune-") and job.parent == parent.model_id
    new = next(e for e in session.entries if e.model_id == job.model_id)
    # selected here and on the server, unless the server scored it below its parent: then listed only, as locally
    chosen = parent.model_id if job.scores["weaker"] else new.model_id
    assert session.current_model.model_id == chosen and client.models()["active"] == chosen
    assert panel.loss_plot.values and panel.versions_list.count() == len(session.entries)
    # the server scored it before/after as a local fine-tune is scored, and the section shows it the same way
    from napari_mambahome.panels.finetune import scored_where as panel_where

    scores, cases = job.scores, [c["case_id"] for c in client.cases()]
    assert scores is not None and scores["metric"] == "dice" and scores["compared_with"] == "default"
    where = panel_where(len(cases), False, len(cases))  # too few cases to hold some out, said as locally
    assert scores["where"] == where and scores["scored_on"] == cases
    info = session.last_finetune
    assert not info["promptable"] and info["dice"] == scores and info["compared_with"] == parent.version
    assert info["scored_on"] == cases and info["held_out"] is False and info["server"] == url
    assert session.scores_by_version[new.version] == scores["after"]
    assert session.scores_by_version[parent.version] == scores["before"]
    text = panel.finetune_result.text()
    state = "added to the Versions list but not selected" if scores["weaker"] else "selected"
    assert text.startswith(f"{new.version} (fine-tuned on the server {url}) {state}. Training and scoring on the "
                           "server ") and text.endswith(f"Dice per class on {where}:")
    assert (f"Kept {parent.version} selected: the new model scores" in text) == scores["weaker"] == \
        (job.warning is not None)
    table = panel.scores_table
    assert not table.isHidden() and [table.horizontalHeaderItem(c).text() for c in range(3)] == \
        ["class", "before", "after"]
    assert [[table.item(r, c).text() for c in range(3)] for r in range(table.rowCount())] == \
        [[name, f"{scores['before'][name]:.3f}", f"{scores['after'][name]:.3f}"] for name in sorted(scores["after"])]

    panel.steps_spin.setValue(5000)
    job = panel.finetune()
    qtbot.waitUntil(lambda: any(j.state == "running" for j in app.state.jobs.jobs.values()), timeout=60_000)
    session.cancel_job()
    assert wait_job(qtbot, widget, timeout=120_000).outcome == "cancelled"
    assert job.outcome == "cancelled" and session.current_model.model_id == chosen
    assert all(j.state != "running" for j in app.state.jobs.jobs.values())
    assert any(j.state == "cancelled" for j in app.state.jobs.jobs.values())
    assert "cancelled" in panel.finetune_result.text()
    assert client.models()["active"] == chosen
    if chosen == new.model_id:
        client.rollback_model()  # leave the shared server with its default model


def test_a_server_lost_mid_finetune_ends_the_section_in_failure_not_in_its_last_progress_line(
        viewer_widget, server, qtbot, monkeypatch, shared_data, notifications):
    """The server stopped answering while its job trained: the section kept "fine-tuning on the server: starting",
    read as a job still running, with nothing saying it had failed."""
    from qtpy.QtWidgets import QMessageBox

    viewer, widget = viewer_widget
    session, panel = widget.session, widget.panel("finetune")
    url, cfg, app = server
    server_with_a_case(url, shared_data)
    remote = connect(qtbot, widget, monkeypatch, url)
    monkeypatch.setattr(QMessageBox, "question", lambda *a, **k: QMessageBox.StandardButton.Yes)
    parent = session.current_model

    def gone(job_id):
        raise ConnectionError(f"[Errno 111] Connection refused: {url}")

    monkeypatch.setattr(remote.client, "job", gone)
    panel.steps_spin.setValue(5000)
    assert panel.finetune() is not None
    assert wait_job(qtbot, widget, timeout=60_000).outcome == "error"
    text = panel.finetune_result.text()
    assert text.startswith(f"fine-tuning {parent.version} on the server {url} failed") and "starting" not in text
    assert f"{parent.version} stays selected, no new version was made" in text
    assert any(kind == "error" for kind, _ in notifications)
    monkeypatch.undo()
    for job in app.state.jobs.jobs.values():  # the server is alive after all: its job is not left running
        if job.state == "running":
            app.state.jobs.cancel(job.job_id)
    qtbot.waitUntil(lambda: all(j.state != "running" for j in app.state.jobs.jobs.values()), timeout=120_000)


def test_make_a_promptable_model_on_the_server_from_its_automatic_model(
        viewer_widget, server, qtbot, monkeypatch, shared_data):
    """The Fine-tune section's "make a promptable model" over a server: the job runs there from the server's
    automatic model and cases; the new model is prompted with in the Interactive section, while the automatic
    model stays the one that segments, here and on the server. The server scores it with the robot user against
    the Interactive section's promptable model, and the section shows it as a local job's scores."""
    pytest.importorskip("engine.interactive")
    from napari_mambahome.panels.finetune import scored_where as panel_where
    viewer, widget = viewer_widget
    session, panel = widget.session, widget.panel("finetune")
    url, cfg, app = server
    client = server_with_a_case(url, shared_data)
    connect(qtbot, widget, monkeypatch, url)
    auto = session.current_model
    assert not auto.is_interactive and client.models()["active"] == auto.model_id
    # the promptable model in use: the Interactive section's choice, which the server scores the new one against
    interactive = widget.panel("interactive")
    echo = next(e for e in interactive.interactive_entries() if e.model_id == "echo")
    assert interactive.select_model(echo) and session.prompt_model is echo and session.current_model is auto
    panel.promptable_check.setChecked(True)
    assert panel.makes_promptable
    panel.steps_spin.setValue(2)
    run = None
    try:
        assert panel.finetune() is not None
        assert wait_job(qtbot, widget, timeout=300_000).outcome == "done"
        listing = client.models()
        made = {m["id"]: m for m in listing["models"] if m["task"] == "interactive" and m["id"].startswith("finetune-")}
        runs = {mid.split("/")[0] for mid in made}
        assert len(runs) == 1 and all(m["parent"] for m in made.values())  # one run (its best and last versions)
        run = runs.pop()
        job = next(j for j in app.state.jobs.jobs.values() if j.model_id in made)
        new_id = job.model_id
        assert listing["active"] == auto.model_id  # the server still segments with the automatic model
        assert session.current_model.model_id == auto.model_id and not session.current_model.is_interactive
        # prompted with from now on, unless it scores below the one in use (then listed only, as locally)
        assert session.prompt_model.model_id == ("echo" if job.scores["weaker"] else new_id)
        assert interactive.model_entry.model_id == session.prompt_model.model_id
        assert new_id in [e.model_id for e in interactive.interactive_entries()]
        text = panel.finetune_result.text()
        assert "promptable" in text and "Interactive section" in text and auto.version in text
        # scored on the server by the robot user against the promptable model in use (echo), shown as locally
        scores = job.scores
        assert scores is not None and scores["compared_with"] == "echo" and scores["metric"] == "robot_dice"
        info = session.last_finetune
        assert info["promptable"] and info["compared_with"] == echo.version == "echo-stand-in"
        assert info["dice"]["before"] == scores["before"] and info["dice"]["after"] == scores["after"]
        cases = client.cases()  # this module's other tests may have saved some too
        assert scores["scored_on"] == info["scored_on"] == [c["case_id"] for c in cases]
        assert scores["after"] and set(scores["after"]) == set(scores["before"])  # each class of the cases
        new_version = next(e.version for e in interactive.interactive_entries() if e.model_id == new_id)
        assert session.scores_by_version[new_version] == scores["after"]
        assert session.scores_by_version["echo-stand-in"] == scores["before"]
        where = panel_where(len(cases), scores["held_out"], len(cases))
        assert f"Robot-user Dice after {ROBOT_CLICKS} clicks per class on {where}" in text
        assert f"on the server {url}" in text and "echo-stand-in" in text and "is not compared" in text
        table = panel.scores_table
        assert [table.horizontalHeaderItem(c).text() for c in range(3)] == ["class", "promptable in use", "new promptable"]
        assert [[table.item(r, c).text() for c in range(3)] for r in range(table.rowCount())] == \
            [[name, f"{scores['before'][name]:.3f}", f"{scores['after'][name]:.3f}"] for name in sorted(scores["after"])]
        # the same warning as a local job's, exactly when the server found the new model weaker
        assert ("Kept echo-stand-in selected: the new model scores" in text) == scores["weaker"] == \
            (job.warning is not None)
        # the promptable model cannot be made promptable again: the option says why
        new_entry = next(e for e in interactive.interactive_entries() if e.model_id == new_id)
        session.current_model = new_entry
        session.model_changed.emit(new_entry)
        assert not panel.promptable_check.isEnabled() and "already a promptable model" in panel.promptable_check.toolTip()
    finally:
        if run is not None:  # the module's server keeps its usual promptable models for the other tests
            shutil.rmtree(cfg.models_dir / run, ignore_errors=True)


def test_a_promptable_model_the_server_scores_below_the_one_in_use_is_said_plainly(
        viewer_widget, server, qtbot, monkeypatch, shared_data):
    """The server's scores of a new promptable model reach the Fine-tune section as a local job's do: the table, the
    robot-user text and, when the server found it weaker than the promptable model in use, the same warning. The
    server's job answers are replaced (no training): a new model that scores lower, deterministically."""
    from mambahome_client import Client as ClientClass

    viewer, widget = viewer_widget
    session, panel = widget.session, widget.panel("finetune")
    url, cfg, app = server
    server_with_a_case(url, shared_data)
    connect(qtbot, widget, monkeypatch, url)
    interactive = widget.panel("interactive")
    by_id = {e.model_id: e for e in interactive.interactive_entries()}
    assert interactive.select_model(by_id["interactive"])  # in use: the server's bundled promptable model
    auto = session.current_model
    assert not auto.is_interactive
    sent = {}
    scores = {"before": {"anterior": 0.66, "posterior": 0.5}, "after": {"anterior": 0.34, "posterior": 0.5},
              "per_case": {}, "metric": "robot_dice", "clicks": ROBOT_CLICKS, "seconds": 1.5,
              "compared_with": "interactive", "compared_with_version": "whatever", "scored_on": ["remote_ft"],
              "held_out": False, "mean_before": 0.58, "mean_after": 0.42, "weaker": True}
    state = {"job_id": "0123456789ab", "state": "done", "step": 2, "total": 2, "loss": 0.5, "message": "finished",
             "error": None, "model_id": "echo", "parent": auto.model_id, "scores": scores,
             "warning": "The new model scores below interactive (0.42 vs 0.58) ..."}

    def start(self, **kwargs):
        sent.update(kwargs)
        return dict(state, state="running", scores=None, warning=None)

    monkeypatch.setattr(ClientClass, "start_finetune", start)
    monkeypatch.setattr(ClientClass, "job", lambda self, job_id: dict(state))
    panel.promptable_check.setChecked(True)
    panel.steps_spin.setValue(2)
    assert panel.finetune() is not None
    assert wait_job(qtbot, widget, timeout=60_000).outcome == "done"
    assert sent["task"] == "interactive" and sent["compare_with"] == "interactive"  # the Interactive section's
    text = panel.finetune_result.text()
    compared = by_id["interactive"].version
    assert f"Robot-user Dice after {ROBOT_CLICKS} clicks per class on the 1 training case(s)" in text
    # weaker than the one in use: listed, not selected; the model prompted with stays (as a local job's does)
    assert f"Kept {compared} selected: the new model scores 0.42 vs 0.58 on these cases; select it in the " \
           "Interactive section to prompt with it anyway" in text
    assert "added to the Interactive section's models but not selected" in text
    assert interactive.model_entry.model_id == "interactive" and session.prompt_model.model_id == "interactive"
    assert "echo" in [e.model_id for e in interactive.interactive_entries()]
    assert session.current_model.model_id == auto.model_id  # the automatic model still segments
    assert session.last_finetune["compared_with"] == compared and session.scores_by_version[compared] == scores["before"]
    assert not panel.scores_table.isHidden() and panel.scores_table.rowCount() == 2
    assert panel.scores_table.item(0, 1).text() == "0.660" and panel.scores_table.item(0, 2).text() == "0.340"

    # a job the server could not score says so, and shows no scores
    state.update(scores=None, warning=None, not_scored="the scoring of fine-tune job 0123456789ab's new model echo "
                                                        "on 1 saved case(s) (remote_ft) failed; the server's log has "
                                                        "the details")
    assert session.current_model.model_id == auto.model_id
    panel.promptable_check.setChecked(True)
    assert panel.finetune() is not None
    assert wait_job(qtbot, widget, timeout=60_000).outcome == "done"
    assert panel.finetune_result.text().endswith(f"still segments. It was made but not scored: {state['not_scored']}.")
    assert panel.scores_table.isHidden()


def test_a_fine_tuned_model_the_server_scores_below_its_parent_is_listed_not_selected(
        viewer_widget, server, qtbot, monkeypatch, shared_data):
    """A server's fine-tune whose new model scores below its parent: the parent stays the active model, here and on
    the server (the next Segment uses it), the new one is listed, and the section says which was kept, as a local
    fine-tune does. The server's job answers are replaced (no training): a weaker model, deterministically."""
    from mambahome_client import Client as ClientClass

    viewer, widget = viewer_widget
    session, panel = widget.session, widget.panel("finetune")
    url, cfg, app = server
    client = server_with_a_case(url, shared_data)
    connect(qtbot, widget, monkeypatch, url)
    parent = session.current_model
    assert not parent.is_interactive and client.models()["active"] == parent.model_id
    copy = cfg.models_dir / "weaker-stand-in.safetensors"  # an automatic model the job "made"
    shutil.copyfile(app.state.models.get(parent.model_id).path, copy)
    scores = {"before": {"anterior": 0.9, "posterior": 0.8}, "after": {"anterior": 0.5, "posterior": 0.8},
              "per_case": {}, "metric": "dice", "clicks": None, "seconds": 1.0, "compared_with": parent.model_id,
              "scored_on": ["remote_ft"], "held_out": False, "mean_before": 0.85, "mean_after": 0.65, "weaker": True}
    state = {"job_id": "0123456789ac", "state": "done", "step": 2, "total": 2, "loss": 0.5, "message": "finished",
             "error": None, "model_id": "weaker-stand-in", "parent": parent.model_id, "scores": scores,
             "warning": "The new model scores below ..."}
    monkeypatch.setattr(ClientClass, "start_finetune",
                        lambda self, **kwargs: dict(state, state="running", scores=None, warning=None))
    monkeypatch.setattr(ClientClass, "job", lambda self, job_id: dict(state))
    try:
        panel.steps_spin.setValue(2)
        assert panel.finetune() is not None
        assert wait_job(qtbot, widget, timeout=60_000).outcome == "done"
        assert client.models()["active"] == parent.model_id == session.current_model.model_id
        assert "weaker-stand-in" in [e.model_id for e in session.entries]
        new = next(e for e in session.entries if e.model_id == "weaker-stand-in")
        text = panel.finetune_result.text()
        assert text.startswith(f"{new.version} (fine-tuned on the server {url}) added to the Versions list but not "
                               "selected.")
        assert f"Kept {parent.version} selected: the new model scores 0.65 vs 0.85 on these cases" in text
    finally:
        copy.unlink()
        client.select_model(parent.model_id)


def test_a_cancel_while_the_server_scores_keeps_the_new_model_selected_and_says_it_was_not_scored(
        viewer_widget, server, qtbot, monkeypatch, shared_data):
    """Cancel in the Fine-tune section while the server scores the new model: the scoring stops, the model made and
    saved there stays (the server's job is done, not scored); the section selects it, as the server has it, and says
    plainly that it was made but not scored. A scoring that fails on the server is said in the server's sentence.
    The server's training is replaced by a copy of the parent (seconds on a CPU); its scoring is the real one."""
    import engine.scoring
    from server_support import instant_finetune, scoring_waits_for_cancel

    viewer, widget = viewer_widget
    session, panel = widget.session, widget.panel("finetune")
    url, cfg, app = server
    client = server_with_a_case(url, shared_data)
    connect(qtbot, widget, monkeypatch, url)
    parent = session.current_model
    instant_finetune(monkeypatch)
    scoring = scoring_waits_for_cancel(monkeypatch)
    runs = []
    try:
        assert panel.finetune() is not None
        qtbot.waitUntil(scoring.is_set, timeout=120_000)
        session.cancel_job()
        job = wait_job(qtbot, widget, timeout=120_000)
        made = list(app.state.jobs.jobs.values())[-1]  # the server's job just started
        runs.append(made.out_id)
        # the server's job, what the section shows and the model in use agree: made, selected, not scored
        assert made.state == "done" and made.scores is None
        assert made.not_scored == "its scoring was cancelled by the user"
        assert job.outcome == "done"
        new = session.current_model
        assert new.model_id == made.model_id == client.models()["active"] and new is not parent
        text = panel.finetune_result.text()
        assert text.startswith(f"{new.version} selected (fine-tuned on the server in ")
        assert text.endswith("It was made but not scored: its scoring was cancelled by the user.")
        assert panel.scores_table.isHidden() and new.version not in session.scores_by_version

        def failing(*args, **kwargs):
            raise OSError(13, "/srv/private/cache.bin: Permission denied")

        monkeypatch.setattr(engine.scoring, "before_after", failing)
        assert panel.finetune() is not None
        assert wait_job(qtbot, widget, timeout=120_000).outcome == "done"
        failed = list(app.state.jobs.jobs.values())[-1]
        runs.append(failed.out_id)
        assert failed.state == "done" and failed.not_scored.startswith(f"the scoring of fine-tune job {failed.job_id}")
        assert session.current_model.model_id == failed.model_id
        text = panel.finetune_result.text()
        assert text.endswith(f"It was made but not scored: {failed.not_scored}.") and "/srv/private" not in text
    finally:
        client.select_model("default")  # leave the shared server with its default model
        for run in runs:
            shutil.rmtree(cfg.models_dir / run, ignore_errors=True)


def test_a_fine_tune_that_fails_on_the_server_is_said_in_the_servers_sentence(
        viewer_widget, server, qtbot, monkeypatch, shared_data, notifications):
    """Training that fails unexpectedly on the server: the dock says which job failed where, in the server's words,
    and never the exception's text (a server path here); the model in use stays."""
    from engine.server import state

    viewer, widget = viewer_widget
    session, panel = widget.session, widget.panel("finetune")
    url, cfg, app = server
    server_with_a_case(url, shared_data)
    connect(qtbot, widget, monkeypatch, url)
    parent = session.current_model

    def failing(checkpoint, data, out, **settings):
        settings["on_log"]({"step": 1, "loss": 0.5})
        settings["progress"](1, 2, "step 1/2 loss 0.5000")
        raise RuntimeError("CUDA error: an illegal memory access at /srv/private/kernels.bin")

    monkeypatch.setattr(state, "run_finetune", failing)
    panel.steps_spin.setValue(2)
    assert panel.finetune() is not None
    assert wait_job(qtbot, widget, timeout=120_000).outcome == "error"
    failed = list(app.state.jobs.jobs.values())[-1]
    assert failed.state == "failed" and failed.error == (f"fine-tune job {failed.job_id} of model default failed during "
                                                         "training at step 1 of 2; the server's log has the details")
    said = [msg for kind, msg in notifications if kind == "error"]
    assert any(msg.endswith(f" on the server failed: the server {url} says: {failed.error}") for msg in said), said
    assert not any("/srv/private" in msg or "RuntimeError" in msg or "CUDA" in msg for msg in said)
    assert session.current_model is parent


# ---------------------------------------------------------------- prompts
def test_remote_prompt_backend_changes_the_mask_at_a_point_and_undo_restores_it(server, shared_data):
    pytest.importorskip("engine.interactive")
    from engine.io import load_volume
    from napari_mambahome.remote import UploadCache, remote_backend_factory

    path = shared_data / "hippocampus" / "imagesTr" / "hippocampus_001.nii.gz"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    volume = load_volume(path)
    client = Client(server[0], token=TOKEN)
    client.connect()
    uploads = UploadCache(client)
    factory = remote_backend_factory(client, uploads)
    backend = factory(None, volume, "cpu", modality="MR")
    mask = np.zeros(volume.data.shape, np.uint8)
    voxel = tuple(s // 2 for s in volume.data.shape)
    u = backend.add_point(voxel, positive=True)
    assert u.mask.dtype == np.uint8 and u.mask.shape == tuple(b.stop - b.start for b in u.bbox)
    assert all(b.start <= v < b.stop for b, v in zip(u.bbox, voxel))
    mask[u.bbox] = u.mask
    assert mask[voxel] == 1
    u = backend.undo()
    mask[u.bbox] = u.mask
    assert not mask.any()
    initial = np.zeros_like(mask)
    initial[3:9, 10:20, 5:15] = 1
    u = backend.set_initial_mask(initial)
    mask[u.bbox] = u.mask
    assert np.array_equal(mask, initial)
    u = backend.add_scribble(np.argwhere(initial)[:3], positive=False)
    mask[u.bbox] = u.mask
    assert not mask[tuple(np.argwhere(initial)[0])]
    u = backend.reset()
    mask[u.bbox] = u.mask
    assert not mask.any()
    second = factory(None, volume, "cpu", modality="MR")  # the same volume is not sent twice
    second.add_point(voxel)
    assert uploads.uploads == 1


def test_remote_prompt_backend_prompts_with_the_chosen_model_and_starts_a_fresh_object(server, shared_data):
    pytest.importorskip("engine.interactive")
    from engine.io import load_volume
    from napari_mambahome.remote import RemoteError, UploadCache, entries_from_listing, remote_backend_factory

    path = shared_data / "hippocampus" / "imagesTr" / "hippocampus_001.nii.gz"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    url, cfg, app = server
    volume = load_volume(path)
    client = Client(url, token=TOKEN)
    client.connect()
    uploads = UploadCache(client)
    factory = remote_backend_factory(client, uploads)
    voxel = tuple(s // 2 for s in volume.data.shape)
    with fill_model_on(app):
        entries = {e.model_id: e for e in entries_from_listing(client.models(), url)}
        fill = factory(entries["fill"].prompt_source, volume, "cpu", modality="MR")
        u = fill.add_point(voxel)
        held = app.state.sessions.get(fill._session_id)
        assert u.model_id == "fill" and held.interactive_model == "fill"
        filled = int(u.mask.sum())
        echo = factory(entries["echo"], volume, "cpu", modality="MR")  # the entry itself names its model too
        u = echo.add_point(voxel)
        assert u.model_id == "echo" and held.interactive_model == "echo" and 0 < u.mask.sum() < filled / 10
        # the same model again, a new backend: a new object, the earlier backend's prompt is not in its history
        again = factory("echo", volume, "cpu", modality="MR")
        again.add_point((2, 2, 2))
        again.undo()
        with pytest.raises(RemoteError, match="nothing to undo"):
            again.undo()
        with pytest.raises(RemoteError, match="no model 'no-such-model'"):
            factory("no-such-model", volume, "cpu", modality="MR").add_point(voxel)
        with pytest.raises(RemoteError, match="'default' cannot answer prompts: it is a segmentation model"):
            factory("default", volume, "cpu", modality="MR").add_point(voxel)
        with pytest.raises(RemoteError, match="cannot prompt on the server"):
            factory(Path("my_model.safetensors"), volume, "cpu")
    assert uploads.uploads == 1


# ---------------------------------------------------------------- responsiveness
def test_the_event_loop_keeps_serving_during_a_remote_call(viewer_widget, server, qtbot, monkeypatch, mr_path):
    """The server answers only after the GUI thread has run a timer three times: a remote call made on
    the GUI thread would never see that happen."""
    from qtpy.QtCore import QTimer

    viewer, widget = viewer_widget
    url, cfg, app = server
    _open(viewer, mr_path)
    connect(qtbot, widget, monkeypatch, url)
    gate, ticks, waited = threading.Event(), [], []
    models = app.state.models
    real_predictor = models.predictor

    def gated_predictor(model_id):
        predictor = real_predictor(model_id)

        class Gated:
            def predict(self, *args, **kwargs):
                waited.append(gate.wait(timeout=60))
                return predictor.predict(*args, **kwargs)

        return Gated()

    monkeypatch.setattr(models, "predictor", gated_predictor)

    def tick():
        ticks.append(1)
        if len(ticks) >= 3:
            gate.set()

    timer = QTimer()
    timer.timeout.connect(tick)
    timer.start(20)
    widget.panel("segment").segment()
    assert wait_job(qtbot, widget).outcome == "done"
    timer.stop()
    assert waited == [True] and len(ticks) >= 3


# ---------------------------------------------------------------- busy, too large
def test_busy_and_too_large_answers_are_clear_notifications(viewer_widget, server, qtbot, monkeypatch, mr_path,
                                                             notifications):
    viewer, widget = viewer_widget
    url, cfg, app = server
    image = _open(viewer, mr_path)
    connect(qtbot, widget, monkeypatch, url)
    app.state.gpu.acquire("a test holding the GPU")
    try:
        widget.panel("segment").segment()
        assert wait_job(qtbot, widget).outcome == "error"
    finally:
        app.state.gpu.release()
    assert any(kind == "error" and f"the server {url} is busy" in msg and "try again" in msg
               for kind, msg in notifications)
    assert widget.session.labels_layer is None  # nothing half-made

    with running_server(ServerConfig(device="cpu", max_upload_bytes=1000)) as (small_url, _):
        connect(qtbot, widget, monkeypatch, small_url, token=None)
        assert widget.session.remote.url == small_url
        widget.panel("segment").segment()
        assert wait_job(qtbot, widget).outcome == "error"
    assert any(kind == "error" and "too large" in msg and "--max-upload-mb" in msg for kind, msg in notifications)
    assert image in viewer.layers and widget.session.labels_layer is None


def test_a_time_limit_reaches_the_servers_fine_tune_job(viewer_widget, server, qtbot, monkeypatch, shared_data):
    """The Fine-tune section's time limit on a server: the job gets it (``max_minutes``) and the server's most steps,
    so the time decides there as it does locally."""
    from engine.server import state
    from napari_mambahome.panels.finetune import REMOTE_MAX_STEPS

    viewer, widget = viewer_widget
    panel = widget.panel("finetune")
    url, cfg, app = server
    server_with_a_case(url, shared_data)
    connect(qtbot, widget, monkeypatch, url)
    seen = {}

    def recording(checkpoint, data, out, **settings):
        seen.update(settings)
        raise RuntimeError("stop here: only the settings are checked")

    monkeypatch.setattr(state, "run_finetune", recording)
    panel.minutes_spin.setValue(2.5)
    assert panel.finetune() is not None
    assert wait_job(qtbot, widget, timeout=120_000).outcome == "error"
    assert seen["max_minutes"] == 2.5 and seen["steps"] == REMOTE_MAX_STEPS
