"""napari's own undo and redo of a Labels layer, seen by the plugin.

napari emits ``Labels.events.paint`` for every brush, fill, erase or ``data_setitem`` edit (one history item), but
nothing when ``layer.undo()`` / ``layer.redo()`` (Ctrl+Z / Ctrl+Shift+Z in the layer, the Correct section's Undo)
replays an item backwards or forwards. :func:`watch_history` makes a layer's ``undo`` and ``redo`` emit
``layer.events.<HISTORY_EVENT>(value=atoms, undoing=bool)`` after the data was changed, with the atoms of the item
in the order they were first applied (the same atoms the paint event carried), so whoever mirrors the layer's
edits (the Interactive section's labels under the current object) can replay them too.
"""
from __future__ import annotations

from typing import Any, List, Optional, Tuple

import numpy as np

HISTORY_EVENT = "mambahome_history"
"""Name of the event :func:`watch_history` adds to a Labels layer's ``events``."""


def _top(layer: Any, name: str) -> Optional[List[Any]]:
    stack = getattr(layer, name, None)
    try:
        return list(stack[-1]) if stack else None
    except (TypeError, IndexError):  # another napari's history: no event rather than a wrong one
        return None


def watch_history(layer: Any) -> Any:
    """Make ``layer.undo()`` and ``layer.redo()`` emit ``layer.events.mambahome_history`` (once per layer).

    Returns:
        The event emitter (connect a callback taking the event: ``event.value`` the item's atoms in the order they
        were first applied, ``event.undoing`` whether they were just taken back).
    """
    emitter = getattr(layer.events, HISTORY_EVENT, None)
    if emitter is not None:
        return emitter
    layer.events.add(**{HISTORY_EVENT: None})
    emitter = getattr(layer.events, HISTORY_EVENT)
    undo, redo = layer.undo, layer.redo  # the class's bound methods

    def undone() -> None:
        item = _top(layer, "_undo_history")
        undo()
        if item:
            emitter(value=item, undoing=True)

    def redone() -> None:
        item = _top(layer, "_redo_history")  # napari keeps an undone item reversed on the redo stack
        redo()
        if item:
            emitter(value=list(reversed(item)), undoing=False)

    # instance attributes: napari's Ctrl+Z keybinding and every panel call ``layer.undo()``, which finds them first
    layer.undo, layer.redo = undone, redone
    return emitter


def atom_region(atom: Any) -> Any:
    """``(key, mask)`` of a history atom: napari >= 0.6 records a stroke as ``_MaskedPaintAtom`` (bounding box,
    changed-voxel mask or None, old values, label), ``data_setitem`` and earlier versions as
    ``(indices, old, new)`` (mask None: ``key`` indexes the voxels directly)."""
    key = getattr(atom, "slice_key", None)
    if key is not None:
        return key, getattr(atom, "mask", None)
    return atom[0], None


def atom_parts(atom: Any) -> List[Any]:
    """The arrays a history atom holds (to count the memory a kept atom costs)."""
    if getattr(atom, "slice_key", None) is not None:
        return [part for part in (atom.mask, atom.old_values) if part is not None]
    return [*atom[0], atom[1], atom[2]]


def atom_values(atom: Any, undoing: bool) -> Any:
    """The values an atom leaves at its voxels: the old ones when undone, the new ones when (re)done."""
    if getattr(atom, "slice_key", None) is not None:
        return atom.old_values if undoing else atom.new_value
    return atom[1] if undoing else atom[2]


def set_old_values(atom: Any, old: Any) -> bool:
    """Make a history atom remember ``old`` (the shape :func:`read_at` returns) as the values it replaced, in place:
    the atom stays the same object, which whoever follows the history knows it by. False if its arrays do not take
    them (another shape)."""
    values = atom.old_values if getattr(atom, "slice_key", None) is not None else atom[1]
    if not isinstance(values, np.ndarray) or np.shape(values) != np.shape(old):
        return False
    np.copyto(values, old, casting="unsafe")
    return True


def read_at(array: Any, atom: Any) -> Any:
    """A copy of ``array``'s values at the atom's voxels (the shape :func:`write_at` takes back)."""
    key, mask = atom_region(atom)
    return (array[key] if mask is None else array[key][mask]).copy()


def write_at(array: Any, atom: Any, values: Any) -> None:
    """Write ``values`` at the atom's voxels of ``array`` (a numpy array of the layer's shape)."""
    key, mask = atom_region(atom)
    if mask is None:
        array[key] = values
    else:
        array[key][mask] = values  # basic slicing: a view, the masked write lands in ``array``


def record_applied_edit(layer: Any, key: Tuple[slice, ...], changed: np.ndarray, old_values: np.ndarray,
                        new_value: int) -> Any:
    """Put an edit already written into ``layer.data`` onto the layer's undo history as one item, as napari's brush
    records a stroke, so ``layer.undo()`` (Ctrl+Z) takes it back and ``layer.redo()`` brings it back.

    Args:
        layer: a napari Labels layer holding a numpy array.
        key: the edit's bounding box (display order). changed: bool mask of the voxels it changed inside ``key``.
        old_values: their values before it (1D, ``changed``'s true voxels in C order). new_value: the one label
            it wrote there.

    Returns:
        The history atom (the layer's paint event carries it too), or ``None`` when nothing changed.
    """
    if not changed.any():
        return None
    try:  # napari >= 0.6: a box and a mask, cheap to record and to replay for a large object
        from napari.layers.labels.labels import _MaskedPaintAtom
    except ImportError:
        _MaskedPaintAtom = None
    if _MaskedPaintAtom is not None and hasattr(layer, "_save_history"):
        atom = _MaskedPaintAtom(tuple(key), changed, np.asarray(old_values), int(new_value))
        layer._save_history(atom)  # emits the layer's paint event with the new item, as a brush stroke does
        return atom
    # older napari records its public write, data_setitem: take the edit out unseen and write it back through it
    region = layer.data[key]
    region[changed] = old_values
    indices = tuple(i + (k.start or 0) for i, k in zip(np.nonzero(changed), key))
    layer.data_setitem(indices, int(new_value))
    top = _top(layer, "_undo_history")
    return top[-1] if top else None
