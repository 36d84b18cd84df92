"""Interactive panel: segment one object at a time from points, boxes and scribbles.

"Start prompting" puts three prompt layers on the chosen image's grid: points (green = positive,
red = negative), boxes (a rectangle drawn on a slice is a 2D box on that slice) and scribbles (brush
label 1 = positive, 2 = negative). Every prompt goes to a :class:`..prompting.PromptBackend` made by
``session.prompt_backend_factory`` and runs in a worker thread; prompts given while a prediction runs
are queued and run together, the labels layer is written once with the latest result. "Start prompting"
already queues the building of the backend and one throw-away warm-up pass (``InteractiveSession.warm_up``),
so the model loads while the annotator aims the first click; a click given meanwhile waits behind it. The object is
drawn with the chosen class id into the target labels layer over what was there before it (other
classes are kept unless "overwrite" is on). Keys on the prompt layers: T positive/negative,
Ctrl+Z undo the last prompt (with none left, the labels' last edit), Ctrl+Shift+Z redo such an edit, Enter or N accept
the object and start the next.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import sys
import threading
from collections import OrderedDict, deque
from pathlib import Path
from typing import Any, Callable, Deque, Dict, List, Optional, Sequence, Tuple

import numpy as np
from qtpy.QtCore import Qt, QTimer
from qtpy.QtGui import QKeySequence, QShortcut
from qtpy.QtWidgets import (
    QCheckBox, QComboBox, QFileDialog, QFormLayout, QHBoxLayout, QLabel, QPushButton, QWidget,
)

from .._classes import ClassTable, removal_value, unnamed_table
from .._history import (HISTORY_EVENT, atom_parts, atom_region, atom_values, read_at, record_applied_edit,
                        set_old_values, watch_history, write_at)
from .._geometry import META_KEY, LayerGeometryError, image_volume, layer_geometry, layer_grid, reference_volume
from .._models import ModelEntry, read_entry
from .._session import RESTORE_ACTION, SAVED_KEY, Session, mark_edited, owner_metadata
from ..prompting import (INTERACTIVE_KEY, PROMPT_LAYER_KEY, ObjectState, compose, inside,
                         layer_index_to_file, layer_indices_to_file, note_accepted_object, union_bbox)
from ._base import Panel
from ._parts import WrappedLabel

POSITIVE_COLOUR, NEGATIVE_COLOUR = "lime", "red"
POINTS_NAME, BOXES_NAME, SCRIBBLES_NAME = "prompts: points", "prompts: boxes", "prompts: scribbles"
TOGGLE_KEY, UNDO_KEY, REDO_KEY, NEXT_KEYS = "T", "Control-Z", "Control-Shift-Z", ("Enter", "N")
"""napari key names of the panel's keys, bound on the prompt layers (and as Qt shortcuts in the dock)."""


class _Op:
    """One queued backend call: ``call(backend) -> Update``; ``kind`` is "prompt", "initial", "undo", "reset", or
    "warm" (queued by Start: build the backend and run its ``warm_up``, no Update, nothing changes; see
    ``_warm_up``); ``edit``: an "initial" step that takes brush-edited voxels out of the object (see
    ``_take_out_edits``)."""

    def __init__(self, kind: str, what: str, call: Callable[[Any], Any], edit: bool = False) -> None:
        self.kind, self.what, self.call, self.edit = kind, what, call, edit


NEXT_OBJECT = "next object"
"""``_Op.what`` of the reset that Enter (accept) queues for the next object: its answer changes nothing the annotator
sees, so it says nothing (its "next object: object updated" replaced "object 1 accepted; prompt the next one" a moment
after Enter, as if the accepted object had been changed again)."""


OBJECT_ENDED = "object ended"
"""``_Op.what`` of the reset queued when the object's labels are removed or replaced whole: the status line already
says so, and "reset: object updated" replaced that line a moment later."""


def _labels_dtype(names: Sequence[str]) -> Any:
    """The dtype of new labels holding classes ``names`` (background first)."""
    return np.uint8 if len(names) < 255 else np.uint16


class _Context:
    """Prompting one image with one model: the backend (made in the worker), the object's mask, the queue."""

    def __init__(self, image: Any, geometry: Any, entry: ModelEntry, device: str, factory: Callable) -> None:
        self.image, self.geometry, self.entry, self.device, self.factory = image, geometry, entry, device, factory
        self.volume = image_volume(image, geometry)
        # the network sees the image normalised by the modality the annotator chose for it (a CT windowed in HU),
        # as Segment does; the file's own or guessed modality otherwise (the Volume already carries that)
        modality, source = Session.modality_of(image)
        if modality and source == "user" and modality != self.volume.modality:
            self.volume = dataclasses.replace(self.volume, modality=modality, modality_source="user")
        self.state = ObjectState(geometry.file_shape)
        self.backend: Any = None
        self.queue: Deque[_Op] = deque()
        self.lock = threading.Lock()
        # GUI thread: the warm-up queued at Start has been answered (done or failed); until then a prompt waits for
        # the model to load and the status line says so
        self.ready = False
        # set when prompting on this context ended (GUI thread): the worker stops before its next queued call
        self.ended = False
        self.running: Optional[str] = None  # kind of the call the worker runs now (under ``lock``)
        # set once by the warm-up (worker): memory for the first object's ``base``, already written once (see _warm_up)
        self.spare_base: Optional[np.ndarray] = None

    def cancel(self) -> None:
        """Any thread: prompting on this context ends (the viewer closed, Python exits): the worker starts no queued
        call, and a backend that can cancel (a ``cancel()`` method; the engine's session has none) stops the one it
        runs. The worker's ``cancel_token`` (see ``_jobs.stoppable_worker``)."""
        with self.lock:
            self.ended = True
            self.queue.clear()
        cancel = getattr(self.backend, "cancel", None)
        if callable(cancel):
            try:
                cancel()
            except Exception:  # noqa: BLE001 - stopping at close must not raise
                pass

    def drain(self) -> List[Tuple[_Op, Any, Optional[BaseException]]]:
        """Worker thread: make the backend if needed, run every queued call in order (latest last)."""
        from .._jobs import ENGINE_MODULES, import_engine, leave_a_core_for_the_gui
        from ..prompting import local_backend_factory

        local = self.factory is local_backend_factory
        # under the plugin's import lock: a Segment or fine-tune job may be importing torch in another thread now (a
        # server's session needs only InteractionError's module; a local one builds the network here)
        import_engine(*(ENGINE_MODULES + ("engine.interactive.session",) if local else ("engine.interactive.prompts",)))
        # a local prediction leaves a core to the GUI, as Segment's job does: with torch's threads on every core of a
        # 2-core machine a click took 5-8 s under load, 0.6-1.6 s with one thread (a server's session computes there)
        with leave_a_core_for_the_gui() if local else contextlib.nullcontext():
            return self._run_queue()

    def _run_queue(self) -> List[Tuple[_Op, Any, Optional[BaseException]]]:
        from engine.interactive.prompts import InteractionError

        results: List[Tuple[_Op, Any, Optional[BaseException]]] = []
        while True:
            with self.lock:
                if not self.queue or self.ended:
                    self.running = None
                    return results
                op = self.queue.popleft()
                self.running = op.kind
            try:
                if self.backend is None:
                    self.backend = self.factory(self.entry.prompt_source, self.volume, self.device)
                if op.kind == "warm":
                    if not self.ended:  # prompting ended while the backend was built: no pass for nothing
                        op.call(self.backend)
                    results.append((op, None, None))
                    continue
                update = op.call(self.backend)
                results.append((op, (self.state.apply(update), float(getattr(update, "latency_s", 0.0)),
                                     getattr(update, "note", None)), None))
            except (InteractionError, ValueError, OSError, RuntimeError) as exc:
                results.append((op, None, exc))


def _prompt_layer_property(attribute: str) -> property:
    """A prompt layer of the panel, read after the layers a first Start still stages are made (see
    ``InteractivePanel._finish_prompt_layers``)."""

    def get(panel: "InteractivePanel") -> Any:
        panel._finish_prompt_layers()
        return getattr(panel, attribute)

    def put(panel: "InteractivePanel", layer: Any) -> None:
        setattr(panel, attribute, layer)

    return property(get, put)


