"""The state one Mamba-HoME dock works on, shared by its panels through Qt signals.

A :class:`Session` holds the viewer, the chosen image and labels layers, the model versions, the
device and the one job slot. Panels (:mod:`.panels`) never call each other: they change the session
(``select_model``, ``set_image``, ``start_job`` ...) and react to its signals. One session per dock;
nothing here is global, so two docks (two viewers) never share state.
"""
from __future__ import annotations

import contextlib
import os
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
from qtpy.QtCore import QObject, Signal

from . import _settings
from ._classes import ClassTable, class_table_of
from ._geometry import META_KEY
from ._history import watch_history
from ._jobs import Job
from ._models import (
    BUNDLED_INTERACTIVE_MODEL, BUNDLED_MODEL, ModelEntry, fine_tuned_entries, parent_entries, read_entry,
)
from .prompting import is_prompt_layer, local_backend_factory
from .remote import RemoteBackend, connect_job

DEVICES = {"auto": "auto", "CPU": "cpu", "GPU": "cuda"}
"""Device box text -> engine device setting."""

MODALITY_KEY = "modality"
MODALITY_SOURCE_KEY = "modality_source"
"""Top-level ``layer.metadata`` keys of an image's modality and where it came from ("file", "guessed",
"user"); the reader writes the first two, the user's choice is stored as "user"."""


def _notify(kind: str, message: str) -> None:
    from napari.utils import notifications

    {"error": notifications.show_error, "warning": notifications.show_warning,
     "info": notifications.show_info}[kind](message)


def mark_edited(event: Any) -> None:
    """``Labels.events.paint`` handler: a brush, fill, erase or helper edit makes the layer user-edited (and no longer
    what was last saved)."""
    meta = event.source.metadata.get(META_KEY)
    if meta is not None:
        meta["edited"] = True
        meta.pop(SAVED_KEY, None)


SAVED_KEY = "saved"
"""``layer.metadata[META_KEY]`` key: what the labels were last written as (a file path, ``case <id> in <folder>``),
present only while nothing was edited since; an edit (paint event, a prompt drawn) takes it away."""


def mark_saved(metadata: Any, what: str) -> None:
    """Note in a labels layer's metadata dict (``layer.metadata``, the very dict napari hands a writer) that it was
    just written as ``what``."""
    if isinstance(metadata, dict):
        meta = metadata.get(META_KEY)
        if not isinstance(meta, dict):
            meta = metadata[META_KEY] = {}
        meta[SAVED_KEY] = str(what)


def saved_as(layer: Any) -> Optional[str]:
    """What a labels layer was last written as, when nothing was edited since (None: not saved, or edited since)."""
    return (layer.metadata.get(META_KEY) or {}).get(SAVED_KEY)


def is_edited(layer: Any) -> bool:
    """Whether a labels layer may hold the user's work: edited since the model wrote it, or not
    written by the model at all (opened from a file, drawn by hand)."""
    meta = layer.metadata.get(META_KEY) or {}
    return "model_version" not in meta or bool(meta.get("edited", False))


IMAGE_ID_KEY = "mambahome_image_id"
"""Top-level ``layer.metadata`` key of an image layer's identity, which labels made for it record: a layer's name
changes with a rename, and a second scan opened under the first one's name (``ct_image`` of another patient) must
not take the first one's labels."""


def image_id(layer: Any) -> str:
    """The identity of an image layer (made on first use, kept in its metadata)."""
    import uuid

    token = layer.metadata.get(IMAGE_ID_KEY)
    if not isinstance(token, str):
        token = uuid.uuid4().hex
        layer.metadata[IMAGE_ID_KEY] = token
    return token


def owner_metadata(image: Any) -> Dict[str, Any]:
    """What a labels layer made for ``image`` (by Segment or Interactive) records of it: its name (for messages), its
    identity and the file it was read from (which tells a reopened scan from another one of the same name)."""
    return {"image_layer": image.name, "image_id": image_id(image),
            "image_path": (image.metadata.get(META_KEY) or {}).get("path")}


def labels_owner(layer: Any) -> Optional[str]:
    """The name of the image a labels layer was made for (by Segment or Interactive), None if it names none."""
    return (layer.metadata.get(META_KEY) or {}).get("image_layer")


def _hounsfield_guess(layer: Any) -> Optional[str]:
    """``"CT"`` when the layer's intensities look like Hounsfield units (:func:`engine.formats.guess_modality`), else
    None. The question comes for images with no modality on record (napari's own reader, a .tif stack, an array
    added from the console); offering the model's modality first (MR for the bundled model) invited the wrong answer
    for a CT. A strided sample of ~1 M voxels: the full array may be a flipped display view that ravel would copy."""
    data = getattr(layer, "data", None)
    if not isinstance(data, np.ndarray) or data.ndim < 2 or data.size == 0:
        return None
    from engine.formats import guess_modality

    stride = max(1, int(round((data.size / 1e6) ** (1.0 / data.ndim))))
    return guess_modality(data[(slice(None, None, stride),) * data.ndim])


@dataclass
class RemovedLabels:
    """A labels layer holding work that was removed from the viewer, kept to be offered back.

    Attributes:
        key: the scan it belongs to (``id:<image id>``, else ``file:<path>``, else ``name:<layer name>``); one kept
            per scan.
        name: the layer's name.
        scan: the name of its scan, for messages (None when it names none).
        data: the layer's data (the array itself: the removed layer no longer uses it).
        kwargs: what ``viewer.add_labels`` needs to put it back as it was: geometry (scale, translate, rotate, shear,
            affine, units, axis labels), metadata (source path, owner, class table), colours, class features.
        edited: whether it held the user's edits (not only what the model wrote).
        saved: what it was last written as (a file path, a case), when it was not edited since; None otherwise.
        layer_id: ``id()`` of the removed layer (tells a panel that this very layer was kept).
    """

    key: str
    name: str
    scan: Optional[str]
    data: Any
    kwargs: Dict[str, Any] = field(default_factory=dict)
    edited: bool = False
    layer_id: int = 0
    saved: Optional[str] = None


