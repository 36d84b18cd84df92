"""The FastAPI app: endpoints over :mod:`engine.server.state`, JSON errors, token and size checks.

Endpoints (all but ``/health`` and ``/version`` need the token when one is set)::

    GET  /health                      liveness, no token
    GET  /version                     server version, protocol, capabilities and limits, no token
    GET  /models                      models, the active one, selection history
    POST /models/select {model_id}    make a model active;  POST /models/rollback: the previous one
    POST /sessions?format=nifti|nrrd|pack[&name=&modality=]   body = file bytes or a pack -> session
    DELETE /sessions/{id}
    POST /sessions/{id}/segment {model_id?}      -> pack of the label map (I, J, K); its header's ``warnings``
                                      lists doubts such as a modality the model never saw (may be empty)
    POST /sessions/{id}/prompts {type, ..., model_id?}   -> pack of the changed box of the mask
    POST /sessions/{id}/initial-mask  body = pack of a mask (I, J, K) + {model_id?} -> pack of the changed box
    POST /sessions/{id}/cases  body = pack of labels + {class_names, modality, case_id?, overwrite?, interactive?}
    GET  /cases
    POST /finetune {steps, lr?, model_id?, settings?, compare_with?} (settings.task "interactive": a promptable
                                      model from an automatic one, scored against compare_with's promptable model;
                                      any other new model is scored against its parent);
                                      GET /finetune/{job} (scores, warning, not_scored, stop_requested,
                                      stopped_at);  POST /finetune/{job}/cancel (nothing kept);
                                      POST /finetune/{job}/stop (stop and keep: the model of the step under way)
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import re
import time
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Annotated, Any, AsyncIterator, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Match

import engine
from engine.class_names import brief_names
from engine.server.config import ServerConfig, is_loopback
from engine.progress import AnyCancelToken, Cancelled
from engine.server.state import (CASE_ID, SHUTDOWN_WAIT_S, GpuLock, JobManager, MemoryReleaser, ModelRegistry,
                                 ServerError, ServerPaths, SessionStore, check_id, client_text, is_user_facing, log,
                                 not_found, set_aside_interrupted_runs)
from engine.inference import modality_warning
from engine.preprocess import normalize_modality
from engine.server.volumes import (TooManyVoxelsError, check_network_voxels, decode_upload, display_name,
                                   too_many_voxels, volume_from_array)
from mambahome_client.wire import (PACK_MEDIA_TYPE, PROTOCOL_HEADER, PROTOCOL_VERSION, PackError, PackReceiver,
                                   PackTooLargeError, bbox_to_json, pack_array, unpack_array)


class _BodyTooLarge(Exception):
    pass


class _BodyStalled(Exception):
    pass


JSON_BODY_LIMIT = 16 * 2**20
"""The largest body of a request that carries JSON, not a volume (a prompt, a model choice, fine-tune settings).
Parsed JSON takes about 20 times its bytes as Python lists (a 14 MiB scribble grew the server by 300 MiB): under the
volume limit (--max-upload-mb, 2 GiB by default) one prompt could take tens of GiB and the server down with it. 16 MiB
holds a scribble of about a million voxels, far more than a painted slice."""

MAX_JOINED_SCRIBBLE_VOXELS = 2**20
"""The longest stroke a joined scribble may make, in voxels along the lines joining its points (what the JSON limit
allows a scribble sent as its voxels). The lines are drawn voxel by voxel before the model runs: 100,000 points
alternating between two corners of a small MRI held the GPU lock for 50 s and took 600 MB, and on a 512 x 512 CT the
JSON limit's points ask for tens of GB."""

MAX_CLASSES = 1000
"""The most class names a saved case may carry (label values 0..999; models have tens to a hundred or so). The case
store compares them pair by pair: 100,000 names in a pack header took minutes of a CPU."""

_UPLOAD_PATH = re.compile(r"/sessions(/[^/]+/(cases|initial-mask))?/?")


class BodyLimitMiddleware:
    """Refuse request bodies over ``limit`` bytes with 413: by Content-Length before reading, and by
    counting while streaming (chunked uploads). Requests other than the uploads of a volume, labels or a mask
    (``POST /sessions``, ``.../cases``, ``.../initial-mask``) carry JSON and get ``json_limit`` at most.

    A body whose next piece does not come within ``timeout_s`` gets 408 and its connection is closed: uvicorn has no
    read timeout of its own, so a client that declared more bytes than it sent, or one trickling its upload, held
    its connection and its half-read buffer until the server stopped.

    The refusal replaces whatever the app answers: FastAPI turns any error while it reads a JSON body into its own
    ``400 There was an error parsing the body``, which named neither the limit nor the stall."""

    def __init__(self, app: Any, limit: int, json_limit: int = JSON_BODY_LIMIT, timeout_s: float = 60.0) -> None:
        self.app = app
        self.limit = limit
        self.json_limit = min(limit, json_limit)
        self.timeout_s = timeout_s

    async def __call__(self, scope: Dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        upload = scope.get("method") == "POST" and _UPLOAD_PATH.fullmatch(scope.get("path", "")) is not None
        limit = self.limit if upload else self.json_limit
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            await self._refuse(send, int(length), upload)
            return
        seen = 0
        body_done = False
        refused: Optional[str] = None  # "too_large" or "stalled"
        started = False

        async def limited_receive() -> Dict[str, Any]:
            nonlocal seen, body_done, refused
            if body_done:  # after the body: waiting for a disconnect, which may take any time
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.timeout_s)
            except asyncio.TimeoutError:
                refused = "stalled"
                raise _BodyStalled() from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
                if seen > limit:
                    refused = "too_large"
                    raise _BodyTooLarge()
            return message

        async def guarded_send(message: Dict[str, Any]) -> None:
            nonlocal started
            if refused is not None and not started:
                return  # the app's answer to a body it could not read; the refusal below says what happened
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except (_BodyTooLarge, _BodyStalled):
            pass
        except Exception:
            if refused is None or started:
                raise
        if refused is None or started:
            return
        if refused == "too_large":
            await self._refuse(send, seen, upload)
            return
        declared = f" of the {int(length)} its Content-Length declared" if length and length.isdigit() else ""
        detail = (f"the request body stalled: no data for {self.timeout_s:g} s after {seen} bytes{declared}; "
                  "the connection is closed. Send the whole body without pauses (on a slow link, ask for a longer "
                  "--body-timeout), with a Content-Length that matches the body")
        log.info("%s: %s", _request_name(scope.get("method", ""), scope.get("path", "")), detail)
        resp = JSONResponse(status_code=408, content={"error": "timeout", "detail": detail},
                            headers={"connection": "close"})
        await resp({"type": "http"}, None, send)

    async def _refuse(self, send: Any, size: int, upload: bool = True) -> None:
        if upload:
            detail = (f"request body of {size} bytes is over this server's limit of {self.limit} bytes "
                      f"({self.limit / 2**20:.0f} MiB); crop or downsample the volume, or start the server "
                      "with a larger --max-upload-mb")
        else:
            detail = (f"request body of {size} bytes is over this server's limit of {self.json_limit} bytes "
                      f"({self.json_limit / 2**20:.0f} MiB) for a request that is not an upload (a prompt, a "
                      "choice, settings); send a scribble in shorter strokes")
        resp = JSONResponse(status_code=413, content={"error": "too_large", "detail": detail})
        await resp({"type": "http"}, None, send)


