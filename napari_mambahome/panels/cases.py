"""Cases panel: save the chosen image and labels as a training case; list and remove cases; the folder."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import (
    QFormLayout, QHBoxLayout, QLabel, QListWidget, QListWidgetItem, QMessageBox, QPushButton, QWidget,
)

from engine.class_names import brief_names
from engine.cases import InteractiveOrigin, LabelSetConflictError
from engine.io import WriteError
from engine.progress import check

from .. import _settings
from .._classes import ClassTable
from .._geometry import META_KEY, LayerGeometryError, image_volume, layer_geometry
from .._history import watch_history
from .._jobs import Kept
from .._session import Session, _notify as notify, labels_owner, mark_saved
from ..prompting import INTERACTIVE_KEY
from ._base import Panel


def interactive_record(layer_meta: Dict[str, Any], num_classes: int) -> Optional[Dict[str, Any]]:
    """The labels layer's record of its prompted objects, limited to the classes the case has.

    Args:
        layer_meta: the labels layer's ``metadata["mambahome"]``.
        num_classes: classes of the case's class table (background included).

    Returns:
        The ``interactive`` record to save with the case, or ``None`` when no object was prompted.
    """
    record = layer_meta.get(INTERACTIVE_KEY)
    if not isinstance(record, dict):
        return None
    ids = [int(c) for c in record.get("class_ids", []) if 0 < int(c) < num_classes]
    return {**record, "class_ids": ids} if ids else None


def unnamed_classes(names: Any, painted: Any) -> str:
    """A warning's words when a case holds classes with only a placeholder name (``""``: none).

    Painting with a value past the class table (napari's label spinner one too high, say 7 with three classes)
    makes the table name every value up to it ``label N``; the case is saved with those names, fine-tuning then
    adds each as a new, mostly empty output, and a later case where the class was named clashes with this one.
    Saving said nothing of it, so the annotator learnt it only from the fine-tune question.
    """
    placeholder = [v for v, name in enumerate(names) if v > 0 and str(name) == f"label {v}"]
    if not placeholder:
        return ""
    drawn = [f"label {v}" for v in placeholder if v in set(painted)]
    empty = [f"label {v}" for v in placeholder if v not in set(painted)]
    words = (f"painted with {', '.join(drawn)}, which has no class name" if drawn else "")
    if empty:
        words += ("; " if words else "") + f"{', '.join(empty)} (not painted) came with it"
    return (f"{words}: fine-tuning on this case adds them to the model as new classes. Name the class in the "
            "Correct section (or repaint with a class of the model) and save the case again")


SAVE_BUSY_TIP = ("Saving waits while another Mamba-HoME job runs (a fine-tune, a segmentation, a save): one job at a "
                 "time. It comes back when that job ends or is cancelled.")


class _EditWatch:
    """Whether ``labels`` was edited since this was made: a paint stroke or helper, napari's undo / redo, or its data
    replaced (call it; ``stop()`` disconnects)."""

    def __init__(self, labels: Any) -> None:
        self.edited = False
        self.emitters = [labels.events.paint, labels.events.data, watch_history(labels)]
        for emitter in self.emitters:
            emitter.connect(self._edit)

    def _edit(self, event: Any = None) -> None:
        self.edited = True

    def __call__(self) -> bool:
        return self.edited

    def stop(self) -> None:
        for emitter in self.emitters:
            emitter.disconnect(self._edit)


class CaseSaveError(RuntimeError):
    """Writing a case failed; the message names the folder or file and what to do (shown as it is)."""

    plain_message = True


class ClassNamesClash(CaseSaveError):
    """A case refused only for its class names: every label value painted in it has a class in the case folder, so it
    can be saved under the folder's classes (value ``v`` keeping its voxels and taking the folder's name ``v``).

    Attributes:
        folder_names: the folder's label set (background first): the longest class list of its cases.
        names: the refused case's class names.
    """

    def __init__(self, message: str, folder_names: Sequence[str], names: Sequence[str]) -> None:
        super().__init__(message)
        self.folder_names, self.names = list(folder_names), list(names)


def folder_label_set(records: Sequence[Any], replaced: Optional[str] = None) -> List[str]:
    """The class names of a case folder (background first): the longest class list of its cases (the others are its
    beginning, as the store keeps them), without the case ``replaced``; ``[]`` when it holds none."""
    lists = [list(r.class_names) for r in records if r.case_id != replaced]
    return max(lists, key=len) if lists else []


def renaming_words(names: Sequence[str], folder_names: Sequence[str]) -> str:
    """What taking the folder's classes does to a class table, in words: ``organ -> anterior, vessel -> posterior;
    gland (no voxels) is dropped``."""
    renamed = [f"{old} \u2192 {new}" for old, new in zip(names[1:], folder_names[1:]) if old != new]
    dropped = list(names[len(folder_names):])
    added = list(folder_names[len(names):])
    parts = [", ".join(renamed)] if renamed else []
    if dropped:
        parts.append(f"{', '.join(dropped)} (no voxels) {'is' if len(dropped) == 1 else 'are'} dropped")
    if added:
        parts.append(f"{', '.join(added)} {'is' if len(added) == 1 else 'are'} added (no voxels)")
    return "; ".join(parts)


FOLDER_CLASSES_ACTION = "Save with the case folder's classes"
"""The button of the refusal question that saves a case under the folder's class names (followed by them)."""


