"""Remote mode: the dock's segmentation, prompts, cases and fine-tuning run on a ``mambahome serve`` server.

The :class:`._session.Session` delegates to one :class:`RemoteBackend` while a connection is active;
the panels stay the same. Everything here that talks to the server is a job function
(``run(progress, cancel[, log])``) started in the session's job slot, never called on the GUI thread.

A volume travels once: :class:`UploadCache` keeps the server's session id per image (keyed by the
image layer and a digest of its data, modality and affine), so a second segmentation, a saved case or
the prompts of :class:`RemotePromptBackend` reuse it, and a changed layer is uploaded again. Arrays
travel in the engine's file voxel order ``(I, J, K)`` with the RAS affine; the segment panel turns
the answer into the layer's display order as it does for a local prediction.
"""
from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from mambahome_client import (AuthError, BusyError, Client, NotFoundError, PayloadTooLargeError,
                              ProtocolMismatchError, ServerError, ServerUnavailableError, SessionChangedError,
                              TooManyVoxelsError)

from ._models import ModelEntry

POLL_S = 0.5
"""Seconds between two polls of a server fine-tune job."""
HELD_OUT_MIN_CASES = 6
"""As in the local fine-tune: with at least this many cases a fifth is held out for validation."""


class RemoteError(RuntimeError):
    """A server call failed; the message says what happened and what to do (shown as it is)."""

    plain_message = True  # the session shows the message without the exception's class name


def explain(exc: BaseException, url: str) -> str:
    """A user-facing sentence for a client error (unreachable, refused token, busy, too large...)."""
    detail = str(exc)
    if isinstance(exc, ServerUnavailableError):
        return (f"the server {url} cannot be reached: is `mambahome serve` running there (and the SSH tunnel "
                f"up)? ({detail})")
    if isinstance(exc, ProtocolMismatchError):
        return f"the server {url} speaks another protocol version: {detail}"
    if isinstance(exc, AuthError):
        which = "needs a token" if exc.status == 401 else "refused the token"
        return f"the server {url} {which} (HTTP {exc.status}); enter the token the server was started with"
    if isinstance(exc, BusyError):
        return (f"the server {url} is busy (its GPU runs another job, or all its sessions are taken); "
                f"try again in a moment ({detail})")
    if isinstance(exc, PayloadTooLargeError):
        return (f"the image is too large for the server {url}: crop or downsample it, or start the server with a "
                f"larger --max-upload-mb ({detail})")
    if isinstance(exc, TooManyVoxelsError):  # the voxel count, not the bytes: --max-upload-mb would not help
        return (f"the image has more voxels than the server {url} accepts: crop or downsample it, or start the "
                f"server with a larger --max-voxels ({detail})")
    if isinstance(exc, NotFoundError):
        return f"the server {url} no longer has it: {detail}"
    if getattr(exc, "status", None) == 429:
        # the server's own advice (DELETE /sessions/<id>) is for programs; a napari user cannot act on it
        return (f"the server {url} holds as many images for this computer as it allows (its "
                "--max-sessions-per-client): wait until one you no longer prompt on expires after sitting idle, or "
                f"ask whoever runs the server for a larger limit ({detail})")
    if getattr(exc, "status", None) == 408:
        return (f"the upload to the server {url} stalled and was cut off (its --body-timeout): check the network or "
                f"the SSH tunnel and try again ({detail})")
    return f"the server {url} answered: {detail}"


def _guarded(func: Callable[..., Any], url: str) -> Callable[..., Any]:
    """``func`` with client errors turned into :class:`RemoteError` (clear notifications)."""

    def run(**kwargs: Any) -> Any:
        try:
            return func(**kwargs)
        except ServerError as exc:
            raise RemoteError(explain(exc, url)) from None

    return run


# ----------------------------------------------------------------------------- models
@dataclass
class RemoteModelEntry(ModelEntry):
    """A model version held by the server (selected there, never loaded here).

    Attributes:
        model_id: the server's id of the model (``default``, ``finetune-.../best``...).
        server: the server's URL (shown in the description).
    """

    model_id: str = ""
    server: str = ""

    @property
    def label(self) -> str:
        return f"{self.version} (server: {self.model_id})"

    def prompt_problem(self) -> Optional[str]:
        # the server holds the weights and the prompt encoding, and checks them when prompted
        return None if self.is_interactive else f"{self.model_id} on the server is not a promptable model"

    @property
    def prompt_source(self) -> str:
        """The server's id of the model: what :func:`remote_backend_factory` prompts with."""
        return self.model_id

    def training_data(self) -> Tuple[bool, int, int]:
        # the server reads the checkpoint (and its parent's) and lists the answer; a server that does not: unknown
        cases = self.metadata.get("training_cases") or {}
        return (bool(self.metadata.get("phantoms_only")), int(cases.get("real") or 0),
                int(cases.get("phantoms") or 0))

    def real_scans_since_demo(self) -> Optional[int]:
        # the server follows the checkpoint's parents and lists the answer; a server that does not: unknown
        count = self.metadata.get("real_scans_since_demo")
        return int(count) if isinstance(count, int) and not isinstance(count, bool) else None

    def summary(self, num_parameters: Optional[int] = None, backend: Optional[str] = None) -> str:
        lines = [f"classes: {', '.join(self.class_names) or '?'}", self.trained_on()]
        if self.parent:
            lines.append(f"fine-tuned from: {self.parent}")
        lines.append(f"runs on the server {self.server} (model id {self.model_id})")
        return "\n".join(lines)


