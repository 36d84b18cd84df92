"""Geometry between engine volumes and napari layers.

A napari layer places voxel ``i`` at ``scale * i + translate``. A volume file places it at
``affine @ [i, 1]`` (RAS mm). Layers opened by the reader show a **radiological view**: the file's
array is presented, without resampling or copying, as a numpy view with its axes permuted and
flipped to the closest canonical axes in display order (:data:`DISPLAY_AXCODES`: axis 0 runs
inferior -> superior, so the slider steps through axial slices; rows run anterior -> posterior;
columns run patient right -> left, so the patient's right is on the screen's left as in 3D Slicer
and ITK-SNAP). The layer's ``scale`` is the voxel spacing along the displayed axes and its
``translate`` the origin expressed in their (possibly oblique) frame, so images of one patient
overlay in napari whatever their spacing, origin or voxel order.

The exact permutation and flips travel in ``layer.metadata[META_KEY]["display"]`` (a
:class:`DisplayTransform`), with the file's affine and shape and the source
:class:`engine.io.Volume` (not JSON serialisable), so :func:`layer_geometry` maps a layer (image or
labels) back to the file's exact voxel grid for the engine and for writing. Layers without a
``display`` entry are in file voxel order (the identity transform).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

META_KEY = "mambahome"
"""Key of the plugin's entry in ``layer.metadata``."""

DISPLAY_AXCODES = ("S", "P", "L")
"""World direction (nibabel axis codes) each displayed layer axis increases toward."""


@dataclass(frozen=True)
class DisplayTransform:
    """An exact axis permutation + flips between a file's voxel array and a layer's.

    ``layer = flip(transpose(file, order), axes where flip is True)``; both ways are numpy views.

    Attributes:
        order: ``order[a]`` is the file axis shown as layer axis ``a``.
        flip: whether layer axis ``a`` runs opposite to file axis ``order[a]``.
    """

    order: Tuple[int, int, int] = (0, 1, 2)
    flip: Tuple[bool, bool, bool] = (False, False, False)

    @property
    def is_identity(self) -> bool:
        return tuple(self.order) == (0, 1, 2) and not any(self.flip)

    def _flip_axes(self) -> Tuple[int, ...]:
        return tuple(a for a, f in enumerate(self.flip) if f)

    def to_display(self, array: Any) -> np.ndarray:
        """File-order ``(I, J, K)`` array -> layer-order view."""
        return np.flip(np.transpose(np.asarray(array), self.order), self._flip_axes())

    def to_file(self, array: Any) -> np.ndarray:
        """Layer-order array -> file-order ``(I, J, K)`` view (the inverse of :meth:`to_display`)."""
        return np.transpose(np.flip(np.asarray(array), self._flip_axes()), np.argsort(self.order))

    def display_shape(self, file_shape: Tuple[int, ...]) -> Tuple[int, ...]:
        return tuple(int(file_shape[i]) for i in self.order)

    def display_affine(self, affine: np.ndarray, file_shape: Tuple[int, ...]) -> np.ndarray:
        """Voxel-to-world matrix of the layer's voxels, given the file's ``affine`` and shape."""
        layer_to_file = np.zeros((4, 4))
        layer_to_file[3, 3] = 1.0
        for a, (i, f) in enumerate(zip(self.order, self.flip)):
            layer_to_file[i, a] = -1.0 if f else 1.0
            layer_to_file[i, 3] = float(file_shape[i] - 1) if f else 0.0
        return np.asarray(affine, dtype=float) @ layer_to_file

    def as_dict(self) -> Dict[str, Any]:
        return {"order": [int(i) for i in self.order], "flip": [bool(f) for f in self.flip]}

    @classmethod
    def from_dict(cls, d: Optional[Dict[str, Any]]) -> "DisplayTransform":
        if not d:
            return cls()
        order = tuple(int(i) for i in d["order"])
        flip = tuple(bool(f) for f in d["flip"])
        if sorted(order) != [0, 1, 2] or len(flip) != 3:
            raise LayerGeometryError(f"layer metadata has an invalid display transform {d}")
        return cls(order, flip)  # type: ignore[arg-type]


