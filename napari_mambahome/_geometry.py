"""Geometry between engine volumes and napari layers.

A napari layer places voxel ``i`` at ``scale * i + translate``. A NIfTI volume places it at
``affine @ [i, 1]``. The layer keeps the file's voxel order (engine convention), uses the voxel
spacing as ``scale`` and, as ``translate``, the affine's origin expressed in the volume's own axis
frame (the direction-cosine matrix transposed onto the origin). Images with the same orientation then
overlay exactly in napari, whatever their spacing or origin, and nothing is resampled.

The full affine and the source :class:`engine.io.Volume` (which carries the header, not JSON
serialisable) travel in ``layer.metadata[META_KEY]`` so a labels layer can be written back on the
exact grid of its image.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

META_KEY = "mambahome"
"""Key of the plugin's entry in ``layer.metadata``."""


class LayerGeometryError(ValueError):
    """A layer cannot be used as a 3D volume (2D, RGB, shape mismatch with its image)."""


@dataclass
class LayerGeometry:
    """Where a layer's voxels sit, recovered from its metadata or (failing that) its scale.

    Attributes:
        affine: (4, 4) voxel-to-world matrix used for writing.
        spacing: voxel size along the array axes, in mm.
        shape: array shape of the source image.
        reference: the source ``engine.io.Volume`` when the layer came from a file, else ``None``.
        notes: user-facing remarks (for example "no spacing known, assumed 1 mm").
    """

    affine: np.ndarray
    spacing: Tuple[float, ...]
    shape: Tuple[int, ...]
    reference: Any = None
    notes: List[str] = field(default_factory=list)


def scale_translate(affine: np.ndarray, spacing: Tuple[float, ...]) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """Napari ``scale`` and ``translate`` for a volume.

    Args:
        affine: (4, 4) voxel-to-world matrix.
        spacing: voxel size along the three array axes.

    Returns:
        ``(scale, translate)``, each of length 3.
    """
    affine = np.asarray(affine, dtype=float)
    spacing_arr = np.asarray(spacing, dtype=float)
    # Columns of the linear part divided by their length are the axis directions in world space;
    # projecting the origin on them gives the origin in the volume's own (possibly flipped) frame.
    directions = affine[:3, :3] / np.where(spacing_arr > 0, spacing_arr, 1.0)
    translate = directions.T @ affine[:3, 3]
    return tuple(float(s) for s in spacing_arr), tuple(float(t) for t in translate)


def volume_metadata(volume: Any, modality: Optional[str] = None) -> Dict[str, Any]:
    """The ``layer.metadata`` entry for a layer made from ``volume`` (an ``engine.io.Volume``)."""
    meta: Dict[str, Any] = {
        "affine": np.asarray(volume.affine, dtype=float).tolist(),
        "spacing": [float(s) for s in volume.spacing],
        "shape": [int(s) for s in np.shape(volume.data)],
        "path": str(volume.path) if getattr(volume, "path", None) else None,
        "volume": volume,
    }
    if modality:
        meta["modality"] = modality
    return {META_KEY: meta}


def layer_kwargs(volume: Any, name: str, modality: Optional[str] = None) -> Dict[str, Any]:
    """Keyword arguments for ``viewer.add_image``/``add_labels`` that keep the volume's geometry."""
    scale, translate = scale_translate(volume.affine, volume.spacing)
    return {
        "name": name,
        "scale": scale,
        "translate": translate,
        "metadata": volume_metadata(volume, modality),
    }


def layer_geometry(layer: Any) -> LayerGeometry:
    """Recover the source geometry of an image or labels layer.

    Args:
        layer: a napari Image or Labels layer with 3D data.

    Returns:
        The geometry; without plugin metadata, the affine is built from the layer's scale and
        translate and ``notes`` says so.

    Raises:
        LayerGeometryError: the layer is not a 3D scalar volume, or its shape differs from the
            source image it claims to belong to.
    """
    return geometry_from_state(layer.name, layer.data, layer.metadata, layer.scale, layer.translate,
                               rgb=bool(getattr(layer, "rgb", False)))


def geometry_from_state(name: str, data: Any, metadata: Optional[Dict[str, Any]], scale: Any, translate: Any,
                        rgb: bool = False) -> LayerGeometry:
    """:func:`layer_geometry` from a layer's parts (what a napari writer receives as ``meta``)."""
    shape = tuple(int(s) for s in np.shape(data))
    if rgb:
        raise LayerGeometryError(
            f"layer '{name}' is an RGB image {shape}; Mamba-HoME segments 3D grey-value volumes")
    if len(shape) != 3:
        raise LayerGeometryError(
            f"layer '{name}' has {len(shape)} dimensions {shape}; Mamba-HoME needs a 3D volume")
    meta = (metadata or {}).get(META_KEY)
    if meta and "affine" in meta:
        source_shape = tuple(int(s) for s in meta.get("shape", shape))
        if source_shape != shape:
            source = meta.get("path") or "its source image"
            raise LayerGeometryError(
                f"layer '{name}' has shape {shape} but {source} has shape {source_shape}; "
                "it cannot be placed on that image's grid")
        return LayerGeometry(
            affine=np.asarray(meta["affine"], dtype=float),
            spacing=tuple(float(s) for s in meta["spacing"]),
            shape=shape,
            reference=meta.get("volume"),
        )
    notes: List[str] = []
    scale_t = tuple(float(s) for s in np.asarray(scale)[-3:])
    translate_t = tuple(float(t) for t in np.asarray(translate)[-3:])
    if all(s == 1.0 for s in scale_t):
        notes.append(f"layer '{name}' carries no voxel spacing; assuming 1 mm isotropic voxels")
    else:
        notes.append(f"layer '{name}' has no source file geometry; using its scale {scale_t} as spacing")
    affine = np.eye(4)
    affine[:3, :3] = np.diag(scale_t)
    affine[:3, 3] = translate_t
    return LayerGeometry(affine=affine, spacing=scale_t, shape=shape, notes=notes)


def reference_volume(geometry: LayerGeometry, data: Any) -> Any:
    """The ``engine.io.Volume`` that defines the grid ``data`` is written on.

    Args:
        geometry: from :func:`layer_geometry`.
        data: the array to be written, shape ``geometry.shape``.

    Returns:
        The source file's Volume when known (its affine and header are kept on writing), else a
        header-less Volume built from the layer's spacing and origin.
    """
    from engine.io import Volume

    if geometry.reference is not None:
        return geometry.reference
    return Volume(data=np.asarray(data), affine=geometry.affine, spacing=geometry.spacing, header=None, path=None)


def image_volume(layer: Any, geometry: Optional[LayerGeometry] = None) -> Any:
    """An ``engine.io.Volume`` holding an image layer's current data on its source grid.

    Args:
        layer: a napari Image layer with 3D data (D, H, W) in file voxel order.
        geometry: from :func:`layer_geometry`, computed if not given.
    """
    from engine.io import Volume

    geometry = geometry or layer_geometry(layer)
    data = np.asarray(layer.data)
    ref = geometry.reference
    if ref is not None and ref.data is data:
        return ref
    return Volume(data=data, affine=geometry.affine, spacing=geometry.spacing,
                  header=getattr(ref, "header", None), path=getattr(ref, "path", None))
