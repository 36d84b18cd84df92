"""What the 3D Slicer module's tests share: they need the server extra and the MRML classes of ``slicer-core``
(imported here, so a test module importing this is skipped, visibly, exactly where they are missing), and the module
file loaded as Slicer loads it."""
from __future__ import annotations

import importlib.util
from pathlib import Path

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
