"""What a server holds between requests: the GPU lock, sessions, the model registry and fine-tune jobs.

Everything here is plain Python with locks (no FastAPI), so it is testable and the HTTP layer in
:mod:`engine.server.app` stays thin.
"""
from __future__ import annotations

import ctypes
import dataclasses
import gc
import importlib.util
import logging
import math
import os
import re
import secrets
import shutil
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from mambahome_client.client import MAX_FINETUNE_STEPS

from engine.checkpoint import modalities_seen, real_scans_since_demo, trained_on_phantoms_only, training_cases
from engine.errors import raised_by_engine
from engine.io import Volume

log = logging.getLogger("mambahome.server")
"""The server's own log: what clients are not told (a failure's exception and traceback) goes here."""


class ServerError(Exception):
    """An answer other than success: HTTP ``status``, a short machine ``code`` and a clear message.

    ``sent``: text of the client's own that the message quotes (an id, a setting's value), told back as sent:
    server paths in a message are named as clients know them (:class:`ServerPaths`), and a model id
    ``'/etc/passwd'`` was told back as "invalid model id 'passwd'", which is not what the client sent."""

    def __init__(self, status: int, code: str, message: str, sent: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.sent = tuple(str(t) for t in sent if t)


SHUTDOWN_WAIT_S = 20.0
"""How long a stopping server waits for its requests (uvicorn's graceful shutdown), then for its fine-tune jobs: each is
told to stop first (a request at its next window, a job at its next step: seconds on a CPU)."""


def shutting_down() -> ServerError:
    return ServerError(503, "shutting_down", "the server is shutting down; this request was stopped unfinished. "
                                             "Send it again once the server is back")


def busy(message: str) -> ServerError:
    return ServerError(503, "busy", message)


def not_found(message: str) -> ServerError:
    return ServerError(404, "not_found", message)


# ----------------------------------------------------------------------------- what clients are told of a failure
USER_FACING = (ServerError, ValueError, FloatingPointError)
"""Exceptions whose message is written for users when the engine raised them (:func:`is_user_facing`). The engine raises
its deliberate errors as ``ValueError`` subclasses (``TrainingDataError``, ``CheckpointError``, ``CaseStoreError``,
``VolumeError``, ...) or plain ``ValueError`` naming the case or file, and a training step whose loss turns non-finite
as ``FloatingPointError`` naming the step; the server's own answers are :class:`ServerError`. Anything else (a
``RuntimeError`` from torch, a ``KeyError``, an ``OSError`` naming server paths) was not written for users:
:func:`client_text` tells clients only what failed."""


def is_user_facing(exc: BaseException) -> bool:
    """The one rule for whether ``exc``'s message was written for users: it is of a :data:`USER_FACING` type and the
    engine raised it (:func:`engine.errors.raised_by_engine`). The same types raised inside numpy, torch, scipy,
    nibabel or MONAI ("operands could not be broadcast together with shapes (3,4) (5,)") were written for nobody and
    may carry internals; the engine wraps the ones a user needs in its own error naming the file or case."""
    return isinstance(exc, USER_FACING) and raised_by_engine(exc)

_PATH_CHAR = r"[^\s'\"`,;:()\[\]{}<>|*?]"  # what a path in a message may hold: no spaces, quotes or brackets
_NAME_CHAR = r"[^\s'\"`,;:()\[\]{}<>|*?\\/]"  # one part of it
# where a path ends: "/srv/cases" ends "/srv/cases." (a full stop after it), not "/srv/cases2"
_PATH_END = r"(?!\.*[^\s'\"`,;:()\[\]{}<>|*?\\/.])"
_REPEATED_PREFIX = re.compile(r"(?:^|(?<=: ))([^:\n]+): \1: ")
_ABSOLUTE_PATH = re.compile(rf"(?<![\w.~\\/-])(?:/|[A-Za-z]:[\\/])(?:{_NAME_CHAR}+[\\/])+{_NAME_CHAR}+")


class ServerPaths:
    """Server paths in a message, named as clients know what they point to: clients name models and cases by id and
    never see where the server keeps them (the folders, a user name in them, the installation).

    ``--models DIR/run1/best.safetensors`` becomes ``model run1/best`` (its id), another path under ``--models`` its
    path there, ``--cases DIR/abc/labels.nii.gz`` ``labels.nii.gz of case abc``, a bundled model ``model default``, the
    folders themselves "the server's models folder" and "the server's case store"; any other absolute path of two or
    more parts (a temporary file, a library) only its file name.

    Args:
        models_dir: the server's ``--models`` folder (or None).
        cases_dir: its ``--cases`` folder (or None).
    """

    def __init__(self, models_dir: Optional[Path], cases_dir: Optional[Path]) -> None:
        roots: Dict[str, Tuple[str, str]] = {}
        known = [("models", "", models_dir), ("cases", "", cases_dir)]
        known += [("bundled", mid, bundled_model_path(mid)) for mid in BUNDLED_MODELS]
        for kind, model_id, root in known:
            if root is None:
                continue
            # the engine may name either; never the relative form (ServerConfig makes the folders absolute): text
            # such as a client's model id 'hippo/v2' is no server path, also where --models was given as "hippo"
            for form in (Path(root).absolute(), Path(root).resolve()):
                roots.setdefault(str(form), (kind, model_id))
        self._roots = roots
        # longest first: the most specific root names a path
        pattern = "|".join(re.escape(r) for r in sorted(roots, key=len, reverse=True))
        self._known = re.compile(rf"(?<!{_PATH_CHAR})(?P<root>{pattern})(?P<rest>(?:[\\/]{_PATH_CHAR}*)?)"
                                 rf"{_PATH_END}") if roots else None

    def name(self, message: str, keep: Sequence[str] = ()) -> str:
        """``message`` with every server path named as clients know it (see the class), except in ``keep``: text the
        client sent, quoted in the message (:attr:`ServerError.sent`), which is told back as it was sent."""
        kept = sorted({k for k in keep if k and k in message}, key=len, reverse=True)
        for i, text in enumerate(kept):  # set aside: a NUL never occurs in a message, nor in a path the rules match
            message = message.replace(text, f"\0{i}\0")
        if self._known is not None:
            message = self._known.sub(self._known_name, message)
        message = _ABSOLUTE_PATH.sub(lambda m: _trailing_dots(m.group(0), lambda p: re.split(r"[\\/]", p)[-1]), message)
        # a case folder named "case abc" before the engine's own "case abc: ..." is said once
        message = _REPEATED_PREFIX.sub(r"\1: ", message)
        for i, text in enumerate(kept):
            message = message.replace(f"\0{i}\0", text)
        return message

    def _known_name(self, match: "re.Match[str]") -> str:
        kind, model_id = self._roots[match.group("root")]

        def named(rest: str) -> str:
            rel = rest.replace("\\", "/").strip("/")
            if kind == "bundled":
                return f"model {model_id}" if not rel else rel.split("/")[-1]
            if kind == "models":
                if not rel:
                    return "the server's models folder"
                return f"model {rel[:-len('.safetensors')]}" if rel.endswith(".safetensors") else rel
            case, _, inside = rel.partition("/")
            if not case:
                return "the server's case store"
            return f"{inside} of case {case}" if inside else f"case {case}"

        return _trailing_dots(match.group("rest"), named)


def _trailing_dots(text: str, name: Callable[[str], str]) -> str:
    """``name(text)`` with the full stops that ended the sentence, not the path, put back after it."""
    stripped = text.rstrip(".")
    return name(stripped) + text[len(stripped):]


def _out_of_memory(exc: BaseException) -> bool:
    """An allocation failure of torch (GPU or CPU) or of Python."""
    import torch

    oom = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    return isinstance(exc, (oom, MemoryError))


def client_text(exc: BaseException, failed: str, paths: ServerPaths, *, say_what_failed: bool = False) -> str:
    """What a client is told of ``exc``: the one place that decides it (HTTP errors, failed jobs, failed scorings).

    Why: a client is a user on another machine. A deliberate error's message names what to fix ("case abc has no
    label file") and must reach them; an unexpected exception's text ("RuntimeError: ...", a traceback, "[Errno 13]
    Permission denied: '/srv/...'") tells them nothing they can act on while it shows how the server is laid out
    (folders, user names, library internals). Its details are for the server's operator, who has the log.

    A user-facing error (:func:`is_user_facing`: a :data:`USER_FACING` type raised by the engine's own code) keeps its
    message, the case or file it names being what a user needs to fix it; server paths in it are named as clients know
    them (:class:`ServerPaths`). It is logged as one line. Any other exception, a ``ValueError`` raised inside numpy or
    torch included, was not written for users and may name server paths or internals: the client is told only what
    failed, and the exception with its traceback goes to the server's log (:data:`log`, printed by ``mambahome
    serve`` on stderr), where the server's operator can read it.

    Args:
        exc: the exception.
        failed: what failed, as the start of a sentence naming it ("fine-tune job 1a2b3c failed during training at
            step 120 of 200", "the server failed to answer POST /sessions").
        paths: the server's paths and their names.
        say_what_failed: put ``failed`` before a user-facing message too (where the message alone would not say what
            it is about).

    Returns:
        The text for the client.
    """
    if _out_of_memory(exc):  # the one unexpected failure a client can act on: ask for less
        log.error("%s", failed, exc_info=exc)
        return (f"{failed}: the server ran out of {'GPU ' if 'CUDA' in str(exc) else ''}memory; try a smaller "
                "batch or patch size, fewer cases at once, or again when the server's other jobs have ended")
    if is_user_facing(exc):
        log.info("%s: %s", failed, exc)
        text = paths.name(str(exc), getattr(exc, "sent", ()))
        return f"{failed}: {text}" if say_what_failed else text
    log.error("%s", failed, exc_info=exc)
    return f"{failed}; the server's log has the details"


SESSION_ID = re.compile(r"^[A-Za-z0-9_-]{16,64}$")
JOB_ID = re.compile(r"^[a-f0-9]{12}$")
# Model ids are paths relative to --models without the suffix: "run1/best"; never "..", never absolute.
MODEL_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,99}(/[A-Za-z0-9_][A-Za-z0-9._-]{0,99}){0,4}$")
# Case ids: the case store's rule, checked again here before the store sees them.
CASE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