class InteractivePanel(Panel):
    """Class and interactive model boxes, Start prompting, mode, accept / undo / reset, count and latency."""

    name = "interactive"
    title = "Interactive (points, boxes, scribbles)"

    def __init__(self, session: Session, parent: Optional[QWidget] = None) -> None:
        super().__init__(session, parent)
        import threading

        threading.Thread(target=_first_layer_costs, name="prompt-layer-imports", daemon=True).start()
        self.model_entry: Optional[ModelEntry] = None
        self.positive = True
        self._ctx: Optional[_Context] = None  # through ``ctx``: its setter greys out the per-object buttons
        self.target: Any = None
        # what ``base`` held at the voxels of each brush/helper edit it mirrored, by id(atom): napari's undo of the edit
        # puts these back (see _target_history); only for the current ``base``, the newest MAX_MIRRORED_BYTES
        self._base_before: "OrderedDict[int, Tuple[Any, np.ndarray, int]]" = OrderedDict()
        self._base_before_bytes = 0
        # the brush/helper edits of the target (history atoms, by id) made since the last prompt of the object: where
        # they leave a value other than the object's class, the next prompt first takes those voxels out of the object
        # (see _take_out_edits); until then the layer shows the edit there, not the object (see _show_pending)
        self._pending: "OrderedDict[int, Any]" = OrderedDict()
        # id(voxel atom of a class removal) -> (the atom, the object's class before it) (see _follow_removal)
        self._class_before_removal: Dict[int, Tuple[Any, int]] = {}
        # the array of the last object's ``base``, reused for the next one's (see _copy_labels)
        self._spare_base: Optional[np.ndarray] = None
        self._base: Optional[np.ndarray] = None
        self.base = None  # the target's labels (display order) before the current object
        self._listened: Any = None  # the labels layer whose paint events feed ``base`` (see _target_painted)
        self.class_id = 1
        self.history: List[str] = []  # kinds of the backend steps in effect ("prompt" / "initial")
        # one entry per history step: what the step drew in a prompt layer ("point"/"box"/"scribble", what), or None;
        # undoing the step (or its failure) takes the mark away, so the layers show only the prompts in effect
        self._marks: List[Optional[Tuple[str, Any]]] = []
        self.objects_accepted = 0
        self._counted_image: Optional[int] = None  # id of the last ended context's image: its counts go on at its start
        self.prompts_accepted = 0
        # accepted objects as edits of their labels layer's own history, newest last (see _accept_counted):
        # (the layer, the history atom, prompts, the layer's interactive record before and after it)
        self._accepted_edits: List[Tuple[Any, Any, int, Any, Any]] = []
        self._accepted_follows = 0
        self.last_latency: Optional[float] = None
        self.worker: Any = None
        self._accept_when_idle = False
        self._save_when_idle = False  # "Save as training case" waits for the prediction in flight, then saves
        self._release_when_idle = False  # another labels layer was chosen mid-prediction: end the object once drawn
        self._choosing = False  # the panel itself is choosing labels (its new layer, its own object's): not the user
        self._points_layer: Any = None
        self._boxes_layer: Any = None
        self._scribbles_layer: Any = None
        # the prompt layers of a first Start being made (see _make_prompt_layers), None when none are
        self._staging: Optional[_Staging] = None
        self._starting = False  # start() runs: a modality set meanwhile must not start prompting again within it
        # the image the prompt layers lie on (None: none, or it was closed and they are being removed, see
        # _remove_orphaned_prompt_layer)
        self._prompt_image: Any = None
        self._scribble_seen: Optional[np.ndarray] = None
        self._muted = False  # our own edits of the prompt layers are not prompts

        form = QFormLayout(self)
        self.model_combo = QComboBox()
        self.model_combo.currentIndexChanged.connect(self._model_chosen)
        self.load_button = QPushButton("Load…")
        self.load_button.clicked.connect(self._ask_model_file)
        model_row = QHBoxLayout()
        model_row.addWidget(self.model_combo, 1)
        model_row.addWidget(self.load_button)
        self.model_note = QLabel("")
        self.model_note.setWordWrap(True)
        self.class_combo = QComboBox()
        self.class_combo.currentIndexChanged.connect(self._class_chosen)
        self.start_button = QPushButton("Start prompting on the image")
        self.start_button.clicked.connect(lambda *_: self.start())
        # whether a job of the session's one slot runs (followed from busy_changed, see _busy): prompts are refused
        # meanwhile (_ready), so Start is greyed out instead of accepted only for every click to be refused
        self._job_running = session.busy
        self.mode_label = QLabel("")
        self.mode_button = QPushButton("Toggle +/- (T)")
        self.mode_button.clicked.connect(lambda *_: self.toggle_mode())
        mode_row = QHBoxLayout()
        mode_row.addWidget(self.mode_label, 1)
        mode_row.addWidget(self.mode_button)
        self.overwrite_check = QCheckBox("Overwrite other classes' labels")
        # "Enter/N" without spaces: greyed out (napari's theme draws a disabled button with a border, 2 px wider) the
        # row of Accept and Undo no longer fitted the dock's minimum width and the text was cut
        self.next_button = QPushButton("Accept object, next (Enter/N)")
        self.next_button.clicked.connect(lambda *_: self.accept_object())
        self.undo_button = QPushButton("Undo prompt (Ctrl+Z)")
        self.undo_button.clicked.connect(lambda *_: self.undo())
        self.reset_button = QPushButton("Reset object")
        self.reset_button.clicked.connect(lambda *_: self.reset_object())
        self.clear_button = QPushButton("Clear prompts")
        self.clear_button.clicked.connect(lambda *_: self.clear_prompts())
        self.refine_button = QPushButton("Refine this class")
        self.refine_button.setToolTip("start from the class's voxels in the labels layer; click only to fix them")
        self.refine_button.clicked.connect(lambda *_: self.refine_class())
        self.save_button = QPushButton("Save as training case")
        self.save_button.clicked.connect(lambda *_: self.save_case())
        # what each button acts on exists only while prompting: before Start (and after prompting ended) they were
        # enabled and each press only answered "nothing to accept: start prompting first" (see _show_session_buttons)
        self._start_what = "prompt on the chosen image: click points, draw boxes or scribble to segment an object"
        self._session_buttons = {
            self.next_button: "keep the object in the labels and start the next one",
            self.undo_button: "take back the last prompt (with none: the object just accepted)",
            self.reset_button: "forget the object's prompts and remove it from the labels",
            self.clear_button: "empty the prompt layers (the object stays as it is)",
            self.save_button: "accept the object and save the image and its labels as a training case",
        }
        row1, row2 = QHBoxLayout(), QHBoxLayout()
        for button in (self.next_button, self.undo_button):
            row1.addWidget(button)
        for button in (self.reset_button, self.clear_button, self.refine_button):
            row2.addWidget(button)
        self.count_label = WrappedLabel("")  # two lines in a narrow dock: its row must grow with it
        form.addRow("Model", model_row)
        form.addRow(self.model_note)
        form.addRow("Class", self.class_combo)
        form.addRow(self.start_button)
        form.addRow(mode_row)
        form.addRow(self.overwrite_check)
        form.addRow(row1)
        form.addRow(row2)
        form.addRow(self.save_button)
        form.addRow(self.count_label)
        for key, button in ((TOGGLE_KEY, self.mode_button), ("Ctrl+Z", self.undo_button),
                            ("Return", self.next_button), ("Enter", self.next_button), ("N", self.next_button)):
            shortcut = QShortcut(QKeySequence(key), self)
            shortcut.setContext(Qt.ShortcutContext.WidgetWithChildrenShortcut)
            shortcut.activated.connect(lambda b=button: self._press(b))

        session.models_changed.connect(self._fill_models)
        session.model_changed.connect(self._model_selected_elsewhere)
        session.labels_changed.connect(self._labels_chosen)
        session.classes_changed.connect(lambda *_: self._fill_classes())
        # with no labels yet the class box shows what the first prompt's new labels will name (see class_names)
        session.image_changed.connect(lambda *_: self._fill_classes())
        session.model_changed.connect(lambda *_: self._fill_classes())
        session.layers_changed.connect(self._layers_changed)
        session.busy_changed.connect(self._busy)
        session.modality_changed.connect(self._modality_changed)
        self._fill_models()
        self._fill_classes()
        self._show_mode()
        self._show_counts()
        self._show_session_buttons()

    @property
    def ctx(self) -> Optional[_Context]:
        """The prompting context (image, geometry, model, backend queue) of the object being prompted; ``None`` before
        "Start prompting" and after prompting ended (model change, image closed, another start)."""
        return self._ctx

    @ctx.setter
    def ctx(self, value: Optional[_Context]) -> None:
        self._ctx = value
        self._show_session_buttons()

    def _show_session_buttons(self) -> None:
        """Accept / Undo / Reset / Clear / Save act on the object being prompted: greyed out, with a tooltip saying
        why, while there is none (every place that starts or ends prompting sets ``ctx``, which calls this). Start is
        greyed out the same way while a job runs (_busy calls this too)."""
        if not hasattr(self, "_session_buttons"):  # ``ctx`` is set once in __init__ before the buttons exist
            return
        for button, what in ((self.start_button, self._start_what), *self._session_buttons.items()):
            why = self._unavailable(button)
            button.setEnabled(why is None)
            button.setToolTip(what if why is None else why)

    def _unavailable(self, button: QPushButton) -> Optional[str]:
        """Why ``button`` cannot be pressed now (``None``: it can). The one answer for the button (greyed out, this as
        its tooltip) and for its keys (see _press)."""
        if button in self._session_buttons and self._ctx is None:
            return "nothing is being prompted: press 'Start prompting on the image' first"
        if button is self.start_button and self._job_running:
            # every prompt is refused while a job runs (_ready): a Start accepted then only led to refused clicks
            what = self.session.job_what
            return (f"a Mamba-HoME job ({what or 'segmentation, fine-tuning…'}) is running: start prompting when it "
                    "has finished, or cancel it")
        return None

    def _press(self, button: QPushButton) -> None:
        """A key of the panel (a shortcut in the dock, or bound on the prompt layers) presses its button, only when
        the button can be pressed; else it says why. Before, the keys called the actions themselves: Enter, N and
        Ctrl+Z acted (or answered "nothing to accept") while their buttons were greyed out."""
        if not self.session.alive:  # the dock is gone; the prompt layers and their keys may outlive it
            return
        why = self._unavailable(button)
        if why is not None:
            self.session.status.emit(f"{button.text()}: {why}")
            return
        button.click()  # does nothing should the button be disabled for any other reason

    # the prompt layers: reading one while a first Start still makes them (see _make_prompt_layers) finishes making
    # them at once, so code and keys that use them always find the three in the viewer
    points_layer = _prompt_layer_property("_points_layer")
    boxes_layer = _prompt_layer_property("_boxes_layer")
    scribbles_layer = _prompt_layer_property("_scribbles_layer")

    MAX_MIRRORED_BYTES = 64 << 20
    """Memory for the previous ``base`` values of the newest edits (napari's undo keeps 100 strokes); an older edit
    undone in napari gets napari's own old values."""

    @property
    def base(self) -> Optional[np.ndarray]:
        """The target's labels (display order) the current object is drawn over, with the brush strokes made since
        it began (and without those undone in napari since)."""
        return self._base

    @base.setter
    def base(self, value: Optional[np.ndarray]) -> None:
        old = self._base
        if old is not None and old is not value:
            # nothing else holds it (every reader of ``base`` is synchronous on the GUI thread): the next object copies
            # its labels into it instead of into new memory (see _copy_labels)
            self._spare_base = old
        self._base = value
        self._base_before.clear()  # the edits mirrored into the old base are in the new one's copy
        self._base_before_bytes = 0
        self._pending.clear()  # edits made before the object began are in its labels, not taken out of it
        self._class_before_removal.clear()  # a removal's undo no longer concerns this object's class

    # ------------------------------------------------------------------ model and class
    def interactive_entries(self) -> List[ModelEntry]:
        return [entry for entry in self.session.entries if entry.is_interactive]

    def _fill_models(self) -> None:
        entries = self.interactive_entries()
        if self.model_entry is None or self.model_entry not in entries:
            bundled = [e for e in entries if e.origin == "bundled"]
            new = (bundled or entries or [None])[0]
            if self.ctx is not None and new is not self.model_entry:
                # the list changed under an object being prompted (connected to or disconnected from a server): the
                # object must not go on with the old model's backend (the server after "working on this computer
                # again") while the box shows the new one
                self._end_object_for_new_model(new)
            self.model_entry = new
        self.model_combo.blockSignals(True)
        self.model_combo.clear()
        self.model_combo.addItems([entry.label for entry in entries])
        if self.model_entry is not None:
            self.model_combo.setCurrentIndex(entries.index(self.model_entry))
        self.model_combo.blockSignals(False)
        self.session.prompt_model = self.model_entry
        self.model_note.setText("" if entries else
                                "no interactive model: load a checkpoint trained with --task interactive (Load…)")

    def _busy(self, busy: bool) -> None:
        """While a job runs (a fine-tune above all) the promptable model cannot be changed, as the Model section's
        cannot: a fine-tune compares its new model with the promptable model chosen when it started and, when it
        finishes, selects the new interactive version here, so a model chosen (or loaded) meanwhile was silently
        replaced, and the result compared with a model other than the one shown. Enabled again whatever the job's
        outcome (the session emits ``busy_changed(False)`` after done, cancelled and failed alike)."""
        self.model_combo.setEnabled(not busy)
        self.load_button.setEnabled(not busy)
        self._job_running = busy
        self._show_session_buttons()  # Start: greyed out while the job runs, with why as its tooltip

    def _model_chosen(self, index: int) -> None:
        entries = self.interactive_entries()
        if 0 <= index < len(entries):
            self.select_model(entries[index])

    def _model_selected_elsewhere(self, entry: ModelEntry) -> None:
        # a fine-tuned interactive version (or one picked in the Model section) is the one to prompt with
        if entry is not None and entry.is_interactive and entry is not self.model_entry:
            self.select_model(entry)

    def select_model(self, entry: ModelEntry) -> bool:
        """Prompt with ``entry`` from now on, locally or on a server alike.

        Switching models mid-object ends that object: it stays in the labels exactly as drawn, its
        prompts end (they belong to the old model's history, which the new model cannot undo or refine),
        and the next "Start prompting" begins a new object answered by ``entry`` only (on a server, every
        prompt names ``entry``'s id; the server never substitutes its own choice).

        Returns:
            False (reported) when ``entry`` cannot be prompted.
        """
        problem = entry.prompt_problem()
        if problem:
            self.session.error(f"cannot prompt with this model: {problem}")
            return False
        if entry not in self.session.entries:
            self.session.add_entry(entry, select=False)
        if entry is not self.model_entry:
            self.model_entry = entry
            self._end_object_for_new_model(entry)
        self._fill_models()
        if self.class_combo.count() == 0 or self._class_names_source() == "model":
            self._fill_classes()
        return True

    def _end_object_for_new_model(self, entry: Optional[ModelEntry]) -> None:
        """End the object being prompted because the model changed (chosen, or the list changed on connecting to or
        disconnecting from a server): it stays in its labels as drawn and counts as accepted (a case saved from them
        records it as made by prompting, with the old model), its prompts end and leave the prompt layers, and the
        status line says how to go on ("Start prompting" begins a new object with ``entry``).

        Before, the old prompts stayed on screen and in the counts, the object was not recorded, and nothing said why
        the next click was refused."""
        ctx = self.ctx
        if ctx is None:
            return
        target, viewer = self.target, self.session.viewer
        kept = ""
        if target is not None and target in viewer.layers and ctx.state.mask.any():
            self._accept_counted()  # with the model that made it (ctx.entry), before the context ends
            kept = f"object {self.objects_accepted} stays in '{target.name}' as drawn; "
        self._end_context()
        self.clear_prompts()
        self._show_counts()
        if entry is None:  # the list lost its last promptable model
            self.session.status.emit(f"no interactive model now: {kept}load one (Load…) to prompt again")
        else:
            self.session.status.emit(f"model changed to {entry.version}: {kept}press 'Start prompting on the image' "
                                     "to prompt with it")

    def load_model(self, path: Any) -> Optional[ModelEntry]:
        """Offer an interactive checkpoint file and prompt with it; anything else is refused (reported)."""
        from engine.checkpoint import CheckpointError

        try:
            entry = read_entry(Path(path), origin="file")
        except (CheckpointError, OSError) as exc:
            self.session.error(f"cannot use model file {path}: {exc}")
            return None
        return entry if self.select_model(entry) else None

    def _ask_model_file(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Load an interactive Mamba-HoME checkpoint", "",
                                              "Mamba-HoME checkpoints (*.safetensors);;All files (*)")
        if path:
            self.load_model(path)

    def _labels_for_classes(self) -> Any:
        labels, image = self.session.labels_layer, self.session.image_layer
        if self.target is not None and self.target in self.session.viewer.layers:
            return self.target
        if labels is not None and image is not None and np.shape(labels.data) == np.shape(image.data):
            return labels
        return None

    def _class_names_source(self) -> str:
        return "layer" if self._labels_for_classes() is not None else "model"

    def class_names(self) -> List[str]:
        """The class table the object's class is chosen from: the target labels layer's, else the one the first
        prompt's new labels will have (:meth:`_new_labels_table`), so the class chosen is the class drawn."""
        layer = self._labels_for_classes()
        if layer is not None:
            return list(self.session.class_table(layer).names)
        return self._new_labels_table().names

    def _new_labels_table(self, image: Any = None) -> ClassTable:
        """The class table of new labels made for ``image`` (default: the one prompted on, else the chosen one).

        Named as any labels of the scan that name no classes are (:func:`.._classes.unnamed_table`): the scan's
        ``case.json`` / ``dataset.json``, else the selected automatic model's classes. Never the promptable model's:
        it is class-agnostic, and its names ("foreground" for the bundled one) named the annotator's structure after
        no class of theirs (saved cases then trained a class no automatic model had: fine-tuning matches by name).
        With nothing to name it, class 1 is a neutral "object" for the annotator to rename.
        """
        if image is None:
            image = self.ctx.image if self.ctx is not None else self.session.image_layer
        path = (image.metadata.get(META_KEY) or {}).get("path") if image is not None else None
        table = unnamed_table(path, self.session.automatic_class_names())
        if len(table.names) < 2:
            table.names.append("object")
        return table

    def _fill_classes(self) -> None:
        names = self.class_names()
        keep = self.class_id
        self.class_combo.blockSignals(True)
        self.class_combo.clear()
        for value, name in enumerate(names):
            if value:
                self.class_combo.addItem(f"{value}: {name}", value)
        index = self.class_combo.findData(keep)
        self.class_combo.setCurrentIndex(index if index >= 0 else 0)
        self.class_combo.blockSignals(False)
        self.class_id = int(self.class_combo.currentData() or 1)

    def _class_chosen(self, index: int) -> None:
        value = self.class_combo.itemData(index)
        if value is not None:
            self.set_class(int(value))

    def set_class(self, value: int) -> None:
        """The label value the current object is drawn with (it is redrawn at once)."""
        if value == self.class_id:
            return
        self.class_id = int(value)
        index = self.class_combo.findData(self.class_id)
        if index >= 0 and self.class_combo.currentIndex() != index:
            self.class_combo.blockSignals(True)
            self.class_combo.setCurrentIndex(index)
            self.class_combo.blockSignals(False)
        if self.ctx is not None and self.base is not None and self.ctx.state.mask.any():
            self._write(None, whole=True)

    # ------------------------------------------------------------------ starting
    def _modality_changed(self, layer: Any) -> None:
        """The annotator chose another modality for the image being prompted (the Segment section's box): the model
        must see the image normalised by it (a CT windowed in HU, an MR by percentiles), and the running context
        normalised it once, at Start. Prompting starts again on the image, as Start does: the object being prompted
        stays in its labels as drawn. Before, the choice was ignored until Start was pressed again, without a word."""
        ctx = self.ctx
        if ctx is None or ctx.image is not layer or self._starting:
            return
        modality, _ = Session.modality_of(layer)
        if not modality or modality == ctx.volume.modality:
            return
        if self.session.image_layer is not layer:  # the box showed another image's modality: nothing prompted changes
            return
        self.start(reason=f"modality {modality} chosen for '{layer.name}': prompting started again so the model sees it "
                          f"normalised as {modality}; ")

    def start(self, reason: str = "") -> bool:
        """Prompt on the chosen image: check it and the model, create the prompt layers on its grid.

        Args:
            reason: what the status line says first (why prompting started again), when not the annotator's Start."""
        self._starting = True
        try:
            return self._start(reason)
        finally:
            self._starting = False

    def _start(self, reason: str) -> bool:
        session, image = self.session, self.session.image_layer
        why = self._unavailable(self.start_button)
        if why is not None:  # the button is greyed out; this is for a caller of start() (Refine this class, a script)
            session.warning(f"{self.start_button.text()}: {why}")
            return False
        if image is None:
            session.error("no image to prompt on: open a volume (File > Open) or a sample first", about_image=True)
            return False
        try:
            geometry = layer_geometry(image)
        except LayerGeometryError as exc:
            session.error(f"cannot prompt on this layer: {exc}", about_image=True)
            return False
        if self.model_entry is None:
            session.error("no interactive model: load a checkpoint trained with --task interactive (Load…)")
            return False
        problem = self.model_entry.prompt_problem()
        if problem:
            session.error(f"cannot prompt with this model: {problem}")
            return False
        # the object being prompted ends as Enter ends it (kept as drawn, recorded as made by prompting); before, a new
        # start (on another scan, or the same one again) left it in the labels unrecorded and dropped a running
        # prediction without a word
        kept = self._keep_object()
        # the counts are per image ("object 2" on a new scan misled); a start after a model change, on the image the
        # ended context prompted, goes on counting
        if (id(self.ctx.image) if self.ctx is not None else self._counted_image) != id(image):
            self.objects_accepted, self.prompts_accepted, self.last_latency = 0, 0, None
        self._end_context()
        labels_note = self._labels_of_this_image(image)
        self.ctx = _Context(image, geometry, self.model_entry, session.device, session.prompt_backend_factory)
        self._make_prompt_layers(image)
        modality_note = ""
        if not self.ctx.volume.modality:
            modality_note = ("; its modality is not known: the model normalises it as its training's "
                             f"{self.ctx.entry.modality or 'default'} (choose it in the Segment section if that is wrong)")
        session.status.emit(f"{reason}{kept}prompting on '{image.name}' with {self.model_entry.version}: click points, "
                            f"draw boxes or scribble; T switches positive/negative{labels_note}{modality_note}")
        # while new prompt layers are being made, the worker starts after the last one (see _add_next_prompt_layer)
        self._warm_up(self.ctx)
        self._show_counts()
        return True

    def _warm_up(self, ctx: _Context) -> None:
        """Queue, first of ``ctx``'s calls, the building of its backend and one throw-away forward pass (the engine's
        ``InteractiveSession.warm_up``; a backend without one, a server's, is only built), so that the model loads and
        pays its first-call costs while the annotator aims the first click instead of after it (the first click paid
        for importing torch and the engine: BENCHMARKS.md, "napari: first click after Start prompting"). A prompt given
        meanwhile queues behind it, as behind any prediction; the warm-up changes no mask, history or count.
        Runs in the worker; nothing here waits for it. While new prompt layers are being made, it is queued only: the
        worker starts once they are in the viewer (see _prompt_layers_done), or with a first prompt given before."""

        shape, dtype = self._expected_labels(ctx)

        def warm(backend: Any) -> None:  # worker thread
            warm_up = getattr(backend, "warm_up", None)
            if callable(warm_up):
                warm_up()
            # the memory of the first object's ``base``, written once here (numpy's fill leaves the GIL): the first
            # prompt's copy of the labels then costs the GUI thread no page faults (see _copy_labels)
            spare = np.empty(shape, dtype)
            spare.fill(0)
            ctx.spare_base = spare

        with ctx.lock:
            ctx.queue.append(_Op("warm", f"loading {ctx.entry.version}", warm))
        # else it starts when the worker in flight (an ended context's) finishes, or the prompt layers are made
        if self.worker is None and self._staging is None:
            self._start_worker(ctx)

    def _expected_labels(self, ctx: _Context) -> Tuple[Tuple[int, ...], Any]:
        """Shape and dtype of the labels the first prompt on ``ctx`` will draw in: the chosen labels layer of the
        image's shape, else the new labels ``_new_labels`` makes."""
        labels, shape = self.session.labels_layer, tuple(int(n) for n in ctx.geometry.shape)
        if labels is not None and tuple(np.shape(labels.data)) == shape:
            return shape, np.asarray(labels.data).dtype
        return shape, _labels_dtype(self._new_labels_table(ctx.image).cover(self.class_id).names)

    def _labels_of_this_image(self, image: Any) -> str:
        """On a start, labels that cannot be this image's (the previous scan's, left chosen when the image was
        chosen without the layer list) give way to the labels made for it, else to none (the first prompt makes
        ``<image> labels``). Labels of another shape chosen after the start are still refused with a message."""
        session = self.session
        labels = session.labels_layer
        if labels is None or not session.labels_belong_elsewhere(labels, image):
            return ""
        own = session.labels_made_for(image)
        self._choosing = True
        try:
            session.set_labels(own)
        finally:
            self._choosing = False
        return (f"; '{labels.name}' belongs to another volume, objects go into "
                + (f"'{own.name}'" if own is not None else f"new labels '{image.name} labels'"))

    def _make_prompt_layers(self, image: Any) -> None:
        """Put the three prompt layers on ``image``'s grid: the existing ones moved and emptied, else new ones.

        New layers are made over several turns of the event loop, so that the GUI thread is never held for all of them
        at once (a first Start held it 0.5-1.3 s on the 2-core machine under Xvfb, whatever the volume's size: napari
        making each layer's controls and visuals and drawing them first, plus, for the first layers of a session,
        importing pandas for their feature tables; BENCHMARKS.md, "The prompt layers, one at a time"). The points
        layer is made and added at once, active in add mode, so that a click or T given right after Start lands on it;
        pandas and vispy's dash patterns were paid ahead when the panel was made (_first_layer_costs). The boxes and
        scribbles layer objects are made in a worker (napari's models, no Qt), then added and drawn one event-loop turn
        each; the model's warm-up worker starts after the last one. Reading ``points_layer``, ``boxes_layer`` or ``scribbles_layer``
        meanwhile makes the rest at once (see _finish_prompt_layers)."""
        self._finish_prompt_layers()  # a start while the previous one's layers were still being made
        viewer = self.session.viewer
        self._prompt_image = image  # a removal of the previous scan's layers still under way stops here
        layers = (self._points_layer, self._boxes_layer, self._scribbles_layer)
        if all(layer is not None and layer in viewer.layers for layer in layers):
            # making napari layers costs the GUI thread 0.2-0.8 s each under software OpenGL (their visuals);
            # a new start moves the existing ones to the image's grid and empties them instead
            self._move_prompt_layers(image)
            self._activate_points(image)
            return
        leftovers = [layer for layer in layers if layer is not None and layer in viewer.layers]
        # let go first: their removal is this Start's, not a user's to be told of (_prompt_layers_removed)
        self._points_layer = self._boxes_layer = self._scribbles_layer = None
        for layer in leftovers:  # some were removed by hand, or a closed scan's are still being removed: new ones
            with _collections_paused():
                viewer.layers.remove(layer)
        from .._jobs import stoppable_worker

        staging = _Staging(image, self.ctx, tuple(int(n) for n in np.shape(image.data)), layer_grid(image))
        self._staging = staging
        # an array of the image's shape, never written: the kernel maps its pages only where a stroke paints
        self._scribble_seen = np.zeros(staging.shape, np.uint8)
        # The points layer at once, active in add mode: a click or T given right after Start (queued by Qt while this
        # runs) lands on it. Made in the worker it came 0.3-0.4 s later, and such clicks panned the image, T went
        # nowhere and a negative click arrived as a positive one (an annotator's walk, 6 runs of 9).
        points = _new_prompt_layers(staging.shape, staging.grid, ("points",))["points"]
        points.visible = True
        self._add_prompt_layer(staging, "points", points)
        worker = self.session.track(stoppable_worker(_new_prompt_layers, staging.shape, staging.grid,
                                                     ("scribbles", "boxes")))
        worker.returned.connect(lambda made, st=staging: self._prompt_layers_made(st, made))
        worker.errored.connect(lambda _exc, st=staging: self._prompt_layers_made(st, None))
        staging.worker = worker
        worker.start()

    def _prompt_layers_made(self, staging: "_Staging", made: Optional[Dict[str, Any]]) -> None:
        """GUI thread: the worker made the layer objects (None: it failed; they are made here then)."""
        if not self.session.alive:  # the dock was closed meanwhile: no layers bound to a gone panel
            self._staging = None
        if staging is not self._staging:  # finished at once meanwhile, or abandoned
            return
        staging.made = made if made is not None else _new_prompt_layers(staging.shape, staging.grid,
                                                                        ("scribbles", "boxes"))
        self._add_next_prompt_layer(staging)

    def _add_next_prompt_layer(self, staging: "_Staging") -> None:
        """GUI thread, one step a turn of the event loop: add the next made layer to the viewer, hidden (napari makes
        its controls and visuals), or show the one added last turn (its first draw: shaders built, data sent)."""
        if not self.session.alive:
            self._staging = None
        if staging is not self._staging:
            return
        viewer = self.session.viewer
        if staging.image not in viewer.layers:  # the image was closed meanwhile: no more prompt layers for it
            self._staging = None
            if staging.hidden is not None:  # the one added is left shown, as a finished Start's would be
                staging.hidden.visible = True
            return
        if staging.hidden is not None:  # added last turn, drawn hidden (no new visual drawn): now its first draw
            layer, staging.hidden = staging.hidden, None
            layer.visible = True
            if layer is self._points_layer:  # napari keeps a hidden layer in pan/zoom: clicks add points from now
                layer.mode = "add"
        elif staging.made:
            kind, layer = staging.made.popitem()
            self._add_prompt_layer(staging, kind, layer)
            staging.hidden = layer
        if staging.made or staging.hidden is not None:
            QTimer.singleShot(STAGE_GAP_MS, lambda st=staging: self._add_next_prompt_layer(st))
        else:
            QTimer.singleShot(STAGE_GAP_MS, lambda st=staging: self._prompt_layers_done(st))

    def _prompt_layers_done(self, staging: "_Staging") -> None:
        """All three layers are in the viewer and drawn: the model's warm-up queued by Start may run now."""
        if staging is not self._staging:
            return
        self._staging = None
        self._run_warm_up(staging)

    def _run_warm_up(self, staging: "_Staging") -> None:
        ctx = staging.ctx
        if ctx is not None and ctx is self.ctx and self.worker is None and ctx.queue:
            self._start_worker(ctx)

    def _finish_prompt_layers(self) -> None:
        """Make and add at once the prompt layers a first Start is still making (their objects made here if the
        worker has not made them yet; its result is then dropped)."""
        staging = self._staging
        if staging is None:
            return
        self._staging = None  # what adding a layer sets off (layer list events, the panels' answers) finds none
        if staging.made is None:
            staging.made = _new_prompt_layers(staging.shape, staging.grid, ("scribbles", "boxes"))
        if staging.hidden is not None:
            layer, staging.hidden = staging.hidden, None
            layer.visible = True
            if layer is self._points_layer:
                layer.mode = "add"
        if staging.image in self.session.viewer.layers:
            while staging.made:
                kind, layer = staging.made.popitem()
                layer.visible = True
                self._add_prompt_layer(staging, kind, layer)
        self._run_warm_up(staging)

    def _add_prompt_layer(self, staging: "_Staging", kind: str, layer: Any) -> None:
        """Add one made prompt layer to the viewer, listen to it and bind the panel's keys on it."""
        viewer = self.session.viewer
        below = [viewer.layers.index(made) for made in (self._points_layer, self._boxes_layer)
                 if made is not None and made in viewer.layers]
        if below:  # under those made before, as they always lay (bottom to top: scribbles, boxes, points)
            viewer.layers.insert(min(below), layer)
        else:
            viewer.add_layer(layer)
        if kind == "points":
            self._points_layer = layer
            layer.events.data.connect(self._point_added)
        elif kind == "boxes":
            self._boxes_layer = layer
            layer.events.data.connect(self._box_drawn)
        else:
            self._scribbles_layer = layer
            layer.selected_label = 1
            layer.events.paint.connect(self._scribble_painted)
        layer.bind_key(TOGGLE_KEY, lambda _layer: self._press(self.mode_button), overwrite=True)
        layer.bind_key(UNDO_KEY, lambda _layer: self._press(self.undo_button), overwrite=True)
        layer.bind_key(REDO_KEY, lambda _layer: self.redo(), overwrite=True)
        for key in NEXT_KEYS:
            layer.bind_key(key, lambda _layer: self._press(self.next_button), overwrite=True)
        if kind == "points":
            self._activate_points(staging.image)
        elif self._points_layer is not None and self._points_layer in viewer.layers:
            viewer.layers.selection.active = self._points_layer  # a new layer becomes the active one: not this one
        if not self.positive:  # T was pressed before this layer came: it takes the mode as the others did
            self.set_positive(False)

    def _move_prompt_layers(self, image: Any) -> None:
        """Put the existing prompt layers on ``image``'s grid, empty (the same layers, no new visuals)."""
        self._muted = True
        grid = layer_grid(image)
        try:
            for layer in (self._points_layer, self._boxes_layer, self._scribbles_layer):
                # each assignment recomputes the layer's transforms and redraws it, even with the same values (a
                # restart on the same image): only a changed grid is set
                now = layer_grid(layer)
                for name, value in grid.items():
                    if not np.array_equal(now[name], value):
                        setattr(layer, name, value)
        finally:
            self._muted = False
        self.clear_prompts(np.shape(image.data))
        # above the image prompted now: one opened after them covered their markers (an annotator's walk)
        viewer = self.session.viewer
        mine = [viewer.layers.index(layer) for layer in (self._scribbles_layer, self._boxes_layer, self._points_layer)]
        if image in viewer.layers and min(mine) < viewer.layers.index(image):
            viewer.layers.move_multiple(mine, len(viewer.layers))

    def _activate_points(self, image: Any) -> None:
        self._points_layer.mode = "add"
        self._show_mode()
        # the prompt layers must not become the session's image or labels
        self.session.set_image(image)
        self.session.viewer.layers.selection.active = self._points_layer

    def _end_context(self) -> None:
        if self.ctx is not None:
            # whose counts the count line shows (see start); its id: a closed scan's array is not kept alive by it
            self._counted_image = id(self.ctx.image)
            with self.ctx.lock:  # its calls not yet begun are dropped: their results would be anyway
                self.ctx.ended = True
                self.ctx.queue.clear()
        self.ctx = None  # a running worker finishes its call on its own; its results are dropped
        self.base, self.target = None, None
        self._spare_base = None  # prompting ended: its memory is not held for a start that may never come
        self._stop_listening()
        self._clear_history()
        self._accept_when_idle = False
        self._save_when_idle = False
        self._release_when_idle = False

    def _stop_listening(self) -> None:
        """Let go of the labels layer whose paint events fed ``base`` (a removed layer is not kept alive)."""
        if self._listened is not None:
            self._listened.events.paint.disconnect(self._target_painted)
            self._listened.events.data.disconnect(self._target_replaced)
            history = getattr(self._listened.events, HISTORY_EVENT, None)
            if history is not None:
                history.disconnect(self._target_history)
            self._listened = None

    def _labels_chosen(self, layer: Any) -> None:
        """Another labels layer was chosen (Correct section, layer list, a restored mask) while an object is drawn in
        a live one: the object ends as it is, kept in its labels (as Enter does), and the next prompt draws into the
        chosen labels instead of going on in the old ones unseen."""
        target = self.target
        live = (self.ctx is not None and layer is not None and target is not None and layer is not target
                and not self._choosing and target in self.session.viewer.layers)
        chosen_image = self.session.image_layer
        if (live and self.session.labels_belong_elsewhere(layer, self.ctx.image)
                and not (chosen_image is not None and chosen_image is not self.ctx.image
                         and not self.session.labels_belong_elsewhere(layer, chosen_image))):
            # labels of the chosen image are kept chosen whatever is prompted: the user moved to another scan (its
            # Segment, the layer list), and keeping the prompted scan's labels chosen with it had Correct edit them
            # and Save refuse the pair; below, the object ends in its labels as when other labels are chosen
            # after the other sections took this choice (a second one made now would be overtaken by theirs)
            QTimer.singleShot(0, lambda: self._keep_target(layer))
            return
        if live:
            if self._predicting():  # the prediction in flight belongs to this object: end it once drawn
                self._accept_when_idle = self._release_when_idle = True
            else:
                self._release_target()
        self._fill_classes()

    def _keep_target(self, layer: Any) -> None:
        """Labels of another scan (a file of another shape dropped in) were chosen while an object is drawn: they
        cannot take it, so the choice goes back to the labels it is drawn in; else Correct and Save worked on labels
        that do not fit the image while the object went on unseen."""
        target, ctx = self.target, self.ctx
        if (ctx is None or target is None or self.session.labels_layer is not layer
                or target not in self.session.viewer.layers):
            return
        image = ctx.image
        shape, wanted = tuple(np.shape(layer.data)), tuple(np.shape(image.data))
        why = f"its shape {shape} is not the image's {wanted}" if shape != wanted else "it was made for another image"
        self._choosing = True
        try:
            self.session.set_labels(target)
        finally:
            self._choosing = False
        self.session.status.emit(f"'{layer.name}' does not fit '{image.name}' ({why}): prompting goes on in "
                                 f"'{target.name}', which stays the chosen labels")

    def _release_target(self, accept: bool = True) -> None:
        """End the current object in its labels layer (``accept``: as Enter does; False: it was just accepted) and let
        go of that layer (the next prompt takes the session's)."""
        self._release_when_idle = False
        target = self.target
        if target is None or self.ctx is None:
            return
        if accept:
            self.accept_object()
        self.target, self.base = None, None
        self._stop_listening()
        chosen = self.session.labels_layer
        self.session.status.emit(f"the object stays in '{target.name}'; the next prompt draws into "
                                 + (f"'{chosen.name}'" if chosen is not None else "new labels"))

    def _layers_changed(self) -> None:
        if self.target is not None and self.target not in self.session.viewer.layers:
            if self.session.was_kept(self.target):  # the session says how to get it back (one message, not two)
                self.session.status.emit(f"the labels layer '{self.target.name}' was removed; the object there is "
                                         f"ended; '{RESTORE_ACTION}' in the Correct section brings the labels back")
            else:
                self.session.warning(f"the labels layer '{self.target.name}' was removed; the object there is dropped")
            self._drop_object()
        if self.ctx is not None and self.ctx.image not in self.session.viewer.layers:
            self._end_object_for_closed_image()
        if self._prompt_image is not None and self._prompt_image not in self.session.viewer.layers:
            self._prompt_layers_outlived_their_image()
        else:
            self._prompt_layers_removed()
        self._fill_classes()

    def _prompt_layers_removed(self) -> None:
        """A prompt layer deleted by the user (the layer list's bin) is let go of, and while prompting the status line
        says how to get it back: the panel kept the deleted layer, so clicks had nowhere to land, and nothing said
        why."""
        viewer = self.session.viewer
        gone = []
        for attribute in ("_points_layer", "_boxes_layer", "_scribbles_layer"):
            layer = getattr(self, attribute)
            if layer is not None and layer not in viewer.layers:
                setattr(self, attribute, None)
                gone.append(layer.name)
        if gone and self.ctx is not None:
            self.session.status.emit(
                f"{' and '.join(repr(name) for name in gone)} {'was' if len(gone) == 1 else 'were'} removed: press "
                "'Start prompting on the image' to bring the prompt layers back (the object drawn so far stays)")

    def _prompt_layers_outlived_their_image(self) -> None:
        """The image the prompt layers lie on was closed: they go with it (after its prompting ended and its object was
        kept, see _end_object_for_closed_image), one a turn of the event loop from the next turn on.

        Before, the three ``prompts:`` layers stayed in the layer list, on the closed scan's grid (whose extent the
        viewer's sliders kept spanning) and under the next scan opened, until a Start moved them. What they hold is
        only the prompts of an ended object (its result stays in its labels), so nothing of the user's is lost. A Start
        before they are all gone takes over those left (see _make_prompt_layers)."""
        self._prompt_image = None
        self._staging = None  # a first Start still making them stops: the ones it added go too
        self._scribble_seen = None  # the closed scan's shape: not kept for a Start that may never come
        QTimer.singleShot(0, self._remove_orphaned_prompt_layer)

    def _remove_orphaned_prompt_layer(self) -> None:
        """Remove one prompt layer whose image was closed, then come back for the next on a later turn.

        napari's removal of a layer runs a full garbage collection (``gc.collect`` in its canvas, for a Windows OpenGL
        driver race): 0.6 s over the heap of a session that imported torch, per layer. Python's collector is paused
        (frozen objects are not traversed) while napari removes the layer, so the removal costs the GUI thread tens
        of milliseconds instead; the frozen objects go back to the collector's oldest generation at once."""
        session = self.session
        window = getattr(session.viewer, "window", None)
        if (not session.alive or self._prompt_image is not None
                or (window is not None and not hasattr(window, "_qt_window"))):
            return  # the dock or viewer is closing, or a Start took over the layers left
        viewer = session.viewer
        for attribute in ("_points_layer", "_boxes_layer", "_scribbles_layer"):
            layer = getattr(self, attribute)
            if layer is None:
                continue
            setattr(self, attribute, None)
            if layer in viewer.layers:
                with _collections_paused():
                    viewer.layers.remove(layer)
                QTimer.singleShot(STAGE_GAP_MS, self._remove_orphaned_prompt_layer)
                return
        self._scribble_seen = None

    def _keep_object(self) -> str:
        """The object being prompted ends where it is drawn: it counts as accepted and its labels record it as made by
        prompting (a case saved from them says so). Returns what the status line says about it ("" when there is no
        object with prompts in effect), including a prediction still running, whose result is dropped."""
        ctx, target = self.ctx, self.target
        if ctx is None or not self.history:
            return ""
        said = "the prediction still running was dropped; " if self._predicting() else ""
        if target is None or target not in self.session.viewer.layers or not ctx.state.mask.any():
            return said
        self._accept_counted()
        self._clear_history()  # counted once, whatever ends the context next
        return f"{said}object {self.objects_accepted} stays in '{target.name}' as drawn; "

    def dock_closing(self) -> None:
        """Prompting ends with the dock: the object stays in its labels as drawn (as Enter keeps it), and the prompt
        layers go. They hold only prompts, bound to this panel: left behind, clicks and T/Enter on them did nothing,
        and a dock opened again added a second set beside them."""
        self._staging = None  # a first Start still making them stops
        if self.ctx is not None:
            self._keep_object()
            self._end_context()
        viewer = self.session.viewer
        for attribute in ("_points_layer", "_boxes_layer", "_scribbles_layer"):
            layer = getattr(self, attribute)
            setattr(self, attribute, None)
            if layer is not None and layer in viewer.layers:
                with _collections_paused():  # napari's removal runs a full gc: 0.6 s a layer in a torch session
                    viewer.layers.remove(layer)
        self._prompt_image = None

    def _end_object_for_closed_image(self) -> None:
        """The image being prompted was removed from the viewer: its object ends as a model change ends it (it stays
        in its labels as drawn and counts as accepted), its prompts leave the prompt layers (which go with the image,
        see _prompt_layers_outlived_their_image), and the user is told what became of a prediction still running and
        of a Save pressed while it ran.

        Before, prompting ended without a word: the prediction in flight and a pending Save as training case vanished,
        the prompt layers kept the closed scan's points, and the object drawn was not recorded as made by prompting."""
        name, saving = self.ctx.image.name, self._save_when_idle
        kept = self._keep_object()
        self._end_context()
        if self._prompt_image is not None and self._prompt_image in self.session.viewer.layers:
            self.clear_prompts()  # they lie on a scan still open; on the closed one they are removed, not emptied
        self._show_counts()
        message = (f"'{name}' was closed while you prompted on it: prompting on it ended; {kept}"
                   + ("the case was NOT saved: open the scan again and save it" if saving else "")).rstrip("; ")
        if kept or saving:  # something the user did is affected: a notification too
            self.session.warning(message)
        else:  # no object in progress (closing napari, say): the status line is enough
            self.session.status.emit(message)

    # ------------------------------------------------------------------ mode
    def toggle_mode(self) -> None:
        """Switch between positive (add) and negative (remove) prompts (key T)."""
        self.set_positive(not self.positive)

    def set_positive(self, positive: bool) -> None:
        self.positive = bool(positive)
        colour = POSITIVE_COLOUR if self.positive else NEGATIVE_COLOUR
        self._muted = True
        try:
            if self._points_layer is not None:
                self._points_layer.selected_data = set()  # only new points take the colour
                self._points_layer.current_face_color = colour
            if self._boxes_layer is not None:
                self._boxes_layer.selected_data = set()
                self._boxes_layer.current_edge_color = colour
            if self._scribbles_layer is not None:
                self._scribbles_layer.selected_label = 1 if self.positive else 2
        finally:
            self._muted = False
        self._show_mode()

    def _show_mode(self) -> None:
        text, colour = ("positive (adds)", "#2e8b57") if self.positive else ("negative (removes)", "#c0392b")
        self.mode_label.setText(f"Mode: <b style='color:{colour}'>{text}</b>")

    # ------------------------------------------------------------------ prompts from the layers
    def _point_added(self, event: Any) -> None:
        if self._muted or str(getattr(event, "action", "")) not in ("added", "ActionType.ADDED"):
            return
        layer = self._points_layer
        for index in sorted(int(i) % len(layer.data) for i in event.data_indices):
            if not self.add_point(layer.data[index]):
                self._remove_points({index})
            else:
                self._mark_last("point", np.array(layer.data[index], copy=True))

    def _remove_points(self, indices: set) -> None:
        self._muted = True
        try:
            self._points_layer.selected_data = indices
            self._points_layer.remove_selected()
        finally:
            self._muted = False

    def _box_drawn(self, event: Any) -> None:
        if self._muted or str(getattr(event, "action", "")) not in ("added", "ActionType.ADDED"):
            return
        vertices = np.asarray(self._boxes_layer.data[-1], dtype=float)
        if self.add_box(vertices.min(axis=0), vertices.max(axis=0)):
            self._mark_last("box", np.array(vertices, copy=True))
        else:
            self._muted = True
            try:
                self._boxes_layer.selected_data = {len(self._boxes_layer.data) - 1}
                self._boxes_layer.remove_selected()
            finally:
                self._muted = False

    def _scribble_painted(self, event: Any) -> None:
        if self._muted or self._scribble_seen is None:
            return
        data = np.asarray(self._scribbles_layer.data)
        if self._scribble_seen.shape != data.shape:
            self._scribble_seen = np.zeros(data.shape, np.uint8)
        # only the stroke's box is compared (the event's history atoms say where it painted): comparing and copying the
        # whole scribble volume at every stroke took 0.4 s on the GUI thread for a 300x404x488 CT
        atoms = getattr(event, "value", None)
        box = _atoms_box(atoms, data.shape)
        now = _painted_box(data, atoms, box)
        fresh = (now != self._scribble_seen[box]) & (now != 0)
        self._scribble_seen[box] = now
        for value, positive in ((1, True), (2, False)):
            local = fresh & (now == value)
            if not local.any():
                continue
            stroke = np.zeros(data.shape, bool)
            stroke[box] = local
            if self.add_scribble(stroke, positive=positive, box=box):
                self._mark_last("scribble", stroke)
            else:
                self._muted = True
                try:
                    data[stroke] = 0
                    self._scribble_seen[stroke] = 0
                    self._scribbles_layer.refresh()
                finally:
                    self._muted = False

    # ------------------------------------------------------------------ prompts (public)
    def add_point(self, layer_index: Any, positive: Optional[bool] = None) -> bool:
        """A point at a voxel of the image layer (display order, napari data coordinates).

        Args:
            layer_index: ``(3,)`` data coordinates of the image layer (rounded here).
            positive: default the current mode.

        Returns:
            Whether the prompt was accepted (queued); a refusal is reported.
        """
        sign = self.positive if positive is None else bool(positive)
        voxel = self._to_file_voxel(layer_index, "point")
        if voxel is None:
            return False
        return self._queue(_Op("prompt", f"{'+' if sign else '-'} point",
                               lambda b: b.add_point(tuple(int(v) for v in voxel), positive=sign)))

    def add_box(self, corner_a: Any, corner_b: Any, positive: Optional[bool] = None) -> bool:
        """A box between two corners in the image layer's data coordinates (same slice: a 2D box)."""
        sign = self.positive if positive is None else bool(positive)
        if self.ctx is not None:  # a box dragged past the image's edge is the part of it on the image
            corner_a, corner_b = _clip_box(corner_a, corner_b, self.ctx.geometry.shape)
        a = self._to_file_voxel(corner_a, "box corner")
        b = self._to_file_voxel(corner_b, "box corner") if a is not None else None
        if a is None or b is None:
            return False
        return self._queue(_Op("prompt", f"{'+' if sign else '-'} box",
                               lambda be: be.add_box(tuple(int(v) for v in np.minimum(a, b)),
                                                     tuple(int(v) for v in np.maximum(a, b)), positive=sign)))

    def add_scribble(self, layer_mask: np.ndarray, positive: Optional[bool] = None,
                     box: Optional[Tuple[slice, ...]] = None) -> bool:
        """A scribble: a mask of the image layer's shape (display order). ``box``: slices of the layer that hold all
        of its voxels (a brush stroke's box), so only that box is read."""
        sign = self.positive if positive is None else bool(positive)
        if not self._ready():
            return False
        geometry = self.ctx.geometry
        if np.shape(layer_mask) != tuple(geometry.shape):
            self.session.error(f"scribble of shape {np.shape(layer_mask)} does not match the image {geometry.shape}")
            return False
        shape = tuple(int(n) for n in geometry.shape)
        layer_mask = np.asarray(layer_mask)
        if box is None:  # the scribble's own box (reductions allocate no whole-volume array)
            hits = [np.flatnonzero(layer_mask.any(axis=tuple(a for a in range(3) if a != axis))) for axis in range(3)]
            if any(len(h) == 0 for h in hits):
                return False
            box = tuple(slice(int(h[0]), int(h[-1]) + 1) for h in hits)
        part = np.array(layer_mask[box], copy=True)  # read in the worker: the caller may paint on meanwhile
        if not part.any():
            return False
        starts = np.array([sl.indices(n)[0] for sl, n in zip(box, shape)], dtype=np.int64)
        display = geometry.display

        def scribble(backend: Any) -> Any:  # worker thread
            # the stroke's voxels, not a whole-volume mask: the backend found them in a 512x512x400 mask in 0.6 s more
            # than it takes for the prompt itself
            voxels = layer_indices_to_file(display, shape, np.argwhere(part) + starts)
            return backend.add_scribble(voxels, positive=sign, joined=False)  # a set: painted, not drawn as a line

        return self._queue(_Op("prompt", f"{'+' if sign else '-'} scribble", scribble))

    def refine_class(self) -> bool:
        """Start the object from the chosen class's voxels in the labels layer (e.g. the automatic
        segmentation), so prompts only fix it; the class's voxels are this object from now on."""
        labels = self._labels_for_classes()
        if labels is None:
            self.session.error("no labels layer of this image to refine: segment it first or choose its labels")
            return False
        if self.ctx is None and not self.start():
            return False
        if not self._ready(check_target=False):
            return False
        if self.history or self.ctx.state.mask.any():
            self.accept_object()
        if not self._take_target(labels):
            return False
        cid = self.class_id
        current = np.asarray(labels.data)
        # one comparison and one copy of the labels here (the base must be this moment's); the mask's reordering into
        # the file's voxel order runs in the prompt worker: three comparisons, np.where and four copies of a
        # 200x512x512 labels layer held the GUI thread for seconds
        selected = current == cid
        if not selected.any():
            self.session.error(f"class {cid} has no voxels in '{labels.name}' to refine")
            return False
        base = self._copy_labels(current)
        base[selected] = 0
        self.base = base
        to_file = self.ctx.geometry.to_file
        return self._queue(_Op("initial", f"class {cid} as the start",
                               lambda b: b.set_initial_mask(np.ascontiguousarray(to_file(selected.view(np.uint8))))))

    def undo(self) -> bool:
        """Take back the last prompt (Ctrl+Z); the labels return exactly to what they were before it."""
        if self.ctx is not None and not self.history and self._undo_accepted():
            return True
        if self.ctx is None or not self.history:
            self.session.status.emit("nothing to undo")
            return False
        self.history.pop()  # optimistic: the queue runs in order, the backend's undo matches this step
        self._unmark(self._marks.pop() if self._marks else None)
        return self._queue(_Op("undo", "undo", lambda b: b.undo()), count=False)

    def redo(self) -> bool:
        """Ctrl+Shift+Z on a prompt layer: with no prompt of the current object in effect, redo the last edit of the
        labels being prompted that Ctrl+Z took back (an accepted object whole, or a brush stroke), as Ctrl+Shift+Z in
        that layer does. A prompt taken back is not redone (the annotator clicks again); it said nothing at all."""
        target = self.target
        if (self.ctx is not None and not self.history and target is not None and target in self.session.viewer.layers
                and getattr(target, "_redo_history", None)):
            target.redo()  # watch_history's event reaches _target_history, which follows it (counts, saved mark)
            return True
        self.session.status.emit("nothing to redo: a prompt taken back is not redone (prompt again); Ctrl+Shift+Z "
                                 "redoes an accepted object or a brush stroke that Ctrl+Z took back")
        return False

    def _undo_accepted(self) -> bool:
        """Ctrl+Z with no prompt of the current object to take back undoes the last edit of the labels being prompted,
        as Ctrl+Z in that layer does: an accepted object whole (see _accept_counted), or a brush stroke."""
        target = self.target  # a reset queued by Enter may still run: it draws nothing (the object starts empty)
        if target is None or target not in self.session.viewer.layers:
            return False
        item = getattr(target, "_undo_history", None)
        atoms = list(item[-1]) if item else []
        if not atoms:
            return False
        follows = self._accepted_follows
        target.undo()  # watch_history's event reaches _target_history, which follows it (_follow_accepted_edit)
        if self._accepted_follows == follows and not self._follow_accepted_edit(atoms, undoing=True):
            self.session.status.emit(f"undid the last edit of '{target.name}' (Ctrl+Shift+Z in that layer redoes it)")
        return True

    def reset_object(self) -> bool:
        """Forget the current object's prompts and remove it from the labels."""
        if self.ctx is None:
            self.session.status.emit("nothing to reset: start prompting first")
            return False
        self._clear_history()
        self._pending.clear()  # the object is gone: nothing to take out of it
        self.clear_prompts()
        return self._queue(_Op("reset", "reset", lambda b: b.reset()), count=False)

    def clear_prompts(self, shape: Optional[Tuple[int, ...]] = None) -> None:
        """Empty the prompt layers (the object and its prompts stay in effect); ``shape``: the scribbles layer's
        new shape (another image's), default its own."""
        self._muted = True
        try:
            if self._points_layer is not None:
                self._points_layer.data = np.empty((0, 3))
            if self._boxes_layer is not None and len(self._boxes_layer.data):
                self._boxes_layer.data = []
            if self._scribbles_layer is not None:
                shape = tuple(shape or np.shape(self._scribbles_layer.data))
                self._scribbles_layer.data = np.zeros(shape, np.uint8)
                self._scribble_seen = np.zeros(shape, np.uint8)
        finally:
            self._muted = False

    def accept_object(self) -> bool:
        """Keep the current object in the labels and start the next one (Enter / N)."""
        if self.ctx is None:
            self.session.status.emit("nothing to accept: start prompting first")
            return False
        if self._predicting():  # the latest prediction belongs to this object: accept after it
            self._accept_when_idle = True
            return True
        if not self.ctx.state.mask.any():
            if not self.history:  # Enter before any prompt: said "object 0 accepted" and changed nothing
                self.session.status.emit("no object to accept yet: click on the structure (or draw a box or "
                                         "scribble) first")
                return False
            # prompts that left the object empty (negative ones only): they end, but nothing was accepted
            self._clear_history()
            self.base = None
            self.clear_prompts()
            self._queue(_Op("reset", NEXT_OBJECT, lambda b: b.reset()), count=False)
            self._show_counts()
            self.session.status.emit("the object was empty: nothing accepted; prompt the next one")
            return True
        self._accept_counted()
        self._clear_history()
        self.base = None  # the next object starts from the labels as they are now
        self.clear_prompts()
        self._queue(_Op("reset", NEXT_OBJECT, lambda b: b.reset()), count=False)
        self._show_counts()
        self.session.status.emit(f"object {self.objects_accepted} accepted; prompt the next one")
        return True

    def _accept_counted(self) -> None:
        """The current object is accepted: counted, noted in its labels layer (_record_accepted) and recorded there as
        one edit of napari's own history, so Ctrl+Z takes the whole object back and napari's redo
        (Ctrl+Shift+Z in the labels layer) brings it back. The predictions drew the object straight into the layer's
        data, outside that history: an accepted object could not be undone at all."""
        prompts = sum(1 for kind in self.history if kind == "prompt")
        self.objects_accepted += 1
        self.prompts_accepted += prompts
        target = self.target
        before = (target.metadata.get(META_KEY) or {}).get(INTERACTIVE_KEY) if target is not None else None
        self._record_accepted(prompts)
        base, ctx = self.base, self.ctx
        if target is None or base is None or ctx is None or target not in self.session.viewer.layers \
                or tuple(np.shape(target.data)) != tuple(np.shape(base)) or not isinstance(target.data, np.ndarray):
            return
        key = _mask_box(ctx.geometry.to_display(ctx.state.mask))
        if key is None:
            return
        data = target.data
        changed = data[key] != base[key]  # the object's voxels drawn over other values; the rest is as it was
        drawn = data[key][changed]
        if not drawn.size:
            return
        if (drawn != drawn[0]).any():  # not one label: not what compose draws; leave the history alone
            return
        self._rebase_object_edits(target)
        self.base = None  # the paint event of the record is not a brush edit of the object (see _target_painted)
        try:
            atom = record_applied_edit(target, key, changed, base[key][changed], int(drawn[0]))
        finally:
            self.base = base
        if atom is None:
            return
        after = (target.metadata.get(META_KEY) or {}).get(INTERACTIVE_KEY)
        # napari keeps its last 100 history items: an object older than that cannot be undone anyway
        self._accepted_edits = [e for e in self._accepted_edits if e[0] in self.session.viewer.layers][-99:]
        self._accepted_edits.append((target, atom, prompts, before, after))

    def _rebase_object_edits(self, target: Any) -> None:
        """The brush edits made while this object was prompted, as napari's history keeps them, remember the object's
        voxels as their old values (napari read them from the layer, where the object was drawn): undone after the
        accepted object was taken back, an erase stroke put a fragment of that object back. They get what the
        labels held there without the object (``_base_before``); the accepted object's edit lies above them in the
        history, so they can only be undone after it."""
        stack = getattr(target, "_undo_history", None)
        if not stack or not self._base_before:
            return
        for item in stack:
            for atom in item:
                record = self._base_before.get(id(atom))
                if record is not None and record[0] is atom:
                    set_old_values(atom, record[1])

    def _follow_accepted_edit(self, atoms: Sequence[Any], undoing: bool) -> bool:
        """napari undid (or redid) the newest accepted object's edit: the counts and the layer's interactive record
        follow, so a case saved afterwards does not claim an object that is no longer there. True if it was that."""
        edit = next((e for e in reversed(self._accepted_edits) if any(atom is e[1] for atom in atoms)), None)
        if edit is None:
            return False
        self._accepted_follows += 1
        target, _, prompts, before, after = edit
        sign = -1 if undoing else 1
        self.objects_accepted = max(0, self.objects_accepted + sign)
        self.prompts_accepted = max(0, self.prompts_accepted + sign * prompts)
        meta = target.metadata.setdefault(META_KEY, {})
        record = before if undoing else after
        if record is None:
            meta.pop(INTERACTIVE_KEY, None)
        else:
            meta[INTERACTIVE_KEY] = record
        self._show_counts()
        self.session.status.emit(f"an accepted object was taken back from '{target.name}' (Ctrl+Shift+Z in that layer "
                                 "brings it back)" if undoing else f"the accepted object is back in '{target.name}'")
        return True

    def _record_accepted(self, prompts: int) -> None:
        """Note the accepted object in its labels layer, so a case saved from it says it was made interactively."""
        target, entry = self.target, self.ctx.entry
        if target is None or target not in self.session.viewer.layers:
            return
        meta = target.metadata.setdefault(META_KEY, {})
        name = getattr(entry, "model_id", None) or Path(entry.path).name
        meta[INTERACTIVE_KEY] = note_accepted_object(meta.get(INTERACTIVE_KEY), self.class_id, prompts,
                                                     entry.version, str(name))

    def save_case(self) -> None:
        """Accept the current object and save the image and its labels as a training case (Cases section);
        the case record notes which classes were made by prompting, with how many prompts and which model."""
        if self.ctx is None or self.target is None:
            self.session.error("nothing to save yet: prompt an object first")
            return
        if self._predicting():
            # the prediction in flight belongs to this object: saving now wrote the labels without it, and before the
            # object was accepted, so the case did not say it was made by prompting; save once it is drawn
            self._accept_when_idle = self._save_when_idle = True
            self.session.status.emit("the case is saved once the last prediction is drawn…")
            return
        if self.ctx.state.mask.any() or self.history:  # no object open (all accepted): nothing to accept, no refusal
            self.accept_object()
        self._save_accepted()

    def _save_accepted(self) -> None:
        self._choosing = True
        try:
            self.session.set_image(self.ctx.image)
            self.session.set_labels(self.target)
        finally:
            self._choosing = False
        self.session.save_case_requested.emit()

    # ------------------------------------------------------------------ queue and worker
    def _ready(self, check_target: bool = True) -> bool:
        session = self.session
        if self.ctx is None:
            image = session.image_layer
            # the image may well be chosen (prompting ended with a model change): say what is missing
            session.error(f"press 'Start prompting on the image' to prompt on '{image.name}'" if image is not None
                          else "choose an image and press 'Start prompting on the image' before prompting")
            return False
        if session.busy:
            session.warning("a Mamba-HoME job (segmentation, fine-tuning…) is running; prompt when it has finished")
            return False
        if self.ctx.image not in session.viewer.layers:
            session.error("the image being prompted was removed; choose an image and start again")
            self._end_context()
            return False
        chosen = session.image_layer
        if chosen is not None and chosen is not self.ctx.image:
            # the prompt layers still lie on the previous scan's grid: a click on the scan now chosen (and shown)
            # would change the labels of the other one, perhaps hidden under it
            session.error(f"you chose '{chosen.name}' but the prompts go to '{self.ctx.image.name}': press 'Start "
                          f"prompting on the image' to prompt on '{chosen.name}', or choose '{self.ctx.image.name}' "
                          "again to go on with it; nothing was changed")
            return False
        return self._take_target(None) if check_target else True

    def _to_file_voxel(self, layer_index: Any, what: str) -> Optional[np.ndarray]:
        if not self._ready():
            return None
        index = np.round(np.asarray(layer_index, dtype=float)).reshape(-1)
        shape = self.ctx.geometry.shape
        if index.shape != (3,) or not inside(index, shape):
            self.session.warning(f"{what} {tuple(index.tolist())} lies outside the image "
                                 f"'{self.ctx.image.name}' {tuple(shape)}; it was ignored")
            return None
        return layer_index_to_file(self.ctx.geometry.display, shape, index)

    def _take_target(self, layer: Any) -> bool:
        """The labels layer the object is drawn in: kept for the object, else the session's, else a new one."""
        session, image = self.session, self.ctx.image
        viewer = session.viewer
        if layer is None and self.target is not None and self.target in viewer.layers:
            layer = self.target
        if layer is None:
            layer = session.labels_layer
        shape = tuple(self.ctx.geometry.shape)
        if layer is not None and tuple(np.shape(layer.data)) != shape:
            session.error(f"labels layer '{layer.name}' has shape {tuple(np.shape(layer.data))} but image "
                          f"'{image.name}' has shape {shape}; choose the labels of this image (or remove that "
                          "layer to start new labels)")
            return False
        if layer is None:
            layer = self._new_labels(image)
        if layer is not self.target:
            self.target, self.base = layer, None
        if self.base is None:
            self.base = self._copy_labels(layer.data)
        if layer is not self._listened:
            self._stop_listening()
            layer.events.paint.connect(self._target_painted)
            layer.events.data.connect(self._target_replaced)
            watch_history(layer).connect(self._target_history)
            self._listened = layer
        return True

    def _drop_object(self) -> None:
        """The labels the object is drawn in are gone (removed, or replaced whole): let go of them and end the object.
        Its prompts are no longer in effect (an Undo would ask the backend to undo past its reset and fail, and the
        count would still show them)."""
        self.target, self.base = None, None
        self._stop_listening()
        if self.ctx is not None:
            self._clear_history()
            self.clear_prompts()
            self._queue(_Op("reset", OBJECT_ENDED, lambda b: b.reset()), count=False)

    def _target_replaced(self, event: Any = None) -> None:
        """The object's labels were replaced whole (Segment's "Replace edited labels?" answered Yes): the object's
        prompts and the labels it started from describe labels that are gone. It ends, its prompts cleared, as when its
        layer is removed; the next prompt starts a new object on the new labels. Before, the object went on over them:
        Undo prompt wrote the old labels back into the new segmentation, other classes too, past Correct's Undo."""
        target = self.target
        if target is None or self.ctx is None:
            return
        self._drop_object()
        self.session.status.emit(f"'{target.name}' was replaced whole; the object prompted there is ended and its "
                                 "prompts cleared: the next prompt starts a new object on the new labels")

    def _copy_labels(self, data: Any) -> np.ndarray:
        """A copy of the labels ``data`` (a new object's ``base``), written into the previous object's array (or the
        one the warm-up made) when it fits. Copying a 512x512x400 labels layer into new memory took 0.5-0.6 s on
        the GUI thread of a 2-core VM, nearly all of it the kernel mapping the fresh pages at their first write; into
        memory already written once it takes about 20 ms."""
        data = np.asarray(data)
        spare, self._spare_base = self._spare_base, None
        if self.ctx is not None:  # the warm-up's array is for the first object only: not held beside another
            made, self.ctx.spare_base = self.ctx.spare_base, None
            spare = made if spare is None else spare
        if spare is not None and spare.shape == data.shape and spare.dtype == data.dtype:
            np.copyto(spare, data)
            return spare
        return np.array(data, copy=True)

    def _target_painted(self, event: Any) -> None:
        """A brush, fill, erase or Correct-helper edit of the target (napari's ``Labels.events.paint``, one history
        atom per stroke part) joins the labels the object is drawn over, so the next prompt keeps it instead of
        drawing the object over a copy taken before the stroke. Only the painted voxels are touched: comparing whole
        volumes at every prompt took 0.4 s on the GUI thread for a 512x512x300 CT. The event comes before the layer's
        data is written, so the new values are taken from the atom, not from the layer."""
        if self.base is None or getattr(event, "source", self.target) is not self.target:
            return
        removed = None
        for atom in getattr(event, "value", None) or ():
            if removed is not None and self._follow_removal(atom, removed):
                removed = None
                continue
            removed = removal_value(atom)
            self._mirror(atom)
            self._pending[id(atom)] = atom  # only recorded here: the voxels are read at the next prompt

    def _follow_removal(self, atom: Any, value: int) -> bool:
        """The voxel atom of the Correct section's Remove… of class ``value`` below the object's class: the object's
        voxels moved down one value with their class. Taken as a brush edit, the next prompt took them out of the
        object (their value was no longer the object's class), left them in ``base`` and drew on with the number the
        class above had moved into. Here the object's class follows instead, and ``base`` gets the removal of its own
        values, not the object's. False (a brush edit as any other) when the object's class is not above ``value``."""
        if self.class_id <= value:
            return False
        before = read_at(self.base, atom)
        self._mirror(atom)  # keeps ``before`` for napari's undo of the removal (_target_history)
        write_at(self.base, atom, np.where(before == value, 0, np.where(before > value, before - 1, before))
                 .astype(before.dtype, copy=False))
        self._class_before_removal[id(atom)] = (atom, self.class_id)
        self.class_id -= 1  # the class box follows when the Correct section stores the new names
        return True

    def _mirror(self, atom: Any) -> None:
        """Apply one napari history atom to ``base``, keeping what ``base`` held there for napari's undo."""
        before = read_at(self.base, atom)
        size = int(before.nbytes) + sum(int(getattr(part, "nbytes", 0)) for part in atom_parts(atom))
        old = self._base_before.pop(id(atom), None)
        if old is not None:
            self._base_before_bytes -= old[2]
        self._base_before[id(atom)] = (atom, before, size)
        self._base_before_bytes += size
        while self._base_before_bytes > self.MAX_MIRRORED_BYTES and len(self._base_before) > 1:
            self._base_before_bytes -= self._base_before.popitem(last=False)[1][2]
        write_at(self.base, atom, atom_values(atom, undoing=False))

    def _target_history(self, event: Any) -> None:
        """napari's undo or redo of an edit of the target (Ctrl+Z / Ctrl+Shift+Z in the layer, the Correct section's
        Undo), which emits no paint event: the labels under the object follow, so the next prompt starts from what
        the layer shows and does not bring an undone stroke back (or drop a redone one).

        An undone edit mirrored into ``base`` gets back what ``base`` held before it (not napari's old values there,
        which may be the object's own voxels); an edit made before the object began (in ``base``'s copy) gets
        napari's old values."""
        if getattr(event, "source", self.target) is not self.target:
            return
        atoms = list(getattr(event, "value", None) or ())
        self._follow_accepted_edit(atoms, getattr(event, "undoing", True))
        if self.base is None:
            return
        if not getattr(event, "undoing", True):
            removed = None
            for atom in atoms:
                if removed is not None and self._follow_removal(atom, removed):
                    removed = None
                    continue
                removed = removal_value(atom)
                self._mirror(atom)
                self._pending[id(atom)] = atom
            return
        for atom in atoms:  # an undone class removal: the object's class goes back up with its name
            record = self._class_before_removal.pop(id(atom), None)
            if record is not None and record[0] is atom:
                self.class_id = record[1]
        for atom in reversed(atoms):
            if self._pending.get(id(atom)) is atom:  # an undone edit takes nothing out of the object
                del self._pending[id(atom)]
            record = self._base_before.pop(id(atom), None)
            if record is not None:
                self._base_before_bytes -= record[2]
            if record is not None and record[0] is atom:
                write_at(self.base, atom, record[1])
            else:
                write_at(self.base, atom, atom_values(atom, undoing=True))
        # napari put back the values the voxels had before the edit, which may hide the object drawn there since (the
        # object grew over the stroke, or the stroke was made before the object began): the layer must show the object
        # over the labels without the edit, as the next prompt draws it
        target, ctx = self.target, self.ctx
        if ctx is None or target is None or tuple(np.shape(target.data)) != tuple(np.shape(self.base)):
            return
        mask = ctx.geometry.to_display(ctx.state.mask)
        overwrite = self.overwrite_check.isChecked()
        for atom in atoms:
            write_at(target.data, atom, compose(read_at(self.base, atom), read_at(mask, atom), self.class_id, overwrite))
        self._show_pending()
        target.refresh()

    def _show_pending(self) -> None:
        """The layer shows the edits still to be taken out of the object (``_pending``) as painted, not the object
        drawn over them by a prediction that lands before the next prompt: at their voxels it shows ``base``, which
        holds the latest edit there."""
        target = self.target
        if not self._pending or target is None or self.base is None \
                or tuple(np.shape(target.data)) != tuple(np.shape(self.base)):
            return
        for atom in self._pending.values():
            write_at(target.data, atom, read_at(self.base, atom))

    def _take_out_edits(self) -> None:
        """Before a prompt: the voxels that the edits made since the last prompt left with a value other than the
        object's class (erased, or painted with another class) and that the object holds are taken out of it, in
        ONE backend step queued ahead of the prompt (``set_initial_mask`` of the object without them, made in the
        worker from the object as the steps before it leave it), so the prompt's prediction starts from the edited
        object and does not draw them back; the panel's Undo takes the step back. Reads only the edits' bounding
        boxes (see :func:`edits_out_of_object`)."""
        atoms = list(self._pending.values())
        self._pending.clear()
        ctx, base = self.ctx, self.base
        if not atoms or ctx is None or base is None:
            return
        shown = ctx.geometry.to_display(ctx.state.mask)
        # Found on the atoms' bounding boxes with boolean masks, not by np.unique over every edited voxel, which took
        # 0.9 s on the GUI thread for a 1 M-voxel bucket fill in a 512x512x300 CT (tests/test_napari_take_out_edits.py)
        parts, taken = edits_out_of_object(atoms, base, shown, self.class_id)
        if not taken:  # the edits lie outside the object (a stroke beside it stays in base and shows): no step
            return
        state, geometry = ctx.state, ctx.geometry

        def take_out(backend: Any) -> Any:  # worker thread, after the steps queued before it
            mask = state.mask.copy()
            # every edited voxel left with another class, not only those in the object now: a prediction queued before
            # this step may have drawn the object over the edit since (to_display is a view: writes reach ``mask``)
            shown_copy = geometry.to_display(mask)
            for region, edited in parts:
                shown_copy[region][edited] = 0
            return backend.set_initial_mask(mask)

        what = f"brush edit: {taken} voxel{'s' if taken != 1 else ''} taken out of the object"
        self._queue(_Op("initial", what, take_out, edit=True))
        self.session.status.emit(what)

    def _new_labels(self, image: Any) -> Any:
        # the names the class box showed (and the object's class, should the box not have named it)
        table = self._new_labels_table(image).cover(self.class_id)
        names = table.names
        geometry = self.ctx.geometry
        meta = {**geometry.layer_metadata(), "path": (image.metadata.get(META_KEY) or {}).get("path"),
                "volume": reference_volume(geometry, image.data), **owner_metadata(image)}
        dtype = _labels_dtype(names)
        self._choosing = True
        try:
            layer = self.session.add_labels(image, np.zeros(np.shape(image.data), dtype), name=f"{image.name} labels",
                                            metadata={META_KEY: meta}, **layer_grid(image))
            layer.events.paint.connect(mark_edited)
            table.store(layer)  # before the layer is chosen: the panels fill their class boxes from it then
            self.session.set_labels(layer)
            self.session.set_image(image)
        finally:
            self._choosing = False
        # (the points layer as it is: a click given while Start still makes the other prompt layers waits for none)
        if self._points_layer is not None and self._points_layer in self.session.viewer.layers:
            self.session.viewer.layers.selection.active = self._points_layer
        return layer

    def _queue(self, op: _Op, count: bool = True) -> bool:
        if op.kind == "prompt":
            self._take_out_edits()
        ctx = self.ctx
        with ctx.lock:
            ctx.queue.append(op)
        if count:
            self.history.append(op.kind)
            self._marks.append(None)
        if self.worker is None:
            self._start_worker(ctx)
        elif not ctx.ready:  # behind the warm-up Start queued: the model is still loading
            self.session.status.emit(f"loading {ctx.entry.version}…; {op.what} queued")
        else:
            self.session.status.emit(f"{op.what} queued")
        self._show_counts()
        return True

    def _predicting(self) -> bool:
        """Whether a worker runs, or will run, a call of the object (not only the model's warm-up queued by Start:
        Enter or Save then acts at once, as before that warm-up existed)."""
        if self.worker is None:
            return False
        ctx = self.ctx
        if ctx is None or ctx.ready:
            return True
        with ctx.lock:
            return ctx.running not in (None, "warm") or any(op.kind != "warm" for op in ctx.queue)

    def _start_worker(self, ctx: _Context) -> None:
        from .._jobs import stoppable_worker

        # stopped (its context ended) when the dock closes and when Python exits, which waits for the call in flight:
        # a script that closed the viewer while a prediction ran aborted Python ("WorkerBaseSignals has been deleted")
        worker = self.session.track(stoppable_worker(ctx.drain, cancel=ctx))
        worker.returned.connect(lambda results, c=ctx: self._drained(c, results))
        worker.finished.connect(lambda c=ctx, w=worker: self._worker_finished(c, w))
        self.worker = worker
        if ctx.backend is None and any(op.kind != "warm" for op in ctx.queue):  # Start's warm-up alone: keep its line
            self.session.status.emit(f"loading {ctx.entry.version}…")
        worker.start()

    def _drained(self, ctx: _Context, results: List[Tuple[_Op, Any, Optional[BaseException]]]) -> None:
        if not self.session.alive or ctx is not self.ctx:
            return
        region, last_ok = None, None
        for op, outcome, error in results:
            if op.kind == "warm":  # no Update: only whether the model could be loaded
                ctx.ready = True
                if error is not None:
                    # the model loads, then the session takes the image: a refused image (NaN voxels) read as a
                    # model that failed to load ("loading run-step945 failed: ... NaN")
                    said = str(error).replace("<in-memory volume>", f"'{ctx.image.name}'")
                    # prompting ends here: it went on, each click then failing with the same words
                    self._end_context()
                    self.clear_prompts()
                    self._show_counts()
                    self.session.error(f"prompting on '{ctx.image.name}' with {ctx.entry.version} could not start: "
                                       f"{said}; press 'Start prompting on the image' again once that is mended")
                    return
                continue
            if error is not None:
                if op.kind in ("prompt", "initial") and op.kind in self.history:
                    index = self.history.index(op.kind)
                    self.history.pop(index)  # the failed step is not in effect
                    if index < len(self._marks):
                        self._unmark(self._marks.pop(index))
                elif op.kind == "undo":
                    self._clear_history()
                self.session.error(f"{op.what} failed: {error}")
                last_ok = None
                continue
            bbox, latency, note = outcome
            if note:
                self.session.warning(note)
            region = union_bbox(region, bbox)
            if op.kind in ("prompt", "initial"):  # a reset's or undo's instant answer is not a prediction's time
                self.last_latency = latency
            last_ok = op
        hidden = self._write(region) if region is not None else ""
        if last_ok is not None:  # else the status line keeps "loading <model>…" or "queued" long after the answer
            took = f" in {self.last_latency:.2f} s" if last_ok.kind in ("prompt", "initial") else ""
            edits = [op.what for op, _, error in results if error is None and op.edit and op is not last_ok]
            said = [] if last_ok.kind == "reset" and last_ok.what in (NEXT_OBJECT, OBJECT_ENDED) else [
                f"{last_ok.what}: object updated{took}"]  # Enter's own line ("object N accepted…") stays
            if edits or said or hidden:
                self.session.status.emit("; ".join(edits + said + ([hidden] if hidden else [])))
        self._show_counts()

    def _worker_finished(self, ctx: _Context, worker: Any) -> None:
        if worker is not self.worker:
            return
        self.worker = None
        if not self.session.alive:
            return
        if ctx is not self.ctx:
            # an ended context's worker: the context started since (its warm-up, a prompt given meanwhile) waited
            # for this one and runs now
            if self.ctx is not None and self.ctx.queue:
                self._start_worker(self.ctx)
            return
        ctx.ready = True  # its warm-up ran first (a worker that raised reports no result: not "loading" for ever)
        if ctx.queue:
            self._start_worker(ctx)
        elif self._accept_when_idle:
            self._accept_when_idle = False
            self.accept_object()
            if self._save_when_idle:
                self._save_when_idle = False
                self._save_accepted()
            if self._release_when_idle:
                self._release_target(accept=False)

    HIDDEN_SHARE = 0.1
    """Share of an update's object voxels lying under other classes' labels (kept: Overwrite is off) from which the
    status line says so: a few voxels at a neighbour's boundary are normal; more means the object the model found is
    largely not drawn, which looked like a prompt that did nothing (a click on a liver labelled 5, drawn as class 1)."""

    def _write(self, region: Any, whole: bool = False) -> str:
        """Draw the object over the labels it started from, inside ``region`` (file order).

        Returns:
            A note for the status line when much of the object lies under other classes' labels and is not drawn
            (Overwrite off), else ``""``.
        """
        target, ctx = self.target, self.ctx
        if target is None or self.base is None or target not in self.session.viewer.layers:
            return ""
        if tuple(np.shape(target.data)) != tuple(ctx.geometry.shape):
            self.session.error(f"labels layer '{target.name}' changed shape; the object was not written")
            return ""
        if whole:
            region = tuple(slice(0, n) for n in ctx.geometry.file_shape)
        labels = ctx.geometry.to_file(target.data)
        base = ctx.geometry.to_file(self.base)
        overwrite = self.overwrite_check.isChecked()
        obj = ctx.state.mask[region] != 0
        labels[region] = compose(base[region], obj, self.class_id, overwrite)
        redo = getattr(target, "_redo_history", None)
        if redo:  # a new edit, as a brush stroke: napari's redo (an object taken back) would now draw over it
            redo.clear()
        note = ""
        if not overwrite:
            under = base[region]
            hidden = int(np.count_nonzero(obj & (under != 0) & (under != self.class_id)))
            total = int(np.count_nonzero(obj))
            if hidden and hidden >= self.HIDDEN_SHARE * total:
                note = (f"{hidden} of the object's {total} voxels here lie under other classes' labels and are not "
                        "drawn: tick 'Overwrite other classes' labels' to draw over them, or choose their class")
        self._show_pending()
        meta = target.metadata.setdefault(META_KEY, {})
        meta["edited"] = True
        meta.pop(SAVED_KEY, None)  # no longer what was saved
        target.refresh()
        return note

    def _clear_history(self) -> None:
        self.history.clear()
        self._marks.clear()

    def _mark_last(self, kind: str, what: Any) -> None:
        """The step just queued was drawn in a prompt layer as ``what`` (a point, box vertices, a scribble mask)."""
        if self._marks:
            self._marks[-1] = (kind, what)

    def _unmark(self, mark: Optional[Tuple[str, Any]]) -> None:
        """Take a step's drawing out of its prompt layer (the step was undone or failed)."""
        if mark is None:
            return
        kind, what = mark
        self._muted = True
        try:
            if kind == "point" and self._points_layer is not None:
                data = np.asarray(self._points_layer.data)
                hits = np.flatnonzero(np.all(np.isclose(data, what), axis=1)) if len(data) else []
                if len(hits):
                    self._points_layer.selected_data = {int(hits[-1])}
                    self._points_layer.remove_selected()
            elif kind == "box" and self._boxes_layer is not None:
                hits = [i for i, shape in enumerate(self._boxes_layer.data)
                        if np.shape(shape) == np.shape(what) and np.allclose(shape, what)]
                if hits:
                    self._boxes_layer.selected_data = {hits[-1]}
                    self._boxes_layer.remove_selected()
            elif kind == "scribble" and self._scribbles_layer is not None:
                data = np.asarray(self._scribbles_layer.data)
                if data.shape == what.shape:
                    data[what] = 0
                    if self._scribble_seen is not None and self._scribble_seen.shape == what.shape:
                        self._scribble_seen[what] = 0
                    self._scribbles_layer.refresh()
        finally:
            self._muted = False

    def _show_counts(self) -> None:
        prompts = sum(1 for kind in self.history if kind == "prompt")
        latency = f"{self.last_latency:.2f} s" if self.last_latency is not None else "–"
        waiting = sum(1 for op in self.ctx.queue if op.kind != "warm") if self.ctx is not None else 0
        self.count_label.setText(
            f"object {self.objects_accepted + 1}: {prompts} prompt(s), last prediction {latency}"
            + (f", {waiting} queued" if waiting else "")
            + f"; {self.objects_accepted} object(s) accepted")

    @property
    def interactions(self) -> int:
        """Prompts in effect for the current object."""
        return sum(1 for kind in self.history if kind == "prompt")


