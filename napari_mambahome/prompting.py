"""Prompting one object: the backend interface, layer <-> file voxel indices, and writing an object into labels.

No Qt here. The interactive panel (:mod:`.panels.interactive`) turns clicks into calls on a
:class:`PromptBackend` (the engine's :class:`engine.interactive.InteractiveSession` locally, a remote
session for a server) made by ``Session.prompt_backend_factory``; each call returns an Update-like
object (``.bbox`` slices and ``.mask`` in the FILE's voxel order, ``.latency_s``). The panel mirrors the
object's mask (:class:`ObjectState`) and writes it into the target labels layer with :func:`compose`.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Protocol, Sequence, Tuple, runtime_checkable

import numpy as np

BBox = Tuple[slice, slice, slice]

INTERACTIVE_KEY = "interactive"
"""Key, inside a labels layer's ``metadata["mambahome"]``, of the record of the objects made by prompting
(:func:`note_accepted_object`); the Cases panel saves it as the case's ``interactive`` record
(:class:`engine.cases.InteractiveOrigin`)."""

PROMPT_LAYER_KEY = "mambahome_prompt_layer"
"""``layer.metadata`` key marking the interactive panel's prompt layers: never an image or labels to
segment, correct or save (see :func:`is_prompt_layer`)."""


def is_prompt_layer(layer: Any) -> bool:
    """Whether a napari layer is one of the interactive panel's prompt layers."""
    return bool((getattr(layer, "metadata", None) or {}).get(PROMPT_LAYER_KEY))


@runtime_checkable
class PromptBackend(Protocol):
    """One object being prompted; engine.interactive.InteractiveSession satisfies it, a remote session too."""

    def add_point(self, voxel: Sequence[int], positive: bool = True) -> Any: ...  # Update-like: .bbox, .mask, .latency_s

    def add_box(self, corner_a: Sequence[int], corner_b: Sequence[int], positive: bool = True) -> Any: ...

    def add_scribble(self, voxels_or_mask: Any, positive: bool = True, joined: bool = True) -> Any: ...

    def set_initial_mask(self, mask: np.ndarray) -> Any: ...

    def undo(self) -> Any: ...

    def reset(self) -> Any: ...


def local_backend_factory(checkpoint_or_model: Any, volume: Any, device: str) -> PromptBackend:
    """The engine's session on this machine (builds the network: call it in a worker thread).

    Args:
        checkpoint_or_model: an interactive checkpoint path, or ``(model, metadata)``.
        volume: ``engine.io.Volume`` in the file's voxel order ``(I, J, K)``.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``.

    Raises:
        engine.interactive.InteractionError: a non-interactive checkpoint or an unusable volume.
    """
    from engine.interactive import InteractiveSession

    return InteractiveSession(checkpoint_or_model, volume, device=device)


def interactive_problem(metadata: Dict[str, Any], source: str) -> Optional[str]:
    """Why a checkpoint's metadata cannot be prompted (``None``: it is an interactive model). Asked on the GUI thread
    (a model chosen, Start prompting): the encoding and prompt modules need no torch."""
    from engine.interactive.encoding import interactive_encoding
    from engine.interactive.prompts import InteractionError

    try:
        interactive_encoding(metadata, source)
    except InteractionError as exc:
        return str(exc)
    return None


def note_accepted_object(record: Optional[Dict[str, Any]], class_id: int, prompts: int,
                         model_version: Optional[str], model_name: Optional[str]) -> Dict[str, Any]:
    """A labels layer's interactive record once one more prompted object was accepted in it.

    Args:
        record: the record so far (``None``: no object of this layer was made by prompting yet).
        class_id: the accepted object's label value.
        prompts: the prompts in effect for that object.
        model_version, model_name: the interactive model prompted (the latest one is recorded).

    Returns:
        A new ``{"class_ids", "objects", "prompts", "model_version", "model_name"}`` dict (JSON types),
        the form :meth:`engine.cases.InteractiveOrigin.from_json_dict` reads.
    """
    old = record or {}
    return {"class_ids": sorted({int(c) for c in old.get("class_ids", [])} | {int(class_id)}),
            "objects": int(old.get("objects", 0)) + 1, "prompts": int(old.get("prompts", 0)) + int(prompts),
            "model_version": model_version, "model_name": model_name}