# What each pattern accepts, in words: the 400 must state the rule the id broke (a session id of
# letters only but too short was told "letters, digits, '.', '_' and '-' only", which it was).
ID_RULES = {
    SESSION_ID.pattern: "16 to 64 letters, digits, '_' or '-' (the session_id POST /sessions answered)",
    JOB_ID.pattern: "12 hexadecimal digits (the job_id POST /finetune answered)",
    MODEL_ID.pattern: "letters, digits, '.', '_' and '-', in up to 5 parts separated by '/', never '..' "
                      "(an id from GET /models)",
    CASE_ID.pattern: "1 to 100 letters, digits, '.', '_' or '-', starting with a letter or digit, never '..'",
}


def check_id(value: Any, pattern: "re.Pattern[str]", what: str) -> str:
    """``value`` if it matches ``pattern`` (and holds no ``..``), else a 400 naming it and the rule.

    Args:
        value: the id from the request.
        pattern: one of the id patterns above.
        what: the id's name in the message ("session id").

    Returns:
        ``value``, unchanged.
    """
    if not isinstance(value, str) or not pattern.match(value) or ".." in value:
        rule = ID_RULES.get(pattern.pattern, "letters, digits, '.', '_' and '-' only")
        # the id cut to 80 characters: a request may carry a megabyte "id", and the answer must not echo it whole
        shown = _cut(repr(value), 80)
        raise ServerError(400, "invalid_id", f"invalid {what} {shown}: expected {rule}", sent=(shown,))
    return value


def _cut(text: str, limit: int) -> str:
    """``text``, or its first ``limit`` characters ending in "..." when longer."""
    return text if len(text) <= limit else text[:limit - 3] + "..."


