"""A fine-tuned model's per-class scores as every client shows them: napari's Fine-tune table and the 3D Slicer
module's status line.

Here, in the pure-Python client package, because the Slicer module imports nothing from the engine; the napari
plugin reads the same rows. The scores are :func:`engine.scoring.before_after`'s ``before``/``after``
(``{class name: Dice}``), sent by a server in its fine-tune job's ``scores``.
"""
from __future__ import annotations

from typing import List, Mapping, Optional, Tuple


def score_cell(scores: Optional[Mapping[str, float]], name: str) -> str:
    """One class's score as shown: three decimals, ``"n/a"`` where that model was not scored on the class (a class
    only one of the two models knows, or no model compared with)."""
    value = (scores or {}).get(name)
    return "n/a" if value is None else f"{float(value):.3f}"


def per_class_rows(before: Optional[Mapping[str, float]],
                   after: Optional[Mapping[str, float]]) -> List[Tuple[str, str, str]]:
    """``(class, before, after)`` as text, one row per class scored on either side, by class name.

    Args:
        before: ``{class: Dice}`` of the model compared with (empty or None: none).
        after: ``{class: Dice}`` of the new model.
    """
    names = sorted(set(before or {}) | set(after or {}))
    return [(name, score_cell(before, name), score_cell(after, name)) for name in names]


def per_class_text(before: Optional[Mapping[str, float]], after: Optional[Mapping[str, float]]) -> str:
    """The rows of :func:`per_class_rows` on one line, before -> after: ``"anterior: 0.812 -> 0.845; posterior:
    0.700 -> 0.731"``; with nothing compared with (``before`` empty), the new model's alone: ``"anterior: 0.845"``;
    ``""`` when no class was scored."""
    rows = per_class_rows(before, after)
    if not before:
        return "; ".join(f"{name}: {new}" for name, _, new in rows)
    return "; ".join(f"{name}: {old} -> {new}" for name, old, new in rows)
