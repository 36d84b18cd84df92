"""Settings of one server process, checked before it binds a socket."""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Optional


class ServerConfigError(ValueError):
    """Settings the server refuses to start with (the message says which and why)."""


LOCAL_NAMES = ("localhost",)


def is_loopback(host: str) -> bool:
    """True for ``127.x.x.x``, ``::1`` and ``localhost``; ``0.0.0.0`` and real addresses are not."""
    if host.lower() in LOCAL_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass
class ServerConfig:
    """What one server serves and how much it accepts.

    Args:
        host, port: where to listen; anything but loopback needs ``token``.
        token: the API key clients send as ``Authorization: Bearer <token>``; None = no check (loopback only).
        models_dir: folder of extra checkpoints (``**/*.safetensors``) and of fine-tuned versions.
        cases_dir: the case store that saved cases go to and fine-tuning reads.
        device: ``auto``/``cpu``/``cuda``/``cuda:N`` for every model job.
        max_sessions: volumes held at once; a new one beyond this is refused (503) until one closes/expires.
        max_sessions_per_client: volumes one client address may hold at once (429 beyond it); None: no cap of its
            own. Clients behind one SSH tunnel or proxy share an address (127.0.0.1) and so this cap.
        idle_timeout_s: a session not used for this long is dropped.
        max_upload_bytes: largest request body (413 beyond it).
        body_timeout_s: longest wait for the next piece of a request body; a client that stalls longer (a slow
            sender, a Content-Length larger than what it sends) gets 408 and its connection is closed.
        max_voxels: largest volume (voxels) a session may hold, also after decompression.
        busy_wait_s: how long a model request waits for the GPU before a 503 "busy" answer.
    """

    host: str = "127.0.0.1"
    port: int = 8765
    token: Optional[str] = None
    models_dir: Optional[Path] = None
    cases_dir: Optional[Path] = None
    device: str = "auto"
    max_sessions: int = 8
    max_sessions_per_client: Optional[int] = None
    idle_timeout_s: float = 1800.0
    max_upload_bytes: int = 2 * 1024 ** 3
    body_timeout_s: float = 60.0
    max_voxels: int = 512 * 512 * 1024
    busy_wait_s: float = 2.0

    def validate(self) -> "ServerConfig":
        """Refuse unsafe or impossible settings. Returns self."""
        if self.token is not None and len(self.token) < 8:
            raise ServerConfigError("the token must be at least 8 characters (use e.g. `python -c "
                                    "\"import secrets; print(secrets.token_urlsafe(32))\"`)")
        if not is_loopback(self.host) and not self.token:
            raise ServerConfigError(f"refusing to listen on {self.host!r} without a token: anyone who can reach "
                                    "that address could use the GPU and read your cases. Pass --token/--token-file, "
                                    "or keep the default 127.0.0.1 and use an SSH tunnel")
        if not 0 <= int(self.port) < 65536:
            raise ServerConfigError(f"port {self.port} is not a TCP port")
        for name in ("max_sessions", "max_upload_bytes", "max_voxels"):
            if int(getattr(self, name)) < 1:
                raise ServerConfigError(f"{name} must be at least 1")
        if self.max_sessions_per_client is not None and int(self.max_sessions_per_client) < 1:
            raise ServerConfigError("max_sessions_per_client must be at least 1 (or None: no cap per client)")
        if self.idle_timeout_s <= 0 or self.busy_wait_s < 0:
            raise ServerConfigError("idle_timeout_s must be > 0 and busy_wait_s >= 0")
        if not self.body_timeout_s > 0:
            raise ServerConfigError("body_timeout_s must be > 0")
        # absolute, so the engine's messages name them only so: ServerPaths matching a relative "--models hippo"
        # rewrote a client's own model id 'hippo/v2' in the answer about it
        self.models_dir = Path(self.models_dir).absolute() if self.models_dir else None
        self.cases_dir = Path(self.cases_dir).absolute() if self.cases_dir else None
        return self


def read_token_file(path: Path) -> str:
    """The token in ``path`` (first line, stripped); a clear error for a missing or empty file."""
    p = Path(path)
    try:
        token = p.read_text(encoding="utf-8").strip().splitlines()[0].strip() if p.stat().st_size else ""
    except OSError as exc:
        raise ServerConfigError(f"{p}: cannot read the token file ({exc})") from exc
    if not token:
        raise ServerConfigError(f"{p}: the token file is empty")
    return token
