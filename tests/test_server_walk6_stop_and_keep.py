"""Walk 6 of the server: "Stop and keep" for fine-tune jobs (``POST /finetune/{job}/stop``).

Locally (napari) a fine-tune can be stopped early and its model kept: the training loop ends at the next step as if its
time budget ran out (validated, saved, provenance ``stopped_on_request``). On the server only a cancel existed, which
discards the run: a user who saw the loss level off after 3 of 10 minutes could only wait or throw the run away. Now
a stop ends a job ``done`` with the model of that step listed (``stopped_at``), a stop before the first step finished
keeps nothing (``cancelled``), and the run a stop kept is a finished run for the interrupted-run bookkeeping: its
``.running-<run>.json`` marker is gone and the next start lists its model rather than setting it aside.

A real server (uvicorn on 127.0.0.1) fine-tunes a real tiny Mamba-HoME on a phantom case on the CPU; the training is
the engine's own, only held at a step (a wrapped ``on_log``) until the test's stop has arrived, so the stop always
lands mid-run whatever the machine's speed.
"""
from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Dict, Iterator, Tuple

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from mambahome_client import Client, NotFoundError, ServerError as ClientServerError  # noqa: E402
from server_support import connected_client, finetune_server, hold_finetune  # noqa: E402

TOKEN = "walk6-stop-and-keep"
MODEL = "tiny-ct"


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[Tuple[str, Any, Path]]:
    """A CPU server with a tiny untrained CT model and three saved phantom cases (:func:`finetune_server`)."""
    root = tmp_path_factory.mktemp("stop-server")
    with finetune_server(root, TOKEN, MODEL) as (url, app):
        yield url, app, root


@pytest.fixture
def client(served) -> Client:
    return connected_client(served[0], TOKEN)


