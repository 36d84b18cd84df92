"""The real server (uvicorn on 127.0.0.1, a free port) driven over HTTP by the real client."""
from __future__ import annotations

import json
import logging
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import weakref
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
nib = pytest.importorskip("nibabel")
nrrd = pytest.importorskip("nrrd")

from engine.server.config import ServerConfig, ServerConfigError, is_loopback  # noqa: E402
from engine.server.state import GpuLock, ModelRegistry, ServerError, SessionStore  # noqa: E402
from engine.io import Volume  # noqa: E402
from mambahome_client import (AuthError, BusyError, Client, NotFoundError, PayloadTooLargeError,  # noqa: E402
                              ProtocolMismatchError, ServerError as ClientServerError, pack_array)
from server_support import running_server  # noqa: E402

TOKEN = "test-token-123456"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def hippo(shared_data):
    """A real MRI crop (35x51x35) and its label."""
    img = shared_data / "hippocampus" / "imagesTr" / "hippocampus_001.nii.gz"
    lab = shared_data / "hippocampus" / "labelsTr" / "hippocampus_001.nii.gz"
    if not img.is_file():
        pytest.skip(f"{img} not present")
    return img, lab


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("server")
    cfg = ServerConfig(token=TOKEN, models_dir=root / "models", cases_dir=root / "cases", device="cpu",
                       busy_wait_s=0.2, max_sessions=6)
    with running_server(cfg) as (url, app):
        yield url, cfg, app


@pytest.fixture
def client(server):
    c = Client(server[0], token=TOKEN, timeout=300)
    c.connect()
    return c


def write_lps_nrrd(nifti: Path, out: Path) -> np.ndarray:
    """The NIfTI's voxels as an NRRD in LPS space (what Slicer writes); returns the RAS affine."""
    img = nib.load(str(nifti))
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ img.affine
    header = {"space": "left-posterior-superior", "space directions": lps[:3, :3].T,
              "space origin": lps[:3, 3], "kinds": ["domain"] * 3, "encoding": "gzip"}
    nrrd.write(str(out), np.asarray(img.dataobj, dtype=np.int16), header)
    return img.affine


# ----------------------------------------------------------------------------- units
def test_public_bind_needs_a_token():
    with pytest.raises(ServerConfigError, match="without a token"):
        ServerConfig(host="0.0.0.0").validate()
    ServerConfig(host="0.0.0.0", token="long-enough-token").validate()
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5")
    out = subprocess.run([sys.executable, "-m", "engine.cli", "serve", "--host", "0.0.0.0", "--port", "0"],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 2 and "without a token" in out.stderr


def test_sessions_are_bounded_and_expire():
    now = [0.0]
    store = SessionStore(max_sessions=2, idle_timeout_s=60, clock=lambda: now[0])
    vol = Volume.from_array(np.zeros((4, 4, 4), np.float32), np.eye(4))
    a = store.create(vol, "a", None)
    store.create(vol, "b", None)
    with pytest.raises(ServerError, match="maximum of 2 sessions") as exc:
        store.create(vol, "c", None)
    assert exc.value.status == 503
    now[0] = 30.0
    store.get(a.session_id)  # touching keeps it alive
    now[0] = 70.0  # b idle for 70 s, a for 40 s
    assert store.purge_expired() == 1 and len(store) == 1
    store.create(vol, "c", None)
    now[0] = 200.0
    with pytest.raises(ServerError, match="expired") as exc:
        store.get(a.session_id)
    assert exc.value.status == 404


def test_idle_sessions_are_dropped_without_further_requests():
    now = [0.0]
    store = SessionStore(max_sessions=2, idle_timeout_s=60, clock=lambda: now[0])
    store.create(Volume.from_array(np.zeros((4, 4, 4), np.float32), np.eye(4)), "a", None)
    thread = store.start_reaper(interval_s=0.01)
    now[0] = 100.0
    deadline = time.monotonic() + 10
    while len(store) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(store) == 0 and thread.is_alive()


# ----------------------------------------------------------------------------- over HTTP
def test_health_needs_no_token_but_everything_else_does(server):
    url = server[0]
    assert Client(url).health()["status"] == "ok"
    with pytest.raises(AuthError) as missing:
        Client(url).models()
    assert missing.value.status == 401 and "needs a token" in str(missing.value)
    with pytest.raises(AuthError) as wrong:
        Client(url, token="wrong-token-000000").models()
    assert wrong.value.status == 403 and "token is wrong" in str(wrong.value)


def test_protocol_mismatch_is_a_clear_error(server, monkeypatch):
    url = server[0]
    req = urllib.request.Request(url + "/models", headers={"X-MambaHoME-Protocol": "99",
                                                           "Authorization": f"Bearer {TOKEN}"})
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(req, timeout=30)
    assert exc.value.code == 426
    body = json.loads(exc.value.read())
    assert body["error"] == "protocol_mismatch" and "speaks MambaHoME protocol 1" in body["detail"]
    import mambahome_client.client as client_module

    monkeypatch.setattr(client_module, "PROTOCOL_VERSION", 2)
    with pytest.raises(ProtocolMismatchError, match="this client speaks protocol 2"):
        Client(url, token=TOKEN).connect()


def test_models_list_the_bundled_model_and_refuse_unknown_ids(client):
    listing = client.models()
    ids = [m["id"] for m in listing["models"]]
    assert "default" in ids and listing["active"] == "default"
    default = next(m for m in listing["models"] if m["id"] == "default")
    assert default["class_names"][0] == "background" and len(default["class_names"]) >= 2
    with pytest.raises(NotFoundError):
        client.select_model("nope")
    with pytest.raises(ClientServerError) as exc:
        client.select_model("../../etc/passwd")
    assert exc.value.status == 400
    with pytest.raises(ClientServerError) as exc:
        client.rollback_model()
    assert exc.value.status == 409


def test_nifti_upload_and_segmentation_on_the_source_grid(client, hippo):
    img = nib.load(str(hippo[0]))
    s = client.upload_file(hippo[0], modality="MR")
    assert s.shape == img.shape
    np.testing.assert_allclose(s.affine, img.affine, atol=1e-5)
    seg = client.segment(s.session_id)
    assert seg.labels.shape == img.shape
    assert seg.class_names[0] == "background" and len(seg.colors) == len(seg.class_names)
    assert seg.labels.max() < len(seg.class_names) and seg.model_id == "default"
    client.close_session(s.session_id)
    with pytest.raises(NotFoundError, match="upload the volume again"):
        client.segment(s.session_id)


def test_nrrd_upload_keeps_the_geometry(client, hippo, tmp_path):
    affine = write_lps_nrrd(hippo[0], tmp_path / "hippo.nrrd")
    s = client.upload_file(tmp_path / "hippo.nrrd")
    assert s.shape == nib.load(str(hippo[0])).shape
    np.testing.assert_allclose(s.affine, affine, atol=1e-5)
    client.close_session(s.session_id)


def test_pack_upload_and_bad_uploads(client, server, tmp_path):
    rng = np.random.default_rng(0)
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    affine[:3, 3] = (-10, 20, 5)
    s = client.create_session(rng.normal(size=(20, 24, 16)).astype(np.float32), affine, name="../../x.nii")
    assert s.shape == (20, 24, 16)
    np.testing.assert_allclose(s.affine, affine)
    client.close_session(s.session_id)
    held = client.health()["sessions"]
    nan = np.zeros((8, 8, 8), np.float32)
    nan[1, 2, 3] = np.nan
    with pytest.raises(ClientServerError, match="scan.nii: 1 of 512 voxels are NaN"):
        client.create_session(nan, np.eye(4), name="scan.nii")
    with pytest.raises(ClientServerError, match="flat.nii.*singular"):
        client.create_session(np.zeros((8, 8, 8), np.int16),
                              np.array([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]]), name="flat.nii")
    assert client.health()["sessions"] == held  # nothing half-made
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"\x1f\x8b" + b"garbage" * 20)
    with pytest.raises(ClientServerError) as exc:
        client.upload_file(bad)
    assert exc.value.status == 400 and "broken.nii.gz" in str(exc.value) and "/tmp" not in str(exc.value)


def test_a_pack_upload_takes_its_name_from_the_query_as_files_do(client, server):
    """docs/SERVER.md: POST /sessions?format=pack&name=...; the query's name was ignored for packs."""
    url = server[0]
    image = np.zeros((8, 9, 10), np.float32)
    for query, header_name, expected in (("&name=knee.nii", None, "knee.nii"),
                                         ("&name=knee.nii", "own.nii", "knee.nii"),
                                         ("", "own.nii", "own.nii"), ("", None, "volume")):
        meta = {"affine": np.eye(4).tolist(), **({"name": header_name} if header_name else {})}
        req = urllib.request.Request(f"{url}/sessions?format=pack{query}", data=pack_array(image, meta, level=0),
                                     method="POST", headers={"Authorization": f"Bearer {TOKEN}",
                                                             "X-MambaHoME-Protocol": "1",
                                                             "Content-Type": "application/x-mambahome-pack"})
        with urllib.request.urlopen(req, timeout=60) as answer:
            made = json.loads(answer.read())
        assert made["name"] == expected, (query, header_name, made)
        client.close_session(made["session_id"])


