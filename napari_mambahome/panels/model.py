"""Model panel: choose the model version and the device, load a checkpoint file."""
from __future__ import annotations

from typing import Any, Optional

from qtpy.QtCore import Qt
from qtpy.QtWidgets import QComboBox, QFileDialog, QFormLayout, QLabel, QPushButton, QWidget

from .. import _remote_dialog
from .._jobs import Job, imported
from .._models import ModelEntry, known_backend_name, stored_parameter_count
from .._session import DEVICES, Session
from ._base import Panel

REMOTE = "Remote server…"
"""Device box entry that connects to a ``mambahome serve`` server (see :mod:`..remote`)."""


class ModelPanel(Panel):
    """The model version box, "Load checkpoint…", the device box and a description of the model."""

    name = "model"
    title = "Model"

    def __init__(self, session: Session, parent: Optional[QWidget] = None) -> None:
        super().__init__(session, parent)
        form = QFormLayout(self)
        self.model_combo = QComboBox()
        self.model_combo.currentIndexChanged.connect(self._combo_changed)
        self.load_model_button = QPushButton("Load checkpoint…")
        self.load_model_button.clicked.connect(self._ask_model_file)
        self.device_combo = QComboBox()
        self.device_combo.addItems([*DEVICES, REMOTE])
        self._device_text = self.device_combo.currentText()  # restored when a connection fails
        self._cuda_asked = 0  # counts device choices: the CUDA check answers only the choice that asked it
        self._cuda_job: Any = None
        self.device_combo.currentTextChanged.connect(self._device_changed)
        # choosing "Remote server…" again while connected points the dock at another server
        self.device_combo.textActivated.connect(
            lambda text: self._connect() if text == REMOTE and self._device_text == REMOTE else None)
        self.model_info = QLabel("no model: load a checkpoint (.safetensors)")
        self.model_info.setWordWrap(True)
        self.model_info.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        form.addRow("Version", self.model_combo)
        form.addRow(self.load_model_button)
        form.addRow("Device", self.device_combo)
        self.remote_label = QLabel("")
        self.remote_label.setWordWrap(True)
        form.addRow(self.remote_label)
        form.addRow(self.model_info)
        session.models_changed.connect(self._fill)
        session.model_changed.connect(self._show)
        session.busy_changed.connect(self._busy)
        session.remote_changed.connect(self._remote_changed)

    def _fill(self) -> None:
        self.model_combo.blockSignals(True)
        self.model_combo.clear()
        self.model_combo.addItems([entry.label for entry in self.session.entries])
        if self.session.current_model in self.session.entries:
            self.model_combo.setCurrentIndex(self.session.entries.index(self.session.current_model))
        self.model_combo.blockSignals(False)

    def _show(self, entry: ModelEntry) -> None:
        index = self.session.entries.index(entry)
        if self.model_combo.currentIndex() != index:
            self.model_combo.blockSignals(True)
            self.model_combo.setCurrentIndex(index)
            self.model_combo.blockSignals(False)
        remote = self.session.remote is not None and self.session.remote.owns(entry)
        backend = None if remote else known_backend_name()
        self.model_info.setText(entry.summary(None if remote else stored_parameter_count(entry.path), backend))
        self.model_info.setToolTip(str(entry.path))

    def _combo_changed(self, index: int) -> None:
        if 0 <= index < len(self.session.entries):
            self.session.select_model(self.session.entries[index])

    def _ask_model_file(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Load a Mamba-HoME checkpoint", "",
                                              "Mamba-HoME checkpoints (*.safetensors);;All files (*)")
        if path:
            self.session.load_model_file(path)

    def _set_device_text(self, text: str) -> None:
        self.device_combo.blockSignals(True)
        self.device_combo.setCurrentText(text)
        self.device_combo.blockSignals(False)
        self._device_text = text

    def _device_changed(self, text: str) -> None:
        if text == REMOTE:
            self._connect()
            return
        if self.session.remote is not None:
            self.session.disconnect_remote()
        self._cuda_asked += 1  # a check still running for an earlier choice must not change this one
        if DEVICES.get(text) == "cuda":
            if not imported("torch"):
                self._check_cuda(text)
                return
            import torch

            if not torch.cuda.is_available():
                self._no_cuda()
                return
        self.session.set_device(DEVICES[text])
        self._device_text = text

    def _no_cuda(self) -> None:
        self.session.warning("no CUDA GPU is available on this machine; segmenting on the CPU (device auto)")
        self.device_combo.setCurrentText("auto")

    def _check_cuda(self, text: str) -> None:
        """Ask torch whether CUDA works in a worker: importing torch takes seconds, which the GUI thread must not
        spend (nor race a job's import of it). Until the answer the device is "auto", which is the GPU when there
        is one; without one the choice goes back to "auto" with the same warning as before."""
        asked = self._cuda_asked
        self.session.set_device("auto")
        self._device_text = text

        def run(progress: Any, cancel: Any) -> bool:
            import torch  # imported (under the plugin's import lock) by the Job before this runs

            return bool(torch.cuda.is_available())

        def answered(available: Any) -> None:
            if not self.session.alive or asked != self._cuda_asked or self.device_combo.currentText() != text:
                return
            if available is True:
                self.session.set_device("cuda")
            else:
                self._no_cuda()

        self._cuda_job = Job(run, on_done=answered, on_error=lambda exc: answered(False), parent=self).start()

    def _connect(self) -> None:
        """Ask for the server and connect in a worker; any failure goes back to the previous device."""
        previous = self._device_text
        answer = _remote_dialog.ask_connection(self)
        if answer is None:
            self._set_device_text(previous)
            return

        def result(ok: bool) -> None:
            if ok:
                self._device_text = REMOTE
            else:
                self._set_device_text(previous if previous != REMOTE or self.session.remote else "auto")

        if self.session.connect_remote(*answer, on_result=result) is None:
            self._set_device_text(previous)

    def _remote_changed(self, backend: object) -> None:
        self.remote_label.setText(f"connected to the {backend.describe()}" if backend is not None else "")
        self.load_model_button.setEnabled(backend is None and not self.session.busy)
        if backend is None and self.device_combo.currentText() == REMOTE:
            self._set_device_text("auto")
            self.session.set_device("auto")

    def _busy(self, busy: bool) -> None:
        for widget in (self.model_combo, self.device_combo):
            widget.setEnabled(not busy)
        self.load_model_button.setEnabled(not busy and self.session.remote is None)
        entry = self.session.current_model
        if not busy and entry in self.session.entries and "Mamba backend" not in self.model_info.text():
            self._show(entry)  # a job may have imported the model code: the backend can be told now
