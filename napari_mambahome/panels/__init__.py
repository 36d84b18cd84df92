"""The dock's panels, one file each, in the order the dock shows them.

A new section is one new module with a :class:`._base.Panel` subclass, added to :data:`PANELS`.
"""
from __future__ import annotations

from typing import List, Type

from ._base import Panel
from .cases import CasesPanel
from .contrast import ContrastPanel
from .correct import CorrectPanel
from .finetune import FinetunePanel
from .interactive import InteractivePanel
from .model import ModelPanel
from .segment import SegmentPanel

PANELS: List[Type[Panel]] = [ModelPanel, SegmentPanel, InteractivePanel, ContrastPanel, CorrectPanel, CasesPanel,
                             FinetunePanel]
"""Panel classes, top to bottom."""

__all__ = ["PANELS", "Panel"]
