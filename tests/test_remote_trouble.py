"""Trouble a remote user meets (3D Slicer, napari remote, Python), against a live server on the CPU: each answer
names what is wrong, nothing the user drew or saved is lost, and the server stays healthy."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("fastapi")
nib = pytest.importorskip("nibabel")

from server_support import connected_client, cpu_server  # noqa: E402

TOKEN = "remote-trouble-token"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    with cpu_server(tmp_path_factory.mktemp("trouble"), TOKEN, max_voxels=50_000) as (url, app):
        yield url, connected_client(url, TOKEN)


def _volume(shape=(30, 30, 20)) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 400, size=shape).astype(np.int16)


def test_a_4d_pack_over_the_voxel_limit_is_told_it_is_4d_not_to_crop(served):
    """A 4D pack (two volumes, 72,000 voxels) over the limit of 50,000 was answered "422 ... crop or downsample it":
    cropping a 4D image never makes it a volume. It is one 3D volume that is needed."""
    from mambahome_client import ServerError

    url, c = served
    with pytest.raises(ServerError) as exc:
        c.create_session(np.zeros((30, 30, 40, 2), np.int16), np.eye(4), name="dwi")
    assert exc.value.status == 400 and "expected a 3D array" in str(exc.value), str(exc.value)
    assert c.health()["status"] == "ok"


def test_a_volume_over_max_voxels_is_refused_by_the_client_before_it_is_sent(served, tmp_path):
    """A connected client knows the limit (``GET /version``): it refused an oversized upload by bytes itself, but sent
    a volume over ``--max-voxels`` whole, to be refused after the server had read it (up to 8 bytes a voxel)."""
    from mambahome_client import TooManyVoxelsError
    from mambahome_client.client import Client

    url, c = served
    sent = []

    class Counting(Client):
        def _request(self, method, path, *args, **kwargs):  # type: ignore[override]
            sent.append((method, path))
            return super()._request(method, path, *args, **kwargs)

    counting = Counting(url, token=TOKEN)
    counting.server_info = c.server_info
    with pytest.raises(TooManyVoxelsError) as exc:
        counting.create_session(_volume((40, 40, 40)), np.eye(4), name="big ct")
    assert not sent, "the volume was sent although the client knew the server would refuse it"
    text = str(exc.value)
    assert exc.value.status == 422 and exc.value.code == "too_many_voxels"
    assert "64000 voxels" in text and "50000" in text and "--max-voxels" in text and url in text
    # a file's voxels are counted by the server (from its header): its 422 is the same exception class
    path = tmp_path / "big.nii.gz"
    nib.save(nib.Nifti1Image(_volume((40, 40, 40)), np.eye(4)), str(path))
    with pytest.raises(TooManyVoxelsError) as exc:
        c.upload_file(path)
    assert exc.value.status == 422 and "big.nii.gz" in str(exc.value)
    assert c.health()["status"] == "ok"


def test_unicode_volume_names_keep_their_letters(served, tmp_path):
    """A patient's or structure's name in German or Chinese came back as 'R_ckenmark T2 _': the letters of any script
    stay; folders, control and direction-override characters still go."""
    url, c = served
    s = c.create_session(_volume(), np.eye(4), name="Rückenmark T2 脊髓")
    path = tmp_path / "Leber ü 肝.nii.gz"
    nib.save(nib.Nifti1Image(_volume(), np.eye(4)), str(path))
    f = c.upload_file(path)
    names = {c.save_case(sid, np.ones((30, 30, 20), np.uint8), ["background", "cord"], "MR")["source_file"]
             for sid in (s.session_id, f.session_id)}
    assert names == {"Rückenmark T2 脊髓", "Leber ü 肝.nii.gz"}
    from engine.server.volumes import display_name

    assert display_name("../../etc/pass\u202ewd\x00", "x") == "pass_wd_"
    for sid in (s.session_id, f.session_id):
        c.close_session(sid)


def test_a_session_gone_after_a_restart_is_said_so_and_an_existing_case_is_named_as_the_user_knows_it(served):
    """After a server restart a session id is unknown: the 404 only spoke of idling. And a case id in use answered
    "pass overwrite=True", which a Slicer or napari user cannot do: the case id field is what they can change."""
    from mambahome_client import NotFoundError, ServerError

    url, c = served
    s = c.create_session(_volume(), np.eye(4), name="ct")
    c.save_case(s.session_id, np.ones((30, 30, 20), np.uint8), ["background", "cord"], "MR", case_id="kept")
    with pytest.raises(ServerError) as exc:
        c.save_case(s.session_id, np.ones((30, 30, 20), np.uint8), ["background", "cord"], "MR", case_id="kept")
    assert exc.value.status == 409 and "'kept' already exists" in str(exc.value)
    assert "overwrite=True" not in str(exc.value) and "another case id" in str(exc.value)
    c.close_session(s.session_id)
    with pytest.raises(NotFoundError) as exc:
        c.segment(s.session_id)
    assert "no session" in str(exc.value) and "restarted" in str(exc.value)