# ----------------------------------------------------------------------------- GPU lock
class GpuLock:
    """One model job at a time. A caller waits up to ``wait_s`` and then gets a 503 naming the holder.

    :meth:`run` runs the job on one long-lived model thread: thread-local state of the math libraries
    (about 40 MiB per thread that ever ran a CPU prediction, kept for the thread's life) then exists
    once, instead of once per request worker thread.

    Args:
        wait_s: seconds to wait for the lock before answering busy.
        device: the server's device setting (``auto``, ``cpu``, ``cuda:0``): the 503 names the processor that is
            busy (a CPU server answered "the server's GPU is busy").
    """

    def __init__(self, wait_s: float, device: Optional[str] = "auto") -> None:
        from engine.progress import CancelToken

        self._lock = threading.Lock()
        self.wait_s = wait_s
        self.device = device
        self.holder: Optional[str] = None
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mambahome-model")
        # cancelled when the server is told to stop (Ctrl-C, SIGTERM): a segmentation under way ends at its next
        # window, so the process exits in seconds; Python waits for the model thread, and uvicorn for the request,
        # which held a stopped server for the whole of a 512^3 CPU segmentation (minutes)
        self.closing = CancelToken()

    def run(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` on the model thread with the lock held (503 busy after ``wait_s``; 503
        ``shutting_down`` once the server is stopping, also for a job that ``closing`` cancelled)."""
        from engine.progress import Cancelled

        with self.hold(what):
            if self.closing.cancelled:
                raise shutting_down()
            try:
                return self._worker.submit(fn, *args, **kwargs).result()
            except Cancelled:
                if self.closing.cancelled:
                    raise shutting_down() from None
                raise

    def processor(self) -> str:
        """``GPU`` or ``CPU``: what the server's models run on."""
        if self.device in (None, "auto"):
            import torch

            return "GPU" if torch.cuda.is_available() else "CPU"
        return "GPU" if str(self.device).startswith("cuda") else "CPU"

    def acquire(self, what: str) -> None:
        if not self._lock.acquire(timeout=self.wait_s):
            raise busy(f"the server's {self.processor()} is busy ({self.holder or 'another job'}); try again in a "
                       "moment")
        self.holder = what

    def release(self) -> None:
        self.holder = None
        self._lock.release()

    @contextmanager
    def hold(self, what: str) -> Iterator[None]:
        self.acquire(what)
        try:
            yield
        finally:
            self.release()


# ----------------------------------------------------------------------------- sessions
class Session:
    """One uploaded volume and what was computed on it.

    Args:
        session_id: the id clients name it by.
        volume: the upload; float32, or integer voxels (a CT's int16) kept as sent (:attr:`volume`
            gives a model job its float32 copy).
        name: the client's file name, reduced to a harmless label.
        modality: ``CT``/``MR``/... or None.
        last_used: clock time of the last request.
        modality_source: where ``modality`` came from: ``"client"``, ``"file"`` (a tag in the upload),
            ``"guessed"`` (from Hounsfield units), or None.
    """

    def __init__(self, session_id: str, volume: Volume, name: str, modality: Optional[str], last_used: float,
                 modality_source: Optional[str] = None, owner: Optional[str] = None) -> None:
        self.session_id = session_id
        self.owner = owner  # the uploading client's address, for the per-client cap
        self.name = name
        self.modality = modality
        self.modality_source = modality_source
        self.last_used = last_used
        self.lock = threading.Lock()  # one request at a time works on the session's model state
        # cancelled when the session is dropped (closed, expired): its segmentation stops at the next window instead of
        # holding the GPU for every other client to compute a result nobody can fetch
        from engine.progress import CancelToken

        self.closed = CancelToken()
        self._source: Optional[Volume] = volume
        self.labels: Optional[np.ndarray] = None
        self.model_id: Optional[str] = None
        self.interactive: Any = None
        self.interactive_model: Optional[str] = None
        # Which state of the prompted object clients last saw: +1 on every change (prompt, undo, reset, initial
        # mask, a new object of another model), under ``lock``. Every answer that changes or reads the object
        # carries it, so a client whose own change answers with another number than its last + 1 knows that
        # another client changed this session in between (docs/SERVER.md, "Revisions").
        self.revision = 0

    @contextmanager
    def working(self, wait_s: float) -> Iterator[None]:
        """Hold the session for one request; after ``wait_s`` seconds of another request holding it, a ``503 busy``
        (the same wait as for the GPU) instead of a client hanging on for a minute."""
        if not self.lock.acquire(timeout=max(float(wait_s), 0.0)):
            raise busy(f"session {self.name!r} is still answering another request; try again when it has answered")
        try:
            yield
        finally:
            self.lock.release()

    def _held(self) -> Volume:
        if self._source is None:
            raise not_found(f"session {self.session_id!r} was closed")
        return self._source

    @property
    def shape(self) -> Tuple[int, int, int]:
        """The volume's shape ``(I, J, K)`` (no conversion)."""
        return self._held().shape

    @property
    def affine(self) -> np.ndarray:
        """The ``(4, 4)`` RAS voxel-to-world matrix (no conversion)."""
        return self._held().affine

    @property
    def source(self) -> Volume:
        """The volume as uploaded (float32 or integer voxels)."""
        return self._held()

    @property
    def volume(self) -> Volume:
        """The engine's float32 :class:`~engine.io.Volume` of the upload.

        An integer upload is converted on each use and the float copy is not kept: a model job needs
        it for its own duration only, and an idle session then holds half the memory (int16 vs float32).
        """
        vol = self._held()
        if vol.data.dtype == np.float32:
            return vol
        return dataclasses.replace(vol, data=vol.data.astype(np.float32))

    def release(self) -> List["weakref.ref[Any]"]:
        """Drop the arrays and model state now, even if a request still holds this object.

        Returns:
            weak references to what was dropped; one still alive afterwards sits in a reference cycle
            (only a garbage collection frees it).
        """
        self.closed.cancel()
        dropped = [x for x in (self._source, self.interactive) if x is not None]
        self._source = None
        self.labels = None
        self.interactive = None
        refs = []
        for x in dropped:
            try:
                refs.append(weakref.ref(x))
            except TypeError:  # not weak-referenceable: nothing to watch
                pass
        return refs


def release_memory(watch: Optional[List["weakref.ref[Any]"]] = None) -> None:
    """Free what dropped sessions held and hand freed heap pages back to the OS.

    Uploads and model jobs run in worker threads, each with its own glibc malloc arena; without a
    trim the process keeps those pages as its high-water mark, which looks like a leak from outside.

    Args:
        watch: weak references to dropped objects: a full garbage collection (seconds with torch
            loaded on a slow CPU) runs only if one of them is still alive, i.e. held by a cycle.
            None: always collect.
    """
    if watch is None or any(ref() is not None for ref in watch):
        gc.collect()
    _malloc_trim()


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl): nothing to trim
        pass


class MemoryReleaser:
    """Runs :func:`release_memory` in one background thread after sessions are dropped, so a close
    answers at once; requests arriving while it runs are served by one more pass, not one each.

    Args:
        delay_s: wait this long after a request before releasing (closes of a burst share one pass).
    """

    def __init__(self, delay_s: float = 0.2) -> None:
        self.delay_s = delay_s
        self.passes = 0
        self._watch: List["weakref.ref[Any]"] = []
        self._cond = threading.Condition()
        self._pending = False
        self._running = False
        self._thread = threading.Thread(target=self._loop, name="mambahome-memory-release", daemon=True)
        self._thread.start()

    def request(self, watch: Optional[List["weakref.ref[Any]"]] = None) -> None:
        """Ask for a pass (returns at once); ``watch``: see :func:`release_memory`."""
        with self._cond:
            self._watch.extend(watch or [])
            self._pending = True
            self._cond.notify_all()

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """Block until no pass is pending or running (tests and benchmarks); True if so."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._pending and not self._running, timeout)

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending)
            time.sleep(self.delay_s)
            with self._cond:
                self._pending, self._running = False, True
                watch, self._watch = self._watch, []
            try:
                release_memory(watch)
            finally:
                with self._cond:
                    self._running = False
                    self.passes += 1
                    self._cond.notify_all()


class SessionStore:
    """At most ``max_sessions`` sessions; one idle for ``idle_timeout_s`` is dropped.

    A dropped session (closed or expired) releases its arrays at once (:meth:`Session.release`) and
    calls ``on_drop`` (the server hands freed memory back to the OS there).

    Args:
        max_sessions: sessions held at once.
        idle_timeout_s: idle time after which a session is dropped.
        clock: time source (tests pass their own).
        on_drop: called after sessions were dropped, with weak references to what they held.
        max_per_client: sessions one client address may hold at once; None: only ``max_sessions`` counts.
    """

    def __init__(self, max_sessions: int, idle_timeout_s: float, clock: Callable[[], float] = time.monotonic,
                 on_drop: Optional[Callable[[List["weakref.ref[Any]"]], None]] = None,
                 max_per_client: Optional[int] = None) -> None:
        self.max_sessions = max_sessions
        self.max_per_client = max_per_client
        self.idle_timeout_s = idle_timeout_s
        self.clock = clock
        self.on_drop = on_drop
        self._sessions: Dict[str, Session] = {}
        # uploads being read and decoded, by owner: each holds a place (:meth:`room`), or six concurrent uploads to a
        # server with room for one were all read (hundreds of MB each) before five were refused
        self._uploading: List[Optional[str]] = []
        self._lock = threading.Lock()

    def _dropped(self, dropped: List[Session]) -> None:
        refs = [ref for s in dropped for ref in s.release()]
        if dropped and self.on_drop is not None:
            self.on_drop(refs)

    def purge_expired(self) -> int:
        """Drop idle sessions (not one a request is working on); returns how many."""
        now = self.clock()
        with self._lock:
            old = [s for s in self._sessions.values()
                   if now - s.last_used > self.idle_timeout_s and not s.lock.locked()]
            for s in old:
                del self._sessions[s.session_id]
        self._dropped(old)
        return len(old)

    def _full(self) -> ServerError:
        return busy(f"the server holds its maximum of {self.max_sessions} sessions (--max-sessions); close one "
                    f"or wait for an idle one to expire ({self.idle_timeout_s:.0f} s)")

    def _refuse_when_full(self, owner: Optional[str], holding_place: bool = False) -> None:
        """Call with ``_lock`` held. Uploads under way count as the sessions they will be; ``holding_place``: the
        caller is one of them. The per-client cap first: one client that keeps uploading (a script in a loop, a
        plugin that never closes its sessions) is told so in a 429 before it fills the server for everyone."""
        mine = 1 if holding_place else 0
        if self.max_per_client is not None and owner is not None:
            held = (sum(1 for s in self._sessions.values() if s.owner == owner) + self._uploading.count(owner)
                    - mine)
            if held >= self.max_per_client:
                raise ServerError(429, "too_many_sessions",
                                  f"this client ({owner}) holds {held} session{'s' if held != 1 else ''}, this server's limit per client "
                                  f"(--max-sessions-per-client {self.max_per_client}); close one (DELETE "
                                  f"/sessions/<id>) or wait for an idle one to expire ({self.idle_timeout_s:.0f} s)")
        if len(self._sessions) + len(self._uploading) - mine >= self.max_sessions:
            raise self._full()

    def check_room(self, owner: Optional[str] = None) -> None:
        """503 busy (429 for a client over its own cap) now when no session could be made: called before an upload
        is read and decoded (up to the upload limit, seconds of work) only to be refused at the end. :meth:`create`
        checks again."""
        self.purge_expired()
        with self._lock:
            self._refuse_when_full(owner)

    @contextmanager
    def room(self, owner: Optional[str] = None) -> Iterator[None]:
        """Hold a place for one upload while it is read and decoded (503/429 now, as :meth:`check_room`, when there is
        none); :meth:`create` with ``holding_place=True`` inside it turns the place into the session."""
        self.purge_expired()
        with self._lock:
            self._refuse_when_full(owner)
            self._uploading.append(owner)
        try:
            yield
        finally:
            with self._lock:
                self._uploading.remove(owner)

    def create(self, volume: Volume, name: str, modality: Optional[str],
               modality_source: Optional[str] = None, owner: Optional[str] = None,
               holding_place: bool = False) -> Session:
        self.purge_expired()
        with self._lock:
            self._refuse_when_full(owner, holding_place)
            sid = secrets.token_urlsafe(18)
            s = Session(session_id=sid, volume=volume, name=name, modality=modality, last_used=self.clock(),
                        modality_source=modality_source, owner=owner)
            self._sessions[sid] = s
            return s

    def get(self, session_id: str) -> Session:
        check_id(session_id, SESSION_ID, "session id")
        self.purge_expired()
        with self._lock:
            s = self._sessions.get(session_id)
            if s is None:
                raise not_found(f"no session {session_id!r} (it may have expired after "
                                f"{self.idle_timeout_s:.0f} s idle, or the server was restarted); upload the "
                                "volume again")
            s.last_used = self.clock()
            return s

    def close(self, session_id: str) -> None:
        check_id(session_id, SESSION_ID, "session id")
        with self._lock:
            s = self._sessions.pop(session_id, None)
        if s is None:
            raise not_found(f"no session {session_id!r}")
        self._dropped([s])

    def ids(self) -> List[str]:
        """Ids of the sessions held now."""
        with self._lock:
            return list(self._sessions)

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)

    def start_reaper(self, interval_s: Optional[float] = None) -> threading.Thread:
        """Drop idle sessions in the background too, so memory is freed without further requests.

        The thread holds the store only weakly and ends once the store is gone.
        """
        interval = interval_s or max(min(self.idle_timeout_s / 4, 60.0), 0.05)
        ref = weakref.ref(self)

        def loop() -> None:
            while True:
                time.sleep(interval)
                store = ref()
                if store is None:
                    return
                if store.purge_expired() and store.on_drop is None:
                    release_memory()
                del store

        thread = threading.Thread(target=loop, name="mambahome-session-reaper", daemon=True)
        thread.start()
        return thread


# ----------------------------------------------------------------------------- models
# The models the package ships, by the id clients know them under; these ids are reserved.
BUNDLED_MODELS = {"default": "default.safetensors", "interactive": "interactive.safetensors"}


def bundled_model_path(model_id: str = "default") -> Optional[Path]:
    """``napari_mambahome/models/<file>`` of a bundled model (:data:`BUNDLED_MODELS`) in this installation,
    found without importing napari; None when the installation lacks it."""
    spec = importlib.util.find_spec("napari_mambahome")
    for root in (spec.submodule_search_locations or []) if spec else []:
        p = Path(root) / "models" / BUNDLED_MODELS[model_id]
        if p.is_file():
            return p
    return None


def model_task(metadata: Dict[str, Any]) -> str:
    """``"interactive"`` for promptable models, else ``"segmentation"``."""
    task = metadata.get("task")
    name = task.get("name") if isinstance(task, dict) else task
    return str(name or "segmentation")


@dataclass
class ModelEntry:
    """A model the server can use; ``model_id`` is what clients name it by.

    ``path`` is its checkpoint file, or None for a model handed over in memory (``model``).
    """

    model_id: str
    path: Optional[Path]
    metadata: Dict[str, Any]
    source: str
    model: Any = None

    @property
    def task(self) -> str:
        return model_task(self.metadata)

    @property
    def checkpoint(self) -> Any:
        """What :class:`~engine.inference.Predictor` and ``InteractiveSession`` take: a path or ``(model, metadata)``."""
        return self.path if self.path is not None else (self.model, self.metadata)

    def to_json(self, active: bool) -> Dict[str, Any]:
        m = self.metadata
        return {"id": self.model_id, "task": self.task, "version": m.get("version"),
                "class_names": list(m.get("class_names", [])),
                "colors": m.get("class_colors"), "modality": m.get("modality"),
                # what it was trained on (the one "modality" is only its default intensity rule), and whether that
                # was synthetic phantoms alone: a demo model that knows no real anatomy
                "modalities_seen": modalities_seen(m), "phantoms_only": trained_on_phantoms_only(m),
                "training_cases": dict(zip(("real", "phantoms"), training_cases(m))),
                # a demo model fine-tuned on a few scans knows those and nothing real beyond them
                "real_scans_since_demo": real_scans_since_demo(m),
                "parent": (m.get("parent") or {}).get("version"), "source": self.source, "active": active}


class ModelRegistry:
    """The bundled model plus every checkpoint under ``models_dir``; one active at a time, with history.

    Args:
        models_dir: folder scanned for ``*.safetensors`` (fine-tuned versions are written under it).
        device: where predictors run.
    """

    def __init__(self, models_dir: Optional[Path], device: str) -> None:
        self.models_dir = Path(models_dir) if models_dir else None
        self.device = device
        self._lock = threading.Lock()
        self._meta_cache: Dict[Path, tuple] = {}
        self.history: List[str] = []
        self._predictor: Any = None
        self._predictor_id: Optional[str] = None
        self._interactive: Optional[tuple] = None  # (model_id, mtime, (model, metadata)): shared by sessions
        self._memory: Dict[str, ModelEntry] = {}
        # run folder -> job id of this server's fine-tunes still training (JobManager): their checkpoints are not
        # models yet (see training_runs)
        self.training: Dict[str, str] = {}
        entries = self.entries()
        if not entries:
            raise ServerError(500, "no_models", "no model found: neither the bundled default.safetensors nor any "
                                                "checkpoint under --models")
        self.active = "default" if "default" in entries else sorted(entries)[0]

    def _metadata(self, path: Path) -> Optional[Dict[str, Any]]:
        from engine.checkpoint import read_checkpoint_metadata

        try:
            mtime = path.stat().st_mtime_ns
        except OSError:
            return None
        cached = self._meta_cache.get(path)
        if cached and cached[0] == mtime:
            return cached[1]
        try:
            meta = read_checkpoint_metadata(path)
        except ValueError:
            return None  # not one of ours (or half-written): not offered to clients
        self._meta_cache[path] = (mtime, meta)
        return meta

    def entries(self) -> Dict[str, ModelEntry]:
        """Every usable model by id (rescanned each call: fine-tunes add versions while serving); the checkpoints of
        a run still training are none (:meth:`training_runs`)."""
        out: Dict[str, ModelEntry] = {}
        for model_id in BUNDLED_MODELS:  # the segmentation default, and the promptable model prompts start with
            bundled = bundled_model_path(model_id)
            meta = self._metadata(bundled) if bundled is not None else None
            if meta is not None:
                out[model_id] = ModelEntry(model_id, bundled, meta, "bundled")
        if self.models_dir is not None and self.models_dir.is_dir():
            training = self.training_runs()
            for p in sorted(self.models_dir.rglob("*.safetensors")):
                parts = p.relative_to(self.models_dir).parts
                if any(part.startswith(".") for part in parts):
                    continue  # temp files of atomic writes
                if len(parts) > 1 and parts[0] in training:
                    continue  # a fine-tune's best/last while it trains: cancelled or failed, its folder is deleted
                mid = p.relative_to(self.models_dir).with_suffix("").as_posix()
                if not MODEL_ID.match(mid) or mid in BUNDLED_MODELS:
                    continue
                meta = self._metadata(p)
                if meta is not None:
                    out[mid] = ModelEntry(mid, p, meta, "models")
        out.update(self._memory)
        return out

    def add_in_memory(self, model_id: str, model: Any, metadata: Dict[str, Any]) -> ModelEntry:
        """Offer a model already in memory (an embedding application's live model) under ``model_id``."""
        check_id(model_id, MODEL_ID, "model id")
        entry = ModelEntry(model_id, None, dict(metadata), "memory", model=model)
        self._memory[model_id] = entry
        return entry

    def interactive_entry(self) -> ModelEntry:
        """The model a prompt naming none uses: the active one if promptable, else the first promptable model under
        ``--models`` (the user's own or fine-tuned ones), else the bundled one."""
        entries = self.entries()
        active = entries.get(self._active_in(entries))
        if active is not None and active.task == "interactive":
            return active
        promptable = [e for e in entries.values() if e.task == "interactive"]
        for entry in sorted(promptable, key=lambda e: e.source == "bundled"):
            return entry
        raise ServerError(409, "no_interactive_model", "no interactive model on this server: put a checkpoint "
                                                       "trained with --task interactive under --models")

    def prompt_entry(self, model_id: Optional[str]) -> ModelEntry:
        """The promptable model a prompt names, or :meth:`interactive_entry`'s rule when it names none.

        Raises:
            ServerError: 400 for a malformed id, 404 for an unknown one, 400 ``not_promptable`` for a
                model not trained for prompts (a segmentation model).
        """
        if model_id is None:
            return self.interactive_entry()
        entry = self.get(model_id)
        if entry.task != "interactive":
            raise ServerError(400, "not_promptable",
                              f"model {entry.model_id!r} cannot answer prompts: it is a {entry.task} model, not one "
                              "trained with --task interactive; GET /models lists each model's task")
        return entry

    def training_runs(self) -> Dict[str, str]:
        """Run folders under ``models_dir`` that a fine-tune still trains, with the id of its job ("" where its marker
        cannot be read): this server's jobs (:attr:`training`) and any with a ``.running-<run>.json`` marker
        (:func:`mark_running`; also another live server's sharing the folder). Such a run's ``best``/``last`` were
        listed, and could be selected, while it trained; cancelled or failed, the run folder is deleted, and the
        server's active model was then one that no longer existed (every segmentation a 404)."""
        import json

        runs = dict(self.training)
        if self.models_dir is not None:
            try:
                markers = list(self.models_dir.glob(f"{RUNNING_PREFIX}*.json"))
            except OSError:
                markers = []
            for marker in markers:
                run = marker.name[len(RUNNING_PREFIX):-len(".json")]
                if run in runs:
                    continue
                try:
                    runs[run] = str(json.loads(marker.read_text()).get("job_id") or "")
                except (OSError, ValueError, AttributeError):  # gone meanwhile, or cut short: still a running run's
                    runs[run] = ""
        return runs

    def _active_in(self, entries: Dict[str, ModelEntry]) -> str:
        """The active model's id, made one of ``entries`` first: when the active model is gone (its files deleted or
        unreadable, a run folder removed) the latest earlier selection still listed becomes active, else ``default``
        (else the first listed), and the log says so. Without this the server kept naming a model that no longer
        existed, and every request that used the active model was a 404."""
        with self._lock:
            if self.active in entries or not entries:
                return self.active
            gone = self.active
            self.history = [h for h in self.history if h in entries and h != gone]
            if self.history:
                self.active, how = self.history.pop(), "the model selected before it"
            else:
                self.active = "default" if "default" in entries else sorted(entries)[0]
                how = "the default" if self.active == "default" else "the first model listed"
            log.warning("the active model %s is gone (its checkpoint was removed or can no longer be read): %s, %s, "
                        "is active now", gone, how, self.active)
            return self.active

    def get(self, model_id: Optional[str]) -> ModelEntry:
        """The model ``model_id`` names (None: the active one, :meth:`_active_in`).

        Raises:
            ServerError: 400 for a malformed id; 409 ``model_training`` for a checkpoint of a fine-tune still
                training; 404 ``unknown_model`` for any other id not listed.
        """
        entries = self.entries()
        mid = self._active_in(entries) if model_id is None else check_id(model_id, MODEL_ID, "model id")
        entry = entries.get(mid)
        if entry is None:
            run = mid.split("/", 1)[0]
            job = self.training_runs().get(run) if "/" in mid else None
            if job is not None:
                said = f"fine-tune job {job}" if job else "a fine-tune job"
                raise ServerError(409, "model_training",
                                  f"model {mid!r} is still being trained by {said}: its checkpoints are not a model "
                                  "until the job has finished (a cancelled or failed job deletes them); use it once "
                                  "GET /finetune/<job> says the job is done and names it as its model_id",
                                  sent=(repr(mid),))
            raise ServerError(404, "unknown_model", f"no model {mid!r} on this server; GET /models lists them")
        return entry

    def listing(self) -> Dict[str, Any]:
        entries = self.entries()
        active = self._active_in(entries)
        return {"active": active, "history": list(self.history),
                "models": [e.to_json(e.model_id == active) for e in entries.values()]}

    def select(self, model_id: str) -> Dict[str, Any]:
        entry = self.get(model_id)  # 409 for a run still training, 404 for no model
        with self._lock:
            if entry.model_id != self.active:
                self.history.append(self.active)
                self.active = entry.model_id
        return self.listing()

    def rollback(self) -> Dict[str, Any]:
        entries = self.entries()
        self._active_in(entries)
        with self._lock:
            # a selection whose model is gone meanwhile is skipped: rolling back to it made the active model a 404
            while self.history and self.history[-1] not in entries:
                self.history.pop()
            if not self.history:
                raise ServerError(409, "no_history", "nothing to roll back to: no other model was selected before")
            self.active = self.history.pop()
        return self.listing()

    def interactive_model(self, entry: ModelEntry) -> Any:
        """``(model, metadata)`` of a promptable model, loaded once and shared by every session's
        :class:`~engine.interactive.InteractiveSession` (call with the GPU lock held: one prompt runs at a time)."""
        from engine.checkpoint import load_checkpoint

        if entry.path is None:
            return entry.checkpoint
        mtime = entry.path.stat().st_mtime_ns
        cached = self._interactive
        if cached is None or cached[:2] != (entry.model_id, mtime):
            self._interactive = None  # free the old model before loading the next
            model, metadata = load_checkpoint(entry.path, device="cpu")
            # Messages name the model by its id, never by a server path.
            self._interactive = (entry.model_id, mtime, (model, dict(metadata, path=entry.model_id)))
        return self._interactive[2]

    def predictor(self, model_id: Optional[str]) -> Any:
        """A cached :class:`engine.inference.Predictor` for the model (call with the GPU lock held)."""
        from engine.inference import Predictor

        entry = self.get(model_id)
        if self._predictor_id != entry.model_id:
            # free the old model before loading the next; a load that fails (a corrupted file) leaves nothing cached
            self._predictor, self._predictor_id = None, None
            self._predictor = Predictor(entry.checkpoint, device=self.device)
            self._predictor_id = entry.model_id
        return self._predictor


# ----------------------------------------------------------------------------- fine-tune jobs
def run_finetune(checkpoint: Path, data: Any, out: Path, **settings: Any) -> Any:
    """The one call into the engine's fine-tuning."""
    from engine.train.finetune import finetune

    return finetune(checkpoint, data, out, **settings)


FINETUNE_SETTINGS = {"lr": float, "batch_size": int, "val_fraction": float, "val_every": int, "seed": int,
                     "freeze_encoder": bool, "max_minutes": float, "weight_decay": float, "bf16": bool, "task": str}
_SETTING_KINDS = {float: "a number", int: "a whole number", bool: "true or false", str: "a string"}
# Bounds a client cannot leave: a batch of thousands of patches would take the whole server (and every other
# user's sessions) down with an out-of-memory kill before any error could be answered. Batch 16 is 8x the
# fine-tuning default.
MAX_FINETUNE_BATCH = 16
FINETUNE_RANGES: Dict[str, Tuple[float, float, str]] = {
    "batch_size": (1, MAX_FINETUNE_BATCH, f"between 1 and {MAX_FINETUNE_BATCH}"),
    "val_every": (1, MAX_FINETUNE_STEPS, f"between 1 and {MAX_FINETUNE_STEPS} steps"),
    "max_minutes": (1e-3, 24 * 60.0, "more than 0 and at most 1440 minutes"),
    "lr": (1e-12, 1.0, "more than 0 and at most 1"),
    "weight_decay": (0.0, 1.0, "between 0 and 1"),
    "val_fraction": (0.0, 0.9, "between 0 and 0.9"),
    # what numpy's and every DataLoader worker's seeding take; a larger one was accepted and failed in the job, its
    # error quoting all 300 digits of 1e300
    "seed": (0, 2**32 - 1, f"a whole number from 0 to {2**32 - 1}"),
}


def finetune_setting(key: str, value: Any) -> Any:
    """``value`` of fine-tune setting ``key`` as its type, taken only when the JSON value already is one.

    Why strict: converting would turn ``"false"`` into ``True`` (``bool("false")``), ``2.7`` batches into 2 and
    ``"1e-3"`` strings into numbers a client did not mean to send; a 400 naming the setting costs the client one retry.
    """
    kind = FINETUNE_SETTINGS[key]
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is bool and isinstance(value, bool):
        return value
    # a JSON integer may have thousands of digits: compared as it is (math.isfinite and float() raise OverflowError
    # on it, a 500), and told back cut as any other echoed value
    finite = number and (isinstance(value, int) or math.isfinite(value))
    if kind in (int, float) and finite and (kind is float or isinstance(value, int) or float(value).is_integer()):
        low, high, rule = FINETUNE_RANGES.get(key, (-math.inf, math.inf, ""))
        if not low <= value <= high:
            shown = _cut(repr(value), 80)
            raise ServerError(400, "invalid_request", f"fine-tune setting {key!r} must be {rule}, got {shown}",
                              sent=(shown,))
        return kind(value)
    if kind is str and isinstance(value, str):
        return value
    shown = _cut(repr(value), 80)
    raise ServerError(400, "invalid_request", f"fine-tune setting {key!r} must be {_SETTING_KINDS[kind]}, "
                                              f"got {shown}", sent=(shown,))


def discard_run(out: Path) -> None:
    """Remove the run folder of a fine-tune that made no model (cancelled or failed): its checkpoints (a failed run's
    are often NaN) must not be offered as models, and its resume state (tens of MB) must not pile up. Renamed to a
    dot-name first, which :meth:`ModelRegistry.entries` skips, so no listing sees a half-deleted folder."""
    if not out.exists():
        return
    hidden = out.with_name(f".discarded-{out.name}")
    try:
        os.replace(out, hidden)
    except OSError:
        log.warning("could not set aside the run folder %s of a fine-tune that made no model", out, exc_info=True)
        return
    shutil.rmtree(hidden, ignore_errors=True)


RUNNING_PREFIX = ".running-"
"""``<--models>/.running-<run>.json``: a fine-tune job of a live server trains ``<--models>/<run>`` (the dot keeps it out
of every listing). Written when a job starts and removed once its model is made or the job ended without one; one left
behind by a server that is gone marks a run that never finished (:func:`set_aside_interrupted_runs`)."""


_OWN_RUNS: set = set()
"""Runs this process's jobs marked: in a container the server is often PID 1 at every start, so a marker naming this
process's PID is stale unless this process wrote it."""

_MARKER_LOCKS: Dict[str, int] = {}
"""Open descriptors of the markers this process's jobs hold locked (``fcntl.flock``), by marker path. A PID says
nothing across PID namespaces: two servers in two containers sharing one models folder (same hostname) each saw the
other's PID as dead, or as some live process of its own, and could set aside a run the other still trained. A lock
held on the marker's open file is the kernel's own answer, released when the process dies however it dies."""


def _lock_marker(fd: int) -> bool:
    """Take the exclusive advisory lock of an open marker without waiting; False when another open file holds it (also
    one of this process: flock locks belong to open files) or where there is no flock (Windows: the PID rule)."""
    try:
        import fcntl
    except ImportError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # BlockingIOError: held; other errors (a file system without locks): judged held, the run kept
        return False
    return True


def mark_running(models_dir: Path, run: str, job_id: str, pid: Optional[int] = None) -> Path:
    """Write the marker of run folder ``run`` of job ``job_id``, trained by process ``pid`` (default: this one,
    which then holds the marker locked until :func:`unmark_running`, so no other server takes the run for a dead
    server's; a marker written for another ``pid`` is neither locked nor says it is, and the PID rule judges it)."""
    import json
    import socket

    models_dir.mkdir(parents=True, exist_ok=True)
    marker = models_dir / f"{RUNNING_PREFIX}{run}.json"
    if pid is None:
        _OWN_RUNS.add(run)
    # whole or absent: a server starting meanwhile took a half-written marker for a dead server's; and locked before
    # it is in place (the lock is taken on the temporary file, whose inode the rename makes the marker), so no reader
    # ever finds the marker of a live run unlocked
    partial = marker.with_name(f".{marker.name}.{os.getpid()}.tmp")
    fd = os.open(partial, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644) if pid is None else None
    locked = fd is not None and _lock_marker(fd)
    text = json.dumps({"job_id": job_id, "pid": os.getpid() if pid is None else pid, "host": socket.gethostname(),
                       **({"locked": True} if locked else {})})
    try:
        partial.write_text(text)
        os.replace(partial, marker)
    except BaseException:
        if fd is not None:
            os.close(fd)
        partial.unlink(missing_ok=True)
        raise
    if fd is not None:
        if locked:
            _MARKER_LOCKS[str(marker)] = fd
        else:
            os.close(fd)
    return marker


def unmark_running(marker: Path) -> None:
    """Remove the marker of a run that ended (its model made, or none to make), then let go of its lock: removed
    first, so a server that opened the marker meanwhile and takes the freed lock finds it gone and leaves the run."""
    marker.unlink(missing_ok=True)
    fd = _MARKER_LOCKS.pop(str(marker), None)
    if fd is not None:
        os.close(fd)


def _marker_lock_free(marker: Path) -> Optional[bool]:
    """For a marker whose writer said it holds it locked: True when its lock could be taken (its writer is gone),
    False when held (a live server's, whatever its PID means here), None when the marker is gone or was replaced
    while it was looked at (its run ended: nothing to judge). The lock taken is let go at once."""
    try:
        fd = os.open(marker, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        if not _lock_marker(fd):
            return False
        try:  # the same file still in place: not removed by a run that ended just before the lock was taken
            return os.stat(marker).st_ino == os.fstat(fd).st_ino or None
        except FileNotFoundError:
            return None
    finally:
        os.close(fd)  # closing it releases the lock taken


def _process_alive(pid: int, run: str) -> bool:
    if pid == os.getpid():
        return run in _OWN_RUNS
    if os.name == "nt":  # os.kill(pid, 0) terminates the process there; keep the run rather than guess
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: alive
        return True
    return True


def set_aside_interrupted_runs(models_dir: Optional[Path]) -> List[str]:
    """Rename the run folders of fine-tunes whose server stopped while they trained (Ctrl-C, a crash) to
    ``.interrupted-<run>``, which no listing shows, and return their names. Their checkpoints are those of a run cut
    short (step 2 of 200), which the next start listed beside finished versions, nothing telling them apart; a job that
    fails or is cancelled leaves no model, and neither does one whose server stopped. Set aside rather than deleted:
    the server's operator may want its log or resume state. A run of a server still alive (two servers sharing a
    models folder) is left alone: one whose marker's lock is held (:func:`mark_running`), whatever its PID says in
    this PID namespace; a marker of a server before the lock (none said) is judged by its PID."""
    import json
    import socket

    if models_dir is None or not models_dir.is_dir():
        return []
    moved = []
    for marker in sorted(models_dir.glob(f"{RUNNING_PREFIX}*.json")):
        run = marker.name[len(RUNNING_PREFIX):-len(".json")]
        try:
            owner = json.loads(marker.read_text())
            pid, host, locked = int(owner["pid"]), str(owner["host"]), owner.get("locked") is True
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            # unreadable (cut short by the stop itself): its writer is gone
            pid, host, locked = -1, socket.gethostname(), False
        if host != socket.gethostname():
            continue  # another machine's (a shared folder, where locks may not reach): not ours to judge
        if locked:
            free = _marker_lock_free(marker)
            if free is None:
                continue  # removed meanwhile: its run ended, and the marker is its server's to remove
            if not free:
                continue  # held: a live server trains it, in this PID namespace or another
        elif pid > 0 and _process_alive(pid, run):
            continue  # a live server's, as its PID says (a server before the lock)
        folder = models_dir / run
        if run and "/" not in run and folder.is_dir():
            try:
                os.replace(folder, models_dir / f".interrupted-{run}")
            except OSError:
                log.warning("could not set aside %s, the run folder of a fine-tune whose server stopped", folder,
                            exc_info=True)
                continue
            moved.append(run)
            log.warning("fine-tune run %s was interrupted (its server stopped while it trained): set aside as "
                        ".interrupted-%s, its checkpoints not listed", run, run)
        try:
            marker.unlink(missing_ok=True)
        except OSError:  # a read-only models folder: the server still starts (the run stays set aside or listed)
            log.warning("could not remove %s", marker.name, exc_info=True)
    return moved


def stopped_and_kept(job: "Job", result: Any) -> bool:
    """Whether ``job``'s training ended on its client's stop, its model kept (:meth:`JobManager.stop`): asked, and
    the run says so. A stop asked at the last step, or as a time limit ran out, ends the run as it would have ended
    anyway: "was a stop asked" (the job) is not "did the stop end it", which the run's ``stopped_on_request`` tells
    (the :class:`RunResult`'s, else its last checkpoint's provenance, both written by the training loop)."""
    from engine.checkpoint import read_checkpoint_metadata

    if not job.stop_requested:
        return False
    said = getattr(result, "stopped_on_request", None)
    if isinstance(said, bool):
        return said
    if result.last_checkpoint is None:
        return False
    try:
        meta = read_checkpoint_metadata(result.last_checkpoint)
    except (OSError, ValueError):  # unreadable: the model is made all the same, only the "stopped" note is lost
        log.warning("could not read the provenance of %s", result.last_checkpoint, exc_info=True)
        return False
    return bool((meta.get("provenance") or {}).get("stopped_on_request"))


def check_finetune_task(task: Optional[str], entry: "ModelEntry") -> None:
    """Refuse, before any job starts, a fine-tune task the parent cannot take: an automatic (segmentation) model
    may become a promptable one (``"interactive"``: a warm start), a promptable one keeps its task."""
    if task is None or task == entry.task:
        return
    if task not in ("segmentation", "interactive"):
        raise ServerError(400, "invalid_request", f"unknown fine-tune task {task!r}; 'segmentation' or 'interactive'")
    if entry.task != "segmentation":
        raise ServerError(400, "invalid_request", f"model {entry.model_id!r} is {entry.task}; fine-tuning keeps its "
                                                  f"task (asked for {task!r})")


def finetune_scores(new: Any, reference: Optional["ModelEntry"], records: List[Any], held_out: bool, saved: int,
                    interactive: bool, device: str, cancel: Any = None,
                    progress: Optional[Callable[[int, int, str], None]] = None) -> Dict[str, Any]:
    """Before/after scores of a fine-tune job's new model against ``reference``, the same scoring as the napari
    plugin's Fine-tune section (:mod:`engine.scoring`): the Dice of an automatic model's segmentation per class, or
    the robot user's Dice of a promptable one.

    Args:
        new: the new model's checkpoint path.
        reference: the model compared with: the parent, or for a promptable model made from an automatic one the
            promptable model in use when the job started; None: nothing to compare with.
        records: the saved cases to score on (:func:`engine.scoring.held_out_cases`).
        held_out: whether ``records`` were held out of training.
        saved: how many cases were saved when the job scored.
        interactive: promptable models, scored by the robot user.
        device: where the models run.
        cancel: checked before each case.
        progress: ``(done, total, message)`` over both models' cases.

    Returns:
        ``GET /finetune/{job}``'s ``scores``: ``before``/``after`` (``{class: mean Dice}``), ``per_case``,
        ``metric``, ``clicks``, ``seconds``, ``compared_with`` (a model id or None), ``compared_with_version``,
        ``scored_on`` (case ids), ``held_out``, ``where`` (the cases in words, as clients show them),
        ``mean_before``/``mean_after`` (over the classes both were scored on; None without a comparison) and
        ``weaker``.
    """
    from engine.scoring import before_after, means, scored_where, weaker

    scores = before_after(reference.checkpoint if reference is not None else None, new, records,
                          interactive=interactive, device=device, progress=progress, cancel=cancel)
    pair = means(scores)
    return dict(scores, compared_with=reference.model_id if reference is not None else None,
                compared_with_version=(reference.metadata.get("version") or reference.model_id)
                if reference is not None else None,
                scored_on=[r.case_id for r in records], held_out=held_out,
                where=scored_where(len(records), held_out, saved),
                mean_before=pair[1] if pair else None, mean_after=pair[0] if pair else None,
                weaker=weaker(scores) is not None)


def check_case_grids(store: Any, entry: "ModelEntry", max_voxels: int) -> None:
    """Refuse a fine-tune whose saved cases include one larger than ``max_voxels`` at the parent's voxel size.

    Training and scoring resample every case to the parent's ``target_spacing``: a case whose header says 150 mm
    voxels (saving a session's volume runs no model, so nothing refused it there) becomes a grid of hundreds of
    millions of voxels, and the job would take the server's memory and GPU for minutes before failing.
    Checked from each case's header only (:func:`engine.io.read_grid`), before the job exists and without the GPU lock;
    a case whose header cannot be read is left to the run, which names it.

    Raises:
        ServerError: 422 ``too_many_voxels`` naming the case, its grid and spacing, the parent's spacing, the
            resampled grid and the limit.
    """
    from engine.io import VolumeError, read_grid
    from engine.server.volumes import TooManyVoxelsError, check_network_voxels

    for record in store.list():
        try:
            shape, affine = read_grid(record.image_path)
        except (VolumeError, OSError):
            continue
        try:
            check_network_voxels(f"case {record.case_id}", shape, affine, entry.metadata, entry.model_id, max_voxels)
        except TooManyVoxelsError as exc:
            raise ServerError(422, "too_many_voxels", f"{exc}. No fine-tune job was started: remove the case from the "
                              "server's case store, or save it again with the volume's real spacing") from None


def case_list(case_ids: List[str], limit: int = 5) -> str:
    """Case ids for a message: the first ``limit``, then how many more."""
    shown = ", ".join(case_ids[:limit])
    return shown + (f" and {len(case_ids) - limit} more" if len(case_ids) > limit else "")


def no_shared_class_note(entry: "ModelEntry", store: Any) -> Optional[str]:
    """What a client is told when an automatic model is fine-tuned on saved cases that share none of its class names
    (names match case-insensitively, as fine-tuning maps them), else None."""
    from engine.class_names import class_mapping

    parent = [str(n) for n in entry.metadata.get("class_names", [])]
    labelled = max((list(r.class_names) for r in store.list()), key=len, default=[])
    if len(parent) < 2 or len(labelled) < 2 or any(i > 0 for i in class_mapping(parent, labelled)):
        return None
    return (f"model {entry.model_id} segments {parent[1:]} but the saved cases are labelled {labelled[1:]}: no class "
            "name is shared, so every class starts untrained and is learnt from these cases alone, and a short run may "
            "predict nothing (classes match by name: name the cases' classes as the model's if they are the same)")


@dataclass
class Job:
    """A fine-tune job's state as clients see it.

    ``scores`` and ``warning``: the new model is scored after training (:func:`finetune_scores`), against its
    parent, or for a promptable model made from an automatic one against the promptable model in use when the job
    started; ``warning`` says so when the new model is weaker. Both None while it trains or scores, and for a job
    that made no model. ``not_scored``: why a job that made its model has no ``scores`` (its scoring was cancelled
    or failed; the model is kept all the same), else None.

    ``note``: set when the job starts, where its automatic model shares no class name with the saved cases: every
    class then starts untrained (the CLI's ``finetune`` warns of it; the server said nothing), else None.

    ``stop_requested``: a client asked the job to stop and keep its model (``POST /finetune/{job}/stop``);
    ``stopped_at``: the step at which such a stop ended the training, the model of that step kept (None when the run
    ended by its steps or time limit, or made no model).
    """

    job_id: str
    parent: str
    out_id: str
    total: int
    state: str = "running"
    step: int = 0
    loss: Optional[float] = None
    message: str = "starting"
    error: Optional[str] = None
    model_id: Optional[str] = None
    scores: Optional[Dict[str, Any]] = None
    warning: Optional[str] = None
    not_scored: Optional[str] = None
    note: Optional[str] = None
    started: float = field(default_factory=time.time)
    finished: Optional[float] = None
    cancel: Any = None
    thread: Optional[threading.Thread] = None
    stop_requested: bool = False
    stopped_at: Optional[int] = None

    def to_json(self) -> Dict[str, Any]:
        # an ending job is "running" to clients until its thread has freed the GPU (``finished``): a client told the
        # job failed then found the server still busy for the moment its run folder took to be discarded
        state = self.state if self.finished is not None or self.thread is None else "running"
        return {"job_id": self.job_id, "state": state, "step": self.step, "total": self.total,
                "loss": self.loss, "message": self.message, "error": self.error, "model_id": self.model_id,
                "parent": self.parent, "seconds": (self.finished or time.time()) - self.started,
                "scores": self.scores, "warning": self.warning, "not_scored": self.not_scored, "note": self.note,
                "stop_requested": self.stop_requested, "stopped_at": self.stopped_at}


class JobManager:
    """Fine-tune jobs run one at a time in a thread holding the GPU lock until they end."""

    def __init__(self, gpu: GpuLock, models: ModelRegistry, cases_dir: Optional[Path], device: str,
                 set_aside: Optional[List[str]] = None) -> None:
        self.gpu = gpu
        self.models = models
        self.cases_dir = cases_dir
        self.device = device
        self.jobs: Dict[str, Job] = {}
        self.paths = ServerPaths(models.models_dir, cases_dir)  # how a job's error names the server's files
        # before any listing offers their checkpoints; ``set_aside``: done already, before the registry chose its
        # active model (it could have chosen an interrupted run's)
        self.set_aside = set_aside if set_aside is not None else set_aside_interrupted_runs(models.models_dir)
        self.closing = False

    def interrupt_all(self) -> None:
        """The server is stopping: every running job ends at its next step (:meth:`wait_ended`). Its run is neither
        kept nor discarded: its marker stays, so the next start sets the run aside (:func:`set_aside_interrupted_runs`)
        as it does after a crash; a job is not killed inside torch at Python's exit (a segmentation fault or abort)."""
        self.closing = True
        for job in list(self.jobs.values()):
            if job.state == "running":
                job.cancel.cancel()

    def wait_ended(self, timeout_s: float) -> List[str]:
        """Wait up to ``timeout_s`` in all for the job threads; the ids of jobs still running after it."""
        deadline = time.monotonic() + timeout_s
        for job in list(self.jobs.values()):
            thread = getattr(job, "thread", None)
            if thread is not None and thread.is_alive():
                thread.join(max(0.0, deadline - time.monotonic()))
        return [j.job_id for j in self.jobs.values() if getattr(j, "thread", None) is not None and j.thread.is_alive()]

    def start(self, steps: int, model_id: Optional[str], settings: Dict[str, Any],
              compare_with: Optional[str] = None, max_voxels: Optional[int] = None) -> Job:
        """Start a fine-tune job (it holds the GPU lock until it ends, its new model scored).

        Args:
            steps: training steps.
            model_id: the model to start from (None: the active one).
            settings: :data:`FINETUNE_SETTINGS`.
            compare_with: for a promptable model made from an automatic one (``settings.task = "interactive"``),
                the promptable model to score it against; None: the one a prompt naming no model would use
                now (:meth:`ModelRegistry.interactive_entry`: in the end the bundled one).
            max_voxels: the server's ``--max-voxels``: a saved case larger than this at the parent's voxel size is
                refused before the job starts (:func:`check_case_grids`); None: not checked.
        """
        from engine.cases import CaseStore
        from engine.progress import CancelToken

        if self.models.models_dir is None or self.cases_dir is None:
            raise ServerError(501, "not_configured", "fine-tuning needs a server started with --models and --cases")
        if not 1 <= int(steps) <= MAX_FINETUNE_STEPS:
            raise ServerError(400, "invalid_request",  # cut: a JSON integer may have thousands of digits
                              f"steps must be between 1 and {MAX_FINETUNE_STEPS}, got {_cut(str(steps), 80)}")
        kwargs: Dict[str, Any] = {}
        for key, value in settings.items():
            if key not in FINETUNE_SETTINGS:
                shown = _cut(repr(key), 80)
                raise ServerError(400, "invalid_request", f"unknown fine-tune setting {shown}; "
                                                          f"allowed: {sorted(FINETUNE_SETTINGS)}", sent=(shown,))
            if value is not None:
                kwargs[key] = finetune_setting(key, value)
        entry = self.models.get(model_id)
        if entry.path is None:
            raise ServerError(400, "invalid_request", f"model {entry.model_id!r} lives only in memory; "
                                                      "fine-tuning starts from a checkpoint file")
        check_finetune_task(kwargs.get("task"), entry)
        # a promptable model made from an automatic one is scored against the promptable model in use now
        promptable = kwargs.get("task") == "interactive" and entry.task != "interactive"
        if compare_with is not None and not promptable:
            raise ServerError(400, "invalid_request", "compare_with names the promptable model to score a new "
                                                      "promptable model against; this job makes none "
                                                      "(settings.task 'interactive' on an automatic model does)")
        # any other new model is compared with its parent, as in napari's local Fine-tune section
        reference: Optional[ModelEntry] = entry
        if promptable:
            if compare_with is not None:
                reference = self.models.prompt_entry(compare_with)  # 400/404 before any job exists
            else:
                try:
                    reference = self.models.interactive_entry()
                except ServerError:
                    reference = None  # no promptable model on this server: nothing to compare with
        interactive = promptable or entry.task == "interactive"  # a promptable model is scored by prompting it
        store = CaseStore(self.cases_dir)
        if len(store) == 0:
            raise ServerError(409, "no_cases", "no cases saved on this server yet; save a corrected case first")
        if max_voxels is not None:
            check_case_grids(store, entry, max_voxels)  # before the GPU lock: a refusal holds nobody up
        note = None if interactive else no_shared_class_note(entry, store)
        job_id = secrets.token_hex(6)
        out_id = f"finetune-{time.strftime('%Y%m%d-%H%M%S')}-{job_id}"
        self.gpu.acquire(f"fine-tune job {job_id}")
        job = Job(job_id=job_id, parent=entry.model_id, out_id=out_id, total=int(steps), cancel=CancelToken(),
                  note=note)
        out = self.models.models_dir / out_id
        try:
            marker: Optional[Path] = mark_running(self.models.models_dir, out_id, job_id)
        except OSError:  # an unwritable models folder: the run itself fails and says so
            log.warning("could not mark fine-tune run %s as running", out, exc_info=True)
            marker = None
        # not listed, nor selectable, until its model is made (also where the marker could not be written)
        self.models.training[out_id] = job_id
        self.jobs[job_id] = job

        def unmark() -> None:
            self.models.training.pop(out_id, None)
            if marker is not None:
                unmark_running(marker)

        stage = "before training started"  # where the job is, for the sentence a failure is told in

        def progress(done: int, total: int, message: str) -> None:
            nonlocal stage
            job.step = int(done)
            # a step reported after a stop was asked must not hide "stopping..." until the loop says how it stops
            if not (job.stop_requested and job.message.startswith("stopping") and not message.startswith("stopping")):
                job.message = str(message)
            job.total = int(total) or job.total
            if message.startswith("preprocessing"):  # "preprocessing training case abc", then the count's end
                stage = f"while {message}" if done < total else "before training started"
            elif message == "training" or message.startswith("step "):
                stage = "during training"

        def on_log(record: Dict[str, Any]) -> None:
            nonlocal stage
            stage = "during training"
            if record.get("loss") is not None:
                job.loss = float(record["loss"])
            job.step = int(record.get("step", job.step))

        def failed_text(exc: BaseException) -> str:
            where = f"during training at step {job.step} of {job.total}" if stage == "during training" else stage
            return client_text(exc, f"fine-tune job {job_id} of model {entry.model_id} failed {where}", self.paths)

        def score(best: Path, run_dir: Path) -> None:
            """The new model's before/after scores (the GPU lock still held). The model is made and kept whatever
            comes of them: a cancelled or failed scoring leaves ``scores`` None and says why in ``not_scored``
            (and the message) as :func:`client_text` words it: a deliberate error's message, else which job's model
            failed to be scored on which cases, never an unexpected exception's own text."""
            from engine.progress import Cancelled
            from engine.scoring import held_out_cases, weaker_note

            what = "the new promptable model" if promptable else "the new model"

            def scoring(done: int, total: int, message: str) -> None:  # training's step/total stay as they ended
                job.message = f"scoring {what}: {message}"

            job.message = f"scoring {what} with the robot user" if interactive else f"scoring {what}"
            records: List[Any] = []
            try:
                saved = store.list()
                records, held_out = held_out_cases(saved, run_dir)
                job.scores = finetune_scores(best, reference, records, held_out, len(saved), interactive, self.device,
                                             cancel=job.cancel, progress=scoring)
                if reference is not None:
                    job.warning = weaker_note(reference.model_id, job.scores, interactive=interactive) or None
            except Cancelled:
                job.scores, job.not_scored = None, "its scoring was cancelled by the user"
            except Exception as exc:  # noqa: BLE001 - the model is made; only its score is missing
                ids = [r.case_id for r in records]
                on = f"{len(ids)} saved case(s) ({case_list(ids)})" if ids else "the saved cases"
                job.scores, job.warning = None, None
                job.not_scored = client_text(exc, f"the scoring of fine-tune job {job_id}'s new model {job.model_id} "
                                                  f"on {on} failed", self.paths, say_what_failed=True)
            job.message = f"finished; made but not scored: {job.not_scored}" if job.not_scored else "finished"

        def work() -> None:
            from engine.progress import Cancelled
            from engine.train.config import RESUME_FILE
            from engine.train.run_folder import keep_one_checkpoint

            nonlocal stage
            keep_marker = False  # a server stopping mid-run leaves the run to be set aside at its next start
            try:
                result = run_finetune(entry.path, store, out, steps=int(steps), device=self.device,
                                      progress=progress, cancel=job.cancel, on_log=on_log,
                                      command=f"mambahome serve: fine-tune job {job_id}", **kwargs)
                # its model is made: a server stopped while it is scored keeps it, and so does a run a client stopped
                # and kept (a finished run, not an interrupted one: its marker goes here like any other's)
                unmark()
                # the engine keeps a run's resume state when it ends before its last step (a time limit, a stop) so
                # that `train --resume` can go on; no client resumes a server job, and each left tens of MB in --models
                if result.run_dir is not None:
                    try:
                        (Path(result.run_dir) / RESUME_FILE).unlink(missing_ok=True)
                    except OSError:  # held open (a virus scanner), read-only: disk spent, the model is what counts
                        log.warning("could not remove %s", Path(result.run_dir) / RESUME_FILE, exc_info=True)
                stage = "after training, while naming its new model"
                if stopped_and_kept(job, result):
                    job.stopped_at = int(result.steps_done)
                best = result.best_checkpoint or result.last_checkpoint
                job.model_id = Path(best).relative_to(self.models.models_dir).with_suffix("").as_posix() if best else None
                if best and result.run_dir is not None:  # one version per job (best and last were listed as two)
                    try:
                        keep_one_checkpoint(result.run_dir, best)
                    except OSError:  # held open, read-only: listed twice, the model is what counts
                        log.warning("could not remove the other checkpoints of %s", result.run_dir, exc_info=True)
                job.message = "finished"
                if best:
                    score(Path(best), Path(result.run_dir or out))
                if job.stopped_at is not None:  # said after the scoring's own words, which it must not hide
                    job.message += f" (stopped as asked at step {job.stopped_at}; the model of that step is kept)"
                job.state = "done"
            except Cancelled:
                job.state, job.message = "cancelled", "cancelled by the user"
                if self.closing:
                    job.message = "interrupted: the server was stopped; its run is set aside at the next start"
                    keep_marker = True
                    return
                if job.stop_requested and not job.cancel.cancelled:
                    # a stop before the first training step ended has nothing to keep: the parent's weights saved as
                    # a new version would pass the parent off as a fine-tuned model (engine.train.loop.train)
                    job.message = ("stopped before its first training step finished: nothing was trained, so no "
                                   "model was kept")
                job.model_id = None
                discard_run(out)
            except Exception as exc:  # noqa: BLE001 - reported to the client, the server lives on
                job.state, job.error = "failed", failed_text(exc)
                job.message = "failed"
                job.model_id = None
                discard_run(out)
            finally:
                if not keep_marker:
                    unmark()  # after discard_run: a stop in between still sets the folder aside
                self.gpu.release()
                job.finished = time.time()  # only now do clients see the job ended (Job.to_json): the GPU is free

        job.thread = threading.Thread(target=work, name=f"finetune-{job_id}", daemon=True)
        try:
            job.thread.start()
        except BaseException:
            unmark()
            self.gpu.release()
            raise
        return job

    def get(self, job_id: str) -> Job:
        check_id(job_id, JOB_ID, "job id")
        job = self.jobs.get(job_id)
        if job is None:
            # jobs live in the server's memory; a job of an earlier run of the server left its run folder set aside
            # (named after the job), and its client should learn that, not that the job never existed
            models_dir = self.models.models_dir
            if models_dir is not None and next(Path(models_dir).glob(f".interrupted-finetune-*-{job_id}"), None):
                raise not_found(f"fine-tune job {job_id!r} was interrupted: the server stopped while it trained, and "
                                "jobs do not outlive a restart; it made no model (its run folder is set aside). "
                                "Start the fine-tune again")
            raise not_found(f"no fine-tune job {job_id!r}")
        return job

    def cancel(self, job_id: str) -> Job:
        job = self.get(job_id)
        if job.state == "running":
            job.cancel.cancel()
            job.message = "cancelling"
        return job

    def stop(self, job_id: str) -> Job:
        """Ask a running job to end its training at the next step and keep the model of that step ("stop and keep",
        :meth:`engine.progress.CancelToken.request_stop`): validated and saved as a spent time limit would leave it,
        then scored as any new model. Asked before the first step finished, there is nothing to keep: the job ends
        ``cancelled``. Asked while the job scores its model (made and kept already), it changes nothing.

        Idempotent: a second stop, also one that arrives after the stop ended the job, answers the job as it is. A
        job that ended without being asked to stop is a ``409 job_ended`` (nothing to stop; a client that pressed
        Stop as the job finished learns what became of it from the job itself)."""
        job = self.get(job_id)
        if job.state == "running":
            if not job.stop_requested:
                job.stop_requested = True
                job.cancel.request_stop()
                if job.model_id is None and not job.cancel.cancelled:  # still training: say the stop was taken
                    # what the stop will keep depends on where the run is: before training nothing (the loop's
                    # NothingToKeep); once steps are reported, the model of the step under way
                    if job.message == "starting" or job.message.startswith("preprocessing"):
                        job.message = "stopping: its cases are still being prepared, so no model will be kept"
                    elif job.message.startswith("step "):
                        job.message = "stopping: the model of the step under way will be kept"
                    else:
                        job.message = ("stopping at the next step: its model will be kept (none if the first "
                                       "training step has not finished)")
            return job
        if job.stop_requested:
            return job
        raise ServerError(409, "job_ended", f"fine-tune job {job_id} has already ended ({job.state}); there is "
                                            f"nothing to stop")