def entries_from_listing(listing: Dict[str, Any], server: str) -> List[RemoteModelEntry]:
    """The models of a ``GET /models`` answer: segmentation models, and promptable ones (task
    ``interactive``; the Segment section refuses those, the Interactive section offers them)."""
    out = []
    for m in listing.get("models", []):
        task = m.get("task", "segmentation")
        if task not in ("segmentation", "interactive"):
            continue  # a task this client does not know
        meta = {"version": m.get("version") or m["id"], "class_names": list(m.get("class_names") or []),
                "modality": m.get("modality"), "parent": m.get("parent"), "class_colors": m.get("colors"),
                # a server that lists what each model was trained on is shown as such; one that does not (the
                # field is optional) falls back to the model's one modality (engine.checkpoint.modalities_seen)
                "modalities_seen": m.get("modalities_seen"),
                "phantoms_only": m.get("phantoms_only"), "training_cases": m.get("training_cases"),
                "real_scans_since_demo": m.get("real_scans_since_demo"),
                "task": {"name": task}}
        out.append(RemoteModelEntry(path=Path(m["id"]), metadata=meta, origin="remote", model_id=str(m["id"]),
                                    server=server))
    return out


# ----------------------------------------------------------------------------- uploads
def volume_digest(data_ijk: np.ndarray, affine: np.ndarray, modality: Optional[str]) -> str:
    """A digest of what the server holds for a volume: voxels, grid and modality."""
    h = hashlib.blake2b(digest_size=16)
    h.update(repr((data_ijk.shape, data_ijk.dtype.str, modality)).encode())
    h.update(np.ascontiguousarray(affine, dtype=np.float64).tobytes())
    h.update(memoryview(np.ascontiguousarray(data_ijk)).cast("B"))
    return h.hexdigest()


class UploadCache:
    """The server's session id of each uploaded volume: a volume is sent once, again only when it changed.

    Thread-safe (used from worker threads). Args:
        client: the connected client.
    """

    def __init__(self, client: Client) -> None:
        self.client = client
        self._lock = threading.Lock()
        self._by_digest: Dict[str, str] = {}
        self._digest_of_key: Dict[Any, str] = {}
        self.uploads = 0  # how many volumes were sent (tests and the status line)

    def session_for(self, data_ijk: np.ndarray, affine: np.ndarray, name: str = "volume",
                    modality: Optional[str] = None, key: Any = None) -> str:
        """The server session holding this volume, uploading it if the server has not got it yet.

        Args:
            data_ijk: ``(I, J, K)`` voxels in file order.
            affine: ``(4, 4)`` RAS voxel-to-world matrix.
            name: shown in the server's messages and saved with cases.
            modality: the image's modality.
            key: the image's owner (an image layer); its previous upload is dropped when it changes.
        """
        data = np.asarray(data_ijk)
        digest = volume_digest(data, affine, modality)
        with self._lock:
            sid = self._by_digest.get(digest)
            old = self._digest_of_key.get(key) if key is not None else None
        if sid is None:
            sid = self.client.create_session(np.ascontiguousarray(data), affine, name=name,
                                             modality=modality).session_id
            with self._lock:
                self._by_digest[digest] = sid
                self.uploads += 1
        if key is not None:
            with self._lock:
                self._digest_of_key[key] = digest
            if old is not None and old != digest:
                self._close(old)
        return sid

    def forget(self, session_id: str) -> None:
        """The server dropped ``session_id`` (expired); the next call uploads again."""
        with self._lock:
            for digest, sid in list(self._by_digest.items()):
                if sid == session_id:
                    del self._by_digest[digest]

    def _close(self, digest: str) -> None:
        with self._lock:
            sid = self._by_digest.pop(digest, None)
        if sid is not None:
            try:
                self.client.close_session(sid)
            except ServerError:
                pass  # it expired already; nothing is lost

    def with_session(self, call: Callable[[str], Any], data_ijk: np.ndarray, affine: np.ndarray, name: str,
                     modality: Optional[str], key: Any = None) -> Any:
        """``call(session_id)``, uploading again once if the server dropped an idle session."""
        sid = self.session_for(data_ijk, affine, name, modality, key)
        try:
            return call(sid)
        except NotFoundError:
            self.forget(sid)
            return call(self.session_for(data_ijk, affine, name, modality, key))


