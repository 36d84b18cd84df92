"""The segment answer's ``warnings`` (a model meeting a modality it never saw) on the client's ``Segmentation``,
from a real server on localhost; an older server's answer without the field gives an empty list."""
from __future__ import annotations

import numpy as np
import pytest

from mambahome_client import Client, Segmentation, pack_array
from engine.synth import make_phantom

MR_ONLY = "tiny-mr"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real server whose one model of its own (``tiny-mr``) was trained on MR data only."""
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from engine.server.config import ServerConfig
    from server_support import running_server
    from test_modality_warning import tiny_checkpoint

    root = tmp_path_factory.mktemp("warnings-server")
    (root / "models").mkdir()
    tiny_checkpoint(root / "models" / f"{MR_ONLY}.safetensors", "MR", seen=["MR"], version=MR_ONLY)
    cfg = ServerConfig(models_dir=root / "models", cases_dir=root / "cases", device="cpu")
    with running_server(cfg) as (url, _):
        client = Client(url, timeout=300)
        client.connect()
        yield client


def test_a_ct_given_to_an_mr_only_model_comes_back_with_the_servers_warning(server):
    ct, _ = make_phantom((32, 32, 24), "CT", seed=2).to_volumes()
    s = server.create_session(ct.data, ct.affine, name="ct_scan")
    seg = server.segment(s.session_id, model_id=MR_ONLY)
    assert isinstance(seg, Segmentation) and seg.labels.shape == ct.data.shape  # a warning, never a refusal
    assert isinstance(seg.warnings, list) and len(seg.warnings) == 1 and isinstance(seg.warnings[0], str)
    assert seg.warnings[0].startswith("ct_scan: the model tiny-mr was trained on MR data only, but it looks like CT")
    assert "may be poor" in seg.warnings[0]


def test_an_mr_given_to_an_mr_only_model_has_no_warning(server):
    mr, _ = make_phantom((32, 32, 24), "MR", seed=2).to_volumes()
    s = server.create_session(mr.data, mr.affine, name="mr_scan")
    seg = server.segment(s.session_id, model_id=MR_ONLY)
    assert seg.warnings == []


@pytest.mark.parametrize("header", [{}, {"warnings": None}, {"warnings": []}, {"warnings": ["careful"]}])
def test_an_older_servers_answer_without_warnings_gives_an_empty_list(monkeypatch, header):
    """Servers before the field send no ``warnings``: the client still answers, with ``[]``."""
    labels = np.zeros((4, 5, 6), np.uint8)
    meta = {"class_names": ["background", "organ"], "colors": None, "model_id": "default", "model_version": "v1",
            "seconds": 0.5, "notes": [], **header}
    client = Client("http://127.0.0.1:9")
    monkeypatch.setattr(client, "_request", lambda *a, **k: (pack_array(labels, meta), {}))
    seg = client.segment("abc")
    assert seg.warnings == (["careful"] if header.get("warnings") else [])
    assert np.array_equal(seg.labels, labels) and seg.model_id == "default"