def layer_index_to_file(display: Any, shape: Sequence[int], index: Sequence[float]) -> np.ndarray:
    """A voxel index of a layer in display order -> the same voxel's index in the file's order.

    Args:
        display: the layer's :class:`.._geometry.DisplayTransform`.
        shape: the layer's (display-order) shape.
        index: ``(3,)`` layer voxel index (already rounded and inside the layer).

    Returns:
        int64 ``(3,)`` index into the file-order array (``display.to_file(layer_data)``).
    """
    out = np.zeros(3, dtype=np.int64)
    for a, (axis, flipped) in enumerate(zip(display.order, display.flip)):
        value = int(index[a])
        out[axis] = int(shape[a]) - 1 - value if flipped else value
    return out


def layer_indices_to_file(display: Any, shape: Sequence[int], indices: Any) -> np.ndarray:
    """Many voxel indices of a layer in display order -> the same voxels' indices in the file's order.

    Args:
        display: the layer's :class:`.._geometry.DisplayTransform`.
        shape: the layer's (display-order) shape.
        indices: ``(N, 3)`` integer layer voxel indices (inside the layer).

    Returns:
        int64 ``(N, 3)`` indices into the file-order array (row ``n`` is :func:`layer_index_to_file` of row ``n``).
    """
    arr = np.asarray(indices, dtype=np.int64).reshape(-1, 3)
    out = np.empty_like(arr)
    for a, (axis, flipped) in enumerate(zip(display.order, display.flip)):
        out[:, axis] = int(shape[a]) - 1 - arr[:, a] if flipped else arr[:, a]
    return out


def inside(index: Sequence[float], shape: Sequence[int]) -> bool:
    """Whether a (rounded) voxel index lies inside an array of ``shape``."""
    arr = np.asarray(index, dtype=float)
    return bool(np.all(np.isfinite(arr)) and np.all(arr >= 0) and np.all(arr < np.asarray(shape)))


def compose(base: np.ndarray, obj: np.ndarray, class_id: int, overwrite: bool) -> np.ndarray:
    """The labels of a region once the current object is drawn over what was there before it.

    Args:
        base: labels of the region before this object (any integer dtype).
        obj: the object's 0/1 mask of the region, same shape.
        class_id: the object's label value.
        overwrite: draw over other classes too (off: voxels labelled with another class keep it).

    Returns:
        A new array, ``base``'s dtype: ``class_id`` where the object is (and may be drawn), ``base`` elsewhere.
    """
    allowed = np.ones(base.shape, bool) if overwrite else (base == 0) | (base == class_id)
    return np.where((obj != 0) & allowed, np.asarray(class_id, dtype=base.dtype), base)


def union_bbox(a: Optional[BBox], b: Optional[BBox]) -> Optional[BBox]:
    """The smallest box holding both (``None`` and empty boxes are ignored)."""
    boxes = [box for box in (a, b) if box is not None and all(s.stop > s.start for s in box)]
    if not boxes:
        return None
    return tuple(slice(min(box[i].start for box in boxes), max(box[i].stop for box in boxes))  # type: ignore[return-value]
                 for i in range(3))


class ObjectState:
    """The current object's mask as the backend reported it, in the file's voxel order.

    Args:
        shape: the file-order volume shape ``(I, J, K)``.
    """

    def __init__(self, shape: Sequence[int]) -> None:
        self.mask = np.zeros(tuple(int(s) for s in shape), dtype=np.uint8)

    def apply(self, update: Any) -> Optional[BBox]:
        """Copy an Update's ``mask`` into its ``bbox``; returns the box (``None`` when nothing changed)."""
        bbox = tuple(slice(int(s.start), int(s.stop)) for s in update.bbox)
        if not all(s.stop > s.start for s in bbox):
            return None
        self.mask[bbox] = np.asarray(update.mask, dtype=np.uint8)
        return bbox  # type: ignore[return-value]