OPEN_PATHS = frozenset({"/health", "/version"})
"""The only paths answered without the token (they reveal the version and limits, nothing else)."""


class AccessMiddleware:
    """Check the protocol version, the token (and, without one, that no web page sent the request) before the app reads
    a request's body: FastAPI reads and parses a JSON body before it runs an endpoint's dependencies, so a client without
    the token made the server parse up to the JSON limit on its event loop (six 14 MiB prompts: 8 s in which no one
    else was answered, 600 MB) and was told its JSON was broken before it was told it lacked the token.

    ``check`` raises the :class:`ServerError` to answer. A refused body is read and dropped up to the JSON limit first,
    so a client still sending it gets the answer rather than a reset (no more: a refused upload is not read at all)."""

    def __init__(self, app: Any, check: Any, render: Any, routes: List[Any]) -> None:
        self.app = app
        self.check = check
        self.render = render
        self.routes = routes

    async def __call__(self, scope: Dict[str, Any], receive: Any, send: Any) -> None:
        if (scope["type"] != "http" or scope.get("path") in OPEN_PATHS
                or all(route.matches(scope)[0] == Match.NONE for route in self.routes)):  # 404 for what is not here
            await self.app(scope, receive, send)
            return
        try:
            self.check(Request(scope))
        except ServerError as exc:
            seen = 0
            while seen <= JSON_BODY_LIMIT:
                message = await receive()
                if message["type"] != "http.request" or not message.get("more_body", False):
                    break
                seen += len(message.get("body", b""))
            await self.render(exc)(scope, receive, send)
            return
        await self.app(scope, receive, send)


class InternalErrorMiddleware:
    """An exception no handler answered (not a :class:`ServerError`, ``ValueError`` or HTTP error; a ``ValueError``
    a library raised is answered the same way by its handler): ``500 internal``
    naming the request only (:func:`engine.server.state.client_text`: the exception and its traceback go to the
    server's log, never to the client).

    A middleware rather than an exception handler for ``Exception``: Starlette re-raises after such a handler, so the
    ASGI server would print the same traceback a second time. An exception after the answer began cannot be
    answered; it goes on to the ASGI server, which logs it and closes the connection.
    """

    def __init__(self, app: Any, paths: ServerPaths) -> None:
        self.app = app
        self.paths = paths

    async def __call__(self, scope: Dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watched_send(message: Dict[str, Any]) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watched_send)
        except ClientDisconnect:  # the client went away mid-upload: nobody to answer, nothing failed here
            logging.getLogger("mambahome.server").info(
                "the client disconnected during %s", _request_name(scope.get("method", ""), scope.get("path", "")))
        except Exception as exc:  # noqa: BLE001 - told to the client in a sentence, logged in full
            if started:
                raise
            request = _request_name(scope.get("method", ""), scope.get("path", ""))
            detail = client_text(exc, f"the server failed to answer {request}", self.paths)
            await _error(500, "internal", detail)(scope, receive, send)


def _loopback_host(host: str) -> bool:
    """Whether a ``Host`` header (``127.0.0.1:8765``, ``localhost``, ``[::1]:8765``) names this computer."""
    host = host.strip()
    port = ""
    if host.startswith("["):
        host, _, rest = host[1:].partition("]")
        if rest:
            if not rest.startswith(":"):
                return False
            port = rest[1:]
    elif host.count(":") == 1:
        host, port = host.rsplit(":", 1)
    elif ":" in host:
        return False  # an IPv6 address must be in brackets in a Host header
    if port and not port.isdigit():  # "127.0.0.1:8765@evil.com" names no port: not this computer's address
        return False
    return is_loopback(host.rstrip("."))


def _refuse_browsers(request: Request) -> None:
    """For a server without a token: 403 for a request from a web page. Its only protection is that it listens on
    127.0.0.1, and a browser on this computer reaches that too: any page may send a cross-site POST that needs no
    preflight (a rollback, an upload of text), and a page whose host name is re-bound to 127.0.0.1 (DNS rebinding) is
    same-origin, reading answers as well. Browsers send ``Origin`` with such requests and name the page's host in
    ``Host``; napari, 3D Slicer and scripts send no ``Origin`` and address 127.0.0.1 or localhost."""
    origin = request.headers.get("origin")
    if origin is not None:
        shown = repr(origin)[:80]
        raise ServerError(403, "forbidden", f"this server has no token and answers no web page (this request came "
                          f"from the page {shown}); to use it from a browser, start it with --token-file",
                          sent=(shown,))
    host = request.headers.get("host")
    if host is not None and not _loopback_host(host):
        shown = repr(host)[:80]
        raise ServerError(403, "forbidden", f"this server has no token and answers only requests addressed to this "
                          f"computer (127.0.0.1 or localhost), not to {shown} (as a web page re-bound to 127.0.0.1 "
                          "addresses it): connect to http://127.0.0.1:<port>, or start the server with --token-file",
                          sent=(shown,))


def _request_name(method: str, path: str) -> str:
    """``POST /sessions/abc/segment`` for messages and the log, control characters of the path escaped."""
    return repr(f"{method} {path}")[1:-1]