def _raw(url: str, method: str, path: str, token: str = TOKEN) -> Tuple[int, Dict[str, Any]]:
    """``(status, JSON body)`` of a request sent without the client (its error mapping would hide the body)."""
    from mambahome_client.wire import PROTOCOL_VERSION

    headers = {"X-MambaHoME-Protocol": str(PROTOCOL_VERSION), "Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url + path, data=b"{}" if method == "POST" else None, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_a_stop_after_the_first_step_ends_the_job_done_with_the_model_of_that_step(served, client, monkeypatch):
    url, app, root = served
    from engine.checkpoint import read_checkpoint_metadata
    from engine.server.state import RUNNING_PREFIX, set_aside_interrupted_runs

    assert client.can_stop_jobs and "finetune_stop" in client.server_info["capabilities"]
    hold = hold_finetune(monkeypatch)
    job = client.start_finetune(steps=200, model_id=MODEL, batch_size=1, val_fraction=0.34)
    assert job["stop_requested"] is False and job["stopped_at"] is None
    assert hold.wait(300), client.job(job["job_id"])
    run = root / "models" / next(p.name for p in (root / "models").glob(f"finetune-*-{job['job_id']}"))
    marker = root / "models" / f"{RUNNING_PREFIX}{run.name}.json"
    assert marker.is_file()  # training: the run is marked as a live server's
    asked = client.stop_job(job["job_id"])
    assert asked["state"] == "running" and asked["stop_requested"] is True
    assert client.stop_job(job["job_id"])["stop_requested"] is True  # idempotent: asked twice is asked once
    final = client.wait_job(job["job_id"], poll_s=0.1, timeout=300)
    assert final["state"] == "done", final
    assert final["error"] is None and final["model_id"] and final["model_id"].startswith(run.name + "/")
    assert 1 <= final["stopped_at"] < 200 and final["stop_requested"] is True
    assert f"stopped as asked at step {final['stopped_at']}; the model of that step is kept" in final["message"]
    # scored as any new model against its parent
    assert final["scores"] is not None and final["scores"]["compared_with"] == MODEL
    listed = {m["id"]: m for m in client.models()["models"]}
    assert final["model_id"] in listed and listed[final["model_id"]]["parent"]
    meta = read_checkpoint_metadata(root / "models" / f"{final['model_id']}.safetensors")
    assert meta["provenance"]["stopped_on_request"] is True and meta["provenance"]["steps"] == final["stopped_at"]
    # the engine keeps a stopped run's resume state for `train --resume`; no client resumes a server job
    assert not (root / "models" / final["model_id"].split("/")[0] / "resume.safetensors").exists()
    assert final["scores"]["held_out"] is True  # validated on the held-out case, then scored there
    # a finished run for the interrupted-run bookkeeping: no marker left, and a restart keeps it listed
    assert not marker.exists() and not list((root / "models").glob(".interrupted-*"))
    assert set_aside_interrupted_runs(root / "models") == [] and run.is_dir()
    # a stop that arrives after the stop ended the job answers the job as it ended (a double click, a retry)
    again = client.stop_job(job["job_id"])
    assert again["state"] == "done" and again["model_id"] == final["model_id"]


def test_a_stop_before_the_first_step_keeps_nothing(served, client, monkeypatch):
    url, app, root = served
    # the job runs, nothing prepared or trained yet: held until the stop arrived
    entered = hold_finetune(monkeypatch, before_first_step=True)
    before = {m["id"] for m in client.models()["models"]}
    job = client.start_finetune(steps=200, model_id=MODEL, batch_size=1, val_fraction=0.34)
    assert entered.wait(60)
    # nothing prepared yet: the stop is said to keep nothing from its first answer on
    assert client.stop_job(job["job_id"])["message"] == ("stopping: its cases are still being prepared, so no model "
                                                         "will be kept")
    final = client.wait_job(job["job_id"], poll_s=0.1, timeout=300)
    assert final["state"] == "cancelled", final
    assert final["model_id"] is None and final["stopped_at"] is None and final["error"] is None
    assert final["message"] == ("stopped before its first training step finished: nothing was trained, so no model "
                                "was kept")
    assert {m["id"] for m in client.models()["models"]} == before
    assert not list((root / "models").glob(f"*{job['job_id']}*"))  # run folder and marker gone
    assert client.stop_job(job["job_id"])["state"] == "cancelled"  # asked again: the job as the stop ended it


def test_stop_errors_are_json_a_client_can_act_on(served, client, monkeypatch):
    url, app, root = served
    from server_support import instant_finetune

    status, body = _raw(url, "POST", "/finetune/0123456789ab/stop")
    assert status == 404 and body["error"] == "not_found" and "0123456789ab" in body["detail"]
    with pytest.raises(NotFoundError, match="no fine-tune job '0123456789ab'"):
        client.stop_job("0123456789ab")
    status, body = _raw(url, "POST", "/finetune/not-a-job/stop")
    assert status == 400 and body["error"] == "invalid_id", body
    assert _raw(url, "POST", "/finetune/0123456789ab/stop", token="")[0] == 401  # authenticated like the others
    assert _raw(url, "POST", "/finetune/0123456789ab/stop", token="wrong-token-wrong")[0] == 403
    assert _raw(url, "GET", "/finetune/0123456789ab/stop")[0] == 405
    # a job that ended without a stop: nothing to stop, said as JSON naming the job and how it ended
    instant_finetune(monkeypatch)
    done = client.wait_job(client.start_finetune(steps=1, model_id=MODEL)["job_id"], poll_s=0.1, timeout=300)
    assert done["state"] == "done" and done["stop_requested"] is False and done["stopped_at"] is None
    try:
        status, body = _raw(url, "POST", f"/finetune/{done['job_id']}/stop")
        assert status == 409 and body == {"error": "job_ended", "detail": f"fine-tune job {done['job_id']} has "
                                          "already ended (done); there is nothing to stop"}
        with pytest.raises(ClientServerError) as exc:
            client.stop_job(done["job_id"])
        assert exc.value.status == 409 and exc.value.code == "job_ended"
    finally:
        import shutil
        shutil.rmtree(root / "models" / done["model_id"].split("/")[0], ignore_errors=True)


def test_a_client_of_a_server_without_the_stop_says_so_without_asking(served):
    """A server before the stop (no ``finetune_stop`` capability) would answer its path 404, read as "no such job":
    the client refuses before sending and says what to do instead."""
    client = connected_client(served[0], TOKEN)
    client.server_info = dict(client.server_info, capabilities=["segment", "cases", "models", "finetune"],
                              version="0.9")
    assert not client.can_stop_jobs
    with pytest.raises(ClientServerError, match="cannot stop a fine-tune job and keep its model; cancel it") as exc:
        client.stop_job("0123456789ab")
    assert exc.value.code == "not_supported"


def test_a_resume_file_that_cannot_be_removed_does_not_cost_the_kept_model(served, client, monkeypatch):
    """The removal of a stopped run's resume state sat inside the job's try: a resume file held open (a virus scanner on
    Windows) or on a read-only mount failed the job, and a failed job's run folder, its new model with it, is
    discarded."""
    import pathlib

    url, app, root = served
    real_unlink = pathlib.Path.unlink

    def unlink(self, missing_ok: bool = False) -> None:
        if self.name == "resume.safetensors":
            raise PermissionError(13, "held open by another process", str(self))
        real_unlink(self, missing_ok=missing_ok)

    hold = hold_finetune(monkeypatch)
    job = client.start_finetune(steps=200, model_id=MODEL, batch_size=1, val_fraction=0.34)
    assert hold.wait(300), client.job(job["job_id"])
    monkeypatch.setattr(pathlib.Path, "unlink", unlink)
    client.stop_job(job["job_id"])
    final = client.wait_job(job["job_id"], poll_s=0.1, timeout=300)
    monkeypatch.setattr(pathlib.Path, "unlink", real_unlink)
    assert final["state"] == "done" and final["error"] is None and final["model_id"], final
    assert (root / "models" / f"{final['model_id']}.safetensors").is_file()
    assert final["model_id"] in {m["id"] for m in client.models()["models"]}
