"""Correction helpers for one class of a labels volume, applied as undoable napari edits.

Each helper is a pure function ``(labels, class_id, ...) -> new labels`` built on scipy.ndimage.
:func:`apply_to_layer` writes only the voxels that changed through ``Labels.data_setitem`` inside
``Labels.block_history()``, so one helper click is one entry in napari's own undo history
(Ctrl+Z / ``layer.undo()`` reverts it) and fires the layer's ``paint`` event like a brush stroke.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Tuple

import numpy as np

# scipy.ndimage (and engine.postprocess, which imports it) are imported by the helpers, not here: the Correct panel
# imports this module while the dock is built on napari's GUI thread, where importing scipy.ndimage froze the GUI
# 0.9-1.7 s (an annotator's walk). The dock's warm-up thread (:mod:`._warmup`) imports them ahead of a first click.


def _components(mask: np.ndarray):
    from scipy import ndimage

    # full connectivity, as in ITK-SNAP and 3D Slicer, for every helper here
    from engine.postprocess import FULL_CONNECTIVITY

    return ndimage.label(mask, structure=FULL_CONNECTIVITY)


def keep_largest_component(labels: np.ndarray, class_id: int) -> np.ndarray:
    """The engine's :func:`engine.postprocess.keep_largest_component` (predict --largest-component uses the same
    function), imported at the first call."""
    from engine.postprocess import keep_largest_component as engine_keep_largest

    return engine_keep_largest(labels, class_id)


def fill_holes(labels: np.ndarray, class_id: int) -> np.ndarray:
    """Give ``class_id`` to background voxels enclosed by it (3D hole filling).

    Voxels of other classes inside the class are left alone: a structure inside an organ is not a hole.

    Args:
        labels: (D, H, W) integer label map.
        class_id: the class whose holes are filled (> 0).
    """
    out = np.array(labels, copy=True)
    from scipy import ndimage

    mask = labels == class_id
    filled = ndimage.binary_fill_holes(mask)
    out[filled & ~mask & (labels == 0)] = class_id
    return out


def remove_small_islands(labels: np.ndarray, class_id: int, min_voxels: int) -> np.ndarray:
    """Set to background every connected piece of ``class_id`` smaller than ``min_voxels`` voxels.

    Args:
        labels: (D, H, W) integer label map.
        class_id: the class to clean (> 0).
        min_voxels: pieces with fewer voxels than this are removed.
    """
    out = np.array(labels, copy=True)
    components, count = _components(labels == class_id)
    if count == 0:
        return out
    sizes = np.bincount(components.ravel())
    small = sizes < int(min_voxels)
    small[0] = False
    out[small[components]] = 0
    return out


def clear_class(labels: np.ndarray, class_id: int) -> np.ndarray:
    """Set every voxel of ``class_id`` to background."""
    out = np.array(labels, copy=True)
    out[labels == class_id] = 0
    return out


HELPERS: Dict[str, Callable[..., np.ndarray]] = {
    "Keep largest component": keep_largest_component,
    "Fill holes": fill_holes,
    "Remove small islands": remove_small_islands,
    "Clear class": clear_class,
}
"""Button text -> helper, in the order the widget shows them."""


def edit_for(old: np.ndarray, new_labels: np.ndarray) -> Tuple[Tuple[np.ndarray, ...], np.ndarray]:
    """The voxels where ``new_labels`` differs from ``old`` and their new values (``old``'s dtype).

    Pure numpy: runs in a worker thread for big volumes (see the Correct panel), :func:`apply_edit` then writes it.
    """
    if old.shape != new_labels.shape:
        raise ValueError(f"labels have shape {old.shape}, the edit has {new_labels.shape}")
    changed = np.nonzero(old != new_labels)
    return changed, new_labels[changed].astype(old.dtype, copy=False)


def apply_edit(layer: Any, changed: Tuple[np.ndarray, ...], values: np.ndarray) -> int:
    """Write an edit of :func:`edit_for` into a napari Labels layer as one undoable edit (GUI thread).

    Returns:
        The number of voxels written (0 adds no undo entry).
    """
    if not changed or changed[0].size == 0:
        return 0
    with layer.block_history():
        layer.data_setitem(changed, values)
    return int(changed[0].size)


def apply_to_layer(layer: Any, new_labels: np.ndarray) -> int:
    """Write ``new_labels`` into a napari Labels layer as one undoable edit.

    Args:
        layer: a napari ``Labels`` layer whose data has ``new_labels.shape``.
        new_labels: the corrected label map.

    Returns:
        The number of voxels that changed (0 adds no undo entry).
    """
    old = np.asarray(layer.data)
    if old.shape != new_labels.shape:
        raise ValueError(f"labels layer '{layer.name}' has shape {old.shape}, the edit has {new_labels.shape}")
    return apply_edit(layer, *edit_for(old, new_labels))