def _mask_box(mask: np.ndarray) -> Optional[Tuple[slice, ...]]:
    """The bounding box of a 3D mask's true voxels (``None`` when there are none), each axis found inside the box of
    the axes before it: an accepted object is usually small in a large volume, and Accept runs on the GUI thread."""
    box: List[slice] = []
    for axis in range(mask.ndim):
        sub = mask[tuple(box)]
        hit = np.flatnonzero(sub.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if not hit.size:
            return None
        box.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(box)


def _atoms_box(atoms: Any, shape: Tuple[int, ...]) -> Tuple[slice, ...]:
    """The box holding every voxel a paint event's history atoms changed; the whole volume when one of them does not
    say (a napari that records index arrays)."""
    whole = tuple(slice(0, int(n)) for n in shape)
    starts, stops = [int(n) for n in shape], [0] * len(shape)
    for atom in atoms or ():
        key, _ = atom_region(atom)
        if not isinstance(key, tuple) or len(key) != len(shape) or not all(isinstance(k, slice) for k in key):
            return whole
        for axis, (k, n) in enumerate(zip(key, shape)):
            start, stop, step = k.indices(int(n))
            if step != 1:
                return whole
            starts[axis], stops[axis] = min(starts[axis], start), max(stops[axis], stop)
    if any(a >= b for a, b in zip(starts, stops)):
        return whole
    return tuple(slice(a, b) for a, b in zip(starts, stops))


def _clip_box(corner_a: Any, corner_b: Any, shape: Sequence[int]) -> Tuple[Any, Any]:
    """The corners of the part of a box inside a volume of ``shape`` (layer data coordinates), or the corners as given
    when the box misses the volume along an axis (refused then, naming the corner outside) or is not 3D."""
    a, b = (np.asarray(c, dtype=float).reshape(-1) for c in (corner_a, corner_b))
    top = np.asarray(shape, dtype=float) - 1
    if a.shape != (3,) or b.shape != (3,) or top.shape != (3,):
        return corner_a, corner_b
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    if (np.round(hi) < 0).any() or (np.round(lo) > top).any():
        return corner_a, corner_b
    return np.clip(a, 0, top), np.clip(b, 0, top)


def _painted_box(data: Any, atoms: Any, box: Tuple[slice, ...]) -> np.ndarray:
    """A copy of ``data[box]`` with the paint event's atoms applied: napari fires ``paint`` before it writes the
    voxels for a polygon or a bare ``Labels.paint`` (after, for a brush stroke), so the layer alone may not hold the
    stroke yet. ``box`` is :func:`_atoms_box`'s (the whole volume when an atom is not a box of slices)."""
    now = np.array(data[box], copy=True)
    for atom in atoms or ():
        key, mask = atom_region(atom)
        if isinstance(key, tuple) and all(isinstance(k, slice) for k in key) and len(key) == len(box):
            # the atom's slices, relative to the box (_atoms_box made them step 1)
            spans = (k.indices(int(n))[:2] for k, n in zip(key, np.shape(data)))
            key = tuple(slice(start - b.start, stop - b.start) for (start, stop), b in zip(spans, box))
        values = atom_values(atom, undoing=False)
        if mask is None:
            now[key] = values
        else:
            now[key][mask] = values
    return now


def _atom_box(atom: Any, shape: Tuple[int, ...]) -> Optional[Tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]]:
    """``(lo, hi, changed)`` of a history atom: its bounding box and the voxels it changed there (a bool array of the
    box's shape; ``None``: all of them), or ``None`` when it changed nothing."""
    key, mask = atom_region(atom)
    if isinstance(key, tuple) and len(key) == len(shape) and all(isinstance(k, slice) for k in key):
        ranges = [k.indices(int(n)) for k, n in zip(key, shape)]
        if all(step == 1 for _, _, step in ranges):
            lo = np.asarray([a for a, _, _ in ranges], np.int64)
            hi = np.maximum(lo, np.asarray([b for _, b, _ in ranges], np.int64))
            if np.any(hi <= lo):
                return None
            if mask is None:
                return lo, hi, None
            mask = np.asarray(mask, bool)
            if mask.size == int(np.prod(hi - lo)):
                return lo, hi, mask.reshape(tuple(hi - lo))
    voxels = _atom_voxels(atom, shape)  # index arrays (data_setitem), or an unusual slice key
    if not len(voxels):
        return None
    lo, hi = voxels.min(axis=0), voxels.max(axis=0) + 1
    changed = np.zeros(tuple(hi - lo), bool)
    changed[tuple((voxels - lo).T)] = True
    return lo, hi, changed


