"""``mambahome serve``: run the server with uvicorn."""
from __future__ import annotations

import argparse
import errno
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Any, List, Optional

from engine.server.config import ServerConfig, ServerConfigError, read_token_file


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """A validated :class:`ServerConfig` from the parsed command line (token from --token, --token-file
    or ``$MAMBAHOME_TOKEN``)."""
    token: Optional[str] = args.token
    if args.token_file:
        token = read_token_file(Path(args.token_file))
    if token is None:
        token = os.environ.get("MAMBAHOME_TOKEN") or None
    return ServerConfig(host=args.host, port=args.port, token=token, models_dir=args.models, cases_dir=args.cases,
                        device=args.device, max_sessions=args.max_sessions,
                        max_sessions_per_client=args.max_sessions_per_client, idle_timeout_s=args.idle_timeout,
                        max_upload_bytes=int(args.max_upload_mb * 2**20), body_timeout_s=args.body_timeout,
                        max_voxels=args.max_voxels, busy_wait_s=args.busy_wait).validate()


def check_folders(config: ServerConfig) -> None:
    """Refuse a --models or --cases path that exists but is a file (it would be ignored silently).

    Args:
        config: the validated server configuration.

    Raises:
        ServerConfigError: naming the flag and the path.
    """
    for flag, folder in (("--models", config.models_dir), ("--cases", config.cases_dir)):
        if folder is not None and folder.exists() and not folder.is_dir():
            raise ServerConfigError(f"{flag} {folder}: is a file; give a folder")


def startup_notes(config: ServerConfig, models: Any, jobs: Any = None) -> List[str]:
    """What the server offers, said once at start: the model ids, the --models checkpoints it skips
    (and why), folders that do not exist yet, and whether fine-tuning is on.

    A mistyped --models path, or a checkpoint there that cannot be read, otherwise only shows as a
    model missing from a client's list.

    Args:
        config: the server configuration.
        models: the app's :class:`engine.server.state.ModelRegistry`.
        jobs: the app's :class:`engine.server.state.JobManager`: the runs it set aside, interrupted when a server
            stopped during their training, are named.

    Returns:
        Lines to print.
    """
    from engine.checkpoint import read_checkpoint_metadata

    listed = models.entries()
    lines = [f"models: {', '.join(sorted(listed))}"]
    if config.models_dir is not None:
        if not config.models_dir.exists():
            lines.append(f"note: --models {config.models_dir} does not exist (yet): no extra models; it is created "
                         "when a fine-tune writes its first version")
        else:
            paths = {e.path for e in listed.values() if e.path is not None}
            for p in sorted(config.models_dir.rglob("*.safetensors")):
                if p in paths or any(part.startswith(".") for part in p.relative_to(config.models_dir).parts):
                    continue
                try:
                    read_checkpoint_metadata(p)
                    reason = "its id (path without the suffix) is reserved or not a valid model id"
                except ValueError as exc:
                    reason = str(exc)
                lines.append(f"note: not listed: {reason if str(p) in reason else f'{p}: {reason}'}")
    for run in getattr(jobs, "set_aside", None) or []:
        lines.append(f"note: fine-tune run {run} was interrupted (the server stopped while it trained): set aside as "
                     f".interrupted-{run} in --models, its checkpoints not listed; delete it when it is of no use")
    if config.cases_dir is not None and not config.cases_dir.exists():
        lines.append(f"note: --cases {config.cases_dir} does not exist (yet); it is created when the first case "
                     "is saved")
    if not (config.models_dir and config.cases_dir):
        lines.append("note: fine-tuning is off: it needs both --models and --cases")
    return lines