# ----------------------------------------------------------------------------- prompts
@dataclass
class RemoteUpdate:
    """A prompt's answer, as the local backend's ``Update``: the mask inside ``bbox`` is now ``mask``.

    Attributes:
        bbox: three slices in file voxel order.
        mask: ``uint8`` array of the bbox's shape.
        latency_s: wall time of the round trip.
        server_s: time the server's model took.
        note: what the annotator should know about this answer (the object was reloaded whole), else None.
    """

    bbox: Tuple[slice, slice, slice]
    mask: np.ndarray
    latency_s: float
    server_s: float = 0.0
    model_id: Optional[str] = None
    note: Optional[str] = None


class RemotePromptBackend:
    """The interactive panel's prompt backend over the server (structurally a ``prompting.PromptBackend``).

    The volume is uploaded at the first prompt (through ``uploads``, so a volume already sent for
    segmentation is reused); then only prompts travel, and each answer is the changed bbox. Call its
    methods in a worker: each is one HTTP round trip.

    One backend is one object prompted with one model, as a local ``InteractiveSession``: every call
    names ``model_id`` (the model the annotator chose in the Interactive section) and the server answers
    with that model, never with another one of its choosing; an answer from another model is refused.
    The backend's first call starts a fresh object on the server (the server session is shared with
    earlier backends of the same volume, whose prompts must not leak into this object). To prompt with
    another model, make a new backend: the panel does so when the model is switched, which ends the
    current object (kept in the labels as drawn) and starts the next one with the new model.

    Args:
        client: the connected client.
        volume: an ``engine.io.Volume`` (file voxel order ``(I, J, K)``, RAS affine) or a bare array.
        uploads: the shared upload cache (a new one when ``None``).
        name: the volume's name on the server.
        modality: the image's modality.
        model_id: the server's promptable model to answer with; ``None`` leaves the choice to the server
            (its rule: the active model if promptable, else the user's promptable model, else the bundled).
    """

    def __init__(self, client: Client, volume: Any, uploads: Optional[UploadCache] = None, name: str = "volume",
                 modality: Optional[str] = None, model_id: Optional[str] = None) -> None:
        self.client = client
        self.model_id = model_id
        self._fresh = True  # the server's prompt state may hold an earlier backend's object
        self.uploads = uploads or UploadCache(client)
        self.data = np.asarray(getattr(volume, "data", volume))
        if self.data.ndim != 3:
            raise ValueError(f"{name}: prompts need a 3D volume, got shape {self.data.shape}")
        self.affine = np.asarray(getattr(volume, "affine", np.eye(4)), dtype=np.float64)
        self.name = name
        self.modality = modality or getattr(volume, "modality", None)
        self._session_id: Optional[str] = None

    @property
    def shape(self) -> Tuple[int, int, int]:
        return tuple(int(s) for s in self.data.shape)  # type: ignore[return-value]

    def _call(self, send: Callable[[str], Any]) -> RemoteUpdate:
        if self._session_id is None:
            self._session_id = self.uploads.session_for(self.data, self.affine, self.name, self.modality)
        try:
            if self._fresh:
                # the answer (an earlier object cleared) concerns no object of this backend: dropped
                try:
                    self.client.reset(self._session_id, model_id=self.model_id)
                except SessionChangedError:
                    # the server did reset; another client's earlier prompts only moved the revision this client
                    # counts from (re-synced by the client): the prompt goes on, into the fresh object
                    pass
                self._fresh = False
            u = send(self._session_id)
            note = None
        except SessionChangedError:
            # another client (a second napari, Slicer) changed this object on the server meanwhile: the answer is a
            # patch of a mask this window no longer shows, so the whole object is fetched and shown instead
            u = self.client.object_mask(self._session_id)
            note = (f"another client changed this object on the server {self.client.url}; the object now shows the "
                    "server's, with that client's prompts in it (Undo takes back the newest prompt, whoever made it)")
        except NotFoundError as exc:
            if exc.code == "unknown_model":  # the session is there, the chosen model is not (removed on the server)
                raise RemoteError(explain(exc, self.client.url)) from None
            # the server dropped the idle session and its prompt history with it: start over next time
            self.uploads.forget(self._session_id)
            self._session_id, self._fresh = None, True
            raise RemoteError(f"the server {self.client.url} dropped this volume's session (idle too long) and "
                              "its prompts with it; press Reset and prompt again") from None
        except ServerError as exc:
            raise RemoteError(explain(exc, self.client.url)) from None
        if self.model_id is not None and u.model_id != self.model_id:
            # a server that does not know the field answers with its own choice: never show that as ours
            raise RemoteError(f"the server {self.client.url} answered with the model {u.model_id!r}, not the chosen "
                              f"{self.model_id!r}: it is too old to prompt with a chosen model; update it")
        return RemoteUpdate(bbox=u.bbox, mask=np.asarray(u.mask).astype(np.uint8), latency_s=u.latency_s,
                            server_s=u.server_s, model_id=u.model_id, note=note)

    def add_point(self, voxel: Sequence[int], positive: bool = True) -> RemoteUpdate:
        """A click at voxel ``(i, j, k)`` (file order)."""
        return self._call(lambda sid: self.client.add_point(sid, voxel, positive, model_id=self.model_id))

    def add_box(self, corner_a: Sequence[int], corner_b: Sequence[int], positive: bool = True) -> RemoteUpdate:
        """A box between two opposite corners (file voxel order, inclusive)."""
        return self._call(lambda sid: self.client.add_box(sid, corner_a, corner_b, positive, model_id=self.model_id))

    def add_scribble(self, voxels_or_mask: Any, positive: bool = True, joined: bool = True) -> RemoteUpdate:
        """A scribble: voxel indices ``(N, 3)`` (``joined``: a drawn stroke's points, joined by straight lines; else a
        painted stroke's voxels as they are) or a boolean mask of the volume's shape (its voxels, never joined)."""
        v = np.asarray(voxels_or_mask)
        if v.ndim == 3 and v.shape == self.shape:
            # raster-ordered voxels of a mask, joined as a polyline, filled the inside of a curved stroke
            v, joined = np.argwhere(v), False
        if v.size == 0:
            raise ValueError("a scribble needs at least one voxel")
        return self._call(lambda sid: self.client.add_scribble(sid, v.reshape(-1, 3), positive,
                                                               model_id=self.model_id, joined=joined))

    def set_initial_mask(self, mask: np.ndarray) -> RemoteUpdate:
        """Start from an existing mask (a segmentation to refine), ``(I, J, K)`` of the volume's shape."""
        m = np.asarray(mask)
        if m.shape != self.shape:
            raise ValueError(f"initial mask of shape {m.shape} does not lie on the volume of shape {self.shape}")
        return self._call(lambda sid: self.client.set_initial_mask(sid, m, model_id=self.model_id))

    def undo(self) -> RemoteUpdate:
        """Take back the last prompt (the server keeps the history)."""
        return self._call(lambda sid: self.client.undo(sid, model_id=self.model_id))

    def reset(self) -> RemoteUpdate:
        """Forget every prompt; the mask becomes empty."""
        return self._call(lambda sid: self.client.reset(sid, model_id=self.model_id))