def _overlapping_groups(boxes: List[Tuple[np.ndarray, np.ndarray, Any]]) -> List[List[int]]:
    """The boxes in groups whose union boxes do not overlap (each box joins every group it touches): a voxel edited
    twice lies in one group only, so no voxel is counted twice, and two strokes far apart are not read over the
    whole volume between them."""
    groups: List[List[int]] = []
    los: List[np.ndarray] = []
    his: List[np.ndarray] = []
    for n, (lo, hi, _) in enumerate(boxes):
        members, glo, ghi = [n], lo.copy(), hi.copy()
        while True:  # a grown group may now overlap groups it did not before
            hit = [g for g in range(len(groups)) if np.all(los[g] < ghi) and np.all(glo < his[g])]
            if not hit:
                break
            for g in reversed(hit):
                members += groups.pop(g)
                glo, ghi = np.minimum(glo, los.pop(g)), np.maximum(ghi, his.pop(g))
        groups.append(members)
        los.append(glo)
        his.append(ghi)
    return groups


def edits_out_of_object(atoms: List[Any], base: np.ndarray, shown: np.ndarray,
                        class_id: int) -> Tuple[List[Tuple[Tuple[slice, ...], np.ndarray]], int]:
    """What the history ``atoms`` (edits since the last prompt) take out of the object being prompted.

    Args:
        atoms: napari history atoms of the target labels layer.
        base: the labels under the object, in layer order (holding the latest edit at each voxel).
        shown: the object's mask in layer order.
        class_id: the object's class.

    Returns:
        ``(parts, taken)``: ``parts`` lists ``(region, edited)``, a box of the layer (slices) and a bool array of its
        shape marking the voxels the atoms changed that ``base`` leaves with another class than ``class_id``; ``taken``
        counts those the object holds (each voxel once). The boxes are disjoint: each is the union box of a group of
        overlapping atoms, so the cost follows the boxes' size, not a sort of every edited voxel (a bucket fill has
        millions), and two strokes far apart are not read over the whole volume between them.
    """
    shape = tuple(int(n) for n in np.shape(base))
    boxes = [box for box in (_atom_box(atom, shape) for atom in atoms) if box is not None]
    parts: List[Tuple[Tuple[slice, ...], np.ndarray]] = []
    taken = 0
    for members in _overlapping_groups(boxes):
        lo = np.min([boxes[m][0] for m in members], axis=0)
        hi = np.max([boxes[m][1] for m in members], axis=0)
        region = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
        edited = np.zeros(tuple(int(n) for n in hi - lo), bool)
        for m in members:
            blo, bhi, changed = boxes[m]
            part = tuple(slice(int(a - b), int(c - b)) for a, c, b in zip(blo, bhi, lo))
            if changed is None:
                edited[part] = True
            else:
                edited[part] |= changed
        edited &= np.asarray(base[region]) != class_id
        if not edited.any():
            continue
        parts.append((region, edited))
        taken += int(np.count_nonzero(edited & (np.asarray(shown[region]) != 0)))
    return parts, taken


