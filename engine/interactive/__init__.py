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

from engine.interactive.encoding import PromptEncoding, render_guidance
from engine.interactive.prompts import InteractionError, Prompt
from engine.interactive.session import InteractiveSession, Update, interactive_encoding
from engine.interactive.task import InteractiveTask, make_interactive_task, register

__all__ = ["InteractionError", "InteractiveSession", "InteractiveTask", "Prompt", "PromptEncoding", "Update",
           "interactive_encoding", "make_interactive_task", "register", "render_guidance"]

register()
