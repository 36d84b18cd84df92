"""Reviewer-reproduced server defects, each against a real server (uvicorn on 127.0.0.1, on the CPU).

1. ``--max-voxels`` counted only the uploaded grid, not the grid a model runs on (the volume resampled to the model's
   ``target_spacing``): a 10 x 10 x 10 NIfTI whose header says 150 x 150 x 200 mm voxels is 901 x 901 x 901 voxels at
   the bundled model's 1.5 x 1.5 x 2 mm, and segmenting it grew the server by 12 GB. Segmentations, prompts and
   fine-tunes on such a volume (or saved case) are now a ``422 too_many_voxels`` naming both grids, both spacings and
   the limit, said before the GPU lock is taken: each test holds the GPU itself, so a check made after taking it
   would answer ``503 busy`` instead (and without the check the request would start the model).
2. A fine-tune's ``best``/``last`` were listed and selectable while it trained; its cancel deleted them and left the
   server's active model a missing one (every segmentation a 404). A run still training is neither listed nor
   selectable (``409 model_training``), and an active model that is gone falls back to the previous selection still
   listed, else ``default``.
3. ``settings.seed`` 1e300 was accepted and failed in the job with 300 digits in its error: seeds outside [0, 2^32)
   are a ``400 invalid_request``, and echoed values are cut.
"""
from __future__ import annotations

import json
import logging
import shutil
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Optional, Tuple

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from server_support import connected_client, cpu_server, finetune_server  # noqa: E402

TOKEN = "limits-review-token-0123"


def _call(url: str, method: str, path: str, body: Any = None, raw: Optional[str] = None) -> Tuple[int, Any]:
    """``(status, JSON answer)`` of one request (a pack answer comes back as its byte count); ``raw``: the JSON body as
    text, for numbers Python's json would not write (1e300 is written as such; a 400-digit integer as its digits)."""
    data = raw.encode() if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url + path, method=method, data=data,
                                 headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as resp:
            payload = resp.read()
            return resp.status, (json.loads(payload) if resp.headers.get_content_type() == "application/json"
                                 else len(payload))
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _nifti_session(client: Any, tmp_path: Path, spacing: Tuple[float, float, float], name: str) -> str:
    """A 10 x 10 x 10 float32 NIfTI with voxels of ``spacing`` mm, uploaded as a file: the reviewer's volume."""
    import nibabel as nib

    path = tmp_path / name
    data = np.random.default_rng(0).random((10, 10, 10), dtype=np.float32)
    nib.save(nib.Nifti1Image(data, np.diag([*spacing, 1.0])), str(path))
    return client.upload_file(path, modality="MR").session_id


class _GpuHeld:
    """The server's GPU lock held by the test for the block: a request that reaches for it answers ``503 busy``."""

    def __init__(self, app: Any) -> None:
        self.gpu = app.state.gpu

    def __enter__(self) -> "_GpuHeld":
        self.gpu.acquire("the test's own job")
        return self

    def __exit__(self, *exc: Any) -> None:
        self.gpu.release()


def test_segment_refuses_a_volume_whose_grid_at_the_models_spacing_is_over_max_voxels(tmp_path):
    with cpu_server(tmp_path / "server", TOKEN) as (url, app):
        client = connected_client(url, TOKEN)
        limit = app.state.config.max_voxels
        sid = _nifti_session(client, tmp_path, (150.0, 150.0, 200.0), "metres.nii.gz")
        with _GpuHeld(app):
            status, answer = _call(url, "POST", f"/sessions/{sid}/segment", {})
        assert status == 422 and answer["error"] == "too_many_voxels", answer
        detail = answer["detail"]
        for said in ("metres.nii.gz", "10 x 10 x 10", "150 x 150 x 200 mm", "1.5 x 1.5 x 2 mm", "'default'",
                     "901 x 901 x 901", str(901 ** 3), str(limit), "--max-voxels"):
            assert said in detail, (said, detail)
        assert app.state.gpu.holder is None  # nothing waits on the GPU, nothing was started
        assert client.health()["status"] == "ok"


def test_segment_checks_the_resampled_grid_against_the_servers_own_limit_and_still_segments_others(tmp_path):
    """30 x 30 x 40 mm voxels (the reviewer's 270 s of GPU) are 181^3 voxels at 1.5 x 1.5 x 2 mm: over a limit of
    100,000 that the 1,000-voxel upload itself is well within; the same grid at the model's own spacing segments."""
    with cpu_server(tmp_path / "server", TOKEN, max_voxels=100_000) as (url, app):
        client = connected_client(url, TOKEN)
        coarse = _nifti_session(client, tmp_path, (30.0, 30.0, 40.0), "coarse.nii.gz")
        with _GpuHeld(app):
            status, answer = _call(url, "POST", f"/sessions/{coarse}/segment", {})
        assert status == 422 and answer["error"] == "too_many_voxels", answer
        assert "181 x 181 x 181" in answer["detail"] and "100000 voxels" in answer["detail"], answer
        fine = _nifti_session(client, tmp_path, (1.5, 1.5, 2.0), "fine.nii.gz")
        status, size = _call(url, "POST", f"/sessions/{fine}/segment", {})
        assert status == 200 and size > 0