def _atom_voxels(atom: Any, shape: Tuple[int, ...]) -> np.ndarray:
    """``(N, 3)`` int64 indices of the voxels a history atom changed (a stroke's few voxels, not its box's)."""
    key, mask = atom_region(atom)
    if isinstance(key, tuple) and len(key) == len(shape) and all(isinstance(k, slice) for k in key):
        ranges = [range(*k.indices(int(n))) for k, n in zip(key, shape)]
        if mask is None:
            local = np.stack(np.meshgrid(*[np.arange(len(r)) for r in ranges], indexing="ij"), -1).reshape(-1, 3)
        else:
            local = np.argwhere(np.asarray(mask, bool))
        return np.asarray([r.start for r in ranges], np.int64) + local * np.asarray([r.step for r in ranges], np.int64)
    try:  # (index arrays, old, new): the voxels themselves
        index = np.broadcast_arrays(*[np.asarray(k) for k in key])
        return np.stack([np.asarray(k, np.int64).ravel() for k in index], axis=1).reshape(-1, len(shape))
    except (TypeError, ValueError):
        return np.empty((0, len(shape)), np.int64)  # an atom of another form: not taken out of the object


STAGE_GAP_MS = 20
"""Pause between adding two prompt layers (see InteractivePanel._make_prompt_layers): the added layer's first draw,
posted by napari, comes before the next one is made, in its own turn of the event loop."""


