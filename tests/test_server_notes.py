"""The server's ``notes`` (a NIfTI whose qform and sform disagree; fallbacks of a prediction) reach the client with the
session and with each segmentation. A real server on localhost (uvicorn, a free port)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
nib = pytest.importorskip("nibabel")

from engine.synth import make_phantom  # noqa: E402
from mambahome_client import Client, pack_array  # noqa: E402
from mambahome_client.client import SessionInfo  # noqa: E402
from server_support import connected_client, cpu_server  # noqa: E402

TOKEN = "notes-token-123456"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with cpu_server(tmp_path_factory.mktemp("notes-server"), TOKEN) as served:
        yield served


@pytest.fixture
def client(server):
    return connected_client(server[0], TOKEN)


def conflicting_nifti(path: Path) -> Path:
    """A small MR-like NIfTI whose qform and sform disagree by 20 mm (nibabel takes the sform, ITK the qform)."""
    mr, _ = make_phantom((24, 24, 20), "MR", seed=3).to_volumes()
    img = nib.Nifti1Image(mr.data.astype(np.float32), np.eye(4))
    shifted = np.eye(4)
    shifted[:3, 3] = [20.0, 0.0, 0.0]
    img.set_qform(np.eye(4), code=1)
    img.set_sform(shifted, code=2)
    nib.save(img, str(path))
    return path


def test_a_nifti_whose_qform_and_sform_disagree_comes_with_a_note_on_the_session_and_the_segmentation(client,
                                                                                                      tmp_path):
    path = conflicting_nifti(tmp_path / "two_forms.nii.gz")
    s = client.upload_file(path)
    assert len(s.notes) == 1 and "qform and sform disagree" in s.notes[0], s.notes
    assert "3D Slicer" in s.notes[0] and str(tmp_path) not in s.notes[0]  # no server (or client) path in it
    seg = client.segment(s.session_id)
    assert seg.notes == s.notes  # told again with the result: the upload's answer may not have been shown
    # a note casts no doubt on the result (the bundled model's own demo note, phantoms only, is another matter)
    assert [w for w in seg.warnings if "synthetic phantoms only" not in w] == []
    client.close_session(s.session_id)


def test_a_plain_nifti_and_a_pack_have_no_notes(client, shared_data):
    img = shared_data / "hippocampus" / "imagesTr" / "hippocampus_001.nii.gz"
    if not img.is_file():
        pytest.skip(f"{img} not present")
    s = client.upload_file(img)
    assert s.notes == [] and client.segment(s.session_id).notes == []
    client.close_session(s.session_id)
    vol = nib.load(str(img))
    p = client.create_session(np.asarray(vol.dataobj, np.float32), vol.affine, name="hippo")
    assert p.notes == [] and client.segment(p.session_id).notes == []
    client.close_session(p.session_id)


@pytest.mark.parametrize("notes, expected", [(None, []), ([], []), ("out of memory on cuda:0", ["out of memory on "
                                                                                                "cuda:0"]),
                                             (["a", "", "b"], ["a", "b"]), ({"x": 1}, [])])
def test_the_clients_notes_are_a_list_of_strings_whatever_the_server_sent(monkeypatch, notes, expected):
    """An older server sends no notes; a string used to become a list of its characters."""
    meta = {"class_names": ["background", "organ"], "colors": None, "model_id": "default", "model_version": "v1",
            "seconds": 0.5}
    if notes is not None:
        meta["notes"] = notes
    c = Client("http://127.0.0.1:9")
    monkeypatch.setattr(c, "_request", lambda *a, **k: (pack_array(np.zeros((2, 2, 2), np.uint8), meta), {}))
    assert c.segment("abcdefghijklmnop").notes == expected
    info = c._session({"session_id": "s" * 16, "shape": [2, 2, 2], "affine": np.eye(4).tolist(),
                       "expires_after_s": 60, **({"notes": notes} if notes is not None else {})})
    assert isinstance(info, SessionInfo) and info.notes == expected
