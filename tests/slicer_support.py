"""What the 3D Slicer module's tests share: they need the server extra and the MRML classes of ``slicer-core``
(imported here, so a test module importing this is skipped, visibly, exactly where they are missing), and the module
file loaded as Slicer loads it."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
nib = pytest.importorskip("nibabel")
nrrd = pytest.importorskip("nrrd")
slicerio = pytest.importorskip("slicerio")
slicer = pytest.importorskip("slicer", reason="needs the slicer-core package (MRML classes)")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the installed 'slicer' package has no MRML classes", allow_module_level=True)

MODULE_FILE = Path(__file__).resolve().parents[1] / "slicer" / "MambaHoME" / "MambaHoME.py"


def load_module():
    spec = importlib.util.spec_from_file_location("MambaHoME", MODULE_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def file_volume_node(scene, path: Path, name: str = "vol"):
    """A ``vtkMRMLScalarVolumeNode`` read from ``path`` by Slicer's own storage node (ITK), as File -> Add Data reads
    it, named ``name`` (the server names a session, and its warnings, by the node's name)."""
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    assert storage.ReadData(node), f"Slicer could not read {path}"
    node.SetAndObserveStorageNodeID(storage.GetID())
    node.SetName(name)
    return node


def unfilled_volume_node(scene, shape, affine, name: str = "ct"):
    """A ``vtkMRMLScalarVolumeNode`` of ``shape`` (I, J, K) int16 voxels, allocated but not filled (a large volume
    costs no numpy copy), with ``affine`` as its IJK-to-RAS matrix."""
    import vtk

    node = int16_volume_node(scene, np.zeros((2, 2, 2)), affine, name)
    image = vtk.vtkImageData()
    image.SetDimensions(*shape)
    image.AllocateScalars(vtk.VTK_SHORT, 1)
    node.SetAndObserveImageData(image)
    return node


def int16_volume_node(scene, arr, affine, name: str = "vol"):
    """A ``vtkMRMLScalarVolumeNode`` holding ``arr`` (I, J, K) as int16, with ``affine`` as its IJK-to-RAS matrix (what
    Slicer makes of a loaded NIfTI)."""
    import vtk
    from vtk.util import numpy_support

    arr = np.asarray(arr).astype(np.int16)
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    image = vtk.vtkImageData()
    image.SetDimensions(*arr.shape)
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(
        np.ascontiguousarray(arr.transpose(2, 1, 0)).ravel(), deep=True, array_type=vtk.VTK_SHORT))
    node.SetAndObserveImageData(image)
    m = vtk.vtkMatrix4x4()
    for i in range(4):
        for j in range(4):
            m.SetElement(i, j, float(affine[i, j]))
    node.SetIJKToRASMatrix(m)
    return node


def tiny_mr_root(folder: Path, model: str = "tiny-mr") -> Path:
    """``folder`` holding ``models/<model>.safetensors`` (the tests' tiny automatic MR model: seconds on a CPU) and
    ``mr.nii.gz`` (a 32x32x24 phantom MR written as a file)."""
    from engine.io import save_volume
    from engine.synth import make_phantom
    from test_modality_warning import tiny_checkpoint

    (folder / "models").mkdir()
    tiny_checkpoint(folder / "models" / f"{model}.safetensors", "MR", seen=["MR"], version=model)
    image, _ = make_phantom((32, 32, 24), "MR", seed=2).to_volumes()
    save_volume(folder / "mr.nii.gz", image.data, image)
    return folder


def ijk_to_ras(node) -> np.ndarray:
    """A volume node's IJK-to-RAS matrix as a ``(4, 4)`` array."""
    import vtk

    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return np.array([[m.GetElement(i, j) for j in range(4)] for i in range(4)])


def click(points, node, voxel) -> None:
    """Place a control point of the Markups list ``points`` at the centre of ``node``'s voxel ``voxel``, as a click."""
    import vtk

    points.AddControlPointWorld(vtk.vtkVector3d(*(ijk_to_ras(node) @ np.r_[voxel, 1.0])[:3]))
