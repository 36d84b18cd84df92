"""The Mamba-HoME dock: one :class:`._session.Session` and the panels of :data:`.panels.PANELS`.

The dock only stacks the panels and shows the session's status line; what each section does lives in
its panel (:mod:`.panels`), the shared state and the job slot in the session, the computation in the
engine (segmentation :class:`engine.inference.Predictor`, cases :class:`engine.cases.CaseStore`,
fine-tuning :func:`engine.train.finetune.finetune`, scoring :func:`engine.evaluation.score_on_cases`).
"""
from __future__ import annotations

from typing import Any, Dict, Optional

from qtpy.QtCore import QEvent, Qt
from qtpy.QtWidgets import QLabel, QScrollArea, QVBoxLayout, QWidget

from ._session import Session
from .panels import PANELS, Panel

MIN_WIDTH = 420
"""Dock width (pixels) at which no button or label text is clipped."""


class MambaHoMEWidget(QWidget):
    """Dock widget driving the segment -> correct -> save case -> fine-tune loop.

    Args:
        napari_viewer: the viewer this widget acts on (napari passes it by this name).
        parent: Qt parent.

    Attributes:
        session: the :class:`._session.Session` the panels share (model, layers, job...).
        panels: panel name -> panel (``"model"``, ``"segment"``, ``"interactive"``, ``"contrast"``,
            ``"correct"``, ``"cases"``, ``"finetune"``).
        status_label: the status line: progress, results and every error in full.
    """

    def __init__(self, napari_viewer: Any, parent: Optional[QWidget] = None) -> None:
        super().__init__(parent)
        self.session = Session(napari_viewer, parent=self)
        self.viewer = self.session.viewer  # napari's own viewer, not the plugin proxy (see Session)
        # the session outlives Qt's deletion of this widget by a moment: stop callbacks and the job
        self.destroyed.connect(lambda *_, s=self.session: s.close())
        self._docked = parent is not None
        self.status_label = QLabel("")
        self.status_label.setWordWrap(True)
        self.status_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.session.status.connect(self.status_label.setText)

        inner = QWidget()
        layout = QVBoxLayout(inner)
        self.panels: Dict[str, Panel] = {}
        for panel_class in PANELS:
            panel = panel_class(self.session)
            self.panels[panel_class.name] = panel
            layout.addWidget(panel)
        layout.addStretch(1)
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)  # wrap, never scroll sideways
        scroll.setWidget(inner)
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        outer.addWidget(scroll, 1)
        outer.addWidget(self.status_label)
        self.setMinimumWidth(MIN_WIDTH)
        inner.setMinimumWidth(MIN_WIDTH - 24)  # the scroll bar's room: text wraps instead of being cut

        self.session.load_initial_models()
        if self.session.current_model is None:
            self.session.status.emit("no model: load a checkpoint (.safetensors) in the Model section")
        self.session.cases_changed.emit()
        # nibabel (a first File > Open) and scipy.ndimage (a first correction helper) imported in a thread now, not on
        # napari's GUI thread at the user's first action (see _warmup); last, so that it does not slow the build
        from ._warmup import start as start_warm_up

        start_warm_up()

    def event(self, event: QEvent) -> bool:
        """The dock's close button (napari's ``remove_dock_widget``) only takes this widget out of its dock, never
        deletes it: the session then ran on, a running Segment landed and asked to replace edited labels from a
        closed dock, and a dock opened again answered every layer event a second time. Taken out of the dock, the
        session closes (the job is cancelled, its result dropped) and the widget is deleted."""
        if event.type() == QEvent.Type.ParentChange:
            if self.parent() is not None:
                self._docked = True
            elif self._docked and self.session.alive:
                for panel in self.panels.values():
                    panel.dock_closing()
                self.session.close()
                self.deleteLater()
        return super().event(event)

    def panel(self, name: str) -> Panel:
        """The panel called ``name`` (see ``panels``)."""
        return self.panels[name]
