"""Connect tells a Slicer user what to do, not what a program should send (a live server on the CPU; real MRML classes
are not needed). A reviewer's find: no token gave "send 'Authorization: Bearer <token>'", an https:// address an SSL
"WRONG_VERSION_NUMBER" error, an address with a path "GET /version: HTTP 404"."""
from __future__ import annotations

import pytest

from slicer_support import load_module  # noqa: F401 - skips first
from server_support import echo_server  # noqa: E402

TOKEN = "slicer-connect-words"


@pytest.fixture(scope="module")
def mod():
    return load_module()


@pytest.fixture()
def served(tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    with echo_server(tmp_path, TOKEN, models) as (url, app):
        yield url


@pytest.mark.parametrize("how, token, words", [
    ("no token", None, "asks for a token: type the one `mambahome serve` was started with"),
    ("wrong token", "not-it", "refused the token: check the Token field"),
    ("a path", TOKEN, "no Mamba-HoME server is at that address: give the server's address and port only"),
    ("https", TOKEN, "does not speak HTTPS"),
    ("a typo in the scheme", TOKEN, "is not an address Connect can reach: write it as http://HOST:PORT"),
    ("no server there", TOKEN, "nothing answered at"),
])
def test_connect_errors_say_what_to_do(mod, served, how, token, words):
    import socket

    with socket.socket() as free:  # a port nothing listens on once closed
        free.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{free.getsockname()[1]}"
    logic = mod.MambaHoMELogic()
    url = {"a path": served + "/mambahome", "https": served.replace("http://", "https://"),
           "a typo in the scheme": served.replace("http://", "htp://"), "no server there": closed}.get(how, served)
    with pytest.raises(mod.ServerError) as err:
        logic.connect(url, token)
    assert words in str(err.value), str(err.value)
    assert "Authorization: Bearer" not in str(err.value) and logic.client is None
    if how == "https":
        assert served in str(err.value)  # the address to use instead
