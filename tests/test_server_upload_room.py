"""An upload holds its session's place while it is read: a server with room for one session refuses a second upload at
once, not after reading it whole (six concurrent 100 MiB uploads to such a server were all read, 780 MB, before five
were refused)."""
from __future__ import annotations

import io
import socket
import time

import nibabel as nib
import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from engine.server.config import ServerConfig  # noqa: E402
from mambahome_client import Client  # noqa: E402
from mambahome_client.client import BusyError  # noqa: E402
from server_support import running_server  # noqa: E402

TOKEN = "room-token-0123456789"


def _nifti_bytes(shape=(16, 16, 16)) -> bytes:
    buffer = io.BytesIO()
    image = nib.Nifti1Image(np.zeros(shape, np.float32), np.eye(4))
    image.to_file_map({"image": nib.FileHolder(fileobj=buffer), "header": nib.FileHolder(fileobj=buffer)})
    return buffer.getvalue()


def test_a_second_upload_is_refused_while_the_first_is_read_and_the_first_gets_its_session():
    with running_server(ServerConfig(token=TOKEN, device="cpu", busy_wait_s=0.2, max_sessions=1,
                                     body_timeout_s=30)) as (url, app):
        port = int(url.rsplit(":", 1)[1])
        body = _nifti_bytes()
        head = (f"POST /sessions?format=nifti&name=first HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
                f"Content-Type: application/octet-stream\r\nContent-Length: {len(body)}\r\n\r\n").encode()
        with socket.create_connection(("127.0.0.1", port)) as first:
            first.settimeout(30)
            first.sendall(head + body[:100])  # the first upload is under way
            deadline = time.monotonic() + 10
            while not app.state.sessions._uploading:  # its handler has taken the place
                assert time.monotonic() < deadline
                time.sleep(0.02)
            client = Client(url, token=TOKEN)
            with pytest.raises(BusyError, match="maximum of 1 sessions"):
                client.create_session(np.zeros((8, 8, 8), np.float32), np.eye(4), name="second")
            first.sendall(body[100:])
            answer = b""
            while b"session_id" not in answer:
                piece = first.recv(65536)
                assert piece, answer
                answer += piece
        assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
        assert len(app.state.sessions._sessions) == 1 and app.state.sessions._uploading == []
        # a refused or failed upload gives its place back
        with pytest.raises(Exception):
            client.create_session(np.zeros((8, 8, 8), np.float32), np.eye(4), name="third")
        assert app.state.sessions._uploading == []


def test_a_broken_upload_gives_its_place_back():
    with running_server(ServerConfig(token=TOKEN, device="cpu", busy_wait_s=0.2, max_sessions=1)) as (url, app):
        client = Client(url, token=TOKEN)
        with pytest.raises(Exception, match="(?i)nifti|volume|read"):
            client._request("POST", "/sessions", b"not a nifti file at all" * 20, query={"format": "nifti"},
                            content_type="application/octet-stream")
        assert app.state.sessions._uploading == []
        assert client.create_session(np.zeros((8, 8, 8), np.float32), np.eye(4), name="next").session_id
