"""napari-mambahome: Mamba-HoME 3D segmentation in napari.

Open a CT/MR/US volume, segment it with a Mamba-HoME model, correct the labels with napari's tools
and the helpers in the dock widget, save the corrected case and fine-tune the model on your cases.
All computation lives in the ``engine`` package; this package is the napari front end (reader,
writer, sample data, dock widget) declared in ``napari.yaml``.
"""
from __future__ import annotations

__version__ = "0.1.0"

from ._reader import get_reader, read_volumes
from ._writer import write_labels

__all__ = ["MambaHoMEWidget", "get_reader", "read_volumes", "write_labels", "__version__"]


def __getattr__(name: str):
    # The widget imports Qt; reading and writing files must work without it.
    if name == "MambaHoMEWidget":
        from ._widget import MambaHoMEWidget

        return MambaHoMEWidget
    raise AttributeError(f"module 'napari_mambahome' has no attribute {name!r}")