def test_case_is_saved_with_the_source_geometry_and_ids_cannot_escape(client, server, hippo):
    cfg = server[1]
    img = nib.load(str(hippo[0]))
    label = np.asarray(nib.load(str(hippo[1])).dataobj).astype(np.uint8)
    s = client.upload_file(hippo[0], modality="MR")
    names = ["background", "anterior", "posterior"]
    rec = client.save_case(s.session_id, label, names, "MR", case_id="hippo_001")
    assert rec["case_id"] == "hippo_001" and rec["shape"] == list(img.shape)
    saved_img = nib.load(str(cfg.cases_dir / "hippo_001" / "image.nii.gz"))
    saved_lab = nib.load(str(cfg.cases_dir / "hippo_001" / "label.nii.gz"))
    np.testing.assert_allclose(saved_img.affine, img.affine, atol=1e-5)
    np.testing.assert_allclose(saved_lab.affine, img.affine, atol=1e-5)
    assert np.array_equal(np.asarray(saved_lab.dataobj), label)
    np.testing.assert_allclose(np.asarray(saved_img.dataobj), np.asarray(img.dataobj, dtype=np.float32))
    before = sorted(p.name for p in cfg.cases_dir.parent.iterdir())
    for evil in ("../escaped", "..", "a/b", "/etc/x", ".hidden", "x" * 300):
        with pytest.raises(ClientServerError) as exc:
            client.save_case(s.session_id, label, names, "MR", case_id=evil)
        assert exc.value.status == 400 and "invalid case id" in str(exc.value)
    assert sorted(p.name for p in cfg.cases_dir.parent.iterdir()) == before
    assert [c["case_id"] for c in client.cases()] == ["hippo_001"]
    with pytest.raises(ClientServerError) as exc:  # labels off the image grid
        client.save_case(s.session_id, label[:-1], names, "MR", case_id="short")
    assert exc.value.status == 400 and "do not lie on" in str(exc.value)
    client.close_session(s.session_id)


def test_a_case_saved_from_an_interactive_session_records_it(hippo, tmp_path):
    pytest.importorskip("engine.interactive")
    from server_support import echo_interactive_model

    cases = tmp_path / "cases"
    with running_server(ServerConfig(device="cpu", cases_dir=cases)) as (url, app):
        client = Client(url, timeout=300)
        client.connect()
        app.state.models.add_in_memory("echo", *echo_interactive_model())
        s = client.upload_file(hippo[0], modality="MR")
        mask = np.zeros(s.shape, dtype=np.uint8)
        for voxel in ([17, 25, 17], [17, 28, 17]):
            client.add_point(s.session_id, voxel).apply(mask)
        names = ["background", "anterior", "posterior"]
        rec = client.save_case(s.session_id, mask, names, "MR", case_id="prompted",
                               interactive={"class_ids": [1], "objects": 1, "prompts": 2})
        # the server names the session's interactive model when the client did not
        assert rec["interactive"] == {"class_ids": [1], "classes": ["anterior"], "objects": 1, "prompts": 2,
                                      "model_version": "echo-stand-in", "model_name": "echo"}
        saved = json.loads((cases / "prompted" / "case.json").read_text())
        assert saved["interactive"] == rec["interactive"]
        assert next(c for c in client.cases() if c["case_id"] == "prompted")["interactive"]["prompts"] == 2
        plain = client.save_case(s.session_id, mask, names, "MR", case_id="plain")
        assert plain["interactive"] is None  # a client that says nothing: not interactive
        with pytest.raises(ClientServerError) as exc:  # a class the case does not have
            client.save_case(s.session_id, mask, names, "MR", case_id="bad",
                             interactive={"class_ids": [7], "objects": 1, "prompts": 1})
        assert exc.value.status == 400 and "interactive class ids [7]" in str(exc.value)
        assert not (cases / "bad").exists()
        client.close_session(s.session_id)


