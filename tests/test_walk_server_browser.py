"""A server without a token (loopback only) answers no web page: a browser on the same computer reaches 127.0.0.1 too.

Without a token, anything that could reach the port was trusted, and a browser can: any web page may send a "simple"
cross-site POST (no preflight: no body, or ``text/plain``), which rolled the active model back or uploaded volumes
until ``--max-sessions`` was full; and a page whose host name is re-bound to 127.0.0.1 (DNS rebinding) is same-origin
to the server, so it could read ``GET /cases``, select models, save cases, fine-tune. Browsers say where a request
comes from (``Origin``) and name the host they meant (``Host``); napari, 3D Slicer and Python clients connect to
127.0.0.1 or localhost and send no ``Origin``.
"""
from __future__ import annotations

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from server_support import cpu_server, raw_exchange  # noqa: E402


@pytest.fixture(scope="module")
def open_server(tmp_path_factory):
    with cpu_server(tmp_path_factory.mktemp("walk-browser"), None) as served:
        yield served


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def _request(port: int, method: str, path: str, headers: dict, body: bytes = b""):
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    head += f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    return raw_exchange(port, head.encode(), body)


def test_a_cross_site_post_from_a_web_page_is_refused(open_server):
    url, app = open_server
    port = _port(url)
    app.state.models.select("interactive")
    status, answer = _request(port, "POST", "/models/rollback",
                              {"Host": f"127.0.0.1:{port}", "Origin": "http://evil.example"})
    assert status == 403 and answer["error"] == "forbidden", answer
    assert "http://evil.example" in answer["detail"] and "token" in answer["detail"], answer["detail"]
    assert app.state.models.active == "interactive"  # nothing rolled back
    status, answer = _request(port, "POST", "/sessions?format=nifti",
                              {"Host": f"127.0.0.1:{port}", "Origin": "null", "Content-Type": "text/plain"}, b"x" * 10)
    assert status == 403, answer
    assert len(app.state.sessions) == 0
    app.state.models.rollback()


def test_a_dns_rebound_page_is_refused(open_server):
    url, app = open_server
    port = _port(url)
    status, answer = _request(port, "GET", "/cases", {"Host": f"evil.example:{port}"})
    assert status == 403 and answer["error"] == "forbidden", answer
    assert "evil.example" in answer["detail"] and "127.0.0.1" in answer["detail"], answer["detail"]
    status, answer = _request(port, "POST", "/models/select", {"Host": f"rebind.evil.example:{port}",
                                                               "Content-Type": "application/json"},
                              b'{"model_id": "interactive"}')
    assert status == 403, answer
    assert app.state.models.active == "default"


@pytest.mark.parametrize("host", ["127.0.0.1:{port}@evil.example", "localhost:x", "[::1]evil.example",
                                  "[::1]:{port}@evil.example", "::1:{port}"])
def test_a_host_that_only_begins_like_a_loopback_address_is_refused(open_server, host):
    """"127.0.0.1:8765@evil.example" was read as 127.0.0.1 with the port "8765@evil.example" (a reviewer's probe): the
    port must be digits and an IPv6 address in brackets."""
    url, app = open_server
    port = _port(url)
    status, answer = _request(port, "GET", "/cases", {"Host": host.format(port=port)})
    assert status == 403 and answer["error"] == "forbidden", (host, answer)


@pytest.mark.parametrize("host", ["127.0.0.1:{port}", "localhost:{port}", "LOCALHOST", "[::1]:{port}", "127.0.0.2"])
def test_clients_of_a_loopback_address_are_served(open_server, host):
    url, _ = open_server
    port = _port(url)
    status, answer = _request(port, "GET", "/models", {"Host": host.format(port=port)})
    assert status == 200 and answer["active"], answer


def test_the_client_library_is_served(open_server):
    from mambahome_client import Client

    client = Client(open_server[0])
    client.connect()
    assert client.models()["active"] == "default"


def test_a_server_with_a_token_trusts_the_token_not_the_host(tmp_path):
    """With a token, a browser cannot authenticate: a reverse proxy's public host name is fine."""
    token = "walk-browser-token"
    with cpu_server(tmp_path, token) as (url, _):
        port = _port(url)
        status, answer = _request(port, "GET", "/models", {"Host": "gpu.example.org",
                                                           "Authorization": f"Bearer {token}"})
        assert status == 200, answer
        status, answer = _request(port, "GET", "/models", {"Host": "gpu.example.org", "Origin": "http://evil.example"})
        assert status == 401, answer
