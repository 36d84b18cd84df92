"""Voxel order and world-coordinate conversions between 3D Slicer, NRRD and the engine.

The engine (and NIfTI) index arrays ``(I, J, K)`` with a RAS+ voxel-to-world affine. 3D Slicer's
``arrayFromVolume`` gives ``(K, J, I)`` and its ``IJKToRAS`` matrix is that same affine, so only the
array's axes are reversed. NRRD files usually describe LPS space; flipping the first two world axes
turns LPS into RAS.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def kji_to_ijk(array_kji: np.ndarray) -> np.ndarray:
    """Slicer's ``(K, J, I)`` array -> the engine's ``(I, J, K)`` (a view; copy before sending)."""
    return np.asarray(array_kji).transpose(2, 1, 0)


def ijk_to_kji(array_ijk: np.ndarray) -> np.ndarray:
    """The engine's ``(I, J, K)`` array -> Slicer's ``(K, J, I)`` (a view)."""
    return np.asarray(array_ijk).transpose(2, 1, 0)


def check_affine(affine: Sequence[Sequence[float]], name: str = "volume") -> np.ndarray:
    """A finite, invertible ``(4, 4)`` voxel-to-world matrix as float64, or a ValueError naming ``name``."""
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (4, 4) or not np.all(np.isfinite(a)):
        raise ValueError(f"{name}: the voxel-to-world matrix must be a finite 4x4 matrix, got shape {a.shape}")
    if abs(float(np.linalg.det(a[:3, :3]))) < 1e-12:
        raise ValueError(f"{name}: the voxel-to-world matrix is singular")
    return a


# NRRD 3D world spaces (full and abbreviated names, lower case) -> sign of each world axis relative to RAS.
# ``scanner-xyz`` and ``3D-right-/left-handed`` name no patient directions; ITK (so SimpleITK and 3D Slicer)
# takes their numbers as LPS, like a file that declares no space, and so do the engine and this client: read
# as anything else, labels written back would lie mirrored beside the image in those tools.
NRRD_SPACE_SIGNS = {
    "right-anterior-superior": (1, 1, 1), "ras": (1, 1, 1),
    "left-anterior-superior": (-1, 1, 1), "las": (-1, 1, 1),
    "left-posterior-superior": (-1, -1, 1), "lps": (-1, -1, 1),
    "scanner-xyz": (-1, -1, 1), "3d-right-handed": (-1, -1, 1), "3d-left-handed": (-1, -1, 1),
}


def affine_from_nrrd_header(header: dict, name: str = "NRRD") -> np.ndarray:
    """RAS+ voxel-to-world affine from a pynrrd header (``space directions``, ``space origin``, ``space``).

    Spaces are read as ITK and the engine read them (:data:`NRRD_SPACE_SIGNS`; no ``space`` is LPS).

    Args:
        header: the dict ``nrrd.read`` returns (array read with its default Fortran index order, so
            array axis ``n`` is the header's axis ``n``).

    Raises:
        ValueError: no spatial directions, or a space that is not one 3D space (a space-time space, an
            unknown name).
    """
    directions = header.get("space directions")
    if directions is None:
        raise ValueError(f"{name}: NRRD header has no 'space directions'; cannot place the volume in space")
    raw = str(header.get("space", "left-posterior-superior")).strip()
    space = raw.lower() or "left-posterior-superior"
    if space not in NRRD_SPACE_SIGNS:
        kind = "a space-time (4D) space, a time series" if ("time" in space or space in ("rast", "last", "lpst")) \
            else "not a 3D space this client can place"
        raise ValueError(f"{name}: NRRD space {raw!r} is {kind}; supported: RAS, LAS, LPS, scanner-xyz, "
                         "3D-right-handed, 3D-left-handed")
    rows = [np.asarray(d, dtype=np.float64) for d in directions
            if d is not None and np.all(np.isfinite(np.asarray(d, dtype=np.float64)))]
    if len(rows) != 3:
        raise ValueError(f"{name}: expected 3 spatial axes in 'space directions', got {len(rows)}")
    affine = np.eye(4)
    affine[:3, :3] = np.stack(rows, axis=1)  # column n = world step of array axis n
    origin = header.get("space origin")
    affine[:3, 3] = np.asarray(origin, dtype=np.float64) if origin is not None else 0.0
    affine = np.diag(list(NRRD_SPACE_SIGNS[space]) + [1.0]) @ affine
    return check_affine(affine, name)


def world_to_voxel(points_ras: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """RAS points ``(N, 3)`` -> voxel indices ``(N, 3)`` (rounded to the nearest voxel, int64)."""
    pts = np.atleast_2d(np.asarray(points_ras, dtype=np.float64))
    homo = np.c_[pts, np.ones(len(pts))]
    ijk = (np.linalg.inv(np.asarray(affine, dtype=np.float64)) @ homo.T).T[:, :3]
    return np.rint(ijk).astype(np.int64)


def clip_voxels(voxels: np.ndarray, shape: Sequence[int]) -> Optional[np.ndarray]:
    """Voxels inside ``shape`` only (None when none is)."""
    v = np.atleast_2d(np.asarray(voxels, dtype=np.int64))
    inside = np.all((v >= 0) & (v < np.asarray(shape)), axis=1)
    return v[inside] if inside.any() else None
