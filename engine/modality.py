"""The modalities the engine knows (``CT``, ``MR``, ``US``, ``other``: each selects an intensity rule) and
:func:`normalize_modality`, which maps free-form names onto them.

Apart from :mod:`engine.preprocess` (which re-exports both) because that module imports torch and MONAI, seconds
of work: the napari plugin's panels and reader need only these names, on the GUI thread.
"""
from __future__ import annotations

from typing import Optional

MODALITIES = ("CT", "MR", "US", "other")

_MODALITY_ALIASES = {
    "CT": "CT", "CAT": "CT", "COMPUTED TOMOGRAPHY": "CT",
    "MR": "MR", "MRI": "MR", "T1": "MR", "T1W": "MR", "T2": "MR", "T2W": "MR", "FLAIR": "MR",
    "PD": "MR", "DWI": "MR", "ADC": "MR", "T1C": "MR", "T1CE": "MR", "T1GD": "MR", "MAGNETIC RESONANCE": "MR",
    "US": "US", "ULTRASOUND": "US",
    "OTHER": "other",
}


def normalize_modality(name: Optional[str]) -> str:
    """Map a free-form modality / channel name to one of ``CT``, ``MR``, ``US``, ``other``.

    ``"MRI"``, ``"T1"``, ``"T2w"``, ``"FLAIR"`` ... -> ``"MR"``; ``"ultrasound"`` -> ``"US"``;
    unknown names (e.g. ``"PET"``) -> ``"other"``.
    """
    if name is None:
        return "other"
    key = str(name).strip().upper().replace("-", "").replace("_", "")
    if key in _MODALITY_ALIASES:
        return _MODALITY_ALIASES[key]
    # nnU-Net channel names like "T1_MRI" or "MRI_T2"
    for token in ("MRI", "MR", "T1", "T2"):
        if token in key:
            return "MR"
    if "CT" == key[:2]:
        return "CT"
    return "other"