def radiological_transform(affine: np.ndarray) -> DisplayTransform:
    """The :class:`DisplayTransform` that shows a file with ``affine`` in :data:`DISPLAY_AXCODES` order.

    Args:
        affine: ``(4, 4)`` voxel-to-world RAS matrix; oblique axes go to their closest world axis.
    """
    from nibabel.orientations import axcodes2ornt, io_orientation

    ornt = io_orientation(np.asarray(affine, dtype=float))  # per file axis: (world axis, +-1)
    target = axcodes2ornt(DISPLAY_AXCODES)  # per layer axis: (world axis, +-1)
    order, flip = [], []
    for world_axis, sign in target:
        i = int(np.flatnonzero(ornt[:, 0] == world_axis)[0])
        order.append(i)
        flip.append(bool(ornt[i, 1] != sign))
    return DisplayTransform(tuple(order), tuple(flip))  # type: ignore[arg-type]


class LayerGeometryError(ValueError):
    """A layer cannot be used as a 3D volume (2D, RGB, shape mismatch with its image)."""


@dataclass
class LayerGeometry:
    """Where a layer's voxels sit, recovered from its metadata or (failing that) its napari transform.

    Attributes:
        affine: (4, 4) voxel-to-world matrix of the file's voxel grid, used for writing.
        spacing: voxel size along the file's array axes, in mm.
        shape: shape of the layer's data (display order); every layer of this image has it.
        reference: the source ``engine.io.Volume`` when the layer came from a file, else ``None``.
        notes: user-facing remarks (for example "no spacing known, assumed 1 mm").
        display: layer <-> file voxel order (identity for layers not made by this plugin).
    """

    affine: np.ndarray
    spacing: Tuple[float, ...]
    shape: Tuple[int, ...]
    reference: Any = None
    notes: List[str] = field(default_factory=list)
    display: DisplayTransform = field(default_factory=DisplayTransform)

    @property
    def file_shape(self) -> Tuple[int, ...]:
        """Shape of the file's voxel array."""
        return tuple(self.shape[a] for a in np.argsort(self.display.order))

    def to_file(self, array: Any) -> np.ndarray:
        """A layer-order array (e.g. a labels layer's data) as a view in the file's voxel order."""
        return self.display.to_file(array)

    def to_display(self, array: Any) -> np.ndarray:
        """A file-order array (e.g. ``Prediction.labels``) as a view in the layer's order."""
        return self.display.to_display(array)

    def layer_metadata(self) -> Dict[str, Any]:
        """``metadata[META_KEY]`` entries that place another layer of this shape on the same grid."""
        meta: Dict[str, Any] = {
            "affine": np.asarray(self.affine, dtype=float).tolist(),
            "spacing": [float(s) for s in self.spacing],
            "shape": [int(s) for s in self.shape],
            "file_shape": [int(s) for s in self.file_shape],
            "display": self.display.as_dict(),
        }
        if self.reference is not None:
            meta["volume"] = self.reference
            meta["path"] = getattr(self.reference, "path", None)
        return meta


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


def volume_metadata(volume: Any, modality: Optional[str] = None,
                    display: Optional[DisplayTransform] = None) -> Dict[str, Any]:
    """The ``layer.metadata`` entry for a layer made from ``volume`` (an ``engine.io.Volume``).

    ``metadata[META_KEY]`` holds the geometry (``affine``/``spacing``/``file_shape`` of the file,
    ``shape`` of the layer, ``display`` transform, ``path``, the ``volume``) and ``modality``;
    ``metadata["modality"]`` and ``metadata["modality_source"]`` (``"file"``, ``"guessed"`` or
    ``None``) are also top-level keys for the widget.
    """
    display = display or DisplayTransform()
    file_shape = tuple(int(s) for s in np.shape(volume.data))
    modality = modality or getattr(volume, "modality", None)
    source = getattr(volume, "modality_source", None) if modality == getattr(volume, "modality", None) else "given"
    meta: Dict[str, Any] = {
        "affine": np.asarray(volume.affine, dtype=float).tolist(),
        "spacing": [float(s) for s in volume.spacing],
        "shape": list(display.display_shape(file_shape)),
        "file_shape": list(file_shape),
        "display": display.as_dict(),
        "path": str(volume.path) if getattr(volume, "path", None) else None,
        "volume": volume,
    }
    if modality:
        meta["modality"] = modality
    return {META_KEY: meta, "modality": modality, "modality_source": source if modality else None}