def test_a_prompt_on_such_a_volume_is_refused_before_the_gpu_lock(tmp_path):
    pytest.importorskip("engine.interactive")
    with cpu_server(tmp_path / "server", TOKEN) as (url, app):
        client = connected_client(url, TOKEN)
        sid = _nifti_session(client, tmp_path, (150.0, 150.0, 200.0), "metres.nii.gz")
        with _GpuHeld(app):
            status, answer = _call(url, "POST", f"/sessions/{sid}/prompts",
                                   {"type": "point", "voxel": [5, 5, 5], "positive": True})
        assert status == 422 and answer["error"] == "too_many_voxels", answer
        # the bundled promptable model works at 1 mm: 9 * 150 + 1 voxels along the first two axes
        assert "'interactive'" in answer["detail"] and "1351 x 1351 x 1801" in answer["detail"], answer
        assert "150 x 150 x 200 mm" in answer["detail"]


def test_finetune_refuses_a_saved_case_too_large_at_the_parents_spacing_before_any_job(tmp_path, monkeypatch):
    from server_support import instant_finetune

    instant_finetune(monkeypatch)  # without the check a job would start (and, unstubbed, train on 901^3 voxels)
    with finetune_server(tmp_path, TOKEN, "parent") as (url, app):
        client = connected_client(url, TOKEN)
        s = client.create_session(np.zeros((10, 10, 10), np.float32), np.diag([150.0, 150.0, 200.0, 1.0]),
                                  name="metres", modality="CT")
        labels = np.zeros((10, 10, 10), np.uint8)
        labels[3:7, 3:7, 3:7] = 1  # a case must hold a class to be saved
        client.save_case(s.session_id, labels, client.cases()[0]["class_names"], "CT", case_id="metres")
        with _GpuHeld(app):
            status, answer = _call(url, "POST", "/finetune", {"steps": 1, "model_id": "parent"})
        assert status == 422 and answer["error"] == "too_many_voxels", answer
        for said in ("case metres", "10 x 10 x 10", "150 x 150 x 200 mm", "1.5 x 1.5 x 2 mm", "'parent'",
                     "901 x 901 x 901", "No fine-tune job was started"):
            assert said in answer["detail"], (said, answer["detail"])
        assert app.state.jobs.jobs == {} and app.state.gpu.holder is None


def _training_held(monkeypatch) -> threading.Event:
    """The server's fine-tune replaced by one that writes its run's ``best`` and ``last`` at once (as a real run does
    at its first validation) and then trains until its job is cancelled; returns an event set once both are
    written."""
    from engine.server import state

    written = threading.Event()

    def run(checkpoint: Any, data: Any, out: Any, *, cancel: Any, **settings: Any) -> Any:
        from engine.checkpoint import load_checkpoint, save_checkpoint
        from engine.progress import check

        model, meta = load_checkpoint(checkpoint)
        for name in ("best", "last"):
            save_checkpoint(Path(out) / f"{name}.safetensors", model, dict(meta, version=f"{Path(out).name}-{name}"))
        settings["progress"](1, 10, "step 1/10")
        written.set()
        deadline = time.monotonic() + 120
        while not cancel.cancelled and time.monotonic() < deadline:
            time.sleep(0.02)
        check(cancel)
        raise AssertionError("the test never cancelled the job")

    monkeypatch.setattr(state, "run_finetune", run)
    return written


def test_a_run_still_training_is_not_listed_nor_selectable_and_its_cancel_leaves_a_valid_active_model(
        tmp_path, monkeypatch):
    written = _training_held(monkeypatch)
    with finetune_server(tmp_path, TOKEN, "parent") as (url, app):
        assert _call(url, "POST", "/models/select", {"model_id": "parent"})[0] == 200
        status, job = _call(url, "POST", "/finetune", {"steps": 10})
        assert status == 200, job
        assert written.wait(60)
        run = next(p.name for p in (tmp_path / "models").iterdir() if p.name.startswith("finetune-"))
        assert (tmp_path / "models" / run / "best.safetensors").is_file()  # on disk, not a model yet
        listing = _call(url, "GET", "/models")[1]
        assert not [m["id"] for m in listing["models"] if m["id"].startswith("finetune-")], listing
        for which in ("best", "last"):
            status, answer = _call(url, "POST", "/models/select", {"model_id": f"{run}/{which}"})
            assert status == 409 and answer["error"] == "model_training", answer
            assert job["job_id"] in answer["detail"] and "still being trained" in answer["detail"], answer
        _call(url, "POST", f"/finetune/{job['job_id']}/cancel")
        deadline = time.monotonic() + 60
        while _call(url, "GET", f"/finetune/{job['job_id']}")[1]["state"] == "running":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert not (tmp_path / "models" / run).exists()
        listing = _call(url, "GET", "/models")[1]
        assert listing["active"] == "parent" and listing["active"] in [m["id"] for m in listing["models"]]


