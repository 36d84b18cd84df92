"""JSON bodies Python's reader cannot take are refused saying why, not "There was an error parsing the body".

A prompt nested 100,000 arrays deep, one holding a 5000-digit number, or one that is not UTF-8 was answered with
FastAPI's ``400 There was an error parsing the body``, which named neither the request nor what to change, while a
body with a syntax error is told where it breaks (``400 invalid_json``). The code stays ``invalid_request``.
"""
from __future__ import annotations

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from server_support import cpu_server, raw_exchange  # noqa: E402

TOKEN = "walk-server-json-token"


@pytest.fixture(scope="module")
def port(tmp_path_factory):
    with cpu_server(tmp_path_factory.mktemp("walk-json"), TOKEN) as (url, _):
        yield int(url.rsplit(":", 1)[1])


def _post(port: int, path: str, body: bytes):
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n")
    return raw_exchange(port, head.encode(), body)


@pytest.mark.parametrize("body, why", [
    (b"[" * 100000 + b"]" * 100000, "nests"),
    (b'{"model_id": ' + b"9" * 5000 + b"}", "4300 digits"),
    (b'{"model_id": "\xff\xfe\xfa"}', "UTF-8"),
])
def test_a_body_the_json_reader_cannot_take_is_refused_saying_why(port, body, why):
    status, answer = _post(port, "/models/select", body)
    assert status == 400 and answer["error"] == "invalid_request", answer  # the code it always had
    assert "POST /models/select" in answer["detail"] and why in answer["detail"], answer["detail"]
    assert "There was an error parsing the body" not in answer["detail"]


def test_a_syntax_error_is_still_told_where_it_is(port):
    status, answer = _post(port, "/models/select", b'{"model_id": "default",}')
    assert status == 400 and answer["error"] == "invalid_json" and "at character" in answer["detail"], answer
