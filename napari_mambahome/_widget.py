"""The Mamba-HoME dock widget: model, segment, correct, cases, fine-tune.

The widget is a front end only. Segmentation is :class:`engine.inference.Predictor`, cases are
:class:`engine.cases.CaseStore`, fine-tuning is :func:`engine.train.finetune.finetune`, Dice is
:mod:`engine.evaluation`; long calls run in napari thread workers (:mod:`._jobs`) so the viewer stays
responsive, report progress, and stop on Cancel or when the viewer closes.
"""
from __future__ import annotations

import datetime as _dt
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QComboBox, QDoubleSpinBox, QFileDialog, QFormLayout, QGroupBox, QHBoxLayout, QLabel, QListWidget,
    QListWidgetItem, QMessageBox, QProgressBar, QPushButton, QScrollArea, QSpinBox, QVBoxLayout, QWidget,
)

from . import _correct, _settings
from ._geometry import META_KEY, LayerGeometryError, image_volume, layer_geometry, reference_volume
from ._jobs import Job
from ._models import BUNDLED_MODEL, ModelEntry, backend_name, fine_tuned_entries, read_entry
from ._panels import Legend, LossPlot

DEVICES = {"auto": "auto", "CPU": "cpu", "GPU": "cuda"}


def finetune_defaults() -> Tuple[int, float]:
    """The engine's default fine-tuning steps and learning rate (one place decides them)."""
    from engine.train.config import finetune_defaults as engine_defaults

    defaults = engine_defaults()
    return int(defaults["steps"]), float(defaults["lr"])


def _notify_error(message: str) -> None:
    from napari.utils.notifications import show_error

    show_error(message)


def _notify_warning(message: str) -> None:
    from napari.utils.notifications import show_warning

    show_warning(message)


def _notify_info(message: str) -> None:
    from napari.utils.notifications import show_info

    show_info(message)


def _mark_edited(event: Any) -> None:
    """``Labels.events.paint`` handler: a brush, fill, erase or helper edit makes the layer user-edited."""
    meta = event.source.metadata.get(META_KEY)
    if meta is not None:
        meta["edited"] = True


def is_edited(layer: Any) -> bool:
    """Whether a labels layer may hold the user's work: edited since the model wrote it, or not
    written by the model at all (opened from a file, drawn by hand)."""
    meta = layer.metadata.get(META_KEY) or {}
    return "model_version" not in meta or bool(meta.get("edited", False))


def count_parameters(metadata: Dict[str, Any]) -> Optional[int]:
    """Parameter count of a checkpoint's network, built on PyTorch's ``meta`` device (no memory, no weights)."""
    try:
        import torch

        from engine.networks import build_network_from_spec

        with torch.device("meta"):
            model = build_network_from_spec(dict(metadata["network"]))
        return int(sum(p.numel() for p in model.parameters()))
    except Exception:  # noqa: BLE001 - a description must never block choosing a model
        return None


class _State:
    """Widget state the worker callbacks may see after Qt deleted the widget (viewer closed)."""

    def __init__(self) -> None:
        self.alive = True
        self.job: Optional[Job] = None

    def widget_destroyed(self, *_: Any) -> None:
        self.alive = False
        if self.job is not None:
            self.job.cancel()


