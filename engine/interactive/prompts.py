"""Prompts an annotator (or the simulated / robot user) gives: points, boxes and scribbles.

Coordinates are voxel indices ``(i, j, k)`` of the volume as loaded: the array axes of
:class:`engine.io.Volume` ``data``, i.e. the file's voxel order (nibabel), not world millimetres and
not the network's RAS orientation. napari shows that array with ``scale=spacing``, so a click's data
coordinate (rounded) is already such an index.

Every prompt is validated against the volume shape before anything changes; a bad prompt raises
:class:`InteractionError` naming what is wrong.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Tuple, Union

import numpy as np

PROMPT_KINDS = ("point", "box", "scribble")
Shape3 = Tuple[int, int, int]


class InteractionError(ValueError):
    """A prompt, volume or checkpoint the interactive session cannot use; the message says what."""


@dataclass(frozen=True)
class Prompt:
    """One interaction.

    Attributes:
        kind: ``"point"``, ``"box"`` or ``"scribble"``.
        positive: True adds to the object, False removes.
        voxels: int64 ``(N, 3)`` voxel indices. A point: ``N = 1``. A box: ``N = 2``, its lowest and
            highest corner, both inclusive. A scribble: every voxel it passes through.
    """

    kind: str
    positive: bool
    voxels: np.ndarray

    @property
    def lo(self) -> np.ndarray:
        """Lowest voxel index along each axis, ``(3,)``."""
        return self.voxels.min(axis=0)

    @property
    def hi(self) -> np.ndarray:
        """Highest voxel index along each axis (inclusive), ``(3,)``."""
        return self.voxels.max(axis=0)

    @property
    def centre(self) -> np.ndarray:
        """Voxel the inference window is centred on: the point, the box centre, or the scribble voxel
        closest to the scribble's centroid (a curved scribble's centroid may lie outside it)."""
        if self.kind == "scribble":
            mean = self.voxels.mean(axis=0)
            return self.voxels[int(np.argmin(((self.voxels - mean) ** 2).sum(axis=1)))]
        return (self.lo + self.hi) // 2


def _shape_str(shape: Sequence[int]) -> str:
    return "x".join(str(int(s)) for s in shape)


def as_voxel(voxel: Sequence[float], shape: Shape3, what: str = "point") -> np.ndarray:
    """Validate one voxel index against ``shape``; returns int64 ``(3,)``.

    Raises:
        InteractionError: not 3 finite integers, or outside the volume.
    """
    try:
        arr = np.asarray(voxel, dtype=np.float64).reshape(-1) if np.size(voxel) else np.zeros(0)
    except (TypeError, ValueError):
        raise InteractionError(f"{what} must be 3 voxel indices (i, j, k), got {voxel!r}") from None
    if arr.shape != (3,) or not np.all(np.isfinite(arr)):
        raise InteractionError(f"{what} must be 3 voxel indices (i, j, k), got {voxel!r}")
    if np.any(arr != np.round(arr)):
        raise InteractionError(f"{what} {tuple(arr.tolist())} must be integer voxel indices (round napari's "
                               "data coordinates first)")
    idx = arr.astype(np.int64)
    if np.any(idx < 0) or np.any(idx >= np.asarray(shape)):
        raise InteractionError(f"{what} {tuple(idx.tolist())} lies outside the volume of shape {_shape_str(shape)} "
                               "(voxel indices start at 0)")
    return idx


def as_sign(positive: object, what: str = "prompt") -> bool:
    """``positive`` as a bool: True / False (numpy's too) or the integers 1 / 0.

    Raises:
        InteractionError: anything else (``"no"``, ``"false"``, None, 0.5), which ``bool()`` would read as a sign
            without a word (``bool("false")`` is True: a negative click would add).
    """
    if isinstance(positive, (bool, np.bool_)):
        return bool(positive)
    if isinstance(positive, (int, np.integer)) and int(positive) in (0, 1):
        return bool(positive)
    raise InteractionError(f"{what}'s positive must be True or False, got {positive!r}")


def make_point(voxel: Sequence[float], shape: Shape3, positive: bool = True) -> Prompt:
    """A point prompt at voxel ``(i, j, k)``."""
    return Prompt("point", as_sign(positive, "point"), as_voxel(voxel, shape, "point")[None])


def make_box(corner_a: Sequence[float], corner_b: Sequence[float], shape: Shape3, positive: bool = True) -> Prompt:
    """A box between two opposite corners (both inclusive, any order).

    Corners sharing one coordinate give a 2D box on that slice (nnInteractive's boxes are 2D); corners
    sharing two or three coordinates span no area and are refused.
    """
    a = as_voxel(corner_a, shape, "box corner")
    b = as_voxel(corner_b, shape, "box corner")
    if int((a == b).sum()) >= 2:
        raise InteractionError(f"box {tuple(a.tolist())}-{tuple(b.tolist())} has zero size: its corners must differ "
                               "along at least two axes (a 2D box on one slice, or a 3D box)")
    return Prompt("box", as_sign(positive, "box"), np.stack([np.minimum(a, b), np.maximum(a, b)]))


def make_scribble(voxels_or_mask: Union[np.ndarray, Sequence[Sequence[float]]], shape: Shape3,
                  positive: bool = True, joined: bool = True) -> Prompt:
    """A scribble: a boolean/integer mask of the volume's shape, or an ``(N, 3)`` list of voxel indices
    (consecutive voxels further apart than one voxel are joined by straight lines, as a drawn stroke; with
    ``joined=False`` the voxels are taken as they are, a set: a painted stroke's voxels, in any order).

    Raises:
        InteractionError: empty, wrong shape, or voxels outside the volume.
    """
    arr = np.asarray(voxels_or_mask)
    if arr.ndim == 3:
        if tuple(arr.shape) != tuple(shape):
            raise InteractionError(f"scribble mask has shape {_shape_str(arr.shape)} but the volume is "
                                   f"{_shape_str(shape)}")
        if arr.dtype != bool and not np.issubdtype(arr.dtype, np.number):
            raise InteractionError(f"scribble mask dtype {arr.dtype} is not numeric or boolean")
        if arr.dtype.kind in "fc" and not np.all(np.isfinite(arr)):
            raise InteractionError("scribble mask has NaN or infinite values")
        vox = np.argwhere(arr != 0)
    elif arr.ndim == 2 and arr.shape[1] == 3 or arr.size == 0:
        if arr.size == 0:
            raise InteractionError("scribble is empty: give at least one voxel")
        try:
            coords = arr.astype(np.float64)
        except (TypeError, ValueError):
            raise InteractionError(f"scribble voxels must be numbers (i, j, k), got dtype {arr.dtype}") from None
        if not np.all(np.isfinite(coords)):
            raise InteractionError("scribble voxels must be finite")
        pts = np.round(coords).astype(np.int64)
        out = pts[(pts < 0).any(axis=1) | (pts >= np.asarray(shape)).any(axis=1)]
        if len(out):
            raise InteractionError(f"scribble voxel {tuple(out[0].tolist())} lies outside the volume of shape "
                                   f"{_shape_str(shape)} ({len(out)} voxel(s) outside)")
        if joined:
            vox = rasterize_polyline(pts)
        else:  # a set: joining raster-ordered voxels would fill the inside of a curved stroke
            _, first = np.unique(pts, axis=0, return_index=True)
            vox = pts[np.sort(first)]
    else:
        raise InteractionError(f"scribble must be a 3D mask of the volume's shape or (N, 3) voxel indices, got "
                               f"an array of shape {arr.shape}")
    if len(vox) == 0:
        raise InteractionError("scribble is empty: the mask has no voxel set")
    return Prompt("scribble", as_sign(positive, "scribble"), np.ascontiguousarray(vox, dtype=np.int64))


def rasterize_polyline(points: np.ndarray) -> np.ndarray:
    """The voxels of straight segments joining consecutive ``points`` ``(N, 3)``, duplicates removed
    (order of first visit kept)."""
    points = np.asarray(points, dtype=np.int64).reshape(-1, 3)
    pieces = [points[:1]]
    for a, b in zip(points[:-1], points[1:]):
        n = int(np.abs(b - a).max())
        if n == 0:
            continue
        t = np.arange(1, n + 1)[:, None] / n
        pieces.append(np.round(a + (b - a) * t).astype(np.int64))
    vox = np.concatenate(pieces)
    _, first = np.unique(vox, axis=0, return_index=True)
    return vox[np.sort(first)]
