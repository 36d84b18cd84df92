"""HTTP client of the MambaHoME server: urllib, json and numpy only (3D Slicer never needs torch).

Every call raises a :class:`ServerError` subclass carrying the server's own message; a server of
another protocol version is refused at :meth:`Client.connect` with :class:`ProtocolMismatchError`,
before anything else is sent.
"""
from __future__ import annotations

import http.client
import json
import math
import re
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .wire import (MAX_HEADER_BYTES, PACK_MEDIA_TYPE, PROTOCOL_HEADER, PROTOCOL_VERSION, BBox, PackError,
                   bbox_from_json, body_size, class_colors, pack_array, pack_parts, unpack_array)

MAX_FINETUNE_STEPS = 1_000_000
"""The most steps a server's fine-tune job takes (it refuses more); a client asks for them when a time limit
(``settings.max_minutes``) is to end the job."""


MAX_JSON_ANSWER_BYTES = 256 * 2**20
"""The most bytes of a JSON answer this client reads (the longest, ``GET /cases`` of a large store, is a few MiB):
an answer from a broken or compromised server must not take the memory of napari or 3D Slicer."""
MAX_ERROR_ANSWER_BYTES = 1 << 20  # an error's JSON: a message of a few lines
MAX_ANSWER_BYTES = 8 * 2**30
"""The most bytes of an array answer when the session's volume is unknown to this client (a session another client
made); for its own sessions the client allows what the volume's shape can hold (8 bytes a voxel at most)."""


class ServerError(Exception):
    """An error answer of the server (or no answer). ``status`` is the HTTP status (0: unreachable)."""

    def __init__(self, message: str, status: int = 0, code: str = "error") -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class ServerUnavailableError(ServerError):
    """No server answered at the URL (not started, wrong port, tunnel down)."""


class ServerTimeoutError(ServerUnavailableError):
    """The server took the request but sent nothing for ``timeout_s`` seconds (a stopped or overloaded server, an SSH
    tunnel that still accepts connections but no longer reaches it). Whether the server acts on the request later is
    unknown: a stopped server resumed reads it then."""

    def __init__(self, message: str, timeout_s: float) -> None:
        super().__init__(message, status=0, code="timeout")
        self.timeout_s = timeout_s


class AuthError(ServerError):
    """Missing (401) or wrong (403) token."""


class BusyError(ServerError):
    """503: the server's one GPU is in use by another job, or all sessions are taken; retry later."""


class PayloadTooLargeError(ServerError):
    """413: the upload is over the server's size limit."""


class TooManyVoxelsError(ServerError):
    """422 ``too_many_voxels``: the volume has more voxels than the server's ``--max-voxels`` (a connected client
    refuses such a volume itself, before sending it)."""


class ProtocolMismatchError(ServerError):
    """Client and server speak different protocol versions; update the older one."""


class NotFoundError(ServerError):
    """404: no such session, model, case or job (a session may have expired)."""


class SessionChangedError(ServerError):
    """Another client changed this session's prompted object since this client's last answer.

    Raised (not warned) because the answer is a patch (``update.bbox``) meant for the mask this client last saw:
    applied to it, the local mask would silently mix two clients' objects, and a warning in a GUI is easily lost.
    The server did apply this client's change: ``update`` is its answer, ``revision`` the server's revision now,
    ``expected`` the one this client expected (its last + 1). Fetch the whole object with
    :meth:`Client.object_mask` (or :meth:`Client.reset` it) before going on; the client already counts from
    ``revision``, so the next change is checked against it again.
    """

    def __init__(self, message: str, session_id: str, expected: int, revision: int, update: "MaskUpdate") -> None:
        super().__init__(message, status=409, code="session_changed")
        self.session_id, self.expected, self.revision, self.update = session_id, expected, revision, update


_BY_STATUS = {401: AuthError, 403: AuthError, 404: NotFoundError, 413: PayloadTooLargeError, 426: ProtocolMismatchError,
              503: BusyError}


def _bad_answer(method: str, path: str, why: str, status: int = 200) -> "ServerError":
    """A server's answer this client refuses to use (a broken or compromised server): a :class:`ServerError`, so the
    plugins show it as they show the server's own errors."""
    return ServerError(f"{method} {path}: the server's answer is not valid: {why}", status=status,
                       code="invalid_answer")


def _pack_limit(nbytes: int) -> int:
    """Bytes a pack of an array of ``nbytes`` may take: zlib's worst case adds 5 bytes per 16 KiB block."""
    return nbytes + nbytes // 1024 + MAX_HEADER_BYTES + 1024