class MambaHoMEWidget(QWidget):
    """Dock widget driving the segment -> correct -> save case -> fine-tune loop.

    Args:
        napari_viewer: the viewer this widget acts on (napari passes it by this name).
        parent: Qt parent.

    Public attributes used by tests and scripts: ``current_model`` (the selected :class:`ModelEntry`),
    ``job`` (the running :class:`._jobs.Job` or ``None``), ``last_prediction``, ``last_finetune``.
    """

    def __init__(self, napari_viewer: Any, parent: Optional[QWidget] = None) -> None:
        super().__init__(parent)
        self.viewer = napari_viewer
        self._state = _State()
        self.destroyed.connect(self._state.widget_destroyed)
        self.entries: List[ModelEntry] = []
        self.current_model: Optional[ModelEntry] = None
        self._predictors: Dict[Tuple[str, str], Any] = {}
        self.last_prediction: Any = None
        self.last_finetune: Optional[Dict[str, Any]] = None
        self.dice_by_version: Dict[str, float] = {}

        inner = QWidget()
        layout = QVBoxLayout(inner)
        layout.addWidget(self._build_model_section())
        layout.addWidget(self._build_segment_section())
        layout.addWidget(self._build_correct_section())
        layout.addWidget(self._build_cases_section())
        layout.addWidget(self._build_finetune_section())
        layout.addStretch(1)
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)  # wrap, never scroll sideways
        scroll.setWidget(inner)
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        outer.addWidget(scroll)
        self.setMinimumWidth(360)

        for emitter in (self.viewer.layers.events.inserted, self.viewer.layers.events.removed,
                        self.viewer.layers.events.reordered):
            emitter.connect(self._refresh_layer_choices)
        self._refresh_layer_choices()
        self._load_initial_models()
        self._refresh_cases()

    # ================================================================= sections
    def _build_model_section(self) -> QGroupBox:
        box = QGroupBox("Model")
        form = QFormLayout(box)
        self.model_combo = QComboBox()
        self.model_combo.currentIndexChanged.connect(self._model_combo_changed)
        self.load_model_button = QPushButton("Load checkpoint…")
        self.load_model_button.clicked.connect(self._ask_model_file)
        self.device_combo = QComboBox()
        self.device_combo.addItems(list(DEVICES))
        self.device_combo.currentTextChanged.connect(self._device_changed)
        self.model_info = QLabel("no model")
        self.model_info.setWordWrap(True)
        self.model_info.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        form.addRow("Version", self.model_combo)
        form.addRow(self.load_model_button)
        form.addRow("Device", self.device_combo)
        form.addRow(self.model_info)
        return box

    def _build_segment_section(self) -> QGroupBox:
        from engine.preprocess import MODALITIES

        box = QGroupBox("Segment")
        form = QFormLayout(box)
        self.image_combo = QComboBox()
        self.image_combo.currentTextChanged.connect(self._image_choice_changed)
        self.modality_combo = QComboBox()
        self.modality_combo.addItems(list(MODALITIES))
        self.segment_button = QPushButton("Segment")
        self.segment_button.clicked.connect(self.segment)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel_job)
        buttons = QHBoxLayout()
        buttons.addWidget(self.segment_button)
        buttons.addWidget(self.cancel_button)
        self.progress_bar = QProgressBar()
        self.progress_bar.setRange(0, 1)
        self.progress_bar.setValue(0)
        self.status_label = QLabel("")
        self.status_label.setWordWrap(True)
        self.legend = Legend()
        form.addRow("Image", self.image_combo)
        form.addRow("Modality", self.modality_combo)
        form.addRow(buttons)
        form.addRow(self.progress_bar)
        form.addRow(self.status_label)
        form.addRow(self.legend)
        return box

    def _build_correct_section(self) -> QGroupBox:
        box = QGroupBox("Correct")
        form = QFormLayout(box)
        hint = QLabel("Paint, fill and erase with napari's label tools; helpers act on the chosen class.")
        hint.setWordWrap(True)
        self.labels_combo = QComboBox()
        self.labels_combo.currentTextChanged.connect(self._labels_choice_changed)
        self.class_combo = QComboBox()
        self.class_combo.currentIndexChanged.connect(self._class_choice_changed)
        self.island_spin = QSpinBox()
        self.island_spin.setRange(1, 10_000_000)
        self.island_spin.setValue(100)
        self.island_spin.setSuffix(" voxels")
        form.addRow(hint)
        form.addRow("Labels", self.labels_combo)
        form.addRow("Class", self.class_combo)
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
        row2.addWidget(QLabel("smaller than"))
        row2.addWidget(self.island_spin)
        form.addRow(row2)
        row3 = QHBoxLayout()
        row3.addWidget(self.helper_buttons["Clear class"])
        self.undo_button = QPushButton("Undo")
        self.undo_button.clicked.connect(self.undo)
        row3.addWidget(self.undo_button)
        form.addRow(row3)
        return box

    def _build_cases_section(self) -> QGroupBox:
        box = QGroupBox("Cases")
        form = QFormLayout(box)
        self.cases_dir_label = QLabel("")
        self.cases_dir_label.setWordWrap(True)
        self.change_cases_dir_button = QPushButton("Folder…")
        self.change_cases_dir_button.clicked.connect(self._ask_cases_dir)
        self.save_case_button = QPushButton("Save as training case")
        self.save_case_button.clicked.connect(self.save_case)
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
        return box

    def _build_finetune_section(self) -> QGroupBox:
        box = QGroupBox("Fine-tune")
        form = QFormLayout(box)
        default_steps, default_lr = finetune_defaults()
        self.steps_spin = QSpinBox()
        self.steps_spin.setRange(1, 100_000)
        self.steps_spin.setValue(default_steps)
        self.lr_spin = QDoubleSpinBox()
        self.lr_spin.setDecimals(6)
        self.lr_spin.setRange(1e-6, 1e-1)
        self.lr_spin.setSingleStep(1e-5)
        self.lr_spin.setValue(default_lr)
        self.finetune_button = QPushButton("Fine-tune on saved cases")
        self.finetune_button.clicked.connect(self.finetune)
        self.finetune_cancel_button = QPushButton("Cancel")
        self.finetune_cancel_button.setEnabled(False)
        self.finetune_cancel_button.clicked.connect(self.cancel_job)
        buttons = QHBoxLayout()
        buttons.addWidget(self.finetune_button)
        buttons.addWidget(self.finetune_cancel_button)
        self.finetune_progress = QProgressBar()
        self.finetune_progress.setRange(0, 1)
        self.finetune_progress.setValue(0)
        self.loss_plot = LossPlot()
        self.finetune_result = QLabel("")
        self.finetune_result.setWordWrap(True)
        self.versions_list = QListWidget()
        self.versions_list.setMaximumHeight(110)
        self.use_version_button = QPushButton("Use selected version (roll back)")
        self.use_version_button.clicked.connect(self._use_selected_version)
        form.addRow("Steps", self.steps_spin)
        form.addRow("Learning rate", self.lr_spin)
        form.addRow(buttons)
        form.addRow(self.finetune_progress)
        form.addRow(self.loss_plot)
        form.addRow(self.finetune_result)
        form.addRow(QLabel("Versions"))
        form.addRow(self.versions_list)
        form.addRow(self.use_version_button)
        return box

    # ================================================================= layers
    def _layers_of(self, kind: str) -> List[Any]:
        from napari.layers import Image, Labels

        cls = Image if kind == "image" else Labels
        return [layer for layer in self.viewer.layers if isinstance(layer, cls)]

    def _refresh_layer_choices(self, *_: Any) -> None:
        if not self._state.alive:
            return
        for layer in self.viewer.layers:
            # a renamed layer must show its new name (connecting twice is a no-op in napari)
            layer.events.name.connect(self._refresh_layer_choices)
        for combo, kind in ((self.image_combo, "image"), (self.labels_combo, "labels")):
            previous = combo.currentText()
            names = [layer.name for layer in self._layers_of(kind)]
            combo.blockSignals(True)
            combo.clear()
            combo.addItems(names)
            if previous in names:
                combo.setCurrentText(previous)
            elif names:
                combo.setCurrentIndex(len(names) - 1)  # the newest layer is the likely target
            combo.blockSignals(False)
        self._image_choice_changed(self.image_combo.currentText())
        self._labels_choice_changed(self.labels_combo.currentText())

    def _layer_named(self, name: str, kind: str) -> Optional[Any]:
        for layer in self._layers_of(kind):
            if layer.name == name:
                return layer
        return None

    @property
    def image_layer(self) -> Optional[Any]:
        """The image layer chosen in the Segment section."""
        return self._layer_named(self.image_combo.currentText(), "image")

    @property
    def labels_layer(self) -> Optional[Any]:
        """The labels layer chosen in the Correct section (also what "Save as training case" saves)."""
        return self._layer_named(self.labels_combo.currentText(), "labels")

    def _image_choice_changed(self, name: str) -> None:
        layer = self._layer_named(name, "image")
        if layer is None:
            return
        modality = (layer.metadata.get(META_KEY) or {}).get("modality")
        if not modality and self.current_model is not None:
            modality = self.current_model.modality
        if modality and self.modality_combo.findText(modality) >= 0:
            self.modality_combo.setCurrentText(modality)

    def _labels_choice_changed(self, name: str) -> None:
        layer = self._layer_named(name, "labels")
        self.class_combo.blockSignals(True)
        self.class_combo.clear()
        if layer is not None:
            names = self._class_names_of(layer)
            for value, cname in enumerate(names):
                if value > 0:
                    self.class_combo.addItem(f"{value}: {cname}", value)
            index = self.class_combo.findData(int(layer.selected_label))
            self.class_combo.setCurrentIndex(max(index, 0))
            layer.events.selected_label.connect(self._layer_label_selected)
        self.class_combo.blockSignals(False)

    def _class_names_of(self, layer: Any) -> List[str]:
        names = (layer.metadata.get(META_KEY) or {}).get("class_names")
        if names:
            return list(names)
        if self.current_model is not None and self.current_model.class_names:
            return self.current_model.class_names
        top = int(np.max(layer.data)) if np.size(layer.data) else 0
        return ["background"] + [f"label {v}" for v in range(1, max(top, 1) + 1)]

    def _layer_label_selected(self, event: Any) -> None:
        if not self._state.alive or event.source is not self.labels_layer:
            return
        index = self.class_combo.findData(int(event.source.selected_label))
        if index >= 0:
            self.class_combo.blockSignals(True)
            self.class_combo.setCurrentIndex(index)
            self.class_combo.blockSignals(False)

    def _class_choice_changed(self, index: int) -> None:
        layer = self.labels_layer
        value = self.class_combo.itemData(index)
        if layer is not None and value is not None:
            layer.selected_label = int(value)

    @property
    def selected_class(self) -> Optional[int]:
        value = self.class_combo.currentData()
        return int(value) if value is not None else None

    # ================================================================= models
    def _load_initial_models(self) -> None:
        from engine.checkpoint import CheckpointError

        if BUNDLED_MODEL.is_file():
            try:
                self._add_entry(read_entry(BUNDLED_MODEL, origin="bundled"), select=False)
            except CheckpointError as exc:
                _notify_error(f"the bundled default model is damaged: {exc}")
        for entry in fine_tuned_entries(_settings.models_dir()):
            self._add_entry(entry, select=False)
        # the version used last time (a fine-tuned one, say), else the bundled default
        last = _settings.load_settings().get("model")
        if last and Path(last).is_file() and not any(e.path == Path(last) for e in self.entries):
            try:
                self._add_entry(read_entry(Path(last)), select=False)
            except CheckpointError:
                pass
        chosen = next((e for e in self.entries if last and e.path == Path(last)), None)
        if chosen is None and self.entries:
            chosen = self.entries[0]
        if chosen is not None:
            self.select_model(chosen)
        else:
            self.model_info.setText("no model: load a checkpoint (.safetensors)")

    def _add_entry(self, entry: ModelEntry, select: bool = True) -> ModelEntry:
        for existing in self.entries:
            if existing.path.resolve() == entry.path.resolve():
                if select:
                    self.select_model(existing)
                return existing
        self.entries.append(entry)
        self.model_combo.blockSignals(True)
        self.model_combo.addItem(entry.label)
        self.model_combo.blockSignals(False)
        self._refresh_versions()
        if select:
            self.select_model(entry)
        return entry

    def load_model_file(self, path: Any) -> Optional[ModelEntry]:
        """Add a checkpoint file and select it; anything not ours gives a notification and changes nothing.

        Args:
            path: a napari-mambahome ``.safetensors`` checkpoint.

        Returns:
            The new entry, or ``None`` if the file was refused.
        """
        from engine.checkpoint import CheckpointError

        try:
            entry = read_entry(Path(path), origin="file")
        except CheckpointError as exc:
            _notify_error(f"cannot use this model file: {exc}")
            return None
        except OSError as exc:
            _notify_error(f"cannot read model file {path}: {exc}")
            return None
        return self._add_entry(entry, select=True)

    def _ask_model_file(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Load a Mamba-HoME checkpoint", "",
                                              "Mamba-HoME checkpoints (*.safetensors);;All files (*)")
        if path:
            self.load_model_file(path)

    def select_model(self, entry: ModelEntry) -> None:
        """Make ``entry`` the model used for segmenting and as the start of fine-tuning."""
        self.current_model = entry
        index = self.entries.index(entry)
        if self.model_combo.currentIndex() != index:
            self.model_combo.blockSignals(True)
            self.model_combo.setCurrentIndex(index)
            self.model_combo.blockSignals(False)
        self.model_info.setText(entry.summary(count_parameters(entry.metadata), backend_name()))
        self.model_info.setToolTip(str(entry.path))
        self._refresh_versions()
        try:
            _settings.save_setting("model", str(entry.path))
        except OSError:  # an unwritable config folder must not stop the work
            pass
        self._image_choice_changed(self.image_combo.currentText())

    def _model_combo_changed(self, index: int) -> None:
        if 0 <= index < len(self.entries):
            self.select_model(self.entries[index])

    @property
    def device(self) -> str:
        return DEVICES[self.device_combo.currentText()]

    def _device_changed(self, text: str) -> None:
        if DEVICES.get(text) == "cuda":
            import torch

            if not torch.cuda.is_available():
                _notify_warning("no CUDA GPU is available on this machine; segmenting on the CPU (device auto)")
                self.device_combo.setCurrentText("auto")

    def _predictor(self, entry: ModelEntry, device: str) -> Any:
        """The cached predictor for (model, device); built in the worker thread on first use."""
        from engine.inference import Predictor

        key = (str(entry.path), device)
        if key not in self._predictors:
            self._predictors.clear()  # one model in memory at a time: a paper-size model is 700 MB
            self._predictors[key] = Predictor(entry.path, device=device)
        return self._predictors[key]

    # ================================================================= jobs
    @property
    def job(self) -> Optional[Job]:
        return self._state.job

    def _start_job(self, func: Callable[..., Any], *, bar: QProgressBar, on_done: Callable[[Any], None],
                   on_progress: Optional[Callable[[int, int, str], None]] = None,
                   on_log: Optional[Callable[[Any], None]] = None,
                   on_cancelled: Optional[Callable[[], None]] = None, what: str) -> Optional[Job]:
        if self._state.job is not None and self._state.job.running:
            _notify_warning("another Mamba-HoME job is running; wait for it or cancel it first")
            return None
        state = self._state

        def alive(callback: Optional[Callable[..., Any]]) -> Callable[..., Any]:
            def call(*args: Any) -> None:
                if state.alive and callback is not None:
                    callback(*args)
            return call

        def progress(done: int, total: int, message: str) -> None:
            bar.setRange(0, max(total, 0))
            bar.setValue(done if total else 0)
            if bar is self.progress_bar:
                self.status_label.setText(message)
            if on_progress is not None:
                on_progress(done, total, message)

        def failed(exc: BaseException) -> None:
            _notify_error(f"{what} failed: {exc}")
            self.status_label.setText(f"{what} failed: {exc}")

        def cancelled() -> None:
            self.status_label.setText(f"{what} cancelled; nothing was changed")
            if on_cancelled is not None:
                on_cancelled()

        def finished() -> None:
            bar.setRange(0, 1)
            bar.setValue(1 if state.job is not None and state.job.outcome == "done" else 0)
            self._set_busy(False)

        job = Job(func, on_progress=alive(progress), on_log=alive(on_log) if on_log else None,
                  on_done=alive(on_done), on_error=alive(failed),
                  on_cancelled=alive(cancelled), on_finished=alive(finished))
        state.job = job
        self._set_busy(True)
        bar.setRange(0, 0)  # busy until the first progress report
        self.status_label.setText(f"{what}…")
        return job.start()

    def _set_busy(self, busy: bool) -> None:
        for button in (self.segment_button, self.finetune_button, self.save_case_button, self.load_model_button,
                       self.use_version_button):
            button.setEnabled(not busy)
        self.model_combo.setEnabled(not busy)
        self.device_combo.setEnabled(not busy)
        self.cancel_button.setEnabled(busy)
        self.finetune_cancel_button.setEnabled(busy)

    def cancel_job(self) -> None:
        """Ask the running job to stop; the model, layers and cases stay as they were."""
        if self._state.job is not None and self._state.job.running:
            self._state.job.cancel()
            self.status_label.setText("cancelling…")

    # ================================================================= segment
    def segment(self) -> Optional[Job]:
        """Segment the chosen image layer with the selected model in a worker thread.

        Returns:
            The started job, or ``None`` when the input was refused (a notification says why).
        """
        layer = self.image_layer
        if layer is None:
            _notify_error("no image layer to segment: open a volume (File > Open) or a sample first")
            return None
        if self.current_model is None:
            _notify_error("no model selected: load a Mamba-HoME checkpoint first")
            return None
        try:
            geometry = layer_geometry(layer)
        except LayerGeometryError as exc:
            _notify_error(str(exc))
            return None
        for note in geometry.notes:
            _notify_warning(note)
        volume = image_volume(layer, geometry)
        modality = self.modality_combo.currentText()
        entry, device = self.current_model, self.device

        def run(progress: Callable[[int, int, str], None], cancel: Any) -> Any:
            progress(0, 0, f"loading {entry.version}…")
            predictor = self._predictor(entry, device)
            return predictor.predict(volume, modality=modality, progress=progress, cancel=cancel)

        def done(prediction: Any) -> None:
            self.last_prediction = prediction
            self._show_prediction(layer, geometry, prediction, entry)

        return self._start_job(run, bar=self.progress_bar, on_done=done, what=f"segmenting '{layer.name}'")

    def _show_prediction(self, image: Any, geometry: Any, prediction: Any, entry: ModelEntry) -> Any:
        import pandas as pd

        name = f"{image.name} labels"
        target = self._layer_named(name, "labels")
        labels = geometry.to_display(prediction.labels)  # file voxel order -> the image layer's order
        if target is not None and (np.shape(target.data) != labels.shape or is_edited(target)):
            replace = False
            if np.shape(target.data) == labels.shape:
                answer = QMessageBox.question(
                    self, "Replace edited labels?",
                    f"'{name}' may hold your edits. Replace them with the new segmentation?\n"
                    "No keeps your edits and puts the new result in a new layer.",
                    QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No, QMessageBox.StandardButton.No)
                replace = answer == QMessageBox.StandardButton.Yes
            if not replace:
                target, name = None, self._free_name(name)
        meta = {
            **geometry.layer_metadata(),
            "path": (image.metadata.get(META_KEY) or {}).get("path"),
            "volume": reference_volume(geometry, image.data),
            "class_names": list(prediction.class_names),
            "model_version": entry.version,
            "image_layer": image.name,
            "modality": self.modality_combo.currentText(),
            "edited": False,
        }
        features = pd.DataFrame({"index": np.arange(len(prediction.class_names)),
                                 "class": list(prediction.class_names)})
        if target is None:
            target = self.viewer.add_labels(labels, name=name, scale=image.scale, translate=image.translate,
                                            metadata={META_KEY: meta}, features=features)
            target.events.paint.connect(_mark_edited)
        else:
            target.metadata[META_KEY] = meta
            target.data = labels
            target.features = features
        target.selected_label = 1 if len(prediction.class_names) > 1 else 0
        self.legend.show_layer(target, prediction.class_names)
        self.labels_combo.setCurrentText(target.name)
        self._labels_choice_changed(target.name)
        present = [prediction.class_names[v] for v in np.unique(labels) if 0 < v < len(prediction.class_names)]
        message = (f"'{target.name}': {', '.join(present) or 'nothing found'} in {prediction.seconds:.1f} s "
                   f"on {prediction.device_used}")
        for note in prediction.notes:
            _notify_warning(note)
        self.status_label.setText(message)
        return target

    def _free_name(self, name: str) -> str:
        taken = {layer.name for layer in self.viewer.layers}
        n = 2
        while f"{name} ({n})" in taken:
            n += 1
        return f"{name} ({n})"

    # ================================================================= correct
    def run_helper(self, name: str) -> int:
        """Apply a correction helper (see :data:`._correct.HELPERS`) to the selected class, undoably.

        Returns:
            The number of voxels changed.
        """
        layer = self.labels_layer
        class_id = self.selected_class
        if layer is None or class_id is None:
            _notify_error("choose a labels layer and a class in the Correct section first")
            return 0
        if np.ndim(layer.data) != 3:
            _notify_error(f"labels layer '{layer.name}' is not 3D {np.shape(layer.data)}")
            return 0
        helper = _correct.HELPERS[name]
        data = np.asarray(layer.data)
        if name == "Remove small islands":
            new = helper(data, class_id, self.island_spin.value())
        else:
            new = helper(data, class_id)
        changed = _correct.apply_to_layer(layer, new)
        self.status_label.setText(f"{name} on class {class_id}: {changed} voxels changed"
                                  + (" (Undo reverts)" if changed else ""))
        return changed

    def undo(self) -> None:
        """Undo the last edit of the chosen labels layer (helpers and brush strokes alike)."""
        layer = self.labels_layer
        if layer is not None:
            layer.undo()

    # ================================================================= cases
    def _case_store(self, ask: bool = True) -> Optional[Any]:
        """The case store in the chosen folder; ``ask``: choose a folder if none yet and report problems."""
        from engine.cases import CaseStore

        root = _settings.cases_dir()
        if root is None and ask:
            root = self._ask_cases_dir()
        if root is None:
            return None
        try:
            return CaseStore(_settings.check_cases_dir(root))
        except ValueError as exc:  # CaseFolderError, CaseStoreError (read-only, a file)
            if ask:
                _notify_error(str(exc))
            return None

    def _ask_cases_dir(self, *_: Any) -> Optional[Path]:
        path = QFileDialog.getExistingDirectory(self, "Folder for training cases")
        if not path:
            return None
        _settings.set_cases_dir(Path(path))
        self._refresh_cases()
        return Path(path)

    def save_case(self) -> Optional[Any]:
        """Store the chosen image and labels layers as a training case in the case folder.

        Returns:
            The case record from :meth:`engine.cases.CaseStore.add`, or ``None`` if refused.
        """
        image, labels = self.image_layer, self.labels_layer
        if image is None or labels is None:
            _notify_error("choose an image (Segment) and its labels layer (Correct) before saving a case")
            return None
        try:
            geometry = layer_geometry(image)
        except LayerGeometryError as exc:
            _notify_error(str(exc))
            return None
        if np.shape(labels.data) != geometry.shape:
            _notify_error(f"labels layer '{labels.name}' has shape {np.shape(labels.data)} but image "
                          f"'{image.name}' has shape {geometry.shape}; they are not the same volume")
            return None
        store = self._case_store()
        if store is None:
            return None
        class_names = self._class_names_of(labels)
        meta = labels.metadata.get(META_KEY) or {}
        try:
            record = store.add(image_volume(image, geometry), geometry.to_file(labels.data),
                               modality=self.modality_combo.currentText(), class_names=class_names,
                               source_file=(image.metadata.get(META_KEY) or {}).get("path"),
                               model_version=meta.get("model_version"))
        except OSError as exc:
            _notify_error(f"could not save the case: case folder {store.root} is not writable "
                          f"({exc.strerror or exc}); choose a writable folder with 'Folder…'")
            return None
        except ValueError as exc:  # CaseStoreError: labels outside the classes, bad id...
            _notify_error(f"could not save the case in {store.root}: {exc}")
            return None
        self._refresh_cases()
        _notify_info(f"saved case {record.case_id} in {store.root}")
        return record


    def _refresh_cases(self) -> None:
        root = _settings.cases_dir()
        self.cases_dir_label.setText(f"folder: {root}" if root else "folder: not chosen yet")
        self.cases_list.clear()
        store = self._case_store(ask=False)
        records = store.list() if store is not None else []
        for record in records:
            item = QListWidgetItem(f"{record.case_id}  [{record.modality}]")
            item.setData(Qt.ItemDataRole.UserRole, record.case_id)
            self.cases_list.addItem(item)
        by_modality: Dict[str, int] = {}
        for record in records:
            by_modality[str(record.modality)] = by_modality.get(
                str(record.modality), 0) + 1
        detail = ", ".join(f"{n} {m}" for m, n in sorted(by_modality.items()))
        self.cases_count_label.setText(f"{len(records)} case(s)" + (f": {detail}" if detail else ""))

    def remove_selected_case(self) -> bool:
        """Remove the selected case from the store after confirmation."""
        item = self.cases_list.currentItem()
        store = self._case_store(ask=False)
        if item is None or store is None:
            _notify_error("select a case to remove")
            return False
        case_id = item.data(Qt.ItemDataRole.UserRole)
        answer = QMessageBox.question(self, "Remove case?", f"Delete case {case_id} from {store.root}?",
                                      QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No,
                                      QMessageBox.StandardButton.No)
        if answer != QMessageBox.StandardButton.Yes:
            return False
        try:
            store.remove(case_id)
        except (OSError, ValueError) as exc:
            _notify_error(f"could not remove case {case_id}: {exc}")
            return False
        self._refresh_cases()
        return True

    # ================================================================= fine-tune
    def finetune(self) -> Optional[Job]:
        """Fine-tune the selected model on the saved cases in a worker; select the new version on success.

        Returns:
            The started job, or ``None`` when refused (no model, no cases, no case folder).
        """
        entry = self.current_model
        if entry is None:
            _notify_error("no model selected to fine-tune")
            return None
        store = self._case_store()
        if store is None:
            return None
        records = store.list()
        if not records:
            _notify_error(f"no saved cases in {store.root}: correct a segmentation and press "
                          "'Save as training case' first")
            return None
        if not self._classes_agree(entry, max((r.class_names for r in records), key=len), store.root):
            return None
        steps, lr, device = int(self.steps_spin.value()), float(self.lr_spin.value()), self.device
        # The run folder name becomes the version name ("ft-<time>-step<N>"); the parent is in its metadata.
        out_dir = _settings.models_dir() / f"ft-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
        self.loss_plot.set_values([])

        def run(progress: Callable[[int, int, str], None], cancel: Any, log: Callable[[Any], None]) -> Dict[str, Any]:
            import torch

            from engine.train.finetune import finetune

            # No validation split: a handful of corrected cases is all there is to learn from; the
            # before/after Dice below is measured on these same cases and labelled as such.
            # CUDA graphs: each step replayed with one launch (fp32 paper preset on an H100: 215 -> 185 ms a
            # step, BENCHMARKS.md), no compilation to wait for; a capture that fails runs eagerly.
            graphs = device != "cpu" and torch.cuda.is_available()
            result = finetune(entry.path, store, out_dir, steps=steps, lr=lr, device=device, val_fraction=0.0,
                              cuda_graphs=graphs, progress=progress, cancel=cancel, on_log=log,
                              command=f"napari-mambahome fine-tune steps={steps} lr={lr}")
            cancel.raise_if_cancelled()
            return {"result": result, "dice": self._dice_before_after(entry, result, store, device, progress, cancel)}

        def on_log(record: Dict[str, Any]) -> None:
            if record.get("loss") is not None:
                self.loss_plot.append(float(record["loss"]))

        def on_progress(done: int, total: int, message: str) -> None:
            self.finetune_result.setText(f"{message} {done}/{total}" if total else message)

        def done(outcome: Dict[str, Any]) -> None:
            self._finetune_done(entry, outcome)

        def cancelled() -> None:
            shutil.rmtree(out_dir, ignore_errors=True)  # our own run folder; the selected model is untouched
            self.finetune_result.setText(f"fine-tuning cancelled; {entry.version} stays selected")

        return self._start_job(run, bar=self.finetune_progress, on_done=done, on_progress=on_progress,
                               on_log=on_log, on_cancelled=cancelled, what=f"fine-tuning {entry.version}")

    def _classes_agree(self, entry: ModelEntry, case_classes: List[str], root: Path) -> bool:
        """Whether to go on when the saved cases' classes differ from the model's (the user decides)."""
        from engine.train.parent import class_mapping

        try:
            mapping = class_mapping(entry.class_names, case_classes)
        except ValueError as exc:
            _notify_error(f"cannot fine-tune {entry.version} on the cases in {root}: {exc}")
            return False
        added = [case_classes[i] for i in range(1, len(case_classes)) if i not in mapping]
        dropped = [entry.class_names[i] for i in range(1, len(entry.class_names)) if i not in mapping.values()]
        if not added and not dropped:
            return True
        answer = QMessageBox.question(
            self, "Classes differ",
            f"The saved cases in {root} are labelled {case_classes[1:]} but {entry.version} segments "
            f"{entry.class_names[1:]}.\nClasses are matched by name: "
            + (f"new {added} start untrained; " if added else "")
            + (f"{dropped} will no longer be segmented; " if dropped else "")
            + "\nFine-tune anyway?",
            QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No, QMessageBox.StandardButton.No)
        if answer == QMessageBox.StandardButton.Yes:
            return True
        _notify_warning(f"fine-tuning not started: the cases in {root} are labelled {case_classes[1:]}, "
                        f"the model {entry.version} segments {entry.class_names[1:]}")
        return False

    def _dice_before_after(self, old: ModelEntry, result: Any, store: Any, device: str,
                           progress: Callable[[int, int, str], None], cancel: Any) -> Dict[str, float]:
        """Mean foreground Dice of the previous and the new model on the saved cases."""
        from engine.evaluation import dice_per_class
        from engine.inference import Predictor

        cases = store.list()
        total = 2 * len(cases)
        scores: Dict[str, List[float]] = {"before": [], "after": []}
        for k, (key, checkpoint) in enumerate((("before", old.path), ("after", result.best_checkpoint))):
            predictor = Predictor(checkpoint, device=device)
            labels = list(range(1, len(predictor.class_names)))
            for i, record in enumerate(cases):
                cancel.raise_if_cancelled()
                image, truth, _ = store.load(record.case_id)
                prediction = predictor.predict(image, modality=record.modality, cancel=cancel)
                per_class = dice_per_class(prediction.labels, np.asarray(truth.data), labels)
                values = [float(v) for v in per_class.values() if np.isfinite(v)]
                if values:
                    scores[key].append(float(np.mean(values)))
                progress(k * len(cases) + i + 1, total, f"Dice {key}: case {i + 1}/{len(cases)}")
        return {k: float(np.mean(v)) if v else float("nan") for k, v in scores.items()}

    def _finetune_done(self, old: ModelEntry, outcome: Dict[str, Any]) -> None:
        result, dice = outcome["result"], outcome["dice"]
        try:
            new = read_entry(Path(result.best_checkpoint), origin="fine-tuned")
        except ValueError as exc:
            _notify_error(f"fine-tuning wrote an unreadable model: {exc}")
            return
        self.dice_by_version.setdefault(old.version, dice["before"])
        self.dice_by_version[new.version] = dice["after"]
        self._add_entry(new, select=True)
        self.last_finetune = {"old": old.version, "new": new.version, "dice": dice, "result": result}
        self.finetune_result.setText(
            f"{new.version} selected. Dice on {len(self._case_store(ask=False).list())} saved case(s): "
            f"before {dice['before']:.3f} -> after {dice['after']:.3f}")

    def _refresh_versions(self) -> None:
        self.versions_list.clear()
        for entry in self.entries:
            dice = self.dice_by_version.get(entry.version)
            text = entry.label + (f"  Dice {dice:.3f}" if dice is not None else "")
            if entry is self.current_model:
                text = "● " + text
            self.versions_list.addItem(text)

    def _use_selected_version(self) -> None:
        row = self.versions_list.currentRow()
        if 0 <= row < len(self.entries):
            self.select_model(self.entries[row])

