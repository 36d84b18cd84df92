"""A server stopped (Ctrl-C, a crash, a reboot) while a fine-tune trains leaves no model behind on its next start.

A job that fails or is cancelled leaves no model (its run folder is discarded), but one whose server stopped mid-run
left its folder under ``--models`` with the checkpoints written so far: the next ``mambahome serve`` listed
``finetune-.../best`` and ``.../last`` of a run stopped at step 2 of 200 beside finished versions, nothing telling
them apart, and the job that made them was gone (``GET /finetune/{job}`` 404). Now such a run folder is set aside
(renamed to a dot-name, which no listing shows) at the next start, which says so; saved cases and finished versions
stay as they are. A run stopped while its finished model was being scored keeps its model: it was made.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from mambahome_client import Client  # noqa: E402
from server_support import connected_client, cpu_server, free_port, instant_finetune  # noqa: E402

TOKEN = "walk-interrupted-token"
REPO = Path(__file__).resolve().parents[1]

# `mambahome serve` as a process of its own (engine.server.cli.serve), its training replaced by one that writes a
# checkpoint, as a real run does at its first validation, then trains on until the server is stopped.
LAUNCHER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    sys.path[:0] = [{repo!r}]
    from engine.server import state
    from engine.server.cli import serve
    from engine.server.config import ServerConfig

    def run(checkpoint, data, out, **settings):
        from engine.checkpoint import load_checkpoint, save_checkpoint
        model, meta = load_checkpoint(checkpoint)
        save_checkpoint(Path(out) / "best.safetensors", model, dict(meta, version=Path(out).name + "-step2"))
        settings["on_log"]({{"step": 2, "loss": 0.5}})
        time.sleep(600)

    state.run_finetune = run
    serve(ServerConfig(token={token!r}, port={port}, models_dir=Path({root!r}) / "models",
                       cases_dir=Path({root!r}) / "cases", device="cpu"))
""")


def _save_case(client: Client) -> None:
    volume = np.random.default_rng(0).normal(size=(24, 24, 24)).astype(np.float32)
    s = client.create_session(volume, np.eye(4), name="noise", modality="MR")
    labels = np.zeros(volume.shape, np.uint8)
    labels[8:16, 8:16, 8:16] = 1
    client.save_case(s.session_id, labels, ["background", "organ", "vessel", "gland"], "MR", case_id="kept")
    client.close_session(s.session_id)


def test_a_fine_tune_stopped_with_its_server_leaves_no_model_at_the_next_start(tmp_path):
    port = free_port()
    script = tmp_path / "serve.py"
    script.write_text(LAUNCHER.format(repo=str(REPO), token=TOKEN, port=port, root=str(tmp_path)))
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen([sys.executable, str(script)], stdout=log, stderr=subprocess.STDOUT)
    try:
        client = Client(f"http://127.0.0.1:{port}", token=TOKEN, timeout=120)
        deadline = time.monotonic() + 120
        while True:
            try:
                client.connect()
                break
            except Exception:  # noqa: BLE001 - not listening yet
                assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
                time.sleep(0.5)
        _save_case(client)
        job = client.start_finetune(steps=200)
        deadline = time.monotonic() + 120
        while not list((tmp_path / "models").glob(f"finetune-*-{job['job_id']}/best.safetensors")):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    run = next((tmp_path / "models").glob(f"finetune-*-{job['job_id']}"), None)
    assert run is not None and (run / "best.safetensors").is_file()  # what the stopped server left

    from engine.server.cli import startup_notes

    with cpu_server(tmp_path, TOKEN) as (url, app):
        client = connected_client(url, TOKEN)
        ids = [m["id"] for m in client.models()["models"]]
        assert not [i for i in ids if i.startswith("finetune-")], ids
        assert [c["case_id"] for c in client.cases()] == ["kept"]
        assert not run.exists() and (run.parent / f".interrupted-{run.name}" / "best.safetensors").is_file()
        notes = startup_notes(app.state.config, app.state.models, app.state.jobs)
        assert any(run.name in n and "interrupted" in n for n in notes), notes


def test_a_finished_version_is_listed_again_after_a_restart(tmp_path, monkeypatch):
    instant_finetune(monkeypatch)
    with cpu_server(tmp_path, TOKEN) as (url, _):
        client = connected_client(url, TOKEN)
        _save_case(client)
        done = client.wait_job(client.start_finetune(steps=1)["job_id"])
        assert done["state"] == "done", done
    assert not [p for p in (tmp_path / "models").iterdir() if p.name.startswith(".")]
    with cpu_server(tmp_path, TOKEN) as (url, _):
        ids = [m["id"] for m in connected_client(url, TOKEN).models()["models"]]
        assert done["model_id"] in ids, ids


def test_a_run_of_a_server_still_running_is_left_alone(tmp_path):
    """Two servers may share a models folder: a run another live server trains is not set aside."""
    from engine.server.state import JobManager, mark_running

    run = tmp_path / "models" / "finetune-20990101-000000-abcdefabcdef"
    run.mkdir(parents=True)
    (run / "best.safetensors").write_bytes(b"")
    mark_running(tmp_path / "models", run.name, "abcdefabcdef", pid=os.getppid())  # alive: our parent
    with cpu_server(tmp_path, TOKEN) as (_, app):
        assert isinstance(app.state.jobs, JobManager) and app.state.jobs.set_aside == []
    assert run.is_dir()


def test_the_marker_is_written_whole_and_a_dead_servers_run_is_gone_before_the_registry_lists(tmp_path):
    """The marker is replaced whole (a server starting meanwhile read a half-written one as a dead server's), and the
    run of a dead server is set aside before the model registry lists the models and chooses its active one."""
    import json

    from engine.server.app import create_app
    from engine.server.config import ServerConfig
    from engine.server.state import mark_running

    models = tmp_path / "models"
    run = models / "finetune-20990101-000000-abcdefabcdef"
    run.mkdir(parents=True)
    marker = mark_running(models, run.name, "abcdefabcdef", pid=2**22 + 12345)  # no such process
    assert json.loads(marker.read_text())["job_id"] == "abcdefabcdef"
    assert sorted(p.name for p in models.iterdir()) == sorted([run.name, marker.name])  # no temp file left
    app = create_app(ServerConfig(models_dir=models, device="cpu"))
    assert app.state.jobs.set_aside == [run.name]
    assert not run.exists() and not marker.exists()
    assert not [e for e in app.state.models.entries() if str(e).startswith("finetune-")]