def _read_bounded(resp: Any, method: str, path: str, limit: int) -> bytes:
    """The body of ``resp``, refused over ``limit`` bytes; one cut short of its Content-Length is refused too
    (http.client's IncompleteRead reached the plugins as an unexplained crash)."""
    length = resp.headers.get("Content-Length")
    declared = int(length) if length is not None and length.strip().isdigit() else None
    if declared is not None and declared > limit:
        raise _bad_answer(method, path, f"it declares {declared} bytes, more than this client reads for it "
                                        f"({limit} bytes)", status=resp.status)
    try:
        if declared is not None:
            data = resp.read(declared)  # a short read is no error to http.client once an amount is asked for
            if len(data) < declared:
                raise _bad_answer(method, path, f"it broke off after {len(data)} bytes of the {declared} it "
                                                "declared", status=resp.status)
            return data
        grown = bytearray()  # no length (chunked, or until the connection closes): read what may come, and one more
        while len(grown) <= limit:
            piece = resp.read(min(limit + 1 - len(grown), 1 << 24))
            if not piece:
                break
            grown += piece
    except http.client.IncompleteRead as exc:
        raise _bad_answer(method, path, f"it broke off after {len(exc.partial)} bytes", status=resp.status) from None
    except http.client.HTTPException as exc:
        raise _bad_answer(method, path, f"{type(exc).__name__}: {exc}", status=resp.status) from None
    if len(grown) > limit:
        raise _bad_answer(method, path, f"it is longer than the {limit} bytes this client reads for it",
                          status=resp.status)
    return bytes(grown)


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _strings(value: Any) -> List[str]:
    """A header's list of messages as strings; ``[]`` when absent (an older server) or not a list."""
    if isinstance(value, str):
        return [value] if value else []
    if not isinstance(value, (list, tuple)):
        return []
    return [str(v) for v in value if v]


_PATH_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")


def _path_id(value: Any, what: str) -> str:
    """``value`` as one segment of a request path; a ValueError, before anything is sent, for an id that would leave its
    segment ("a/b", "x?y=1", "..") and reach another endpoint or query than the one called."""
    text = str(value)
    if not _PATH_ID.fullmatch(text) or text.strip(".") == "":
        raise ValueError(f"invalid {what} {text!r:.80}: an id the server answered has only letters, digits, '.', '_' "
                         "and '-'")
    return text


@dataclass
class SessionInfo:
    """A volume held by the server. ``affine`` is the ``(4, 4)`` RAS voxel-to-world matrix of ``shape`` ``(I, J, K)``."""

    session_id: str
    shape: Tuple[int, int, int]
    affine: np.ndarray
    expires_after_s: float
    modality: Optional[str] = None  # CT, MR, US or other, as the server will use it; None: the model's own rule
    modality_source: Optional[str] = None  # "client", "file" (a tag in the file), "guessed" (Hounsfield units)
    notes: List[str] = field(default_factory=list)  # what the server noticed about the upload (e.g. a NIfTI whose
    # qform and sform disagree, placed differently by 3D Slicer); [] from servers before the field


@dataclass
class Segmentation:
    """An automatic segmentation: ``labels`` ``(I, J, K)`` on the session's grid, value = class index.

    ``warnings`` are the server's words to show the user with the result, e.g. that the model never saw the
    volume's modality (``engine.inference.modality_warning``): the segmentation is made all the same, but may be
    poor. Empty when there is nothing to say, and from servers before the field.

    ``notes`` are what the user should know that casts no doubt on the result: the uploaded file's geometry (a NIfTI
    whose qform and sform disagree: 3D Slicer places it elsewhere than napari and the engine) and the server's
    fallbacks (out of GPU memory, run on the CPU). Empty when there is nothing to say.
    """

    labels: np.ndarray
    class_names: List[str]
    colors: List[Tuple[float, float, float]]
    model_id: str
    model_version: Optional[str]
    seconds: float
    notes: List[str] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)


@dataclass
class MaskUpdate:
    """An interactive prompt's answer: the mask inside ``bbox`` changed to ``mask`` (bool).

    ``model_id`` is the promptable model the server answered with (None from servers before it said so).
    """

    bbox: BBox
    mask: np.ndarray
    latency_s: float
    server_s: float
    model_id: Optional[str] = None
    revision: Optional[int] = None  # the session's object revision after this answer (None: a server before them)

    def apply(self, full_mask: np.ndarray) -> np.ndarray:
        """Write the change into ``full_mask`` ``(I, J, K)`` in place and return it."""
        full_mask[self.bbox] = self.mask
        return full_mask