MAX_REMOVED_SCANS = 3
"""Removed masks kept at most: the newest of each scan, of the newest scans (a CT mask is tens to hundreds of MB)."""
CLOSE_WAIT_S = 0.25
"""How long the closing dock waits, on napari's GUI thread, for its cancelled job and workers to stop. A job stops only
between model calls (a sliding window, a prompt's forward pass: seconds on a CPU), so 2 s here held the closing window
2 s more nearly every time; what still runs afterwards ends on its own, its results dropped (``alive``), and Python's
exit waits for it (``_jobs.EXIT_WAIT_S``)."""

RESTORE_ACTION = "Restore removed mask"
"""The Correct section's button that puts a removed mask back (named in the message of a removal)."""


@dataclass
class _JobImage:
    """The image layer a running job works on (:meth:`Session.start_job`'s ``image``): removing it cancels the job."""

    layer: Any
    doing: str  # what the job does with it, for the cancel message ("it was being segmented")
    closed: Optional[str] = None  # its name once it was removed


class Session(QObject):
    """What one dock works on; panels talk to each other only through its signals.

    Args:
        viewer: the napari viewer.
        parent: Qt parent (the dock), also the parent of the dialogs the session opens.

    Signals:
        models_changed(): the list of model versions or their scores changed.
        model_changed(entry): the selected :class:`._models.ModelEntry` changed.
        layers_changed(): layers were added, removed, reordered or renamed.
        image_changed(layer): the chosen image layer (or ``None``).
        labels_changed(layer): the chosen labels layer (or ``None``).
        removed_labels_changed(): a labels layer with work in it was removed (and kept), or a kept one was restored.
        modality_changed(layer): an image layer's modality was set.
        classes_changed(layer): a labels layer's class table changed.
        cases_changed(): the case folder or its cases changed.
        save_case_requested(): save the chosen image and labels layers as a training case (the Cases
            panel does it; another panel asks through this signal).
        remote_changed(backend): a server connection started (a :class:`.remote.RemoteBackend`) or
            ended (``None``).
        busy_changed(bool): a job started / ended.
        status(str): one line for the dock's status line (also every error, in full).
    """

    models_changed = Signal()
    model_changed = Signal(object)
    layers_changed = Signal()
    image_changed = Signal(object)
    labels_changed = Signal(object)
    removed_labels_changed = Signal()
    modality_changed = Signal(object)
    classes_changed = Signal(object)
    cases_changed = Signal()
    save_case_requested = Signal()
    remote_changed = Signal(object)
    busy_changed = Signal(bool)
    status = Signal(str)

    def __init__(self, viewer: Any, parent: Optional[QObject] = None) -> None:
        super().__init__(parent)
        # From Plugins > Mamba-HoME napari hands the dock a PublicOnlyProxy of the viewer, and every layer reached
        # through it (the labels add_labels returns, viewer.layers[...]) is a new proxy that is never `is` the layer
        # napari's events carry: identity checks failed (the Correct class box stopped following napari's label
        # spinner), and each read of a layer's undo history warned that napari 0.10 will refuse it. The dock acts
        # on the viewer napari itself holds.
        import wrapt

        self.viewer = viewer.__wrapped__ if isinstance(viewer, wrapt.ObjectProxy) else viewer
        self.alive = True
        self.entries: List[ModelEntry] = []
        self.current_model: Optional[ModelEntry] = None
        # the interactive model the Interactive section prompts with (that panel keeps it up to date): what a
        # new promptable model is compared with after the Fine-tune section made it
        self.prompt_model: Optional[ModelEntry] = None
        self.device = "auto"
        self.image_layer: Optional[Any] = None
        self.labels_layer: Optional[Any] = None
        self._image_error = False  # the status line shows an error about the chosen image (see error)
        self.status.connect(self._status_shown)
        # id(image layer) -> (image layer, labels layer) last chosen together: a scan gets its labels back
        # when chosen again, also labels napari made (no owner in their metadata)
        self._paired: Dict[int, Tuple[Any, Any]] = {}
        self.job: Optional[Job] = None
        # what the running job says it does ("segmenting 'ct'"), and the image layer it works on: removing that layer
        # cancels the job (see start_job's ``image``); None when no job runs or it names no image
        self.job_what: Optional[str] = None
        self._job_image: Optional[_JobImage] = None
        # > 0 while layers are added without moving the user's choice (see choice_kept)
        self._keep_choice = 0
        # the panels' own workers that are no Job (the Interactive section's prompt worker): stopped at close too
        self._workers: "weakref.WeakSet[Any]" = weakref.WeakSet()
        self.last_prediction: Any = None
        self.last_finetune: Optional[Dict[str, Any]] = None
        self.scores_by_version: Dict[str, Dict[str, float]] = {}
        # version -> the ids of the cases its scores_by_version were measured on (None: not recorded), and the case
        # set of the latest before/after scoring: the Versions list marks scores measured on another set
        self.scored_on_by_version: Dict[str, Optional[Tuple[str, ...]]] = {}
        self.latest_scored_on: Optional[Tuple[str, ...]] = None
        self._predictors: Dict[Tuple[str, str], Any] = {}
        # (checkpoint_or_model, volume, device) -> prompting.PromptBackend; a remote mode swaps it
        self.prompt_backend_factory: Callable[[Any, Any, str], Any] = local_backend_factory
        self.remote: Optional[RemoteBackend] = None
        self._local_models: Optional[Tuple[List[ModelEntry], Optional[ModelEntry], Any]] = None
        # labels layers the user painted in (napari's brush, fill, helpers): their removal loses work
        self._painted: "weakref.WeakSet[Any]" = weakref.WeakSet()
        # scan key -> the newest labels layer with work in it removed for that scan (see RemovedLabels)
        self._removed: "OrderedDict[str, RemovedLabels]" = OrderedDict()
        layers = viewer.layers.events
        layers.inserted.connect(self._layer_inserted)
        layers.removed.connect(self._layer_removed)
        layers.reordered.connect(self._layers_changed)
        viewer.layers.selection.events.active.connect(self._active_layer_changed)
        self._layers_changed()

    def track(self, worker: Any) -> Any:
        """Stop ``worker`` (a :func:`._jobs.stoppable_worker`) with the dock, as the job is (see :meth:`close`);
        returns it."""
        self._workers.add(worker)
        return worker

    def close(self) -> None:
        """The dock is going away: stop the job and the tracked workers (:meth:`track`), ignore every later callback,
        and give them a moment to stop (:meth:`._jobs.Job.wait`, ``CLOSE_WAIT_S`` in all). What still runs after that
        ends on its own, unseen (waiting for it here held the closing window 2 s); Python's exit waits for it
        (``_jobs._stop_jobs_at_exit``): a script that closed the viewer and ended while a job or a prompt's prediction
        still ran aborted Python (its worker reported to Qt objects already deleted)."""
        import time

        self.alive = False
        # a job that outlives the dock (saving a case) finishes and tells its outcome by notification
        job = self.job if self.job is not None and not getattr(self.job, "outlives_dock", False) else None
        running = ([job] if job is not None else []) + list(self._workers)
        for item in running:
            item.cancel()
        deadline = time.monotonic() + CLOSE_WAIT_S
        for item in running:
            item.wait(max(0.0, deadline - time.monotonic()))

    # ------------------------------------------------------------------ messages
    def error(self, message: str, about_image: bool = False) -> None:
        """Report an error in full on the status line and as a napari notification.

        ``about_image``: the error is about the chosen image (none chosen, not a 3D volume): choosing another image
        takes it off the status line (see set_image), where it stayed after the annotator opened the volume it asked
        for."""
        self.status.emit(f"Error: {message}")
        self._image_error = about_image  # after the emit: any status emitted since (_status_shown) clears it
        _notify("error", message)

    def _status_shown(self, _text: str) -> None:
        self._image_error = False

    def warning(self, message: str) -> None:
        self.status.emit(message)
        _notify("warning", message)

    def info(self, message: str) -> None:
        self.status.emit(message)
        _notify("info", message)

    # ------------------------------------------------------------------ layers
    def layers(self, kind: str) -> List[Any]:
        """Image (``kind="image"``) or labels (``"labels"``) layers, in viewer order."""
        from napari.layers import Image, Labels

        cls = Image if kind == "image" else Labels
        return [layer for layer in self.viewer.layers if isinstance(layer, cls) and not is_prompt_layer(layer)]

    def add_labels(self, image: Optional[Any], data: Any, **kwargs: Any) -> Any:
        """Add a labels layer made for ``image`` (``kwargs`` as napari's ``add_labels``): under the Interactive
        section's prompt layers when they lie above ``image``, since on top its colours covered the markers of the
        prompts (a click's green, a negative click's red); else on top, as napari adds it."""
        from napari.layers import Labels

        layer = Labels(data, **kwargs)
        layers = self.viewer.layers
        prompts = [index for index, each in enumerate(layers) if is_prompt_layer(each)]
        if prompts and image is not None and image in layers and min(prompts) > layers.index(image):
            layers.insert(min(prompts), layer)
        else:
            self.viewer.add_layer(layer)
        return layer

    def layer_named(self, name: str, kind: str) -> Optional[Any]:
        return next((layer for layer in self.layers(kind) if layer.name == name), None)

    def _layer_inserted(self, event: Any) -> None:
        from napari.layers import Image, Labels

        if not self.alive:
            return
        self._layers_changed()
        if is_prompt_layer(event.value):  # the interactive panel's scribbles are not labels to work on
            return
        if self._keep_choice:  # a job's result for a scan the user has left: it must not take the choice back
            return
        # the newly opened volume is what the user wants to work on next
        if isinstance(event.value, Image):
            self.set_image(event.value)
        elif isinstance(event.value, Labels):
            self.set_labels(event.value)
            self._say_if_names_unknown(event.value)

    def _say_if_names_unknown(self, layer: Any) -> None:
        """Tell the annotator when an opened label file names no classes (:data:`._classes.UNKNOWN_SOURCE`): its
        values show as ``label N``, and a case saved so trains classes of those names."""
        from ._classes import UNKNOWN_SOURCE

        table = self.class_table(layer)
        if table.source != UNKNOWN_SOURCE:
            return
        top = len(table.names) - 1  # the table covers the file's largest value
        if top < 1:
            return
        shown = "label 1" if top == 1 else f"label 1 to label {top}"
        self.info(f"'{layer.name}': the file names no classes, so its class names are unknown ({shown}); name each "
                  "class with Rename in the Correct section before saving the case")

    def _active_layer_changed(self, event: Any) -> None:
        from napari.layers import Image, Labels

        if not self.alive:
            return
        layer = event.value
        if is_prompt_layer(layer) or self._keep_choice:
            return
        if isinstance(layer, Image):
            self.set_image(layer)
        elif isinstance(layer, Labels):
            self.set_labels(layer)

    def _layers_changed(self, *_: Any) -> None:
        if not self.alive:
            return
        from napari.layers import Labels

        for layer in self.viewer.layers:
            # a renamed layer must show its new name (connecting twice is a no-op in napari)
            layer.events.name.connect(self._layers_changed)
            if isinstance(layer, Labels) and not is_prompt_layer(layer):
                layer.events.paint.connect(self._labels_painted)
                # napari's undo and redo change the labels too (an accepted object taken back): no longer as saved
                watch_history(layer).connect(self._labels_painted)
        present = list(self.viewer.layers)
        # a removed layer's pairing goes with it: it would hold the layer's (often large) data alive
        self._paired = {key: pair for key, pair in self._paired.items()
                        if pair[0] in present and pair[1] in present}
        images, labels = self.layers("image"), self.layers("labels")
        if self.image_layer not in present:
            self.image_layer = None
            self.set_image(images[-1] if images else None)
        if self.labels_layer not in present:
            self.labels_layer = None
            image = self.image_layer  # the next labels must be this image's, not merely the last in the list
            fitting = [layer for layer in labels if image is None or not self.labels_belong_elsewhere(layer, image)]
            own = None if image is None else self._own_labels(image)
            self.set_labels(own or (fitting[-1] if fitting else None))
        self.layers_changed.emit()

    # ------------------------------------------------------------------ removed labels
    def _labels_painted(self, event: Any) -> None:
        self._painted.add(event.source)
        (event.source.metadata.get(META_KEY) or {}).pop(SAVED_KEY, None)  # edited since it was saved

    def holds_work(self, layer: Any) -> bool:
        """Whether removing a labels layer loses work: the plugin made it (Segment, Interactive) or the user painted
        in it (a label file opened and left untouched is still on disk)."""
        meta = layer.metadata.get(META_KEY) or {}
        return (bool(meta.get("edited")) or "model_version" in meta or "image_id" in meta
                or layer in self._painted)

    def _layer_removed(self, event: Any) -> None:
        from napari.layers import Labels

        layer = getattr(event, "value", None)
        if (self.alive and isinstance(layer, Labels) and not is_prompt_layer(layer) and np.ndim(layer.data) >= 2
                and self.holds_work(layer)):
            self._keep_removed(layer)
        self._cancel_job_of_closed_image(layer)
        self._layers_changed()  # after the cancel: panels refreshed by it see the job as cancelling

    def _cancel_job_of_closed_image(self, layer: Any) -> None:
        """The image a running job works on was removed from the viewer: cancel the job now. Its result could only be
        dropped (it would be shown, chosen and saved with a scan no longer open), and running on would hold the
        worker (and grey out Segment) for nothing."""
        use = self._job_image
        if layer is None or use is None or layer is not use.layer or not self.busy:
            return
        use.closed = layer.name
        use.layer = None  # the job holds the image's data itself; the session no longer needs the layer
        self.job.cancel()
        if self.alive:
            self.status.emit(f"'{layer.name}' was closed while {use.doing}: cancelling the job; its result will be "
                             "dropped…")

    def _scan_key(self, layer: Any) -> Tuple[str, Optional[str]]:
        """``(key, scan name)`` of the scan a labels layer belongs to (call before the pairings are pruned)."""
        meta = layer.metadata.get(META_KEY) or {}
        if meta.get("image_id"):
            return f"id:{meta['image_id']}", self.owner_name(layer)
        for image, labels in self._paired.values():
            if labels is layer:
                return f"id:{image_id(image)}", image.name
        if meta.get("path"):
            return f"file:{meta['path']}", None
        return f"name:{layer.name}", None

    def _keep_removed(self, layer: Any) -> None:
        """Keep a removed labels layer's mask (the newest per scan, MAX_REMOVED_SCANS scans) and say how to get it
        back; napari's removal itself goes ahead."""
        key, scan = self._scan_key(layer)
        kwargs: Dict[str, Any] = {
            "scale": np.array(layer.scale), "translate": np.array(layer.translate), "rotate": np.array(layer.rotate),
            "shear": np.array(layer.shear), "affine": np.array(layer.affine.affine_matrix),
            "opacity": float(layer.opacity), "blending": layer.blending, "colormap": layer.colormap,
            "metadata": {k: (dict(v) if k == META_KEY and isinstance(v, dict) else v)
                         for k, v in layer.metadata.items()},
        }
        for name in ("units", "axis_labels"):  # napari >= 0.6
            if hasattr(layer, name):
                kwargs[name] = getattr(layer, name)
        features = getattr(layer, "features", None)
        if features is not None and len(features):
            kwargs["features"] = features.copy()
        meta = layer.metadata.get(META_KEY) or {}
        edited = bool(meta.get("edited")) or layer in self._painted or "model_version" not in meta
        record = RemovedLabels(key=key, name=layer.name, scan=scan, data=layer.data, kwargs=kwargs, edited=edited,
                               layer_id=id(layer), saved=saved_as(layer))
        self._removed.pop(key, None)
        self._removed[key] = record
        while len(self._removed) > MAX_REMOVED_SCANS:
            self._removed.popitem(last=False)
        self.removed_labels_changed.emit()
        from qtpy.QtCore import QTimer

        # after the removal has finished: a viewer closing removes every layer first, then its window; that is no loss
        QTimer.singleShot(0, lambda r=record: self._announce_removed(r))

    def _announce_removed(self, record: RemovedLabels) -> None:
        window = getattr(self.viewer, "window", None)
        if not self.alive or (window is not None and not hasattr(window, "_qt_window")):
            return
        if self._removed.get(record.key) is not record:
            return
        if record.saved:
            what = f"(saved as {record.saved})"
        else:
            what = "with unsaved edits" if record.edited else "(the model's segmentation, not saved)"
        self.warning(f"the labels layer '{record.name}' was removed {what}; its mask is kept: press "
                     f"'{RESTORE_ACTION}' in the Correct section to get it back")

    def was_kept(self, layer: Any) -> bool:
        """Whether this removed labels layer's mask is kept to be restored."""
        return any(record.layer_id == id(layer) for record in self._removed.values())

    def removed_labels(self) -> List[RemovedLabels]:
        """The removed masks kept to be restored, newest first."""
        return list(reversed(self._removed.values()))

    def removed_labels_for(self, image: Optional[Any]) -> Optional[RemovedLabels]:
        """The removed mask of ``image``'s scan, else the newest kept one (None when none is kept)."""
        if image is not None and IMAGE_ID_KEY in image.metadata:
            path = (image.metadata.get(META_KEY) or {}).get("path")
            for record in self.removed_labels():
                meta = record.kwargs.get("metadata", {}).get(META_KEY) or {}
                if record.key == f"id:{image.metadata[IMAGE_ID_KEY]}" or (
                        path and str(meta.get("image_path") or "") == str(path)):
                    return record
        kept = self.removed_labels()
        return kept[0] if kept else None

    def restore_removed_labels(self, record: Optional[RemovedLabels] = None) -> Optional[Any]:
        """Put a removed mask back as a labels layer, as it was (data, geometry, metadata, classes), and choose it
        with its scan; default: the chosen image's, else the newest kept.

        Returns:
            The new labels layer, or None when nothing was kept (reported on the status line).
        """
        record = record or self.removed_labels_for(self.image_layer)
        if record is None or self._removed.get(record.key) is not record:
            self.status.emit("no removed mask to restore")
            return None
        del self._removed[record.key]
        owner = self.image_with_id((record.kwargs.get("metadata", {}).get(META_KEY) or {}).get("image_id"))
        layer = self.add_labels(owner, record.data, name=record.name, **record.kwargs)
        layer.events.paint.connect(mark_edited)
        if record.edited:
            self._painted.add(layer)
        if owner is not None:
            self.set_image(owner)
        self.set_labels(layer)
        self.removed_labels_changed.emit()
        self.status.emit(f"restored the removed mask '{layer.name}'")
        return layer

    def set_image(self, layer: Optional[Any]) -> None:
        """Choose the image layer to segment and to save as a case.

        The labels follow: the labels layer made for this image (by Segment or Interactive) becomes the
        session's, and labels made for another image still open, or of another shape, are let go, so that
        no panel corrects or saves one scan's labels with another scan.
        """
        if layer is self.image_layer:
            return
        if layer is not None and layer not in self.viewer.layers:
            return  # a layer closed while a job ran: choosing it would save or segment what is no longer shown
        self.image_layer = layer
        self.image_changed.emit(layer)
        if layer is None:
            return
        if self._image_error:
            self.status.emit(f"'{layer.name}' chosen: press Segment, or Start prompting on the image")
        own = self._own_labels(layer)
        if own is not None:
            self.set_labels(own)
        elif self.labels_layer is not None and self.labels_belong_elsewhere(self.labels_layer, layer):
            self.set_labels(None)

    def _own_labels(self, image: Any) -> Optional[Any]:
        """``image``'s labels: those last chosen with it, else the newest Segment or Interactive made for it."""
        return self._labels_paired_with(image) or self.labels_made_for(image)

    def _labels_paired_with(self, image: Any) -> Optional[Any]:
        """The labels last chosen with ``image``, while both are in the viewer and still fit."""
        pair = self._paired.get(id(image))
        if pair is None or pair[0] is not image:
            return None
        labels = pair[1]
        present = list(self.viewer.layers)
        if labels not in present or image not in present or self.labels_belong_elsewhere(labels, image):
            return None
        return labels

    def labels_made_for(self, image: Any) -> Optional[Any]:
        """The newest labels layer that Segment or Interactive made for ``image`` (same shape): for this very layer,
        else for a closed layer of the same file (the scan was closed and opened again, whatever its name now)."""
        shape = tuple(np.shape(image.data))
        own = image_id(image)
        candidates = [layer for layer in reversed(self.layers("labels")) if tuple(np.shape(layer.data)) == shape]
        for layer in candidates:
            if (layer.metadata.get(META_KEY) or {}).get("image_id") == own:
                return layer
        path = (image.metadata.get(META_KEY) or {}).get("path")
        for layer in candidates:
            meta = layer.metadata.get(META_KEY) or {}
            if self.labels_belong_elsewhere(layer, image):
                continue
            if meta.get("image_path") and path:  # its scan closed and opened again (perhaps under another name)
                if str(meta["image_path"]) == str(path):
                    return layer
            elif labels_owner(layer) == image.name:
                return layer
        return None

    def image_with_id(self, token: Optional[str]) -> Optional[Any]:
        """The open image layer of identity ``token`` (:func:`image_id`), if any."""
        if token is None:
            return None
        return next((layer for layer in self.layers("image") if layer.metadata.get(IMAGE_ID_KEY) == token), None)

    def owner_name(self, labels: Any) -> Optional[str]:
        """The current name of the image ``labels`` were made for (renames followed), else the name it had."""
        owner = self.image_with_id((labels.metadata.get(META_KEY) or {}).get("image_id"))
        return owner.name if owner is not None else labels_owner(labels)

    def labels_belong_elsewhere(self, labels: Any, image: Any) -> bool:
        """Whether ``labels`` cannot be ``image``'s: another shape, made for another image that is open (whatever the
        names), or made for a scan read from another file."""
        if getattr(image, "rgb", False) or np.ndim(image.data) != 3:
            return False  # not a volume: the panels refuse it with their own message
        if tuple(np.shape(labels.data)) != tuple(np.shape(image.data)):
            return True
        meta = labels.metadata.get(META_KEY) or {}
        owner_id = meta.get("image_id")
        if owner_id is not None:
            if owner_id == image_id(image):
                return False
            if self.image_with_id(owner_id) is not None:
                return True
        else:
            owner = labels_owner(labels)
            if owner and owner != image.name and self.layer_named(owner, "image") is not None:
                return True
        made_from, path = meta.get("image_path"), (image.metadata.get(META_KEY) or {}).get("path")
        return bool(made_from and path) and str(made_from) != str(path)

    def set_labels(self, layer: Optional[Any]) -> None:
        """Choose the labels layer to correct and to save as a case."""
        if layer is self.labels_layer:
            return
        if layer is not None and layer not in self.viewer.layers:
            return
        self.labels_layer = layer
        image = self.image_layer
        if layer is not None and image is not None and not self.labels_belong_elsewhere(layer, image):
            self._paired[id(image)] = (image, layer)
        self.labels_changed.emit(layer)

    def remember_labels(self, image: Any, labels: Any) -> None:
        """Make ``labels`` the labels chosen with ``image`` when that image is chosen next (without choosing either
        now); nothing when they cannot be that image's."""
        present = list(self.viewer.layers)
        if image in present and labels in present and not self.labels_belong_elsewhere(labels, image):
            self._paired[id(image)] = (image, labels)

    @contextlib.contextmanager
    def choice_kept(self) -> Any:
        """Within the block, adding layers changes neither the chosen image and labels nor napari's selected layers.

        napari makes a new layer the active one, and the session chooses the active layer; a job's result for a scan
        the user left while it ran (another image chosen, prompting on it) took the choice, and napari's active layer
        (the points layer the user clicked in), back to the finished scan, and Cases > Save then saved that scan
        instead of the one the user was working on."""
        selection = self.viewer.layers.selection
        active, selected = selection.active, list(selection)
        self._keep_choice += 1
        try:
            yield
        finally:
            try:
                present = list(self.viewer.layers)
                if active is not None and active in present:
                    selection.active = active
                else:
                    selection.clear()
                    selection.update([layer for layer in selected if layer in present])
            finally:
                self._keep_choice -= 1

    # ------------------------------------------------------------------ modality
    @staticmethod
    def modality_of(layer: Any) -> Tuple[Optional[str], Optional[str]]:
        """``(modality, source)`` of an image layer: the user's choice, the file's, a guess, or ``(None, None)``.

        Sources: ``"user"`` (chosen in the dock), ``"file"`` (the file or sample says so), ``"guessed"``
        (the reader guessed it from the intensities).
        """
        from engine.modality import MODALITIES

        if layer is None:
            return None, None
        meta = layer.metadata or {}
        modality, source = meta.get(MODALITY_KEY), meta.get(MODALITY_SOURCE_KEY) or "file"
        if not modality:
            modality, source = (meta.get(META_KEY) or {}).get("modality"), "file"
        if modality not in MODALITIES:
            return None, None
        return str(modality), str(source)

    def set_modality(self, layer: Any, modality: str) -> None:
        """Record the user's modality for an image layer (kept with the layer, used to segment and save)."""
        if layer is None:
            return
        if self.modality_of(layer) == (modality, "user"):
            return
        layer.metadata[MODALITY_KEY] = modality
        layer.metadata[MODALITY_SOURCE_KEY] = "user"
        self.modality_changed.emit(layer)

    def proposed_modality(self, layer: Any) -> str:
        """What the modality question proposes for an image that names none: CT from Hounsfield units, else the
        model's modality."""
        from engine.modality import MODALITIES

        model = self.current_model
        return _hounsfield_guess(layer) or (
            model.modality if model is not None and model.modality in MODALITIES else MODALITIES[0])

    def confirmed_modality(self, layer: Any) -> Optional[str]:
        """The image's modality, asking the user once when it is not known (``None``: the user declined)."""
        from engine.modality import MODALITIES
        from qtpy.QtWidgets import QInputDialog

        modality, _ = self.modality_of(layer)
        if modality:
            return modality
        default = self.proposed_modality(layer)
        choice, ok = QInputDialog.getItem(self.parent(), "Modality", f"What kind of image is '{layer.name}'?",
                                          list(MODALITIES), list(MODALITIES).index(default), False)
        if not ok or choice not in MODALITIES:
            return None
        self.set_modality(layer, str(choice))
        return str(choice)

    # ------------------------------------------------------------------ classes
    def class_table(self, layer: Any) -> ClassTable:
        """The class table of a labels layer (see :func:`._classes.class_table_of`)."""
        return class_table_of(layer, self.automatic_class_names())

    def automatic_class_names(self) -> Optional[List[str]]:
        """The selected model's class names when it segments (names labels that name none themselves), else None: a
        promptable model is class-agnostic, its "foreground"/"object" names no structure, and fine-tuning matches
        classes by name, so labels named after it trained a class no automatic model has."""
        model = self.current_model
        return list(model.class_names) if model is not None and not model.is_interactive else None

    def set_class_table(self, layer: Any, table: ClassTable) -> None:
        """Store an edited class table with the layer and tell the panels."""
        table.store(layer)
        self.classes_changed.emit(layer)

    # ------------------------------------------------------------------ models
    def load_initial_models(self) -> None:
        """The bundled default, the fine-tuned versions, and the version used last time (selected)."""
        from engine.checkpoint import CheckpointError

        if BUNDLED_MODEL.is_file():
            try:
                self.add_entry(read_entry(BUNDLED_MODEL, origin="bundled"), select=False)
            except CheckpointError as exc:
                self.error(f"the bundled default model is damaged: {exc}")
        if BUNDLED_INTERACTIVE_MODEL.is_file():
            try:
                self.add_entry(read_entry(BUNDLED_INTERACTIVE_MODEL, origin="bundled"), select=False)
            except CheckpointError as exc:
                self.error(f"the bundled interactive model is damaged: {exc}")
        for entry in fine_tuned_entries(_settings.models_dir()):
            self.add_entry(entry, select=False)
        for entry in parent_entries(self.entries):  # the model to switch back to, after a restart too
            self.add_entry(entry, select=False)
        last = _settings.load_settings().get("model")
        if last and Path(last).is_file() and not any(e.path == Path(last) for e in self.entries):
            try:
                self.add_entry(read_entry(Path(last)), select=False)
            except CheckpointError:
                pass
        chosen = next((e for e in self.entries if last and e.path == Path(last)), None)
        if chosen is None and self.entries:  # segmenting wants a segmentation model, not a promptable one
            chosen = next((e for e in self.entries if not e.is_interactive), self.entries[0])
        if chosen is not None:
            self.select_model(chosen)

    def add_entry(self, entry: ModelEntry, select: bool = True) -> ModelEntry:
        """Offer a model version (once per file); optionally select it."""
        for existing in self.entries:
            if existing.path.resolve() == entry.path.resolve():
                if select:
                    self.select_model(existing)
                return existing
        self.entries.append(entry)
        self.models_changed.emit()
        if select:
            self.select_model(entry)
        return entry

    def load_model_file(self, path: Any) -> Optional[ModelEntry]:
        """Add a checkpoint file and select it; anything not ours is reported and changes nothing.

        Args:
            path: a napari-mambahome ``.safetensors`` checkpoint.

        Returns:
            The new entry, or ``None`` if the file was refused.
        """
        from engine.checkpoint import CheckpointError

        try:
            entry = read_entry(Path(path), origin="file")
        except CheckpointError as exc:
            self.error(f"cannot use this model file: {exc}")
            return None
        except OSError as exc:
            self.error(f"cannot read model file {path}: {exc}")
            return None
        return self.add_entry(entry, select=True)

    def _drop_damaged_model(self, exc: BaseException) -> str:
        """After a job found the chosen model's weights damaged (their checksum does not match: a file changed or cut
        after it was chosen), take it off the Model list and choose another, so that neither the next Segment nor the
        next napari session starts from it (it stayed chosen, and was chosen again at every start). What to add to the
        error, or ``""``."""
        from engine.checkpoint import CheckpointError

        entry = self.current_model
        if (not isinstance(exc, CheckpointError) or entry is None or "checksum" not in str(exc)
                or str(entry.path) not in str(exc) or (self.remote is not None and self.remote.owns(entry))):
            return ""
        self.entries = [e for e in self.entries if e is not entry]
        self.models_changed.emit()
        fallback = next((e for e in self.entries if not e.is_interactive), None)
        if fallback is not None:
            self.select_model(fallback)
            return f"; '{entry.version}' was taken off the Model list and {fallback.version} is chosen instead"
        self.current_model = None
        try:
            _settings.save_setting("model", None)
        except OSError:
            pass
        return f"; '{entry.version}' was taken off the Model list: load another model file"

    def select_model(self, entry: ModelEntry) -> None:
        """Make ``entry`` the model used for segmenting and as the start of fine-tuning.

        A server's model is selected on the server, in a worker; the session follows when it answered.
        """
        if self.remote is not None and self.remote.owns(entry):
            self.remote.select_model(entry)
            return
        self.current_model = entry
        try:
            _settings.save_setting("model", str(entry.path))
        except OSError:  # an unwritable config folder must not stop the work
            pass
        self.model_changed.emit(entry)

    def set_device(self, device: str) -> None:
        """``auto`` | ``cpu`` | ``cuda``."""
        self.device = device

    # ------------------------------------------------------------------ remote server
    def connect_remote(self, url: str, token: Optional[str],
                       on_result: Optional[Callable[[bool], None]] = None) -> Optional[Job]:
        """Connect to a ``mambahome serve`` server in a worker; then models, segmentation, cases,
        prompts and fine-tuning run there (:class:`.remote.RemoteBackend`).

        Args:
            url: ``http://host:port``.
            token: the server's token (``None`` for a token-less localhost server).
            on_result: called with ``True`` once connected, ``False`` when refused or unreachable
                (the error is reported: wrong token, other protocol version, no server).
        """
        connected = []

        def done(result: Tuple[Any, Dict[str, Any], Dict[str, Any], List[Dict[str, Any]]]) -> None:
            client, info, listing, cases = result
            if self.remote is None:
                self._local_models = (self.entries, self.current_model, getattr(self, "prompt_backend_factory", None))
            backend = RemoteBackend(self, client, info)
            backend.cases = list(cases)
            self.remote = backend
            self.prompt_backend_factory = backend.prompt_backend_factory
            backend.apply_listing(listing)
            connected.append(True)
            self.remote_changed.emit(backend)
            self.cases_changed.emit()
            self.info(f"connected to the Mamba-HoME {backend.describe()}")

        def finished(outcome: str) -> None:
            if on_result is not None:
                on_result(bool(connected))

        return self.start_job(connect_job(url, token), what=f"connecting to {url}", on_done=done,
                              on_finished=finished, engine=False)

    def disconnect_remote(self) -> None:
        """Back to local mode: the local model versions (and the selection) as they were before connecting."""
        if self.remote is None:
            return
        url = self.remote.url
        self.remote = None
        entries, current, factory = self._local_models or ([], None, None)
        self._local_models = None
        self.prompt_backend_factory = factory
        self.entries = list(entries)
        self.models_changed.emit()
        self.current_model = current
        if current is not None:
            self.model_changed.emit(current)
        self.remote_changed.emit(None)
        self.cases_changed.emit()
        self.status.emit(f"disconnected from {url}; working on this computer again")

    def predictor(self, entry: ModelEntry, device: str) -> Any:
        """The cached predictor for (model, device); call it in a worker thread (it builds the model)."""
        from engine.inference import Predictor

        key = (str(entry.path), device)
        if key not in self._predictors:
            self._predictors.clear()  # one model in memory at a time: a paper-size model is 700 MB
            self._predictors[key] = Predictor(entry.path, device=device)
        return self._predictors[key]

    # ------------------------------------------------------------------ cases
    def case_store(self, ask: bool = True) -> Optional[Any]:
        """The case store in the chosen folder; ``ask``: choose a folder if none yet and report problems."""
        from engine.cases import CaseStore

        root = _settings.cases_dir()
        if root is None and ask:
            root = self.ask_cases_dir()
        if root is None:
            return None
        try:
            folder = _settings.check_cases_dir(root)
            # a folder that cannot be written still lists its cases and trains from them (a shared, read-only folder
            # showed "0 case(s)" and refused fine-tuning); saving and removing say it is read-only
            readonly = folder.is_dir() and not os.access(folder, os.W_OK | os.X_OK)
            return CaseStore(folder, readonly=readonly)
        except ValueError as exc:  # CaseFolderError, CaseStoreError (a file)
            if ask:
                self.error(str(exc))
            return None

    def ask_cases_dir(self) -> Optional[Path]:
        """Let the user choose the case folder (remembered for later sessions)."""
        from qtpy.QtWidgets import QFileDialog

        path = QFileDialog.getExistingDirectory(self.parent(), "Folder for training cases")
        if not path:
            return None
        _settings.set_cases_dir(Path(path))
        forced = os.environ.get(_settings.CASES_ENV)
        if forced and Path(forced) != Path(path):
            # the choice was remembered and silently had no effect: the environment variable wins
            self.warning(f"{_settings.CASES_ENV} is set to {forced}, which stays the case folder while it is set; "
                         f"{path} is remembered for sessions started without it")
            self.cases_changed.emit()
            return Path(forced)
        self.cases_changed.emit()
        return Path(path)

    # ------------------------------------------------------------------ the job slot
    @property
    def busy(self) -> bool:
        return self.job is not None and self.job.running

    def start_job(self, func: Callable[..., Any], *, what: str, on_done: Callable[[Any], None],
                  on_progress: Optional[Callable[[int, int, str], None]] = None,
                  on_log: Optional[Callable[[Any], None]] = None,
                  on_cancelled: Optional[Callable[[], None]] = None,
                  on_finished: Optional[Callable[[str], None]] = None, engine: bool = True,
                  on_error: Optional[Callable[[BaseException], bool]] = None,
                  image: Any = None, image_use: str = "", outlives_dock: bool = False,
                  cancelled_text: Optional[str] = None) -> Optional[Job]:
        """Run ``func(progress, cancel[, log])`` in a worker; one job at a time per dock.

        Callbacks run on the GUI thread and never after the dock is gone. ``on_finished`` gets the
        outcome (``"done"``, ``"error"``, ``"cancelled"``). ``engine``: the worker first imports torch, MONAI and
        the network code under the plugin's import lock (:func:`._jobs.import_engine`); False for a job using none.
        ``on_error(exc)``: the panel's own answer to a failure; when it returns True the failure is not reported as
        an error here (the panel told the user, e.g. with a question). ``image``: the image layer the job works on;
        removing it from the viewer cancels the job at once (through the job's cancel token, as Cancel does), and the
        status line says that the result was dropped because the image was closed; ``image_use`` words what the job
        did with it for that message ("it was being segmented"; default: "it was in use (<what>)").
        ``outlives_dock``: closing the dock lets the job finish instead of cancelling it, and its ``on_done``,
        ``on_error`` and ``on_finished`` still run, then with :attr:`alive` False: they tell the user by napari
        notifications alone (the status line and the dock's signals are gone). For saving a case: written or refused,
        the user hears which (the dock's ✕ pressed while it was written left a saved case unmentioned, or a refused one
        unsaved without a word). ``cancelled_text``: the status line on Cancel, for a job whose cancel still changes
        something (default: "<what> cancelled; nothing was changed").

        Returns:
            The started job, or ``None`` when another job is running (reported).
        """
        if self.busy:
            self.warning("another Mamba-HoME job is running; wait for it or cancel it first")
            return None

        def alive(callback: Optional[Callable[..., Any]], after_close: bool = False) -> Callable[..., Any]:
            def call(*args: Any) -> None:
                if (self.alive or after_close) and callback is not None:
                    callback(*args)
            return call

        def progress(done: int, total: int, message: str) -> None:
            self.status.emit(message)
            if on_progress is not None:
                on_progress(done, total, message)

        def failed(exc: BaseException) -> None:
            if on_error is not None and on_error(exc):
                return
            detail = str(exc) if getattr(exc, "plain_message", False) else f"{type(exc).__name__}: {exc}"
            detail += self._drop_damaged_model(exc)
            if self.alive:
                self.error(f"{what} failed: {detail}")
            else:
                _notify("error", f"{what} failed: {detail}")

        use = _JobImage(image, image_use or f"it was in use ({what})") if image is not None else None

        def cancelled() -> None:
            if use is not None and use.closed is not None:
                self.warning(f"'{use.closed}' was closed while {use.doing}: {what} was cancelled and its result was "
                             "dropped; nothing was changed")
            else:
                self.status.emit(cancelled_text or f"{what} cancelled; nothing was changed")
            if on_cancelled is not None:
                on_cancelled()

        def finished() -> None:
            outcome = job.outcome or "cancelled"
            if self.job is job:
                self.job_what, self._job_image = None, None
            if self.alive:
                self.busy_changed.emit(False)
            if on_finished is not None:
                on_finished(outcome)

        job = Job(func, on_progress=alive(progress), on_log=alive(on_log) if on_log else None,
                  on_done=alive(on_done, outlives_dock), on_error=alive(failed, outlives_dock),
                  on_cancelled=alive(cancelled), on_finished=alive(finished, outlives_dock), engine=engine)
        job.outlives_dock = outlives_dock
        self.job = job
        self.job_what, self._job_image = what, use
        self.busy_changed.emit(True)
        self.status.emit(f"{what}…")
        return job.start()

    def cancel_job(self) -> None:
        """Ask the running job to stop; the model, layers and cases stay as they were."""
        if self.busy:
            self.job.cancel()
            self.status.emit("cancelling…")