def remote_backend_factory(client: Client, uploads: Optional[UploadCache] = None
                           ) -> Callable[..., RemotePromptBackend]:
    """A ``prompt_backend_factory`` over the server, with the local factory's call signature.

    Args:
        client: the connected client.
        uploads: the upload cache shared with segmentation (volumes already sent are reused).

    Returns:
        ``factory(model, volume, device, name=..., modality=...)``: ``model`` is the server's id of the
        promptable model to answer with (a ``RemoteModelEntry.prompt_source``; the entry itself is
        taken too) or ``None`` for the server's choice; the device is the server's business. A model of
        this computer (a checkpoint path or ``(model, metadata)``) is refused with a clear message: the
        server cannot prompt with it.
    """
    shared = uploads or UploadCache(client)

    def factory(model: Any, volume: Any, device: Any = None, name: str = "volume",
                modality: Optional[str] = None) -> RemotePromptBackend:
        if isinstance(model, RemoteModelEntry):
            model = model.model_id
        if model is not None and not isinstance(model, str):
            where = f"the file {model}" if isinstance(model, Path) else "a model in this computer's memory"
            raise RemoteError(f"{where} cannot prompt on the server {client.url}: while connected, choose one of "
                              "the server's promptable models (or work locally: Device auto/CPU/GPU)")
        return RemotePromptBackend(client, volume, uploads=shared, name=name, modality=modality, model_id=model)

    return factory


