"""napari-mambahome engine: the Mamba-HoME model, data, training, fine-tuning, inference, metrics and CLI.

No Qt here. Public names are imported lazily so that ``import engine`` stays cheap for the napari plugin.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "ModelConfig": "engine.config",
    "MambaHoME": "engine.model.mambahome",
    "save_checkpoint": "engine.checkpoint",
    "load_checkpoint": "engine.checkpoint",
    "read_checkpoint_metadata": "engine.checkpoint",
    "CheckpointError": "engine.checkpoint",
    "import_official_checkpoint": "engine.official",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