class _Staging:
    """Prompt layers a first Start is making (see ``InteractivePanel._make_prompt_layers``)."""

    def __init__(self, image: Any, ctx: Optional[_Context], shape: Tuple[int, ...], grid: Dict[str, Any]) -> None:
        self.image, self.ctx, self.shape, self.grid = image, ctx, shape, grid
        # kind -> layer object made, not yet in the viewer; popped last first: points, then boxes, then scribbles
        self.made: Optional[Dict[str, Any]] = None
        self.hidden: Any = None  # the layer added last, not yet shown
        self.worker: Any = None


@contextlib.contextmanager
def _collections_paused() -> Any:
    """Python's cyclic collector skips every object made before the block while it runs (``gc.freeze``), and gets them
    back after it (``gc.unfreeze``: both are list splices, no traversal). A ``gc.collect()`` inside the block (napari
    runs one at each layer removal) then walks only what the block made, not napari's and torch's whole heap; what
    becomes garbage in the block is collected by the next full collection, at its usual time.

    Not on Windows: napari's collection there is its fix for an OpenGL access violation (NVIDIA drivers) when a
    removed layer's GPU resources are freed late, so it must see the removed layer's objects."""
    if sys.platform == "win32":
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _first_layer_costs() -> None:
    """What the first prompt layers of a session pay once, paid ahead in a thread when the panel is made: importing
    pandas (napari's first feature table, 0.3-0.7 s) and vispy's dash patterns for a labels layer's polygon tool (its
    "agg" lines compute them at the first such line of the process, then cache them: 0.1-0.16 s)."""
    try:
        import pandas  # noqa: F401
        from vispy.visuals.line.dash_atlas import DashAtlas

        DashAtlas()
    except Exception:  # noqa: BLE001 - only a head start; napari and vispy do it themselves otherwise
        pass


