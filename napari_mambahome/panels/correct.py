"""Correct panel: the labels layer, its class table (add, rename, recolour, remove), helpers, undo, legend."""
from __future__ import annotations

import weakref
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np
from qtpy.QtWidgets import (
    QColorDialog, QComboBox, QFormLayout, QHBoxLayout, QInputDialog, QLabel, QMessageBox, QPushButton, QSpinBox,
    QWidget,
)

from .. import _correct
from .._classes import ClassTable, ClassTableError, mark_removal, removal_edit, stored_table
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
        self.remove_class_button = QPushButton("Remove…")
        self.remove_class_button.setToolTip("remove the chosen class: its voxels become background and the classes "
                                            "above it move down one value (Undo puts it back)")
        self.remove_class_button.clicked.connect(lambda *_: self._ask_remove())
        # layer -> {id(marker atom): (marker, value, table before, after)} of its class removals (see remove_class)
        self._removals: "weakref.WeakKeyDictionary[Any, Dict[int, Tuple[Any, int, ClassTable, ClassTable]]]" = \
            weakref.WeakKeyDictionary()
        self.island_spin = QSpinBox()
        self.island_spin.setRange(1, 10_000_000)
        self.island_spin.setValue(100)
        self.island_spin.setSuffix(" voxels")
        self.legend = Legend()
        form.addRow(hint)
        form.addRow("Labels", self.labels_combo)
        form.addRow("Class", self.class_combo)
        class_row = QHBoxLayout()
        for button in (self.add_class_button, self.rename_class_button, self.recolour_class_button,
                       self.remove_class_button):
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
        else:  # blank: the first layer listed is not what Correct works on (all its buttons are off)
            self.labels_combo.setCurrentIndex(-1)
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
        elif self.labels_combo.currentIndex() != -1:
            # another scan was chosen and has no labels: the box kept showing the previous scan's layer name
            self.labels_combo.blockSignals(True)
            self.labels_combo.setCurrentIndex(-1)
            self.labels_combo.blockSignals(False)
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
        self._show_enabled()

    def _show_enabled(self) -> None:
        """Grey out what cannot work: with no labels layer chosen every button only answered with an error (the
        annotator had opened a scan and not yet segmented it); a class is needed to rename, recolour, remove or
        correct; a correction running in a worker holds the helpers and Remove until it is done."""
        layer = self.session.labels_layer
        has_class = layer is not None and self.class_combo.count() > 0
        running = self.helper_job is not None and self.helper_job.running
        self.add_class_button.setEnabled(layer is not None)
        self.undo_button.setEnabled(layer is not None)
        for button in (self.rename_class_button, self.recolour_class_button):
            button.setEnabled(has_class)
        for button in (*self.helper_buttons.values(), self.remove_class_button):
            button.setEnabled(has_class and not running)

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
        # said, as a rename is: the status line kept whatever it said last (a refusal of the name before)
        self.session.status.emit(f"'{layer.name}': class {value} '{table.names[value]}' added and chosen for painting")
        return value

    def rename_class(self, value: int, name: str) -> bool:
        """Rename label value ``value`` of the chosen labels layer; the status line says what was renamed to what, or
        why it was not (before, a rename said nothing and the status line kept whatever it said last, so the annotator
        could not tell the rename had been done)."""
        layer = self.session.labels_layer
        if layer is None:
            self.session.error("choose a labels layer before renaming a class")
            return False
        names = self.session.class_table(layer).names
        old = names[value] if 0 < value < len(names) else None
        new = str(name).strip()
        if old is not None and new == old:
            self.session.status.emit(f"'{layer.name}': class {value} is already named '{old}'; nothing changed")
            return True
        if not self._edit_class_table(lambda table: table.rename(value, name),
                                      refused=f"class {value}" + (f" '{old}'" if old is not None else "")
                                      + f" was not renamed to '{new}'"):
            return False
        self.session.status.emit(f"'{layer.name}': class {value} renamed '{old}' \u2192 '{new}'")
        return True

    def recolour_class(self, value: int, colour: str) -> bool:
        """Draw label value ``value`` of the chosen labels layer in ``colour`` (``#rrggbb``)."""
        return self._edit_class_table(lambda table: table.recolour(value, colour))

    def _edit_class_table(self, edit: Callable[[Any], Any], refused: str = "") -> bool:
        """Apply ``edit`` to the chosen labels layer's class table; a refused edit is reported (``refused``: what was
        not done, said before why), nothing changes."""
        layer = self.session.labels_layer
        if layer is None:
            return False
        table = self.session.class_table(layer)
        try:
            edit(table)
        except ClassTableError as exc:
            self.session.error(f"'{layer.name}': " + (f"{refused}: {exc}" if refused else str(exc)))
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

    # ------------------------------------------------------------------ removing a class
    def _ask_remove(self) -> None:
        value = self.selected_class
        if value is None:
            self.session.error("choose a labels layer and the class to remove in the Correct section first")
            return
        self.remove_class(value)

    def remove_class(self, value: int) -> Optional[int]:
        """Remove class ``value`` from the chosen labels layer as one undoable edit (Ctrl+Z restores the voxels and
        the names): its voxels become background (asked first when it has any), the classes above it move down one
        value, so the values stay contiguous with the names a saved case and a fine-tune read.

        Returns:
            The number of the class's voxels cleared (0: an unused class) when the volume is small enough to do at
            once (``INLINE_VOXELS``); ``None`` when it runs in a worker (``helper_job``), or was refused or declined
            (the status line says why).
        """
        layer = self.session.labels_layer
        if layer is None:
            self.session.error("choose a labels layer before removing a class")
            return None
        before = self.session.class_table(layer)
        after = ClassTable(list(before.names), dict(before.colours), before.source)
        try:
            after.remove(int(value))
        except ClassTableError as exc:
            self.session.error(f"'{layer.name}': {exc}")
            return None
        if self.helper_job is not None and self.helper_job.running:
            self.session.warning("a correction is still running; wait for it to finish")
            return None
        if int(np.prod(np.shape(layer.data))) <= self.INLINE_VOXELS:
            return self._finish_removal(layer, int(value), before, after, removal_edit(np.asarray(layer.data), value))
        name = f"Remove class '{before.names[value]}'"

        def apply(edit: Any) -> None:
            # a class added, renamed or removed meanwhile would shift other names than the voxels the worker moved
            if self.session.class_table(layer).names != before.names:
                self.session.warning(f"the classes of '{layer.name}' changed while '{name}' ran; nothing was "
                                     "changed: remove it again")
                return
            self._finish_removal(layer, int(value), before, after, edit)

        self._run_in_worker(name, layer, lambda data: removal_edit(data, value), apply,
                            f"{name} of '{layer.name}'…")
        return None

    def _finish_removal(self, layer: Any, value: int, before: ClassTable, after: ClassTable,
                        edit: Tuple[Any, np.ndarray, int]) -> Optional[int]:
        """Ask about the painted voxels, then write the removal as one history item (GUI thread)."""
        changed, values, painted = edit
        cname = before.names[value]
        if painted and not self._confirm_removal(layer, value, cname, painted):
            self.session.status.emit(f"class {value} '{cname}' was not removed")
            return None
        # napari's history keeps voxels only; an empty marker atom opens the item even when no voxel changes (an
        # unused last class), and undo / redo of the item that holds it brings the names back (_class_history)
        marker = (tuple(np.zeros(0, np.intp) for _ in range(np.ndim(layer.data))),
                  np.zeros(0, np.asarray(layer.data).dtype), np.zeros(0, np.asarray(layer.data).dtype))
        self._watch_removals(layer)[id(marker)] = (marker, value, before, after)
        mark_removal(marker, value)
        selected = int(layer.selected_label)
        with layer.block_history():
            layer._save_history(marker)  # napari has no public way to add a history atom
            if changed[0].size:
                layer.data_setitem(changed, values)
        if selected >= value:
            layer.selected_label = max(selected - 1, 1)
        self.session.set_class_table(layer, after)
        self.session.status.emit(f"class {value} '{cname}' removed" + (f", {painted} voxels cleared" if painted else "")
                                 + ("; classes above it moved down one value" if value < len(before.names) - 1 else "")
                                 + " (Undo puts it back)")
        return painted

    def _confirm_removal(self, layer: Any, value: int, cname: str, painted: int) -> bool:
        answer = QMessageBox.question(
            self, "Remove class?",
            f"Class {value} '{cname}' has {painted:,} painted voxels in '{layer.name}'. Remove the class and clear "
            "them to background? (Undo puts them back)",
            QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No, QMessageBox.StandardButton.No)
        return answer == QMessageBox.StandardButton.Yes

    def _watch_removals(self, layer: Any) -> Dict[int, Tuple[Any, int, ClassTable, ClassTable]]:
        records = self._removals.get(layer)
        if records is None:
            from .._history import watch_history

            records = self._removals[layer] = {}
            panel = weakref.ref(self)

            def history(event: Any) -> None:
                me = panel()
                if me is not None and me.session.alive:
                    me._class_history(layer, event)

            watch_history(layer).connect(history)
        return records

    def _class_history(self, layer: Any, event: Any) -> None:
        """Undo / redo of a removal (see :meth:`_finish_removal`): the names follow the voxels napari just replayed.

        The removed class is put back into (or taken again out of) the table as it is now, so a rename or colour
        chosen since the removal stays; only when that cannot be (its name taken since, another class at its value)
        does the whole table of the time come back.
        """
        records = self._removals.get(layer) or {}
        undoing = getattr(event, "undoing", True)
        for atom in getattr(event, "value", None) or ():
            record = records.get(id(atom))
            if record is None or record[0] is not atom:
                continue
            _, value, before, after = record
            table = stored_table(layer) or ClassTable(list(after.names if undoing else before.names))
            try:
                if undoing:
                    table.insert(value, before.names[value], before.colours.get(value))
                elif value < len(table.names) and table.names[value] == before.names[value]:
                    table.remove(value)
                else:
                    raise ClassTableError("the class at its value changed")
            except ClassTableError:
                table = before if undoing else after
            self.session.set_class_table(layer, table)

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
        self._run_in_worker(name, layer, lambda data: _correct.edit_for(data, helper(data, class_id, *args)),
                            lambda edit: self._report(name, class_id, _correct.apply_edit(layer, *edit)),
                            f"{name} on class {class_id} of '{layer.name}'…")
        return None

    def _report(self, name: str, class_id: int, changed: int) -> None:
        self.session.status.emit(f"{name} on class {class_id}: {changed} voxels changed"
                                 + (" (Undo reverts)" if changed else ""))

    def _run_in_worker(self, name: str, layer: Any, compute: Callable[[np.ndarray], Any],
                       apply: Callable[[Any], None], starting: str) -> None:
        """``compute(copy of the layer's data)`` in a worker thread; ``apply`` its edit to ``layer`` (one undo entry)
        when done, unless the layer was edited, undone, replaced or removed meanwhile (then nothing changes and the
        status line says so)."""
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
            return compute(data)

        def done(edit: Any) -> None:
            if not self.session.alive:
                return
            if edited or layer not in self.session.viewer.layers:
                self.session.warning(f"'{layer.name}' changed while '{name}' ran; nothing was changed: run it again")
                return
            apply(edit)

        def failed(exc: BaseException) -> None:
            if self.session.alive:
                self.session.error(f"{name} failed: {type(exc).__name__}: {exc}")

        def finished() -> None:
            for emitter in emitters:
                emitter.disconnect(touched)
            if self.session.alive:
                self._show_helper_busy(False)

        self.helper_job = Job(run, on_done=done, on_error=failed, on_finished=finished, parent=self, engine=False)
        self._show_helper_busy(True)
        self.session.status.emit(starting)
        self.helper_job.start()

    def _show_helper_busy(self, busy: bool) -> None:
        for button in (*self.helper_buttons.values(), self.remove_class_button):
            button.setEnabled(not busy)
        if not busy:
            self._show_enabled()

    def undo(self) -> None:
        """Undo the last edit of the chosen labels layer (helpers and brush strokes alike)."""
        layer = self.session.labels_layer
        if layer is not None:
            if not len(getattr(layer, "_undo_history", ()) or ()) and hasattr(layer, "_undo_history"):
                # said "undid the last edit" with nothing left to undo
                self.session.status.emit(f"nothing to undo in '{layer.name}'")
                return
            layer.undo()
            # the line above still read "... N voxels changed (Undo reverts)", as if the press had done nothing
            self.session.status.emit(f"undid the last edit of '{layer.name}'")