class Client:
    """A connection to one MambaHoME server.

    Args:
        url: ``http://host:port`` (an SSH tunnel's local end for remote servers).
        token: the server's API token, sent as ``Authorization: Bearer``.
        timeout: seconds to wait for one answer (segmentation of a large volume on a CPU is slow).
        prompt_timeout: seconds to wait for the answer to a prompt (a point, box, scribble, undo, reset, initial
            mask, the object's read): what an annotator waits for, often on a GUI thread. None (default): ``timeout``.
            Like ``timeout`` it bounds each wait for the server (to connect, to take more of the request, to send
            more of its answer), not the whole transfer: a slow link that keeps moving is not cut.
        upload_level: zlib level for uploaded images; 0 (default) sends them raw, fastest on localhost and
            fast links; 1 halves a CT's bytes for slow links at the cost of CPU time.
        check_timeout: seconds to wait for the answer to a request the server answers from what it holds, at once:
            :meth:`health`, :meth:`connect` (the version, then the model list), :meth:`models`, :meth:`select_model`,
            :meth:`rollback_model`, a fine-tune job's state (:meth:`job`) and :meth:`cancel_job`. A server that takes
            the connection and never answers (a stopped process, a dead SSH tunnel) is told apart in that time from one
            that is slow, instead of after ``timeout``. None (default): ``timeout``. Uploads, Segment and the start of
            a fine-tune keep ``timeout``.
    """

    def __init__(self, url: str = "http://127.0.0.1:8765", token: Optional[str] = None, timeout: float = 600.0,
                 upload_level: int = 0, prompt_timeout: Optional[float] = None,
                 check_timeout: Optional[float] = None) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self.prompt_timeout = prompt_timeout
        self.check_timeout = check_timeout
        self.upload_level = int(upload_level)
        self.server_info: Dict[str, Any] = {}
        self._revisions: Dict[str, int] = {}  # session id -> the object revision this client last saw
        self._shapes: Dict[str, Tuple[int, int, int]] = {}  # session id -> its volume's shape, as the server said

    # ------------------------------------------------------------------ transport
    def _request(self, method: str, path: str, body: Union[None, bytes, List[Any]] = None,
                 content_type: Optional[str] = None, query: Optional[Dict[str, Any]] = None,
                 json_body: Any = None, limit: Optional[int] = None,
                 timeout: Optional[float] = None) -> Tuple[bytes, Dict[str, str]]:
        """One HTTP request; ``body`` is bytes or a list of buffers sent one after the other (never joined).
        An answer over ``limit`` bytes is refused (by its Content-Length before it is read, else once ``limit`` bytes
        were read). ``timeout``: seconds to wait for the server (None: :attr:`timeout`); a :class:`ServerTimeoutError`
        after them."""
        limit = MAX_JSON_ANSWER_BYTES if limit is None else limit
        timeout = self.timeout if timeout is None else float(timeout)
        if json_body is not None:
            body = json.dumps(json_body).encode("utf-8")
            content_type = "application/json"
            json_limit = (self.server_info.get("limits") or {}).get("max_json_bytes")
            if json_limit is not None and len(body) > int(json_limit):  # refused unread: say so before sending it
                raise PayloadTooLargeError(f"{method} {path}: {len(body)} bytes is over the server's limit of "
                                           f"{int(json_limit)} bytes for a request that is not an upload (a prompt, a "
                                           "choice, settings); send a scribble in shorter strokes",
                                           status=413, code="too_large")
        target = self.url + path
        if query:
            target += "?" + urllib.parse.urlencode({k: v for k, v in query.items() if v is not None})
        req = urllib.request.Request(target, data=body, method=method)
        req.add_header(PROTOCOL_HEADER, str(PROTOCOL_VERSION))
        if isinstance(body, list):  # a Content-Length keeps urllib from chunking the parts
            req.add_header("Content-Length", str(body_size(body)))
        if content_type:
            req.add_header("Content-Type", content_type)
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return _read_bounded(resp, method, path, limit), {k.lower(): v for k, v in resp.headers.items()}
        except urllib.error.HTTPError as exc:
            try:
                raw = exc.read(MAX_ERROR_ANSWER_BYTES)
            except (http.client.HTTPException, OSError):
                raw = b""
            try:
                payload = json.loads(raw.decode("utf-8"))
                message = str(payload.get("detail") or payload)
                code = str(payload.get("error") or "error")
            except (ValueError, UnicodeDecodeError, AttributeError):
                message, code = (raw.decode("utf-8", "replace")[:300] or exc.reason), "error"
            cls = TooManyVoxelsError if code == "too_many_voxels" else _BY_STATUS.get(exc.code, ServerError)
            raise cls(f"{method} {path}: HTTP {exc.code}: {message}", status=exc.code, code=code) from None
        except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
            reason = getattr(exc, "reason", exc)
            if isinstance(reason, (TimeoutError, socket.timeout)):
                raise ServerTimeoutError(f"the MambaHoME server at {self.url} did not answer within {timeout:g} s "
                                         f"({method} {path}): it may be stopped or overloaded, or the connection to "
                                         "it (an SSH tunnel) may be down", timeout) from None
            if body is not None and isinstance(reason, (BrokenPipeError, ConnectionResetError)):
                # A server that refuses a body by its declared size answers 413 and closes before the
                # rest arrives: the send breaks. Ask for its limit to tell that apart from a dead server.
                self._raise_if_over_limit(method, path, body_size(body) if isinstance(body, list) else len(body),
                                          json_body is not None)
                if method == "POST" and path.rstrip("/") == "/sessions":
                    self._raise_if_no_room()
            raise ServerUnavailableError(f"no MambaHoME server answered at {self.url} ({reason})") from None

    def _raise_if_no_room(self) -> None:
        """The server's 429/503 when it has no session for this client: it refuses a new session before reading the
        upload and closes the connection, so the send breaks before its answer can be read."""
        try:
            self._request("GET", "/sessions/room")
        except ServerError as exc:
            if exc.status in (401, 403, 429, 503):  # an older server has no such endpoint (404): nothing to add
                raise exc from None

    def _raise_if_over_limit(self, method: str, path: str, size: int, is_json: bool = False) -> None:
        try:
            # /version is the endpoint that states the limits (and needs no token); a JSON request has its own
            with urllib.request.urlopen(self.url + "/version", timeout=self.timeout) as resp:
                limits = json.loads(resp.read(MAX_ERROR_ANSWER_BYTES).decode("utf-8")).get("limits") or {}
            limit = limits.get("max_json_bytes" if is_json and "max_json_bytes" in limits else "max_upload_bytes")
        except (OSError, ValueError, AttributeError, http.client.HTTPException):
            return
        if limit is not None and size > int(limit):
            raise PayloadTooLargeError(f"{method} {path}: HTTP 413: {size} bytes is over this server's limit of "
                                       f"{int(limit)} bytes", status=413, code="too_large")

    def _json(self, method: str, path: str, **kw: Any) -> Any:
        raw, _ = self._request(method, path, **kw)
        try:
            return json.loads(raw.decode("utf-8")) if raw else None
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise _bad_answer(method, path, f"not JSON ({type(exc).__name__}: {str(exc)[:200]})") from None

    def _pack_answer(self, method: str, path: str, session_id: str, **kw: Any) -> Tuple[np.ndarray, Dict[str, Any]]:
        """A pack answer about ``session_id``, decoded within what its volume can hold: a broken or compromised server
        cannot make the client allocate more (a header claiming 100 GiB, a zlib bomb), and a broken pack is a
        :class:`ServerError` that says so."""
        nbytes = self._answer_bytes(session_id)
        raw, _ = self._request(method, path, limit=_pack_limit(nbytes), **kw)
        try:
            return unpack_array(raw, max_bytes=nbytes)
        except PackError as exc:
            raise _bad_answer(method, path, str(exc)) from None

    # ------------------------------------------------------------------ server
    def health(self) -> Dict[str, Any]:
        """``{"status": "ok", ...}`` without a token; raises ServerUnavailableError when down."""
        return self._json("GET", "/health", timeout=self.check_timeout)

    def connect(self) -> Dict[str, Any]:
        """Check the server speaks this client's protocol and the token is accepted.

        Returns:
            the server's version and capabilities.

        Raises:
            ProtocolMismatchError, AuthError, ServerUnavailableError.
        """
        info = self._json("GET", "/version", timeout=self.check_timeout)
        if not isinstance(info, dict) or not isinstance(info.get("limits", {}), dict):
            raise _bad_answer("GET", "/version", f"{info!r:.80} is not the server's description")
        try:
            protocol: Optional[int] = int(info.get("protocol", -1))
        except (TypeError, ValueError):
            protocol = None
        if protocol != PROTOCOL_VERSION:
            raise ProtocolMismatchError(
                f"the server at {self.url} speaks MambaHoME protocol {info.get('protocol')} (server version "
                f"{info.get('version')}); this client speaks protocol {PROTOCOL_VERSION}: install matching versions",
                status=426, code="protocol_mismatch")
        self._json("GET", "/models", timeout=self.check_timeout)  # proves the token
        self.server_info = info
        return info

    # ------------------------------------------------------------------ models
    def models(self) -> Dict[str, Any]:
        """``{"active": id, "history": [...], "models": [{"id", "version", "class_names", ...}]}``."""
        return self._json("GET", "/models", timeout=self.check_timeout)

    def select_model(self, model_id: str) -> Dict[str, Any]:
        return self._json("POST", "/models/select", json_body={"model_id": model_id}, timeout=self.check_timeout)

    def rollback_model(self) -> Dict[str, Any]:
        """Go back to the model active before the last selection."""
        return self._json("POST", "/models/rollback", json_body={}, timeout=self.check_timeout)

    # ------------------------------------------------------------------ sessions
    def _session(self, d: Any, expected_shape: Optional[Sequence[int]] = None) -> SessionInfo:
        """The answer of ``POST /sessions``, checked: the plugins allocate masks of its ``shape`` and place layers by
        its ``affine``, so a shape that is not the volume sent or an affine of NaN is refused here, clearly."""
        where = ("POST", "/sessions")
        try:
            sid = _path_id(d["session_id"], "session id")
            shape = d["shape"]
            if not (isinstance(shape, list) and len(shape) == 3 and all(_whole(n) and n >= 1 for n in shape)):
                raise _bad_answer(*where, f"'shape' {shape!r:.80} is not three positive whole numbers")
            shape = tuple(shape)
            if expected_shape is not None and shape != tuple(int(n) for n in expected_shape):
                raise _bad_answer(*where, f"'shape' {shape} is not the shape of the volume sent, "
                                          f"{tuple(int(n) for n in expected_shape)}")
            if math.prod(shape) > MAX_ANSWER_BYTES:
                raise _bad_answer(*where, f"'shape' {shape} is more voxels than this client holds")
            affine = np.asarray(d["affine"], dtype=np.float64)
            if affine.shape != (4, 4) or not np.isfinite(affine).all():
                raise _bad_answer(*where, f"'affine' {d['affine']!r:.120} is not a 4x4 matrix of finite numbers")
            info = SessionInfo(session_id=sid, shape=shape,  # type: ignore[arg-type]
                               affine=affine, expires_after_s=float(d["expires_after_s"]),
                               modality=d.get("modality"), modality_source=d.get("modality_source"),
                               notes=_strings(d.get("notes")))
        except ServerError:
            raise
        except (KeyError, TypeError, ValueError) as exc:  # ValueError: also _path_id's, of an id with a "/"
            raise _bad_answer(*where, f"{type(exc).__name__}: {str(exc)[:200]}") from None
        self._shapes[sid] = shape  # type: ignore[assignment]
        if _whole(d.get("revision")):
            self._revisions[sid] = int(d["revision"])
        return info

    def create_session(self, image_ijk: np.ndarray, affine: np.ndarray, name: str = "volume",
                       modality: Optional[str] = None) -> SessionInfo:
        """Send a volume once: ``image_ijk`` ``(I, J, K)`` and its ``(4, 4)`` RAS voxel-to-world ``affine``.

        Integer images (CT is int16) travel as they are, half the bytes of float32; the server converts.
        """
        image = np.asarray(image_ijk)
        self._check_voxels(image.shape, name)
        if not (np.issubdtype(image.dtype, np.integer) and image.dtype.itemsize <= 2):
            image = image.astype(np.float32, copy=False)
        body = pack_parts(image, {"affine": np.asarray(affine, dtype=np.float64).tolist(), "name": name,
                                  "modality": modality}, level=self.upload_level)
        self._check_upload_size(body_size(body), name)
        return self._session(self._json("POST", "/sessions", body=body, content_type=PACK_MEDIA_TYPE,
                                        query={"format": "pack"}), expected_shape=image.shape)

    def upload_file(self, path: Union[str, Path], modality: Optional[str] = None) -> SessionInfo:
        """Send a NIfTI (``.nii``, ``.nii.gz``) or single-file NRRD (``.nrrd``) file as it is on disk. Other formats
        (DICOM, MHA/MHD, a detached ``.nhdr``): read them (e.g. ``engine.io.load_volume``) and send the voxels and
        affine with :meth:`create_session`."""
        p = Path(path)
        low = p.name.lower()
        if low.endswith((".nii", ".nii.gz")):
            fmt = "nifti"
        elif low.endswith(".nrrd"):
            fmt = "nrrd"
        else:
            raise ValueError(f"{p}: upload_file sends NIfTI (.nii, .nii.gz) or NRRD (.nrrd) files; read other formats "
                             "(DICOM, MHA/MHD, .nhdr) first and send the voxels with create_session(data, affine)")
        self._check_upload_size(p.stat().st_size, p.name)
        return self._session(self._json("POST", "/sessions", body=p.read_bytes(),
                                        content_type="application/octet-stream",
                                        query={"format": fmt, "name": p.name, "modality": modality}))

    def _check_upload_size(self, size: int, name: str) -> None:
        """Refuse locally what the connected server would refuse with 413, before sending any of it."""
        limit = (self.server_info.get("limits") or {}).get("max_upload_bytes")
        if limit is not None and size > int(limit):
            raise PayloadTooLargeError(f"{name}: {size} bytes is over the server's upload limit of {int(limit)} bytes "
                                       f"({int(limit) / 2**20:.0f} MiB); crop or downsample the volume, or start the "
                                       "server with a larger --max-upload-mb", status=413, code="too_large")

    def _check_voxels(self, shape: Sequence[int], name: str) -> None:
        """Refuse locally a volume the connected server would refuse with ``422 too_many_voxels`` once all of it had
        been sent (a pack up to 8 bytes a voxel is read before its voxels are counted)."""
        limit = (self.server_info.get("limits") or {}).get("max_voxels")
        count = int(np.prod([int(s) for s in shape], dtype=object)) if len(shape) else 1
        if limit is not None and len(shape) == 3 and count > int(limit):
            shape = tuple(int(s) for s in shape)
            raise TooManyVoxelsError(f"{name}: {count} voxels {shape} is more than the server at {self.url} accepts "
                                     f"({int(limit)} voxels, its `mambahome serve --max-voxels`); crop or downsample "
                                     "it", status=422, code="too_many_voxels")

    def close_session(self, session_id: str) -> None:
        self._revisions.pop(str(session_id), None)
        self._shapes.pop(str(session_id), None)
        self._json("DELETE", f"/sessions/{_path_id(session_id, 'session id')}")

    def segment(self, session_id: str, model_id: Optional[str] = None) -> Segmentation:
        """Automatic segmentation of the session's volume with the active (or the named) model."""
        path = f"/sessions/{_path_id(session_id, 'session id')}/segment"
        labels, meta = self._pack_answer("POST", path, session_id, json_body={"model_id": model_id})
        try:
            names = meta["class_names"]
            if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
                raise _bad_answer("POST", path, f"'class_names' {names!r:.80} is not a list of names")
            self._check_ids(labels, session_id, "POST", path, "label map")
            if labels.size and (labels.min() < 0 or labels.max() >= len(names)):
                raise _bad_answer("POST", path, f"the label map holds values {labels.min()}..{labels.max()}, but "
                                                f"the answer names {len(names)} classes")
            return Segmentation(labels=labels, class_names=list(names),
                                colors=class_colors(names, meta.get("colors")),
                                model_id=str(meta["model_id"]), model_version=meta.get("model_version"),
                                seconds=float(meta["seconds"]), notes=_strings(meta.get("notes")),
                                warnings=_strings(meta.get("warnings")))
        except ServerError:
            raise
        except (KeyError, TypeError, ValueError, IndexError) as exc:  # a missing field, colours that are no numbers
            raise _bad_answer("POST", path, f"{type(exc).__name__}: {str(exc)[:200]}") from None

    def _check_ids(self, array: np.ndarray, session_id: str, method: str, path: str, what: str,
                   shape: Optional[Sequence[int]] = None) -> None:
        """An answer's labels or mask: integers (a float NaN is no class, and ``NaN != 0`` is True), 3D, on the
        session's grid (``shape``: the whole volume's, when None)."""
        if not (np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_):
            raise _bad_answer(method, path, f"the {what} is of dtype {array.dtype}; labels are whole numbers")
        expected = tuple(shape) if shape is not None else self._shapes.get(str(session_id))
        if array.ndim != 3 or (expected is not None and tuple(array.shape) != tuple(expected)):
            raise _bad_answer(method, path, f"the {what} has shape {tuple(array.shape)}, expected "
                                            f"{expected if expected is not None else 'three axes'}")

    # ------------------------------------------------------------------ prompts
    # Every prompt call takes ``model_id``: the server's promptable model to answer with (``GET /models``,
    # task ``interactive``). None leaves the choice to the server (its active model when promptable, else
    # the user's promptable model, else the bundled one). Naming another model than the session's
    # previous prompts used starts a new object on the server: histories of two models never mix.
    def _prompt(self, session_id: str, prompt: Dict[str, Any], model_id: Optional[str]) -> MaskUpdate:
        if model_id is not None:
            prompt = dict(prompt, model_id=str(model_id))
        t0 = time.perf_counter()
        path = f"/sessions/{_path_id(session_id, 'session id')}/prompts"
        raw, _ = self._request("POST", path, json_body=prompt, limit=self._answer_limit(session_id),
                               timeout=self.prompt_timeout)
        return self._changed(session_id, raw, t0, ("POST", path))

    def _answer_bytes(self, session_id: str) -> int:
        """The largest array an answer about ``session_id`` may declare: its volume at 8 bytes a voxel."""
        shape = self._shapes.get(str(session_id))
        return math.prod(shape) * 8 if shape is not None else MAX_ANSWER_BYTES

    def _answer_limit(self, session_id: str) -> int:
        return _pack_limit(self._answer_bytes(session_id))

    def _update(self, raw: bytes, t0: float, session_id: Optional[str] = None,
                where: Tuple[str, str] = ("POST", "/prompts")) -> MaskUpdate:
        """A mask answer, checked before :meth:`MaskUpdate.apply` writes it into the plugin's mask: its box lies in the
        volume and has the mask's shape (else ``full_mask[bbox] = mask`` failed with numpy's broadcast error, or
        wrote outside the object's box), and its values are integers."""
        try:
            mask, meta = unpack_array(raw, max_bytes=self._answer_bytes(str(session_id)))
        except PackError as exc:
            raise _bad_answer(*where, str(exc)) from None
        volume = self._shapes.get(str(session_id))
        box = meta.get("bbox")
        if not (isinstance(box, list) and len(box) == 3
                and all(isinstance(p, list) and len(p) == 2 and all(_whole(v) for v in p) for p in box)
                and all(0 <= a <= b for a, b in box)
                and (volume is None or all(b <= n for (_, b), n in zip(box, volume)))):
            raise _bad_answer(*where, f"'bbox' {box!r:.120} is not three [start, stop] pairs within the volume "
                                      f"{volume if volume is not None else ''}".rstrip())
        self._check_ids(mask, str(session_id), *where, "mask", shape=[b - a for a, b in box])
        try:
            server_s = float(meta["engine_s"])
        except (KeyError, TypeError, ValueError) as exc:
            raise _bad_answer(*where, f"'engine_s' is missing or no number ({type(exc).__name__})") from None
        revision = meta.get("revision")
        model_id = meta.get("model_id")
        return MaskUpdate(bbox=bbox_from_json(box), mask=mask.astype(bool),
                          latency_s=time.perf_counter() - t0, server_s=server_s,
                          model_id=model_id if isinstance(model_id, str) else None,
                          revision=revision if _whole(revision) else None)

    def _changed(self, session_id: str, raw: bytes, t0: float,
                 where: Tuple[str, str] = ("POST", "/prompts")) -> MaskUpdate:
        """The answer to this client's own change of the object, checked against the revision it last saw."""
        update = self._update(raw, t0, session_id, where)
        key = str(session_id)
        known = self._revisions.get(key)
        if update.revision is None:  # a server without revisions: nothing to check against
            self._revisions.pop(key, None)
            return update
        self._revisions[key] = update.revision
        if known is not None and update.revision != known + 1:
            raise SessionChangedError(
                f"another client changed session {key} on {self.url} since this client's last answer (object "
                f"revision {update.revision}, expected {known + 1}): this client's mask is out of date and the "
                "answer was not applied to it; reset the object (or fetch the server's with Client.object_mask) "
                "before prompting on", key, known + 1, update.revision, update)
        return update

    def revision(self, session_id: str) -> Optional[int]:
        """The object revision of ``session_id`` this client last saw (None: none yet, or a server without them)."""
        return self._revisions.get(str(session_id))

    def object_mask(self, session_id: str) -> MaskUpdate:
        """The session's prompted object as the server holds it now (whole volume; all False before any prompt),
        with its revision, from which this client counts again: how to catch up after a
        :class:`SessionChangedError`, or before prompting on a session another client made."""
        t0 = time.perf_counter()
        path = f"/sessions/{_path_id(session_id, 'session id')}/object"
        raw, _ = self._request("GET", path, limit=self._answer_limit(session_id), timeout=self.prompt_timeout)
        update = self._update(raw, t0, session_id, ("GET", path))
        if update.revision is not None:
            self._revisions[str(session_id)] = update.revision
        return update

    def add_point(self, session_id: str, voxel: Sequence[int], positive: bool = True,
                  model_id: Optional[str] = None) -> MaskUpdate:
        """A click at voxel ``(i, j, k)`` (engine order), answered by ``model_id`` (None: the server's choice)."""
        return self._prompt(session_id, {"type": "point", "voxel": [int(v) for v in voxel], "positive": positive},
                            model_id)

    def add_box(self, session_id: str, corner_a: Sequence[int], corner_b: Sequence[int],
                positive: bool = True, model_id: Optional[str] = None) -> MaskUpdate:
        """A box between two opposite corners ``(i, j, k)`` (inclusive), answered by ``model_id``."""
        return self._prompt(session_id, {"type": "box", "corner_a": [int(v) for v in corner_a],
                                         "corner_b": [int(v) for v in corner_b], "positive": positive}, model_id)

    def add_scribble(self, session_id: str, voxels: np.ndarray, positive: bool = True,
                     model_id: Optional[str] = None, joined: bool = True) -> MaskUpdate:
        """A scribble: voxel indices ``(N, 3)``, answered by ``model_id``: a drawn stroke's points, joined by straight
        lines, or with ``joined=False`` a painted stroke's voxels as they are (in any order)."""
        v = np.asarray(voxels, dtype=np.int64).reshape(-1, 3)
        body = {"type": "scribble", "voxels": v.tolist(), "positive": positive}
        if not joined:  # only when asked: a server older than the field refuses no request it used to take
            body["joined"] = False
        return self._prompt(session_id, body, model_id)

    def set_initial_mask(self, session_id: str, mask_ijk: np.ndarray, model_id: Optional[str] = None) -> MaskUpdate:
        """Start the prompts from an existing mask ``(I, J, K)`` (nonzero = object; undoable), for ``model_id``."""
        t0 = time.perf_counter()
        meta_out = {"model_id": str(model_id)} if model_id is not None else None
        body = pack_array((np.asarray(mask_ijk) != 0).astype(np.uint8), meta_out)
        path = f"/sessions/{_path_id(session_id, 'session id')}/initial-mask"
        raw, _ = self._request("POST", path, body=body, content_type=PACK_MEDIA_TYPE,
                               limit=self._answer_limit(session_id), timeout=self.prompt_timeout)
        return self._changed(session_id, raw, t0, ("POST", path))

    def undo(self, session_id: str, model_id: Optional[str] = None) -> MaskUpdate:
        """Take back the last prompt of ``model_id``'s object."""
        return self._prompt(session_id, {"type": "undo"}, model_id)

    def reset(self, session_id: str, model_id: Optional[str] = None) -> MaskUpdate:
        """Forget the object's prompts (with ``model_id`` named: start a fresh object of that model)."""
        return self._prompt(session_id, {"type": "reset"}, model_id)

    # ------------------------------------------------------------------ cases
    def save_case(self, session_id: str, labels_ijk: np.ndarray, class_names: Sequence[str], modality: Optional[str],
                  case_id: Optional[str] = None, overwrite: bool = False,
                  interactive: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        """Save the session's image with ``labels_ijk`` ``(I, J, K)`` as a training case on the server.

        Args:
            modality: the case's modality; None: the session's (as given at upload or guessed), else "other".
            interactive: which classes were made by prompting: ``{"class_ids": [...], "objects": n,
                "prompts": n, "model_version"?: ..., "model_name"?: ...}`` (the case record notes it;
                the server fills in its session's interactive model when the version is missing).
        """
        meta: Dict[str, Any] = {"class_names": list(class_names), "modality": modality, "case_id": case_id,
                                "overwrite": bool(overwrite)}
        if interactive is not None:
            meta["interactive"] = dict(interactive)
        body = pack_array(np.asarray(labels_ijk).astype(np.uint16 if np.max(labels_ijk, initial=0) > 255 else np.uint8),
                          meta)
        return self._json("POST", f"/sessions/{_path_id(session_id, 'session id')}/cases", body=body,
                          content_type=PACK_MEDIA_TYPE)

    def cases(self) -> List[Dict[str, Any]]:
        return self._json("GET", "/cases")["cases"]

    # ------------------------------------------------------------------ fine-tuning
    def start_finetune(self, steps: int = 200, lr: Optional[float] = None, model_id: Optional[str] = None,
                       compare_with: Optional[str] = None, **settings: Any) -> Dict[str, Any]:
        """Start fine-tuning the active (or named) model on the server's case store; returns the job.

        ``settings`` are the server's fine-tune settings (``batch_size``, ``max_minutes``...); ``task="interactive"``
        on an automatic model makes a promptable model from it (a warm start), which the server then scores with
        its robot user against the promptable model ``compare_with`` (None: the one a prompt naming no model
        uses); any other new model is scored against its parent. The finished job carries ``scores`` and
        ``warning``, or ``not_scored`` when its model was made but not scored."""
        body: Dict[str, Any] = {"steps": steps, "lr": lr, "model_id": model_id, "settings": settings}
        if compare_with is not None:
            body["compare_with"] = compare_with
        return self._json("POST", "/finetune", json_body=body)

    def job(self, job_id: str) -> Dict[str, Any]:
        """``{"job_id", "state", "step", "total", "loss", "message", "error", "model_id", "scores", "warning",
        "not_scored", "note", "stop_requested", "stopped_at"}`` (the new model's before/after scores, see docs/SERVER.md;
        servers before :meth:`stop_job` send neither of the last two)."""
        return self._json("GET", f"/finetune/{_path_id(job_id, 'job id')}", timeout=self.check_timeout)

    def cancel_job(self, job_id: str) -> Dict[str, Any]:
        """Cancel a fine-tune job: its training ends at the next step and nothing is kept (while it scores its new
        model, only the scoring ends: the model was made). Returns the job."""
        return self._json("POST", f"/finetune/{_path_id(job_id, 'job id')}/cancel", json_body={},
                          timeout=self.check_timeout)

    @property
    def can_stop_jobs(self) -> bool:
        """Whether the connected server takes :meth:`stop_job` (its ``finetune_stop`` capability; False before
        :meth:`connect`)."""
        return "finetune_stop" in (self.server_info.get("capabilities") or [])

    def stop_job(self, job_id: str) -> Dict[str, Any]:
        """Stop a fine-tune job's training at the next step and keep the model of that step ("stop and keep"):
        validated, saved and scored as if its time limit had run out then. Returns the job; its final state tells
        what came of it: ``done`` with ``model_id`` and ``stopped_at`` (the step) when a model was kept,
        ``cancelled`` when the stop came before the first step finished (nothing trained, nothing kept). A stop
        asked while the job scores its model changes nothing (the model is kept already). Asking again is harmless.

        Raises:
            NotFoundError: no such job (404). ServerError ``job_ended`` (409): the job ended without a stop asked.
            ServerError ``not_supported``: a connected server older than the stop (no request is sent).
        """
        if self.server_info and not self.can_stop_jobs:
            raise ServerError(f"the server at {self.url} (version {self.server_info.get('version')}) cannot stop a "
                              "fine-tune job and keep its model; cancel it instead, or update the server",
                              status=0, code="not_supported")
        return self._json("POST", f"/finetune/{_path_id(job_id, 'job id')}/stop", json_body={},
                          timeout=self.check_timeout)

    def wait_job(self, job_id: str, poll_s: float = 0.5, timeout: float = 3600.0,
                 on_progress: Optional[Callable[[Dict[str, Any]], None]] = None) -> Dict[str, Any]:
        """Poll until the job is ``done``, ``failed`` or ``cancelled``; returns its last state."""
        end = time.monotonic() + timeout
        while True:
            state = self.job(job_id)
            if on_progress is not None:
                on_progress(state)
            if state["state"] in ("done", "failed", "cancelled"):
                return state
            if time.monotonic() > end:
                raise TimeoutError(f"fine-tune job {job_id} still {state['state']} after {timeout:.0f} s")
            time.sleep(poll_s)