def test_session_ids_cannot_be_paths(client, server):
    url = server[0]
    for evil in ("..%2F..%2Fetc", "short", "a" * 100):
        req = urllib.request.Request(f"{url}/sessions/{evil}/segment", data=b"{}", method="POST",
                                     headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as exc:
            urllib.request.urlopen(req, timeout=30)
        assert exc.value.code in (400, 404)
        assert "error" in json.loads(exc.value.read())


def test_an_invalid_id_is_told_the_rule_it_broke():
    """A session id of letters only but too short used to be told "letters, digits, '.', '_' and '-'
    only", which it was; each kind of id now states its own rule."""
    from engine.server.state import CASE_ID, JOB_ID, MODEL_ID, SESSION_ID, check_id

    with pytest.raises(ServerError) as exc:
        check_id("nonexistent", SESSION_ID, "session id")
    assert exc.value.status == 400 and exc.value.code == "invalid_id"
    assert "'nonexistent'" in str(exc.value) and "16 to 64" in str(exc.value)
    with pytest.raises(ServerError) as exc:
        check_id("not-hex-job", JOB_ID, "job id")
    assert "12 hexadecimal digits" in str(exc.value)
    with pytest.raises(ServerError) as exc:
        check_id("../etc", MODEL_ID, "model id")
    assert "GET /models" in str(exc.value)
    with pytest.raises(ServerError) as exc:
        check_id("-case", CASE_ID, "case id")
    assert "starting with a letter or digit" in str(exc.value)
    assert check_id("a" * 24, SESSION_ID, "session id") == "a" * 24


def test_finetune_makes_a_promptable_model_from_the_automatic_one(client, server, hippo):
    if not client.cases():
        s = client.upload_file(hippo[0], modality="MR")
        label = np.asarray(nib.load(str(hippo[1])).dataobj).astype(np.uint8)
        client.save_case(s.session_id, label, ["background", "anterior", "posterior"], "MR", case_id="ft_case")
        client.close_session(s.session_id)
    with pytest.raises(ClientServerError, match="unknown fine-tune task 'promptable'"):
        client.start_finetune(steps=1, task="promptable")
    job = client.start_finetune(steps=1, batch_size=1, val_fraction=0.0, task="interactive")
    final = client.wait_job(job["job_id"], poll_s=0.2, timeout=600)
    assert final["state"] == "done", final
    new = next(m for m in client.models()["models"] if m["id"] == final["model_id"])
    assert new["task"] == "interactive" and new["parent"]
    # a promptable model keeps its task: refused before a job exists
    with pytest.raises(ClientServerError, match="fine-tuning keeps its task"):
        client.start_finetune(steps=1, model_id=final["model_id"], task="segmentation")
    assert client.health()["busy"] is False


def test_a_promptable_model_made_on_the_server_is_scored_against_the_promptable_model_in_use(client, server, hippo):
    """As in napari's local Fine-tune section: the new promptable model and the one it is compared with (the client's
    choice, else the one a prompt naming no model uses) are scored by the robot user on the saved cases, and the
    finished job carries the scores and, when the new model is weaker, a warning naming the other one."""
    pytest.importorskip("engine.interactive")
    from engine.scoring import ROBOT_CLICKS
    from server_support import echo_interactive_model

    cfg, app = server[1], server[2]
    if not client.cases():
        s = client.upload_file(hippo[0], modality="MR")
        label = np.asarray(nib.load(str(hippo[1])).dataobj).astype(np.uint8)
        client.save_case(s.session_id, label, ["background", "anterior", "posterior"], "MR", case_id="ft_case")
        client.close_session(s.session_id)
    app.state.models.add_in_memory("echo", *echo_interactive_model())
    # refused before a job exists: an unknown model, a segmentation model, a job that makes no promptable model
    with pytest.raises(NotFoundError, match="no model 'nope'"):
        client.start_finetune(steps=1, task="interactive", compare_with="nope")
    with pytest.raises(ClientServerError, match="cannot answer prompts"):
        client.start_finetune(steps=1, task="interactive", compare_with="default")
    with pytest.raises(ClientServerError, match="compare_with"):
        client.start_finetune(steps=1, compare_with="echo")
    assert client.health()["busy"] is False

    runs = []
    try:
        job = client.start_finetune(steps=1, batch_size=1, val_fraction=0.0, task="interactive", compare_with="echo")
        assert job["scores"] is None and job["warning"] is None  # nothing scored yet
        final = client.wait_job(job["job_id"], poll_s=0.2, timeout=600)
        assert final["state"] == "done" and final["message"] == "finished", final
        runs.append(final["model_id"].split("/")[0])
        scores = final["scores"]
        classes = {"anterior", "posterior"}  # each class of the saved cases is an object to prompt
        assert scores["metric"] == "robot_dice" and scores["clicks"] == ROBOT_CLICKS
        assert scores["compared_with"] == "echo" and scores["compared_with_version"] == "echo-stand-in"
        assert scores["scored_on"] == [c["case_id"] for c in client.cases()] and scores["held_out"] is False
        assert scores["where"] == f"the {len(client.cases())} training case(s) (too few cases to hold some out)"
        assert final["not_scored"] is None
        assert set(scores["before"]) == set(scores["after"]) == classes
        assert all(0.0 <= d <= 1.0 for side in ("before", "after") for d in scores[side].values())
        case = scores["scored_on"][0]
        assert scores["per_case"]["after"][case] == scores["after"]  # one case: its scores are the means
        assert scores["mean_after"] == pytest.approx(sum(scores["after"].values()) / 2)
        assert scores["mean_before"] == pytest.approx(sum(scores["before"].values()) / 2)
        assert scores["weaker"] == (scores["mean_after"] < scores["mean_before"])
        if scores["weaker"]:
            assert final["warning"].startswith("The new model scores below echo (")
        else:
            assert final["warning"] is None
        assert scores["seconds"] > 0 and client.health()["busy"] is False

        # no model named: the one a prompt naming none uses now, a promptable model under --models (here the one
        # just made, or an earlier test's) before the bundled one
        expected = app.state.models.interactive_entry().model_id
        assert expected.startswith("finetune-")
        final = client.wait_job(client.start_finetune(steps=1, batch_size=1, val_fraction=0.0,
                                                      task="interactive")["job_id"], poll_s=0.2, timeout=600)
        assert final["state"] == "done", final
        runs.append(final["model_id"].split("/")[0])
        assert final["scores"]["compared_with"] == expected and set(final["scores"]["after"]) == classes
    finally:
        app.state.models._memory.pop("echo", None)
        for run in runs:  # the module's server keeps its usual models for the other tests
            shutil.rmtree(cfg.models_dir / run, ignore_errors=True)


def test_finetune_runs_two_steps_then_a_job_can_be_cancelled(client, server, hippo):
    cfg = server[1]
    if not client.cases():
        s = client.upload_file(hippo[0], modality="MR")
        label = np.asarray(nib.load(str(hippo[1])).dataobj).astype(np.uint8)
        client.save_case(s.session_id, label, ["background", "anterior", "posterior"], "MR", case_id="ft_case")
        client.close_session(s.session_id)
    job = client.start_finetune(steps=2, batch_size=1, val_fraction=0.0)
    assert job["state"] == "running" and job["total"] == 2
    assert job["scores"] is None and job["warning"] is None and job["not_scored"] is None
    seen = []
    final = client.wait_job(job["job_id"], poll_s=0.2, timeout=600, on_progress=seen.append)
    assert final["state"] == "done", final
    assert final["step"] == 2 and final["loss"] is not None and np.isfinite(final["loss"])
    new_id = final["model_id"]
    assert new_id and new_id.startswith("finetune-")
    # one job, one version: its run's best and last were listed (and shown in napari's Versions) as two models
    run = new_id.split("/")[0]
    assert [m["id"] for m in client.models()["models"] if m["id"].split("/")[0] == run] == [new_id]
    assert [p.name for p in (cfg.models_dir / run).glob("*.safetensors")] == [Path(new_id).name + ".safetensors"]
    # scored after training as napari's local Fine-tune section scores it: the Dice of the parent's and the new
    # model's segmentation per class, here on every saved case (none was held out)
    scores, cases = final["scores"], [c["case_id"] for c in client.cases()]
    assert final["message"] == "finished" and final["not_scored"] is None
    assert scores["metric"] == "dice" and scores["clicks"] is None
    assert scores["compared_with"] == "default" and scores["compared_with_version"] == \
        next(m["version"] for m in client.models()["models"] if m["id"] == "default")
    assert scores["scored_on"] == cases and scores["held_out"] is False
    assert scores["where"] == f"the {len(cases)} training case(s) (too few cases to hold some out)"
    assert set(scores["before"]) == set(scores["after"]) == {"anterior", "posterior"}
    assert set(scores["per_case"]["after"]) == set(cases)
    assert all(0.0 <= d <= 1.0 for side in ("before", "after") for d in scores[side].values())
    assert scores["mean_after"] == pytest.approx(sum(scores["after"].values()) / 2)
    assert scores["mean_before"] == pytest.approx(sum(scores["before"].values()) / 2)
    assert scores["weaker"] == (scores["mean_after"] < scores["mean_before"])
    if scores["weaker"]:
        assert final["warning"].startswith("The new model scores below default (") and "segmenting" in final["warning"]
    else:
        assert final["warning"] is None
    listing = client.select_model(new_id)
    assert listing["active"] == new_id and listing["history"] == ["default"]
    new = next(m for m in listing["models"] if m["id"] == new_id)
    assert new["class_names"] == ["background", "anterior", "posterior"] and new["parent"]
    assert client.rollback_model()["active"] == "default"

    job = client.start_finetune(steps=500, batch_size=1, val_fraction=0.0)
    s = client.create_session(np.random.default_rng(1).normal(size=(40, 40, 40)).astype(np.float32), np.eye(4))
    with pytest.raises(BusyError, match="the server's CPU is busy"):  # the model lock is held by the job
        client.segment(s.session_id)  # (a CPU server said its "GPU" was busy)
    with pytest.raises(BusyError):  # one model job at a time
        client.start_finetune(steps=2, batch_size=1, val_fraction=0.0)
    client.cancel_job(job["job_id"])
    final = client.wait_job(job["job_id"], poll_s=0.2, timeout=300)
    assert final["state"] == "cancelled" and final["step"] < 500
    assert client.segment(s.session_id).labels.shape == (40, 40, 40)  # the lock was released
    client.close_session(s.session_id)


def _a_saved_case(client, hippo):
    """The module server holds at least one saved case (the real labelled MRI)."""
    if not client.cases():
        s = client.upload_file(hippo[0], modality="MR")
        label = np.asarray(nib.load(str(hippo[1])).dataobj).astype(np.uint8)
        client.save_case(s.session_id, label, ["background", "anterior", "posterior"], "MR", case_id="ft_case")
        client.close_session(s.session_id)


def test_a_cancel_while_the_server_scores_keeps_the_model_made_and_says_it_was_not_scored(
        client, server, hippo, monkeypatch):
    """The model is saved before it is scored: a cancel that reaches the job while it scores stops the scoring only.
    The job is done (its model listed and usable), without scores, and says plainly that it was made but not
    scored. Training is replaced by a copy of the parent (seconds, not minutes); the scoring is the real one."""
    from server_support import instant_finetune, scoring_waits_for_cancel

    cfg = server[1]
    _a_saved_case(client, hippo)
    instant_finetune(monkeypatch)
    scoring = scoring_waits_for_cancel(monkeypatch)
    job = client.start_finetune(steps=1)
    run = None
    try:
        assert scoring.wait(120), client.job(job["job_id"])
        assert client.job(job["job_id"])["message"] == "scoring the new model"
        assert client.cancel_job(job["job_id"])["message"] == "cancelling"
        final = client.wait_job(job["job_id"], poll_s=0.1, timeout=120)
        run = final["model_id"].split("/")[0]
        assert final["state"] == "done" and final["error"] is None, final
        assert final["scores"] is None and final["warning"] is None
        assert final["not_scored"] == "its scoring was cancelled by the user"
        assert final["message"] == "finished; made but not scored: its scoring was cancelled by the user"
        assert final["model_id"] in {m["id"] for m in client.models()["models"]}
        assert client.health()["busy"] is False
        s = client.upload_file(hippo[0], modality="MR")  # the model made is there to use
        assert client.segment(s.session_id, model_id=final["model_id"]).model_id == final["model_id"]
        client.close_session(s.session_id)
    finally:
        if run is not None:
            shutil.rmtree(cfg.models_dir / run, ignore_errors=True)


def test_a_failed_scoring_is_told_in_a_sentence_and_logged_on_the_server(client, server, hippo, monkeypatch, caplog):
    """A scoring that fails keeps the model made; the client is told what failed (which job's model, on which cases)
    and never the exception's text (a server path here) nor a traceback: those go to the server's log."""
    import engine.scoring
    from server_support import instant_finetune

    cfg = server[1]
    _a_saved_case(client, hippo)
    instant_finetune(monkeypatch)
    secret = "/srv/private/models/cache.bin: Permission denied"

    def failing(*args, **kwargs):
        raise OSError(13, secret)

    monkeypatch.setattr(engine.scoring, "before_after", failing)
    caplog.set_level(logging.ERROR, logger="mambahome.server")
    job = client.start_finetune(steps=1)
    final = client.wait_job(job["job_id"], poll_s=0.1, timeout=120)
    run = final["model_id"].split("/")[0] if final.get("model_id") else None
    try:
        assert final["state"] == "done" and final["error"] is None and final["scores"] is None, final
        cases = [c["case_id"] for c in client.cases()]
        assert final["not_scored"] == (f"the scoring of fine-tune job {job['job_id']}'s new model {final['model_id']} "
                                       f"on {len(cases)} saved case(s) ({', '.join(cases[:5])}"
                                       + (f" and {len(cases) - 5} more" if len(cases) > 5 else "")
                                       + ") failed; the server's log has the details")
        assert final["message"] == f"finished; made but not scored: {final['not_scored']}"
        answer = json.dumps(final)
        assert "/srv/private" not in answer and "Permission" not in answer and "Errno" not in answer
        assert "Error" not in answer and "Traceback" not in answer
        assert final["model_id"] in {m["id"] for m in client.models()["models"]}
        (record,) = [r for r in caplog.records if r.name == "mambahome.server"]
        assert job["job_id"] in record.getMessage() and final["model_id"] in record.getMessage()
        assert record.exc_info and secret in str(record.exc_info[1])  # the details, on the server only
    finally:
        if run is not None:
            shutil.rmtree(cfg.models_dir / run, ignore_errors=True)


def test_a_scoring_stopped_by_a_deliberate_error_says_its_message_after_what_failed(client, server, hippo, monkeypatch):
    """A deliberate error of the scoring (one of the engine's ValueErrors, raised by the engine: a label file gone) is
    told after the sentence of what failed, its server paths named by case id."""
    import engine.scoring
    from engine.io import load_volume
    from server_support import instant_finetune

    cfg = server[1]
    _a_saved_case(client, hippo)
    instant_finetune(monkeypatch)
    case = client.cases()[0]["case_id"]

    def failing(*args, **kwargs):
        load_volume(cfg.cases_dir / case / "gone.nii.gz")  # VolumeError: "<its path>: file not found"

    monkeypatch.setattr(engine.scoring, "before_after", failing)
    final = client.wait_job(client.start_finetune(steps=1)["job_id"], poll_s=0.1, timeout=120)
    try:
        assert final["state"] == "done" and final["scores"] is None, final
        assert final["not_scored"].startswith(f"the scoring of fine-tune job {final['job_id']}'s new model "
                                              f"{final['model_id']} on ")
        assert final["not_scored"].endswith(f" failed: gone.nii.gz of case {case}: file not found")
        assert str(cfg.cases_dir) not in json.dumps(final)
    finally:
        shutil.rmtree(cfg.models_dir / final["model_id"].split("/")[0], ignore_errors=True)


def test_an_unexpected_training_failure_is_told_in_a_sentence_and_logged_on_the_server(
        client, server, hippo, monkeypatch, caplog):
    """Training that fails unexpectedly (a RuntimeError from torch, say) fails the job; the client is told which job
    failed where (the step it reached) and never the exception's text (a server path here) nor its type: those and
    the traceback go to the server's log."""
    from engine.server import state

    _a_saved_case(client, hippo)
    secret = "CUDA error: an illegal memory access at /srv/private/torch/kernels/cache.bin"

    def failing(checkpoint, data, out, **settings):
        settings["progress"](0, 10, "training")
        settings["on_log"]({"step": 3, "loss": 0.7})
        settings["progress"](3, 10, "step 3/10 loss 0.7000")
        raise RuntimeError(secret)

    monkeypatch.setattr(state, "run_finetune", failing)
    caplog.set_level(logging.ERROR, logger="mambahome.server")
    job = client.start_finetune(steps=10)
    final = client.wait_job(job["job_id"], poll_s=0.1, timeout=120)
    assert final["state"] == "failed" and final["message"] == "failed" and final["model_id"] is None, final
    assert final["error"] == (f"fine-tune job {job['job_id']} of model default failed during training at step 3 of 10; "
                              "the server's log has the details")
    answer = json.dumps(final)
    assert "/srv/private" not in answer and "CUDA" not in answer and "RuntimeError" not in answer
    assert client.health()["busy"] is False  # the GPU lock was released
    # this job's record: the module's server may log for an earlier test's job meanwhile (a slow machine)
    (record,) = [r for r in caplog.records if r.name == "mambahome.server" and job["job_id"] in r.getMessage()]
    assert record.getMessage() == final["error"].split(";")[0]
    assert record.exc_info and str(record.exc_info[1]) == secret  # the details, on the server only


def test_a_job_failing_on_a_deliberate_error_tells_its_message_with_cases_named_by_id(hippo, tmp_path, caplog):
    """A job stopped by one of the engine's deliberate errors (here real training data checks: a saved case whose
    label file is gone) tells the client that message, which says what to fix; the server's paths in it are named
    as the client knows them (the case id, the file in the case), and the log has the full message."""
    cfg = ServerConfig(models_dir=tmp_path / "models", cases_dir=tmp_path / "cases", device="cpu")
    caplog.set_level(logging.INFO, logger="mambahome.server")
    with running_server(cfg) as (url, _):
        c = Client(url, timeout=300)
        s = c.upload_file(hippo[0], modality="MR")
        label = np.asarray(nib.load(str(hippo[1])).dataobj).astype(np.uint8)
        c.save_case(s.session_id, label, ["background", "anterior", "posterior"], "MR", case_id="hippocampus_003")
        (label_file,) = (cfg.cases_dir / "hippocampus_003").glob("label*")
        label_file.unlink()
        final = c.wait_job(c.start_finetune(steps=1)["job_id"], poll_s=0.1, timeout=300)
    assert final["state"] == "failed", final
    assert final["error"] == f"case hippocampus_003: label file {label_file.name} of case hippocampus_003 not found"
    assert str(tmp_path) not in json.dumps(final) and "Error" not in final["error"]
    (record,) = [r for r in caplog.records if r.name == "mambahome.server"]
    assert record.levelno == logging.INFO and record.exc_info is None
    assert f"fine-tune job {final['job_id']} of model default failed before training started" in record.getMessage()
    assert str(label_file) in record.getMessage()  # the server's log keeps the path


def test_an_unanswered_exception_is_a_500_naming_the_request_and_logged_once(client, server, monkeypatch, caplog):
    """The catch-all answer: ``500 internal`` naming the request, never the exception's text; the traceback is in the
    server's log once (not a second time by uvicorn)."""
    app = server[2]
    secret = "/srv/private/models/registry.db"

    def failing():
        raise KeyError(secret)

    monkeypatch.setattr(app.state.models, "listing", failing)
    caplog.set_level(logging.ERROR)
    uvicorn_log = logging.getLogger("uvicorn.error")  # uvicorn's own loggers do not reach the root logger
    uvicorn_log.addHandler(caplog.handler)
    monkeypatch.setattr(uvicorn_log, "handlers", uvicorn_log.handlers)  # put back afterwards
    with pytest.raises(ClientServerError) as exc:
        client.models()
    assert exc.value.status == 500 and exc.value.code == "internal"
    req = urllib.request.Request(server[0] + "/models", headers={"Authorization": f"Bearer {TOKEN}"})
    with pytest.raises(urllib.error.HTTPError) as raw:
        urllib.request.urlopen(req, timeout=30)
    body = json.loads(raw.value.read())
    assert body == {"error": "internal",
                    "detail": "the server failed to answer GET /models; the server's log has the details"}
    assert str(exc.value) == f"GET /models: HTTP 500: {body['detail']}"
    records = [r for r in caplog.records if r.exc_info]
    assert len(records) == 2 and all(r.name == "mambahome.server" for r in records)  # one per request
    assert records[0].getMessage() == "the server failed to answer GET /models"
    assert isinstance(records[0].exc_info[1], KeyError) and secret in str(records[0].exc_info[1])
    monkeypatch.undo()
    assert client.models()["active"] == "default"  # the server lives on


def test_a_deliberate_error_of_a_request_names_the_model_by_id_not_by_path(client, server, hippo, tmp_path):
    """A checkpoint under --models whose weights were corrupted after saving: segmenting with it is a 400 with the
    engine's message, the file named as the model the client chose (its id), not by its path on the server."""
    from engine.server.state import bundled_model_path

    cfg = server[1]
    broken = cfg.models_dir / "broken" / "best.safetensors"
    broken.parent.mkdir(parents=True, exist_ok=True)
    data = bytearray(bundled_model_path("default").read_bytes())
    data[-1] ^= 0xFF  # a weight changed: the checksum no longer matches
    broken.write_bytes(bytes(data))
    try:
        assert "broken/best" in {m["id"] for m in client.models()["models"]}
        s = client.upload_file(hippo[0], modality="MR")
        client.segment(s.session_id, model_id="default")
        with pytest.raises(ClientServerError) as exc:
            client.segment(s.session_id, model_id="broken/best")
        assert client.segment(s.session_id, model_id="default").model_id == "default"  # a failed load is not kept
        client.close_session(s.session_id)
        assert exc.value.status == 400 and exc.value.code == "invalid_input"
        assert str(exc.value).endswith("HTTP 400: model broken/best: the weights do not match the checksum written "
                                       "with them; the file was modified or corrupted after saving")
        assert str(cfg.models_dir) not in str(exc.value)
    finally:
        shutil.rmtree(broken.parent, ignore_errors=True)


def test_running_out_of_memory_is_told_to_clients_as_something_they_can_change(tmp_path, caplog):
    """Out of memory is not a deliberate error, yet the client can act on it: it is told to ask for less (and,
    as for every unexpected failure, not the allocator's text naming the server's device); the log has it all."""
    import torch

    from engine.server.state import ServerPaths, client_text

    paths = ServerPaths(tmp_path / "models", None)
    oom = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    with caplog.at_level("ERROR", logger="mambahome.server"):
        text = client_text(oom("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.1 GiB total)"),
                           "fine-tune job 0a1b2c3d4e5f failed during training at step 3 of 10", paths)
    assert text.startswith("fine-tune job 0a1b2c3d4e5f failed during training at step 3 of 10: the server ran "
                           "out of GPU memory; try a smaller batch")
    assert "2.00 GiB" not in text and "GPU 0" not in text
    assert "Tried to allocate 2.00 GiB" in caplog.text
    assert "out of memory; try" in client_text(MemoryError(), "the server failed to answer POST /sessions", paths)
    assert "GPU" not in client_text(MemoryError(), "the server failed to answer POST /sessions", paths)


def test_a_valueerror_raised_inside_a_library_is_told_as_what_failed_and_logged_with_its_traceback(tmp_path, caplog):
    """A ValueError is user-facing only when the engine raised it. numpy's or torch's own ValueError was written for
    nobody: the client is told what failed, the server's log has the exception and its traceback. numpy raises from
    C code, so its error stops in the engine line that called it (here keep_largest_component): it is not the
    engine's all the same; torch raises in its own Python code."""
    import torch

    from engine.postprocess import keep_largest_component
    from engine.server.state import ServerPaths, client_text, is_user_facing

    paths = ServerPaths(tmp_path / "models", tmp_path / "cases")
    failed = "fine-tune job 0a1b2c3d4e5f of model default failed during training at step 3 of 10"
    errors = []
    try:
        keep_largest_component(np.zeros((3, 4), np.uint8), np.zeros(5))  # numpy, called by the engine
    except ValueError as exc:
        errors.append(exc)
    try:
        torch.nn.functional.interpolate(torch.zeros(1, 1, 4), size=(2, 2))  # torch's own Python code
    except ValueError as exc:
        errors.append(exc)
    assert "operands could not be broadcast together with shapes (3,4) (5,)" in str(errors[0])
    for exc in errors:
        caplog.clear()
        with caplog.at_level("INFO", logger="mambahome.server"):
            text = client_text(exc, failed, paths, say_what_failed=True)
        assert not is_user_facing(exc)
        assert text == f"{failed}; the server's log has the details"
        (record,) = [r for r in caplog.records if r.name == "mambahome.server"]
        assert record.levelname == "ERROR" and record.getMessage() == failed and record.exc_info[1] is exc
        assert str(exc) in caplog.text and "Traceback" in caplog.text


def test_the_engines_own_valueerrors_keep_their_message(tmp_path, caplog):
    """The engine's deliberate errors keep their message: one raised in the engine's code, one it re-raises
    ``from`` a library's error (nibabel's, for a broken file), and one constructed and handed on (never raised)."""
    from engine.io import VolumeError, load_volume
    from engine.server.state import ServerPaths, client_text, is_user_facing

    cases = tmp_path / "cases"
    (cases / "abc").mkdir(parents=True)
    broken = cases / "abc" / "image.nii.gz"
    broken.write_bytes(b"\x1f\x8b" + b"garbage" * 20)
    paths = ServerPaths(tmp_path / "models", cases)
    caught = []
    for path in (cases / "abc" / "labels.nii.gz", broken):
        try:
            load_volume(path)
        except VolumeError as exc:
            caught.append(exc)
    missing, from_library = caught
    assert from_library.__cause__ is not None  # raise VolumeError(...) from nibabel's error
    caplog.set_level("INFO", logger="mambahome.server")
    assert client_text(missing, "POST /sessions/x/segment", paths) == "labels.nii.gz of case abc: file not found"
    text = client_text(from_library, "POST /sessions/x/segment", paths)
    assert text.startswith("image.nii.gz of case abc: cannot read NIfTI file (") and str(cases) not in text
    assert client_text(ValueError("case abc: no labels"), "a job failed", paths, say_what_failed=True) == \
        "a job failed: case abc: no labels"
    assert all(is_user_facing(e) for e in (missing, from_library, ValueError("never raised")))
    assert all(r.levelname == "INFO" and r.exc_info is None for r in caplog.records if r.name == "mambahome.server")


def test_a_library_valueerror_of_a_request_is_a_500_and_bad_settings_or_affines_are_told_as_ours(
        client, server, monkeypatch, caplog):
    """Through the server: a ValueError numpy raises while answering is a 500 naming the request (not a 400 showing
    numpy's text), logged with its traceback; the requests that used to reach the client only as a library's text
    get the server's own 400 naming the setting or the upload."""
    from engine.postprocess import keep_largest_component

    app = server[2]
    monkeypatch.setattr(app.state.models, "listing",
                        lambda: keep_largest_component(np.zeros((3, 4), np.uint8), np.zeros(5)))
    caplog.set_level(logging.ERROR, logger="mambahome.server")
    with pytest.raises(ClientServerError) as exc:
        client.models()
    assert exc.value.status == 500 and exc.value.code == "internal"
    assert str(exc.value) == "GET /models: HTTP 500: the server failed to answer GET /models; the server's log has " \
                             "the details"
    (record,) = [r for r in caplog.records if r.name == "mambahome.server"]
    assert "operands could not be broadcast" in str(record.exc_info[1])
    monkeypatch.undo()

    with pytest.raises(ClientServerError) as exc:  # float("fast") said "could not convert string to float"
        client.start_finetune(steps=1, lr=None, batch_size="two")
    assert exc.value.status == 400 and str(exc.value).endswith(
        "HTTP 400: fine-tune setting 'batch_size' must be a whole number, got 'two'")
    # bool("false") is True: a string is refused rather than read as its opposite
    for setting, said in ((dict(freeze_encoder="false"), "'freeze_encoder' must be true or false, got 'false'"),
                          (dict(batch_size=2.5), "'batch_size' must be a whole number, got 2.5"),
                          (dict(max_minutes=True), "'max_minutes' must be a number, got True")):
        with pytest.raises(ClientServerError) as exc:
            client.start_finetune(steps=1, lr=None, **setting)
        assert exc.value.status == 400 and str(exc.value).endswith(f"HTTP 400: fine-tune setting {said}")
    for affine, said in (([[1, 0, 0, 0], [0, 1, 0]], "[[1, 0, 0, 0], [0, 1, 0]]"), ("eye", "'eye'")):
        req = urllib.request.Request(f"{server[0]}/sessions?format=pack&name=knee.nii",
                                     data=pack_array(np.zeros((4, 4, 4), np.float32), {"affine": affine}, level=0),
                                     method="POST", headers={"Authorization": f"Bearer {TOKEN}",
                                                             "Content-Type": "application/x-mambahome-pack"})
        with pytest.raises(urllib.error.HTTPError) as raw:
            urllib.request.urlopen(req, timeout=60)
        assert raw.value.code == 400
        assert json.loads(raw.value.read())["detail"] == (f"knee.nii: the pack's 'affine' must be a 4x4 matrix of "
                                                          f"numbers (RAS voxel-to-world), got {said}")


def test_a_broken_pack_is_told_naming_what_it_was(client, server, hippo):
    """The wire module's pack errors (mambahome_client, outside the engine) reach clients wrapped in the server's
    own 400 naming what the pack was: the uploaded volume, or the labels / initial mask for a session's volume."""
    url = server[0]
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/x-mambahome-pack"}
    req = urllib.request.Request(f"{url}/sessions?format=pack&name=knee.nii", data=b"not a pack",
                                 method="POST", headers=headers)
    with pytest.raises(urllib.error.HTTPError) as raw:
        urllib.request.urlopen(req, timeout=60)
    assert raw.value.code == 400
    assert json.loads(raw.value.read())["detail"] == "knee.nii: not a MambaHoME array pack (missing 'MHPK' magic)"
    s = client.upload_file(hippo[0], modality="MR")
    try:
        for path, what in ((f"/sessions/{s.session_id}/cases", "the labels for hippocampus_001.nii.gz"),
                           (f"/sessions/{s.session_id}/initial-mask", "the initial mask for hippocampus_001.nii.gz")):
            req = urllib.request.Request(url + path, data=b"not a pack", method="POST", headers=headers)
            with pytest.raises(urllib.error.HTTPError) as raw:
                urllib.request.urlopen(req, timeout=60)
            assert raw.value.code == 400
            assert json.loads(raw.value.read())["detail"] == \
                f"{what}: not a MambaHoME array pack (missing 'MHPK' magic)"
    finally:
        client.close_session(s.session_id)


def test_server_paths_in_messages_are_named_as_clients_know_them(tmp_path):
    """What ServerPaths makes of the paths the engine's messages name."""
    from engine.server.state import ServerPaths, bundled_model_path

    models, cases = tmp_path / "models", tmp_path / "cases"
    paths = ServerPaths(models, cases)
    assert paths.name(f"{models}/run1/best.safetensors: bad.") == "model run1/best: bad."
    assert paths.name(f"{models}/finetune-1: loss became nan at step 3") == "finetune-1: loss became nan at step 3"
    assert paths.name(f"{models}: not a folder") == "the server's models folder: not a folder"
    assert paths.name(f"{cases}: case store folder is read-only") == \
        "the server's case store: case store folder is read-only"
    assert paths.name(f"{cases}/abc/case.json: unreadable case description (KeyError: 'x')") == \
        "case.json of case abc: unreadable case description (KeyError: 'x')"
    assert paths.name(f"{cases}/abc: case abc: no labels") == "case abc: no labels"  # said once
    assert paths.name(f"{bundled_model_path('default').resolve()} is broken") == "model default is broken"
    # any other absolute path: its file name only
    assert paths.name(f"[Errno 13] Permission denied: '{tmp_path}/other/x.bin'") == \
        "[Errno 13] Permission denied: 'x.bin'"
    assert paths.name(f"{cases}2/abc is elsewhere") == "abc is elsewhere"
    assert paths.name(r"C:\Users\bob\ct.nii.gz: bad") == "ct.nii.gz: bad"
    # what is not a server path stays
    text = "GET /models lists them; POST /finetune/{job}; see http://host/a/b; 1/2/3; no cases here"
    assert paths.name(text) == text
    assert ServerPaths(Path("models"), None).name("no models found") == "no models found"


def test_a_model_id_that_looks_like_a_relative_server_folder_is_echoed_as_sent(tmp_path, monkeypatch):
    """`mambahome serve --models hippo --cases cases` (relative folders): ServerPaths matched the relative folder in
    a client's own model id, so 'hippo/v2' came back as 'v2' and 'cases/abc' as 'case abc'. The folders are made
    absolute; only those absolute server paths are named."""
    from engine.server.state import ServerPaths

    monkeypatch.chdir(tmp_path)
    paths = ServerPaths(Path("hippo"), Path("cases"))
    assert paths.name("no model 'hippo/v2' on this server") == "no model 'hippo/v2' on this server"
    assert paths.name(f"{tmp_path}/hippo/r/best.safetensors is bad") == "model r/best is bad"
    cfg = ServerConfig(models_dir=Path("hippo"), cases_dir=Path("cases"), device="cpu")
    with running_server(cfg) as (url, _):
        assert cfg.models_dir == tmp_path / "hippo" and cfg.cases_dir == tmp_path / "cases"
        c = Client(url)
        for model_id in ("hippo/v2", "cases/abc"):
            with pytest.raises(NotFoundError, match=f"no model '{model_id}' on this server"):
                c.select_model(model_id)


def test_serve_max_voxels_is_an_option_and_a_larger_volume_gets_422_naming_it(tmp_path):
    """ServerConfig.max_voxels had no command-line option; a volume over it was a 400 like a broken file, and a pack
    over it said "larger than the limit 0 MiB"."""
    from engine.cli import build_parser
    from engine.server.cli import config_from_args
    from server_support import cpu_server

    parse = build_parser().parse_args
    assert config_from_args(parse(["serve"])).max_voxels == ServerConfig().max_voxels
    assert config_from_args(parse(["serve"])).max_upload_bytes == ServerConfig().max_upload_bytes
    cfg = config_from_args(parse(["serve", "--max-voxels", "1000"]))
    assert cfg.max_voxels == 1000
    big = tmp_path / "big.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((12, 12, 12), np.int16), np.eye(4)), str(big))
    with cpu_server(tmp_path, TOKEN, max_voxels=cfg.max_voxels) as (url, _):
        c = Client(url, token=TOKEN)
        assert c.create_session(np.zeros((10, 10, 10), np.float32), np.eye(4)).shape == (10, 10, 10)
        limit = (r"\d+ voxels \(\d+, \d+, \d+\) is more than this server accepts \(1000 voxels, its "
                 r"`mambahome serve --max-voxels`\)")
        # refused by the pack's header (over 8 bytes a voxel), by its voxels, by a file's header
        for send, name in ((lambda: c.create_session(np.zeros((20, 20, 20), np.float32), np.eye(4)),
                            "the uploaded pack"),
                           (lambda: c.create_session(np.zeros((11, 10, 10), np.int16), np.eye(4)), "volume"),
                           (lambda: c.upload_file(big), "big.nii.gz")):
            with pytest.raises(ClientServerError, match=rf"HTTP 422: .*{name}: {limit}") as exc:
                send()
            assert exc.value.status == 422 and exc.value.code == "too_many_voxels"
        assert c.health()["sessions"] == 1


def test_an_automatic_fine_tune_with_cases_held_out_is_scored_on_them(hippo, shared_data, tmp_path):
    """With cases held out of training (``val_fraction``, as napari asks for 6 or more cases) the new automatic model
    and its parent are scored on the held-out cases only, and ``where`` says so in the local section's words."""
    images = sorted((shared_data / "hippocampus" / "imagesTr").glob("*.nii.gz"))[:6]
    cfg = ServerConfig(models_dir=tmp_path / "models", cases_dir=tmp_path / "cases", device="cpu")
    with running_server(cfg) as (url, _):
        c = Client(url, timeout=300)
        for path in images:
            s = c.upload_file(path, modality="MR")
            label = np.asarray(nib.load(str(shared_data / "hippocampus" / "labelsTr" / path.name)).dataobj)
            c.save_case(s.session_id, label.astype(np.uint8), ["background", "anterior", "posterior"], "MR",
                        case_id=path.name.split(".")[0])
            c.close_session(s.session_id)
        final = c.wait_job(c.start_finetune(steps=1, batch_size=1, val_fraction=0.2)["job_id"], poll_s=0.2,
                           timeout=600)
        assert final["state"] == "done" and final["not_scored"] is None, final
        scores = final["scores"]
        split = json.loads((cfg.models_dir / final["model_id"].split("/")[0] / "split.json").read_text())
        assert scores["held_out"] is True and split["val"] and sorted(scores["scored_on"]) == sorted(split["val"])
        assert not set(scores["scored_on"]) & set(split["train"])
        assert scores["where"] == f"{len(split['val'])} held-out case(s) not used for training"
        assert set(scores["per_case"]["before"]) == set(scores["per_case"]["after"]) == set(split["val"])


def test_oversized_upload_is_refused_with_413(hippo, tmp_path):
    cfg = ServerConfig(device="cpu", max_upload_bytes=1000)
    with running_server(cfg) as (url, _):
        c = Client(url)
        with pytest.raises(PayloadTooLargeError, match="over this server's limit of 1000 bytes"):
            c.upload_file(hippo[0])
        with pytest.raises(PayloadTooLargeError):
            c.create_session(np.random.default_rng(0).normal(size=(30, 30, 30)).astype(np.float32), np.eye(4))
        assert c.health()["sessions"] == 0


def test_a_send_broken_by_the_413_is_told_apart_from_a_dead_server():
    # a server refusing a body by its size may close before the client has sent it all: the client then sees
    # a reset instead of the 413 and asks the server's stated limit (/version) to name the cause
    with running_server(ServerConfig(device="cpu", max_upload_bytes=1000)) as (url, _):
        c = Client(url)
        with pytest.raises(PayloadTooLargeError, match="5000 bytes is over this server's limit of 1000 bytes"):
            c._raise_if_over_limit("POST", "/sessions", 5000)
        c._raise_if_over_limit("POST", "/sessions", 999)  # under the limit: not this cause, nothing raised


def test_server_survives_a_client_disconnecting_mid_upload(server, hippo):
    url = server[0]
    host, port = url.rsplit("/", 1)[-1].split(":")
    for _ in range(3):
        sock = socket.create_connection((host, int(port)), timeout=10)
        sock.sendall(f"POST /sessions?format=nifti HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {TOKEN}\r\n"
                     f"Content-Type: application/octet-stream\r\nContent-Length: 5000000\r\n\r\n".encode())
        sock.sendall(hippo[0].read_bytes()[:4000])
        sock.close()
    time.sleep(0.2)
    c = Client(url, token=TOKEN)
    assert c.health()["status"] == "ok"
    s = c.upload_file(hippo[0])
    assert s.shape == nib.load(str(hippo[0])).shape
    c.close_session(s.session_id)


def test_interactive_prompts_change_the_mask_at_the_prompt_and_undo(hippo):
    pytest.importorskip("engine.interactive")
    from server_support import echo_interactive_model

    with running_server(ServerConfig(device="cpu")) as (url, app):
        client = Client(url, timeout=300)
        client.connect()
        s = client.upload_file(hippo[0], modality="MR")
        # a fresh server prompts with the bundled interactive model (the real network)
        assert {"id": "interactive", "task": "interactive", "source": "bundled"}.items() <= next(
            m for m in client.models()["models"] if m["id"] == "interactive").items()
        u = client.add_point(s.session_id, [s.shape[0] // 2, s.shape[1] // 2, s.shape[2] // 2])
        assert u.mask.shape == tuple(b.stop - b.start for b in u.bbox) and u.mask.any()
        client.reset(s.session_id)
        # a promptable model of the user's is preferred to the bundled one (here: prompts echoed as the mask)
        app.state.models.add_in_memory("echo", *echo_interactive_model())
        assert {"id": "echo", "task": "interactive"}.items() <= next(
            m for m in client.models()["models"] if m["id"] == "echo").items()

        mask = np.zeros(s.shape, dtype=bool)
        voxel = [s.shape[0] // 2, s.shape[1] // 2, s.shape[2] // 2]
        u = client.add_point(s.session_id, voxel, positive=True)
        for ax in range(3):
            assert u.bbox[ax].start <= voxel[ax] < u.bbox[ax].stop
        assert u.mask.shape == tuple(b.stop - b.start for b in u.bbox)
        u.apply(mask)
        assert mask[tuple(voxel)]
        u = client.undo(s.session_id)
        u.apply(mask)
        assert not mask.any()
        u = client.add_box(s.session_id, [5, 5, 5], [20, 30, 20])
        u.apply(mask)
        assert mask[10, 20, 10] and not mask[25, 40, 30]
        u = client.add_scribble(s.session_id, np.array([[2, 2, 2], [2, 3, 2]]), positive=False)
        u.apply(mask)
        u = client.reset(s.session_id)
        u.apply(mask)
        assert not mask.any()
        with pytest.raises(ClientServerError) as exc:
            client.add_point(s.session_id, [999, 0, 0])
        assert exc.value.status == 400 and "outside the volume" in str(exc.value)
        interactive = weakref.ref(app.state.sessions.get(s.session_id).interactive)
        client.close_session(s.session_id)
        assert app.state.releaser.wait_idle(30)
        assert interactive() is None  # the prompt state (normalised image, masks, history) went with the session


def test_interactive_session_on_the_server_uses_the_uploaded_volume_spacing(tmp_path):
    """A 3 mm upload reaches a 1 mm promptable model resampled: the server builds the session from the
    uploaded Volume (its affine), and the click's mask is a 3 mm ball on the file's voxels."""
    pytest.importorskip("engine.interactive")
    import nibabel as nib

    from engine.preprocess import Preprocessing
    from server_support import echo_interactive_model

    path = tmp_path / "thick.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((20, 40, 40), np.float32), np.diag([3.0, 1.0, 1.0, 1.0])), str(path))
    model, meta = echo_interactive_model()
    meta = {**meta, "preprocessing": Preprocessing.for_modality("MR", target_spacing=(1.0, 1.0, 1.0)).to_dict()}
    with running_server(ServerConfig(device="cpu")) as (url, app):
        app.state.models.add_in_memory("echo", model, meta)
        client = Client(url, timeout=300)
        client.connect()
        s = client.upload_file(path, modality="MR")
        mask = np.zeros(s.shape, dtype=bool)
        client.add_point(s.session_id, [10, 20, 20]).apply(mask)
        assert app.state.sessions.get(s.session_id).interactive.scale == pytest.approx((1 / 3, 1.0, 1.0))
        # the default radius-4 ball: 4 mm is one 3 mm slice either side (9 slices before spacing was
        # matched), 4 voxels of 1 mm on the other axes (the 11-slice region sits half a voxel off the ball)
        assert mask[10, 20, 20]
        idx = np.argwhere(mask)
        assert idx[:, 0].min() == 9 and idx[:, 0].max() == 11
        assert np.all(np.abs(idx[:, 1:].min(0) - 16) <= 1) and np.all(np.abs(idx[:, 1:].max(0) - 24) <= 1)


def test_prompts_are_answered_by_the_promptable_model_the_client_names(hippo):
    """Two promptable models: each prompt is answered by the one named (the session records it, the
    masks differ), a switch starts a new object, no name keeps the server's rule, and unknown or
    segmentation models are refused naming them."""
    pytest.importorskip("engine.interactive")
    from server_support import echo_interactive_model

    with running_server(ServerConfig(device="cpu")) as (url, app):
        app.state.models.add_in_memory("echo", *echo_interactive_model())
        app.state.models.add_in_memory("fill", *echo_interactive_model(fill=True))
        client = Client(url, timeout=300)
        client.connect()
        s = client.upload_file(hippo[0], modality="MR")
        held = app.state.sessions.get(s.session_id)
        voxel = [n // 2 for n in s.shape]

        echo = client.add_point(s.session_id, voxel, model_id="echo")
        assert echo.model_id == "echo" and held.interactive_model == "echo"
        echo_mask = echo.apply(np.zeros(s.shape, bool))
        fill = client.add_point(s.session_id, voxel, model_id="fill")
        assert fill.model_id == "fill" and held.interactive_model == "fill"
        fill_mask = fill.apply(np.zeros(s.shape, bool))
        assert echo_mask[tuple(voxel)] and fill_mask[tuple(voxel)]
        assert fill_mask.sum() > 10 * echo_mask.sum() and (echo_mask & ~fill_mask).sum() == 0
        # the switch started a new object: fill's history holds its one prompt, none of echo's
        assert not client.undo(s.session_id, model_id="fill").apply(fill_mask).any()
        with pytest.raises(ClientServerError) as exc:
            client.undo(s.session_id, model_id="fill")
        assert exc.value.status == 400 and "nothing to undo" in str(exc.value)

        # the initial mask names its model too
        start = np.zeros(s.shape, np.uint8)
        start[3:9, 10:20, 5:15] = 1
        u = client.set_initial_mask(s.session_id, start, model_id="echo")
        assert u.model_id == "echo" and held.interactive_model == "echo"
        assert np.array_equal(u.apply(np.zeros(s.shape, bool)), start.astype(bool))

        # no model named: today's rule (the active model is a segmentation one: the user's promptable model)
        assert client.add_point(s.session_id, voxel).model_id == app.state.models.interactive_entry().model_id

        with pytest.raises(NotFoundError) as exc:
            client.add_point(s.session_id, voxel, model_id="no-such-model")
        assert exc.value.status == 404 and exc.value.code == "unknown_model" and "'no-such-model'" in str(exc.value)
        for call in (lambda: client.add_point(s.session_id, voxel, model_id="default"),
                     lambda: client.set_initial_mask(s.session_id, start, model_id="default")):
            with pytest.raises(ClientServerError) as exc:
                call()
            assert exc.value.status == 400 and exc.value.code == "not_promptable"
            assert "'default'" in str(exc.value) and "segmentation model" in str(exc.value)
        with pytest.raises(ClientServerError) as exc:
            client.add_point(s.session_id, voxel, model_id="../escape")
        assert exc.value.status == 400 and exc.value.code == "invalid_id"
        assert held.interactive_model == app.state.models.interactive_entry().model_id  # refusals changed nothing


def test_without_a_promptable_model_prompts_get_a_clear_409(hippo, monkeypatch):
    pytest.importorskip("engine.interactive")
    from engine.server import state

    monkeypatch.setitem(state.BUNDLED_MODELS, "interactive", "not-installed.safetensors")
    with running_server(ServerConfig(device="cpu")) as (url, app):
        client = Client(url, timeout=300)
        client.connect()
        s = client.upload_file(hippo[0], modality="MR")
        with pytest.raises(ClientServerError) as exc:
            client.add_point(s.session_id, [5, 5, 5])
        assert exc.value.status == 409 and "no interactive model" in str(exc.value)


# ----------------------------------------------------------------------------- upload path and memory
def raw_request(url: str, head: str, body: bytes = b"", read: bool = True) -> str:
    """Send a hand-made HTTP request (``head`` without the final blank line) and return the answer's text."""
    host, port = url.rsplit("/", 1)[-1].split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head.encode() + b"\r\n\r\n" + body)
        if not read:
            return ""
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    return answer.decode("utf-8", "replace")


def test_an_oversized_upload_is_refused_from_its_content_length_before_it_is_read(tmp_path):
    with running_server(ServerConfig(device="cpu", max_upload_bytes=1000)) as (url, app):
        # 1 GB announced, 10 bytes sent: the answer comes at once, nothing waits for the rest.
        answer = raw_request(url, "POST /sessions?format=pack HTTP/1.1\r\nHost: x\r\n"
                                  "Content-Type: application/x-mambahome-pack\r\nContent-Length: 1000000000",
                             b"MHPK123456")
        assert answer.startswith("HTTP/1.1 413") and "over this server's limit of 1000 bytes" in answer
        assert len(app.state.sessions) == 0


def test_a_pack_whose_header_disagrees_with_its_body_is_refused_clearly(client, server):
    arr = np.zeros((16, 16, 16), np.int16)
    body = pack_array(arr, {"affine": np.eye(4).tolist()}, level=0)
    answer = raw_request(server[0], f"POST /sessions?format=pack HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}"
                                    f"\r\nContent-Length: {len(body) + 100}", body + b"\0" * 100)
    assert answer.startswith("HTTP/1.1 400") and f"the body is {len(body) + 100} bytes" in answer
    big = pack_array(arr, {"affine": np.eye(4).tolist()}, level=0).replace(b"[16, 16, 16]", b"[16, 16, 17]")
    answer = raw_request(server[0], f"POST /sessions?format=pack HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}"
                                    f"\r\nContent-Length: {len(big)}", big)
    assert answer.startswith("HTTP/1.1 400") and "raw pack of shape (16, 16, 17)" in answer


def test_server_survives_a_client_disconnecting_mid_pack_upload(server, client):
    held = client.health()["sessions"]
    body = pack_array(np.ones((64, 64, 64), np.float32), {"affine": np.eye(4).tolist()}, level=0)
    for _ in range(3):
        raw_request(server[0], f"POST /sessions?format=pack HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                               f"Content-Length: {len(body)}", body[:len(body) // 3], read=False)
    time.sleep(0.2)
    assert client.health()["sessions"] == held
    s = client.create_session(np.ones((64, 64, 64), np.float32), np.eye(4))
    assert s.shape == (64, 64, 64)
    client.close_session(s.session_id)


def test_an_integer_upload_stays_integer_and_segments_as_its_float_copy(client, server, hippo):
    app = server[2]
    data = np.asarray(nib.load(str(hippo[0])).dataobj).astype(np.int16)
    affine = nib.load(str(hippo[0])).affine
    as_int = client.create_session(data, affine, modality="MR")
    as_float = client.create_session(data.astype(np.float32), affine, modality="MR")
    held = app.state.sessions.get(as_int.session_id)
    assert held.source.data.dtype == np.int16  # what an idle session holds: half of float32
    vol = held.volume
    assert vol.data.dtype == np.float32 and np.array_equal(vol.data, data.astype(np.float32))
    np.testing.assert_array_equal(client.segment(as_int.session_id).labels, client.segment(as_float.session_id).labels)
    client.close_session(as_int.session_id)
    client.close_session(as_float.session_id)


def test_closed_sessions_release_their_arrays_and_leave_no_entry(client, server):
    app = server[2]
    before = set(app.state.sessions.ids())
    passes = app.state.releaser.passes
    refs, held = [], []
    for n in range(4):
        s = client.create_session(np.full((24, 24, 24), n, np.int16), np.eye(4), name=f"v{n}")
        session = app.state.sessions.get(s.session_id)
        held.append(session)  # a request still holding the session object must not keep its arrays
        refs += [weakref.ref(session.source), weakref.ref(session.source.data)]
        if n == 0:
            client.segment(s.session_id)
        client.close_session(s.session_id)
    assert set(app.state.sessions.ids()) == before
    assert all(r() is None for r in refs)
    assert all(h.labels is None and h.interactive is None for h in held)
    with pytest.raises(ServerError, match="was closed"):
        held[0].volume
    assert app.state.releaser.wait_idle(30) and app.state.releaser.passes > passes


def test_expired_sessions_release_their_arrays_too():
    now, dropped = [0.0], []
    store = SessionStore(max_sessions=2, idle_timeout_s=60, clock=lambda: now[0], on_drop=dropped.extend)
    s = store.create(Volume.from_array(np.zeros((8, 8, 8), np.int16), np.eye(4)), "a", None)
    ref = weakref.ref(s.source)
    now[0] = 100.0
    assert store.purge_expired() == 1 and store.ids() == []
    assert ref() is None and dropped and all(r() is None for r in dropped)


def test_model_jobs_run_on_one_thread_and_a_held_lock_answers_busy():
    gpu = GpuLock(wait_s=0.05)
    assert gpu.run("a", threading.get_ident) == gpu.run("b", threading.get_ident) != threading.get_ident()
    with gpu.hold("a long job"):
        with pytest.raises(ServerError, match="busy \\(a long job\\)") as exc:
            gpu.run("another", lambda: None)
    assert exc.value.status == 503


@pytest.mark.parametrize("device, processor", [("cpu", "CPU"), ("cuda", "GPU"), ("cuda:1", "GPU")])
def test_a_busy_answer_names_the_processor_the_models_run_on(device, processor):
    gpu = GpuLock(wait_s=0.01, device=device)
    with gpu.hold("segmenting session s1"):
        with pytest.raises(ServerError, match=f"the server's {processor} is busy \\(segmenting session s1\\)"):
            gpu.run("another", lambda: None)


def test_sessions_share_one_copy_of_the_interactive_model(tmp_path):
    pytest.importorskip("engine.interactive")
    bundled = REPO / "napari_mambahome" / "models" / "interactive.safetensors"
    if not bundled.is_file():
        pytest.skip("no bundled interactive model")
    (tmp_path / "models").mkdir()
    shutil.copy2(bundled, tmp_path / "models" / "prompt.safetensors")
    registry = ModelRegistry(tmp_path / "models", "cpu")
    entry = registry.interactive_entry()
    first = registry.interactive_model(entry)
    assert registry.interactive_model(registry.interactive_entry()) is first
    assert first[1]["path"] == "prompt"  # what the session's messages name it by: the id, not a server path


def test_server_survives_a_client_leaving_while_its_segmentation_runs(client, server, hippo):
    s = client.upload_file(hippo[0], modality="MR")
    body = b'{"model_id": null}'
    raw_request(server[0], f"POST /sessions/{s.session_id}/segment HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                           f"{TOKEN}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}", body,
                read=False)
    assert client.health()["status"] == "ok"
    # The abandoned job finishes and frees the GPU lock: a later segmentation gets through.
    deadline = time.monotonic() + 120
    while True:
        try:
            assert client.segment(s.session_id).labels.shape == s.shape
            break
        except BusyError:
            assert time.monotonic() < deadline, "the abandoned segmentation never released the GPU lock"
            time.sleep(0.2)
    client.close_session(s.session_id)


def test_serve_refuses_a_device_it_cannot_use_before_listening(capsys):
    """A wrong --device started a server whose every segmentation and prompt was an HTTP 500."""
    import torch

    from engine.cli import main

    assert main(["serve", "--port", "1", "--device", "gpu0"]) == 2
    assert "unknown device 'gpu0'" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["serve", "--port", "1", "--device", "cuda"]) == 2
        assert "no CUDA GPU" in capsys.readouterr().err


def test_serve_says_at_start_what_it_lists_and_what_it_skips(tmp_path):
    """A mistyped --models, or a file there that is no checkpoint, only showed as a model missing from
    the clients' lists; a --cases that is a file was ignored."""
    from engine.cli import main
    from engine.server.cli import check_folders, startup_notes

    models = tmp_path / "models"
    (models / "run1").mkdir(parents=True)
    shutil.copy(REPO / "napari_mambahome" / "models" / "default.safetensors", models / "run1" / "best.safetensors")
    (models / "broken.safetensors").write_bytes(b"not a model at all")
    cfg = ServerConfig(models_dir=models, cases_dir=tmp_path / "cases", device="cpu").validate()
    notes = startup_notes(cfg, ModelRegistry(cfg.models_dir, "cpu"))
    assert notes[0] == "models: default, interactive, run1/best"
    assert any(n.startswith("note: not listed: ") and str(models / "broken.safetensors") in n
               and "does not start with a safetensors header" in n for n in notes), notes
    assert any(f"--cases {tmp_path / 'cases'} does not exist" in n for n in notes)
    assert not any("fine-tuning is off" in n for n in notes)

    cfg = ServerConfig(models_dir=tmp_path / "typo", device="cpu").validate()
    notes = startup_notes(cfg, ModelRegistry(cfg.models_dir, "cpu"))
    assert any(f"--models {tmp_path / 'typo'} does not exist" in n for n in notes)
    assert notes[-1] == "note: fine-tuning is off: it needs both --models and --cases"

    (tmp_path / "afile").write_text("x")
    with pytest.raises(ServerConfigError, match="--cases .*afile: is a file; give a folder"):
        check_folders(ServerConfig(cases_dir=tmp_path / "afile").validate())


# ----------------------------------------------------------------------------- what a client may send
def _raw(url: str, path: str, body: bytes = b"", method: str = "POST", content_type: str = "application/json",
         token: str = TOKEN):
    """``(status, JSON answer)`` of one request sent as bytes, for bodies the client library would never send."""
    headers = {"Content-Type": content_type}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url + path, data=body if method != "GET" else None, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=120) as answer:
            return answer.status, json.loads(answer.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def test_case_fields_of_the_wrong_type_are_refused_and_replace_nothing(client, server, hippo):
    """``bool("false")`` is True: a string ``overwrite`` used to replace an existing case unasked."""
    url, cfg, _ = server
    label = np.asarray(nib.load(str(hippo[1])).dataobj).astype(np.uint8)
    names = ["background", "anterior", "posterior"]
    s = client.upload_file(hippo[0], modality="MR")
    client.save_case(s.session_id, label, names, "MR", case_id="typed_case", overwrite=True)
    saved = (cfg.cases_dir / "typed_case" / "case.json").read_bytes()
    other = np.zeros_like(label)
    other[10:20, 10:20, 10:20] = 1
    for meta, word in (({"overwrite": "false"}, "'overwrite' must be true or false"),
                       ({"overwrite": 1}, "'overwrite' must be true or false"),
                       ({"modality": {"a": 1}}, "'modality' must be a name"),
                       ({"modality": "x" * 200}, "'modality' must be a name")):
        body = pack_array(other, {"class_names": names, "case_id": "typed_case", "modality": "MR", **meta})
        status, answer = _raw(url, f"/sessions/{s.session_id}/cases", body, content_type="application/x-mambahome-pack")
        assert status == 400 and word in answer["detail"], (meta, answer)
    assert (cfg.cases_dir / "typed_case" / "case.json").read_bytes() == saved
    with pytest.raises(ClientServerError) as exc:  # a real boolean false: the case exists, a 409 naming it
        client.save_case(s.session_id, other, names, "MR", case_id="typed_case")
    assert exc.value.status == 409 and exc.value.code == "case_exists" and "'typed_case' already exists" in str(exc.value)
    with pytest.raises(ClientServerError) as exc:  # one name for two label values
        client.save_case(s.session_id, label, ["background", "anterior", "anterior"], "MR", case_id="twice")
    assert exc.value.status == 400 and "repeat ['anterior']" in str(exc.value)
    client.close_session(s.session_id)


def test_a_case_of_another_label_set_is_refused_when_saved_not_at_the_next_fine_tune(hippo, tmp_path):
    """One store is one training set: a case whose classes clash with the saved ones used to be accepted, and then
    every fine-tune of every user failed on it (and no endpoint deletes a case). A case may lack classes at the end
    only (saved under a model that later gained classes)."""
    cfg = ServerConfig(models_dir=tmp_path / "models", cases_dir=tmp_path / "cases", device="cpu")
    label = np.asarray(nib.load(str(hippo[1])).dataobj).astype(np.uint8)
    with running_server(cfg) as (url, _):
        c = Client(url, timeout=300)
        s = c.upload_file(hippo[0], modality="MR")
        c.save_case(s.session_id, label, ["background", "anterior", "posterior"], "MR", case_id="a")
        c.save_case(s.session_id, (label == 1).astype(np.uint8), ["background", "anterior"], "MR", case_id="b")
        with pytest.raises(ClientServerError) as exc:
            c.save_case(s.session_id, (label > 0).astype(np.uint8), ["background", "hippocampus"], "MR", case_id="c")
        assert exc.value.status == 409 and exc.value.code == "label_set_conflict"
        # said for a client of the server: its one store, not "save this case into another case folder"
        assert ("the classes ['hippocampus'] differ from those of the server's saved cases (case 'a': "
                "['anterior', 'posterior'])" in str(exc.value))
        assert "name the classes as its cases do" in str(exc.value) and "another case folder" not in str(exc.value)
        assert str(tmp_path) not in str(exc.value)
        # overwriting the only case of the old set with the new one is allowed: the store stays one set
        c.save_case(s.session_id, label, ["background", "anterior", "posterior", "tail"], "MR", case_id="a",
                    overwrite=True)
        assert sorted(r["case_id"] for r in c.cases()) == ["a", "b"]


def test_fine_tune_settings_out_of_range_are_refused_before_a_job_starts(client, server, hippo):
    """A batch of 100,000 patches took the whole server down (out-of-memory kill, every session lost); zero minutes
    or validating every 0 steps crashed the job on a division by zero."""
    url = server[0]
    s = client.upload_file(hippo[0], modality="MR")
    label = np.asarray(nib.load(str(hippo[1])).dataobj).astype(np.uint8)
    client.save_case(s.session_id, label, ["background", "anterior", "posterior"], "MR", case_id="for_ranges",
                     overwrite=True)
    for settings, word in (({"batch_size": 100000}, "'batch_size' must be between 1 and 16"),
                           ({"max_minutes": 0}, "'max_minutes' must be more than 0"),
                           ({"max_minutes": -1}, "'max_minutes' must be more than 0"),
                           ({"val_every": 0}, "'val_every' must be between 1"),
                           ({"lr": 1e30}, "'lr' must be more than 0 and at most 1"),
                           ({"val_fraction": 0.95}, "'val_fraction' must be between 0 and 0.9")):
        status, answer = _raw(url, "/finetune", json.dumps({"steps": 2, "settings": settings}).encode())
        assert status == 400 and word in answer["detail"], (settings, answer)
    status, answer = _raw(url, "/finetune", json.dumps({"steps": "5"}).encode())  # no quiet string-to-number
    assert status == 422 and "steps" in answer["detail"]
    assert server[2].state.gpu.holder is None  # no job was started
    client.close_session(s.session_id)


def test_a_failed_fine_tune_leaves_no_model_to_select(hippo, tmp_path, monkeypatch):
    """A job that failed after its run wrote checkpoints (here: the step after training fails) used to leave them
    listed as models (a NaN run's segment nothing), with its resume state piling up on disk."""
    import engine.server.state as state

    real = state.run_finetune

    def then_fails(*args, **kwargs):
        real(*args, **kwargs)
        raise OSError("No space left on device")

    monkeypatch.setattr(state, "run_finetune", then_fails)
    cfg = ServerConfig(models_dir=tmp_path / "models", cases_dir=tmp_path / "cases", device="cpu")
    label = np.asarray(nib.load(str(hippo[1])).dataobj).astype(np.uint8)
    with running_server(cfg) as (url, _):
        c = Client(url, timeout=300)
        s = c.upload_file(hippo[0], modality="MR")
        c.save_case(s.session_id, label, ["background", "anterior", "posterior"], "MR", case_id="h1")
        final = c.wait_job(c.start_finetune(steps=2)["job_id"], poll_s=0.1, timeout=300)
        assert final["state"] == "failed" and final["model_id"] is None, final
        assert [m["id"] for m in c.models()["models"] if m["id"].startswith("finetune")] == []
    assert list(cfg.models_dir.iterdir()) == []


def test_hostile_shapes_and_affines_are_400s_not_500s(server):
    url = server[0]
    header = {"affine": np.eye(4).tolist(), "name": "evil"}
    import struct

    # a shape over the voxel limit is that server's setting (422, naming --max-voxels); the others are broken packs
    for shape, expected in (([2**32, 2**32, 2**32], 422), ([2**62, 4, 1], 422), ([0, 2**40, 2**40], 400),
                            ([2.5, 2, 2], 400)):
        head = json.dumps({**header, "dtype": "<f4", "shape": shape, "codec": "raw"}).encode()
        body = b"MHPK" + struct.pack("<I", len(head)) + head + bytes(32)
        status, answer = _raw(url, "/sessions?format=pack", body, content_type="application/x-mambahome-pack")
        assert (status, answer["error"]) == (expected, {400: "invalid_input", 422: "too_many_voxels"}[expected]), \
            (shape, answer)
    for shape, word in (((0, 5, 5), "empty axis"),):
        body = pack_array(np.zeros(shape, np.float32), header)
        status, answer = _raw(url, "/sessions?format=pack", body, content_type="application/x-mambahome-pack")
        assert status == 400 and word in answer["detail"], answer
    bad = np.eye(4)
    bad[3] = 5
    body = pack_array(np.zeros((4, 4, 4), np.float32), {"affine": bad.tolist()})
    status, answer = _raw(url, "/sessions?format=pack", body, content_type="application/x-mambahome-pack")
    assert status == 400 and "must end with the row [0, 0, 0, 1]" in answer["detail"]
    status, _ = _raw(url, "/openapi.json", method="GET", token="")
    assert status == 404  # only /health and /version answer without the token


def test_a_ct_sent_as_plain_nifti_is_segmented_as_ct(client, shared_data):
    """The file's own modality (here CT, recognised from Hounsfield units) reaches the session when the client names
    none: it was dropped, and the CT went through the model's default intensity rule."""
    ct = shared_data / "abdomen_ct_mr" / "ct_image.nii.gz"
    if not ct.is_file():
        pytest.skip(f"{ct} not present")
    s = client.upload_file(ct)
    assert (s.modality, s.modality_source) == ("CT", "guessed")
    named = client.upload_file(ct, modality="mri")
    assert (named.modality, named.modality_source) == ("MR", "client")
    as_ct, as_mr = client.segment(s.session_id), client.segment(named.session_id)
    explicit = client.upload_file(ct, modality="CT")
    assert np.array_equal(as_ct.labels, client.segment(explicit.session_id).labels)
    assert not np.array_equal(as_ct.labels, as_mr.labels)
    for sid in (s.session_id, named.session_id, explicit.session_id):
        client.close_session(sid)


def test_a_client_gone_mid_upload_is_one_info_line_not_an_error(server, caplog):
    """A client closing its connection halfway through an upload is not a server failure: it was logged as one."""
    url = server[0]
    host, port = url.split("//")[1].split(":")
    caplog.set_level(logging.INFO, logger="mambahome.server")
    with socket.create_connection((host, int(port)), timeout=30) as conn:
        conn.sendall(f"POST /sessions?format=nifti HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {TOKEN}\r\n"
                     "Content-Type: application/octet-stream\r\nContent-Length: 100000\r\n\r\n".encode()
                     + b"\x1f\x8b" + bytes(1000))
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not any("disconnected" in r.getMessage() for r in caplog.records):
        time.sleep(0.05)
    ours = [r for r in caplog.records if r.name == "mambahome.server"]
    assert any(r.levelno == logging.INFO and "the client disconnected during POST /sessions" in r.getMessage()
               for r in ours), [r.getMessage() for r in ours]
    assert not [r for r in ours if r.levelno >= logging.ERROR]
