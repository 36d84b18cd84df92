"""napari writer: a labels layer as NIfTI on its source image's grid.

The labels keep the source image's affine, header and shape (written by ``engine.io.save_volume``,
atomically). A labels layer with no source image is written with its ``scale`` as voxel spacing and
its ``translate`` as origin, and the user is told so.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

import numpy as np

from ._geometry import geometry_from_state, reference_volume


def nifti_path(path: str) -> Path:
    """``path`` with a NIfTI suffix (``.nii.gz`` added when it has neither ``.nii`` nor ``.nii.gz``)."""
    p = Path(path)
    if p.name.lower().endswith((".nii", ".nii.gz")):
        return p
    return p.with_name(p.name + ".nii.gz")


def write_labels(path: str, data: Any, meta: Dict[str, Any]) -> List[str]:
    """npe2 single-layer writer for labels layers.

    Args:
        path: target file; ``.nii.gz`` is appended when the name has no NIfTI suffix.
        data: the labels array (D, H, W), integer.
        meta: the layer state napari passes (``name``, ``scale``, ``translate``, ``metadata``).

    Returns:
        The written path, as napari expects.

    Raises:
        LayerGeometryError: the layer is not 3D, or its shape differs from its source image.
    """
    from engine.io import save_volume

    name = meta.get("name", Path(path).name)
    geometry = geometry_from_state(name, data, meta.get("metadata"), meta.get("scale", (1, 1, 1)),
                                   meta.get("translate", (0, 0, 0)))
    target = nifti_path(path)
    labels = np.asarray(data)
    save_volume(target, labels, reference_volume(geometry, labels))
    if geometry.notes:
        from napari.utils.notifications import show_info

        show_info(f"saved {target.name} without a source image: " + "; ".join(geometry.notes))
    return [str(target)]
