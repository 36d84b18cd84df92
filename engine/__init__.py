"""napari-mambahome engine: the Mamba-HoME model, data, training, fine-tuning, inference, metrics and CLI.

No Qt here. Public names are imported lazily so that ``import engine`` stays cheap for the napari plugin.
"""
from __future__ import annotations

from engine.lazy import lazy_exports

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

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
