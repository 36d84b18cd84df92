"""``mambahome serve`` binds its port before it says it listens: a port in use is one line naming it and exit code 2
(uvicorn bound it after "listening on ..." and exited with its own code 3); on a free port the server answers and
Ctrl-C stops it with exit code 0. Real processes on localhost."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

ROOT = Path(__file__).resolve().parents[1]


def _serve(port: int, tmp_path: Path) -> subprocess.Popen:
    token = tmp_path / "token"
    token.write_text("serve-port-token-123456\n")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "engine.cli", "serve", "--port", str(port), "--token-file",
                             str(token), "--device", "cpu"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def test_a_port_in_use_is_named_and_exits_2(tmp_path):
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    port = held.getsockname()[1]
    try:
        proc = _serve(port, tmp_path)
        out, _ = proc.communicate(timeout=120)
    finally:
        held.close()
    assert proc.returncode == 2, out
    assert f"cannot listen on 127.0.0.1:{port}: the port is in use" in out and "--port" in out
    assert "listening on" not in out and "Traceback" not in out


def test_a_free_port_serves_and_ctrl_c_stops_it(tmp_path):
    import urllib.error
    import urllib.request

    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    proc = _serve(port, tmp_path)
    try:
        deadline, answer = time.monotonic() + 120, None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                    answer = response.status
                break
            except (urllib.error.URLError, OSError):
                time.sleep(0.3)
        assert answer == 200, proc.poll()
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert f"listening on http://127.0.0.1:{port}" in out