class CasesPanel(Panel):
    """The case folder, "Save as training case", the saved cases (with their modality) and Remove."""

    name = "cases"
    title = "Cases"

    def __init__(self, session: Session, parent: Optional[QWidget] = None) -> None:
        super().__init__(session, parent)
        form = QFormLayout(self)
        self.cases_dir_label = QLabel("")
        self.cases_dir_label.setWordWrap(True)
        self.change_cases_dir_button = QPushButton("Folder…")
        self.change_cases_dir_button.clicked.connect(lambda *_: session.ask_cases_dir())
        self.save_case_button = QPushButton("Save as training case")
        self.save_case_button.clicked.connect(self.save_case)
        self.names_question: Optional[QMessageBox] = None  # the question of _offer_folder_classes, while asked
        self.cases_count_label = QLabel("")
        self.cases_list = QListWidget()
        self.cases_list.setMaximumHeight(110)
        self.remove_case_button = QPushButton("Remove case")
        self.remove_case_button.clicked.connect(self.remove_selected_case)
        form.addRow(self.cases_dir_label)
        buttons = QHBoxLayout()
        buttons.addWidget(self.save_case_button, 1)
        buttons.addWidget(self.change_cases_dir_button)
        form.addRow(buttons)
        form.addRow(self.cases_count_label)
        form.addRow(self.cases_list)
        form.addRow(self.remove_case_button)
        session.cases_changed.connect(self.refresh)
        session.save_case_requested.connect(self.save_case)
        # one job at a time: a disabled button that said nothing read as a broken one while a fine-tune ran
        session.busy_changed.connect(lambda busy: (
            self.save_case_button.setEnabled(not busy),
            self.save_case_button.setToolTip(SAVE_BUSY_TIP if busy else "")))
        self.refresh()

    def save_case(self) -> Optional[Any]:
        """Store the chosen image and labels layers as a training case in the case folder.

        The case keeps the image's confirmed modality and the labels layer's class table (a class the
        user added or painted is saved under its name). A case refused only because its class names are not the
        folder's, while every value painted in it has a class there, is offered to be saved under the folder's
        classes (see :meth:`_offer_folder_classes`).

        Returns:
            The job writing the case (its ``result``, once done, is the record from
            :meth:`engine.cases.CaseStore.add`; on a server, ``{"record", "cases"}``), or ``None`` if refused.
        """
        return self._save_case()

    def _save_case(self, replace_answer: Any = None, asked: bool = False, note: str = "") -> Optional[Any]:
        """``save_case``; ``asked``: whether to replace a case of the same scan was asked already (``replace_answer``
        is then the answer, see :meth:`_case_to_replace`); ``note``: said with the saved case."""
        session = self.session
        image, labels = session.image_layer, session.labels_layer
        if image is None or labels is None:
            session.error("choose an image (Segment) and its labels layer (Correct) before saving a case")
            return None
        try:
            geometry = layer_geometry(image)
        except LayerGeometryError as exc:
            session.error(str(exc))
            return None
        if np.shape(labels.data) != geometry.shape:
            session.error(f"labels layer '{labels.name}' has shape {np.shape(labels.data)} but image "
                          f"'{image.name}' has shape {geometry.shape}; they are not the same volume")
            return None
        if session.labels_belong_elsewhere(labels, image):  # same shape, another scan: CTs often share a matrix
            owner = session.owner_name(labels) or labels_owner(labels)
            session.error(f"labels layer '{labels.name}' was made for image '{owner}', not '{image.name}'; choose "
                          f"the labels of '{image.name}' (or of '{owner}' with its image) before saving a case")
            return None
        table = session.class_table(labels)
        meta = labels.metadata.get(META_KEY) or {}
        interactive = interactive_record(meta, len(table.names))
        if session.remote is not None:  # the case goes to the server's case store
            modality = session.confirmed_modality(image)
            if modality is None:
                session.error(f"choose the modality of '{image.name}' before saving it as a case")
                return None
            # a snapshot, as for a local case: the upload runs in a worker while the annotator may paint on, and the
            # layer is marked saved only when the server confirmed these very labels (what it now holds)
            painted, url = np.array(labels.data, copy=True), session.remote.url
            # whether the layer still holds what was sent: compared in the worker once the server confirmed the case
            # (on the GUI thread, in ``on_saved``, comparing a 512x512x400 CT's labels held it 0.2-0.5 s), and an edit
            # after that comparison is seen by its event, as for a local case
            unchanged = [False]
            shown, edited = labels.data, _EditWatch(labels)

            def compare() -> None:  # worker thread
                unchanged[0] = np.array_equal(np.asarray(shown), painted)

            def saved_on_server(record: Dict[str, Any]) -> None:
                if unchanged[0] and not edited():  # not painted on while the case was sent
                    mark_saved(labels.metadata, f"case {record.get('case_id')} on the server {url}")

            job = session.remote.save_case(image, image_volume(image, geometry), geometry.to_file(painted),
                                           modality, table.names, interactive=interactive,
                                           on_saved=saved_on_server, after_saved=compare,
                                           on_finished=lambda outcome: edited.stop())
            if job is None:
                edited.stop()
            return job
        store = session.case_store()
        if store is None:
            return None
        if store.readonly:  # before any question: "Replace the saved case?" was asked, then the save refused
            session.error(f"case not saved: {store.read_only_text()}")
            return None
        modality = session.confirmed_modality(image)
        if modality is None:
            session.error(f"choose the modality of '{image.name}' before saving it as a case")
            return None
        try:
            origin = None if interactive is None else InteractiveOrigin.from_json_dict(
                interactive, len(table.names), f"labels layer '{labels.name}'")
        except ValueError as exc:
            session.error(f"could not save the case in {store.root}: {exc}")
            return None
        source_file = (image.metadata.get(META_KEY) or {}).get("path")
        replace = replace_answer if asked else self._case_to_replace(store, source_file)
        if replace is False:
            session.status.emit("saving the case cancelled; nothing was saved")
            return None
        # A snapshot: the annotator may paint on while the case is written. Writing runs in a worker: gzipping a
        # 512x512x200 CT takes seconds, which on the GUI thread froze napari.
        painted = np.array(labels.data, copy=True)
        root = store.root
        painted_values: list = []  # the placeholder-named values painted in the case, found by the worker
        # whether the layer still holds the case once written: compared in the worker (comparing a 512x512x400 CT's
        # labels held the GUI thread 0.2-0.5 s in ``done``), and an edit after that comparison is seen by its event
        unchanged = [False]
        shown, edited = labels.data, _EditWatch(labels)

        def run(progress: Any, cancel: Any) -> Any:
            check(cancel)  # cancelled before writing: nothing was saved
            progress(0, 0, f"saving the case in {root}…")
            try:
                record = store.add(image_volume(image, geometry), geometry.to_file(painted), modality=modality,
                                   class_names=table.names, source_file=source_file,
                                   model_version=meta.get("model_version"), interactive=origin,
                                   case_id=replace or None, overwrite=bool(replace))
            except WriteError as exc:  # full disk, read-only folder: the engine's message names the file and why
                raise CaseSaveError(f"{exc}; free space or choose another folder with 'Folder…'") from exc
            except OSError as exc:
                raise CaseSaveError(f"case folder {root} is not writable ({exc.strerror or exc}); choose a "
                                    "writable folder with 'Folder…'") from exc
            except LabelSetConflictError as exc:
                # the annotator's way out is the Folder… button: a new task (another anatomy) needs its own folder
                message = (
                    f"its classes {brief_names(exc.class_names[1:])} differ from those of the cases "
                    f"in {root} (case {exc.case_id}: {brief_names(exc.case_classes[1:])}), and a case folder holds one label set. Choose a "
                    "folder for these classes with 'Folder…' (a new folder for a new anatomy), or name the classes "
                    "as the folder's cases do in the Correct section")
                # the same anatomy under another model's names (the bundled model's organ/vessel/gland on a folder of
                # anterior/posterior): when every painted value has a class in the folder, one click can save it
                # under the folder's names (asked on the GUI thread); the worker finds the painted values
                folder = folder_label_set(store.list(), replace or None)
                beyond = np.unique(painted[painted >= len(folder)]) if folder else np.zeros(0, int)
                if folder and not beyond.size:
                    raise ClassNamesClash(message, folder, table.names) from exc
                if folder:
                    painted_there = ", ".join(f"{table.names[v]} ({v})" if v < len(table.names) else str(v)
                                              for v in beyond.tolist())
                    message += (f" (its classes cannot simply take the folder's names {folder[1:]}: it has voxels of "
                                f"{painted_there}, which the folder has no class for)")
                raise CaseSaveError(message) from exc
            except ValueError as exc:  # CaseStoreError: bad id, classes...
                # the store's messages name the folder already: saying it twice read as two folders
                text = str(exc)
                raise CaseSaveError(text if text.startswith(str(root)) else f"{root}: {text}") from exc
            # in the worker, and only the placeholder values: np.unique of a 512x512x200 CT takes seconds
            painted_values.extend(v for v, name in enumerate(table.names)
                                  if v > 0 and name == f"label {v}" and bool((painted == v).any()))
            unchanged[0] = np.array_equal(np.asarray(shown), painted)
            return Kept(record)  # written: a cancel arriving now cannot unsave it

        def done(record: Any) -> None:
            if session.alive:
                session.cases_changed.emit()
            prompted = record.interactive  # the classes still holding prompted voxels (engine.cases)
            made = f", {len(prompted.class_ids)} class(es) made by prompting" if prompted else ""
            verb = "replaced" if replace else "saved"
            if unchanged[0] and not edited():  # not painted on while the case was written
                mark_saved(labels.metadata, f"case {record.case_id} in {root}")
            message = f"{verb} case {record.case_id} ({modality}{made}) in {root}{note}"
            unnamed = unnamed_classes(table.names, painted_values)
            if not session.alive:  # the dock was closed while the case was written: the message stands alone
                message = f"{message} (after the Mamba-HoME dock was closed)"
            if not any(record.label_counts[1:]):
                # meant for a scan without the structures (a negative example), else a layer emptied by mistake
                say("warning", f"{message}; it holds no class (every voxel is background): fine-tuning learns from it "
                                "that none of the classes is in this scan. Remove the case (Remove case) if that is "
                                "not so")
            elif unnamed:
                say("warning", f"{message}; {unnamed}")
            else:
                say("info", message)

        def say(kind: str, message: str) -> None:
            if session.alive:
                getattr(session, kind)(message)
            else:
                notify(kind, message)

        def refused(exc: BaseException) -> bool:
            if not isinstance(exc, ClassNamesClash) or not session.alive:  # no dock left to ask in: said as refused
                return False
            self._offer_folder_classes(exc, image, labels, replace)
            return True

        job = session.start_job(run, what="saving the case", on_done=done, engine=False,
                                on_finished=lambda outcome: edited.stop(), on_error=refused, outlives_dock=True)
        if job is None:
            edited.stop()
        return job

    def _offer_folder_classes(self, clash: ClassNamesClash, image: Any, labels: Any, replace: Any) -> None:
        """A case refused for its class names alone: say why, as the refusal does, and offer one button that saves it
        under the case folder's classes. Value ``v`` keeps its voxels and takes the folder's name ``v`` (the layer's
        class table is renamed, classes past the folder's, unpainted, are dropped; the voxels are not touched), then
        the case is saved. Cancel leaves everything as it was, and says so as the refusal always did.

        Before, every new scan segmented with the bundled model (organ, vessel, gland) on a folder of hippocampus cases
        (anterior, posterior) took three dialogs (two renames and a removal) before it could be saved.

        The question is window-modal but does not block (``open``): napari keeps drawing, and nothing can be painted
        into the labels while it is asked."""
        session = self.session
        folder = clash.folder_names
        message = f"saving the case failed: {clash}"
        session.status.emit(message)
        box = QMessageBox(self)
        box.setIcon(QMessageBox.Icon.Warning)
        box.setWindowTitle("Case not saved: other class names")
        box.setText(message)
        box.setInformativeText(
            f"Every class painted in '{labels.name}' has a class in the case folder. Save it with the folder's classes "
            f"instead ({renaming_words(clash.names, folder)})? The voxels stay as they are; only the class names of "
            f"'{labels.name}' change (rename them back in the Correct section).")
        save = box.addButton(f"{FOLDER_CLASSES_ACTION} ({', '.join(folder[1:])})", QMessageBox.ButtonRole.AcceptRole)
        box.addButton(QMessageBox.StandardButton.Cancel)
        # Cancel by default: the renaming goes value by value whatever the names mean (liver -> spleen), so an Enter
        # pressed in passing must not save a case under names the annotator did not read
        box.setDefaultButton(QMessageBox.StandardButton.Cancel)
        self.names_question = box

        def answered(*_: Any) -> None:
            self.names_question = None
            box.deleteLater()
            if not session.alive:
                return
            if box.clickedButton() is not save:
                session.error(message)  # as any refusal says it: nothing was saved, nothing changed
                return
            # after the refused job has finished (its slot is free once this question is answered)
            QTimer.singleShot(0, lambda: self._save_with_folder_classes(folder, image, labels, replace))

        box.finished.connect(answered)
        box.open()

    def _save_with_folder_classes(self, folder: List[str], image: Any, labels: Any, replace: Any) -> Optional[Any]:
        """Rename ``labels``' class table to the folder's ``folder`` (value by value) and save the case again."""
        session = self.session
        if (image not in session.viewer.layers or labels not in session.viewer.layers
                or session.image_layer is not image or session.labels_layer is not labels):
            session.error(f"'{image.name}' or '{labels.name}' is no longer the chosen scan and labels; nothing was "
                          "saved and no class was renamed: choose them and save again")
            return None
        old = session.class_table(labels)
        words = renaming_words(old.names, folder)
        colours = {v: c for v, c in old.colours.items() if v < len(folder)}
        session.set_class_table(labels, ClassTable(list(folder), colours, "user"))
        return self._save_case(replace, asked=True, note=f", with the case folder's classes ({words})")

    def _case_to_replace(self, store: Any, source_file: Any) -> Any:
        """When a saved case was made from the same file, ask whether the new labels replace it.

        Saving a scan again (more corrections, the next prompted object) must not silently add a second case of the
        same scan: fine-tuning would count it twice, and one copy could be held out to score a model trained on
        the other.

        Returns:
            The id of the case to replace, ``None`` to save a new case, ``False`` when the user cancelled.
        """
        same = store.cases_of_scan(source_file)
        if not same:
            return None
        # a case's own image reopened: that case (the scan's newest was offered, and Yes overwrote another case)
        reopened = Path(source_file).resolve() if source_file else None
        record = next((r for r in same if r.image_path.resolve() == reopened), same[-1])
        answer = QMessageBox.question(
            self, "Replace the saved case?",
            f"Case {record.case_id} in {store.root} was saved from the same scan ({record.source_file or source_file})."
            "\n"
            f"Yes replaces case {record.case_id} with these labels; No keeps it and saves another case of this scan "
            "(it would count twice in fine-tuning).",
            QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No | QMessageBox.StandardButton.Cancel,
            QMessageBox.StandardButton.Yes)
        if answer == QMessageBox.StandardButton.Yes:
            return record.case_id
        if answer == QMessageBox.StandardButton.No:
            return None
        return False

    def refresh(self) -> None:
        """Show the case folder and its cases (the server's, as last read, when connected)."""
        remote = self.session.remote
        self.change_cases_dir_button.setEnabled(remote is None)
        self.remove_case_button.setEnabled(remote is None)
        if remote is not None:
            self.cases_dir_label.setText(f"cases on the server {remote.url}")
            records = remote.case_records()
        else:
            root = _settings.cases_dir()
            store = self.session.case_store(ask=False)
            # said before Save or Remove is pressed: a shared, read-only folder lists and trains, nothing more
            readonly = " (read-only: cases can be listed and trained on, not saved or removed)" \
                if store is not None and store.readonly else ""
            self.cases_dir_label.setText(f"folder: {root}{readonly}" if root else "folder: not chosen yet")
            records = store.list() if store is not None else []
        self.cases_list.clear()
        for record in records:
            item = QListWidgetItem(f"{record.case_id}  [{record.modality}]")
            item.setData(Qt.ItemDataRole.UserRole, record.case_id)
            self.cases_list.addItem(item)
        by_modality: Dict[str, int] = {}
        for record in records:
            by_modality[str(record.modality)] = by_modality.get(str(record.modality), 0) + 1
        detail = ", ".join(f"{n} {m}" for m, n in sorted(by_modality.items()))
        self.cases_count_label.setText(f"{len(records)} case(s)" + (f": {detail}" if detail else ""))

    def remove_selected_case(self) -> bool:
        """Remove the selected case from the store after confirmation."""
        item = self.cases_list.currentItem()
        store = self.session.case_store(ask=False)
        if item is None or store is None:
            self.session.error("select a case to remove")
            return False
        case_id = item.data(Qt.ItemDataRole.UserRole)
        if store.readonly:  # before "Delete case …?", which a yes answered with a refusal
            self.session.error(f"could not remove case {case_id}: {store.read_only_text()}")
            return False
        if not any(record.case_id == case_id for record in store.list()):
            # deleted outside napari (file manager, another dock) since the list was read: asking "Delete?" and then
            # failing with "no case" read as an error of ours; the list is just stale
            self.session.cases_changed.emit()
            self.session.warning(f"case {case_id} is no longer in {store.root} (removed outside napari); "
                                 "the list is updated")
            return False
        answer = QMessageBox.question(self, "Remove case?", f"Delete case {case_id} from {store.root}?",
                                      QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No,
                                      QMessageBox.StandardButton.No)
        if answer != QMessageBox.StandardButton.Yes:
            return False
        try:
            store.remove(case_id)
        except (OSError, ValueError) as exc:
            self.session.error(f"could not remove case {case_id}: {exc}")
            return False
        self.session.cases_changed.emit()
        self.session.status.emit(f"case {case_id} removed from {store.root}")
        return True
