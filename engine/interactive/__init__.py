"""Interactive (promptable) segmentation: one object from points, boxes and scribbles, refined per prompt.

- :mod:`~engine.interactive.prompts`: prompts and :class:`InteractionError` (coordinates: voxel indices
  ``(i, j, k)`` of the volume as loaded).
- :mod:`~engine.interactive.encoding`: :class:`PromptEncoding`, the guidance channels (saved in the
  checkpoint under ``metadata["task"]``).
- :mod:`~engine.interactive.session`: :class:`InteractiveSession`, the API the napari panel, the server
  and the CLI use.
- :mod:`~engine.interactive.simulate` and :mod:`~engine.interactive.task`: training with simulated
  interactions (:class:`InteractiveTask`, the ``interactive`` training task).
- :mod:`~engine.interactive.robot`: the robot user, NoC metrics and ``mambahome evaluate-interactive``.
"""
from __future__ import annotations

from engine.lazy import lazy_exports

# Imported on first use: the napari plugin checks a checkpoint's prompt encoding on the GUI thread
# (engine.interactive.encoding needs no torch), and importing the session and the training task here would import
# torch, MONAI and the network code (seconds) with it.
_EXPORTS = {
    "InteractionError": "engine.interactive.prompts",
    "Prompt": "engine.interactive.prompts",
    "PromptEncoding": "engine.interactive.encoding",
    "render_guidance": "engine.interactive.encoding",
    "interactive_encoding": "engine.interactive.encoding",
    "InteractiveSession": "engine.interactive.session",
    "Update": "engine.interactive.session",
    "InteractiveTask": "engine.interactive.task",
    "make_interactive_task": "engine.interactive.task",
    "register": "engine.interactive.task",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
