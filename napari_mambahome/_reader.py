"""napari reader: NIfTI (and, with ITK installed, NRRD/MHA) volumes as layers that keep their geometry.

Reading and validation belong to :mod:`engine.io`; this module only turns an ``engine.io.Volume``
into napari layer data (``scale`` = spacing, ``translate`` = origin, affine and header in metadata).
"""
from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ._geometry import layer_kwargs

PathLike = Union[str, os.PathLike]
LayerData = Tuple[Any, Dict[str, Any], str]

SUFFIXES = (".nii", ".nii.gz")
# What engine.io reads through MONAI's LoadImage besides NIfTI, and the package each format needs.
OTHER_SUFFIXES = {".nrrd": ("itk", "nrrd"), ".mha": ("itk",), ".mhd": ("itk",)}
# File names that name a segmentation rather than an image (nnU-Net/MSD/TotalSegmentator habits).
_LABEL_NAME = re.compile(r"(^|[_\-.])(label|labels|seg|segmentation|mask|gt|truth)([_\-.]|$)", re.IGNORECASE)
_LABEL_FOLDERS = {"labelstr", "labelsts", "labels", "masks", "segmentations"}


def _stem(path: Path) -> str:
    name = path.name
    for suffix in sorted((*SUFFIXES, *OTHER_SUFFIXES), key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def is_label_file(path: PathLike) -> bool:
    """Whether a file is a segmentation by its name or folder (``*_label*``, ``labelsTr/``...)."""
    p = Path(path)
    return bool(_LABEL_NAME.search(_stem(p))) or p.parent.name.lower() in _LABEL_FOLDERS


def _readable(path: PathLike) -> bool:
    name = str(path).lower()
    if name.endswith(SUFFIXES):
        return True
    for suffix, packages in OTHER_SUFFIXES.items():
        if name.endswith(suffix):
            # Without a reader package another napari plugin may open the file; do not claim it.
            return any(importlib.util.find_spec(pkg) is not None for pkg in packages)
    return False


def get_reader(path: Union[PathLike, Sequence[PathLike]]) -> Optional[Callable[..., List[LayerData]]]:
    """npe2 reader contribution: :func:`read_volumes` for NIfTI (and NRRD/MHA when ITK is installed)."""
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    if not paths or not all(_readable(p) for p in paths):
        return None
    return read_volumes


def read_volumes(path: Union[PathLike, Sequence[PathLike]]) -> List[LayerData]:
    """Read one or more NIfTI files into napari layer data.

    Args:
        path: a file or a list of files.

    Returns:
        ``[(data, kwargs, "image" | "labels"), ...]`` with data in file voxel order (D, H, W),
        ``scale`` = spacing, ``translate`` = origin and the source Volume in
        ``kwargs["metadata"]["mambahome"]``.

    Raises:
        engine.io.VolumeError: a file is unreadable or not a 3D volume (message names the file).
    """
    from engine.io import load_label, load_volume

    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    layers: List[LayerData] = []
    for p in paths:
        p = Path(p)
        name = _stem(p)
        if is_label_file(p):
            volume = load_label(p)
            kwargs = layer_kwargs(volume, name)
            layers.append((np.asarray(volume.data), kwargs, "labels"))
        else:
            volume = load_volume(p)
            kwargs = layer_kwargs(volume, name)
            kwargs.update(_contrast(volume.data))
            layers.append((volume.data, kwargs, "image"))
        notes = list(getattr(volume, "notes", None) or [])
        if notes:
            from napari.utils.notifications import show_warning

            show_warning(f"{p.name}: " + "; ".join(notes))
    return layers


def _contrast(data: np.ndarray) -> Dict[str, Any]:
    """Display settings: robust contrast limits so a CT with air and metal is not all grey."""
    finite = np.asarray(data, dtype=np.float32)
    lo, hi = np.percentile(finite, [0.5, 99.5]) if finite.size else (0.0, 1.0)
    if not hi > lo:
        hi = lo + 1.0
    return {"contrast_limits": (float(lo), float(hi)), "colormap": "gray"}
