"""The exact axis map between a volume's own voxel order and the orientation the network was trained in.

Training reorients every case to the checkpoint's ``preprocessing.orientation`` (RAS) before cropping
patches, so the network learnt anatomy in that axis order. A volume stored in another order (the
spinal cord T2 of the shared data is PSR: its cord runs along array axis 1, not 2) must be shown to
the network the same way. Reorientation is a permutation and flips of the axes, no interpolation, so
every voxel maps to exactly one voxel and back: prompts, masks and bounding boxes cross the map
losslessly. Voxel size is not changed here: :class:`engine.interactive.session.InteractiveSession`
resamples only the region the network sees to the checkpoint's ``target_spacing``, using the spacing
permuted by :meth:`AxisFrame.spacing_to_network`.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np

BBox = Tuple[slice, slice, slice]


class AxisFrame:
    """Maps arrays, voxel indices and boxes between the volume's voxel order and the network's.

    Args:
        shape: the volume's shape ``(I, J, K)`` in its own voxel order.
        affine: its ``(4, 4)`` voxel-to-world (RAS+ mm) matrix, or None (already in the network's order).
        orientation: axis codes the network sees, e.g. ``"RAS"``.

    Attributes:
        net_shape: the shape in the network's axis order.
        identity: True when nothing moves (no affine, or the volume is already in that orientation).
    """

    def __init__(self, shape: Sequence[int], affine: Optional[np.ndarray] = None, orientation: str = "RAS") -> None:
        import nibabel as nib

        self.shape = tuple(int(s) for s in shape)
        if affine is None:
            self._xform = np.array([[0, 1], [1, 1], [2, 1]], dtype=float)
        else:
            src = nib.orientations.io_orientation(np.asarray(affine, dtype=np.float64))
            dst = nib.orientations.axcodes2ornt(tuple(orientation))
            self._xform = nib.orientations.ornt_transform(src, dst)  # row i: source axis i -> output axis, flip
        self._inverse = np.empty_like(self._xform)
        for src_axis, (dst_axis, flip) in enumerate(self._xform):
            self._inverse[int(dst_axis)] = (src_axis, flip)
        self.net_shape = tuple(self.shape[int(np.flatnonzero(self._xform[:, 0] == o)[0])] for o in range(3))
        self.identity = bool(np.array_equal(self._xform, [[0, 1], [1, 1], [2, 1]]))

    # ------------------------------------------------------------------ arrays
    def to_network(self, array: np.ndarray) -> np.ndarray:
        """A ``(I, J, K)`` array (or a block of it) in the network's axis order (a view when possible)."""
        import nibabel as nib

        return array if self.identity else nib.orientations.apply_orientation(array, self._xform)

    def to_volume(self, array: np.ndarray) -> np.ndarray:
        """The inverse of :meth:`to_network` (a view when possible)."""
        import nibabel as nib

        return array if self.identity else nib.orientations.apply_orientation(array, self._inverse)

    def spacing_to_network(self, spacing: Sequence[float]) -> Tuple[float, float, float]:
        """The volume's voxel size ``(3,)`` (mm along its own array axes) along the network's axes
        (as :func:`engine.preprocess.oriented_spacing` computes it from an affine)."""
        sp = [float(v) for v in spacing]
        out = [0.0, 0.0, 0.0]
        for src_axis, (dst_axis, _flip) in enumerate(self._xform):
            out[int(dst_axis)] = sp[src_axis]
        return tuple(out)  # type: ignore[return-value]

    # ------------------------------------------------------------------ indices
    def voxels_to_network(self, voxels: np.ndarray) -> np.ndarray:
        """``(N, 3)`` volume voxel indices -> network voxel indices."""
        return self._map_voxels(voxels, self._xform, self.shape)

    def voxels_to_volume(self, voxels: np.ndarray) -> np.ndarray:
        """``(N, 3)`` network voxel indices -> volume voxel indices (the inverse of :meth:`voxels_to_network`)."""
        return self._map_voxels(voxels, self._inverse, self.net_shape)

    def _map_voxels(self, voxels: np.ndarray, xform: np.ndarray, shape: Sequence[int]) -> np.ndarray:
        """``(N, 3)`` indices moved by ``xform`` (row i: input axis i -> output axis, flip) from a grid of ``shape``."""
        v = np.asarray(voxels, dtype=np.int64).reshape(-1, 3)
        if self.identity:
            return v.copy()
        out = np.empty_like(v)
        for in_axis, (out_axis, flip) in enumerate(xform):
            col = v[:, in_axis]
            out[:, int(out_axis)] = col if flip > 0 else shape[in_axis] - 1 - col
        return out

    def bbox_to_volume(self, bbox: BBox) -> BBox:
        """A box of the network's axis order (slices with ``start <= stop``) -> the same voxels' box in the
        volume's order."""
        if self.identity:
            return bbox
        out = [slice(0, 0)] * 3
        for src_axis, (dst_axis, flip) in enumerate(self._xform):
            s = bbox[int(dst_axis)]
            n = self.shape[src_axis]
            out[src_axis] = slice(s.start, s.stop) if flip > 0 else slice(n - s.stop, n - s.start)
        return tuple(out)  # type: ignore[return-value]
