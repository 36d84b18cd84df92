"""Segment panel: the image, its modality, Segment/Cancel and progress; shows the result as a labels layer."""
from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, Optional

import numpy as np
from qtpy.QtWidgets import (
    QComboBox, QFormLayout, QHBoxLayout, QLabel, QMessageBox, QProgressBar, QPushButton, QWidget,
)

from .._geometry import META_KEY, LayerGeometryError, image_volume, layer_geometry, layer_grid, reference_volume
from .._models import ModelEntry
from .._session import Session, is_edited, mark_edited, owner_metadata
from ._base import Panel

UNKNOWN = "choose…"
"""Modality box text while the image's modality is not known (Segment asks once)."""

_SOURCE_TEXT = {"file": "from the file", "guessed": "GUESSED from the intensities: check it",
                "user": "your choice", None: "not known: choose it"}


class SegmentPanel(Panel):
    """Image and modality boxes, Segment and Cancel, a progress bar.

    The modality belongs to the image layer (:meth:`.._session.Session.modality_of`): the box shows
    the chosen image's and writes the user's choice back to it; nothing else changes it.
    """

    name = "segment"
    title = "Segment"

    def __init__(self, session: Session, parent: Optional[QWidget] = None) -> None:
        from engine.modality import MODALITIES

        super().__init__(session, parent)
        form = QFormLayout(self)
        self.image_combo = QComboBox()
        self.image_combo.currentTextChanged.connect(self._combo_changed)
        self.modality_combo = QComboBox()
        self.modality_combo.addItems([UNKNOWN, *MODALITIES])
        self.modality_combo.currentTextChanged.connect(self._modality_chosen)
        self.modality_note = QLabel("")
        self.modality_note.setWordWrap(True)
        self.segment_button = QPushButton("Segment")
        self.segment_button.clicked.connect(self.segment)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)
        # this section's job: its Cancel stops that one only (it was enabled during a fine-tune and discarded it,
        # while the Fine-tune section offered "Stop and keep")
        self._job: Optional[Any] = None
        buttons = QHBoxLayout()
        buttons.addWidget(self.segment_button)
        buttons.addWidget(self.cancel_button)
        self.progress_bar = QProgressBar()
        self.progress_bar.setRange(0, 1)
        self.progress_bar.setValue(0)
        form.addRow("Image", self.image_combo)
        form.addRow("Modality", self.modality_combo)
        form.addRow(self.modality_note)
        form.addRow(buttons)
        form.addRow(self.progress_bar)
        session.layers_changed.connect(self._fill)
        session.layers_changed.connect(self._show_cancelling)
        session.image_changed.connect(self._show_image)
        session.modality_changed.connect(self._modality_changed)
        session.busy_changed.connect(self._busy)
        self._fill()

    # ------------------------------------------------------------------ image and modality
    def _fill(self) -> None:
        self.image_combo.blockSignals(True)
        self.image_combo.clear()
        self.image_combo.addItems([layer.name for layer in self.session.layers("image")])
        chosen = self.session.image_layer
        if chosen is not None:
            self.image_combo.setCurrentText(chosen.name)
        self.image_combo.blockSignals(False)
        self._show_modality(chosen)

    def _combo_changed(self, name: str) -> None:
        layer = self.session.layer_named(name, "image")
        if layer is not None:
            self.session.set_image(layer)

    def _show_image(self, layer: Any) -> None:
        if layer is not None and self.image_combo.currentText() != layer.name:
            self.image_combo.blockSignals(True)
            self.image_combo.setCurrentText(layer.name)
            self.image_combo.blockSignals(False)
        self._show_modality(layer)

    def _modality_changed(self, layer: Any) -> None:
        if layer is self.session.image_layer:
            self._show_modality(layer)

    def _show_modality(self, layer: Any) -> None:
        modality, source = self.session.modality_of(layer)
        self.modality_combo.blockSignals(True)
        self.modality_combo.setCurrentText(modality or UNKNOWN)
        self.modality_combo.blockSignals(False)
        self.modality_note.setText(f"modality: {_SOURCE_TEXT.get(source, source)}" if layer is not None else "")
        self.modality_note.setStyleSheet("color: orange" if source in ("guessed", None) and layer else "")

    def _modality_chosen(self, text: str) -> None:
        if text != UNKNOWN and self.session.image_layer is not None:
            self.session.set_modality(self.session.image_layer, text)

    # ------------------------------------------------------------------ segment
    def segment(self) -> Optional[Any]:
        """Segment the chosen image layer with the selected model in a worker thread.

        Returns:
            The started job, or ``None`` when the input was refused (the status line says why).
        """
        session, layer = self.session, self.session.image_layer
        if layer is None:
            session.error("no image layer to segment: open a volume (File > Open) or a sample first", about_image=True)
            return None
        if session.current_model is None:
            session.error("no model selected: load a Mamba-HoME checkpoint first")
            return None
        if session.current_model.is_interactive:  # it segments the one object prompts point at, not the image
            session.error(f"{session.current_model.version} ({session.current_model.path.name}) is an interactive "
                          "model: it segments one object from your clicks, not the whole image. Choose a "
                          "segmentation model in the Model section to segment, or prompt with this one in the "
                          "Interactive section")
            return None
        try:
            geometry = layer_geometry(layer)
        except LayerGeometryError as exc:
            session.error(str(exc), about_image=True)
            return None
        modality = session.confirmed_modality(layer)
        if modality is None:
            session.error(f"choose the modality of '{layer.name}' before segmenting it")
            return None
        for note in geometry.notes:
            session.warning(note)
        volume = image_volume(layer, geometry)
        entry, device, layer_name = session.current_model, session.device, layer.name
        loading = {"s": 0.0}  # the first Segment of a model loads it (seconds): its time, said beside the result's

        def run(progress: Callable[[int, int, str], None], cancel: Any) -> Any:
            progress(0, 0, f"loading {entry.version}…")
            started = time.perf_counter()
            predictor = session.predictor(entry, device)
            loading["s"] = time.perf_counter() - started
            prediction = predictor.predict(volume, modality=modality, progress=progress, cancel=cancel)
            # a modality the model never saw is said beside the result, never refused (checked here, off the GUI thread)
            warning = predictor.modality_warning(volume, modality=modality, name=f"'{layer_name}'")
            if warning:
                prediction.warnings.append(warning)
            return prediction

        if session.remote is not None:  # upload once, segment on the server; labels come back in file order
            run = session.remote.segment_job(layer, volume, modality, entry)

        def run_and_count(progress: Callable[[int, int, str], None], cancel: Any) -> Any:
            prediction = run(progress=progress, cancel=cancel)  # the remote job takes keywords only
            # which classes the status line names: np.unique over a 200x512x512 result took 0.4 s on the GUI thread
            return prediction, np.unique(prediction.labels)

        def done(result: Any) -> None:
            prediction, present = result
            if layer not in session.viewer.layers:
                # what would be chosen (and saved) next is not what the user sees: the result goes with its image
                session.warning(f"'{layer.name}' was closed while it was being segmented; its result was dropped")
                return
            session.last_prediction = prediction
            self._show_prediction(layer, geometry, prediction, entry, modality, present=present,
                                  loading_s=loading["s"])

        # image=layer: closing the image cancels the job at once (its result could only be dropped)
        job = session.start_job(run_and_count, what=f"segmenting '{layer.name}'", on_done=done,
                                on_progress=self._progress, on_finished=self._finished,
                                engine=session.remote is None,  # a server segments with its own torch
                                image=layer, image_use="it was being segmented")
        if job is not None:
            self._job = job
            self.cancel_button.setEnabled(True)
            self.progress_bar.setRange(0, 0)  # busy until the first progress report
        return job

    def _progress(self, done: int, total: int, message: str) -> None:
        self.progress_bar.setRange(0, max(total, 0))
        self.progress_bar.setValue(done if total else 0)

    def _finished(self, outcome: str) -> None:
        self.progress_bar.setRange(0, 1)
        self.progress_bar.setValue(1 if outcome == "done" else 0)

    def _show_prediction(self, image: Any, geometry: Any, prediction: Any, entry: ModelEntry,
                         modality: str, present: Optional[np.ndarray] = None, loading_s: float = 0.0) -> Any:
        """Show ``prediction`` as ``<image> labels``; ``present``: the label values in it, when the worker counted
        them (else counted here); ``loading_s``: the time it took to load the model first.

        When another image was chosen while the job ran (the Image box, the layer list, to prompt on it), the result
        layer is added but the user's choice stays: the chosen image and labels (what Correct edits and Cases saves)
        and napari's selected layer, so that Cases > Save never saves the model's output of a scan the user has moved
        away from."""
        import pandas as pd

        session = self.session
        left = session.image_layer is not image  # the user chose another image while this one was segmented
        name = f"{image.name} labels"
        target = session.layer_named(name, "labels")
        if target is not None and session.labels_belong_elsewhere(target, image):
            # another scan's labels under this name (a renamed image's, or a closed one's of another file)
            target, name = None, self._free_name(name)
        labels = geometry.to_display(prediction.labels)  # file voxel order -> the image layer's order
        kept: Any = None  # the edited layer the user kept: it stays the one corrected, prompted on and saved
        if target is not None and (np.shape(target.data) != labels.shape or is_edited(target)):
            replace = False
            if np.shape(target.data) == labels.shape:
                answer = QMessageBox.question(
                    self, "Replace edited labels?",
                    f"'{name}' may hold your edits. Replace them with the new segmentation? Ctrl+Z cannot bring "
                    "them back.\n"
                    "No keeps your edits, still the labels you correct, prompt on and save, and adds the new "
                    "result as a layer of its own.",
                    QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No, QMessageBox.StandardButton.No)
                replace = answer == QMessageBox.StandardButton.Yes
                kept = None if replace else target
            if not replace:
                target, name = None, self._free_name(name)
        elif target is None and not left:
            # the annotator's edited labels of this scan, renamed ("cord (my edits)"): not replaced (another name), and
            # they stay the labels corrected and saved; the new result took the choice, and Save saved the raw output
            chosen = session.labels_layer
            if (chosen is not None and chosen in session.viewer.layers and is_edited(chosen)
                    and not session.labels_belong_elsewhere(chosen, image)):
                kept = chosen
        meta = {
            **geometry.layer_metadata(),
            "path": (image.metadata.get(META_KEY) or {}).get("path"),
            "volume": reference_volume(geometry, image.data),
            "class_names": list(prediction.class_names),
            "class_source": "model",
            "model_version": entry.version,
            **owner_metadata(image),
            "modality": modality,
            "edited": False,
        }
        features = pd.DataFrame({"index": np.arange(len(prediction.class_names)),
                                 "class": list(prediction.class_names)})
        if target is None:
            # the edits the user kept stay chosen: the new layer took the prompt target and the class box with it
            with (session.choice_kept() if left or kept is not None else contextlib.nullcontext()):
                target = session.add_labels(image, labels, name=name, metadata={META_KEY: meta}, features=features,
                                            **layer_grid(image))
            target.events.paint.connect(mark_edited)
        else:
            target.metadata[META_KEY] = meta
            target.data = labels
            target.features = features
            session.classes_changed.emit(target)
        target.selected_label = 1 if len(prediction.class_names) > 1 else 0
        chosen_labels = target if kept is None else kept
        if left:
            session.remember_labels(image, chosen_labels)  # choosing the segmented scan again brings them with it
        else:
            session.set_image(image)  # the new layer must not move the choice away from the segmented image
            session.set_labels(chosen_labels)
        if present is None:
            present = np.unique(prediction.labels)
        present = [prediction.class_names[v] for v in present if 0 < v < len(prediction.class_names)]
        for note in list(prediction.notes) + list(getattr(prediction, "warnings", [])):
            session.warning(note)
        found = (f"'{target.name}': {', '.join(present) or 'nothing found'} in {prediction.seconds:.1f} s on "
                 f"{prediction.device_used}")
        if loading_s >= 0.5:  # "in 0.4 s" after a 6 s wait read as if the wait were something else
            found += f" (after {loading_s:.1f} s loading the model)"
        chosen = session.image_layer
        if kept is not None:
            found += f"; your edited '{kept.name}' stays the labels you correct and save (choose '{target.name}' in " \
                     "the Labels box to work on the new result)"
        if left and chosen is not None:
            # a notification too: the result arrives while the user works elsewhere, and nothing else on screen moves
            session.info(f"{found}. It was added as the labels of '{image.name}'; '{chosen.name}', chosen while it "
                         f"was segmented, stays chosen (Correct and Save work on it): choose '{image.name}' in the "
                         "Image box to work on its result")
        else:
            session.status.emit(found)
        return target

    def _free_name(self, name: str) -> str:
        taken = {layer.name for layer in self.session.viewer.layers}
        n = 2
        while f"{name} ({n})" in taken:
            n += 1
        return f"{name} ({n})"

    def cancel(self) -> None:
        """Ask the running job to stop and grey Cancel out at once: the engine stops between sliding windows (seconds
        apart on a CPU), and meanwhile the button stayed enabled, so the annotator pressed it again and again not
        knowing the click was taken. It is enabled again by the next job."""
        if not self.session.busy or self.session.job is not self._job:
            return
        self.session.cancel_job()
        self.cancel_button.setEnabled(False)

    def _busy(self, busy: bool) -> None:
        self.segment_button.setEnabled(not busy)
        # a job starting now is not known here until start_job returns (segment() enables Cancel then)
        self.cancel_button.setEnabled(busy and self._job is not None and self.session.job is self._job)

    def _show_cancelling(self) -> None:
        """Closing the image being segmented cancels the job (the session does, see ``Session.start_job``): Cancel is
        greyed out then as after its own press, until the engine stops at its next check."""
        job = self.session.job
        if self.session.busy and job is not None and job.token.cancelled:
            self.cancel_button.setEnabled(False)
