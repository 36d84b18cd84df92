"""A NRRD without 'space directions' (only 'spacings', possibly negative, with or without a 'space') puts each
voxel where ITK, and so 3D Slicer, puts it: a negative spacing is a flipped axis, not a mirrored volume."""
from __future__ import annotations

import numpy as np
import pytest

from engine.io import load_volume

sitk = pytest.importorskip("SimpleITK")
nrrd = pytest.importorskip("nrrd")

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


@pytest.mark.parametrize("spacings", [[2.0, 1.5, 3.0], [-2.0, 1.5, 3.0], [2.0, -1.5, -3.0]])
@pytest.mark.parametrize("extra", [{}, {"kinds": ["domain"] * 3}])
def test_spacings_only_nrrd_places_voxels_where_itk_does(tmp_path, spacings, extra):
    data = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6, order="F")
    path = tmp_path / "spacings.nrrd"
    nrrd.write(str(path), data, {"spacings": spacings, **extra}, index_order="F")

    ours = load_volume(path)
    itk = sitk.ReadImage(str(path))
    # every voxel: the same value at the same world point (ITK's LPS turned into our RAS)
    itk_values = sitk.GetArrayFromImage(itk).transpose(2, 1, 0)
    for index in [(0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (3, 4, 5), (2, 3, 1)]:
        world_itk = LPS_TO_RAS @ np.asarray(itk.TransformIndexToPhysicalPoint(index), dtype=np.float64)
        ours_index = np.linalg.solve(ours.affine[:3, :3], world_itk - ours.affine[:3, 3])
        ours_index = tuple(int(round(v)) for v in ours_index)
        assert ours.data[ours_index] == itk_values[index], (spacings, index)