def log_to_stderr() -> None:
    """Print the server's log (:data:`engine.server.state.log`: a failure clients are told of in one sentence, with
    its exception and traceback) on stderr beside uvicorn's lines: uvicorn configures only its own loggers."""
    from engine.server.state import log

    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("mambahome serve: %(levelname)s: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)


def serve(config: ServerConfig) -> None:
    """Run the server in the foreground until interrupted."""
    import uvicorn

    from engine.server.app import create_app
    from engine.server.state import SHUTDOWN_WAIT_S

    check_folders(config)
    log_to_stderr()
    where = f"http://{config.host}:{config.port}"
    sock = listening_socket(config.host, config.port)  # before the models load and before "listening" is said
    app = create_app(config)
    print(f"mambahome serve: listening on {where} ({'token required' if config.token else 'no token: localhost only'})",
          file=sys.stderr)
    for line in startup_notes(config, app.state.models, app.state.jobs):
        print(f"mambahome serve: {line}", file=sys.stderr)
    server = uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.port, log_level="info",
                                           timeout_keep_alive=30, timeout_graceful_shutdown=SHUTDOWN_WAIT_S))
    uvicorns_exit = server.handle_exit

    def handle_exit(sig: int, frame: Any) -> None:
        # The model work stops first. uvicorn alone waited for a running segmentation to end (195 s for a small CT
        # on a CPU), then Python's exit killed a fine-tune's thread inside torch (a segmentation fault or an abort,
        # not exit code 0): a request ends at its next window (503 shutting_down), a job at its next step.
        app.state.gpu.closing.cancel()
        app.state.jobs.interrupt_all()
        uvicorns_exit(sig, frame)

    server.handle_exit = handle_exit  # read when uvicorn installs its signal handlers, inside run()
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn raises the Ctrl-C it handled once it has shut down: stopped as asked
        pass
    finally:
        sock.close()


def listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``(host, port)`` for uvicorn to serve on.

    Bound here, so that a port in use is one line naming it and the CLI's exit code 2; uvicorn bound it after the
    server had said it was listening and exited with its own code 3.

    Raises:
        ServerConfigError: the address cannot be bound (in use, not this machine's, a privileged port).
    """
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as exc:
        raise ServerConfigError(f"--host {host}: not an address of this machine ({exc})") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: a restart need not wait
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ServerConfigError(f"cannot listen on {host}:{port}: the port is in use (another mambahome serve, or "
                                    "another program); stop it or choose another --port") from None
        raise ServerConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; choose another --host or "
                                "--port") from None
    sock.set_inheritable(True)
    return sock


def _cli_serve(args: argparse.Namespace) -> int:
    config = config_from_args(args)  # ServerConfigError is a ValueError: the CLI prints it and exits 2
    from engine.inference import resolve_device

    # Checked before listening: a wrong --device (no CUDA here, "gpu0") otherwise starts a server
    # whose every model request fails with an HTTP 500.
    resolve_device(config.device)
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ModuleNotFoundError as exc:
        raise ServerConfigError(f"the server needs {exc.name}: pip install 'napari-mambahome[server]'") from None
    serve(config)
    return 0


def register_cli(subparsers: Any) -> None:
    """Add ``mambahome serve``."""
    p = subparsers.add_parser("serve", help="serve models over HTTP to 3D Slicer and napari clients",
                              description="Run the MambaHoME server (needs the 'server' extra: fastapi, uvicorn).")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; any other needs a token)")
    p.add_argument("--port", type=int, default=8765, help="TCP port (default 8765)")
    tok = p.add_mutually_exclusive_group()
    tok.add_argument("--token", default=None, help="API token clients must send (prefer --token-file)")
    tok.add_argument("--token-file", default=None, help="file whose first line is the API token")
    p.add_argument("--models", default=None, help="folder of extra checkpoints; fine-tuned versions are written here")
    p.add_argument("--cases", default=None, help="case store folder for saved cases (fine-tuning reads it)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    default = ServerConfig()  # the defaults live in one place, the dataclass a server is made from
    p.add_argument("--max-sessions", type=int, default=default.max_sessions,
                   help="volumes held at once (default %(default)s)")
    p.add_argument("--max-sessions-per-client", type=int, default=default.max_sessions_per_client,
                   help="volumes one client address may hold at once; more get 429 (default: no cap of its own; "
                        "clients behind one SSH tunnel share the address 127.0.0.1)")
    p.add_argument("--idle-timeout", type=float, default=default.idle_timeout_s,
                   help="seconds before an idle session is dropped (default %(default)s)")
    p.add_argument("--max-upload-mb", type=float, default=default.max_upload_bytes / 2**20,
                   help="largest request body in MiB (default %(default)s)")
    p.add_argument("--body-timeout", type=float, default=default.body_timeout_s,
                   help="seconds the server waits for the next piece of a request body before 408 and closing the "
                        "connection (a stalled or slow sender; default %(default)s)")
    p.add_argument("--max-voxels", type=int, default=default.max_voxels,
                   help="largest volume a session may hold, in voxels, whatever its format or compression "
                        "(default %(default)s = 512 x 512 x 1024); larger ones get 422")
    p.add_argument("--busy-wait", type=float, default=default.busy_wait_s,
                   help="seconds a request waits for the GPU before 503 busy (default %(default)s)")
    p.set_defaults(func=_cli_serve)
