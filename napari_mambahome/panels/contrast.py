"""Contrast panel: CT window presets and MR percentile contrast for the chosen image layer."""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import numpy as np
from qtpy.QtWidgets import QComboBox, QFormLayout, QHBoxLayout, QPushButton, QWidget

from .._session import Session
from ._base import Panel

CT_WINDOWS: Dict[str, Tuple[float, float]] = {
    "CT soft tissue (W400 L40)": (400.0, 40.0),
    "CT lung (W1500 L-600)": (1500.0, -600.0),
    "CT bone (W1800 L400)": (1800.0, 400.0),
    "CT brain (W80 L40)": (80.0, 40.0),
}
"""Preset name -> (window width, window level) in Hounsfield units."""

PERCENTILES: Dict[str, Tuple[float, float]] = {
    "MR 1-99 percentile": (1.0, 99.0),
    "MR 0.5-99.5 percentile": (0.5, 99.5),
}
"""Preset name -> (low, high) intensity percentiles (MR has no absolute unit)."""

_MAX_SAMPLES = 2_000_000  # percentiles of a strided sample: a 512x512x600 CT stays interactive


def window_limits(width: float, level: float) -> Tuple[float, float]:
    """Contrast limits ``(low, high)`` of a CT window of ``width`` HU centred at ``level`` HU."""
    return level - width / 2.0, level + width / 2.0


def percentile_limits(data: Any, low: float, high: float) -> Tuple[float, float]:
    """Contrast limits at the ``low`` and ``high`` percentiles of the non-zero voxels (air/background
    outside the body would pull the low end down), on a strided sample of large volumes."""
    flat = np.asarray(data).ravel()
    step = max(1, flat.size // _MAX_SAMPLES)
    sample = flat[::step]
    sample = sample[np.isfinite(sample)]  # an in-memory layer may hold NaN: the limits were "nan to nan"
    if not sample.size:
        return 0.0, 1.0
    body = sample[sample != 0]
    values = body if body.size else sample
    lo, hi = np.percentile(values, [low, high])
    if hi <= lo:
        hi = lo + 1.0
    return float(lo), float(hi)


class ContrastPanel(Panel):
    """A preset box and Apply: CT windows for CT images, percentile stretches for MR (and any image)."""

    name = "contrast"
    title = "Contrast"

    def __init__(self, session: Session, parent: Optional[QWidget] = None) -> None:
        super().__init__(session, parent)
        form = QFormLayout(self)
        self.preset_combo = QComboBox()
        self.preset_combo.addItems([*CT_WINDOWS, *PERCENTILES])
        self.apply_button = QPushButton("Apply")
        self.apply_button.clicked.connect(lambda *_: self.apply(self.preset_combo.currentText()))
        row = QHBoxLayout()
        row.addWidget(self.preset_combo, 1)
        row.addWidget(self.apply_button)
        form.addRow(row)
        session.image_changed.connect(self._suggest)
        session.modality_changed.connect(self._suggest)

    def _suggest(self, layer: Any) -> None:
        """Offer the presets of the image's modality first."""
        modality, _ = self.session.modality_of(layer)
        self.preset_combo.setCurrentText(next(iter(PERCENTILES if modality == "MR" else CT_WINDOWS)))

    def apply(self, preset: str) -> Optional[Tuple[float, float]]:
        """Set the chosen image layer's contrast limits by ``preset`` (a key of CT_WINDOWS or PERCENTILES).

        Returns:
            The limits set, or ``None`` when there is no image layer.
        """
        layer = self.session.image_layer
        if layer is None:
            self.session.error("open an image before choosing its contrast")
            return None
        if preset in CT_WINDOWS:
            limits = window_limits(*CT_WINDOWS[preset])
            modality, _ = self.session.modality_of(layer)
            if modality not in (None, "CT"):
                self.session.warning(f"'{layer.name}' is {modality}, not CT: a Hounsfield window may show nothing")
        else:
            limits = percentile_limits(layer.data, *PERCENTILES[preset])
        # the slider range must contain the window (a bone window reaches past a soft-tissue CT's range)
        lo_range, hi_range = layer.contrast_limits_range
        layer.contrast_limits_range = (min(lo_range, limits[0]), max(hi_range, limits[1]))
        layer.contrast_limits = list(limits)
        self.session.status.emit(f"'{layer.name}': {preset}, contrast {limits[0]:g} to {limits[1]:g}")
        return limits
