"""Correct panel: the labels layer, its class table (add, rename, recolour), correction helpers, undo, legend."""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import numpy as np
from qtpy.QtWidgets import (
    QColorDialog, QComboBox, QFormLayout, QHBoxLayout, QInputDialog, QLabel, QPushButton, QSpinBox, QWidget,
)

from .. import _correct
from .._classes import ClassTableError
from ._parts import Legend
from .._session import RESTORE_ACTION, Session
from ._base import Panel


class CorrectPanel(Panel):
    """Choose the labels layer and class; run the helpers of :mod:`.._correct` on it, undoably.

    The class box and the legend show the chosen labels layer's class table (:mod:`.._classes`).
    """

    name = "correct"
    title = "Correct"

    def __init__(self, session: Session, parent: Optional[QWidget] = None) -> None:
        super().__init__(session, parent)
        form = QFormLayout(self)
        hint = QLabel("Paint, fill and erase with napari's label tools; the helpers act on the chosen class.")
        hint.setWordWrap(True)
        self.labels_combo = QComboBox()
        self.labels_combo.currentTextChanged.connect(self._combo_changed)
        self.class_combo = QComboBox()
        self.class_combo.currentIndexChanged.connect(self._class_choice_changed)
        self.add_class_button = QPushButton("Add class…")
        self.add_class_button.clicked.connect(self._ask_new_class)
        self.rename_class_button = QPushButton("Rename…")
        self.rename_class_button.clicked.connect(self._ask_rename)
        self.recolour_class_button = QPushButton("Colour…")
        self.recolour_class_button.clicked.connect(self._ask_colour)
        self.island_spin = QSpinBox()
        self.island_spin.setRange(1, 10_000_000)
        self.island_spin.setValue(100)
        self.island_spin.setSuffix(" voxels")
        self.legend = Legend()
        form.addRow(hint)
        form.addRow("Labels", self.labels_combo)
        form.addRow("Class", self.class_combo)
        class_row = QHBoxLayout()
        for button in (self.add_class_button, self.rename_class_button, self.recolour_class_button):
            class_row.addWidget(button)
        form.addRow(class_row)
        form.addRow(self.legend)
        self.helper_job: Any = None  # the correction running in a worker (big volumes, see run_helper)
        self.helper_buttons: Dict[str, QPushButton] = {}
        for name in _correct.HELPERS:
            button = QPushButton(name)
            button.clicked.connect(lambda _=False, n=name: self.run_helper(n))
            self.helper_buttons[name] = button
        row1 = QHBoxLayout()
        row1.addWidget(self.helper_buttons["Keep largest component"])
        row1.addWidget(self.helper_buttons["Fill holes"])
        form.addRow(row1)
        row2 = QHBoxLayout()
        row2.addWidget(self.helper_buttons["Remove small islands"])
        row2.addWidget(QLabel("under"))
        row2.addWidget(self.island_spin)
        form.addRow(row2)
        row3 = QHBoxLayout()
        row3.addWidget(self.helper_buttons["Clear class"])
        self.undo_button = QPushButton("Undo")
        self.undo_button.clicked.connect(self.undo)
        row3.addWidget(self.undo_button)
        form.addRow(row3)
        # shown only while a removed labels layer's mask is kept (see Session._keep_removed)
        self.restore_button = QPushButton(RESTORE_ACTION)
        self.restore_button.clicked.connect(lambda *_: self.restore_removed())
        form.addRow(self.restore_button)
        session.layers_changed.connect(self._fill)
        session.removed_labels_changed.connect(self._show_restore)
        session.image_changed.connect(lambda *_: self._show_restore())
        session.labels_changed.connect(self._show_labels)
        session.classes_changed.connect(self._classes_changed)
        session.model_changed.connect(lambda *_: self._show_classes())
        self._fill()
        self._show_restore()

    # ------------------------------------------------------------------ removed labels
    def _show_restore(self) -> None:
        record = self.session.removed_labels_for(self.session.image_layer)
        self.restore_button.setVisible(record is not None)
        if record is not None:
            self.restore_button.setText(f"{RESTORE_ACTION} '{record.name}'")
            scan = f" of '{record.scan}'" if record.scan else ""
            self.restore_button.setToolTip(f"put back the labels layer '{record.name}'{scan} that was removed, with "
                                           "its edits, on its scan's grid")

    def restore_removed(self) -> Any:
        """Put back the removed mask of the chosen image (else the newest kept one) and choose it."""
        return self.session.restore_removed_labels()

    # ------------------------------------------------------------------ layer and classes
    def _fill(self) -> None:
        self.labels_combo.blockSignals(True)
        self.labels_combo.clear()
        self.labels_combo.addItems([layer.name for layer in self.session.layers("labels")])
        if self.session.labels_layer is not None:
            self.labels_combo.setCurrentText(self.session.labels_layer.name)
        self.labels_combo.blockSignals(False)
        self._show_classes()

    def _combo_changed(self, name: str) -> None:
        layer = self.session.layer_named(name, "labels")
        if layer is not None:
            self.session.set_labels(layer)

    def _show_labels(self, layer: Any) -> None:
        if layer is not None:
            if self.labels_combo.currentText() != layer.name:
                self.labels_combo.blockSignals(True)
                self.labels_combo.setCurrentText(layer.name)
                self.labels_combo.blockSignals(False)
            layer.events.selected_label.connect(self._layer_label_selected)
        self._show_classes()

    def _classes_changed(self, layer: Any) -> None:
        if layer is self.session.labels_layer:
            self._show_classes()

    def _show_classes(self) -> None:
        layer = self.session.labels_layer
        self.class_combo.blockSignals(True)
        self.class_combo.clear()
        if layer is None:
            self.legend.clear_legend()
        else:
            table = self.session.class_table(layer)
            for value, cname in enumerate(table.names):
                if value > 0:
                    self.class_combo.addItem(f"{value}: {cname}", value)
            index = self.class_combo.findData(int(layer.selected_label))
            self.class_combo.setCurrentIndex(max(index, 0))
            self.legend.show_layer(layer, table.names)
        self.class_combo.blockSignals(False)

    def _layer_label_selected(self, event: Any) -> None:
        if not self.session.alive or event.source is not self.session.labels_layer:
            return
        index = self.class_combo.findData(int(event.source.selected_label))
        if index >= 0:
            self.class_combo.blockSignals(True)
            self.class_combo.setCurrentIndex(index)
            self.class_combo.blockSignals(False)

    def _class_choice_changed(self, index: int) -> None:
        layer = self.session.labels_layer
        value = self.class_combo.itemData(index)
        if layer is not None and value is not None:
            layer.selected_label = int(value)

    @property
    def selected_class(self) -> Optional[int]:
        value = self.class_combo.currentData()
        return int(value) if value is not None else None

    def add_class(self, name: str) -> Optional[int]:
        """Add a class to the chosen labels layer's table and select it for painting.

        Returns:
            Its label value, or ``None`` when refused (no layer, empty or duplicate name).
        """
        layer = self.session.labels_layer
        if layer is None:
            self.session.error("choose a labels layer before adding a class")
            return None
        table = self.session.class_table(layer)
        try:
            value = table.add(name)
        except ClassTableError as exc:
            self.session.error(f"'{layer.name}': {exc}")
            return None
        self.session.set_class_table(layer, table)
        layer.selected_label = value
        return value

    def rename_class(self, value: int, name: str) -> bool:
        """Rename label value ``value`` of the chosen labels layer."""
        return self._edit_class_table(lambda table: table.rename(value, name))

    def recolour_class(self, value: int, colour: str) -> bool:
        """Draw label value ``value`` of the chosen labels layer in ``colour`` (``#rrggbb``)."""
        return self._edit_class_table(lambda table: table.recolour(value, colour))

    def _edit_class_table(self, edit: Callable[[Any], Any]) -> bool:
        """Apply ``edit`` to the chosen labels layer's class table; a refused edit is reported, nothing changes."""
        layer = self.session.labels_layer
        if layer is None:
            return False
        table = self.session.class_table(layer)
        try:
            edit(table)
        except ClassTableError as exc:
            self.session.error(f"'{layer.name}': {exc}")
            return False
        self.session.set_class_table(layer, table)
        return True

    def _ask_new_class(self) -> None:
        name, ok = QInputDialog.getText(self, "Add class", "Name of the new class:")
        if ok:
            self.add_class(name)

    def _ask_rename(self) -> None:
        value = self.selected_class
        if value is None:
            return
        name, ok = QInputDialog.getText(self, "Rename class", f"New name of class {value}:")
        if ok:
            self.rename_class(value, name)

    def _ask_colour(self) -> None:
        value, layer = self.selected_class, self.session.labels_layer
        if value is None or layer is None:
            return
        from qtpy.QtGui import QColor

        start = QColor.fromRgbF(*[float(c) for c in np.asarray(layer.get_color(value))[:4]])
        colour = QColorDialog.getColor(start, self, f"Colour of class {value}")
        if colour.isValid():
            self.recolour_class(value, colour.name())

    # ------------------------------------------------------------------ helpers
    INLINE_VOXELS = 1 << 20
    """Volumes up to this many voxels are corrected at once on the GUI thread (scipy takes ~25 ns a voxel: a 3 mm CT
    of 122x101x30 in ~10 ms); a bigger one (a 512x512x200 CT takes 1.2-2 s) in a worker thread, the layer written
    when it is done, so the viewer never freezes."""

    def run_helper(self, name: str) -> Optional[int]:
        """Apply a correction helper (see :data:`.._correct.HELPERS`) to the selected class, undoably.

        Returns:
            The number of voxels changed when the volume is small enough to correct at once (``INLINE_VOXELS``);
            ``None`` when it is corrected in a worker (``helper_job``; the layer and status line are updated when it
            is done) or refused (the status line says why).
        """
        layer = self.session.labels_layer
        class_id = self.selected_class
        if layer is None or class_id is None:
            self.session.error("choose a labels layer and a class in the Correct section first")
            return 0
        if np.ndim(layer.data) != 3:
            self.session.error(f"labels layer '{layer.name}' is not 3D {np.shape(layer.data)}")
            return 0
        if self.helper_job is not None and self.helper_job.running:
            self.session.warning("a correction is still running; wait for it to finish")
            return None
        helper = _correct.HELPERS[name]
        args = (self.island_spin.value(),) if name == "Remove small islands" else ()
        if int(np.prod(np.shape(layer.data))) <= self.INLINE_VOXELS:
            data = np.asarray(layer.data)
            changed = _correct.apply_edit(layer, *_correct.edit_for(data, helper(data, class_id, *args)))
            self._report(name, class_id, changed)
            return changed
        self._run_in_worker(name, layer, class_id, helper, args)
        return None

    def _report(self, name: str, class_id: int, changed: int) -> None:
        self.session.status.emit(f"{name} on class {class_id}: {changed} voxels changed"
                                 + (" (Undo reverts)" if changed else ""))

    def _run_in_worker(self, name: str, layer: Any, class_id: int, helper: Callable[..., np.ndarray],
                       args: tuple) -> None:
        """Compute the edit in a worker thread; write it into ``layer`` (one undo entry) when done, unless the layer
        was edited, undone, replaced or removed meanwhile (then nothing changes and the status line says so)."""
        from .._history import HISTORY_EVENT, watch_history
        from .._jobs import Job

        data = np.array(layer.data, copy=True)  # the worker's own copy: edits made meanwhile cannot tear it
        edited = []

        def touched(*_: Any) -> None:
            edited.append(True)

        watch_history(layer)
        emitters = [layer.events.paint, layer.events.data, getattr(layer.events, HISTORY_EVENT)]
        for emitter in emitters:
            emitter.connect(touched)

        def run(progress: Any, cancel: Any) -> Any:
            return _correct.edit_for(data, helper(data, class_id, *args))

        def done(edit: Any) -> None:
            if not self.session.alive:
                return
            if edited or layer not in self.session.viewer.layers:
                self.session.warning(f"'{layer.name}' changed while '{name}' ran; nothing was changed: run it again")
                return
            self._report(name, class_id, _correct.apply_edit(layer, *edit))

        def failed(exc: BaseException) -> None:
            if self.session.alive:
                self.session.error(f"{name} failed: {type(exc).__name__}: {exc}")

        def finished() -> None:
            for emitter in emitters:
                emitter.disconnect(touched)
            if self.session.alive:
                self._show_helper_busy(False)

        self.helper_job = Job(run, on_done=done, on_error=failed, on_finished=finished, parent=self)
        self._show_helper_busy(True)
        self.session.status.emit(f"{name} on class {class_id} of '{layer.name}'…")
        self.helper_job.start()

    def _show_helper_busy(self, busy: bool) -> None:
        for button in self.helper_buttons.values():
            button.setEnabled(not busy)

    def undo(self) -> None:
        """Undo the last edit of the chosen labels layer (helpers and brush strokes alike)."""
        layer = self.session.labels_layer
        if layer is not None:
            layer.undo()
