"""The token is checked before a request's body is read: a client without it gets 401/403 and costs the server nothing.

FastAPI reads and parses a JSON body before it runs an endpoint's dependencies, the token check among them: without
the token, six 14 MiB prompts made the server parse 80 MiB of JSON on its event loop (8 s in which nobody else was
answered) and grow by 600 MB, and a broken body was told it was broken JSON (400) before it was told it lacked the
token (401). Anyone who can reach the port could do that, over and over.
"""
from __future__ import annotations

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from server_support import cpu_server, raw_exchange  # noqa: E402

TOKEN = "walk-token-first-token"


@pytest.fixture(scope="module")
def port(tmp_path_factory):
    with cpu_server(tmp_path_factory.mktemp("walk-token-first"), TOKEN) as (url, _):
        yield int(url.rsplit(":", 1)[1])


def _post(port: int, path: str, body: bytes, auth: str = ""):
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}Content-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
    return raw_exchange(port, head.encode(), body)


@pytest.mark.parametrize("auth, status", [("", 401), ("Authorization: Bearer not-the-token\r\n", 403)])
def test_a_body_is_not_read_without_the_token(port, auth, status):
    code, answer = _post(port, "/models/select", b'{"model_id": ', auth)  # broken JSON: never looked at
    assert code == status, answer
    code, answer = _post(port, "/finetune", b"[" * 100_000 + b"]" * 100_000, auth)
    assert code == status, answer


def test_the_open_endpoints_and_a_client_with_the_token_are_served(port):
    head = "GET {} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    assert raw_exchange(port, head.format("/health").encode())[0] == 200
    assert raw_exchange(port, head.format("/version").encode())[0] == 200
    code, answer = _post(port, "/models/select", b'{"model_id": "default"}', f"Authorization: Bearer {TOKEN}\r\n")
    assert code == 200 and answer["active"] == "default", answer
    code, answer = _post(port, "/models/select", b'{"model_id": ', f"Authorization: Bearer {TOKEN}\r\n")
    assert code == 400 and answer["error"] == "invalid_json", answer  # with the token, the body is read and judged
