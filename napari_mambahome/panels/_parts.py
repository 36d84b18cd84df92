"""Small Qt pieces the panels use: a class legend, a label that wraps without being cut, a live loss sparkline."""
from __future__ import annotations

from typing import Any, List, Optional, Sequence

import numpy as np
from qtpy.QtCore import QPointF, Qt
from qtpy.QtGui import QColor, QPainter, QPainterPath, QPen
from qtpy.QtWidgets import QLabel, QSizePolicy, QWidget


def _hex(rgba: Sequence[float]) -> str:
    r, g, b = (int(round(255 * float(c))) for c in list(rgba)[:3])
    return f"#{r:02x}{g:02x}{b:02x}"


class Legend(QLabel):
    """Class names with the colours the labels layer draws them in."""

    def __init__(self, parent: Optional[QWidget] = None) -> None:
        super().__init__(parent)
        self.setTextFormat(Qt.TextFormat.RichText)
        self.setWordWrap(True)
        self.entries: List[tuple] = []

    def show_layer(self, layer: Any, class_names: Sequence[str]) -> None:
        """List ``class_names`` (index = label value) coloured as in ``layer`` (a napari Labels layer)."""
        self.entries = []
        for value, name in enumerate(class_names):
            if value == 0:
                continue
            colour = np.asarray(layer.get_color(value), dtype=float)
            self.entries.append((value, str(name), _hex(colour)))
        rows = [f'<span style="background-color:{c}">&nbsp;&nbsp;&nbsp;&nbsp;</span>&nbsp;{v}: {n}'
                for v, n, c in self.entries]
        self.setText("<br>".join(rows))

    def clear_legend(self) -> None:
        self.entries = []
        self.setText("")


class WrappedLabel(QLabel):
    """A word-wrapped label whose row is as tall as its wrapped text.

    Qt's form and box layouts do not ask a label in a scroll area for its height at its width: a line that wraps to
    two kept the height of one, and its second line was cut at the bottom of its section (the Interactive section's
    count line in a 1600x1000 window). The label's minimum height follows its wrapped text at its current width.
    """

    def __init__(self, text: str = "", parent: Optional[QWidget] = None) -> None:
        super().__init__(text, parent)
        self.setWordWrap(True)

    def _fit(self) -> None:
        width = self.width() if self.width() > 0 else self.sizeHint().width()
        needed = self.heightForWidth(width)
        if needed > 0 and needed != self.minimumHeight():
            self.setMinimumHeight(needed)

    def setText(self, text: str) -> None:  # noqa: N802 - Qt naming
        super().setText(text)
        self._fit()

    def resizeEvent(self, event: Any) -> None:  # noqa: N802 - Qt naming
        super().resizeEvent(event)
        self._fit()


class LossPlot(QWidget):
    """A sparkline of the training loss, redrawn as values arrive (no plotting library needed)."""

    def __init__(self, parent: Optional[QWidget] = None) -> None:
        super().__init__(parent)
        self.values: List[float] = []
        self.setMinimumHeight(60)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)

    def set_values(self, values: Sequence[float]) -> None:
        self.values = [float(v) for v in values if np.isfinite(v)]
        self.update()

    def append(self, value: float) -> None:
        if np.isfinite(value):
            self.values.append(float(value))
            self.update()

    def paintEvent(self, event: Any) -> None:  # noqa: N802 - Qt naming
        painter = QPainter(self)
        painter.setRenderHint(QPainter.RenderHint.Antialiasing)
        rect = self.rect().adjusted(4, 4, -4, -14)
        painter.setPen(QPen(QColor(120, 120, 120), 1))
        painter.drawRect(rect)
        if len(self.values) >= 1:
            lo, hi = min(self.values), max(self.values)
            span = hi - lo if hi > lo else 1.0
            n = max(len(self.values) - 1, 1)
            path = QPainterPath()
            for i, v in enumerate(self.values):
                x = rect.left() + rect.width() * i / n
                y = rect.bottom() - rect.height() * (v - lo) / span
                path.moveTo(QPointF(x, y)) if i == 0 else path.lineTo(QPointF(x, y))
            painter.setPen(QPen(QColor(80, 170, 255), 2))
            painter.drawPath(path)
            painter.setPen(QPen(QColor(180, 180, 180), 1))
            painter.drawText(rect.left(), self.height() - 2,
                             f"loss {self.values[-1]:.3f}  (min {lo:.3f}, step {len(self.values)})")
        painter.end()
