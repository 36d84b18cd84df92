"""``mambahome serve``: run the server with uvicorn."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Optional

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
                        device=args.device, max_sessions=args.max_sessions, idle_timeout_s=args.idle_timeout,
                        max_upload_bytes=int(args.max_upload_mb * 2**20), busy_wait_s=args.busy_wait).validate()


def serve(config: ServerConfig) -> None:
    """Run the server in the foreground until interrupted."""
    import uvicorn

    from engine.server.app import create_app

    app = create_app(config)
    where = f"http://{config.host}:{config.port}"
    print(f"mambahome serve: listening on {where} ({'token required' if config.token else 'no token: localhost only'})",
          file=sys.stderr)
    uvicorn.run(app, host=config.host, port=config.port, log_level="info", timeout_keep_alive=30)


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
    p.add_argument("--max-sessions", type=int, default=8, help="volumes held at once (default 8)")
    p.add_argument("--idle-timeout", type=float, default=1800.0, help="seconds before an idle session is dropped")
    p.add_argument("--max-upload-mb", type=float, default=2048.0, help="largest request body in MiB (default 2048)")
    p.add_argument("--busy-wait", type=float, default=2.0, help="seconds a request waits for the GPU before 503 busy")
    p.set_defaults(func=_cli_serve)
