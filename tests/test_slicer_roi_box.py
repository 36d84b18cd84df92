"""Send box: a Markups ROI becomes the voxels whose centres it encloses, along its own axes (real MRML classes from
``slicer-core``). A reviewer's find: the ROI's world bounds were used, so an ROI turned with an oblique volume was sent
as a box up to 11 times larger, and edges on voxel boundaries (x.5) were rounded half to even: one side grew a voxel."""
from __future__ import annotations

import numpy as np
import pytest

from slicer_support import int16_volume_node, load_module, slicer  # noqa: F401 - skips first
import vtk  # noqa: E402


@pytest.fixture(scope="module")
def mod():
    return load_module()


def _oblique(degrees: float = 25.0) -> np.ndarray:
    """IJK-to-RAS of an anisotropic volume turned about two axes."""
    a, b = np.radians(degrees), np.radians(degrees / 2)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    affine = np.eye(4)
    affine[:3, :3] = rz @ rx @ np.diag([0.9, 1.4, 3.0])
    affine[:3, 3] = [-40.0, 12.0, 7.5]
    return affine


def _volume(scene, affine: np.ndarray, shape=(48, 40, 16)):
    return int16_volume_node(scene, np.zeros(shape), affine, "v")


def _roi_on_grid(scene, affine: np.ndarray, lo_edge, hi_edge):
    """An ROI along the volume's axes, from continuous voxel coordinates ``lo_edge`` to ``hi_edge`` (placed as in a
    slice view rotated to the volume)."""
    lo_edge, hi_edge = np.asarray(lo_edge, float), np.asarray(hi_edge, float)
    axes = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "roi")
    to_node = vtk.vtkMatrix4x4()
    centre = (affine @ np.r_[(lo_edge + hi_edge) / 2, 1.0])[:3]
    for i in range(3):
        for j in range(3):
            to_node.SetElement(i, j, float(axes[i, j]))
        to_node.SetElement(i, 3, float(centre[i]))
    roi.GetObjectToNodeMatrix().DeepCopy(to_node)
    roi.SetSize(*((hi_edge - lo_edge) * spacing))
    return roi


def test_an_roi_turned_with_an_oblique_volume_is_sent_as_the_voxels_it_encloses(mod):
    scene = slicer.vtkMRMLScene()
    affine = _oblique()
    volume = _volume(scene, affine)
    # edges on voxel boundaries around voxels 20..30, 20..28, 5..9
    roi = _roi_on_grid(scene, affine, [19.5, 19.5, 4.5], [30.5, 28.5, 9.5])
    lo, hi = mod.MambaHoMELogic().roi_corners(volume, roi)
    assert (lo, hi) == ([20, 20, 5], [30, 28, 9])


@pytest.mark.parametrize("start", [10, 11])
def test_edges_on_voxel_boundaries_grow_no_side(mod, start):
    scene = slicer.vtkMRMLScene()
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    volume = _volume(scene, affine)
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "roi")
    roi.SetCenter(start + 5.0, start + 5.0, 8.0)
    roi.SetSize(11.0, 11.0, 5.0)  # edges at start - 0.5 and start + 10.5: voxels start..start + 10
    lo, hi = mod.MambaHoMELogic().roi_corners(volume, roi)
    assert (lo, hi) == ([start, start, 6], [start + 10, start + 10, 10])


def test_a_flat_roi_on_a_slice_keeps_that_slice_and_one_past_the_volume_is_clipped(mod):
    scene = slicer.vtkMRMLScene()
    volume = _volume(scene, np.eye(4))
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "roi")
    roi.SetCenter(10.0, 10.0, 7.3)
    roi.SetSize(6.0, 6.0, 0.0)  # a 2D box drawn on one slice, between two centres
    lo, hi = mod.MambaHoMELogic().roi_corners(volume, roi)
    assert (lo, hi) == ([7, 7, 7], [13, 13, 7])
    roi.SetCenter(46.0, 10.0, 8.0)
    roi.SetSize(10.0, 4.0, 4.0)  # past the volume's last voxel (47) on i
    lo, hi = mod.MambaHoMELogic().roi_corners(volume, roi)
    assert (lo, hi) == ([41, 8, 6], [47, 12, 10])
