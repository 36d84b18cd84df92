"""napari writer: a labels layer on its source image's exact voxel grid, in the format of the file name.

NIfTI (``.nii.gz``, ``.nii``), NRRD (``.nrrd``, ``.nhdr``), 3D Slicer segmentations (``.seg.nrrd``,
with the layer's class names and colours), MetaImage (``.mha``, ``.mhd``) and MGZ. The layer's data
is mapped back from the display order to the file's voxel order (``_geometry.DisplayTransform``) and
written with the source image's affine (and header, for NIfTI) by ``engine.io.save_volume``,
atomically. A labels layer with no source image is written on the layer's whole transform (scale,
translate, rotate, shear and affine, as napari composes them; its column norms the voxel spacing),
and the user is told so.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from ._geometry import META_KEY, geometry_from_state, reference_volume

WRITE_SUFFIXES = (".nii.gz", ".nii", ".seg.nrrd", ".nrrd", ".nhdr", ".mha", ".mhd", ".mgz")
"""File name endings written as they are; any other name gets ``.nii.gz`` appended."""


def labels_path(path: str) -> Path:
    """``path`` itself when it ends with one of :data:`WRITE_SUFFIXES`, else with ``.nii.gz`` appended."""
    p = Path(path)
    if p.name.lower().endswith(WRITE_SUFFIXES):
        return p
    return p.with_name(p.name + ".nii.gz")


nifti_path = labels_path  # the name earlier versions exported


def _segments(meta: Dict[str, Any], labels: np.ndarray) -> Optional[List[Dict[str, Any]]]:
    """Segment names and colours for a ``.seg.nrrd``: names from the layer's ``class_names`` or its
    ``features`` ``class`` column, colours as napari shows them."""
    names = layer_class_names(meta) or []
    # every named class, painted or not (a segment may be empty): a class not yet painted was lost on reopening
    values = sorted({int(v) for v in np.unique(labels) if v != 0} | set(range(1, len(names))))
    colormap = meta.get("colormap")
    colors = None
    if colormap is not None and hasattr(colormap, "map") and values:
        colors = np.asarray(colormap.map(np.asarray(values)))[:, :3]
    segments = []
    for k, v in enumerate(values):
        name = names[v] if v < len(names) and names[v] else f"label {v}"
        segments.append({"value": v, "name": name, "color": None if colors is None else colors[k].tolist()})
    return segments


def layer_class_names(meta: Dict[str, Any]) -> Optional[List[str]]:
    """The class names a labels layer's state keeps (``metadata[META_KEY]["class_names"]``, else its ``features``'
    ``class`` column); ``None`` when it keeps none (a label file whose names are unknown)."""
    names = list((meta.get("metadata") or {}).get(META_KEY, {}).get("class_names") or [])
    features = meta.get("features")
    if not names and features is not None and "class" in getattr(features, "columns", ()) and len(features):
        index = features["index"] if "index" in features.columns else range(len(features))
        lookup = dict(zip((int(i) for i in index), (str(c) for c in features["class"])))
        names = [lookup.get(i, f"label {i}") for i in range(max(lookup, default=0) + 1)]
    return [str(n) for n in names] if names else None


def write_labels(path: str, data: Any, meta: Dict[str, Any]) -> List[str]:
    """npe2 single-layer writer for labels layers: :func:`_write_labels`, whose refusal also reaches the user.

    npe2 takes a writer's ``ValueError`` (every refusal here: a sheared grid as NIfTI, a layer off its image's grid,
    a name a format cannot hold) for "not a writer of this file", and napari then says only "Given plugin
    'napari-mambahome' is not a valid writer for <path>": the reason is said as an error notification first.
    """
    try:
        return _write_labels(path, data, meta)
    except ValueError as exc:
        from napari.utils.notifications import show_error

        show_error(f"could not save {meta.get('name', 'the labels')!r} as {Path(path).name}: {exc}")
        raise


def _write_labels(path: str, data: Any, meta: Dict[str, Any]) -> List[str]:
    """npe2 single-layer writer for labels layers.

    Args:
        path: target file; its suffix picks the format (:data:`WRITE_SUFFIXES`), ``.nii.gz`` is
            appended to any other name.
        data: the labels array in the layer's (display) order, integer.
        meta: the layer state napari passes (``name``, ``scale``, ``translate``, ``rotate``, ``shear``,
            ``affine``, ``metadata``, ``features``, ``colormap``).

    Returns:
        The written path, as napari expects.

    Raises:
        LayerGeometryError: the layer is not 3D, or its shape differs from its source image.
        engine.io.VolumeError: the labels cannot be written in that format.
    """
    from engine.io import save_volume

    name = meta.get("name", Path(path).name)
    # the whole transform napari hands over: a voxel size carried by ``affine`` alone was written as 1 mm
    geometry = geometry_from_state(name, data, meta.get("metadata"), meta.get("scale", (1, 1, 1)),
                                   meta.get("translate", (0, 0, 0)), rotate=meta.get("rotate"),
                                   shear=meta.get("shear"), affine=meta.get("affine"))
    target = labels_path(path)
    labels = geometry.to_file(np.asarray(data))
    segments = _segments(meta, labels) if target.name.lower().endswith(".seg.nrrd") else None
    reference = reference_volume(geometry, data)
    # NIfTI is marked a label map (labels saved as corrected.nii.gz opened again as an image layer: nothing in the
    # name says "label") with the layer's class names (None while unknown, so a reopened file is not named after the
    # selected model), whatever the scan was read from: from an NRRD or MHA scan (no NIfTI header to copy) it was not
    nifti = target.name.lower().endswith((".nii", ".nii.gz"))
    save_volume(target, labels, reference, segments=segments, label_map=nifti,
                class_names=layer_class_names(meta) if nifti else None)
    # napari hands the writer the layer's own metadata dict (``Layer._get_state``): the layer now says it is saved, so
    # removing it is not announced as a loss of unsaved edits (the next paint event takes the mark away)
    from ._session import mark_saved

    mark_saved(meta.get("metadata"), str(target))
    if geometry.notes:
        from napari.utils.notifications import show_info

        show_info(f"saved {target.name} without a source image: " + "; ".join(geometry.notes))
    return [str(target)]