def test_a_marked_run_of_another_server_is_not_offered(tmp_path):
    """The marker alone (another live server training into a shared models folder) hides the run too."""
    from train_support import tiny_parent

    models = tmp_path / "server" / "models"
    models.mkdir(parents=True)
    with cpu_server(tmp_path / "server", TOKEN) as (url, app):
        tiny_parent(models / "elsewhere" / "best.safetensors", ["background", "liver"])
        (models / ".running-elsewhere.json").write_text(json.dumps({"job_id": "0123456789ab", "pid": 1,
                                                                    "host": "another-machine"}))
        assert "elsewhere/best" not in [m["id"] for m in _call(url, "GET", "/models")[1]["models"]]
        status, answer = _call(url, "POST", "/models/select", {"model_id": "elsewhere/best"})
        assert status == 409 and "fine-tune job 0123456789ab" in answer["detail"], answer
        (models / ".running-elsewhere.json").unlink()  # its run finished: a model like any other
        assert _call(url, "POST", "/models/select", {"model_id": "elsewhere/best"})[0] == 200


def test_an_active_model_that_is_gone_falls_back_to_the_previous_selection_then_default(tmp_path, caplog):
    from train_support import tiny_parent

    models = tmp_path / "server" / "models"
    models.mkdir(parents=True)
    tiny_parent(models / "first.safetensors", ["background", "liver"])
    shutil.copy(models / "first.safetensors", models / "second.safetensors")
    with cpu_server(tmp_path / "server", TOKEN) as (url, app):
        for mid in ("first", "second"):
            assert _call(url, "POST", "/models/select", {"model_id": mid})[0] == 200
        with caplog.at_level(logging.WARNING, logger="mambahome.server"):
            (models / "second.safetensors").unlink()
            listing = _call(url, "GET", "/models")[1]
            assert listing["active"] == "first" and listing["history"] == ["default"], listing
            assert "the active model second is gone" in caplog.text and "first" in caplog.text
            (models / "first.safetensors").unlink()
            assert app.state.models.get(None).model_id == "default"  # what a segmentation naming no model uses
            listing = _call(url, "GET", "/models")[1]
            assert listing["active"] == "default" and [m for m in listing["models"] if m["active"]], listing
        status, answer = _call(url, "POST", "/models/rollback")
        assert status == 409 and answer["error"] == "no_history", answer


@pytest.mark.parametrize("raw, said", [
    ('{"steps": 5, "settings": {"seed": 1e300}}', "1e+300"),
    ('{"steps": 5, "settings": {"seed": -1}}', "-1"),
    ('{"steps": 5, "settings": {"seed": 4294967296}}', "4294967296"),
    ('{"steps": 5, "settings": {"seed": ' + "9" * 400 + '}}', "999..."),
    ('{"steps": 5, "settings": {"batch_size": ' + "9" * 400 + '}}', "999..."),
    ('{"steps": ' + "9" * 400 + '}', "999..."),
])
def test_finetune_seed_and_huge_numbers_are_refused_up_front_and_echoed_cut(tmp_path, raw, said):
    """Checked before anything else (this server has no saved case: a 409 no_cases would come after)."""
    with cpu_server(tmp_path / "server", TOKEN) as (url, app):
        status, answer = _call(url, "POST", "/finetune", raw=raw)
    assert status == 400 and answer["error"] == "invalid_request", answer
    assert said in answer["detail"] and len(answer["detail"]) < 300, answer
    assert "9" * 100 not in answer["detail"]


def test_the_seed_bounds_are_those_of_a_32_bit_seed():
    from engine.server.state import ServerError, finetune_setting

    assert finetune_setting("seed", 0) == 0 and finetune_setting("seed", 2**32 - 1) == 2**32 - 1
    assert finetune_setting("seed", 7.0) == 7 and isinstance(finetune_setting("seed", 7.0), int)
    for bad in (2**32, -1, 1e300, 0.5, True, "1"):
        with pytest.raises(ServerError) as err:
            finetune_setting("seed", bad)
        assert err.value.status == 400 and "'seed'" in str(err.value)
