"""What the geometry tests share: where SimpleITK (3D Slicer's reader) places a file, in RAS."""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk

LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def itk_affine(path):
    """SimpleITK's voxel-to-world map in RAS, or None when ITK refuses the file."""
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError:
        return None
    affine = np.eye(4)
    affine[:3, :3] = np.asarray(image.GetDirection()).reshape(3, 3) * np.asarray(image.GetSpacing())[None, :]
    affine[:3, 3] = image.GetOrigin()
    return LPS @ affine