# ----------------------------------------------------------------------------- segmentation
@dataclass
class RemotePrediction:
    """A server segmentation shaped like ``engine.inference.Prediction`` for the segment panel.

    Attributes:
        labels: ``(I, J, K)`` class indices in file voxel order.
        warnings: the server's doubts about the result (a modality the model never saw), shown with it.
    """

    labels: np.ndarray
    class_names: List[str]
    seconds: float
    device_used: str
    notes: List[str] = field(default_factory=list)
    model_id: str = ""
    warnings: List[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- the backend
def connect_job(url: str, token: Optional[str], timeout: float = 600.0) -> Callable[..., Any]:
    """A job function that connects (protocol and token checked) and reads the models and cases.

    Returns:
        ``run(progress, cancel) -> (client, version_info, models_listing, cases)``.
    """

    def run(progress: Callable[[int, int, str], None], cancel: Any) -> Tuple[Client, Dict[str, Any], Any, Any]:
        progress(0, 0, f"connecting to {url}…")
        client = Client(url, token=token or None, timeout=timeout)
        info = client.connect()
        return client, info, client.models(), client.cases()

    return _guarded(run, url)


class RemoteBackend:
    """What the session does differently while connected to a server.

    Args:
        session: the dock's :class:`._session.Session`.
        client: a connected client.
        info: the server's ``/version`` answer.

    Attributes:
        entries: the server's segmentation models (shown as the session's model list).
        cases: the server's case records (``case_id``, ``modality``...), refreshed after each save.
        uploads: the volumes sent, by image layer.
    """

    def __init__(self, session: Any, client: Client, info: Dict[str, Any]) -> None:
        self.session = session
        self.client = client
        self.info = info
        self.url = client.url
        self.entries: List[RemoteModelEntry] = []
        self.cases: List[Dict[str, Any]] = []
        self.uploads = UploadCache(client)
        self.prompt_backend_factory = remote_backend_factory(client, self.uploads)

    def describe(self) -> str:
        return f"server {self.url} (version {self.info.get('version')}, protocol {self.info.get('protocol')})"

    def owns(self, entry: Any) -> bool:
        return isinstance(entry, RemoteModelEntry) and entry.server == self.url

    def case_records(self) -> List[Any]:
        """The server's cases as records with ``case_id`` and ``modality`` (for the cases list)."""
        return [SimpleNamespace(**c) for c in self.cases]

    @property
    def can_stop_jobs(self) -> bool:
        """Whether the server takes Stop and keep for its fine-tune jobs (its ``finetune_stop`` capability; a server
        before it can only cancel them). Read from its ``/version`` answer: no request."""
        return bool(self.client.can_stop_jobs)

    def _start(self, func: Callable[..., Any], **kwargs: Any) -> Any:
        return self.session.start_job(_guarded(func, self.url), engine=False, **kwargs)  # the server runs torch

    # ------------------------------------------------------------------ models
    def apply_listing(self, listing: Dict[str, Any], select: Optional[str] = None) -> None:
        """Show the server's models; select ``select`` (default: the server's active model) here."""
        self.entries = entries_from_listing(listing, self.url)
        self.session.entries = list(self.entries)
        self.session.models_changed.emit()
        wanted = select or listing.get("active")
        chosen = next((e for e in self.entries if e.model_id == wanted), self.entries[0] if self.entries else None)
        self.session.current_model = chosen
        if chosen is not None:
            self.session.model_changed.emit(chosen)

    def _listing_job(self, call: Callable[[], Dict[str, Any]], what: str) -> Any:
        def run(progress: Callable[[int, int, str], None], cancel: Any) -> Dict[str, Any]:
            progress(0, 0, f"{what} on the server…")
            return call()

        def failed_or_cancelled(outcome: str) -> None:
            if outcome != "done" and self.session.current_model is not None:
                self.session.model_changed.emit(self.session.current_model)  # the boxes show it again

        return self._start(run, what=what, on_done=self.apply_listing, on_finished=failed_or_cancelled)

    def select_model(self, entry: RemoteModelEntry) -> Any:
        """Make ``entry`` the server's active model (in a worker); the session follows when it answered."""
        return self._listing_job(lambda: self.client.select_model(entry.model_id), f"selecting {entry.version}")

    def rollback_model(self) -> Any:
        """Go back to the model the server used before the last selection."""
        return self._listing_job(self.client.rollback_model, "rolling back the model")

    # ------------------------------------------------------------------ segmentation
    def segment_job(self, layer: Any, volume: Any, modality: str, entry: RemoteModelEntry) -> Callable[..., Any]:
        """The segment panel's job function: upload (once) and segment on the server.

        Args:
            layer: the image layer (the upload cache's key).
            volume: its ``engine.io.Volume`` in file voxel order.
            modality: the confirmed modality.
            entry: the model to use.

        Returns:
            ``run(progress, cancel) -> RemotePrediction`` (labels in file voxel order).
        """
        uploads, client, url = self.uploads, self.client, self.url
        data, affine = np.asarray(volume.data), np.asarray(volume.affine, dtype=np.float64)
        key = id(layer)

        def run(progress: Callable[[int, int, str], None], cancel: Any) -> RemotePrediction:
            def segment(sid: str) -> Any:
                cancel.raise_if_cancelled()
                progress(0, 0, f"segmenting '{layer.name}' on {url} with {entry.version}…")
                return client.segment(sid, model_id=entry.model_id)

            progress(0, 0, f"sending '{layer.name}' to {url} (once per image)…")
            seg = uploads.with_session(segment, data, affine, layer.name, modality, key)
            cancel.raise_if_cancelled()
            if tuple(seg.labels.shape) != tuple(data.shape):
                raise RemoteError(f"the server answered labels of shape {seg.labels.shape} for '{layer.name}' of "
                                  f"shape {data.shape}")
            return RemotePrediction(labels=np.array(seg.labels), class_names=seg.class_names, seconds=seg.seconds,
                                    device_used=f"the server {url}", notes=seg.notes, model_id=seg.model_id,
                                    warnings=list(getattr(seg, "warnings", []) or []))

        return _guarded(run, url)

    # ------------------------------------------------------------------ cases
    def save_case(self, layer: Any, volume: Any, labels_ijk: np.ndarray, modality: str,
                  class_names: Sequence[str], interactive: Optional[Dict[str, Any]] = None,
                  on_saved: Optional[Callable[[Dict[str, Any]], None]] = None,
                  after_saved: Optional[Callable[[], Any]] = None,
                  on_finished: Optional[Callable[[str], None]] = None) -> Any:
        """Save ``labels_ijk`` (file voxel order) on ``layer``'s image as a training case on the server.

        ``interactive``: which classes were made by prompting (see ``Client.save_case``), recorded with the case.
        ``on_saved``: called on the GUI thread with the server's case record once the server confirmed the save
        (never after a failure or a cancel), e.g. to mark the labels layer saved.
        ``after_saved``: called in the worker once the server confirmed the save, before ``on_saved``: the place for
        work on the whole volume (comparing the layer with what was sent) that would stall the GUI thread.
        ``on_finished``: called on the GUI thread with the job's outcome (see ``Session.start_job``).

        Returns:
            The started job (its result is the server's case record), or ``None`` when the slot is busy.
        """
        uploads, client = self.uploads, self.client
        data, affine = np.asarray(volume.data), np.asarray(volume.affine, dtype=np.float64)
        labels, names = np.ascontiguousarray(labels_ijk), list(class_names)

        def run(progress: Callable[[int, int, str], None], cancel: Any) -> Dict[str, Any]:
            progress(0, 0, f"saving the case on {self.url}…")
            def save(session_id: str) -> Dict[str, Any]:
                return client.save_case(session_id, labels, names, modality, interactive=interactive)

            record = uploads.with_session(save, data, affine, layer.name, modality, id(layer))
            if after_saved is not None:
                after_saved()
            return {"record": record, "cases": client.cases()}

        def done(result: Dict[str, Any]) -> None:
            self.cases = list(result["cases"])
            self.session.cases_changed.emit()
            if on_saved is not None:
                on_saved(dict(result["record"]))
            self.session.info(f"saved case {result['record']['case_id']} ({modality}) on the server {self.url}")

        return self._start(run, what="saving the case on the server", on_done=done, on_finished=on_finished)

    # ------------------------------------------------------------------ fine-tuning
    def finetune(self, entry: RemoteModelEntry, steps: int, lr: Optional[float],
                 on_progress: Callable[[int, int, str], None], on_log: Callable[[Dict[str, Any]], None],
                 on_result: Callable[[str], None], on_finished: Callable[[str], None],
                 task: Optional[str] = None, compare_with: Optional[str] = None,
                 on_scores: Optional[Callable[[Dict[str, Any], Any, float], None]] = None,
                 max_minutes: Optional[float] = None) -> Any:
        """Fine-tune ``entry`` on the server's cases: start, poll (progress and loss), cancel; select the new version.

        With ``task="interactive"`` on an automatic model the server makes a promptable model from it instead
        (its warm start): the new model is selected in the Interactive section only; ``entry`` stays the
        server's active model, the one that segments. The server scores every new model after training, as a local
        job is scored (the job's ``scores`` and ``warning``): a promptable model made from an automatic one with the
        robot user against the promptable model ``compare_with``, any other against ``entry``.

        A cancel stops the job on the server. One that reaches it while the server scores the new model stops the
        scoring only: the model is made and kept there, so it is selected here as well, and the result says it was
        made but not scored (the job's ``not_scored``), as the server's job does.

        Stop and keep (the job's token's :meth:`engine.progress.CancelToken.request_stop`, on a server that can:
        :attr:`can_stop_jobs`) is sent by the worker as a cancel is (``POST /finetune/{job}/stop``, never from the GUI
        thread): the server ends the training at its next step and keeps the model of that step, which is selected
        here as a finished job's is, the result naming the step (the job's ``stopped_at``). A stop before the first
        step finished keeps nothing: the job ends cancelled and the result says that nothing was kept. A cancel
        asked as well wins.

        Args:
            entry: the model to start from.
            steps: training steps.
            lr: learning rate.
            on_progress: ``(step, total, message)`` on the GUI thread.
            on_log: each new ``{"step", "loss"}``.
            on_result: one line for the panel's result label.
            on_finished: the outcome (``done``, ``error``, ``cancelled``).
            task: ``None`` (the model's own task) or ``"interactive"`` (a promptable model from an automatic one).
            compare_with: the server's id of the promptable model a new promptable model is scored against
                (the Interactive section's); ``None``: the server's choice (the one prompts naming none use).
            on_scores: ``(job state, new entry, seconds, kept)`` on the GUI thread after the server made and scored a
                new model (the state's ``scores``), after ``on_result``; ``kept``: it scored below the model it was
                compared with, which stays selected (the new one is listed, not selected).
            max_minutes: the job's time limit (the server's ``max_minutes`` setting), or None.

        Returns:
            The started job, or ``None`` (no cases on the server, slot busy).
        """
        from ._jobs import Kept

        if not self.cases:
            self.session.error(f"no saved cases on the server {self.url}: correct a segmentation and press "
                               "'Save as training case' first")
            return None
        client = self.client
        val_fraction = 0.2 if len(self.cases) >= HELD_OUT_MIN_CASES else 0.0
        promptable = task == "interactive" and not entry.is_interactive
        doing = "making a promptable model" if promptable else "fine-tuning"
        settings: Dict[str, Any] = {"task": task} if task else {}
        if max_minutes:
            settings["max_minutes"] = float(max_minutes)
        if promptable and compare_with is not None:
            settings["compare_with"] = compare_with  # a field of the request, not a fine-tune setting

        def made(state: Dict[str, Any], start: float) -> Dict[str, Any]:
            from engine.scoring import weaker

            new_id = state["model_id"]
            # a new model scoring below the one it was compared with is listed but not selected, as a local
            # fine-tune's is (FinetunePanel._select_if_not_weaker): selected, it was what the next Segment used
            kept = weaker(state.get("scores") or {}) is not None
            # a promptable model cannot segment: the automatic parent stays the server's active model
            listing = client.models() if promptable or kept else client.select_model(new_id)
            return {"listing": listing, "model_id": new_id, "job": state, "seconds": time.perf_counter() - start,
                    "kept": kept}

        # set in the worker before it raises, read on the GUI thread by cancelled() (after the job's signal)
        stop_outcome: Dict[str, bool] = {"nothing_kept": False}

        def run(progress: Callable[[int, int, str], None], cancel: Any,
                log: Callable[[Dict[str, Any]], None]) -> Any:
            from engine.progress import Cancelled, NothingToKeep

            start = time.perf_counter()
            job = client.start_finetune(steps=steps, lr=lr, model_id=entry.model_id, val_fraction=val_fraction,
                                        **settings)
            last_step = -1
            stop_sent = False  # Stop and keep pressed (the token's stop) and sent to the server once

            def stop_pending() -> bool:
                return bool(getattr(cancel, "stop_requested", False)) and not stop_sent

            while True:
                if cancel.cancelled:
                    client.cancel_job(job["job_id"])
                    state = client.wait_job(job["job_id"], poll_s=POLL_S / 2, timeout=600)  # the GPU is free again
                    if state["state"] == "done" and state.get("model_id"):
                        # the model was saved before the cancel came (it stopped the scoring): kept on the server,
                        # so shown here as made, as the server's job says
                        return Kept(dict(made(state, start), stop_asked=stop_sent))
                    raise Cancelled(f"{doing} on the server cancelled by the user")
                if stop_pending():
                    stop_sent = True
                    try:
                        client.stop_job(job["job_id"])
                    except ServerError as exc:
                        # job_ended: it ended by itself as the stop was sent (the poll below finds how);
                        # not_supported: a server without the stop (the panel does not offer it): the job runs on
                        if exc.code not in ("job_ended", "not_supported"):
                            raise
                state = client.job(job["job_id"])
                # the server's note (no class shared with the cases: every class starts untrained) while it runs, as
                # the CLI warns before a run that may teach nothing
                note = f" (note: {state['note']})" if state.get("note") else ""
                progress(int(state["step"]), int(state["total"]), f"{doing} on the server: {state['message']}{note}")
                if state.get("loss") is not None and state["step"] != last_step:
                    last_step = int(state["step"])
                    log({"step": last_step, "loss": float(state["loss"])})
                if state["state"] == "done":
                    return dict(made(state, start), stop_asked=stop_sent)
                if state["state"] == "failed":
                    # the server's error says what failed (its job, where), or is the engine's message naming the case
                    raise RemoteError(f"the server {self.url} says: {state.get('error')}")
                if state["state"] == "cancelled":
                    # the server's own record: a stop answered job_ended never reached it (another client or
                    # the server cancelled the job), and that is a cancel, not "stopped before its first step"
                    if state.get("stop_requested", stop_sent) and not cancel.cancelled:
                        # the stop came before the first training step finished: the server kept nothing
                        stop_outcome["nothing_kept"] = True
                        raise NothingToKeep(f"{doing} on the server stopped before its first step: nothing kept")
                    raise Cancelled("the fine-tune job was cancelled on the server")
                end = time.monotonic() + POLL_S
                while time.monotonic() < end and not cancel.cancelled and not stop_pending():
                    time.sleep(0.05)

        def done(outcome: Dict[str, Any]) -> None:
            kept = bool(outcome.get("kept"))
            # selecting the new model here makes the Interactive section prompt with it when it is promptable; a
            # weaker one is not selected: the server's active model (and the prompt model in use) stay
            self.apply_listing(outcome["listing"], select=None if kept else outcome["model_id"])
            new = next((e for e in self.entries if e.model_id == outcome["model_id"]), self.session.current_model)
            state, seconds = outcome["job"], float(outcome["seconds"])
            loss = f"{float(state['loss']):.3f}" if state.get("loss") is not None else "not reported"
            if promptable:
                parent = next((e for e in self.entries if e.model_id == entry.model_id), None)
                if parent is not None:  # back to the automatic parent for segmenting, as the server has it
                    self.session.current_model = parent
                    self.session.model_changed.emit(parent)
                chosen = ("added to the Interactive section's models but not selected (it scores below the one in "
                          "use)" if kept else "selected in the Interactive section")
                line = (f"{new.version} (promptable, made on the server from {entry.version} in {seconds:.1f} s, "
                        f"final loss {loss}) {chosen}; {entry.version} still segments")
            else:
                chosen = (f"added but not selected (it scores below {entry.version}, which stays selected)" if kept
                          else "selected")
                line = f"{new.version} {chosen} (fine-tuned on the server in {seconds:.1f} s, final loss {loss})"
            stopped_at = state.get("stopped_at")
            if stopped_at is not None:  # a version made by Stop and keep says so, as a local one does
                line += f"; stopped and kept at step {int(stopped_at)}"
            elif outcome.get("stop_asked"):
                # the stop reached a job that ended by itself (its last step, its validation or saving, its scoring)
                line += (f"; the run had reached its end (step {int(state.get('step') or 0)}) when Stop and keep was "
                         "pressed, nothing was cut short")
            if state.get("not_scored"):
                line += f". It was made but not scored: {state['not_scored']}."
            if state.get("note"):
                line += f". Note: {state['note']}"
            on_result(line)
            if state.get("scores") and on_scores is not None:
                on_scores(state, new, seconds, kept)
            self.session.status.emit(
                (f"promptable model {new.version} made on the server {self.url}: {chosen}" if promptable
                 else f"{new.version} {chosen} after fine-tuning on the server {self.url}")
                + (f" (stopped and kept at step {int(stopped_at)})" if stopped_at is not None else ""))

        def cancelled() -> None:
            if stop_outcome["nothing_kept"]:
                on_result(f"{doing} on the server stopped before its first training step finished: nothing was "
                          f"learnt yet, so no new version was made; {entry.version} stays selected (the saved cases "
                          "and earlier versions are unchanged)")
                self.session.status.emit(f"{doing} on the server stopped before its first step: nothing to keep, "
                                         "no new version")
                return
            on_result(f"{doing} cancelled on the server; {entry.version} stays selected")

        return self._start(run, what=f"{doing} from {entry.version} on the server" if promptable
                           else f"fine-tuning {entry.version} on the server", on_done=done,
                           on_progress=on_progress, on_log=on_log, on_cancelled=cancelled, on_finished=on_finished)