def _new_prompt_layers(shape: Tuple[int, ...], grid: Dict[str, Any],
                       kinds: Sequence[str] = ("scribbles", "boxes", "points")) -> Dict[str, Any]:
    """Prompt layer objects of ``kinds`` on the image grid ``grid`` (scale, translate), hidden, not in any viewer:
    napari's layer models only, no Qt, so the scribbles and boxes are made in a worker. Their colours are given here:
    set afterwards they cost a second colour set-up and refresh. The scribbles' zeros are ``np.zeros`` (pages mapped
    only where painted): no full-volume write anywhere."""
    from napari.layers import Labels, Points, Shapes

    _first_layer_costs()
    # made hidden: each is shown a turn after it is added (see InteractivePanel._add_next_prompt_layer)
    grid = {**grid, "metadata": {PROMPT_LAYER_KEY: True}, "visible": False}
    make = {  # added in reverse order (popitem): boxes, then scribbles under them
        "scribbles": lambda: Labels(np.zeros(shape, np.uint8), name=SCRIBBLES_NAME, opacity=0.8,
                                    colormap=_scribble_colormap(), **grid),
        "boxes": lambda: Shapes(name=BOXES_NAME, ndim=3, edge_color=POSITIVE_COLOUR, face_color="transparent",
                                edge_width=1, **grid),
        "points": lambda: Points(np.empty((0, 3)), name=POINTS_NAME, ndim=3, size=4, face_color=POSITIVE_COLOUR,
                                 **grid),
    }
    return {kind: make[kind]() for kind in kinds}


def _scribble_colormap() -> Any:
    from napari.utils.colormaps import DirectLabelColormap

    return DirectLabelColormap(color_dict={None: "transparent", 0: "transparent", 1: POSITIVE_COLOUR,
                                           2: NEGATIVE_COLOUR})