def layer_kwargs(volume: Any, name: str, modality: Optional[str] = None,
                 display: Optional[DisplayTransform] = None) -> Dict[str, Any]:
    """Keyword arguments for ``viewer.add_image``/``add_labels`` that keep the volume's geometry.

    Args:
        volume: ``engine.io.Volume``.
        name: layer name.
        modality: overrides the volume's own modality.
        display: how the layer's data is ordered (``display.to_display(volume.data)``); default the
            file's voxel order.
    """
    display = display or DisplayTransform()
    affine = display.display_affine(volume.affine, np.shape(volume.data))
    scale, translate = scale_translate(affine, tuple(float(v) for v in np.linalg.norm(affine[:3, :3], axis=0)))
    return {
        "name": name,
        "scale": scale,
        "translate": translate,
        "metadata": volume_metadata(volume, modality, display),
    }


def radiological_layer(volume: Any, name: str, modality: Optional[str] = None) -> Tuple[np.ndarray, Dict[str, Any]]:
    """``(data, kwargs)`` for a layer showing ``volume`` in the radiological view (see module doc).

    Returns:
        ``data`` a view of ``volume.data`` in display order, and :func:`layer_kwargs` for it.
    """
    display = radiological_transform(volume.affine)
    return display.to_display(volume.data), layer_kwargs(volume, name, modality, display)


def layer_grid(layer: Any) -> Dict[str, np.ndarray]:
    """Keyword arguments that put a new layer on ``layer``'s grid in the viewer: everything napari composes into it.
    Scale and translate alone left labels and prompt layers beside an image whose layer has an ``affine``, ``rotate``
    or ``shear`` (another reader's oblique scan), and a click on it pointed at another voxel."""
    return {"scale": np.array(layer.scale), "translate": np.array(layer.translate), "rotate": np.array(layer.rotate),
            "shear": np.array(layer.shear), "affine": np.array(layer.affine.affine_matrix)}


def layer_geometry(layer: Any) -> LayerGeometry:
    """Recover the source geometry of an image or labels layer.

    Args:
        layer: a napari Image or Labels layer with 3D data.

    Returns:
        The geometry; without plugin metadata, the affine is the layer's data-to-world transform (scale,
        translate, rotate, shear and affine, :func:`data_to_world`) and ``notes`` says so.

    Raises:
        LayerGeometryError: the layer is not a 3D scalar volume, or its shape differs from the
            source image it claims to belong to.
    """
    return geometry_from_state(layer.name, layer.data, layer.metadata, layer.scale, layer.translate,
                               rgb=bool(getattr(layer, "rgb", False)), rotate=layer.rotate, shear=layer.shear,
                               affine=layer.affine.affine_matrix)


def geometry_from_state(name: str, data: Any, metadata: Optional[Dict[str, Any]], scale: Any, translate: Any,
                        rgb: bool = False, rotate: Any = None, shear: Any = None, affine: Any = None) -> LayerGeometry:
    """:func:`layer_geometry` from a layer's parts (what a napari writer receives as ``meta``).

    Without plugin metadata the grid is the layer's whole data-to-world transform, ``affine @ (translate, rotate @
    shear @ scale)`` as napari composes it, and the voxel spacing the column norms of its linear part: another reader
    (or ``viewer.add_image(data, affine=...)``) may carry the voxel size in ``affine`` alone with ``scale`` 1, and
    reading ``scale`` only segmented such a scan as 1 mm voxels.
    """
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
            display=DisplayTransform.from_dict(meta.get("display")),
        )
    notes: List[str] = []
    world = data_to_world(scale, translate, rotate, shear, affine)
    spacing = tuple(float(v) for v in np.linalg.norm(world[:3, :3], axis=0))
    shown = tuple(round(v, 6) for v in spacing)
    if np.allclose(spacing, 1.0):
        notes.append(f"layer '{name}' carries no voxel spacing; assuming 1 mm isotropic voxels")
    elif np.allclose(world[:3, :3], np.diag(np.asarray(scale, dtype=float)[-3:])):
        notes.append(f"layer '{name}' has no source file geometry; using its scale {shown} as spacing")
    else:
        notes.append(f"layer '{name}' has no source file geometry; using the voxel size {shown} of its "
                     "transform (scale, affine, rotate, shear) as spacing")
    return LayerGeometry(affine=world, spacing=spacing, shape=shape, notes=notes)