def _error(status: int, code: str, detail: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": code, "detail": detail})


async def check_json_keys_once(request: Request) -> None:
    """Refuse a JSON body in which an object names a key twice (``{"voxel": [1, 2, 3], "voxel": [9, 9, 9]}``): JSON
    readers keep the last without a word, so the request did something other than a reader of it sees. A body that is
    not JSON is left to FastAPI's own answer."""
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
        return
    repeated: List[str] = []

    def pairs(items: List[Tuple[str, Any]]) -> Dict[str, Any]:
        seen = set()
        for key, _ in items:
            if key in seen and key not in repeated:
                repeated.append(key)
            seen.add(key)
        return dict(items)

    try:
        json.loads(await request.body(), object_pairs_hook=pairs)
    except (ValueError, RecursionError):
        return
    if repeated:
        raise ServerError(400, "invalid_request",
                          f"{request.method} {request.url.path}: the JSON body names "
                          + ", ".join(repr(k[:40]) for k in repeated[:5]) + " more than once; send each key once")


class StrictBody(BaseModel):
    """A JSON body whose unknown keys are refused (``422 invalid_request`` naming each), as fine-tune settings are: a
    typo (``{"model": "hip"}`` for ``model_id``) segmented with the active model and answered 200."""

    model_config = ConfigDict(extra="forbid")


class SelectBody(StrictBody):
    model_id: str


class SegmentBody(StrictBody):
    model_id: Optional[str] = None


Voxel = Annotated[List[StrictInt], Field(min_length=3, max_length=3)]
"""Three voxel indices ``[i, j, k]``: another count is a 422 naming the field (``body.voxel``), as a wrong type is."""


class PromptBody(StrictBody):
    """Strict types: lax parsing read ``"voxel": [true, 1, 2]`` as [1, 1, 2] and ``["7", 1, 2]`` as [7, 1, 2], and
    ``"positive": "no"`` as False, so a client's bug drew a prompt somewhere instead of being named.

    Which fields a prompt type needs is checked by :func:`_check_prompt_fields` (one model for every type): a point
    without ``positive`` was taken as a positive click, one without ``voxel`` got ``400 invalid_prompt``, while the
    protocol lists both as required."""

    type: StrictStr
    positive: Optional[StrictBool] = None  # required by point, box and scribble (_check_prompt_fields)
    voxel: Optional[Voxel] = None
    corner_a: Optional[Voxel] = None
    corner_b: Optional[Voxel] = None
    voxels: Optional[Annotated[List[Voxel], Field(min_length=1)]] = None
    # a scribble's voxels: a drawn stroke's points, joined by straight lines (true), or a painted stroke's voxels as
    # they are (false): joined, the voxels of a curved painted stroke in raster order filled its inside
    joined: StrictBool = True
    model_id: Optional[StrictStr] = None  # the promptable model to answer with; None: the server's rule


class FinetuneBody(StrictBody):
    steps: StrictInt = 200  # strict: "5" is refused, as fine-tune settings are (engine.server.state.finetune_setting)
    lr: Optional[Union[StrictInt, StrictFloat]] = None
    model_id: Optional[str] = None
    settings: Dict[str, Any] = {}
    compare_with: Optional[str] = None


def _pack_response(array: np.ndarray, meta: Dict[str, Any]) -> Response:
    return Response(content=pack_array(array, meta), media_type=PACK_MEDIA_TYPE)


async def _body(request: Request) -> bytes:
    """The whole body, checked against its Content-Length. Grown as the pieces arrive, not allocated at the declared
    size first: a client declaring the upload limit (2 GiB) and sending a byte made the server allocate 2 GiB per
    connection. ``bytearray +=`` grows in place (no list of pieces + join at twice the size)."""
    declared = request.headers.get("content-length")
    if declared is None or not declared.isdigit():
        return await request.body()
    expected = int(declared)
    buf = bytearray()
    async for piece in request.stream():
        if len(buf) + len(piece) > expected:
            raise ServerError(400, "invalid_request", "the body is longer than its Content-Length")
        buf += piece
    if len(buf) != expected:
        raise ServerError(400, "invalid_request", f"the body ended after {len(buf)} of {expected} bytes")
    return buf  # type: ignore[return-value]


def _pack_refused(exc: PackError, what: str, max_voxels: int) -> ServerError:
    """A pack the wire module refused, as a 400 naming what the pack was: the wire module's messages say what is wrong
    with it, but it lies outside the engine (``mambahome_client``), so its errors reach clients only wrapped in the
    server's own (:func:`engine.server.state.is_user_facing`). One over the size limit is a 422 in voxels, as any
    other volume over ``--max-voxels`` is: "larger than the limit 0 MiB" said nothing of the setting."""
    if isinstance(exc, PackTooLargeError):
        return ServerError(422, "too_many_voxels", str(too_many_voxels(what, exc.shape, max_voxels)))
    return ServerError(400, "invalid_input", f"{what}: {exc}")


def _pack_bytes(max_voxels: int) -> int:
    """The largest array a pack may declare: ``max_voxels`` of the widest dtype (8 bytes), checked before it is
    allocated; the voxels themselves are counted when the volume is made."""
    return max_voxels * 8


def _off_grid(noun: str, shape: Any, s: Any) -> ServerError:
    verb = "does" if noun == "initial mask" else "do"
    return ServerError(400, "invalid_input", f"{noun} of shape {tuple(shape)!r:.120} {verb} not lie on the session's "
                                             f"volume '{s.name}' of shape {s.shape}")


PACK_FORMAT_KEYS = frozenset({"dtype", "shape", "codec"})
"""What every pack header holds (:func:`mambahome_client.wire.pack_parts`); each endpoint names the keys it reads."""


def _check_pack_keys(meta: Dict[str, Any], reads: Sequence[str], what: str) -> None:
    """Refuse a pack header key this endpoint does not read, as a JSON body's unknown key is refused (StrictBody): a
    misspelt ``case_ID`` saved the case under the upload's name, answered 200."""
    unknown = sorted(set(meta) - PACK_FORMAT_KEYS - set(reads))
    if unknown:
        raise ServerError(400, "invalid_input",
                          f"{what}: the pack header holds {', '.join(repr(k[:40]) for k in unknown[:5])}, which this "
                          f"request does not read; it reads {', '.join(repr(k) for k in reads)}")


async def _unpack_on(s: Any, body: bytes, max_voxels: int, noun: str) -> Tuple[np.ndarray, Dict[str, Any]]:
    """A pack of ``noun`` (labels, an initial mask) for session ``s``, unpacked in a worker thread (inflating a zlib
    label map takes seconds for a large volume, which on the event loop stalled every other request). It must lie on
    the session's grid, so a zlib payload is inflated no further than the session's volume (8 bytes a voxel), not the
    server's largest: a 1 MB pack declaring 512^3 float64 took 2 GB of a server holding a 35 x 51 x 35 session before
    its shape was refused. A broken pack is a 400 naming what it was."""
    try:
        array, meta = await run_in_threadpool(unpack_array, body, math.prod(s.shape) * 8)
    except PackTooLargeError as exc:
        raise _off_grid(noun, exc.shape, s) from exc
    except PackError as exc:
        raise _pack_refused(exc, f"the {noun} for {s.name}", max_voxels) from exc
    if tuple(array.shape) != s.shape:
        raise _off_grid(noun, array.shape, s)
    return array, meta


async def _receive_pack(request: Request, max_voxels: int, what: str) -> Tuple[np.ndarray, Dict[str, Any]]:
    """A pack body decoded while it arrives: a raw array is written straight into its own memory,
    after its header (dtype, shape, size limit, Content-Length) was checked. A broken pack is a 400 naming
    ``what`` it was."""
    declared = request.headers.get("content-length")
    receiver = PackReceiver(max_bytes=_pack_bytes(max_voxels),
                            total=int(declared) if declared and declared.isdigit() else None)
    pieces = request.stream()
    try:
        async for piece in pieces:
            receiver.feed(piece)
    except PackError as exc:
        # Read (and drop) the rest, so the client, still sending, gets this answer and not a reset.
        async for _ in pieces:
            pass
        raise _pack_refused(exc, what, max_voxels) from exc
    try:
        # in a worker thread: a zlib payload is inflated here (up to max_bytes, seconds for a large volume), and on the
        # event loop that stalled every other request meanwhile, /health included
        return await run_in_threadpool(receiver.finish)
    except PackError as exc:
        raise _pack_refused(exc, what, max_voxels) from exc


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    yield
    jobs = app.state.jobs
    if jobs.closing:  # told to stop (`mambahome serve`'s Ctrl-C): the jobs end at their next step; waited for here,
        # before Python's exit kills their threads inside torch (a segmentation fault instead of exit code 0)
        left = await asyncio.to_thread(jobs.wait_ended, SHUTDOWN_WAIT_S)
        if left:
            log.warning("fine-tune job(s) %s did not stop within %g s; their runs are set aside at the next start",
                        ", ".join(left), SHUTDOWN_WAIT_S)


def create_app(config: ServerConfig) -> FastAPI:
    """The server's FastAPI app for ``config`` (validated here)."""
    config.validate()
    # no /docs, /redoc or /openapi.json: only /health and /version answer without the token
    app = FastAPI(title="MambaHoME server", version=engine.__version__, docs_url=None, redoc_url=None,
                  openapi_url=None, lifespan=_lifespan)
    gpu = GpuLock(config.busy_wait_s, config.device)
    releaser = MemoryReleaser()
    sessions = SessionStore(config.max_sessions, config.idle_timeout_s, on_drop=releaser.request,
                            max_per_client=config.max_sessions_per_client)
    sessions.start_reaper()
    # interrupted fine-tunes set aside before the registry lists the models and chooses the active one
    set_aside = set_aside_interrupted_runs(Path(config.models_dir) if config.models_dir else None)
    models = ModelRegistry(config.models_dir, config.device)
    jobs = JobManager(gpu, models, config.cases_dir, config.device, set_aside=set_aside)
    app.state.config, app.state.gpu, app.state.sessions, app.state.models, app.state.jobs = (
        config, gpu, sessions, models, jobs)
    app.state.releaser = releaser
    token = config.token.encode("utf-8") if config.token else None

    # ------------------------------------------------------------------ errors
    # What a client is told of a failure is decided by engine.server.state.client_text: the message of a deliberate
    # error (server paths in it named as clients know them), else only what failed (InternalErrorMiddleware).
    paths = jobs.paths

    @app.exception_handler(ServerError)
    async def _server_error(_: Request, exc: ServerError) -> JSONResponse:
        # some carry an engine message (a refused prompt); what the client sent is told back as sent
        return _error(exc.status, exc.code, paths.name(str(exc), exc.sent))

    @app.exception_handler(ValueError)  # VolumeError, CaseStoreError, PackError, CheckpointError: bad input
    async def _value_error(request: Request, exc: ValueError) -> JSONResponse:
        request_name = _request_name(request.method, request.url.path)
        if not is_user_facing(exc):  # raised inside a library (numpy, torch, ...): not bad input, a failure
            return _error(500, "internal", client_text(exc, f"the server failed to answer {request_name}", paths))
        if isinstance(exc, TooManyVoxelsError):  # a setting of this server, not a broken upload
            return _error(422, "too_many_voxels", client_text(exc, request_name, paths))
        return _error(400, "invalid_input", client_text(exc, request_name, paths))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != "application/json" and any(tuple(e.get("loc", ())) == ("body",) for e in errors):
            # FastAPI reads a body of another content type as no JSON at all: "body: Input should be a valid
            # dictionary" said nothing of the header that was wrong
            return _error(415 if content_type else 422, "invalid_request",
                          f"{request.method} {request.url.path} takes a JSON object: send it with 'Content-Type: "
                          f"application/json' (got {content_type or 'no Content-Type'!r:.60})")
        broken = next((e for e in errors if e.get("type") == "json_invalid"), None)
        if broken is not None:
            # FastAPI's own words were "body.31: JSON decode error": the 31 is where the JSON breaks
            where = broken.get("loc", ())[-1] if len(broken.get("loc", ())) > 1 else None
            reason = (broken.get("ctx") or {}).get("error")
            return _error(400, "invalid_json", f"{request.method} {request.url.path}: the body is not valid JSON"
                          + (f" ({reason}" if reason else "") + (f" at character {where}" if where is not None else "")
                          + (")" if reason else "") + "; send one JSON object")
        parts = [f"{'.'.join(str(x) for x in e.get('loc', ()))}: {e.get('msg')}" for e in errors]
        return _error(422, "invalid_request", "; ".join(parts) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and exc.__cause__ is not None:
            # FastAPI's 400 for a JSON body its reader raised on other than a syntax error, in FastAPI's words "There
            # was an error parsing the body", which said neither what nor why
            cause = exc.__cause__
            why = ("it nests arrays or objects too deeply" if isinstance(cause, RecursionError)
                   else "it is not UTF-8 text" if isinstance(cause, UnicodeDecodeError)
                   else "it holds a number of more than 4300 digits" if "digits" in str(cause)
                   else "the server's JSON reader refused it")
            return _error(400, "invalid_request", f"{request.method} {request.url.path}: the body is not JSON this "
                                                  f"server reads ({why}); send one JSON object")
        code = {400: "invalid_request", 404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "error")
        return _error(exc.status_code, code, str(exc.detail))

    # ------------------------------------------------------------------ checks
    def check_access(request: Request) -> None:
        """Protocol version first (a clear 426, not a 502), then the token in constant time."""
        sent = request.headers.get(PROTOCOL_HEADER)
        if sent is not None and sent.strip() != str(PROTOCOL_VERSION):
            raise ServerError(426, "protocol_mismatch",
                              f"this server (napari-mambahome {engine.__version__}) speaks MambaHoME protocol "
                              f"{PROTOCOL_VERSION}; the client speaks {sent.strip()!r}: install matching versions "
                              "of the server and the client/plugin")
        if token is None:
            _refuse_browsers(request)
            return
        auth = request.headers.get("authorization", "")
        if not auth.lower().startswith("bearer ") or not auth[7:].strip():
            raise ServerError(401, "unauthorized", "this server needs a token: send 'Authorization: Bearer <token>'")
        if not hmac.compare_digest(auth[7:].strip().encode("utf-8"), token):
            raise ServerError(403, "forbidden", "the token is wrong")

    guarded = [Depends(check_access)]
    # a JSON body's keys, each once: a second "voxel" silently replaced the first (JSON readers keep the last)
    json_guarded = guarded + [Depends(check_json_keys_once)]

    # ------------------------------------------------------------------ server
    @app.get("/health")
    def health() -> Dict[str, Any]:
        return {"status": "ok", "sessions": len(sessions), "busy": gpu.holder is not None}

    @app.get("/version")
    def version() -> Dict[str, Any]:
        interactive = _interactive_available()
        return {"server": "mambahome", "version": engine.__version__, "protocol": PROTOCOL_VERSION,
                "auth": token is not None,
                "capabilities": ["segment", "cases", "models"] + (["interactive"] if interactive else [])
                # "finetune_stop": POST /finetune/{job}/stop exists (a client greys out its Stop and keep on a
                # server before it, rather than learning so from a 404 once the user pressed it)
                + (["finetune", "finetune_stop"] if config.models_dir and config.cases_dir else []),
                "upload_formats": ["nifti", "nrrd", "pack"],
                "limits": {"max_upload_bytes": config.max_upload_bytes, "max_voxels": config.max_voxels,
                           "max_json_bytes": min(config.max_upload_bytes, JSON_BODY_LIMIT),
                           "max_sessions": config.max_sessions, "idle_timeout_s": config.idle_timeout_s,
                           "max_sessions_per_client": config.max_sessions_per_client,
                           "body_timeout_s": config.body_timeout_s}}

    # ------------------------------------------------------------------ models
    @app.get("/models", dependencies=guarded)
    def list_models() -> Dict[str, Any]:
        return models.listing()

    @app.post("/models/select", dependencies=json_guarded)
    def select_model(body: SelectBody) -> Dict[str, Any]:
        return models.select(body.model_id)

    @app.post("/models/rollback", dependencies=guarded)
    def rollback_model() -> Dict[str, Any]:
        return models.rollback()

    # ------------------------------------------------------------------ sessions
    @app.get("/sessions/room", dependencies=guarded)
    def session_room(request: Request) -> Dict[str, Any]:
        """200 when this client could open a session now, else the 429/503 ``POST /sessions`` gives. That refusal
        comes before the upload is read and the connection closes under the client's upload: a client whose send
        broke asks here for the reason (urllib cannot read an answer once its send failed)."""
        sessions.check_room(request.client.host if request.client else None)
        return {"room": True}

    @app.post("/sessions", dependencies=guarded)
    async def create_session(request: Request, format: str = "nifti", name: Optional[str] = None,
                             modality: Optional[str] = None) -> Dict[str, Any]:
        owner = request.client.host if request.client else None
        with sessions.room(owner):  # a place held while the upload is read: others are refused at once
            if (format or "").lower() == "pack":
                array, meta = await _receive_pack(request, config.max_voxels, display_name(name, "the uploaded pack"))
                _check_pack_keys(meta, ("affine", "name", "modality"), "POST /sessions")
                if name:  # ?name= names the volume for every format (as ?modality= does), over the pack's own
                    meta = {**meta, "name": name}
                vol, label, pack_modality = await run_in_threadpool(volume_from_array, array, meta, config.max_voxels)
                del array
            else:
                body = await _body(request)
                vol, label, pack_modality = await run_in_threadpool(decode_upload, body, format, name,
                                                                    config.max_voxels)
                del body
            # The client's word first, then the pack's, then the file's own (a DICOM/NRRD tag, or CT guessed from
            # Hounsfield units): without it a CT sent as plain NIfTI was segmented by the model's default rule.
            given = _modality_name(modality, "'modality'") or _modality_name(pack_modality, "the pack's 'modality'")
            if given is not None:
                chosen, source = given, "client"
                # a name no intensity rule has (XRAY, PET, a typo such as TC) is taken as "other", and said so: in the
                # answer's notes, and with every segmentation of the session (the volume's notes)
                from_query = _modality_name(modality, "'modality'") is not None
                note = _unknown_modality_note(modality if from_query else pack_modality,
                                              "?modality=" if from_query else "the pack's 'modality'")
                if note:
                    vol.notes = list(vol.notes) + [note]
            elif vol.modality:
                chosen, source = normalize_modality(vol.modality), vol.modality_source
            else:
                chosen, source = None, None
            s = sessions.create(vol, label, chosen, source, owner=owner, holding_place=True)
        return {"session_id": s.session_id, "name": s.name, "shape": list(vol.shape), "revision": s.revision,
                "affine": vol.affine.tolist(), "spacing": list(vol.spacing), "expires_after_s": config.idle_timeout_s,
                "modality": s.modality, "modality_source": source, "notes": [paths.name(n) for n in vol.notes]}

    @app.delete("/sessions/{session_id}", dependencies=guarded)
    def close_session(session_id: str) -> Dict[str, Any]:
        sessions.close(session_id)  # the store's on_drop asks the releaser for a pass
        return {"closed": session_id}

    @app.post("/sessions/{session_id}/segment", dependencies=json_guarded)
    def segment(session_id: str, body: SegmentBody) -> Response:
        s = sessions.get(session_id)
        with s.working(config.busy_wait_s):
            entry = models.get(body.model_id)
            if entry.task == "interactive":
                # refused here in the server's own words: the engine's refusal names its command line and napari,
                # which a Slicer or script user of the server does not have
                raise ServerError(400, "not_segmentation",
                                  f"model {entry.model_id!r} is a promptable (interactive) model: it segments one "
                                  "object from prompts, not a whole volume. Segment with an automatic model (GET "
                                  "/models lists each model's task; name one as model_id, or make it the active one), "
                                  f"or send this model prompts (POST /sessions/{session_id}/prompts)",
                                  sent=(f"/sessions/{session_id}/prompts",))  # an endpoint, not a server path
            # the model runs on the volume resampled to its spacing, which may be far larger than the upload the
            # voxel limit counted: refused from the geometry, before the GPU lock is taken or a model loads
            check_network_voxels(s.name, s.shape, s.affine, entry.metadata, entry.model_id, config.max_voxels)
            try:
                pred = gpu.run(f"segmenting session {session_id[:6]}",
                               lambda: models.predictor(entry.model_id).predict(
                                   s.volume, modality=s.modality, cancel=AnyCancelToken(gpu.closing, s.closed)))
            except Cancelled:
                if s.closed.cancelled:  # DELETE /sessions/{id} (or its expiry) while it was segmented
                    raise not_found(f"session {session_id!r} was closed while it was being segmented; the "
                                    "segmentation was stopped and nothing was kept") from None
                raise
            except ValueError as exc:  # the engine names a volume without a file "<in-memory volume>"
                if is_user_facing(exc) and "<in-memory volume>" in str(exc):
                    raise ServerError(400, "invalid_input", str(exc).replace("<in-memory volume>", s.name)) from None
                raise
            # a modality the model never saw (or another modality's intensity rule): said, never refused
            warning = modality_warning(entry.metadata, s.source.data, name=s.name, declared=s.modality,
                                       declared_source=s.modality_source, applied=s.modality)
            # What the user should know besides doubts about the result: the volume's own notes (a NIfTI whose qform
            # and sform disagree: 3D Slicer places it elsewhere than the engine, engine.io.Volume.notes), then the
            # prediction's fallbacks (out of memory, CPU). Told with every segmentation: the upload's answer may have
            # been read by another program than the one showing the result.
            notes = [paths.name(n) for n in list(s.source.notes) + list(pred.notes)]
            doubts = _image_doubts(s.source.data, s.name)
        s.labels, s.model_id = pred.labels, entry.model_id
        return _pack_response(pred.labels, {
            "class_names": pred.class_names, "colors": entry.metadata.get("class_colors"),
            "model_id": entry.model_id, "model_version": entry.metadata.get("version"),
            "seconds": pred.seconds, "device": pred.device_used, "notes": notes,
            "warnings": list(pred.warnings) + doubts + ([warning] if warning else []), "affine": s.affine.tolist()})

    @app.post("/sessions/{session_id}/prompts", dependencies=json_guarded)
    def prompt(session_id: str, body: PromptBody) -> Response:
        _check_prompt_fields(body)  # a 422 as for a wrong type, before the session is looked at
        s = sessions.get(session_id)
        with s.working(config.busy_wait_s):
            before = (s.interactive, s.interactive_model)
            interactive = _interactive_session(s, body.model_id)
            try:
                from engine.interactive import InteractionError
            except ImportError:  # pragma: no cover - _interactive_session raised already
                InteractionError = ValueError  # type: ignore[misc,assignment]
            t0 = time.perf_counter()
            try:
                with _restored_on_error(s, before):
                    update = gpu.run(f"prompt on session {session_id[:6]}", _apply_prompt, interactive, body, s.shape)
            except InteractionError as exc:
                raise ServerError(400, "invalid_prompt", str(exc)) from None
            engine_s = time.perf_counter() - t0
            model_id = s.interactive_model
            s.revision += 1  # still under the session's lock: two clients' prompts get distinct numbers
            revision = s.revision
        mask = np.asarray(update.mask).astype(np.uint8)
        return _pack_response(mask, {"bbox": bbox_to_json(update.bbox), "engine_s": engine_s,
                                     "latency_s": float(getattr(update, "latency_s", engine_s)),
                                     "model_id": model_id, "revision": revision})

    @app.get("/sessions/{session_id}/object", dependencies=guarded)
    def read_object(session_id: str) -> Response:
        """The prompted object as the server holds it now (the whole mask; all zeros before any prompt) and its
        revision: how a client resynchronises after another client changed the session."""
        s = sessions.get(session_id)
        with s.working(config.busy_wait_s):
            shape = s.shape
            mask = (np.zeros(shape, np.uint8) if s.interactive is None
                    else np.asarray(s.interactive.mask).astype(np.uint8))
            model_id, revision = s.interactive_model, s.revision
        return _pack_response(mask, {"bbox": bbox_to_json(tuple(slice(0, int(n)) for n in shape)), "engine_s": 0.0,
                                     "latency_s": 0.0, "model_id": model_id, "revision": revision})

    @app.post("/sessions/{session_id}/initial-mask", dependencies=guarded)
    async def initial_mask(session_id: str, request: Request) -> Response:
        s = sessions.get(session_id)
        mask, meta = await _unpack_on(s, await _body(request), config.max_voxels, "initial mask")
        _check_pack_keys(meta, ("model_id",), f"the initial mask for {s.name}")
        model_id = meta.get("model_id")
        if model_id is not None and not isinstance(model_id, str):
            raise ServerError(400, "invalid_input", f"the pack's 'model_id' must be a string, got {model_id!r}")

        def apply() -> Any:
            from engine.interactive import InteractionError

            with s.working(config.busy_wait_s):
                before = (s.interactive, s.interactive_model)
                interactive = _interactive_session(s, model_id)
                t0 = time.perf_counter()
                try:
                    with _restored_on_error(s, before):
                        update = interactive.set_initial_mask(mask)
                except InteractionError as exc:
                    raise ServerError(400, "invalid_prompt", str(exc)) from None
                s.revision += 1
                return update, time.perf_counter() - t0, s.interactive_model, s.revision

        update, engine_s, used, revision = await run_in_threadpool(apply)
        return _pack_response(np.asarray(update.mask).astype(np.uint8),
                              {"bbox": bbox_to_json(update.bbox), "engine_s": engine_s, "latency_s": engine_s,
                               "model_id": used, "revision": revision})

    def _interactive_session(s: Any, model_id: Optional[str] = None) -> Any:
        """The session's prompt state for ``model_id`` (None: the registry's rule). A prompt naming
        another model than the state was built with starts a new object with that model: prompt
        histories of two models do not mix. Call with ``s.lock`` held."""
        try:
            from engine.interactive import InteractionError, InteractiveSession
        except ImportError:
            raise ServerError(501, "not_available", "interactive prompting not available on this server "
                                                    "(engine.interactive is not installed)") from None
        entry = models.prompt_entry(model_id)  # 404 unknown, 400 not promptable
        if s.interactive is not None and s.interactive_model == entry.model_id:
            return s.interactive
        # the voxel limit on the grid at the model's spacing, as for a segmentation: a prompt resamples only its window,
        # but a volume that the model's spacing makes larger than the limit (nearly always a header in the wrong unit:
        # 150 mm voxels) is refused by every model endpoint alike, said before the GPU lock is taken
        check_network_voxels(s.name, s.shape, s.affine, entry.metadata, entry.model_id, config.max_voxels)
        try:
            s.interactive = gpu.run(f"loading the interactive model for session {s.session_id[:6]}",
                                    lambda: InteractiveSession(models.interactive_model(entry), s.volume,
                                                               device=config.device, modality=s.modality))
        except InteractionError as exc:  # the engine calls a volume without a file "<in-memory volume>"
            raise ServerError(400, "invalid_prompt", str(exc).replace("<in-memory volume>", s.name)) from None
        s.interactive_model = entry.model_id
        return s.interactive

    # ------------------------------------------------------------------ cases
    @app.post("/sessions/{session_id}/cases", dependencies=guarded)
    async def save_case(session_id: str, request: Request) -> Dict[str, Any]:
        s = sessions.get(session_id)
        if config.cases_dir is None:
            raise ServerError(501, "not_configured", "this server was started without --cases; it cannot save cases")
        body = await _body(request)
        labels, meta = await _unpack_on(s, body, config.max_voxels, "labels")
        _check_pack_keys(meta, ("class_names", "modality", "case_id", "overwrite", "interactive"),
                         f"the labels for {s.name}")
        case_id = meta.get("case_id")
        if case_id is not None:
            check_id(case_id, CASE_ID, "case id")
        class_names = meta.get("class_names")
        if not isinstance(class_names, list) or not all(isinstance(c, str) for c in class_names):
            raise ServerError(400, "invalid_input", "the pack must carry 'class_names', a list of strings")
        if len(class_names) > MAX_CLASSES:
            raise ServerError(400, "invalid_input", f"the pack carries {len(class_names)} class names, more than the "
                              f"{MAX_CLASSES} a case on this server may have (background included, one per label "
                              "value); merge classes or number the label values from 0 without gaps")
        overwrite = meta.get("overwrite", False)
        if not isinstance(overwrite, bool):  # bool("false") is True: a string would replace a case unasked
            raise ServerError(400, "invalid_input", f"the pack's 'overwrite' must be true or false, got {overwrite!r}")
        modality = _modality_name(meta.get("modality"), "the pack's 'modality'") or s.modality or "other"
        interactive = _interactive_origin(meta.get("interactive"), s, len(class_names))

        def add() -> Dict[str, Any]:
            from engine.cases import CaseExistsError, CaseStore, LabelSetConflictError

            try:
                # the upload as sent (an int16 CT stays int16 in the case), not the models' float32 copy
                rec = CaseStore(config.cases_dir).add(
                    s.source, labels, modality=modality, class_names=class_names, source_file=s.name,
                    model_version=_version_of(s.model_id), case_id=case_id, overwrite=overwrite,
                    interactive=interactive)
            except CaseExistsError:
                # the engine's "pass overwrite=True" is Python: a Slicer or napari user has a case id field
                raise ServerError(409, "case_exists", f"case {case_id!r} already exists in the server's case store; "
                                  "save under another case id, or replace it (the pack's 'overwrite': true)") from None
            except LabelSetConflictError as exc:
                # the engine's "save into another case folder" is not the client's to do: the server has one store
                raise ServerError(
                    409, "label_set_conflict",
                    f"the classes {brief_names(exc.class_names[1:])} differ from those of the server's saved cases "
                    f"(case {exc.case_id!r}: {brief_names(exc.case_classes[1:])}): its case store holds one label set "
                    "(a case may lack classes at the end of the list only); name the classes as its cases do, or "
                    "save these cases on a server started with another --cases folder") from None
            return rec.to_json_dict()

        return await run_in_threadpool(add)

    def _interactive_origin(record: Any, s: Any, num_classes: int) -> Any:
        """The client's ``interactive`` record (which classes it made by prompting), checked by the case
        store's rules; the session's interactive model names the model when the client did not."""
        from dataclasses import replace

        from engine.cases import InteractiveOrigin

        if record is None:
            return None
        origin = InteractiveOrigin.from_json_dict(record, num_classes, f"session {s.name}")  # ValueError -> 400
        if origin.model_version is None and s.interactive_model is not None:
            origin = replace(origin, model_version=_version_of(s.interactive_model),
                             model_name=origin.model_name or s.interactive_model)
        return origin

    def _version_of(model_id: Optional[str]) -> Optional[str]:
        if model_id is None:
            return None
        try:
            return models.get(model_id).metadata.get("version")
        except ServerError:
            return None

    @app.get("/cases", dependencies=guarded)
    def list_cases() -> Dict[str, Any]:
        from engine.cases import CaseStore

        if config.cases_dir is None:
            return {"cases": []}
        return {"cases": [r.to_json_dict() for r in CaseStore(config.cases_dir).list()]}

    # ------------------------------------------------------------------ fine-tuning
    @app.post("/finetune", dependencies=json_guarded)
    def start_finetune(body: FinetuneBody) -> Dict[str, Any]:
        settings = dict(body.settings)
        if body.lr is not None:
            settings["lr"] = body.lr
        return jobs.start(body.steps, body.model_id, settings, compare_with=body.compare_with,
                          max_voxels=config.max_voxels).to_json()

    @app.get("/finetune/{job_id}", dependencies=guarded)
    def job_state(job_id: str) -> Dict[str, Any]:
        return jobs.get(job_id).to_json()

    @app.post("/finetune/{job_id}/cancel", dependencies=guarded)
    def cancel_job(job_id: str) -> Dict[str, Any]:
        return jobs.cancel(job_id).to_json()

    @app.post("/finetune/{job_id}/stop", dependencies=guarded)
    def stop_job(job_id: str) -> Dict[str, Any]:
        return jobs.stop(job_id).to_json()

    # innermost: the body limit and the stall timeout apply to what it drops
    app.add_middleware(AccessMiddleware, check=check_access, routes=app.router.routes,
                       render=lambda exc: _error(exc.status, exc.code, paths.name(str(exc), exc.sent)))
    app.add_middleware(BodyLimitMiddleware, limit=config.max_upload_bytes, timeout_s=config.body_timeout_s)
    app.add_middleware(InternalErrorMiddleware, paths=paths)  # added last: the outermost, around the body limit
    return app


@contextmanager
def _restored_on_error(s: Any, before: Tuple[Any, Optional[str]]) -> Iterator[None]:
    """Put the session's prompt state ``before`` back when the prompt in the block fails. A prompt naming another
    model starts a new object (:func:`create_app`'s ``_interactive_session``) before the prompt itself is checked: a
    refused one (a voxel outside the volume, a flat box, a busy GPU) dropped the previous object's history, so its
    Undo answered "nothing to undo". A refused prompt changes nothing."""
    try:
        yield
    except BaseException:
        s.interactive, s.interactive_model = before
        raise


def _image_doubts(data: np.ndarray, name: str) -> List[str]:
    """What ``predict`` says of its input, said to the client as well: a blank volume (the engine's own warning goes to
    the server's log) and a label map uploaded as the image (a mask segmented without a word). Said, not refused:
    the user may mean it."""
    from engine.io import looks_like_label_map
    from engine.preprocess import label_map_image_message

    if data.size and float(np.min(data)) == float(np.max(data)):
        return [f"{name} is blank: every voxel is {float(np.min(data)):g}, so there is nothing to segment; was the "
                "right volume uploaded?"]
    return [label_map_image_message(name)] if looks_like_label_map(data) else []


def _interactive_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("engine.interactive") is not None


def _modality_name(value: Any, what: str) -> Optional[str]:
    """A client's modality as ``CT``/``MR``/``US``/``other`` (:func:`normalize_modality`); None when not given.

    Raises:
        ServerError: 400 for anything but a short name (a dict, a path, 200 characters).
    """
    if value is None or value == "":
        return None
    if not isinstance(value, str) or not value.strip() or len(value) > 40:
        raise ServerError(400, "invalid_input", f"{what} must be a name such as CT or MR, got {value!r:.60}")
    return normalize_modality(value)


def _unknown_modality_note(value: Any, where: str) -> Optional[str]:
    """The note for a modality name that is none of CT, MR, US (or a name of one, such as MRI or T2w) nor ``other``:
    the session takes it as ``other``, as the command line does (which prints the same note). None for a known name."""
    if not isinstance(value, str) or normalize_modality(value) != "other" or value.strip().lower() == "other":
        return None
    return (f"modality {value.strip()!r:.60} ({where}) is not CT, MR or US (nor a name of one, e.g. MRI, T2w): the "
            "session uses the 'other' intensity rule (0.5-99.5 percentiles); send CT, MR, US or other")


# The fields each prompt type needs, in the order they are named when missing.
PROMPT_FIELDS = {"point": ("voxel", "positive"), "box": ("corner_a", "corner_b", "positive"),
                 "scribble": ("voxels", "positive")}


def _check_prompt_fields(body: PromptBody) -> None:
    """A 422 ``invalid_request`` naming each field the prompt's type needs and the body lacks (``body.positive: Field
    required``), as for a field of the wrong type; an unknown type is left to :func:`_apply_prompt`."""
    missing = [name for name in PROMPT_FIELDS.get(body.type, ()) if getattr(body, name) is None]
    if missing:
        why = {"positive": "true adds to the object, false removes from it",
               "voxel": "[i, j, k]", "corner_a": "[i, j, k]", "corner_b": "[i, j, k]", "voxels": "[[i, j, k], ...]"}
        raise ServerError(422, "invalid_request", "; ".join(
            f"body.{name}: Field required (a {body.type} prompt needs it: {why[name]})"
            if name not in body.model_fields_set else f"body.{name}: must not be null ({why[name]})"
            for name in missing))


def _voxel(v: Optional[List[int]], shape: Any, what: str) -> List[int]:
    if v is None or len(v) != 3:  # checked before (PromptBody, _check_prompt_fields); kept for direct callers
        raise ServerError(400, "invalid_prompt", f"{what} must be three voxel indices [i, j, k]")
    if any(not 0 <= int(x) < int(n) for x, n in zip(v, shape)):
        raise ServerError(400, "invalid_prompt", f"{what} {list(v)} lies outside the volume of shape {tuple(shape)}")
    return [int(x) for x in v]


def _apply_prompt(session: Any, body: PromptBody, shape: Any) -> Any:
    """Call the :class:`engine.interactive.InteractiveSession` method for one prompt."""
    kind = body.type
    if kind == "point":
        return session.add_point(_voxel(body.voxel, shape, "point"), positive=bool(body.positive))
    if kind == "box":
        return session.add_box(_voxel(body.corner_a, shape, "corner_a"), _voxel(body.corner_b, shape, "corner_b"),
                               positive=bool(body.positive))
    if kind == "scribble":
        if not body.voxels:
            raise ServerError(400, "invalid_prompt", "a scribble needs at least one voxel")
        pts = np.asarray([_voxel(v, shape, "scribble voxel") for v in body.voxels], dtype=np.int64)
        if body.joined:
            path = int(np.abs(np.diff(pts, axis=0)).max(axis=1, initial=0).sum()) + 1
            if path > MAX_JOINED_SCRIBBLE_VOXELS:
                raise ServerError(400, "invalid_prompt", f"this scribble's {len(pts)} points, joined by straight lines, "
                                  f"make a stroke of {path} voxels, over this server's limit of "
                                  f"{MAX_JOINED_SCRIBBLE_VOXELS} voxels for one joined scribble; send it in shorter "
                                  "strokes, or its voxels as they are (joined: false)")
        return session.add_scribble(pts, positive=bool(body.positive), joined=body.joined)
    if kind == "undo":
        return session.undo()
    if kind == "reset":
        return session.reset()
    raise ServerError(400, "invalid_prompt", f"unknown prompt type {kind!r}; use point, box, scribble, undo or reset")
