"""Label-map post-processing shared by prediction and the napari correction tools.

Connectivity is full (face, edge or corner neighbours are one object), as in ITK-SNAP and 3D Slicer, so
a component here is the object a user sees in those tools.
"""
from __future__ import annotations

from typing import Iterable, Optional

import numpy as np
from scipy import ndimage

FULL_CONNECTIVITY = ndimage.generate_binary_structure(3, 3)


def keep_largest_component(labels: np.ndarray, class_id: int) -> np.ndarray:
    """Set to background every voxel of ``class_id`` outside its largest connected component.

    Args:
        labels: ``(I, J, K)`` integer label map.
        class_id: the class to clean (> 0).

    Returns:
        A new label map of the same shape and dtype.
    """
    out = np.array(labels, copy=True)
    components, count = ndimage.label(labels == class_id, structure=FULL_CONNECTIVITY)
    if count <= 1:
        return out
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    out[(components > 0) & (components != int(np.argmax(sizes)))] = 0
    return out


def keep_largest_per_class(labels: np.ndarray, class_ids: Optional[Iterable[int]] = None) -> np.ndarray:
    """:func:`keep_largest_component` for every class present (or for ``class_ids``).

    Args:
        labels: ``(I, J, K)`` integer label map.
        class_ids: classes to clean; default every non-zero value in ``labels``.

    Returns:
        A new label map of the same shape and dtype.
    """
    ids = [int(c) for c in (class_ids if class_ids is not None else np.unique(labels)) if int(c) > 0]
    out = np.asarray(labels)
    for class_id in ids:
        out = keep_largest_component(out, class_id)
    return np.array(out, copy=True) if out is labels else out