def data_to_world(scale: Any, translate: Any, rotate: Any = None, shear: Any = None, affine: Any = None) -> np.ndarray:
    """The ``(4, 4)`` voxel-to-world matrix of a 3D layer's last three axes, as napari composes its parts.

    napari maps a data index ``i`` to ``affine @ (rotate @ shear @ diag(scale) @ i + translate)``; ``rotate`` and
    ``shear`` may be matrices or napari's short forms (an angle, upper-triangular coefficients), ``affine`` an
    ``(N + 1, N + 1)`` matrix. Missing parts are the identity.
    """
    scale_v = np.asarray(scale, dtype=float)[-3:]
    linear = np.diag(scale_v)
    if rotate is not None or shear is not None:
        # napari's own composition, so short forms and embedding in more dimensions read as napari reads them
        from napari.utils.transforms.transform_utils import compose_linear_matrix

        full = compose_linear_matrix(np.eye(len(scale_v)) if rotate is None else rotate, scale_v,
                                     np.zeros(0) if shear is None else shear)
        linear = np.asarray(full, dtype=float)[-3:, -3:]
    inner = np.eye(4)
    inner[:3, :3] = linear
    inner[:3, 3] = np.asarray(translate, dtype=float)[-3:]
    if affine is None:
        return inner
    outer_full = np.asarray(getattr(affine, "affine_matrix", affine), dtype=float)  # a napari Affine or its matrix
    outer = np.eye(4)
    outer[:3, :3] = outer_full[-4:-1, -4:-1]
    outer[:3, 3] = outer_full[-4:-1, -1]
    return outer @ inner


def reference_volume(geometry: LayerGeometry, data: Any) -> Any:
    """The ``engine.io.Volume`` that defines the grid ``data`` is written on.

    Args:
        geometry: from :func:`layer_geometry`.
        data: the array to be written, shape ``geometry.shape``.

    Returns:
        The source file's Volume when known (its affine and header are kept on writing), else a
        header-less Volume built from the layer's spacing and origin, in the file's voxel order.
    """
    from engine.io import Volume

    if geometry.reference is not None:
        return geometry.reference
    return Volume(data=geometry.to_file(data), affine=geometry.affine, spacing=geometry.spacing, header=None,
                  path=None)


def image_volume(layer: Any, geometry: Optional[LayerGeometry] = None) -> Any:
    """An ``engine.io.Volume`` holding an image layer's current data on its source grid.

    Args:
        layer: a napari Image layer with 3D data in display order (see :class:`DisplayTransform`).
        geometry: from :func:`layer_geometry`, computed if not given.

    Returns:
        A Volume in the file's voxel order (the source Volume itself when the layer still shows it).
    """
    from engine.io import Volume

    geometry = geometry or layer_geometry(layer)
    data = geometry.to_file(layer.data)
    ref = geometry.reference
    if ref is not None and _same_view(data, ref.data):
        return ref
    return Volume(data=data, affine=geometry.affine, spacing=geometry.spacing,
                  header=getattr(ref, "header", None), path=getattr(ref, "path", None),
                  modality=getattr(ref, "modality", None), modality_source=getattr(ref, "modality_source", None))


def _same_view(a: np.ndarray, b: Any) -> bool:
    """Whether ``a`` is exactly the array ``b`` (same memory, shape and strides)."""
    b = np.asarray(b)
    return (a.shape == b.shape and a.strides == b.strides and a.dtype == b.dtype
            and a.__array_interface__["data"][0] == b.__array_interface__["data"][0])
