"""Shared test fixtures.

``shared_data``: the real labelled data beside the repo (``$MAMBAHOME_SHARED_DATA``, default
``<repo>/../shared/data``); tests using it are skipped, visibly, when it is absent.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

# napari reads its settings path once, at import: a test session keeps its preferences (the plugin saves reader
# preferences when napari first uses it), and the plugin's own settings (which of them it offered), out of the
# machine's own profile; tests that need a folder of their own still set it (plugin_env)
if "NAPARI_CONFIG" not in os.environ:
    os.environ["NAPARI_CONFIG"] = str(Path(tempfile.mkdtemp(prefix="mambahome-napari-settings-")) / "settings.yaml")
if "MAMBAHOME_CONFIG_DIR" not in os.environ:
    os.environ["MAMBAHOME_CONFIG_DIR"] = tempfile.mkdtemp(prefix="mambahome-config-")


def shared_data_path() -> Path:
    return Path(os.environ.get("MAMBAHOME_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Root of the shared real data, or skip the test when it is not present."""
    root = shared_data_path()
    if not root.is_dir():
        pytest.skip(f"shared real data not found at {root} (set MAMBAHOME_SHARED_DATA)")
    return root


def oblique_affine(spacing=(1.5, 1.5, 2.0)) -> np.ndarray:
    """A scanner-like affine: LPS-ish flips, an axis swap and an offset (not identity, not RAS)."""
    affine = np.zeros((4, 4))
    affine[0, 1] = -spacing[1]   # array axis 1 runs right->left
    affine[1, 0] = -spacing[0]   # array axis 0 runs anterior->posterior
    affine[2, 2] = spacing[2]
    affine[:3, 3] = (90.0, 110.0, -60.0)
    affine[3, 3] = 1.0
    return affine


@pytest.fixture
def tmp_volume(tmp_path):
    """Write a small image + label pair with a non-identity affine; returns (image_path, label_path, affine)."""
    import nibabel as nib

    rng = np.random.default_rng(0)
    affine = oblique_affine()
    image = rng.normal(40.0, 20.0, size=(20, 24, 16)).astype(np.float32)
    label = np.zeros((20, 24, 16), dtype=np.uint8)
    label[5:10, 6:14, 4:9] = 1
    label[12:16, 10:20, 8:12] = 2
    img_path = tmp_path / "image.nii.gz"
    lab_path = tmp_path / "label.nii.gz"
    nib.save(nib.Nifti1Image(image, affine), str(img_path))
    nib.save(nib.Nifti1Image(label, affine), str(lab_path))
    return img_path, lab_path, affine
